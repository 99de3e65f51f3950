//! What the token manager remembers of recent trouble, so that it does not ask LibreChat again
//! at once: renewals that failed moments ago (LibreChat unreachable, rate limiting, ban) and
//! users whose freshly renewed token LibreChat refused too (the futile-renewal pause). Both are
//! bounded in size and time.

use std::time::Duration;

use moka::sync::Cache;

use super::TokenError;

/// After a token renewed because of a 401 was refused too, further 401s of the user renew
/// nothing for this long: LibreChat refusing fresh tokens (a deleted or blocked account) would
/// otherwise cost one renewal per request.
const FUTILE_RENEWAL_PAUSE: i64 = 10;
/// A renewal that failed (LibreChat unreachable, banned) is not retried for this long; a rate
/// limit is respected for its `Retry-After`, up to `MAX_FAILURE_MEMORY`.
const FAILED_RENEWAL_PAUSE: i64 = 5;
const MAX_FAILURE_MEMORY: i64 = 60;
/// Users with a renewal pause or a remembered failure kept at once.
pub const PAUSE_CAPACITY: u64 = 50_000;

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

/// Cheap to clone: clones share the same memory.
#[derive(Clone)]
pub(super) struct FailureMemory {
    /// Users whose last renewal failed moments ago.
    failures: Cache<String, Remembered>,
    /// Users whose renewal after a 401 was refused too, and when.
    futile: Cache<String, i64>,
}

impl FailureMemory {
    pub(super) fn new() -> Self {
        Self {
            failures: Cache::builder()
                .max_capacity(PAUSE_CAPACITY)
                .time_to_live(Duration::from_secs(MAX_FAILURE_MEMORY as u64))
                .build(),
            futile: Cache::builder()
                .max_capacity(PAUSE_CAPACITY)
                .time_to_live(Duration::from_secs(FUTILE_RENEWAL_PAUSE as u64))
                .build(),
        }
    }

    /// The error of a renewal that failed moments ago, while it is remembered.
    pub(super) fn recent(&self, user_id: &str, now: i64) -> Option<TokenError> {
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

    /// Remembers a failed renewal (only LibreChat's failures: store trouble is not LibreChat's,
    /// and vault states change by themselves).
    pub(super) fn remember(&self, user_id: &str, e: &TokenError, now: i64) {
        let (failure, pause) = match e {
            TokenError::Unavailable(_) => (Failure::Unavailable, FAILED_RENEWAL_PAUSE),
            TokenError::RateLimited(d) => (
                Failure::RateLimited,
                (d.as_secs() as i64).clamp(FAILED_RENEWAL_PAUSE, MAX_FAILURE_MEMORY),
            ),
            TokenError::Banned => (Failure::Banned, FAILED_RENEWAL_PAUSE),
            _ => return,
        };
        self.failures.insert(
            user_id.to_owned(),
            Remembered {
                failure,
                at: now,
                until: now + pause,
            },
        );
    }

    /// A renewal succeeded: nothing to remember.
    pub(super) fn clear(&self, user_id: &str) {
        self.failures.invalidate(user_id);
    }

    /// LibreChat refused a freshly renewed token: pause renewals after 401s of this user.
    pub(super) fn pause_renewals(&self, user_id: &str, now: i64) {
        self.futile.insert(user_id.to_owned(), now);
    }

    /// Whether renewals after a 401 are paused for this user.
    pub(super) fn renewals_paused(&self, user_id: &str, now: i64) -> bool {
        self.futile
            .get(user_id)
            .is_some_and(|at| (0..FUTILE_RENEWAL_PAUSE).contains(&(now - at)))
    }

    /// (renewal pauses, remembered failures), after pending evictions ran.
    pub(super) fn entry_counts(&self) -> (u64, u64) {
        self.futile.run_pending_tasks();
        self.failures.run_pending_tasks();
        (self.futile.entry_count(), self.failures.entry_count())
    }
}
