//! `aishell store copy` as a user runs it: the real binary (built with the
//! `postgres` feature) copies a SQLite install made by `aishell token
//! create` into PostgreSQL, twice; the token then verifies there.
//!
//! Skips, saying why, when no PostgreSQL is installed and
//! `AISHELL_TEST_DATABASE_URL` names no server.
#![cfg(feature = "postgres")]

#[path = "../../store/tests/support/postgres.rs"]
mod postgres;

use std::process::Command;

fn aishell(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_aishell"))
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .expect("running aishell");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "aishell {args:?}: {stderr}");
    (stdout, stderr)
}

/// Whether the tests have a PostgreSQL: a server named, or one to start.
fn postgres_available() -> bool {
    std::env::var(postgres::URL_VAR).is_ok_and(|url| !url.is_empty())
        || std::env::var_os("AISHELL_PG_BIN").is_some()
        || std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .any(|v| v.path().join("bin/initdb").is_file())
        || Command::new("pg_config").arg("--bindir").output().is_ok()
}

#[tokio::test]
async fn store_copy_moves_an_install_to_postgres() {
    if !postgres_available() {
        eprintln!(
            "skipped: no PostgreSQL installed and {} unset",
            postgres::URL_VAR
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let from = format!("sqlite://{}", dir.path().join("aishell.db").display());
    let (token, _) = aishell(&[
        "token",
        "create",
        "--user",
        "alice",
        "--database-url",
        &from,
    ]);
    let token = token.trim();
    let target = postgres::TestDatabase::create().await;

    let (first, _) = aishell(&["store", "copy", "--from", &from, "--to", &target.url]);
    let tokens_line = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("tokens "))
            .unwrap_or_else(|| panic!("no tokens line in {out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(tokens_line(&first), "tokens 1 copied 0 already there");
    let (second, stderr) = aishell(&["store", "copy", "--from", &from, "--to", &target.url]);
    assert_eq!(tokens_line(&second), "tokens 0 copied 1 already there");
    assert!(stderr.contains("done"), "{stderr}");

    let store = aishell_store::open(&target.url).await.unwrap();
    let record = store
        .verify_token(token)
        .await
        .unwrap()
        .expect("token copied");
    assert_eq!(record.user_id, "alice");
}
