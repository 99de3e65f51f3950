//! `redis+sentinel://` URLs: the master is asked of Sentinel, and after a failover the service
//! follows the new master by itself. Real processes: a master, a replica and a sentinel.

use std::process::Stdio;

use librechat_bff::credentials::KeyRing;
use reqwest::StatusCode;
use support::{
    bff::{config, TestBff},
    fake_idp::{FakeIdp, FakeIdpOptions, FakeUser},
    redis::RedisServer,
    wait::{eventually, free_port},
};
use tokio::process::{Child, Command};

async fn query(port: u16, args: &[&str]) -> Option<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.ok()
}

pub(crate) fn spawn_redis(args: &[String], dir: &std::path::Path) -> Child {
    Command::new("redis-server")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server (see scripts/test.sh)")
}

#[tokio::test]
async fn sessions_follow_the_master_through_a_sentinel_failover() {
    let mut master = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let replica_port = free_port();
    let _replica = spawn_redis(
        &[
            "--port".into(),
            replica_port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--replicaof".into(),
            "127.0.0.1".into(),
            master.port().to_string(),
        ],
        dir.path(),
    );
    let sentinel_port = free_port();
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {sentinel_port}\nbind 127.0.0.1\n\
             sentinel monitor mymaster 127.0.0.1 {} 1\n\
             sentinel down-after-milliseconds mymaster 1000\n\
             sentinel failover-timeout mymaster 5000\n",
            master.port()
        ),
    )
    .expect("conf");
    let _sentinel = spawn_redis(
        &[conf.display().to_string(), "--sentinel".into()],
        dir.path(),
    );
    eventually(20, "the replica to sync", || async {
        let info = query(master.port(), &["INFO", "replication"]).await?;
        let text = redis::from_redis_value::<String>(info).ok()?;
        // Connected is not enough: the initial sync must be done.
        text.contains("state=online").then_some(())
    })
    .await;
    eventually(20, "the sentinel to know the master", || async {
        query(
            sentinel_port,
            &["SENTINEL", "get-master-addr-by-name", "mymaster"],
        )
        .await
    })
    .await;

    let idp = FakeIdp::start(FakeIdpOptions::default()).await;
    idp.add_user(FakeUser {
        id: 42,
        username: "alice".into(),
        email: "alice@example.com".into(),
        password: "correct horse battery staple".into(),
        name: "Alice".into(),
        groups: vec![],
        is_active: true,
    });
    let bff = TestBff::start(config(&[
        ("BFF__IDENTITY__BASE_URL", idp.base_url.clone()),
        (
            "BFF__IDENTITY__JWT__HS_SECRET",
            idp.hs_secret().expect("hs"),
        ),
        ("BFF__SESSION__STORE", "redis".into()),
        (
            "BFF__REDIS__URL",
            format!("redis+sentinel://127.0.0.1:{sentinel_port}/mymaster"),
        ),
        ("BFF__REDIS__KEY_PREFIX", master.key_prefix()),
        ("BFF__CRYPTO__FERNET_KEYS", KeyRing::generate_key()),
    ]))
    .await;
    let mut browser = bff.client();
    assert_eq!(
        browser
            .login("alice", "correct horse battery staple")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(browser.get("/auth/me").await.status, StatusCode::OK);
    // The session reached the replica before the master goes away, and Sentinel knows the
    // replica (it learns replicas from the master's INFO; without one it cannot fail over).
    eventually(20, "the replica to acknowledge the session", || async {
        let acked = query(master.port(), &["WAIT", "1", "500"]).await?;
        (redis::from_redis_value::<i64>(acked).ok()? >= 1).then_some(())
    })
    .await;
    let replica = format!("127.0.0.1:{replica_port}");
    eventually(30, "the sentinel to know the replica", || async {
        let v = query(sentinel_port, &["SENTINEL", "replicas", "mymaster"]).await?;
        format!("{v:?}").contains(&replica).then_some(())
    })
    .await;

    master.stop().await;
    // A new sign-in writes a session: only the promoted replica can take it.
    eventually(30, "the service to follow the promoted replica", || async {
        let mut fresh = bff.client();
        let login = fresh.login("alice", "correct horse battery staple").await;
        let me = fresh.get("/auth/me").await;
        (login.status == StatusCode::OK && me.status == StatusCode::OK).then_some(())
    })
    .await;
    assert_eq!(browser.get("/auth/me").await.status, StatusCode::OK);
    let role = query(replica_port, &["ROLE"]).await.expect("role");
    assert!(format!("{role:?}").contains("master"), "{role:?}");
    // The job queue follows too.
    bff.state
        .provisioner
        .enqueue(provisioning::ProvisionRequest {
            user_id: "42".into(),
            email: "alice@example.com".into(),
            name: None,
            source: "test".into(),
        })
        .await
        .expect("enqueue on the new master");
}

#[test]
fn malformed_sentinel_urls_name_the_problem() {
    for (url, expect) in [
        ("redis+sentinel://127.0.0.1:26379", "master name"),
        ("redis+sentinel:///mymaster", "host:port"),
        (
            "redis+sentinel://127.0.0.1:26379/mymaster/x",
            "database number",
        ),
    ] {
        let err = librechat_bff::redis_conn::RedisHandle::new(url, "bff")
            .expect_err("malformed")
            .to_string();
        assert!(err.contains(expect), "{url}: {err}");
    }
}
