//! An in-process test runtime: a real gateway (its HTTP server, sessions,
//! store) on a loopback port, a temp-file SQLite store, and a backend whose
//! "tasks" are fake runners in this process. Gateway logic is tested this
//! way without spawning binaries, agents or sandboxes; the end-to-end tests
//! in crates/cli/tests prove the real processes and sockets.
//!
//! The fake runner speaks the runner protocol (docs/protocol/runner.md):
//! `hello`, `ready` after `init_user`, `restored` after
//! `restore_conversations`, and for each message an echo of its content as
//! one `text_delta` (or `/stream N`: N deltas `chunk-i `), then `finish`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aishell_backend::{Backend, BackendError, LaunchSpec, StatusChange, TaskInfo, TaskStatus};
use aishell_gateway::{Gateway, GatewayConfig};
use aishell_protocol::agent::AgentInfo;
use aishell_protocol::{AgentEvent, AgentInput, GatewayToRunner, RunnerToGateway};
use aishell_store::{SqliteStore, Store};
use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub const WAIT: Duration = Duration::from_secs(10);

/// A task of the fake backend: its runner, running in this process.
struct FakeTask {
    runner: JoinHandle<()>,
    session_id: Option<String>,
}

/// A backend whose launches start fake runners in this process.
pub struct FakeBackend {
    tasks: Mutex<HashMap<String, FakeTask>>,
    launches: Mutex<u32>,
    /// Launches fail with this error.
    refuse: Mutex<Option<BackendError>>,
    /// The watch's sender, once the gateway watches (see [`FakeBackend::report`]).
    watch: Mutex<Option<tokio::sync::mpsc::Sender<StatusChange>>>,
    /// Runners of new tasks do not dial back.
    silent_runners: std::sync::atomic::AtomicBool,
    /// How the gateway reaches workspaces (its capabilities).
    workspaces: aishell_backend::WorkspaceAccess,
    /// The content of every message the fake agents received, in order.
    received: Arc<Mutex<Vec<String>>>,
    /// Stops return only while this is true.
    stops_open: tokio::sync::watch::Sender<bool>,
}

impl Default for FakeBackend {
    fn default() -> Self {
        FakeBackend {
            tasks: Default::default(),
            launches: Default::default(),
            refuse: Default::default(),
            watch: Default::default(),
            silent_runners: Default::default(),
            workspaces: aishell_backend::WorkspaceAccess::Local,
            received: Default::default(),
            stops_open: tokio::sync::watch::Sender::new(true),
        }
    }
}

impl FakeBackend {
    /// A fake backend whose workspaces the gateway reaches this way.
    pub fn reaching_workspaces(access: aishell_backend::WorkspaceAccess) -> Self {
        let mut backend = FakeBackend::default();
        backend.workspaces = access;
        backend
    }

    pub fn launches(&self) -> u32 {
        *self.launches.lock().unwrap()
    }

    /// What the fake agents were asked, in order.
    pub fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }

    /// Hold every stop until [`release_stops`](Self::release_stops).
    pub fn hold_stops(&self) {
        self.stops_open.send_replace(false);
    }

    pub fn release_stops(&self) {
        self.stops_open.send_replace(true);
    }

    /// Refuse every launch from now on (`None`: accept again).
    pub fn refuse_launches(&self, reason: Option<&str>) {
        *self.refuse.lock().unwrap() = reason.map(|reason| BackendError::Refused {
            backend: "fake",
            op: "launch",
            reason: reason.to_string(),
        });
    }

    /// Every launch from now on finds the runtime unreachable.
    pub fn unreachable(&self, reason: &str) {
        *self.refuse.lock().unwrap() = Some(BackendError::Unavailable {
            backend: "fake",
            op: "launch",
            reason: reason.to_string(),
        });
    }

    /// Runners of tasks launched from now on never dial back (their task
    /// "runs" until the test reports it otherwise).
    pub fn silence_runners(&self) {
        self.silent_runners
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Report a status change on the gateway's watch, as a runtime would.
    pub async fn report(&self, task_id: &str, status: TaskStatus) {
        let tx = self
            .watch
            .lock()
            .unwrap()
            .clone()
            .expect("the gateway watches");
        tx.send(StatusChange {
            task_id: task_id.to_string(),
            status,
        })
        .await
        .unwrap();
    }

    /// A task a previous gateway left running for `session_id`: listed,
    /// its runner never dials.
    pub fn left_running(&self, task_id: &str, session_id: &str) {
        self.tasks.lock().unwrap().insert(
            task_id.to_string(),
            FakeTask {
                runner: tokio::spawn(std::future::pending()),
                session_id: Some(session_id.to_string()),
            },
        );
    }

    /// Ids of the tasks launched and not stopped.
    pub fn task_ids(&self) -> Vec<String> {
        self.tasks.lock().unwrap().keys().cloned().collect()
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn capabilities(&self) -> aishell_backend::Capabilities {
        aishell_backend::Capabilities {
            typical_cold_start: std::time::Duration::from_millis(10),
            workspaces: self.workspaces,
            isolation: aishell_backend::Isolation::Process,
        }
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<(), BackendError> {
        *self.launches.lock().unwrap() += 1;
        if let Some(error) = self.refuse.lock().unwrap().clone() {
            return Err(error);
        }
        let session_id = spec.session_id.clone();
        let runner = if self
            .silent_runners
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            tokio::spawn(std::future::pending())
        } else {
            tokio::spawn(fake_runner(spec.clone(), self.received.clone()))
        };
        self.tasks
            .lock()
            .unwrap()
            .insert(spec.task_id, FakeTask { runner, session_id });
        Ok(())
    }

    async fn status(&self, task_id: &str) -> Result<TaskStatus, BackendError> {
        Ok(match self.tasks.lock().unwrap().get(task_id) {
            Some(t) if !t.runner.is_finished() => TaskStatus::Running,
            Some(_) => TaskStatus::Exited {
                code: Some(0),
                reason: "runner ended".into(),
            },
            None => TaskStatus::NotFound,
        })
    }

    async fn stop(&self, task_id: &str) -> Result<(), BackendError> {
        let _ = self.stops_open.subscribe().wait_for(|open| *open).await;
        if let Some(task) = self.tasks.lock().unwrap().remove(task_id) {
            task.runner.abort();
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<TaskInfo>, BackendError> {
        let tasks = self.tasks.lock().unwrap();
        Ok(tasks
            .iter()
            .map(|(id, t)| TaskInfo {
                task_id: id.clone(),
                mode: aishell_backend::TaskMode::Cold,
                session_id: t.session_id.clone(),
                status: TaskStatus::Running,
                started_at: SystemTime::now(),
            })
            .collect())
    }

    fn workspace_path(&self, user_id: &str) -> String {
        format!("/fake/workspaces/{user_id}")
    }

    /// Changes are what the test reports (no polling).
    fn watch(self: Arc<Self>) -> tokio::sync::mpsc::Receiver<StatusChange> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        *self.watch.lock().unwrap() = Some(tx);
        rx
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().values() {
            task.runner.abort();
        }
    }
}

/// A cold runner: dials its session, starts its "agent" on `init_user`, and
/// echoes messages.
async fn fake_runner(spec: LaunchSpec, received: Arc<Mutex<Vec<String>>>) {
    let session = spec.session_id.expect("a cold task has a session");
    let url = format!("{}/internal/task/{session}", spec.gateway_url);
    let mut req = url.into_client_request().expect("runner url");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", spec.credential).parse().unwrap(),
    );
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(req).await else {
        return;
    };
    let mut out_seq = 0;
    let text =
        |frame: RunnerToGateway| Message::Text(serde_json::to_string(&frame).unwrap().into());
    let hello = RunnerToGateway::Hello {
        protocol: aishell_protocol::RUNNER_PROTOCOL_VERSION,
        task_id: spec.task_id.clone(),
        runner_version: "fake".into(),
        session_id: None,
        agent_running: false,
        inputs_received: 0,
    };
    if ws.send(text(hello)).await.is_err() {
        return;
    }
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(incoming) = msg else {
            continue;
        };
        let Ok(frame) = serde_json::from_str::<GatewayToRunner>(&incoming) else {
            continue;
        };
        let replies = match frame {
            GatewayToRunner::InitUser { .. } => vec![RunnerToGateway::Ready {
                agent: AgentInfo {
                    agent: Some("fake".into()),
                    ..AgentInfo::default()
                },
                agent_start_ms: Some(1),
                prestarted: false,
            }],
            GatewayToRunner::RestoreConversations { conversations } => {
                vec![RunnerToGateway::Restored {
                    count: conversations.len() as u32,
                }]
            }
            GatewayToRunner::Agent {
                frame:
                    AgentInput::Message {
                        conversation_id,
                        content,
                        ..
                    },
                ..
            } => {
                received.lock().unwrap().push(content.clone());
                answer(&conversation_id, &content)
                    .into_iter()
                    .map(|frame| {
                        out_seq += 1;
                        RunnerToGateway::Agent {
                            seq: out_seq,
                            frame,
                        }
                    })
                    .collect()
            }
            GatewayToRunner::Shutdown { .. } => break,
            _ => Vec::new(),
        };
        for reply in replies {
            if ws.send(text(reply)).await.is_err() {
                return;
            }
        }
    }
    let _ = ws.close(None).await;
}

/// The fake agent's answer to one message.
fn answer(conversation_id: &str, content: &str) -> Vec<AgentEvent> {
    let deltas: Vec<String> = match content.strip_prefix("/stream ") {
        Some(n) => (0..n.trim().parse::<u32>().unwrap_or(1))
            .map(|i| format!("chunk-{i} "))
            .collect(),
        None => vec![content.to_string()],
    };
    let mut events: Vec<AgentEvent> = deltas
        .into_iter()
        .map(|delta| AgentEvent::TextDelta {
            conversation_id: conversation_id.to_string(),
            delta,
        })
        .collect();
    events.push(AgentEvent::Finish {
        conversation_id: conversation_id.to_string(),
        token_usage: Default::default(),
    });
    events
}

/// A gateway serving on a loopback port with the fake backend and a
/// temp-file store; shut down (and its tasks stopped) when dropped.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub store: Arc<dyn Store>,
    pub backend: Arc<FakeBackend>,
    pub token: String,
    shutdown: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut GatewayConfig)) -> TestGateway {
        Self::start_on(FakeBackend::default(), configure).await
    }

    /// A gateway on this fake backend.
    pub async fn start_on(
        backend: FakeBackend,
        configure: impl FnOnce(&mut GatewayConfig),
    ) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = GatewayConfig::new(dir.path().join("data"));
        cfg.bind = "127.0.0.1:0".parse().unwrap();
        configure(&mut cfg);
        let url = format!("sqlite://{}", dir.path().join("data/aishell.db").display());
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&url).await.unwrap());
        store.ensure_user("alice").await.unwrap();
        let (_, token) = store
            .create_token("alice", "test", false, None)
            .await
            .unwrap();
        let backend = Arc::new(backend);
        let gateway = Gateway::bind(cfg, store.clone(), backend.clone())
            .await
            .unwrap();
        let addr = gateway.local_addr();
        let (shutdown, stop) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            let _ = gateway
                .serve(async {
                    let _ = stop.await;
                })
                .await;
        });
        TestGateway {
            addr,
            store,
            backend,
            token,
            shutdown: Some(shutdown),
            served: Some(served),
            _dir: dir,
        }
    }

    pub async fn connect(&self) -> Client {
        self.connect_to(None).await
    }

    /// Connect to a session (`resume`: its id and the last seq seen).
    pub async fn connect_to(&self, resume: Option<(&str, u64)>) -> Client {
        let mut url = format!("ws://{}/ws", self.addr);
        if let Some((sid, seq)) = resume {
            url = format!("{url}?session_id={sid}&last_seq={seq}");
        }
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.token).parse().unwrap(),
        );
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let mut client = Client {
            ws,
            session_id: String::new(),
            hello: Value::Null,
            last_seq: 0,
        };
        let hello = client.next(WAIT).await.expect("a session frame");
        client.session_id = hello["session_id"].as_str().unwrap().to_string();
        client.hello = hello;
        client
    }

    /// Stop serving and wait until the gateway stopped its tasks.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(served) = self.served.take() {
            let _ = tokio::time::timeout(WAIT, served).await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(served) = self.served.take() {
            served.abort();
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Client {
    ws: Ws,
    pub session_id: String,
    /// The `session` frame.
    pub hello: Value,
    /// Highest stream seq received.
    pub last_seq: u64,
}

impl Client {
    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn message(&mut self, id: &str, content: &str) {
        self.send(json!({"type": "message", "id": id, "content": content}))
            .await;
    }

    /// The next frame; None when the socket closed or `timeout` passed.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    let ephemeral = v["ephemeral"].as_bool().unwrap_or(false);
                    if let Some(s) = v["seq"].as_u64().filter(|_| !ephemeral) {
                        self.last_seq = s;
                    }
                    return Some(v);
                }
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    /// Frames up to and including the first that matches `pred`.
    pub async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut got = Vec::new();
        loop {
            match self.next(WAIT).await {
                Some(v) => {
                    let done = pred(&v);
                    got.push(v);
                    if done {
                        return got;
                    }
                }
                None => panic!("condition not met; frames so far: {got:#?}"),
            }
        }
    }

    /// Frames until the turn ends (`finish`, or an error naming a conversation).
    pub async fn turn(&mut self) -> Vec<Value> {
        self.until(|v| {
            is_type(v, "finish") || (is_type(v, "error") && !v["conversation_id"].is_null())
        })
        .await
    }
}

pub fn is_type(v: &Value, t: &str) -> bool {
    v["type"] == t
}

pub fn text_of(frames: &[Value]) -> String {
    frames
        .iter()
        .filter(|f| is_type(f, "text_delta"))
        .filter_map(|f| f["delta"].as_str())
        .collect()
}
