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
    /// The gateway cannot reach the user's workspace (files API).
    WorkspaceUnavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 14] = [
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
        ErrorCode::WorkspaceUnavailable,
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
            ErrorCode::WorkspaceUnavailable => "WORKSPACE_UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a task could not be started or was lost, finer than its
/// [`ErrorCode`]: the `reason` of an `error` frame. Like codes, these
/// strings are stable and never renamed; new ones may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorReason {
    /// The runtime answered and refused (permissions, quota, bad request,
    /// no capacity): retrying as is will likely fail again.
    BackendRefused,
    /// The runtime could not be reached (network, API down, timeout):
    /// retrying later may work.
    BackendUnreachable,
    /// The task itself ended (exited, was killed, vanished) before it was
    /// ready or while it ran.
    TaskExited,
}

impl ErrorReason {
    pub const ALL: [ErrorReason; 3] = [
        ErrorReason::BackendRefused,
        ErrorReason::BackendUnreachable,
        ErrorReason::TaskExited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorReason::BackendRefused => "backend_refused",
            ErrorReason::BackendUnreachable => "backend_unreachable",
            ErrorReason::TaskExited => "task_exited",
        }
    }
}

impl std::fmt::Display for ErrorReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_without_a_reason_is_the_frame_it_always_was() {
        let body = ErrorBody::new(ErrorCode::Internal, "x");
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"code":"INTERNAL","message":"x"}"#
        );
        let old: ErrorBody = serde_json::from_str(r#"{"code":"INTERNAL","message":"x"}"#).unwrap();
        assert_eq!(old, body);
        let with = ErrorBody::new(ErrorCode::TaskStartFailed, "y")
            .because(ErrorReason::BackendUnreachable);
        assert_eq!(
            serde_json::to_value(&with).unwrap()["reason"],
            "backend_unreachable"
        );
    }

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
    /// Why, finer than the code (an [`ErrorReason`] from the gateway; a
    /// string, like `code`). Optional within protocol version 1: absent
    /// means the code is all there is to know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code: code.as_str().to_string(),
            message: message.into(),
            reason: None,
        }
    }

    /// The same error, with why.
    pub fn because(mut self, reason: ErrorReason) -> Self {
        self.reason = Some(reason.as_str().to_string());
        self
    }
}
