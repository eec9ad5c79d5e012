//! `aishell bench idle`: N client connections that each get their `session`
//! frame and then say nothing. What one costs the gateway in memory, how long
//! opening them all takes, and whether a sample spread across them still
//! answers a `ping`, and how fast.
//!
//! One source address reaches one listening port through at most the
//! ephemeral port range (about 28k ports here), so connection `i` comes from
//! 127.0.0.(2 + i / `--per-address`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::system::{self, print_provenance, provenance};
use super::{SpawnedGateway, Ws, ms, next_json, percentiles};

#[derive(Args)]
pub struct IdleArgs {
    /// Idle connections to hold open at once.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Connections (spread evenly over all of them) that get a `ping` once all are open.
    #[arg(long, default_value_t = 1000)]
    sample: usize,
    /// Connection attempts in flight while opening.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Connections per loopback source address before moving to the next.
    #[arg(long, default_value_t = 25_000)]
    per_address: usize,
    /// Extra `serve` arguments for the spawned gateway.
    #[arg(long = "spawn-arg", allow_hyphen_values = true)]
    spawn_args: Vec<String>,
    /// Seconds to wait for any one answer.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// table or json.
    #[arg(long, default_value = "table")]
    format: String,
}

/// The bench client's read buffer per connection: its frames are a few
/// hundred bytes, and 100k connections of the default 8 KiB would be 800 MiB
/// of the machine the gateway is measured on.
const CLIENT_READ_BUFFER: usize = 2048;

pub async fn run(args: IdleArgs) -> anyhow::Result<()> {
    let n = args.connections.max(1);
    // Each connection is one descriptor here and one in the gateway (which
    // inherits this limit), plus the gateway's own files.
    let (before_limit, limit) = system::raise_nofile(n as u64 + 4096);
    if limit < n as u64 + 256 {
        bail!(
            "{n} connections need about {} open files but the limit stays at {limit} (raising the hard limit needs root or CAP_SYS_RESOURCE; try `ulimit -Hn`)",
            n + 4096
        );
    }
    let addresses = n.div_ceil(args.per_address.max(1));
    if addresses > 253 {
        bail!(
            "{n} connections at {} per address need more than 253 loopback addresses",
            args.per_address
        );
    }
    let room = (n + 1024).to_string();
    let settings = [
        ("--agent", "echo".to_string()),
        ("--enable-warm-pool", "false".to_string()),
        ("--max-connections", room.clone()),
        ("--max-connections-per-user", room),
        (
            "--max-pending-connections-per-address",
            (args.concurrency * 2).max(256).to_string(),
        ),
        ("--messages-per-second", "100000".to_string()),
    ];
    let gw = SpawnedGateway::start_with(&settings, &args.spawn_args)?;
    let timeout = Duration::from_secs(args.timeout);
    let target: SocketAddr = {
        let url = url::Url::parse(&gw.url)?;
        let host: IpAddr = url.host_str().context("gateway host")?.parse()?;
        SocketAddr::new(host, gw.port)
    };
    // Let the gateway finish starting (its first allocations, threads) first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = system::rss_kib(gw.pid()).unwrap_or(0);

    let started = Instant::now();
    let per_address = args.per_address.max(1);
    let opened: Vec<Result<Ws, String>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i / per_address) as u8));
            open_idle(&gw.url, &gw.token, target, source, timeout)
        })
        .buffered(args.concurrency.max(1))
        .collect()
        .await;
    let open_secs = started.elapsed().as_secs_f64();
    let mut conns = Vec::with_capacity(n);
    let mut open_failures = 0;
    let mut first_error = None;
    for r in opened {
        match r {
            Ok(ws) => conns.push(ws),
            Err(e) => {
                open_failures += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    // Frees what the burst of handshakes left in flight before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = system::rss_kib(gw.pid()).unwrap_or(0);
    let fds = system::fd_count(gw.pid());

    // Ping a sample spread evenly across every open connection, one at a time.
    let sample = args.sample.min(conns.len());
    let step = conns.len().checked_div(sample).unwrap_or(1).max(1);
    let mut times = Vec::with_capacity(sample);
    let mut ping_failures = 0;
    for k in 0..sample {
        let ws = &mut conns[k * step];
        let t = Instant::now();
        match ping(ws, k, timeout).await {
            Ok(()) => times.push(ms(t.elapsed())),
            Err(e) => {
                ping_failures += 1;
                first_error.get_or_insert(format!("ping: {e}"));
            }
        }
    }
    let held = conns.len();
    let per_conn_kib = (rss_after.saturating_sub(rss_before)) as f64 / held.max(1) as f64;
    let report = json!({
        "mode": "idle",
        "provenance": provenance(),
        "nofile_limit": { "before": before_limit, "after": limit },
        "source_addresses": addresses,
        "connections": n,
        "opened": held,
        "open_failures": open_failures,
        "open_seconds": (open_secs * 100.0).round() / 100.0,
        "gateway_rss_mib": { "before": mib(rss_before), "after": mib(rss_after) },
        "gateway_fds": fds,
        "kib_per_connection": (per_conn_kib * 10.0).round() / 10.0,
        "ping": { "sampled": sample, "answered": times.len(), "failures": ping_failures, "ms": percentiles(&mut times) },
        "first_error": first_error,
        "ok": open_failures == 0 && ping_failures == 0,
    });
    drop(conns);
    drop(gw);
    if args.format == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if report["ok"] != true {
        bail!(
            "some connections failed (first error: {})",
            report["first_error"]
        );
    }
    Ok(())
}

fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

/// Connect from `source`, read the `session` frame, and leave the socket be.
async fn open_idle(
    url: &str,
    token: &str,
    target: SocketAddr,
    source: IpAddr,
    timeout: Duration,
) -> Result<Ws, String> {
    let attempt = async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        // The port is chosen at connect, for this destination: ports the
        // last run left in TIME_WAIT (with another gateway port) stay usable.
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and an int option.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let tcp = socket.connect(target).await?;
        tcp.set_nodelay(true)?;
        let mut req = url.into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let config = WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER);
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            req,
            MaybeTlsStream::Plain(tcp),
            Some(config),
        )
        .await?;
        anyhow::Ok(ws)
    };
    let mut ws = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return Err(format!("connect from {source}: {e}")),
        Err(_) => return Err(format!("connect from {source}: timed out")),
    };
    match next_json(&mut ws, timeout).await {
        Some(v) if v["type"] == "session" => Ok(ws),
        other => Err(format!("expected a session frame, got {other:?}")),
    }
}

async fn ping(ws: &mut Ws, id: usize, timeout: Duration) -> anyhow::Result<()> {
    let frame = json!({"type": "ping", "id": id});
    ws.send(Message::Text(frame.to_string().into())).await?;
    loop {
        let v = next_json(ws, timeout).await.context("no pong")?;
        if v["type"] == "pong" && v["id"] == id {
            return Ok(());
        }
    }
}

fn print_report(r: &Value) {
    println!("aishell bench idle — idle client connections");
    print_provenance(&r["provenance"]);
    println!(
        "{}; client spread over {} source address(es) from 127.0.0.2",
        system::describe_nofile(&r["nofile_limit"]),
        r["source_addresses"]
    );
    println!();
    println!(
        "opened {} of {} connections in {} s ({} failed)",
        r["opened"], r["connections"], r["open_seconds"], r["open_failures"]
    );
    println!(
        "gateway RSS {} → {} MiB: {} KiB per connection; {} open descriptors",
        r["gateway_rss_mib"]["before"],
        r["gateway_rss_mib"]["after"],
        r["kib_per_connection"],
        r["gateway_fds"]
    );
    let p = &r["ping"];
    println!(
        "ping → pong on {} connections spread across them: {} answered, p50 {} ms, p99 {} ms, max {} ms",
        p["sampled"], p["answered"], p["ms"]["p50"], p["ms"]["p99"], p["ms"]["max"]
    );
    if let Some(e) = r["first_error"].as_str() {
        println!("first error: {e}");
    }
}
