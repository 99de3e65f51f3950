//! Workers: read jobs, run the handler with bounded concurrency, record the outcome; promote due
//! retries and reclaim jobs of dead workers on the side. Any number of workers (in `serve` or
//! `librechat-bff worker` processes) can share one Redis.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use tokio::{
    sync::{watch, Semaphore},
    task::JoinSet,
    time::Instant,
};

use crate::queue::{Delivery, Job, JobQueue};

/// What became of one run of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Run again after `after` (or the backoff); `spend_attempt` false for rate-limit waits.
    Retry {
        error: String,
        after: Option<Duration>,
        spend_attempt: bool,
    },
    /// Give up: dead-letter with the reason.
    Dead {
        reason: String,
    },
}

#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    async fn handle(&self, job: &Job) -> Outcome;
}

pub struct Worker {
    queue: JobQueue,
    handler: Arc<dyn JobHandler>,
    concurrency: usize,
    consumer: String,
    maintenance_every: Duration,
}

impl Worker {
    pub fn new(queue: JobQueue, handler: Arc<dyn JobHandler>, concurrency: usize) -> Self {
        Self {
            queue,
            handler,
            concurrency: concurrency.max(1),
            consumer: format!("worker-{}", uuid::Uuid::new_v4()),
            maintenance_every: Duration::from_millis(250),
        }
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Runs until `shutdown` turns true, then lets jobs in flight finish.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks = JoinSet::new();
        let mut reader = None;
        let mut last_maintenance: Option<Instant> = None;
        let mut pause = Duration::from_millis(100);
        let mut reclaim_cursor = "0-0".to_owned();
        tracing::info!(consumer = %self.consumer, concurrency = self.concurrency, "provisioning worker started");
        // A dropped sender also means stop (otherwise `changed()` returns at once, forever).
        while !*shutdown.borrow() && shutdown.has_changed().is_ok() {
            while tasks.try_join_next().is_some() {}
            let result = async {
                if last_maintenance.is_none_or(|t| t.elapsed() >= self.maintenance_every) {
                    last_maintenance = Some(Instant::now());
                    self.queue.promote_due().await?;
                    let free = permits.available_permits();
                    if free > 0 {
                        let (claimed, next) = self
                            .queue
                            .reclaim_from(&self.consumer, free, &reclaim_cursor)
                            .await?;
                        reclaim_cursor = next;
                        for d in claimed {
                            self.spawn(&mut tasks, &permits, d).await;
                        }
                    }
                }
                let free = permits.available_permits();
                if free == 0 {
                    // Every slot busy: wait for one job to end (or shutdown).
                    tokio::select! {
                        _ = tasks.join_next() => {}
                        _ = shutdown.changed() => {}
                    }
                    return Ok(());
                }
                if reader.is_none() {
                    reader = Some(self.queue.reader_connection().await?);
                }
                if let Some(conn) = reader.as_mut() {
                    let block = self.maintenance_every;
                    for d in self.queue.read(conn, &self.consumer, free, block).await? {
                        self.spawn(&mut tasks, &permits, d).await;
                    }
                }
                Ok::<(), crate::QueueError>(())
            }
            .await;
            match result {
                Ok(()) => {
                    if pause > Duration::from_millis(100) {
                        tracing::info!("provisioning worker: queue reachable again");
                    }
                    pause = Duration::from_millis(100);
                }
                Err(e) => {
                    // Say it once per outage; the retries themselves are debug noise.
                    if pause == Duration::from_millis(100) {
                        tracing::warn!(error = %e, "provisioning worker: queue unavailable; retrying until it is back");
                    } else {
                        tracing::debug!(error = %e, "provisioning worker: queue still unavailable");
                    }
                    reader = None;
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.changed() => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::info!(consumer = %self.consumer, in_flight = tasks.len(), "provisioning worker stopping; finishing jobs in flight");
        while tasks.join_next().await.is_some() {}
    }

    async fn spawn(&self, tasks: &mut JoinSet<()>, permits: &Arc<Semaphore>, d: Delivery) {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let queue = self.queue.clone();
        let handler = self.handler.clone();
        tasks.spawn(async move {
            let outcome = handler.handle(&d.job).await;
            if let Err(e) = record(&queue, &d, outcome).await {
                // The entry stays pending and is reclaimed after the visibility timeout.
                tracing::warn!(job = %d.job.id, error = %e, "could not record a job outcome");
            }
            drop(permit);
        });
    }
}

async fn record(queue: &JobQueue, d: &Delivery, outcome: Outcome) -> Result<(), crate::QueueError> {
    match outcome {
        Outcome::Done => {
            tracing::info!(job = %d.job.id, user = %d.job.request.user_id, "job done");
            queue.complete(d).await
        }
        Outcome::Retry {
            error,
            after,
            spend_attempt,
        } => {
            let state = queue.retry(d, error.clone(), after, spend_attempt).await?;
            tracing::info!(job = %d.job.id, ?state, %error, "job will run again");
            Ok(())
        }
        Outcome::Dead { reason } => queue.bury(d, reason).await,
    }
}
