//! One auto-reconnecting Redis connection shared by the whole process, connected in the
//! background.
//!
//! Nothing waits on a connect: `serve` starts (and `/healthz` answers) while Redis is still down,
//! and while it serves ([`RedisHandle::fail_fast`]) a caller finding no connection waits at most
//! [`FAIL_FAST_WAIT`] for an attempt already under way, or not at all once an attempt has
//! failed, then gets an error (503 `session_store_unavailable` for a request). Command-line
//! tools wait for the attempt under way ([`CONNECT_TIMEOUT`]). One connector task tries again with backoff
//! (each attempt, Sentinel lookup included, bounded by [`CONNECT_TIMEOUT`]) until it succeeds,
//! so service comes back by itself once Redis answers. After that the `ConnectionManager`
//! reconnects by itself.
//!
//! `redis.url` names one node (`redis://`, `rediss://`, `unix://`), a Sentinel deployment
//! (`redis+sentinel://`, `rediss+sentinel://`) or a Redis Cluster (`redis+cluster://`,
//! `rediss+cluster://`); see [`target`] for the syntax. With Sentinel the master is asked of the
//! sentinels, and a watchdog checks the connected node's `ROLE` every second: after a failover
//! the connection is dropped and the next use asks again. A cluster connection routes each
//! command by hash slot and follows `MOVED` redirections and failovers by itself.
//!
//! Every connection is a [`RedisConn`]; what a cluster asks of the code that uses it (one hash
//! slot per script or pipeline, `SCAN` per master) is said in `provisioning::conn`.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock, Weak,
    },
    time::Duration,
};

use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    ErrorKind, RedisError,
};
use tokio::sync::watch;

pub use provisioning::RedisConn;

use crate::config::{ConfigError, RedisConfig};

mod cluster;
mod follow;
pub mod target;

pub use cluster::{ClusterHealth, SlotRange};
pub use follow::follow_channel;
use target::Target;
pub use target::{redact, RedisTls, Topology};

/// One connect attempt (Sentinel lookup, TCP, TLS handshake, cluster topology) gives up after
/// this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A command's answer is awaited this long on the shared connection.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a caller waits for a connect attempt already under way.
pub const FAIL_FAST_WAIT: Duration = Duration::from_millis(250);
/// Pause between failed attempts: doubles from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Where the connector is.
#[derive(Debug, Clone)]
enum Link {
    /// No connection and no attempt yet.
    Idle,
    Connecting,
    Connected,
    /// The last attempt failed; the connector tries again shortly.
    Down(RedisError),
}

struct Shared {
    target: Target,
    /// `redis.url` without its password: what logs, errors and `doctor` show.
    shown_url: String,
    topology: Topology,
    tls: bool,
    /// Rotates the node a cluster's pub/sub subscription starts with.
    next_node: std::sync::atomic::AtomicUsize,
    manager: RwLock<Option<RedisConn>>,
    link: watch::Sender<Link>,
    connector: AtomicBool,
    watchdog: AtomicBool,
    fail_fast: AtomicBool,
    /// Bumped whenever the shared connection is replaced or dropped: per-core copies made
    /// before are stale.
    generation: AtomicU64,
    /// Each core runtime's own connection (see [`RedisHandle::conn`]), by core index.
    cores: RwLock<Vec<CoreConn>>,
}

/// A core runtime's connection: its driver runs on that core, so a command never wakes another
/// thread (the hot path's session lookup; see `per_core`).
#[derive(Default)]
struct CoreConn {
    manager: Option<(u64, RedisConn)>,
    connecting: bool,
    /// The last attempt failed then: the next waits [`RETRY_MAX`].
    failed_at: Option<std::time::Instant>,
}

#[derive(Clone)]
pub struct RedisHandle {
    shared: Arc<Shared>,
    prefix: Arc<str>,
}

impl std::fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only the URL without its password.
        f.debug_struct("RedisHandle")
            .field("url", &self.shared.shown_url)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisHandle {
    /// A handle on `url` with the system's trusted roots for TLS and no client certificate.
    pub fn new(url: &str, prefix: &str) -> Result<Self, ConfigError> {
        Self::with_tls(url, prefix, &RedisTls::default())
    }

    /// A handle on `redis.url` with the `[redis]` TLS files.
    pub fn from_config(cfg: &RedisConfig) -> Result<Self, ConfigError> {
        Self::with_tls(
            cfg.url.expose(),
            &cfg.key_prefix,
            &RedisTls::from_files(&cfg.tls_ca_file, &cfg.tls_cert_file, &cfg.tls_key_file)?,
        )
    }

    pub fn with_tls(url: &str, prefix: &str, tls: &RedisTls) -> Result<Self, ConfigError> {
        let (topology, uses_tls) = target::describe(url)?;
        let target = target::build(url, tls)?;
        Ok(Self {
            shared: Arc::new(Shared {
                target,
                shown_url: redact(url),
                topology,
                tls: uses_tls,
                next_node: Default::default(),
                manager: RwLock::new(None),
                link: watch::Sender::new(Link::Idle),
                connector: AtomicBool::new(false),
                watchdog: AtomicBool::new(false),
                fail_fast: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                cores: RwLock::new(Vec::new()),
            }),
            prefix: prefix.into(),
        })
    }

    /// `redis.url` without its password.
    pub fn shown_url(&self) -> &str {
        &self.shared.shown_url
    }

    pub fn topology(&self) -> Topology {
        self.shared.topology
    }

    /// Whether connections use TLS.
    pub fn uses_tls(&self) -> bool {
        self.shared.tls
    }

    /// A new subscriber connection: to the master (one node, Sentinel), or to any node of a
    /// cluster (every node delivers every `PUBLISH`), trying them in turn.
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        match &self.shared.target {
            Target::Cluster(_) => cluster::pubsub(self).await,
            _ => {
                let client = self.shared.node_client().await?;
                tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                    .await
                    .unwrap_or_else(|_| Err(not_connected("subscribe timed out")))
            }
        }
    }

    /// The `host:port` of every TLS endpoint the service talks to: the node, Sentinel's current
    /// master, or every node of a cluster (replicas included). Empty without TLS.
    pub async fn tls_endpoints(&self) -> Vec<(String, u16)> {
        if !self.shared.tls {
            return Vec::new();
        }
        let client = match &self.shared.target {
            Target::Cluster(_) => {
                let mut nodes: Vec<(String, u16)> = Vec::new();
                for range in self.cluster_slots().await.unwrap_or_default() {
                    for node in std::iter::once(range.master).chain(range.replicas) {
                        if !nodes.contains(&node) {
                            nodes.push(node);
                        }
                    }
                }
                return nodes;
            }
            _ => match self.shared.node_client().await {
                Ok(client) => client,
                Err(_) => return Vec::new(),
            },
        };
        match client.get_connection_info().addr() {
            redis::ConnectionAddr::TcpTls { host, port, .. } => vec![(host.clone(), *port)],
            _ => Vec::new(),
        }
    }

    /// A new connection of its own for blocking commands: no response timeout (the caller
    /// bounds its waits), never shared.
    pub async fn reader(&self) -> redis::RedisResult<RedisConn> {
        match &self.shared.target {
            Target::Cluster(c) => {
                tokio::time::timeout(CONNECT_TIMEOUT, c.reader.get_async_connection())
                    .await
                    .unwrap_or_else(|_| Err(not_connected("connect timed out")))
                    .map(RedisConn::Cluster)
            }
            _ => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(None);
                let client = self.shared.node_client().await?;
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(RedisConn::Dedicated)
            }
        }
    }

    /// A cheap clone of the shared connection. Without one, this starts the connector if it is
    /// not running, waits for an attempt under way (at most [`FAIL_FAST_WAIT`] once
    /// [`fail_fast`](Self::fail_fast)), and otherwise fails at once with the last attempt's error.
    ///
    /// On a core runtime (`per_core`) the connection is that core's own once it exists (made in
    /// the background from the same target); until then, and whenever the shared connection is
    /// down or replaced, the shared one.
    pub async fn conn(&self) -> redis::RedisResult<RedisConn> {
        if let Some(m) = self.shared.current() {
            let core = crate::per_core::current();
            if core > 0 {
                if let Some(own) = core_conn(&self.shared, core) {
                    return Ok(own);
                }
            }
            return Ok(m);
        }
        self.connect_in_background();
        let wait = if self.shared.fail_fast.load(Ordering::Relaxed) {
            FAIL_FAST_WAIT
        } else {
            CONNECT_TIMEOUT + Duration::from_millis(500)
        };
        let mut link = self.shared.link.subscribe();
        let settled = tokio::time::timeout(
            wait,
            link.wait_for(|l| !matches!(l, Link::Idle | Link::Connecting)),
        )
        .await;
        if let Some(m) = self.shared.current() {
            return Ok(m);
        }
        Err(match settled {
            // The last attempt's error, naming the URL (without its password): a command-line
            // tool prints it as it is.
            Ok(Ok(l)) => match &*l {
                Link::Down(e) => RedisError::from((
                    e.kind(),
                    "Redis unreachable",
                    format!("{}: {}", self.shared.shown_url, describe_error(e)),
                )),
                _ => not_connected("the connection was just dropped"),
            },
            Ok(Err(_)) => not_connected("the connector stopped"),
            Err(_) => not_connected("still connecting"),
        })
    }

    /// Starts the connector task unless it runs or a connection exists: it connects (retrying
    /// with backoff) and ends once connected. Needs a Tokio runtime.
    pub fn connect_in_background(&self) {
        kick(&self.shared);
    }

    /// For a server: callers stop waiting for a connect attempt after [`FAIL_FAST_WAIT`], so a
    /// slow or unreachable Redis costs a request a 503, not the connect timeout.
    pub fn fail_fast(&self) {
        self.shared.fail_fast.store(true, Ordering::Relaxed);
    }

    /// Whether a connection is established (it may still be failing over or reconnecting).
    pub fn is_connected(&self) -> bool {
        self.shared.current().is_some()
    }

    /// `{prefix}:{rest}`: every key this service writes.
    pub fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    pub async fn ping(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl provisioning::queue::RedisSource for RedisHandle {
    async fn shared(&self) -> redis::RedisResult<RedisConn> {
        self.conn().await
    }

    async fn reader(&self) -> redis::RedisResult<RedisConn> {
        RedisHandle::reader(self).await
    }
}

fn not_connected(detail: &str) -> RedisError {
    RedisError::from((ErrorKind::Io, "Redis is not connected", detail.to_owned()))
}

/// A Redis error with its causes (a TLS verdict is in the `io::Error` inside). Redis errors
/// never carry the URL or its password.
pub fn describe_error(e: &RedisError) -> String {
    crate::tls::error_chain(e)
}

impl Shared {
    fn current(&self) -> Option<RedisConn> {
        self.manager
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_manager(&self, manager: Option<RedisConn>) {
        *self.manager.write().unwrap_or_else(|p| p.into_inner()) = manager;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// A client for the one node (with Sentinel: the master, asked of the sentinels within
    /// [`CONNECT_TIMEOUT`]); not for a cluster.
    async fn node_client(&self) -> redis::RedisResult<redis::Client> {
        match &self.target {
            Target::Direct(client) => Ok(client.clone()),
            Target::Sentinel(sentinel) => tokio::time::timeout(CONNECT_TIMEOUT, async {
                sentinel.lock().await.async_get_client().await
            })
            .await
            .unwrap_or_else(|_| Err(not_connected("the sentinels did not answer in time"))),
            Target::Cluster(_) => Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "a cluster has no single node",
            ))),
        }
    }

    /// One attempt: the master's address (Sentinel) or the cluster's topology, and a
    /// connection, within [`CONNECT_TIMEOUT`] in all.
    async fn connect_once(&self) -> redis::RedisResult<RedisConn> {
        let attempt = async {
            match &self.target {
                Target::Cluster(c) => c
                    .shared
                    .get_async_connection()
                    .await
                    .map(RedisConn::Cluster),
                _ => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(CONNECT_TIMEOUT))
                        .set_response_timeout(Some(RESPONSE_TIMEOUT))
                        .set_number_of_retries(2)
                        .set_max_delay(Duration::from_millis(500));
                    ConnectionManager::new_with_config(self.node_client().await?, config)
                        .await
                        .map(RedisConn::Node)
                }
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err(not_connected("connect timed out")))
    }
}

/// Starts the connector unless it runs or a connection exists.
fn kick(shared: &Arc<Shared>) {
    if shared.current().is_some() || shared.connector.swap(true, Ordering::SeqCst) {
        return;
    }
    tokio::spawn(connector(Arc::downgrade(shared)));
}

/// Connects, retrying with backoff, until connected or the handle is gone.
async fn connector(weak: Weak<Shared>) {
    let mut pause = RETRY_FIRST;
    let mut warned = false;
    loop {
        let Some(shared) = weak.upgrade() else { return };
        shared.link.send_replace(Link::Connecting);
        match shared.connect_once().await {
            Ok(manager) => {
                shared.set_manager(Some(manager));
                shared.link.send_replace(Link::Connected);
                if warned {
                    tracing::info!("Redis is reachable again");
                }
                start_watchdog(&shared);
                shared.connector.store(false, Ordering::SeqCst);
                // The watchdog may have dropped the connection meanwhile, and found us running.
                if shared.current().is_none() {
                    kick(&shared);
                }
                return;
            }
            Err(e) => {
                if warned {
                    tracing::debug!(url = %shared.shown_url, error = %describe_error(&e), "Redis still unreachable");
                } else if crate::tls::is_tls_failure(&e) {
                    // Not an outage: the configuration does not fit the server's certificate.
                    tracing::error!(
                        url = %shared.shown_url,
                        error = %describe_error(&e),
                        "Redis TLS handshake failed: the server's certificate is not trusted or                          does not name the host (check redis.tls_ca_file and the host in                          redis.url); retrying in the background"
                    );
                    warned = true;
                } else {
                    tracing::warn!(url = %shared.shown_url, error = %describe_error(&e), "Redis unreachable; retrying in the background");
                    warned = true;
                }
                shared.link.send_replace(Link::Down(e));
            }
        }
        drop(shared);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// With Sentinel: drop the connection when the node it reaches stops being the master; the
/// next use asks the sentinels again.
fn start_watchdog(shared: &Arc<Shared>) {
    if !matches!(shared.target, Target::Sentinel(_)) || shared.watchdog.swap(true, Ordering::SeqCst)
    {
        return;
    }
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(shared) = weak.upgrade() else { return };
            let Some(mut conn) = shared.current() else {
                continue;
            };
            let role: redis::RedisResult<redis::Value> =
                tokio::time::timeout(CONNECT_TIMEOUT, redis::cmd("ROLE").query_async(&mut conn))
                    .await
                    .unwrap_or_else(|_| Err(not_connected("ROLE timed out")));
            let is_master = matches!(
                &role,
                Ok(redis::Value::Array(items))
                    if matches!(items.first(), Some(redis::Value::BulkString(r)) if r == b"master")
            );
            if !is_master {
                tracing::warn!(
                    "Redis node is no longer the master (failover?): asking Sentinel again"
                );
                shared.set_manager(None);
                shared.link.send_replace(Link::Idle);
                kick(&shared);
            }
        }
    });
}

/// This core's own connection if it is current; otherwise starts making one (on this core, so
/// its driver runs here) and answers `None` meanwhile.
fn core_conn(shared: &Arc<Shared>, core: usize) -> Option<RedisConn> {
    let generation = shared.generation.load(Ordering::SeqCst);
    {
        let cores = shared.cores.read().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = cores.get(core) {
            match &slot.manager {
                Some((g, m)) if *g == generation => return Some(m.clone()),
                _ if slot.connecting => return None,
                _ if slot.failed_at.is_some_and(|t| t.elapsed() < RETRY_MAX) => return None,
                _ => {}
            }
        }
    }
    {
        let mut cores = shared.cores.write().unwrap_or_else(|p| p.into_inner());
        if cores.len() <= core {
            cores.resize_with(core + 1, CoreConn::default);
        }
        let slot = &mut cores[core];
        if slot.connecting || slot.failed_at.is_some_and(|t| t.elapsed() < RETRY_MAX) {
            return None;
        }
        slot.connecting = true;
        slot.manager = None;
    }
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        let Some(shared) = weak.upgrade() else { return };
        let made = shared.connect_once().await;
        let mut cores = shared.cores.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = cores.get_mut(core) {
            slot.connecting = false;
            match made {
                // Made against the target as it was when asked; if the shared connection was
                // replaced since, the next use makes another.
                Ok(m) => {
                    slot.manager = Some((generation, m));
                    slot.failed_at = None;
                }
                Err(e) => {
                    slot.failed_at = Some(std::time::Instant::now());
                    tracing::debug!(error = %e, core, "per-core Redis connection failed; using the shared one");
                }
            }
        }
    });
    None
}
