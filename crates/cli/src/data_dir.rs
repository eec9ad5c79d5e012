//! The data directory (database, workspaces, secrets, logs): found the same
//! way by every subcommand, so `token create` run from another directory
//! talks to the store the running gateway uses instead of a new one.
//!
//! Order: `--data-dir`, `AISHELL_DATA_DIR`, the config file's `data_dir`
//! (`--config`, `AISHELL_CONFIG`, else the user's `aishell.toml`, see
//! [`user_config_file`]), then `./aishell-data`.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Name of the directory `serve` creates when nothing names one.
pub const DEFAULT_NAME: &str = "aishell-data";

/// Where a data directory was found (printed next to it).
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    Flag,
    Env,
    ConfigFile(PathBuf),
    CurrentDir,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag => f.write_str("from --data-dir"),
            Origin::Env => f.write_str("from AISHELL_DATA_DIR"),
            Origin::ConfigFile(p) => write!(f, "from {}", p.display()),
            Origin::CurrentDir => f.write_str("in the current directory"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DataDir {
    /// Absolute.
    pub path: PathBuf,
    pub origin: Origin,
}

/// `$XDG_CONFIG_HOME/aishell/aishell.toml`, else `~/.config/aishell/aishell.toml`:
/// read by every subcommand when no `--config` is given (if it exists).
pub fn user_config_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("aishell").join("aishell.toml"))
}

/// The config file in force: the one named, else the user's if it exists.
pub fn config_file(named: Option<&Path>) -> Option<PathBuf> {
    match named {
        Some(p) => Some(p.to_path_buf()),
        None => user_config_file().filter(|p| p.is_file()),
    }
}

/// `data_dir` of a config file, relative paths taken from the file's folder.
fn data_dir_in(file: &Path) -> anyhow::Result<Option<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct OnlyDataDir {
        data_dir: Option<PathBuf>,
    }
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read config file {}", file.display()))?;
    // Other keys are checked by `serve`; here only this one matters.
    let parsed: OnlyDataDir = toml::from_str::<toml::Table>(&text)
        .with_context(|| format!("invalid config file {}", file.display()))
        .and_then(|t| {
            toml::Value::Table(t)
                .try_into()
                .with_context(|| format!("invalid data_dir in {}", file.display()))
        })?;
    Ok(parsed.data_dir.map(|d| match file.parent() {
        Some(base) if d.is_relative() => base.join(d),
        _ => d,
    }))
}

/// Find the data directory. `flag` is the value clap saw for `--data-dir`
/// (which also reads `AISHELL_DATA_DIR`).
pub fn locate(flag: Option<&Path>, config: Option<&Path>) -> anyhow::Result<DataDir> {
    let (path, origin) = if let Some(p) = flag {
        let from_env = std::env::var_os("AISHELL_DATA_DIR").is_some_and(|v| Path::new(&v) == p);
        (
            p.to_path_buf(),
            if from_env { Origin::Env } else { Origin::Flag },
        )
    } else if let Some((file, dir)) = config_file(config)
        .map(|f| data_dir_in(&f).map(|d| d.map(|d| (f, d))))
        .transpose()?
        .flatten()
    {
        (dir, Origin::ConfigFile(file))
    } else {
        (PathBuf::from(DEFAULT_NAME), Origin::CurrentDir)
    };
    let path = if path.is_absolute() {
        path
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(path)
    };
    Ok(DataDir { path, origin })
}

impl DataDir {
    /// This directory if `serve` has used it (it holds the database);
    /// never creates one.
    pub fn existing(self, config: Option<&Path>) -> anyhow::Result<Self> {
        if self.path.join("aishell.db").is_file() {
            return Ok(self);
        }
        let config = config_file(config)
            .or_else(user_config_file)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "aishell.toml".into());
        anyhow::bail!(
            "DATA_DIR_NOT_FOUND: no aishell data directory at {} ({}). Looked at --data-dir, AISHELL_DATA_DIR, the config file ({config}), then ./{DEFAULT_NAME}. Run this where you ran `aishell serve`, or point at its directory with --data-dir DIR (or AISHELL_DATA_DIR=DIR, or `data_dir = \"DIR\"` in {config}).",
            self.path.display(),
            self.origin
        )
    }

    /// Say which directory this command uses (on stderr: stdout may be a
    /// token a script reads).
    pub fn announce(&self) {
        eprintln!(
            "aishell: data directory {} ({})",
            self.path.display(),
            self.origin
        );
    }

    /// Create it (and tighten it) for `serve`: it holds secrets, so nobody
    /// else may list or write it; others keep the execute bit, because each
    /// user's agent runs under that user's own UID and passes through it to
    /// its workspace (every file in it is 0600, every other directory 0700).
    pub fn create_private(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.path)
            .with_context(|| format!("cannot create data dir {}", self.path.display()))?;
        make_private_dir(&self.path)
    }
}

/// Mode 0711 on a directory we own: see [`DataDir::create_private`].
pub fn make_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("cannot make {} private (0711)", dir.display()))
}

/// Mode 0600 on each of these files that exists (the SQLite database and
/// its journal files are created by the driver with the umask's mode).
pub fn make_private_files(files: &[PathBuf]) -> anyhow::Result<()> {
    for f in files.iter().filter(|f| f.is_file()) {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private (0600)", f.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_file_names_the_directory_relative_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("aishell.toml");
        std::fs::write(&file, "data_dir = \"state\"\nport = 7000\n").unwrap();
        let found = locate(None, Some(&file)).unwrap();
        assert_eq!(found.path, dir.path().join("state"));
        assert_eq!(found.origin, Origin::ConfigFile(file.clone()));
        let flag = locate(Some(Path::new("/srv/x")), Some(&file)).unwrap();
        assert_eq!(flag.path, PathBuf::from("/srv/x"));
    }

    #[test]
    fn a_missing_directory_is_a_coded_error_naming_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("aishell.toml");
        std::fs::write(&file, "data_dir = \"nowhere\"\n").unwrap();
        let err = locate(None, Some(&file))
            .unwrap()
            .existing(Some(&file))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("DATA_DIR_NOT_FOUND: "), "{err}");
        assert!(
            err.contains("nowhere") && err.contains("--data-dir"),
            "{err}"
        );
        assert!(!dir.path().join("nowhere").exists(), "nothing is created");
    }
}
