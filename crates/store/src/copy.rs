//! `aishell store copy`: an install's SQLite store copied into PostgreSQL
//! (ARCHITECTURE.md, "Store"), at the SQL level on both databases: every
//! table, every column, row by row as stored (token hashes, timestamps,
//! message ids and the conversations' creation order included).
//!
//! Idempotent: each batch is inserted with `ON CONFLICT DO NOTHING`, then
//! the target's rows under the batch's keys are read back and compared
//! with the source's in the same transaction, so a second run (or one after
//! an interrupted run) copies only what is missing, and a target row that
//! differs from the source's under the same key stops the copy before its
//! batch commits. A target may hold only rows of this source: a table with
//! more rows than the source's is refused.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Row};

use crate::StoreError;

/// Rows read, inserted and compared per statement.
pub const DEFAULT_BATCH_ROWS: usize = 1_000;

/// A table the copy moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Users,
    Tokens,
    Sessions,
    Conversations,
    Messages,
    SessionEvents,
    Usage,
}

impl Table {
    /// Every table, parents before the rows that reference them. Not the
    /// tables of several gateways (`gateways`, `session_leases`,
    /// `shared_secrets`, docs/cluster.md): they are runtime state, rebuilt
    /// by the gateways that run on the target (SQLite never has more than
    /// one).
    pub const ALL: [Table; 7] = [
        Table::Users,
        Table::Tokens,
        Table::Sessions,
        Table::Conversations,
        Table::Messages,
        Table::SessionEvents,
        Table::Usage,
    ];

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    fn spec(self) -> &'static TableSpec {
        match self {
            Table::Users => &USERS,
            Table::Tokens => &TOKENS,
            Table::Sessions => &SESSIONS,
            Table::Conversations => &CONVERSATIONS,
            Table::Messages => &MESSAGES,
            Table::SessionEvents => &SESSION_EVENTS,
            Table::Usage => &USAGE,
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the copy of one table stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableProgress {
    pub table: Table,
    /// Rows inserted into the target by this run.
    pub copied: u64,
    /// Rows the target already held, equal to the source's.
    pub already_there: u64,
    /// The whole table has been read.
    pub done: bool,
}

/// Why a copy stopped. Every variant has a stable code ([`CopyError::code`]).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("the source must be a sqlite://PATH URL, not `{0}`")]
    SourceUrl(String),
    #[error("the target must be a postgres:// URL, not `{0}`")]
    TargetUrl(String),
    #[error("cannot read the source database: {0}")]
    Source(StoreError),
    #[error(
        "the source database's schema is at migration {found}, this build's at {expected}: \
         copy with the aishell version of the gateway that wrote it (an older store is \
         brought up to date by starting this version's gateway on it once)"
    )]
    SourceSchema { found: i64, expected: i64 },
    #[error("cannot write the target database: {0}")]
    Target(StoreError),
    #[error("{table}: the target refused the batch starting at ({first_key}): {reason}")]
    TargetRefused {
        table: Table,
        first_key: String,
        reason: StoreError,
    },
    #[error(
        "{table} ({key}): the target holds a different row under this key ({difference}); \
         it was not filled by a copy of this source, nothing of this batch was written"
    )]
    Conflict {
        table: Table,
        /// `column=value, …` of the row's primary key.
        key: String,
        difference: String,
    },
    #[error(
        "{table}: the target holds {target_rows} rows, more than the source's {source_rows}: it holds \
         data of another install (copy into an empty database, or one a copy of this source filled)"
    )]
    ForeignRows {
        table: Table,
        target_rows: u64,
        source_rows: u64,
    },
}

impl CopyError {
    /// The stable code of this error, for scripts and logs.
    pub fn code(&self) -> &'static str {
        match self {
            CopyError::SourceUrl(_) | CopyError::TargetUrl(_) => "STORE_COPY_BAD_URL",
            CopyError::Source(_) => "STORE_COPY_SOURCE_FAILED",
            CopyError::SourceSchema { .. } => "STORE_COPY_SOURCE_SCHEMA",
            CopyError::Target(_) => "STORE_COPY_TARGET_FAILED",
            CopyError::TargetRefused { .. } => "STORE_COPY_TARGET_REFUSED",
            CopyError::Conflict { .. } => "STORE_COPY_CONFLICT",
            CopyError::ForeignRows { .. } => "STORE_COPY_FOREIGN_ROWS",
        }
    }
}

fn source_err(e: impl Into<StoreError>) -> CopyError {
    CopyError::Source(e.into())
}

fn target_err(e: impl Into<StoreError>) -> CopyError {
    CopyError::Target(e.into())
}

/// Copy the SQLite store `from` (`sqlite://PATH`, opened read-only: nothing
/// is written to it) into the PostgreSQL store `to` (migrated first), in
/// batches of `batch_rows`; `progress` hears each table's totals after each
/// batch and once more when the table is done. Returns every table's totals.
pub async fn sqlite_to_postgres(
    from: &str,
    to: &str,
    batch_rows: usize,
    mut progress: impl FnMut(&TableProgress),
) -> Result<Vec<TableProgress>, CopyError> {
    if !from.starts_with("sqlite:") || from.contains(":memory:") {
        return Err(CopyError::SourceUrl(crate::redact_password(from)));
    }
    if !crate::is_postgres_url(to) {
        return Err(CopyError::TargetUrl(crate::redact_password(to)));
    }
    let batch_rows = batch_rows.max(1);

    let options = SqliteConnectOptions::from_str(from)
        .map_err(source_err)?
        .read_only(true);
    let mut source = SqliteConnection::connect_with(&options)
        .await
        .map_err(source_err)?;
    check_source_schema(&mut source).await?;

    let options = PgConnectOptions::from_str(to).map_err(target_err)?;
    let target = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(target_err)?;
    crate::postgres::MIGRATOR
        .run(&target)
        .await
        .map_err(target_err)?;

    // One read transaction: every table from the same snapshot.
    let mut snapshot = source.begin().await.map_err(source_err)?;
    let mut source_counts = HashMap::new();
    for table in Table::ALL {
        let spec = table.spec();
        let source_rows = count_source(&mut snapshot, spec.name).await?;
        let target_rows = count_target(&target, spec.name).await?;
        if target_rows > source_rows {
            return Err(CopyError::ForeignRows {
                table,
                target_rows,
                source_rows,
            });
        }
        source_counts.insert(table, source_rows);
    }

    let mut report = Vec::new();
    for table in Table::ALL {
        let done = copy_table(&mut snapshot, &target, table, batch_rows, &mut progress).await?;
        let target_rows = count_target(&target, table.name()).await?;
        if target_rows != source_counts[&table] {
            return Err(CopyError::ForeignRows {
                table,
                target_rows,
                source_rows: source_counts[&table],
            });
        }
        report.push(done);
    }
    snapshot.rollback().await.map_err(source_err)?;
    source.close().await.map_err(source_err)?;
    target.close().await;
    Ok(report)
}

/// The source must have every migration this build knows (it cannot be
/// migrated here: it is opened read-only).
async fn check_source_schema(source: &mut SqliteConnection) -> Result<(), CopyError> {
    let expected = crate::sqlite::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    let found: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut *source)
            .await
            .map_err(source_err)?;
    let found = found.unwrap_or(0);
    if found != expected {
        return Err(CopyError::SourceSchema { found, expected });
    }
    Ok(())
}

async fn count_source(source: &mut SqliteConnection, table: &str) -> Result<u64, CopyError> {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    let rows: i64 = sqlx::query_scalar(&sql)
        .fetch_one(source)
        .await
        .map_err(source_err)?;
    Ok(rows as u64)
}

async fn count_target(target: &PgPool, table: &str) -> Result<u64, CopyError> {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    let rows: i64 = sqlx::query_scalar(&sql)
        .fetch_one(target)
        .await
        .map_err(target_err)?;
    Ok(rows as u64)
}

async fn copy_table(
    source: &mut SqliteConnection,
    target: &PgPool,
    table: Table,
    batch_rows: usize,
    progress: &mut impl FnMut(&TableProgress),
) -> Result<TableProgress, CopyError> {
    let spec = table.spec();
    let mut done = TableProgress {
        table,
        copied: 0,
        already_there: 0,
        done: false,
    };
    let mut after: Option<Vec<Value>> = None;
    loop {
        let rows = spec
            .read_batch(source, after.as_deref(), batch_rows)
            .await?;
        let Some(last) = rows.last() else { break };
        after = Some(spec.key_of(last));
        let inserted = spec.write_batch(target, &rows).await?;
        done.copied += inserted;
        done.already_there += rows.len() as u64 - inserted;
        progress(&done);
        if rows.len() < batch_rows {
            break;
        }
    }
    if let Some(identity) = spec.identity {
        // New rows the gateway inserts number on after the copied ones.
        let sql = format!(
            "SELECT setval(pg_get_serial_sequence('{table}', '{identity}'), \
             COALESCE(MAX({identity}), 1), MAX({identity}) IS NOT NULL) FROM {table}",
            table = spec.name
        );
        sqlx::query(&sql)
            .execute(target)
            .await
            .map_err(target_err)?;
    }
    done.done = true;
    progress(&done);
    Ok(done)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Int,
    Bool,
}

impl Kind {
    fn pg_array(self) -> &'static str {
        match self {
            Kind::Text => "TEXT[]",
            Kind::Int => "BIGINT[]",
            Kind::Bool => "BOOLEAN[]",
        }
    }
}

/// One stored value, as both databases hold it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Value {
    Text(Option<String>),
    Int(Option<i64>),
    Bool(Option<bool>),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Text(Some(s)) if s.chars().count() > 40 => {
                write!(f, "{:?}…", s.chars().take(40).collect::<String>())
            }
            Value::Text(Some(s)) => write!(f, "{s:?}"),
            Value::Int(Some(i)) => write!(f, "{i}"),
            Value::Bool(Some(b)) => write!(f, "{b}"),
            Value::Text(None) | Value::Int(None) | Value::Bool(None) => f.write_str("NULL"),
        }
    }
}

struct Column {
    name: &'static str,
    kind: Kind,
    /// How the SQLite source spells it, when not by its name.
    source: Option<&'static str>,
}

const fn col(name: &'static str, kind: Kind) -> Column {
    Column {
        name,
        kind,
        source: None,
    }
}

struct TableSpec {
    table: Table,
    name: &'static str,
    /// The primary key's columns first, then the rest.
    columns: &'static [Column],
    key_len: usize,
    /// An identity column given explicitly (`OVERRIDING SYSTEM VALUE`),
    /// whose sequence is moved past the copied values.
    identity: Option<&'static str>,
}

use Kind::{Bool, Int, Text};

static USERS: TableSpec = TableSpec {
    table: Table::Users,
    name: "users",
    columns: &[
        col("id", Text),
        col("is_admin", Bool),
        col("created_at", Int),
    ],
    key_len: 1,
    identity: None,
};

static TOKENS: TableSpec = TableSpec {
    table: Table::Tokens,
    name: "tokens",
    columns: &[
        col("id", Text),
        col("user_id", Text),
        col("name", Text),
        col("token_hash", Text),
        col("is_admin", Bool),
        col("created_at", Int),
        col("expires_at", Int),
        col("revoked_at", Int),
    ],
    key_len: 1,
    identity: None,
};

static SESSIONS: TableSpec = TableSpec {
    table: Table::Sessions,
    name: "sessions",
    columns: &[
        col("id", Text),
        col("user_id", Text),
        col("state", Text),
        col("created_at", Int),
        col("updated_at", Int),
        col("last_seq", Int),
        col("trace_id", Text),
        col("agent", Text),
        col("task_id", Text),
        col("runner_seq", Int),
    ],
    key_len: 1,
    identity: None,
};

static CONVERSATIONS: TableSpec = TableSpec {
    table: Table::Conversations,
    name: "conversations",
    columns: &[
        col("session_id", Text),
        col("id", Text),
        // SQLite's rowid is the creation order PostgreSQL's `position` keeps.
        Column {
            name: "position",
            kind: Int,
            source: Some("rowid"),
        },
        col("title", Text),
        col("resume_handle", Text),
        col("created_at", Int),
        col("updated_at", Int),
    ],
    key_len: 2,
    identity: Some("position"),
};

static MESSAGES: TableSpec = TableSpec {
    table: Table::Messages,
    name: "messages",
    columns: &[
        col("id", Int),
        col("session_id", Text),
        col("conversation_id", Text),
        col("client_msg_id", Text),
        col("role", Text),
        col("content", Text),
        col("created_at", Int),
    ],
    key_len: 1,
    identity: Some("id"),
};

static SESSION_EVENTS: TableSpec = TableSpec {
    table: Table::SessionEvents,
    name: "session_events",
    columns: &[
        col("session_id", Text),
        col("seq", Int),
        col("json", Text),
        col("created_at", Int),
    ],
    key_len: 2,
    identity: None,
};

static USAGE: TableSpec = TableSpec {
    table: Table::Usage,
    name: "usage",
    columns: &[
        col("task_id", Text),
        col("session_id", Text),
        col("user_id", Text),
        col("started_at", Int),
        col("ended_at", Int),
    ],
    key_len: 1,
    identity: None,
};

type RowValues = Vec<Value>;

impl TableSpec {
    fn key_columns(&self) -> &[Column] {
        &self.columns[..self.key_len]
    }

    fn key_of(&self, row: &[Value]) -> Vec<Value> {
        row[..self.key_len].to_vec()
    }

    fn describe_key(&self, key: &[Value]) -> String {
        self.key_columns()
            .iter()
            .zip(key)
            .map(|(c, v)| format!("{}={v}", c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Up to `limit` source rows whose key follows `after`, in key order.
    async fn read_batch(
        &self,
        source: &mut SqliteConnection,
        after: Option<&[Value]>,
        limit: usize,
    ) -> Result<Vec<RowValues>, CopyError> {
        let select = self
            .columns
            .iter()
            .map(|c| match c.source {
                Some(expr) => format!("{expr} AS {}", c.name),
                None => c.name.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let key = self
            .key_columns()
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ");
        let filter = match after {
            Some(_) => {
                let marks = vec!["?"; self.key_len].join(", ");
                format!("WHERE ({key}) > ({marks})")
            }
            None => String::new(),
        };
        let sql = format!(
            "SELECT {select} FROM {} {filter} ORDER BY {key} LIMIT {limit}",
            self.name
        );
        let mut query = sqlx::query(&sql);
        for value in after.unwrap_or_default() {
            query = match value {
                Value::Text(v) => query.bind(v.clone()),
                Value::Int(v) => query.bind(*v),
                Value::Bool(v) => query.bind(*v),
            };
        }
        let rows = query.fetch_all(&mut *source).await.map_err(source_err)?;
        rows.iter()
            .map(|row| {
                self.columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        Ok(match c.kind {
                            Text => Value::Text(row.try_get(i)?),
                            Int => Value::Int(row.try_get(i)?),
                            Bool => Value::Bool(row.try_get(i)?),
                        })
                    })
                    .collect::<Result<RowValues, sqlx::Error>>()
                    .map_err(source_err)
            })
            .collect()
    }

    /// Insert `rows` where their key is free, then check that the target
    /// holds exactly these rows under their keys; one transaction. Returns
    /// how many rows were inserted.
    async fn write_batch(&self, target: &PgPool, rows: &[RowValues]) -> Result<u64, CopyError> {
        let mut tx = target.begin().await.map_err(target_err)?;
        let unnest = |columns: &[Column]| {
            columns
                .iter()
                .enumerate()
                .map(|(i, c)| format!("${}::{}", i + 1, c.kind.pg_array()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let overriding = if self.identity.is_some() {
            "OVERRIDING SYSTEM VALUE"
        } else {
            ""
        };
        let insert = format!(
            "INSERT INTO {} ({}) {overriding} SELECT * FROM UNNEST({}) ON CONFLICT DO NOTHING",
            self.name,
            self.column_list(),
            unnest(self.columns)
        );
        let inserted = bind_columns(sqlx::query(&insert), self.columns, rows)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.batch_failed(rows, e))?
            .rows_affected();

        let key = self
            .key_columns()
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ");
        let read_back = format!(
            "SELECT {} FROM {} WHERE ({key}) IN (SELECT * FROM UNNEST({}))",
            self.column_list(),
            self.name,
            unnest(self.key_columns())
        );
        let keys: Vec<RowValues> = rows.iter().map(|r| self.key_of(r)).collect();
        let stored = bind_columns(sqlx::query(&read_back), self.key_columns(), &keys)
            .fetch_all(&mut *tx)
            .await
            .map_err(target_err)?;
        let mut stored: HashMap<RowValues, RowValues> = stored
            .iter()
            .map(|row| {
                let values = self
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        Ok(match c.kind {
                            Text => Value::Text(row.try_get(i)?),
                            Int => Value::Int(row.try_get(i)?),
                            Bool => Value::Bool(row.try_get(i)?),
                        })
                    })
                    .collect::<Result<RowValues, sqlx::Error>>()?;
                Ok((self.key_of(&values), values))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(target_err)?;
        for row in rows {
            let key = self.key_of(row);
            let difference = match stored.remove(&key) {
                None => {
                    "no row under this key: another row holds one of its unique values".to_string()
                }
                Some(there) if &there == row => continue,
                Some(there) => self
                    .columns
                    .iter()
                    .zip(there.iter().zip(row))
                    .find(|(_, (t, s))| t != s)
                    .map(|(c, (t, s))| format!("{} is {t} there, {s} in the source", c.name))
                    .unwrap_or_default(),
            };
            return Err(CopyError::Conflict {
                table: self.table,
                key: self.describe_key(&key),
                difference,
            });
        }
        tx.commit().await.map_err(target_err)?;
        Ok(inserted)
    }

    /// A batch the target refused (a NUL character in text, say), named by
    /// its first key so the row can be found.
    fn batch_failed(&self, rows: &[RowValues], e: sqlx::Error) -> CopyError {
        CopyError::TargetRefused {
            table: self.table,
            first_key: rows
                .first()
                .map(|r| self.describe_key(&self.key_of(r)))
                .unwrap_or_default(),
            reason: StoreError::from(e),
        }
    }
}

/// `query` with one array parameter per column of `columns`, taken from
/// `rows` (whose first values are those columns).
fn bind_columns<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    columns: &[Column],
    rows: &[RowValues],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for (i, column) in columns.iter().enumerate() {
        let values = rows.iter().map(|r| &r[i]);
        query = match column.kind {
            Text => query.bind(
                values
                    .map(|v| match v {
                        Value::Text(t) => t.clone(),
                        _ => unreachable!("a text column holds text"),
                    })
                    .collect::<Vec<_>>(),
            ),
            Int => query.bind(
                values
                    .map(|v| match v {
                        Value::Int(n) => *n,
                        _ => unreachable!("an integer column holds integers"),
                    })
                    .collect::<Vec<_>>(),
            ),
            Bool => query.bind(
                values
                    .map(|v| match v {
                        Value::Bool(b) => *b,
                        _ => unreachable!("a boolean column holds booleans"),
                    })
                    .collect::<Vec<_>>(),
            ),
        };
    }
    query
}
