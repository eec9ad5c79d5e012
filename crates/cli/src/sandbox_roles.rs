//! The two roles that run inside a sandbox: the runner (supervisor) and a
//! built-in agent. Both the `aishell` binary (`aishell runner`, `aishell
//! agent`: container images carry only it) and the small `aishell-sandbox`
//! binary (the process backend's runners and agents) run them from here.
//!
//! Why a second binary: every runner and agent is an exec, and the dynamic
//! loader relocates the whole executable before `main` (the full `aishell`,
//! with the gateway, the stores and every backend's SDK, had ~38k
//! relocations). A binary that links only these two roles is a fraction of
//! that, and a cold start pays for two execs.

use std::process::ExitCode;

/// A sandbox role.
pub enum Role {
    Runner,
    Agent { kind: String, await_init: bool },
}

/// Run a role to the end (the process's whole life).
pub fn run(role: Role) -> ExitCode {
    // One rustls crypto provider for every HTTPS client in the process
    // (model endpoints); chosen explicitly so no dependency can make it ambiguous.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A warm runner's mount namespace must be entered while this process
    // still has one thread (mount namespaces are per thread).
    let warm_runner =
        matches!(role, Role::Runner) && std::env::var("AISHELL_TASK_MODE").as_deref() == Ok("warm");
    let workspace_slot =
        warm_runner.then(aishell_runner::prestart::WorkspaceSlot::enter_private_namespace);
    if warm_runner {
        // Refills run on CPU nothing else wants, until ready to be claimed.
        aishell_runner::priority::idle_until_ready();
        crate::prefault::populate_executable();
    }
    // Agents and runners are small; keep their footprint small too.
    // Blocking-pool threads (a terminal's stdio, tools) otherwise exit
    // after 10 s idle, and a warm agent claimed after a minute in the
    // pool would pay for new threads in the middle of its first reply.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(std::time::Duration::from_secs(24 * 3600))
        .build()
        .expect("tokio runtime");
    // An agent started ahead of its claim waits for `init` here, with its
    // runtime and logging already set up (so the claim does not pay for
    // them) and still on one thread (a current-thread runtime starts none
    // until used): the identity change must be the whole process's.
    let already_read = match &role {
        Role::Agent { kind, await_init } => {
            crate::logging::init("aishell-agent", crate::logging::Target::Stderr);
            if *await_init {
                if let Err(e) = aishell_agents::check_kind(kind) {
                    eprintln!("aishell: {e}");
                    return ExitCode::FAILURE;
                }
                crate::prefault::populate_executable();
                match aishell_agents::await_init() {
                    Ok(Some(bytes)) => bytes,
                    // Stopped before any claim.
                    Ok(None) => return ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("aishell: {e:#}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                Vec::new()
            }
        }
        Role::Runner => Vec::new(),
    };
    let result: anyhow::Result<()> = runtime.block_on(async move {
        match role {
            Role::Runner => {
                crate::logging::init("aishell-runner", crate::logging::Target::Stdout);
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
            Role::Agent { kind, .. } => aishell_agents::run_stdio(&kind, already_read).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aishell: {e:#}");
            ExitCode::FAILURE
        }
    }
}
