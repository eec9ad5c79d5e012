//! `aishell`: one binary, every role (ARCHITECTURE.md).

mod bench;
mod chat;
mod data_dir;
mod image;
mod logging;
mod prefault;
mod report;
mod serve;
mod settings;
mod store_cmd;
mod token;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "aishell",
    version,
    about = "Persistent, isolated AI-agent shells behind one gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: client WebSocket, runners, sessions, store.
    Serve(Box<serve::ServeArgs>),
    /// Open a chat session from the terminal (lines from stdin, replies to stdout).
    Chat(chat::ChatArgs),
    /// Create, list or revoke API tokens.
    Token(token::TokenArgs),
    /// Measure end-to-end latency from the client's side (starts a local gateway unless --url).
    Bench(bench::BenchArgs),
    /// The daily report from the gateway's JSON logs [default: today's, in the data directory].
    Report(report::ReportCommand),
    /// Build the Docker task image from this binary (EXECUTION_MODE=docker).
    Image(image::ImageArgs),
    /// Sandbox hours per user (the basis of weekly quotas).
    Usage(token::UsageArgs),
    /// Store maintenance: copy a SQLite store into PostgreSQL.
    Store(store_cmd::StoreArgs),
    /// The supervisor inside a sandbox (started by a backend, not by hand).
    Runner,
    /// Run a built-in agent on stdin/stdout (started by the runner).
    Agent {
        /// Agent kind: echo, shell, llm or claude.
        kind: String,
        /// Started ahead of its claim: wait for `init`, take the user's
        /// identity (`run_as`) and workspace it names, then start.
        #[arg(long)]
        await_init: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // One rustls crypto provider for every HTTPS client in the process
    // (model endpoints); chosen explicitly so no dependency can make it ambiguous.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A warm runner's mount namespace must be entered while this process
    // still has one thread (mount namespaces are per thread).
    let warm_runner = matches!(cli.command, Command::Runner)
        && std::env::var("AISHELL_TASK_MODE").as_deref() == Ok("warm");
    let workspace_slot =
        warm_runner.then(aishell_runner::prestart::WorkspaceSlot::enter_private_namespace);
    if warm_runner {
        // Refills run on CPU nothing else wants, until ready to be claimed.
        aishell_runner::priority::idle_until_ready();
        prefault::populate_executable();
    }
    // `serve` settles its settings, data directory and logger while the
    // process still has one thread (it hands its console form to runners
    // in the environment).
    let mut cli = cli;
    let mut serve_prepared = None;
    if let Command::Serve(args) = &mut cli.command {
        let args = std::mem::take(args.as_mut());
        match serve::prepare(args) {
            Ok(p) => serve_prepared = Some(p),
            Err(e) => {
                eprintln!("aishell: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let runtime = match cli.command {
        // Agents and runners are small; keep their footprint small too.
        // Blocking-pool threads (a terminal's stdio, tools) otherwise exit
        // after 10 s idle, and a warm agent claimed after a minute in the
        // pool would pay for new threads in the middle of its first reply.
        Command::Agent { .. } | Command::Runner => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_keep_alive(std::time::Duration::from_secs(24 * 3600))
            .build(),
        // The load generator shares the machine with the gateway it
        // measures: one thread keeps its own cost (and cross-thread
        // wake-ups) out of the figures as far as possible.
        Command::Bench(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
    .expect("tokio runtime");
    // An agent started ahead of its claim waits for `init` here, with its
    // runtime and logging already set up (so the claim does not pay for
    // them) and still on one thread (a current-thread runtime starts none
    // until used): the identity change must be the whole process's.
    if matches!(cli.command, Command::Agent { .. }) {
        logging::init("aishell-agent", logging::Target::Stderr);
    }
    let already_read = match &cli.command {
        Command::Agent {
            kind,
            await_init: true,
        } => {
            if let Err(e) = aishell_agents::check_kind(kind) {
                eprintln!("aishell: {e}");
                return std::process::ExitCode::FAILURE;
            }
            prefault::populate_executable();
            match aishell_agents::await_init() {
                Ok(Some(bytes)) => bytes,
                // Stopped before any claim.
                Ok(None) => return std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("aishell: {e:#}");
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
        _ => Vec::new(),
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(_) => match serve_prepared {
                Some(prepared) => serve::run(prepared).await,
                None => unreachable!("serve is prepared above"),
            },
            Command::Chat(args) => chat::run(args).await,
            Command::Token(args) => token::run(args).await,
            Command::Usage(args) => token::usage(args).await,
            Command::Store(args) => store_cmd::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Report(args) => report::run(args).await,
            Command::Image(args) => image::run(args).await,
            Command::Runner => {
                logging::init("aishell-runner", logging::Target::Stdout);
                let mut cfg = aishell_runner::RunnerConfig::from_env()?;
                match workspace_slot {
                    Some(Ok(slot)) => cfg.workspace_slot = Some(slot),
                    Some(Err(reason)) => {
                        tracing::info!(event = "agent_prestart_unavailable", taskId = %cfg.task_id, reason = %reason, "agents under bubblewrap start at claim time")
                    }
                    None => {}
                }
                aishell_runner::run(cfg).await.map_err(anyhow::Error::from)
            }
            Command::Agent { kind, .. } => aishell_agents::run_stdio(&kind, already_read).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aishell: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
