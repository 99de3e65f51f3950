//! `redis+cluster://` and `rediss+cluster://`: a real Redis Cluster on loopback (3 masters, each
//! with a replica, joined by `redis-cli --cluster create`), two BFF replicas and one provisioning
//! worker on it. Sessions, LibreChat logins, credentials, locks, the revocation channel and the
//! job queue all live on the cluster; a master is killed mid-run and its replica takes over.

use std::time::Duration;

use futures_util::future::join_all;
use librechat_bff::{app::AppState, credentials::vault::CredentialStatus};
use provisioning::ProvisionRequest;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use support::{
    bff::{config, TestBff},
    fake_librechat::FakeLibreChatOptions,
    redis::{RedisServer, ServerTls},
    redis_cluster::RedisCluster,
    tls::TestCa,
    wait::eventually,
    world::{chat_body, get_json, http, World, ID_PASSWORD},
};
use tokio::sync::watch;

const ADMIN_TOKEN: &str = "cluster-admin-token-0123456789";

fn settings(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
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
struct Worker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _state: AppState,
}

impl Worker {
    fn start(w: &World, extra: &[(&'static str, String)]) -> Worker {
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

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn lc_options() -> FakeLibreChatOptions {
    FakeLibreChatOptions {
        register_max: 100_000,
        login_max: 100_000,
        ..FakeLibreChatOptions::default()
    }
}

/// LibreChat access tokens of 2 s, renewed only once expired: the refresh test waits for the
/// real expiry (the fake checks `exp` against real time, with one-second resolution).
const TOKEN_LIFETIME: Duration = Duration::from_secs(2);

fn request(user_id: String) -> ProvisionRequest {
    ProvisionRequest {
        email: format!("{user_id}@example.com"),
        user_id,
        name: None,
        source: "test".into(),
    }
}

/// Waits until every one of `ids` has a ready credential (read through `bff`).
async fn wait_ready(bff: &TestBff, ids: &[String], secs: u64) {
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

#[tokio::test]
async fn two_replicas_and_a_worker_on_a_cluster_survive_a_master_failover() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let w = World::with_redis(
        FakeLibreChatOptions {
            access_token_lifetime: TOKEN_LIFETIME,
            ..lc_options()
        },
        RedisServer::external(cluster.url()),
    )
    .await;
    let skew = [("BFF__LIBRECHAT__TOKEN_REFRESH_SKEW_SECS", "0".to_string())];
    let a = w.bff(&settings(&skew)).await;
    let b = w.bff(&settings(&skew)).await;
    let worker = Worker::start(&w, &[]);

    // Login on one replica, the same session on the other.
    w.user(&a, 1).await;
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
        .post("/api/chat/agents/chat/FakeAI", chat_body("hello cluster"))
        .await;
    assert_eq!(chat.status, StatusCode::OK, "{}", chat.body);
    let login_token_expires = tokio::time::Instant::now() + TOKEN_LIFETIME;
    let bearer = w.bearer(1);
    let (status, convos) = get_json(&a, "/api/chat/convos", &bearer).await;
    assert_eq!(status, StatusCode::OK, "{convos}");
    assert_eq!(w.lc.login_calls(), 1);
    assert_eq!(w.lc.refresh_calls(), 0);

    // The revocation channel: b holds user 2's token in memory; a deactivates the user; b stops
    // serving within a second (pub/sub on the cluster).
    w.user(&a, 2).await;
    let bearer2 = w.bearer(2);
    for _ in 0..2 {
        assert_eq!(
            get_json(&b, "/api/chat/convos", &bearer2).await.0,
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
        let (status, _) = get_json(&b, "/api/chat/convos", &bearer2).await;
        (status == StatusCode::FORBIDDEN).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "replica b served a deactivated user for {:?}",
        started.elapsed()
    );

    // 300 users provisioned through both replicas by the one worker: 300 accounts, none twice.
    let ids: Vec<String> = (0..300).map(|i| format!("bulk{i}")).collect();
    let enqueued = ids.iter().enumerate().map(|(i, id)| {
        let replica = if i % 2 == 0 { &a } else { &b };
        replica.state.provisioner.enqueue(request(id.clone()))
    });
    for result in join_all(enqueued).await {
        result.expect("enqueue");
    }
    wait_ready(&a, &ids, 120).await;
    // 300 users and the BFF's service account (registered once per Redis); the two seeded
    // users were created directly in the fake.
    assert_eq!(w.lc.register_calls(), 301, "no user registered twice");
    assert_eq!(w.lc.user_count(), 303);

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

    // Failover mid-run: 40 more jobs are queued, and the master holding the queue (one hash
    // tag, one slot) is killed while the worker runs them; its replica takes over.
    let more: Vec<String> = (0..40).map(|i| format!("late{i}")).collect();
    let enqueued = more
        .iter()
        .map(|id| a.state.provisioner.enqueue(request(id.clone())));
    for result in join_all(enqueued).await {
        result.expect("enqueue");
    }
    let queue_key = format!("{{{}:prov}}:jobs", w.redis.key_prefix());
    let (dead, promoted) = cluster.kill_master_of(&queue_key).await;
    cluster.wait_promoted(promoted, dead).await;

    // Requests recover on both replicas without a restart: the session, the proxy, admin.
    eventually(30, "replica a to serve the session again", || async {
        let me = on_a.clone().get("/auth/me").await;
        (me.status == StatusCode::OK).then_some(())
    })
    .await;
    eventually(30, "replica b to proxy again", || async {
        let (status, _) = get_json(&b, "/api/chat/convos", &bearer).await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    // No job lost: every job queued before the failover finishes, none is left or dead.
    wait_ready(&a, &more, 60).await;
    let queue = a.state.provisioner.queue.clone();
    eventually(30, "the queue to drain", || async {
        let (depth, delayed, dead) = queue.sizes().await.ok()?;
        (depth == 0 && delayed == 0 && dead == 0).then_some(())
    })
    .await;
    assert_eq!(w.lc.user_count(), 343, "one account per user");
    let admin_view = http()
        .request(Method::GET, format!("{}/admin/users/late39", b.base_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("admin");
    assert_eq!(admin_view.status(), StatusCode::OK);
    let view: Value = admin_view.json().await.expect("json");
    assert_eq!(view["state"], "ready", "{view}");
    worker.stop().await;
}

#[tokio::test]
async fn a_tls_cluster_with_a_password_serves_logins_proxy_and_jobs() {
    let ca = TestCa::new("cluster test CA");
    let cluster =
        RedisCluster::start_tls(3, 0, ServerTls::from_ca(&ca, false), "cluster-pw-0451").await;
    let url = cluster.url();
    assert!(
        url.starts_with("rediss+cluster://:cluster-pw-0451@"),
        "{url}"
    );
    let w = World::with_redis(lc_options(), RedisServer::external(url)).await;
    let tls = [("BFF__REDIS__TLS_CA_FILE", ca.ca_file_string())];
    let bff = w.bff(&settings(&tls)).await;
    let worker = Worker::start(&w, &tls);

    w.user(&bff, 5).await;
    let mut browser = bff.client();
    assert_eq!(
        browser.login("user5", ID_PASSWORD).await.status,
        StatusCode::OK
    );
    assert_eq!(browser.get("/auth/me").await.status, StatusCode::OK);
    let (status, body) = get_json(&bff, "/api/chat/convos", &w.bearer(5)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let ids: Vec<String> = (0..20).map(|i| format!("tls{i}")).collect();
    for id in &ids {
        bff.state
            .provisioner
            .enqueue(request(id.clone()))
            .await
            .expect("enqueue");
    }
    wait_ready(&bff, &ids, 60).await;
    assert_eq!(
        w.lc.register_calls(),
        21,
        "20 users and the service account, once each"
    );

    // doctor: every node reached over TLS, cluster state ok, all slots served.
    let checks = librechat_bff::doctor::run(&bff.state).await;
    let report = librechat_bff::doctor::render(&checks);
    for expect in [
        "Redis answers at rediss+cluster://:***@",
        "(Cluster, TLS)",
        "Redis TLS handshake: the certificate is trusted (redis.tls_ca_file)",
        "Redis Cluster state ok on all 3 masters",
        "all 16384 hash slots are served",
        "every cluster node (3) accepts a connection and a TLS handshake",
    ] {
        assert!(report.contains(expect), "{expect:?} missing:\n{report}");
    }
    assert!(!report.contains("cluster-pw-0451"), "{report}");
    worker.stop().await;
}
