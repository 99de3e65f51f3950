//! `redis+cluster://` and `rediss+cluster://`: a real Redis Cluster on loopback (3 masters, each
//! with a replica, joined by `redis-cli --cluster create`), two BFF replicas and one provisioning
//! worker on it. Sessions, LibreChat logins, credentials, locks, the revocation channel and the
//! job queue all live on the cluster; a master is killed mid-run and its replica takes over.

use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use support::{
    fake_librechat::FakeLibreChatOptions,
    redis::{RedisServer, ServerTls},
    redis_cluster::RedisCluster,
    tls::TestCa,
    wait::eventually,
    world::{get_json, http, World},
};

use crate::scale_out::{
    exercise, lc_options, request, settings, signs_in_and_proxies, wait_ready, Signed, Worker,
    ADMIN_TOKEN, TOKEN_LIFETIME,
};

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

    let Signed { on_a, bearer } = exercise(&w, &a, &b, 300).await;
    keys_spread_and_tags_hold(&cluster, &w.redis.key_prefix()).await;

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

/// Per-user keys (here the 300 credentials) are on every master; every key of the job queue
/// (stream, delayed set, documents, user index) is in the one slot of its hash tag.
async fn keys_spread_and_tags_hold(cluster: &RedisCluster, prefix: &str) {
    // The cluster is this test's alone: every key is ours.
    let keys_on = |master: u16| async move {
        let keys = cluster.query(master, &["KEYS", "*"]).await.expect("KEYS");
        redis::from_redis_value::<Vec<String>>(keys).expect("key names")
    };
    let queue_tag = format!("{{{prefix}:prov}}");
    let slots = cluster.slots().await.expect("slots");
    let mut queue_slots = std::collections::HashSet::new();
    let mut queue_keys = 0;
    for (_, _, master, _) in &slots {
        let keys = keys_on(*master).await;
        let creds = keys
            .iter()
            .filter(|k| k.starts_with(&format!("{prefix}:cred:")))
            .count();
        assert!(
            creds > 30,
            "master {master} holds {creds} of 300 credentials"
        );
        for key in keys.iter().filter(|k| k.starts_with(&queue_tag)) {
            queue_keys += 1;
            let slot = cluster
                .query(*master, &["CLUSTER", "KEYSLOT", key])
                .await
                .expect("KEYSLOT");
            queue_slots.insert(format!("{slot:?}"));
        }
    }
    assert!(queue_keys > 300, "{queue_keys} queue keys");
    assert_eq!(queue_slots.len(), 1, "queue keys in slots {queue_slots:?}");
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

    signs_in_and_proxies(&w, &bff, 5).await;

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
        "Redis certificates of 3 endpoints valid until 4096-01-01",
    ] {
        assert!(report.contains(expect), "{expect:?} missing:\n{report}");
    }
    assert!(!report.contains("cluster-pw-0451"), "{report}");
    worker.stop().await;
}
