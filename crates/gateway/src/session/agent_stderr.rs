//! An agent's stderr, logged once (by the gateway; the runner only forwards
//! it) at the level it deserves: lines written during a turn are held until
//! the turn ends and logged at `warn` if the turn failed or the agent died,
//! at `info` otherwise. Lines outside a turn are logged as they come.

/// Lines held for one turn at most; beyond this they are logged at `info`
/// as they come (a chatty agent should not grow the gateway's memory).
const MAX_HELD: usize = 200;

#[derive(Default)]
pub(super) struct HeldStderr {
    lines: Vec<String>,
}

/// How the lines held so far end up logged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Outcome {
    Ok,
    Failed,
}

impl HeldStderr {
    /// Hold `line` if a turn is running; otherwise (or when full) it is
    /// returned to be logged at `info` now.
    pub(super) fn hold(&mut self, line: String, turn_running: bool) -> Option<String> {
        if turn_running && self.lines.len() < MAX_HELD {
            self.lines.push(line);
            None
        } else {
            Some(line)
        }
    }

    /// The held lines, emptied.
    pub(super) fn take(&mut self) -> Vec<String> {
        std::mem::take(&mut self.lines)
    }
}

/// Log stderr lines of the agent of `session_id`, one event each.
pub(super) fn log_all(
    session_id: &str,
    user_id: &str,
    trace_id: &str,
    lines: &[String],
    outcome: Outcome,
) {
    for line in lines {
        log(session_id, user_id, trace_id, line, outcome);
    }
}

fn log(session_id: &str, user_id: &str, trace_id: &str, line: &str, outcome: Outcome) {
    match outcome {
        Outcome::Ok => {
            tracing::info!(event = "agent_stderr", sessionId = %session_id, userId = %user_id, traceId = %trace_id, line = %line, "agent stderr")
        }
        Outcome::Failed => {
            tracing::warn!(event = "agent_stderr", sessionId = %session_id, userId = %user_id, traceId = %trace_id, line = %line, "agent stderr")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_held_during_a_turn_only_and_bounded() {
        let mut held = HeldStderr::default();
        assert_eq!(held.hold("before".into(), false).as_deref(), Some("before"));
        for i in 0..MAX_HELD {
            assert!(held.hold(format!("l{i}"), true).is_none());
        }
        assert_eq!(held.hold("over".into(), true).as_deref(), Some("over"));
        assert_eq!(held.take().len(), MAX_HELD);
        assert!(held.take().is_empty());
    }
}
