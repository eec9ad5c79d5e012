//! The runner's pre-started agent, driven frame by frame from a
//! scripted gateway on 127.0.0.1: `prepare` starts the agent before any
//! claim; a claim with the same settings binds the user's workspace into the
//! running sandbox; other settings, or a pre-started agent that died, start
//! a new agent at claim time as before. Real `aishell runner`, real bwrap.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aishell_protocol::agent::AgentInput;
use aishell_protocol::runner::{AgentSpec, RunnerSettings, SandboxSettings};
use aishell_protocol::{AgentEvent, GatewayToRunner, RunnerToGateway};
use common::BIN;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

fn settings(kind: &str) -> RunnerSettings {
    RunnerSettings {
        agent: AgentSpec {
            kind: kind.into(),
            command: None,
        },
        env: Default::default(),
        agent_settings: Default::default(),
        sandbox: Some(SandboxSettings {
            network: false,
            ..Default::default()
        }),
        model_proxy: Vec::new(),
    }
}

/// True when running as root; otherwise says on stderr why the test skips.
fn root_or_skip(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { nix::libc::geteuid() } == 0;
    if !root {
        eprintln!("not root: {why}; skipped");
    }
    root
}

/// `settings(kind)` under per-user UID isolation (the docker backend's).
fn uid_settings(kind: &str) -> RunnerSettings {
    RunnerSettings {
        sandbox: Some(SandboxSettings {
            isolation: aishell_protocol::runner::Isolation::Uid,
            ..Default::default()
        }),
        ..settings(kind)
    }
}

/// One warm `aishell runner` child dialled into a scripted gateway.
struct WarmRunner {
    child: Child,
    ws: WebSocketStream<TcpStream>,
    logs: Arc<Mutex<Vec<String>>>,
}

impl WarmRunner {
    async fn start() -> WarmRunner {
        Self::start_with_env(&[]).await
    }

    async fn start_with_env(env: &[(&str, &str)]) -> WarmRunner {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut child = Command::new(BIN)
            .arg("runner")
            .envs(env.iter().copied())
            .env("AISHELL_GATEWAY_URL", format!("ws://127.0.0.1:{port}"))
            .env("AISHELL_TASK_ID", format!("t-prestart-{port}"))
            .env("AISHELL_TASK_MODE", "warm")
            .env("AISHELL_TASK_CREDENTIAL", "scripted")
            .env("AISHELL_RUNNER_RECONNECT_DEADLINE_SECS", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("runner dials")
            .unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        match next_frame(&mut ws).await {
            RunnerToGateway::Hello { session_id, .. } => assert_eq!(session_id, None),
            other => panic!("expected hello, got {other:?}"),
        }
        WarmRunner { child, ws, logs }
    }

    async fn send(&mut self, frame: GatewayToRunner) {
        let text = serde_json::to_string(&frame).unwrap();
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// A warm runner whose shell agent is pre-started (`None`, said on
    /// stderr, when not root: only root runners pre-start agents).
    async fn with_prestarted_shell() -> Option<WarmRunner> {
        if !root_or_skip("agents are pre-started only by root runners") {
            return None;
        }
        let mut runner = WarmRunner::start().await;
        assert!(runner.prepare(settings("shell")).await, "prepared");
        runner.wait_log("agent_prestarted").await;
        Some(runner)
    }

    /// `prepare`, answered by `prepared` (its `prestarted` returned).
    async fn prepare(&mut self, settings: RunnerSettings) -> bool {
        self.send(GatewayToRunner::Prepare { settings }).await;
        loop {
            if let RunnerToGateway::Prepared { prestarted } = next_frame(&mut self.ws).await {
                return prestarted;
            }
        }
    }

    async fn wait_log(&self, event: &str) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.logged(event) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "runner never logged {event}:\n{}",
            self.logs.lock().unwrap().join("\n")
        );
    }

    fn logged(&self, event: &str) -> bool {
        let needle = format!("\"event\":\"{event}\"");
        self.logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(&needle))
    }

    /// Bind the runner to alice's session in `workspace`.
    async fn send_init_user(&mut self, workspace: &Path, settings: RunnerSettings) {
        self.send(GatewayToRunner::InitUser {
            user_id: "alice".into(),
            session_id: "s-prestart".into(),
            workspace: workspace.to_string_lossy().into_owned(),
            trace_id: None,
            settings,
        })
        .await;
    }

    async fn claim(&mut self, workspace: &Path, settings: RunnerSettings) -> (bool, String) {
        self.send_init_user(workspace, settings).await;
        loop {
            match next_frame(&mut self.ws).await {
                RunnerToGateway::Ready {
                    agent, prestarted, ..
                } => return (prestarted, agent.agent.unwrap_or_default()),
                RunnerToGateway::StartFailed { message } => panic!("start failed: {message}"),
                RunnerToGateway::AgentExit { stderr_tail, .. } => {
                    panic!("agent exited: {stderr_tail}")
                }
                _ => {}
            }
        }
    }

    /// Send one message and collect the agent's text until its `finish`.
    async fn turn(&mut self, content: &str) -> String {
        self.send(GatewayToRunner::Agent {
            seq: 0,
            frame: AgentInput::Message {
                conversation_id: "c1".into(),
                content: content.into(),
                message_id: None,
            },
        })
        .await;
        let mut text = String::new();
        loop {
            if let RunnerToGateway::Agent { frame, .. } = next_frame(&mut self.ws).await {
                text.push_str(&serde_json::to_string(&frame).unwrap());
                if matches!(frame, AgentEvent::Finish { .. } | AgentEvent::Error { .. }) {
                    return text;
                }
            }
        }
    }

    /// Pids of the runner's descendants whose command line contains `needle`.
    fn descendants_running(&self, needle: &str) -> Vec<i32> {
        common::descendants(self.child.id() as i32)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(needle))
            .map(|(pid, _)| pid)
            .collect()
    }
}

impl Drop for WarmRunner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn next_frame(ws: &mut WebSocketStream<TcpStream>) -> RunnerToGateway {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("runner frame in time")
            .expect("runner socket open")
            .unwrap();
        if let Message::Text(t) = msg {
            return RunnerToGateway::decode(&t).unwrap();
        }
    }
}

#[tokio::test]
async fn a_claim_binds_the_workspace_into_the_prestarted_sandbox() {
    let tmp = tempfile::tempdir().unwrap();
    let alice = tmp.path().join("alice");
    std::fs::create_dir(&alice).unwrap();
    std::fs::write(alice.join("note.txt"), "alice-note").unwrap();
    let Some(mut runner) = WarmRunner::with_prestarted_shell().await else {
        return;
    };
    // Before the claim the sandbox is already running.
    assert!(!runner.descendants_running("agent shell").is_empty());

    let (prestarted, agent) = runner.claim(&alice, settings("shell")).await;
    assert!(prestarted, "the claim used the pre-started agent");
    assert_eq!(agent, "shell");
    let out = runner
        .turn("pwd; cat note.txt; echo written > new.txt; echo sid=$AISHELL_SESSION_ID")
        .await;
    assert!(out.contains("alice-note"), "{out}");
    assert!(
        out.contains("sid=s-prestart"),
        "the session's variables reach the agent's commands: {out}"
    );
    assert!(out.contains("/workspace"), "{out}");
    assert_eq!(
        std::fs::read_to_string(alice.join("new.txt")).unwrap(),
        "written\n"
    );
    // The bind exists only inside the runner's own mount namespace.
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host.contains(&alice.to_string_lossy().to_string()));
}

#[tokio::test]
async fn a_claim_with_other_settings_replaces_the_prestarted_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut runner) = WarmRunner::with_prestarted_shell().await else {
        return;
    };
    let (prestarted, agent) = runner.claim(&tmp.path().join("ws"), settings("echo")).await;
    assert!(!prestarted);
    assert_eq!(
        agent, "echo",
        "the claim's agent runs, not the prepared one"
    );
    assert!(runner.logged("agent_prestart_unused"));
    assert!(
        runner.descendants_running("agent shell").is_empty(),
        "the unused agent was stopped"
    );
    let out = runner.turn("hello there").await;
    assert!(out.contains("hello there"), "{out}");
}

#[tokio::test]
async fn a_prestarted_agent_that_dies_before_its_claim_is_replaced_at_the_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut runner) = WarmRunner::with_prestarted_shell().await else {
        return;
    };
    for pid in runner.descendants_running("agent shell") {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    runner.wait_log("agent_prestart_exit").await;
    let (prestarted, agent) = runner
        .claim(&tmp.path().join("ws"), settings("shell"))
        .await;
    assert!(!prestarted);
    assert_eq!(agent, "shell");
    let out = runner.turn("echo still-here > f && cat f").await;
    assert!(out.contains("still-here"), "{out}");
}

/// The credentials line `name` (`Uid:`, `Gid:`, `Groups:`) of a process.
fn proc_ids(pid: i32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test]
async fn under_uid_isolation_the_prestarted_agent_takes_its_users_uid_on_init() {
    use std::os::unix::fs::PermissionsExt;
    if !root_or_skip("uid isolation needs a root runner") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let alice = tmp.path().join("alice");
    std::fs::create_dir(&alice).unwrap();
    std::fs::write(alice.join("note.txt"), "alice-note").unwrap();
    // Another user's private workspace, owned by a UID the runner never hands out here.
    let bob = tmp.path().join("bob");
    std::fs::create_dir(&bob).unwrap();
    std::fs::write(bob.join("secret.txt"), "bob-secret").unwrap();
    std::os::unix::fs::chown(&bob, Some(199_999), Some(199_999)).unwrap();
    std::fs::set_permissions(&bob, std::fs::Permissions::from_mode(0o700)).unwrap();

    let mut runner = WarmRunner::start().await;
    assert!(runner.prepare(uid_settings("shell")).await, "prepared");
    runner.wait_log("agent_prestarted").await;
    let waiting = runner.descendants_running("--await-init");
    assert_eq!(waiting.len(), 1, "one agent waits for its init");
    assert_eq!(
        proc_ids(waiting[0], "Uid:").split_whitespace().next(),
        Some("0"),
        "before the claim it is root, with nothing to work on"
    );

    let (prestarted, agent) = runner.claim(&alice, uid_settings("shell")).await;
    assert!(prestarted, "the claim used the pre-started agent");
    assert_eq!(agent, "shell");
    let uids = proc_ids(waiting[0], "Uid:");
    let uid: u32 = uids.split_whitespace().next().unwrap().parse().unwrap();
    assert!(uid >= 100_000, "a user uid: {uids}");
    assert_eq!(
        uids,
        format!("{uid}\t{uid}\t{uid}\t{uid}"),
        "real, effective, saved and fs uid"
    );
    assert_eq!(proc_ids(waiting[0], "Gid:"), uids, "gid likewise");
    assert_eq!(
        proc_ids(waiting[0], "Groups:"),
        "",
        "no supplementary groups"
    );

    let out = runner
        .turn("id -u; pwd; echo home=$HOME; cat note.txt; echo mine > new.txt; cat ../bob/secret.txt; echo sid=$AISHELL_SESSION_ID")
        .await;
    assert!(
        out.contains(&format!("{uid}\\n")),
        "commands run as the user: {out}"
    );
    assert!(out.contains(&alice.to_string_lossy().to_string()), "{out}");
    assert!(out.contains(&format!("home={}", alice.display())), "{out}");
    assert!(out.contains("alice-note"), "{out}");
    assert!(out.contains("sid=s-prestart"), "{out}");
    assert!(
        !out.contains("bob-secret"),
        "another user's files stay closed: {out}"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(alice.join("new.txt")).unwrap().uid(), uid);
}

/// The runner does not take a pre-started agent's word that it became its
/// user: one that answers `init` still as root is stopped before the
/// runner reports it ready, and the reason reaches the gateway.
#[tokio::test]
async fn an_agent_that_stays_root_after_init_is_stopped_before_it_is_ready() {
    if !root_or_skip("uid isolation needs a root runner") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Stands in for `aishell agent shell --await-init`, ignoring `run_as`.
    let stays_root = common::agent_script(
        tmp.path(),
        "stays-root.sh",
        "#!/bin/sh\nread line\necho '{\"type\":\"init\",\"agent\":\"stays-root\"}'\nwhile read line; do :; done\n",
    );
    let alice = tmp.path().join("alice");
    let mut runner = WarmRunner::start_with_env(&[(
        "AISHELL_RUNNER_AGENT_PROGRAM",
        stays_root.to_str().unwrap(),
    )])
    .await;
    assert!(runner.prepare(uid_settings("shell")).await, "prepared");
    runner.send_init_user(&alice, uid_settings("shell")).await;
    let mut refusal = None;
    loop {
        match next_frame(&mut runner.ws).await {
            RunnerToGateway::Ready { .. } => panic!("an agent that kept root was reported ready"),
            RunnerToGateway::AgentStderr { line } if line.contains("does not run as uid") => {
                refusal = Some(line)
            }
            RunnerToGateway::AgentExit { .. } => break,
            _ => {}
        }
    }
    let refusal = refusal.expect("the runner said why it stopped the agent");
    assert!(refusal.contains("uids 0\t0\t0\t0"), "{refusal}");
    assert!(runner.logged("agent_identity_refused"));
}

/// A runner hands each numbered input to its agent once: one sent again
/// after a re-dial (the gateway resends what it has no acknowledgement
/// for) is dropped, and heartbeats report the highest number handled.
#[tokio::test]
async fn an_input_sent_twice_reaches_the_agent_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut runner = WarmRunner::start().await;
    runner.claim(&tmp.path().join("ws"), settings("echo")).await;
    for (seq, content) in [(1, "once"), (1, "once"), (2, "two")] {
        runner
            .send(GatewayToRunner::Agent {
                seq,
                frame: AgentInput::Message {
                    conversation_id: "c1".into(),
                    content: content.into(),
                    message_id: None,
                },
            })
            .await;
    }
    let (mut text, mut finished) = (String::new(), 0);
    while finished < 2 {
        if let RunnerToGateway::Agent { frame, .. } = next_frame(&mut runner.ws).await {
            match frame {
                // The whole reply (echo also streams it as deltas).
                AgentEvent::Content { content, .. } => text.push_str(&content),
                AgentEvent::Finish { .. } => {
                    finished += 1;
                    text.push('|');
                }
                _ => {}
            }
        }
    }
    assert_eq!(text, "once|two|");
    runner.send(GatewayToRunner::Ping).await;
    loop {
        if let RunnerToGateway::Heartbeat { inputs_received } = next_frame(&mut runner.ws).await {
            assert_eq!(inputs_received, 2);
            break;
        }
    }
}
