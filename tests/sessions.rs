//! Cookie sessions end to end: the BFF router, a real Redis, and the fake identity service.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use librechat_bff::{config::Config, credentials::KeyRing};
use reqwest::{header, Method, StatusCode};
use serde_json::json;
use support::{
    bff::{config, TestBff},
    fake_idp::{FakeIdp, FakeIdpOptions, FakeUser},
    redis::RedisServer,
};

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
async fn identity_service_down_is_502_without_detail() {
    let idp = idp_with_alice(Duration::from_secs(300)).await;
    let cfg = settings(
        &idp,
        None,
        &[("BFF__IDENTITY__BASE_URL", "http://127.0.0.1:9".into())],
    );
    let bff = TestBff::start(cfg).await;
    let res = bff.client().login("alice", PASSWORD).await;
    assert_eq!(res.status, StatusCode::BAD_GATEWAY);
    assert_eq!(res.body["error"], "identity_unavailable");
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
