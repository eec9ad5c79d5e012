//! The ECS backend end to end against ministack, a local AWS emulator that
//! runs ECS tasks as real Docker containers: sessions cold and warm across
//! an idle stop, a container killed mid-turn, adoption after a gateway
//! SIGKILL, a missing IAM permission, a task definition with a bad image.
//!
//! Needs `ministack` (pip, the version `.ci/run` pins), `python3` with
//! botocore (ministack's own dependency, used to set up clusters, task
//! definitions and IAM users) and a Docker engine. This file starts one
//! ministack per test process on 127.0.0.1 with IAM enforced (`AUTH=true`;
//! the `test` keys are the account's root) and stops it at exit. Each test
//! has a cluster of its own; its task definition uses host networking (the
//! runner dials the gateway on 127.0.0.1) and bind-mounts the test's
//! workspaces directory where EFS would be. Every test removes its ECS tasks
//! and their containers when it ends, pass or fail. Without the tools the
//! tests FAIL with a clear message; `AISHELL_SKIP_ECS_TESTS=1` skips them.
#![cfg(feature = "ecs")]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const IMAGE_PREFIX: &str = "aishell:ecs-test-";

fn test_image() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| format!("{IMAGE_PREFIX}{}", std::process::id()))
}

/// The emulator of this test process.
struct Ministack {
    url: String,
    child: Mutex<Option<Child>>,
}

static STACK: OnceLock<Result<Ministack, String>> = OnceLock::new();

fn ministack() -> Option<&'static Ministack> {
    if std::env::var("AISHELL_SKIP_ECS_TESTS").as_deref() == Ok("1") {
        eprintln!("AISHELL_SKIP_ECS_TESTS=1: skipping an ecs backend test");
        return None;
    }
    let stack = STACK.get_or_init(|| {
        build_image()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let log = std::fs::File::create(std::env::temp_dir().join(format!("ministack-{port}.log")))
            .map_err(|e| e.to_string())?;
        let child = Command::new("ministack")
            .env("GATEWAY_PORT", port.to_string())
            .env("BIND_HOST", "127.0.0.1")
            .env("AUTH", "true")
            .env("SERVICES", "ecs,iam,sts")
            .env("MINISTACK_REGION", "us-east-1")
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run `ministack` (pip install ministack): {e}"))?;
        let stack = Ministack {
            url: format!("http://127.0.0.1:{port}"),
            child: Mutex::new(Some(child)),
        };
        // SAFETY: registers a plain function with no captured state.
        unsafe { libc::atexit(stop_ministack_and_image) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("ministack did not listen within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(stack)
    });
    match stack {
        Ok(s) => Some(s),
        Err(e) => panic!(
            "the ecs backend tests need ministack (pip install ministack==1.5.33), python3 and a Docker engine:\n{e}\nor set AISHELL_SKIP_ECS_TESTS=1"
        ),
    }
}

/// At exit (the harness ends with `exit`; a static is never dropped): stop
/// this process's ministack and remove its image.
extern "C" fn stop_ministack_and_image() {
    if let Some(Ok(stack)) = STACK.get()
        && let Some(mut child) = stack.child.lock().unwrap().take()
    {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = Command::new("docker")
        .args(["rmi", "--force", test_image()])
        .output();
}

fn build_image() -> Result<(), String> {
    let out = Command::new(BIN)
        .args(["image", "build", "--tag", test_image()])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// One AWS API call through botocore, as `keys` (root's by default).
fn aws(
    service: &str,
    op: &str,
    params: Value,
    keys: Option<(&str, &str)>,
) -> Result<Value, String> {
    let stack = ministack().expect("ministack");
    let (key, secret) = keys.unwrap_or(("test", "test"));
    const SCRIPT: &str = r#"
import json, sys, datetime, botocore.session
url, key, secret, service, op, params = sys.argv[1:7]
c = botocore.session.get_session().create_client(service, endpoint_url=url, region_name="us-east-1",
    aws_access_key_id=key, aws_secret_access_key=secret)
try:
    out = getattr(c, op)(**json.loads(params))
except c.exceptions.ClientError as e:
    print(json.dumps({"error": e.response["Error"]})); sys.exit(0)
out.pop("ResponseMetadata", None)
print(json.dumps(out, default=str))
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT, &stack.url, key, secret, service, op])
        .arg(params.to_string())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    match v.get("error") {
        Some(e) => Err(e.to_string()),
        None => Ok(v),
    }
}

fn aws_ok(service: &str, op: &str, params: Value) -> Value {
    aws(service, op, params, None).unwrap_or_else(|e| panic!("{service} {op}: {e}"))
}

/// A cluster and task definition of one test; its gateway; cleanup.
struct EcsGateway {
    gw: Gateway,
    cluster: String,
    instance: String,
    workspaces: tempfile::TempDir,
}

struct EcsSetup {
    cluster: String,
    family: String,
    workspaces: tempfile::TempDir,
}

fn setup(name: &str, image: &str) -> EcsSetup {
    ministack().expect("ministack");
    let cluster = format!("{name}-{}", std::process::id());
    aws_ok("ecs", "create_cluster", json!({"clusterName": cluster}));
    let workspaces = tempfile::tempdir().unwrap();
    let family = format!("aishell-{name}");
    aws_ok(
        "ecs",
        "register_task_definition",
        json!({
            "family": family,
            "networkMode": "host",
            "requiresCompatibilities": ["EC2"],
            "volumes": [{"name": "workspaces", "host": {"sourcePath": workspaces.path()}}],
            "containerDefinitions": [{
                "name": "runner",
                "image": image,
                "essential": true,
                "memory": 512,
                "mountPoints": [{"sourceVolume": "workspaces", "containerPath": "/workspaces"}],
            }],
        }),
    );
    EcsSetup {
        cluster,
        family,
        workspaces,
    }
}

impl EcsGateway {
    fn start(name: &str, args: &[&str]) -> Self {
        Self::start_with(setup(name, test_image()), args, None)
    }

    fn start_with(setup: EcsSetup, args: &[&str], keys: Option<(&str, &str)>) -> Self {
        let stack = ministack().expect("ministack");
        let (key, secret) = keys.unwrap_or(("test", "test"));
        let ws = setup.workspaces.path().to_str().unwrap().to_string();
        let mut all = vec![
            "--execution-mode",
            "ecs",
            "--ecs-cluster",
            &setup.cluster,
            "--ecs-task-definition",
            &setup.family,
            "--ecs-launch-type",
            "EC2",
            "--workspaces-root",
            &ws,
        ];
        all.extend_from_slice(args);
        let gw = Gateway::start_with_env(
            &all,
            &[
                ("AWS_ENDPOINT_URL", &stack.url),
                ("AWS_REGION", "us-east-1"),
                ("AWS_ACCESS_KEY_ID", key),
                ("AWS_SECRET_ACCESS_KEY", secret),
            ],
        );
        let instance = std::fs::read_to_string(gw.data_dir.join("ecs-backend/instance-id"))
            .expect("the ecs backend writes its instance id")
            .trim()
            .to_string();
        EcsGateway {
            gw,
            cluster: setup.cluster,
            instance,
            workspaces: setup.workspaces,
        }
    }

    /// The cluster's tasks (desired RUNNING), described with tags.
    fn tasks(&self) -> Vec<Value> {
        let arns = aws_ok(
            "ecs",
            "list_tasks",
            json!({"cluster": self.cluster, "desiredStatus": "RUNNING"}),
        );
        let arns = arns["taskArns"].as_array().cloned().unwrap_or_default();
        if arns.is_empty() {
            return Vec::new();
        }
        aws_ok(
            "ecs",
            "describe_tasks",
            json!({"cluster": self.cluster, "tasks": arns, "include": ["TAGS"]}),
        )["tasks"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn running_with_tag(&self, key: &str, value: &str) -> Vec<String> {
        self.tasks()
            .into_iter()
            .filter(|t| t["lastStatus"] == "RUNNING" && tag(t, key) == Some(value.to_string()))
            .filter_map(|t| t["taskArn"].as_str().map(str::to_string))
            .collect()
    }

    async fn wait_tasks(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let t = self.tasks();
            if pred(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "ECS tasks never {what}: {t:?}; logs:\n{}",
                self.gw.raw_logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Docker container of an ECS task.
    fn container_of(&self, task_arn: &str) -> String {
        let out = Command::new("docker")
            .args([
                "ps",
                "-q",
                "--filter",
                &format!("label=com.amazonaws.ecs.task-arn={task_arn}"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn tag(task: &Value, key: &str) -> Option<String> {
    task["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .and_then(|t| t["value"].as_str().map(str::to_string))
}

impl std::ops::Deref for EcsGateway {
    type Target = Gateway;
    fn deref(&self) -> &Gateway {
        &self.gw
    }
}

impl std::ops::DerefMut for EcsGateway {
    fn deref_mut(&mut self) -> &mut Gateway {
        &mut self.gw
    }
}

impl Drop for EcsGateway {
    fn drop(&mut self) {
        self.gw.stop();
        for t in self.tasks() {
            if let Some(arn) = t["taskArn"].as_str() {
                let _ = aws(
                    "ecs",
                    "stop_task",
                    json!({"cluster": self.cluster, "task": arn}),
                    None,
                );
            }
        }
        // Whatever the emulator left of this cluster's containers.
        let arn = format!(
            "arn:aws:ecs:us-east-1:000000000000:cluster/{}",
            self.cluster
        );
        remove_containers(&format!("label=com.amazonaws.ecs.cluster={arn}"));
    }
}

fn remove_containers(filter: &str) {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", filter])
        .output()
        .unwrap();
    let ids = String::from_utf8_lossy(&out.stdout).to_string();
    let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids);
        let _ = Command::new("docker")
            .args(args)
            .stdout(Stdio::null())
            .output();
    }
}

async fn say(c: &mut Client, id: &str, command: &str) -> Vec<Value> {
    c.send(json!({"type": "message", "id": id, "conversation_id": "main", "content": command}))
        .await;
    c.turn().await
}

/// Write, idle stop (the ECS task stops), come back in a new task, read.
async fn workspace_survives_an_idle_stop(egw: &EcsGateway, source: &str) {
    let mut c = egw.connect().await;
    let marker = format!("persisted-{}-{source}", std::process::id());
    let frames = say(
        &mut c,
        "w1",
        &format!("echo {marker} > note.txt && cat note.txt"),
    )
    .await;
    assert!(text_of(&frames).contains(&marker), "{}", pretty(&frames));
    assert!(
        of_type(&frames, "status")
            .iter()
            .any(|f| f["source"] == source),
        "started {source}: {}",
        pretty(&frames)
    );
    // The session's task, as the gateway names it (a warm task carries no
    // session tag, and the pool has launched its replacement by now).
    let ready = egw
        .wait_log(
            "the task's ready line",
            |l| l["phase"] == "task_ready",
            Duration::from_secs(5),
        )
        .await;
    let task_id = ready["taskId"].as_str().expect("taskId").to_string();
    let task = egw
        .tasks()
        .into_iter()
        .find(|t| tag(t, "aishell.task").as_deref() == Some(task_id.as_str()))
        .unwrap_or_else(|| panic!("an ECS task tagged {task_id}: {:?}", egw.tasks()));
    let first = [task["taskArn"].as_str().unwrap().to_string()];
    assert_eq!(task["startedBy"], egw.instance.as_str());
    assert_eq!(
        tag(&task, "aishell.instance").as_deref(),
        Some(egw.instance.as_str())
    );
    assert_eq!(tag(&task, "aishell.mode").as_deref(), Some(source));
    let env: Vec<String> = task["overrides"]["containerOverrides"][0]["environment"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|kv| kv["name"].as_str().map(str::to_string))
        .collect();
    assert!(
        env.contains(&"AISHELL_TASK_CREDENTIAL".to_string())
            && env.iter().all(|n| n.starts_with("AISHELL_")),
        "per-task settings only: {env:?}"
    );
    assert_eq!(
        read(&egw.workspaces.path().join("local/note.txt")).trim(),
        marker,
        "the file is on the shared volume"
    );

    egw.wait_log(
        "idle stop",
        |l| l["phase"] == "idle_timeout",
        Duration::from_secs(30),
    )
    .await;
    let gone = first[0].clone();
    egw.wait_tasks("stopped after the idle stop", |t| {
        t.iter().all(|t| t["taskArn"] != gone.as_str())
    })
    .await;

    let frames = say(&mut c, "w2", "cat note.txt").await;
    assert!(
        text_of(&frames).contains(&marker),
        "the next task sees the file: {}",
        pretty(&frames)
    );
    assert!(
        egw.tasks().iter().all(|t| t["taskArn"] != gone.as_str()),
        "a new task ran the second turn"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_session_runs_as_an_ecs_task_and_survives_an_idle_stop() {
    if ministack().is_none() {
        return;
    }
    let egw = EcsGateway::start(
        "cold",
        &["--enable-warm-pool", "false", "--session-idle-timeout", "2"],
    );
    workspace_survives_an_idle_stop(&egw, "cold").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_session_runs_in_a_pool_task_and_survives_an_idle_stop() {
    if ministack().is_none() {
        return;
    }
    let egw = EcsGateway::start(
        "warm",
        &[
            "--warm-pool-target-size",
            "1",
            "--session-idle-timeout",
            "2",
        ],
    );
    egw.wait_pool_ready(1, Duration::from_secs(60)).await;
    workspace_survives_an_idle_stop(&egw, "warm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_kill_of_a_busy_task_is_agent_crashed_with_ecs_reason_and_the_next_message_works() {
    if ministack().is_none() {
        return;
    }
    let egw = EcsGateway::start("kill", &["--enable-warm-pool", "false"]);
    let mut c = egw.connect().await;
    c.send(
        json!({"type": "message", "id": "m1", "conversation_id": "main", "content": "sleep 60"}),
    )
    .await;
    c.until(|v| is_type(v, "tool_call"), Duration::from_secs(40))
        .await;
    let busy = egw.running_with_tag("aishell.session", &c.session_id);
    assert_eq!(busy.len(), 1, "{busy:?}");
    let container = egw.container_of(&busy[0]);
    assert!(!container.is_empty(), "the task's container runs");
    let started = Instant::now();
    let _ = Command::new("docker").args(["kill", &container]).output();
    let frames = c
        .until(
            |v| is_type(v, "error") && v["error"]["code"] == "AGENT_CRASHED",
            Duration::from_secs(30),
        )
        .await;
    let crash = frames.last().unwrap();
    let message = crash["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("EssentialContainerExited") && message.contains("137"),
        "ECS's reason reaches the client: {crash}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let frames = say(&mut c, "m2", "echo back-again").await;
    assert!(
        text_of(&frames).contains("back-again"),
        "{}",
        pretty(&frames)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_gateway_sigkill_running_tasks_are_adopted_and_strays_stopped() {
    if ministack().is_none() {
        return;
    }
    let setup = setup("adopt", test_image());
    let family = setup.family.clone();
    let mut egw = EcsGateway::start_with(setup, &["--enable-warm-pool", "false"], None);
    let mut c = egw.connect().await;
    let frames = say(&mut c, "a1", "echo before-crash").await;
    assert!(text_of(&frames).contains("before-crash"));
    let session = c.session_id.clone();
    let adopted = egw.running_with_tag("aishell.session", &session);
    assert_eq!(adopted.len(), 1);

    // A task of this instance whose runner never dials back.
    let stray = aws_ok(
        "ecs",
        "run_task",
        json!({
            "cluster": egw.cluster, "taskDefinition": family, "startedBy": egw.instance,
            "tags": [{"key": "aishell.task", "value": "t-stray"}, {"key": "aishell.mode", "value": "warm"}],
            "overrides": {"containerOverrides": [{"name": "runner", "command": ["/bin/sleep", "300"]}]},
        }),
    )["tasks"][0]["taskArn"]
        .as_str()
        .unwrap()
        .to_string();

    let last_seen = c.last_seq;
    drop(c);
    egw.kill9();
    egw.restart(&["--orphan-grace", "3"]);
    egw.wait_log(
        "adoption",
        |l| l["event"] == "task_adopted",
        Duration::from_secs(30),
    )
    .await;
    let mut c = egw
        .connect_as(&egw.token.clone(), Some((&session, last_seen)))
        .await
        .expect("reconnect");
    let frames = say(&mut c, "a2", "echo after-crash").await;
    assert!(
        text_of(&frames).contains("after-crash"),
        "{}",
        pretty(&frames)
    );
    assert_eq!(
        egw.running_with_tag("aishell.session", &session),
        adopted,
        "the same ECS task serves the session"
    );
    egw.wait_tasks("rid of the stray", |t| {
        t.iter().all(|t| t["taskArn"] != stray.as_str())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_describe_permission_is_one_startup_line_and_a_clear_task_start_failed() {
    if ministack().is_none() {
        return;
    }
    let user = format!("gw-denied-{}", std::process::id());
    aws_ok("iam", "create_user", json!({"UserName": user}));
    let policy = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
        "Action": ["ecs:RunTask", "ecs:StopTask", "ecs:ListTasks", "ecs:TagResource"],
        "Resource": "*"}]});
    aws_ok(
        "iam",
        "put_user_policy",
        json!({"UserName": user, "PolicyName": "gateway", "PolicyDocument": policy.to_string()}),
    );
    let key = aws_ok("iam", "create_access_key", json!({"UserName": user}));
    let (id, secret) = (
        key["AccessKey"]["AccessKeyId"]
            .as_str()
            .unwrap()
            .to_string(),
        key["AccessKey"]["SecretAccessKey"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    let egw = EcsGateway::start_with(
        setup("denied", test_image()),
        &["--enable-warm-pool", "false"],
        Some((&id, &secret)),
    );
    let line = egw
        .wait_log(
            "the start-up permission check",
            |l| l["event"] == "ecs_backend_unavailable",
            Duration::from_secs(20),
        )
        .await;
    let error = line["error"].as_str().unwrap_or("");
    assert!(
        error.contains("missing permission ecs:DescribeTasks") && !error.contains('\n'),
        "one line naming the action: {line}"
    );
    let (status, body) = egw.http_get("/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.to_string().contains("ecs:DescribeTasks"), "{body}");

    let mut c = egw.connect().await;
    c.send(json!({"type": "message", "id": "x", "content": "echo hi"}))
        .await;
    let frames = c
        .until(|v| is_type(v, "error"), Duration::from_secs(20))
        .await;
    let err = &frames.last().unwrap()["error"];
    assert_eq!(err["code"], "TASK_START_FAILED", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap_or("")
            .contains("ecs:DescribeTasks"),
        "{err}"
    );
    let _ = aws(
        "iam",
        "delete_user_policy",
        json!({"UserName": user, "PolicyName": "gateway"}),
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_definition_with_a_bad_image_gives_the_pull_error_to_the_client() {
    if ministack().is_none() {
        return;
    }
    let missing = format!("127.0.0.1:9/aishell-missing:{}", std::process::id());
    let egw = EcsGateway::start_with(
        setup("badimage", &missing),
        &["--enable-warm-pool", "false"],
        None,
    );
    let mut c = egw.connect().await;
    let started = Instant::now();
    c.send(json!({"type": "message", "id": "x", "content": "echo hi"}))
        .await;
    let frames = c
        .until(|v| is_type(v, "error"), Duration::from_secs(30))
        .await;
    let err = &frames.last().unwrap()["error"];
    assert_eq!(err["code"], "TASK_START_FAILED", "{err}");
    // ECS says CannotPullContainerError; the emulator, whose pull happens
    // inside `docker run`, says ResourceInitializationError. Both stop the
    // task with TaskFailedToStart and name the image.
    let message = err["message"].as_str().unwrap_or("");
    assert!(
        message.contains("TaskFailedToStart")
            && (message.contains("CannotPullContainerError")
                || message.contains("unable to pull image"))
            && message.contains("aishell-missing"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "at once, not at the launch deadline"
    );
}
