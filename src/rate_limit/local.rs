//! [`LocalRpm`]: `rpm` budgets in this process's memory (governor).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use super::{Check, RpmLimiter, Verdict};
use crate::keys::KeyRecord;

/// A governor clock that reads tokio's clock (so `tokio::time::pause` applies).
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            base: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.base)
    }
}

type KeyedLimiter = RateLimiter<
    String,
    DashMapStateStore<String>,
    TokioClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;

/// The in-process [`RpmLimiter`]: one governor keyed limiter (GCRA) per distinct `rpm`
/// value, keyed by key id. Decides at once, without allocating once a key is known.
/// Clones share the same budgets.
///
/// # Example
/// ```
/// use std::num::NonZeroU32;
/// use switchboard::{keys::KeyRecord, rate_limit::LocalRpm};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let limiter = LocalRpm::new();
/// let (key, two) = (KeyRecord::new("key_1", "alice"), NonZeroU32::new(2).unwrap());
/// assert!(limiter.decide(&key, two).is_ok());
/// assert!(limiter.decide(&key, two).is_ok());
/// let wait = limiter.decide(&key, two).unwrap_err();
/// // One request back every 30 s (less the few µs since the first).
/// assert!(wait > std::time::Duration::from_secs(29) && wait.as_secs_f64() <= 30.0);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct LocalRpm {
    limiters: Arc<RwLock<HashMap<u32, Arc<KeyedLimiter>>>>,
    clock: TokioClock,
}

impl std::fmt::Debug for LocalRpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRpm").finish_non_exhaustive()
    }
}

impl LocalRpm {
    /// Budgets on tokio's clock, starting now.
    pub fn new() -> Self {
        Self::default()
    }

    /// The limiter of one `rpm` value, made on first use.
    fn limiter(&self, rpm: NonZeroU32) -> Arc<KeyedLimiter> {
        if let Some(l) = self
            .limiters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&rpm.get())
        {
            return l.clone();
        }
        let mut map = self.limiters.write().unwrap_or_else(|e| e.into_inner());
        map.entry(rpm.get())
            .or_insert_with(|| {
                Arc::new(RateLimiter::new(
                    Quota::per_minute(rpm),
                    DashMapStateStore::default(),
                    self.clock.clone(),
                ))
            })
            .clone()
    }

    /// Counts one request of `key` now: admitted, or the wait until the next one.
    pub fn decide(&self, key: &KeyRecord, rpm: NonZeroU32) -> Verdict {
        self.decide_id(&key.id, rpm)
    }

    /// The same by key id (governor's keyed limiter looks keys up by `&String`, so the
    /// hot path never allocates one).
    #[allow(clippy::ptr_arg)]
    pub(super) fn decide_id(&self, key_id: &String, rpm: NonZeroU32) -> Verdict {
        self.limiter(rpm)
            .check_key(key_id)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

impl RpmLimiter for LocalRpm {
    fn check(&self, key: &KeyRecord, rpm: NonZeroU32) -> Check {
        Check::Ready(self.decide(key, rpm))
    }
}
