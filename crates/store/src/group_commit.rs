//! Group commit for SQLite writes (issue 3).
//!
//! SQLite has one writer. With every session writing its own small
//! transactions (session record, message, conversation, task binding, event
//! batches, usage), a burst of new sessions queued behind that lock — sqlx's
//! per-statement hand-offs plus SQLite's busy-wait sleeps — and that wait
//! was most of a warm start's first-event latency at 50 concurrent sessions.
//!
//! Here every write goes to one task. It takes whatever is queued, runs it
//! in one transaction with a savepoint per operation (one failing operation
//! rolls back alone; the others still commit), commits once, and only then
//! answers each caller — so "written" still means durable in the database
//! before anyone acts on it. A lone operation runs directly, without the
//! extra savepoint round trips.

use futures_util::future::BoxFuture;
use sqlx::{Connection, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use crate::{Result, StoreError};

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 256;

/// Hands an operation's result to its caller once the batch's fate is
/// known: `None` committed, `Some(error)` the commit failed.
type Deliver = Box<dyn FnOnce(Option<String>) + Send>;
/// One write, type-erased: runs on the writer's connection and reports
/// whether it succeeded (to keep or roll back its savepoint).
type Operation =
    Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, (bool, Deliver)> + Send>;

#[derive(Debug, Clone)]
pub(crate) struct WriteQueue {
    tx: mpsc::UnboundedSender<Operation>,
}

impl WriteQueue {
    pub(crate) fn start(pool: SqlitePool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(pool, rx));
        WriteQueue { tx }
    }

    /// Run `op` in the next batch and return its result after the commit.
    pub(crate) async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T>> + Send + 'static,
    {
        let (done_tx, done_rx) = oneshot::channel::<Result<T>>();
        let operation: Operation = Box::new(move |conn| {
            Box::pin(async move {
                let result = op(conn).await;
                let ok = result.is_ok();
                let deliver: Deliver = Box::new(move |commit_error| {
                    let _ = done_tx.send(match commit_error {
                        None => result,
                        Some(e) => Err(StoreError::Write(format!("commit failed: {e}"))),
                    });
                });
                (ok, deliver)
            })
        });
        let not_run = || StoreError::Write("the database writer could not run it".into());
        self.tx.send(operation).map_err(|_| not_run())?;
        done_rx.await.map_err(|_| not_run())?
    }
}

async fn writer(pool: SqlitePool, mut rx: mpsc::UnboundedReceiver<Operation>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut conn = match pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                // The pool is closed or broken: the operations are dropped
                // unrun, so every caller gets a `Write` error; the cause is
                // logged here.
                let message = e.to_string();
                tracing::error!(event = "store_error", error = %message, "no database connection for a batch of writes");
                batch.clear();
                continue;
            }
        };
        if batch.len() == 1 {
            let op = batch.pop().expect("one operation");
            let (_, deliver) = op(&mut conn).await;
            deliver(None);
            continue;
        }
        if let Err(message) = run_batch(&mut conn, &mut batch).await {
            tracing::error!(event = "store_error", error = %message, "group commit failed");
        }
    }
}

/// One transaction, a savepoint per operation. Err: the batch did not
/// commit (every caller was told; operations not run see their channel
/// close).
async fn run_batch(
    conn: &mut SqliteConnection,
    batch: &mut Vec<Operation>,
) -> std::result::Result<(), String> {
    let mut tx = match conn.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            batch.clear();
            return Err(e.to_string());
        }
    };
    let mut deliveries = Vec::with_capacity(batch.len());
    for op in batch.drain(..) {
        let Ok(mut savepoint) = tx.begin().await else {
            continue; // dropped unrun: its caller gets an error
        };
        let (ok, deliver) = op(&mut savepoint).await;
        // A failed release or rollback breaks the transaction; the commit
        // below then fails and every caller is told.
        let _ = if ok {
            savepoint.commit().await
        } else {
            savepoint.rollback().await
        };
        deliveries.push(deliver);
    }
    let commit = tx.commit().await.map_err(|e| e.to_string());
    for deliver in deliveries {
        deliver(commit.as_ref().err().cloned());
    }
    commit
}
