//! The one small interface every sandbox runtime implements.
//!
//! Like JupyterHub's Spawner: launch, status, stop, list. A backend knows
//! nothing about users or sessions; per-user settings travel over the runner
//! socket at claim time, which is what lets one warm pool serve every user.

pub mod faults;
pub mod workspaces;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use aishell_protocol::runner::TaskMode;

/// Opaque id the gateway gives a task before launching it.
pub type TaskId = String;

/// Everything a backend needs to start one runner.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub task_id: TaskId,
    /// Cold (for one session) or warm (for nobody yet).
    pub mode: TaskMode,
    /// Session a cold task is launched for.
    pub session_id: Option<String>,
    /// WebSocket base URL the runner dials, e.g. `ws://127.0.0.1:5174`.
    pub gateway_url: String,
    /// Per-task credential the runner presents when it dials back.
    pub credential: String,
    /// Extra per-task environment (never per-user secrets).
    pub env: BTreeMap<String, String>,
}

/// Observed state of a task, as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TaskStatus {
    /// Accepted by the runtime, not yet running (image pull, scheduling...).
    Pending,
    Running,
    /// Ended; `reason` is the runtime's own words (exit code, OOM, signal...).
    Exited {
        code: Option<i32>,
        reason: String,
    },
    /// The runtime does not know this task (never launched, or cleaned up).
    NotFound,
}

impl TaskStatus {
    pub fn is_alive(&self) -> bool {
        matches!(self, TaskStatus::Pending | TaskStatus::Running)
    }
}

/// One task the backend owns (for adoption / orphan cleanup after a restart).
#[derive(Debug, Clone)]
pub struct TaskInfo {
    pub task_id: TaskId,
    pub mode: TaskMode,
    pub session_id: Option<String>,
    pub status: TaskStatus,
    pub started_at: SystemTime,
}

/// One observed change of a task's status, as `Backend::watch` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub task_id: TaskId,
    pub status: TaskStatus,
}

/// What a runtime is like, for the decisions the gateway used to make by
/// matching the backend's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Typical time from `launch` to the runner dialling back; clients are
    /// told it as the cold start's expected duration.
    pub typical_cold_start: Duration,
    /// Where the gateway finds users' workspaces (files API).
    pub workspaces: WorkspaceAccess,
    /// What stands between an agent and the machine it runs on.
    pub isolation: Isolation,
}

/// How the gateway reaches a user's workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceAccess {
    /// A directory on the gateway's own file system (same host as the tasks).
    Local,
    /// A shared volume mounted on the gateway as well as in the tasks (EFS,
    /// NFS, a ReadWriteMany volume).
    SharedVolume,
    /// Not visible to the gateway: files go through the user's live runner.
    ThroughRunner,
}

/// The isolation boundary around an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// A host process confined by namespaces, seccomp and its own UID.
    Process,
    /// A container on a shared kernel.
    Container,
    /// A Kubernetes pod (a container, plus the cluster's policies).
    Pod,
    /// A task with a kernel of its own (Fargate, Firecracker).
    MicroVm,
}

/// How often the default `watch` lists the backend's tasks.
pub const WATCH_POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The runtime refused the call (permissions, quota, bad request...).
    /// The message is the runtime's reason, passed on to the user.
    #[error("{backend} refused {op}: {reason}")]
    Refused {
        backend: &'static str,
        op: &'static str,
        reason: String,
    },
    /// The runtime could not be reached.
    #[error("{backend} unreachable during {op}: {reason}")]
    Unavailable {
        backend: &'static str,
        op: &'static str,
        reason: String,
    },
    #[error("{backend}: task {task_id} not found")]
    NotFound {
        backend: &'static str,
        task_id: TaskId,
    },
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name: `process`, `docker`, `kubernetes`, `ecs`.
    fn name(&self) -> &'static str;

    /// Start a task. Returns once the runtime accepted it (it may still be
    /// `Pending`); the runner dials back on its own.
    async fn launch(&self, spec: LaunchSpec) -> Result<(), BackendError>;

    /// Observed state of one task.
    async fn status(&self, task_id: &str) -> Result<TaskStatus, BackendError>;

    /// Stop a task and release its resources. Stopping a task that already
    /// ended is not an error. Returns once the task is gone.
    async fn stop(&self, task_id: &str) -> Result<(), BackendError>;

    /// Every task this backend (this gateway instance) owns.
    async fn list(&self) -> Result<Vec<TaskInfo>, BackendError>;

    /// Path of a user's workspace as the runner inside a task sees it.
    fn workspace_path(&self, user_id: &str) -> String;

    /// Make a user's workspace ready before anything uses it (a session's
    /// task, the files API): with a disk quota, mount its file system. The
    /// default has nothing to prepare (whoever uses a workspace creates it).
    fn prepare_workspace(&self, user_id: &str) -> Result<(), BackendError> {
        let _ = user_id;
        Ok(())
    }

    /// Whether the runtime answers at all (for `/ready`).
    async fn ping(&self) -> Result<(), BackendError> {
        self.list().await.map(|_| ())
    }

    /// What this runtime is like (cold start, workspaces, isolation).
    fn capabilities(&self) -> Capabilities;

    /// Status changes of this backend's tasks, for the whole gateway (one
    /// watcher, not a poll per task). The stream reports a task's status
    /// when it first sees the task and each time it changes; a task that
    /// disappears is reported `NotFound` once. It ends when the receiver is
    /// dropped. The default lists the tasks every `WATCH_POLL_INTERVAL`;
    /// runtimes with events of their own (a reaper, a watch API) override it.
    fn watch(self: Arc<Self>) -> mpsc::Receiver<StatusChange> {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(poll_list(self, tx, WATCH_POLL_INTERVAL));
        rx
    }
}

/// The default `watch`: list every `interval`, report what changed. A
/// failed `list` reports nothing (a runtime that is unreachable for a moment
/// has not lost its tasks); the next good one catches up.
pub async fn poll_list<B: Backend + ?Sized>(
    backend: Arc<B>,
    tx: mpsc::Sender<StatusChange>,
    interval: Duration,
) {
    let mut known: HashMap<TaskId, TaskStatus> = HashMap::new();
    loop {
        if let Ok(tasks) = backend.list().await {
            let mut seen = HashMap::with_capacity(tasks.len());
            for task in tasks {
                seen.insert(task.task_id.clone(), task.status.clone());
            }
            for change in status_changes(&known, &seen) {
                if tx.send(change).await.is_err() {
                    return;
                }
            }
            known = seen;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tx.closed() => return,
        }
    }
}

/// What changed between two listings: new or changed statuses, and
/// `NotFound` for tasks no longer listed.
pub fn status_changes(
    before: &HashMap<TaskId, TaskStatus>,
    after: &HashMap<TaskId, TaskStatus>,
) -> Vec<StatusChange> {
    let mut changes: Vec<StatusChange> = after
        .iter()
        .filter(|(id, status)| before.get(*id) != Some(*status))
        .map(|(id, status)| StatusChange {
            task_id: id.clone(),
            status: status.clone(),
        })
        .collect();
    changes.extend(
        before
            .keys()
            .filter(|id| !after.contains_key(*id))
            .map(|id| StatusChange {
                task_id: id.clone(),
                status: TaskStatus::NotFound,
            }),
    );
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(entries: &[(&str, TaskStatus)]) -> HashMap<TaskId, TaskStatus> {
        entries
            .iter()
            .map(|(id, s)| (id.to_string(), s.clone()))
            .collect()
    }

    #[test]
    fn changes_report_new_changed_and_vanished_tasks_only() {
        let before = listing(&[
            ("same", TaskStatus::Running),
            ("starts", TaskStatus::Pending),
            ("gone", TaskStatus::Running),
        ]);
        let after = listing(&[
            ("same", TaskStatus::Running),
            ("starts", TaskStatus::Running),
            ("new", TaskStatus::Pending),
        ]);
        let mut changes = status_changes(&before, &after);
        changes.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        assert_eq!(
            changes,
            vec![
                StatusChange {
                    task_id: "gone".into(),
                    status: TaskStatus::NotFound
                },
                StatusChange {
                    task_id: "new".into(),
                    status: TaskStatus::Pending
                },
                StatusChange {
                    task_id: "starts".into(),
                    status: TaskStatus::Running
                },
            ]
        );
        assert!(status_changes(&after, &after).is_empty());
    }
}
