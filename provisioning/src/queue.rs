//! A durable job queue on Redis Streams.
//!
//! - `{P}:jobs` — stream read by the consumer group `workers`: at-least-once delivery; a job
//!   whose worker died stays in the group's pending list and is reclaimed (`XAUTOCLAIM`) after
//!   the visibility timeout.
//! - `{P}:delayed` — ZSET of job ids by due time (retries with backoff), moved back to the
//!   stream when due.
//! - `{P}:dead` — dead-letter stream (job id, reason) that ops list and retry.
//! - `{P}:job:{id}` — the job document (JSON); `{P}:user:{user id}` — the user's active job
//!   (one pending job per user: the idempotency key); `{P}:done` — recent completions (trimmed).
//!
//! Leases: a worker renews its claim on a delivery while the job runs ([`JobQueue::renew`]), so a
//! job outliving the visibility timeout is not handed to a second worker, and every state change
//! of a delivery (complete, retry, bury) is fenced by owner: it acts only while the group's
//! pending list says the caller's consumer holds the entry, so a worker that lost its delivery
//! cannot resurrect or overwrite the job. Consumers without pending entries are deleted when
//! their worker stops or once idle for [`JobQueue::consumer_expiry`].
//!
//! `P` is `{<prefix>:prov}`: one hash tag, so every multi-key script stays in one Redis Cluster
//! slot. Acked entries are deleted from the stream and finished jobs expire: nothing grows
//! without bound. Durability across a Redis restart is Redis's: run it with `appendonly yes`.
//!
//! The Lua scripts that make each state change atomic are in `scripts.rs`; this module decides
//! when to run them.

use std::time::Duration;

use std::sync::Arc;

use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    streams::{StreamAutoClaimReply, StreamReadOptions, StreamReadReply},
    AsyncCommands, AsyncConnectionConfig,
};
use serde::{Deserialize, Serialize};

use crate::{conn::RedisConn, scripts};

pub const GROUP: &str = "workers";

/// How long a blocking read may overrun its `block` before the reader connection is deemed dead.
const READ_GRACE: Duration = Duration::from_secs(5);

/// A consumer without pending entries is deleted once idle this many visibility timeouts.
const CONSUMER_EXPIRY_FACTOR: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("job {0} is corrupt")]
    Corrupt(String),
    #[error("no job {0}")]
    NotFound(String),
    /// The delivery is no longer held by this consumer (its lease lapsed and another worker
    /// took it over, or it was finished meanwhile): nothing was changed.
    #[error("job {job}: entry {entry} is no longer held by consumer {consumer}")]
    NotOwner {
        job: String,
        entry: String,
        consumer: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Delayed,
    Done,
    Dead,
    /// Withdrawn before it finished (the user was deactivated): never runs again, and a worker
    /// still running it cannot record another outcome.
    Cancelled,
}

impl JobState {
    pub fn is_active(self) -> bool {
        matches!(self, Self::Pending | Self::Running | Self::Delayed)
    }
}

/// What a job asks for: create (or repair) the LibreChat account of one user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProvisionRequest {
    pub user_id: String,
    pub email: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Where it came from: `admin`, `cli`, `webhook`, `import`, `login`, `repair`.
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub request: ProvisionRequest,
    pub state: JobState,
    /// Attempts spent (rate-limit waits do not spend one).
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    #[serde(default)]
    pub next_run_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Key prefix (the service's `redis.key_prefix`).
    pub prefix: String,
    /// A job held this long by a silent worker is given to another.
    pub visibility_timeout: Duration,
    pub max_attempts: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Finished job documents are kept this long (for `GET /admin/users/{id}`), then expire.
    pub keep_finished: Duration,
    /// How many recent completions `{P}:done` lists.
    pub keep_done: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            prefix: "bff".into(),
            visibility_timeout: Duration::from_secs(60),
            max_attempts: 8,
            base_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(300),
            keep_finished: Duration::from_secs(7 * 24 * 3600),
            keep_done: 1000,
        }
    }
}

/// A job handed to a worker: the document, its stream entry and the consumer holding it (every
/// outcome is recorded on behalf of that consumer, and refused once it no longer holds it).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub job: Job,
    pub entry_id: String,
    pub consumer: String,
}

/// Where the queue gets its Redis connections. The service passes its own handle (a single node,
/// Sentinel's current master, or a Redis Cluster); [`JobQueue::new`] takes a plain
/// [`redis::Client`].
#[async_trait::async_trait]
pub trait RedisSource: Send + Sync + 'static {
    /// The shared, auto-reconnecting connection.
    async fn shared(&self) -> redis::RedisResult<RedisConn>;
    /// A new connection of its own for blocking reads: no response timeout (the reader bounds
    /// its own waits), never shared with other commands.
    async fn reader(&self) -> redis::RedisResult<RedisConn>;
}

/// A plain client: one endpoint, connected on first use.
struct DirectSource {
    client: redis::Client,
    manager: tokio::sync::OnceCell<ConnectionManager>,
}

#[async_trait::async_trait]
impl RedisSource for DirectSource {
    async fn shared(&self) -> redis::RedisResult<RedisConn> {
        let manager = self
            .manager
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(5)))
                    .set_number_of_retries(2);
                ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await?;
        Ok(RedisConn::Node(manager.clone()))
    }

    async fn reader(&self) -> redis::RedisResult<RedisConn> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(None);
        Ok(RedisConn::Dedicated(
            self.client
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        ))
    }
}

#[derive(Clone)]
pub struct JobQueue {
    source: Arc<dyn RedisSource>,
    /// Whether the consumer group is known to exist (checked once per process; a vanished group
    /// is recreated by `read`).
    group_ready: Arc<tokio::sync::OnceCell<()>>,
    cfg: QueueConfig,
    tag: String,
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue").field("tag", &self.tag).finish()
    }
}

fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP")
}

async fn create_group(conn: &mut RedisConn, stream: &str) -> Result<(), QueueError> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.to_string().contains("BUSYGROUP") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl JobQueue {
    /// A queue on `client`; nothing is contacted until first use.
    pub fn new(client: redis::Client, cfg: QueueConfig) -> Self {
        Self::with_source(
            Arc::new(DirectSource {
                client,
                manager: tokio::sync::OnceCell::new(),
            }),
            cfg,
        )
    }

    /// A queue on connections from `source`.
    pub fn with_source(source: Arc<dyn RedisSource>, cfg: QueueConfig) -> Self {
        let tag = format!("{{{}:prov}}", cfg.prefix);
        Self {
            source,
            group_ready: Arc::new(tokio::sync::OnceCell::new()),
            cfg,
            tag,
        }
    }

    /// The shared connection; the first use also makes sure the consumer group exists.
    async fn conn(&self) -> Result<RedisConn, QueueError> {
        let conn = self.source.shared().await?;
        let stream = self.stream();
        self.group_ready
            .get_or_try_init(|| async { create_group(&mut conn.clone(), &stream).await })
            .await?;
        Ok(conn)
    }

    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    fn k(&self, rest: &str) -> String {
        format!("{}:{rest}", self.tag)
    }
    fn stream(&self) -> String {
        self.k("jobs")
    }
    fn delayed(&self) -> String {
        self.k("delayed")
    }
    fn dead(&self) -> String {
        self.k("dead")
    }
    fn done(&self) -> String {
        self.k("done")
    }
    fn job_key(&self, id: &str) -> String {
        self.k(&format!("job:{id}"))
    }
    fn user_key(&self, user_id: &str) -> String {
        self.k(&format!("user:{user_id}"))
    }

    async fn ensure_group(&self) -> Result<(), QueueError> {
        let mut conn = self.conn().await?;
        create_group(&mut conn, &self.stream()).await
    }

    /// Enqueues provisioning for a user; if the user already has an active job, returns that
    /// job's id instead (`created == false`).
    pub async fn enqueue(&self, request: ProvisionRequest) -> Result<(String, bool), QueueError> {
        let id = uuid::Uuid::new_v4().to_string();
        let t = now();
        let job = Job {
            id: id.clone(),
            request,
            state: JobState::Pending,
            attempts: 0,
            last_error: None,
            created_at: t,
            updated_at: t,
            next_run_at: None,
        };
        let json = serde_json::to_string(&job).map_err(|_| QueueError::Corrupt(id.clone()))?;
        let mut conn = self.conn().await?;
        let (created, job_id): (i64, String) = scripts::ENQUEUE
            .key(self.user_key(&job.request.user_id))
            .key(self.job_key(&id))
            .key(self.stream())
            .arg(&id)
            .arg(json)
            .invoke_async(&mut conn)
            .await?;
        Ok((job_id, created == 1))
    }

    pub async fn job(&self, id: &str) -> Result<Option<Job>, QueueError> {
        let mut conn = self.conn().await?;
        let raw: Option<String> = conn.get(self.job_key(id)).await?;
        raw.map(|r| serde_json::from_str(&r).map_err(|_| QueueError::Corrupt(id.to_owned())))
            .transpose()
    }

    /// The user's active job id, if any.
    pub async fn active_job_of(&self, user_id: &str) -> Result<Option<String>, QueueError> {
        let mut conn = self.conn().await?;
        Ok(conn.get(self.user_key(user_id)).await?)
    }

    /// Up to `count` new deliveries for `consumer`, waiting at most `block` for one.
    /// Needs its own connection: a blocking read would stall the shared one.
    pub async fn read(
        &self,
        conn: &mut RedisConn,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let opts = StreamReadOptions::default()
            .group(GROUP, consumer)
            .count(count)
            .block(block.as_millis() as usize);
        // The reader connection has no response timeout of its own (it would cut blocking
        // reads short and strand what Redis delivered meanwhile), so bound the wait here.
        let reply = tokio::time::timeout(
            block + READ_GRACE,
            conn.xread_options::<_, _, Option<StreamReadReply>>(&[self.stream()], &[">"], &opts),
        )
        .await
        .map_err(|_| {
            redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer to a blocking stream read",
            ))
        })?;
        let reply: Option<StreamReadReply> = match reply {
            Ok(r) => r,
            Err(e) if e.to_string().contains("NOGROUP") => {
                // The stream vanished (Redis restarted without persistence): recreate.
                self.ensure_group().await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                let job_id: Option<String> = entry.get("job");
                out.extend(self.deliver(consumer, entry.id, job_id).await?);
            }
        }
        Ok(out)
    }

    /// A dedicated connection for [`JobQueue::read`] (on a cluster, a cluster connection of its
    /// own). It has no response timeout: the client's default (500 ms) would fail any read
    /// blocking longer than that; `read` bounds its own wait.
    pub async fn reader_connection(&self) -> Result<RedisConn, QueueError> {
        Ok(self.source.reader().await?)
    }

    /// Takes over deliveries idle longer than the visibility timeout (their worker died).
    pub async fn reclaim(&self, consumer: &str, count: usize) -> Result<Vec<Delivery>, QueueError> {
        Ok(self.reclaim_from(consumer, count, "0-0").await?.0)
    }

    /// [`JobQueue::reclaim`] from a cursor: XAUTOCLAIM examines a bounded slice of the pending
    /// list per call, so a worker walks it with the returned cursor (back to `0-0` at the end)
    /// instead of rescanning the same head every time.
    pub async fn reclaim_from(
        &self,
        consumer: &str,
        count: usize,
        cursor: &str,
    ) -> Result<(Vec<Delivery>, String), QueueError> {
        let mut conn = self.conn().await?;
        let reply: redis::RedisResult<StreamAutoClaimReply> = redis::cmd("XAUTOCLAIM")
            .arg(self.stream())
            .arg(GROUP)
            .arg(consumer)
            .arg(self.cfg.visibility_timeout.as_millis() as u64)
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) if is_nogroup(&e) => {
                // The stream vanished (Redis restarted without persistence): recreate.
                self.ensure_group().await?;
                return Ok((Vec::new(), "0-0".to_owned()));
            }
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in reply.claimed {
            let job_id: Option<String> = entry.get("job");
            tracing::info!(entry = %entry.id, job = ?job_id, %consumer, "reclaimed a job whose lease lapsed");
            out.extend(self.deliver(consumer, entry.id, job_id).await?);
        }
        Ok((out, reply.next_stream_id))
    }

    /// Turns an entry just handed to `consumer` into a delivery: the job is marked running, or
    /// the entry dropped when its job is gone or finished.
    async fn deliver(
        &self,
        consumer: &str,
        entry_id: String,
        job_id: Option<String>,
    ) -> Result<Option<Delivery>, QueueError> {
        let mut conn = self.conn().await?;
        let Some(id) = job_id else {
            // Not a job entry: drop it.
            let _: () = redis::pipe()
                .xack(self.stream(), GROUP, &[&entry_id])
                .xdel(self.stream(), &[&entry_id])
                .query_async(&mut conn)
                .await?;
            return Ok(None);
        };
        let raw: Option<String> = scripts::DELIVER
            .key(self.stream())
            .key(self.job_key(&id))
            .arg(&entry_id)
            .arg(GROUP)
            .arg(consumer)
            .arg(now())
            .invoke_async(&mut conn)
            .await?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let job: Job = serde_json::from_str(&raw).map_err(|_| QueueError::Corrupt(id))?;
        Ok(Some(Delivery {
            job,
            entry_id,
            consumer: consumer.to_owned(),
        }))
    }

    /// Renews the lease on a delivery: resets its idle time so that no other worker reclaims it
    /// while its job runs. `false`: the delivery's consumer no longer holds it (another worker
    /// took it over, or it was finished); nothing was changed.
    pub async fn renew(&self, d: &Delivery) -> Result<bool, QueueError> {
        let mut conn = self.conn().await?;
        let renewed: i64 = scripts::RENEW
            .key(self.stream())
            .arg(&d.entry_id)
            .arg(GROUP)
            .arg(&d.consumer)
            .invoke_async(&mut conn)
            .await?;
        Ok(renewed == 1)
    }

    /// How long a consumer holding nothing may stay idle before [`JobQueue::delete_idle_consumers`]
    /// deletes it: ten visibility timeouts.
    pub fn consumer_expiry(&self) -> Duration {
        self.cfg
            .visibility_timeout
            .saturating_mul(CONSUMER_EXPIRY_FACTOR)
    }

    /// Deletes `consumer` from the group unless it holds pending entries (a stopping worker's
    /// own). Returns whether it was deleted.
    pub async fn release_consumer(&self, consumer: &str) -> Result<bool, QueueError> {
        let mut conn = self.conn().await?;
        let released: i64 = scripts::RELEASE_CONSUMER
            .key(self.stream())
            .arg(GROUP)
            .arg(consumer)
            .invoke_async(&mut conn)
            .await?;
        Ok(released == 1)
    }

    /// Deletes the consumers that hold no pending entries and have been idle longer than
    /// `idle_for` (left behind by processes that did not stop cleanly). Returns their names.
    pub async fn delete_idle_consumers(
        &self,
        idle_for: Duration,
    ) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn().await?;
        let deleted: redis::RedisResult<Vec<String>> = scripts::DELETE_IDLE_CONSUMERS
            .key(self.stream())
            .arg(GROUP)
            .arg(idle_for.as_millis() as u64)
            .invoke_async(&mut conn)
            .await;
        match deleted {
            Ok(names) => Ok(names),
            Err(e) if is_nogroup(&e) => {
                self.ensure_group().await?;
                Ok(Vec::new())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The fence's verdict on an outcome script's answer.
    fn fenced(d: &Delivery, answer: i64) -> Result<(), QueueError> {
        if answer < 0 {
            return Err(QueueError::NotOwner {
                job: d.job.id.clone(),
                entry: d.entry_id.clone(),
                consumer: d.consumer.clone(),
            });
        }
        Ok(())
    }

    /// Moves due delayed jobs back to the stream. Returns how many.
    pub async fn promote_due(&self) -> Result<usize, QueueError> {
        let mut conn = self.conn().await?;
        let due: Vec<String> = conn
            .zrangebyscore_limit(self.delayed(), "-inf", now_ms(), 0, 100)
            .await?;
        let mut moved = 0;
        for id in due {
            let n: i64 = scripts::PROMOTE
                .key(self.delayed())
                .key(self.stream())
                .key(self.job_key(&id))
                .arg(&id)
                .invoke_async(&mut conn)
                .await?;
            moved += n as usize;
        }
        Ok(moved)
    }

    /// Records the job done. [`QueueError::NotOwner`] (and nothing changed) when the delivery's
    /// consumer no longer holds it.
    pub async fn complete(&self, d: &Delivery) -> Result<(), QueueError> {
        let mut job = d.job.clone();
        job.state = JobState::Done;
        job.updated_at = now();
        job.next_run_at = None;
        let json = serde_json::to_string(&job).map_err(|_| QueueError::Corrupt(job.id.clone()))?;
        let mut conn = self.conn().await?;
        let answer: i64 = scripts::COMPLETE
            .key(self.stream())
            .key(self.job_key(&job.id))
            .key(self.user_key(&job.request.user_id))
            .key(self.done())
            .arg(&d.entry_id)
            .arg(GROUP)
            .arg(json)
            .arg(&job.id)
            .arg(self.cfg.keep_done)
            .arg(self.cfg.keep_finished.as_secs().max(1))
            .arg(&d.consumer)
            .invoke_async(&mut conn)
            .await?;
        Self::fenced(d, answer)
    }

    /// Schedules another run after `delay`; `spend_attempt` false for waits imposed by a rate
    /// limiter. Buries the job instead when attempts are used up. [`QueueError::NotOwner`] (and
    /// nothing changed) when the delivery's consumer no longer holds it.
    pub async fn retry(
        &self,
        d: &Delivery,
        error: String,
        delay: Option<Duration>,
        spend_attempt: bool,
    ) -> Result<JobState, QueueError> {
        let mut job = d.job.clone();
        if spend_attempt {
            job.attempts += 1;
        }
        if job.attempts >= self.cfg.max_attempts {
            let reason = format!("gave up after {} attempts: {error}", job.attempts);
            self.bury_job(d, job, reason).await?;
            return Ok(JobState::Dead);
        }
        let delay = delay.unwrap_or_else(|| self.backoff(job.attempts));
        let due_ms = now_ms() + delay.as_millis() as u64;
        job.state = JobState::Delayed;
        job.last_error = Some(error);
        job.updated_at = now();
        job.next_run_at = Some((due_ms / 1000) as i64);
        let json = serde_json::to_string(&job).map_err(|_| QueueError::Corrupt(job.id.clone()))?;
        let mut conn = self.conn().await?;
        let answer: i64 = scripts::DELAY
            .key(self.stream())
            .key(self.job_key(&job.id))
            .key(self.delayed())
            .arg(&d.entry_id)
            .arg(GROUP)
            .arg(json)
            .arg(&job.id)
            .arg(due_ms)
            .arg(&d.consumer)
            .invoke_async(&mut conn)
            .await?;
        Self::fenced(d, answer)?;
        Ok(JobState::Delayed)
    }

    /// Exponential backoff with jitter: 50–100 % of `base · 2^(attempt-1)`, capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .cfg
            .base_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.cfg.max_backoff);
        let jitter: f64 = rand::random_range(0.5..=1.0);
        capped.mul_f64(jitter)
    }

    /// Dead-letters the job with `reason`. [`QueueError::NotOwner`] (and nothing changed) when
    /// the delivery's consumer no longer holds it.
    pub async fn bury(&self, d: &Delivery, reason: String) -> Result<(), QueueError> {
        self.bury_job(d, d.job.clone(), reason).await
    }

    async fn bury_job(&self, d: &Delivery, mut job: Job, reason: String) -> Result<(), QueueError> {
        job.state = JobState::Dead;
        job.last_error = Some(reason.clone());
        job.updated_at = now();
        job.next_run_at = None;
        let json = serde_json::to_string(&job).map_err(|_| QueueError::Corrupt(job.id.clone()))?;
        let mut conn = self.conn().await?;
        let answer: i64 = scripts::BURY
            .key(self.stream())
            .key(self.job_key(&job.id))
            .key(self.dead())
            .key(self.user_key(&job.request.user_id))
            .arg(&d.entry_id)
            .arg(GROUP)
            .arg(json)
            .arg(&job.id)
            .arg(reason)
            .arg(now())
            .arg(self.cfg.keep_finished.as_secs().max(1))
            .arg(&d.consumer)
            .invoke_async(&mut conn)
            .await?;
        Self::fenced(d, answer)?;
        if answer == 1 {
            tracing::warn!(job = %job.id, user = %job.request.user_id, "job dead-lettered");
        }
        Ok(())
    }

    /// Withdraws the user's active job (pending, delayed or running), if any: it will not run
    /// again, and a worker running it now cannot record an outcome. Returns the job id.
    pub async fn cancel_user(
        &self,
        user_id: &str,
        reason: &str,
    ) -> Result<Option<String>, QueueError> {
        let Some(id) = self.active_job_of(user_id).await? else {
            return Ok(None);
        };
        let mut conn = self.conn().await?;
        let cancelled: i64 = scripts::CANCEL
            .key(self.user_key(user_id))
            .key(self.job_key(&id))
            .key(self.delayed())
            .arg(&id)
            .arg(reason)
            .arg(now())
            .arg(self.cfg.keep_finished.as_secs().max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok((cancelled == 1).then_some(id))
    }

    /// Runs a dead (or finished) job again with fresh attempts. If the user meanwhile has another
    /// active job, that one's id is returned and nothing is queued.
    pub async fn requeue(&self, id: &str) -> Result<String, QueueError> {
        let mut job = self
            .job(id)
            .await?
            .ok_or_else(|| QueueError::NotFound(id.to_owned()))?;
        if job.state.is_active() {
            return Ok(job.id);
        }
        job.state = JobState::Pending;
        job.attempts = 0;
        job.updated_at = now();
        job.next_run_at = None;
        let json = serde_json::to_string(&job).map_err(|_| QueueError::Corrupt(job.id.clone()))?;
        let mut conn = self.conn().await?;
        let (_, active): (i64, String) = scripts::REQUEUE
            .key(self.job_key(&job.id))
            .key(self.user_key(&job.request.user_id))
            .key(self.stream())
            .arg(&job.id)
            .arg(json)
            .invoke_async(&mut conn)
            .await?;
        Ok(active)
    }

    /// Jobs in one state, newest first where that is cheap (at most `limit`).
    pub async fn list(&self, state: JobState, limit: usize) -> Result<Vec<Job>, QueueError> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = match state {
            JobState::Dead => {
                let reply: redis::streams::StreamRangeReply =
                    conn.xrevrange_count(self.dead(), "+", "-", limit).await?;
                reply
                    .ids
                    .into_iter()
                    .filter_map(|e| e.get::<String>("job"))
                    .collect()
            }
            JobState::Delayed => conn.zrange(self.delayed(), 0, limit as isize - 1).await?,
            JobState::Done => conn.lrange(self.done(), 0, limit as isize - 1).await?,
            // Not indexed: a cancelled job is found through its user.
            JobState::Cancelled => Vec::new(),
            JobState::Pending | JobState::Running => {
                let reply: redis::streams::StreamRangeReply =
                    conn.xrange_count(self.stream(), "-", "+", limit).await?;
                reply
                    .ids
                    .into_iter()
                    .filter_map(|e| e.get::<String>("job"))
                    .collect()
            }
        };
        let mut jobs = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for id in ids {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(job) = self.job(&id).await? {
                if job.state == state {
                    jobs.push(job);
                }
            }
        }
        Ok(jobs)
    }

    /// Queue depth (entries in the stream), delayed count and dead-letter size.
    pub async fn sizes(&self) -> Result<(u64, u64, u64), QueueError> {
        let mut conn = self.conn().await?;
        let (depth, delayed, dead): (u64, u64, u64) = redis::pipe()
            .xlen(self.stream())
            .zcard(self.delayed())
            .xlen(self.dead())
            .query_async(&mut conn)
            .await?;
        Ok((depth, delayed, dead))
    }
}
