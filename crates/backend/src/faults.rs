//! A backend decorator that injects failures and delays, for reproducing the
//! production failure classes against real tasks.
//!
//! Faults are read from a file on every call so a test can change them while
//! the gateway runs. One rule per line, `op=action`:
//! `launch|status|stop = error:<reason> | delay:<ms> | hang`,
//! `launch=slow:<ms>` (the launch call takes that long *before* the task
//! exists, like a slow container create), and
//! `runner_dial_delay=<ms>` (the runner waits that long before dialling).
//! Enabled only when `AISHELL_TEST_FAULTS_FILE` names the file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Backend, BackendError, Capabilities, LaunchSpec, StatusChange, TaskInfo, TaskStatus};

pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    file: PathBuf,
}

enum Fault {
    Error(String),
    Delay(Duration),
    /// Wait, then do the call (for `launch`: before the task exists).
    Slow(Duration),
    Hang,
}

impl FaultyBackend {
    pub fn new(inner: Arc<dyn Backend>, file: PathBuf) -> Self {
        FaultyBackend { inner, file }
    }

    fn rule(&self, op: &str) -> Option<String> {
        let text = std::fs::read_to_string(&self.file).ok()?;
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == op)
            .map(|(_, v)| v.trim().to_string())
    }

    fn fault(&self, op: &str) -> Option<Fault> {
        let rule = self.rule(op)?;
        if rule == "hang" {
            return Some(Fault::Hang);
        }
        let ms = |prefix: &str| -> Option<Duration> {
            rule.strip_prefix(prefix)?
                .parse()
                .ok()
                .map(Duration::from_millis)
        };
        if let Some(d) = ms("delay:") {
            return Some(Fault::Delay(d));
        }
        if let Some(d) = ms("slow:") {
            return Some(Fault::Slow(d));
        }
        rule.strip_prefix("error:")
            .map(|r| Fault::Error(r.to_string()))
    }

    /// Apply the fault for `op`: an error to return, or after a delay, nothing.
    async fn inject(&self, op: &'static str) -> Result<(), BackendError> {
        match self.fault(op) {
            None => Ok(()),
            Some(Fault::Delay(d) | Fault::Slow(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::Error(reason)) => Err(BackendError::Refused {
                backend: self.inner.name(),
                op,
                reason,
            }),
        }
    }
}

#[async_trait]
impl Backend for FaultyBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn launch(&self, mut spec: LaunchSpec) -> Result<(), BackendError> {
        if let Some(ms) = self.rule("runner_dial_delay") {
            spec.env.insert("AISHELL_RUNNER_DIAL_DELAY_MS".into(), ms);
        }
        // A delayed launch still starts the task first: its runner dials
        // back before the launch call returns (failure class 2).
        if let Some(Fault::Delay(d)) = self.fault("launch") {
            self.inner.launch(spec).await?;
            tokio::time::sleep(d).await;
            return Ok(());
        }
        self.inject("launch").await?;
        self.inner.launch(spec).await
    }

    async fn status(&self, task_id: &str) -> Result<TaskStatus, BackendError> {
        self.inject("status").await?;
        self.inner.status(task_id).await
    }

    async fn stop(&self, task_id: &str) -> Result<(), BackendError> {
        self.inject("stop").await?;
        self.inner.stop(task_id).await
    }

    async fn list(&self) -> Result<Vec<TaskInfo>, BackendError> {
        self.inner.list().await
    }

    fn workspace_path(&self, user_id: &str) -> String {
        self.inner.workspace_path(user_id)
    }

    fn prepare_workspace(&self, user_id: &str) -> Result<(), BackendError> {
        self.inner.prepare_workspace(user_id)
    }

    async fn ping(&self) -> Result<(), BackendError> {
        self.inner.ping().await
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn watch(self: Arc<Self>) -> tokio::sync::mpsc::Receiver<StatusChange> {
        self.inner.clone().watch()
    }
}
