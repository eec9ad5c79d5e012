//! Files API (SPEC §9): list, read, write and delete within the caller's
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

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/files", get(list))
        .route("/api/files/{*path}", get(read).put(write).delete(remove))
}

#[derive(Debug)]
struct ApiError(StatusCode, ErrorCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.1.as_str(), "message": self.2 } });
        (self.0, axum::Json(body)).into_response()
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, ErrorCode::BadFrame, message.into())
}

fn io_error(path: &str, e: std::io::Error) -> ApiError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ApiError(
            StatusCode::NOT_FOUND,
            ErrorCode::BadFrame,
            format!("{path}: no such file"),
        ),
        Some(libc::EXDEV) | Some(libc::ELOOP) => ApiError(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("{path}: resolves outside your workspace"),
        ),
        Some(libc::EISDIR) => bad(format!("{path} is a directory")),
        Some(libc::ENOTDIR) => bad(format!("{path}: not a directory")),
        Some(libc::ENOTEMPTY) => bad(format!("{path}: directory not empty")),
        _ => ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("{path}: {e}"),
        ),
    }
}

async fn caller(
    shared: &Shared,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Identity, ApiError> {
    let token = crate::auth::bearer_token(headers, query_token);
    shared
        .auth
        .authenticate(shared.store.as_ref(), token.as_deref())
        .await
        .map_err(|e| {
            ApiError(
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

/// The caller's workspace directory, opened (created if new). The gateway's
/// own path, not `Backend::workspace_path` (the runner's view, which is
/// `/workspaces/<user>` inside a docker task).
fn open_workspace(shared: &Shared, user_id: &str) -> Result<OwnedFd, ApiError> {
    let root = shared.cfg.workspaces_root.join(user_id);
    shared.backend.prepare_workspace(user_id).map_err(|e| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal,
            e.to_string(),
        )
    })?;
    std::fs::create_dir_all(&root).map_err(|e| io_error("workspace", e))?;
    let dir = std::fs::File::open(&root).map_err(|e| io_error("workspace", e))?;
    Ok(OwnedFd::from(dir))
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
    token: Option<String>,
}

async fn list(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let who = caller(&shared, &headers, q.token.as_deref()).await?;
    let dir_path = q.dir.unwrap_or_default();
    let joined = components(&dir_path)?.join("/");
    let root = open_workspace(&shared, &who.user_id)?;
    let dir = open_beneath(
        root.as_raw_fd(),
        &joined,
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| io_error(&dir_path, e))?;
    // The fd pins the directory; /proc/self/fd/N names exactly that directory.
    let entries = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .map_err(|e| io_error(&dir_path, e))?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        let kind = if meta.is_dir() {
            "dir"
        } else if meta.file_type().is_symlink() {
            "symlink"
        } else {
            "file"
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
    Ok(axum::Json(serde_json::json!({ "dir": joined, "entries": out })).into_response())
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn read(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(path): Path<String>,
    Query(q): Query<TokenQuery>,
) -> Result<Response, ApiError> {
    let who = caller(&shared, &headers, q.token.as_deref()).await?;
    let joined = components(&path)?.join("/");
    let root = open_workspace(&shared, &who.user_id)?;
    let fd = open_beneath(root.as_raw_fd(), &joined, libc::O_RDONLY, 0)
        .map_err(|e| io_error(&path, e))?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(|e| io_error(&path, e))?;
    if meta.is_dir() {
        return Err(bad(format!(
            "{path} is a directory; list it with /api/files?dir="
        )));
    }
    // Streamed, so large files never sit in memory whole.
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    let headers = [
        (
            axum::http::header::CONTENT_TYPE,
            "application/octet-stream".to_string(),
        ),
        (axum::http::header::CONTENT_LENGTH, meta.len().to_string()),
    ];
    Ok((headers, Body::from_stream(stream)).into_response())
}

async fn write(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(path): Path<String>,
    Query(q): Query<TokenQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let who = caller(&shared, &headers, q.token.as_deref()).await?;
    let parts = components(&path)?;
    let Some((name, parents)) = parts.split_last() else {
        return Err(bad("a file name is required"));
    };
    let root = open_workspace(&shared, &who.user_id)?;
    let owner = agent_owner(&root);
    // Create parent directories one component at a time, each beneath the last.
    let mut dir = root;
    for part in parents {
        let c = CString::new(*part).map_err(|_| bad("bad path"))?;
        // SAFETY: valid dirfd and NUL-terminated name.
        let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(io_error(&path, std::io::Error::last_os_error()));
        }
        dir = open_beneath(dir.as_raw_fd(), part, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| io_error(&path, e))?;
        give_to(&dir, owner);
    }
    let fd = open_beneath(
        dir.as_raw_fd(),
        name,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
        0o644,
    )
    .map_err(|e| io_error(&path, e))?;
    give_to(&fd, owner);
    let mut file = tokio::fs::File::from_std(std::fs::File::from(fd));
    let mut written: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| bad(format!("upload interrupted: {e}")))?;
        written += chunk.len() as u64;
        if written > MAX_UPLOAD {
            return Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BadFrame,
                format!("uploads are limited to {MAX_UPLOAD} bytes"),
            ));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| io_error(&path, e))?;
    }
    file.flush().await.map_err(|e| io_error(&path, e))?;
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
    Query(q): Query<TokenQuery>,
) -> Result<Response, ApiError> {
    let who = caller(&shared, &headers, q.token.as_deref()).await?;
    let parts = components(&path)?;
    let Some((name, parents)) = parts.split_last() else {
        return Err(bad("refusing to delete the workspace itself"));
    };
    let root = open_workspace(&shared, &who.user_id)?;
    let parent = open_beneath(
        root.as_raw_fd(),
        &parents.join("/"),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| io_error(&path, e))?;
    let c = CString::new(*name).map_err(|_| bad("bad path"))?;
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
    Ok(StatusCode::NO_CONTENT.into_response())
}
