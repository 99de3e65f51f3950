//! TLS everywhere the BFF connects, with throw-away CAs made by the tests: Redis (`rediss://`,
//! with a client certificate, and Sentinel over TLS), LibreChat and the identity service over
//! HTTPS. A wrong CA is never accepted and always says so, naming where it connected.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use librechat_bff::{doctor, redis_conn::RedisHandle};
use reqwest::StatusCode;
use support::{
    bff::config,
    fake_librechat::FakeLibreChatOptions,
    redis::{RedisServer, ServerOptions, ServerTls},
    tls::{TestCa, TlsFront},
    wait::{eventually, free_port},
    world::{chat_body, get_json, http, World, ID_PASSWORD},
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::scale_out::{
    exercise, lc_options, settings, signs_in_and_proxies, Worker, TOKEN_LIFETIME,
};

const REDIS_PASSWORD: &str = "tls-redis-pw-7c1d";

/// A TLS-only Redis with a password, AOF on.
async fn tls_redis(ca: &TestCa, require_client_cert: bool) -> RedisServer {
    RedisServer::start_with(ServerOptions {
        aof: true,
        password: Some(REDIS_PASSWORD.into()),
        tls: Some(ServerTls::from_ca(ca, require_client_cert)),
        ..ServerOptions::default()
    })
    .await
}

fn skew_0() -> (&'static str, String) {
    ("BFF__LIBRECHAT__TOKEN_REFRESH_SKEW_SECS", "0".to_string())
}

#[tokio::test]
async fn a_tls_redis_requiring_a_client_certificate_serves_two_replicas_and_a_worker() {
    let ca = TestCa::new("redis test CA");
    let redis = tls_redis(&ca, true).await;
    let url = redis.url();
    assert!(url.starts_with("rediss://:"), "{url}");
    let client_cert = ca.issue("bff");
    let tls = [
        ("BFF__REDIS__TLS_CA_FILE", ca.ca_file_string()),
        (
            "BFF__REDIS__TLS_CERT_FILE",
            client_cert.cert.display().to_string(),
        ),
        (
            "BFF__REDIS__TLS_KEY_FILE",
            client_cert.key.display().to_string(),
        ),
        skew_0(),
    ];
    let w = World::with_redis(
        FakeLibreChatOptions {
            access_token_lifetime: TOKEN_LIFETIME,
            ..lc_options()
        },
        redis,
    )
    .await;
    let a = w.bff(&settings(&tls)).await;
    let b = w.bff(&settings(&tls)).await;
    let worker = Worker::start(&w, &tls);
    exercise(&w, &a, &b, 20).await;
    worker.stop().await;
    // doctor's own handshake presents the client certificate too and reads the expiry.
    let report = doctor::render(&doctor::run(&a.state).await);
    assert!(
        report.contains("[ok]   Redis certificate valid until 4096-01-01"),
        "{report}"
    );

    // Without its client certificate the BFF is refused: the error names the URL, never the
    // password.
    let cfg = config(&[
        ("BFF__REDIS__URL", url.clone()),
        ("BFF__REDIS__TLS_CA_FILE", ca.ca_file_string()),
    ]);
    let handle = RedisHandle::from_config(&cfg.redis).expect("handle");
    let err = handle
        .ping()
        .await
        .expect_err("no client certificate")
        .to_string();
    let port = url
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/');
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!err.contains(REDIS_PASSWORD), "{err}");
}

/// `librechat-bff serve` as a process, its log (stdout) piped.
fn spawn_serve(env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_librechat-bff"));
    cmd.arg("serve")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn librechat-bff serve")
}

/// Reads the child's log until a line contains every one of `needles`; returns that line.
async fn log_line(child: &mut Child, needles: &[&str], secs: u64) -> String {
    let stdout = child.stdout.as_mut().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(secs), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if needles.iter().all(|n| line.contains(n)) {
                return Some(line);
            }
            seen.push(line);
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => line,
        _ => panic!(
            "no log line with {needles:?} in {secs} s; the log:\n{}",
            seen.join("\n")
        ),
    }
}

#[tokio::test]
async fn a_wrong_redis_ca_is_a_clear_error_naming_the_url() {
    let ca = TestCa::new("the Redis's CA");
    let other = TestCa::new("another CA");
    let redis = tls_redis(&ca, false).await;
    let url = redis.url();
    let shown = url.replace(REDIS_PASSWORD, "***");
    let env = vec![
        ("BFF__REDIS__URL", url.clone()),
        ("BFF__REDIS__TLS_CA_FILE", other.ca_file_string()),
        ("BFF__REDIS__KEY_PREFIX", redis.key_prefix()),
        ("BFF__SESSION__STORE", "redis".to_string()),
        (
            "BFF__CRYPTO__FERNET_KEYS",
            librechat_bff::credentials::KeyRing::generate_key(),
        ),
    ];

    // `serve` starts (it never waits for Redis) and says at once, as an error, why Redis is
    // refused and where.
    let port = free_port();
    let mut with_port = env.clone();
    with_port.push(("BFF__SERVER__LISTEN", format!("127.0.0.1:{port}")));
    let mut serve = spawn_serve(&with_port);
    let line = log_line(
        &mut serve,
        &["ERROR", "Redis TLS handshake failed", &shown],
        15,
    )
    .await;
    assert!(line.contains("invalid peer certificate"), "{line}");
    assert!(line.contains("redis.tls_ca_file"), "{line}");
    assert!(!line.contains(REDIS_PASSWORD), "{line}");
    let ready = http()
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let _ = serve.kill().await;

    // `doctor` fails the check with the same facts and the fix.
    let state = librechat_bff::app::AppState::new(config(&env)).expect("state");
    let report = doctor::render(&doctor::run(&state).await);
    let redis_line = report
        .lines()
        .find(|l| l.contains("Redis TLS handshake failed"))
        .unwrap_or_else(|| panic!("no TLS failure in:\n{report}"));
    assert!(redis_line.starts_with("[FAIL]"), "{redis_line}");
    assert!(redis_line.contains(&shown), "{redis_line}");
    assert!(
        redis_line.contains("invalid peer certificate"),
        "{redis_line}"
    );
    assert!(report.contains("fix: set redis.tls_ca_file"), "{report}");
    assert!(!report.contains(REDIS_PASSWORD), "{report}");
}

#[tokio::test]
async fn sentinel_over_tls_names_a_tls_master() {
    let ca = TestCa::new("sentinel test CA");
    let master = tls_redis(&ca, false).await;
    let dir = tempfile::tempdir().expect("tmp");
    let sentinel_port = free_port();
    let cert = ca.issue("sentinel");
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port 0\ntls-port {sentinel_port}\nbind 127.0.0.1\n\
             tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
             tls-auth-clients no\ntls-replication yes\n\
             sentinel monitor mymaster 127.0.0.1 {} 1\n\
             sentinel auth-pass mymaster {REDIS_PASSWORD}\n\
             sentinel down-after-milliseconds mymaster 1000\n",
            cert.cert.display(),
            cert.key.display(),
            ca.ca_file().display(),
            master.port()
        ),
    )
    .expect("conf");
    let _sentinel = crate::sentinel::spawn_redis(
        &[conf.display().to_string(), "--sentinel".into()],
        dir.path(),
    );
    let certs = ServerTls::from_ca(&ca, false).certificates(None);
    let sentinel_client =
        redis::Client::build_with_tls(format!("rediss://127.0.0.1:{sentinel_port}/"), certs)
            .expect("sentinel client");
    eventually(20, "the sentinel to know the master over TLS", || async {
        let mut conn = sentinel_client
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg("mymaster")
            .query_async::<Vec<String>>(&mut conn)
            .await
            .ok()
    })
    .await;

    let url = format!("rediss+sentinel://:{REDIS_PASSWORD}@127.0.0.1:{sentinel_port}/mymaster");
    let w = World::with_redis(FakeLibreChatOptions::default(), master).await;
    let bff = w
        .bff(&[
            ("BFF__REDIS__URL", url),
            ("BFF__REDIS__TLS_CA_FILE", ca.ca_file_string()),
        ])
        .await;
    signs_in_and_proxies(&w, &bff, 6).await;
}

#[tokio::test]
async fn an_https_librechat_serves_the_proxy_the_token_manager_and_provisioning() {
    let ca = TestCa::new("librechat test CA");
    let w = World::new(FakeLibreChatOptions {
        access_token_lifetime: TOKEN_LIFETIME,
        ..lc_options()
    })
    .await;
    let front = TlsFront::start(w.lc.addr, ca.server_config("librechat")).await;
    let https = [
        ("BFF__LIBRECHAT__URL", front.base_url()),
        ("BFF__LIBRECHAT__TLS_CA_FILE", ca.ca_file_string()),
        skew_0(),
    ];
    let bff = w.bff(&https).await;
    let worker = Worker::start(&w, &https);
    w.user(&bff, 3).await;
    let bearer = w.bearer(3);

    // The token manager logs in over HTTPS, the proxy forwards over HTTPS, streams included.
    let logged_in = tokio::time::Instant::now();
    let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(w.lc.login_calls(), 1);
    let started = http()
        .post(format!("{}/api/chat/agents/chat/FakeAI", bff.base_url))
        .bearer_auth(&bearer)
        .json(&chat_body("over TLS"))
        .send()
        .await
        .expect("chat");
    assert_eq!(started.status(), StatusCode::OK);
    let started: serde_json::Value = started.json().await.expect("json");
    let stream_id = started["streamId"].as_str().expect("streamId");
    let stream = http()
        .get(format!(
            "{}/api/chat/agents/chat/stream/{stream_id}",
            bff.base_url
        ))
        .bearer_auth(&bearer)
        .send()
        .await
        .expect("stream")
        .text()
        .await
        .expect("stream body");
    assert!(stream.contains("\"final\":true"), "{stream}");

    // Provisioning registers and confirms over HTTPS.
    let (job, _) = bff
        .state
        .provisioner
        .enqueue(crate::scale_out::request("tls-user".into()))
        .await
        .expect("enqueue");
    eventually(20, "the job to be done", || async {
        let job = bff.state.provisioner.queue.job(&job).await.ok()??;
        (job.state == provisioning::JobState::Done).then_some(())
    })
    .await;
    worker.stop().await;

    // Once the 2 s token has expired (for real: LibreChat checks its `exp`), the token manager
    // refreshes it over HTTPS.
    tokio::time::sleep_until(logged_in + TOKEN_LIFETIME + Duration::from_millis(1100)).await;
    let (status, body) = get_json(&bff, "/api/chat/convos", &bearer).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(w.lc.refresh_calls(), 1);
}

#[tokio::test]
async fn a_wrong_librechat_ca_is_502_with_a_clear_log_line() {
    let ca = TestCa::new("librechat's CA");
    let other = TestCa::new("another CA");
    let w = World::new(lc_options()).await;
    let front = TlsFront::start(w.lc.addr, ca.server_config("librechat")).await;
    let https = ("BFF__LIBRECHAT__URL", front.base_url());
    // A replica with the right CA logs user 7 in: the LibreChat token is in Redis.
    let good = w
        .bff(&[
            https.clone(),
            ("BFF__LIBRECHAT__TLS_CA_FILE", ca.ca_file_string()),
        ])
        .await;
    w.user(&good, 7).await;
    w.user(&good, 8).await;
    assert_eq!(
        get_json(&good, "/api/chat/convos", &w.bearer(7)).await.0,
        StatusCode::OK
    );

    // A replica (the real binary) trusting another CA.
    let port = free_port();
    let mut serve = spawn_serve(&[
        ("BFF__SERVER__LISTEN", format!("127.0.0.1:{port}")),
        ("BFF__IDENTITY__BASE_URL", w.idp.base_url.clone()),
        (
            "BFF__IDENTITY__JWT__HS_SECRET",
            w.idp.hs_secret().expect("hs"),
        ),
        ("BFF__SESSION__STORE", "redis".into()),
        ("BFF__REDIS__URL", w.redis.url()),
        ("BFF__REDIS__KEY_PREFIX", w.redis.key_prefix()),
        ("BFF__CRYPTO__FERNET_KEYS", w.key.clone()),
        https,
        ("BFF__LIBRECHAT__TLS_CA_FILE", other.ca_file_string()),
        ("BFF__PROVISIONING__WORKERS_IN_SERVE", "false".into()),
    ]);
    let base = format!("http://127.0.0.1:{port}");
    eventually(20, "the binary to answer /healthz", || async {
        let r = http().get(format!("{base}/healthz")).send().await.ok()?;
        (r.status() == StatusCode::OK).then_some(())
    })
    .await;
    let chat = |user: i64| {
        let url = format!("{base}/api/chat/convos");
        let bearer = w.bearer(user);
        async move {
            let res = http()
                .get(url)
                .bearer_auth(bearer)
                .send()
                .await
                .expect("send");
            let status = res.status();
            (
                status,
                res.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    // The proxy (user 7's token comes from Redis): 502, and the log says why.
    let (status, body) = chat(7).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "librechat_unavailable");
    let line = log_line(&mut serve, &["LibreChat TLS handshake failed"], 10).await;
    assert!(line.contains("invalid peer certificate"), "{line}");
    assert!(line.contains("librechat.tls_ca_file"), "{line}");
    // The token manager (user 8 has no LibreChat login yet): 502 too, the cause in its log line.
    let (status, body) = chat(8).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let line = log_line(
        &mut serve,
        &["LibreChat auth call failed", "invalid peer certificate"],
        10,
    )
    .await;
    assert!(line.contains("UnknownIssuer"), "{line}");
    let _ = serve.kill().await;
}

#[tokio::test]
async fn an_https_identity_service_is_trusted_through_its_ca_only() {
    let ca = TestCa::new("identity test CA");
    let other = TestCa::new("another CA");
    let w = World::new(FakeLibreChatOptions::default()).await;
    let idp_addr: SocketAddr = w
        .idp
        .base_url
        .trim_start_matches("http://")
        .parse()
        .expect("idp address");
    // Its certificate ends in 10 days: doctor warns.
    let ends = time::OffsetDateTime::now_utc() + time::Duration::days(10);
    let front = TlsFront::start(idp_addr, ca.server_config_until("identity", Some(ends))).await;
    let https = ("BFF__IDENTITY__BASE_URL", front.base_url());
    let good = w
        .bff(&[
            https.clone(),
            ("BFF__IDENTITY__TLS_CA_FILE", ca.ca_file_string()),
        ])
        .await;
    w.user(&good, 9).await;
    let mut browser = good.client();
    assert_eq!(
        browser.login("user9", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    assert_eq!(browser.get("/auth/me").await.status, StatusCode::OK);

    let bad = w
        .bff(&[
            https,
            ("BFF__IDENTITY__TLS_CA_FILE", other.ca_file_string()),
        ])
        .await;
    let res = bad.client().login("user9", ID_PASSWORD).await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE, "{}", res.body);
    assert_eq!(res.body["error"], "identity_unavailable");
    let report = doctor::render(&doctor::run(&bad.state).await);
    let line = report
        .lines()
        .find(|l| l.contains("identity service at https://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no identity TLS check in:\n{report}"));
    assert!(line.starts_with("[FAIL]"), "{line}");
    assert!(line.contains("TLS handshake failed"), "{line}");
    let report = doctor::render(&doctor::run(&good.state).await);
    assert!(
        report.contains("[ok]   identity service TLS handshake at https://127.0.0.1:"),
        "{report}"
    );
    let expiring = format!(
        "[warn] identity service certificate of 127.0.0.1:{} expires {} (in 9 days)",
        front.addr.port(),
        ends.date()
    );
    assert!(
        report.contains(&expiring),
        "{expiring:?} missing:\n{report}"
    );
}
