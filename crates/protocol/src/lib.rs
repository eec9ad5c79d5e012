//! Every wire type of aishell, and nothing else.
//!
//! Three protocols, each versioned on its own (see docs/protocol/versioning.md):
//! * [`client`]: browser / terminal ↔ gateway over `GET /ws` (docs/protocol/client.md);
//! * [`agent`]: runner ↔ agent as JSON lines on stdin/stdout (docs/protocol/agent.md);
//! * [`runner`]: runner ↔ gateway over `/internal/{task,warm}/...` (docs/protocol/runner.md).
//!
//! Agent output frames are shared by the agent and the client protocol: the
//! gateway forwards them to clients unchanged, adding only `seq` and
//! `session_id`.

pub mod agent;
pub mod client;
pub mod codes;
pub mod runner;

pub use agent::{AgentEvent, AgentInput, ConversationRef, TokenUsage};
pub use client::{ClientFrame, ErrorBody, ServerEvent, ServerFrame, SessionState};
pub use codes::{ErrorCode, ErrorReason};
pub use runner::{GatewayToRunner, RunnerToGateway, TaskMode};

/// Version of the client protocol (`session.protocol`).
pub const CLIENT_PROTOCOL_VERSION: u32 = 1;
/// Version of the runner protocol (`hello.protocol`). A gateway accepts runners
/// from `MIN_RUNNER_PROTOCOL_VERSION` up to this one.
pub const RUNNER_PROTOCOL_VERSION: u32 = 1;
/// Oldest runner protocol this build still speaks.
pub const MIN_RUNNER_PROTOCOL_VERSION: u32 = 1;

/// Default limit on one client frame (docs/protocol/client.md): larger frames close with 1009.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Read buffer of every WebSocket end aishell opens (gateway, runner,
/// terminal client, bench). tungstenite zero-fills its whole read buffer
/// before every socket read: at its 128 KiB default that memset was a fifth
/// of the gateway's CPU in a burst of new sessions. Frames are mostly a few
/// hundred bytes; larger ones just take more reads.
pub const WS_READ_BUFFER_BYTES: usize = 8 * 1024;

/// Why a frame could not be decoded; always turned into `BAD_FRAME` for clients.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame is not valid JSON: {0}")]
    NotJson(String),
    #[error("frame has no string `type` field")]
    NoType,
    #[error("unknown frame type `{0}`")]
    UnknownType(String),
    #[error("frame `{kind}` is malformed: {detail}")]
    Malformed { kind: String, detail: String },
}

/// Decode a tagged JSON frame with errors a human can act on: distinguishes
/// "not JSON", "no type", "unknown type" and "wrong fields for this type".
pub fn decode<T: serde::de::DeserializeOwned>(
    text: &str,
    known_types: &[&str],
) -> Result<T, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let kind = value
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or(DecodeError::NoType)?
        .to_string();
    if !known_types.contains(&kind.as_str()) {
        return Err(DecodeError::UnknownType(truncate(&kind, 64)));
    }
    serde_json::from_value(value).map_err(|e| DecodeError::Malformed {
        kind,
        detail: e.to_string(),
    })
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}
