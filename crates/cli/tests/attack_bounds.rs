//! Everything a sandbox or a client sends is bounded: an agent flooding its
//! own stdout, a client opening sessions in a loop or sending huge ids, a
//! probe for other users' sessions, and a local account reading the store.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The database file plus its WAL.
fn store_bytes(gw: &Gateway) -> u64 {
    file_len(&gw.data_dir.join("aishell.db")) + file_len(&gw.data_dir.join("aishell.db-wal"))
}

/// The attack as it was reproduced: 30 forged `text_delta` lines of 15 MB
/// each on the agent's stdout within one turn.
#[tokio::test]
async fn an_agent_flooding_its_stdout_costs_bounded_memory_and_storage() {
    let dir = tempfile::tempdir().unwrap();
    // Answers "hi" normally; "flood" gets 30 lines of 15 MB, then the end
    // of the turn.
    let script = agent_script(
        dir.path(),
        "flood-agent.sh",
        r#"#!/bin/sh
read line
echo '{"type":"init","agent":"flood"}'
while read line; do
  case "$line" in
    *flood*)
      i=0
      while [ $i -lt 30 ]; do
        printf '{"type":"text_delta","conversation_id":"c1","delta":"'
        head -c 15000000 /dev/zero | tr '\0' 'x'
        printf '"}\n'
        i=$((i+1))
      done
      ;;
    *)
      echo '{"type":"text_delta","conversation_id":"c1","delta":"ok"}'
      ;;
  esac
  echo '{"type":"finish","conversation_id":"c1","token_usage":{"input_tokens":1,"output_tokens":1}}'
done
"#,
    );
    let gw = Gateway::start_cold_with_agent(&script);
    let mut c = gw.connect().await;
    let send = |id: &str, content: &str| json!({"type": "message", "id": id, "conversation_id": "c1", "content": content});
    c.send(send("m0", "hi")).await;
    assert_eq!(text_of(&c.turn().await), "ok");
    let rss_before = rss_kib(gw.pid());
    let store_before = store_bytes(&gw);

    c.send(send("m1", "flood")).await;
    let frames = c
        .until(|v| is_type(v, "finish"), Duration::from_secs(300))
        .await;
    let relayed: u64 = frames.iter().map(|f| f.to_string().len() as u64).sum();
    let notes: Vec<_> = of_type(&frames, "info")
        .into_iter()
        .filter(|f| {
            f["message"]
                .as_str()
                .unwrap_or("")
                .contains("not stored or shown")
        })
        .collect();
    assert_eq!(notes.len(), 1, "one truncation note: {}", short(&frames));
    assert!(
        frames
            .iter()
            .all(|f| f.to_string().len() as u64 <= MIB + 4096),
        "no event over the per-event limit reached the client"
    );
    assert!(
        relayed <= 16 * MIB + MIB,
        "the client got {relayed} bytes for one turn (cap 16 MiB)"
    );

    // The next message works, on the same session.
    c.send(send("m2", "hi")).await;
    let next = c.turn().await;
    assert_eq!(text_of(&next), "ok", "{}", short(&next));

    // Memory goes back: freed buffers are returned within a few seconds.
    let mut rss_after = rss_kib(gw.pid());
    for _ in 0..50 {
        if rss_after <= rss_before + 100 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        rss_after = rss_kib(gw.pid());
    }
    eprintln!("gateway RSS: {rss_before} KiB before the flood, {rss_after} KiB after");
    assert!(
        rss_after <= rss_before + 100 * 1024,
        "gateway RSS went from {rss_before} KiB to {rss_after} KiB and stayed"
    );
    // Storage: the turn's cap (16 MiB) is stored at most, once in the WAL
    // and once in the database, plus slack.
    let grown = store_bytes(&gw).saturating_sub(store_before);
    eprintln!("store grew by {grown} bytes during the flood");
    assert!(
        grown <= 40 * MIB,
        "the database and its WAL grew by {grown} bytes for one capped turn"
    );

    // A reconnect beyond the memory ring still replays everything stored,
    // from the store, the same frames in the same order.
    let mut r = gw
        .connect_as(&gw.token, Some((&c.session_id, 0)))
        .await
        .unwrap();
    let replayed = r
        .until(
            |v| is_type(v, "finish") && v["seq"].as_u64() >= next.last().unwrap()["seq"].as_u64(),
            Duration::from_secs(60),
        )
        .await;
    let seqs: Vec<u64> = replayed.iter().filter_map(|f| f["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "contiguous replay"
    );
    assert_eq!(of_type(&replayed, "finish").len(), 3);
}

fn short(frames: &[serde_json::Value]) -> String {
    pretty(frames).chars().take(3000).collect()
}

/// Connections that send nothing leave no sessions behind.
#[tokio::test]
async fn a_thousand_connections_without_a_message_store_no_sessions() {
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let mut reserved = Vec::new();
    for _ in 0..1000 {
        let c = gw.connect().await;
        assert!(is_type(&c.hello, "session"), "{}", c.hello);
        reserved.push(c.session_id.clone());
        c.close().await;
    }
    let (status, body) = gw.http_get("/api/sessions");
    assert_eq!(status, 200);
    let stored = body["sessions"].as_array().unwrap().len();
    assert!(
        stored <= 2,
        "{stored} sessions stored by 1000 idle connections"
    );

    // The first `session` frame is unchanged, and a session is stored (and
    // resumable) once its client sends a message.
    let mut c = gw.connect().await;
    assert_eq!(c.hello["state"], "STOPPED");
    assert_eq!(c.hello["resumed"], false);
    c.message("m1", "hello").await;
    assert_eq!(text_of(&c.turn().await), "hello");
    let (_, body) = gw.http_get("/api/sessions");
    let ids: Vec<&str> = body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&c.session_id.as_str()), "{ids:?}");
    let seq = c.last_seq;
    let session = c.session_id.clone();
    c.close().await;
    let r = gw
        .connect_as(&gw.token, Some((&session, seq)))
        .await
        .unwrap();
    assert_eq!(r.hello["resumed"], true, "{}", r.hello);
}

/// Over-long client strings are refused one frame at a time.
#[tokio::test]
async fn over_long_client_strings_get_bad_frame_and_the_connection_stays_up() {
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let mut c = gw.connect().await;
    let long = "i".repeat(100 * 1024);
    for frame in [
        json!({"type": "message", "id": long, "content": "hi"}),
        json!({"type": "message", "conversation_id": long, "content": "hi"}),
        json!({"type": "answer_question", "request_id": long, "answer": "yes"}),
        json!({"type": "answer_question", "request_id": "r1", "answer": "a".repeat(200 * 1024)}),
        json!({"type": "update_token", "token": long}),
        json!({"type": "delete_conversation", "conversation_id": long}),
    ] {
        c.send(frame.clone()).await;
        let got = c.next(WAIT).await.expect("an answer, not a closed socket");
        assert_eq!(got["type"], "error", "{got}");
        assert_eq!(got["error"]["code"], "BAD_FRAME", "{got}");
        let message = got["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("bytes long"),
            "a sentence naming the field: {message}"
        );
        assert!(
            got.to_string().len() < 1024,
            "the long value is not echoed back"
        );
    }
    // Nothing was stored or run, and the connection still works.
    c.message("m1", "still here").await;
    assert_eq!(text_of(&c.turn().await), "still here");
}

/// Another user's session and one that does not exist look the same.
#[tokio::test]
async fn a_probe_cannot_tell_another_users_session_from_a_missing_one() {
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let mut alice = gw.connect().await;
    alice.message("m1", "mine").await;
    alice.turn().await;
    let bob = gw.create_token("bob");
    let mut answers = Vec::new();
    for target in [
        alice.session_id.clone(),
        "s-0123456789abcdef0123456789abcdef".into(),
    ] {
        let mut probe = gw.connect_as(&bob, Some((&target, 0))).await.unwrap();
        let close = probe.next_or_close(WAIT).await.expect_err("closed");
        let error = &probe.hello["error"];
        answers.push((close, error["code"].clone(), error["message"].clone()));
    }
    assert_eq!(answers[0], answers[1], "the two refusals differ");
    let (close, code, _) = &answers[0];
    assert_eq!(close.as_ref().map(|c| c.0), Some(4404));
    assert_eq!(code, "SESSION_NOT_FOUND");
}

/// Any local account could read every conversation from a 0644 database.
#[tokio::test]
async fn the_store_is_readable_by_its_owner_only() {
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let mut c = gw.connect().await;
    c.message("m1", "a secret").await;
    c.turn().await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for name in ["aishell.db", "aishell.db-wal", "aishell.db-shm"] {
        let path = gw.data_dir.join(name);
        assert!(path.exists(), "{name} exists while the gateway runs");
        assert_eq!(mode(&path), 0o600, "{name}");
    }
    assert_eq!(
        mode(&gw.data_dir),
        0o711,
        "the data dir: others may only pass through"
    );
}
