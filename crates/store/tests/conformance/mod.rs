//! The contract of [`Store`], as one async function per behaviour, each
//! taking a fresh, empty store. Every implementation runs all of them
//! through [`conformance_tests!`] (tests/sqlite_conformance.rs,
//! tests/postgres_conformance.rs), so the stores behave the same.
//!
//! The contracts are the SQLite store's behaviour (the reference). Where the
//! trait's documentation leaves a case open, the SQLite behaviour is pinned
//! and the test says so.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use aishell_store::{
    Fence, LeaseClaim, MessageRecord, SessionRecord, SessionState, SessionWrite, Store, StoreError,
    StoredEvent, UsageSummary, token,
};
use time::OffsetDateTime;

/// One `#[tokio::test]` per conformance function, each on the fresh store
/// `$open` (an expression awaiting to `(Arc<dyn Store>, guard)`; the guard
/// lives until the test ends).
macro_rules! conformance_tests {
    ($open:expr) => {
        crate::conformance::conformance_tests!(@each $open;
            ping_answers,
            ensure_user_is_idempotent,
            token_create_then_verify,
            wrong_token_is_rejected,
            revoked_token_is_rejected,
            expired_token_is_rejected,
            list_tokens_filters_by_user_oldest_first,
            sessions_roundtrip_and_list_newest_first,
            sessions_with_the_same_time_list_by_id_bytewise,
            a_session_id_is_created_once,
            duplicate_client_msg_id_is_dropped,
            messages_without_client_id_never_collide,
            a_message_creates_its_conversation_in_the_same_write,
            upsert_conversation_keeps_unset_fields,
            conversations_list_in_creation_order,
            conversation_needs_its_session,
            delete_conversation_deletes_its_messages,
            session_events_are_idempotent_and_ordered,
            events_after_pages_and_limits,
            a_session_write_sets_state_with_or_without_events,
            runner_seq_only_rises_and_only_for_the_bound_task,
            writes_to_a_missing_session_are_no_ops,
            session_writes_handle_large_batches,
            usage_counts_open_and_closed_tasks_per_user,
            usage_is_clipped_to_the_window,
            concurrent_writes_succeed_or_fail_alone,
            writes_handed_over_together_commit_in_order,
            text_roundtrips_unchanged,
            a_lease_is_claimed_renewed_by_its_holder_and_taken_over_after_expiry,
            fenced_writes_need_the_current_lease,
            a_refused_fenced_write_fails_alone,
            renew_leases_extends_only_unexpired_leases,
            a_released_lease_is_free_at_once,
            removing_a_gateway_frees_its_leases,
            gateways_list_oldest_first_with_their_lease_counts,
            the_first_shared_secret_wins,
            count_user_tasks_counts_bound_sessions,
        );
    };
    (@each $open:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $open.await;
                crate::conformance::$name(store).await;
            }
        )*
    };
}
pub(crate) use conformance_tests;

type S = Arc<dyn Store>;

fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap()
}

/// A RUNNING session created at `created_ms` (whole milliseconds, the
/// stores' precision, so it reads back equal).
fn session(id: &str, user: &str, created_ms: i64) -> SessionRecord {
    let t = from_ms(created_ms);
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
        role: aishell_store::MessageRole::User,
        content: content.to_string(),
        created_at: from_ms(1_700_000_000_000),
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

async fn seqs(s: &S, session: &str) -> Vec<u64> {
    s.events_after(session, 0, u32::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.seq)
        .collect()
}

async fn get(s: &S, session: &str) -> SessionRecord {
    s.get_session(session)
        .await
        .unwrap()
        .expect("session exists")
}

/// Long enough for the stores' millisecond clock to tick.
async fn tick() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}

pub async fn ping_answers(s: S) {
    s.ping().await.unwrap();
}

pub async fn ensure_user_is_idempotent(s: S) {
    s.ensure_user("alice").await.unwrap();
    s.ensure_user("alice").await.unwrap();
    // The user's tokens hang off it.
    let (rec, _) = s.create_token("alice", "t", false, None).await.unwrap();
    assert_eq!(rec.user_id, "alice");
}

pub async fn token_create_then_verify(s: S) {
    // The user is created on the way.
    let (rec, plain) = s.create_token("alice", "laptop", true, None).await.unwrap();
    assert!(token::looks_like_api_token(&plain), "{plain}");
    assert!(rec.id.starts_with("tok_"), "{}", rec.id);
    assert_eq!(
        (
            rec.user_id.as_str(),
            rec.name.as_str(),
            rec.is_admin,
            rec.revoked
        ),
        ("alice", "laptop", true, false)
    );
    assert_eq!(rec.expires_at, None);
    // The returned record is exactly what is stored (millisecond precision).
    let got = s.verify_token(&plain).await.unwrap().expect("valid token");
    assert_eq!(got, rec);
    assert_eq!(s.list_tokens(Some("alice")).await.unwrap(), vec![rec]);
}

pub async fn wrong_token_is_rejected(s: S) {
    let (_, plain) = s.create_token("alice", "t", false, None).await.unwrap();
    assert!(s.verify_token(&token::generate()).await.unwrap().is_none());
    let mut tampered = plain.clone();
    tampered.pop();
    tampered.push(if plain.ends_with('x') { 'y' } else { 'x' });
    assert!(s.verify_token(&tampered).await.unwrap().is_none());
    assert!(s.verify_token("").await.unwrap().is_none());
    // The hash itself is not a credential, nor is the public id.
    assert!(
        s.verify_token(&token::hash(&plain))
            .await
            .unwrap()
            .is_none()
    );
    let id = s.list_tokens(None).await.unwrap().remove(0).id;
    assert!(s.verify_token(&id).await.unwrap().is_none());
}

pub async fn revoked_token_is_rejected(s: S) {
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
}

pub async fn expired_token_is_rejected(s: S) {
    let past = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let future = OffsetDateTime::now_utc() + time::Duration::hours(1);
    let (rec, expired) = s
        .create_token("bob", "old", false, Some(past))
        .await
        .unwrap();
    assert!(rec.expires_at.is_some());
    assert!(s.verify_token(&expired).await.unwrap().is_none());
    // Expired tokens are still listed (not revoked).
    let listed = s.list_tokens(Some("bob")).await.unwrap();
    assert_eq!(listed, vec![rec]);
    let (rec, live) = s
        .create_token("bob", "new", false, Some(future))
        .await
        .unwrap();
    let got = s
        .verify_token(&live)
        .await
        .unwrap()
        .expect("unexpired token");
    assert_eq!(got, rec);
    // Stored at millisecond precision.
    let expires = got.expires_at.unwrap();
    assert_eq!(expires.nanosecond() % 1_000_000, 0);
    assert!((expires - future).abs() < time::Duration::milliseconds(1));
}

pub async fn list_tokens_filters_by_user_oldest_first(s: S) {
    let mut made = Vec::new();
    for (user, name) in [("alice", "a1"), ("bob", "b1"), ("alice", "a2")] {
        made.push(
            s.create_token(user, name, user == "bob", None)
                .await
                .unwrap()
                .0,
        );
        tick().await;
    }
    let names = |tokens: Vec<aishell_store::TokenRecord>| {
        tokens.into_iter().map(|t| t.name).collect::<Vec<_>>()
    };
    assert_eq!(
        names(s.list_tokens(Some("alice")).await.unwrap()),
        ["a1", "a2"]
    );
    assert_eq!(s.list_tokens(None).await.unwrap(), made);
    assert!(s.list_tokens(Some("carol")).await.unwrap().is_empty());
}

pub async fn sessions_roundtrip_and_list_newest_first(s: S) {
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

    let ids = |list: Vec<SessionRecord>| list.into_iter().map(|x| x.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_sessions(None).await.unwrap()),
        ["s3", "s2", "s1"]
    );
    assert_eq!(
        ids(s.list_sessions(Some("alice")).await.unwrap()),
        ["s3", "s1"]
    );
    assert!(s.list_sessions(Some("carol")).await.unwrap().is_empty());

    s.write_session("s1", SessionWrite::state(SessionState::Stopped))
        .await
        .unwrap();
    let s1 = get(&s, "s1").await;
    assert_eq!(s1.state, SessionState::Stopped);
    assert!(s1.updated_at > s1.created_at);
    assert_eq!(s1.created_at, from_ms(1_000));
}

/// Ties on the creation time break on the id, descending, comparing bytes
/// (so upper case sorts before lower case whatever the database's locale).
pub async fn sessions_with_the_same_time_list_by_id_bytewise(s: S) {
    for id in ["b", "B", "a", "A"] {
        s.create_session(&session(id, "u", 5_000)).await.unwrap();
    }
    let ids: Vec<_> = s
        .list_sessions(Some("u"))
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(ids, ["b", "a", "B", "A"]);
}

pub async fn a_session_id_is_created_once(s: S) {
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    let again = s.create_session(&session("s1", "bob", 2_000)).await;
    let err = again.expect_err("a second session with the same id");
    assert!(err.is_constraint_violation(), "{err:?}");
    assert_eq!(get(&s, "s1").await.user_id, "alice");
}

pub async fn duplicate_client_msg_id_is_dropped(s: S) {
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    let first = message("s1", "c1", Some("m-1"), "hello");
    assert!(s.insert_message(&first).await.unwrap());
    let again = message("s1", "c1", Some("m-1"), "hello, resent");
    assert!(!s.insert_message(&again).await.unwrap());
    // The client id is unique per session, not per conversation.
    let elsewhere = message("s1", "c2", Some("m-1"), "in another conversation");
    assert!(!s.insert_message(&elsewhere).await.unwrap());
    assert!(s.list_messages("s1", "c2").await.unwrap().is_empty());
    assert_eq!(s.list_messages("s1", "c1").await.unwrap(), vec![first]);
    // The same client id in another session is a different message.
    s.create_session(&session("s2", "alice", 1_000))
        .await
        .unwrap();
    assert!(
        s.insert_message(&message("s2", "c1", Some("m-1"), "x"))
            .await
            .unwrap()
    );
}

pub async fn messages_without_client_id_never_collide(s: S) {
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    let mut sent = Vec::new();
    for i in 0..3 {
        let mut m = message("s1", "c1", None, &format!("reply {i}"));
        m.role = aishell_store::MessageRole::Assistant;
        assert!(s.insert_message(&m).await.unwrap());
        sent.push(m);
    }
    // Oldest first, every field as stored.
    assert_eq!(s.list_messages("s1", "c1").await.unwrap(), sent);
    assert!(s.list_messages("s1", "other").await.unwrap().is_empty());
    assert!(s.list_messages("other", "c1").await.unwrap().is_empty());
}

pub async fn a_message_creates_its_conversation_in_the_same_write(s: S) {
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    assert!(
        s.insert_message(&message("s1", "new-conv", Some("m1"), "hi"))
            .await
            .unwrap()
    );
    let convs = s.list_conversations("s1").await.unwrap();
    assert_eq!(convs.len(), 1);
    assert_eq!(
        (
            convs[0].id.as_str(),
            convs[0].session_id.as_str(),
            &convs[0].title,
            &convs[0].resume_handle
        ),
        ("new-conv", "s1", &None, &None)
    );
    assert_eq!(s.list_messages("s1", "new-conv").await.unwrap().len(), 1);
    // A session that does not exist stores neither.
    let orphan = s
        .insert_message(&message("nope", "c", Some("m2"), "x"))
        .await;
    let err = orphan.expect_err("a message for a missing session");
    assert!(err.is_constraint_violation(), "{err:?}");
    assert!(s.list_conversations("nope").await.unwrap().is_empty());
    assert!(s.list_messages("nope", "c").await.unwrap().is_empty());
}

pub async fn upsert_conversation_keeps_unset_fields(s: S) {
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    s.upsert_conversation("s1", "c1", Some("First"), Some("handle-1"))
        .await
        .unwrap();
    let created = s.list_conversations("s1").await.unwrap().remove(0);
    assert_eq!(created.created_at, created.updated_at);
    s.upsert_conversation("s1", "c2", None, None).await.unwrap();
    tick().await;
    s.upsert_conversation("s1", "c1", None, None).await.unwrap();
    let convs = s.list_conversations("s1").await.unwrap();
    assert_eq!(
        convs.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["c1", "c2"]
    );
    assert_eq!(convs[0].title.as_deref(), Some("First"));
    assert_eq!(convs[0].resume_handle.as_deref(), Some("handle-1"));
    // An update moves `updated_at`, never `created_at`.
    assert_eq!(convs[0].created_at, created.created_at);
    assert!(convs[0].updated_at > created.updated_at);
    assert_eq!(convs[1].title, None);

    s.upsert_conversation("s1", "c1", None, Some("handle-2"))
        .await
        .unwrap();
    let c1 = s.list_conversations("s1").await.unwrap().remove(0);
    assert_eq!(c1.title.as_deref(), Some("First"));
    assert_eq!(c1.resume_handle.as_deref(), Some("handle-2"));
    // Conversations belong to their session.
    assert!(s.list_conversations("other").await.unwrap().is_empty());
}

/// Oldest first; conversations created within one millisecond keep their
/// creation order (not their ids' order).
pub async fn conversations_list_in_creation_order(s: S) {
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    let ids = ["z", "y", "x", "w", "v", "u"];
    for id in ids {
        s.upsert_conversation("s1", id, None, None).await.unwrap();
    }
    // Updating one does not move it.
    s.upsert_conversation("s1", "z", Some("title"), None)
        .await
        .unwrap();
    let listed: Vec<_> = s
        .list_conversations("s1")
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(listed, ids);
}

pub async fn conversation_needs_its_session(s: S) {
    let err = s
        .upsert_conversation("missing", "c1", None, None)
        .await
        .expect_err("a conversation for a missing session");
    assert!(err.is_constraint_violation(), "{err:?}");
    assert!(s.list_conversations("missing").await.unwrap().is_empty());
}

pub async fn delete_conversation_deletes_its_messages(s: S) {
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
    assert!(!s.delete_conversation("other", "c2").await.unwrap());
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
    // Its messages' client ids are free again.
    assert!(
        s.insert_message(&message("s1", "c1", Some("a"), "again"))
            .await
            .unwrap()
    );
}

pub async fn session_events_are_idempotent_and_ordered(s: S) {
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    s.write_session("s1", SessionWrite::events(&events(1..=5)))
        .await
        .unwrap();
    assert_eq!(get(&s, "s1").await.last_seq, 5);

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
    assert_eq!(s.events_after("s1", 0, 100).await.unwrap(), events(1..=7));
    assert_eq!(get(&s, "s1").await.last_seq, 7);

    // A stale batch never lowers last_seq; an empty one changes nothing.
    s.write_session("s1", SessionWrite::events(&events(1..=2)))
        .await
        .unwrap();
    assert_eq!(get(&s, "s1").await.last_seq, 7);
    let before = get(&s, "s1").await;
    s.write_session("s1", SessionWrite::events(&[]))
        .await
        .unwrap();
    assert_eq!(get(&s, "s1").await, before);

    // Events need not arrive in order, nor contiguously: they read back
    // ascending, and a seq repeated within one batch keeps its first
    // payload.
    let scrambled = [
        StoredEvent {
            seq: 10,
            json: "ten".into(),
        },
        StoredEvent {
            seq: 9,
            json: "nine".into(),
        },
        StoredEvent {
            seq: 10,
            json: "ten again".into(),
        },
    ];
    s.write_session("s1", SessionWrite::events(&scrambled))
        .await
        .unwrap();
    assert_eq!(seqs(&s, "s1").await, [1, 2, 3, 4, 5, 6, 7, 9, 10]);
    let tail = s.events_after("s1", 7, 10).await.unwrap();
    assert_eq!(
        tail.iter().map(|e| e.json.as_str()).collect::<Vec<_>>(),
        ["nine", "ten"]
    );
    assert_eq!(get(&s, "s1").await.last_seq, 10);
    // Sessions do not share events.
    assert!(s.events_after("other", 0, 10).await.unwrap().is_empty());
}

pub async fn events_after_pages_and_limits(s: S) {
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    s.write_session("s1", SessionWrite::events(&events(1..=7)))
        .await
        .unwrap();
    let page = |after, limit| {
        let s = s.clone();
        async move {
            s.events_after("s1", after, limit)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(2, 3).await, [3, 4, 5]);
    assert_eq!(page(5, 3).await, [6, 7]);
    assert_eq!(page(0, 1).await, [1]);
    assert!(page(0, 0).await.is_empty());
    assert!(page(7, 10).await.is_empty());
    assert!(page(i64::MAX as u64, 10).await.is_empty());
    assert!(page(u64::MAX, 10).await.is_empty());
    assert_eq!(page(0, u32::MAX).await, [1, 2, 3, 4, 5, 6, 7]);
    // Full payloads, not just seqs.
    assert_eq!(s.events_after("s1", 6, 1).await.unwrap(), events(7..=7));
}

pub async fn a_session_write_sets_state_with_or_without_events(s: S) {
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    // Events alone leave the state and `updated_at` as they are.
    s.write_session("s1", SessionWrite::events(&events(1..=1)))
        .await
        .unwrap();
    let got = get(&s, "s1").await;
    assert_eq!(
        (got.state.as_str(), got.updated_at),
        ("RUNNING", from_ms(1_000))
    );
    let first_two = events(2..=3);
    let with_events = SessionWrite {
        state: Some(SessionState::Idle),
        ..SessionWrite::events(&first_two)
    };
    s.write_session("s1", with_events).await.unwrap();
    let got = get(&s, "s1").await;
    assert_eq!((got.state.as_str(), got.last_seq), ("IDLE", 3));
    assert!(got.updated_at > from_ms(1_000));
    // State alone leaves the events and their counter as they are.
    s.write_session("s1", SessionWrite::state(SessionState::Stopped))
        .await
        .unwrap();
    let got = get(&s, "s1").await;
    assert_eq!((got.state.as_str(), got.last_seq), ("STOPPED", 3));
    assert_eq!(s.events_after("s1", 0, 10).await.unwrap(), events(1..=3));
}

pub async fn runner_seq_only_rises_and_only_for_the_bound_task(s: S) {
    s.create_session(&SessionRecord::new("s1", "u", "t", "echo"))
        .await
        .unwrap();
    let fresh = get(&s, "s1").await;
    assert_eq!((fresh.task_id, fresh.runner_seq), (None, 0));
    // An ack while no task is bound counts for nothing.
    s.write_session(
        "s1",
        SessionWrite::events(&events(1..=1)).with_ack("t-0", 4),
    )
    .await
    .unwrap();
    assert_eq!(get(&s, "s1").await.runner_seq, 0);

    s.set_session_task("s1", Some("t-1"), None).await.unwrap();
    s.write_session(
        "s1",
        SessionWrite::events(&events(2..=3)).with_ack("t-1", 7),
    )
    .await
    .unwrap();
    s.write_session("s1", SessionWrite::events(&events(4..=4)))
        .await
        .unwrap();
    let got = get(&s, "s1").await;
    assert_eq!(
        (got.task_id.as_deref(), got.runner_seq, got.last_seq),
        (Some("t-1"), 7, 4)
    );
    // A batch written late (a retry overtaken by a later one) never lowers
    // the count.
    s.write_session(
        "s1",
        SessionWrite::events(&events(3..=3)).with_ack("t-1", 5),
    )
    .await
    .unwrap();
    assert_eq!(get(&s, "s1").await.runner_seq, 7);

    // Binding a new task resets the count.
    s.set_session_task("s1", Some("t-2"), None).await.unwrap();
    let got = get(&s, "s1").await;
    assert_eq!((got.task_id.as_deref(), got.runner_seq), (Some("t-2"), 0));
    // The old task's late batch is stored but does not count for the new
    // task's frames.
    s.write_session(
        "s1",
        SessionWrite::events(&events(5..=5)).with_ack("t-1", 9),
    )
    .await
    .unwrap();
    let got = get(&s, "s1").await;
    assert_eq!((got.runner_seq, got.last_seq), (0, 5));
    s.write_session(
        "s1",
        SessionWrite::events(&events(6..=6)).with_ack("t-2", 2),
    )
    .await
    .unwrap();
    assert_eq!(get(&s, "s1").await.runner_seq, 2);
    // Rebinding the same task resets the count too.
    s.set_session_task("s1", Some("t-2"), None).await.unwrap();
    assert_eq!(get(&s, "s1").await.runner_seq, 0);

    s.set_session_task("s1", None, None).await.unwrap();
    let got = get(&s, "s1").await;
    assert_eq!((got.task_id, got.runner_seq), (None, 0));
}

/// Writes naming a session that does not exist fail nowhere and create no
/// session (the SQLite behaviour, pinned: the callers only write to
/// sessions they created).
pub async fn writes_to_a_missing_session_are_no_ops(s: S) {
    s.set_session_task("ghost", Some("t"), None).await.unwrap();
    s.write_session(
        "ghost",
        SessionWrite {
            state: Some(SessionState::Running),
            ..SessionWrite::events(&events(1..=2)).with_ack("t", 1)
        },
    )
    .await
    .unwrap();
    assert_eq!(s.get_session("ghost").await.unwrap(), None);
    assert!(s.list_sessions(None).await.unwrap().is_empty());
}

pub async fn session_writes_handle_large_batches(s: S) {
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    for chunk in events(1..=2_000).chunks(500) {
        s.write_session("s1", SessionWrite::events(chunk))
            .await
            .unwrap();
    }
    assert_eq!(get(&s, "s1").await.last_seq, 2_000);
    let tail = s.events_after("s1", 1_990, 1_000).await.unwrap();
    assert_eq!(tail, events(1_991..=2_000));
    assert_eq!(s.events_after("s1", 0, 5_000).await.unwrap().len(), 2_000);
}

pub async fn usage_counts_open_and_closed_tasks_per_user(s: S) {
    s.usage_start("t1", "s1", "alice").await.unwrap();
    s.usage_start("t2", "s2", "Bob").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // Starting a started task again changes nothing (it keeps its start).
    s.usage_start("t1", "s1", "alice").await.unwrap();
    s.usage_end("t1").await.unwrap();
    // Ending is idempotent, and an unknown task is no error.
    s.usage_end("t1").await.unwrap();
    s.usage_end("never-started").await.unwrap();
    let week_ago = OffsetDateTime::now_utc() - time::Duration::days(7);
    let all = s.usage_since(week_ago, None).await.unwrap();
    // One row per user, ordered by id comparing bytes ("B" < "a").
    assert_eq!(
        all.iter().map(|u| u.user_id.as_str()).collect::<Vec<_>>(),
        ["Bob", "alice"]
    );
    assert_eq!(
        all[1],
        UsageSummary {
            user_id: "alice".into(),
            seconds: 1,
            tasks: 1
        }
    );
    // An open task counts up to now.
    assert!(all[0].seconds >= 1, "{all:?}");
    assert_eq!(all[0].tasks, 1);
    // A second task of the same user adds up.
    s.usage_start("t3", "s3", "alice").await.unwrap();
    let alice = s.usage_since(week_ago, Some("alice")).await.unwrap();
    assert_eq!(alice.len(), 1);
    assert_eq!((alice[0].tasks, alice[0].seconds), (2, 1));
    assert!(
        s.usage_since(week_ago, Some("carol"))
            .await
            .unwrap()
            .is_empty()
    );
    // Nothing overlaps a window that starts in the future.
    let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
    assert!(s.usage_since(later, None).await.unwrap().is_empty());
}

/// Only the part of a task inside `[since, now]` counts; tasks that ended
/// before `since` are left out.
pub async fn usage_is_clipped_to_the_window(s: S) {
    s.usage_start("early", "s1", "alice").await.unwrap();
    s.usage_end("early").await.unwrap();
    s.usage_start("long", "s1", "alice").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let since = OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    s.usage_end("long").await.unwrap();
    let got = s.usage_since(since, None).await.unwrap();
    // 2.3 s ran in all, 1.1 s of it after `since`; "early" ended before.
    assert_eq!(
        got,
        [UsageSummary {
            user_id: "alice".into(),
            seconds: 1,
            tasks: 1
        }]
    );
}

/// Concurrent writes each commit or fail on their own: one that breaks a
/// constraint takes none of the others with it, and each is readable once
/// its caller hears "done".
pub async fn concurrent_writes_succeed_or_fail_alone(s: S) {
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..100 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            // Every third one names a session that does not exist.
            let session = if i % 3 == 0 { "missing" } else { "s1" };
            let result = s
                .upsert_conversation(session, &format!("c{i}"), None, None)
                .await;
            if result.is_ok() {
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
    let ids: HashSet<String> = s
        .list_conversations("s1")
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let expected: HashSet<String> = (0..100)
        .filter(|i| i % 3 != 0)
        .map(|i| format!("c{i}"))
        .collect();
    assert_eq!(ids, expected);
}

/// A store that says it orders writes commits writes handed over
/// together, without waiting for one before the next, in that order: a
/// session's row, its first message, its task binding and events acked
/// under that task, for many sessions at once.
pub async fn writes_handed_over_together_commit_in_order(s: S) {
    if !s.orders_writes() {
        return;
    }
    let mut handles = Vec::new();
    for i in 0..40 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let id = format!("s{i}");
            let record = session(&id, "alice", 1_000 + i);
            let first = message(&id, "c1", Some("m1"), "hi");
            let batch = events(1..=3);
            // Each future hands its write over when first polled; join
            // polls them in this order.
            let (created, inserted, bound, written) = tokio::join!(
                s.create_session(&record),
                s.insert_message(&first),
                s.set_session_task(&id, Some("t1"), None),
                s.write_session(&id, SessionWrite::events(&batch).with_ack("t1", 3)),
            );
            created.unwrap_or_else(|e| panic!("{id} created: {e}"));
            assert!(inserted.unwrap_or_else(|e| panic!("{id} message: {e}")));
            bound.unwrap_or_else(|e| panic!("{id} bound: {e}"));
            written.unwrap_or_else(|e| panic!("{id} written: {e}"));
            id
        }));
    }
    for h in handles {
        let id = h.await.unwrap();
        let got = get(&s, &id).await;
        assert_eq!(got.task_id.as_deref(), Some("t1"), "{id}");
        // The ack counted: the binding committed before the events.
        assert_eq!((got.last_seq, got.runner_seq), (3, 3), "{id}");
        assert_eq!(seqs(&s, &id).await, vec![1, 2, 3]);
        assert_eq!(s.list_messages(&id, "c1").await.unwrap().len(), 1);
    }
}

/// Text comes back byte for byte: quotes, SQL metacharacters, non-ASCII,
/// and large payloads.
pub async fn text_roundtrips_unchanged(s: S) {
    let nasty = "it's \"quoted\"; DROP TABLE sessions; -- \\ % _ $1 ? 🦀 ü\ttab\nnewline";
    s.create_session(&session(nasty, nasty, 1_000))
        .await
        .unwrap();
    assert_eq!(get(&s, nasty).await, session(nasty, nasty, 1_000));
    s.upsert_conversation(nasty, nasty, Some(nasty), Some(nasty))
        .await
        .unwrap();
    let conv = s.list_conversations(nasty).await.unwrap().remove(0);
    assert_eq!(
        (
            conv.id.as_str(),
            conv.title.as_deref(),
            conv.resume_handle.as_deref()
        ),
        (nasty, Some(nasty), Some(nasty))
    );
    let m = message(nasty, nasty, Some(nasty), nasty);
    assert!(s.insert_message(&m).await.unwrap());
    assert_eq!(s.list_messages(nasty, nasty).await.unwrap(), vec![m]);
    let big = StoredEvent {
        seq: 1,
        json: format!("{{\"text\":\"{}\"}}", "x".repeat(1 << 20)),
    };
    s.write_session(nasty, SessionWrite::events(std::slice::from_ref(&big)))
        .await
        .unwrap();
    assert_eq!(s.events_after(nasty, 0, 1).await.unwrap(), vec![big]);
    let (rec, plain) = s.create_token(nasty, nasty, false, None).await.unwrap();
    assert_eq!(s.verify_token(&plain).await.unwrap(), Some(rec));
}

// Several gateways on one database (docs/cluster.md).

/// A ttl that outlives any test.
const LONG: Duration = Duration::from_secs(60);
/// A ttl a test waits out with [`SHORT_EXPIRED`].
const SHORT: Duration = Duration::from_millis(300);
/// Sleeping this long after a claim with [`SHORT`] lets it expire.
const SHORT_EXPIRED: Duration = Duration::from_millis(450);

fn acquired(epoch: u64) -> LeaseClaim {
    LeaseClaim::Acquired { epoch }
}

fn held_by(gateway_id: &str, internal_url: Option<&str>, epoch: u64) -> LeaseClaim {
    LeaseClaim::HeldBy {
        gateway_id: gateway_id.to_string(),
        internal_url: internal_url.map(str::to_string),
        epoch,
    }
}

fn fence(gateway_id: &str, epoch: u64) -> Option<Fence<'_>> {
    Some(Fence::new(gateway_id, epoch))
}

fn assert_lease_lost(result: aishell_store::Result<()>, session: &str, epoch: u64) {
    match result {
        Err(StoreError::LeaseLost {
            session_id,
            epoch: lost,
        }) => assert_eq!((session_id.as_str(), lost), (session, epoch)),
        other => panic!("expected LeaseLost for {session} at {epoch}, got {other:?}"),
    }
}

pub async fn a_lease_is_claimed_renewed_by_its_holder_and_taken_over_after_expiry(s: S) {
    s.register_gateway("gw-a", "http://a:9000").await.unwrap();
    s.register_gateway("gw-b", "http://b:9000").await.unwrap();
    // No session row needed: a lease comes first.
    assert_eq!(
        s.claim_lease("s1", "gw-a", SHORT).await.unwrap(),
        acquired(1)
    );
    // The holder renewing keeps its epoch.
    assert_eq!(
        s.claim_lease("s1", "gw-a", SHORT).await.unwrap(),
        acquired(1)
    );
    assert_eq!(
        s.claim_lease("s1", "gw-b", SHORT).await.unwrap(),
        held_by("gw-a", Some("http://a:9000"), 1)
    );
    // A holder that never registered has no URL to give.
    assert_eq!(
        s.claim_lease("s2", "gw-x", LONG).await.unwrap(),
        acquired(1)
    );
    assert_eq!(
        s.claim_lease("s2", "gw-a", LONG).await.unwrap(),
        held_by("gw-x", None, 1)
    );

    tokio::time::sleep(SHORT_EXPIRED).await;
    assert_eq!(
        s.claim_lease("s1", "gw-b", LONG).await.unwrap(),
        acquired(2)
    );
    assert_eq!(
        s.claim_lease("s1", "gw-a", LONG).await.unwrap(),
        held_by("gw-b", Some("http://b:9000"), 2)
    );
    // A holder whose own lease expired takes it back at a new epoch (its
    // writes of the old epoch may have been overtaken).
    assert_eq!(
        s.claim_lease("s3", "gw-a", SHORT).await.unwrap(),
        acquired(1)
    );
    tokio::time::sleep(SHORT_EXPIRED).await;
    assert_eq!(
        s.claim_lease("s3", "gw-a", LONG).await.unwrap(),
        acquired(2)
    );
}

pub async fn fenced_writes_need_the_current_lease(s: S) {
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    // No lease at all: a fenced write is refused.
    assert_lease_lost(
        s.write_session(
            "s1",
            SessionWrite::events(&events(1..=1)).fenced(fence("gw-a", 1)),
        )
        .await,
        "s1",
        1,
    );
    assert!(seqs(&s, "s1").await.is_empty());

    assert_eq!(
        s.claim_lease("s1", "gw-a", SHORT).await.unwrap(),
        acquired(1)
    );
    s.write_session(
        "s1",
        SessionWrite::events(&events(1..=2)).fenced(fence("gw-a", 1)),
    )
    .await
    .unwrap();
    s.set_session_task("s1", Some("t-a"), fence("gw-a", 1))
        .await
        .unwrap();
    s.write_session(
        "s1",
        SessionWrite::events(&events(3..=3))
            .with_ack("t-a", 5)
            .fenced(fence("gw-a", 1)),
    )
    .await
    .unwrap();
    // Expired but not taken over: still this gateway's (fencing is by
    // epoch, not by expiry).
    tokio::time::sleep(SHORT_EXPIRED).await;
    s.write_session(
        "s1",
        SessionWrite::events(&events(4..=4)).fenced(fence("gw-a", 1)),
    )
    .await
    .unwrap();
    // Another gateway's fence never passes.
    assert_lease_lost(
        s.write_session(
            "s1",
            SessionWrite::events(&events(5..=5)).fenced(fence("gw-b", 1)),
        )
        .await,
        "s1",
        1,
    );

    assert_eq!(
        s.claim_lease("s1", "gw-b", LONG).await.unwrap(),
        acquired(2)
    );
    let before = get(&s, "s1").await;
    assert_eq!(
        (
            before.last_seq,
            before.task_id.as_deref(),
            before.runner_seq
        ),
        (4, Some("t-a"), 5)
    );
    // The old holder: refused, nothing written (events, counters, state,
    // task binding).
    assert_lease_lost(
        s.write_session(
            "s1",
            SessionWrite {
                state: Some(SessionState::Stopped),
                ..SessionWrite::events(&events(5..=6)).with_ack("t-a", 9)
            }
            .fenced(fence("gw-a", 1)),
        )
        .await,
        "s1",
        1,
    );
    assert_lease_lost(
        s.write_session(
            "s1",
            SessionWrite::state(SessionState::Stopped).fenced(fence("gw-a", 1)),
        )
        .await,
        "s1",
        1,
    );
    assert_lease_lost(
        s.set_session_task("s1", Some("t-stale"), fence("gw-a", 1))
            .await,
        "s1",
        1,
    );
    assert_lease_lost(
        s.set_session_task("s1", None, fence("gw-a", 1)).await,
        "s1",
        1,
    );
    // The new holder at the old epoch is refused too.
    assert_lease_lost(
        s.write_session(
            "s1",
            SessionWrite::events(&events(5..=5)).fenced(fence("gw-b", 1)),
        )
        .await,
        "s1",
        1,
    );
    assert_eq!(get(&s, "s1").await, before);
    assert_eq!(seqs(&s, "s1").await, [1, 2, 3, 4]);

    // The new holder writes at its epoch.
    s.set_session_task("s1", Some("t-b"), fence("gw-b", 2))
        .await
        .unwrap();
    s.write_session(
        "s1",
        SessionWrite {
            state: Some(SessionState::Stopped),
            ..SessionWrite::events(&events(5..=6)).with_ack("t-b", 2)
        }
        .fenced(fence("gw-b", 2)),
    )
    .await
    .unwrap();
    let got = get(&s, "s1").await;
    assert_eq!(
        (
            got.last_seq,
            got.task_id.as_deref(),
            got.runner_seq,
            got.state
        ),
        (6, Some("t-b"), 2, SessionState::Stopped)
    );
    // Unfenced writes (one gateway) are never checked.
    s.write_session("s1", SessionWrite::events(&events(7..=7)))
        .await
        .unwrap();
    s.set_session_task("s1", None, None).await.unwrap();
    assert_eq!(seqs(&s, "s1").await, [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(get(&s, "s1").await.task_id, None);
    // The events the refused writes carried are stored by nobody.
    let stored = s.events_after("s1", 4, 10).await.unwrap();
    assert_eq!(stored, events(5..=7));
}

/// Concurrent writes (which the SQLite store commits together) each stand
/// alone: a fenced write refused for a lost lease takes none of the others
/// with it.
pub async fn a_refused_fenced_write_fails_alone(s: S) {
    for id in ["lost", "held", "plain"] {
        s.create_session(&session(id, "alice", 1_000))
            .await
            .unwrap();
    }
    assert_eq!(
        s.claim_lease("lost", "gw-a", LONG).await.unwrap(),
        acquired(1)
    );
    s.release_lease("lost", "gw-a", 1).await.unwrap();
    assert_eq!(
        s.claim_lease("lost", "gw-b", LONG).await.unwrap(),
        acquired(2)
    );
    assert_eq!(
        s.claim_lease("held", "gw-a", LONG).await.unwrap(),
        acquired(1)
    );
    let mut handles = Vec::new();
    for i in 1..=60u64 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let batch = events(i..=i);
            let (session, result) = match i % 3 {
                0 => (
                    "lost",
                    s.write_session(
                        "lost",
                        SessionWrite::events(&batch).fenced(fence("gw-a", 1)),
                    )
                    .await,
                ),
                1 => (
                    "held",
                    s.write_session(
                        "held",
                        SessionWrite::events(&batch).fenced(fence("gw-a", 1)),
                    )
                    .await,
                ),
                _ => (
                    "plain",
                    s.write_session("plain", SessionWrite::events(&batch)).await,
                ),
            };
            (i, session, result)
        }));
    }
    for h in handles {
        let (i, session, result) = h.await.unwrap();
        if session == "lost" {
            assert_lease_lost(result, "lost", 1);
        } else {
            result.unwrap_or_else(|e| panic!("write {i} to {session}: {e}"));
        }
    }
    assert!(seqs(&s, "lost").await.is_empty());
    assert_eq!(get(&s, "lost").await.last_seq, 0);
    let expected = |r: u64| -> Vec<u64> { (1..=60).filter(|i| i % 3 == r).collect() };
    assert_eq!(seqs(&s, "held").await, expected(1));
    assert_eq!(seqs(&s, "plain").await, expected(2));
}

pub async fn renew_leases_extends_only_unexpired_leases(s: S) {
    let first = Duration::from_millis(600);
    for id in ["s1", "s2"] {
        assert_eq!(s.claim_lease(id, "gw-a", first).await.unwrap(), acquired(1));
    }
    assert_eq!(
        s.claim_lease("s3", "gw-a", Duration::from_millis(100))
            .await
            .unwrap(),
        acquired(1)
    );
    assert_eq!(
        s.claim_lease("other", "gw-b", LONG).await.unwrap(),
        acquired(1)
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    // s3 expired: not revived, not returned.
    assert_eq!(
        s.renew_leases("gw-a", Duration::from_secs(5))
            .await
            .unwrap(),
        [("s1".to_string(), 1), ("s2".to_string(), 1)]
    );
    // Past the first ttl: held thanks to the renewal.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        s.claim_lease("s1", "gw-b", LONG).await.unwrap(),
        held_by("gw-a", None, 1)
    );
    assert_eq!(
        s.claim_lease("s3", "gw-b", LONG).await.unwrap(),
        acquired(2)
    );
    assert_eq!(
        s.renew_leases("gw-b", LONG).await.unwrap(),
        [("other".to_string(), 1), ("s3".to_string(), 2)]
    );
    assert_eq!(
        s.renew_leases("gw-a", LONG).await.unwrap(),
        [("s1".to_string(), 1), ("s2".to_string(), 1)]
    );
    assert!(s.renew_leases("gw-none", LONG).await.unwrap().is_empty());
}

pub async fn a_released_lease_is_free_at_once(s: S) {
    s.register_gateway("gw-a", "http://a").await.unwrap();
    assert_eq!(
        s.claim_lease("s1", "gw-a", LONG).await.unwrap(),
        acquired(1)
    );
    // A stale epoch, or another gateway, releases nothing.
    s.release_lease("s1", "gw-a", 2).await.unwrap();
    s.release_lease("s1", "gw-a", 0).await.unwrap();
    s.release_lease("s1", "gw-b", 1).await.unwrap();
    s.release_lease("missing", "gw-a", 1).await.unwrap();
    assert_eq!(
        s.claim_lease("s1", "gw-b", LONG).await.unwrap(),
        held_by("gw-a", Some("http://a"), 1)
    );

    s.release_lease("s1", "gw-a", 1).await.unwrap();
    assert_eq!(
        s.claim_lease("s1", "gw-b", LONG).await.unwrap(),
        acquired(2)
    );
    // The gateway that let it go no longer writes it.
    s.create_session(&session("s1", "alice", 1_000))
        .await
        .unwrap();
    assert_lease_lost(
        s.write_session(
            "s1",
            SessionWrite::events(&events(1..=1)).fenced(fence("gw-a", 1)),
        )
        .await,
        "s1",
        1,
    );
    // Released and claimed again by the same gateway: a new epoch.
    s.release_lease("s1", "gw-b", 2).await.unwrap();
    assert!(s.renew_leases("gw-b", LONG).await.unwrap().is_empty());
    assert_eq!(
        s.claim_lease("s1", "gw-b", LONG).await.unwrap(),
        acquired(3)
    );
}

pub async fn removing_a_gateway_frees_its_leases(s: S) {
    s.register_gateway("gw-a", "http://a").await.unwrap();
    s.register_gateway("gw-b", "http://b").await.unwrap();
    for id in ["s1", "s2"] {
        assert_eq!(s.claim_lease(id, "gw-a", LONG).await.unwrap(), acquired(1));
    }
    assert_eq!(
        s.claim_lease("s3", "gw-b", LONG).await.unwrap(),
        acquired(1)
    );
    s.remove_gateway("gw-a").await.unwrap();
    let ids: Vec<String> = s
        .list_gateways()
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(ids, ["gw-b"]);
    assert!(s.renew_leases("gw-a", LONG).await.unwrap().is_empty());
    // Epochs kept: the next holder's is higher.
    for id in ["s1", "s2"] {
        assert_eq!(s.claim_lease(id, "gw-b", LONG).await.unwrap(), acquired(2));
    }
    // Another gateway's leases are untouched.
    assert_eq!(
        s.claim_lease("s3", "gw-c", LONG).await.unwrap(),
        held_by("gw-b", Some("http://b"), 1)
    );
    // Removing an unknown gateway is a no-op.
    s.remove_gateway("gw-none").await.unwrap();
    assert_eq!(s.list_gateways().await.unwrap().len(), 1);
}

pub async fn gateways_list_oldest_first_with_their_lease_counts(s: S) {
    assert!(s.list_gateways().await.unwrap().is_empty());
    let before = OffsetDateTime::now_utc() - time::Duration::seconds(5);
    s.register_gateway("gw-b", "http://b-old").await.unwrap();
    tick().await;
    s.register_gateway("gw-a", "http://a").await.unwrap();
    for id in ["s1", "s2"] {
        s.claim_lease(id, "gw-a", LONG).await.unwrap();
    }
    s.claim_lease("s3", "gw-a", Duration::from_millis(50))
        .await
        .unwrap();
    s.claim_lease("s4", "gw-b", LONG).await.unwrap();
    s.claim_lease("s5", "gw-none", LONG).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let list = s.list_gateways().await.unwrap();
    let summary: Vec<(&str, &str, u64)> = list
        .iter()
        .map(|g| (g.id.as_str(), g.internal_url.as_str(), g.leases))
        .collect();
    // s3 expired: not counted.
    assert_eq!(
        summary,
        [("gw-b", "http://b-old", 1), ("gw-a", "http://a", 2)]
    );
    let after = OffsetDateTime::now_utc() + time::Duration::seconds(5);
    for g in &list {
        assert!(before < g.started_at && g.started_at < after, "{g:?}");
        assert_eq!(g.heartbeat_at, g.started_at, "{g:?}");
    }

    // A heartbeat moves only its gateway's time.
    tick().await;
    s.heartbeat_gateway("gw-a").await.unwrap();
    s.heartbeat_gateway("gw-none").await.unwrap();
    let list = s.list_gateways().await.unwrap();
    assert!(list[1].heartbeat_at > list[1].started_at, "{:?}", list[1]);
    assert_eq!(list[0].heartbeat_at, list[0].started_at, "{:?}", list[0]);
    assert_eq!(list.len(), 2);

    // Re-registering (a restart) takes the new URL and start time: now the
    // youngest.
    tick().await;
    s.register_gateway("gw-b", "http://b-new").await.unwrap();
    let list = s.list_gateways().await.unwrap();
    let summary: Vec<(&str, &str, u64)> = list
        .iter()
        .map(|g| (g.id.as_str(), g.internal_url.as_str(), g.leases))
        .collect();
    assert_eq!(
        summary,
        [("gw-a", "http://a", 2), ("gw-b", "http://b-new", 1)]
    );
    assert_eq!(
        s.claim_lease("s4", "gw-a", LONG).await.unwrap(),
        held_by("gw-b", Some("http://b-new"), 1)
    );
}

pub async fn the_first_shared_secret_wins(s: S) {
    assert_eq!(
        s.shared_secret("runner-credential", b"first\x00\xff")
            .await
            .unwrap(),
        b"first\x00\xff"
    );
    assert_eq!(
        s.shared_secret("runner-credential", b"second")
            .await
            .unwrap(),
        b"first\x00\xff"
    );
    assert_eq!(s.shared_secret("other", b"mine").await.unwrap(), b"mine");
    // Concurrent first calls all get the one value stored.
    let mut handles = Vec::new();
    for i in 0..16u8 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            s.shared_secret("raced", &[i; 32]).await.unwrap()
        }));
    }
    let mut values = HashSet::new();
    for h in handles {
        values.insert(h.await.unwrap());
    }
    assert_eq!(values.len(), 1, "{values:?}");
    let stored = s.shared_secret("raced", b"late").await.unwrap();
    assert!(values.contains(&stored));
}

pub async fn count_user_tasks_counts_bound_sessions(s: S) {
    for (id, user) in [
        ("a1", "alice"),
        ("a2", "alice"),
        ("a3", "alice"),
        ("b1", "bob"),
    ] {
        s.create_session(&session(id, user, 1_000)).await.unwrap();
    }
    assert_eq!(s.count_user_tasks("alice").await.unwrap(), 0);
    s.set_session_task("a1", Some("t1"), None).await.unwrap();
    s.set_session_task("a2", Some("t2"), None).await.unwrap();
    s.set_session_task("b1", Some("t3"), None).await.unwrap();
    assert_eq!(s.count_user_tasks("alice").await.unwrap(), 2);
    assert_eq!(s.count_user_tasks("bob").await.unwrap(), 1);
    assert_eq!(s.count_user_tasks("carol").await.unwrap(), 0);
    s.set_session_task("a1", None, None).await.unwrap();
    assert_eq!(s.count_user_tasks("alice").await.unwrap(), 1);
}
