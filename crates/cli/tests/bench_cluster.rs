//! `aishell bench cluster` measures both setups and leaves nothing behind:
//! no gateway, runner, HAProxy or PostgreSQL process, no temp dir.
//!
//! Needs `haproxy` and PostgreSQL (skipped, saying so, without them).
#![cfg(feature = "postgres")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn have_postgres() -> bool {
    std::env::var_os("AISHELL_PG_BIN").is_some()
        || std::fs::read_dir("/usr/lib/postgresql").is_ok()
        || have("pg_config")
}

/// The command line of a live process, or None once it is gone.
fn live_cmdline(pid: u64) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // A zombie is gone in all but name.
    let state = stat[stat.rfind(')')? + 1..].split_whitespace().next()?;
    if state == "Z" {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&cmdline).replace('\0', " "))
}

/// Processes whose environment carries `marker` (the gateways' and their
/// runners').
fn marked(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
        })
        .filter_map(live_cmdline)
        .collect()
}

#[test]
fn bench_cluster_measures_both_setups_and_stops_everything_it_started() {
    if !have("haproxy") || !have_postgres() {
        eprintln!("haproxy or PostgreSQL missing: skipped");
        return;
    }
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_aishell"))
        .args(["bench", "cluster", "--gateways", "2", "--concurrency", "2"])
        .args(["--rounds", "1", "--format", "json", "--timeout", "20"])
        .output()
        .expect("run bench cluster");
    assert!(
        out.status.success(),
        "bench cluster failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("bench cluster prints JSON");
    for setup in ["cluster", "single"] {
        let warm = &report[setup]["warm_first_event_ms"];
        for p in ["p50", "p99"] {
            assert!(
                warm[p].as_f64().is_some_and(|ms| ms > 0.0),
                "{setup} {p}: {report:#}"
            );
        }
        let served: u64 = report[setup]["gateways"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["sessions"].as_u64().unwrap())
            .sum();
        assert_eq!(served, 2, "{setup}: {report:#}");
        assert!(
            report[setup]["gateway_cpu_ms_per_session"]
                .as_f64()
                .unwrap()
                > 0.0,
            "{report:#}"
        );
    }
    assert_eq!(report["cluster"]["gateways"].as_array().unwrap().len(), 2);
    // The throwaway server counts the gateways' statements: a session makes
    // several (its lease claim and its fenced writes among them).
    let statements = &report["cluster"]["postgres_statements"];
    assert!(
        statements["per_session"].as_f64().unwrap_or(0.0) >= 2.0,
        "{statements:#}"
    );
    assert!(
        statements["top"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["query"].as_str().unwrap().contains("session_leases")),
        "{statements:#}"
    );
    assert!(report["ratio"]["p50"].as_f64().unwrap() > 0.0);
    assert!(report["target"]["met"].is_boolean());
    assert!(report["first_error"].is_null(), "{report:#}");

    // Nothing it started is left.
    let s = &report["started"];
    let mut pids: Vec<u64> = s["gateway_pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    for key in ["single_pid", "haproxy_pid", "postgres_pid"] {
        pids.push(s[key].as_u64().unwrap_or_else(|| panic!("{key}: {s}")));
    }
    for pid in pids {
        if let Some(cmdline) = live_cmdline(pid) {
            // The pid may have been reused by now, but not by one of these.
            assert!(
                !["aishell", "haproxy", "postgres"]
                    .iter()
                    .any(|p| cmdline.contains(p)),
                "left running: {pid} {cmdline}"
            );
        }
    }
    let marker = format!("AISHELL_BENCH_RUN={}", s["run_id"].as_str().unwrap());
    assert_eq!(marked(&marker), Vec::<String>::new(), "left running");
    for dir in s["dirs"].as_array().unwrap() {
        let dir = dir.as_str().unwrap();
        assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
