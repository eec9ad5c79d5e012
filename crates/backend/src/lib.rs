//! The one small interface every sandbox runtime implements.
//!
//! Like JupyterHub's Spawner: launch, status, stop, list. A backend knows
//! nothing about users or sessions; per-user settings travel over the runner
//! socket at claim time, which is what lets one warm pool serve every user.

pub mod faults;

use std::collections::BTreeMap;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Opaque id the gateway gives a task before launching it.
pub type TaskId = String;

/// Everything a backend needs to start one runner.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub task_id: TaskId,
    /// `cold` (for one session) or `warm` (for nobody yet).
    pub mode: String,
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
    pub mode: String,
    pub session_id: Option<String>,
    pub status: TaskStatus,
    pub started_at: SystemTime,
}

#[derive(Debug, thiserror::Error)]
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
}
