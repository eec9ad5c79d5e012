//! `aishell serve`: the gateway with embedded defaults (SQLite, process
//! backend, the shell agent) and a ready-to-use URL printed at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aishell_backend::Backend;
use aishell_backend_docker::DockerBackend;
use aishell_backend_process::{ProcessBackend, ProcessBackendConfig};
use aishell_gateway::Gateway;
use aishell_store::Store;
use anyhow::{Context, bail};
use clap::Args;

use crate::logging;
use crate::settings::ServeSettings;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML file with any of the options below (flags and environment win).
    #[arg(long, env = "AISHELL_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: ServeSettings,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut settings = args.settings;
    if let Some(path) = &args.config {
        settings.merge_file(path)?;
    }
    let mut cfg = settings.gateway_config()?;
    let log_dir = (settings.log_file == Some(true)).then(|| cfg.data_dir.join("logs"));
    logging::try_init(
        "aishell-gateway",
        logging::Target::Stdout,
        log_dir.as_deref(),
    )?;
    if settings.execution_mode()? == "process" {
        match settings.sandbox_mode()? {
            "bwrap" => {
                if let Err(e) = aishell_runner::sandbox::bwrap_available() {
                    single_user_fallback(&settings, &mut cfg, &e.to_string())?;
                }
            }
            _ => tracing::warn!(
                event = "sandbox_disabled",
                "AGENTS RUN UNCONFINED: every agent can read and write every user's workspace (--insecure-no-sandbox / --sandbox none)"
            ),
        }
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let store = aishell_store::open(&settings.database_url())
        .await
        .context("cannot open the store")?;
    let backend: Arc<dyn Backend> = match settings.execution_mode()? {
        "process" => {
            let program =
                std::env::current_exe().context("cannot locate the aishell binary for runners")?;
            let backend_cfg = ProcessBackendConfig::new(
                program,
                cfg.workspaces_root.clone(),
                cfg.data_dir.join("process-backend"),
            );
            let backend =
                ProcessBackend::new(backend_cfg).context("cannot start the process backend")?;
            if let Some(bytes) = settings.workspace_quota_bytes()? {
                let images = cfg.data_dir.join("quota");
                backend.set_workspace_quota(aishell_backend_process::quota::WorkspaceQuota::new(
                    bytes, images,
                )?);
            }
            Arc::new(backend)
        }
        "docker" => {
            let instance_id = instance_id(&cfg.data_dir.join("docker-backend"))?;
            let docker_cfg = settings.docker_config(instance_id, &cfg.workspaces_root)?;
            std::fs::create_dir_all(&cfg.workspaces_root)
                .with_context(|| format!("cannot create {}", cfg.workspaces_root.display()))?;
            let backend = Arc::new(DockerBackend::new(docker_cfg));
            start_docker_housekeeping(backend.clone());
            backend
        }
        other => bail!(
            "EXECUTION_MODE={other} is not available in this build yet; use process or docker"
        ),
    };
    // Test hook: reproduce backend failures (see aishell_backend::faults).
    let backend: Arc<dyn Backend> = match std::env::var_os("AISHELL_TEST_FAULTS_FILE") {
        Some(file) => {
            tracing::warn!(event = "faults_enabled", file = %file.to_string_lossy(), "backend fault injection is on (test mode)");
            Arc::new(aishell_backend::faults::FaultyBackend::new(
                backend,
                file.into(),
            ))
        }
        None => backend,
    };
    let user = settings.user().to_string();
    aishell_gateway::auth::validate_user_id(&user).map_err(|e| anyhow::anyhow!("--user: {e}"))?;
    let data_dir = cfg.data_dir.clone();
    let gateway = Gateway::bind(cfg, store.clone(), backend).await?;
    let token = startup_token(store.as_ref(), &data_dir, &user).await?;
    let addr = display_addr(gateway.local_addr());
    // The one bare print (SPEC §8.1): the start-up banner with a working URL.
    println!(
        "aishell is ready: http://{addr}/?token={token}  (terminal: aishell chat --url ws://{addr}/ws --token {token})"
    );
    tracing::info!(
        event = "gateway_started",
        port = gateway.local_addr().port(),
        "gateway listening"
    );
    gateway.serve(shutdown_signal()).await
}

/// This gateway's identity on the Docker engine (the `aishell.instance`
/// label): generated once and kept in the data dir, so a restarted gateway
/// lists, adopts or removes the containers its predecessor started.
fn instance_id(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("instance-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let id = format!("gw-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(&path, &id).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// Check the engine and the image at start-up (logged, not fatal: the
/// gateway still answers clients with a clear `TASK_START_FAILED`), and
/// remove containers of this instance that already exited. Running ones are
/// left for the gateway's adoption scan.
fn start_docker_housekeeping(backend: Arc<DockerBackend>) {
    tokio::spawn(async move {
        match backend.remove_exited().await {
            Ok(n) => tracing::info!(
                event = "docker_backend_ready",
                image = %backend.config().image,
                removed_exited = n,
                "docker backend connected to the engine"
            ),
            Err(e) => tracing::error!(
                event = "docker_backend_unavailable",
                error = %e,
                "docker backend cannot reach the engine; sessions will fail with TASK_START_FAILED until it is back"
            ),
        }
    });
}

/// The token printed at start-up, kept in the data dir (0600) so a restart
/// does not log out open browsers. Recreated if revoked or missing.
async fn startup_token(store: &dyn Store, data_dir: &Path, user: &str) -> anyhow::Result<String> {
    let path = data_dir.join("startup-token");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim();
        let record = store.verify_token(existing).await?;
        if record.is_some_and(|r| r.user_id == user) {
            return Ok(existing.to_string());
        }
    }
    let (_, token) = store.create_token(user, "startup", true, None).await?;
    aishell_gateway::credential::write_private(&path, token.as_bytes())?;
    Ok(token)
}

fn display_addr(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(event = "gateway_stopping", "shutting down: stopping tasks");
}

/// Without bubblewrap, a fresh machine still gets a working `serve`: agents
/// run unconfined and only the local user may connect, so no agent can reach
/// another user's workspace. Refused when bwrap was asked for explicitly or
/// other users' workspaces already exist.
fn single_user_fallback(
    settings: &ServeSettings,
    cfg: &mut aishell_gateway::GatewayConfig,
    why: &str,
) -> anyhow::Result<()> {
    let user = settings.user().to_string();
    let refuse = |reason: &str| {
        anyhow::anyhow!(
            "{why}.\n{reason} Install bubblewrap (apt-get install bubblewrap), or accept the risk with --insecure-no-sandbox (single-user machines only)."
        )
    };
    if settings.sandbox.as_deref() == Some("bwrap") {
        return Err(refuse("--sandbox bwrap was asked for explicitly."));
    }
    let others: Vec<String> = std::fs::read_dir(&cfg.workspaces_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| *name != user && !name.starts_with('.'))
        .collect();
    if !others.is_empty() {
        return Err(refuse(&format!(
            "Workspaces of other users exist ({}); unconfined agents could read them.",
            others.join(", ")
        )));
    }
    tracing::warn!(event = "sandbox_unavailable", userId = %user, reason = %why, "bubblewrap is not installed: agents run unconfined and only user {user} may connect; install bubblewrap to serve several users");
    cfg.sandbox = None;
    cfg.only_user = Some(user);
    Ok(())
}
