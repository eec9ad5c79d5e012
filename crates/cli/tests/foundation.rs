//! End to end over real sockets and real processes: gateway (`aishell serve`),
//! process backend, runner and the built-in agents (issue: foundation).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn echo_agent_streams_a_reply_with_consecutive_seqs() {
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let mut c = gw.connect().await;
    assert_eq!(c.hello["type"], "session");
    assert_eq!(c.hello["protocol"], 1);
    c.message("m1", "hello there").await;
    let frames = c.turn().await;
    assert_eq!(text_of(&frames), "hello there", "{}", pretty(&frames));
    let finish = frames.last().unwrap();
    assert_eq!(finish["type"], "finish");
    // Every stream event carries the session id and seq increasing by one.
    let seqs: Vec<u64> = frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    for pair in seqs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "seqs not consecutive: {seqs:?}");
    }
    assert!(
        frames
            .iter()
            .all(|f| f["session_id"] == c.session_id.as_str())
    );
    // The status frames said where the task came from.
    let status = of_type(&frames, "status");
    assert_eq!(status[0]["state"], "starting");
    assert_eq!(status[0]["source"], "cold");
    assert!(status.iter().any(|s| s["state"] == "ready"));
    assert_eq!(
        of_type(&frames, "init").len(),
        1,
        "agent init forwarded once"
    );
}

#[tokio::test]
async fn shell_agent_runs_in_the_workspace_and_the_file_persists() {
    let gw = Gateway::start(&["--enable-warm-pool", "false"]);
    let mut c = gw.connect().await;
    c.message("m1", "echo hi > notes.txt && cat notes.txt")
        .await;
    let frames = c.turn().await;
    let call = of_type(&frames, "tool_call");
    assert_eq!(call.len(), 1, "{}", pretty(&frames));
    assert_eq!(
        call[0]["tool_input"]["command"],
        "echo hi > notes.txt && cat notes.txt"
    );
    assert!(text_of(&frames).contains("hi"));
    let result = of_type(&frames, "tool_result");
    assert_eq!(result[0]["is_error"], false);
    assert_eq!(frames.last().unwrap()["type"], "finish");
    assert_eq!(read(&gw.workspace("local").join("notes.txt")), "hi\n");
    c.close().await;

    // A later session of the same user sees the file.
    let mut c2 = gw.connect().await;
    c2.message("m2", "cat notes.txt").await;
    let frames = c2.turn().await;
    assert!(text_of(&frames).contains("hi"), "{}", pretty(&frames));

    // The lifecycle events of the cold path were logged with their fields.
    let logs = gw.logs();
    for phase in [
        "task_start",
        "task_pending",
        "task_connect",
        "task_ready",
        "session_create",
        "message_roundtrip",
        "ws_disconnect",
    ] {
        assert!(
            logs.iter().any(|l| l["event"] == "task_lifecycle"
                && l["phase"] == phase
                && l["sessionId"].is_string()),
            "no {phase} lifecycle event"
        );
    }
    let ready = logs.iter().find(|l| l["phase"] == "task_ready").unwrap();
    assert_eq!(ready["source"], "cold");
    assert!(
        ready["breakdown"]["connect"].is_u64() && ready["breakdown"]["agent_ready"].is_u64(),
        "{ready}"
    );
    assert!(
        ready["duration_ms"].is_u64()
            && ready["timestamp"].is_string()
            && ready["service"] == "aishell-gateway"
    );
}

#[tokio::test]
async fn idle_stop_keeps_the_workspace_and_the_next_message_resumes() {
    let gw = Gateway::start(&["--session-idle-timeout", "1s"]);
    let mut c = gw.connect().await;
    c.message("m1", "echo persisted > kept.txt").await;
    let first = c.turn().await;
    let conversation = of_type(&first, "tool_call")[0]["conversation_id"]
        .as_str()
        .expect("conversation id")
        .to_string();
    // An attached but silent client is not activity: the task stops.
    c.until(
        |v| is_type(v, "status") && v["state"] == "stopped",
        Duration::from_secs(10),
    )
    .await;
    gw.wait_log("idle_timeout", |l| l["phase"] == "idle_timeout", WAIT)
        .await;

    c.send(json!({"type": "message", "id": "m2", "conversation_id": conversation, "content": "cat kept.txt"})).await;
    let frames = c.turn().await;
    let status: Vec<_> = of_type(&frames, "status")
        .into_iter()
        .map(|s| s["state"].clone())
        .collect();
    assert_eq!(status.first().unwrap(), "restarting", "{}", pretty(&frames));
    let recovered = of_type(&frames, "session_recovered");
    assert_eq!(recovered.len(), 1, "{}", pretty(&frames));
    assert_eq!(recovered[0]["restored"], 1);
    assert!(text_of(&frames).contains("persisted"));
    // The conversation continued in the new sandbox: its history has both commands.
    let history = read(
        &gw.workspace("local")
            .join(format!(".aishell/shell/{conversation}.jsonl")),
    );
    assert_eq!(history.lines().count(), 2, "{history}");
    assert!(
        gw.logs()
            .iter()
            .any(|l| l["phase"] == "task_restart" && l["success"] == true)
    );
}

#[tokio::test]
async fn clients_without_a_valid_token_are_refused_and_users_cannot_open_each_others_sessions() {
    let gw = Gateway::start(&["--agent", "echo"]);
    // No token, bad token: 401 on upgrade.
    let no_token = tokio_tungstenite::connect_async(gw.ws_url()).await;
    match no_token {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    match gw.connect_as("ais_not_a_real_token", None).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        Err(e) => panic!("expected 401, got {e}"),
        Ok(_) => panic!("expected 401, got a connection"),
    }
    // ?token= works (browsers cannot set headers).
    let url = format!("{}?token={}", gw.ws_url(), gw.token);
    let (_ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("query token accepted");
    assert_eq!(resp.status(), 101);

    let alice = gw.create_token("alice");
    let bob = gw.create_token("bob");
    let mut a = gw.connect_as(&alice, None).await.unwrap();
    a.message("m1", "secret of alice").await;
    a.turn().await;
    let mut b = gw.connect_as(&bob, Some((&a.session_id, 0))).await.unwrap();
    // The same answer as for a session that does not exist: a probe cannot
    // tell that alice's session exists.
    assert_eq!(b.hello["type"], "error");
    assert_eq!(b.hello["error"]["code"], "SESSION_NOT_FOUND");
    match b.next_or_close(WAIT).await {
        Err(Some((code, _))) => assert_eq!(code, 4404),
        other => panic!("expected close 4404, got {other:?}"),
    }
    // Unknown session: SESSION_NOT_FOUND, not a new session.
    let u = gw
        .connect_as(&alice, Some(("s-doesnotexist", 0)))
        .await
        .unwrap();
    assert_eq!(u.hello["error"]["code"], "SESSION_NOT_FOUND");
}

#[tokio::test]
async fn runner_dial_backs_with_forged_or_foreign_credentials_are_refused() {
    let gw = Gateway::start(&["--agent", "echo"]);
    let mut c = gw.connect().await;
    c.message("m1", "hi").await;
    c.turn().await;
    let session = c.session_id.clone();
    let url = format!("ws://127.0.0.1:{}/internal/task/{session}", gw.port);
    let dial = |cred: Option<String>| {
        let url = url.clone();
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut req = url.into_client_request().unwrap();
            if let Some(c) = cred {
                req.headers_mut()
                    .insert("authorization", format!("Bearer {c}").parse().unwrap());
            }
            tokio_tungstenite::connect_async(req).await
        }
    };
    let status = |r: Result<_, tokio_tungstenite::tungstenite::Error>| match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => 101,
    };
    assert_eq!(status(dial(None).await), 401, "no credential");
    assert_eq!(
        status(dial(Some("forged.credential".into())).await),
        401,
        "forged credential"
    );
    // Signed with another key (another gateway).
    let other = aishell_gateway::credential::CredentialSigner::new(vec![1; 32]);
    let foreign = other.mint(
        "t-x",
        aishell_backend::TaskMode::Cold,
        Some(&session),
        Duration::from_secs(60),
    );
    assert_eq!(
        status(dial(Some(foreign)).await),
        401,
        "credential of another gateway"
    );
    // Properly signed, but for another session.
    let key = std::fs::read(gw.data_dir.join("runner-credential.key")).unwrap();
    let signer = aishell_gateway::credential::CredentialSigner::new(key);
    let other_session = signer.mint(
        "t-x",
        aishell_backend::TaskMode::Cold,
        Some("s-other"),
        Duration::from_secs(60),
    );
    assert_eq!(
        status(dial(Some(other_session)).await),
        403,
        "credential of another session"
    );
    // Properly signed for this session, but for a task this gateway never
    // launched: refused before the upgrade.
    let stale = signer.mint(
        "t-not-current",
        aishell_backend::TaskMode::Cold,
        Some(&session),
        Duration::from_secs(60),
    );
    assert_eq!(
        status(dial(Some(stale)).await),
        403,
        "credential of a task never launched"
    );
    // The refusals were logged (the gateway's output reaches us a moment
    // after its answers), and the real session still works.
    let refusals = || {
        gw.logs()
            .iter()
            .filter(|l| l["event"] == "runner_auth_failed")
            .count()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while refusals() < 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refusals() >= 4, "refusals logged: {}", refusals());
    c.message("m2", "still fine").await;
    assert_eq!(text_of(&c.turn().await), "still fine");
}

#[tokio::test]
async fn malformed_unknown_and_oversized_frames() {
    let gw = Gateway::start(&["--agent", "echo", "--max-frame-bytes", "4096"]);
    let mut c = gw.connect().await;
    c.send_raw(Message::Text("{not json".into())).await.unwrap();
    let e = c.next(WAIT).await.unwrap();
    assert_eq!(e["error"]["code"], "BAD_FRAME");
    c.send(json!({"type": "launch_missiles"})).await;
    let e = c.next(WAIT).await.unwrap();
    assert_eq!(e["error"]["code"], "BAD_FRAME");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("launch_missiles")
    );
    c.send(json!({"type": "message", "content": 42})).await;
    assert_eq!(c.next(WAIT).await.unwrap()["error"]["code"], "BAD_FRAME");
    // The connection stayed up.
    c.send(json!({"type": "ping", "id": 7})).await;
    let pong = c.next(WAIT).await.unwrap();
    assert_eq!(
        (pong["type"].as_str(), pong["id"].as_i64()),
        (Some("pong"), Some(7))
    );
    c.message("m1", "works").await;
    assert_eq!(text_of(&c.turn().await), "works");
    // Oversized: closed with 1009.
    let big = json!({"type": "message", "content": "x".repeat(5000)});
    c.send(big).await;
    match c.next_or_close(WAIT).await {
        Err(Some((code, _))) => assert_eq!(code, 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }
}

#[tokio::test]
async fn killing_the_agent_mid_turn_reports_agent_crashed_and_the_next_message_works() {
    let gw = Gateway::start(&[]);
    let mut c = gw.connect().await;
    c.message("m1", "echo started; sleep 30").await;
    c.until(
        |v| is_type(v, "text_delta") && v["delta"].as_str().unwrap_or("").contains("started"),
        WAIT,
    )
    .await;
    let agents = agent_pids_of_session(&gw, &c.session_id, "shell").await;
    assert_eq!(
        agents.len(),
        1,
        "expected one agent process, found {agents:?}"
    );
    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agents[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let frames = c
        .until(|v| is_type(v, "error"), Duration::from_secs(5))
        .await;
    let err = frames.last().unwrap();
    assert_eq!(err["error"]["code"], "AGENT_CRASHED", "{}", pretty(&frames));
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("signal 9"),
        "{err}"
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(2),
        "AGENT_CRASHED took {:?}",
        killed_at.elapsed()
    );
    // The next message starts a new sandbox and works.
    c.message("m2", "echo back").await;
    let frames = c.turn().await;
    assert!(text_of(&frames).contains("back"), "{}", pretty(&frames));
    assert_eq!(of_type(&frames, "session_recovered").len(), 1);
}

/// `aishell chat` driven by piped lines: runs each, exits 0 at EOF; with
/// `--session` it continues that session without replaying its history as
/// if it were the new turn's answer.
#[tokio::test]
async fn aishell_chat_runs_piped_lines_and_resumes_a_session() {
    let gw = Gateway::start(&[]);
    let chat = |input: &str, session: Option<&str>| {
        use std::io::Write;
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["chat", "--url", &gw.ws_url(), "--token", &gw.token]);
        if let Some(s) = session {
            cmd.args(["--session", s]);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = chat(
        "echo first-run > a.txt && cat a.txt\necho second-line\n",
        None,
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("first-run") && out.contains("second-line"),
        "{out}"
    );
    let session = err
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix("[session ")
                .or(Some(w))
                .filter(|w| w.starts_with("s-"))
        })
        .map(|w| w.trim_end_matches([']', ',']).to_string())
        .unwrap_or_else(|| panic!("no session id in {err}"));
    let (ok, out, err) = chat("cat a.txt; echo resumed-run\n", Some(&session));
    assert!(ok, "{err}");
    assert!(err.contains("resumed"), "{err}");
    assert!(out.contains("resumed-run"), "{out}");
    assert_eq!(
        out.matches("first-run").count(),
        1,
        "history is not replayed: {out}"
    );
    assert!(!out.contains("second-line"), "{out}");
}
