//! Sessions: a registry of live session actors, each owning one
//! session's state machine, task, replay buffer and attached clients.

mod actor;
mod agent_stderr;
mod delivery;
mod inputs;
mod machine;
mod output;
mod persister;
mod replay;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aishell_store::{SessionRecord, SessionState, StoreError};
use tokio::sync::{Notify, mpsc, oneshot};

pub use actor::{RunnerAttach, SessionCmd};
pub use delivery::{AttachReply, CatchUpBatch, Lagging, Outbound};

use crate::Shared;

/// How many commands may wait for one session actor.
const MAILBOX: usize = 1024;

/// Where a session runs.
pub enum Found {
    Here(SessionHandle),
    /// Another gateway holds its lease (docs/cluster.md).
    Elsewhere(crate::cluster::Owner),
}

/// The sending end of a session actor's mailbox. Commands travel boxed:
/// tokio's bounded channel allocates its first 32 slots when it is created,
/// and at a `SessionCmd`'s size that was 4.5 KB for every live session, an
/// idle one included; a boxed slot is 8 bytes.
#[derive(Clone)]
pub(crate) struct Mailbox(mpsc::Sender<Box<SessionCmd>>);

/// The receiving end, the actor's.
type Inbox = mpsc::Receiver<Box<SessionCmd>>;

impl Mailbox {
    /// Send a command; false if the actor has gone. Boxed before the
    /// future is made: awaiting it, a connection's task does not hold the
    /// command inline.
    pub fn send(&self, cmd: SessionCmd) -> impl Future<Output = bool> + Send + '_ {
        let cmd = Box::new(cmd);
        async move { self.0.send(cmd).await.is_ok() }
    }

    fn same_channel(&self, other: &Mailbox) -> bool {
        self.0.same_channel(&other.0)
    }
}

/// A way to talk to one live session actor.
#[derive(Clone)]
pub struct SessionHandle {
    pub id: String,
    pub user_id: String,
    tx: Mailbox,
}

impl SessionHandle {
    /// Send a command; false if the actor has gone (the caller re-opens).
    pub fn send(&self, cmd: SessionCmd) -> impl Future<Output = bool> + Send + '_ {
        self.tx.send(cmd)
    }

    /// Send a command that carries a reply channel and await the answer.
    pub async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> SessionCmd,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        if !self.send(make(tx)).await {
            return None;
        }
        rx.await.ok()
    }
}

#[derive(Default)]
pub struct SessionManager {
    live: Mutex<HashMap<String, SessionHandle>>,
    registered: Notify,
}

impl SessionManager {
    pub fn get(&self, id: &str) -> Option<SessionHandle> {
        self.live.lock().expect("session registry").get(id).cloned()
    }

    pub fn live_count(&self) -> usize {
        self.live.lock().expect("session registry").len()
    }

    pub fn live_handles(&self) -> Vec<SessionHandle> {
        self.live
            .lock()
            .expect("session registry")
            .values()
            .cloned()
            .collect()
    }

    /// Reserve a new session for a user and start its actor. Nothing is
    /// stored until its client sends a message (or a task starts on
    /// connect), so connections that send nothing leave no sessions behind.
    /// One of several gateways takes the new session's lease first.
    pub async fn create(shared: &Arc<Shared>, user_id: &str) -> Result<SessionHandle, StoreError> {
        let record = SessionRecord::new(
            &format!("s-{}", uuid::Uuid::new_v4().simple()),
            user_id,
            &uuid::Uuid::new_v4().simple().to_string(),
            &shared.cfg.agent.kind,
        );
        if let Some(cluster) = &shared.cluster
            && let crate::cluster::Owner::Elsewhere { gateway_id, .. } =
                cluster.claim(&record.id).await?
        {
            // A fresh random id: only a bug or a forged id gets here.
            return Err(StoreError::LeaseLost {
                session_id: format!("{} (held by {gateway_id})", record.id),
                epoch: 0,
            });
        }
        Ok(Self::start_actor(shared, record, true))
    }

    /// The live actor of a session, loading it from the store if needed;
    /// one of several gateways loads it only if it gets the session's
    /// lease. `None` when no such session exists.
    pub async fn open(shared: &Arc<Shared>, id: &str) -> Result<Option<Found>, StoreError> {
        if let Some(h) = shared.sessions.get(id) {
            return Ok(Some(Found::Here(h)));
        }
        let Some(record) = shared.store.get_session(id).await? else {
            return Ok(None);
        };
        if record.state == SessionState::Terminated {
            return Ok(None);
        }
        if let Some(cluster) = &shared.cluster {
            let owner = cluster.claim(id).await?;
            if let crate::cluster::Owner::Elsewhere { .. } = owner {
                return Ok(Some(Found::Elsewhere(owner)));
            }
            // Another gateway may have written since the read above.
            let Some(record) = shared.store.get_session(id).await? else {
                return Ok(None);
            };
            return Ok(Some(Found::Here(Self::start_actor(shared, record, false))));
        }
        Ok(Some(Found::Here(Self::start_actor(shared, record, false))))
    }

    /// Like [`open`](Self::open), but a session that does not exist yet may
    /// appear within `grace` (a runner that dialled back before its session
    /// was registered: failure class 2).
    pub async fn open_with_grace(
        shared: &Arc<Shared>,
        id: &str,
        grace: Duration,
    ) -> Result<Option<Found>, StoreError> {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = shared.sessions.registered.notified();
            if let Some(h) = Self::open(shared, id).await? {
                return Ok(Some(h));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// `fresh`: created just now, and so not stored yet.
    fn start_actor(shared: &Arc<Shared>, record: SessionRecord, fresh: bool) -> SessionHandle {
        let mut live = shared.sessions.live.lock().expect("session registry");
        // Two loaders may race: the first registered actor wins.
        if let Some(h) = live.get(&record.id) {
            return h.clone();
        }
        let (tx, rx) = mpsc::channel(MAILBOX);
        let handle = SessionHandle {
            id: record.id.clone(),
            user_id: record.user_id.clone(),
            tx: Mailbox(tx),
        };
        live.insert(record.id.clone(), handle.clone());
        drop(live);
        shared.sessions.registered.notify_waiters();
        actor::spawn(shared.clone(), record, fresh, handle.tx.clone(), rx);
        handle
    }

    /// Called by an actor as it exits; only removes the entry if it is still
    /// that actor's (a newer actor for the same id may have replaced it).
    fn remove(&self, id: &str, tx: &Mailbox) {
        let mut live = self.live.lock().expect("session registry");
        if live.get(id).is_some_and(|h| h.tx.same_channel(tx)) {
            live.remove(id);
            if live.is_empty() {
                // The gateway is at rest: hand back what the sessions freed
                // (glibc keeps it otherwise, and a gateway at rest after a
                // busy hour held several MiB more than before it).
                output::release_freed_memory();
            }
        }
    }
}
