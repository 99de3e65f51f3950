//! Login throttling: failed sign-ins are counted per client address and per account identifier,
//! in fixed windows, and a caller over either limit is refused (429 with `Retry-After`) before
//! the identity service is asked anything.
//!
//! Each attempt *reserves* its place before the identity service is called (one atomic check
//! and count: one Redis round trip) and the reservation is given back when the attempt was not a
//! failure: a success returns the address's unit and clears the identifier's counter, an
//! inconclusive attempt (identity service down) returns both. Counting before the call rather
//! than after it means a burst of concurrent attempts cannot all pass the check at once: at most
//! `limit` attempts are ever in flight or failed per window. An attempt whose request is dropped
//! mid-way stays counted (otherwise disconnecting would be a way around the limit).
//!
//! Counters live in Redis when sessions do (every replica shares them; Redis unreachable → the
//! attempt is refused, fail closed), else in a bounded in-process map.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use sha2::{Digest, Sha256};

use crate::{
    clock::Clock,
    config::{LoginThrottleConfig, SessionStoreKind},
    redis_conn::RedisHandle,
};

#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// Over a limit: retry after this many seconds (when the blocking window ends).
    #[error("too many failed sign-ins; retry after {0}s")]
    Throttled(u64),
    #[error("login throttle store unavailable: {0}")]
    Store(String),
}

/// Checks a counter over its limit; counts the attempt in every counter when none is. KEYS are
/// the counters, ARGV `limit, window_ms` per key. Returns 0, or the ms until the latest-ending
/// blocking window ends.
/// Built once: a script's SHA is computed when it is created.
static RESERVE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RESERVE));
static RELEASE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RELEASE));

const RESERVE: &str = r#"
local wait = 0
for i, key in ipairs(KEYS) do
  local count = tonumber(redis.call('GET', key) or '0')
  if count >= tonumber(ARGV[2 * i - 1]) then
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then
      ttl = tonumber(ARGV[2 * i])
      redis.call('PEXPIRE', key, ttl)
    end
    if ttl > wait then wait = ttl end
  end
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  redis.call('INCR', key)
  if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, ARGV[2 * i]) end
end
return 0
"#;

/// Gives reservations back: ARGV[i] is `clear` (delete the counter) or `return` (one less,
/// never below zero, and never re-creating an expired counter).
const RELEASE: &str = r#"
for i, key in ipairs(KEYS) do
  if ARGV[i] == 'clear' then
    redis.call('DEL', key)
  elseif tonumber(redis.call('GET', key) or '0') > 0 then
    redis.call('DECR', key)
  end
end
return 0
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Address,
    Identifier,
}

/// One counter an attempt is held against.
#[derive(Debug, Clone)]
struct Counter {
    kind: Kind,
    key: String,
    limit: u32,
    window_ms: u64,
}

/// A counted attempt. Settle it with [`LoginThrottle::failed`], [`LoginThrottle::succeeded`] or
/// [`LoginThrottle::inconclusive`]; an attempt never settled stays counted as a failure.
#[derive(Debug)]
#[must_use = "settle the attempt once the identity service has answered"]
pub struct Attempt {
    counters: Vec<Counter>,
}

#[derive(Debug)]
enum Backend {
    Off,
    Redis(RedisHandle),
    Memory(Mutex<MemoryCounters>),
}

/// The login throttle: see the module documentation.
#[derive(Debug, Clone)]
pub struct LoginThrottle(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    cfg: LoginThrottleConfig,
    backend: Backend,
    clock: Arc<dyn Clock>,
    /// `{<prefix>:login-throttle}`: one hash tag, so the scripts are Redis-Cluster-safe.
    key_base: String,
}

impl LoginThrottle {
    pub fn new(
        cfg: &LoginThrottleConfig,
        store: SessionStoreKind,
        redis: RedisHandle,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let key_base = format!("{{{}}}", redis.key("login-throttle"));
        let backend = match (cfg.enabled, store) {
            (false, _) => Backend::Off,
            (true, SessionStoreKind::Redis) => Backend::Redis(redis),
            (true, SessionStoreKind::Memory) => {
                Backend::Memory(Mutex::new(MemoryCounters::new(cfg.memory_max_keys)))
            }
        };
        Self(Arc::new(Inner {
            cfg: cfg.clone(),
            backend,
            clock,
            key_base,
        }))
    }

    /// Longest identifier accepted (bytes, after trimming).
    pub fn max_identifier_bytes(&self) -> usize {
        self.0.cfg.max_identifier_bytes
    }

    /// Counts an attempt by `ip` on account `identifier`, or refuses it when either is over its
    /// limit. The identifier is compared trimmed and lower-cased, and only its SHA-256 is kept.
    pub async fn begin(&self, ip: IpAddr, identifier: &str) -> Result<Attempt, ThrottleError> {
        let counters = self.counters(ip, identifier);
        if counters.is_empty() {
            return Ok(Attempt { counters });
        }
        let wait_ms = match &self.0.backend {
            Backend::Off => 0,
            Backend::Redis(redis) => {
                let mut conn = redis.conn().await.map_err(store_error)?;
                let mut invocation = RESERVE_SCRIPT.prepare_invoke();
                for c in &counters {
                    invocation.key(&c.key).arg(c.limit).arg(c.window_ms);
                }
                invocation
                    .invoke_async::<u64>(&mut conn)
                    .await
                    .map_err(store_error)?
            }
            Backend::Memory(map) => {
                let now = self.now_ms();
                lock(map).reserve(now, &counters)
            }
        };
        if wait_ms > 0 {
            return Err(ThrottleError::Throttled(wait_ms.div_ceil(1000).max(1)));
        }
        Ok(Attempt { counters })
    }

    /// The identity service refused the credentials: the attempt stays counted.
    pub fn failed(&self, attempt: Attempt) {
        drop(attempt);
    }

    /// Signed in: the address's unit is given back and the identifier's counter cleared, so
    /// successful sign-ins never add up to a lock-out.
    pub async fn succeeded(&self, attempt: Attempt) {
        self.release(attempt, true).await;
    }

    /// The identity service could not judge the credentials (unreachable, bad answer): the
    /// attempt is given back.
    pub async fn inconclusive(&self, attempt: Attempt) {
        self.release(attempt, false).await;
    }

    /// Best effort: a failure here leaves the attempt counted (never lets anyone in).
    async fn release(&self, attempt: Attempt, success: bool) {
        let counters = attempt.counters;
        if counters.is_empty() {
            return;
        }
        let clear = |c: &Counter| success && c.kind == Kind::Identifier;
        match &self.0.backend {
            Backend::Off => {}
            Backend::Redis(redis) => {
                let result = async {
                    let mut conn = redis.conn().await?;
                    let mut invocation = RELEASE_SCRIPT.prepare_invoke();
                    for c in &counters {
                        invocation
                            .key(&c.key)
                            .arg(if clear(c) { "clear" } else { "return" });
                    }
                    invocation.invoke_async::<i64>(&mut conn).await
                }
                .await;
                if let Err(e) = result {
                    tracing::warn!(error = %e, "could not release a login throttle reservation");
                }
            }
            Backend::Memory(map) => {
                let now = self.now_ms();
                let mut map = lock(map);
                for c in &counters {
                    map.release(now, &c.key, clear(c));
                }
            }
        }
    }

    fn counters(&self, ip: IpAddr, identifier: &str) -> Vec<Counter> {
        let cfg = &self.0.cfg;
        if matches!(self.0.backend, Backend::Off) {
            return Vec::new();
        }
        let mut counters = Vec::with_capacity(2);
        if cfg.per_address_failures > 0 {
            counters.push(Counter {
                kind: Kind::Address,
                key: format!("{}:addr:{}", self.0.key_base, address_key(ip)),
                limit: cfg.per_address_failures,
                window_ms: cfg.per_address_window_secs.saturating_mul(1000),
            });
        }
        if cfg.per_identifier_failures > 0 {
            counters.push(Counter {
                kind: Kind::Identifier,
                key: format!("{}:id:{}", self.0.key_base, identifier_hash(identifier)),
                limit: cfg.per_identifier_failures,
                window_ms: cfg.per_identifier_window_secs.saturating_mul(1000),
            });
        }
        counters
    }

    fn now_ms(&self) -> u64 {
        let nanos = self.0.clock.now().unix_timestamp_nanos() / 1_000_000;
        u64::try_from(nanos).unwrap_or(0)
    }
}

fn store_error(e: redis::RedisError) -> ThrottleError {
    ThrottleError::Store(e.to_string())
}

fn lock(map: &Mutex<MemoryCounters>) -> std::sync::MutexGuard<'_, MemoryCounters> {
    map.lock().unwrap_or_else(|p| p.into_inner())
}

/// IPv4 addresses count one by one; IPv6 per /64, the block one subscriber usually holds (else
/// one client would have 2^64 addresses to rotate through).
fn address_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// SHA-256 (hex) of the trimmed, lower-cased identifier: the raw email never becomes a key.
fn identifier_hash(identifier: &str) -> String {
    let normal = identifier.trim().to_lowercase();
    hex::encode(Sha256::digest(normal.as_bytes()))
}

/// The in-process counters of a single instance (`session.store = "memory"`): at most
/// `max_keys` windows; when full, expired ones are dropped first, then those closest to their end.
#[derive(Debug)]
struct MemoryCounters {
    windows: HashMap<String, Window>,
    max_keys: usize,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    count: u32,
    ends_at_ms: u64,
}

impl MemoryCounters {
    fn new(max_keys: usize) -> Self {
        Self {
            windows: HashMap::new(),
            max_keys: max_keys.max(1),
        }
    }

    fn live(&self, now: u64, key: &str) -> Option<Window> {
        self.windows
            .get(key)
            .copied()
            .filter(|w| w.ends_at_ms > now)
    }

    /// As the `RESERVE` script: 0, or the ms until the latest-ending blocking window ends.
    fn reserve(&mut self, now: u64, counters: &[Counter]) -> u64 {
        let wait = counters
            .iter()
            .filter_map(|c| {
                self.live(now, &c.key)
                    .filter(|w| w.count >= c.limit)
                    .map(|w| w.ends_at_ms - now)
            })
            .max()
            .unwrap_or(0);
        if wait > 0 {
            return wait;
        }
        for c in counters {
            match self.live(now, &c.key) {
                Some(w) => {
                    self.windows.insert(
                        c.key.clone(),
                        Window {
                            count: w.count.saturating_add(1),
                            ..w
                        },
                    );
                }
                None => {
                    self.make_room(now);
                    self.windows.insert(
                        c.key.clone(),
                        Window {
                            count: 1,
                            ends_at_ms: now.saturating_add(c.window_ms),
                        },
                    );
                }
            }
        }
        0
    }

    fn release(&mut self, now: u64, key: &str, clear: bool) {
        if clear {
            self.windows.remove(key);
        } else if let Some(w) = self.live(now, key) {
            self.windows.insert(
                key.to_owned(),
                Window {
                    count: w.count.saturating_sub(1),
                    ..w
                },
            );
        }
    }

    /// Before a new key goes in: keep the map under `max_keys`. Evicting a tenth at a time keeps
    /// the full scans rare.
    fn make_room(&mut self, now: u64) {
        if self.windows.len() < self.max_keys {
            return;
        }
        self.windows.retain(|_, w| w.ends_at_ms > now);
        if self.windows.len() < self.max_keys {
            return;
        }
        let target = self.max_keys - self.max_keys.div_ceil(10);
        let excess = self.windows.len() - target;
        let mut ends: Vec<u64> = self.windows.values().map(|w| w.ends_at_ms).collect();
        let (_, cutoff, _) = ends.select_nth_unstable(excess - 1);
        let cutoff = *cutoff;
        self.windows.retain(|_, w| w.ends_at_ms > cutoff);
    }
}

impl From<ThrottleError> for crate::error::ApiError {
    fn from(e: ThrottleError) -> Self {
        use ThrottleError as E;
        match e {
            E::Throttled(secs) => crate::error::ApiError::LoginThrottled(secs),
            E::Store(m) => {
                tracing::warn!(error = %m, "login throttle store unavailable");
                crate::error::ApiError::SessionStoreUnavailable
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(key: &str, limit: u32, window_ms: u64) -> Counter {
        Counter {
            kind: Kind::Address,
            key: key.to_owned(),
            limit,
            window_ms,
        }
    }

    #[test]
    fn memory_counters_block_at_the_limit_until_the_window_ends() {
        let mut m = MemoryCounters::new(100);
        let c = [counter("a", 2, 1000)];
        assert_eq!(m.reserve(0, &c), 0);
        assert_eq!(m.reserve(100, &c), 0);
        assert_eq!(
            m.reserve(400, &c),
            600,
            "blocked until the window started at 0 ends"
        );
        assert_eq!(m.reserve(1000, &c), 0, "a new window");
    }

    #[test]
    fn released_reservations_do_not_count() {
        let mut m = MemoryCounters::new(100);
        let c = [counter("a", 1, 1000)];
        for t in 0..5 {
            assert_eq!(m.reserve(t, &c), 0);
            m.release(t, "a", false);
        }
        assert_eq!(m.reserve(10, &c), 0);
        assert!(m.reserve(11, &c) > 0);
        m.release(12, "a", true);
        assert_eq!(m.reserve(13, &c), 0, "cleared");
    }

    #[test]
    fn memory_counters_stay_bounded() {
        let mut m = MemoryCounters::new(50);
        for i in 0..1_000u64 {
            m.reserve(i, &[counter(&format!("k{i}"), 5, 10_000)]);
            assert!(m.windows.len() <= 50, "{} keys", m.windows.len());
        }
        assert!(
            m.windows.contains_key("k999"),
            "the newest key is kept; the oldest windows go first"
        );
    }

    #[test]
    fn identifiers_are_normalised_and_hashed_and_ipv6_counts_per_64() {
        assert_eq!(
            identifier_hash("  Alice@Example.COM "),
            identifier_hash("alice@example.com")
        );
        assert_eq!(identifier_hash("alice").len(), 64);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        assert_eq!(address_key(a), address_key(b));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(address_key(mapped), "192.0.2.7");
    }
}
