//! Stable error codes. Clients match on these strings; never rename one.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    TaskStartFailed,
    TaskRestartFailed,
    TaskConnectTimeout,
    AgentCrashed,
    AgentError,
    /// A turn ended because the user aborted it.
    Aborted,
    Unauthorized,
    Forbidden,
    QuotaExceeded,
    BadFrame,
    SessionNotFound,
    Overloaded,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::TaskStartFailed,
        ErrorCode::TaskRestartFailed,
        ErrorCode::TaskConnectTimeout,
        ErrorCode::AgentCrashed,
        ErrorCode::AgentError,
        ErrorCode::Aborted,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::QuotaExceeded,
        ErrorCode::BadFrame,
        ErrorCode::SessionNotFound,
        ErrorCode::Overloaded,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::TaskStartFailed => "TASK_START_FAILED",
            ErrorCode::TaskRestartFailed => "TASK_RESTART_FAILED",
            ErrorCode::TaskConnectTimeout => "TASK_CONNECT_TIMEOUT",
            ErrorCode::AgentCrashed => "AGENT_CRASHED",
            ErrorCode::AgentError => "AGENT_ERROR",
            ErrorCode::Aborted => "ABORTED",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
            ErrorCode::BadFrame => "BAD_FRAME",
            ErrorCode::SessionNotFound => "SESSION_NOT_FOUND",
            ErrorCode::Overloaded => "OVERLOADED",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_name_matches_as_str() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}

/// The `error` object of an `error` frame: a stable code and a sentence.
/// `code` is a string, not [`ErrorCode`], because agents may send their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code: code.as_str().to_string(),
            message: message.into(),
        }
    }
}
