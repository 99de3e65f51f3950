//! One lazily connected, auto-reconnecting Redis connection shared by the whole process.
//!
//! Lazy so `serve` starts (and `/healthz` answers) while Redis is still down; requests that need
//! Redis then fail with 503 and recover by themselves once it is back.
//!
//! `redis.url` is a plain endpoint (`redis://`, `unix://`) or Sentinel
//! (`redis+sentinel://[:password@]host:port[,host:port…]/<master name>[/<db>]`). With Sentinel the
//! master is asked of the sentinels, and a watchdog checks the connected node's `ROLE` every
//! second: after a failover the connection is dropped and the next use asks again.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
    RedisConnectionInfo,
};
use tokio::sync::{Mutex, RwLock};

use crate::config::ConfigError;

enum Target {
    Direct(redis::Client),
    Sentinel(Mutex<SentinelClient>),
}

#[derive(Clone)]
pub struct RedisHandle {
    target: Arc<Target>,
    manager: Arc<RwLock<Option<ConnectionManager>>>,
    watchdog: Arc<AtomicBool>,
    prefix: Arc<str>,
}

impl std::fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never print it.
        f.debug_struct("RedisHandle")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn invalid(reason: String) -> ConfigError {
    ConfigError::Invalid {
        key: "redis.url".into(),
        reason,
    }
}

/// Parses `redis+sentinel://[:password@]h1:p1[,h2:p2…]/<master>[/<db>]`.
fn sentinel_client(url: &str) -> Result<SentinelClient, ConfigError> {
    let rest = url
        .strip_prefix("redis+sentinel://")
        .ok_or_else(|| invalid("not a redis+sentinel:// URL".into()))?;
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (Some(auth), rest),
        None => (None, rest),
    };
    let (hosts, path) = rest
        .split_once('/')
        .ok_or_else(|| invalid("a Sentinel URL needs /<master name> after the hosts".into()))?;
    let mut path = path.split('/');
    let master = path
        .next()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid("a Sentinel URL needs /<master name> after the hosts".into()))?;
    let db: i64 = match path.next().filter(|d| !d.is_empty()) {
        Some(d) => d
            .parse()
            .map_err(|_| invalid(format!("`{d}` is not a database number")))?,
        None => 0,
    };
    let sentinels: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("redis://{h}"))
        .collect();
    if sentinels.is_empty() {
        return Err(invalid(
            "a Sentinel URL needs at least one host:port".into(),
        ));
    }
    let mut info = RedisConnectionInfo::default().set_db(db);
    if let Some(auth) = auth {
        let (user, password) = auth.split_once(':').unwrap_or(("", auth));
        if !user.is_empty() {
            info = info.set_username(user);
        }
        if !password.is_empty() {
            info = info.set_password(password);
        }
    }
    let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
    SentinelClient::build(
        sentinels,
        master.to_owned(),
        Some(node),
        SentinelServerType::Master,
    )
    .map_err(|e| invalid(format!("not a Sentinel URL ({:?})", e.kind())))
}

impl RedisHandle {
    pub fn new(url: &str, prefix: &str) -> Result<Self, ConfigError> {
        let target = if url.starts_with("redis+sentinel://") {
            Target::Sentinel(Mutex::new(sentinel_client(url)?))
        } else {
            Target::Direct(
                redis::Client::open(url)
                    .map_err(|e| invalid(format!("not a Redis URL ({:?})", e.kind())))?,
            )
        };
        Ok(Self {
            target: Arc::new(target),
            manager: Arc::new(RwLock::new(None)),
            watchdog: Arc::new(AtomicBool::new(false)),
            prefix: prefix.into(),
        })
    }

    /// A client for the current master.
    pub async fn client(&self) -> redis::RedisResult<redis::Client> {
        match &*self.target {
            Target::Direct(client) => Ok(client.clone()),
            Target::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
        }
    }

    /// A cheap clone of the shared connection; connects on first use.
    pub async fn conn(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(m) = self.manager.read().await.as_ref() {
            return Ok(m.clone());
        }
        let mut slot = self.manager.write().await;
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(3)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_with_config(self.client().await?, config).await?;
        *slot = Some(manager.clone());
        drop(slot);
        self.start_watchdog();
        Ok(manager)
    }

    /// With Sentinel: drop the connection when the node it reaches stops being the master.
    fn start_watchdog(&self) {
        if !matches!(*self.target, Target::Sentinel(_))
            || self.watchdog.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let slot = Arc::downgrade(&self.manager);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(slot) = slot.upgrade() else { return };
                let current = slot.read().await.clone();
                let Some(mut conn) = current else { continue };
                let role: redis::RedisResult<redis::Value> =
                    redis::cmd("ROLE").query_async(&mut conn).await;
                let is_master = matches!(
                    &role,
                    Ok(redis::Value::Array(items))
                        if matches!(items.first(), Some(redis::Value::BulkString(r)) if r == b"master")
                );
                if !is_master {
                    tracing::warn!(
                        "Redis node is no longer the master (failover?): asking Sentinel again"
                    );
                    *slot.write().await = None;
                }
            }
        });
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
    async fn manager(&self) -> redis::RedisResult<ConnectionManager> {
        self.conn().await
    }

    async fn client(&self) -> redis::RedisResult<redis::Client> {
        RedisHandle::client(self).await
    }
}
