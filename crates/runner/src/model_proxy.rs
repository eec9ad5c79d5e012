//! The agent's model endpoint: a loopback HTTP server in the runner that
//! forwards `/{provider}/{*path}` to the gateway's
//! `/internal/model/{provider}/{*path}` with this task's credential. The
//! agent authenticates with a random per-runner token, so other local
//! processes cannot borrow the gateway's API keys, and the keys themselves
//! never reach the sandbox.
//!
//! The agent reaches it over loopback, so it needs the sandbox's network
//! (the default); with `network = false` the agent has no model access.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

struct ProxyState {
    gateway_http: String,
    credential: String,
    token: String,
    session_id: Mutex<String>,
    http: reqwest::Client,
}

/// A running proxy; dropped with the runner.
pub struct ModelProxy {
    port: u16,
    state: Arc<ProxyState>,
    app: Router,
}

impl ModelProxy {
    /// Listen on 127.0.0.1 (a free port). `gateway_url` is the runner's
    /// `ws(s)://` base URL.
    pub async fn start(gateway_url: &str, credential: &str) -> std::io::Result<Self> {
        let gateway_http = if let Some(rest) = gateway_url.strip_prefix("wss://") {
            format!("https://{rest}")
        } else if let Some(rest) = gateway_url.strip_prefix("ws://") {
            format!("http://{rest}")
        } else {
            gateway_url.to_string()
        };
        let token: [u8; 24] = rand::random();
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        let http = reqwest::Client::builder()
            .build()
            .map_err(std::io::Error::other)?;
        let state = Arc::new(ProxyState {
            gateway_http: gateway_http.trim_end_matches('/').to_string(),
            credential: credential.to_string(),
            token: format!("aishell-proxy-{token}"),
            session_id: Mutex::new(String::new()),
            http,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let app = Router::new()
            .route("/{provider}/{*path}", any(forward))
            .with_state(state.clone());
        let proxy = ModelProxy { port, state, app };
        proxy.serve_on(listener);
        Ok(proxy)
    }

    /// Serve on another listener too (a sandbox's own loopback, see
    /// `crate::netns`); the task ends when aborted.
    pub fn serve_on(&self, listener: tokio::net::TcpListener) -> tokio::task::AbortHandle {
        let app = self.app.clone();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(event = "model_proxy_failed", error = %e, "agent model proxy stopped");
            }
        })
        .abort_handle()
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Name the session requests are made for (logged by the gateway).
    pub fn set_session(&self, session_id: &str) {
        *self.state.session_id.lock().expect("session id") = session_id.to_string();
    }

    /// Environment that points the agent's model clients here. The first
    /// OpenAI-style provider serves the built-in `llm` agent (and the
    /// `OPENAI_*` variables of other tools); `anthropic` serves Claude Code.
    pub fn agent_env(&self, providers: &[String]) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let base = |p: &str| format!("http://127.0.0.1:{}/{p}", self.port);
        let token = &self.state.token;
        if providers.iter().any(|p| p == "anthropic") {
            env.insert("ANTHROPIC_BASE_URL".into(), base("anthropic"));
            env.insert("ANTHROPIC_API_KEY".into(), token.clone());
        }
        if let Some(p) = providers.iter().find(|p| *p != "anthropic") {
            for (url, key) in [
                ("AISHELL_LLM_BASE_URL", "AISHELL_LLM_API_KEY"),
                ("OPENAI_BASE_URL", "OPENAI_API_KEY"),
            ] {
                env.insert(url.into(), base(p));
                env.insert(key.into(), token.clone());
            }
        }
        env
    }
}

/// The agent's token, from `Authorization: Bearer` or `x-api-key`.
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .map(str::trim)
}

/// Constant-time: how long the check takes says nothing about how much of
/// the token a guess got right.
fn token_matches(presented: Option<&str>, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(token.as_bytes())))
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        axum::Json(aishell_protocol::runner::model_error_body(code, &message)),
    )
        .into_response()
}

async fn forward(
    State(state): State<Arc<ProxyState>>,
    Path((provider, path)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !token_matches(presented_token(&headers), &state.token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "this model endpoint only serves the agent of this sandbox".into(),
        );
    }
    let url = format!("{}/internal/model/{provider}/{path}", state.gateway_http);
    let mut request = state
        .http
        .post(url)
        .bearer_auth(&state.credential)
        .header(
            "x-aishell-session",
            state.session_id.lock().expect("session id").clone(),
        )
        .body(reqwest::Body::wrap_stream(body.into_data_stream()));
    for (name, value) in &headers {
        if aishell_protocol::runner::model_request_header_forwarded(name.as_str()) {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(response) => {
            let mut out = Response::builder().status(response.status().as_u16());
            for (name, value) in response.headers() {
                if aishell_protocol::runner::model_response_header_forwarded(name.as_str()) {
                    out = out.header(name, value);
                }
            }
            out.body(Body::from_stream(response.bytes_stream()))
                .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
        }
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "GATEWAY_UNREACHABLE",
            format!("the aishell gateway is not reachable: {e}"),
        ),
    }
}

#[cfg(test)]
mod token_tests {
    use super::token_matches;

    #[test]
    fn only_the_exact_token_matches() {
        let token = "aishell-proxy-0123456789abcdef";
        assert!(token_matches(Some(token), token));
        assert!(!token_matches(None, token));
        assert!(!token_matches(Some(""), token));
        assert!(!token_matches(
            Some("aishell-proxy-0123456789abcdeX"),
            token
        ));
        assert!(!token_matches(
            Some("aishell-proxy-0123456789abcdef0"),
            token
        ));
    }
}
