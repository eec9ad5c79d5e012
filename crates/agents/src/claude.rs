//! The `claude` agent: an adapter running Claude Code in its stream-json mode
//! and translating between its messages and the agent protocol (docs/protocol/agent.md).
//!
//! * One Claude Code process per conversation, started on the conversation's
//!   first message in the workspace and kept for the next ones:
//!   `claude -p --input-format stream-json --output-format stream-json
//!   --verbose [--model M] [--permission-mode P] [--include-partial-messages]
//!   [extra args] [--resume SESSION]`.
//! * Settings: `claude_command` (a string split on whitespace, or an argv
//!   array; default env `AISHELL_CLAUDE_COMMAND`, else `claude`),
//!   `claude_model`, `claude_permission_mode`, `claude_partial_messages`
//!   (bool: real token streaming via `stream_event`s), `claude_args` (extra
//!   arguments, array or string).
//! * In: each `message` is written to the process's stdin as
//!   `{"type":"user","message":{"role":"user","content":[{"type":"text","text":…}]},"parent_tool_use_id":null}`.
//! * Out, per stdout line (the Claude Agent SDK's message types):
//!   `system`/`init` → `conversation_update{resume_handle: session_id}` when
//!   the session id is new; `assistant` → `thinking` (thinking blocks),
//!   `text_delta` + `content` (text blocks; only `content` when the text was
//!   already streamed by `stream_event` deltas), `tool_call` (tool_use
//!   blocks); `user` → `tool_result` (tool_result blocks); `stream_event`
//!   text deltas → `text_delta`; `result` → `finish` with its usage (input =
//!   `input_tokens` + cache creation + cache read), or `error AGENT_ERROR`
//!   when `is_error` or the subtype is not `success`. Other lines are
//!   ignored; lines that are not JSON go to stderr.
//! * Claude's stderr is copied line by line to this agent's stderr (which
//!   the runner forwards to the gateway logs), prefixed with the
//!   conversation; its last lines are quoted when the process dies mid-turn.
//! * Resume: the session id is the conversation's resume handle (also kept
//!   in `.aishell/claude/{conversation_id}.session`). After
//!   `restore_conversations` (handles in `conversations[].resume_handle`) or
//!   a restart, the process starts with `--resume <id>`; if that process
//!   dies without a word (an unknown session), the message is retried once
//!   in a new session and an `info` says so.
//! * A process that died while idle is restarted (with `--resume`) when the
//!   next message cannot be written to it.
//!
//! Abort semantics: `abort{conversation_id?}` kills that conversation's
//! Claude Code process group (all conversations when omitted) and drops its
//! queued messages; each such turn ends with `error ABORTED`. The next
//! message starts a new process with `--resume`. End of input aborts
//! everything in flight, closes the idle processes' stdin and kills what has
//! not exited shortly after.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aishell_protocol::agent::{AgentEvent, AgentInput, TokenUsage};
use aishell_protocol::codes::ErrorCode;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::wire::{self, ABORTED, AbortSignal, Aborts, Line, LineReader, Out, Turn};
use crate::wire::{shorten, valid_id};

pub(crate) const ENV_COMMAND: &str = "AISHELL_CLAUDE_COMMAND";
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How long an idle process may take to exit after its stdin is closed.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
const MAX_TITLE_CHARS: usize = 60;
const STDERR_TAIL_LINES: usize = 20;

pub(crate) async fn run<R, W>(input: R, output: W, workspace: PathBuf) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out, writer) = wire::spawn_writer(output);
    let agent = Claude {
        ctx: Arc::new(Ctx {
            state_dir: workspace.join(".aishell").join("claude"),
            workspace,
        }),
        out,
        settings: Settings::from_env(),
        aborts: Aborts::default(),
        convs: HashMap::new(),
        handles: HashMap::new(),
        retired: Vec::new(),
    };
    wire::serve_lines("claude", input, agent, writer, SHUTDOWN_GRACE).await;
    Ok(())
}

#[derive(Debug, Clone)]
struct Settings {
    command: Vec<String>,
    model: Option<String>,
    permission_mode: Option<String>,
    partial_messages: bool,
    extra_args: Vec<String>,
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// A string split on whitespace, or an array of strings.
fn argv_value(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(words(s)),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect(),
        Value::Null => Some(Vec::new()),
        _ => None,
    }
}

impl Settings {
    fn from_env() -> Self {
        let command = std::env::var(ENV_COMMAND)
            .ok()
            .map(|c| words(&c))
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| vec!["claude".to_string()]);
        Settings {
            command,
            model: None,
            permission_mode: None,
            partial_messages: false,
            extra_args: Vec::new(),
        }
    }

    fn apply(&mut self, map: &serde_json::Map<String, Value>) {
        if let Some(v) = map.get("claude_command") {
            match argv_value(v) {
                Some(argv) if !argv.is_empty() => self.command = argv,
                _ => eprintln!("claude agent: ignoring invalid claude_command {v}"),
            }
        }
        let text = |k: &str| -> Option<Option<String>> {
            match map.get(k)? {
                Value::String(s) if !s.trim().is_empty() => Some(Some(s.trim().to_string())),
                Value::String(_) | Value::Null => Some(None),
                other => {
                    eprintln!("claude agent: ignoring setting {k}: expected a string, got {other}");
                    None
                }
            }
        };
        if let Some(v) = text("claude_model") {
            self.model = v;
        }
        if let Some(v) = text("claude_permission_mode") {
            self.permission_mode = v;
        }
        if let Some(v) = map.get("claude_partial_messages") {
            match v.as_bool() {
                Some(b) => self.partial_messages = b,
                None => eprintln!("claude agent: ignoring invalid claude_partial_messages {v}"),
            }
        }
        if let Some(v) = map.get("claude_args") {
            match argv_value(v) {
                Some(args) => self.extra_args = args,
                None => eprintln!("claude agent: ignoring invalid claude_args {v}"),
            }
        }
    }

    fn argv(&self, resume: Option<&str>) -> Vec<String> {
        let mut argv = self.command.clone();
        argv.extend(
            [
                "-p",
                "--input-format",
                "stream-json",
                "--output-format",
                "stream-json",
                "--verbose",
            ]
            .map(str::to_string),
        );
        if let Some(m) = &self.model {
            argv.extend(["--model".to_string(), m.clone()]);
        }
        if let Some(p) = &self.permission_mode {
            argv.extend(["--permission-mode".to_string(), p.clone()]);
        }
        if self.partial_messages {
            argv.push("--include-partial-messages".to_string());
        }
        argv.extend(self.extra_args.iter().cloned());
        if let Some(id) = resume {
            argv.extend(["--resume".to_string(), id.to_string()]);
        }
        argv
    }
}

struct Ctx {
    workspace: PathBuf,
    state_dir: PathBuf,
}

impl Ctx {
    fn session_path(&self, conversation_id: &str) -> PathBuf {
        self.state_dir.join(format!("{conversation_id}.session"))
    }

    fn load_session(&self, conversation_id: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.session_path(conversation_id)).ok()?;
        let id = text.trim();
        (!id.is_empty()).then(|| id.to_string())
    }

    fn save_session(&self, conversation_id: &str, session: Option<&str>) {
        let path = self.session_path(conversation_id);
        let result = match session {
            Some(id) => std::fs::create_dir_all(&self.state_dir)
                .and_then(|()| std::fs::write(&path, format!("{id}\n"))),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r,
            },
        };
        if let Err(e) = result {
            eprintln!("claude agent: cannot update {}: {e}", path.display());
        }
    }
}

struct Conv {
    tx: mpsc::UnboundedSender<Job>,
    task: JoinHandle<()>,
}

enum Job {
    Message {
        content: String,
        signal: AbortSignal,
        settings: Settings,
        turn: Turn,
    },
    Reset,
}

struct Claude {
    out: Out,
    ctx: Arc<Ctx>,
    settings: Settings,
    aborts: Aborts,
    convs: HashMap<String, Conv>,
    /// Resume handles from `restore_conversations`, for workers not started yet.
    handles: HashMap<String, String>,
    retired: Vec<JoinHandle<()>>,
}

impl Claude {
    async fn handle(&mut self, input: AgentInput) {
        match input {
            AgentInput::Init { settings, .. } => {
                self.settings.apply(&settings);
                eprintln!("claude agent: settings {:?}", self.settings);
                self.out
                    .send(crate::wire::init_answer(
                        "claude",
                        &["tools", "streaming", "abort", "restore", "resume_handle"],
                    ))
                    .await;
            }
            AgentInput::Message {
                conversation_id,
                content,
                ..
            } => self.message(conversation_id, content).await,
            AgentInput::Abort { conversation_id } => {
                self.aborts.abort(conversation_id.as_deref());
            }
            AgentInput::AnswerQuestion { request_id, .. } => {
                self.out
                    .send(crate::wire::no_questions("claude", &request_id))
                    .await;
            }
            AgentInput::ResetConversation { conversation_id } => {
                if !self.check_id(&conversation_id).await {
                    return;
                }
                self.handles.remove(&conversation_id);
                match self.convs.get(&conversation_id) {
                    Some(conv) if conv.tx.send(Job::Reset).is_ok() => {}
                    _ => self.ctx.save_session(&conversation_id, None),
                }
            }
            AgentInput::DeleteConversation { conversation_id } => {
                if !self.check_id(&conversation_id).await {
                    return;
                }
                self.aborts.abort(Some(&conversation_id));
                self.aborts.forget(&conversation_id);
                self.handles.remove(&conversation_id);
                if let Some(conv) = self.convs.remove(&conversation_id) {
                    let _ = conv.tx.send(Job::Reset);
                    drop(conv.tx);
                    self.retired.retain(|t| !t.is_finished());
                    self.retired.push(conv.task);
                } else {
                    self.ctx.save_session(&conversation_id, None);
                }
            }
            AgentInput::RestoreConversations { conversations } => {
                let mut found = 0usize;
                for c in conversations {
                    let id = c.conversation_id;
                    if !valid_id(&id) {
                        eprintln!(
                            "claude agent: not restoring invalid conversation id {}",
                            shorten(&id)
                        );
                        continue;
                    }
                    if self.convs.contains_key(&id) {
                        found += 1;
                        continue;
                    }
                    match c.resume_handle.filter(|h| !h.trim().is_empty()) {
                        Some(handle) => {
                            self.handles.insert(id, handle);
                            found += 1;
                        }
                        None => {
                            if self.ctx.load_session(&id).is_some() {
                                found += 1;
                            }
                        }
                    }
                }
                self.out
                    .send(AgentEvent::Info {
                        message: format!("restored {found} conversations"),
                    })
                    .await;
            }
            AgentInput::Ping { id } => self.out.send(AgentEvent::Pong { id }).await,
        }
    }

    async fn check_id(&self, conversation_id: &str) -> bool {
        wire::check_conversation_id(&self.out, conversation_id, false).await
    }

    async fn message(&mut self, conversation_id: String, content: String) {
        if !wire::check_conversation_id(&self.out, &conversation_id, true).await {
            return;
        }
        let mut job = Job::Message {
            content,
            signal: self.aborts.signal(&conversation_id),
            settings: self.settings.clone(),
            turn: Turn::new(conversation_id.clone(), self.out.clone()),
        };
        for _ in 0..2 {
            if !self.convs.contains_key(&conversation_id) {
                let session = self
                    .handles
                    .remove(&conversation_id)
                    .or_else(|| self.ctx.load_session(&conversation_id));
                let worker = Worker {
                    ctx: self.ctx.clone(),
                    conversation_id: conversation_id.clone(),
                    session,
                    proc: None,
                };
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(worker.run(rx));
                self.convs
                    .insert(conversation_id.clone(), Conv { tx, task });
            }
            match self.convs[&conversation_id].tx.send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(j)) => {
                    job = j;
                    self.convs.remove(&conversation_id);
                }
            }
        }
    }

    async fn shutdown(&mut self) {
        self.aborts.abort(None);
        let mut tasks: Vec<JoinHandle<()>> = self.retired.drain(..).collect();
        for (_, conv) in self.convs.drain() {
            drop(conv.tx);
            tasks.push(conv.task);
        }
        let aborters: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let drained = tokio::time::timeout(SHUTDOWN_GRACE + CLOSE_GRACE, async {
            for t in tasks {
                let _ = t.await;
            }
        })
        .await;
        if drained.is_err() {
            eprintln!("claude agent: conversations did not end in time; cancelling them");
            // Dropping a worker drops its process (kill on drop).
            for a in aborters {
                a.abort();
            }
        }
    }
}

/// A running Claude Code process.
struct Proc {
    child: Child,
    pgid: Option<Pid>,
    stdin: Option<ChildStdin>,
    stdout: LineReader<ChildStdout>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// The session it was started to resume.
    resumed: Option<String>,
    /// It has written at least one stdout line.
    spoke: bool,
}

impl Proc {
    fn spawn(
        ctx: &Ctx,
        conversation_id: &str,
        settings: &Settings,
        resume: Option<&str>,
    ) -> std::io::Result<Proc> {
        let argv = settings.argv(resume);
        let mut child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(&ctx.workspace)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot start {:?}: {e}", argv[0]))
            })?;
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw);
        eprintln!(
            "claude agent: conversation {conversation_id}: started {argv:?} (pid {})",
            child.id().unwrap_or(0)
        );
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = stderr_tail.clone();
            let prefix = format!("claude agent: conversation {conversation_id}: claude stderr: ");
            tokio::spawn(async move {
                let mut reader = BufReader::new(stderr);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match reader.read_until(b'\n', &mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf);
                            let line = line.trim_end();
                            eprintln!("{prefix}{line}");
                            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                            if tail.len() == STDERR_TAIL_LINES {
                                tail.pop_front();
                            }
                            tail.push_back(line.to_string());
                        }
                    }
                }
            });
        }
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
        Ok(Proc {
            stdin: child.stdin.take(),
            stdout: LineReader::new(stdout),
            child,
            pgid,
            stderr_tail,
            resumed: resume.map(str::to_string),
            spoke: false,
        })
    }

    async fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("stdin closed"))?;
        stdin.write_all(line).await?;
        stdin.flush().await
    }

    fn last_stderr(&self) -> Option<String> {
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().rev().find(|l| !l.trim().is_empty()).cloned()
    }

    /// Kill the whole process group now and reap it in the background.
    fn kill(mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        let _ = self.child.start_kill();
        tokio::spawn(async move {
            let _ = self.child.wait().await;
        });
    }

    /// Wait for an exit already under way (stdout closed), briefly.
    async fn exit_status(&mut self) -> Option<ExitStatus> {
        match tokio::time::timeout(CLOSE_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.pgid = None;
                Some(status)
            }
            _ => None,
        }
    }

    /// Close stdin and let it exit; kill it if it does not.
    async fn close(mut self) {
        self.stdin = None;
        if self.exit_status().await.is_none() {
            self.kill();
        } else if let Some(pgid) = self.pgid.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

fn describe_exit(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "ended".to_string(),
        },
        None => "stopped answering".to_string(),
    }
}

/// How reading one turn's output ended.
enum TurnEnd {
    Finished(TokenUsage),
    Failed(String),
    Aborted,
    /// stdout closed before a `result`.
    Exited,
}

struct Worker {
    ctx: Arc<Ctx>,
    conversation_id: String,
    session: Option<String>,
    proc: Option<Proc>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        while let Some(job) = rx.recv().await {
            match job {
                Job::Message {
                    content,
                    mut signal,
                    settings,
                    turn,
                } => self.turn(content, &mut signal, &settings, turn).await,
                Job::Reset => {
                    if let Some(p) = self.proc.take() {
                        p.kill();
                    }
                    self.session = None;
                    self.ctx.save_session(&self.conversation_id, None);
                }
            }
        }
        if let Some(p) = self.proc.take() {
            p.close().await;
        }
    }

    fn set_session(&mut self, id: &str, turn: &Turn) -> Option<AgentEvent> {
        if self.session.as_deref() == Some(id) {
            return None;
        }
        self.session = Some(id.to_string());
        self.ctx.save_session(&self.conversation_id, Some(id));
        Some(AgentEvent::ConversationUpdate {
            conversation_id: turn.conversation_id().to_string(),
            title: None,
            resume_handle: Some(id.to_string()),
        })
    }

    async fn turn(
        &mut self,
        content: String,
        signal: &mut AbortSignal,
        settings: &Settings,
        turn: Turn,
    ) {
        if signal.is_aborted() {
            turn.fail(ABORTED, "aborted before Claude Code started on it")
                .await;
            return;
        }
        if self.session.is_none() && self.proc.is_none() {
            let title: String = content.trim().chars().take(MAX_TITLE_CHARS).collect();
            turn.send(AgentEvent::ConversationUpdate {
                conversation_id: turn.conversation_id().to_string(),
                title: Some(title),
                resume_handle: None,
            })
            .await;
        }
        let mut line = serde_json::to_vec(&json!({
            "type": "user",
            "message": {"role": "user", "content": [{"type": "text", "text": content}]},
            "parent_tool_use_id": null,
        }))
        .unwrap_or_default();
        line.push(b'\n');

        let mut attempts = 0;
        loop {
            attempts += 1;
            if self.proc.is_none() {
                match Proc::spawn(
                    &self.ctx,
                    &self.conversation_id,
                    settings,
                    self.session.as_deref(),
                ) {
                    Ok(p) => self.proc = Some(p),
                    Err(e) => {
                        eprintln!("claude agent: {e}");
                        turn.fail(
                            ErrorCode::AgentError.as_str(),
                            format!("{e} (set claude_command or {ENV_COMMAND} to the Claude Code executable)"),
                        )
                        .await;
                        return;
                    }
                }
            }
            let Some(proc) = self.proc.as_mut() else {
                return;
            };
            let written = tokio::select! {
                biased;
                _ = signal.aborted() => None,
                r = proc.write(&line) => Some(r),
            };
            match written {
                None => {
                    if let Some(p) = self.proc.take() {
                        p.kill();
                    }
                    turn.fail(ABORTED, "aborted").await;
                    return;
                }
                Some(Err(e)) => {
                    // The process is gone: it died while idle, or at once
                    // (an unknown session to resume). Start another.
                    let mut p = self.proc.take().expect("checked above");
                    let status = p.exit_status().await;
                    let detail = format!(
                        "cannot write to Claude Code ({e}; {}{})",
                        describe_exit(status),
                        p.last_stderr()
                            .map(|l| format!(": {l}"))
                            .unwrap_or_default()
                    );
                    let failed_resume = p.resumed.clone().filter(|_| !p.spoke);
                    p.kill();
                    if attempts < 2 {
                        match failed_resume {
                            Some(old) => self.resume_failed(&old, &detail, &turn).await,
                            None => eprintln!("claude agent: {detail}; restarting it"),
                        }
                        continue;
                    }
                    turn.fail(ErrorCode::AgentError.as_str(), detail).await;
                    return;
                }
                Some(Ok(())) => {}
            }
            match self.read_turn(signal, settings, &turn).await {
                TurnEnd::Finished(usage) => {
                    turn.finish(usage).await;
                    return;
                }
                TurnEnd::Failed(message) => {
                    turn.fail(ErrorCode::AgentError.as_str(), message).await;
                    return;
                }
                TurnEnd::Aborted => {
                    if let Some(p) = self.proc.take() {
                        p.kill();
                    }
                    turn.fail(ABORTED, "aborted; the Claude Code process was stopped")
                        .await;
                    return;
                }
                TurnEnd::Exited => {
                    let mut p = self.proc.take().expect("read_turn keeps the process");
                    let status = p.exit_status().await;
                    let stderr = p.last_stderr();
                    let (spoke, resumed) = (p.spoke, p.resumed.clone());
                    p.kill();
                    let detail = format!(
                        "{}{}",
                        describe_exit(status),
                        stderr.map(|l| format!(": {l}")).unwrap_or_default()
                    );
                    if let (false, Some(old), true) = (spoke, resumed, attempts < 2) {
                        self.resume_failed(&old, &detail, &turn).await;
                        continue;
                    }
                    turn.fail(
                        ErrorCode::AgentError.as_str(),
                        format!("Claude Code exited before finishing the turn ({detail})"),
                    )
                    .await;
                    return;
                }
            }
        }
    }

    /// A `--resume` start died without a word: go on in a new session.
    async fn resume_failed(&mut self, old: &str, detail: &str, turn: &Turn) {
        let message = format!(
            "could not resume Claude Code session {old} ({detail}); continuing in a new session"
        );
        eprintln!("claude agent: {message}");
        turn.send(AgentEvent::Info { message }).await;
        self.session = None;
        self.ctx.save_session(&self.conversation_id, None);
    }

    async fn read_turn(
        &mut self,
        signal: &mut AbortSignal,
        settings: &Settings,
        turn: &Turn,
    ) -> TurnEnd {
        let mut streamed_text = false;
        loop {
            let Some(proc) = self.proc.as_mut() else {
                return TurnEnd::Exited;
            };
            let value = tokio::select! {
                biased;
                _ = signal.aborted() => return TurnEnd::Aborted,
                line = proc.stdout.next_line() => match line {
                    Ok(None) | Err(_) => return TurnEnd::Exited,
                    Ok(Some(Line::TooLong(n))) => {
                        eprintln!("claude agent: skipping a {n}-byte stdout line");
                        continue;
                    }
                    Ok(Some(Line::Bytes(bytes))) => {
                        match serde_json::from_slice::<Value>(bytes) {
                            Ok(v) => v,
                            Err(_) => {
                                let text = String::from_utf8_lossy(bytes);
                                if !text.trim().is_empty() {
                                    eprintln!("claude agent: claude stdout (not JSON): {}", text.trim_end());
                                }
                                continue;
                            }
                        }
                    }
                },
            };
            proc.spoke = true;
            if let Some(end) = self
                .translate(&value, settings, turn, &mut streamed_text)
                .await
            {
                return end;
            }
        }
    }

    /// One Claude Code message → frames; `Some` ends the turn.
    async fn translate(
        &mut self,
        v: &Value,
        settings: &Settings,
        turn: &Turn,
        streamed_text: &mut bool,
    ) -> Option<TurnEnd> {
        let cid = || turn.conversation_id().to_string();
        let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "system" => {
                let subtype = v.get("subtype").and_then(Value::as_str).unwrap_or("");
                if subtype == "init"
                    && let Some(id) = session_id(v)
                    && let Some(update) = self.set_session(id, turn)
                {
                    turn.send(update).await;
                }
                None
            }
            "assistant" => {
                if let Some(err) = v.get("error").and_then(Value::as_str) {
                    eprintln!("claude agent: assistant message with error {err}");
                }
                let blocks = v
                    .pointer("/message/content")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for block in &blocks {
                    match block.get("type").and_then(Value::as_str).unwrap_or("") {
                        "text" => {
                            let text = block.get("text").and_then(Value::as_str).unwrap_or("");
                            if text.is_empty() {
                                continue;
                            }
                            if !*streamed_text {
                                turn.send(AgentEvent::TextDelta {
                                    conversation_id: cid(),
                                    delta: text.to_string(),
                                })
                                .await;
                            }
                            *streamed_text = false;
                            turn.send(AgentEvent::Content {
                                conversation_id: cid(),
                                content: text.to_string(),
                            })
                            .await;
                        }
                        "tool_use" => {
                            turn.send(AgentEvent::ToolCall {
                                conversation_id: Some(cid()),
                                tool_call_id: str_field(block, "id"),
                                tool_name: str_field(block, "name"),
                                tool_input: block.get("input").cloned().unwrap_or(Value::Null),
                            })
                            .await;
                        }
                        "thinking" => {
                            let thinking = block.get("thinking").and_then(Value::as_str);
                            turn.send(AgentEvent::Thinking {
                                conversation_id: Some(cid()),
                                content: thinking.map(str::to_string),
                            })
                            .await;
                        }
                        "redacted_thinking" => {
                            turn.send(AgentEvent::Thinking {
                                conversation_id: Some(cid()),
                                content: None,
                            })
                            .await;
                        }
                        _ => {}
                    }
                }
                None
            }
            "user" => {
                if let Some(blocks) = v.pointer("/message/content").and_then(Value::as_array) {
                    for block in blocks {
                        if block.get("type").and_then(Value::as_str) != Some("tool_result") {
                            continue;
                        }
                        turn.send(AgentEvent::ToolResult {
                            conversation_id: Some(cid()),
                            tool_call_id: str_field(block, "tool_use_id"),
                            content: flatten(block.get("content")),
                            is_error: block
                                .get("is_error")
                                .and_then(Value::as_bool)
                                .unwrap_or(false),
                        })
                        .await;
                    }
                }
                None
            }
            "stream_event" if settings.partial_messages => {
                let event = v.get("event")?;
                if event.get("type").and_then(Value::as_str) == Some("content_block_delta")
                    && event.pointer("/delta/type").and_then(Value::as_str) == Some("text_delta")
                    && let Some(text) = event.pointer("/delta/text").and_then(Value::as_str)
                    && !text.is_empty()
                {
                    *streamed_text = true;
                    turn.send(AgentEvent::TextDelta {
                        conversation_id: cid(),
                        delta: text.to_string(),
                    })
                    .await;
                }
                None
            }
            "result" => {
                if let Some(id) = session_id(v)
                    && let Some(update) = self.set_session(id, turn)
                {
                    turn.send(update).await;
                }
                let subtype = v.get("subtype").and_then(Value::as_str).unwrap_or("");
                let is_error = v.get("is_error").and_then(Value::as_bool).unwrap_or(false);
                if is_error || subtype != "success" {
                    return Some(TurnEnd::Failed(result_error(v, subtype)));
                }
                Some(TurnEnd::Finished(usage(v.get("usage"))))
            }
            _ => None,
        }
    }
}

fn session_id(v: &Value) -> Option<&str> {
    v.get("session_id")
        .or_else(|| v.get("sessionId"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn str_field(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// A tool_result's content as text: a string, or its text blocks joined.
fn flatten(content: Option<&Value>) -> String {
    match content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => b
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                Some("image") => "[image]".to_string(),
                _ => b.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Some(other) => other.to_string(),
    }
}

fn usage(u: Option<&Value>) -> TokenUsage {
    let n = |k: &str| {
        u.and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    TokenUsage {
        input_tokens: n("input_tokens")
            + n("cache_creation_input_tokens")
            + n("cache_read_input_tokens"),
        output_tokens: n("output_tokens"),
    }
}

fn result_error(v: &Value, subtype: &str) -> String {
    let mut detail = Vec::new();
    if let Some(r) = v.get("result").and_then(Value::as_str)
        && !r.trim().is_empty()
    {
        detail.push(r.trim().to_string());
    }
    if let Some(errors) = v.get("errors").and_then(Value::as_array) {
        detail.extend(errors.iter().map(|e| match e {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }));
    }
    let subtype = if subtype.is_empty() { "error" } else { subtype };
    if detail.is_empty() {
        format!("Claude Code ended the turn with {subtype}")
    } else {
        format!(
            "Claude Code ended the turn with {subtype}: {}",
            detail.join("; ")
        )
    }
}

impl wire::LineAgent for Claude {
    fn out(&self) -> &Out {
        &self.out
    }

    async fn handle(&mut self, input: AgentInput) {
        Claude::handle(self, input).await
    }

    async fn shutdown(&mut self) {
        Claude::shutdown(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_and_settings() {
        let mut s = Settings::from_env();
        let map = json!({
            "claude_command": ["python3", "stub.py"],
            "claude_model": "sonnet",
            "claude_permission_mode": "acceptEdits",
            "claude_args": "--allowedTools Bash",
        });
        s.apply(map.as_object().unwrap());
        assert_eq!(
            s.argv(Some("abc")),
            [
                "python3",
                "stub.py",
                "-p",
                "--input-format",
                "stream-json",
                "--output-format",
                "stream-json",
                "--verbose",
                "--model",
                "sonnet",
                "--permission-mode",
                "acceptEdits",
                "--allowedTools",
                "Bash",
                "--resume",
                "abc"
            ]
        );
        s.apply(
            json!({"claude_command": "my-claude --x"})
                .as_object()
                .unwrap(),
        );
        assert_eq!(&s.argv(None)[..3], ["my-claude", "--x", "-p"]);
    }

    #[test]
    fn result_translation() {
        let ok = json!({"type": "result", "subtype": "success", "is_error": false,
            "usage": {"input_tokens": 10, "cache_creation_input_tokens": 5,
                      "cache_read_input_tokens": 100, "output_tokens": 42}});
        assert_eq!(
            usage(ok.get("usage")),
            TokenUsage {
                input_tokens: 115,
                output_tokens: 42
            }
        );
        let err =
            json!({"type": "result", "subtype": "error_max_turns", "errors": ["too many turns"]});
        assert_eq!(
            result_error(&err, "error_max_turns"),
            "Claude Code ended the turn with error_max_turns: too many turns"
        );
        assert_eq!(
            flatten(Some(
                &json!([{"type": "text", "text": "a"}, {"type": "image"}])
            )),
            "a\n[image]"
        );
    }
}
