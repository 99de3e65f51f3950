//! Single-flight locks: in-process per key, and across replicas with a Redis lock
//! (`SET key token NX PX ttl`, released only by its owner).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::redis_conn::RedisHandle;

/// Per-key async mutexes; entries vanish when nobody holds or waits for them.
#[derive(Default, Debug)]
pub struct LocalLocks {
    map: Mutex<HashMap<String, Weak<AsyncMutex<()>>>>,
}

impl LocalLocks {
    pub async fn lock(&self, key: &str) -> OwnedMutexGuard<()> {
        let mutex = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 1024 {
                map.retain(|_, w| w.strong_count() > 0);
            }
            match map.get(key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(AsyncMutex::new(()));
                    map.insert(key.to_owned(), Arc::downgrade(&m));
                    m
                }
            }
        };
        mutex.lock_owned().await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("lock `{0}` still held by another replica after the wait bound")]
    Timeout(String),
}

/// A held Redis lock. Release it with [`RedisLock::release`]; if dropped, it expires by its TTL.
pub struct RedisLock {
    redis: RedisHandle,
    key: String,
    token: String,
}

const RELEASE: &str = r#"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"#;

impl RedisLock {
    /// Waits up to `wait` for the lock `key`, which expires after `ttl` if its holder dies.
    pub async fn acquire(
        redis: &RedisHandle,
        key: String,
        ttl: Duration,
        wait: Duration,
    ) -> Result<RedisLock, LockError> {
        let token = uuid::Uuid::new_v4().to_string();
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(5);
        loop {
            let mut conn = redis.conn().await?;
            let got: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async(&mut conn)
                .await?;
            if got.is_some() {
                return Ok(RedisLock {
                    redis: redis.clone(),
                    key,
                    token,
                });
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(LockError::Timeout(key));
            }
            // Another replica holds it; it will finish within its TTL.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    pub async fn release(self) {
        let Ok(mut conn) = self.redis.conn().await else {
            return;
        };
        let released: redis::RedisResult<i64> = redis::Script::new(RELEASE)
            .key(&self.key)
            .arg(&self.token)
            .invoke_async(&mut conn)
            .await;
        if let Err(e) = released {
            tracing::warn!(key = %self.key, error = %e, "could not release lock; it expires by TTL");
        }
    }
}
