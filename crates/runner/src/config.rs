//! Runner settings, read from the environment the backend sets at launch.

use std::path::PathBuf;
use std::time::Duration;

use aishell_protocol::TaskMode;

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Gateway base URL, e.g. `ws://127.0.0.1:5174`.
    pub gateway_url: String,
    /// The address in front of several gateways
    /// (`AISHELL_GATEWAY_FALLBACK_URL`): dialled, in turn with its own, while
    /// its own gateway does not answer, so whichever gateway takes its
    /// session over adopts it.
    pub fallback_url: Option<String>,
    pub task_id: String,
    pub mode: TaskMode,
    /// Session a cold task was launched for.
    pub session_id: Option<String>,
    /// Per-task credential minted by the gateway.
    pub credential: String,
    /// Program that runs built-in agents (`<program> agent <kind>`): this
    /// executable, or `AISHELL_RUNNER_AGENT_PROGRAM` (set only by tests, to
    /// stand in a misbehaving agent).
    pub agent_program: PathBuf,
    /// How long to keep re-dialling a lost gateway before giving up.
    pub reconnect_deadline: Duration,
    /// Wait this long before the first dial (`AISHELL_RUNNER_DIAL_DELAY_MS`;
    /// set only by the test fault injector).
    pub dial_delay: Option<Duration>,
    /// Where a pre-started sandbox's workspace is bound (warm root runners;
    /// set by [`crate::prestart::WorkspaceSlot::enter_private_namespace`]).
    pub workspace_slot: Option<crate::prestart::WorkspaceSlot>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not set: the runner is started by a backend, which sets it")]
    Missing(&'static str),
    #[error("{name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

impl RunnerConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        let get = |name: &'static str| std::env::var(name).map_err(|_| ConfigError::Missing(name));
        let mode = get("AISHELL_TASK_MODE")?;
        let mode = TaskMode::parse(&mode).ok_or_else(|| ConfigError::Invalid {
            name: "AISHELL_TASK_MODE",
            reason: format!("`{mode}` (expected cold or warm)"),
        })?;
        let session_id = std::env::var("AISHELL_SESSION_ID")
            .ok()
            .filter(|s| !s.is_empty());
        if mode == TaskMode::Cold && session_id.is_none() {
            return Err(ConfigError::Missing("AISHELL_SESSION_ID"));
        }
        let reconnect_deadline = match std::env::var("AISHELL_RUNNER_RECONNECT_DEADLINE_SECS") {
            Ok(v) => Duration::from_secs(v.parse().map_err(|_| ConfigError::Invalid {
                name: "AISHELL_RUNNER_RECONNECT_DEADLINE_SECS",
                reason: format!("`{v}` is not a number of seconds"),
            })?),
            Err(_) => Duration::from_secs(600),
        };
        let agent_program = match std::env::var_os("AISHELL_RUNNER_AGENT_PROGRAM") {
            Some(program) => PathBuf::from(program),
            None => std::env::current_exe().map_err(|e| ConfigError::Invalid {
                name: "current_exe",
                reason: e.to_string(),
            })?,
        };
        Ok(RunnerConfig {
            gateway_url: get("AISHELL_GATEWAY_URL")?
                .trim_end_matches('/')
                .to_string(),
            fallback_url: std::env::var("AISHELL_GATEWAY_FALLBACK_URL")
                .ok()
                .filter(|u| !u.is_empty())
                .map(|u| u.trim_end_matches('/').to_string()),
            task_id: get("AISHELL_TASK_ID")?,
            mode,
            session_id,
            credential: get("AISHELL_TASK_CREDENTIAL")?,
            agent_program,
            reconnect_deadline,
            dial_delay: std::env::var("AISHELL_RUNNER_DIAL_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis),
            workspace_slot: None,
        })
    }

    /// Where this runner dials: its session (cold) or the warm pool, at its
    /// own gateway or (`fallback`) at the shared address when there is one.
    pub fn dial_url(&self, fallback: bool) -> String {
        let base = match (&self.fallback_url, fallback) {
            (Some(url), true) => url,
            _ => &self.gateway_url,
        };
        match (self.mode, &self.session_id) {
            (TaskMode::Cold, Some(session)) => format!("{base}/internal/task/{session}"),
            _ => format!("{base}/internal/warm/{}", self.task_id),
        }
    }
}
