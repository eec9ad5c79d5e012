//! `--source cloudwatch` against a local `moto` server (PyPI `moto[server]`,
//! a stand-in for CloudWatch Logs on 127.0.0.1): the report read from a log
//! group equals the report read from the same lines in a file.
#![cfg(feature = "cloudwatch")]

use std::io::Cursor;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aishell_report::cloudwatch::{fetch_lines, http_client};
use aishell_report::{Days, ReportArgs, build};
use aws_sdk_cloudwatchlogs::Client;
use aws_sdk_cloudwatchlogs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_cloudwatchlogs::types::InputLogEvent;
use serde_json::json;

struct Moto(Child, u16);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto() -> Option<Moto> {
    if std::env::var("AISHELL_SKIP_MOTO_TESTS").is_ok_and(|v| v == "1") {
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server is not installed: pip install 'moto[server]' (or set AISHELL_SKIP_MOTO_TESTS=1)");
    let moto = Moto(child, port);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(moto)
}

fn client(port: u16) -> Client {
    let config = aws_sdk_cloudwatchlogs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .http_client(http_client())
        .build();
    Client::from_conf(config)
}

fn args(date: &str) -> ReportArgs {
    ReportArgs {
        files: vec![],
        date: Some(date.into()),
        range: None,
        compare: None,
        env: None,
        source: "cloudwatch".into(),
        log_group: Some("aishell".into()),
        format: "json".into(),
        thresholds: None,
        p99_start_ms: None,
        failure_increase_pct: None,
        warm_hit_drop_pct: None,
    }
}

/// Yesterday and today (up to a minute ago): starts, failures, messages.
fn events() -> Vec<(i64, String)> {
    let now = time::OffsetDateTime::now_utc();
    let start = (now
        .date()
        .previous_day()
        .unwrap()
        .midnight()
        .assume_utc()
        .unix_timestamp())
        * 1000;
    let end = (now.unix_timestamp() - 60) * 1000;
    let step = (end - start) / 1500;
    let fmt = time::format_description::well_known::Rfc3339;
    (0..1500i64)
        .map(|i| {
            let at = start + i * step;
            let ts = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
                .unwrap()
                .format(&fmt)
                .unwrap();
            let fields = match i % 5 {
                0 => json!({"event": "task_start_failed", "code": "TASK_START_FAILED"}),
                1 => json!({"event": "task_lifecycle", "phase": "message_roundtrip", "duration_ms": i % 300}),
                2 => json!({"event": "task_lifecycle", "phase": "task_ready", "source": "warm", "duration_ms": 5 + i % 40, "userId": "w", "sessionId": format!("s{i}")}),
                _ => json!({"event": "task_lifecycle", "phase": "task_ready", "source": "cold", "duration_ms": 100 + i, "userId": format!("u{}", i % 9), "sessionId": format!("s{i}"), "breakdown": {"launch": i % 50, "connect": 3}}),
            };
            let mut line = json!({"timestamp": ts, "level": "info", "service": "aishell-gateway"});
            line.as_object_mut()
                .unwrap()
                .extend(fields.as_object().unwrap().clone());
            (at, line.to_string())
        })
        .collect()
}

#[tokio::test]
async fn the_report_from_cloudwatch_equals_the_report_from_the_same_file() {
    let Some(moto) = moto() else { return };
    let cw = client(moto.1);
    cw.create_log_group()
        .log_group_name("aishell")
        .send()
        .await
        .unwrap();
    cw.create_log_stream()
        .log_group_name("aishell")
        .log_stream_name("gateway-1")
        .send()
        .await
        .unwrap();
    let events = events();
    for chunk in events.chunks(500) {
        cw.put_log_events()
            .log_group_name("aishell")
            .log_stream_name("gateway-1")
            .set_log_events(Some(
                chunk
                    .iter()
                    .map(|(at, m)| {
                        InputLogEvent::builder()
                            .timestamp(*at)
                            .message(m)
                            .build()
                            .unwrap()
                    })
                    .collect(),
            ))
            .send()
            .await
            .unwrap();
    }
    let today = time::OffsetDateTime::now_utc().date().to_string();
    let a = args(&today);
    let lines = fetch_lines(&cw, "aishell", Days::from_args(&a).unwrap().window_ms())
        .await
        .unwrap();
    let from_cloudwatch = build(&a, &mut Cursor::new(lines)).unwrap();
    let file: String = events.iter().map(|(_, m)| format!("{m}\n")).collect();
    let from_file = build(&a, &mut Cursor::new(file)).unwrap();
    assert_eq!(from_cloudwatch["days"], from_file["days"]);
    assert_eq!(from_cloudwatch["compare"], from_file["compare"]);
    assert_eq!(from_cloudwatch["lines"]["used"], 1500);
    let total = from_file["days"][0]["task_starts"].as_u64().unwrap()
        + from_file["compare"]["task_starts"].as_u64().unwrap();
    assert_eq!(total, 1500 / 5 * 4, "every start and failure was read back");
}

#[tokio::test]
async fn a_missing_log_group_or_an_unreachable_endpoint_is_a_clear_error() {
    let Some(moto) = moto() else { return };
    let a = args("2026-11-02");
    let window = Days::from_args(&a).unwrap().window_ms();
    let err = fetch_lines(&client(moto.1), "no-such-group", window)
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("cannot read CloudWatch Logs group no-such-group")
            && text.contains("ResourceNotFound"),
        "{text}"
    );
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let err = fetch_lines(&client(closed), "aishell", window)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("cannot read CloudWatch Logs group aishell"));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}
