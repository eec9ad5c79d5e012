//! A real gateway's logs feed `aishell report` end to end.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn the_report_counts_what_a_real_gateway_logged() {
    let gw = Gateway::start(&[
        "--agent",
        "echo",
        "--enable-warm-pool",
        "false",
        "--session-idle-timeout",
        "1s",
    ]);
    let mut a = gw.connect().await;
    a.message("m1", "one").await;
    a.turn().await;
    let mut b = gw.connect().await;
    b.message("m1", "two").await;
    b.turn().await;
    a.until(
        |v| is_type(v, "status") && v["state"] == "stopped",
        Duration::from_secs(10),
    )
    .await;
    a.message("m2", "three").await;
    a.turn().await;
    drop(b);
    gw.wait_log("restart", |l| l["phase"] == "task_restart", WAIT)
        .await;
    gw.wait_log("disconnect", |l| l["phase"] == "ws_disconnect", WAIT)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.log");
    std::fs::write(&file, gw.raw_logs() + "\n").unwrap();
    let today = gw
        .logs()
        .iter()
        .find_map(|l| l["timestamp"].as_str().map(|t| t[..10].to_string()))
        .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["report", "--format", "json", "--date", &today])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let day = &r["days"][0];
    assert_eq!(day["task_starts"], 3, "{day}");
    assert_eq!(day["restarts"], 1);
    assert_eq!(day["restarts_ok"], 1);
    assert_eq!(day["sessions_created"], 2);
    assert_eq!(day["unique_users"], 1);
    assert_eq!(day["user_messages"], 3);
    assert!(day["idle_timeouts"].as_u64().unwrap() >= 1);
    assert_eq!(day["start_cold_ms"]["n"], 3);
    assert_eq!(day["start_warm_ms"]["n"], 0);
    assert_eq!(day["connected_ok_pct"], 100.0);
    assert!(day["disconnects"]["idle"].as_u64().unwrap() >= 1);
    assert!(day["breakdown_ms"]["launch"]["n"].as_u64() == Some(3));
    let md = std::process::Command::new(BIN)
        .args(["report", "--date", &today])
        .arg(&file)
        .output()
        .unwrap();
    let md = String::from_utf8(md.stdout).unwrap();
    assert!(
        md.contains("# aishell daily report") && md.contains("| task starts | 3 |"),
        "{md}"
    );
}
