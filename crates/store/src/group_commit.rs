//! Group commit for SQLite writes.
//!
//! SQLite has one writer. With every session writing its own small
//! transactions (session record, message, conversation, task binding, event
//! batches, usage), a burst of new sessions queued behind that lock, and
//! that wait was most of a warm start's first-event latency at 50
//! concurrent sessions.
//!
//! Here every write goes to one task. It takes whatever is queued, runs it
//! in one transaction with a savepoint per operation (one failing operation
//! rolls back alone; the others still commit), commits once, and only then
//! answers each caller — so "written" still means durable in the database
//! before anyone acts on it.
//!
//! The batch runs synchronously, through rusqlite, on the writer's own
//! connection to the database file (`:memory:`: on the handle of the pool's
//! one connection, locked away from sqlx's worker thread for the batch).
//! Through sqlx every statement (and every savepoint) was a hand-off to
//! that thread and back; under load each hand-off waited for a CPU, and a
//! batch of a few hundred small writes took 15–20 ms. Run directly, a
//! statement costs microseconds. Reads stay on sqlx. WAL checkpoints run
//! beside the writer ([`Checkpointer`]).

use rusqlite::Connection;
use sqlx::SqlitePool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{Result, StoreError};

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 256;

/// Hands an operation's result to its caller once the batch's fate is
/// known: `None` committed, `Some(error)` the commit failed.
type Deliver = Box<dyn FnOnce(Option<String>) + Send>;
/// One write, type-erased: runs inside the batch's transaction and reports
/// whether it succeeded (to keep or roll back its savepoint).
type Operation = Box<dyn FnOnce(&Connection) -> (bool, Deliver) + Send>;

#[derive(Debug, Clone)]
pub(crate) struct WriteQueue {
    tx: mpsc::UnboundedSender<Operation>,
    /// Set once by `close`; the writer stops and closes its connection.
    closing: Arc<watch::Sender<bool>>,
}

/// The connection batches run on.
pub(crate) enum WriterConnection {
    /// The writer's own connection to a database file, open for the
    /// gateway's lifetime (statements stay prepared across batches), with
    /// automatic checkpoints off, and a second connection for checkpoints.
    Own {
        writer: Connection,
        checkpoints: Connection,
    },
    /// Borrowed from the pool per batch: `:memory:` has one connection only.
    Pooled(SqlitePool),
}

impl WriteQueue {
    pub(crate) fn start(connection: WriterConnection) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (closing, closed) = watch::channel(false);
        let queue = Queue { rx, closed };
        match connection {
            WriterConnection::Own {
                writer,
                checkpoints,
            } => tokio::spawn(own_writer(writer, Checkpointer::new(checkpoints), queue)),
            WriterConnection::Pooled(pool) => tokio::spawn(pooled_writer(pool, queue)),
        };
        WriteQueue {
            tx,
            closing: Arc::new(closing),
        }
    }

    /// Stop the writer and wait until its connection is closed. Writes
    /// queued but not yet run, and any made later, fail (`Write`).
    pub(crate) async fn close(&self) {
        self.closing.send_replace(true);
        self.tx.closed().await;
    }

    /// Run `op` in the next batch's transaction and return its result after
    /// the commit. `op` must not begin or end transactions itself: it runs
    /// inside a savepoint that is rolled back if it returns an error.
    pub(crate) async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (done_tx, done_rx) = oneshot::channel::<Result<T>>();
        let operation: Operation = Box::new(move |conn| {
            let result = op(conn);
            let ok = result.is_ok();
            let deliver: Deliver = Box::new(move |commit_error| {
                let _ = done_tx.send(match commit_error {
                    None => result,
                    Some(e) => Err(StoreError::Write(format!("commit failed: {e}"))),
                });
            });
            (ok, deliver)
        });
        let not_run = || StoreError::Write("the database writer could not run it".into());
        self.tx.send(operation).map_err(|_| not_run())?;
        done_rx.await.map_err(|_| not_run())?
    }
}

/// Batches on the writer's own connection. Taking a pooled connection and
/// locking it away from sqlx's worker thread was a hand-off to that thread
/// per batch; in a 50-session burst it waited for a CPU for up to 4 ms,
/// and every commit (and every client event behind it) waited with it.
async fn own_writer(db: Connection, mut checkpoints: Checkpointer, mut queue: Queue) {
    let mut batch = Vec::new();
    loop {
        let more = if checkpoints.owed() {
            tokio::select! {
                more = queue.next_batch(&mut batch) => more,
                () = tokio::time::sleep(CHECKPOINT_WHEN_IDLE) => {
                    checkpoints.start_idle();
                    continue;
                }
            }
        } else {
            queue.next_batch(&mut batch).await
        };
        if !more {
            break;
        }
        // Inline on this worker: a batch is CPU work of bounded size (no
        // fsync per commit under WAL + synchronous=NORMAL), and handing it
        // to another thread (block_in_place) cost more than it saved. Only a
        // CLI process writing the same file (`aishell token`) can make it
        // wait, for that one short transaction.
        if let Err(message) = run_batch(&db, &mut batch) {
            tracing::error!(event = "store_error", error = %message, "group commit failed");
        }
        checkpoints.committed();
    }
    // Both connections closed (the last one's close checkpoints into the
    // database file) before the queue, and with it `close`'s wait, ends:
    // once closed, nothing touches the file.
    drop(db);
    checkpoints.close().await;
    drop(queue);
}

/// A commit past SQLite's automatic checkpoint threshold (1000 pages) used
/// to copy the WAL into the database and fsync it inside the commit: every
/// write queued behind it waited, in the middle of whatever burst caused
/// it. Checkpoints now run on a connection of their own, on a blocking
/// thread, once the writer has been idle for a moment (or at least every
/// second under constant load). `PASSIVE` never blocks the writer, and a
/// reader never waits for it.
struct Checkpointer {
    /// The checkpoint connection; taken while a checkpoint runs.
    db: Arc<std::sync::Mutex<Option<Connection>>>,
    /// Commits since the last checkpoint started.
    owed: bool,
    last_started: Instant,
    /// The checkpoint last started, if it may still run.
    running: Option<tokio::task::JoinHandle<()>>,
}

/// Writer idle this long: checkpoint.
const CHECKPOINT_WHEN_IDLE: Duration = Duration::from_millis(100);
/// A WAL larger than this is truncated (to zero) by the checkpoint of an
/// idle writer. A `PASSIVE` checkpoint copies the WAL into the database but
/// leaves the file at its largest (a burst of big turns left hundreds of
/// MB on disk at rest); `TRUNCATE` takes the write lock for the moment it
/// runs, so it runs only when the writer is idle and the WAL is big.
pub(crate) const WAL_TRUNCATE_ABOVE_BYTES: u64 = if cfg!(test) { 4 << 20 } else { 64 << 20 };
/// Checkpoint at least this often while writes keep coming.
const CHECKPOINT_AT_LEAST_EVERY: Duration = Duration::from_secs(1);

impl Checkpointer {
    fn new(db: Connection) -> Self {
        Checkpointer {
            db: Arc::new(std::sync::Mutex::new(Some(db))),
            owed: false,
            last_started: Instant::now(),
            running: None,
        }
    }

    /// Wait for a running checkpoint, then close the connection.
    async fn close(mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.await;
        }
        drop(self.db.lock().expect("checkpoint connection").take());
    }

    /// Whether commits wait for a checkpoint (run once the writer idles).
    fn owed(&self) -> bool {
        self.owed
    }

    /// A batch committed: a checkpoint is owed, and starts now if the writer
    /// has not been idle long enough for one in a second.
    fn committed(&mut self) {
        self.owed = true;
        if self.last_started.elapsed() >= CHECKPOINT_AT_LEAST_EVERY {
            self.start();
        }
    }

    /// The writer is idle: checkpoint, truncating a WAL that grew large.
    fn start_idle(&mut self) {
        self.run(true);
    }

    /// Start a checkpoint in the background unless one is running.
    fn start(&mut self) {
        self.run(false);
    }

    fn run(&mut self, idle: bool) {
        (self.owed, self.last_started) = (false, Instant::now());
        let slot = self.db.clone();
        let Some(db) = slot.lock().expect("checkpoint connection").take() else {
            return; // one is running; it covers these commits too, or the next will
        };
        self.running = Some(tokio::task::spawn_blocking(move || {
            let wal_bytes = db
                .path()
                .and_then(|p| std::fs::metadata(format!("{p}-wal")).ok())
                .map_or(0, |m| m.len());
            let mode = if idle && wal_bytes > WAL_TRUNCATE_ABOVE_BYTES {
                "TRUNCATE"
            } else {
                "PASSIVE"
            };
            let result = db.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
                Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
            });
            match result {
                Ok((wal_frames, copied)) => {
                    tracing::debug!(
                        event = "store_checkpoint",
                        mode,
                        wal_bytes,
                        wal_frames,
                        copied,
                        "WAL checkpointed"
                    )
                }
                Err(e) => {
                    tracing::warn!(event = "store_checkpoint_failed", error = %e, "WAL checkpoint failed; retrying later")
                }
            }
            *slot.lock().expect("checkpoint connection") = Some(db);
        }));
    }
}

/// The writer's end of the queue.
struct Queue {
    rx: mpsc::UnboundedReceiver<Operation>,
    closed: watch::Receiver<bool>,
}

impl Queue {
    /// Wait for the next operations; false once the store is closing.
    async fn next_batch(&mut self, batch: &mut Vec<Operation>) -> bool {
        tokio::select! {
            biased;
            _ = self.closed.wait_for(|closed| *closed) => false,
            n = self.rx.recv_many(batch, MAX_BATCH) => n > 0,
        }
    }
}

async fn pooled_writer(pool: SqlitePool, mut queue: Queue) {
    let mut batch = Vec::new();
    while queue.next_batch(&mut batch).await {
        // Operations dropped unrun (on any error below) close their
        // callers' channels: each caller gets a `Write` error; the cause is
        // logged here.
        let mut conn = match pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::error!(event = "store_error", error = %e, "no database connection for a batch of writes");
                batch.clear();
                continue;
            }
        };
        let mut handle = match conn.lock_handle().await {
            Ok(handle) => handle,
            Err(e) => {
                tracing::error!(event = "store_error", error = %e, "could not take the database connection for a batch of writes");
                batch.clear();
                continue;
            }
        };
        let raw = handle.as_raw_handle();
        // Inline on this worker, as in `own_writer`.
        //
        // SAFETY: `handle` keeps sqlx's worker thread off this connection
        // until it drops, after the batch; `from_handle` borrows the
        // connection without taking ownership (not closed when `db` drops).
        let result = match unsafe { Connection::from_handle(raw.as_ptr()) } {
            Ok(db) => run_batch(&db, &mut batch),
            Err(e) => {
                batch.clear();
                Err(e.to_string())
            }
        };
        if let Err(message) = result {
            tracing::error!(event = "store_error", error = %message, "group commit failed");
        }
    }
}

/// Run one fixed statement (prepared once per connection wrapper).
fn exec(db: &Connection, sql: &str) -> rusqlite::Result<()> {
    db.prepare_cached(sql)?.execute([]).map(drop)
}

/// One transaction, a savepoint per operation. Err: the batch did not
/// commit (every caller that ran was told; operations not run see their
/// channel close).
fn run_batch(db: &Connection, batch: &mut Vec<Operation>) -> std::result::Result<(), String> {
    if let Err(e) = exec(db, "BEGIN IMMEDIATE") {
        batch.clear();
        return Err(e.to_string());
    }
    let mut deliveries = Vec::with_capacity(batch.len());
    let mut aborted = None;
    for op in batch.drain(..) {
        // Some errors (a full disk, I/O) roll the whole transaction back.
        // The operation's savepoint goes with it, so ending it fails: from
        // then on nothing may run, or it would commit on its own.
        if aborted.is_some() {
            continue; // dropped unrun
        }
        if let Err(e) = exec(db, "SAVEPOINT op") {
            aborted = Some(e.to_string());
            continue;
        }
        let (ok, deliver) = op(db);
        deliveries.push(deliver);
        let end = if ok {
            exec(db, "RELEASE op")
        } else {
            exec(db, "ROLLBACK TO op").and_then(|()| exec(db, "RELEASE op"))
        };
        if let Err(e) = end {
            aborted = Some(e.to_string());
        }
    }
    let outcome = match aborted {
        Some(e) => Err(e),
        None => exec(db, "COMMIT").map_err(|e| e.to_string()),
    };
    if outcome.is_err() && !db.is_autocommit() {
        let _ = exec(db, "ROLLBACK");
    }
    for deliver in deliveries {
        deliver(outcome.as_ref().err().cloned());
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One checkpoint at a time: a start while one runs is skipped, and the
    /// connection is back for the next once the first ends.
    #[tokio::test]
    async fn a_checkpoint_started_while_one_runs_is_skipped_and_the_next_runs() {
        let dir = tempfile::tempdir().unwrap();
        let db = Connection::open(dir.path().join("c.db")).unwrap();
        db.pragma_update(None, "journal_mode", "wal").unwrap();
        let mut checkpoints = Checkpointer::new(db);
        // Hold the connection as a running checkpoint would.
        let running = checkpoints.db.lock().unwrap().take();
        checkpoints.committed();
        checkpoints.start();
        assert!(
            !checkpoints.owed(),
            "the commits are left to the running one"
        );
        assert!(
            checkpoints.db.lock().unwrap().is_none(),
            "nothing else took it"
        );
        *checkpoints.db.lock().unwrap() = running;
        checkpoints.start();
        let back = async {
            while checkpoints.db.lock().unwrap().is_none() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), back)
            .await
            .expect("the checkpoint ran and returned its connection");
    }
}
