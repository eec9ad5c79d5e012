//! One watcher of the backend's task statuses per gateway: it reads
//! `Backend::watch` once and routes each change to whoever subscribed to
//! that task (sessions waiting for their runner), instead of every session
//! polling `status` for its own task (ARCHITECTURE.md "Backends").
//!
//! The last status seen of every task is remembered, so a subscriber that
//! arrives after a change still learns it; and each subscription asks the
//! backend for the task's status once, so a change between the launch and
//! the watcher's first sight of the task is not missed either (and a
//! failing status call reaches the session as the failure it is).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use aishell_backend::{Backend, BackendError, StatusChange, TaskId, TaskStatus};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What a subscriber is told: a status, or why it could not be read.
pub type Observation = Result<TaskStatus, BackendError>;

pub struct TaskWatch {
    backend: Arc<dyn Backend>,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Ends the routing loop (and so the backend's watch) with the gateway.
    stop: CancellationToken,
}

#[derive(Default)]
struct State {
    /// The last status the watch reported of each task it still knows.
    last: HashMap<TaskId, TaskStatus>,
    subscribers: HashMap<TaskId, Vec<(u64, mpsc::UnboundedSender<Observation>)>>,
}

impl TaskWatch {
    /// Start watching `backend`'s tasks, until the returned value is dropped.
    pub fn start(backend: Arc<dyn Backend>) -> Arc<TaskWatch> {
        let changes = backend.clone().watch();
        let watch = Arc::new(TaskWatch {
            backend,
            state: Mutex::default(),
            next_id: AtomicU64::new(1),
            stop: CancellationToken::new(),
        });
        tokio::spawn(route_changes(
            Arc::downgrade(&watch),
            changes,
            watch.stop.clone(),
        ));
        watch
    }

    /// Status observations of one task, from now until the subscription is
    /// dropped: the last known status at once (if any), the answer of one
    /// `status` call, then every change the backend's watch reports.
    pub fn subscribe(self: &Arc<Self>, task_id: &str) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = self.state.lock().expect("task watch");
            if let Some(status) = state.last.get(task_id) {
                let _ = tx.send(Ok(status.clone()));
            }
            state
                .subscribers
                .entry(task_id.to_string())
                .or_default()
                .push((id, tx.clone()));
        }
        let backend = self.backend.clone();
        let asked = task_id.to_string();
        tokio::spawn(async move {
            let observed = tokio::select! {
                observed = backend.status(&asked) => observed,
                _ = tx.closed() => return,
            };
            let _ = tx.send(observed);
        });
        Subscription {
            task_id: task_id.to_string(),
            id,
            rx,
            watch: Arc::downgrade(self),
        }
    }

    /// How many tasks have subscribers.
    pub fn watched_tasks(&self) -> usize {
        self.state.lock().expect("task watch").subscribers.len()
    }

    fn route(&self, change: StatusChange) {
        let mut state = self.state.lock().expect("task watch");
        if change.status == TaskStatus::NotFound {
            state.last.remove(&change.task_id);
        } else {
            state
                .last
                .insert(change.task_id.clone(), change.status.clone());
        }
        if let Some(subscribers) = state.subscribers.get_mut(&change.task_id) {
            subscribers.retain(|(_, tx)| tx.send(Ok(change.status.clone())).is_ok());
            if subscribers.is_empty() {
                state.subscribers.remove(&change.task_id);
            }
        }
    }

    fn unsubscribe(&self, task_id: &str, id: u64) {
        let mut state = self.state.lock().expect("task watch");
        if let Some(subscribers) = state.subscribers.get_mut(task_id) {
            subscribers.retain(|(sid, _)| *sid != id);
            if subscribers.is_empty() {
                state.subscribers.remove(task_id);
            }
        }
    }
}

impl Drop for TaskWatch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn route_changes(
    watch: Weak<TaskWatch>,
    mut changes: mpsc::Receiver<StatusChange>,
    stop: CancellationToken,
) {
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            _ = stop.cancelled() => return,
        };
        let Some(change) = change else {
            tracing::error!(
                event = "task_watch_ended",
                "the backend's status watch ended; tasks that die before their runner dials back now fail at the connect deadline"
            );
            return;
        };
        let Some(watch) = watch.upgrade() else { return };
        watch.route(change);
    }
}

/// One subscriber's observations of one task; unsubscribes when dropped.
pub struct Subscription {
    pub task_id: String,
    id: u64,
    rx: mpsc::UnboundedReceiver<Observation>,
    watch: Weak<TaskWatch>,
}

impl Subscription {
    /// The next observation (never ends while the gateway runs).
    pub async fn next(&mut self) -> Observation {
        match self.rx.recv().await {
            Some(observed) => observed,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.upgrade() {
            watch.unsubscribe(&self.task_id, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aishell_backend::{Capabilities, Isolation, LaunchSpec, TaskInfo, WorkspaceAccess};
    use async_trait::async_trait;

    use super::*;

    /// A backend whose watch the test drives and whose `status` answers
    /// what the test set.
    struct Driven {
        changes: Mutex<Option<mpsc::Receiver<StatusChange>>>,
        status: Mutex<Observation>,
    }

    #[async_trait]
    impl Backend for Driven {
        fn name(&self) -> &'static str {
            "driven"
        }
        async fn launch(&self, _: LaunchSpec) -> Result<(), BackendError> {
            Ok(())
        }
        async fn status(&self, _: &str) -> Result<TaskStatus, BackendError> {
            self.status.lock().unwrap().clone()
        }
        async fn stop(&self, _: &str) -> Result<(), BackendError> {
            Ok(())
        }
        async fn list(&self) -> Result<Vec<TaskInfo>, BackendError> {
            Ok(Vec::new())
        }
        fn workspace_path(&self, user_id: &str) -> String {
            user_id.to_string()
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                typical_cold_start: Duration::ZERO,
                workspaces: WorkspaceAccess::Local,
                isolation: Isolation::Process,
            }
        }
        fn watch(self: Arc<Self>) -> mpsc::Receiver<StatusChange> {
            self.changes.lock().unwrap().take().expect("watched once")
        }
    }

    fn driven(status: Observation) -> (Arc<TaskWatch>, mpsc::Sender<StatusChange>) {
        let (tx, rx) = mpsc::channel(16);
        let backend = Arc::new(Driven {
            changes: Mutex::new(Some(rx)),
            status: Mutex::new(status),
        });
        (TaskWatch::start(backend), tx)
    }

    fn change(task_id: &str, status: TaskStatus) -> StatusChange {
        StatusChange {
            task_id: task_id.into(),
            status,
        }
    }

    async fn next(sub: &mut Subscription) -> Observation {
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("an observation")
    }

    fn exited() -> TaskStatus {
        TaskStatus::Exited {
            code: Some(1),
            reason: "exit code 1".into(),
        }
    }

    #[tokio::test]
    async fn a_change_reaches_the_subscriber_of_its_task_only() {
        let (watch, changes) = driven(Ok(TaskStatus::Pending));
        let mut a = watch.subscribe("a");
        let mut b = watch.subscribe("b");
        assert_eq!(next(&mut a).await, Ok(TaskStatus::Pending));
        assert_eq!(next(&mut b).await, Ok(TaskStatus::Pending));
        changes.send(change("a", exited())).await.unwrap();
        assert_eq!(next(&mut a).await, Ok(exited()));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), b.next())
                .await
                .is_err(),
            "b heard of a's exit"
        );
    }

    #[tokio::test]
    async fn a_late_subscriber_learns_the_last_status_and_a_failing_status_call() {
        let refused = BackendError::Refused {
            backend: "driven",
            op: "status",
            reason: "AccessDenied".into(),
        };
        let (watch, changes) = driven(Err(refused.clone()));
        changes.send(change("t", exited())).await.unwrap();
        // The change is routed before anyone subscribed.
        tokio::time::timeout(Duration::from_secs(5), async {
            while !watch.state.lock().unwrap().last.contains_key("t") {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        let mut sub = watch.subscribe("t");
        assert_eq!(next(&mut sub).await, Ok(exited()));
        assert_eq!(next(&mut sub).await, Err(refused));
    }

    #[tokio::test]
    async fn a_dropped_subscription_unsubscribes_and_vanished_tasks_are_forgotten() {
        let (watch, changes) = driven(Ok(TaskStatus::Running));
        let sub = watch.subscribe("t");
        assert_eq!(watch.watched_tasks(), 1);
        drop(sub);
        assert_eq!(watch.watched_tasks(), 0);
        changes
            .send(change("t", TaskStatus::Running))
            .await
            .unwrap();
        changes
            .send(change("t", TaskStatus::NotFound))
            .await
            .unwrap();
        let mut probe = watch.subscribe("probe");
        changes
            .send(change("probe", TaskStatus::Running))
            .await
            .unwrap();
        // The probe hears its status call and its change; changes are
        // routed in order, so once both arrived, t's were routed too.
        assert_eq!(next(&mut probe).await, Ok(TaskStatus::Running));
        assert_eq!(next(&mut probe).await, Ok(TaskStatus::Running));
        assert!(!watch.state.lock().unwrap().last.contains_key("t"));
    }
}
