//! One session's actor: the only owner of its state, so every transition
//! happens in one place, in order.
//!
//! Task phases inside the actor map onto the session states (ARCHITECTURE.md, "Session state machine"):
//! `Launching` → CREATING, `Pending` → PENDING, `Activating`/`Restoring` →
//! ACTIVATING, `Ready` → RUNNING (a client attached) or IDLE (none),
//! a stop in progress → STOPPING, no task at all → STOPPED (session kept,
//! the next message starts a task and resumes).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use aishell_backend::{LaunchSpec, TaskStatus};
use aishell_protocol::agent::AgentInfo;
use aishell_protocol::client::{ConversationSummary, TaskPhase, TaskSource};
use aishell_protocol::{
    AgentEvent, AgentInput, ClientFrame, ConversationRef, ErrorCode, GatewayToRunner,
    RunnerToGateway, ServerEvent, ServerFrame, SessionState,
};
use aishell_store::{MessageRecord, SessionRecord, StoredEvent};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::inputs::InputLog;
use super::output::{self, Admit, OutputBudget};
use super::persister::{self, PersistItem, Usage};
use super::replay::ReplayBuffer;
use crate::Shared;
use crate::auth::validate_conversation_id;
use crate::lifecycle::{lifecycle, ms};

/// Frames queued per client before it counts as too slow and is dropped
/// (it can reconnect with `last_seq` and lose nothing).
const CLIENT_QUEUE: usize = 4096;
/// Largest assistant reply kept in the store per turn.
const MAX_STORED_REPLY: usize = 1 << 20;
/// Page size when replaying from the store.
const REPLAY_PAGE: u32 = 1000;
/// How long an acknowledgement to the runner may wait for later ones to
/// join it. Acks only let the runner forget frames the store holds (a
/// re-sent frame is recognised by its seq), and one per stored batch woke
/// every runner in the middle of a burst of new sessions.
const ACK_DELAY: Duration = Duration::from_millis(200);
/// Stored batches after which an ack goes out at once (long answers).
const ACK_EVERY: u32 = 64;

/// Frames per catch-up batch for a lagging client.
const CATCH_UP_BATCH: usize = 1000;
/// Largest agent event stored and relayed; larger ones are cut
/// (ARCHITECTURE.md "Replay and durability").
const MAX_EVENT_BYTES: usize = 1 << 20;
/// How long a session that was only reserved (its client sent nothing)
/// stays in memory after its client left.
const RESERVED_EVICT_AFTER: Duration = Duration::from_secs(10);

/// What a connection handler receives for its client.
pub enum Outbound {
    /// A frame; `seq` is set for stream events (not for ephemeral answers).
    Frame(Option<u64>, Arc<str>),
    /// Close the client socket with this code and reason.
    Close(u16, String),
}

pub struct AttachReply {
    /// The `session` frame, then every missed event, in order.
    pub frames: Vec<(Option<u64>, Arc<str>)>,
    pub rx: mpsc::Receiver<Outbound>,
    /// Set (and notified) when the client fell behind: live frames stopped
    /// and the connection must pull the rest with `CatchUp`.
    pub lagging: Arc<Lagging>,
}

/// A client that could not keep up: the actor stops pushing to it and the
/// connection pulls missed events from the store at its own pace.
#[derive(Default)]
pub struct Lagging {
    pub flag: std::sync::atomic::AtomicBool,
    pub notify: tokio::sync::Notify,
}

/// A batch of missed events for a lagging client.
pub struct CatchUpBatch {
    pub frames: Vec<(u64, Arc<str>)>,
    /// The batch reached the live stream: pushing resumes.
    pub caught_up: bool,
}

/// A runner socket that completed its `hello`.
pub struct RunnerAttach {
    pub task_id: String,
    pub generation: u64,
    pub tx: mpsc::UnboundedSender<GatewayToRunner>,
    pub session_hint: Option<String>,
    pub agent_running: bool,
    /// Highest agent input `seq` the runner handled (its `hello`).
    pub inputs_received: u64,
}

pub enum SessionCmd {
    Attach {
        conn_id: u64,
        last_seq: Option<u64>,
        reply: oneshot::Sender<AttachReply>,
    },
    Detach {
        conn_id: u64,
        reason: String,
    },
    /// A lagging client asks for events after `after`.
    CatchUp {
        conn_id: u64,
        after: u64,
        reply: oneshot::Sender<CatchUpBatch>,
    },
    Client {
        conn_id: u64,
        frame: ClientFrame,
    },
    /// A connection-local answer for one client (BAD_FRAME, token updates...).
    Reply {
        conn_id: u64,
        event: ServerEvent,
    },
    RunnerConnected {
        attach: RunnerAttach,
        reply: oneshot::Sender<Result<(), String>>,
    },
    RunnerFrame {
        task_id: String,
        generation: u64,
        frame: RunnerToGateway,
    },
    RunnerDisconnected {
        task_id: String,
        generation: u64,
    },
    Launched {
        task_id: String,
        result: Result<Duration, String>,
    },
    Observed {
        task_id: String,
        status: Result<TaskStatus, String>,
    },
    Stopped {
        task_id: String,
        result: Result<(), String>,
    },
    /// Events up to `seq` are stored; those from agent frames up to
    /// `runner_seq` of the current task are safe at the gateway.
    Persisted {
        seq: u64,
        runner_seq: Option<(String, u64)>,
    },
    /// Stop the task (admin action, gateway shutdown).
    StopTask {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Launching,
    Pending,
    Activating,
    Restoring,
    Ready,
}

struct RunnerLink {
    generation: u64,
    tx: mpsc::UnboundedSender<GatewayToRunner>,
}

struct Task {
    id: String,
    source: TaskSource,
    phase: Phase,
    is_restart: bool,
    /// Adopted after a gateway restart: the agent already has its state.
    adopted: bool,
    requested_at: Instant,
    phase_started: Instant,
    phase_deadline: Option<Instant>,
    overall_deadline: Option<Instant>,
    breakdown: Vec<(&'static str, u64)>,
    runner: Option<RunnerLink>,
    runner_lost_at: Option<Instant>,
    agent: AgentInfo,
    /// The runner started the agent before the claim (warm `prepare`).
    agent_prestarted: bool,
    /// Agent inputs sent and not yet acknowledged by the runner.
    inputs: InputLog,
    /// Stops the status poller.
    watch: CancellationToken,
}

struct Stopping {
    task_id: String,
    since: Instant,
}

struct Client {
    conn_id: u64,
    tx: mpsc::Sender<Outbound>,
    lagging: Arc<Lagging>,
}

impl Client {
    fn is_lagging(&self) -> bool {
        self.lagging.flag.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[derive(Clone)]
struct QueuedMessage {
    conversation_id: String,
    content: String,
    message_id: Option<String>,
    received_at: Instant,
    /// Agents that died holding this message before answering it; a message
    /// that kills its agent twice is answered with an error, not retried
    /// forever.
    crashes: u8,
}

/// A user message the agent is working on.
struct Turn {
    message: QueuedMessage,
    first_event_seen: bool,
    reply: String,
}

pub fn spawn(
    shared: Arc<Shared>,
    record: SessionRecord,
    fresh: bool,
    self_tx: mpsc::Sender<SessionCmd>,
    rx: mpsc::Receiver<SessionCmd>,
) {
    let persist_tx = persister::spawn(
        shared.store.clone(),
        record.id.clone(),
        record.task_id.clone(),
        self_tx.clone(),
    );
    let now = Instant::now();
    let actor = SessionActor {
        replay: ReplayBuffer::new(shared.cfg.replay_buffer, shared.cfg.replay_buffer_bytes),
        output: OutputBudget::new(shared.cfg.max_turn_output_bytes),
        // Created in this process: only reserved until its first message.
        reserved: fresh.then(|| record.clone()),
        shared,
        id: record.id,
        user_id: record.user_id,
        trace_id: record.trace_id,
        fresh,
        self_tx,
        persist_tx,
        clients: Vec::new(),
        next_seq: record.last_seq + 1,
        delivered_seq: record.last_seq,
        bound_task: record.task_id.map(|t| (t, record.runner_seq)),
        task: None,
        stopping: None,
        start_after_stop: false,
        queue: VecDeque::new(),
        seen_message_ids: HashSet::new(),
        turns: HashMap::new(),
        questions: HashSet::new(),
        idle_since: now,
        detached_at: Some(now),
        last_runner_seq: 0,
        pending_ack: None,
        ever_ready: false,
        session_started_at: None,
        last_state: None,
        held_stderr: Default::default(),
    };
    tokio::spawn(actor.run(rx));
}

struct SessionActor {
    shared: Arc<Shared>,
    id: String,
    user_id: String,
    trace_id: String,
    /// Created in this gateway process (not loaded from the store).
    fresh: bool,
    self_tx: mpsc::Sender<SessionCmd>,
    persist_tx: mpsc::UnboundedSender<PersistItem>,
    clients: Vec<Client>,
    next_seq: u64,
    /// Highest seq stored and sent to clients: events reach clients only
    /// once durable, so a client never holds an event a restarted gateway
    /// could lose.
    delivered_seq: u64,
    /// The task the store says this session was bound to, with the last
    /// stored agent frame seq (for re-adoption after a gateway restart).
    bound_task: Option<(String, u64)>,
    replay: ReplayBuffer,
    /// What agent output may still be stored and relayed.
    output: OutputBudget,
    /// A session whose client has sent nothing yet is only reserved: it is
    /// stored (this record) with its first message, so connections that
    /// send nothing leave nothing behind.
    reserved: Option<SessionRecord>,
    task: Option<Task>,
    stopping: Option<Stopping>,
    /// A start is waiting for the old task to finish stopping (class 3).
    start_after_stop: bool,
    /// Client messages waiting for a ready task, in order.
    queue: VecDeque<QueuedMessage>,
    seen_message_ids: HashSet<String>,
    /// Turns in flight, per conversation, oldest first.
    turns: HashMap<String, VecDeque<Turn>>,
    /// Open `ask_question` request ids.
    questions: HashSet<String>,
    /// When processing last became idle (for the idle timer).
    idle_since: Instant,
    /// When the last client left (None while one is attached).
    detached_at: Option<Instant>,
    /// Highest agent frame seq received from the current task's runner.
    last_runner_seq: u64,
    /// The acknowledgement the runner has not been sent yet.
    pending_ack: Option<PendingAck>,
    ever_ready: bool,
    session_started_at: Option<Instant>,
    /// The state last counted in the metrics (and persisted, once stored).
    last_state: Option<SessionState>,
    /// The agent's stderr during the running turn (see agent_stderr.rs).
    held_stderr: super::agent_stderr::HeldStderr,
}

/// An acknowledgement held back for [`ACK_DELAY`].
struct PendingAck {
    task_id: String,
    /// Highest stored runner seq.
    seq: u64,
    /// Stored batches it covers.
    batches: u32,
    due: Instant,
}

impl SessionActor {
    async fn run(mut self, mut rx: mpsc::Receiver<SessionCmd>) {
        loop {
            self.sync_state();
            let deadline = self.next_deadline();
            let cmd = tokio::select! {
                cmd = rx.recv() => cmd,
                _ = sleep_until_opt(deadline) => {
                    self.on_timer().await;
                    continue;
                }
            };
            let Some(cmd) = cmd else { break };
            self.handle(cmd).await;
            if self.should_evict() && rx.is_empty() {
                break;
            }
        }
        self.shared.sessions.remove(&self.id, &self.self_tx);
        crate::metrics::session_state(self.last_state, None);
        tracing::debug!(event = "session_evicted", sessionId = %self.id, "session actor left memory");
    }

    async fn handle(&mut self, cmd: SessionCmd) {
        match cmd {
            SessionCmd::Attach {
                conn_id,
                last_seq,
                reply,
            } => self.attach(conn_id, last_seq, reply).await,
            SessionCmd::Detach { conn_id, reason } => self.detach(conn_id, &reason),
            SessionCmd::CatchUp {
                conn_id,
                after,
                reply,
            } => {
                let batch = self.catch_up(conn_id, after).await;
                let _ = reply.send(batch);
            }
            SessionCmd::Client { conn_id, frame } => self.on_client(conn_id, frame).await,
            SessionCmd::Reply { conn_id, event } => self.reply(conn_id, event),
            SessionCmd::RunnerConnected { attach, reply } => {
                let result = self.on_runner_connected(attach).await;
                let _ = reply.send(result);
            }
            SessionCmd::RunnerFrame {
                task_id,
                generation,
                frame,
            } => {
                if self.is_current_runner(&task_id, generation) {
                    self.on_runner_frame(frame).await;
                }
            }
            SessionCmd::RunnerDisconnected {
                task_id,
                generation,
            } => {
                if self.is_current_runner(&task_id, generation) {
                    self.on_runner_disconnected();
                }
            }
            SessionCmd::Launched { task_id, result } => self.on_launched(&task_id, result).await,
            SessionCmd::Observed { task_id, status } => self.on_observed(&task_id, status).await,
            SessionCmd::Stopped { task_id, result } => self.on_stopped(&task_id, result).await,
            SessionCmd::Persisted { seq, runner_seq } => self.on_persisted(seq, runner_seq).await,
            SessionCmd::StopTask { reason } => {
                if self.task.is_some() {
                    self.fail_turns(
                        ErrorCode::AgentCrashed,
                        &format!("your session was stopped: {reason}"),
                    );
                    self.begin_stop(&reason);
                    self.emit(ServerEvent::Status {
                        state: TaskPhase::Stopped,
                        source: None,
                        eta_ms: None,
                    });
                }
            }
        }
    }

    // ---- clients -------------------------------------------------------

    async fn attach(
        &mut self,
        conn_id: u64,
        last_seq: Option<u64>,
        reply: oneshot::Sender<AttachReply>,
    ) {
        let current = self.delivered_seq;
        let session = ServerEvent::Session {
            state: self.state_name().as_str().to_string(),
            resumed: last_seq.is_some() || !self.fresh || current > 0,
            last_seq: current,
            protocol: aishell_protocol::CLIENT_PROTOCOL_VERSION,
            user_id: self.user_id.clone(),
        };
        let mut frames = vec![(None, self.frame_json(session, true))];
        let lagging = Arc::new(Lagging::default());
        if let Some(after) = last_seq {
            let missed = self
                .events_between(after.min(current), current, CATCH_UP_BATCH)
                .await;
            if missed.last().is_some_and(|(s, _)| *s < current) {
                // Too much to replay at once: the connection pulls the rest.
                lagging
                    .flag
                    .store(true, std::sync::atomic::Ordering::Release);
                lagging.notify.notify_one();
            }
            frames.extend(missed.into_iter().map(|(s, j)| (Some(s), j)));
        }
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        self.clients.push(Client {
            conn_id,
            tx,
            lagging: lagging.clone(),
        });
        self.detached_at = None;
        if reply
            .send(AttachReply {
                frames,
                rx,
                lagging,
            })
            .is_err()
        {
            self.clients.retain(|c| c.conn_id != conn_id);
        }
        if self.shared.cfg.start_on_connect
            && self.task.is_none()
            && self.stopping.is_none()
            && self.store_reserved().await.is_ok()
        {
            self.start_task();
        }
    }

    /// Store the session if it is only reserved so far.
    async fn store_reserved(&mut self) -> Result<(), aishell_store::StoreError> {
        let Some(record) = self.reserved.take() else {
            return Ok(());
        };
        let result = store_session(self.shared.store.clone(), record, self.last_state).await;
        self.after_store_reserved(result)
    }

    /// Keep the record reserved again when storing it failed.
    fn after_store_reserved(
        &mut self,
        result: Result<(), (aishell_store::StoreError, SessionRecord)>,
    ) -> Result<(), aishell_store::StoreError> {
        result.map_err(|(e, record)| {
            tracing::error!(event = "store_error", sessionId = %self.id, error = %e, "could not store the session");
            self.reserved = Some(record);
            e
        })
    }

    /// Up to `limit` stored events with `after < seq <= upto`, in order:
    /// from the store for what memory no longer holds, then from memory.
    async fn events_between(&self, after: u64, upto: u64, limit: usize) -> Vec<(u64, Arc<str>)> {
        let mut out = Vec::new();
        let mem_start = self.replay.first_seq().unwrap_or(self.next_seq);
        let mut cursor = after;
        while cursor < upto && cursor + 1 < mem_start && out.len() < limit {
            let page = match self
                .shared
                .store
                .events_after(&self.id, cursor, REPLAY_PAGE)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(event = "replay_failed", sessionId = %self.id, error = %e, "could not read events for replay");
                    break;
                }
            };
            let before = cursor;
            for e in page
                .into_iter()
                .take_while(|e| e.seq < mem_start && e.seq <= upto)
            {
                cursor = e.seq;
                out.push((e.seq, Arc::from(e.json)));
            }
            if cursor == before {
                break;
            }
        }
        out.extend(self.replay.range(cursor, upto).cloned());
        out.truncate(limit);
        out
    }

    /// Next batch for a lagging client; when it reaches the live stream the
    /// client is switched back to pushed frames, in this same step, so no
    /// frame falls between the two.
    async fn catch_up(&mut self, conn_id: u64, after: u64) -> CatchUpBatch {
        let upto = self.delivered_seq;
        let frames = self.events_between(after, upto, CATCH_UP_BATCH).await;
        let caught_up = frames.last().is_none_or(|(s, _)| *s >= upto);
        if caught_up && let Some(c) = self.clients.iter().find(|c| c.conn_id == conn_id) {
            c.lagging
                .flag
                .store(false, std::sync::atomic::Ordering::Release);
        }
        CatchUpBatch { frames, caught_up }
    }

    fn detach(&mut self, conn_id: u64, reason: &str) {
        let before = self.clients.len();
        self.clients.retain(|c| c.conn_id != conn_id);
        if self.clients.len() == before {
            return;
        }
        tracing::info!(
            event = "task_lifecycle",
            phase = "ws_disconnect",
            sessionId = %self.id,
            userId = %self.user_id,
            traceId = %self.trace_id,
            processingState = self.processing_state(),
            reason = %reason,
            "client disconnected"
        );
        crate::metrics::disconnect(self.processing_state());
        if self.clients.is_empty() {
            self.detached_at = Some(Instant::now());
        }
    }

    async fn on_client(&mut self, conn_id: u64, frame: ClientFrame) {
        match frame {
            ClientFrame::Message {
                id,
                conversation_id,
                content,
            } => {
                self.on_message(conn_id, id, conversation_id, content).await;
            }
            ClientFrame::Abort { conversation_id } => {
                self.send_to_agent(AgentInput::Abort {
                    conversation_id: conversation_id.clone(),
                });
                // Queued messages of that conversation will not run either.
                self.queue.retain(|m| {
                    conversation_id
                        .as_ref()
                        .is_some_and(|c| *c != m.conversation_id)
                });
            }
            ClientFrame::AnswerQuestion { request_id, answer } => {
                self.questions.remove(&request_id);
                self.send_to_agent(AgentInput::AnswerQuestion { request_id, answer });
            }
            ClientFrame::ListConversations => {
                let conversations = match self.shared.store.list_conversations(&self.id).await {
                    Ok(list) => list
                        .into_iter()
                        .map(|c| ConversationSummary {
                            conversation_id: c.id,
                            title: c.title,
                            created_at: rfc3339(c.created_at),
                            updated_at: rfc3339(c.updated_at),
                        })
                        .collect(),
                    Err(e) => {
                        self.reply(
                            conn_id,
                            ServerEvent::error(
                                ErrorCode::Internal,
                                format!("could not list conversations: {e}"),
                            ),
                        );
                        return;
                    }
                };
                self.reply(conn_id, ServerEvent::Conversations { conversations });
            }
            ClientFrame::ResetConversation { conversation_id } => {
                self.send_to_agent(AgentInput::ResetConversation { conversation_id });
            }
            ClientFrame::DeleteConversation { conversation_id } => {
                if let Err(e) = self
                    .shared
                    .store
                    .delete_conversation(&self.id, &conversation_id)
                    .await
                {
                    tracing::error!(event = "store_error", sessionId = %self.id, error = %e, "could not delete conversation");
                }
                self.send_to_agent(AgentInput::DeleteConversation { conversation_id });
            }
            ClientFrame::Ping { id } => {
                self.reply(conn_id, ServerEvent::Agent(AgentEvent::Pong { id }))
            }
            // The store keeps events for replay; the memory buffer is bounded anyway.
            ClientFrame::Ack { .. } => {}
            // Handled by the connection, which owns the credentials.
            ClientFrame::UpdateToken { .. } => {}
        }
    }

    async fn on_message(
        &mut self,
        conn_id: u64,
        id: Option<String>,
        conversation_id: Option<String>,
        content: String,
    ) {
        let received_at = Instant::now();
        let conversation_id = match conversation_id {
            Some(c) if validate_conversation_id(&c) => c,
            Some(_) => {
                self.reply(
                    conn_id,
                    ServerEvent::error(
                        ErrorCode::BadFrame,
                        "conversation_id may only contain letters, digits, - and _ (at most 128)",
                    ),
                );
                return;
            }
            None => format!("c-{}", uuid::Uuid::new_v4().simple()),
        };
        if let Some(mid) = id.as_deref().filter(|m| self.seen_message_ids.contains(*m)) {
            self.reply_duplicate(conn_id, mid);
            return;
        }
        // A new task is claimed (or launched) before the message's write
        // commits, so the two overlap; the message is queued for the task
        // only once stored. A write that fails (or finds the message stored
        // already, after a gateway restart) leaves a started task idle (the
        // idle timer stops it), never a message lost or run twice.
        let quota_message = if self.task.is_none() {
            self.weekly_quota_exceeded().await
        } else {
            None
        };
        // A reserved session is stored now, with its first message. Its
        // write is handed to the store first (the writer runs writes in
        // the order they reach it) and commits in the same group as the
        // task's binding and the message, instead of one commit earlier.
        let store_session = self
            .reserved
            .take()
            .map(|record| store_session(self.shared.store.clone(), record, self.last_state));
        let record = MessageRecord {
            session_id: self.id.clone(),
            conversation_id: conversation_id.clone(),
            client_msg_id: id.clone(),
            role: "user".into(),
            content: content.clone(),
            created_at: OffsetDateTime::now_utc(),
        };
        let store = self.shared.store.clone();
        let start_and_insert = async {
            if self.task.is_none() && quota_message.is_none() && self.stopping.is_none() {
                self.start_task();
            }
            // One write stores the conversation (if new) and the message.
            store.insert_message(&record).await
        };
        let (stored_session, inserted) = match store_session {
            Some(create) => {
                let (created, inserted) = tokio::join!(create, start_and_insert);
                (Some(created), inserted)
            }
            None => (None, start_and_insert.await),
        };
        if let Some(created) = stored_session
            && let Err(e) = self.after_store_reserved(created)
        {
            self.reply(
                conn_id,
                ServerEvent::error(
                    ErrorCode::Internal,
                    format!("could not save your session: {e}"),
                ),
            );
            return;
        }
        match inserted {
            Ok(true) => {}
            Ok(false) => {
                // Accepted before (perhaps by a gateway before a restart).
                if let Some(mid) = id {
                    self.reply_duplicate(conn_id, &mid);
                    self.seen_message_ids.insert(mid);
                }
                return;
            }
            Err(e) => {
                self.reply(
                    conn_id,
                    ServerEvent::error(
                        ErrorCode::Internal,
                        format!("could not save your message: {e}"),
                    ),
                );
                return;
            }
        }
        if let Some(mid) = id.clone() {
            self.seen_message_ids.insert(mid);
        }
        let msg = QueuedMessage {
            conversation_id,
            content,
            message_id: id,
            received_at,
            crashes: 0,
        };
        if let Some(message) = quota_message {
            // Nothing was started; the message is kept and runs once allowed.
            self.queue.push_back(msg);
            self.emit(ServerEvent::error(ErrorCode::QuotaExceeded, message));
            return;
        }
        if self.accepts_messages() {
            self.dispatch(msg);
        } else {
            self.queue.push_back(msg);
            if self.task.is_none() && self.stopping.is_some() {
                // Class 3: never bind to the dying task; start once it is gone.
                self.start_after_stop = true;
            }
        }
    }

    fn reply_duplicate(&self, conn_id: u64, message_id: &str) {
        let message = format!("message {message_id} was already accepted; not running it again");
        self.reply(conn_id, ServerEvent::Agent(AgentEvent::Info { message }));
    }

    /// Send a message to the ready agent and count the turn.
    fn dispatch(&mut self, msg: QueuedMessage) {
        self.output.turn_started(self.turns.is_empty());
        self.turns
            .entry(msg.conversation_id.clone())
            .or_default()
            .push_back(Turn {
                message: msg.clone(),
                first_event_seen: false,
                reply: String::new(),
            });
        // `accepts_messages` was checked: possibly before `ready`.
        self.send_agent_input(AgentInput::Message {
            conversation_id: msg.conversation_id,
            content: msg.content,
            message_id: msg.message_id,
        });
    }

    /// Whether a message may go to the task now. Once it is ready, yes. On
    /// a first start, also while the agent is activating: the runner writes
    /// messages to the agent right behind its `init`, so the agent begins as
    /// soon as it is up instead of after a round trip through the gateway
    /// (its `ready` still reaches us first). A restart waits for `ready`,
    /// because the conversations must be restored before any message.
    fn accepts_messages(&self) -> bool {
        self.task.as_ref().is_some_and(|t| match t.phase {
            Phase::Ready => true,
            Phase::Activating => !t.is_restart && t.runner.is_some(),
            _ => false,
        })
    }

    /// Send the queued messages, in order, if the task takes them now.
    fn dispatch_queued(&mut self) {
        while self.accepts_messages()
            && let Some(msg) = self.queue.pop_front()
        {
            self.dispatch(msg);
        }
    }

    /// Before `ready` no agent has begun a message: put the ones sent
    /// ahead of it back at the front of the queue, in order, for the next
    /// task (or the same one, re-initialised).
    fn requeue_early_turns(&mut self) {
        let messages = self.take_turns().into_iter().map(|t| t.message).collect();
        self.requeue_front(messages);
    }

    /// Every turn in flight, oldest first; `turns` is left empty.
    fn take_turns(&mut self) -> Vec<Turn> {
        let mut turns: Vec<Turn> = self.turns.drain().flat_map(|(_, t)| t).collect();
        turns.sort_by_key(|t| t.message.received_at);
        turns
    }

    /// Put `messages` (oldest first) back at the front of the queue.
    fn requeue_front(&mut self, messages: Vec<QueuedMessage>) {
        for msg in messages.into_iter().rev() {
            self.queue.push_front(msg);
        }
    }

    /// Agent input other than messages goes to a ready task only.
    fn send_to_agent(&mut self, frame: AgentInput) {
        if self.task.as_ref().is_some_and(|t| t.phase == Phase::Ready) {
            self.send_agent_input(frame);
        }
    }

    /// Number and keep an agent input, and send it if the runner is
    /// connected (else it goes out when the runner re-dials).
    fn send_agent_input(&mut self, frame: AgentInput) {
        if let Some(task) = self.task.as_mut() {
            let numbered = task.inputs.record(frame);
            self.send_to_runner(numbered);
        }
    }

    fn send_to_runner(&self, frame: GatewayToRunner) {
        if let Some(link) = self.task.as_ref().and_then(|t| t.runner.as_ref()) {
            let _ = link.tx.send(frame);
        }
    }

    // ---- task start ----------------------------------------------------

    /// Obtain a task: a warm claim when the pool has one, else a cold launch.
    fn start_task(&mut self) {
        let now = Instant::now();
        let is_restart = self.ever_ready || !self.fresh;
        self.session_started_at.get_or_insert(now);
        self.last_runner_seq = 0;
        self.bound_task = None;
        let deadlines = self.shared.cfg.deadlines.clone();
        let cfg = &self.shared.cfg;
        let (running, warm) = self.shared.tasks_of(&self.user_id);
        if running >= cfg.max_tasks_per_user {
            let message = format!(
                "you already have {running} sandboxes running (limit {}); wait for one to go idle or stop it, then send your message again",
                cfg.max_tasks_per_user
            );
            tracing::warn!(event = "quota_exceeded", sessionId = %self.id, userId = %self.user_id, running, "task quota reached");
            self.emit(ServerEvent::error(ErrorCode::QuotaExceeded, message));
            return;
        }
        if let Err(e) = self.shared.backend.prepare_workspace(&self.user_id) {
            self.emit(ServerEvent::error(
                ErrorCode::TaskStartFailed,
                format!("could not prepare your workspace: {e}"),
            ));
            return;
        }
        let cold_queue = self
            .shared
            .queued_starts
            .load(std::sync::atomic::Ordering::Relaxed);
        let pool = self.shared.pool.clone();
        // One user cannot drain the pool: past the cap their starts go cold.
        let may_claim = pool.enabled() && warm < cfg.max_warm_claims_per_user;
        let claimed = if may_claim {
            pool.claim(self.own_handle())
        } else {
            None
        };
        if claimed.is_none() && cold_queue >= cfg.max_queued_starts {
            let message = format!(
                "the gateway is starting {cold_queue} sandboxes already; retry in a few seconds"
            );
            self.emit(ServerEvent::error(ErrorCode::Overloaded, message));
            return;
        }
        if pool.enabled() {
            let action = if claimed.is_some() {
                "claim_hit"
            } else {
                "claim_miss"
            };
            lifecycle!(self, "warm_pool", action = action, "warm pool claim");
        }
        let (task_id, source, phase, runner) = match claimed {
            Some(c) => {
                let link = RunnerLink {
                    generation: c.generation,
                    tx: c.tx,
                };
                (
                    c.task_id,
                    TaskSource::Warm,
                    Phase::Activating,
                    Some((link, c.took)),
                )
            }
            None => (
                format!("t-{}", uuid::Uuid::new_v4().simple()),
                TaskSource::Cold,
                Phase::Launching,
                None,
            ),
        };
        let mut breakdown = Vec::new();
        if let Some((_, took)) = &runner {
            breakdown.push(("claim", ms(*took)));
        }
        self.task = Some(Task {
            id: task_id.clone(),
            source,
            phase,
            is_restart,
            adopted: false,
            requested_at: now,
            phase_started: now,
            phase_deadline: Some(
                now + if runner.is_some() {
                    deadlines.activate
                } else {
                    deadlines.launch
                },
            ),
            overall_deadline: is_restart.then(|| now + deadlines.restart),
            breakdown,
            runner: None,
            runner_lost_at: None,
            agent: AgentInfo::default(),
            agent_prestarted: false,
            inputs: InputLog::default(),
            watch: CancellationToken::new(),
        });
        let owner = crate::TaskOwner::new(&self.id, &self.user_id, source == TaskSource::Warm);
        self.shared
            .tasks
            .lock()
            .expect("task map")
            .insert(task_id.clone(), owner);
        self.bind_task(Some(&task_id));
        let eta_ms = if runner.is_some() {
            50
        } else {
            self.cold_eta_ms()
        };
        self.emit(ServerEvent::Status {
            state: if is_restart {
                TaskPhase::Restarting
            } else {
                TaskPhase::Starting
            },
            source: Some(source),
            eta_ms: Some(eta_ms),
        });
        if let Some((link, _)) = runner {
            // Warm: the runner is connected and waiting; bind it to this user.
            if let Some(task) = self.task.as_mut() {
                task.runner = Some(link);
            }
            self.send_init_user();
            self.dispatch_queued();
            return;
        }
        let spec = LaunchSpec {
            task_id: task_id.clone(),
            mode: "cold".into(),
            session_id: Some(self.id.clone()),
            gateway_url: self.shared.runner_url.clone(),
            credential: self.shared.credentials.mint(
                &task_id,
                "cold",
                Some(&self.id),
                self.shared.cfg.runner_credential_ttl,
            ),
            env: Default::default(),
        };
        let backend = self.shared.backend.clone();
        let slots = self.shared.launch_slots.clone();
        let tx = self.self_tx.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            // Bursts queue for a launch slot instead of failing.
            shared
                .queued_starts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _slot = slots.acquire_owned().await;
            shared
                .queued_starts
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            let started = Instant::now();
            let result = backend
                .launch(spec)
                .await
                .map(|_| started.elapsed())
                .map_err(|e| e.to_string());
            let _ = tx.send(SessionCmd::Launched { task_id, result }).await;
        });
    }

    /// A handle to this actor, for whoever must route frames to it.
    fn own_handle(&self) -> super::SessionHandle {
        super::SessionHandle {
            id: self.id.clone(),
            user_id: self.user_id.clone(),
            tx: self.self_tx.clone(),
        }
    }

    /// Estimate for `status.eta_ms`: a cold start on this backend.
    fn cold_eta_ms(&self) -> u64 {
        match self.shared.backend.name() {
            "process" => 300,
            "docker" => 1500,
            _ => 10_000,
        }
    }

    async fn on_launched(&mut self, task_id: &str, result: Result<Duration, String>) {
        let Some(task) = self.task.as_mut().filter(|t| t.id == task_id) else {
            // A launch that finished after we gave up on it: clean it up.
            if result.is_ok() {
                self.stop_in_background(task_id.to_string());
            }
            return;
        };
        match result {
            Ok(took) => {
                task.breakdown.push(("launch", ms(took)));
                lifecycle!(self, "task_start", taskId = %task_id, duration_ms = ms(took), source = "cold", "backend launched task");
                crate::metrics::phase("task_start", Some("cold"), took);
                if let Some(task) = self.task.as_ref().filter(|t| t.phase == Phase::Launching) {
                    self.watch_status(task.id.clone(), task.watch.clone());
                }
            }
            Err(reason) => {
                self.fail_start(format!(
                    "the {} backend could not launch a sandbox: {reason}",
                    self.shared.backend.name()
                ))
                .await;
            }
        }
    }

    /// Poll the backend until the task runs or ends (launched → running), and
    /// keep watching until the runner connects, so a task that dies before
    /// dialling back fails fast instead of waiting for the connect deadline.
    fn watch_status(&self, task_id: String, watch: CancellationToken) {
        let backend = self.shared.backend.clone();
        let tx = self.self_tx.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(20);
            loop {
                let status = tokio::select! {
                    s = backend.status(&task_id) => s.map_err(|e| e.to_string()),
                    _ = watch.cancelled() => return,
                };
                let done = !matches!(status, Ok(TaskStatus::Pending | TaskStatus::Running));
                if tx
                    .send(SessionCmd::Observed {
                        task_id: task_id.clone(),
                        status,
                    })
                    .await
                    .is_err()
                    || done
                {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = watch.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        });
    }

    async fn on_observed(&mut self, task_id: &str, status: Result<TaskStatus, String>) {
        let Some(task) = self.task.as_mut().filter(|t| t.id == task_id) else {
            return;
        };
        match status {
            Ok(TaskStatus::Pending) => {}
            Ok(TaskStatus::Running) => {
                if task.phase == Phase::Launching {
                    let now = Instant::now();
                    let took = now - task.phase_started;
                    task.breakdown.push(("pending", ms(took)));
                    task.phase = Phase::Pending;
                    task.phase_started = now;
                    task.phase_deadline = Some(now + self.shared.cfg.deadlines.connect);
                    lifecycle!(self, "task_pending", taskId = %task_id, duration_ms = ms(took), "task is running");
                    crate::metrics::phase("task_pending", None, took);
                }
                if task.runner_lost_at.is_some() {
                    // Runner socket dropped but the task lives: wait for a re-dial.
                }
            }
            Ok(TaskStatus::Exited { code, reason }) => {
                let why = format!(
                    "the sandbox exited ({reason}{})",
                    code.map(|c| format!(", code {c}")).unwrap_or_default()
                );
                self.on_task_lost(why).await;
            }
            Ok(TaskStatus::NotFound) => {
                self.on_task_lost("the backend no longer knows this sandbox".into())
                    .await;
            }
            Err(reason) => {
                // Class 1: a failing status call is a failure, never swallowed.
                let why = format!(
                    "the {} backend could not report the sandbox's status: {reason}",
                    self.shared.backend.name()
                );
                if self.task.as_ref().is_some_and(|t| t.phase != Phase::Ready) {
                    self.fail_start(why).await;
                } else {
                    self.on_task_lost(why).await;
                }
            }
        }
    }

    async fn on_runner_connected(&mut self, attach: RunnerAttach) -> Result<(), String> {
        let now = Instant::now();
        let connect_deadline = self.shared.cfg.deadlines.activate;
        // Only the task the store says this session is bound to may re-attach.
        let bound = self
            .bound_task
            .as_ref()
            .is_some_and(|(t, _)| *t == attach.task_id);
        if self.task.is_none()
            && self.stopping.is_none()
            && attach.agent_running
            && attach.session_hint.as_deref() == Some(&self.id)
            && bound
        {
            // A runner that survived a gateway restart re-attaches: adopt it.
            self.adopt(attach);
            return Ok(());
        }
        let Some(task) = self.task.as_mut().filter(|t| t.id == attach.task_id) else {
            return Err(format!(
                "task {} is not this session's current task",
                attach.task_id
            ));
        };
        let link = RunnerLink {
            generation: attach.generation,
            tx: attach.tx,
        };
        match task.phase {
            Phase::Launching | Phase::Pending => {
                if task.phase == Phase::Launching {
                    // The runner can dial before the first status poll says "running".
                    let took = now - task.phase_started;
                    task.breakdown.push(("pending", ms(took)));
                    lifecycle!(self, "task_pending", taskId = %attach.task_id, duration_ms = ms(took), "task is running");
                    crate::metrics::phase("task_pending", None, took);
                }
                let took = now - task.phase_started;
                task.breakdown.push(("connect", ms(took)));
                task.phase = Phase::Activating;
                task.phase_started = now;
                task.phase_deadline = Some(now + connect_deadline);
                task.runner = Some(link);
                task.watch.cancel();
                lifecycle!(self, "task_connect", taskId = %attach.task_id, duration_ms = ms(took), "runner connected");
                crate::metrics::phase("task_connect", None, took);
                self.send_init_user();
                self.dispatch_queued();
            }
            _ => {
                // A re-dial (network blip, gateway restart): swap the socket;
                // the generation makes the old socket's close harmless.
                task.runner = Some(link);
                task.runner_lost_at = None;
                tracing::info!(event = "runner_reattached", sessionId = %self.id, taskId = %attach.task_id, "runner re-attached");
                if attach.agent_running {
                    // What the old socket (or none) swallowed goes again.
                    let resend = task.inputs.resend_after(attach.inputs_received);
                    if !resend.is_empty() {
                        tracing::info!(event = "runner_inputs_resent", sessionId = %self.id, taskId = %attach.task_id, count = resend.len(), "agent inputs sent again after a re-dial");
                    }
                    for frame in resend {
                        self.send_to_runner(frame);
                    }
                } else if task.phase == Phase::Activating {
                    task.inputs.clear();
                    // It never ran `init_user`, so not the messages behind it.
                    self.requeue_early_turns();
                    self.send_init_user();
                    self.dispatch_queued();
                }
            }
        }
        Ok(())
    }

    fn adopt(&mut self, attach: RunnerAttach) {
        let now = Instant::now();
        // Frames the runner resends that were already stored are dropped.
        self.last_runner_seq = self.bound_task.take().map_or(0, |(_, seq)| seq);
        tracing::info!(event = "task_adopted", sessionId = %self.id, taskId = %attach.task_id, "adopted a running task after a gateway restart");
        let owner = crate::TaskOwner::new(&self.id, &self.user_id, false);
        self.shared
            .tasks
            .lock()
            .expect("task map")
            .insert(attach.task_id.clone(), owner);
        self.task = Some(Task {
            id: attach.task_id,
            source: TaskSource::Cold,
            phase: Phase::Activating,
            is_restart: false,
            adopted: true,
            requested_at: now,
            phase_started: now,
            phase_deadline: Some(now + self.shared.cfg.deadlines.activate),
            overall_deadline: None,
            breakdown: Vec::new(),
            runner: Some(RunnerLink {
                generation: attach.generation,
                tx: attach.tx,
            }),
            runner_lost_at: None,
            agent: AgentInfo::default(),
            agent_prestarted: false,
            inputs: InputLog::continuing_from(attach.inputs_received),
            watch: CancellationToken::new(),
        });
        self.session_started_at.get_or_insert(now);
    }

    fn send_init_user(&self) {
        self.send_to_runner(GatewayToRunner::InitUser {
            user_id: self.user_id.clone(),
            session_id: self.id.clone(),
            workspace: self.shared.backend.workspace_path(&self.user_id),
            trace_id: Some(self.trace_id.clone()),
            settings: self.shared.runner_settings(),
        });
    }

    async fn on_runner_frame(&mut self, frame: RunnerToGateway) {
        match frame {
            RunnerToGateway::Heartbeat { inputs_received } => {
                if let Some(task) = self.task.as_mut() {
                    task.inputs.acknowledge(inputs_received);
                }
            }
            RunnerToGateway::Hello { .. } | RunnerToGateway::Prepared { .. } => {}
            RunnerToGateway::Ready {
                agent,
                agent_start_ms,
                prestarted,
            } => self.on_agent_ready(agent, agent_start_ms, prestarted).await,
            RunnerToGateway::Restored { count } => {
                if let Some(task) = self.task.as_mut().filter(|t| t.phase == Phase::Restoring) {
                    task.breakdown
                        .push(("restore", ms(task.phase_started.elapsed())));
                    self.become_ready(Some(count));
                }
            }
            RunnerToGateway::Agent { seq, frame } => {
                if seq <= self.last_runner_seq {
                    return; // resent after a re-dial; already handled
                }
                self.last_runner_seq = seq;
                self.on_agent_event(frame, seq).await;
            }
            RunnerToGateway::AgentStderr { line } => {
                let turn_running = !self.turns.is_empty();
                if let Some(line) = self.held_stderr.hold(line, turn_running) {
                    self.log_stderr(&[line], super::agent_stderr::Outcome::Ok);
                }
            }
            RunnerToGateway::AgentExit {
                code,
                signal,
                stderr_tail,
            } => {
                let mut why = match (code, signal) {
                    (_, Some(s)) => format!("the agent was killed by signal {s}"),
                    (Some(c), _) => format!("the agent exited with code {c}"),
                    _ => "the agent exited".to_string(),
                };
                if let Some(last) = stderr_tail.lines().rev().find(|l| !l.trim().is_empty()) {
                    why.push_str(&format!(
                        " (last stderr: {})",
                        last.chars().take(300).collect::<String>()
                    ));
                }
                let outcome = if code == Some(0) && signal.is_none() {
                    super::agent_stderr::Outcome::Ok
                } else {
                    super::agent_stderr::Outcome::Failed
                };
                let held = self.held_stderr.take();
                self.log_stderr(&held, outcome);
                tracing::warn!(event = "agent_exit", sessionId = %self.id, userId = %self.user_id, traceId = %self.trace_id, code = ?code, signal = ?signal, stderr_tail = %stderr_tail, "agent exited");
                self.on_task_lost(why).await;
            }
            RunnerToGateway::StartFailed { message } => {
                self.fail_start(format!("the sandbox could not start the agent: {message}"))
                    .await;
            }
        }
    }

    fn log_stderr(&self, lines: &[String], outcome: super::agent_stderr::Outcome) {
        super::agent_stderr::log_all(&self.id, &self.user_id, &self.trace_id, lines, outcome);
    }

    async fn on_agent_ready(
        &mut self,
        agent: AgentInfo,
        agent_start_ms: Option<u64>,
        prestarted: bool,
    ) {
        let restore = match self.task.as_ref() {
            // Only a replacement task needs the session's conversations; a
            // first start has nothing to restore, an adopted one kept its state.
            Some(t) if t.phase == Phase::Activating => t.is_restart && !t.adopted,
            Some(t) if t.phase == Phase::Ready => {
                return; // a re-dialled runner repeats `ready`
            }
            _ => return,
        };
        let conversations = if restore {
            match self.shared.store.list_conversations(&self.id).await {
                Ok(list) => list
                    .into_iter()
                    .map(|c| ConversationRef {
                        conversation_id: c.id,
                        resume_handle: c.resume_handle,
                    })
                    .collect::<Vec<_>>(),
                Err(e) => {
                    self.fail_start(format!("could not load your conversations: {e}"))
                        .await;
                    return;
                }
            }
        } else {
            Vec::new()
        };
        let now = Instant::now();
        let restore_deadline = self.shared.cfg.deadlines.activate;
        let task = self.task.as_mut().expect("checked above");
        // `init`: workspace and spawn; `agent_ready`: the agent's own start.
        let activating = ms(now - task.phase_started);
        let agent_ms = agent_start_ms.unwrap_or(activating).min(activating);
        task.breakdown.push(("init", activating - agent_ms));
        task.breakdown.push(("agent_ready", agent_ms));
        task.agent = agent;
        task.agent_prestarted = prestarted;
        if conversations.is_empty() {
            self.become_ready(None);
        } else {
            task.phase = Phase::Restoring;
            task.phase_started = now;
            task.phase_deadline = Some(now + restore_deadline);
            if let Some(link) = &task.runner {
                let _ = link
                    .tx
                    .send(GatewayToRunner::RestoreConversations { conversations });
            }
        }
    }

    /// A sentence for the user when their weekly sandbox hours are used up.
    async fn weekly_quota_exceeded(&self) -> Option<String> {
        let limit_hours = self.shared.cfg.max_hours_per_week?;
        let week_ago = OffsetDateTime::now_utc() - time::Duration::days(7);
        let used = match self
            .shared
            .store
            .usage_since(week_ago, Some(&self.user_id))
            .await
        {
            Ok(rows) => rows.first().map_or(0, |r| r.seconds),
            Err(e) => {
                tracing::error!(event = "store_error", sessionId = %self.id, error = %e, "could not read usage; not enforcing the weekly quota");
                return None;
            }
        };
        let used_hours = used as f64 / 3600.0;
        (used_hours >= limit_hours).then(|| {
            tracing::warn!(event = "quota_exceeded", sessionId = %self.id, userId = %self.user_id, used_hours, "weekly hours used up");
            format!("you have used {used_hours:.1} of your {limit_hours} sandbox hours this week; try again later")
        })
    }

    fn become_ready(&mut self, restored: Option<u32>) {
        let now = Instant::now();
        let Some(task) = self.task.as_mut() else {
            return;
        };
        if !task.adopted {
            let _ = self.persist_tx.send(PersistItem::Usage(Usage::Start {
                task_id: task.id.clone(),
                user_id: self.user_id.clone(),
            }));
        }
        task.phase = Phase::Ready;
        task.phase_deadline = None;
        task.overall_deadline = None;
        task.watch.cancel();
        let total = now - task.requested_at;
        let breakdown = serde_json::to_string(
            &task
                .breakdown
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                .collect::<serde_json::Map<_, _>>(),
        )
        .unwrap_or_default();
        let (task_id, source, is_restart, adopted, agent, prestarted) = (
            task.id.clone(),
            task.source,
            task.is_restart,
            task.adopted,
            task.agent.clone(),
            task.agent_prestarted,
        );
        if !adopted {
            lifecycle!(self, "task_ready", taskId = %task_id, duration_ms = ms(total), source = source.as_str(), breakdown = %breakdown, agentPrestarted = prestarted, "task ready");
            crate::metrics::phase("task_ready", Some(source.as_str()), total);
            if is_restart {
                lifecycle!(self, "task_restart", taskId = %task_id, duration_ms = ms(total), success = true, "task restarted");
                crate::metrics::phase("task_restart", Some("success"), total);
            }
            if !self.ever_ready {
                let since = self.session_started_at.unwrap_or(now);
                lifecycle!(self, "session_create", taskId = %task_id, duration_ms = ms(now - since), "session ready");
                crate::metrics::phase("session_create", None, now - since);
            }
        }
        self.ever_ready = true;
        self.idle_since = now;
        if !adopted {
            self.emit(ServerEvent::Agent(AgentEvent::Init(agent)));
            self.emit(ServerEvent::Status {
                state: TaskPhase::Ready,
                source: Some(source),
                eta_ms: None,
            });
        }
        if let Some(count) = restored.filter(|_| is_restart) {
            self.emit(ServerEvent::SessionRecovered { restored: count });
        } else if is_restart && !adopted {
            self.emit(ServerEvent::SessionRecovered { restored: 0 });
        }
        self.dispatch_queued();
    }

    // ---- agent output --------------------------------------------------

    async fn on_agent_event(&mut self, frame: AgentEvent, runner_seq: u64) {
        let now = Instant::now();
        let mut size = output::json_len(&frame);
        let frame = if size > MAX_EVENT_BYTES {
            tracing::warn!(event = "agent_event_cut", sessionId = %self.id, bytes = size, limit = MAX_EVENT_BYTES, "agent event over the size limit cut");
            let cut = output::fit_event(frame, MAX_EVENT_BYTES);
            size = output::json_len(&cut);
            output::release_freed_memory();
            cut
        } else {
            frame
        };
        let ends_turn = matches!(frame, AgentEvent::Finish { .. } | AgentEvent::Error { .. })
            && frame
                .conversation_id()
                .is_some_and(|cid| self.turns.contains_key(cid));
        if let Admit::Drop { notify } = self.output.admit(size, ends_turn) {
            if notify {
                let cap = self.shared.cfg.max_turn_output_bytes;
                tracing::warn!(event = "agent_output_truncated", sessionId = %self.id, userId = %self.user_id, limit = cap, "agent output over the per-turn cap; the rest of the turn is dropped");
                let message = format!(
                    "the agent's output passed {cap} bytes for this turn; the rest of it is not stored or shown (the turn goes on)"
                );
                // Carries the runner seq: the runner may forget what was dropped.
                self.emit_with_runner_seq(
                    ServerEvent::Agent(AgentEvent::Info { message }),
                    Some(runner_seq),
                );
            }
            return;
        }
        if let Some(cid) = frame.conversation_id().map(str::to_string) {
            let mut finished_turn = None;
            if let Some(turns) = self.turns.get_mut(&cid) {
                if let Some(turn) = turns.front_mut() {
                    if !turn.first_event_seen {
                        turn.first_event_seen = true;
                        let took = now - turn.message.received_at;
                        lifecycle!(self, "message_roundtrip", conversationId = %cid, duration_ms = ms(took), "first agent event");
                        crate::metrics::phase("message_roundtrip", None, took);
                    }
                    match &frame {
                        AgentEvent::TextDelta { delta, .. }
                            if turn.reply.len() < MAX_STORED_REPLY =>
                        {
                            turn.reply.push_str(delta)
                        }
                        AgentEvent::Content { content, .. } if turn.reply.is_empty() => {
                            turn.reply.push_str(content)
                        }
                        _ => {}
                    }
                }
                if matches!(frame, AgentEvent::Finish { .. } | AgentEvent::Error { .. }) {
                    let outcome = if matches!(frame, AgentEvent::Error { .. }) {
                        super::agent_stderr::Outcome::Failed
                    } else {
                        super::agent_stderr::Outcome::Ok
                    };
                    let held = self.held_stderr.take();
                    super::agent_stderr::log_all(
                        &self.id,
                        &self.user_id,
                        &self.trace_id,
                        &held,
                        outcome,
                    );
                    finished_turn = turns.pop_front();
                    if turns.is_empty() {
                        self.turns.remove(&cid);
                    }
                }
            }
            if let Some(turn) = finished_turn {
                self.store_reply(&cid, turn.reply).await;
                if self.turns.is_empty() {
                    self.idle_since = now;
                    self.questions.clear();
                }
            }
        }
        match &frame {
            AgentEvent::AskQuestion { request_id, .. } => {
                self.questions.insert(request_id.clone());
            }
            AgentEvent::ConversationUpdate {
                conversation_id,
                title,
                resume_handle,
            } => {
                if let Err(e) = self
                    .shared
                    .store
                    .upsert_conversation(
                        &self.id,
                        conversation_id,
                        title.as_deref(),
                        resume_handle.as_deref(),
                    )
                    .await
                {
                    tracing::error!(event = "store_error", sessionId = %self.id, error = %e, "could not save conversation update");
                }
            }
            _ => {}
        }
        self.emit_with_runner_seq(ServerEvent::Agent(frame), Some(runner_seq));
    }

    async fn store_reply(&self, conversation_id: &str, reply: String) {
        if reply.is_empty() {
            return;
        }
        let record = MessageRecord {
            session_id: self.id.clone(),
            conversation_id: conversation_id.to_string(),
            client_msg_id: None,
            role: "assistant".into(),
            content: reply,
            created_at: OffsetDateTime::now_utc(),
        };
        if let Err(e) = self.shared.store.insert_message(&record).await {
            tracing::error!(event = "store_error", sessionId = %self.id, error = %e, "could not save the agent's reply");
        }
    }

    // ---- failures and stops --------------------------------------------

    /// A start failed: tell the client with a stable code, clean the task up.
    /// Queued messages are kept and run on the next successful start.
    async fn fail_start(&mut self, reason: String) {
        let Some(task) = self.task.as_ref() else {
            return;
        };
        let (code, verb) = if task.is_restart {
            (ErrorCode::TaskRestartFailed, "restart")
        } else {
            (ErrorCode::TaskStartFailed, "start")
        };
        self.fail_start_with(
            code,
            &format!("could not {verb} your sandbox: {reason}. Send your message again to retry."),
        )
        .await;
    }

    async fn fail_start_with(&mut self, code: ErrorCode, message: &str) {
        let Some(task) = self.task.as_ref() else {
            return;
        };
        let (task_id, is_restart, took) = (
            task.id.clone(),
            task.is_restart,
            task.requested_at.elapsed(),
        );
        tracing::error!(event = "task_start_failed", sessionId = %self.id, userId = %self.user_id, traceId = %self.trace_id, taskId = %task_id, code = code.as_str(), duration_ms = ms(took), reason = %message, "task start failed");
        self.requeue_early_turns();
        if is_restart {
            lifecycle!(self, "task_restart", taskId = %task_id, duration_ms = ms(took), success = false, "task restart failed");
            crate::metrics::phase("task_restart", Some("failure"), took);
        }
        self.emit(ServerEvent::error(code, message));
        self.emit(ServerEvent::Status {
            state: TaskPhase::Stopped,
            source: None,
            eta_ms: None,
        });
        self.begin_stop("start failed");
    }

    /// The task died or became unreachable.
    async fn on_task_lost(&mut self, why: String) {
        let Some(task) = self.task.as_ref() else {
            return;
        };
        if task.phase != Phase::Ready {
            self.fail_start(why).await;
            return;
        }
        let busy = !self.turns.is_empty();
        tracing::warn!(event = "task_lost", sessionId = %self.id, userId = %self.user_id, traceId = %self.trace_id, taskId = %task.id, processingState = self.processing_state(), reason = %why, "task lost");
        if busy {
            // Turns the agent had not started run again on the next task.
            self.end_turns(
                ErrorCode::AgentCrashed,
                &format!("{why}. Your next message will start a new sandbox and resume."),
                true,
            );
        }
        self.emit(ServerEvent::Status {
            state: TaskPhase::Stopped,
            source: None,
            eta_ms: None,
        });
        self.begin_stop("task lost");
        if !self.queue.is_empty() {
            self.start_after_stop = true;
        }
    }

    /// End every turn in flight with an error frame naming its conversation.
    fn fail_turns(&mut self, code: ErrorCode, message: &str) {
        self.end_turns(code, message, false);
    }

    /// End the turns in flight: one error frame per turn, oldest first; with
    /// `requeue_unstarted`, turns that produced no agent event yet go back to
    /// the front of the queue instead (the agent never began them).
    fn end_turns(&mut self, code: ErrorCode, message: &str, requeue_unstarted: bool) {
        let mut requeue = Vec::new();
        for mut turn in self.take_turns() {
            if requeue_unstarted && !turn.first_event_seen && turn.message.crashes == 0 {
                turn.message.crashes += 1;
                requeue.push(turn.message);
                continue;
            }
            let message = if requeue_unstarted && !turn.first_event_seen {
                format!(
                    "{message} (this message was tried twice and the agent died both times without answering; it will not be retried)"
                )
            } else {
                message.to_string()
            };
            self.emit(ServerEvent::Agent(AgentEvent::Error {
                conversation_id: Some(turn.message.conversation_id),
                error: aishell_protocol::ErrorBody::new(code, &message),
            }));
        }
        self.requeue_front(requeue);
        self.questions.clear();
        self.idle_since = Instant::now();
    }

    /// Stop the current task in the background; STOPPING until it is gone.
    fn begin_stop(&mut self, reason: &str) {
        let Some(task) = self.task.take() else { return };
        self.bind_task(None);
        let _ = self.persist_tx.send(PersistItem::Usage(Usage::End {
            task_id: task.id.clone(),
        }));
        task.watch.cancel();
        if let Some(link) = &task.runner {
            let _ = link.tx.send(GatewayToRunner::Shutdown {
                reason: reason.to_string(),
            });
        }
        self.stopping = Some(Stopping {
            task_id: task.id.clone(),
            since: Instant::now(),
        });
        self.stop_in_background(task.id);
    }

    fn stop_in_background(&self, task_id: String) {
        let backend = self.shared.backend.clone();
        let tx = self.self_tx.clone();
        let limit = self.shared.cfg.deadlines.stop;
        tokio::spawn(async move {
            let result = match tokio::time::timeout(limit, backend.stop(&task_id)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("stop did not finish within {}s", limit.as_secs())),
            };
            let _ = tx.send(SessionCmd::Stopped { task_id, result }).await;
        });
    }

    async fn on_stopped(&mut self, task_id: &str, result: Result<(), String>) {
        self.shared.tasks.lock().expect("task map").remove(task_id);
        if let Err(e) = &result {
            tracing::error!(event = "task_stop_failed", sessionId = %self.id, taskId = %task_id, error = %e, "backend failed to stop a task");
        }
        if self.stopping.as_ref().is_some_and(|s| s.task_id == task_id) {
            self.stopping = None;
            if std::mem::take(&mut self.start_after_stop) && self.task.is_none() {
                self.start_task();
            }
        }
    }

    fn on_runner_disconnected(&mut self) {
        let Some(task) = self.task.as_mut() else {
            return;
        };
        task.runner = None;
        task.runner_lost_at = Some(Instant::now());
        tracing::warn!(event = "runner_disconnected", sessionId = %self.id, taskId = %task.id, "runner socket closed; waiting for it to re-dial");
        // Find out at once whether the task died (then fail fast) or lives.
        task.watch.cancel();
        task.watch = CancellationToken::new();
        let (task_id, watch) = (task.id.clone(), task.watch.clone());
        self.watch_status(task_id, watch);
    }

    fn is_current_runner(&self, task_id: &str, generation: u64) -> bool {
        self.task.as_ref().is_some_and(|t| {
            t.id == task_id
                && t.runner
                    .as_ref()
                    .is_some_and(|r| r.generation == generation)
        })
    }

    // ---- timers ---------------------------------------------------------

    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |d: Option<Instant>| {
            if let Some(d) = d {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        };
        consider(self.pending_ack.as_ref().map(|a| a.due));
        let cfg = &self.shared.cfg;
        if let Some(task) = &self.task {
            consider(task.phase_deadline);
            consider(task.overall_deadline);
            consider(
                task.runner_lost_at
                    .map(|t| t + cfg.deadlines.runner_reconnect),
            );
            if task.phase == Phase::Ready {
                if self.turns.is_empty() {
                    consider(Some(self.idle_since + cfg.idle_timeout_for(&self.user_id)));
                } else if let Some(detached) = self.detached_at {
                    consider(Some(detached + cfg.disconnect_processing_timeout));
                }
            }
        }
        if self.start_after_stop {
            consider(
                self.stopping
                    .as_ref()
                    .map(|s| s.since + cfg.deadlines.stop_wait),
            );
        }
        if self.task.is_none() && self.stopping.is_none() && self.clients.is_empty() {
            consider(self.detached_at.map(|d| d + self.evict_after()));
        }
        next
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if self.pending_ack.as_ref().is_some_and(|a| now >= a.due) {
            self.send_pending_ack();
        }
        let cfg = self.shared.cfg.clone();
        if let Some(s) = self
            .stopping
            .as_ref()
            .filter(|s| self.start_after_stop && now >= s.since + cfg.deadlines.stop_wait)
        {
            tracing::warn!(event = "stop_wait_expired", sessionId = %self.id, taskId = %s.task_id, "old task still stopping; starting a new one anyway");
            self.stopping = None;
            self.start_after_stop = false;
            self.start_task();
            return;
        }
        let Some(task) = self.task.as_ref() else {
            return;
        };
        if task.overall_deadline.is_some_and(|d| now >= d) {
            let msg = format!(
                "could not restart your sandbox within {}s. Send your message again to retry.",
                cfg.deadlines.restart.as_secs()
            );
            self.fail_start_with(ErrorCode::TaskRestartFailed, &msg)
                .await;
            return;
        }
        if task.phase_deadline.is_some_and(|d| now >= d) {
            let (code, what) = match task.phase {
                Phase::Launching => (
                    None,
                    format!(
                        "the sandbox did not start within {}s",
                        cfg.deadlines.launch.as_secs()
                    ),
                ),
                Phase::Pending => (
                    Some(ErrorCode::TaskConnectTimeout),
                    format!(
                        "the sandbox started but did not connect back within {}s",
                        cfg.deadlines.connect.as_secs()
                    ),
                ),
                _ => (
                    None,
                    format!(
                        "the agent did not become ready within {}s",
                        cfg.deadlines.activate.as_secs()
                    ),
                ),
            };
            match code {
                Some(code) => {
                    self.fail_start_with(
                        code,
                        &format!("{what}. Send your message again to retry."),
                    )
                    .await
                }
                None => self.fail_start(what).await,
            }
            return;
        }
        if task
            .runner_lost_at
            .is_some_and(|t| now >= t + cfg.deadlines.runner_reconnect)
        {
            self.on_task_lost(format!(
                "the sandbox lost its connection and did not come back within {}s",
                cfg.deadlines.runner_reconnect.as_secs()
            ))
            .await;
            return;
        }
        if task.phase == Phase::Ready {
            if self.turns.is_empty() && now >= self.idle_since + cfg.idle_timeout_for(&self.user_id)
            {
                lifecycle!(self, "idle_timeout", taskId = %task.id, idle_ms = ms(now - self.idle_since), "stopping idle task");
                crate::metrics::idle_timeout();
                self.begin_stop("idle timeout");
                self.emit(ServerEvent::Status {
                    state: TaskPhase::Stopped,
                    source: None,
                    eta_ms: None,
                });
            } else if !self.turns.is_empty()
                && self
                    .detached_at
                    .is_some_and(|d| now >= d + cfg.disconnect_processing_timeout)
            {
                lifecycle!(self, "idle_timeout", taskId = %task.id, reason = "disconnected_processing", "client gone too long; stopping task");
                crate::metrics::idle_timeout();
                self.fail_turns(
                    ErrorCode::AgentCrashed,
                    "the turn was stopped because no client was attached",
                );
                self.begin_stop("client gone during processing");
                self.emit(ServerEvent::Status {
                    state: TaskPhase::Stopped,
                    source: None,
                    eta_ms: None,
                });
            }
        }
    }

    fn should_evict(&self) -> bool {
        self.task.is_none()
            && self.stopping.is_none()
            && self.clients.is_empty()
            && self.queue.is_empty()
            && self
                .detached_at
                .is_some_and(|d| d.elapsed() >= self.evict_after())
    }

    /// How long the session stays in memory with no task and no client: a
    /// reserved one holds nothing worth keeping, so not long.
    fn evict_after(&self) -> Duration {
        let configured = self.shared.cfg.session_evict_after;
        if self.reserved.is_some() {
            configured.min(RESERVED_EVICT_AFTER)
        } else {
            configured
        }
    }

    // ---- state ------------------------------------------------------------

    fn processing_state(&self) -> &'static str {
        if self.turns.is_empty() {
            "idle"
        } else if !self.questions.is_empty() {
            "waiting_for_answer"
        } else {
            "processing"
        }
    }

    fn state_name(&self) -> SessionState {
        match (&self.task, &self.stopping) {
            (Some(t), _) => match t.phase {
                Phase::Launching => SessionState::Creating,
                Phase::Pending => SessionState::Pending,
                Phase::Activating | Phase::Restoring => SessionState::Activating,
                Phase::Ready if self.clients.is_empty() => SessionState::Idle,
                Phase::Ready => SessionState::Running,
            },
            (None, Some(_)) => SessionState::Stopping,
            (None, None) => SessionState::Stopped,
        }
    }

    /// Persist the session state when it changed.
    fn sync_state(&mut self) {
        let state = self.state_name();
        if Some(state) != self.last_state {
            crate::metrics::session_state(self.last_state, Some(state));
            self.last_state = Some(state);
            // A reserved session is stored with its state when it is stored.
            if self.reserved.is_none() {
                // In order with the events, in the same write when they meet.
                let _ = self.persist_tx.send(PersistItem::State(state));
            }
        }
    }

    // ---- emitting ---------------------------------------------------------

    fn frame_json(&self, event: ServerEvent, ephemeral: bool) -> Arc<str> {
        let seq = if ephemeral {
            self.delivered_seq
        } else {
            self.next_seq
        };
        Arc::from(
            ServerFrame {
                seq,
                session_id: self.id.clone(),
                ephemeral,
                event,
            }
            .to_json(),
        )
    }

    /// A stream event: numbered, kept for replay, sent to every client.
    fn emit(&mut self, event: ServerEvent) {
        self.emit_with_runner_seq(event, None);
    }

    fn emit_with_runner_seq(&mut self, event: ServerEvent, runner_seq: Option<u64>) {
        if let Some(code) = event.error_code() {
            crate::metrics::error(code);
        }
        debug_assert!(
            self.reserved.is_none(),
            "a reserved session is stored before its first event"
        );
        let json = self.frame_json(event, false);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.replay.push(seq, json.clone());
        let event = StoredEvent {
            seq,
            json: json.to_string(),
        };
        let _ = self
            .persist_tx
            .send(PersistItem::Event { event, runner_seq });
    }

    /// Events up to `seq` are stored: send them to every client, and tell
    /// the runner which of its frames it may forget.
    async fn on_persisted(&mut self, seq: u64, runner_seq: Option<(String, u64)>) {
        if seq > self.delivered_seq {
            let frames = self
                .events_between(self.delivered_seq, seq, usize::MAX)
                .await;
            self.delivered_seq = seq;
            for c in self.clients.iter().filter(|c| !c.is_lagging()) {
                let sent = frames.iter().all(|(s, json)| {
                    c.tx.try_send(Outbound::Frame(Some(*s), json.clone()))
                        .is_ok()
                });
                if !sent {
                    // Its queue is full: stop pushing; it pulls from the store.
                    tracing::warn!(event = "client_lagging", sessionId = %self.id, connId = c.conn_id, "client fell behind; switching it to catch-up from the store");
                    c.lagging
                        .flag
                        .store(true, std::sync::atomic::Ordering::Release);
                    c.lagging.notify.notify_one();
                }
            }
        }
        if let Some((task_id, seq)) = runner_seq {
            let ack = match self.pending_ack.take() {
                Some(p) if p.task_id == task_id => PendingAck {
                    seq,
                    batches: p.batches + 1,
                    ..p
                },
                _ => PendingAck {
                    task_id,
                    seq,
                    batches: 1,
                    due: Instant::now() + ACK_DELAY,
                },
            };
            let send_now = ack.batches >= ACK_EVERY;
            self.pending_ack = Some(ack);
            if send_now {
                self.send_pending_ack();
            }
        }
    }

    /// Tell the runner which of its frames are stored (if its task is
    /// still this session's).
    fn send_pending_ack(&mut self) {
        let Some(ack) = self.pending_ack.take() else {
            return;
        };
        let link = self
            .task
            .as_ref()
            .filter(|t| t.id == ack.task_id)
            .and_then(|t| t.runner.as_ref());
        if let Some(link) = link {
            let _ = link.tx.send(GatewayToRunner::Ack { seq: ack.seq });
        }
    }

    fn bind_task(&self, task_id: Option<&str>) {
        let _ = self
            .persist_tx
            .send(PersistItem::BindTask(task_id.map(str::to_string)));
    }

    /// A connection-local answer (pong, BAD_FRAME, lists): never replayed.
    fn reply(&self, conn_id: u64, event: ServerEvent) {
        let json = self.frame_json(event, true);
        if let Some(c) = self.clients.iter().find(|c| c.conn_id == conn_id) {
            let _ = c.tx.try_send(Outbound::Frame(None, json));
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Store a reserved session as it is now; the record comes back on failure.
async fn store_session(
    store: Arc<dyn aishell_store::Store>,
    mut record: SessionRecord,
    state: Option<SessionState>,
) -> Result<(), (aishell_store::StoreError, SessionRecord)> {
    if let Some(state) = state {
        record.state = state;
    }
    match store.create_session(&record).await {
        Ok(()) => Ok(()),
        Err(e) => Err((e, record)),
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
