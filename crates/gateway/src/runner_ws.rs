//! Runner sockets (docs/protocol/runner.md): `/internal/task/{session_id}` (cold) and
//! `/internal/warm/{task_id}` (warm). Every dial-back presents the per-task
//! credential minted at launch; a missing, forged, expired or mismatched one
//! is refused before the upgrade and logged.

use aishell_backend::TaskMode;
use std::sync::Arc;
use std::time::Duration;

use aishell_protocol::{
    GatewayToRunner, MIN_RUNNER_PROTOCOL_VERSION, RUNNER_PROTOCOL_VERSION, RunnerToGateway,
};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::Shared;
use crate::credential::{CredentialError, RunnerClaims};
use crate::session::{Found, RunnerAttach, SessionCmd, SessionHandle, SessionManager};

/// A runner that says nothing (not even a heartbeat) this long is gone.
const RUNNER_SILENCE: Duration = Duration::from_secs(30);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A warm runner answers `prepare` once its agent started (or will not).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn cold(
    State(shared): State<Arc<Shared>>,
    Path(session_id): Path<String>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let (claims, launched_here) = match verify(&shared, &headers, &session_id) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    if claims.mode != TaskMode::Cold || claims.session_id.as_deref() != Some(session_id.as_str()) {
        tracing::warn!(event = "runner_auth_failed", sessionId = %session_id, taskId = %claims.task_id, reason = "credential names another session", "runner refused");
        return (
            StatusCode::FORBIDDEN,
            "credential is not valid for this session",
        )
            .into_response();
    }
    if !launched_here {
        match bound_in_store(&shared, &session_id, &claims.task_id).await {
            Ok(true) => {}
            Ok(false) => return refused_not_launched(&claims.task_id),
            Err(e) => return store_unavailable(&e),
        }
    }
    // Class 2: the runner may dial before its session is registered.
    let handle = match SessionManager::open_with_grace(
        &shared,
        &session_id,
        shared.cfg.deadlines.dial_back_grace,
    )
    .await
    {
        Ok(Some(Found::Here(h))) => h,
        Ok(Some(Found::Elsewhere(owner))) => return owned_elsewhere(&session_id, &owner),
        Ok(None) => {
            tracing::warn!(event = "runner_unknown_session", sessionId = %session_id, taskId = %claims.task_id, "runner dialled back for a session that does not exist");
            return (StatusCode::NOT_FOUND, "no such session").into_response();
        }
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("store unavailable: {e}"),
            )
                .into_response();
        }
    };
    ws.max_message_size(64 << 20)
        .read_buffer_size(aishell_protocol::WS_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| connection(shared, claims, true, Some(handle), socket))
}

pub async fn warm(
    State(shared): State<Arc<Shared>>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let (claims, launched_here) = match verify(&shared, &headers, &task_id) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    if claims.mode != TaskMode::Warm || claims.task_id != task_id {
        tracing::warn!(event = "runner_auth_failed", taskId = %task_id, reason = "credential names another task", "runner refused");
        return (
            StatusCode::FORBIDDEN,
            "credential is not valid for this task",
        )
            .into_response();
    }
    ws.max_message_size(64 << 20)
        .read_buffer_size(aishell_protocol::WS_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| connection(shared, claims, launched_here, None, socket))
}

/// One of several gateways: whether the store binds `session_id` to
/// `task_id` (a task another gateway launched for a session this one may
/// take over; a stopped task is bound to nothing).
/// A store that cannot answer is an error, not a "no": refusing would be
/// final for the runner (it kills its agent), and the task may well be
/// bound.
async fn bound_in_store(
    shared: &Shared,
    session_id: &str,
    task_id: &str,
) -> Result<bool, aishell_store::StoreError> {
    if shared.cluster.is_none() {
        return Ok(false);
    }
    Ok(shared
        .store
        .get_session(session_id)
        .await?
        .is_some_and(|s| s.task_id.as_deref() == Some(task_id)))
}

/// The store did not answer: not final for the runner, which dials again.
fn store_unavailable(e: &aishell_store::StoreError) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("store unavailable: {e}; dial again"),
    )
        .into_response()
}

fn refused_not_launched(task_id: &str) -> Response {
    tracing::warn!(event = "runner_auth_failed", taskId = %task_id, reason = %CredentialError::NotLaunched, "runner refused");
    (
        StatusCode::FORBIDDEN,
        CredentialError::NotLaunched.to_string(),
    )
        .into_response()
}

/// Another gateway runs the session: not final for the runner, which
/// re-dials (its own gateway, then the shared address) until it reaches it.
/// The owner's address rides along, so the runner dials it next instead of
/// hoping the shared address lands there (docs/cluster.md).
fn owned_elsewhere(session_id: &str, owner: &crate::cluster::Owner) -> Response {
    tracing::info!(event = "runner_redirected", sessionId = %session_id, owner = ?owner, "runner dialled a gateway that does not run its session");
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        "another gateway runs this session; dial again",
    )
        .into_response();
    if let Some(url) = owner_url(owner)
        && let Ok(value) = axum::http::HeaderValue::from_str(url)
    {
        response.headers_mut().insert(OWNER_HEADER, value);
    }
    response
}

use aishell_protocol::runner::{OWNER_CLOSE_REASON_PREFIX as OWNER_REASON, OWNER_HEADER};

fn owner_url(owner: &crate::cluster::Owner) -> Option<&str> {
    match owner {
        crate::cluster::Owner::Elsewhere {
            internal_url: Some(url),
            ..
        } => Some(url),
        _ => None,
    }
}

/// Check a dial-back's credential; `target` is the session or task id of
/// the URL (for the log). With it: whether this gateway launched (or
/// adopted) the task. Only one of several gateways accepts a task it did not
/// launch, and only once the store shows it bound to its session.
fn verify(
    shared: &Shared,
    headers: &HeaderMap,
    target: &str,
) -> Result<(RunnerClaims, bool), Box<Response>> {
    let Some(token) = crate::auth::bearer_token(headers, None) else {
        tracing::warn!(
            event = "runner_auth_failed",
            target = %target,
            reason = "no credential",
            "runner refused"
        );
        return Err(Box::new(
            (StatusCode::UNAUTHORIZED, "missing task credential").into_response(),
        ));
    };
    // Signature, expiry, and a task this gateway launched and has not stopped.
    let refused = |e: CredentialError| {
        tracing::warn!(event = "runner_auth_failed", target = %target, reason = %e, "runner refused");
        let status = match e {
            CredentialError::NotLaunched => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        Box::new((status, e.to_string()).into_response())
    };
    match shared.credentials.accept(&token) {
        Ok(claims) => Ok((claims, true)),
        // Signature and expiry hold (`accept` checks them first).
        Err(CredentialError::NotLaunched) if shared.cluster.is_some() => shared
            .credentials
            .verify(&token)
            .map(|claims| (claims, false))
            .map_err(refused),
        Err(e) => Err(refused(e)),
    }
}

/// One runner socket. `session` is known for cold dial-backs; a warm runner
/// either names its session in `hello` (a re-dial after its claim) or joins
/// the pool and waits to be claimed.
async fn connection(
    shared: Arc<Shared>,
    claims: RunnerClaims,
    launched_here: bool,
    session: Option<SessionHandle>,
    mut socket: WebSocket,
) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, socket.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => RunnerToGateway::decode(&t).ok(),
        _ => None,
    };
    let Some(RunnerToGateway::Hello {
        protocol,
        task_id,
        session_id,
        agent_running,
        runner_version,
        inputs_received,
    }) = hello
    else {
        refuse(socket, 4400, "expected hello").await;
        return;
    };
    if task_id != claims.task_id {
        tracing::warn!(event = "runner_auth_failed", taskId = %claims.task_id, claimed = %task_id, reason = "hello names another task", "runner refused");
        refuse(socket, 4403, "hello names another task").await;
        return;
    }
    if !(MIN_RUNNER_PROTOCOL_VERSION..=RUNNER_PROTOCOL_VERSION).contains(&protocol) {
        tracing::warn!(event = "runner_protocol_mismatch", taskId = %task_id, protocol, "runner speaks an unsupported protocol");
        let reason = format!(
            "runner protocol {protocol} unsupported (gateway accepts {MIN_RUNNER_PROTOCOL_VERSION}..={RUNNER_PROTOCOL_VERSION})"
        );
        refuse(socket, 4400, &reason).await;
        return;
    }
    // A claimed warm task another gateway launched: only for the session
    // the store binds it to (an unclaimed one belongs to its own pool).
    let bound = match &session_id {
        Some(sid) if !launched_here && session.is_none() => {
            bound_in_store(&shared, sid, &task_id).await
        }
        _ => Ok(false),
    };
    if let Err(e) = &bound {
        // Not final: the runner dials again.
        refuse(socket, 1013, &format!("store unavailable: {e}")).await;
        return;
    }
    if !launched_here && session.is_none() && bound.as_ref().is_ok_and(|b| !b) {
        tracing::warn!(event = "runner_auth_failed", taskId = %task_id, reason = %CredentialError::NotLaunched, "runner refused");
        refuse(socket, 4403, &CredentialError::NotLaunched.to_string()).await;
        return;
    }
    let generation = shared.next_id();
    let (tx, mut rx) = mpsc::unbounded_channel::<GatewayToRunner>();
    // A warm runner that is already bound re-attaches to its session (after
    // a gateway restart the pool adopted it as unclaimed: it is not).
    if session.is_none() && session_id.is_some() {
        shared.pool.forget(&task_id);
    }
    let session = match (session, &session_id) {
        (Some(h), _) => Some(h),
        (None, Some(sid)) => match SessionManager::open_with_grace(
            &shared,
            sid,
            shared.cfg.deadlines.dial_back_grace,
        )
        .await
        {
            Ok(Some(Found::Here(h))) => Some(h),
            Ok(Some(Found::Elsewhere(owner))) => {
                tracing::info!(event = "runner_redirected", sessionId = %sid, owner = ?owner, "runner dialled a gateway that does not run its session");
                // Not final: the runner dials again until it reaches the owner.
                let reason = match owner_url(&owner) {
                    Some(url) => format!("{OWNER_REASON}{url}"),
                    None => "another gateway runs this session; dial again".into(),
                };
                refuse(socket, 1013, &reason).await;
                return;
            }
            Err(e) => {
                // Not final: the runner dials again.
                refuse(socket, 1013, &format!("store unavailable: {e}")).await;
                return;
            }
            Ok(None) => {
                refuse(
                    socket,
                    4404,
                    "the session this task was bound to does not exist",
                )
                .await;
                return;
            }
        },
        (None, None) => None,
    };
    let mut route = match session {
        Some(handle) => {
            let attach = RunnerAttach {
                task_id: task_id.clone(),
                generation,
                tx,
                session_hint: session_id,
                agent_running,
                inputs_received,
            };
            match handle
                .request(|reply| SessionCmd::RunnerConnected { attach, reply })
                .await
            {
                Some(Ok(())) => {}
                Some(Err(reason)) => {
                    tracing::warn!(event = "runner_rejected", sessionId = %handle.id, taskId = %task_id, reason = %reason, "runner not accepted");
                    refuse(socket, 4409, &reason).await;
                    return;
                }
                None => {
                    refuse(socket, 1013, "session unavailable").await;
                    return;
                }
            }
            tokio::sync::watch::channel(Some(handle)).1
        }
        None => {
            if shared.cfg.pool.prestart_agents
                && !await_prepared(&shared, &task_id, &mut socket).await
            {
                return;
            }
            match shared.pool.register(&task_id, generation, tx) {
                Ok(route) => route,
                Err(reason) => {
                    tracing::warn!(event = "runner_rejected", taskId = %task_id, reason = %reason, "warm runner not accepted");
                    refuse(socket, 4409, &reason).await;
                    return;
                }
            }
        }
    };
    tracing::info!(event = "runner_connected", taskId = %task_id, runner_version = %runner_version, protocol, "runner attached");
    crate::metrics::runners(1.0);
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            incoming = tokio::time::timeout(RUNNER_SILENCE, stream.next()) => {
                let text = match incoming {
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(Message::Close(_)))) | Ok(None) => break,
                    Ok(Some(Ok(_))) => continue,
                    Ok(Some(Err(e))) => {
                        tracing::warn!(event = "runner_socket_error", taskId = %task_id, error = %e, "runner socket failed");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(event = "runner_silent", taskId = %task_id, "runner silent too long; dropping its socket");
                        break;
                    }
                };
                let frame = match RunnerToGateway::decode(&text) {
                    Ok(frame) => frame,
                    Err(e) => {
                        tracing::warn!(event = "runner_bad_frame", taskId = %task_id, error = %e, "ignoring undecodable runner frame");
                        continue;
                    }
                };
                // Unclaimed warm runners only send heartbeats; nothing to route.
                let target = route.borrow().clone();
                let Some(handle) = target else { continue };
                if !handle.send(SessionCmd::RunnerFrame { task_id: task_id.clone(), generation, frame }).await {
                    break;
                }
            }
            out = rx.recv() => {
                let Some(frame) = out else { break };
                // Frames queued behind it (`init_user` and the first
                // message, on an early dispatch) leave in one write.
                let (mut next, mut sent) = (Some(frame), Ok(()));
                while let Some(frame) = next.take() {
                    let json = serde_json::to_string(&frame).expect("gateway frame serialises");
                    sent = sink.feed(Message::Text(json.into())).await;
                    if sent.is_ok() {
                        next = rx.try_recv().ok();
                    }
                }
                if sent.is_err() || sink.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    crate::metrics::runners(-1.0);
    let target = route.borrow_and_update().clone();
    match target {
        Some(handle) => {
            handle
                .send(SessionCmd::RunnerDisconnected {
                    task_id,
                    generation,
                })
                .await;
        }
        None => shared.pool.disconnected(&task_id, generation),
    }
}

/// Send `prepare` to a new warm runner and wait for its `prepared`, so the
/// pool counts the task ready only once its agent is up (or known to start
/// at claim). False when the socket closed meanwhile.
async fn await_prepared(shared: &Shared, task_id: &str, socket: &mut WebSocket) -> bool {
    let prepare = GatewayToRunner::Prepare {
        settings: shared.runner_settings(),
    };
    let json = serde_json::to_string(&prepare).expect("gateway frame serialises");
    if socket.send(Message::Text(json.into())).await.is_err() {
        return false;
    }
    let deadline = tokio::time::Instant::now() + PREPARE_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => {
                // An older runner ignores `prepare`: register it anyway.
                tracing::warn!(event = "runner_prepare_timeout", taskId = %task_id, "warm runner did not answer prepare; registering it");
                return true;
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Ok(RunnerToGateway::Prepared { prestarted }) = RunnerToGateway::decode(&t) {
                    tracing::debug!(event = "runner_prepared", taskId = %task_id, prestarted, "warm runner prepared");
                    return true;
                }
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => return false,
            Ok(Some(Ok(_))) => {}
        }
    }
}

async fn refuse(mut socket: WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason.chars().take(100).collect::<String>()),
        })))
        .await;
}
