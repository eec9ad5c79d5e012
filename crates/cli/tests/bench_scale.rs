//! `aishell bench idle|live|soak` on a small scale: each runs against a
//! gateway of its own, reports success and figures that make sense, and the
//! soak fails the run when a turn is lost or something leaks.

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

/// One scale run at a time: they share two cores with the rest of the suite.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn bench(args: &[&str]) -> Value {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_aishell"))
        .arg("bench")
        .args(args)
        .args(["--format", "json"])
        .output()
        .expect("run bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).expect("bench prints JSON");
    assert_eq!(report["ok"], true, "{report:#}");
    for field in ["date", "command", "machine"] {
        assert!(
            !report["provenance"][field]
                .as_str()
                .unwrap_or("")
                .is_empty(),
            "{field} missing: {report:#}"
        );
    }
    report
}

#[test]
fn idle_holds_every_connection_and_each_sampled_one_answers_a_ping() {
    let r = bench(&["idle", "--connections", "2000", "--sample", "200"]);
    assert_eq!(r["opened"], 2000, "{r:#}");
    assert_eq!(r["ping"]["answered"], 200, "{r:#}");
    let per = r["kib_per_connection"].as_f64().unwrap();
    // A connection and its session cost something, and not a megabyte.
    assert!(per > 0.5 && per < 1024.0, "{per} KiB per connection");
    assert!(r["ping"]["ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(r["gateway_fds"].as_u64().unwrap() >= 2000, "{r:#}");
    assert!(r["nofile_limit"]["after"].as_u64().unwrap() >= 2000);
}

#[test]
fn live_sessions_each_have_a_sandboxed_agent_and_answer_under_load() {
    let r = bench(&[
        "live",
        "--sessions",
        "20",
        "--rate",
        "2",
        "--samples",
        "100",
    ]);
    assert_eq!(r["started"], 20, "{r:#}");
    let kinds = &r["memory"]["by_kind"];
    for kind in ["runner", "agent"] {
        let n = kinds[kind]["processes"].as_u64().unwrap_or(0);
        assert!(n >= 20, "{n} {kind} processes for 20 sessions: {r:#}");
    }
    assert!(kinds["gateway"]["pss_mib"].as_f64().unwrap() > 1.0);
    let rt = &r["roundtrip_ms"];
    for phase in ["quiet", "loaded"] {
        let p50 = rt[phase]["p50"].as_f64().unwrap();
        assert!(p50 > 0.0 && p50 < 1000.0, "{phase} p50 {p50}");
    }
    // 19 sessions at 2/s for at least the measured window.
    assert!(r["background"]["turns"].as_u64().unwrap() >= 19, "{r:#}");
    assert_eq!(r["background"]["failures"], 0);
}

#[test]
fn a_short_soak_loses_no_turn_and_leaks_nothing() {
    let r = bench(&[
        "soak",
        "--duration",
        "25s",
        "--sessions",
        "8",
        "--warmup-turns",
        "10",
        "--kill-every",
        "1500ms",
        "--drain-every",
        "8s",
        "--pause-chance",
        "0.05",
        "--new-session-chance",
        "0.05",
        // A 25 s run of a debug build starts from ~15 MiB, where one more
        // malloc arena is 7 %: this run is for lost turns and leaked
        // processes and descriptors; the RSS bound of 10 % is the 5-minute
        // soak's.
        "--max-rss-growth-percent",
        "25",
    ]);
    let turns = &r["turns"];
    assert_eq!(turns["lost"], 0, "{r:#}");
    assert_eq!(turns["answered_twice"], 0, "{r:#}");
    assert_eq!(r["seq"]["repeated"], 0);
    assert_eq!(r["seq"]["gaps"], 0);
    let messages = turns["messages"].as_u64().unwrap();
    let ended_by_error: u64 = turns["ended_by_error"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(
        turns["finished"].as_u64().unwrap() + ended_by_error,
        messages,
        "every message answered once: {r:#}"
    );
    assert!(messages > 80, "{r:#}");
    let churn = &r["churn"];
    // The churn happened: each kind at least once.
    for what in ["reconnects", "agents_killed", "pool_drains", "sessions"] {
        assert!(churn[what].as_u64().unwrap() >= 1, "{what}: {r:#}");
    }
    assert!(r["leaks"].as_array().unwrap().is_empty(), "{r:#}");
}
