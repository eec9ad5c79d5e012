//! Bounded in-memory buffer of a session's recent events, for replay on
//! reconnect (SPEC §3.5). Older events are read back from the store.

use std::collections::VecDeque;
use std::sync::Arc;

pub struct ReplayBuffer {
    capacity: usize,
    events: VecDeque<(u64, Arc<str>)>,
}

impl ReplayBuffer {
    pub fn new(capacity: usize) -> Self {
        ReplayBuffer {
            capacity: capacity.max(1),
            events: VecDeque::new(),
        }
    }

    pub fn push(&mut self, seq: u64, json: Arc<str>) {
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back((seq, json));
    }

    /// Oldest seq still held in memory.
    pub fn first_seq(&self) -> Option<u64> {
        self.events.front().map(|(s, _)| *s)
    }

    /// Events with `after < seq <= upto`, oldest first.
    pub fn range(&self, after: u64, upto: u64) -> impl Iterator<Item = &(u64, Arc<str>)> {
        let start = self.events.partition_point(|(s, _)| *s <= after);
        let end = self.events.partition_point(|(s, _)| *s <= upto);
        self.events.range(start..end.max(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_replays_after_a_seq() {
        let mut b = ReplayBuffer::new(3);
        for s in 1..=5 {
            b.push(s, Arc::from(s.to_string()));
        }
        assert_eq!(b.first_seq(), Some(3));
        let got: Vec<&str> = b.range(3, 5).map(|(_, j)| &**j).collect();
        assert_eq!(got, ["4", "5"]);
        assert_eq!(b.range(3, 4).count(), 1);
        assert_eq!(b.range(5, 9).count(), 0);
    }
}
