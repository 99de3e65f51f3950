//! Per-user LibreChat logins. Tokens belong to the USER: every web and mobile session of a user
//! shares one LibreChat login, cached in Redis (`{prefix}:lc-login:{user id}`, both tokens
//! Fernet-encrypted) and in process.
//!
//! The warm path is an in-process lookup: no Redis, no decryption. Refresh and re-login are
//! single-flight per user, in process and across replicas (Redis lock, then re-read the record
//! and act only if it is still the one we saw): LibreChat rotates the refresh token, so a second
//! refresh with the old one would destroy the LibreChat session.
//!
//! Failure semantics:
//! - A renewal runs detached from the request that needed it (a spawned task the request
//!   awaits): a client that disconnects mid-renewal cannot drop a refresh cookie LibreChat has
//!   already rotated; the result is stored and cached whoever is still waiting.
//! - The Redis lock is extended while the renewal runs (see `crate::lock`), so a slow LibreChat
//!   never lets a second replica refresh with a token that is already spent.
//! - A renewal that failed (LibreChat unreachable, rate limiting, ban) is remembered for a few
//!   seconds: requests in that window get the still-valid token, or the same error, without
//!   asking LibreChat again.
//! - In-process state (token cache, pauses, remembered failures) is bounded in size and time.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::StreamExt;

use axum::http::HeaderValue;
use moka::{ops::compute::Op, sync::Cache};
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
    /// Another renewal of this user's login (in this process or another replica) did not finish
    /// within the wait bound.
    #[error("a renewal of this user's LibreChat login is still running")]
    Busy,
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
        match e {
            LockError::Redis(e) => Self::Store(e.to_string()),
            LockError::Timeout(_) => Self::Busy,
        }
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
/// A renewal that failed (LibreChat unreachable, banned) is not retried for this long; a rate
/// limit is respected for its `Retry-After`, up to `MAX_FAILURE_MEMORY`.
const FAILED_RENEWAL_PAUSE: i64 = 5;
const MAX_FAILURE_MEMORY: i64 = 60;
/// The Redis lock's TTL. The watchdog extends it while the renewal runs, so this only bounds
/// how long a crashed replica blocks the user.
const LOCK_TTL: Duration = Duration::from_secs(30);
/// How long a request waits for a renewal running elsewhere (another replica, or another
/// request of this process) before answering 503 `busy`.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// Users whose token is kept in process memory (each entry is well under 1 KiB); the others
/// read theirs from Redis. Entries also expire after `CACHE_TTL`.
pub const TOKEN_CACHE_CAPACITY: u64 = 50_000;
const CACHE_TTL: Duration = Duration::from_secs(30 * 60);
/// Users with a renewal pause or a remembered failure kept at once.
pub const PAUSE_CAPACITY: u64 = 50_000;

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

/// A renewal failure remembered for a moment (see `FAILED_RENEWAL_PAUSE`).
#[derive(Clone, Copy, Debug)]
enum Failure {
    Unavailable,
    RateLimited,
    Banned,
}

#[derive(Clone, Copy, Debug)]
struct Remembered {
    failure: Failure,
    /// Unix seconds: when it happened, and until when it holds.
    at: i64,
    until: i64,
}

/// Entry counts of the in-process state (every one bounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEntries {
    pub cached_tokens: u64,
    pub renewal_pauses: u64,
    pub remembered_failures: u64,
}

pub struct TokenManager {
    inner: Arc<Inner>,
}

struct Inner {
    client: LibreChatClient,
    vault: CredentialVault,
    redis: RedisHandle,
    keyring: Arc<KeyRing>,
    clock: Arc<dyn Clock>,
    skew: i64,
    cache: Cache<String, UpstreamToken>,
    /// Bumped by every revocation seen: a renewal that raced one is not cached.
    revocations: AtomicU64,
    /// Users whose renewal after a 401 was refused too, and when (see `FUTILE_RENEWAL_PAUSE`).
    futile: Cache<String, i64>,
    /// Users whose last renewal failed moments ago (see `FAILED_RENEWAL_PAUSE`).
    failures: Cache<String, Remembered>,
    locks: LocalLocks,
    metrics: Arc<Metrics>,
    lock_ttl_ms: AtomicU64,
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("skew", &self.inner.skew)
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
        let inner = Inner {
            client,
            vault,
            redis,
            keyring,
            clock,
            skew: skew.as_secs() as i64,
            cache: Cache::builder()
                .max_capacity(TOKEN_CACHE_CAPACITY)
                .time_to_live(CACHE_TTL)
                .build(),
            revocations: AtomicU64::new(0),
            futile: Cache::builder()
                .max_capacity(PAUSE_CAPACITY)
                .time_to_live(Duration::from_secs(FUTILE_RENEWAL_PAUSE as u64))
                .build(),
            failures: Cache::builder()
                .max_capacity(PAUSE_CAPACITY)
                .time_to_live(Duration::from_secs(MAX_FAILURE_MEMORY as u64))
                .build(),
            locks: LocalLocks::default(),
            metrics,
            lock_ttl_ms: AtomicU64::new(LOCK_TTL.as_millis() as u64),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    pub fn client(&self) -> &LibreChatClient {
        &self.inner.client
    }

    /// The user's access token: from process memory when fresh, else renewed (single-flight).
    pub async fn token(
        &self,
        user_id: &str,
        client: &ClientInfo,
    ) -> Result<UpstreamToken, TokenError> {
        let inner = &self.inner;
        let seen = inner.cached(user_id);
        if let Some(t) = &seen {
            let now = inner.now();
            if t.exp - inner.skew > now {
                return Ok(t.clone());
            }
            // Due for renewal, but the last attempt failed moments ago: keep using it.
            if t.exp > now && inner.recent_failure(user_id, now).is_some() {
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
        self.inner
            .futile
            .insert(user_id.to_owned(), self.inner.now());
    }

    fn renewal_is_futile(&self, user_id: &str) -> bool {
        let now = self.inner.now();
        self.inner
            .futile
            .get(user_id)
            .is_some_and(|at| (0..FUTILE_RENEWAL_PAUSE).contains(&(now - at)))
    }

    /// Forgets the token of `generation` in this process (the next request renews it).
    pub fn invalidate(&self, user_id: &str, generation: u64) {
        self.inner
            .cache
            .entry_by_ref(user_id)
            .and_compute_with(|entry| match entry {
                Some(e) if e.value().generation == generation => Op::Remove,
                _ => Op::Nop,
            });
    }

    /// Logs the user out of LibreChat and forgets the login (deactivation, revocation).
    pub async fn sign_out(&self, user_id: &str, client: &ClientInfo) -> Result<(), TokenError> {
        let inner = &self.inner;
        let _local = inner.locks.lock_within(user_id, LOCK_WAIT).await?;
        let lock = inner.lock(user_id).await?;
        let result = async {
            if let Some(login) = inner.load(user_id).await? {
                if let Err(e) = inner.client.logout(&login.token, &login.refresh, client).await {
                    tracing::warn!(user = %user_id, error = %e, "LibreChat logout failed; forgetting the login anyway");
                }
            }
            let mut conn = inner.redis.conn().await?;
            redis::cmd("DEL")
                .arg(inner.key(user_id))
                .query_async::<i64>(&mut conn)
                .await?;
            inner.forget(Some(user_id));
            // Every replica drops its in-process copy (see `listen_for_revocations`).
            redis::cmd("PUBLISH")
                .arg(inner.revocation_channel())
                .arg(user_id)
                .query_async::<i64>(&mut conn)
                .await?;
            Ok(())
        }
        .await;
        lock.release().await;
        result
    }

    /// Follows revocations published by any replica (deactivation, sign-out) and drops the
    /// user's token from this process's cache at once, so no replica keeps serving a revoked
    /// user from memory. After any gap in the subscription the whole cache is dropped (a
    /// revocation may have been missed); tokens are then re-read from Redis.
    pub fn listen_for_revocations(&self) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let channel = inner.revocation_channel();
            let mut pause = Duration::from_millis(200);
            let mut warned = false;
            loop {
                let subscribed = async {
                    let client = inner.redis.client().await?;
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                }
                .await;
                match subscribed {
                    Ok(pubsub) => {
                        inner.forget(None);
                        pause = Duration::from_millis(200);
                        warned = false;
                        let mut messages = pubsub.into_on_message();
                        while let Some(msg) = messages.next().await {
                            let user: String = msg.get_payload().unwrap_or_default();
                            inner.forget(Some(&user));
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

    /// Test hook: the TTL of the per-user Redis lock (default 30 s). The watchdog extends the
    /// lock every third of it while a renewal runs.
    #[doc(hidden)]
    pub fn set_lock_ttl(&self, ttl: Duration) {
        self.inner
            .lock_ttl_ms
            .store(ttl.as_millis().max(30) as u64, Ordering::Relaxed);
    }

    /// Test hook: puts `token` in the in-process cache as if it had been acquired for `user_id`.
    #[doc(hidden)]
    pub fn cache_token(&self, user_id: &str, token: UpstreamToken) {
        self.inner.cache.insert(user_id.to_owned(), token);
    }

    /// How many entries the in-process state holds (after pending evictions ran).
    pub fn memory_entries(&self) -> MemoryEntries {
        let inner = &self.inner;
        inner.cache.run_pending_tasks();
        inner.futile.run_pending_tasks();
        inner.failures.run_pending_tasks();
        MemoryEntries {
            cached_tokens: inner.cache.entry_count(),
            renewal_pauses: inner.futile.entry_count(),
            remembered_failures: inner.failures.entry_count(),
        }
    }

    async fn renew(
        &self,
        user_id: &str,
        client: &ClientInfo,
        need: Need,
    ) -> Result<UpstreamToken, TokenError> {
        let inner = &self.inner;
        let local = inner.locks.lock_within(user_id, LOCK_WAIT).await?;
        // Someone in this process may have renewed (or failed to) while we waited.
        let now = inner.now();
        let cached = inner.cached(user_id);
        if let Some(t) = &cached {
            if need.satisfied_by(t.generation, t.exp, now, inner.skew) {
                return Ok(t.clone());
            }
        }
        if let Some(e) = inner.recent_failure(user_id, now) {
            return match cached {
                Some(t) if t.exp > now && matches!(need, Need::Fresh(_)) => Ok(t),
                _ => Err(e),
            };
        }
        // Detached: once LibreChat has rotated the refresh token, the new one must be stored
        // even if this request is dropped (client gone); the task holds the local lock too.
        let task = {
            let inner = inner.clone();
            let user = user_id.to_owned();
            let client = client.clone();
            tokio::spawn(async move {
                let _local = local;
                inner.renew_detached(&user, &client, need).await
            })
        };
        match task.await {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(user = %user_id, error = %e, "LibreChat renewal task failed");
                Err(TokenError::Unavailable("the renewal task failed".into()))
            }
        }
    }
}

impl Inner {
    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    fn cached(&self, user_id: &str) -> Option<UpstreamToken> {
        self.cache.get(user_id)
    }

    fn key(&self, user_id: &str) -> String {
        self.redis.key(&format!("lc-login:{user_id}"))
    }

    fn revocation_channel(&self) -> String {
        self.redis.key("revoked-logins")
    }

    fn lock_ttl(&self) -> Duration {
        Duration::from_millis(self.lock_ttl_ms.load(Ordering::Relaxed))
    }

    /// Drops one user's (or, with `None`, every) cached token.
    fn forget(&self, user_id: Option<&str>) {
        self.revocations.fetch_add(1, Ordering::AcqRel);
        match user_id {
            Some(user) => self.cache.invalidate(user),
            None => self.cache.invalidate_all(),
        }
    }

    async fn lock(&self, user_id: &str) -> Result<RedisLock, TokenError> {
        Ok(RedisLock::acquire(
            &self.redis,
            self.redis.key(&format!("lock:lc-login:{user_id}")),
            self.lock_ttl(),
            LOCK_WAIT,
        )
        .await?)
    }

    /// The error of a renewal that failed moments ago, while it is remembered.
    fn recent_failure(&self, user_id: &str, now: i64) -> Option<TokenError> {
        let r = self.failures.get(user_id)?;
        if now < r.at || now >= r.until {
            return None;
        }
        Some(match r.failure {
            Failure::Unavailable => {
                TokenError::Unavailable("the last renewal failed moments ago".into())
            }
            Failure::RateLimited => {
                TokenError::RateLimited(Duration::from_secs((r.until - now).max(1) as u64))
            }
            Failure::Banned => TokenError::Banned,
        })
    }

    fn remember_failure(&self, user_id: &str, e: &TokenError) {
        let at = self.now();
        let (failure, pause) = match e {
            TokenError::Unavailable(_) => (Failure::Unavailable, FAILED_RENEWAL_PAUSE),
            TokenError::RateLimited(d) => (
                Failure::RateLimited,
                (d.as_secs() as i64).clamp(FAILED_RENEWAL_PAUSE, MAX_FAILURE_MEMORY),
            ),
            TokenError::Banned => (Failure::Banned, FAILED_RENEWAL_PAUSE),
            // Store trouble is not LibreChat's; vault states change by themselves.
            _ => return,
        };
        self.failures.insert(
            user_id.to_owned(),
            Remembered {
                failure,
                at,
                until: at + pause,
            },
        );
    }

    /// The renewal proper, run in its own task: adopt a token stored by somebody else, else
    /// take the Redis lock and renew; the result is cached here (unless a revocation raced it).
    async fn renew_detached(
        &self,
        user_id: &str,
        client: &ClientInfo,
        need: Need,
    ) -> Result<UpstreamToken, TokenError> {
        let epoch = self.revocations.load(Ordering::Acquire);
        let result = self.renew_guarded(user_id, client, need).await;
        if let Err(e) = &result {
            self.remember_failure(user_id, e);
        }
        let token = result?;
        if self.revocations.load(Ordering::Acquire) != epoch {
            // A revocation arrived meanwhile: serve this request, remember nothing.
            return Ok(token);
        }
        self.cache.insert(user_id.to_owned(), token.clone());
        Ok(token)
    }

    async fn renew_guarded(
        &self,
        user_id: &str,
        client: &ClientInfo,
        need: Need,
    ) -> Result<UpstreamToken, TokenError> {
        // A token stored by another replica (or before a restart) serves without any lock.
        if let Some(s) = self.load(user_id).await? {
            if need.satisfied_by(s.generation, s.exp, self.now(), self.skew) {
                return upstream(&s.token, s.exp, s.generation);
            }
        }
        let lock = self.lock(user_id).await?;
        let result = self.renew_locked(user_id, client, need).await;
        lock.release().await;
        result
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
                self.failures.invalidate(user_id);
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
                        // Transient trouble while the token still works: use it, and let the
                        // requests of the next seconds use it too without asking again.
                        tracing::warn!(user = %user_id, error = %e, "LibreChat refresh failed; token still valid");
                        self.remember_failure(user_id, &map_error(e));
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
        self.failures.invalidate(user_id);
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
