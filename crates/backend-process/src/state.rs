//! The small JSON state file (`{state_dir}/tasks.json`) that lets a restarted
//! gateway adopt the runners its predecessor launched.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub(crate) const STATE_FILE: &str = "tasks.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub version: u32,
    pub tasks: Vec<PersistedTask>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PersistedTask {
    pub task_id: String,
    pub pid: i32,
    pub pgid: i32,
    pub mode: String,
    pub session_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
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
    state_dir.join(STATE_FILE)
}

/// Read the state file. A missing file is an empty list; a corrupt one is
/// reported so the caller can log it and start empty.
pub(crate) fn load(state_dir: &Path) -> std::io::Result<Vec<PersistedTask>> {
    let p = path(state_dir);
    let raw = match std::fs::read(&p) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let file: StateFile = serde_json::from_slice(&raw)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(file.tasks)
}

/// Write the state file atomically (temp file in the same directory + rename).
pub(crate) fn save(state_dir: &Path, tasks: Vec<PersistedTask>) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let file = StateFile { version: 1, tasks };
    let body = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    let tmp = state_dir.join(format!(
        ".{STATE_FILE}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&tmp, body)?;
    if let Err(e) = std::fs::rename(&tmp, path(state_dir)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        let t = PersistedTask {
            task_id: "t1".into(),
            pid: 42,
            pgid: 42,
            mode: "warm".into(),
            session_id: Some("s".into()),
            started_at_ms: 1_700_000_000_123,
        };
        save(dir.path(), vec![t.clone()]).unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![t]);
        assert_eq!(from_ms(to_ms(from_ms(5))), from_ms(5));
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), b"{not json").unwrap();
        assert!(load(dir.path()).is_err());
    }
}
