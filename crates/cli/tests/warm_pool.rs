//! Warm pool end to end: claims, refill, cold fallback, eviction.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

fn warm_runner_pids() -> Vec<i32> {
    pids_with_env("AISHELL_TASK_MODE=warm", " runner")
}

#[tokio::test]
async fn a_warm_claim_serves_the_session_and_the_pool_refills() {
    let gw = Gateway::start(&["--agent", "echo", "--warm-pool-target-size", "2"]);
    gw.wait_pool_ready(2, WAIT).await;
    let mut c = gw.connect().await;
    c.message("m1", "hi").await;
    let frames = c.turn().await;
    let status = of_type(&frames, "status");
    assert_eq!(status[0]["source"], "warm", "{}", pretty(&frames));
    assert_eq!(text_of(&frames), "hi");
    let ready = gw
        .wait_log("task_ready", |l| l["phase"] == "task_ready", WAIT)
        .await;
    assert_eq!(ready["source"], "warm");
    for step in ["claim", "init", "agent_ready"] {
        assert!(
            ready["breakdown"][step].is_u64(),
            "breakdown lacks {step}: {ready}"
        );
    }
    assert!(
        ready["breakdown"]["launch"].is_null(),
        "a warm start has no launch step: {ready}"
    );
    gw.wait_log(
        "claim_hit",
        |l| l["phase"] == "warm_pool" && l["action"] == "claim_hit",
        WAIT,
    )
    .await;
    // The claimed task left the pool for good; a new one replaces it.
    let pool = gw.wait_pool_ready(2, WAIT).await;
    assert_eq!(pool["claim_hit"], 1);
    assert!(pool["launched"].as_u64().unwrap() >= 3, "{pool}");
}

#[tokio::test]
async fn concurrent_claims_never_share_a_task_and_an_empty_pool_falls_back_to_cold() {
    let gw = Gateway::start(&[
        "--agent",
        "echo",
        "--warm-pool-target-size",
        "2",
        "--warm-pool-max-size",
        "2",
    ]);
    gw.wait_pool_ready(2, WAIT).await;
    // Four users, so the per-user warm-claim cap plays no part.
    let mut clients = Vec::new();
    for i in 0..4 {
        let token = gw.create_token(&format!("user{i}"));
        clients.push(gw.connect_as(&token, None).await.unwrap());
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.message("m", &format!("from-{i}")).await;
    }
    let mut sources = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let frames = c.turn().await;
        assert_eq!(text_of(&frames), format!("from-{i}"));
        sources.push(
            of_type(&frames, "status")[0]["source"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // The pool held two: at least two claims hit, and the burst outran it so
    // at least one fell back to cold (a refill may win a race for a third).
    let warm = sources.iter().filter(|s| *s == "warm").count();
    assert!((2..=3).contains(&warm), "{sources:?}");
    // Every session got its own task. (The gateway's log lines reach the
    // test through a pipe, possibly after the turns' frames: wait for them.)
    let ready_tasks = || -> HashSet<String> {
        gw.logs()
            .iter()
            .filter(|l| l["phase"] == "task_ready")
            .map(|l| l["taskId"].as_str().unwrap().to_string())
            .collect()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while ready_tasks().len() < 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let tasks = ready_tasks();
    assert_eq!(tasks.len(), 4, "tasks were shared: {tasks:?}");
    let pool = gw.wait_pool_ready(2, WAIT).await;
    assert_eq!(pool["claim_hit"].as_u64(), Some(warm as u64));
    assert_eq!(pool["claim_miss"].as_u64(), Some(4 - warm as u64));
}

#[tokio::test]
async fn a_warm_runner_killed_while_ready_is_evicted_and_replaced() {
    let gw = Gateway::start(&["--agent", "echo", "--warm-pool-target-size", "1"]);
    gw.wait_pool_ready(1, WAIT).await;
    let before = warm_runner_pids()
        .into_iter()
        .filter(|p| is_child_of(*p, gw.pid()))
        .collect::<Vec<_>>();
    assert_eq!(before.len(), 1, "{before:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    gw.wait_log(
        "evict",
        |l| l["phase"] == "warm_pool" && l["action"] == "evict",
        WAIT,
    )
    .await;
    let pool = gw.wait_pool_ready(1, WAIT).await;
    assert_eq!(pool["evicted"], 1);
    let after = warm_runner_pids()
        .into_iter()
        .filter(|p| is_child_of(*p, gw.pid()))
        .collect::<Vec<_>>();
    assert_eq!(after.len(), 1);
    assert_ne!(after, before, "the dead task was replaced by a new one");
    // And the replacement serves a session.
    let mut c = gw.connect().await;
    c.message("m1", "after eviction").await;
    let frames = c.turn().await;
    assert_eq!(of_type(&frames, "status")[0]["source"], "warm");
}

#[tokio::test]
async fn ready_tasks_past_their_ttl_are_replaced() {
    let gw = Gateway::start(&[
        "--agent",
        "echo",
        "--warm-pool-target-size",
        "1",
        "--warm-pool-ready-ttl",
        "1s",
    ]);
    gw.wait_pool_ready(1, WAIT).await;
    gw.wait_log(
        "ttl evict",
        |l| l["action"] == "evict" && l["reason"] == "ready TTL expired",
        WAIT,
    )
    .await;
    let pool = gw.wait_pool_ready(1, WAIT).await;
    assert!(pool["evicted"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn a_failing_backend_opens_the_breaker_instead_of_launching_without_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let faults = tmp.path().join("faults");
    std::fs::write(
        &faults,
        "launch=error:AccessDeniedException: RunTask not allowed\n",
    )
    .unwrap();
    let faults = faults.to_str().unwrap();
    let gw = Gateway::start_with_env(
        &["--agent", "echo", "--warm-pool-target-size", "3"],
        &[("AISHELL_TEST_FAULTS_FILE", faults)],
    );
    gw.wait_log("breaker", |l| l["event"] == "warm_pool_breaker_open", WAIT)
        .await;
    let pool = gw.pool();
    assert_eq!(pool["breaker_open"], true, "{pool}");
    let launched = pool["launched"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = gw.pool();
    assert_eq!(
        later["launched"].as_u64().unwrap(),
        launched,
        "no launches while the breaker is open: {later}"
    );
    assert!(launched <= 10, "backoff keeps attempts few: {launched}");
    // A session meanwhile gets a clear error, not silence.
    let mut c = gw.connect().await;
    c.message("m1", "hello").await;
    let frames = c.until(|v| is_type(v, "error"), WAIT).await;
    let err = frames.last().unwrap();
    assert_eq!(err["error"]["code"], "TASK_START_FAILED");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("AccessDeniedException"),
        "{err}"
    );
}

fn is_child_of(pid: i32, parent: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    after
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u32>().ok())
        == Some(parent)
}

#[tokio::test]
async fn metrics_expose_lifecycle_histograms_gauges_and_error_counters() {
    let gw = Gateway::start(&["--agent", "echo", "--warm-pool-target-size", "1"]);
    gw.wait_pool_ready(1, WAIT).await;
    for i in 0..3 {
        let mut c = gw.connect().await;
        c.message("m", &format!("hi {i}")).await;
        c.turn().await;
    }
    let mut bad = gw.connect().await;
    bad.send(serde_json::json!({"type": "nope"})).await;
    bad.next(WAIT).await;
    // The gauge below reads the refilled pool (refills wait for claims to quiet).
    gw.wait_pool_ready(1, WAIT).await;
    let (status, _) = gw.http_get("/metrics");
    assert_eq!(status, 200);
    let text = gw.metrics_text();
    let count = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    };
    assert_eq!(
        count(r#"aishell_lifecycle_duration_seconds_count{phase="message_roundtrip",source=""}"#),
        3.0
    );
    let ready_warm =
        count(r#"aishell_lifecycle_duration_seconds_count{phase="task_ready",source="warm"}"#);
    let ready_cold = text
        .lines()
        .find(|l| {
            l.starts_with(
                r#"aishell_lifecycle_duration_seconds_count{phase="task_ready",source="cold"}"#,
            )
        })
        .map_or(0.0, |l| {
            l.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
        });
    assert_eq!(ready_warm + ready_cold, 3.0);
    assert!(ready_warm >= 1.0);
    assert!(
        text.contains("aishell_lifecycle_duration_seconds_bucket"),
        "histograms have buckets"
    );
    assert_eq!(count("aishell_warm_pool_ready"), 1.0);
    assert!(count("aishell_runners_connected") >= 1.0);
    assert!(count("aishell_clients_connected") >= 1.0);
    // BAD_FRAME errors are answered per connection, not counted as session errors;
    // the disconnects of the three finished clients are.
    assert!(count(r#"aishell_ws_disconnects_total{processing_state="idle"}"#) >= 3.0);
}

/// A graceful stop while warm launches are still in flight leaves no runner
/// behind: launches that return after the drain stop their own task.
#[tokio::test]
async fn stopping_the_gateway_during_warm_launches_leaves_no_runner() {
    // Each launch takes 300 ms before its task exists (a slow container
    // create), so the drain's stops run before the tasks do.
    let faults = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(faults.path(), "launch=slow:300\n").unwrap();
    let mut gw = Gateway::start_with_env(
        &["--agent", "echo", "--warm-pool-target-size", "6"],
        &[("AISHELL_TEST_FAULTS_FILE", faults.path().to_str().unwrap())],
    );
    let url = format!("AISHELL_GATEWAY_URL=ws://127.0.0.1:{}", gw.port);
    let deadline = Instant::now() + WAIT;
    while gw.pool()["launching"].as_u64().unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "the pool never started launching"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = pids_with_env(&url, "runner");
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "runners outlived their gateway's shutdown: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// On a first start, messages go to the runner right behind `init_user`
/// (early dispatch). If that start then fails before `ready`, the message
/// is not lost: it goes back to the queue and runs, in order, on the next
/// task.
#[tokio::test]
async fn a_message_sent_ahead_of_ready_survives_a_failed_start() {
    let dir = tempfile::tempdir().unwrap();
    // The first agent reads its `init` and dies without answering; every
    // later one echoes each message back. The marker lives in the user's
    // workspace (the agent's working directory), which outlives tasks.
    let script = agent_script(
        dir.path(),
        "agent-fails-once.sh",
        r#"#!/bin/sh
read line
if [ ! -e failed-once ]; then : > failed-once; exit 3; fi
echo '{"type":"init","agent":"once"}'
while read line; do
  conv=$(printf '%s' "$line" | sed -n 's/.*"conversation_id":"\([^"]*\)".*/\1/p')
  text=$(printf '%s' "$line" | sed -n 's/.*"content":"\([^"]*\)".*/\1/p')
  echo "{\"type\":\"text_delta\",\"conversation_id\":\"$conv\",\"delta\":\"$text\"}"
  echo "{\"type\":\"finish\",\"conversation_id\":\"$conv\"}"
done
"#,
    );
    let gw = Gateway::start(&[
        "--agent-command",
        script.to_str().unwrap(),
        "--warm-pool-target-size",
        "2",
    ]);
    gw.wait_pool_ready(2, WAIT).await;
    let mut c = gw.connect().await;
    c.message("m1", "first").await;
    let frames = c.until(|v| is_type(v, "error"), WAIT).await;
    let status = of_type(&frames, "status");
    assert_eq!(status[0]["source"], "warm", "{}", pretty(&frames));
    assert_eq!(
        first_error(&frames)["error"]["code"],
        "TASK_START_FAILED",
        "{}",
        pretty(&frames)
    );
    assert!(
        gw.workspace("local").join("failed-once").exists(),
        "the failing agent ran"
    );
    // The next message starts a new task; the first one runs before it.
    c.message("m2", "second").await;
    assert_eq!(text_of(&c.turn().await), "first");
    assert_eq!(text_of(&c.turn().await), "second");
}

/// Scheduling policy of `pid` (field 41 of `/proc/<pid>/stat`): 0 normal,
/// 5 `SCHED_IDLE`.
fn policy(pid: i32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(38)?
        .parse()
        .ok()
}

/// A sandbox being started for the pool (runner, bwrap, pre-started agent)
/// runs at idle priority, so refills never take CPU from sessions; once it
/// is ready all of it is back to normal, so its claim never waits for a CPU
/// nothing else wants (root only: undoing it needs CAP_SYS_NICE).
#[tokio::test]
async fn warm_sandboxes_start_at_idle_priority_and_wait_at_normal() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: skipped");
        return;
    }
    const SCHED_IDLE: u32 = 5;
    // Each runner waits 2 s before it dials: long enough to see it starting.
    let faults = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(faults.path(), "runner_dial_delay=2000\n").unwrap();
    let gw = Gateway::start_with_env(
        &["--agent", "shell", "--warm-pool-target-size", "1"],
        &[("AISHELL_TEST_FAULTS_FILE", faults.path().to_str().unwrap())],
    );
    let deadline = Instant::now() + WAIT;
    let starting = loop {
        let runners = warm_runner_pids();
        if !runners.is_empty() {
            break runners;
        }
        assert!(Instant::now() < deadline, "no warm runner started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The runner lowers itself first thing in `main`; right after its exec
    // it may not have yet, so look until it has, well inside the 2 s it
    // waits before it dials (and could become ready).
    let lowered_by = Instant::now() + Duration::from_millis(1500);
    for pid in &starting {
        while policy(*pid) != Some(SCHED_IDLE) {
            assert!(
                Instant::now() < lowered_by,
                "the starting runner {pid} is not at idle priority: {:?}",
                policy(*pid)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    gw.wait_pool_ready(1, WAIT).await;
    gw.wait_log(
        "agent_prestarted",
        |l| l["event"] == "agent_prestarted",
        WAIT,
    )
    .await;
    // `Prepared` is sent, then the tree is put back: give it a moment.
    let deadline = Instant::now() + WAIT;
    loop {
        let waiting = descendants(gw.pid() as i32);
        assert!(
            waiting.iter().any(|(_, cmd)| cmd.contains("agent shell")),
            "no pre-started agent: {waiting:?}"
        );
        let idle: Vec<_> = waiting
            .iter()
            .filter(|(pid, _)| policy(*pid) == Some(SCHED_IDLE))
            .collect();
        if idle.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ready and still at idle priority: {idle:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = gw.connect().await;
    c.message("m1", "sh -c 'cat /proc/self/stat'").await;
    let frames = c.turn().await;
    assert_eq!(of_type(&frames, "status")[0]["source"], "warm");
    // A command the claimed agent ran has normal priority.
    let text = pretty(&frames);
    let field = text
        .split(')')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().nth(38).map(String::from));
    assert_eq!(field.as_deref(), Some("0"), "{text}");
}

/// The process backend runs its runners and their built-in agents as
/// `aishell-sandbox`, the binary with only those roles (cheaper to exec and
/// relocate than the whole `aishell`), and a session still works.
#[tokio::test]
async fn runners_and_agents_run_the_small_sandbox_binary() {
    let gw = Gateway::start(&["--agent", "shell", "--warm-pool-target-size", "1"]);
    gw.wait_pool_ready(1, WAIT).await;
    let runners = warm_runner_pids();
    assert!(!runners.is_empty(), "no warm runner");
    let exe = |pid: i32| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    for pid in &runners {
        assert_eq!(
            exe(*pid).as_deref(),
            Some("aishell-sandbox"),
            "runner {pid}"
        );
    }
    let mut c = gw.connect().await;
    c.message("m1", "echo hello from the sandbox").await;
    let frames = c.turn().await;
    assert!(
        text_of(&frames).contains("hello from the sandbox"),
        "{}",
        pretty(&frames)
    );
    // The agent that answered is the sandbox binary too.
    let agents: Vec<i32> = descendants(gw.pid() as i32)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("agent shell"))
        .map(|(pid, _)| pid)
        .collect();
    assert!(!agents.is_empty(), "no agent process");
    for pid in agents {
        // bwrap's own process has the agent's command line too; only the
        // agent itself execs the binary.
        let name = exe(pid);
        assert!(
            name.as_deref() == Some("aishell-sandbox") || name.as_deref() == Some("bwrap"),
            "agent {pid} runs {name:?}"
        );
    }
}
