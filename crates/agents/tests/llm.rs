//! The `llm` agent end to end over in-memory pipes, against a scripted
//! OpenAI-compatible server on 127.0.0.1 speaking the real streaming wire
//! format (chunked SSE split at arbitrary bytes, tool-call argument deltas
//! across chunks, usage in a last chunk, 429/500/503/400 answers, a stream
//! cut mid-way, a stream left hanging).

mod common;
mod model_server;

use std::path::Path;
use std::time::{Duration, Instant};

use aishell_protocol::agent::{AgentEvent, TokenUsage};
use common::{Agent, error_code};
use model_server::{Server, cut, hanging, status, text, tool_call, tool_calls};
use serde_json::{Value, json};

const CID: &str = "conv-1";

fn settings(server: &Server) -> Value {
    json!({
        "llm_base_url": server.base_url(),
        "llm_model": "test-model",
        "llm_api_key": "sk-test-123",
    })
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

fn deltas(frames: &[AgentEvent]) -> String {
    frames
        .iter()
        .filter_map(|f| match f {
            AgentEvent::TextDelta { delta, .. } => Some(delta.as_str()),
            _ => None,
        })
        .collect()
}

fn contents(frames: &[AgentEvent]) -> Vec<&str> {
    frames
        .iter()
        .filter_map(|f| match f {
            AgentEvent::Content { content, .. } => Some(content.as_str()),
            _ => None,
        })
        .collect()
}

fn tool_calls_of(frames: &[AgentEvent]) -> Vec<(&str, &Value)> {
    frames
        .iter()
        .filter_map(|f| match f {
            AgentEvent::ToolCall {
                tool_name,
                tool_input,
                ..
            } => Some((tool_name.as_str(), tool_input)),
            _ => None,
        })
        .collect()
}

fn tool_results(frames: &[AgentEvent]) -> Vec<(&str, bool)> {
    frames
        .iter()
        .filter_map(|f| match f {
            AgentEvent::ToolResult {
                content, is_error, ..
            } => Some((content.as_str(), *is_error)),
            _ => None,
        })
        .collect()
}

fn finish_usage(frames: &[AgentEvent]) -> TokenUsage {
    match frames.last() {
        Some(AgentEvent::Finish { token_usage, .. }) => *token_usage,
        other => panic!("expected finish, got {other:?} in {frames:#?}"),
    }
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

async fn turn(agent: &mut Agent, content: &str) -> Vec<AgentEvent> {
    agent.message(CID, content).await;
    agent.until_terminal(CID).await
}

fn history_lines(ws: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(ws.join(".aishell/llm").join(format!("{CID}.jsonl")))
        .expect("history file");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn roles(messages: &[Value]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn multi_step_tool_task_edits_the_workspace() {
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("AGENTS.md"), "Always answer in one line.\n").unwrap();
    let answer = "The note now reads “hello aishell”.";
    let server = Server::start(vec![
        tool_call(
            "call_w",
            "write_file",
            json!({"path": "notes.md", "content": "hello world\n"}),
            (100, 10),
        ),
        tool_call(
            "call_e",
            "edit_file",
            json!({"path": "notes.md", "old_string": "world", "new_string": "aishell"}),
            (120, 11),
        ),
        tool_call(
            "call_r",
            "read_file",
            json!({"path": "notes.md"}),
            (140, 12),
        ),
        text(answer, (160, 13)),
    ])
    .await;
    let mut agent = Agent::started(
        "llm",
        ws.path(),
        with(
            settings(&server),
            json!({"system_prompt": "Extra rule: be kind."}),
        ),
    )
    .await;
    let frames = turn(&mut agent, "make a note").await;

    assert!(matches!(
        &frames[0],
        AgentEvent::ConversationUpdate { title: Some(t), .. } if t == "make a note"
    ));
    let calls = tool_calls_of(&frames);
    assert_eq!(
        calls,
        vec![
            (
                "write_file",
                &json!({"path": "notes.md", "content": "hello world\n"})
            ),
            (
                "edit_file",
                &json!({"path": "notes.md", "old_string": "world", "new_string": "aishell"})
            ),
            ("read_file", &json!({"path": "notes.md"})),
        ]
    );
    let results = tool_results(&frames);
    assert_eq!(results.len(), 3);
    assert!(results.iter().all(|(_, is_error)| !is_error), "{results:?}");
    assert_eq!(results[2].0, "hello aishell\n");
    assert_eq!(deltas(&frames), answer);
    assert_eq!(contents(&frames), vec![answer]);
    assert_eq!(
        finish_usage(&frames),
        TokenUsage {
            input_tokens: 520,
            output_tokens: 46
        }
    );
    assert_eq!(
        std::fs::read_to_string(ws.path().join("notes.md")).unwrap(),
        "hello aishell\n"
    );

    let requests = server.requests();
    assert_eq!(requests.len(), 4);
    for r in &requests {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.header("authorization"), Some("Bearer sk-test-123"));
        assert_eq!(r.body["model"], "test-model");
        assert_eq!(r.body["stream"], true);
        assert_eq!(r.body["stream_options"]["include_usage"], true);
        let names: Vec<&str> = r.body["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "bash",
                "read_file",
                "write_file",
                "edit_file",
                "list_files",
                "grep"
            ]
        );
        let system = r.messages()[0]["content"].as_str().unwrap();
        assert!(system.contains("coding agent"), "{system}");
        assert!(system.contains("Always answer in one line."), "{system}");
        assert!(system.ends_with("Extra rule: be kind."), "{system}");
    }
    let last = requests[3].messages();
    assert_eq!(
        roles(last),
        [
            "system",
            "user",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
            "tool"
        ]
    );
    assert_eq!(last[2]["tool_calls"][0]["id"], "call_w");
    assert_eq!(last[2]["tool_calls"][0]["function"]["name"], "write_file");
    let args: Value = serde_json::from_str(
        last[2]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        args,
        json!({"path": "notes.md", "content": "hello world\n"})
    );
    assert_eq!(last[7]["tool_call_id"], "call_r");
    assert_eq!(last[7]["content"], "hello aishell\n");

    // The conversation is on disk: one OpenAI message per line.
    let saved = history_lines(ws.path());
    assert_eq!(
        roles(&saved),
        [
            "user",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant"
        ]
    );
    assert_eq!(saved[7]["content"], answer);
    agent.close().await;
}

#[tokio::test]
async fn retries_429_and_500_then_succeeds() {
    let ws = tempfile::tempdir().unwrap();
    let server = Server::start(vec![
        status(
            429,
            &[("retry-after", "1")],
            r#"{"error":{"message":"rate limited"}}"#,
        ),
        text("first answer", (5, 2)),
        status(500, &[], "internal boom"),
        text("second answer", (6, 3)),
    ])
    .await;
    let mut agent = Agent::started("llm", ws.path(), settings(&server)).await;

    let t0 = Instant::now();
    let frames = turn(&mut agent, "one").await;
    assert_eq!(contents(&frames), vec!["first answer"]);
    assert_eq!(
        finish_usage(&frames),
        TokenUsage {
            input_tokens: 5,
            output_tokens: 2
        }
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].at - requests[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "retry-after: 1 was not honoured: retried after {waited:?}"
    );

    let frames = turn(&mut agent, "two").await;
    assert_eq!(contents(&frames), vec!["second answer"]);
    assert_eq!(server.requests().len(), 4);
    assert!(t0.elapsed() < Duration::from_secs(4));
    agent.close().await;
}

#[tokio::test]
async fn persistent_errors_fail_with_status_and_body() {
    let ws = tempfile::tempdir().unwrap();
    let busy = || status(503, &[("retry-after", "0")], "overloaded-xyz");
    let server = Server::start(vec![
        busy(),
        busy(),
        busy(),
        status(
            400,
            &[],
            r#"{"error":{"message":"unknown model test-model"}}"#,
        ),
    ])
    .await;
    let mut agent = Agent::started("llm", ws.path(), settings(&server)).await;

    let (code, message) = terminal_error(&turn(&mut agent, "hi").await);
    assert_eq!(code, "AGENT_ERROR");
    assert!(message.contains("503"), "{message}");
    assert!(message.contains("overloaded-xyz"), "{message}");
    assert!(message.contains("3 tries"), "{message}");
    assert_eq!(server.requests().len(), 3);

    // Not retryable: one request, at once.
    let (code, message) = terminal_error(&turn(&mut agent, "hi").await);
    assert_eq!(code, "AGENT_ERROR");
    assert!(message.contains("400"), "{message}");
    assert!(message.contains("unknown model test-model"), "{message}");
    assert_eq!(server.requests().len(), 4);
    assert!(!message.contains("sk-test-123"));
    agent.close().await;
}

#[tokio::test]
async fn cut_stream_is_retried_once_then_fails() {
    let ws = tempfile::tempdir().unwrap();
    let server = Server::start(vec![
        cut("this answer is cut", 200),
        text("whole answer", (3, 2)),
        cut("cut", 120),
        cut("cut again", 150),
    ])
    .await;
    let mut agent = Agent::started("llm", ws.path(), settings(&server)).await;

    let frames = turn(&mut agent, "first").await;
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, AgentEvent::Info { message } if message.contains("cut"))),
        "{frames:#?}"
    );
    assert_eq!(contents(&frames), vec!["whole answer"]);
    finish_usage(&frames);
    assert_eq!(server.requests().len(), 2);
    // Only the complete answer is in the history.
    let saved = history_lines(ws.path());
    assert_eq!(roles(&saved), ["user", "assistant"]);
    assert_eq!(saved[1]["content"], "whole answer");

    let (code, message) = terminal_error(&turn(&mut agent, "second").await);
    assert_eq!(code, "AGENT_ERROR");
    assert!(message.contains("cut"), "{message}");
    assert_eq!(server.requests().len(), 4);
    agent.close().await;
}

#[tokio::test]
async fn abort_mid_stream_ends_the_turn_within_2s() {
    let ws = tempfile::tempdir().unwrap();
    let server = Server::start(vec![hanging("partial thoughts"), text("fine", (1, 1))]).await;
    let mut agent = Agent::started("llm", ws.path(), settings(&server)).await;
    agent.message(CID, "start").await;
    loop {
        if let AgentEvent::TextDelta { delta, .. } = agent.next().await {
            assert_eq!(delta, "partial thoughts");
            break;
        }
    }
    let t0 = Instant::now();
    agent.abort(Some(CID)).await;
    let frames = agent.until_terminal(CID).await;
    let (code, _) = terminal_error(&frames);
    assert_eq!(code, "ABORTED");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // The HTTP stream was dropped.
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.disconnects() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.disconnects(), 1);

    // The conversation goes on, with the partial text in its history.
    let frames = turn(&mut agent, "again").await;
    assert_eq!(contents(&frames), vec!["fine"]);
    let last = server.requests()[1].messages().clone();
    assert_eq!(roles(&last), ["system", "user", "assistant", "user"]);
    assert_eq!(last[2]["content"], "partial thoughts");
    agent.close().await;
}

#[tokio::test]
async fn abort_mid_tool_kills_bash() {
    let ws = tempfile::tempdir().unwrap();
    let server = Server::start(vec![
        tool_call(
            "call_b",
            "bash",
            json!({"command": "echo $$ > pid.txt; echo started; sleep 30"}),
            (1, 1),
        ),
        text("ok", (1, 1)),
    ])
    .await;
    let mut agent = Agent::started("llm", ws.path(), settings(&server)).await;
    agent.message(CID, "run it").await;
    loop {
        if let AgentEvent::ToolCall { tool_name, .. } = agent.next().await {
            assert_eq!(tool_name, "bash");
            break;
        }
    }
    let pid_file = ws.path().join("pid.txt");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !pid_file.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let t0 = Instant::now();
    agent.abort(Some(CID)).await;
    let frames = agent.until_terminal(CID).await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(terminal_error(&frames).0, "ABORTED");
    let results = tool_results(&frames);
    assert_eq!(results.len(), 1);
    assert!(results[0].1);
    assert!(results[0].0.contains("started"), "{results:?}");
    assert!(results[0].0.contains("[aborted]"), "{results:?}");
    // The shell was killed (and reaped: kill(pid, 0) fails).
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
        "bash tool process {pid} still exists"
    );

    // The history stays well-formed for the next request.
    let frames = turn(&mut agent, "what happened?").await;
    assert_eq!(contents(&frames), vec!["ok"]);
    let last = server.requests()[1].messages().clone();
    assert_eq!(
        roles(&last),
        ["system", "user", "assistant", "tool", "user"]
    );
    assert_eq!(last[3]["tool_call_id"], "call_b");
    agent.close().await;
}

#[tokio::test]
async fn restart_continues_with_the_full_history() {
    let ws = tempfile::tempdir().unwrap();
    let server = Server::start(vec![
        text("noted: 42", (1, 1)),
        text("it was 42", (1, 1)),
        text("still 42", (1, 1)),
    ])
    .await;
    let mut agent = Agent::started("llm", ws.path(), settings(&server)).await;
    turn(&mut agent, "remember the number 42").await;
    agent.close().await;

    // A new agent instance (as in a new sandbox): restore, barrier, continue.
    let mut agent = Agent::started("llm", ws.path(), settings(&server)).await;
    agent.restore(&[CID, "never-seen"]).await;
    agent.ping(json!("barrier")).await;
    match agent.next().await {
        AgentEvent::Info { message } => assert_eq!(message, "restored 1 conversations"),
        other => panic!("expected info, got {other:?}"),
    }
    assert!(matches!(agent.next().await, AgentEvent::Pong { .. }));
    let frames = turn(&mut agent, "which number?").await;
    assert_eq!(contents(&frames), vec!["it was 42"]);
    // Not a new conversation: no title.
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f, AgentEvent::ConversationUpdate { .. }))
    );
    let body = &server.requests()[1].body;
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(roles(messages), ["system", "user", "assistant", "user"]);
    assert_eq!(messages[1]["content"], "remember the number 42");
    assert_eq!(messages[2]["content"], "noted: 42");
    assert_eq!(messages[3]["content"], "which number?");
    agent.close().await;

    // Without restore_conversations, first use loads the history too.
    let mut agent = Agent::started("llm", ws.path(), settings(&server)).await;
    turn(&mut agent, "and now?").await;
    let messages = server.requests()[2].messages().clone();
    assert_eq!(
        roles(&messages),
        ["system", "user", "assistant", "user", "assistant", "user"]
    );
    agent.close().await;
}

#[tokio::test]
async fn path_escapes_are_refused() {
    let ws = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "top-secret-value").unwrap();
    std::os::unix::fs::symlink(outside.path(), ws.path().join("link")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret.txt"),
        ws.path().join("secret-link"),
    )
    .unwrap();
    let server = Server::start(vec![
        tool_calls(
            &[
                ("c1", "read_file", json!({"path": "../secret.txt"})),
                ("c2", "read_file", json!({"path": "/etc/passwd"})),
                ("c3", "read_file", json!({"path": "secret-link"})),
                (
                    "c4",
                    "write_file",
                    json!({"path": "link/pwned.txt", "content": "x"}),
                ),
                (
                    "c5",
                    "edit_file",
                    json!({"path": "link/secret.txt", "old_string": "top", "new_string": "no"}),
                ),
                ("c6", "list_files", json!({"path": "link"})),
                (
                    "c7",
                    "grep",
                    json!({"pattern": "top-secret", "path": "link"}),
                ),
            ],
            (1, 1),
        ),
        text("refused", (1, 1)),
    ])
    .await;
    let mut agent = Agent::started("llm", ws.path(), settings(&server)).await;
    let frames = turn(&mut agent, "try to escape").await;
    let results = tool_results(&frames);
    assert_eq!(results.len(), 7);
    for (content, is_error) in &results {
        assert!(is_error, "not refused: {content}");
        assert!(
            content.contains("outside the workspace") || content.contains("absolute"),
            "{content}"
        );
        assert!(!content.contains("top-secret-value"), "{content}");
    }
    assert!(!outside.path().join("pwned.txt").exists());
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret.txt")).unwrap(),
        "top-secret-value"
    );
    finish_usage(&frames);
    agent.close().await;
}

#[tokio::test]
async fn context_guard_trims_old_tool_output_then_old_turns() {
    let ws = tempfile::tempdir().unwrap();
    let big = "B".repeat(10_000);
    std::fs::write(ws.path().join("big.txt"), &big).unwrap();
    let read_big = || tool_call("r", "read_file", json!({"path": "big.txt"}), (1, 1));
    let server = Server::start(vec![
        read_big(),
        text("alpha done", (1, 1)),
        read_big(),
        text("beta done", (1, 1)),
        text(&"G".repeat(8_000), (1, 1)),
        text("latest done", (1, 1)),
    ])
    .await;
    let mut agent = Agent::started(
        "llm",
        ws.path(),
        with(settings(&server), json!({"context_chars": 20_000})),
    )
    .await;
    finish_usage(&turn(&mut agent, "alpha question").await);
    finish_usage(&turn(&mut agent, "beta question").await);
    // The second read: the older output is a stub, the newer one is whole.
    let requests = server.requests();
    let tools: Vec<&str> = requests[3]
        .messages()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(tools, vec!["[trimmed 10000 chars]", big.as_str()]);

    // A long answer, then a long question: trimming tool outputs is not
    // enough, so the old turns go; the latest question stays whole.
    finish_usage(&turn(&mut agent, "gamma question").await);
    let question = "Q".repeat(15_000);
    finish_usage(&turn(&mut agent, &question).await);
    let request = &server.requests()[5];
    let messages = request.messages();
    assert_eq!(roles(messages), ["system", "user"]);
    assert_eq!(messages[1]["content"], question.as_str());
    let serialized = serde_json::to_string(messages).unwrap();
    assert!(serialized.len() <= 20_000, "{}", serialized.len());
    // The file still has everything.
    assert_eq!(history_lines(ws.path()).len(), 12);
    agent.close().await;
}

#[tokio::test]
async fn bad_conversation_ids_and_missing_endpoint() {
    let ws = tempfile::tempdir().unwrap();
    let mut agent = Agent::started(
        "llm",
        ws.path(),
        json!({"llm_base_url": null, "llm_model": null}),
    )
    .await;
    agent.message("../evil", "hi").await;
    let frame = agent.next().await;
    assert_eq!(
        error_code(&frame),
        Some((&Some("../evil".to_string()), "BAD_FRAME"))
    );
    let (code, message) = terminal_error(&turn(&mut agent, "hi").await);
    assert_eq!(code, "AGENT_ERROR");
    assert!(message.contains("AISHELL_LLM_BASE_URL"), "{message}");
    agent.close().await;
}
