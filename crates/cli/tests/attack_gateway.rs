//! Attacks on the gateway's edges: forged and replayed runner credentials,
//! FIFOs in the files API, half-open connection floods, tokens in URLs.
//! Each test attacks for real and asserts the refusal.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use aishell_gateway::credential::CredentialSigner;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

fn is_child_of(pid: i32, parent: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    after
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u32>().ok())
        == Some(parent)
}

/// The gateway's warm runners (its children in warm mode).
fn warm_runners_of(gw: &Gateway) -> Vec<i32> {
    pids_with_env("AISHELL_TASK_MODE=warm", " runner")
        .into_iter()
        .filter(|p| is_child_of(*p, gw.pid()))
        .collect()
}

fn env_of(pid: i32, name: &str) -> String {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("runner environ");
    let prefix = format!("{name}=");
    environ
        .split(|b| *b == 0)
        .map(|kv| String::from_utf8_lossy(kv).to_string())
        .find_map(|kv| kv.strip_prefix(&prefix).map(str::to_string))
        .unwrap_or_else(|| panic!("{name} not in the runner's environment"))
}

/// What an attacker holding the data dir's key can mint.
fn signer_of(gw: &Gateway) -> CredentialSigner {
    CredentialSigner::new(std::fs::read(gw.data_dir.join("runner-credential.key")).unwrap())
}

/// Dial a runner endpoint with a credential; the HTTP status of a refusal,
/// or 101 when the upgrade was accepted.
async fn dial_runner(gw: &Gateway, path: &str, credential: &str) -> u16 {
    let mut req = format!("ws://127.0.0.1:{}{path}", gw.port)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {credential}").parse().unwrap(),
    );
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("dial failed: {e}"),
    }
}

fn auth_failures(gw: &Gateway, task_id: &str) -> Vec<Value> {
    gw.logs()
        .into_iter()
        .filter(|l| l["event"] == "runner_auth_failed" && l.to_string().contains(task_id))
        .collect()
}

#[tokio::test]
async fn a_validly_signed_credential_for_a_task_the_gateway_never_launched_is_refused() {
    let gw = Gateway::start(&["--agent", "echo", "--warm-pool-target-size", "1"]);
    let before = gw.wait_pool_ready(1, WAIT).await;
    let signer = signer_of(&gw);
    // Warm: forged runners would join the pool and be handed to the next user.
    for i in 0..5 {
        let task_id = format!("w-forged{i}");
        let credential = signer.mint(
            &task_id,
            aishell_backend::TaskMode::Warm,
            None,
            Duration::from_secs(600),
        );
        let status = dial_runner(&gw, &format!("/internal/warm/{task_id}"), &credential).await;
        assert_eq!(status, 403, "forged warm runner {task_id} was not refused");
    }
    gw.wait_log(
        "runner_auth_failed",
        |l| l["event"] == "runner_auth_failed" && l.to_string().contains("w-forged4"),
        WAIT,
    )
    .await;
    let failures = auth_failures(&gw, "w-forged0");
    assert!(
        failures.iter().any(|l| l["reason"]
            .as_str()
            .unwrap_or("")
            .contains("did not launch")),
        "refusal logged with its reason: {failures:?}"
    );
    // The pool neither grew nor replaced anything.
    let pool = gw.pool();
    assert_eq!(
        (pool["ready"].as_u64(), pool["launching"].as_u64()),
        (Some(1), Some(0)),
        "{pool}"
    );
    assert_eq!(pool["launched"], before["launched"], "{pool}");
    // Cold: a forged runner for a live session cannot take it over.
    let mut c = gw.connect().await;
    c.message("m1", "mine").await;
    assert_eq!(text_of(&c.turn().await), "mine");
    let session = c.session_id.clone();
    let credential = signer.mint(
        "c-forged",
        aishell_backend::TaskMode::Cold,
        Some(&session),
        Duration::from_secs(600),
    );
    let status = dial_runner(&gw, &format!("/internal/task/{session}"), &credential).await;
    assert_eq!(status, 403, "forged cold runner was not refused");
    // The real runner still serves the session.
    c.message("m2", "still mine").await;
    assert_eq!(text_of(&c.turn().await), "still mine");
}

#[tokio::test]
async fn a_replayed_credential_of_a_stopped_task_is_refused() {
    let gw = Gateway::start(&["--agent", "echo", "--warm-pool-target-size", "1"]);
    gw.wait_pool_ready(1, WAIT).await;
    let runners = warm_runners_of(&gw);
    assert_eq!(runners.len(), 1, "{runners:?}");
    // Steal the runner's real credential, then the task ends.
    let credential = env_of(runners[0], "AISHELL_TASK_CREDENTIAL");
    let task_id = env_of(runners[0], "AISHELL_TASK_ID");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(runners[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    gw.wait_log(
        "evict",
        |l| l["action"] == "evict" && l["taskId"] == task_id.as_str(),
        WAIT,
    )
    .await;
    // The pool replaced it; the old credential is worth nothing now.
    gw.wait_pool_ready(1, WAIT).await;
    let status = dial_runner(&gw, &format!("/internal/warm/{task_id}"), &credential).await;
    assert_eq!(
        status, 403,
        "replayed credential of a stopped task accepted"
    );
    let logged = gw
        .wait_log(
            "runner_auth_failed",
            |l| l["event"] == "runner_auth_failed" && l.to_string().contains(task_id.as_str()),
            WAIT,
        )
        .await;
    assert!(
        logged["reason"].as_str().unwrap_or("").contains("stopped"),
        "{logged}"
    );
    // Nor does it reach the model proxy.
    let (status, _) = gw.http(
        "POST",
        "/internal/model/openai/v1/chat/completions",
        Some(&credential),
        Some("{}"),
    );
    assert_eq!(
        status, 401,
        "the model proxy accepted a stopped task's credential"
    );
}

#[tokio::test]
async fn a_warm_runner_re_registering_after_a_gateway_restart_is_kept() {
    let mut gw = Gateway::start(&[
        "--agent",
        "echo",
        "--warm-pool-target-size",
        "1",
        "--orphan-grace",
        "2s",
    ]);
    gw.wait_pool_ready(1, WAIT).await;
    let runners = warm_runners_of(&gw);
    assert_eq!(runners.len(), 1, "{runners:?}");
    let runner = runners[0];
    let task_id = env_of(runner, "AISHELL_TASK_ID");
    gw.kill9();
    gw.restart(&[]);
    // The old runner re-registers instead of a new launch.
    let pool = gw.wait_pool_ready(1, Duration::from_secs(45)).await;
    assert_eq!(
        pool["launched"], 0,
        "the restarted gateway launched: {pool}"
    );
    // Past the orphan grace, it is still there and still in the pool.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        std::path::Path::new(&format!("/proc/{runner}")).exists(),
        "the re-registered warm runner was stopped as an orphan"
    );
    assert!(
        !gw.logs()
            .iter()
            .any(|l| l["event"] == "orphan_stopped" && l["taskId"] == task_id.as_str()),
        "stopped as an orphan"
    );
    let pool = gw.pool();
    assert_eq!(pool["ready"], 1, "{pool}");
    // And it serves the next session.
    let mut c = gw.connect().await;
    c.message("m1", "adopted").await;
    let frames = c.turn().await;
    assert_eq!(of_type(&frames, "status")[0]["source"], "warm");
    assert_eq!(text_of(&frames), "adopted");
}

// ---- files API ------------------------------------------------------------------

/// One raw HTTP/1.1 request with a 10 s read bound: (status, body).
fn http(gw: &Gateway, method: &str, path: &str, token: &str, body: &[u8]) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn upload_leftovers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".aishell-upload-") || n.starts_with("big"))
        .collect()
}

#[tokio::test]
async fn a_fifo_in_the_workspace_neither_blocks_the_gateway_nor_is_read() {
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let token = gw.create_token("mallory");
    let ws = gw.workspace("mallory");
    std::fs::create_dir_all(&ws).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(ws.join("fifo"))
        .status()
        .unwrap();
    assert!(made.success());
    // Ten readers of the FIFO at once.
    let readers: Vec<_> = (0..10)
        .map(|_| {
            let (port, token) = (gw.port, token.clone());
            std::thread::spawn(move || {
                let gw_port = port;
                let started = Instant::now();
                let mut s = std::net::TcpStream::connect(("127.0.0.1", gw_port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                write!(s, "GET /api/files/fifo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n").unwrap();
                let mut raw = String::new();
                let _ = s.read_to_string(&mut raw);
                (raw, started.elapsed())
            })
        })
        .collect();
    // Everyone else is served meanwhile.
    let started = Instant::now();
    let (status, health) = gw.http_get("/health");
    assert_eq!(status, 200, "{health}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "/health took {:?} while FIFO reads were in flight",
        started.elapsed()
    );
    for reader in readers {
        let (raw, took) = reader.join().unwrap();
        assert!(
            raw.starts_with("HTTP/1.1 400"),
            "FIFO read not refused: {raw}"
        );
        assert!(raw.contains("NOT_A_REGULAR_FILE"), "{raw}");
        assert!(took < Duration::from_secs(5), "FIFO read took {took:?}");
    }
    // Writing to it is refused as quickly, and it stays a FIFO.
    let started = Instant::now();
    let (status, body) = http(&gw, "PUT", "/api/files/fifo", &token, b"data");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("NOT_A_REGULAR_FILE")),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(ws.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    // Listing shows it without opening it.
    let (status, listing) = http(&gw, "GET", "/api/files", &token, b"");
    assert_eq!(status, 200);
    assert!(
        listing["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "fifo" && e["type"] == "special"),
        "{listing}"
    );
}

#[tokio::test]
async fn oversized_and_aborted_uploads_leave_nothing_and_replace_nothing() {
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let token = gw.create_token("uploader");
    let ws = gw.workspace("uploader");
    // An existing file survives a failed upload over it untouched.
    assert_eq!(
        http(&gw, "PUT", "/api/files/keep.txt", &token, b"v1").0,
        201
    );
    let big = vec![b'x'; (64 << 20) + 1];
    let (status, _) = http(&gw, "PUT", "/api/files/big.bin", &token, &big);
    assert_eq!(status, 413);
    let (status, _) = http(&gw, "PUT", "/api/files/keep.txt", &token, &big);
    assert_eq!(status, 413);
    assert_eq!(read(&ws.join("keep.txt")), "v1");
    // An upload whose client goes away halfway.
    {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
        write!(
            s,
            "PUT /api/files/big-aborted.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
            10 << 20
        )
        .unwrap();
        s.write_all(&vec![b'y'; 1 << 20]).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !upload_leftovers(&ws).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        upload_leftovers(&ws).is_empty(),
        "{:?}",
        upload_leftovers(&ws)
    );
    // A complete upload lands in one piece.
    assert_eq!(
        http(&gw, "PUT", "/api/files/keep.txt", &token, b"v2").0,
        201
    );
    assert_eq!(read(&ws.join("keep.txt")), "v2");
}

// ---- HTTP limits ---------------------------------------------------------------

/// Whether the gateway closed `s` (EOF or reset) within `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A refusal's one-line answer; the close follows.
            Ok(Ok(_)) => continue,
        }
    }
}

async fn half_open_from(source: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    let mut s = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await?;
    // Half a request line, then nothing.
    let _ = s.write_all(b"GET /health HT").await;
    Ok(s)
}

#[tokio::test]
async fn half_open_connections_neither_lock_out_clients_nor_stay_open() {
    let gw = Gateway::start(&[
        "--agent",
        "echo",
        "--enable-warm-pool",
        "false",
        "--header-read-timeout",
        "3s",
    ]);
    let mut flood = Vec::new();
    for _ in 0..2000 {
        if let Ok(s) = half_open_from("127.0.0.2", gw.port).await {
            flood.push(s);
        }
    }
    assert!(
        flood.len() > 1000,
        "only {} connections opened",
        flood.len()
    );
    // An authenticated client connects and is answered within a second.
    let started = Instant::now();
    let mut c = tokio::time::timeout(Duration::from_secs(1), gw.connect_as(&gw.token, None))
        .await
        .expect("the WebSocket connect took over a second during the flood")
        .expect("connect");
    c.send(json!({"type": "ping", "id": 7})).await;
    let pong = c
        .until(|v| is_type(v, "pong"), Duration::from_secs(1))
        .await;
    assert!(!pong.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "connect + ping took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(gw.http_get("/health").0, 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    // A stalled connection from an address under its cap is held, not
    // refused ...
    let mut lone = half_open_from("127.0.0.3", gw.port).await.unwrap();
    assert!(!closed_within(&mut lone, Duration::from_millis(500)).await);
    // ... and every stalled one is closed by the header timeout.
    assert!(closed_within(&mut lone, Duration::from_secs(6)).await);
    let checks = flood
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_secs(6)));
    let closed = futures_util::future::join_all(checks).await;
    let open = closed.iter().filter(|c| !**c).count();
    assert_eq!(open, 0, "{open} half-open connections still open");
    drop(flood);
    // The authenticated client is unaffected.
    c.send(json!({"type": "ping", "id": 8})).await;
    assert!(
        !c.until(|v| is_type(v, "pong"), Duration::from_secs(5))
            .await
            .is_empty()
    );
}

// ---- tokens -----------------------------------------------------------------------

#[tokio::test]
async fn api_routes_take_tokens_from_the_header_only() {
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let t = gw.token.clone();
    for path in [
        format!("/api/admin/overview?token={t}"),
        format!("/api/me?token={t}"),
        format!("/api/sessions?token={t}"),
        format!("/api/files?token={t}"),
    ] {
        let (status, body) = gw.http("GET", &path, None, None);
        assert_eq!(status, 401, "{path}: {body}");
    }
    // The same token in the header works.
    assert_eq!(gw.http_get("/api/admin/overview").0, 200);
}
