//! Everything about sessions beyond the tower-sessions record:
//! - the identity tokens of each session, Fernet-encrypted (a Redis dump reveals no token),
//! - the per-user index of session ids (list and revoke all of a user's sessions),
//! - the single-flight lock for identity refresh (in-process, and across replicas on Redis),
//! - per-session refresh back-off after the identity service said "later" (in process).
//!
//! Redis keys: `{prefix}:idtokens:{sid}` and `{prefix}:user-sessions:{user id}`. In memory mode
//! the same data lives in bounded caches: each entry expires with its session's absolute end,
//! and at most `MEMORY_SESSION_CAPACITY` sessions (and as many users) are kept.

use std::{
    collections::HashSet,
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use moka::{sync::Cache, Expiry};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::OwnedMutexGuard;
use tower_sessions::{session::Id, SessionStore};

use super::{store::BffSessionStore, SessionError};
use crate::{
    credentials::KeyRing,
    lock::{LocalLocks, LockError, RedisLock},
    redis_conn::RedisHandle,
};

/// A session's identity tokens, decrypted.
#[derive(Clone)]
pub struct IdentityTokenSet {
    pub access: String,
    pub refresh: Option<String>,
    /// `exp` of `access` (unix seconds).
    pub access_exp: i64,
    /// Bumped by every refresh, so a request that waited for the refresh lock can tell that
    /// another one already refreshed (expiries alone can tie within a second).
    pub generation: u64,
}

impl std::fmt::Debug for IdentityTokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityTokenSet")
            .field("access_exp", &self.access_exp)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct Secrets {
    access: String,
    refresh: Option<String>,
}

/// The stored form: the tokens as one Fernet token, their expiry in clear.
#[derive(Clone, Serialize, Deserialize)]
struct StoredTokens {
    enc: String,
    exp: i64,
    generation: u64,
}

/// Sessions (and, separately, users) kept at most by the memory backend.
pub const MEMORY_SESSION_CAPACITY: u64 = 100_000;
/// Sessions with a refresh back-off kept at once.
const BACKOFF_CAPACITY: u64 = 100_000;
/// Longest refresh back-off (a `Retry-After` beyond it is clamped).
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// TTL of the cross-replica refresh lock (extended while held) and the longest wait for it.
const LOCK_TTL: Duration = Duration::from_secs(30);
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// A memory entry and the unix second it ends at.
#[derive(Clone)]
struct Until<T> {
    value: T,
    until: i64,
}

/// Expires a memory entry at its `until` (real time).
struct AtUntil;

impl<K, T> Expiry<K, Until<T>> for AtUntil {
    fn expire_after_create(&self, _: &K, v: &Until<T>, _: Instant) -> Option<Duration> {
        Some(remaining(v.until))
    }

    fn expire_after_update(
        &self,
        _: &K,
        v: &Until<T>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(remaining(v.until))
    }
}

fn remaining(until: i64) -> Duration {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    Duration::from_secs(until.saturating_sub(now).max(0) as u64)
}

struct MemoryState {
    tokens: Cache<String, Until<StoredTokens>>,
    index: Cache<String, Until<HashSet<String>>>,
    /// Serialises read-modify-writes of `index` entries.
    index_writes: Mutex<()>,
}

impl MemoryState {
    fn new() -> Self {
        Self {
            tokens: Cache::builder()
                .max_capacity(MEMORY_SESSION_CAPACITY)
                .expire_after(AtUntil)
                .build(),
            index: Cache::builder()
                .max_capacity(MEMORY_SESSION_CAPACITY)
                .expire_after(AtUntil)
                .build(),
            index_writes: Mutex::new(()),
        }
    }

    fn index_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.index_writes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Backend {
    Memory(MemoryState),
    Redis(RedisHandle),
}

/// Why [`SessionRegistry::lock_refresh`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum RefreshLockError {
    #[error("another refresh of this session is still running")]
    Busy,
    #[error(transparent)]
    Store(#[from] SessionError),
}

/// Held while refreshing one session's identity tokens.
pub struct RefreshGuard {
    _local: OwnedMutexGuard<()>,
    remote: Option<RedisLock>,
}

impl RefreshGuard {
    pub async fn release(self) {
        if let Some(lock) = self.remote {
            lock.release().await;
        }
    }
}

pub struct SessionRegistry {
    backend: Backend,
    store: BffSessionStore,
    keyring: Arc<KeyRing>,
    locks: LocalLocks,
    /// Sessions whose identity refresh waits until the unix second (see `defer_refresh`).
    backoff: Cache<String, i64>,
}

/// Entry counts of the memory backend (see [`SessionRegistry::memory_entries`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryEntries {
    pub sessions: u64,
    pub users: u64,
}

impl SessionRegistry {
    pub fn new(store: BffSessionStore, redis: RedisHandle, keyring: Arc<KeyRing>) -> Self {
        let backend = match &store {
            BffSessionStore::Redis(_) => Backend::Redis(redis),
            BffSessionStore::Memory(_) => Backend::Memory(MemoryState::new()),
        };
        Self {
            backend,
            store,
            keyring,
            locks: LocalLocks::default(),
            backoff: Cache::builder()
                .max_capacity(BACKOFF_CAPACITY)
                .time_to_live(MAX_BACKOFF)
                .build(),
        }
    }

    pub fn store(&self) -> &BffSessionStore {
        &self.store
    }

    /// Memory backend: how many sessions and users it holds (after pending evictions ran);
    /// `None` on Redis.
    pub fn memory_entries(&self) -> Option<RegistryEntries> {
        match &self.backend {
            Backend::Memory(state) => {
                state.tokens.run_pending_tasks();
                state.index.run_pending_tasks();
                Some(RegistryEntries {
                    sessions: state.tokens.entry_count(),
                    users: state.index.entry_count(),
                })
            }
            Backend::Redis(_) => None,
        }
    }

    /// The identity service asked to come back later: this process does not try to refresh
    /// session `sid` again before `until` (unix seconds; at most `MAX_BACKOFF` ahead).
    pub fn defer_refresh(&self, sid: &str, now: i64, retry_after: Duration) {
        let secs = retry_after.min(MAX_BACKOFF).as_secs().max(1) as i64;
        self.backoff.insert(sid.to_owned(), now + secs);
    }

    /// Seconds left of the session's refresh back-off, if any.
    pub fn refresh_deferred(&self, sid: &str, now: i64) -> Option<u64> {
        let until = self.backoff.get(sid)?;
        (until > now).then(|| (until - now) as u64)
    }

    pub fn clear_deferral(&self, sid: &str) {
        self.backoff.invalidate(sid);
    }

    /// Records a new session: its encrypted tokens and its place in the user's index, both kept
    /// until `until` (the session's absolute end).
    pub async fn register(
        &self,
        user_id: &str,
        sid: &str,
        tokens: &IdentityTokenSet,
        until: OffsetDateTime,
    ) -> Result<(), SessionError> {
        let stored = self.seal(tokens)?;
        match &self.backend {
            Backend::Memory(state) => {
                let until = until.unix_timestamp();
                state.tokens.insert(
                    sid.to_owned(),
                    Until {
                        value: stored,
                        until,
                    },
                );
                let _writes = state.index_lock();
                let mut entry = state.index.get(user_id).unwrap_or(Until {
                    value: HashSet::new(),
                    until,
                });
                entry.value.insert(sid.to_owned());
                entry.until = entry.until.max(until);
                state.index.insert(user_id.to_owned(), entry);
            }
            Backend::Redis(redis) => {
                let at_ms = unix_ms(until);
                let body = serde_json::to_string(&stored)
                    .map_err(|e| SessionError::Corrupt(e.to_string()))?;
                let index = redis.key(&format!("user-sessions:{user_id}"));
                let mut conn = redis.conn().await?;
                redis::pipe()
                    .cmd("SET")
                    .arg(redis.key(&format!("idtokens:{sid}")))
                    .arg(body)
                    .arg("PXAT")
                    .arg(at_ms)
                    .ignore()
                    .cmd("SADD")
                    .arg(&index)
                    .arg(sid)
                    .ignore()
                    .cmd("PEXPIREAT")
                    .arg(&index)
                    .arg(at_ms)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// Replaces a session's tokens (after a refresh), keeping their expiry.
    pub async fn update_tokens(
        &self,
        sid: &str,
        tokens: &IdentityTokenSet,
    ) -> Result<(), SessionError> {
        let stored = self.seal(tokens)?;
        match &self.backend {
            Backend::Memory(state) => {
                // Like Redis `XX KEEPTTL`: only an existing entry, keeping its end.
                if let Some(old) = state.tokens.get(sid) {
                    state.tokens.insert(
                        sid.to_owned(),
                        Until {
                            value: stored,
                            until: old.until,
                        },
                    );
                }
            }
            Backend::Redis(redis) => {
                let body = serde_json::to_string(&stored)
                    .map_err(|e| SessionError::Corrupt(e.to_string()))?;
                let mut conn = redis.conn().await?;
                redis::cmd("SET")
                    .arg(redis.key(&format!("idtokens:{sid}")))
                    .arg(body)
                    .arg("XX")
                    .arg("KEEPTTL")
                    .query_async::<Option<String>>(&mut conn)
                    .await?;
            }
        }
        Ok(())
    }

    pub async fn tokens(&self, sid: &str) -> Result<Option<IdentityTokenSet>, SessionError> {
        let stored = match &self.backend {
            Backend::Memory(state) => state.tokens.get(sid).map(|e| e.value),
            Backend::Redis(redis) => {
                let mut conn = redis.conn().await?;
                let raw: Option<String> = redis::cmd("GET")
                    .arg(redis.key(&format!("idtokens:{sid}")))
                    .query_async(&mut conn)
                    .await?;
                match raw {
                    Some(raw) => Some(
                        serde_json::from_str(&raw)
                            .map_err(|e| SessionError::Corrupt(e.to_string()))?,
                    ),
                    None => None,
                }
            }
        };
        let Some(stored) = stored else {
            return Ok(None);
        };
        let plain = self.keyring.decrypt(&stored.enc)?;
        let secrets: Secrets =
            serde_json::from_str(&plain).map_err(|e| SessionError::Corrupt(e.to_string()))?;
        Ok(Some(IdentityTokenSet {
            access: secrets.access,
            refresh: secrets.refresh,
            access_exp: stored.exp,
            generation: stored.generation,
        }))
    }

    /// Ends one session: record, tokens and index entry.
    pub async fn forget(&self, user_id: &str, sid: &str) -> Result<(), SessionError> {
        if let Ok(id) = Id::from_str(sid) {
            self.store.delete(&id).await?;
        }
        match &self.backend {
            Backend::Memory(state) => {
                state.tokens.invalidate(sid);
                let _writes = state.index_lock();
                if let Some(mut entry) = state.index.get(user_id) {
                    entry.value.remove(sid);
                    if entry.value.is_empty() {
                        state.index.invalidate(user_id);
                    } else {
                        state.index.insert(user_id.to_owned(), entry);
                    }
                }
            }
            Backend::Redis(redis) => {
                let mut conn = redis.conn().await?;
                redis::pipe()
                    .cmd("DEL")
                    .arg(redis.key(&format!("idtokens:{sid}")))
                    .ignore()
                    .cmd("SREM")
                    .arg(redis.key(&format!("user-sessions:{user_id}")))
                    .arg(sid)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// Ids of the user's live sessions (index entries whose session has ended are pruned).
    pub async fn list(&self, user_id: &str) -> Result<Vec<String>, SessionError> {
        let ids: Vec<String> = match &self.backend {
            Backend::Memory(state) => state
                .index
                .get(user_id)
                .map(|e| e.value.into_iter().collect())
                .unwrap_or_default(),
            Backend::Redis(redis) => {
                let mut conn = redis.conn().await?;
                redis::cmd("SMEMBERS")
                    .arg(redis.key(&format!("user-sessions:{user_id}")))
                    .query_async(&mut conn)
                    .await?
            }
        };
        let mut live = Vec::with_capacity(ids.len());
        for sid in ids {
            let alive = match Id::from_str(&sid) {
                Ok(id) => self.store.load(&id).await?.is_some(),
                Err(_) => false,
            };
            if alive {
                live.push(sid);
            } else {
                self.forget(user_id, &sid).await?;
            }
        }
        Ok(live)
    }

    /// Ends every session of the user; returns how many were live.
    pub async fn revoke_all(&self, user_id: &str) -> Result<usize, SessionError> {
        let live = self.list(user_id).await?;
        for sid in &live {
            self.forget(user_id, sid).await?;
        }
        Ok(live.len())
    }

    /// Single-flight for one session's identity refresh: in-process first, then (on Redis)
    /// across replicas, so a rotating refresh token is spent exactly once. Both waits are
    /// bounded; the Redis lock is extended while held and released if the guard is dropped.
    pub async fn lock_refresh(&self, sid: &str) -> Result<RefreshGuard, RefreshLockError> {
        let local = self
            .locks
            .lock_within(sid, LOCK_WAIT)
            .await
            .map_err(|_| RefreshLockError::Busy)?;
        let remote = match &self.backend {
            Backend::Memory(_) => None,
            Backend::Redis(redis) => Some(
                RedisLock::acquire(
                    redis,
                    redis.key(&format!("lock:idrefresh:{sid}")),
                    LOCK_TTL,
                    LOCK_WAIT,
                )
                .await
                .map_err(|e| match e {
                    LockError::Redis(e) => RefreshLockError::Store(SessionError::from(e)),
                    LockError::Timeout(_) => RefreshLockError::Busy,
                })?,
            ),
        };
        Ok(RefreshGuard {
            _local: local,
            remote,
        })
    }

    fn seal(&self, tokens: &IdentityTokenSet) -> Result<StoredTokens, SessionError> {
        let secrets = serde_json::to_string(&Secrets {
            access: tokens.access.clone(),
            refresh: tokens.refresh.clone(),
        })
        .map_err(|e| SessionError::Corrupt(e.to_string()))?;
        Ok(StoredTokens {
            enc: self.keyring.encrypt(&secrets),
            exp: tokens.access_exp,
            generation: tokens.generation,
        })
    }
}

fn unix_ms(t: OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(1) as u64
}
