//! Client authentication (SPEC §9): bearer tokens from the `Authorization`
//! header or `?token=` (browsers cannot set WebSocket headers).

use aishell_store::Store;
use axum::http::HeaderMap;

/// Who a connection acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub is_admin: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send `Authorization: Bearer <token>` or `?token=`")]
    Missing,
    #[error("token is invalid, revoked or expired")]
    Invalid,
    #[error("token store unavailable: {0}")]
    Store(#[from] aishell_store::StoreError),
}

/// The bearer token of a request, header first, then the query.
pub fn bearer_token(headers: &HeaderMap, query_token: Option<&str>) -> Option<String> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string());
    header
        .or_else(|| query_token.map(str::to_string))
        .filter(|t| !t.is_empty())
}

pub async fn authenticate(store: &dyn Store, token: Option<&str>) -> Result<Identity, AuthError> {
    let token = token.ok_or(AuthError::Missing)?;
    let record = store.verify_token(token).await?.ok_or(AuthError::Invalid)?;
    Ok(Identity {
        user_id: record.user_id,
        is_admin: record.is_admin,
    })
}

/// User ids name directories: no `/`, `..`, NUL or control characters (SPEC §9).
pub fn validate_user_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err("user id must be 1 to 64 characters".into());
    }
    if id == "." || id == ".." || id.starts_with('.') {
        return Err("user id must not start with a dot".into());
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@')))
    {
        return Err(format!(
            "user id contains a forbidden character {c:?} (allowed: letters, digits, - _ . @)"
        ));
    }
    Ok(())
}

/// Conversation ids travel into agents and file names: keep them plain.
pub fn validate_conversation_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_that_could_escape_are_rejected() {
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "../x",
            "a\0b",
            "a\nb",
            ".hidden",
            "ä",
            &"x".repeat(65),
        ] {
            assert!(validate_user_id(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["alice", "bob-2", "carol_x", "d.e", "u@example.com"] {
            assert!(validate_user_id(good).is_ok(), "{good:?} rejected");
        }
    }
}
