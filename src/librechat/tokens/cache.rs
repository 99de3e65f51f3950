//! The in-process token cache: each user's current [`UpstreamToken`], so the warm path touches
//! neither Redis nor the key ring. Bounded in size and time (the others re-read Redis).
//!
//! Revocations (sign-out, deactivation) are followed over Redis pub/sub, from every replica, and
//! counted in an epoch: a renewal that raced a revocation serves its request but is not cached.
//! After any gap in the subscription the whole cache is dropped (a revocation may have been
//! missed).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use moka::{ops::compute::Op, sync::Cache};

use super::UpstreamToken;
use crate::redis_conn::RedisHandle;

/// Users whose token is kept in process memory (each entry is well under 1 KiB); the others
/// read theirs from Redis. Entries also expire after `CACHE_TTL`.
pub const TOKEN_CACHE_CAPACITY: u64 = 50_000;
const CACHE_TTL: Duration = Duration::from_secs(30 * 60);

/// Cheap to clone: clones share one cache and one epoch.
#[derive(Clone)]
pub(super) struct TokenCache {
    tokens: Cache<String, UpstreamToken>,
    /// Bumped by every revocation seen: a renewal that raced one is not cached.
    revocations: Arc<AtomicU64>,
}

impl TokenCache {
    pub(super) fn new() -> Self {
        Self {
            tokens: Cache::builder()
                .max_capacity(TOKEN_CACHE_CAPACITY)
                .time_to_live(CACHE_TTL)
                .build(),
            revocations: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(super) fn get(&self, user_id: &str) -> Option<UpstreamToken> {
        self.tokens.get(user_id)
    }

    /// Caches `token` unconditionally (test hook; renewals use [`Self::insert_unless_revoked`]).
    pub(super) fn insert(&self, user_id: &str, token: UpstreamToken) {
        self.tokens.insert(user_id.to_owned(), token);
    }

    /// The revocation epoch; read it before a renewal starts.
    pub(super) fn epoch(&self) -> u64 {
        self.revocations.load(Ordering::Acquire)
    }

    /// Caches `token` unless a revocation arrived since `epoch` was read.
    pub(super) fn insert_unless_revoked(&self, user_id: &str, token: UpstreamToken, epoch: u64) {
        if self.epoch() != epoch {
            return;
        }
        self.insert(user_id, token);
    }

    /// Drops the user's token if it is still the one of `generation`.
    pub(super) fn invalidate_generation(&self, user_id: &str, generation: u64) {
        self.tokens
            .entry_by_ref(user_id)
            .and_compute_with(|entry| match entry {
                Some(e) if e.value().generation == generation => Op::Remove,
                _ => Op::Nop,
            });
    }

    /// Drops one user's (or, with `None`, every) cached token, as a revocation.
    pub(super) fn forget(&self, user_id: Option<&str>) {
        self.revocations.fetch_add(1, Ordering::AcqRel);
        match user_id {
            Some(user) => self.tokens.invalidate(user),
            None => self.tokens.invalidate_all(),
        }
    }

    /// How many tokens are cached (after pending evictions ran).
    pub(super) fn entry_count(&self) -> u64 {
        self.tokens.run_pending_tasks();
        self.tokens.entry_count()
    }

    /// Follows the revocations published on `channel` (see `LoginStore::publish_revocation`)
    /// for as long as the task runs.
    pub(super) fn follow_revocations(
        &self,
        redis: RedisHandle,
        channel: String,
    ) -> tokio::task::JoinHandle<()> {
        let (gap, message) = (self.clone(), self.clone());
        crate::redis_conn::follow_channel(
            redis,
            channel,
            "LibreChat login revocations",
            // A dropped subscription keeps the tokens serving (a revocation needs Redis too);
            // the next subscription drops them, as anything may have been missed meanwhile.
            move |following| {
                if following {
                    gap.forget(None)
                }
            },
            move |user| message.forget(Some(&user)),
        )
    }
}
