//! One streamed Chat Completions call, with bounded retries.
//!
//! * HTTP 429, 5xx and connection failures: up to [`MAX_TRIES`] tries in all,
//!   waiting `retry-after-ms` / `retry-after` (seconds) when the server sends
//!   one (more than [`MAX_RETRY_AFTER`] → give up at once), else 0.5 s, 1 s.
//!   Other statuses fail at once. The error names the status and an excerpt
//!   of the body.
//! * A stream that ends (or stalls for [`IDLE_TIMEOUT`]) before `[DONE]` or a
//!   `finish_reason`: the request is sent once more (an `info` frame says
//!   so; text already streamed is streamed again), then it is an error.
//! * `abort` drops the connection at once, whatever the call is doing.
//! * A server that answers `application/json` instead of a stream is read
//!   as one whole response.

use std::time::Duration;

use aishell_protocol::agent::AgentEvent;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap};
use serde_json::Value;

use super::sse::{Accumulator, Delta, SseDecoder, excerpt};
use crate::wire::{AbortSignal, Turn};

pub(crate) const MAX_TRIES: u32 = 3;
const MAX_CUT_RETRIES: u32 = 1;
const BACKOFF_BASE: Duration = Duration::from_millis(500);
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_ERROR_BODY: usize = 64 * 1024;
const ERROR_EXCERPT_CHARS: usize = 500;

/// Why a call produced no message.
#[derive(Debug)]
pub(crate) enum Failure {
    /// `abort`; carries the text streamed so far.
    Aborted(String),
    Error(String),
}

enum StreamError {
    Aborted(String),
    /// The server reported an error inside the stream.
    Server(String),
    Cut(String),
}

pub(crate) struct Client {
    http: reqwest::Client,
}

impl Client {
    pub(crate) fn new() -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("aishell-llm-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client { http })
    }

    /// POST `body` to `url` and stream the answer, emitting `text_delta` and
    /// `thinking` frames on `turn`.
    pub(crate) async fn complete(
        &self,
        url: &str,
        api_key: Option<&str>,
        body: &Value,
        signal: &mut AbortSignal,
        turn: &Turn,
    ) -> Result<Accumulator, Failure> {
        let body = serde_json::to_vec(body).map_err(|e| Failure::Error(e.to_string()))?;
        let mut tries = 0u32;
        let mut cuts = 0u32;
        loop {
            tries += 1;
            let mut request = self
                .http
                .post(url)
                .header(CONTENT_TYPE, "application/json")
                .header(ACCEPT, "text/event-stream")
                .body(body.clone());
            if let Some(key) = api_key {
                request = request.header(AUTHORIZATION, format!("Bearer {key}"));
            }
            let response = tokio::select! {
                biased;
                _ = signal.aborted() => return Err(Failure::Aborted(String::new())),
                r = request.send() => r,
            };
            let response = match response {
                Ok(r) => r,
                Err(e) => {
                    let message =
                        format!("cannot reach the model endpoint {url}: {}", error_chain(&e));
                    if tries < MAX_TRIES {
                        eprintln!("llm agent: {message}; retrying (try {tries} of {MAX_TRIES})");
                        wait(backoff(tries), signal).await?;
                        continue;
                    }
                    return Err(Failure::Error(format!("{message} (after {tries} tries)")));
                }
            };
            let status = response.status();
            if !status.is_success() {
                let retry_after = retry_after(response.headers());
                let text = read_error_body(response, signal).await?;
                let retryable = status.as_u16() == 429 || status.is_server_error();
                let describe = |tries: u32| {
                    let tries = if tries > 1 {
                        format!(" (after {tries} tries)")
                    } else {
                        String::new()
                    };
                    format!(
                        "the model endpoint answered HTTP {}{tries}: {}",
                        status,
                        excerpt(&text, ERROR_EXCERPT_CHARS)
                    )
                };
                if retryable && tries < MAX_TRIES {
                    let delay = retry_after.unwrap_or_else(|| backoff(tries));
                    if delay > MAX_RETRY_AFTER {
                        return Err(Failure::Error(format!(
                            "{}; it asks to retry after {} s, which is too long to wait",
                            describe(tries),
                            delay.as_secs()
                        )));
                    }
                    eprintln!(
                        "llm agent: {}; retrying in {:.1} s (try {tries} of {MAX_TRIES})",
                        describe(tries),
                        delay.as_secs_f64()
                    );
                    wait(delay, signal).await?;
                    continue;
                }
                return Err(Failure::Error(describe(tries)));
            }
            match read_stream(response, signal, turn).await {
                Ok(acc) => return Ok(acc),
                Err(StreamError::Aborted(partial)) => return Err(Failure::Aborted(partial)),
                Err(StreamError::Server(message)) => {
                    return Err(Failure::Error(format!(
                        "the model endpoint reported an error in its stream: {}",
                        excerpt(&message, ERROR_EXCERPT_CHARS)
                    )));
                }
                Err(StreamError::Cut(reason)) => {
                    if cuts < MAX_CUT_RETRIES {
                        cuts += 1;
                        tries = 0;
                        let message =
                            format!("the model's response stream was cut ({reason}); retrying");
                        eprintln!("llm agent: {message}");
                        turn.send(AgentEvent::Info { message }).await;
                        continue;
                    }
                    return Err(Failure::Error(format!(
                        "the model's response stream was cut again ({reason}); giving up"
                    )));
                }
            }
        }
    }
}

/// The error and its sources, so "error sending request" says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn backoff(tries: u32) -> Duration {
    BACKOFF_BASE * 2u32.saturating_pow(tries.saturating_sub(1))
}

/// Sleep, unless aborted first.
async fn wait(delay: Duration, signal: &mut AbortSignal) -> Result<(), Failure> {
    tokio::select! {
        biased;
        _ = signal.aborted() => Err(Failure::Aborted(String::new())),
        _ = tokio::time::sleep(delay) => Ok(()),
    }
}

/// `retry-after-ms`, else `retry-after` in (possibly fractional) seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let v = headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()?;
        (v.is_finite() && v >= 0.0).then_some(v)
    };
    if let Some(ms) = number("retry-after-ms") {
        return Some(Duration::from_secs_f64((ms / 1000.0).min(1e6)));
    }
    number("retry-after").map(|s| Duration::from_secs_f64(s.min(1e6)))
}

async fn read_error_body(
    mut response: reqwest::Response,
    signal: &mut AbortSignal,
) -> Result<String, Failure> {
    let mut body = Vec::new();
    let read = async {
        while body.len() < MAX_ERROR_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
    };
    tokio::select! {
        biased;
        _ = signal.aborted() => return Err(Failure::Aborted(String::new())),
        _ = tokio::time::timeout(Duration::from_secs(10), read) => {}
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Emits `thinking` once the model's reasoning is over.
struct Thinking {
    pending: String,
}

impl Thinking {
    async fn flush(&mut self, turn: &Turn) {
        if self.pending.is_empty() {
            return;
        }
        let content = std::mem::take(&mut self.pending);
        turn.send(AgentEvent::Thinking {
            conversation_id: Some(turn.conversation_id().to_string()),
            content: Some(content),
        })
        .await;
    }
}

async fn emit(deltas: Vec<Delta>, thinking: &mut Thinking, turn: &Turn) {
    for d in deltas {
        match d {
            Delta::Reasoning(r) => thinking.pending.push_str(&r),
            Delta::Text(delta) => {
                thinking.flush(turn).await;
                turn.send(AgentEvent::TextDelta {
                    conversation_id: turn.conversation_id().to_string(),
                    delta,
                })
                .await;
            }
        }
    }
}

async fn read_stream(
    mut response: reqwest::Response,
    signal: &mut AbortSignal,
    turn: &Turn,
) -> Result<Accumulator, StreamError> {
    let mut acc = Accumulator::default();
    let mut thinking = Thinking {
        pending: String::new(),
    };
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    if is_json {
        let text = tokio::select! {
            biased;
            _ = signal.aborted() => return Err(StreamError::Aborted(String::new())),
            r = tokio::time::timeout(IDLE_TIMEOUT, response.text()) => match r {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return Err(StreamError::Cut(error_chain(&e))),
                Err(_) => return Err(StreamError::Cut("no answer in time".to_string())),
            },
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            StreamError::Server(format!(
                "undecodable response ({e}): {}",
                excerpt(&text, 200)
            ))
        })?;
        acc.whole(&v).map_err(StreamError::Server)?;
        let mut deltas = Vec::new();
        if !acc.reasoning.is_empty() {
            deltas.push(Delta::Reasoning(acc.reasoning.clone()));
        }
        if !acc.content.is_empty() {
            deltas.push(Delta::Text(acc.content.clone()));
        }
        emit(deltas, &mut thinking, turn).await;
        thinking.flush(turn).await;
        return Ok(acc);
    }

    let mut decoder = SseDecoder::default();
    loop {
        let next = tokio::select! {
            biased;
            _ = signal.aborted() => return Err(StreamError::Aborted(acc.content)),
            r = tokio::time::timeout(IDLE_TIMEOUT, response.chunk()) => r,
        };
        let bytes = match next {
            Err(_) => {
                return Err(StreamError::Cut(format!(
                    "no data for {} s",
                    IDLE_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(e)) => return Err(StreamError::Cut(error_chain(&e))),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(bytes))) => bytes,
        };
        for payload in decoder.push(&bytes) {
            let deltas = acc.handle(&payload).map_err(StreamError::Server)?;
            emit(deltas, &mut thinking, turn).await;
        }
        if acc.done {
            break;
        }
    }
    for payload in decoder.finish() {
        let deltas = acc.handle(&payload).map_err(StreamError::Server)?;
        emit(deltas, &mut thinking, turn).await;
    }
    thinking.flush(turn).await;
    if !acc.complete() {
        return Err(StreamError::Cut(
            "the stream ended before the response was complete".to_string(),
        ));
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
    }
}
