//! The Redis record of each user's LibreChat login (`{prefix}:lc-login:{user id}`): both tokens
//! Fernet-encrypted, their expiries and generation in clear. Load, save, delete, and the
//! revocation message every replica follows (`{prefix}:revoked-logins`).
//!
//! A record that is corrupt or no longer decrypts (key ring changed) reads as absent: the user
//! simply logs in again.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::TokenError;
use crate::{credentials::KeyRing, librechat::client::LibreChatLogin, redis_conn::RedisHandle};

/// The encrypted part of the record.
#[derive(Serialize, Deserialize)]
struct Secrets {
    token: String,
    refresh: String,
}

/// The Redis record.
#[derive(Serialize, Deserialize)]
struct Record {
    enc: String,
    exp: i64,
    refresh_exp: i64,
    generation: u64,
    #[serde(default)]
    librechat_user_id: Option<String>,
}

/// A stored login, decrypted.
pub(super) struct StoredLogin {
    pub token: String,
    pub refresh: String,
    pub exp: i64,
    pub refresh_exp: i64,
    pub generation: u64,
}

/// Cheap to clone.
#[derive(Clone)]
pub(super) struct LoginStore {
    redis: RedisHandle,
    keyring: Arc<KeyRing>,
}

impl LoginStore {
    pub(super) fn new(redis: RedisHandle, keyring: Arc<KeyRing>) -> Self {
        Self { redis, keyring }
    }

    pub(super) fn redis(&self) -> &RedisHandle {
        &self.redis
    }

    fn key(&self, user_id: &str) -> String {
        self.redis.key(&format!("lc-login:{user_id}"))
    }

    /// The pub/sub channel of revocations (payload: the user id).
    pub(super) fn revocation_channel(&self) -> String {
        self.redis.key("revoked-logins")
    }

    pub(super) async fn load(&self, user_id: &str) -> Result<Option<StoredLogin>, TokenError> {
        let mut conn = self.redis.conn().await?;
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.key(user_id))
            .query_async(&mut conn)
            .await?;
        let Some(raw) = raw else { return Ok(None) };
        let Ok(stored) = serde_json::from_str::<Record>(&raw) else {
            tracing::warn!(user = %user_id, "LibreChat login record is corrupt; logging in again");
            return Ok(None);
        };
        let Ok(plain) = self.keyring.decrypt(&stored.enc) else {
            tracing::warn!(user = %user_id, "LibreChat login record undecryptable (key ring changed?); logging in again");
            return Ok(None);
        };
        let Ok(secrets) = serde_json::from_str::<Secrets>(&plain) else {
            return Ok(None);
        };
        Ok(Some(StoredLogin {
            token: secrets.token,
            refresh: secrets.refresh,
            exp: stored.exp,
            refresh_exp: stored.refresh_exp,
            generation: stored.generation,
        }))
    }

    /// Stores `login` as generation `generation`, kept until its refresh token expires (at
    /// least a minute from `now`).
    pub(super) async fn save(
        &self,
        user_id: &str,
        login: &LibreChatLogin,
        generation: u64,
        now: i64,
    ) -> Result<(), TokenError> {
        let secrets = serde_json::to_string(&Secrets {
            token: login.token.clone(),
            refresh: login.refresh_token.clone(),
        })
        .map_err(|e| TokenError::Store(e.to_string()))?;
        let record = Record {
            enc: self.keyring.encrypt(&secrets),
            exp: login.token_exp,
            refresh_exp: login.refresh_exp,
            generation,
            librechat_user_id: login.user_id.clone(),
        };
        let body = serde_json::to_string(&record).map_err(|e| TokenError::Store(e.to_string()))?;
        let ttl = (login.refresh_exp.max(login.token_exp) - now).max(60);
        let mut conn = self.redis.conn().await?;
        redis::cmd("SET")
            .arg(self.key(user_id))
            .arg(body)
            .arg("EX")
            .arg(ttl)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    pub(super) async fn delete(&self, user_id: &str) -> Result<(), TokenError> {
        let mut conn = self.redis.conn().await?;
        redis::cmd("DEL")
            .arg(self.key(user_id))
            .query_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }

    /// Tells every replica to drop its in-process copy of the user's token.
    pub(super) async fn publish_revocation(&self, user_id: &str) -> Result<(), TokenError> {
        let mut conn = self.redis.conn().await?;
        redis::cmd("PUBLISH")
            .arg(self.revocation_channel())
            .arg(user_id)
            .query_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }
}
