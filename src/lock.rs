//! Single-flight locks: in-process per key, and across replicas with a Redis lock
//! (`SET key token NX PX ttl`, released only by its owner).
//!
//! A Redis lock is kept alive while its holder is: a watchdog task extends its TTL (only while
//! the stored value is still this holder's) every third of the TTL, so work that outlasts the TTL
//! (a slow upstream) is never joined by a second replica. When the holder goes away without
//! releasing it (its future was dropped, it panicked), the lock is released at once by `Drop`
//! instead of blocking everyone else until the TTL runs out.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex, Weak},
    time::Duration,
};

use redis::Script;

use tokio::{
    sync::{Mutex as AsyncMutex, OwnedMutexGuard},
    task::AbortHandle,
};

use crate::redis_conn::RedisHandle;

/// A watchdog stops extending a lock after this long: a holder that hangs longer than any
/// legitimate work (refresh + re-login, each bounded by a 120 s upstream timeout) loses it.
pub const MAX_HOLD: Duration = Duration::from_secs(600);

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

    /// [`lock`](Self::lock), waiting at most `wait`.
    pub async fn lock_within(
        &self,
        key: &str,
        wait: Duration,
    ) -> Result<OwnedMutexGuard<()>, LockError> {
        tokio::time::timeout(wait, self.lock(key))
            .await
            .map_err(|_| LockError::Timeout(format!("local:{key}")))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("lock `{0}` still held by another holder after the wait bound")]
    Timeout(String),
}

/// A held Redis lock, kept alive by a watchdog while held. Release it with
/// [`RedisLock::release`]; if it is dropped instead, the release runs in a spawned task.
pub struct RedisLock {
    redis: RedisHandle,
    key: String,
    token: String,
    watchdog: Option<AbortHandle>,
    released: bool,
}

impl std::fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLock").field("key", &self.key).finish()
    }
}

/// Deletes the lock only while it is the caller's (built once: its SHA1 is not recomputed per call).
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"#,
    )
});
/// Extends the lock's TTL only while it is the caller's.
static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end"#,
    )
});

impl RedisLock {
    /// Waits up to `wait` for the lock `key`, which expires after `ttl` once its holder stops
    /// extending it (see the module documentation).
    pub async fn acquire(
        redis: &RedisHandle,
        key: String,
        ttl: Duration,
        wait: Duration,
    ) -> Result<RedisLock, LockError> {
        let ttl = ttl.max(Duration::from_millis(30));
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
                let watchdog =
                    tokio::spawn(keep_alive(redis.clone(), key.clone(), token.clone(), ttl))
                        .abort_handle();
                return Ok(RedisLock {
                    redis: redis.clone(),
                    key,
                    token,
                    watchdog: Some(watchdog),
                    released: false,
                });
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(LockError::Timeout(key));
            }
            // Another holder has it; it releases it when done (or when it goes away).
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    pub async fn release(mut self) {
        if let Some(w) = self.watchdog.take() {
            w.abort();
        }
        release(&self.redis, &self.key, &self.token).await;
        // Only now: if this future is dropped mid-release, `Drop` releases instead.
        self.released = true;
    }
}

impl Drop for RedisLock {
    fn drop(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.abort();
        }
        if self.released {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (redis, key, token) = (self.redis.clone(), self.key.clone(), self.token.clone());
        runtime.spawn(async move {
            tracing::debug!(key = %key, "lock holder went away; releasing its lock");
            release(&redis, &key, &token).await;
        });
    }
}

/// Deletes the lock if it is still `token`'s.
async fn release(redis: &RedisHandle, key: &str, token: &str) {
    let released = async {
        let mut conn = redis.conn().await?;
        let deleted: i64 = RELEASE.key(key).arg(token).invoke_async(&mut conn).await?;
        Ok::<_, redis::RedisError>(deleted)
    }
    .await;
    if let Err(e) = released {
        tracing::warn!(key = %key, error = %e, "could not release lock; it expires by TTL");
    }
}

/// Extends the lock every third of its TTL while it is still `token`'s, for at most
/// [`MAX_HOLD`]. Ends when the lock turns out to be someone else's (or gone).
async fn keep_alive(redis: RedisHandle, key: String, token: String, ttl: Duration) {
    let period = ttl / 3;
    let give_up = tokio::time::Instant::now() + MAX_HOLD;
    loop {
        tokio::time::sleep(period).await;
        if tokio::time::Instant::now() >= give_up {
            tracing::warn!(key = %key, "lock held longer than the maximum; no longer extended");
            return;
        }
        let extended = async {
            let mut conn = redis.conn().await?;
            let extended: i64 = EXTEND
                .key(&key)
                .arg(&token)
                .arg(ttl.as_millis() as u64)
                .invoke_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>(extended)
        }
        .await;
        match extended {
            Ok(1) => {}
            Ok(_) => {
                tracing::warn!(key = %key, "lock expired or taken over while held");
                return;
            }
            // Transient: the lock still has the rest of its TTL; try again next period.
            Err(e) => tracing::warn!(key = %key, error = %e, "could not extend lock"),
        }
    }
}
