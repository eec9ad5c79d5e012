//! The `claude` agent against a scripted stand-in for Claude Code
//! (`tests/fixtures/fake_claude.py`, run with python3) that replays
//! stream-json messages and records its argv and stdin.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aishell_protocol::agent::{AgentEvent, AgentInput, ConversationRef, TokenUsage};
use common::Agent;
use serde_json::{Value, json};

const CID: &str = "conv-c";

fn stand_in() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_claude.py")
}

fn settings() -> Value {
    json!({
        "claude_command": ["python3", stand_in().display().to_string()],
        "claude_model": "sonnet-test",
        "claude_permission_mode": "acceptEdits",
    })
}

fn argvs(ws: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(ws.join(".fake_claude/argv.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn resume_arg(argv: &[String]) -> Option<&str> {
    argv.iter()
        .position(|a| a == "--resume")
        .map(|i| argv[i + 1].as_str())
}

async fn turn(agent: &mut Agent, content: &str) -> Vec<AgentEvent> {
    agent.message(CID, content).await;
    agent.until_terminal(CID).await
}

fn session_updates(frames: &[AgentEvent]) -> Vec<&str> {
    frames
        .iter()
        .filter_map(|f| match f {
            AgentEvent::ConversationUpdate {
                resume_handle: Some(h),
                ..
            } => Some(h.as_str()),
            _ => None,
        })
        .collect()
}

fn terminal_error(frames: &[AgentEvent]) -> (String, String) {
    match frames.last() {
        Some(AgentEvent::Error {
            conversation_id: Some(c),
            error,
        }) if c == CID => (error.code.clone(), error.message.clone()),
        other => panic!("expected a terminal error, got {other:?} in {frames:#?}"),
    }
}

fn usage() -> TokenUsage {
    TokenUsage {
        input_tokens: 115,
        output_tokens: 42,
    }
}

/// The frames of a full scripted turn (conversation updates and infos aside).
fn assert_full_turn(frames: &[AgentEvent], said: &str) {
    let body: Vec<&AgentEvent> = frames
        .iter()
        .filter(|f| {
            !matches!(
                f,
                AgentEvent::ConversationUpdate { .. } | AgentEvent::Info { .. }
            )
        })
        .collect();
    let cid = CID.to_string();
    let expected = vec![
        AgentEvent::Thinking {
            conversation_id: Some(cid.clone()),
            content: Some("Let me list the files.".into()),
        },
        AgentEvent::TextDelta {
            conversation_id: cid.clone(),
            delta: "I'll look at the files.".into(),
        },
        AgentEvent::Content {
            conversation_id: cid.clone(),
            content: "I'll look at the files.".into(),
        },
        AgentEvent::ToolCall {
            conversation_id: Some(cid.clone()),
            tool_call_id: "toolu_01".into(),
            tool_name: "Bash".into(),
            tool_input: json!({"command": "ls", "description": "List files"}),
        },
        AgentEvent::ToolResult {
            conversation_id: Some(cid.clone()),
            tool_call_id: "toolu_01".into(),
            content: "notes.md\n".into(),
            is_error: false,
        },
        AgentEvent::TextDelta {
            conversation_id: cid.clone(),
            delta: format!("Done: {said}"),
        },
        AgentEvent::Content {
            conversation_id: cid.clone(),
            content: format!("Done: {said}"),
        },
        AgentEvent::Finish {
            conversation_id: cid,
            token_usage: usage(),
        },
    ];
    let body: Vec<AgentEvent> = body.into_iter().cloned().collect();
    assert_eq!(body, expected);
}

#[tokio::test]
async fn translates_a_turn_and_keeps_one_process() {
    let ws = tempfile::tempdir().unwrap();
    let mut agent = Agent::started("claude", ws.path(), settings()).await;
    let frames = turn(&mut agent, "hello").await;
    assert!(matches!(
        &frames[0],
        AgentEvent::ConversationUpdate { title: Some(t), resume_handle: None, .. } if t == "hello"
    ));
    let sessions = session_updates(&frames);
    assert_eq!(sessions.len(), 1, "{frames:#?}");
    let session = sessions[0].to_string();
    assert_full_turn(&frames, "hello");

    // Same process, same session: no new updates.
    let frames = turn(&mut agent, "again").await;
    assert!(session_updates(&frames).is_empty());
    assert_full_turn(&frames, "again");

    let argvs = argvs(ws.path());
    assert_eq!(argvs.len(), 1, "one process per conversation: {argvs:?}");
    assert_eq!(
        argvs[0],
        [
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--model",
            "sonnet-test",
            "--permission-mode",
            "acceptEdits"
        ]
    );
    let stdin: Vec<Value> = std::fs::read_to_string(ws.path().join(".fake_claude/stdin.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        stdin[0],
        json!({"type": "user",
               "message": {"role": "user", "content": [{"type": "text", "text": "hello"}]},
               "parent_tool_use_id": null})
    );
    assert_eq!(stdin[1]["message"]["content"][0]["text"], "again");
    agent.close().await;

    // A new agent (no restore frame) finds the session in the workspace.
    let mut agent = Agent::started("claude", ws.path(), settings()).await;
    let frames = turn(&mut agent, "later").await;
    assert_full_turn(&frames, "later");
    let argvs = argvs_after(ws.path(), 2);
    assert_eq!(resume_arg(&argvs[1]), Some(session.as_str()));
    agent.close().await;
}

fn argvs_after(ws: &Path, n: usize) -> Vec<Vec<String>> {
    let a = argvs(ws);
    assert_eq!(a.len(), n, "{a:?}");
    a
}

#[tokio::test]
async fn restore_passes_the_resume_handle() {
    let ws = tempfile::tempdir().unwrap();
    let mut agent = Agent::started("claude", ws.path(), settings()).await;
    agent
        .send(&AgentInput::RestoreConversations {
            conversations: vec![ConversationRef {
                conversation_id: CID.to_string(),
                resume_handle: Some("sess-abc".to_string()),
            }],
        })
        .await;
    agent.ping(json!(1)).await;
    match agent.next().await {
        AgentEvent::Info { message } => assert_eq!(message, "restored 1 conversations"),
        other => panic!("expected info, got {other:?}"),
    }
    assert!(matches!(agent.next().await, AgentEvent::Pong { .. }));
    let frames = turn(&mut agent, "continue").await;
    // Resumed: no title; the session is the one restored.
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f, AgentEvent::ConversationUpdate { .. })),
        "{frames:#?}"
    );
    assert_full_turn(&frames, "continue");
    let argvs = argvs(ws.path());
    assert_eq!(resume_arg(&argvs[0]), Some("sess-abc"));
    agent.close().await;
}

#[tokio::test]
async fn abort_kills_claude_and_the_next_message_resumes() {
    let ws = tempfile::tempdir().unwrap();
    let mut agent = Agent::started("claude", ws.path(), settings()).await;
    agent.message(CID, "hang").await;
    // Wait for the session (its init line).
    let session = loop {
        if let AgentEvent::ConversationUpdate {
            resume_handle: Some(h),
            ..
        } = agent.next().await
        {
            break h;
        }
    };
    let pid: i32 = std::fs::read_to_string(ws.path().join(".fake_claude/pid"))
        .unwrap()
        .parse()
        .unwrap();
    let t0 = Instant::now();
    agent.abort(Some(CID)).await;
    let frames = agent.until_terminal(CID).await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(terminal_error(&frames).0, "ABORTED");
    let deadline = Instant::now() + Duration::from_secs(2);
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
        assert!(
            Instant::now() < deadline,
            "claude process {pid} still alive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let frames = turn(&mut agent, "hello").await;
    assert_full_turn(&frames, "hello");
    let argvs = argvs_after(ws.path(), 2);
    assert_eq!(resume_arg(&argvs[0]), None);
    assert_eq!(resume_arg(&argvs[1]), Some(session.as_str()));
    agent.close().await;
}

#[tokio::test]
async fn errors_are_reported_with_claudes_words() {
    let ws = tempfile::tempdir().unwrap();
    let mut agent = Agent::started("claude", ws.path(), settings()).await;

    let (code, message) = terminal_error(&turn(&mut agent, "fail").await);
    assert_eq!(code, "AGENT_ERROR");
    assert!(message.contains("error_during_execution"), "{message}");
    assert!(message.contains("Tool execution failed badly"), "{message}");

    let (code, message) = terminal_error(&turn(&mut agent, "api-error").await);
    assert_eq!(code, "AGENT_ERROR");
    assert!(message.contains("529"), "{message}");

    // A crash mid-turn quotes Claude's stderr (captured, not discarded).
    let (code, message) = terminal_error(&turn(&mut agent, "crash").await);
    assert_eq!(code, "AGENT_ERROR");
    assert!(message.contains("exit status 3"), "{message}");
    assert!(message.contains("out of cheese"), "{message}");

    // And the conversation goes on in a resumed process.
    let frames = turn(&mut agent, "hello").await;
    assert_full_turn(&frames, "hello");
    let argvs = argvs_after(ws.path(), 2);
    assert!(resume_arg(&argvs[1]).is_some());
    agent.close().await;
}

#[tokio::test]
async fn an_unknown_session_continues_in_a_new_one() {
    let ws = tempfile::tempdir().unwrap();
    let mut agent = Agent::started("claude", ws.path(), settings()).await;
    agent
        .send(&AgentInput::RestoreConversations {
            conversations: vec![ConversationRef {
                conversation_id: CID.to_string(),
                resume_handle: Some("missing-session".to_string()),
            }],
        })
        .await;
    let frames = turn(&mut agent, "hello").await;
    assert!(
        frames.iter().any(|f| matches!(
            f,
            AgentEvent::Info { message } if message.contains("could not resume")
                && message.contains("No conversation found")
        )),
        "{frames:#?}"
    );
    let sessions = session_updates(&frames);
    assert_eq!(sessions.len(), 1);
    assert_ne!(sessions[0], "missing-session");
    assert_full_turn(&frames, "hello");
    let argvs = argvs_after(ws.path(), 2);
    assert_eq!(resume_arg(&argvs[0]), Some("missing-session"));
    assert_eq!(resume_arg(&argvs[1]), None);
    agent.close().await;
}

#[tokio::test]
async fn partial_messages_stream_text_once() {
    let ws = tempfile::tempdir().unwrap();
    let mut s = settings();
    s["claude_partial_messages"] = json!(true);
    let mut agent = Agent::started("claude", ws.path(), s).await;
    let frames = turn(&mut agent, "hi").await;
    let deltas: Vec<&str> = frames
        .iter()
        .filter_map(|f| match f {
            AgentEvent::TextDelta { delta, .. } => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert!(deltas.len() > 2, "{deltas:?}");
    assert_eq!(deltas.concat(), "I'll look at the files.Done: hi");
    let contents = frames
        .iter()
        .filter(|f| matches!(f, AgentEvent::Content { .. }))
        .count();
    assert_eq!(contents, 2);
    assert!(argvs(ws.path())[0].contains(&"--include-partial-messages".to_string()));
    agent.close().await;
}

#[tokio::test]
async fn a_missing_command_is_an_agent_error() {
    let ws = tempfile::tempdir().unwrap();
    let mut agent = Agent::started(
        "claude",
        ws.path(),
        json!({"claude_command": "/nonexistent/claude-code"}),
    )
    .await;
    let (code, message) = terminal_error(&turn(&mut agent, "hi").await);
    assert_eq!(code, "AGENT_ERROR");
    assert!(message.contains("/nonexistent/claude-code"), "{message}");
    agent.close().await;
}
