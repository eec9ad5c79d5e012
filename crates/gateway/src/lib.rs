//! The aishell gateway (`aishell serve`): client WebSocket and HTTP API, runner
//! sockets, session manager, backends and store (SPEC §2–§7).

pub mod auth;
mod client_ws;
pub mod config;
pub mod credential;
mod lifecycle;
pub mod metrics;
pub mod pool;
mod runner_ws;
mod server;
pub mod session;

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
    pub store: Arc<dyn Store>,
    pub backend: Arc<dyn Backend>,
    pub credentials: credential::CredentialSigner,
    pub sessions: session::SessionManager,
    /// Which session each live task belongs to (for orphan cleanup and /health).
    pub tasks: std::sync::Mutex<HashMap<String, String>>,
    /// Base URL runners dial.
    pub runner_url: String,
    pub pool: Arc<pool::WarmPool>,
    /// Bounds launches in flight on the backend (warm and cold).
    pub launch_slots: Arc<tokio::sync::Semaphore>,
    next_id: AtomicU64,
}

impl Shared {
    /// A process-unique number for connection ids and runner generations.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}
