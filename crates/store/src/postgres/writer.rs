//! Group commit for the PostgreSQL store.
//!
//! Every session write (a session's row, its messages, conversations, task
//! binding, events and state, usage rows) goes to one writer task with a
//! connection of its own. It takes whatever is queued and folds writes of
//! one kind into one statement (arrays unnested server-side); each
//! statement commits alone, and its writes are answered once it has.
//! Before, each write was its own statement on a pooled connection: ~15
//! round trips per new session, and a burst of new sessions spent more CPU
//! in PostgreSQL and in the driver than in the rest of the gateway.
//!
//! Order: writes of one session (or one usage row) run in the order they
//! were handed over (a session's row before its first message, a task's
//! binding before the events acknowledged under it) and never share a
//! statement; writes of different sessions may. The store therefore orders
//! writes like the SQLite store's writer does. A batch is not one
//! transaction: every write is atomic alone, and a transaction around the
//! batch would cost two round trips (BEGIN, COMMIT) on the writes' path.
//!
//! Fences: a fenced statement locks the lease rows of its writes `FOR
//! SHARE`, in `session_id` order (a lease renewal locks its rows in the
//! same order, so the two cannot deadlock), and writes only the sessions
//! whose lease still names its gateway and epoch; the others are answered
//! `LeaseLost`. A takeover waits for the statement, or the statement sees
//! the takeover.
//!
//! Failure: a statement that fails (a constraint, say) runs again one
//! write at a time, so one bad write fails alone. Once a write of a
//! session has failed, that session's later writes in the batch fail
//! without running: a later write stored past a failed one would leave a
//! hole.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::{mpsc, oneshot};

use crate::sqlite::{lease_lost, now_ms};
use crate::{OwnedFence, Result, StoreError};

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 256;

/// The writer connection's settings. `lock_timeout`: how long a batch
/// waits for a row lock (a lease a takeover is changing) before it fails
/// and its writes are retried by their callers, so one slow lock cannot
/// hold every session's writes for long. Generic plans: the writer's
/// statements are the same few, keyed by primary keys, and a custom plan
/// per execution (PostgreSQL's default for a prepared statement's first
/// executions, and for good whenever it guesses one cheaper) was planning
/// work on every batch.
const CONNECTION_SETTINGS: [(&str, &str); 2] = [
    ("lock_timeout", "5s"),
    ("plan_cache_mode", "force_generic_plan"),
];

/// A batch not answered within this long (a database unreachable without
/// the connection failing, a lock held past `lock_timeout`) is given up:
/// its callers hear `Unavailable` and the connection is replaced. Its
/// outcome is unknown, which callers of idempotent writes can retry.
const BATCH_DEADLINE: Duration = Duration::from_secs(10);

/// After the writer's connection failed, how long before it reconnects.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// A session's numbered writes under one fence: `(session, gateway, epoch)`.
type Numbering = (String, String, u64);

/// For each numbering, the lowest-numbered write that failed and has not
/// been stored since: later writes wait for it (refused until then).
#[derive(Default)]
struct Failed(HashMap<Numbering, u64>);

/// Failures remembered at most: a session whose writer went away without
/// trying again leaves its entry behind.
const MAX_FAILED: usize = 100_000;

impl Failed {
    fn numbering(q: &Queued) -> Option<(Numbering, u64)> {
        let fence = q.fence.as_ref().filter(|f| f.ordinal > 0)?;
        let session = q.write.session_id()?.to_string();
        Some((
            (session, fence.gateway_id.clone(), fence.epoch),
            fence.ordinal,
        ))
    }

    /// Whether `q` must wait for an earlier write that failed.
    /// (Nothing failed, the common case: no key is built.)
    fn blocks(&self, q: &Queued) -> bool {
        !self.0.is_empty()
            && Self::numbering(q)
                .is_some_and(|(key, ordinal)| self.0.get(&key).is_some_and(|&m| ordinal > m))
    }

    /// Note how `q` went.
    fn record(&mut self, q: &Queued, result: &Result<Written>) {
        if result.is_ok() && self.0.is_empty() {
            return;
        }
        let Some((key, ordinal)) = Self::numbering(q) else {
            return;
        };
        match result {
            Ok(_) => {
                if self.0.get(&key) == Some(&ordinal) {
                    self.0.remove(&key);
                }
            }
            // Refused by the fence: so is everything after it.
            Err(StoreError::LeaseLost { .. }) => {}
            Err(_) => {
                if self.0.len() >= MAX_FAILED {
                    tracing::warn!(
                        "postgres writer: forgetting {} failed sessions",
                        self.0.len()
                    );
                    self.0.clear();
                }
                let lowest = self.0.entry(key).or_insert(ordinal);
                *lowest = (*lowest).min(ordinal);
            }
        }
    }
}

/// One write, with its arguments in stored form.
pub(crate) enum Write {
    CreateSession {
        id: String,
        user_id: String,
        state: &'static str,
        created_at: i64,
        updated_at: i64,
        last_seq: i64,
        trace_id: String,
        agent: String,
    },
    /// A message and (if new) its conversation; answers whether the
    /// message was new.
    InsertMessage {
        session_id: String,
        conversation_id: String,
        client_msg_id: Option<String>,
        role: &'static str,
        content: String,
        created_at: i64,
    },
    UpsertConversation {
        session_id: String,
        conversation_id: String,
        title: Option<String>,
        resume_handle: Option<String>,
    },
    SetTask {
        session_id: String,
        task_id: Option<String>,
    },
    /// Events (seq, json) and the session's counters and state.
    Session {
        session_id: String,
        seqs: Vec<i64>,
        jsons: Vec<String>,
        max_seq: Option<i64>,
        ack: Option<(String, i64)>,
        state: Option<&'static str>,
    },
    UsageStart {
        task_id: String,
        session_id: String,
        user_id: String,
    },
    UsageEnd {
        task_id: String,
    },
}

/// Writes of one kind share a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    CreateSession,
    InsertMessage,
    UpsertConversation,
    SetTask,
    Session,
    UsageStart,
    UsageEnd,
}

impl Write {
    fn kind(&self) -> Kind {
        match self {
            Write::CreateSession { .. } => Kind::CreateSession,
            Write::InsertMessage { .. } => Kind::InsertMessage,
            Write::UpsertConversation { .. } => Kind::UpsertConversation,
            Write::SetTask { .. } => Kind::SetTask,
            Write::Session { .. } => Kind::Session,
            Write::UsageStart { .. } => Kind::UsageStart,
            Write::UsageEnd { .. } => Kind::UsageEnd,
        }
    }

    /// What orders this write against others: its session, or for a usage
    /// row (whose end names no session) its task.
    fn order_key(&self) -> OrderKey<&str> {
        match self {
            Write::CreateSession { id, .. } => OrderKey::Session(id),
            Write::InsertMessage { session_id, .. }
            | Write::UpsertConversation { session_id, .. }
            | Write::SetTask { session_id, .. }
            | Write::Session { session_id, .. } => OrderKey::Session(session_id),
            Write::UsageStart { task_id, .. } | Write::UsageEnd { task_id } => {
                OrderKey::UsageRow(task_id)
            }
        }
    }

    fn session_id(&self) -> Option<&str> {
        match self.order_key() {
            OrderKey::Session(id) => Some(id),
            OrderKey::UsageRow(_) => None,
        }
    }
}

/// Writes with one key run in the order they were handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OrderKey<T> {
    Session(T),
    /// A usage row, by its task.
    UsageRow(T),
}

impl OrderKey<&str> {
    fn owned(self) -> OrderKey<String> {
        match self {
            OrderKey::Session(id) => OrderKey::Session(id.to_string()),
            OrderKey::UsageRow(id) => OrderKey::UsageRow(id.to_string()),
        }
    }
}

/// How a write went, for its caller.
#[derive(Debug)]
pub(crate) enum Written {
    Done,
    /// `InsertMessage`: whether the message was new.
    Inserted(bool),
}

struct Queued {
    write: Write,
    fence: Option<OwnedFence>,
    reply: oneshot::Sender<Result<Written>>,
}

enum Message {
    Write(Queued),
    /// Write what came before, close the connection, answer, stop.
    Close(oneshot::Sender<()>),
}

/// The handle the store writes through.
#[derive(Debug, Clone)]
pub(crate) struct PgWriter {
    tx: mpsc::UnboundedSender<Message>,
}

impl PgWriter {
    /// Start the writer task on a connection of its own (made from
    /// `options`, re-made after a failure).
    pub(crate) fn start(options: PgConnectOptions) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(options, rx));
        PgWriter { tx }
    }

    /// Queue `write` (at once: the order of calls is the order of writes)
    /// and wait for the commit of its batch.
    pub(crate) fn write(
        &self,
        write: Write,
        fence: Option<OwnedFence>,
    ) -> impl std::future::Future<Output = Result<Written>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = self.tx.send(Message::Write(Queued {
            write,
            fence,
            reply,
        }));
        async move {
            let not_run = || {
                StoreError::Unavailable(
                    "the database did not answer the write in time, or the store is closed".into(),
                )
            };
            sent.map_err(|_| not_run())?;
            answer.await.map_err(|_| not_run())?
        }
    }

    /// Stop the writer once what is queued is written; later writes fail.
    pub(crate) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.tx.send(Message::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}

async fn run(options: PgConnectOptions, mut rx: mpsc::UnboundedReceiver<Message>) {
    let mut conn: Option<PgConnection> = None;
    let mut messages = Vec::with_capacity(MAX_BATCH);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut close = None;
    let mut failed = Failed::default();
    while close.is_none() && rx.recv_many(&mut messages, MAX_BATCH).await > 0 {
        for m in messages.drain(..) {
            match m {
                Message::Write(q) if close.is_none() => batch.push(q),
                Message::Write(q) => {
                    let _ = q.reply.send(Err(StoreError::Unavailable(
                        "the database writer has stopped".into(),
                    )));
                }
                Message::Close(done) => close = Some(done),
            }
        }
        if batch.is_empty() {
            continue;
        }
        if conn.is_none() {
            conn = connect(&options).await;
        }
        let Some(c) = conn.as_mut() else {
            for q in batch.drain(..) {
                let _ = q.reply.send(Err(StoreError::Unavailable(
                    "the database writer cannot connect".into(),
                )));
            }
            tokio::time::sleep(RECONNECT_DELAY).await;
            continue;
        };
        let broken = tokio::time::timeout(
            BATCH_DEADLINE,
            commit_batch(c, std::mem::take(&mut batch), &mut failed),
        )
        .await
        .unwrap_or_else(|_| {
            tracing::warn!("postgres writer: a batch got no answer in time; reconnecting");
            true
        });
        if broken {
            conn = None;
            tokio::time::sleep(RECONNECT_DELAY).await;
        }
    }
    rx.close();
    if let Some(c) = conn {
        let _ = c.close().await;
    }
    if let Some(done) = close {
        let _ = done.send(());
    }
}

async fn connect(options: &PgConnectOptions) -> Option<PgConnection> {
    let options = options.clone().options(CONNECTION_SETTINGS);
    match tokio::time::timeout(BATCH_DEADLINE, PgConnection::connect_with(&options)).await {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "postgres writer: cannot connect");
            None
        }
        Err(_) => {
            tracing::warn!("postgres writer: no answer to a connection attempt in time");
            None
        }
    }
}

/// Run `batch` statement by statement, each committing alone, and answer
/// each write once its statement committed. Returns whether the
/// connection is broken.
async fn commit_batch(conn: &mut PgConnection, batch: Vec<Queued>, numbered: &mut Failed) -> bool {
    let planned = groups(&batch);
    let mut slots: Vec<Option<Queued>> = batch.into_iter().map(Some).collect();
    let mut failed: HashSet<OrderKey<String>> = HashSet::new();
    let mut broken: Option<StoreError> = None;
    let answer = |numbered: &mut Failed, q: Queued, result: Result<Written>| {
        numbered.record(&q, &result);
        let _ = q.reply.send(result);
    };
    for group in planned {
        let mut run = Vec::with_capacity(group.members.len());
        for q in group.members.iter().filter_map(|&i| slots[i].take()) {
            if let Some(e) = &broken {
                let error = e.clone();
                answer(numbered, q, Err(error));
            } else if failed.contains(&key_of(&q)) || numbered.blocks(&q) {
                // Not recorded: it waits for the earlier one, which it
                // follows when tried again.
                let _ = q.reply.send(Err(StoreError::Write(
                    "an earlier write of this session failed; this one waits for it".into(),
                )));
            } else {
                run.push(q);
            }
        }
        if run.is_empty() {
            continue;
        }
        match run_statement(conn, &group, &run).await {
            Ok(results) => {
                for (q, result) in run.into_iter().zip(results) {
                    answer(numbered, q, result);
                }
            }
            Err(e) if run.len() == 1 || is_broken(&e) => {
                if is_broken(&e) {
                    broken = Some(e.clone());
                }
                for q in run {
                    failed.insert(key_of(&q));
                    answer(numbered, q, Err(e.clone()));
                }
            }
            Err(_) => {
                // One at a time: the bad write fails alone.
                for q in run {
                    let result = match &broken {
                        Some(e) => Err(e.clone()),
                        None => run_statement(conn, &group, std::slice::from_ref(&q))
                            .await
                            .and_then(|mut results| results.remove(0)),
                    };
                    if let Err(e) = &result {
                        if is_broken(e) {
                            broken = Some(e.clone());
                        }
                        failed.insert(key_of(&q));
                    }
                    answer(numbered, q, result);
                }
            }
        }
    }
    broken.is_some()
}

fn key_of(q: &Queued) -> OrderKey<String> {
    q.write.order_key().owned()
}

/// Errors after which the connection is not used again.
fn is_broken(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_))
}

/// `writes` (of `group`'s kind) as one statement: per write its result (a
/// refused fence is a result, not an error), or the statement's error.
async fn run_statement(
    conn: &mut PgConnection,
    group: &Group,
    writes: &[Queued],
) -> Result<Vec<Result<Written>>> {
    let statement: Vec<&Write> = writes.iter().map(|q| &q.write).collect();
    let fences: Option<Vec<&OwnedFence>> = group
        .fenced
        .then(|| writes.iter().filter_map(|q| q.fence.as_ref()).collect());
    let outcome = run_group(conn, group.kind, &statement, fences.as_deref()).await?;
    // Sets: a statement carries up to a whole batch of sessions.
    let held: Option<HashSet<&str>> = outcome
        .held
        .as_ref()
        .map(|h| h.iter().map(String::as_str).collect());
    let inserted: HashSet<&str> = outcome.inserted.iter().map(String::as_str).collect();
    Ok(writes
        .iter()
        .map(|q| {
            let session = q.write.session_id().unwrap_or_default();
            if let (Some(held), Some(fence)) = (&held, &q.fence)
                && !held.contains(session)
            {
                return Err(lease_lost(session, fence.epoch));
            }
            Ok(match &q.write {
                Write::InsertMessage { .. } => Written::Inserted(inserted.contains(session)),
                _ => Written::Done,
            })
        })
        .collect())
}

/// Writes of one kind that run as one statement.
#[derive(Debug, PartialEq, Eq)]
struct Group {
    kind: Kind,
    /// Its writes carry fences (checked in the statement), or none does.
    fenced: bool,
    members: Vec<usize>,
}

/// The batch's writes as statements in order: each write joins the first
/// group of its kind (and fencing) after the last group holding a write
/// with its order key, so one key's writes keep their order and never
/// share a statement.
fn groups(batch: &[Queued]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut last: HashMap<OrderKey<&str>, usize> = HashMap::new();
    for (i, q) in batch.iter().enumerate() {
        let (kind, fenced) = (q.write.kind(), q.fence.is_some());
        let key = q.write.order_key();
        let from = last.get(&key).map_or(0, |g| g + 1);
        let at = match (from..groups.len())
            .find(|&g| groups[g].kind == kind && groups[g].fenced == fenced)
        {
            Some(g) => g,
            None => {
                groups.push(Group {
                    kind,
                    fenced,
                    members: Vec::new(),
                });
                groups.len() - 1
            }
        };
        groups[at].members.push(i);
        last.insert(key, at);
    }
    groups
}

/// What one statement reports.
#[derive(Default)]
struct Outcome {
    /// `InsertMessage`: the sessions whose message was new.
    inserted: Vec<String>,
    /// With fences: the sessions whose lease held (only they were written).
    held: Option<Vec<String>>,
}

/// The lease rows that still match the fences (sessions `$s`, owners
/// `$o`, epochs `$e`), locked `FOR SHARE` in `session_id` order until the
/// statement ends: a takeover waits for it, or it sees the takeover.
macro_rules! lease_cte {
    ($s:literal, $o:literal, $e:literal) => {
        concat!(
            "lease AS MATERIALIZED ( \
                 SELECT l.session_id FROM session_leases l \
                 JOIN UNNEST(",
            $s,
            "::TEXT[], ",
            $o,
            "::TEXT[], ",
            $e,
            "::BIGINT[]) AS f (session_id, owner, epoch) \
                   ON l.session_id = f.session_id AND l.owner = f.owner AND l.epoch = f.epoch \
                 ORDER BY l.session_id FOR SHARE OF l)"
        )
    };
}

/// The events and each session's counters and state. A seq already stored
/// (or repeated in a write) keeps its first payload; `last_seq` and
/// `runner_seq` only rise, and `runner_seq` only for the task the session
/// is bound to. `$filter` limits both to some sessions.
macro_rules! session_write {
    ($filter:literal) => {
        concat!(
            "appended AS ( \
                 INSERT INTO session_events (session_id, seq, json, created_at) \
                 SELECT e.session_id, e.seq, e.json, $9 \
                 FROM UNNEST($6::TEXT[], $7::BIGINT[], $8::TEXT[]) AS e (session_id, seq, json) \
                 WHERE TRUE ", $filter, " \
                 ON CONFLICT (session_id, seq) DO NOTHING), \
             updated AS ( \
                 UPDATE sessions s SET \
                     last_seq = GREATEST(s.last_seq, COALESCE(w.max_seq, s.last_seq)), \
                     runner_seq = CASE WHEN w.ack_seq IS NOT NULL AND s.task_id IS NOT DISTINCT FROM w.ack_task \
                         THEN GREATEST(s.runner_seq, w.ack_seq) ELSE s.runner_seq END, \
                     state = COALESCE(w.state, s.state), \
                     updated_at = CASE WHEN w.state IS NULL THEN s.updated_at ELSE $9 END \
                 FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[]) \
                     AS w (session_id, max_seq, ack_seq, ack_task, state) \
                 WHERE s.id = w.session_id ", $filter, ")"
        )
    };
}

/// Bind sessions (`$1`) to tasks (`$2`), at time `$3`.
macro_rules! set_task {
    ($filter:literal) => {
        concat!(
            "bound AS ( \
                 UPDATE sessions s SET task_id = t.task_id, runner_seq = 0, updated_at = $3 \
                 FROM UNNEST($1::TEXT[], $2::TEXT[]) AS t (session_id, task_id) \
                 WHERE s.id = t.session_id ",
            $filter,
            ")"
        )
    };
}

const SESSION_WRITE: &str = concat!(
    "WITH ",
    session_write!(""),
    " SELECT NULL::TEXT WHERE FALSE"
);
const SESSION_WRITE_FENCED: &str = concat!(
    "WITH ",
    lease_cte!("$1", "$10", "$11"),
    ", ",
    session_write!("AND session_id IN (SELECT session_id FROM lease)"),
    " SELECT session_id FROM lease"
);
const SET_TASK: &str = concat!("WITH ", set_task!(""), " SELECT NULL::TEXT WHERE FALSE");
const SET_TASK_FENCED: &str = concat!(
    "WITH ",
    lease_cte!("$1", "$4", "$5"),
    ", ",
    set_task!("AND t.session_id IN (SELECT session_id FROM lease)"),
    " SELECT session_id FROM lease"
);

/// The fences' owners and epochs, in the order of the writes.
fn fence_columns(fences: &[&OwnedFence]) -> (Vec<String>, Vec<i64>) {
    fences
        .iter()
        .map(|f| (f.gateway_id.clone(), i64::try_from(f.epoch).unwrap_or(-1)))
        .unzip()
}

/// A statement's arguments, one array per column (`UNNEST`ed together).
/// Sessions: id, user, state, created, updated, last seq, trace, agent.
type SessionRowColumns<'a> = (
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<i64>,
    Vec<i64>,
    Vec<i64>,
    Vec<&'a str>,
    Vec<&'a str>,
);
/// Messages: session, conversation, client id, role, content, created.
type MessageColumns<'a> = (
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<Option<&'a str>>,
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<i64>,
);
/// Conversations: session, id, title, resume handle.
type ConversationColumns<'a> = (
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<Option<&'a str>>,
    Vec<Option<&'a str>>,
);
/// Session writes: session, max seq, ack seq, ack task, state.
type SessionWriteColumns<'a> = (
    Vec<&'a str>,
    Vec<Option<i64>>,
    Vec<Option<i64>>,
    Vec<Option<&'a str>>,
    Vec<Option<&'static str>>,
);

/// One statement for `writes` (all of `kind`, no two with one order key);
/// with `fences` (one per write), only the writes whose lease holds run.
async fn run_group(
    conn: &mut PgConnection,
    kind: Kind,
    writes: &[&Write],
    fences: Option<&[&OwnedFence]>,
) -> Result<Outcome> {
    let now = now_ms();
    match kind {
        Kind::CreateSession => {
            let mut cols: SessionRowColumns = Default::default();
            for w in writes {
                if let Write::CreateSession {
                    id,
                    user_id,
                    state,
                    created_at,
                    updated_at,
                    last_seq,
                    trace_id,
                    agent,
                } = w
                {
                    cols.0.push(id);
                    cols.1.push(user_id);
                    cols.2.push(state);
                    cols.3.push(*created_at);
                    cols.4.push(*updated_at);
                    cols.5.push(*last_seq);
                    cols.6.push(trace_id);
                    cols.7.push(agent);
                }
            }
            // A session starts unbound (`task_id` and `runner_seq` are set
            // by a task binding and session writes).
            sqlx::query(
                "INSERT INTO sessions (id, user_id, state, created_at, updated_at, last_seq, trace_id, agent) \
                 SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[], \
                                      $6::BIGINT[], $7::TEXT[], $8::TEXT[])",
            )
            .bind(cols.0)
            .bind(cols.1)
            .bind(cols.2)
            .bind(cols.3)
            .bind(cols.4)
            .bind(cols.5)
            .bind(cols.6)
            .bind(cols.7)
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::default())
        }
        Kind::InsertMessage => {
            let mut cols: MessageColumns = Default::default();
            for w in writes {
                if let Write::InsertMessage {
                    session_id,
                    conversation_id,
                    client_msg_id,
                    role,
                    content,
                    created_at,
                } = w
                {
                    cols.0.push(session_id);
                    cols.1.push(conversation_id);
                    cols.2.push(client_msg_id.as_deref());
                    cols.3.push(role);
                    cols.4.push(content);
                    cols.5.push(*created_at);
                }
            }
            // The conversations (created if missing) and their messages
            // together; a conversation's foreign key refuses a session that
            // does not exist.
            let new: Vec<String> = sqlx::query_scalar(
                "WITH m AS ( \
                     SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::BIGINT[]) \
                         WITH ORDINALITY AS m (session_id, conversation_id, client_msg_id, role, content, created_at, n)), \
                 conversation AS ( \
                     INSERT INTO conversations (id, session_id, title, resume_handle, created_at, updated_at) \
                     SELECT DISTINCT conversation_id, session_id, NULL::TEXT, NULL::TEXT, $7::BIGINT, $7::BIGINT FROM m \
                     ON CONFLICT (session_id, id) DO UPDATE SET updated_at = excluded.updated_at) \
                 INSERT INTO messages (session_id, conversation_id, client_msg_id, role, content, created_at) \
                 SELECT session_id, conversation_id, client_msg_id, role, content, created_at FROM m ORDER BY n \
                 ON CONFLICT (session_id, client_msg_id) DO NOTHING \
                 RETURNING session_id",
            )
            .bind(cols.0)
            .bind(cols.1)
            .bind(cols.2)
            .bind(cols.3)
            .bind(cols.4)
            .bind(cols.5)
            .bind(now)
            .fetch_all(&mut *conn)
            .await?;
            Ok(Outcome {
                inserted: new,
                held: None,
            })
        }
        Kind::UpsertConversation => {
            let mut cols: ConversationColumns = Default::default();
            for w in writes {
                if let Write::UpsertConversation {
                    session_id,
                    conversation_id,
                    title,
                    resume_handle,
                } = w
                {
                    cols.0.push(session_id);
                    cols.1.push(conversation_id);
                    cols.2.push(title.as_deref());
                    cols.3.push(resume_handle.as_deref());
                }
            }
            sqlx::query(
                "INSERT INTO conversations AS c (id, session_id, title, resume_handle, created_at, updated_at) \
                 SELECT u.id, u.session_id, u.title, u.resume_handle, $5, $5 \
                 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[]) AS u (session_id, id, title, resume_handle) \
                 ON CONFLICT (session_id, id) DO UPDATE SET \
                     title = COALESCE(excluded.title, c.title), \
                     resume_handle = COALESCE(excluded.resume_handle, c.resume_handle), \
                     updated_at = excluded.updated_at",
            )
            .bind(cols.0)
            .bind(cols.1)
            .bind(cols.2)
            .bind(cols.3)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::default())
        }
        Kind::SetTask => {
            let mut cols: (Vec<&str>, Vec<Option<&str>>) = Default::default();
            for w in writes {
                if let Write::SetTask {
                    session_id,
                    task_id,
                } = w
                {
                    cols.0.push(session_id);
                    cols.1.push(task_id.as_deref());
                }
            }
            let query = sqlx::query_scalar::<_, String>(if fences.is_some() {
                SET_TASK_FENCED
            } else {
                SET_TASK
            })
            .bind(cols.0)
            .bind(cols.1)
            .bind(now);
            run_fenced(conn, query, fences).await
        }
        Kind::Session => {
            let mut per: SessionWriteColumns = Default::default();
            let mut events: (Vec<&str>, Vec<i64>, Vec<&str>) = Default::default();
            for w in writes {
                if let Write::Session {
                    session_id,
                    seqs,
                    jsons,
                    max_seq,
                    ack,
                    state,
                } = w
                {
                    per.0.push(session_id);
                    per.1.push(*max_seq);
                    per.2.push(ack.as_ref().map(|(_, seq)| *seq));
                    per.3.push(ack.as_ref().map(|(task, _)| task.as_str()));
                    per.4.push(*state);
                    for (seq, json) in seqs.iter().zip(jsons) {
                        events.0.push(session_id);
                        events.1.push(*seq);
                        events.2.push(json);
                    }
                }
            }
            let query = sqlx::query_scalar::<_, String>(if fences.is_some() {
                SESSION_WRITE_FENCED
            } else {
                SESSION_WRITE
            })
            .bind(per.0)
            .bind(per.1)
            .bind(per.2)
            .bind(per.3)
            .bind(per.4)
            .bind(events.0)
            .bind(events.1)
            .bind(events.2)
            .bind(now);
            run_fenced(conn, query, fences).await
        }
        Kind::UsageStart => {
            let mut cols: (Vec<&str>, Vec<&str>, Vec<&str>) = Default::default();
            for w in writes {
                if let Write::UsageStart {
                    task_id,
                    session_id,
                    user_id,
                } = w
                {
                    cols.0.push(task_id);
                    cols.1.push(session_id);
                    cols.2.push(user_id);
                }
            }
            sqlx::query(
                "INSERT INTO usage (task_id, session_id, user_id, started_at) \
                 SELECT u.task_id, u.session_id, u.user_id, $4 \
                 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[]) AS u (task_id, session_id, user_id) \
                 ON CONFLICT (task_id) DO NOTHING",
            )
            .bind(cols.0)
            .bind(cols.1)
            .bind(cols.2)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::default())
        }
        Kind::UsageEnd => {
            let tasks: Vec<&str> = writes
                .iter()
                .filter_map(|w| match w {
                    Write::UsageEnd { task_id } => Some(task_id.as_str()),
                    _ => None,
                })
                .collect();
            sqlx::query(
                "UPDATE usage SET ended_at = $1 WHERE task_id = ANY($2::TEXT[]) AND ended_at IS NULL",
            )
            .bind(now)
            .bind(tasks)
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::default())
        }
    }
}

/// Run a statement whose fenced form returns the sessions whose lease
/// held (its owners and epochs bound last).
async fn run_fenced<'q>(
    conn: &mut PgConnection,
    query: sqlx::query::QueryScalar<'q, sqlx::Postgres, String, sqlx::postgres::PgArguments>,
    fences: Option<&[&OwnedFence]>,
) -> Result<Outcome> {
    let Some(fences) = fences else {
        query.fetch_all(&mut *conn).await?;
        return Ok(Outcome::default());
    };
    let (owners, epochs) = fence_columns(fences);
    let held = query
        .bind(owners)
        .bind(epochs)
        .fetch_all(&mut *conn)
        .await?;
    Ok(Outcome {
        inserted: Vec::new(),
        held: Some(held),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(write: Write) -> Queued {
        Queued {
            write,
            fence: None,
            reply: oneshot::channel().0,
        }
    }

    fn session(id: &str) -> Write {
        Write::Session {
            session_id: id.into(),
            seqs: vec![1],
            jsons: vec!["{}".into()],
            max_seq: Some(1),
            ack: None,
            state: None,
        }
    }

    fn bind(id: &str) -> Write {
        Write::SetTask {
            session_id: id.into(),
            task_id: Some("t".into()),
        }
    }

    fn members(groups: &[Group]) -> Vec<(Kind, bool, Vec<usize>)> {
        groups
            .iter()
            .map(|g| (g.kind, g.fenced, g.members.clone()))
            .collect()
    }

    #[test]
    fn writes_of_different_sessions_share_statements_and_one_sessions_keep_their_order() {
        let batch: Vec<Queued> = [
            session("a"),
            bind("b"),
            session("b"),
            session("c"),
            session("a"),
            bind("a"),
            Write::UsageEnd {
                task_id: "t".into(),
            },
        ]
        .into_iter()
        .map(queued)
        .collect();
        assert_eq!(
            members(&groups(&batch)),
            vec![
                // a, then c (b's write waits for b's binding).
                (Kind::Session, false, vec![0, 3]),
                (Kind::SetTask, false, vec![1]),
                // b after its binding, a's second write after its first.
                (Kind::Session, false, vec![2, 4]),
                (Kind::SetTask, false, vec![5]),
                (Kind::UsageEnd, false, vec![6]),
            ]
        );
    }

    #[test]
    fn fenced_and_unfenced_writes_do_not_share_a_statement() {
        let mut batch: Vec<Queued> = [session("a"), session("b"), session("c")]
            .into_iter()
            .map(queued)
            .collect();
        batch[1].fence = Some(OwnedFence {
            gateway_id: "gw".into(),
            epoch: 1,
            ordinal: 0,
        });
        assert_eq!(
            members(&groups(&batch)),
            vec![
                (Kind::Session, false, vec![0, 2]),
                (Kind::Session, true, vec![1]),
            ]
        );
    }
}
