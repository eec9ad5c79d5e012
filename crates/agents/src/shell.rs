//! The `shell` agent: runs each message as `sh -c CONTENT` in the workspace.
//! A demo that needs no model.
//!
//! * The workspace is the process's cwd at start (the runner sets it).
//! * `init.settings`: `command_timeout_secs` (default 600, fractions allowed)
//!   and `output_limit_bytes` (default 1 MiB).
//! * One message: `tool_call{tool_name: "shell", tool_input: {command}}`, one
//!   `text_delta` per chunk of output (stdout and stderr interleaved as they
//!   arrive, lossy UTF-8, never splitting a character), then
//!   `tool_result{content: output, is_error: exit != 0}`, `content{"exit status
//!   N" | "killed by signal S" | "timed out after N s"}` and `finish`.
//! * Output is capped at `output_limit_bytes`: both the streamed deltas and the
//!   tool result stop there and carry an `[output truncated]` marker; the
//!   command keeps running (its output is drained and discarded).
//! * Each command runs in its own process group. A timeout kills the whole
//!   group (SIGKILL) and ends the turn normally (`tool_result` is_error, then
//!   `content` + `finish`). Background processes that outlive the command are
//!   left alone unless they hold its output pipes open, in which case they are
//!   killed too (shortly after the command exits) so the turn can end.
//! * Messages of one conversation run one at a time, in order; different
//!   conversations run concurrently.
//!
//! Abort semantics: `abort{conversation_id?}` kills the running command of
//! that conversation (all conversations when omitted) and drops its queued
//! messages. A killed command gets `tool_result{is_error: true}` and then the
//! terminal `error{conversation_id, code: "ABORTED"}`; a queued message that
//! never ran gets only the `error` frame. End of input aborts everything the
//! same way before the agent exits.
//!
//! State: `.aishell/shell/{conversation_id}.jsonl` in the workspace, one line
//! `{command, exit_code, started_at, outcome, signal?}` per executed command,
//! so a new agent process can continue (`restore_conversations`). Ids used in
//! paths must match `[A-Za-z0-9_-]{1,128}`; a message with another id gets a
//! terminal `error` `BAD_FRAME`.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aishell_protocol::agent::{AgentEvent, AgentInput, TokenUsage};
use aishell_protocol::codes::ErrorCode;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::process::{self, End, Limits};
use crate::wire::{self, ABORTED, AbortSignal, Aborts, Out, Turn, shorten, valid_id};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_OUTPUT_LIMIT: usize = 1024 * 1024;
/// How long shutdown waits for running commands to be killed and reported.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
const MAX_TITLE_CHARS: usize = 60;

pub(crate) async fn run<R, W>(input: R, output: W, workspace: PathBuf) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out, writer) = wire::spawn_writer(output);
    let agent = Shell::new(out, workspace);
    wire::serve_lines("shell", input, agent, writer, SHUTDOWN_GRACE).await;
    Ok(())
}

#[derive(Debug, Clone)]
struct Settings {
    timeout: Duration,
    output_limit: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timeout: DEFAULT_TIMEOUT,
            output_limit: DEFAULT_OUTPUT_LIMIT,
        }
    }
}

impl Settings {
    fn limits(&self) -> Limits {
        Limits {
            timeout: self.timeout,
            output_limit: self.output_limit,
        }
    }

    fn apply(&mut self, settings: &serde_json::Map<String, serde_json::Value>) {
        if let Some(v) = settings.get("command_timeout_secs") {
            match v.as_f64() {
                Some(secs) if secs > 0.0 && secs.is_finite() && secs < 1e9 => {
                    self.timeout = Duration::from_secs_f64(secs);
                }
                _ => eprintln!(
                    "shell agent: ignoring invalid command_timeout_secs {v}; keeping {} s",
                    fmt_secs(self.timeout)
                ),
            }
        }
        if let Some(v) = settings.get("output_limit_bytes") {
            match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) => self.output_limit = n,
                None => eprintln!(
                    "shell agent: ignoring invalid output_limit_bytes {v}; keeping {}",
                    self.output_limit
                ),
            }
        }
    }
}

/// What every conversation worker shares.
struct Ctx {
    workspace: PathBuf,
}

/// A conversation with a worker in this process.
struct Conv {
    tx: mpsc::UnboundedSender<Job>,
    history: Arc<Mutex<History>>,
    task: JoinHandle<()>,
}

/// A conversation's history file; the lock orders appends against
/// reset/delete.
struct History {
    path: PathBuf,
    deleted: bool,
}

struct Job {
    command: String,
    signal: AbortSignal,
    settings: Settings,
    turn: Turn,
}

/// One line of `.aishell/shell/{conversation_id}.jsonl`.
#[derive(Debug, Serialize, Deserialize)]
struct HistoryEntry {
    command: String,
    exit_code: Option<i32>,
    started_at: String,
    /// `exited`, `signaled`, `timed_out` or `aborted`.
    #[serde(default)]
    outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signal: Option<i32>,
}

struct Shell {
    out: Out,
    ctx: Arc<Ctx>,
    state_dir: PathBuf,
    settings: Settings,
    aborts: Aborts,
    convs: HashMap<String, Conv>,
    /// Conversations that already had their first message (or were restored).
    known: HashSet<String>,
    /// Workers of deleted conversations, still draining.
    retired: Vec<JoinHandle<()>>,
}

impl Shell {
    fn new(out: Out, workspace: PathBuf) -> Self {
        Shell {
            state_dir: workspace.join(".aishell").join("shell"),
            ctx: Arc::new(Ctx { workspace }),
            out,
            settings: Settings::default(),
            aborts: Aborts::default(),
            convs: HashMap::new(),
            known: HashSet::new(),
            retired: Vec::new(),
        }
    }

    fn history_path(&self, conversation_id: &str) -> PathBuf {
        self.state_dir.join(format!("{conversation_id}.jsonl"))
    }

    async fn handle(&mut self, input: AgentInput) {
        match input {
            AgentInput::Init {
                workspace,
                settings,
                ..
            } => {
                self.settings.apply(&settings);
                if let Some(ws) = workspace
                    && Path::new(&ws) != self.ctx.workspace
                {
                    eprintln!(
                        "shell agent: init names workspace {ws}, running commands in the cwd {}",
                        self.ctx.workspace.display()
                    );
                }
                self.out
                    .send(crate::wire::init_answer(
                        "shell",
                        &["tools", "streaming", "abort", "restore"],
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
                    .send(crate::wire::no_questions("shell", &request_id))
                    .await;
            }
            AgentInput::ResetConversation { conversation_id } => {
                if !self.check_id(&conversation_id).await {
                    return;
                }
                self.known.remove(&conversation_id);
                let path = self.history_path(&conversation_id);
                let lock = self.convs.get(&conversation_id).map(|c| c.history.clone());
                let _guard = lock
                    .as_ref()
                    .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
                if path.exists()
                    && let Err(e) = std::fs::File::create(&path)
                {
                    eprintln!("shell agent: cannot truncate {}: {e}", path.display());
                }
            }
            AgentInput::DeleteConversation { conversation_id } => {
                if !self.check_id(&conversation_id).await {
                    return;
                }
                self.aborts.abort(Some(&conversation_id));
                self.aborts.forget(&conversation_id);
                self.known.remove(&conversation_id);
                let path = self.history_path(&conversation_id);
                let conv = self.convs.remove(&conversation_id);
                if let Some(conv) = &conv {
                    conv.history
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .deleted = true;
                }
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => eprintln!("shell agent: cannot delete {}: {e}", path.display()),
                }
                if let Some(conv) = conv {
                    // Dropping the sender lets the worker drain (aborted) and end.
                    drop(conv.tx);
                    self.retired.retain(|t| !t.is_finished());
                    self.retired.push(conv.task);
                }
            }
            AgentInput::RestoreConversations { conversations } => {
                let mut found = 0usize;
                for c in conversations {
                    let id = c.conversation_id;
                    if !valid_id(&id) {
                        eprintln!(
                            "shell agent: not restoring invalid conversation id {}",
                            shorten(&id)
                        );
                        continue;
                    }
                    let path = self.history_path(&id);
                    match std::fs::read_to_string(&path) {
                        Ok(text) => {
                            let commands = text
                                .lines()
                                .filter(|l| serde_json::from_str::<HistoryEntry>(l).is_ok())
                                .count();
                            eprintln!(
                                "shell agent: restored conversation {id} ({commands} commands)"
                            );
                            self.known.insert(id);
                            found += 1;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => eprintln!("shell agent: cannot read {}: {e}", path.display()),
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

    /// `false` (after a `BAD_FRAME` error without conversation) for an id that
    /// cannot name a file.
    async fn check_id(&self, conversation_id: &str) -> bool {
        wire::check_conversation_id(&self.out, conversation_id, false).await
    }

    async fn message(&mut self, conversation_id: String, command: String) {
        if !wire::check_conversation_id(&self.out, &conversation_id, true).await {
            return;
        }
        if !self.known.contains(&conversation_id) {
            let path = self.history_path(&conversation_id);
            let has_history = std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
            if !has_history {
                let title: String = command.trim().chars().take(MAX_TITLE_CHARS).collect();
                self.out
                    .send(AgentEvent::ConversationUpdate {
                        conversation_id: conversation_id.clone(),
                        title: Some(title),
                        resume_handle: None,
                    })
                    .await;
            }
            self.known.insert(conversation_id.clone());
        }
        let job = Job {
            command,
            signal: self.aborts.signal(&conversation_id),
            settings: self.settings.clone(),
            turn: Turn::new(conversation_id.clone(), self.out.clone()),
        };
        let job = match self.convs.get(&conversation_id) {
            Some(conv) => match conv.tx.send(job) {
                Ok(()) => return,
                // The worker is gone (it panicked); start a new one.
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let history = Arc::new(Mutex::new(History {
            path: self.history_path(&conversation_id),
            deleted: false,
        }));
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(job);
        let task = tokio::spawn(worker(self.ctx.clone(), history.clone(), rx));
        self.convs
            .insert(conversation_id, Conv { tx, history, task });
    }

    /// End of input: kill every command, report every turn, wait for it.
    async fn shutdown(&mut self) {
        self.aborts.abort(None);
        let mut tasks: Vec<JoinHandle<()>> = self.retired.drain(..).collect();
        for (_, conv) in self.convs.drain() {
            drop(conv.tx);
            tasks.push(conv.task);
        }
        let aborters: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            for t in tasks {
                let _ = t.await;
            }
        })
        .await;
        if drained.is_err() {
            eprintln!("shell agent: commands did not end in time; cancelling them");
            // Dropping a job kills its process group and reports its turn.
            for a in aborters {
                a.abort();
            }
        }
    }
}

async fn worker(ctx: Arc<Ctx>, history: Arc<Mutex<History>>, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = rx.recv().await {
        run_job(&ctx, &history, job).await;
    }
}

async fn run_job(ctx: &Ctx, history: &Mutex<History>, job: Job) {
    let Job {
        command,
        mut signal,
        settings,
        turn,
    } = job;
    let conversation_id = turn.conversation_id().to_string();
    if signal.is_aborted() {
        turn.fail(ABORTED, "aborted before the command started")
            .await;
        return;
    }
    let tool_call_id = uuid::Uuid::new_v4().to_string();
    turn.send(AgentEvent::ToolCall {
        conversation_id: Some(conversation_id.clone()),
        tool_call_id: tool_call_id.clone(),
        tool_name: "shell".to_string(),
        tool_input: serde_json::json!({ "command": command }),
    })
    .await;
    let started_at = now_rfc3339();
    let (output, end) = match process::execute(
        &ctx.workspace,
        &command,
        settings.limits(),
        &mut signal,
        Some(&turn),
    )
    .await
    {
        Ok(done) => done,
        Err(e) => {
            let message = format!("could not run the command: {e}");
            eprintln!("shell agent: {message}");
            turn.send(AgentEvent::ToolResult {
                conversation_id: Some(conversation_id),
                tool_call_id,
                content: message.clone(),
                is_error: true,
            })
            .await;
            turn.fail(ErrorCode::AgentError.as_str(), message).await;
            return;
        }
    };
    let (exit_code, signal_no, outcome) = match end {
        End::Exited(c) => (Some(c), None, "exited"),
        End::Signaled(s) => (None, Some(s), "signaled"),
        End::TimedOut(_) => (None, Some(libc::SIGKILL), "timed_out"),
        End::Aborted => (None, Some(libc::SIGKILL), "aborted"),
    };
    append_history(
        history,
        &HistoryEntry {
            command,
            exit_code,
            started_at,
            outcome: outcome.to_string(),
            signal: signal_no,
        },
    );
    let summary = match end {
        End::Exited(c) => format!("exit status {c}"),
        End::Signaled(s) => format!("killed by signal {s}"),
        End::TimedOut(t) => format!("timed out after {} s", fmt_secs(t)),
        End::Aborted => "aborted".to_string(),
    };
    let content = match end {
        End::TimedOut(_) | End::Aborted if output.is_empty() => summary.clone(),
        End::TimedOut(_) | End::Aborted => format!("{output}\n{summary}"),
        _ => output,
    };
    turn.send(AgentEvent::ToolResult {
        conversation_id: Some(conversation_id.clone()),
        tool_call_id,
        content,
        is_error: !matches!(end, End::Exited(0)),
    })
    .await;
    if let End::Aborted = end {
        turn.fail(ABORTED, "the command was aborted").await;
        return;
    }
    turn.send(AgentEvent::Content {
        conversation_id,
        content: summary,
    })
    .await;
    turn.finish(TokenUsage::default()).await;
}

fn append_history(history: &Mutex<History>, entry: &HistoryEntry) {
    let history = history.lock().unwrap_or_else(|e| e.into_inner());
    if history.deleted {
        return;
    }
    let result = (|| {
        if let Some(dir) = history.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&history.path)?
            .write_all(&line)
    })();
    if let Err(e) = result {
        eprintln!(
            "shell agent: cannot append to {}: {e}",
            history.path.display()
        );
    }
}

fn fmt_secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{}", d.as_secs_f64())
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl wire::LineAgent for Shell {
    fn out(&self) -> &Out {
        &self.out
    }

    async fn handle(&mut self, input: AgentInput) {
        Shell::handle(self, input).await
    }

    async fn shutdown(&mut self) {
        Shell::shutdown(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("abc-DEF_123"));
        assert!(valid_id(&"a".repeat(128)));
        assert!(!valid_id(&"a".repeat(129)));
        assert!(!valid_id(""));
        assert!(!valid_id("../etc"));
        assert!(!valid_id("a b"));
        assert!(!valid_id("é"));
    }

    #[test]
    fn settings_from_init() {
        let mut s = Settings::default();
        let map = serde_json::json!({"command_timeout_secs": 1.5, "output_limit_bytes": 10});
        s.apply(map.as_object().unwrap());
        assert_eq!(s.timeout, Duration::from_millis(1500));
        assert_eq!(s.output_limit, 10);
        let bad = serde_json::json!({"command_timeout_secs": -1, "output_limit_bytes": "x"});
        s.apply(bad.as_object().unwrap());
        assert_eq!(s.timeout, Duration::from_millis(1500));
        assert_eq!(s.output_limit, 10);
    }
}
