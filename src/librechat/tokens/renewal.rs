//! Single-flight renewal of a user's LibreChat login: refresh, else log in with the vault's
//! password, once per user across the process (a local lock) and across replicas (a Redis lock,
//! then re-read the record and act only if it is still the one we saw). LibreChat rotates the
//! refresh token, so a second refresh with the old one would destroy the LibreChat session.
//!
//! - A renewal runs detached from the request that needed it (a spawned task the request
//!   awaits): a client that disconnects mid-renewal cannot drop a refresh cookie LibreChat has
//!   already rotated; the result is stored and cached whoever is still waiting.
//! - The Redis lock is extended while the renewal runs (see `crate::lock`), so a slow LibreChat
//!   never lets a second replica refresh with a token that is already spent.
//! - Failures are remembered for a few seconds (see `failures`): requests in that window get the
//!   still-valid token, or the same error, without asking LibreChat again.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::OwnedMutexGuard;

use super::{
    cache::TokenCache, error::from_librechat, failures::FailureMemory, store::LoginStore,
    TokenError, UpstreamToken,
};
use crate::{
    clock::Clock,
    credentials::vault::{CredentialStatus, CredentialVault},
    end_user::ClientInfo,
    librechat::client::{LibreChatClient, LibreChatError, LibreChatLogin},
    lock::{LocalLocks, RedisLock},
    telemetry::metrics::Metrics,
};

/// The Redis lock's TTL. The watchdog extends it while the renewal runs, so this only bounds
/// how long a crashed replica blocks the user.
const LOCK_TTL: Duration = Duration::from_secs(30);
/// How long a request waits for a renewal running elsewhere (another replica, or another
/// request of this process) before answering 503 `busy`.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Why the slow path runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
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

/// Both locks of one user's login, held: nobody renews it meanwhile.
pub(super) struct Exclusive {
    _local: OwnedMutexGuard<()>,
    remote: RedisLock,
}

impl Exclusive {
    pub(super) async fn release(self) {
        self.remote.release().await;
    }
}

pub(super) struct Renewal {
    client: LibreChatClient,
    vault: CredentialVault,
    store: LoginStore,
    cache: TokenCache,
    failures: FailureMemory,
    locks: LocalLocks,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    skew: i64,
    lock_ttl_ms: AtomicU64,
}

impl Renewal {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        client: LibreChatClient,
        vault: CredentialVault,
        store: LoginStore,
        cache: TokenCache,
        failures: FailureMemory,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        skew: i64,
    ) -> Self {
        Self {
            client,
            vault,
            store,
            cache,
            failures,
            locks: LocalLocks::default(),
            metrics,
            clock,
            skew,
            lock_ttl_ms: AtomicU64::new(LOCK_TTL.as_millis() as u64),
        }
    }

    pub(super) fn client(&self) -> &LibreChatClient {
        &self.client
    }

    /// The TTL of the per-user Redis lock (at least 30 ms).
    pub(super) fn set_lock_ttl(&self, ttl: Duration) {
        self.lock_ttl_ms
            .store(ttl.as_millis().max(30) as u64, Ordering::Relaxed);
    }

    fn lock_ttl(&self) -> Duration {
        Duration::from_millis(self.lock_ttl_ms.load(Ordering::Relaxed))
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    async fn lock(&self, user_id: &str) -> Result<RedisLock, TokenError> {
        Ok(RedisLock::acquire(
            self.store.redis(),
            self.store.redis().key(&format!("lock:lc-login:{user_id}")),
            self.lock_ttl(),
            LOCK_WAIT,
        )
        .await?)
    }

    /// Both locks of the user's login (in process, then across replicas), so that nothing
    /// renews it while the caller changes it (sign-out).
    pub(super) async fn exclusive(&self, user_id: &str) -> Result<Exclusive, TokenError> {
        let local = self.locks.lock_within(user_id, LOCK_WAIT).await?;
        let remote = self.lock(user_id).await?;
        Ok(Exclusive {
            _local: local,
            remote,
        })
    }

    /// A token that satisfies `need`: one renewed meanwhile by somebody else, else a new one.
    pub(super) async fn renew(
        self: &Arc<Self>,
        user_id: &str,
        client: &ClientInfo,
        need: Need,
    ) -> Result<UpstreamToken, TokenError> {
        let local = self.locks.lock_within(user_id, LOCK_WAIT).await?;
        // Someone in this process may have renewed (or failed to) while we waited.
        let now = self.now();
        let cached = self.cache.get(user_id);
        if let Some(t) = &cached {
            if need.satisfied_by(t.generation, t.exp, now, self.skew) {
                return Ok(t.clone());
            }
        }
        if let Some(e) = self.failures.recent(user_id, now) {
            return match cached {
                Some(t) if t.exp > now && matches!(need, Need::Fresh(_)) => Ok(t),
                _ => Err(e),
            };
        }
        // Detached: once LibreChat has rotated the refresh token, the new one must be stored
        // even if this request is dropped (client gone); the task holds the local lock too.
        let task = {
            let this = Arc::clone(self);
            let user = user_id.to_owned();
            let client = client.clone();
            tokio::spawn(async move {
                let _local = local;
                this.renew_detached(&user, &client, need).await
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

    /// The renewal proper, run in its own task: adopt a token stored by somebody else, else
    /// take the Redis lock and renew; the result is cached here (unless a revocation raced it).
    async fn renew_detached(
        &self,
        user_id: &str,
        client: &ClientInfo,
        need: Need,
    ) -> Result<UpstreamToken, TokenError> {
        let epoch = self.cache.epoch();
        let result = self.renew_guarded(user_id, client, need).await;
        if let Err(e) = &result {
            self.failures.remember(user_id, e, self.now());
        }
        let token = result?;
        // A revocation that arrived meanwhile: serve this request, remember nothing.
        self.cache
            .insert_unless_revoked(user_id, token.clone(), epoch);
        Ok(token)
    }

    async fn renew_guarded(
        &self,
        user_id: &str,
        client: &ClientInfo,
        need: Need,
    ) -> Result<UpstreamToken, TokenError> {
        // A token stored by another replica (or before a restart) serves without any lock.
        if let Some(s) = self.store.load(user_id).await? {
            if need.satisfied_by(s.generation, s.exp, self.now(), self.skew) {
                return UpstreamToken::new(&s.token, s.exp, s.generation);
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
        let stored = self.store.load(user_id).await?;
        if let Some(s) = &stored {
            // Another replica may have renewed already: adopt its token.
            if need.satisfied_by(s.generation, s.exp, now, self.skew) {
                self.failures.clear(user_id);
                return UpstreamToken::new(&s.token, s.exp, s.generation);
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
                        self.failures
                            .remember(user_id, &from_librechat(e), self.now());
                        return UpstreamToken::new(&s.token, s.exp, s.generation);
                    }
                    Err(e) => return Err(from_librechat(e)),
                }
            }
        }
        let operation = if stored.is_some() { "relogin" } else { "login" };
        let login = self.login(user_id, client, operation).await?;
        self.save(user_id, &login, generation).await
    }

    /// Stores a new login and makes it the user's token.
    async fn save(
        &self,
        user_id: &str,
        login: &LibreChatLogin,
        generation: u64,
    ) -> Result<UpstreamToken, TokenError> {
        self.store
            .save(user_id, login, generation, self.now())
            .await?;
        self.failures.clear(user_id);
        UpstreamToken::new(&login.token, login.token_exp, generation)
    }

    /// Logs in with the vault's credential; LibreChat's verdict on the password marks the
    /// credential drifted.
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
            Err(e) => Err(from_librechat(e)),
        }
    }
}

/// The `outcome` label of `bff_librechat_auth_total`.
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
