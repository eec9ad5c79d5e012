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
//!
//! Usage rows go through here too: a task's start and end are written in
//! the session's order, so an end can never land before its start and
//! leave a row open forever.

use std::sync::Arc;
use std::time::Duration;

use aishell_store::{SessionState, SessionWrite, Store, StoreError, StoredEvent};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use tokio::sync::mpsc;

use super::Mailbox;
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
    /// The session's state changed; only the latest is written.
    State(SessionState),
    /// A task started or stopped serving the session (usage accounting).
    Usage(Usage),
}

/// A usage row to open or close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Usage {
    Start { task_id: String, user_id: String },
    End { task_id: String },
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
        state: Option<SessionState>,
    },
    /// Record the session's task.
    Bind(Option<String>),
    Usage(Usage),
}

/// How one write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Stored,
    /// Retried until stored.
    Failed,
    /// One of several gateways no longer holds the session's lease: nothing
    /// more may be written here (docs/cluster.md).
    LeaseLost,
}

/// A write with its number among the session's writes: one of several
/// gateways hands it to the store with that number (the same when tried
/// again), and the store holds a numbered write back while an earlier one
/// is not stored.
type Numbered = (u64, Unit);

type Write = BoxFuture<'static, (Numbered, Outcome)>;

/// Session writes of one of several gateways carry its lease's fence: the
/// epoch the session's actor was started under, and no other.
type Cluster = Option<Lease>;

#[derive(Clone)]
struct Lease {
    cluster: Arc<crate::cluster::Cluster>,
    /// The epoch held when this persister started (its actor's); `None`
    /// if none was held (nothing may be written).
    epoch: Option<u64>,
}

/// A session's persister. Its task, queue and buffers are created by the
/// first item: a session that writes nothing (a reserved one whose client
/// says nothing) holds none of them.
pub(super) struct Persister {
    tx: Option<mpsc::UnboundedSender<PersistItem>>,
    start: Option<Start>,
}

/// What starting the persister takes.
struct Start {
    store: Arc<dyn Store>,
    cluster: Cluster,
    session_id: String,
    bound_task: Option<String>,
    tx: Mailbox,
}

impl Persister {
    pub(super) fn new(
        store: Arc<dyn Store>,
        cluster: Option<Arc<crate::cluster::Cluster>>,
        session_id: String,
        bound_task: Option<String>,
        tx: Mailbox,
    ) -> Self {
        // The actor starts right after its lease was claimed: this is its
        // epoch, read now and not when the first write comes. A persister
        // outlives its actor while it retries writes; if this gateway
        // claims the session again meanwhile (a new actor, a new epoch),
        // the old writes must be refused, not stored under the new epoch
        // over the new actor's numbering.
        let cluster = cluster.map(|cluster| Lease {
            epoch: cluster.fence(&session_id),
            cluster,
        });
        Persister {
            tx: None,
            start: Some(Start {
                store,
                cluster,
                session_id,
                bound_task,
                tx,
            }),
        }
    }

    /// Queue a write, after every one queued before it.
    pub(super) fn send(&mut self, item: PersistItem) {
        if let Some(start) = self.start.take() {
            self.tx = Some(spawn(start));
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(item);
        }
    }

    /// Whether any write was queued.
    #[cfg(test)]
    fn started(&self) -> bool {
        self.tx.is_some()
    }
}

fn spawn(start: Start) -> mpsc::UnboundedSender<PersistItem> {
    let Start {
        store,
        cluster,
        session_id,
        bound_task,
        tx,
    } = start;
    // Writes are numbered. One of several gateways must never have a later
    // write stored past an earlier one that failed (raising `last_seq` and
    // `runner_seq` past a hole): if it then stepped down or died before
    // redoing it, the new owner would drop the runner's resent frames for
    // the hole as already stored, lost for good. Its store (PostgreSQL)
    // refuses a numbered write past a failed one until that one is stored.
    let (persist_tx, mut rx) = mpsc::unbounded_channel::<PersistItem>();
    tokio::spawn(async move {
        let session_id: Arc<str> = session_id.into();
        // The task the store will have bound once the queued writes ran.
        let mut task = bound_task;
        let mut in_flight: FuturesOrdered<Write> = FuturesOrdered::new();
        // Formed, not yet handed to the store.
        let mut queued: std::collections::VecDeque<Numbered> = Default::default();
        let mut ordinal = 0u64;
        let mut items = Vec::with_capacity(64);
        let mut open = true;
        while open || !in_flight.is_empty() || !queued.is_empty() {
            while let Some(numbered) = queued.pop_front() {
                in_flight.push_back(write_once(&store, &cluster, &session_id, numbered));
            }
            tokio::select! {
                // Report completions first: they are what clients wait for.
                biased;
                Some((unit, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                    let mut done = vec![unit];
                    let mut lost = outcome == Outcome::LeaseLost;
                    if outcome != Outcome::Stored {
                        // Let the writes behind it settle, then redo them all in order.
                        while let Some((unit, _)) = in_flight.next().await {
                            done.push(unit);
                        }
                        for numbered in &done {
                            if lost {
                                break;
                            }
                            lost = !write_until_stored(store.as_ref(), &cluster, &session_id, numbered).await;
                        }
                    }
                    if lost {
                        let _ = tx.send(SessionCmd::StepDown).await;
                        return;
                    }
                    for (_, unit) in done {
                        if !report(&tx, unit).await {
                            return;
                        }
                    }
                }
                n = rx.recv_many(&mut items, MAX_ITEMS), if open && queued.is_empty() => {
                    if n == 0 {
                        open = false;
                        continue;
                    }
                    queued.extend(units(items.drain(..), &mut task).into_iter().map(|unit| {
                        ordinal += 1;
                        (ordinal, unit)
                    }));
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
            PersistItem::Usage(usage) => {
                units.extend(gathered.take(task));
                units.push(Unit::Usage(usage));
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
    state: Option<SessionState>,
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
async fn report(tx: &Mailbox, unit: Unit) -> bool {
    match unit {
        Unit::Session { events, ack, .. } => match events.last() {
            Some(last) => {
                tx.send(SessionCmd::Persisted {
                    seq: last.seq,
                    runner_seq: ack,
                })
                .await
            }
            None => true,
        },
        Unit::Bind(_) | Unit::Usage(_) => true,
    }
}

async fn try_write(
    store: &dyn Store,
    cluster: &Cluster,
    session_id: &str,
    (ordinal, unit): &Numbered,
) -> Outcome {
    let fence = match cluster {
        Some(lease) => match lease
            .epoch
            .filter(|e| lease.cluster.fence(session_id) == Some(*e))
        {
            Some(epoch) => Some(aishell_store::Fence {
                ordinal: *ordinal,
                ..lease.cluster.fence_of(epoch)
            }),
            None => return Outcome::LeaseLost,
        },
        None => None,
    };
    let result = match unit {
        Unit::Session { events, ack, state } => {
            let write = SessionWrite {
                events,
                runner_ack: ack.as_ref().map(|(t, s)| (t.as_str(), *s)),
                state: *state,
                fence,
            };
            store.write_session(session_id, write).await
        }
        Unit::Bind(task) => {
            store
                .set_session_task(session_id, task.as_deref(), fence)
                .await
        }
        // Both are idempotent: a start that exists is kept, an end only
        // closes an open row.
        Unit::Usage(Usage::Start { task_id, user_id }) => {
            store.usage_start(task_id, session_id, user_id).await
        }
        Unit::Usage(Usage::End { task_id }) => store.usage_end(task_id).await,
    };
    match result {
        Ok(()) => Outcome::Stored,
        Err(StoreError::LeaseLost { epoch, .. }) => {
            tracing::warn!(event = "fenced_write_refused", sessionId = %session_id, epoch, "the store refused a write: another gateway owns this session now");
            Outcome::LeaseLost
        }
        Err(e) => {
            tracing::error!(event = "store_error", sessionId = %session_id, error = %e, "could not persist the session's events, task or usage; retrying");
            Outcome::Failed
        }
    }
}

/// One attempt, handed to the store now; the unit comes back with the outcome.
fn write_once(
    store: &Arc<dyn Store>,
    cluster: &Cluster,
    session_id: &Arc<str>,
    numbered: Numbered,
) -> Write {
    let (store, cluster, session_id) = (store.clone(), cluster.clone(), session_id.clone());
    Box::pin(async move {
        let outcome = try_write(store.as_ref(), &cluster, &session_id, &numbered).await;
        (numbered, outcome)
    })
}

/// Retry with backoff until the store takes it; false when the lease is
/// lost (it never will).
async fn write_until_stored(
    store: &dyn Store,
    cluster: &Cluster,
    session_id: &str,
    numbered: &Numbered,
) -> bool {
    let mut delay = Duration::from_millis(50);
    loop {
        match try_write(store, cluster, session_id, numbered).await {
            Outcome::Stored => return true,
            Outcome::LeaseLost => return false,
            Outcome::Failed => {}
        }
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
        /// Writes in the order they were handed to the store.
        calls: Mutex<Vec<String>>,
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
            let seqs: Vec<String> = write.events.iter().map(|e| e.seq.to_string()).collect();
            self.calls
                .lock()
                .unwrap()
                .push(format!("events {}", seqs.join(",")));
            if fail {
                return Err(StoreError::Write("injected failure".into()));
            }
            self.inner.write_session(session_id, write).await
        }
        async fn set_session_task(
            &self,
            session_id: &str,
            task_id: Option<&str>,
            fence: Option<aishell_store::Fence<'_>>,
        ) -> Result<()> {
            self.inner
                .set_session_task(session_id, task_id, fence)
                .await
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
        async fn register_gateway(&self, _: &str, _: &str) -> Result<()> {
            unimplemented!()
        }
        async fn heartbeat_gateway(&self, _: &str) -> Result<()> {
            unimplemented!()
        }
        async fn remove_gateway(&self, _: &str) -> Result<()> {
            unimplemented!()
        }
        async fn list_gateways(&self) -> Result<Vec<aishell_store::GatewayRecord>> {
            unimplemented!()
        }
        async fn claim_lease(
            &self,
            _: &str,
            _: &str,
            _: Duration,
        ) -> Result<aishell_store::LeaseClaim> {
            unimplemented!()
        }
        async fn renew_leases(&self, _: &str, _: Duration) -> Result<Vec<(String, u64)>> {
            unimplemented!()
        }
        async fn release_lease(&self, _: &str, _: &str, _: u64) -> Result<()> {
            unimplemented!()
        }
        async fn shared_secret(&self, _: &str, _: &[u8]) -> Result<Vec<u8>> {
            unimplemented!()
        }
        async fn count_user_tasks(&self, _: &str) -> Result<u64> {
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
        async fn usage_start(&self, task: &str, session: &str, user: &str) -> Result<()> {
            self.calls.lock().unwrap().push(format!("start {task}"));
            self.inner.usage_start(task, session, user).await
        }
        async fn usage_end(&self, task: &str) -> Result<()> {
            self.calls.lock().unwrap().push(format!("end {task}"));
            self.inner.usage_end(task).await
        }
        async fn usage_since(
            &self,
            since: OffsetDateTime,
            user: Option<&str>,
        ) -> Result<Vec<UsageSummary>> {
            self.inner.usage_since(since, user).await
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
            calls: Mutex::default(),
        });
        let (tx, mut rx) = mpsc::channel(64);
        let mut persist = Persister::new(
            flaky.clone(),
            None,
            "s1".into(),
            Some("t-old".into()),
            Mailbox(tx),
        );
        // One item per round, so each is its own pipelined write.
        let items = [
            event(1),
            PersistItem::BindTask(Some("t-new".into())),
            event(2),
            event(3),
            PersistItem::State(SessionState::Running),
            event(4),
        ];
        for item in items {
            persist.send(item);
            tokio::task::yield_now().await;
        }
        let mut heard = Vec::new();
        while heard.len() < 4 {
            let cmd = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("every seq is reported")
                .expect("persister alive");
            if let SessionCmd::Persisted { seq, runner_seq } = *cmd {
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

    /// A session that writes nothing holds no persister task or queue;
    /// the first item starts them, and it is stored.
    #[tokio::test]
    async fn the_persister_starts_with_the_first_write() {
        let inner = aishell_store::open("sqlite::memory:").await.unwrap();
        inner
            .create_session(&SessionRecord::new("s1", "u", "t", "echo"))
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let mut persist = Persister::new(inner.clone(), None, "s1".into(), None, Mailbox(tx));
        assert!(!persist.started(), "nothing written, nothing started");
        persist.send(event(1));
        assert!(persist.started());
        let cmd = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the write is reported")
            .expect("persister alive");
        assert!(matches!(*cmd, SessionCmd::Persisted { seq: 1, .. }));
        assert_eq!(inner.get_session("s1").await.unwrap().unwrap().last_seq, 1);
    }

    /// Usage rows are written in the session's order, behind the events
    /// before them: a task's end can never reach the store before its
    /// start (it did when each was a separate spawned write, leaving the
    /// row open and counting forever), even when they are queued together.
    #[tokio::test]
    async fn usage_rows_reach_the_store_in_the_sessions_order() {
        let inner = aishell_store::open("sqlite::memory:").await.unwrap();
        inner
            .create_session(&SessionRecord::new("s1", "u", "t", "echo"))
            .await
            .unwrap();
        let store = Arc::new(FailsOnce {
            inner: inner.clone(),
            fail_seq: Mutex::new(None),
            calls: Mutex::default(),
        });
        let (tx, mut rx) = mpsc::channel(64);
        let mut persist = Persister::new(store.clone(), None, "s1".into(), None, Mailbox(tx));
        let start = |t: &str| {
            PersistItem::Usage(Usage::Start {
                task_id: t.into(),
                user_id: "u".into(),
            })
        };
        let end = |t: &str| PersistItem::Usage(Usage::End { task_id: t.into() });
        // One round: everything queued at once.
        for item in [event(1), start("t1"), end("t1"), start("t2"), event(2)] {
            persist.send(item);
        }
        tokio::task::yield_now().await;
        // Another round behind it.
        for item in [end("t2"), event(3)] {
            persist.send(item);
        }
        loop {
            let cmd = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("every seq is reported")
                .expect("persister alive");
            if let SessionCmd::Persisted { seq: 3, .. } = *cmd {
                break;
            }
        }
        assert_eq!(
            *store.calls.lock().unwrap(),
            [
                "events 1", "start t1", "end t1", "start t2", "events 2", "end t2", "events 3"
            ]
        );
        let usage = inner
            .usage_since(
                OffsetDateTime::now_utc() - time::Duration::hours(1),
                Some("u"),
            )
            .await
            .unwrap();
        assert_eq!(usage.first().map(|u| u.tasks), Some(2));
        // Both closed: an hour from now they still count (almost) nothing.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let usage = inner
            .usage_since(
                OffsetDateTime::now_utc() - time::Duration::hours(1),
                Some("u"),
            )
            .await
            .unwrap();
        assert_eq!(usage[0].seconds, 0, "a usage row was left open");
    }
}
