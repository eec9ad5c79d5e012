//! The `docker` backend: every task is a container of one image
//! (default `aishell:local`, built by `aishell image build`), started with
//! per-task environment only (gateway URL, task id, mode, credential), so one
//! warm pool serves every user.
//!
//! Talks to the Docker Engine API over its unix socket with bollard (no TLS
//! features, no CLI). Containers carry labels naming aishell, the gateway
//! instance, the task and its mode; [`Backend::list`] finds them by label, so a
//! restarted gateway adopts the ones whose runner re-dials and stops the rest
//! (see `reap_orphans` in the gateway). Containers are not auto-removed: the
//! engine's exit reason (exit code, OOM kill) must stay readable until the
//! gateway has asked for the status; [`Backend::stop`] removes them.

pub mod image;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aishell_backend::{Backend, BackendError, LaunchSpec, TaskInfo, TaskMode, TaskStatus};
use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, ContainerSummaryStateEnum, HostConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use tokio::sync::OnceCell;

const NAME: &str = "docker";

/// Default image tag (what `aishell image build` produces).
pub const DEFAULT_IMAGE: &str = "aishell:local";
/// Where the workspaces directory is mounted inside every container.
pub const WORKSPACES_MOUNT: &str = "/workspaces";
/// Label on every container aishell starts.
pub const LABEL_MANAGED: &str = "aishell.managed";
/// Label naming the gateway instance that owns a container.
pub const LABEL_INSTANCE: &str = "aishell.instance";
/// Label naming the task a container runs.
pub const LABEL_TASK: &str = "aishell.task";
/// Label naming the task's mode (`warm` or `cold`).
pub const LABEL_MODE: &str = "aishell.mode";
/// Label naming the session of a cold task.
pub const LABEL_SESSION: &str = "aishell.session";
/// The default unix socket of the engine.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Settings of a [`DockerBackend`].
#[derive(Debug, Clone)]
pub struct DockerBackendConfig {
    /// Image every task runs; its entrypoint is `aishell runner`.
    pub image: String,
    /// Engine socket (`unix:///path` or a path) [default: `DOCKER_HOST`, then
    /// `/var/run/docker.sock`].
    pub docker_host: Option<String>,
    /// Identity of this gateway (stable across its restarts): containers
    /// carry it so a gateway lists only its own.
    pub instance_id: String,
    /// `None`: host networking (the runner dials the gateway on 127.0.0.1).
    /// `Some(name)`: a user-defined network; the gateway's advertised URL
    /// (`--runner-url`) must then be reachable from it.
    pub network: Option<String>,
    /// Host directory holding every user's workspace, bind-mounted at
    /// [`WORKSPACES_MOUNT`] (it must exist on the engine's host).
    pub workspaces_host_dir: PathBuf,
    /// Memory limit per container, bytes.
    pub memory_bytes: Option<i64>,
    /// CPU limit per container, in CPUs (e.g. 1.5).
    pub cpus: Option<f64>,
    /// Process limit per container.
    pub pids_limit: Option<i64>,
    /// Deadline of one engine API call.
    pub api_timeout: Duration,
    /// Seconds between SIGTERM and SIGKILL when stopping a container.
    pub stop_grace_secs: i32,
}

impl DockerBackendConfig {
    /// Defaults: `aishell:local`, host networking, 2 GiB, 1024 processes.
    pub fn new(instance_id: impl Into<String>, workspaces_host_dir: impl Into<PathBuf>) -> Self {
        Self {
            image: DEFAULT_IMAGE.to_string(),
            docker_host: None,
            instance_id: instance_id.into(),
            network: None,
            workspaces_host_dir: workspaces_host_dir.into(),
            memory_bytes: Some(2 << 30),
            cpus: None,
            pids_limit: Some(1024),
            api_timeout: Duration::from_secs(10),
            stop_grace_secs: 3,
        }
    }

    /// The engine socket path this config talks to.
    pub fn socket_path(&self) -> String {
        let host = self
            .docker_host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok())
            .unwrap_or_else(|| DEFAULT_SOCKET.to_string());
        host.trim_start_matches("unix://").to_string()
    }
}

/// Runs each task as a container. See the crate docs.
pub struct DockerBackend {
    cfg: DockerBackendConfig,
    /// Connected and API-version-negotiated lazily, so the gateway starts
    /// (and answers with clear errors) while the engine is down.
    client: OnceCell<Docker>,
}

/// Container name of a task (names must match `[a-zA-Z0-9][a-zA-Z0-9_.-]+`).
pub fn container_name(task_id: &str) -> String {
    let clean: String = task_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("aishell-{clean}")
}

impl DockerBackend {
    pub fn new(cfg: DockerBackendConfig) -> Self {
        Self {
            cfg,
            client: OnceCell::new(),
        }
    }

    pub fn config(&self) -> &DockerBackendConfig {
        &self.cfg
    }

    /// The engine client; connects and negotiates the API version on first
    /// use (older engines such as 20.10 speak API 1.41).
    pub async fn client(&self, op: &'static str) -> Result<Docker, BackendError> {
        let socket = self.cfg.socket_path();
        let timeout = self.cfg.api_timeout;
        self.client
            .get_or_try_init(|| async {
                let unavailable = |reason: String| BackendError::Unavailable {
                    backend: NAME,
                    op,
                    reason: format!(
                        "cannot reach the Docker engine at unix://{socket}: {reason}; is Docker running and is the socket readable?"
                    ),
                };
                if socket.contains("://") {
                    return Err(unavailable(
                        "only a local unix socket (unix:///path) is supported".into(),
                    ));
                }
                let docker = Docker::connect_with_unix(
                    &socket,
                    timeout.as_secs().max(1),
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| unavailable(e.to_string()))?;
                match tokio::time::timeout(timeout, docker.negotiate_version()).await {
                    Ok(Ok(d)) => Ok(d),
                    Ok(Err(e)) => Err(unavailable(e.to_string())),
                    Err(_) => Err(unavailable(format!("no answer within {timeout:?}"))),
                }
            })
            .await
            .cloned()
    }

    /// One engine call with the API deadline; errors keep the engine's words.
    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(self.cfg.api_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(bollard::errors::Error::DockerResponseServerError {
                status_code,
                message,
            })) => Err(CallError::Engine {
                status: status_code,
                message,
            }),
            Ok(Err(e)) => Err(CallError::Backend(BackendError::Unavailable {
                backend: NAME,
                op,
                reason: format!(
                    "the Docker engine at unix://{} did not answer: {e}",
                    self.cfg.socket_path()
                ),
            })),
            Err(_) => Err(CallError::Backend(BackendError::Unavailable {
                backend: NAME,
                op,
                reason: format!(
                    "the Docker engine did not answer within {:?}",
                    self.cfg.api_timeout
                ),
            })),
        }
    }

    fn labels(&self, spec: &LaunchSpec) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_INSTANCE.to_string(), self.cfg.instance_id.clone()),
            (LABEL_TASK.to_string(), spec.task_id.clone()),
            (LABEL_MODE.to_string(), spec.mode.to_string()),
        ]);
        if let Some(sid) = &spec.session_id {
            labels.insert(LABEL_SESSION.to_string(), sid.clone());
        }
        labels
    }

    fn container_body(&self, spec: &LaunchSpec) -> ContainerCreateBody {
        // Per-task extras first, so they can never override the task's identity.
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(format!("AISHELL_GATEWAY_URL={}", spec.gateway_url));
        env.push(format!("AISHELL_TASK_ID={}", spec.task_id));
        env.push(format!("AISHELL_TASK_MODE={}", spec.mode));
        env.push(format!("AISHELL_TASK_CREDENTIAL={}", spec.credential));
        if let Some(sid) = &spec.session_id {
            env.push(format!("AISHELL_SESSION_ID={sid}"));
        }
        let network_mode = self.cfg.network.clone().unwrap_or_else(|| "host".into());
        let host_network = network_mode == "host";
        ContainerCreateBody {
            image: Some(self.cfg.image.clone()),
            env: Some(env),
            labels: Some(self.labels(spec)),
            host_config: Some(HostConfig {
                binds: Some(vec![format!(
                    "{}:{WORKSPACES_MOUNT}",
                    self.cfg.workspaces_host_dir.display()
                )]),
                network_mode: Some(network_mode),
                // `host.docker.internal` names the host on user-defined networks.
                extra_hosts: (!host_network)
                    .then(|| vec!["host.docker.internal:host-gateway".to_string()]),
                memory: self.cfg.memory_bytes,
                nano_cpus: self.cfg.cpus.map(|c| (c * 1e9) as i64),
                pids_limit: self.cfg.pids_limit,
                // docker-init as PID 1: forwards SIGTERM to the runner and
                // reaps the agent's orphans.
                init: Some(true),
                // The runner needs only what per-user UID isolation takes:
                // prepare a workspace (chown/chmod), empty the agent's
                // bounding set (SETPCAP) and drop to its UID.
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(
                    [
                        "CHOWN",
                        "DAC_OVERRIDE",
                        "FOWNER",
                        "SETUID",
                        "SETGID",
                        "SETPCAP",
                        "KILL",
                    ]
                    .map(String::from)
                    .to_vec(),
                ),
                security_opt: Some(vec!["no-new-privileges".into()]),
                readonly_rootfs: Some(true),
                tmpfs: Some(HashMap::from([(
                    "/tmp".to_string(),
                    "rw,nosuid,nodev,mode=1777".to_string(),
                )])),
                auto_remove: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Remove this instance's containers that already exited (left by a
    /// crashed gateway); running ones are left for adoption.
    pub async fn remove_exited(&self) -> Result<usize, BackendError> {
        let docker = self.client("list").await?;
        let mut removed = 0;
        for c in self.list_raw(&docker).await? {
            if matches!(
                c.state,
                Some(ContainerSummaryStateEnum::EXITED | ContainerSummaryStateEnum::DEAD)
            ) && let Some(id) = &c.id
            {
                let opts = RemoveContainerOptionsBuilder::new().force(true).build();
                if self
                    .call("stop", docker.remove_container(id, Some(opts)))
                    .await
                    .is_ok()
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    async fn list_raw(
        &self,
        docker: &Docker,
    ) -> Result<Vec<bollard::models::ContainerSummary>, BackendError> {
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_INSTANCE}={}", self.cfg.instance_id),
            ],
        )]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        self.call("list", docker.list_containers(Some(opts)))
            .await
            .map_err(|e| e.into_backend("list", "list containers"))
    }
}

enum CallError {
    Engine { status: u16, message: String },
    Backend(BackendError),
}

impl CallError {
    fn into_backend(self, op: &'static str, what: &str) -> BackendError {
        match self {
            CallError::Backend(e) => e,
            CallError::Engine { status, message } => BackendError::Refused {
                backend: NAME,
                op,
                reason: format!("{what}: {message} (HTTP {status})"),
            },
        }
    }
}

/// The engine's exit reason in a user's words.
fn exit_reason(
    code: Option<i64>,
    oom_killed: bool,
    error: Option<&str>,
    memory: Option<i64>,
) -> String {
    let mut reason = if oom_killed {
        match memory {
            Some(m) => format!(
                "killed: out of memory (container limit {} MiB)",
                m / (1 << 20)
            ),
            None => "killed: out of memory".to_string(),
        }
    } else {
        match code {
            Some(c) if c > 128 && c < 160 => {
                format!("exited with code {c} (killed by signal {})", c - 128)
            }
            Some(c) => format!("exited with code {c}"),
            None => "exited".to_string(),
        }
    };
    if let Some(e) = error.filter(|e| !e.is_empty()) {
        reason.push_str(&format!("; engine: {e}"));
    }
    reason
}

fn created_at(secs: Option<i64>) -> SystemTime {
    secs.filter(|s| *s > 0)
        .map(|s| UNIX_EPOCH + Duration::from_secs(s as u64))
        .unwrap_or(UNIX_EPOCH)
}

#[async_trait]
impl Backend for DockerBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn launch(&self, spec: LaunchSpec) -> Result<(), BackendError> {
        if spec.task_id.is_empty() {
            return Err(BackendError::Refused {
                backend: NAME,
                op: "launch",
                reason: "empty task id".into(),
            });
        }
        let docker = self.client("launch").await?;
        let started = Instant::now();
        let name = container_name(&spec.task_id);
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self
            .call(
                "launch",
                docker.create_container(Some(opts), self.container_body(&spec)),
            )
            .await;
        let id = match created {
            Ok(r) => r.id,
            Err(CallError::Engine {
                status: 404,
                message,
            }) if message.contains("image") => {
                return Err(BackendError::Refused {
                    backend: NAME,
                    op: "launch",
                    reason: format!(
                        "image {} not found; build it with `aishell image build` (or pull it from your registry and pass --docker-image)",
                        self.cfg.image
                    ),
                });
            }
            Err(e) => return Err(e.into_backend("launch", "create container")),
        };
        if let Err(e) = self.call("launch", docker.start_container(&id, None)).await {
            // Leave nothing behind from a container that never ran.
            let opts = RemoveContainerOptionsBuilder::new().force(true).build();
            let _ = self
                .call("launch", docker.remove_container(&id, Some(opts)))
                .await;
            return Err(e.into_backend("launch", "start container"));
        }
        tracing::info!(
            event = "task_launch",
            taskId = %spec.task_id,
            sessionId = spec.session_id.as_deref(),
            mode = %spec.mode,
            container = %name,
            image = %self.cfg.image,
            duration_ms = started.elapsed().as_millis() as u64,
            "launched runner container"
        );
        Ok(())
    }

    async fn status(&self, task_id: &str) -> Result<TaskStatus, BackendError> {
        let docker = self.client("status").await?;
        let inspected = self
            .call(
                "status",
                docker.inspect_container(&container_name(task_id), None),
            )
            .await;
        let info = match inspected {
            Ok(i) => i,
            Err(CallError::Engine { status: 404, .. }) => return Ok(TaskStatus::NotFound),
            Err(e) => return Err(e.into_backend("status", "inspect container")),
        };
        let Some(state) = info.state else {
            return Ok(TaskStatus::Pending);
        };
        Ok(match state.status {
            Some(ContainerStateStatusEnum::CREATED) | None => TaskStatus::Pending,
            Some(
                ContainerStateStatusEnum::RUNNING
                | ContainerStateStatusEnum::PAUSED
                | ContainerStateStatusEnum::RESTARTING,
            ) => TaskStatus::Running,
            Some(_) if state.running == Some(true) => TaskStatus::Running,
            Some(_) => TaskStatus::Exited {
                code: state.exit_code.map(|c| c as i32),
                reason: exit_reason(
                    state.exit_code,
                    state.oom_killed == Some(true),
                    state.error.as_deref(),
                    self.cfg.memory_bytes,
                ),
            },
        })
    }

    async fn stop(&self, task_id: &str) -> Result<(), BackendError> {
        let docker = self.client("stop").await?;
        let name = container_name(task_id);
        let started = Instant::now();
        let opts = StopContainerOptionsBuilder::new()
            .t(self.cfg.stop_grace_secs)
            .build();
        match self
            .call("stop", docker.stop_container(&name, Some(opts)))
            .await
        {
            // 304: already stopped; 404: already gone.
            Ok(()) | Err(CallError::Engine { status: 304, .. }) => {}
            Err(CallError::Engine { status: 404, .. }) => return Ok(()),
            Err(e) => return Err(e.into_backend("stop", "stop container")),
        }
        let opts = RemoveContainerOptionsBuilder::new().force(true).build();
        match self
            .call("stop", docker.remove_container(&name, Some(opts)))
            .await
        {
            Ok(()) => {}
            // Gone, or removal already in progress: another stop of this
            // task logs it (once).
            Err(CallError::Engine {
                status: 404 | 409, ..
            }) => return Ok(()),
            Err(e) => return Err(e.into_backend("stop", "remove container")),
        }
        tracing::info!(
            event = "task_stop",
            taskId = %task_id,
            container = %name,
            duration_ms = started.elapsed().as_millis() as u64,
            "stopped and removed task container"
        );
        Ok(())
    }

    async fn list(&self) -> Result<Vec<TaskInfo>, BackendError> {
        let docker = self.client("list").await?;
        let mut out: Vec<TaskInfo> = self
            .list_raw(&docker)
            .await?
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                let task_id = labels.get(LABEL_TASK)?.clone();
                let status = match c.state {
                    Some(ContainerSummaryStateEnum::CREATED) => TaskStatus::Pending,
                    Some(
                        ContainerSummaryStateEnum::RUNNING
                        | ContainerSummaryStateEnum::PAUSED
                        | ContainerSummaryStateEnum::RESTARTING,
                    ) => TaskStatus::Running,
                    _ => TaskStatus::Exited {
                        code: None,
                        reason: c.status.unwrap_or_else(|| "exited".into()),
                    },
                };
                // A container without a mode of ours is not one of our tasks.
                let mode = TaskMode::parse(labels.get(LABEL_MODE)?)?;
                Some(TaskInfo {
                    task_id,
                    mode,
                    session_id: labels.get(LABEL_SESSION).cloned(),
                    status,
                    started_at: created_at(c.created),
                })
            })
            .collect();
        // The summary has no exit code or OOM flag, and its words change
        // every second ("Exited (137) 2 seconds ago"): an exited container
        // is inspected for the reason `status` gives (it is removed soon).
        for task in &mut out {
            if matches!(task.status, TaskStatus::Exited { .. })
                && let Ok(status @ TaskStatus::Exited { .. }) = self.status(&task.task_id).await
            {
                task.status = status;
            }
        }
        out.sort_by(|a, b| {
            a.started_at
                .cmp(&b.started_at)
                .then_with(|| a.task_id.cmp(&b.task_id))
        });
        Ok(out)
    }

    fn capabilities(&self) -> aishell_backend::Capabilities {
        aishell_backend::Capabilities {
            typical_cold_start: Duration::from_millis(1500),
            workspaces: aishell_backend::WorkspaceAccess::Local,
            isolation: aishell_backend::Isolation::Container,
        }
    }

    fn workspace_path(&self, user_id: &str) -> String {
        format!("{WORKSPACES_MOUNT}/{user_id}")
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let docker = self.client("ping").await?;
        self.call("ping", docker.ping())
            .await
            .map(|_| ())
            .map_err(|e| e.into_backend("ping", "ping"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_reasons() {
        assert_eq!(container_name("t-abc_1.2"), "aishell-t-abc_1.2");
        assert_eq!(container_name("a/b c"), "aishell-a-b-c");
        assert_eq!(
            exit_reason(Some(137), false, None, None),
            "exited with code 137 (killed by signal 9)"
        );
        assert_eq!(
            exit_reason(Some(137), true, None, Some(64 << 20)),
            "killed: out of memory (container limit 64 MiB)"
        );
        assert_eq!(
            exit_reason(Some(1), false, Some("boom"), None),
            "exited with code 1; engine: boom"
        );
    }

    #[test]
    fn every_container_is_labelled_limited_and_carries_only_task_settings() {
        let mut cfg = DockerBackendConfig::new("gw-1", "/data/workspaces");
        cfg.cpus = Some(1.5);
        let backend = DockerBackend::new(cfg);
        let spec = LaunchSpec {
            task_id: "t-1".into(),
            mode: TaskMode::Cold,
            session_id: Some("s-1".into()),
            gateway_url: "ws://127.0.0.1:1".into(),
            credential: "cred".into(),
            env: Default::default(),
        };
        let body = backend.container_body(&spec);
        let labels = body.labels.unwrap();
        assert_eq!(labels[LABEL_MANAGED], "true");
        assert_eq!(labels[LABEL_INSTANCE], "gw-1");
        assert_eq!(labels[LABEL_TASK], "t-1");
        assert_eq!(labels[LABEL_MODE], "cold");
        let env = body.env.unwrap();
        assert!(env.contains(&"AISHELL_TASK_CREDENTIAL=cred".to_string()));
        assert!(env.contains(&"AISHELL_SESSION_ID=s-1".to_string()));
        let host = body.host_config.unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("host"));
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.memory, Some(2 << 30));
        assert_eq!(host.pids_limit, Some(1024));
        assert_eq!(host.binds.unwrap(), vec!["/data/workspaces:/workspaces"]);
    }
}
