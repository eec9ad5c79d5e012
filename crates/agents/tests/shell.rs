//! The `shell` agent, driven over in-memory pipes with real child processes
//! in a temporary workspace.

mod common;

use std::time::{Duration, Instant};

use aishell_protocol::agent::{AgentEvent, AgentInput};
use common::{Agent, error_code};
use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::json;

fn ws() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
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

fn tool_result(frames: &[AgentEvent]) -> (&str, bool) {
    frames
        .iter()
        .find_map(|f| match f {
            AgentEvent::ToolResult {
                content, is_error, ..
            } => Some((content.as_str(), *is_error)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no tool_result in {frames:?}"))
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

/// Wait for the first text_delta and parse it as the pid printed by `echo $$`.
async fn read_pid(agent: &mut Agent) -> Pid {
    loop {
        if let AgentEvent::TextDelta { delta, .. } = agent.next().await {
            return Pid::from_raw(delta.trim().parse().expect("a pid"));
        }
    }
}

/// Our direct child was killed and reaped: `kill(pid, 0)` fails.
fn assert_reaped(pid: Pid) {
    assert_eq!(
        kill(pid, None),
        Err(Errno::ESRCH),
        "process {pid} still exists"
    );
}

/// The process no longer runs. A killed orphan may linger as a zombie until
/// init reaps it (slow or absent in some containers), which counts as gone.
fn assert_gone(pid: Pid) {
    let alive = || match kill(pid, None) {
        Err(Errno::ESRCH) => false,
        _ => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z') && !state.starts_with('X')
            })
            .unwrap_or(false),
    };
    for _ in 0..25 {
        if !alive() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("process {pid} still exists");
}

#[tokio::test]
async fn runs_a_command_in_the_workspace() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    let command = "echo hi > notes.txt && cat notes.txt";
    agent.message("c1", command).await;
    let frames = agent.until_terminal("c1").await;
    assert_eq!(
        frames[0],
        AgentEvent::ConversationUpdate {
            conversation_id: "c1".into(),
            title: Some(command.into()),
            resume_handle: None
        }
    );
    let (call_id, input) = match &frames[1] {
        AgentEvent::ToolCall {
            conversation_id,
            tool_call_id,
            tool_name,
            tool_input,
        } => {
            assert_eq!(conversation_id.as_deref(), Some("c1"));
            assert_eq!(tool_name, "shell");
            (tool_call_id.clone(), tool_input.clone())
        }
        other => panic!("expected tool_call, got {other:?}"),
    };
    assert_eq!(input, json!({ "command": command }));
    assert!(uuid::Uuid::parse_str(&call_id).is_ok());
    assert!(deltas(&frames).contains("hi"), "{frames:?}");
    let result_id = frames.iter().find_map(|f| match f {
        AgentEvent::ToolResult { tool_call_id, .. } => Some(tool_call_id.clone()),
        _ => None,
    });
    assert_eq!(result_id, Some(call_id));
    assert_eq!(tool_result(&frames), ("hi\n", false));
    assert_eq!(contents(&frames), ["exit status 0"]);
    assert!(matches!(frames.last(), Some(AgentEvent::Finish { .. })));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("notes.txt")).unwrap(),
        "hi\n"
    );
}

#[tokio::test]
async fn a_failing_command_is_an_error_result_and_still_finishes() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    agent.message("c", "echo oops >&2; exit 3").await;
    let frames = agent.until_terminal("c").await;
    let (content, is_error) = tool_result(&frames);
    assert!(is_error);
    assert!(content.contains("oops"), "{content}");
    assert_eq!(contents(&frames), ["exit status 3"]);
    assert!(matches!(frames.last(), Some(AgentEvent::Finish { .. })));

    agent.message("c", "kill -9 $$").await;
    let frames = agent.until_terminal("c").await;
    assert!(tool_result(&frames).1);
    assert_eq!(contents(&frames), ["killed by signal 9"]);
}

#[tokio::test]
async fn abort_kills_the_command_quickly() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    agent.message("c", "echo $$; exec sleep 30").await;
    let pid = read_pid(&mut agent).await;
    assert!(kill(pid, None).is_ok(), "the command should be running");
    let t = Instant::now();
    agent.abort(Some("c")).await;
    let frames = agent.until_terminal("c").await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let (content, is_error) = tool_result(&frames);
    assert!(is_error);
    assert!(content.contains("aborted"), "{content}");
    assert_eq!(
        error_code(frames.last().unwrap()),
        Some((&Some("c".to_string()), "ABORTED"))
    );
    assert_reaped(pid);
}

#[tokio::test]
async fn abort_without_conversation_kills_all_and_drops_the_queue() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    agent.message("a", "echo $$; exec sleep 30").await;
    let pid_a = read_pid(&mut agent).await;
    agent.message("b", "echo $$; exec sleep 30").await;
    let pid_b = read_pid(&mut agent).await;
    // Queued behind a's sleep: must never run, but still gets its terminal frame.
    agent.message("a", "touch should-not-exist").await;
    agent.abort(None).await;
    let mut aborted = Vec::new();
    let mut frames = Vec::new();
    while aborted.len() < 3 {
        let frame = agent.next().await;
        if let Some((Some(conv), "ABORTED")) = error_code(&frame) {
            aborted.push(conv.clone());
        }
        frames.push(frame);
    }
    aborted.sort();
    assert_eq!(aborted, ["a", "a", "b"]);
    // The queued message never started: only two tool calls.
    agent.ping(json!(0)).await;
    loop {
        let f = agent.next().await;
        if matches!(f, AgentEvent::Pong { .. }) {
            break;
        }
        frames.push(f);
    }
    let calls = frames
        .iter()
        .filter(|f| matches!(f, AgentEvent::ToolCall { .. }))
        .count();
    assert_eq!(calls, 0, "{frames:?}");
    assert!(!dir.path().join("should-not-exist").exists());
    assert_reaped(pid_a);
    assert_reaped(pid_b);
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({"command_timeout_secs": 1})).await;
    let t = Instant::now();
    // A child of sh (not exec'd) proves the whole group dies.
    agent.message("c", "sleep 10 & echo $!; wait").await;
    let pid = read_pid(&mut agent).await;
    let frames = agent.until_terminal("c").await;
    let elapsed = t.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let (content, is_error) = tool_result(&frames);
    assert!(is_error);
    assert!(content.contains("timed out after 1 s"), "{content}");
    assert!(matches!(frames.last(), Some(AgentEvent::Finish { .. })));
    assert_gone(pid);
}

#[tokio::test]
async fn output_is_capped() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({"output_limit_bytes": 1000})).await;
    agent
        .message("c", "head -c 50000 /dev/zero | tr '\\0' a; echo done >&2")
        .await;
    let frames = agent.until_terminal("c").await;
    let (content, is_error) = tool_result(&frames);
    assert!(!is_error);
    assert!(content.ends_with("[output truncated]"), "{content}");
    assert!(
        content.len() <= 1000 + "\n[output truncated]".len(),
        "{}",
        content.len()
    );
    // ("truncated" has an `a` of its own.)
    let body = content.strip_suffix("[output truncated]").unwrap();
    assert_eq!(body.trim_end(), "a".repeat(1000));
    let streamed = deltas(&frames);
    let (streamed_body, marker) = streamed.split_at(1000);
    assert_eq!(streamed_body, "a".repeat(1000));
    assert_eq!(marker.trim(), "[output truncated]");
    assert_eq!(contents(&frames), ["exit status 0"]);
}

#[tokio::test]
async fn endless_output_is_capped_and_still_times_out() {
    let dir = ws();
    let mut agent = Agent::started(
        "shell",
        dir.path(),
        json!({"output_limit_bytes": 4096, "command_timeout_secs": 0.5}),
    )
    .await;
    let t = Instant::now();
    agent.message("c", "yes").await;
    let frames = agent.until_terminal("c").await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let (content, is_error) = tool_result(&frames);
    assert!(is_error);
    assert!(content.contains("[output truncated]"), "{content}");
    assert!(content.ends_with("timed out after 0.5 s"), "{content}");
    assert!(deltas(&frames).len() <= 4096 + "\n[output truncated]\n".len());
    assert!(matches!(frames.last(), Some(AgentEvent::Finish { .. })));
}

#[tokio::test]
async fn multibyte_output_survives_streaming() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    // Write one character's bytes in two separate writes.
    agent
        .message("c", "printf 'caf\\303'; sleep 0.1; printf '\\251!\\n'")
        .await;
    let frames = agent.until_terminal("c").await;
    assert_eq!(deltas(&frames), "café!\n");
    assert_eq!(tool_result(&frames).0, "café!\n");
}

#[tokio::test]
async fn history_is_written_and_restored_by_a_new_process() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    agent.message("conv-1", "echo one").await;
    agent.until_terminal("conv-1").await;
    agent.message("conv-1", "exit 4").await;
    agent.until_terminal("conv-1").await;
    agent.close().await;

    let path = dir.path().join(".aishell/shell/conv-1.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["command"], "echo one");
    assert_eq!(lines[0]["exit_code"], 0);
    assert_eq!(lines[1]["exit_code"], 4);
    assert!(lines[0]["started_at"].as_str().unwrap().len() >= 20);

    // A fresh agent instance over the same workspace.
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    agent.restore(&["conv-1", "never-seen", "../bad"]).await;
    agent.ping(json!("barrier")).await;
    assert_eq!(
        agent.next().await,
        AgentEvent::Info {
            message: "restored 1 conversations".into()
        }
    );
    assert_eq!(
        agent.next().await,
        AgentEvent::Pong {
            id: json!("barrier")
        }
    );
    // A continued conversation gets no new title.
    agent.message("conv-1", "true").await;
    let frames = agent.until_terminal("conv-1").await;
    assert!(
        matches!(frames[0], AgentEvent::ToolCall { .. }),
        "{frames:?}"
    );
    agent.close().await;
    assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
}

#[tokio::test]
async fn reset_truncates_and_delete_removes_the_history() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    let path = dir.path().join(".aishell/shell/c.jsonl");
    agent.message("c", "true").await;
    agent.until_terminal("c").await;
    assert!(std::fs::metadata(&path).unwrap().len() > 0);

    agent
        .send(&AgentInput::ResetConversation {
            conversation_id: "c".into(),
        })
        .await;
    agent.ping(json!(1)).await;
    assert_eq!(agent.next().await, AgentEvent::Pong { id: json!(1) });
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);

    agent.message("c", "true").await;
    let frames = agent.until_terminal("c").await;
    // After a reset the conversation starts over, title included.
    assert!(
        matches!(frames[0], AgentEvent::ConversationUpdate { .. }),
        "{frames:?}"
    );
    agent
        .send(&AgentInput::DeleteConversation {
            conversation_id: "c".into(),
        })
        .await;
    agent.ping(json!(2)).await;
    assert_eq!(agent.next().await, AgentEvent::Pong { id: json!(2) });
    assert!(!path.exists());
}

#[tokio::test]
async fn bad_conversation_ids_are_rejected() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    let long = "x".repeat(129);
    for id in ["../escape", "a/b", "", long.as_str(), "naïve"] {
        agent.message(id, "touch pwned").await;
        let frame = agent.next().await;
        assert_eq!(
            error_code(&frame),
            Some((&Some(id.to_string()), "BAD_FRAME")),
            "{id}: {frame:?}"
        );
    }
    agent
        .send(&AgentInput::DeleteConversation {
            conversation_id: "../../etc".into(),
        })
        .await;
    assert_eq!(error_code(&agent.next().await), Some((&None, "BAD_FRAME")));
    agent.close().await;
    assert!(!dir.path().join("pwned").exists());
    assert!(!dir.path().join(".aishell").exists());
    let max = "y".repeat(128);
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    agent.message(&max, "true").await;
    let frames = agent.until_terminal(&max).await;
    assert!(matches!(frames.last(), Some(AgentEvent::Finish { .. })));
}

#[tokio::test]
async fn malformed_line_gets_bad_frame_and_the_agent_keeps_answering() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    agent.send_raw("{not json\n").await;
    assert_eq!(error_code(&agent.next().await), Some((&None, "BAD_FRAME")));
    agent.send_raw("{\"type\":\"launch_missiles\"}\n").await;
    assert_eq!(error_code(&agent.next().await), Some((&None, "BAD_FRAME")));
    agent.send_raw(b"\xff\xfe{}\n").await;
    assert_eq!(error_code(&agent.next().await), Some((&None, "BAD_FRAME")));
    agent.ping(json!(9)).await;
    assert_eq!(agent.next().await, AgentEvent::Pong { id: json!(9) });
    agent.message("c", "echo alive").await;
    let frames = agent.until_terminal("c").await;
    assert!(deltas(&frames).contains("alive"));
}

#[tokio::test]
async fn one_conversation_runs_in_order_others_run_concurrently() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    agent.message("slow", "sleep 0.5; echo first").await;
    agent.message("slow", "echo second").await;
    agent.message("fast", "echo quick").await;
    // A ping is answered while commands run.
    agent.ping(json!("mid")).await;
    let mut order = Vec::new();
    let mut finishes = 0;
    let mut pong_before_first_finish = None;
    while finishes < 3 {
        match agent.next().await {
            AgentEvent::Pong { .. } => pong_before_first_finish = Some(finishes == 0),
            AgentEvent::ToolCall {
                conversation_id,
                tool_input,
                ..
            } => order.push(format!(
                "call {} {}",
                conversation_id.unwrap(),
                tool_input["command"].as_str().unwrap()
            )),
            AgentEvent::Finish {
                conversation_id, ..
            } => {
                finishes += 1;
                order.push(format!("finish {conversation_id}"));
            }
            _ => {}
        }
    }
    assert_eq!(pong_before_first_finish, Some(true));
    let pos = |s: &str| {
        order
            .iter()
            .position(|o| o == s)
            .unwrap_or_else(|| panic!("{s}: {order:?}"))
    };
    assert!(
        pos("finish fast") < pos("call slow echo second"),
        "{order:?}"
    );
    let first_slow_finish = order.iter().position(|o| o == "finish slow").unwrap();
    assert!(
        first_slow_finish < pos("call slow echo second"),
        "{order:?}"
    );
}

#[tokio::test]
async fn background_processes_holding_the_output_do_not_hang_the_turn() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    let t = Instant::now();
    agent.message("c", "sleep 30 & echo $!").await;
    let pid = read_pid(&mut agent).await;
    let frames = agent.until_terminal("c").await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(matches!(frames.last(), Some(AgentEvent::Finish { .. })));
    assert!(!tool_result(&frames).1);
    assert_gone(pid);
}

#[tokio::test]
async fn end_of_input_kills_children_and_reports_the_turn() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    agent.message("c", "echo $$; exec sleep 30").await;
    let pid = read_pid(&mut agent).await;
    let t = Instant::now();
    let rest = agent.close().await;
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(
        rest.iter()
            .any(|f| error_code(f) == Some((&Some("c".to_string()), "ABORTED"))),
        "{rest:?}"
    );
    assert_reaped(pid);
}

#[tokio::test]
async fn answer_question_gets_an_info() {
    let dir = ws();
    let mut agent = Agent::started("shell", dir.path(), json!({})).await;
    agent
        .send(&AgentInput::AnswerQuestion {
            request_id: "r1".into(),
            answer: "yes".into(),
        })
        .await;
    match agent.next().await {
        AgentEvent::Info { message } => assert!(message.contains("asks no questions"), "{message}"),
        other => panic!("expected info, got {other:?}"),
    }
}
