//! A disk quota per user workspace (ARCHITECTURE.md "Agent sandbox", Disk
//! quota): each user's workspace is an ext4 file system of its own, in a
//! sparse image file `<images_dir>/<user>.ext4`, loop-mounted at
//! `<workspaces_root>/<user>` in the host's mount namespace. A user who
//! fills it gets ENOSPC; the host disk and other users do not notice.
//!
//! The mount is made by the gateway (root) the first time the workspace is
//! needed and reused from then on, across gateway restarts too (a mounted
//! workspace is recognised by its own device number). Runners see it
//! because their mount namespaces receive the host's later mounts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Why a workspace could not be given its quota.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("--workspace-quota needs the gateway to run as root (to mount file systems)")]
    NotRoot,
    #[error("--workspace-quota cannot work here: {0}")]
    Unsupported(String),
    #[error("workspace quota of {user}: {message}")]
    Workspace { user: String, message: String },
}

/// Size-limited workspaces; see the module comment.
#[derive(Debug)]
pub struct WorkspaceQuota {
    bytes: u64,
    images_dir: PathBuf,
    /// One mount at a time: two sessions of a new user must not both format
    /// and mount its image.
    mounting: Mutex<()>,
}

/// Smallest quota accepted (ext4 needs room for its own metadata).
pub const MIN_QUOTA_BYTES: u64 = 16 << 20;

impl WorkspaceQuota {
    /// Check that this gateway can make quota'd workspaces (root, `mount`,
    /// `mkfs.ext4`, loop devices) by making a small one.
    pub fn new(bytes: u64, images_dir: PathBuf) -> Result<Self, QuotaError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(QuotaError::NotRoot);
        }
        if bytes < MIN_QUOTA_BYTES {
            return Err(QuotaError::Unsupported(format!(
                "a quota of {bytes} bytes is below the {} MiB minimum",
                MIN_QUOTA_BYTES >> 20
            )));
        }
        let unsupported = |what: &str, e: String| QuotaError::Unsupported(format!("{what}: {e}"));
        std::fs::create_dir_all(&images_dir).map_err(|e| {
            unsupported(
                &format!("cannot create {}", images_dir.display()),
                e.to_string(),
            )
        })?;
        set_mode(&images_dir, 0o700).map_err(|e| unsupported("chmod", e.to_string()))?;
        let quota = WorkspaceQuota {
            bytes,
            images_dir,
            mounting: Mutex::new(()),
        };
        // The probe: format and mount a tiny image, then take it down.
        let probe_image = quota.images_dir.join(".probe.ext4");
        let probe_dir = quota.images_dir.join(".probe");
        let _ = unmount(&probe_dir);
        let probe = format_image(&probe_image, MIN_QUOTA_BYTES)
            .and_then(|()| std::fs::create_dir_all(&probe_dir).map_err(|e| e.to_string()))
            .and_then(|()| mount_image(&probe_image, &probe_dir))
            .and_then(|()| unmount(&probe_dir));
        let _ = std::fs::remove_file(&probe_image);
        let _ = std::fs::remove_dir(&probe_dir);
        probe.map_err(|e| unsupported("cannot format and loop-mount an ext4 image (are mkfs.ext4, mount and loop devices available?)", e))?;
        Ok(quota)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Make `workspace` (user `user`'s) a mounted file system of the quota's
    /// size, creating its image the first time; existing files of a
    /// workspace that had none move into it.
    pub fn ensure(&self, workspace: &Path, user: &str) -> Result<(), QuotaError> {
        let fail = |message: String| QuotaError::Workspace {
            user: user.to_string(),
            message,
        };
        if user.is_empty() || user.starts_with('.') || user.contains('/') {
            return Err(fail("not a valid user id for a workspace image".into()));
        }
        let _one_at_a_time = self.mounting.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::create_dir_all(workspace)
            .map_err(|e| fail(format!("cannot create {}: {e}", workspace.display())))?;
        if is_mount_point(workspace).map_err(fail)? {
            return Ok(());
        }
        let image = self.images_dir.join(format!("{user}.ext4"));
        if !image.exists() {
            let fresh = self.images_dir.join(format!(".{user}.ext4.new"));
            format_image(&fresh, self.bytes)
                .and_then(|()| std::fs::rename(&fresh, &image).map_err(|e| e.to_string()))
                .map_err(|e| {
                    let _ = std::fs::remove_file(&fresh);
                    fail(format!("cannot create its image: {e}"))
                })?;
        }
        let has_files = std::fs::read_dir(workspace)
            .map_err(|e| fail(format!("cannot read {}: {e}", workspace.display())))?
            .next()
            .is_some();
        if has_files {
            self.migrate(workspace, &image).map_err(fail)?;
        }
        mount_image(&image, workspace).map_err(fail)?;
        tracing::info!(event = "workspace_quota_mounted", userId = %user, bytes = self.bytes, "workspace mounted with its quota");
        Ok(())
    }

    /// Move what an unmounted workspace holds into its image.
    fn migrate(&self, workspace: &Path, image: &Path) -> Result<(), String> {
        let staging = self.images_dir.join(".migrating");
        let _ = unmount(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
        mount_image(image, &staging)?;
        let mut source = workspace.as_os_str().to_owned();
        source.push("/.");
        let copied = run(Command::new("cp").arg("-a").arg(&source).arg(&staging));
        unmount(&staging)?;
        copied.map_err(|e| {
            format!(
                "its existing files do not fit in the quota of {} bytes ({e}); they stay in {}",
                self.bytes,
                workspace.display()
            )
        })?;
        for entry in std::fs::read_dir(workspace).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            let removed = if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed
                .map_err(|e| format!("cannot remove {} after copying it: {e}", path.display()))?;
        }
        Ok(())
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Run a command; its stderr is the error.
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A sparse file of `bytes`, formatted ext4 with lazy inode-table and
/// journal initialisation (fast), no blocks reserved for root, and no
/// `lost+found` left in the user's view.
fn format_image(image: &Path, bytes: u64) -> Result<(), String> {
    let file = std::fs::File::create(image).map_err(|e| e.to_string())?;
    file.set_len(bytes).map_err(|e| e.to_string())?;
    drop(file);
    set_mode(image, 0o600).map_err(|e| e.to_string())?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E"])
        .arg("lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0")
        .arg(image))?;
    // Remove lost+found in the image itself (debugfs needs no mount).
    run(Command::new("debugfs")
        .args(["-w", "-R", "rmdir lost+found"])
        .arg(image))
}

fn mount_image(image: &Path, target: &Path) -> Result<(), String> {
    // `-o loop` sets up the loop device with autoclear: unmounting frees it.
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
        .arg(image)
        .arg(target))
}

/// Unmount `target` (its loop device goes with it).
pub fn unmount(target: &Path) -> Result<(), String> {
    run(Command::new("umount").arg(target))
}

/// A mount point has a device of its own (or is the root).
fn is_mount_point(dir: &Path) -> Result<bool, String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let parent_meta =
        std::fs::metadata(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    Ok(meta.dev() != parent_meta.dev() || meta.ino() == parent_meta.ino())
}
