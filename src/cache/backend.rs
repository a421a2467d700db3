//! Where answers are kept: [`CacheBackend`], with [`MemoryBackend`] (this process,
//! `quick_cache`, bounded by bytes) and [`RedisBackend`] (shared by every instance through
//! `[shared].redis_url`, with a local copy in front).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::{self, BoxFuture, FutureExt};
use tokio::time::Instant;

use super::answer::CachedAnswer;
use super::key::{CacheKey, KeyHash};
use crate::shared::SharedState;

/// Whether this instance may compute an answer (see [`CacheBackend::claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Go ahead (and [`release`](CacheBackend::release) when done).
    Granted,
    /// Another instance is computing it: [`wait`](CacheBackend::wait) for its answer.
    Busy,
}

/// A store of answers by [`CacheKey`], each kept for its TTL; plus, for backends
/// shared by several instances, a lock so that one instance at a time computes an
/// answer. Never an error: a backend that cannot answer answers "not there".
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use switchboard::cache::{CacheBackend, MemoryBackend};
///
/// let backend: Arc<dyn CacheBackend> = Arc::new(MemoryBackend::new(1 << 20));
/// # let _ = backend;
/// ```
pub trait CacheBackend: Send + Sync + 'static {
    /// The answer stored under `key`, if any and not expired.
    fn get(&self, key: &CacheKey) -> BoxFuture<'static, Option<Arc<CachedAnswer>>>;
    /// The answer this process holds under `key`, without asking any server (what a
    /// request that just became a flight's leader looks at again: the flight before
    /// it may have stored its answer between the first look and the lead). Default:
    /// `None`.
    fn get_local(&self, _key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        None
    }
    /// Whether this backend keeps its answers in this process only, so that
    /// [`get`](CacheBackend::get) answers what [`get_local`](CacheBackend::get_local)
    /// does and [`claim`](CacheBackend::claim) is always granted: the layer then
    /// calls neither future (no allocation for them on a request's way). Default:
    /// `false`.
    fn is_local(&self) -> bool {
        false
    }
    /// Stores `answer` under `key` for `answer.ttl()` (does not wait), then gives
    /// back this instance's [`claim`](CacheBackend::claim) of `key`, if any.
    fn put(&self, key: &CacheKey, answer: Arc<CachedAnswer>);
    /// Asks to compute the answer of `key` across instances. Default: granted.
    fn claim(&self, _key: &CacheKey) -> BoxFuture<'static, Claim> {
        future::ready(Claim::Granted).boxed()
    }
    /// Gives back a granted [`claim`](CacheBackend::claim) without an answer.
    fn release(&self, _key: &CacheKey) {}
    /// Waits (at most `within`) for another instance's answer to `key`: `None` when
    /// that instance gave up (its claim is gone) or the time is up. Default: `None`.
    fn wait(
        &self,
        _key: &CacheKey,
        _within: Duration,
    ) -> BoxFuture<'static, Option<Arc<CachedAnswer>>> {
        future::ready(None).boxed()
    }
}

#[derive(Clone)]
struct Stored {
    answer: Arc<CachedAnswer>,
    /// On tokio's clock, so that tests can pause time.
    expires: Instant,
}

/// An entry weighs its answer's bytes (at least 1).
#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<CacheKey, Stored> for ByBytes {
    fn weight(&self, _key: &CacheKey, value: &Stored) -> u64 {
        (value.answer.weight() as u64).max(1)
    }
}

/// What an answer typically weighs, to size the table ahead (not a bound).
const TYPICAL_ANSWER: u64 = 2048;

/// The store's shards: each holds a quarter of `max_bytes`, and an entry must fit in
/// one (few shards: one answer may be large; four: writers rarely wait for each other).
const SHARDS: usize = 4;

/// Answers in this process's memory: a `quick_cache` cache weighted by bytes (at most
/// `max_bytes` in total; S3-FIFO eviction, so one-off answers leave before those
/// asked again), each entry served until its TTL on tokio's clock. An expired entry
/// is dropped when it is next looked up, or evicted like any other.
///
/// `quick_cache` rather than moka: no housekeeping run from the reads and writes and no
/// frequency sketch, so an all-miss workload, where every answer is stored and one
/// evicted, costs less (BENCHMARKS.md, sixteenth session).
#[derive(Clone)]
pub struct MemoryBackend {
    entries: Arc<quick_cache::sync::Cache<CacheKey, Stored, ByBytes, KeyHash>>,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl MemoryBackend {
    /// A cache of at most `max_bytes` of answers.
    pub fn new(max_bytes: u64) -> Self {
        let options = quick_cache::OptionsBuilder::new()
            .shards(SHARDS)
            .estimated_items_capacity(
                usize::try_from(max_bytes / TYPICAL_ANSWER)
                    .unwrap_or(usize::MAX)
                    .clamp(16, 1 << 20),
            )
            .weight_capacity(max_bytes)
            .build()
            .expect("the shards, the items and the weight are set");
        MemoryBackend {
            entries: Arc::new(quick_cache::sync::Cache::with_options(
                options,
                ByBytes,
                KeyHash::default(),
                quick_cache::sync::DefaultLifecycle::default(),
            )),
        }
    }

    /// The largest answer body a backend of `max_bytes` keeps: an eighth of it (half
    /// a shard, room for the entry's bookkeeping, and for the largest answer not to
    /// empty a shard of everything else).
    pub fn largest_body(max_bytes: u64) -> u64 {
        max_bytes / (2 * SHARDS as u64)
    }

    /// The stored answer, if not expired.
    pub fn lookup(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        let stored = self.entries.get(key)?;
        if Instant::now() >= stored.expires {
            self.entries.remove(key);
            return None;
        }
        Some(stored.answer)
    }

    /// Stores `answer` for `ttl` from now.
    pub fn insert(&self, key: &CacheKey, answer: Arc<CachedAnswer>, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        self.entries.insert(
            *key,
            Stored {
                answer,
                expires: Instant::now() + ttl,
            },
        );
    }

    /// Bytes held.
    pub fn weighted_size(&self) -> u64 {
        self.entries.weight()
    }
}

impl CacheBackend for MemoryBackend {
    fn get(&self, key: &CacheKey) -> BoxFuture<'static, Option<Arc<CachedAnswer>>> {
        future::ready(self.lookup(key)).boxed()
    }

    fn get_local(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        self.lookup(key)
    }

    fn is_local(&self) -> bool {
        true
    }

    fn put(&self, key: &CacheKey, answer: Arc<CachedAnswer>) {
        let ttl = answer.ttl();
        self.insert(key, answer, ttl);
    }
}

/// Unix milliseconds now.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Answers in Redis, shared by every instance with the same `[shared]` (a miss on one
/// is a hit on the others), with a [`MemoryBackend`] in front (an entry never changes
/// during its TTL, so a local copy until the same expiry is always right).
///
/// Keys: `{prefix}cache:{key hex}` (the answer, `PX` its TTL) and
/// `{prefix}cache:lock:{hex}` (the instance computing it, `SET NX PX`). While Redis is
/// down every call is skipped or fails fast: a lookup is a miss, a claim is granted
/// (each instance computes on its own), nothing is an error to the client.
#[derive(Clone)]
pub struct RedisBackend {
    shared: SharedState,
    local: MemoryBackend,
    lock_ttl: Duration,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend").finish_non_exhaustive()
    }
}

/// Compare-and-delete of a lock this instance holds.
const UNLOCK: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

impl RedisBackend {
    /// Answers in the Redis of `shared`, with at most `local_bytes` kept locally too.
    pub fn new(shared: SharedState, local_bytes: u64) -> Self {
        RedisBackend {
            shared,
            local: MemoryBackend::new(local_bytes),
            lock_ttl: Duration::from_secs(60),
        }
    }

    /// How long another instance waits at most for the one computing an answer (the
    /// lock's own lifetime; default 60 s).
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl;
        self
    }

    fn entry_key(&self, key: &CacheKey) -> String {
        self.shared.key(&format!("cache:{}", key.hex()))
    }

    fn lock_key(&self, key: &CacheKey) -> String {
        self.shared.key(&format!("cache:lock:{}", key.hex()))
    }

    /// An answer read from Redis, kept locally until it expires; `None` if expired.
    fn adopt(local: &MemoryBackend, key: &CacheKey, bytes: &[u8]) -> Option<Arc<CachedAnswer>> {
        let answer = Arc::new(CachedAnswer::from_bytes(bytes)?);
        let left = answer.meta.expires_unix_ms.saturating_sub(unix_ms());
        if left == 0 {
            return None;
        }
        local.insert(key, answer.clone(), Duration::from_millis(left));
        Some(answer)
    }
}

impl CacheBackend for RedisBackend {
    fn get_local(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        self.local.lookup(key)
    }

    fn get(&self, key: &CacheKey) -> BoxFuture<'static, Option<Arc<CachedAnswer>>> {
        if let Some(a) = self.local.lookup(key) {
            return future::ready(Some(a)).boxed();
        }
        if !self.shared.is_available() {
            return future::ready(None).boxed();
        }
        let (shared, local, key, name) = (
            self.shared.clone(),
            self.local.clone(),
            *key,
            self.entry_key(key),
        );
        async move {
            let bytes: Option<Vec<u8>> =
                shared
                    .call(move |mut c| async move {
                        redis::cmd("GET").arg(name).query_async(&mut c).await
                    })
                    .await
                    .ok()
                    .flatten();
            Self::adopt(&local, &key, &bytes?)
        }
        .boxed()
    }

    fn put(&self, key: &CacheKey, answer: Arc<CachedAnswer>) {
        self.local.insert(key, answer.clone(), answer.ttl());
        if !self.shared.is_available() {
            return;
        }
        let (shared, name, lock) = (self.shared.clone(), self.entry_key(key), self.lock_key(key));
        let ms = answer.meta.ttl_secs.saturating_mul(1000).max(1);
        self.shared.spawn(async move {
            let bytes = answer.to_bytes();
            let me = shared.instance_id().to_string();
            // The answer first, then the lock: an instance waiting on the lock finds
            // the answer once the lock is gone.
            let _ = shared
                .call(move |mut c| async move {
                    redis::cmd("SET")
                        .arg(name)
                        .arg(bytes)
                        .arg("PX")
                        .arg(ms)
                        .query_async::<()>(&mut c)
                        .await?;
                    redis::Script::new(UNLOCK)
                        .key(lock)
                        .arg(me)
                        .invoke_async::<i64>(&mut c)
                        .await
                        .map(drop)
                })
                .await;
        });
    }

    fn claim(&self, key: &CacheKey) -> BoxFuture<'static, Claim> {
        if !self.shared.is_available() {
            return future::ready(Claim::Granted).boxed();
        }
        let (shared, name) = (self.shared.clone(), self.lock_key(key));
        let ms = self.lock_ttl.as_millis().max(1) as u64;
        async move {
            let me = shared.instance_id().to_string();
            let set: Result<Option<String>, _> = shared
                .call(move |mut c| async move {
                    redis::cmd("SET")
                        .arg(name)
                        .arg(me)
                        .arg("NX")
                        .arg("PX")
                        .arg(ms)
                        .query_async(&mut c)
                        .await
                })
                .await;
            match set {
                Ok(None) => Claim::Busy,
                // Taken, or Redis unavailable: this instance computes it.
                _ => Claim::Granted,
            }
        }
        .boxed()
    }

    fn release(&self, key: &CacheKey) {
        if !self.shared.is_available() {
            return;
        }
        let (shared, name) = (self.shared.clone(), self.lock_key(key));
        self.shared.spawn(async move {
            let me = shared.instance_id().to_string();
            let _ = shared
                .call(move |mut c| async move {
                    redis::Script::new(UNLOCK)
                        .key(name)
                        .arg(me)
                        .invoke_async::<i64>(&mut c)
                        .await
                })
                .await;
        });
    }

    fn wait(
        &self,
        key: &CacheKey,
        within: Duration,
    ) -> BoxFuture<'static, Option<Arc<CachedAnswer>>> {
        let (shared, local, key) = (self.shared.clone(), self.local.clone(), *key);
        let (entry, lock) = (self.entry_key(&key), self.lock_key(&key));
        async move {
            let deadline = Instant::now() + within;
            let mut pause = Duration::from_millis(5);
            loop {
                let (entry, lock) = (entry.clone(), lock.clone());
                let seen: Result<(Option<Vec<u8>>, bool), _> = shared
                    .call(move |mut c| async move {
                        redis::pipe()
                            .cmd("GET")
                            .arg(entry)
                            .cmd("EXISTS")
                            .arg(lock)
                            .query_async(&mut c)
                            .await
                    })
                    .await;
                match seen {
                    Ok((Some(bytes), _)) => return Self::adopt(&local, &key, &bytes),
                    // The other instance gave up (or its lock expired): compute it here.
                    Ok((None, false)) | Err(_) => return None,
                    Ok((None, true)) => {}
                }
                if Instant::now() + pause >= deadline {
                    return None;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
        .boxed()
    }
}
