//! The session as a pure state machine: [`step`] takes the machine, one
//! [`Input`] and the time, changes the machine and returns the [`Effect`]s
//! the actor must carry out, in order. No I/O, no tokio, no `Shared`: the
//! actor (actor.rs) receives, steps and executes; the tests in tests.rs
//! drive every state with a fake clock.
//!
//! What lives here: the task's lifecycle (obtaining, launching, pending,
//! activating, restoring, ready, stopping, and every deadline of those),
//! the turn and queue bookkeeping (turns.rs), and the agent inputs kept for
//! a runner that re-dials. What does not: clients and their delivery
//! (attach, replay, catch-up), the store's acknowledgements, agent output
//! accounting (actor.rs).

pub mod turns;

#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use aishell_backend::{BackendError, TaskStatus};
use aishell_protocol::agent::AgentInfo;
use aishell_protocol::client::{TaskPhase, TaskSource};
use aishell_protocol::{
    AgentEvent, AgentInput, ConversationRef, ErrorBody, ErrorCode, ErrorReason, GatewayToRunner,
    ServerEvent, SessionState,
};

use super::inputs::InputLog;
use super::output::OutputBudget;
use crate::config::Deadlines;
use crate::lifecycle::ms;
use turns::{QueuedMessage, TurnBook};

/// What the machine needs to know of the gateway's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub deadlines: Deadlines,
    /// This user's idle timeout: a ready task with no turn is stopped then.
    pub idle_timeout: Duration,
    /// A turn with no client attached is stopped after this long.
    pub disconnect_processing_timeout: Duration,
    /// The backend's name, for messages.
    pub backend_name: String,
    /// `status.eta_ms` of a cold start on this backend.
    pub cold_eta_ms: u64,
    /// Bytes of agent output stored and relayed per turn.
    pub max_turn_output_bytes: u64,
}

/// Where a task is in its start (ARCHITECTURE.md, "Session state machine").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The backend is launching it.
    Launching,
    /// It runs; its runner has not dialled back.
    Pending,
    /// Its runner is connected; the agent starts.
    Activating,
    /// The agent is restoring the session's conversations.
    Restoring,
    Ready,
}

#[derive(Debug)]
pub struct Task {
    pub id: String,
    pub source: TaskSource,
    pub phase: Phase,
    /// Any start after the session's first `ready`, or of a session loaded
    /// from the store: its conversations are restored.
    pub is_restart: bool,
    /// Adopted after a gateway restart: the agent already has its state.
    pub adopted: bool,
    requested_at: Instant,
    phase_started: Instant,
    phase_deadline: Option<Instant>,
    /// A restart as a whole has a deadline too.
    overall_deadline: Option<Instant>,
    breakdown: Vec<(&'static str, u64)>,
    /// Generation of the connected runner socket.
    runner: Option<u64>,
    runner_lost_at: Option<Instant>,
    agent: AgentInfo,
    /// The runner started the agent before the claim (warm `prepare`).
    agent_prestarted: bool,
    /// Agent inputs sent and not yet acknowledged by the runner.
    inputs: InputLog,
}

/// The session's task, from none to ready and back.
#[derive(Debug)]
enum Life {
    /// No task; the next message starts one.
    Idle,
    /// A task is being obtained: the user's workspace is prepared, then a
    /// warm runner claimed or a cold launch queued.
    Obtaining,
    Task(Box<Task>),
    /// The task is being stopped; `then_start` once it is gone (a message
    /// came meanwhile: never bind to the dying task).
    Stopping {
        task_id: String,
        since: Instant,
        then_start: bool,
    },
}

/// Something that happened to the session.
#[derive(Debug)]
pub enum Input {
    /// A client attached (RUNNING rather than IDLE).
    ClientAttached,
    /// The last client left.
    LastClientLeft,
    /// A task is wanted now (a message, or a client with start-on-connect);
    /// nothing happens if one runs, starts or is stopping (a message that
    /// arrives while one stops starts the next once it is gone).
    StartWanted,
    /// A stored user message: to the agent now, or queued.
    Message(QueuedMessage),
    /// A stored user message over the user's weekly hours: kept for later.
    MessageOverQuota {
        message: QueuedMessage,
        sentence: String,
    },
    /// The client aborted a conversation (all of them for `None`).
    Abort {
        conversation_id: Option<String>,
    },
    /// Input other than messages for a ready agent.
    ToAgent(AgentInput),
    /// The workspace of a task being obtained is ready (or not).
    WorkspacePrepared(Result<(), String>),
    /// No task could be obtained; `error` tells the user why.
    StartRefused {
        error: ServerEvent,
    },
    /// A task was obtained: a warm runner (connected, with its socket
    /// `generation`) or a cold launch about to be asked for.
    TaskAssigned {
        task_id: String,
        warm: Option<WarmClaim>,
    },
    /// The backend answered a cold launch (how long it took, or why not).
    Launched {
        task_id: String,
        result: Result<Duration, BackendError>,
    },
    /// The task's status, as the gateway's watch of the backend saw it, or
    /// why the backend could not tell.
    Observed {
        task_id: String,
        status: Result<TaskStatus, BackendError>,
    },
    /// A runner socket completed its `hello`.
    RunnerConnected(RunnerHello),
    /// The current runner socket closed.
    RunnerDisconnected,
    /// The runner handled agent inputs up to this number.
    Heartbeat {
        inputs_received: u64,
    },
    /// The agent is up; `conversations` are the session's, loaded when
    /// [`Machine::restore_needed`] said so.
    AgentReady {
        agent: AgentInfo,
        agent_start_ms: Option<u64>,
        prestarted: bool,
        conversations: Result<Vec<ConversationRef>, String>,
    },
    Restored {
        count: u32,
    },
    /// The sandbox could not start the agent.
    StartFailed {
        why: String,
    },
    /// The agent or its task died.
    TaskLost {
        why: String,
    },
    /// Stop the task (admin action, gateway shutdown); a start in progress
    /// is abandoned.
    StopRequested {
        reason: String,
    },
    Stopped {
        task_id: String,
        result: Result<(), String>,
    },
    /// Time passed: deadlines may have expired.
    Tick,
}

#[derive(Debug, Clone, Copy)]
pub struct WarmClaim {
    pub generation: u64,
    /// How long the claim took.
    pub took: Duration,
}

#[derive(Debug, Clone)]
pub struct RunnerHello {
    pub task_id: String,
    pub generation: u64,
    pub agent_running: bool,
    /// Its `hello` names this session.
    pub for_this_session: bool,
    /// Highest agent input the runner handled.
    pub inputs_received: u64,
}

/// What the actor must do, in order.
// Effects live for one step; boxing the runner frames would cost an
// allocation per agent input for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// A stream event for every client: numbered, stored, replayed.
    Emit(ServerEvent),
    /// A frame for the current runner (dropped when none is connected).
    ToRunner(GatewayToRunner),
    /// Check the user's task limit, then prepare their workspace off the
    /// actor; answer with `WorkspacePrepared` or `StartRefused`.
    PrepareWorkspace,
    /// Claim a warm runner or queue a cold launch; answer with
    /// `TaskAssigned` or `StartRefused`.
    ClaimOrLaunch,
    /// Ask the backend to launch this cold task; `Launched` comes back.
    Launch {
        task_id: String,
    },
    /// Subscribe to the task's status (replacing any subscription);
    /// `Observed` comes back, for each change, until `StopWatching`.
    WatchStatus {
        task_id: String,
    },
    StopWatching,
    /// The runner socket just offered becomes the task's.
    UseRunner,
    /// The task has no runner socket any more.
    DropRunner,
    /// Send `init_user` to the runner.
    SendInitUser,
    /// The offered runner socket is refused, with this reason.
    RejectRunner(String),
    /// Register an adopted task as this session's in the gateway's task map.
    OwnTask {
        task_id: String,
    },
    /// The task is no longer this session's: out of the gateway's task map.
    ForgetTask {
        task_id: String,
    },
    /// Store which task the session is bound to.
    BindTask(Option<String>),
    UsageStart {
        task_id: String,
    },
    UsageEnd {
        task_id: String,
    },
    /// Stop this task in the background; `Stopped` comes back.
    StopTask {
        task_id: String,
    },
    /// Agent frames up to this runner seq were handled already.
    RunnerSeqFrom(u64),
    /// A log line (and its metric).
    Log(Log),
}

/// Log lines and metrics of the lifecycle.
#[derive(Debug, PartialEq)]
pub enum Log {
    TaskStart {
        task_id: String,
        took: Duration,
    },
    TaskPending {
        task_id: String,
        took: Duration,
    },
    TaskConnect {
        task_id: String,
        took: Duration,
    },
    RunnerReattached {
        task_id: String,
    },
    InputsResent {
        task_id: String,
        count: usize,
    },
    TaskAdopted {
        task_id: String,
    },
    TaskReady {
        task_id: String,
        source: TaskSource,
        took: Duration,
        breakdown: String,
        prestarted: bool,
    },
    TaskRestart {
        task_id: String,
        took: Duration,
        success: bool,
    },
    SessionCreate {
        task_id: String,
        took: Duration,
    },
    StartFailed {
        task_id: String,
        code: ErrorCode,
        took: Duration,
        reason: String,
    },
    TaskLost {
        task_id: String,
        processing: &'static str,
        why: String,
    },
    RunnerDisconnected {
        task_id: String,
    },
    StopFailed {
        task_id: String,
        error: String,
    },
    StopWaitExpired {
        task_id: String,
    },
    IdleTimeout {
        task_id: String,
        idle: Duration,
    },
    DisconnectedProcessing {
        task_id: String,
    },
}

#[derive(Debug)]
pub struct Machine {
    cfg: Config,
    life: Life,
    pub turns: TurnBook,
    /// What agent output may still be stored and relayed.
    pub output: OutputBudget,
    /// Created in this gateway process (not loaded from the store).
    fresh: bool,
    ever_ready: bool,
    session_started_at: Option<Instant>,
    /// The task the store says this session is bound to, with the last
    /// stored agent frame seq (for re-adoption after a gateway restart).
    bound_task: Option<(String, u64)>,
    /// When the last client left (None while one is attached).
    detached_at: Option<Instant>,
}

impl Machine {
    pub fn new(cfg: Config, fresh: bool, bound_task: Option<(String, u64)>, now: Instant) -> Self {
        Machine {
            output: OutputBudget::new(cfg.max_turn_output_bytes),
            cfg,
            life: Life::Idle,
            turns: TurnBook::new(now),
            fresh,
            ever_ready: false,
            session_started_at: None,
            bound_task,
            detached_at: Some(now),
        }
    }

    pub fn state(&self) -> SessionState {
        match &self.life {
            Life::Idle => SessionState::Stopped,
            Life::Obtaining => SessionState::Creating,
            Life::Task(t) => match t.phase {
                Phase::Launching => SessionState::Creating,
                Phase::Pending => SessionState::Pending,
                Phase::Activating | Phase::Restoring => SessionState::Activating,
                Phase::Ready if self.detached_at.is_some() => SessionState::Idle,
                Phase::Ready => SessionState::Running,
            },
            Life::Stopping { .. } => SessionState::Stopping,
        }
    }

    pub fn fresh(&self) -> bool {
        self.fresh
    }

    pub fn task(&self) -> Option<&Task> {
        match &self.life {
            Life::Task(t) => Some(t),
            _ => None,
        }
    }

    fn task_mut(&mut self) -> Option<&mut Task> {
        match &mut self.life {
            Life::Task(t) => Some(t),
            _ => None,
        }
    }

    /// No task, none being obtained, none stopping.
    pub fn is_idle(&self) -> bool {
        matches!(self.life, Life::Idle)
    }

    /// A task is neither running nor being obtained (it may be stopping).
    pub fn has_no_task(&self) -> bool {
        matches!(self.life, Life::Idle | Life::Stopping { .. })
    }

    pub fn detached_at(&self) -> Option<Instant> {
        self.detached_at
    }

    /// The task the session has, if any.
    pub fn current_task_id(&self) -> Option<&str> {
        self.task().map(|t| t.id.as_str())
    }

    /// Whether frames of this runner socket are the current task's.
    pub fn is_current_runner(&self, task_id: &str, generation: u64) -> bool {
        self.task()
            .is_some_and(|t| t.id == task_id && t.runner == Some(generation))
    }

    pub fn task_ready(&self) -> bool {
        self.task().is_some_and(|t| t.phase == Phase::Ready)
    }

    /// An agent that just said `ready` needs the session's conversations:
    /// only a replacement task does (a first start has none, an adopted
    /// one kept its state).
    pub fn restore_needed(&self) -> bool {
        self.task()
            .is_some_and(|t| t.phase == Phase::Activating && t.is_restart && !t.adopted)
    }

    /// Whether a message may go to the task now. Once it is ready, yes. On
    /// a first start, also while the agent is activating: the runner writes
    /// messages to the agent right behind its `init`, so the agent begins as
    /// soon as it is up instead of after a round trip through the gateway
    /// (its `ready` still reaches us first). A restart waits for `ready`,
    /// because the conversations must be restored before any message.
    pub fn accepts_messages(&self) -> bool {
        self.task().is_some_and(|t| match t.phase {
            Phase::Ready => true,
            Phase::Activating => !t.is_restart && t.runner.is_some(),
            _ => false,
        })
    }

    /// The earliest deadline, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |d: Option<Instant>| {
            if let Some(d) = d {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        };
        match &self.life {
            Life::Task(task) => {
                consider(task.phase_deadline);
                consider(task.overall_deadline);
                consider(
                    task.runner_lost_at
                        .map(|t| t + self.cfg.deadlines.runner_reconnect),
                );
                if task.phase == Phase::Ready {
                    if !self.turns.busy() {
                        consider(Some(self.turns.idle_since() + self.cfg.idle_timeout));
                    } else if let Some(detached) = self.detached_at {
                        consider(Some(detached + self.cfg.disconnect_processing_timeout));
                    }
                }
            }
            Life::Stopping {
                since,
                then_start: true,
                ..
            } => consider(Some(*since + self.cfg.deadlines.stop_wait)),
            Life::Idle | Life::Obtaining | Life::Stopping { .. } => {}
        }
        next
    }
}

/// Apply one input at `now`; the effects come back in the order the actor
/// must carry them out.
pub fn step(m: &mut Machine, input: Input, now: Instant) -> Vec<Effect> {
    let mut out = Vec::new();
    m.apply(input, now, &mut out);
    out
}

impl Machine {
    fn apply(&mut self, input: Input, now: Instant, out: &mut Vec<Effect>) {
        match input {
            Input::ClientAttached => self.detached_at = None,
            Input::LastClientLeft => self.detached_at = Some(now),
            Input::StartWanted => self.start_wanted(now, out),
            Input::Message(msg) => {
                if self.accepts_messages() {
                    self.dispatch(msg, out);
                } else {
                    self.turns.push_back(msg);
                    if let Life::Stopping { then_start, .. } = &mut self.life {
                        *then_start = true;
                    }
                }
            }
            Input::MessageOverQuota { message, sentence } => {
                self.turns.push_back(message);
                out.push(Effect::Emit(ServerEvent::error(
                    ErrorCode::QuotaExceeded,
                    sentence,
                )));
            }
            Input::Abort { conversation_id } => {
                self.send_if_ready(
                    AgentInput::Abort {
                        conversation_id: conversation_id.clone(),
                    },
                    out,
                );
                // Queued messages of that conversation will not run either.
                self.turns.drop_queued(conversation_id.as_deref());
            }
            Input::ToAgent(frame) => {
                if let AgentInput::AnswerQuestion { request_id, .. } = &frame {
                    self.turns.question_answered(request_id);
                }
                self.send_if_ready(frame, out);
            }
            Input::WorkspacePrepared(result) => self.workspace_prepared(result, out),
            Input::StartRefused { error } => {
                if matches!(self.life, Life::Obtaining) {
                    self.life = Life::Idle;
                }
                out.push(Effect::Emit(error));
            }
            Input::TaskAssigned { task_id, warm } => self.task_assigned(task_id, warm, now, out),
            Input::Launched { task_id, result } => self.launched(task_id, result, now, out),
            Input::Observed { task_id, status } => self.observed(&task_id, status, now, out),
            Input::RunnerConnected(hello) => self.runner_connected(hello, now, out),
            Input::RunnerDisconnected => {
                let Some(task) = self.task_mut() else { return };
                task.runner = None;
                task.runner_lost_at = Some(now);
                let task_id = task.id.clone();
                out.push(Effect::DropRunner);
                out.push(Effect::Log(Log::RunnerDisconnected {
                    task_id: task_id.clone(),
                }));
                // Find out at once whether the task died (then fail fast) or lives.
                out.push(Effect::WatchStatus { task_id });
            }
            Input::Heartbeat { inputs_received } => {
                if let Some(task) = self.task_mut() {
                    task.inputs.acknowledge(inputs_received);
                }
            }
            Input::AgentReady {
                agent,
                agent_start_ms,
                prestarted,
                conversations,
            } => self.agent_ready(agent, agent_start_ms, prestarted, conversations, now, out),
            Input::Restored { count } => {
                if let Some(task) = self.task_mut().filter(|t| t.phase == Phase::Restoring) {
                    task.breakdown
                        .push(("restore", ms(now - task.phase_started)));
                    self.become_ready(Some(count), now, out);
                }
            }
            Input::StartFailed { why } => self.fail_start(
                format!("the sandbox could not start the agent: {why}"),
                now,
                out,
            ),
            Input::TaskLost { why } => self.task_lost(why, now, out),
            Input::StopRequested { reason } => {
                if matches!(self.life, Life::Obtaining) {
                    // A start in progress is abandoned: its workspace or
                    // claim answer finds the session idle and is dropped.
                    self.life = Life::Idle;
                    out.push(stopped_status());
                } else if self.task().is_some() {
                    self.end_turns(
                        ErrorCode::AgentCrashed,
                        &format!("your session was stopped: {reason}"),
                        false,
                        now,
                        out,
                    );
                    self.begin_stop(&reason, now, out);
                    out.push(stopped_status());
                }
            }
            Input::Stopped { task_id, result } => {
                out.push(Effect::ForgetTask {
                    task_id: task_id.clone(),
                });
                if let Err(error) = result {
                    out.push(Effect::Log(Log::StopFailed {
                        task_id: task_id.clone(),
                        error,
                    }));
                }
                if let Life::Stopping {
                    task_id: stopping,
                    then_start,
                    ..
                } = &self.life
                    && *stopping == task_id
                {
                    let then_start = *then_start;
                    self.life = Life::Idle;
                    if then_start {
                        self.start_wanted(now, out);
                    }
                }
            }
            Input::Tick => self.tick(now, out),
        }
    }

    fn start_wanted(&mut self, now: Instant, out: &mut Vec<Effect>) {
        if !self.is_idle() {
            return;
        }
        self.life = Life::Obtaining;
        self.session_started_at.get_or_insert(now);
        self.bound_task = None;
        out.push(Effect::RunnerSeqFrom(0));
        out.push(Effect::PrepareWorkspace);
    }

    fn workspace_prepared(&mut self, result: Result<(), String>, out: &mut Vec<Effect>) {
        if !matches!(self.life, Life::Obtaining) {
            return;
        }
        match result {
            Ok(()) => out.push(Effect::ClaimOrLaunch),
            Err(e) => {
                self.life = Life::Idle;
                out.push(Effect::Emit(ServerEvent::error(
                    ErrorCode::TaskStartFailed,
                    format!("could not prepare your workspace: {e}"),
                )));
            }
        }
    }

    fn task_assigned(
        &mut self,
        task_id: String,
        warm: Option<WarmClaim>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        if !matches!(self.life, Life::Obtaining) {
            return;
        }
        let is_restart = self.ever_ready || !self.fresh;
        let deadlines = &self.cfg.deadlines;
        let (source, phase, deadline) = match warm {
            Some(_) => (TaskSource::Warm, Phase::Activating, deadlines.activate),
            None => (TaskSource::Cold, Phase::Launching, deadlines.launch),
        };
        let mut breakdown = Vec::new();
        if let Some(claim) = warm {
            breakdown.push(("claim", ms(claim.took)));
        }
        self.life = Life::Task(Box::new(Task {
            id: task_id.clone(),
            source,
            phase,
            is_restart,
            adopted: false,
            requested_at: now,
            phase_started: now,
            phase_deadline: Some(now + deadline),
            overall_deadline: is_restart.then(|| now + deadlines.restart),
            breakdown,
            runner: warm.map(|c| c.generation),
            runner_lost_at: None,
            agent: AgentInfo::default(),
            agent_prestarted: false,
            inputs: InputLog::default(),
        }));
        out.push(Effect::BindTask(Some(task_id.clone())));
        out.push(Effect::Emit(ServerEvent::Status {
            state: if is_restart {
                TaskPhase::Restarting
            } else {
                TaskPhase::Starting
            },
            source: Some(source),
            eta_ms: Some(if warm.is_some() {
                50
            } else {
                self.cfg.cold_eta_ms
            }),
        }));
        if warm.is_some() {
            // Warm: the runner is connected and waiting; bind it to this user.
            out.push(Effect::UseRunner);
            out.push(Effect::SendInitUser);
            self.dispatch_queued(out);
        } else {
            out.push(Effect::Launch { task_id });
        }
    }

    fn launched(
        &mut self,
        task_id: String,
        result: Result<Duration, BackendError>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let Some(task) = self.task_mut().filter(|t| t.id == task_id) else {
            // A launch that finished after we gave up on it: clean it up.
            if result.is_ok() {
                out.push(Effect::StopTask { task_id });
            }
            return;
        };
        match result {
            Ok(took) => {
                task.breakdown.push(("launch", ms(took)));
                let watch = task.phase == Phase::Launching;
                out.push(Effect::Log(Log::TaskStart {
                    task_id: task_id.clone(),
                    took,
                }));
                if watch {
                    out.push(Effect::WatchStatus { task_id });
                }
            }
            Err(error) => {
                let (why, cause) =
                    backend_failure(&self.cfg.backend_name, "launch a sandbox", &error);
                self.fail_start_because(why, Some(cause), now, out);
            }
        }
    }

    fn observed(
        &mut self,
        task_id: &str,
        status: Result<TaskStatus, BackendError>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let connect = self.cfg.deadlines.connect;
        let Some(task) = self.task_mut().filter(|t| t.id == task_id) else {
            return;
        };
        match status {
            Ok(TaskStatus::Pending) => {}
            // Running with a runner socket away: it may re-dial.
            Ok(TaskStatus::Running) => {
                if task.phase == Phase::Launching {
                    let took = now - task.phase_started;
                    task.breakdown.push(("pending", ms(took)));
                    task.phase = Phase::Pending;
                    task.phase_started = now;
                    task.phase_deadline = Some(now + connect);
                    out.push(Effect::Log(Log::TaskPending {
                        task_id: task_id.to_string(),
                        took,
                    }));
                }
            }
            Ok(TaskStatus::Exited { code, reason }) => {
                let why = format!(
                    "the sandbox exited ({reason}{})",
                    code.map(|c| format!(", code {c}")).unwrap_or_default()
                );
                self.task_lost_because(why, Some(ErrorReason::TaskExited), now, out);
            }
            Ok(TaskStatus::NotFound) => self.task_lost_because(
                "the backend no longer knows this sandbox".into(),
                Some(ErrorReason::TaskExited),
                now,
                out,
            ),
            // Class 1: a failing status call is a failure, never swallowed.
            Err(error) => {
                let (why, cause) = backend_failure(
                    &self.cfg.backend_name,
                    "report the sandbox's status",
                    &error,
                );
                self.task_lost_because(why, Some(cause), now, out);
            }
        }
    }

    fn runner_connected(&mut self, hello: RunnerHello, now: Instant, out: &mut Vec<Effect>) {
        // Only the task the store says this session is bound to may re-attach.
        let bound = self
            .bound_task
            .as_ref()
            .is_some_and(|(t, _)| *t == hello.task_id);
        if self.is_idle() && hello.agent_running && hello.for_this_session && bound {
            // A runner that survived a gateway restart re-attaches: adopt it.
            self.adopt(hello, now, out);
            return;
        }
        let activate = self.cfg.deadlines.activate;
        let Some(task) = self.task_mut().filter(|t| t.id == hello.task_id) else {
            out.push(Effect::RejectRunner(format!(
                "task {} is not this session's current task",
                hello.task_id
            )));
            return;
        };
        let task_id = hello.task_id;
        match task.phase {
            Phase::Launching | Phase::Pending => {
                if task.phase == Phase::Launching {
                    // The runner can dial before the watch says "running".
                    let took = now - task.phase_started;
                    task.breakdown.push(("pending", ms(took)));
                    out.push(Effect::Log(Log::TaskPending {
                        task_id: task_id.clone(),
                        took,
                    }));
                }
                let took = now - task.phase_started;
                task.breakdown.push(("connect", ms(took)));
                task.phase = Phase::Activating;
                task.phase_started = now;
                task.phase_deadline = Some(now + activate);
                task.runner = Some(hello.generation);
                out.push(Effect::UseRunner);
                out.push(Effect::StopWatching);
                out.push(Effect::Log(Log::TaskConnect { task_id, took }));
                out.push(Effect::SendInitUser);
                self.dispatch_queued(out);
            }
            _ => {
                // A re-dial (network blip, gateway restart): swap the socket;
                // the generation makes the old socket's close harmless.
                task.runner = Some(hello.generation);
                task.runner_lost_at = None;
                out.push(Effect::UseRunner);
                out.push(Effect::Log(Log::RunnerReattached {
                    task_id: task_id.clone(),
                }));
                if hello.agent_running {
                    // What the old socket (or none) swallowed goes again.
                    let resend = task.inputs.resend_after(hello.inputs_received);
                    if !resend.is_empty() {
                        out.push(Effect::Log(Log::InputsResent {
                            task_id,
                            count: resend.len(),
                        }));
                    }
                    out.extend(resend.into_iter().map(Effect::ToRunner));
                } else if task.phase == Phase::Activating {
                    task.inputs.clear();
                    // It never ran `init_user`, so not the messages behind it.
                    self.turns.requeue_early_turns();
                    out.push(Effect::SendInitUser);
                    self.dispatch_queued(out);
                }
            }
        }
    }

    fn adopt(&mut self, hello: RunnerHello, now: Instant, out: &mut Vec<Effect>) {
        // Frames the runner resends that were already stored are dropped.
        let stored = self.bound_task.take().map_or(0, |(_, seq)| seq);
        out.push(Effect::RunnerSeqFrom(stored));
        out.push(Effect::Log(Log::TaskAdopted {
            task_id: hello.task_id.clone(),
        }));
        out.push(Effect::OwnTask {
            task_id: hello.task_id.clone(),
        });
        out.push(Effect::UseRunner);
        self.life = Life::Task(Box::new(Task {
            id: hello.task_id,
            source: TaskSource::Cold,
            phase: Phase::Activating,
            is_restart: false,
            adopted: true,
            requested_at: now,
            phase_started: now,
            phase_deadline: Some(now + self.cfg.deadlines.activate),
            overall_deadline: None,
            breakdown: Vec::new(),
            runner: Some(hello.generation),
            runner_lost_at: None,
            agent: AgentInfo::default(),
            agent_prestarted: false,
            inputs: InputLog::continuing_from(hello.inputs_received),
        }));
        self.session_started_at.get_or_insert(now);
    }

    fn agent_ready(
        &mut self,
        agent: AgentInfo,
        agent_start_ms: Option<u64>,
        prestarted: bool,
        conversations: Result<Vec<ConversationRef>, String>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        // A re-dialled runner repeats `ready`; only an activating task counts it.
        if !self.task().is_some_and(|t| t.phase == Phase::Activating) {
            return;
        }
        let conversations = match conversations {
            Ok(c) => c,
            Err(e) => {
                self.fail_start(format!("could not load your conversations: {e}"), now, out);
                return;
            }
        };
        let activate = self.cfg.deadlines.activate;
        let task = self.task_mut().expect("checked above");
        // `init`: workspace and spawn; `agent_ready`: the agent's own start.
        let activating = ms(now - task.phase_started);
        let agent_ms = agent_start_ms.unwrap_or(activating).min(activating);
        task.breakdown.push(("init", activating - agent_ms));
        task.breakdown.push(("agent_ready", agent_ms));
        task.agent = agent;
        task.agent_prestarted = prestarted;
        if conversations.is_empty() {
            self.become_ready(None, now, out);
        } else {
            task.phase = Phase::Restoring;
            task.phase_started = now;
            task.phase_deadline = Some(now + activate);
            out.push(Effect::ToRunner(GatewayToRunner::RestoreConversations {
                conversations,
            }));
        }
    }

    fn become_ready(&mut self, restored: Option<u32>, now: Instant, out: &mut Vec<Effect>) {
        let ever_ready = self.ever_ready;
        let since = self.session_started_at.unwrap_or(now);
        let Some(task) = self.task_mut() else { return };
        if !task.adopted {
            out.push(Effect::UsageStart {
                task_id: task.id.clone(),
            });
        }
        task.phase = Phase::Ready;
        task.phase_deadline = None;
        task.overall_deadline = None;
        out.push(Effect::StopWatching);
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
            out.push(Effect::Log(Log::TaskReady {
                task_id: task_id.clone(),
                source,
                took: total,
                breakdown,
                prestarted,
            }));
            if is_restart {
                out.push(Effect::Log(Log::TaskRestart {
                    task_id: task_id.clone(),
                    took: total,
                    success: true,
                }));
            }
            if !ever_ready {
                out.push(Effect::Log(Log::SessionCreate {
                    task_id,
                    took: now - since,
                }));
            }
        }
        self.ever_ready = true;
        self.turns.reset_idle(now);
        if !adopted {
            out.push(Effect::Emit(ServerEvent::Agent(AgentEvent::Init(agent))));
            out.push(Effect::Emit(ServerEvent::Status {
                state: TaskPhase::Ready,
                source: Some(source),
                eta_ms: None,
            }));
        }
        if let Some(count) = restored.filter(|_| is_restart) {
            out.push(Effect::Emit(ServerEvent::SessionRecovered {
                restored: count,
            }));
        } else if is_restart && !adopted {
            out.push(Effect::Emit(ServerEvent::SessionRecovered { restored: 0 }));
        }
        self.dispatch_queued(out);
    }

    // ---- messages to the agent ------------------------------------------

    /// Send a message to the agent and count the turn.
    fn dispatch(&mut self, msg: QueuedMessage, out: &mut Vec<Effect>) {
        let frame = AgentInput::Message {
            conversation_id: msg.conversation_id.clone(),
            content: msg.content.clone(),
            message_id: msg.message_id.clone(),
        };
        self.output.turn_started(!self.turns.busy());
        self.turns.start_turn(msg);
        // `accepts_messages` was checked: possibly before `ready`.
        self.send_agent_input(frame, out);
    }

    /// Send the queued messages, in order, if the task takes them now.
    fn dispatch_queued(&mut self, out: &mut Vec<Effect>) {
        while self.accepts_messages()
            && let Some(msg) = self.turns.pop_front()
        {
            self.dispatch(msg, out);
        }
    }

    /// Agent input other than messages goes to a ready task only.
    fn send_if_ready(&mut self, frame: AgentInput, out: &mut Vec<Effect>) {
        if self.task_ready() {
            self.send_agent_input(frame, out);
        }
    }

    /// Number and keep an agent input, and send it (if the runner is away it
    /// goes out again when the runner re-dials).
    fn send_agent_input(&mut self, frame: AgentInput, out: &mut Vec<Effect>) {
        if let Some(task) = self.task_mut() {
            out.push(Effect::ToRunner(task.inputs.record(frame)));
        }
    }

    // ---- failures and stops ---------------------------------------------

    /// A start failed: tell the client with a stable code, clean the task up.
    /// Queued messages are kept and run on the next successful start.
    fn fail_start(&mut self, reason: String, now: Instant, out: &mut Vec<Effect>) {
        self.fail_start_because(reason, None, now, out);
    }

    /// [`fail_start`](Self::fail_start) with why, for the client's `reason`.
    fn fail_start_because(
        &mut self,
        reason: String,
        cause: Option<ErrorReason>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let Some(task) = self.task() else { return };
        let (code, verb) = if task.is_restart {
            (ErrorCode::TaskRestartFailed, "restart")
        } else {
            (ErrorCode::TaskStartFailed, "start")
        };
        self.fail_start_with(
            code,
            &format!("could not {verb} your sandbox: {reason}. Send your message again to retry."),
            cause,
            now,
            out,
        );
    }

    fn fail_start_with(
        &mut self,
        code: ErrorCode,
        message: &str,
        cause: Option<ErrorReason>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let Some(task) = self.task() else { return };
        let (task_id, is_restart, took) =
            (task.id.clone(), task.is_restart, now - task.requested_at);
        out.push(Effect::Log(Log::StartFailed {
            task_id: task_id.clone(),
            code,
            took,
            reason: message.to_string(),
        }));
        self.turns.requeue_early_turns();
        if is_restart {
            out.push(Effect::Log(Log::TaskRestart {
                task_id,
                took,
                success: false,
            }));
        }
        out.push(Effect::Emit(match cause {
            Some(cause) => ServerEvent::error_because(code, cause, message),
            None => ServerEvent::error(code, message),
        }));
        out.push(stopped_status());
        self.begin_stop("start failed", now, out);
    }

    /// The task died or became unreachable.
    fn task_lost(&mut self, why: String, now: Instant, out: &mut Vec<Effect>) {
        self.task_lost_because(why, None, now, out);
    }

    /// [`task_lost`](Self::task_lost) with why, for the client's `reason`
    /// when the task was still starting.
    fn task_lost_because(
        &mut self,
        why: String,
        cause: Option<ErrorReason>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let Some(task) = self.task() else { return };
        if task.phase != Phase::Ready {
            self.fail_start_because(why, cause, now, out);
            return;
        }
        out.push(Effect::Log(Log::TaskLost {
            task_id: task.id.clone(),
            processing: self.turns.processing_state(),
            why: why.clone(),
        }));
        if self.turns.busy() {
            // Turns the agent had not started run again on the next task.
            self.end_turns(
                ErrorCode::AgentCrashed,
                &format!("{why}. Your next message will start a new sandbox and resume."),
                true,
                now,
                out,
            );
        }
        out.push(stopped_status());
        self.begin_stop("task lost", now, out);
        if !self.turns.queue_is_empty()
            && let Life::Stopping { then_start, .. } = &mut self.life
        {
            *then_start = true;
        }
    }

    /// End the turns in flight: one error frame per turn, oldest first; with
    /// `requeue_unstarted`, turns that produced no agent event yet go back to
    /// the front of the queue instead (the agent never began them).
    fn end_turns(
        &mut self,
        code: ErrorCode,
        message: &str,
        requeue_unstarted: bool,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let mut requeue = Vec::new();
        for mut turn in self.turns.take_turns() {
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
            out.push(Effect::Emit(ServerEvent::Agent(AgentEvent::Error {
                conversation_id: Some(turn.message.conversation_id),
                error: ErrorBody::new(code, &message),
            })));
        }
        self.turns.requeue_front(requeue);
        self.turns.became_idle(now);
    }

    /// Stop the current task in the background; STOPPING until it is gone.
    fn begin_stop(&mut self, reason: &str, now: Instant, out: &mut Vec<Effect>) {
        let task = match std::mem::replace(&mut self.life, Life::Idle) {
            Life::Task(task) => task,
            other => {
                self.life = other;
                return;
            }
        };
        out.push(Effect::BindTask(None));
        out.push(Effect::UsageEnd {
            task_id: task.id.clone(),
        });
        out.push(Effect::StopWatching);
        if task.runner.is_some() {
            out.push(Effect::ToRunner(GatewayToRunner::Shutdown {
                reason: reason.to_string(),
            }));
            out.push(Effect::DropRunner);
        }
        out.push(Effect::StopTask {
            task_id: task.id.clone(),
        });
        self.life = Life::Stopping {
            task_id: task.id,
            since: now,
            then_start: false,
        };
    }

    // ---- deadlines ------------------------------------------------------

    fn tick(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let d = self.cfg.deadlines.clone();
        if let Life::Stopping {
            task_id,
            since,
            then_start: true,
        } = &self.life
            && now >= *since + d.stop_wait
        {
            out.push(Effect::Log(Log::StopWaitExpired {
                task_id: task_id.clone(),
            }));
            self.life = Life::Idle;
            self.start_wanted(now, out);
            return;
        }
        let Some(task) = self.task() else { return };
        if task.overall_deadline.is_some_and(|t| now >= t) {
            let msg = format!(
                "could not restart your sandbox within {}s. Send your message again to retry.",
                d.restart.as_secs()
            );
            self.fail_start_with(ErrorCode::TaskRestartFailed, &msg, None, now, out);
            return;
        }
        if task.phase_deadline.is_some_and(|t| now >= t) {
            match task.phase {
                Phase::Launching => self.fail_start(
                    format!("the sandbox did not start within {}s", d.launch.as_secs()),
                    now,
                    out,
                ),
                Phase::Pending => self.fail_start_with(
                    ErrorCode::TaskConnectTimeout,
                    &format!(
                        "the sandbox started but did not connect back within {}s. Send your message again to retry.",
                        d.connect.as_secs()
                    ),
                    None,
                    now,
                    out,
                ),
                _ => self.fail_start(
                    format!(
                        "the agent did not become ready within {}s",
                        d.activate.as_secs()
                    ),
                    now,
                    out,
                ),
            }
            return;
        }
        if task
            .runner_lost_at
            .is_some_and(|t| now >= t + d.runner_reconnect)
        {
            self.task_lost(
                format!(
                    "the sandbox lost its connection and did not come back within {}s",
                    d.runner_reconnect.as_secs()
                ),
                now,
                out,
            );
            return;
        }
        if task.phase != Phase::Ready {
            return;
        }
        let task_id = task.id.clone();
        if !self.turns.busy() && now >= self.turns.idle_since() + self.cfg.idle_timeout {
            out.push(Effect::Log(Log::IdleTimeout {
                task_id,
                idle: now - self.turns.idle_since(),
            }));
            self.begin_stop("idle timeout", now, out);
            out.push(stopped_status());
        } else if self.turns.busy()
            && self
                .detached_at
                .is_some_and(|t| now >= t + self.cfg.disconnect_processing_timeout)
        {
            out.push(Effect::Log(Log::DisconnectedProcessing { task_id }));
            self.end_turns(
                ErrorCode::AgentCrashed,
                "the turn was stopped because no client was attached",
                false,
                now,
                out,
            );
            self.begin_stop("client gone during processing", now, out);
            out.push(stopped_status());
        }
    }
}

fn stopped_status() -> Effect {
    Effect::Emit(ServerEvent::Status {
        state: TaskPhase::Stopped,
        source: None,
        eta_ms: None,
    })
}

/// A backend's failure as a sentence for the user (what it could not do,
/// and the runtime's own reason) and the `reason` the client gets.
fn backend_failure(backend: &str, doing: &str, error: &BackendError) -> (String, ErrorReason) {
    match error {
        BackendError::Refused { reason, .. } => (
            format!("the {backend} backend refused to {doing}: {reason}"),
            ErrorReason::BackendRefused,
        ),
        BackendError::Unavailable { reason, .. } => (
            format!("the {backend} backend could not be reached to {doing}: {reason}"),
            ErrorReason::BackendUnreachable,
        ),
        BackendError::NotFound { .. } => (
            format!("the {backend} backend no longer knows this sandbox"),
            ErrorReason::TaskExited,
        ),
    }
}
