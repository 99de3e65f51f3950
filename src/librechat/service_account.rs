//! LibreChat's first account. A fresh LibreChat makes the FIRST account it registers `ADMIN`;
//! without care that would be whichever product user happens to be provisioned first. So before
//! the BFF registers any product user it registers a reserved service account of its own
//! (`provisioning.service_account_email`), once per Redis: a record at
//! `{prefix}:librechat-service-account` says it is done, and which role LibreChat gave it.
//!
//! The service account's email is bound to a reserved owner that no identity user id can equal
//! (ids with control characters are refused), so no product user can claim or reset it.

use std::{sync::Arc, time::Duration};

use provisioning::{workflow::generate_password, LibreChatFailure};
use serde::{Deserialize, Serialize};

use super::{LibreChatClient, LibreChatError};
use crate::{
    credentials::{
        vault::{CredentialVault, EmailOwner},
        KeyRing,
    },
    end_user::ClientInfo,
    lock::RedisLock,
    redis_conn::RedisHandle,
};

/// The owner recorded in the email binding of the service account.
pub const SERVICE_OWNER: &str = "\u{1}librechat-bff-service-account";

/// LibreChat's display name for the service account (3–80 characters).
const NAME: &str = "librechat-bff service";

#[derive(Serialize, Deserialize)]
struct Record {
    email: String,
    /// Fernet token of the password.
    password: String,
    /// The role LibreChat reported at the confirming login; `None` until confirmed.
    #[serde(default)]
    role: Option<String>,
}

pub struct ServiceAccount {
    redis: RedisHandle,
    keyring: Arc<KeyRing>,
    vault: CredentialVault,
    email: String,
    /// Set once this process has seen the account confirmed.
    ready: std::sync::OnceLock<()>,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("email", &self.email)
            .finish_non_exhaustive()
    }
}

fn failure(e: LibreChatError) -> LibreChatFailure {
    match e {
        LibreChatError::RateLimited { retry_after } => LibreChatFailure::RateLimited(retry_after),
        LibreChatError::Rejected { message, .. } => LibreChatFailure::Invalid(format!(
            "registering the service account ({message}); set provisioning.service_account_email \
             to an address LibreChat accepts"
        )),
        other => LibreChatFailure::Unavailable(other.to_string()),
    }
}

impl ServiceAccount {
    pub fn new(
        redis: RedisHandle,
        keyring: Arc<KeyRing>,
        vault: CredentialVault,
        email: &str,
    ) -> Self {
        Self {
            redis,
            keyring,
            vault,
            email: provisioning::normalize_email(email),
            ready: std::sync::OnceLock::new(),
        }
    }

    /// The service account's (normalised) email: no product user may have it.
    pub fn email(&self) -> &str {
        &self.email
    }

    fn key(&self) -> String {
        self.redis.key("librechat-service-account")
    }

    async fn load(&self) -> Result<Option<Record>, LibreChatFailure> {
        let mut conn = self.redis.conn().await.map_err(unavailable)?;
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.key())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }

    async fn store(&self, record: &Record) -> Result<(), LibreChatFailure> {
        let body = serde_json::to_string(record)
            .map_err(|e| LibreChatFailure::Unavailable(e.to_string()))?;
        let mut conn = self.redis.conn().await.map_err(unavailable)?;
        redis::cmd("SET")
            .arg(self.key())
            .arg(body)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    /// Makes sure the service account exists before a product user is registered.
    pub async fn ensure(
        &self,
        client: &LibreChatClient,
        caller: &ClientInfo,
    ) -> Result<(), LibreChatFailure> {
        if self.ready.get().is_some() {
            return Ok(());
        }
        if self.load().await?.is_some_and(|r| r.role.is_some()) {
            let _ = self.ready.set(());
            return Ok(());
        }
        let lock = match RedisLock::acquire(
            &self.redis,
            self.redis.key("lock:librechat-service-account"),
            Duration::from_secs(120),
            Duration::from_secs(1),
        )
        .await
        {
            Ok(lock) => lock,
            // Another worker is at it: this job waits without spending an attempt.
            Err(_) => return Err(LibreChatFailure::RateLimited(Duration::from_secs(2))),
        };
        let result = self.create(client, caller).await;
        lock.release().await;
        result
    }

    async fn create(
        &self,
        client: &LibreChatClient,
        caller: &ClientInfo,
    ) -> Result<(), LibreChatFailure> {
        let record = match self.load().await? {
            Some(r) if r.role.is_some() => {
                let _ = self.ready.set(());
                return Ok(());
            }
            Some(r) if r.email == self.email => r,
            _ => {
                let record = Record {
                    email: self.email.clone(),
                    password: self.keyring.encrypt(&generate_password()),
                    role: None,
                };
                // Stored before LibreChat hears of it: a crash after registering loses nothing.
                self.store(&record).await?;
                record
            }
        };
        match self.vault.bind_email(&self.email, SERVICE_OWNER).await {
            Ok(EmailOwner::This) => {}
            Ok(EmailOwner::Other(owner)) => {
                return Err(LibreChatFailure::Invalid(format!(
                    "provisioning.service_account_email is bound to identity user {owner}; \
                     configure an address no product user has"
                )))
            }
            Err(e) => return Err(LibreChatFailure::Unavailable(e.to_string())),
        }
        let password = self
            .keyring
            .decrypt(&record.password)
            .map_err(|e| LibreChatFailure::Unavailable(e.to_string()))?;
        client
            .register(NAME, &self.email, &password, caller)
            .await
            .map_err(failure)?;
        let role = match client.login(&self.email, &password, caller).await {
            Ok(login) => {
                if let Err(e) = client
                    .logout(&login.token, &login.refresh_token, caller)
                    .await
                {
                    tracing::debug!(error = %e, "logout after the service account's login failed");
                }
                login.role.unwrap_or_else(|| "unknown".into())
            }
            // The address existed before with another password: LibreChat had accounts already,
            // so a product user cannot be its first one either.
            Err(LibreChatError::BadCredentials) => "unknown".into(),
            Err(e) => return Err(failure(e)),
        };
        if role == "ADMIN" {
            tracing::info!("LibreChat's first (ADMIN) account is the BFF's service account");
        } else {
            tracing::warn!(
                %role,
                "LibreChat had accounts before the BFF's service account; check in LibreChat who holds ADMIN"
            );
        }
        self.store(&Record {
            role: Some(role),
            ..record
        })
        .await?;
        let _ = self.ready.set(());
        Ok(())
    }
}

fn unavailable(e: redis::RedisError) -> LibreChatFailure {
    LibreChatFailure::Unavailable(format!("redis: {e}"))
}
