//! Structured logs (SPEC §8.1): one JSON object per line with the original
//! system's field names: `timestamp`, `level`, `service`, `module`, `event`,
//! `message`, and whatever ids the event carries (`sessionId`, `taskId`, ...).

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Fields whose string value is itself JSON (logged as an object, not a string).
const JSON_FIELDS: &[&str] = &["breakdown"];

pub enum Target {
    Stdout,
    Stderr,
}

/// Install the JSON logger for this process. `RUST_LOG` overrides the level.
pub fn init(service: &'static str, target: Target) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,hyper=warn,tower_http=warn"));
    let builder = tracing_subscriber::fmt()
        .event_format(JsonLine { service })
        .with_env_filter(filter);
    let _ = match target {
        Target::Stdout => builder.with_writer(std::io::stdout).try_init(),
        Target::Stderr => builder.with_writer(std::io::stderr).try_init(),
    };
}

struct JsonLine {
    service: &'static str,
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut map = Map::new();
        let now = time::OffsetDateTime::now_utc();
        let ts = now
            .format(&time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .unwrap_or_default();
        map.insert("timestamp".into(), Value::String(ts));
        map.insert(
            "level".into(),
            Value::String(meta.level().as_str().to_ascii_lowercase()),
        );
        map.insert("service".into(), Value::String(self.service.into()));
        map.insert("module".into(), Value::String(meta.target().into()));
        event.record(&mut Fields(&mut map));
        let line = serde_json::to_string(&map).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_string(), value);
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if let Some(v) = JSON_FIELDS
            .contains(&field.name())
            .then(|| serde_json::from_str::<Value>(value).ok())
            .flatten()
        {
            return self.put(field, v);
        }
        self.put(field, Value::String(value.to_string()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        self.record_str(field, &text);
    }
}
