//! Test harness: a real `aishell serve` child on a loopback port with its own
//! data dir, and a WebSocket client that speaks the client protocol.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

pub const BIN: &str = env!("CARGO_BIN_EXE_aishell");

pub struct Gateway {
    child: Option<Child>,
    pub port: u16,
    pub token: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    logs: Arc<Mutex<Vec<String>>>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Gateway {
    /// Start a gateway with extra `serve` arguments.
    pub fn start(args: &[&str]) -> Gateway {
        Self::start_with_env(args, &[])
    }

    /// Start a gateway with extra arguments and environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Gateway {
        Self::start_on_port(0, args, env)
    }

    /// A gateway whose sessions run `agent` (an executable speaking the
    /// agent protocol, e.g. from [`agent_script`]), every start cold.
    pub fn start_cold_with_agent(agent: &Path) -> Gateway {
        Gateway::start(&[
            "--agent-command",
            agent.to_str().unwrap(),
            "--enable-warm-pool",
            "false",
        ])
    }

    /// Start a gateway on a chosen port (for arguments that must name it,
    /// such as an advertised runner URL); 0 picks a free one.
    pub fn start_on_port(port: u16, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = tmp.path().join("data");
        let mut gw = Gateway {
            child: None,
            port: 0,
            token: String::new(),
            data_dir,
            _tmp: Some(tmp),
            logs: Default::default(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        gw.spawn(port);
        gw
    }

    fn spawn(&mut self, port: u16) {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--port")
            .arg(port.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir);
        cmd.args(&self.args);
        cmd.env("RUST_LOG", "info");
        cmd.envs(self.env.iter().cloned());
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        // Runners must be able to outlive the gateway (restart tests), but not the test run.
        cmd.env("AISHELL_RUNNER_RECONNECT_DEADLINE_SECS", "20");
        let mut child = cmd.spawn().expect("spawn aishell serve");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("aishell is ready:") {
                    let _ = tx.send(line.clone());
                }
                logs.lock().unwrap().push(line);
            }
        });
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                logs.lock().unwrap().push(line);
            }
        });
        let banner = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "gateway did not print its banner; logs:\n{}",
                    self.logs.lock().unwrap().join("\n")
                )
            });
        let url = banner.split_whitespace().nth(3).expect("banner url");
        let rest = url.strip_prefix("http://127.0.0.1:").expect("banner host");
        let (p, q) = rest.split_once("/?token=").expect("banner token");
        self.port = p.parse().unwrap();
        self.token = q.to_string();
        self.child = Some(child);
    }

    /// Whether the process is still alive (not exited or crashed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `aishell token create --user USER` against this gateway's store.
    pub fn create_token(&self, user: &str) -> String {
        let out = Command::new(BIN)
            .args(["token", "create", "--user", user, "--data-dir"])
            .arg(&self.data_dir)
            .output()
            .expect("token create");
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn workspace(&self, user: &str) -> PathBuf {
        self.data_dir.join("workspaces").join(user)
    }

    /// Parsed JSON log lines so far.
    pub fn logs(&self) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn raw_logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Wait until a log line matches.
    pub async fn wait_log(
        &self,
        what: &str,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.logs().into_iter().find(|v| pred(v)) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "no log line for {what} within {timeout:?}; logs:\n{}",
                    self.raw_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn connect(&self) -> Client {
        Client::connect(&self.ws_url(), &self.token, None)
            .await
            .expect("connect")
    }

    pub async fn connect_as(
        &self,
        token: &str,
        resume: Option<(&str, u64)>,
    ) -> Result<Client, tungstenite::Error> {
        Client::connect(&self.ws_url(), token, resume).await
    }

    /// `GET path` on the gateway with its token: (status, JSON body).
    pub fn http_get(&self, path: &str) -> (u16, Value) {
        self.http("GET", path, Some(&self.token), None)
    }

    /// One HTTP/1.0 request with a chosen token (or none) and JSON body:
    /// (status, JSON body, `Null` when it is not JSON).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect http");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics_text(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect http");
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    /// The warm pool as `/health` reports it.
    pub fn pool(&self) -> Value {
        self.http_get("/health").1["pool"].clone()
    }

    /// Poll until the pool has `ready` ready tasks.
    pub async fn wait_pool_ready(&self, ready: u64, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let pool = self.pool();
            if pool["ready"].as_u64() == Some(ready) && pool["launching"].as_u64() == Some(0) {
                return pool;
            }
            if Instant::now() > deadline {
                panic!("pool never reached {ready} ready: {pool}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL the gateway (its tasks keep running), as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the gateway again on the same port and data dir.
    pub fn restart(&mut self, extra: &[&str]) {
        self.args.extend(extra.iter().map(|s| s.to_string()));
        let port = self.port;
        self.spawn(port);
    }

    /// SIGTERM (graceful: stops tasks) and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Client {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    pub session_id: String,
    /// The `session` frame (or error) received on connect.
    pub hello: Value,
    pub last_seq: u64,
}

pub const WAIT: Duration = Duration::from_secs(20);

impl Client {
    pub async fn connect(
        url: &str,
        token: &str,
        resume: Option<(&str, u64)>,
    ) -> Result<Client, tungstenite::Error> {
        let mut url = url.to_string();
        if let Some((sid, seq)) = resume {
            url = format!("{url}?session_id={sid}&last_seq={seq}");
        }
        let mut req = url.into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        let mut client = Client {
            ws,
            session_id: String::new(),
            hello: Value::Null,
            last_seq: 0,
        };
        // A gateway going away may close a just-upgraded socket: an error
        // the caller can retry on, not a panic.
        let Some(hello) = client.next(WAIT).await else {
            return Err(tungstenite::Error::ConnectionClosed);
        };
        client.session_id = hello["session_id"].as_str().unwrap_or_default().to_string();
        client.hello = hello;
        Ok(client)
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) -> Result<(), tungstenite::Error> {
        self.ws.send(m).await
    }

    pub async fn message(&mut self, id: &str, content: &str) {
        self.send(json!({"type": "message", "id": id, "content": content}))
            .await;
    }

    /// Next text frame as JSON; None when the socket closed or timed out.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        self.next_or_close(timeout).await.ok()
    }

    /// Next frame, or the close frame (code, reason) that ended the socket.
    pub async fn next_or_close(
        &mut self,
        timeout: Duration,
    ) -> Result<Value, Option<(u16, String)>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(m))) => m,
                _ => return Err(None),
            };
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).expect("frame is JSON");
                    let ephemeral = v["ephemeral"].as_bool().unwrap_or(false);
                    if let Some(s) = v["seq"].as_u64().filter(|_| !ephemeral) {
                        self.last_seq = s;
                    }
                    return Ok(v);
                }
                Message::Close(Some(CloseFrame { code, reason })) => {
                    return Err(Some((u16::from(code), reason.to_string())));
                }
                Message::Close(None) => return Err(None),
                _ => continue,
            }
        }
    }

    /// Collect frames up to and including the first one matching `pred`.
    pub async fn until(&mut self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(v) => {
                    let done = pred(&v);
                    got.push(v);
                    if done {
                        return got;
                    }
                }
                None => panic!(
                    "condition not met within {timeout:?}; frames so far:\n{}",
                    pretty(&got)
                ),
            }
        }
    }

    /// Frames until the turn ends (`finish` or an `error` naming a conversation).
    pub async fn turn(&mut self) -> Vec<Value> {
        self.until(
            |v| is_type(v, "finish") || (is_type(v, "error") && !v["conversation_id"].is_null()),
            WAIT,
        )
        .await
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

pub fn is_type(v: &Value, t: &str) -> bool {
    v["type"] == t
}

pub fn of_type<'a>(frames: &'a [Value], t: &str) -> Vec<&'a Value> {
    frames.iter().filter(|v| is_type(v, t)).collect()
}

pub fn text_of(frames: &[Value]) -> String {
    frames
        .iter()
        .filter(|v| is_type(v, "text_delta"))
        .map(|v| v["delta"].as_str().unwrap_or_default())
        .collect()
}

/// An executable `/bin/sh` agent at `dir/name` (for `--agent-command`).
pub fn agent_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let script = dir.join(name);
    // A root runner starts agents under their user's own UID: it must reach
    // the program.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

/// The first `error` frame among `frames` (panics, showing them, if none).
pub fn first_error(frames: &[Value]) -> &Value {
    of_type(frames, "error")
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no error frame: {}", pretty(frames)))
}

pub fn pretty(frames: &[Value]) -> String {
    frames
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Pids of processes whose environment contains `needle` (e.g. a session id).
pub fn pids_with_env(needle: &str, cmd_contains: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let dir = entry.path();
        let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(dir.join("cmdline")).unwrap_or_default())
                .replace('\0', " ");
        if cmdline.contains(cmd_contains)
            && environ
                .split(|b| *b == 0)
                .any(|kv| String::from_utf8_lossy(kv).contains(needle))
        {
            out.push(pid);
        }
    }
    out
}

/// Descendants of `root` (pid, command line with spaces for NULs).
pub fn descendants(root: i32) -> Vec<(i32, String)> {
    let parent_of = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let mut p = pid;
        while let Some(pp) = parent_of(p) {
            if pp == root {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
                break;
            }
            if pp <= 1 {
                break;
            }
            p = pp;
        }
    }
    found
}

/// The agent process (not its bwrap) of `kind` serving `session_id`,
/// found through the task its `task_ready` line names (a warm agent was
/// spawned before its session existed, so its environment cannot tell).
pub async fn agent_pids_of_session(gw: &Gateway, session_id: &str, kind: &str) -> Vec<i32> {
    let ready = gw
        .wait_log(
            "task_ready",
            |l| l["phase"] == "task_ready" && l["sessionId"] == session_id,
            Duration::from_secs(20),
        )
        .await;
    let task = ready["taskId"].as_str().unwrap().to_string();
    let runners = pids_with_env(&format!("AISHELL_TASK_ID={task}"), " runner");
    let needle = format!("agent {kind}");
    runners
        .into_iter()
        .flat_map(descendants)
        .filter(|(_, cmd)| cmd.contains(&needle) && !cmd.contains("bwrap"))
        .map(|(pid, _)| pid)
        .collect()
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
