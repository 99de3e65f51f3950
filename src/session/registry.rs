//! Everything about sessions beyond the tower-sessions record:
//! - the identity tokens of each session, Fernet-encrypted (a Redis dump reveals no token),
//! - the per-user index of session ids (list and revoke all of a user's sessions),
//! - the single-flight lock for identity refresh (in-process, and across replicas on Redis).
//!
//! Redis keys: `{prefix}:idtokens:{sid}` and `{prefix}:user-sessions:{user id}`.

use std::{
    collections::{HashMap, HashSet},
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

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

#[derive(Default)]
struct MemoryState {
    tokens: HashMap<String, StoredTokens>,
    index: HashMap<String, HashSet<String>>,
}

enum Backend {
    Memory(Mutex<MemoryState>),
    Redis(RedisHandle),
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
}

impl SessionRegistry {
    pub fn new(store: BffSessionStore, redis: RedisHandle, keyring: Arc<KeyRing>) -> Self {
        let backend = match &store {
            BffSessionStore::Redis(_) => Backend::Redis(redis),
            BffSessionStore::Memory(_) => Backend::Memory(Mutex::default()),
        };
        Self {
            backend,
            store,
            keyring,
            locks: LocalLocks::default(),
        }
    }

    pub fn store(&self) -> &BffSessionStore {
        &self.store
    }

    fn memory(state: &Mutex<MemoryState>) -> std::sync::MutexGuard<'_, MemoryState> {
        state.lock().unwrap_or_else(|p| p.into_inner())
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
                let mut state = Self::memory(state);
                state.tokens.insert(sid.to_owned(), stored);
                state
                    .index
                    .entry(user_id.to_owned())
                    .or_default()
                    .insert(sid.to_owned());
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
                Self::memory(state).tokens.insert(sid.to_owned(), stored);
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
            Backend::Memory(state) => Self::memory(state).tokens.get(sid).cloned(),
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
                let mut state = Self::memory(state);
                state.tokens.remove(sid);
                if let Some(set) = state.index.get_mut(user_id) {
                    set.remove(sid);
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
            Backend::Memory(state) => Self::memory(state)
                .index
                .get(user_id)
                .map(|s| s.iter().cloned().collect())
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
    /// across replicas, so a rotating refresh token is spent exactly once.
    pub async fn lock_refresh(&self, sid: &str) -> Result<RefreshGuard, SessionError> {
        let local = self.locks.lock(sid).await;
        let remote = match &self.backend {
            Backend::Memory(_) => None,
            Backend::Redis(redis) => Some(
                RedisLock::acquire(
                    redis,
                    redis.key(&format!("lock:idrefresh:{sid}")),
                    Duration::from_secs(30),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|e| match e {
                    LockError::Redis(e) => SessionError::from(e),
                    LockError::Timeout(k) => SessionError::StoreUnavailable(format!(
                        "refresh lock {k} not released in time"
                    )),
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
