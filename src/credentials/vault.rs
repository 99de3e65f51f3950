//! The credential vault: one record per user, holding the LibreChat password only the BFF
//! knows, Fernet-encrypted. Redis key `{prefix}:cred:{user id}` (a JSON document).
//!
//! The plaintext password leaves this module only as a [`Password`], whose `Debug` is redacted.

use serde::{Deserialize, Serialize};

use super::{CryptoError, KeyRing};
use crate::{clock::Clock, redis_conn::RedisHandle};
use redis::Script;

use std::sync::{Arc, LazyLock};

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
    #[error("credential record of user {0} has no password (deactivated before provisioning)")]
    NoPassword(String),
    #[error("credential record of user {0} keeps changing; gave up")]
    Contended(String),
}

/// Why [`CredentialVault::update`] left a record alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user is deactivated: no transition but reactivation leaves that state.
    Disabled,
    NotDisabled,
    /// A deactivation written before any provisioning: it holds no password.
    Tombstone,
}

/// What [`CredentialVault::update`] did.
#[derive(Debug, Clone)]
pub enum Updated {
    Done(CredentialRecord),
    Missing,
    Refused(Refusal, CredentialStatus),
}

/// Who holds an email after [`CredentialVault::bind_email`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmailOwner {
    This,
    Other(String),
}

/// Replaces `key`'s value `old` with `new`; `false` when someone wrote it meanwhile.
async fn compare_and_set(
    conn: &mut crate::redis_conn::RedisConn,
    key: &str,
    old: &str,
    new: &str,
) -> Result<bool, VaultError> {
    let swapped: i64 = COMPARE_AND_SET
        .key(key)
        .arg(old)
        .arg(new)
        .invoke_async(conn)
        .await?;
    Ok(swapped == 1)
}

fn encode(record: &CredentialRecord) -> Result<String, VaultError> {
    serde_json::to_string(record).map_err(|_| VaultError::Corrupt(record.user_id.clone()))
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
    /// Set once this process knows the email index exists.
    email_index_ready: Arc<std::sync::OnceLock<()>>,
}

impl std::fmt::Debug for CredentialVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialVault")
    }
}

// The vault's scripts, each built once (its SHA1 computed once per process, not per call).

/// Replace the record only if it is still the one that was read (rotation races a writer).
static COMPARE_AND_SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 else return 0 end"#,
    )
});
/// Delete the record only if it is still the one that was read.
static COMPARE_AND_DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 else return 0 end"#,
    )
});
/// First come first served: the email's owner after the call.
static BIND_EMAIL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"local owner = redis.call('GET', KEYS[1]) if owner then return owner end redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]"#,
    )
});

impl CredentialVault {
    pub fn new(redis: RedisHandle, keyring: Arc<KeyRing>, clock: Arc<dyn Clock>) -> Self {
        Self {
            redis,
            keyring,
            clock,
            email_index_ready: Arc::default(),
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

    /// Writes `record` as is (seeding, tests). Production paths use [`Self::create`] and
    /// [`Self::update`], which never overwrite a deactivation.
    pub async fn put(&self, record: &CredentialRecord) -> Result<(), VaultError> {
        let body = encode(record)?;
        let mut conn = self.redis.conn().await?;
        redis::cmd("SET")
            .arg(self.key(&record.user_id))
            .arg(body)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Stores `record` only if the user has none yet. `false`: one exists (maybe a tombstone).
    pub async fn create(&self, record: &CredentialRecord) -> Result<bool, VaultError> {
        let body = encode(record)?;
        let mut conn = self.redis.conn().await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key(&record.user_id))
            .arg(body)
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        Ok(set.is_some())
    }

    /// Read-modify-write of one record with compare-and-set, retried on a concurrent write, so
    /// no writer's change is lost. `change` sees the current record and may refuse.
    pub async fn update<F>(&self, user_id: &str, change: F) -> Result<Updated, VaultError>
    where
        F: Fn(&mut CredentialRecord) -> Result<(), Refusal>,
    {
        let key = self.key(user_id);
        for _ in 0..16 {
            let mut conn = self.redis.conn().await?;
            let raw: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
            let Some(raw) = raw else {
                return Ok(Updated::Missing);
            };
            let mut record: CredentialRecord =
                serde_json::from_str(&raw).map_err(|_| VaultError::Corrupt(user_id.to_owned()))?;
            if let Err(refusal) = change(&mut record) {
                return Ok(Updated::Refused(refusal, record.status));
            }
            record.updated_at = self.clock.now().unix_timestamp();
            let body = encode(&record)?;
            if compare_and_set(&mut conn, &key, &raw, &body).await? {
                return Ok(Updated::Done(record));
            }
        }
        Err(VaultError::Contended(user_id.to_owned()))
    }

    /// Sets a record's status (and error note), keeping everything else. A deactivated user
    /// stays deactivated: only [`Self::reactivate`] lifts that. `false`: nothing was changed.
    pub async fn set_status(
        &self,
        user_id: &str,
        status: CredentialStatus,
        last_error: Option<String>,
    ) -> Result<bool, VaultError> {
        let updated = self
            .update(user_id, |r| {
                if r.status == CredentialStatus::Disabled && status != CredentialStatus::Disabled {
                    return Err(Refusal::Disabled);
                }
                r.status = status;
                r.last_error = last_error.clone();
                Ok(())
            })
            .await?;
        Ok(matches!(updated, Updated::Done(_)))
    }

    /// Deactivates a user, durably: with no record yet (a job queued or running), a tombstone
    /// without a password is written, so whatever provisioning does next cannot make them ready.
    pub async fn disable(&self, user_id: &str, reason: &str) -> Result<(), VaultError> {
        loop {
            let updated = self
                .update(user_id, |r| {
                    r.status = CredentialStatus::Disabled;
                    r.last_error = Some(reason.to_owned());
                    Ok(())
                })
                .await?;
            if !matches!(updated, Updated::Missing) {
                return Ok(());
            }
            let now = self.clock.now().unix_timestamp();
            let tombstone = CredentialRecord {
                user_id: user_id.to_owned(),
                email: String::new(),
                name: None,
                librechat_user_id: None,
                password: String::new(),
                status: CredentialStatus::Disabled,
                created_at: now,
                updated_at: now,
                last_error: Some(reason.to_owned()),
            };
            if self.create(&tombstone).await? {
                return Ok(());
            }
            // A record appeared meanwhile: disable that one.
        }
    }

    /// Lifts a deactivation (explicit registration by ops or the identity service). A tombstone
    /// is removed, so provisioning starts afresh; a real record becomes `drifted`: its account
    /// exists, and provisioning confirms (or recovers) the password. `true`: it was disabled.
    pub async fn reactivate(&self, user_id: &str) -> Result<bool, VaultError> {
        let key = self.key(user_id);
        let updated = self
            .update(user_id, |r| {
                if r.status != CredentialStatus::Disabled {
                    return Err(Refusal::NotDisabled);
                }
                if r.password.is_empty() {
                    return Err(Refusal::Tombstone);
                }
                r.status = CredentialStatus::Drifted;
                r.last_error = Some("reactivated; the password is confirmed again".into());
                Ok(())
            })
            .await?;
        match updated {
            Updated::Done(_) => Ok(true),
            Updated::Refused(Refusal::Tombstone, _) => {
                let mut conn = self.redis.conn().await?;
                let raw: Option<String> =
                    redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
                let Some(raw) = raw else { return Ok(false) };
                // Delete only the tombstone we saw, never a record written meanwhile.
                let deleted: i64 = COMPARE_AND_DELETE
                    .key(&key)
                    .arg(&raw)
                    .invoke_async(&mut conn)
                    .await?;
                Ok(deleted == 1)
            }
            _ => Ok(false),
        }
    }

    fn email_key(&self, email: &str) -> String {
        self.redis.key(&format!("email:{email}"))
    }

    /// Binds a (normalised) email to one identity user, atomically, first come first served.
    /// LibreChat keys accounts by email, so whoever holds the binding owns that LibreChat account
    /// and nobody else may register or reset it. Returns the owner after the call.
    pub async fn bind_email(&self, email: &str, user_id: &str) -> Result<EmailOwner, VaultError> {
        self.ensure_email_index().await?;
        let mut conn = self.redis.conn().await?;
        let owner: String = BIND_EMAIL
            .key(self.email_key(email))
            .arg(user_id)
            .invoke_async(&mut conn)
            .await?;
        Ok(if owner == user_id {
            EmailOwner::This
        } else {
            EmailOwner::Other(owner)
        })
    }

    /// The identity user an email is bound to.
    pub async fn email_owner(&self, email: &str) -> Result<Option<String>, VaultError> {
        self.ensure_email_index().await?;
        let mut conn = self.redis.conn().await?;
        Ok(redis::cmd("GET")
            .arg(self.email_key(email))
            .query_async(&mut conn)
            .await?)
    }

    /// Credential records written before email bindings existed get theirs once per Redis (a
    /// marker key records it): for an email held by several records the oldest record wins.
    async fn ensure_email_index(&self) -> Result<(), VaultError> {
        if self.email_index_ready.get().is_some() {
            return Ok(());
        }
        let marker = self.redis.key("email-index:v1");
        let mut conn = self.redis.conn().await?;
        let built: bool = redis::cmd("EXISTS")
            .arg(&marker)
            .query_async(&mut conn)
            .await?;
        if !built {
            let mut oldest: std::collections::HashMap<String, (i64, String)> = Default::default();
            // Every master's keys on a cluster.
            let keys = self
                .redis
                .scan_keys(&self.redis.key("cred:*"), usize::MAX)
                .await?;
            for key in keys {
                let raw: Option<String> =
                    redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
                let Some(record) =
                    raw.and_then(|r| serde_json::from_str::<CredentialRecord>(&r).ok())
                else {
                    continue;
                };
                if record.email.is_empty() {
                    continue;
                }
                let email = provisioning::normalize_email(&record.email);
                let entry = oldest
                    .entry(email)
                    .or_insert((record.created_at, record.user_id.clone()));
                if record.created_at < entry.0 {
                    tracing::warn!(kept = %record.user_id, other = %entry.1, "two credential records share one email; the older keeps it");
                    *entry = (record.created_at, record.user_id.clone());
                } else if entry.1 != record.user_id {
                    tracing::warn!(kept = %entry.1, other = %record.user_id, "two credential records share one email; the older keeps it");
                }
            }
            for (email, (_, user_id)) in oldest {
                redis::cmd("SET")
                    .arg(self.email_key(&email))
                    .arg(user_id)
                    .arg("NX")
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            redis::cmd("SET")
                .arg(&marker)
                .arg(self.clock.now().unix_timestamp())
                .query_async::<()>(&mut conn)
                .await?;
        }
        let _ = self.email_index_ready.set(());
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
        if record.password.is_empty() {
            return Err(VaultError::NoPassword(record.user_id.clone()));
        }
        Ok(Password(self.keyring.decrypt(&record.password)?))
    }

    /// Re-encrypts every record whose password is not under the primary key.
    pub async fn rotate(&self) -> Result<RotationReport, VaultError> {
        let mut conn = self.redis.conn().await?;
        // The keys first (every master's on a cluster), then each record is read and
        // rewritten.
        let keys = self
            .redis
            .scan_keys(&self.redis.key("cred:*"), usize::MAX)
            .await?;
        let mut report = RotationReport::default();
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
            if compare_and_set(&mut conn, &key, &raw, &body).await? {
                report.rotated += 1;
            } else {
                // Rewritten meanwhile, by a writer that used the primary key.
                report.already_current += 1;
            }
        }
        Ok(report)
    }
}
