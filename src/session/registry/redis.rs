//! The Redis backend of the session registry (`session.store = "redis"`):
//! `{prefix}:idtokens:{sid}` (the sealed tokens, expiring at the session's absolute end) and
//! `{prefix}:user-sessions:{user id}` (a set of session ids), shared by every replica, and the
//! cross-replica identity-refresh lock `{prefix}:lock:idrefresh:{sid}`.

use time::OffsetDateTime;

use super::{RefreshLockError, RegistryEntries, StoredTokens, TokenIndex, LOCK_TTL, LOCK_WAIT};
use crate::{
    lock::{LockError, RedisLock},
    redis_conn::RedisHandle,
    session::SessionError,
};

pub(super) struct RedisIndex {
    redis: RedisHandle,
}

impl RedisIndex {
    pub(super) fn new(redis: RedisHandle) -> Self {
        Self { redis }
    }

    fn tokens_key(&self, sid: &str) -> String {
        self.redis.key(&format!("idtokens:{sid}"))
    }

    fn index_key(&self, user_id: &str) -> String {
        self.redis.key(&format!("user-sessions:{user_id}"))
    }
}

fn encode(stored: &StoredTokens) -> Result<String, SessionError> {
    serde_json::to_string(stored).map_err(|e| SessionError::Corrupt(e.to_string()))
}

fn unix_ms(t: OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(1) as u64
}

#[async_trait::async_trait]
impl TokenIndex for RedisIndex {
    async fn insert(
        &self,
        user_id: &str,
        sid: &str,
        stored: StoredTokens,
        until: OffsetDateTime,
    ) -> Result<(), SessionError> {
        let at_ms = unix_ms(until);
        let body = encode(&stored)?;
        let index = self.index_key(user_id);
        let mut conn = self.redis.conn().await?;
        let mut index_conn = conn.clone();
        // The tokens and the user's index live in different hash slots (on a cluster, maybe on
        // different nodes): two requests, sent at once on the multiplexed connection.
        let mut set = redis::cmd("SET");
        set.arg(self.tokens_key(sid))
            .arg(body)
            .arg("PXAT")
            .arg(at_ms);
        let tokens = set.query_async::<()>(&mut conn);
        let mut index_pipe = redis::pipe();
        index_pipe
            .cmd("SADD")
            .arg(&index)
            .arg(sid)
            .ignore()
            .cmd("PEXPIREAT")
            .arg(&index)
            .arg(at_ms)
            .ignore();
        let indexed = index_pipe.query_async::<()>(&mut index_conn);
        tokio::try_join!(tokens, indexed)?;
        Ok(())
    }

    async fn replace(&self, sid: &str, stored: StoredTokens) -> Result<(), SessionError> {
        let body = encode(&stored)?;
        let mut conn = self.redis.conn().await?;
        redis::cmd("SET")
            .arg(self.tokens_key(sid))
            .arg(body)
            .arg("XX")
            .arg("KEEPTTL")
            .query_async::<Option<String>>(&mut conn)
            .await?;
        Ok(())
    }

    async fn get(&self, sid: &str) -> Result<Option<StoredTokens>, SessionError> {
        let mut conn = self.redis.conn().await?;
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.tokens_key(sid))
            .query_async(&mut conn)
            .await?;
        raw.map(|raw| serde_json::from_str(&raw).map_err(|e| SessionError::Corrupt(e.to_string())))
            .transpose()
    }

    async fn remove(&self, user_id: &str, sid: &str) -> Result<(), SessionError> {
        let mut conn = self.redis.conn().await?;
        let mut index_conn = conn.clone();
        // Two hash slots: two requests, sent at once.
        let mut del = redis::cmd("DEL");
        del.arg(self.tokens_key(sid));
        let mut srem = redis::cmd("SREM");
        srem.arg(self.index_key(user_id)).arg(sid);
        let tokens = del.query_async::<()>(&mut conn);
        let indexed = srem.query_async::<()>(&mut index_conn);
        tokio::try_join!(tokens, indexed)?;
        Ok(())
    }

    async fn sessions_of(&self, user_id: &str) -> Result<Vec<String>, SessionError> {
        let mut conn = self.redis.conn().await?;
        Ok(redis::cmd("SMEMBERS")
            .arg(self.index_key(user_id))
            .query_async(&mut conn)
            .await?)
    }

    async fn refresh_lock(&self, sid: &str) -> Result<Option<RedisLock>, RefreshLockError> {
        let lock = RedisLock::acquire(
            &self.redis,
            self.redis.key(&format!("lock:idrefresh:{sid}")),
            LOCK_TTL,
            LOCK_WAIT,
        )
        .await
        .map_err(|e| match e {
            LockError::Redis(e) => RefreshLockError::Store(SessionError::from(e)),
            LockError::Timeout(_) => RefreshLockError::Busy,
        })?;
        Ok(Some(lock))
    }

    fn entries(&self) -> Option<RegistryEntries> {
        None
    }
}
