//! Real per-user isolation in the process backend: agents run under
//! bubblewrap. Identities switch for real (two users' tokens); user B's shell
//! agent tries every way we know to reach user A's secret.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite;

async fn run(c: &mut Client, id: &str, command: &str) -> Vec<serde_json::Value> {
    c.send(json!({"type": "message", "id": id, "conversation_id": "attack", "content": command}))
        .await;
    c.turn().await
}

#[tokio::test]
async fn another_users_agent_cannot_read_or_write_a_workspace_that_is_not_its_own() {
    let gw = Gateway::start(&["--enable-warm-pool", "false"]);
    attack_battery(&gw).await;
    let ready = gw.logs();
    let ready: Vec<_> = ready
        .iter()
        .filter(|l| l["phase"] == "task_ready")
        .collect();
    assert!(!ready.is_empty());
    assert!(ready.iter().all(|l| l["agentPrestarted"] == false));
}

/// The same attacks on warm sandboxes whose agent started before the claim
/// (`prepare`): the user's workspace is mounted into the running sandbox at
/// claim time, and nothing else ever is.
#[tokio::test]
async fn a_prestarted_warm_agent_sees_only_the_workspace_bound_at_its_claim() {
    let gw = Gateway::start(&["--warm-pool-target-size", "3"]);
    gw.wait_pool_ready(3, WAIT).await;
    gw.wait_log(
        "agent_prestarted",
        |l| l["event"] == "agent_prestarted",
        WAIT,
    )
    .await;
    attack_battery(&gw).await;
    let logs = gw.logs();
    let ready: Vec<_> = logs.iter().filter(|l| l["phase"] == "task_ready").collect();
    assert!(
        ready
            .iter()
            .any(|l| l["source"] == "warm" && l["agentPrestarted"] == true),
        "no warm session used a pre-started agent: {ready:?}"
    );
    // The bind mounts live in the runners' own mount namespaces only.
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host_mounts.contains("aishell-slot"),
        "a workspace slot leaked into the host's mounts"
    );
    assert!(
        !host_mounts.contains(&gw.workspace("alice").to_string_lossy().to_string()),
        "alice's workspace is mounted on the host"
    );
}

/// Alice keeps a busy agent holding a secret; Bob's shell agent tries every
/// way we know to reach it, then uses his own workspace.
async fn attack_battery(gw: &Gateway) {
    let alice = gw.create_token("alice");
    let bob = gw.create_token("bob");
    let secret = format!("s3cr3t-{}", std::process::id());
    let mut a = gw.connect_as(&alice, None).await.unwrap();
    let frames = run(
        &mut a,
        "a1",
        &format!("echo {secret} > secret.txt && cat secret.txt"),
    )
    .await;
    assert!(
        text_of(&frames).contains(&secret),
        "alice can use her own workspace"
    );
    // Keep alice's agent busy so its process exists during the attacks.
    a.send(
        json!({"type": "message", "id": "a2", "conversation_id": "busy", "content": "sleep 20"}),
    )
    .await;
    a.until(|v| is_type(v, "tool_call"), WAIT).await;

    let alice_ws = gw.workspace("alice");
    let root = alice_ws.parent().unwrap().to_string_lossy().to_string();
    let alice_path = alice_ws.to_string_lossy().to_string();
    let mut b = gw.connect_as(&bob, None).await.unwrap();
    let attacks = [
        "cat ../alice/secret.txt".to_string(),
        format!("cat {alice_path}/secret.txt"),
        format!("ls -la {root}"),
        format!("ls {alice_path}"),
        "find / -name secret.txt 2>/dev/null; true".to_string(),
        "timeout 8 grep -rs --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev 's3cr3t-[0-9]' / ; true".to_string(),
        format!("ln -s {alice_path}/secret.txt l && cat l"),
        format!("for p in /proc/[0-9]*; do cat $p/root{alice_path}/secret.txt 2>/dev/null; done; ls /proc | head -50"),
        "ps aux 2>/dev/null || ls /proc".to_string(),
        format!("touch {root}/bob-was-here"),
        format!("touch {alice_path}/bob-was-here"),
        "touch /usr/bob-was-here".to_string(),
        "cat /etc/shadow".to_string(),
        "env".to_string(),
    ];
    for (i, attack) in attacks.iter().enumerate() {
        let frames = run(&mut b, &format!("b{i}"), attack).await;
        let all = pretty(&frames);
        assert!(
            !all.contains(&secret),
            "attack `{attack}` leaked the secret:\n{all}"
        );
        assert!(
            !all.contains("AISHELL_TASK_CREDENTIAL"),
            "attack `{attack}` saw the runner's credential"
        );
    }
    assert!(!std::path::Path::new(&format!("{root}/bob-was-here")).exists());
    assert!(!alice_ws.join("bob-was-here").exists());
    assert!(!std::path::Path::new("/usr/bob-was-here").exists());
    // Only bob's own processes are visible to him.
    let frames = run(&mut b, "ps", "ls /proc | grep -c '^[0-9]'").await;
    let count: usize = text_of(&frames).trim().parse().unwrap_or(999);
    assert!(count < 10, "bob sees {count} processes");
    // Bob's own workspace works.
    let frames = run(&mut b, "own", "echo mine > mine.txt && cat mine.txt").await;
    assert!(text_of(&frames).contains("mine"));
    assert_eq!(read(&gw.workspace("bob").join("mine.txt")), "mine\n");
}

#[tokio::test]
async fn network_policy_and_resource_limits_apply_inside_the_sandbox() {
    let probe = |port: u16| {
        format!(
            "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('REACHED')\""
        )
    };
    let open = Gateway::start(&["--enable-warm-pool", "false", "--sandbox-max-files", "321"]);
    let mut c = open.connect().await;
    let frames = run(&mut c, "n1", &probe(open.port)).await;
    // Network on (the default) is a namespace of its own: the host's
    // loopback stays out of reach (attack_network.rs tests the rest).
    assert!(
        !text_of(&frames).contains("REACHED"),
        "the sandbox reached the gateway on the host's loopback: {}",
        pretty(&frames)
    );
    let frames = run(&mut c, "l1", "ulimit -n").await;
    assert_eq!(text_of(&frames).trim(), "321");

    let closed = Gateway::start(&["--enable-warm-pool", "false", "--sandbox-network", "false"]);
    let mut c = closed.connect().await;
    let frames = run(&mut c, "n2", &probe(closed.port)).await;
    assert!(
        !text_of(&frames).contains("REACHED"),
        "network off: {}",
        pretty(&frames)
    );
    // The session itself works: the runner, outside, still talks to the gateway.
    let frames = run(&mut c, "ok", "echo fine").await;
    assert!(text_of(&frames).contains("fine"));
}

/// Without bubblewrap, `serve` still works on a fresh machine, but for its
/// local user only: nobody else's agent could be confined.
#[tokio::test]
async fn without_bwrap_serve_runs_for_the_local_user_only() {
    let gw = Gateway::start_with_env(
        &["--agent", "echo", "--enable-warm-pool", "false"],
        &[("PATH", "/nonexistent")],
    );
    assert!(gw.raw_logs().contains("sandbox_unavailable"));
    let mut c = gw.connect().await;
    c.message("m1", "still works").await;
    assert!(text_of(&c.turn().await).contains("still works"));
    let bob = gw.create_token("bob");
    let refused = gw.connect_as(&bob, None).await;
    let Err(tungstenite::Error::Http(resp)) = refused else {
        panic!("bob was let in");
    };
    assert_eq!(resp.status(), 401);
    let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string();
    assert!(
        body.contains("only user `local` may connect") && body.contains("install bubblewrap"),
        "{body}"
    );
}

#[test]
fn serve_refuses_to_run_unconfined_without_an_explicit_flag_when_bwrap_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str]| {
        std::process::Command::new(BIN)
            .args(["serve", "--port", "0", "--enable-warm-pool", "false"])
            .args(extra)
            .arg("--data-dir")
            .arg(dir.path())
            .env("PATH", "/nonexistent")
            .output()
            .unwrap()
    };
    // bwrap asked for explicitly: refused.
    let out = serve(&["--sandbox", "bwrap"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bubblewrap") && err.contains("--insecure-no-sandbox"),
        "{err}"
    );
    // Other users' workspaces exist: the single-user fallback would expose them.
    std::fs::create_dir_all(dir.path().join("workspaces/alice")).unwrap();
    let out = serve(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Workspaces of other users exist (alice)") && err.contains("bubblewrap"),
        "{err}"
    );

    // With the flag it starts (and says so loudly).
    let mut child = std::process::Command::new(BIN)
        .args([
            "serve",
            "--port",
            "0",
            "--insecure-no-sandbox",
            "true",
            "--enable-warm-pool",
            "false",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("PATH", "/nonexistent")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline && !seen.contains("aishell is ready") {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push_str(&line);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.contains("sandbox_disabled") && seen.contains("aishell is ready"),
        "{seen}"
    );
}
