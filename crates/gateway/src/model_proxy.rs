//! Model proxy and API-key pool: agents call their model
//! through `/internal/model/{provider}/{*path}`, authenticated with their
//! runner's task credential; the gateway adds a real API key from the
//! provider's pool and streams the upstream answer back. Keys never enter a
//! sandbox.
//!
//! Keys are taken round-robin. One answering 429 is taken out of rotation
//! until its reset time (`retry-after` or the provider's reset headers) or the
//! configured cool-down, and the request is retried on the next key; only
//! when every key is cooling does the agent get a 429 (with `retry-after`).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use crate::Shared;

/// Largest request body forwarded (a long conversation with tool output).
const MAX_REQUEST_BYTES: usize = 32 << 20;
/// Upstream must accept the connection within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence between two reads from the upstream (reasoning models
/// can think for minutes before the first token).
const UPSTREAM_SILENCE: Duration = Duration::from_secs(600);

/// How a provider expects its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyHeader {
    /// `Authorization: Bearer <key>` (OpenAI and compatible servers).
    Bearer,
    /// `x-api-key: <key>` (Anthropic).
    XApiKey,
}

/// One upstream with its keys, from configuration.
#[derive(Clone)]
pub struct ModelProviderConfig {
    /// Path segment agents use: `openai`, `anthropic`, ...
    pub name: String,
    /// Base URL the agent's paths are appended to, e.g. `https://api.openai.com/v1`.
    pub upstream: String,
    pub keys: Vec<String>,
    pub key_header: KeyHeader,
    /// How long a rate-limited key rests when the upstream names no reset time.
    pub cooldown: Duration,
}

impl std::fmt::Debug for ModelProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelProviderConfig")
            .field("name", &self.name)
            .field("upstream", &self.upstream)
            .field("keys", &self.keys.len())
            .field("key_header", &self.key_header)
            .field("cooldown", &self.cooldown)
            .finish()
    }
}

struct KeySlot {
    secret: String,
    /// What logs and metrics call this key (never the key itself).
    label: String,
    resting_until: Mutex<Option<Instant>>,
}

struct Provider {
    cfg: ModelProviderConfig,
    keys: Vec<KeySlot>,
    next: AtomicUsize,
}

impl Provider {
    /// Keys to try for one request: every key not resting, starting with the
    /// next in rotation; each is tried at most once.
    fn rotation(&self, now: Instant) -> Vec<usize> {
        let n = self.keys.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .filter(|&i| {
                let until = *self.keys[i].resting_until.lock().expect("key slot");
                until.is_none_or(|t| t <= now)
            })
            .collect()
    }

    fn rest(&self, i: usize, for_: Duration) {
        *self.keys[i].resting_until.lock().expect("key slot") = Some(Instant::now() + for_);
    }

    /// How long until the first resting key is back.
    fn soonest_back(&self, now: Instant) -> Duration {
        self.keys
            .iter()
            .filter_map(|k| *k.resting_until.lock().expect("key slot"))
            .map(|t| t.saturating_duration_since(now))
            .min()
            .unwrap_or(self.cfg.cooldown)
    }
}

/// Every configured provider, keyed by name.
#[derive(Clone)]
pub struct ModelProxy {
    providers: Arc<Vec<Provider>>,
    http: reqwest::Client,
}

impl ModelProxy {
    pub fn new(configs: &[ModelProviderConfig]) -> anyhow::Result<Self> {
        let providers = configs
            .iter()
            .filter(|c| !c.keys.is_empty())
            .map(|c| Provider {
                keys: c
                    .keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| KeySlot {
                        secret: k.clone(),
                        label: format!("{}#{}", c.name, i + 1),
                        resting_until: Mutex::new(None),
                    })
                    .collect(),
                cfg: c.clone(),
                next: AtomicUsize::new(0),
            })
            .collect();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // A silent upstream (no headers, or a stalled stream) fails the
            // request instead of holding the agent's turn forever.
            .read_timeout(UPSTREAM_SILENCE)
            .build()?;
        Ok(ModelProxy {
            providers: Arc::new(providers),
            http,
        })
    }

    /// Names of providers with at least one key (sent to runners so they
    /// point their agents at the proxy).
    pub fn provider_names(&self) -> Vec<String> {
        self.providers.iter().map(|p| p.cfg.name.clone()).collect()
    }

    fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.cfg.name == name)
    }
}

pub fn routes() -> Router<Arc<Shared>> {
    Router::new().route("/internal/model/{provider}/{*path}", post(forward))
}

/// An error an agent can read: the provider-style JSON body plus our code.
fn refuse(status: StatusCode, code: &str, message: String) -> Response {
    crate::metrics::error(code);
    (
        status,
        axum::Json(aishell_protocol::runner::model_error_body(code, &message)),
    )
        .into_response()
}

fn forwardable(name: &HeaderName) -> bool {
    aishell_protocol::runner::model_request_header_forwarded(name.as_str())
}

async fn forward(
    State(shared): State<Arc<Shared>>,
    Path((provider_name, path)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(token) = crate::auth::bearer_token(&headers, None) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "missing task credential".into(),
        );
    };
    let claims = match shared.credentials.accept(&token) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(event = "model_proxy_refused", reason = %e, "model request refused");
            return refuse(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", e.to_string());
        }
    };
    let session_id = headers
        .get("x-aishell-session")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let Some(proxy) = shared.model_proxy.as_ref() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "MODEL_PROXY_DISABLED",
            "this gateway holds no model API keys; configure --model-api-keys".into(),
        );
    };
    let Some(provider) = proxy.provider(&provider_name) else {
        return refuse(
            StatusCode::NOT_FOUND,
            "MODEL_PROVIDER_UNKNOWN",
            format!(
                "no model provider `{provider_name}` is configured (known: {})",
                proxy.provider_names().join(", ")
            ),
        );
    };
    let body = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "MESSAGE_TOO_LARGE",
                format!("model request over {MAX_REQUEST_BYTES} bytes"),
            );
        }
    };
    let url = format!("{}/{}", provider.cfg.upstream.trim_end_matches('/'), path);
    let mut attempt_headers = reqwest::header::HeaderMap::new();
    for (name, value) in headers.iter().filter(|(n, _)| forwardable(n)) {
        attempt_headers.insert(name.clone(), value.clone());
    }
    for i in provider.rotation(Instant::now()) {
        let key = &provider.keys[i];
        let mut request = proxy
            .http
            .post(&url)
            .headers(attempt_headers.clone())
            .body(body.clone());
        request = match provider.cfg.key_header {
            KeyHeader::Bearer => request.bearer_auth(&key.secret),
            KeyHeader::XApiKey => request.header("x-api-key", &key.secret),
        };
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(event = "model_upstream_failed", provider = %provider_name, key = %key.label, taskId = %claims.task_id, sessionId = %session_id, error = %e, "model upstream unreachable");
                return refuse(
                    StatusCode::BAD_GATEWAY,
                    "MODEL_UPSTREAM_UNREACHABLE",
                    format!("cannot reach the {provider_name} model endpoint: {e}"),
                );
            }
        };
        let status = response.status();
        metrics::counter!("aishell_model_requests_total", "provider" => provider_name.clone(), "key" => key.label.clone(), "status" => status.as_u16().to_string()).increment(1);
        if status == StatusCode::TOO_MANY_REQUESTS {
            let rest = reset_after(response.headers()).unwrap_or(provider.cfg.cooldown);
            provider.rest(i, rest);
            metrics::counter!("aishell_model_key_failovers_total", "provider" => provider_name.clone()).increment(1);
            tracing::warn!(event = "model_key_rate_limited", provider = %provider_name, key = %key.label, sessionId = %session_id, taskId = %claims.task_id, rest_ms = rest.as_millis() as u64, "API key rate-limited; resting it and retrying on another");
            continue;
        }
        return relay(response);
    }
    let wait = provider.soonest_back(Instant::now());
    let mut response = refuse(
        StatusCode::TOO_MANY_REQUESTS,
        "MODEL_KEYS_EXHAUSTED",
        format!(
            "every API key of {provider_name} is rate-limited; retry in {} s",
            wait.as_secs().max(1)
        ),
    );
    if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
        response.headers_mut().insert("retry-after", v);
    }
    tracing::warn!(event = "model_keys_exhausted", provider = %provider_name, sessionId = %session_id, taskId = %claims.task_id, "no API key available");
    response
}

/// Stream the upstream answer back unchanged (status, content type, body).
fn relay(response: reqwest::Response) -> Response {
    let status = response.status();
    let mut out = Response::builder().status(status.as_u16());
    for (name, value) in response.headers() {
        if aishell_protocol::runner::model_response_header_forwarded(name.as_str()) {
            out = out.header(name, value);
        }
    }
    out.body(Body::from_stream(response.bytes_stream()))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

/// When a rate-limited key may be used again, from `retry-after` (seconds)
/// or OpenAI's `x-ratelimit-reset-requests` (`1s`, `6m0s`, `20ms`).
fn reset_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(secs) = get("retry-after").and_then(|v| v.trim().parse::<f64>().ok()) {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    get("x-ratelimit-reset-requests").and_then(parse_go_duration)
}

/// `1h2m3.5s`, `20ms`.
fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.trim().chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let value: f64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += value * unit;
        any = true;
    }
    (any && num.is_empty() && total.is_finite())
        .then(|| Duration::from_secs_f64(total.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(keys: usize) -> Provider {
        let cfg = ModelProviderConfig {
            name: "openai".into(),
            upstream: "http://127.0.0.1:1/v1".into(),
            keys: (0..keys).map(|i| format!("k{i}")).collect(),
            key_header: KeyHeader::Bearer,
            cooldown: Duration::from_secs(60),
        };
        let proxy = ModelProxy::new(&[cfg]).unwrap();
        let p = Arc::try_unwrap(proxy.providers).ok().unwrap();
        p.into_iter().next().unwrap()
    }

    #[test]
    fn rotation_spreads_and_skips_resting_keys() {
        let p = provider(3);
        let now = Instant::now();
        let firsts: Vec<usize> = (0..6).map(|_| p.rotation(now)[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        p.rest(1, Duration::from_secs(30));
        let r = p.rotation(Instant::now());
        assert!(!r.contains(&1) && r.len() == 2, "{r:?}");
        let back = p.soonest_back(Instant::now());
        assert!(back > Duration::from_secs(25) && back <= Duration::from_secs(30));
        // After the rest, the key is back.
        assert!(
            p.rotation(Instant::now() + Duration::from_secs(31))
                .contains(&1)
        );
    }

    #[test]
    fn reset_headers() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(reset_after(&h), None);
        h.insert("x-ratelimit-reset-requests", "1m30.5s".parse().unwrap());
        assert_eq!(reset_after(&h), Some(Duration::from_secs_f64(90.5)));
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(reset_after(&h), Some(Duration::from_secs(7)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_go_duration("abc"), None);
        assert_eq!(parse_go_duration("5"), None);
    }

    #[test]
    fn debug_never_shows_keys() {
        let p = provider(2);
        assert!(!format!("{:?}", p.cfg).contains("k0"));
    }
}
