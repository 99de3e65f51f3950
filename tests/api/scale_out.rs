//! The scale-out scenario the Redis topology tests share (`cluster`, `tls`, and here a unix
//! socket): two BFF replicas and one provisioning worker on one Redis deployment.

use std::time::Duration;

use futures_util::future::join_all;
use librechat_bff::{app::AppState, credentials::vault::CredentialStatus};
use provisioning::ProvisionRequest;
use reqwest::StatusCode;
use support::{
    bff::{config, Browser, TestBff},
    fake_librechat::FakeLibreChatOptions,
    redis::{RedisServer, ServerOptions},
    wait::eventually,
    world::{chat_body, get_json, http, World, ID_PASSWORD},
};
use tokio::sync::watch;

pub const ADMIN_TOKEN: &str = "cluster-admin-token-0123456789";

pub fn settings(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("BFF__ADMIN__TOKEN", ADMIN_TOKEN.to_string()),
        // Two serving replicas and one worker process, as the README's scale-out.
        ("BFF__PROVISIONING__WORKERS_IN_SERVE", "false".to_string()),
        ("BFF__PROVISIONING__CONCURRENCY", "16".to_string()),
        ("BFF__PROVISIONING__BASE_BACKOFF_SECS", "1".to_string()),
        ("BFF__PROVISIONING__MAX_BACKOFF_SECS", "2".to_string()),
        // A job whose worker lost its write in the failover is reclaimed soon.
        (
            "BFF__PROVISIONING__VISIBILITY_TIMEOUT_SECS",
            "3".to_string(),
        ),
    ];
    env.extend(extra.iter().cloned());
    env
}

/// `librechat-bff worker`: the provisioning worker alone, in this process.
pub struct Worker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _state: AppState,
}

impl Worker {
    pub fn start(w: &World, extra: &[(&'static str, String)]) -> Worker {
        let mut env = vec![
            ("BFF__REDIS__URL", w.redis.url()),
            ("BFF__REDIS__KEY_PREFIX", w.redis.key_prefix()),
            ("BFF__CRYPTO__FERNET_KEYS", w.key.clone()),
            ("BFF__LIBRECHAT__URL", w.lc.base_url.clone()),
            ("BFF__SESSION__STORE", "redis".into()),
        ];
        env.extend(settings(extra));
        let state = AppState::new(config(&env)).expect("worker state");
        let (stop, rx) = watch::channel(false);
        let task = state.provisioner.spawn_worker(rx);
        Worker {
            stop,
            task,
            _state: state,
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

pub fn lc_options() -> FakeLibreChatOptions {
    FakeLibreChatOptions {
        register_max: 100_000,
        login_max: 100_000,
        ..FakeLibreChatOptions::default()
    }
}

/// LibreChat access tokens of 2 s, renewed only once expired: the refresh test waits for the
/// real expiry (the fake checks `exp` against real time, with one-second resolution).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(2);

pub fn request(user_id: String) -> ProvisionRequest {
    ProvisionRequest {
        email: format!("{user_id}@example.com"),
        user_id,
        name: None,
        source: "test".into(),
    }
}

/// Waits until every one of `ids` has a ready credential (read through `bff`).
pub async fn wait_ready(bff: &TestBff, ids: &[String], secs: u64) {
    eventually(
        secs,
        &format!("{} credentials ready", ids.len()),
        || async {
            for id in ids {
                let record = bff.state.vault.get(id).await.ok()??;
                if record.status != CredentialStatus::Ready {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

/// Until `bff` has its Redis connection.
pub async fn connected(bff: &TestBff) {
    eventually(20, "the replica to reach Redis", || async {
        bff.state.redis.ping().await.ok()
    })
    .await;
}

/// One replica on its own: a seeded user `id` signs in (cookie session), `/auth/me` answers,
/// and the proxy serves their Bearer token.
pub async fn signs_in_and_proxies(w: &World, bff: &TestBff, id: i64) {
    connected(bff).await;
    w.user(bff, id).await;
    let mut browser = bff.client();
    assert_eq!(
        browser
            .login(&format!("user{id}"), ID_PASSWORD)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(browser.get("/auth/me").await.status, StatusCode::OK);
    let (status, body) = get_json(bff, "/api/chat/convos", &w.bearer(id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// What the scale-out tests keep after [`exercise`]: a browser signed in on replica `a`, and
/// the Bearer token of the same user.
pub struct Signed {
    pub on_a: Browser,
    pub bearer: String,
}

/// Everything a deployment does on its Redis, on two replicas `a` and `b` sharing it and one
/// worker: login on one replica and the session on the other; the proxy with cookie and Bearer
/// (one LibreChat login); the revocation channel (a deactivation on `a` stops `b` within a
/// second); `users` accounts provisioned exactly once; the LibreChat token refreshed once for
/// 60 concurrent requests on both replicas. `w`'s LibreChat must issue [`TOKEN_LIFETIME`]
/// tokens and the replicas renew them once expired (`TOKEN_REFRESH_SKEW_SECS=0`).
pub async fn exercise(w: &World, a: &TestBff, b: &TestBff, users: usize) -> Signed {
    // The replicas connect in the background (a TLS handshake can take a moment on a busy
    // machine): the seeding below writes through replica a.
    connected(a).await;
    connected(b).await;
    // Login on one replica, the same session on the other.
    w.user(a, 1).await;
    let mut on_a = a.client();
    assert_eq!(
        on_a.login("user1", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    let mut on_b = on_a.with_base(&b.base_url);
    let me = on_b.get("/auth/me").await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);

    // Proxy: a cookie request on b, a Bearer request on a; one LibreChat login for both.
    let chat = on_b
        .post("/api/chat/agents/chat/FakeAI", chat_body("hello"))
        .await;
    assert_eq!(chat.status, StatusCode::OK, "{}", chat.body);
    let login_token_expires = tokio::time::Instant::now() + TOKEN_LIFETIME;
    let bearer = w.bearer(1);
    let (status, convos) = get_json(a, "/api/chat/convos", &bearer).await;
    assert_eq!(status, StatusCode::OK, "{convos}");
    assert_eq!(w.lc.login_calls(), 1);
    assert_eq!(w.lc.refresh_calls(), 0);

    // The revocation channel: b holds user 2's token in memory; a deactivates the user; b stops
    // serving within a second (pub/sub).
    w.user(a, 2).await;
    let bearer2 = w.bearer(2);
    for _ in 0..2 {
        assert_eq!(
            get_json(b, "/api/chat/convos", &bearer2).await.0,
            StatusCode::OK
        );
    }
    let deactivated = http()
        .post(format!("{}/admin/users/2/deactivate", a.base_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("deactivate");
    assert_eq!(deactivated.status(), StatusCode::OK);
    let started = tokio::time::Instant::now();
    eventually(3, "replica b to refuse the deactivated user", || async {
        let (status, _) = get_json(b, "/api/chat/convos", &bearer2).await;
        (status == StatusCode::FORBIDDEN).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "replica b served a deactivated user for {:?}",
        started.elapsed()
    );

    // `users` users provisioned through both replicas by the one worker: one account each.
    let ids: Vec<String> = (0..users).map(|i| format!("bulk{i}")).collect();
    let enqueued = ids.iter().enumerate().map(|(i, id)| {
        let replica = if i % 2 == 0 { &a } else { &b };
        replica.state.provisioner.enqueue(request(id.clone()))
    });
    for result in join_all(enqueued).await {
        result.expect("enqueue");
    }
    wait_ready(a, &ids, 120).await;
    // The users and the BFF's service account (registered once per Redis); the two seeded
    // users were created directly in the fake.
    assert_eq!(w.lc.register_calls(), users + 1, "no user registered twice");
    assert_eq!(w.lc.user_count(), users + 3);

    // Refresh single-flight across replicas: once user 1's LibreChat token has expired (for
    // real: the fake checks its `exp`; the steps above took most of that time), 60 concurrent
    // requests on both replicas, one refresh.
    tokio::time::sleep_until(login_token_expires + Duration::from_millis(1100)).await;
    let (refreshes, logins) = (w.lc.refresh_calls(), w.lc.login_calls());
    let client = http();
    let requests = (0..60).map(|i| {
        let base = if i % 2 == 0 { &a.base_url } else { &b.base_url };
        let url = format!("{base}/api/chat/convos");
        let bearer = bearer.clone();
        let client = client.clone();
        async move {
            client
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
        w.lc.refresh_calls() - refreshes,
        1,
        "one refresh for 60 requests"
    );
    assert_eq!(w.lc.login_calls(), logins, "no new login");

    Signed { on_a, bearer }
}

#[tokio::test]
async fn two_replicas_and_a_worker_on_a_unix_socket() {
    let local = RedisServer::start_with(ServerOptions {
        unix_socket: true,
        ..ServerOptions::default()
    })
    .await;
    let url = local.unix_url().expect("a socket");
    assert!(url.starts_with("unix:///"), "{url}");
    let w = World::with_redis(
        FakeLibreChatOptions {
            access_token_lifetime: TOKEN_LIFETIME,
            ..lc_options()
        },
        local,
    )
    .await;
    let unix = [
        ("BFF__REDIS__URL", url),
        ("BFF__LIBRECHAT__TOKEN_REFRESH_SKEW_SECS", "0".to_string()),
    ];
    let a = w.bff(&settings(&unix)).await;
    let b = w.bff(&settings(&unix)).await;
    let worker = Worker::start(&w, &unix);
    exercise(&w, &a, &b, 10).await;
    worker.stop().await;
}
