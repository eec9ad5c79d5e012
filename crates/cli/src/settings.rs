//! `aishell serve` settings: flags, environment (including the original
//! system's names: PORT, EXECUTION_MODE, SESSION_IDLE_TIMEOUT,
//! DISCONNECT_PROCESSING_TIMEOUT, DATABASE_URL) and `aishell.toml`.
//! Precedence: flag > environment > config file > default.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aishell_gateway::GatewayConfig;
use aishell_protocol::runner::AgentSpec;
use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;

/// Every option of `aishell serve`. The same names (with `_`) are the keys
/// of the `--config` TOML file.
#[derive(Args, Deserialize, Default, Debug, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct ServeSettings {
    /// TCP port to listen on (0 picks a free one).
    #[arg(long, env = "PORT")]
    pub port: Option<u16>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "AISHELL_BIND")]
    pub bind: Option<IpAddr>,
    /// Directory for the SQLite database, workspaces and secrets [default: ./aishell-data].
    #[arg(long, env = "AISHELL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Store location: sqlite://PATH [default: sqlite://<data-dir>/aishell.db].
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Where tasks run: process, docker, kubernetes or ecs [default: process].
    #[arg(long, env = "EXECUTION_MODE")]
    pub execution_mode: Option<String>,
    /// Built-in agent every session runs: shell, echo, llm, claude [default: shell].
    #[arg(long, env = "AISHELL_AGENT")]
    pub agent: Option<String>,
    /// Command line of an external agent speaking the agent protocol (overrides --agent).
    #[arg(long, env = "AISHELL_AGENT_COMMAND")]
    pub agent_command: Option<String>,
    /// Root of per-user workspaces [default: <data-dir>/workspaces].
    #[arg(long, env = "AISHELL_WORKSPACES_ROOT")]
    pub workspaces_root: Option<PathBuf>,
    /// Mount path on the gateway of a backend's shared workspace volume
    /// (EFS, a ReadWriteMany volume), for the files API.
    #[arg(long, env = "AISHELL_WORKSPACES_MOUNT")]
    pub workspaces_mount: Option<PathBuf>,
    /// Stop a session's task after it has been idle this long (e.g. 900, 15m) [default: 900s].
    #[arg(long, env = "SESSION_IDLE_TIMEOUT")]
    pub session_idle_timeout: Option<String>,
    /// Keep a task running this long after its client left mid-turn [default: 900s].
    #[arg(long, env = "DISCONNECT_PROCESSING_TIMEOUT")]
    pub disconnect_processing_timeout: Option<String>,
    /// Base URL runners dial back to, and (several gateways on one
    /// PostgreSQL) other gateways relay to [default: ws://<bind>:<port>].
    #[arg(long, env = "AISHELL_RUNNER_URL")]
    pub runner_url: Option<String>,
    /// Several gateways on one PostgreSQL: this gateway's unique name
    /// [default: gw-<random>].
    #[arg(long, env = "AISHELL_GATEWAY_ID")]
    pub gateway_id: Option<String>,
    /// Several gateways: the address in front of them all (a load
    /// balancer), which runners re-dial when their gateway is gone, e.g.
    /// ws://lb:8080.
    #[arg(long, env = "AISHELL_SHARED_URL")]
    pub shared_url: Option<String>,
    /// Several gateways: how long a session lease lasts unless renewed (a
    /// dead gateway's sessions move after at most this) [default: 10s].
    #[arg(long, env = "AISHELL_LEASE_TTL")]
    pub lease_ttl: Option<String>,
    /// Largest client frame in bytes; larger frames close with 1009 [default: 1048576].
    #[arg(long, env = "AISHELL_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Events per session kept in memory for replay [default: 4096].
    #[arg(long, env = "AISHELL_REPLAY_BUFFER")]
    pub replay_buffer: Option<usize>,
    /// Start a task when a client connects instead of on its first message.
    #[arg(long, env = "AISHELL_START_ON_CONNECT")]
    pub start_on_connect: Option<bool>,
    /// Deadline for the backend to launch a task [default: 60s].
    #[arg(long, env = "AISHELL_LAUNCH_TIMEOUT")]
    pub launch_timeout: Option<String>,
    /// Deadline for a running task's runner to dial back [default: 30s].
    #[arg(long, env = "AISHELL_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<String>,
    /// Deadline for the agent to become ready and restore conversations [default: 60s].
    #[arg(long, env = "AISHELL_ACTIVATE_TIMEOUT")]
    pub activate_timeout: Option<String>,
    /// Overall deadline of a restart [default: 30s].
    #[arg(long, env = "AISHELL_RESTART_TIMEOUT")]
    pub restart_timeout: Option<String>,
    /// How long a new start waits for the old task to stop [default: 10s].
    #[arg(long, env = "AISHELL_STOP_WAIT")]
    pub stop_wait: Option<String>,
    /// How long a runner may dial back before its session is registered [default: 5s].
    #[arg(long, env = "AISHELL_DIAL_BACK_GRACE")]
    pub dial_back_grace: Option<String>,
    /// How long a ready task's runner may take to re-dial after its socket drops [default: 30s].
    #[arg(long, env = "AISHELL_RUNNER_RECONNECT_TIMEOUT")]
    pub runner_reconnect_timeout: Option<String>,
    /// After a restart, stop tasks whose runner has not re-attached by then [default: 30s].
    #[arg(long, env = "AISHELL_ORPHAN_GRACE")]
    pub orphan_grace: Option<String>,
    /// Sessions with no task and no client leave memory after this long [default: 300s].
    #[arg(long, env = "AISHELL_SESSION_EVICT_AFTER")]
    pub session_evict_after: Option<String>,
    /// User of the token printed at start-up [default: local].
    #[arg(long, env = "AISHELL_DEFAULT_USER")]
    pub user: Option<String>,
    /// Keep pre-started sandboxes ready to claim [default: true].
    #[arg(long, env = "ENABLE_WARM_POOL")]
    pub enable_warm_pool: Option<bool>,
    /// Ready sandboxes the warm pool keeps [default: 3].
    #[arg(long, env = "WARM_POOL_TARGET_SIZE")]
    pub warm_pool_target_size: Option<usize>,
    /// Most sandboxes the warm pool holds, launching ones included [default: 10].
    #[arg(long, env = "WARM_POOL_MAX_SIZE")]
    pub warm_pool_max_size: Option<usize>,
    /// Replace ready sandboxes older than this [default: 3600s].
    #[arg(long, env = "WARM_POOL_READY_TTL")]
    pub warm_pool_ready_ttl: Option<String>,
    /// Warm sandboxes start their agent before the claim, which then only binds the user's workspace (root runners under bubblewrap) [default: true].
    #[arg(long, env = "WARM_POOL_PRESTART_AGENTS")]
    pub warm_pool_prestart_agents: Option<bool>,
    /// Sandbox launches in flight at once (warm and cold); more queue [default: 16].
    #[arg(long, env = "AISHELL_MAX_CONCURRENT_LAUNCHES")]
    pub max_concurrent_launches: Option<usize>,
    /// Where the daily JSON log files go (one per UTC day, a month kept, read by `aishell report`): a directory, or `none` to write none [default: <data-dir>/logs].
    #[arg(long, env = "AISHELL_LOG_FILE", num_args = 0..=1, default_missing_value = "true")]
    #[serde(deserialize_with = "bool_or_string")]
    pub log_file: Option<String>,
    /// Console format: `human` (a summary, then warnings and errors) or `json` (every line) [default: human on a terminal, json otherwise].
    #[arg(long, env = "AISHELL_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Settings for the agent's `init`, a JSON object, e.g.
    /// '{"claude_model":"sonnet","claude_permission_mode":"acceptEdits"}'.
    #[arg(long, env = "AISHELL_AGENT_SETTINGS")]
    pub agent_settings: Option<String>,
    /// OpenAI-compatible endpoint of the `llm` agent, e.g. http://127.0.0.1:8080/v1 [default with keys: https://api.openai.com/v1].
    #[arg(long, env = "AISHELL_LLM_BASE_URL")]
    pub llm_base_url: Option<String>,
    /// Model the `llm` agent asks for (e.g. gpt-4.1, qwen2.5-coder).
    #[arg(long, env = "AISHELL_LLM_MODEL")]
    pub llm_model: Option<String>,
    /// API keys for the LLM endpoint, comma-separated; held by the gateway,
    /// which proxies the agents' calls (keys never enter a sandbox).
    #[arg(long, env = "AISHELL_LLM_API_KEYS", hide_env_values = true)]
    pub llm_api_keys: Option<String>,
    /// Anthropic API base URL for the `claude` agent [default: https://api.anthropic.com].
    #[arg(long, env = "AISHELL_ANTHROPIC_BASE_URL")]
    pub anthropic_base_url: Option<String>,
    /// Anthropic API keys, comma-separated; held and pooled by the gateway.
    #[arg(long, env = "AISHELL_ANTHROPIC_API_KEYS", hide_env_values = true)]
    pub anthropic_api_keys: Option<String>,
    /// How long a key that answered 429 rests when the provider names no reset time [default: 60s].
    #[arg(long, env = "AISHELL_MODEL_KEY_COOLDOWN")]
    pub model_key_cooldown: Option<String>,
    /// Accept HS256 JWTs signed with this shared secret.
    #[arg(long, env = "AISHELL_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Accept RS256/ES256 JWTs verified with this PEM public key file.
    #[arg(long, env = "AISHELL_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Accept JWTs verified with the keys of this JWKS file.
    #[arg(long, env = "AISHELL_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// Required JWT issuer (`iss`).
    #[arg(long, env = "AISHELL_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required JWT audience (`aud`).
    #[arg(long, env = "AISHELL_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// JWT claim naming the user [default: sub].
    #[arg(long, env = "AISHELL_JWT_USER_CLAIM")]
    pub jwt_user_claim: Option<String>,
    /// JWT claim granting the admin role (true, "admin", or a list containing "admin").
    #[arg(long, env = "AISHELL_JWT_ADMIN_CLAIM")]
    pub jwt_admin_claim: Option<String>,
    /// Client frames per second per connection (burst twice that) [default: 20].
    #[arg(long, env = "AISHELL_MESSAGES_PER_SECOND")]
    pub messages_per_second: Option<u32>,
    /// Open connections per user; more get HTTP 429 [default: 64].
    #[arg(long, env = "AISHELL_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<usize>,
    /// Sandboxes one user may run at once; more get QUOTA_EXCEEDED [default: 10].
    #[arg(long, env = "AISHELL_MAX_TASKS_PER_USER")]
    pub max_tasks_per_user: Option<usize>,
    /// Warm-pool tasks one user may hold at once; beyond it starts go cold [default: 2].
    #[arg(long, env = "AISHELL_MAX_WARM_CLAIMS_PER_USER")]
    pub max_warm_claims_per_user: Option<usize>,
    /// Sandbox hours each user may use per rolling week; more: QUOTA_EXCEEDED [default: unlimited].
    #[arg(long, env = "AISHELL_MAX_HOURS_PER_WEEK")]
    pub max_hours_per_week: Option<f64>,
    /// Starts waiting for a launch slot before new ones get OVERLOADED [default: 256].
    #[arg(long, env = "AISHELL_MAX_QUEUED_STARTS")]
    pub max_queued_starts: Option<usize>,
    /// Per-user idle timeouts overriding SESSION_IDLE_TIMEOUT, e.g. `alice=2h,bob=5m`.
    #[arg(long, env = "AISHELL_USER_IDLE_TIMEOUTS")]
    pub user_idle_timeouts: Option<String>,
    /// Confine agents: bwrap (bubblewrap) or none [default: bwrap].
    #[arg(long, env = "AISHELL_SANDBOX")]
    pub sandbox: Option<String>,
    /// Run agents unconfined even for several users (every agent can read every workspace).
    #[arg(long, env = "AISHELL_INSECURE_NO_SANDBOX")]
    pub insecure_no_sandbox: Option<bool>,
    /// Let sandboxed agents use the network [default: true].
    #[arg(long, env = "AISHELL_SANDBOX_NETWORK")]
    pub sandbox_network: Option<bool>,
    /// How sandboxed agents reach the outside: `proxy` (an HTTP proxy in the runner, by name, never to loopback, private or link-local addresses) or `full` (any TCP/UDP destination through pasta) [default: proxy].
    #[arg(long, env = "AISHELL_SANDBOX_EGRESS")]
    pub sandbox_egress: Option<String>,
    /// Address ranges the egress proxy lets agents reach although they are loopback, private or link-local, e.g. `10.20.0.0/16,192.168.5.7` [default: none].
    #[arg(long, env = "AISHELL_SANDBOX_EGRESS_ALLOW")]
    pub sandbox_egress_allow: Option<String>,
    /// Address-space limit per agent, bytes [default: 8589934592].
    #[arg(long, env = "AISHELL_SANDBOX_MEMORY_BYTES")]
    pub sandbox_memory_bytes: Option<u64>,
    /// Open files per agent [default: 4096].
    #[arg(long, env = "AISHELL_SANDBOX_MAX_FILES")]
    pub sandbox_max_files: Option<u64>,
    /// Processes per agent user (RLIMIT_NPROC; applied when the agent has a UID of its own or the runner is not root).
    #[arg(long, env = "AISHELL_SANDBOX_MAX_PROCESSES")]
    pub sandbox_max_processes: Option<u64>,
    /// CPU seconds per agent [default: unlimited].
    #[arg(long, env = "AISHELL_SANDBOX_CPU_SECONDS")]
    pub sandbox_cpu_seconds: Option<u64>,
    /// Processes and threads per sandbox, all of its agent's together (cgroup v1 pids, root runners) [default: 512].
    #[arg(long, env = "AISHELL_SANDBOX_PIDS_MAX")]
    pub sandbox_pids_max: Option<u64>,
    /// Memory per sandbox, all of its agent's processes together, bytes (cgroup v1 memory, root runners) [default: 4294967296].
    #[arg(long, env = "AISHELL_SANDBOX_CGROUP_MEMORY_BYTES")]
    pub sandbox_cgroup_memory_bytes: Option<u64>,
    /// Size of the sandbox's /tmp and of its /var/tmp, bytes each [default: 268435456].
    #[arg(long, env = "AISHELL_SANDBOX_TMP_BYTES")]
    pub sandbox_tmp_bytes: Option<u64>,
    /// Process backend, root: each user's workspace is a file system of this size (e.g. 1g), so a full workspace is ENOSPC for its user only [default: off].
    #[arg(long, env = "AISHELL_WORKSPACE_QUOTA")]
    pub workspace_quota: Option<String>,
    /// Docker backend: image every task runs [default: aishell:local, built by `aishell image build`].
    #[arg(long, env = "AISHELL_DOCKER_IMAGE")]
    pub docker_image: Option<String>,
    /// Docker backend: engine socket, unix:///path [default: DOCKER_HOST, then /var/run/docker.sock].
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Docker backend: network of task containers; `host` (runners dial 127.0.0.1) or a user-defined network (set --runner-url to an address reachable from it) [default: host].
    #[arg(long, env = "AISHELL_DOCKER_NETWORK")]
    pub docker_network: Option<String>,
    /// Docker backend: memory limit per container, e.g. 512m, 2g [default: 2g].
    #[arg(long, env = "AISHELL_DOCKER_MEMORY")]
    pub docker_memory: Option<String>,
    /// Docker backend: CPUs per container, e.g. 1.5 [default: unlimited].
    #[arg(long, env = "AISHELL_DOCKER_CPUS")]
    pub docker_cpus: Option<f64>,
    /// Docker backend: processes per container [default: 1024].
    #[arg(long, env = "AISHELL_DOCKER_PIDS_LIMIT")]
    pub docker_pids_limit: Option<i64>,
    /// ECS backend: cluster name or ARN.
    #[arg(long, env = "AISHELL_ECS_CLUSTER")]
    pub ecs_cluster: Option<String>,
    /// ECS backend: task definition every task runs (family, family:revision or ARN).
    #[arg(long, env = "AISHELL_ECS_TASK_DEFINITION")]
    pub ecs_task_definition: Option<String>,
    /// ECS backend: the runner's container in that task definition [default: runner].
    #[arg(long, env = "AISHELL_ECS_CONTAINER_NAME")]
    pub ecs_container_name: Option<String>,
    /// ECS backend: FARGATE or EC2, or `default` for the cluster's capacity provider strategy [default: FARGATE unless --ecs-capacity-providers].
    #[arg(long, env = "AISHELL_ECS_LAUNCH_TYPE")]
    pub ecs_launch_type: Option<String>,
    /// ECS backend: capacity provider strategy, comma-separated name[:weight[:base]] (e.g. FARGATE_SPOT:3,FARGATE:1:1).
    #[arg(long, env = "AISHELL_ECS_CAPACITY_PROVIDERS")]
    pub ecs_capacity_providers: Option<String>,
    /// ECS backend, awsvpc: comma-separated subnet ids of the tasks.
    #[arg(long, env = "AISHELL_ECS_SUBNETS")]
    pub ecs_subnets: Option<String>,
    /// ECS backend, awsvpc: comma-separated security group ids of the tasks.
    #[arg(long, env = "AISHELL_ECS_SECURITY_GROUPS")]
    pub ecs_security_groups: Option<String>,
    /// ECS backend, awsvpc: give each task a public IP [default: false].
    #[arg(long, env = "AISHELL_ECS_ASSIGN_PUBLIC_IP")]
    pub ecs_assign_public_ip: Option<bool>,
    /// Kubernetes backend: image every task pod runs, from a registry the cluster pulls from [default: aishell:local].
    #[arg(long, env = "AISHELL_KUBE_IMAGE")]
    pub kube_image: Option<String>,
    /// Kubernetes backend: imagePullPolicy of task pods: Always, IfNotPresent, Never [default: the cluster's].
    #[arg(long, env = "AISHELL_KUBE_IMAGE_PULL_POLICY")]
    pub kube_image_pull_policy: Option<String>,
    /// Kubernetes backend: kubeconfig file [default: in-cluster configuration, then KUBECONFIG, then ~/.kube/config].
    #[arg(long, env = "AISHELL_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes backend: namespace of task pods [default: the configuration's].
    #[arg(long, env = "AISHELL_KUBE_NAMESPACE")]
    pub kube_namespace: Option<String>,
    /// Kubernetes backend: this gateway's identity on its pods' labels, stable across restarts [default: generated once, kept in the data dir].
    #[arg(long, env = "AISHELL_KUBE_INSTANCE_ID")]
    pub kube_instance_id: Option<String>,
    /// Kubernetes backend: ReadWriteMany claim holding every workspace, mounted in task pods (and in the gateway at --workspaces-mount) [default: aishell-workspaces].
    #[arg(long, env = "AISHELL_KUBE_WORKSPACES_CLAIM")]
    pub kube_workspaces_claim: Option<String>,
    /// Kubernetes backend: CPU request of a task pod [default: 250m].
    #[arg(long, env = "AISHELL_KUBE_CPU_REQUEST")]
    pub kube_cpu_request: Option<String>,
    /// Kubernetes backend: CPU limit of a task pod [default: 1].
    #[arg(long, env = "AISHELL_KUBE_CPU_LIMIT")]
    pub kube_cpu_limit: Option<String>,
    /// Kubernetes backend: memory request of a task pod [default: 256Mi].
    #[arg(long, env = "AISHELL_KUBE_MEMORY_REQUEST")]
    pub kube_memory_request: Option<String>,
    /// Kubernetes backend: memory limit of a task pod [default: 2Gi].
    #[arg(long, env = "AISHELL_KUBE_MEMORY_LIMIT")]
    pub kube_memory_limit: Option<String>,
    /// A request's headers must arrive within this; slower clients are closed [default: 10s].
    #[arg(long, env = "AISHELL_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Option<String>,
    /// A WebSocket upgrade request must be answered within this [default: 15s].
    #[arg(long, env = "AISHELL_PRE_UPGRADE_TIMEOUT")]
    pub pre_upgrade_timeout: Option<String>,
    /// Open connections at once, WebSockets included; more get 503 [default: 8192].
    #[arg(long, env = "AISHELL_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections per client address that have not sent a complete request yet; more get 429 [default: 256].
    #[arg(long, env = "AISHELL_MAX_PENDING_CONNECTIONS_PER_ADDRESS")]
    pub max_pending_connections_per_address: Option<usize>,
    /// Bytes of agent output one turn may store and relay; past it the client is told once and the turn still ends [default: 16777216].
    #[arg(long, env = "AISHELL_MAX_TURN_OUTPUT_BYTES")]
    pub max_turn_output_bytes: Option<u64>,
    /// Bytes of events kept in memory per session for replay (older ones come from the store) [default: 8388608].
    #[arg(long, env = "AISHELL_REPLAY_BUFFER_BYTES")]
    pub replay_buffer_bytes: Option<usize>,
}

macro_rules! fill_from {
    ($self:ident, $file:ident, $($field:ident),+) => {
        $( if $self.$field.is_none() { $self.$field = $file.$field.clone(); } )+
    };
}

impl ServeSettings {
    /// Fill every option not given by flag or environment from the file.
    pub fn merge_file(&mut self, path: &Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let file: ServeSettings = toml::from_str(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        fill_from!(
            self,
            file,
            port,
            bind,
            data_dir,
            database_url,
            execution_mode,
            agent,
            agent_command,
            workspaces_root,
            workspaces_mount,
            session_idle_timeout,
            disconnect_processing_timeout,
            runner_url,
            gateway_id,
            shared_url,
            lease_ttl,
            max_frame_bytes,
            replay_buffer,
            start_on_connect,
            launch_timeout,
            connect_timeout,
            activate_timeout,
            restart_timeout,
            stop_wait,
            dial_back_grace,
            runner_reconnect_timeout,
            orphan_grace,
            session_evict_after,
            user,
            enable_warm_pool,
            warm_pool_target_size,
            warm_pool_max_size,
            warm_pool_ready_ttl,
            warm_pool_prestart_agents,
            max_concurrent_launches,
            log_file,
            log_format,
            agent_settings,
            llm_base_url,
            llm_model,
            llm_api_keys,
            anthropic_base_url,
            anthropic_api_keys,
            model_key_cooldown,
            jwt_secret,
            jwt_public_key,
            jwt_jwks,
            jwt_issuer,
            jwt_audience,
            jwt_user_claim,
            jwt_admin_claim,
            messages_per_second,
            max_connections_per_user,
            max_tasks_per_user,
            max_warm_claims_per_user,
            max_hours_per_week,
            user_idle_timeouts,
            max_queued_starts,
            sandbox,
            insecure_no_sandbox,
            sandbox_network,
            sandbox_egress,
            sandbox_egress_allow,
            sandbox_memory_bytes,
            sandbox_max_files,
            sandbox_max_processes,
            sandbox_cpu_seconds,
            sandbox_pids_max,
            sandbox_cgroup_memory_bytes,
            sandbox_tmp_bytes,
            workspace_quota,
            docker_image,
            docker_host,
            docker_network,
            docker_memory,
            docker_cpus,
            docker_pids_limit,
            ecs_cluster,
            ecs_task_definition,
            ecs_container_name,
            ecs_launch_type,
            ecs_capacity_providers,
            ecs_subnets,
            ecs_security_groups,
            ecs_assign_public_ip,
            kube_image,
            kube_image_pull_policy,
            kubeconfig,
            kube_namespace,
            kube_instance_id,
            kube_workspaces_claim,
            kube_cpu_request,
            kube_cpu_limit,
            kube_memory_request,
            kube_memory_limit,
            header_read_timeout,
            pre_upgrade_timeout,
            max_connections,
            max_pending_connections_per_address,
            max_turn_output_bytes,
            replay_buffer_bytes
        );
        Ok(())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::data_dir::DEFAULT_NAME))
    }

    /// The daily log files' directory, or None with `--log-file none`.
    pub fn log_dir(&self, data_dir: &Path) -> Option<PathBuf> {
        match self.log_file.as_deref().map(str::trim) {
            None | Some("" | "true" | "on" | "yes") => Some(data_dir.join("logs")),
            Some("none" | "off" | "false" | "no") => None,
            Some(dir) => Some(absolute(Path::new(dir)).unwrap_or_else(|_| PathBuf::from(dir))),
        }
    }

    /// The console's form: `--log-format`, else human on a terminal.
    pub fn console_format(&self) -> anyhow::Result<crate::logging::ConsoleFormat> {
        use crate::logging::ConsoleFormat;
        use std::io::IsTerminal;
        match self.log_format.as_deref() {
            None | Some("auto") => Ok(if std::io::stdout().is_terminal() {
                ConsoleFormat::Human
            } else {
                ConsoleFormat::Json
            }),
            Some("human") => Ok(ConsoleFormat::Human),
            Some("json") => Ok(ConsoleFormat::Json),
            Some(other) => bail!("--log-format `{other}` is not one of human, json, auto"),
        }
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir().join("aishell.db").display()))
    }

    pub fn execution_mode(&self) -> anyhow::Result<&str> {
        let mode = self.execution_mode.as_deref().unwrap_or("process");
        match mode {
            "process" | "docker" | "kubernetes" | "ecs" => Ok(mode),
            other => {
                bail!("EXECUTION_MODE `{other}` is not one of process, docker, kubernetes, ecs")
            }
        }
    }

    /// `bwrap`, `uid` or `none`; `--insecure-no-sandbox` means `none`.
    /// The docker and kubernetes backends default to `uid` (a per-user UID
    /// inside the container; bwrap would need extra capabilities there).
    pub fn sandbox_mode(&self) -> anyhow::Result<&str> {
        if self.insecure_no_sandbox == Some(true) {
            return Ok("none");
        }
        let default = if matches!(self.execution_mode()?, "docker" | "kubernetes" | "ecs") {
            "uid"
        } else {
            "bwrap"
        };
        match self.sandbox.as_deref().unwrap_or(default) {
            m @ ("bwrap" | "uid" | "none") => Ok(m),
            other => bail!("--sandbox `{other}` is not one of bwrap, uid, none"),
        }
    }

    /// `--sandbox-egress`.
    fn sandbox_egress(&self) -> anyhow::Result<aishell_protocol::runner::EgressMode> {
        use aishell_protocol::runner::EgressMode;
        match self.sandbox_egress.as_deref().map(str::trim) {
            None | Some("proxy") => Ok(EgressMode::Proxy),
            Some("full") => Ok(EgressMode::Full),
            Some(other) => bail!("--sandbox-egress `{other}` is not one of proxy, full"),
        }
    }

    /// `--sandbox-egress-allow`, each range checked.
    fn sandbox_egress_allow(&self) -> anyhow::Result<Vec<String>> {
        let ranges: Vec<String> = self
            .sandbox_egress_allow
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(String::from)
            .collect();
        aishell_runner::egress_proxy::EgressPolicy::new(&ranges)
            .map_err(|e| anyhow::anyhow!("--sandbox-egress-allow: {e}"))?;
        Ok(ranges)
    }

    /// `--workspace-quota` in bytes; only the process backend has it.
    pub fn workspace_quota_bytes(&self) -> anyhow::Result<Option<u64>> {
        let Some(size) = self.workspace_quota.as_deref() else {
            return Ok(None);
        };
        if self.execution_mode()? != "process" {
            bail!("--workspace-quota is only available with the process backend");
        }
        Ok(Some(parse_bytes(size).context("--workspace-quota")? as u64))
    }

    /// Model endpoints: keys go to the gateway's proxy; a key-less endpoint
    /// (a local vLLM, Ollama or llama.cpp server) is given to the agent as is.
    fn apply_model_settings(&self, cfg: &mut GatewayConfig) -> anyhow::Result<()> {
        use aishell_gateway::model_proxy::{KeyHeader, ModelProviderConfig};
        let keys = |v: &Option<String>| -> Vec<String> {
            v.iter()
                .flat_map(|s| s.split(','))
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect()
        };
        if let Some(json) = &self.agent_settings {
            let parsed: serde_json::Value =
                serde_json::from_str(json).context("--agent-settings is not valid JSON")?;
            let serde_json::Value::Object(map) = parsed else {
                bail!(
                    "--agent-settings must be a JSON object, e.g. '{{\"claude_model\":\"sonnet\"}}'"
                );
            };
            cfg.agent_settings.extend(map);
        }
        let cooldown = match &self.model_key_cooldown {
            Some(v) => parse_duration(v).context("invalid AISHELL_MODEL_KEY_COOLDOWN")?,
            None => Duration::from_secs(60),
        };
        let llm_keys = keys(&self.llm_api_keys);
        if !llm_keys.is_empty() {
            cfg.model_providers.push(ModelProviderConfig {
                name: "openai".into(),
                upstream: self
                    .llm_base_url
                    .clone()
                    .unwrap_or_else(|| "https://api.openai.com/v1".into()),
                keys: llm_keys,
                key_header: KeyHeader::Bearer,
                cooldown,
            });
        } else if let Some(url) = &self.llm_base_url {
            cfg.agent_settings
                .insert("llm_base_url".into(), url.clone().into());
        }
        let anthropic_keys = keys(&self.anthropic_api_keys);
        if !anthropic_keys.is_empty() {
            cfg.model_providers.push(ModelProviderConfig {
                name: "anthropic".into(),
                upstream: self
                    .anthropic_base_url
                    .clone()
                    .unwrap_or_else(|| "https://api.anthropic.com".into()),
                keys: anthropic_keys,
                key_header: KeyHeader::XApiKey,
                cooldown,
            });
        }
        if let Some(model) = &self.llm_model {
            cfg.agent_settings
                .insert("llm_model".into(), model.clone().into());
        }
        Ok(())
    }

    /// The docker backend's settings (EXECUTION_MODE=docker).
    pub fn docker_config(
        &self,
        instance_id: String,
        workspaces_root: &Path,
    ) -> anyhow::Result<aishell_backend_docker::DockerBackendConfig> {
        let mut cfg =
            aishell_backend_docker::DockerBackendConfig::new(instance_id, workspaces_root);
        if let Some(image) = &self.docker_image {
            cfg.image = image.clone();
        }
        cfg.docker_host = self.docker_host.clone();
        cfg.network = self
            .docker_network
            .clone()
            .filter(|n| !n.is_empty() && n != "host");
        if let Some(m) = &self.docker_memory {
            cfg.memory_bytes = Some(parse_bytes(m).context("invalid --docker-memory")?);
        }
        if let Some(c) = self.docker_cpus {
            if !(c > 0.0 && c.is_finite()) {
                bail!("--docker-cpus must be a positive number of CPUs");
            }
            cfg.cpus = Some(c);
        }
        if let Some(p) = self.docker_pids_limit {
            cfg.pids_limit = Some(p);
        }
        Ok(cfg)
    }

    /// The ECS backend's settings (EXECUTION_MODE=ecs); the AWS chain gives
    /// region, credentials and `AWS_ENDPOINT_URL`.
    #[cfg(feature = "ecs")]
    pub fn ecs_config(
        &self,
        instance_id: String,
    ) -> anyhow::Result<aishell_backend_ecs::EcsBackendConfig> {
        use aishell_backend_ecs::{
            AwsVpc, CapacityProviderShare, EcsBackendConfig, EcsLaunchType, Placement,
        };
        let list = |v: &Option<String>| -> Vec<String> {
            v.as_deref()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        let (Some(cluster), Some(task_definition)) = (&self.ecs_cluster, &self.ecs_task_definition)
        else {
            bail!("EXECUTION_MODE=ecs needs --ecs-cluster and --ecs-task-definition");
        };
        let mut cfg = EcsBackendConfig::new(cluster, task_definition, instance_id);
        if let Some(name) = &self.ecs_container_name {
            cfg.container_name = name.clone();
        }
        let providers = list(&self.ecs_capacity_providers);
        cfg.placement = match (self.ecs_launch_type.as_deref(), providers.is_empty()) {
            (Some(_), false) => {
                bail!("--ecs-launch-type and --ecs-capacity-providers exclude each other")
            }
            (None, false) => Placement::CapacityProviders(
                providers
                    .iter()
                    .map(|p| {
                        CapacityProviderShare::parse(p).with_context(|| {
                            format!("--ecs-capacity-providers: `{p}` is not name[:weight[:base]]")
                        })
                    })
                    .collect::<anyhow::Result<_>>()?,
            ),
            (Some("default"), true) => Placement::ClusterDefault,
            (Some(t), true) => {
                Placement::LaunchType(EcsLaunchType::parse(t).with_context(|| {
                    format!("--ecs-launch-type `{t}` is not FARGATE, EC2 or default")
                })?)
            }
            (None, true) => Placement::LaunchType(EcsLaunchType::Fargate),
        };
        let subnets = list(&self.ecs_subnets);
        if !subnets.is_empty() {
            cfg.network = Some(AwsVpc {
                subnets,
                security_groups: list(&self.ecs_security_groups),
                assign_public_ip: self.ecs_assign_public_ip.unwrap_or(false),
            });
        }
        Ok(cfg)
    }

    /// The kubernetes backend's settings (EXECUTION_MODE=kubernetes).
    #[cfg(feature = "kubernetes")]
    pub fn kubernetes_config(
        &self,
        instance_id: String,
    ) -> anyhow::Result<aishell_backend_kubernetes::KubernetesBackendConfig> {
        let mut cfg = aishell_backend_kubernetes::KubernetesBackendConfig::new(instance_id);
        if let Some(image) = &self.kube_image {
            cfg.image = image.clone();
        }
        if let Some(policy) = &self.kube_image_pull_policy {
            if !matches!(policy.as_str(), "Always" | "IfNotPresent" | "Never") {
                bail!(
                    "--kube-image-pull-policy `{policy}` is not one of Always, IfNotPresent, Never"
                );
            }
            cfg.image_pull_policy = Some(policy.clone());
        }
        cfg.kubeconfig = self.kubeconfig.clone();
        cfg.namespace = self.kube_namespace.clone();
        if let Some(claim) = &self.kube_workspaces_claim {
            cfg.workspaces_claim = claim.clone();
        }
        let quantity = |given: &Option<String>, default: Option<String>| {
            given
                .clone()
                .or(default)
                .filter(|q| !q.is_empty() && q != "none")
        };
        cfg.cpu_request = quantity(&self.kube_cpu_request, cfg.cpu_request);
        cfg.cpu_limit = quantity(&self.kube_cpu_limit, cfg.cpu_limit);
        cfg.memory_request = quantity(&self.kube_memory_request, cfg.memory_request);
        cfg.memory_limit = quantity(&self.kube_memory_limit, cfg.memory_limit);
        Ok(cfg)
    }

    pub fn user(&self) -> &str {
        self.user.as_deref().unwrap_or("local")
    }

    pub fn gateway_config(&self) -> anyhow::Result<GatewayConfig> {
        let data_dir = absolute(&self.data_dir())?;
        let mut cfg = GatewayConfig::new(data_dir);
        cfg.bind = SocketAddr::new(
            self.bind.unwrap_or(IpAddr::from([127, 0, 0, 1])),
            self.port.unwrap_or(5174),
        );
        if let Some(root) = &self.workspaces_root {
            cfg.workspaces_root = absolute(root)?;
        }
        if let Some(mount) = &self.workspaces_mount {
            cfg.workspaces_mount = Some(absolute(mount)?);
        }
        if let Some(kind) = &self.agent {
            if !aishell_agents::BUILTIN_KINDS.contains(&kind.as_str())
                && self.agent_command.is_none()
            {
                bail!(
                    "unknown agent `{kind}`: built-in agents are {:?}; use --agent-command for others",
                    aishell_agents::BUILTIN_KINDS
                );
            }
            cfg.agent.kind = kind.clone();
        }
        if let Some(cmd) = &self.agent_command {
            let argv: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
            if argv.is_empty() {
                bail!("--agent-command is empty");
            }
            cfg.agent = AgentSpec {
                kind: self.agent.clone().unwrap_or_else(|| "external".into()),
                command: Some(argv),
            };
        }
        cfg.runner_url = self.runner_url.clone();
        // On PostgreSQL a gateway may be one of several: it takes leases of
        // the sessions it runs (docs/cluster.md).
        if aishell_store::is_postgres_url(&self.database_url()) {
            let mut lease_ttl = std::time::Duration::from_secs(10);
            if let Some(v) = &self.lease_ttl {
                lease_ttl =
                    parse_duration(v).with_context(|| format!("AISHELL_LEASE_TTL `{v}`"))?;
            }
            if lease_ttl < std::time::Duration::from_millis(500) {
                bail!(
                    "AISHELL_LEASE_TTL must be at least 500ms (leases are renewed every third of it)"
                );
            }
            let gateway_id = self.gateway_id.clone().unwrap_or_else(|| {
                format!("gw-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
            });
            if !aishell_gateway::auth::validate_conversation_id(&gateway_id) {
                bail!("AISHELL_GATEWAY_ID `{gateway_id}` must be 1-128 of A-Z a-z 0-9 _ -");
            }
            cfg.cluster = Some(aishell_gateway::cluster::ClusterConfig {
                gateway_id,
                shared_url: self
                    .shared_url
                    .clone()
                    .map(|u| u.trim_end_matches('/').to_string()),
                lease_ttl,
            });
        } else if self.gateway_id.is_some() || self.shared_url.is_some() || self.lease_ttl.is_some()
        {
            bail!(
                "--gateway-id, --shared-url and --lease-ttl are for several gateways on one PostgreSQL (DATABASE_URL=postgres://...)"
            );
        }
        if let Some(n) = self.max_frame_bytes {
            cfg.max_frame_bytes = n;
        }
        if let Some(n) = self.replay_buffer {
            cfg.replay_buffer = n;
        }
        if let Some(b) = self.start_on_connect {
            cfg.start_on_connect = b;
        }
        let set =
            |target: &mut Duration, value: &Option<String>, name: &str| -> anyhow::Result<()> {
                if let Some(v) = value {
                    *target = parse_duration(v).with_context(|| format!("invalid {name}"))?;
                }
                Ok(())
            };
        set(
            &mut cfg.idle_timeout,
            &self.session_idle_timeout,
            "SESSION_IDLE_TIMEOUT",
        )?;
        set(
            &mut cfg.disconnect_processing_timeout,
            &self.disconnect_processing_timeout,
            "DISCONNECT_PROCESSING_TIMEOUT",
        )?;
        set(
            &mut cfg.session_evict_after,
            &self.session_evict_after,
            "session_evict_after",
        )?;
        let d = &mut cfg.deadlines;
        set(&mut d.launch, &self.launch_timeout, "launch_timeout")?;
        set(&mut d.connect, &self.connect_timeout, "connect_timeout")?;
        set(&mut d.activate, &self.activate_timeout, "activate_timeout")?;
        set(&mut d.restart, &self.restart_timeout, "restart_timeout")?;
        set(&mut d.stop_wait, &self.stop_wait, "stop_wait")?;
        set(
            &mut d.dial_back_grace,
            &self.dial_back_grace,
            "dial_back_grace",
        )?;
        set(
            &mut d.runner_reconnect,
            &self.runner_reconnect_timeout,
            "runner_reconnect_timeout",
        )?;
        set(&mut d.orphan_grace, &self.orphan_grace, "orphan_grace")?;
        let p = &mut cfg.pool;
        p.enabled = self.enable_warm_pool.unwrap_or(true);
        if let Some(n) = self.warm_pool_target_size {
            p.target = n;
        }
        if let Some(n) = self.warm_pool_max_size {
            p.max = n;
        }
        if p.target > p.max {
            bail!(
                "WARM_POOL_TARGET_SIZE ({}) exceeds WARM_POOL_MAX_SIZE ({})",
                p.target,
                p.max
            );
        }
        set(
            &mut p.ready_ttl,
            &self.warm_pool_ready_ttl,
            "WARM_POOL_READY_TTL",
        )?;
        p.launch_deadline = cfg.deadlines.launch + cfg.deadlines.connect;
        if let Some(on) = self.warm_pool_prestart_agents {
            p.prestart_agents = on;
        }
        if let Some(n) = self.max_concurrent_launches {
            cfg.max_concurrent_launches = n.max(1);
        }
        set(
            &mut cfg.header_read_timeout,
            &self.header_read_timeout,
            "header_read_timeout",
        )?;
        set(
            &mut cfg.pre_upgrade_timeout,
            &self.pre_upgrade_timeout,
            "pre_upgrade_timeout",
        )?;
        if let Some(n) = self.max_connections {
            cfg.max_connections = n.max(1);
        }
        if let Some(n) = self.max_pending_connections_per_address {
            cfg.max_pending_connections_per_address = n.max(1);
        }
        if let Some(n) = self.max_turn_output_bytes {
            cfg.max_turn_output_bytes = n.max(1);
        }
        if let Some(n) = self.replay_buffer_bytes {
            cfg.replay_buffer_bytes = n.max(1);
        }
        self.apply_model_settings(&mut cfg)?;
        if self.jwt_secret.is_some() || self.jwt_public_key.is_some() || self.jwt_jwks.is_some() {
            cfg.jwt = Some(aishell_gateway::auth::JwtConfig {
                hs256_secret: self.jwt_secret.clone(),
                public_key_pem: self.jwt_public_key.clone(),
                jwks_file: self.jwt_jwks.clone(),
                issuer: self.jwt_issuer.clone(),
                audience: self.jwt_audience.clone(),
                user_claim: self.jwt_user_claim.clone().unwrap_or_else(|| "sub".into()),
                admin_claim: self.jwt_admin_claim.clone(),
            });
        }
        if let Some(n) = self.messages_per_second {
            cfg.messages_per_second = n.max(1);
        }
        if let Some(n) = self.max_connections_per_user {
            cfg.max_connections_per_user = n.max(1);
        }
        if let Some(n) = self.max_tasks_per_user {
            cfg.max_tasks_per_user = n;
        }
        if let Some(n) = self.max_warm_claims_per_user {
            cfg.max_warm_claims_per_user = n;
        }
        cfg.max_hours_per_week = self.max_hours_per_week.filter(|h| *h > 0.0);
        if let Some(n) = self.max_queued_starts {
            cfg.max_queued_starts = n;
        }
        for pair in self
            .user_idle_timeouts
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|p| !p.trim().is_empty())
        {
            let (user, d) = pair
                .split_once('=')
                .with_context(|| format!("--user-idle-timeouts: `{pair}` is not user=duration"))?;
            cfg.user_idle_timeouts.insert(
                user.trim().to_string(),
                parse_duration(d).with_context(|| format!("--user-idle-timeouts: {pair}"))?,
            );
        }
        cfg.sandbox = match self.sandbox_mode()? {
            mode @ ("bwrap" | "uid") => Some(aishell_protocol::runner::SandboxSettings {
                isolation: if mode == "uid" {
                    aishell_protocol::runner::Isolation::Uid
                } else {
                    aishell_protocol::runner::Isolation::Bwrap
                },
                network: self.sandbox_network.unwrap_or(true),
                egress: self.sandbox_egress()?,
                egress_allow: self.sandbox_egress_allow()?,
                memory_bytes: Some(self.sandbox_memory_bytes.unwrap_or(8 << 30)),
                max_files: Some(self.sandbox_max_files.unwrap_or(4096)),
                max_processes: self.sandbox_max_processes,
                cpu_seconds: self.sandbox_cpu_seconds,
                sandbox_max_processes: Some(self.sandbox_pids_max.unwrap_or(512)),
                sandbox_memory_bytes: Some(self.sandbox_cgroup_memory_bytes.unwrap_or(4 << 30)),
                tmp_bytes: Some(self.sandbox_tmp_bytes.unwrap_or(256 << 20)),
            }),
            _ => None,
        };
        Ok(cfg)
    }
}

/// `log_file = true` (older config files) or `log_file = "/var/log/aishell"`.
fn bool_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolOrString {
        Bool(bool),
        String(String),
    }
    Ok(Option::<BoolOrString>::deserialize(d)?.map(|v| match v {
        BoolOrString::Bool(b) => b.to_string(),
        BoolOrString::String(s) => s,
    }))
}

/// `900`, `900s`, `15m`, `1h`, `250ms`.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .with_context(|| format!("`{s}` is not a duration (e.g. 900, 900s, 15m, 250ms)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => bail!("unknown duration unit `{other}` in `{s}` (use ms, s, m, h, d)"),
    };
    if !secs.is_finite() || secs < 0.0 {
        bail!("`{s}` is not a valid duration");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `2147483648`, `512m`, `2g`, `1.5G` (binary units).
pub fn parse_bytes(s: &str) -> anyhow::Result<i64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("`{s}` is not a size (e.g. 512m, 2g)"))?;
    if !(n > 0.0 && n.is_finite()) {
        bail!("`{s}` is not a positive size");
    }
    Ok((n * mult as f64) as i64)
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

#[cfg(test)]
mod tests {
    #[cfg(feature = "ecs")]
    #[test]
    fn ecs_settings_choose_placement_and_network() {
        use aishell_backend_ecs::{EcsLaunchType, Placement};
        let mut s = ServeSettings::default();
        assert!(
            s.ecs_config("gw".into()).is_err(),
            "cluster and task definition are required"
        );
        s.ecs_cluster = Some("c".into());
        s.ecs_task_definition = Some("td:3".into());
        let cfg = s.ecs_config("gw".into()).unwrap();
        assert_eq!(cfg.placement, Placement::LaunchType(EcsLaunchType::Fargate));
        assert!(cfg.network.is_none());
        s.ecs_capacity_providers = Some("FARGATE_SPOT:3, FARGATE:1:1".into());
        s.ecs_subnets = Some("subnet-a,subnet-b".into());
        s.ecs_security_groups = Some("sg-1".into());
        let cfg = s.ecs_config("gw".into()).unwrap();
        let Placement::CapacityProviders(shares) = &cfg.placement else {
            panic!("a strategy: {:?}", cfg.placement)
        };
        assert_eq!((shares.len(), shares[0].weight, shares[1].base), (2, 3, 1));
        let net = cfg.network.unwrap();
        assert_eq!(net.subnets, ["subnet-a", "subnet-b"]);
        assert!(!net.assign_public_ip);
        s.ecs_launch_type = Some("EC2".into());
        assert!(
            s.ecs_config("gw".into()).is_err(),
            "launch type and strategy exclude each other"
        );
        s.ecs_capacity_providers = None;
        s.ecs_launch_type = Some("bogus".into());
        assert!(s.ecs_config("gw".into()).is_err());
        s.execution_mode = Some("ecs".into());
        assert_eq!(s.sandbox_mode().unwrap(), "uid");
    }

    use super::*;

    #[test]
    fn durations_accept_the_usual_forms() {
        assert_eq!(parse_duration("900").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2G").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aishell.toml");
        std::fs::write(
            &path,
            "port = 7000\nsession_idle_timeout = \"2m\"\nagent = \"echo\"\n",
        )
        .unwrap();
        let mut s = ServeSettings {
            port: Some(8000),
            ..Default::default()
        };
        s.merge_file(&path).unwrap();
        let cfg = s.gateway_config().unwrap();
        assert_eq!(cfg.bind.port(), 8000);
        assert_eq!(cfg.idle_timeout, Duration::from_secs(120));
        assert_eq!(cfg.agent.kind, "echo");
        std::fs::write(&path, "log_file = false\n").unwrap();
        let mut s = ServeSettings::default();
        s.merge_file(&path).unwrap();
        assert_eq!(
            s.log_dir(Path::new("/d")),
            None,
            "an older file's boolean still works"
        );
        s.log_file = Some("none".into());
        assert_eq!(s.log_dir(Path::new("/d")), None);
        s.log_file = Some("true".into());
        assert_eq!(s.log_dir(Path::new("/d")), Some(PathBuf::from("/d/logs")));
        s.log_file = Some("/var/log/aishell".into());
        assert_eq!(
            s.log_dir(Path::new("/d")),
            Some(PathBuf::from("/var/log/aishell"))
        );
        std::fs::write(&path, "prot = 1\n").unwrap();
        assert!(
            ServeSettings::default().merge_file(&path).is_err(),
            "unknown keys must be rejected"
        );
    }
}
