//! The memory backend of the session registry (`session.store = "memory"`): bounded caches
//! whose entries expire with their session's absolute end; at most
//! [`MEMORY_SESSION_CAPACITY`](super::MEMORY_SESSION_CAPACITY) sessions (and as many users).
//! Single process: no cross-replica refresh lock.

use std::{
    collections::HashSet,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use moka::{sync::Cache, Expiry};
use time::OffsetDateTime;

use super::{RefreshLockError, RegistryEntries, StoredTokens, TokenIndex, MEMORY_SESSION_CAPACITY};
use crate::{lock::RedisLock, session::SessionError};

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

pub(super) struct MemoryIndex {
    tokens: Cache<String, Until<StoredTokens>>,
    index: Cache<String, Until<HashSet<String>>>,
    /// Serialises read-modify-writes of `index` entries.
    index_writes: Mutex<()>,
}

impl MemoryIndex {
    pub(super) fn new() -> Self {
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

    fn index_lock(&self) -> MutexGuard<'_, ()> {
        self.index_writes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl TokenIndex for MemoryIndex {
    async fn insert(
        &self,
        user_id: &str,
        sid: &str,
        stored: StoredTokens,
        until: OffsetDateTime,
    ) -> Result<(), SessionError> {
        let until = until.unix_timestamp();
        self.tokens.insert(
            sid.to_owned(),
            Until {
                value: stored,
                until,
            },
        );
        let _writes = self.index_lock();
        let mut entry = self.index.get(user_id).unwrap_or(Until {
            value: HashSet::new(),
            until,
        });
        entry.value.insert(sid.to_owned());
        entry.until = entry.until.max(until);
        self.index.insert(user_id.to_owned(), entry);
        Ok(())
    }

    async fn replace(&self, sid: &str, stored: StoredTokens) -> Result<(), SessionError> {
        // Like Redis `XX KEEPTTL`: only an existing entry, keeping its end.
        if let Some(old) = self.tokens.get(sid) {
            self.tokens.insert(
                sid.to_owned(),
                Until {
                    value: stored,
                    until: old.until,
                },
            );
        }
        Ok(())
    }

    async fn get(&self, sid: &str) -> Result<Option<StoredTokens>, SessionError> {
        Ok(self.tokens.get(sid).map(|e| e.value))
    }

    async fn remove(&self, user_id: &str, sid: &str) -> Result<(), SessionError> {
        self.tokens.invalidate(sid);
        let _writes = self.index_lock();
        if let Some(mut entry) = self.index.get(user_id) {
            entry.value.remove(sid);
            if entry.value.is_empty() {
                self.index.invalidate(user_id);
            } else {
                self.index.insert(user_id.to_owned(), entry);
            }
        }
        Ok(())
    }

    async fn sessions_of(&self, user_id: &str) -> Result<Vec<String>, SessionError> {
        Ok(self
            .index
            .get(user_id)
            .map(|e| e.value.into_iter().collect())
            .unwrap_or_default())
    }

    async fn refresh_lock(&self, _sid: &str) -> Result<Option<RedisLock>, RefreshLockError> {
        Ok(None)
    }

    fn entries(&self) -> Option<RegistryEntries> {
        self.tokens.run_pending_tasks();
        self.index.run_pending_tasks();
        Some(RegistryEntries {
            sessions: self.tokens.entry_count(),
            users: self.index.entry_count(),
        })
    }
}
