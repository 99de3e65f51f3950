//! Workers: read jobs, run the handler with bounded concurrency, record the outcome; promote due
//! retries, reclaim jobs of dead workers and delete idle consumers on the side. Any number of
//! workers (in `serve` or `librechat-bff worker` processes) can share one Redis.
//!
//! While a handler runs, its worker renews the lease on the delivery every third of the
//! visibility timeout, so a long job is never handed to a second worker; a worker that finds
//! its lease taken over (it stalled past the timeout) drops the handler and records nothing.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use tokio::{
    sync::{watch, Semaphore},
    task::JoinSet,
    time::{Instant, MissedTickBehavior},
};

use crate::queue::{Delivery, Job, JobQueue, QueueError};

/// How long a stopping worker tries to delete its consumer.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

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

    /// How often a running job's lease is renewed: a third of the visibility timeout, so two
    /// renewals may fail before another worker can take the job over.
    fn renew_every(&self) -> Duration {
        (self.queue.config().visibility_timeout / 3).max(Duration::from_millis(10))
    }

    /// Runs until `shutdown` turns true, then lets jobs in flight finish and deletes its
    /// consumer (unless it still holds entries, which another worker then reclaims).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let in_flight = InFlight::default();
        let mut tasks = JoinSet::new();
        let mut reader = None;
        let mut last_maintenance: Option<Instant> = None;
        let mut last_cleanup: Option<Instant> = None;
        let cleanup_every = self
            .queue
            .config()
            .visibility_timeout
            .max(self.maintenance_every);
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
                            self.spawn(&mut tasks, &permits, &in_flight, d).await;
                        }
                    }
                }
                if last_cleanup.is_none_or(|t| t.elapsed() >= cleanup_every) {
                    last_cleanup = Some(Instant::now());
                    let expiry = self.queue.consumer_expiry();
                    // Housekeeping only: a failure here must not stop the worker.
                    match self.queue.delete_idle_consumers(expiry).await {
                        Ok(deleted) if !deleted.is_empty() => {
                            tracing::info!(consumers = ?deleted, idle_longer_than = ?expiry, "deleted idle queue consumers");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "could not delete idle queue consumers")
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
                        self.spawn(&mut tasks, &permits, &in_flight, d).await;
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
        match tokio::time::timeout(RELEASE_TIMEOUT, self.queue.release_consumer(&self.consumer))
            .await
        {
            Ok(Ok(true)) => {
                tracing::info!(consumer = %self.consumer, "provisioning worker stopped; consumer deleted");
            }
            Ok(Ok(false)) => tracing::info!(
                consumer = %self.consumer,
                "provisioning worker stopped; its consumer still holds entries (they will be reclaimed)"
            ),
            Ok(Err(e)) => tracing::warn!(
                consumer = %self.consumer, error = %e,
                "provisioning worker stopped; could not delete its consumer (idle-consumer cleanup will)"
            ),
            Err(_) => tracing::warn!(
                consumer = %self.consumer,
                "provisioning worker stopped; deleting its consumer timed out (idle-consumer cleanup will)"
            ),
        }
    }

    async fn spawn(
        &self,
        tasks: &mut JoinSet<()>,
        permits: &Arc<Semaphore>,
        in_flight: &InFlight,
        d: Delivery,
    ) {
        // Reclaiming an entry this worker still runs (its renewals failed for a whole visibility
        // timeout) makes it ours again; the run in flight carries on, no second one starts.
        let Some(guard) = in_flight.enter(&d.entry_id) else {
            tracing::info!(job = %d.job.id, entry = %d.entry_id, "reclaimed a job this worker is still running; not starting it twice");
            return;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let queue = self.queue.clone();
        let handler = self.handler.clone();
        let renew_every = self.renew_every();
        tasks.spawn(async move {
            if let Some(outcome) = run_leased(&queue, handler.as_ref(), &d, renew_every).await {
                match record(&queue, &d, outcome).await {
                    Ok(()) => {}
                    Err(QueueError::NotOwner { .. }) => tracing::warn!(
                        job = %d.job.id, entry = %d.entry_id, consumer = %d.consumer,
                        "outcome discarded: another worker took this job over"
                    ),
                    // The entry stays pending and is reclaimed after the visibility timeout.
                    Err(e) => {
                        tracing::warn!(job = %d.job.id, error = %e, "could not record a job outcome")
                    }
                }
            }
            drop(guard);
            drop(permit);
        });
    }
}

/// Runs the handler while renewing the delivery's lease. `None` when the lease was lost (the
/// handler is dropped then: another worker owns the job).
async fn run_leased(
    queue: &JobQueue,
    handler: &dyn JobHandler,
    d: &Delivery,
    every: Duration,
) -> Option<Outcome> {
    let lease = async {
        let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match queue.renew(d).await {
                Ok(true) => {}
                Ok(false) => return,
                // The lease may lapse if this goes on; the outcome is fenced either way.
                Err(e) => {
                    tracing::warn!(job = %d.job.id, error = %e, "could not renew a job's lease")
                }
            }
        }
    };
    tokio::select! {
        outcome = handler.handle(&d.job) => Some(outcome),
        () = lease => {
            tracing::warn!(
                job = %d.job.id, entry = %d.entry_id, consumer = %d.consumer,
                "lost the lease on a running job (another worker took it over); abandoning this run"
            );
            None
        }
    }
}

/// The entries this worker is running.
#[derive(Clone, Default)]
struct InFlight(Arc<Mutex<HashSet<String>>>);

impl InFlight {
    /// Marks `entry` running; `None` when it already is. The guard unmarks it when dropped (on a
    /// handler panic too).
    fn enter(&self, entry: &str) -> Option<InFlightGuard> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(entry.to_owned()).then(|| InFlightGuard {
            set: self.clone(),
            entry: entry.to_owned(),
        })
    }
}

struct InFlightGuard {
    set: InFlight,
    entry: String,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut set = self.set.0.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.entry);
    }
}

async fn record(queue: &JobQueue, d: &Delivery, outcome: Outcome) -> Result<(), QueueError> {
    match outcome {
        Outcome::Done => {
            queue.complete(d).await?;
            tracing::info!(job = %d.job.id, user = %d.job.request.user_id, "job done");
            Ok(())
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
