//! Several gateways on one PostgreSQL behind HAProxy (docs/cluster.md),
//! all real: a throwaway PostgreSQL cluster, three `aishell serve` processes
//! on loopback (process backend, bubblewrap), and Debian's HAProxy with the
//! shipped `deploy/haproxy/haproxy.cfg`.
//!
//! Needs `haproxy` and PostgreSQL (skipped, saying so, without them).
#![cfg(feature = "postgres")]

mod common;
#[path = "../../store/tests/support/postgres.rs"]
mod postgres;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Short leases so a dead gateway's sessions move within seconds.
const LEASE_TTL: &str = "2s";

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// HAProxy with the shipped configuration, killed on drop.
struct Haproxy {
    child: Child,
    port: u16,
}

impl Haproxy {
    fn start(gateways: &[u16]) -> Haproxy {
        let port = free_port();
        let cfg = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/haproxy/haproxy.cfg"
        );
        let mut cmd = Command::new("haproxy");
        cmd.args(["-db", "-f", cfg])
            .env("AISHELL_LB_BIND", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null());
        for (i, p) in gateways.iter().enumerate() {
            cmd.env(format!("AISHELL_GW{}", i + 1), format!("127.0.0.1:{p}"));
        }
        Haproxy {
            child: cmd.spawn().expect("start haproxy"),
            port,
        }
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three gateways on one database and one workspace root, behind HAProxy.
struct Cluster {
    gateways: Vec<Gateway>,
    lb: Haproxy,
    _db: postgres::TestDatabase,
    _workspaces: tempfile::TempDir,
}

impl Cluster {
    async fn start(extra: &[&str]) -> Cluster {
        let db = postgres::TestDatabase::create().await;
        let workspaces = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        // HAProxy first: its port is the shared address runners re-dial.
        let lb = Haproxy::start(&ports);
        let shared = format!("ws://127.0.0.1:{}", lb.port);
        let gateways = ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let id = format!("gw{}", i + 1);
                let mut args = vec![
                    "--gateway-id",
                    &id,
                    "--shared-url",
                    &shared,
                    "--lease-ttl",
                    LEASE_TTL,
                    "--workspaces-root",
                    workspaces.path().to_str().unwrap(),
                ];
                args.extend_from_slice(extra);
                let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let log = std::env::var("AISHELL_TEST_RUST_LOG").unwrap_or_else(|_| "info".into());
                Gateway::start_on_port(
                    *port,
                    &args,
                    &[("DATABASE_URL", &db.url), ("RUST_LOG", &log)],
                )
            })
            .collect();
        let cluster = Cluster {
            gateways,
            lb,
            _db: db,
            _workspaces: workspaces,
        };
        cluster.wait_lb_ready().await;
        cluster
    }

    /// HAProxy answers `/ready` through a gateway.
    async fn wait_lb_ready(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if http_status(self.lb.port, "/ready") == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "HAProxy never became ready; gateways' /ready: {:?}",
                self.gateways
                    .iter()
                    .map(|g| http_status(g.port, "/ready"))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The gateway that took the session's lease last.
    fn owner_of(&self, session_id: &str) -> usize {
        let mut latest = None;
        for (i, gw) in self.gateways.iter().enumerate() {
            for line in gw.logs() {
                if line["event"] == "lease_acquired" && line["sessionId"] == session_id {
                    let at = line["timestamp"].as_str().unwrap_or_default().to_string();
                    if latest.as_ref().is_none_or(|(t, _)| &at > t) {
                        latest = Some((at, i));
                    }
                }
            }
        }
        latest.map(|(_, i)| i).expect("no gateway took the lease")
    }

    /// The session's stored events and lease, for a failure's message.
    async fn store_view(&self, session_id: &str) -> String {
        use sqlx::Connection;
        let Ok(mut db) = sqlx::PgConnection::connect(&self._db.url).await else {
            return "database unreachable".into();
        };
        let seqs: Vec<i64> =
            sqlx::query_scalar("SELECT seq FROM session_events WHERE session_id = $1 ORDER BY seq")
                .bind(session_id)
                .fetch_all(&mut db)
                .await
                .unwrap_or_default();
        let lease: Option<(Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT owner, epoch, expires_at FROM session_leases WHERE session_id = $1",
        )
        .bind(session_id)
        .fetch_optional(&mut db)
        .await
        .unwrap_or_default();
        format!("events {seqs:?}, lease {lease:?}")
    }

    fn token(&self) -> &str {
        // The first gateway's start-up token: tokens live in the shared store.
        &self.gateways[0].token
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failure is read from the gateways' own words.
        if std::thread::panicking() {
            for (i, gw) in self.gateways.iter().enumerate() {
                eprintln!("==== gw{} logs ====\n{}", i + 1, gw.raw_logs());
            }
        }
    }
}

/// Status of a plain `GET` on loopback.
fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Connect through HAProxy, resuming `session` after `last_seq`; a
/// gateway that is going away may refuse, so retry for a while.
async fn connect_through(lb: &str, token: &str, resume: Option<(&str, u64)>) -> Client {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(c) = Client::connect(lb, token, resume).await
            && is_type(&c.hello, "session")
        {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "could not reconnect through HAProxy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Frames until the turn's `finish`, or `None` when the socket ends first.
async fn read_turn(c: &mut Client, into: &mut Vec<Value>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match c.next_or_close(Duration::from_secs(30)).await {
            Ok(v) => {
                let done = is_type(&v, "finish");
                into.push(v);
                if done {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    panic!("turn did not finish: {}", pretty(into));
}

fn runner_pids(session_id: &str) -> Vec<i32> {
    pids_with_env(&format!("AISHELL_SESSION_ID={session_id}"), " runner")
}

/// SIGKILL the gateway running a turn: the client reconnects through
/// HAProxy with `last_seq` and sees the rest of the turn exactly once;
/// another gateway adopts the running task (no second task), and the
/// turn finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owner_mid_turn_loses_and_repeats_nothing() {
    if !have("haproxy") || !have("bwrap") {
        eprintln!("haproxy or bubblewrap missing: skipped");
        return;
    }
    let mut cluster = Cluster::start(&["--agent", "shell", "--enable-warm-pool", "false"]).await;
    let lb = cluster.lb.ws_url();
    let token = cluster.token().to_string();
    let mut c = connect_through(&lb, &token, None).await;
    let sid = c.session_id.clone();
    // 40 lines, 100 ms apart: the kill lands in the middle.
    c.message(
        "m1",
        "sh -c 'for i in $(seq 1 40); do echo line$i; sleep 0.1; done'",
    )
    .await;
    let mut frames = Vec::new();
    while !text_of(&frames).contains("line5\n") {
        match c.next_or_close(WAIT).await {
            Ok(v) => frames.push(v),
            Err(close) => panic!(
                "no output before the kill ({close:?}); frames: {}\nstore: {}",
                pretty(&frames),
                cluster.store_view(&sid).await
            ),
        }
    }
    let owner = cluster.owner_of(&sid);
    let runners_before = runner_pids(&sid);
    assert_eq!(runners_before.len(), 1, "one task: {runners_before:?}");
    cluster.gateways[owner].kill9();
    // Whatever the dying connection still delivers, then the rest.
    let mut finished = read_turn(&mut c, &mut frames).await;
    let mut reconnects = 0;
    while !finished {
        reconnects += 1;
        assert!(reconnects < 10, "too many reconnects: {}", pretty(&frames));
        let last = c.last_seq;
        c = connect_through(&lb, &token, Some((&sid, last))).await;
        finished = read_turn(&mut c, &mut frames).await;
    }
    let new_owner = cluster.owner_of(&sid);
    assert_ne!(new_owner, owner, "the session did not move");
    // Exactly once: stream seqs rise by one with no gap or repeat, and
    // every line arrived once, in order.
    let seqs: Vec<u64> = frames
        .iter()
        .filter(|v| !v["ephemeral"].as_bool().unwrap_or(false))
        .filter_map(|v| v["seq"].as_u64())
        .collect();
    for pair in seqs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "seq gap or repeat: {seqs:?}");
    }
    let text = text_of(&frames);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("line")).collect();
    let expected: Vec<String> = (1..=40).map(|i| format!("line{i}")).collect();
    assert_eq!(lines, expected, "{}", pretty(&frames));
    assert_eq!(of_type(&frames, "finish").len(), 1);
    // The running task was adopted, not replaced.
    assert_eq!(
        runner_pids(&sid),
        runners_before,
        "the task was not adopted"
    );
    // The new owner answers the next message on the same task.
    c.message("m2", "echo after").await;
    let next = c.turn().await;
    assert!(text_of(&next).contains("after"), "{}", pretty(&next));
    c.close().await;
    // No task outlives the gateways: the last ones stop, the runner, cut
    // off, gives up within its reconnect deadline (20 s in tests).
    for gw in &mut cluster.gateways {
        gw.stop();
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    while !runner_pids(&sid).is_empty() {
        assert!(Instant::now() < deadline, "runner left running");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
