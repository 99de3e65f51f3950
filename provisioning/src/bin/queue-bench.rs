//! Throughput of the provisioning job queue: enqueue N jobs for N users, run them through W
//! workers (C jobs in flight each) with a handler that does nothing, and report jobs/s from the
//! first enqueue to the last completion.
//!
//! Starts nothing itself: point it at a Redis.
//!
//! ```text
//! queue-bench [--redis-url URL] [--jobs N] [--workers W] [--concurrency C]
//! ```
//!
//! `--redis-url` defaults to `$REDIS_URL`, else `redis://127.0.0.1:6379`. Keys live under a
//! unique prefix and are deleted afterwards.

use std::{
    error::Error,
    process::ExitCode,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;
use provisioning::{Job, JobHandler, JobQueue, Outcome, ProvisionRequest, QueueConfig, Worker};
use tokio::{sync::watch, task::JoinSet, time::Instant};

const USAGE: &str =
    "usage: queue-bench [--redis-url URL] [--jobs N] [--workers W] [--concurrency C]";

struct Args {
    redis_url: String,
    jobs: usize,
    workers: usize,
    concurrency: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        redis_url: std::env::var("REDIS_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned()),
        jobs: 2000,
        workers: 2,
        concurrency: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (flag.clone(), None),
        };
        if name == "-h" || name == "--help" {
            return Err(USAGE.to_owned());
        }
        let value = inline
            .or_else(|| it.next())
            .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))?;
        let number = |v: &str| -> Result<usize, String> {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name} wants a positive number, not {v:?}"))
        };
        match name.as_str() {
            "--redis-url" => args.redis_url = value,
            "--jobs" => args.jobs = number(&value)?,
            "--workers" => args.workers = number(&value)?,
            "--concurrency" => args.concurrency = number(&value)?,
            _ => return Err(format!("unknown argument {name}\n{USAGE}")),
        }
    }
    Ok(args)
}

/// Does nothing and counts.
struct NoOp(Arc<AtomicUsize>);

#[async_trait]
impl JobHandler for NoOp {
    async fn handle(&self, _job: &Job) -> Outcome {
        self.0.fetch_add(1, Ordering::Relaxed);
        Outcome::Done
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    match bench(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("queue-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(args: &Args) -> Result<(), Box<dyn Error>> {
    let client = redis::Client::open(args.redis_url.as_str())?;
    let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let queue = JobQueue::new(
        client.clone(),
        QueueConfig {
            prefix: prefix.clone(),
            keep_finished: Duration::from_secs(600),
            keep_done: 100,
            ..QueueConfig::default()
        },
    );
    // Connects and creates the consumer group before the clock starts.
    queue.sizes().await?;

    let handled = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = watch::channel(false);
    let mut workers = JoinSet::new();
    for _ in 0..args.workers {
        let handler = Arc::new(NoOp(handled.clone()));
        workers.spawn(Worker::new(queue.clone(), handler, args.concurrency).run(stopped.clone()));
    }

    let started = Instant::now();
    // Enqueue from a few tasks at once, as concurrent API requests would.
    let producers = 8.min(args.jobs);
    let mut enqueuers = JoinSet::new();
    for p in 0..producers {
        let queue = queue.clone();
        let jobs = args.jobs;
        enqueuers.spawn(async move {
            for i in (p..jobs).step_by(producers) {
                queue
                    .enqueue(ProvisionRequest {
                        user_id: format!("bench-user-{i}"),
                        email: format!("bench-user-{i}@example.com"),
                        name: None,
                        source: "bench".to_owned(),
                    })
                    .await?;
            }
            Ok::<(), provisioning::QueueError>(())
        });
    }
    while let Some(done) = enqueuers.join_next().await {
        done??;
    }
    let enqueued_in = started.elapsed();

    let deadline =
        started + Duration::from_secs(120).max(Duration::from_millis(args.jobs as u64 * 20));
    let outcome = loop {
        if handled.load(Ordering::Relaxed) >= args.jobs {
            let (depth, delayed, dead) = queue.sizes().await?;
            if depth == 0 && delayed == 0 {
                break Ok(dead);
            }
        }
        if Instant::now() > deadline {
            break Err(format!(
                "only {} of {} jobs completed before the deadline",
                handled.load(Ordering::Relaxed),
                args.jobs
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let total = started.elapsed();

    let _ = stop.send(true);
    while workers.join_next().await.is_some() {}
    cleanup(&client, &prefix).await?;

    let dead = outcome?;
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(f64::EPSILON);
    println!(
        "queue-bench: {} jobs, {} workers x concurrency {} ({})",
        args.jobs, args.workers, args.concurrency, args.redis_url
    );
    println!(
        "  enqueue:             {:>9.0} jobs/s  ({:.3} s)",
        rate(args.jobs, enqueued_in),
        enqueued_in.as_secs_f64()
    );
    println!(
        "  enqueue -> complete: {:>9.0} jobs/s  ({:.3} s)",
        rate(args.jobs, total),
        total.as_secs_f64()
    );
    println!(
        "  handler calls: {}, dead: {dead}",
        handled.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Deletes every key of the bench's prefix.
async fn cleanup(client: &redis::Client, prefix: &str) -> Result<(), redis::RedisError> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{{{prefix}:prov}}:*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
