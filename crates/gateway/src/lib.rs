//! The aishell gateway (`aishell serve`): client WebSocket and HTTP API, runner
//! sockets, session manager, backends and store.

mod api;
pub mod auth;
mod client_ws;
pub mod cluster;
pub mod config;
pub mod credential;
mod files;
mod http;
mod lifecycle;
pub mod metrics;
pub mod model_proxy;
pub mod pool;
pub mod recent;
mod runner_ws;
mod server;
pub mod session;
pub mod task_watch;
mod web;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aishell_backend::Backend;
use aishell_store::Store;

pub use config::{Deadlines, GatewayConfig};
pub use server::{Gateway, serve};

/// Everything the gateway's parts share.
pub struct Shared {
    pub cfg: GatewayConfig,
    pub auth: auth::Authenticator,
    /// Open client connections per user.
    pub connections: std::sync::Mutex<HashMap<String, usize>>,
    /// Starts waiting for a launch slot (for `OVERLOADED`).
    pub queued_starts: std::sync::atomic::AtomicUsize,
    pub store: Arc<dyn Store>,
    pub backend: Arc<dyn Backend>,
    /// Users' workspaces as this gateway reaches them (files API, and
    /// prepared before a task starts).
    pub workspaces: Arc<dyn aishell_backend::workspaces::Workspaces>,
    /// The one watch of the backend's task statuses (task_watch.rs).
    pub task_watch: Arc<task_watch::TaskWatch>,
    pub credentials: credential::CredentialSigner,
    pub sessions: session::SessionManager,
    /// Which session each live task belongs to (for orphan cleanup and /health).
    pub tasks: std::sync::Mutex<HashMap<String, TaskOwner>>,
    /// Base URL runners dial.
    pub runner_url: String,
    pub pool: Arc<pool::WarmPool>,
    /// Bounds launches in flight on the backend (warm and cold).
    pub launch_slots: Arc<tokio::sync::Semaphore>,
    /// Forwards agents' model calls with pooled API keys; `None`: no keys.
    pub model_proxy: Option<model_proxy::ModelProxy>,
    /// This gateway as one of several on one database; `None`: the only one.
    pub cluster: Option<Arc<cluster::Cluster>>,
    next_id: AtomicU64,
}

/// Who a live task belongs to.
#[derive(Debug, Clone)]
pub struct TaskOwner {
    pub session_id: String,
    pub user_id: String,
    /// Claimed from the warm pool.
    pub warm: bool,
}

impl TaskOwner {
    pub fn new(session_id: &str, user_id: &str, warm: bool) -> Self {
        TaskOwner {
            session_id: session_id.to_string(),
            user_id: user_id.to_string(),
            warm,
        }
    }
}

impl Shared {
    /// What a runner is told to run for a user (`init_user`), and what warm
    /// runners pre-start (`prepare`). Per-user settings will come in here;
    /// a pre-started agent is used only when they equal the pool's.
    pub fn runner_settings(&self) -> aishell_protocol::runner::RunnerSettings {
        aishell_protocol::runner::RunnerSettings {
            agent: self.cfg.agent.clone(),
            env: Default::default(),
            agent_settings: self.cfg.agent_settings.clone(),
            sandbox: self.cfg.sandbox.clone(),
            model_proxy: self
                .model_proxy
                .as_ref()
                .map(|p| p.provider_names())
                .unwrap_or_default(),
        }
    }

    /// (tasks, warm tasks) a user runs right now.
    pub fn tasks_of(&self, user_id: &str) -> (usize, usize) {
        let tasks = self.tasks.lock().expect("task map");
        let mine = tasks.values().filter(|o| o.user_id == user_id);
        mine.fold((0, 0), |(n, w), o| (n + 1, w + usize::from(o.warm)))
    }

    /// A process-unique number for connection ids and runner generations.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}
