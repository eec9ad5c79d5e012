//! Workspace disk quota (`--workspace-quota`, process backend, root): each
//! user's workspace is a file system of its own. A user writing past it
//! gets ENOSPC from inside their sandbox; another user writes normally; a
//! files-API upload past it fails with a status and a code. Everything the
//! test's gateway mounted is unmounted at the end, loop devices included.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::json;

async fn run(c: &mut Client, id: &str, command: &str) -> String {
    c.send(json!({"type": "message", "id": id, "conversation_id": "q", "content": command}))
        .await;
    pretty(&c.turn().await)
}

fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: --workspace-quota needs root");
    }
    root
}

/// Unmounts whatever is still mounted under `dir` when dropped (a failed
/// assertion must not leave mounts behind).
struct UnmountUnder(PathBuf);

impl Drop for UnmountUnder {
    fn drop(&mut self) {
        for target in mounts_under(&self.0) {
            let _ = std::process::Command::new("umount").arg(&target).status();
        }
    }
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&dir))
        .collect()
}

fn loop_devices_on(dir: &Path) -> Vec<String> {
    let out = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .map(str::to_string)
        .collect()
}

/// One raw HTTP/1.1 PUT; returns (status, body).
fn put(gw: &Gateway, path: &str, token: &str, body: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    write!(s, "PUT {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
    // The server may answer (and close) before the whole body is sent.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn a_user_past_their_quota_gets_enospc_and_nobody_else_notices() {
    if !root_or_skip() {
        return;
    }
    let mut gw = Gateway::start(&["--enable-warm-pool", "false", "--workspace-quota", "32m"]);
    let data_dir = gw.data_dir.clone();
    let _cleanup = UnmountUnder(data_dir.clone());
    let alice = gw.create_token("alice");
    let bob = gw.create_token("bob");

    let mut a = gw.connect_as(&alice, None).await.unwrap();
    let full = run(
        &mut a,
        "fill",
        "dd if=/dev/zero of=big bs=1M count=64 2>&1; echo rc=$?; df -k . | tail -1",
    )
    .await;
    assert!(
        full.contains("No space left on device") && !full.contains("rc=0"),
        "alice wrote past her quota:\n{full}"
    );
    let written = std::fs::metadata(gw.workspace("alice").join("big"))
        .unwrap()
        .len();
    assert!(written < 32 << 20, "{written} bytes landed");

    // Bob, at the same time, is not affected.
    let mut b = gw.connect_as(&bob, None).await.unwrap();
    let fine = run(
        &mut b,
        "write",
        "dd if=/dev/zero of=data bs=1M count=8 2>&1 && echo WROTE",
    )
    .await;
    assert!(fine.contains("WROTE"), "bob could not write:\n{fine}");
    assert_eq!(
        std::fs::metadata(gw.workspace("bob").join("data"))
            .unwrap()
            .len(),
        8 << 20
    );

    // An upload past the quota fails with a status and an error code.
    let (status, body) = put(&gw, "/api/files/upload.bin", &alice, &vec![7u8; 40 << 20]);
    assert!(
        (400..600).contains(&status),
        "upload past the quota: {status}\n{body}"
    );
    assert!(body.contains("\"code\""), "no error code: {body}");
    // Bob's upload within his quota works.
    let (status, _) = put(&gw, "/api/files/small.bin", &bob, &vec![1u8; 1 << 20]);
    assert!((200..300).contains(&status), "bob's upload: {status}");

    // Each workspace is its own mount; the images are sparse files.
    let mounts = mounts_under(&data_dir);
    for user in ["alice", "bob"] {
        let ws = gw.workspace(user).to_string_lossy().to_string();
        assert!(mounts.contains(&ws), "{ws} not mounted: {mounts:?}");
    }
    a.close().await;
    b.close().await;
    gw.stop();
    for target in mounts_under(&data_dir) {
        let status = std::process::Command::new("umount")
            .arg(&target)
            .status()
            .unwrap();
        assert!(status.success(), "umount {target}");
    }
    assert!(mounts_under(&data_dir).is_empty());
    // A loop device is freed with the last mount of its file system: runners
    // that are still exiting hold copies in their own mount namespaces
    // (slaves of the host's), and waiting warm runners exit at idle priority.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !loop_devices_on(&data_dir).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        loop_devices_on(&data_dir).is_empty(),
        "loop devices left: {:?}",
        loop_devices_on(&data_dir)
    );
}

/// A restarted gateway reuses mounted workspaces; files a workspace held
/// before it had a quota move into its file system.
#[tokio::test]
async fn existing_files_move_into_the_quota_and_mounts_are_reused() {
    if !root_or_skip() {
        return;
    }
    let mut gw = Gateway::start(&["--enable-warm-pool", "false", "--workspace-quota", "32m"]);
    let data_dir = gw.data_dir.clone();
    let _cleanup = UnmountUnder(data_dir.clone());
    let carol = gw.create_token("carol");
    let ws = gw.workspace("carol");
    std::fs::create_dir_all(ws.join("notes")).unwrap();
    std::fs::write(ws.join("notes/old.txt"), "from before the quota").unwrap();

    let mut c = gw.connect_as(&carol, None).await.unwrap();
    let seen = run(&mut c, "old", "cat notes/old.txt; df -k . | tail -1").await;
    assert!(seen.contains("from before the quota"), "{seen}");
    assert!(mounts_under(&data_dir).contains(&ws.to_string_lossy().to_string()));
    c.close().await;

    gw.stop();
    gw.restart(&[]);
    let mut c = gw.connect_as(&carol, None).await.unwrap();
    let seen = run(&mut c, "again", "cat notes/old.txt").await;
    assert!(seen.contains("from before the quota"), "{seen}");
    let ws_mounts: Vec<_> = mounts_under(&data_dir)
        .into_iter()
        .filter(|m| *m == ws.to_string_lossy())
        .collect();
    assert_eq!(ws_mounts.len(), 1, "mounted once, reused after the restart");
    c.close().await;
    gw.stop();
    for target in mounts_under(&data_dir) {
        assert!(
            std::process::Command::new("umount")
                .arg(&target)
                .status()
                .unwrap()
                .success()
        );
    }
    assert!(loop_devices_on(&data_dir).is_empty());
}

#[test]
fn serve_refuses_a_quota_it_cannot_enforce() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--port", "0", "--workspace-quota", "1m"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workspace-quota"), "no clear error: {err}");
}
