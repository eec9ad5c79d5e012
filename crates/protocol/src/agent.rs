//! Agent protocol (docs/protocol/agent.md): one JSON object per line on the agent's stdin
//! (input) and stdout (output). Any program that speaks this is an agent.

use serde::{Deserialize, Serialize};

use crate::codes::ErrorBody;

/// What the agent says about itself in its `init` frame.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
}

/// A conversation the agent should be able to continue: our id plus the
/// agent's own handle (e.g. Claude Code's session id), if it gave one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationRef {
    pub conversation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_handle: Option<String>,
}

/// The user and group a pre-started agent switches to on `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// Runner → agent (stdin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentInput {
    /// First line the agent reads; it answers with its own `init`.
    Init {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workspace: Option<String>,
        #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
        settings: serde_json::Map<String, serde_json::Value>,
        /// The session's variables (`AISHELL_SESSION_ID`, `AISHELL_TRACE_ID`)
        /// for whatever the agent runs: an agent started before its claim
        /// could not get them in its environment.
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        env: std::collections::BTreeMap<String, String>,
        /// Only to a built-in agent started before its claim with
        /// `--await-init` under per-user UID isolation: the identity it must
        /// take, for good, before it does anything for the session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_as: Option<RunAs>,
    },
    Message {
        conversation_id: String,
        content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
    },
    Abort {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<String>,
    },
    AnswerQuestion {
        request_id: String,
        answer: String,
    },
    ResetConversation {
        conversation_id: String,
    },
    DeleteConversation {
        conversation_id: String,
    },
    RestoreConversations {
        conversations: Vec<ConversationRef>,
    },
    Ping {
        #[serde(default)]
        id: serde_json::Value,
    },
}

impl AgentInput {
    pub const TYPES: &'static [&'static str] = &[
        "init",
        "message",
        "abort",
        "answer_question",
        "reset_conversation",
        "delete_conversation",
        "restore_conversations",
        "ping",
    ];
}

/// Agent → runner (stdout). Forwarded to clients unchanged (the client protocol's names, docs/protocol/client.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentEvent {
    Init(AgentInfo),
    Thinking {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<String>,
    },
    TextDelta {
        conversation_id: String,
        delta: String,
    },
    Content {
        conversation_id: String,
        content: String,
    },
    ToolCall {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<String>,
        tool_call_id: String,
        tool_name: String,
        #[serde(default)]
        tool_input: serde_json::Value,
    },
    ToolResult {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<String>,
        tool_call_id: String,
        content: String,
        #[serde(default)]
        is_error: bool,
    },
    AskQuestion {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<String>,
        request_id: String,
        question: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        options: Option<Vec<String>>,
    },
    Progress {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<String>,
        #[serde(default)]
        token_usage: TokenUsage,
    },
    Finish {
        conversation_id: String,
        #[serde(default)]
        token_usage: TokenUsage,
    },
    ConversationUpdate {
        conversation_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
        /// The agent's own handle to resume this conversation elsewhere.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_handle: Option<String>,
    },
    Info {
        message: String,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conversation_id: Option<String>,
        error: ErrorBody,
    },
    Pong {
        #[serde(default)]
        id: serde_json::Value,
    },
}

impl AgentEvent {
    pub const TYPES: &'static [&'static str] = &[
        "init",
        "thinking",
        "text_delta",
        "content",
        "tool_call",
        "tool_result",
        "ask_question",
        "progress",
        "finish",
        "conversation_update",
        "info",
        "error",
        "pong",
    ];

    /// The conversation this event belongs to, when it names one.
    pub fn conversation_id(&self) -> Option<&str> {
        match self {
            AgentEvent::TextDelta {
                conversation_id, ..
            }
            | AgentEvent::Content {
                conversation_id, ..
            }
            | AgentEvent::Finish {
                conversation_id, ..
            }
            | AgentEvent::ConversationUpdate {
                conversation_id, ..
            } => Some(conversation_id),
            AgentEvent::Thinking {
                conversation_id, ..
            }
            | AgentEvent::ToolCall {
                conversation_id, ..
            }
            | AgentEvent::ToolResult {
                conversation_id, ..
            }
            | AgentEvent::AskQuestion {
                conversation_id, ..
            }
            | AgentEvent::Progress {
                conversation_id, ..
            }
            | AgentEvent::Error {
                conversation_id, ..
            } => conversation_id.as_deref(),
            AgentEvent::Init(_) | AgentEvent::Info { .. } | AgentEvent::Pong { .. } => None,
        }
    }

    /// Decode one line of agent output.
    pub fn decode_line(line: &str) -> Result<Self, crate::DecodeError> {
        crate::decode(line, Self::TYPES)
    }
}

impl AgentInput {
    /// Decode one line of agent input.
    pub fn decode_line(line: &str) -> Result<Self, crate::DecodeError> {
        crate::decode(line, Self::TYPES)
    }

    /// Encode as one line (with the trailing newline).
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("agent input always serialises");
        s.push('\n');
        s
    }
}

impl AgentEvent {
    /// Encode as one line (with the trailing newline).
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("agent event always serialises");
        s.push('\n');
        s
    }
}
