//! `aishell report`: the daily report over the gateway's log files. With no
//! file named it reads the daily files of the data directory every other
//! subcommand finds (data_dir.rs), where `serve` writes them.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use crate::data_dir;
use crate::settings::ServeSettings;

#[derive(Args, Debug)]
pub struct ReportCommand {
    #[command(flatten)]
    report: aishell_report::ReportArgs,
    /// Data directory whose logs to read when no file is named [default: found as `serve` finds it].
    #[arg(long, env = "AISHELL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The config file `serve` reads (for its `data_dir` and `log_file`).
    #[arg(long, env = "AISHELL_CONFIG")]
    config: Option<PathBuf>,
}

pub async fn run(args: ReportCommand) -> anyhow::Result<()> {
    let ReportCommand {
        mut report,
        data_dir,
        config,
    } = args;
    if report.source == "file" && report.files.is_empty() {
        report.files.push(default_log_dir(data_dir, config)?);
    } else if report.source == "file" {
        for f in report.files.iter().filter(|f| f.as_os_str() != "-") {
            if !f.exists() {
                bail!(
                    "NO_LOGS: {} does not exist. `aishell serve` writes its logs to <data-dir>/logs (see `aishell report --help`); run `aishell report` with no file to read them.",
                    f.display()
                );
            }
        }
    }
    aishell_report::run(report).await
}

/// `<data-dir>/logs`, or where the config file's `log_file` (or
/// `AISHELL_LOG_FILE`) moved them.
fn default_log_dir(flag: Option<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let config = data_dir::config_file(config.as_deref());
    let found = data_dir::locate(flag.as_deref(), config.as_deref())?;
    let mut settings = ServeSettings {
        log_file: std::env::var("AISHELL_LOG_FILE").ok(),
        ..Default::default()
    };
    if let Some(file) = &config {
        settings.merge_file(file)?;
    }
    let Some(logs) = settings.log_dir(&found.path) else {
        bail!(
            "NO_LOGS: the gateway is configured to write no log files (log_file = none); name log files, or `-` to read stdin."
        );
    };
    let found = found.existing(config.as_deref())?;
    found.announce();
    if !logs.is_dir() {
        bail!(
            "NO_LOGS: no log files under {}: `aishell serve` writes them there as it runs (unless started with --log-file none or elsewhere); name log files, or `-` to read stdin.",
            logs.display()
        );
    }
    eprintln!("aishell: reading {}", logs.display());
    Ok(logs)
}
