//! The network an agent sees is not the host's: from inside a real user's
//! sandbox (shell agent under bubblewrap), the host's loopback listeners —
//! the gateway's own port, any other — are out of reach, while the agent's
//! own model endpoint and an outside address answer. The outside is a
//! network namespace this test creates, joined to the host by a veth pair
//! (no internet needed). By default the only way out is the runner's egress
//! proxy, which refuses loopback, private and link-local destinations
//! unless allowed (`--sandbox-egress-allow`, here the outside's one
//! address); with `--sandbox-egress full`, `pasta` routes everything but the
//! host's loopback, and no `pasta` outlives its sandbox. With
//! `--sandbox-network false` nothing answers.

mod common;
#[path = "../../agents/tests/model_server/mod.rs"]
mod model_server;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

async fn run(c: &mut Client, id: &str, command: &str) -> String {
    c.send(json!({"type": "message", "id": id, "conversation_id": "net", "content": command}))
        .await;
    pretty(&c.turn().await)
}

/// A shell command that connects to `host:port` and prints what it got.
fn probe(host: &str, port: u16) -> String {
    format!(
        "python3 -c \"
import socket
try:
    s = socket.create_connection(('{host}', {port}), timeout=3)
    s.settimeout(3)
    print('PROBE' + '-OK', s.recv(64))
except Exception as e:
    print('PROBE' + '-FAIL', type(e).__name__)
\""
    )
}

/// A shell command that asks the sandbox's egress proxy (`$HTTPS_PROXY`)
/// for a tunnel to `host:port`: `PROXY-OK <bytes>` when it opened and the
/// destination spoke, `PROXY-REFUSED <status> <body>` when the proxy said
/// no, `PROXY-FAIL` when there was no proxy to ask.
fn probe_via_proxy(host: &str, port: u16) -> String {
    format!(
        "python3 -c \"
import os, socket
u = os.environ.get('HTTPS_PROXY', '')
try:
    h, p = u.split('//', 1)[1].rstrip('/').rsplit(':', 1)
    s = socket.create_connection((h, int(p)), timeout=5)
    s.sendall(b'CONNECT {host}:{port} HTTP/1.1\\r\\nHost: {host}:{port}\\r\\n\\r\\n')
    s.settimeout(5)
    head = b''
    while b'\\r\\n\\r\\n' not in head:
        d = s.recv(1)
        if not d:
            break
        head += d
    status = head.split(b'\\r\\n')[0].decode()
    if ' 200 ' in status:
        print('PROXY' + '-OK', s.recv(64))
    else:
        print('PROXY' + '-REFUSED', status, s.recv(400))
except Exception as e:
    print('PROXY' + '-FAIL', type(e).__name__, repr(u))
\""
    )
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().unwrap()
}

fn sh_ok(cmd: &str) {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// "The outside": a network namespace joined to the host by a veth pair,
/// with a TCP listener that answers `OUTSIDE`. Removed on drop.
struct Outside {
    netns: String,
    veth: String,
    address: String,
    /// The host's own end of the link (a private address of the host).
    host_side: String,
    port: u16,
    listener: std::process::Child,
}

impl Outside {
    fn create(tag: u8) -> Outside {
        let id = std::process::id() % 10_000;
        let netns = format!("aishell-egress-{id}-{tag}");
        let veth = format!("aeg{id}x{tag}");
        let peer = format!("aep{id}x{tag}");
        let net = format!("10.213.{}", (id % 50) * 5 + u32::from(tag));
        let port = 18_000 + tag as u16;
        let address = format!("{net}.2");
        let mut outside = Outside {
            netns: netns.clone(),
            veth: veth.clone(),
            address: address.clone(),
            host_side: format!("{net}.1"),
            port,
            listener: Command::new("true").spawn().unwrap(),
        };
        sh_ok(&format!("ip netns add {netns}"));
        sh_ok(&format!(
            "ip link add {veth} type veth peer name {peer} && ip link set {peer} netns {netns} \
             && ip addr add {net}.1/30 dev {veth} && ip link set {veth} up \
             && ip -n {netns} addr add {address}/30 dev {peer} && ip -n {netns} link set {peer} up \
             && ip -n {netns} link set lo up"
        ));
        outside.listener = Command::new("ip")
            .args(["netns", "exec", &netns, "python3", "-c"])
            .arg(format!(
                "import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('{address}', {port}))
s.listen()
print('listening', flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b'OUTSIDE')
    c.close()"
            ))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = [0u8; 9];
        outside
            .listener
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut line)
            .unwrap();
        // The host reaches it (the route the sandbox's traffic takes).
        let mut s = std::net::TcpStream::connect((address.as_str(), port)).unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert_eq!(got, "OUTSIDE");
        outside
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.listener.kill();
        let _ = self.listener.wait();
        // Deleting one end of the pair deletes both.
        let _ = sh(&format!("ip link del {}", self.veth));
        let _ = sh(&format!("ip netns del {}", self.netns));
    }
}

/// Another service on the host's loopback, answering `LOOPBACK`.
fn loopback_listener() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"LOOPBACK");
        }
    });
    port
}

/// `pasta` processes under the gateway (its runners start them).
fn pasta_under(gw: &Gateway) -> Vec<i32> {
    descendants(gw.pid() as i32)
        .into_iter()
        .filter(|(_, cmd)| cmd.starts_with("pasta "))
        .map(|(pid, _)| pid)
        .collect()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

async fn model_gateway(extra: &[&str], server: &model_server::Server) -> Gateway {
    let mut args = vec!["--enable-warm-pool", "false"];
    args.extend_from_slice(extra);
    Gateway::start_with_env(
        &args,
        &[
            ("AISHELL_LLM_BASE_URL", server.base_url().as_str()),
            ("AISHELL_LLM_MODEL", "test-model"),
            ("AISHELL_LLM_API_KEYS", "sk-egress-test"),
        ],
    )
}

/// The model call the agent would make, through its own endpoint.
const MODEL_CALL: &str = "curl -sS -m 5 -H \"Authorization: Bearer $AISHELL_LLM_API_KEY\" -H 'content-type: application/json' -d '{\"model\":\"test-model\",\"messages\":[]}' \"$AISHELL_LLM_BASE_URL/chat/completions\"; echo; echo url=$AISHELL_LLM_BASE_URL";

fn answering_model() -> Vec<model_server::Reply> {
    vec![model_server::status(
        200,
        &[("content-type", "application/json")],
        "{\"reply\":\"MODEL-ANSWERED\"}",
    )]
}

/// The default: no route out of the namespace at all; the proxy carries
/// what its policy allows, by name, and refuses the host's addresses.
#[tokio::test]
async fn by_default_the_agent_reaches_the_outside_only_through_its_proxy() {
    let outside = Outside::create(4);
    let other = loopback_listener();
    let server = model_server::Server::start(answering_model()).await;
    let allow = format!("{}/32", outside.address);
    let gw = model_gateway(&["--sandbox-egress-allow", &allow], &server).await;
    let mut c = gw.connect().await;

    // Directly: nothing, not even the outside (no route, no interface).
    for (id, host, port) in [
        ("gw", "127.0.0.1".to_string(), gw.port),
        ("lo", "127.0.0.1".to_string(), other),
        ("out", outside.address.clone(), outside.port),
    ] {
        let got = run(&mut c, id, &probe(&host, port)).await;
        assert!(
            got.contains("PROBE-FAIL") && !got.contains("PROBE-OK"),
            "{host}:{port} answered a direct connection:\n{got}"
        );
    }
    let routes = run(&mut c, "routes", "cat /proc/net/route; echo ROUTES-END").await;
    let table: Vec<&str> = routes
        .lines()
        .skip_while(|l| !l.starts_with("Iface"))
        .skip(1)
        .take_while(|l| !l.contains("ROUTES-END"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(table.is_empty(), "the namespace has routes: {table:?}");

    // Through the proxy: the allowed outside address answers.
    let out = run(
        &mut c,
        "pout",
        &probe_via_proxy(&outside.address, outside.port),
    )
    .await;
    assert!(
        out.contains("PROXY-OK") && out.contains("OUTSIDE"),
        "the proxy must carry the agent to the allowed outside address:\n{out}"
    );
    // And refuses the host: its loopback (the gateway), its private address
    // on the link (not in the allow list), cloud metadata.
    for (id, host, port, why) in [
        ("pgw", "127.0.0.1".to_string(), gw.port, "loopback"),
        ("plo", "localhost".to_string(), other, "loopback"),
        ("phost", outside.host_side.clone(), gw.port, "private"),
        ("pmeta", "169.254.169.254".to_string(), 80, "link-local"),
    ] {
        let got = run(&mut c, id, &probe_via_proxy(&host, port)).await;
        assert!(
            got.contains("PROXY-REFUSED") && got.contains("403") && got.contains(why),
            "the proxy did not refuse {host}:{port} as {why}:\n{got}"
        );
    }
    // Plain HTTP through the proxy, as curl does it from the environment
    // (loopback names are in NO_PROXY: the model endpoint is local).
    let curl = run(
        &mut c,
        "curl",
        &format!(
            "curl -sS -m 5 -o /dev/null -w 'status=%{{http_code}}' http://{}:{}/health",
            outside.host_side, gw.port
        ),
    )
    .await;
    assert!(
        curl.contains("status=403"),
        "curl through the proxy reached the gateway:\n{curl}"
    );

    // The model endpoint is on the namespace's own loopback.
    let model = run(&mut c, "model", MODEL_CALL).await;
    assert!(
        model.contains("MODEL-ANSWERED"),
        "the agent's own model endpoint must answer:\n{model}"
    );
    assert_eq!(
        server.requests().len(),
        1,
        "one model call reached the model"
    );
    assert!(
        pasta_under(&gw).is_empty(),
        "pasta runs in proxy mode: {:?}",
        pasta_under(&gw)
    );
}

#[tokio::test]
async fn with_full_egress_the_agent_reaches_its_model_and_the_outside_but_no_host_loopback_listener()
 {
    let outside = Outside::create(1);
    let other = loopback_listener();
    let server = model_server::Server::start(answering_model()).await;
    let mut gw = model_gateway(&["--sandbox-egress", "full"], &server).await;
    let mut c = gw.connect().await;

    let gateway_port = run(&mut c, "gw", &probe("127.0.0.1", gw.port)).await;
    assert!(
        gateway_port.contains("PROBE-FAIL") && !gateway_port.contains("PROBE-OK"),
        "the agent reached the gateway's port on 127.0.0.1:\n{gateway_port}"
    );
    let other_port = run(&mut c, "lo", &probe("127.0.0.1", other)).await;
    assert!(
        !other_port.contains("LOOPBACK") && other_port.contains("PROBE-FAIL"),
        "the agent reached another listener on the host's loopback:\n{other_port}"
    );
    // The namespace's gateway address is not the host's loopback either.
    let routes = run(&mut c, "gwaddr", "cat /proc/net/route").await;
    let gateway_hex = routes
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"00000000")).then(|| f.get(2).map(|s| s.to_string()))?
        })
        .unwrap_or_default();
    if let Ok(g) = u32::from_str_radix(&gateway_hex, 16) {
        let g = std::net::Ipv4Addr::from(g.swap_bytes()).to_string();
        let via_gateway = run(&mut c, "viagw", &probe(&g, gw.port)).await;
        assert!(
            !via_gateway.contains("PROBE-OK"),
            "the agent reached the gateway through {g}:\n{via_gateway}"
        );
    }

    let model = run(&mut c, "model", MODEL_CALL).await;
    assert!(
        model.contains("MODEL-ANSWERED"),
        "the agent's own model endpoint must answer:\n{model}"
    );
    assert_eq!(
        server.requests().len(),
        1,
        "one model call reached the model"
    );

    let out = run(&mut c, "out", &probe(&outside.address, outside.port)).await;
    assert!(
        out.contains("PROBE-OK") && out.contains("OUTSIDE"),
        "the agent must reach the outside:\n{out}"
    );
    // And it has a network namespace of its own.
    let ns = run(&mut c, "ns", "readlink /proc/self/ns/net").await;
    let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert!(
        !ns.contains(&host_ns.to_string_lossy().to_string()),
        "the agent shares the host's network namespace: {ns}"
    );

    let pasta = pasta_under(&gw);
    assert_eq!(pasta.len(), 1, "one pasta for the one sandbox: {pasta:?}");
    c.close().await;
    gw.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pasta.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !pasta.iter().any(|p| alive(*p)),
        "pasta outlived its sandbox: {pasta:?}"
    );
}

#[tokio::test]
async fn without_the_sandbox_network_nothing_answers_and_no_pasta_runs() {
    let outside = Outside::create(2);
    let other = loopback_listener();
    let server = model_server::Server::start(vec![]).await;
    let gw = model_gateway(&["--sandbox-network", "false"], &server).await;
    let mut c = gw.connect().await;
    for (id, host, port) in [
        ("gw", "127.0.0.1".to_string(), gw.port),
        ("lo", "127.0.0.1".to_string(), other),
        ("out", outside.address.clone(), outside.port),
    ] {
        let got = run(&mut c, id, &probe(&host, port)).await;
        assert!(
            got.contains("PROBE-FAIL") && !got.contains("PROBE-OK"),
            "{host}:{port} answered with the network off:\n{got}"
        );
    }
    let model = run(&mut c, "model", MODEL_CALL).await;
    assert!(!model.contains("MODEL-ANSWERED"), "{model}");
    assert!(server.requests().is_empty());
    assert!(
        pasta_under(&gw).is_empty(),
        "pasta runs with the network off"
    );
}

/// Pre-started warm sandboxes get their namespace at start: the claim finds
/// it connected, with the same reach as a cold start.
#[tokio::test]
async fn a_prestarted_sandbox_has_its_network_before_the_claim() {
    let outside = Outside::create(3);
    let server = model_server::Server::start(vec![]).await;
    let allow = format!("{}/32", outside.address);
    let gw = Gateway::start_with_env(
        &[
            "--warm-pool-target-size",
            "1",
            "--sandbox-egress-allow",
            &allow,
        ],
        &[
            ("AISHELL_LLM_BASE_URL", server.base_url().as_str()),
            ("AISHELL_LLM_MODEL", "test-model"),
            ("AISHELL_LLM_API_KEYS", "sk-egress-test"),
        ],
    );
    gw.wait_pool_ready(1, WAIT).await;
    gw.wait_log(
        "agent_prestarted",
        |l| l["event"] == "agent_prestarted",
        WAIT,
    )
    .await;
    let mut c = gw.connect().await;
    let gateway_port = run(&mut c, "gw", &probe("127.0.0.1", gw.port)).await;
    assert!(!gateway_port.contains("PROBE-OK"), "{gateway_port}");
    let via_proxy = run(&mut c, "gwp", &probe_via_proxy("127.0.0.1", gw.port)).await;
    assert!(via_proxy.contains("PROXY-REFUSED"), "{via_proxy}");
    let out = run(
        &mut c,
        "out",
        &probe_via_proxy(&outside.address, outside.port),
    )
    .await;
    assert!(out.contains("PROXY-OK") && out.contains("OUTSIDE"), "{out}");
    let ready = gw.logs();
    assert!(
        ready
            .iter()
            .any(|l| l["phase"] == "task_ready" && l["agentPrestarted"] == true),
        "the session did not use the pre-started agent"
    );
}
