//! The in-process copy of cookie sessions (Redis store only), so the warm cookie path reads no
//! Redis and decodes no JSON (issue 12).
//!
//! What may be served from here, and why it is safe (see `auth::authenticate_cookie`):
//! - only a session whose copy says it is live, needs no identity refresh and no idle slide;
//!   anything else reads the record again. Other replicas only ever push a record's deadlines
//!   forward (slide, refresh), so a stale copy can only send a request to Redis early, never
//!   keep a session past its end;
//! - ending a session deletes its record through the store, which drops the copy here and
//!   publishes the id; every replica drops its copy when the message arrives
//!   ([`SessionCache::follow_ended`]). When that subscription drops, every copy is dropped
//!   (while Redis is away cookie requests read the record, and get 503 as before);
//! - a copy read while an end was being published is not kept (an epoch, as in the token cache),
//!   nor any copy while ends are not being followed (before the first subscription, after a drop);
//! - bounded: `CAPACITY` sessions, each for at most `TTL` (user details changed by a refresh on
//!   another replica are seen within that time).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tower_sessions::session::Id;

use super::SessionData;
use crate::redis_conn::RedisHandle;

const CAPACITY: u64 = 50_000;
const TTL: Duration = Duration::from_secs(60);

/// Cheap to clone: clones share the copies and the epoch.
#[derive(Debug, Clone)]
pub struct SessionCache {
    sessions: moka::sync::Cache<Id, Arc<SessionData>>,
    /// Bumped by every end seen: a copy read before it is not kept.
    ended: Arc<AtomicU64>,
    /// Ends are being followed ([`Self::follow_ended`] is subscribed): copies are kept only then.
    following: Arc<AtomicBool>,
}

impl Default for SessionCache {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionCache {
    pub fn new() -> Self {
        Self {
            sessions: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(TTL)
                .build(),
            ended: Arc::new(AtomicU64::new(0)),
            following: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn get(&self, id: &Id) -> Option<Arc<SessionData>> {
        self.sessions.get(id)
    }

    /// Read this before reading a record; pass it to [`Self::keep`].
    pub fn epoch(&self) -> u64 {
        self.ended.load(Ordering::Acquire)
    }

    /// Keeps a copy of `data` unless a session ended since `epoch` was read, or ends are not
    /// being followed (before the first subscription, after it dropped).
    pub fn keep(&self, id: Id, data: Arc<SessionData>, epoch: u64) {
        if self.following.load(Ordering::Acquire) && self.epoch() == epoch {
            self.sessions.insert(id, data);
        }
    }

    /// Drops one session's copy (or, with `None`, every copy): the session ended.
    pub fn forget(&self, id: Option<&Id>) {
        self.ended.fetch_add(1, Ordering::AcqRel);
        match id {
            Some(id) => self.sessions.invalidate(id),
            None => self.sessions.invalidate_all(),
        }
    }

    /// Follows the ends published on `channel` by every replica (payload: the session id).
    pub fn follow_ended(&self, redis: RedisHandle, channel: String) -> tokio::task::JoinHandle<()> {
        let (gap, message) = (self.clone(), self.clone());
        crate::redis_conn::follow_channel(
            redis,
            channel,
            "ended sessions",
            // Dropped both when following starts and when it stops: a copy must not outlive a
            // missed end.
            move |following| {
                gap.following.store(following, Ordering::Release);
                gap.forget(None);
            },
            move |sid| match sid.parse::<Id>() {
                Ok(id) => message.forget(Some(&id)),
                // Not an id: whatever it was meant to end, end everything.
                Err(_) => message.forget(None),
            },
        )
    }
}
