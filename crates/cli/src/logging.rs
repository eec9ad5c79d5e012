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

/// Daily files kept under the log directory (a month).
const LOG_FILES_KEPT: usize = 31;

/// Install the JSON logger for this process. `RUST_LOG` overrides the level.
pub fn init(service: &'static str, target: Target) {
    let _ = try_init(service, target, None);
}

/// Like [`init`], also appending every line to `<dir>/aishell.YYYY-MM-DD.log`
/// (a new file each UTC day; the oldest beyond a month are deleted).
pub fn try_init(
    service: &'static str,
    target: Target,
    file_dir: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,hyper=warn,tower_http=warn"));
    let console = match target {
        Target::Stdout => BoxMakeWriter::new(std::io::stdout),
        Target::Stderr => BoxMakeWriter::new(std::io::stderr),
    };
    let writer = match file_dir {
        Some(dir) => {
            let files = tracing_appender::rolling::Builder::new()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix("aishell")
                .filename_suffix("log")
                .max_log_files(LOG_FILES_KEPT)
                .build(dir)
                .map_err(|e| anyhow::anyhow!("cannot write logs under {}: {e}", dir.display()))?;
            BoxMakeWriter::new(console.and(files))
        }
        None => console,
    };
    let _ = tracing_subscriber::fmt()
        .event_format(JsonLine { service })
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init();
    Ok(())
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
