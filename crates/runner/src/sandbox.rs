//! Confining the agent with bubblewrap.
//!
//! At claim time, once the user is known, the agent runs in a fresh mount
//! namespace whose only writable place is the user's workspace; no other
//! user's directory exists in it (the workspaces root is not mounted, only
//! this one workspace). It gets its own PID namespace (other agents, and
//! their `/proc/<pid>/root`, are invisible), IPC and UTS namespaces, no
//! capabilities and no new privileges (bwrap's defaults), a clean
//! environment, and resource limits set with setrlimit (cgroup v1 only here).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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

/// Who the agent is under bubblewrap. In every case the agent ends with
/// empty capability sets (bounding included), `NoNewPrivs` and the seccomp
/// filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxUser {
    /// Root runner, user known: the runner switches to the user's own UID
    /// before it executes bwrap, which then runs unprivileged and maps that
    /// UID to itself in a user namespace.
    Own(u32),
    /// Root runner, pre-started (user not yet known): bwrap runs as root
    /// without a user namespace and leaves the agent only CAP_SETUID,
    /// CAP_SETGID and CAP_SETPCAP; `aishell agent --await-init` empties
    /// every capability set and becomes its user on `init`, and the runner
    /// checks that in `/proc` before it reports the agent ready.
    AtInit,
    /// The runner is not root: a user namespace with the runner's own UID.
    Runner,
}

impl SandboxUser {
    /// The identity the agent's first process is started with.
    pub fn identity(self) -> AgentIdentity {
        match self {
            SandboxUser::Own(uid) => AgentIdentity::User(uid),
            SandboxUser::AtInit => AgentIdentity::UserAtInit,
            SandboxUser::Runner => AgentIdentity::Runner,
        }
    }
}

/// Size of the sandbox's `/tmp` and `/var/tmp` (each) when the settings
/// name none.
pub const DEFAULT_TMP_BYTES: u64 = 256 << 20;

/// A bwrap invocation: its options, the agent's command, and the open
/// files the options name by number (kept open across exec). Anything that
/// adds to the sandbox adds options (and files) here before [`Self::launch`].
#[derive(Debug, Default)]
pub struct BwrapCommand {
    pub options: Vec<String>,
    pub command: Vec<String>,
    pub fds: Vec<OwnedFd>,
}

impl BwrapCommand {
    fn push(&mut self, items: &[&str]) {
        self.options.extend(items.iter().map(|s| s.to_string()));
    }

    /// Add `option FD`, where the child inherits `fd` under the same number.
    pub fn pass_fd(&mut self, option: &str, fd: OwnedFd) {
        self.options.push(option.to_string());
        self.options.push(fd.as_raw_fd().to_string());
        self.fds.push(fd);
    }

    /// The whole command line, as bwrap would see it.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = vec!["bwrap".to_string()];
        argv.extend(self.options.iter().cloned());
        argv.push("--".into());
        argv.extend(self.command.iter().cloned());
        argv
    }

    /// Add the seccomp filter and move every option into a file bwrap
    /// reads (`--args FD`): the sandbox's `/proc/1/cmdline` then shows
    /// `bwrap --args N -- <agent command>`, not the workspace's host path. Returns the command line to
    /// execute and the files the child must inherit.
    pub fn launch(mut self) -> std::io::Result<(Vec<String>, Vec<OwnedFd>)> {
        let filter = crate::seccomp::to_bytes(&crate::seccomp::agent_filter());
        self.pass_fd("--seccomp", memfd_with(c"aishell-seccomp", &filter)?);
        let mut args = Vec::new();
        for a in &self.options {
            if a.contains('\0') {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a sandbox argument contains NUL",
                ));
            }
            args.extend_from_slice(a.as_bytes());
            args.push(0);
        }
        let args_fd = memfd_with(c"aishell-bwrap-args", &args)?;
        // bwrap reads only options from the file; the command follows.
        let mut argv = vec![
            bwrap_path(),
            "--args".to_string(),
            args_fd.as_raw_fd().to_string(),
            "--".to_string(),
        ];
        argv.extend(self.command);
        self.fds.push(args_fd);
        Ok((argv, self.fds))
    }
}

/// An anonymous file holding `data`, positioned at its start, close-on-exec
/// (the child that needs it clears that flag on its copy).
fn memfd_with(name: &std::ffi::CStr, data: &[u8]) -> std::io::Result<OwnedFd> {
    use std::io::{Seek, Write};
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(data)?;
    file.rewind()?;
    Ok(file.into())
}

/// The bwrap invocation that runs `command` confined to `workspace`,
/// which the agent sees at [`SANDBOX_WORKSPACE`] (the same path whichever
/// user it serves, so a sandbox can start before its user is known).
/// `env` is the agent's whole environment (bwrap starts from a clean one).
pub fn wrap(
    command: &[String],
    workspace: &Path,
    env: &BTreeMap<String, String>,
    settings: &SandboxSettings,
    user: SandboxUser,
) -> BwrapCommand {
    let mut bwrap = BwrapCommand {
        command: command.to_vec(),
        ..Default::default()
    };
    bwrap.push(&[
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--clearenv",
        // Never the host's network: with `settings.network` on, the runner
        // connects this namespace to the outside (crate::egress).
        "--unshare-net",
    ]);
    match user {
        SandboxUser::Own(uid) => {
            let id = uid.to_string();
            bwrap.push(&["--unshare-user", "--uid", &id, "--gid", &id]);
        }
        SandboxUser::Runner => bwrap.push(&["--unshare-user"]),
        SandboxUser::AtInit => bwrap.push(&[
            "--cap-drop",
            "ALL",
            "--cap-add",
            "CAP_SETUID",
            "--cap-add",
            "CAP_SETGID",
            "--cap-add",
            "CAP_SETPCAP",
        ]),
    }
    for dir in SYSTEM_DIRS {
        let p = Path::new(dir);
        match std::fs::read_link(p) {
            // Merged /usr: /bin -> usr/bin and friends stay symlinks.
            Ok(target) => bwrap.push(&["--symlink", &target.to_string_lossy(), dir]),
            Err(_) if p.is_dir() => bwrap.push(&["--ro-bind", dir, dir]),
            Err(_) => {}
        }
    }
    for f in ETC_FILES {
        bwrap.push(&["--ro-bind-try", f, f]);
    }
    let tmp_bytes = settings.tmp_bytes.unwrap_or(DEFAULT_TMP_BYTES).to_string();
    bwrap.push(&["--proc", "/proc", "--dev", "/dev"]);
    for tmp in ["/tmp", "/var/tmp"] {
        bwrap.push(&["--size", &tmp_bytes, "--tmpfs", tmp]);
    }
    // The agent's own program, when it lives outside the system directories.
    if let Some(program) = command.first().filter(|p| {
        Path::new(p).is_absolute() && !SYSTEM_DIRS.iter().any(|d| p.starts_with(&format!("{d}/")))
    }) {
        bwrap.push(&["--ro-bind", program, program]);
    }
    let ws = workspace.to_string_lossy();
    bwrap.push(&[
        "--bind",
        &ws,
        SANDBOX_WORKSPACE,
        "--chdir",
        // A pre-started sandbox's workspace may already be its user's
        // (0700, their UID) when bwrap, root without capabilities, gets
        // here: a claim can bind it while bwrap still waits for its
        // network. The agent enters `/workspace` itself on `init`.
        if user == SandboxUser::AtInit {
            "/"
        } else {
            SANDBOX_WORKSPACE
        },
    ]);
    let mut env = env.clone();
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
    env.insert("HOME".into(), SANDBOX_WORKSPACE.to_string());
    env.insert("TMPDIR".into(), "/tmp".into());
    for (k, v) in &env {
        bwrap.push(&["--setenv", k, v]);
    }
    bwrap
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

/// Everything about how a confined agent's process starts.
#[derive(Debug, Default)]
pub struct Confinement {
    pub limits: Limits,
    /// The command is a bwrap line carrying the agent's environment (and
    /// reporting a killed agent as exit 128+N).
    pub under_bwrap: bool,
    /// Open files the child keeps across exec under their numbers.
    pub inherited_fds: Vec<OwnedFd>,
    /// The sandbox's cgroups, joined before exec; removed when the agent exits.
    pub cgroup: Option<crate::cgroup::SandboxCgroup>,
    /// A seccomp filter to install before exec (bwrap installs its own).
    pub seccomp: Option<Vec<crate::seccomp::Instruction>>,
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

    /// Install the limits on `cmd`'s child process; it also joins the
    /// cgroups whose `cgroup.procs` are `join`, keeps `keep` open and, last,
    /// installs `filter` (UID isolation has no bwrap to install it).
    pub fn apply(
        self,
        cmd: &mut tokio::process::Command,
        join: Vec<RawFd>,
        keep: Vec<RawFd>,
        filter: Option<Vec<crate::seccomp::Instruction>>,
    ) {
        // SAFETY: the closure only calls write/fcntl/setrlimit/prctl/
        // setgroups/setgid/setuid/getuid, which are async-signal-safe,
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                crate::cgroup::join_self(&join)?;
                if let AgentIdentity::User(uid) = self.identity {
                    // Switched here rather than by std, because the bounding
                    // set can only be emptied while still root (CAP_SETPCAP):
                    // the agent keeps no capability it could ever regain.
                    empty_bounding_set()?;
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(uid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for &fd in &keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
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
                // A pre-started agent becomes its user itself and needs no
                // set-uid binary for that; the filter needs it either way.
                if (matches!(self.identity, AgentIdentity::User(_)) || filter.is_some())
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
                // Last: every call above is one the filter refuses or might.
                if let Some(program) = &filter {
                    crate::seccomp::install(program)?;
                }
                Ok(())
            });
        }
    }
}

/// Drop every capability from this process's bounding set (needs
/// CAP_SETPCAP; stops at the first number the kernel does not know).
/// Async-signal-safe: only prctl.
fn empty_bounding_set() -> std::io::Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } < 0 {
            break;
        }
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
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
    // A shared directory such as /tmp is never a workspaces root: making it
    // 0711 would take everyone's right to create files there.
    let root_mode = std::fs::metadata(root)
        .map_err(|e| err("stat root", e))?
        .permissions()
        .mode();
    if root_mode & 0o1000 != 0 {
        return Err(format!(
            "cannot prepare workspace {}: its parent {} is a shared (sticky) directory, not a workspaces root",
            workspace.display(),
            root.display()
        ));
    }
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

/// Under bubblewrap the runner's child is bwrap and its child the
/// sandbox's pid 1 (bwrap again); the agent is below those. Check that the
/// agent runs as `uid`/`uid` with no supplementary groups and with every
/// capability set empty, bounding set included.
pub fn check_sandbox_runs_as(bwrap_pid: u32, uid: u32) -> Result<(), String> {
    let agents = children_of(&children_of(&[bwrap_pid]));
    if agents.is_empty() {
        return Err(format!("no agent runs under bwrap (pid {bwrap_pid})"));
    }
    for pid in agents {
        check_runs_as(pid, uid)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("cannot read the agent's status: {e}"))?;
        for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            let value = status
                .lines()
                .find_map(|l| l.strip_prefix(set))
                .map(str::trim);
            if value != Some("0000000000000000") {
                return Err(format!(
                    "the agent holds capabilities ({set} {})",
                    value.unwrap_or("?")
                ));
            }
        }
    }
    Ok(())
}

/// The children of every thread of `pids`.
fn children_of(pids: &[u32]) -> Vec<u32> {
    let mut children = Vec::new();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                children.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    children
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
            SandboxUser::Own(100_001),
        )
        .argv();
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
        let joined = args.join(" ");
        assert!(joined.contains("--unshare-user --uid 100001 --gid 100001"));
        assert!(joined.contains(&format!("--size {DEFAULT_TMP_BYTES} --tmpfs /tmp")));
        assert!(joined.contains(&format!("--size {DEFAULT_TMP_BYTES} --tmpfs /var/tmp")));
    }

    /// An unprivileged runner (here: a child that becomes uid 65534 before
    /// it executes bwrap, as a non-root runner would be) gets the same
    /// confinement: every capability set empty, no new privileges, the
    /// seccomp filter, and a `/proc/1/cmdline` without host paths.
    #[test]
    fn an_unprivileged_runners_sandbox_has_no_capabilities_and_the_filter() {
        if bwrap_available().is_err() {
            eprintln!("bwrap unusable here; skipped");
            return;
        }
        let nobody = 65534;
        let root = unsafe { libc::geteuid() } == 0;
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        if root {
            std::os::unix::fs::chown(&ws, Some(nobody), Some(nobody)).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let cmd = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status; tr '\\0' ' ' < /proc/1/cmdline".into(),
        ];
        let (argv, fds) = wrap(
            &cmd,
            &ws,
            &BTreeMap::new(),
            &SandboxSettings::default(),
            SandboxUser::Runner,
        )
        .launch()
        .unwrap();
        let keep: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut child = std::process::Command::new(&argv[0]);
        child.args(&argv[1..]);
        use std::os::unix::process::CommandExt;
        if root {
            child.uid(nobody).gid(nobody);
        }
        // SAFETY: only fcntl between fork and exec.
        unsafe {
            child.pre_exec(move || {
                for &fd in &keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let out = child.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert!(
                text.contains(&format!("{set}:\t0000000000000000")),
                "{set}: {text}"
            );
        }
        assert!(text.contains("NoNewPrivs:\t1"), "{text}");
        assert!(text.contains("Seccomp:\t2"), "{text}");
        assert!(text.contains("bwrap --args "), "{text}");
        assert!(!text.contains(&ws.to_string_lossy().to_string()), "{text}");
    }
}
