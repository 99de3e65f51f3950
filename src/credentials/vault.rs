//! The credential vault: one record per user, holding the LibreChat password only the BFF
//! knows, Fernet-encrypted. Redis key `{prefix}:cred:{user id}` (a JSON document).
//!
//! The plaintext password leaves this module only as a [`Password`], whose `Debug` is redacted.

use serde::{Deserialize, Serialize};

use super::{CryptoError, KeyRing};
use crate::{clock::Clock, redis_conn::RedisHandle};

use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialStatus {
    /// Password stored, LibreChat account not confirmed yet.
    Provisioning,
    /// The password logs in to LibreChat.
    Ready,
    /// LibreChat refused the stored password; the provisioning recovery path must fix it.
    Drifted,
    /// The account exists with another password and cannot be recovered automatically.
    Conflict,
    /// The identity service deactivated the user: no LibreChat access until they are
    /// registered again (webhook `user.created`/`user.updated`, admin API, CLI).
    Disabled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub user_id: String,
    pub email: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub librechat_user_id: Option<String>,
    /// The LibreChat password as a Fernet token.
    pub password: String,
    pub status: CredentialStatus,
    pub created_at: i64,
    pub updated_at: i64,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A decrypted password. Never printed.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub fn new(p: impl Into<String>) -> Self {
        Self(p.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("credential store unavailable: {0}")]
    Unavailable(#[from] redis::RedisError),
    #[error("credential record of user {0} is corrupt")]
    Corrupt(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// What `credentials rotate` did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct RotationReport {
    pub total: usize,
    pub rotated: usize,
    pub already_current: usize,
    pub failed: usize,
}

#[derive(Clone)]
pub struct CredentialVault {
    redis: RedisHandle,
    keyring: Arc<KeyRing>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for CredentialVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialVault")
    }
}

/// Replace the record only if it is still the one that was read (rotation races a writer).
const COMPARE_AND_SET: &str = r#"if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 else return 0 end"#;

impl CredentialVault {
    pub fn new(redis: RedisHandle, keyring: Arc<KeyRing>, clock: Arc<dyn Clock>) -> Self {
        Self {
            redis,
            keyring,
            clock,
        }
    }

    fn key(&self, user_id: &str) -> String {
        self.redis.key(&format!("cred:{user_id}"))
    }

    pub async fn get(&self, user_id: &str) -> Result<Option<CredentialRecord>, VaultError> {
        let mut conn = self.redis.conn().await?;
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.key(user_id))
            .query_async(&mut conn)
            .await?;
        raw.map(|r| serde_json::from_str(&r).map_err(|_| VaultError::Corrupt(user_id.to_owned())))
            .transpose()
    }

    pub async fn put(&self, record: &CredentialRecord) -> Result<(), VaultError> {
        let body = serde_json::to_string(record)
            .map_err(|_| VaultError::Corrupt(record.user_id.clone()))?;
        let mut conn = self.redis.conn().await?;
        redis::cmd("SET")
            .arg(self.key(&record.user_id))
            .arg(body)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// A new record for `user_id` holding `password` (encrypted under the primary key).
    pub fn new_record(
        &self,
        user_id: &str,
        email: &str,
        name: Option<&str>,
        password: &Password,
        status: CredentialStatus,
    ) -> CredentialRecord {
        let now = self.clock.now().unix_timestamp();
        CredentialRecord {
            user_id: user_id.to_owned(),
            email: email.to_owned(),
            name: name.map(str::to_owned),
            librechat_user_id: None,
            password: self.keyring.encrypt(password.expose()),
            status,
            created_at: now,
            updated_at: now,
            last_error: None,
        }
    }

    pub fn password(&self, record: &CredentialRecord) -> Result<Password, VaultError> {
        Ok(Password(self.keyring.decrypt(&record.password)?))
    }

    /// Sets a record's status (and error note), keeping everything else.
    pub async fn set_status(
        &self,
        user_id: &str,
        status: CredentialStatus,
        last_error: Option<String>,
    ) -> Result<(), VaultError> {
        if let Some(mut record) = self.get(user_id).await? {
            record.status = status;
            record.last_error = last_error;
            record.updated_at = self.clock.now().unix_timestamp();
            self.put(&record).await?;
        }
        Ok(())
    }

    /// Re-encrypts every record whose password is not under the primary key.
    pub async fn rotate(&self) -> Result<RotationReport, VaultError> {
        let mut conn = self.redis.conn().await?;
        let pattern = self.redis.key("cred:*");
        let mut report = RotationReport::default();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(200)
                .query_async(&mut conn)
                .await?;
            for key in keys {
                report.total += 1;
                let Some(raw) = redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<String>>(&mut conn)
                    .await?
                else {
                    continue;
                };
                let Ok(mut record) = serde_json::from_str::<CredentialRecord>(&raw) else {
                    tracing::warn!(%key, "credential record is corrupt; left as is");
                    report.failed += 1;
                    continue;
                };
                if self.keyring.is_primary(&record.password) {
                    report.already_current += 1;
                    continue;
                }
                let Ok(plain) = self.keyring.decrypt(&record.password) else {
                    tracing::warn!(user = %record.user_id, "password decrypts under no key of the ring");
                    report.failed += 1;
                    continue;
                };
                record.password = self.keyring.encrypt(&plain);
                let body = serde_json::to_string(&record)
                    .map_err(|_| VaultError::Corrupt(record.user_id.clone()))?;
                let swapped: i64 = redis::Script::new(COMPARE_AND_SET)
                    .key(&key)
                    .arg(&raw)
                    .arg(&body)
                    .invoke_async(&mut conn)
                    .await?;
                if swapped == 1 {
                    report.rotated += 1;
                } else {
                    // Rewritten meanwhile, by a writer that used the primary key.
                    report.already_current += 1;
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(report)
    }
}
