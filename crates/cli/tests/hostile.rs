//! Hostile input: a client that sends faster than it reads, and an
//! agent that writes garbage and huge lines. Memory stays bounded, other
//! sessions are unaffected, nothing is lost.

mod common;

use std::time::Duration;

use common::*;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_client_that_stops_reading_costs_bounded_memory_and_catches_up_without_loss() {
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let mut c = gw.connect().await;
    let session = c.session_id.clone();
    c.message("m1", "/stream 50000").await;
    // Stop reading. The gateway must not buffer without bound for it.
    let mut peak = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib(gw.pid()));
        if gw.logs().iter().any(|l| l["event"] == "client_lagging") {
            break;
        }
    }
    assert!(
        gw.logs().iter().any(|l| l["event"] == "client_lagging"),
        "the slow client was never switched to catch-up"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    peak = peak.max(rss_kib(gw.pid()));
    assert!(peak < 300 * 1024, "gateway RSS grew to {peak} KiB");
    // Read again on the same connection: every chunk, once, in order.
    let frames = c
        .until(|v| is_type(v, "finish"), Duration::from_secs(60))
        .await;
    let deltas = of_type(&frames, "text_delta");
    assert_eq!(deltas.len(), 50_000);
    for (i, d) in deltas.iter().enumerate() {
        assert_eq!(
            d["delta"],
            format!("chunk-{i} "),
            "out of order or duplicated at {i}"
        );
    }
    let seqs: Vec<u64> = frames
        .iter()
        .filter(|f| f["ephemeral"].is_null())
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    for pair in seqs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1);
    }
    drop(c);
    // A fresh connection replaying everything also gets it all (paged from the store).
    let mut r = gw.connect_as(&gw.token, Some((&session, 0))).await.unwrap();
    let all = r
        .until(|v| is_type(v, "finish"), Duration::from_secs(60))
        .await;
    assert_eq!(of_type(&all, "text_delta").len(), 50_000);
}

#[tokio::test]
async fn an_agent_writing_garbage_and_huge_lines_fails_cleanly_and_others_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    // Speaks just enough protocol to start, then misbehaves on every message.
    let script = agent_script(
        dir.path(),
        "bad-agent.sh",
        r#"#!/bin/sh
read line
echo '{"type":"init","agent":"bad"}'
while read line; do
  echo 'this is not json'
  echo '{"type":"no_such_frame"}'
  head -c 20000000 /dev/zero | tr '\0' 'x'; echo
  echo '{"type":"text_delta","conversation_id":"c1","delta":"still alive"}'
  echo '{"type":"finish","conversation_id":"c1","token_usage":{"input_tokens":1,"output_tokens":1}}'
done
"#,
    );
    let gw = Gateway::start_cold_with_agent(&script);
    let mut c = gw.connect().await;
    c.send(serde_json::json!({"type": "message", "id": "m1", "conversation_id": "c1", "content": "go"})).await;
    // The oversized line ends the turn with an error (the runner never
    // holds it whole); the session goes on.
    let frames = c.turn().await;
    assert_eq!(
        first_error(&frames)["error"]["code"],
        "AGENT_ERROR",
        "{}",
        pretty(&frames).chars().take(2000).collect::<String>()
    );
    assert!(
        frames.iter().all(|f| f.to_string().len() < 1 << 20),
        "no huge frame reached the client"
    );
    // The garbage was logged as the agent's, not forwarded.
    gw.wait_log(
        "garbage logged",
        |l| l["event"] == "agent_stderr" && l["line"].as_str().unwrap_or("").contains("not json"),
        WAIT,
    )
    .await;
    // Another user's session on the same gateway works normally meanwhile.
    let bob = gw.create_token("bob");
    let mut b = gw.connect_as(&bob, None).await.unwrap();
    b.send(serde_json::json!({"type": "message", "id": "m1", "conversation_id": "c1", "content": "go"})).await;
    assert_eq!(first_error(&b.turn().await)["error"]["code"], "AGENT_ERROR");
}
