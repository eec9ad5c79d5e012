//! Pre-started agents for warm tasks: the agent and its bubblewrap
//! sandbox start before the claim, and the claim only binds the user.
//!
//! Starting bwrap and an agent costs a few milliseconds of CPU each; fifty
//! claims at once on two cores made that the whole warm-start budget. So a
//! warm runner starts its agent as soon as the gateway says which settings
//! the pool serves (`prepare`), confined to an *empty* workspace slot, and at
//! the claim mounts the user's workspace onto the slot and sends `init`.
//!
//! How the workspace appears inside an already-running sandbox: the runner
//! lives in a mount namespace of its own (entered before any thread starts,
//! because mount namespaces are per thread), where a tmpfs holds the slot
//! directory as a *shared* mount. bwrap makes its own namespace a slave of
//! the runner's and binds the slot at `/workspace`, so a bind mount the
//! runner later puts on the slot propagates into the sandbox, and nowhere
//! else: the runner's namespace is a slave of the host's (host mounts made
//! later reach it, its own never reach the host) and ends with its processes.
//!
//! The agent sees nothing of any user before the claim (an empty tmpfs),
//! then exactly one workspace; it waits for `init` (`--await-init`) and
//! enters `/workspace` again then, so its working directory is the bound
//! one. Needs root (CAP_SYS_ADMIN) for the runner; elsewhere warm tasks under
//! bubblewrap start their agent at claim time.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Where the user's workspace appears inside a bwrap sandbox.
pub const SANDBOX_WORKSPACE: &str = "/workspace";
/// Mount point of the runner's private tmpfs (only the runner's namespace
/// sees what is mounted there; the directory itself stays empty on the host).
const SLOT_ROOT: &str = "/tmp/aishell-slots";

/// The directory, shared-propagating, that a pre-started sandbox binds as
/// its workspace.
#[derive(Debug, Clone)]
pub struct WorkspaceSlot {
    path: PathBuf,
}

impl WorkspaceSlot {
    /// Enter a mount namespace of the runner's own (a slave of the host's)
    /// and create the slot. Must be called
    /// while the process has a single thread (before the async runtime).
    pub fn enter_private_namespace() -> Result<Self, String> {
        // SAFETY: plain syscalls on our own process.
        if unsafe { libc::geteuid() } != 0 {
            return Err("pre-started agents need a root runner (to mount the workspace into a running sandbox)".into());
        }
        if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
            return Err(format!(
                "cannot create a mount namespace: {}",
                std::io::Error::last_os_error()
            ));
        }
        // Nothing mounted from here on may reach the host, but what the host
        // mounts later (a quota mount under the workspaces root) still
        // reaches this namespace: a slave, not private.
        mount(None, "/", None, libc::MS_REC | libc::MS_SLAVE, None)?;
        std::fs::create_dir_all(SLOT_ROOT)
            .map_err(|e| format!("cannot create {SLOT_ROOT}: {e}"))?;
        mount(
            Some("aishell-slot"),
            SLOT_ROOT,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("mode=0700,size=64k"),
        )?;
        let path = Path::new(SLOT_ROOT).join("workspace");
        std::fs::create_dir(&path).map_err(|e| format!("cannot create the slot: {e}"))?;
        let p = path.to_string_lossy();
        mount(Some(&p), &p, None, libc::MS_BIND, None)?;
        mount(None, &p, None, libc::MS_SHARED, None)?;
        Ok(WorkspaceSlot { path })
    }

    /// The host-side directory to bind into the sandbox as its workspace.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Put `workspace` on the slot: it appears at [`SANDBOX_WORKSPACE`] in
    /// the sandbox already running. Once per task (a task serves one user).
    pub fn bind(&self, workspace: &Path) -> Result<(), String> {
        let src = workspace.to_string_lossy();
        let dst = self.path.to_string_lossy();
        mount(Some(&src), &dst, None, libc::MS_BIND, None)
            .map_err(|e| format!("cannot bind workspace {src} into the sandbox: {e}"))
    }
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let c = |s: &str| CString::new(s).map_err(|_| format!("path {s:?} contains NUL"));
    let source = source.map(c).transpose()?;
    let target_c = c(target)?;
    let fstype = fstype.map(c).transpose()?;
    let data = data.map(c).transpose()?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a valid NUL-terminated string or null.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "mount {target}: {}",
            std::io::Error::last_os_error()
        ))
    }
}
