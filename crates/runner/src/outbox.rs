//! Agent frames sent to the gateway but not yet acknowledged by it.
//!
//! The gateway acks a frame once it has stored the event; after a re-dial the
//! runner resends everything unacked and the gateway drops seqs it has seen.

use std::collections::VecDeque;

use aishell_protocol::{AgentEvent, RunnerToGateway};

/// Bound on unacknowledged frames; past it the oldest are dropped (and logged)
/// rather than letting a long gateway outage exhaust the sandbox's memory.
const MAX_UNACKED: usize = 100_000;

#[derive(Default)]
pub struct Outbox {
    next_seq: u64,
    frames: VecDeque<RunnerToGateway>,
}

impl Outbox {
    /// Number a new agent frame and keep it until acknowledged.
    pub fn push(&mut self, frame: AgentEvent) -> RunnerToGateway {
        self.next_seq += 1;
        let framed = RunnerToGateway::Agent {
            seq: self.next_seq,
            frame,
        };
        if self.frames.len() >= MAX_UNACKED {
            self.frames.pop_front();
            tracing::error!(
                event = "runner_outbox_overflow",
                "dropping the oldest unacknowledged agent frame"
            );
        }
        self.frames.push_back(framed.clone());
        framed
    }

    pub fn ack(&mut self, seq: u64) {
        while let Some(RunnerToGateway::Agent { seq: s, .. }) = self.frames.front() {
            if *s > seq {
                break;
            }
            self.frames.pop_front();
        }
    }

    pub fn unacked(&self) -> impl Iterator<Item = &RunnerToGateway> {
        self.frames.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(i: u32) -> AgentEvent {
        AgentEvent::Info {
            message: i.to_string(),
        }
    }

    #[test]
    fn ack_drops_only_acknowledged_frames_in_order() {
        let mut outbox = Outbox::default();
        for i in 0..5 {
            outbox.push(info(i));
        }
        outbox.ack(3);
        let left: Vec<u64> = outbox
            .unacked()
            .map(|f| match f {
                RunnerToGateway::Agent { seq, .. } => *seq,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(left, vec![4, 5]);
    }
}
