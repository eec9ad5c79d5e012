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

use crate::prestart::SANDBOX_WORKSPACE;

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

/// The bwrap command line that runs `command` confined to `workspace`,
/// which the agent sees at [`SANDBOX_WORKSPACE`] (the same path whichever
/// user it serves, so a sandbox can start before its user is known).
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
        // Never the host's network: with `settings.network` on, the runner
        // connects this namespace to the outside (crate::egress).
        "--unshare-net",
    ]);
    let _ = settings.network;
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
    push(&[
        "--bind",
        &ws,
        SANDBOX_WORKSPACE,
        "--chdir",
        SANDBOX_WORKSPACE,
    ]);
    let mut env = env.clone();
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
    env.insert("HOME".into(), SANDBOX_WORKSPACE.to_string());
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
    pub identity: AgentIdentity,
}

/// Whose identity the agent process runs under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AgentIdentity {
    /// The runner's (under bubblewrap: its namespaces confine the agent).
    #[default]
    Runner,
    /// Per-user UID isolation: this UID (and GID), with no supplementary
    /// groups and no new privileges.
    User(u32),
    /// Per-user UID isolation, pre-started: the agent starts as root and
    /// takes its user's UID itself on `init` (`aishell agent --await-init`).
    UserAtInit,
}

impl Limits {
    pub fn from_settings(s: &SandboxSettings) -> Self {
        Limits {
            memory_bytes: s.memory_bytes,
            max_files: s.max_files,
            max_processes: s.max_processes,
            cpu_seconds: s.cpu_seconds,
            identity: AgentIdentity::Runner,
        }
    }

    /// The agent runs under a per-user UID (now or from `init` on), not
    /// under bubblewrap.
    pub fn uid_isolated(&self) -> bool {
        self.identity != AgentIdentity::Runner
    }

    /// Install the limits on `cmd`'s child process.
    pub fn apply(self, cmd: &mut tokio::process::Command) {
        if let AgentIdentity::User(uid) = self.identity {
            // std drops the supplementary groups when root switches UID.
            cmd.uid(uid).gid(uid);
        }
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
                // Runs after the UID switch: no set-uid binary can undo it.
                if matches!(self.identity, AgentIdentity::User(_))
                    && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // As root, NPROC counts every root process on the machine
                // (root itself is exempt from it); an agent that becomes its
                // user on `init` takes the limit along.
                if libc::getuid() != 0 || self.identity == AgentIdentity::UserAtInit {
                    set(libc::RLIMIT_NPROC, self.max_processes)?;
                }
                Ok(())
            });
        }
    }
}

/// First UID handed to a user under [`Isolation::Uid`](aishell_protocol::runner::Isolation).
pub const FIRST_AGENT_UID: u32 = 100_000;
/// Allocation state under the workspaces root. User ids never start with a
/// dot, so no workspace can be named like this.
const UID_STATE_DIR: &str = ".aishell-uids";

/// Per-user UID isolation (docker backend): give `workspace`'s user a UID of
/// its own, make the workspace theirs with mode 0700, and the workspaces root
/// 0711 (others may pass through to their own directory, not list it).
///
/// A user keeps the UID that owns their workspace; a new user gets the next
/// one from a counter under the root, allocated under an exclusive `flock`
/// because runners in several containers share the directory. When a
/// workspace gets its UID, every entry root owns (uploaded through the
/// gateway's files API before the user's first task) is handed to the user;
/// later claims do not walk the workspace (81 ms per claim for 50,000 files,
/// more with a cold cache): the files API gives what it writes into a
/// workspace that has its UID to that UID as it writes it.
/// Needs root (the runner is root inside the aishell image).
pub fn prepare_uid_workspace(workspace: &Path) -> Result<u32, String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if unsafe { libc::geteuid() } != 0 {
        return Err("uid isolation needs the runner to run as root (it does in the aishell image); use --sandbox bwrap outside containers".into());
    }
    let err = |what: &str, e: std::io::Error| {
        format!(
            "cannot prepare workspace {}: {what}: {e}",
            workspace.display()
        )
    };
    let root = workspace
        .parent()
        .ok_or_else(|| format!("workspace {} has no parent", workspace.display()))?;
    std::fs::create_dir_all(root).map_err(|e| err("create root", e))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| err("chmod root", e))?;
    let state = root.join(UID_STATE_DIR);
    std::fs::create_dir_all(&state).map_err(|e| err("create uid state", e))?;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| err("chmod uid state", e))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state.join("lock"))
        .map_err(|e| err("open uid lock", e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own; released when `lock` drops.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(err("lock uid state", std::io::Error::last_os_error()));
    }
    let existing = match std::fs::symlink_metadata(workspace) {
        Ok(m) if m.file_type().is_symlink() || !m.is_dir() => {
            return Err(format!(
                "workspace {} is not a directory",
                workspace.display()
            ));
        }
        Ok(m) => Some(m.uid()).filter(|u| *u >= FIRST_AGENT_UID),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(workspace).map_err(|e| err("create", e))?;
            None
        }
        Err(e) => return Err(err("stat", e)),
    };
    let newly_assigned = existing.is_none();
    let uid = match existing {
        Some(uid) => uid,
        None => {
            let counter = state.join("next-uid");
            let next = std::fs::read_to_string(&counter)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .unwrap_or(FIRST_AGENT_UID)
                .max(FIRST_AGENT_UID);
            let tmp = state.join("next-uid.tmp");
            std::fs::write(&tmp, (next + 1).to_string())
                .map_err(|e| err("write uid counter", e))?;
            std::fs::rename(&tmp, &counter).map_err(|e| err("write uid counter", e))?;
            next
        }
    };
    // The workspace's owner is the record of the user's UID: set it under
    // the lock, then let concurrent claims of the same user walk in parallel.
    std::fs::set_permissions(workspace, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| err("chmod", e))?;
    std::os::unix::fs::lchown(workspace, Some(uid), Some(uid)).map_err(|e| err("chown", e))?;
    drop(lock);
    if newly_assigned {
        hand_root_entries_to(workspace, uid).map_err(|e| err("chown", e))?;
    }
    Ok(uid)
}

/// Check that every thread of process `pid` runs as `uid`/`uid` (real,
/// effective, saved and filesystem IDs) with no supplementary groups: how
/// the runner makes sure an agent that changed its own identity did.
pub fn check_runs_as(pid: u32, uid: u32) -> Result<(), String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("cannot read the agent's threads: {e}"))?;
    let want = format!("{uid}\t{uid}\t{uid}\t{uid}");
    let mut checked = 0;
    for task in tasks {
        let path = task
            .map_err(|e| format!("cannot read the agent's threads: {e}"))?
            .path()
            .join("status");
        let status = match std::fs::read_to_string(&path) {
            Ok(status) => status,
            // A thread that exited since the listing runs nothing any more.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ESRCH) =>
            {
                continue;
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        checked += 1;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("?")
                .to_string()
        };
        let (uids, gids, groups) = (field("Uid:"), field("Gid:"), field("Groups:"));
        if uids != want || gids != want || !groups.is_empty() {
            return Err(format!(
                "the agent does not run as uid {uid} (uids {uids}, gids {gids}, groups [{groups}])"
            ));
        }
    }
    if checked == 0 {
        return Err(format!("the agent (pid {pid}) has exited"));
    }
    Ok(())
}

/// `lchown` to `uid` every entry under (and including) `dir` that root owns;
/// never follows symlinks.
fn hand_root_entries_to(dir: &Path, uid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.uid() == 0 {
        std::os::unix::fs::lchown(dir, Some(uid), Some(uid))?;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                hand_root_entries_to(&path, uid)?;
            } else if entry.metadata()?.uid() == 0 {
                std::os::unix::fs::lchown(&path, Some(uid), Some(uid))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// `prepare_uid_workspace` needs root; elsewhere its tests say so and skip.
    fn root_or_skip() -> bool {
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("not root: prepare_uid_workspace needs root; skipped");
        }
        root
    }

    fn owner(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().uid()
    }

    #[test]
    fn uid_isolation_gives_each_user_a_stable_uid_and_a_private_workspace() {
        use std::os::unix::fs::PermissionsExt;
        if !root_or_skip() {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let alice = root.path().join("alice");
        std::fs::create_dir(&alice).unwrap();
        std::fs::write(alice.join("uploaded.txt"), "from the files API").unwrap();
        let a = prepare_uid_workspace(&alice).unwrap();
        let b = prepare_uid_workspace(&root.path().join("bob")).unwrap();
        assert_ne!(a, b);
        assert!(a >= FIRST_AGENT_UID && b >= FIRST_AGENT_UID);
        assert_eq!(
            prepare_uid_workspace(&alice).unwrap(),
            a,
            "a user keeps their uid"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&alice), 0o700);
        assert_eq!(mode(root.path()), 0o711);
        assert_eq!(mode(&root.path().join(UID_STATE_DIR)), 0o700);
        assert_eq!(owner(&alice.join("uploaded.txt")), a);
        assert_eq!(owner(&alice), a);
    }

    /// Only the claim that gives a workspace its UID walks it: a later claim
    /// costs the same for a workspace of 50,000 files as for an empty one.
    /// (Root writes into a workspace with a UID are the files API's, which
    /// hands each entry over as it writes it.)
    #[test]
    fn only_the_claim_that_assigns_the_uid_walks_the_workspace() {
        if !root_or_skip() {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let alice = root.path().join("alice");
        std::fs::create_dir_all(alice.join("docs")).unwrap();
        std::fs::write(alice.join("docs/before.txt"), "uploaded first").unwrap();
        let uid = prepare_uid_workspace(&alice).unwrap();
        assert_eq!(
            owner(&alice.join("docs/before.txt")),
            uid,
            "the first claim hands root's entries over"
        );
        std::fs::write(alice.join("docs/later.txt"), "root, after").unwrap();
        assert_eq!(prepare_uid_workspace(&alice).unwrap(), uid);
        assert_eq!(
            owner(&alice.join("docs/later.txt")),
            0,
            "a later claim did not walk the workspace"
        );
    }

    #[test]
    fn the_credential_check_reads_every_id_of_a_live_process() {
        let me = std::process::id();
        let uid = unsafe { libc::getuid() };
        let gid = unsafe { libc::getgid() };
        let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let result = check_runs_as(me, uid);
        if uid == gid && groups == 0 {
            result.unwrap();
        }
        let err = check_runs_as(me, uid + 4242).unwrap_err();
        assert!(
            err.contains(&format!("does not run as uid {}", uid + 4242)),
            "{err}"
        );
        assert!(check_runs_as(u32::MAX - 1, uid).is_err(), "no such process");
    }

    #[test]
    fn threads_that_exit_during_the_credential_check_do_not_fail_it() {
        let me = std::process::id();
        let uid = unsafe { libc::getuid() };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let short: Vec<_> = (0..8)
                        .map(|_| {
                            std::thread::spawn(|| {
                                std::thread::sleep(std::time::Duration::from_micros(200))
                            })
                        })
                        .collect();
                    short.into_iter().for_each(|t| t.join().unwrap());
                }
            })
        };
        for _ in 0..300 {
            if let Err(e) = check_runs_as(me, uid) {
                assert!(e.contains("does not run as"), "{e}");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().unwrap();
    }

    #[test]
    fn only_the_workspace_is_bound_writable_and_no_other_user_path_appears() {
        let settings = SandboxSettings {
            network: false,
            ..Default::default()
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
        let binds: Vec<(&String, &String)> = args
            .windows(3)
            .filter(|w| w[0] == "--bind")
            .map(|w| (&w[1], &w[2]))
            .collect();
        assert_eq!(
            binds,
            [(
                &"/data/workspaces/alice".to_string(),
                &"/workspace".to_string()
            )]
        );
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
