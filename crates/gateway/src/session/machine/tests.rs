//! The session machine driven input by input with a fake clock: every
//! state, every deadline, the failure classes. Run with
//! `cargo test -p aishell-gateway machine`.

use std::time::{Duration, Instant};

use aishell_backend::{BackendError, TaskStatus};
use aishell_protocol::agent::AgentInfo;
use aishell_protocol::client::{TaskPhase, TaskSource};
use aishell_protocol::{
    AgentEvent, AgentInput, ConversationRef, ErrorCode, GatewayToRunner, ServerEvent, SessionState,
};

use super::turns::QueuedMessage;
use super::*;

const SECOND: Duration = Duration::from_secs(1);

fn config() -> Config {
    Config {
        deadlines: Deadlines::default(),
        idle_timeout: Duration::from_secs(600),
        disconnect_processing_timeout: Duration::from_secs(900),
        backend_name: "process".into(),
        cold_eta_ms: 300,
        max_turn_output_bytes: 1 << 20,
    }
}

/// A machine and its fake clock.
struct Rig {
    m: Machine,
    now: Instant,
}

impl Rig {
    /// A session created by this gateway, no client attached.
    fn fresh() -> Rig {
        let now = Instant::now();
        Rig {
            m: Machine::new(config(), true, None, now),
            now,
        }
    }

    /// A session loaded from the store, bound to `bound` (task, stored seq).
    fn loaded(bound: Option<(&str, u64)>) -> Rig {
        let now = Instant::now();
        let bound = bound.map(|(t, s)| (t.to_string(), s));
        Rig {
            m: Machine::new(config(), false, bound, now),
            now,
        }
    }

    fn pass(&mut self, d: Duration) {
        self.now += d;
    }

    fn step(&mut self, input: Input) -> Vec<Effect> {
        step(&mut self.m, input, self.now)
    }

    fn tick_after(&mut self, d: Duration) -> Vec<Effect> {
        self.pass(d);
        self.step(Input::Tick)
    }

    fn state(&self) -> SessionState {
        self.m.state()
    }

    /// StartWanted and a prepared workspace: waiting for a claim or launch.
    fn obtain(&mut self) {
        self.step(Input::StartWanted);
        let effects = self.step(Input::WorkspacePrepared(Ok(())));
        assert_eq!(effects, vec![Effect::ClaimOrLaunch]);
    }

    /// A cold task `t1` launched and running, its runner not yet dialled.
    fn cold_pending(&mut self) {
        self.obtain();
        self.step(assigned_cold("t1"));
        self.step(launched("t1"));
        self.step(observed("t1", TaskStatus::Running));
        assert_eq!(self.state(), SessionState::Pending);
    }

    /// `t1` with its runner (generation 1) connected.
    fn cold_activating(&mut self) {
        self.cold_pending();
        let effects = self.step(hello("t1", 1, false));
        assert!(effects.contains(&Effect::SendInitUser));
        assert_eq!(self.state(), SessionState::Activating);
    }

    /// `t1` ready.
    fn cold_ready(&mut self) {
        self.cold_activating();
        self.step(agent_ready(Vec::new()));
        assert!(self.m.task_ready());
    }
}

fn assigned_cold(task_id: &str) -> Input {
    Input::TaskAssigned {
        task_id: task_id.into(),
        warm: None,
    }
}

fn assigned_warm(task_id: &str, generation: u64) -> Input {
    Input::TaskAssigned {
        task_id: task_id.into(),
        warm: Some(WarmClaim {
            generation,
            took: Duration::from_millis(2),
        }),
    }
}

fn launched(task_id: &str) -> Input {
    Input::Launched {
        task_id: task_id.into(),
        result: Ok(Duration::from_millis(5)),
    }
}

fn stopped(task_id: &str) -> Input {
    Input::Stopped {
        task_id: task_id.into(),
        result: Ok(()),
    }
}

fn forget(task_id: &str) -> Effect {
    Effect::ForgetTask {
        task_id: task_id.into(),
    }
}

fn observed(task_id: &str, status: TaskStatus) -> Input {
    Input::Observed {
        task_id: task_id.into(),
        status: Ok(status),
    }
}

fn hello(task_id: &str, generation: u64, agent_running: bool) -> Input {
    Input::RunnerConnected(RunnerHello {
        task_id: task_id.into(),
        generation,
        agent_running,
        for_this_session: true,
        inputs_received: 0,
    })
}

fn agent_ready(conversations: Vec<ConversationRef>) -> Input {
    Input::AgentReady {
        agent: AgentInfo::default(),
        agent_start_ms: Some(1),
        prestarted: false,
        conversations: Ok(conversations),
    }
}

fn conversation(id: &str) -> ConversationRef {
    ConversationRef {
        conversation_id: id.into(),
        resume_handle: None,
    }
}

fn message(conversation_id: &str, content: &str, at: Instant) -> QueuedMessage {
    QueuedMessage {
        conversation_id: conversation_id.into(),
        content: content.into(),
        message_id: None,
        received_at: at,
        crashes: 0,
    }
}

/// `(code, message)` of every error event emitted.
fn errors(effects: &[Effect]) -> Vec<(String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Emit(ServerEvent::Agent(AgentEvent::Error { error, .. })) => {
                Some((error.code.clone(), error.message.clone()))
            }
            _ => None,
        })
        .collect()
}

/// The `reason` of each error event.
fn error_reasons(effects: &[Effect]) -> Vec<Option<String>> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Emit(ServerEvent::Agent(AgentEvent::Error { error, .. })) => {
                Some(error.reason.clone())
            }
            _ => None,
        })
        .collect()
}

fn refused(op: &'static str, reason: &str) -> BackendError {
    BackendError::Refused {
        backend: "process",
        op,
        reason: reason.into(),
    }
}

fn unreachable(op: &'static str, reason: &str) -> BackendError {
    BackendError::Unavailable {
        backend: "process",
        op,
        reason: reason.into(),
    }
}

fn error_codes(effects: &[Effect]) -> Vec<String> {
    errors(effects).into_iter().map(|(c, _)| c).collect()
}

fn statuses(effects: &[Effect]) -> Vec<TaskPhase> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Emit(ServerEvent::Status { state, .. }) => Some(*state),
            _ => None,
        })
        .collect()
}

/// The agent messages sent to the runner, as `(input seq, content)`.
fn sent_messages(effects: &[Effect]) -> Vec<(u64, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::ToRunner(GatewayToRunner::Agent {
                seq,
                frame: AgentInput::Message { content, .. },
            }) => Some((*seq, content.clone())),
            _ => None,
        })
        .collect()
}

fn stops(effects: &[Effect]) -> Vec<&str> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::StopTask { task_id } => Some(task_id.as_str()),
            _ => None,
        })
        .collect()
}

fn queued(m: &Machine) -> Vec<(String, u8)> {
    m.turns
        .queued()
        .map(|q| (q.content.clone(), q.crashes))
        .collect()
}

// ---- states and inputs ---------------------------------------------------

#[test]
fn a_start_prepares_the_workspace_then_claims_or_launches() {
    let mut r = Rig::fresh();
    assert_eq!(r.state(), SessionState::Stopped);
    let effects = r.step(Input::StartWanted);
    assert_eq!(
        effects,
        vec![Effect::RunnerSeqFrom(0), Effect::PrepareWorkspace]
    );
    assert_eq!(r.state(), SessionState::Creating);
    assert!(!r.m.is_idle(), "a session obtaining a task is not evicted");
    let effects = r.step(Input::WorkspacePrepared(Ok(())));
    assert_eq!(effects, vec![Effect::ClaimOrLaunch]);
}

#[test]
fn a_start_is_wanted_only_once() {
    // Obtaining, running, stopping: a second StartWanted does nothing.
    let mut obtaining = Rig::fresh();
    obtaining.step(Input::StartWanted);
    let mut running = Rig::fresh();
    running.cold_ready();
    let mut stopping = Rig::fresh();
    stopping.cold_ready();
    stopping.step(Input::StopRequested {
        reason: "admin".into(),
    });
    for (name, mut r) in [
        ("obtaining", obtaining),
        ("running", running),
        ("stopping", stopping),
    ] {
        let before = r.state();
        assert_eq!(r.step(Input::StartWanted), vec![], "{name}");
        assert_eq!(r.state(), before, "{name}");
    }
}

#[test]
fn a_workspace_that_cannot_be_prepared_fails_the_start() {
    let mut r = Rig::fresh();
    r.step(Input::StartWanted);
    let effects = r.step(Input::WorkspacePrepared(Err("disk full".into())));
    assert_eq!(
        errors(&effects),
        vec![(
            "TASK_START_FAILED".into(),
            "could not prepare your workspace: disk full".into()
        )]
    );
    assert_eq!(r.state(), SessionState::Stopped);
    // A late answer for an abandoned start is ignored.
    assert_eq!(r.step(Input::WorkspacePrepared(Ok(()))), vec![]);
}

#[test]
fn a_refused_start_tells_why_and_keeps_the_session_stopped() {
    let mut r = Rig::fresh();
    r.obtain();
    let error = ServerEvent::error(ErrorCode::Overloaded, "busy");
    let effects = r.step(Input::StartRefused {
        error: error.clone(),
    });
    assert_eq!(effects, vec![Effect::Emit(error)]);
    assert_eq!(r.state(), SessionState::Stopped);
    assert!(r.m.is_idle());
}

#[test]
fn a_cold_start_goes_creating_pending_activating_idle_running() {
    let mut r = Rig::fresh();
    r.obtain();
    let effects = r.step(assigned_cold("t1"));
    assert_eq!(
        effects,
        vec![
            Effect::BindTask(Some("t1".into())),
            Effect::Emit(ServerEvent::Status {
                state: TaskPhase::Starting,
                source: Some(TaskSource::Cold),
                eta_ms: Some(300),
            }),
            Effect::Launch {
                task_id: "t1".into()
            },
        ]
    );
    assert_eq!(r.state(), SessionState::Creating);
    let effects = r.step(launched("t1"));
    assert!(effects.contains(&Effect::WatchStatus {
        task_id: "t1".into()
    }));
    assert_eq!(r.step(observed("t1", TaskStatus::Pending)), vec![]);
    assert_eq!(r.state(), SessionState::Creating);
    r.step(observed("t1", TaskStatus::Running));
    assert_eq!(r.state(), SessionState::Pending);
    let effects = r.step(hello("t1", 1, false));
    assert_eq!(
        effects[..2],
        [Effect::UseRunner, Effect::StopWatching],
        "{effects:?}"
    );
    assert!(effects.contains(&Effect::SendInitUser));
    assert_eq!(r.state(), SessionState::Activating);
    assert!(r.m.is_current_runner("t1", 1));
    assert!(!r.m.is_current_runner("t1", 2));
    let effects = r.step(agent_ready(Vec::new()));
    assert_eq!(
        effects[0],
        Effect::UsageStart {
            task_id: "t1".into()
        }
    );
    assert_eq!(statuses(&effects), vec![TaskPhase::Ready]);
    assert!(
        effects.contains(&Effect::Emit(ServerEvent::Agent(AgentEvent::Init(
            AgentInfo::default()
        ))))
    );
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::Emit(ServerEvent::SessionRecovered { .. }))),
        "a first start recovers nothing"
    );
    assert_eq!(r.state(), SessionState::Idle);
    r.step(Input::ClientAttached);
    assert_eq!(r.state(), SessionState::Running);
    r.step(Input::LastClientLeft);
    assert_eq!(r.state(), SessionState::Idle);
}

#[test]
fn a_warm_claim_activates_at_once_and_sends_the_queued_messages() {
    let mut r = Rig::fresh();
    r.obtain();
    let now = r.now;
    r.step(Input::Message(message("c1", "hello", now)));
    assert_eq!(queued(&r.m).len(), 1, "no task yet: queued");
    let effects = r.step(assigned_warm("w1", 7));
    assert!(effects.contains(&Effect::Emit(ServerEvent::Status {
        state: TaskPhase::Starting,
        source: Some(TaskSource::Warm),
        eta_ms: Some(50),
    })));
    let init = effects.iter().position(|e| *e == Effect::SendInitUser);
    assert!(
        init < effects
            .iter()
            .position(|e| matches!(e, Effect::ToRunner(_)))
    );
    assert_eq!(sent_messages(&effects), vec![(1, "hello".into())]);
    assert_eq!(r.state(), SessionState::Activating);
    assert!(r.m.is_current_runner("w1", 7));
    assert!(r.m.turns.busy());
}

#[test]
fn a_first_start_takes_messages_while_activating_a_restart_waits_for_ready() {
    let now = Instant::now();
    let mut first = Rig::fresh();
    first.cold_activating();
    let effects = first.step(Input::Message(message("c1", "a", now)));
    assert_eq!(sent_messages(&effects), vec![(1, "a".into())]);

    let mut restart = Rig::loaded(None);
    restart.cold_activating();
    let effects = restart.step(Input::Message(message("c1", "a", now)));
    assert_eq!(sent_messages(&effects), vec![]);
    let effects = restart.step(agent_ready(Vec::new()));
    assert_eq!(sent_messages(&effects), vec![(1, "a".into())]);
    assert!(effects.contains(&Effect::Emit(ServerEvent::SessionRecovered { restored: 0 })));
}

#[test]
fn a_restart_restores_conversations_before_it_is_ready() {
    let mut r = Rig::loaded(None);
    r.cold_activating();
    assert!(r.m.restore_needed());
    let effects = r.step(agent_ready(vec![conversation("c1"), conversation("c2")]));
    assert_eq!(
        effects,
        vec![Effect::ToRunner(GatewayToRunner::RestoreConversations {
            conversations: vec![conversation("c1"), conversation("c2")]
        })]
    );
    assert_eq!(r.state(), SessionState::Activating);
    let effects = r.step(Input::Restored { count: 2 });
    assert!(effects.contains(&Effect::Emit(ServerEvent::SessionRecovered { restored: 2 })));
    assert_eq!(statuses(&effects), vec![TaskPhase::Ready]);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Log(Log::TaskRestart { success: true, .. })))
    );
    // Late or repeated: nothing.
    assert_eq!(r.step(Input::Restored { count: 2 }), vec![]);
    assert_eq!(r.step(agent_ready(Vec::new())), vec![]);
}

#[test]
fn only_a_replacement_task_restores() {
    let mut first = Rig::fresh();
    first.cold_activating();
    assert!(!first.m.restore_needed());
    let mut restart = Rig::loaded(None);
    restart.cold_pending();
    assert!(
        !restart.m.restore_needed(),
        "not before its runner connects"
    );
    let mut adopted = Rig::loaded(Some(("t9", 3)));
    adopted.step(hello("t9", 1, true));
    assert!(
        !adopted.m.restore_needed(),
        "an adopted agent kept its state"
    );
}

#[test]
fn a_runner_that_dials_before_the_status_poll_counts_pending_and_connect() {
    let mut r = Rig::fresh();
    r.obtain();
    r.step(assigned_cold("t1"));
    r.step(launched("t1"));
    let effects = r.step(hello("t1", 1, false));
    let logs: Vec<_> = effects
        .iter()
        .filter(|e| {
            matches!(
                e,
                Effect::Log(Log::TaskPending { .. } | Log::TaskConnect { .. })
            )
        })
        .collect();
    assert_eq!(logs.len(), 2, "{effects:?}");
    assert_eq!(r.state(), SessionState::Activating);
}

#[test]
fn a_runner_of_another_task_is_refused() {
    let mut r = Rig::fresh();
    r.cold_pending();
    let effects = r.step(hello("t2", 1, false));
    assert_eq!(
        effects,
        vec![Effect::RejectRunner(
            "task t2 is not this session's current task".into()
        )]
    );
    assert_eq!(r.state(), SessionState::Pending);
}

#[test]
fn a_runner_that_survived_a_gateway_restart_is_adopted_only_when_bound() {
    let mut r = Rig::loaded(Some(("t9", 42)));
    let effects = r.step(Input::RunnerConnected(RunnerHello {
        task_id: "t9".into(),
        generation: 3,
        agent_running: true,
        for_this_session: true,
        inputs_received: 5,
    }));
    assert_eq!(
        effects,
        vec![
            Effect::RunnerSeqFrom(42),
            Effect::Log(Log::TaskAdopted {
                task_id: "t9".into()
            }),
            Effect::OwnTask {
                task_id: "t9".into()
            },
            Effect::UseRunner,
        ]
    );
    assert_eq!(r.state(), SessionState::Activating);
    let effects = r.step(agent_ready(Vec::new()));
    assert!(
        effects.iter().all(|e| !matches!(
            e,
            Effect::Emit(_) | Effect::UsageStart { .. } | Effect::Log(Log::TaskReady { .. })
        )),
        "an adopted task is not announced again: {effects:?}"
    );
    assert!(r.m.task_ready());
    // Inputs continue the runner's numbering.
    let effects = r.step(Input::Message(message("c1", "next", r.now)));
    assert_eq!(sent_messages(&effects), vec![(6, "next".into())]);

    // Not bound, agent not running, another session's: refused.
    for (bound, agent_running, for_this_session) in [
        (Some(("t8", 1)), true, true),
        (Some(("t9", 1)), false, true),
        (Some(("t9", 1)), true, false),
        (None, true, true),
    ] {
        let mut r = Rig::loaded(bound);
        let effects = r.step(Input::RunnerConnected(RunnerHello {
            task_id: "t9".into(),
            generation: 1,
            agent_running,
            for_this_session,
            inputs_received: 0,
        }));
        assert!(
            matches!(effects[..], [Effect::RejectRunner(_)]),
            "{bound:?} {agent_running} {for_this_session}: {effects:?}"
        );
        assert_eq!(r.state(), SessionState::Stopped);
    }
}

#[test]
fn a_start_forgets_the_binding_so_the_old_runner_is_not_adopted() {
    let mut r = Rig::loaded(Some(("t9", 4)));
    r.step(Input::StartWanted);
    r.step(Input::StartRefused {
        error: ServerEvent::error(ErrorCode::QuotaExceeded, "limit"),
    });
    let effects = r.step(hello("t9", 1, true));
    assert!(matches!(effects[..], [Effect::RejectRunner(_)]));
}

#[test]
fn session_states_follow_the_lifecycle() {
    // (setup, expected state)
    type Setup = fn(&mut Rig);
    let table: [(&str, Setup, SessionState); 8] = [
        ("new", |_| {}, SessionState::Stopped),
        ("obtaining", |r| r.obtain(), SessionState::Creating),
        (
            "launching",
            |r| {
                r.obtain();
                r.step(assigned_cold("t1"));
            },
            SessionState::Creating,
        ),
        ("pending", |r| r.cold_pending(), SessionState::Pending),
        (
            "activating",
            |r| r.cold_activating(),
            SessionState::Activating,
        ),
        (
            "restoring",
            |r| {
                r.cold_activating();
                r.m.fresh = false;
                r.m.task_mut().unwrap().is_restart = true;
                r.step(agent_ready(vec![conversation("c1")]));
            },
            SessionState::Activating,
        ),
        ("ready, no client", |r| r.cold_ready(), SessionState::Idle),
        (
            "stopping",
            |r| {
                r.cold_ready();
                r.step(Input::StopRequested { reason: "x".into() });
            },
            SessionState::Stopping,
        ),
    ];
    for (name, setup, want) in table {
        let mut r = Rig::fresh();
        setup(&mut r);
        assert_eq!(r.state(), want, "{name}");
    }
}

// ---- deadlines -------------------------------------------------------------

#[test]
fn every_start_phase_has_a_deadline() {
    type Setup = fn(&mut Rig);
    // (phase, setup, deadline, error code, words of the message)
    let table: [(&str, Setup, u64, &str, &str); 4] = [
        (
            "launching",
            |r| {
                r.obtain();
                r.step(assigned_cold("t1"));
            },
            60,
            "TASK_START_FAILED",
            "the sandbox did not start within 60s",
        ),
        (
            "pending",
            |r| r.cold_pending(),
            30,
            "TASK_CONNECT_TIMEOUT",
            "did not connect back within 30s",
        ),
        (
            "activating",
            |r| r.cold_activating(),
            60,
            "TASK_START_FAILED",
            "the agent did not become ready within 60s",
        ),
        (
            "restoring",
            |r| {
                r.cold_activating();
                r.m.task_mut().unwrap().is_restart = true;
                r.step(agent_ready(vec![conversation("c1")]));
            },
            60,
            "TASK_RESTART_FAILED",
            "the agent did not become ready within 60s",
        ),
    ];
    for (phase, setup, secs, code, words) in table {
        let mut r = Rig::fresh();
        setup(&mut r);
        let start = r.now;
        let due = r.m.next_deadline().expect("a deadline");
        assert_eq!(due - start, Duration::from_secs(secs), "{phase}");
        assert_eq!(
            r.tick_after(Duration::from_secs(secs) - SECOND),
            vec![],
            "{phase}: early"
        );
        let effects = r.tick_after(SECOND);
        let errs = errors(&effects);
        assert_eq!(errs.len(), 1, "{phase}: {effects:?}");
        assert_eq!(errs[0].0, code, "{phase}");
        assert!(errs[0].1.contains(words), "{phase}: {}", errs[0].1);
        assert!(
            errs[0].1.ends_with("Send your message again to retry."),
            "{phase}"
        );
        assert_eq!(statuses(&effects), vec![TaskPhase::Stopped], "{phase}");
        assert_eq!(stops(&effects), vec!["t1"], "{phase}");
        assert!(effects.contains(&Effect::UsageEnd {
            task_id: "t1".into()
        }));
        assert!(effects.contains(&Effect::BindTask(None)));
        assert_eq!(r.state(), SessionState::Stopping, "{phase}");
    }
}

#[test]
fn a_restart_as_a_whole_must_finish_within_its_deadline() {
    let mut r = Rig::loaded(None);
    r.obtain();
    r.step(assigned_cold("t1"));
    r.step(launched("t1"));
    r.pass(Duration::from_secs(20));
    r.step(observed("t1", TaskStatus::Running));
    // Pending's own deadline is 30s from now; the restart's 10s.
    let effects = r.tick_after(Duration::from_secs(10));
    let errs = errors(&effects);
    assert_eq!(errs.len(), 1, "{effects:?}");
    assert_eq!(errs[0].0, "TASK_RESTART_FAILED");
    assert!(errs[0].1.contains("within 30s"), "{}", errs[0].1);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Log(Log::TaskRestart { success: false, .. })))
    );
}

#[test]
fn an_idle_task_is_stopped_after_the_idle_timeout() {
    let mut r = Rig::fresh();
    r.cold_ready();
    assert_eq!(r.m.next_deadline(), Some(r.now + Duration::from_secs(600)));
    assert_eq!(r.tick_after(Duration::from_secs(599)), vec![]);
    let effects = r.tick_after(SECOND);
    assert!(matches!(effects[0], Effect::Log(Log::IdleTimeout { .. })));
    assert_eq!(stops(&effects), vec!["t1"]);
    assert_eq!(statuses(&effects), vec![TaskPhase::Stopped]);
    assert!(
        effects.contains(&Effect::ToRunner(GatewayToRunner::Shutdown {
            reason: "idle timeout".into()
        }))
    );
    assert_eq!(r.state(), SessionState::Stopping);
}

#[test]
fn a_busy_task_is_not_idle_and_a_finished_turn_restarts_the_idle_clock() {
    let mut r = Rig::fresh();
    r.cold_ready();
    r.step(Input::ClientAttached);
    r.step(Input::Message(message("c1", "work", r.now)));
    assert_eq!(r.m.next_deadline(), None, "busy with a client: no deadline");
    assert_eq!(r.tick_after(Duration::from_secs(3600)), vec![]);
    let finish = AgentEvent::Finish {
        conversation_id: "c1".into(),
        token_usage: Default::default(),
    };
    let note = r.m.turns.note_event(&finish, r.now);
    assert_eq!(note.finished, Some(("c1".into(), String::new())));
    assert_eq!(r.m.next_deadline(), Some(r.now + Duration::from_secs(600)));
}

#[test]
fn a_turn_with_no_client_attached_is_stopped_after_its_timeout() {
    let mut r = Rig::fresh();
    r.cold_ready();
    r.step(Input::ClientAttached);
    r.step(Input::Message(message("c1", "work", r.now)));
    r.step(Input::LastClientLeft);
    assert_eq!(r.m.next_deadline(), Some(r.now + Duration::from_secs(900)));
    let effects = r.tick_after(Duration::from_secs(900));
    assert!(matches!(
        effects[0],
        Effect::Log(Log::DisconnectedProcessing { .. })
    ));
    assert_eq!(
        errors(&effects),
        vec![(
            "AGENT_CRASHED".into(),
            "the turn was stopped because no client was attached".into()
        )]
    );
    assert_eq!(stops(&effects), vec!["t1"]);
    assert!(!r.m.turns.busy());
}

#[test]
fn a_dropped_runner_socket_must_come_back_within_its_window() {
    let mut r = Rig::fresh();
    r.cold_ready();
    let effects = r.step(Input::RunnerDisconnected);
    assert_eq!(
        effects,
        vec![
            Effect::DropRunner,
            Effect::Log(Log::RunnerDisconnected {
                task_id: "t1".into()
            }),
            Effect::WatchStatus {
                task_id: "t1".into()
            },
        ]
    );
    assert!(!r.m.is_current_runner("t1", 1));
    // The task still runs: keep waiting for the re-dial.
    assert_eq!(r.step(observed("t1", TaskStatus::Running)), vec![]);
    assert_eq!(r.tick_after(Duration::from_secs(29)), vec![]);
    let effects = r.tick_after(SECOND);
    assert!(matches!(effects[0], Effect::Log(Log::TaskLost { .. })));
    assert_eq!(stops(&effects), vec!["t1"]);
    // No socket: no shutdown frame.
    assert!(!effects.iter().any(|e| matches!(e, Effect::ToRunner(_))));
}

#[test]
fn a_redial_within_the_window_keeps_the_task() {
    let mut r = Rig::fresh();
    r.cold_ready();
    r.step(Input::RunnerDisconnected);
    r.pass(Duration::from_secs(10));
    r.step(hello("t1", 2, true));
    assert!(r.m.is_current_runner("t1", 2));
    assert_eq!(r.tick_after(Duration::from_secs(25)), vec![]);
    assert_eq!(r.state(), SessionState::Idle);
}

#[test]
fn a_new_start_waits_for_the_old_task_to_stop_but_not_forever() {
    let mut r = Rig::fresh();
    r.cold_ready();
    r.step(Input::StopRequested { reason: "x".into() });
    assert_eq!(r.m.next_deadline(), None, "nothing waits on the stop yet");
    r.step(Input::Message(message("c1", "again", r.now)));
    assert_eq!(r.m.next_deadline(), Some(r.now + Duration::from_secs(10)));
    assert_eq!(r.tick_after(Duration::from_secs(9)), vec![]);
    let effects = r.tick_after(SECOND);
    assert_eq!(
        effects,
        vec![
            Effect::Log(Log::StopWaitExpired {
                task_id: "t1".into()
            }),
            Effect::RunnerSeqFrom(0),
            Effect::PrepareWorkspace,
        ]
    );
    // The old task's stop lands later: forgotten, nothing else.
    let effects = r.step(stopped("t1"));
    assert_eq!(effects, vec![forget("t1")]);
    assert_eq!(r.state(), SessionState::Creating);
}

// ---- failure classes -------------------------------------------------------

#[test]
fn class1_a_launch_error_fails_the_start_and_keeps_the_messages() {
    let mut r = Rig::fresh();
    r.obtain();
    r.step(Input::Message(message("c1", "first", r.now)));
    r.step(assigned_cold("t1"));
    let effects = r.step(Input::Launched {
        task_id: "t1".into(),
        result: Err(refused("launch", "no such image")),
    });
    assert_eq!(
        errors(&effects),
        vec![(
            "TASK_START_FAILED".into(),
            "could not start your sandbox: the process backend refused to launch a sandbox: no such image. Send your message again to retry.".into()
        )]
    );
    assert_eq!(
        error_reasons(&effects),
        vec![Some("backend_refused".into())]
    );
    assert_eq!(stops(&effects), vec!["t1"]);
    assert_eq!(queued(&r.m), vec![("first".into(), 0)]);
}

#[test]
fn class1_a_failing_status_call_fails_a_start_or_loses_a_ready_task() {
    let failing = |r: &mut Rig| {
        r.step(Input::Observed {
            task_id: "t1".into(),
            status: Err(refused("status", "api down")),
        })
    };
    let mut starting = Rig::fresh();
    starting.cold_pending();
    let effects = failing(&mut starting);
    assert_eq!(error_codes(&effects), vec!["TASK_START_FAILED"]);
    assert!(
        errors(&effects)[0]
            .1
            .contains("refused to report the sandbox's status: api down")
    );

    let mut ready = Rig::fresh();
    ready.cold_ready();
    let effects = failing(&mut ready);
    assert!(matches!(effects[0], Effect::Log(Log::TaskLost { .. })));
    assert_eq!(
        error_codes(&effects),
        Vec::<String>::new(),
        "no turn: no error"
    );
    assert_eq!(statuses(&effects), vec![TaskPhase::Stopped]);
}

#[test]
fn a_refusing_and_an_unreachable_runtime_reach_the_client_apart() {
    let launch_failing = |error: BackendError| {
        let mut r = Rig::fresh();
        r.obtain();
        r.step(assigned_cold("t1"));
        r.step(Input::Launched {
            task_id: "t1".into(),
            result: Err(error),
        })
    };
    let refusal = launch_failing(refused("launch", "AccessDenied"));
    let outage = launch_failing(unreachable("launch", "connection refused"));
    assert_eq!(error_codes(&refusal), vec!["TASK_START_FAILED"]);
    assert_eq!(error_codes(&outage), vec!["TASK_START_FAILED"]);
    assert_eq!(
        error_reasons(&refusal),
        vec![Some("backend_refused".into())]
    );
    assert_eq!(
        error_reasons(&outage),
        vec![Some("backend_unreachable".into())]
    );
    assert!(
        errors(&refusal)[0]
            .1
            .contains("refused to launch a sandbox: AccessDenied")
    );
    assert!(
        errors(&outage)[0]
            .1
            .contains("could not be reached to launch a sandbox: connection refused")
    );
    // A task that exits before its runner dials back: task_exited.
    let mut r = Rig::fresh();
    r.cold_pending();
    let effects = r.step(observed(
        "t1",
        TaskStatus::Exited {
            code: Some(2),
            reason: "exit code 2".into(),
        },
    ));
    assert_eq!(error_reasons(&effects), vec![Some("task_exited".into())]);
    // A deadline is no runtime's answer: no reason.
    let mut r = Rig::fresh();
    r.obtain();
    r.step(assigned_cold("t1"));
    let effects = r.tick_after(Duration::from_secs(60));
    assert_eq!(error_reasons(&effects), vec![None]);
}

#[test]
fn class1_a_task_that_exits_or_vanishes_is_lost() {
    for (status, words) in [
        (
            TaskStatus::Exited {
                code: Some(137),
                reason: "OOMKilled".into(),
            },
            "the sandbox exited (OOMKilled, code 137)",
        ),
        (
            TaskStatus::NotFound,
            "the backend no longer knows this sandbox",
        ),
    ] {
        let mut r = Rig::fresh();
        r.cold_pending();
        let effects = r.step(observed("t1", status));
        let errs = errors(&effects);
        assert!(errs[0].1.contains(words), "{}", errs[0].1);
        assert_eq!(r.state(), SessionState::Stopping);
    }
}

#[test]
fn class2_a_launch_that_answers_after_we_gave_up_is_stopped() {
    let mut r = Rig::fresh();
    r.obtain();
    r.step(assigned_cold("t1"));
    r.tick_after(Duration::from_secs(60));
    assert_eq!(r.state(), SessionState::Stopping);
    // A launch of a task no longer current that succeeded: clean it up.
    let effects = r.step(launched("t-old"));
    assert_eq!(stops(&effects), vec!["t-old"]);
    // One that failed: nothing to clean.
    let effects = r.step(Input::Launched {
        task_id: "t-old".into(),
        result: Err(refused("launch", "x")),
    });
    assert_eq!(effects, vec![]);
    // A runner of the abandoned task dialling late is refused.
    let effects = r.step(hello("t1", 1, false));
    assert!(matches!(effects[..], [Effect::RejectRunner(_)]));
}

#[test]
fn class3_a_message_during_a_stop_starts_a_task_once_the_old_one_is_gone() {
    let mut r = Rig::fresh();
    r.cold_ready();
    r.step(Input::StopRequested { reason: "x".into() });
    let effects = r.step(Input::Message(message("c1", "hi", r.now)));
    assert_eq!(effects, vec![], "never bound to the dying task");
    // Another task's stop does not count.
    assert_eq!(r.step(stopped("t0")), vec![forget("t0")]);
    let effects = r.step(Input::Stopped {
        task_id: "t1".into(),
        result: Err("timeout".into()),
    });
    assert_eq!(
        effects,
        vec![
            forget("t1"),
            Effect::Log(Log::StopFailed {
                task_id: "t1".into(),
                error: "timeout".into()
            }),
            Effect::RunnerSeqFrom(0),
            Effect::PrepareWorkspace,
        ]
    );
    r.step(Input::WorkspacePrepared(Ok(())));
    let effects = r.step(assigned_warm("w2", 9));
    assert_eq!(sent_messages(&effects), vec![], "a restart waits for ready");
    let effects = r.step(agent_ready(Vec::new()));
    assert_eq!(sent_messages(&effects), vec![(1, "hi".into())]);
}

#[test]
fn class3_a_stop_with_nothing_queued_leaves_the_session_stopped() {
    let mut r = Rig::fresh();
    r.cold_ready();
    r.step(Input::StopRequested { reason: "x".into() });
    let effects = r.step(stopped("t1"));
    assert_eq!(effects, vec![forget("t1")]);
    assert_eq!(r.state(), SessionState::Stopped);
    assert!(r.m.is_idle());
}

#[test]
fn class4_an_agent_crash_retries_an_unstarted_message_once() {
    let mut r = Rig::fresh();
    r.cold_ready();
    r.step(Input::Message(message("c1", "boom", r.now)));
    let effects = r.step(Input::TaskLost {
        why: "the agent exited with code 1".into(),
    });
    assert_eq!(errors(&effects), vec![], "requeued, not answered");
    assert_eq!(queued(&r.m), vec![("boom".into(), 1)]);
    assert_eq!(r.state(), SessionState::Stopping);
    // It runs again on the next task.
    let effects = r.step(stopped("t1"));
    assert!(effects.contains(&Effect::PrepareWorkspace));
    r.step(Input::WorkspacePrepared(Ok(())));
    r.step(assigned_warm("w2", 2));
    let effects = r.step(agent_ready(Vec::new()));
    assert_eq!(sent_messages(&effects), vec![(1, "boom".into())]);
    // Its second death answers it.
    let effects = r.step(Input::TaskLost {
        why: "the agent exited with code 1".into(),
    });
    let errs = errors(&effects);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].0, "AGENT_CRASHED");
    assert!(errs[0].1.contains("tried twice"), "{}", errs[0].1);
    assert!(r.m.turns.queue_is_empty());
}

#[test]
fn class4_a_crash_mid_answer_ends_the_turn_with_an_error() {
    let mut r = Rig::fresh();
    r.cold_ready();
    r.step(Input::Message(message("c1", "long", r.now)));
    let delta = AgentEvent::TextDelta {
        conversation_id: "c1".into(),
        delta: "par".into(),
    };
    assert!(
        r.m.turns
            .note_event(&delta, r.now)
            .first_event_after
            .is_some()
    );
    let effects = r.step(Input::TaskLost {
        why: "the agent was killed by signal 9".into(),
    });
    let errs = errors(&effects);
    assert_eq!(
        errs,
        vec![(
            "AGENT_CRASHED".into(),
            "the agent was killed by signal 9. Your next message will start a new sandbox and resume.".into()
        )]
    );
    assert!(
        r.m.turns.queue_is_empty(),
        "a started turn is not run twice"
    );
    assert_eq!(r.m.next_deadline(), None, "nothing queued: no start waits");
}

#[test]
fn class4_an_agent_that_cannot_start_fails_the_start() {
    let mut r = Rig::fresh();
    r.cold_activating();
    let effects = r.step(Input::StartFailed {
        why: "agent binary missing".into(),
    });
    assert_eq!(
        errors(&effects),
        vec![(
            "TASK_START_FAILED".into(),
            "could not start your sandbox: the sandbox could not start the agent: agent binary missing. Send your message again to retry.".into()
        )]
    );
    // A failure to load the conversations of a restart fails it too.
    let mut r = Rig::loaded(None);
    r.cold_activating();
    let effects = r.step(Input::AgentReady {
        agent: AgentInfo::default(),
        agent_start_ms: None,
        prestarted: false,
        conversations: Err("db down".into()),
    });
    assert_eq!(error_codes(&effects), vec!["TASK_RESTART_FAILED"]);
}

#[test]
fn class5_a_redial_resends_what_the_runner_did_not_handle() {
    let mut r = Rig::fresh();
    r.cold_ready();
    for text in ["one", "two", "three"] {
        r.step(Input::Message(message(text, text, r.now)));
    }
    r.step(Input::Heartbeat { inputs_received: 1 });
    r.step(Input::RunnerDisconnected);
    // Sent while the runner is away: kept for the re-dial.
    let effects = r.step(Input::Message(message("four", "four", r.now)));
    assert_eq!(sent_messages(&effects), vec![(4, "four".into())]);
    let effects = r.step(Input::RunnerConnected(RunnerHello {
        task_id: "t1".into(),
        generation: 2,
        agent_running: true,
        for_this_session: true,
        inputs_received: 2,
    }));
    assert_eq!(
        sent_messages(&effects),
        vec![(3, "three".into()), (4, "four".into())]
    );
    assert!(effects.contains(&Effect::Log(Log::InputsResent {
        task_id: "t1".into(),
        count: 2
    })));
    assert!(r.m.is_current_runner("t1", 2));
}

#[test]
fn class5_a_runner_that_lost_its_agent_while_activating_starts_over() {
    let mut r = Rig::fresh();
    r.cold_activating();
    r.step(Input::Message(message("c1", "early", r.now)));
    r.step(Input::RunnerDisconnected);
    let effects = r.step(hello("t1", 2, false));
    assert!(effects.contains(&Effect::SendInitUser));
    // The early message goes again behind the new `init_user`, numbered on.
    assert_eq!(sent_messages(&effects), vec![(2, "early".into())]);
    assert!(r.m.turns.busy());
}

// ---- clients' other inputs --------------------------------------------------

#[test]
fn an_admin_stop_ends_the_turns_and_stops_the_task() {
    let mut r = Rig::fresh();
    assert_eq!(
        r.step(Input::StopRequested { reason: "x".into() }),
        vec![],
        "no task: nothing to stop"
    );
    r.cold_ready();
    r.step(Input::Message(message("c1", "work", r.now)));
    let effects = r.step(Input::StopRequested {
        reason: "gateway shutdown".into(),
    });
    assert_eq!(
        errors(&effects),
        vec![(
            "AGENT_CRASHED".into(),
            "your session was stopped: gateway shutdown".into()
        )]
    );
    assert_eq!(stops(&effects), vec!["t1"]);
    assert_eq!(statuses(&effects), vec![TaskPhase::Stopped]);
}

#[test]
fn a_stop_abandons_a_start_in_progress() {
    let mut r = Rig::fresh();
    r.step(Input::StartWanted);
    r.step(Input::Message(message("c1", "kept", r.now)));
    let effects = r.step(Input::StopRequested {
        reason: "gateway shutting down".into(),
    });
    assert_eq!(statuses(&effects), vec![TaskPhase::Stopped]);
    assert_eq!(r.state(), SessionState::Stopped);
    // The workspace answer comes too late: no claim, no launch.
    assert_eq!(r.step(Input::WorkspacePrepared(Ok(()))), vec![]);
    assert_eq!(r.step(assigned_cold("t1")), vec![]);
    assert_eq!(queued(&r.m), vec![("kept".into(), 0)]);
}

#[test]
fn an_abort_drops_that_conversations_queued_messages() {
    let mut r = Rig::fresh();
    r.obtain();
    for (cid, text) in [("c1", "a"), ("c2", "b"), ("c1", "c")] {
        r.step(Input::Message(message(cid, text, r.now)));
    }
    let effects = r.step(Input::Abort {
        conversation_id: Some("c1".into()),
    });
    assert_eq!(effects, vec![], "no ready task: no abort frame");
    assert_eq!(queued(&r.m), vec![("b".into(), 0)]);
    r.step(Input::Abort {
        conversation_id: None,
    });
    assert!(r.m.turns.queue_is_empty());

    let mut ready = Rig::fresh();
    ready.cold_ready();
    let effects = ready.step(Input::Abort {
        conversation_id: None,
    });
    assert!(matches!(
        effects[..],
        [Effect::ToRunner(GatewayToRunner::Agent {
            frame: AgentInput::Abort { .. },
            ..
        })]
    ));
}

#[test]
fn a_message_over_the_weekly_quota_is_kept_and_answered() {
    let mut r = Rig::fresh();
    let effects = r.step(Input::MessageOverQuota {
        message: message("c1", "later", r.now),
        sentence: "you have used 10.0 of your 10 sandbox hours".into(),
    });
    assert_eq!(error_codes(&effects), vec!["QUOTA_EXCEEDED"]);
    assert_eq!(queued(&r.m), vec![("later".into(), 0)]);
    assert_eq!(r.state(), SessionState::Stopped);
}

#[test]
fn an_answer_closes_its_question() {
    let mut r = Rig::fresh();
    r.cold_ready();
    r.step(Input::Message(message("c1", "q", r.now)));
    r.m.turns.question_asked("r1".into());
    assert_eq!(r.m.turns.processing_state(), "waiting_for_answer");
    let effects = r.step(Input::ToAgent(AgentInput::AnswerQuestion {
        request_id: "r1".into(),
        answer: "yes".into(),
    }));
    assert_eq!(effects.len(), 1);
    assert_eq!(r.m.turns.processing_state(), "processing");
}
