//! `aishell bench soak`: bounded churn against a gateway of its own, then a
//! check that nothing was lost or leaked.
//!
//! Sessions take turns with the echo agent (one message in flight each, so a
//! terminal frame answers exactly the message outstanding; after a failed
//! start, the next one too, as a user's next message) while the churn
//! runs: clients drop mid-turn and reconnect with `last_seq` (resending the
//! unanswered message under the same id), pause past the idle timeout so
//! their task stops and later resumes, abandon their session for a new one;
//! agents are SIGKILLed at random; the warm pool is drained and refilled
//! through the admin API. Before and after the churn the gateway is brought
//! to the same quiet state (no client, no session in memory, the pool full)
//! and measured. It fails (exit status 1) when a turn got no answer or two,
//! a seq came twice or was skipped, a process outlived its session, or the
//! gateway's descriptors or RSS grew more than 10 %.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::system::{self, ProcessKind, print_provenance, provenance, random_below};
use super::{SpawnedGateway, Ws, connect, http_json};
use crate::settings::parse_duration;

#[derive(Args)]
pub struct SoakArgs {
    /// How long the churn runs (e.g. 90s, 5m); warm-up and checks come on top.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    duration: Duration,
    /// Sessions talking at once (each one client).
    #[arg(long, default_value_t = 16)]
    sessions: usize,
    /// Turns each session takes before the churn starts.
    #[arg(long, default_value_t = 25)]
    warmup_turns: usize,
    /// The gateway's `--session-idle-timeout`; a pausing client waits past it.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    idle_timeout: Duration,
    /// Mean time between SIGKILLs of a random agent.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    kill_every: Duration,
    /// Mean time between warm pool drains (each refilled a third of it later).
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    drain_every: Duration,
    /// Chance per turn that the client drops its connection with the message in flight.
    #[arg(long, default_value_t = 0.1)]
    drop_chance: f64,
    /// Chance per turn that the client goes away past the idle timeout afterwards.
    #[arg(long, default_value_t = 0.03)]
    pause_chance: f64,
    /// Chance per turn that the client moves to a new session afterwards.
    #[arg(long, default_value_t = 0.02)]
    new_session_chance: f64,
    /// Mean pause between a session's turns (uniform over twice it).
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    think: Duration,
    /// Warm pool size of the spawned gateway.
    #[arg(long, default_value_t = 4)]
    pool: usize,
    /// Extra `serve` arguments for the spawned gateway.
    #[arg(long = "spawn-arg", allow_hyphen_values = true)]
    spawn_args: Vec<String>,
    /// Seconds a turn may take, reconnects included, before it counts as lost.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Growth of the gateway's RSS at rest, after the churn against after the
    /// warm-up, that still counts as no leak, in percent.
    #[arg(long, default_value_t = 10.0)]
    max_rss_growth_percent: f64,
    /// Leave the gateway's data directory (database, logs) behind and say where.
    #[arg(long)]
    keep_data: bool,
    /// table or json.
    #[arg(long, default_value = "table")]
    format: String,
}

/// The largest write-ahead log (with its index) accepted at rest.
const WAL_LIMIT: u64 = 64 << 20;

/// What the churn does to a session between and during its turns.
#[derive(Clone, Copy)]
struct Churn {
    drop_chance: f64,
    pause_chance: f64,
    new_session_chance: f64,
    pause: Duration,
    think: Duration,
}

/// What a client saw. Everything under "violations" fails the run.
#[derive(Default)]
struct Tally {
    messages: u64,
    finished: u64,
    turn_errors: BTreeMap<String, u64>,
    session_errors: BTreeMap<String, u64>,
    reconnects: u64,
    pauses: u64,
    sessions: u64,
    /// Bytes of stream events received, each seq once.
    stored_bytes: u64,
    lost: u64,
    extra_answers: u64,
    seq_repeats: u64,
    seq_gaps: u64,
    problems: Vec<String>,
}

impl Tally {
    fn problem(&mut self, what: String) {
        if self.problems.len() < 20 {
            self.problems.push(what);
        }
    }

    fn add(&mut self, o: Tally) {
        self.messages += o.messages;
        self.finished += o.finished;
        for (k, v) in o.turn_errors {
            *self.turn_errors.entry(k).or_default() += v;
        }
        for (k, v) in o.session_errors {
            *self.session_errors.entry(k).or_default() += v;
        }
        self.reconnects += o.reconnects;
        self.pauses += o.pauses;
        self.sessions += o.sessions;
        self.stored_bytes += o.stored_bytes;
        self.lost += o.lost;
        self.extra_answers += o.extra_answers;
        self.seq_repeats += o.seq_repeats;
        self.seq_gaps += o.seq_gaps;
        for p in o.problems {
            self.problem(p);
        }
    }

    fn violations(&self) -> u64 {
        self.lost + self.extra_answers + self.seq_repeats + self.seq_gaps
    }
}

/// What one frame meant for the turn in flight.
enum Seen {
    Nothing,
    Answered,
    /// The gateway did not take the message (rate limit, store failure): send it again.
    NotTaken,
    /// The task did not start; messages stay queued for the next start.
    StartFailed,
}

/// One client and its session.
struct Worker {
    url: String,
    token: String,
    index: usize,
    conversation: String,
    session_id: Option<String>,
    last_seq: u64,
    ws: Option<Ws>,
    /// Messages sent and not answered yet, oldest first.
    outstanding: std::collections::VecDeque<String>,
    tally: Tally,
}

impl Worker {
    fn new(url: &str, token: &str, index: usize) -> Worker {
        let mut w = Worker {
            url: url.to_string(),
            token: token.to_string(),
            index,
            conversation: String::new(),
            session_id: None,
            last_seq: 0,
            ws: None,
            outstanding: Default::default(),
            tally: Tally::default(),
        };
        w.new_session();
        w
    }

    fn new_session(&mut self) {
        self.ws = None;
        self.session_id = None;
        self.last_seq = 0;
        self.tally.sessions += 1;
        self.conversation = format!("c-soak-{}-{}", self.index, self.tally.sessions);
    }

    async fn connect(&mut self) -> anyhow::Result<()> {
        let url = match &self.session_id {
            Some(id) => format!("{}?session_id={id}&last_seq={}", self.url, self.last_seq),
            None => self.url.clone(),
        };
        self.ws = Some(connect(&url, &self.token).await?);
        Ok(())
    }

    /// Take one turn: send a message and wait for its one terminal frame,
    /// reconnecting (and resending under the same id) as often as needed.
    /// When the task fails to start, the client sends a next message, as a
    /// user would (the failed one stays queued and runs with it); then both
    /// are awaited.
    async fn turn(&mut self, churn: Option<Churn>, timeout: Duration) {
        self.outstanding
            .push_back(uuid::Uuid::new_v4().simple().to_string());
        self.tally.messages += 1;
        let deadline = tokio::time::Instant::now() + timeout;
        // Messages of `outstanding` this connection has sent.
        let mut sent = 0;
        while !self.outstanding.is_empty() {
            if tokio::time::Instant::now() >= deadline {
                let sid = self.session_id.clone().unwrap_or_default();
                for id in self.outstanding.drain(..) {
                    self.tally.lost += 1;
                    let what =
                        format!("message {id} in session {sid}: no answer within {timeout:?}");
                    self.tally.problem(what);
                }
                self.ws = None;
                return;
            }
            if self.ws.is_none() {
                if self.connect().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                sent = 0;
            }
            if sent < self.outstanding.len() {
                let ws = self.ws.as_mut().expect("connected");
                let mut failed = false;
                for id in self.outstanding.iter().skip(sent) {
                    let msg = json!({"type": "message", "id": id, "conversation_id": self.conversation, "content": "soak"});
                    if ws
                        .send(Message::Text(msg.to_string().into()))
                        .await
                        .is_err()
                    {
                        failed = true;
                        break;
                    }
                }
                if failed {
                    self.ws = None;
                    continue;
                }
                sent = self.outstanding.len();
                if let Some(c) = churn
                    && chance(c.drop_chance)
                {
                    // Gone with the message in flight, somewhere in its turn.
                    tokio::time::sleep(Duration::from_micros(random_below(3000))).await;
                    self.ws = None;
                    self.tally.reconnects += 1;
                    continue;
                }
            }
            let ws = self.ws.as_mut().expect("connected");
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => match self.observe(&text) {
                    Seen::NotTaken => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        sent = 0;
                    }
                    Seen::StartFailed => {
                        self.outstanding
                            .push_back(uuid::Uuid::new_v4().simple().to_string());
                        self.tally.messages += 1;
                    }
                    Seen::Nothing | Seen::Answered => {}
                },
                Ok(Some(Ok(_))) => {}
                // Closed by the gateway: reconnect with last_seq, resend.
                Ok(_) => {
                    self.ws = None;
                    self.tally.reconnects += 1;
                }
                Err(_) => {}
            }
        }
    }

    fn observe(&mut self, text: &str) -> Seen {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            self.tally.problem(format!("not JSON: {text}"));
            return Seen::Nothing;
        };
        let kind = v["type"].as_str().unwrap_or("");
        if v["ephemeral"] == true {
            match kind {
                "session" => {
                    let sid = v["session_id"].as_str().unwrap_or_default().to_string();
                    let at = v["last_seq"].as_u64().unwrap_or(0);
                    if self.session_id.is_some() && at < self.last_seq {
                        self.tally.seq_gaps += 1;
                        self.tally.problem(format!(
                            "session {sid} came back at seq {at} but this client held {}",
                            self.last_seq
                        ));
                    }
                    self.session_id.get_or_insert(sid);
                }
                "error" => {
                    let code = v["error"]["code"].as_str().unwrap_or("?").to_string();
                    *self.tally.session_errors.entry(code.clone()).or_default() += 1;
                    if matches!(code.as_str(), "OVERLOADED" | "INTERNAL") {
                        return Seen::NotTaken;
                    }
                }
                _ => {}
            }
            return Seen::Nothing;
        }
        let seq = v["seq"].as_u64().unwrap_or(0);
        let sid = self.session_id.clone().unwrap_or_default();
        if seq <= self.last_seq {
            self.tally.seq_repeats += 1;
            self.tally.problem(format!(
                "session {sid}: seq {seq} again (held {})",
                self.last_seq
            ));
            return Seen::Nothing;
        }
        if seq != self.last_seq + 1 {
            self.tally.seq_gaps += 1;
            self.tally.problem(format!(
                "session {sid}: seq {seq} after {} (a gap)",
                self.last_seq
            ));
        }
        self.last_seq = seq;
        self.tally.stored_bytes += text.len() as u64;
        let mine = v["conversation_id"] == self.conversation.as_str();
        let terminal = kind == "finish" || (kind == "error" && mine);
        if kind == "error" && !mine {
            let code = v["error"]["code"].as_str().unwrap_or("?").to_string();
            let failed_start = matches!(
                code.as_str(),
                "TASK_START_FAILED" | "TASK_RESTART_FAILED" | "TASK_CONNECT_TIMEOUT"
            );
            *self.tally.session_errors.entry(code).or_default() += 1;
            if failed_start && !self.outstanding.is_empty() {
                return Seen::StartFailed;
            }
        }
        if !(terminal && mine) {
            return Seen::Nothing;
        }
        match self.outstanding.pop_front() {
            Some(_) if kind == "finish" => self.tally.finished += 1,
            Some(_) => {
                let code = v["error"]["code"].as_str().unwrap_or("?").to_string();
                *self.tally.turn_errors.entry(code).or_default() += 1;
            }
            None => {
                self.tally.extra_answers += 1;
                self.tally.problem(format!(
                    "session {sid}: a second answer at seq {seq}: {text}"
                ));
                return Seen::Nothing;
            }
        }
        Seen::Answered
    }

    /// Turns until `stop` (or `limit` turns), then disconnect.
    async fn run(
        mut self,
        churn: Option<Churn>,
        limit: Option<usize>,
        stop: Arc<AtomicBool>,
        timeout: Duration,
    ) -> Worker {
        let mut done = 0;
        while !stop.load(Ordering::Acquire) && limit.is_none_or(|l| done < l) {
            self.turn(churn, timeout).await;
            done += 1;
            let Some(c) = churn else { continue };
            if chance(c.new_session_chance) {
                self.new_session();
            } else if chance(c.pause_chance) {
                self.ws = None;
                self.tally.pauses += 1;
                tokio::time::sleep(c.pause).await;
            } else {
                let think = c.think.as_micros() as u64 * 2;
                tokio::time::sleep(Duration::from_micros(random_below(think))).await;
            }
        }
        self.ws = None;
        self
    }
}

fn chance(p: f64) -> bool {
    (random_below(1_000_000) as f64) < p * 1_000_000.0
}

/// The gateway at rest: what it holds when nothing is happening.
struct Rest {
    fds: usize,
    /// Of `fds`, the store's (bounded by its connection pool).
    database_fds: usize,
    rss_kib: u64,
    processes: BTreeMap<ProcessKind, usize>,
    tasks: u64,
    /// Why it did not come to rest in time (then measured as it was).
    unsettled: Option<String>,
}

/// Most descriptors the SQLite store holds: three files (database, WAL,
/// SHM) for each of its pool's 8 connections, the writer's and its
/// checkpointer's.
const DATABASE_FD_BOUND: usize = 3 * (8 + 2);

/// Wait until no session is in memory and the pool is full and settled,
/// then measure; after `limit`, measure anyway and say what was still busy.
async fn at_rest(gw: &SpawnedGateway, pool: usize, limit: Duration) -> Rest {
    let deadline = Instant::now() + limit;
    let mut last = Value::Null;
    let mut stable_since: Option<(Instant, BTreeMap<ProcessKind, usize>)> = None;
    let measure = |h: &Value, unsettled| Rest {
        fds: system::fd_count(gw.pid()).unwrap_or(0),
        database_fds: system::database_fd_count(gw.pid()).unwrap_or(0),
        rss_kib: system::rss_kib(gw.pid()).unwrap_or(0),
        processes: system::count_by_kind(gw.pid()),
        tasks: h["tasks"].as_u64().unwrap_or(0),
        unsettled,
    };
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(h) = http_json("127.0.0.1", gw.port, "GET", "/health", None, None).await else {
            continue;
        };
        last = h;
        let p = &last["pool"];
        let quiet = last["sessions_live"] == 0
            && p["launching"] == 0
            && p["ready"].as_u64()
                == Some(pool.min(p["max"].as_u64().unwrap_or(0) as usize) as u64);
        if !quiet {
            stable_since = None;
            continue;
        }
        // Stopped tasks' processes take a moment to exit: the same
        // process counts for a second.
        let counts = system::count_by_kind(gw.pid());
        match &stable_since {
            Some((since, c)) if *c == counts => {
                if since.elapsed() >= Duration::from_secs(1) {
                    return measure(&last, None);
                }
            }
            _ => stable_since = Some((Instant::now(), counts)),
        }
    }
    let cpu = super::cpu_ns(gw.pid());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy = match (cpu, super::cpu_ns(gw.pid())) {
        (Some(a), Some(b)) => format!(
            "; with nothing to do it used {} ms of CPU in the last second",
            b.saturating_sub(a) / 1_000_000
        ),
        _ => String::new(),
    };
    let why = format!(
        "not at rest within {limit:?}: {} sessions still in memory, pool {}{busy}",
        last["sessions_live"], last["pool"]
    );
    measure(&last, Some(why))
}

/// Processes that hold this gateway's runner address but are not under it.
fn orphans(gw: &SpawnedGateway) -> Vec<u32> {
    let tree: Vec<u32> = system::process_tree(gw.pid())
        .iter()
        .map(|p| p.pid)
        .collect();
    let port = format!(":{}", gw.port);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !tree.contains(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0).any(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    kv.strip_prefix("AISHELL_GATEWAY_URL=")
                        .is_some_and(|url| url.contains(&port))
                })
            })
        })
        .collect()
}

/// Sizes of the database's files: the database, its write-ahead log.
fn db_bytes(dir: &std::path::Path) -> (u64, u64) {
    let size = |f: &str| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len());
    (
        size("aishell.db"),
        size("aishell.db-wal") + size("aishell.db-shm"),
    )
}

pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    let s = args.sessions.max(1);
    let (before_limit, limit) = system::raise_nofile(4096);
    let room = (s * 2 + args.pool + 64).to_string();
    let secs = |d: Duration| format!("{}ms", d.as_millis());
    let settings = [
        ("--agent", "echo".to_string()),
        ("--session-idle-timeout", secs(args.idle_timeout)),
        // Sessions with no task and no client leave memory soon, so the rest
        // state after the churn is comparable with the one before it.
        ("--session-evict-after", "2s".to_string()),
        // A full replay ring after warm-up: growth later is not ring filling.
        ("--replay-buffer", "32".to_string()),
        ("--warm-pool-target-size", args.pool.to_string()),
        ("--warm-pool-max-size", (args.pool + 2).to_string()),
        ("--max-tasks-per-user", room.clone()),
        ("--max-warm-claims-per-user", room.clone()),
        ("--max-connections-per-user", room),
        ("--messages-per-second", "100000".to_string()),
    ];
    let mut gw = SpawnedGateway::start_with(&settings, &args.spawn_args)?;
    let timeout = Duration::from_secs(args.timeout);
    let rest_limit = args.idle_timeout + Duration::from_secs(60);
    let started = Instant::now();

    // Warm-up: every session takes its turns, no churn.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers: Vec<Worker> = (0..s).map(|i| Worker::new(&gw.url, &gw.token, i)).collect();
    let tasks: Vec<_> = workers
        .drain(..)
        .map(|w| tokio::spawn(w.run(None, Some(args.warmup_turns), stop.clone(), timeout)))
        .collect();
    for t in tasks {
        workers.push(t.await?);
    }
    let before = at_rest(&gw, args.pool, rest_limit).await;

    // Churn.
    let churn = Churn {
        drop_chance: args.drop_chance,
        pause_chance: args.pause_chance,
        new_session_chance: args.new_session_chance,
        pause: args.idle_timeout * 2 + Duration::from_millis(500),
        think: args.think,
    };
    let kills = Arc::new(AtomicU64::new(0));
    let drains = Arc::new(AtomicU64::new(0));
    let killer = tokio::spawn(kill_agents(
        gw.pid(),
        args.kill_every,
        stop.clone(),
        kills.clone(),
    ));
    let drainer = tokio::spawn(drain_pool(
        gw.port,
        gw.token.clone(),
        args.pool,
        args.drain_every,
        stop.clone(),
        drains.clone(),
    ));
    let tasks: Vec<_> = workers
        .drain(..)
        .map(|w| tokio::spawn(w.run(Some(churn), None, stop.clone(), timeout)))
        .collect();
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Release);
    for t in tasks {
        workers.push(t.await?);
    }
    killer.await?;
    drainer.await?;
    // Whatever the drainer last did, the pool goes back to its size.
    let resize = json!({"action": "resize", "target": args.pool});
    http_json(
        "127.0.0.1",
        gw.port,
        "POST",
        "/api/admin/pool",
        Some(&gw.token),
        Some(&resize),
    )
    .await;

    let after = at_rest(&gw, args.pool, rest_limit).await;
    let orphaned = orphans(&gw);
    let (db_main, db_wal) = db_bytes(&gw.data_dir);
    let db = db_main + db_wal;
    let mut tally = Tally::default();
    for w in workers {
        tally.add(w.tally);
    }

    let mut leaks = Vec::new();
    if let Some(why) = &before.unsettled {
        leaks.push(format!("after the warm-up, {why}"));
    }
    if let Some(why) = &after.unsettled {
        leaks.push(format!("after the churn, {why}"));
    }
    for (kind, n) in &after.processes {
        let was = before.processes.get(kind).copied().unwrap_or(0);
        if *n > was {
            let pids = system::pids_of(gw.pid(), *kind);
            leaks.push(format!(
                "{} {} process(es) beyond the {was} at rest before: {pids:?}",
                n - was,
                kind.as_str()
            ));
        }
    }
    if after.tasks > before.tasks {
        leaks.push(format!(
            "{} tasks held at rest, {} before",
            after.tasks, before.tasks
        ));
    }
    // The store's pool opens connections as reads overlap and keeps them
    // (bounded): its files are judged against that bound, the rest by growth.
    let (other_before, other_after) = (
        before.fds - before.database_fds,
        after.fds - after.database_fds,
    );
    if other_after as f64 > other_before as f64 * 1.1 {
        leaks.push(format!(
            "gateway descriptors other than the database's {other_before} → {other_after}"
        ));
    }
    if after.database_fds > DATABASE_FD_BOUND {
        leaks.push(format!(
            "{} descriptors of the database open, over the pool's bound of {DATABASE_FD_BOUND}",
            after.database_fds
        ));
    }
    if after.rss_kib as f64 > before.rss_kib as f64 * (1.0 + args.max_rss_growth_percent / 100.0) {
        leaks.push(format!(
            "gateway RSS {} → {} KiB (over {} %)",
            before.rss_kib, after.rss_kib, args.max_rss_growth_percent
        ));
    }
    if !orphaned.is_empty() {
        leaks.push(format!(
            "processes of this gateway outside its tree: {orphaned:?}"
        ));
    }
    // The store keeps every event, message and conversation, indexed; more
    // than 10 bytes on disk per byte of events (beyond a fixed 16 MiB for the
    // schema and tokens) means it keeps something it should not.
    let db_limit = tally.stored_bytes * 10 + (16 << 20);
    if db_main > db_limit {
        leaks.push(format!(
            "database {db_main} bytes for {} bytes of events (limit {db_limit})",
            tally.stored_bytes
        ));
    }
    // SQLite checkpoints the log every 1000 pages (4 MiB); a log far past
    // that at rest means checkpoints fell behind and the file never shrank.
    if db_wal > WAL_LIMIT {
        leaks.push(format!(
            "write-ahead log {db_wal} bytes at rest (limit {WAL_LIMIT}): checkpoints fell behind the writes"
        ));
    }
    let rest = |r: &Rest| {
        let procs: serde_json::Map<String, Value> = r
            .processes
            .iter()
            .map(|(k, n)| (k.as_str().to_string(), json!(n)))
            .collect();
        json!({ "fds": r.fds, "database_fds": r.database_fds, "rss_mib": (r.rss_kib as f64 / 1024.0 * 10.0).round() / 10.0, "processes": procs, "tasks": r.tasks, "unsettled": r.unsettled })
    };
    let ok = tally.violations() == 0 && leaks.is_empty();
    let report = json!({
        "mode": "soak",
        "provenance": provenance(),
        "nofile_limit": { "before": before_limit, "after": limit },
        "churn_seconds": args.duration.as_secs_f64(),
        "total_seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "clients": s,
        "turns": {
            "messages": tally.messages,
            "finished": tally.finished,
            "ended_by_error": tally.turn_errors,
            "lost": tally.lost,
            "answered_twice": tally.extra_answers,
        },
        "seq": { "repeated": tally.seq_repeats, "gaps": tally.seq_gaps },
        "churn": {
            "sessions": tally.sessions,
            "reconnects": tally.reconnects,
            "pauses_past_idle_timeout": tally.pauses,
            "agents_killed": kills.load(Ordering::Relaxed),
            "pool_drains": drains.load(Ordering::Relaxed),
            "session_errors": tally.session_errors,
        },
        "at_rest": { "after_warmup": rest(&before), "after_churn": rest(&after) },
        "database": { "bytes": db, "wal_bytes": db_wal, "event_bytes": tally.stored_bytes, "kept_at": args.keep_data.then(|| gw.data_dir.display().to_string()) },
        "problems": tally.problems,
        "leaks": leaks,
        "ok": ok,
    });
    if args.keep_data {
        gw.keep_data_dir();
    }
    drop(gw);
    if args.format == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if !ok {
        bail!("the soak found lost turns or leaks (above)");
    }
    Ok(())
}

/// SIGKILL a random agent under the gateway every `every` on average.
async fn kill_agents(gateway: u32, every: Duration, stop: Arc<AtomicBool>, kills: Arc<AtomicU64>) {
    loop {
        let wait = random_below(every.as_millis() as u64 * 2);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if stop.load(Ordering::Acquire) {
            return;
        }
        let agents = system::pids_of(gateway, ProcessKind::Agent);
        if agents.is_empty() {
            continue;
        }
        let pid = agents[random_below(agents.len() as u64) as usize];
        let target = nix::unistd::Pid::from_raw(pid as i32);
        if nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL).is_ok() {
            kills.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Drain the warm pool every `every` on average; refill it a third of that later.
async fn drain_pool(
    port: u16,
    token: String,
    pool: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
    drains: Arc<AtomicU64>,
) {
    let post = |action: Value| {
        let token = token.clone();
        async move {
            http_json(
                "127.0.0.1",
                port,
                "POST",
                "/api/admin/pool",
                Some(&token),
                Some(&action),
            )
            .await
        }
    };
    loop {
        let wait = random_below(every.as_millis() as u64 * 2);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if stop.load(Ordering::Acquire) {
            return;
        }
        if post(json!({"action": "drain"})).await.is_some() {
            drains.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(every / 3).await;
        post(json!({"action": "resize", "target": pool})).await;
    }
}

fn print_report(r: &Value) {
    println!("aishell bench soak — churn, then what was lost or leaked");
    print_provenance(&r["provenance"]);
    println!();
    let t = &r["turns"];
    println!(
        "{} clients, {} s of churn ({} s in all): {} messages, {} finished, ended by error {}, {} lost, {} answered twice",
        r["clients"],
        r["churn_seconds"],
        r["total_seconds"],
        t["messages"],
        t["finished"],
        t["ended_by_error"],
        t["lost"],
        t["answered_twice"]
    );
    println!(
        "seq: {} repeated, {} gaps",
        r["seq"]["repeated"], r["seq"]["gaps"]
    );
    let c = &r["churn"];
    println!(
        "churn: {} sessions, {} reconnects, {} pauses past the idle timeout, {} agents killed, {} pool drains; session errors {}",
        c["sessions"],
        c["reconnects"],
        c["pauses_past_idle_timeout"],
        c["agents_killed"],
        c["pool_drains"],
        c["session_errors"]
    );
    let a = &r["at_rest"];
    for (when, rest) in [
        ("warm-up", &a["after_warmup"]),
        ("churn", &a["after_churn"]),
    ] {
        println!(
            "gateway at rest after {when}: {} descriptors, {} MiB RSS, processes {}",
            rest["fds"], rest["rss_mib"], rest["processes"]
        );
    }
    let db = &r["database"];
    println!(
        "database: {} bytes ({} of them write-ahead log) for {} bytes of events received",
        db["bytes"], db["wal_bytes"], db["event_bytes"]
    );
    if let Some(dir) = db["kept_at"].as_str() {
        println!("data directory kept at {dir}");
    }
    for p in r["problems"].as_array().into_iter().flatten() {
        println!("problem: {}", p.as_str().unwrap_or_default());
    }
    for l in r["leaks"].as_array().into_iter().flatten() {
        println!("LEAK: {}", l.as_str().unwrap_or_default());
    }
    println!(
        "{}",
        if r["ok"] == true {
            "OK: nothing lost, nothing leaked"
        } else {
            "FAILED"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, kind: &str, conversation: &str) -> String {
        json!({"seq": seq, "session_id": "s-1", "type": kind, "conversation_id": conversation, "token_usage": {}})
            .to_string()
    }

    #[test]
    fn a_repeated_seq_a_gap_and_a_second_answer_are_each_caught() {
        let mut w = Worker::new("ws://127.0.0.1:1/ws", "t", 0);
        let conv = w.conversation.clone();
        let session = json!({"seq": 0, "session_id": "s-1", "ephemeral": true, "type": "session", "last_seq": 0});
        assert!(matches!(w.observe(&session.to_string()), Seen::Nothing));
        w.outstanding.push_back("m1".into());
        assert!(matches!(
            w.observe(&frame(1, "text_delta", &conv)),
            Seen::Nothing
        ));
        assert!(matches!(
            w.observe(&frame(2, "finish", &conv)),
            Seen::Answered
        ));
        assert_eq!((w.tally.finished, w.tally.violations()), (1, 0));
        // The same event again (a replay from too early).
        w.observe(&frame(2, "finish", &conv));
        assert_eq!(w.tally.seq_repeats, 1);
        // A skipped seq.
        w.observe(&frame(4, "text_delta", &conv));
        assert_eq!(w.tally.seq_gaps, 1);
        // An answer with no message outstanding.
        w.observe(&frame(5, "finish", &conv));
        assert_eq!(w.tally.extra_answers, 1);
        // Another conversation's finish answers nothing of ours.
        w.outstanding.push_back("m2".into());
        assert!(matches!(
            w.observe(&frame(6, "finish", "c-other")),
            Seen::Nothing
        ));
        let error = json!({"seq": 7, "session_id": "s-1", "type": "error", "conversation_id": conv, "error": {"code": "AGENT_CRASHED", "message": "x"}});
        assert!(matches!(w.observe(&error.to_string()), Seen::Answered));
        assert_eq!(w.tally.turn_errors["AGENT_CRASHED"], 1);
        assert_eq!(w.tally.violations(), 3);
        // A rate-limited message is sent again.
        let refused = json!({"seq": 7, "session_id": "s-1", "ephemeral": true, "type": "error", "error": {"code": "OVERLOADED", "message": "x"}});
        assert!(matches!(w.observe(&refused.to_string()), Seen::NotTaken));
        // A failed start with a message waiting asks for the next message.
        w.outstanding.push_back("m3".into());
        let failed = json!({"seq": 8, "session_id": "s-1", "type": "error", "error": {"code": "TASK_START_FAILED", "message": "x"}});
        assert!(matches!(w.observe(&failed.to_string()), Seen::StartFailed));
    }
}
