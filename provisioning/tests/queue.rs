//! The Redis-Streams job queue and its workers, against a real `redis-server` (one per test).
//!
//! Every test waits for what it expects by polling with a deadline, never by sleeping a fixed
//! time and hoping.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use provisioning::{
    queue::GROUP, Job, JobHandler, JobQueue, JobState, Outcome, ProvisionRequest, QueueConfig,
    QueueError, Worker,
};
use redis::{
    aio::MultiplexedConnection,
    streams::{StreamPendingCountReply, StreamPendingReply},
    AsyncCommands,
};
use support::redis::RedisServer;
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
    time::{timeout, Instant},
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn request(user: &str) -> ProvisionRequest {
    ProvisionRequest {
        user_id: user.to_owned(),
        email: format!("{user}@example.com"),
        name: Some(format!("User {user}")),
        source: "test".to_owned(),
    }
}

/// The default configuration on this server's private key prefix.
fn config(server: &RedisServer) -> QueueConfig {
    QueueConfig {
        prefix: server.key_prefix(),
        ..QueueConfig::default()
    }
}

fn queue(server: &RedisServer, cfg: QueueConfig) -> JobQueue {
    let client = redis::Client::open(server.url()).expect("valid redis url");
    JobQueue::new(client, cfg)
}

/// A key of the queue's layout (`{<prefix>:prov}:<rest>`), for looking at Redis directly.
fn key(server: &RedisServer, rest: &str) -> String {
    format!("{{{}:prov}}:{rest}", server.key_prefix())
}

async fn raw(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("valid redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

/// Entries delivered but not acknowledged, with their owners.
async fn pending(server: &RedisServer) -> Vec<(String, String)> {
    let mut conn = raw(server).await;
    let reply: StreamPendingCountReply = conn
        .xpending_count(key(server, "jobs"), GROUP, "-", "+", 1000)
        .await
        .expect("XPENDING");
    reply.ids.into_iter().map(|p| (p.id, p.consumer)).collect()
}

/// Polls `check` until it yields `Some`, failing the test after `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the job reaches `state` and returns it.
async fn wait_for_state(q: &JobQueue, id: &str, state: JobState, within: Duration) -> Job {
    eventually(within, &format!("job {id} to be {state:?}"), || async {
        q.job(id)
            .await
            .expect("read job")
            .filter(|j| j.state == state)
    })
    .await
}

/// Waits until the job has finished (done or dead) and returns it, so that a job ending the
/// wrong way fails the test at once rather than at the deadline.
async fn wait_until_finished(q: &JobQueue, id: &str, within: Duration) -> Job {
    eventually(within, &format!("job {id} to finish"), || async {
        q.job(id)
            .await
            .expect("read job")
            .filter(|j| !j.state.is_active())
    })
    .await
}

/// A handler from a closure.
struct FnHandler<F>(F);

#[async_trait]
impl<F> JobHandler for FnHandler<F>
where
    F: Fn(&Job) -> Outcome + Send + Sync + 'static,
{
    async fn handle(&self, job: &Job) -> Outcome {
        (self.0)(job)
    }
}

/// Running workers, stopped through a watch channel.
struct Workers {
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    fn start(q: &JobQueue, handler: Arc<dyn JobHandler>, count: usize, concurrency: usize) -> Self {
        let (stop, rx) = watch::channel(false);
        let handles = (0..count)
            .map(|_| {
                let worker = Worker::new(q.clone(), handler.clone(), concurrency);
                tokio::spawn(worker.run(rx.clone()))
            })
            .collect();
        Self { stop, handles }
    }

    /// Asks the workers to stop and waits until they have.
    async fn stop(self) {
        self.stop.send(true).expect("workers still listening");
        for handle in self.handles {
            timeout(Duration::from_secs(10), handle)
                .await
                .expect("a worker stops within 10 s of being told to")
                .expect("a worker does not panic");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn enqueue_is_idempotent_per_user_while_the_job_is_active() {
    let server = RedisServer::start().await;
    let q = queue(&server, config(&server));

    let (first, created) = q.enqueue(request("alice")).await.expect("enqueue");
    assert!(created, "the first enqueue creates a job");
    let (again, created) = q.enqueue(request("alice")).await.expect("enqueue");
    assert_eq!(again, first, "a pending job is reused");
    assert!(!created);
    let (bob, created) = q.enqueue(request("bob")).await.expect("enqueue");
    assert!(created, "another user gets a job of their own");
    assert_ne!(bob, first);
    assert_eq!(
        q.active_job_of("alice").await.expect("active job"),
        Some(first.clone())
    );
    assert_eq!(q.sizes().await.expect("sizes").0, 2, "one entry per job");

    // Still the same job while it runs...
    let mut reader = q.reader_connection().await.expect("reader");
    let deliveries = q
        .read(&mut reader, "c1", 10, Duration::from_millis(100))
        .await
        .expect("read");
    assert_eq!(deliveries.len(), 2);
    let alice = deliveries
        .iter()
        .find(|d| d.job.id == first)
        .expect("alice's job delivered")
        .clone();
    let bobs = deliveries
        .iter()
        .find(|d| d.job.id == bob)
        .expect("bob's job delivered")
        .clone();
    assert_eq!(alice.job.state, JobState::Running);
    assert_eq!(
        q.enqueue(request("alice")).await.expect("enqueue"),
        (first.clone(), false),
        "a running job is reused"
    );

    // ...and while it waits for a retry.
    let state = q
        .retry(&bobs, "later".into(), Some(Duration::from_secs(60)), false)
        .await
        .expect("retry");
    assert_eq!(state, JobState::Delayed);
    assert_eq!(
        q.enqueue(request("bob")).await.expect("enqueue"),
        (bob.clone(), false),
        "a delayed job is reused"
    );

    // Once finished, the user can be provisioned again with a new job.
    q.complete(&alice).await.expect("complete");
    assert_eq!(
        q.job(&first).await.expect("job").map(|j| j.state),
        Some(JobState::Done)
    );
    assert_eq!(q.active_job_of("alice").await.expect("active job"), None);
    let (next, created) = q.enqueue(request("alice")).await.expect("enqueue");
    assert!(created, "a finished job does not block a new one");
    assert_ne!(next, first);
    assert_eq!(
        q.job(&next).await.expect("job").map(|j| j.state),
        Some(JobState::Pending)
    );
}

// ---------------------------------------------------------------------------------------------
// At-least-once delivery
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_job_whose_worker_died_is_reclaimed_after_the_visibility_timeout() {
    let server = RedisServer::start().await;
    let visibility = Duration::from_millis(300);
    let q = queue(
        &server,
        QueueConfig {
            visibility_timeout: visibility,
            ..config(&server)
        },
    );
    let (id, _) = q.enqueue(request("carol")).await.expect("enqueue");

    // A worker takes the job and dies without acknowledging it.
    let mut dead_reader = q.reader_connection().await.expect("reader");
    let taken_at = Instant::now();
    let taken = q
        .read(
            &mut dead_reader,
            "dead-worker",
            1,
            Duration::from_millis(100),
        )
        .await
        .expect("read");
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].job.id, id);
    drop(dead_reader);
    assert_eq!(
        pending(&server).await,
        vec![(taken[0].entry_id.clone(), "dead-worker".to_owned())],
        "the delivery is pending, owned by the dead worker"
    );

    // Nobody else gets it by reading: it was delivered already.
    let mut reader = q.reader_connection().await.expect("reader");
    let fresh = q
        .read(&mut reader, "rescuer", 10, Duration::from_millis(50))
        .await
        .expect("read");
    assert!(fresh.is_empty(), "a delivered job is not delivered twice");

    // Another consumer takes it over once it has been silent for the visibility timeout, and
    // not before.
    let reclaimed = eventually(
        Duration::from_secs(5),
        "the job to be reclaimed",
        || async {
            let got = q.reclaim("rescuer", 10).await.expect("reclaim");
            if !got.is_empty() {
                assert!(
                    taken_at.elapsed() >= visibility,
                    "reclaimed after {:?}, before the visibility timeout",
                    taken_at.elapsed()
                );
            }
            Some(got).filter(|g| !g.is_empty())
        },
    )
    .await;
    assert_eq!(reclaimed.len(), 1);
    let d = &reclaimed[0];
    assert_eq!(d.job.id, id);
    assert_eq!(d.entry_id, taken[0].entry_id);
    assert_eq!(d.job.state, JobState::Running);
    assert_eq!(
        pending(&server).await,
        vec![(d.entry_id.clone(), "rescuer".to_owned())],
        "the rescuer owns it now"
    );

    q.complete(d).await.expect("complete");
    assert!(
        pending(&server).await.is_empty(),
        "completion removes it from the pending list"
    );
    assert_eq!(q.sizes().await.expect("sizes"), (0, 0, 0));
    assert_eq!(
        q.job(&id).await.expect("job").map(|j| j.state),
        Some(JobState::Done)
    );
    assert!(
        q.reclaim("someone", 10).await.expect("reclaim").is_empty(),
        "a completed job is never reclaimed"
    );
}

#[tokio::test]
async fn a_blocking_read_waits_for_a_job_enqueued_later() {
    let server = RedisServer::start().await;
    let q = queue(&server, config(&server));
    q.sizes().await.expect("connect (creates the group)");
    let mut reader = q.reader_connection().await.expect("reader");

    let producer = {
        let q = q.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            q.enqueue(request("late")).await.expect("enqueue")
        })
    };
    // Longer than the Redis client's default response timeout (500 ms): a blocking read must
    // not be cut short by it.
    let got = q
        .read(&mut reader, "c1", 1, Duration::from_secs(3))
        .await
        .expect("a blocking read waits for `block`, not for the client's response timeout");
    let (id, _) = producer.await.expect("producer");
    assert_eq!(
        got.len(),
        1,
        "the job enqueued during the read is delivered"
    );
    assert_eq!(got[0].job.id, id);

    // With nothing to read it returns empty once `block` has passed.
    let started = Instant::now();
    let none = q
        .read(&mut reader, "c1", 1, Duration::from_millis(700))
        .await
        .expect("an empty blocking read is not an error");
    assert!(none.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(650));
}

// ---------------------------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn backoff_grows_exponentially_with_jitter_and_is_capped() {
    let base = Duration::from_millis(100);
    let max = Duration::from_secs(5);
    let q = JobQueue::new(
        redis::Client::open("redis://127.0.0.1:1/").expect("valid url"),
        QueueConfig {
            base_backoff: base,
            max_backoff: max,
            ..QueueConfig::default()
        },
    );
    let mut previous_mean = Duration::ZERO;
    for attempt in 1..=12u32 {
        let ceiling = (base * 2u32.pow(attempt - 1)).min(max);
        let samples: Vec<Duration> = (0..300).map(|_| q.backoff(attempt)).collect();
        for s in &samples {
            assert!(
                *s >= ceiling / 2 && *s <= ceiling,
                "backoff({attempt}) = {s:?}, outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
        let lo = samples.iter().min().copied().unwrap_or_default();
        let hi = samples.iter().max().copied().unwrap_or_default();
        assert!(
            hi - lo > ceiling / 10,
            "backoff({attempt}) is jittered (spread {:?})",
            hi - lo
        );
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        if ceiling < max {
            assert!(
                mean > previous_mean,
                "backoff({attempt}) grows: mean {mean:?} after {previous_mean:?}"
            );
        }
        previous_mean = mean;
    }
    // Far beyond the cap, and for absurd attempt counts, it stays within the cap.
    for attempt in [30, 64, u32::MAX] {
        let b = q.backoff(attempt);
        assert!(b >= max / 2 && b <= max, "backoff({attempt}) = {b:?}");
    }
    // Attempt 0 (a wait that spent no attempt) uses the base.
    let b = q.backoff(0);
    assert!(b >= base / 2 && b <= base, "backoff(0) = {b:?}");
}

#[tokio::test]
async fn a_job_failing_max_attempts_times_ends_dead_with_the_reason() {
    let server = RedisServer::start().await;
    let q = queue(
        &server,
        QueueConfig {
            max_attempts: 3,
            base_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            ..config(&server)
        },
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        Arc::new(FnHandler(move |_: &Job| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Outcome::Retry {
                error: format!("LibreChat down (call {n})"),
                after: None,
                spend_attempt: true,
            }
        }))
    };
    let workers = Workers::start(&q, handler, 1, 2);
    let (id, _) = q.enqueue(request("dave")).await.expect("enqueue");

    let job = wait_until_finished(&q, &id, Duration::from_secs(15)).await;
    workers.stop().await;
    assert_eq!(job.state, JobState::Dead);

    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "ran exactly max_attempts times"
    );
    assert_eq!(job.attempts, 3);
    let reason = job.last_error.expect("a dead job says why");
    assert!(
        reason.contains("gave up after 3 attempts") && reason.contains("LibreChat down (call 3)"),
        "reason: {reason}"
    );
    let dead = q.list(JobState::Dead, 10).await.expect("list dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert_eq!(q.sizes().await.expect("sizes"), (0, 0, 1));
    assert_eq!(q.active_job_of("dave").await.expect("active"), None);
    assert!(pending(&server).await.is_empty());
}

#[tokio::test]
async fn rate_limit_waits_do_not_spend_attempts() {
    let server = RedisServer::start().await;
    let q = queue(
        &server,
        QueueConfig {
            max_attempts: 2,
            base_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(50),
            ..config(&server)
        },
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        Arc::new(FnHandler(move |_: &Job| {
            match calls.fetch_add(1, Ordering::SeqCst) + 1 {
                // One real failure: spends the first of two attempts.
                1 => Outcome::Retry {
                    error: "outage".into(),
                    after: None,
                    spend_attempt: true,
                },
                // Then a run of rate limits: were any of them counted, the job would die.
                2..=5 => Outcome::Retry {
                    error: "rate limited".into(),
                    after: Some(Duration::from_millis(10)),
                    spend_attempt: false,
                },
                _ => Outcome::Done,
            }
        }))
    };
    let workers = Workers::start(&q, handler, 1, 1);
    let (id, _) = q.enqueue(request("erin")).await.expect("enqueue");

    let job = wait_until_finished(&q, &id, Duration::from_secs(15)).await;
    workers.stop().await;
    assert_eq!(
        job.state,
        JobState::Done,
        "rate limits used up the attempts: {:?}",
        job.last_error
    );
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert_eq!(job.attempts, 1, "only the outage spent an attempt");
    assert_eq!(q.sizes().await.expect("sizes"), (0, 0, 0));
}

// ---------------------------------------------------------------------------------------------
// Delayed jobs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn delayed_jobs_are_promoted_when_due_and_not_before() {
    let server = RedisServer::start().await;
    let q = queue(&server, config(&server));
    let (soon, _) = q.enqueue(request("frank")).await.expect("enqueue");
    let (late, _) = q.enqueue(request("grace")).await.expect("enqueue");
    let mut reader = q.reader_connection().await.expect("reader");
    let deliveries = q
        .read(&mut reader, "c1", 10, Duration::from_millis(100))
        .await
        .expect("read");
    assert_eq!(deliveries.len(), 2);

    let delay = Duration::from_millis(1200);
    let retried_at = Instant::now();
    for d in &deliveries {
        let after = if d.job.id == soon {
            delay
        } else {
            Duration::from_secs(3600)
        };
        let state = q
            .retry(d, "wait".into(), Some(after), false)
            .await
            .expect("retry");
        assert_eq!(state, JobState::Delayed);
    }
    assert_eq!(q.sizes().await.expect("sizes"), (0, 2, 0));
    assert!(pending(&server).await.is_empty(), "a delayed job is acked");
    let delayed = q.list(JobState::Delayed, 10).await.expect("list");
    assert_eq!(delayed.len(), 2);
    assert!(delayed.iter().all(|j| j.next_run_at.is_some()));

    assert_eq!(
        q.promote_due().await.expect("promote"),
        0,
        "nothing is due yet"
    );
    assert!(
        q.read(&mut reader, "c1", 10, Duration::from_millis(50))
            .await
            .expect("read")
            .is_empty(),
        "a delayed job is not delivered"
    );

    let promoted = eventually(
        Duration::from_secs(5),
        "the due job to be promoted",
        || async {
            let n = q.promote_due().await.expect("promote");
            if n > 0 {
                assert!(
                    retried_at.elapsed() + Duration::from_millis(20) >= delay,
                    "promoted after {:?}, before its delay of {delay:?}",
                    retried_at.elapsed()
                );
            }
            Some(n).filter(|n| *n > 0)
        },
    )
    .await;
    assert_eq!(promoted, 1, "only the due job is promoted");
    assert_eq!(q.sizes().await.expect("sizes"), (1, 1, 0));
    assert_eq!(
        q.job(&soon).await.expect("job").map(|j| j.state),
        Some(JobState::Pending)
    );
    assert_eq!(
        q.job(&late).await.expect("job").map(|j| j.state),
        Some(JobState::Delayed)
    );

    let again = q
        .read(&mut reader, "c1", 10, Duration::from_millis(100))
        .await
        .expect("read");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].job.id, soon);
    assert_eq!(again[0].job.attempts, 0);
    assert_eq!(again[0].job.last_error.as_deref(), Some("wait"));
    assert_eq!(q.promote_due().await.expect("promote"), 0);
}

// ---------------------------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn dead_letters_are_listed_and_can_be_requeued() {
    let server = RedisServer::start().await;
    let q = queue(
        &server,
        QueueConfig {
            max_attempts: 2,
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            ..config(&server)
        },
    );
    let (id, _) = q.enqueue(request("heidi")).await.expect("enqueue");
    let mut reader = q.reader_connection().await.expect("reader");

    // Two failed attempts: the first backs off, the second buries the job.
    let d = q
        .read(&mut reader, "c1", 1, Duration::from_millis(100))
        .await
        .expect("read")
        .pop()
        .expect("delivered");
    let state = q.retry(&d, "e1".into(), None, true).await.expect("retry");
    assert_eq!(state, JobState::Delayed);
    eventually(Duration::from_secs(5), "the retry to be due", || async {
        let n = q.promote_due().await.expect("promote");
        (n == 1).then_some(())
    })
    .await;
    let d = q
        .read(&mut reader, "c1", 1, Duration::from_millis(100))
        .await
        .expect("read")
        .pop()
        .expect("delivered again");
    assert_eq!(d.job.attempts, 1);
    let state = q.retry(&d, "e2".into(), None, true).await.expect("retry");
    assert_eq!(state, JobState::Dead);

    let dead = q.list(JobState::Dead, 10).await.expect("list dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert_eq!(dead[0].attempts, 2);
    assert_eq!(
        dead[0].last_error.as_deref(),
        Some("gave up after 2 attempts: e2")
    );
    assert_eq!(q.active_job_of("heidi").await.expect("active"), None);
    let mut conn = raw(&server).await;
    let ttl: i64 = conn
        .ttl(key(&server, &format!("job:{id}")))
        .await
        .expect("TTL");
    assert!(ttl > 0, "a dead job document expires (ttl {ttl})");

    // While the user has another active job, requeueing returns that one and queues nothing.
    let (other, created) = q.enqueue(request("heidi")).await.expect("enqueue");
    assert!(created);
    assert_eq!(q.requeue(&id).await.expect("requeue"), other);
    assert_eq!(
        q.job(&id).await.expect("job").map(|j| j.state),
        Some(JobState::Dead)
    );
    let d = q
        .read(&mut reader, "c1", 10, Duration::from_millis(100))
        .await
        .expect("read");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].job.id, other);
    q.complete(&d[0]).await.expect("complete");

    // Now the dead job runs again, with its attempts reset.
    assert_eq!(q.requeue(&id).await.expect("requeue"), id);
    let job = q.job(&id).await.expect("job").expect("exists");
    assert_eq!(job.state, JobState::Pending);
    assert_eq!(job.attempts, 0);
    assert_eq!(
        q.active_job_of("heidi").await.expect("active"),
        Some(id.clone())
    );
    let ttl: i64 = conn
        .ttl(key(&server, &format!("job:{id}")))
        .await
        .expect("TTL");
    assert_eq!(ttl, -1, "a requeued job no longer expires");
    assert!(
        q.list(JobState::Dead, 10).await.expect("list").is_empty(),
        "a requeued job is no longer listed as dead"
    );
    assert_eq!(
        q.requeue(&id).await.expect("requeue"),
        id,
        "requeueing an active job is a no-op"
    );

    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        Arc::new(FnHandler(move |job: &Job| {
            assert_eq!(job.attempts, 0);
            calls.fetch_add(1, Ordering::SeqCst);
            Outcome::Done
        }))
    };
    let workers = Workers::start(&q, handler, 1, 1);
    wait_for_state(&q, &id, JobState::Done, Duration::from_secs(10)).await;
    workers.stop().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "requeued once, run once");

    match q.requeue("no-such-job").await {
        Err(QueueError::NotFound(missing)) => assert_eq!(missing, "no-such-job"),
        other => panic!("requeue of an unknown job: {other:?}"),
    }
}

#[tokio::test]
async fn a_handler_giving_up_dead_letters_at_once() {
    let server = RedisServer::start().await;
    let q = queue(&server, config(&server));
    let handler = Arc::new(FnHandler(|_: &Job| Outcome::Dead {
        reason: "validation: email domain not allowed".into(),
    }));
    let workers = Workers::start(&q, handler, 1, 1);
    let (id, _) = q.enqueue(request("ivan")).await.expect("enqueue");
    let job = wait_until_finished(&q, &id, Duration::from_secs(10)).await;
    workers.stop().await;
    assert_eq!(job.state, JobState::Dead);
    assert_eq!(job.attempts, 0);
    assert_eq!(
        job.last_error.as_deref(),
        Some("validation: email domain not allowed")
    );
    assert_eq!(q.list(JobState::Dead, 10).await.expect("list").len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Durability
// ---------------------------------------------------------------------------------------------

/// Holds every job until the gate opens, then succeeds; counts runs per user.
struct GatedHandler {
    open: watch::Receiver<bool>,
    runs: Mutex<HashMap<String, usize>>,
    started: Notify,
}

#[async_trait]
impl JobHandler for GatedHandler {
    async fn handle(&self, job: &Job) -> Outcome {
        *self
            .runs
            .lock()
            .expect("lock")
            .entry(job.request.user_id.clone())
            .or_default() += 1;
        self.started.notify_one();
        let mut open = self.open.clone();
        if open.wait_for(|o| *o).await.is_err() {
            return Outcome::Retry {
                error: "test ended".into(),
                after: None,
                spend_attempt: false,
            };
        }
        Outcome::Done
    }
}

#[tokio::test]
async fn jobs_survive_a_redis_restart_with_aof() {
    let mut server = RedisServer::start_with_aof().await;
    let q = queue(
        &server,
        QueueConfig {
            // A completion lost to the restart is redone quickly.
            visibility_timeout: Duration::from_secs(1),
            ..config(&server)
        },
    );
    let users: Vec<String> = (0..12).map(|i| format!("user-{i:02}")).collect();
    let mut ids = Vec::new();
    for u in &users {
        ids.push(q.enqueue(request(u)).await.expect("enqueue").0);
    }

    // Two jobs are in flight (held by the handler) when Redis goes down.
    let (gate, open) = watch::channel(false);
    let handler = Arc::new(GatedHandler {
        open,
        runs: Mutex::new(HashMap::new()),
        started: Notify::new(),
    });
    let workers = Workers::start(&q, handler.clone(), 1, 2);
    eventually(Duration::from_secs(10), "two jobs in flight", || async {
        let n: usize = handler.runs.lock().expect("lock").values().sum();
        (n == 2).then_some(())
    })
    .await;

    server.stop().await;
    // Down: calls fail (they do not hang).
    let down = timeout(Duration::from_secs(20), q.enqueue(request("while-down")))
        .await
        .expect("an enqueue against a stopped Redis fails within 20 s");
    assert!(down.is_err(), "enqueue succeeded with Redis down");
    server.restart().await;

    // The same queue recovers its connection by itself.
    let late = eventually(
        Duration::from_secs(20),
        "the queue to reconnect",
        || async { q.enqueue(request("after-restart")).await.ok() },
    )
    .await;
    assert!(late.1, "a new job after the restart");
    ids.push(late.0);
    // Everything enqueued before the restart is still there.
    for id in &ids {
        assert!(
            q.job(id).await.expect("job").is_some(),
            "job {id} lost in the restart"
        );
    }

    gate.send(true).expect("gate");
    for id in &ids {
        wait_for_state(&q, id, JobState::Done, Duration::from_secs(30)).await;
    }
    workers.stop().await;

    let runs = handler.runs.lock().expect("lock").clone();
    for u in users.iter().chain([&"after-restart".to_owned()]) {
        assert!(runs.get(u).copied().unwrap_or(0) >= 1, "{u} never ran");
    }
    assert_eq!(q.sizes().await.expect("sizes"), (0, 0, 0));
    assert!(pending(&server).await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Bounded growth
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn completed_jobs_are_trimmed() {
    let server = RedisServer::start().await;
    let keep_done = 5;
    let keep_finished = Duration::from_secs(3600);
    let q = queue(
        &server,
        QueueConfig {
            keep_done,
            keep_finished,
            ..config(&server)
        },
    );
    let workers = Workers::start(&q, Arc::new(FnHandler(|_: &Job| Outcome::Done)), 1, 4);
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(
            q.enqueue(request(&format!("trim-{i}")))
                .await
                .expect("enqueue")
                .0,
        );
    }
    for id in &ids {
        wait_for_state(&q, id, JobState::Done, Duration::from_secs(20)).await;
    }
    workers.stop().await;

    assert_eq!(
        q.sizes().await.expect("sizes"),
        (0, 0, 0),
        "the stream is empty"
    );
    let mut conn = raw(&server).await;
    let done: usize = conn.llen(key(&server, "done")).await.expect("LLEN");
    assert_eq!(done, keep_done, "{{P}}:done keeps only the most recent");
    let recent: Vec<String> = conn
        .lrange(key(&server, "done"), 0, -1)
        .await
        .expect("LRANGE");
    assert_eq!(
        q.list(JobState::Done, 100).await.expect("list").len(),
        keep_done
    );
    assert!(recent.iter().all(|id| ids.contains(id)));
    assert!(pending(&server).await.is_empty());
    let info: StreamPendingReply = conn
        .xpending(key(&server, "jobs"), GROUP)
        .await
        .expect("XPENDING");
    assert_eq!(info.count(), 0);
    for id in &ids {
        let ttl: i64 = conn
            .ttl(key(&server, &format!("job:{id}")))
            .await
            .expect("TTL");
        assert!(
            ttl > 0 && ttl as u64 <= keep_finished.as_secs(),
            "a finished job expires (ttl {ttl})"
        );
    }
    let users: Vec<String> = conn.keys(key(&server, "user:*")).await.expect("KEYS");
    assert!(users.is_empty(), "no idempotency keys left: {users:?}");
}

// ---------------------------------------------------------------------------------------------
// Several workers
// ---------------------------------------------------------------------------------------------

/// Counts calls per user, and which worker made them. Every tenth user's job runs longer than
/// the lease (`long`), so only its renewal keeps another worker from running it too.
struct Counting {
    worker: usize,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    by_worker: Arc<Mutex<HashMap<usize, usize>>>,
    long: Duration,
}

#[async_trait]
impl JobHandler for Counting {
    async fn handle(&self, job: &Job) -> Outcome {
        *self
            .calls
            .lock()
            .expect("lock")
            .entry(job.request.user_id.clone())
            .or_default() += 1;
        *self
            .by_worker
            .lock()
            .expect("lock")
            .entry(self.worker)
            .or_default() += 1;
        // Some work, so that jobs overlap and workers compete; simulated, hence a sleep.
        let pause = if job.request.user_id.ends_with('0') {
            self.long
        } else {
            Duration::from_millis(rand::random_range(0..4u64))
        };
        tokio::time::sleep(pause).await;
        Outcome::Done
    }
}

#[tokio::test]
async fn several_workers_handle_each_user_exactly_once() {
    let server = RedisServer::start().await;
    // A short lease, outlived by every tenth job: workers reclaim all the time, and only the
    // lease renewal keeps a long job from running twice.
    let visibility = Duration::from_millis(300);
    let q = queue(
        &server,
        QueueConfig {
            visibility_timeout: visibility,
            ..config(&server)
        },
    );
    q.sizes().await.expect("connect");
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let by_worker = Arc::new(Mutex::new(HashMap::new()));
    let (stop, rx) = watch::channel(false);
    let handles: Vec<JoinHandle<()>> = (0..3)
        .map(|w| {
            let handler = Arc::new(Counting {
                worker: w,
                calls: calls.clone(),
                by_worker: by_worker.clone(),
                long: visibility * 5 / 2,
            });
            tokio::spawn(Worker::new(q.clone(), handler, 4).run(rx.clone()))
        })
        .collect();

    let n = 300;
    let users: Vec<String> = (0..n).map(|i| format!("many-{i:03}")).collect();
    let mut ids = Vec::new();
    for u in &users {
        let (id, created) = q.enqueue(request(u)).await.expect("enqueue");
        assert!(created);
        ids.push(id);
    }
    eventually(Duration::from_secs(60), "every job to finish", || async {
        let (depth, delayed, _) = q.sizes().await.expect("sizes");
        let handled: usize = calls.lock().expect("lock").values().sum();
        (depth == 0 && delayed == 0 && handled >= n).then_some(())
    })
    .await;
    stop.send(true).expect("stop");
    for h in handles {
        timeout(Duration::from_secs(10), h)
            .await
            .expect("a worker stops")
            .expect("no panic");
    }

    let calls = calls.lock().expect("lock").clone();
    assert_eq!(calls.len(), n, "every user was handled");
    for u in &users {
        assert_eq!(
            calls.get(u),
            Some(&1),
            "{u} handled {:?} times",
            calls.get(u)
        );
    }
    for id in &ids {
        assert_eq!(
            q.job(id).await.expect("job").map(|j| j.state),
            Some(JobState::Done)
        );
    }
    assert_eq!(q.sizes().await.expect("sizes"), (0, 0, 0), "none dead");
    assert!(pending(&server).await.is_empty());
    let by_worker = by_worker.lock().expect("lock").clone();
    assert!(
        by_worker.len() >= 2,
        "the work was shared between workers: {by_worker:?}"
    );
}

#[tokio::test]
async fn a_cancelled_job_never_runs_again_and_its_running_worker_cannot_finish_it() {
    let server = RedisServer::start().await;
    let q = queue(&server, config(&server));

    // Pending: cancelled before any worker reads it → never delivered.
    let (pending_id, _) = q.enqueue(request("dave")).await.expect("enqueue");
    assert_eq!(
        q.cancel_user("dave", "cancelled: user deactivated")
            .await
            .expect("cancel"),
        Some(pending_id.clone())
    );
    let mut reader = q.reader_connection().await.expect("reader");
    let got = q
        .read(&mut reader, "w1", 10, Duration::from_millis(50))
        .await
        .expect("read");
    assert!(got.is_empty(), "a cancelled job was delivered: {got:?}");
    let job = q.job(&pending_id).await.expect("job").expect("kept");
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(
        job.last_error.as_deref(),
        Some("cancelled: user deactivated")
    );
    assert_eq!(q.active_job_of("dave").await.expect("active"), None);

    // Running: the worker holding it records an outcome after the cancel; the job stays
    // cancelled and the delivery is acknowledged.
    let (running_id, _) = q.enqueue(request("erin")).await.expect("enqueue");
    let taken = q
        .read(&mut reader, "w1", 10, Duration::from_millis(100))
        .await
        .expect("read");
    assert_eq!(taken.len(), 1);
    assert_eq!(
        q.cancel_user("erin", "cancelled: user deactivated")
            .await
            .expect("cancel"),
        Some(running_id.clone())
    );
    q.complete(&taken[0]).await.expect("complete");
    assert_eq!(
        q.job(&running_id).await.expect("job").map(|j| j.state),
        Some(JobState::Cancelled),
        "a stale worker resurrected a cancelled job"
    );
    assert!(pending(&server).await.is_empty());

    // Delayed: cancelled while waiting for its retry → never promoted.
    let (delayed_id, _) = q.enqueue(request("finn")).await.expect("enqueue");
    let taken = q
        .read(&mut reader, "w1", 10, Duration::from_millis(100))
        .await
        .expect("read");
    q.retry(&taken[0], "try later".into(), Some(Duration::ZERO), true)
        .await
        .expect("retry");
    q.cancel_user("finn", "cancelled").await.expect("cancel");
    assert_eq!(q.promote_due().await.expect("promote"), 0);
    assert_eq!(
        q.job(&delayed_id).await.expect("job").map(|j| j.state),
        Some(JobState::Cancelled)
    );
    assert_eq!(q.sizes().await.expect("sizes"), (0, 0, 0));
    // Nothing left to cancel.
    assert_eq!(q.cancel_user("finn", "again").await.expect("cancel"), None);
}

// ---------------------------------------------------------------------------------------------
// Leases: renewal, owner fencing, consumer cleanup
// ---------------------------------------------------------------------------------------------

/// Entries delivered but not acknowledged: (entry, owner, ms since last delivered, deliveries).
async fn pending_details(server: &RedisServer) -> Vec<(String, String, usize, usize)> {
    let mut conn = raw(server).await;
    let reply: StreamPendingCountReply = conn
        .xpending_count(key(server, "jobs"), GROUP, "-", "+", 1000)
        .await
        .expect("XPENDING");
    reply
        .ids
        .into_iter()
        .map(|p| (p.id, p.consumer, p.last_delivered_ms, p.times_delivered))
        .collect()
}

/// The group's consumers: (name, pending entries).
async fn consumers(server: &RedisServer) -> Vec<(String, usize)> {
    let mut conn = raw(server).await;
    let reply: redis::streams::StreamInfoConsumersReply = conn
        .xinfo_consumers(key(server, "jobs"), GROUP)
        .await
        .expect("XINFO CONSUMERS");
    let mut out: Vec<(String, usize)> = reply
        .consumers
        .into_iter()
        .map(|c| (c.name, c.pending))
        .collect();
    out.sort();
    out
}

fn consumer_names(list: &[(String, usize)]) -> Vec<&str> {
    list.iter().map(|(n, _)| n.as_str()).collect()
}

#[tokio::test]
async fn a_job_outliving_the_visibility_timeout_keeps_its_lease_and_runs_once() {
    let server = RedisServer::start().await;
    let visibility = Duration::from_millis(300);
    let q = queue(
        &server,
        QueueConfig {
            visibility_timeout: visibility,
            ..config(&server)
        },
    );
    q.sizes().await.expect("connect");
    let (gate, open) = watch::channel(false);
    let handler = Arc::new(GatedHandler {
        open,
        runs: Mutex::new(HashMap::new()),
        started: Notify::new(),
    });
    // Two workers, one slot each: while one holds the job, the other is idle and reclaims
    // every 250 ms whatever has been silent for the visibility timeout.
    let workers = Workers::start(&q, handler.clone(), 2, 1);
    let (id, _) = q.enqueue(request("long")).await.expect("enqueue");
    timeout(Duration::from_secs(10), handler.started.notified())
        .await
        .expect("the job starts");

    // Hold the handler for five visibility timeouts, watching the delivery all along: it stays
    // with its first owner, is never delivered again, and its idle time is kept below the
    // timeout by the renewals.
    let held_since = Instant::now();
    let mut owner = None;
    while held_since.elapsed() < visibility * 5 {
        let pending = pending_details(&server).await;
        assert_eq!(pending.len(), 1, "one delivery: {pending:?}");
        let (_, consumer, idle_ms, deliveries) = &pending[0];
        let first = owner.get_or_insert_with(|| consumer.clone());
        assert_eq!(consumer, first, "the job changed hands while it ran");
        assert_eq!(*deliveries, 1, "the job was delivered again while it ran");
        assert!(
            (*idle_ms as u128) < visibility.as_millis(),
            "the lease was not renewed: idle {idle_ms} ms after {:?}",
            held_since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        q.job(&id).await.expect("job").map(|j| j.state),
        Some(JobState::Running)
    );

    gate.send(true).expect("gate");
    let job = wait_until_finished(&q, &id, Duration::from_secs(10)).await;
    workers.stop().await;
    assert_eq!(job.state, JobState::Done);
    assert_eq!(
        handler.runs.lock().expect("lock").get("long"),
        Some(&1),
        "the handler ran more than once"
    );
    assert_eq!(q.sizes().await.expect("sizes"), (0, 0, 0));
    assert!(pending(&server).await.is_empty());
}

/// Every way a worker can record an outcome, from a stale delivery: each must be refused as
/// not-owner, changing nothing.
async fn assert_stale_outcomes_refused(q: &JobQueue, stale: &provisioning::Delivery) {
    let not_owner = |what: &str, r: Result<(), QueueError>| match r {
        Err(QueueError::NotOwner {
            job,
            entry,
            consumer,
        }) => {
            assert_eq!(job, stale.job.id, "{what}");
            assert_eq!(entry, stale.entry_id, "{what}");
            assert_eq!(consumer, stale.consumer, "{what}");
        }
        other => panic!("{what} from a stale delivery: {other:?}"),
    };
    not_owner("complete", q.complete(stale).await);
    not_owner(
        "retry",
        q.retry(stale, "late".into(), Some(Duration::ZERO), false)
            .await
            .map(|_| ()),
    );
    // With max_attempts 1 a spent attempt buries: the same fence.
    not_owner(
        "retry (last attempt)",
        q.retry(stale, "late".into(), None, true).await.map(|_| ()),
    );
    not_owner("bury", q.bury(stale, "late".into()).await);
    assert!(
        !q.renew(stale).await.expect("renew"),
        "a stale delivery's lease was renewed"
    );
}

#[tokio::test]
async fn a_stale_worker_cannot_change_a_job_another_worker_took_over() {
    let server = RedisServer::start().await;
    let visibility = Duration::from_millis(300);
    let q = queue(
        &server,
        QueueConfig {
            visibility_timeout: visibility,
            max_attempts: 1,
            ..config(&server)
        },
    );
    let (id, _) = q.enqueue(request("stale")).await.expect("enqueue");

    // Worker A takes the job and stalls: it never renews its lease.
    let mut reader = q.reader_connection().await.expect("reader");
    let a = q
        .read(&mut reader, "worker-a", 1, Duration::from_millis(100))
        .await
        .expect("read")
        .pop()
        .expect("delivered to A");
    assert_eq!(a.consumer, "worker-a");
    // Worker B takes it over once the lease has lapsed.
    let b = eventually(Duration::from_secs(5), "B to reclaim the job", || async {
        q.reclaim("worker-b", 10).await.expect("reclaim").pop()
    })
    .await;
    assert_eq!(
        (b.entry_id.as_str(), b.consumer.as_str()),
        (a.entry_id.as_str(), "worker-b")
    );

    // While B runs it, A's late outcomes change nothing, and A cannot take the lease back.
    assert_stale_outcomes_refused(&q, &a).await;
    assert_eq!(
        pending(&server).await,
        vec![(b.entry_id.clone(), "worker-b".to_owned())],
        "B still holds the job"
    );
    let job = q.job(&id).await.expect("job").expect("exists");
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.attempts, 0);
    assert_eq!(
        q.active_job_of("stale").await.expect("active"),
        Some(id.clone())
    );
    assert_eq!(q.sizes().await.expect("sizes"), (1, 0, 0));

    // B renews and completes.
    assert!(q.renew(&b).await.expect("renew"), "B holds the lease");
    q.complete(&b).await.expect("B completes");
    let mut conn = raw(&server).await;
    let done_doc: Option<String> = conn
        .get(key(&server, &format!("job:{id}")))
        .await
        .expect("GET");

    // Then A's late outcomes (and B's second one) change nothing either: no resurrection.
    assert_stale_outcomes_refused(&q, &a).await;
    assert!(matches!(
        q.complete(&b).await,
        Err(QueueError::NotOwner { .. })
    ));
    let after: Option<String> = conn
        .get(key(&server, &format!("job:{id}")))
        .await
        .expect("GET");
    assert_eq!(after, done_doc, "the finished job was rewritten");
    let job = q.job(&id).await.expect("job").expect("exists");
    assert_eq!(job.state, JobState::Done);
    assert_eq!(
        q.sizes().await.expect("sizes"),
        (0, 0, 0),
        "no delayed or dead entries"
    );
    assert!(pending(&server).await.is_empty());
    assert_eq!(q.active_job_of("stale").await.expect("active"), None);
    let done: Vec<String> = conn
        .lrange(key(&server, "done"), 0, -1)
        .await
        .expect("LRANGE");
    assert_eq!(done, vec![id.clone()], "completed once");
}

/// Waits on a gate that never opens; records when its future is dropped unfinished.
struct Abandoned {
    runs: AtomicUsize,
    started: Notify,
    dropped: Arc<std::sync::atomic::AtomicBool>,
    open: watch::Receiver<bool>,
}

struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl JobHandler for Abandoned {
    async fn handle(&self, _job: &Job) -> Outcome {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let guard = SetOnDrop(self.dropped.clone());
        self.started.notify_one();
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        std::mem::forget(guard);
        Outcome::Done
    }
}

#[tokio::test]
async fn a_worker_whose_lease_was_taken_over_abandons_the_run_and_records_nothing() {
    let server = RedisServer::start().await;
    let visibility = Duration::from_millis(300);
    let q = queue(
        &server,
        QueueConfig {
            visibility_timeout: visibility,
            ..config(&server)
        },
    );
    let (_gate, open) = watch::channel(false);
    let handler = Arc::new(Abandoned {
        runs: AtomicUsize::new(0),
        started: Notify::new(),
        dropped: Arc::default(),
        open,
    });
    let workers = Workers::start(&q, handler.clone(), 1, 1);
    let (id, _) = q.enqueue(request("taken")).await.expect("enqueue");
    timeout(Duration::from_secs(10), handler.started.notified())
        .await
        .expect("the job starts");
    let (entry, worker) = pending(&server).await.pop().expect("delivered");

    // Another worker takes the delivery over (as if this one had stalled past its lease).
    let mut conn = raw(&server).await;
    let _: Vec<String> = redis::cmd("XCLAIM")
        .arg(key(&server, "jobs"))
        .arg(GROUP)
        .arg("thief")
        .arg(0)
        .arg(&entry)
        .arg("JUSTID")
        .query_async(&mut conn)
        .await
        .expect("XCLAIM");
    let thief = provisioning::Delivery {
        job: q.job(&id).await.expect("job").expect("exists"),
        entry_id: entry.clone(),
        consumer: "thief".into(),
    };

    // The worker's next renewal finds out and drops the handler (the thief keeps its own lease
    // meanwhile, so the worker cannot simply reclaim it back).
    eventually(
        Duration::from_secs(5),
        "the handler to be dropped",
        || async {
            assert!(q.renew(&thief).await.expect("renew"), "the thief holds it");
            handler.dropped.load(Ordering::SeqCst).then_some(())
        },
    )
    .await;
    assert_eq!(
        pending(&server).await,
        vec![(entry.clone(), "thief".to_owned())],
        "the worker took the job back"
    );
    let job = q.job(&id).await.expect("job").expect("exists");
    assert_eq!(
        job.state,
        JobState::Running,
        "the abandoned run recorded an outcome"
    );
    assert_eq!(q.sizes().await.expect("sizes"), (1, 0, 0));

    // The new owner finishes it; the job ran once on the worker.
    q.complete(&thief).await.expect("complete");
    workers.stop().await;
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        q.job(&id).await.expect("job").map(|j| j.state),
        Some(JobState::Done)
    );
    // The stopped worker deleted its consumer.
    assert_eq!(
        consumer_names(&consumers(&server).await),
        vec!["thief"],
        "worker {worker} left its consumer behind"
    );
}

/// `consumer` reads a job of `user` and completes it: it exists and holds nothing.
async fn run_one_job(
    q: &JobQueue,
    reader: &mut provisioning::RedisConn,
    consumer: &str,
    user: &str,
) {
    let (id, _) = q.enqueue(request(user)).await.expect("enqueue");
    let d = q
        .read(reader, consumer, 1, Duration::from_millis(100))
        .await
        .expect("read")
        .pop()
        .expect("delivered");
    assert_eq!(d.job.id, id);
    q.complete(&d).await.expect("complete");
}

#[tokio::test]
async fn idle_consumers_are_deleted_by_maintenance_and_on_stop() {
    let server = RedisServer::start().await;
    let visibility = Duration::from_millis(200);
    let q = queue(
        &server,
        QueueConfig {
            visibility_timeout: visibility,
            ..config(&server)
        },
    );
    assert_eq!(q.consumer_expiry(), visibility * 10);
    let mut reader = q.reader_connection().await.expect("reader");

    // The queue alone: an idle consumer holding nothing goes, one holding an entry stays.
    let (id, _) = q.enqueue(request("held")).await.expect("enqueue");
    let held = q
        .read(&mut reader, "holding", 1, Duration::from_millis(100))
        .await
        .expect("read")
        .pop()
        .expect("delivered");
    let created = Instant::now();
    run_one_job(&q, &mut reader, "empty", "done-by-empty").await;
    assert_eq!(
        consumers(&server).await,
        vec![("empty".to_owned(), 0), ("holding".to_owned(), 1)]
    );
    let idle_for = Duration::from_millis(500);
    assert!(
        q.delete_idle_consumers(idle_for)
            .await
            .expect("cleanup")
            .is_empty(),
        "a fresh consumer was deleted"
    );
    let deleted = eventually(
        Duration::from_secs(5),
        "the idle consumer to go",
        || async {
            let deleted = q.delete_idle_consumers(idle_for).await.expect("cleanup");
            Some(deleted).filter(|d| !d.is_empty())
        },
    )
    .await;
    assert!(
        created.elapsed() >= idle_for,
        "deleted before it was idle long enough"
    );
    assert_eq!(deleted, vec!["empty".to_owned()]);
    assert_eq!(consumers(&server).await, vec![("holding".to_owned(), 1)]);
    // Releasing a consumer that holds an entry would lose it: refused.
    assert!(!q.release_consumer("holding").await.expect("release"));
    assert_eq!(consumers(&server).await, vec![("holding".to_owned(), 1)]);
    q.complete(&held).await.expect("complete");
    assert!(q.release_consumer("holding").await.expect("release"));
    assert!(consumers(&server).await.is_empty());
    assert_eq!(
        q.job(&id).await.expect("job").map(|j| j.state),
        Some(JobState::Done)
    );

    // A worker's maintenance deletes a consumer left behind once it has been idle for
    // `consumer_expiry`, and the worker deletes its own consumer when it stops.
    let left_at = Instant::now();
    run_one_job(&q, &mut reader, "left-behind", "done-by-left-behind").await;
    assert_eq!(
        consumers(&server).await,
        vec![("left-behind".to_owned(), 0)]
    );
    let workers = Workers::start(&q, Arc::new(FnHandler(|_: &Job| Outcome::Done)), 1, 1);
    eventually(
        q.consumer_expiry() * 3,
        "the left-behind consumer to be deleted",
        || async {
            let names = consumers(&server).await;
            if consumer_names(&names).contains(&"left-behind") {
                return None;
            }
            assert!(
                left_at.elapsed() >= q.consumer_expiry(),
                "deleted after {:?}, before the expiry",
                left_at.elapsed()
            );
            Some(())
        },
    )
    .await;
    let (id, _) = q.enqueue(request("after")).await.expect("enqueue");
    wait_for_state(&q, &id, JobState::Done, Duration::from_secs(10)).await;
    let running = consumers(&server).await;
    assert_eq!(running.len(), 1, "only the worker's own: {running:?}");
    assert!(running[0].0.starts_with("worker-"), "{running:?}");
    workers.stop().await;
    assert!(
        consumers(&server).await.is_empty(),
        "the stopped worker left its consumer behind"
    );
}
