//! Prometheus metrics, recorded with the `metrics` crate and
//! rendered by its Prometheus exporter at `GET /metrics`.
//!
//! Series: `aishell_lifecycle_duration_seconds{phase,source}` (histogram of
//! every lifecycle phase), `aishell_errors_total{code}`,
//! `aishell_ws_disconnects_total{processing_state}`, `aishell_idle_timeouts_total`,
//! gauges `aishell_clients_connected`, `aishell_runners_connected`,
//! `aishell_sessions{state}`, `aishell_warm_pool_ready`, `aishell_warm_pool_launching`.
//!
//! Durations, errors and connection counts are also kept as raw recent points
//! for the admin dashboard ([`crate::recent`]).

use std::sync::OnceLock;
use std::time::Duration;

use aishell_protocol::SessionState;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Seconds; from a warm claim (ms) to a slow cold start on ECS (tens of s).
const BUCKETS: &[f64] = &[
    0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Install the process-wide recorder (once) and return its handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("static buckets are valid")
            .install_recorder()
            .expect("no other metrics recorder is installed")
    })
}

pub fn phase(phase: &'static str, source: Option<&'static str>, took: Duration) {
    metrics::histogram!("aishell_lifecycle_duration_seconds", "phase" => phase, "source" => source.unwrap_or("")).record(took.as_secs_f64());
    crate::recent::recent().latency(phase, source, took);
}

/// An error code sent to a client (or an agent). Counted for `/metrics`
/// and the dashboard, and logged as one `client_error` line that `aishell
/// report` counts: both show the same errors by code.
pub fn error(code: &str) {
    metrics::counter!("aishell_errors_total", "code" => code.to_string()).increment(1);
    crate::recent::recent().error(code);
    tracing::info!(event = "client_error", code = %code, "error code sent");
}

pub fn disconnect(processing_state: &'static str) {
    metrics::counter!("aishell_ws_disconnects_total", "processing_state" => processing_state)
        .increment(1);
}

pub fn idle_timeout() {
    metrics::counter!("aishell_idle_timeouts_total").increment(1);
}

pub fn clients(delta: f64) {
    metrics::gauge!("aishell_clients_connected").increment(delta);
    crate::recent::recent().clients(delta as i64);
}

pub fn runners(delta: f64) {
    metrics::gauge!("aishell_runners_connected").increment(delta);
    crate::recent::recent().runners(delta as i64);
}

/// Move one session from state `from` (if any) to `to` (if any).
pub fn session_state(from: Option<SessionState>, to: Option<SessionState>) {
    if let Some(from) = from {
        metrics::gauge!("aishell_sessions", "state" => from.as_str()).decrement(1.0);
    }
    if let Some(to) = to {
        metrics::gauge!("aishell_sessions", "state" => to.as_str()).increment(1.0);
    }
}

pub fn pool(ready: usize, launching: usize) {
    metrics::gauge!("aishell_warm_pool_ready").set(ready as f64);
    metrics::gauge!("aishell_warm_pool_launching").set(launching as f64);
}
