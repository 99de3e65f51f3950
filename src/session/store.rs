//! tower-sessions stores: a small Redis store on redis-rs `ConnectionManager` (the published
//! Redis store lags tower-sessions 0.15 and rides on the stalled `fred`), and the in-memory store
//! as the zero-config default.
//!
//! Records live at `{prefix}:session:{id}` with the Redis TTL at the record's expiry. `save`
//! only overwrites an existing record (`XX`), so a request that loaded a session before it was
//! revoked cannot bring it back when it finishes.

use async_trait::async_trait;
use time::OffsetDateTime;
use tower_sessions::{
    session::{Id, Record},
    session_store::{self, Error as StoreError},
    MemoryStore, SessionStore,
};

use crate::redis_conn::RedisHandle;

#[derive(Debug, Clone)]
pub struct RedisSessionStore {
    redis: RedisHandle,
}

impl RedisSessionStore {
    pub fn new(redis: RedisHandle) -> Self {
        Self { redis }
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

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        let mut conn = self.redis.conn().await.map_err(backend)?;
        redis::cmd("DEL")
            .arg(self.record_key(id))
            .query_async::<i64>(&mut conn)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// The configured store: memory (default) or Redis.
#[derive(Debug, Clone)]
pub enum BffSessionStore {
    Memory(MemoryStore),
    Redis(RedisSessionStore),
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
            // Same rule as Redis `XX`: never resurrect a deleted session.
            Self::Memory(s) => match s.load(&record.id).await? {
                Some(_) => s.save(record).await,
                None => Ok(()),
            },
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
