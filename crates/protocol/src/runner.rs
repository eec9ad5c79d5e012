//! Runner protocol (docs/protocol/runner.md): runner ↔ gateway over
//! `/internal/task/{session_id}` (cold) and `/internal/warm/{task_id}` (warm).
//!
//! Compatibility rule: a gateway speaking version N accepts runners with
//! `MIN_RUNNER_PROTOCOL_VERSION <= protocol <= N`, answers them in their own
//! version, and refuses others with close code 4400 and a reason; fields added
//! within a version are optional (`#[serde(default)]`) so an older peer's frames
//! still decode. Unknown frame types are logged and ignored, never fatal.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::{AgentEvent, AgentInfo, AgentInput, ConversationRef};

/// Why the runner was launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskMode {
    /// Launched for one session; dials `/internal/task/{session_id}`.
    Cold,
    /// Launched for nobody; dials `/internal/warm/{task_id}` and waits.
    Warm,
}

impl TaskMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskMode::Cold => "cold",
            TaskMode::Warm => "warm",
        }
    }

    /// The mode `as_str` names, or `None` for anything else.
    pub fn parse(s: &str) -> Option<TaskMode> {
        match s {
            "cold" => Some(TaskMode::Cold),
            "warm" => Some(TaskMode::Warm),
            _ => None,
        }
    }
}

impl std::fmt::Display for TaskMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which agent to run, chosen per user at claim time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSpec {
    /// A built-in kind (`echo`, `shell`, ...) run as `aishell agent <kind>`,
    /// or any name when `command` is given.
    pub kind: String,
    /// An explicit command line for an external agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
}

/// Per-user settings sent at claim time; never baked into a launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerSettings {
    pub agent: AgentSpec,
    /// Extra environment for the agent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Settings passed through to the agent's `init`.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub agent_settings: serde_json::Map<String, serde_json::Value>,
    /// Confine the agent (bubblewrap); `None`: run it unconfined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxSettings>,
    /// Model providers the gateway proxies (`openai`, `anthropic`): the
    /// runner serves them to the agent on loopback and points the agent's
    /// model settings there, so API keys never enter the sandbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_proxy: Vec<String>,
}

/// How the runner confines an agent (added in runner protocol v1; optional,
/// so older peers decode it as absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSettings {
    /// How the agent is confined; absent means bubblewrap (older gateways).
    #[serde(default, skip_serializing_if = "Isolation::is_bwrap")]
    pub isolation: Isolation,
    /// Let the agent reach the network (agents call model APIs).
    #[serde(default = "yes")]
    pub network: bool,
    /// How a networked sandbox reaches the outside (absent: through the
    /// runner's egress proxy).
    #[serde(default, skip_serializing_if = "EgressMode::is_proxy")]
    pub egress: EgressMode,
    /// Address ranges (CIDR) the egress proxy lets the agent reach although
    /// they are loopback, private or link-local (which it refuses otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<String>,
    /// Address-space limit in bytes (RLIMIT_AS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Open files (RLIMIT_NOFILE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files: Option<u64>,
    /// Processes of the agent's user (RLIMIT_NPROC; ignored when the runner
    /// runs as root, where it would count every root process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_processes: Option<u64>,
    /// CPU seconds (RLIMIT_CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<u64>,
    /// Processes and threads of the whole sandbox (cgroup v1 `pids.max`,
    /// where the runner can create cgroups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_max_processes: Option<u64>,
    /// Memory of the whole sandbox in bytes (cgroup v1
    /// `memory.limit_in_bytes`, where the runner can create cgroups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_memory_bytes: Option<u64>,
    /// Size of the sandbox's `/tmp` and of its `/var/tmp`, bytes each
    /// (absent: the runner's default, 256 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp_bytes: Option<u64>,
}

/// How a sandbox with the network on reaches the outside.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressMode {
    /// Only through the runner's HTTP proxy (`HTTP_PROXY`/`HTTPS_PROXY` in
    /// the agent's environment), which refuses loopback, private and
    /// link-local destinations; the namespace has no route of its own.
    #[default]
    Proxy,
    /// Any TCP/UDP destination through `pasta` (user-mode networking).
    Full,
}

impl EgressMode {
    pub fn is_proxy(&self) -> bool {
        *self == EgressMode::Proxy
    }
}

/// bubblewrap, network on, no limits: what an absent field decodes to.
impl Default for SandboxSettings {
    fn default() -> Self {
        SandboxSettings {
            isolation: Isolation::Bwrap,
            network: true,
            egress: EgressMode::Proxy,
            egress_allow: Vec::new(),
            memory_bytes: None,
            max_files: None,
            max_processes: None,
            cpu_seconds: None,
            sandbox_max_processes: None,
            sandbox_memory_bytes: None,
            tmp_bytes: None,
        }
    }
}

/// Request headers the model proxy passes on (content negotiation and
/// provider options); credentials and hop-by-hop headers never are.
pub fn model_request_header_forwarded(name: &str) -> bool {
    matches!(name, "content-type" | "accept" | "user-agent")
        || name.starts_with("anthropic-")
        || name.starts_with("openai-")
        || name.starts_with("x-stainless-")
}

/// Response headers the model proxy passes back: content type, rate-limit
/// and request-id headers the agent's client reads; nothing hop-by-hop.
pub fn model_response_header_forwarded(name: &str) -> bool {
    matches!(
        name,
        "content-type" | "retry-after" | "request-id" | "x-request-id"
    ) || name.starts_with("x-ratelimit-")
        || name.starts_with("anthropic-ratelimit-")
}

/// The body of an error the model proxy itself answers, shaped like the
/// providers' own (`error.message`, `error.type`) plus aishell's `code`.
pub fn model_error_body(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"error": {"code": code, "type": code, "message": message}})
}

/// The mechanism that keeps one user's agent out of other workspaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// bubblewrap: a mount namespace showing only the user's workspace.
    #[default]
    Bwrap,
    /// A per-user UID owning a 0700 workspace; the runner (root inside a
    /// container) drops to it before running the agent. Used by the docker
    /// backend, where creating namespaces would need extra capabilities.
    Uid,
}

impl Isolation {
    pub fn is_bwrap(&self) -> bool {
        matches!(self, Isolation::Bwrap)
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn yes() -> bool {
    true
}

/// Runner → gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunnerToGateway {
    /// First frame on every connection, including re-dials.
    Hello {
        protocol: u32,
        task_id: String,
        runner_version: String,
        /// Set when the runner is already bound to a session (re-dial).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_id: Option<String>,
        /// True when the agent is up (a re-dial after a gateway restart).
        #[serde(default)]
        agent_running: bool,
        /// Highest `agent.seq` from the gateway this runner has handled: a
        /// re-dial gets every later input again (lost in the old socket).
        #[serde(default)]
        inputs_received: u64,
    },
    /// The agent answered its own `init`.
    Ready {
        agent: AgentInfo,
        /// Milliseconds from spawning the agent to its `init` (for the
        /// `task_ready` breakdown).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent_start_ms: Option<u64>,
        /// The agent was started before the claim (`prepare`); only its
        /// workspace binding and `init` happened at claim time.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        prestarted: bool,
    },
    /// One agent output frame. `seq` counts agent frames of this task so a
    /// re-dialled runner can resend what the gateway did not acknowledge.
    Agent { seq: u64, frame: AgentEvent },
    /// Conversations restored (answer to `restore_conversations`).
    Restored { count: u32 },
    /// The agent process ended.
    AgentExit {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        stderr_tail: String,
    },
    /// One line the agent wrote to stderr.
    AgentStderr { line: String },
    /// Answer to `prepare`: the agent is started (`prestarted`), or will
    /// start at claim time. The pool counts a warm task ready only then.
    Prepared { prestarted: bool },
    /// The runner could not prepare the workspace or start the agent.
    StartFailed { message: String },
    /// Liveness, and the highest gateway `agent.seq` handled so far (the
    /// gateway may forget the inputs up to it).
    Heartbeat {
        #[serde(default)]
        inputs_received: u64,
    },
}

impl RunnerToGateway {
    pub const TYPES: &'static [&'static str] = &[
        "hello",
        "ready",
        "agent",
        "restored",
        "agent_exit",
        "agent_stderr",
        "start_failed",
        "heartbeat",
        "prepared",
    ];

    pub fn decode(text: &str) -> Result<Self, crate::DecodeError> {
        crate::decode(text, Self::TYPES)
    }
}

/// Gateway → runner.
// `init_user` is large but sent once per task; boxing it would only
// complicate every match.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GatewayToRunner {
    /// Warm tasks only, before any claim: start the agent these settings
    /// describe now, in an empty workspace, and do not `init` it yet. An
    /// `init_user` with the same settings then only binds the user's workspace
    /// and sends the agent its `init`; other settings replace the agent.
    /// Optional (added within v1): a runner that does not know it ignores it.
    Prepare {
        settings: RunnerSettings,
    },
    /// Bind the task to a user and session; prepare workspace, start agent.
    InitUser {
        user_id: String,
        session_id: String,
        /// The user's workspace as seen inside the task.
        workspace: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace_id: Option<String>,
        settings: RunnerSettings,
    },
    /// One agent input frame, written to the agent's stdin. `seq` counts
    /// agent inputs to this task from 1 (0: unnumbered); the runner hands
    /// each number to its agent once, so a resent input is not doubled.
    Agent {
        #[serde(default, skip_serializing_if = "is_zero")]
        seq: u64,
        frame: AgentInput,
    },
    RestoreConversations {
        conversations: Vec<ConversationRef>,
    },
    /// Agent frames up to `seq` are safe at the gateway; the runner may drop them.
    Ack {
        seq: u64,
    },
    Ping,
    Shutdown {
        #[serde(default)]
        reason: String,
    },
}

impl GatewayToRunner {
    pub const TYPES: &'static [&'static str] = &[
        "prepare",
        "init_user",
        "agent",
        "restore_conversations",
        "ack",
        "ping",
        "shutdown",
    ];

    pub fn decode(text: &str) -> Result<Self, crate::DecodeError> {
        crate::decode(text, Self::TYPES)
    }
}

/// Several gateways (docs/cluster.md): how a gateway that does not run a
/// runner's session names the one that does. A header of its 503 before the
/// upgrade, or the start of its close reason (code 1013) after `hello`,
/// followed by the owner's base URL.
pub const OWNER_HEADER: &str = "x-aishell-owner";
pub const OWNER_CLOSE_REASON_PREFIX: &str = "owner ";
