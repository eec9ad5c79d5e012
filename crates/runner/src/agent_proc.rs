//! The agent child process: JSON lines on stdin/stdout, stderr captured.
//!
//! The agent's stderr is always read and forwarded (the original system lost a
//! week to an SDK that sent it to /dev/null); its tail goes into `agent_exit`.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aishell_protocol::agent::AgentInfo;
use aishell_protocol::runner::AgentSpec;
use aishell_protocol::{AgentEvent, AgentInput};
use std::os::fd::AsRawFd;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

/// Lines of stderr kept for `agent_exit.stderr_tail`.
const STDERR_TAIL_LINES: usize = 20;
/// Longest stdout line accepted from an agent (a frame), in bytes.
pub const MAX_LINE_BYTES: usize = 16 << 20;
/// Longest stderr line forwarded; the rest of a longer one is counted and
/// skipped, never buffered.
const MAX_STDERR_LINE_BYTES: usize = 8 << 10;

pub enum AgentOutput {
    Event(AgentEvent),
    BadLine(String),
    /// A stdout line longer than MAX_LINE_BYTES, skipped unread: its length.
    OversizedLine(usize),
    Stderr(String),
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        stderr_tail: String,
    },
}

pub struct AgentProcess {
    input: mpsc::UnboundedSender<AgentInput>,
    output: mpsc::Receiver<AgentOutput>,
    kill: Option<oneshot::Sender<()>>,
    pub info: AgentInfo,
    /// The child's process id (for checking its credentials).
    pub pid: Option<u32>,
    /// The sandbox's network link; ends with the agent.
    pub egress: Option<crate::egress::Egress>,
}

/// The command line for an agent spec: an explicit command, or a built-in
/// kind run by this very binary. Sandboxing wraps this command at spawn time.
pub fn agent_command(program: &Path, spec: &AgentSpec) -> Vec<String> {
    match &spec.command {
        Some(cmd) if !cmd.is_empty() => cmd.clone(),
        _ => vec![
            program.to_string_lossy().into_owned(),
            "agent".into(),
            spec.kind.clone(),
        ],
    }
}

impl AgentProcess {
    /// Spawn `command` in `workspace`. Unconfined, the agent inherits the
    /// runner's environment plus `env`; confined, `command` is a bwrap line
    /// that carries the agent's whole environment itself, and `limits` apply.
    pub fn spawn(
        command: &[String],
        workspace: &str,
        env: &BTreeMap<String, String>,
        confined: Option<crate::sandbox::Confinement>,
    ) -> std::io::Result<Self> {
        let (program, args) = command.split_first().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty agent command")
        })?;
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(workspace);
        // Held until the agent exits (the cgroup is removed then).
        let mut cgroup = None;
        // Open until the child is spawned (it inherits them), then closed.
        let mut inherited_fds = Vec::new();
        match confined {
            Some(confinement) => {
                // Not even the runner's credential reaches a confined agent.
                cmd.env_clear();
                if !confinement.under_bwrap {
                    // UID isolation has no bwrap line to carry the environment.
                    cmd.envs(env);
                }
                let join = confinement
                    .cgroup
                    .as_ref()
                    .map(|c| c.join_fds())
                    .unwrap_or_default();
                let keep = confinement
                    .inherited_fds
                    .iter()
                    .map(|fd| fd.as_raw_fd())
                    .collect();
                confinement
                    .limits
                    .apply(&mut cmd, join, keep, confinement.seccomp);
                cgroup = confinement.cgroup;
                inherited_fds = confinement.inherited_fds;
            }
            None => {
                // The runner's credential is its own, not the agent's.
                cmd.env_remove("AISHELL_TASK_CREDENTIAL").envs(env);
            }
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        drop(inherited_fds);
        let pid = child.id();
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");

        let (input_tx, mut input_rx) = mpsc::unbounded_channel::<AgentInput>();
        tokio::spawn(async move {
            let mut stdin = stdin;
            while let Some(frame) = input_rx.recv().await {
                if stdin.write_all(frame.to_line().as_bytes()).await.is_err()
                    || stdin.flush().await.is_err()
                {
                    break;
                }
            }
        });

        let (out_tx, out_rx) = mpsc::channel(1024);
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)));

        let stdout_tx = out_tx.clone();
        let stdout_task = tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(64 * 1024, stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match read_line_capped(&mut reader, &mut line, MAX_LINE_BYTES).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) if n > MAX_LINE_BYTES => {
                        line.clear();
                        line.shrink_to(64 * 1024);
                        if stdout_tx.send(AgentOutput::OversizedLine(n)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                if text.is_empty() {
                    continue;
                }
                let out = match AgentEvent::decode_line(text) {
                    Ok(ev) => AgentOutput::Event(ev),
                    Err(_) => AgentOutput::BadLine(text.chars().take(2000).collect()),
                };
                if stdout_tx.send(out).await.is_err() {
                    break;
                }
            }
        });

        let stderr_tx = out_tx.clone();
        let stderr_tail = tail.clone();
        let stderr_task = tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(MAX_STDERR_LINE_BYTES, stderr);
            let mut bytes = Vec::with_capacity(MAX_STDERR_LINE_BYTES);
            loop {
                bytes.clear();
                let n = match read_line_capped(&mut reader, &mut bytes, MAX_STDERR_LINE_BYTES).await
                {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut line = String::from_utf8_lossy(&bytes)
                    .trim_end_matches(['\n', '\r'])
                    .to_string();
                if n > MAX_STDERR_LINE_BYTES {
                    line.push_str(&format!("…[truncated {} bytes]", n - bytes.len()));
                }
                {
                    let mut t = stderr_tail.lock().expect("tail lock");
                    if t.len() == STDERR_TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(line.clone());
                }
                if stderr_tx.send(AgentOutput::Stderr(line)).await.is_err() {
                    break;
                }
            }
        });

        let (kill_tx, kill_rx) = oneshot::channel();
        tokio::spawn(wait_for_exit(
            child,
            cgroup,
            kill_rx,
            stdout_task,
            stderr_task,
            tail,
            out_tx,
        ));

        Ok(AgentProcess {
            input: input_tx,
            output: out_rx,
            kill: Some(kill_tx),
            info: AgentInfo::default(),
            pid,
            egress: None,
        })
    }

    pub fn send(&self, input: AgentInput) {
        let _ = self.input.send(input);
    }

    pub async fn next_output(&mut self) -> AgentOutput {
        match self.output.recv().await {
            Some(out) => out,
            None => std::future::pending().await,
        }
    }

    /// The next output if one is already waiting.
    pub fn try_next_output(&mut self) -> Option<AgentOutput> {
        self.output.try_recv().ok()
    }

    /// Kill the agent without waiting; its exit arrives as [`AgentOutput::Exited`].
    pub fn start_kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }

    pub async fn kill(mut self) {
        self.start_kill();
        // Let the waiter reap it so no zombie is left behind.
        while let Some(out) = self.output.recv().await {
            if matches!(out, AgentOutput::Exited { .. }) {
                break;
            }
        }
    }
}

async fn wait_for_exit(
    mut child: Child,
    cgroup: Option<crate::cgroup::SandboxCgroup>,
    kill: oneshot::Receiver<()>,
    stdout_task: tokio::task::JoinHandle<()>,
    stderr_task: tokio::task::JoinHandle<()>,
    tail: Arc<Mutex<VecDeque<String>>>,
    out_tx: mpsc::Sender<AgentOutput>,
) {
    let status = tokio::select! {
        status = child.wait() => status,
        _ = kill => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    // Output written just before exit must reach the gateway before the exit
    // report; a grandchild holding the pipes open must not block it forever.
    let _ = tokio::time::timeout(Duration::from_secs(1), stdout_task).await;
    let _ = tokio::time::timeout(Duration::from_millis(200), stderr_task).await;
    drop(cgroup);
    let (code, signal) = match status {
        Ok(s) => (s.code(), s.signal()),
        Err(_) => (None, None),
    };
    let stderr_tail = tail
        .lock()
        .expect("tail lock")
        .iter()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    let _ = out_tx
        .send(AgentOutput::Exited {
            code,
            signal,
            stderr_tail,
        })
        .await;
}

/// Read one line into `buf`, keeping at most `cap` bytes of it (the rest
/// is consumed and skipped, never buffered); returns the line's whole length.
/// A line over `cap` keeps its first `cap` bytes (see the stderr reader).
async fn read_line_capped<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(total);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let n = chunk.len();
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..n.min(room)]);
        total += n;
        reader.consume(n);
        if done {
            return Ok(total);
        }
    }
}
