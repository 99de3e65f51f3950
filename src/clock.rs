//! Time source for session timers, injectable so tests can move time instead of sleeping.

use std::sync::{Arc, Mutex};

use time::{Duration, OffsetDateTime};

pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> OffsetDateTime;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// Real time plus an offset that tests push forward to jump over timeouts.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<Mutex<Duration>>);

impl ManualClock {
    pub fn advance(&self, by: std::time::Duration) {
        let mut offset = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *offset += Duration::try_from(by).unwrap_or(Duration::ZERO);
    }

    /// Moves the clock back (a server whose clock lags its peers).
    pub fn rewind(&self, by: std::time::Duration) {
        let mut offset = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *offset -= Duration::try_from(by).unwrap_or(Duration::ZERO);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc() + *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
