//! The report's numbers match a generated fixture with known distributions.

use std::io::Cursor;

use aishell_report::{ReportArgs, build, html, markdown};
use serde_json::{Value, json};

fn args(date: &str) -> ReportArgs {
    ReportArgs {
        files: vec![],
        date: Some(date.into()),
        range: None,
        compare: None,
        env: None,
        source: "file".into(),
        log_group: None,
        format: "json".into(),
        thresholds: None,
        p99_start_ms: None,
        failure_increase_pct: None,
        warm_hit_drop_pct: None,
    }
}

fn line(day: &str, sec: u32, fields: Value) -> String {
    let mut v = json!({"timestamp": format!("{day}T10:{:02}:{:02}.000Z", (sec / 60) % 60, sec % 60), "level": "info", "service": "aishell-gateway", "module": "x"});
    v.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    v.to_string()
}

/// Day 1: 1000 cold starts at 100..=1099 ms, 200 warm at 10..=29 ms, 5 failures,
/// 300 round-trips at 1..=300 ms. Day 2 is worse: slow cold starts and 20 failures.
fn fixture() -> String {
    let mut out = Vec::new();
    for (day, slow, failures) in [("2026-11-01", 0.0, 5), ("2026-11-02", 20_000.0, 20)] {
        for i in 0..1000u32 {
            let ms = 100.0 + f64::from(i) + if i >= 980 { slow } else { 0.0 };
            out.push(line(day, i, json!({"event": "task_lifecycle", "phase": "task_ready", "source": "cold", "duration_ms": ms, "userId": format!("u{}", i % 7), "sessionId": format!("s{i}"), "breakdown": {"launch": 1, "connect": 3}})));
            out.push(line(
                day,
                i,
                json!({"event": "task_lifecycle", "phase": "session_create", "duration_ms": ms}),
            ));
        }
        for i in 0..200u32 {
            out.push(line(day, i, json!({"event": "task_lifecycle", "phase": "task_ready", "source": "warm", "duration_ms": 10 + i % 20, "userId": "w"})));
            out.push(line(day, i, json!({"event": "task_lifecycle", "phase": "warm_pool", "action": if day == "2026-11-01" || i < 50 { "claim_hit" } else { "claim_miss" }})));
        }
        for i in 0..failures {
            out.push(line(day, i, json!({"event": "task_start_failed", "code": if i % 2 == 0 { "TASK_START_FAILED" } else { "TASK_CONNECT_TIMEOUT" }, "duration_ms": 30000})));
        }
        for i in 1..=300u32 {
            out.push(line(
                day,
                i,
                json!({"event": "task_lifecycle", "phase": "message_roundtrip", "duration_ms": i}),
            ));
        }
        for (state, n) in [("idle", 40), ("processing", 3)] {
            for i in 0..n {
                out.push(line(day, i, json!({"event": "task_lifecycle", "phase": "ws_disconnect", "processingState": state})));
            }
        }
        out.push(line(
            day,
            1,
            json!({"event": "task_lifecycle", "phase": "task_restart", "success": true}),
        ));
        out.push(line(
            day,
            2,
            json!({"event": "task_lifecycle", "phase": "idle_timeout"}),
        ));
    }
    out.push("not json at all".into());
    out.push("{\"truncated\": ".into());
    out.push(json!({"service": "something-else", "timestamp": "2026-11-02T00:00:00Z", "event": "task_lifecycle", "phase": "task_ready"}).to_string());
    out.join("\n") + "\n"
}

fn within(v: &Value, expected: f64) -> bool {
    (v.as_f64().unwrap() - expected).abs() <= expected * 0.002 + 1.0
}

#[test]
fn counts_percentiles_and_anomalies_match_the_generated_days() {
    let r = build(&args("2026-11-02"), &mut Cursor::new(fixture())).unwrap();
    assert_eq!(
        r["lines"]["skipped"], 3,
        "garbage, truncated and foreign lines are skipped and counted"
    );
    let prev = &r["compare"];
    assert_eq!(prev["task_starts"], 1205);
    assert_eq!(prev["sessions_created"], 1000);
    assert_eq!(prev["connect_failures"], 5);
    assert_eq!(prev["restarts"], 1);
    assert_eq!(prev["idle_timeouts"], 1);
    assert_eq!(prev["unique_users"], 8);
    assert_eq!(prev["start_cold_ms"]["n"], 1000);
    assert!(
        within(&prev["start_cold_ms"]["p50"], 599.0),
        "{}",
        prev["start_cold_ms"]
    );
    assert!(
        within(&prev["start_cold_ms"]["p90"], 999.0),
        "{}",
        prev["start_cold_ms"]
    );
    assert!(
        within(&prev["start_cold_ms"]["p99"], 1089.0),
        "{}",
        prev["start_cold_ms"]
    );
    assert!(within(&prev["start_warm_ms"]["max"], 29.0));
    assert!(within(&prev["first_event_ms"]["p50"], 150.0));
    assert_eq!(prev["user_messages"], 300);
    assert_eq!(prev["disconnects"]["idle"], 40);
    assert_eq!(prev["disconnects"]["processing"], 3);
    assert_eq!(prev["errors"]["TASK_CONNECT_TIMEOUT"], 2);
    assert_eq!(prev["breakdown_ms"]["connect"]["p50"], 3);
    assert_eq!(prev["warm_hit_pct"], 100.0);
    let day = &r["days"][0];
    assert_eq!(day["starts_over_10s"], 20);
    assert_eq!(day["connect_failures"], 20);
    assert!(day["start_ms"]["max"].as_f64().unwrap() > 20_000.0);
    assert_eq!(day["slowest_starts"][0]["sessionId"], "s999");
    let kinds: Vec<&str> = r["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["p99_start", "failures_up", "warm_hit_down"]);
    // The good day has no anomalies against nothing before it.
    let calm = build(&args("2026-11-01"), &mut Cursor::new(fixture())).unwrap();
    assert!(
        calm["anomalies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["kind"] == "failures_up")
    );
    let md = markdown(&r);
    assert!(
        md.contains("⚠ **p99_start**") && md.contains("| task starts | 1220 | 1205 |"),
        "{md}"
    );
}

#[test]
fn a_range_gives_one_row_per_day_and_empty_input_is_a_clear_result() {
    let mut a = args("2026-11-02");
    a.range = Some("2d".into());
    let r = build(&a, &mut Cursor::new(fixture())).unwrap();
    let days: Vec<&str> = r["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["date"].as_str().unwrap())
        .collect();
    assert_eq!(days, ["2026-11-01", "2026-11-02"]);
    assert!(markdown(&r).contains("## Per day"));
    let empty = build(&args("2026-11-02"), &mut Cursor::new("")).unwrap();
    assert_eq!(empty["days"][0]["task_starts"], 0);
    assert!(markdown(&empty).contains("No data for 2026-11-02"));
    let garbage = build(
        &args("2026-11-02"),
        &mut Cursor::new("\u{0}\u{1}garbage\n{{{{\n"),
    )
    .unwrap();
    assert_eq!(garbage["lines"]["skipped"], 2);
}

#[test]
fn chart_data_per_hour_and_distribution_match_the_fixture() {
    let r = build(&args("2026-11-02"), &mut Cursor::new(fixture())).unwrap();
    let prev = &r["compare"];
    let hours: Vec<u64> = prev["starts_per_hour"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(hours.len(), 24);
    assert_eq!(hours[10], 1205, "every generated start is at 10:xx UTC");
    assert_eq!(hours.iter().sum::<u64>(), 1205);
    let dist = &prev["start_distribution"];
    // Cold 100..=1099 ms, warm 10..=29 ms (see `fixture`).
    assert_eq!(
        dist["cold"],
        json!([0, 0, 0, 1, 150, 250, 500, 99, 0, 0, 0, 0])
    );
    assert_eq!(
        dist["warm"],
        json!([10, 150, 40, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    );
    assert_eq!(dist["edges_ms"].as_array().unwrap().len() + 1, 12);
}

#[test]
fn html_is_one_offline_file_with_the_charts_and_tables() {
    let mut a = args("2026-11-02");
    a.range = Some("2d".into());
    let r = build(&a, &mut Cursor::new(fixture())).unwrap();
    let page = html::render(&r);
    assert!(page.starts_with("<!doctype html>") && page.trim_end().ends_with("</html>"));
    // Distribution, per hour, warm vs cold, and the range's trend.
    assert_eq!(page.matches("<svg").count(), 4, "{page}");
    // Day 2's 20 slow cold starts (over 20 s) sit in the "≤30s" bucket.
    assert!(
        page.contains(r#"data-series="cold" data-label="≤30s" data-value="20""#),
        "{page}"
    );
    assert!(page.contains(r#"data-series="starts" data-label="10" data-value="1220""#));
    assert!(page.contains(r#"<div class="banner anomaly">⚠ <b>p99_start</b>"#));
    // The dashboard's stylesheet, inline.
    assert!(page.contains("--panel:") && page.contains(r#"<body class="admin report">"#));
    assert!(page.contains("<th>task starts</th><td>1220</td><td>1205</td>"));
    assert!(page.contains("<h2>Per day</h2>"));
    // Nothing to fetch: no scripts, links, images or stylesheets.
    for needle in ["<script", "src=", "href=", "<link", "@import", "url("] {
        assert!(!page.contains(needle), "{needle} in the page");
    }
    // Text from the logs is escaped.
    let hostile = format!(
        "{}\n",
        json!({"timestamp": "2026-11-02T01:00:00Z", "service": "aishell-gateway", "event": "task_lifecycle", "phase": "task_ready", "source": "cold", "duration_ms": 5, "sessionId": "<script>alert(1)</script>", "userId": "u"})
    );
    let page = html::render(&build(&args("2026-11-02"), &mut Cursor::new(hostile)).unwrap());
    assert!(!page.contains("<script>") && page.contains("&lt;script&gt;"));
}

#[test]
fn thresholds_come_from_a_file_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("thresholds.toml");
    std::fs::write(
        &file,
        "p99_start_ms = 100000\nfailure_increase_pct = 1000.0\n",
    )
    .unwrap();
    let mut a = args("2026-11-02");
    a.thresholds = Some(file.clone());
    let r = build(&a, &mut Cursor::new(fixture())).unwrap();
    let kinds: Vec<&str> = r["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["warm_hit_down"],
        "raised thresholds silence the others"
    );
    assert_eq!(r["thresholds"]["p99_start_ms"], 100000);
    a.p99_start_ms = Some(5_000);
    let r = build(&a, &mut Cursor::new(fixture())).unwrap();
    assert_eq!(r["anomalies"][0]["kind"], "p99_start");
    std::fs::write(&file, "p99_start = 1\n").unwrap();
    let err = build(&a, &mut Cursor::new(fixture())).unwrap_err();
    assert!(
        format!("{err:#}").contains("invalid thresholds file"),
        "{err:#}"
    );
}

#[test]
fn errors_by_code_are_the_codes_sent_and_a_missing_compare_day_says_so() {
    // Today: a forbidden attempt, an unauthorized one and a start failure,
    // each with the `client_error` line the gateway writes when it sends
    // the code (what the dashboard counts).
    let today = [
        line(
            "2026-11-02",
            1,
            json!({"event": "forbidden", "level": "warn", "userId": "bob"}),
        ),
        line(
            "2026-11-02",
            1,
            json!({"event": "client_error", "code": "FORBIDDEN"}),
        ),
        line(
            "2026-11-02",
            2,
            json!({"event": "client_error", "code": "UNAUTHORIZED"}),
        ),
        line(
            "2026-11-02",
            3,
            json!({"event": "task_start_failed", "code": "TASK_START_FAILED", "duration_ms": 5}),
        ),
        line(
            "2026-11-02",
            3,
            json!({"event": "client_error", "code": "TASK_START_FAILED"}),
        ),
    ]
    .join("\n");
    let r = build(&args("2026-11-02"), &mut Cursor::new(today)).unwrap();
    assert_eq!(
        r["days"][0]["errors"],
        json!({"FORBIDDEN": 1, "TASK_START_FAILED": 1, "UNAUTHORIZED": 1})
    );
    let md = markdown(&r);
    assert!(md.contains("- FORBIDDEN: 1"), "{md}");
    // Nothing logged on the compare day: said once, and its column is empty
    // rather than zeros.
    assert_eq!(r["compare"]["has_data"], false);
    assert!(md.contains("No data for 2026-11-01"), "{md}");
    assert!(md.contains("| task starts | 1 | – |"), "{md}");
    assert!(
        r["anomalies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["kind"] != "failures_up"),
        "no rise from a day without data: {}",
        r["anomalies"]
    );
    let page = html::render(&r);
    assert!(page.contains("No data for 2026-11-01"), "{page}");
    assert!(
        page.contains("<th>task starts</th><td>1</td><td>–</td>"),
        "{page}"
    );
}
