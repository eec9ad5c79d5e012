//! `aishell runner`: the supervisor inside every sandbox (docs/protocol/runner.md).
//!
//! It always dials out to the gateway (a sandbox never exposes a port),
//! waits for `init_user`, prepares the user's workspace, spawns the agent as a
//! child speaking JSON lines, and relays frames both ways. It answers `ready`
//! only after the agent's own `init`. When its socket drops it re-dials with
//! backoff while the agent keeps running; agent output is kept in an outbox
//! until the gateway acknowledges it, so a gateway restart loses nothing.

mod agent_proc;
pub mod cgroup;
mod config;
pub mod egress;
pub mod egress_proxy;
mod model_proxy;
pub mod netns;
mod outbox;
pub mod prestart;
pub mod priority;
pub mod sandbox;
pub mod seccomp;

use std::time::Duration;

use aishell_protocol::agent::RunAs;
use aishell_protocol::runner::{Isolation, RunnerSettings, SandboxSettings};
use aishell_protocol::{
    AgentEvent, AgentInput, GatewayToRunner, RUNNER_PROTOCOL_VERSION, RunnerToGateway,
};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

pub use config::RunnerConfig;

use agent_proc::{AgentOutput, AgentProcess};
use outbox::Outbox;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Heartbeat period towards the gateway.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Most agent frames written to the gateway's socket in one go.
const MAX_FRAMES_PER_WRITE: usize = 64;
/// How long the agent gets to answer its `init`.
const AGENT_INIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Ping ids the runner uses as a barrier after `restore_conversations`.
const RESTORE_BARRIER_PREFIX: &str = "__aishell_restore_";

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("gateway refused this task's credential ({0}); giving up")]
    Refused(String),
    #[error("gateway unreachable for {0:?}; giving up")]
    GatewayLost(Duration),
    #[error("websocket: {0}")]
    Ws(#[from] tungstenite::Error),
}

/// What the user's session asked this runner to be.
struct Binding {
    session_id: String,
    trace_id: Option<String>,
}

struct Runner {
    cfg: RunnerConfig,
    binding: Option<Binding>,
    agent: Option<AgentProcess>,
    agent_ready: bool,
    /// The agent runs under bubblewrap.
    sandboxed: bool,
    /// When the agent was spawned (for `ready.agent_start_ms`).
    init_deadline_set_at: Option<Instant>,
    init_deadline: Option<Instant>,
    outbox: Outbox,
    /// Restore barriers in flight: ping id → conversation count.
    restore_barriers: Vec<(String, u32)>,
    restore_counter: u64,
    /// Set once the agent exited; the runner leaves after reporting it.
    exit_reported: Option<RunnerToGateway>,
    /// Serves the agent's model calls once the gateway offers a key pool.
    model_proxy: Option<model_proxy::ModelProxy>,
    /// Settings of the agent started before any claim (`prepare`); cleared
    /// when the claim uses or replaces it.
    prepared: Option<RunnerSettings>,
    /// The bound agent was pre-started (reported in `ready`).
    prestarted: bool,
    /// UID isolation: the UID the agent must run as, checked in `/proc`
    /// before the agent is reported ready.
    agent_uid: Option<u32>,
    /// Highest gateway input `seq` handed to the agent (a resent input at
    /// or below it is dropped; hello and heartbeats report it).
    inputs_received: u64,
    /// A missing cgroup controller was reported already.
    cgroup_warned: bool,
    /// The conversation of the last message handed to the agent (an
    /// oversized frame ends its turn).
    current_conversation: Option<String>,
    /// That conversation's turn was ended by the runner: the agent's own
    /// `finish` (or `error`) for it is dropped.
    ended_turn: Option<String>,
}

/// Run until shut down, the agent exits, or the gateway is gone for good.
pub async fn run(cfg: RunnerConfig) -> Result<(), RunnerError> {
    let mut runner = Runner {
        cfg,
        binding: None,
        agent: None,
        agent_ready: false,
        sandboxed: false,
        init_deadline_set_at: None,
        init_deadline: None,
        outbox: Outbox::default(),
        restore_barriers: Vec::new(),
        restore_counter: 0,
        exit_reported: None,
        model_proxy: None,
        prepared: None,
        prestarted: false,
        agent_uid: None,
        inputs_received: 0,
        cgroup_warned: false,
        current_conversation: None,
        ended_turn: None,
    };
    runner.run().await
}

enum SessionEnd {
    /// Socket dropped: re-dial.
    Disconnected,
    /// The gateway does not run this task's session; the one at this
    /// address does: dial it next.
    Moved(String),
    /// Gateway said shutdown, or the agent exited and that was reported.
    Finished,
}

impl Runner {
    /// The session's trace id once bound (empty while warm and unclaimed).
    fn trace_id(&self) -> &str {
        self.binding
            .as_ref()
            .and_then(|b| b.trace_id.as_deref())
            .unwrap_or("")
    }

    async fn run(&mut self) -> Result<(), RunnerError> {
        let mut backoff = Backoff::new();
        let mut lost_since: Option<Instant> = None;
        if let Some(delay) = self.cfg.dial_delay {
            // Test hook (fault injection): dial late, like a slow network.
            tokio::time::sleep(delay).await;
        }
        // Several gateways: a dial that failed is tried next at the other
        // address (own gateway, shared address, in turn).
        let mut fallback = false;
        // The gateway that runs the session, as another gateway named it
        // (docs/cluster.md): the shared address balances dials over every
        // gateway, and may not reach the owner before the reconnect
        // deadline.
        let mut owner: Option<String> = None;
        loop {
            let dialled = self.connect(fallback, owner.take()).await;
            match dialled {
                Ok(ws) => {
                    backoff.reset();
                    lost_since = None;
                    tracing::info!(event = "runner_connected", taskId = %self.cfg.task_id, traceId = self.trace_id(), "connected to gateway");
                    match self.serve(ws).await {
                        Ok(SessionEnd::Finished) => return Ok(()),
                        Ok(SessionEnd::Disconnected) => {}
                        Ok(SessionEnd::Moved(url)) => owner = Some(url),
                        Err(e) => {
                            tracing::warn!(event = "runner_socket_error", taskId = %self.cfg.task_id, traceId = self.trace_id(), error = %e, "gateway socket failed")
                        }
                    }
                }
                Err(ConnectError::Refused(reason)) => {
                    tracing::error!(event = "runner_refused", taskId = %self.cfg.task_id, traceId = self.trace_id(), reason = %reason, "gateway refused this runner");
                    self.kill_agent().await;
                    return Err(RunnerError::Refused(reason));
                }
                Err(ConnectError::Transient(reason)) => {
                    tracing::warn!(event = "runner_dial_failed", taskId = %self.cfg.task_id, traceId = self.trace_id(), reason = %reason, "gateway not reachable; retrying");
                }
                Err(ConnectError::Moved(url)) => {
                    tracing::info!(event = "runner_dial_owner", taskId = %self.cfg.task_id, traceId = self.trace_id(), owner = %url, "another gateway runs this session; dialling it");
                    owner = Some(url);
                }
            }
            fallback = !fallback && self.cfg.fallback_url.is_some();
            let since = *lost_since.get_or_insert_with(Instant::now);
            if since.elapsed() > self.cfg.reconnect_deadline {
                self.kill_agent().await;
                return Err(RunnerError::GatewayLost(self.cfg.reconnect_deadline));
            }
            // Keep draining agent output while away so its pipes never fill.
            // The owner named: dial it almost at once.
            let pause = match owner {
                Some(_) => Duration::from_millis(20),
                None => backoff.next_delay(),
            };
            let until = Instant::now() + pause;
            while Instant::now() < until {
                if !self.pump_agent_until(until).await {
                    break;
                }
            }
        }
    }

    async fn connect(&self, fallback: bool, owner: Option<String>) -> Result<Ws, ConnectError> {
        let url = match owner {
            // The same path at the owner's address.
            Some(base) => {
                let own = self.cfg.dial_url(false);
                format!("{base}{}", &own[self.cfg.gateway_url.len()..])
            }
            None => self.cfg.dial_url(fallback),
        };
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ConnectError::Refused(format!("bad gateway url {url}: {e}")))?;
        let bearer = HeaderValue::from_str(&format!("Bearer {}", self.cfg.credential))
            .map_err(|_| ConnectError::Refused("credential is not a valid header".into()))?;
        request.headers_mut().insert("authorization", bearer);
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(aishell_protocol::WS_READ_BUFFER_BYTES)
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let connect = tokio_tungstenite::connect_async_with_config(request, Some(ws_config), true);
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Err(_) => Err(ConnectError::Transient("connect timed out".into())),
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let status = resp.status();
                if let Some(owner) = resp
                    .headers()
                    .get(OWNER_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .filter(|u| u.starts_with("ws://") || u.starts_with("wss://"))
                {
                    return Err(ConnectError::Moved(owner.to_string()));
                }
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                // 401/403/404/409 will not get better by retrying.
                if matches!(status.as_u16(), 401 | 403 | 404 | 409 | 410) {
                    Err(ConnectError::Refused(format!("HTTP {status}: {body}")))
                } else {
                    Err(ConnectError::Transient(format!("HTTP {status}: {body}")))
                }
            }
            Ok(Err(e)) => Err(ConnectError::Transient(e.to_string())),
        }
    }

    /// One connected period. Returns when the socket drops or the runner is done.
    async fn serve(&mut self, mut ws: Ws) -> Result<SessionEnd, RunnerError> {
        let hello = RunnerToGateway::Hello {
            protocol: RUNNER_PROTOCOL_VERSION,
            task_id: self.cfg.task_id.clone(),
            runner_version: env!("CARGO_PKG_VERSION").to_string(),
            session_id: self.binding.as_ref().map(|b| b.session_id.clone()),
            agent_running: self.agent.is_some(),
            inputs_received: self.inputs_received,
        };
        send(&mut ws, &hello).await?;
        if self.agent_ready {
            send(
                &mut ws,
                &RunnerToGateway::Ready {
                    agent: self
                        .agent
                        .as_ref()
                        .map(|a| a.info.clone())
                        .unwrap_or_default(),
                    agent_start_ms: None,
                    prestarted: self.prestarted,
                },
            )
            .await?;
        }
        // Everything the gateway has not acknowledged, in order.
        for frame in self.outbox.unacked() {
            send(&mut ws, frame).await?;
        }
        if let Some(exit) = self.exit_reported.clone() {
            send(&mut ws, &exit).await?;
            return self.linger_after_exit(ws).await;
        }
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        loop {
            let init_deadline = self.init_deadline;
            tokio::select! {
                msg = ws.next() => {
                    let Some(msg) = msg else { return Ok(SessionEnd::Disconnected) };
                    let text = match msg {
                        Ok(Message::Text(t)) => t,
                        Ok(Message::Close(Some(frame))) if (4400..4500).contains(&u16::from(frame.code)) => {
                            // The gateway refused this task for good (not ours, bad protocol...).
                            tracing::error!(event = "runner_refused", taskId = %self.cfg.task_id, traceId = self.trace_id(), code = u16::from(frame.code), reason = %frame.reason, "gateway refused this runner");
                            self.kill_agent().await;
                            return Err(RunnerError::Refused(frame.reason.to_string()));
                        }
                        Ok(Message::Close(Some(ref frame))) if frame.reason.starts_with(OWNER_REASON) => {
                            return Ok(SessionEnd::Moved(frame.reason[OWNER_REASON.len()..].to_string()));
                        }
                        Ok(Message::Close(_)) => return Ok(SessionEnd::Disconnected),
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::warn!(event = "runner_socket_error", taskId = %self.cfg.task_id, traceId = self.trace_id(), error = %e, "gateway socket read failed");
                            return Ok(SessionEnd::Disconnected);
                        }
                    };
                    match GatewayToRunner::decode(&text) {
                        Ok(frame) => {
                            if self.handle_gateway(frame, &mut ws).await? {
                                self.kill_agent().await;
                                let _ = ws.close(None).await;
                                return Ok(SessionEnd::Finished);
                            }
                        }
                        Err(e) => tracing::warn!(event = "runner_bad_frame", error = %e, "ignoring undecodable gateway frame"),
                    }
                }
                out = next_agent_output(&mut self.agent) => {
                    // Whatever the agent has written already goes out in one
                    // socket write (an answer is often several events).
                    let mut next = Some(out);
                    let mut batched = 0;
                    while let Some(out) = next.take() {
                        if let Some(frame) = self.on_agent_output(out) {
                            let is_exit = matches!(frame, RunnerToGateway::AgentExit { .. });
                            feed(&mut ws, &frame).await?;
                            if is_exit {
                                ws.flush().await?;
                                return self.linger_after_exit(ws).await;
                            }
                        }
                        batched += 1;
                        if batched < MAX_FRAMES_PER_WRITE {
                            next = self.agent.as_mut().and_then(AgentProcess::try_next_output);
                        }
                    }
                    ws.flush().await?;
                }
                _ = heartbeat.tick() => {
                    send(&mut ws, &self.heartbeat()).await?;
                }
                _ = sleep_until_opt(init_deadline) => {
                    self.init_deadline = None;
                    let message = format!("agent did not answer init within {}s", AGENT_INIT_TIMEOUT.as_secs());
                    tracing::error!(event = "agent_init_timeout", taskId = %self.cfg.task_id, traceId = self.trace_id(), "{message}");
                    send(&mut ws, &RunnerToGateway::StartFailed { message }).await?;
                    self.kill_agent().await;
                }
            }
        }
    }

    /// After reporting the agent's exit, wait briefly for the gateway to
    /// acknowledge (shutdown or close) so the report is not lost in flight.
    async fn linger_after_exit(&mut self, mut ws: Ws) -> Result<SessionEnd, RunnerError> {
        let linger = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(linger);
        loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        if matches!(GatewayToRunner::decode(&t), Ok(GatewayToRunner::Shutdown { .. })) {
                            return Ok(SessionEnd::Finished);
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return Ok(SessionEnd::Finished),
                },
                _ = &mut linger => return Ok(SessionEnd::Finished),
            }
        }
    }

    /// Handle one gateway frame; true means "shut down now".
    async fn handle_gateway(
        &mut self,
        frame: GatewayToRunner,
        ws: &mut Ws,
    ) -> Result<bool, RunnerError> {
        match frame {
            GatewayToRunner::InitUser {
                user_id,
                session_id,
                workspace,
                trace_id,
                settings,
            } => {
                if let Some(b) = &self.binding {
                    if b.session_id != session_id {
                        let message = format!("task already bound to session {}", b.session_id);
                        send(ws, &RunnerToGateway::StartFailed { message }).await?;
                    }
                    return Ok(false);
                }
                // Claimed before it was ready: its user does not wait at
                // idle priority.
                priority::ready();
                tracing::info!(event = "runner_init_user", sessionId = %session_id, userId = %user_id, traceId = trace_id.as_deref().unwrap_or(""), "binding task to user");
                self.binding = Some(Binding {
                    session_id: session_id.clone(),
                    trace_id: trace_id.clone(),
                });
                let started = self
                    .start_agent(&workspace, &session_id, trace_id.as_deref(), settings)
                    .await;
                if let Err(message) = started {
                    tracing::error!(event = "agent_start_failed", sessionId = %session_id, error = %message, "could not start agent");
                    send(ws, &RunnerToGateway::StartFailed { message }).await?;
                }
            }
            GatewayToRunner::Prepare { settings } => {
                let prestarted = self.prepare(settings).await;
                send(ws, &RunnerToGateway::Prepared { prestarted }).await?;
                // Started at idle priority; nothing left to do until the claim.
                priority::ready();
            }
            GatewayToRunner::Agent { seq, frame } => {
                // Unnumbered (0) inputs come from older gateways.
                if seq == 0 || seq > self.inputs_received {
                    self.inputs_received = self.inputs_received.max(seq);
                    if let AgentInput::Message {
                        conversation_id, ..
                    } = &frame
                    {
                        self.current_conversation = Some(conversation_id.clone());
                    }
                    self.send_to_agent(frame);
                } else {
                    tracing::debug!(event = "runner_input_duplicate", taskId = %self.cfg.task_id, seq, "input already handled");
                }
            }
            GatewayToRunner::RestoreConversations { conversations } => {
                let count = conversations.len() as u32;
                self.restore_counter += 1;
                let id = format!("{RESTORE_BARRIER_PREFIX}{}", self.restore_counter);
                self.send_to_agent(AgentInput::RestoreConversations { conversations });
                self.send_to_agent(AgentInput::Ping {
                    id: serde_json::Value::String(id.clone()),
                });
                self.restore_barriers.push((id, count));
            }
            GatewayToRunner::Ack { seq } => self.outbox.ack(seq),
            GatewayToRunner::Ping => send(ws, &self.heartbeat()).await?,
            GatewayToRunner::Shutdown { reason } => {
                tracing::info!(event = "runner_shutdown", taskId = %self.cfg.task_id, traceId = self.trace_id(), reason = %reason, "gateway asked to shut down");
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn heartbeat(&self) -> RunnerToGateway {
        RunnerToGateway::Heartbeat {
            inputs_received: self.inputs_received,
        }
    }

    /// Warm and unclaimed: start the agent `settings` describe before its
    /// user is known, without `init`. Only built-in agents qualify, under
    /// bubblewrap with a workspace slot (see [`prestart`]) or under UID
    /// isolation as a root runner (the agent takes its user's UID on `init`,
    /// `aishell agent --await-init`); otherwise the agent starts at claim
    /// time. True when an agent is pre-started.
    async fn prepare(&mut self, settings: RunnerSettings) -> bool {
        if self.binding.is_some() {
            return false;
        }
        if self.agent.is_some() && self.prepared.as_ref() == Some(&settings) {
            return true;
        }
        self.kill_agent().await;
        self.prepared = None;
        if settings.agent.command.is_some() {
            return false;
        }
        let holding_dir = match settings.sandbox.as_ref().map(|s| s.isolation) {
            Some(Isolation::Bwrap) => match &self.cfg.workspace_slot {
                Some(slot) => slot.path().to_path_buf(),
                None => return false,
            },
            // Root owns `/`: the agent can do nothing there before `init`.
            // SAFETY: geteuid has no preconditions.
            Some(Isolation::Uid) if unsafe { libc::geteuid() } == 0 => "/".into(),
            _ => return false,
        };
        match self.spawn_agent(&holding_dir, None, &settings).await {
            Ok(agent) => {
                tracing::info!(event = "agent_prestarted", taskId = %self.cfg.task_id, agent = %settings.agent.kind, "agent started ahead of its claim");
                self.agent = Some(agent);
                self.prepared = Some(settings);
                true
            }
            Err(e) => {
                tracing::warn!(event = "agent_prestart_failed", taskId = %self.cfg.task_id, error = %e, "agent will start at claim time");
                false
            }
        }
    }

    /// Claim time: the pre-started agent when it was started for these
    /// settings and the workspace binds onto its slot, else a new agent;
    /// then its `init`.
    async fn start_agent(
        &mut self,
        workspace: &str,
        session_id: &str,
        trace_id: Option<&str>,
        settings: RunnerSettings,
    ) -> Result<(), String> {
        std::fs::create_dir_all(workspace)
            .map_err(|e| format!("cannot prepare workspace {workspace}: {e}"))?;
        let started_at = Instant::now();
        let mut run_as = None;
        self.prestarted = match self.prepared.take() {
            Some(prepared) if prepared == settings && self.agent.is_some() => {
                match self.claim_prestarted(workspace, &settings) {
                    Ok(identity) => {
                        run_as = identity;
                        true
                    }
                    Err(reason) => {
                        tracing::warn!(event = "agent_prestart_unused", sessionId = %session_id, reason = %reason, "starting a new agent instead");
                        false
                    }
                }
            }
            Some(_) => {
                tracing::info!(event = "agent_prestart_unused", sessionId = %session_id, reason = "the claim asks for other settings", "starting a new agent instead");
                false
            }
            None => false,
        };
        if !self.prestarted {
            self.kill_agent().await;
            self.agent_uid = None;
            let agent = self
                .spawn_agent(
                    std::path::Path::new(workspace),
                    Some((session_id, trace_id)),
                    &settings,
                )
                .await?;
            self.agent = Some(agent);
        }
        if let Some(proxy) = &self.model_proxy {
            proxy.set_session(session_id);
        }
        self.init_deadline = Some(Instant::now() + AGENT_INIT_TIMEOUT);
        self.init_deadline_set_at = Some(started_at);
        // Under bubblewrap the agent sees its workspace at a fixed path.
        let seen = if self.sandboxed {
            prestart::SANDBOX_WORKSPACE.to_string()
        } else {
            workspace.to_string()
        };
        self.send_to_agent(AgentInput::Init {
            workspace: Some(seen),
            settings: settings.agent_settings,
            env: session_env(session_id, trace_id.unwrap_or("")),
            run_as,
        });
        Ok(())
    }

    /// Give the pre-started agent its user: under bubblewrap, put the
    /// workspace onto the sandbox's slot; under UID isolation, the user's
    /// UID, which the agent takes on `init` (returned for it).
    fn claim_prestarted(
        &mut self,
        workspace: &str,
        settings: &RunnerSettings,
    ) -> Result<Option<RunAs>, String> {
        let workspace = std::path::Path::new(workspace);
        if settings.sandbox.as_ref().map(|s| s.isolation) == Some(Isolation::Uid) {
            let uid = sandbox::prepare_uid_workspace(workspace)?;
            self.agent_uid = Some(uid);
            return Ok(Some(RunAs { uid, gid: uid }));
        }
        let slot = self
            .cfg
            .workspace_slot
            .as_ref()
            .ok_or("no workspace slot")?;
        // A slot means a root runner: the agent becomes the user's own UID
        // on `init` (see `sandbox::SandboxUser::AtInit`).
        let uid = sandbox::prepare_uid_workspace(workspace)?;
        slot.bind(workspace)?;
        self.agent_uid = Some(uid);
        Ok(Some(RunAs { uid, gid: uid }))
    }

    /// Spawn the agent for `settings` with `workspace` as its workspace;
    /// `session` (id, trace id) is known unless the agent is pre-started.
    async fn spawn_agent(
        &mut self,
        workspace: &std::path::Path,
        session: Option<(&str, Option<&str>)>,
        settings: &RunnerSettings,
    ) -> Result<AgentProcess, String> {
        let mut env = settings.env.clone();
        if let Some((session_id, trace_id)) = session {
            // Also in `init`; here for agents that never read it there.
            env.extend(session_env(session_id, trace_id.unwrap_or("")));
        }
        if !settings.model_proxy.is_empty() {
            if self.model_proxy.is_none() {
                let proxy =
                    model_proxy::ModelProxy::start(&self.cfg.gateway_url, &self.cfg.credential)
                        .await
                        .map_err(|e| format!("cannot start the agent's model endpoint: {e}"))?;
                self.model_proxy = Some(proxy);
            }
            let proxy = self.model_proxy.as_ref().expect("just started");
            env.extend(proxy.agent_env(&settings.model_proxy));
        }
        let mut command = agent_proc::agent_command(&self.cfg.agent_program, &settings.agent);
        if session.is_none() {
            // Pre-started (built-in only): it waits for `init` to learn its
            // workspace (and, under UID isolation, its user).
            command.push("--await-init".into());
        }
        let mut egress_plan = None;
        let confined = match settings.sandbox.as_ref() {
            None => None,
            Some(s) if s.isolation == Isolation::Uid => {
                env.entry("PATH".into())
                    .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
                env.insert("TMPDIR".into(), "/tmp".into());
                let limits = sandbox::Limits::from_settings(s);
                let limits = if session.is_none() {
                    // Pre-started: root until `init` names the user.
                    sandbox::Limits {
                        identity: sandbox::AgentIdentity::UserAtInit,
                        ..limits
                    }
                } else {
                    let uid = sandbox::prepare_uid_workspace(workspace)?;
                    tracing::info!(
                        event = "agent_uid",
                        sessionId = session.map_or("", |s| s.0),
                        uid = uid,
                        "agent runs under its user's own uid"
                    );
                    self.agent_uid = Some(uid);
                    env.insert("HOME".into(), workspace.to_string_lossy().into_owned());
                    sandbox::Limits {
                        identity: sandbox::AgentIdentity::User(uid),
                        ..limits
                    }
                };
                Some(sandbox::Confinement {
                    limits,
                    cgroup: self.sandbox_cgroup(s),
                    seccomp: Some(crate::seccomp::agent_filter()),
                    ..Default::default()
                })
            }
            Some(s) => {
                // SAFETY: geteuid has no preconditions.
                let user = if unsafe { libc::geteuid() } != 0 {
                    sandbox::SandboxUser::Runner
                } else if session.is_none() {
                    sandbox::SandboxUser::AtInit
                } else {
                    let uid = sandbox::prepare_uid_workspace(workspace)?;
                    self.agent_uid = Some(uid);
                    sandbox::SandboxUser::Own(uid)
                };
                if s.network {
                    env.extend(egress::agent_env(s.egress));
                }
                let mut bwrap = sandbox::wrap(&command, workspace, &env, s, user);
                if s.network {
                    egress_plan = Some(egress::Plan::new(s, &mut bwrap)?);
                }
                let (argv, inherited_fds) = bwrap
                    .launch()
                    .map_err(|e| format!("cannot prepare the sandbox: {e}"))?;
                command = argv;
                let cgroup = self.sandbox_cgroup(s);
                Some(sandbox::Confinement {
                    limits: sandbox::Limits {
                        identity: user.identity(),
                        ..sandbox::Limits::from_settings(s)
                    },
                    under_bwrap: true,
                    inherited_fds,
                    cgroup,
                    seccomp: None,
                })
            }
        };
        // Only bwrap reports a killed agent as exit 128+N.
        self.sandboxed = confined.as_ref().is_some_and(|c| c.under_bwrap);
        let mut agent = AgentProcess::spawn(&command, &workspace.to_string_lossy(), &env, confined).map_err(|e| {
            if self.sandboxed && e.kind() == std::io::ErrorKind::NotFound {
                "bubblewrap (bwrap) is not installed in this sandbox image; install the bubblewrap package or run serve with --insecure-no-sandbox".to_string()
            } else {
                format!("cannot start agent {:?}: {e}", command.last())
            }
        })?;
        if let Some(plan) = egress_plan {
            // Dropping the agent on failure stops bwrap (kill on drop).
            agent.egress = Some(plan.connect(self.model_proxy.as_ref()).await?);
        }
        Ok(agent)
    }

    /// The cgroups that hold one sandbox's processes and memory; a limit
    /// that cannot be set is reported once per runner (it stays per
    /// process: RLIMIT_NPROC per UID, RLIMIT_AS).
    fn sandbox_cgroup(&mut self, s: &SandboxSettings) -> Option<cgroup::SandboxCgroup> {
        let limits = cgroup::CgroupLimits {
            max_processes: s.sandbox_max_processes,
            memory_bytes: s.sandbox_memory_bytes,
        };
        let (cgroup, missing) = cgroup::SandboxCgroup::create(&self.cfg.task_id, limits);
        for m in missing {
            if !std::mem::replace(&mut self.cgroup_warned, true) {
                tracing::warn!(event = "sandbox_cgroup_unavailable", taskId = %self.cfg.task_id, controller = m.controller, error = %m, "limit stays per process");
            }
        }
        cgroup
    }

    fn send_to_agent(&mut self, input: AgentInput) {
        match &self.agent {
            Some(agent) => agent.send(input),
            None => tracing::warn!(
                event = "runner_no_agent",
                "dropping agent input: no agent is running"
            ),
        }
    }

    /// Turn one agent output into the frame to send, if any (also buffers it).
    fn on_agent_output(&mut self, out: AgentOutput) -> Option<RunnerToGateway> {
        let (session_id, trace_id) = match &self.binding {
            Some(b) => (b.session_id.as_str(), b.trace_id.as_deref().unwrap_or("")),
            None => ("", ""),
        };
        match out {
            AgentOutput::Event(AgentEvent::Init(info)) => {
                if let Some(refusal) = self.refuse_wrong_identity() {
                    return Some(refusal);
                }
                self.init_deadline = None;

                self.agent_ready = true;
                if let Some(agent) = &mut self.agent {
                    agent.info = info.clone();
                }
                let agent_start_ms = self
                    .init_deadline_set_at
                    .take()
                    .map(|t| t.elapsed().as_millis() as u64);
                Some(RunnerToGateway::Ready {
                    agent: info,
                    agent_start_ms,
                    prestarted: self.prestarted,
                })
            }
            AgentOutput::Event(AgentEvent::Pong { id }) if self.is_restore_barrier(&id) => {
                let id = id.as_str().unwrap_or_default().to_string();
                let pos = self.restore_barriers.iter().position(|(b, _)| *b == id)?;
                let (_, count) = self.restore_barriers.remove(pos);
                Some(RunnerToGateway::Restored { count })
            }
            AgentOutput::Event(
                AgentEvent::Finish {
                    ref conversation_id,
                    ..
                }
                | AgentEvent::Error {
                    conversation_id: Some(ref conversation_id),
                    ..
                },
            ) if self.ended_turn.as_ref() == Some(conversation_id) => {
                // The runner ended this turn already (oversized frame).
                self.ended_turn = None;
                None
            }
            AgentOutput::Event(frame) => Some(self.outbox.push(frame)),
            AgentOutput::OversizedLine(len) => {
                tracing::warn!(event = "agent_frame_too_large", sessionId = %session_id, traceId = %trace_id, bytes = len, "agent wrote a frame over the limit; discarded");
                let conversation_id = self.current_conversation.clone();
                self.ended_turn.clone_from(&conversation_id);
                Some(self.outbox.push(AgentEvent::Error {
                    conversation_id,
                    error: aishell_protocol::codes::ErrorBody::new(
                        aishell_protocol::codes::ErrorCode::AgentError,
                        format!(
                            "the agent wrote a frame of {len} bytes, over the {} MiB limit; it was discarded and the turn ended",
                            agent_proc::MAX_LINE_BYTES >> 20
                        ),
                    ),
                }))
            }
            AgentOutput::BadLine(line) => {
                tracing::warn!(event = "agent_bad_output", sessionId = %session_id, traceId = %trace_id, line = %line, "agent wrote a line that is not a protocol frame");
                Some(RunnerToGateway::AgentStderr {
                    line: format!("[stdout, not a frame] {line}"),
                })
            }
            // Logged once, by the gateway, at the level the turn's outcome
            // gives it (gateway session/agent_stderr.rs).
            AgentOutput::Stderr(line) => Some(RunnerToGateway::AgentStderr { line }),
            AgentOutput::Exited { .. } if self.binding.is_none() && self.prepared.is_some() => {
                // A pre-started agent died before any claim: nobody to tell;
                // the claim will start a new one.
                tracing::warn!(event = "agent_prestart_exit", taskId = %self.cfg.task_id, "pre-started agent exited before its claim");
                self.agent = None;
                self.prepared = None;
                None
            }
            AgentOutput::Exited {
                code,
                signal,
                stderr_tail,
            } => {
                // bwrap reports a killed agent as exit code 128 + signal.
                let (code, signal) = match code {
                    Some(c) if self.sandboxed && (129..=192).contains(&c) && signal.is_none() => {
                        (None, Some(c - 128))
                    }
                    _ => (code, signal),
                };
                tracing::warn!(event = "agent_exit", sessionId = %session_id, traceId = %trace_id, code = ?code, signal = ?signal, "agent exited");
                self.agent = None;
                self.agent_ready = false;
                let frame = RunnerToGateway::AgentExit {
                    code,
                    signal,
                    stderr_tail,
                };
                self.exit_reported = Some(frame.clone());
                Some(frame)
            }
        }
    }

    /// UID isolation: an agent that answers `init` under any identity but
    /// its user's is stopped before anything reaches it (its exit then fails
    /// the start), with the reason for the gateway.
    fn refuse_wrong_identity(&mut self) -> Option<RunnerToGateway> {
        let uid = self.agent_uid?;
        let agent = self.agent.as_mut()?;
        let checked = match agent.pid {
            Some(pid) if self.sandboxed => sandbox::check_sandbox_runs_as(pid, uid),
            Some(pid) => sandbox::check_runs_as(pid, uid),
            None => Err("the agent's process id is unknown".into()),
        };
        let reason = checked.err()?;
        tracing::error!(event = "agent_identity_refused", taskId = %self.cfg.task_id, uid = uid, reason = %reason, "stopping the agent");
        agent.start_kill();
        Some(RunnerToGateway::AgentStderr {
            line: format!("aishell runner: {reason}; the agent was stopped"),
        })
    }

    fn is_restore_barrier(&self, id: &serde_json::Value) -> bool {
        id.as_str()
            .is_some_and(|s| s.starts_with(RESTORE_BARRIER_PREFIX))
    }

    /// While disconnected: buffer agent output until `until`. False when
    /// there is no agent to wait on.
    async fn pump_agent_until(&mut self, until: Instant) -> bool {
        if self.agent.is_none() {
            tokio::time::sleep_until(until).await;
            return false;
        }
        tokio::select! {
            out = next_agent_output(&mut self.agent) => {
                // Events go to the outbox inside on_agent_output; stderr and
                // restore answers while away are logged only.
                let _ = self.on_agent_output(out);
                true
            }
            _ = tokio::time::sleep_until(until) => false,
        }
    }

    async fn kill_agent(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.kill().await;
        }
    }
}

/// The variables that tell an agent's commands which session they serve.
fn session_env(session_id: &str, trace_id: &str) -> std::collections::BTreeMap<String, String> {
    let mut env = std::collections::BTreeMap::new();
    env.insert("AISHELL_SESSION_ID".into(), session_id.to_string());
    if !trace_id.is_empty() {
        env.insert("AISHELL_TRACE_ID".into(), trace_id.to_string());
    }
    env
}

async fn next_agent_output(agent: &mut Option<AgentProcess>) -> AgentOutput {
    match agent {
        Some(a) => a.next_output().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn send(ws: &mut Ws, frame: &RunnerToGateway) -> Result<(), RunnerError> {
    feed(ws, frame).await?;
    ws.flush().await?;
    Ok(())
}

/// Queue `frame` in the socket's write buffer; a `flush` sends it.
async fn feed(ws: &mut Ws, frame: &RunnerToGateway) -> Result<(), RunnerError> {
    let text = serde_json::to_string(frame).expect("runner frame serialises");
    ws.feed(Message::Text(text.into())).await?;
    Ok(())
}

enum ConnectError {
    Refused(String),
    Transient(String),
    /// Another gateway runs the session: dial this address.
    Moved(String),
}

use aishell_protocol::runner::{OWNER_CLOSE_REASON_PREFIX as OWNER_REASON, OWNER_HEADER};

/// Exponential backoff with jitter: 100 ms doubling to 5 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Backoff { next: Self::START }
    }

    fn reset(&mut self) {
        self.next = Self::START;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let jitter = rand::random::<f64>() * 0.2 + 0.9;
        base.mul_f64(jitter)
    }
}
