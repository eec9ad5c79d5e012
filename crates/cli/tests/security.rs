//! Authentication and limits end to end: JWTs, token expiry on a
//! live connection, `update_token`, frame rate limits, connection caps,
//! per-user task quotas and the warm-claim cap.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const SECRET: &str = "test-secret-for-hs256";
const ISSUER: &str = "https://idp.test";

fn jwt(sub: &str, exp_in_secs: i64, secret: &str, iss: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = json!({"sub": sub, "exp": now + exp_in_secs, "iss": iss});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn jwt_gateway(extra: &[&str]) -> Gateway {
    let mut args = vec![
        "--agent",
        "echo",
        "--jwt-secret",
        SECRET,
        "--jwt-issuer",
        ISSUER,
    ];
    args.extend_from_slice(extra);
    Gateway::start(&args)
}

fn status_of(r: Result<Client, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match r {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn jwts_are_accepted_only_when_signed_current_and_from_the_right_issuer() {
    let gw = jwt_gateway(&[]);
    let mut c = gw
        .connect_as(&jwt("alice", 60, SECRET, ISSUER), None)
        .await
        .unwrap();
    assert_eq!(c.hello["user_id"], "alice");
    c.message("m1", "hi from a jwt").await;
    assert_eq!(text_of(&c.turn().await), "hi from a jwt");
    assert_eq!(
        status_of(
            gw.connect_as(&jwt("alice", -120, SECRET, ISSUER), None)
                .await
        ),
        401,
        "expired"
    );
    assert_eq!(
        status_of(
            gw.connect_as(&jwt("alice", 60, "other-secret", ISSUER), None)
                .await
        ),
        401,
        "bad signature"
    );
    assert_eq!(
        status_of(
            gw.connect_as(&jwt("alice", 60, SECRET, "https://evil.test"), None)
                .await
        ),
        401,
        "wrong issuer"
    );
    assert_eq!(
        status_of(
            gw.connect_as(&jwt("../etc", 60, SECRET, ISSUER), None)
                .await
        ),
        401,
        "user id that could escape"
    );
    // Opaque tokens keep working beside JWTs.
    assert_eq!(status_of(gw.connect_as(&gw.token, None).await), 101);
    // A JWT for bob cannot open alice's session (told, like for a missing
    // one, that it does not exist).
    let b = gw
        .connect_as(&jwt("bob", 60, SECRET, ISSUER), Some((&c.session_id, 0)))
        .await
        .unwrap();
    assert_eq!(b.hello["error"]["code"], "SESSION_NOT_FOUND");
}

#[tokio::test]
async fn an_expiring_token_closes_the_connection_unless_refreshed_with_update_token() {
    let gw = jwt_gateway(&[]);
    let mut lapsing = gw
        .connect_as(&jwt("alice", 2, SECRET, ISSUER), None)
        .await
        .unwrap();
    let mut refreshed = gw
        .connect_as(&jwt("alice", 2, SECRET, ISSUER), None)
        .await
        .unwrap();
    refreshed
        .send(json!({"type": "update_token", "token": jwt("alice", 120, SECRET, ISSUER)}))
        .await;
    let info = refreshed.until(|v| is_type(v, "info"), WAIT).await;
    assert_eq!(info.last().unwrap()["message"], "token updated");
    // A token for someone else is refused and changes nothing.
    refreshed
        .send(json!({"type": "update_token", "token": jwt("mallory", 120, SECRET, ISSUER)}))
        .await;
    let e = refreshed.until(|v| is_type(v, "error"), WAIT).await;
    assert_eq!(e.last().unwrap()["error"]["code"], "FORBIDDEN");

    let started = Instant::now();
    let frames = lapsing
        .until(|v| is_type(v, "error"), Duration::from_secs(10))
        .await;
    assert_eq!(frames.last().unwrap()["error"]["code"], "UNAUTHORIZED");
    match lapsing.next_or_close(WAIT).await {
        Err(Some((code, _))) => assert_eq!(code, 4401),
        other => panic!("expected close 4401, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // The refreshed connection outlives the first token.
    tokio::time::sleep(Duration::from_secs(1)).await;
    refreshed.send(json!({"type": "ping", "id": 1})).await;
    let pong = refreshed.until(|v| is_type(v, "pong"), WAIT).await;
    assert_eq!(pong.last().unwrap()["id"], 1);
}

#[tokio::test]
async fn frames_past_the_rate_limit_are_refused_with_overloaded_and_the_connection_recovers() {
    let gw = Gateway::start(&["--agent", "echo", "--messages-per-second", "5"]);
    let mut c = gw.connect().await;
    for i in 0..30 {
        c.send(json!({"type": "ping", "id": i})).await;
    }
    let mut pongs = 0;
    let mut overloaded = 0;
    while pongs + overloaded < 30 {
        let f = c.next(WAIT).await.expect("an answer to every frame");
        match f["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") if f["error"]["code"] == "OVERLOADED" => overloaded += 1,
            other => panic!("unexpected {other:?}: {f}"),
        }
    }
    assert!(
        (10..=15).contains(&pongs),
        "burst of 10 then refusals: {pongs} pongs"
    );
    assert!(overloaded >= 15);
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.message("m1", "still here").await;
    assert_eq!(text_of(&c.turn().await), "still here");
}

#[tokio::test]
async fn ten_thousand_connection_attempts_from_one_token_are_capped_and_the_gateway_stays_responsive()
 {
    let gw = Gateway::start(&[
        "--agent",
        "echo",
        "--max-connections-per-user",
        "20",
        "--enable-warm-pool",
        "false",
    ]);
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(gw.connect().await);
    }
    let url = gw.ws_url();
    let token = gw.token.clone();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..50 {
        let (url, token) = (url.clone(), token.clone());
        workers.push(tokio::spawn(async move {
            let mut refused = 0;
            for _ in 0..200 {
                let result = Client::connect(&url, &token, None).await;
                if matches!(result, Err(tokio_tungstenite::tungstenite::Error::Http(ref r)) if r.status() == 429) {
                    refused += 1;
                }
            }
            refused
        }));
    }
    let mut refused = 0;
    for w in workers {
        refused += w.await.unwrap();
    }
    assert_eq!(refused, 10_000, "every attempt past the cap got 429");
    assert!(started.elapsed() < Duration::from_secs(60));
    // Meanwhile and after, the gateway answers.
    let (status, _) = gw.http_get("/health");
    assert_eq!(status, 200);
    let mut c = held.pop().unwrap();
    c.message("m1", "responsive").await;
    assert_eq!(text_of(&c.turn().await), "responsive");
    drop(c);
    // A freed slot can be used again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status_of(gw.connect_as(&gw.token, None).await), 101);
}

#[tokio::test]
async fn a_user_past_the_task_quota_gets_quota_exceeded_and_cannot_drain_the_warm_pool() {
    let gw = Gateway::start(&[
        "--agent",
        "echo",
        "--max-tasks-per-user",
        "2",
        "--max-warm-claims-per-user",
        "1",
        "--warm-pool-target-size",
        "3",
    ]);
    gw.wait_pool_ready(3, WAIT).await;
    let mut sources = Vec::new();
    let mut clients = Vec::new();
    for i in 0..2 {
        let mut c = gw.connect().await;
        c.message("m", &format!("s{i}")).await;
        let frames = c.turn().await;
        sources.push(
            of_type(&frames, "status")[0]["source"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        clients.push(c);
    }
    assert_eq!(
        sources,
        ["warm", "cold"],
        "one warm claim per user, then cold"
    );
    let mut third = gw.connect().await;
    third.message("m", "one too many").await;
    let frames = third.until(|v| is_type(v, "error"), WAIT).await;
    let err = frames.last().unwrap();
    assert_eq!(err["error"]["code"], "QUOTA_EXCEEDED");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit 2")
    );
    // Another user is unaffected.
    let bob = gw.create_token("bob");
    let mut b = gw.connect_as(&bob, None).await.unwrap();
    b.message("m", "bob works").await;
    assert_eq!(text_of(&b.turn().await), "bob works");
}

#[tokio::test]
async fn weekly_hours_are_recorded_and_enforced() {
    // 0.0005 h = 1.8 s of sandbox time per week.
    let gw = Gateway::start(&[
        "--agent",
        "echo",
        "--enable-warm-pool",
        "false",
        "--session-idle-timeout",
        "2s",
        "--max-hours-per-week",
        "0.0005",
    ]);
    let mut c = gw.connect().await;
    c.message("m1", "spend some time").await;
    c.turn().await;
    c.until(
        |v| is_type(v, "status") && v["state"] == "stopped",
        Duration::from_secs(10),
    )
    .await;
    c.message("m2", "over the limit").await;
    let frames = c.until(|v| is_type(v, "error"), WAIT).await;
    let err = frames.last().unwrap();
    assert_eq!(
        err["error"]["code"],
        "QUOTA_EXCEEDED",
        "{}",
        pretty(&frames)
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sandbox hours this week")
    );
    let out = std::process::Command::new(BIN)
        .args(["usage", "--data-dir"])
        .arg(&gw.data_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("local\t"))
        .unwrap_or_else(|| panic!("no usage row: {text}"));
    let hours: f64 = line.split('\t').nth(1).unwrap().parse().unwrap();
    assert!(hours >= 0.0005, "{line}");
}

#[tokio::test]
async fn users_list_only_their_own_sessions_and_admins_see_all_with_the_pool() {
    let gw = Gateway::start(&["--agent", "echo", "--warm-pool-target-size", "1"]);
    let alice = gw.create_token("alice");
    // A session is stored with its first message.
    let mut a = gw.connect_as(&alice, None).await.unwrap();
    a.message("a1", "hi").await;
    a.turn().await;
    let mut admin = gw.connect().await;
    admin.message("m1", "hi").await;
    admin.turn().await;
    let get = |token: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
        write!(
            s,
            "GET /api/sessions HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        serde_json::from_str::<serde_json::Value>(raw.split_once("\r\n\r\n").unwrap().1).unwrap()
    };
    let mine = get(&alice);
    let users: Vec<&str> = mine["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["alice"]);
    assert!(mine["pool"].is_null(), "non-admins do not see the pool");
    let all = get(&gw.token);
    assert_eq!(all["admin"], true);
    assert_eq!(all["sessions"].as_array().unwrap().len(), 2);
    assert!(all["pool"]["target"].as_u64() == Some(1));
}

#[tokio::test]
async fn a_per_user_idle_timeout_overrides_the_default() {
    let gw = Gateway::start(&[
        "--agent",
        "echo",
        "--enable-warm-pool",
        "false",
        "--session-idle-timeout",
        "1h",
        "--user-idle-timeouts",
        "alice=1s",
    ]);
    let alice = gw.create_token("alice");
    let mut a = gw.connect_as(&alice, None).await.unwrap();
    let mut other = gw.connect().await;
    a.message("m", "hi").await;
    a.turn().await;
    other.message("m", "hi").await;
    other.turn().await;
    a.until(
        |v| is_type(v, "status") && v["state"] == "stopped",
        Duration::from_secs(10),
    )
    .await;
    // The default user keeps the 1 h default.
    assert!(
        other.next(Duration::from_secs(2)).await.is_none(),
        "the other user's task was stopped"
    );
}
