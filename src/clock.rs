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

/// A clock that moves only when told to (tests).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<OffsetDateTime>>);

impl Default for ManualClock {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(OffsetDateTime::now_utc())))
    }
}

impl ManualClock {
    pub fn advance(&self, by: std::time::Duration) {
        let mut now = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *now += Duration::try_from(by).unwrap_or(Duration::ZERO);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
