//! Agent inputs sent to a task's runner, numbered and kept until the runner
//! says it handled them.
//!
//! A frame written into a runner socket that then drops is lost with it,
//! and so is one sent while the runner is away re-dialling: the user would
//! wait for an answer to a message the agent never saw. So every agent
//! input gets a number (from 1, per task); the runner reports the highest
//! it handled in its `hello` and heartbeats; a re-dial gets everything
//! after that number again, and the runner drops what it already had.

use std::collections::VecDeque;

use aishell_protocol::AgentInput;
use aishell_protocol::GatewayToRunner;

/// Inputs kept for a runner that stays silent; past it the oldest are
/// forgotten (heartbeats acknowledge long before).
const MAX_UNACKED: usize = 10_000;

#[derive(Debug, Default)]
pub(super) struct InputLog {
    last_seq: u64,
    unacked: VecDeque<(u64, AgentInput)>,
}

impl InputLog {
    /// Continue a runner's numbering (a task adopted after a gateway
    /// restart has already handled inputs up to `handled`).
    pub(super) fn continuing_from(handled: u64) -> Self {
        InputLog {
            last_seq: handled,
            unacked: VecDeque::new(),
        }
    }

    /// Number `frame`, keep it, and return the frame to send.
    pub(super) fn record(&mut self, frame: AgentInput) -> GatewayToRunner {
        self.last_seq += 1;
        if self.unacked.len() == MAX_UNACKED {
            self.unacked.pop_front();
        }
        self.unacked.push_back((self.last_seq, frame.clone()));
        GatewayToRunner::Agent {
            seq: self.last_seq,
            frame,
        }
    }

    /// The runner handled everything up to `seq`.
    pub(super) fn acknowledge(&mut self, seq: u64) {
        while self.unacked.front().is_some_and(|(s, _)| *s <= seq) {
            self.unacked.pop_front();
        }
    }

    /// After a re-dial that reported `handled`: the inputs to send again,
    /// in order.
    pub(super) fn resend_after(&mut self, handled: u64) -> Vec<GatewayToRunner> {
        self.acknowledge(handled);
        self.unacked
            .iter()
            .map(|(seq, frame)| GatewayToRunner::Agent {
                seq: *seq,
                frame: frame.clone(),
            })
            .collect()
    }

    /// Forget what is kept (the inputs are being sent again as new ones).
    pub(super) fn clear(&mut self) {
        self.unacked.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping(n: u64) -> AgentInput {
        AgentInput::Ping { id: n.into() }
    }

    fn seqs(frames: &[GatewayToRunner]) -> Vec<u64> {
        frames
            .iter()
            .map(|f| match f {
                GatewayToRunner::Agent { seq, .. } => *seq,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_redial_gets_every_input_after_what_it_handled_in_order() {
        let mut log = InputLog::default();
        let sent: Vec<_> = (1..=5).map(|n| log.record(ping(n))).collect();
        assert_eq!(seqs(&sent), [1, 2, 3, 4, 5]);
        log.acknowledge(2);
        assert_eq!(seqs(&log.resend_after(3)), [4, 5]);
        // Nothing handled yet beyond the heartbeat: all but the acknowledged.
        assert_eq!(seqs(&log.resend_after(0)), [4, 5]);
        log.acknowledge(5);
        assert!(log.resend_after(5).is_empty());
        assert_eq!(seqs(&[log.record(ping(6))]), [6], "numbering goes on");
    }

    #[test]
    fn an_adopted_task_continues_the_runners_numbering() {
        let mut log = InputLog::continuing_from(41);
        assert_eq!(seqs(&[log.record(ping(1))]), [42]);
    }

    #[test]
    fn a_silent_runner_costs_bounded_memory() {
        let mut log = InputLog::default();
        for n in 0..(MAX_UNACKED as u64 + 5) {
            log.record(ping(n));
        }
        let kept = log.resend_after(0);
        assert_eq!(kept.len(), MAX_UNACKED);
        assert_eq!(seqs(&kept[..1]), [6], "the oldest were forgotten");
    }
}
