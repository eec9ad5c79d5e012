//! Files API: list, read, write and delete within the caller's
//! workspace.
//!
//! Every path is checked as a string first (no absolute paths, `..`, NUL)
//! and then opened *relative to a directory handle* with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`: the kernel refuses any
//! resolution that leaves the workspace, including through a symlink the
//! agent creates after our checks. Nothing is re-resolved from a string.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use aishell_backend::workspaces::{WorkspaceError, Workspaces};
use aishell_protocol::ErrorCode;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::Shared;
use crate::auth::Identity;

/// Largest upload accepted, in bytes.
const MAX_UPLOAD: u64 = 64 << 20;
/// Longest one blocking file operation (or one upload chunk's write) may take.
const FILE_IO_LIMIT: Duration = Duration::from_secs(30);
/// Prefix of an upload's temporary file (hidden, beside its target).
const UPLOAD_TMP_PREFIX: &str = ".aishell-upload-";

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/files", get(list))
        .route("/api/files/{*path}", get(read).put(write).delete(remove))
}

#[derive(Debug)]
struct ApiError(StatusCode, &'static str, String);

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: String) -> Self {
        ApiError(status, code.as_str(), message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.1, "message": self.2 } });
        (self.0, axum::Json(body)).into_response()
    }
}

/// A FIFO, socket or device: reading or writing one could block forever.
fn not_regular(path: &str) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        "NOT_A_REGULAR_FILE",
        format!(
            "{path} is not a regular file (a FIFO, socket or device); the files API reads and writes only regular files"
        ),
    )
}

/// Run blocking file work on the blocking pool, bounded by [`FILE_IO_LIMIT`].
async fn blocking<T: Send + 'static>(
    what: String,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::time::timeout(FILE_IO_LIMIT, tokio::task::spawn_blocking(work)).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("{what}: {e}"),
        )),
        Err(_) => Err(file_io_timeout(&what)),
    }
}

fn file_io_timeout(what: &str) -> ApiError {
    ApiError(
        StatusCode::GATEWAY_TIMEOUT,
        "FILE_IO_TIMEOUT",
        format!(
            "{what}: the file system did not answer within {}s",
            FILE_IO_LIMIT.as_secs()
        ),
    )
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadFrame, message.into())
}

fn io_error(path: &str, e: std::io::Error) -> ApiError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::BadFrame,
            format!("{path}: no such file"),
        ),
        Some(libc::EXDEV) | Some(libc::ELOOP) => ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("{path}: resolves outside your workspace"),
        ),
        Some(libc::EISDIR) => bad(format!("{path} is a directory")),
        Some(libc::ENOTDIR) => bad(format!("{path}: not a directory")),
        Some(libc::ENOTEMPTY) => bad(format!("{path}: directory not empty")),
        _ => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("{path}: {e}"),
        ),
    }
}

/// The caller, from the `Authorization` header only (a token in a URL ends
/// up in proxies' and browsers' logs).
async fn caller(shared: &Shared, headers: &HeaderMap) -> Result<Identity, ApiError> {
    let token = crate::auth::bearer_token(headers, None);
    shared
        .auth
        .authenticate(shared.store.as_ref(), token.as_deref())
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                e.to_string(),
            )
        })
}

/// Split a relative path into checked components.
fn components(path: &str) -> Result<Vec<&str>, ApiError> {
    if path.contains('\0') {
        return Err(bad("path contains NUL"));
    }
    if path.starts_with('/') {
        return Err(bad(
            "absolute paths are not allowed; paths are relative to your workspace",
        ));
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(bad("`..` is not allowed in paths"));
    }
    Ok(parts)
}

/// The caller's workspace directory, opened (created if new) through the
/// gateway's [`Workspaces`]: the gateway's own path, not
/// `Backend::workspace_path` (the runner's view, which is `/workspaces/<user>`
/// inside a docker task).
fn open_workspace(workspace: &Workspace) -> Result<OwnedFd, ApiError> {
    // A size-limited workspace is mounted the first time it is used.
    match workspace.workspaces.open(&workspace.user_id) {
        Ok(dir) => Ok(OwnedFd::from(dir)),
        Err(WorkspaceError::NotOnGateway(why)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::WorkspaceUnavailable,
            why,
        )),
        Err(WorkspaceError::Prepare(e)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal,
            e.to_string(),
        )),
        Err(WorkspaceError::Io { source, .. }) => Err(io_error("workspace", source)),
    }
}

/// Under per-user UID isolation (docker backend) a workspace belongs to its
/// user's UID: files a root gateway writes there must belong to it too, or
/// the agent could not change them. `None` when there is nothing to hand over.
fn agent_owner(workspace: &OwnedFd) -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let meta = std::fs::File::from(workspace.try_clone().ok()?)
        .metadata()
        .ok()?;
    use std::os::unix::fs::MetadataExt;
    (meta.uid() != 0).then_some((meta.uid(), meta.gid()))
}

fn give_to(fd: &OwnedFd, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        // SAFETY: fchown on a descriptor we own. The runner walks a
        // workspace only when it assigns its UID, so this is the hand-over.
        if unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) } != 0 {
            let error = std::io::Error::last_os_error();
            tracing::warn!(event = "files_chown_failed", uid, error = %error, "a file written for the user's agent stays root's; the agent cannot change it");
        }
    }
}

/// `openat2(dirfd, path, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
fn open_beneath(dir: RawFd, path: &str, flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
    let c_path = CString::new(if path.is_empty() { "." } else { path })
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain old data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = u64::from(mode);
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid NUL-terminated path, a properly sized open_how, and a
    // directory fd we own for the duration of the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            c_path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[derive(Deserialize)]
struct ListQuery {
    dir: Option<String>,
}

/// The caller's workspace: whose, and the gateway's way to it (blocking:
/// it may format and mount a file system).
struct Workspace {
    user_id: String,
    workspaces: Arc<dyn Workspaces>,
}

fn workspace_of(shared: &Shared, who: &Identity) -> Workspace {
    Workspace {
        user_id: who.user_id.clone(),
        workspaces: shared.workspaces.clone(),
    }
}

async fn list(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let who = caller(&shared, &headers).await?;
    let dir_path = q.dir.unwrap_or_default();
    let joined = components(&dir_path)?.join("/");
    let workspace = workspace_of(&shared, &who);
    let listed = joined.clone();
    let out = blocking(dir_path.clone(), move || {
        let root = open_workspace(&workspace)?;
        let dir = open_beneath(
            root.as_raw_fd(),
            &listed,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK,
            0,
        )
        .map_err(|e| io_error(&dir_path, e))?;
        // The fd pins the directory; /proc/self/fd/N names exactly that directory.
        let entries = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
            .map_err(|e| io_error(&dir_path, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            // lstat: never opens the entry.
            let Ok(meta) = entry.metadata() else { continue };
            let file_type = meta.file_type();
            let kind = if file_type.is_dir() {
                "dir"
            } else if file_type.is_symlink() {
                "symlink"
            } else if file_type.is_file() {
                "file"
            } else {
                "special"
            };
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            out.push(serde_json::json!({
                "name": entry.file_name().to_string_lossy(),
                "type": kind,
                "size": meta.len(),
                "modified": modified,
            }));
        }
        out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Ok(out)
    })
    .await?;
    Ok(axum::Json(serde_json::json!({ "dir": joined, "entries": out })).into_response())
}

async fn read(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&shared, &headers).await?;
    let joined = components(&path)?.join("/");
    let workspace = workspace_of(&shared, &who);
    let (file, len) = blocking(path.clone(), move || {
        let root = open_workspace(&workspace)?;
        // O_NONBLOCK: opening a FIFO must not wait for a writer.
        let fd = open_beneath(
            root.as_raw_fd(),
            &joined,
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
        )
        .map_err(|e| io_error(&path, e))?;
        let file = std::fs::File::from(fd);
        let meta = file.metadata().map_err(|e| io_error(&path, e))?;
        if meta.is_dir() {
            return Err(bad(format!(
                "{path} is a directory; list it with /api/files?dir="
            )));
        }
        if !meta.is_file() {
            return Err(not_regular(&path));
        }
        Ok((file, meta.len()))
    })
    .await?;
    // Streamed, so large files never sit in memory whole; tokio's file reads
    // run on the blocking pool.
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    let headers = [
        (
            axum::http::header::CONTENT_TYPE,
            "application/octet-stream".to_string(),
        ),
        (axum::http::header::CONTENT_LENGTH, len.to_string()),
    ];
    Ok((headers, Body::from_stream(stream)).into_response())
}

/// An upload's temporary file: removed when dropped unless it was renamed
/// into place, so an oversized, failed or aborted upload leaves nothing.
struct PendingUpload {
    dir: OwnedFd,
    tmp: CString,
    done: bool,
}

impl PendingUpload {
    /// Rename the complete upload into place.
    fn commit(mut self, name: &CString) -> std::io::Result<()> {
        // SAFETY: valid dirfd and NUL-terminated names; renameat replaces the
        // directory entry itself, never following what the target names.
        let rc = unsafe {
            libc::renameat(
                self.dir.as_raw_fd(),
                self.tmp.as_ptr(),
                self.dir.as_raw_fd(),
                name.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for PendingUpload {
    fn drop(&mut self) {
        if !self.done {
            // SAFETY: valid dirfd and NUL-terminated name; unlink does not block on the file's contents.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.tmp.as_ptr(), 0) };
        }
    }
}

/// Prepare an upload to `name` in `dir`: refuse a target that exists and is
/// not a regular file (symlinks included), then create the hidden temporary
/// file beside it (`O_EXCL`).
fn start_upload(
    dir: OwnedFd,
    name: &str,
    path: &str,
    owner: Option<(u32, u32)>,
) -> Result<(PendingUpload, std::fs::File), ApiError> {
    match open_beneath(
        dir.as_raw_fd(),
        name,
        // O_PATH opens nothing (a FIFO cannot block it); openat2 takes no
        // other flags with it.
        libc::O_PATH | libc::O_NOFOLLOW,
        0,
    ) {
        Ok(existing) => {
            let meta = std::fs::File::from(existing)
                .metadata()
                .map_err(|e| io_error(path, e))?;
            if meta.file_type().is_symlink() {
                // Never written through: the link could lead anywhere.
                return Err(io_error(
                    path,
                    std::io::Error::from_raw_os_error(libc::ELOOP),
                ));
            }
            if meta.is_dir() {
                return Err(io_error(
                    path,
                    std::io::Error::from_raw_os_error(libc::EISDIR),
                ));
            }
            if !meta.is_file() {
                return Err(not_regular(path));
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(io_error(path, e)),
    }
    let tmp_name = format!("{UPLOAD_TMP_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let fd = open_beneath(
        dir.as_raw_fd(),
        &tmp_name,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        0o644,
    )
    .map_err(|e| io_error(path, e))?;
    let pending = PendingUpload {
        dir,
        tmp: CString::new(tmp_name).expect("no NUL in a generated name"),
        done: false,
    };
    give_to(&fd, owner);
    Ok((pending, std::fs::File::from(fd)))
}

async fn write(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(path): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let who = caller(&shared, &headers).await?;
    let parts: Vec<String> = components(&path)?.into_iter().map(str::to_string).collect();
    if parts.is_empty() {
        return Err(bad("a file name is required"));
    }
    let workspace = workspace_of(&shared, &who);
    let (for_open, shown) = (parts.clone(), path.clone());
    let (pending, file) = blocking(path.clone(), move || {
        let (name, parents) = for_open.split_last().expect("checked non-empty");
        let root = open_workspace(&workspace)?;
        let owner = agent_owner(&root);
        // Create parent directories one component at a time, each beneath the last.
        let mut dir = root;
        for part in parents {
            let c = CString::new(part.as_str()).map_err(|_| bad("bad path"))?;
            // SAFETY: valid dirfd and NUL-terminated name.
            let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) };
            if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return Err(io_error(&shown, std::io::Error::last_os_error()));
            }
            dir = open_beneath(
                dir.as_raw_fd(),
                part,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK,
                0,
            )
            .map_err(|e| io_error(&shown, e))?;
            give_to(&dir, owner);
        }
        start_upload(dir, name, &shown, owner)
    })
    .await?;
    let mut file = tokio::fs::File::from_std(file);
    let mut written: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| bad(format!("upload interrupted: {e}")))?;
        written += chunk.len() as u64;
        if written > MAX_UPLOAD {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BadFrame,
                format!("uploads are limited to {MAX_UPLOAD} bytes"),
            ));
        }
        tokio::time::timeout(FILE_IO_LIMIT, file.write_all(&chunk))
            .await
            .map_err(|_| file_io_timeout(&path))?
            .map_err(|e| io_error(&path, e))?;
    }
    tokio::time::timeout(FILE_IO_LIMIT, file.flush())
        .await
        .map_err(|_| file_io_timeout(&path))?
        .map_err(|e| io_error(&path, e))?;
    drop(file.into_std().await);
    let name = CString::new(parts.last().expect("checked non-empty").as_str())
        .map_err(|_| bad("bad path"))?;
    let shown = path.clone();
    blocking(path, move || {
        pending.commit(&name).map_err(|e| io_error(&shown, e))
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "path": parts.join("/"), "size": written })),
    )
        .into_response())
}

async fn remove(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&shared, &headers).await?;
    let parts: Vec<String> = components(&path)?.into_iter().map(str::to_string).collect();
    if parts.is_empty() {
        return Err(bad("refusing to delete the workspace itself"));
    }
    let workspace = workspace_of(&shared, &who);
    blocking(path.clone(), move || {
        let (name, parents) = parts.split_last().expect("checked non-empty");
        let root = open_workspace(&workspace)?;
        let parent = open_beneath(
            root.as_raw_fd(),
            &parents.join("/"),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK,
            0,
        )
        .map_err(|e| io_error(&path, e))?;
        let c = CString::new(name.as_str()).map_err(|_| bad("bad path"))?;
        // SAFETY: valid dirfd and NUL-terminated name; unlinkat never follows
        // the final component, so a symlink is removed, not its target.
        let mut rc = unsafe { libc::unlinkat(parent.as_raw_fd(), c.as_ptr(), 0) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EISDIR) {
            // SAFETY: as above.
            rc = unsafe { libc::unlinkat(parent.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) };
        }
        if rc != 0 {
            return Err(io_error(&path, std::io::Error::last_os_error()));
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
