//! HTTP server: routes, start-up (orphan cleanup) and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use aishell_backend::{Backend, TaskInfo, TaskMode};
use aishell_store::Store;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;

use crate::credential::{CredentialSigner, TrackingBackend};
use crate::session::{SessionCmd, SessionManager};
use crate::{GatewayConfig, Shared, client_ws, runner_ws};

/// A bound, not yet serving gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    listener: TcpListener,
    /// Tasks a previous gateway left running (`Backend::list` at bind).
    listed: Vec<TaskInfo>,
}

impl Gateway {
    /// Bind the port and load secrets; nothing is served until [`serve`](Self::serve).
    pub async fn bind(
        cfg: GatewayConfig,
        store: Arc<dyn Store>,
        backend: Arc<dyn Backend>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cfg.workspaces_root)?;
        let listener = TcpListener::bind(cfg.bind)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.bind))?;
        let local = listener.local_addr()?;
        let runner_url = cfg
            .runner_url
            .clone()
            .unwrap_or_else(|| format!("ws://{local}"));
        let key_path = cfg.data_dir.join("runner-credential.key");
        let mut credentials = CredentialSigner::load_or_create(&key_path)?;
        // One of several: every gateway signs runner credentials with the
        // same key, so whichever takes a session over accepts its runner.
        let cluster = match &cfg.cluster {
            Some(cluster_cfg) => {
                let (cluster, key) = crate::cluster::Cluster::join(
                    cluster_cfg.clone(),
                    store.clone(),
                    runner_url.clone(),
                    &std::fs::read(&key_path)?,
                )
                .await
                .map_err(|e| anyhow::anyhow!("cannot join the gateways on this database: {e}"))?;
                credentials = CredentialSigner::new(key);
                Some(cluster)
            }
            None => None,
        };
        // Every launch and stop passes through it, so only live tasks'
        // credentials are accepted.
        let backend = TrackingBackend::wrap(backend, credentials.clone());
        // Before serving: runners of a previous gateway re-dial at once.
        let listed = match backend.list().await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::error!(event = "orphan_scan_failed", error = %e, "could not list the backend's tasks; runners of a previous gateway will be refused");
                Vec::new()
            }
        };
        // One of several: a task this instance launched before its restart
        // may be another gateway's now (it took the session over); it is
        // not this gateway's to adopt or stop.
        let listed = match &cluster {
            Some(_) => moved_away(store.as_ref(), listed).await,
            None => listed,
        };
        for task in &listed {
            credentials.adopt(&task.task_id);
        }
        crate::metrics::install();
        let launch_slots = Arc::new(tokio::sync::Semaphore::new(
            cfg.max_concurrent_launches.max(1),
        ));
        // A warm task lives at most until it dials back, then its time in the
        // pool, then a task's life once claimed.
        let warm_credential_ttl =
            cfg.pool.launch_deadline + cfg.pool.ready_ttl + cfg.runner_credential_ttl;
        let pool = crate::pool::WarmPool::new(
            cfg.pool.clone(),
            backend.clone(),
            credentials.clone(),
            warm_credential_ttl,
            runner_url.clone(),
            crate::cluster::runner_env(&cfg),
            launch_slots.clone(),
        );
        let adopted = pool.adopt(
            listed
                .iter()
                .filter(|t| t.mode == TaskMode::Warm && t.status.is_alive())
                .map(|t| t.task_id.clone()),
        );
        if !adopted.is_empty() {
            tracing::info!(
                event = "warm_pool_adopt",
                tasks = adopted.len(),
                "warm tasks of a previous gateway wait for their runners to re-register"
            );
        }
        let mut auth =
            crate::auth::Authenticator::new(cfg.jwt.clone()).map_err(|e| anyhow::anyhow!(e))?;
        auth.restrict_to(cfg.only_user.clone());
        let model_proxy = (!cfg.model_providers.iter().all(|p| p.keys.is_empty()))
            .then(|| crate::model_proxy::ModelProxy::new(&cfg.model_providers))
            .transpose()?;
        let task_watch = crate::task_watch::TaskWatch::start(backend.clone());
        let workspaces = aishell_backend::workspaces::for_backend(
            backend.clone(),
            cfg.workspaces_root.clone(),
            cfg.workspaces_mount.clone(),
        );
        let shared = Arc::new(Shared {
            workspaces,
            task_watch,
            model_proxy,
            auth,
            connections: Default::default(),
            queued_starts: Default::default(),
            pool,
            launch_slots,
            cfg,
            store,
            backend,
            credentials,
            sessions: SessionManager::default(),
            tasks: Default::default(),
            runner_url,
            cluster,
            next_id: Default::default(),
        });
        Ok(Gateway {
            shared,
            listener,
            listed,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serve until `shutdown` resolves, then stop every task this gateway owns.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let shared = self.shared.clone();
        tokio::spawn(reap_orphans(shared.clone(), self.listed));
        tokio::spawn(stop_expired_tasks(shared.clone()));
        tokio::spawn(shared.pool.clone().run());
        if let Some(cluster) = &shared.cluster {
            tokio::spawn(cluster.clone().keep(Arc::downgrade(&shared)));
        }
        let limits = crate::http::HttpLimits::from_config(&shared.cfg);
        crate::http::serve(self.listener, router(shared.clone()), limits, shutdown).await;
        stop_all(&shared).await;
        Ok(())
    }
}

/// Bind and serve in one call.
pub async fn serve(
    cfg: GatewayConfig,
    store: Arc<dyn Store>,
    backend: Arc<dyn Backend>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Gateway::bind(cfg, store, backend)
        .await?
        .serve(shutdown)
        .await
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/ws", get(client_ws::handler))
        .route("/internal/task/{session_id}", get(runner_ws::cold))
        .route("/internal/warm/{task_id}", get(runner_ws::warm))
        .route("/internal/relay/{session_id}", get(client_ws::relayed))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .merge(crate::files::routes())
        .merge(crate::api::routes())
        .merge(crate::model_proxy::routes())
        .merge(crate::web::routes())
        .with_state(shared)
}

async fn health(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let tasks = shared.tasks.lock().expect("task map").len();
    axum::Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "backend": shared.backend.name(),
        "sessions_live": shared.sessions.live_count(),
        "tasks": tasks,
        "pool": shared.pool.snapshot(),
    }))
}

async fn metrics_text(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let pool = shared.pool.snapshot();
    crate::metrics::pool(pool.ready, pool.launching);
    let body = crate::metrics::install().render();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
}

async fn ready(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let store = shared.store.ping().await.map_err(|e| e.to_string());
    let backend = shared.backend.ping().await.map_err(|e| e.to_string());
    let ok = store.is_ok() && backend.is_ok();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let show = |r: &Result<(), String>| match r {
        Ok(()) => json!("ok"),
        Err(e) => json!(e),
    };
    (
        status,
        axum::Json(json!({ "ready": ok, "store": show(&store), "backend": show(&backend) })),
    )
}

/// After a restart, tasks a previous gateway launched are still listed by the
/// backend. Their runners re-dial and are adopted by their sessions; whatever
/// is still unclaimed after the grace period is stopped (no orphans).
async fn reap_orphans(shared: Arc<Shared>, listed: Vec<TaskInfo>) {
    if listed.is_empty() {
        return;
    }
    tracing::info!(
        event = "orphan_scan",
        tasks = listed.len(),
        "tasks from a previous gateway found; waiting for their runners to re-attach"
    );
    tokio::time::sleep(shared.cfg.deadlines.orphan_grace).await;
    for task in listed {
        // A session adopted it, or the pool did (an unclaimed warm task; the
        // pool evicts it if its runner does not re-register in time).
        let claimed = shared
            .tasks
            .lock()
            .expect("task map")
            .contains_key(&task.task_id)
            || shared.pool.contains(&task.task_id);
        if !claimed {
            tracing::warn!(event = "orphan_stopped", taskId = %task.task_id, "stopping a task no session claimed");
            if let Err(e) = shared.backend.stop(&task.task_id).await {
                tracing::error!(event = "task_stop_failed", taskId = %task.task_id, error = %e, "could not stop orphan");
            }
            // Its usage row (opened by the previous gateway) ends here.
            if let Err(e) = shared.store.usage_end(&task.task_id).await {
                tracing::error!(event = "store_error", taskId = %task.task_id, error = %e, "could not record an orphan's usage end");
            }
        }
    }
}

/// How often tasks are checked against the longest a task may live.
const EXPIRY_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// A task whose credential expired could no longer re-dial or call the model
/// proxy: it has outlived the longest a task may live, so it is stopped (its
/// session starts a new one when next needed).
async fn stop_expired_tasks(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(EXPIRY_SWEEP).await;
        for task_id in shared.credentials.expired_tasks() {
            tracing::warn!(event = "task_max_life", taskId = %task_id, "stopping a task that outlived its credential");
            if let Err(e) = shared.backend.stop(&task_id).await {
                tracing::error!(event = "task_stop_failed", taskId = %task_id, error = %e, "could not stop an expired task");
            }
        }
    }
}

/// The listed tasks to adopt as this instance's own: those bound to no
/// session (warm ones, orphans). A bound task belongs to whichever gateway
/// holds its session's lease: its runner re-dials and is accepted there
/// (runner_ws.rs), here or elsewhere.
async fn moved_away(store: &dyn Store, listed: Vec<TaskInfo>) -> Vec<TaskInfo> {
    if listed.is_empty() {
        return listed;
    }
    let bound: std::collections::HashSet<String> = match store.list_sessions(None).await {
        Ok(sessions) => sessions.into_iter().filter_map(|s| s.task_id).collect(),
        Err(e) => {
            // Adopting nothing is safe: runners re-dial and are adopted
            // by their sessions; only true orphans are left to stop.
            tracing::error!(event = "orphan_scan_failed", error = %e, "could not read the sessions' tasks; adopting none of the listed tasks");
            return Vec::new();
        }
    };
    listed
        .into_iter()
        .filter(|t| !bound.contains(&t.task_id))
        .collect()
}

/// Graceful shutdown: stop every task (a crash instead leaves them running
/// for the next gateway to adopt). One of several gateways hands its
/// sessions over instead: they step down, their tasks keep running, and
/// their runners and clients reconnect through the shared address.
async fn stop_all(shared: &Arc<Shared>) {
    shared.pool.drain().await;
    if let Some(cluster) = &shared.cluster {
        for handle in shared.sessions.live_handles() {
            handle.send(SessionCmd::StepDown).await;
        }
        cluster.leave().await;
        return;
    }
    for handle in shared.sessions.live_handles() {
        handle
            .send(SessionCmd::StopTask {
                reason: "gateway shutting down".into(),
            })
            .await;
    }
    let owned: Vec<String> = shared
        .tasks
        .lock()
        .expect("task map")
        .keys()
        .cloned()
        .collect();
    let stops = owned.iter().map(|id| shared.backend.stop(id));
    let _ = tokio::time::timeout(
        shared.cfg.deadlines.stop,
        futures_util::future::join_all(stops),
    )
    .await;
}
