//! PostgreSQL implementation of [`Store`] (the `postgres` feature), for
//! several gateways sharing one database. A plain mirror of the SQLite store:
//! the same tables and encodings (migrations-postgres/), the same contracts
//! (checked by the conformance suite in tests/conformance). Session writes
//! go through one writer that commits them in groups ([`writer`]); reads,
//! leases, the registry and tokens use the pool, one statement each (every
//! operation that changes more than one row is one statement, so it is
//! atomic without a transaction round trip).

mod writer;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use time::OffsetDateTime;

use crate::sqlite::{
    ConversationRow, GatewayRow, MessageRow, SESSION_COLUMNS, SessionRow, TOKEN_COLUMNS, TokenRow,
    epoch_from_db, from_ms, now_ms, seq_from_db, seq_to_db, to_ms, ttl_to_ms,
};
use crate::{
    ConversationRecord, Fence, GatewayRecord, LeaseClaim, MessageRecord, OwnedFence, Result,
    SessionRecord, SessionState, SessionWrite, Store, StoreError, StoredEvent, TokenRecord,
    UsageSummary, token,
};
use writer::{PgWriter, Write, Written};

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations-postgres");

/// Connections one gateway keeps to the server for reads and for what
/// the writer does not carry (the writer has one more of its own).
const POOL_SIZE: u32 = 16;

/// How long an operation waits for a free connection before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// [`Store`] backed by PostgreSQL through an sqlx pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    writer: PgWriter,
}

impl PgStore {
    /// Connect to the database `url` names (`postgres://user@host/db`,
    /// libpq-style parameters such as `sslmode` included) and bring its
    /// schema up to date. Gateways starting together may all migrate: the
    /// migrator serializes them on an advisory lock.
    pub async fn open(url: &str) -> Result<Self> {
        let options = PgConnectOptions::from_str(url).map_err(from_sqlx)?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(from_sqlx)?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        tracing::debug!("postgres store opened");
        let writer = PgWriter::start(options);
        Ok(Self { pool, writer })
    }

    /// Close every connection; further calls fail.
    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }

    /// Hand `write` to the writer (now: calls are written in call order)
    /// and wait for its commit.
    fn write(
        &self,
        write: Write,
        fence: Option<Fence<'_>>,
    ) -> impl std::future::Future<Output = Result<Written>> + Send + 'static {
        self.writer.write(write, OwnedFence::of(fence))
    }
}

/// The database's clock in unix milliseconds: every lease and gateway time
/// is taken from it (docs/cluster.md), so gateways whose clocks disagree
/// still agree on when a lease expires. `clock_timestamp()`, not `now()`:
/// a statement that waited for a lock judges expiry as of when it runs.
/// Used as `(SELECT {DB_NOW_MS} AS ms) AS clock`, evaluated once per
/// statement so every comparison in it sees the same instant.
const DB_NOW_MS: &str = "floor(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT";

/// How often `claim_lease` retries when the lease it lost changed hands
/// again (freed) before it could read the holder.
const CLAIM_ATTEMPTS: usize = 5;

/// The driver's error as a [`StoreError`] that names no driver type.
fn from_sqlx(e: sqlx::Error) -> StoreError {
    StoreError::from(e)
}

#[async_trait]
impl Store for PgStore {
    /// Session writes all go through the one writer, first in, first out.
    fn orders_writes(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(from_sqlx)?;
        Ok(())
    }

    async fn ensure_user(&self, user_id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO users (id, is_admin, created_at) VALUES ($1, FALSE, $2) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(user_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(from_sqlx)?;
        Ok(())
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
        sqlx::query(
            "INSERT INTO tokens (id, user_id, name, token_hash, is_admin, created_at, expires_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, NULL)",
        )
        .bind(&id)
        .bind(user_id)
        .bind(name)
        .bind(token::hash(&plaintext))
        .bind(is_admin)
        .bind(created_ms)
        .bind(expires_ms)
        .execute(&self.pool)
        .await
        .map_err(from_sqlx)?;
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
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_hash = $1 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $2)"
        );
        sqlx::query_as::<_, TokenRow>(&sql)
            .bind(token::hash(plaintext))
            .bind(now_ms())
            .fetch_optional(&self.pool)
            .await
            .map_err(from_sqlx)?
            .map(TokenRow::into_record)
            .transpose()
    }

    async fn list_tokens(&self, user_id: Option<&str>) -> Result<Vec<TokenRecord>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE ($1::TEXT IS NULL OR user_id = $1) \
             ORDER BY created_at, id"
        );
        sqlx::query_as::<_, TokenRow>(&sql)
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(from_sqlx)?
            .into_iter()
            .map(TokenRow::into_record)
            .collect()
    }

    async fn revoke_token(&self, token_id: &str) -> Result<bool> {
        let done =
            sqlx::query("UPDATE tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
                .bind(now_ms())
                .bind(token_id)
                .execute(&self.pool)
                .await
                .map_err(from_sqlx)?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_session(&self, session: &SessionRecord) -> Result<()> {
        self.write(
            Write::CreateSession {
                id: session.id.clone(),
                user_id: session.user_id.clone(),
                state: session.state.as_str(),
                created_at: to_ms(session.created_at),
                updated_at: to_ms(session.updated_at),
                last_seq: seq_to_db(session.last_seq)?,
                trace_id: session.trace_id.clone(),
                agent: session.agent.clone(),
            },
            None,
        )
        .await?;
        Ok(())
    }

    async fn get_session(&self, session_id: &str) -> Result<Option<SessionRecord>> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1");
        sqlx::query_as::<_, SessionRow>(&sql)
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(from_sqlx)?
            .map(SessionRow::into_record)
            .transpose()
    }

    async fn list_sessions(&self, user_id: Option<&str>) -> Result<Vec<SessionRecord>> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE ($1::TEXT IS NULL OR user_id = $1) \
             ORDER BY created_at DESC, id DESC"
        );
        sqlx::query_as::<_, SessionRow>(&sql)
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(from_sqlx)?
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
        self.write(
            Write::UpsertConversation {
                session_id: session_id.to_string(),
                conversation_id: conversation_id.to_string(),
                title: title.map(str::to_string),
                resume_handle: resume_handle.map(str::to_string),
            },
            None,
        )
        .await?;
        Ok(())
    }

    async fn list_conversations(&self, session_id: &str) -> Result<Vec<ConversationRecord>> {
        sqlx::query_as::<_, ConversationRow>(
            "SELECT id, session_id, title, resume_handle, created_at, updated_at \
             FROM conversations WHERE session_id = $1 ORDER BY created_at, position",
        )
        .bind(session_id)
        .fetch_all(&self.pool)
        .await
        .map_err(from_sqlx)?
        .into_iter()
        .map(ConversationRow::into_record)
        .collect()
    }

    async fn delete_conversation(&self, session_id: &str, conversation_id: &str) -> Result<bool> {
        // One statement: the messages and their conversation, or neither.
        let done = sqlx::query(
            "WITH gone AS (DELETE FROM messages WHERE session_id = $1 AND conversation_id = $2) \
             DELETE FROM conversations WHERE session_id = $1 AND id = $2",
        )
        .bind(session_id)
        .bind(conversation_id)
        .execute(&self.pool)
        .await
        .map_err(from_sqlx)?;
        Ok(done.rows_affected() > 0)
    }

    async fn insert_message(&self, message: &MessageRecord) -> Result<bool> {
        let written = self
            .write(
                Write::InsertMessage {
                    session_id: message.session_id.clone(),
                    conversation_id: message.conversation_id.clone(),
                    client_msg_id: message.client_msg_id.clone(),
                    role: message.role.as_str(),
                    content: message.content.clone(),
                    created_at: to_ms(message.created_at),
                },
                None,
            )
            .await?;
        Ok(matches!(written, Written::Inserted(true)))
    }

    async fn list_messages(
        &self,
        session_id: &str,
        conversation_id: &str,
    ) -> Result<Vec<MessageRecord>> {
        sqlx::query_as::<_, MessageRow>(
            "SELECT session_id, conversation_id, client_msg_id, role, content, created_at \
             FROM messages WHERE session_id = $1 AND conversation_id = $2 ORDER BY id",
        )
        .bind(session_id)
        .bind(conversation_id)
        .fetch_all(&self.pool)
        .await
        .map_err(from_sqlx)?
        .into_iter()
        .map(MessageRow::into_record)
        .collect()
    }

    async fn set_session_task(
        &self,
        session_id: &str,
        task_id: Option<&str>,
        fence: Option<Fence<'_>>,
    ) -> Result<()> {
        self.write(
            Write::SetTask {
                session_id: session_id.to_string(),
                task_id: task_id.map(str::to_string),
            },
            fence,
        )
        .await?;
        Ok(())
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
        let seqs = write
            .events
            .iter()
            .map(|e| seq_to_db(e.seq))
            .collect::<Result<Vec<_>>>()?;
        let jsons = write.events.iter().map(|e| e.json.clone()).collect();
        let ack = match write.runner_ack {
            Some((task, seq)) => Some((task.to_string(), seq_to_db(seq)?)),
            None => None,
        };
        self.write(
            Write::Session {
                session_id: session_id.to_string(),
                seqs,
                jsons,
                max_seq,
                ack,
                state: write.state.map(SessionState::as_str),
            },
            write.fence,
        )
        .await?;
        Ok(())
    }

    async fn usage_start(&self, task_id: &str, session_id: &str, user_id: &str) -> Result<()> {
        self.write(
            Write::UsageStart {
                task_id: task_id.to_string(),
                session_id: session_id.to_string(),
                user_id: user_id.to_string(),
            },
            None,
        )
        .await?;
        Ok(())
    }

    async fn usage_end(&self, task_id: &str) -> Result<()> {
        self.write(
            Write::UsageEnd {
                task_id: task_id.to_string(),
            },
            None,
        )
        .await?;
        Ok(())
    }

    async fn usage_since(
        &self,
        since: OffsetDateTime,
        user_id: Option<&str>,
    ) -> Result<Vec<UsageSummary>> {
        let rows = sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT user_id, \
                    SUM(GREATEST(0, COALESCE(ended_at, $2) - GREATEST(started_at, $1)))::BIGINT AS ms, \
                    COUNT(*) \
             FROM usage WHERE COALESCE(ended_at, $2) > $1 AND ($3::TEXT IS NULL OR user_id = $3) \
             GROUP BY user_id ORDER BY user_id",
        )
        .bind(to_ms(since))
        .bind(now_ms())
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(from_sqlx)?;
        Ok(rows
            .into_iter()
            .map(|(user_id, ms, tasks)| UsageSummary {
                user_id,
                seconds: (ms.max(0) / 1000) as u64,
                tasks: tasks.max(0) as u64,
            })
            .collect())
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
            "SELECT seq, json FROM session_events WHERE session_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3",
        )
        .bind(session_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(from_sqlx)?
        .into_iter()
        .map(|(seq, json)| {
            Ok(StoredEvent {
                seq: seq_from_db(seq)?,
                json,
            })
        })
        .collect()
    }

    async fn register_gateway(&self, gateway_id: &str, internal_url: &str) -> Result<()> {
        let sql = format!(
            "INSERT INTO gateways (id, internal_url, started_at, heartbeat_at) \
             SELECT $1, $2, clock.ms, clock.ms FROM (SELECT {DB_NOW_MS} AS ms) AS clock \
             ON CONFLICT (id) DO UPDATE SET internal_url = excluded.internal_url, \
                 started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at"
        );
        sqlx::query(&sql)
            .bind(gateway_id)
            .bind(internal_url)
            .execute(&self.pool)
            .await
            .map_err(from_sqlx)?;
        Ok(())
    }

    async fn heartbeat_gateway(&self, gateway_id: &str) -> Result<()> {
        let sql = format!("UPDATE gateways SET heartbeat_at = {DB_NOW_MS} WHERE id = $1");
        sqlx::query(&sql)
            .bind(gateway_id)
            .execute(&self.pool)
            .await
            .map_err(from_sqlx)?;
        Ok(())
    }

    async fn remove_gateway(&self, gateway_id: &str) -> Result<()> {
        // One statement: the registration and its leases together. A freed
        // lease keeps its epoch (the next claim raises it).
        // Its leases locked in `session_id` order, as a renewal does.
        let sql = format!(
            "WITH gone AS (DELETE FROM gateways WHERE id = $1) \
             UPDATE session_leases AS l SET owner = NULL, expires_at = LEAST(l.expires_at, {DB_NOW_MS}) \
             FROM (SELECT session_id FROM session_leases WHERE owner = $1 \
                   ORDER BY session_id FOR UPDATE) AS mine \
             WHERE l.session_id = mine.session_id AND l.owner = $1"
        );
        sqlx::query(&sql)
            .bind(gateway_id)
            .execute(&self.pool)
            .await
            .map_err(from_sqlx)?;
        Ok(())
    }

    async fn list_gateways(&self) -> Result<Vec<GatewayRecord>> {
        let sql = format!(
            "SELECT g.id, g.internal_url, g.started_at, g.heartbeat_at, \
                    (SELECT COUNT(*) FROM session_leases l \
                     WHERE l.owner = g.id AND l.expires_at > clock.ms) AS leases \
             FROM gateways g, (SELECT {DB_NOW_MS} AS ms) AS clock \
             ORDER BY g.started_at, g.id"
        );
        sqlx::query_as::<_, GatewayRow>(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(from_sqlx)?
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
        // One statement decides, so gateways racing for a session cannot
        // both win: the row's lock (or the primary key, for a first claim)
        // serializes them, and the loser re-evaluates the WHERE against the
        // winner's row. Taken when free (released), expired, or already
        // ours; the epoch stays only for a holder renewing before expiry.
        // `excluded.expires_at - $3` is the statement's one `now`.
        let claim = format!(
            "INSERT INTO session_leases AS l (session_id, owner, epoch, expires_at) \
             SELECT $1, $2, 1, clock.ms + $3 FROM (SELECT {DB_NOW_MS} AS ms) AS clock \
             ON CONFLICT (session_id) DO UPDATE SET \
                 epoch = CASE WHEN l.owner = excluded.owner \
                         AND l.expires_at > excluded.expires_at - $3 \
                     THEN l.epoch ELSE l.epoch + 1 END, \
                 owner = excluded.owner, \
                 expires_at = excluded.expires_at \
             WHERE l.owner IS NULL OR l.owner = excluded.owner \
                 OR l.expires_at <= excluded.expires_at - $3 \
             RETURNING l.epoch"
        );
        // A statement of its own (a fresh snapshot): the claim's snapshot
        // may predate the winner's row.
        let holder = format!(
            "SELECT l.owner, l.epoch, g.internal_url, \
                    (l.owner IS NOT NULL AND l.expires_at > {DB_NOW_MS}) AS held \
             FROM session_leases l LEFT JOIN gateways g ON g.id = l.owner \
             WHERE l.session_id = $1"
        );
        let ttl = ttl_to_ms(ttl);
        for _ in 0..CLAIM_ATTEMPTS {
            let claimed: Option<i64> = sqlx::query_scalar(&claim)
                .bind(session_id)
                .bind(gateway_id)
                .bind(ttl)
                .fetch_optional(&self.pool)
                .await
                .map_err(from_sqlx)?;
            if let Some(epoch) = claimed {
                return Ok(LeaseClaim::Acquired {
                    epoch: epoch_from_db(epoch)?,
                });
            }
            let row: Option<(Option<String>, i64, Option<String>, bool)> = sqlx::query_as(&holder)
                .bind(session_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(from_sqlx)?;
            match row {
                Some((Some(owner), epoch, internal_url, true)) if owner != gateway_id => {
                    return Ok(LeaseClaim::HeldBy {
                        gateway_id: owner,
                        internal_url,
                        epoch: epoch_from_db(epoch)?,
                    });
                }
                // Freed or expired between the two statements: claim again.
                _ => continue,
            }
        }
        Err(StoreError::Backend(format!(
            "the lease of session {session_id} kept changing hands; not claimed"
        )))
    }

    async fn renew_leases(&self, gateway_id: &str, ttl: Duration) -> Result<Vec<(String, u64)>> {
        // A lease a takeover changed meanwhile is re-read before it is
        // updated (READ COMMITTED), and no longer matches `owner`. The rows
        // are locked in `session_id` order first, the order the writer
        // locks them for fenced writes: a renewal and a batch wait for each
        // other but never deadlock.
        let sql = format!(
            "UPDATE session_leases AS l SET expires_at = clock.ms + $2 \
             FROM (SELECT {DB_NOW_MS} AS ms) AS clock, \
                  (SELECT session_id FROM session_leases WHERE owner = $1 \
                   ORDER BY session_id FOR UPDATE) AS mine \
             WHERE l.session_id = mine.session_id AND l.owner = $1 AND l.expires_at > clock.ms \
             RETURNING l.session_id, l.epoch"
        );
        let rows: Vec<(String, i64)> = sqlx::query_as(&sql)
            .bind(gateway_id)
            .bind(ttl_to_ms(ttl))
            .fetch_all(&self.pool)
            .await
            .map_err(from_sqlx)?;
        let mut held = rows
            .into_iter()
            .map(|(session_id, epoch)| Ok((session_id, epoch_from_db(epoch)?)))
            .collect::<Result<Vec<_>>>()?;
        held.sort();
        Ok(held)
    }

    async fn release_lease(&self, session_id: &str, gateway_id: &str, epoch: u64) -> Result<()> {
        // An epoch beyond the stored range cannot be held.
        let Ok(epoch) = i64::try_from(epoch) else {
            return Ok(());
        };
        // Owner NULL: free for anyone, this gateway included, at the next
        // epoch; its own fenced writes stop too.
        let sql = format!(
            "UPDATE session_leases SET owner = NULL, expires_at = LEAST(expires_at, {DB_NOW_MS}) \
             WHERE session_id = $1 AND owner = $2 AND epoch = $3"
        );
        sqlx::query(&sql)
            .bind(session_id)
            .bind(gateway_id)
            .bind(epoch)
            .execute(&self.pool)
            .await
            .map_err(from_sqlx)?;
        Ok(())
    }

    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        // Inserted unless present; a racing first insert is waited for, so
        // the loser's read (a statement of its own, a fresh snapshot) sees
        // the winner's value.
        let inserted: Option<Vec<u8>> = sqlx::query_scalar(
            "INSERT INTO shared_secrets (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO NOTHING RETURNING value",
        )
        .bind(name)
        .bind(candidate)
        .fetch_optional(&self.pool)
        .await
        .map_err(from_sqlx)?;
        if let Some(value) = inserted {
            return Ok(value);
        }
        sqlx::query_scalar("SELECT value FROM shared_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(from_sqlx)
    }

    async fn count_user_tasks(&self, user_id: &str) -> Result<u64> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sessions WHERE user_id = $1 AND task_id IS NOT NULL",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await
        .map_err(from_sqlx)?;
        Ok(u64::try_from(count).unwrap_or(0))
    }
}
