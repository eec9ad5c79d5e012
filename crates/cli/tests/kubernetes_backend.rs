//! The kubernetes backend end to end with the real gateway binary: pod
//! created → runner dials back → session answers → idle stop → pod deleted
//! → gateway SIGKILL → the restarted gateway adopts the pod; a pod whose
//! image is missing reports `ErrImagePull` to the client.
//!
//! By default against the test-only stand-in API server
//! (`aishell_backend_kubernetes::stand_in`), which runs each Pod as a Docker
//! container of an image built from this binary (`aishell image build`,
//! tag of this run's own, removed at exit), and a kubeconfig generated for
//! it. What the stand-in does not show (scheduling, registry pulls, RBAC,
//! NetworkPolicy, node loss) is listed in ARCHITECTURE.md.
//!
//! With `AISHELL_TEST_KUBECONFIG` set, the same tests run against that
//! cluster instead; they then also need `AISHELL_TEST_KUBE_IMAGE` (the
//! aishell image, pullable by the cluster), `AISHELL_TEST_KUBE_RUNNER_URL`
//! (a `ws://HOST:PORT` where pods reach this machine; the gateway listens on
//! that port on every address) and optionally `AISHELL_TEST_KUBE_CLAIM`
//! (a ReadWriteMany claim in the kubeconfig's namespace [default:
//! aishell-workspaces]). Without Docker and without a cluster the tests
//! fail with a clear message; `AISHELL_SKIP_DOCKER_TESTS=1` skips them.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aishell_backend_kubernetes::stand_in::{DockerRuntime, LABEL_STAND_IN, StandIn};
use common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use serde_json::json;

const TEST_IMAGE_PREFIX: &str = "aishell:cargo-k8s-test-";
const NAMESPACE: &str = "aishell-test";

fn test_image() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| format!("{TEST_IMAGE_PREFIX}{}", std::process::id()))
}

extern "C" fn remove_test_image() {
    let _ = Command::new("docker")
        .args(["rmi", "--force", test_image()])
        .output();
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI (used by the tests only)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Build this run's image once (removing tags of killed earlier runs).
fn build_image() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let lock = std::fs::File::create(std::env::temp_dir().join("aishell-k8s-test-image.lock"))
            .map_err(|e| e.to_string())?;
        lock.lock().map_err(|e| e.to_string())?;
        let tags = docker(&[
            "image",
            "ls",
            "--format",
            "{{.Repository}}:{{.Tag}}",
            "aishell",
        ]);
        for tag in tags.lines() {
            if let Some(pid) = tag.strip_prefix(TEST_IMAGE_PREFIX)
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                docker(&["rmi", "--force", tag]);
            }
        }
        // SAFETY: registers a plain function with no captured state.
        unsafe { libc::atexit(remove_test_image) };
        let out = Command::new(BIN)
            .args(["image", "build", "--tag", test_image()])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    });
    if let Err(e) = built {
        panic!(
            "the kubernetes backend tests run pods as Docker containers of a locally built image, and building it failed:\n{e}\nStart Docker (or install busybox-static), set AISHELL_TEST_KUBECONFIG to use a real cluster, or set AISHELL_SKIP_DOCKER_TESTS=1 to skip."
        );
    }
}

/// Where the pods run: the stand-in (with its containers) or a real cluster.
enum Cluster {
    StandIn {
        stand_in: StandIn,
        workspaces: tempfile::TempDir,
    },
    Real {
        image: String,
        runner_url: String,
        claim: String,
    },
}

/// A gateway on the kubernetes backend, the kubeconfig it uses, and the
/// pods' cluster; removes every pod and container it started when dropped.
struct KubeGateway {
    gw: Gateway,
    cluster: Cluster,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl KubeGateway {
    /// `None` (printing why) when the tests are skipped.
    async fn start(image: Option<&str>, args: &[&str]) -> Option<KubeGateway> {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig;
        let cluster;
        let mut all: Vec<String> = vec!["--execution-mode".into(), "kubernetes".into()];
        let mut port = 0;
        if let Ok(path) = std::env::var("AISHELL_TEST_KUBECONFIG") {
            let need = |name: &str| {
                std::env::var(name).unwrap_or_else(|_| {
                    panic!(
                        "AISHELL_TEST_KUBECONFIG is set: {name} must be too (see this file's docs)"
                    )
                })
            };
            let runner_url = need("AISHELL_TEST_KUBE_RUNNER_URL");
            port = url::Url::parse(&runner_url)
                .ok()
                .and_then(|u| u.port())
                .expect("AISHELL_TEST_KUBE_RUNNER_URL names a port");
            kubeconfig = PathBuf::from(path);
            cluster = Cluster::Real {
                image: need("AISHELL_TEST_KUBE_IMAGE"),
                runner_url,
                claim: std::env::var("AISHELL_TEST_KUBE_CLAIM")
                    .unwrap_or_else(|_| "aishell-workspaces".into()),
            };
        } else {
            if std::env::var("AISHELL_SKIP_DOCKER_TESTS").as_deref() == Ok("1") {
                eprintln!(
                    "AISHELL_SKIP_DOCKER_TESTS=1 and no AISHELL_TEST_KUBECONFIG: skipping a kubernetes backend test"
                );
                return None;
            }
            eprintln!(
                "AISHELL_TEST_KUBECONFIG is not set: running against the stand-in API server (pods as Docker containers)"
            );
            build_image();
            let workspaces = tempfile::tempdir().unwrap();
            let claims = HashMap::from([(
                "aishell-workspaces".to_string(),
                workspaces.path().to_path_buf(),
            )]);
            let runtime = DockerRuntime::local(claims).expect("the Docker engine");
            let stand_in = StandIn::new(NAMESPACE, Some(runtime));
            let url = stand_in.serve().await.unwrap();
            kubeconfig = dir.path().join("kubeconfig");
            std::fs::write(&kubeconfig, stand_in.kubeconfig(&url)).unwrap();
            cluster = Cluster::StandIn {
                stand_in,
                workspaces,
            };
        }
        all.extend(["--kubeconfig".into(), kubeconfig.display().to_string()]);
        match &cluster {
            Cluster::StandIn { workspaces, .. } => {
                all.extend([
                    "--kube-image".into(),
                    image.unwrap_or(test_image()).to_string(),
                    "--workspaces-mount".into(),
                    workspaces.path().display().to_string(),
                ]);
            }
            Cluster::Real {
                image: real,
                runner_url,
                claim,
            } => {
                all.extend([
                    "--kube-image".into(),
                    image.unwrap_or(real).to_string(),
                    "--kube-workspaces-claim".into(),
                    claim.clone(),
                    "--runner-url".into(),
                    runner_url.clone(),
                    "--bind".into(),
                    "0.0.0.0".into(),
                ]);
            }
        }
        all.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let gw = Gateway::start_on_port(port, &refs, &[]);
        Some(KubeGateway {
            gw,
            cluster,
            kubeconfig,
            _dir: dir,
        })
    }

    fn is_stand_in(&self) -> bool {
        matches!(self.cluster, Cluster::StandIn { .. })
    }

    fn instance(&self) -> String {
        std::fs::read_to_string(self.gw.data_dir.join("kubernetes-backend/instance-id"))
            .expect("the kubernetes backend writes its instance id")
            .trim()
            .to_string()
    }

    /// This gateway's pods, through the API (stand-in or cluster) as any
    /// client sees them.
    async fn pods(&self) -> Vec<Pod> {
        let file = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let api: kube::Api<Pod> = kube::Api::default_namespaced(client);
        let selector = format!(
            "app.kubernetes.io/managed-by=aishell,aishell.dev/instance={}",
            self.instance()
        );
        api.list(&ListParams::default().labels(&selector))
            .await
            .expect("list pods")
            .items
    }

    async fn wait_pods(&self, what: &str, pred: impl Fn(&[Pod]) -> bool) -> Vec<Pod> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pods = self.pods().await;
            if pred(&pods) {
                return pods;
            }
            if Instant::now() > deadline {
                panic!(
                    "pods never {what}: {:?}; logs:\n{}",
                    names(&pods),
                    self.gw.raw_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

impl std::ops::Deref for KubeGateway {
    type Target = Gateway;
    fn deref(&self) -> &Gateway {
        &self.gw
    }
}

impl std::ops::DerefMut for KubeGateway {
    fn deref_mut(&mut self) -> &mut Gateway {
        &mut self.gw
    }
}

impl Drop for KubeGateway {
    fn drop(&mut self) {
        // Stop first (it deletes its pods), so nothing starts after the sweep.
        self.gw.stop();
        match &self.cluster {
            Cluster::StandIn { stand_in, .. } => {
                let filter = format!("label={LABEL_STAND_IN}={}", stand_in.id());
                let ids = docker(&["ps", "-aq", "--filter", &filter]);
                let mut args = vec!["rm", "-f"];
                args.extend(ids.lines().filter(|l| !l.is_empty()));
                if args.len() > 2 {
                    docker(&args);
                }
            }
            Cluster::Real { .. } => {
                let selector = format!("aishell.dev/instance={}", self.instance());
                let _ = Command::new("kubectl")
                    .arg("--kubeconfig")
                    .arg(&self.kubeconfig)
                    .args(["delete", "pods", "-l", &selector, "--wait=false"])
                    .output();
            }
        }
    }
}

async fn say(c: &mut Client, id: &str, command: &str) -> Vec<serde_json::Value> {
    c.send(json!({"type": "message", "id": id, "conversation_id": "main", "content": command}))
        .await;
    c.turn().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_runs_in_a_pod_stops_when_idle_and_is_adopted_after_a_gateway_sigkill() {
    let Some(mut kgw) = KubeGateway::start(
        None,
        &["--enable-warm-pool", "false", "--session-idle-timeout", "3"],
    )
    .await
    else {
        return;
    };
    let mut c = kgw.connect().await;
    let marker = format!("in-a-pod-{}", std::process::id());
    let frames = say(
        &mut c,
        "k1",
        &format!("echo {marker} > note.txt && cat note.txt"),
    )
    .await;
    assert!(
        text_of(&frames).contains(&marker),
        "the session answers from its pod: {}",
        pretty(&frames)
    );
    let first = kgw.wait_pods("one running", |p| p.len() == 1).await;
    let labels = first[0].metadata.labels.clone().unwrap();
    assert_eq!(labels["aishell.dev/mode"], "cold");
    assert_eq!(labels["aishell.dev/session"], c.session_id);
    if let Cluster::StandIn { workspaces, .. } = &kgw.cluster {
        assert_eq!(
            read(&workspaces.path().join("local/note.txt")).trim(),
            marker,
            "the file is on the shared workspaces volume"
        );
        // The files API reads it there too (the gateway's mount of the volume).
        let (status, listing) = kgw.http("GET", "/api/files?dir=", Some(&kgw.token), None);
        assert_eq!(status, 200, "{listing}");
        assert!(listing.to_string().contains("note.txt"), "{listing}");
    }

    // Idle stop: the pod is deleted, and gone.
    kgw.wait_log(
        "idle stop",
        |l| l["phase"] == "idle_timeout",
        Duration::from_secs(30),
    )
    .await;
    kgw.wait_pods("deleted after the idle stop", |p| p.is_empty())
        .await;

    // The next message starts a new pod, which sees the file.
    let frames = say(&mut c, "k2", "cat note.txt").await;
    assert!(text_of(&frames).contains(&marker), "{}", pretty(&frames));
    let second = kgw.wait_pods("one again", |p| p.len() == 1).await;
    assert_ne!(names(&first), names(&second), "a new pod");

    // A crash: the pod keeps running; the restarted gateway adopts it.
    let session = c.session_id.clone();
    let last_seen = c.last_seq;
    drop(c);
    kgw.kill9();
    assert_eq!(
        names(&kgw.pods().await),
        names(&second),
        "the pod outlives the gateway"
    );
    kgw.restart(&[]);
    kgw.wait_log(
        "adoption",
        |l| l["event"] == "task_adopted",
        Duration::from_secs(30),
    )
    .await;
    let mut c = kgw
        .connect_as(&kgw.token.clone(), Some((&session, last_seen)))
        .await
        .expect("reconnect");
    let frames = say(&mut c, "k3", "echo after-crash").await;
    assert!(
        text_of(&frames).contains("after-crash"),
        "the adopted pod answers: {}",
        pretty(&frames)
    );
    assert_eq!(
        names(&kgw.pods().await),
        names(&second),
        "the same pod serves the session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_image_is_missing_reports_err_image_pull_to_the_client() {
    let missing = format!("aishell:missing-{}", std::process::id());
    let Some(kgw) = KubeGateway::start(Some(&missing), &["--enable-warm-pool", "false"]).await
    else {
        return;
    };
    let mut c = kgw.connect().await;
    let started = Instant::now();
    c.send(json!({"type": "message", "id": "x", "content": "echo hi"}))
        .await;
    let frames = c
        .until(|v| is_type(v, "error"), Duration::from_secs(30))
        .await;
    let err = &frames.last().unwrap()["error"];
    assert_eq!(err["code"], "TASK_START_FAILED", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("ErrImagePull") || message.contains("ImagePullBackOff"),
        "the cluster's words reach the client: {message}"
    );
    assert!(message.contains(&missing), "{message}");
    if kgw.is_stand_in() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "at once, not at the launch deadline: {:?}",
            started.elapsed()
        );
    }
    kgw.wait_pods("deleted after the failed start", |p| p.is_empty())
        .await;
}
