//! The conformance suite (tests/conformance) against the PostgreSQL store,
//! each test on a database of its own, plus what only PostgreSQL has:
//! several gateways on one database, and its error mapping.
//!
//! Needs a PostgreSQL installation (tests/support/postgres.rs starts a
//! throwaway cluster) or a server named by `AISHELL_TEST_DATABASE_URL`.
#![cfg(feature = "postgres")]

mod conformance;
mod support {
    pub mod postgres;
}

use std::sync::Arc;

use aishell_store::{PgStore, SessionRecord, SessionWrite, Store, StoreError, StoredEvent};
use sqlx::Connection;
use support::postgres::TestDatabase;

/// A fresh database, opened through `aishell_store::open` as the gateway
/// does.
async fn fresh() -> (Arc<dyn Store>, TestDatabase) {
    let db = TestDatabase::create().await;
    let store = aishell_store::open(&db.url)
        .await
        .unwrap_or_else(|e| panic!("open {}: {e}", db.url));
    (store, db)
}

mod suite {
    crate::conformance::conformance_tests!(super::fresh());
}

fn events(range: std::ops::RangeInclusive<u64>) -> Vec<StoredEvent> {
    range
        .map(|seq| StoredEvent {
            seq,
            json: format!(r#"{{"seq":{seq}}}"#),
        })
        .collect()
}

/// Gateways starting together all migrate the same database; then each
/// sees what the other wrote, and their overlapping writes of one session's
/// events (a session moving between gateways) neither duplicate events nor
/// lower its counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_gateways_share_one_database() {
    let db = TestDatabase::create().await;
    let (a, b) = tokio::join!(PgStore::open(&db.url), PgStore::open(&db.url));
    let (a, b) = (a.unwrap(), b.unwrap());
    a.create_session(&SessionRecord::new("s1", "alice", "trace", "echo"))
        .await
        .unwrap();
    assert_eq!(b.get_session("s1").await.unwrap().unwrap().user_id, "alice");

    let mut writers = Vec::new();
    for (i, store) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        writers.push(tokio::spawn(async move {
            // Overlapping ranges: 1..=100, 51..=150, 101..=200, 151..=250.
            let start = 1 + 50 * i as u64;
            for chunk in events(start..=start + 99).chunks(10) {
                store
                    .write_session("s1", SessionWrite::events(chunk))
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    for store in [&a, &b] {
        assert_eq!(
            store.get_session("s1").await.unwrap().unwrap().last_seq,
            250
        );
        assert_eq!(
            store.events_after("s1", 0, 1_000).await.unwrap(),
            events(1..=250)
        );
    }
    // A message deduplicated across gateways: exactly one of two racing
    // inserts stores it.
    let message = aishell_store::MessageRecord {
        session_id: "s1".into(),
        conversation_id: "c1".into(),
        client_msg_id: Some("m1".into()),
        role: aishell_store::MessageRole::User,
        content: "hi".into(),
        created_at: time::OffsetDateTime::now_utc(),
    };
    let (x, y) = tokio::join!(a.insert_message(&message), b.insert_message(&message));
    assert!(
        x.unwrap() ^ y.unwrap(),
        "exactly one insert stores the message"
    );
    assert_eq!(a.list_messages("s1", "c1").await.unwrap().len(), 1);
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn data_survives_reopen_and_migrations_rerun_as_no_ops() {
    let db = TestDatabase::create().await;
    let plain = {
        let s = PgStore::open(&db.url).await.unwrap();
        let (_, plain) = s.create_token("alice", "t", false, None).await.unwrap();
        s.create_session(&SessionRecord::new("s1", "alice", "trace", "echo"))
            .await
            .unwrap();
        s.write_session("s1", SessionWrite::events(&events(1..=3)))
            .await
            .unwrap();
        s.close().await;
        plain
    };
    let s = PgStore::open(&db.url).await.unwrap();
    assert_eq!(
        s.verify_token(&plain).await.unwrap().unwrap().user_id,
        "alice"
    );
    assert_eq!(s.get_session("s1").await.unwrap().unwrap().last_seq, 3);
    assert_eq!(s.events_after("s1", 0, 10).await.unwrap(), events(1..=3));
    // `postgresql://` is the same scheme.
    let url = db.url.replacen("postgres://", "postgresql://", 1);
    let other = aishell_store::open(&url).await.unwrap();
    assert_eq!(other.list_sessions(None).await.unwrap().len(), 1);
    s.close().await;
}

/// Errors reach the trait as store errors, not driver types: a broken
/// constraint is `Constraint`, a server that does not answer `Unavailable`.
#[tokio::test]
async fn errors_are_mapped_to_store_errors() {
    let (s, _db) = fresh().await;
    match s.upsert_conversation("missing", "c1", None, None).await {
        Err(StoreError::Constraint(message)) => {
            assert!(message.contains("23503"), "{message}")
        }
        other => panic!("expected a Constraint error, got {other:?}"),
    }
    // Nothing listens on this port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://nobody:secret@127.0.0.1:{port}/x");
    match aishell_store::open(&url).await {
        Err(StoreError::Unavailable(message)) => {
            assert!(!message.contains("secret"), "{message}")
        }
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("nothing listens on {port}"),
    }
}

/// Only the SHA-256 of a token is stored: the plaintext is nowhere in its
/// row, whatever the column.
#[tokio::test]
async fn plaintext_token_is_never_stored() {
    let (s, db) = fresh().await;
    let (_, plain) = s.create_token("alice", "t", false, None).await.unwrap();
    let secret = &plain[aishell_store::token::PREFIX.len()..];
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT row_to_json(t)::TEXT, token_hash FROM tokens t")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    assert!(
        !rows[0].0.contains(secret),
        "plaintext leaked: {}",
        rows[0].0
    );
    assert_eq!(rows[0].1, aishell_store::token::hash(&plain));
    conn.close().await.unwrap();
}

/// The one known difference from SQLite: PostgreSQL text cannot hold a NUL
/// character, so such a message is refused (whole, not truncated) where
/// SQLite stores it.
#[tokio::test]
async fn a_nul_character_is_refused_whole() {
    let (s, _db) = fresh().await;
    s.create_session(&SessionRecord::new("s1", "alice", "trace", "echo"))
        .await
        .unwrap();
    let message = aishell_store::MessageRecord {
        session_id: "s1".into(),
        conversation_id: "c1".into(),
        client_msg_id: Some("m1".into()),
        role: aishell_store::MessageRole::User,
        content: "before\0after".into(),
        created_at: time::OffsetDateTime::now_utc(),
    };
    let err = s.insert_message(&message).await.expect_err("NUL in text");
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert!(s.list_conversations("s1").await.unwrap().is_empty());
}
