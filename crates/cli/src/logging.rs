//! Structured logs: one JSON object per line with the original
//! system's field names: `timestamp`, `level`, `service`, `module`, `event`,
//! `message`, and whatever ids the event carries (`sessionId`, `taskId`, ...).

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Fields whose string value is itself JSON (logged as an object, not a string).
const JSON_FIELDS: &[&str] = &["breakdown"];

pub enum Target {
    Stdout,
    Stderr,
}

/// How `serve` writes its console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleFormat {
    /// Short readable lines, warnings and errors only (a person at a terminal).
    Human,
    /// Every line as JSON (a log collector, CloudWatch, `aishell report`).
    Json,
}

/// Daily files kept under the log directory (a month).
const LOG_FILES_KEPT: usize = 31;

/// What every JSON sink records unless `RUST_LOG` says otherwise.
const DEFAULT_FILTER: &str = "info,sqlx=warn,hyper=warn,tower_http=warn";

fn filter_or(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

/// Set (to `human`) by a `serve` whose console is a person's terminal: its
/// local runners write there too, so they follow its form.
pub const CONSOLE_FORMAT_ENV: &str = "AISHELL_CONSOLE_FORMAT";

/// Install the logger of a runner or an agent: JSON lines, or readable
/// warnings and errors under a `serve` at a terminal. `RUST_LOG` overrides
/// the level.
pub fn init(service: &'static str, target: Target) {
    let console = match target {
        Target::Stdout => BoxMakeWriter::new(std::io::stdout),
        Target::Stderr => BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt().with_writer(console);
    let _ = if std::env::var(CONSOLE_FORMAT_ENV).as_deref() == Ok("human") {
        builder
            .event_format(HumanLine)
            .with_env_filter(filter_or("warn"))
            .try_init()
    } else {
        builder
            .event_format(JsonLine { service })
            .with_env_filter(filter_or(DEFAULT_FILTER))
            .try_init()
    };
}

/// Install the gateway's logger: the console on stdout in `console` form,
/// and, with `file_dir`, every line as JSON in
/// `<dir>/aishell.YYYY-MM-DD.log` (a new file each UTC day, mode 0600; the
/// oldest beyond a month are deleted), which `aishell report` reads.
pub fn init_gateway(
    service: &'static str,
    console: ConsoleFormat,
    file_dir: Option<&Path>,
) -> anyhow::Result<()> {
    let console_layer = match console {
        ConsoleFormat::Human => tracing_subscriber::fmt::layer()
            .event_format(HumanLine)
            .with_writer(std::io::stdout)
            .with_filter(filter_or("warn"))
            .boxed(),
        ConsoleFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(JsonLine { service })
            .with_writer(std::io::stdout)
            .with_filter(filter_or(DEFAULT_FILTER))
            .boxed(),
    };
    let file_layer = match file_dir {
        Some(dir) => {
            let files = Arc::new(DailyFiles::open(dir)?);
            Some(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLine { service })
                    .with_writer(move || DailyFile(files.clone()))
                    .with_filter(filter_or(DEFAULT_FILTER)),
            )
        }
        None => None,
    };
    let _ = tracing_subscriber::registry()
        .with(console_layer)
        .with(file_layer)
        .try_init();
    Ok(())
}

fn file_name(day: &str) -> String {
    format!("aishell.{day}.log")
}

fn utc_day() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::macros::format_description!("[year]-[month]-[day]"))
        .unwrap_or_default()
}

/// The gateway's daily log files: owner-only (they name users and sessions),
/// one per UTC day.
struct DailyFiles {
    dir: PathBuf,
    current: Mutex<Option<(String, std::fs::File)>>,
}

impl DailyFiles {
    fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot write logs under {}: {e}", dir.display()))?;
        // The owner's alone: log lines name users and sessions.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
                anyhow::anyhow!("cannot make {} private (0700): {e}", dir.display())
            })?;
        }
        let files = DailyFiles {
            dir: dir.to_path_buf(),
            current: Mutex::new(None),
        };
        // Open today's file now, so a directory we cannot write to is an
        // error at start-up rather than lines silently lost.
        let day = utc_day();
        let file = files
            .open_day(&day)
            .map_err(|e| anyhow::anyhow!("cannot write logs under {}: {e}", dir.display()))?;
        *files.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((day, file));
        Ok(files)
    }

    fn open_day(&self, day: &str) -> std::io::Result<std::fs::File> {
        let path = self.dir.join(file_name(day));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        // A file left by an older version may have the umask's mode.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        self.prune();
        Ok(file)
    }

    /// Delete the oldest daily files beyond [`LOG_FILES_KEPT`].
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("aishell.") && n.ends_with(".log"))
            })
            .collect();
        logs.sort();
        let excess = logs.len().saturating_sub(LOG_FILES_KEPT);
        for old in &logs[..excess] {
            let _ = std::fs::remove_file(old);
        }
    }

    fn write_line(&self, buf: &[u8]) -> std::io::Result<()> {
        let day = utc_day();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_none_or(|(d, _)| *d != day) {
            let file = self.open_day(&day)?;
            *current = Some((day, file));
        }
        match current.as_mut() {
            Some((_, file)) => file.write_all(buf),
            None => Ok(()),
        }
    }
}

/// One event's writer: the fmt layer formats a whole line, then writes it
/// in one call.
struct DailyFile(Arc<DailyFiles>);

impl Write for DailyFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_line(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `12:04:05 WARN  sentence  (event key=value …)`: for a person reading a terminal.
struct HumanLine;

impl<S, N> FormatEvent<S, N> for HumanLine
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
        let mut map = Map::new();
        event.record(&mut Fields(&mut map));
        let time = time::OffsetDateTime::now_utc()
            .format(&time::macros::format_description!(
                "[hour]:[minute]:[second]"
            ))
            .unwrap_or_default();
        let mut message = match map.remove("message") {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        // A quoted line (an agent's stderr) is the news: it goes first.
        if let Some(Value::String(line)) = map.remove("line") {
            message = format!("{message}: {line}");
        }
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warning",
            tracing::Level::INFO => "info",
            _ => "debug",
        };
        write!(writer, "{time} {level}: {message}")?;
        let details: Vec<String> = map
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) if k == "event" => s.clone(),
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect();
        if !details.is_empty() {
            write!(writer, "  ({})", details.join(" "))?;
        }
        writeln!(writer)
    }
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
