//! `aishell token create|list|revoke`: opaque API tokens, stored hashed.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::data_dir;
use crate::settings::{ServeSettings, parse_duration};

#[derive(Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
    #[command(flatten)]
    store: StoreArgs,
}

/// Which gateway's store a command works on: found as `serve` finds its
/// data directory (data_dir.rs), never created here.
#[derive(Args)]
pub struct StoreArgs {
    /// Data directory of the gateway [default: from AISHELL_DATA_DIR, the config file, then ./aishell-data].
    #[arg(long, env = "AISHELL_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// The config file `serve` reads (for its `data_dir`) [default: ~/.config/aishell/aishell.toml if it exists].
    #[arg(long, env = "AISHELL_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Store location [default: sqlite://<data-dir>/aishell.db].
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
}

impl StoreArgs {
    /// Open the store of an existing gateway, saying which one on stderr.
    async fn open(self) -> anyhow::Result<std::sync::Arc<dyn aishell_store::Store>> {
        let url = match self.database_url {
            Some(url) => url,
            None => {
                let config = data_dir::config_file(self.config.as_deref());
                let found = data_dir::locate(self.data_dir.as_deref(), config.as_deref())?
                    .existing(config.as_deref())?;
                found.announce();
                ServeSettings {
                    data_dir: Some(found.path),
                    ..Default::default()
                }
                .database_url()
            }
        };
        Ok(aishell_store::open(&url).await?)
    }
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (shown once; only its hash is stored).
    Create {
        #[arg(long)]
        user: String,
        /// Label shown by `token list`.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Grant the admin role (see every session and the pool).
        #[arg(long)]
        admin: bool,
        /// Expire after this long (e.g. 30d, 12h).
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// List tokens (ids, never the secrets).
    List {
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a token by id.
    Revoke { id: String },
}

/// `aishell usage`: sandbox hours per user.
#[derive(Args)]
pub struct UsageArgs {
    /// Only this user.
    #[arg(long)]
    user: Option<String>,
    /// Period to sum over (e.g. 7d, 24h).
    #[arg(long, default_value = "7d")]
    since: String,
    #[command(flatten)]
    store: StoreArgs,
}

pub async fn usage(args: UsageArgs) -> anyhow::Result<()> {
    let store = args.store.open().await?;
    let since = time::OffsetDateTime::now_utc() - parse_duration(&args.since)?;
    println!("user\thours\ttasks");
    for row in store.usage_since(since, args.user.as_deref()).await? {
        println!(
            "{}\t{:.4}\t{}",
            row.user_id,
            row.seconds as f64 / 3600.0,
            row.tasks
        );
    }
    Ok(())
}

pub async fn run(args: TokenArgs) -> anyhow::Result<()> {
    let store = args.store.open().await?;
    match args.command {
        TokenCommand::Create {
            user,
            name,
            admin,
            expires_in,
        } => {
            aishell_gateway::auth::validate_user_id(&user)
                .map_err(|e| anyhow::anyhow!("--user: {e}"))?;
            let expires_at = match expires_in {
                Some(d) => Some(time::OffsetDateTime::now_utc() + parse_duration(&d)?),
                None => None,
            };
            let (_, token) = store.create_token(&user, &name, admin, expires_at).await?;
            println!("{token}");
        }
        TokenCommand::List { user } => {
            for t in store.list_tokens(user.as_deref()).await? {
                let expires = t
                    .expires_at
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "never".into());
                let state = if t.revoked { "revoked" } else { "active" };
                println!(
                    "{}\t{}\t{}\t{}\t{}expires {}",
                    t.id,
                    t.user_id,
                    t.name,
                    state,
                    if t.is_admin { "admin\t" } else { "" },
                    expires
                );
            }
        }
        TokenCommand::Revoke { id } => {
            if !store.revoke_token(&id).await? {
                bail!("no token with id {id}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}
