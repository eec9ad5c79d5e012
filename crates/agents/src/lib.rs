//! Built-in headless agents of aishell (docs/protocol/agent.md): `echo`, `shell`, `llm`
//! (any OpenAI-compatible Chat Completions endpoint, with workspace tools)
//! and `claude` (an adapter for Claude Code's stream-json mode).
//!
//! Each speaks the agent protocol of [`aishell_protocol::agent`]: JSON lines
//! of [`AgentInput`](aishell_protocol::AgentInput) on stdin, JSON lines of
//! [`AgentEvent`](aishell_protocol::AgentEvent) on stdout, diagnostics as
//! plain lines on stderr. Guarantees common to all:
//!
//! * `init` is answered with the agent's own `init` (inputs before it are
//!   handled anyway);
//! * every `message` gets exactly one terminal frame for its conversation
//!   (`finish`, or `error` with `conversation_id`), also on abort (`error`
//!   code `ABORTED`), on internal failure (`INTERNAL`/`AGENT_ERROR`) and at
//!   end of input;
//! * input is handled in order and `pong` is sent after everything read
//!   before the `ping` has been handled, so a ping is a barrier;
//! * a malformed line gets `error` `BAD_FRAME` (no conversation) and the agent
//!   keeps going; end of input kills child processes and returns `Ok`.

use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};

mod await_init;
mod claude;
mod echo;
mod llm;
mod process;
mod shell;
mod wire;

pub use await_init::await_init;

/// The kinds [`run`] and [`run_stdio`] accept.
pub const BUILTIN_KINDS: &[&str] = &["echo", "shell", "llm", "claude"];

/// Run a built-in agent over this process's stdin/stdout until stdin closes.
///
/// When they are pipes (as a runner gives them), they are read and written
/// on the runtime's own thread. tokio's `stdin()`/`stdout()` hand every read
/// and write to a blocking-pool thread instead: a context switch each way
/// per line, and a pre-started agent created that thread in the middle of
/// its first reply. A terminal or file falls back to those.
///
/// `already_read` is input read before the agent started (see
/// [`await_init`]); the agent handles it first.
pub async fn run_stdio(kind: &str, already_read: Vec<u8>) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    use tokio::io::AsyncReadExt;
    use tokio::net::unix::pipe;
    let stdin: Box<dyn AsyncRead + Unpin + Send> =
        match on_pipe(std::io::stdin().as_fd(), pipe::Receiver::from_owned_fd) {
            Some(pipe) => Box::new(pipe),
            None => Box::new(tokio::io::stdin()),
        };
    let input = std::io::Cursor::new(already_read).chain(stdin);
    let output: Box<dyn AsyncWrite + Unpin + Send> =
        match on_pipe(std::io::stdout().as_fd(), pipe::Sender::from_owned_fd) {
            Some(pipe) => Box::new(pipe),
            None => Box::new(tokio::io::stdout()),
        };
    run(kind, input, output).await
}

/// `fd` as a tokio pipe end, when it is a pipe.
fn on_pipe<P>(
    fd: std::os::fd::BorrowedFd<'_>,
    open: fn(std::os::fd::OwnedFd) -> std::io::Result<P>,
) -> Option<P> {
    fd.try_clone_to_owned().and_then(open).ok()
}

/// Run a built-in agent over any reader/writer, in the current directory as
/// its workspace.
pub async fn run<R, W>(kind: &str, input: R, output: W) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    check_kind(kind)?;
    let workspace = std::env::current_dir()
        .map_err(|e| anyhow::anyhow!("cannot determine the workspace (current directory): {e}"))?;
    run_in(kind, input, output, workspace).await
}

/// Like [`run`] with an explicit workspace directory (the cwd is
/// process-global, so tests and embedders pass it here instead).
pub async fn run_in<R, W>(
    kind: &str,
    input: R,
    output: W,
    workspace: impl Into<PathBuf>,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    check_kind(kind)?;
    match kind {
        "echo" => echo::run(input, output).await,
        "llm" => llm::run(input, output, workspace.into()).await,
        "claude" => claude::run(input, output, workspace.into()).await,
        _ => shell::run(input, output, workspace.into()).await,
    }
}

/// Is `kind` a built-in agent? The error names the kinds there are.
pub fn check_kind(kind: &str) -> anyhow::Result<()> {
    if BUILTIN_KINDS.contains(&kind) {
        Ok(())
    } else {
        anyhow::bail!(
            "unknown agent kind `{kind}`; built-in kinds are: {}",
            BUILTIN_KINDS.join(", ")
        )
    }
}
