//! Operations: metrics after an end-to-end run, graceful shutdown of the real binary under
//! SIGTERM with an open stream, `doctor`, Redis unreachable at start, `Retry-After` of a delayed
//! provisioning job, a custom CSRF header name, and bounded in-memory state.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures_util::StreamExt;
use reqwest::{header, StatusCode};
use serde_json::{json, Value};
use support::{
    fake_librechat::{FakeLibreChat, FakeLibreChatOptions},
    wait::{eventually, free_port},
    world::{chat_body, get_json, http, World, ID_PASSWORD},
};
use tokio::sync::watch;

const ADMIN_TOKEN: &str = "ops-admin-token-0123456789";

/// `name{labels} value` lines of the exposition whose metric name is `name`.
fn samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| (series, value.parse().unwrap_or(0.0)))
        })
        .collect()
}

fn nonzero(text: &str, name: &str) -> bool {
    samples(text, name).iter().any(|(_, v)| *v > 0.0)
}

async fn metrics(base: &str) -> String {
    let res = http()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(res.status(), StatusCode::OK);
    res.text().await.expect("text")
}

#[tokio::test]
async fn metrics_show_every_family_after_an_end_to_end_run() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[
            ("BFF__TELEMETRY__METRICS_ON_MAIN_LISTENER", "true".into()),
            ("BFF__ADMIN__TOKEN", ADMIN_TOKEN.into()),
            ("BFF__PROVISIONING__BASE_BACKOFF_SECS", "60".into()),
        ])
        .await;
    w.user(&bff, 301).await;

    // Sign-in, proxied calls, a chat turn with its stream held open.
    let mut browser = bff.client();
    assert_eq!(
        browser.login("user301", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    assert_eq!(browser.get("/api/chat/convos").await.status, StatusCode::OK);
    let gate = w.lc.hold_stream_end();
    let started = browser
        .post("/api/chat/agents/chat/FakeAI", chat_body("hi"))
        .await;
    let stream_id = started.body["streamId"]
        .as_str()
        .expect("streamId")
        .to_owned();
    let res = http()
        .get(format!(
            "{}/api/chat/agents/chat/stream/{stream_id}",
            bff.base_url
        ))
        .bearer_auth(w.bearer(301))
        .send()
        .await
        .expect("stream");
    let mut body = res.bytes_stream();
    let _first = body.next().await.expect("a frame").expect("chunk");
    let during = metrics(&bff.base_url).await;
    assert_eq!(
        samples(&during, "bff_sse_streams_active"),
        vec![("bff_sse_streams_active", 1.0)]
    );
    gate.release();
    while body.next().await.is_some() {}

    // Provisioning: one dead job, one delayed (LibreChat down), one waiting in the queue.
    let (tx, rx) = watch::channel(false);
    let worker = bff.state.provisioner.spawn_worker(rx);
    let add = |id: &str, email: &str| {
        http()
            .post(format!("{}/admin/users", bff.base_url))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"user_id": id, "email": email}))
            .send()
    };
    // Valid for the BFF, refused by LibreChat's stricter validator.
    add("302", "a!b@example.com").await.expect("add");
    let queue = bff.state.provisioner.queue.clone();
    eventually(20, "the dead-lettered job", || async {
        queue.sizes().await.ok().filter(|s| s.2 == 1)
    })
    .await;
    w.lc.go_down().await;
    add("303", "down@example.com").await.expect("add");
    eventually(20, "the delayed job", || async {
        queue.sizes().await.ok().filter(|s| s.1 == 1)
    })
    .await;
    let _ = tx.send(true);
    let _ = worker.await;
    add("304", "later@example.com").await.expect("add");
    // An upstream error, and a revoked session.
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &w.bearer(301)).await.0,
        StatusCode::BAD_GATEWAY
    );
    http()
        .delete(format!("{}/admin/users/301/sessions", bff.base_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("revoke");

    let text = metrics(&bff.base_url).await;
    for family in [
        "bff_http_requests_total",
        "bff_http_request_duration_seconds_count",
        "bff_librechat_upstream_duration_seconds_count",
        "bff_librechat_upstream_errors_total",
        "bff_errors_total",
        "bff_librechat_auth_total",
        "bff_identity_auth_total",
        "bff_sessions_total",
        "bff_sse_stream_duration_seconds_count",
        "bff_provisioning_jobs_total",
        "bff_provisioning_queue_depth",
        "bff_provisioning_delayed_jobs",
        "bff_provisioning_dead_letter_size",
    ] {
        assert!(
            nonzero(&text, family),
            "{family} is zero or missing:\n{text}"
        );
    }
    assert!(text.contains(r#"bff_librechat_upstream_errors_total{kind="unreachable"}"#));
    assert!(text.contains(r#"bff_sessions_total{event="revoked"}"#));
    // The BFF's own error answers are counted by code (LibreChat down → 502 above).
    assert!(
        text.contains(r#"bff_errors_total{code="librechat_unavailable"}"#),
        "{text}"
    );
}

/// The real binary, configured by environment against this test's world.
fn spawn_bff(w: &World, port: u16, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_librechat-bff"));
    cmd.arg("serve")
        .env("BFF__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("BFF__IDENTITY__BASE_URL", &w.idp.base_url)
        .env(
            "BFF__IDENTITY__JWT__HS_SECRET",
            w.idp.hs_secret().expect("hs"),
        )
        .env("BFF__SESSION__STORE", "redis")
        .env("BFF__REDIS__URL", w.redis.url())
        .env("BFF__REDIS__KEY_PREFIX", w.redis.key_prefix())
        .env("BFF__CRYPTO__FERNET_KEYS", &w.key)
        .env("BFF__LIBRECHAT__URL", &w.lc.base_url)
        .env("BFF__PROVISIONING__WORKERS_IN_SERVE", "false")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn the binary")
}

async fn wait_healthy(base: &str) {
    eventually(20, "the binary to answer /healthz", || async {
        let r = http().get(format!("{base}/healthz")).send().await.ok()?;
        (r.status() == StatusCode::OK).then_some(())
    })
    .await;
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "did not exit in {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn open_held_stream(
    w: &World,
    base: &str,
    id: i64,
) -> (
    impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>>,
    support::fake_librechat::StreamGate,
) {
    let bearer = w.bearer(id);
    // The gate applies to the next chat turn: set it before the POST.
    let gate = w.lc.hold_stream_end();
    let res = http()
        .post(format!("{base}/api/chat/agents/chat/FakeAI"))
        .bearer_auth(&bearer)
        .json(&chat_body("long answer"))
        .send()
        .await
        .expect("chat");
    let started: Value = res.json().await.expect("json");
    let stream_id = started["streamId"].as_str().expect("streamId").to_owned();
    let res = http()
        .get(format!("{base}/api/chat/agents/chat/stream/{stream_id}"))
        .bearer_auth(&bearer)
        .header(header::ACCEPT, "text/event-stream")
        .send()
        .await
        .expect("stream");
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.bytes_stream();
    let first = body.next().await.expect("a frame").expect("chunk");
    assert!(first.starts_with(b"event: message"));
    (body, gate)
}

#[tokio::test]
async fn sigterm_lets_an_open_stream_finish_then_exits_zero() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let seeder = w.bff(&[]).await;
    w.user(&seeder, 310).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn_bff(&w, port, &[("BFF__SERVER__DRAIN_TIMEOUT_SECS", "20")]);
    wait_healthy(&base).await;
    let (mut body, gate) = open_held_stream(&w, &base, 310).await;

    sigterm(&child);
    // New connections are refused once the signal is handled...
    eventually(20, "new connections to be refused", || async {
        http()
            .get(format!("{base}/healthz"))
            .send()
            .await
            .err()
            .map(|_| ())
    })
    .await;
    // ...while the open stream runs to its end.
    gate.release();
    let mut rest = String::new();
    while let Some(chunk) = body.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk.expect("stream not cut")));
    }
    assert!(
        rest.contains("\"final\":true"),
        "the stream completed: {rest}"
    );
    let status = wait_exit(&mut child, 10).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_stream_still_open_after_the_drain_timeout_is_cut_and_the_exit_is_clean() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let seeder = w.bff(&[]).await;
    w.user(&seeder, 311).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn_bff(&w, port, &[("BFF__SERVER__DRAIN_TIMEOUT_SECS", "1")]);
    wait_healthy(&base).await;
    let (mut body, _gate) = open_held_stream(&w, &base, 311).await;
    sigterm(&child);
    let status = wait_exit(&mut child, 10).await;
    assert_eq!(status.code(), Some(0));
    let mut cut = false;
    while let Some(chunk) = body.next().await {
        if chunk.is_err() {
            cut = true;
        }
    }
    assert!(cut, "the held stream was cut, not completed");
}

#[tokio::test]
async fn doctor_names_disabled_registration_and_its_fix() {
    let lc = FakeLibreChat::start(FakeLibreChatOptions {
        allow_registration: false,
        ..FakeLibreChatOptions::default()
    })
    .await;
    let redis = support::redis::RedisServer::start_with_aof().await;
    let key = librechat_bff::credentials::KeyRing::generate_key();
    // tokio's Command: the fake LibreChat runs on this test's runtime and must keep answering.
    let doctor = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_librechat-bff"))
            .arg("doctor")
            .env("BFF__REDIS__URL", redis.url())
            .env("BFF__CRYPTO__FERNET_KEYS", &key)
            .env("BFF__SESSION__STORE", "redis")
            .env(
                "BFF__IDENTITY__JWT__HS_SECRET",
                "a-secret-for-the-doctor-test",
            )
            .env("BFF__LIBRECHAT__URL", &lc.base_url)
            .output()
    };
    let out = doctor().await.expect("doctor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("[FAIL] LibreChat registration is disabled"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fix: set ALLOW_REGISTRATION=true"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[ok]   Redis persistence: appendonly yes"),
        "{stdout}"
    );
    assert!(stdout.contains("[ok]   LibreChat answers"), "{stdout}");

    lc.set_allow_registration(true);
    let out = doctor().await.expect("doctor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "all good now: {stdout}");
}

#[tokio::test]
async fn a_worker_process_provisions_and_stops_cleanly_on_sigterm() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let state_bff = w.bff(&[]).await;
    state_bff
        .state
        .provisioner
        .enqueue(provisioning::ProvisionRequest {
            user_id: "320".into(),
            email: "worker@example.com".into(),
            name: None,
            source: "test".into(),
        })
        .await
        .expect("enqueue");
    let mut child = Command::new(env!("CARGO_BIN_EXE_librechat-bff"))
        .arg("worker")
        .env("BFF__REDIS__URL", w.redis.url())
        .env("BFF__REDIS__KEY_PREFIX", w.redis.key_prefix())
        .env("BFF__CRYPTO__FERNET_KEYS", &w.key)
        .env("BFF__SESSION__STORE", "redis")
        .env("BFF__LIBRECHAT__URL", &w.lc.base_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("worker");
    let vault = state_bff.state.vault.clone();
    eventually(20, "the user to be ready", || async {
        let r = vault.get("320").await.ok()??;
        (r.status == librechat_bff::credentials::vault::CredentialStatus::Ready).then_some(())
    })
    .await;
    assert_eq!(
        w.lc.user_count(),
        2,
        "the user and the BFF's service account"
    );
    sigterm(&child);
    let status = wait_exit(&mut child, 10).await;
    assert_eq!(status.code(), Some(0));
}

/// Opens a connection and sends `head` one byte per second, reading meanwhile; says `connected`
/// once the first byte is out; returns how long after connecting the server closed the
/// connection, and whether the whole head had been sent by then.
async fn trickle_head(
    addr: String,
    head: &'static [u8],
    connected: tokio::sync::mpsc::Sender<()>,
) -> (Duration, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = tokio::time::Instant::now();
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sent = 0;
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => return (started.elapsed(), sent == head.len()),
                Ok(_) => {} // whatever the server says before closing
            },
            _ = tick.tick(), if sent < head.len() => {
                if wr.write_all(&head[sent..=sent]).await.is_err() {
                    return (started.elapsed(), sent == head.len());
                }
                if sent == 0 {
                    let _ = connected.send(()).await;
                }
                sent += 1;
            }
        }
    }
}

#[tokio::test]
async fn slow_header_clients_are_dropped_at_the_header_timeout_while_others_are_served() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[("BFF__SERVER__HEADER_READ_TIMEOUT_SECS", "2".into())])
        .await;
    w.user(&bff, 330).await;
    let addr = bff.base_url.trim_start_matches("http://").to_owned();
    // ~60 bytes at one byte per second: a minute to send, if the server waited.
    const HEAD: &[u8] =
        b"GET /healthz HTTP/1.1\r\nHost: slow.example\r\nUser-Agent: slowloris\r\n\r\n";
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (connected_tx, mut connected) = tokio::sync::mpsc::channel(50);
    let slow: Vec<_> = (0..50)
        .map(|_| {
            let (addr, closed, tx) = (addr.clone(), closed.clone(), connected_tx.clone());
            tokio::spawn(async move {
                let r = trickle_head(addr, HEAD, tx).await;
                closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                r
            })
        })
        .collect();
    for _ in 0..50 {
        connected.recv().await.expect("a slow client connected");
    }

    // Meanwhile a normal client is served, health check and proxied call alike.
    let started = tokio::time::Instant::now();
    let res = http()
        .get(format!("{}/healthz", bff.base_url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        get_json(&bff, "/api/chat/convos", &w.bearer(330)).await.0,
        StatusCode::OK
    );
    assert!(started.elapsed() < Duration::from_secs(1), "not held up");
    assert_eq!(
        closed.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "served while the 50 slow connections were all still open"
    );

    for task in slow {
        let (after, finished_head) = task.await.expect("slow client");
        assert!(!finished_head, "closed before the head was complete");
        assert!(
            after >= Duration::from_millis(1900) && after < Duration::from_secs(5),
            "closed at the 2 s header timeout, not after {after:?}"
        );
    }
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_for_a_free_slot() {
    use tokio::io::AsyncWriteExt;
    let w = World::new(FakeLibreChatOptions::default()).await;
    let bff = w
        .bff(&[
            ("BFF__SERVER__MAX_CONNECTIONS", "1".into()),
            ("BFF__SERVER__HEADER_READ_TIMEOUT_SECS", "60".into()),
        ])
        .await;
    let addr = bff.base_url.trim_start_matches("http://").to_owned();
    let request = b"GET /healthz HTTP/1.1\r\nHost: bff\r\n\r\n";

    // The first connection is served and stays open (keep-alive): it holds the only slot.
    let mut first = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    first.write_all(request).await.expect("write");
    let reply = support::bff::read_response(&mut first)
        .await
        .expect("first served");
    assert_eq!(reply.status, 200);

    // The second connects (the kernel's backlog) but is not served while the first is open.
    let mut second = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    second.write_all(request).await.expect("write");
    let waiting = tokio::spawn(async move { support::bff::read_response(&mut second).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "no answer while every slot is taken"
    );

    // The first closes: the second is accepted and served.
    drop(first);
    let reply = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a slot freed")
        .expect("join")
        .expect("a response");
    assert_eq!(reply.status, 200);
}

/// A listener that accepts connections and never answers: a Redis that is "there" but hangs,
/// so every connect attempt runs into its timeout. Dropping the task closes it and them.
fn black_hole(listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    })
}

async fn me_with_cookie(base: &str, cookie: &str) -> (StatusCode, Value) {
    let res = http()
        .get(format!("{base}/auth/me"))
        .header(header::COOKIE, cookie)
        .send()
        .await
        .expect("request reaches the BFF");
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn redis_unreachable_at_start_fails_fast_then_recovers_without_restart() {
    use librechat_bff::redis_conn::CONNECT_TIMEOUT;
    let w = World::new(FakeLibreChatOptions::default()).await;
    // The BFF's own Redis: started to own a port, stopped; meanwhile a black hole holds the port.
    let mut redis = support::redis::RedisServer::start_with_aof().await;
    redis.stop().await;
    let hole = black_hole(
        tokio::net::TcpListener::bind(("127.0.0.1", redis.port()))
            .await
            .expect("bind the black hole on the stopped Redis's port"),
    );
    let bff = w
        .bff(&[
            ("BFF__REDIS__URL", redis.url()),
            ("BFF__REDIS__KEY_PREFIX", redis.key_prefix()),
        ])
        .await;

    let started = tokio::time::Instant::now();
    let res = http()
        .get(format!("{}/healthz", bff.base_url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_millis(500), "at once");

    // Requests that need Redis answer 503 at once, all of them, while a connect attempt hangs.
    let cookie = format!("__Host-bff={}", tower_sessions::session::Id::default());
    let started = tokio::time::Instant::now();
    let replies =
        futures_util::future::join_all((0..8).map(|_| me_with_cookie(&bff.base_url, &cookie)))
            .await;
    let took = started.elapsed();
    for (status, body) in &replies {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"], "session_store_unavailable");
    }
    assert!(
        took < CONNECT_TIMEOUT / 2,
        "8 requests answered in {took:?}, well under the {CONNECT_TIMEOUT:?} connect timeout"
    );
    let res = http()
        .get(format!("{}/readyz", bff.base_url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);

    // Redis comes up on that port: the same process recovers by itself.
    hole.abort();
    let _ = hole.await;
    redis.restart().await;
    eventually(20, "the BFF to reach Redis", || async {
        let r = http()
            .get(format!("{}/readyz", bff.base_url))
            .send()
            .await
            .ok()?;
        (r.status() == StatusCode::OK).then_some(())
    })
    .await;
    let (status, body) = me_with_cookie(&bff.base_url, &cookie).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "an unknown session: {body}"
    );
    w.user(&bff, 360).await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("user360", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    let me = browser.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body["user"]["id"], "360");
}

async fn chat_status(bff_base: &str, bearer: &str) -> (StatusCode, Option<u64>, Value) {
    let res = http()
        .get(format!("{bff_base}/api/chat/convos"))
        .bearer_auth(bearer)
        .send()
        .await
        .expect("request reaches the BFF");
    let status = res.status();
    let retry_after = res
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    (status, retry_after, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_delayed_provisioning_job_answers_retry_after_its_next_run() {
    // LibreChat allows one registration per 10 minutes from the worker's address: the BFF's
    // service account takes it, so the user's registration is refused with LibreChat's delay.
    let w = World::new(FakeLibreChatOptions {
        register_max: 1,
        register_window: Duration::from_secs(600),
        ..FakeLibreChatOptions::default()
    })
    .await;
    let bff = w.bff(&[]).await;
    w.idp.add_user(support::fake_idp::FakeUser {
        id: 340,
        username: "user340".into(),
        email: "user340@example.com".into(),
        password: ID_PASSWORD.into(),
        name: "User 340".into(),
        groups: vec![],
        is_active: true,
    });
    let bearer = w.bearer(340);

    // No account yet: the job is queued just in time and runs within seconds.
    let (status, retry_after, body) = chat_status(&bff.base_url, &bearer).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "provisioning_pending");
    assert_eq!(
        retry_after,
        Some(librechat_bff::error::PROVISIONING_RETRY_SECS)
    );

    let (tx, rx) = watch::channel(false);
    let worker = bff.state.provisioner.spawn_worker(rx);
    let queue = bff.state.provisioner.queue.clone();
    let job = eventually(
        20,
        "the user's job to wait for LibreChat's limiter",
        || async {
            let id = queue.active_job_of("340").await.ok()??;
            let job = queue.job(&id).await.ok()??;
            (job.state == provisioning::JobState::Delayed).then_some(job)
        },
    )
    .await;
    let _ = tx.send(true);
    let _ = worker.await;
    let wait = job.next_run_at.expect("a delayed job has a next run") - provisioning::queue::now();
    assert!(
        wait > 500,
        "LibreChat's ~600 s delay, not a backoff: {wait}"
    );

    let (status, retry_after, body) = chat_status(&bff.base_url, &bearer).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "provisioning_pending");
    let retry_after = retry_after.expect("Retry-After") as i64;
    assert!(
        (wait - 1..=wait + 2).contains(&retry_after),
        "Retry-After {retry_after} s, the job runs in {wait} s"
    );
}

#[tokio::test]
async fn a_custom_csrf_header_name_is_allowed_by_cors_required_and_never_forwarded() {
    let w = World::new(FakeLibreChatOptions::default()).await;
    let origin = "https://app.example.com";
    let bff = w
        .bff(&[
            ("BFF__CSRF__HEADER_NAME", "X-Requested-By".into()),
            ("BFF__CSRF__ALLOWED_ORIGINS", origin.into()),
        ])
        .await;
    w.user(&bff, 350).await;
    let mut browser = bff.client();
    browser.csrf = false; // it would send X-CSRF
    browser.origin = Some(origin.into());
    assert_eq!(
        browser.login("user350", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    let cookie = browser.cookie.clone().expect("a session cookie");
    let path = format!("{}/api/chat/agents/chat/FakeAI", bff.base_url);

    // The browser's preflight for a credentialed POST with that header is allowed.
    let res = http()
        .request(reqwest::Method::OPTIONS, &path)
        .header(header::ORIGIN, origin)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "content-type,x-requested-by",
        )
        .send()
        .await
        .expect("preflight");
    assert!(res.status().is_success(), "{}", res.status());
    let allowed = res
        .headers()
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        allowed.split(',').any(|h| h.trim() == "x-requested-by"),
        "allowed headers: {allowed}"
    );
    let methods = res
        .headers()
        .get("access-control-allow-methods")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    for m in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        assert!(
            methods.split(',').any(|a| a.trim() == m),
            "{m} in {methods}"
        );
    }
    assert!(!methods.contains("TRACE"), "{methods}");
    assert_eq!(
        res.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some(origin)
    );

    let post = |csrf_header: &'static str| {
        http()
            .post(&path)
            .header(header::COOKIE, &cookie)
            .header(header::ORIGIN, origin)
            .header(csrf_header, "1")
            .json(&chat_body("hi"))
            .send()
    };
    let res = post("X-Requested-By").await.expect("post");
    assert_eq!(res.status(), StatusCode::OK);
    let started: Value = res.json().await.expect("json");
    assert!(started["streamId"].is_string(), "{started}");
    let forwarded: Vec<_> =
        w.lc.requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/api/agents/chat"))
            .collect();
    assert!(!forwarded.is_empty(), "the POST reached LibreChat");
    for r in &forwarded {
        assert!(
            !r.headers.contains_key("x-requested-by"),
            "LibreChat received the CSRF header: {:?}",
            r.headers
        );
    }

    // The configured name is the one that counts.
    let res = post("X-CSRF").await.expect("post");
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["error"], "csrf_rejected");
}

#[tokio::test]
async fn abandoned_memory_sessions_and_ensure_checks_stay_bounded() {
    use librechat_bff::{provisioner::ENSURE_RECENT_CAPACITY, session::BffSessionStore};
    use tower_sessions::{
        session::{Id, Record},
        SessionStore,
    };
    // Memory sessions (the zero-config default), expired ones deleted every second.
    let bff = support::bff::TestBff::start(support::bff::config(&[(
        "BFF__SESSION__MEMORY_CLEANUP_INTERVAL_SECS",
        "1".into(),
    )]))
    .await;
    let BffSessionStore::Memory(store) = bff.state.sessions.store() else {
        panic!("the default store is memory");
    };
    let now = time::OffsetDateTime::now_utc();
    let mut live = Record {
        id: Id::default(),
        data: Default::default(),
        expiry_date: now + time::Duration::hours(1),
    };
    store.create(&mut live).await.expect("create");
    // 100,000 sessions opened and abandoned: each has expired by the time the next arrives.
    for _ in 0..100_000 {
        let mut record = Record {
            id: Id::default(),
            data: Default::default(),
            expiry_date: now - time::Duration::seconds(1),
        };
        store.create(&mut record).await.expect("create");
    }
    assert!(
        store.len() < 5_000,
        "expired sessions are swept as new ones arrive: {} held",
        store.len()
    );
    eventually(10, "the periodic cleanup to delete the rest", || async {
        (store.len() == 1).then_some(())
    })
    .await;
    assert!(
        store.load(&live.id).await.expect("load").is_some(),
        "the live session stays"
    );

    // The just-in-time provisioning throttle remembers a bounded number of users.
    let provisioner = &bff.state.provisioner;
    for i in 0..100_000 {
        assert!(provisioner.ensure_due(&format!("user-{i}")), "first sight");
    }
    let held = provisioner.ensure_recent_len();
    assert!(
        held <= ENSURE_RECENT_CAPACITY,
        "{held} users remembered, capacity {ENSURE_RECENT_CAPACITY}"
    );
    assert!(held > 0);
    assert!(provisioner.ensure_due("hammering"));
    assert!(
        !provisioner.ensure_due("hammering"),
        "still throttles once full"
    );
}
