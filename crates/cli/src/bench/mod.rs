//! `aishell bench`: end-to-end latency from the client's side.
//!
//! For each concurrency level N, opens N connections at once, each on a fresh
//! session, and measures connect → `session` frame and message sent → first
//! agent event (`text_delta`, `content`, `tool_call`, `thinking`, `finish`,
//! `error`), split by where the task came from (`status.source`: warm/cold).
//! Then echo round-trips (sent → `finish`) on established sessions, and the
//! gateway's RSS. With the gateway's pid (spawned, or `--gateway-pid`), also
//! the gateway's CPU time during the bursts per new session: a steadier
//! figure than latency on a noisy machine for comparing two builds.
//! Figures are printed, never asserted.
//!
//! JSON (`--format json`): `{ "levels": [ { "concurrency", "rounds",
//! "warm"|"cold": { "n", "failures", "connect_ms": {p50,p90,p99,max},
//! "first_event_ms": {p50,p90,p99,max} }, "gateway_cpu_ms_per_session" } ],
//! "roundtrip": { "n",
//! "per_second", "p50_ms", "p99_ms" }, "gateway_rss_mib", "gateway_hwm_mib",
//! "first_error" }`.
//!
//! The scale modes (`aishell bench idle|live|soak`) live in their own
//! modules: [`idle`], [`live`], [`soak`]; `aishell bench cluster` (several
//! gateways on PostgreSQL behind HAProxy against one on SQLite) in
//! `cluster` (binaries built with `--features postgres`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[cfg(feature = "postgres")]
mod cluster;
mod idle;
mod live;
mod soak;
mod system;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    mode: Option<ScaleMode>,
    /// Gateway WebSocket URL; without it a local gateway is started (`--spawn`).
    #[arg(long)]
    url: Option<String>,
    /// Token for --url.
    #[arg(long, env = "AISHELL_TOKEN")]
    token: Option<String>,
    /// Concurrent new sessions per level.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    concurrency: Vec<usize>,
    /// Repetitions of each level (samples are pooled).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Echo round-trips on established sessions.
    #[arg(long, default_value_t = 500)]
    echo_roundtrips: usize,
    /// Extra `serve` arguments for the spawned gateway (e.g. --spawn-arg=--enable-warm-pool=false).
    #[arg(long = "spawn-arg", allow_hyphen_values = true)]
    spawn_args: Vec<String>,
    /// Pid of the gateway, for RSS when using --url on this machine.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Per-turn timeout in seconds (a sample past it counts as failed).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// table or json.
    #[arg(long, default_value = "table")]
    format: String,
}

/// One-machine scale runs; without one, `bench` measures warm/cold starts.
#[derive(Subcommand)]
enum ScaleMode {
    /// N idle client connections: memory per connection, ping latency across them.
    Idle(idle::IdleArgs),
    /// N live sessions: round trip quiet and under load, memory per session.
    Live(live::LiveArgs),
    /// Bounded churn; exits non-zero if a turn was lost or anything leaked.
    Soak(soak::SoakArgs),
    /// Several gateways on one PostgreSQL behind HAProxy against one
    /// gateway on SQLite: warm first-event latency and CPU per session.
    #[cfg(feature = "postgres")]
    Cluster(cluster::ClusterArgs),
    /// Several gateways on one PostgreSQL behind HAProxy (this binary was
    /// built without `--features postgres`, so it cannot run this).
    #[cfg(not(feature = "postgres"))]
    Cluster(NoPostgres),
}

/// Whatever `bench cluster` was given, in a binary that cannot run it.
#[cfg(not(feature = "postgres"))]
#[derive(Args)]
struct NoPostgres {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _args: Vec<String>,
}

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One new-session sample.
pub(crate) struct Sample {
    source: String,
    connect_ms: f64,
    first_event_ms: Option<f64>,
    error: Option<String>,
    /// From the `session` frame, so the session can be stopped afterwards.
    session_id: Option<String>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.mode {
        Some(ScaleMode::Idle(a)) => return idle::run(a).await,
        Some(ScaleMode::Live(a)) => return live::run(a).await,
        Some(ScaleMode::Soak(a)) => return soak::run(a).await,
        #[cfg(feature = "postgres")]
        Some(ScaleMode::Cluster(a)) => return cluster::run(a).await,
        #[cfg(not(feature = "postgres"))]
        Some(ScaleMode::Cluster(_)) => bail!(
            "BENCH_NEEDS_POSTGRES: `aishell bench cluster` runs gateways on PostgreSQL, and this aishell was built without it; build it with `cargo build --release -p aishell --features postgres`."
        ),
        None => {}
    }
    let mut spawned = None;
    let (url, token, pid) = match (&args.url, &args.token) {
        (Some(url), Some(token)) => (url.clone(), token.clone(), args.gateway_pid),
        (Some(_), None) => bail!("--url needs --token"),
        _ => {
            let gw = SpawnedGateway::start(&args.spawn_args)?;
            let info = (gw.url.clone(), gw.token.clone(), Some(gw.pid()));
            spawned = Some(gw);
            info
        }
    };
    let timeout = Duration::from_secs(args.timeout);
    let mut levels = Vec::new();
    let mut first_error: Option<String> = None;
    for &n in &args.concurrency {
        let mut samples = Vec::new();
        let mut burst_cpu_ns = Some(0u64);
        for _ in 0..args.rounds {
            // Let the pool refill between rounds, as between bursts of users.
            wait_for_pool(&url, n).await;
            let cpu_before = pid.and_then(cpu_ns);
            perf_control("enable");
            for s in burst(&url, &token, n, timeout).await? {
                if first_error.is_none() {
                    first_error.clone_from(&s.error);
                }
                samples.push(s);
            }
            perf_control("disable");
            burst_cpu_ns = match (burst_cpu_ns, cpu_before, pid.and_then(cpu_ns)) {
                (Some(total), Some(before), Some(after)) => {
                    Some(total + after.saturating_sub(before))
                }
                _ => None,
            };
        }
        let mut level = level_json(n, args.rounds, &samples);
        level["gateway_cpu_ms_per_session"] = json!(burst_cpu_ns.map(|ns| {
            let per = ns as f64 / 1e6 / samples.len().max(1) as f64;
            (per * 100.0).round() / 100.0
        }));
        levels.push(level);
    }
    let roundtrip = echo_roundtrips(
        &url,
        &token,
        args.echo_roundtrips,
        args.concurrency
            .iter()
            .copied()
            .max()
            .unwrap_or(1)
            .clamp(1, 10),
        timeout,
    )
    .await?;
    let (rss, hwm) = pid.map(rss_mib).unwrap_or((None, None));
    let report = json!({
        "levels": levels,
        "roundtrip": roundtrip,
        "gateway_rss_mib": rss,
        "gateway_hwm_mib": hwm,
        "first_error": first_error,
    });
    drop(spawned);
    if args.format == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// `n` new sessions at once, each sending one message; their samples.
pub(crate) async fn burst(
    url: &str,
    token: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Sample>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(new_session(url.to_string(), token.to_string(), timeout)))
        .collect();
    let mut samples = Vec::with_capacity(n);
    for t in tasks {
        samples.push(t.await.context("bench task panicked")?);
    }
    Ok(samples)
}

/// Connect on a fresh session, send one message, time it.
async fn new_session(url: String, token: String, timeout: Duration) -> Sample {
    let started = Instant::now();
    let mut sample = Sample {
        source: "unknown".into(),
        connect_ms: 0.0,
        first_event_ms: None,
        error: None,
        session_id: None,
    };
    let mut ws = match connect(&url, &token).await {
        Ok(ws) => ws,
        Err(e) => {
            sample.error = Some(format!("connect: {e}"));
            return sample;
        }
    };
    match next_json(&mut ws, timeout).await {
        Some(v) if v["type"] == "session" => {
            sample.connect_ms = ms(started.elapsed());
            sample.session_id = v["session_id"].as_str().map(str::to_string);
        }
        other => {
            sample.error = Some(format!("expected session frame, got {other:?}"));
            return sample;
        }
    }
    let msg = json!({"type": "message", "id": uuid::Uuid::new_v4().simple().to_string(), "content": "bench"});
    let sent = Instant::now();
    if ws
        .send(Message::Text(msg.to_string().into()))
        .await
        .is_err()
    {
        sample.error = Some("send failed".into());
        return sample;
    }
    loop {
        let Some(v) = next_json(&mut ws, timeout).await else {
            sample.error = Some("no reply before the timeout".into());
            break;
        };
        match v["type"].as_str().unwrap_or("") {
            "status" => {
                if let Some(src) = v["source"].as_str() {
                    sample.source = src.to_string();
                }
            }
            "error" => {
                sample.error = Some(format!(
                    "{}: {}",
                    v["error"]["code"].as_str().unwrap_or("?"),
                    v["error"]["message"].as_str().unwrap_or("")
                ));
                break;
            }
            "text_delta" | "content" | "tool_call" | "thinking" | "finish" => {
                sample.first_event_ms.get_or_insert(ms(sent.elapsed()));
                if v["type"] == "finish" {
                    break;
                }
            }
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    sample
}

/// Sequential echo round-trips over `sessions` established sessions.
async fn echo_roundtrips(
    url: &str,
    token: &str,
    total: usize,
    sessions: usize,
    timeout: Duration,
) -> anyhow::Result<Value> {
    if total == 0 {
        return Ok(Value::Null);
    }
    // Warm each session up first so only established round-trips are timed.
    let mut conns = Vec::new();
    for _ in 0..sessions {
        let mut ws = connect(url, token).await?;
        next_json(&mut ws, timeout).await;
        turn(&mut ws, timeout).await.context("warm-up turn")?;
        conns.push(ws);
    }
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            // Split `total` exactly: the first `total % sessions` do one more.
            let per = total / sessions + usize::from(i < total % sessions);
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(per);
                for _ in 0..per {
                    let t = Instant::now();
                    if turn(&mut ws, timeout).await.is_err() {
                        break;
                    }
                    times.push(ms(t.elapsed()));
                }
                times
            })
        })
        .collect();
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = times.len();
    let p = percentiles(&mut times);
    Ok(
        json!({ "n": n, "sessions": sessions, "per_second": n as f64 / elapsed, "p50_ms": p["p50"], "p99_ms": p["p99"] }),
    )
}

/// Wait (up to 60 s) until the gateway's warm pool is as full as it will get
/// for a burst of `n`: `min(n, target)` ready and nothing launching.
pub(crate) async fn wait_for_pool(ws_url: &str, n: usize) {
    let Ok(url) = url::Url::parse(ws_url) else {
        return;
    };
    let (Some(host), Some(port)) = (
        url.host_str().map(str::to_string),
        url.port_or_known_default(),
    ) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let pool = health(&host, port)
            .await
            .map(|h| h["pool"].clone())
            .unwrap_or(Value::Null);
        let enabled = pool["enabled"].as_bool().unwrap_or(false);
        let target = pool["target"].as_u64().unwrap_or(0) as usize;
        let ready = pool["ready"].as_u64().unwrap_or(0) as usize;
        let launching = pool["launching"].as_u64().unwrap_or(0);
        if !enabled || (ready >= n.min(target) && launching == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the machine settle after the refill.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

pub(crate) async fn health(host: &str, port: u16) -> Option<Value> {
    http_json(host, port, "GET", "/health", None, None).await
}

/// One plain HTTP/1.0 request; the JSON body of the answer, if any.
pub(crate) async fn http_json(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Option<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let body = body.map_or(String::new(), Value::to_string);
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(format!("{head}{body}").as_bytes()).await.ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.ok()?;
    serde_json::from_str(raw.split_once("\r\n\r\n")?.1).ok()
}

pub(crate) async fn turn(ws: &mut Ws, timeout: Duration) -> anyhow::Result<()> {
    let msg = json!({"type": "message", "id": uuid::Uuid::new_v4().simple().to_string(), "content": "ping"});
    ws.send(Message::Text(msg.to_string().into())).await?;
    loop {
        let v = next_json(ws, timeout).await.context("no reply")?;
        match v["type"].as_str() {
            Some("finish") => return Ok(()),
            Some("error") => bail!("{v}"),
            _ => {}
        }
    }
}

pub(crate) async fn connect(url: &str, token: &str) -> anyhow::Result<Ws> {
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(
        tokio_tungstenite::connect_async_with_config(req, Some(crate::chat::ws_config()), true)
            .await?
            .0,
    )
}

pub(crate) async fn next_json(ws: &mut Ws, timeout: Duration) -> Option<Value> {
    loop {
        match tokio::time::timeout(timeout, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).ok(),
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => return None,
            Ok(Some(Ok(_))) => {}
        }
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentiles of a sample.
pub(crate) fn percentiles(v: &mut [f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    let r = |x: f64| (x * 10.0).round() / 10.0;
    json!({ "p50": r(at(0.50)), "p90": r(at(0.90)), "p99": r(at(0.99)), "max": r(v[v.len() - 1]) })
}

pub(crate) fn level_json(n: usize, rounds: usize, samples: &[Sample]) -> Value {
    let mut by_source: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        by_source.entry(s.source.as_str()).or_default().push(s);
    }
    let mut out = serde_json::Map::new();
    out.insert("concurrency".into(), json!(n));
    out.insert("rounds".into(), json!(rounds));
    for (source, group) in by_source {
        let failures = group.iter().filter(|s| s.error.is_some()).count();
        let mut connect: Vec<f64> = group
            .iter()
            .filter(|s| s.error.is_none())
            .map(|s| s.connect_ms)
            .collect();
        let mut first: Vec<f64> = group
            .iter()
            .filter_map(|s| s.first_event_ms.filter(|_| s.error.is_none()))
            .collect();
        out.insert(
            source.to_string(),
            json!({ "n": group.len(), "failures": failures, "connect_ms": percentiles(&mut connect), "first_event_ms": percentiles(&mut first) }),
        );
    }
    Value::Object(out)
}

fn print_table(r: &Value) {
    println!("aishell bench — client-side, end to end");
    println!();
    println!(
        "{:>5} {:>7} {:>5} {:>5} | {:>38} | {:>38}",
        "conc",
        "source",
        "n",
        "fail",
        "connect→session ms p50/p90/p99/max",
        "message→first event ms p50/p90/p99/max"
    );
    let cell = |v: &Value| -> String {
        if v.is_null() {
            return "-".into();
        }
        format!("{}/{}/{}/{}", v["p50"], v["p90"], v["p99"], v["max"])
    };
    let mut cpu_lines = Vec::new();
    for level in r["levels"].as_array().into_iter().flatten() {
        if let Some(ms) = level["gateway_cpu_ms_per_session"].as_f64() {
            cpu_lines.push(format!("{} concurrent: {ms} ms", level["concurrency"]));
        }
        for source in ["warm", "cold", "unknown"] {
            let g = &level[source];
            if g.is_null() {
                continue;
            }
            // `Value`'s Display ignores widths: pad strings.
            println!(
                "{:>5} {:>7} {:>5} {:>5} | {:>38} | {:>38}",
                level["concurrency"].to_string(),
                source,
                g["n"].to_string(),
                g["failures"].to_string(),
                cell(&g["connect_ms"]),
                cell(&g["first_event_ms"])
            );
        }
    }
    if !cpu_lines.is_empty() {
        println!();
        println!(
            "gateway CPU during the bursts, per new session: {}",
            cpu_lines.join(", ")
        );
    }
    let rt = &r["roundtrip"];
    if !rt.is_null() {
        println!();
        println!(
            "echo round-trips on {} established sessions: {} in total, {:.0}/s, p50 {} ms, p99 {} ms",
            rt["sessions"],
            rt["n"],
            rt["per_second"].as_f64().unwrap_or(0.0),
            rt["p50_ms"],
            rt["p99_ms"]
        );
    }
    if !r["gateway_rss_mib"].is_null() {
        println!(
            "gateway RSS: {} MiB (peak {} MiB)",
            r["gateway_rss_mib"], r["gateway_hwm_mib"]
        );
    }
    if let Some(e) = r["first_error"].as_str() {
        println!("first error: {e}");
    }
}

/// CPU time (ns) process `pid` has used so far, summed over its live
/// threads (`/proc/<pid>/task/*/schedstat`); None where unreadable.
pub(crate) fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    let mut counted = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        // A thread that exited since the listing is skipped, not an error.
        let Ok(stat) = std::fs::read_to_string(task.ok()?.path().join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
        counted += 1;
    }
    (counted > 0).then_some(total)
}

pub(crate) fn rss_mib(pid: u32) -> (Option<f64>, Option<f64>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| (kib / 1024.0 * 10.0).round() / 10.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Profile only the bursts: with `AISHELL_BENCH_PERF_CTL` naming the control
/// fifo of `perf record -D -1 --control=fifo:...`, recording is switched on
/// as each round's sessions start and off when the last has its answer.
fn perf_control(command: &str) {
    if let Some(fifo) = std::env::var_os("AISHELL_BENCH_PERF_CTL")
        && let Err(e) = std::fs::write(&fifo, format!("{command}\n"))
    {
        eprintln!("AISHELL_BENCH_PERF_CTL: {e}");
    }
}

fn show_startup_warning(log_line: &str) {
    let Ok(v) = serde_json::from_str::<Value>(log_line) else {
        return;
    };
    if matches!(v["level"].as_str(), Some("warn" | "error")) {
        eprintln!(
            "gateway warning: {} ({})",
            v["message"].as_str().unwrap_or_default(),
            v["event"].as_str().unwrap_or_default()
        );
    }
}

/// A gateway started for the benchmark on a free loopback port.
pub(crate) struct SpawnedGateway {
    child: Child,
    pub url: String,
    pub token: String,
    pub port: u16,
    pub data_dir: std::path::PathBuf,
    keep_data_dir: bool,
}

/// Limits the warm/cold bench lifts so that only the gateway's work is measured.
const BENCH_SETTINGS: &[(&str, &str)] = &[
    ("--agent", "echo"),
    ("--max-tasks-per-user", "1000"),
    ("--max-warm-claims-per-user", "1000"),
    ("--max-connections-per-user", "10000"),
    ("--messages-per-second", "100000"),
];

impl SpawnedGateway {
    fn start(extra: &[String]) -> anyhow::Result<Self> {
        let settings: Vec<(&str, String)> = BENCH_SETTINGS
            .iter()
            .map(|(k, v)| (*k, v.to_string()))
            .collect();
        Self::start_with(&settings, extra)
    }

    /// Start `serve` with `settings`, except those `extra` (the user's
    /// `--spawn-arg`s) sets itself, then `extra`.
    pub(crate) fn start_with(
        settings: &[(&str, String)],
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("aishell-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self::start_in(0, dir, &[], settings, extra)
    }

    /// As [`Self::start_with`], on `port` (0: any), with data directory
    /// `dir`, and `env` set (`None`: removed) in the gateway's environment.
    pub(crate) fn start_in(
        port: u16,
        dir: std::path::PathBuf,
        env: &[(&str, Option<String>)],
        settings: &[(&str, String)],
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let overridden = |flag: &str| {
            extra
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        let mut cmd = Command::new(exe);
        cmd.args(["serve", "--port", &port.to_string()]);
        for (name, value) in env {
            match value {
                Some(v) => cmd.env(name, v),
                None => cmd.env_remove(name),
            };
        }
        // SAFETY: prctl only, between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            // A bench killed before its cleanup takes its gateway with it.
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        for (flag, value) in settings.iter().filter(|(f, _)| !overridden(f)) {
            cmd.arg(flag).arg(value);
        }
        let mut child = cmd
            .arg("--data-dir")
            .arg(&dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start a gateway for the benchmark")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining so the gateway never blocks on a full pipe.
            let mut ready = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("aishell is ready:") {
                    ready = true;
                    let _ = tx.send(line);
                } else if !ready {
                    // Start-up warnings change what is measured (no
                    // bubblewrap: agents unconfined, none pre-started).
                    show_startup_warning(&line);
                }
            }
        });
        let banner = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(banner) => banner,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&dir);
                bail!("the spawned gateway did not start");
            }
        };
        let url = banner.split_whitespace().nth(3).context("banner")?;
        let (http, token) = url.split_once("/?token=").context("banner token")?;
        let port = http
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .context("banner port")?;
        let ws = format!("{}/ws", http.replacen("http://", "ws://", 1));
        let gw = SpawnedGateway {
            child,
            url: ws,
            token: token.to_string(),
            port,
            data_dir: dir,
            keep_data_dir: false,
        };
        Ok(gw)
    }

    /// Leave the data directory behind when the gateway stops.
    pub(crate) fn keep_data_dir(&mut self) {
        self.keep_data_dir = true;
    }

    fn remove_data_dir(&self) {
        if !self.keep_data_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SpawnedGateway {
    fn drop(&mut self) {
        // SIGTERM stops its sandboxes; then make sure it is gone.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.remove_data_dir();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.remove_data_dir();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's CPU time, ns.
    fn thread_cpu_ns() -> u64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec for the call to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    }

    #[test]
    fn a_process_cpu_time_grows_by_the_work_it_does() {
        let me = std::process::id();
        let before = cpu_ns(me).expect("schedstat readable here");
        // Spin until this thread has used 20 ms of CPU, however loaded the
        // machine is.
        let start = thread_cpu_ns();
        let mut x = 0u64;
        while thread_cpu_ns() - start < 20_000_000 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let spent = cpu_ns(me).unwrap() - before;
        // schedstat may lag the running thread by a scheduler tick.
        assert!(
            spent >= 10_000_000,
            "20 ms of spinning counted as {spent} ns"
        );
        assert_eq!(cpu_ns(u32::MAX - 1), None, "no such process");
    }
}
