//! The `echo` agent, driven over in-memory pipes.

mod common;

use std::time::{Duration, Instant};

use aishell_protocol::agent::{AgentEvent, AgentInput, TokenUsage};
use common::{Agent, error_code};
use serde_json::json;

fn ws() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test]
async fn unknown_kind_is_an_error_naming_the_valid_kinds() {
    let err = aishell_agents::run("nope", tokio::io::empty(), tokio::io::sink())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
    for kind in aishell_agents::BUILTIN_KINDS {
        assert!(err.contains(kind), "{err}");
    }
}

#[tokio::test]
async fn init_is_answered_and_a_message_is_echoed_in_order() {
    let dir = ws();
    let mut agent = Agent::started("echo", dir.path(), json!({})).await;
    agent.message("c1", "hello big world").await;
    assert_eq!(
        agent.next().await,
        AgentEvent::TextDelta {
            conversation_id: "c1".into(),
            delta: "hello big world".into()
        }
    );
    assert_eq!(
        agent.next().await,
        AgentEvent::Content {
            conversation_id: "c1".into(),
            content: "hello big world".into()
        }
    );
    assert_eq!(
        agent.next().await,
        AgentEvent::Finish {
            conversation_id: "c1".into(),
            token_usage: TokenUsage {
                input_tokens: 3,
                output_tokens: 3
            }
        }
    );
    assert!(agent.close().await.is_empty());
}

#[tokio::test]
async fn stream_hook_gives_n_deltas_in_order() {
    let dir = ws();
    let mut agent = Agent::started("echo", dir.path(), json!({})).await;
    agent.message("c", "/stream 5").await;
    let frames = agent.until_terminal("c").await;
    assert_eq!(frames.len(), 7, "{frames:?}");
    for (i, frame) in frames[..5].iter().enumerate() {
        assert_eq!(
            frame,
            &AgentEvent::TextDelta {
                conversation_id: "c".into(),
                delta: format!("chunk-{i} ")
            }
        );
    }
    assert_eq!(
        frames[5],
        AgentEvent::Content {
            conversation_id: "c".into(),
            content: "chunk-0 chunk-1 chunk-2 chunk-3 chunk-4 ".into()
        }
    );
    assert!(matches!(frames[6], AgentEvent::Finish { .. }));
}

#[tokio::test]
async fn ask_round_trip() {
    let dir = ws();
    let mut agent = Agent::started("echo", dir.path(), json!({})).await;
    agent.message("c", "/ask Continue?").await;
    let request_id = match agent.next().await {
        AgentEvent::AskQuestion {
            conversation_id,
            request_id,
            question,
            options,
        } => {
            assert_eq!(conversation_id.as_deref(), Some("c"));
            assert_eq!(question, "Continue?");
            assert_eq!(options, Some(vec!["yes".to_string(), "no".to_string()]));
            request_id
        }
        other => panic!("expected ask_question, got {other:?}"),
    };
    // Nothing else happens until the answer comes (the ping proves it).
    agent.ping(json!(1)).await;
    assert_eq!(agent.next().await, AgentEvent::Pong { id: json!(1) });
    agent
        .send(&AgentInput::AnswerQuestion {
            request_id,
            answer: "yes".into(),
        })
        .await;
    assert_eq!(
        agent.next().await,
        AgentEvent::Content {
            conversation_id: "c".into(),
            content: "you answered: yes".into()
        }
    );
    assert!(matches!(
        agent.next().await,
        AgentEvent::Finish { conversation_id, .. } if conversation_id == "c"
    ));
}

#[tokio::test]
async fn abort_ends_a_pending_question_with_aborted() {
    let dir = ws();
    let mut agent = Agent::started("echo", dir.path(), json!({})).await;
    agent.message("c", "/ask really?").await;
    assert!(matches!(agent.next().await, AgentEvent::AskQuestion { .. }));
    agent.abort(Some("other")).await;
    agent.ping(json!("p")).await;
    assert_eq!(agent.next().await, AgentEvent::Pong { id: json!("p") });
    agent.abort(Some("c")).await;
    let frame = agent.next().await;
    assert_eq!(
        error_code(&frame),
        Some((&Some("c".to_string()), "ABORTED")),
        "{frame:?}"
    );
}

#[tokio::test]
async fn ping_after_restore_is_answered_after_the_info() {
    let dir = ws();
    let mut agent = Agent::start("echo", dir.path());
    // Inputs before init are handled anyway.
    agent.restore(&["a", "b"]).await;
    agent.ping(json!({"n": 7})).await;
    assert_eq!(
        agent.next().await,
        AgentEvent::Info {
            message: "restored 2 conversations".into()
        }
    );
    assert_eq!(
        agent.next().await,
        AgentEvent::Pong {
            id: json!({"n": 7})
        }
    );
}

#[tokio::test]
async fn sleep_finishes_and_is_abortable() {
    let dir = ws();
    let mut agent = Agent::started("echo", dir.path(), json!({})).await;
    agent.message("short", "/sleep 20").await;
    let frames = agent.until_terminal("short").await;
    assert!(
        matches!(frames.last(), Some(AgentEvent::Finish { .. })),
        "{frames:?}"
    );

    agent.message("long", "/sleep 30000").await;
    // The sleep runs in a task: a ping is answered meanwhile.
    agent.ping(json!(2)).await;
    assert_eq!(agent.next().await, AgentEvent::Pong { id: json!(2) });
    let t = Instant::now();
    agent.abort(None).await;
    let frame = agent.next().await;
    assert_eq!(
        error_code(&frame),
        Some((&Some("long".to_string()), "ABORTED")),
        "{frame:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn end_of_input_ends_in_flight_turns_with_a_terminal_frame() {
    let dir = ws();
    let mut agent = Agent::started("echo", dir.path(), json!({})).await;
    agent.message("s", "/sleep 30000").await;
    agent.message("q", "/ask ok?").await;
    assert!(matches!(agent.next().await, AgentEvent::AskQuestion { .. }));
    let t = Instant::now();
    let rest = agent.close().await;
    assert!(t.elapsed() < Duration::from_secs(2));
    for conv in ["s", "q"] {
        assert!(
            rest.iter()
                .any(|f| error_code(f) == Some((&Some(conv.to_string()), "ABORTED"))),
            "{conv}: {rest:?}"
        );
    }
}

#[tokio::test]
async fn malformed_lines_get_bad_frame_and_the_agent_keeps_going() {
    let dir = ws();
    let mut agent = Agent::started("echo", dir.path(), json!({})).await;
    for bad in [
        "this is not json\n",
        "{\"type\":\"no_such_type\"}\n",
        "{\"type\":\"message\",\"content\":1}\n",
        "[1,2,3]\n",
    ] {
        agent.send_raw(bad).await;
        let frame = agent.next().await;
        assert_eq!(
            error_code(&frame),
            Some((&None, "BAD_FRAME")),
            "{bad}: {frame:?}"
        );
    }
    // Blank lines are ignored, CRLF is accepted.
    agent
        .send_raw("\n   \n{\"type\":\"ping\",\"id\":3}\r\n")
        .await;
    assert_eq!(agent.next().await, AgentEvent::Pong { id: json!(3) });
    agent.message("c", "still here").await;
    let frames = agent.until_terminal("c").await;
    assert!(matches!(frames.last(), Some(AgentEvent::Finish { .. })));
}

/// `/crash` exits the whole process, so it runs in a child copy of this test
/// binary (selected by an environment variable).
#[test]
fn crash_hook_exits_with_code_3_and_says_why() {
    if std::env::var_os("AISHELL_ECHO_CRASH_CHILD").is_some() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let input = format!(
            "{}{}",
            AgentInput::Init {
                workspace: None,
                settings: Default::default(),
                env: Default::default(),
                run_as: None,
            }
            .to_line(),
            AgentInput::Message {
                conversation_id: "c".into(),
                content: "/crash".into(),
                message_id: None
            }
            .to_line()
        );
        let _ = rt.block_on(aishell_agents::run(
            "echo",
            std::io::Cursor::new(input.into_bytes()),
            tokio::io::sink(),
        ));
        // Only reached if /crash did not exit.
        std::process::exit(0);
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_hook_exits_with_code_3_and_says_why",
            "--nocapture",
        ])
        .env("AISHELL_ECHO_CRASH_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "stderr: {stderr}");
    assert!(
        stderr.contains("echo agent crashing on request"),
        "{stderr}"
    );
}

#[tokio::test]
async fn many_messages_each_get_exactly_one_finish() {
    let dir = ws();
    let mut agent = Agent::started("echo", dir.path(), json!({})).await;
    let mut batch = String::new();
    for i in 0..500 {
        batch.push_str(
            &AgentInput::Message {
                conversation_id: format!("c{}", i % 7),
                content: format!("message {i}"),
                message_id: None,
            }
            .to_line(),
        );
    }
    agent.send_raw(&batch).await;
    let frames = agent.close().await;
    let finishes = frames
        .iter()
        .filter(|f| matches!(f, AgentEvent::Finish { .. }))
        .count();
    assert_eq!(finishes, 500);
    assert_eq!(frames.len(), 1500);
}
