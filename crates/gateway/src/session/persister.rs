//! A session's event persister: writes its events (with its task binding and
//! state) to the store in order and reports back what is stored. Clients get an event only once it is stored
//! (a restarted gateway never contradicts what a client saw), and the runner
//! learns which of its frames it may forget.
//!
//! Writes are pipelined: each batch is handed to the store as soon as it is
//! formed, without waiting for the one before it to commit. The store's
//! writer applies them first in, first out (one group commit can carry a
//! session's start-up events, its task binding and the agent's first reply),
//! and completions are reported strictly in submission order.
//!
//! A write that fails breaks the pipeline: the persister lets the writes
//! behind it finish, then runs the failed one and every one after it again,
//! one at a time and in order, retrying each until it succeeds. Every write
//! is idempotent (events are keyed by seq, `last_seq` only rises, a task
//! binding is a plain set), so running a later write twice leaves the store
//! exactly as the strictly sequential order would have.

use std::sync::Arc;
use std::time::Duration;

use aishell_store::{SessionWrite, Store, StoredEvent};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use tokio::sync::mpsc;

use super::actor::SessionCmd;

/// Work for the persister, applied strictly in order.
pub(super) enum PersistItem {
    Event {
        event: StoredEvent,
        /// The agent frame this event carries (its runner seq), if any.
        runner_seq: Option<u64>,
    },
    /// Bind the session to a task (or none); resets the stored runner seq.
    BindTask(Option<String>),
    /// The session's state (SPEC §3.1) changed; only the latest is written.
    State(String),
}

/// Most items taken from the queue for one round of writes.
const MAX_ITEMS: usize = 512;

/// One write, kept so it can be run again.
enum Unit {
    /// Store events and the latest state; `ack` is the runner seq of the
    /// last agent frame among the events, with the task it came from.
    Session {
        events: Vec<StoredEvent>,
        ack: Option<(String, u64)>,
        state: Option<String>,
    },
    /// Record the session's task.
    Bind(Option<String>),
}

type Write = BoxFuture<'static, (Unit, bool)>;

pub(super) fn spawn(
    store: Arc<dyn Store>,
    session_id: String,
    bound_task: Option<String>,
    tx: mpsc::Sender<SessionCmd>,
) -> mpsc::UnboundedSender<PersistItem> {
    let (persist_tx, mut rx) = mpsc::unbounded_channel::<PersistItem>();
    tokio::spawn(async move {
        let session_id: Arc<str> = session_id.into();
        // The task the store will have bound once the queued writes ran.
        let mut task = bound_task;
        let mut in_flight: FuturesOrdered<Write> = FuturesOrdered::new();
        let mut items = Vec::with_capacity(64);
        let mut open = true;
        while open || !in_flight.is_empty() {
            tokio::select! {
                // Report completions first: they are what clients wait for.
                biased;
                Some((unit, ok)) = in_flight.next(), if !in_flight.is_empty() => {
                    let mut done = vec![unit];
                    if !ok {
                        // Let the writes behind it settle, then redo them all in order.
                        while let Some((unit, _)) = in_flight.next().await {
                            done.push(unit);
                        }
                        for unit in &done {
                            write_until_stored(store.as_ref(), &session_id, unit).await;
                        }
                    }
                    for unit in done {
                        if !report(&tx, unit).await {
                            return;
                        }
                    }
                }
                n = rx.recv_many(&mut items, MAX_ITEMS), if open => {
                    if n == 0 {
                        open = false;
                        continue;
                    }
                    for unit in units(items.drain(..), &mut task) {
                        in_flight.push_back(write_once(&store, &session_id, unit));
                    }
                }
            }
        }
    });
    persist_tx
}

/// The writes for one round of queued items, in order: events and state
/// gathered into one session write, cut wherever the task binding changes
/// (each event's runner seq belongs to the task bound when it was sent).
/// `task` follows the bindings.
fn units(items: impl Iterator<Item = PersistItem>, task: &mut Option<String>) -> Vec<Unit> {
    let mut units = Vec::new();
    let mut gathered = Gathered::default();
    for item in items {
        match item {
            PersistItem::Event { event, runner_seq } => {
                gathered.events.push(event);
                gathered.runner_seq = runner_seq.or(gathered.runner_seq);
            }
            PersistItem::State(state) => gathered.state = Some(state),
            PersistItem::BindTask(next) => {
                units.extend(gathered.take(task));
                task.clone_from(&next);
                units.push(Unit::Bind(next));
            }
        }
    }
    units.extend(gathered.take(task));
    units
}

/// Events and state gathered for one session write.
#[derive(Default)]
struct Gathered {
    events: Vec<StoredEvent>,
    /// The runner seq of the last agent frame among `events`.
    runner_seq: Option<u64>,
    state: Option<String>,
}

impl Gathered {
    /// The session write for what was gathered, acknowledging the frames of
    /// `task`; none when nothing was.
    fn take(&mut self, task: &Option<String>) -> Option<Unit> {
        if self.events.is_empty() && self.state.is_none() {
            return None;
        }
        Some(Unit::Session {
            events: std::mem::take(&mut self.events),
            ack: task.clone().zip(self.runner_seq.take()),
            state: self.state.take(),
        })
    }
}

/// Tell the actor what a stored write allows; false if the actor has gone.
async fn report(tx: &mpsc::Sender<SessionCmd>, unit: Unit) -> bool {
    match unit {
        Unit::Session { events, ack, .. } => match events.last() {
            Some(last) => tx
                .send(SessionCmd::Persisted {
                    seq: last.seq,
                    runner_seq: ack,
                })
                .await
                .is_ok(),
            None => true,
        },
        Unit::Bind(_) => true,
    }
}

async fn try_write(store: &dyn Store, session_id: &str, unit: &Unit) -> bool {
    let result = match unit {
        Unit::Session { events, ack, state } => {
            let write = SessionWrite {
                events,
                runner_ack: ack.as_ref().map(|(t, s)| (t.as_str(), *s)),
                state: state.as_deref(),
            };
            store.write_session(session_id, write).await
        }
        Unit::Bind(task) => store.set_session_task(session_id, task.as_deref()).await,
    };
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(event = "store_error", sessionId = %session_id, error = %e, "could not persist the session's events or task; retrying");
            false
        }
    }
}

/// One attempt, handed to the store now; the unit comes back with the outcome.
fn write_once(store: &Arc<dyn Store>, session_id: &Arc<str>, unit: Unit) -> Write {
    let (store, session_id) = (store.clone(), session_id.clone());
    Box::pin(async move {
        let ok = try_write(store.as_ref(), &session_id, &unit).await;
        (unit, ok)
    })
}

/// Retry with backoff until the store takes it.
async fn write_until_stored(store: &dyn Store, session_id: &str, unit: &Unit) {
    let mut delay = Duration::from_millis(50);
    while !try_write(store, session_id, unit).await {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use aishell_store::{
        ConversationRecord, MessageRecord, Result, SessionRecord, StoreError, TokenRecord,
        UsageSummary,
    };
    use async_trait::async_trait;
    use time::OffsetDateTime;

    use super::*;

    /// A real in-memory store whose session write carrying `fail_seq`
    /// fails once, as a full disk or an I/O error would.
    struct FailsOnce {
        inner: Arc<dyn Store>,
        fail_seq: Mutex<Option<u64>>,
    }

    #[async_trait]
    impl Store for FailsOnce {
        async fn write_session(&self, session_id: &str, write: SessionWrite<'_>) -> Result<()> {
            let fail = {
                let mut fail = self.fail_seq.lock().unwrap();
                let hit = fail.is_some_and(|seq| write.events.iter().any(|e| e.seq == seq));
                if hit {
                    *fail = None;
                }
                hit
            };
            if fail {
                return Err(StoreError::Write("injected failure".into()));
            }
            self.inner.write_session(session_id, write).await
        }
        async fn set_session_task(&self, session_id: &str, task_id: Option<&str>) -> Result<()> {
            self.inner.set_session_task(session_id, task_id).await
        }
        async fn get_session(&self, session_id: &str) -> Result<Option<SessionRecord>> {
            self.inner.get_session(session_id).await
        }
        async fn events_after(&self, s: &str, after: u64, limit: u32) -> Result<Vec<StoredEvent>> {
            self.inner.events_after(s, after, limit).await
        }
        // The persister uses nothing else.
        async fn ping(&self) -> Result<()> {
            unimplemented!()
        }
        async fn ensure_user(&self, _: &str) -> Result<()> {
            unimplemented!()
        }
        async fn create_token(
            &self,
            _: &str,
            _: &str,
            _: bool,
            _: Option<OffsetDateTime>,
        ) -> Result<(TokenRecord, String)> {
            unimplemented!()
        }
        async fn verify_token(&self, _: &str) -> Result<Option<TokenRecord>> {
            unimplemented!()
        }
        async fn list_tokens(&self, _: Option<&str>) -> Result<Vec<TokenRecord>> {
            unimplemented!()
        }
        async fn revoke_token(&self, _: &str) -> Result<bool> {
            unimplemented!()
        }
        async fn create_session(&self, _: &SessionRecord) -> Result<()> {
            unimplemented!()
        }
        async fn list_sessions(&self, _: Option<&str>) -> Result<Vec<SessionRecord>> {
            unimplemented!()
        }
        async fn upsert_conversation(
            &self,
            _: &str,
            _: &str,
            _: Option<&str>,
            _: Option<&str>,
        ) -> Result<()> {
            unimplemented!()
        }
        async fn list_conversations(&self, _: &str) -> Result<Vec<ConversationRecord>> {
            unimplemented!()
        }
        async fn delete_conversation(&self, _: &str, _: &str) -> Result<bool> {
            unimplemented!()
        }
        async fn insert_message(&self, _: &MessageRecord) -> Result<bool> {
            unimplemented!()
        }
        async fn list_messages(&self, _: &str, _: &str) -> Result<Vec<MessageRecord>> {
            unimplemented!()
        }
        async fn usage_start(&self, _: &str, _: &str, _: &str) -> Result<()> {
            unimplemented!()
        }
        async fn usage_end(&self, _: &str) -> Result<()> {
            unimplemented!()
        }
        async fn usage_since(
            &self,
            _: OffsetDateTime,
            _: Option<&str>,
        ) -> Result<Vec<UsageSummary>> {
            unimplemented!()
        }
    }

    fn event(seq: u64) -> PersistItem {
        PersistItem::Event {
            event: StoredEvent {
                seq,
                json: format!("{{\"seq\":{seq}}}"),
            },
            runner_seq: Some(seq),
        }
    }

    /// A write that fails while later ones are already in flight (or
    /// stored) is redone in order: clients hear every seq once, in order,
    /// and the store ends as the sequential order leaves it — including the
    /// frame count of the task bound in between.
    #[tokio::test]
    async fn a_failed_write_is_redone_in_order_and_the_store_ends_as_if_sequential() {
        let inner = aishell_store::open("sqlite::memory:").await.unwrap();
        inner
            .create_session(&SessionRecord::new("s1", "u", "t", "echo"))
            .await
            .unwrap();
        let flaky = Arc::new(FailsOnce {
            inner: inner.clone(),
            fail_seq: Mutex::new(Some(3)),
        });
        let (tx, mut rx) = mpsc::channel(64);
        let persist = spawn(flaky.clone(), "s1".into(), Some("t-old".into()), tx);
        // One item per round, so each is its own pipelined write.
        let items = [
            event(1),
            PersistItem::BindTask(Some("t-new".into())),
            event(2),
            event(3),
            PersistItem::State("RUNNING".into()),
            event(4),
        ];
        for item in items {
            persist.send(item).unwrap();
            tokio::task::yield_now().await;
        }
        let mut heard = Vec::new();
        while heard.len() < 4 {
            let cmd = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("every seq is reported")
                .expect("persister alive");
            if let SessionCmd::Persisted { seq, runner_seq } = cmd {
                heard.push((seq, runner_seq));
            }
        }
        let ack = |task: &str, seq| Some((task.to_string(), seq));
        assert_eq!(
            heard,
            [
                (1, ack("t-old", 1)),
                (2, ack("t-new", 2)),
                (3, ack("t-new", 3)),
                (4, ack("t-new", 4)),
            ]
        );
        drop(persist);
        assert!(
            flaky.fail_seq.lock().unwrap().is_none(),
            "the injected failure happened"
        );
        let session = inner.get_session("s1").await.unwrap().unwrap();
        assert_eq!(
            (
                session.task_id.as_deref(),
                session.runner_seq,
                session.last_seq,
                session.state.as_str()
            ),
            (Some("t-new"), 4, 4, "RUNNING")
        );
        let seqs: Vec<u64> = inner
            .events_after("s1", 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }
}
