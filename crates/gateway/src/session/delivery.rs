//! Client delivery: numbering stream events, attaching clients with the
//! events they missed, pushing stored events to them, catch-up of a client
//! that fell behind, connection-local answers; and the batching of
//! acknowledgements to the runner. The rules are ARCHITECTURE.md's "Replay
//! and durability".

use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aishell_protocol::{ServerEvent, ServerFrame};
use aishell_store::Store;
use tokio::sync::mpsc;

use super::replay::ReplayBuffer;

/// Frames queued per client before it counts as too slow and is dropped
/// (it can reconnect with `last_seq` and lose nothing).
const CLIENT_QUEUE: usize = 4096;
/// Page size when replaying from the store.
const REPLAY_PAGE: u32 = 1000;
/// Frames per catch-up batch for a lagging client.
const CATCH_UP_BATCH: usize = 1000;
/// How long an acknowledgement to the runner may wait for later ones to
/// join it. Acks only let the runner forget frames the store holds (a
/// re-sent frame is recognised by its seq), and one per stored batch woke
/// every runner in the middle of a burst of new sessions.
const ACK_DELAY: Duration = Duration::from_millis(200);
/// Stored batches after which an ack goes out at once (long answers).
const ACK_EVERY: u32 = 64;

/// What a connection handler receives for its client. Kept to 24 bytes:
/// a client's queue allocates its first 32 slots when it is created, and
/// every idle client has one.
pub enum Outbound {
    /// A frame; `seq` is set for stream events (not for ephemeral answers),
    /// which are numbered from 1.
    Frame(Option<NonZeroU64>, Arc<str>),
    /// Close the client socket with this code and reason.
    Close(Box<(u16, String)>),
}

const _: () = assert!(std::mem::size_of::<Outbound>() <= 24);

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

impl Lagging {
    fn set(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

/// A batch of missed events for a lagging client.
pub struct CatchUpBatch {
    pub frames: Vec<(u64, Arc<str>)>,
    /// The batch reached the live stream: pushing resumes.
    pub caught_up: bool,
}

struct Client {
    conn_id: u64,
    tx: mpsc::Sender<Outbound>,
    lagging: Arc<Lagging>,
}

impl Client {
    fn is_lagging(&self) -> bool {
        self.lagging.flag.load(Ordering::Acquire)
    }
}

/// One session's stream and the clients reading it.
pub struct Delivery {
    store: Arc<dyn Store>,
    session_id: String,
    clients: Vec<Client>,
    next_seq: u64,
    /// Highest seq stored and sent to clients: events reach clients only
    /// once durable, so a client never holds an event a restarted gateway
    /// could lose.
    delivered_seq: u64,
    replay: ReplayBuffer,
}

impl Delivery {
    /// A stream whose events up to `last_seq` are stored.
    pub fn new(
        store: Arc<dyn Store>,
        session_id: String,
        last_seq: u64,
        replay: ReplayBuffer,
    ) -> Self {
        Delivery {
            store,
            session_id,
            clients: Vec::new(),
            next_seq: last_seq + 1,
            delivered_seq: last_seq,
            replay,
        }
    }

    pub fn delivered_seq(&self) -> u64 {
        self.delivered_seq
    }

    pub fn has_clients(&self) -> bool {
        !self.clients.is_empty()
    }

    /// A stream event's frame: numbered and kept for replay. The caller
    /// stores it; clients get it once stored ([`deliver`](Self::deliver)).
    pub fn number(&mut self, event: ServerEvent) -> (u64, Arc<str>) {
        let seq = self.next_seq;
        let json = self.frame_json(event, seq, false);
        self.next_seq += 1;
        self.replay.push(seq, json.clone());
        (seq, json)
    }

    fn frame_json(&self, event: ServerEvent, seq: u64, ephemeral: bool) -> Arc<str> {
        Arc::from(
            ServerFrame {
                seq,
                session_id: self.session_id.clone(),
                ephemeral,
                event,
            }
            .to_json(),
        )
    }

    /// Add a client: `session` first, then the events after `last_seq` (a
    /// first batch of them when there are many: the connection pulls the
    /// rest through catch-up).
    pub async fn attach(
        &mut self,
        conn_id: u64,
        last_seq: Option<u64>,
        session: ServerEvent,
    ) -> AttachReply {
        let current = self.delivered_seq;
        let mut frames = vec![(None, self.frame_json(session, current, true))];
        let lagging = Arc::new(Lagging::default());
        if let Some(after) = last_seq {
            let missed = self
                .events_between(after.min(current), current, CATCH_UP_BATCH)
                .await;
            if missed.last().is_some_and(|(s, _)| *s < current) {
                // Too much to replay at once: the connection pulls the rest.
                lagging.set();
            }
            frames.extend(missed.into_iter().map(|(s, j)| (Some(s), j)));
        }
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        self.clients.push(Client {
            conn_id,
            tx,
            lagging: lagging.clone(),
        });
        AttachReply {
            frames,
            rx,
            lagging,
        }
    }

    /// Close every client's connection with `code` (they reconnect).
    pub fn close_all(&mut self, code: u16, reason: &str) {
        for client in self.clients.drain(..) {
            // A full queue: dropping it closes the connection all the same.
            let _ = client
                .tx
                .try_send(Outbound::Close(Box::new((code, reason.to_string()))));
        }
    }

    /// Forget a client; false if it was not attached.
    pub fn remove(&mut self, conn_id: u64) -> bool {
        let before = self.clients.len();
        self.clients.retain(|c| c.conn_id != conn_id);
        self.clients.len() != before
    }

    /// Up to `limit` stored events with `after < seq <= upto`, in order:
    /// from the store for what memory no longer holds, then from memory.
    async fn events_between(&self, after: u64, upto: u64, limit: usize) -> Vec<(u64, Arc<str>)> {
        let mut out = Vec::new();
        let mem_start = self.replay.first_seq().unwrap_or(self.next_seq);
        let mut cursor = after;
        while cursor < upto && cursor + 1 < mem_start && out.len() < limit {
            let page = match self
                .store
                .events_after(&self.session_id, cursor, REPLAY_PAGE)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(event = "replay_failed", sessionId = %self.session_id, error = %e, "could not read events for replay");
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
    pub async fn catch_up(&mut self, conn_id: u64, after: u64) -> CatchUpBatch {
        let upto = self.delivered_seq;
        let frames = self.events_between(after, upto, CATCH_UP_BATCH).await;
        let caught_up = frames.last().is_none_or(|(s, _)| *s >= upto);
        if caught_up && let Some(c) = self.clients.iter().find(|c| c.conn_id == conn_id) {
            c.lagging.flag.store(false, Ordering::Release);
        }
        CatchUpBatch { frames, caught_up }
    }

    /// Events up to `seq` are stored: send them to every client that keeps up.
    pub async fn deliver(&mut self, seq: u64) {
        if seq <= self.delivered_seq {
            return;
        }
        let frames = self
            .events_between(self.delivered_seq, seq, usize::MAX)
            .await;
        self.delivered_seq = seq;
        for c in self.clients.iter().filter(|c| !c.is_lagging()) {
            let sent = frames.iter().all(|(s, json)| {
                c.tx.try_send(Outbound::Frame(NonZeroU64::new(*s), json.clone()))
                    .is_ok()
            });
            if !sent {
                // Its queue is full: stop pushing; it pulls from the store.
                tracing::warn!(event = "client_lagging", sessionId = %self.session_id, connId = c.conn_id, "client fell behind; switching it to catch-up from the store");
                c.lagging.set();
            }
        }
    }

    /// A connection-local answer (pong, BAD_FRAME, lists): never replayed.
    pub fn reply(&self, conn_id: u64, event: ServerEvent) {
        let json = self.frame_json(event, self.delivered_seq, true);
        if let Some(c) = self.clients.iter().find(|c| c.conn_id == conn_id) {
            let _ = c.tx.try_send(Outbound::Frame(None, json));
        }
    }
}

/// An acknowledgement to the runner held back for [`ACK_DELAY`].
struct PendingAck {
    task_id: String,
    /// Highest stored runner seq.
    seq: u64,
    /// Stored batches it covers.
    batches: u32,
    due: Instant,
}

/// Acknowledgements to the runner, combined.
#[derive(Default)]
pub struct AckBatcher {
    pending: Option<PendingAck>,
}

impl AckBatcher {
    /// Frames of `task_id` up to `seq` are stored; `(task, seq)` to send
    /// now when enough batches were held back.
    pub fn stored(&mut self, task_id: String, seq: u64, now: Instant) -> Option<(String, u64)> {
        let ack = match self.pending.take() {
            Some(p) if p.task_id == task_id => PendingAck {
                seq,
                batches: p.batches + 1,
                ..p
            },
            _ => PendingAck {
                task_id,
                seq,
                batches: 1,
                due: now + ACK_DELAY,
            },
        };
        if ack.batches >= ACK_EVERY {
            return Some((ack.task_id, ack.seq));
        }
        self.pending = Some(ack);
        None
    }

    pub fn due(&self) -> Option<Instant> {
        self.pending.as_ref().map(|a| a.due)
    }

    /// The held acknowledgement, once due.
    pub fn take_due(&mut self, now: Instant) -> Option<(String, u64)> {
        if self.pending.as_ref().is_some_and(|a| now >= a.due) {
            return self.pending.take().map(|a| (a.task_id, a.seq));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_wait_for_company_then_go_out_together() {
        let now = Instant::now();
        let mut acks = AckBatcher::default();
        assert_eq!(acks.stored("t1".into(), 3, now), None);
        assert_eq!(acks.due(), Some(now + ACK_DELAY));
        assert_eq!(acks.stored("t1".into(), 9, now + ACK_DELAY / 2), None);
        assert_eq!(
            acks.due(),
            Some(now + ACK_DELAY),
            "the first one's due time"
        );
        assert_eq!(acks.take_due(now + ACK_DELAY / 2), None);
        assert_eq!(acks.take_due(now + ACK_DELAY), Some(("t1".into(), 9)));
        assert_eq!(acks.due(), None);
    }

    #[test]
    fn many_batches_are_acknowledged_at_once_and_a_new_task_starts_over() {
        let now = Instant::now();
        let mut acks = AckBatcher::default();
        for seq in 1..ACK_EVERY as u64 {
            assert_eq!(acks.stored("t1".into(), seq, now), None);
        }
        assert_eq!(acks.stored("t1".into(), 64, now), Some(("t1".into(), 64)));
        assert_eq!(acks.due(), None);
        acks.stored("t1".into(), 70, now);
        // Another task's frames replace what was held for the old one.
        acks.stored("t2".into(), 1, now + ACK_DELAY);
        assert_eq!(acks.take_due(now + ACK_DELAY), None);
        assert_eq!(acks.take_due(now + 2 * ACK_DELAY), Some(("t2".into(), 1)));
    }
}
