//! `cargo bench --bench provisioning_throughput`: provisioning throughput, printed as jobs/s.
//! 1. enqueue → complete with a no-op handler (the queue alone, "no-op LibreChat");
//! 2. 1,000 users through the real workflow against the fake LibreChat (register, confirm-login,
//!    logout per user), with the service's own workers.
//!
//! Both against a real redis-server on an ephemeral port (started here).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use librechat_bff::{app::AppState, config::Config, credentials::KeyRing};
use provisioning::{Job, JobHandler, JobQueue, Outcome, ProvisionRequest, QueueConfig, Worker};
use support::{
    fake_librechat::{FakeLibreChat, FakeLibreChatOptions},
    redis::RedisServer,
};
use tokio::{sync::watch, time::Instant};

struct NoOp;

#[async_trait]
impl JobHandler for NoOp {
    async fn handle(&self, _job: &Job) -> Outcome {
        Outcome::Done
    }
}

fn request(i: usize) -> ProvisionRequest {
    ProvisionRequest {
        user_id: format!("bench{i}"),
        email: format!("bench{i}@example.com"),
        name: None,
        source: "bench".into(),
    }
}

async fn wait_drained(queue: &JobQueue) {
    loop {
        if let Ok((0, 0, _)) = queue.sizes().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn noop_queue(redis: &RedisServer, jobs: usize) {
    let client = redis::Client::open(redis.url()).expect("redis url");
    let queue = JobQueue::new(
        client,
        QueueConfig {
            prefix: format!("{}-noop", redis.key_prefix()),
            ..QueueConfig::default()
        },
    );
    let (tx, rx) = watch::channel(false);
    let started = Instant::now();
    for i in 0..jobs {
        queue.enqueue(request(i)).await.expect("enqueue");
    }
    let enqueued = started.elapsed();
    let workers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(Worker::new(queue.clone(), Arc::new(NoOp), 16).run(rx.clone())))
        .collect();
    wait_drained(&queue).await;
    let total = started.elapsed();
    let _ = tx.send(true);
    for w in workers {
        let _ = w.await;
    }
    println!(
        "queue, no-op handler: {jobs} jobs, enqueue {:.0} jobs/s, enqueue→complete {:.0} jobs/s ({:.2} s; 2 workers × 16)",
        jobs as f64 / enqueued.as_secs_f64(),
        jobs as f64 / total.as_secs_f64(),
        total.as_secs_f64()
    );
}

async fn against_the_fake(redis: &RedisServer, users: usize) {
    let lc = FakeLibreChat::start(FakeLibreChatOptions {
        register_max: 1_000_000,
        login_max: 1_000_000,
        ..FakeLibreChatOptions::default()
    })
    .await;
    let env = [
        ("BFF__SESSION__STORE", "redis".to_string()),
        ("BFF__REDIS__URL", redis.url()),
        (
            "BFF__REDIS__KEY_PREFIX",
            format!("{}-wf", redis.key_prefix()),
        ),
        ("BFF__CRYPTO__FERNET_KEYS", KeyRing::generate_key()),
        ("BFF__LIBRECHAT__URL", lc.base_url.clone()),
        ("BFF__PROVISIONING__CONCURRENCY", "8".to_string()),
    ];
    let config = Config::load_with_env(None, env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())))
        .expect("config");
    let state = AppState::new(config).expect("state");
    let queue = state.provisioner.queue.clone();
    let (tx, rx) = watch::channel(false);
    let started = Instant::now();
    for i in 0..users {
        queue.enqueue(request(i)).await.expect("enqueue");
    }
    let workers: Vec<_> = (0..2)
        .map(|_| state.provisioner.spawn_worker(rx.clone()))
        .collect();
    wait_drained(&queue).await;
    let total = started.elapsed();
    let _ = tx.send(true);
    for w in workers {
        let _ = w.await;
    }
    let (_, _, dead) = queue.sizes().await.expect("sizes");
    println!(
        "workflow vs fake LibreChat: {users} users, {:.0} jobs/s ({:.2} s; 2 workers × 8), accounts {}, register calls {}, dead {dead}",
        users as f64 / total.as_secs_f64(),
        total.as_secs_f64(),
        lc.user_count(),
        lc.register_calls(),
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // `cargo bench` passes --bench; under `cargo test --all-targets` this runs as a small smoke
    // run (debug build) so the benchmark cannot rot.
    let full = std::env::args().any(|a| a == "--bench");
    let (jobs, users) = if full { (5_000, 1_000) } else { (200, 50) };
    runtime.block_on(async {
        let redis = RedisServer::start().await;
        noop_queue(&redis, jobs).await;
        against_the_fake(&redis, users).await;
    });
}
