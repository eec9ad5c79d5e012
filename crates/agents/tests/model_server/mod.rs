//! A scripted OpenAI-compatible Chat Completions server speaking HTTP/1.1 by
//! hand on 127.0.0.1: each request gets the next scripted reply — a
//! streamed SSE body (chunked transfer encoding, split at arbitrary byte
//! boundaries, optionally cut mid-way or left hanging) or a plain status
//! with headers and body. Every request is recorded (path, headers, JSON
//! body) for assertions.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// HTTP chunks carry this many bytes of the SSE stream (so events, JSON
/// strings and UTF-8 characters are split across chunks).
pub const SPLIT: usize = 13;

pub enum Reply {
    Sse {
        body: Vec<u8>,
        /// Drop the connection after this many body bytes (no final chunk).
        cut_after: Option<usize>,
        /// After the body, keep the connection open without ending it.
        hang: bool,
    },
    Status {
        code: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
}

#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub at: Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn messages(&self) -> &Vec<Value> {
        self.body["messages"].as_array().expect("messages array")
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Reply>,
    requests: Vec<Request>,
    /// Connections the client closed while a reply was hanging.
    disconnects: usize,
}

#[derive(Clone)]
pub struct Server {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl Server {
    pub async fn start(script: Vec<Reply>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            ..State::default()
        }));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = serve(sock, st).await;
                });
            }
        });
        Server { port, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn push(&self, reply: Reply) {
        self.state.lock().unwrap().script.push_back(reply);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn disconnects(&self) -> usize {
        self.state.lock().unwrap().disconnects
    }

    pub fn remaining(&self) -> usize {
        self.state.lock().unwrap().script.len()
    }
}

async fn serve(mut sock: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    // Request head.
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = {
        let mut st = state.lock().unwrap();
        st.requests.push(Request {
            path,
            headers,
            body,
            at: Instant::now(),
        });
        st.script.pop_front()
    };
    let reply = reply.unwrap_or_else(|| Reply::Status {
        code: 500,
        headers: vec![],
        body: "the test server has no scripted reply left".to_string(),
    });
    match reply {
        Reply::Status {
            code,
            headers,
            body,
        } => {
            let mut head = format!(
                "HTTP/1.1 {code} Scripted\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            sock.write_all(head.as_bytes()).await?;
            sock.write_all(body.as_bytes()).await?;
            sock.shutdown().await?;
        }
        Reply::Sse {
            body,
            cut_after,
            hang,
        } => {
            sock.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
            )
            .await?;
            let limit = cut_after.unwrap_or(body.len()).min(body.len());
            // Long bodies in fewer pieces, to keep tests fast.
            let split = if body.len() > 4096 {
                body.len() / 64
            } else {
                SPLIT
            };
            for piece in body[..limit].chunks(split) {
                let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                chunk.extend_from_slice(piece);
                chunk.extend_from_slice(b"\r\n");
                sock.write_all(&chunk).await?;
                sock.flush().await?;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if cut_after.is_some() {
                // Drop the connection mid-stream.
                return Ok(());
            }
            if hang {
                // Wait for the client to go away.
                let mut b = [0u8; 64];
                loop {
                    match tokio::time::timeout(Duration::from_secs(30), sock.read(&mut b)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            state.lock().unwrap().disconnects += 1;
                            return Ok(());
                        }
                        Ok(Ok(_)) => {}
                        Err(_) => return Ok(()),
                    }
                }
            }
            sock.write_all(b"0\r\n\r\n").await?;
            sock.shutdown().await?;
        }
    }
    Ok(())
}

fn event(v: Value) -> String {
    format!("data: {v}\n\n")
}

fn usage_event(prompt: u64, completion: u64) -> String {
    event(json!({
        "id": "chatcmpl-test", "object": "chat.completion.chunk", "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion}
    }))
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    event(json!({
        "id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    }))
}

/// The SSE body of a text answer streamed a few characters at a time (at
/// most ~32 pieces), with
/// usage in a last chunk of its own.
pub fn text_body(text: &str, usage: (u64, u64)) -> Vec<u8> {
    let mut s = chunk(json!({"role": "assistant", "content": ""}), None);
    let chars: Vec<char> = text.chars().collect();
    for piece in chars.chunks((chars.len() / 32).max(5)) {
        let piece: String = piece.iter().collect();
        s.push_str(&chunk(json!({"content": piece}), None));
    }
    s.push_str(&chunk(json!({}), Some("stop")));
    s.push_str(&usage_event(usage.0, usage.1));
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

pub fn text(text: &str, usage: (u64, u64)) -> Reply {
    Reply::Sse {
        body: text_body(text, usage),
        cut_after: None,
        hang: false,
    }
}

/// Tool calls `(id, name, arguments)`: the id and name in a first fragment,
/// the arguments JSON in 7-byte fragments across many chunks.
pub fn tool_calls_body(calls: &[(&str, &str, Value)], usage: (u64, u64)) -> Vec<u8> {
    let mut s = chunk(json!({"role": "assistant", "content": null}), None);
    for (index, (id, name, args)) in calls.iter().enumerate() {
        s.push_str(&chunk(
            json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                                   "function": {"name": name, "arguments": ""}}]}),
            None,
        ));
        let args = args.to_string();
        let bytes = args.as_bytes();
        let mut start = 0;
        while start < bytes.len() {
            let mut end = (start + 7).min(bytes.len());
            while !args.is_char_boundary(end) {
                end += 1;
            }
            s.push_str(&chunk(
                json!({"tool_calls": [{"index": index, "function": {"arguments": &args[start..end]}}]}),
                None,
            ));
            start = end;
        }
    }
    s.push_str(&chunk(json!({}), Some("tool_calls")));
    s.push_str(&usage_event(usage.0, usage.1));
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

pub fn tool_calls(calls: &[(&str, &str, Value)], usage: (u64, u64)) -> Reply {
    Reply::Sse {
        body: tool_calls_body(calls, usage),
        cut_after: None,
        hang: false,
    }
}

pub fn tool_call(id: &str, name: &str, args: Value, usage: (u64, u64)) -> Reply {
    tool_calls(&[(id, name, args)], usage)
}

/// A text answer whose connection drops after `at` bytes of the body.
pub fn cut(text: &str, at: usize) -> Reply {
    Reply::Sse {
        body: text_body(text, (1, 1)),
        cut_after: Some(at),
        hang: false,
    }
}

/// Some text, then nothing: the stream stays open until the client leaves.
pub fn hanging(text: &str) -> Reply {
    let mut s = chunk(json!({"role": "assistant", "content": ""}), None);
    s.push_str(&chunk(json!({"content": text}), None));
    Reply::Sse {
        body: s.into_bytes(),
        cut_after: None,
        hang: true,
    }
}

pub fn status(code: u16, headers: &[(&str, &str)], body: &str) -> Reply {
    Reply::Status {
        code,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: body.to_string(),
    }
}
