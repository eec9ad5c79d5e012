//! HTTP server: routes, start-up (orphan cleanup) and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use aishell_backend::Backend;
use aishell_store::Store;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::serve::ListenerExt;
use serde_json::json;
use tokio::net::TcpListener;

use crate::credential::CredentialSigner;
use crate::session::{SessionCmd, SessionManager};
use crate::{GatewayConfig, Shared, client_ws, runner_ws};

/// A bound, not yet serving gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    listener: TcpListener,
}

impl Gateway {
    /// Bind the port and load secrets; nothing is served until [`serve`](Self::serve).
    pub async fn bind(
        cfg: GatewayConfig,
        store: Arc<dyn Store>,
        backend: Arc<dyn Backend>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cfg.workspaces_root)?;
        let credentials =
            CredentialSigner::load_or_create(&cfg.data_dir.join("runner-credential.key"))?;
        let listener = TcpListener::bind(cfg.bind)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.bind))?;
        let local = listener.local_addr()?;
        crate::metrics::install();
        let runner_url = cfg
            .runner_url
            .clone()
            .unwrap_or_else(|| format!("ws://{local}"));
        let launch_slots = Arc::new(tokio::sync::Semaphore::new(
            cfg.max_concurrent_launches.max(1),
        ));
        let pool = crate::pool::WarmPool::new(
            cfg.pool.clone(),
            backend.clone(),
            credentials.clone(),
            cfg.runner_credential_ttl,
            runner_url.clone(),
            launch_slots.clone(),
        );
        let mut auth =
            crate::auth::Authenticator::new(cfg.jwt.clone()).map_err(|e| anyhow::anyhow!(e))?;
        auth.restrict_to(cfg.only_user.clone());
        let model_proxy = (!cfg.model_providers.iter().all(|p| p.keys.is_empty()))
            .then(|| crate::model_proxy::ModelProxy::new(&cfg.model_providers))
            .transpose()?;
        let shared = Arc::new(Shared {
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
            next_id: Default::default(),
        });
        Ok(Gateway { shared, listener })
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
        tokio::spawn(reap_orphans(shared.clone()));
        tokio::spawn(shared.pool.clone().run());
        // Small frames must not wait for Nagle + delayed ACK (~40 ms).
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router(shared.clone()))
            .with_graceful_shutdown(shutdown)
            .await?;
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
async fn reap_orphans(shared: Arc<Shared>) {
    let listed = match shared.backend.list().await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(event = "orphan_scan_failed", error = %e, "could not list the backend's tasks");
            return;
        }
    };
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
        let claimed = shared
            .tasks
            .lock()
            .expect("task map")
            .contains_key(&task.task_id);
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

/// Graceful shutdown: stop every task (a crash instead leaves them running
/// for the next gateway to adopt).
async fn stop_all(shared: &Arc<Shared>) {
    shared.pool.drain().await;
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
