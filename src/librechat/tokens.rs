//! Per-user LibreChat logins. Tokens belong to the USER: every web and mobile session of a user
//! shares one LibreChat login, cached in Redis (`{prefix}:lc-login:{user id}`, both tokens
//! Fernet-encrypted) and in process.
//!
//! The warm path is an in-process lookup: no Redis, no decryption. Refresh and re-login are
//! single-flight per user, in process and across replicas (Redis lock, then re-read the record
//! and act only if it is still the one we saw): LibreChat rotates the refresh token, so a second
//! refresh with the old one would destroy the LibreChat session.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use futures_util::StreamExt;

use axum::http::HeaderValue;
use serde::{Deserialize, Serialize};

use super::client::{LibreChatClient, LibreChatError, LibreChatLogin};
use crate::{
    client::ClientInfo,
    clock::Clock,
    credentials::{
        vault::{CredentialStatus, CredentialVault, VaultError},
        KeyRing,
    },
    lock::{LocalLocks, LockError, RedisLock},
    redis_conn::RedisHandle,
    telemetry::metrics::Metrics,
};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the user's LibreChat account is not provisioned yet")]
    ProvisioningPending,
    #[error("the stored LibreChat credential no longer works")]
    CredentialInvalid,
    #[error("the user is deactivated")]
    Disabled,
    #[error("the user's email is bound to another identity user")]
    Conflict,
    #[error("LibreChat refused a token it issued moments ago")]
    RejectedFresh,
    #[error("LibreChat rate limit; retry after {}s", .0.as_secs())]
    RateLimited(Duration),
    #[error("LibreChat has banned this user or address")]
    Banned,
    #[error("LibreChat unavailable: {0}")]
    Unavailable(String),
    #[error("store unavailable: {0}")]
    Store(String),
}

impl From<redis::RedisError> for TokenError {
    fn from(e: redis::RedisError) -> Self {
        Self::Store(e.to_string())
    }
}

impl From<VaultError> for TokenError {
    fn from(e: VaultError) -> Self {
        match e {
            VaultError::Unavailable(e) => Self::Store(e.to_string()),
            VaultError::Corrupt(_) | VaultError::Crypto(_) | VaultError::NoPassword(_) => {
                Self::CredentialInvalid
            }
            VaultError::Contended(m) => Self::Store(m),
        }
    }
}

impl From<LockError> for TokenError {
    fn from(e: LockError) -> Self {
        Self::Store(e.to_string())
    }
}

/// A user's current LibreChat access token, ready to send.
#[derive(Clone, Debug)]
pub struct UpstreamToken {
    /// `Bearer <token>`, built once per token rather than per request.
    pub authorization: HeaderValue,
    pub exp: i64,
    pub generation: u64,
}

/// After a token renewed because of a 401 was refused too, further 401s of the user renew
/// nothing for this long: LibreChat refusing fresh tokens (a deleted or blocked account) would
/// otherwise cost one renewal per request.
const FUTILE_RENEWAL_PAUSE: i64 = 10;

#[derive(Serialize, Deserialize)]
struct Secrets {
    token: String,
    refresh: String,
}

/// The Redis record.
#[derive(Serialize, Deserialize)]
struct StoredLogin {
    enc: String,
    exp: i64,
    refresh_exp: i64,
    generation: u64,
    #[serde(default)]
    librechat_user_id: Option<String>,
}

struct Decrypted {
    token: String,
    refresh: String,
    exp: i64,
    refresh_exp: i64,
    generation: u64,
}

pub struct TokenManager {
    client: LibreChatClient,
    vault: CredentialVault,
    redis: RedisHandle,
    keyring: Arc<KeyRing>,
    clock: Arc<dyn Clock>,
    skew: i64,
    cache: Arc<RwLock<HashMap<String, UpstreamToken>>>,
    /// Bumped by every revocation seen: a renewal that raced one is not cached.
    revocations: Arc<AtomicU64>,
    /// Users whose renewal after a 401 was refused too, and when (see `FUTILE_RENEWAL_PAUSE`).
    futile: std::sync::Mutex<HashMap<String, i64>>,
    locks: LocalLocks,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("skew", &self.skew)
            .finish()
    }
}

/// Why the slow path runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// The token this request saw (generation, if any) is missing or near expiry.
    Fresh(Option<u64>),
    /// LibreChat answered 401 to the token of this generation.
    Rejected(u64),
}

impl Need {
    /// Whether a token (generation `gen`, expiring at `exp`) found after waiting for the lock
    /// serves: one renewed by somebody else meanwhile is taken as long as it is still valid —
    /// renewing again would spend the rotating refresh token twice.
    fn satisfied_by(self, gen: u64, exp: i64, now: i64, skew: i64) -> bool {
        match self {
            Need::Fresh(seen) => exp > now && (exp - skew > now || seen != Some(gen)),
            Need::Rejected(rejected) => exp > now && gen != rejected,
        }
    }
}

fn forget(
    cache: &RwLock<HashMap<String, UpstreamToken>>,
    revocations: &AtomicU64,
    user_id: Option<&str>,
) {
    revocations.fetch_add(1, Ordering::AcqRel);
    let mut cache = cache.write().unwrap_or_else(|p| p.into_inner());
    match user_id {
        Some(user) => {
            cache.remove(user);
        }
        None => cache.clear(),
    }
}

impl TokenManager {
    pub fn new(
        client: LibreChatClient,
        vault: CredentialVault,
        redis: RedisHandle,
        keyring: Arc<KeyRing>,
        clock: Arc<dyn Clock>,
        skew: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            vault,
            redis,
            keyring,
            clock,
            skew: skew.as_secs() as i64,
            cache: Arc::default(),
            revocations: Arc::default(),
            futile: Default::default(),
            locks: LocalLocks::default(),
            metrics,
        }
    }

    pub fn client(&self) -> &LibreChatClient {
        &self.client
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    fn cached(&self, user_id: &str) -> Option<UpstreamToken> {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        cache.get(user_id).cloned()
    }

    /// The user's access token: from process memory when fresh, else renewed (single-flight).
    pub async fn token(
        &self,
        user_id: &str,
        client: &ClientInfo,
    ) -> Result<UpstreamToken, TokenError> {
        let seen = self.cached(user_id);
        if let Some(t) = &seen {
            if t.exp - self.skew > self.now() {
                return Ok(t.clone());
            }
        }
        self.renew(user_id, client, Need::Fresh(seen.map(|t| t.generation)))
            .await
    }

    /// After LibreChat answered 401 to `rejected`: a new token (refresh, else re-login), unless
    /// another request already replaced it.
    pub async fn replace(
        &self,
        user_id: &str,
        rejected: &UpstreamToken,
        client: &ClientInfo,
    ) -> Result<UpstreamToken, TokenError> {
        if self.renewal_is_futile(user_id) {
            return Err(TokenError::RejectedFresh);
        }
        self.renew(user_id, client, Need::Rejected(rejected.generation))
            .await
    }

    /// LibreChat refused the token `replace` just gave: for a while, 401s of this user renew
    /// nothing more (the next request re-reads the stored token instead).
    pub fn renewal_refused(&self, user_id: &str, token: &UpstreamToken) {
        self.invalidate(user_id, token.generation);
        let now = self.now();
        let mut futile = self.futile.lock().unwrap_or_else(|p| p.into_inner());
        if futile.len() >= 10_000 {
            futile.retain(|_, at| now - *at < FUTILE_RENEWAL_PAUSE);
        }
        futile.insert(user_id.to_owned(), now);
    }

    fn renewal_is_futile(&self, user_id: &str) -> bool {
        let now = self.now();
        let futile = self.futile.lock().unwrap_or_else(|p| p.into_inner());
        futile
            .get(user_id)
            .is_some_and(|at| (0..FUTILE_RENEWAL_PAUSE).contains(&(now - at)))
    }

    /// Forgets the token of `generation` in this process (the next request renews it).
    pub fn invalidate(&self, user_id: &str, generation: u64) {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if cache
            .get(user_id)
            .is_some_and(|t| t.generation == generation)
        {
            cache.remove(user_id);
        }
    }

    /// Logs the user out of LibreChat and forgets the login (deactivation, revocation).
    pub async fn sign_out(&self, user_id: &str, client: &ClientInfo) -> Result<(), TokenError> {
        let _local = self.locks.lock(user_id).await;
        let lock = self.lock(user_id).await?;
        let result = async {
            if let Some(login) = self.load(user_id).await? {
                if let Err(e) = self.client.logout(&login.token, &login.refresh, client).await {
                    tracing::warn!(user = %user_id, error = %e, "LibreChat logout failed; forgetting the login anyway");
                }
            }
            let mut conn = self.redis.conn().await?;
            redis::cmd("DEL")
                .arg(self.key(user_id))
                .query_async::<i64>(&mut conn)
                .await?;
            self.forget(user_id);
            // Every replica drops its in-process copy (see `listen_for_revocations`).
            redis::cmd("PUBLISH")
                .arg(self.revocation_channel())
                .arg(user_id)
                .query_async::<i64>(&mut conn)
                .await?;
            Ok(())
        }
        .await;
        lock.release().await;
        result
    }

    fn key(&self, user_id: &str) -> String {
        self.redis.key(&format!("lc-login:{user_id}"))
    }

    fn revocation_channel(&self) -> String {
        self.redis.key("revoked-logins")
    }

    fn forget(&self, user_id: &str) {
        forget(&self.cache, &self.revocations, Some(user_id));
    }

    /// Follows revocations published by any replica (deactivation, sign-out) and drops the
    /// user's token from this process's cache at once, so no replica keeps serving a revoked
    /// user from memory. After any gap in the subscription the whole cache is dropped (a
    /// revocation may have been missed); tokens are then re-read from Redis.
    pub fn listen_for_revocations(&self) -> tokio::task::JoinHandle<()> {
        let redis = self.redis.clone();
        let channel = self.revocation_channel();
        let cache = self.cache.clone();
        let revocations = self.revocations.clone();
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(200);
            let mut warned = false;
            loop {
                let subscribed = async {
                    let client = redis.client().await?;
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                }
                .await;
                match subscribed {
                    Ok(pubsub) => {
                        forget(&cache, &revocations, None);
                        pause = Duration::from_millis(200);
                        warned = false;
                        let mut messages = pubsub.into_on_message();
                        while let Some(msg) = messages.next().await {
                            let user: String = msg.get_payload().unwrap_or_default();
                            forget(&cache, &revocations, Some(&user));
                        }
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(error = %e, "cannot follow LibreChat login revocations; retrying");
                            warned = true;
                        }
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        })
    }

    async fn lock(&self, user_id: &str) -> Result<RedisLock, TokenError> {
        Ok(RedisLock::acquire(
            &self.redis,
            self.redis.key(&format!("lock:lc-login:{user_id}")),
            Duration::from_secs(30),
            Duration::from_secs(30),
        )
        .await?)
    }

    async fn renew(
        &self,
        user_id: &str,
        client: &ClientInfo,
        need: Need,
    ) -> Result<UpstreamToken, TokenError> {
        let _local = self.locks.lock(user_id).await;
        // Someone in this process may have renewed while we waited.
        if let Some(t) = self.cached(user_id) {
            if need.satisfied_by(t.generation, t.exp, self.now(), self.skew) {
                return Ok(t);
            }
        }
        let epoch = self.revocations.load(Ordering::Acquire);
        let lock = self.lock(user_id).await?;
        let result = self.renew_locked(user_id, client, need).await;
        lock.release().await;
        let token = result?;
        if self.revocations.load(Ordering::Acquire) != epoch {
            // A revocation arrived meanwhile: serve this request, remember nothing.
            return Ok(token);
        }
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= 10_000 {
            // Bounded memory: drop expired entries (their users re-acquire from Redis).
            let now = self.now();
            cache.retain(|_, t| t.exp > now);
        }
        cache.insert(user_id.to_owned(), token.clone());
        Ok(token)
    }

    async fn renew_locked(
        &self,
        user_id: &str,
        client: &ClientInfo,
        need: Need,
    ) -> Result<UpstreamToken, TokenError> {
        let now = self.now();
        let stored = self.load(user_id).await?;
        if let Some(s) = &stored {
            // Another replica may have renewed already: adopt its token.
            if need.satisfied_by(s.generation, s.exp, now, self.skew) {
                return upstream(&s.token, s.exp, s.generation);
            }
        }
        let generation = stored.as_ref().map_or(0, |s| s.generation) + 1;
        if let Some(s) = &stored {
            if s.refresh_exp > now {
                let refreshed = self.client.refresh(&s.refresh, client).await;
                self.metrics
                    .librechat("refresh", outcome_label(refreshed.as_ref().err()));
                match refreshed {
                    Ok(login) => return self.save(user_id, &login, generation).await,
                    Err(LibreChatError::SessionExpired) => {
                        tracing::info!(user = %user_id, "LibreChat session gone; logging in again");
                    }
                    Err(e) if s.exp > now && matches!(need, Need::Fresh(_)) => {
                        // Transient trouble while the token still works: use it.
                        tracing::warn!(user = %user_id, error = %e, "LibreChat refresh failed; token still valid");
                        return upstream(&s.token, s.exp, s.generation);
                    }
                    Err(e) => return Err(map_error(e)),
                }
            }
        }
        let operation = if stored.is_some() { "relogin" } else { "login" };
        let login = self.login(user_id, client, operation).await?;
        self.save(user_id, &login, generation).await
    }

    /// Logs in with the vault's credential.
    async fn login(
        &self,
        user_id: &str,
        client: &ClientInfo,
        operation: &'static str,
    ) -> Result<LibreChatLogin, TokenError> {
        let Some(record) = self.vault.get(user_id).await? else {
            return Err(TokenError::ProvisioningPending);
        };
        match record.status {
            CredentialStatus::Ready => {}
            CredentialStatus::Provisioning => return Err(TokenError::ProvisioningPending),
            CredentialStatus::Disabled => return Err(TokenError::Disabled),
            CredentialStatus::Conflict => return Err(TokenError::Conflict),
            CredentialStatus::Drifted => return Err(TokenError::CredentialInvalid),
        }
        let password = self.vault.password(&record)?;
        let result = self
            .client
            .login(&record.email, password.expose(), client)
            .await;
        self.metrics
            .librechat(operation, outcome_label(result.as_ref().err()));
        match result {
            Ok(login) => Ok(login),
            Err(LibreChatError::BadCredentials) => {
                tracing::warn!(user = %user_id, "LibreChat refused the stored password; marking the credential drifted");
                self.vault
                    .set_status(
                        user_id,
                        CredentialStatus::Drifted,
                        Some("LibreChat refused the stored password at login".into()),
                    )
                    .await?;
                Err(TokenError::CredentialInvalid)
            }
            Err(e) => Err(map_error(e)),
        }
    }

    async fn load(&self, user_id: &str) -> Result<Option<Decrypted>, TokenError> {
        let mut conn = self.redis.conn().await?;
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.key(user_id))
            .query_async(&mut conn)
            .await?;
        let Some(raw) = raw else { return Ok(None) };
        let Ok(stored) = serde_json::from_str::<StoredLogin>(&raw) else {
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
        Ok(Some(Decrypted {
            token: secrets.token,
            refresh: secrets.refresh,
            exp: stored.exp,
            refresh_exp: stored.refresh_exp,
            generation: stored.generation,
        }))
    }

    async fn save(
        &self,
        user_id: &str,
        login: &LibreChatLogin,
        generation: u64,
    ) -> Result<UpstreamToken, TokenError> {
        let secrets = serde_json::to_string(&Secrets {
            token: login.token.clone(),
            refresh: login.refresh_token.clone(),
        })
        .map_err(|e| TokenError::Store(e.to_string()))?;
        let record = StoredLogin {
            enc: self.keyring.encrypt(&secrets),
            exp: login.token_exp,
            refresh_exp: login.refresh_exp,
            generation,
            librechat_user_id: login.user_id.clone(),
        };
        let body = serde_json::to_string(&record).map_err(|e| TokenError::Store(e.to_string()))?;
        let ttl = (login.refresh_exp.max(login.token_exp) - self.now()).max(60);
        let mut conn = self.redis.conn().await?;
        redis::cmd("SET")
            .arg(self.key(user_id))
            .arg(body)
            .arg("EX")
            .arg(ttl)
            .query_async::<()>(&mut conn)
            .await?;
        upstream(&login.token, login.token_exp, generation)
    }
}

fn outcome_label(e: Option<&LibreChatError>) -> &'static str {
    match e {
        None => "ok",
        Some(LibreChatError::SessionExpired) => "session_expired",
        Some(LibreChatError::BadCredentials) => "bad_credentials",
        Some(LibreChatError::RateLimited { .. }) => "rate_limited",
        Some(LibreChatError::Banned) => "banned",
        Some(LibreChatError::Unavailable(_)) => "unavailable",
        Some(_) => "error",
    }
}

fn upstream(token: &str, exp: i64, generation: u64) -> Result<UpstreamToken, TokenError> {
    let mut authorization = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| TokenError::Unavailable("LibreChat issued an unusable token".into()))?;
    authorization.set_sensitive(true);
    Ok(UpstreamToken {
        authorization,
        exp,
        generation,
    })
}

fn map_error(e: LibreChatError) -> TokenError {
    match e {
        LibreChatError::RateLimited { retry_after } => TokenError::RateLimited(retry_after),
        LibreChatError::Banned => TokenError::Banned,
        LibreChatError::BadCredentials | LibreChatError::TwoFactorRequired => {
            TokenError::CredentialInvalid
        }
        other => TokenError::Unavailable(other.to_string()),
    }
}
