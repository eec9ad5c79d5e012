//! The adoption record (`{state_dir}/tasks.log`) that lets a restarted
//! gateway adopt the runners its predecessor launched: a journal of JSON
//! lines, `{"launched": {...}}` and `{"ended": "<task id>"}`, replayed at
//! start. A launch or an exit appends one line (one `write`), instead of
//! rewriting every live task and renaming the file into place, which on
//! ext4 also flushes it: that rewrite was an eighth of the gateway's CPU in
//! a burst of new tasks. When the journal holds many more lines than live
//! tasks it is compacted (temp file + rename). A line torn by a crash
//! mid-write is the last one and is ignored; any other bad line makes the
//! whole record unreadable, which the caller reports and starts empty.
//! Older gateways wrote `tasks.json` (one JSON document); it is read when
//! no journal exists and removed at the first compaction.

use std::collections::BTreeMap;

use aishell_backend::TaskMode;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub(crate) const JOURNAL_FILE: &str = "tasks.log";
/// The record of older gateways.
pub(crate) const LEGACY_FILE: &str = "tasks.json";
/// Compact only past this many lines, and when lines outnumber live tasks
/// four to one.
const COMPACT_MIN_LINES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LegacyFile {
    pub version: u32,
    pub tasks: Vec<PersistedTask>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PersistedTask {
    pub task_id: String,
    pub pid: i32,
    pub pgid: i32,
    pub mode: TaskMode,
    pub session_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
}

/// One journal line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Record {
    Launched(PersistedTask),
    Ended(String),
}

pub(crate) fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub(crate) fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(JOURNAL_FILE)
}

/// The live tasks the record names. A missing record is an empty list; a
/// corrupt one is an error so the caller can log it and start empty.
pub(crate) fn load(state_dir: &Path) -> std::io::Result<Vec<PersistedTask>> {
    let invalid = |e: serde_json::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let text = match std::fs::read_to_string(path(state_dir)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match std::fs::read(state_dir.join(LEGACY_FILE)) {
                Ok(raw) => Ok(serde_json::from_slice::<LegacyFile>(&raw)
                    .map_err(invalid)?
                    .tasks),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(e),
            };
        }
        Err(e) => return Err(e),
    };
    let mut live = BTreeMap::new();
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Record>(line) {
            Ok(Record::Launched(t)) => {
                live.insert(t.task_id.clone(), t);
            }
            Ok(Record::Ended(id)) => {
                live.remove(&id);
            }
            // Torn by a crash while it was written.
            Err(_) if i + 1 == lines.len() && !complete => {}
            Err(e) => return Err(invalid(e)),
        }
    }
    Ok(live.into_values().collect())
}

/// The journal's writer: what the file says is live, and the open file.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    file: Option<std::fs::File>,
    recorded: BTreeMap<String, PersistedTask>,
    lines: usize,
}

impl Journal {
    /// A writer whose first [`sync`](Self::sync) rewrites the record.
    pub(crate) fn new(dir: &Path) -> Self {
        Journal {
            dir: dir.to_path_buf(),
            file: None,
            recorded: BTreeMap::new(),
            lines: 0,
        }
    }

    /// Make the record say exactly `live`: append what changed.
    pub(crate) fn sync(&mut self, live: Vec<PersistedTask>) -> std::io::Result<()> {
        let live: BTreeMap<String, PersistedTask> =
            live.into_iter().map(|t| (t.task_id.clone(), t)).collect();
        if self.file.is_none()
            || (self.lines > COMPACT_MIN_LINES && self.lines > 4 * live.len().max(1))
        {
            return self.compact(live);
        }
        let mut records = Vec::new();
        for id in self.recorded.keys().filter(|id| !live.contains_key(*id)) {
            records.push(Record::Ended(id.clone()));
        }
        for (id, t) in &live {
            if self.recorded.get(id) != Some(t) {
                records.push(Record::Launched(t.clone()));
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        for r in &records {
            serde_json::to_writer(&mut out, r).map_err(std::io::Error::other)?;
            out.push(b'\n');
        }
        let file = self.file.as_mut().expect("opened by compact");
        if let Err(e) = file.write_all(&out) {
            // A partial line would corrupt what follows: start over.
            self.file = None;
            return Err(e);
        }
        self.lines += records.len();
        self.recorded = live;
        Ok(())
    }

    /// Rewrite the record as one line per live task (temp file + rename).
    fn compact(&mut self, live: BTreeMap<String, PersistedTask>) -> std::io::Result<()> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        self.file = None;
        let mut out = Vec::new();
        for t in live.values() {
            serde_json::to_writer(&mut out, &Record::Launched(t.clone()))
                .map_err(std::io::Error::other)?;
            out.push(b'\n');
        }
        let tmp = self.dir.join(format!(
            ".{JOURNAL_FILE}.{}.{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&tmp, &out)?;
        if let Err(e) = std::fs::rename(&tmp, path(&self.dir)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let _ = std::fs::remove_file(self.dir.join(LEGACY_FILE));
        self.file = Some(
            std::fs::OpenOptions::new()
                .append(true)
                .open(path(&self.dir))?,
        );
        self.lines = live.len();
        self.recorded = live;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, pid: i32) -> PersistedTask {
        PersistedTask {
            task_id: id.into(),
            pid,
            pgid: pid,
            mode: TaskMode::Warm,
            session_id: Some("s".into()),
            started_at_ms: 1_700_000_000_123,
        }
    }

    fn names(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn launches_and_exits_append_and_load_replays_them() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        let mut j = Journal::new(dir.path());
        j.sync(vec![]).unwrap();
        j.sync(vec![task("a", 1)]).unwrap();
        j.sync(vec![task("a", 1), task("b", 2)]).unwrap();
        j.sync(vec![task("b", 2)]).unwrap();
        // Nothing changed: nothing written.
        j.sync(vec![task("b", 2)]).unwrap();
        let text = std::fs::read_to_string(path(dir.path())).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert_eq!(load(dir.path()).unwrap(), vec![task("b", 2)]);
        assert_eq!(from_ms(to_ms(from_ms(5))), from_ms(5));
        assert_eq!(
            names(dir.path()),
            vec![std::ffi::OsString::from(JOURNAL_FILE)]
        );
    }

    #[test]
    fn a_long_journal_is_compacted_to_the_live_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new(dir.path());
        for i in 0..400 {
            j.sync(vec![task("keep", 1), task(&format!("t{i}"), 10 + i)])
                .unwrap();
        }
        let lines = std::fs::read_to_string(path(dir.path()))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= COMPACT_MIN_LINES + 2, "{lines} lines");
        assert_eq!(
            load(dir.path()).unwrap(),
            vec![task("keep", 1), task("t399", 409)]
        );
        assert_eq!(
            names(dir.path()),
            vec![std::ffi::OsString::from(JOURNAL_FILE)]
        );
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_a_bad_line_elsewhere_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new(dir.path());
        j.sync(vec![task("a", 1)]).unwrap();
        drop(j);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(path(dir.path()))
            .unwrap();
        f.write_all(b"{\"launched\":{\"task_id\":\"b\"").unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![task("a", 1)]);
        f.write_all(b"\n{\"ended\":\"a\"}\n").unwrap();
        assert!(load(dir.path()).is_err());
    }

    #[test]
    fn an_older_gateways_file_is_read_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = LegacyFile {
            version: 1,
            tasks: vec![task("old", 7)],
        };
        std::fs::write(
            dir.path().join(LEGACY_FILE),
            serde_json::to_vec(&legacy).unwrap(),
        )
        .unwrap();
        let tasks = load(dir.path()).unwrap();
        assert_eq!(tasks, vec![task("old", 7)]);
        let mut j = Journal::new(dir.path());
        j.sync(tasks).unwrap();
        assert_eq!(
            names(dir.path()),
            vec![std::ffi::OsString::from(JOURNAL_FILE)]
        );
        assert_eq!(load(dir.path()).unwrap(), vec![task("old", 7)]);
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), b"{not json\n").unwrap();
        assert!(load(dir.path()).is_err());
        std::fs::remove_file(path(dir.path())).unwrap();
        std::fs::write(dir.path().join(LEGACY_FILE), b"{not json").unwrap();
        assert!(load(dir.path()).is_err());
    }
}
