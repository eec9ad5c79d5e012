//! End-to-end tests of the process backend with real processes (`/bin/sh`).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aishell_backend::{Backend, BackendError, LaunchSpec, TaskMode, TaskStatus};
use aishell_backend_process::{ADOPTED_EXIT_REASON, ProcessBackend, ProcessBackendConfig};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

// ---------------------------------------------------------------- helpers

fn unique_id(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn config(dir: &Path, script: &str, grace: Duration) -> ProcessBackendConfig {
    ProcessBackendConfig {
        runner_program: PathBuf::from("/bin/sh"),
        runner_args: vec!["-c".into(), script.into()],
        workspaces_root: dir.join("workspaces"),
        state_dir: dir.join("state"),
        stop_grace: grace,
    }
}

fn spec(task_id: &str, env: &[(&str, &str)]) -> LaunchSpec {
    LaunchSpec {
        task_id: task_id.to_string(),
        mode: TaskMode::Warm,
        session_id: None,
        gateway_url: "ws://127.0.0.1:5174".into(),
        credential: format!("cred-{task_id}"),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn environ_has_task(pid: i32, task_id: &str) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let want = format!("AISHELL_TASK_ID={task_id}");
    raw.split(|b| *b == 0).any(|kv| kv == want.as_bytes())
}

/// Dead = `kill(pid, 0)` fails, or only a zombie is left (PID 1 in a
/// container does not always reap promptly).
fn pid_dead(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let after = &stat[stat.rfind(')').unwrap() + 1..];
            matches!(after.split_whitespace().next(), Some("Z" | "X"))
        }
        Err(_) => true,
    }
}

async fn wait_until_dead(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if pid_dead(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pid_dead(pid)
}

/// Kills every process (group) a test started, even when an assertion failed.
/// Only processes still carrying the test's task id are touched, so a reused
/// pid is never hit.
#[derive(Default)]
struct Cleanup(Vec<(i32, String)>);

impl Cleanup {
    fn track(&mut self, pid: i32, task_id: &str) {
        self.0.push((pid, task_id.to_string()));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (pid, task_id) in &self.0 {
            if environ_has_task(*pid, task_id) {
                let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
    }
}

async fn launch_tracked(b: &ProcessBackend, s: LaunchSpec, c: &mut Cleanup) -> i32 {
    let id = s.task_id.clone();
    b.launch(s).await.expect("launch");
    let pid = b.pid_of(&id).expect("pid of launched task") as i32;
    c.track(pid, &id);
    pid
}

async fn wait_status(
    b: &ProcessBackend,
    id: &str,
    limit: Duration,
    pred: impl Fn(&TaskStatus) -> bool,
) -> TaskStatus {
    let deadline = Instant::now() + limit;
    loop {
        let st = b.status(id).await.unwrap();
        if pred(&st) || Instant::now() >= deadline {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn read_lines(path: &Path, n: usize, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n || Instant::now() >= deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The live task ids the adoption journal names (its lines replayed).
fn state_file_task_ids(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("state").join("tasks.log")).unwrap();
    let mut live = std::collections::BTreeSet::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(t) = v.get("launched") {
            live.insert(t["task_id"].as_str().unwrap().to_string());
        } else {
            live.remove(v["ended"].as_str().unwrap());
        }
    }
    live.into_iter().collect()
}

const SECOND: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn launch_runs_with_task_environment() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"printf '%s\n' "$AISHELL_TASK_ID" "$AISHELL_TASK_CREDENTIAL" "$AISHELL_TASK_MODE" "$AISHELL_GATEWAY_URL" "${AISHELL_SESSION_ID-unset}" "$EXTRA" > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"; exec sleep 30"#;
    let b = ProcessBackend::new(config(dir.path(), script, SECOND)).unwrap();
    let mut cleanup = Cleanup::default();

    // Warm task, no session; spec.env must not override the task's identity.
    let out1 = dir.path().join("env1");
    let id1 = unique_id("env");
    let mut s1 = spec(
        &id1,
        &[
            ("OUT", out1.to_str().unwrap()),
            ("EXTRA", "extra-value"),
            ("AISHELL_TASK_ID", "spoofed"),
        ],
    );
    s1.mode = TaskMode::Warm;
    launch_tracked(&b, s1, &mut cleanup).await;
    assert_eq!(b.status(&id1).await.unwrap(), TaskStatus::Running);

    // Cold task with a session.
    let out2 = dir.path().join("env2");
    let id2 = unique_id("env");
    let mut s2 = spec(&id2, &[("OUT", out2.to_str().unwrap())]);
    s2.mode = TaskMode::Cold;
    s2.session_id = Some("sess-42".into());
    launch_tracked(&b, s2, &mut cleanup).await;

    let lines = read_lines(&out1, 6, 2 * SECOND).await;
    assert_eq!(
        lines,
        vec![
            id1.clone(),
            format!("cred-{id1}"),
            "warm".into(),
            "ws://127.0.0.1:5174".into(),
            "unset".into(),
            "extra-value".into(),
        ]
    );
    let lines = read_lines(&out2, 6, 2 * SECOND).await;
    assert_eq!(lines[0], id2);
    assert_eq!(lines[2], "cold");
    assert_eq!(lines[4], "sess-42");

    // Still running after it wrote the file.
    assert_eq!(b.status(&id1).await.unwrap(), TaskStatus::Running);
    assert_eq!(b.status(&id2).await.unwrap(), TaskStatus::Running);

    // The live tasks are recorded for adoption.
    let mut recorded = state_file_task_ids(dir.path());
    recorded.sort();
    let mut want = vec![id1.clone(), id2.clone()];
    want.sort();
    assert_eq!(recorded, want);

    b.stop(&id1).await.unwrap();
    b.stop(&id2).await.unwrap();
    assert_eq!(b.status(&id1).await.unwrap(), TaskStatus::NotFound);
    assert!(state_file_task_ids(dir.path()).is_empty());
}

#[tokio::test]
async fn self_exit_is_noticed_with_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let b = ProcessBackend::new(config(dir.path(), "exit 7", SECOND)).unwrap();
    let mut cleanup = Cleanup::default();
    let id = unique_id("exit");
    let t0 = Instant::now();
    launch_tracked(&b, spec(&id, &[]), &mut cleanup).await;

    let st = wait_status(&b, &id, SECOND, |s| !s.is_alive()).await;
    assert_eq!(
        st,
        TaskStatus::Exited {
            code: Some(7),
            reason: "exited with code 7".into()
        }
    );
    assert!(t0.elapsed() < SECOND);

    // Exited tasks stay visible in list until stopped, and leave the state file.
    let listed = b.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].task_id, id);
    assert!(!listed[0].status.is_alive());
    assert!(state_file_task_ids(dir.path()).is_empty());

    // Stopping an exited task is fine and forgets it.
    b.stop(&id).await.unwrap();
    assert_eq!(b.status(&id).await.unwrap(), TaskStatus::NotFound);
    assert!(b.list().await.unwrap().is_empty());
}

async fn next(
    changes: &mut tokio::sync::mpsc::Receiver<aishell_backend::StatusChange>,
) -> aishell_backend::StatusChange {
    tokio::time::timeout(SECOND * 2, changes.recv())
        .await
        .expect("a change within 2 s (no polling)")
        .expect("the watch goes on")
}

#[tokio::test]
async fn watch_reports_an_exit_as_the_reaper_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let b = std::sync::Arc::new(
        ProcessBackend::new(config(dir.path(), "sleep 0.3; exit 5", SECOND)).unwrap(),
    );
    let mut cleanup = Cleanup::default();
    let mut changes = b.clone().watch();
    let id = unique_id("watch");
    launch_tracked(&b, spec(&id, &[]), &mut cleanup).await;
    let first = next(&mut changes).await;
    assert_eq!(
        (first.task_id.as_str(), first.status),
        (id.as_str(), TaskStatus::Running)
    );
    let exited = next(&mut changes).await;
    assert_eq!(exited.task_id, id);
    assert_eq!(
        exited.status,
        TaskStatus::Exited {
            code: Some(5),
            reason: "exited with code 5".into()
        }
    );
    b.stop(&id).await.unwrap();
    let gone = next(&mut changes).await;
    assert_eq!(
        (gone.task_id.as_str(), gone.status),
        (id.as_str(), TaskStatus::NotFound)
    );
    // A late watcher learns every task's current status first.
    let id2 = unique_id("watch");
    launch_tracked(&b, spec(&id2, &[]), &mut cleanup).await;
    let mut late = b.clone().watch();
    let now = next(&mut late).await;
    assert_eq!(now.task_id, id2);
    b.stop(&id2).await.unwrap();
}

#[tokio::test]
async fn kill_from_outside_is_noticed_with_the_signal() {
    let dir = tempfile::tempdir().unwrap();
    let b = ProcessBackend::new(config(dir.path(), "exec sleep 30", SECOND)).unwrap();
    let mut cleanup = Cleanup::default();
    let id = unique_id("sigkill");
    let pid = launch_tracked(&b, spec(&id, &[]), &mut cleanup).await;
    assert_eq!(b.status(&id).await.unwrap(), TaskStatus::Running);

    let t0 = Instant::now();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let st = wait_status(&b, &id, SECOND, |s| !s.is_alive()).await;
    assert!(t0.elapsed() < SECOND, "took {:?}", t0.elapsed());
    match st {
        TaskStatus::Exited { code, reason } => {
            assert_eq!(code, None);
            assert_eq!(reason, "killed by signal 9 (SIGKILL)");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
}

/// A runner that dies on its own takes what it left in its process group
/// with it: nothing of a task outlives the task.
#[tokio::test]
async fn a_runner_that_exits_takes_its_group_with_it() {
    let dir = tempfile::tempdir().unwrap();
    // The shell leaves a sleep behind in its group, then exits.
    let script = r#"sleep 30 & echo $! > "$OUT"; sleep 0.3; exit 3"#;
    let b = ProcessBackend::new(config(dir.path(), script, SECOND)).unwrap();
    let mut cleanup = Cleanup::default();
    let out = dir.path().join("left.pid");
    let id = unique_id("leftover");
    launch_tracked(
        &b,
        spec(&id, &[("OUT", out.to_str().unwrap())]),
        &mut cleanup,
    )
    .await;
    let lines = read_lines(&out, 1, 2 * SECOND).await;
    let left: i32 = lines[0].parse().expect("pid left behind");
    cleanup.track(left, &id);
    assert!(!pid_dead(left));
    let st = wait_status(&b, &id, 2 * SECOND, |s| !s.is_alive()).await;
    assert!(
        matches!(st, TaskStatus::Exited { code: Some(3), .. }),
        "{st:?}"
    );
    assert!(
        wait_until_dead(left, SECOND).await,
        "the runner's leftover outlived it"
    );
}

#[tokio::test]
async fn stop_escalates_to_sigkill_and_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_millis(300);
    // The shell and its background sleep both ignore SIGTERM.
    let script = r#"trap '' TERM; sleep 30 & echo $! > "$OUT"; wait; wait; wait"#;
    let b = ProcessBackend::new(config(dir.path(), script, grace)).unwrap();
    let mut cleanup = Cleanup::default();
    let out = dir.path().join("grandchild.pid");
    let id = unique_id("stopkill");
    let pid = launch_tracked(
        &b,
        spec(&id, &[("OUT", out.to_str().unwrap())]),
        &mut cleanup,
    )
    .await;

    let lines = read_lines(&out, 1, 2 * SECOND).await;
    let grandchild: i32 = lines[0].parse().expect("grandchild pid");
    cleanup.track(grandchild, &id);
    assert!(!pid_dead(grandchild));

    let t0 = Instant::now();
    b.stop(&id).await.unwrap();
    let took = t0.elapsed();
    assert!(took >= grace, "returned before the grace period: {took:?}");
    assert!(took < grace + SECOND, "stop took {took:?}");

    assert!(wait_until_dead(pid, SECOND).await, "runner still alive");
    assert!(
        wait_until_dead(grandchild, SECOND).await,
        "grandchild still alive"
    );
    assert_eq!(b.status(&id).await.unwrap(), TaskStatus::NotFound);
    assert!(b.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn stop_sends_sigterm_first() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"trap 'echo term > "$OUT"; exit 0' TERM; sleep 30 & wait"#;
    let b = ProcessBackend::new(config(dir.path(), script, Duration::from_secs(10))).unwrap();
    let mut cleanup = Cleanup::default();
    let out = dir.path().join("term");
    let id = unique_id("stopterm");
    let pid = launch_tracked(
        &b,
        spec(&id, &[("OUT", out.to_str().unwrap())]),
        &mut cleanup,
    )
    .await;
    // Let the shell install its trap.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let t0 = Instant::now();
    b.stop(&id).await.unwrap();
    assert!(t0.elapsed() < 2 * SECOND, "stop took {:?}", t0.elapsed());
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "term");
    assert!(wait_until_dead(pid, SECOND).await);
}

#[tokio::test]
async fn stop_unknown_task_is_ok() {
    let dir = tempfile::tempdir().unwrap();
    let b = ProcessBackend::new(config(dir.path(), "exit 0", SECOND)).unwrap();
    let t0 = Instant::now();
    b.stop("no-such-task").await.unwrap();
    assert!(t0.elapsed() < Duration::from_millis(100));
    assert_eq!(
        b.status("no-such-task").await.unwrap(),
        TaskStatus::NotFound
    );
}

#[tokio::test]
async fn list_shows_launched_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let b = ProcessBackend::new(config(dir.path(), "exec sleep 30", SECOND)).unwrap();
    let mut cleanup = Cleanup::default();
    assert!(b.list().await.unwrap().is_empty());
    b.ping().await.unwrap();

    let warm = unique_id("list");
    let cold = unique_id("list");
    let before = std::time::SystemTime::now() - SECOND;
    launch_tracked(&b, spec(&warm, &[]), &mut cleanup).await;
    let mut s = spec(&cold, &[]);
    s.mode = TaskMode::Cold;
    s.session_id = Some("sess-1".into());
    launch_tracked(&b, s, &mut cleanup).await;

    let listed = b.list().await.unwrap();
    assert_eq!(listed.len(), 2);
    let w = listed
        .iter()
        .find(|t| t.task_id == warm)
        .expect("warm task");
    let c = listed
        .iter()
        .find(|t| t.task_id == cold)
        .expect("cold task");
    assert_eq!((w.mode, w.session_id.as_deref()), (TaskMode::Warm, None));
    assert_eq!(
        (c.mode, c.session_id.as_deref()),
        (TaskMode::Cold, Some("sess-1"))
    );
    for t in &listed {
        assert_eq!(t.status, TaskStatus::Running);
        assert!(t.started_at >= before);
    }

    b.stop(&warm).await.unwrap();
    let listed = b.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].task_id, cold);
    b.stop(&cold).await.unwrap();
}

#[tokio::test]
async fn duplicate_task_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = ProcessBackend::new(config(dir.path(), "exec sleep 30", SECOND)).unwrap();
    let mut cleanup = Cleanup::default();
    let id = unique_id("dup");
    let pid = launch_tracked(&b, spec(&id, &[]), &mut cleanup).await;
    match b.launch(spec(&id, &[])).await {
        Err(BackendError::Refused {
            backend,
            op,
            reason,
        }) => {
            assert_eq!((backend, op), ("process", "launch"));
            assert!(reason.contains("already exists"), "{reason}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    // The first task is untouched.
    assert_eq!(b.pid_of(&id), Some(pid as u32));
    assert_eq!(b.list().await.unwrap().len(), 1);
    b.stop(&id).await.unwrap();
}

#[tokio::test]
async fn launch_of_missing_program_is_refused_with_os_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "exit 0", SECOND);
    cfg.runner_program = dir.path().join("no-such-aishell");
    let b = ProcessBackend::new(cfg).unwrap();
    let id = unique_id("missing");
    match b.launch(spec(&id, &[])).await {
        Err(BackendError::Refused {
            backend,
            op,
            reason,
        }) => {
            assert_eq!((backend, op), ("process", "launch"));
            assert!(reason.contains("No such file or directory"), "{reason}");
            assert!(reason.contains("no-such-aishell"), "{reason}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_eq!(b.status(&id).await.unwrap(), TaskStatus::NotFound);
    assert!(b.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn restarted_backend_adopts_and_stops_live_task() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "exec sleep 30", SECOND);
    let mut cleanup = Cleanup::default();
    let id = unique_id("adopt");
    let pid = {
        let a = ProcessBackend::new(cfg.clone()).unwrap();
        let mut s = spec(&id, &[]);
        s.mode = TaskMode::Cold;
        s.session_id = Some("sess-adopt".into());
        launch_tracked(&a, s, &mut cleanup).await
        // `a` is dropped here: the runner must survive it.
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!pid_dead(pid), "dropping the backend killed the runner");

    let b = ProcessBackend::new(cfg).unwrap();
    let listed = b.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].task_id, id);
    assert_eq!(listed[0].status, TaskStatus::Running);
    assert_eq!(listed[0].mode, TaskMode::Cold);
    assert_eq!(listed[0].session_id.as_deref(), Some("sess-adopt"));
    assert_eq!(b.pid_of(&id), Some(pid as u32));
    // Still running a little later (the poller does not misfire).
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(b.status(&id).await.unwrap(), TaskStatus::Running);

    let t0 = Instant::now();
    b.stop(&id).await.unwrap();
    assert!(t0.elapsed() < SECOND, "stop took {:?}", t0.elapsed());
    assert!(wait_until_dead(pid, SECOND).await);
    assert_eq!(b.status(&id).await.unwrap(), TaskStatus::NotFound);
    assert!(state_file_task_ids(dir.path()).is_empty());
}

#[tokio::test]
async fn adopted_task_exit_is_noticed_by_polling() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "exec sleep 30", SECOND);
    let mut cleanup = Cleanup::default();
    let id = unique_id("adoptexit");
    let pid = {
        let a = ProcessBackend::new(cfg.clone()).unwrap();
        launch_tracked(&a, spec(&id, &[]), &mut cleanup).await
    };
    let b = ProcessBackend::new(cfg).unwrap();
    assert_eq!(b.status(&id).await.unwrap(), TaskStatus::Running);

    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let st = wait_status(&b, &id, SECOND, |s| !s.is_alive()).await;
    assert_eq!(
        st,
        TaskStatus::Exited {
            code: None,
            reason: ADOPTED_EXIT_REASON.into()
        }
    );
    assert!(state_file_task_ids(dir.path()).is_empty());
}

#[tokio::test]
async fn stale_state_entries_are_not_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "exec sleep 30", SECOND);
    let mut cleanup = Cleanup::default();

    // One genuinely live task, recorded by a first backend.
    let live = unique_id("live");
    let live_pid = {
        let a = ProcessBackend::new(cfg.clone()).unwrap();
        launch_tracked(&a, spec(&live, &[]), &mut cleanup).await
    };

    // A dead pid...
    let mut dead_child = std::process::Command::new("/bin/true").spawn().unwrap();
    let dead_pid = dead_child.id() as i32;
    dead_child.wait().unwrap();
    // ...and a live group leader that is some other process (pid reuse).
    let other = unique_id("other");
    let mut reused = std::process::Command::new("sleep")
        .arg("30")
        .env("AISHELL_TASK_ID", &other)
        .process_group(0)
        .spawn()
        .unwrap();
    let reused_pid = reused.id() as i32;
    cleanup.track(reused_pid, &other);

    // Records of two more tasks, as a crashed gateway would have left them.
    let path = dir.path().join("state").join("tasks.log");
    let text = std::fs::read_to_string(&path).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let mut extra = String::new();
    for (id, pid) in [("stale-dead", dead_pid), ("stale-reused", reused_pid)] {
        let mut t = first["launched"].clone();
        t["task_id"] = id.into();
        t["pid"] = pid.into();
        t["pgid"] = pid.into();
        extra.push_str(&serde_json::json!({ "launched": t }).to_string());
        extra.push('\n');
    }
    std::fs::write(&path, text + &extra).unwrap();

    let b = ProcessBackend::new(cfg).unwrap();
    let ids: Vec<String> = b
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(ids, vec![live.clone()]);
    assert_eq!(b.status("stale-dead").await.unwrap(), TaskStatus::NotFound);
    assert_eq!(
        b.status("stale-reused").await.unwrap(),
        TaskStatus::NotFound
    );
    // Stale entries are dropped from the state file too.
    assert_eq!(state_file_task_ids(dir.path()), vec![live.clone()]);
    // Stopping a dropped stale entry must not signal anything.
    b.stop("stale-reused").await.unwrap();

    assert!(!pid_dead(reused_pid), "stop of a stale entry signalled it");

    b.stop(&live).await.unwrap();
    assert!(wait_until_dead(live_pid, SECOND).await);
    let _ = reused.kill();
    let _ = reused.wait();
}

#[tokio::test]
async fn corrupt_state_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "exit 0", SECOND);
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    std::fs::write(cfg.state_dir.join("tasks.log"), b"{garbage\n").unwrap();
    let b = ProcessBackend::new(cfg).unwrap();
    assert!(b.list().await.unwrap().is_empty());
    assert!(state_file_task_ids(dir.path()).is_empty());
}

#[test]
fn workspace_path_is_under_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let b = ProcessBackend::new(config(dir.path(), "exit 0", SECOND)).unwrap();
    assert_eq!(b.name(), "process");
    assert_eq!(
        b.workspace_path("alice"),
        dir.path()
            .join("workspaces")
            .join("alice")
            .to_str()
            .unwrap()
    );
}
