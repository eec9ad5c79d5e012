//! Recent activity kept in memory for the admin dashboard: the last hour of
//! lifecycle durations and error codes, and live counts of connected runners
//! and clients.
//!
//! Prometheus histograms only keep buckets, and the daily report reads log
//! files the gateway may not have; the dashboard wants raw points to draw, so
//! [`crate::metrics`] also records here. Process-wide (like the metrics
//! recorder) and bounded: per series at most [`MAX_POINTS`] points, at most
//! [`MAX_ERRORS`] errors, nothing older than [`WINDOW`] is reported.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// How far back the dashboard looks.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// Points kept per latency series (newest win).
pub const MAX_POINTS: usize = 2048;
/// Error occurrences kept (newest win).
pub const MAX_ERRORS: usize = 10_000;

static RECENT: LazyLock<Recent> = LazyLock::new(Recent::new);

/// The process-wide recorder.
pub fn recent() -> &'static Recent {
    &RECENT
}

pub struct Recent {
    started_at: SystemTime,
    runners: AtomicI64,
    clients: AtomicI64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// `phase` or `phase/source` → (unix ms, duration ms), oldest first.
    series: HashMap<String, VecDeque<(u64, f64)>>,
    /// (unix ms, code), oldest first.
    errors: VecDeque<(u64, String)>,
}

/// One latency series over the window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SeriesSnapshot {
    pub count: usize,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// `[unix_ms, duration_ms]`, oldest first.
    pub points: Vec<(u64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecentSnapshot {
    pub uptime_s: u64,
    pub runners_connected: i64,
    pub clients_connected: i64,
    /// Error code → occurrences in the window.
    pub errors_by_code: BTreeMap<String, u64>,
    /// The newest errors, newest first (at most 20): `[unix_ms, code]`.
    pub errors_recent: Vec<(u64, String)>,
    pub series: BTreeMap<String, SeriesSnapshot>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Recent {
    fn new() -> Self {
        Recent {
            started_at: SystemTime::now(),
            runners: AtomicI64::new(0),
            clients: AtomicI64::new(0),
            inner: Mutex::default(),
        }
    }

    /// A lifecycle phase took `took` (`source` is `warm`/`cold`/`success`...).
    pub fn latency(&self, phase: &str, source: Option<&str>, took: Duration) {
        self.latency_at(phase, source, took, SystemTime::now());
    }

    fn latency_at(&self, phase: &str, source: Option<&str>, took: Duration, at: SystemTime) {
        let key = match source.filter(|s| !s.is_empty()) {
            Some(s) => format!("{phase}/{s}"),
            None => phase.to_string(),
        };
        let mut inner = self.inner.lock().expect("recent activity");
        let points = inner.series.entry(key).or_default();
        if points.len() >= MAX_POINTS {
            points.pop_front();
        }
        points.push_back((unix_ms(at), took.as_secs_f64() * 1000.0));
    }

    pub fn error(&self, code: &str) {
        self.error_at(code, SystemTime::now());
    }

    fn error_at(&self, code: &str, at: SystemTime) {
        let mut inner = self.inner.lock().expect("recent activity");
        if inner.errors.len() >= MAX_ERRORS {
            inner.errors.pop_front();
        }
        inner.errors.push_back((unix_ms(at), code.to_string()));
    }

    pub fn runners(&self, delta: i64) {
        self.runners.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn clients(&self, delta: i64) {
        self.clients.fetch_add(delta, Ordering::Relaxed);
    }

    /// Everything within [`WINDOW`] of now; older entries are dropped.
    pub fn snapshot(&self) -> RecentSnapshot {
        self.snapshot_at(SystemTime::now())
    }

    fn snapshot_at(&self, now: SystemTime) -> RecentSnapshot {
        let cutoff = unix_ms(now).saturating_sub(WINDOW.as_millis() as u64);
        let mut inner = self.inner.lock().expect("recent activity");
        while inner.errors.front().is_some_and(|(t, _)| *t < cutoff) {
            inner.errors.pop_front();
        }
        let mut errors_by_code = BTreeMap::new();
        for (_, code) in &inner.errors {
            *errors_by_code.entry(code.clone()).or_insert(0) += 1;
        }
        let errors_recent = inner.errors.iter().rev().take(20).cloned().collect();
        let mut series = BTreeMap::new();
        inner.series.retain(|key, points| {
            while points.front().is_some_and(|(t, _)| *t < cutoff) {
                points.pop_front();
            }
            if points.is_empty() {
                return false;
            }
            series.insert(key.clone(), summarise(points));
            true
        });
        RecentSnapshot {
            uptime_s: now
                .duration_since(self.started_at)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            runners_connected: self.runners.load(Ordering::Relaxed),
            clients_connected: self.clients.load(Ordering::Relaxed),
            errors_by_code,
            errors_recent,
            series,
        }
    }
}

fn summarise(points: &VecDeque<(u64, f64)>) -> SeriesSnapshot {
    let mut sorted: Vec<f64> = points.iter().map(|(_, ms)| *ms).collect();
    sorted.sort_by(f64::total_cmp);
    SeriesSnapshot {
        count: sorted.len(),
        p50_ms: percentile(&sorted, 0.50),
        p90_ms: percentile(&sorted, 0.90),
        p99_ms: percentile(&sorted, 0.99),
        max_ms: sorted.last().copied(),
        points: points.iter().copied().collect(),
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.9), Some(90.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn window_drops_old_points_and_errors() {
        let r = Recent::new();
        let now = SystemTime::now();
        let old = now - WINDOW - Duration::from_secs(5);
        r.latency_at("task_ready", Some("warm"), Duration::from_millis(40), old);
        r.latency_at("task_ready", Some("warm"), Duration::from_millis(60), now);
        r.latency_at("message_roundtrip", None, Duration::from_millis(3), old);
        r.error_at("AGENT_CRASHED", old);
        r.error_at("UNAUTHORIZED", now);
        r.error_at("UNAUTHORIZED", now);
        let snap = r.snapshot_at(now);
        let warm = &snap.series["task_ready/warm"];
        assert_eq!(warm.count, 1);
        assert_eq!(warm.p50_ms, Some(60.0));
        assert!(!snap.series.contains_key("message_roundtrip"));
        assert_eq!(snap.errors_by_code.len(), 1);
        assert_eq!(snap.errors_by_code["UNAUTHORIZED"], 2);
        assert_eq!(snap.errors_recent.len(), 2);
    }

    #[test]
    fn series_and_errors_are_bounded() {
        let r = Recent::new();
        for i in 0..(MAX_POINTS + 10) {
            r.latency("task_ready", Some("cold"), Duration::from_millis(i as u64));
        }
        for _ in 0..(MAX_ERRORS + 10) {
            r.error("OVERLOADED");
        }
        let snap = r.snapshot();
        assert_eq!(snap.series["task_ready/cold"].count, MAX_POINTS);
        assert_eq!(snap.errors_by_code["OVERLOADED"], MAX_ERRORS as u64);
    }
}
