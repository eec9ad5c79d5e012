//! Confining the agent with bubblewrap (SPEC §9, issue 6).
//!
//! At claim time, once the user is known, the agent runs in a fresh mount
//! namespace whose only writable place is the user's workspace; no other
//! user's directory exists in it (the workspaces root is not mounted, only
//! this one workspace). It gets its own PID namespace (other agents, and
//! their `/proc/<pid>/root`, are invisible), IPC and UTS namespaces, no
//! capabilities and no new privileges (bwrap's defaults), a clean
//! environment, and resource limits set with setrlimit (cgroup v1 only here).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use aishell_protocol::runner::SandboxSettings;

/// Read-only system directories an agent needs (binaries, libraries).
const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32"];
/// The parts of /etc programs need; not all of /etc (no shadow, no keys).
const ETC_FILES: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/localtime",
    "/etc/ld.so.cache",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/alternatives",
];

/// Absolute path of `bwrap` (the confined agent's environment is cleared,
/// so it is not looked up through PATH at spawn).
pub fn bwrap_path() -> String {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("bwrap"))
                .find(|p| p.is_file())
        })
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/usr/bin/bwrap".into())
}

/// Is bubblewrap installed and able to create namespaces here?
pub fn bwrap_available() -> Result<(), String> {
    let out = Command::new("bwrap")
        .args([
            "--ro-bind",
            "/",
            "/",
            "--unshare-pid",
            "--proc",
            "/proc",
            "true",
        ])
        .output()
        .map_err(|e| format!("bubblewrap (bwrap) is not installed: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "bubblewrap cannot create a sandbox here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The bwrap command line that runs `command` confined to `workspace`.
/// `env` is the agent's whole environment (bwrap starts from a clean one).
pub fn wrap(
    command: &[String],
    workspace: &Path,
    env: &BTreeMap<String, String>,
    settings: &SandboxSettings,
) -> Vec<String> {
    let mut args: Vec<String> = vec!["bwrap".into()];
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    push(&[
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--clearenv",
    ]);
    if !settings.network {
        push(&["--unshare-net"]);
    }
    for dir in SYSTEM_DIRS {
        let p = Path::new(dir);
        match std::fs::read_link(p) {
            // Merged /usr: /bin -> usr/bin and friends stay symlinks.
            Ok(target) => push(&["--symlink", &target.to_string_lossy(), dir]),
            Err(_) if p.is_dir() => push(&["--ro-bind", dir, dir]),
            Err(_) => {}
        }
    }
    for f in ETC_FILES {
        push(&["--ro-bind-try", f, f]);
    }
    push(&[
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/var/tmp",
    ]);
    // The agent's own program, when it lives outside the system directories.
    if let Some(program) = command.first().filter(|p| {
        Path::new(p).is_absolute() && !SYSTEM_DIRS.iter().any(|d| p.starts_with(&format!("{d}/")))
    }) {
        push(&["--ro-bind", program, program]);
    }
    let ws = workspace.to_string_lossy();
    push(&["--bind", &ws, &ws, "--chdir", &ws]);
    let mut env = env.clone();
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
    env.insert("HOME".into(), ws.to_string());
    env.insert("TMPDIR".into(), "/tmp".into());
    for (k, v) in &env {
        push(&["--setenv", k, v]);
    }
    push(&["--"]);
    args.extend(command.iter().cloned());
    args
}

/// Resource limits, applied in the child before exec (inherited by the agent).
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub max_files: Option<u64>,
    pub max_processes: Option<u64>,
    pub cpu_seconds: Option<u64>,
}

impl Limits {
    pub fn from_settings(s: &SandboxSettings) -> Self {
        Limits {
            memory_bytes: s.memory_bytes,
            max_files: s.max_files,
            max_processes: s.max_processes,
            cpu_seconds: s.cpu_seconds,
        }
    }

    /// Install the limits on `cmd`'s child process.
    pub fn apply(self, cmd: &mut tokio::process::Command) {
        // SAFETY: the closure only calls setrlimit/getuid, which are
        // async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let set = |resource, value: Option<u64>| -> std::io::Result<()> {
                    if let Some(v) = value {
                        let lim = libc::rlimit {
                            rlim_cur: v as libc::rlim_t,
                            rlim_max: v as libc::rlim_t,
                        };
                        if libc::setrlimit(resource, &lim) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                };
                set(libc::RLIMIT_AS, self.memory_bytes)?;
                set(libc::RLIMIT_NOFILE, self.max_files)?;
                set(libc::RLIMIT_CPU, self.cpu_seconds)?;
                // As root, NPROC counts every root process on the machine.
                if libc::getuid() != 0 {
                    set(libc::RLIMIT_NPROC, self.max_processes)?;
                }
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_workspace_is_bound_writable_and_no_other_user_path_appears() {
        let settings = SandboxSettings {
            network: false,
            memory_bytes: None,
            max_files: None,
            max_processes: None,
            cpu_seconds: None,
        };
        let cmd = vec![
            "/opt/aishell/bin/aishell".to_string(),
            "agent".into(),
            "shell".into(),
        ];
        let args = wrap(
            &cmd,
            Path::new("/data/workspaces/alice"),
            &BTreeMap::new(),
            &settings,
        );
        let binds: Vec<&String> = args
            .windows(2)
            .filter(|w| w[0] == "--bind")
            .map(|w| &w[1])
            .collect();
        assert_eq!(binds, ["/data/workspaces/alice"]);
        assert!(
            !args
                .iter()
                .any(|a| a == "/data/workspaces" || a.contains("bob"))
        );
        assert!(
            args.contains(&"--unshare-pid".to_string())
                && args.contains(&"--unshare-net".to_string())
        );
        assert!(args.contains(&"--clearenv".to_string()));
        assert!(!args.iter().any(|a| a == "/etc/shadow" || a == "/etc"));
        let sep = args.iter().position(|a| a == "--").unwrap();
        assert_eq!(&args[sep + 1..], &cmd[..]);
    }
}
