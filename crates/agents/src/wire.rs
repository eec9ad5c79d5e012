//! Line I/O shared by the built-in agents (docs/protocol/agent.md).
//!
//! * [`Out`]: a cheap, cloneable handle feeding one writer task that owns the
//!   agent's stdout. Every frame is one JSON line; the writer batches whatever
//!   is already queued into one write and flushes before it waits again, so a
//!   frame never sits in a buffer while the agent is idle.
//! * [`LineReader`]: reads input lines with a size cap, so one giant line
//!   cannot exhaust memory (it becomes a `BAD_FRAME` error instead).
//! * [`Turn`]: the "exactly one terminal frame per message" guarantee. A turn
//!   that is dropped without `finish`/`fail` (a bug, a panic, a cancelled task)
//!   still emits an `INTERNAL` error for its conversation.
//! * [`Aborts`]: per-conversation abort epochs; work captures an
//!   [`AbortSignal`] when its message is read and notices any later `abort`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aishell_protocol::agent::{AgentEvent, AgentInput, TokenUsage};
use aishell_protocol::codes::{ErrorBody, ErrorCode};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Input lines longer than this are rejected with `BAD_FRAME`.
pub(crate) const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// Error code for a turn ended by `abort` (not in [`ErrorCode`]: agents may
/// send their own codes, and this one is specific to agents).
pub(crate) const ABORTED: &str = "ABORTED";

/// Frames queued to the writer before senders wait (backpressure).
const CHANNEL_CAPACITY: usize = 1024;
/// The writer flushes at least this often while frames keep coming.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Sends frames to the writer task. Sending after the writer died (stdout
/// closed) is silently ignored: there is nobody left to tell.
#[derive(Clone)]
pub(crate) struct Out {
    tx: mpsc::Sender<AgentEvent>,
}

impl Out {
    pub(crate) async fn send(&self, event: AgentEvent) {
        let _ = self.tx.send(event).await;
    }

    /// Send without awaiting (for `Drop`): queue it if there is room,
    /// otherwise hand it to a task.
    pub(crate) fn send_detached(&self, event: AgentEvent) {
        match self.tx.try_send(event) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    let tx = self.tx.clone();
                    handle.spawn(async move {
                        let _ = tx.send(event).await;
                    });
                }
            }
        }
    }

    /// An `error` frame.
    pub(crate) async fn error(
        &self,
        conversation_id: Option<String>,
        code: &str,
        message: impl Into<String>,
    ) {
        self.send(error_event(conversation_id, code, message)).await;
    }
}

pub(crate) fn error_event(
    conversation_id: Option<String>,
    code: &str,
    message: impl Into<String>,
) -> AgentEvent {
    AgentEvent::Error {
        conversation_id,
        error: ErrorBody {
            code: code.to_string(),
            message: message.into(),
            reason: None,
        },
    }
}

/// Start the writer task owning `output`. It ends (shutting `output` down)
/// once every [`Out`] clone is dropped, or when a write fails.
pub(crate) fn spawn_writer<W>(output: W) -> (Out, JoinHandle<()>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let handle = tokio::spawn(writer_loop(output, rx));
    (Out { tx }, handle)
}

async fn writer_loop<W: AsyncWrite + Unpin>(mut output: W, mut rx: mpsc::Receiver<AgentEvent>) {
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    while let Some(event) = rx.recv().await {
        encode(&mut buf, &event);
        while buf.len() < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(event) => encode(&mut buf, &event),
                Err(_) => break,
            }
        }
        let result = async {
            output.write_all(&buf).await?;
            output.flush().await
        }
        .await;
        if let Err(e) = result {
            eprintln!("agent: cannot write to stdout ({e}); dropping further output");
            return;
        }
        buf.clear();
        if buf.capacity() > 4 * MAX_BATCH_BYTES {
            buf.shrink_to(8 * 1024);
        }
    }
    let _ = output.shutdown().await;
}

fn encode(buf: &mut Vec<u8>, event: &AgentEvent) {
    // Serialising an AgentEvent cannot fail (string keys, no floats NaN paths
    // that error); fall back to an error frame rather than panicking anyway.
    if let Err(e) = serde_json::to_writer(&mut *buf, event) {
        let fallback = error_event(
            event.conversation_id().map(str::to_string),
            ErrorCode::Internal.as_str(),
            format!("agent could not encode a frame: {e}"),
        );
        let _ = serde_json::to_writer(&mut *buf, &fallback);
    }
    buf.push(b'\n');
}

/// One input line, as the agent sees it.
pub(crate) enum Line<'a> {
    Bytes(&'a [u8]),
    TooLong(usize),
}

/// Reads `\n`-terminated lines (a final unterminated line counts too).
pub(crate) struct LineReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(input: R) -> Self {
        LineReader {
            inner: BufReader::with_capacity(64 * 1024, input),
            buf: Vec::with_capacity(4 * 1024),
        }
    }

    /// The next line, `None` at end of input.
    pub(crate) async fn next_line(&mut self) -> std::io::Result<Option<Line<'_>>> {
        self.buf.clear();
        let mut dropped = 0usize;
        let mut saw_any = false;
        loop {
            let avail = self.inner.fill_buf().await?;
            if avail.is_empty() {
                if !saw_any {
                    return Ok(None);
                }
                break;
            }
            saw_any = true;
            let (chunk, used, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (&avail[..i], i + 1, true),
                None => (avail, avail.len(), false),
            };
            if dropped > 0 || self.buf.len() + chunk.len() > MAX_LINE_BYTES {
                dropped += self.buf.len() + chunk.len();
                self.buf.clear();
            } else {
                self.buf.extend_from_slice(chunk);
            }
            self.inner.consume(used);
            if done {
                break;
            }
        }
        if dropped > 0 {
            return Ok(Some(Line::TooLong(dropped)));
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        Ok(Some(Line::Bytes(&self.buf)))
    }
}

/// Decode one input line. `Ok(None)` for blank lines; `Err` carries a message
/// for the `BAD_FRAME` error.
pub(crate) fn parse_input(line: Line<'_>) -> Result<Option<AgentInput>, String> {
    let bytes = match line {
        Line::Bytes(b) => b,
        Line::TooLong(n) => {
            return Err(format!(
                "input line of {n} bytes exceeds the {MAX_LINE_BYTES}-byte limit"
            ));
        }
    };
    let text =
        std::str::from_utf8(bytes).map_err(|_| "input line is not valid UTF-8".to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    // Fast path; on failure decode again for an error message a human can act on.
    match serde_json::from_str::<AgentInput>(text) {
        Ok(input) => Ok(Some(input)),
        Err(_) => match AgentInput::decode_line(text) {
            Ok(input) => Ok(Some(input)),
            Err(e) => Err(e.to_string()),
        },
    }
}

/// The `error` frame for an undecodable input line.
/// Longest conversation id (ids name history files).
pub(crate) const MAX_ID_LEN: usize = 128;

pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An untrusted string, cut for an error message.
pub(crate) fn shorten(s: &str) -> String {
    if s.chars().count() <= MAX_ID_LEN {
        s.to_string()
    } else {
        let mut cut: String = s.chars().take(MAX_ID_LEN).collect();
        cut.push('…');
        cut
    }
}

/// `true` for a conversation id that can name a file; otherwise sends
/// `BAD_FRAME` — naming the conversation when `in_turn`, so that message's
/// turn ends — and returns `false`.
pub(crate) async fn check_conversation_id(out: &Out, conversation_id: &str, in_turn: bool) -> bool {
    if valid_id(conversation_id) {
        return true;
    }
    let message = format!(
        "invalid conversation id {:?}: use 1 to {MAX_ID_LEN} of [A-Za-z0-9_-]",
        shorten(conversation_id)
    );
    let named = in_turn.then(|| conversation_id.to_string());
    out.error(named, ErrorCode::BadFrame.as_str(), message)
        .await;
    false
}

/// The input side every built-in agent shares.
pub(crate) trait LineAgent {
    fn out(&self) -> &Out;
    async fn handle(&mut self, input: AgentInput);
    /// Called after each input line (e.g. to reap finished tasks).
    fn after_line(&mut self) {}
    /// End of input: end what is in flight, each with its terminal frame.
    async fn shutdown(&mut self);
}

/// Feed `input`'s lines to `agent` until end of input (malformed lines get
/// `BAD_FRAME`, the agent goes on), shut it down, and give the writer
/// `grace` to flush (it ends, closing stdout, once the last `Out` is gone).
pub(crate) async fn serve_lines<R, A>(
    name: &str,
    input: R,
    mut agent: A,
    writer: JoinHandle<()>,
    grace: std::time::Duration,
) where
    R: AsyncRead + Unpin,
    A: LineAgent,
{
    let mut lines = LineReader::new(input);
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                eprintln!("{name} agent: cannot read stdin ({e}); stopping");
                break;
            }
        };
        match parse_input(line) {
            Ok(Some(input)) => {
                if let AgentInput::Init { env, .. } = &input {
                    export_session_env(env);
                }
                agent.handle(input).await
            }
            Ok(None) => {}
            Err(message) => agent.out().send(bad_frame(message)).await,
        }
        agent.after_line();
    }
    agent.shutdown().await;
    drop(agent);
    let _ = tokio::time::timeout(grace, writer).await;
}

/// Put the session's variables from `init` into the environment every
/// command the agent runs inherits (a pre-started agent was spawned before
/// its session existed). Only `AISHELL_` names: `init` cannot change PATH or
/// anything else the agent relies on.
fn export_session_env(env: &std::collections::BTreeMap<String, String>) {
    for (k, v) in env.iter().filter(|(k, _)| k.starts_with("AISHELL_")) {
        // SAFETY: called on the agent's input loop while it handles `init`;
        // the agent's own code reads the environment only through std, which
        // serialises access, and no foreign code runs on other threads here.
        unsafe { std::env::set_var(k, v) };
    }
}

/// The agent's answer to `init`: its name, this build's version and what it
/// can do.
pub(crate) fn init_answer(agent: &str, capabilities: &[&str]) -> AgentEvent {
    AgentEvent::Init(aishell_protocol::agent::AgentInfo {
        agent: Some(agent.to_string()),
        version: Some(env!("CARGO_PKG_VERSION").to_string()),
        capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
    })
}

/// The answer to `answer_question` from an agent that never asks any.
pub(crate) fn no_questions(agent: &str, request_id: &str) -> AgentEvent {
    AgentEvent::Info {
        message: format!(
            "the {agent} agent asks no questions; ignoring the answer to {}",
            shorten(request_id)
        ),
    }
}

pub(crate) fn bad_frame(message: impl Into<String>) -> AgentEvent {
    error_event(None, ErrorCode::BadFrame.as_str(), message)
}

/// One `message` being answered: guarantees exactly one terminal frame.
pub(crate) struct Turn {
    conversation_id: String,
    out: Out,
    done: bool,
}

impl Turn {
    pub(crate) fn new(conversation_id: String, out: Out) -> Self {
        Turn {
            conversation_id,
            out,
            done: false,
        }
    }

    pub(crate) fn conversation_id(&self) -> &str {
        &self.conversation_id
    }

    /// Emit a non-terminal frame.
    pub(crate) async fn send(&self, event: AgentEvent) {
        self.out.send(event).await;
    }

    /// Terminal: `finish`.
    pub(crate) async fn finish(mut self, token_usage: TokenUsage) {
        self.done = true;
        let conversation_id = std::mem::take(&mut self.conversation_id);
        self.out
            .send(AgentEvent::Finish {
                conversation_id,
                token_usage,
            })
            .await;
    }

    /// Terminal: `error` with this conversation.
    pub(crate) async fn fail(mut self, code: &str, message: impl Into<String>) {
        self.done = true;
        let conversation_id = std::mem::take(&mut self.conversation_id);
        self.out.error(Some(conversation_id), code, message).await;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if !self.done {
            eprintln!(
                "agent: turn of conversation {} ended without a reply; sending INTERNAL error",
                self.conversation_id
            );
            self.out.send_detached(error_event(
                Some(std::mem::take(&mut self.conversation_id)),
                ErrorCode::Internal.as_str(),
                "the agent failed while handling this message",
            ));
        }
    }
}

/// Per-conversation abort epochs.
#[derive(Clone, Default)]
pub(crate) struct Aborts {
    inner: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
}

impl Aborts {
    /// A signal that fires on any `abort` of this conversation from now on.
    pub(crate) fn signal(&self, conversation_id: &str) -> AbortSignal {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let rx = match map.get(conversation_id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0u64);
                map.insert(conversation_id.to_string(), tx);
                rx
            }
        };
        let epoch = *rx.borrow();
        AbortSignal { rx, epoch }
    }

    /// Abort one conversation, or all when `None`.
    pub(crate) fn abort(&self, conversation_id: Option<&str>) {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let bump = |tx: &watch::Sender<u64>| tx.send_modify(|e| *e = e.wrapping_add(1));
        match conversation_id {
            Some(id) => {
                if let Some(tx) = map.get(id) {
                    bump(tx);
                }
            }
            None => map.values().for_each(bump),
        }
    }

    /// Drop the bookkeeping of a deleted conversation (abort it first).
    pub(crate) fn forget(&self, conversation_id: &str) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(conversation_id);
    }
}

pub(crate) struct AbortSignal {
    rx: watch::Receiver<u64>,
    epoch: u64,
}

impl AbortSignal {
    pub(crate) fn is_aborted(&self) -> bool {
        *self.rx.borrow() != self.epoch
    }

    /// Resolves once the conversation is aborted (never, if it is not).
    pub(crate) async fn aborted(&mut self) {
        let epoch = self.epoch;
        if self.rx.wait_for(|e| *e != epoch).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Whitespace-separated words: the built-in agents' stand-in for tokens.
pub(crate) fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}
