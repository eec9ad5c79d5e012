//! `aishell_store::copy`: a realistic SQLite install copied into
//! PostgreSQL, compared table by table (every column, and through each
//! store's own read methods), copied again (nothing duplicated), after an
//! interrupted run, and refused on a conflicting or foreign target.
//!
//! Needs a PostgreSQL installation (tests/support/postgres.rs starts a
//! throwaway cluster) or a server named by `AISHELL_TEST_DATABASE_URL`.
#![cfg(feature = "postgres")]

mod support {
    pub mod postgres;
}

use std::str::FromStr;

use aishell_store::copy::{self, CopyError, Table, TableProgress};
use aishell_store::{
    MessageRecord, MessageRole, PgStore, SessionRecord, SessionState, SessionWrite, SqliteStore,
    Store, StoredEvent,
};
use sqlx::{Connection, Row};
use support::postgres::TestDatabase;
use time::{Duration, OffsetDateTime};

/// Small batches, so every table of the install spans several.
const BATCH: usize = 64;

/// Plaintexts of the install's tokens.
struct Tokens {
    valid: String,
    revoked: String,
    expired: String,
}

fn events(range: std::ops::RangeInclusive<u64>) -> Vec<StoredEvent> {
    range
        .map(|seq| StoredEvent {
            seq,
            json: format!(r#"{{"type":"output","seq":{seq},"text":"line {seq}"}}"#),
        })
        .collect()
}

fn message(
    session: &str,
    conv: &str,
    client: Option<&str>,
    role: MessageRole,
    text: &str,
) -> MessageRecord {
    MessageRecord {
        session_id: session.into(),
        conversation_id: conv.into(),
        client_msg_id: client.map(str::to_string),
        role,
        content: text.into(),
        created_at: OffsetDateTime::now_utc(),
    }
}

/// Two users' install, written through the `Store` trait as a gateway would.
async fn fill(s: &SqliteStore) -> Tokens {
    let (_, valid) = s.create_token("alice", "laptop", true, None).await.unwrap();
    let (revoked_record, revoked) = s.create_token("alice", "old", false, None).await.unwrap();
    assert!(s.revoke_token(&revoked_record.id).await.unwrap());
    let past = OffsetDateTime::now_utc() - Duration::hours(1);
    let (_, expired) = s
        .create_token("bob", "ci", false, Some(past))
        .await
        .unwrap();
    let future = OffsetDateTime::now_utc() + Duration::days(30);
    s.create_token("bob", "phone", false, Some(future))
        .await
        .unwrap();

    let sessions = [
        ("sa1", "alice", SessionState::Running, 260),
        ("sa2", "alice", SessionState::Stopped, 40),
        ("sb1", "bob", SessionState::Idle, 120),
        ("sb2", "bob", SessionState::Stopped, 0),
    ];
    for (i, (id, user, state, n_events)) in sessions.into_iter().enumerate() {
        s.create_session(&SessionRecord::new(
            id,
            user,
            &format!("trace-{id}"),
            "shell",
        ))
        .await
        .unwrap();
        let task = format!("task-{id}");
        s.set_session_task(id, Some(&task), None).await.unwrap();
        s.usage_start(&task, id, user).await.unwrap();
        for chunk in events(1..=n_events).chunks(50) {
            let last = chunk.last().unwrap().seq;
            s.write_session(id, SessionWrite::events(chunk).with_ack(&task, last))
                .await
                .unwrap();
        }
        s.write_session(id, SessionWrite::state(state))
            .await
            .unwrap();
        if state == SessionState::Stopped {
            s.usage_end(&task).await.unwrap();
            s.set_session_task(id, None, None).await.unwrap();
        }
        // Conversations with resume handles, in creation order, and their
        // messages (client ids on the user's, none on the replies).
        for c in 0..=i {
            let conv = format!("c{c}");
            s.upsert_conversation(id, &conv, Some(&format!("topic {c}")), None)
                .await
                .unwrap();
            for m in 0..3 {
                let client = format!("{id}-{conv}-m{m}");
                s.insert_message(&message(id, &conv, Some(&client), MessageRole::User, "ls"))
                    .await
                    .unwrap();
                s.insert_message(&message(id, &conv, None, MessageRole::Assistant, "a\nb"))
                    .await
                    .unwrap();
            }
            s.upsert_conversation(id, &conv, None, Some(&format!("resume-{id}-{c}")))
                .await
                .unwrap();
        }
    }
    // A task that ended before its session's current one.
    s.usage_start("task-old", "sa1", "alice").await.unwrap();
    s.usage_end("task-old").await.unwrap();
    Tokens {
        valid,
        revoked,
        expired,
    }
}

/// Every table's rows, every column, in key order, one string per row.
/// Conversations' creation order is SQLite's rowid and PostgreSQL's
/// `position`.
const DUMPS: [(&str, &str, &str); 7] = [
    ("users", "id:t, is_admin:b, created_at:i", "id"),
    (
        "tokens",
        "id:t, user_id:t, name:t, token_hash:t, is_admin:b, created_at:i, expires_at:i, revoked_at:i",
        "id",
    ),
    (
        "sessions",
        "id:t, user_id:t, state:t, created_at:i, updated_at:i, last_seq:i, trace_id:t, agent:t, task_id:t, runner_seq:i",
        "id",
    ),
    (
        "conversations",
        "session_id:t, id:t, ORDER:i, title:t, resume_handle:t, created_at:i, updated_at:i",
        "session_id, id",
    ),
    (
        "messages",
        "id:i, session_id:t, conversation_id:t, client_msg_id:t, role:t, content:t, created_at:i",
        "id",
    ),
    (
        "session_events",
        "session_id:t, seq:i, json:t, created_at:i",
        "session_id, seq",
    ),
    (
        "usage",
        "task_id:t, session_id:t, user_id:t, started_at:i, ended_at:i",
        "task_id",
    ),
];

fn dump_sql(table: &str, columns: &str, key: &str, order_column: &str) -> (String, Vec<char>) {
    let (names, kinds): (Vec<&str>, Vec<char>) = columns
        .split(", ")
        .map(|c| {
            let (name, kind) = c.split_once(':').unwrap();
            let name = if name == "ORDER" { order_column } else { name };
            (name, kind.chars().next().unwrap())
        })
        .unzip();
    (
        format!("SELECT {} FROM {table} ORDER BY {key}", names.join(", ")),
        kinds,
    )
}

fn render<R: Row>(row: &R, kinds: &[char]) -> String
where
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<bool>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    usize: sqlx::ColumnIndex<R>,
{
    kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| match kind {
            't' => format!("{:?}", row.get::<Option<String>, _>(i)),
            'i' => format!("{:?}", row.get::<Option<i64>, _>(i)),
            _ => format!("{:?}", row.get::<Option<bool>, _>(i)),
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

async fn dump_sqlite(url: &str) -> Vec<(String, Vec<String>)> {
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .unwrap()
        .read_only(true);
    let mut db = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    let mut dump = Vec::new();
    for (table, columns, key) in DUMPS {
        let (sql, kinds) = dump_sql(table, columns, key, "rowid");
        let rows = sqlx::query(&sql).fetch_all(&mut db).await.unwrap();
        dump.push((
            table.to_string(),
            rows.iter().map(|r| render(r, &kinds)).collect(),
        ));
    }
    db.close().await.unwrap();
    dump
}

async fn dump_postgres(url: &str) -> Vec<(String, Vec<String>)> {
    let mut db = sqlx::PgConnection::connect(url).await.unwrap();
    let mut dump = Vec::new();
    for (table, columns, key) in DUMPS {
        let (sql, kinds) = dump_sql(table, columns, key, "position");
        let rows = sqlx::query(&sql).fetch_all(&mut db).await.unwrap();
        dump.push((
            table.to_string(),
            rows.iter().map(|r| render(r, &kinds)).collect(),
        ));
    }
    db.close().await.unwrap();
    dump
}

async fn assert_tables_equal(sqlite_url: &str, pg_url: &str) {
    let (source, target) = (dump_sqlite(sqlite_url).await, dump_postgres(pg_url).await);
    for ((table, source_rows), (_, target_rows)) in source.iter().zip(&target) {
        assert!(!source_rows.is_empty(), "the install fills {table}");
        assert_eq!(source_rows, target_rows, "table {table} differs");
    }
}

/// What each store's own read methods return, for everything.
async fn read_all(s: &dyn Store) -> String {
    let mut out = String::new();
    out += &format!("{:?}\n", s.list_tokens(None).await.unwrap());
    let sessions = s.list_sessions(None).await.unwrap();
    out += &format!("{sessions:?}\n");
    for session in &sessions {
        let conversations = s.list_conversations(&session.id).await.unwrap();
        out += &format!("{conversations:?}\n");
        for c in &conversations {
            out += &format!("{:?}\n", s.list_messages(&session.id, &c.id).await.unwrap());
        }
        out += &format!(
            "{:?}\n",
            s.events_after(&session.id, 0, u32::MAX).await.unwrap()
        );
    }
    // Open tasks count up to now: compare who used how many tasks.
    let since = OffsetDateTime::now_utc() - Duration::days(1);
    let usage: Vec<(String, u64)> = s
        .usage_since(since, None)
        .await
        .unwrap()
        .into_iter()
        .map(|u| (u.user_id, u.tasks))
        .collect();
    out += &format!("{usage:?}\n");
    out
}

async fn run_copy(from: &str, to: &str) -> Result<Vec<TableProgress>, CopyError> {
    let mut last_seen = Vec::new();
    let report = copy::sqlite_to_postgres(from, to, BATCH, |p| last_seen.push(*p)).await;
    if let Ok(report) = &report {
        // Progress ends with each table's totals, marked done.
        for done in report {
            assert!(last_seen.contains(done) && done.done, "{done:?}");
        }
    }
    report
}

fn file_digest(path: &std::path::Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_is_copied_whole_once_and_conflicts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("aishell.db");
    let sqlite_url = format!("sqlite://{}", db_path.display());
    let source = SqliteStore::open(&sqlite_url).await.unwrap();
    let tokens = fill(&source).await;
    // Read before any copy: opening the file read-write again could
    // change its bytes, which must stay the same through every copy.
    let source_view = read_all(&source).await;
    source.close().await;
    let source_digest = file_digest(&db_path);
    let target = TestDatabase::create().await;

    // First copy: every row copied, the tables equal column by column.
    let report = run_copy(&sqlite_url, &target.url).await.unwrap();
    let tables: Vec<Table> = report.iter().map(|t| t.table).collect();
    assert_eq!(tables, Table::ALL);
    let copied_events = report
        .iter()
        .find(|t| t.table == Table::SessionEvents)
        .unwrap();
    assert_eq!(
        (copied_events.copied, copied_events.already_there),
        (420, 0)
    );
    assert!(report.iter().all(|t| t.already_there == 0 && t.copied > 0));
    assert_tables_equal(&sqlite_url, &target.url).await;

    // The same through each store's own read methods; tokens verify as
    // they did (hashes copied as they are).
    let pg = PgStore::open(&target.url).await.unwrap();
    assert_eq!(source_view, read_all(&pg).await);
    let record = pg.verify_token(&tokens.valid).await.unwrap().unwrap();
    assert_eq!((record.user_id.as_str(), record.is_admin), ("alice", true));
    assert!(pg.verify_token(&tokens.revoked).await.unwrap().is_none());
    assert!(pg.verify_token(&tokens.expired).await.unwrap().is_none());
    let sa1 = pg.get_session("sa1").await.unwrap().unwrap();
    assert_eq!(
        (
            sa1.state,
            sa1.last_seq,
            sa1.runner_seq,
            sa1.task_id.as_deref()
        ),
        (SessionState::Running, 260, 260, Some("task-sa1"))
    );

    // Second copy: nothing copied, nothing duplicated.
    let again = run_copy(&sqlite_url, &target.url).await.unwrap();
    for (first, second) in report.iter().zip(&again) {
        assert_eq!((second.copied, second.already_there), (0, first.copied));
    }
    assert_tables_equal(&sqlite_url, &target.url).await;

    // An interrupted copy (rows missing from the target) is completed.
    let mut db = sqlx::PgConnection::connect(&target.url).await.unwrap();
    let removed = sqlx::query("DELETE FROM session_events WHERE session_id = 'sb1' AND seq > 30")
        .execute(&mut db)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(removed, 90);
    sqlx::query("DELETE FROM messages WHERE session_id = 'sa2'")
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM usage WHERE task_id = 'task-old'")
        .execute(&mut db)
        .await
        .unwrap();
    let resumed = run_copy(&sqlite_url, &target.url).await.unwrap();
    let copied = |table| resumed.iter().find(|t| t.table == table).unwrap().copied;
    assert_eq!(copied(Table::SessionEvents), 90);
    assert_eq!(copied(Table::Messages), 12);
    assert_eq!(copied(Table::Usage), 1);
    assert_eq!(copied(Table::Users), 0);
    assert_tables_equal(&sqlite_url, &target.url).await;

    // A target row that differs from the source's: refused, with its key.
    sqlx::query("UPDATE session_events SET json = '{}' WHERE session_id = 'sa1' AND seq = 7")
        .execute(&mut db)
        .await
        .unwrap();
    let err = run_copy(&sqlite_url, &target.url).await.unwrap_err();
    assert_eq!(err.code(), "STORE_COPY_CONFLICT");
    match &err {
        CopyError::Conflict { table, key, .. } => {
            assert_eq!(*table, Table::SessionEvents);
            assert_eq!(key, r#"session_id="sa1", seq=7"#);
        }
        other => panic!("expected a conflict, got {other}"),
    }
    assert!(err.to_string().contains("json is \"{}\" there"), "{err}");
    sqlx::query("UPDATE session_events SET json = $1 WHERE session_id = 'sa1' AND seq = 7")
        .bind(&events(7..=7)[0].json)
        .execute(&mut db)
        .await
        .unwrap();
    run_copy(&sqlite_url, &target.url).await.unwrap();

    // The gateway on PostgreSQL numbers new rows after the copied ones: a
    // new conversation lists last, a new message after the copied ones.
    pg.insert_message(&message("sa1", "c9", Some("new"), MessageRole::User, "hi"))
        .await
        .unwrap();
    let conversations = pg.list_conversations("sa1").await.unwrap();
    assert_eq!(conversations.last().unwrap().id, "c9");
    assert_eq!(conversations.len(), 2);
    // ... and the target now holds rows the source does not: refused.
    let err = run_copy(&sqlite_url, &target.url).await.unwrap_err();
    assert_eq!(err.code(), "STORE_COPY_FOREIGN_ROWS");
    assert!(
        matches!(err, CopyError::ForeignRows { table: Table::Conversations, target_rows, source_rows } if target_rows == source_rows + 1),
        "{err}"
    );
    pg.close().await;
    db.close().await.unwrap();

    // The source was never written.
    assert_eq!(file_digest(&db_path), source_digest);
}

#[tokio::test]
async fn wrong_urls_are_refused_before_anything_is_opened() {
    let err = copy::sqlite_to_postgres("postgres://a@b/c", "postgres://a@b/c", BATCH, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, CopyError::SourceUrl(_)), "{err}");
    let err = copy::sqlite_to_postgres("sqlite:///x.db", "mysql://u:pw@h/d", BATCH, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, CopyError::TargetUrl(_)), "{err}");
    assert_eq!(err.code(), "STORE_COPY_BAD_URL");
    assert!(!err.to_string().contains("pw"), "{err}");
    // A missing source is not created.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.db");
    let err = copy::sqlite_to_postgres(
        &format!("sqlite://{}", missing.display()),
        "postgres://nobody@127.0.0.1:1/x",
        BATCH,
        |_| {},
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), "STORE_COPY_SOURCE_FAILED", "{err}");
    assert!(!missing.exists());
}
