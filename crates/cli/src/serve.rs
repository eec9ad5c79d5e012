//! `aishell serve`: the gateway with embedded defaults (SQLite, process
//! backend, the shell agent) and a ready-to-use URL printed at start-up;
//! on a terminal, a short summary (data directory, backend, agent, logs)
//! and then only warnings and errors.

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

use crate::data_dir::{self, DataDir};
use crate::logging;
use crate::settings::ServeSettings;

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML file with any of the options below (flags and environment win).
    #[arg(long, env = "AISHELL_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: ServeSettings,
}

/// What `serve` settles before its runtime starts (still one thread).
pub struct Prepared {
    settings: ServeSettings,
    data_dir: DataDir,
    console: logging::ConsoleFormat,
    log_dir: Option<PathBuf>,
}

/// Read the settings, find and create the data directory, install the
/// logger. Runs before the runtime starts: the console form is handed to
/// the runners (local processes sharing this terminal) in the environment,
/// which may only be changed while the process has one thread.
pub fn prepare(args: ServeArgs) -> anyhow::Result<Prepared> {
    limit_malloc_arenas();
    let mut settings = args.settings;
    let config = data_dir::config_file(args.config.as_deref());
    if let Some(path) = &config {
        settings.merge_file(path)?;
    }
    let data_dir = data_dir::locate(settings.data_dir.as_deref(), config.as_deref())?;
    settings.data_dir = Some(data_dir.path.clone());
    data_dir.create_private()?;
    let console = settings.console_format()?;
    let log_dir = settings.log_dir(&data_dir.path);
    logging::init_gateway("aishell-gateway", console, log_dir.as_deref())?;
    if console == logging::ConsoleFormat::Human {
        // SAFETY: called from `main` before any other thread exists.
        unsafe { std::env::set_var(logging::CONSOLE_FORMAT_ENV, "human") };
    }
    Ok(Prepared {
        settings,
        data_dir,
        console,
        log_dir,
    })
}

pub async fn run(prepared: Prepared) -> anyhow::Result<()> {
    let Prepared {
        settings,
        data_dir,
        console,
        log_dir,
    } = prepared;
    let mut cfg = settings.gateway_config()?;
    cfg.log_dir = log_dir.clone();
    let sandbox = match settings.execution_mode()? {
        "process" => match settings.sandbox_mode()? {
            "bwrap" => match aishell_runner::sandbox::bwrap_available() {
                Ok(()) => "bubblewrap",
                Err(e) => {
                    single_user_fallback(&settings, &mut cfg, &e.to_string())?;
                    "none: bubblewrap is not installed (single user only)"
                }
            },
            _ => {
                tracing::warn!(
                    event = "sandbox_disabled",
                    "AGENTS RUN UNCONFINED: every agent can read and write every user's workspace (--insecure-no-sandbox / --sandbox none)"
                );
                "none (--insecure-no-sandbox)"
            }
        },
        _ => "per-user UID in each container",
    };
    let store = aishell_store::open(&settings.database_url())
        .await
        .context("cannot open the store")?;
    let db = data_dir.path.join("aishell.db");
    data_dir::make_private_files(&[
        db.clone(),
        db.with_extension("db-wal"),
        db.with_extension("db-shm"),
    ])?;
    let backend: Arc<dyn Backend> = match settings.execution_mode()? {
        "process" => {
            let program = runner_program()?;
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
        #[cfg(feature = "ecs")]
        "ecs" => {
            let instance_id = instance_id(&cfg.data_dir.join("ecs-backend"))?;
            let ecs_cfg = settings.ecs_config(instance_id)?;
            let backend = aishell_backend_ecs::EcsBackend::connect(ecs_cfg).await?;
            let backend = Arc::new(backend);
            start_ecs_permission_check(backend.clone());
            backend
        }
        #[cfg(feature = "kubernetes")]
        "kubernetes" => {
            let instance_id = match &settings.kube_instance_id {
                Some(id) => id.clone(),
                None => instance_id(&cfg.data_dir.join("kubernetes-backend"))?,
            };
            let kube_cfg = settings.kubernetes_config(instance_id)?;
            Arc::new(aishell_backend_kubernetes::KubernetesBackend::new(kube_cfg))
        }
        other => bail!(
            "EXECUTION_MODE={other} is not available in this build; use process or docker (kubernetes and ecs need their cargo features)"
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
    let agent = cfg.agent.kind.clone();
    let model_endpoint = model_endpoint(&settings, &cfg);
    let gateway = Gateway::bind(cfg, store.clone(), backend).await?;
    let token = startup_token(store.as_ref(), &data_dir.path, &user).await?;
    let addr = display_addr(gateway.local_addr());
    // The one bare print: the start-up banner with a working URL (its
    // first line's form is what scripts and tests read).
    if console == logging::ConsoleFormat::Json {
        println!(
            "aishell is ready: http://{addr}/?token={token}  (terminal: aishell chat --url ws://{addr}/ws --token {token})"
        );
    } else {
        println!("aishell is ready: http://{addr}/?token={token}");
        let summary = Summary {
            ws_url: format!("ws://{addr}/ws"),
            token: &token,
            data_dir: &data_dir,
            backend: settings.execution_mode()?,
            sandbox,
            agent: &agent,
            log_dir: log_dir.as_deref(),
        };
        print!("{summary}");
    }
    tracing::info!(
        event = "gateway_started",
        port = gateway.local_addr().port(),
        dataDir = %data_dir.path.display(),
        "gateway listening"
    );
    if let Some(endpoint) = model_endpoint {
        tokio::spawn(check_model_endpoint(endpoint));
    }
    gateway.serve(shutdown_signal()).await
}

/// What a person at the terminal needs after the URL.
struct Summary<'a> {
    ws_url: String,
    token: &'a str,
    data_dir: &'a DataDir,
    backend: &'a str,
    sandbox: &'a str,
    agent: &'a str,
    log_dir: Option<&'a Path>,
}

impl std::fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let agent = match self.agent {
            "shell" => "shell: each message runs as a shell command in your workspace (no model)",
            "echo" => "echo: repeats each message (no model)",
            "llm" => "llm: a tool-using loop against the configured model endpoint",
            "claude" => "claude: Claude Code",
            other => other,
        };
        let logs = match self.log_dir {
            Some(dir) => format!(
                "{} (JSON, a file per UTC day; `aishell report` reads them)",
                dir.display()
            ),
            None => "not written to files (--log-file none)".to_string(),
        };
        writeln!(f)?;
        writeln!(
            f,
            "  terminal chat   aishell chat --url {} --token {}",
            self.ws_url, self.token
        )?;
        writeln!(
            f,
            "  data directory  {} ({})",
            self.data_dir.path.display(),
            self.data_dir.origin
        )?;
        writeln!(
            f,
            "  backend         {} (sandbox: {})",
            self.backend, self.sandbox
        )?;
        writeln!(f, "  agent           {agent}")?;
        writeln!(f, "  logs            {logs}")?;
        writeln!(
            f,
            "  console         warnings and errors only (--log-format json prints every line); Ctrl-C stops"
        )?;
        writeln!(f)
    }
}

/// The model endpoint the llm agent will call, if any (checked once at
/// start-up so a wrong URL shows before the first message fails).
fn model_endpoint(
    settings: &crate::settings::ServeSettings,
    cfg: &aishell_gateway::GatewayConfig,
) -> Option<String> {
    if cfg.agent.kind != "llm" {
        return None;
    }
    cfg.model_providers
        .iter()
        .find(|p| p.name == "openai")
        .map(|p| p.upstream.clone())
        .or_else(|| settings.llm_base_url.clone())
}

/// Warn when nothing answers at the model endpoint's address (a TCP
/// connection, nothing sent: no key, no cost).
async fn check_model_endpoint(endpoint: String) {
    let target = url::Url::parse(&endpoint).ok().and_then(|u| {
        let host = u.host_str()?.to_string();
        Some((host, u.port_or_known_default()?))
    });
    let Some((host, port)) = target else {
        tracing::warn!(event = "model_endpoint_invalid", endpoint = %endpoint, "the llm agent's endpoint is not a URL; its turns will fail");
        return;
    };
    let connect = tokio::net::TcpStream::connect((host.as_str(), port));
    let error = match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 5 s".to_string(),
    };
    tracing::warn!(
        event = "model_endpoint_unreachable",
        endpoint = %endpoint,
        error = %error,
        "the llm agent's model endpoint does not answer; its turns will fail until it does"
    );
}

/// This gateway's identity on the Docker engine or the cluster (the
/// instance label): generated once and kept in the data dir, so a restarted gateway
/// lists, adopts or removes the containers its predecessor started.
fn instance_id(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("instance-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let id = format!("gw-{}", uuid::Uuid::new_v4().simple());
    aishell_gateway::credential::write_private(&path, id.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
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

/// Check at start-up, in one line, that this gateway may call every ECS
/// action it needs (logged, not fatal: `/ready` and each start say it too).
#[cfg(feature = "ecs")]
fn start_ecs_permission_check(backend: Arc<aishell_backend_ecs::EcsBackend>) {
    tokio::spawn(async move {
        match backend.check_permissions().await {
            Ok(()) => tracing::info!(
                event = "ecs_backend_ready",
                cluster = %backend.config().cluster,
                taskDefinition = %backend.config().task_definition,
                "ecs backend may run, describe, list and stop its tasks"
            ),
            Err(e) => tracing::error!(
                event = "ecs_backend_unavailable",
                error = %e,
                "ecs backend cannot start tasks; sessions will fail with TASK_START_FAILED until it can"
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

/// What the process backend runs as runner (and the runner as agent):
/// `aishell-sandbox` beside this binary, which links only those roles and
/// so costs each of a cold start's two execs less (`sandbox_roles.rs`); this
/// binary itself where it is missing (a copy of `aishell` alone).
fn runner_program() -> anyhow::Result<std::path::PathBuf> {
    let this = std::env::current_exe().context("cannot locate the aishell binary for runners")?;
    let sandbox = this.with_file_name("aishell-sandbox");
    if sandbox.is_file() {
        return Ok(sandbox);
    }
    tracing::info!(event = "sandbox_binary_missing", expected = %sandbox.display(), "runners run as `aishell runner` (install aishell-sandbox beside aishell for cheaper starts)");
    Ok(this)
}

/// One glibc malloc arena per core, not eight: each tokio worker that ever
/// met contention got an arena of its own, and freed memory stays in
/// whichever arena it came from, so a gateway at rest after a busy period
/// held megabytes more than before it (the soak's RSS check).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_ARENA_MAX: libc::c_int = -8;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        // SAFETY: a plain setting of the allocator, before other threads start.
        unsafe { libc::mallopt(M_ARENA_MAX, cores.clamp(1, 64) as libc::c_int) };
    }
}
