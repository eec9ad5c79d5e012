//! A test harness driving a built-in agent over in-memory pipes.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use aishell_protocol::agent::{AgentEvent, AgentInput, ConversationRef};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines};
use tokio::task::JoinHandle;

/// How long any single expected frame may take.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Agent {
    stdin: Option<DuplexStream>,
    stdout: Lines<BufReader<DuplexStream>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    pub fn start(kind: &str, workspace: &Path) -> Agent {
        let (stdin_w, stdin_r) = tokio::io::duplex(1 << 20);
        let (stdout_w, stdout_r) = tokio::io::duplex(1 << 20);
        let kind = kind.to_string();
        let ws = workspace.to_path_buf();
        let task =
            tokio::spawn(async move { aishell_agents::run_in(&kind, stdin_r, stdout_w, ws).await });
        Agent {
            stdin: Some(stdin_w),
            stdout: BufReader::new(stdout_r).lines(),
            task,
        }
    }

    /// Start and complete the `init` handshake.
    pub async fn started(kind: &str, workspace: &Path, settings: serde_json::Value) -> Agent {
        let mut agent = Agent::start(kind, workspace);
        agent
            .send(&AgentInput::Init {
                workspace: Some(workspace.display().to_string()),
                settings: settings.as_object().cloned().unwrap_or_default(),
                env: Default::default(),
                run_as: None,
            })
            .await;
        match agent.next().await {
            AgentEvent::Init(info) => {
                assert_eq!(info.agent.as_deref(), Some(kind));
                assert_eq!(info.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
            }
            other => panic!("expected init, got {other:?}"),
        }
        agent
    }

    pub async fn send(&mut self, input: &AgentInput) {
        self.send_raw(&input.to_line()).await;
    }

    pub async fn send_raw(&mut self, bytes: impl AsRef<[u8]>) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes.as_ref()).await.unwrap();
        stdin.flush().await.unwrap();
    }

    pub async fn message(&mut self, conversation_id: &str, content: &str) {
        self.send(&AgentInput::Message {
            conversation_id: conversation_id.to_string(),
            content: content.to_string(),
            message_id: None,
        })
        .await;
    }

    pub async fn ping(&mut self, id: serde_json::Value) {
        self.send(&AgentInput::Ping { id }).await;
    }

    pub async fn restore(&mut self, ids: &[&str]) {
        self.send(&AgentInput::RestoreConversations {
            conversations: ids
                .iter()
                .map(|id| ConversationRef {
                    conversation_id: id.to_string(),
                    resume_handle: None,
                })
                .collect(),
        })
        .await;
    }

    pub async fn abort(&mut self, conversation_id: Option<&str>) {
        self.send(&AgentInput::Abort {
            conversation_id: conversation_id.map(str::to_string),
        })
        .await;
    }

    /// The next output frame (panics on timeout, end of output or a bad line).
    pub async fn next(&mut self) -> AgentEvent {
        self.try_next()
            .await
            .expect("agent output ended unexpectedly")
    }

    /// The next output frame, `None` at end of output.
    pub async fn try_next(&mut self) -> Option<AgentEvent> {
        let line = tokio::time::timeout(FRAME_TIMEOUT, self.stdout.next_line())
            .await
            .expect("timed out waiting for an agent frame")
            .expect("reading agent output");
        line.map(|line| {
            AgentEvent::decode_line(&line)
                .unwrap_or_else(|e| panic!("agent wrote an undecodable line {line:?}: {e}"))
        })
    }

    /// Frames up to and including the terminal frame (`finish` or `error`) of
    /// `conversation_id`.
    pub async fn until_terminal(&mut self, conversation_id: &str) -> Vec<AgentEvent> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await;
            let terminal = is_terminal(&frame, conversation_id);
            frames.push(frame);
            if terminal {
                return frames;
            }
        }
    }

    /// Close stdin; return every remaining frame; the agent must exit `Ok`.
    pub async fn close(mut self) -> Vec<AgentEvent> {
        self.stdin = None;
        let mut frames = Vec::new();
        while let Some(frame) = self.try_next().await {
            frames.push(frame);
        }
        tokio::time::timeout(FRAME_TIMEOUT, self.task)
            .await
            .expect("agent did not exit after stdin closed")
            .expect("agent task panicked")
            .expect("agent returned an error");
        frames
    }
}

pub fn is_terminal(frame: &AgentEvent, conversation_id: &str) -> bool {
    match frame {
        AgentEvent::Finish {
            conversation_id: c, ..
        } => c == conversation_id,
        AgentEvent::Error {
            conversation_id: Some(c),
            ..
        } => c == conversation_id,
        _ => false,
    }
}

pub fn error_code(frame: &AgentEvent) -> Option<(&Option<String>, &str)> {
    match frame {
        AgentEvent::Error {
            conversation_id,
            error,
        } => Some((conversation_id, error.code.as_str())),
        _ => None,
    }
}
