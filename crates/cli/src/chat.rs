//! `aishell chat`: terminal client. Sends each stdin line as a message, waits
//! for that turn to finish while printing the streamed reply, exits at EOF.
//! Reconnects (with `session_id` + `last_seq`) if the socket drops mid-turn.

use std::io::Write;
use std::time::Duration;

use aishell_protocol::client::{ServerEvent, TaskPhase};
use aishell_protocol::{AgentEvent, ClientFrame, ServerFrame};
use anyhow::{Context, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Args)]
pub struct ChatArgs {
    /// Gateway WebSocket URL.
    #[arg(long, env = "AISHELL_URL", default_value = "ws://127.0.0.1:5174/ws")]
    url: String,
    /// Bearer token (printed by `aishell serve`, or `aishell token create`).
    #[arg(long, env = "AISHELL_TOKEN")]
    token: String,
    /// Resume this session instead of opening a new one.
    #[arg(long)]
    session: Option<String>,
    /// Print every frame as a JSON line instead of formatted text.
    #[arg(long)]
    json: bool,
    /// Give up on a turn that shows no progress for this many seconds.
    #[arg(long, default_value_t = 600)]
    turn_timeout: u64,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Chat {
    args: ChatArgs,
    session_id: Option<String>,
    last_seq: u64,
    /// A first connection to a `--session` skips its history: only events
    /// after it belong to this run's turns.
    connected_once: bool,
    conversation_id: Option<String>,
    printed_text: bool,
}

pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let session_id = args.session.clone();
    let mut chat = Chat {
        args,
        session_id,
        last_seq: 0,
        connected_once: false,
        conversation_id: None,
        printed_text: false,
    };
    let mut ws = chat.connect().await?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut failed_turns = 0;
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let frame = ClientFrame::Message {
            id: Some(uuid_like()),
            conversation_id: chat.conversation_id.clone(),
            content: line,
        };
        let text = serde_json::to_string(&frame)?;
        if ws.send(Message::Text(text.clone().into())).await.is_err() {
            ws = chat.reconnect().await?;
            ws.send(Message::Text(text.into())).await?;
        }
        if !chat.wait_turn(&mut ws).await? {
            failed_turns += 1;
        }
    }
    let _ = ws.close(None).await;
    if failed_turns > 0 {
        bail!("{failed_turns} message(s) ended with an error");
    }
    Ok(())
}

impl Chat {
    async fn connect(&mut self) -> anyhow::Result<Ws> {
        let mut url = url::Url::parse(&self.args.url).context("invalid --url")?;
        if let Some(sid) = &self.session_id {
            url.query_pairs_mut().append_pair("session_id", sid);
            if self.connected_once {
                url.query_pairs_mut()
                    .append_pair("last_seq", &self.last_seq.to_string());
            }
        }
        let mut request = url.as_str().into_client_request()?;
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.args.token).parse()?,
        );
        let (mut ws, _) =
            match tokio_tungstenite::connect_async_with_config(request, Some(ws_config()), true)
                .await
            {
                Ok(ok) => ok,
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                    let body = resp
                        .body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    bail!(
                        "gateway refused the connection: HTTP {} {body}",
                        resp.status()
                    );
                }
                Err(e) => bail!("cannot connect to {}: {e}", self.args.url),
            };
        // The first frame names the session.
        let first = next_frame(&mut ws, Duration::from_secs(10))
            .await?
            .context("gateway closed before the session frame")?;
        if let Some(code) = first.event.error_code() {
            bail!("{code}: {}", error_message(&first.event));
        }
        self.session_id = Some(first.session_id.clone());
        if let ServerEvent::Session { last_seq, .. } = &first.event
            && !self.connected_once
        {
            self.last_seq = *last_seq;
        }
        self.connected_once = true;
        if self.args.json {
            println!("{}", first.to_json());
        } else if let ServerEvent::Session { resumed, .. } = &first.event {
            eprintln!(
                "[session {}{}]",
                first.session_id,
                if *resumed { ", resumed" } else { "" }
            );
        }
        Ok(ws)
    }

    async fn reconnect(&mut self) -> anyhow::Result<Ws> {
        let mut delay = Duration::from_millis(200);
        for _ in 0..8 {
            match self.connect().await {
                Ok(ws) => return Ok(ws),
                Err(e) => {
                    eprintln!("[reconnecting: {e}]");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        bail!("lost the connection to the gateway")
    }

    /// Print frames until this turn ends; true if it finished without error.
    async fn wait_turn(&mut self, ws: &mut Ws) -> anyhow::Result<bool> {
        self.printed_text = false;
        let timeout = Duration::from_secs(self.args.turn_timeout);
        loop {
            let frame = match next_frame(ws, timeout).await {
                Ok(Some(f)) => f,
                Ok(None) | Err(_) => {
                    *ws = self.reconnect().await?;
                    continue;
                }
            };
            if !frame.ephemeral {
                if frame.seq <= self.last_seq {
                    continue; // already shown before a reconnect
                }
                self.last_seq = frame.seq;
            }
            if self.args.json {
                println!("{}", frame.to_json());
            }
            if let Some(done) = self.show(&frame.event) {
                return Ok(done);
            }
        }
    }

    /// Print one event; Some(ok) when it ends the turn.
    fn show(&mut self, event: &ServerEvent) -> Option<bool> {
        let human = !self.args.json;
        match event {
            ServerEvent::Status {
                state,
                source,
                eta_ms,
            } if human => match state {
                TaskPhase::Starting | TaskPhase::Restarting => {
                    let src = source.map(|s| s.as_str()).unwrap_or("");
                    let eta = eta_ms
                        .map(|ms| format!(", about {:.1}s", ms as f64 / 1000.0))
                        .unwrap_or_default();
                    eprintln!(
                        "[{} sandbox ({src}{eta})]",
                        if *state == TaskPhase::Starting {
                            "starting"
                        } else {
                            "restarting"
                        }
                    );
                }
                TaskPhase::Stopped => eprintln!("[sandbox stopped]"),
                TaskPhase::Ready => {}
            },
            ServerEvent::SessionRecovered { .. } if human => eprintln!("[restored your session]"),
            ServerEvent::Agent(agent) => return self.show_agent(agent, human),
            _ => {}
        }
        None
    }

    fn show_agent(&mut self, event: &AgentEvent, human: bool) -> Option<bool> {
        if let Some(cid) = event.conversation_id() {
            self.conversation_id.get_or_insert_with(|| cid.to_string());
        }
        let mut out = std::io::stdout();
        match event {
            AgentEvent::TextDelta { delta, .. } if human => {
                self.printed_text = true;
                let _ = out.write_all(delta.as_bytes());
                let _ = out.flush();
            }
            AgentEvent::Content { content, .. } if human && !self.printed_text => {
                println!("{content}");
            }
            AgentEvent::ToolCall {
                tool_name,
                tool_input,
                ..
            } if human => {
                let shown = tool_input
                    .get("command")
                    .and_then(|c| c.as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| tool_input.to_string());
                eprintln!("[{tool_name}] {shown}");
            }
            AgentEvent::Thinking {
                content: Some(c), ..
            } if human => eprintln!("[thinking] {c}"),
            AgentEvent::AskQuestion { question, .. } if human => eprintln!("[question] {question}"),
            AgentEvent::Info { message } if human => eprintln!("[info] {message}"),
            AgentEvent::Finish { token_usage, .. } => {
                if human {
                    if self.printed_text {
                        println!();
                    }
                    eprintln!(
                        "[done: {} tokens in, {} out]",
                        token_usage.input_tokens, token_usage.output_tokens
                    );
                }
                return Some(true);
            }
            AgentEvent::Error {
                error,
                conversation_id,
            } => {
                if human {
                    eprintln!("error {}: {}", error.code, error.message);
                }
                // An error for a turn, or a start failure, ends the wait.
                if conversation_id.is_some() || error.code.starts_with("TASK_") {
                    return Some(false);
                }
            }
            _ => {}
        }
        None
    }
}

async fn next_frame(ws: &mut Ws, timeout: Duration) -> anyhow::Result<Option<ServerFrame>> {
    loop {
        let msg = match tokio::time::timeout(timeout, ws.next()).await {
            Err(_) => bail!("no reply within {}s", timeout.as_secs()),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => bail!("connection error: {e}"),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(t) => match decode_server_frame(&t)? {
                Some(frame) => return Ok(Some(frame)),
                // A newer gateway's frame type: skipped, not a broken
                // connection (reconnecting would replay it forever).
                None => continue,
            },
            Message::Close(_) => return Ok(None),
            _ => continue,
        }
    }
}

/// Decode a gateway frame; `None` for a well-formed frame of a type this
/// client does not know (docs/protocol/versioning.md: new frame types may
/// appear within a version).
fn decode_server_frame(text: &str) -> anyhow::Result<Option<ServerFrame>> {
    match serde_json::from_str::<ServerFrame>(text) {
        Ok(frame) => Ok(Some(frame)),
        Err(e) => {
            let value: serde_json::Value =
                serde_json::from_str(text).with_context(|| format!("unexpected frame: {text}"))?;
            if value.get("type").and_then(|t| t.as_str()).is_some() {
                eprintln!(
                    "(ignoring a frame this client does not understand: {})",
                    value["type"]
                );
                Ok(None)
            } else {
                Err(e).with_context(|| format!("unexpected frame: {text}"))
            }
        }
    }
}

fn error_message(event: &ServerEvent) -> String {
    match event {
        ServerEvent::Agent(AgentEvent::Error { error, .. }) => error.message.clone(),
        _ => String::new(),
    }
}

fn uuid_like() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The WebSocket settings of aishell's client ends (terminal, bench).
pub(crate) fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(aishell_protocol::WS_READ_BUFFER_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_type_from_a_newer_gateway_is_skipped_not_fatal() {
        let known = r#"{"type":"pong","id":"1","seq":3,"session_id":"s-1","ephemeral":true}"#;
        assert!(decode_server_frame(known).unwrap().is_some());
        let newer = r#"{"type":"from_the_future","seq":4,"session_id":"s-1"}"#;
        assert!(decode_server_frame(newer).unwrap().is_none());
        assert!(decode_server_frame("not json").is_err());
        assert!(decode_server_frame(r#"{"no_type":1}"#).is_err());
    }
}
