//! Several gateways on one PostgreSQL behind HAProxy (docs/cluster.md),
//! all real: a throwaway PostgreSQL cluster, three `aishell serve` processes
//! on loopback (process backend, bubblewrap), and Debian's HAProxy with the
//! shipped `deploy/haproxy/haproxy.cfg`.
//!
//! Needs `haproxy` and PostgreSQL (skipped, saying so, without them).
//!
//! Chaos tests: the owner SIGKILLed mid-turn, a rolling restart of every
//! gateway, PostgreSQL restarted under load (a server of the test's own),
//! one gateway cut off from PostgreSQL (a proxy). Each asserts that no
//! event is lost or repeated and that no task is left running.
//!
//! For a failure's analysis: `AISHELL_TEST_DUMP_LOGS=1` prints every
//! gateway's log even when the test passes; `AISHELL_TEST_PG_OPTS` adds
//! server options to the test's own PostgreSQL (e.g. `-c log_statement=all`)
//! and `AISHELL_TEST_PG_LOG=FILE` keeps its log.
#![cfg(feature = "postgres")]

mod common;
#[path = "../../store/tests/support/postgres.rs"]
mod postgres;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// The database every gateway shares (one may reach it through a proxy).
    db_url: String,
    _db: Option<postgres::TestDatabase>,
    _workspaces: tempfile::TempDir,
}

impl Cluster {
    async fn start(extra: &[&str]) -> Cluster {
        let db = postgres::TestDatabase::create().await;
        Cluster::start_with(db.url.clone(), Some(db), extra, |_, url| url.to_string()).await
    }

    /// Gateways on the database `db_url`; gateway `i` (from 0) is given
    /// `gateway_db(i, db_url)` as its `DATABASE_URL`.
    async fn start_with(
        db_url: String,
        db: Option<postgres::TestDatabase>,
        extra: &[&str],
        gateway_db: impl Fn(usize, &str) -> String,
    ) -> Cluster {
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
                let url = gateway_db(i, &db_url);
                Gateway::start_on_port(*port, &args, &[("DATABASE_URL", &url), ("RUST_LOG", &log)])
            })
            .collect();
        let cluster = Cluster {
            gateways,
            lb,
            db_url,
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
        let Ok(mut db) = sqlx::PgConnection::connect(&self.db_url).await else {
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

    /// The session's stored events, `(seq, frame JSON)` in seq order.
    async fn stored_events(&self, session_id: &str) -> Vec<(i64, String)> {
        use sqlx::Connection;
        let mut db = sqlx::PgConnection::connect(&self.db_url)
            .await
            .expect("reach the test database");
        sqlx::query_as("SELECT seq, json FROM session_events WHERE session_id = $1 ORDER BY seq")
            .bind(session_id)
            .fetch_all(&mut db)
            .await
            .expect("read the session's events")
    }

    /// The session's lease row: (owner, epoch).
    async fn lease(&self, session_id: &str) -> Option<(Option<String>, i64)> {
        use sqlx::Connection;
        let mut db = sqlx::PgConnection::connect(&self.db_url)
            .await
            .expect("reach the test database");
        sqlx::query_as("SELECT owner, epoch FROM session_leases WHERE session_id = $1")
            .bind(session_id)
            .fetch_optional(&mut db)
            .await
            .expect("read the session's lease")
    }

    /// Whether every gateway process is still alive.
    fn all_running(&mut self) -> Vec<bool> {
        self.gateways.iter_mut().map(|g| g.is_running()).collect()
    }

    /// Stop every gateway (graceful: one of several leaves its tasks
    /// running), then wait until no runner of `sessions` is left: cut off
    /// from every gateway, each gives up within its reconnect deadline
    /// (20 s in tests).
    async fn stop_and_wait_for_runners(&mut self, sessions: &[String]) {
        for gw in &mut self.gateways {
            tokio::task::block_in_place(|| gw.stop());
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let left: Vec<(String, Vec<i32>)> = sessions
                .iter()
                .map(|s| (s.clone(), runner_pids(s)))
                .filter(|(_, p)| !p.is_empty())
                .collect();
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "runners left running: {left:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn token(&self) -> &str {
        // The first gateway's start-up token: tokens live in the shared store.
        &self.gateways[0].token
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failure is read from the gateways' own words.
        if std::thread::panicking() || std::env::var_os("AISHELL_TEST_DUMP_LOGS").is_some() {
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

/// A turn printing `line1` … `line{n}`, 100 ms apart.
fn lines_script(n: usize) -> String {
    format!("sh -c 'for i in $(seq 1 {n}); do echo line$i; sleep 0.1; done'")
}

/// The highest stream (non-ephemeral) seq among `frames`.
fn last_stream_seq(frames: &[Value]) -> u64 {
    stream_seqs(frames).last().copied().unwrap_or(0)
}

fn stream_seqs(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .filter(|v| !v["ephemeral"].as_bool().unwrap_or(false))
        .filter_map(|v| v["seq"].as_u64())
        .collect()
}

/// One client's view of a turn across reconnects.
struct Turn {
    session_id: String,
    frames: Vec<Value>,
    /// How each socket before the last one ended: `(code, reason)`, or
    /// `None` when it just closed (or stayed silent for 30 s).
    closes: Vec<Option<(u16, String)>>,
    /// The `session` frame of every connection after the first.
    hellos: Vec<Value>,
    client: Client,
}

/// Read the turn `c` is in to its `finish`, reconnecting through HAProxy
/// with the last stream seq seen whenever the socket ends, as a client
/// should (1012: the session moved). `streaming` counts up once the turn's
/// output reached `line3`.
async fn follow_turn(
    lb: String,
    token: String,
    mut c: Client,
    streaming: Option<Arc<AtomicUsize>>,
) -> Turn {
    let sid = c.session_id.clone();
    let mut frames: Vec<Value> = Vec::new();
    let mut closes = Vec::new();
    let mut hellos = Vec::new();
    let mut counted = false;
    let deadline = Instant::now() + Duration::from_secs(100);
    loop {
        assert!(
            Instant::now() < deadline,
            "the turn of {sid} did not finish; closes {closes:?}; frames:\n{}",
            pretty(&frames)
        );
        match c.next_or_close(Duration::from_secs(30)).await {
            Ok(v) => {
                let done = is_type(&v, "finish");
                frames.push(v);
                if !counted && text_of(&frames).contains("line3\n") {
                    counted = true;
                    if let Some(n) = &streaming {
                        n.fetch_add(1, Ordering::SeqCst);
                    }
                }
                if done {
                    break;
                }
            }
            Err(close) => {
                closes.push(close);
                assert!(closes.len() < 20, "{sid}: too many reconnects: {closes:?}");
                // Not `c.last_seq`: a fresh connection starts it at 0 until
                // its first stream frame.
                let last = last_stream_seq(&frames);
                c = connect_through(&lb, &token, Some((&sid, last))).await;
                hellos.push(c.hello.clone());
            }
        }
    }
    Turn {
        session_id: sid,
        frames,
        closes,
        hellos,
        client: c,
    }
}

/// For a failure's message: what the store holds when the client saw a gap.
async fn show_gaps(cluster: &Cluster, turn: &Turn) {
    let seqs = stream_seqs(&turn.frames);
    if seqs.windows(2).all(|p| p[1] == p[0] + 1) {
        return;
    }
    let stored = cluster.stored_events(&turn.session_id).await;
    eprintln!(
        "{}: client seqs {seqs:?}; store: {}",
        turn.session_id,
        cluster.store_view(&turn.session_id).await
    );
    for (seq, json) in stored.iter().take(20) {
        eprintln!("  stored {seq}: {}", &json[..json.len().min(160)]);
    }
}

/// Exactly once: stream seqs start at 1 and rise by one with no gap or
/// repeat, every line arrived once and in order, one `finish`.
fn assert_exactly_once(turn: &Turn, lines: usize) {
    let seqs = stream_seqs(&turn.frames);
    let sid = &turn.session_id;
    assert_eq!(seqs.first(), Some(&1), "{sid}: first seq: {seqs:?}");
    for pair in seqs.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "{sid}: seq gap or repeat: {seqs:?}; closes {:?}; reconnected with {}; frames:\n{}",
            turn.closes,
            pretty(&turn.hellos),
            pretty(&turn.frames)
        );
    }
    let text = text_of(&turn.frames);
    let got: Vec<&str> = text.lines().filter(|l| l.starts_with("line")).collect();
    let expected: Vec<String> = (1..=lines).map(|i| format!("line{i}")).collect();
    assert_eq!(got, expected, "{sid}: {}", pretty(&turn.frames));
    assert_eq!(
        of_type(&turn.frames, "finish").len(),
        1,
        "{sid}: {}",
        pretty(&turn.frames)
    );
}

/// The store holds exactly what the client saw: the stored events up to
/// the client's last seq are its stream frames, byte for byte once parsed,
/// and the stored seqs run 1, 2, … with nothing foreign or doubled.
async fn assert_store_matches(cluster: &Cluster, turn: &Turn) {
    let sid = &turn.session_id;
    let stored = cluster.stored_events(sid).await;
    let seqs: Vec<i64> = stored.iter().map(|(s, _)| *s).collect();
    let contiguous: Vec<i64> = (1..=seqs.len() as i64).collect();
    assert_eq!(seqs, contiguous, "{sid}: stored seqs");
    let seen: Vec<&Value> = turn
        .frames
        .iter()
        .filter(|v| !v["ephemeral"].as_bool().unwrap_or(false) && v["seq"].is_u64())
        .collect();
    assert!(
        stored.len() >= seen.len(),
        "{sid}: the store lacks events the client saw"
    );
    for (frame, (seq, json)) in seen.iter().zip(&stored) {
        let stored: Value = serde_json::from_str(json).expect("stored frame is JSON");
        assert_eq!(
            &&stored, frame,
            "{sid}: stored event {seq} differs from the client's"
        );
    }
}

/// How a connection attempt made while the store is down ended.
#[derive(Debug)]
enum Probe {
    /// Refused before the upgrade: status and body.
    Http(u16, String),
    /// Upgraded; the first frame (an `error` is the expected answer).
    Frame(Value),
    /// Failed otherwise (socket closed, I/O error).
    #[allow(dead_code, reason = "shown through Debug")]
    Failed(String),
    /// No answer at all.
    Hung,
}

/// Open a new session at `url`, giving up after `limit`.
async fn probe(url: String, token: String, limit: Duration) -> (Duration, Probe) {
    use tokio_tungstenite::tungstenite::Error;
    let t = Instant::now();
    let outcome = match tokio::time::timeout(limit, Client::connect(&url, &token, None)).await {
        Err(_) => Probe::Hung,
        Ok(Ok(c)) => Probe::Frame(c.hello),
        Ok(Err(Error::Http(resp))) => Probe::Http(
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Ok(Err(e)) => Probe::Failed(e.to_string()),
    };
    (t.elapsed(), outcome)
}

/// A PostgreSQL server of the test's own (it is stopped and started
/// under load; the shared test server must not be): initdb into a temp
/// dir, `pg_ctl` as the `postgres` user when root, loopback only. Stopped
/// and deleted on drop, panics included.
struct OwnPostgres {
    dir: tempfile::TempDir,
    port: u16,
    bin: std::path::PathBuf,
    owner: postgres::Owner,
}

impl OwnPostgres {
    fn start() -> OwnPostgres {
        let bin = postgres::bin_dir();
        let owner = postgres::Owner::for_server();
        let dir = tempfile::Builder::new()
            .prefix("aishell-chaos-pg-")
            .tempdir()
            .unwrap();
        owner.take(dir.path());
        let out = owner
            .command(&bin.join("initdb"), dir.path())
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
            .args(["--no-sync", "--pgdata"])
            .arg(dir.path().join("data"))
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = OwnPostgres {
            dir,
            port: free_port(),
            bin,
            owner,
        };
        pg.start_server();
        pg
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        self.owner
            .command(&self.bin.join("pg_ctl"), self.dir.path())
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl")
    }

    /// Start (again) on the same port.
    fn start_server(&self) {
        let dir = self.dir.path().to_str().unwrap();
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {dir} -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 {}",
            self.port,
            std::env::var("AISHELL_TEST_PG_OPTS").unwrap_or_default()
        );
        let log = format!("{dir}/server.log");
        let out = self.pg_ctl(&["start", "-w", "-t", "60", "-s", "-l", &log, "-o", &opts]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            common::read(std::path::Path::new(&log))
        );
    }

    /// `pg_ctl stop -m fast`: every connection is cut, new ones refused.
    fn stop_fast(&self) {
        let out = self.pg_ctl(&["stop", "-m", "fast", "-w", "-s"]);
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        // Whatever state it is in; the temp dir goes next.
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-s"]);
        if let Some(keep) = std::env::var_os("AISHELL_TEST_PG_LOG") {
            let _ = std::fs::copy(self.dir.path().join("server.log"), keep);
        }
    }
}

/// A TCP proxy in front of PostgreSQL for one gateway, which can be cut
/// (every connection closed, new ones refused) and healed.
struct PgProxy {
    port: u16,
    target: std::net::SocketAddr,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl PgProxy {
    async fn start(target_port: u16) -> PgProxy {
        let proxy = PgProxy {
            port: free_port(),
            target: ([127, 0, 0, 1], target_port).into(),
            tasks: Default::default(),
        };
        proxy.heal();
        proxy
    }

    /// Listen (again) on the proxy's port and pass connections through.
    fn heal(&self) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // Its closed connections may linger in TIME_WAIT on this port.
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(([127, 0, 0, 1], self.port).into())
            .expect("bind the proxy's port again");
        let listener = socket.listen(128).unwrap();
        let (target, tasks) = (self.target, self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Close every connection and the listener: the gateway's database
    /// connections die and new ones are refused.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn url_for(&self, db_url: &str) -> String {
        with_port(db_url, self.port)
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// `postgres://user@host:PORT/db` with another port.
fn with_port(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    format!("{scheme}://{host}:{port}/{path}")
}

/// The port of `postgres://…@host:PORT/…`.
fn port_of(url: &str) -> u16 {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    authority.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Each of `sessions` has exactly one runner: `(session, its pid)`.
fn one_runner_each(sessions: &[String]) -> Vec<(String, Vec<i32>)> {
    sessions
        .iter()
        .map(|s| {
            let pids = runner_pids(s);
            assert_eq!(pids.len(), 1, "{s}: one task: {pids:?}");
            (s.clone(), pids)
        })
        .collect()
}

/// The running tasks were adopted by their sessions' new owners, not
/// replaced by new ones.
fn assert_same_runners(before: &[(String, Vec<i32>)]) {
    for (sid, pids) in before {
        assert_eq!(&runner_pids(sid), pids, "{sid}: the task was not adopted");
    }
}

/// Wait until `n` counts `want`, or panic after `limit`.
async fn wait_count(n: &AtomicUsize, want: usize, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while n.load(Ordering::SeqCst) < want {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {want}",
            n.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Log lines of `gw` with `event` (and, when given, this session).
fn log_events(gw: &Gateway, event: &str, session_id: Option<&str>) -> usize {
    gw.logs()
        .iter()
        .filter(|l| l["event"] == event)
        .filter(|l| session_id.is_none_or(|s| l["sessionId"] == s))
        .count()
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

/// Serve arguments of the chaos tests below: the `shell` agent, every
/// start cold, room for every session's task.
const CHAOS_ARGS: &[&str] = &[
    "--agent",
    "shell",
    "--enable-warm-pool",
    "false",
    "--max-tasks-per-user",
    "100",
];

/// Open `n` sessions through HAProxy, each running a turn of `lines`
/// lines, each followed by its own task (reconnecting as needed).
async fn start_turns(
    cluster: &Cluster,
    n: usize,
    lines: usize,
    streaming: &Arc<AtomicUsize>,
) -> (Vec<String>, Vec<tokio::task::JoinHandle<Turn>>) {
    let lb = cluster.lb.ws_url();
    let token = cluster.token().to_string();
    let mut sessions = Vec::new();
    let mut turns = Vec::new();
    for _ in 0..n {
        let mut c = connect_through(&lb, &token, None).await;
        c.message("m1", &lines_script(lines)).await;
        sessions.push(c.session_id.clone());
        turns.push(tokio::spawn(follow_turn(
            lb.clone(),
            token.clone(),
            c,
            Some(streaming.clone()),
        )));
    }
    (sessions, turns)
}

async fn join_turns(turns: Vec<tokio::task::JoinHandle<Turn>>) -> Vec<Turn> {
    let mut done = Vec::new();
    for t in turns {
        done.push(t.await.expect("a client task panicked"));
    }
    done
}

/// Restart every gateway gracefully, one after another, while 20 sessions
/// stream: each stopping gateway hands its sessions over (1012, leases
/// released, tasks left running), clients reconnect through HAProxy with
/// `last_seq`, runners re-dial and are adopted; every line arrives exactly
/// once and every turn finishes once, on its original task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_gateway_loses_and_repeats_nothing() {
    if !have("haproxy") || !have("bwrap") {
        eprintln!("haproxy or bubblewrap missing: skipped");
        return;
    }
    const SESSIONS: usize = 20;
    const LINES: usize = 200;
    let t0 = Instant::now();
    let mut cluster = Cluster::start(CHAOS_ARGS).await;
    let streaming = Arc::new(AtomicUsize::new(0));
    let (sessions, turns) = start_turns(&cluster, SESSIONS, LINES, &streaming).await;
    wait_count(
        &streaming,
        SESSIONS,
        Duration::from_secs(60),
        "sessions streaming",
    )
    .await;
    let streaming_at = t0.elapsed();
    let runners_before = one_runner_each(&sessions);
    let mut restarts = Vec::new();
    for i in 0..cluster.gateways.len() {
        let t = Instant::now();
        let gw = &mut cluster.gateways[i];
        tokio::task::block_in_place(|| gw.stop());
        let stopped = t.elapsed();
        tokio::task::block_in_place(|| gw.restart(&[]));
        let port = gw.port;
        // Up, and back in HAProxy's rotation (2 checks 500 ms apart),
        // before the next one goes.
        let deadline = Instant::now() + WAIT;
        while http_status(port, "/ready") != Some(200) {
            assert!(Instant::now() < deadline, "gw{} not ready again", i + 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        restarts.push((stopped, t.elapsed()));
    }
    let restarted_at = t0.elapsed();
    let turns = join_turns(turns).await;
    let finished_at = t0.elapsed();
    assert_eq!(cluster.all_running(), [true, true, true], "a gateway died");
    for turn in &turns {
        show_gaps(&cluster, turn).await;
        assert_exactly_once(turn, LINES);
        // Its turn outlived the restarts: it was moved at least once.
        assert!(
            !turn.closes.is_empty(),
            "{} never moved: the restarts missed it",
            turn.session_id
        );
        assert_store_matches(&cluster, turn).await;
    }
    assert_same_runners(&runners_before);
    let reconnects: usize = turns.iter().map(|t| t.closes.len()).sum();
    let moved = turns
        .iter()
        .flat_map(|t| &t.closes)
        .filter(|c| matches!(c, Some((1012, _))))
        .count();
    eprintln!(
        "rolling restart: {SESSIONS} sessions streaming at {streaming_at:?}, \
         restarts (stop, stop+start+ready) {restarts:?}, done at {restarted_at:?}, \
         turns finished at {finished_at:?}; {reconnects} reconnects ({moved} with 1012)"
    );
    for turn in turns {
        turn.client.close().await;
    }
    cluster.stop_and_wait_for_runners(&sessions).await;
    eprintln!("rolling restart: total {:?}", t0.elapsed());
}

/// PostgreSQL (a server of this test's own) is stopped for about 3 s while
/// sessions stream: a new connection meanwhile gets a clear error at once
/// (not a hang); the gateways survive, step down from every session (their
/// leases expired) and take them back; afterwards every turn finishes and
/// nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_postgresql_under_load_loses_and_repeats_nothing() {
    if !have("haproxy") || !have("bwrap") {
        eprintln!("haproxy or bubblewrap missing: skipped");
        return;
    }
    const SESSIONS: usize = 5;
    const LINES: usize = 100;
    let t0 = Instant::now();
    let pg = OwnPostgres::start();
    let mut cluster = Cluster::start_with(pg.url(), None, CHAOS_ARGS, |_, u| u.to_string()).await;
    let streaming = Arc::new(AtomicUsize::new(0));
    let (sessions, turns) = start_turns(&cluster, SESSIONS, LINES, &streaming).await;
    wait_count(
        &streaming,
        SESSIONS,
        Duration::from_secs(60),
        "sessions streaming",
    )
    .await;
    let runners_before = one_runner_each(&sessions);
    let token = cluster.token().to_string();

    tokio::task::block_in_place(|| pg.stop_fast());
    let down = Instant::now();
    // New connections while it is down: at a gateway, and through HAProxy.
    let limit = Duration::from_secs(10);
    let direct = tokio::spawn(probe(cluster.gateways[1].ws_url(), token.clone(), limit));
    let via_lb = tokio::spawn(probe(cluster.lb.ws_url(), token.clone(), limit));
    let direct = direct.await.unwrap();
    let via_lb = via_lb.await.unwrap();
    eprintln!(
        "postgres down: a new connection at a gateway {direct:?}, through HAProxy {via_lb:?}"
    );
    // Down about 3 s, and at least until both probes were answered.
    let left = Duration::from_secs(3).saturating_sub(down.elapsed());
    tokio::time::sleep(left).await;
    tokio::task::block_in_place(|| pg.start_server());
    let down_for = down.elapsed();

    let turns = join_turns(turns).await;
    let finished_at = t0.elapsed();
    let answered = |(took, p): &(Duration, Probe)| -> bool {
        let error = match p {
            Probe::Http(status, body) => *status >= 500 && !body.is_empty(),
            Probe::Frame(v) => is_type(v, "error") && v["code"].is_string(),
            Probe::Failed(_) | Probe::Hung => false,
        };
        error && *took < Duration::from_secs(5)
    };
    assert!(
        answered(&direct),
        "a new connection at a gateway while the store is down: {direct:?}"
    );
    assert!(
        answered(&via_lb),
        "a new connection through HAProxy while the store is down: {via_lb:?}"
    );
    assert_eq!(cluster.all_running(), [true, true, true], "a gateway died");
    for turn in &turns {
        show_gaps(&cluster, turn).await;
        assert_exactly_once(turn, LINES);
        assert_store_matches(&cluster, turn).await;
    }
    assert_same_runners(&runners_before);
    let fenced: Vec<usize> = cluster
        .gateways
        .iter()
        .map(|g| log_events(g, "leases_expired", None) + log_events(g, "lease_lost", None))
        .collect();
    let reconnects: usize = turns.iter().map(|t| t.closes.len()).sum();
    eprintln!(
        "postgres restart: down {down_for:?}; lease losses per gateway {fenced:?}; \
         {reconnects} reconnects; turns finished at {finished_at:?}"
    );
    for turn in turns {
        turn.client.close().await;
    }
    cluster.stop_and_wait_for_runners(&sessions).await;
    drop(cluster);
    drop(pg);
    eprintln!("postgres restart: total {:?}", t0.elapsed());
}

/// One gateway loses PostgreSQL (a proxy between them is cut) while it
/// owns a streaming session: it steps down once its lease could not be
/// renewed for a whole TTL, another gateway takes the session over, the
/// client (reconnecting through HAProxy) sees the turn finish exactly once,
/// and the store holds exactly what the client saw: the cut-off gateway
/// wrote nothing after the takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_off_from_postgresql_hands_its_session_over() {
    if !have("haproxy") || !have("bwrap") {
        eprintln!("haproxy or bubblewrap missing: skipped");
        return;
    }
    const LINES: usize = 80;
    let t0 = Instant::now();
    let db = postgres::TestDatabase::create().await;
    let proxy = PgProxy::start(port_of(&db.url)).await;
    let proxied = proxy.url_for(&db.url);
    let mut cluster = Cluster::start_with(db.url.clone(), Some(db), CHAOS_ARGS, |i, url| {
        if i == 0 {
            proxied.clone()
        } else {
            url.to_string()
        }
    })
    .await;
    let token = cluster.token().to_string();
    // Straight to gw1, so it owns the session (and launches its task).
    let mut c = Client::connect(&cluster.gateways[0].ws_url(), &token, None)
        .await
        .expect("connect to gw1");
    let sid = c.session_id.clone();
    c.message("m1", &lines_script(LINES)).await;
    let streaming = Arc::new(AtomicUsize::new(0));
    let turn = tokio::spawn(follow_turn(
        cluster.lb.ws_url(),
        token.clone(),
        c,
        Some(streaming.clone()),
    ));
    wait_count(&streaming, 1, Duration::from_secs(30), "session streaming").await;
    assert_eq!(cluster.owner_of(&sid), 0, "gw1 does not own the session");
    let epoch_before = cluster.lease(&sid).await.expect("a lease").1;
    let runners_before = one_runner_each(std::slice::from_ref(&sid));

    proxy.cut();
    let cut = Instant::now();
    cluster.gateways[0]
        .wait_log(
            "gw1 stepping down",
            |l| l["event"] == "session_step_down" && l["sessionId"] == sid.as_str(),
            Duration::from_secs(30),
        )
        .await;
    let stepped_down = cut.elapsed();
    let turn = turn.await.expect("the client task panicked");
    let finished = cut.elapsed();
    assert_exactly_once(&turn, LINES);
    let new_owner = cluster.owner_of(&sid);
    assert_ne!(new_owner, 0, "the session did not move");
    assert!(
        log_events(&cluster.gateways[0], "leases_expired", None) > 0,
        "gw1 did not step down for want of renewals:\n{}",
        cluster.gateways[0].raw_logs()
    );
    // Connected again: anything gw1 still held would reach the store now,
    // and must be refused by the fence.
    proxy.heal();
    let deadline = Instant::now() + WAIT;
    while http_status(cluster.gateways[0].port, "/ready") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "gw1 never reached the store again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_store_matches(&cluster, &turn).await;
    let (owner, epoch) = cluster.lease(&sid).await.expect("a lease");
    assert_eq!(
        owner.as_deref(),
        Some(format!("gw{}", new_owner + 1).as_str()),
        "lease"
    );
    assert!(epoch > epoch_before, "epoch {epoch_before} -> {epoch}");
    assert_eq!(cluster.all_running(), [true, true, true], "a gateway died");
    assert_same_runners(&runners_before);
    let refused = log_events(&cluster.gateways[0], "fenced_write_refused", Some(&sid));
    eprintln!(
        "cut off: gw1 stepped down {stepped_down:?} after the cut, turn finished {finished:?} \
         after it on gw{}; closes {:?}; gw1 fenced writes refused: {refused}; epoch \
         {epoch_before} -> {epoch}",
        new_owner + 1,
        turn.closes
    );
    turn.client.close().await;
    cluster
        .stop_and_wait_for_runners(std::slice::from_ref(&sid))
        .await;
    drop(cluster);
    drop(proxy);
    eprintln!("cut off: total {:?}", t0.elapsed());
}

/// The admin view lists every gateway sharing the database, and says
/// which one is silent; a user's sandboxes count against their limit on
/// every gateway (the store knows them all), not per gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_see_every_gateway_and_a_users_limit_spans_them() {
    if !have("haproxy") || !have("bwrap") {
        eprintln!("haproxy or bubblewrap missing: skipped");
        return;
    }
    let mut cluster = Cluster::start(&[
        "--agent",
        "shell",
        "--enable-warm-pool",
        "false",
        "--max-tasks-per-user",
        "1",
    ])
    .await;
    let (status, body) = cluster.gateways[0].http_get("/api/admin/gateways");
    assert_eq!(status, 200, "{body}");
    let listed = body["gateways"].as_array().expect("gateways").clone();
    let ids: Vec<&str> = listed
        .iter()
        .filter_map(|g| g["gateway_id"].as_str())
        .collect();
    assert_eq!(ids, ["gw1", "gw2", "gw3"], "{body}");
    assert!(listed.iter().all(|g| g["alive"] == true), "{body}");
    assert_eq!(
        listed.iter().filter(|g| g["this"] == true).count(),
        1,
        "{body}"
    );
    // One sandbox on gw1 ...
    let token = cluster.token().to_string();
    let mut first = Client::connect(&cluster.gateways[0].ws_url(), &token, None)
        .await
        .expect("connect gw1");
    first.message("m1", "echo one").await;
    let frames = first.turn().await;
    assert!(text_of(&frames).contains("one"), "{}", pretty(&frames));
    // ... so a second session of the same user on gw2 is over the limit.
    let mut second = Client::connect(&cluster.gateways[1].ws_url(), &token, None)
        .await
        .expect("connect gw2");
    second.message("m2", "echo two").await;
    let refused = second.until(|v| is_type(v, "error"), WAIT).await;
    let error = refused.last().unwrap();
    assert_eq!(
        error["error"]["code"],
        "QUOTA_EXCEEDED",
        "{}",
        pretty(&refused)
    );
    assert!(
        !text_of(&refused).contains("two"),
        "the message ran anyway: {}",
        pretty(&refused)
    );
    // A gateway that dies shows as silent once a lease has passed.
    cluster.gateways[2].kill9();
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = cluster.gateways[0].http_get("/api/admin/gateways");
        let gw3 = body["gateways"]
            .as_array()
            .and_then(|l| l.iter().find(|g| g["gateway_id"] == "gw3").cloned());
        if gw3.as_ref().is_some_and(|g| g["alive"] == false) {
            break;
        }
        assert!(Instant::now() < deadline, "gw3 still shown alive: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sessions = [first.session_id.clone(), second.session_id.clone()];
    first.close().await;
    second.close().await;
    cluster.stop_and_wait_for_runners(&sessions).await;
}
