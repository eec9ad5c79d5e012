//! `aishell bench live`: N sessions with a running echo agent each (process
//! backend, sandboxed unless `--spawn-arg` says otherwise). What one costs in
//! memory, by process kind (PSS of the gateway's process tree), and the echo
//! round trip (message → `finish`) on one session while the others are quiet
//! and while each of them sends `--rate` messages per second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::system::{self, ProcessKind, print_provenance, provenance};
use super::{SpawnedGateway, Ws, connect, cpu_ns, ms, next_json, percentiles};

#[derive(Args)]
pub struct LiveArgs {
    /// Live sessions (each with its own task and agent).
    #[arg(long, default_value_t = 200)]
    sessions: usize,
    /// Messages per second each session but the measured one sends under load.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Round trips measured on the probe session, quiet and again under load.
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    /// Sessions being started at once.
    #[arg(long, default_value_t = 16)]
    start_concurrency: usize,
    /// Extra `serve` arguments for the spawned gateway.
    #[arg(long = "spawn-arg", allow_hyphen_values = true)]
    spawn_args: Vec<String>,
    /// Seconds to wait for any one answer.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// table or json.
    #[arg(long, default_value = "table")]
    format: String,
}

/// Background traffic's outcome.
#[derive(Default)]
struct Background {
    turns: usize,
    failures: usize,
    times: Vec<f64>,
    first_error: Option<String>,
}

pub async fn run(args: LiveArgs) -> anyhow::Result<()> {
    let n = args.sessions.max(1);
    // Client sockets here; in the gateway one per client and per runner.
    let (before_limit, limit) = system::raise_nofile((n as u64) * 4 + 4096);
    let room = (n + 64).to_string();
    let settings = [
        ("--agent", "echo".to_string()),
        ("--max-tasks-per-user", room.clone()),
        ("--max-warm-claims-per-user", room.clone()),
        ("--max-connections-per-user", room.clone()),
        ("--max-queued-starts", room),
        ("--max-connections", (n * 2 + 1024).to_string()),
        ("--messages-per-second", "100000".to_string()),
    ];
    let gw = SpawnedGateway::start_with(&settings, &args.spawn_args)?;
    let pid = gw.pid();
    let timeout = Duration::from_secs(args.timeout);

    // Start every session: connect, one message, its answer.
    let started = Instant::now();
    let opened: Vec<anyhow::Result<(Ws, String)>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let (url, token) = (gw.url.clone(), gw.token.clone());
            async move {
                let mut ws = connect(&url, &token).await?;
                next_json(&mut ws, timeout)
                    .await
                    .context("no session frame")?;
                let conversation = format!("c-live-{i}");
                echo_turn(&mut ws, &conversation, timeout).await?;
                Ok((ws, conversation))
            }
        })
        .buffer_unordered(args.start_concurrency.max(1))
        .collect()
        .await;
    let start_secs = started.elapsed().as_secs_f64();
    let mut sessions = Vec::with_capacity(n);
    let mut start_failures = 0;
    let mut first_error = None;
    for r in opened {
        match r {
            Ok(s) => sessions.push(s),
            Err(e) => {
                start_failures += 1;
                first_error.get_or_insert(format!("start: {e:#}"));
            }
        }
    }
    if sessions.is_empty() {
        bail!("no session started: {}", first_error.unwrap_or_default());
    }
    let live = sessions.len();
    let memory = system::memory_by_kind(pid);
    let (mut probe, probe_conv) = sessions.remove(0);

    // Quiet: only the probe talks.
    let mut quiet = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let t = Instant::now();
        echo_turn(&mut probe, &probe_conv, timeout).await?;
        quiet.push(ms(t.elapsed()));
    }

    // Loaded: every other session sends `rate` messages per second, at
    // phases spread over the period, while the probe measures.
    let stop = Arc::new(AtomicBool::new(false));
    let period = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    let background: Vec<_> = sessions
        .into_iter()
        .map(|(ws, conv)| tokio::spawn(background(ws, conv, period, stop.clone(), timeout)))
        .collect();
    // One period for every session to have started its rhythm.
    tokio::time::sleep(period).await;
    let cpu_before = cpu_ns(pid);
    let load_started = Instant::now();
    let mut loaded = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let t = Instant::now();
        echo_turn(&mut probe, &probe_conv, timeout).await?;
        loaded.push(ms(t.elapsed()));
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    let cpu_after = cpu_ns(pid);
    stop.store(true, Ordering::Release);
    let mut bg = Background::default();
    for task in background {
        let b = task.await?;
        bg.turns += b.turns;
        bg.failures += b.failures;
        bg.times.extend(b.times);
        if bg.first_error.is_none() {
            bg.first_error = b.first_error;
        }
    }
    if let Some(e) = bg.first_error.take() {
        first_error.get_or_insert(format!("background: {e}"));
    }
    // Background turns in the measured window only roughly: the count covers
    // their whole run (one period longer).
    let bg_secs = load_secs + period.as_secs_f64();
    let gateway_cpu = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) => {
            let cpu_s = a.saturating_sub(b) as f64 / 1e9;
            let turns = args.samples as f64 + bg.turns as f64 * load_secs / bg_secs;
            json!({
                "percent_of_one_core": (cpu_s / load_secs * 1000.0).round() / 10.0,
                "ms_per_turn": (cpu_s * 1000.0 / turns.max(1.0) * 1000.0).round() / 1000.0,
            })
        }
        _ => Value::Null,
    };
    let kinds: serde_json::Map<String, Value> = memory
        .iter()
        .map(|(kind, (count, kib))| {
            (
                kind.as_str().to_string(),
                json!({ "processes": count, "pss_mib": mib(*kib), "kib_per_session": *kib / live as u64 }),
            )
        })
        .collect();
    let total_kib: u64 = memory.values().map(|(_, kib)| kib).sum();
    let report = json!({
        "mode": "live",
        "provenance": provenance(),
        "nofile_limit": { "before": before_limit, "after": limit },
        "sessions": n,
        "started": live,
        "start_failures": start_failures,
        "start_seconds": (start_secs * 100.0).round() / 100.0,
        "rate_per_session": args.rate,
        "memory": {
            "by_kind": kinds,
            "total_mib": mib(total_kib),
            "mib_per_session": (total_kib as f64 / 1024.0 / live as f64 * 100.0).round() / 100.0,
        },
        "roundtrip_ms": {
            "quiet": percentiles(&mut quiet),
            "loaded": percentiles(&mut loaded),
            "background": percentiles(&mut bg.times),
        },
        "background": {
            "turns": bg.turns,
            "failures": bg.failures,
            "per_second": (bg.turns as f64 / bg_secs * 10.0).round() / 10.0,
        },
        "gateway_cpu": gateway_cpu,
        "first_error": first_error,
        "ok": start_failures == 0 && bg.failures == 0,
    });
    drop(probe);
    drop(gw);
    if args.format == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if report["ok"] != true {
        bail!("some turns failed (first error: {})", report["first_error"]);
    }
    Ok(())
}

fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

/// One message in `conversation` and its `finish`.
async fn echo_turn(ws: &mut Ws, conversation: &str, timeout: Duration) -> anyhow::Result<()> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let msg =
        json!({"type": "message", "id": id, "conversation_id": conversation, "content": "ping"});
    ws.send(Message::Text(msg.to_string().into())).await?;
    loop {
        let v = next_json(ws, timeout).await.context("no reply")?;
        if v["conversation_id"] != conversation {
            continue;
        }
        match v["type"].as_str() {
            Some("finish") => return Ok(()),
            Some("error") => bail!("{}", v["error"]),
            _ => {}
        }
    }
}

/// A session's background traffic: one turn per period until `stop`.
async fn background(
    mut ws: Ws,
    conversation: String,
    period: Duration,
    stop: Arc<AtomicBool>,
    timeout: Duration,
) -> Background {
    let mut out = Background::default();
    let phase = Duration::from_micros(system::random_below(period.as_micros() as u64));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Acquire) {
        ticks.tick().await;
        if stop.load(Ordering::Acquire) {
            break;
        }
        let t = Instant::now();
        match echo_turn(&mut ws, &conversation, timeout).await {
            Ok(()) => {
                out.turns += 1;
                out.times.push(ms(t.elapsed()));
            }
            Err(e) => {
                out.failures += 1;
                out.first_error.get_or_insert(format!("{e:#}"));
                break;
            }
        }
    }
    let _ = ws.close(None).await;
    out
}

fn print_report(r: &Value) {
    println!("aishell bench live — live sessions, echo agent");
    print_provenance(&r["provenance"]);
    println!("{}", system::describe_nofile(&r["nofile_limit"]));
    println!();
    println!(
        "started {} of {} sessions (one message each) in {} s",
        r["started"], r["sessions"], r["start_seconds"]
    );
    let m = &r["memory"];
    println!(
        "memory (PSS of the gateway's process tree): {} MiB, {} MiB per session",
        m["total_mib"], m["mib_per_session"]
    );
    for kind in [
        ProcessKind::Gateway,
        ProcessKind::Runner,
        ProcessKind::Agent,
        ProcessKind::Bwrap,
        ProcessKind::Pasta,
        ProcessKind::Other,
    ] {
        let k = &m["by_kind"][kind.as_str()];
        if k.is_null() {
            continue;
        }
        println!(
            "  {:<8} {:>5} processes {:>8} MiB {:>6} KiB per session",
            kind.as_str(),
            k["processes"].to_string(),
            k["pss_mib"].to_string(),
            k["kib_per_session"].to_string()
        );
    }
    let rt = &r["roundtrip_ms"];
    let cell = |v: &Value| {
        format!(
            "p50 {} ms, p99 {} ms, max {} ms",
            v["p50"], v["p99"], v["max"]
        )
    };
    println!("echo round trip, quiet:  {}", cell(&rt["quiet"]));
    println!(
        "echo round trip, while {} other sessions send {}/s each: {}",
        r["started"].as_u64().unwrap_or(1).saturating_sub(1),
        r["rate_per_session"],
        cell(&rt["loaded"])
    );
    let bg = &r["background"];
    println!(
        "background: {} turns ({}/s), {} failed; their round trip {}",
        bg["turns"],
        bg["per_second"],
        bg["failures"],
        cell(&rt["background"])
    );
    let cpu = &r["gateway_cpu"];
    if !cpu.is_null() {
        println!(
            "gateway CPU under load: {} % of one core, {} ms per turn",
            cpu["percent_of_one_core"], cpu["ms_per_turn"]
        );
    }
    if let Some(e) = r["first_error"].as_str() {
        println!("first error: {e}");
    }
}
