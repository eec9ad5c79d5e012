//! The `llm` agent end to end through gateway, runner and bubblewrap, against
//! a scripted OpenAI-compatible server on 127.0.0.1 (chunked SSE, tool-call
//! deltas split across chunks, usage in the last chunk, 429s), with the API
//! keys held by the gateway's key pool.

mod common;
#[path = "../../agents/tests/model_server/mod.rs"]
mod model_server;

use std::path::Path;
use std::time::Duration;

use common::*;
use model_server::{Server, hanging, status, text, tool_call};
use serde_json::json;

const KEY_A: &str = "sk-pooled-key-aaaa";
const KEY_B: &str = "sk-pooled-key-bbbb";

fn gateway(server: &Server, extra: &[&str]) -> Gateway {
    let keys = format!("{KEY_A},{KEY_B}");
    let mut args = vec!["--agent", "llm"];
    if !extra.contains(&"--warm-pool-target-size") {
        args.extend(["--warm-pool-target-size", "0"]);
    }
    args.extend_from_slice(extra);
    Gateway::start_with_env(
        &args,
        &[
            ("AISHELL_LLM_BASE_URL", server.base_url().as_str()),
            ("AISHELL_LLM_MODEL", "test-model"),
            ("AISHELL_LLM_API_KEYS", keys.as_str()),
        ],
    )
}

/// Every file under `dir`, recursively, as text.
fn all_text_under(dir: &Path) -> String {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.push_str(&all_text_under(&p));
        } else {
            out.push_str(&String::from_utf8_lossy(
                &std::fs::read(&p).unwrap_or_default(),
            ));
        }
    }
    out
}

/// (pid, environment, command line) of every aishell process but gateways.
fn sandbox_processes() -> Vec<(i32, String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let read = |f: &str| {
            String::from_utf8_lossy(&std::fs::read(entry.path().join(f)).unwrap_or_default())
                .replace('\0', " ")
        };
        let cmdline = read("cmdline");
        if (cmdline.contains("aishell") || cmdline.contains("bwrap"))
            && !cmdline.contains(" serve ")
        {
            out.push((pid, read("environ"), cmdline));
        }
    }
    out
}

#[tokio::test]
async fn pooled_keys_fail_over_and_never_reach_the_sandbox() {
    let server = Server::start(vec![
        // Key A is rate-limited: the gateway rests it and retries on key B.
        status(
            429,
            &[("retry-after", "120")],
            r#"{"error":{"message":"slow down"}}"#,
        ),
        tool_call(
            "call_1",
            "write_file",
            json!({"path": "notes.txt", "content": "written by the llm agent\n"}),
            (40, 12),
        ),
        text("I wrote notes.txt.", (60, 7)),
    ])
    .await;
    let gw = gateway(&server, &[]);
    let mut c = gw.connect().await;
    c.message("m1", "write a note").await;
    let frames = c.turn().await;
    let calls = of_type(&frames, "tool_call");
    assert_eq!(calls.len(), 1, "{}", pretty(&frames));
    assert_eq!(calls[0]["tool_name"], "write_file");
    assert_eq!(of_type(&frames, "tool_result").len(), 1);
    assert!(
        text_of(&frames).contains("I wrote notes.txt."),
        "{}",
        pretty(&frames)
    );
    let finish = of_type(&frames, "finish");
    assert_eq!(finish.len(), 1, "{}", pretty(&frames));
    assert_eq!(
        std::fs::read_to_string(gw.workspace("local").join("notes.txt")).unwrap(),
        "written by the llm agent\n"
    );

    // The upstream saw key A once (429), then key B for every request.
    let requests = server.requests();
    let keys: Vec<_> = requests
        .iter()
        .map(|r| r.header("authorization").unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        keys,
        vec![
            format!("Bearer {KEY_A}"),
            format!("Bearer {KEY_B}"),
            format!("Bearer {KEY_B}")
        ]
    );
    assert!(
        requests
            .iter()
            .all(|r| r.path.ends_with("/v1/chat/completions"))
    );
    assert!(requests.iter().all(|r| r.body["model"] == "test-model"));
    // The second request carries the tool result of the first step.
    assert!(requests[2].body.to_string().contains("call_1"));

    // Metrics show the failover; the log names the session that hit the limit.
    let metrics = gw.metrics_text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("aishell_model_key_failovers_total{provider=\"openai\"} 1")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("aishell_model_requests_total")
                && l.contains("key=\"openai#1\"")
                && l.contains("status=\"429\"")),
        "{metrics}"
    );
    let limited = gw
        .wait_log(
            "model_key_rate_limited",
            |l| l["event"] == "model_key_rate_limited",
            WAIT,
        )
        .await;
    assert_eq!(limited["sessionId"], c.session_id.as_str());
    assert_eq!(limited["key"], "openai#1");
    assert!(!gw.raw_logs().contains(KEY_A) && !gw.raw_logs().contains(KEY_B));

    // No key string in any sandbox process (environment or command line) or
    // in the workspace (history included).
    let procs = sandbox_processes();
    let agent = procs
        .iter()
        .find(|(_, env, cmd)| {
            // The agent itself (bwrap's options are in a file, not on its
            // command line): the session's environment without the runner's
            // credential.
            env.contains(&c.session_id)
                && env.contains("AISHELL_LLM_BASE_URL")
                && !env.contains("AISHELL_TASK_CREDENTIAL")
                && !cmd.contains("runner")
        })
        .unwrap_or_else(|| panic!("no sandboxed agent found among {procs:?}"));
    for (pid, env, cmd) in &procs {
        assert!(
            !env.contains("sk-pooled") && !cmd.contains("sk-pooled"),
            "pid {pid} carries a key: {cmd} / {env}"
        );
    }
    let workspace = all_text_under(&gw.workspace("local"));
    assert!(
        workspace.contains("write a note"),
        "history is kept in the workspace"
    );
    assert!(!workspace.contains("sk-pooled"));

    // The agent's endpoint answers only the agent: no proxy token, no service.
    let base = agent
        .1
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("AISHELL_LLM_BASE_URL="))
        .expect("base url in the agent's environment")
        .to_string();
    let (status, body) = raw_post(&base, "chat/completions", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("UNAUTHORIZED"));
    let (status, _) = raw_post(&base, "chat/completions", Some("Bearer not-the-token"));
    assert_eq!(status, 401);
    assert_eq!(
        server.requests().len(),
        3,
        "refused calls never reach upstream"
    );

    // The gateway's route refuses anything but a task credential.
    let (status, body) = raw_post(
        &gw.http_url("/internal/model/openai"),
        "chat/completions",
        Some("Bearer forged.credential"),
    );
    assert_eq!(status, 401, "{body}");
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn abort_mid_stream_and_the_conversation_survives_a_new_sandbox() {
    let server = Server::start(vec![
        hanging("Thinking about it"),
        text("First answer.", (10, 3)),
    ])
    .await;
    let gw = gateway(&server, &["--session-idle-timeout", "2s"]);
    let mut c = gw.connect().await;
    c.send(json!({"type": "message", "id": "m1", "conversation_id": "conv-1", "content": "take your time"}))
        .await;
    c.until(|v| is_type(v, "text_delta"), WAIT).await;
    let asked = std::time::Instant::now();
    c.send(json!({"type": "abort", "conversation_id": "conv-1"}))
        .await;
    let end = c.turn().await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "abort took {:?}",
        asked.elapsed()
    );
    let last = end.last().unwrap();
    assert!(
        is_type(last, "finish") || last["error"]["code"] == "ABORTED",
        "{}",
        pretty(&end)
    );
    // The upstream saw the hanging request dropped.
    tokio::time::timeout(WAIT, async {
        while server.disconnects() == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the upstream stream was closed by the abort");

    c.send(json!({"type": "message", "id": "m2", "conversation_id": "conv-1", "content": "second question"}))
        .await;
    let frames = c.turn().await;
    assert!(
        text_of(&frames).contains("First answer."),
        "{}",
        pretty(&frames)
    );

    // Idle stop, then a message in a new sandbox continues with the history.
    c.until(
        |v| is_type(v, "status") && v["state"] == "stopped",
        Duration::from_secs(15),
    )
    .await;
    server.push(text("Third answer.", (30, 3)));
    c.send(json!({"type": "message", "id": "m3", "conversation_id": "conv-1", "content": "third question"}))
        .await;
    let frames = c.turn().await;
    assert_eq!(
        of_type(&frames, "session_recovered").len(),
        1,
        "{}",
        pretty(&frames)
    );
    assert!(
        text_of(&frames).contains("Third answer."),
        "{}",
        pretty(&frames)
    );
    let last = server.requests().pop().unwrap();
    let history = last.body["messages"].to_string();
    assert!(
        history.contains("second question") && history.contains("First answer."),
        "the new sandbox's agent sent the full history: {history}"
    );
}

/// POST `{}` to `{base}/{path}`; (status, body).
fn raw_post(base: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = base.strip_prefix("http://").expect("http url");
    let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "POST /{prefix}/{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    )
    .unwrap();
    let mut raw = String::new();
    if let Err(e) = s.read_to_string(&mut raw) {
        panic!("POST {base}/{path}: {e}; got so far: {raw}");
    }
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, raw)
}

/// The gateway's model route with a real task credential (read from a
/// runner's environment, as only a runner has it): every key resting → 429
/// `MODEL_KEYS_EXHAUSTED` with `retry-after`; an unknown provider → 404.
// Multi-threaded: the scripted upstream runs on this runtime while the test
// blocks on plain sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_keys_and_unknown_providers_are_clear_errors() {
    let server = Server::start(vec![
        status(429, &[("retry-after", "300")], "{}"),
        status(429, &[("x-ratelimit-reset-requests", "5m0s")], "{}"),
    ])
    .await;
    let gw = gateway(&server, &["--warm-pool-target-size", "1"]);
    gw.wait_pool_ready(1, WAIT).await;
    let bearer = format!("Bearer {}", runner_credential(&gw));
    let route = gw.http_url("/internal/model/openai");
    let (status, body) = raw_post(&route, "chat/completions", Some(&bearer));
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("MODEL_KEYS_EXHAUSTED"), "{body}");
    assert!(
        body.to_ascii_lowercase().contains("retry-after: "),
        "{body}"
    );
    assert_eq!(server.requests().len(), 2, "each key tried once");
    // Both keys now rest: the next request does not reach the upstream.
    let (status, _) = raw_post(&route, "chat/completions", Some(&bearer));
    assert_eq!(status, 429);
    assert_eq!(server.requests().len(), 2);
    let (status, body) = raw_post(
        &gw.http_url("/internal/model/nope"),
        "chat/completions",
        Some(&bearer),
    );
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("MODEL_PROVIDER_UNKNOWN") && body.contains("openai"),
        "{body}"
    );
}

/// The credential of one of `gw`'s warm runners (as only a runner has it).
fn runner_credential(gw: &Gateway) -> String {
    sandbox_processes()
        .iter()
        .find_map(|(_, env, cmd)| {
            // This gateway's runner (other tests run theirs in parallel).
            (cmd.contains(" runner") && env.contains(&format!("127.0.0.1:{}", gw.port)))
                .then_some(())?;
            env.split(' ')
                .find_map(|kv| kv.strip_prefix("AISHELL_TASK_CREDENTIAL="))
                .map(str::to_string)
        })
        .expect("a warm runner's credential")
}

/// An upstream that refuses connections is a 502 naming the provider, and
/// no key is rested for it.
#[tokio::test]
async fn an_unreachable_upstream_is_a_clear_bad_gateway() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = Gateway::start_with_env(
        &["--agent", "llm", "--warm-pool-target-size", "1"],
        &[
            (
                "AISHELL_LLM_BASE_URL",
                &format!("http://127.0.0.1:{closed}/v1"),
            ),
            ("AISHELL_LLM_MODEL", "test-model"),
            ("AISHELL_LLM_API_KEYS", KEY_A),
        ],
    );
    gw.wait_pool_ready(1, WAIT).await;
    let bearer = format!("Bearer {}", runner_credential(&gw));
    let route = gw.http_url("/internal/model/openai");
    for _ in 0..2 {
        let (status, body) = raw_post(&route, "chat/completions", Some(&bearer));
        assert_eq!(status, 502, "{body}");
        assert!(
            body.contains("MODEL_UPSTREAM_UNREACHABLE") && body.contains("openai"),
            "{body}"
        );
    }
}
