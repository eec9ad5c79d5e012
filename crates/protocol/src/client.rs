//! Client protocol (docs/protocol/client.md): browser / terminal ↔ gateway over `GET /ws`.

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

    /// A sentence naming the first field over its length limit, if any
    /// (the gateway answers it with `BAD_FRAME`). Ids are keys and labels,
    /// not content: a long one only costs memory and storage.
    pub fn oversized_field(&self) -> Option<String> {
        let check = |field: &str, value: &str, max: usize| {
            (value.len() > max).then(|| {
                format!(
                    "{field} is {} bytes long; at most {max} are allowed",
                    value.len()
                )
            })
        };
        let conversation = |c: &Option<String>| {
            c.as_deref()
                .and_then(|c| check("conversation_id", c, MAX_ID_BYTES))
        };
        match self {
            ClientFrame::Message {
                id,
                conversation_id,
                ..
            } => id
                .as_deref()
                .and_then(|id| check("id", id, MAX_ID_BYTES))
                .or_else(|| conversation(conversation_id)),
            ClientFrame::Abort { conversation_id } => conversation(conversation_id),
            ClientFrame::ResetConversation { conversation_id }
            | ClientFrame::DeleteConversation { conversation_id } => {
                check("conversation_id", conversation_id, MAX_ID_BYTES)
            }
            ClientFrame::AnswerQuestion { request_id, answer } => {
                check("request_id", request_id, MAX_ID_BYTES)
                    .or_else(|| check("answer", answer, MAX_ANSWER_BYTES))
            }
            ClientFrame::UpdateToken { token } => check("token", token, MAX_TOKEN_BYTES),
            ClientFrame::Ping { id } => check("id", &id.to_string(), MAX_ID_BYTES),
            ClientFrame::ListConversations | ClientFrame::Ack { .. } => None,
        }
    }
}

/// Longest client-chosen id: message ids, conversation ids, request ids.
pub const MAX_ID_BYTES: usize = 128;
/// Longest answer to an agent's question.
pub const MAX_ANSWER_BYTES: usize = 64 << 10;
/// Longest token in `update_token` (a JWT with claims fits many times over).
pub const MAX_TOKEN_BYTES: usize = 8 << 10;

/// A session's state (ARCHITECTURE.md, "Session state machine"): the
/// `session.state` a client sees on attach, the state the store keeps, the
/// label of the sessions gauge. Written as the upper-case names below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SessionState {
    /// A task is being obtained (workspace, cold launch) and is not running yet.
    Creating,
    /// The task runs; its runner has not dialled back yet.
    Pending,
    /// The runner is connected; the agent starts or restores conversations.
    Activating,
    /// The agent is ready and a client is attached.
    Running,
    /// The agent is ready and no client is attached.
    Idle,
    /// The task is being stopped.
    Stopping,
    /// No task; the next message starts one and resumes.
    Stopped,
    /// Ended for good: never loaded again.
    Terminated,
}

impl SessionState {
    pub const ALL: [SessionState; 8] = [
        SessionState::Creating,
        SessionState::Pending,
        SessionState::Activating,
        SessionState::Running,
        SessionState::Idle,
        SessionState::Stopping,
        SessionState::Stopped,
        SessionState::Terminated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Creating => "CREATING",
            SessionState::Pending => "PENDING",
            SessionState::Activating => "ACTIVATING",
            SessionState::Running => "RUNNING",
            SessionState::Idle => "IDLE",
            SessionState::Stopping => "STOPPING",
            SessionState::Stopped => "STOPPED",
            SessionState::Terminated => "TERMINATED",
        }
    }
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is none of [`SessionState`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown session state `{0}`")]
pub struct UnknownSessionState(pub String);

impl std::str::FromStr for SessionState {
    type Err = UnknownSessionState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SessionState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownSessionState(s.chars().take(64).collect()))
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
        /// A [`SessionState`] name; a string so that an older client reads
        /// a state it does not know yet.
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

    /// A session-level `error` event with a [`reason`](crate::codes::ErrorReason).
    pub fn error_because(
        code: ErrorCode,
        reason: crate::codes::ErrorReason,
        message: impl Into<String>,
    ) -> Self {
        ServerEvent::Agent(AgentEvent::Error {
            conversation_id: None,
            error: ErrorBody::new(code, message).because(reason),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_states_keep_their_upper_case_names() {
        for state in SessionState::ALL {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
            assert_eq!(state.as_str().parse::<SessionState>(), Ok(state));
            assert_eq!(serde_json::from_str::<SessionState>(&json).unwrap(), state);
        }
        assert_eq!(SessionState::Idle.as_str(), "IDLE");
        assert!("running".parse::<SessionState>().is_err());
    }

    #[test]
    fn fields_over_their_limit_are_named() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let frame = ClientFrame::Message {
            id: Some(long.clone()),
            conversation_id: None,
            content: "hi".into(),
        };
        let why = frame.oversized_field().expect("too long");
        assert!(why.starts_with("id is 129 bytes long"), "{why}");
        let frame = ClientFrame::AnswerQuestion {
            request_id: "r1".into(),
            answer: "a".repeat(MAX_ANSWER_BYTES + 1),
        };
        assert!(frame.oversized_field().unwrap().starts_with("answer"));
        let frame = ClientFrame::DeleteConversation {
            conversation_id: long,
        };
        assert!(
            frame
                .oversized_field()
                .unwrap()
                .starts_with("conversation_id")
        );
        let ok = ClientFrame::Message {
            id: Some("x".repeat(MAX_ID_BYTES)),
            conversation_id: Some("c1".into()),
            content: "y".repeat(100_000),
        };
        assert_eq!(
            ok.oversized_field(),
            None,
            "content is bounded by the frame size only"
        );
    }
}
