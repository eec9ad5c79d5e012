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
use std::time::Duration;

use aishell_store::{
    Fence, LeaseClaim, PgStore, SessionRecord, SessionWrite, Store, StoreError, StoredEvent,
};
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

/// Gateways racing to claim the same sessions, free or expired: exactly one
/// wins each, and the other is told who did, at the winner's epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_claims_have_exactly_one_winner_per_session() {
    const SESSIONS: usize = 50;
    let db = TestDatabase::create().await;
    let (a, b) = tokio::join!(PgStore::open(&db.url), PgStore::open(&db.url));
    let (a, b) = (a.unwrap(), b.unwrap());
    a.register_gateway("gw-a", "http://a").await.unwrap();
    b.register_gateway("gw-b", "http://b").await.unwrap();
    let url = |gateway: &str| format!("http://{}", gateway.trim_start_matches("gw-"));
    // Round 1: no lease yet (both insert). Round 2: every lease expired
    // (both update the same row, one of them its last holder).
    let ttls = [Duration::from_millis(300), Duration::from_secs(60)];
    for (round, ttl) in ttls.into_iter().enumerate() {
        let epoch = round as u64 + 1;
        let start = Arc::new(tokio::sync::Barrier::new(2 * SESSIONS));
        let mut claims = Vec::new();
        for i in 0..SESSIONS {
            for (store, gateway) in [(a.clone(), "gw-a"), (b.clone(), "gw-b")] {
                let start = start.clone();
                claims.push(tokio::spawn(async move {
                    start.wait().await;
                    let claim = store
                        .claim_lease(&format!("s{i}"), gateway, ttl)
                        .await
                        .unwrap();
                    (i, gateway, claim)
                }));
            }
        }
        let mut outcomes: Vec<Vec<(&str, LeaseClaim)>> = vec![Vec::new(); SESSIONS];
        for claim in claims {
            let (i, gateway, claim) = claim.await.unwrap();
            outcomes[i].push((gateway, claim));
        }
        for (i, outcome) in outcomes.iter().enumerate() {
            let winners: Vec<&str> = outcome
                .iter()
                .filter(|(_, c)| *c == LeaseClaim::Acquired { epoch })
                .map(|(g, _)| *g)
                .collect();
            assert_eq!(winners.len(), 1, "round {round}, s{i}: {outcome:?}");
            let winner = winners[0];
            let loser = outcome.iter().find(|(g, _)| *g != winner).unwrap();
            assert_eq!(
                loser.1,
                LeaseClaim::HeldBy {
                    gateway_id: winner.to_string(),
                    internal_url: Some(url(winner)),
                    epoch,
                },
                "round {round}, s{i}"
            );
        }
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(450)).await;
        }
    }
    let leases: u64 = a
        .list_gateways()
        .await
        .unwrap()
        .iter()
        .map(|g| g.leases)
        .sum();
    assert_eq!(leases, SESSIONS as u64);
    a.close().await;
    b.close().await;
}

/// A takeover racing the old holder's fenced writes: each of those writes
/// either committed before the takeover changed the epoch, or was refused
/// whole (`LeaseLost`) — none lands after it, even one already under way
/// when the takeover committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_fences_out_the_old_holders_writes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let db = TestDatabase::create().await;
    let (a, b) = tokio::join!(PgStore::open(&db.url), PgStore::open(&db.url));
    let (a, b) = (a.unwrap(), b.unwrap());
    a.create_session(&SessionRecord::new("s1", "alice", "trace", "echo"))
        .await
        .unwrap();
    let ttl = Duration::from_millis(300);
    assert_eq!(
        a.claim_lease("s1", "gw-a", ttl).await.unwrap(),
        LeaseClaim::Acquired { epoch: 1 }
    );
    let taken_over = Arc::new(AtomicBool::new(false));

    // The old holder: two writers (seqs odd and even), each writing until
    // it has been refused a few times in a row.
    let mut writers = Vec::new();
    for writer in 0..2u64 {
        let (a, taken_over) = (a.clone(), taken_over.clone());
        writers.push(tokio::spawn(async move {
            let mut log = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let mut refused = 0;
            for k in 0.. {
                let seq = 1 + writer + 2 * k;
                let started_after_takeover = taken_over.load(Ordering::SeqCst);
                let event = [StoredEvent {
                    seq,
                    json: format!(r#"{{"old":{seq}}}"#),
                }];
                let write = SessionWrite::events(&event).fenced(Some(Fence::new("gw-a", 1)));
                let result = a.write_session("s1", write).await;
                let ok = match result {
                    Ok(()) => true,
                    Err(StoreError::LeaseLost {
                        ref session_id,
                        epoch,
                    }) if session_id == "s1" && epoch == 1 => false,
                    Err(e) => panic!("write {seq}: {e}"),
                };
                log.push((seq, started_after_takeover, ok));
                refused = if ok { 0 } else { refused + 1 };
                if refused >= 5 || std::time::Instant::now() > deadline {
                    break;
                }
            }
            log
        }));
    }

    // The other gateway takes over as soon as the lease expires.
    let epoch = loop {
        match b
            .claim_lease("s1", "gw-b", Duration::from_secs(60))
            .await
            .unwrap()
        {
            LeaseClaim::Acquired { epoch } => break epoch,
            LeaseClaim::HeldBy { gateway_id, .. } => assert_eq!(gateway_id, "gw-a"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    taken_over.store(true, Ordering::SeqCst);
    assert_eq!(epoch, 2);
    // Read once the takeover committed: an old-holder event that turns up
    // only later was committed after the epoch changed.
    let at_takeover: std::collections::BTreeSet<u64> = b
        .events_after("s1", 0, u32::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.seq)
        .collect();

    let mut written = std::collections::BTreeSet::new();
    let mut refused = 0;
    for w in writers {
        let log = w.await.unwrap();
        let mut seen_refusal = false;
        for (seq, started_after_takeover, ok) in log {
            if started_after_takeover {
                assert!(!ok, "write {seq} began after the takeover and was stored");
            }
            // Refused once, refused for good.
            assert!(!(seen_refusal && ok), "write {seq} stored after a refusal");
            seen_refusal |= !ok;
            if ok {
                written.insert(seq);
            } else {
                refused += 1;
            }
        }
        assert!(seen_refusal, "every writer was fenced out");
    }
    assert!(
        !written.is_empty() && refused > 0,
        "the race happened ({} written, {refused} refused)",
        written.len()
    );
    // What is stored is exactly what was acknowledged: no refused write
    // left an event or moved the session's counter.
    let stored: std::collections::BTreeSet<u64> = b
        .events_after("s1", 0, u32::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(stored, written);
    assert_eq!(
        stored, at_takeover,
        "old-holder events stored after the takeover"
    );
    let last = *written.iter().next_back().unwrap();
    assert_eq!(b.get_session("s1").await.unwrap().unwrap().last_seq, last);

    // The new holder writes at its epoch.
    let event = [StoredEvent {
        seq: last + 1,
        json: r#"{"new":1}"#.into(),
    }];
    b.write_session(
        "s1",
        SessionWrite::events(&event).fenced(Some(Fence::new("gw-b", epoch))),
    )
    .await
    .unwrap();
    assert_eq!(
        b.get_session("s1").await.unwrap().unwrap().last_seq,
        last + 1
    );
    a.close().await;
    b.close().await;
}

/// The old holder's fenced writes wait for a takeover in progress (they
/// lock the lease row a takeover locks to change it): when it commits they
/// are refused, when it rolls back they land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_write_waits_for_a_takeover_in_progress() {
    let (s, db) = fresh().await;
    s.create_session(&SessionRecord::new("s1", "alice", "trace", "echo"))
        .await
        .unwrap();
    assert_eq!(
        s.claim_lease("s1", "gw-a", Duration::from_secs(60))
            .await
            .unwrap(),
        LeaseClaim::Acquired { epoch: 1 }
    );
    let fence = || Some(Fence::new("gw-a", 1));
    let write = |seq: u64| {
        let s = s.clone();
        tokio::spawn(async move {
            let event = events(seq..=seq);
            let wrote = s
                .write_session("s1", SessionWrite::events(&event).fenced(fence()))
                .await;
            let bound = s.set_session_task("s1", Some("t"), fence()).await;
            (wrote, bound)
        })
    };
    let mut takeover = sqlx::PgConnection::connect(&db.url).await.unwrap();

    // A takeover that locks the row and then gives up: the write waits,
    // then lands.
    let mut tx = takeover.begin().await.unwrap();
    sqlx::query("SELECT epoch FROM session_leases WHERE session_id = 's1' FOR UPDATE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let pending = write(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "the write waits for the lease row");
    tx.rollback().await.unwrap();
    let (wrote, bound) = pending.await.unwrap();
    wrote.unwrap();
    bound.unwrap();
    assert_eq!(s.get_session("s1").await.unwrap().unwrap().last_seq, 1);

    // A takeover that commits: the waiting write is refused whole.
    s.set_session_task("s1", None, fence()).await.unwrap();
    let mut tx = takeover.begin().await.unwrap();
    sqlx::query(
        "UPDATE session_leases SET owner = 'gw-b', epoch = epoch + 1 WHERE session_id = 's1'",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let pending = write(2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "the write waits for the lease row");
    tx.commit().await.unwrap();
    let (wrote, bound) = pending.await.unwrap();
    assert!(
        matches!(wrote, Err(StoreError::LeaseLost { epoch: 1, .. })),
        "{wrote:?}"
    );
    assert!(
        matches!(bound, Err(StoreError::LeaseLost { epoch: 1, .. })),
        "{bound:?}"
    );
    let got = s.get_session("s1").await.unwrap().unwrap();
    assert_eq!((got.last_seq, got.task_id), (1, None));
    assert_eq!(s.events_after("s1", 0, 10).await.unwrap(), events(1..=1));
    takeover.close().await.unwrap();
}

/// Session writes of many sessions arriving together commit together: far
/// fewer transactions than writes (the store's writer groups them), and
/// each write still gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_many_sessions_commit_in_few_transactions() {
    let (s, db) = fresh().await;
    let n = 100;
    for i in 0..n {
        s.create_session(&SessionRecord::new(
            &format!("s{i}"),
            "alice",
            "trace",
            "echo",
        ))
        .await
        .unwrap();
    }
    let mut probe = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let commits = async |probe: &mut sqlx::PgConnection| -> i64 {
        sqlx::query_scalar(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(probe)
        .await
        .unwrap()
    };
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut probe)
        .await
        .unwrap();
    let before = commits(&mut probe).await;
    let mut handles = Vec::new();
    for i in 0..n {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let batch = events(1..=2);
            s.write_session(&format!("s{i}"), SessionWrite::events(&batch))
                .await
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    // Statistics reach the view within the stats interval (up to 1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut probe)
        .await
        .unwrap();
    let after = commits(&mut probe).await;
    for i in 0..n {
        let got = s.get_session(&format!("s{i}")).await.unwrap().unwrap();
        assert_eq!(got.last_seq, 2, "s{i}");
    }
    // The probe's own statements and the reads above count too; one
    // transaction per write would be over 200.
    assert!(
        after - before < (n as i64) / 2 + 110,
        "{} transactions for {n} writes",
        after - before
    );
}

/// A TCP proxy to PostgreSQL that can stop passing bytes on while keeping
/// every connection open, as a network that drops packets would.
struct StallingProxy {
    port: u16,
    stalled: Arc<tokio::sync::watch::Sender<bool>>,
}

impl StallingProxy {
    async fn start(target_port: u16) -> StallingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = Arc::new(tokio::sync::watch::channel(false).0);
        let flag = stalled.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                else {
                    continue;
                };
                let (a_read, a_write) = inbound.into_split();
                let (b_read, b_write) = outbound.into_split();
                tokio::spawn(pass_on(a_read, b_write, flag.subscribe()));
                tokio::spawn(pass_on(b_read, a_write, flag.subscribe()));
            }
        });
        StallingProxy { port, stalled }
    }

    fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

/// Copy `from` to `to`, holding every chunk while stalled.
async fn pass_on(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A database that stops answering without closing the connection holds
/// session writes at most the writer's deadline: they fail as unavailable
/// (callers retry), and once it answers again the next write lands on a
/// new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_database_fails_writes_in_time_and_the_writer_recovers() {
    let db = TestDatabase::create().await;
    let port: u16 = db
        .url
        .rsplit_once(':')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let proxy = StallingProxy::start(port).await;
    let url = db
        .url
        .replacen(&format!(":{port}/"), &format!(":{}/", proxy.port), 1);
    let s = PgStore::open(&url).await.unwrap();
    s.create_session(&SessionRecord::new("s1", "alice", "trace", "echo"))
        .await
        .unwrap();

    proxy.stall(true);
    let started = std::time::Instant::now();
    let stalled = s
        .write_session("s1", SessionWrite::events(&events(1..=1)))
        .await;
    let waited = started.elapsed();
    assert!(
        matches!(stalled, Err(StoreError::Unavailable(_))),
        "{stalled:?}"
    );
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(20),
        "gave up after {waited:?}"
    );

    proxy.stall(false);
    s.write_session("s1", SessionWrite::events(&events(2..=2)))
        .await
        .unwrap();
    let got = s.get_session("s1").await.unwrap().unwrap();
    assert_eq!(got.last_seq, 2);
    s.close().await;
}

/// Numbered writes of one session (a persister that hands writes over
/// without waiting): once one failed, a later one is refused, nothing of
/// it stored, until the failed one is stored when tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_numbered_write_past_a_failed_one_waits_for_it() {
    let (s, _db) = fresh().await;
    s.create_session(&SessionRecord::new("s1", "alice", "trace", "echo"))
        .await
        .unwrap();
    assert_eq!(
        s.claim_lease("s1", "gw-a", Duration::from_secs(60))
            .await
            .unwrap(),
        LeaseClaim::Acquired { epoch: 1 }
    );
    let numbered = |ordinal| {
        Some(Fence {
            ordinal,
            ..Fence::new("gw-a", 1)
        })
    };
    // Write 1 fails: PostgreSQL text cannot hold a NUL.
    let bad = [StoredEvent {
        seq: 1,
        json: "{\"text\":\"a\u{0}b\"}".into(),
    }];
    let first = s
        .write_session("s1", SessionWrite::events(&bad).fenced(numbered(1)))
        .await;
    assert!(matches!(first, Err(StoreError::Backend(_))), "{first:?}");
    // Write 2, in a later batch: refused, nothing stored.
    let second = events(2..=2);
    let refused = s
        .write_session("s1", SessionWrite::events(&second).fenced(numbered(2)))
        .await;
    assert!(matches!(refused, Err(StoreError::Write(_))), "{refused:?}");
    assert_eq!(s.get_session("s1").await.unwrap().unwrap().last_seq, 0);
    assert!(s.events_after("s1", 0, 10).await.unwrap().is_empty());
    // Unnumbered writes are not held back.
    s.set_session_task("s1", Some("t"), Some(Fence::new("gw-a", 1)))
        .await
        .unwrap();
    // Write 1 tried again (here with text PostgreSQL takes), then write 2.
    s.write_session(
        "s1",
        SessionWrite::events(&events(1..=1)).fenced(numbered(1)),
    )
    .await
    .unwrap();
    s.write_session("s1", SessionWrite::events(&second).fenced(numbered(2)))
        .await
        .unwrap();
    let stored: Vec<u64> = s
        .events_after("s1", 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(stored, vec![1, 2]);
}

/// Once closed, the store's writes fail at once instead of waiting on a
/// writer that is gone.
#[tokio::test]
async fn a_write_after_close_fails_at_once() {
    let db = TestDatabase::create().await;
    let s = PgStore::open(&db.url).await.unwrap();
    s.create_session(&SessionRecord::new("s1", "alice", "trace", "echo"))
        .await
        .unwrap();
    s.close().await;
    let late = tokio::time::timeout(
        Duration::from_secs(5),
        s.write_session("s1", SessionWrite::events(&events(1..=1))),
    )
    .await
    .expect("answered at once");
    assert!(matches!(late, Err(StoreError::Unavailable(_))), "{late:?}");
}
