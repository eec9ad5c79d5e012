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

use aishell_store::{SessionWrite, StoredEvent};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use tokio::sync::mpsc;

use super::actor::SessionCmd;
use crate::Shared;

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
    shared: Arc<Shared>,
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
                            write_until_stored(&shared, &session_id, unit).await;
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
                    let mut events = Vec::new();
                    let mut runner_seq = None;
                    let mut state = None;
                    for item in items.drain(..) {
                        match item {
                            PersistItem::Event { event, runner_seq: r } => {
                                events.push(event);
                                runner_seq = r.or(runner_seq);
                            }
                            PersistItem::State(s) => state = Some(s),
                            PersistItem::BindTask(next) => {
                                if !events.is_empty() || state.is_some() {
                                    let unit = Unit::Session {
                                        events: std::mem::take(&mut events),
                                        ack: task.clone().zip(runner_seq.take()),
                                        state: state.take(),
                                    };
                                    in_flight.push_back(write_once(&shared, &session_id, unit));
                                }
                                task.clone_from(&next);
                                in_flight.push_back(write_once(&shared, &session_id, Unit::Bind(next)));
                            }
                        }
                    }
                    if !events.is_empty() || state.is_some() {
                        let unit = Unit::Session {
                            events,
                            ack: task.clone().zip(runner_seq.take()),
                            state,
                        };
                        in_flight.push_back(write_once(&shared, &session_id, unit));
                    }
                }
            }
        }
    });
    persist_tx
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

async fn try_write(shared: &Shared, session_id: &str, unit: &Unit) -> bool {
    let result = match unit {
        Unit::Session { events, ack, state } => {
            let write = SessionWrite {
                events,
                runner_ack: ack.as_ref().map(|(t, s)| (t.as_str(), *s)),
                state: state.as_deref(),
            };
            shared.store.write_session(session_id, write).await
        }
        Unit::Bind(task) => {
            shared
                .store
                .set_session_task(session_id, task.as_deref())
                .await
        }
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
fn write_once(shared: &Arc<Shared>, session_id: &Arc<str>, unit: Unit) -> Write {
    let (shared, session_id) = (shared.clone(), session_id.clone());
    Box::pin(async move {
        let ok = try_write(&shared, &session_id, &unit).await;
        (unit, ok)
    })
}

/// Retry with backoff until the store takes it.
async fn write_until_stored(shared: &Shared, session_id: &str, unit: &Unit) {
    let mut delay = Duration::from_millis(50);
    while !try_write(shared, session_id, unit).await {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
