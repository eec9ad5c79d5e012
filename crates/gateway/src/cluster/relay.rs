//! Gateway-to-gateway relay (docs/cluster.md): a client connected to a
//! gateway that does not own its session is piped, frame for frame, to the
//! owner's `/internal/relay/{session_id}`, which serves it as if the client
//! had connected there. The pipe understands nothing: sequence numbers,
//! replay and acknowledgements stay the owner's.
//!
//! The link is authenticated by a short-lived grant the relaying gateway
//! signs with a secret only gateways share (kept in the store): it names the
//! user (already authenticated by the relaying gateway) and the session.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::auth::Identity;

/// The header carrying the grant.
pub const RELAY_HEADER: &str = "x-aishell-relay";
/// A grant is good this long: only for opening the link.
const GRANT_TTL: Duration = Duration::from_secs(30);
/// Close code: this gateway does not (or no longer) run the session; the
/// client reconnects (through the shared address) and finds its owner.
pub const CLOSE_MOVED: u16 = 1012;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Grant {
    user_id: String,
    is_admin: bool,
    session_id: String,
    exp: u64,
}

#[derive(Clone)]
pub struct RelaySigner {
    key: Vec<u8>,
}

impl RelaySigner {
    pub fn new(key: Vec<u8>) -> Self {
        RelaySigner { key }
    }

    fn mac(&self, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac takes any key");
        mac.update(payload);
        mac
    }

    pub fn grant(&self, identity: &Identity, session_id: &str) -> String {
        let grant = Grant {
            user_id: identity.user_id.clone(),
            is_admin: identity.is_admin,
            session_id: session_id.to_string(),
            exp: now_secs() + GRANT_TTL.as_secs(),
        };
        let payload = B64.encode(serde_json::to_vec(&grant).expect("grant serialises"));
        let sig = B64.encode(self.mac(payload.as_bytes()).finalize().into_bytes());
        format!("{payload}.{sig}")
    }

    /// The identity a grant for `session_id` vouches for.
    pub fn verify(&self, token: &str, session_id: &str) -> Result<Identity, &'static str> {
        let (payload, sig) = token.split_once('.').ok_or("malformed relay grant")?;
        let sig = B64.decode(sig).map_err(|_| "malformed relay grant")?;
        self.mac(payload.as_bytes())
            .verify_slice(&sig)
            .map_err(|_| "relay grant signature is invalid")?;
        let grant: Grant = B64
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("malformed relay grant")?;
        if grant.exp <= now_secs() {
            return Err("relay grant expired");
        }
        if grant.session_id != session_id {
            return Err("relay grant names another session");
        }
        Ok(Identity {
            user_id: grant.user_id,
            is_admin: grant.is_admin,
            expires_at: None,
        })
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Why a relay could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The owner did not answer (it may be dead; its lease will expire).
    #[error("the gateway running this session did not answer: {0}")]
    Unreachable(String),
}

pub type OwnerSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Open the link to the owner at `internal_url` for `session_id`.
pub async fn open(
    internal_url: &str,
    session_id: &str,
    last_seq: Option<u64>,
    grant: &str,
) -> Result<OwnerSocket, RelayError> {
    let mut url = format!("{internal_url}/internal/relay/{session_id}");
    if let Some(n) = last_seq {
        url.push_str(&format!("?last_seq={n}"));
    }
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| RelayError::Unreachable(format!("bad owner url {url}: {e}")))?;
    request.headers_mut().insert(
        RELAY_HEADER,
        grant
            .parse()
            .map_err(|_| RelayError::Unreachable("grant is not a header value".into()))?,
    );
    let config = tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(aishell_protocol::WS_READ_BUFFER_BYTES);
    let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Err(_) => Err(RelayError::Unreachable("connect timed out".into())),
        Ok(Err(e)) => Err(RelayError::Unreachable(e.to_string())),
        Ok(Ok((socket, _))) => Ok(socket),
    }
}

/// Pipe frames both ways until either side closes. A close from the owner
/// is passed on as it is; when the owner's socket fails, the client is told
/// to reconnect ([`CLOSE_MOVED`]).
pub async fn pipe(client: crate::client_ws::Socket, owner: OwnerSocket) {
    let (mut client_tx, mut client_rx) = client;
    let (mut owner_tx, mut owner_rx) = owner.split();
    loop {
        tokio::select! {
            from_client = client_rx.next() => {
                let msg = match from_client {
                    Some(Ok(Message::Text(t))) => tungstenite::Message::Text(t.as_str().into()),
                    Some(Ok(Message::Binary(b))) => tungstenite::Message::Binary(b),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        let _ = owner_tx.send(tungstenite::Message::Close(None)).await;
                        return;
                    }
                };
                if owner_tx.send(msg).await.is_err() {
                    let _ = client_tx.send(moved("the gateway running this session went away; reconnect")).await;
                    return;
                }
            }
            from_owner = owner_rx.next() => {
                let msg = match from_owner {
                    Some(Ok(tungstenite::Message::Text(t))) => Message::Text(Utf8Bytes::from(t.as_str())),
                    Some(Ok(tungstenite::Message::Binary(b))) => Message::Binary(b),
                    Some(Ok(tungstenite::Message::Close(frame))) => {
                        let frame = frame.map(|f| CloseFrame { code: f.code.into(), reason: Utf8Bytes::from(f.reason.as_str()) });
                        let _ = client_tx.send(Message::Close(frame)).await;
                        return;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => {
                        let _ = client_tx.send(moved("the gateway running this session went away; reconnect")).await;
                        return;
                    }
                };
                if client_tx.send(msg).await.is_err() {
                    let _ = owner_tx.send(tungstenite::Message::Close(None)).await;
                    return;
                }
            }
        }
    }
}

pub fn moved(reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CLOSE_MOVED,
        reason: Utf8Bytes::from(reason),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Identity {
        Identity {
            user_id: "alice".into(),
            is_admin: false,
            expires_at: None,
        }
    }

    #[test]
    fn a_grant_vouches_for_its_user_and_session_only() {
        let signer = RelaySigner::new(vec![7; 32]);
        let grant = signer.grant(&alice(), "s-1");
        assert_eq!(signer.verify(&grant, "s-1").unwrap().user_id, "alice");
        assert!(signer.verify(&grant, "s-2").is_err());
        // Another cluster's key, and a forged payload under a valid signature.
        assert!(RelaySigner::new(vec![8; 32]).verify(&grant, "s-1").is_err());
        let (_, sig) = grant.split_once('.').unwrap();
        let forged = B64.encode(
            serde_json::to_vec(&Grant {
                user_id: "bob".into(),
                is_admin: true,
                session_id: "s-1".into(),
                exp: u64::MAX,
            })
            .unwrap(),
        );
        assert!(signer.verify(&format!("{forged}.{sig}"), "s-1").is_err());
    }
}
