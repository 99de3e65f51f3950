//! Cookie sessions end to end: the BFF router, a real Redis, and the fake identity service.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use librechat_bff::{config::Config, credentials::KeyRing};
use reqwest::{header, Method, StatusCode};
use serde_json::json;
use support::{
    bff::{config, read_response, TestBff},
    fake_idp::{FakeIdp, FakeIdpOptions, FakeUser, Outage},
    redis::RedisServer,
};
use tokio::io::AsyncWriteExt;

const PASSWORD: &str = "correct horse battery staple";

async fn idp_with_alice(access_lifetime: Duration) -> FakeIdp {
    let idp = FakeIdp::start(FakeIdpOptions {
        access_lifetime,
        ..FakeIdpOptions::default()
    })
    .await;
    idp.add_user(FakeUser {
        id: 42,
        username: "alice".into(),
        email: "alice@example.com".into(),
        password: PASSWORD.into(),
        name: "Alice Example".into(),
        groups: vec!["staff".into()],
        is_active: true,
    });
    idp
}

/// Settings for a BFF talking to `idp`, with sessions in `redis` when given.
fn settings(
    idp: &FakeIdp,
    redis: Option<(&RedisServer, &str)>,
    extra: &[(&str, String)],
) -> Config {
    let mut env = vec![
        ("BFF__IDENTITY__BASE_URL", idp.base_url.clone()),
        (
            "BFF__IDENTITY__JWT__HS_SECRET",
            idp.hs_secret().expect("HS256 idp"),
        ),
        (
            "BFF__CSRF__ALLOWED_ORIGINS",
            "https://app.example.com".into(),
        ),
    ];
    if let Some((redis, key)) = redis {
        env.push(("BFF__SESSION__STORE", "redis".into()));
        env.push(("BFF__REDIS__URL", redis.url()));
        env.push(("BFF__REDIS__KEY_PREFIX", redis.key_prefix()));
        env.push(("BFF__CRYPTO__FERNET_KEYS", key.to_owned()));
    }
    env.extend(extra.iter().cloned());
    config(&env)
}

async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

#[tokio::test]
async fn login_opens_a_cookie_session_and_me_shows_the_user_without_tokens() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let mut browser = bff.client();

    let res = browser.login("alice", PASSWORD).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    assert_eq!(res.body["user"]["id"], "42");
    assert_eq!(res.body["user"]["email"], "alice@example.com");
    assert_eq!(res.body["user"]["name"], "Alice Example");
    assert_eq!(res.body["user"]["groups"], json!(["staff"]));
    let set_cookie = res
        .headers
        .get(header::SET_COOKIE)
        .expect("session cookie")
        .to_str()
        .expect("ascii");
    assert!(set_cookie.starts_with("__Host-bff="), "{set_cookie}");
    for attr in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/"] {
        assert!(set_cookie.contains(attr), "{attr} missing in {set_cookie}");
    }
    assert_eq!(idp.token_calls(), 1);

    let me = browser.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body["user"]["id"], "42");
    assert!(me.body["session"]["expires_at"].is_string());
    assert!(me.body["session"]["idle_expires_at"].is_string());
    let text = me.body.to_string();
    assert!(
        !text.contains("eyJ"),
        "a token leaked into /auth/me: {text}"
    );
}

#[tokio::test]
async fn wrong_password_is_401_and_opens_no_session() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let mut browser = bff.client();
    let res = browser.login("alice", "wrong password").await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(res.body["error"], "invalid_credentials");
    assert!(res.headers.get(header::SET_COOKIE).is_none());
    assert!(
        !res.body.to_string().contains("No active account"),
        "the identity service's body must not be echoed"
    );
    assert_eq!(
        browser.get("/auth/me").await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn login_with_bad_input_names_the_problem() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let mut browser = bff.client();
    let res = browser
        .post("/auth/login", json!({ "username": "alice" }))
        .await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    assert_eq!(res.body["error"], "bad_request");
    assert!(res.body["message"]
        .as_str()
        .unwrap_or("")
        .contains("password"));
    let res = browser
        .post("/auth/login", json!({ "password": "x" }))
        .await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    assert_eq!(idp.token_calls(), 0);
}

#[tokio::test]
async fn identity_service_down_is_503_with_retry_after_without_detail() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let cfg = settings(
        &idp,
        None,
        &[("BFF__IDENTITY__BASE_URL", "http://127.0.0.1:9".into())],
    );
    let bff = TestBff::start(cfg).await;
    let res = bff.client().login("alice", PASSWORD).await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.body["error"], "identity_unavailable");
    assert_eq!(retry_after(&res.headers), Some(5));
    assert!(
        !res.body.to_string().contains("127.0.0.1"),
        "no upstream detail: {}",
        res.body
    );
}

fn retry_after(headers: &header::HeaderMap) -> Option<u64> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[tokio::test]
async fn login_while_the_identity_service_throttles_or_fails_is_503_not_401() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let mut browser = bff.client();

    idp.set_outage(Some(Outage::Throttled {
        retry_after_secs: 30,
    }));
    let res = browser.login("alice", PASSWORD).await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE, "{}", res.body);
    assert_eq!(res.body["error"], "identity_unavailable");
    assert_eq!(
        retry_after(&res.headers),
        Some(30),
        "the identity service's delay"
    );
    assert!(browser.cookie.is_none());

    idp.set_outage(Some(Outage::ServerError(StatusCode::BAD_GATEWAY)));
    let res = browser.login("alice", PASSWORD).await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE, "{}", res.body);
    assert_eq!(res.body["error"], "identity_unavailable");
    assert_eq!(retry_after(&res.headers), Some(5));
    assert_eq!(idp.token_calls(), 2);

    idp.set_outage(None);
    let res = browser.login("alice", PASSWORD).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
}

#[tokio::test]
async fn session_id_changes_at_login() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("alice", PASSWORD).await.status,
        StatusCode::OK
    );
    let first = browser.cookie.clone().expect("cookie");
    assert_eq!(
        browser.login("alice", PASSWORD).await.status,
        StatusCode::OK
    );
    let second = browser.cookie.clone().expect("cookie");
    assert_ne!(first, second, "login must issue a new session id");

    let mut old = bff.client();
    old.cookie = Some(first);
    assert_eq!(old.get("/auth/me").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(browser.get("/auth/me").await.status, StatusCode::OK);

    // A planted (attacker-chosen) id is not adopted either.
    let mut victim = bff.client();
    victim.cookie = Some("__Host-bff=AAAAAAAAAAAAAAAAAAAAAA".into());
    assert_eq!(victim.login("alice", PASSWORD).await.status, StatusCode::OK);
    assert_ne!(
        victim.cookie.as_deref(),
        Some("__Host-bff=AAAAAAAAAAAAAAAAAAAAAA")
    );
}

#[tokio::test]
async fn redis_session_survives_an_app_restart_and_holds_no_plain_token() {
    let redis = RedisServer::start().await;
    let key = KeyRing::generate_key();
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, Some((&redis, &key)), &[])).await;
    // Tokens the test knows: issued by the identity service, handed over to a cookie session.
    let issued: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/api/token/", idp.base_url))
        .json(&json!({"username": "alice", "password": PASSWORD}))
        .send()
        .await
        .expect("idp")
        .json()
        .await
        .expect("json");
    let access = issued["access"].as_str().expect("access").to_owned();
    let refresh = issued["refresh"].as_str().expect("refresh").to_owned();
    let mut browser = bff.client();
    let res = browser
        .send(
            Method::POST,
            "/auth/session",
            Some(json!({ "refresh": refresh })),
            Some(&access),
        )
        .await;
    assert_eq!(res.status, StatusCode::OK);

    // Neither token, nor its signature, is readable anywhere in Redis: they are Fernet-encrypted.
    let needles: Vec<&str> = [access.as_str(), refresh.as_str()]
        .into_iter()
        .flat_map(|t| [t, t.rsplit('.').next().unwrap_or(t)])
        .collect();
    let mut conn = redis_conn(&redis).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", redis.key_prefix()))
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(keys.len() >= 3, "session, tokens and index keys: {keys:?}");
    for k in &keys {
        let kind: String = redis::cmd("TYPE")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("type");
        let dump = if kind == "string" {
            redis::cmd("GET")
                .arg(k)
                .query_async::<String>(&mut conn)
                .await
                .expect("get")
        } else {
            format!(
                "{:?}",
                redis::cmd("SMEMBERS")
                    .arg(k)
                    .query_async::<Vec<String>>(&mut conn)
                    .await
                    .expect("smembers")
            )
        };
        for needle in &needles {
            assert!(!dump.contains(needle), "a token is readable under {k}");
        }
    }

    bff.stop();
    let restarted = TestBff::start(settings(&idp, Some((&redis, &key)), &[])).await;
    let mut same = browser.with_base(&restarted.base_url);
    let me = same.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert_eq!(me.body["user"]["id"], "42");
}

#[tokio::test]
async fn identity_token_is_refreshed_when_near_expiry() {
    let idp = idp_with_alice(Duration::from_secs(120)).await;
    let bff = TestBff::start(settings(
        &idp,
        None,
        &[("BFF__IDENTITY__REFRESH_SKEW_SECS", "60".into())],
    ))
    .await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("alice", PASSWORD).await.status,
        StatusCode::OK
    );
    assert_eq!(browser.get("/auth/me").await.status, StatusCode::OK);
    assert_eq!(idp.refresh_calls(), 0, "a fresh token is not refreshed");

    bff.clock.advance(Duration::from_secs(70));
    let me = browser.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert_eq!(idp.refresh_calls(), 1);
}

#[tokio::test]
async fn fifty_parallel_requests_near_expiry_refresh_once_across_two_replicas() {
    let redis = RedisServer::start().await;
    let key = KeyRing::generate_key();
    let idp = idp_with_alice(Duration::from_secs(120)).await;
    // Rotation + blacklisting are on in the fake: a second refresh with the same token fails
    // and would log the user out.
    idp.set_refresh_delay(Duration::from_millis(200));
    let extra = [("BFF__IDENTITY__REFRESH_SKEW_SECS", "60".to_string())];
    let a = TestBff::start(settings(&idp, Some((&redis, &key)), &extra)).await;
    let b = TestBff::start(settings(&idp, Some((&redis, &key)), &extra)).await;
    let mut browser = a.client();
    assert_eq!(
        browser.login("alice", PASSWORD).await.status,
        StatusCode::OK
    );
    a.clock.advance(Duration::from_secs(70));
    b.clock.advance(Duration::from_secs(70));

    let requests = (0..50).map(|i| {
        let mut c = if i % 2 == 0 {
            browser.clone()
        } else {
            browser.with_base(&b.base_url)
        };
        async move { c.get("/auth/me").await.status }
    });
    let statuses = join_all(requests).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "every request stays signed in: {statuses:?}"
    );
    assert_eq!(idp.refresh_calls(), 1, "exactly one identity refresh");
    assert_eq!(browser.get("/auth/me").await.status, StatusCode::OK);
}

#[tokio::test]
async fn refused_refresh_ends_the_session() {
    let redis = RedisServer::start().await;
    let key = KeyRing::generate_key();
    let idp = idp_with_alice(Duration::from_secs(120)).await;
    let bff = TestBff::start(settings(
        &idp,
        Some((&redis, &key)),
        &[("BFF__IDENTITY__REFRESH_SKEW_SECS", "60".into())],
    ))
    .await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("alice", PASSWORD).await.status,
        StatusCode::OK
    );
    idp.revoke_refresh_tokens(42);
    bff.clock.advance(Duration::from_secs(70));

    let me = browser.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED);
    assert_eq!(me.body["error"], "session_ended");
    assert!(browser.cookie.is_none(), "the cookie is cleared");
    assert!(
        bff.state
            .sessions
            .list("42")
            .await
            .expect("list")
            .is_empty(),
        "no zombie session remains"
    );
    let mut conn = redis_conn(&redis).await;
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:idtokens:*", redis.key_prefix()))
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(
        left.is_empty(),
        "tokens of the ended session remain: {left:?}"
    );
}

#[tokio::test]
async fn a_client_that_disconnects_mid_refresh_loses_neither_the_session_nor_30_seconds() {
    let redis = RedisServer::start().await;
    let key = KeyRing::generate_key();
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(
        &idp,
        Some((&redis, &key)),
        &[("BFF__IDENTITY__REFRESH_SKEW_SECS", "60".into())],
    ))
    .await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("alice", PASSWORD).await.status,
        StatusCode::OK
    );
    bff.clock.advance(Duration::from_secs(250));

    // The identity service rotates and blacklists the refresh token on arrival, then holds its
    // answer; meanwhile the client goes away (a phone backgrounding mid-request).
    let gate = idp.hold_next_refresh();
    let addr = bff.base_url.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let cookie = browser.cookie.clone().expect("cookie");
    let request = format!("GET /auth/me HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("write");
    gate.reached().await;
    conn.shutdown().await.expect("half-close");
    // The BFF notices, drops the request and closes the connection without an answer.
    let reply = tokio::time::timeout(Duration::from_secs(10), read_response(&mut conn))
        .await
        .expect("the BFF closes the abandoned connection");
    assert!(
        reply.is_none(),
        "no answer for a client that left: {reply:?}"
    );
    drop(conn);
    gate.release();
    assert_eq!(idp.refresh_calls(), 1);

    // The next request works at once: the rotated token was stored and the lock released.
    let started = Instant::now();
    let me = tokio::time::timeout(Duration::from_secs(20), browser.get("/auth/me"))
        .await
        .expect("the next request does not stall on a leaked lock");
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}: waited for a leaked lock",
        started.elapsed()
    );
    assert_eq!(idp.refresh_calls(), 1, "the stored result was adopted");

    // And the stored refresh token is the rotated one: the next refresh succeeds.
    let me = browser.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert_eq!(idp.refresh_calls(), 2);
}

#[tokio::test]
async fn identity_throttling_or_outage_during_refresh_keeps_the_session() {
    let redis = RedisServer::start().await;
    let key = KeyRing::generate_key();
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(
        &idp,
        Some((&redis, &key)),
        &[("BFF__IDENTITY__REFRESH_SKEW_SECS", "60".into())],
    ))
    .await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("alice", PASSWORD).await.status,
        StatusCode::OK
    );
    let cookie = browser.cookie.clone();
    // Past the access token's expiry: only a refresh can keep the session going.
    bff.clock.advance(Duration::from_secs(310));

    idp.set_outage(Some(Outage::Throttled {
        retry_after_secs: 7,
    }));
    let me = browser.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::SERVICE_UNAVAILABLE, "{}", me.body);
    assert_eq!(me.body["error"], "identity_unavailable");
    assert_eq!(retry_after(&me.headers), Some(7));
    assert_eq!(browser.cookie, cookie, "the cookie is kept");
    assert_eq!(idp.refresh_calls(), 1);
    // The identity service's delay is honoured: no second call before it ends.
    let me = browser.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::SERVICE_UNAVAILABLE, "{}", me.body);
    assert!(retry_after(&me.headers).is_some_and(|s| (1..=7).contains(&s)));
    assert_eq!(idp.refresh_calls(), 1, "not asked again within Retry-After");

    bff.clock.advance(Duration::from_secs(8));
    idp.set_outage(Some(Outage::ServerError(StatusCode::SERVICE_UNAVAILABLE)));
    let me = browser.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::SERVICE_UNAVAILABLE, "{}", me.body);
    assert_eq!(me.body["error"], "identity_unavailable");
    assert_eq!(retry_after(&me.headers), Some(5));
    assert_eq!(idp.refresh_calls(), 2);
    assert_eq!(
        bff.state.sessions.list("42").await.expect("list").len(),
        1,
        "the session is still there"
    );

    // The identity service recovers: the same cookie works, with the same refresh token.
    bff.clock.advance(Duration::from_secs(6));
    idp.set_outage(None);
    let me = browser.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert_eq!(me.body["user"]["id"], "42");
    assert_eq!(browser.cookie, cookie);
    assert_eq!(idp.refresh_calls(), 3);
}

#[tokio::test]
async fn the_memory_registry_is_bounded_in_time_and_size() {
    use librechat_bff::session::registry::{IdentityTokenSet, MEMORY_SESSION_CAPACITY};
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let registry = &bff.state.sessions;
    let tokens = IdentityTokenSet {
        access: "a".into(),
        refresh: None,
        access_exp: 0,
        generation: 0,
    };
    let now = time::OffsetDateTime::now_utc();
    // A session whose end has passed is gone, tokens and index entry alike.
    registry
        .register(
            "ended",
            "sid-ended",
            &tokens,
            now - time::Duration::seconds(1),
        )
        .await
        .expect("register");
    assert!(registry.tokens("sid-ended").await.expect("read").is_none());
    assert!(registry.list("ended").await.expect("list").is_empty());

    let until = now + time::Duration::hours(1);
    let n = MEMORY_SESSION_CAPACITY + 20_000;
    for i in 0..n {
        registry
            .register(&format!("user-{i}"), &format!("sid-{i}"), &tokens, until)
            .await
            .expect("register");
    }
    let held = registry.memory_entries().expect("memory backend");
    assert!(
        held.sessions <= MEMORY_SESSION_CAPACITY && held.users <= MEMORY_SESSION_CAPACITY,
        "{held:?} after {n} sessions"
    );
    assert!(held.sessions > 0);
}

#[tokio::test]
async fn logout_ends_the_session_and_is_idempotent() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("alice", PASSWORD).await.status,
        StatusCode::OK
    );
    let cookie = browser.cookie.clone();
    let out = browser.post("/auth/logout", json!({})).await;
    assert_eq!(out.status, StatusCode::OK);
    assert!(browser.cookie.is_none(), "logout clears the cookie");

    let mut replay = bff.client();
    replay.cookie = cookie;
    assert_eq!(
        replay.get("/auth/me").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        replay.post("/auth/logout", json!({})).await.status,
        StatusCode::OK
    );
    assert_eq!(
        bff.client().post("/auth/logout", json!({})).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn csrf_header_and_origin_are_enforced_for_cookie_requests_only() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("alice", PASSWORD).await.status,
        StatusCode::OK
    );

    let mut no_header = browser.clone();
    no_header.csrf = false;
    let res = no_header.post("/auth/logout", json!({})).await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
    assert_eq!(res.body["error"], "csrf_rejected");

    let mut evil = browser.clone();
    evil.origin = Some("https://evil.example.net".into());
    let res = evil.post("/auth/logout", json!({})).await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
    assert_eq!(res.body["error"], "csrf_rejected");
    assert_eq!(
        browser.get("/auth/me").await.status,
        StatusCode::OK,
        "still signed in"
    );

    // A cross-site page cannot plant a session through login either.
    let mut evil_login = bff.client();
    evil_login.origin = Some("https://evil.example.net".into());
    assert_eq!(
        evil_login.login("alice", PASSWORD).await.status,
        StatusCode::FORBIDDEN
    );

    // Bearer requests carry no ambient credential: exempt from the header rule.
    let token = idp.mint_access(42, Duration::from_secs(300));
    let mut mobile = bff.client();
    mobile.csrf = false;
    let res = mobile
        .send(Method::POST, "/auth/session", Some(json!({})), Some(&token))
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);

    let mut allowed = browser.clone();
    allowed.origin = Some("https://app.example.com".into());
    assert_eq!(
        allowed.post("/auth/logout", json!({})).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn cors_allows_credentials_only_for_allowlisted_origins() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let http = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        http.request(Method::OPTIONS, format!("{}/auth/me", bff.base_url))
            .header(header::ORIGIN, origin)
            .header("Access-Control-Request-Method", "GET")
            .send()
    };
    let ok = preflight("https://app.example.com")
        .await
        .expect("preflight");
    assert_eq!(
        ok.headers()
            .get("access-control-allow-origin")
            .map(|v| v.as_bytes()),
        Some(&b"https://app.example.com"[..])
    );
    assert_eq!(
        ok.headers()
            .get("access-control-allow-credentials")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let other = preflight("https://evil.example.net")
        .await
        .expect("preflight");
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn idle_timeout_is_rolling_and_slide_false_does_not_extend_it() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let extra = [
        ("BFF__SESSION__IDLE_TIMEOUT_SECS", "1800".to_string()),
        ("BFF__IDENTITY__REFRESH_SKEW_SECS", "0".to_string()),
    ];
    let bff = TestBff::start(settings(&idp, None, &extra)).await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("alice", PASSWORD).await.status,
        StatusCode::OK
    );

    bff.clock.advance(Duration::from_secs(1000));
    assert_eq!(browser.get("/auth/me").await.status, StatusCode::OK);
    bff.clock.advance(Duration::from_secs(1000));
    // 2000 s since login > 1800 s idle, but the previous request slid the timer.
    assert_eq!(
        browser.get("/auth/me?slide=false").await.status,
        StatusCode::OK
    );
    bff.clock.advance(Duration::from_secs(900));
    // 1900 s since the last sliding request: the slide=false call did not extend it.
    let res = browser.get("/auth/me").await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(res.body["error"], "session_ended");
}

#[tokio::test]
async fn absolute_lifetime_ends_even_an_active_session() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let extra = [
        ("BFF__SESSION__IDLE_TIMEOUT_SECS", "1800".to_string()),
        ("BFF__SESSION__ABSOLUTE_LIFETIME_SECS", "7200".to_string()),
    ];
    let bff = TestBff::start(settings(&idp, None, &extra)).await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("alice", PASSWORD).await.status,
        StatusCode::OK
    );
    for _ in 0..5 {
        bff.clock.advance(Duration::from_secs(1400));
        let res = browser.get("/auth/me").await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    }
    // 7000 s in: the idle deadline is capped at the absolute one (7200 s).
    let me = browser.get("/auth/me?slide=false").await;
    let idle = me.body["session"]["idle_expires_at"].clone();
    assert_eq!(idle, me.body["session"]["expires_at"]);
    bff.clock.advance(Duration::from_secs(300));
    assert_eq!(
        browser.get("/auth/me").await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn all_sessions_of_a_user_can_be_listed_and_revoked() {
    let redis = RedisServer::start().await;
    let key = KeyRing::generate_key();
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, Some((&redis, &key)), &[])).await;
    let mut browsers = vec![bff.client(), bff.client(), bff.client()];
    for b in &mut browsers {
        assert_eq!(b.login("alice", PASSWORD).await.status, StatusCode::OK);
    }
    assert_eq!(bff.state.sessions.list("42").await.expect("list").len(), 3);
    assert_eq!(
        bff.state.sessions.revoke_all("42").await.expect("revoke"),
        3
    );
    for b in &mut browsers {
        assert_eq!(b.get("/auth/me").await.status, StatusCode::UNAUTHORIZED);
    }
    assert!(bff
        .state
        .sessions
        .list("42")
        .await
        .expect("list")
        .is_empty());
}

#[tokio::test]
async fn a_handed_over_token_becomes_a_cookie_session() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let token = idp.mint_access(42, Duration::from_secs(300));
    let mut browser = bff.client();
    let res = browser
        .send(Method::POST, "/auth/session", None, Some(&token))
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    assert!(browser.cookie.is_some());
    let me = browser.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body["user"]["id"], "42");

    let mut nobody = bff.client();
    let res = nobody.send(Method::POST, "/auth/session", None, None).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    let res = nobody
        .send(Method::POST, "/auth/session", None, Some("not-a-jwt"))
        .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(res.body["error"], "invalid_token");
}

#[tokio::test]
async fn bearer_requests_are_authenticated_without_a_session() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let token = idp.mint_access(42, Duration::from_secs(300));
    let mut mobile = bff.client();
    let res = mobile
        .send(Method::GET, "/auth/me", None, Some(&token))
        .await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.body["user"]["id"], "42");
    assert!(res.body["session"].is_null());
    assert!(res.headers.get(header::SET_COOKIE).is_none());
}

#[tokio::test]
async fn redis_outage_is_503_and_recovers_without_restart() {
    let mut redis = RedisServer::start_with_aof().await;
    let key = KeyRing::generate_key();
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, Some((&redis, &key)), &[])).await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("alice", PASSWORD).await.status,
        StatusCode::OK
    );
    assert_eq!(browser.get("/readyz").await.status, StatusCode::OK);

    redis.stop().await;
    let me = browser.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(me.body["error"], "session_store_unavailable");
    assert_eq!(
        browser.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(browser.get("/healthz").await.status, StatusCode::OK);

    redis.restart().await;
    let me = browser.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert_eq!(browser.get("/readyz").await.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Login throttling (src/throttle.rs) and what the identity service learns about the caller
// ---------------------------------------------------------------------------------------------

struct LoginReply {
    status: StatusCode,
    headers: header::HeaderMap,
    body: serde_json::Value,
}

/// `POST /auth/login` with extra request headers (e.g. `X-Forwarded-For`, `User-Agent`).
async fn login_with(
    bff: &TestBff,
    username: &str,
    password: &str,
    headers: &[(&str, &str)],
) -> LoginReply {
    let mut req = reqwest::Client::new()
        .post(format!("{}/auth/login", bff.base_url))
        .json(&json!({ "username": username, "password": password }));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = req.send().await.expect("request reaches the BFF");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.json().await.unwrap_or(serde_json::Value::Null);
    LoginReply {
        status,
        headers,
        body,
    }
}

/// A login from `address`, as told by the trusted proxy at 127.0.0.1.
async fn login_from(bff: &TestBff, address: &str, username: &str, password: &str) -> LoginReply {
    login_with(bff, username, password, &[("x-forwarded-for", address)]).await
}

fn throttle_settings(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = vec![("BFF__SERVER__TRUSTED_PROXIES", "127.0.0.1/32".to_string())];
    env.extend(pairs.iter().map(|(k, v)| (*k, (*v).to_string())));
    env
}

/// A 429 `login_throttled` whose `Retry-After` is within the window.
fn assert_throttled(res: &LoginReply, window_secs: u64) {
    assert_eq!(res.status, StatusCode::TOO_MANY_REQUESTS, "{}", res.body);
    assert_eq!(res.body["error"], "login_throttled");
    assert!(res.body["message"].is_string());
    let retry_after: u64 = res
        .headers
        .get(header::RETRY_AFTER)
        .expect("Retry-After")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(
        (1..=window_secs).contains(&retry_after),
        "Retry-After {retry_after} outside 1..={window_secs}"
    );
}

/// N wrong passwords from one address (each for another account, so only the address limit
/// applies) pass to the identity service; the (N+1)th, and even a right password from that
/// address, is 429 without reaching it; another address is unaffected.
async fn address_limit_scenario(redis: Option<(&RedisServer, &str)>) {
    const N: usize = 5;
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let env = throttle_settings(&[
        ("BFF__LOGIN_THROTTLE__PER_ADDRESS_FAILURES", "5"),
        ("BFF__LOGIN_THROTTLE__PER_ADDRESS_WINDOW_SECS", "300"),
    ]);
    let bff = TestBff::start(settings(&idp, redis, &env)).await;
    for i in 0..N {
        let res = login_from(&bff, "203.0.113.9", &format!("nobody{i}"), "guess").await;
        assert_eq!(
            res.status,
            StatusCode::UNAUTHORIZED,
            "attempt {i}: {}",
            res.body
        );
    }
    let res = login_from(&bff, "203.0.113.9", "nobody-else", "guess").await;
    assert_throttled(&res, 300);
    assert_eq!(
        idp.token_calls(),
        N,
        "the throttled attempt never reached the identity service"
    );
    let res = login_from(&bff, "203.0.113.9", "alice", PASSWORD).await;
    assert_throttled(&res, 300);
    assert_eq!(idp.token_calls(), N);

    let res = login_from(&bff, "203.0.113.10", "alice", PASSWORD).await;
    assert_eq!(res.status, StatusCode::OK, "another address: {}", res.body);
    assert_eq!(idp.token_calls(), N + 1);
}

#[tokio::test]
async fn failed_logins_from_one_address_are_throttled_before_the_identity_service() {
    address_limit_scenario(None).await;
    let redis = RedisServer::start().await;
    let key = KeyRing::generate_key();
    address_limit_scenario(Some((&redis, &key))).await;
}

#[tokio::test]
async fn the_address_window_ends_and_sign_in_works_again_in_memory() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let env = throttle_settings(&[
        ("BFF__LOGIN_THROTTLE__PER_ADDRESS_FAILURES", "2"),
        ("BFF__LOGIN_THROTTLE__PER_ADDRESS_WINDOW_SECS", "300"),
    ]);
    let bff = TestBff::start(settings(&idp, None, &env)).await;
    for _ in 0..2 {
        let res = login_from(&bff, "203.0.113.9", "alice", "wrong").await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    }
    assert_throttled(
        &login_from(&bff, "203.0.113.9", "alice", PASSWORD).await,
        300,
    );
    bff.clock.advance(Duration::from_secs(301));
    let res = login_from(&bff, "203.0.113.9", "alice", PASSWORD).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
}

#[tokio::test]
async fn failed_logins_for_one_account_are_throttled_across_addresses() {
    let redis = RedisServer::start().await;
    let key = KeyRing::generate_key();
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let env = throttle_settings(&[
        ("BFF__LOGIN_THROTTLE__PER_IDENTIFIER_FAILURES", "3"),
        ("BFF__LOGIN_THROTTLE__PER_IDENTIFIER_WINDOW_SECS", "900"),
    ]);
    let bff = TestBff::start(settings(&idp, Some((&redis, &key)), &env)).await;
    // The same account however it is spelled: the identifier is trimmed and lower-cased.
    for (i, name) in ["alice", " ALICE ", "Alice"].into_iter().enumerate() {
        let res = login_from(&bff, &format!("198.51.100.{i}"), name, "wrong").await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{}", res.body);
    }
    let res = login_from(&bff, "198.51.100.50", "aLiCe", "wrong").await;
    assert_throttled(&res, 900);
    // The lock-out trade-off: the right password from a fresh address is refused too.
    assert_throttled(
        &login_from(&bff, "198.51.100.51", "alice", PASSWORD).await,
        900,
    );
    assert_eq!(idp.token_calls(), 3);
    // Another account from the same addresses is not affected.
    let res = login_from(&bff, "198.51.100.50", "bob", "wrong").await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);

    // Only a hash of the identifier is kept, and every counter expires.
    let mut conn = redis_conn(&redis).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{}:login-throttle}}:*", redis.key_prefix()))
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(keys.iter().any(|k| k.contains(":id:")), "{keys:?}");
    for k in &keys {
        assert!(
            !k.to_lowercase().contains("alice") && !k.contains("bob"),
            "{k}"
        );
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .expect("pttl");
        assert!(ttl > 0 && ttl <= 900_000, "{k} has TTL {ttl}");
    }
}

/// Many successful sign-ins from one address never add up to a lock-out, and a success clears
/// the account's failure count.
async fn success_scenario(redis: Option<(&RedisServer, &str)>) {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let env = throttle_settings(&[
        ("BFF__LOGIN_THROTTLE__PER_ADDRESS_FAILURES", "6"),
        ("BFF__LOGIN_THROTTLE__PER_IDENTIFIER_FAILURES", "3"),
    ]);
    let bff = TestBff::start(settings(&idp, redis, &env)).await;
    for i in 0..12 {
        let res = login_from(&bff, "203.0.113.20", "alice", PASSWORD).await;
        assert_eq!(res.status, StatusCode::OK, "success {i}: {}", res.body);
    }
    for _ in 0..2 {
        let res = login_from(&bff, "203.0.113.20", "alice", "wrong").await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    }
    let res = login_from(&bff, "203.0.113.20", "alice", PASSWORD).await;
    assert_eq!(res.status, StatusCode::OK);
    // Two more failures: 2 < 3 because the success cleared the first two.
    for _ in 0..2 {
        let res = login_from(&bff, "203.0.113.20", "alice", "wrong").await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{}", res.body);
    }
    let res = login_from(&bff, "203.0.113.20", "alice", "wrong").await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_throttled(
        &login_from(&bff, "203.0.113.20", "alice", PASSWORD).await,
        900,
    );
}

#[tokio::test]
async fn successful_logins_are_never_throttled() {
    success_scenario(None).await;
    let redis = RedisServer::start().await;
    let key = KeyRing::generate_key();
    success_scenario(Some((&redis, &key))).await;
}

#[tokio::test]
async fn two_replicas_on_one_redis_share_the_counters() {
    let redis = RedisServer::start().await;
    let key = KeyRing::generate_key();
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let env = throttle_settings(&[("BFF__LOGIN_THROTTLE__PER_ADDRESS_FAILURES", "4")]);
    let a = TestBff::start(settings(&idp, Some((&redis, &key)), &env)).await;
    let b = TestBff::start(settings(&idp, Some((&redis, &key)), &env)).await;
    for i in 0..4 {
        let replica = if i % 2 == 0 { &a } else { &b };
        let res = login_from(replica, "203.0.113.30", &format!("nobody{i}"), "guess").await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{}", res.body);
    }
    assert_throttled(
        &login_from(&a, "203.0.113.30", "alice", PASSWORD).await,
        300,
    );
    assert_throttled(
        &login_from(&b, "203.0.113.30", "alice", PASSWORD).await,
        300,
    );
    assert_eq!(idp.token_calls(), 4);
}

#[tokio::test]
async fn concurrent_failed_logins_cannot_overshoot_the_limit() {
    let redis = RedisServer::start().await;
    let key = KeyRing::generate_key();
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let env = throttle_settings(&[("BFF__LOGIN_THROTTLE__PER_ADDRESS_FAILURES", "5")]);
    let bff = TestBff::start(settings(&idp, Some((&redis, &key)), &env)).await;
    let attempts = (0..40).map(|i| {
        let bff = &bff;
        async move {
            login_from(bff, "203.0.113.40", &format!("nobody{i}"), "guess")
                .await
                .status
        }
    });
    let statuses = join_all(attempts).await;
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(refused, 35, "{statuses:?}");
    assert_eq!(
        idp.token_calls(),
        5,
        "each attempt is counted before the call"
    );
}

#[tokio::test]
async fn the_identity_service_sees_the_end_users_address_and_user_agent() {
    let idp = idp_with_alice(Duration::from_secs(120)).await;
    let env = throttle_settings(&[("BFF__IDENTITY__REFRESH_SKEW_SECS", "60")]);
    let bff = TestBff::start(settings(&idp, None, &env)).await;
    // Not a browser's agent: the identity service gets what the client sent, not the substitute
    // LibreChat is given.
    let res = login_with(
        &bff,
        "alice",
        PASSWORD,
        &[
            ("x-forwarded-for", "6.6.6.6, 198.51.100.7"),
            ("user-agent", "okhttp/4.12.0"),
        ],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    let seen = idp.seen_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/api/token/");
    assert_eq!(seen[0].forwarded_for, vec!["198.51.100.7".to_string()]);
    assert_eq!(seen[0].user_agent.as_deref(), Some("okhttp/4.12.0"));

    // A refresh made for a request carries that request's caller.
    let cookie = res
        .headers
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("session cookie")
        .to_owned();
    bff.clock.advance(Duration::from_secs(70));
    let me = reqwest::Client::new()
        .get(format!("{}/auth/me", bff.base_url))
        .header(header::COOKIE, cookie)
        .header("x-forwarded-for", "198.51.100.8")
        .header(header::USER_AGENT, "MyApp/2.1 (iOS 17)")
        .send()
        .await
        .expect("me");
    assert_eq!(me.status(), StatusCode::OK);
    let seen = idp.seen_requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].path, "/api/token/refresh/");
    assert_eq!(seen[1].forwarded_for, vec!["198.51.100.8".to_string()]);
    assert_eq!(seen[1].user_agent.as_deref(), Some("MyApp/2.1 (iOS 17)"));

    // Without trusted proxies a client-sent X-Forwarded-For is not believed.
    let untrusted = TestBff::start(settings(&idp, None, &[])).await;
    let res = login_with(
        &untrusted,
        "alice",
        PASSWORD,
        &[("x-forwarded-for", "198.51.100.7")],
    )
    .await;
    assert_eq!(res.status, StatusCode::OK);
    let seen = idp.seen_requests();
    assert_eq!(seen[2].forwarded_for, vec!["127.0.0.1".to_string()]);
    assert_eq!(seen[2].user_agent, None, "no agent sent, none invented");
}

#[tokio::test]
async fn an_over_long_identifier_is_400_without_calling_the_identity_service() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let res = login_with(&bff, &"a".repeat(257), "guess", &[]).await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    assert_eq!(res.body["error"], "bad_request");
    assert!(res.body["message"]
        .as_str()
        .unwrap_or("")
        .contains("256 bytes"));
    assert_eq!(idp.token_calls(), 0);
    // At the limit it is an ordinary (wrong) sign-in.
    let res = login_with(&bff, &"a".repeat(256), "guess", &[]).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(idp.token_calls(), 1);
}

#[tokio::test]
async fn redis_down_during_the_throttle_check_is_503_without_calling_the_identity_service() {
    let mut redis = RedisServer::start_with_aof().await;
    let key = KeyRing::generate_key();
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, Some((&redis, &key)), &[])).await;
    redis.stop().await;
    let res = login_with(&bff, "alice", PASSWORD, &[]).await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE, "{}", res.body);
    assert_eq!(res.body["error"], "session_store_unavailable");
    assert_eq!(idp.token_calls(), 0, "fail closed: no unthrottled attempt");
    redis.restart().await;
    let res = login_with(&bff, "alice", PASSWORD, &[]).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
}

// ---------------------------------------------------------------------------------------------
// Hostile identity tokens
// ---------------------------------------------------------------------------------------------

/// The identity service's own token endpoint: `{access, refresh}` for alice.
async fn idp_tokens(idp: &FakeIdp) -> serde_json::Value {
    reqwest::Client::new()
        .post(format!("{}/api/token/", idp.base_url))
        .json(&json!({"username": "alice", "password": PASSWORD}))
        .send()
        .await
        .expect("token endpoint")
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn a_refresh_token_opens_no_session_no_chat_and_no_admin_api() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let redis = RedisServer::start().await;
    let key = KeyRing::generate_key();
    let bff = TestBff::start(settings(
        &idp,
        Some((&redis, &key)),
        &[("BFF__ADMIN__GROUP", "staff".to_string())],
    ))
    .await;
    let tokens = idp_tokens(&idp).await;
    let refresh = tokens["refresh"].as_str().expect("refresh token");
    let access = tokens["access"].as_str().expect("access token");
    let mut client = bff.client();
    // The access token works everywhere alice may go (she is in the admin group)...
    assert_eq!(
        client
            .send(Method::GET, "/auth/me", None, Some(access))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        client
            .send(Method::GET, "/admin/jobs", None, Some(access))
            .await
            .status,
        StatusCode::OK
    );
    // ...her refresh token nowhere.
    for (method, path) in [
        (Method::GET, "/auth/me"),
        (Method::POST, "/auth/session"),
        (Method::GET, "/api/chat/convos"),
    ] {
        let res = client.send(method, path, None, Some(refresh)).await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{path}: {}", res.body);
        assert_eq!(res.body["error"], "invalid_token", "{path}");
    }
    let res = client
        .send(Method::GET, "/admin/jobs", None, Some(refresh))
        .await;
    assert_eq!(res.status, StatusCode::FORBIDDEN, "{}", res.body);
    assert!(client.cookie.is_none(), "no session was opened");
}

#[tokio::test]
async fn token_type_can_be_required_and_unmarked_tokens_pass_only_when_it_is_not() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 300;
    let unmarked = idp.mint_with_claims(json!({"user_id": "42", "exp": exp}));
    let lenient = TestBff::start(settings(&idp, None, &[])).await;
    let strict = TestBff::start(settings(
        &idp,
        None,
        &[("BFF__IDENTITY__JWT__REQUIRE_TOKEN_TYPE", "true".to_string())],
    ))
    .await;
    let me = |bff: &TestBff, token: String| {
        let mut c = bff.client();
        async move { c.send(Method::GET, "/auth/me", None, Some(&token)).await }
    };
    assert_eq!(me(&lenient, unmarked.clone()).await.status, StatusCode::OK);
    assert_eq!(me(&strict, unmarked).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        me(&strict, idp.mint_access(42, Duration::from_secs(60)))
            .await
            .status,
        StatusCode::OK
    );
    let other = idp.mint_with_claims(json!({"user_id": "42", "exp": exp, "token_type": "id"}));
    assert_eq!(me(&lenient, other).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn oversized_tokens_and_cookies_and_control_characters_in_claims_are_refused() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let bff = TestBff::start(settings(&idp, None, &[])).await;
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 300;
    let mut client = bff.client();

    // A validly signed 200 KB token is refused unparsed.
    let padding = "x".repeat(200 * 1024);
    let huge = idp.mint_with_claims(
        json!({"user_id": "42", "exp": exp, "token_type": "access", "pad": padding}),
    );
    let res = client
        .send(Method::GET, "/auth/me", None, Some(&huge))
        .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert_eq!(res.body["error"], "invalid_token");

    for claims in [
        json!({"user_id": "42\u{0}", "exp": exp, "token_type": "access"}),
        json!({"user_id": "4\r\n2", "exp": exp, "token_type": "access"}),
        json!({"user_id": "x".repeat(400), "exp": exp, "token_type": "access"}),
        json!({"user_id": "42", "email": "a@b.co\r\nX-Evil: 1", "exp": exp, "token_type": "access"}),
        json!({"user_id": "42", "name": "Al\u{7}ice", "exp": exp, "token_type": "access"}),
    ] {
        let token = idp.mint_with_claims(claims.clone());
        let res = client
            .send(Method::GET, "/auth/me", None, Some(&token))
            .await;
        assert_eq!(res.status, StatusCode::UNAUTHORIZED, "{claims}");
        assert_eq!(res.body["error"], "invalid_token", "{claims}");
    }

    // A session cookie drowned in a 20 KB Cookie header is not looked up.
    assert_eq!(client.login("alice", PASSWORD).await.status, StatusCode::OK);
    assert_eq!(client.get("/auth/me").await.status, StatusCode::OK);
    let cookie = client.cookie.clone().expect("session cookie");
    client.cookie = Some(format!("{cookie}; junk={}", "j".repeat(20 * 1024)));
    assert_eq!(
        client.get("/auth/me").await.status,
        StatusCode::UNAUTHORIZED
    );
}
