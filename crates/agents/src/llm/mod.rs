//! The `llm` agent: a tool-using loop against any OpenAI-compatible Chat
//! Completions endpoint (OpenAI, vLLM, llama.cpp's server, Ollama, LM Studio,
//! OpenRouter, or aishell's own model proxy).
//!
//! * Settings ([`settings`]): `AISHELL_LLM_BASE_URL`, `AISHELL_LLM_MODEL`,
//!   `AISHELL_LLM_API_KEY`, overridden by `init.settings` `llm_base_url`,
//!   `llm_model`, `llm_api_key`; also `system_prompt`, `max_tokens`,
//!   `bash_timeout_secs` (default 120), `context_chars` (default 200000).
//! * One message: the user message is appended to the conversation, then
//!   up to [`MAX_MODEL_CALLS`] streamed requests ([`client`]): `text_delta` as
//!   text arrives, `thinking` for reasoning, `content` with the whole text of
//!   each assistant message, then for each tool call `tool_call`, the tool
//!   ([`tools`]), `tool_result`, and `progress` with the usage so far; an
//!   answer without tool calls ends the turn with `finish` and the summed
//!   token usage. Failures end it with `error AGENT_ERROR`.
//! * System prompt: a built-in default, then the workspace's `AGENTS.md` if
//!   there is one, then the `system_prompt` setting.
//! * State ([`history`]): `.aishell/llm/{conversation_id}.jsonl`, one OpenAI
//!   message per line, loaded on `restore_conversations` or on first use, so a
//!   new process continues with the full history. Each request is fitted
//!   into `context_chars` (old tool outputs trimmed, then old turns dropped).
//! * The first message of a conversation gets `conversation_update{title}`.
//!
//! Abort semantics: `abort{conversation_id?}` drops the HTTP stream or kills
//! the running tool (bash: its whole process group) of that conversation
//! (all when omitted), and drops its queued messages; each such turn ends
//! with `error ABORTED` (text streamed so far is kept in the history; tool
//! calls that did not run get a stub result). End of input aborts everything
//! the same way before the agent exits.
//!
//! Messages of one conversation run one at a time, in order; different
//! conversations run concurrently. Conversation ids name files, so they must
//! match `[A-Za-z0-9_-]{1,128}` (others get a terminal `BAD_FRAME`).

mod client;
mod history;
mod settings;
mod sse;
mod tools;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aishell_protocol::agent::{AgentEvent, AgentInput, TokenUsage};
use aishell_protocol::codes::ErrorCode;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use self::client::{Client, Failure};
use self::history::{History, SharedStore};
use self::settings::Settings;
use self::tools::Workspace;
use crate::wire::{self, ABORTED, AbortSignal, Aborts, Out, Turn};
use crate::wire::{shorten, valid_id};

/// Model calls per message before the turn gives up.
pub(crate) const MAX_MODEL_CALLS: usize = 50;
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
const MAX_TITLE_CHARS: usize = 60;
/// Longest `AGENTS.md` taken into the system prompt.
const MAX_AGENTS_MD_CHARS: usize = 32_000;

const DEFAULT_SYSTEM_PROMPT: &str = "\
You are a coding agent working in a workspace directory on the user's behalf. \
Use the tools to look at and change files and to run commands; every path is \
relative to the workspace root, and nothing outside it can be reached. \
Work in small, checked steps: read a file before you edit it, prefer edit_file \
(an exact, unique string replacement) over rewriting whole files, and run the \
project's tests or the program to check your work when you can. \
When the task is done, answer with a short summary of what you did and found.";

pub(crate) async fn run<R, W>(input: R, output: W, workspace: PathBuf) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // reqwest uses rustls with ring; make it the process default so nothing
    // has to guess should another provider be linked in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ws = Workspace::new(&workspace).map_err(|e| {
        anyhow::anyhow!(
            "llm agent: the workspace {} is not usable: {e}",
            workspace.display()
        )
    })?;
    let client = Client::new()?;
    let (out, writer) = wire::spawn_writer(output);
    let agent = Llm {
        state_dir: ws.root().join(".aishell").join("llm"),
        ctx: Arc::new(Ctx { ws, client }),
        out,
        settings: Settings::from_env(),
        aborts: Aborts::default(),
        convs: HashMap::new(),
        retired: Vec::new(),
    };
    wire::serve_lines("llm", input, agent, writer, SHUTDOWN_GRACE).await;
    Ok(())
}

/// What every conversation worker shares.
struct Ctx {
    ws: Workspace,
    client: Client,
}

struct Conv {
    tx: mpsc::UnboundedSender<Job>,
    store: SharedStore,
    task: JoinHandle<()>,
}

enum Job {
    Message {
        content: String,
        signal: AbortSignal,
        settings: Box<Settings>,
        turn: Turn,
    },
    Reset,
}

struct Llm {
    out: Out,
    ctx: Arc<Ctx>,
    state_dir: PathBuf,
    settings: Settings,
    aborts: Aborts,
    convs: HashMap<String, Conv>,
    /// Workers of deleted conversations, still draining.
    retired: Vec<JoinHandle<()>>,
}

impl Llm {
    fn history_path(&self, conversation_id: &str) -> PathBuf {
        self.state_dir.join(format!("{conversation_id}.jsonl"))
    }

    async fn handle(&mut self, input: AgentInput) {
        match input {
            AgentInput::Init { settings, .. } => {
                self.settings.apply(&settings);
                eprintln!("llm agent: settings {:?}", self.settings);
                self.out
                    .send(crate::wire::init_answer(
                        "llm",
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
                    .send(crate::wire::no_questions("llm", &request_id))
                    .await;
            }
            AgentInput::ResetConversation { conversation_id } => {
                if !self.check_id(&conversation_id).await {
                    return;
                }
                match self.convs.get(&conversation_id) {
                    // After whatever the worker has queued.
                    Some(conv) if conv.tx.send(Job::Reset).is_ok() => {}
                    _ => {
                        let store = history::shared_store(self.history_path(&conversation_id));
                        History::new(Vec::new(), store).clear();
                    }
                }
            }
            AgentInput::DeleteConversation { conversation_id } => {
                if !self.check_id(&conversation_id).await {
                    return;
                }
                self.aborts.abort(Some(&conversation_id));
                self.aborts.forget(&conversation_id);
                let path = self.history_path(&conversation_id);
                let conv = self.convs.remove(&conversation_id);
                let store = conv
                    .as_ref()
                    .map(|c| c.store.clone())
                    .unwrap_or_else(|| history::shared_store(path.clone()));
                {
                    let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
                    store.deleted = true;
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => eprintln!("llm agent: cannot delete {}: {e}", path.display()),
                    }
                }
                if let Some(conv) = conv {
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
                            "llm agent: not restoring invalid conversation id {}",
                            shorten(&id)
                        );
                        continue;
                    }
                    if self.convs.contains_key(&id) {
                        found += 1;
                        continue;
                    }
                    let path = self.history_path(&id);
                    match history::load(&path) {
                        Ok(messages) if !messages.is_empty() => {
                            eprintln!(
                                "llm agent: restored conversation {id} ({} messages)",
                                messages.len()
                            );
                            self.spawn_worker(&id, Some(messages));
                            found += 1;
                        }
                        Ok(_) => {}
                        Err(e) => eprintln!("llm agent: cannot read {}: {e}", path.display()),
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

    fn spawn_worker(&mut self, conversation_id: &str, preloaded: Option<Vec<Value>>) {
        let store = history::shared_store(self.history_path(conversation_id));
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(worker(self.ctx.clone(), store.clone(), preloaded, rx));
        self.convs
            .insert(conversation_id.to_string(), Conv { tx, store, task });
    }

    async fn message(&mut self, conversation_id: String, content: String) {
        if !wire::check_conversation_id(&self.out, &conversation_id, true).await {
            return;
        }
        let mut job = Job::Message {
            content,
            signal: self.aborts.signal(&conversation_id),
            settings: Box::new(self.settings.clone()),
            turn: Turn::new(conversation_id.clone(), self.out.clone()),
        };
        for _ in 0..2 {
            if !self.convs.contains_key(&conversation_id) {
                self.spawn_worker(&conversation_id, None);
            }
            let conv = &self.convs[&conversation_id];
            match conv.tx.send(job) {
                Ok(()) => return,
                // The worker is gone (it panicked): start a new one.
                Err(mpsc::error::SendError(j)) => {
                    job = j;
                    self.convs.remove(&conversation_id);
                }
            }
        }
    }

    /// End of input: abort every turn, let each report, wait (briefly).
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
            eprintln!("llm agent: turns did not end in time; cancelling them");
            for a in aborters {
                a.abort();
            }
        }
    }
}

async fn worker(
    ctx: Arc<Ctx>,
    store: SharedStore,
    preloaded: Option<Vec<Value>>,
    mut rx: mpsc::UnboundedReceiver<Job>,
) {
    let mut history = preloaded.map(|m| History::new(m, store.clone()));
    while let Some(job) = rx.recv().await {
        let h = history.get_or_insert_with(|| {
            let path = store.lock().unwrap_or_else(|e| e.into_inner()).path.clone();
            let messages = history::load(&path).unwrap_or_else(|e| {
                eprintln!("llm agent: cannot read {}: {e}", path.display());
                Vec::new()
            });
            History::new(messages, store.clone())
        });
        match job {
            Job::Reset => h.clear(),
            Job::Message {
                content,
                signal,
                settings,
                turn,
            } => run_turn(&ctx, h, content, signal, &settings, turn).await,
        }
    }
}

/// The system prompt: default, `AGENTS.md`, setting.
fn system_prompt(ws: &Workspace, settings: &Settings) -> String {
    let mut prompt = DEFAULT_SYSTEM_PROMPT.to_string();
    if let Ok(path) = ws.existing("AGENTS.md")
        && let Ok(text) = std::fs::read_to_string(&path)
        && !text.trim().is_empty()
    {
        let text: String = text.chars().take(MAX_AGENTS_MD_CHARS).collect();
        prompt.push_str("\n\n# Instructions from the workspace's AGENTS.md\n\n");
        prompt.push_str(text.trim());
    }
    if let Some(extra) = &settings.system_prompt {
        prompt.push_str("\n\n");
        prompt.push_str(extra);
    }
    prompt
}

fn agent_error() -> &'static str {
    ErrorCode::AgentError.as_str()
}

async fn run_turn(
    ctx: &Ctx,
    history: &mut History,
    content: String,
    mut signal: AbortSignal,
    settings: &Settings,
    turn: Turn,
) {
    if signal.is_aborted() {
        turn.fail(ABORTED, "aborted before the model was called")
            .await;
        return;
    }
    let (url, model) = match settings.endpoint() {
        Ok(e) => e,
        Err(message) => {
            turn.fail(agent_error(), message).await;
            return;
        }
    };
    let conversation_id = turn.conversation_id().to_string();
    if history.messages.is_empty() {
        let title: String = content.trim().chars().take(MAX_TITLE_CHARS).collect();
        turn.send(AgentEvent::ConversationUpdate {
            conversation_id: conversation_id.clone(),
            title: Some(title),
            resume_handle: None,
        })
        .await;
    }
    history.push(json!({"role": "user", "content": content}));
    let system = system_prompt(&ctx.ws, settings);
    let tool_defs = tools::definitions();
    let mut usage = TokenUsage::default();

    for _ in 0..MAX_MODEL_CALLS {
        let (messages, trimmed) = history::fit(&system, &history.messages, settings.context_chars);
        if trimmed.any() {
            eprintln!(
                "llm agent: conversation {conversation_id} is over {} chars: trimmed {} tool outputs, dropped {} old messages, cut {} long strings",
                settings.context_chars,
                trimmed.tool_outputs,
                trimmed.messages_dropped,
                trimmed.strings_cut
            );
        }
        let mut body = json!({
            "model": model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "tools": tool_defs,
        });
        if let Some(n) = settings.max_tokens {
            body["max_tokens"] = n.into();
        }
        let reply = ctx
            .client
            .complete(&url, settings.api_key.as_deref(), &body, &mut signal, &turn)
            .await;
        let acc = match reply {
            Ok(acc) => acc,
            Err(Failure::Aborted(partial)) => {
                if !partial.is_empty() {
                    history.push(json!({"role": "assistant", "content": partial}));
                }
                turn.fail(ABORTED, "aborted while the model was answering")
                    .await;
                return;
            }
            Err(Failure::Error(message)) => {
                eprintln!("llm agent: conversation {conversation_id}: {message}");
                turn.fail(agent_error(), message).await;
                return;
            }
        };
        if let Some(u) = acc.usage {
            usage.input_tokens += u.prompt_tokens;
            usage.output_tokens += u.completion_tokens;
        }
        let calls = acc.tool_calls();
        if !acc.content.is_empty() {
            turn.send(AgentEvent::Content {
                conversation_id: conversation_id.clone(),
                content: acc.content.clone(),
            })
            .await;
        }
        let mut message = json!({"role": "assistant", "content": acc.content});
        if !calls.is_empty() {
            if acc.content.is_empty() {
                message["content"] = Value::Null;
            }
            message["tool_calls"] = calls
                .iter()
                .map(|c| {
                    json!({"id": c.id, "type": "function",
                           "function": {"name": c.name, "arguments": c.arguments}})
                })
                .collect();
        }
        history.push(message);
        if calls.is_empty() {
            if acc.finish_reason.as_deref() == Some("length") {
                turn.send(AgentEvent::Info {
                    message: "the model's answer was cut at its output token limit (max_tokens)"
                        .to_string(),
                })
                .await;
            }
            turn.finish(usage).await;
            return;
        }
        turn.send(AgentEvent::Progress {
            conversation_id: Some(conversation_id.clone()),
            token_usage: usage,
        })
        .await;
        for (i, call) in calls.iter().enumerate() {
            let tool_input = if call.arguments.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(&call.arguments)
                    .unwrap_or_else(|_| Value::String(call.arguments.clone()))
            };
            turn.send(AgentEvent::ToolCall {
                conversation_id: Some(conversation_id.clone()),
                tool_call_id: call.id.clone(),
                tool_name: call.name.clone(),
                tool_input,
            })
            .await;
            let outcome = tools::run(
                &ctx.ws,
                &call.name,
                &call.arguments,
                settings.bash_timeout,
                &mut signal,
            )
            .await;
            turn.send(AgentEvent::ToolResult {
                conversation_id: Some(conversation_id.clone()),
                tool_call_id: call.id.clone(),
                content: outcome.content.clone(),
                is_error: outcome.is_error,
            })
            .await;
            history.push(json!({
                "role": "tool",
                "tool_call_id": call.id,
                "content": outcome.content,
            }));
            if outcome.aborted || signal.is_aborted() {
                for rest in &calls[i + 1..] {
                    history.push(history::missing_result(&rest.id));
                }
                turn.fail(ABORTED, format!("aborted while running {}", call.name))
                    .await;
                return;
            }
        }
    }
    turn.fail(
        agent_error(),
        format!("stopped after {MAX_MODEL_CALLS} model calls without a final answer"),
    )
    .await;
}

impl wire::LineAgent for Llm {
    fn out(&self) -> &Out {
        &self.out
    }

    async fn handle(&mut self, input: AgentInput) {
        Llm::handle(self, input).await
    }

    async fn shutdown(&mut self) {
        Llm::shutdown(self).await
    }
}
