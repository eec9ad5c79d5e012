//! A real gateway's logs feed `aishell report` end to end.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;

#[tokio::test]
async fn the_report_counts_what_a_real_gateway_logged() {
    let gw = Gateway::start(&[
        "--agent",
        "echo",
        "--enable-warm-pool",
        "false",
        "--session-idle-timeout",
        "1s",
        "--log-file",
    ]);
    let mut a = gw.connect().await;
    a.message("m1", "one").await;
    a.turn().await;
    let mut b = gw.connect().await;
    b.message("m1", "two").await;
    b.turn().await;
    a.until(
        |v| is_type(v, "status") && v["state"] == "stopped",
        Duration::from_secs(10),
    )
    .await;
    a.message("m2", "three").await;
    a.turn().await;
    drop(b);
    gw.wait_log("restart", |l| l["phase"] == "task_restart", WAIT)
        .await;
    gw.wait_log("disconnect", |l| l["phase"] == "ws_disconnect", WAIT)
        .await;
    let today = gw
        .logs()
        .iter()
        .find_map(|l| l["timestamp"].as_str().map(|t| t[..10].to_string()))
        .unwrap();
    // `--log-file` wrote today's file under the data dir; the report reads
    // the directory.
    let file = gw.data_dir.join("logs");
    let todays = file.join(format!("aishell.{today}.log"));
    let written = std::fs::read_to_string(&todays)
        .unwrap_or_else(|e| panic!("{} not written: {e}", todays.display()));
    assert!(written.contains("\"phase\":\"task_restart\""));
    check_query_templates(&gw.logs());
    let out = std::process::Command::new(BIN)
        .args(["report", "--format", "json", "--date", &today])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let day = &r["days"][0];
    assert_eq!(day["task_starts"], 3, "{day}");
    assert_eq!(day["restarts"], 1);
    assert_eq!(day["restarts_ok"], 1);
    assert_eq!(day["sessions_created"], 2);
    assert_eq!(day["unique_users"], 1);
    assert_eq!(day["user_messages"], 3);
    assert!(day["idle_timeouts"].as_u64().unwrap() >= 1);
    assert_eq!(day["start_cold_ms"]["n"], 3);
    assert_eq!(day["start_warm_ms"]["n"], 0);
    assert_eq!(day["connected_ok_pct"], 100.0);
    assert!(day["disconnects"]["idle"].as_u64().unwrap() >= 1);
    assert!(day["breakdown_ms"]["launch"]["n"].as_u64() == Some(3));
    let md = std::process::Command::new(BIN)
        .args(["report", "--date", &today])
        .arg(&file)
        .output()
        .unwrap();
    let md = String::from_utf8(md.stdout).unwrap();
    assert!(
        md.contains("# aishell daily report") && md.contains("| task starts | 3 |"),
        "{md}"
    );
    let html = std::process::Command::new(BIN)
        .args(["report", "--format", "html", "--date", &today])
        .arg(&file)
        .output()
        .unwrap();
    let html = String::from_utf8(html.stdout).unwrap();
    assert!(
        html.contains("<th>task starts</th><td>3</td>") && html.matches("<svg").count() == 3,
        "{html}"
    );
}

/// Every field a `queries/cloudwatch/*.query` template names is one the
/// gateway emits: seen in this real run's logs, named in a `tracing` call of
/// the gateway's source, or a `breakdown` step it records.
fn check_query_templates(logs: &[serde_json::Value]) {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeSet<String>) {
        if let Some(map) = v.as_object() {
            for (k, v) in map {
                let key = format!("{prefix}{k}");
                flatten(&format!("{key}."), v, out);
                out.insert(key);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut emitted = BTreeSet::new();
    for l in logs {
        flatten("", l, &mut emitted);
    }
    let field = regex::Regex::new(r"([A-Za-z_][A-Za-z0-9_]*) = ").unwrap();
    let step = regex::Regex::new(r#"breakdown\.push\(\("([a-z_]+)""#).unwrap();
    let captures = |re: &regex::Regex, text: &str| -> Vec<String> {
        re.captures_iter(text).map(|c| c[1].to_string()).collect()
    };
    for src in rust_files(&root.join("crates/gateway/src")) {
        let text = std::fs::read_to_string(&src).unwrap();
        for call in text.split("tracing::").skip(1) {
            let call = &call[..call.find(");").unwrap_or(call.len())];
            emitted.extend(captures(&field, call));
        }
        emitted.extend(
            captures(&step, &text)
                .into_iter()
                .map(|s| format!("breakdown.{s}")),
        );
    }
    const LANGUAGE: &[&str] = &[
        "fields",
        "filter",
        "stats",
        "sort",
        "by",
        "as",
        "and",
        "or",
        "not",
        "desc",
        "asc",
        "limit",
        "count",
        "count_distinct",
        "pct",
        "max",
        "min",
        "avg",
        "sum",
        "bin",
        "in",
        "like",
        "display",
    ];
    let dir = root.join("queries/cloudwatch");
    let mut templates: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "query"))
        .collect();
    templates.sort();
    assert!(templates.len() >= 6, "templates: {templates:?}");
    for t in templates {
        let text = std::fs::read_to_string(&t).unwrap();
        assert!(
            text.starts_with("# "),
            "{} must start with a comment saying what it answers",
            t.display()
        );
        let body: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        // Drop string literals, then collect identifiers and `as` aliases.
        let mut bare = String::new();
        for (i, part) in body.split('"').enumerate() {
            if i % 2 == 0 {
                bare.push_str(part);
                bare.push(' ');
            }
        }
        let words: Vec<&str> = bare
            .split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@')))
            .filter(|w| !w.is_empty())
            .collect();
        let aliases: BTreeSet<&str> = words
            .windows(2)
            .filter(|w| w[0] == "as")
            .map(|w| w[1])
            .collect();
        for w in words {
            let is_field = w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
            if !is_field || LANGUAGE.contains(&w) || aliases.contains(w) {
                continue;
            }
            assert!(
                emitted.contains(w),
                "{} uses `{w}`, which the gateway never emits",
                t.display()
            );
        }
    }
}

fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// One `traceId` follows a session through the gateway's lifecycle lines,
/// the runner's own lines and the agent's stderr.
#[tokio::test]
async fn a_trace_id_follows_the_session_to_the_agents_stderr() {
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let mut c = gw.connect().await;
    c.message("m1", "hello").await;
    c.turn().await;
    // A message that kills its agent is retried once in a new sandbox, then
    // answered with AGENT_CRASHED instead of looping; the session goes on.
    c.message("m2", "/crash").await;
    let frames = c.until(|v| is_type(v, "error"), WAIT).await;
    let error = frames.last().unwrap();
    assert_eq!(
        error["error"]["code"],
        "AGENT_CRASHED",
        "{}",
        pretty(&frames)
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tried twice")
    );
    c.message("m3", "still here").await;
    assert!(text_of(&c.turn().await).contains("still here"));
    let stderr = gw
        .wait_log(
            "agent_stderr",
            |l| l["event"] == "agent_stderr" && l["sessionId"] == c.session_id.as_str(),
            WAIT,
        )
        .await;
    let trace = stderr["traceId"].as_str().unwrap_or_default().to_string();
    assert!(trace.len() >= 8, "{stderr}");
    assert!(
        stderr["line"]
            .as_str()
            .unwrap()
            .contains("crashing on request")
    );
    let logs = gw.logs();
    let ready = logs
        .iter()
        .find(|l| l["phase"] == "task_ready" && l["sessionId"] == c.session_id.as_str())
        .expect("task_ready line");
    assert_eq!(ready["traceId"], trace.as_str());
    let runner = logs
        .iter()
        .find(|l| l["service"] == "aishell-runner" && l["event"] == "runner_init_user")
        .expect("the runner's own line");
    assert_eq!(runner["traceId"], trace.as_str());
    assert_eq!(runner["sessionId"], c.session_id.as_str());
}

/// The newcomer's path: `serve` writes its logs without being asked (owner
/// only, in an owner-only data directory); `aishell report` with no argument
/// reads them from that directory, found the way `serve` found it; `token
/// create` elsewhere refuses to invent a second data directory.
#[tokio::test]
async fn report_and_token_find_the_data_directory_serve_used() {
    use std::os::unix::fs::PermissionsExt;
    let gw = Gateway::start(&["--agent", "echo", "--enable-warm-pool", "false"]);
    let mut c = gw.connect().await;
    c.message("m1", "hello").await;
    c.turn().await;
    gw.wait_log(
        "the turn's first event",
        |l| l["phase"] == "message_roundtrip",
        WAIT,
    )
    .await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&gw.data_dir),
        0o711,
        "the data directory holds secrets: others may only pass through to their workspace"
    );
    let logs: Vec<_> = std::fs::read_dir(gw.data_dir.join("logs"))
        .expect("serve writes logs without --log-file")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert_eq!(mode(&logs[0]), 0o600, "log files name users and sessions");
    assert_eq!(mode(&gw.data_dir.join("aishell.db")), 0o600);

    // No file named: the data directory's logs (here from AISHELL_DATA_DIR).
    let out = std::process::Command::new(BIN)
        .args(["report", "--format", "json"])
        .env("AISHELL_DATA_DIR", &gw.data_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&gw.data_dir.display().to_string()) && stderr.contains("AISHELL_DATA_DIR"),
        "says which directory and why: {stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["days"][0]["user_messages"], 1, "{report}");

    // Elsewhere, with nothing pointing at it: a coded refusal, nothing created.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["token", "create", "--user", "bob"])
        .current_dir(elsewhere.path())
        .env_remove("AISHELL_DATA_DIR")
        .env_remove("AISHELL_CONFIG")
        .env("XDG_CONFIG_HOME", elsewhere.path().join("config"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("DATA_DIR_NOT_FOUND") && stderr.contains("--data-dir"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no token printed");
    assert!(!elsewhere.path().join("aishell-data").exists());

    // A config file naming it is enough.
    let config = elsewhere.path().join("config/aishell/aishell.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        format!("data_dir = {:?}\n", gw.data_dir.display().to_string()),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["token", "create", "--user", "bob"])
        .current_dir(elsewhere.path())
        .env_remove("AISHELL_DATA_DIR")
        .env_remove("AISHELL_CONFIG")
        .env("XDG_CONFIG_HOME", elsewhere.path().join("config"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        gw.connect_as(&token, None).await.is_ok(),
        "the running gateway accepts the token"
    );
}
