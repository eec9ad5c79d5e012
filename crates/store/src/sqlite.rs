//! SQLite implementation of [`Store`]: a file under the data dir by default,
//! or an in-memory database for tests and throwaway gateways.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use time::OffsetDateTime;

use crate::group_commit::{WriteQueue, WriterConnection};
use crate::{
    ConversationRecord, Fence, GatewayRecord, LeaseClaim, MessageRecord, OwnedFence, Result,
    SessionRecord, SessionState, SessionWrite, Store, StoreError, StoredEvent, TokenRecord, token,
};

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connections kept for a file database (WAL lets readers run alongside the
/// single writer).
const FILE_POOL_SIZE: u32 = 8;

/// Each connection's page cache, in KiB (a negative `cache_size`). SQLite's
/// default (2 MiB) filled on each of the ten connections as the database
/// grew, and a gateway at rest after a day held that much more memory for
/// pages the kernel's file cache keeps anyway; reads here are small
/// (a session, a page of events).
const CACHE_SIZE_PRAGMA: &str = "-256";

/// How long a statement waits for a lock held by another connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// [`Store`] backed by SQLite through an sqlx pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Every write goes through here (group commit).
    writes: WriteQueue,
}

impl SqliteStore {
    /// Open (creating it and its parent directory if missing) the database
    /// `url` names — `sqlite://PATH` or `sqlite::memory:` — and bring its
    /// schema up to date.
    pub async fn open(url: &str) -> Result<Self> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let mut options = SqliteConnectOptions::from_str(url)?
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("cache_size", CACHE_SIZE_PRAGMA);

        // No liveness ping on acquire: a SQLite connection is an in-process
        // handle to a local file, and the ping was a round trip to sqlx's
        // connection thread before every batch of writes and every read.
        let pool_options = || SqlitePoolOptions::new().test_before_acquire(false);
        let path = options.get_filename().to_path_buf();
        let pool = if in_memory {
            // Every connection to `:memory:` would otherwise risk seeing a
            // different (or vanished) database: keep exactly one, forever.
            pool_options()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options)
                .await?
        } else {
            options = options
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal);
            make_private(&path)?;
            pool_options()
                .max_connections(FILE_POOL_SIZE)
                .connect_with(options)
                .await?
        };

        MIGRATOR.run(&pool).await?;
        let writer = if in_memory {
            WriterConnection::Pooled(pool.clone())
        } else {
            WriterConnection::Own {
                writer: open_own_connection(&path)?,
                checkpoints: open_own_connection(&path)?,
            }
        };
        tracing::debug!(in_memory, "sqlite store opened");
        let writes = WriteQueue::start(writer);
        Ok(Self { pool, writes })
    }

    /// Close every connection (flushing the WAL); further calls fail.
    pub async fn close(&self) {
        self.writes.close().await;
        self.pool.close().await;
    }
}

/// The database holds every conversation: it, its WAL and SHM are the
/// owner's alone (0600, whatever the umask); a directory created for it is
/// 0700. SQLite creates the WAL and SHM with the database file's mode, so
/// the file is created here first; files an older version left readable are
/// tightened.
fn make_private(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let io = |what: &std::path::Path, e: std::io::Error| {
        StoreError::Unavailable(format!("securing {}: {e}", what.display()))
    };
    let private = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(|e| io(p, e))
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| io(parent, e))?;
        // An existing directory is left as it is: it may be shared (a
        // database in /tmp must not take /tmp's sticky, world-writable bits
        // away); the CLI makes the data directory private.
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io(path, e))?;
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let file = std::path::PathBuf::from(file);
        if file.exists() {
            private(&file, 0o600)?;
        }
    }
    Ok(())
}

/// A connection of the group-commit writer's (its own, or its checkpoints')
/// to the database file, with the pool's settings (WAL is a property of the
/// file, set by the pool) and no automatic checkpoints.
fn open_own_connection(path: &std::path::Path) -> Result<rusqlite::Connection> {
    let open = || -> rusqlite::Result<rusqlite::Connection> {
        let db = rusqlite::Connection::open(path)?;
        db.busy_timeout(BUSY_TIMEOUT)?;
        // Every statement the writer runs stays prepared (about twenty).
        db.set_prepared_statement_cache_capacity(64);
        db.pragma_update(None, "foreign_keys", true)?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.pragma_update(None, "cache_size", CACHE_SIZE_PRAGMA)?;
        // Checkpoints run beside the writer, not inside its commits.
        db.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(db)
    };
    open().map_err(|e| StoreError::Write(format!("opening {} for writes: {e}", path.display())))
}

/// Unix milliseconds of `t` (the stored form of every timestamp).
pub(crate) fn to_ms(t: OffsetDateTime) -> i64 {
    // i64 milliseconds cover ±292 million years; OffsetDateTime's range is
    // far smaller, so this cannot truncate.
    t.unix_timestamp_nanos().div_euclid(1_000_000) as i64
}

pub(crate) fn from_ms(ms: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

pub(crate) fn now_ms() -> i64 {
    to_ms(OffsetDateTime::now_utc())
}

pub(crate) fn seq_to_db(seq: u64) -> Result<i64> {
    i64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("event seq {seq} out of range")))
}

pub(crate) fn seq_from_db(seq: i64) -> Result<u64> {
    u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("negative event seq {seq}")))
}

/// A lease's time to live in milliseconds, clamped so that `now + ttl`
/// cannot overflow (a ttl of centuries is as good as forever).
pub(crate) fn ttl_to_ms(ttl: Duration) -> i64 {
    const CENTURIES: i64 = 1 << 50; // about 35,000 years
    i64::try_from(ttl.as_millis()).map_or(CENTURIES, |ms| ms.min(CENTURIES))
}

pub(crate) fn epoch_from_db(epoch: i64) -> Result<u64> {
    u64::try_from(epoch).map_err(|_| StoreError::Corrupt(format!("negative lease epoch {epoch}")))
}

pub(crate) fn lease_lost(session_id: &str, epoch: u64) -> StoreError {
    StoreError::LeaseLost {
        session_id: session_id.to_string(),
        epoch,
    }
}

impl OwnedFence {
    /// `LeaseLost` unless the lease row still names this gateway at this
    /// epoch. Expiry is not checked: a lease that ran out but was not taken
    /// over is still this gateway's (a takeover raises the epoch). Runs in
    /// the write's own savepoint on the single writer, so no takeover can
    /// come between the check and the write; failing, it rolls back only
    /// that savepoint, not the other operations of the group commit.
    fn check(&self, c: &rusqlite::Connection, session_id: &str) -> Result<()> {
        let Ok(epoch) = i64::try_from(self.epoch) else {
            return Err(lease_lost(session_id, self.epoch));
        };
        let held = c
            .prepare_cached(
                "SELECT 1 FROM session_leases WHERE session_id = ? AND owner = ? AND epoch = ?",
            )?
            .exists(params![session_id, self.gateway_id, epoch])?;
        if held {
            Ok(())
        } else {
            Err(lease_lost(session_id, self.epoch))
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct TokenRow {
    id: String,
    user_id: String,
    name: String,
    is_admin: bool,
    created_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl TokenRow {
    pub(crate) fn into_record(self) -> Result<TokenRecord> {
        Ok(TokenRecord {
            id: self.id,
            user_id: self.user_id,
            name: self.name,
            is_admin: self.is_admin,
            created_at: from_ms(self.created_at)?,
            expires_at: self.expires_at.map(from_ms).transpose()?,
            revoked: self.revoked_at.is_some(),
        })
    }
}

pub(crate) const TOKEN_COLUMNS: &str =
    "id, user_id, name, is_admin, created_at, expires_at, revoked_at";

#[derive(sqlx::FromRow)]
pub(crate) struct SessionRow {
    id: String,
    user_id: String,
    state: String,
    created_at: i64,
    updated_at: i64,
    last_seq: i64,
    trace_id: String,
    agent: String,
    task_id: Option<String>,
    runner_seq: i64,
}

impl SessionRow {
    pub(crate) fn into_record(self) -> Result<SessionRecord> {
        Ok(SessionRecord {
            id: self.id,
            user_id: self.user_id,
            state: self
                .state
                .parse::<SessionState>()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            created_at: from_ms(self.created_at)?,
            updated_at: from_ms(self.updated_at)?,
            last_seq: seq_from_db(self.last_seq)?,
            trace_id: self.trace_id,
            agent: self.agent,
            task_id: self.task_id,
            runner_seq: seq_from_db(self.runner_seq)?,
        })
    }
}

pub(crate) const SESSION_COLUMNS: &str =
    "id, user_id, state, created_at, updated_at, last_seq, trace_id, agent, task_id, runner_seq";

#[derive(sqlx::FromRow)]
pub(crate) struct ConversationRow {
    id: String,
    session_id: String,
    title: Option<String>,
    resume_handle: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl ConversationRow {
    pub(crate) fn into_record(self) -> Result<ConversationRecord> {
        Ok(ConversationRecord {
            id: self.id,
            session_id: self.session_id,
            title: self.title,
            resume_handle: self.resume_handle,
            created_at: from_ms(self.created_at)?,
            updated_at: from_ms(self.updated_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct MessageRow {
    session_id: String,
    conversation_id: String,
    client_msg_id: Option<String>,
    role: String,
    content: String,
    created_at: i64,
}

impl MessageRow {
    pub(crate) fn into_record(self) -> Result<MessageRecord> {
        Ok(MessageRecord {
            session_id: self.session_id,
            conversation_id: self.conversation_id,
            client_msg_id: self.client_msg_id,
            role: self.role.parse()?,
            content: self.content,
            created_at: from_ms(self.created_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct GatewayRow {
    id: String,
    internal_url: String,
    started_at: i64,
    heartbeat_at: i64,
    leases: i64,
}

impl GatewayRow {
    pub(crate) fn into_record(self) -> Result<GatewayRecord> {
        Ok(GatewayRecord {
            id: self.id,
            internal_url: self.internal_url,
            started_at: from_ms(self.started_at)?,
            heartbeat_at: from_ms(self.heartbeat_at)?,
            leases: u64::try_from(self.leases).unwrap_or(0),
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    /// One writer thread, first in first out.
    fn orders_writes(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn ensure_user(&self, user_id: &str) -> Result<()> {
        let user_id = user_id.to_string();
        self.writes
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO users (id, is_admin, created_at) VALUES (?, 0, ?) ON CONFLICT(id) DO NOTHING",
                )?
                .execute(params![user_id, now_ms()])?;
                Ok(())
            })
            .await
    }

    async fn create_token(
        &self,
        user_id: &str,
        name: &str,
        is_admin: bool,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<(TokenRecord, String)> {
        self.ensure_user(user_id).await?;
        let plaintext = token::generate();
        let created_ms = now_ms();
        let expires_ms = expires_at.map(to_ms);
        let id = token::generate_id();
        let (row_id, row_user, row_name, hash) = (
            id.clone(),
            user_id.to_string(),
            name.to_string(),
            token::hash(&plaintext),
        );
        self.writes
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO tokens (id, user_id, name, token_hash, is_admin, created_at, expires_at, revoked_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                )?
                .execute(params![row_id, row_user, row_name, hash, is_admin, created_ms, expires_ms])?;
                Ok(())
            })
            .await?;
        let record = TokenRecord {
            id,
            user_id: user_id.to_string(),
            name: name.to_string(),
            is_admin,
            created_at: from_ms(created_ms)?,
            expires_at: expires_ms.map(from_ms).transpose()?,
            revoked: false,
        };
        Ok((record, plaintext))
    }

    async fn verify_token(&self, plaintext: &str) -> Result<Option<TokenRecord>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_hash = ? AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > ?)"
        );
        sqlx::query_as::<_, TokenRow>(&sql)
            .bind(token::hash(plaintext))
            .bind(now_ms())
            .fetch_optional(&self.pool)
            .await?
            .map(TokenRow::into_record)
            .transpose()
    }

    async fn list_tokens(&self, user_id: Option<&str>) -> Result<Vec<TokenRecord>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE (?1 IS NULL OR user_id = ?1) \
             ORDER BY created_at, id"
        );
        sqlx::query_as::<_, TokenRow>(&sql)
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(TokenRow::into_record)
            .collect()
    }

    async fn revoke_token(&self, token_id: &str) -> Result<bool> {
        let token_id = token_id.to_string();
        self.writes
            .write(move |c| {
                let changed = c
                    .prepare_cached(
                        "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                    )?
                    .execute(params![now_ms(), token_id])?;
                Ok(changed > 0)
            })
            .await
    }

    async fn create_session(&self, session: &SessionRecord) -> Result<()> {
        let session = session.clone();
        let last_seq = seq_to_db(session.last_seq)?;
        self.writes
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO sessions (id, user_id, state, created_at, updated_at, last_seq, trace_id, agent) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                )?
                .execute(params![
                    session.id,
                    session.user_id,
                    session.state.as_str(),
                    to_ms(session.created_at),
                    to_ms(session.updated_at),
                    last_seq,
                    session.trace_id,
                    session.agent,
                ])?;
                Ok(())
            })
            .await
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<SessionRecord>> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?");
        sqlx::query_as::<_, SessionRow>(&sql)
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await?
            .map(SessionRow::into_record)
            .transpose()
    }

    async fn list_sessions(&self, user_id: Option<&str>) -> Result<Vec<SessionRecord>> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE (?1 IS NULL OR user_id = ?1) \
             ORDER BY created_at DESC, id DESC"
        );
        sqlx::query_as::<_, SessionRow>(&sql)
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(SessionRow::into_record)
            .collect()
    }

    async fn upsert_conversation(
        &self,
        session_id: &str,
        conversation_id: &str,
        title: Option<&str>,
        resume_handle: Option<&str>,
    ) -> Result<()> {
        let now = now_ms();
        let (conversation_id, session_id) = (conversation_id.to_string(), session_id.to_string());
        let (title, resume_handle) = (title.map(str::to_string), resume_handle.map(str::to_string));
        self.writes
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO conversations (id, session_id, title, resume_handle, created_at, updated_at) \
                     VALUES (?, ?, ?, ?, ?, ?) \
                     ON CONFLICT(session_id, id) DO UPDATE SET \
                         title = COALESCE(excluded.title, title), \
                         resume_handle = COALESCE(excluded.resume_handle, resume_handle), \
                         updated_at = excluded.updated_at",
                )?
                .execute(params![conversation_id, session_id, title, resume_handle, now, now])?;
                Ok(())
            })
            .await
    }

    async fn list_conversations(&self, session_id: &str) -> Result<Vec<ConversationRecord>> {
        sqlx::query_as::<_, ConversationRow>(
            "SELECT id, session_id, title, resume_handle, created_at, updated_at \
             FROM conversations WHERE session_id = ? ORDER BY created_at, rowid",
        )
        .bind(session_id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(ConversationRow::into_record)
        .collect()
    }

    async fn delete_conversation(&self, session_id: &str, conversation_id: &str) -> Result<bool> {
        let (session_id, conversation_id) = (session_id.to_string(), conversation_id.to_string());
        self.writes
            .write(move |c| {
                // One operation, one savepoint: both deletes or neither.
                c.prepare_cached(
                    "DELETE FROM messages WHERE session_id = ? AND conversation_id = ?",
                )?
                .execute(params![session_id, conversation_id])?;
                let deleted = c
                    .prepare_cached("DELETE FROM conversations WHERE session_id = ? AND id = ?")?
                    .execute(params![session_id, conversation_id])?;
                Ok(deleted > 0)
            })
            .await
    }

    async fn insert_message(&self, message: &MessageRecord) -> Result<bool> {
        let message = message.clone();
        self.writes
            .write(move |c| {
                // One operation, one savepoint: the conversation and its
                // message together.
                let now = now_ms();
                c.prepare_cached(
                    "INSERT INTO conversations (id, session_id, title, resume_handle, created_at, updated_at) \
                     VALUES (?, ?, NULL, NULL, ?, ?) \
                     ON CONFLICT(session_id, id) DO UPDATE SET updated_at = excluded.updated_at",
                )?
                .execute(params![message.conversation_id, message.session_id, now, now])?;
                let inserted = c
                    .prepare_cached(
                        "INSERT INTO messages (session_id, conversation_id, client_msg_id, role, content, created_at) \
                         VALUES (?, ?, ?, ?, ?, ?) \
                         ON CONFLICT(session_id, client_msg_id) DO NOTHING",
                    )?
                    .execute(params![
                        message.session_id,
                        message.conversation_id,
                        message.client_msg_id,
                        message.role.as_str(),
                        message.content,
                        to_ms(message.created_at),
                    ])?;
                Ok(inserted > 0)
            })
            .await
    }

    async fn list_messages(
        &self,
        session_id: &str,
        conversation_id: &str,
    ) -> Result<Vec<MessageRecord>> {
        sqlx::query_as::<_, MessageRow>(
            "SELECT session_id, conversation_id, client_msg_id, role, content, created_at \
             FROM messages WHERE session_id = ? AND conversation_id = ? ORDER BY id",
        )
        .bind(session_id)
        .bind(conversation_id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(MessageRow::into_record)
        .collect()
    }

    async fn usage_start(&self, task_id: &str, session_id: &str, user_id: &str) -> Result<()> {
        let (task_id, session_id, user_id) = (
            task_id.to_string(),
            session_id.to_string(),
            user_id.to_string(),
        );
        self.writes
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO usage (task_id, session_id, user_id, started_at) VALUES (?, ?, ?, ?) \
                     ON CONFLICT(task_id) DO NOTHING",
                )?
                .execute(params![task_id, session_id, user_id, now_ms()])?;
                Ok(())
            })
            .await
    }

    async fn usage_end(&self, task_id: &str) -> Result<()> {
        let task_id = task_id.to_string();
        self.writes
            .write(move |c| {
                c.prepare_cached(
                    "UPDATE usage SET ended_at = ? WHERE task_id = ? AND ended_at IS NULL",
                )?
                .execute(params![now_ms(), task_id])?;
                Ok(())
            })
            .await
    }

    async fn usage_since(
        &self,
        since: OffsetDateTime,
        user_id: Option<&str>,
    ) -> Result<Vec<crate::UsageSummary>> {
        let since = to_ms(since);
        let rows = sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT user_id, \
                    SUM(MAX(0, COALESCE(ended_at, ?2) - MAX(started_at, ?1))) AS ms, \
                    COUNT(*) \
             FROM usage WHERE COALESCE(ended_at, ?2) > ?1 AND (?3 IS NULL OR user_id = ?3) \
             GROUP BY user_id ORDER BY user_id",
        )
        .bind(since)
        .bind(now_ms())
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(user_id, ms, tasks)| crate::UsageSummary {
                user_id,
                seconds: (ms.max(0) / 1000) as u64,
                tasks: tasks.max(0) as u64,
            })
            .collect())
    }

    async fn set_session_task(
        &self,
        session_id: &str,
        task_id: Option<&str>,
        fence: Option<Fence<'_>>,
    ) -> Result<()> {
        let (session_id, task_id) = (session_id.to_string(), task_id.map(str::to_string));
        let fence = OwnedFence::of(fence);
        self.writes
            .write(move |c| {
                if let Some(fence) = &fence {
                    fence.check(c, &session_id)?;
                }
                c.prepare_cached(
                    "UPDATE sessions SET task_id = ?, runner_seq = 0, updated_at = ? WHERE id = ?",
                )?
                .execute(params![task_id, now_ms(), session_id])?;
                Ok(())
            })
            .await
    }

    async fn write_session(&self, session_id: &str, write: SessionWrite<'_>) -> Result<()> {
        let max_seq = write
            .events
            .iter()
            .map(|e| e.seq)
            .max()
            .map(seq_to_db)
            .transpose()?;
        if max_seq.is_none() && write.state.is_none() {
            return Ok(());
        }
        let now = now_ms();
        let rows = write
            .events
            .iter()
            .map(|e| Ok((seq_to_db(e.seq)?, e.json.clone())))
            .collect::<Result<Vec<_>>>()?;
        let (ack_task, ack_seq) = match write.runner_ack {
            Some((task, seq)) => (Some(task.to_string()), Some(seq_to_db(seq)?)),
            None => (None, None),
        };
        let state = write.state.map(SessionState::as_str);
        let session_id = session_id.to_string();
        let fence = OwnedFence::of(write.fence);
        self.writes
            .write(move |c| {
                // Unfenced (one gateway): no lease query at all.
                if let Some(fence) = &fence {
                    fence.check(c, &session_id)?;
                }
                // One operation, one savepoint: the events and the
                // session's counters and state together.
                let mut insert = c.prepare_cached(
                    "INSERT OR IGNORE INTO session_events (session_id, seq, json, created_at) \
                     VALUES (?, ?, ?, ?)",
                )?;
                for (seq, json) in rows {
                    insert.execute(params![session_id, seq, json, now])?;
                }
                c.prepare_cached(
                    "UPDATE sessions SET last_seq = MAX(last_seq, COALESCE(?1, last_seq)), \
                     runner_seq = CASE WHEN ?2 IS NOT NULL AND task_id IS ?3 \
                     THEN MAX(runner_seq, ?2) ELSE runner_seq END, \
                     state = COALESCE(?5, state), \
                     updated_at = CASE WHEN ?5 IS NULL THEN updated_at ELSE ?6 END \
                     WHERE id = ?4",
                )?
                .execute(params![max_seq, ack_seq, ack_task, session_id, state, now])?;
                Ok(())
            })
            .await
    }

    async fn events_after(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>> {
        // A cursor beyond i64::MAX cannot have anything after it.
        let Ok(after) = i64::try_from(after_seq) else {
            return Ok(Vec::new());
        };
        sqlx::query_as::<_, (i64, String)>(
            "SELECT seq, json FROM session_events WHERE session_id = ? AND seq > ? \
             ORDER BY seq LIMIT ?",
        )
        .bind(session_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|(seq, json)| {
            Ok(StoredEvent {
                seq: seq_from_db(seq)?,
                json,
            })
        })
        .collect()
    }

    // Several gateways (docs/cluster.md). SQLite is one machine's database,
    // so its clock is the local one; every lease operation runs on the
    // single writer, which orders them.

    async fn register_gateway(&self, gateway_id: &str, internal_url: &str) -> Result<()> {
        let (gateway_id, internal_url) = (gateway_id.to_string(), internal_url.to_string());
        self.writes
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO gateways (id, internal_url, started_at, heartbeat_at) \
                     VALUES (?1, ?2, ?3, ?3) \
                     ON CONFLICT(id) DO UPDATE SET internal_url = excluded.internal_url, \
                         started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at",
                )?
                .execute(params![gateway_id, internal_url, now_ms()])?;
                Ok(())
            })
            .await
    }

    async fn heartbeat_gateway(&self, gateway_id: &str) -> Result<()> {
        let gateway_id = gateway_id.to_string();
        self.writes
            .write(move |c| {
                c.prepare_cached("UPDATE gateways SET heartbeat_at = ? WHERE id = ?")?
                    .execute(params![now_ms(), gateway_id])?;
                Ok(())
            })
            .await
    }

    async fn remove_gateway(&self, gateway_id: &str) -> Result<()> {
        let gateway_id = gateway_id.to_string();
        self.writes
            .write(move |c| {
                // One savepoint: the registration and its leases together.
                // A freed lease keeps its epoch (the next claim raises it).
                c.prepare_cached("DELETE FROM gateways WHERE id = ?")?
                    .execute(params![gateway_id])?;
                c.prepare_cached(
                    "UPDATE session_leases SET owner = NULL, expires_at = MIN(expires_at, ?) \
                     WHERE owner = ?",
                )?
                .execute(params![now_ms(), gateway_id])?;
                Ok(())
            })
            .await
    }

    async fn list_gateways(&self) -> Result<Vec<GatewayRecord>> {
        sqlx::query_as::<_, GatewayRow>(
            "SELECT g.id, g.internal_url, g.started_at, g.heartbeat_at, \
                    (SELECT COUNT(*) FROM session_leases l \
                     WHERE l.owner = g.id AND l.expires_at > ?) AS leases \
             FROM gateways g ORDER BY g.started_at, g.id",
        )
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(GatewayRow::into_record)
        .collect()
    }

    async fn claim_lease(
        &self,
        session_id: &str,
        gateway_id: &str,
        ttl: Duration,
    ) -> Result<LeaseClaim> {
        let ttl = ttl_to_ms(ttl);
        let (session_id, gateway_id) = (session_id.to_string(), gateway_id.to_string());
        self.writes
            .write(move |c| {
                let now = now_ms();
                // Taken when free (released), expired, or already ours; the
                // epoch stays only for a holder renewing before expiry.
                let claimed: Option<i64> = c
                    .prepare_cached(
                        "INSERT INTO session_leases (session_id, owner, epoch, expires_at) \
                         VALUES (?1, ?2, 1, ?4) \
                         ON CONFLICT(session_id) DO UPDATE SET \
                             epoch = CASE WHEN owner = excluded.owner AND expires_at > ?3 \
                                 THEN epoch ELSE epoch + 1 END, \
                             owner = excluded.owner, \
                             expires_at = excluded.expires_at \
                         WHERE owner IS NULL OR owner = excluded.owner OR expires_at <= ?3 \
                         RETURNING epoch",
                    )?
                    .query_row(
                        params![session_id, gateway_id, now, now.saturating_add(ttl)],
                        |row| row.get(0),
                    )
                    .optional()?;
                if let Some(epoch) = claimed {
                    return Ok(LeaseClaim::Acquired {
                        epoch: epoch_from_db(epoch)?,
                    });
                }
                let (holder, epoch, internal_url): (Option<String>, i64, Option<String>) = c
                    .prepare_cached(
                        "SELECT l.owner, l.epoch, g.internal_url FROM session_leases l \
                         LEFT JOIN gateways g ON g.id = l.owner WHERE l.session_id = ?",
                    )?
                    .query_row(params![session_id], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })?;
                let gateway_id = holder.ok_or_else(|| {
                    StoreError::Corrupt(format!("free lease of {session_id} was not claimed"))
                })?;
                Ok(LeaseClaim::HeldBy {
                    gateway_id,
                    internal_url,
                    epoch: epoch_from_db(epoch)?,
                })
            })
            .await
    }

    async fn renew_leases(&self, gateway_id: &str, ttl: Duration) -> Result<Vec<(String, u64)>> {
        let ttl = ttl_to_ms(ttl);
        let gateway_id = gateway_id.to_string();
        self.writes
            .write(move |c| {
                let now = now_ms();
                let mut renew = c.prepare_cached(
                    "UPDATE session_leases SET expires_at = ?3 \
                     WHERE owner = ?1 AND expires_at > ?2 RETURNING session_id, epoch",
                )?;
                let rows = renew
                    .query_map(params![gateway_id, now, now.saturating_add(ttl)], |row| {
                        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                    })?;
                let mut held = Vec::new();
                for row in rows {
                    let (session_id, epoch) = row?;
                    held.push((session_id, epoch_from_db(epoch)?));
                }
                held.sort();
                Ok(held)
            })
            .await
    }

    async fn release_lease(&self, session_id: &str, gateway_id: &str, epoch: u64) -> Result<()> {
        // An epoch beyond the stored range cannot be held.
        let Ok(epoch) = i64::try_from(epoch) else {
            return Ok(());
        };
        let (session_id, gateway_id) = (session_id.to_string(), gateway_id.to_string());
        self.writes
            .write(move |c| {
                // Owner NULL: free for anyone, this gateway included, at
                // the next epoch; its own fenced writes stop too.
                c.prepare_cached(
                    "UPDATE session_leases SET owner = NULL, expires_at = MIN(expires_at, ?) \
                     WHERE session_id = ? AND owner = ? AND epoch = ?",
                )?
                .execute(params![now_ms(), session_id, gateway_id, epoch])?;
                Ok(())
            })
            .await
    }

    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        let (name, candidate) = (name.to_string(), candidate.to_vec());
        self.writes
            .write(move |c| {
                c.prepare_cached(
                    "INSERT INTO shared_secrets (name, value) VALUES (?, ?) \
                     ON CONFLICT(name) DO NOTHING",
                )?
                .execute(params![name, candidate])?;
                let value = c
                    .prepare_cached("SELECT value FROM shared_secrets WHERE name = ?")?
                    .query_row(params![name], |row| row.get(0))?;
                Ok(value)
            })
            .await
    }

    async fn count_user_tasks(&self, user_id: &str) -> Result<u64> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sessions WHERE user_id = ? AND task_id IS NOT NULL",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration as TimeDuration;

    /// Rows in `table`, read through the pool (what a reader sees).
    async fn rows(s: &SqliteStore, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&s.pool)
            .await
            .unwrap()
    }

    async fn memory() -> SqliteStore {
        SqliteStore::open("sqlite::memory:")
            .await
            .expect("open in-memory store")
    }

    /// The database file of [`file`]'s store. A nested, not-yet-existing
    /// directory proves the parent is created.
    fn file_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
        dir.path().join("data/sub/aishell.db")
    }

    fn file_url(dir: &tempfile::TempDir) -> String {
        format!("sqlite://{}", file_path(dir).display())
    }

    async fn file(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&file_url(dir))
            .await
            .expect("open file store")
    }

    /// Run `f` against both a fresh in-memory store and a fresh file store.
    macro_rules! both {
        (|$s:ident| $body:block) => {{
            {
                let $s = memory().await;
                $body
            }
            {
                let dir = tempfile::tempdir().unwrap();
                let $s = file(&dir).await;
                $body
            }
        }};
    }

    fn session(id: &str, user: &str, created_ms: i64) -> SessionRecord {
        let t = from_ms(created_ms).unwrap();
        SessionRecord {
            state: SessionState::Running,
            created_at: t,
            updated_at: t,
            ..SessionRecord::new(id, user, &format!("trace-{id}"), "echo")
        }
    }

    fn message(session: &str, conv: &str, client: Option<&str>, content: &str) -> MessageRecord {
        MessageRecord {
            session_id: session.to_string(),
            conversation_id: conv.to_string(),
            client_msg_id: client.map(str::to_string),
            role: crate::MessageRole::User,
            content: content.to_string(),
            created_at: from_ms(1_700_000_000_000).unwrap(),
        }
    }

    fn events(range: std::ops::RangeInclusive<u64>) -> Vec<StoredEvent> {
        range
            .map(|seq| StoredEvent {
                seq,
                json: format!(r#"{{"type":"text","seq":{seq}}}"#),
            })
            .collect()
    }

    #[tokio::test]
    async fn ping_answers() {
        both!(|s| {
            s.ping().await.unwrap();
        });
    }

    #[tokio::test]
    async fn token_create_then_verify() {
        both!(|s| {
            let (rec, plain) = s.create_token("alice", "laptop", true, None).await.unwrap();
            assert!(token::looks_like_api_token(&plain));
            assert!(rec.id.starts_with("tok_"));
            let got = s.verify_token(&plain).await.unwrap().expect("valid token");
            assert_eq!(got, rec);
            assert_eq!(got.user_id, "alice");
            assert!(got.is_admin);
            assert!(!got.revoked);
            // The user was created on the way.
            let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE id = 'alice'")
                .fetch_one(&s.pool)
                .await
                .unwrap();
            assert_eq!(users, 1);
        });
    }

    #[tokio::test]
    async fn wrong_token_is_rejected() {
        both!(|s| {
            let (_, plain) = s.create_token("alice", "t", false, None).await.unwrap();
            assert!(s.verify_token(&token::generate()).await.unwrap().is_none());
            let mut tampered = plain.clone();
            tampered.pop();
            tampered.push(if plain.ends_with('x') { 'y' } else { 'x' });
            assert!(s.verify_token(&tampered).await.unwrap().is_none());
            assert!(s.verify_token("").await.unwrap().is_none());
            // The hash itself is not a credential either.
            assert!(
                s.verify_token(&token::hash(&plain))
                    .await
                    .unwrap()
                    .is_none()
            );
        });
    }

    #[tokio::test]
    async fn revoked_token_is_rejected() {
        both!(|s| {
            let (rec, plain) = s.create_token("alice", "t", false, None).await.unwrap();
            let (_, other) = s.create_token("alice", "t2", false, None).await.unwrap();
            assert!(s.verify_token(&plain).await.unwrap().is_some());
            assert!(s.revoke_token(&rec.id).await.unwrap());
            assert!(s.verify_token(&plain).await.unwrap().is_none());
            // Only that token was revoked.
            assert!(s.verify_token(&other).await.unwrap().is_some());
            // Revoking again still finds it; an unknown id does not exist.
            assert!(s.revoke_token(&rec.id).await.unwrap());
            assert!(!s.revoke_token("tok_000000000000").await.unwrap());
            let listed = s.list_tokens(Some("alice")).await.unwrap();
            let revoked: Vec<_> = listed.iter().filter(|t| t.revoked).map(|t| &t.id).collect();
            assert_eq!(revoked, vec![&rec.id]);
        });
    }

    #[tokio::test]
    async fn expired_token_is_rejected() {
        both!(|s| {
            let past = OffsetDateTime::now_utc() - TimeDuration::minutes(1);
            let future = OffsetDateTime::now_utc() + TimeDuration::hours(1);
            let (rec, expired) = s
                .create_token("bob", "old", false, Some(past))
                .await
                .unwrap();
            assert!(rec.expires_at.is_some());
            assert!(s.verify_token(&expired).await.unwrap().is_none());
            let (rec, live) = s
                .create_token("bob", "new", false, Some(future))
                .await
                .unwrap();
            let got = s
                .verify_token(&live)
                .await
                .unwrap()
                .expect("unexpired token");
            assert_eq!(got.expires_at, rec.expires_at);
        });
    }

    #[tokio::test]
    async fn plaintext_token_is_never_stored() {
        both!(|s| {
            let (_, plain) = s.create_token("alice", "t", false, None).await.unwrap();
            let secret = &plain[token::PREFIX.len()..];
            let rows: Vec<(String, String, String, String)> =
                sqlx::query_as("SELECT id, user_id, name, token_hash FROM tokens")
                    .fetch_all(&s.pool)
                    .await
                    .unwrap();
            assert_eq!(rows.len(), 1);
            for (id, user, name, hash) in &rows {
                for col in [id, user, name, hash] {
                    assert!(!col.contains(secret), "plaintext leaked into tokens: {col}");
                }
                assert_eq!(hash, &token::hash(&plain));
            }
            // Nor anywhere else in the row, whatever its type.
            let hits: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM tokens WHERE instr(id || user_id || name || token_hash || \
                 is_admin || created_at || IFNULL(expires_at, '') || IFNULL(revoked_at, ''), ?) > 0",
            )
            .bind(secret)
            .fetch_one(&s.pool)
            .await
            .unwrap();
            assert_eq!(hits, 0);
        });
    }

    #[tokio::test]
    async fn list_tokens_filters_by_user() {
        both!(|s| {
            s.create_token("alice", "a1", false, None).await.unwrap();
            s.create_token("alice", "a2", false, None).await.unwrap();
            s.create_token("bob", "b1", true, None).await.unwrap();
            let alice = s.list_tokens(Some("alice")).await.unwrap();
            assert_eq!(alice.len(), 2);
            assert!(alice.iter().all(|t| t.user_id == "alice"));
            assert_eq!(s.list_tokens(None).await.unwrap().len(), 3);
            assert!(s.list_tokens(Some("carol")).await.unwrap().is_empty());
        });
    }

    #[tokio::test]
    async fn sessions_roundtrip_and_list_newest_first() {
        both!(|s| {
            s.create_session(&session("s1", "alice", 1_000))
                .await
                .unwrap();
            s.create_session(&session("s2", "bob", 2_000))
                .await
                .unwrap();
            s.create_session(&session("s3", "alice", 3_000))
                .await
                .unwrap();
            assert_eq!(
                s.get_session("s1").await.unwrap(),
                Some(session("s1", "alice", 1_000))
            );
            assert_eq!(s.get_session("nope").await.unwrap(), None);

            let all: Vec<_> = s
                .list_sessions(None)
                .await
                .unwrap()
                .into_iter()
                .map(|x| x.id)
                .collect();
            assert_eq!(all, ["s3", "s2", "s1"]);
            let alice: Vec<_> = s
                .list_sessions(Some("alice"))
                .await
                .unwrap()
                .into_iter()
                .map(|x| x.id)
                .collect();
            assert_eq!(alice, ["s3", "s1"]);

            s.write_session("s1", SessionWrite::state(SessionState::Stopped))
                .await
                .unwrap();
            let s1 = s.get_session("s1").await.unwrap().unwrap();
            assert_eq!(s1.state, SessionState::Stopped);
            assert!(s1.updated_at > s1.created_at);
        });
    }

    #[tokio::test]
    async fn duplicate_client_msg_id_is_dropped() {
        both!(|s| {
            s.create_session(&session("s1", "alice", 1_000))
                .await
                .unwrap();
            let first = message("s1", "c1", Some("m-1"), "hello");
            assert!(s.insert_message(&first).await.unwrap());
            let again = message("s1", "c1", Some("m-1"), "hello, resent");
            assert!(!s.insert_message(&again).await.unwrap());
            let listed = s.list_messages("s1", "c1").await.unwrap();
            assert_eq!(listed, vec![first]);
            // The same client id in another session is a different message.
            s.create_session(&session("s2", "alice", 1_000))
                .await
                .unwrap();
            assert!(
                s.insert_message(&message("s2", "c1", Some("m-1"), "x"))
                    .await
                    .unwrap()
            );
        });
    }

    #[tokio::test]
    async fn messages_without_client_id_never_collide() {
        both!(|s| {
            s.create_session(&session("s1", "alice", 1_000))
                .await
                .unwrap();
            for i in 0..3 {
                let mut m = message("s1", "c1", None, &format!("reply {i}"));
                m.role = crate::MessageRole::Assistant;
                assert!(s.insert_message(&m).await.unwrap());
            }
            let contents: Vec<_> = s
                .list_messages("s1", "c1")
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.content)
                .collect();
            assert_eq!(contents, ["reply 0", "reply 1", "reply 2"]);
            assert!(s.list_messages("s1", "other").await.unwrap().is_empty());
        });
    }

    #[tokio::test]
    async fn session_events_are_idempotent_and_ordered() {
        both!(|s| {
            s.create_session(&session("s1", "alice", 1_000))
                .await
                .unwrap();
            s.write_session("s1", SessionWrite::events(&events(1..=5)))
                .await
                .unwrap();
            assert_eq!(s.get_session("s1").await.unwrap().unwrap().last_seq, 5);

            // Re-appending overlapping seqs keeps the original payloads.
            let mut replay = events(3..=7);
            for e in &mut replay {
                if e.seq <= 5 {
                    e.json = "CHANGED".to_string();
                }
            }
            s.write_session("s1", SessionWrite::events(&replay))
                .await
                .unwrap();
            let all = s.events_after("s1", 0, 100).await.unwrap();
            assert_eq!(all, events(1..=7));
            assert_eq!(s.get_session("s1").await.unwrap().unwrap().last_seq, 7);

            // A stale batch never lowers last_seq.
            s.write_session("s1", SessionWrite::events(&events(1..=2)))
                .await
                .unwrap();
            assert_eq!(s.get_session("s1").await.unwrap().unwrap().last_seq, 7);
            s.write_session("s1", SessionWrite::events(&[]))
                .await
                .unwrap();

            let page = s.events_after("s1", 2, 3).await.unwrap();
            assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
            assert!(s.events_after("s1", 7, 10).await.unwrap().is_empty());
            assert!(s.events_after("s1", u64::MAX, 10).await.unwrap().is_empty());
            assert!(s.events_after("other", 0, 10).await.unwrap().is_empty());
        });
    }

    #[tokio::test]
    async fn a_session_write_sets_state_with_or_without_events() {
        both!(|s| {
            s.create_session(&session("s1", "alice", 1_000))
                .await
                .unwrap();
            let first_two = events(1..=2);
            let with_events = SessionWrite {
                state: Some(SessionState::Running),
                ..SessionWrite::events(&first_two)
            };
            s.write_session("s1", with_events).await.unwrap();
            let got = s.get_session("s1").await.unwrap().unwrap();
            assert_eq!((got.state.as_str(), got.last_seq), ("RUNNING", 2));
            // State alone leaves the events and their counter as they are.
            s.write_session("s1", SessionWrite::state(SessionState::Idle))
                .await
                .unwrap();
            let got = s.get_session("s1").await.unwrap().unwrap();
            assert_eq!((got.state.as_str(), got.last_seq), ("IDLE", 2));
            assert_eq!(s.events_after("s1", 0, 10).await.unwrap(), events(1..=2));
        });
    }

    #[tokio::test]
    async fn session_writes_handle_large_batches() {
        both!(|s| {
            s.create_session(&session("s1", "alice", 1_000))
                .await
                .unwrap();
            let started = std::time::Instant::now();
            for chunk in events(1..=2_000).chunks(500) {
                s.write_session("s1", SessionWrite::events(chunk))
                    .await
                    .unwrap();
            }
            let elapsed = started.elapsed();
            assert!(
                elapsed < std::time::Duration::from_secs(10),
                "too slow: {elapsed:?}"
            );
            assert_eq!(s.get_session("s1").await.unwrap().unwrap().last_seq, 2_000);
            let tail = s.events_after("s1", 1_990, 1_000).await.unwrap();
            assert_eq!(tail, events(1_991..=2_000));
        });
    }

    #[tokio::test]
    async fn upsert_conversation_keeps_unset_fields() {
        both!(|s| {
            s.create_session(&session("s1", "alice", 1_000))
                .await
                .unwrap();
            s.upsert_conversation("s1", "c1", Some("First"), Some("handle-1"))
                .await
                .unwrap();
            s.upsert_conversation("s1", "c2", None, None).await.unwrap();
            s.upsert_conversation("s1", "c1", None, None).await.unwrap();
            let convs = s.list_conversations("s1").await.unwrap();
            assert_eq!(
                convs.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
                ["c1", "c2"]
            );
            assert_eq!(convs[0].title.as_deref(), Some("First"));
            assert_eq!(convs[0].resume_handle.as_deref(), Some("handle-1"));
            assert_eq!(convs[1].title, None);

            s.upsert_conversation("s1", "c1", None, Some("handle-2"))
                .await
                .unwrap();
            let c1 = s.list_conversations("s1").await.unwrap().remove(0);
            assert_eq!(c1.title.as_deref(), Some("First"));
            assert_eq!(c1.resume_handle.as_deref(), Some("handle-2"));
        });
    }

    #[tokio::test]
    async fn conversation_needs_its_session() {
        both!(|s| {
            let err = s.upsert_conversation("missing", "c1", None, None).await;
            assert!(matches!(err, Err(StoreError::Constraint(_))), "{err:?}");
        });
    }

    #[tokio::test]
    async fn a_message_creates_its_conversation_in_the_same_write() {
        both!(|s| {
            s.create_session(&session("s1", "alice", 1_000))
                .await
                .unwrap();
            assert!(
                s.insert_message(&message("s1", "new-conv", Some("m1"), "hi"))
                    .await
                    .unwrap()
            );
            let convs = s.list_conversations("s1").await.unwrap();
            assert_eq!(
                convs.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
                ["new-conv"]
            );
            assert_eq!(s.list_messages("s1", "new-conv").await.unwrap().len(), 1);
            // A session that does not exist stores neither.
            assert!(
                s.insert_message(&message("nope", "c", Some("m2"), "x"))
                    .await
                    .is_err()
            );
            assert!(s.list_conversations("nope").await.unwrap().is_empty());
        });
    }

    /// When the batch's transaction ends under it (here an operation that
    /// rolls it back, as a full disk or an I/O error would), nothing queued
    /// behind runs on its own and nothing in the batch commits: every
    /// caller hears a `Write` error.
    #[tokio::test]
    async fn a_batch_whose_transaction_is_rolled_back_commits_nothing() {
        both!(|s| {
            let insert = |id: &'static str| {
                move |c: &rusqlite::Connection| -> Result<()> {
                    c.execute(
                        "INSERT INTO users (id, is_admin, created_at) VALUES (?, 0, 0)",
                        [id],
                    )?;
                    Ok(())
                }
            };
            // Queued together, so they share one batch.
            let (before, breaker, after) = tokio::join!(
                s.writes.write(insert("before")),
                s.writes.write(|c: &rusqlite::Connection| -> Result<()> {
                    c.execute_batch("ROLLBACK")?;
                    Ok(())
                }),
                s.writes.write(insert("after")),
            );
            for result in [before, breaker, after] {
                assert!(matches!(result, Err(StoreError::Write(_))), "{result:?}");
            }
            assert_eq!(rows(&s, "users").await, 0);
            // The writer goes on with the next batch.
            s.ensure_user("alice").await.unwrap();
        });
    }

    /// With no connection to be had, a write fails with a clear error
    /// instead of waiting forever on the writer.
    #[tokio::test]
    async fn a_write_after_close_fails_instead_of_hanging() {
        both!(|s| {
            s.close().await;
            let result = tokio::time::timeout(Duration::from_secs(5), s.ensure_user("alice")).await;
            match result {
                Ok(Err(StoreError::Write(message))) => {
                    assert!(message.contains("could not run"), "{message}")
                }
                other => panic!("expected a Write error, got {other:?}"),
            }
        });
    }

    /// Concurrent writes share transactions (group commit): an operation
    /// that fails rolls back alone, and every other one is committed and
    /// readable when its caller hears "done".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_commit_together_and_a_failing_one_alone() {
        both!(|s| {
            s.create_session(&session("s1", "alice", 1_000))
                .await
                .unwrap();
            let s = std::sync::Arc::new(s);
            let mut handles = Vec::new();
            for i in 0..200 {
                let s = s.clone();
                handles.push(tokio::spawn(async move {
                    // Every third one names a session that does not exist.
                    let session = if i % 3 == 0 { "missing" } else { "s1" };
                    let result = s
                        .upsert_conversation(session, &format!("c{i}"), None, None)
                        .await;
                    if result.is_ok() {
                        // Durable before the caller is told.
                        let listed = s.list_conversations("s1").await.unwrap();
                        assert!(listed.iter().any(|c| c.id == format!("c{i}")));
                    }
                    (i, result.is_ok())
                }));
            }
            for h in handles {
                let (i, ok) = h.await.unwrap();
                assert_eq!(ok, i % 3 != 0, "write {i}");
            }
            let ids: std::collections::HashSet<String> = s
                .list_conversations("s1")
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.id)
                .collect();
            let expected: std::collections::HashSet<String> = (0..200)
                .filter(|i| i % 3 != 0)
                .map(|i| format!("c{i}"))
                .collect();
            assert_eq!(ids, expected);
        });
    }

    #[tokio::test]
    async fn delete_conversation_deletes_its_messages() {
        both!(|s| {
            s.create_session(&session("s1", "alice", 1_000))
                .await
                .unwrap();
            s.upsert_conversation("s1", "c1", None, None).await.unwrap();
            s.upsert_conversation("s1", "c2", None, None).await.unwrap();
            s.insert_message(&message("s1", "c1", Some("a"), "in c1"))
                .await
                .unwrap();
            s.insert_message(&message("s1", "c2", Some("b"), "in c2"))
                .await
                .unwrap();

            assert!(s.delete_conversation("s1", "c1").await.unwrap());
            assert!(!s.delete_conversation("s1", "c1").await.unwrap());
            assert!(s.list_messages("s1", "c1").await.unwrap().is_empty());
            assert_eq!(s.list_messages("s1", "c2").await.unwrap().len(), 1);
            let ids: Vec<_> = s
                .list_conversations("s1")
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.id)
                .collect();
            assert_eq!(ids, ["c2"]);
        });
    }

    #[tokio::test]
    async fn file_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let plain = {
            let s = file(&dir).await;
            let (_, plain) = s.create_token("alice", "t", false, None).await.unwrap();
            s.create_session(&session("s1", "alice", 1_000))
                .await
                .unwrap();
            s.upsert_conversation("s1", "c1", Some("T"), Some("h"))
                .await
                .unwrap();
            s.insert_message(&message("s1", "c1", Some("m"), "hi"))
                .await
                .unwrap();
            s.write_session("s1", SessionWrite::events(&events(1..=3)))
                .await
                .unwrap();
            s.close().await;
            plain
        };
        assert!(dir.path().join("data/sub/aishell.db").is_file());

        let s = file(&dir).await; // migrations run again: must be a no-op
        assert_eq!(
            s.verify_token(&plain).await.unwrap().unwrap().user_id,
            "alice"
        );
        assert_eq!(s.get_session("s1").await.unwrap().unwrap().last_seq, 3);
        let convs = s.list_conversations("s1").await.unwrap();
        assert_eq!(convs[0].resume_handle.as_deref(), Some("h"));
        assert_eq!(s.list_messages("s1", "c1").await.unwrap()[0].content, "hi");
        assert_eq!(s.events_after("s1", 0, 10).await.unwrap(), events(1..=3));
        // Still deduplicating after the reopen.
        assert!(
            !s.insert_message(&message("s1", "c1", Some("m"), "hi"))
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn file_store_uses_wal_and_foreign_keys() {
        let dir = tempfile::tempdir().unwrap();
        let s = file(&dir).await;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&s.pool)
            .await
            .unwrap();
        assert_eq!(mode.to_ascii_lowercase(), "wal");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&s.pool)
            .await
            .unwrap();
        assert_eq!(fk, 1);
        // Writes enforce them too (they run on the writer's own
        // connection): a message for a session that does not exist is refused.
        let orphan = s
            .insert_message(&message("no-such-session", "c1", Some("m"), "hi"))
            .await;
        assert!(
            matches!(orphan, Err(StoreError::Constraint(_))),
            "{orphan:?}"
        );
        assert_eq!(rows(&s, "messages").await, 0);
    }

    /// Whatever the umask, the database, its WAL and SHM are 0600; files an
    /// older version left readable are tightened when the store opens, and
    /// the directory they are in is left as it is.
    #[tokio::test]
    async fn the_database_files_are_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let with_suffix = |suffix: &str| {
            let mut p = file_path(&dir).into_os_string();
            p.push(suffix);
            std::path::PathBuf::from(p)
        };
        // A umask that leaves everything readable: the modes must not depend on it.
        let old_umask = unsafe { libc_umask(0) };
        let s = file(&dir).await;
        s.create_session(&SessionRecord::new("s1", "u", "t", "echo"))
            .await
            .unwrap();
        let db = file_path(&dir);
        for f in [db.clone(), with_suffix("-wal"), with_suffix("-shm")] {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
        assert_eq!(mode(db.parent().unwrap()), 0o700);
        s.close().await;
        // Loosened (as an older version left them): opening tightens them.
        for f in [db.clone(), with_suffix("-wal"), with_suffix("-shm")] {
            if f.exists() {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
        std::fs::set_permissions(db.parent().unwrap(), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let s = file(&dir).await;
        unsafe { libc_umask(old_umask) };
        for f in [db.clone(), with_suffix("-wal"), with_suffix("-shm")] {
            if f.exists() {
                assert_eq!(mode(&f), 0o600, "{}", f.display());
            }
        }
        assert_eq!(
            mode(db.parent().unwrap()),
            0o755,
            "an existing directory is not the store's to change"
        );
        s.close().await;
    }

    unsafe extern "C" {
        #[link_name = "umask"]
        fn libc_umask(mask: u32) -> u32;
    }

    /// Commits never checkpoint (automatic checkpoints are off on the
    /// writer's connection); the WAL still reaches the database file, in the
    /// background, once the writer is idle.
    #[tokio::test]
    async fn the_wal_is_checkpointed_into_the_database_once_writes_pause() {
        let dir = tempfile::tempdir().unwrap();
        let s = file(&dir).await;
        s.create_session(&session("s1", "alice", 1_000))
            .await
            .unwrap();
        let db = file_path(&dir);
        let before = std::fs::metadata(&db).unwrap().len();
        let payload = "x".repeat(4000);
        for batch in 0..50u64 {
            let events: Vec<StoredEvent> = (0..10)
                .map(|i| StoredEvent {
                    seq: batch * 10 + i + 1,
                    json: payload.clone(),
                })
                .collect();
            s.write_session("s1", SessionWrite::events(&events))
                .await
                .unwrap();
        }
        // About 2 MB went to the WAL; once idle, the database file holds it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let after = loop {
            let len = std::fs::metadata(&db).unwrap().len();
            if len > before + 1_500_000 || std::time::Instant::now() > deadline {
                break len;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            after > before + 1_500_000,
            "the database file grew from {before} to only {after} bytes"
        );
        assert_eq!(rows(&s, "session_events").await, 500);
    }

    /// A burst that grew the WAL past the limit leaves no big WAL at rest:
    /// the idle writer's checkpoint truncates it.
    #[tokio::test]
    async fn a_big_wal_is_truncated_once_writes_pause() {
        let dir = tempfile::tempdir().unwrap();
        let s = file(&dir).await;
        s.create_session(&session("s1", "alice", 1_000))
            .await
            .unwrap();
        let wal = format!("{}-wal", file_path(&dir).display());
        let payload = "x".repeat(8000);
        let limit = crate::group_commit::WAL_TRUNCATE_ABOVE_BYTES;
        let mut peak = 0;
        let mut seq = 0;
        // Batches back to back (no idle pause): the WAL grows past the limit.
        while peak <= limit {
            let events: Vec<StoredEvent> = (0..50)
                .map(|_| {
                    seq += 1;
                    StoredEvent {
                        seq,
                        json: payload.clone(),
                    }
                })
                .collect();
            s.write_session("s1", SessionWrite::events(&events))
                .await
                .unwrap();
            peak = peak.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            assert!(seq < 5_000, "the WAL never grew past {limit} bytes");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let at_rest = loop {
            let len = std::fs::metadata(&wal).map_or(0, |m| m.len());
            if len <= limit || std::time::Instant::now() > deadline {
                break len;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            at_rest <= limit,
            "the WAL peaked at {peak} bytes and is still {at_rest} at rest (limit {limit})"
        );
        // Nothing was lost by the truncation, and writing goes on.
        assert_eq!(rows(&s, "session_events").await, seq as i64);
        let more = [StoredEvent {
            seq: seq + 1,
            json: "{}".into(),
        }];
        s.write_session("s1", SessionWrite::events(&more))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn memory_store_survives_idle_connections() {
        let s = memory().await;
        s.ensure_user("alice").await.unwrap();
        // Many sequential pool checkouts all see the same database.
        for _ in 0..20 {
            assert_eq!(rows(&s, "users").await, 1);
        }
        // Two in-memory stores are independent.
        let other = memory().await;
        assert_eq!(rows(&other, "users").await, 0);
    }

    #[tokio::test]
    async fn open_dispatches_on_url() {
        match crate::open("mysql://x").await {
            Err(StoreError::UnsupportedUrl(url)) => assert_eq!(url, "mysql://x"),
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("mysql:// must be rejected"),
        }
        let store = crate::open("sqlite::memory:").await.unwrap();
        store.ping().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = crate::open(&file_url(&dir)).await.unwrap();
        store.ensure_user("u").await.unwrap();
    }

    #[test]
    fn timestamps_roundtrip_at_millisecond_precision() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        assert_eq!(to_ms(t), 1_700_000_000_123);
        assert_eq!(
            from_ms(to_ms(t)).unwrap(),
            OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_000_000).unwrap()
        );
        assert_eq!(to_ms(from_ms(-1_500).unwrap()), -1_500);
    }
}

#[cfg(test)]
mod task_binding_tests {
    use super::*;

    #[tokio::test]
    async fn runner_seq_is_stored_with_events_and_reset_on_a_new_task() {
        let store = SqliteStore::open("sqlite::memory:").await.unwrap();
        store
            .create_session(&SessionRecord::new("s1", "u", "t", "echo"))
            .await
            .unwrap();
        store
            .set_session_task("s1", Some("t-1"), None)
            .await
            .unwrap();
        let ev = |seq| StoredEvent {
            seq,
            json: format!("{{\"seq\":{seq}}}"),
        };
        store
            .write_session(
                "s1",
                SessionWrite::events(&[ev(1), ev(2)]).with_ack("t-1", 7),
            )
            .await
            .unwrap();
        store
            .write_session("s1", SessionWrite::events(&[ev(3)]))
            .await
            .unwrap();
        let got = store.get_session("s1").await.unwrap().unwrap();
        assert_eq!(
            (got.task_id.as_deref(), got.runner_seq, got.last_seq),
            (Some("t-1"), 7, 3)
        );
        // A batch written late (a retry overtaken by a later one) never
        // lowers the count.
        store
            .write_session("s1", SessionWrite::events(&[ev(2)]).with_ack("t-1", 5))
            .await
            .unwrap();
        assert_eq!(
            store.get_session("s1").await.unwrap().unwrap().runner_seq,
            7
        );
        store
            .set_session_task("s1", Some("t-2"), None)
            .await
            .unwrap();
        let got = store.get_session("s1").await.unwrap().unwrap();
        assert_eq!((got.task_id.as_deref(), got.runner_seq), (Some("t-2"), 0));
        // The old task's late batch is stored but does not count for the
        // new task's frames.
        store
            .write_session("s1", SessionWrite::events(&[ev(4)]).with_ack("t-1", 9))
            .await
            .unwrap();
        let got = store.get_session("s1").await.unwrap().unwrap();
        assert_eq!((got.runner_seq, got.last_seq), (0, 4));
        store
            .write_session("s1", SessionWrite::events(&[ev(5)]).with_ack("t-2", 2))
            .await
            .unwrap();
        assert_eq!(
            store.get_session("s1").await.unwrap().unwrap().runner_seq,
            2
        );
        store.set_session_task("s1", None, None).await.unwrap();
        assert_eq!(
            store.get_session("s1").await.unwrap().unwrap().task_id,
            None
        );
    }
}

#[cfg(test)]
mod usage_tests {
    use super::*;

    #[tokio::test]
    async fn usage_counts_open_and_closed_tasks_per_user() {
        let store = SqliteStore::open("sqlite::memory:").await.unwrap();
        store.usage_start("t1", "s1", "alice").await.unwrap();
        store.usage_start("t2", "s2", "bob").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        store.usage_end("t1").await.unwrap();
        store.usage_end("t1").await.unwrap();
        let week_ago = time::OffsetDateTime::now_utc() - time::Duration::days(7);
        let all = store.usage_since(week_ago, None).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            (all[0].user_id.as_str(), all[0].seconds, all[0].tasks),
            ("alice", 1, 1)
        );
        assert_eq!(all[1].user_id, "bob");
        let bob = store.usage_since(week_ago, Some("bob")).await.unwrap();
        assert_eq!(bob.len(), 1);
        // Nothing overlaps a window that starts in the future.
        let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        assert!(store.usage_since(later, None).await.unwrap().is_empty());
    }
}
