//! What the cluster's sessions ask of PostgreSQL: `pg_stat_statements`
//! counts every statement the gateways run, so the bench can say how many
//! a session costs and which ones. The throwaway server preloads the
//! module; a server given with `--database-url` is read only if it has it.

use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// Statements listed in the report, most executed first.
const TOP: i64 = 8;

/// Forget what was counted so far (the warm-up's statements). `None`:
/// the server does not count statements.
pub async fn reset(url: &str) -> Option<()> {
    let mut conn = PgConnection::connect(url).await.ok()?;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&mut conn)
        .await
        .ok()?;
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&mut conn)
        .await
        .ok()?;
    Some(())
}

/// Statements since `reset`, per session: `{ per_session, top: [ { query,
/// per_session, mean_ms } ] }`, or null when they were not counted.
pub async fn per_session(url: &str, sessions: usize) -> Value {
    let Some(rows) = read(url).await else {
        return Value::Null;
    };
    let sessions = sessions.max(1) as f64;
    let round = |x: f64| (x * 100.0).round() / 100.0;
    let total: i64 = rows.iter().map(|(_, calls, _)| calls).sum();
    let top: Vec<Value> = rows
        .iter()
        .take(TOP as usize)
        .map(|(query, calls, mean_ms)| {
            let query: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
            json!({
                "query": query.chars().take(100).collect::<String>(),
                "per_session": round(*calls as f64 / sessions),
                "mean_ms": round(*mean_ms * 1000.0) / 1000.0,
            })
        })
        .collect();
    json!({ "per_session": round(total as f64 / sessions), "top": top })
}

async fn read(url: &str) -> Option<Vec<(String, i64, f64)>> {
    let mut conn = PgConnection::connect(url).await.ok()?;
    // The bench's own statements (this connection's) are left out by text.
    sqlx::query_as(
        "SELECT query, calls, mean_exec_time FROM pg_stat_statements \
         WHERE query NOT ILIKE '%pg_stat_statements%' ORDER BY calls DESC",
    )
    .fetch_all(&mut conn)
    .await
    .ok()
}
