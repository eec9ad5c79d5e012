//! Building the task image (`aishell image build`): a `FROM scratch` image
//! holding the aishell binary, its shared libraries and busybox, assembled
//! here as a tar build context and sent to the engine's build API. Nothing
//! is pulled, so it works on a machine without a registry.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use bollard::query_parameters::BuildImageOptionsBuilder;
use futures_util::StreamExt;

/// The recipe, kept in the repository next to this crate.
pub const DOCKERFILE: &str = include_str!("../Dockerfile");

/// Where the binary lives in the image (the runner's `current_exe`, so the
/// built-in agents run from there too).
pub const BINARY_IN_IMAGE: &str = "usr/local/bin/aishell";

/// Inputs of an image build.
#[derive(Debug, Clone)]
pub struct ImageRecipe {
    /// Tag to build, e.g. `aishell:local`.
    pub tag: String,
    /// The aishell binary to put in the image (normally the running one).
    pub binary: PathBuf,
    /// A busybox binary (Debian: `busybox-static`, `/bin/busybox`).
    pub busybox: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageBuildError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "busybox not found at {0}; install it (Debian/Ubuntu: apt-get install busybox-static) or pass --busybox"
    )]
    NoBusybox(PathBuf),
    #[error("cannot list the shared libraries of {path} with ldd: {reason}")]
    Ldd { path: PathBuf, reason: String },
    #[error("cannot assemble the build context: {0}")]
    Context(std::io::Error),
    #[error(transparent)]
    Engine(#[from] aishell_backend::BackendError),
    #[error("the Docker engine refused the build: {0}")]
    Build(String),
}

/// Shared libraries `ldd` lists for `binary` (absolute paths; none for a
/// static binary).
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, ImageBuildError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| ImageBuildError::Ldd {
            path: binary.to_path_buf(),
            reason: e.to_string(),
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(ImageBuildError::Ldd {
            path: binary.to_path_buf(),
            reason: stderr.trim().to_string(),
        });
    }
    Ok(parse_ldd(&stdout))
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x…)` give paths; the vDSO has none.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Applets `busybox --list` names (sh, ls, cat, echo, grep, ...).
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageBuildError> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| ImageBuildError::Read {
            path: busybox.to_path_buf(),
            source: e,
        })?;
    let mut applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .map(str::to_string)
        .collect();
    for needed in ["sh", "ls", "cat", "echo"] {
        if !applets.iter().any(|a| a == needed) {
            applets.push(needed.to_string());
        }
    }
    Ok(applets)
}

/// The build context as a tar archive: `Dockerfile` and `rootfs/`.
pub fn build_context(recipe: &ImageRecipe) -> Result<Vec<u8>, ImageBuildError> {
    if !recipe.busybox.is_file() {
        return Err(ImageBuildError::NoBusybox(recipe.busybox.clone()));
    }
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| ImageBuildError::Read {
            path: p.to_path_buf(),
            source: e,
        })
    };
    let mut tar = tar::Builder::new(Vec::new());
    let ctx = ImageBuildError::Context;

    add_file(&mut tar, "Dockerfile", DOCKERFILE.as_bytes(), 0o644).map_err(ctx)?;
    add_file(
        &mut tar,
        &format!("rootfs/{BINARY_IN_IMAGE}"),
        &read(&recipe.binary)?,
        0o755,
    )
    .map_err(ctx)?;
    add_file(
        &mut tar,
        "rootfs/bin/busybox",
        &read(&recipe.busybox)?,
        0o755,
    )
    .map_err(ctx)?;
    for applet in busybox_applets(&recipe.busybox)? {
        add_symlink(&mut tar, &format!("rootfs/bin/{applet}"), "busybox").map_err(ctx)?;
    }
    add_symlink(&mut tar, "rootfs/usr/bin/env", "/bin/busybox").map_err(ctx)?;

    let mut libs = BTreeSet::new();
    libs.extend(shared_libraries(&recipe.binary)?);
    libs.extend(shared_libraries(&recipe.busybox)?);
    for lib in libs {
        // Kept at the path the loader looks for; the content is the file the
        // path resolves to (libraries are often symlinks).
        let rel = lib
            .strip_prefix("/")
            .unwrap_or(&lib)
            .to_string_lossy()
            .to_string();
        add_file(&mut tar, &format!("rootfs/{rel}"), &read(&lib)?, 0o755).map_err(ctx)?;
    }
    add_file(
        &mut tar,
        "rootfs/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
        0o644,
    )
    .map_err(ctx)?;
    add_file(
        &mut tar,
        "rootfs/etc/group",
        b"root:x:0:\nnogroup:x:65534:\n",
        0o644,
    )
    .map_err(ctx)?;
    add_dir(&mut tar, "rootfs/tmp", 0o1777).map_err(ctx)?;
    add_dir(&mut tar, "rootfs/root", 0o700).map_err(ctx)?;
    // Others may pass through to their own workspace, not list the others.
    add_dir(&mut tar, "rootfs/workspaces", 0o711).map_err(ctx)?;
    tar.into_inner().map_err(ctx)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn add_file(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    data: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    tar.append_data(&mut h, path, data)
}

fn add_symlink(tar: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    tar.append_link(&mut h, path, target)
}

fn add_dir(tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Directory, mode, 0);
    tar.append_data(&mut h, path, std::io::empty())
}

/// The id of the image `tag` names, if any: `aishell image build` reads it
/// before and after a build to say when it moved a tag off another image.
pub async fn image_id(
    backend: &crate::DockerBackend,
    tag: &str,
) -> Result<Option<String>, ImageBuildError> {
    let docker = backend.client("inspect image").await?;
    match docker.inspect_image(tag).await {
        Ok(image) => Ok(image.id),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(ImageBuildError::Build(e.to_string())),
    }
}

/// Build `recipe.tag` on the engine `backend` talks to. Returns the engine's
/// build log (the `stream` lines).
pub async fn build(
    backend: &crate::DockerBackend,
    recipe: &ImageRecipe,
) -> Result<String, ImageBuildError> {
    let context = build_context(recipe)?;
    let docker = backend.client("build").await?;
    let opts = BuildImageOptionsBuilder::new()
        .dockerfile("Dockerfile")
        .t(&recipe.tag)
        .rm(true)
        .forcerm(true)
        .build();
    let mut log = String::new();
    let mut stream = docker.build_image(
        opts,
        None,
        Some(bollard::body_full(bytes::Bytes::from(context))),
    );
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(detail) = info.error_detail {
                    return Err(ImageBuildError::Build(
                        detail.message.unwrap_or_else(|| "unknown error".into()),
                    ));
                }
                if let Some(s) = info.stream {
                    log.push_str(&s);
                }
            }
            Err(e) => return Err(ImageBuildError::Build(e.to_string())),
        }
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }
}
