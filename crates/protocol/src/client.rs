//! Client protocol (SPEC §4): browser / terminal ↔ gateway over `GET /ws`.

use serde::{Deserialize, Serialize};

use crate::agent::AgentEvent;
pub use crate::codes::ErrorBody;
use crate::codes::ErrorCode;

/// Client → gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Message {
        /// Client-chosen id; a second message with the same id is not run again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// Omitted: a new conversation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<String>,
        content: String,
    },
    Abort {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<String>,
    },
    AnswerQuestion {
        request_id: String,
        answer: String,
    },
    UpdateToken {
        token: String,
    },
    ListConversations,
    ResetConversation {
        conversation_id: String,
    },
    DeleteConversation {
        conversation_id: String,
    },
    Ping {
        #[serde(default)]
        id: serde_json::Value,
    },
    Ack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
}

impl ClientFrame {
    pub const TYPES: &'static [&'static str] = &[
        "message",
        "abort",
        "answer_question",
        "update_token",
        "list_conversations",
        "reset_conversation",
        "delete_conversation",
        "ping",
        "ack",
    ];

    pub fn decode(text: &str) -> Result<Self, crate::DecodeError> {
        crate::decode(text, Self::TYPES)
    }
}

/// Task lifecycle as the user should see it (`status.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskPhase {
    Starting,
    Restarting,
    Ready,
    Stopped,
}

/// Where a task came from (`status.source`, `task_ready.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskSource {
    Warm,
    Cold,
}

impl TaskSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskSource::Warm => "warm",
            TaskSource::Cold => "cold",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationSummary {
    pub conversation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// Events the gateway itself originates; agent output passes through as
/// [`ServerEvent::Agent`] with its own `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    /// First frame after connect.
    Session {
        state: String,
        resumed: bool,
        last_seq: u64,
        protocol: u32,
        user_id: String,
    },
    Status {
        state: TaskPhase,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<TaskSource>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eta_ms: Option<u64>,
    },
    /// A stopped task was replaced and conversations restored.
    SessionRecovered {
        #[serde(default)]
        restored: u32,
    },
    /// Reply to `list_conversations`.
    Conversations {
        conversations: Vec<ConversationSummary>,
    },
    #[serde(untagged)]
    Agent(AgentEvent),
}

impl ServerEvent {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerEvent::Agent(AgentEvent::Error {
            conversation_id: None,
            error: ErrorBody::new(code, message),
        })
    }

    /// The error code if this is an `error` event.
    pub fn error_code(&self) -> Option<&str> {
        match self {
            ServerEvent::Agent(AgentEvent::Error { error, .. }) => Some(&error.code),
            _ => None,
        }
    }
}

/// One gateway → client frame: an event with its place in the session stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerFrame {
    /// Per-session counter, +1 per stream event. On a connection-local frame
    /// (`ephemeral`) it is the last stream seq and must not advance a client.
    pub seq: u64,
    pub session_id: String,
    /// Set on frames that answer only this connection (pong, BAD_FRAME,
    /// conversation lists); they are never replayed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ephemeral: bool,
    #[serde(flatten)]
    pub event: ServerEvent,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ServerFrame {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frame always serialises")
    }
}
