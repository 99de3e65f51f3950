//! Per-user LibreChat logins: the [`TokenManager`] facade. Tokens belong to the USER: every web
//! and mobile session of a user shares one LibreChat login, cached in Redis
//! (`{prefix}:lc-login:{user id}`, both tokens Fernet-encrypted) and in process.
//!
//! The warm path is an in-process lookup: no Redis, no decryption. The parts, one job each:
//! - `cache`: the in-process token cache, its revocation epoch and the pub/sub listener that
//!   keeps every replica's cache in step with sign-outs and deactivations;
//! - `store`: the encrypted Redis record (load, save, delete, publish a revocation);
//! - `renewal`: single-flight refresh-else-login, in process and across replicas;
//! - `failures`: remembered renewal failures and the futile-renewal pause;
//! - `error`: [`TokenError`] and how other errors map onto it.
//!
//! In-process state (token cache, pauses, remembered failures) is bounded in size and time.

mod cache;
mod error;
mod failures;
mod renewal;
mod store;

use std::{sync::Arc, time::Duration};

use axum::http::HeaderValue;

use self::{
    cache::TokenCache,
    failures::FailureMemory,
    renewal::{Need, Renewal},
    store::LoginStore,
};
use super::client::LibreChatClient;
use crate::{
    clock::Clock, credentials::vault::CredentialVault, credentials::KeyRing, end_user::ClientInfo,
    redis_conn::RedisHandle, telemetry::metrics::Metrics,
};

pub use cache::TOKEN_CACHE_CAPACITY;
pub use error::TokenError;
pub use failures::PAUSE_CAPACITY;

/// A user's current LibreChat access token, ready to send.
#[derive(Clone, Debug)]
pub struct UpstreamToken {
    /// `Bearer <token>`, built once per token rather than per request.
    pub authorization: HeaderValue,
    pub exp: i64,
    pub generation: u64,
}

impl UpstreamToken {
    fn new(token: &str, exp: i64, generation: u64) -> Result<Self, TokenError> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| TokenError::Unavailable("LibreChat issued an unusable token".into()))?;
        authorization.set_sensitive(true);
        Ok(Self {
            authorization,
            exp,
            generation,
        })
    }
}

/// Entry counts of the in-process state (every one bounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEntries {
    pub cached_tokens: u64,
    pub renewal_pauses: u64,
    pub remembered_failures: u64,
}

pub struct TokenManager {
    cache: TokenCache,
    store: LoginStore,
    failures: FailureMemory,
    renewal: Arc<Renewal>,
    clock: Arc<dyn Clock>,
    skew: i64,
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("skew", &self.skew)
            .finish()
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
        let skew = skew.as_secs() as i64;
        let cache = TokenCache::new();
        let store = LoginStore::new(redis, keyring);
        let failures = FailureMemory::new();
        let renewal = Renewal::new(
            client,
            vault,
            store.clone(),
            cache.clone(),
            failures.clone(),
            metrics,
            clock.clone(),
            skew,
        );
        Self {
            cache,
            store,
            failures,
            renewal: Arc::new(renewal),
            clock,
            skew,
        }
    }

    pub fn client(&self) -> &LibreChatClient {
        self.renewal.client()
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// The user's access token: from process memory when fresh, else renewed (single-flight).
    pub async fn token(
        &self,
        user_id: &str,
        client: &ClientInfo,
    ) -> Result<UpstreamToken, TokenError> {
        let seen = self.cache.get(user_id);
        if let Some(t) = &seen {
            let now = self.now();
            if t.exp - self.skew > now {
                return Ok(t.clone());
            }
            // Due for renewal, but the last attempt failed moments ago: keep using it.
            if t.exp > now && self.failures.recent(user_id, now).is_some() {
                return Ok(t.clone());
            }
        }
        // Boxed: the renewal's state (LibreChat calls, locks) would otherwise be carried, and
        // moved, by every proxied request's future, though the warm path returns above.
        Box::pin(
            self.renewal
                .renew(user_id, client, Need::Fresh(seen.map(|t| t.generation))),
        )
        .await
    }

    /// `Cookie: refreshToken=…; token_provider=librechat` of the user's current LibreChat login,
    /// for LibreChat routes that read the cookie (`/images` with `secureImageLinks`). It makes
    /// sure a login exists first; the cookie itself is read from Redis (it rotates).
    pub async fn refresh_cookie(
        &self,
        user_id: &str,
        client: &ClientInfo,
    ) -> Result<HeaderValue, TokenError> {
        self.token(user_id, client).await?;
        let login = self
            .store
            .load(user_id)
            .await?
            .ok_or(TokenError::ProvisioningPending)?;
        let mut cookie = HeaderValue::from_str(&format!(
            "refreshToken={}; token_provider=librechat",
            login.refresh
        ))
        .map_err(|_| {
            TokenError::Unavailable("LibreChat issued an unusable refresh token".into())
        })?;
        cookie.set_sensitive(true);
        Ok(cookie)
    }

    /// After LibreChat answered 401 to `rejected`: a new token (refresh, else re-login), unless
    /// another request already replaced it.
    pub async fn replace(
        &self,
        user_id: &str,
        rejected: &UpstreamToken,
        client: &ClientInfo,
    ) -> Result<UpstreamToken, TokenError> {
        if self.failures.renewals_paused(user_id, self.now()) {
            return Err(TokenError::RejectedFresh);
        }
        self.renewal
            .renew(user_id, client, Need::Rejected(rejected.generation))
            .await
    }

    /// LibreChat refused the token `replace` just gave: for a while, 401s of this user renew
    /// nothing more (the next request re-reads the stored token instead).
    pub fn renewal_refused(&self, user_id: &str, token: &UpstreamToken) {
        self.invalidate(user_id, token.generation);
        self.failures.pause_renewals(user_id, self.now());
    }

    /// Forgets the token of `generation` in this process (the next request renews it).
    pub fn invalidate(&self, user_id: &str, generation: u64) {
        self.cache.invalidate_generation(user_id, generation);
    }

    /// Logs the user out of LibreChat and forgets the login (deactivation, revocation).
    pub async fn sign_out(&self, user_id: &str, client: &ClientInfo) -> Result<(), TokenError> {
        let held = self.renewal.exclusive(user_id).await?;
        let result = async {
            if let Some(login) = self.store.load(user_id).await? {
                if let Err(e) = self
                    .client()
                    .logout(&login.token, &login.refresh, client)
                    .await
                {
                    tracing::warn!(user = %user_id, error = %e, "LibreChat logout failed; forgetting the login anyway");
                }
            }
            self.store.delete(user_id).await?;
            self.cache.forget(Some(user_id));
            // Every replica drops its in-process copy (see `listen_for_revocations`).
            self.store.publish_revocation(user_id).await
        }
        .await;
        held.release().await;
        result
    }

    /// Follows revocations published by any replica (deactivation, sign-out) and drops the
    /// user's token from this process's cache at once, so no replica keeps serving a revoked
    /// user from memory. After any gap in the subscription the whole cache is dropped (a
    /// revocation may have been missed); tokens are then re-read from Redis.
    pub fn listen_for_revocations(&self) -> tokio::task::JoinHandle<()> {
        self.cache
            .follow_revocations(self.store.redis().clone(), self.store.revocation_channel())
    }

    /// Test hook: the TTL of the per-user Redis lock (default 30 s). The watchdog extends the
    /// lock every third of it while a renewal runs.
    #[doc(hidden)]
    pub fn set_lock_ttl(&self, ttl: Duration) {
        self.renewal.set_lock_ttl(ttl);
    }

    /// Test hook: puts `token` in the in-process cache as if it had been acquired for `user_id`.
    #[doc(hidden)]
    pub fn cache_token(&self, user_id: &str, token: UpstreamToken) {
        self.cache.insert(user_id, token);
    }

    /// The generation of the user's token cached in this process, if any (a renewal in this
    /// process is visible here once it has finished).
    pub fn cached_generation(&self, user_id: &str) -> Option<u64> {
        self.cache.get(user_id).map(|t| t.generation)
    }

    /// How many entries the in-process state holds (after pending evictions ran).
    pub fn memory_entries(&self) -> MemoryEntries {
        let cached_tokens = self.cache.entry_count();
        let (renewal_pauses, remembered_failures) = self.failures.entry_counts();
        MemoryEntries {
            cached_tokens,
            renewal_pauses,
            remembered_failures,
        }
    }
}
