//! Files API: list, read, write, delete within the caller's
//! workspace; traversal, absolute paths, NUL and symlink escapes refused.

mod common;

use std::io::{Read, Write};

use common::*;
use serde_json::Value;

/// One raw HTTP/1.1 request; returns (status, body bytes).
fn http(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n", body.len()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
    out
}

fn code(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .map(|v| v["error"]["code"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn files_round_trip_inside_the_workspace() {
    let gw = Gateway::start(&["--enable-warm-pool", "false"]);
    let t = Some(gw.token.as_str());
    assert_eq!(
        http(&gw, "PUT", "/api/files/notes/today/plan.md", t, b"# plan\n").0,
        201
    );
    let (status, body) = http(&gw, "GET", "/api/files/notes/today/plan.md", t, b"");
    assert_eq!((status, body.as_slice()), (200, b"# plan\n".as_slice()));
    assert_eq!(
        read(&gw.workspace("local").join("notes/today/plan.md")),
        "# plan\n"
    );
    let (status, body) = http(&gw, "GET", "/api/files?dir=notes/today", t, b"");
    assert_eq!(status, 200);
    let listing: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(listing["entries"][0]["name"], "plan.md");
    assert_eq!(listing["entries"][0]["size"], 7);
    // A large file streams through unchanged.
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(http(&gw, "PUT", "/api/files/big.bin", t, &big).0, 201);
    let (status, got) = http(&gw, "GET", "/api/files/big.bin", t, b"");
    assert_eq!(status, 200);
    assert!(
        got == big,
        "large file corrupted ({} bytes back)",
        got.len()
    );
    assert_eq!(
        http(&gw, "DELETE", "/api/files/notes/today/plan.md", t, b"").0,
        204
    );
    assert_eq!(
        http(&gw, "GET", "/api/files/notes/today/plan.md", t, b"").0,
        404
    );
    // Without a token: 401.
    let (status, body) = http(&gw, "GET", "/api/files?dir=", None, b"");
    assert_eq!((status, code(&body).as_str()), (401, "UNAUTHORIZED"));
}

#[tokio::test]
async fn traversal_absolute_nul_and_symlink_escapes_are_refused() {
    let gw = Gateway::start(&["--enable-warm-pool", "false"]);
    let alice = gw.create_token("alice");
    let bob = gw.create_token("bob");
    let a = Some(alice.as_str());
    assert_eq!(
        http(&gw, "PUT", "/api/files/secret.txt", a, b"alice-secret").0,
        201
    );
    let bob_ws = gw.workspace("bob");
    std::fs::create_dir_all(&bob_ws).unwrap();
    let b = Some(bob.as_str());
    for path in [
        "/api/files/../alice/secret.txt",
        "/api/files/%2e%2e/alice/secret.txt",
        "/api/files/x/../../alice/secret.txt",
        "/api/files//etc/passwd",
        "/api/files/%2Fetc%2Fpasswd",
        "/api/files/a%00b",
        "/api/files?dir=..",
        "/api/files?dir=/",
    ] {
        let (status, body) = http(&gw, "GET", path, b, b"");
        assert!(
            status == 400 || status == 403 || status == 404,
            "{path}: {status}"
        );
        assert!(
            !String::from_utf8_lossy(&body).contains("alice-secret"),
            "{path} leaked"
        );
        assert!(
            !String::from_utf8_lossy(&body).contains("root:"),
            "{path} leaked /etc/passwd"
        );
    }
    // Symlinks planted in bob's workspace (as his agent could) lead nowhere.
    let alice_file = gw.workspace("alice").join("secret.txt");
    std::os::unix::fs::symlink(&alice_file, bob_ws.join("link")).unwrap();
    std::os::unix::fs::symlink(gw.workspace("alice"), bob_ws.join("dirlink")).unwrap();
    std::os::unix::fs::symlink("/etc", bob_ws.join("etc")).unwrap();
    for path in [
        "/api/files/link",
        "/api/files/dirlink/secret.txt",
        "/api/files/etc/passwd",
        "/api/files?dir=dirlink",
    ] {
        let (status, body) = http(&gw, "GET", path, b, b"");
        assert_eq!((status, code(&body).as_str()), (403, "FORBIDDEN"), "{path}");
    }
    // Writing through a symlinked directory cannot land outside either.
    let (status, _) = http(&gw, "PUT", "/api/files/dirlink/planted.txt", b, b"x");
    assert_eq!(status, 403);
    assert!(!gw.workspace("alice").join("planted.txt").exists());
    // Writing to a name that is a symlink does not follow it.
    let (status, _) = http(&gw, "PUT", "/api/files/link", b, b"overwritten");
    assert!(status >= 400, "{status}");
    assert_eq!(read(&alice_file), "alice-secret");
    // Deleting a symlink removes the link, never its target.
    assert_eq!(http(&gw, "DELETE", "/api/files/link", b, b"").0, 204);
    assert!(alice_file.exists());
    // A symlink that stays inside the workspace is fine.
    std::fs::write(bob_ws.join("real.txt"), "mine").unwrap();
    std::os::unix::fs::symlink("real.txt", bob_ws.join("alias")).unwrap();
    let (status, body) = http(&gw, "GET", "/api/files/alias", b, b"");
    assert_eq!((status, body.as_slice()), (200, b"mine".as_slice()));
    // Bob's view of "secret.txt" is his own (missing) file.
    assert_eq!(http(&gw, "GET", "/api/files/secret.txt", b, b"").0, 404);
}
