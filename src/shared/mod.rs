//! [`SharedState`]: the Redis connection that lets many gateway instances share one
//! `rpm` budget per key and one view of endpoint health (SPEC §6, `[shared]`).
//!
//! One `SharedState` per gateway owns:
//! - a [`redis::aio::ConnectionManager`] for commands (it reconnects by itself), every
//!   call bounded by a short timeout (250 ms by default: a slow Redis must not stall
//!   requests; a call that times out counts as Redis being down for that decision);
//! - one pub/sub connection, subscribed to the instance-wide events channel, whose
//!   messages it hands to the [listeners](SharedState::listen) by topic;
//! - a background task that pings Redis every second, and publishes
//!   `switchboard_shared_state_up` (1 or 0) on `/metrics`.
//!
//! When Redis goes away (a call fails to reach it, or a ping does), a warning is logged
//! once and [`SharedState::is_available`] turns false: every decision then uses the
//! instance's own in-memory state ([`LocalRpm`](crate::rate_limit::LocalRpm),
//! [`InMemoryHealth`](crate::health::InMemoryHealth)) without waiting on Redis, and
//! requests keep being served. The ping notices Redis back within a second; an `info!`
//! says so, the pub/sub connection re-subscribes, and the listeners catch up
//! ([`Notice::Subscribed`]).
//!
//! # What lives in Redis
//!
//! Every key and channel starts with `[shared].prefix` (default `switchboard:`), so
//! several gateways (or tests) can share one Redis. Nothing there is money: losing all
//! of it (a Redis restart, `FLUSHALL`) only resets rate-limit windows, health and
//! cached answers.
//!
//! | key / channel | type, lifetime | what |
//! |---|---|---|
//! | `{prefix}rpm:{key_id}` | string, expires when the window is full again | the key's GCRA *theoretical arrival time* (µs of Redis's clock); one Lua script reads and updates it atomically |
//! | `{prefix}health:failures:{model}@{provider}` | counter, expires one cooldown after its last failure | consecutive retriable failures of the endpoint seen by any instance |
//! | `{prefix}health:degraded:{model}@{provider}` | string, expires with the cooldown | the endpoint is degraded; its TTL is the time left |
//! | `{prefix}health:parked:{model}@{provider}` | string, expires with the `Retry-After` | the endpoint answered 429 with `Retry-After` |
//! | `{prefix}health:probe:{model}@{provider}` | string (instance id), expires after the probe's timeout | the lock of the single probe after a cooldown, across instances |
//! | `{prefix}health:cause:{model}@{provider}` | string (`{failures}/{last failure}/{Retry-After ms or -}`), expires with the state | what degraded or parked the endpoint, for `/admin/endpoints` |
//! | `{prefix}cache:{sha256}` | string, expires with the answer's TTL | a cached answer ([`RedisBackend`](crate::cache::RedisBackend)) |
//! | `{prefix}cache:lock:{sha256}` | string (instance id), expires after 60 s | the instance computing that answer; the others wait for it |
//! | `{prefix}events` | pub/sub channel | changes of endpoint state (degraded, parked, recovered, failing) and their cause, and prompt-cache affinity (which endpoint served a long prompt), applied by every instance within milliseconds |
//!
//! Redis down: each instance limits and tracks health on its own (so `rpm` admits up
//! to `rpm` per instance, and each instance learns degraded endpoints by itself) until
//! Redis is back; `/metrics` shows `switchboard_shared_state_up 0` meanwhile.
//!
//! # Example
//! ```no_run
//! use switchboard::shared::SharedState;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // Connects lazily, in the background: building never waits on Redis.
//! let shared = SharedState::open("redis://127.0.0.1:6379", "switchboard:").unwrap();
//! assert_eq!(shared.key("rpm:key_1"), "switchboard:rpm:key_1");
//! let pong: String = shared
//!     .call(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
//!     .await
//!     .unwrap();
//! assert_eq!(pong, "PONG");
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisError;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The name of the gauge on `/metrics`: 1 while Redis answers, 0 while it does not.
pub const SHARED_STATE_UP: &str = "switchboard_shared_state_up";

/// The URL schemes `[shared].redis_url` accepts.
pub const SCHEMES: &[&str] = &["redis://", "rediss://", "unix://"];

/// Why [`SharedState::open`] or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// `[shared].redis_url` is not a Redis URL.
    #[error("[shared].redis_url: {0}")]
    Url(String),
    /// Built outside a tokio runtime (the connections and tasks need one).
    #[error("the shared state (Redis) needs a tokio runtime: build the gateway inside one")]
    NoRuntime,
    /// Redis is (believed) down, or did not answer in time: fall back.
    #[error("Redis is unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error (a bug, or a Redis too old for the scripts).
    #[error("Redis: {0}")]
    Redis(RedisError),
}

/// What a [listener](SharedState::listen) is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice<'a> {
    /// The events channel is (re)subscribed: events may have been missed, catch up.
    Subscribed,
    /// One event of the listener's topic (its payload).
    Message(&'a str),
}

/// Tunables of [`SharedState`] (the defaults suit production; tests on a busy machine
/// may want a longer timeout).
#[derive(Debug, Clone)]
pub struct SharedOptions {
    /// Longest wait for one Redis call on the request path.
    pub timeout: Duration,
    /// How often Redis is pinged (and, while down, how soon it is noticed back).
    pub ping_every: Duration,
}

impl Default for SharedOptions {
    fn default() -> Self {
        SharedOptions {
            timeout: Duration::from_millis(250),
            ping_every: Duration::from_secs(1),
        }
    }
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

type Listener = Arc<dyn Fn(Notice<'_>) + Send + Sync>;

struct Inner {
    prefix: String,
    channel: String,
    shown_url: String,
    client: redis::Client,
    conn: ConnectionManager,
    options: SharedOptions,
    runtime: tokio::runtime::Handle,
    instance: String,
    status: AtomicU8,
    status_tx: watch::Sender<bool>,
    commands: AtomicU64,
    warned_other: AtomicBool,
    listeners: RwLock<Vec<(ListenerId, String, Listener)>>,
    next_listener: AtomicU64,
    subscribed: AtomicBool,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

/// The Redis connections of one gateway instance; cheap to clone (clones share them).
/// See the [module docs](self).
#[derive(Clone)]
pub struct SharedState(Arc<Inner>);

impl fmt::Debug for SharedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedState")
            .field("url", &self.0.shown_url)
            .field("prefix", &self.0.prefix)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

/// `url` without its password, for logs.
fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

/// Checks `[shared].redis_url` (what `switchboard check` reports).
pub fn check_url(url: &str) -> Result<(), String> {
    if !SCHEMES.iter().any(|s| url.starts_with(s)) {
        return Err(format!(
            "`{}` is not a Redis URL; use redis://HOST:PORT[/DB], rediss://… (TLS) or unix:///path/to/redis.sock",
            shown(url)
        ));
    }
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| format!("`{}` is not a valid Redis URL: {e}", shown(url)))
}

/// Whether a Redis error means "Redis is not reachable" (rather than a bad command).
fn is_outage(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() || e.is_timeout()
}

impl SharedState {
    /// Opens the shared state at `url` under `prefix`, with the default
    /// [`SharedOptions`]. Connects in the background: never waits on Redis.
    pub fn open(url: &str, prefix: &str) -> Result<SharedState, SharedError> {
        Self::open_with(url, prefix, SharedOptions::default())
    }

    /// The same with other [`SharedOptions`].
    pub fn open_with(
        url: &str,
        prefix: &str,
        options: SharedOptions,
    ) -> Result<SharedState, SharedError> {
        check_url(url).map_err(SharedError::Url)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SharedError::NoRuntime)?;
        let client = redis::Client::open(url).map_err(|e| SharedError::Url(e.to_string()))?;
        // Few, quick reconnection attempts: the ping task retries every second anyway,
        // and a long backoff would delay noticing Redis back.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_connection_timeout(Some(Duration::from_secs(1)));
        let conn = {
            let _guard = runtime.enter();
            ConnectionManager::new_lazy_with_config(client.clone(), config)
                .map_err(|e| SharedError::Url(e.to_string()))?
        };
        let (status_tx, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            prefix: prefix.to_string(),
            channel: format!("{prefix}events"),
            shown_url: shown(url),
            client,
            conn,
            options,
            runtime: runtime.clone(),
            instance: format!("{:016x}", rand::random::<u64>()),
            status: AtomicU8::new(UNKNOWN),
            status_tx,
            commands: AtomicU64::new(0),
            warned_other: AtomicBool::new(false),
            listeners: RwLock::new(Vec::new()),
            next_listener: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
            tasks: std::sync::Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&inner);
        let pinger = runtime.spawn(ping_loop(weak.clone()));
        let subscriber = runtime.spawn(subscribe_loop(weak, inner.status_tx.subscribe()));
        inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([pinger, subscriber]);
        Ok(SharedState(inner))
    }

    /// The prefix of every key and channel.
    pub fn prefix(&self) -> &str {
        &self.0.prefix
    }

    /// `prefix + suffix`: the full name of a key.
    pub fn key(&self, suffix: &str) -> String {
        let mut k = String::with_capacity(self.0.prefix.len() + suffix.len());
        k.push_str(&self.0.prefix);
        k.push_str(suffix);
        k
    }

    /// This instance's random id (the value of the locks it holds; its events carry it).
    pub fn instance_id(&self) -> &str {
        &self.0.instance
    }

    /// Redis answered the last call or ping.
    pub fn is_up(&self) -> bool {
        self.0.status.load(Ordering::Acquire) == UP
    }

    /// Whether decisions should ask Redis: not while it is known to be down (they use
    /// the local state at once instead of waiting for a timeout).
    pub fn is_available(&self) -> bool {
        self.0.status.load(Ordering::Acquire) != DOWN
    }

    /// Changes of [`SharedState::is_up`].
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.0.status_tx.subscribe()
    }

    /// How many calls ([`SharedState::call`]) were made since the start; pings and the
    /// pub/sub connection are not counted.
    pub fn calls(&self) -> u64 {
        self.0.commands.load(Ordering::Relaxed)
    }

    /// Spawns `task` on the runtime the shared state was opened on (usable from sync
    /// code with no runtime of its own).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.runtime.spawn(task)
    }

    /// The longest wait of one call.
    pub fn timeout(&self) -> Duration {
        self.0.options.timeout
    }

    /// Waits (up to `within` from now) until Redis has answered; false if it did not.
    pub async fn wait_up(&self, within: Duration) -> bool {
        let mut rx = self.watch();
        tokio::time::timeout(within, rx.wait_for(|up| *up))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Runs one Redis call (`f` gets a clone of the command connection), bounded by the
    /// timeout. A failure to reach Redis marks it down (warned once) and is returned as
    /// [`SharedError::Unavailable`]: the caller falls back to its local state.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, SharedError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.0.commands.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.0.options.timeout, f(self.0.conn.clone())).await {
            Ok(Ok(v)) => {
                self.0.set_up(true, "");
                Ok(v)
            }
            Ok(Err(e)) if is_outage(&e) => {
                self.0.set_up(false, &e.to_string());
                Err(SharedError::Unavailable(e.to_string()))
            }
            Ok(Err(e)) => {
                if !self.0.warned_other.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "shared state: Redis refused a command; this decision uses the local state");
                }
                Err(SharedError::Redis(e))
            }
            Err(_) => {
                let why = format!("no answer within {:?}", self.0.options.timeout);
                self.0.set_up(false, &why);
                Err(SharedError::Unavailable(why))
            }
        }
    }

    /// Publishes `payload` to the listeners of `topic` on every instance (this one
    /// included).
    pub async fn publish(&self, topic: &str, payload: &str) -> Result<(), SharedError> {
        let channel = self.0.channel.clone();
        let message = format!("{topic} {payload}");
        self.call(move |mut c| async move {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(message)
                .query_async::<i64>(&mut c)
                .await
                .map(drop)
        })
        .await
    }

    /// Calls `listener` with every event published to `topic`, and with
    /// [`Notice::Subscribed`] each time the events channel is (re)subscribed: now, if it
    /// already is. `listener` runs on the subscriber task: keep it short, spawn work.
    pub fn listen(
        &self,
        topic: &str,
        listener: impl Fn(Notice<'_>) + Send + Sync + 'static,
    ) -> ListenerId {
        let listener: Listener = Arc::new(listener);
        let id = ListenerId(self.0.next_listener.fetch_add(1, Ordering::Relaxed));
        self.0
            .listeners
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, topic.to_string(), listener.clone()));
        // The subscriber sets `subscribed` before it reads the listeners: either it saw
        // this one, or this sees the flag (at worst both, and catching up twice is fine).
        if self.0.subscribed.load(Ordering::SeqCst) {
            listener(Notice::Subscribed);
        }
        id
    }

    /// Removes a listener [`listen`](SharedState::listen) added (what a registry
    /// that a config reload replaced does when it is dropped).
    pub fn unlisten(&self, id: ListenerId) {
        self.0
            .listeners
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(i, _, _)| *i != id);
    }

    /// How many listeners are registered (tests).
    pub fn listeners(&self) -> usize {
        self.0
            .listeners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// What [`SharedState::listen`] returns, to [`unlisten`](SharedState::unlisten).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerId(u64);

impl Inner {
    fn set_up(&self, up: bool, why: &str) {
        let new = if up { UP } else { DOWN };
        if self.status.load(Ordering::Acquire) == new {
            return; // the common case: no write to a line every request reads
        }
        let old = self.status.swap(new, Ordering::AcqRel);
        if old == new {
            return;
        }
        metrics::gauge!(SHARED_STATE_UP).set(if up { 1.0 } else { 0.0 });
        self.status_tx.send_replace(up);
        match (old, up) {
            (UNKNOWN, true) => {
                tracing::info!(url = %self.shown_url, "shared state: connected to Redis")
            }
            (_, true) => {
                tracing::info!(url = %self.shown_url, "shared state: Redis is back; rate limits and endpoint health are shared again")
            }
            (_, false) => {
                tracing::warn!(url = %self.shown_url, error = why, "shared state: Redis is unreachable; rate limits and endpoint health fall back to this instance's own state until it is back")
            }
        }
    }

    /// Tells the listeners of `topic` (all of them for `None`).
    fn dispatch(&self, topic: Option<&str>, notice: Notice<'_>) {
        // Called outside the lock: a listener's owner may be dropped by the call, and
        // its drop unlistens (a write).
        let listeners: Vec<Listener> = self
            .listeners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, t, _)| topic.is_none_or(|topic| topic == t))
            .map(|(_, _, l)| l.clone())
            .collect();
        for l in listeners {
            l(notice);
        }
    }
}

/// Pings Redis every `ping_every`; the only thing that notices Redis back while no
/// decision asks it.
async fn ping_loop(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let every = inner.options.ping_every;
        let mut conn = inner.conn.clone();
        let wait = inner.options.timeout.max(Duration::from_secs(1));
        let r =
            tokio::time::timeout(wait, redis::cmd("PING").query_async::<String>(&mut conn)).await;
        match r {
            Ok(Ok(_)) => inner.set_up(true, ""),
            Ok(Err(e)) => inner.set_up(false, &e.to_string()),
            Err(_) => inner.set_up(false, &format!("no answer to PING within {wait:?}")),
        }
        drop(inner);
        tokio::time::sleep(every).await;
    }
}

/// Keeps one pub/sub connection subscribed to the events channel, and hands its
/// messages to the listeners; re-subscribes (after a second) when it breaks, and when
/// Redis was down meanwhile (a silent connection may be dead).
async fn subscribe_loop(weak: Weak<Inner>, mut status: watch::Receiver<bool>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let (client, channel, every) = (
            inner.client.clone(),
            inner.channel.clone(),
            inner.options.ping_every,
        );
        drop(inner);
        let connected = tokio::time::timeout(Duration::from_secs(2), async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            Ok::<_, RedisError>(ps)
        })
        .await;
        if let Ok(Ok(ps)) = connected {
            let Some(inner) = weak.upgrade() else { return };
            inner.subscribed.store(true, Ordering::SeqCst);
            inner.dispatch(None, Notice::Subscribed);
            drop(inner);
            status.mark_unchanged();
            let mut messages = ps.into_on_message();
            loop {
                tokio::select! {
                    m = messages.next() => {
                        let Some(m) = m else { break };
                        let Some(inner) = weak.upgrade() else { return };
                        let Ok(text) = std::str::from_utf8(m.get_payload_bytes()) else { continue };
                        let (topic, payload) = text.split_once(' ').unwrap_or((text, ""));
                        inner.dispatch(Some(topic), Notice::Message(payload));
                    }
                    changed = status.changed() => {
                        if changed.is_err() { return }
                        if !*status.borrow_and_update() { break }
                    }
                }
            }
            if let Some(inner) = weak.upgrade() {
                inner.subscribed.store(false, Ordering::SeqCst);
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
pub(crate) mod tests;
