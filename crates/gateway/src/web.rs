//! The embedded web UI: the chat page (`/`), the admin dashboard (`/admin`),
//! their static assets (`/assets/*`, compiled into the binary, no build step)
//! and the small JSON API behind them: `GET /api/me`, and for admins
//! `GET /api/admin/overview`, `GET /api/admin/gateways`,
//! `POST /api/admin/sessions/{id}/stop`,
//! `POST /api/admin/pool`.
//!
//! Pages and assets are public (they hold no data); every API call needs a
//! bearer token: none or a bad one is 401 `UNAUTHORIZED`, a non-admin on an
//! admin route is 403 `FORBIDDEN`. Every API call takes the token from the
//! `Authorization` header only (never `?token=`): a link cannot trigger one,
//! and tokens stay out of URLs and so out of proxies' logs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use aishell_protocol::{ErrorCode, SessionState};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::Shared;
use crate::auth::Identity;
use crate::session::SessionCmd;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(chat_page))
        .route("/admin", get(admin_page))
        .route("/assets/{name}", get(asset))
        .route("/api/me", get(me))
        .route(
            "/api/sessions/{session_id}/conversations/{conversation_id}/messages",
            get(conversation_messages),
        )
        .route("/api/admin/overview", get(overview))
        .route("/api/admin/gateways", get(gateways))
        .route("/api/admin/sessions/{session_id}/stop", post(stop_session))
        .route("/api/admin/pool", post(pool_action))
        .route("/api/admin/report", get(daily_report))
}

// ---- static assets -------------------------------------------------------

struct Asset {
    content_type: &'static str,
    body: &'static [u8],
    /// Strong validator: browsers revalidate (`no-cache`) and get a 304
    /// unless the binary's copy changed, so an upgrade is never half-cached.
    etag: String,
}

macro_rules! asset {
    ($name:literal, $ctype:literal) => {
        (
            $name,
            $ctype,
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/", $name)).as_slice(),
        )
    };
}

static ASSETS: LazyLock<HashMap<&'static str, Asset>> = LazyLock::new(|| {
    [
        asset!("index.html", "text/html; charset=utf-8"),
        asset!("admin.html", "text/html; charset=utf-8"),
        asset!("style.css", "text/css; charset=utf-8"),
        asset!("common.js", "text/javascript; charset=utf-8"),
        asset!("chat.js", "text/javascript; charset=utf-8"),
        asset!("admin.js", "text/javascript; charset=utf-8"),
        asset!("icon.svg", "image/svg+xml"),
    ]
    .into_iter()
    .map(|(name, content_type, body)| {
        let digest = Sha256::digest(body);
        let etag = format!("\"{}\"", hex16(&digest[..8]));
        (
            name,
            Asset {
                content_type,
                body,
                etag,
            },
        )
    })
    .collect()
});

fn hex16(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Only our own origin, no inline script: the pages make no external request
/// and an injected string cannot run.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";
/// The dashboard opens the daily report (one HTML file with inline CSS) as a
/// blob document, which inherits this policy: inline styles, still no script.
const ADMIN_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";
/// The report itself: inline CSS and SVG, nothing else.
const REPORT_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; base-uri 'none'";

fn serve_asset(name: &str, headers: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.get(name) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == asset.etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&asset.etag).expect("hex etag"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The first URL carries the token; never hand it to anyone as a referrer.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if asset.content_type.starts_with("text/html") {
        let csp = if name == "admin.html" { ADMIN_CSP } else { CSP };
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(csp),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    response
}

async fn chat_page(headers: HeaderMap) -> Response {
    serve_asset("index.html", &headers)
}

async fn admin_page(headers: HeaderMap) -> Response {
    serve_asset("admin.html", &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    if name.ends_with(".html") {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    }
    serve_asset(&name, &headers)
}

// ---- API -------------------------------------------------------------------

fn api_error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "code": code.as_str(), "message": message.into() } });
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The report route's own codes: a missing day's log is not a protocol
/// error, so it does not borrow one (such as BAD_FRAME).
const NO_LOGS: &str = "NO_LOGS";
const INVALID_DATE: &str = "INVALID_DATE";

fn api_error_code(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "code": code, "message": message.into() } });
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn no_store(body: serde_json::Value) -> Response {
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The caller, from the `Authorization` header only: a token in a URL ends
/// up in proxies' and browsers' logs (only `/ws` accepts `?token=`).
async fn identify(shared: &Shared, headers: &HeaderMap) -> Result<Identity, Response> {
    let token = crate::auth::bearer_token(headers, None);
    shared
        .auth
        .authenticate(shared.store.as_ref(), token.as_deref())
        .await
        .map_err(|e| match e {
            crate::auth::AuthError::Store(e) => api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Internal,
                format!("the gateway cannot check tokens right now ({e}); try again"),
            ),
            other => api_error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                other.to_string(),
            ),
        })
}

async fn admin(shared: &Shared, headers: &HeaderMap) -> Result<Identity, Response> {
    let who = identify(shared, headers).await?;
    if !who.is_admin {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!(
                "the admin dashboard needs an admin token; {} is not an admin",
                who.user_id
            ),
        ));
    }
    Ok(who)
}

/// Who the token belongs to, and which agent new sessions get (the pages use
/// it to check a token before connecting, since a browser cannot read why a
/// WebSocket upgrade failed).
async fn me(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match identify(&shared, &headers).await {
        Ok(who) => no_store(json!({
            "user_id": who.user_id,
            "admin": who.is_admin,
            // A built-in kind only; an external command's name means nothing here.
            "agent": shared.cfg.agent.command.is_none().then_some(&shared.cfg.agent.kind),
        })),
        Err(r) => r,
    }
}

/// A conversation's stored messages (the user's, and each turn's final
/// reply), so a new tab can show a conversation it did not see live. The
/// session's owner or an admin only.
async fn conversation_messages(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((session_id, conversation_id)): Path<(String, String)>,
) -> Response {
    let who = match identify(&shared, &headers).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let not_found = || {
        api_error(
            StatusCode::NOT_FOUND,
            ErrorCode::SessionNotFound,
            format!("no session {session_id}"),
        )
    };
    let session = match shared.store.get_session(&session_id).await {
        Ok(Some(s)) => s,
        Ok(None) => return not_found(),
        Err(e) => {
            return api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Internal,
                format!("cannot read the session: {e}"),
            );
        }
    };
    if session.user_id != who.user_id && !who.is_admin {
        return api_error(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "that session belongs to another user",
        );
    }
    match shared
        .store
        .list_messages(&session_id, &conversation_id)
        .await
    {
        Ok(list) => {
            let messages: Vec<_> = list
                .into_iter()
                .map(|m| {
                    json!({
                        "role": m.role.as_str(),
                        "content": m.content,
                        "id": m.client_msg_id,
                        "created_at": m.created_at.unix_timestamp(),
                    })
                })
                .collect();
            no_store(json!({ "conversation_id": conversation_id, "messages": messages }))
        }
        Err(e) => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal,
            format!("cannot read the messages: {e}"),
        ),
    }
}

/// Sessions listed on the dashboard (most recently active first).
const OVERVIEW_SESSIONS: usize = 100;

async fn overview(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = admin(&shared, &headers).await {
        return r;
    }
    let mut sessions = match shared.store.list_sessions(None).await {
        Ok(l) => l,
        Err(e) => {
            return api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Internal,
                format!("cannot read sessions from the store: {e}"),
            );
        }
    };
    sessions.retain(|s| s.state != SessionState::Terminated);
    sessions.sort_by_key(|s| std::cmp::Reverse(s.updated_at));
    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    let mut by_user: BTreeMap<String, BTreeMap<&str, u64>> = BTreeMap::new();
    for s in &sessions {
        *by_state.entry(s.state.as_str()).or_default() += 1;
        *by_user
            .entry(s.user_id.clone())
            .or_default()
            .entry(s.state.as_str())
            .or_default() += 1;
    }
    let by_user: Vec<_> = by_user
        .into_iter()
        .map(|(user_id, states)| {
            let total: u64 = states.values().sum();
            json!({ "user_id": user_id, "total": total, "by_state": states })
        })
        .collect();
    let listed: Vec<_> = sessions
        .iter()
        .take(OVERVIEW_SESSIONS)
        .map(|s| {
            json!({
                "session_id": s.id,
                "user_id": s.user_id,
                "state": s.state,
                "task_id": s.task_id,
                "live": shared.sessions.get(&s.id).is_some(),
                "updated_at": s.updated_at.unix_timestamp(),
            })
        })
        .collect();
    let gateways = match gateways_view(&shared).await {
        Ok(g) => g,
        Err(r) => return r,
    };
    let recent = crate::recent::recent().snapshot();
    let latency = |key: &str| recent.series.get(key).cloned();
    no_store(json!({
        "gateways": gateways,
        "version": env!("CARGO_PKG_VERSION"),
        "backend": shared.backend.name(),
        "uptime_s": recent.uptime_s,
        "window_s": crate::recent::WINDOW.as_secs(),
        "sessions": {
            "total": sessions.len(),
            "live": shared.sessions.live_count(),
            "by_state": by_state,
            "by_user": by_user,
            "list": listed,
        },
        "pool": shared.pool.snapshot(),
        "runners_connected": recent.runners_connected,
        "clients_connected": recent.clients_connected,
        "errors": {
            "by_code": recent.errors_by_code,
            "recent": recent.errors_recent,
        },
        "latency": {
            "start_warm": latency("task_ready/warm"),
            "start_cold": latency("task_ready/cold"),
            "first_event": latency("message_roundtrip"),
        },
    }))
}

/// Every gateway sharing the database (`null` for the only one): id,
/// internal URL, seconds since its heartbeat, whether that is within a
/// lease (alive), its leases, and which one answered.
async fn gateways_view(shared: &Shared) -> Result<serde_json::Value, Response> {
    let Some(cluster) = &shared.cluster else {
        return Ok(serde_json::Value::Null);
    };
    let list = shared.store.list_gateways().await.map_err(|e| {
        api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal,
            format!("cannot read the gateways from the store: {e}"),
        )
    })?;
    let now = time::OffsetDateTime::now_utc();
    let ttl = cluster.cfg.lease_ttl.as_secs_f64();
    Ok(list
        .into_iter()
        .map(|g| {
            let age = (now - g.heartbeat_at).as_seconds_f64().max(0.0);
            json!({
                "gateway_id": g.id,
                "internal_url": g.internal_url,
                "started_at": g.started_at.unix_timestamp(),
                "heartbeat_age_s": (age * 10.0).round() / 10.0,
                "alive": age <= ttl,
                "leases": g.leases,
                "this": g.id == cluster.id(),
            })
        })
        .collect())
}

async fn gateways(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = admin(&shared, &headers).await {
        return r;
    }
    match gateways_view(&shared).await {
        Ok(g) => no_store(json!({ "gateways": g })),
        Err(r) => r,
    }
}

async fn stop_session(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(session_id): Path<String>,
) -> Response {
    let who = match admin(&shared, &headers).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let Some(handle) = shared.sessions.get(&session_id) else {
        return api_error(
            StatusCode::NOT_FOUND,
            ErrorCode::SessionNotFound,
            format!("{session_id} has no running task to stop"),
        );
    };
    tracing::info!(event = "admin_stop_session", sessionId = %session_id, userId = %handle.user_id, admin = %who.user_id, "admin stopped a session's task");
    let reason = format!("stopped by admin {}", who.user_id);
    if !handle.send(SessionCmd::StopTask { reason }).await {
        return api_error(
            StatusCode::NOT_FOUND,
            ErrorCode::SessionNotFound,
            format!("{session_id} left memory; nothing to stop"),
        );
    }
    (
        StatusCode::ACCEPTED,
        no_store(json!({ "session_id": session_id, "stopping": true })),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum PoolAction {
    /// Keep this many ready tasks (capped at the pool's maximum).
    Resize { target: usize },
    /// Stop every unclaimed task and keep none (resize to refill again).
    Drain,
}

async fn pool_action(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let who = match admin(&shared, &headers).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let action: PoolAction = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadFrame,
                format!(
                    "expected {{\"action\":\"resize\",\"target\":N}} or {{\"action\":\"drain\"}}: {e}"
                ),
            );
        }
    };
    if !shared.pool.enabled() {
        return api_error(
            StatusCode::CONFLICT,
            ErrorCode::BadFrame,
            "the warm pool is disabled on this gateway (--enable-warm-pool)",
        );
    }
    match action {
        PoolAction::Resize { target } => {
            tracing::info!(event = "admin_pool_resize", target, admin = %who.user_id, "admin resized the warm pool");
            shared.pool.set_target(target);
        }
        PoolAction::Drain => {
            tracing::info!(event = "admin_pool_drain", admin = %who.user_id, "admin drained the warm pool");
            shared.pool.drain().await;
        }
    }
    no_store(json!({ "pool": shared.pool.snapshot() }))
}

#[derive(Deserialize)]
struct ReportQuery {
    /// YYYY-MM-DD (UTC) [default: today].
    date: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum ReportError {
    #[error(
        "no gateway log for {0} under {1}: the gateway writes one as it runs, so this day had no gateway running (or it was started with --log-file elsewhere)"
    )]
    NoLogs(String, String),
    #[error("{0}")]
    BadRequest(String),
    #[error("cannot build the report: {0}")]
    Failed(String),
}

/// The daily report (`aishell report --format html`) over this gateway's own
/// log files (`serve --log-file` writes `<data-dir>/logs/aishell.DAY.log`):
/// the report day and its compare day only, so a month of logs is not read.
/// Admins only; header token only (the dashboard fetches it).
async fn daily_report(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ReportQuery>,
) -> Response {
    if let Err(r) = admin(&shared, &headers).await {
        return r;
    }
    let Some(dir) = shared.cfg.log_dir.clone() else {
        return api_error_code(
            StatusCode::NOT_FOUND,
            NO_LOGS,
            "this gateway writes no log files (it was started with --log-file none), so there is no report to build",
        );
    };
    let rendered = tokio::task::spawn_blocking(move || render_report(&dir, q.date))
        .await
        .unwrap_or_else(|e| Err(ReportError::Failed(e.to_string())));
    match rendered {
        Ok(html) => {
            let mut response = (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                )],
                html,
            )
                .into_response();
            let h = response.headers_mut();
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(REPORT_CSP),
            );
            h.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            response
        }
        Err(e @ ReportError::NoLogs(..)) => {
            api_error_code(StatusCode::NOT_FOUND, NO_LOGS, e.to_string())
        }
        Err(e @ ReportError::BadRequest(_)) => {
            api_error_code(StatusCode::BAD_REQUEST, INVALID_DATE, e.to_string())
        }
        Err(e @ ReportError::Failed(_)) => {
            tracing::error!(event = "report_failed", error = %e, "daily report failed");
            api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                e.to_string(),
            )
        }
    }
}

fn render_report(dir: &std::path::Path, date: Option<String>) -> Result<String, ReportError> {
    let args = aishell_report::ReportArgs {
        files: Vec::new(),
        date,
        range: None,
        compare: None,
        source: "file".into(),
        log_group: None,
        env: None,
        format: "html".into(),
        thresholds: None,
        p99_start_ms: None,
        failure_increase_pct: None,
        warm_hit_drop_pct: None,
    };
    let days = aishell_report::Days::from_args(&args)
        .map_err(|e| ReportError::BadRequest(format!("{e:#}")))?;
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let name = |d: &time::Date| format!("aishell.{}.log", d.format(&fmt).unwrap_or_default());
    let day = days.wanted.last().map(name).unwrap_or_default();
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for d in std::iter::once(&days.compare).chain(&days.wanted) {
        let path = dir.join(name(d));
        if path.is_file() && !files.contains(&path) {
            files.push(path);
        }
    }
    if !dir.join(&day).is_file() {
        return Err(ReportError::NoLogs(day, dir.display().to_string()));
    }
    let mut chained: Box<dyn std::io::Read> = Box::new(std::io::empty());
    for f in files {
        let file = std::fs::File::open(&f)
            .map_err(|e| ReportError::Failed(format!("{}: {e}", f.display())))?;
        chained = Box::new(std::io::Read::chain(chained, file));
    }
    let mut reader = std::io::BufReader::with_capacity(1 << 20, chained);
    let report = aishell_report::build(&args, &mut reader)
        .map_err(|e| ReportError::Failed(format!("{e:#}")))?;
    Ok(aishell_report::html::render(&report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_embedded_with_an_etag() {
        for name in [
            "index.html",
            "admin.html",
            "style.css",
            "common.js",
            "chat.js",
            "admin.js",
            "icon.svg",
        ] {
            let a = &ASSETS[name];
            assert!(!a.body.is_empty(), "{name} is empty");
            assert_eq!(a.etag.len(), 18, "{name}: {}", a.etag);
        }
    }

    #[test]
    fn pages_reference_only_local_assets() {
        for name in [
            "index.html",
            "admin.html",
            "chat.js",
            "admin.js",
            "common.js",
        ] {
            // The SVG namespace is a name, not a request.
            let text = std::str::from_utf8(ASSETS[name].body)
                .unwrap()
                .replace("http://www.w3.org/2000/svg", "");
            for bad in ["http://", "https://", "//cdn", "<script>"] {
                assert!(!text.contains(bad), "{name} contains {bad}");
            }
        }
    }

    #[test]
    fn report_without_log_files_says_how_to_get_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = render_report(dir.path(), None).unwrap_err();
        assert!(matches!(err, ReportError::NoLogs(..)), "{err}");
        assert!(err.to_string().contains("--log-file"));
        let bad = render_report(dir.path(), Some("yesterday".into())).unwrap_err();
        assert!(matches!(bad, ReportError::BadRequest(_)), "{bad}");
    }

    #[test]
    fn report_renders_todays_log() {
        let dir = tempfile::tempdir().unwrap();
        let today = time::OffsetDateTime::now_utc();
        let fmt = time::macros::format_description!("[year]-[month]-[day]");
        let stamp = today
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let line = serde_json::json!({
            "timestamp": stamp, "level": "info", "service": "aishell-gateway",
            "event": "task_lifecycle", "phase": "task_ready", "duration_ms": 42,
            "source": "warm", "sessionId": "s-1", "userId": "u", "message": "task ready",
        });
        let file = dir
            .path()
            .join(format!("aishell.{}.log", today.format(&fmt).unwrap()));
        std::fs::write(&file, format!("{line}\n")).unwrap();
        let html = render_report(dir.path(), None).unwrap();
        assert!(html.starts_with("<!doctype html>"), "{}", &html[..80]);
        assert!(html.contains("aishell daily report"));
    }

    #[test]
    fn revalidation_gets_304() {
        let etag = ASSETS["chat.js"].etag.clone();
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, etag.parse().unwrap());
        assert_eq!(
            serve_asset("chat.js", &headers).status(),
            StatusCode::NOT_MODIFIED
        );
        let r = serve_asset("chat.js", &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert_eq!(serve_asset("nope.js", &HeaderMap::new()).status(), 404);
    }
}
