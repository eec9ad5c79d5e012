//! `aishell store copy`: move an install's SQLite store into PostgreSQL
//! (ARCHITECTURE.md, "Store"). Needs the `postgres` feature of this crate.

use clap::{Args, Subcommand};

#[derive(Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    command: StoreCommand,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy every row of a SQLite store into a PostgreSQL database (stop the
    /// gateway first). Idempotent: run it again after an interruption.
    Copy {
        /// The SQLite store, opened read-only: sqlite://PATH.
        #[arg(long)]
        from: String,
        /// The PostgreSQL database: empty, or filled by a copy of the same source.
        #[arg(long)]
        to: String,
        /// Rows per statement.
        #[arg(long, default_value_t = 1000)]
        batch_rows: usize,
    },
}

pub async fn run(args: StoreArgs) -> anyhow::Result<()> {
    match args.command {
        StoreCommand::Copy {
            from,
            to,
            batch_rows,
        } => copy(&from, &to, batch_rows).await,
    }
}

#[cfg(feature = "postgres")]
async fn copy(from: &str, to: &str, batch_rows: usize) -> anyhow::Result<()> {
    use aishell_store::copy;

    // A line per table when it is done, and one every this many batches
    // while a big table is being copied.
    const BATCHES_PER_PROGRESS_LINE: u64 = 20;
    let batch = batch_rows.max(1) as u64;
    eprintln!(
        "copying {} into {}",
        aishell_store::redact_password(from),
        aishell_store::redact_password(to)
    );
    let result = copy::sqlite_to_postgres(from, to, batch_rows, |p| {
        let rows = p.copied + p.already_there;
        if p.done {
            println!(
                "{:<15} {:>10} copied {:>10} already there",
                p.table.name(),
                p.copied,
                p.already_there
            );
        } else if rows % (batch * BATCHES_PER_PROGRESS_LINE) == 0 {
            eprintln!("{}: {rows} rows so far", p.table.name());
        }
    })
    .await;
    match result {
        Ok(_) => {
            eprintln!("done: the target holds every row of the source");
            Ok(())
        }
        Err(e) => anyhow::bail!("{}: {e}", e.code()),
    }
}

#[cfg(not(feature = "postgres"))]
async fn copy(_from: &str, _to: &str, _batch_rows: usize) -> anyhow::Result<()> {
    anyhow::bail!(
        "STORE_COPY_NO_POSTGRES: this build has no PostgreSQL support: rebuild with \
         `cargo install --locked --path crates/cli --features postgres`"
    )
}
