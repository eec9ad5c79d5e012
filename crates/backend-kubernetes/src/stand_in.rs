//! A test-only stand-in of the Kubernetes API server: Pods in one
//! namespace, with create, get, list, watch and delete, resourceVersions,
//! label selectors, and watch events as newline-delimited JSON, as the real
//! server sends them. It is what the backend's tests run against on a
//! machine where no cluster can be installed.
//!
//! Without a runtime (unit tests) pods only exist as objects, and a test
//! sets their status. With [`DockerRuntime`] each Pod runs as a Docker
//! container of its image (environment, mounts, capabilities and memory
//! limit from the pod spec; host networking), and the pod's phase and
//! container status follow the container; an image the engine does not have
//! leaves the container waiting with `ErrImagePull`.
//!
//! What it does not show: scheduling, image pulls from a registry, RBAC,
//! NetworkPolicy enforcement, node loss (see ARCHITECTURE.md, Backends).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder, WaitContainerOptions,
};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Label on every container the stand-in starts: its own id.
pub const LABEL_STAND_IN: &str = "aishell.stand-in";

/// Runs pods as Docker containers.
#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
    /// Host directory of each PersistentVolumeClaim name (bind-mounted where
    /// the pod mounts the claim).
    pub claims: HashMap<String, PathBuf>,
}

impl DockerRuntime {
    /// On the local engine (`/var/run/docker.sock`).
    pub fn local(claims: HashMap<String, PathBuf>) -> Result<Self, String> {
        let docker =
            Docker::connect_with_unix("/var/run/docker.sock", 30, bollard::API_DEFAULT_VERSION)
                .map_err(|e| e.to_string())?;
        Ok(Self { docker, claims })
    }
}

/// The stand-in: pods, their history of events, and an optional runtime.
#[derive(Clone)]
pub struct StandIn {
    shared: Arc<Shared>,
}

struct Shared {
    id: String,
    namespace: String,
    state: Mutex<Objects>,
    events: broadcast::Sender<WatchEvent>,
    runtime: Option<DockerRuntime>,
}

#[derive(Default)]
struct Objects {
    resource_version: u64,
    pods: BTreeMap<String, Pod>,
    /// Every event so far: a watch from resourceVersion N replays those
    /// after N (a test's history is short).
    history: Vec<WatchEvent>,
}

#[derive(Clone)]
struct WatchEvent {
    resource_version: u64,
    kind: &'static str,
    pod: Pod,
}

impl StandIn {
    /// A stand-in serving `namespace`, with pods as mere objects (`runtime`
    /// `None`) or as containers.
    pub fn new(namespace: &str, runtime: Option<DockerRuntime>) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            shared: Arc::new(Shared {
                id: format!("{}-{}", std::process::id(), next_serial()),
                namespace: namespace.to_string(),
                state: Mutex::new(Objects::default()),
                events,
                runtime,
            }),
        }
    }

    /// The value of [`LABEL_STAND_IN`] on this stand-in's containers.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The API as an axum router (also a tower service for `kube::Client::new`).
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/api/v1/namespaces/{ns}/pods",
                get(list_or_watch).post(create),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                get(get_pod).delete(delete_pod),
            )
            .with_state(self.clone())
    }

    /// Serve on a loopback port; returns the server's URL.
    pub async fn serve(&self) -> std::io::Result<String> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let router = self.router();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(format!("http://{addr}"))
    }

    /// A kubeconfig pointing at `url` (no credentials: the stand-in has no
    /// authentication).
    pub fn kubeconfig(&self, url: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {url}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: stand-in\n    namespace: {}\nusers:\n- name: stand-in\n  user: {{}}\ncurrent-context: stand-in\n",
            self.shared.namespace
        )
    }

    /// Every pod now.
    pub fn pods(&self) -> Vec<Pod> {
        self.shared
            .state
            .lock()
            .unwrap()
            .pods
            .values()
            .cloned()
            .collect()
    }

    /// Replace a pod's status, as a kubelet or the scheduler would (a
    /// MODIFIED event). `false` if there is no such pod.
    pub fn set_status(&self, name: &str, status: PodStatus) -> bool {
        self.modify(name, |pod| pod.status = Some(status))
    }

    /// Remove every container this stand-in started.
    pub async fn remove_containers(&self) {
        let Some(runtime) = &self.shared.runtime else {
            return;
        };
        let filters = HashMap::from([(
            "label",
            vec![format!("{LABEL_STAND_IN}={}", self.shared.id)],
        )]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        if let Ok(list) = runtime.docker.list_containers(Some(opts)).await {
            for c in list {
                if let Some(id) = c.id {
                    let opts = RemoveContainerOptionsBuilder::new().force(true).build();
                    let _ = runtime.docker.remove_container(&id, Some(opts)).await;
                }
            }
        }
    }

    fn modify(&self, name: &str, change: impl FnOnce(&mut Pod)) -> bool {
        let mut state = self.shared.state.lock().unwrap();
        let Some(mut pod) = state.pods.get(name).cloned() else {
            return false;
        };
        change(&mut pod);
        self.record(&mut state, "MODIFIED", pod);
        true
    }

    /// Store a change under a new resourceVersion and announce it. Called
    /// with the lock held, so watchers see events in order.
    fn record(&self, state: &mut Objects, kind: &'static str, mut pod: Pod) {
        state.resource_version += 1;
        let rv = state.resource_version;
        pod.metadata.resource_version = Some(rv.to_string());
        let name = pod.metadata.name.clone().unwrap_or_default();
        if kind == "DELETED" {
            state.pods.remove(&name);
        } else {
            state.pods.insert(name, pod.clone());
        }
        let event = WatchEvent {
            resource_version: rv,
            kind,
            pod,
        };
        state.history.push(event.clone());
        let _ = self.shared.events.send(event);
    }

    fn remove(&self, name: &str) {
        let mut state = self.shared.state.lock().unwrap();
        if let Some(pod) = state.pods.get(name).cloned() {
            self.record(&mut state, "DELETED", pod);
        }
    }
}

fn next_serial() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// A `Status` failure as the API server sends it.
fn failure(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason,
            "code": code.as_u16(),
        })),
    )
        .into_response()
}

fn wrong_namespace(ns: &str) -> Response {
    failure(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!("the stand-in serves one namespace; {ns} is not it"),
    )
}

/// `labelSelector`: `k=v`, `k==v`, `k!=v` and `k` (exists), comma-separated.
fn matches_selector(pod: &Pod, selector: Option<&str>) -> bool {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    selector
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels.get(k.trim()).map(String::as_str) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once('=') {
                let v = v.trim_start_matches('=');
                labels.get(k.trim()).map(String::as_str) == Some(v.trim())
            } else {
                labels.contains_key(term)
            }
        })
}

async fn list_or_watch(
    State(stand_in): State<StandIn>,
    Path(ns): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if ns != stand_in.shared.namespace {
        return wrong_namespace(&ns);
    }
    let selector = query.get("labelSelector").cloned();
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let since: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = Duration::from_secs(
            query
                .get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(290),
        );
        return watch(stand_in, selector, since, timeout);
    }
    let state = stand_in.shared.state.lock().unwrap();
    let items: Vec<Value> = state
        .pods
        .values()
        .filter(|p| matches_selector(p, selector.as_deref()))
        .map(|p| serde_json::to_value(p).unwrap_or(Value::Null))
        .collect();
    axum::Json(json!({
        "apiVersion": "v1", "kind": "PodList",
        "metadata": {"resourceVersion": state.resource_version.to_string()},
        "items": items,
    }))
    .into_response()
}

/// Events after `since`, then live ones, one JSON object a line.
fn watch(stand_in: StandIn, selector: Option<String>, since: u64, timeout: Duration) -> Response {
    let (backlog, mut live) = {
        let state = stand_in.shared.state.lock().unwrap();
        let backlog: Vec<WatchEvent> = state
            .history
            .iter()
            .filter(|e| e.resource_version > since)
            .cloned()
            .collect();
        (backlog, stand_in.shared.events.subscribe())
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, Infallible>>(256);
    tokio::spawn(async move {
        let line = |e: &WatchEvent| {
            let mut text = serde_json::to_string(&json!({"type": e.kind, "object": e.pod}))
                .unwrap_or_default();
            text.push('\n');
            text
        };
        let mut last = since;
        for e in &backlog {
            last = e.resource_version;
            if matches_selector(&e.pod, selector.as_deref()) && tx.send(Ok(line(e))).await.is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                e = live.recv() => match e {
                    Ok(e) if e.resource_version > last => {
                        last = e.resource_version;
                        if matches_selector(&e.pod, selector.as_deref())
                            && tx.send(Ok(line(&e))).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Lagged or closed: end the watch; the client relists.
                    Err(_) => return,
                },
            }
        }
    });
    let stream = tokio_stream_from(rx);
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn get_pod(
    State(stand_in): State<StandIn>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    if ns != stand_in.shared.namespace {
        return wrong_namespace(&ns);
    }
    let state = stand_in.shared.state.lock().unwrap();
    match state.pods.get(&name) {
        Some(pod) => axum::Json(pod).into_response(),
        None => not_found(&name),
    }
}

fn not_found(name: &str) -> Response {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("pods \"{name}\" not found"),
    )
}

async fn create(
    State(stand_in): State<StandIn>,
    Path(ns): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if ns != stand_in.shared.namespace {
        return wrong_namespace(&ns);
    }
    let mut pod: Pod = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("invalid Pod: {e}"),
            );
        }
    };
    let Some(name) = pod.metadata.name.clone().filter(|n| !n.is_empty()) else {
        return failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "Pod: metadata.name: Required value".into(),
        );
    };
    let created = {
        let mut state = stand_in.shared.state.lock().unwrap();
        if state.pods.contains_key(&name) {
            return failure(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("pods \"{name}\" already exists"),
            );
        }
        pod.metadata.namespace = Some(ns);
        pod.metadata.uid = Some(format!("stand-in-{}", next_serial()));
        pod.metadata.creation_timestamp = Some(now());
        pod.status = Some(PodStatus {
            phase: Some("Pending".into()),
            conditions: Some(vec![condition("PodScheduled", "True")]),
            ..Default::default()
        });
        stand_in.record(&mut state, "ADDED", pod);
        state.pods.get(&name).cloned()
    };
    if let Some(runtime) = stand_in.shared.runtime.clone() {
        tokio::spawn(run_pod(stand_in.clone(), runtime, name));
    }
    (StatusCode::CREATED, axum::Json(created)).into_response()
}

async fn delete_pod(
    State(stand_in): State<StandIn>,
    Path((ns, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    if ns != stand_in.shared.namespace {
        return wrong_namespace(&ns);
    }
    // kube sends DeleteOptions in the body; a query parameter also works.
    let grace = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["gracePeriodSeconds"].as_i64())
        .or_else(|| query.get("gracePeriodSeconds")?.parse().ok())
        .unwrap_or(30);
    let marked = stand_in.modify(&name, |pod| {
        if pod.metadata.deletion_timestamp.is_none() {
            pod.metadata.deletion_timestamp = Some(now());
            pod.metadata.deletion_grace_period_seconds = Some(grace);
        }
    });
    if !marked {
        return not_found(&name);
    }
    let pod = stand_in
        .shared
        .state
        .lock()
        .unwrap()
        .pods
        .get(&name)
        .cloned();
    match stand_in.shared.runtime.clone() {
        Some(runtime) => {
            let stand_in = stand_in.clone();
            tokio::spawn(async move {
                let container = container_name(&name);
                let opts = StopContainerOptionsBuilder::new().t(grace as i32).build();
                let _ = runtime.docker.stop_container(&container, Some(opts)).await;
                let opts = RemoveContainerOptionsBuilder::new().force(true).build();
                let _ = runtime
                    .docker
                    .remove_container(&container, Some(opts))
                    .await;
                stand_in.remove(&name);
            });
        }
        None => stand_in.remove(&name),
    }
    axum::Json(pod).into_response()
}

fn condition(type_: &str, status: &str) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        last_transition_time: Some(now()),
        ..Default::default()
    }
}

fn container_name(pod: &str) -> String {
    format!("aishell-stand-in-{pod}")
}

fn container_status(image: &str, state: ContainerState, ready: bool) -> ContainerStatus {
    ContainerStatus {
        name: crate::pod::RUNNER_CONTAINER.into(),
        image: image.into(),
        image_id: String::new(),
        ready,
        restart_count: 0,
        started: Some(ready),
        state: Some(state),
        ..Default::default()
    }
}

/// A pod's life as a container: create, start, wait, report.
async fn run_pod(stand_in: StandIn, runtime: DockerRuntime, name: String) {
    let Some(pod) = stand_in
        .shared
        .state
        .lock()
        .unwrap()
        .pods
        .get(&name)
        .cloned()
    else {
        return;
    };
    let Some(spec) = pod.spec.clone() else { return };
    let Some(container) = spec.containers.first().cloned() else {
        return;
    };
    let image = container.image.clone().unwrap_or_default();
    let body = container_body(&stand_in, &runtime, &pod);
    let cname = container_name(&name);
    let opts = CreateContainerOptionsBuilder::new().name(&cname).build();
    let set_runner = |state: ContainerState, phase: &str, ready: bool| {
        let image = image.clone();
        let phase = phase.to_string();
        stand_in.modify(&name, move |pod| {
            let status = pod.status.get_or_insert_with(Default::default);
            status.phase = Some(phase);
            status.container_statuses = Some(vec![container_status(&image, state, ready)]);
            let mut conditions = vec![condition("PodScheduled", "True")];
            conditions.push(condition("Ready", if ready { "True" } else { "False" }));
            status.conditions = Some(conditions);
            if ready {
                status.start_time.get_or_insert_with(now);
            }
        })
    };
    if let Err(e) = runtime.docker.create_container(Some(opts), body).await {
        let message = match &e {
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message,
            } => format!("failed to pull image \"{image}\": {message}"),
            other => other.to_string(),
        };
        let reason = if message.contains("image") {
            "ErrImagePull"
        } else {
            "CreateContainerError"
        };
        set_runner(
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: Some(message),
                }),
                ..Default::default()
            },
            "Pending",
            false,
        );
        return;
    }
    let deleted = || {
        stand_in
            .shared
            .state
            .lock()
            .unwrap()
            .pods
            .get(&name)
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
    };
    if deleted() || runtime.docker.start_container(&cname, None).await.is_err() {
        let opts = RemoveContainerOptionsBuilder::new().force(true).build();
        let _ = runtime.docker.remove_container(&cname, Some(opts)).await;
        return;
    }
    set_runner(
        ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(now()),
            }),
            ..Default::default()
        },
        "Running",
        true,
    );
    let mut waiting = runtime
        .docker
        .wait_container(&cname, None::<WaitContainerOptions>);
    while waiting.next().await.is_some() {}
    let Ok(inspected) = runtime.docker.inspect_container(&cname, None).await else {
        return;
    };
    let state = inspected.state.unwrap_or_default();
    let code = state.exit_code.unwrap_or(0) as i32;
    let reason = if state.oom_killed == Some(true) {
        "OOMKilled"
    } else if code == 0 {
        "Completed"
    } else {
        "Error"
    };
    set_runner(
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(reason.into()),
                finished_at: Some(now()),
                ..Default::default()
            }),
            ..Default::default()
        },
        if code == 0 { "Succeeded" } else { "Failed" },
        false,
    );
}

/// The container of a pod: what the pod spec asks, as Docker says it.
fn container_body(stand_in: &StandIn, runtime: &DockerRuntime, pod: &Pod) -> ContainerCreateBody {
    let spec = pod.spec.clone().unwrap_or_default();
    let container = spec.containers.first().cloned().unwrap_or_default();
    let volumes: HashMap<String, k8s_openapi::api::core::v1::Volume> = spec
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect();
    let mut binds = Vec::new();
    let mut tmpfs = HashMap::new();
    for mount in container.volume_mounts.iter().flatten() {
        let Some(volume) = volumes.get(&mount.name) else {
            continue;
        };
        if let Some(claim) = &volume.persistent_volume_claim
            && let Some(dir) = runtime.claims.get(&claim.claim_name)
        {
            binds.push(format!("{}:{}", dir.display(), mount.mount_path));
        } else if let Some(empty) = &volume.empty_dir {
            let size = empty
                .size_limit
                .as_ref()
                .map(|q| format!(",size={}", quantity_bytes(&q.0).unwrap_or(64 << 20)))
                .unwrap_or_default();
            tmpfs.insert(
                mount.mount_path.clone(),
                format!("rw,nosuid,nodev,mode=1777{size}"),
            );
        }
    }
    let security = container.security_context.clone().unwrap_or_default();
    let caps = security.capabilities.clone().unwrap_or_default();
    let memory = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref()?.get("memory"))
        .and_then(|q| quantity_bytes(&q.0));
    let labels = HashMap::from([
        (LABEL_STAND_IN.to_string(), stand_in.shared.id.clone()),
        (
            format!("{LABEL_STAND_IN}.pod"),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
    ]);
    ContainerCreateBody {
        image: container.image.clone(),
        env: Some(
            container
                .env
                .iter()
                .flatten()
                .map(|e| format!("{}={}", e.name, e.value.clone().unwrap_or_default()))
                .collect(),
        ),
        labels: Some(labels),
        host_config: Some(HostConfig {
            binds: Some(binds),
            tmpfs: Some(tmpfs),
            network_mode: Some("host".into()),
            memory,
            init: Some(true),
            cap_drop: caps.drop,
            cap_add: caps.add,
            readonly_rootfs: security.read_only_root_filesystem,
            security_opt: (security.allow_privilege_escalation == Some(false))
                .then(|| vec!["no-new-privileges".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Bytes of a memory quantity (`256Mi`, `2Gi`, `512M`, `1000`).
pub fn quantity_bytes(q: &str) -> Option<i64> {
    let units: [(&str, i64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<i64>().ok().map(|n| n * factor);
        }
    }
    q.parse().ok()
}
