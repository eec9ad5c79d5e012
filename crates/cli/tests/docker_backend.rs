//! The docker backend against the real engine: sessions in
//! containers, warm pool, crashes, adoption after a gateway crash, clear
//! errors, per-user isolation on the shared workspaces directory.
//!
//! The image is built once per test run from this very binary with
//! `aishell image build`, under a tag of this run's own
//! (`aishell:cargo-test-<pid>`), and removed when the run exits; tags left
//! by a run that was killed are removed by the next one. No test re-tags an
//! image it did not build. Without a Docker engine these tests FAIL with a
//! clear message; set `AISHELL_SKIP_DOCKER_TESTS=1` to skip them on purpose.
//! Every test removes its containers (label `aishell.instance` of its own
//! gateway) when it ends, pass or fail. Containers use host networking and
//! the gateway listens on loopback only.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Tags of this file's test images: the prefix, then the test process's pid.
const TEST_IMAGE_PREFIX: &str = "aishell:cargo-test-";

/// This run's image tag.
fn test_image() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| format!("{TEST_IMAGE_PREFIX}{}", std::process::id()))
}

/// Remove this run's image when the test process exits (the harness ends
/// with `exit`, which runs `atexit` handlers; a static is never dropped).
extern "C" fn remove_test_image() {
    let _ = Command::new("docker")
        .args(["rmi", "--force", test_image()])
        .output();
}

/// Remove images of earlier runs whose process is gone (killed before its
/// `atexit`).
fn remove_stale_test_images() {
    let tags = docker(&[
        "image",
        "ls",
        "--format",
        "{{.Repository}}:{{.Tag}}",
        "aishell",
    ]);
    for tag in tags.lines() {
        let Some(pid) = tag.strip_prefix(TEST_IMAGE_PREFIX) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            docker(&["rmi", "--force", tag]);
        }
    }
}

/// `true` when the tests should run; panics with a clear message when the
/// engine is missing (unless opted out).
fn docker_ready() -> bool {
    if std::env::var("AISHELL_SKIP_DOCKER_TESTS").as_deref() == Ok("1") {
        eprintln!("AISHELL_SKIP_DOCKER_TESTS=1: skipping a docker backend test");
        return false;
    }
    static IMAGE: OnceLock<Result<(), String>> = OnceLock::new();
    let built = IMAGE.get_or_init(|| {
        // One build at a time across test processes sharing the engine.
        let lock =
            std::fs::File::create(std::env::temp_dir().join("aishell-docker-test-image.lock"))
                .map_err(|e| e.to_string())?;
        lock.lock().map_err(|e| e.to_string())?;
        remove_stale_test_images();
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
            "the docker backend tests need a Docker engine (and busybox-static for the image), and building the test image failed:\n{e}\nStart Docker (or install busybox-static), or set AISHELL_SKIP_DOCKER_TESTS=1 to skip these tests on a machine without Docker."
        );
    }
    true
}

/// `docker args`, which must succeed: a busy engine's transient failure is
/// retried, a lasting one fails the test with the CLI's own words (an
/// ignored failure would read as "no containers").
fn docker_ok(args: &[&str]) -> String {
    let mut last = String::new();
    for _ in 0..3 {
        let out = Command::new("docker")
            .args(args)
            .output()
            .expect("the docker CLI (used by the tests only)");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("docker {args:?} failed: {last}");
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI (used by the tests only)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A gateway on the docker backend; removes its containers when dropped.
struct DockerGateway {
    gw: Gateway,
    instance: String,
}

impl DockerGateway {
    fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_on_port(0, args, env)
    }

    fn start_on_port(port: u16, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all = vec!["--execution-mode", "docker"];
        if !args.contains(&"--docker-image") {
            all.extend(["--docker-image", test_image()]);
        }
        all.extend_from_slice(args);
        let gw = Gateway::start_on_port(port, &all, env);
        let instance = std::fs::read_to_string(gw.data_dir.join("docker-backend/instance-id"))
            .expect("the docker backend writes its instance id")
            .trim()
            .to_string();
        DockerGateway { gw, instance }
    }

    /// Ids of this gateway's containers (`running` only, or all) matching
    /// an extra label filter.
    fn containers(&self, running_only: bool, label: Option<&str>) -> BTreeSet<String> {
        let instance = format!("label=aishell.instance={}", self.instance);
        let mut args = vec!["ps", "-q", "--no-trunc", "--filter", &instance];
        if !running_only {
            args.push("-a");
        }
        let extra;
        if let Some(l) = label {
            extra = format!("label={l}");
            args.extend(["--filter", &extra]);
        }
        docker_ok(&args)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    async fn wait_containers(
        &self,
        what: &str,
        running_only: bool,
        label: Option<&str>,
        pred: impl Fn(&BTreeSet<String>) -> bool,
    ) -> BTreeSet<String> {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let c = self.containers(running_only, label);
            if pred(&c) {
                return c;
            }
            if Instant::now() > deadline {
                panic!(
                    "containers never {what}: {c:?}; logs:\n{}",
                    self.gw.raw_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl std::ops::Deref for DockerGateway {
    type Target = Gateway;
    fn deref(&self) -> &Gateway {
        &self.gw
    }
}

impl std::ops::DerefMut for DockerGateway {
    fn deref_mut(&mut self) -> &mut Gateway {
        &mut self.gw
    }
}

impl Drop for DockerGateway {
    fn drop(&mut self) {
        // Stop first, so the pool cannot start a container after the sweep.
        self.gw.stop();
        let ids: Vec<String> = self.containers(false, None).into_iter().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            docker(&args);
        }
    }
}

/// `PUT path` with a body on the gateway; the HTTP status.
fn http_put(gw: &Gateway, path: &str, token: &str, body: &[u8]) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "PUT {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    raw.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

async fn say(c: &mut Client, id: &str, command: &str) -> Vec<serde_json::Value> {
    c.send(json!({"type": "message", "id": id, "conversation_id": "main", "content": command}))
        .await;
    c.turn().await
}

fn status_sources(frames: &[serde_json::Value]) -> Vec<String> {
    of_type(frames, "status")
        .iter()
        .filter_map(|f| f["source"].as_str().map(str::to_string))
        .collect()
}

/// Shared body of the cold and warm tests: write, idle stop, come back in a
/// new container, read.
async fn workspace_survives_an_idle_stop(dgw: &DockerGateway, expect_source: &str) {
    let mut c = dgw.connect().await;
    let marker = format!("persisted-{}-{expect_source}", std::process::id());
    c.send(
        json!({"type": "message", "id": "w1", "conversation_id": "main",
        "content": format!("echo {marker} > note.txt && cat note.txt && id -u")}),
    )
    .await;
    let frames = c.turn().await;
    assert!(
        text_of(&frames).contains(&marker),
        "the agent wrote its file: {}",
        pretty(&frames)
    );
    assert!(
        status_sources(&frames).iter().any(|s| s == expect_source),
        "started {expect_source}: {}",
        pretty(&frames)
    );
    let session_label = format!("aishell.mode={expect_source}");
    let first = dgw.containers(true, Some(&session_label));
    assert!(!first.is_empty(), "a {expect_source} container runs");
    assert_eq!(
        read(&dgw.workspace("local").join("note.txt")).trim(),
        marker,
        "the file is on the shared host directory"
    );

    // Idle timeout (2 s): the task stops and its container is removed.
    dgw.wait_log(
        "idle stop",
        |l| l["phase"] == "idle_timeout",
        Duration::from_secs(30),
    )
    .await;
    let gone = first.clone();
    dgw.wait_containers("removed after the idle stop", false, None, |c| {
        c.is_disjoint(&gone)
    })
    .await;

    let frames = say(&mut c, "w2", "cat note.txt").await;
    assert!(
        text_of(&frames).contains(&marker),
        "the restarted task sees the file: {}",
        pretty(&frames)
    );
    let now = dgw.containers(true, None);
    assert!(
        now.is_disjoint(&first),
        "the second turn ran in a new container"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_session_runs_in_a_container_and_its_workspace_survives_an_idle_stop() {
    if !docker_ready() {
        return;
    }
    let dgw = DockerGateway::start(&[
        "--enable-warm-pool",
        "false",
        "--session-idle-timeout",
        "2",
        "--docker-memory",
        "256m",
        "--docker-cpus",
        "0.5",
        "--docker-pids-limit",
        "200",
    ]);
    // Limits, labels and a per-task-only environment, as the engine sees them.
    let mut c = dgw.connect().await;
    let frames = say(&mut c, "probe", "echo probe").await;
    assert!(text_of(&frames).contains("probe"), "{}", pretty(&frames));
    let ids = dgw.containers(true, Some("aishell.mode=cold"));
    let id = ids.iter().next().expect("a cold container");
    let seen = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}} {{.HostConfig.PidsLimit}} {{index .Config.Labels \"aishell.managed\"}} {{index .Config.Labels \"aishell.session\"}}",
        id,
    ]);
    assert_eq!(
        seen,
        format!("{} 500000000 200 true {}", 256 << 20, c.session_id)
    );
    let env = docker(&[
        "inspect",
        "-f",
        "{{range .Config.Env}}{{println .}}{{end}}",
        id,
    ]);
    let mut names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "AISHELL_GATEWAY_URL",
            "AISHELL_SESSION_ID",
            "AISHELL_TASK_CREDENTIAL",
            "AISHELL_TASK_ID",
            "AISHELL_TASK_MODE",
            "PATH"
        ],
        "per-task settings only"
    );
    drop(c);
    workspace_survives_an_idle_stop(&dgw, "cold").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_session_runs_in_a_pool_container_and_its_workspace_survives_an_idle_stop() {
    if !docker_ready() {
        return;
    }
    let dgw = DockerGateway::start(&[
        "--warm-pool-target-size",
        "1",
        "--session-idle-timeout",
        "2",
    ]);
    dgw.wait_pool_ready(1, Duration::from_secs(60)).await;
    workspace_survives_an_idle_stop(&dgw, "warm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_kill_of_a_ready_warm_container_evicts_and_replaces_it() {
    if !docker_ready() {
        return;
    }
    let dgw = DockerGateway::start(&["--warm-pool-target-size", "1"]);
    dgw.wait_pool_ready(1, Duration::from_secs(60)).await;
    let warm = dgw.containers(true, Some("aishell.mode=warm"));
    assert_eq!(warm.len(), 1, "one ready warm container: {warm:?}");
    let victim = warm.iter().next().unwrap().clone();
    docker(&["kill", &victim]);

    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let pool = dgw.pool();
        let running = dgw.containers(true, Some("aishell.mode=warm"));
        if pool["evicted"].as_u64().unwrap_or(0) >= 1
            && pool["ready"].as_u64() == Some(1)
            && running.len() == 1
            && !running.contains(&victim)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed container was not replaced: pool {pool}, running {running:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dgw.wait_containers("rid of the killed container", false, None, |c| {
        !c.contains(&victim)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_kill_of_a_busy_container_is_agent_crashed_and_the_next_message_restarts() {
    if !docker_ready() {
        return;
    }
    let dgw = DockerGateway::start(&["--enable-warm-pool", "false"]);
    let mut c = dgw.connect().await;
    c.send(
        json!({"type": "message", "id": "m1", "conversation_id": "main", "content": "sleep 60"}),
    )
    .await;
    c.until(|v| is_type(v, "tool_call"), Duration::from_secs(30))
        .await;
    let label = format!("aishell.session={}", c.session_id);
    let busy = dgw.containers(true, Some(&label));
    assert_eq!(busy.len(), 1, "the session's container: {busy:?}");
    let started = Instant::now();
    docker(&["kill", busy.iter().next().unwrap()]);
    let frames = c
        .until(
            |v| is_type(v, "error") && v["error"]["code"] == "AGENT_CRASHED",
            Duration::from_secs(20),
        )
        .await;
    let crash = frames.last().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "crash reported in {:?}",
        started.elapsed()
    );
    assert!(
        crash["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("code 137"),
        "the engine's exit reason reaches the client: {crash}"
    );

    let frames = say(&mut c, "m2", "echo back-again").await;
    assert!(
        text_of(&frames).contains("back-again"),
        "the next message restarted a task: {}",
        pretty(&frames)
    );
    dgw.wait_containers("rid of the killed container", false, None, |c| {
        c.is_disjoint(&busy)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_gateway_sigkill_running_containers_are_adopted_and_strays_removed() {
    if !docker_ready() {
        return;
    }
    let mut dgw = DockerGateway::start(&["--enable-warm-pool", "false"]);
    let mut c = dgw.connect().await;
    let frames = say(&mut c, "a1", "echo before-crash").await;
    assert!(text_of(&frames).contains("before-crash"));
    let session = c.session_id.clone();
    let label = format!("aishell.session={session}");
    let adopted = dgw
        .wait_containers("the session's container", true, Some(&label), |c| {
            c.len() == 1
        })
        .await;

    // A labelled container of this instance whose runner never dials back.
    // Named as the backend names a task's container.
    let stray_task = format!("t-stray-{}", std::process::id());
    let stray_name = format!("aishell-{stray_task}");
    let stray_task_label = format!("aishell.task={stray_task}");
    let instance_label = format!("aishell.instance={}", dgw.instance);
    let stray = docker(&[
        "run",
        "-d",
        "--name",
        &stray_name,
        "--network",
        "none",
        "--label",
        "aishell.managed=true",
        "--label",
        &instance_label,
        "--label",
        &stray_task_label,
        "--label",
        "aishell.mode=warm",
        "--entrypoint",
        "/bin/sleep",
        test_image(),
        "300",
    ]);
    assert!(!stray.is_empty(), "stray container started");

    let last_seen = c.last_seq;
    drop(c);
    dgw.kill9();
    dgw.restart(&["--orphan-grace", "3"]);
    dgw.wait_log(
        "adoption",
        |l| l["event"] == "task_adopted",
        Duration::from_secs(30),
    )
    .await;
    let mut c = dgw
        .connect_as(&dgw.token.clone(), Some((&session, last_seen)))
        .await
        .expect("reconnect");
    let frames = say(&mut c, "a2", "echo after-crash").await;
    assert!(
        text_of(&frames).contains("after-crash"),
        "the adopted container answers: {}",
        pretty(&frames)
    );
    assert_eq!(
        dgw.containers(true, Some(&label)),
        adopted,
        "the same container serves the session"
    );
    dgw.wait_containers("rid of the stray", false, None, |c| {
        !c.iter().any(|id| id.starts_with(&stray))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_a_clear_task_start_failed() {
    if !docker_ready() {
        return;
    }
    let missing = format!("aishell:missing-{}", std::process::id());
    let dgw = DockerGateway::start(&["--enable-warm-pool", "false", "--docker-image", &missing]);
    let mut c = dgw.connect().await;
    let started = Instant::now();
    c.send(json!({"type": "message", "id": "x", "content": "echo hi"}))
        .await;
    let frames = c
        .until(|v| is_type(v, "error"), Duration::from_secs(15))
        .await;
    let err = &frames.last().unwrap()["error"];
    assert_eq!(err["code"], "TASK_START_FAILED", "{err}");
    assert_eq!(err["reason"], "backend_refused", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("image {missing} not found"))
            && message.contains("aishell image build"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        dgw.containers(false, None).is_empty(),
        "nothing left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_engine_is_a_clear_task_start_failed() {
    if !docker_ready() {
        return;
    }
    let dead = std::env::temp_dir().join(format!("aishell-no-docker-{}.sock", std::process::id()));
    let host = format!("unix://{}", dead.display());
    let dgw =
        DockerGateway::start_with_env(&["--enable-warm-pool", "false"], &[("DOCKER_HOST", &host)]);
    let mut c = dgw.connect().await;
    let started = Instant::now();
    c.send(json!({"type": "message", "id": "x", "content": "echo hi"}))
        .await;
    let frames = c
        .until(|v| is_type(v, "error"), Duration::from_secs(15))
        .await;
    let err = &frames.last().unwrap()["error"];
    assert_eq!(err["code"], "TASK_START_FAILED", "{err}");
    assert_eq!(err["reason"], "backend_unreachable", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("cannot reach the Docker engine") && message.contains(&host),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let (status, _) = dgw.http_get("/ready");
    assert_eq!(status, 503, "/ready reports the backend down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_agent_cannot_read_or_write_a_workspace_in_its_container() {
    if !docker_ready() {
        return;
    }
    let dgw = DockerGateway::start(&["--enable-warm-pool", "false"]);
    users_cannot_reach_each_others_workspaces(&dgw).await;
}

/// The same with agents started before their claim, as root in their pool
/// containers: each takes its user's UID on `init`, and nothing of the other
/// user is reachable from it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prestarted_agents_take_their_users_uid_and_cannot_reach_another_workspace() {
    if !docker_ready() {
        return;
    }
    let dgw = DockerGateway::start(&["--warm-pool-target-size", "2"]);
    dgw.wait_pool_ready(2, Duration::from_secs(60)).await;
    users_cannot_reach_each_others_workspaces(&dgw).await;
    let ready: Vec<_> = dgw
        .logs()
        .into_iter()
        .filter(|l| l["phase"] == "task_ready")
        .collect();
    assert!(
        ready.len() >= 2
            && ready
                .iter()
                .all(|l| l["source"] == "warm" && l["agentPrestarted"] == true),
        "both sessions used pre-started agents: {ready:?}"
    );
}

/// Alice writes a secret and an uploaded file; bob's agent tries every way
/// to reach them and fails; each runs under a UID of their own.
async fn users_cannot_reach_each_others_workspaces(dgw: &DockerGateway) {
    let alice = dgw.create_token("alice");
    let bob = dgw.create_token("bob");
    let secret = format!("s3cr3t-{}", std::process::id());
    let mut a = dgw.connect_as(&alice, None).await.unwrap();
    let frames = say(
        &mut a,
        "a1",
        &format!("echo {secret} > secret.txt && cat secret.txt"),
    )
    .await;
    assert!(text_of(&frames).contains(&secret), "{}", pretty(&frames));

    // A file uploaded through the files API belongs to alice's agent too.
    assert_eq!(
        http_put(dgw, "/api/files/docs/uploaded.txt", &alice, b"uploaded\n"),
        201
    );
    let frames = say(
        &mut a,
        "a-up",
        "echo appended >> docs/uploaded.txt && cat docs/uploaded.txt",
    )
    .await;
    assert!(
        text_of(&frames).contains("uploaded\nappended"),
        "alice's agent can change the uploaded file: {}",
        pretty(&frames)
    );

    let mut b = dgw.connect_as(&bob, None).await.unwrap();
    let attacks = [
        "cat /workspaces/alice/docs/uploaded.txt",
        "cat /workspaces/alice/secret.txt",
        "cat ../alice/secret.txt",
        "ls -la /workspaces",
        "ls /workspaces/alice",
        "find / -name secret.txt 2>/dev/null; true",
        "timeout 8 grep -rs --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev 's3cr3t-[0-9]' / ; true",
        "ln -s /workspaces/alice/secret.txt l && cat l",
        "touch /workspaces/alice/bob-was-here",
        "touch /workspaces/bob-was-here",
        "cat /proc/1/environ",
        "env",
        "id",
    ];
    for (i, attack) in attacks.iter().enumerate() {
        let frames = say(&mut b, &format!("b{i}"), attack).await;
        let all = pretty(&frames);
        assert!(
            !all.contains(&secret),
            "attack `{attack}` leaked the secret:\n{all}"
        );
        assert!(
            !all.contains("AISHELL_TASK_CREDENTIAL"),
            "attack `{attack}` saw the runner's credential:\n{all}"
        );
    }
    assert!(!dgw.workspace("alice").join("bob-was-here").exists());
    assert!(
        !dgw.workspace("alice")
            .parent()
            .unwrap()
            .join("bob-was-here")
            .exists()
    );
    // Each user's agent has its own UID; bob's own workspace works.
    let frames = say(
        &mut b,
        "own",
        "echo mine > mine.txt && cat mine.txt && id -u",
    )
    .await;
    let text = text_of(&frames);
    assert!(text.contains("mine"), "{}", pretty(&frames));
    let frames = say(&mut a, "a2", "id -u").await;
    assert_ne!(
        text.lines().last().unwrap_or("").trim(),
        text_of(&frames).trim(),
        "alice and bob run under different UIDs"
    );
    // And holds no capability, not even in its bounding set.
    let frames = say(
        &mut b,
        "caps",
        "grep -E '^(Cap|NoNewPrivs)' /proc/self/status",
    )
    .await;
    let status = text_of(&frames);
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            status.contains(&format!("{set}:\t0000000000000000")),
            "{set} is not empty in bob's agent:\n{status}"
        );
    }
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    // aishell's seccomp filter on top of whatever the engine installs: the
    // agent's commands carry one filter more than the container's PID 1.
    let frames = say(
        &mut b,
        "seccomp",
        "grep -h Seccomp_filters /proc/1/status /proc/self/status",
    )
    .await;
    let text = text_of(&frames);
    let counts: Vec<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Seccomp_filters:"))
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    assert_eq!(counts.len(), 2, "{text}");
    assert_eq!(
        counts[1],
        counts[0] + 1,
        "no filter of aishell's in bob's agent:\n{text}"
    );
}

/// A network this test creates (and removes).
struct TestNetwork(String);

impl Drop for TestNetwork {
    fn drop(&mut self) {
        docker(&["network", "rm", &self.0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_on_a_user_defined_network_dial_the_advertised_gateway_url() {
    if !docker_ready() {
        return;
    }
    let network = TestNetwork(format!("aishell-test-net-{}", std::process::id()));
    docker(&["network", "create", &network.0]);
    let bridge_ip = docker(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
        &network.0,
    ]);
    assert!(!bridge_ip.is_empty(), "network {} created", network.0);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The gateway must be reachable on the bridge: listen on every address
    // (the banner and the test client still use loopback).
    let runner_url = format!("ws://{bridge_ip}:{port}");
    let dgw = DockerGateway::start_on_port(
        port,
        &[
            "--bind",
            "0.0.0.0",
            "--runner-url",
            &runner_url,
            "--docker-network",
            &network.0,
            "--warm-pool-target-size",
            "1",
        ],
        &[],
    );
    dgw.wait_pool_ready(1, Duration::from_secs(60)).await;
    let mut c = dgw.connect().await;
    let frames = say(&mut c, "n1", "echo over-the-bridge").await;
    assert!(
        text_of(&frames).contains("over-the-bridge"),
        "{}",
        pretty(&frames)
    );
    let on_net = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("network={}", network.0),
        "--filter",
        &format!("label=aishell.instance={}", dgw.instance),
    ]);
    assert!(
        !on_net.is_empty(),
        "task containers are on the test network"
    );
    drop(c);
    drop(dgw);
}
