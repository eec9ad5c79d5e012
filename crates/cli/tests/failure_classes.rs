//! The production failure classes reproduced against real processes with a
//! fault-injecting backend decorator, plus crashes mid-turn and a gateway
//! killed and restarted under load. Class 3 (a message during a slow stop)
//! is gateway logic only: crates/gateway/tests/in_process.rs.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A gateway whose backend reads faults from a file the test controls.
fn faulty(args: &[&str]) -> (Gateway, PathBuf, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("faults");
    std::fs::write(&file, "").unwrap();
    let gw = Gateway::start_with_env(
        args,
        &[("AISHELL_TEST_FAULTS_FILE", file.to_str().unwrap())],
    );
    (gw, file, tmp)
}

fn set_faults(file: &PathBuf, rules: &str) {
    std::fs::write(file, rules).unwrap();
}

/// The task that became ready for `session_id`.
async fn ready_task(gw: &Gateway, session_id: &str) -> String {
    let ready = gw
        .wait_log(
            "task_ready",
            |l| l["phase"] == "task_ready" && l["sessionId"] == session_id,
            WAIT,
        )
        .await;
    ready["taskId"].as_str().unwrap().to_string()
}

/// A runner socket other than the real runner's, holding the credential of
/// `session_id`'s task `task`: it says `hello` (agent running), so the
/// gateway takes it for a re-dial and routes the task's frames to it.
async fn stand_in_runner(gw: &Gateway, task: &str, session_id: &str) -> StandInSocket {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let key = std::fs::read(gw.data_dir.join("runner-credential.key")).unwrap();
    let cred = aishell_gateway::credential::CredentialSigner::new(key).mint(
        task,
        aishell_backend::TaskMode::Cold,
        Some(session_id),
        Duration::from_secs(60),
    );
    let mut req = format!("ws://127.0.0.1:{}/internal/task/{session_id}", gw.port)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {cred}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let hello = json!({"type": "hello", "protocol": 1, "task_id": task, "runner_version": "stand-in",
        "session_id": session_id, "agent_running": true});
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    ws
}

type StandInSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An echo session that answered `first`, its real runner frozen (SIGSTOP:
/// it cannot re-dial while a stand-in holds its place; SIGCONT wakes it) and
/// a stand-in runner holding the task's socket instead. Returns the client,
/// the task, the frozen runner and the stand-in's socket.
async fn session_behind_a_stand_in_runner(
    gw: &Gateway,
) -> (Client, String, nix::unistd::Pid, StandInSocket) {
    use nix::sys::signal::{Signal, kill};
    let mut c = gw.connect().await;
    c.message("m1", "first").await;
    assert_eq!(text_of(&c.turn().await), "first");
    let task = ready_task(gw, &c.session_id).await;
    let runners = pids_with_env(&format!("AISHELL_SESSION_ID={}", c.session_id), " runner");
    assert_eq!(runners.len(), 1, "one runner: {runners:?}");
    let runner = nix::unistd::Pid::from_raw(runners[0]);
    kill(runner, Signal::SIGSTOP).unwrap();
    let ws = stand_in_runner(gw, &task, &c.session_id).await;
    (c, task, runner, ws)
}

/// Class 1: the original's ECS role lacked DescribeTasks. A failing status
/// call must reach the client with the backend's reason within 1 s.
#[tokio::test]
async fn class1_a_failing_status_call_reaches_the_client_within_a_second() {
    let (gw, faults, _t) = faulty(&["--agent", "echo", "--enable-warm-pool", "false"]);
    // The runner dials late, so the status poll is what answers first.
    set_faults(
        &faults,
        "status=error:AccessDeniedException: not authorized to perform ecs:DescribeTasks\nrunner_dial_delay=3000\n",
    );
    let mut c = gw.connect().await;
    let sent = Instant::now();
    c.message("m1", "hello").await;
    let frames = c.until(|v| is_type(v, "error"), WAIT).await;
    let took = sent.elapsed();
    let err = first_error(&frames);
    assert_eq!(err["error"]["code"], "TASK_START_FAILED");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("DescribeTasks"),
        "{err}"
    );
    assert!(took < Duration::from_secs(1), "error took {took:?}");

    // The message was kept: once the backend answers, it runs, then the retry.
    set_faults(&faults, "");
    c.message("m2", "retry").await;
    assert_eq!(text_of(&c.turn().await), "hello");
    assert_eq!(text_of(&c.turn().await), "retry");

    // A launch refusal during a restart is TASK_RESTART_FAILED, with its reason.
    set_faults(&faults, "launch=error:ThrottlingException: Rate exceeded\n");
    let runners = pids_with_env(&format!("AISHELL_SESSION_ID={}", c.session_id), " runner");
    assert_eq!(runners.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(runners[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    c.until(|v| is_type(v, "status") && v["state"] == "stopped", WAIT)
        .await;
    c.message("m3", "after").await;
    let frames = c.until(|v| is_type(v, "error"), WAIT).await;
    let err = first_error(&frames);
    assert_eq!(err["error"]["code"], "TASK_RESTART_FAILED");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ThrottlingException"),
        "{err}"
    );
}

/// Class 2: the runner dialled back before the gateway registered it
/// ("No ECS bridge found"): accepted, the session works.
#[tokio::test]
async fn class2_a_runner_dialling_back_before_the_launch_call_returns_is_accepted() {
    let (gw, faults, _t) = faulty(&["--agent", "echo", "--enable-warm-pool", "false"]);
    set_faults(&faults, "launch=delay:4000\n");
    let mut c = gw.connect().await;
    let sent = Instant::now();
    c.message("m1", "early bird").await;
    let frames = c.turn().await;
    assert_eq!(text_of(&frames), "early bird", "{}", pretty(&frames));
    assert!(
        sent.elapsed() < Duration::from_millis(3800),
        "ready before the launch call returned"
    );
    let logs = gw.logs();
    let pos = |phase: &str| logs.iter().position(|l| l["phase"] == phase);
    gw.wait_log("task_start", |l| l["phase"] == "task_start", WAIT)
        .await;
    let logs2 = gw.logs();
    let start = logs2
        .iter()
        .position(|l| l["phase"] == "task_start")
        .unwrap();
    assert!(
        pos("task_connect").unwrap() < start,
        "runner connected before the launch call returned"
    );
}

/// Class 2, the other side of the window: a dial-back with a validly
/// signed credential for a session that is not registered and a task this
/// gateway never launched is refused at once (403), without waiting out the
/// grace window, which exists only for tasks the gateway launched itself.
#[tokio::test]
async fn class2_a_dial_back_for_a_task_never_launched_is_refused_at_once() {
    let gw = Gateway::start(&["--agent", "echo", "--dial-back-grace", "1s"]);
    let key = std::fs::read(gw.data_dir.join("runner-credential.key")).unwrap();
    let signer = aishell_gateway::credential::CredentialSigner::new(key);
    let cred = signer.mint(
        "t-x",
        aishell_backend::TaskMode::Cold,
        Some("s-not-yet"),
        Duration::from_secs(60),
    );
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://127.0.0.1:{}/internal/task/s-not-yet", gw.port)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {cred}").parse().unwrap());
    let started = Instant::now();
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "an unknown task does not get the grace window"
    );
}

/// Class 4: a restart that hangs ends with TASK_RESTART_FAILED at the deadline,
/// and the user can retry.
#[tokio::test]
async fn class4_a_hanging_restart_fails_at_its_deadline_and_a_retry_works() {
    let (gw, faults, _t) = faulty(&[
        "--agent",
        "echo",
        "--enable-warm-pool",
        "false",
        "--session-idle-timeout",
        "1s",
        "--restart-timeout",
        "2s",
    ]);
    let mut c = gw.connect().await;
    c.message("m1", "one").await;
    c.turn().await;
    c.until(
        |v| is_type(v, "status") && v["state"] == "stopped",
        Duration::from_secs(10),
    )
    .await;
    set_faults(&faults, "launch=hang\n");
    let sent = Instant::now();
    c.message("m2", "two").await;
    let frames = c
        .until(|v| is_type(v, "error"), Duration::from_secs(10))
        .await;
    assert_eq!(first_error(&frames)["error"]["code"], "TASK_RESTART_FAILED");
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    set_faults(&faults, "");
    c.message("m3", "three").await;
    // The kept message runs first, then the retry.
    let mut texts = Vec::new();
    while texts.len() < 2 {
        texts.push(text_of(&c.turn().await));
    }
    assert_eq!(texts, ["two", "three"]);
}

/// Class 5: detaching the client and the idle timer during a restart must
/// not stop the task being started.
#[tokio::test]
async fn class5_detach_and_idle_timer_during_a_restart_do_not_stop_the_new_task() {
    let (gw, faults, _t) = faulty(&[
        "--agent",
        "echo",
        "--enable-warm-pool",
        "false",
        "--session-idle-timeout",
        "1s",
    ]);
    let mut c = gw.connect().await;
    c.message("m1", "one").await;
    c.turn().await;
    c.until(
        |v| is_type(v, "status") && v["state"] == "stopped",
        Duration::from_secs(10),
    )
    .await;
    // A slow restart (2 s, longer than the idle timeout), and the client leaves.
    set_faults(&faults, "status=delay:2000\nrunner_dial_delay=2000\n");
    c.message("m2", "two").await;
    let session = c.session_id.clone();
    let last = c.last_seq;
    drop(c);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    set_faults(&faults, "");
    let mut r = gw
        .connect_as(&gw.token, Some((&session, last)))
        .await
        .unwrap();
    let frames = r.turn().await;
    assert_eq!(
        text_of(&frames),
        "two",
        "the restart completed and the queued message ran: {}",
        pretty(&frames)
    );
    let restarts: Vec<_> = gw
        .logs()
        .into_iter()
        .filter(|l| l["phase"] == "task_restart")
        .collect();
    assert_eq!(restarts.len(), 1);
    assert_eq!(restarts[0]["success"], true);
}

/// The runner killed mid-turn: AGENT_CRASHED, then messages queued meanwhile
/// run in order on a new task.
#[tokio::test]
async fn a_runner_killed_mid_turn_gives_agent_crashed_and_queued_messages_run_in_order() {
    let gw = Gateway::start(&["--enable-warm-pool", "false"]);
    let mut c = gw.connect().await;
    c.message("m1", "echo go; sleep 30").await;
    c.until(|v| is_type(v, "text_delta"), WAIT).await;
    let runners = pids_with_env(&format!("AISHELL_SESSION_ID={}", c.session_id), " runner");
    assert_eq!(runners.len(), 1, "{runners:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(runners[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let conv = "conv-q";
    for i in 0..3 {
        c.send(json!({"type": "message", "id": format!("q{i}"), "conversation_id": conv, "content": format!("echo queued-{i}")})).await;
    }
    let frames = c
        .until(|v| is_type(v, "error"), Duration::from_secs(5))
        .await;
    assert_eq!(first_error(&frames)["error"]["code"], "AGENT_CRASHED");
    let mut outputs = Vec::new();
    while outputs.len() < 3 {
        outputs.push(text_of(&c.turn().await).trim().to_string());
    }
    assert_eq!(outputs, ["queued-0", "queued-1", "queued-2"]);
}

/// Gateway SIGKILLed while a turn streams; restarted on the same data dir:
/// the runner re-dials and is adopted, the client resumes with `last_seq`
/// and gets every line exactly once; warm tasks re-register or are cleaned up.
#[tokio::test]
async fn a_gateway_killed_mid_stream_loses_nothing_after_restart() {
    let mut gw = Gateway::start(&["--warm-pool-target-size", "1", "--orphan-grace", "2s"]);
    gw.wait_pool_ready(1, WAIT).await;
    let mut c = gw.connect().await;
    c.message(
        "m1",
        "for i in $(seq 1 40); do echo line-$i; sleep 0.05; done",
    )
    .await;
    let seen = c
        .until(
            |v| is_type(v, "text_delta") && v["delta"].as_str().unwrap_or("").contains("line-5"),
            WAIT,
        )
        .await;
    let session = c.session_id.clone();
    gw.kill9();
    let last_seen = c.last_seq;
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.restart(&[]);
    // The client reconnects and resumes.
    let mut r = None;
    for _ in 0..50 {
        if let Ok(client) = gw.connect_as(&gw.token, Some((&session, last_seen))).await {
            r = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut r = r.expect("reconnected");
    let rest = r
        .until(|v| is_type(v, "finish"), Duration::from_secs(30))
        .await;
    let seqs: Vec<u64> = rest.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    for pair in seqs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "gap or duplicate: {seqs:?}");
    }
    let all = format!("{}{}", text_of(&seen), text_of(&rest));
    let lines: Vec<&str> = all.lines().collect();
    let expected: Vec<String> = (1..=40).map(|i| format!("line-{i}")).collect();
    assert_eq!(lines, expected, "every line exactly once, in order");
    assert!(
        gw.logs().iter().any(|l| l["event"] == "task_adopted"),
        "runner was adopted"
    );
    // The warm task re-registered (or was replaced) and the pool is full again.
    gw.wait_pool_ready(1, WAIT).await;
    // The session keeps working after the restart.
    r.message("m2", "echo still-here").await;
    assert!(text_of(&r.turn().await).contains("still-here"));
}

/// A burst beyond the launch slots queues; beyond the queue it is told to
/// come back (`OVERLOADED`), never left waiting.
#[tokio::test]
async fn a_start_burst_queues_then_overflows_with_overloaded() {
    let (gw, faults, _t) = faulty(&[
        "--agent",
        "echo",
        "--enable-warm-pool",
        "false",
        "--max-concurrent-launches",
        "1",
        "--max-queued-starts",
        "1",
    ]);
    set_faults(&faults, "launch=delay:3000\n");
    let mut first = gw.connect().await;
    first.message("m", "first").await;
    first.until(|v| is_type(v, "status"), WAIT).await;
    let mut second = gw.connect().await;
    second.message("m", "second").await;
    second.until(|v| is_type(v, "status"), WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = gw.connect().await;
    third.message("m", "third").await;
    let frames = third.until(|v| is_type(v, "error"), WAIT).await;
    let err = frames.last().unwrap();
    assert_eq!(err["error"]["code"], "OVERLOADED");
    assert!(err["error"]["message"].as_str().unwrap().contains("retry"));
    // The queued one is served once the slot frees.
    set_faults(&faults, "");
    assert_eq!(text_of(&second.turn().await), "second");
    assert_eq!(text_of(&first.turn().await), "first");
}

/// A runner socket that sends garbage and then an oversized frame: the
/// gateway ignores the garbage and drops that socket at the size limit; the
/// session's real runner re-attaches, the session keeps working, and another
/// session is unaffected.
#[tokio::test]
async fn a_runner_sending_garbage_and_huge_frames_fails_only_its_session() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let mut victim = gw.connect().await;
    victim.message("m1", "hello").await;
    victim.turn().await;
    let mut bystander = gw.connect().await;
    bystander.message("m1", "bystander").await;
    bystander.turn().await;
    let task = ready_task(&gw, &victim.session_id).await;
    // A hostile runner holding that task's credential.
    let mut ws = stand_in_runner(&gw, &task, &victim.session_id).await;
    for garbage in [
        "not json",
        "{\"type\":\"nope\"}",
        "{\"type\":\"agent\",\"seq\":\"x\"}",
    ] {
        ws.send(Message::Text(garbage.into())).await.unwrap();
    }
    let huge = "x".repeat(70 << 20);
    let _ = ws.send(Message::Text(huge.into())).await;
    drop(ws);
    // The hostile socket displaced the real runner's; the real runner re-dials
    // with its credential and takes its place again, so the session recovers.
    let reattached = |gw: &Gateway| {
        gw.logs()
            .iter()
            .filter(|l| l["event"] == "runner_reattached" && l["taskId"] == task.as_str())
            .count()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while reattached(&gw) < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reattached(&gw) >= 2, "the real runner did not come back");
    victim.message("m2", "recovered").await;
    assert_eq!(text_of(&victim.turn().await), "recovered");
    bystander.message("m2", "unaffected").await;
    assert_eq!(text_of(&bystander.turn().await), "unaffected");
    assert!(
        gw.logs().iter().any(|l| l["event"] == "runner_bad_frame"),
        "garbage was logged"
    );
}

/// A message written into a runner socket that then dies is not lost: the
/// runner re-dials, says which inputs it handled, and the gateway sends the
/// rest again (the user would otherwise wait for an answer forever).
#[tokio::test]
async fn a_message_swallowed_by_a_dying_runner_socket_is_sent_again_after_the_redial() {
    use futures_util::StreamExt;
    use nix::sys::signal::{Signal, kill};
    use tokio_tungstenite::tungstenite::Message;
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    // The stand-in swallows whatever the gateway sends it.
    let (mut c, task, runner, mut ws) = session_behind_a_stand_in_runner(&gw).await;
    c.message("m2", "swallowed").await;
    let swallowed = tokio::time::timeout(WAIT, async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg
                && t.contains("swallowed")
            {
                return t.to_string();
            }
        }
        panic!("the stand-in's socket closed before the message reached it");
    })
    .await
    .expect("the message went to the stand-in");
    assert!(
        swallowed.contains("\"seq\""),
        "inputs are numbered: {swallowed}"
    );
    drop(ws);

    // The real runner wakes, finds its socket gone, re-dials: the message
    // it never saw reaches its agent, and the user gets the answer.
    kill(runner, Signal::SIGCONT).unwrap();
    assert_eq!(text_of(&c.turn().await), "swallowed");
    assert!(
        gw.logs()
            .iter()
            .any(|l| l["event"] == "runner_inputs_resent" && l["taskId"] == task.as_str()),
        "the gateway said it sent inputs again"
    );
    // Exactly once: the next message is answered once, in order.
    c.message("m3", "after").await;
    assert_eq!(text_of(&c.turn().await), "after");
}

/// Acknowledgements to a runner are combined: agent frames stored in
/// separate batches 30 ms apart are acknowledged together, once, with the
/// highest seq (an ack per stored batch woke every runner mid-burst).
#[tokio::test]
async fn acknowledgements_to_a_runner_are_combined_and_cover_the_last_frame() {
    use futures_util::{SinkExt, StreamExt};
    use nix::sys::signal::{Signal, kill};
    use tokio_tungstenite::tungstenite::Message;
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let (mut c, _task, runner, mut ws) = session_behind_a_stand_in_runner(&gw).await;
    // Above anything the real runner sent, so none is taken for a resend.
    let seqs = 1000..1005u64;
    for seq in seqs.clone() {
        let frame = json!({"type": "agent", "seq": seq,
            "frame": {"type": "text_delta", "conversation_id": "c-acks", "delta": format!("d{seq}")}});
        ws.send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
        // Each is stored by the time the next is sent.
        let frames = c.until(|v| is_type(v, "text_delta"), WAIT).await;
        assert_eq!(frames.last().unwrap()["delta"], format!("d{seq}"));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut acks = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(1500), async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "ack" {
                    acks.push(v["seq"].as_u64().unwrap());
                }
            }
        }
    })
    .await;
    assert_eq!(
        acks.last().copied(),
        Some(seqs.end - 1),
        "the last ack covers the last stored frame: {acks:?}"
    );
    assert!(
        acks.len() <= 2,
        "five stored batches, acknowledged together: {acks:?}"
    );
    drop(ws);
    kill(runner, Signal::SIGCONT).unwrap();
}
