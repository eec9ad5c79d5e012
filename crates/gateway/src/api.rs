//! Small JSON API: `GET /api/sessions` lists the caller's sessions (an admin
//! sees everyone's, with the warm pool).

use std::sync::Arc;

use aishell_protocol::ErrorCode;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::Shared;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new().route("/api/sessions", get(sessions))
}

async fn sessions(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    // Header only: a token in a URL ends up in proxies' logs.
    let token = crate::auth::bearer_token(&headers, None);
    let who = match shared
        .auth
        .authenticate(shared.store.as_ref(), token.as_deref())
        .await
    {
        Ok(w) => w,
        Err(e) => {
            let body = json!({ "error": { "code": ErrorCode::Unauthorized.as_str(), "message": e.to_string() } });
            return (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
        }
    };
    let filter = (!who.is_admin).then_some(who.user_id.as_str());
    let list = match shared.store.list_sessions(filter).await {
        Ok(l) => l,
        Err(e) => {
            let body = json!({ "error": { "code": ErrorCode::Internal.as_str(), "message": e.to_string() } });
            return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
        }
    };
    let sessions: Vec<_> = list
        .into_iter()
        .map(|s| {
            json!({
                "session_id": s.id,
                "user_id": s.user_id,
                "state": s.state,
                "last_seq": s.last_seq,
                "task_id": s.task_id,
                "created_at": s.created_at.unix_timestamp(),
                "updated_at": s.updated_at.unix_timestamp(),
            })
        })
        .collect();
    let pool = who.is_admin.then(|| shared.pool.snapshot());
    axum::Json(json!({ "admin": who.is_admin, "sessions": sessions, "pool": pool })).into_response()
}
