//! Attacks from inside a real user's sandbox (process backend, bubblewrap,
//! shell agent): every one runs as a command of the user's agent and must
//! be refused. See ARCHITECTURE.md, "Agent sandbox".

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use common::*;
use serde_json::json;

async fn run(c: &mut Client, id: &str, command: &str) -> Vec<serde_json::Value> {
    c.send(json!({"type": "message", "id": id, "conversation_id": "attack", "content": command}))
        .await;
    c.turn().await
}

/// True when running as root; otherwise says on stderr why the test skips.
fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { nix::libc::geteuid() } == 0;
    if !root {
        eprintln!("not root: the per-user UID sandbox needs a root runner; skipped");
    }
    root
}

/// `name: value` from a `/proc/*/status` text.
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

/// The runner serving `session_id` (found through its task id).
async fn runner_pid(gw: &Gateway, session_id: &str) -> i32 {
    let ready = gw
        .wait_log(
            "task_ready",
            |l| l["phase"] == "task_ready" && l["sessionId"] == session_id,
            WAIT,
        )
        .await;
    let task = ready["taskId"].as_str().unwrap().to_string();
    let runners = pids_with_env(&format!("AISHELL_TASK_ID={task}"), " runner");
    assert_eq!(runners.len(), 1, "one runner for task {task}");
    runners[0]
}

const STATUS: &str = "grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status";

fn assert_confined_status(text: &str) {
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(text, set), "0000000000000000", "{set} in:\n{text}");
    }
    assert_eq!(field(text, "NoNewPrivs"), "1", "{text}");
    assert_eq!(field(text, "Seccomp"), "2", "{text}");
}

/// name_to_handle_at on the workspace, then open_by_handle_at with a
/// forged handle for inode 2 (the file system's root): the
/// CAP_DAC_READ_SEARCH escape to the host's `/`.
const HANDLE_ESCAPE: &str = r#"python3 - <<'EOF'
import ctypes, os, struct
libc = ctypes.CDLL(None, use_errno=True)
class FH(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 128)]
fh = FH(); fh.handle_bytes = 128; mnt = ctypes.c_int()
r = libc.name_to_handle_at(-100, b"/workspace", ctypes.byref(fh), ctypes.byref(mnt), 0)
print("name_to_handle_at", r, ctypes.get_errno())
forged = FH(); forged.handle_bytes = 8; forged.handle_type = 1
struct.pack_into("<II", forged.f_handle, 0, 2, 0)
fd = os.open("/workspace", os.O_RDONLY)
r = libc.open_by_handle_at(fd, ctypes.byref(forged), os.O_RDONLY)
print("open_by_handle_at", r, ctypes.get_errno())
EOF"#;

const SOCKETS: &str = r#"python3 - <<'EOF'
import socket
for name, args in [("packet", (17, 3, 0)), ("raw", (2, 3, 1)), ("tcp", (2, 1, 0))]:
    try:
        socket.socket(*args).close(); print(name, "ok")
    except OSError as e:
        print(name, "errno", e.errno)
EOF"#;

/// The attacks every sandbox must refuse, whoever started it and when.
async fn refusals(gw: &Gateway, c: &mut Client) {
    let text = text_of(&run(c, "status", STATUS).await);
    assert_confined_status(&text);

    let text = text_of(&run(c, "handle", HANDLE_ESCAPE).await);
    assert!(text.contains("name_to_handle_at -1 1\n"), "{text}");
    assert!(text.contains("open_by_handle_at -1 1\n"), "{text}");

    let text = text_of(&run(c, "sockets", SOCKETS).await);
    assert!(text.contains("packet errno 1"), "{text}");
    assert!(text.contains("raw errno 1"), "{text}");
    assert!(text.contains("tcp ok"), "{text}");

    let text = text_of(
        &run(
            c,
            "mknod",
            "mknod blk b 8 0; echo b=$?; mknod chr c 1 3; echo c=$?; mkfifo fifo && echo fifo=ok",
        )
        .await,
    );
    assert!(text.contains("b=1") && text.contains("c=1"), "{text}");
    assert!(text.contains("fifo=ok"), "{text}");

    let root = gw
        .workspace("x")
        .parent()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let text = text_of(&run(c, "cmdline", "tr '\\0' ' ' < /proc/1/cmdline").await);
    assert!(text.contains("bwrap --args "), "{text}");
    assert!(!text.contains(&root), "{text}");
}

/// The UID of the agent serving `c`'s session, as the host sees it, and
/// the owner of its workspace.
async fn agent_uid(gw: &Gateway, c: &Client) -> u32 {
    let agents = agent_pids_of_session(gw, &c.session_id, "shell").await;
    assert!(!agents.is_empty(), "no agent found");
    let status = std::fs::read_to_string(format!("/proc/{}/status", agents[0])).unwrap();
    let uids: Vec<u32> = field(&status, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uids.iter().all(|u| *u == uids[0]), "{uids:?}");
    uids[0]
}

/// Two users' agents run under two UIDs of their own, neither root, each
/// owning a 0700 workspace the other cannot read from the host either.
async fn own_uids(gw: &Gateway, alice: &mut Client, bob: &mut Client) {
    run(alice, "secret", "echo alice-secret > secret.txt").await;
    // Bob's sandbox starts with his first message.
    run(bob, "hello", "true").await;
    let (a, b) = (agent_uid(gw, alice).await, agent_uid(gw, bob).await);
    assert_ne!(a, 0);
    assert_ne!(b, 0);
    assert_ne!(a, b);
    let ws = gw.workspace("alice");
    let meta = std::fs::metadata(&ws).unwrap();
    assert_eq!(meta.uid(), a);
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    let text = text_of(&run(alice, "id", "id -u").await);
    assert_eq!(text.trim(), a.to_string());
    // Bob's UID, outside any namespace, cannot read alice's workspace.
    let out = std::process::Command::new("cat")
        .arg(ws.join("secret.txt"))
        .uid(b)
        .gid(b)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
}

use std::os::unix::process::CommandExt;

#[tokio::test]
async fn a_cold_sandbox_refuses_every_escape_and_runs_as_its_users_own_uid() {
    if !root_or_skip() {
        return;
    }
    let gw = Gateway::start(&[
        "--enable-warm-pool",
        "false",
        "--sandbox-tmp-bytes",
        "1048576",
        "--sandbox-pids-max",
        "64",
    ]);
    let mut alice = gw
        .connect_as(&gw.create_token("alice"), None)
        .await
        .unwrap();
    refusals(&gw, &mut alice).await;
    let mut bob = gw.connect_as(&gw.create_token("bob"), None).await.unwrap();
    own_uids(&gw, &mut alice, &mut bob).await;

    // /tmp is a small tmpfs.
    let text = text_of(
        &run(
            &mut alice,
            "tmp",
            "dd if=/dev/zero of=/tmp/big bs=64k count=64 2>&1; rm -f /tmp/big",
        )
        .await,
    );
    assert!(text.contains("No space left on device"), "{text}");

    // A fork bomb stops at the sandbox's process limit (builtins only once
    // it is reached), and the sandbox and gateway carry on.
    let frames = run(
        &mut alice,
        "fork",
        "(i=0; while [ $i -lt 300 ]; do sleep 60 & echo $! >> /tmp/pids; i=$((i+1)); echo $i > /tmp/n; done) 2>/dev/null; while read p; do kill -9 $p; done < /tmp/pids; read n < /tmp/n; echo started=$n",
    )
    .await;
    let text = text_of(&frames);
    let started: usize = text
        .rsplit("started=")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}", pretty(&frames)));
    assert!(
        started < 64,
        "{started} processes started past a limit of 64"
    );
    let text = text_of(&run(&mut alice, "after-fork", "echo alive").await);
    assert!(text.contains("alive"), "{text}");
    assert_eq!(gw.http_get("/health").0, 200);

    // The sandbox's cgroups exist while the agent runs.
    let runner = runner_pid(&gw, &alice.session_id).await;
    let cgroups = std::fs::read_to_string(format!("/proc/{runner}/cgroup")).unwrap();
    let agents = agent_pids_of_session(&gw, &alice.session_id, "shell").await;
    let agent_cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", agents[0])).unwrap();
    assert!(
        agent_cgroups.contains("pids:/aishell/") && agent_cgroups.contains("memory:/aishell/"),
        "{agent_cgroups}"
    );
    assert!(
        !cgroups.contains("/aishell/"),
        "the runner stays outside: {cgroups}"
    );
}

/// The runner stays small whatever its agent writes: a 400 MB stderr line
/// is truncated as it is read, a 20 MB stdout line (over the frame limit)
/// is skipped as it is read and ends the turn with an error.
#[tokio::test]
async fn huge_agent_lines_leave_the_runner_small_and_the_session_usable() {
    if !root_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = agent_script(
        dir.path(),
        "huge-lines.sh",
        r#"#!/bin/sh
read line
echo '{"type":"init","agent":"huge"}'
while read line; do
  case "$line" in
    *to-stderr*) head -c 400000000 /dev/zero | tr '\0' e >&2; echo >&2 ;;
    *to-stdout*) head -c 20000000 /dev/zero | tr '\0' o; echo ;;
  esac
  echo '{"type":"text_delta","conversation_id":"c1","delta":"ok"}'
  echo '{"type":"finish","conversation_id":"c1","token_usage":{"input_tokens":1,"output_tokens":1}}'
done
"#,
    );
    let gw = Gateway::start_cold_with_agent(&script);
    let mut c = gw.connect().await;
    let say = |id: &str, content: &str| json!({"type": "message", "id": id, "conversation_id": "c1", "content": content});
    c.send(say("m1", "hello")).await;
    assert!(text_of(&c.turn().await).contains("ok"));
    let runner = runner_pid(&gw, &c.session_id).await;
    let peak_kb = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{runner}/status")).unwrap();
        field(&status, "VmHWM")
            .trim_end_matches(" kB")
            .parse()
            .unwrap()
    };

    c.send(say("m2", "to-stderr")).await;
    let frames = c.turn().await;
    assert!(text_of(&frames).contains("ok"), "{}", pretty(&frames));
    let line = gw
        .wait_log(
            "the truncated stderr line",
            |l| {
                l["event"] == "agent_stderr"
                    && l["line"].as_str().unwrap_or("").contains("…[truncated ")
            },
            WAIT,
        )
        .await;
    assert!(line["line"].as_str().unwrap().len() < 16 << 10, "{line}");
    let peak = peak_kb();
    assert!(
        peak < 64 * 1024,
        "runner peaked at {peak} kB reading a 400 MB stderr line"
    );

    c.send(say("m3", "to-stdout")).await;
    let frames = c.turn().await;
    let error = first_error(&frames);
    assert_eq!(error["error"]["code"], "AGENT_ERROR", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("over the 16 MiB limit"),
        "{error}"
    );
    assert!(frames.iter().all(|f| f.to_string().len() < 1 << 20));
    c.send(say("m4", "next")).await;
    let frames = c.turn().await;
    assert!(
        is_type(frames.last().unwrap(), "finish"),
        "{}",
        pretty(&frames)
    );
    assert!(text_of(&frames).contains("ok"), "{}", pretty(&frames));
    let peak = peak_kb();
    assert!(peak < 64 * 1024, "runner peaked at {peak} kB");
}

/// Warm sandboxes whose agent started before its user was known: the same
/// refusals once claimed, and the agent has become its user's own UID with
/// every capability gone (bounding set included).
#[tokio::test]
async fn a_prestarted_sandbox_refuses_every_escape_after_its_claim() {
    if !root_or_skip() {
        return;
    }
    let gw = Gateway::start(&["--warm-pool-target-size", "2"]);
    gw.wait_pool_ready(2, WAIT).await;
    gw.wait_log(
        "agent_prestarted",
        |l| l["event"] == "agent_prestarted",
        WAIT,
    )
    .await;
    let mut alice = gw
        .connect_as(&gw.create_token("alice"), None)
        .await
        .unwrap();
    let mut bob = gw.connect_as(&gw.create_token("bob"), None).await.unwrap();
    refusals(&gw, &mut alice).await;
    own_uids(&gw, &mut alice, &mut bob).await;
    let ready: Vec<_> = gw
        .logs()
        .into_iter()
        .filter(|l| l["phase"] == "task_ready")
        .collect();
    assert!(
        ready.iter().any(|l| l["agentPrestarted"] == true),
        "no session used a pre-started agent: {ready:?}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}
