//! The LibreChat bridge end to end: BFF router, real Redis, fake identity service and the fake
//! LibreChat (which follows shared/librechat-contract.md).

use std::{
    io::{Read, Write},
    time::{Duration, Instant},
};

use futures_util::{future::join_all, StreamExt};
use librechat_bff::credentials::vault::CredentialStatus;
use reqwest::{header, StatusCode};
use serde_json::Value;
use support::{
    fake_librechat::{CannedAnswer, FakeLibreChatOptions},
    wait::eventually,
    world::{chat_body, get_json, http, World, BROWSER_UA, ID_PASSWORD},
};

#[tokio::test]
async fn cookie_and_bearer_sessions_of_one_user_share_one_librechat_login() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 7).await;

    // Web: cookie session; starts a conversation and reads its stream to the end.
    let mut browser = bff.client();
    assert_eq!(
        browser.login("user7", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    let started = browser
        .post("/api/chat/agents/chat/FakeAI", chat_body("hello"))
        .await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.body);
    let stream_id = started.body["streamId"]
        .as_str()
        .expect("streamId")
        .to_owned();
    let stream = browser
        .get(&format!("/api/chat/agents/chat/stream/{stream_id}"))
        .await;
    assert_eq!(stream.status, StatusCode::OK);

    // Mobile: Bearer identity JWT; sees the same conversation.
    let (status, convos) = get_json(&bff, "/api/chat/convos", &w.bearer(7)).await;
    assert_eq!(status, StatusCode::OK, "{convos}");
    let ids: Vec<&str> = convos["conversations"]
        .as_array()
        .expect("conversations")
        .iter()
        .filter_map(|c| c["conversationId"].as_str())
        .collect();
    assert!(ids.contains(&stream_id.as_str()), "{convos}");
    assert_eq!(w.lc.login_calls(), 1, "one LibreChat login for both");
}

#[tokio::test]
async fn sse_frames_reach_the_client_before_the_stream_ends() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 8).await;
    let bearer = w.bearer(8);
    // The gate holds the last frame of the next chat turn.
    let gate = w.lc.hold_stream_end();
    let started = http()
        .post(format!("{}/api/chat/agents/chat/FakeAI", bff.base_url))
        .bearer_auth(&bearer)
        .json(&chat_body("stream please"))
        .send()
        .await
        .expect("post");
    assert_eq!(started.status(), StatusCode::OK);
    let started: Value = started.json().await.expect("json");
    let stream_id = started["streamId"].as_str().expect("streamId").to_owned();

    let res = http()
        .get(format!(
            "{}/api/chat/agents/chat/stream/{stream_id}",
            bff.base_url
        ))
        .bearer_auth(&bearer)
        .header(header::ACCEPT, "text/event-stream")
        .send()
        .await
        .expect("stream");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()[header::CONTENT_TYPE]
        .to_str()
        .expect("ct")
        .starts_with("text/event-stream"));
    assert!(res.headers().get(header::SET_COOKIE).is_none());
    let mut body = res.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\n\n") {
        let chunk = body
            .next()
            .await
            .expect("a frame before the end")
            .expect("chunk");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.starts_with("event: message"), "{seen}");
    // Everything but the last frame has gone out, and the last is held.
    gate.reached().await;
    assert!(
        !seen.contains("\"final\":true"),
        "the last frame is still held"
    );
    gate.release();
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
    assert!(seen.contains("\"final\":true"), "{seen}");
}

#[tokio::test]
async fn two_hundred_requests_with_an_expired_token_refresh_once_even_on_two_replicas() {
    let w = World::new(FakeLibreChatOptions {
        access_token_lifetime: Duration::from_secs(2),
        ..FakeLibreChatOptions::default()
    })
    .await;
    let skew = [("BFF__LIBRECHAT__TOKEN_REFRESH_SKEW_SECS", "0".to_string())];
    let a = w.bff(&skew).await;
    let b = w.bff(&skew).await;
    w.user(&a, 10).await;
    let bearer = w.bearer(10);
    assert_eq!(
        get_json(&a, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get_json(&b, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    assert_eq!(w.lc.login_calls(), 1, "replica b adopted a's login");
    assert_eq!(w.lc.refresh_calls(), 0);

    // Let the 2 s access token expire for real (JWT exp has one-second resolution).
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let requests = (0..200).map(|i| {
        let base = if i % 2 == 0 { &a.base_url } else { &b.base_url };
        let url = format!("{base}/api/chat/convos");
        let bearer = bearer.clone();
        async move {
            http()
                .get(url)
                .bearer_auth(bearer)
                .send()
                .await
                .expect("send")
                .status()
        }
    });
    let statuses = join_all(requests).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(
        w.lc.refresh_calls(),
        1,
        "exactly one refresh for 200 requests"
    );
    assert_eq!(w.lc.login_calls(), 1);
}

#[tokio::test]
async fn a_deleted_librechat_session_is_replaced_by_a_new_login() {
    let w = World::new(FakeLibreChatOptions {
        access_token_lifetime: Duration::from_secs(60),
        ..FakeLibreChatOptions::default()
    })
    .await;
    // Skew beyond the token lifetime: every request renews, so the refresh path is exercised.
    let bff = w
        .bff(&[("BFF__LIBRECHAT__TOKEN_REFRESH_SKEW_SECS", "120".to_string())])
        .await;
    let email = w.user(&bff, 11).await;
    let bearer = w.bearer(11);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    assert_eq!((w.lc.login_calls(), w.lc.refresh_calls()), (1, 1));

    w.lc.delete_user_sessions(&email);
    let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        w.lc.login_calls(),
        2,
        "the refused refresh led to a new login"
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_user_keeps_their_own_address() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[("BFF__SERVER__TRUSTED_PROXIES", "127.0.0.1/32".to_string())])
        .await;
    for id in 100..120 {
        w.user(&bff, id).await;
    }
    for id in 100..120 {
        let res = http()
            .get(format!("{}/api/chat/convos", bff.base_url))
            .bearer_auth(w.bearer(id))
            .header("X-Forwarded-For", format!("6.6.6.6, 198.51.100.{id}"))
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), StatusCode::OK, "user {id}");
    }
    assert_eq!(w.lc.login_calls(), 20, "no login hit the limiter");
    let expected: Vec<String> = (100..120).map(|i| format!("198.51.100.{i}")).collect();
    assert_eq!(forwarded_for(&w, "/api/auth/login"), expected);
    // The proxied requests themselves too (the warm lane knows the peer per connection).
    assert_eq!(forwarded_for(&w, "/api/convos"), expected);
}

/// The `X-Forwarded-For` LibreChat saw on each request whose path starts with `prefix`.
fn forwarded_for(w: &World, prefix: &str) -> Vec<String> {
    w.lc.requests()
        .into_iter()
        .filter(|r| r.path.starts_with(prefix))
        .filter_map(|r| {
            r.headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn an_untrusted_peers_forwarded_for_is_ignored() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 130).await;
    let res = http()
        .get(format!("{}/api/chat/convos", bff.base_url))
        .bearer_auth(w.bearer(130))
        .header("X-Forwarded-For", "203.0.113.66")
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::OK);
    let seen = forwarded_for(&w, "/");
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|x| x == "127.0.0.1"), "{seen:?}");
}

#[tokio::test]
async fn forwarded_requests_carry_the_librechat_token_address_and_a_browser_agent() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 12).await;
    let bearer = w.bearer(12);
    let res = http()
        .get(format!("{}/api/chat/convos?limit=5", bff.base_url))
        .bearer_auth(&bearer)
        .header(header::COOKIE, "something=secret")
        .header("X-Forwarded-Host", "spoofed.example")
        .header("X-Request-Id", "req-12345")
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-request-id"], "req-12345");
    let fwd =
        w.lc.requests()
            .into_iter()
            .find(|r| r.path.starts_with("/api/convos"))
            .expect("forwarded");
    assert_eq!(fwd.path, "/api/convos?limit=5");
    let h = &fwd.headers;
    let auth = h[header::AUTHORIZATION].to_str().expect("auth");
    assert!(
        auth.starts_with("Bearer ") && !auth.contains(&bearer),
        "LibreChat's own token"
    );
    assert!(
        h.get(header::COOKIE).is_none(),
        "client cookies stay at the BFF"
    );
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_ne!(
        h.get("x-forwarded-host").map(|v| v.as_bytes()),
        Some(&b"spoofed.example"[..])
    );
    assert_eq!(h["x-request-id"], "req-12345");
    assert_eq!(h[header::USER_AGENT], BROWSER_UA);
}

#[tokio::test]
async fn a_mobile_okhttp_client_is_not_banned() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 13).await;
    let res = http()
        .post(format!("{}/api/chat/agents/chat/FakeAI", bff.base_url))
        .bearer_auth(w.bearer(13))
        .header(header::USER_AGENT, "okhttp/4.12.0")
        .json(&chat_body("from android"))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.expect("JSON, not an SSE error");
    assert!(body["streamId"].is_string(), "{body}");
    assert!(!w.lc.is_banned_ip("127.0.0.1"));
}

/// Sends a request line byte for byte (HTTP clients normalise `..` away before sending).
fn raw_status(base_url: &str, path: &str, bearer: &str) -> u16 {
    let addr = base_url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn traversal_is_400_and_librechat_auth_is_404() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 14).await;
    let bearer = w.bearer(14);
    let base = bff.base_url.clone();
    let b2 = bearer.clone();
    let statuses = tokio::task::spawn_blocking(move || {
        [
            "/api/chat/../auth/login",
            "/api/chat/%2e%2e/auth/login",
            "/api/chat/convos%2f..%2f..%2fauth",
            "/api/chat//convos",
            "/api/chat/convos\\..",
            "/api/chat/convos/%00",
            "/api/chat/auth/logout",
        ]
        .map(|p| (p, raw_status(&base, p, &b2)))
    })
    .await
    .expect("join");
    for (path, status) in &statuses[..6] {
        assert_eq!(*status, 400, "{path}");
    }
    assert_eq!(statuses[6].1, 404, "LibreChat's auth routes are the BFF's");
    assert!(
        w.lc.requests().iter().all(|r| !r.path.contains("logout")),
        "nothing reached LibreChat"
    );
}

#[tokio::test]
async fn librechat_down_is_a_quick_502_and_recovers() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 15).await;
    let bearer = w.bearer(15);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );

    w.lc.go_down().await;
    let started = Instant::now();
    let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body["error"], "librechat_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "within the connect timeout"
    );
    // Sign-in does not depend on LibreChat.
    let mut browser = bff.client();
    assert_eq!(
        browser.login("user15", ID_PASSWORD).await.status,
        StatusCode::OK
    );

    w.lc.come_back().await;
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn redis_down_is_503_and_recovers() {
    let mut w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 16).await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("user16", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    assert_eq!(browser.get("/api/chat/convos").await.status, StatusCode::OK);

    w.redis.stop().await;
    // The session's in-process copy is dropped the moment the BFF's subscription to ended
    // sessions drops with Redis (src/session/cache.rs); from then on the record is read.
    let res = eventually(5, "cookie requests to need Redis", || {
        let mut browser = browser.clone();
        async move {
            let res = browser.get("/api/chat/convos").await;
            (res.status != StatusCode::OK).then_some(res)
        }
    })
    .await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.body["error"], "session_store_unavailable");

    w.redis.restart().await;
    let res = browser.get("/api/chat/convos").await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
}

#[tokio::test]
async fn unprovisioned_users_get_503_with_retry_after() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    let (status, body) = get_json(&bff, "/api/chat/convos", &w.bearer(99)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "provisioning_pending");
}

#[tokio::test]
async fn a_refused_stored_password_marks_the_credential_drifted() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    let email = w.user(&bff, 17).await;
    w.lc.set_password(&email, "changed-behind-our-back-1");
    let (status, body) = get_json(&bff, "/api/chat/convos", &w.bearer(17)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "librechat_credential_invalid");
    let record = bff
        .state
        .vault
        .get("17")
        .await
        .expect("vault")
        .expect("record");
    assert_eq!(record.status, CredentialStatus::Drifted);
    assert!(!body.to_string().contains("changed-behind"));
}

#[tokio::test]
async fn unauthenticated_proxy_calls_are_401_json() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    let res = http()
        .get(format!("{}/api/chat/convos", bff.base_url))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["error"], "unauthenticated");
    assert!(w.lc.requests().is_empty());
}

#[tokio::test]
async fn cookie_requests_to_the_proxy_need_the_csrf_header() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 18).await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("user18", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    browser.csrf = false;
    let res = browser
        .post("/api/chat/agents/chat/FakeAI", chat_body("x"))
        .await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
    assert_eq!(res.body["error"], "csrf_rejected");
    assert!(w
        .lc
        .requests()
        .iter()
        .all(|r| !r.path.starts_with("/api/agents")));
}

#[tokio::test]
async fn a_401_from_librechat_renews_the_token_and_replays_small_requests() {
    let w = World::new(FakeLibreChatOptions {
        access_token_lifetime: Duration::from_secs(2),
        ..FakeLibreChatOptions::default()
    })
    .await;
    let bff = w
        .bff(&[("BFF__LIBRECHAT__TOKEN_REFRESH_SKEW_SECS", "0".to_string())])
        .await;
    w.user(&bff, 19).await;
    let bearer = w.bearer(19);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    // The BFF's clock lags: it believes the token is valid after LibreChat has expired it.
    bff.clock.rewind(Duration::from_secs(120));
    tokio::time::sleep(Duration::from_millis(3100)).await;

    let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
    assert_eq!(status, StatusCode::OK, "replayed after a refresh: {body}");
    assert_eq!(w.lc.refresh_calls(), 1);
    let rejected =
        w.lc.requests()
            .iter()
            .filter(|r| r.path.starts_with("/api/convos"))
            .count();
    assert_eq!(rejected, 3, "first call, the 401, and the replay");

    // A body too large to keep cannot be replayed: 401, and the next request re-acquires.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let big = "x".repeat(100 * 1024);
    let res = http()
        .post(format!("{}/api/chat/convos/update", bff.base_url))
        .bearer_auth(&bearer)
        .header(header::CONTENT_TYPE, "application/json")
        .body(format!(
            "{{\"arg\":{{\"conversationId\":\"nope\",\"title\":\"{big}\"}}}}"
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["error"], "librechat_unauthorized");
    let (status, _) = get_json(&bff, "/api/chat/convos", &bearer).await;
    assert_eq!(status, StatusCode::OK, "the next request re-acquires");
}

#[tokio::test]
async fn bodies_over_the_cap_are_413() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[("BFF__LIBRECHAT__MAX_REQUEST_BODY_BYTES", "1000".to_string())])
        .await;
    w.user(&bff, 20).await;
    let res = http()
        .post(format!("{}/api/chat/convos/update", bff.base_url))
        .bearer_auth(w.bearer(20))
        .header(header::CONTENT_TYPE, "application/json")
        .body("x".repeat(5000))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["error"], "payload_too_large");
    assert!(w.lc.requests().iter().all(|r| !r.path.contains("update")));
}

#[tokio::test]
async fn librechat_too_slow_to_answer_is_504() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[(
            "BFF__LIBRECHAT__RESPONSE_HEADER_TIMEOUT_SECS",
            "1".to_string(),
        )])
        .await;
    w.user(&bff, 21).await;
    let bearer = w.bearer(21);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    w.lc.set_latency(Duration::from_secs(3));
    let started = Instant::now();
    let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body["error"], "librechat_timeout");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "cut at the 1 s timeout"
    );
}

#[tokio::test]
async fn a_silent_stream_is_cut_after_the_idle_timeout() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[("BFF__LIBRECHAT__STREAM_IDLE_TIMEOUT_SECS", "1".to_string())])
        .await;
    w.user(&bff, 22).await;
    let bearer = w.bearer(22);
    // The held last frame never comes: LibreChat goes silent mid-stream.
    let _gate = w.lc.hold_stream_end();
    let started: Value = http()
        .post(format!("{}/api/chat/agents/chat/FakeAI", bff.base_url))
        .bearer_auth(&bearer)
        .json(&chat_body("then silence"))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let stream_id = started["streamId"].as_str().expect("streamId").to_owned();
    let res = http()
        .get(format!(
            "{}/api/chat/agents/chat/stream/{stream_id}",
            bff.base_url
        ))
        .bearer_auth(&bearer)
        .send()
        .await
        .expect("stream");
    let mut body = res.bytes_stream();
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        let mut cut = false;
        while let Some(chunk) = body.next().await {
            cut |= chunk.is_err();
        }
        cut
    })
    .await;
    assert_eq!(drained, Ok(true), "cut with an error well before 10 s");
}

/// A multipart upload's opening: the `endpoint` field, then the head of the `file` part.
fn upload_preamble(boundary: &str) -> String {
    format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"endpoint\"\r\n\r\nFakeAI\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\
         Content-Type: text/plain\r\n\r\n"
    )
}

/// A connection with an upload's request head already sent.
async fn start_upload(
    bff: &support::bff::TestBff,
    bearer: &str,
    boundary: &str,
    framing: &str,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = bff.base_url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /api/chat/files HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\
         User-Agent: {BROWSER_UA}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\
         {framing}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s
}

fn chunk(data: &[u8]) -> Vec<u8> {
    [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat()
}

/// The upload the fake LibreChat recorded once its request ended (recorded after its body did).
async fn upload_seen_by_librechat(w: &World) -> support::fake_librechat::RecordedUpload {
    support::wait::eventually(10, "LibreChat to see the upload's request end", || async {
        w.lc.uploads().pop()
    })
    .await
}

#[tokio::test]
async fn an_upload_that_stalls_mid_body_gets_408_and_librechat_sees_its_request_end() {
    use tokio::io::AsyncWriteExt;
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[(
            "BFF__SERVER__REQUEST_BODY_IDLE_TIMEOUT_SECS",
            "1".to_string(),
        )])
        .await;
    w.user(&bff, 40).await;
    let bearer = w.bearer(40);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    let boundary = "----bffStall";
    let mut s = start_upload(&bff, &bearer, boundary, "Content-Length: 1000000").await;
    let first = [upload_preamble(boundary).as_bytes(), &[b'a'; 200_000][..]].concat();
    s.write_all(&first).await.expect("first part");
    // ...then nothing more, with the connection left open.
    let sent_at = Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(10), support::bff::read_response(&mut s))
        .await
        .expect("answered well before 10 s")
        .expect("a response on the stalled connection");
    assert_eq!(reply.status, 408, "{:?}", reply);
    assert_eq!(reply.json()["error"], "request_timeout");
    assert!(
        sent_at.elapsed() >= Duration::from_millis(800),
        "after the 1 s idle timeout"
    );
    let upload = upload_seen_by_librechat(&w).await;
    assert_eq!(upload.status, 500, "LibreChat's request ended broken");
    assert!(upload.file_bytes > 0 && upload.file_bytes < 1_000_000);
    drop(s);
}

#[tokio::test]
async fn chunked_bodies_over_the_cap_are_413_and_librechat_never_gets_them_whole() {
    use tokio::io::AsyncWriteExt;
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[(
            "BFF__LIBRECHAT__MAX_REQUEST_BODY_BYTES",
            "100000".to_string(),
        )])
        .await;
    w.user(&bff, 41).await;
    let bearer = w.bearer(41);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    let boundary = "----bffTooLarge";
    let mut s = start_upload(&bff, &bearer, boundary, "Transfer-Encoding: chunked").await;
    s.write_all(&chunk(upload_preamble(boundary).as_bytes()))
        .await
        .expect("preamble");
    // 160 KB of file in 16 KB chunks; the terminating chunk is never needed.
    for _ in 0..10 {
        s.write_all(&chunk(&[b'a'; 16 * 1024]))
            .await
            .expect("chunk");
    }
    let reply = tokio::time::timeout(Duration::from_secs(10), support::bff::read_response(&mut s))
        .await
        .expect("answered")
        .expect("a response");
    assert_eq!(reply.status, 413, "{:?}", reply);
    assert_eq!(reply.json()["error"], "payload_too_large");
    let upload = upload_seen_by_librechat(&w).await;
    assert_eq!(
        upload.status, 500,
        "LibreChat's request was aborted, not ended"
    );
    assert!(upload.file_bytes < 100_000, "{}", upload.file_bytes);
}

#[tokio::test]
async fn malformed_chunked_bodies_are_400() {
    use tokio::io::AsyncWriteExt;
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 42).await;
    let bearer = w.bearer(42);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    let boundary = "----bffMalformed";
    let mut s = start_upload(&bff, &bearer, boundary, "Transfer-Encoding: chunked").await;
    let mut body = chunk(upload_preamble(boundary).as_bytes());
    body.extend_from_slice(&chunk(&[b'a'; 1000]));
    body.extend_from_slice(b"zz-not-hex\r\nxyz\r\n");
    s.write_all(&body).await.expect("body");
    let reply = tokio::time::timeout(Duration::from_secs(10), support::bff::read_response(&mut s))
        .await
        .expect("answered")
        .expect("a response");
    assert_eq!(reply.status, 400, "{:?}", reply);
    assert_eq!(reply.json()["error"], "malformed_body");
    let upload = upload_seen_by_librechat(&w).await;
    assert_eq!(upload.status, 500, "LibreChat's request was aborted");
}

/// `METHOD path` on a raw connection (HTTP clients normalise paths and refuse odd methods).
async fn raw(
    bff: &support::bff::TestBff,
    method: &str,
    path: &str,
    bearer: &str,
) -> support::bff::RawReply {
    let addr = bff.base_url.trim_start_matches("http://");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    support::bff::raw_exchange(&bff.base_url, request.as_bytes())
        .await
        .expect("a response")
}

#[tokio::test]
async fn denied_routes_are_404_however_they_are_spelled_and_other_paths_pass_verbatim() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[("BFF__LIBRECHAT__DENY_PREFIXES", "agents/tools".to_string())])
        .await;
    w.user(&bff, 43).await;
    let bearer = w.bearer(43);
    for (method, path) in [
        ("POST", "/api/chat/%61uth/logout"),
        ("POST", "/api/chat/Auth/login"),
        ("POST", "/api/chat/AUTH/refresh"),
        ("GET", "/api/chat/auth/2fa/enable"),
        ("POST", "/api/chat/auth/2fa/confirm"),
        ("POST", "/api/chat/auth/resetPassword"),
        ("DELETE", "/api/chat/user/delete"),
        ("DELETE", "/api/chat/User/%64elete"),
        ("POST", "/api/chat/user/email/change"),
        ("GET", "/api/chat/admin/users"),
        ("GET", "/api/chat/%41dmin/config"),
        ("POST", "/api/chat/api-keys"),
        ("GET", "/api/chat/Api-Keys"),
        ("GET", "/api/chat/%61gents/Tools"),
    ] {
        let reply = raw(&bff, method, path, &bearer).await;
        assert_eq!(reply.status, 404, "{method} {path}");
        assert_eq!(reply.json()["error"], "not_found", "{method} {path}");
    }
    assert!(
        w.lc.requests().is_empty(),
        "nothing reached LibreChat: {:?}",
        w.lc.requests().iter().map(|r| &r.path).collect::<Vec<_>>()
    );

    // Neighbours are forwarded, byte for byte.
    assert_eq!(
        raw(&bff, "GET", "/api/chat/user", &bearer).await.status,
        200
    );
    let reply = raw(&bff, "GET", "/api/chat/convos/%61bc", &bearer).await;
    assert_eq!(
        reply.status, 404,
        "LibreChat's own 404 for an unknown conversation"
    );
    let paths: Vec<String> = w.lc.requests().into_iter().map(|r| r.path).collect();
    assert!(paths.contains(&"/api/user".to_owned()), "{paths:?}");
    assert!(paths.contains(&"/api/convos/%61bc".to_owned()), "{paths:?}");
}

#[tokio::test]
async fn methods_outside_the_proxied_set_are_405_json_with_allow() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 44).await;
    let bearer = w.bearer(44);
    for method in ["TRACE", "PROPFIND", "MKCOL", "CONNECT"] {
        let reply = raw(&bff, method, "/api/chat/convos", &bearer).await;
        assert_eq!(reply.status, 405, "{method}");
        assert_eq!(reply.json()["error"], "method_not_allowed", "{method}");
        let allow = reply.header("allow").unwrap_or_default().to_owned();
        for m in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
            assert!(
                allow.split(',').any(|a| a.trim() == m),
                "{method}: Allow {allow}"
            );
        }
        assert!(!allow.contains("TRACE"), "{allow}");
    }
    assert!(w.lc.requests().is_empty(), "nothing reached LibreChat");
    // The methods in the set are forwarded. No CORS origins are configured, so there is no CORS
    // layer and OPTIONS goes to LibreChat like the rest (a browser's preflight carries no
    // credentials: 401, not forwarded).
    for method in ["GET", "HEAD", "OPTIONS"] {
        let reply = raw(&bff, method, "/api/chat/convos", &bearer).await;
        assert_ne!(reply.status, 405, "{method}");
    }
    let forwarded: Vec<String> =
        w.lc.requests()
            .into_iter()
            .filter(|r| r.path == "/api/convos")
            .map(|r| r.method.to_string())
            .collect();
    assert_eq!(forwarded, ["GET", "HEAD", "OPTIONS"]);
    let mut browser = bff.client();
    browser.csrf = false;
    browser.origin = Some("https://evil.example".into());
    let preflight = browser
        .send(reqwest::Method::OPTIONS, "/api/chat/convos", None, None)
        .await;
    assert_eq!(preflight.status, 401);
    assert!(preflight
        .headers
        .get("access-control-allow-origin")
        .is_none());
    let to_convos =
        w.lc.requests()
            .iter()
            .filter(|r| r.path == "/api/convos")
            .count();
    assert_eq!(to_convos, 3, "the preflight is not forwarded");
}

#[tokio::test]
async fn errors_the_bff_produces_itself_are_json_problems() {
    const ADMIN_TOKEN: &str = "bridge-admin-token-0123456789";
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[("BFF__ADMIN__TOKEN", ADMIN_TOKEN.to_string())])
        .await;
    w.user(&bff, 45).await;
    let bearer = w.bearer(45);
    let json_problem = |what: &str, status: u16, reply: &support::bff::RawReply, code: &str| {
        assert_eq!(reply.status, status, "{what}: {reply:?}");
        assert!(
            reply
                .header("content-type")
                .is_some_and(|ct| ct.starts_with("application/json")),
            "{what}: {reply:?}"
        );
        let body = reply.json();
        assert_eq!(body["error"], code, "{what}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
    };

    // 405 from the router, Allow kept.
    let reply = raw(&bff, "GET", "/auth/login", "x").await;
    json_problem("GET /auth/login", 405, &reply, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("POST"));

    // 413 from axum's default body limit (2 MiB): send one byte more than it reads, so the
    // BFF has consumed everything sent when it answers.
    for path in ["/auth/session", "/hooks/users"] {
        let addr = bff.base_url.trim_start_matches("http://");
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\
             Content-Type: application/json\r\nContent-Length: 3000000\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        request.extend(std::iter::repeat_n(b' ', 2 * 1024 * 1024 + 1));
        let reply = support::bff::raw_exchange(&bff.base_url, &request)
            .await
            .expect("a response");
        json_problem(path, 413, &reply, "payload_too_large");
    }

    // Query and Path rejections (400) behind the admin check.
    let reply = raw(&bff, "GET", "/admin/jobs?limit=many", ADMIN_TOKEN).await;
    json_problem("bad query", 400, &reply, "bad_request");
    let reply = raw(&bff, "GET", "/admin/users/%FF%FE", ADMIN_TOKEN).await;
    json_problem("bad path parameter", 400, &reply, "bad_request");

    // LibreChat's own answers pass untouched: an unknown conversation is its empty 404.
    let reply = raw(&bff, "GET", "/api/chat/convos/nope", &bearer).await;
    assert_eq!(reply.status, 404);
    assert!(reply.body.is_empty(), "{reply:?}");
}

#[tokio::test]
async fn a_small_body_that_stalls_gets_408_before_reaching_librechat() {
    use tokio::io::AsyncWriteExt;
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[(
            "BFF__SERVER__REQUEST_BODY_IDLE_TIMEOUT_SECS",
            "1".to_string(),
        )])
        .await;
    w.user(&bff, 46).await;
    let bearer = w.bearer(46);
    let addr = bff.base_url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // Small enough to be buffered for a replay: it is read in full before anything is sent.
    let head = format!(
        "POST /api/chat/convos/update HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"arg\":"
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let reply = tokio::time::timeout(Duration::from_secs(10), support::bff::read_response(&mut s))
        .await
        .expect("answered well before 10 s")
        .expect("a response");
    assert_eq!(reply.status, 408, "{reply:?}");
    assert_eq!(reply.json()["error"], "request_timeout");
    assert!(
        w.lc.requests()
            .iter()
            .all(|r| !r.path.starts_with("/api/convos")),
        "nothing was forwarded"
    );
}

#[tokio::test]
async fn a_librechat_that_refuses_fresh_tokens_costs_one_renewal_not_one_per_request() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 31).await;
    let bearer = w.bearer(31);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    let (logins, refreshes) = (w.lc.login_calls(), w.lc.refresh_calls());
    // LibreChat now refuses every token of the user (say, the account was blocked there).
    w.lc.reject_all_tokens(true);
    for _ in 0..20 {
        let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"], "librechat_unauthorized");
    }
    let renewals = (w.lc.login_calls() - logins) + (w.lc.refresh_calls() - refreshes);
    assert_eq!(renewals, 1, "20 refused requests renewed {renewals} times");

    // Once LibreChat accepts tokens again and the pause is over, requests recover.
    w.lc.reject_all_tokens(false);
    bff.clock.advance(Duration::from_secs(11));
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------------------
// Failure semantics of LibreChat logins: detached renewals, lock watchdog, drift only on
// LibreChat's own verdict, remembered failures, bounded memory
// ---------------------------------------------------------------------------------------------

/// Sends `GET path` with the bearer token on a new connection, waits for `held` (the upstream
/// call the request is stuck in), then goes away as a backgrounded phone would, and returns
/// once the BFF has closed the connection without answering.
async fn abandon_mid_request(
    bff: &support::bff::TestBff,
    path: &str,
    bearer: &str,
    held: &support::fake_librechat::StreamGate,
) {
    use tokio::io::AsyncWriteExt;
    let addr = bff.base_url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("write");
    held.reached().await;
    conn.shutdown().await.expect("half-close");
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        support::bff::read_response(&mut conn),
    )
    .await
    .expect("the BFF closes the abandoned connection");
    assert!(
        reply.is_none(),
        "no answer for a client that left: {reply:?}"
    );
}

#[tokio::test]
async fn a_client_that_disconnects_mid_librechat_refresh_loses_neither_the_login_nor_30_seconds() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 40).await;
    let bearer = w.bearer(40);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    assert_eq!((w.lc.login_calls(), w.lc.refresh_calls()), (1, 0));

    // LibreChat refuses the token: the BFF refreshes. LibreChat rotates the refresh cookie on
    // arrival and holds its answer; the client goes away meanwhile.
    w.lc.reject_all_tokens(true);
    let gate = w.lc.hold_next_auth("/api/auth/refresh");
    abandon_mid_request(&bff, "/api/chat/convos", &bearer, &gate).await;
    w.lc.reject_all_tokens(false);
    gate.release();
    // Nobody awaits the renewal any more: it finishes (and stores the rotated cookie) on its
    // own. Wait for that to land, so the next requests see its token, not the old one.
    support::wait::eventually(10, "the abandoned renewal to land", || async {
        (bff.state.tokens.cached_generation("40") == Some(2)).then_some(())
    })
    .await;

    let started = Instant::now();
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(20),
        get_json(&bff, "/api/chat/convos", &bearer),
    )
    .await
    .expect("the next request does not stall on a leaked lock");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}: waited for a leaked lock",
        started.elapsed()
    );
    assert_eq!(
        (w.lc.login_calls(), w.lc.refresh_calls()),
        (1, 1),
        "one refresh, no re-login"
    );

    // The stored refresh cookie is the rotated one: the next renewal is a refresh, not a login.
    w.lc.reject_all_tokens(true);
    let (status, _) = get_json(&bff, "/api/chat/convos", &bearer).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        (w.lc.login_calls(), w.lc.refresh_calls()),
        (1, 2),
        "the rotated refresh cookie was kept"
    );
}

#[tokio::test]
async fn a_librechat_refresh_slower_than_the_lock_ttl_is_not_repeated_by_another_replica() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let a = w.bff(&[]).await;
    let b = w.bff(&[]).await;
    // A short TTL stands in for a LibreChat slower than the default 30 s.
    let ttl = Duration::from_millis(300);
    a.state.tokens.set_lock_ttl(ttl);
    b.state.tokens.set_lock_ttl(ttl);
    w.user(&a, 41).await;
    let bearer = w.bearer(41);
    assert_eq!(
        get_json(&a, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get_json(&b, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    assert_eq!(w.lc.login_calls(), 1, "b adopted a's login");

    // Both replicas see LibreChat refuse the token and renew; one refresh is held.
    w.lc.reject_all_tokens(true);
    let gate = w.lc.hold_next_auth("/api/auth/refresh");
    let on = |bff: &support::bff::TestBff| {
        let url = format!("{}/api/chat/convos", bff.base_url);
        let bearer = bearer.clone();
        tokio::spawn(async move {
            let res = http()
                .get(url)
                .bearer_auth(bearer)
                .send()
                .await
                .expect("send");
            res.status()
        })
    };
    let (ra, rb) = (on(&a), on(&b));
    gate.reached().await;
    support::wait::eventually(10, "both replicas' requests refused", || async {
        (w.lc.calls_to("/api/convos") >= 4).then_some(())
    })
    .await;
    // The refresh now outlasts the lock's TTL several times over; the lock must still be held.
    tokio::time::sleep(ttl * 4).await;
    let mut redis = redis::Client::open(w.redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("{}:lock:lc-login:41", w.redis.key_prefix()))
        .query_async(&mut redis)
        .await
        .expect("pttl");
    assert!(pttl > 0, "the lock is kept alive while held (PTTL {pttl})");
    w.lc.reject_all_tokens(false);
    gate.release();

    assert_eq!(ra.await.expect("a"), StatusCode::OK);
    assert_eq!(rb.await.expect("b"), StatusCode::OK);
    assert_eq!(
        (w.lc.refresh_calls(), w.lc.login_calls()),
        (1, 1),
        "one refresh, and no replica refreshed with the spent cookie"
    );
}

#[tokio::test]
async fn an_ingress_404_at_login_does_not_mark_the_credential_drifted() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 42).await;
    let bearer = w.bearer(42);
    let status_of = |bff: &support::bff::TestBff| {
        let vault = bff.state.vault.clone();
        async move {
            vault
                .get("42")
                .await
                .expect("vault")
                .expect("record")
                .status
        }
    };

    // A misrouting ingress answers the login with its own HTML 404.
    w.lc.answer_with("/api/auth/login", Some(CannedAnswer::ingress_404()));
    let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
    assert!(
        status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE,
        "{status} {body}"
    );
    assert_eq!(body["error"], "librechat_unavailable");
    assert_eq!(w.lc.login_calls(), 1);
    assert_eq!(status_of(&bff).await, CredentialStatus::Ready);

    // A JSON 404 that is not a credential verdict (LibreChat's "Endpoint not found").
    bff.clock.advance(Duration::from_secs(6));
    w.lc.answer_with(
        "/api/auth/login",
        Some(CannedAnswer {
            status: StatusCode::NOT_FOUND,
            content_type: "application/json; charset=utf-8",
            body: r#"{"message":"Endpoint not found"}"#.into(),
        }),
    );
    let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
    assert_eq!(body["error"], "librechat_unavailable", "{status} {body}");
    assert_eq!(w.lc.login_calls(), 2);
    assert_eq!(status_of(&bff).await, CredentialStatus::Ready);

    // Routed again: the same credential works.
    bff.clock.advance(Duration::from_secs(6));
    w.lc.answer_with("/api/auth/login", None);
    let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(status_of(&bff).await, CredentialStatus::Ready);
}

#[tokio::test]
async fn a_failed_renewal_is_not_retried_by_every_request_in_the_skew_window() {
    let w = World::new(FakeLibreChatOptions {
        access_token_lifetime: Duration::from_secs(60),
        ..FakeLibreChatOptions::default()
    })
    .await;
    // Skew beyond the token's lifetime: every request is in the renewal window.
    let bff = w
        .bff(&[("BFF__LIBRECHAT__TOKEN_REFRESH_SKEW_SECS", "120".to_string())])
        .await;
    w.user(&bff, 43).await;
    let bearer = w.bearer(43);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    w.lc.answer_with(
        "/api/auth/refresh",
        Some(CannedAnswer {
            status: StatusCode::BAD_GATEWAY,
            content_type: "text/html",
            body: "<html><body>502 Bad Gateway</body></html>".into(),
        }),
    );
    for _ in 0..10 {
        let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "the still-valid token serves: {body}"
        );
    }
    assert_eq!(
        w.lc.refresh_calls(),
        1,
        "one failed refresh, not one per request"
    );

    // After the pause the renewal is tried again, and succeeds once LibreChat does.
    w.lc.answer_with("/api/auth/refresh", None);
    bff.clock.advance(Duration::from_secs(6));
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &bearer).await.0,
        StatusCode::OK
    );
    assert_eq!(w.lc.refresh_calls(), 2);
    assert_eq!(w.lc.login_calls(), 1);
}

#[tokio::test]
async fn the_token_cache_and_renewal_pauses_stay_bounded_after_100k_users() {
    use librechat_bff::librechat::{
        tokens::{PAUSE_CAPACITY, TOKEN_CACHE_CAPACITY},
        UpstreamToken,
    };
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    let tokens = &bff.state.tokens;
    let token = UpstreamToken {
        authorization: reqwest::header::HeaderValue::from_static("Bearer x"),
        exp: i64::MAX / 2,
        generation: 1,
    };
    for i in 0..100_000 {
        let user = format!("user-{i}");
        tokens.cache_token(&user, token.clone());
        tokens.renewal_refused(&user, &token);
    }
    let held = tokens.memory_entries();
    assert!(
        held.cached_tokens <= TOKEN_CACHE_CAPACITY,
        "{held:?}: more tokens than the cap"
    );
    assert!(
        held.renewal_pauses <= PAUSE_CAPACITY,
        "{held:?}: more pauses than the cap"
    );
}

/// `GET` commands Redis has run so far.
async fn redis_gets(w: &World) -> u64 {
    let mut conn = w
        .redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("info");
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_warm_cookie_session_reads_no_redis_and_ends_on_every_replica_at_once() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let a = w.bff(&[]).await;
    let b = w.bff(&[]).await;
    w.user(&a, 18).await;
    let mut on_a = a.client();
    assert_eq!(
        on_a.login("user18", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    let mut on_b = on_a.with_base(&b.base_url);
    // The first request on each replica reads the record; the next ones read nothing.
    assert_eq!(on_a.get("/api/chat/convos").await.status, StatusCode::OK);
    assert_eq!(on_b.get("/api/chat/convos").await.status, StatusCode::OK);
    let before = redis_gets(&w).await;
    for _ in 0..10 {
        assert_eq!(on_a.get("/api/chat/convos").await.status, StatusCode::OK);
        assert_eq!(on_b.get("/api/chat/convos").await.status, StatusCode::OK);
    }
    assert_eq!(redis_gets(&w).await, before, "20 warm requests, no GET");

    // Signed out on A: B, which holds a copy, refuses within moments.
    let out = on_a.post("/auth/logout", serde_json::json!({})).await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.body);
    let ended = Instant::now();
    eventually(5, "replica B to drop the ended session", || {
        let mut on_b = on_b.clone();
        async move {
            (on_b.get("/api/chat/convos").await.status == StatusCode::UNAUTHORIZED).then_some(())
        }
    })
    .await;
    assert!(
        ended.elapsed() < Duration::from_secs(1),
        "B served for {:?}",
        ended.elapsed()
    );

    // Revoked by an operator on A (the admin API's call): both replicas refuse.
    let mut again = a.client();
    assert_eq!(
        again.login("user18", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    let mut again_b = again.with_base(&b.base_url);
    for _ in 0..2 {
        assert_eq!(again_b.get("/api/chat/convos").await.status, StatusCode::OK);
        assert_eq!(again.get("/api/chat/convos").await.status, StatusCode::OK);
    }
    assert_eq!(a.state.sessions.revoke_all("18").await.expect("revoke"), 1);
    assert_eq!(
        again.get("/api/chat/convos").await.status,
        StatusCode::UNAUTHORIZED
    );
    eventually(5, "replica B to drop the revoked session", || {
        let mut again_b = again_b.clone();
        async move {
            (again_b.get("/api/chat/convos").await.status == StatusCode::UNAUTHORIZED).then_some(())
        }
    })
    .await;
}

/// The warm lane (src/proxy/lane.rs) takes a cookie only when reading it needs no judgement;
/// every other shape reaches tower-sessions, which reads the *last* cookie of a name and decodes
/// percent-encoding. Whichever way a request goes, the answer is the router's.
#[tokio::test]
async fn the_chat_lane_reads_session_cookies_exactly_as_the_session_layer_does() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w.bff(&[]).await;
    w.user(&bff, 19).await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("user19", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    let real = browser.cookie.clone().expect("session cookie");
    let (name, id) = real.split_once('=').expect("name=value");
    // Warm: the replica now holds a copy of the session.
    assert_eq!(browser.get("/api/chat/convos").await.status, StatusCode::OK);
    assert_eq!(browser.get("/api/chat/convos").await.status, StatusCode::OK);

    // A well-formed id of no session.
    let unknown = "AAAAAAAAAAAAAAAAAAAAAA";
    let shapes = [
        // The last cookie of the name counts: an unknown id after the real one is refused...
        (
            format!("{real}; {name}={unknown}"),
            StatusCode::UNAUTHORIZED,
        ),
        // ...and the real one after an unknown one serves.
        (format!("{name}={unknown}; {real}"), StatusCode::OK),
        // Two Cookie headers' worth in one, with spaces and empty pieces.
        (format!(" ; other=1;  {real} ;"), StatusCode::OK),
        // Percent-encoded: decoded by tower-cookies, the same session.
        (
            format!("{name}=%{:02X}{}", id.as_bytes()[0], &id[1..]),
            StatusCode::OK,
        ),
        // The real one drowned in a Cookie header over `session.max_cookie_bytes`: not read.
        (
            format!("{real}; junk={}", "j".repeat(20 * 1024)),
            StatusCode::UNAUTHORIZED,
        ),
        // Not an id at all.
        (format!("{name}=not-an-id"), StatusCode::UNAUTHORIZED),
        (format!("{name}="), StatusCode::UNAUTHORIZED),
    ];
    for (cookie, expected) in shapes {
        let mut client = browser.clone();
        client.cookie = Some(cookie.clone());
        let res = client.get("/api/chat/convos").await;
        assert_eq!(res.status, expected, "Cookie: {cookie}: {}", res.body);
        if expected != StatusCode::OK {
            assert_eq!(res.body["error"], "unauthenticated", "{cookie}");
        }
        assert!(
            res.headers.contains_key("x-request-id"),
            "the edge sees every request"
        );
    }
    // None of that ended or changed the real session.
    assert_eq!(browser.get("/api/chat/convos").await.status, StatusCode::OK);

    // A warm cookie still needs the CSRF header for a change.
    let mut no_csrf = browser.clone();
    no_csrf.csrf = false;
    let res = no_csrf
        .post("/api/chat/convos/update", serde_json::json!({}))
        .await;
    assert_eq!(res.status, StatusCode::FORBIDDEN, "{}", res.body);
    assert_eq!(res.body["error"], "csrf_rejected");
    let chats_before = w.lc.calls_to("/api/convos/update");
    assert_eq!(chats_before, 0, "refused before LibreChat");

    // What the lane leaves to the router gets the router's answers.
    let res = browser
        .send(reqwest::Method::TRACE, "/api/chat/convos", None, None)
        .await;
    assert_eq!(res.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(res.headers.contains_key(header::ALLOW));
    for (path, status) in [
        ("/api/chat/", StatusCode::NOT_FOUND),
        ("/api/chat/auth/login", StatusCode::NOT_FOUND),
        ("/api/chat//convos", StatusCode::BAD_REQUEST),
        ("/api/chat/convos%2F..%2Fkeys", StatusCode::BAD_REQUEST),
    ] {
        let res = browser.get(path).await;
        assert_eq!(res.status, status, "{path}");
        assert!(res.body["error"].is_string(), "{path}: {}", res.body);
    }

    // Bearer: the same user, no cookie.
    let token = w.idp.mint_access(19, Duration::from_secs(300));
    let mut mobile = bff.client();
    mobile.csrf = false;
    let res = mobile
        .send(reqwest::Method::GET, "/api/chat/convos", None, Some(&token))
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    let res = mobile
        .send(
            reqwest::Method::GET,
            "/api/chat/convos",
            None,
            Some("not.a.jwt"),
        )
        .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
}
