//! Small OS helpers: liveness checks, signalling process groups, exit reasons.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Whether `pid` names a live (not zombie) process.
///
/// `kill(pid, 0)` succeeds for zombies too, so `/proc/{pid}/stat` is checked
/// as well where it exists.
pub(crate) fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match kill(Pid::from_raw(pid), None) {
        Ok(()) | Err(Errno::EPERM) => {}
        Err(_) => return false,
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Format: `pid (comm) S ...`; comm may contain spaces or parens, so
        // look at the first field after the last `)`.
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].split_whitespace().next(), Some("Z" | "X")),
            None => true,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(_) => true,
    }
}

/// Whether `/proc/{pid}/environ` contains exactly `AISHELL_TASK_ID={task_id}`.
/// Guards adoption against pid reuse.
pub(crate) fn environ_has_task(pid: i32, task_id: &str) -> bool {
    let want = format!("AISHELL_TASK_ID={task_id}");
    // A process in the middle of an exec (a shell that execs its command)
    // briefly shows no environment at all: look again before saying no.
    for attempt in 0..5 {
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/environ")) else {
            return false;
        };
        if !raw.is_empty() {
            return raw.split(|b| *b == 0).any(|kv| kv == want.as_bytes());
        }
        std::thread::sleep(std::time::Duration::from_millis(2 << attempt));
    }
    false
}

/// Send `sig` to the whole process group `pgid`. A group that is already gone
/// is not an error.
pub(crate) fn signal_group(pgid: i32, sig: Signal) -> Result<(), Errno> {
    if pgid <= 1 {
        // Never signal group 0 (our own) or 1; a bad pgid must not hurt us.
        return Err(Errno::EINVAL);
    }
    match killpg(Pid::from_raw(pgid), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `(code, reason)` for an exit status, in words a human reads in a log.
pub(crate) fn describe_exit(status: ExitStatus) -> (Option<i32>, String) {
    if let Some(code) = status.code() {
        return (Some(code), format!("exited with code {code}"));
    }
    if let Some(sig) = status.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        let core = if status.core_dumped() {
            ", core dumped"
        } else {
            ""
        };
        return (None, format!("killed by signal {sig} ({name}){core}"));
    }
    (None, format!("ended: {status}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_exit_codes_and_signals() {
        let (code, reason) = describe_exit(ExitStatus::from_raw(3 << 8));
        assert_eq!(code, Some(3));
        assert_eq!(reason, "exited with code 3");
        let (code, reason) = describe_exit(ExitStatus::from_raw(9));
        assert_eq!(code, None);
        assert_eq!(reason, "killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn liveness_of_self_and_nonsense() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
        assert!(!pid_alive(-5));
        assert!(signal_group(0, Signal::SIGTERM).is_err());
        assert!(signal_group(1, Signal::SIGTERM).is_err());
    }
}
