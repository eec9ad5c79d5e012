//! `aishell`: one binary, every role (ARCHITECTURE.md).

mod bench;
mod chat;
mod data_dir;
mod image;
mod logging;
mod prefault;
mod report;
mod sandbox_roles;
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
    match cli.command {
        Command::Runner => return sandbox_roles::run(sandbox_roles::Role::Runner),
        Command::Agent { kind, await_init } => {
            return sandbox_roles::run(sandbox_roles::Role::Agent { kind, await_init });
        }
        _ => {}
    }
    // One rustls crypto provider for every HTTPS client in the process
    // (model endpoints); chosen explicitly so no dependency can make it ambiguous.
    let _ = rustls::crypto::ring::default_provider().install_default();
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
            Command::Runner | Command::Agent { .. } => unreachable!("run above"),
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
