//! The `kubernetes` backend: every task is a Pod (`restartPolicy: Never`)
//! of one image (the one `aishell image build` makes, pushed to a registry
//! the cluster pulls from), in one namespace, with per-task environment only
//! (gateway URL, task id, mode, credential), so one warm pool serves every
//! user.
//!
//! Talks to the API server with kube-rs over rustls with ring (in-cluster
//! configuration, or a kubeconfig). Pods carry labels naming aishell, the
//! gateway instance, the task and its mode; [`Backend::list`] finds them by
//! label selector, so a restarted gateway adopts the ones whose runner
//! re-dials. One kube-runtime watcher on that selector feeds
//! [`Backend::watch`]: the cluster's own words (image pull errors, an
//! unschedulable pod, OOM kills, evictions, a lost node) reach the gateway
//! as soon as the API server has them.
//!
//! The API calls this crate makes on pods are exactly [`POD_VERBS`]; the
//! Role in `deploy/kubernetes/` grants those and nothing else.

pub mod pod;
#[cfg(feature = "stand-in")]
pub mod stand_in;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aishell_backend::{
    Backend, BackendError, Capabilities, Isolation, LaunchSpec, StatusChange, TaskInfo, TaskStatus,
    WorkspaceAccess,
};
use async_trait::async_trait;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::{OnceCell, mpsc};

pub use pod::{
    LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_MODE, LABEL_SESSION, LABEL_TASK, MANAGED_BY, pod_name,
    pod_status, task_info,
};

const NAME: &str = "kubernetes";

/// The API verbs this backend uses on pods, and nothing else: `launch`
/// creates, `status` and `stop` get, `list` lists, `watch` watches, `stop`
/// deletes. The deployment's Role grants exactly these (a test checks it).
pub const POD_VERBS: [&str; 5] = ["create", "delete", "get", "list", "watch"];

/// Default image tag (what `aishell image build` produces).
pub const DEFAULT_IMAGE: &str = "aishell:local";
/// Where the workspaces volume is mounted in every pod.
pub const WORKSPACES_MOUNT: &str = "/workspaces";
/// Default name of the ReadWriteMany claim holding every user's workspace.
pub const DEFAULT_WORKSPACES_CLAIM: &str = "aishell-workspaces";

/// Settings of a [`KubernetesBackend`].
#[derive(Debug, Clone)]
pub struct KubernetesBackendConfig {
    /// Image every task runs; its entrypoint is `aishell runner`.
    pub image: String,
    /// `imagePullPolicy` of task pods [default: the cluster's default].
    pub image_pull_policy: Option<String>,
    /// A kubeconfig file [default: in-cluster configuration, then
    /// `KUBECONFIG`, then `~/.kube/config`].
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of task pods [default: the configuration's namespace].
    pub namespace: Option<String>,
    /// Identity of this gateway (stable across its restarts): pods carry it
    /// so a gateway lists only its own.
    pub instance_id: String,
    /// ReadWriteMany claim mounted at [`WORKSPACES_MOUNT`] in every pod (and
    /// in the gateway, at its workspaces root).
    pub workspaces_claim: String,
    /// Resource requests and limits of the runner container (quantities).
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
    /// Size of the pod's in-memory /tmp (counts against the memory limit).
    pub tmp_size: String,
    /// Seconds between SIGTERM and SIGKILL when a pod is deleted.
    pub stop_grace_secs: i64,
    /// How long `stop` waits for a deleted pod to be gone.
    pub stop_timeout: Duration,
    /// Deadline of one API call.
    pub api_timeout: Duration,
}

impl KubernetesBackendConfig {
    /// Defaults: `aishell:local`, 250m/1 CPU, 256Mi/2Gi, 256Mi of /tmp.
    pub fn new(instance_id: impl Into<String>) -> Self {
        Self {
            image: DEFAULT_IMAGE.to_string(),
            image_pull_policy: None,
            kubeconfig: None,
            namespace: None,
            instance_id: instance_id.into(),
            workspaces_claim: DEFAULT_WORKSPACES_CLAIM.to_string(),
            cpu_request: Some("250m".into()),
            cpu_limit: Some("1".into()),
            memory_request: Some("256Mi".into()),
            memory_limit: Some("2Gi".into()),
            tmp_size: "256Mi".into(),
            stop_grace_secs: 3,
            stop_timeout: Duration::from_secs(30),
            api_timeout: Duration::from_secs(10),
        }
    }

    /// The label selector of this gateway's pods.
    pub fn selector(&self) -> String {
        format!(
            "{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_INSTANCE}={}",
            pod::label_value(&self.instance_id)
        )
    }
}

/// Runs each task as a Pod. See the crate docs.
pub struct KubernetesBackend {
    cfg: KubernetesBackendConfig,
    /// Built lazily (reading the kubeconfig or the in-cluster files), so the
    /// gateway starts, and answers with clear errors, without a cluster.
    pods: OnceCell<Api<Pod>>,
}

impl KubernetesBackend {
    pub fn new(cfg: KubernetesBackendConfig) -> Self {
        Self {
            cfg,
            pods: OnceCell::new(),
        }
    }

    /// A backend on a client the caller built (tests: an in-memory API).
    pub fn with_client(cfg: KubernetesBackendConfig, client: Client) -> Self {
        let namespace = cfg
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let cell = OnceCell::new();
        let _ = cell.set(Api::namespaced(client, &namespace));
        Self { cfg, pods: cell }
    }

    pub fn config(&self) -> &KubernetesBackendConfig {
        &self.cfg
    }

    async fn pods(&self, op: &'static str) -> Result<&Api<Pod>, BackendError> {
        self.pods
            .get_or_try_init(|| async {
                let config =
                    self.client_config()
                        .await
                        .map_err(|reason| BackendError::Unavailable {
                            backend: NAME,
                            op,
                            reason,
                        })?;
                let namespace = self
                    .cfg
                    .namespace
                    .clone()
                    .unwrap_or_else(|| config.default_namespace.clone());
                let client = Client::try_from(config).map_err(|e| BackendError::Unavailable {
                    backend: NAME,
                    op,
                    reason: format!("cannot build a Kubernetes client: {e}"),
                })?;
                Ok(Api::namespaced(client, &namespace))
            })
            .await
    }

    async fn client_config(&self) -> Result<kube::Config, String> {
        let mut config = match &self.cfg.kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .map_err(|e| format!("invalid kubeconfig {}: {e}", path.display()))?
            }
            None => kube::Config::infer().await.map_err(|e| {
                format!("no in-cluster configuration and no kubeconfig (set --kubeconfig): {e}")
            })?,
        };
        config.read_timeout = Some(self.cfg.api_timeout);
        config.connect_timeout = Some(self.cfg.api_timeout);
        Ok(config)
    }

    /// One API call with the deadline; errors keep the API server's words.
    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, CallError> {
        // Watches are long; every other call has the API deadline.
        match tokio::time::timeout(self.cfg.api_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(kube::Error::Api(status))) => Err(CallError::Api {
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            }),
            Ok(Err(e)) => Err(CallError::Backend(BackendError::Unavailable {
                backend: NAME,
                op,
                reason: format!("the Kubernetes API server did not answer: {e}"),
            })),
            Err(_) => Err(CallError::Backend(BackendError::Unavailable {
                backend: NAME,
                op,
                reason: format!(
                    "the Kubernetes API server did not answer within {:?}",
                    self.cfg.api_timeout
                ),
            })),
        }
    }
}

enum CallError {
    Api {
        code: u16,
        reason: String,
        message: String,
    },
    Backend(BackendError),
}

impl CallError {
    fn into_backend(self, op: &'static str, what: &str) -> BackendError {
        match self {
            CallError::Backend(e) => e,
            CallError::Api {
                code,
                reason,
                message,
            } => BackendError::Refused {
                backend: NAME,
                op,
                reason: format!("{what}: {message} ({reason}, HTTP {code})"),
            },
        }
    }
}

#[async_trait]
impl Backend for KubernetesBackend {
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
        let pods = self.pods("launch").await?;
        let started = Instant::now();
        let pod = pod::task_pod(&self.cfg, &spec);
        let name = pod_name(&spec.task_id);
        match self
            .call("launch", pods.create(&PostParams::default(), &pod))
            .await
        {
            Ok(_) => {}
            // A retried launch whose first attempt reached the server.
            Err(CallError::Api { code: 409, .. }) => {}
            Err(e) => return Err(e.into_backend("launch", "create pod")),
        }
        tracing::info!(
            event = "task_launch",
            taskId = %spec.task_id,
            sessionId = spec.session_id.as_deref(),
            mode = %spec.mode,
            pod = %name,
            image = %self.cfg.image,
            duration_ms = started.elapsed().as_millis() as u64,
            "created runner pod"
        );
        Ok(())
    }

    async fn status(&self, task_id: &str) -> Result<TaskStatus, BackendError> {
        let pods = self.pods("status").await?;
        match self.call("status", pods.get_opt(&pod_name(task_id))).await {
            Ok(Some(pod)) => Ok(pod_status(&pod, &self.cfg)),
            Ok(None) => Ok(TaskStatus::NotFound),
            Err(e) => Err(e.into_backend("status", "get pod")),
        }
    }

    async fn stop(&self, task_id: &str) -> Result<(), BackendError> {
        let pods = self.pods("stop").await?;
        let name = pod_name(task_id);
        let started = Instant::now();
        let params = DeleteParams {
            grace_period_seconds: Some(self.cfg.stop_grace_secs.max(0) as u32),
            ..Default::default()
        };
        match self.call("stop", pods.delete(&name, &params)).await {
            Ok(_) => {}
            Err(CallError::Api { code: 404, .. }) => return Ok(()),
            Err(e) => return Err(e.into_backend("stop", "delete pod")),
        }
        // Deletion is asynchronous: the pod is gone once the kubelet has
        // stopped its container (up to the grace period).
        let deadline = started + self.cfg.stop_timeout;
        loop {
            match self.call("stop", pods.get_opt(&name)).await {
                Ok(None) => break,
                Ok(Some(_)) | Err(CallError::Backend(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(Some(_)) => {
                    return Err(BackendError::Unavailable {
                        backend: NAME,
                        op: "stop",
                        reason: format!(
                            "pod {name} still exists {:?} after its deletion",
                            self.cfg.stop_timeout
                        ),
                    });
                }
                Err(e) => return Err(e.into_backend("stop", "get pod")),
            }
        }
        tracing::info!(
            event = "task_stop",
            taskId = %task_id,
            pod = %name,
            duration_ms = started.elapsed().as_millis() as u64,
            "deleted task pod"
        );
        Ok(())
    }

    async fn list(&self) -> Result<Vec<TaskInfo>, BackendError> {
        let pods = self.pods("list").await?;
        let params = ListParams::default().labels(&self.cfg.selector());
        let listed = self
            .call("list", pods.list(&params))
            .await
            .map_err(|e| e.into_backend("list", "list pods"))?;
        let mut out: Vec<TaskInfo> = listed
            .items
            .iter()
            .filter_map(|p| task_info(p, &self.cfg))
            .collect();
        out.sort_by(|a, b| {
            a.started_at
                .cmp(&b.started_at)
                .then_with(|| a.task_id.cmp(&b.task_id))
        });
        Ok(out)
    }

    fn workspace_path(&self, user_id: &str) -> String {
        format!("{WORKSPACES_MOUNT}/{user_id}")
    }

    async fn ping(&self) -> Result<(), BackendError> {
        self.list().await.map(|_| ())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Scheduling, and an image pull on a node that never ran one.
            typical_cold_start: Duration::from_secs(5),
            workspaces: WorkspaceAccess::SharedVolume,
            isolation: Isolation::Pod,
        }
    }

    fn watch(self: Arc<Self>) -> mpsc::Receiver<StatusChange> {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let pods = loop {
                match self.pods("watch").await {
                    Ok(p) => break p.clone(),
                    Err(e) => {
                        tracing::warn!(event = "kubernetes_watch_unavailable", error = %e, "cannot watch pods yet; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                            _ = tx.closed() => return,
                        }
                    }
                }
            };
            let config = watcher::Config::default().labels(&self.cfg.selector());
            let events = watcher(pods, config).default_backoff();
            let mut watch = StatusWatch::default();
            tokio::pin!(events);
            loop {
                let event = tokio::select! {
                    e = events.next() => e,
                    _ = tx.closed() => return,
                };
                let Some(event) = event else { return };
                let changes = match event {
                    Ok(event) => watch.apply(event, &self.cfg),
                    Err(e) => {
                        // The watcher relists after its backoff; what was
                        // missed meanwhile shows in the relist.
                        tracing::warn!(event = "kubernetes_watch_error", error = %e, "pod watch failed; retrying");
                        continue;
                    }
                };
                for change in changes {
                    if tx.send(change).await.is_err() {
                        return;
                    }
                }
            }
        });
        rx
    }
}

/// What the watcher's events mean as status changes: each task's last
/// reported status, so only changes are sent, and a relist (after a lost
/// watch) reports the tasks that vanished meanwhile as `NotFound`.
#[derive(Default)]
pub struct StatusWatch {
    known: HashMap<String, TaskStatus>,
    relist: Option<HashMap<String, TaskStatus>>,
}

impl StatusWatch {
    pub fn apply(
        &mut self,
        event: watcher::Event<Pod>,
        cfg: &KubernetesBackendConfig,
    ) -> Vec<StatusChange> {
        match event {
            watcher::Event::Init => {
                self.relist = Some(HashMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(pod) => {
                if let (Some(relist), Some(info)) = (self.relist.as_mut(), task_info(&pod, cfg)) {
                    relist.insert(info.task_id, info.status);
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                let after = self.relist.take().unwrap_or_default();
                let changes = aishell_backend::status_changes(&self.known, &after);
                self.known = after;
                changes
            }
            watcher::Event::Apply(pod) => {
                let Some(info) = task_info(&pod, cfg) else {
                    return Vec::new();
                };
                if self.known.get(&info.task_id) == Some(&info.status) {
                    return Vec::new();
                }
                self.known.insert(info.task_id.clone(), info.status.clone());
                vec![StatusChange {
                    task_id: info.task_id,
                    status: info.status,
                }]
            }
            watcher::Event::Delete(pod) => {
                let Some(info) = task_info(&pod, cfg) else {
                    return Vec::new();
                };
                self.known.remove(&info.task_id);
                vec![StatusChange {
                    task_id: info.task_id,
                    status: TaskStatus::NotFound,
                }]
            }
        }
    }
}
