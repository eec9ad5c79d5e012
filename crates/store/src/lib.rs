//! Persistent state of aishell: users, hashed tokens,
//! sessions, conversations, messages and session events.
//!
//! The gateway only sees the [`Store`] trait. SQLite (a file under the data
//! dir) is the default implementation; PostgreSQL ([`PgStore`], the
//! `postgres` feature) slots in behind the same trait when `DATABASE_URL`
//! says so. Both pass the same conformance suite (`tests/conformance`).

use std::sync::Arc;

pub use aishell_protocol::SessionState;
use async_trait::async_trait;
use time::OffsetDateTime;

#[cfg(feature = "postgres")]
pub mod copy;
mod group_commit;
#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;
pub mod token;

#[cfg(feature = "postgres")]
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// What went wrong in a store, in words of its own: no driver types (the
/// drivers' errors are mapped by the `From` impls below), so callers match
/// on what happened, not on which database said it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported DATABASE_URL `{0}`: expected sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
    /// A `postgres://` URL given to a build without PostgreSQL support.
    #[error(
        "DATABASE_URL `{0}` names PostgreSQL, but this build has no PostgreSQL support: \
         rebuild with the `postgres` feature of aishell-store"
    )]
    PostgresNotBuilt(String),
    #[error("invalid stored data: {0}")]
    Corrupt(String),
    #[error("database write failed: {0}")]
    Write(String),
    /// A write broke a constraint: a row it references is missing, or its
    /// unique key is taken.
    #[error("database constraint violated: {0}")]
    Constraint(String),
    /// The database could not be reached (connection, TLS, pool exhausted).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The schema could not be brought up to date.
    #[error("database migration failed: {0}")]
    Migration(String),
    /// Any other error the database server reported.
    #[error("database error: {0}")]
    Backend(String),
    /// A fenced session write from a gateway that no longer holds the
    /// session's lease at that epoch (another gateway took the session
    /// over): nothing was written.
    #[error("session {session_id} is no longer owned by this gateway at epoch {epoch}")]
    LeaseLost { session_id: String, epoch: u64 },
}

impl StoreError {
    /// Whether the database refused a write because a row it references is
    /// missing or its unique key is taken (whichever store reported it).
    pub fn is_constraint_violation(&self) -> bool {
        matches!(self, StoreError::Constraint(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                let message = format!("{} (code {code})", db.message());
                match db.kind() {
                    sqlx::error::ErrorKind::UniqueViolation
                    | sqlx::error::ErrorKind::ForeignKeyViolation
                    | sqlx::error::ErrorKind::NotNullViolation
                    | sqlx::error::ErrorKind::CheckViolation => StoreError::Constraint(message),
                    _ => StoreError::Backend(message),
                }
            }
            e @ (sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed) => StoreError::Unavailable(e.to_string()),
            e @ (sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::TypeNotFound { .. }) => StoreError::Corrupt(e.to_string()),
            sqlx::Error::Migrate(e) => StoreError::Migration(e.to_string()),
            e => StoreError::Backend(e.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migration(e.to_string())
    }
}

/// Writes run through rusqlite (see `group_commit`).
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match &e {
            rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
                rusqlite::ErrorCode::ConstraintViolation => StoreError::Constraint(e.to_string()),
                rusqlite::ErrorCode::DatabaseBusy
                | rusqlite::ErrorCode::DatabaseLocked
                | rusqlite::ErrorCode::CannotOpen => StoreError::Unavailable(e.to_string()),
                _ => StoreError::Backend(e.to_string()),
            },
            _ => StoreError::Backend(e.to_string()),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What one [`Store::write_session`] stores.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionWrite<'a> {
    pub events: &'a [StoredEvent],
    /// `(task_id, seq)`: the last agent frame of that task among `events`.
    pub runner_ack: Option<(&'a str, u64)>,
    pub state: Option<SessionState>,
    /// Several gateways: write only while this lease holds (else
    /// [`StoreError::LeaseLost`] and nothing is written). `None`: one
    /// gateway, no check.
    pub fence: Option<Fence<'a>>,
}

/// A session lease as its holder knows it: every write of a session by a
/// gateway of several carries one, and the store refuses the write unless
/// the lease row still names this gateway at this epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence<'a> {
    pub gateway_id: &'a str,
    pub epoch: u64,
    /// The writer's number for this write among its writes of the session
    /// under this fence: rising by one per write, the same when a write is
    /// tried again; 0 when unnumbered. The PostgreSQL store refuses a
    /// numbered write past one that failed until that one is stored, so
    /// writes may be handed over without waiting and a failure still
    /// leaves no later write stored past a hole. (The SQLite store, never
    /// one of several gateways', ignores it.)
    pub ordinal: u64,
}

impl<'a> Fence<'a> {
    /// An unnumbered fence.
    pub fn new(gateway_id: &'a str, epoch: u64) -> Self {
        Fence {
            gateway_id,
            epoch,
            ordinal: 0,
        }
    }
}

/// A [`Fence`] as a store keeps it past the call (a queued write).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct OwnedFence {
    pub gateway_id: String,
    pub epoch: u64,
    pub ordinal: u64,
}

impl OwnedFence {
    pub(crate) fn of(fence: Option<Fence<'_>>) -> Option<Self> {
        fence.map(|f| OwnedFence {
            gateway_id: f.gateway_id.to_string(),
            epoch: f.epoch,
            ordinal: f.ordinal,
        })
    }
}

/// The answer to [`Store::claim_lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseClaim {
    /// The caller holds the lease now, until the database's clock passes
    /// `ttl` from now; `epoch` fences its writes.
    Acquired { epoch: u64 },
    /// Another gateway holds an unexpired lease.
    HeldBy {
        gateway_id: String,
        /// Its internal URL, from its registration (`None` if it has none).
        internal_url: Option<String>,
        epoch: u64,
    },
}

/// One gateway of several sharing the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRecord {
    pub id: String,
    /// Where other gateways reach it (relay) and its runners dial.
    pub internal_url: String,
    pub started_at: OffsetDateTime,
    pub heartbeat_at: OffsetDateTime,
    /// Unexpired session leases it holds.
    pub leases: u64,
}

impl<'a> SessionWrite<'a> {
    pub fn events(events: &'a [StoredEvent]) -> Self {
        SessionWrite {
            events,
            ..Default::default()
        }
    }

    pub fn state(state: SessionState) -> Self {
        SessionWrite {
            state: Some(state),
            ..Default::default()
        }
    }

    pub fn with_ack(self, task_id: &'a str, seq: u64) -> Self {
        SessionWrite {
            runner_ack: Some((task_id, seq)),
            ..self
        }
    }

    pub fn fenced(self, fence: Option<Fence<'a>>) -> Self {
        SessionWrite { fence, ..self }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public id (for `token list` / `token revoke`); not the secret.
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub is_admin: bool,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
    pub user_id: String,
    /// ARCHITECTURE.md, "Session state machine"; stored as its upper-case name.
    pub state: SessionState,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    /// Highest event seq persisted for this session.
    pub last_seq: u64,
    pub trace_id: String,
    /// Agent kind the session runs (`shell`, `echo`, ...).
    pub agent: String,
    /// The task the session is bound to, if any (for re-adoption after a
    /// gateway restart).
    pub task_id: Option<String>,
    /// Last agent frame seq of that task whose event is stored.
    pub runner_seq: u64,
}

impl SessionRecord {
    /// A session as it starts: created now, STOPPED (no task yet), nothing
    /// stored.
    pub fn new(id: &str, user_id: &str, trace_id: &str, agent: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        SessionRecord {
            id: id.to_string(),
            user_id: user_id.to_string(),
            state: SessionState::Stopped,
            created_at: now,
            updated_at: now,
            last_seq: 0,
            trace_id: trace_id.to_string(),
            agent: agent.to_string(),
            task_id: None,
            runner_seq: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRecord {
    pub id: String,
    pub session_id: String,
    pub title: Option<String>,
    /// The agent's own handle to continue this conversation elsewhere.
    pub resume_handle: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    pub session_id: String,
    pub conversation_id: String,
    /// Client id of a user message (dedupe key within the session).
    pub client_msg_id: Option<String>,
    pub role: MessageRole,
    pub content: String,
    pub created_at: OffsetDateTime,
}

/// Who wrote a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageRole {
    User,
    Assistant,
}

impl MessageRole {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageRole::User => "user",
            MessageRole::Assistant => "assistant",
        }
    }
}

impl std::str::FromStr for MessageRole {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "user" => Ok(MessageRole::User),
            "assistant" => Ok(MessageRole::Assistant),
            other => Err(StoreError::Corrupt(format!(
                "unknown message role `{other}`"
            ))),
        }
    }
}

/// One gateway → client event as sent (JSON), kept for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub json: String,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round-trip proving the database answers (for `/ready`).
    async fn ping(&self) -> Result<()>;

    /// Whether writes handed to the store commit in the order they were
    /// handed over, even when the caller does not wait for one before the
    /// next (SQLite's single writer does; a PostgreSQL pool runs them on
    /// several connections at once). Callers overlap dependent writes only
    /// when it does.
    fn orders_writes(&self) -> bool {
        false
    }

    /// Create the user if missing (ids are validated by the caller).
    async fn ensure_user(&self, user_id: &str) -> Result<()>;

    /// Create an opaque API token; returns the record and the plaintext,
    /// which is shown once and stored only as a hash.
    async fn create_token(
        &self,
        user_id: &str,
        name: &str,
        is_admin: bool,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<(TokenRecord, String)>;

    /// The token's record if the plaintext matches one that is neither
    /// revoked nor expired.
    async fn verify_token(&self, plaintext: &str) -> Result<Option<TokenRecord>>;

    /// Tokens of one user, or of everyone.
    async fn list_tokens(&self, user_id: Option<&str>) -> Result<Vec<TokenRecord>>;

    /// Revoke by public id; false if there was no such token.
    async fn revoke_token(&self, token_id: &str) -> Result<bool>;

    async fn create_session(&self, session: &SessionRecord) -> Result<()>;
    async fn get_session(&self, session_id: &str) -> Result<Option<SessionRecord>>;
    /// Sessions of one user, or of everyone, newest first.
    async fn list_sessions(&self, user_id: Option<&str>) -> Result<Vec<SessionRecord>>;

    /// Create the conversation or update it; `None` fields keep their value.
    async fn upsert_conversation(
        &self,
        session_id: &str,
        conversation_id: &str,
        title: Option<&str>,
        resume_handle: Option<&str>,
    ) -> Result<()>;
    /// Conversations of a session, oldest first.
    async fn list_conversations(&self, session_id: &str) -> Result<Vec<ConversationRecord>>;
    /// Delete a conversation and its messages; false if it did not exist.
    async fn delete_conversation(&self, session_id: &str, conversation_id: &str) -> Result<bool>;

    /// Store a message, creating its conversation first if needed (one
    /// write: a new session's first message waits for no other). Returns
    /// false (and stores no message) when a message with the same
    /// `client_msg_id` already exists in the session.
    async fn insert_message(&self, message: &MessageRecord) -> Result<bool>;
    /// Messages of one conversation, oldest first.
    async fn list_messages(
        &self,
        session_id: &str,
        conversation_id: &str,
    ) -> Result<Vec<MessageRecord>>;

    /// Bind the session to a task (or to none), resetting its `runner_seq`.
    /// With a fence, only while that lease holds (as [`SessionWrite::fence`]).
    async fn set_session_task(
        &self,
        session_id: &str,
        task_id: Option<&str>,
        fence: Option<Fence<'_>>,
    ) -> Result<()>;

    /// One write of a session's ordered persister, in one transaction:
    /// append `events` (ascending seq; re-appending an existing seq is a
    /// no-op) and raise the session's `last_seq`; with `runner_ack =
    /// (task_id, seq)`, raise the session's `runner_seq` (the last agent
    /// frame these events include) — only while `task_id` is still the
    /// session's bound task, and never lowering it, so a batch written late
    /// (retried, or overtaken by a pipelined later one) cannot regress it or
    /// leak one task's frame count onto the next; with `state`, set the
    /// session's state.
    async fn write_session(&self, session_id: &str, write: SessionWrite<'_>) -> Result<()>;
    /// A task started serving a session (usage accounting).
    async fn usage_start(&self, task_id: &str, session_id: &str, user_id: &str) -> Result<()>;
    /// The task stopped; idempotent.
    async fn usage_end(&self, task_id: &str) -> Result<()>;
    /// Per-user sandbox seconds overlapping `[since, now]` (open tasks count
    /// up to now), for one user or everyone.
    async fn usage_since(
        &self,
        since: OffsetDateTime,
        user_id: Option<&str>,
    ) -> Result<Vec<UsageSummary>>;

    /// Up to `limit` events with `seq > after_seq`, ascending.
    async fn events_after(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>>;

    // Several gateways on one database (docs/cluster.md). Lease times are
    // the database's clock (PostgreSQL's `now()`), never a gateway's.

    /// Register (or re-register after a restart) a gateway; its heartbeat
    /// is now.
    async fn register_gateway(&self, gateway_id: &str, internal_url: &str) -> Result<()>;
    /// The gateway is alive: its heartbeat is now.
    async fn heartbeat_gateway(&self, gateway_id: &str) -> Result<()>;
    /// A gateway leaving cleanly: its registration and all its leases go
    /// (expired at once, epochs kept).
    async fn remove_gateway(&self, gateway_id: &str) -> Result<()>;
    /// Every registered gateway, oldest first.
    async fn list_gateways(&self) -> Result<Vec<GatewayRecord>>;
    /// Take or renew the lease of one session (which need not be stored
    /// yet). Acquired when there is no lease, it has expired, or
    /// `gateway_id` holds it: then it runs until `ttl` from now. The epoch
    /// rises by one each time the lease changes hands or is taken after it
    /// expired or was released, and never falls; a holder renewing keeps its
    /// epoch.
    async fn claim_lease(
        &self,
        session_id: &str,
        gateway_id: &str,
        ttl: std::time::Duration,
    ) -> Result<LeaseClaim>;
    /// Renew, in one statement, every unexpired lease `gateway_id` holds,
    /// to `ttl` from now; returns those it still holds `(session_id, epoch)`.
    /// A lease that expired is not revived (another gateway may own it).
    async fn renew_leases(
        &self,
        gateway_id: &str,
        ttl: std::time::Duration,
    ) -> Result<Vec<(String, u64)>>;
    /// Give a lease up (the session went idle here): expired at once, only
    /// if `gateway_id` still holds it at `epoch`.
    async fn release_lease(&self, session_id: &str, gateway_id: &str, epoch: u64) -> Result<()>;
    /// A secret all gateways share (`name` e.g. "runner-credential"): the
    /// stored one, or `candidate` stored now if there was none (the first
    /// gateway's wins a race).
    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>>;
    /// Sessions of `user_id` bound to a task right now (whichever gateway
    /// runs them): per-user task limits across gateways.
    async fn count_user_tasks(&self, user_id: &str) -> Result<u64>;
}

/// Sandbox time of one user over a period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSummary {
    pub user_id: String,
    pub seconds: u64,
    pub tasks: u64,
}

/// Open the store a `DATABASE_URL` names (`sqlite://PATH`, `sqlite::memory:`,
/// or `postgres://...` with the `postgres` feature).
pub async fn open(database_url: &str) -> Result<Arc<dyn Store>> {
    if database_url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(database_url).await?))
    } else if is_postgres_url(database_url) {
        open_postgres(database_url).await
    } else {
        Err(StoreError::UnsupportedUrl(redact_password(database_url)))
    }
}

/// Whether a `DATABASE_URL` names PostgreSQL.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Arc<dyn Store>> {
    Ok(Arc::new(PgStore::open(url).await?))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(url: &str) -> Result<Arc<dyn Store>> {
    Err(StoreError::PostgresNotBuilt(redact_password(url)))
}

/// `url` with the password of its `user:password@` part (if any) replaced,
/// fit for an error message or a log line.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The authority ends at the first `/`, `?` or `#`; the credentials at
    // its last `@` (a password may itself contain `@`).
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => match authority[..at].split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{}", &rest[at + 1..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_an_unknown_one_is_corrupt_data() {
        for role in [MessageRole::User, MessageRole::Assistant] {
            assert_eq!(role.as_str().parse::<MessageRole>().unwrap(), role);
        }
        assert!(matches!(
            "system".parse::<MessageRole>(),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn driver_errors_become_store_errors_by_what_happened() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert!(matches!(StoreError::from(busy), StoreError::Unavailable(_)));
        let unique = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE),
            None,
        );
        assert!(StoreError::from(unique).is_constraint_violation());
        assert!(matches!(
            StoreError::from(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_password("postgres://app:s3cr@t@db:5432/aishell?sslmode=require"),
            "postgres://app:***@db:5432/aishell?sslmode=require"
        );
        assert_eq!(
            redact_password("postgres://app@db/aishell"),
            "postgres://app@db/aishell"
        );
        assert_eq!(redact_password("sqlite://x"), "sqlite://x");
        assert_eq!(redact_password("nonsense"), "nonsense");
    }

    #[tokio::test]
    async fn unknown_schemes_are_refused() {
        match open("mysql://u:pw@host/db").await {
            Err(StoreError::UnsupportedUrl(url)) => assert_eq!(url, "mysql://u:***@host/db"),
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("mysql:// must be rejected"),
        }
    }

    /// Without the feature, a PostgreSQL URL gets an error that says which
    /// feature is missing (and does not echo the password).
    #[cfg(not(feature = "postgres"))]
    #[tokio::test]
    async fn postgres_urls_name_the_missing_feature() {
        for url in ["postgres://u:pw@db/x", "postgresql://u:pw@db/x"] {
            let Err(err) = open(url).await else {
                panic!("{url} must be refused without the postgres feature")
            };
            assert!(matches!(err, StoreError::PostgresNotBuilt(_)), "{err:?}");
            let message = err.to_string();
            assert!(message.contains("`postgres` feature"), "{message}");
            assert!(!message.contains("pw"), "{message}");
        }
    }
}
