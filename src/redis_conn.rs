//! One lazily connected, auto-reconnecting Redis connection shared by the whole process.
//!
//! Lazy so `serve` starts (and `/healthz` answers) while Redis is still down; requests that need
//! Redis then fail with 503 and recover by themselves once it is back.

use std::{sync::Arc, time::Duration};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use crate::config::ConfigError;

#[derive(Clone)]
pub struct RedisHandle {
    client: redis::Client,
    manager: Arc<OnceCell<ConnectionManager>>,
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

impl RedisHandle {
    pub fn new(url: &str, prefix: &str) -> Result<Self, ConfigError> {
        let client = redis::Client::open(url).map_err(|e| ConfigError::Invalid {
            key: "redis.url".into(),
            reason: format!("not a Redis URL ({:?})", e.kind()),
        })?;
        Ok(Self {
            client,
            manager: Arc::new(OnceCell::new()),
            prefix: prefix.into(),
        })
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// A cheap clone of the shared connection; connects on first use.
    pub async fn conn(&self) -> redis::RedisResult<ConnectionManager> {
        let manager = self
            .manager
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(3)))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await?;
        Ok(manager.clone())
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
