//! HTML rendering of the report: one self-contained file (inline CSS and
//! SVG, no script, no external request) readable offline. Charts: start
//! latency distribution (warm vs cold), task starts per hour, and start
//! percentiles warm vs cold; then the same tables as the markdown form.

use std::fmt::Write;

use serde_json::Value;

use crate::DISTRIBUTION_EDGES_MS;

/// The dashboard's stylesheet, so the report looks like the page that opens it.
const DASHBOARD_CSS: &str = include_str!("../../gateway/web/style.css");

/// What only the report needs on top of it.
const REPORT_CSS: &str = "body.report{display:block;height:auto}.report h1{font-size:20px;margin:0 0 4px}.report h2{font-size:14px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em;margin:18px 0 6px}.report td{text-align:right}.report figure{margin:12px 0}.report figcaption{font-weight:600}.report svg text{fill:var(--text)}.anomaly{background:color-mix(in srgb,var(--warn) 14%,var(--panel));border:1px solid color-mix(in srgb,var(--warn) 40%,transparent)}";

const WARM: &str = "#2a9d8f";
const COLD: &str = "#e76f51";

/// Escape text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn text(v: &Value) -> String {
    esc(&match v {
        Value::Null => "–".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0)).collect())
        .unwrap_or_default()
}

fn edge_label(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{}s", ms / 1000.0)
    } else {
        format!("{ms}ms")
    }
}

/// A gridline's value: whole numbers, one decimal below 10 (so a chart whose
/// tallest bar is 1 does not read 0, 0, 1, 1, 1).
fn tick_label(v: f64) -> String {
    if v >= 10.0 {
        format!("{}", v.round())
    } else {
        format!("{}", (v * 10.0).round() / 10.0)
    }
}

/// A bar chart: one group per label, one bar per series (name, colour, values).
/// Every bar carries a `<title>` with its exact value and `data-value`.
fn bar_chart(title: &str, labels: &[String], series: &[(&str, &str, Vec<f64>)]) -> String {
    let (w, h, left, bottom, top) = (760.0, 240.0, 44.0, 34.0, 24.0);
    let max = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1.0);
    let plot_h = h - bottom - top;
    let group_w = (w - left - 8.0) / labels.len().max(1) as f64;
    let bar_w = (group_w * 0.8) / series.len().max(1) as f64;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<figure><figcaption>{}</figcaption><svg role="img" aria-label="{}" viewBox="0 0 {w} {h}" width="100%" xmlns="http://www.w3.org/2000/svg">"#,
        esc(title),
        esc(title)
    );
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = top + plot_h - plot_h * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
            w - 8.0,
            left - 4.0,
            y + 3.0,
            tick_label(v)
        );
    }
    for (g, label) in labels.iter().enumerate() {
        let gx = left + group_w * g as f64 + group_w * 0.1;
        for (s, (name, colour, values)) in series.iter().enumerate() {
            let v = values.get(g).copied().unwrap_or(0.0);
            let bh = plot_h * v / max;
            let _ = write!(
                svg,
                r#"<rect class="bar" data-series="{}" data-label="{}" data-value="{v}" x="{:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{colour}"><title>{}: {} = {v}</title></rect>"#,
                esc(name),
                esc(label),
                gx + bar_w * s as f64,
                top + plot_h - bh,
                bar_w.max(1.0),
                esc(name),
                esc(label)
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" font-size="10" text-anchor="middle">{}</text>"#,
            gx + group_w * 0.4,
            h - bottom + 14.0,
            esc(label)
        );
    }
    for (s, (name, colour, _)) in series.iter().enumerate() {
        let x = left + 10.0 + 90.0 * s as f64;
        let _ = write!(
            svg,
            r#"<rect x="{x}" y="4" width="10" height="10" fill="{colour}"/><text x="{}" y="13" font-size="11">{}</text>"#,
            x + 14.0,
            esc(name)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

fn lat_row(out: &mut String, name: &str, v: &Value) {
    let _ = write!(
        out,
        "<tr><th>{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        esc(name),
        text(&v["n"]),
        text(&v["p50"]),
        text(&v["p90"]),
        text(&v["p99"]),
        text(&v["max"])
    );
}

/// The whole report as one HTML document.
pub fn render(r: &Value) -> String {
    let day = r["days"]
        .as_array()
        .and_then(|d| d.last())
        .cloned()
        .unwrap_or(Value::Null);
    let prev = &r["compare"];
    let date = text(&r["date"]);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>aishell report {date}</title><style>
{DASHBOARD_CSS}
{REPORT_CSS}
</style></head><body class="admin report"><header class="topbar"><span class="brand"><span class="brand-name">aishell</span></span><span class="muted">daily report</span></header><main class="dashboard"><section class="card"><h1>aishell daily report — {date}</h1><p class="muted">Compared with {}.</p>"#,
        text(&r["compare_date"])
    );
    if day["has_data"] != true {
        let _ = write!(
            out,
            r#"<div class="banner banner-muted no-data">No data for {date}: no aishell log lines of that day.</div>"#
        );
    }
    if let Some(note) = crate::compare_note(r) {
        let _ = write!(
            out,
            r#"<div class="banner banner-muted no-data">{}</div>"#,
            esc(&note)
        );
    }
    for a in r["anomalies"].as_array().into_iter().flatten() {
        let _ = write!(
            out,
            r#"<div class="banner anomaly">⚠ <b>{}</b>: {}</div>"#,
            text(&a["kind"]),
            text(&a["message"])
        );
    }
    out.push_str("</section><section class=\"card\">");
    let mut labels: Vec<String> = DISTRIBUTION_EDGES_MS
        .iter()
        .map(|e| format!("≤{}", edge_label(*e)))
        .collect();
    labels.push(format!(
        ">{}",
        edge_label(DISTRIBUTION_EDGES_MS[DISTRIBUTION_EDGES_MS.len() - 1])
    ));
    let dist = &day["start_distribution"];
    out.push_str(&bar_chart(
        "Start latency distribution (task starts per bucket)",
        &labels,
        &[
            ("warm", WARM, numbers(&dist["warm"])),
            ("cold", COLD, numbers(&dist["cold"])),
        ],
    ));
    let hours: Vec<String> = (0..24).map(|h| format!("{h:02}")).collect();
    out.push_str(&bar_chart(
        "Task starts per hour (UTC)",
        &hours,
        &[("starts", "#457b9d", numbers(&day["starts_per_hour"]))],
    ));
    let pct = |key: &str| -> Vec<f64> {
        ["p50", "p90", "p99"]
            .iter()
            .map(|p| day[key][p].as_f64().unwrap_or(0.0))
            .collect()
    };
    out.push_str(&bar_chart(
        "Start latency warm vs cold (ms)",
        &["P50".into(), "P90".into(), "P99".into()],
        &[
            ("warm", WARM, pct("start_warm_ms")),
            ("cold", COLD, pct("start_cold_ms")),
        ],
    ));
    out.push_str("<h2>Sessions</h2><table><tr><th></th><th>today</th><th>compare</th></tr>");
    for (name, key) in crate::SESSION_ROWS {
        let _ = write!(
            out,
            "<tr><th>{name}</th><td>{}</td><td>{}</td></tr>",
            text(&day[key]),
            esc(&crate::compare_cell(prev, key))
        );
    }
    out.push_str("</table><h2>Latency (ms)</h2><table><tr><th></th><th>n</th><th>P50</th><th>P90</th><th>P99</th><th>max</th></tr>");
    for (name, v) in crate::latency_rows(&day) {
        lat_row(&mut out, &name, v);
    }
    let _ = write!(
        out,
        "</table><p>Starts over 10 s: {}, over 30 s: {}</p><h2>Errors by code</h2><ul>",
        text(&day["starts_over_10s"]),
        text(&day["starts_over_30s"])
    );
    for (code, n) in day["errors"].as_object().into_iter().flatten() {
        let _ = write!(out, "<li>{}: {}</li>", esc(code), text(n));
    }
    out.push_str("</ul><h2>Disconnects by processing state</h2><ul>");
    for (state, n) in day["disconnects"].as_object().into_iter().flatten() {
        let _ = write!(out, "<li>{}: {}</li>", esc(state), text(n));
    }
    out.push_str("</ul><h2>Slowest starts</h2><table><tr><th>ms</th><th>source</th><th>session</th><th>user</th></tr>");
    for s in day["slowest_starts"].as_array().into_iter().flatten() {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            text(&s["duration_ms"]),
            text(&s["source"]),
            text(&s["sessionId"]),
            text(&s["userId"])
        );
    }
    out.push_str("</table></section>");
    if let Some(days) = r["days"].as_array().filter(|d| d.len() > 1) {
        out.push_str("<section class=\"card\">");
        let labels: Vec<String> = days
            .iter()
            .map(|d| {
                d["date"]
                    .as_str()
                    .unwrap_or("")
                    .get(5..)
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        let series = |key: &str, p: &str| -> Vec<f64> {
            days.iter()
                .map(|d| d[key][p].as_f64().unwrap_or(0.0))
                .collect()
        };
        out.push_str(&bar_chart(
            "Trend: start latency per day (ms)",
            &labels,
            &[
                ("P50", WARM, series("start_ms", "p50")),
                ("P99", COLD, series("start_ms", "p99")),
            ],
        ));
        out.push_str("<h2>Per day</h2><table><tr><th>date</th><th>starts</th><th>OK %</th><th>start P50</th><th>start P99</th><th>first event P50</th></tr>");
        for d in days {
            let _ = write!(
                out,
                "<tr><th>{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                text(&d["date"]),
                text(&d["task_starts"]),
                text(&d["connected_ok_pct"]),
                text(&d["start_ms"]["p50"]),
                text(&d["start_ms"]["p99"]),
                text(&d["first_event_ms"]["p50"])
            );
        }
        out.push_str("</table></section>");
    }
    let _ = writeln!(
        out,
        "<p class=\"muted\"><small>{} lines read, {} used, {} skipped (not JSON or not aishell's).</small></p></main></body></html>",
        text(&r["lines"]["read"]),
        text(&r["lines"]["used"]),
        text(&r["lines"]["skipped"])
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(esc(r#"<b a="1">&'"#), "&lt;b a=&quot;1&quot;&gt;&amp;&#39;");
        let chart = bar_chart("t<", &["<x>".into()], &[("s", "#000", vec![3.0])]);
        assert!(chart.contains("&lt;x&gt;") && !chart.contains("<x>"));
        assert!(chart.contains(r#"data-value="3""#));
        assert_eq!(tick_label(0.25), "0.3");
        assert_eq!(tick_label(0.75), "0.8");
        assert_eq!(tick_label(12.4), "12");
    }
}
