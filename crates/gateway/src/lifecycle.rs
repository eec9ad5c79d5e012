//! Lifecycle events: `event = "task_lifecycle"` with a `phase`,
//! the session's ids and phase-specific fields, as one JSON log line each.

/// `lifecycle!(session, "phase", field = value, ..., "message")`
macro_rules! lifecycle {
    ($s:expr, $phase:literal, $($field:tt)*) => {
        tracing::info!(
            event = "task_lifecycle",
            phase = $phase,
            sessionId = %$s.id,
            userId = %$s.user_id,
            traceId = %$s.trace_id,
            $($field)*
        )
    };
}

pub(crate) use lifecycle;

/// Milliseconds of a duration, as logged in `duration_ms`.
pub fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}
