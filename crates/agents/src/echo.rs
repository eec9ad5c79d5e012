//! The `echo` agent: replies with what it was sent. Used by tests and
//! benchmarks, so the plain path does no sleeps and few allocations.
//!
//! `message{content}` → `text_delta{content}`, `content{content}`,
//! `finish{token_usage: words in / words out}`. Test hooks (the content starts
//! with one of these):
//!
//! * `/stream N`: N `text_delta` frames `"chunk-{i} "`, then `content` of their
//!   concatenation, then `finish`;
//! * `/ask QUESTION`: `ask_question{options: ["yes","no"]}`; the matching
//!   `answer_question` gets `content{"you answered: ANSWER"}` and `finish`;
//! * `/crash`: writes `echo agent crashing on request` to stderr and exits the
//!   process with code 3 at once;
//! * `/sleep MS`: sleeps MS ms in a task (other input keeps being handled),
//!   then `content{"slept MS ms"}` and `finish`.
//!
//! Abort semantics: an aborted turn (`/sleep` still sleeping, `/ask` still
//! waiting, or anything in flight at end of input) ends with the terminal
//! frame `error{conversation_id, error: {code: "ABORTED"}}`. Plain messages
//! and `/stream` complete before the next input line is read, so there is
//! nothing left to abort.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aishell_protocol::agent::{AgentEvent, AgentInput, TokenUsage};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;

use crate::wire::{self, ABORTED, Aborts, Out, Turn, words};

/// Upper bound for `/stream N` (keeps a typo from streaming forever).
const MAX_STREAM: u64 = 10_000_000;
/// How long shutdown waits for in-flight turns to send their terminal frame.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub(crate) async fn run<R, W>(input: R, output: W) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out, writer) = wire::spawn_writer(output);
    let agent = Echo {
        out,
        aborts: Aborts::default(),
        pending: HashMap::new(),
        restored: HashSet::new(),
        tasks: JoinSet::new(),
    };
    wire::serve_lines("echo", input, agent, writer, SHUTDOWN_GRACE).await;
    Ok(())
}

struct Echo {
    out: Out,
    aborts: Aborts,
    /// Open `/ask` questions by request id.
    pending: HashMap<String, PendingAsk>,
    restored: HashSet<String>,
    tasks: JoinSet<()>,
}

struct PendingAsk {
    turn: Turn,
    input_tokens: u64,
}

impl Echo {
    async fn handle(&mut self, input: AgentInput) {
        match input {
            AgentInput::Init { .. } => {
                self.out
                    .send(crate::wire::init_answer(
                        "echo",
                        &["streaming", "ask_question", "abort"],
                    ))
                    .await;
            }
            AgentInput::Message {
                conversation_id,
                content,
                ..
            } => self.message(conversation_id, content).await,
            AgentInput::Abort { conversation_id } => {
                self.abort(conversation_id.as_deref()).await;
            }
            AgentInput::AnswerQuestion { request_id, answer } => {
                match self.pending.remove(&request_id) {
                    Some(ask) => {
                        let reply = format!("you answered: {answer}");
                        let output_tokens = words(&reply);
                        ask.turn
                            .send(AgentEvent::Content {
                                conversation_id: ask.turn.conversation_id().to_string(),
                                content: reply,
                            })
                            .await;
                        ask.turn
                            .finish(TokenUsage {
                                input_tokens: ask.input_tokens,
                                output_tokens,
                            })
                            .await;
                    }
                    None => {
                        self.out
                            .send(AgentEvent::Info {
                                message: format!(
                                    "echo agent: no open question with request_id {request_id}"
                                ),
                            })
                            .await;
                    }
                }
            }
            AgentInput::ResetConversation { conversation_id } => {
                self.restored.remove(&conversation_id);
            }
            AgentInput::DeleteConversation { conversation_id } => {
                self.abort(Some(&conversation_id)).await;
                self.aborts.forget(&conversation_id);
                self.restored.remove(&conversation_id);
            }
            AgentInput::RestoreConversations { conversations } => {
                let n = conversations.len();
                self.restored
                    .extend(conversations.into_iter().map(|c| c.conversation_id));
                self.out
                    .send(AgentEvent::Info {
                        message: format!("restored {n} conversations"),
                    })
                    .await;
            }
            AgentInput::Ping { id } => self.out.send(AgentEvent::Pong { id }).await,
        }
    }

    async fn message(&mut self, conversation_id: String, content: String) {
        let input_tokens = words(&content);
        let text = content.trim();
        if let Some(n) = hook(text, "/stream").and_then(|n| n.parse::<u64>().ok()) {
            let n = n.min(MAX_STREAM);
            let mut all = String::with_capacity(n as usize * 9);
            for i in 0..n {
                let delta = format!("chunk-{i} ");
                all.push_str(&delta);
                self.out
                    .send(AgentEvent::TextDelta {
                        conversation_id: conversation_id.clone(),
                        delta,
                    })
                    .await;
            }
            self.reply_end(conversation_id, all, input_tokens, n).await;
        } else if let Some(question) = hook(text, "/ask") {
            let request_id = uuid::Uuid::new_v4().to_string();
            let question = if question.is_empty() {
                "yes or no?".to_string()
            } else {
                question.to_string()
            };
            self.out
                .send(AgentEvent::AskQuestion {
                    conversation_id: Some(conversation_id.clone()),
                    request_id: request_id.clone(),
                    question,
                    options: Some(vec!["yes".to_string(), "no".to_string()]),
                })
                .await;
            let turn = Turn::new(conversation_id, self.out.clone());
            self.pending
                .insert(request_id, PendingAsk { turn, input_tokens });
        } else if hook(text, "/crash").is_some() {
            eprintln!("echo agent crashing on request");
            std::process::exit(3);
        } else if let Some(ms) = hook(text, "/sleep").and_then(|n| n.parse::<u64>().ok()) {
            let mut signal = self.aborts.signal(&conversation_id);
            let turn = Turn::new(conversation_id, self.out.clone());
            self.tasks.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => {
                        turn.send(AgentEvent::Content {
                            conversation_id: turn.conversation_id().to_string(),
                            content: format!("slept {ms} ms"),
                        })
                        .await;
                        turn.finish(TokenUsage { input_tokens, output_tokens: 3 }).await;
                    }
                    _ = signal.aborted() => {
                        turn.fail(ABORTED, format!("aborted after less than {ms} ms of sleep")).await;
                    }
                }
            });
        } else {
            self.out
                .send(AgentEvent::TextDelta {
                    conversation_id: conversation_id.clone(),
                    delta: content.clone(),
                })
                .await;
            self.reply_end(conversation_id, content, input_tokens, input_tokens)
                .await;
        }
    }

    /// `content` + `finish`.
    async fn reply_end(
        &self,
        conversation_id: String,
        content: String,
        input_tokens: u64,
        output_tokens: u64,
    ) {
        self.out
            .send(AgentEvent::Content {
                conversation_id: conversation_id.clone(),
                content,
            })
            .await;
        self.out
            .send(AgentEvent::Finish {
                conversation_id,
                token_usage: TokenUsage {
                    input_tokens,
                    output_tokens,
                },
            })
            .await;
    }

    async fn abort(&mut self, conversation_id: Option<&str>) {
        self.aborts.abort(conversation_id);
        let ids: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, ask)| conversation_id.is_none_or(|c| ask.turn.conversation_id() == c))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if let Some(ask) = self.pending.remove(&id) {
                ask.turn
                    .fail(ABORTED, "aborted while waiting for an answer")
                    .await;
            }
        }
    }

    /// End of input: abort everything in flight and wait (briefly) for the
    /// terminal frames.
    async fn shutdown(&mut self) {
        self.abort(None).await;
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            eprintln!("echo agent: in-flight turns did not end in time; cancelling them");
            self.tasks.shutdown().await;
        }
    }
}

/// `Some(argument)` when `text` is `cmd` or starts with `cmd` and whitespace.
fn hook<'a>(text: &'a str, cmd: &str) -> Option<&'a str> {
    let rest = text.strip_prefix(cmd)?;
    if rest.is_empty() {
        Some(rest)
    } else if rest.starts_with(char::is_whitespace) {
        Some(rest.trim())
    } else {
        None
    }
}

impl wire::LineAgent for Echo {
    fn out(&self) -> &Out {
        &self.out
    }

    async fn handle(&mut self, input: AgentInput) {
        Echo::handle(self, input).await
    }

    fn after_line(&mut self) {
        while self.tasks.try_join_next().is_some() {}
    }

    async fn shutdown(&mut self) {
        Echo::shutdown(self).await
    }
}
