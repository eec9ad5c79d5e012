//! Running one `sh -c` command in the workspace, shared by the `shell`
//! agent and the `llm` agent's `bash` tool.
//!
//! * The command runs in its own process group; a timeout or an abort kills
//!   the whole group (SIGKILL), and so does dropping the future (cancelled
//!   task).
//! * stdout and stderr are read as they arrive (interleaved, lossy UTF-8,
//!   never splitting a character), capped at `output_limit` bytes with an
//!   `[output truncated]` marker; the command keeps running past the cap (its
//!   output is drained and discarded). With a [`Turn`], every chunk is also
//!   streamed as a `text_delta`.
//! * Background processes that outlive the command are left alone unless they
//!   hold its output pipes open, in which case they are killed too (shortly
//!   after the command exits) so the call can return.

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use aishell_protocol::agent::AgentEvent;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::wire::{AbortSignal, Turn};

/// Marker appended where output was cut.
const TRUNCATED_MARKER: &str = "[output truncated]";
/// After the command exits, how long its output pipes may stay open (held by
/// background processes) before the rest of its process group is killed.
const EXIT_GRACE: Duration = Duration::from_millis(200);

/// What to run and within which bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) timeout: Duration,
    pub(crate) output_limit: usize,
}

/// How a command ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum End {
    Exited(i32),
    Signaled(i32),
    TimedOut(Duration),
    Aborted,
}

/// Kills the command's process group if the command is dropped unfinished
/// (task cancelled at shutdown).
struct ProcessGroup {
    /// The leader's pid while it has not been reaped (so the id is safe to use).
    pgid: Option<Pid>,
}

impl ProcessGroup {
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run one command; stream its output; return the capped output and how it
/// ended. `Err` only when it could not be started or waited for.
pub(crate) async fn execute(
    workspace: &Path,
    command: &str,
    settings: Limits,
    signal: &mut AbortSignal,
    turn: Option<&Turn>,
) -> std::io::Result<(String, End)> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(workspace)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let leader = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw);
    let mut group = ProcessGroup { pgid: leader };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut capture = Capture::new(settings.output_limit, turn);
    let mut dec_out = Utf8Stream::default();
    let mut dec_err = Utf8Stream::default();
    let mut buf_out = vec![0u8; 16 * 1024];
    let mut buf_err = vec![0u8; 16 * 1024];
    let deadline = tokio::time::sleep(settings.timeout);
    tokio::pin!(deadline);
    let grace = tokio::time::sleep(Duration::from_secs(86_400 * 365));
    tokio::pin!(grace);
    let mut status: Option<ExitStatus> = None;
    let mut killed: Option<End> = None;
    let mut stragglers: Option<Pid> = None;

    while status.is_none() || stdout.is_some() || stderr.is_some() {
        tokio::select! {
            // Abort and timeout first so endless output cannot starve them;
            // stdout before stderr, output before the exit status.
            biased;
            _ = signal.aborted(), if status.is_none() && killed.is_none() => {
                group.kill();
                killed = Some(End::Aborted);
            },
            _ = &mut deadline, if status.is_none() && killed.is_none() => {
                group.kill();
                killed = Some(End::TimedOut(settings.timeout));
            },
            _ = &mut grace, if status.is_some() => {
                // The command exited but something still holds its output open:
                // kill what is left of its group and stop reading.
                if let Some(pgid) = stragglers.take() {
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
                capture.push(&dec_out.finish()).await;
                capture.push(&dec_err.finish()).await;
                stdout = None;
                stderr = None;
            },
            r = read_some(&mut stdout, &mut buf_out), if stdout.is_some() => match r {
                Ok(n) if n > 0 => capture.push(&dec_out.push(&buf_out[..n])).await,
                _ => {
                    capture.push(&dec_out.finish()).await;
                    stdout = None;
                }
            },
            r = read_some(&mut stderr, &mut buf_err), if stderr.is_some() => match r {
                Ok(n) if n > 0 => capture.push(&dec_err.push(&buf_err[..n])).await,
                _ => {
                    capture.push(&dec_err.finish()).await;
                    stderr = None;
                }
            },
            st = child.wait(), if status.is_none() => {
                status = Some(st?);
                // Reaped: from now on the group id is only safe to signal while
                // other members keep it alive, which they do if they hold our
                // pipes open.
                let leader = group.pgid.take();
                if stdout.is_some() || stderr.is_some() {
                    stragglers = leader;
                    grace.as_mut().reset(tokio::time::Instant::now() + EXIT_GRACE);
                }
            },
        }
    }
    let status = status.expect("loop ends only after the command was reaped");
    let end = killed.unwrap_or_else(|| match status.code() {
        Some(code) => End::Exited(code),
        None => End::Signaled(status.signal().unwrap_or(0)),
    });
    Ok((capture.finish(), end))
}

async fn read_some<R: AsyncRead + Unpin>(
    reader: &mut Option<R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match reader {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// The capped copy of a command's output, streamed as `text_delta`s when
/// there is a turn to stream to.
struct Capture<'a> {
    limit: usize,
    text: String,
    truncated: bool,
    turn: Option<&'a Turn>,
}

impl<'a> Capture<'a> {
    fn new(limit: usize, turn: Option<&'a Turn>) -> Self {
        Capture {
            limit,
            text: String::new(),
            truncated: false,
            turn,
        }
    }

    async fn push(&mut self, chunk: &str) {
        if chunk.is_empty() || self.truncated {
            return;
        }
        let room = self.limit.saturating_sub(self.text.len());
        let mut cut = chunk.len().min(room);
        while !chunk.is_char_boundary(cut) {
            cut -= 1;
        }
        let part = &chunk[..cut];
        if !part.is_empty() {
            self.text.push_str(part);
            self.delta(part.to_string()).await;
        }
        if cut < chunk.len() {
            self.truncated = true;
            self.delta(format!("\n{TRUNCATED_MARKER}\n")).await;
        }
    }

    async fn delta(&self, delta: String) {
        if let Some(turn) = self.turn {
            turn.send(AgentEvent::TextDelta {
                conversation_id: turn.conversation_id().to_string(),
                delta,
            })
            .await;
        }
    }

    fn finish(mut self) -> String {
        if self.truncated {
            if !self.text.is_empty() && !self.text.ends_with('\n') {
                self.text.push('\n');
            }
            self.text.push_str(TRUNCATED_MARKER);
        }
        self.text
    }
}

/// Incremental lossy UTF-8 decoding that keeps an incomplete trailing
/// character for the next chunk instead of mangling it.
#[derive(Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, bytes: &[u8]) -> String {
        let data: Vec<u8>;
        let data: &[u8] = if self.pending.is_empty() {
            bytes
        } else {
            let mut joined = std::mem::take(&mut self.pending);
            joined.extend_from_slice(bytes);
            data = joined;
            &data
        };
        let cut = complete_prefix_len(data);
        self.pending.extend_from_slice(&data[cut..]);
        String::from_utf8_lossy(&data[..cut]).into_owned()
    }

    fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

/// Length of `data` without a trailing, possibly still incomplete, character.
fn complete_prefix_len(data: &[u8]) -> usize {
    let mut start = 0;
    loop {
        match std::str::from_utf8(&data[start..]) {
            Ok(_) => return data.len(),
            Err(e) => match e.error_len() {
                None => return start + e.valid_up_to(),
                Some(n) => start += e.valid_up_to() + n,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stream_keeps_split_characters_whole() {
        let text = "héllo → wörld";
        let bytes = text.as_bytes();
        for split in 0..=bytes.len() {
            let mut dec = Utf8Stream::default();
            let mut got = dec.push(&bytes[..split]);
            got.push_str(&dec.push(&bytes[split..]));
            got.push_str(&dec.finish());
            assert_eq!(got, text, "split at {split}");
        }
    }

    #[test]
    fn utf8_stream_replaces_invalid_bytes() {
        let mut dec = Utf8Stream::default();
        let mut got = dec.push(b"a\xffb\xe2\x82");
        assert_eq!(got, "a\u{fffd}b");
        got.push_str(&dec.finish());
        assert_eq!(got, "a\u{fffd}b\u{fffd}");
    }
}
