//! Limits per sandbox through cgroup v1 (see ARCHITECTURE.md, "Agent
//! sandbox"): one `pids` and one `memory` cgroup per agent, under
//! `/sys/fs/cgroup/<controller>/aishell/<name>`, which the agent's first
//! process joins between fork and exec and which are removed when it exits.
//! Where a controller is missing or not writable (not root, no v1
//! hierarchy) the limit is not applied and the caller says so once.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The directory under each controller that holds aishell's sandboxes.
const PARENT: &str = "aishell";

/// What to limit; `None` leaves a controller alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// `pids.max`: processes and threads of the whole sandbox.
    pub max_processes: Option<u64>,
    /// `memory.limit_in_bytes`: memory of the whole sandbox.
    pub memory_bytes: Option<u64>,
}

/// The cgroups of one sandbox; removed on drop (once empty).
#[derive(Debug)]
pub struct SandboxCgroup {
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each, opened by the runner for the child to write
    /// its own pid into (`0` means the writer).
    procs: Vec<OwnedFd>,
}

/// A limit that could not be put in place, and why.
#[derive(Debug, thiserror::Error)]
#[error("no per-sandbox {controller} limit ({path}: {source})")]
pub struct Unavailable {
    pub controller: &'static str,
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

impl SandboxCgroup {
    /// Create the cgroups `limits` asks for, named `name` (a task id). The
    /// limits that cannot be set come back as errors beside the rest.
    pub fn create(name: &str, limits: CgroupLimits) -> (Option<Self>, Vec<Unavailable>) {
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut cgroup = SandboxCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        let mut missing = Vec::new();
        let wanted = [
            ("pids", "pids.max", limits.max_processes),
            ("memory", "memory.limit_in_bytes", limits.memory_bytes),
        ];
        for (controller, file, value) in wanted {
            let Some(value) = value else { continue };
            let dir = Path::new(CGROUP_ROOT)
                .join(controller)
                .join(PARENT)
                .join(&name);
            match cgroup.add(&dir, file, value) {
                Ok(()) => {}
                Err(source) => missing.push(Unavailable {
                    controller,
                    path: dir.display().to_string(),
                    source,
                }),
            }
        }
        let cgroup = (!cgroup.dirs.is_empty()).then_some(cgroup);
        (cgroup, missing)
    }

    fn add(&mut self, dir: &Path, file: &str, value: u64) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        // The directory exists from here on: remove it with the rest.
        self.dirs.push(dir.to_path_buf());
        let set = || -> std::io::Result<OwnedFd> {
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(file))?
                .write_all(value.to_string().as_bytes())?;
            let procs = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))?;
            Ok(procs.into())
        };
        match set() {
            Ok(fd) => {
                self.procs.push(fd);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_dir(self.dirs.pop().expect("just pushed"));
                Err(e)
            }
        }
    }

    /// The files the child writes `0` into to join (see [`join_self`]).
    pub fn join_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|fd| fd.as_raw_fd()).collect()
    }

    /// The cgroup directories (for tests and logs).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

/// Move the calling process into the cgroups whose `cgroup.procs` are
/// `fds`. Async-signal-safe: called between fork and exec.
pub fn join_self(fds: &[RawFd]) -> std::io::Result<()> {
    for &fd in fds {
        // SAFETY: writing a static byte to a descriptor the parent opened.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Drop for SandboxCgroup {
    fn drop(&mut self) {
        self.procs.clear();
        let dirs = std::mem::take(&mut self.dirs);
        if dirs.is_empty() {
            return;
        }
        // The sandbox's last processes may still be exiting: retry briefly,
        // off the async runtime.
        std::thread::spawn(move || {
            for dir in dirs {
                for attempt in 0..50 {
                    match std::fs::remove_dir(&dir) {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                        Err(e) if attempt == 49 => {
                            tracing::warn!(event = "sandbox_cgroup_leftover", path = %dir.display(), error = %e, "cannot remove the sandbox's cgroup")
                        }
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
                    }
                }
            }
        });
    }
}
