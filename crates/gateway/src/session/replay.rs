//! Bounded in-memory buffer of a session's recent events, for replay on
//! reconnect. Older events are read back from the store.
//!
//! Bounded twice: in events and in bytes, so a few huge events cannot pin
//! hundreds of megabytes the way thousands of small ones cannot.

use std::collections::VecDeque;
use std::sync::Arc;

pub struct ReplayBuffer {
    capacity: usize,
    max_bytes: usize,
    bytes: usize,
    events: VecDeque<(u64, Arc<str>)>,
}

impl ReplayBuffer {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        ReplayBuffer {
            capacity: capacity.max(1),
            max_bytes,
            bytes: 0,
            events: VecDeque::new(),
        }
    }

    /// Keep an event; the oldest ones leave until both bounds hold. An
    /// event larger than the byte bound on its own is not kept (the store
    /// has it).
    pub fn push(&mut self, seq: u64, json: Arc<str>) {
        if json.len() > self.max_bytes {
            // Everything older is older than a gap: drop it too, so the
            // buffer stays one contiguous range of seqs.
            self.clear();
            return;
        }
        self.bytes += json.len();
        self.events.push_back((seq, json));
        while self.events.len() > self.capacity || self.bytes > self.max_bytes {
            let Some((_, old)) = self.events.pop_front() else {
                break;
            };
            self.bytes -= old.len();
        }
        if self.events.is_empty() {
            self.clear();
        }
    }

    /// Forget everything and give the memory back.
    fn clear(&mut self) {
        self.events = VecDeque::new();
        self.bytes = 0;
    }

    /// Bytes of the events held.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
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
        let mut b = ReplayBuffer::new(3, 1 << 20);
        for s in 1..=5 {
            b.push(s, Arc::from(s.to_string()));
        }
        assert_eq!(b.first_seq(), Some(3));
        let got: Vec<&str> = b.range(3, 5).map(|(_, j)| &**j).collect();
        assert_eq!(got, ["4", "5"]);
        assert_eq!(b.range(3, 4).count(), 1);
        assert_eq!(b.range(5, 9).count(), 0);
    }

    #[test]
    fn is_bounded_in_bytes_as_well_as_events() {
        let mut b = ReplayBuffer::new(4096, 1000);
        for s in 1..=100 {
            b.push(s, Arc::from("x".repeat(300)));
        }
        assert!(b.bytes() <= 1000, "{} bytes held", b.bytes());
        assert_eq!(b.first_seq(), Some(98), "the newest three fit");
        assert_eq!(b.range(0, 100).count(), 3);
    }

    #[test]
    fn an_event_over_the_byte_bound_empties_it_and_is_not_kept() {
        let mut b = ReplayBuffer::new(10, 1000);
        b.push(1, Arc::from("small"));
        b.push(2, Arc::from("y".repeat(5000)));
        assert_eq!(b.first_seq(), None, "nothing held: the store replays");
        assert_eq!(b.bytes(), 0);
        b.push(3, Arc::from("after"));
        assert_eq!(b.first_seq(), Some(3));
    }
}
