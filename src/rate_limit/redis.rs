//! [`RedisRpm`]: one `rpm` budget per key across every instance, kept in Redis.

use std::num::NonZeroU32;
use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{Check, LocalRpm, RpmLimiter, Verdict};
use crate::keys::KeyRecord;
use crate::shared::{SharedError, SharedState};

/// GCRA in one script, on Redis's clock (`TIME`; allowed before writes since Redis 5,
/// scripts being replicated by their effects), so the instances' clocks never matter.
/// `KEYS[1]` holds the key's *theoretical arrival time* (TAT) in µs; `ARGV[1]` is the
/// emission interval T (µs), `ARGV[2]` the burst. A request is admitted when
/// `TAT - (burst - 1)·T <= now`, and then moves the TAT on by T; refused, it learns
/// the wait in µs. Read and write happen in one atomic step: never GET-then-SET.
/// Numbers are written with `%.0f` (Lua's default `%.14g` would round µs away).
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local allow_at = tat - (burst - 1) * interval
if allow_at > now then
  return {0, allow_at - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
"#;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(GCRA));

/// The [`RpmLimiter`] shared by every instance on one Redis: GCRA keyed by
/// `{prefix}rpm:{key_id}`, burst = `rpm`, one request back every `60/rpm` s, in one
/// atomic Lua script (EVALSHA) on Redis's clock. While Redis is down (or slower than
/// the shared state's timeout) it decides with its own [`LocalRpm`] instead, so
/// requests keep flowing. Keys without `rpm` never reach it.
///
/// # Example
/// ```no_run
/// use switchboard::{rate_limit::{RateLimitLayer, RedisRpm}, shared::SharedState};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let shared = SharedState::open("redis://127.0.0.1:6379", "switchboard:").unwrap();
/// let layer = RateLimitLayer::with_limiter(std::sync::Arc::new(RedisRpm::new(shared)));
/// // (`RateLimitLayer::shared(shared)` says the same.)
/// # let _ = layer;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RedisRpm {
    shared: SharedState,
    local: LocalRpm,
}

impl RedisRpm {
    /// Budgets in `shared`'s Redis, with a fresh [`LocalRpm`] for when it is down.
    pub fn new(shared: SharedState) -> Self {
        RedisRpm {
            shared,
            local: LocalRpm::new(),
        }
    }

    /// The shared state it keeps budgets in.
    pub fn shared(&self) -> &SharedState {
        &self.shared
    }

    /// Counts one request of `key_id` in Redis only (no fallback): admitted, or the
    /// wait until the next one is (to the µs, on Redis's clock).
    pub async fn admit(&self, key_id: &str, rpm: NonZeroU32) -> Result<Verdict, SharedError> {
        admit(&self.shared, self.shared.key(&format!("rpm:{key_id}")), rpm).await
    }
}

async fn admit(shared: &SharedState, key: String, rpm: NonZeroU32) -> Result<Verdict, SharedError> {
    // T in µs; rpm ≤ MAX_RPM (10⁶) keeps it ≥ 60.
    let interval = (60_000_000 / u64::from(rpm.get())).max(1);
    let burst = rpm.get();
    let (allowed, wait_us): (i64, i64) = shared
        .call(move |mut c| async move {
            SCRIPT
                .key(key)
                .arg(interval)
                .arg(burst)
                .invoke_async(&mut c)
                .await
        })
        .await?;
    Ok(if allowed == 1 {
        Ok(())
    } else {
        Err(Duration::from_micros(wait_us.max(1) as u64))
    })
}

impl RpmLimiter for RedisRpm {
    fn check(&self, key: &KeyRecord, rpm: NonZeroU32) -> Check {
        if !self.shared.is_available() {
            // Known down: decide here and now rather than wait for a timeout.
            return Check::Ready(self.local.decide(key, rpm));
        }
        let (shared, local, id) = (self.shared.clone(), self.local.clone(), key.id.clone());
        Check::Pending(Box::pin(async move {
            let redis_key = shared.key(&format!("rpm:{id}"));
            match admit(&shared, redis_key, rpm).await {
                Ok(verdict) => verdict,
                // Unreachable, too slow, or refused: this instance's own budget.
                Err(_) => local.decide_id(&id, rpm),
            }
        }))
    }
}
