//! tower-sessions stores: a small Redis store on redis-rs `ConnectionManager` (the published
//! Redis store lags tower-sessions 0.15 and rides on the stalled `fred`), and the in-memory store
//! as the zero-config default.
//!
//! Records live at `{prefix}:session:{id}` with the Redis TTL at the record's expiry. `save`
//! only overwrites an existing record (`XX`), so a request that loaded a session before it was
//! revoked cannot bring it back when it finishes.
//!
//! In memory, expired records are deleted by [`MemorySessionStore::delete_expired`], which the
//! app runs every `session.memory_cleanup_interval_secs` (and `create` runs whenever the store
//! has doubled since the last sweep), so abandoned sessions do not pile up.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use async_trait::async_trait;
use time::OffsetDateTime;
use tower_sessions::{
    session::{Id, Record},
    session_store::{self, Error as StoreError},
    SessionStore,
};

use super::cache::SessionCache;
use crate::redis_conn::RedisHandle;

#[derive(Debug, Clone)]
pub struct RedisSessionStore {
    redis: RedisHandle,
    /// Copies of live sessions; a deleted record's copy goes everywhere (see `delete`).
    cache: SessionCache,
}

impl RedisSessionStore {
    pub fn new(redis: RedisHandle) -> Self {
        Self {
            redis,
            cache: SessionCache::new(),
        }
    }

    pub fn cache(&self) -> &SessionCache {
        &self.cache
    }

    /// The pub/sub channel of ended sessions (payload: the session id).
    fn ended_channel(&self) -> String {
        self.redis.key("sessions:ended")
    }

    /// Follows the sessions other replicas end (see [`SessionCache::follow_ended`]).
    pub fn follow_ended(&self) -> tokio::task::JoinHandle<()> {
        self.cache
            .follow_ended(self.redis.clone(), self.ended_channel())
    }

    pub fn record_key(&self, id: &Id) -> String {
        self.redis.key(&format!("session:{id}"))
    }

    async fn write(&self, record: &Record, condition: &str) -> session_store::Result<bool> {
        let body = serde_json::to_vec(record).map_err(|e| StoreError::Encode(e.to_string()))?;
        let at_ms = (record.expiry_date.unix_timestamp_nanos() / 1_000_000).max(1) as u64;
        let mut conn = self.redis.conn().await.map_err(backend)?;
        let reply: Option<String> = redis::cmd("SET")
            .arg(self.record_key(&record.id))
            .arg(body)
            .arg(condition)
            .arg("PXAT")
            .arg(at_ms)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(reply.is_some())
    }
}

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(format!("redis: {e}"))
}

#[async_trait]
impl SessionStore for RedisSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        // `NX` guards against the (astronomically unlikely) id collision.
        while !self.write(record, "NX").await? {
            record.id = Id::default();
        }
        Ok(())
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        self.write(record, "XX").await?;
        Ok(())
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let mut conn = self.redis.conn().await.map_err(backend)?;
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.record_key(id))
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let Some(raw) = raw else { return Ok(None) };
        let record: Record =
            serde_json::from_slice(&raw).map_err(|e| StoreError::Decode(e.to_string()))?;
        Ok((record.expiry_date > OffsetDateTime::now_utc()).then_some(record))
    }

    /// Deletes the record, then tells every replica to drop its copy.
    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        // This replica's copy goes first: a sign-out that fails below still ends it here.
        self.cache.forget(Some(id));
        let mut conn = self.redis.conn().await.map_err(backend)?;
        redis::cmd("DEL")
            .arg(self.record_key(id))
            .query_async::<i64>(&mut conn)
            .await
            .map_err(backend)?;
        redis::cmd("PUBLISH")
            .arg(self.ended_channel())
            .arg(id.to_string())
            .query_async::<i64>(&mut conn)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// Sessions in process memory: records past their expiry are never returned and are deleted
/// by [`MemorySessionStore::delete_expired`].
#[derive(Debug, Clone, Default)]
pub struct MemorySessionStore(Arc<Mutex<MemoryRecords>>);

#[derive(Debug, Default)]
struct MemoryRecords {
    records: HashMap<Id, Record>,
    /// Size after the last sweep: `create` sweeps again when the store has doubled since.
    swept_len: usize,
}

/// Below this many records `create` never sweeps (the periodic cleanup is enough).
const SWEEP_FLOOR: usize = 1024;

impl MemorySessionStore {
    fn lock(&self) -> MutexGuard<'_, MemoryRecords> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records held, expired ones not yet deleted included.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Deletes every record whose expiry has passed; returns how many.
    pub fn delete_expired(&self) -> usize {
        let now = OffsetDateTime::now_utc();
        let mut inner = self.lock();
        let before = inner.records.len();
        inner.records.retain(|_, r| r.expiry_date > now);
        inner.swept_len = inner.records.len();
        before - inner.records.len()
    }
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let mut inner = self.lock();
        if inner.records.len() >= SWEEP_FLOOR.max(inner.swept_len.saturating_mul(2)) {
            let now = OffsetDateTime::now_utc();
            inner.records.retain(|_, r| r.expiry_date > now);
            inner.swept_len = inner.records.len();
        }
        while inner.records.contains_key(&record.id) {
            record.id = Id::default();
        }
        inner.records.insert(record.id, record.clone());
        Ok(())
    }

    /// Like Redis `XX`: never resurrects a deleted or expired session.
    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let now = OffsetDateTime::now_utc();
        let mut inner = self.lock();
        if let Some(stored) = inner.records.get_mut(&record.id) {
            if stored.expiry_date > now {
                *stored = record.clone();
            }
        }
        Ok(())
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let now = OffsetDateTime::now_utc();
        Ok(self
            .lock()
            .records
            .get(id)
            .filter(|r| r.expiry_date > now)
            .cloned())
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        self.lock().records.remove(id);
        Ok(())
    }
}

/// The configured store: memory (default) or Redis.
#[derive(Debug, Clone)]
pub enum BffSessionStore {
    Memory(MemorySessionStore),
    Redis(RedisSessionStore),
}

impl BffSessionStore {
    /// The in-process copies of sessions (Redis only: memory records are in process already).
    pub fn cache(&self) -> Option<&SessionCache> {
        match self {
            Self::Memory(_) => None,
            Self::Redis(s) => Some(s.cache()),
        }
    }
}

#[async_trait]
impl SessionStore for BffSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        match self {
            Self::Memory(s) => s.create(record).await,
            Self::Redis(s) => s.create(record).await,
        }
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        match self {
            Self::Memory(s) => s.save(record).await,
            Self::Redis(s) => s.save(record).await,
        }
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        match self {
            Self::Memory(s) => s.load(id).await,
            Self::Redis(s) => s.load(id).await,
        }
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        match self {
            Self::Memory(s) => s.delete(id).await,
            Self::Redis(s) => s.delete(id).await,
        }
    }
}
