//! Gateway settings. The CLI builds this from defaults, `aishell.toml`, the
//! environment (including the original system's names) and flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use aishell_protocol::runner::AgentSpec;

use crate::pool::PoolConfig;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub bind: SocketAddr,
    /// Base URL runners dial (`ws://host:port`); defaults to the bind address.
    pub runner_url: Option<String>,
    pub data_dir: PathBuf,
    /// Where the daily log files are (the dashboard's report reads them);
    /// None when the gateway writes none.
    pub log_dir: Option<PathBuf>,
    pub workspaces_root: PathBuf,
    /// Where a backend's shared workspace volume (EFS, a ReadWriteMany
    /// volume) is mounted on the gateway; used by backends whose
    /// workspaces are `SharedVolume` (see aishell_backend::workspaces).
    pub workspaces_mount: Option<PathBuf>,
    /// Agent every session runs unless configured otherwise.
    pub agent: AgentSpec,
    /// Extra settings passed to the agent's `init`.
    pub agent_settings: serde_json::Map<String, serde_json::Value>,
    /// Stop a task whose session has been `idle` this long.
    pub idle_timeout: Duration,
    /// Keep a task running this long after its client left mid-turn.
    pub disconnect_processing_timeout: Duration,
    pub deadlines: Deadlines,
    /// Largest client frame; larger ones close the socket with 1009.
    pub max_frame_bytes: usize,
    /// Events kept in memory per session for replay (older ones come from the store).
    pub replay_buffer: usize,
    /// Obtain a task when a client connects instead of on its first message.
    pub start_on_connect: bool,
    /// How long a session with no task and no client stays in memory.
    pub session_evict_after: Duration,
    /// The longest a task may live (its credential expires then and the
    /// gateway stops it); warm tasks add their launch deadline and pool TTL.
    pub runner_credential_ttl: Duration,
    pub pool: PoolConfig,
    /// JWT verification; opaque API tokens always work.
    pub jwt: Option<crate::auth::JwtConfig>,
    /// Client frames per second per connection (token bucket; burst = 2×).
    pub messages_per_second: u32,
    /// Open client connections per user; more get HTTP 429.
    pub max_connections_per_user: usize,
    /// Sandboxes (tasks) one user may run at once; more: `QUOTA_EXCEEDED`.
    pub max_tasks_per_user: usize,
    /// Warm tasks one user may hold at once; beyond it their starts go cold,
    /// so one user cannot drain the pool.
    pub max_warm_claims_per_user: usize,
    /// Starts waiting for a launch slot before new ones get `OVERLOADED`.
    pub max_queued_starts: usize,
    /// Sandbox hours per user per rolling week; `None`: unlimited.
    pub max_hours_per_week: Option<f64>,
    /// Per-user idle timeouts overriding `idle_timeout`.
    pub user_idle_timeouts: std::collections::HashMap<String, Duration>,
    /// How runners confine agents; `None` runs them unconfined.
    pub sandbox: Option<aishell_protocol::runner::SandboxSettings>,
    /// Task launches in flight at once, per backend (warm and cold); more
    /// starts queue instead of failing.
    pub max_concurrent_launches: usize,
    /// Model endpoints whose API keys the gateway holds for the agents.
    pub model_providers: Vec<crate::model_proxy::ModelProviderConfig>,
    /// Only this user may connect (agents run unconfined because no sandbox
    /// is available); `None`: every authenticated user.
    pub only_user: Option<String>,
    /// A request's headers must arrive within this (slow clients are closed).
    pub header_read_timeout: Duration,
    /// A WebSocket upgrade request must be answered within this.
    pub pre_upgrade_timeout: Duration,
    /// Open connections at once (WebSockets included); more are refused (503).
    pub max_connections: usize,
    /// Connections from one address that have not sent a complete request
    /// (so not authenticated) yet; more are refused (429).
    pub max_pending_connections_per_address: usize,
    /// Bytes of agent output one turn may store and relay; past it the rest
    /// of the turn is dropped and the client told once (its end still goes
    /// through).
    pub max_turn_output_bytes: u64,
    /// Bytes of events kept in memory per session for replay, besides the
    /// `replay_buffer` count (older ones come from the store).
    pub replay_buffer_bytes: usize,
    /// One of several gateways sharing the database (docs/cluster.md).
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// Every transitional state has a deadline: nothing waits forever.
#[derive(Debug, Clone)]
pub struct Deadlines {
    /// Backend launch call plus backend-side pending (CREATING).
    pub launch: Duration,
    /// Task running → runner dialled back (PENDING).
    pub connect: Duration,
    /// Runner connected → agent ready and conversations restored (ACTIVATING).
    pub activate: Duration,
    /// Overall bound on a restart (failure class 4).
    pub restart: Duration,
    /// How long a backend stop may take.
    pub stop: Duration,
    /// A new start waits this long for the old task to finish stopping (class 3).
    pub stop_wait: Duration,
    /// A runner may dial back this long before its session is registered (class 2).
    pub dial_back_grace: Duration,
    /// A ready task whose runner socket dropped may re-dial within this window.
    pub runner_reconnect: Duration,
    /// After a gateway restart, tasks whose runner has not re-attached by
    /// then are stopped as orphans.
    pub orphan_grace: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            launch: Duration::from_secs(60),
            connect: Duration::from_secs(30),
            activate: Duration::from_secs(60),
            restart: Duration::from_secs(30),
            stop: Duration::from_secs(15),
            stop_wait: Duration::from_secs(10),
            dial_back_grace: Duration::from_secs(5),
            runner_reconnect: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(30),
        }
    }
}

impl GatewayConfig {
    /// The idle timeout of one user's sessions.
    pub fn idle_timeout_for(&self, user_id: &str) -> Duration {
        self.user_idle_timeouts
            .get(user_id)
            .copied()
            .unwrap_or(self.idle_timeout)
    }

    /// Defaults for a data dir: SQLite and workspaces under it, the shell agent.
    pub fn new(data_dir: PathBuf) -> Self {
        GatewayConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 5174)),
            runner_url: None,
            workspaces_root: data_dir.join("workspaces"),
            workspaces_mount: None,
            log_dir: Some(data_dir.join("logs")),
            data_dir,
            agent: AgentSpec {
                kind: "shell".into(),
                command: None,
            },
            agent_settings: serde_json::Map::new(),
            idle_timeout: Duration::from_secs(900),
            disconnect_processing_timeout: Duration::from_secs(900),
            deadlines: Deadlines::default(),
            max_frame_bytes: aishell_protocol::DEFAULT_MAX_FRAME_BYTES,
            replay_buffer: 4096,
            start_on_connect: false,
            session_evict_after: Duration::from_secs(300),
            runner_credential_ttl: Duration::from_secs(24 * 3600),
            pool: PoolConfig::default(),
            jwt: None,
            messages_per_second: 20,
            max_connections_per_user: 64,
            max_tasks_per_user: 10,
            max_warm_claims_per_user: 2,
            max_queued_starts: 256,
            max_hours_per_week: None,
            sandbox: None,
            user_idle_timeouts: Default::default(),
            max_concurrent_launches: 16,
            model_providers: Vec::new(),
            only_user: None,
            header_read_timeout: Duration::from_secs(10),
            pre_upgrade_timeout: Duration::from_secs(15),
            max_connections: 8192,
            max_pending_connections_per_address: 256,
            max_turn_output_bytes: 16 << 20,
            replay_buffer_bytes: 8 << 20,
            cluster: None,
        }
    }
}
