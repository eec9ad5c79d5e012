//! One session's actor: the only owner of its state, so every transition
//! happens in one place, in order. It receives commands, steps the session
//! machine (machine/mod.rs, where the states and their deadlines live) and
//! carries out the effects; it owns what the machine must not touch:
//! sockets, spawned work, the store, clients and their delivery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aishell_backend::{BackendError, LaunchSpec, TaskMode};
use aishell_protocol::client::ConversationSummary;
use aishell_protocol::{
    AgentEvent, AgentInput, ClientFrame, ConversationRef, ErrorCode, GatewayToRunner,
    RunnerToGateway, ServerEvent, SessionState,
};
use aishell_store::{MessageRecord, SessionRecord, StoredEvent};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::delivery::{AckBatcher, AttachReply, CatchUpBatch, Delivery};
use super::machine::turns::QueuedMessage;
use super::machine::{self, Effect, Input, Log, Machine, RunnerHello, WarmClaim};
use super::output::{self, Admit};
use super::persister::{PersistItem, Persister, Usage};
use super::replay::ReplayBuffer;
use super::{Inbox, Mailbox};
use crate::Shared;
use crate::auth::validate_conversation_id;
use crate::lifecycle::{lifecycle, ms};

/// Largest agent event stored and relayed; larger ones are cut
/// (ARCHITECTURE.md "Replay and durability").
const MAX_EVENT_BYTES: usize = 1 << 20;
/// How long a session that was only reserved (its client sent nothing)
/// stays in memory after its client left.
const RESERVED_EVICT_AFTER: Duration = Duration::from_secs(10);

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
        result: Result<Duration, BackendError>,
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
    /// One of several gateways lost (or gave up) this session's lease:
    /// leave memory without touching the task, which is the new owner's;
    /// clients and the runner reconnect and find it (docs/cluster.md).
    StepDown,
}

pub(super) fn spawn(
    shared: Arc<Shared>,
    record: SessionRecord,
    fresh: bool,
    self_tx: Mailbox,
    rx: Inbox,
) {
    let persister = Persister::new(
        shared.store.clone(),
        shared.cluster.clone(),
        record.id.clone(),
        record.task_id.clone(),
        self_tx.clone(),
    );
    let cfg = &shared.cfg;
    let machine = Machine::new(
        machine::Config {
            deadlines: cfg.deadlines.clone(),
            idle_timeout: cfg.idle_timeout_for(&record.user_id),
            disconnect_processing_timeout: cfg.disconnect_processing_timeout,
            backend_name: shared.backend.name().to_string(),
            cold_eta_ms: shared.backend.capabilities().typical_cold_start.as_millis() as u64,
            max_turn_output_bytes: cfg.max_turn_output_bytes,
        },
        fresh,
        record.task_id.clone().map(|t| (t, record.runner_seq)),
        Instant::now(),
    );
    // Boxed: an async fn keeps its arguments twice (as given and as bound
    // in its body), and the actor is over a KiB, held for the session's
    // whole life; boxed, the task holds two pointers to one copy.
    let actor = Box::new(SessionActor {
        delivery: Delivery::new(
            shared.store.clone(),
            record.id.clone(),
            record.last_seq,
            ReplayBuffer::new(cfg.replay_buffer, cfg.replay_buffer_bytes),
        ),
        // Created in this process: only reserved until its first message.
        reserved: fresh.then(|| record.clone()),
        machine,
        shared,
        id: record.id,
        user_id: record.user_id,
        trace_id: record.trace_id,
        self_tx,
        persister,
        runner: None,
        offered_runner: None,
        watching: None,
        preparing: None,
        last_runner_seq: 0,
        acks: AckBatcher::default(),
        last_state: None,
        held_stderr: Default::default(),
    });
    tokio::spawn(actor.run(rx));
}

/// Estimate for `status.eta_ms`: a cold start on this backend.
type RunnerTx = mpsc::UnboundedSender<GatewayToRunner>;

/// Receives commands, steps the session machine (machine/mod.rs) and
/// carries out its effects; owns what the machine must not: sockets,
/// spawned work, the store, clients and their delivery.
struct SessionActor {
    shared: Arc<Shared>,
    id: String,
    user_id: String,
    trace_id: String,
    machine: Machine,
    self_tx: Mailbox,
    /// Ordered writes; started by the first one.
    persister: Persister,
    /// The session's stream and its clients.
    delivery: Delivery,
    /// A session whose client has sent nothing yet is only reserved: it is
    /// stored (this record) with its first message, so connections that
    /// send nothing leave nothing behind.
    reserved: Option<SessionRecord>,
    /// The current task's runner socket.
    runner: Option<RunnerTx>,
    /// A runner socket offered to the machine while it steps
    /// (`Effect::UseRunner` takes it).
    offered_runner: Option<RunnerTx>,
    /// The current task's status, from the gateway's watch of the backend.
    watching: Option<crate::task_watch::Subscription>,
    /// The workspace being prepared on the blocking pool.
    preparing: Option<JoinHandle<Result<(), String>>>,
    /// Highest agent frame seq received from the current task's runner.
    last_runner_seq: u64,
    /// Acknowledgements the runner has not been sent yet.
    acks: AckBatcher,
    /// The state last counted in the metrics (and persisted, once stored).
    last_state: Option<SessionState>,
    /// The agent's stderr during the running turn (see agent_stderr.rs).
    held_stderr: super::agent_stderr::HeldStderr,
}

impl SessionActor {
    async fn run(mut self: Box<Self>, mut rx: Inbox) {
        loop {
            self.sync_state();
            let deadline = self.next_deadline();
            let cmd = tokio::select! {
                cmd = rx.recv() => cmd,
                prepared = wait_prepared(&mut self.preparing) => {
                    self.apply(Input::WorkspacePrepared(prepared));
                    continue;
                }
                (task_id, status) = next_status(&mut self.watching) => {
                    self.apply(Input::Observed { task_id, status });
                    continue;
                }
                _ = sleep_until_opt(deadline) => {
                    self.on_timer();
                    // The eviction time is one of the deadlines: past it,
                    // going round again would wake at once, forever.
                    if self.should_evict() && rx.is_empty() {
                        break;
                    }
                    continue;
                }
            };
            let Some(cmd) = cmd else { break };
            if let SessionCmd::StepDown = *cmd {
                self.step_down();
                break;
            }
            // Boxed: handling a command awaits futures several KiB large
            // (store reads, attach with replay), and inline they would size
            // the actor's task, an idle session's too, for its whole life.
            Box::pin(self.handle(*cmd)).await;
            if self.should_evict() && rx.is_empty() {
                break;
            }
        }
        self.shared.sessions.remove(&self.id, &self.self_tx);
        if let Some(cluster) = &self.shared.cluster {
            // Nothing when it stepped down: the lease is gone already.
            cluster.release(&self.id);
        }
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
                let batch = self.delivery.catch_up(conn_id, after).await;
                let _ = reply.send(batch);
            }
            SessionCmd::Client { conn_id, frame } => self.on_client(conn_id, frame).await,
            SessionCmd::Reply { conn_id, event } => self.delivery.reply(conn_id, event),
            SessionCmd::RunnerConnected { attach, reply } => {
                let hello = RunnerHello {
                    for_this_session: attach.session_hint.as_deref() == Some(&self.id),
                    task_id: attach.task_id,
                    generation: attach.generation,
                    agent_running: attach.agent_running,
                    inputs_received: attach.inputs_received,
                };
                self.offered_runner = Some(attach.tx);
                let result = self.apply_refusable(Input::RunnerConnected(hello));
                self.offered_runner = None;
                let _ = reply.send(result);
            }
            SessionCmd::RunnerFrame {
                task_id,
                generation,
                frame,
            } => {
                if self.machine.is_current_runner(&task_id, generation) {
                    self.on_runner_frame(frame).await;
                }
            }
            SessionCmd::RunnerDisconnected {
                task_id,
                generation,
            } => {
                if self.machine.is_current_runner(&task_id, generation) {
                    self.apply(Input::RunnerDisconnected);
                }
            }
            SessionCmd::Launched { task_id, result } => {
                self.apply(Input::Launched { task_id, result });
            }
            SessionCmd::Stopped { task_id, result } => {
                self.apply(Input::Stopped { task_id, result });
            }
            SessionCmd::Persisted { seq, runner_seq } => self.on_persisted(seq, runner_seq).await,
            SessionCmd::StopTask { reason } => {
                self.apply(Input::StopRequested { reason });
            }
            SessionCmd::StepDown => self.step_down(),
        }
    }

    /// Another gateway owns the session now (or will): tell the clients to
    /// reconnect, let go of the runner (it re-dials and is adopted by the
    /// owner) and of the task, which keeps running. Nothing more is written.
    fn step_down(&mut self) {
        tracing::warn!(event = "session_step_down", sessionId = %self.id, "session handed over to another gateway");
        self.delivery.close_all(
            crate::cluster::relay::CLOSE_MOVED,
            "this session moved to another gateway; reconnect",
        );
        self.runner = None;
        self.watching = None;
        if let Some(task_id) = self.machine.current_task_id() {
            self.shared.tasks.lock().expect("task map").remove(task_id);
        }
    }

    // ---- the machine ------------------------------------------------------

    /// Step the machine and carry out its effects, in order.
    fn apply(&mut self, input: Input) {
        let _refused = self.apply_refusable(input);
    }

    /// Like [`apply`](Self::apply); `Err` when the machine refused the
    /// runner socket on offer.
    fn apply_refusable(&mut self, input: Input) -> Result<(), String> {
        let effects = machine::step(&mut self.machine, input, Instant::now());
        let mut result = Ok(());
        for effect in effects {
            if let Err(e) = self.execute(effect) {
                result = Err(e);
            }
        }
        result
    }

    fn execute(&mut self, effect: Effect) -> Result<(), String> {
        match effect {
            Effect::Emit(event) => self.emit(event),
            Effect::ToRunner(frame) => self.send_to_runner(frame),
            Effect::PrepareWorkspace => self.prepare_workspace(),
            Effect::ClaimOrLaunch => self.claim_or_launch(),
            Effect::Launch { task_id } => self.launch(task_id),
            Effect::WatchStatus { task_id } => self.watch_status(task_id),
            Effect::StopWatching => self.watching = None,
            Effect::UseRunner => self.runner = self.offered_runner.take(),
            Effect::DropRunner => self.runner = None,
            Effect::SendInitUser => self.send_init_user(),
            Effect::RejectRunner(reason) => return Err(reason),
            Effect::OwnTask { task_id } => {
                let owner = crate::TaskOwner::new(&self.id, &self.user_id, false);
                self.shared
                    .tasks
                    .lock()
                    .expect("task map")
                    .insert(task_id, owner);
            }
            Effect::ForgetTask { task_id } => {
                self.shared.tasks.lock().expect("task map").remove(&task_id);
            }
            Effect::BindTask(task_id) => {
                self.persister.send(PersistItem::BindTask(task_id));
            }
            Effect::UsageStart { task_id } => {
                self.persister.send(PersistItem::Usage(Usage::Start {
                    task_id,
                    user_id: self.user_id.clone(),
                }));
            }
            Effect::UsageEnd { task_id } => {
                self.persister
                    .send(PersistItem::Usage(Usage::End { task_id }));
            }
            Effect::StopTask { task_id } => self.stop_in_background(task_id),
            Effect::RunnerSeqFrom(seq) => self.last_runner_seq = seq,
            Effect::Log(line) => self.log(line),
        }
        Ok(())
    }

    // ---- clients -------------------------------------------------------

    async fn attach(
        &mut self,
        conn_id: u64,
        last_seq: Option<u64>,
        reply: oneshot::Sender<AttachReply>,
    ) {
        let current = self.delivery.delivered_seq();
        let session = ServerEvent::Session {
            state: self.machine.state().as_str().to_string(),
            resumed: last_seq.is_some() || !self.machine.fresh() || current > 0,
            last_seq: current,
            protocol: aishell_protocol::CLIENT_PROTOCOL_VERSION,
            user_id: self.user_id.clone(),
        };
        let attached = self.delivery.attach(conn_id, last_seq, session).await;
        self.apply(Input::ClientAttached);
        if reply.send(attached).is_err() {
            self.delivery.remove(conn_id);
            if !self.delivery.has_clients() {
                self.apply(Input::LastClientLeft);
            }
        }
        if self.shared.cfg.start_on_connect
            && self.machine.is_idle()
            && self.store_reserved().await.is_ok()
        {
            self.apply(Input::StartWanted);
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

    fn detach(&mut self, conn_id: u64, reason: &str) {
        if !self.delivery.remove(conn_id) {
            return;
        }
        tracing::info!(
            event = "task_lifecycle",
            phase = "ws_disconnect",
            sessionId = %self.id,
            userId = %self.user_id,
            traceId = %self.trace_id,
            processingState = self.machine.turns.processing_state(),
            reason = %reason,
            "client disconnected"
        );
        crate::metrics::disconnect(self.machine.turns.processing_state());
        if !self.delivery.has_clients() {
            self.apply(Input::LastClientLeft);
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
                self.apply(Input::Abort { conversation_id });
            }
            ClientFrame::AnswerQuestion { request_id, answer } => {
                self.apply(Input::ToAgent(AgentInput::AnswerQuestion {
                    request_id,
                    answer,
                }));
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
                self.apply(Input::ToAgent(AgentInput::ResetConversation {
                    conversation_id,
                }));
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
                self.apply(Input::ToAgent(AgentInput::DeleteConversation {
                    conversation_id,
                }));
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
        if let Some(mid) = id.as_deref().filter(|m| self.machine.turns.seen(m)) {
            self.reply_duplicate(conn_id, mid);
            return;
        }
        // A new task is claimed (or launched) before the message's write
        // commits, so the two overlap; the message is queued for the task
        // only once stored. A write that fails (or finds the message stored
        // already, after a gateway restart) leaves a started task idle (the
        // idle timer stops it), never a message lost or run twice.
        let quota_message = if self.machine.has_no_task() {
            match self.weekly_quota_exceeded().await {
                Some(sentence) => Some(sentence),
                None => self.task_limit_across_gateways().await,
            }
        } else {
            None
        };
        // A reserved session is stored now, with its first message. Its
        // write is handed to the store first (the writer runs writes in
        // the order they reach it) and commits in the same group as the
        // task's binding and the message, instead of one commit earlier.
        let mut store_session = self
            .reserved
            .take()
            .map(|record| store_session(self.shared.store.clone(), record, self.last_state));
        // A store that may commit writes in another order than they were
        // handed over (PostgreSQL) gets the session's row first: the
        // message, the task's binding and the events all refer to it.
        if !self.shared.store.orders_writes()
            && let Some(create) = store_session.take()
            && let Err(e) = self.after_store_reserved(create.await)
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
        let record = MessageRecord {
            session_id: self.id.clone(),
            conversation_id: conversation_id.clone(),
            client_msg_id: id.clone(),
            role: aishell_store::MessageRole::User,
            content: content.clone(),
            created_at: OffsetDateTime::now_utc(),
        };
        if self.machine.is_idle() && quota_message.is_none() {
            self.apply(Input::StartWanted);
        }
        let store = self.shared.store.clone();
        // One write stores the conversation (if new) and the message.
        let insert = store.insert_message(&record);
        // The workspace is prepared meanwhile; a warm claim follows at once.
        let preparing = self.preparing.take();
        let obtain = async {
            if let Some(handle) = preparing {
                let prepared = prepared_result(handle.await);
                self.apply(Input::WorkspacePrepared(prepared));
            }
        };
        let (stored_session, inserted) = match store_session {
            Some(create) => {
                let (created, inserted, ()) = tokio::join!(create, insert, obtain);
                (Some(created), inserted)
            }
            None => {
                let (inserted, ()) = tokio::join!(insert, obtain);
                (None, inserted)
            }
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
                    self.machine.turns.mark_seen(mid);
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
            self.machine.turns.mark_seen(mid);
        }
        let msg = QueuedMessage {
            conversation_id,
            content,
            message_id: id,
            received_at,
            crashes: 0,
        };
        match quota_message {
            // Nothing was started; the message is kept and runs once allowed.
            Some(sentence) => self.apply(Input::MessageOverQuota {
                message: msg,
                sentence,
            }),
            None => self.apply(Input::Message(msg)),
        };
    }

    fn reply_duplicate(&self, conn_id: u64, message_id: &str) {
        let message = format!("message {message_id} was already accepted; not running it again");
        self.reply(conn_id, ServerEvent::Agent(AgentEvent::Info { message }));
    }

    fn send_to_runner(&self, frame: GatewayToRunner) {
        if let Some(tx) = &self.runner {
            let _ = tx.send(frame);
        }
    }

    // ---- task start ----------------------------------------------------

    /// The first step of obtaining a task: the user's task limit, then
    /// their workspace, prepared on the blocking pool (it may run mkfs and
    /// mount when a quota is on), never on the actor's worker.
    fn prepare_workspace(&mut self) {
        let limit = self.shared.cfg.max_tasks_per_user;
        let (running, _) = self.shared.tasks_of(&self.user_id);
        if running >= limit {
            let message = format!(
                "you already have {running} sandboxes running (limit {limit}); wait for one to go idle or stop it, then send your message again"
            );
            tracing::warn!(event = "quota_exceeded", sessionId = %self.id, userId = %self.user_id, running, "task quota reached");
            self.apply(Input::StartRefused {
                error: ServerEvent::error(ErrorCode::QuotaExceeded, message),
            });
            return;
        }
        let workspaces = self.shared.workspaces.clone();
        let user_id = self.user_id.clone();
        self.preparing = Some(tokio::task::spawn_blocking(move || {
            workspaces.prepare(&user_id).map_err(|e| e.to_string())
        }));
    }

    /// Obtain a task: a warm claim when the pool has one, else a cold launch.
    fn claim_or_launch(&mut self) {
        let cfg = &self.shared.cfg;
        let (_, warm) = self.shared.tasks_of(&self.user_id);
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
            self.apply(Input::StartRefused {
                error: ServerEvent::error(ErrorCode::Overloaded, message),
            });
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
        let (task_id, warm) = match claimed {
            Some(c) => {
                self.offered_runner = Some(c.tx);
                let claim = WarmClaim {
                    generation: c.generation,
                    took: c.took,
                };
                (c.task_id, Some(claim))
            }
            None => (format!("t-{}", uuid::Uuid::new_v4().simple()), None),
        };
        let owner = crate::TaskOwner::new(&self.id, &self.user_id, warm.is_some());
        self.shared
            .tasks
            .lock()
            .expect("task map")
            .insert(task_id.clone(), owner);
        self.apply(Input::TaskAssigned { task_id, warm });
        self.offered_runner = None;
    }

    /// Ask the backend for a cold task; `Launched` comes back.
    fn launch(&self, task_id: String) {
        let spec = LaunchSpec {
            task_id: task_id.clone(),
            mode: TaskMode::Cold,
            session_id: Some(self.id.clone()),
            gateway_url: self.shared.runner_url.clone(),
            credential: self.shared.credentials.mint(
                &task_id,
                TaskMode::Cold,
                Some(&self.id),
                self.shared.cfg.runner_credential_ttl,
            ),
            env: crate::cluster::runner_env(&self.shared.cfg),
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
            let result = backend.launch(spec).await.map(|_| started.elapsed());
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

    /// Follow the task's status until the runner connects (launched →
    /// running), so a task that dies before dialling back fails fast
    /// instead of waiting for the connect deadline. Replaces any
    /// subscription; the gateway's one watch of the backend feeds it.
    fn watch_status(&mut self, task_id: String) {
        self.watching = Some(self.shared.task_watch.subscribe(&task_id));
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
                self.apply(Input::Heartbeat { inputs_received });
            }
            RunnerToGateway::Hello { .. } | RunnerToGateway::Prepared { .. } => {}
            RunnerToGateway::Ready {
                agent,
                agent_start_ms,
                prestarted,
            } => {
                let conversations = if self.machine.restore_needed() {
                    self.shared
                        .store
                        .list_conversations(&self.id)
                        .await
                        .map(|list| {
                            list.into_iter()
                                .map(|c| ConversationRef {
                                    conversation_id: c.id,
                                    resume_handle: c.resume_handle,
                                })
                                .collect()
                        })
                        .map_err(|e| e.to_string())
                } else {
                    Ok(Vec::new())
                };
                self.apply(Input::AgentReady {
                    agent,
                    agent_start_ms,
                    prestarted,
                    conversations,
                });
            }
            RunnerToGateway::Restored { count } => self.apply(Input::Restored { count }),
            RunnerToGateway::Agent { seq, frame } => {
                if seq <= self.last_runner_seq {
                    return; // resent after a re-dial; already handled
                }
                self.last_runner_seq = seq;
                self.on_agent_event(frame, seq).await;
            }
            RunnerToGateway::AgentStderr { line } => {
                let turn_running = self.machine.turns.busy();
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
                self.apply(Input::TaskLost { why });
            }
            RunnerToGateway::StartFailed { message } => {
                self.apply(Input::StartFailed { why: message });
            }
        }
    }

    fn log_stderr(&self, lines: &[String], outcome: super::agent_stderr::Outcome) {
        super::agent_stderr::log_all(&self.id, &self.user_id, &self.trace_id, lines, outcome);
    }

    /// One of several gateways: the user's sandboxes on every gateway count
    /// against `max_tasks_per_user` (the store knows each session's task;
    /// this gateway's own map knows only its own).
    async fn task_limit_across_gateways(&self) -> Option<String> {
        self.shared.cluster.as_ref()?;
        let limit = self.shared.cfg.max_tasks_per_user as u64;
        let running = match self.shared.store.count_user_tasks(&self.user_id).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(event = "store_error", sessionId = %self.id, error = %e, "could not count the user's sandboxes; not enforcing the limit across gateways");
                return None;
            }
        };
        (running >= limit).then(|| {
            tracing::warn!(event = "quota_exceeded", sessionId = %self.id, userId = %self.user_id, running, "task quota reached across gateways");
            format!("you already have {running} sandboxes running (limit {limit}); wait for one to go idle or stop it, then send your message again")
        })
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

    /// The machine's log lines, with their metrics.
    fn log(&self, line: Log) {
        match line {
            Log::TaskStart { task_id, took } => {
                lifecycle!(self, "task_start", taskId = %task_id, duration_ms = ms(took), source = "cold", "backend launched task");
                crate::metrics::phase("task_start", Some("cold"), took);
            }
            Log::TaskPending { task_id, took } => {
                lifecycle!(self, "task_pending", taskId = %task_id, duration_ms = ms(took), "task is running");
                crate::metrics::phase("task_pending", None, took);
            }
            Log::TaskConnect { task_id, took } => {
                lifecycle!(self, "task_connect", taskId = %task_id, duration_ms = ms(took), "runner connected");
                crate::metrics::phase("task_connect", None, took);
            }
            Log::RunnerReattached { task_id } => {
                tracing::info!(event = "runner_reattached", sessionId = %self.id, taskId = %task_id, "runner re-attached");
            }
            Log::InputsResent { task_id, count } => {
                tracing::info!(event = "runner_inputs_resent", sessionId = %self.id, taskId = %task_id, count, "agent inputs sent again after a re-dial");
            }
            Log::TaskAdopted { task_id } => {
                tracing::info!(event = "task_adopted", sessionId = %self.id, taskId = %task_id, "adopted a running task after a gateway restart");
            }
            Log::TaskReady {
                task_id,
                source,
                took,
                breakdown,
                prestarted,
            } => {
                lifecycle!(self, "task_ready", taskId = %task_id, duration_ms = ms(took), source = source.as_str(), breakdown = %breakdown, agentPrestarted = prestarted, "task ready");
                crate::metrics::phase("task_ready", Some(source.as_str()), took);
            }
            Log::TaskRestart {
                task_id,
                took,
                success,
            } => {
                if success {
                    lifecycle!(self, "task_restart", taskId = %task_id, duration_ms = ms(took), success = true, "task restarted");
                    crate::metrics::phase("task_restart", Some("success"), took);
                } else {
                    lifecycle!(self, "task_restart", taskId = %task_id, duration_ms = ms(took), success = false, "task restart failed");
                    crate::metrics::phase("task_restart", Some("failure"), took);
                }
            }
            Log::SessionCreate { task_id, took } => {
                lifecycle!(self, "session_create", taskId = %task_id, duration_ms = ms(took), "session ready");
                crate::metrics::phase("session_create", None, took);
            }
            Log::StartFailed {
                task_id,
                code,
                took,
                reason,
            } => {
                tracing::error!(event = "task_start_failed", sessionId = %self.id, userId = %self.user_id, traceId = %self.trace_id, taskId = %task_id, code = code.as_str(), duration_ms = ms(took), reason = %reason, "task start failed");
            }
            Log::TaskLost {
                task_id,
                processing,
                why,
            } => {
                tracing::warn!(event = "task_lost", sessionId = %self.id, userId = %self.user_id, traceId = %self.trace_id, taskId = %task_id, processingState = processing, reason = %why, "task lost");
            }
            Log::RunnerDisconnected { task_id } => {
                tracing::warn!(event = "runner_disconnected", sessionId = %self.id, taskId = %task_id, "runner socket closed; waiting for it to re-dial");
            }
            Log::StopFailed { task_id, error } => {
                tracing::error!(event = "task_stop_failed", sessionId = %self.id, taskId = %task_id, error = %error, "backend failed to stop a task");
            }
            Log::StopWaitExpired { task_id } => {
                tracing::warn!(event = "stop_wait_expired", sessionId = %self.id, taskId = %task_id, "old task still stopping; starting a new one anyway");
            }
            Log::IdleTimeout { task_id, idle } => {
                lifecycle!(self, "idle_timeout", taskId = %task_id, idle_ms = ms(idle), "stopping idle task");
                crate::metrics::idle_timeout();
            }
            Log::DisconnectedProcessing { task_id } => {
                lifecycle!(self, "idle_timeout", taskId = %task_id, reason = "disconnected_processing", "client gone too long; stopping task");
                crate::metrics::idle_timeout();
            }
        }
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
                .is_some_and(|cid| self.machine.turns.conversation_busy(cid));
        if let Admit::Drop { notify } = self.machine.output.admit(size, ends_turn) {
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
        let note = self.machine.turns.note_event(&frame, now);
        if let Some(took) = note.first_event_after {
            let cid = frame.conversation_id().unwrap_or_default();
            lifecycle!(self, "message_roundtrip", conversationId = %cid, duration_ms = ms(took), "first agent event");
            crate::metrics::phase("message_roundtrip", None, took);
        }
        if let Some((cid, reply)) = note.finished {
            let outcome = if matches!(frame, AgentEvent::Error { .. }) {
                super::agent_stderr::Outcome::Failed
            } else {
                super::agent_stderr::Outcome::Ok
            };
            let held = self.held_stderr.take();
            self.log_stderr(&held, outcome);
            self.store_reply(&cid, reply).await;
        }
        match &frame {
            AgentEvent::AskQuestion { request_id, .. } => {
                self.machine.turns.question_asked(request_id.clone());
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
            role: aishell_store::MessageRole::Assistant,
            content: reply,
            created_at: OffsetDateTime::now_utc(),
        };
        if let Err(e) = self.shared.store.insert_message(&record).await {
            tracing::error!(event = "store_error", sessionId = %self.id, error = %e, "could not save the agent's reply");
        }
    }

    // ---- stops --------------------------------------------------------

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

    // ---- timers ---------------------------------------------------------

    /// The machine's next deadline, the held acknowledgement's, or when
    /// the session leaves memory.
    fn next_deadline(&self) -> Option<Instant> {
        let evict = (self.machine.is_idle() && !self.delivery.has_clients())
            .then(|| self.machine.detached_at().map(|d| d + self.evict_after()))
            .flatten();
        [self.acks.due(), self.machine.next_deadline(), evict]
            .into_iter()
            .flatten()
            .min()
    }

    fn on_timer(&mut self) {
        if let Some(ack) = self.acks.take_due(Instant::now()) {
            self.send_ack(ack);
        }
        self.apply(Input::Tick);
    }

    fn should_evict(&self) -> bool {
        self.machine.is_idle()
            && !self.delivery.has_clients()
            && self.machine.turns.queue_is_empty()
            && self
                .machine
                .detached_at()
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

    /// Persist the session state when it changed.
    fn sync_state(&mut self) {
        let state = self.machine.state();
        if Some(state) != self.last_state {
            crate::metrics::session_state(self.last_state, Some(state));
            self.last_state = Some(state);
            // A reserved session is stored with its state when it is stored.
            if self.reserved.is_none() {
                // In order with the events, in the same write when they meet.
                self.persister.send(PersistItem::State(state));
            }
        }
    }

    // ---- emitting ---------------------------------------------------------

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
        let (seq, json) = self.delivery.number(event);
        let event = StoredEvent {
            seq,
            json: json.to_string(),
        };
        self.persister
            .send(PersistItem::Event { event, runner_seq });
    }

    /// Events up to `seq` are stored: send them to every client, and tell
    /// the runner which of its frames it may forget.
    async fn on_persisted(&mut self, seq: u64, runner_seq: Option<(String, u64)>) {
        self.delivery.deliver(seq).await;
        if let Some((task_id, seq)) = runner_seq
            && let Some(ack) = self.acks.stored(task_id, seq, Instant::now())
        {
            self.send_ack(ack);
        }
    }

    /// Tell the runner which of its frames are stored (if its task is
    /// still this session's).
    fn send_ack(&self, (task_id, seq): (String, u64)) {
        if self.machine.task().is_some_and(|t| t.id == task_id) {
            self.send_to_runner(GatewayToRunner::Ack { seq });
        }
    }

    /// A connection-local answer (pong, BAD_FRAME, lists): never replayed.
    fn reply(&self, conn_id: u64, event: ServerEvent) {
        self.delivery.reply(conn_id, event);
    }
}

/// The next status of the watched task (never while none is watched).
async fn next_status(
    watching: &mut Option<crate::task_watch::Subscription>,
) -> (String, crate::task_watch::Observation) {
    match watching.as_mut() {
        Some(subscription) => {
            let status = subscription.next().await;
            (subscription.task_id.clone(), status)
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

/// The workspace being prepared, once it is (never while none is).
async fn wait_prepared(
    preparing: &mut Option<JoinHandle<Result<(), String>>>,
) -> Result<(), String> {
    let Some(handle) = preparing.as_mut() else {
        return std::future::pending().await;
    };
    let result = handle.await;
    *preparing = None;
    prepared_result(result)
}

fn prepared_result(
    joined: Result<Result<(), String>, tokio::task::JoinError>,
) -> Result<(), String> {
    joined.unwrap_or_else(|e| Err(format!("preparing the workspace failed: {e}")))
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
