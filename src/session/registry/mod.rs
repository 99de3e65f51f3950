//! Everything about sessions beyond the tower-sessions record:
//! - the identity tokens of each session, Fernet-encrypted (a Redis dump reveals no token),
//! - the per-user index of session ids (list and revoke all of a user's sessions),
//! - the single-flight lock for identity refresh (in-process, and across replicas on Redis),
//! - per-session refresh back-off after the identity service said "later" (in process).
//!
//! [`SessionRegistry`] seals the tokens and applies these rules; where the sealed tokens and the
//! index live is a `TokenIndex` backend: `redis` (`{prefix}:idtokens:{sid}` and
//! `{prefix}:user-sessions:{user id}`) or `memory` (bounded caches: each entry expires with its
//! session's absolute end, and at most `MEMORY_SESSION_CAPACITY` sessions, and as many users,
//! are kept).

mod memory;
mod redis;

use std::{str::FromStr, sync::Arc, time::Duration};

use moka::sync::Cache;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::OwnedMutexGuard;
use tower_sessions::{session::Id, SessionStore};

use super::{store::BffSessionStore, SessionError};
use crate::{
    credentials::KeyRing,
    lock::{LocalLocks, RedisLock},
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

/// Where the sealed tokens of each session and the per-user index of session ids live.
#[async_trait::async_trait]
trait TokenIndex: Send + Sync {
    /// Stores a new session's tokens and adds it to the user's index, both until `until`.
    async fn insert(
        &self,
        user_id: &str,
        sid: &str,
        stored: StoredTokens,
        until: OffsetDateTime,
    ) -> Result<(), SessionError>;
    /// Replaces an existing session's tokens, keeping their end; nothing if there are none.
    async fn replace(&self, sid: &str, stored: StoredTokens) -> Result<(), SessionError>;
    async fn get(&self, sid: &str) -> Result<Option<StoredTokens>, SessionError>;
    /// Drops a session's tokens and its index entry.
    async fn remove(&self, user_id: &str, sid: &str) -> Result<(), SessionError>;
    /// The session ids indexed for the user (ended ones included).
    async fn sessions_of(&self, user_id: &str) -> Result<Vec<String>, SessionError>;
    /// The cross-replica part of the refresh lock, where there are replicas to exclude.
    async fn refresh_lock(&self, sid: &str) -> Result<Option<RedisLock>, RefreshLockError>;
    /// Entry counts, for a backend that holds its entries in process.
    fn entries(&self) -> Option<RegistryEntries>;
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
    index: Box<dyn TokenIndex>,
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
        let index: Box<dyn TokenIndex> = match &store {
            BffSessionStore::Redis(_) => Box::new(redis::RedisIndex::new(redis)),
            BffSessionStore::Memory(_) => Box::new(memory::MemoryIndex::new()),
        };
        Self {
            index,
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
        self.index.entries()
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
        self.index.insert(user_id, sid, stored, until).await
    }

    /// Replaces a session's tokens (after a refresh), keeping their expiry.
    pub async fn update_tokens(
        &self,
        sid: &str,
        tokens: &IdentityTokenSet,
    ) -> Result<(), SessionError> {
        let stored = self.seal(tokens)?;
        self.index.replace(sid, stored).await
    }

    pub async fn tokens(&self, sid: &str) -> Result<Option<IdentityTokenSet>, SessionError> {
        let Some(stored) = self.index.get(sid).await? else {
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
        self.index.remove(user_id, sid).await
    }

    /// Ids of the user's live sessions (index entries whose session has ended are pruned).
    pub async fn list(&self, user_id: &str) -> Result<Vec<String>, SessionError> {
        let ids = self.index.sessions_of(user_id).await?;
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
        let remote = self.index.refresh_lock(sid).await?;
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
