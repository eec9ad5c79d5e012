//! `GET /ws`: one client connection (docs/protocol/client.md). Authenticates before the
//! upgrade, attaches to a session actor, then relays frames both ways.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU64;
use std::sync::Arc;

use aishell_protocol::{ClientFrame, ErrorCode, ServerEvent, ServerFrame};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};

use crate::Shared;
use crate::auth::{self, Identity};
use crate::session::{Found, Lagging, Outbound, SessionCmd, SessionHandle, SessionManager};

/// Close code for a frame over the size limit (RFC 6455 "message too big").
const CLOSE_TOO_BIG: u16 = 1009;
/// Close codes for session-level refusals (4000–4999 are application codes).
const CLOSE_UNAUTHORIZED: u16 = 4401;
/// Also for another user's session: a probe must not learn that it exists.
const CLOSE_NOT_FOUND: u16 = 4404;
const CLOSE_TOO_SLOW: u16 = 4408;

/// Longest a new connection waits for the store to check its token. An
/// unreachable database is otherwise retried until the store's pool gives
/// up (10 s), and the client sees a hang instead of an error it can act on
/// (docs/cluster.md, "What a failure looks like to a user").
const STORE_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A client connection's WebSocket read buffer, allocated at the upgrade
/// and held for the connection's life, idle or not. Client frames are a few
/// hundred bytes; a larger one gets its whole length reserved when its
/// header arrives and is read in 1 KiB steps. Smaller than the other ends'
/// `WS_READ_BUFFER_BYTES` because idle clients are many.
const CLIENT_READ_BUFFER_BYTES: usize = 1024;

pub async fn handler(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let token = auth::bearer_token(&headers, query.get("token").map(String::as_str));
    let checked = tokio::time::timeout(
        STORE_ANSWER_WAIT,
        shared
            .auth
            .authenticate(shared.store.as_ref(), token.as_deref()),
    )
    .await;
    let identity = match checked {
        Err(_) => {
            tracing::error!(
                event = "auth_store_timeout",
                waitedMs = STORE_ANSWER_WAIT.as_millis() as u64,
                "token store did not answer"
            );
            crate::metrics::error(ErrorCode::Internal.as_str());
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Internal,
                "the gateway cannot check tokens right now (its database does not answer); try again",
            );
        }
        Ok(Ok(id)) => id,
        Ok(Err(auth::AuthError::Store(e))) => {
            tracing::error!(event = "auth_store_error", error = %e, "token store unavailable");
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Internal,
                "the gateway cannot check tokens right now; try again",
            );
        }
        Ok(Err(e)) => {
            tracing::warn!(event = "auth_failed", reason = %e, "client refused");
            crate::metrics::error(ErrorCode::Unauthorized.as_str());
            return error_response(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                &e.to_string(),
            );
        }
    };
    let session_id = query.get("session_id").cloned().filter(|s| !s.is_empty());
    let last_seq = match query.get("last_seq").map(|s| s.parse::<u64>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadFrame,
                "last_seq must be a non-negative integer",
            );
        }
    };
    let Some(slot) = ConnectionSlot::take(&shared, &identity.user_id) else {
        tracing::warn!(event = "too_many_connections", userId = %identity.user_id, "connection refused: per-user limit");
        crate::metrics::error(ErrorCode::Overloaded.as_str());
        let msg = format!(
            "too many open connections for this user (limit {}); close some and retry",
            shared.cfg.max_connections_per_user
        );
        return error_response(StatusCode::TOO_MANY_REQUESTS, ErrorCode::Overloaded, &msg);
    };
    let max = shared.cfg.max_frame_bytes;
    // Frames between the limit and this hard cap are read, then refused with
    // 1009 by us; beyond it the socket library itself gives up.
    let hard_cap = max.saturating_mul(2).max(max + 1024);
    ws.max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        .read_buffer_size(CLIENT_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            spawn_connection(
                shared,
                identity,
                session_id,
                last_seq,
                socket,
                Via::Client,
                Some(slot),
            );
            std::future::ready(())
        })
}

/// `GET /internal/relay/{session_id}`: a client relayed by another gateway
/// of several (docs/cluster.md); its grant names the user and the session.
pub async fn relayed(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(session_id): axum::extract::Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(cluster) = shared.cluster.clone() else {
        return error_response(
            StatusCode::NOT_FOUND,
            ErrorCode::SessionNotFound,
            "this gateway is not one of several",
        );
    };
    let grant = headers
        .get(crate::cluster::relay::RELAY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let identity = match cluster.relay_signer().verify(grant, &session_id) {
        Ok(identity) => identity,
        Err(why) => {
            tracing::warn!(event = "relay_refused", sessionId = %session_id, reason = why, "relayed client refused");
            return error_response(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, why);
        }
    };
    let last_seq = query.get("last_seq").and_then(|s| s.parse::<u64>().ok());
    let max = shared.cfg.max_frame_bytes;
    let hard_cap = max.saturating_mul(2).max(max + 1024);
    ws.max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        .read_buffer_size(CLIENT_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            spawn_connection(
                shared,
                identity,
                Some(session_id),
                last_seq,
                socket,
                Via::Relay,
                None,
            );
            std::future::ready(())
        })
}

/// How a client reached this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Client,
    /// Relayed by another gateway: never relayed on again.
    Relay,
}

fn error_response(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "code": code.as_str(), "message": message } });
    (status, axum::Json(body)).into_response()
}

/// Run a client connection in a task of its own, not in axum's upgrade
/// task, which would keep its own state (the socket as it was built, its
/// configuration, our callback) beside ours for the connection's whole
/// life. The socket is split here, outside any future, so that no future
/// keeps a copy of it (several hundred bytes each): its halves share one
/// allocation.
fn spawn_connection(
    shared: Arc<Shared>,
    identity: Identity,
    session_id: Option<String>,
    last_seq: Option<u64>,
    socket: WebSocket,
    via: Via,
    slot: Option<ConnectionSlot>,
) {
    let socket = socket.split();
    tokio::spawn(connection(
        shared, identity, session_id, last_seq, socket, via, slot,
    ));
}

/// `slot`: the user's connection count, held until the connection ends.
///
/// This and [`serve`] return async blocks, not async fns: an async fn keeps
/// its arguments twice (as given and as bound in its body), and these
/// futures last as long as the connection.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn connection(
    shared: Arc<Shared>,
    identity: Identity,
    session_id: Option<String>,
    last_seq: Option<u64>,
    socket: Socket,
    via: Via,
    slot: Option<ConnectionSlot>,
) -> impl Future<Output = ()> + Send {
    async move {
        let conn_id = shared.next_id();
        // Finding the session (creating it, waiting for an owner, relaying
        // elsewhere) takes futures several KiB large that are over before
        // the client goes idle: boxed, they are not part of every
        // connection's task for its whole life.
        let found = Box::pin(find_session(
            &shared, &identity, session_id, last_seq, socket, via, conn_id,
        ))
        .await;
        if let Some((socket, attached)) = found {
            serve(shared, identity, socket, attached, conn_id).await;
        }
        drop(slot);
    }
}

/// Attach the connection to its session: the socket and the attachment,
/// or `None` when the connection was refused, closed or relayed (and is
/// over).
async fn find_session(
    shared: &Arc<Shared>,
    identity: &Identity,
    session_id: Option<String>,
    last_seq: Option<u64>,
    mut socket: Socket,
    via: Via,
    conn_id: u64,
) -> Option<(Socket, Attached)> {
    // One of several gateways: a session another one runs is relayed there;
    // one whose owner does not answer is taken over once its lease expires.
    let give_up = tokio::time::Instant::now()
        + shared
            .cluster
            .as_ref()
            .map(|c| c.cfg.lease_ttl + std::time::Duration::from_secs(2))
            .unwrap_or_default();
    let attached = loop {
        match attach(shared, identity, session_id.as_deref(), conn_id, last_seq).await {
            Ok(Attachment::Here(a)) => break Ok(a),
            Err(e) => break Err(e),
            Ok(Attachment::Elsewhere(owner)) => {
                let sid = session_id.clone().unwrap_or_default();
                if via == Via::Relay {
                    let _ = socket
                        .0
                        .send(crate::cluster::relay::moved(
                            "this gateway does not run the session; reconnect",
                        ))
                        .await;
                    return None;
                }
                if let Some(url) = owner_url(&owner) {
                    let cluster = shared.cluster.as_ref().expect("only a cluster relays");
                    let grant = cluster.relay_signer().grant(identity, &sid);
                    match crate::cluster::relay::open(&url, &sid, last_seq, &grant).await {
                        Ok(link) => {
                            tracing::info!(event = "relay_open", sessionId = %sid, owner = %url, "client relayed to the session's gateway");
                            crate::cluster::relay::pipe(socket, link).await;
                            return None;
                        }
                        Err(e) => {
                            tracing::warn!(event = "relay_failed", sessionId = %sid, owner = %url, error = %e, "the session's gateway did not answer; waiting for its lease to expire");
                        }
                    }
                }
                if tokio::time::Instant::now() >= give_up {
                    break Err((
                        ErrorCode::Internal,
                        crate::cluster::relay::CLOSE_MOVED,
                        "the gateway running this session does not answer; reconnect".to_string(),
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
    };
    let attached = match attached {
        Ok(a) => a,
        Err((code, close, message)) => {
            crate::metrics::error(code.as_str());
            // Echo the requested id only when it has a session id's shape.
            let sid = session_id
                .filter(|s| auth::validate_conversation_id(s))
                .unwrap_or_default();
            let frame = ServerFrame {
                seq: 0,
                session_id: sid,
                ephemeral: true,
                event: ServerEvent::error(code, message.clone()),
            };
            let _ = socket.0.send(Message::Text(frame.to_json().into())).await;
            let _ = socket
                .0
                .send(Message::Close(Some(CloseFrame {
                    code: close,
                    reason: Utf8Bytes::from(message.chars().take(100).collect::<String>()),
                })))
                .await;
            return None;
        }
    };
    Some((socket, attached))
}

/// Relay frames between an attached client and its session until either ends.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn serve(
    shared: Arc<Shared>,
    mut identity: Identity,
    socket: Socket,
    attached: Attached,
    conn_id: u64,
) -> impl Future<Output = ()> + Send {
    async move {
        let (handle, frames, mut rx, lagging) = attached;
        crate::metrics::clients(1.0);
        tracing::info!(event = "ws_connect", sessionId = %handle.id, userId = %identity.user_id, connId = conn_id, "client connected");
        let (mut sink, mut stream) = socket;
        let mut reason = String::from("client closed");
        // Highest stream seq written to this client (for catch-up).
        let mut sent_seq = 0;
        // Consumed, not drained: an emptied Vec would keep its buffer for the
        // connection's life.
        for (seq, json) in frames {
            sent_seq = seq.unwrap_or(sent_seq);
            if sink
                .send(Message::Text(Utf8Bytes::from(&*json)))
                .await
                .is_err()
            {
                handle
                    .send(SessionCmd::Detach {
                        conn_id,
                        reason: "send failed during replay".into(),
                    })
                    .await;
                return;
            }
        }
        let max = shared.cfg.max_frame_bytes;
        let mut bucket = TokenBucket::new(shared.cfg.messages_per_second);
        loop {
            let expires = identity.expires_at;
            tokio::select! {
                _ = lagging.notify.notified() => {
                    // Boxed: rare, and its future would otherwise size every idle connection's task.
                    if !Box::pin(catch_up(&handle, conn_id, &lagging, &mut rx, &mut sink, &mut sent_seq)).await {
                        reason = "send failed during catch-up".into();
                        break;
                    }
                }
                _ = sleep_until_system(expires) => {
                    // The credential lapsed without an `update_token`.
                    let frame = ServerFrame { seq: 0, session_id: handle.id.clone(), ephemeral: true, event: ServerEvent::error(ErrorCode::Unauthorized, "your token expired; reconnect with a new one") };
                    let _ = sink.send(Message::Text(frame.to_json().into())).await;
                    let _ = sink.send(close(CLOSE_UNAUTHORIZED, "token expired")).await;
                    reason = "token expired".into();
                    break;
                }
                incoming = stream.next() => {
                    let msg = match incoming {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            reason = format!("socket error: {e}");
                            if e.to_string().to_lowercase().contains("space limit") || e.to_string().contains("too long") {
                                let _ = sink.send(close(CLOSE_TOO_BIG, "frame too large")).await;
                                reason = "frame too large".into();
                            }
                            break;
                        }
                        None => break,
                    };
                    let text = match msg {
                        Message::Text(t) => t,
                        Message::Binary(b) if b.len() > max => {
                            let _ = sink.send(close(CLOSE_TOO_BIG, "frame too large")).await;
                            reason = "frame too large".into();
                            break;
                        }
                        Message::Binary(_) => {
                            let event = ServerEvent::error(ErrorCode::BadFrame, "binary frames are not supported; send JSON text frames");
                            handle.send(SessionCmd::Reply { conn_id, event }).await;
                            continue;
                        }
                        Message::Close(_) => break,
                        Message::Ping(_) | Message::Pong(_) => continue,
                    };
                    if text.len() > max {
                        let _ = sink.send(close(CLOSE_TOO_BIG, &format!("frame of {} bytes exceeds the {max}-byte limit", text.len()))).await;
                        reason = "frame too large".into();
                        break;
                    }
                    let reply = |event| SessionCmd::Reply { conn_id, event };
                    let cmd = if !bucket.take() {
                        let message = format!("too many frames: at most {} per second; this one was not accepted, send it again", shared.cfg.messages_per_second);
                        reply(ServerEvent::error(ErrorCode::Overloaded, message))
                    } else {
                        match ClientFrame::decode(&text) {
                            Ok(frame) if let Some(why) = frame.oversized_field() => {
                                reply(ServerEvent::error(ErrorCode::BadFrame, format!("{why}; this frame was not accepted")))
                            }
                            // Boxed like catch-up: a rare frame with a large future.
                            Ok(ClientFrame::UpdateToken { token }) => match Box::pin(shared.auth.authenticate(shared.store.as_ref(), Some(&token))).await {
                                Ok(new) if new.user_id == identity.user_id => {
                                    identity = new;
                                    reply(ServerEvent::Agent(aishell_protocol::AgentEvent::Info { message: "token updated".into() }))
                                }
                                Ok(_) => reply(ServerEvent::error(ErrorCode::Forbidden, "update_token: the new token belongs to another user")),
                                Err(e) => reply(ServerEvent::error(ErrorCode::Unauthorized, format!("update_token: {e}"))),
                            },
                            Ok(frame) => SessionCmd::Client { conn_id, frame },
                            Err(e) => reply(ServerEvent::error(ErrorCode::BadFrame, e.to_string())),
                        }
                    };
                    if !handle.send(cmd).await {
                        reason = "session ended".into();
                        break;
                    }
                }
                out = rx.recv() => match out {
                    Some(first) => {
                        // Frames already queued behind it leave in the same
                        // write (a session's start-up events usually come as a
                        // batch): one syscall and one wake-up of the client.
                        let (mut next, mut sent, mut closing) = (Some(first), Ok(()), None);
                        while let Some(out) = next.take() {
                            match out {
                                Outbound::Frame(seq, json) => {
                                    sent_seq = seq.map_or(sent_seq, NonZeroU64::get);
                                    sent = sink.feed(Message::Text(Utf8Bytes::from(&*json))).await;
                                    if sent.is_ok() {
                                        next = rx.try_recv().ok();
                                    }
                                }
                                Outbound::Close(close) => closing = Some(*close),
                            }
                        }
                        if sent.is_err() || sink.flush().await.is_err() {
                            reason = "send failed".into();
                            break;
                        }
                        if let Some((code, why)) = closing {
                            let _ = sink.send(close(code, &why)).await;
                            reason = why;
                            break;
                        }
                    }
                    None => {
                        let _ = sink.send(close(CLOSE_TOO_SLOW, "client too slow; reconnect with last_seq")).await;
                        reason = "client too slow".into();
                        break;
                    }
                }
            }
        }
        handle.send(SessionCmd::Detach { conn_id, reason }).await;
        crate::metrics::clients(-1.0);
    }
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.chars().take(100).collect::<String>()),
    }))
}

type Attached = (
    SessionHandle,
    Vec<(Option<u64>, Arc<str>)>,
    tokio::sync::mpsc::Receiver<Outbound>,
    Arc<Lagging>,
);

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;
/// A client's socket, split once as the connection starts.
pub(crate) type Socket = (Sink, futures_util::stream::SplitStream<WebSocket>);

/// The client fell behind: write what is queued, then pull missed events
/// from the session in batches until it reaches the live stream again.
async fn catch_up(
    handle: &SessionHandle,
    conn_id: u64,
    lagging: &Lagging,
    rx: &mut tokio::sync::mpsc::Receiver<Outbound>,
    sink: &mut Sink,
    sent_seq: &mut u64,
) -> bool {
    if !lagging.flag.load(std::sync::atomic::Ordering::Acquire) {
        return true;
    }
    while let Ok(out) = rx.try_recv() {
        if let Outbound::Frame(seq, json) = out {
            *sent_seq = seq.map_or(*sent_seq, NonZeroU64::get);
            if sink
                .send(Message::Text(Utf8Bytes::from(&*json)))
                .await
                .is_err()
            {
                return false;
            }
        }
    }
    loop {
        let after = *sent_seq;
        let Some(batch) = handle
            .request(|reply| SessionCmd::CatchUp {
                conn_id,
                after,
                reply,
            })
            .await
        else {
            return false;
        };
        for (seq, json) in batch.frames {
            *sent_seq = seq;
            if sink
                .send(Message::Text(Utf8Bytes::from(&*json)))
                .await
                .is_err()
            {
                return false;
            }
        }
        if batch.caught_up {
            return true;
        }
    }
}

fn owner_url(owner: &crate::cluster::Owner) -> Option<String> {
    match owner {
        crate::cluster::Owner::Elsewhere { internal_url, .. } => internal_url.clone(),
        crate::cluster::Owner::Here { .. } => None,
    }
}

enum Attachment {
    Here(Attached),
    /// Another gateway of several runs it.
    Elsewhere(crate::cluster::Owner),
}

/// Find or create the session and attach to it (with replay).
async fn attach(
    shared: &Arc<Shared>,
    identity: &Identity,
    session_id: Option<&str>,
    conn_id: u64,
    last_seq: Option<u64>,
) -> Result<Attachment, (ErrorCode, u16, String)> {
    let internal = |e: aishell_store::StoreError| {
        (
            ErrorCode::Internal,
            1011,
            format!("the session store failed: {e}"),
        )
    };
    // The same answer whether the session does not exist or is another
    // user's, so a probe cannot tell which.
    let not_found = || {
        (
            ErrorCode::SessionNotFound,
            CLOSE_NOT_FOUND,
            "session not found".to_string(),
        )
    };
    // An actor may leave memory between lookup and attach; retry with a fresh one.
    for _ in 0..3 {
        let handle = match session_id {
            None => SessionManager::create(shared, &identity.user_id)
                .await
                .map_err(internal)?,
            // Session ids have a conversation id's shape.
            Some(id) if !auth::validate_conversation_id(id) => return Err(not_found()),
            Some(id) => match SessionManager::open(shared, id).await.map_err(internal)? {
                Some(Found::Here(h)) => h,
                Some(Found::Elsewhere(owner)) => return Ok(Attachment::Elsewhere(owner)),
                None => return Err(not_found()),
            },
        };
        if handle.user_id != identity.user_id && !identity.is_admin {
            tracing::warn!(event = "forbidden", sessionId = %handle.id, userId = %identity.user_id, "user tried to open another user's session");
            return Err(not_found());
        }
        if let Some(reply) = handle
            .request(|reply| SessionCmd::Attach {
                conn_id,
                last_seq,
                reply,
            })
            .await
        {
            return Ok(Attachment::Here((
                handle,
                reply.frames,
                reply.rx,
                reply.lagging,
            )));
        }
    }
    Err((
        ErrorCode::Internal,
        1011,
        "could not attach to the session; try again".into(),
    ))
}

/// Counts a user's open connections; released on drop.
struct ConnectionSlot {
    shared: Arc<Shared>,
    user_id: String,
}

impl ConnectionSlot {
    fn take(shared: &Arc<Shared>, user_id: &str) -> Option<Self> {
        let mut open = shared.connections.lock().expect("connection counts");
        let n = open.entry(user_id.to_string()).or_default();
        if *n >= shared.cfg.max_connections_per_user {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            shared: shared.clone(),
            user_id: user_id.to_string(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.shared.connections.lock().expect("connection counts");
        if let Some(n) = open.get_mut(&self.user_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user_id);
            }
        }
    }
}

/// Frames per second per connection, with a burst of twice the rate.
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl TokenBucket {
    fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        TokenBucket {
            rate,
            tokens: rate * 2.0,
            last: std::time::Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate * 2.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

async fn sleep_until_system(at: Option<std::time::SystemTime>) {
    match at {
        Some(at) => {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(left).await
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::TokenBucket;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut b = TokenBucket::new(10);
        let burst = (0..100).take_while(|_| b.take()).count();
        assert_eq!(burst, 20);
        std::thread::sleep(std::time::Duration::from_millis(210));
        let refilled = (0..100).take_while(|_| b.take()).count();
        assert!((2..=3).contains(&refilled), "{refilled}");
    }
}
