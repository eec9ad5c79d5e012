//! The `process` backend: every task is a local child process
//! running `aishell runner`, in its own process group so that stopping a task
//! takes its agent down with it.
//!
//! Runners deliberately outlive the gateway (no kill-on-drop, nothing killed
//! when the backend is dropped). Live tasks are recorded in
//! `{state_dir}/tasks.log` (a journal, see `state`); a restarted gateway's [`ProcessBackend::new`]
//! re-adopts those still running (checked by pid *and* by the task id in the
//! process's environment, so a reused pid is never adopted) and watches them by
//! polling, since they are no longer its children.
//!
//! `watch` is pushed, not polled: the reaper of each child (and the poller
//! of adopted tasks) reports an exit the moment it sees it, so a runner
//! that dies before dialling back fails its session at once.

mod os;
pub mod quota;
mod state;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use aishell_backend::{
    Backend, BackendError, LaunchSpec, StatusChange, TaskInfo, TaskMode, TaskStatus,
};
use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};

use crate::state::PersistedTask;

const NAME: &str = "process";

/// Default time between SIGTERM and SIGKILL in [`Backend::stop`].
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(3);

/// How often adopted (non-child) tasks are polled for liveness.
const ADOPTED_POLL: Duration = Duration::from_millis(200);

/// How long `stop` waits after SIGKILL before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How long exited tasks stay visible in `status`/`list`.
const EXITED_RETENTION: Duration = Duration::from_secs(600);

/// Exit reason recorded for adopted tasks (their exit status is not ours to read).
pub const ADOPTED_EXIT_REASON: &str = "exited (adopted task; code unknown)";

/// Settings of a [`ProcessBackend`].
#[derive(Debug, Clone)]
pub struct ProcessBackendConfig {
    /// Program to run for each task; normally the aishell binary itself.
    pub runner_program: PathBuf,
    /// Its arguments; normally `["runner"]`. Nothing is appended: the task's
    /// settings travel in the environment.
    pub runner_args: Vec<String>,
    /// User workspaces live at `{workspaces_root}/{user_id}`.
    pub workspaces_root: PathBuf,
    /// Where `tasks.log` (the adoption record) lives.
    pub state_dir: PathBuf,
    /// SIGTERM → wait this long → SIGKILL.
    pub stop_grace: Duration,
}

impl ProcessBackendConfig {
    /// Config running `runner_program runner` with the default stop grace.
    pub fn new(
        runner_program: impl Into<PathBuf>,
        workspaces_root: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            runner_program: runner_program.into(),
            runner_args: vec!["runner".to_string()],
            workspaces_root: workspaces_root.into(),
            state_dir: state_dir.into(),
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }
}

/// Runs each task as a local child process. See the crate docs.
#[derive(Clone)]
pub struct ProcessBackend {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ProcessBackendConfig,
    tasks: Mutex<HashMap<String, Entry>>,
    /// The adoption record's writer; used with `tasks` locked, so records
    /// are appended in the table's order.
    journal: Mutex<state::Journal>,
    /// Size-limited workspaces, when the gateway asked for them.
    workspace_quota: std::sync::OnceLock<quota::WorkspaceQuota>,
    /// Receivers of `watch`; told of every change with `tasks` locked, so
    /// in the table's order.
    watchers: Mutex<Vec<mpsc::UnboundedSender<StatusChange>>>,
}

struct Entry {
    mode: TaskMode,
    session_id: Option<String>,
    started_at: SystemTime,
    pid: i32,
    pgid: i32,
    status: TaskStatus,
    exited_at: Option<Instant>,
    /// Not our child: launched by a previous gateway and watched by polling.
    adopted: bool,
    /// Becomes `true` once the task has exited.
    done: watch::Receiver<bool>,
    /// For adopted tasks, the sender the poller fires (children: the reaper owns it).
    done_tx: Option<watch::Sender<bool>>,
}

impl Entry {
    fn persisted(&self, task_id: &str) -> PersistedTask {
        PersistedTask {
            task_id: task_id.to_string(),
            pid: self.pid,
            pgid: self.pgid,
            mode: self.mode,
            session_id: self.session_id.clone(),
            started_at_ms: state::to_ms(self.started_at),
        }
    }

    fn info(&self, task_id: &str) -> TaskInfo {
        TaskInfo {
            task_id: task_id.to_string(),
            mode: self.mode,
            session_id: self.session_id.clone(),
            status: self.status.clone(),
            started_at: self.started_at,
        }
    }
}

type Tasks = HashMap<String, Entry>;

fn refused(op: &'static str, reason: impl Into<String>) -> BackendError {
    BackendError::Refused {
        backend: NAME,
        op,
        reason: reason.into(),
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rewrite the state file with every live task. Called with the table
    /// locked, so writes are serialised and always reflect the latest table.
    fn persist(&self, tasks: &Tasks) -> std::io::Result<()> {
        let mut live: Vec<PersistedTask> = tasks
            .iter()
            .filter(|(_, e)| e.status.is_alive())
            .map(|(id, e)| e.persisted(id))
            .collect();
        live.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sync(live)
    }

    fn persist_or_warn(&self, tasks: &Tasks) {
        if let Err(e) = self.persist(tasks) {
            tracing::warn!(
                event = "task_state_write_failed",
                path = %state::path(&self.cfg.state_dir).display(),
                error = %e,
                "could not write the process backend's state file; tasks may not be adopted after a restart"
            );
        }
    }

    /// Tell every watcher; called with the task table locked.
    fn publish(&self, task_id: &str, status: &TaskStatus) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers.retain(|tx| {
            tx.send(StatusChange {
                task_id: task_id.to_string(),
                status: status.clone(),
            })
            .is_ok()
        });
    }

    /// Record that the task `task_id` running as `pid` ended.
    fn mark_exited(&self, task_id: &str, pid: i32, code: Option<i32>, reason: String) {
        let mut tasks = self.lock();
        let Some(e) = tasks.get_mut(task_id) else {
            return;
        };
        if e.pid != pid || !e.status.is_alive() {
            return;
        }
        e.status = TaskStatus::Exited { code, reason };
        e.exited_at = Some(Instant::now());
        self.publish(task_id, &e.status);
        self.persist_or_warn(&tasks);
    }

    /// Forget exited tasks after their retention; watchers hear `NotFound`.
    fn prune_exited(&self, tasks: &mut Tasks) {
        tasks.retain(|id, e| {
            let keep = e.exited_at.is_none_or(|at| at.elapsed() < EXITED_RETENTION);
            if !keep {
                self.publish(id, &TaskStatus::NotFound);
            }
            keep
        });
    }
}

impl ProcessBackend {
    /// Create the backend, creating `state_dir` if needed and adopting the
    /// still-running tasks recorded in `{state_dir}/tasks.log`.
    /// Give every workspace a disk quota from now on (see [`quota`]).
    pub fn set_workspace_quota(&self, quota: quota::WorkspaceQuota) {
        let _ = self.inner.workspace_quota.set(quota);
    }

    pub fn new(cfg: ProcessBackendConfig) -> std::io::Result<Self> {
        std::fs::create_dir_all(&cfg.state_dir)?;
        let persisted = state::load(&cfg.state_dir).unwrap_or_else(|e| {
            tracing::warn!(
                event = "task_state_read_failed",
                path = %state::path(&cfg.state_dir).display(),
                error = %e,
                "ignoring unreadable process backend state file"
            );
            Vec::new()
        });

        let mut tasks = Tasks::new();
        for p in persisted {
            if tasks.contains_key(&p.task_id) {
                continue;
            }
            if !adoptable(&p) {
                tracing::info!(
                    event = "task_adopt_skip",
                    taskId = %p.task_id,
                    pid = p.pid,
                    "not adopting task from state file: process gone or pid reused"
                );
                continue;
            }
            tracing::info!(
                event = "task_adopt",
                taskId = %p.task_id,
                pid = p.pid,
                mode = %p.mode,
                "adopted running task from a previous gateway"
            );
            let (tx, rx) = watch::channel(false);
            tasks.insert(
                p.task_id,
                Entry {
                    mode: p.mode,
                    session_id: p.session_id,
                    started_at: state::from_ms(p.started_at_ms),
                    pid: p.pid,
                    pgid: p.pgid,
                    status: TaskStatus::Running,
                    exited_at: None,
                    adopted: true,
                    done: rx,
                    done_tx: Some(tx),
                },
            );
        }

        let any_adopted = !tasks.is_empty();
        let journal = Mutex::new(state::Journal::new(&cfg.state_dir));
        let inner = Arc::new(Inner {
            cfg,
            tasks: Mutex::new(Tasks::new()),
            journal,
            workspace_quota: std::sync::OnceLock::new(),
            watchers: Mutex::new(Vec::new()),
        });
        inner.persist(&tasks)?;
        *inner.lock() = tasks;
        if any_adopted {
            spawn_adopted_watcher(Arc::downgrade(&inner))?;
        }
        Ok(Self { inner })
    }

    /// The backend's settings.
    pub fn config(&self) -> &ProcessBackendConfig {
        &self.inner.cfg
    }

    /// Pid of a known task (its process group has the same id).
    pub fn pid_of(&self, task_id: &str) -> Option<u32> {
        self.inner.lock().get(task_id).map(|e| e.pid as u32)
    }
}

/// A persisted task may be adopted if its pid is alive, is still the leader
/// of the recorded group, and carries the task's id in its environment.
fn adoptable(p: &PersistedTask) -> bool {
    if p.pid <= 1 || p.pgid <= 1 || !os::pid_alive(p.pid) {
        return false;
    }
    if !os::environ_has_task(p.pid, &p.task_id) {
        return false;
    }
    matches!(
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(p.pid))),
        Ok(g) if g.as_raw() == p.pgid
    )
}

/// One thread polls every adopted task until none is left running or the
/// backend is dropped. A thread (not a tokio task) so `new` works with or
/// without a runtime.
fn spawn_adopted_watcher(inner: Weak<Inner>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("aishell-adopted-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(ADOPTED_POLL);
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let watched: Vec<(String, i32)> = inner
                    .lock()
                    .iter()
                    .filter(|(_, e)| e.adopted && e.status.is_alive())
                    .map(|(id, e)| (id.clone(), e.pid))
                    .collect();
                if watched.is_empty() {
                    return;
                }
                for (task_id, pid) in watched {
                    if os::pid_alive(pid) && os::environ_has_task(pid, &task_id) {
                        continue;
                    }
                    tracing::info!(
                        event = "task_exit",
                        taskId = %task_id,
                        reason = ADOPTED_EXIT_REASON,
                        "task exited"
                    );
                    inner.mark_exited(&task_id, pid, None, ADOPTED_EXIT_REASON.to_string());
                    if let Some(tx) = inner.lock().get(&task_id).and_then(|e| e.done_tx.as_ref()) {
                        tx.send_replace(true);
                    }
                }
            }
        })
        .map(|_| ())
}

/// Wait for our child to exit and record how it ended. Keeps reaping even if
/// the backend was dropped (no zombies), but then records nothing.
async fn reap(
    inner: Weak<Inner>,
    task_id: String,
    pid: i32,
    mut child: tokio::process::Child,
    done: watch::Sender<bool>,
) {
    let (code, reason) = match child.wait().await {
        Ok(status) => os::describe_exit(status),
        Err(e) => (None, format!("could not wait for the process: {e}")),
    };
    // The task is its process group: whatever the runner left in it goes
    // with it. A runner killed while it started a sandbox left bubblewrap's
    // sandbox init waiting forever for a parent that was gone.
    let _ = os::signal_group(pid, Signal::SIGKILL);
    tracing::info!(
        event = "task_exit",
        taskId = %task_id,
        code = code,
        reason = %reason,
        "task exited"
    );
    if let Some(inner) = inner.upgrade() {
        inner.mark_exited(&task_id, pid, code, reason);
    }
    done.send_replace(true);
}

/// Wait until the task has exited (reaper/poller said so, or its pid is gone),
/// at most `limit`. Returns whether it exited.
async fn wait_exit(done: &mut watch::Receiver<bool>, pid: i32, limit: Duration) -> bool {
    let notified = async {
        if done.wait_for(|d| *d).await.is_err() {
            // Sender gone without saying so: rely on polling alone.
            std::future::pending::<()>().await;
        }
    };
    let polled = async {
        while os::pid_alive(pid) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(limit, async {
        tokio::select! {
            _ = notified => {}
            _ = polled => {}
        }
    })
    .await
    .is_ok()
}

/// Environment names that carry the gateway's secrets.
fn is_secret_env(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper == "DATABASE_URL"
        || ["API_KEY", "SECRET", "PASSWORD", "TOKEN", "CREDENTIAL"]
            .iter()
            .any(|s| upper.contains(s))
}

#[async_trait]
impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<(), BackendError> {
        if spec.task_id.is_empty() {
            return Err(refused("launch", "empty task id"));
        }
        let cfg = &self.inner.cfg;
        let mut cmd = tokio::process::Command::new(&cfg.runner_program);
        // The gateway's own secrets (model API keys, JWT secret, database
        // password) are not the runner's business.
        for (name, _) in std::env::vars_os() {
            if is_secret_env(&name.to_string_lossy()) {
                cmd.env_remove(name);
            }
        }
        cmd.args(&cfg.runner_args)
            // Per-task extras first, so they can never override the task's identity.
            .envs(&spec.env)
            .env("AISHELL_GATEWAY_URL", &spec.gateway_url)
            .env("AISHELL_TASK_ID", &spec.task_id)
            .env("AISHELL_TASK_MODE", spec.mode.as_str())
            .env("AISHELL_TASK_CREDENTIAL", &spec.credential)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0)
            // Runners must survive a gateway crash so they can be re-adopted.
            .kill_on_drop(false);
        match &spec.session_id {
            Some(sid) => cmd.env("AISHELL_SESSION_ID", sid),
            None => cmd.env_remove("AISHELL_SESSION_ID"),
        };

        let started = Instant::now();
        let (pid, child, done_tx) = {
            let mut tasks = self.inner.lock();
            self.inner.prune_exited(&mut tasks);
            if tasks.contains_key(&spec.task_id) {
                return Err(refused(
                    "launch",
                    format!("task {} already exists", spec.task_id),
                ));
            }
            let child = cmd.spawn().map_err(|e| {
                refused(
                    "launch",
                    format!("cannot start {}: {e}", cfg.runner_program.display()),
                )
            })?;
            let Some(pid) = child.id().map(|p| p as i32) else {
                return Err(refused("launch", "process exited before it had a pid"));
            };
            let (tx, rx) = watch::channel(false);
            tasks.insert(
                spec.task_id.clone(),
                Entry {
                    mode: spec.mode,
                    session_id: spec.session_id.clone(),
                    started_at: SystemTime::now(),
                    pid,
                    pgid: pid,
                    status: TaskStatus::Running,
                    exited_at: None,
                    adopted: false,
                    done: rx,
                    done_tx: None,
                },
            );
            self.inner.publish(&spec.task_id, &TaskStatus::Running);
            self.inner.persist_or_warn(&tasks);
            (pid, child, tx)
        };

        tokio::spawn(reap(
            Arc::downgrade(&self.inner),
            spec.task_id.clone(),
            pid,
            child,
            done_tx,
        ));
        tracing::info!(
            event = "task_launch",
            taskId = %spec.task_id,
            sessionId = spec.session_id.as_deref(),
            mode = %spec.mode,
            pid = pid,
            duration_ms = started.elapsed().as_millis() as u64,
            "launched runner process"
        );
        Ok(())
    }

    async fn status(&self, task_id: &str) -> Result<TaskStatus, BackendError> {
        Ok(self
            .inner
            .lock()
            .get(task_id)
            .map(|e| e.status.clone())
            .unwrap_or(TaskStatus::NotFound))
    }

    async fn stop(&self, task_id: &str) -> Result<(), BackendError> {
        let (pid, pgid, mut done) = {
            let mut tasks = self.inner.lock();
            let Some(e) = tasks.get(task_id) else {
                return Ok(());
            };
            if !e.status.is_alive() {
                tasks.remove(task_id);
                self.inner.publish(task_id, &TaskStatus::NotFound);
                self.inner.persist_or_warn(&tasks);
                return Ok(());
            }
            (e.pid, e.pgid, e.done.clone())
        };

        let started = Instant::now();
        os::signal_group(pgid, Signal::SIGTERM)
            .map_err(|e| refused("stop", format!("SIGTERM to process group {pgid}: {e}")))?;
        let mut escalated = false;
        if !wait_exit(&mut done, pid, self.inner.cfg.stop_grace).await {
            escalated = true;
            os::signal_group(pgid, Signal::SIGKILL)
                .map_err(|e| refused("stop", format!("SIGKILL to process group {pgid}: {e}")))?;
            if !wait_exit(&mut done, pid, KILL_WAIT).await {
                return Err(refused(
                    "stop",
                    format!("process {pid} still running {KILL_WAIT:?} after SIGKILL"),
                ));
            }
        }
        // The runner is gone; take down anything it left in its group (an
        // agent that ignored SIGTERM, say).
        let _ = os::signal_group(pgid, Signal::SIGKILL);

        // Two stops of one task can race (a session's and the shutdown's):
        // the one that removes the entry logs the stop, once.
        let removed_here = {
            let mut tasks = self.inner.lock();
            let ours = tasks.get(task_id).is_some_and(|e| e.pid == pid);
            if ours {
                tasks.remove(task_id);
                self.inner.publish(task_id, &TaskStatus::NotFound);
                self.inner.persist_or_warn(&tasks);
            }
            ours
        };
        if !removed_here {
            return Ok(());
        }
        tracing::info!(
            event = "task_stop",
            taskId = %task_id,
            pid = pid,
            escalated = escalated,
            duration_ms = started.elapsed().as_millis() as u64,
            "stopped task"
        );
        Ok(())
    }

    async fn list(&self) -> Result<Vec<TaskInfo>, BackendError> {
        let mut tasks = self.inner.lock();
        self.inner.prune_exited(&mut tasks);
        let mut out: Vec<TaskInfo> = tasks.iter().map(|(id, e)| e.info(id)).collect();
        out.sort_by(|a, b| {
            a.started_at
                .cmp(&b.started_at)
                .then_with(|| a.task_id.cmp(&b.task_id))
        });
        Ok(out)
    }

    fn prepare_workspace(&self, user_id: &str) -> Result<(), BackendError> {
        let workspace = self.inner.cfg.workspaces_root.join(user_id);
        match self.inner.workspace_quota.get() {
            Some(quota) => quota.ensure(&workspace, user_id),
            None => std::fs::create_dir_all(&workspace).map_err(|e| quota::QuotaError::Workspace {
                user: user_id.to_string(),
                message: format!("cannot create {}: {e}", workspace.display()),
            }),
        }
        .map_err(|e| BackendError::Refused {
            backend: NAME,
            op: "prepare_workspace",
            reason: e.to_string(),
        })
    }

    fn capabilities(&self) -> aishell_backend::Capabilities {
        aishell_backend::Capabilities {
            typical_cold_start: Duration::from_millis(300),
            workspaces: aishell_backend::WorkspaceAccess::Local,
            isolation: aishell_backend::Isolation::Process,
        }
    }

    /// Every task's status now, then each change as the reapers (and the
    /// adopted tasks' poller) record it: no listing, no delay.
    fn watch(self: Arc<Self>) -> mpsc::Receiver<StatusChange> {
        let (tx, mut changes) = mpsc::unbounded_channel();
        {
            let tasks = self.inner.lock();
            for (id, e) in tasks.iter() {
                let _ = tx.send(StatusChange {
                    task_id: id.clone(),
                    status: e.status.clone(),
                });
            }
            self.inner
                .watchers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(tx);
        }
        // The trait's stream is bounded; the reapers must never wait on it.
        let (out, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    change = changes.recv() => change,
                    _ = out.closed() => return,
                };
                let Some(change) = change else { return };
                if out.send(change).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    fn workspace_path(&self, user_id: &str) -> String {
        self.inner
            .cfg
            .workspaces_root
            .join(user_id)
            .to_string_lossy()
            .into_owned()
    }
}
