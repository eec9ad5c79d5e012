//! `aishell report`: reads the gateway's JSON log lines (files
//! or stdin) and prints, per UTC day, sessions, start latency (warm/cold,
//! per-step breakdown), errors by code, disconnects, first-event latency and
//! anomalies against a comparison day.
//!
//! JSON output (`--format json`), stable field names:
//! `{ "date", "compare_date", "lines": {"read","used","skipped"}, "days": [Day],
//!    "anomalies": [{"kind","message"}] }` where Day is
//! `{ "date", "sessions_created", "task_starts", "restarts", "restarts_ok",
//!    "has_data", "connected_ok_pct", "connect_failures", "unique_users", "idle_timeouts",
//!    "start_ms": Lat, "start_warm_ms": Lat, "start_cold_ms": Lat,
//!    "starts_over_10s", "starts_over_30s", "breakdown_ms": {step: Lat},
//!    "errors": {code: n} (codes sent to clients: `client_error` lines, as the
//!    dashboard counts them), "disconnects": {processing_state: n},
//!    "first_event_ms": Lat, "user_messages", "warm_hits", "warm_misses",
//!    "warm_hit_pct", "slowest_starts": [{"sessionId","userId","duration_ms","source"}],
//!    "starts_per_hour": [24 counts, UTC], "start_distribution": {"edges_ms": [upper
//!    bounds], "warm": [n per bucket], "cold": [n per bucket]} (one bucket more than
//!    edges: the last is "above") }`
//! and Lat is `{ "n", "p50", "p90", "p99", "max" }` (milliseconds; percentiles
//! from an HDR histogram, 3 significant digits).

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::PathBuf;

#[cfg(feature = "cloudwatch")]
pub mod cloudwatch;
pub mod html;

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// Log files or directories of them (JSON lines); `-` reads stdin
    /// [default: the logs in the data directory `serve` uses].
    pub files: Vec<PathBuf>,
    /// Day to report, YYYY-MM-DD (UTC) [default: today].
    #[arg(long)]
    pub date: Option<String>,
    /// Report this many days ending at --date, e.g. 7d.
    #[arg(long)]
    pub range: Option<String>,
    /// Day to compare with [default: the day before].
    #[arg(long)]
    pub compare: Option<String>,
    /// Where the log lines come from: `file` (files, directories or stdin)
    /// or `cloudwatch` (a CloudWatch Logs group; needs a build with the
    /// `cloudwatch` feature and AWS credentials from the usual chain).
    #[arg(long, default_value = "file")]
    pub source: String,
    /// CloudWatch Logs group holding the gateway's logs (`--source cloudwatch`).
    #[arg(long)]
    pub log_group: Option<String>,
    /// Only lines whose `env` field has this value.
    #[arg(long)]
    pub env: Option<String>,
    /// md, json or html (one self-contained file with charts).
    #[arg(long, default_value = "md")]
    pub format: String,
    /// TOML file with anomaly thresholds (`p99_start_ms`,
    /// `failure_increase_pct`, `warm_hit_drop_pct`); flags win.
    #[arg(long)]
    pub thresholds: Option<PathBuf>,
    /// Flag a P99 start latency above this (ms) [default: 10000].
    #[arg(long)]
    pub p99_start_ms: Option<u64>,
    /// Flag failures rising by more than this percentage [default: 50].
    #[arg(long)]
    pub failure_increase_pct: Option<f64>,
    /// Flag a warm hit rate falling by more than this many points [default: 20].
    #[arg(long)]
    pub warm_hit_drop_pct: Option<f64>,
}

/// When a day is flagged as an anomaly.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    pub p99_start_ms: u64,
    pub failure_increase_pct: f64,
    pub warm_hit_drop_pct: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            p99_start_ms: 10_000,
            failure_increase_pct: 50.0,
            warm_hit_drop_pct: 20.0,
        }
    }
}

impl ReportArgs {
    /// Defaults, then the `--thresholds` file, then flags.
    pub fn thresholds(&self) -> anyhow::Result<Thresholds> {
        let mut t = match &self.thresholds {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read thresholds file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("invalid thresholds file {}", path.display()))?
            }
            None => Thresholds::default(),
        };
        if let Some(v) = self.p99_start_ms {
            t.p99_start_ms = v;
        }
        if let Some(v) = self.failure_increase_pct {
            t.failure_increase_pct = v;
        }
        if let Some(v) = self.warm_hit_drop_pct {
            t.warm_hit_drop_pct = v;
        }
        Ok(t)
    }
}

/// The fields of a log line the report reads.
#[derive(Deserialize, Default)]
struct Line {
    timestamp: Option<String>,
    service: Option<String>,
    event: Option<String>,
    phase: Option<String>,
    duration_ms: Option<f64>,
    source: Option<String>,
    #[serde(rename = "userId")]
    user_id: Option<String>,
    #[serde(rename = "sessionId")]
    session_id: Option<String>,
    #[serde(rename = "processingState")]
    processing_state: Option<String>,
    code: Option<String>,
    success: Option<bool>,
    action: Option<String>,
    env: Option<String>,
    breakdown: Option<BTreeMap<String, f64>>,
}

struct Lat(Histogram<u64>);

impl Lat {
    fn new() -> Self {
        Lat(Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds"))
    }
    fn record(&mut self, ms: f64) {
        let _ = self.0.record((ms.round() as u64).clamp(1, 3_600_000));
    }
    fn json(&self) -> Value {
        let h = &self.0;
        if h.is_empty() {
            return json!({ "n": 0 });
        }
        json!({ "n": h.len(), "p50": h.value_at_quantile(0.50), "p90": h.value_at_quantile(0.90), "p99": h.value_at_quantile(0.99), "max": h.max() })
    }
}

#[derive(Default)]
struct Day {
    sessions_created: u64,
    ready: u64,
    start_failed: u64,
    restarts: u64,
    restarts_ok: u64,
    users: BTreeSet<String>,
    idle_timeouts: u64,
    start: Option<Lat>,
    start_warm: Option<Lat>,
    start_cold: Option<Lat>,
    over_10s: u64,
    over_30s: u64,
    breakdown: BTreeMap<String, Lat>,
    /// Error codes sent, from `client_error` lines (what the dashboard counts).
    errors: BTreeMap<String, u64>,
    /// The same derived from start failures and lost tasks, for logs of
    /// gateways that wrote no `client_error` lines.
    derived_errors: BTreeMap<String, u64>,
    disconnects: BTreeMap<String, u64>,
    first_event: Option<Lat>,
    warm_hits: u64,
    warm_misses: u64,
    slowest: Vec<(f64, String, String, String)>,
    /// Task starts (ready or failed) by UTC hour.
    starts_per_hour: [u64; 24],
    /// Starts per [`DISTRIBUTION_EDGES_MS`] bucket: (warm, cold).
    distribution: [(u64, u64); DISTRIBUTION_EDGES_MS.len() + 1],
}

/// Upper bounds (ms) of the start-latency distribution's buckets; one more
/// bucket holds everything above the last.
pub const DISTRIBUTION_EDGES_MS: [f64; 11] = [
    10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 30_000.0,
];

fn lat(slot: &mut Option<Lat>) -> &mut Lat {
    slot.get_or_insert_with(Lat::new)
}

impl Day {
    fn count_start(&mut self, l: &Line) {
        if let Some(h) = l
            .timestamp
            .as_deref()
            .and_then(|t| t.get(11..13))
            .and_then(|h| h.parse::<usize>().ok())
            .filter(|h| *h < 24)
        {
            self.starts_per_hour[h] += 1;
        }
    }

    fn add(&mut self, l: &Line) {
        if let Some(u) = &l.user_id {
            self.users.insert(u.clone());
        }
        let ms = l.duration_ms.unwrap_or(0.0);
        match (l.event.as_deref(), l.phase.as_deref()) {
            (Some("task_lifecycle"), Some("session_create")) => self.sessions_created += 1,
            (Some("task_lifecycle"), Some("task_ready")) => {
                self.ready += 1;
                self.count_start(l);
                let bucket = DISTRIBUTION_EDGES_MS
                    .iter()
                    .position(|edge| ms <= *edge)
                    .unwrap_or(DISTRIBUTION_EDGES_MS.len());
                match l.source.as_deref() {
                    Some("warm") => self.distribution[bucket].0 += 1,
                    _ => self.distribution[bucket].1 += 1,
                }
                lat(&mut self.start).record(ms);
                match l.source.as_deref() {
                    Some("warm") => lat(&mut self.start_warm).record(ms),
                    _ => lat(&mut self.start_cold).record(ms),
                }
                self.over_10s += u64::from(ms > 10_000.0);
                self.over_30s += u64::from(ms > 30_000.0);
                for (step, v) in l.breakdown.iter().flatten() {
                    self.breakdown
                        .entry(step.clone())
                        .or_insert_with(Lat::new)
                        .record(*v);
                }
                self.slowest.push((
                    ms,
                    l.session_id.clone().unwrap_or_default(),
                    l.user_id.clone().unwrap_or_default(),
                    l.source.clone().unwrap_or_default(),
                ));
                self.slowest.sort_by(|a, b| b.0.total_cmp(&a.0));
                self.slowest.truncate(10);
            }
            (Some("task_lifecycle"), Some("task_restart")) => {
                self.restarts += 1;
                self.restarts_ok += u64::from(l.success == Some(true));
            }
            (Some("task_lifecycle"), Some("idle_timeout")) => self.idle_timeouts += 1,
            (Some("task_lifecycle"), Some("ws_disconnect")) => {
                *self
                    .disconnects
                    .entry(
                        l.processing_state
                            .clone()
                            .unwrap_or_else(|| "unknown".into()),
                    )
                    .or_default() += 1;
            }
            (Some("task_lifecycle"), Some("message_roundtrip")) => {
                lat(&mut self.first_event).record(ms)
            }
            (Some("task_lifecycle"), Some("warm_pool")) => match l.action.as_deref() {
                Some("claim_hit") => self.warm_hits += 1,
                Some("claim_miss") => self.warm_misses += 1,
                _ => {}
            },
            (Some("client_error"), _) => {
                *self
                    .errors
                    .entry(l.code.clone().unwrap_or_else(|| "UNKNOWN".into()))
                    .or_default() += 1;
            }
            (Some("task_start_failed"), _) => {
                self.start_failed += 1;
                self.count_start(l);
                *self
                    .derived_errors
                    .entry(l.code.clone().unwrap_or_else(|| "TASK_START_FAILED".into()))
                    .or_default() += 1;
            }
            (Some("task_lost"), _) => {
                *self
                    .derived_errors
                    .entry("AGENT_CRASHED".into())
                    .or_default() += 1
            }
            _ => {}
        }
    }

    /// Errors by code: as sent (`client_error`), else as derived.
    fn errors(&self) -> &BTreeMap<String, u64> {
        if self.errors.is_empty() {
            &self.derived_errors
        } else {
            &self.errors
        }
    }

    /// Whether the day has any line the report counts.
    fn has_data(&self) -> bool {
        self.sessions_created > 0
            || self.ready + self.start_failed > 0
            || !self.errors().is_empty()
            || self.first_event.is_some()
            || self.warm_hits + self.warm_misses > 0
            || !self.disconnects.is_empty()
    }

    fn connected_ok_pct(&self) -> Option<f64> {
        let starts = self.ready + self.start_failed;
        (starts > 0).then(|| round1(100.0 * self.ready as f64 / starts as f64))
    }

    fn warm_hit_pct(&self) -> Option<f64> {
        let claims = self.warm_hits + self.warm_misses;
        (claims > 0).then(|| round1(100.0 * self.warm_hits as f64 / claims as f64))
    }

    fn json(&self, date: &str) -> Value {
        let l = |o: &Option<Lat>| o.as_ref().map_or(json!({"n": 0}), Lat::json);
        json!({
            "date": date,
            "sessions_created": self.sessions_created,
            "task_starts": self.ready + self.start_failed,
            "restarts": self.restarts,
            "restarts_ok": self.restarts_ok,
            "connected_ok_pct": self.connected_ok_pct(),
            "connect_failures": self.start_failed,
            "unique_users": self.users.len(),
            "idle_timeouts": self.idle_timeouts,
            "start_ms": l(&self.start),
            "start_warm_ms": l(&self.start_warm),
            "start_cold_ms": l(&self.start_cold),
            "starts_over_10s": self.over_10s,
            "starts_over_30s": self.over_30s,
            "breakdown_ms": self.breakdown.iter().map(|(k, v)| (k.clone(), v.json())).collect::<serde_json::Map<_, _>>(),
            "has_data": self.has_data(),
            "errors": self.errors(),
            "disconnects": self.disconnects,
            "first_event_ms": l(&self.first_event),
            "user_messages": self.first_event.as_ref().map_or(0, |h| h.0.len()),
            "warm_hits": self.warm_hits,
            "warm_misses": self.warm_misses,
            "warm_hit_pct": self.warm_hit_pct(),
            "starts_per_hour": self.starts_per_hour,
            "start_distribution": {
                "edges_ms": DISTRIBUTION_EDGES_MS,
                "warm": self.distribution.iter().map(|d| d.0).collect::<Vec<_>>(),
                "cold": self.distribution.iter().map(|d| d.1).collect::<Vec<_>>(),
            },
            "slowest_starts": self.slowest.iter().map(|(ms, s, u, src)| json!({"sessionId": s, "userId": u, "duration_ms": ms, "source": src})).collect::<Vec<_>>(),
        })
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The UTC days a report covers: the report day(s) and the compare day.
pub struct Days {
    /// Oldest first; the last is the report date.
    pub wanted: Vec<time::Date>,
    pub compare: time::Date,
}

impl Days {
    pub fn from_args(args: &ReportArgs) -> anyhow::Result<Self> {
        let fmt = time::macros::format_description!("[year]-[month]-[day]");
        let date = match &args.date {
            Some(d) => time::Date::parse(d, &fmt)
                .with_context(|| format!("--date {d}: expected YYYY-MM-DD"))?,
            None => time::OffsetDateTime::now_utc().date(),
        };
        let range_days: i64 = match &args.range {
            Some(r) => r
                .trim_end_matches('d')
                .parse()
                .with_context(|| format!("--range {r}: expected e.g. 7d"))?,
            None => 1,
        };
        let compare = match &args.compare {
            Some(d) => time::Date::parse(d, &fmt)
                .with_context(|| format!("--compare {d}: expected YYYY-MM-DD"))?,
            None => date.previous_day().unwrap_or(date),
        };
        let wanted = (0..range_days.clamp(1, 366))
            .rev()
            .map(|i| date - time::Duration::days(i))
            .collect();
        Ok(Days { wanted, compare })
    }

    /// Unix milliseconds from the start of the first day covered to the end
    /// of the last (exclusive).
    pub fn window_ms(&self) -> (i64, i64) {
        let first = self.wanted[0].min(self.compare);
        let last = self.wanted[self.wanted.len() - 1].max(self.compare);
        let ms =
            |d: time::Date| (d.midnight().assume_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        (ms(first), ms(last.next_day().unwrap_or(last)))
    }
}

/// Build the report document (the JSON form; markdown is rendered from it).
pub fn build(args: &ReportArgs, input: &mut dyn BufRead) -> anyhow::Result<Value> {
    let thresholds = args.thresholds()?;
    let days_plan = Days::from_args(args)?;
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let mut wanted: Vec<String> = days_plan
        .wanted
        .iter()
        .map(|d| d.format(&fmt).unwrap_or_default())
        .collect();
    let compare_s = days_plan.compare.format(&fmt).unwrap_or_default();
    let mut days: BTreeMap<String, Day> = BTreeMap::new();
    let (mut read, mut used, mut skipped) = (0u64, 0u64, 0u64);
    let mut buf = String::new();
    loop {
        buf.clear();
        if input.read_line(&mut buf)? == 0 {
            break;
        }
        read += 1;
        let Ok(line) = serde_json::from_str::<Line>(buf.trim_end()) else {
            skipped += 1;
            continue;
        };
        let ours = line
            .service
            .as_deref()
            .is_some_and(|s| s.starts_with("aishell"));
        let Some(day) = line
            .timestamp
            .as_deref()
            .and_then(|t| t.get(..10))
            .filter(|_| ours)
        else {
            skipped += 1;
            continue;
        };
        if args
            .env
            .as_deref()
            .is_some_and(|e| line.env.as_deref() != Some(e))
        {
            continue;
        }
        if day == compare_s || wanted.iter().any(|w| w == day) {
            used += 1;
            days.entry(day.to_string()).or_default().add(&line);
        }
    }
    let empty = Day::default();
    let main = wanted.last().cloned().unwrap_or_default();
    let cur = days.get(&main).unwrap_or(&empty);
    let prev = days.get(&compare_s).unwrap_or(&empty);
    let mut anomalies = Vec::new();
    if let Some(p99) = cur
        .start
        .as_ref()
        .filter(|h| !h.0.is_empty())
        .map(|h| h.0.value_at_quantile(0.99))
        .filter(|p99| *p99 > thresholds.p99_start_ms)
    {
        anomalies.push(json!({"kind": "p99_start", "message": format!("P99 start latency {p99} ms is over {} ms", thresholds.p99_start_ms)}));
    }
    let crashed = |d: &Day| d.errors().get("AGENT_CRASHED").copied().unwrap_or(0);
    let (f_now, f_before) = (
        cur.start_failed + crashed(cur),
        prev.start_failed + crashed(prev),
    );
    // A compare day without data is no baseline to rise or fall from.
    if f_now > 0
        && prev.has_data()
        && (f_before == 0
            || (f_now as f64) > f_before as f64 * (1.0 + thresholds.failure_increase_pct / 100.0))
    {
        anomalies.push(json!({"kind": "failures_up", "message": format!("failures rose from {f_before} to {f_now}")}));
    }
    if let (Some(now), Some(before)) = (cur.warm_hit_pct(), prev.warm_hit_pct())
        && prev.has_data()
        && before - now > thresholds.warm_hit_drop_pct
    {
        anomalies.push(json!({"kind": "warm_hit_down", "message": format!("warm hit rate fell from {before}% to {now}%")}));
    }
    wanted.dedup();
    Ok(json!({
        "date": main,
        "compare_date": compare_s,
        "lines": {"read": read, "used": used, "skipped": skipped},
        "days": wanted.iter().map(|d| days.get(d).unwrap_or(&empty).json(d)).collect::<Vec<_>>(),
        "compare": prev.json(&compare_s),
        "anomalies": anomalies,
        "thresholds": {
            "p99_start_ms": thresholds.p99_start_ms,
            "failure_increase_pct": thresholds.failure_increase_pct,
            "warm_hit_drop_pct": thresholds.warm_hit_drop_pct,
        },
    }))
}

/// The "Sessions" table of every format: (label, field of a day).
pub(crate) const SESSION_ROWS: &[(&str, &str)] = &[
    ("sessions created", "sessions_created"),
    ("task starts", "task_starts"),
    ("of which restarts", "restarts"),
    ("restarts OK", "restarts_ok"),
    ("connected OK %", "connected_ok_pct"),
    ("connect failures", "connect_failures"),
    ("unique users", "unique_users"),
    ("idle timeouts", "idle_timeouts"),
    ("warm hit %", "warm_hit_pct"),
    ("user messages", "user_messages"),
];

/// The "Latency" table of every format: (label, distribution of a day).
pub(crate) fn latency_rows(day: &Value) -> Vec<(String, &Value)> {
    let mut rows = vec![
        ("start (all)".to_string(), &day["start_ms"]),
        ("start (warm)".to_string(), &day["start_warm_ms"]),
        ("start (cold)".to_string(), &day["start_cold_ms"]),
    ];
    for (step, v) in day["breakdown_ms"].as_object().into_iter().flatten() {
        rows.push((format!("· step {step}"), v));
    }
    rows.push(("first event".to_string(), &day["first_event_ms"]));
    rows
}

/// Markdown rendering of [`build`]'s document.
pub fn markdown(r: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let day = r["days"]
        .as_array()
        .and_then(|d| d.last())
        .cloned()
        .unwrap_or(Value::Null);
    let _ = writeln!(
        out,
        "# aishell daily report — {} (compared with {})\n",
        r["date"].as_str().unwrap_or(""),
        r["compare_date"].as_str().unwrap_or("")
    );
    if day["has_data"] != true {
        let _ = writeln!(
            out,
            "No data for {}: no aishell log lines of that day. ({} lines read, {} skipped)\n",
            r["date"].as_str().unwrap_or(""),
            r["lines"]["read"],
            r["lines"]["skipped"]
        );
    }
    if let Some(note) = compare_note(r) {
        let _ = writeln!(out, "{note}\n");
    }
    let anomalies = r["anomalies"].as_array().cloned().unwrap_or_default();
    if !anomalies.is_empty() {
        let _ = writeln!(out, "## ⚠ Anomalies\n");
        for a in &anomalies {
            let _ = writeln!(
                out,
                "- ⚠ **{}**: {}",
                a["kind"].as_str().unwrap_or(""),
                a["message"].as_str().unwrap_or("")
            );
        }
        out.push('\n');
    }
    let prev = &r["compare"];
    let row = |out: &mut String, name: &str, key: &str| {
        let _ = writeln!(
            out,
            "| {name} | {} | {} |",
            show(&day[key]),
            compare_cell(prev, key)
        );
    };
    let _ = writeln!(out, "## Sessions\n\n| | today | compare |\n|---|---|---|");
    for (name, key) in SESSION_ROWS {
        row(&mut out, name, key);
    }
    let _ = writeln!(
        out,
        "\n## Latency (ms)\n\n| | n | P50 | P90 | P99 | max |\n|---|---|---|---|---|---|"
    );
    let lat_row = |out: &mut String, name: &str, v: &Value| {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} |",
            show(&v["n"]),
            show(&v["p50"]),
            show(&v["p90"]),
            show(&v["p99"]),
            show(&v["max"])
        );
    };
    for (name, v) in latency_rows(&day) {
        lat_row(&mut out, &name, v);
    }
    let _ = writeln!(
        out,
        "\nStarts over 10 s: {}, over 30 s: {}",
        show(&day["starts_over_10s"]),
        show(&day["starts_over_30s"])
    );
    let _ = writeln!(out, "\n## Errors by code\n");
    for (code, n) in day["errors"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "- {code}: {n}");
    }
    let _ = writeln!(out, "\n## Disconnects by processing state\n");
    for (state, n) in day["disconnects"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "- {state}: {n}");
    }
    let _ = writeln!(
        out,
        "\n## Slowest starts\n\n| ms | source | session | user |\n|---|---|---|---|"
    );
    for s in day["slowest_starts"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            show(&s["duration_ms"]),
            s["source"].as_str().unwrap_or(""),
            s["sessionId"].as_str().unwrap_or(""),
            s["userId"].as_str().unwrap_or("")
        );
    }
    if r["days"].as_array().is_some_and(|d| d.len() > 1) {
        let _ = writeln!(
            out,
            "\n## Per day\n\n| date | starts | OK % | start P50 | start P99 | first event P50 |\n|---|---|---|---|---|---|"
        );
        for d in r["days"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                show(&d["date"]),
                show(&d["task_starts"]),
                show(&d["connected_ok_pct"]),
                show(&d["start_ms"]["p50"]),
                show(&d["start_ms"]["p99"]),
                show(&d["first_event_ms"]["p50"])
            );
        }
    }
    let _ = writeln!(
        out,
        "\n_{} lines read, {} used, {} skipped (not JSON or not aishell's)._",
        r["lines"]["read"], r["lines"]["used"], r["lines"]["skipped"]
    );
    out
}

/// "No data for DATE." when the compare day has no lines (its column is
/// then empty rather than all zeros).
pub(crate) fn compare_note(r: &Value) -> Option<String> {
    (r["compare"]["has_data"] != true).then(|| {
        format!(
            "No data for {} (the compare day): its column is empty.",
            r["compare_date"].as_str().unwrap_or("")
        )
    })
}

/// A compare-day figure, or "–" when that day has no data.
pub(crate) fn compare_cell(prev: &Value, key: &str) -> String {
    if prev["has_data"] == true {
        show(&prev[key])
    } else {
        "–".into()
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The files to read: each argument as is, or for a directory (such as
/// `<data-dir>/logs`) the files in it, oldest name first.
fn log_files(args: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in args {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file())
                .collect();
            inside.sort();
            out.extend(inside);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

pub async fn run(args: ReportArgs) -> anyhow::Result<()> {
    let report = if args.source == "cloudwatch" {
        let lines = cloudwatch_lines(&args).await?;
        build(&args, &mut std::io::Cursor::new(lines))?
    } else if args.source != "file" {
        anyhow::bail!("--source {}: expected file or cloudwatch", args.source);
    } else if args.files.is_empty() || args.files.iter().any(|f| f.as_os_str() == "-") {
        build(&args, &mut std::io::stdin().lock())?
    } else {
        let mut chained: Box<dyn std::io::Read> = Box::new(std::io::empty());
        for f in &log_files(&args.files)? {
            let file =
                std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?;
            chained = Box::new(std::io::Read::chain(chained, file));
        }
        build(
            &args,
            &mut std::io::BufReader::with_capacity(1 << 20, chained),
        )?
    };
    match args.format.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&report)?),
        "md" => print!("{}", markdown(&report)),
        "html" => print!("{}", html::render(&report)),
        other => anyhow::bail!("--format {other}: expected md, json or html"),
    }
    Ok(())
}

#[cfg(feature = "cloudwatch")]
async fn cloudwatch_lines(args: &ReportArgs) -> anyhow::Result<Vec<u8>> {
    let group = args
        .log_group
        .as_deref()
        .context("--source cloudwatch needs --log-group")?;
    let client = cloudwatch::client_from_environment().await;
    cloudwatch::fetch_lines(&client, group, Days::from_args(args)?.window_ms()).await
}

#[cfg(not(feature = "cloudwatch"))]
async fn cloudwatch_lines(_args: &ReportArgs) -> anyhow::Result<Vec<u8>> {
    anyhow::bail!(
        "this aishell was built without CloudWatch support; rebuild with `cargo build --release --features cloudwatch`"
    )
}
