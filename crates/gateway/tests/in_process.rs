//! Gateway behaviour through its real sockets, with fake runners in this
//! process instead of sandboxes (tests/support/mod.rs): milliseconds per
//! test instead of seconds.

mod support;

use std::time::Duration;

use aishell_backend::TaskStatus;
use aishell_store::SessionState;
use serde_json::json;
use support::{TestGateway, WAIT, is_type, text_of};

#[tokio::test]
async fn messages_sent_while_the_task_starts_are_queued_in_order() {
    let gw = TestGateway::start().await;
    let mut c = gw.connect().await;
    for i in 0..5 {
        c.send(json!({"type": "message", "id": format!("m{i}"), "conversation_id": "conv-1", "content": format!("msg-{i}")})).await;
    }
    let mut replies = Vec::new();
    while replies.len() < 5 {
        let frames = c.turn().await;
        replies.push(text_of(&frames));
    }
    assert_eq!(
        replies,
        (0..5).map(|i| format!("msg-{i}")).collect::<Vec<_>>()
    );
    assert_eq!(gw.backend.launches(), 1, "one task for the whole burst");
    gw.shutdown().await;
}

#[tokio::test]
async fn reconnect_with_last_seq_replays_exactly_the_missed_events() {
    let gw = TestGateway::start().await;
    let mut c = gw.connect().await;
    c.message("m1", "/stream 30").await;
    // Read part of the stream, then drop the connection.
    let seen = c
        .until(|v| is_type(v, "text_delta") && v["delta"] == "chunk-9 ")
        .await;
    let last_seen = c.last_seq;
    let session = c.session_id.clone();
    drop(c);

    let mut r = gw.connect_to(Some((&session, last_seen))).await;
    assert_eq!(r.hello["resumed"], true);
    assert_eq!(r.session_id, session);
    let rest = r.turn().await;
    let seqs: Vec<u64> = rest.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs[0],
        last_seen + 1,
        "replay must start right after last_seq"
    );
    for pair in seqs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "gap or duplicate in replay: {seqs:?}");
    }
    // Together, the two connections saw every chunk exactly once, in order.
    let all = format!("{}{}", text_of(&seen), text_of(&rest));
    let expected: String = (0..30).map(|i| format!("chunk-{i} ")).collect();
    assert_eq!(all, expected);
    // Nothing more arrives: no event is replayed twice.
    assert!(
        r.next(std::time::Duration::from_millis(300))
            .await
            .is_none()
    );

    // Reconnecting at the end replays nothing; from 0 replays everything.
    let mut again = gw.connect_to(Some((&session, r.last_seq))).await;
    assert!(
        again
            .next(std::time::Duration::from_millis(300))
            .await
            .is_none()
    );
    let mut full = gw.connect_to(Some((&session, 0))).await;
    let everything = full.until(|v| is_type(v, "finish")).await;
    assert_eq!(everything[0]["seq"], 1);
    assert_eq!(text_of(&everything), expected);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_stored_state_follows_the_session() {
    let gw = TestGateway::start().await;
    let mut c = gw.connect().await;
    assert_eq!(c.hello["state"], "STOPPED");
    c.message("m1", "hello").await;
    let frames = c.turn().await;
    assert_eq!(text_of(&frames), "hello");
    // The state is written in order with the events: once the turn's
    // events are delivered, RUNNING is stored.
    let stored = gw.store.get_session(&c.session_id).await.unwrap().unwrap();
    assert_eq!(stored.state, SessionState::Running);
    let again = gw.connect_to(Some((&c.session_id, c.last_seq))).await;
    assert_eq!(again.hello["state"], "RUNNING");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_refused_launch_fails_the_start_and_the_message_runs_on_the_next_one() {
    let gw = TestGateway::start().await;
    gw.backend.refuse_launches(Some("no capacity"));
    let mut c = gw.connect().await;
    c.send(json!({"type": "message", "id": "m1", "conversation_id": "c1", "content": "first"}))
        .await;
    let frames = c
        .until(|v| is_type(v, "status") && v["state"] == "stopped")
        .await;
    let error = frames
        .iter()
        .find(|f| is_type(f, "error"))
        .expect("an error");
    assert_eq!(error["error"]["code"], "TASK_START_FAILED");
    assert_eq!(error["error"]["reason"], "backend_refused");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(
            "could not start your sandbox: the fake backend refused to launch a sandbox: no capacity"
        ),
        "{message}"
    );
    // The failed start kept the message; the next start runs it first.
    gw.backend.refuse_launches(None);
    c.send(json!({"type": "message", "id": "m2", "conversation_id": "c1", "content": "second"}))
        .await;
    assert_eq!(text_of(&c.turn().await), "first");
    assert_eq!(text_of(&c.turn().await), "second");
    assert_eq!(gw.backend.launches(), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_runtime_is_told_apart_from_a_refusing_one() {
    let gw = TestGateway::start().await;
    gw.backend.unreachable("connection refused");
    let mut c = gw.connect().await;
    c.message("m1", "first").await;
    let frames = c
        .until(|v| is_type(v, "status") && v["state"] == "stopped")
        .await;
    let error = frames
        .iter()
        .find(|f| is_type(f, "error"))
        .expect("an error");
    assert_eq!(error["error"]["code"], "TASK_START_FAILED");
    assert_eq!(error["error"]["reason"], "backend_unreachable");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(
            "the fake backend could not be reached to launch a sandbox: connection refused"
        ),
        "{message}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_task_exit_reported_by_the_watch_fails_the_start_at_once() {
    // The connect deadline is far: only the watch can end this start.
    let gw = TestGateway::start_with(|cfg| cfg.deadlines.connect = Duration::from_secs(60)).await;
    gw.backend.silence_runners();
    let mut c = gw.connect().await;
    c.message("m1", "first").await;
    c.until(|v| is_type(v, "status") && v["state"] == "starting")
        .await;
    let task_id = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(id) = gw.backend.task_ids().pop() {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a launched task");
    let reported = std::time::Instant::now();
    gw.backend
        .report(
            &task_id,
            TaskStatus::Exited {
                code: Some(3),
                reason: "exit code 3".into(),
            },
        )
        .await;
    let frames = c
        .until(|v| is_type(v, "status") && v["state"] == "stopped")
        .await;
    assert!(reported.elapsed() < Duration::from_secs(2));
    let error = frames
        .iter()
        .find(|f| is_type(f, "error"))
        .expect("an error");
    assert_eq!(error["error"]["code"], "TASK_START_FAILED");
    assert_eq!(error["error"]["reason"], "task_exited");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the sandbox exited (exit code 3, code 3)"),
        "{message}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn files_of_workspaces_the_gateway_cannot_reach_get_a_stable_code() {
    let backend =
        support::FakeBackend::reaching_workspaces(aishell_backend::WorkspaceAccess::ThroughRunner);
    let gw = TestGateway::start_on(backend, |_| {}).await;
    let response = reqwest::Client::new()
        .get(format!("http://{}/api/files", gw.addr))
        .bearer_auth(&gw.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "WORKSPACE_UNAVAILABLE");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("files are reachable only inside your sandbox"),
        "{message}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn an_orphan_reaped_after_a_restart_closes_its_usage_row() {
    let backend = support::FakeBackend::default();
    backend.left_running("t-orphan", "s-gone");
    let gw = TestGateway::start_on(backend, |cfg| {
        cfg.deadlines.orphan_grace = Duration::from_millis(1500)
    })
    .await;
    // The previous gateway opened its usage row.
    let record = aishell_store::SessionRecord::new("s-gone", "alice", "trace", "shell");
    gw.store.create_session(&record).await.unwrap();
    gw.store
        .usage_start("t-orphan", "s-gone", "alice")
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while !gw.backend.task_ids().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the orphan is stopped");
    // A closed row stops counting: a second apart, the same total.
    let week_ago = time::OffsetDateTime::now_utc() - time::Duration::days(7);
    let before = gw.store.usage_since(week_ago, Some("alice")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = gw.store.usage_since(week_ago, Some("alice")).await.unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].seconds, after[0].seconds, "the usage row is open");
    gw.shutdown().await;
}

/// The client socket's read buffer is small (idle clients are many): a
/// frame many times its size still arrives whole, and so does the next.
#[tokio::test]
async fn a_client_frame_larger_than_the_read_buffer_arrives_whole() {
    let gw = TestGateway::start().await;
    let mut c = gw.connect().await;
    let big: String = (0..40_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    c.message("m1", &big).await;
    assert_eq!(text_of(&c.turn().await), big);
    c.message("m2", "small").await;
    assert_eq!(text_of(&c.turn().await), "small");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_message_id_is_not_run_twice() {
    let gw = TestGateway::start().await;
    let mut c = gw.connect().await;
    c.message("same-id", "run").await;
    c.turn().await;
    c.message("same-id", "run").await;
    let info = c.until(|v| is_type(v, "info")).await;
    let said = info.last().unwrap()["message"].as_str().unwrap();
    assert!(said.contains("already accepted"), "{said}");
    // Also across a reconnect to the same session.
    let session = c.session_id.clone();
    drop(c);
    let mut r = gw.connect_to(Some((&session, 1_000_000))).await;
    r.message("same-id", "run").await;
    r.until(|v| is_type(v, "info")).await;
    r.message("other-id", "other").await;
    assert_eq!(text_of(&r.turn().await), "other");
    assert_eq!(gw.backend.received(), vec!["run", "other"]);
    gw.shutdown().await;
}

/// Class 3: a message while the old task is still stopping waits for the
/// stop, then runs on a new task, never on the dying one.
#[tokio::test]
async fn a_message_during_a_slow_stop_waits_for_it_then_starts_a_new_task() {
    let gw = TestGateway::start_with(|cfg| {
        cfg.idle_timeout = std::time::Duration::from_millis(200);
    })
    .await;
    let mut c = gw.connect().await;
    c.message("m1", "one").await;
    c.turn().await;
    gw.backend.hold_stops();
    c.until(|v| is_type(v, "status") && v["state"] == "stopped")
        .await;
    c.message("m2", "two").await;
    // Held behind the stop: no new task, no answer.
    let early = c.next(std::time::Duration::from_millis(300)).await;
    assert!(early.is_none(), "{early:?}");
    assert_eq!(gw.backend.launches(), 1);
    gw.backend.release_stops();
    assert_eq!(text_of(&c.turn().await), "two");
    assert_eq!(gw.backend.launches(), 2);
    assert_eq!(gw.backend.received(), vec!["one", "two"]);
    gw.shutdown().await;
}

/// Sessions live in this gateway's memory, from `/health`.
async fn sessions_live(gw: &TestGateway) -> u64 {
    let body = reqwest::get(format!("http://{}/health", gw.addr))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let health: serde_json::Value = serde_json::from_slice(&body).unwrap();
    health["sessions_live"].as_u64().unwrap()
}

/// A session whose task was stopped by its idle timer, with no client,
/// leaves memory when its eviction time comes — a deadline like any other,
/// reached while the actor waits on its timer (it used to wake at once,
/// forever, and stay).
#[tokio::test]
async fn a_session_evicted_by_its_timer_leaves_memory() {
    let gw = TestGateway::start_with(|cfg| {
        cfg.idle_timeout = Duration::from_millis(200);
        cfg.session_evict_after = Duration::from_millis(300);
    })
    .await;
    let mut c = gw.connect().await;
    c.message("m1", "hello").await;
    assert_eq!(text_of(&c.turn().await), "hello");
    drop(c);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sessions_live(&gw).await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the session never left memory"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}
