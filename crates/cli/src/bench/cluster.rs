//! `aishell bench cluster`: several gateways on one PostgreSQL behind
//! HAProxy (docs/cluster.md) against one gateway on SQLite, on the same
//! machine in the same run.
//!
//! Starts a throwaway PostgreSQL (or uses `--database-url`), N gateways
//! (process backend, loopback ports, `--gateway-id gwK`, the shared address
//! `--shared-url`, one `--workspaces-root`), HAProxy with the shipped
//! `deploy/haproxy/haproxy.cfg`, and one gateway on SQLite; each setup's
//! warm pools hold the whole burst. Then, after `--warmup-rounds` bursts
//! not counted, round after round, alternating the setups (so a busy
//! neighbour on the machine weighs on both alike):
//! `--concurrency` new sessions at once, each sending one message, timed
//! from the message to the first agent event (the plain bench's
//! measurement), and each gateway's CPU during the burst divided by the
//! sessions it started. The sessions are stopped after each burst, and
//! before the next every pool of both setups is full again with nothing
//! launching (a burst measured while the other setup refills would share
//! the machine with those launches).
//!
//! The target (cluster p50 and p99 within 1.5x of the single gateway's) is
//! reported, not enforced: the exit status is non-zero only on errors.
//! Everything started is stopped and removed at the end, also on an error
//! or Ctrl-C: gateways (their warm and claimed tasks), any runner left
//! (found by a marker in its environment), HAProxy, PostgreSQL, temp dirs.
//!
//! JSON (`--format json`): `{ date, command, machine, gateways,
//! concurrency, rounds, warmup_rounds, warmup_failures, database, haproxy,
//! spawn_args, warm_pool: { cluster_per_gateway,
//! single: { target, max } }, cluster|single: { level (as the plain bench's),
//! warm_first_event_ms: {p50,p90,p99,max}, gateways: [ { id, pid, sessions,
//! cpu_ms, cpu_ms_per_session } ], haproxy_cpu_ms_per_session,
//! postgres_cpu_ms_per_session, cpu_ms_per_session_total, bursts_not_settled,
//! postgres_statements: { per_session, top: [ { query, per_session, mean_ms
//! } ] } (cluster only, null where the server does not count statements),
//! per_burst_warm_first_event_ms: [ {p50,p90,p99,max} ] },
//! ratio: { p50, p99 }, target: { max_ratio, met }, first_error, started:
//! { run_id, postgres_pid, haproxy_pid, gateway_pids, single_pid, dirs },
//! runners_swept }`.

mod haproxy;
mod postgres;
mod statements;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use super::system::{self, print_provenance, provenance};
use super::{BENCH_SETTINGS, Sample, SpawnedGateway, burst, cpu_ns, health, http_json, level_json};
use haproxy::Haproxy;
use postgres::{Postgres, free_port};

/// Cluster p50 and p99 are to stay within this factor of the single gateway's.
const TARGET_RATIO: f64 = 1.5;

/// Names the processes of one bench run: every gateway gets it in its
/// environment, and its runners inherit it (the process backend passes all
/// but secrets), so whatever survives the gateways can be found and stopped.
const RUN_MARKER: &str = "AISHELL_BENCH_RUN";

#[derive(Args)]
pub struct ClusterArgs {
    /// Gateways behind HAProxy.
    #[arg(long, default_value_t = 3)]
    gateways: usize,
    /// New sessions started at once in each burst.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Bursts per setup (samples are pooled).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Bursts per setup before those measured, not counted: the first
    /// burst on a fresh gateway also opens its PostgreSQL connections
    /// (up to 16 each), which a gateway in service has open already.
    #[arg(long, default_value_t = 1)]
    warmup_rounds: usize,
    /// An existing PostgreSQL to use as is instead of a throwaway one (the
    /// bench's gateways, tokens and sessions stay in it: use a scratch
    /// database).
    #[arg(long)]
    database_url: Option<String>,
    /// Extra `serve` arguments for every gateway, both setups (e.g.
    /// --spawn-arg=--warm-pool-target-size=30); they win over the bench's
    /// own.
    #[arg(long = "spawn-arg", allow_hyphen_values = true)]
    spawn_args: Vec<String>,
    /// Per-turn timeout in seconds (a sample past it counts as failed).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// table or json.
    #[arg(long, default_value = "table")]
    format: String,
}

/// Warm pool sizes: every gateway keeps enough ready for its share of a
/// burst (HAProxy's round robin spreads it evenly, give or take one) plus
/// a margin, and room to launch replacements.
fn pool_sizes(concurrency: usize, gateways: usize) -> (usize, usize) {
    let target = concurrency.div_ceil(gateways.max(1)) + 3;
    (target, target + 10)
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    if args.gateways == 0 || args.concurrency == 0 || args.rounds == 0 {
        bail!("BENCH_BAD_ARGUMENT: --gateways, --concurrency and --rounds must be at least 1");
    }
    if args.format != "table" && args.format != "json" {
        bail!(
            "BENCH_BAD_ARGUMENT: --format is `table` or `json`, not `{}`",
            args.format
        );
    }
    let mut rig = Rig::new()?;
    let outcome = tokio::select! {
        r = measure(&args, &mut rig) => r,
        signal = interrupted() => Err(anyhow::anyhow!(
            "BENCH_INTERRUPTED: stopped by {signal}; everything the bench started is being stopped and removed"
        )),
    };
    let started = rig.started();
    progress("stopping everything the bench started");
    let swept = rig.shutdown();
    let mut report = outcome?;
    report["started"] = started;
    report["runners_swept"] = json!(swept);
    if args.format == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// What the bench started, stopped in this order on drop: gateways (they
/// need the database to hand over), runners left, HAProxy, PostgreSQL,
/// then the temp dir.
struct Rig {
    run_id: String,
    /// Gateway data dirs, the shared workspaces root, HAProxy's files.
    dir: PathBuf,
    gateways: Vec<SpawnedGateway>,
    single: Option<SpawnedGateway>,
    haproxy: Option<Haproxy>,
    postgres: Option<Postgres>,
}

impl Rig {
    fn new() -> anyhow::Result<Rig> {
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("aishell-bench-cluster-{}", &run_id[..12]));
        std::fs::create_dir(&dir)
            .with_context(|| format!("BENCH_SETUP_FAILED: cannot create {}", dir.display()))?;
        Ok(Rig {
            run_id,
            dir,
            gateways: Vec::new(),
            single: None,
            haproxy: None,
            postgres: None,
        })
    }

    /// Pids and dirs, for the report (and the test that nothing is left).
    fn started(&self) -> Value {
        let mut dirs = vec![self.dir.display().to_string()];
        if let Some(pg) = &self.postgres {
            dirs.push(pg.dir().display().to_string());
        }
        json!({
            "run_id": self.run_id,
            "postgres_pid": self.postgres.as_ref().map(Postgres::pid),
            "haproxy_pid": self.haproxy.as_ref().map(Haproxy::pid),
            "gateway_pids": self.gateways.iter().map(SpawnedGateway::pid).collect::<Vec<_>>(),
            "single_pid": self.single.as_ref().map(SpawnedGateway::pid),
            "dirs": dirs,
        })
    }

    /// Stop everything; the number of runners that outlived their gateways.
    fn shutdown(&mut self) -> usize {
        // Every gateway is told at once, then waited for one by one.
        for gw in self.gateways.iter().chain(&self.single) {
            let pid = nix::unistd::Pid::from_raw(gw.pid() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        self.gateways.clear();
        self.single = None;
        let swept = sweep(&self.run_id);
        self.haproxy = None;
        self.postgres = None;
        let _ = std::fs::remove_dir_all(&self.dir);
        swept
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Stop every process still carrying this run's marker (runners whose
/// gateway handed their session over instead of stopping it): SIGTERM,
/// then SIGKILL after 5 s. Returns how many there were.
fn sweep(run_id: &str) -> usize {
    let needle = format!("{RUN_MARKER}={run_id}\0");
    let marked = || -> Vec<i32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
            })
            .collect()
    };
    let found = marked();
    let signal = |pids: &[i32], sig| {
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), sig);
        }
    };
    signal(&found, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = marked();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = marked();
    }
    signal(&left, nix::sys::signal::Signal::SIGKILL);
    found.len()
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

fn progress(what: &str) {
    eprintln!("bench cluster: {what}");
}

/// One gateway of a setup, as measured.
struct Member {
    id: String,
    pid: u32,
    port: u16,
    cpu_ns: Option<u64>,
    sessions: u64,
}

/// One setup: where its clients connect and what it is made of.
struct Setup {
    url: String,
    token: String,
    members: Vec<Member>,
    /// Processes whose CPU counts towards the setup besides its gateways:
    /// ("haproxy", pid), ("postgres", postmaster pid: its whole tree).
    helpers: Vec<(&'static str, u32)>,
    helper_cpu_ns: HashMap<&'static str, u64>,
    samples: Vec<Sample>,
    /// Each measured burst's warm first-event percentiles, in order.
    per_burst: Vec<Value>,
    not_settled: usize,
}

impl Setup {
    fn new(url: String, token: String) -> Setup {
        Setup {
            url,
            token,
            members: Vec::new(),
            helpers: Vec::new(),
            helper_cpu_ns: HashMap::new(),
            samples: Vec::new(),
            per_burst: Vec::new(),
            not_settled: 0,
        }
    }

    fn member(&mut self, id: String, gw: &SpawnedGateway) {
        self.members.push(Member {
            id,
            pid: gw.pid(),
            port: gw.port,
            cpu_ns: Some(0),
            sessions: 0,
        });
    }

    /// Wait (up to 90 s) until every gateway's pool is full, nothing is
    /// launching and no session task is left from the last burst.
    async fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let mut all = true;
            for m in &self.members {
                let h = health("127.0.0.1", m.port).await.unwrap_or(Value::Null);
                let pool = &h["pool"];
                let full = !pool["enabled"].as_bool().unwrap_or(false)
                    || (pool["ready"].as_u64() >= pool["target"].as_u64()
                        && pool["launching"].as_u64() == Some(0));
                all &= full && h["tasks"].as_u64() == Some(0);
            }
            if all {
                break;
            }
            if Instant::now() > deadline {
                self.not_settled += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One burst: samples, and each process's CPU and sessions during it.
    async fn burst(&mut self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let claims_before = self.claims().await;
        let cpu_before: Vec<Option<u64>> = self.members.iter().map(|m| cpu_ns(m.pid)).collect();
        let helpers_before: Vec<HashMap<u32, u64>> =
            self.helpers.iter().map(|(_, pid)| tree_cpu(*pid)).collect();
        let samples = burst(&self.url, &self.token, n, timeout).await?;
        let cpu_after: Vec<Option<u64>> = self.members.iter().map(|m| cpu_ns(m.pid)).collect();
        for (i, (name, pid)) in self.helpers.iter().enumerate() {
            let spent = tree_cpu_since(&helpers_before[i], &tree_cpu(*pid));
            *self.helper_cpu_ns.entry(name).or_default() += spent;
        }
        let claims_after = self.claims().await;
        for (i, m) in self.members.iter_mut().enumerate() {
            m.cpu_ns = match (m.cpu_ns, cpu_before[i], cpu_after[i]) {
                (Some(total), Some(b), Some(a)) => Some(total + a.saturating_sub(b)),
                _ => None,
            };
            m.sessions += claims_after[i].saturating_sub(claims_before[i]);
        }
        self.stop_sessions(&samples).await;
        let mut warm: Vec<f64> = samples
            .iter()
            .filter(|s| s.source == "warm" && s.error.is_none())
            .filter_map(|s| s.first_event_ms)
            .collect();
        self.per_burst.push(super::percentiles(&mut warm));
        self.samples.extend(samples);
        Ok(())
    }

    /// Each gateway's task starts so far (warm claims and cold launches):
    /// the sessions it served.
    async fn claims(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for m in &self.members {
            let h = health("127.0.0.1", m.port).await.unwrap_or(Value::Null);
            let pool = &h["pool"];
            out.push(
                pool["claim_hit"].as_u64().unwrap_or(0) + pool["claim_miss"].as_u64().unwrap_or(0),
            );
        }
        out
    }

    /// Stop the burst's sessions' tasks on whichever gateway owns each, so
    /// every burst starts from the same state (and tasks do not pile up).
    async fn stop_sessions(&self, samples: &[Sample]) {
        for id in samples.iter().filter_map(|s| s.session_id.as_deref()) {
            for m in &self.members {
                let path = format!("/api/admin/sessions/{id}/stop");
                let answer =
                    http_json("127.0.0.1", m.port, "POST", &path, Some(&self.token), None).await;
                if answer.is_some_and(|a| a["stopping"] == true) {
                    break;
                }
            }
        }
    }

    /// Forget what was measured so far (after the warm-up bursts).
    fn reset(&mut self) {
        for m in &mut self.members {
            m.cpu_ns = Some(0);
            m.sessions = 0;
        }
        self.helper_cpu_ns.clear();
        self.samples.clear();
        self.per_burst.clear();
        self.not_settled = 0;
    }

    fn report(&self, rounds: usize, n: usize) -> Value {
        let level = level_json(n, rounds, &self.samples);
        let per = |ns: u64, sessions: u64| round2(ns as f64 / 1e6 / sessions.max(1) as f64);
        let gateways: Vec<Value> = self
            .members
            .iter()
            .map(|m| {
                json!({
                    "id": m.id,
                    "pid": m.pid,
                    "sessions": m.sessions,
                    "cpu_ms": m.cpu_ns.map(|ns| round2(ns as f64 / 1e6)),
                    "cpu_ms_per_session": m.cpu_ns.map(|ns| per(ns, m.sessions)),
                })
            })
            .collect();
        let sessions: u64 = self.members.iter().map(|m| m.sessions).sum();
        let gateway_ns: Option<u64> = self.members.iter().map(|m| m.cpu_ns).sum();
        let helper = |name| self.helper_cpu_ns.get(name).map(|ns| per(*ns, sessions));
        let total = gateway_ns
            .map(|g| g + self.helper_cpu_ns.values().sum::<u64>())
            .map(|ns| per(ns, sessions));
        json!({
            "warm_first_event_ms": level["warm"]["first_event_ms"],
            "level": level,
            "gateways": gateways,
            "gateway_cpu_ms_per_session": gateway_ns.map(|ns| per(ns, sessions)),
            "haproxy_cpu_ms_per_session": helper("haproxy"),
            "postgres_cpu_ms_per_session": helper("postgres"),
            "cpu_ms_per_session_total": total,
            "bursts_not_settled": self.not_settled,
            "per_burst_warm_first_event_ms": self.per_burst,
        })
    }
}

/// Wait until both setups are at rest (pools full, nothing launching, no
/// task left): a burst measured while the other setup refills its pool
/// would share the machine with those launches.
async fn quiet(cluster: &mut Setup, single: &mut Setup) {
    cluster.settle().await;
    single.settle().await;
    // Let the machine settle after the refill.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// CPU so far of `root` and each of its descendants.
fn tree_cpu(root: u32) -> HashMap<u32, u64> {
    system::process_tree(root)
        .into_iter()
        .filter_map(|p| Some((p.pid, cpu_ns(p.pid)?)))
        .collect()
}

/// CPU spent since `before`: a process started meanwhile counts whole; one
/// that exited meanwhile is lost (PostgreSQL's backends live as long as
/// the gateways' connection pools).
fn tree_cpu_since(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> u64 {
    after
        .iter()
        .map(|(pid, a)| a.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum()
}

async fn measure(args: &ClusterArgs, rig: &mut Rig) -> anyhow::Result<Value> {
    let provenance = provenance();
    let timeout = Duration::from_secs(args.timeout);
    let n = args.concurrency;
    let (target, max) = pool_sizes(n, args.gateways);
    let (single_target, single_max) = (n, n + 10);

    let (database_url, database) = match &args.database_url {
        Some(url) => (url.clone(), "--database-url (used as is)".to_string()),
        None => {
            progress("starting a throwaway PostgreSQL");
            let pg = Postgres::start()?;
            let info = (
                pg.url(),
                format!("throwaway {} on 127.0.0.1:{}", pg.version, pg.port),
            );
            rig.postgres = Some(pg);
            info
        }
    };

    let workspaces = rig.dir.join("workspaces");
    std::fs::create_dir(&workspaces)?;
    let ports: Vec<u16> = (0..args.gateways)
        .map(|_| free_port())
        .collect::<anyhow::Result<_>>()?;
    let lb_port = free_port()?;
    // HAProxy first: its address is the shared URL the gateways hand their
    // runners; it marks the gateways UP as they come.
    progress(&format!(
        "starting HAProxy on 127.0.0.1:{lb_port} and {} gateways on PostgreSQL",
        args.gateways
    ));
    rig.haproxy = Some(Haproxy::start(&rig.dir, lb_port, &ports)?);
    let shared_url = format!("ws://127.0.0.1:{lb_port}");
    let mut settings: Vec<(&str, String)> = BENCH_SETTINGS
        .iter()
        .map(|(k, v)| (*k, v.to_string()))
        .collect();
    settings.push(("--warm-pool-target-size", target.to_string()));
    settings.push(("--warm-pool-max-size", max.to_string()));
    settings.push(("--shared-url", shared_url));
    settings.push(("--workspaces-root", workspaces.display().to_string()));
    let env = [
        ("DATABASE_URL", Some(database_url.clone())),
        (RUN_MARKER, Some(rig.run_id.clone())),
    ];
    for (k, port) in ports.iter().enumerate() {
        let id = format!("gw{}", k + 1);
        let mut own = settings.clone();
        own.push(("--gateway-id", id.clone()));
        let gw = SpawnedGateway::start_in(*port, rig.dir.join(&id), &env, &own, &args.spawn_args)
            .with_context(|| format!("BENCH_GATEWAY_FAILED: gateway {id} did not start"))?;
        rig.gateways.push(gw);
    }
    let haproxy = rig.haproxy.as_mut().expect("started above");
    haproxy
        .wait_all_up(args.gateways, Duration::from_secs(60))
        .await?;
    let haproxy_version = haproxy.version.clone();

    progress("starting the single gateway on SQLite");
    let mut single_settings: Vec<(&str, String)> = BENCH_SETTINGS
        .iter()
        .map(|(k, v)| (*k, v.to_string()))
        .collect();
    single_settings.push(("--warm-pool-target-size", single_target.to_string()));
    single_settings.push(("--warm-pool-max-size", single_max.to_string()));
    let single_env = [
        // SQLite in its data dir, whatever the bench's environment says.
        ("DATABASE_URL", None),
        (RUN_MARKER, Some(rig.run_id.clone())),
    ];
    let single = SpawnedGateway::start_in(
        0,
        rig.dir.join("single"),
        &single_env,
        &single_settings,
        &args.spawn_args,
    )
    .context("BENCH_GATEWAY_FAILED: the single gateway did not start")?;

    let mut cluster = Setup::new(
        format!("ws://127.0.0.1:{lb_port}/ws"),
        rig.gateways[0].token.clone(),
    );
    for (k, gw) in rig.gateways.iter().enumerate() {
        cluster.member(format!("gw{}", k + 1), gw);
    }
    cluster
        .helpers
        .push(("haproxy", rig.haproxy.as_ref().expect("started").pid()));
    if let Some(pg) = &rig.postgres {
        cluster.helpers.push(("postgres", pg.pid()));
    }
    let mut alone = Setup::new(single.url.clone(), single.token.clone());
    alone.member("single".into(), &single);
    rig.single = Some(single);

    progress("filling the warm pools");
    for round in 1..=args.warmup_rounds {
        for key in ["cluster", "single"] {
            progress(&format!(
                "warm-up {round}/{}: {n} new sessions on the {key} (not counted)",
                args.warmup_rounds
            ));
            quiet(&mut cluster, &mut alone).await;
            let setup = if key == "cluster" {
                &mut cluster
            } else {
                &mut alone
            };
            setup.burst(n, timeout).await?;
        }
    }
    let warmup_errors: Vec<String> = cluster
        .samples
        .iter()
        .chain(&alone.samples)
        .filter_map(|s| s.error.clone())
        .collect();
    cluster.reset();
    alone.reset();
    let counting = statements::reset(&database_url).await.is_some();
    for round in 1..=args.rounds {
        for key in ["cluster", "single"] {
            progress(&format!(
                "round {round}/{}: {n} new sessions on the {key}",
                args.rounds
            ));
            quiet(&mut cluster, &mut alone).await;
            let setup = if key == "cluster" {
                &mut cluster
            } else {
                &mut alone
            };
            setup.burst(n, timeout).await?;
        }
    }

    let mut c = cluster.report(args.rounds, n);
    let s = alone.report(args.rounds, n);
    if counting {
        c["postgres_statements"] = statements::per_session(&database_url, args.rounds * n).await;
    }
    let ratio = |p: &str| {
        let (Some(a), Some(b)) = (
            c["warm_first_event_ms"][p].as_f64(),
            s["warm_first_event_ms"][p].as_f64(),
        ) else {
            return None;
        };
        (b > 0.0).then(|| round2(a / b))
    };
    let (r50, r99) = (ratio("p50"), ratio("p99"));
    let met = match (r50, r99) {
        (Some(a), Some(b)) => Some(a <= TARGET_RATIO && b <= TARGET_RATIO),
        _ => None,
    };
    let first_error = cluster
        .samples
        .iter()
        .chain(&alone.samples)
        .find_map(|s| s.error.clone())
        .or_else(|| warmup_errors.first().cloned());
    Ok(json!({
        "date": provenance["date"],
        "command": provenance["command"],
        "machine": provenance["machine"],
        "gateways": args.gateways,
        "concurrency": n,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "warmup_failures": warmup_errors.len(),
        "database": database,
        "haproxy": haproxy_version,
        "spawn_args": args.spawn_args,
        "warm_pool": {
            "cluster_per_gateway": { "target": target, "max": max },
            "single": { "target": single_target, "max": single_max },
        },
        "cluster": c,
        "single": s,
        "ratio": { "p50": r50, "p99": r99 },
        "target": { "max_ratio": TARGET_RATIO, "met": met },
        "first_error": first_error,
    }))
}

fn print_table(r: &Value) {
    println!(
        "aishell bench cluster: {} gateways on one PostgreSQL behind HAProxy vs one gateway on SQLite",
        r["gateways"]
    );
    println!();
    print_provenance(r);
    println!("database: {}", r["database"].as_str().unwrap_or(""));
    println!("haproxy: {}", r["haproxy"].as_str().unwrap_or(""));
    let pool = &r["warm_pool"];
    println!(
        "warm pools: target {} / max {} per cluster gateway, target {} / max {} on the single gateway{}",
        pool["cluster_per_gateway"]["target"],
        pool["cluster_per_gateway"]["max"],
        pool["single"]["target"],
        pool["single"]["max"],
        if r["spawn_args"].as_array().is_some_and(|a| !a.is_empty()) {
            format!(" (unless --spawn-arg says otherwise: {})", r["spawn_args"])
        } else {
            String::new()
        }
    );
    println!(
        "load: {} new sessions at once, {} rounds per setup after {} warm-up round(s), alternating; message → first agent event (echo agent)",
        r["concurrency"], r["rounds"], r["warmup_rounds"]
    );
    println!();
    println!(
        "{:<18} {:>9} {:>5} | {:>9} {:>9} {:>9} | {:>12}",
        "setup", "warm/all", "fail", "p50 ms", "p99 ms", "max ms", "CPU ms/sess"
    );
    let num = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x}"));
    for (key, label) in [
        ("cluster", format!("cluster ({} gw)", r["gateways"])),
        ("single", "single (SQLite)".to_string()),
    ] {
        let setup = &r[key];
        let level = &setup["level"];
        let count = |source: &str, field: &str| level[source][field].as_u64().unwrap_or(0);
        let all = count("warm", "n") + count("cold", "n") + count("unknown", "n");
        let fail =
            count("warm", "failures") + count("cold", "failures") + count("unknown", "failures");
        let warm = &setup["warm_first_event_ms"];
        println!(
            "{:<18} {:>9} {:>5} | {:>9} {:>9} {:>9} | {:>12}",
            label,
            format!("{}/{all}", count("warm", "n")),
            fail,
            num(&warm["p50"]),
            num(&warm["p99"]),
            num(&warm["max"]),
            num(&setup["cpu_ms_per_session_total"]),
        );
    }
    println!();
    let target = &r["target"];
    println!(
        "cluster / single, warm first event: p50 {}x, p99 {}x; target ≤ {}x: {}",
        num(&r["ratio"]["p50"]),
        num(&r["ratio"]["p99"]),
        target["max_ratio"],
        match target["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        }
    );
    println!();
    println!("CPU per session during the bursts (each gateway's over the sessions it started):");
    for key in ["cluster", "single"] {
        for gw in r[key]["gateways"].as_array().into_iter().flatten() {
            println!(
                "  {:<8} {:>5} sessions  {:>8} ms/session",
                gw["id"].as_str().unwrap_or(""),
                gw["sessions"],
                num(&gw["cpu_ms_per_session"])
            );
        }
    }
    let c = &r["cluster"];
    println!(
        "  cluster: gateways {} + HAProxy {} + PostgreSQL {} = {} ms/session",
        num(&c["gateway_cpu_ms_per_session"]),
        num(&c["haproxy_cpu_ms_per_session"]),
        num(&c["postgres_cpu_ms_per_session"]),
        num(&c["cpu_ms_per_session_total"])
    );
    let statements = &c["postgres_statements"];
    if !statements.is_null() {
        println!();
        println!(
            "PostgreSQL statements per cluster session: {} (most executed first; mean ms)",
            num(&statements["per_session"])
        );
        for s in statements["top"].as_array().into_iter().flatten() {
            println!(
                "  {:>6} {:>7}  {}",
                num(&s["per_session"]),
                num(&s["mean_ms"]),
                s["query"].as_str().unwrap_or("")
            );
        }
    }
    for key in ["cluster", "single"] {
        let n = r[key]["bursts_not_settled"].as_u64().unwrap_or(0);
        if n > 0 {
            println!("  note: {n} {key} bursts started before every pool was full (90 s wait)");
        }
    }
    println!();
    println!("warm first event per measured burst, p50/p99 ms:");
    for key in ["cluster", "single"] {
        let bursts: Vec<String> = r[key]["per_burst_warm_first_event_ms"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{}/{}", num(&p["p50"]), num(&p["p99"])))
            .collect();
        println!("  {key:<8} {}", bursts.join("  "));
    }
    if let Some(n) = r["warmup_failures"].as_u64().filter(|n| *n > 0) {
        println!("warm-up failures: {n}");
    }
    if let Some(e) = r["first_error"].as_str() {
        println!("first error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_hold_each_gateways_share_of_a_burst() {
        // 50 over 3 gateways: 17 each at most, plus a margin.
        assert_eq!(pool_sizes(50, 3), (20, 30));
        assert_eq!(pool_sizes(2, 2), (4, 14));
        assert_eq!(pool_sizes(50, 1), (53, 63));
    }

    #[test]
    fn cpu_of_a_tree_counts_new_processes_whole() {
        let before = HashMap::from([(1, 100), (2, 50), (3, 10)]);
        // 2 ran 20 more, 3 exited, 4 started and ran 7.
        let after = HashMap::from([(1, 100), (2, 70), (4, 7)]);
        assert_eq!(tree_cpu_since(&before, &after), 27);
    }
}
