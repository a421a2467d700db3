//! [`RedisHealth`]: endpoint health learned by one instance, used by all (SPEC §6).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::Script;
use std::sync::LazyLock;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::memory::{Change, InMemoryHealth, ProbeGate};
use super::{AttemptOutcome, Availability, HealthRegistry, LastFailure, PermitKind, Ticket};
use crate::catalog::{Catalog, Endpoint};
use crate::config::HealthConfig;
use crate::error::FailureKind;
use crate::shared::{Notice, SharedState};

/// The pub/sub topic of health events.
const TOPIC: &str = "health";
/// How long an instance holds the probe lock when it has no probe in flight.
const LEASE: Duration = Duration::from_secs(1);
/// The lock lives this much longer in Redis than its holder believes it holds it, so
/// two instances never both think they hold it.
const LOCK_MARGIN: Duration = Duration::from_millis(500);
/// On catching up, a shared degraded state gone this long before the local cooldown
/// ends was deleted (a recovery), not expired.
const RESYNC_SLACK: Duration = Duration::from_millis(500);
/// Queued changes past this are dropped (Redis too slow): local state still has them.
const QUEUE: usize = 1024;

/// Extends (`ARGV[2]` ms) or deletes (`ARGV[2]` = 0) a lock only if `ARGV[1]` holds it.
const LOCK_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

static LOCK: LazyLock<Script> = LazyLock::new(|| Script::new(LOCK_SCRIPT));

/// A [`HealthRegistry`] shared by every instance on one Redis: endpoint health
/// learned by one instance, used by all (SPEC §6).
///
/// Every sync call reads and writes an [`InMemoryHealth`], as a single instance does;
/// what is shared is each *change* of state, never each request:
/// - a retriable failure increments a shared consecutive-failure counter
///   (`health:failures:{label}`, expiring one cooldown after its last failure); the
///   instance that sees it reach `failure_threshold` marks the endpoint degraded in
///   Redis (`health:degraded:{label}`, `SET NX` with the cooldown as its TTL) and
///   publishes it. A success resets the counter only where it may be non-zero (this
///   instance counted a failure, or was told of one): a healthy endpoint costs no
///   Redis call at all;
/// - an endpoint degraded by this instance's own count, a failed probe, a 429 park
///   (`health:parked:{label}`) and a recovery (a probe's success) are written and
///   published the same way;
/// - every instance applies the events it receives to its `InMemoryHealth` at once,
///   and on (re)subscribing reads the shared states back to catch up;
/// - after a cooldown, one probe at a time across all instances: the probe slot is a
///   lock (`health:probe:{label}`, `SET NX PX`). `acquire` is sync and must not wait on
///   Redis, so each instance's background task tries the lock when the cooldown ends
///   (and again when its requests want the endpoint and the lock has expired); only
///   the holder sees the endpoint `HalfOpen` and lets one request probe it, the others
///   keep seeing it unavailable. The lock is held for a short lease, extended to the
///   provider's timeout while a probe is in flight, and released with its result (or
///   when the lease ends unused, so an idle instance never sits on it);
/// - what degraded or parked an endpoint (the failures in a row and the last of them,
///   which [`HealthRegistry::snapshot`] and so `GET /admin/endpoints` show) travels with
///   it: a `cause` event published just before the state's own, and
///   `health:cause:{label}` for the instances that catch up later. Decisions never
///   read it.
///
/// Endpoints are named across instances by [`Endpoint::label`] (`model@provider`),
/// not by index. Times travel as durations left (`PTTL`, milliseconds in events), so
/// the instances' clocks never matter. While Redis is down each instance keeps its own
/// health, probes included, exactly as [`InMemoryHealth`] alone; when Redis is back it
/// catches up and shares again.
///
/// # Example
/// ```no_run
/// use std::sync::Arc;
/// use switchboard::{catalog::Catalog, config::Config, shared::SharedState};
/// use switchboard::health::{HealthFilterLayer, HealthRegistry, RedisHealth};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let config = Config::demo();
/// let catalog = Catalog::from_config(&config);
/// let shared = SharedState::open("redis://127.0.0.1:6379", "switchboard:").unwrap();
/// let health: Arc<dyn HealthRegistry> =
///     Arc::new(RedisHealth::new(shared, &config.health, &catalog));
/// let layer = HealthFilterLayer::new(health); // and FallbackLayer::health(..) the same
/// # let _ = layer;
/// # }
/// ```
pub struct RedisHealth {
    core: Arc<Core>,
}

impl std::fmt::Debug for RedisHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHealth")
            .field("shared", &self.core.shared)
            .finish_non_exhaustive()
    }
}

/// Redis key names of one endpoint.
struct Keys {
    failures: String,
    cause: String,
    degraded: String,
    parked: String,
    probe: String,
}

/// Per-endpoint flags read on the request path (atomics: no lock).
#[derive(Default)]
struct Flags {
    /// A request here wanted the endpoint while its probe slot was elsewhere.
    demand: AtomicBool,
    /// The shared failure counter may be non-zero: the next success resets it.
    maybe_failures: AtomicBool,
    /// The local degraded state was learned from Redis (not found by this instance).
    from_shared: AtomicBool,
}

/// Per-endpoint probe-lock bookkeeping of the background task.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Book {
    /// This instance holds the probe lock.
    holds_lock: bool,
    /// Until when it believes it holds it (the Redis TTL is longer by `LOCK_MARGIN`).
    lock_until: Option<Instant>,
    /// The cooldown end for which the lock was first tried.
    tried_for: Option<Instant>,
    /// When the lock held elsewhere expires (try again then, if wanted).
    retry_at: Option<Instant>,
}

/// A change for the background task to share (or a status change to act on).
#[derive(Debug, Clone, Copy)]
enum Op {
    Counted(usize),
    Degraded(usize, Instant),
    Parked(usize, Instant),
    Recovered(usize),
    ResetFailures(usize),
    ProbeStarted(usize),
    ProbeEnded(usize),
    ReleaseLock(usize),
    Resync,
    Down,
}

struct Core {
    local: InMemoryHealth,
    shared: SharedState,
    endpoints: Vec<Arc<Endpoint>>,
    by_label: HashMap<String, usize>,
    keys: Vec<Keys>,
    flags: Vec<Flags>,
    books: Vec<Mutex<Book>>,
    ops: mpsc::Sender<Op>,
    wake: Arc<Notify>,
    /// The shared states were read since Redis was last (re)subscribed.
    synced: AtomicBool,
    /// Its listener of health events, removed when it is dropped (a registry that a
    /// config reload replaced must not leave it behind).
    listener: std::sync::OnceLock<crate::shared::ListenerId>,
}

impl Drop for Core {
    fn drop(&mut self) {
        if let Some(id) = self.listener.get() {
            self.shared.unlisten(*id);
        }
    }
}

impl RedisHealth {
    /// A registry for every endpoint of `catalog` under the `[health]` settings,
    /// sharing through `shared`.
    pub fn new(shared: SharedState, config: &HealthConfig, catalog: &Catalog) -> Self {
        Self::with_local(
            shared,
            InMemoryHealth::for_catalog(config, catalog),
            catalog,
        )
    }

    /// The same around an [`InMemoryHealth`] of your own (e.g. with
    /// [`InMemoryHealth::with_cooldown`]), built for `catalog`.
    pub fn with_local(shared: SharedState, local: InMemoryHealth, catalog: &Catalog) -> Self {
        let endpoints = catalog.endpoints().to_vec();
        let keys = endpoints
            .iter()
            .map(|e| {
                let label = e.label();
                Keys {
                    failures: shared.key(&format!("health:failures:{label}")),
                    cause: shared.key(&format!("health:cause:{label}")),
                    degraded: shared.key(&format!("health:degraded:{label}")),
                    parked: shared.key(&format!("health:parked:{label}")),
                    probe: shared.key(&format!("health:probe:{label}")),
                }
            })
            .collect();
        let (ops, rx) = mpsc::channel(QUEUE);
        let wake = Arc::new(Notify::new());
        let core = Arc::new(Core {
            local,
            by_label: endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| (e.label(), i))
                .collect(),
            flags: endpoints.iter().map(|_| Flags::default()).collect(),
            books: endpoints.iter().map(|_| Mutex::default()).collect(),
            endpoints,
            keys,
            ops,
            wake: wake.clone(),
            synced: AtomicBool::new(false),
            shared: shared.clone(),
            listener: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&core);
        shared.spawn(run(weak.clone(), rx, wake, shared.watch()));
        let id = shared.listen(TOPIC, move |notice| {
            let Some(core) = weak.upgrade() else { return };
            match notice {
                Notice::Subscribed => core.send(Op::Resync),
                Notice::Message(payload) => core.apply_event(payload),
            }
        });
        let _ = core.listener.set(id);
        RedisHealth { core }
    }

    /// The in-memory registry every decision reads.
    pub fn local(&self) -> &InMemoryHealth {
        &self.core.local
    }

    /// The shared state it shares through.
    pub fn shared(&self) -> &SharedState {
        &self.core.shared
    }

    /// Whether it has caught up with Redis since it last (re)connected (until then,
    /// and while Redis is down, its health is this instance's own).
    pub fn is_synced(&self) -> bool {
        self.core.synced.load(Ordering::Acquire) && self.core.shared.is_up()
    }
}

impl HealthRegistry for RedisHealth {
    fn availability(&self, e: &Endpoint, now: Instant) -> Availability {
        let a = self.core.local.availability(e, now);
        if matches!(a, Availability::Unavailable { until } if until <= now) {
            self.core.wanted(e);
        }
        a
    }

    fn parked(&self, e: &Endpoint, now: Instant) -> bool {
        self.core.local.parked(e, now)
    }

    fn acquire(&self, e: &Endpoint, now: Instant, last_resort: bool) -> Option<Ticket> {
        let ticket = self.core.local.acquire(e, now, last_resort);
        match ticket {
            Some(t) if t.kind == PermitKind::Probe => self.core.share(e, Change::ProbeStarted),
            None => {
                if matches!(self.core.local.availability(e, now), Availability::Unavailable { until } if until <= now)
                {
                    self.core.wanted(e);
                }
            }
            Some(_) => {}
        }
        ticket
    }

    fn record(&self, e: &Endpoint, ticket: Ticket, outcome: AttemptOutcome, now: Instant) {
        let change = self.core.local.record_change(e, ticket, outcome, now);
        self.core.share(e, change);
    }

    fn release(&self, e: &Endpoint, ticket: Ticket) {
        let change = self.core.local.release_change(e, ticket);
        self.core.share(e, change);
    }

    fn observe_ttft(&self, e: &Endpoint, ttft: Duration, now: Instant) {
        self.core.local.observe_ttft(e, ttft, now)
    }

    fn observe_throughput(&self, e: &Endpoint, tokens_per_sec: f64, now: Instant) {
        self.core.local.observe_throughput(e, tokens_per_sec, now)
    }

    fn ttft(&self, e: &Endpoint) -> Option<Duration> {
        self.core.local.ttft(e)
    }

    fn throughput(&self, e: &Endpoint) -> Option<f64> {
        self.core.local.throughput(e)
    }

    /// This instance's in-memory view, which follows the others' events through Redis
    /// (an endpoint degraded or parked elsewhere shows the failures in a row and the
    /// last failure of the instance that saw them).
    fn snapshot(&self, e: &Endpoint, now: Instant) -> super::EndpointHealth {
        self.core.local.snapshot(e, now)
    }
}

/// The `(kind, ms, instance, label)` of an event's payload.
pub(super) fn parse_event(payload: &str) -> Option<(&str, u64, &str, &str)> {
    let mut parts = payload.splitn(4, ' ');
    let kind = parts.next()?;
    let ms = parts.next()?.parse().ok()?;
    Some((kind, ms, parts.next()?, parts.next()?))
}

/// What degraded or parked an endpoint, as it travels between instances (one token
/// without spaces): `{failures in a row}/{last failure's label}/{its Retry-After in
/// ms, or -}`.
pub(super) fn cause_token(streak: u32, last: &LastFailure) -> String {
    let retry = last
        .retry_after
        .map_or_else(|| "-".to_string(), |d| ms(d).to_string());
    format!("{streak}/{}/{retry}", last.kind.label())
}

/// The inverse of [`cause_token`]; `None` for anything unreadable.
pub(super) fn parse_cause(token: &str) -> Option<(u32, LastFailure)> {
    let mut parts = token.split('/');
    let streak = parts.next()?.parse().ok()?;
    let kind = FailureKind::from_label(parts.next()?)?;
    let retry_after = match parts.next()? {
        "-" => None,
        ms => Some(Duration::from_millis(ms.parse().ok()?)),
    };
    if parts.next().is_some() {
        return None;
    }
    Some((streak, LastFailure { kind, retry_after }))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Core {
    fn book(&self, i: usize) -> std::sync::MutexGuard<'_, Book> {
        self.books[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, op: Op) {
        if self.ops.try_send(op).is_err() {
            tracing::debug!(?op, "shared health: queue full, change kept local");
        }
    }

    /// A request wanted `e` while its cooldown was over but its probe slot elsewhere.
    fn wanted(&self, e: &Endpoint) {
        let Some(f) = self.flags.get(e.index) else {
            return;
        };
        if !f.demand.load(Ordering::Relaxed) && !f.demand.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// Shares a local change (request path: flags and a queue, never a Redis wait).
    fn share(&self, e: &Endpoint, change: Change) {
        if !self.shared.is_available() {
            return; // Redis down: this instance's own health, as if alone.
        }
        let i = e.index;
        let Some(f) = self.flags.get(i) else { return };
        match change {
            Change::None => {}
            Change::Succeeded => {
                if f.maybe_failures.load(Ordering::Relaxed)
                    && f.maybe_failures.swap(false, Ordering::AcqRel)
                {
                    self.send(Op::ResetFailures(i));
                }
            }
            Change::Counted => {
                f.maybe_failures.store(true, Ordering::Release);
                self.send(Op::Counted(i));
            }
            Change::Degraded { until } => {
                f.from_shared.store(false, Ordering::Release);
                self.send(Op::Degraded(i, until));
            }
            Change::Parked { until } => self.send(Op::Parked(i, until)),
            Change::Restored => self.send(Op::Recovered(i)),
            Change::ProbeStarted => self.send(Op::ProbeStarted(i)),
            Change::ProbeEnded => self.send(Op::ProbeEnded(i)),
        }
    }

    /// Applies another instance's event (on the subscriber task: no Redis calls).
    fn apply_event(&self, payload: &str) {
        let Some((kind, ms, instance, label)) = parse_event(payload) else {
            tracing::debug!(payload, "shared health: unreadable event");
            return;
        };
        if instance == self.shared.instance_id() {
            return;
        }
        // A `cause` carries its token before the label (an instance that does not know
        // the kind finds no such label, and ignores it).
        let (label, cause) = match kind {
            "cause" => match label.split_once(' ') {
                Some((token, label)) => (label, Some(token)),
                None => return,
            },
            _ => (label, None),
        };
        let Some(&i) = self.by_label.get(label) else {
            return;
        };
        let (e, f, now) = (&self.endpoints[i], &self.flags[i], Instant::now());
        let left = Duration::from_millis(ms);
        match kind {
            "degraded" => {
                self.local.apply_degraded(e, now + left);
                f.from_shared.store(true, Ordering::Release);
                f.maybe_failures.store(false, Ordering::Release);
                self.new_cooldown(i);
            }
            "parked" => self.local.apply_parked(e, now + left),
            "recovered" => {
                self.local.apply_recovered(e);
                f.from_shared.store(false, Ordering::Release);
                f.maybe_failures.store(false, Ordering::Release);
                self.new_cooldown(i);
            }
            "failing" => f.maybe_failures.store(true, Ordering::Release),
            "cause" => match cause.and_then(parse_cause) {
                Some((streak, last)) => self.local.apply_cause(e, streak, last),
                None => tracing::debug!(payload, "shared health: unreadable cause"),
            },
            _ => tracing::debug!(payload, "shared health: unknown event"),
        }
    }

    /// The endpoint's state changed elsewhere: a lock held for the old state goes, and
    /// the task looks at its timers again.
    fn new_cooldown(&self, i: usize) {
        let held = {
            let mut b = self.book(i);
            let held = b.holds_lock;
            b.tried_for = None;
            b.retry_at = None;
            held
        };
        if held {
            self.send(Op::ReleaseLock(i));
        }
        self.wake.notify_one();
    }

    /// When the task must look again: a cooldown ending, a lease ending, a lock held
    /// elsewhere expiring while this instance wants it.
    fn next_wake(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for (i, e) in self.endpoints.iter().enumerate() {
            let v = self.local.view(e);
            let Some(until) = v.degraded_until else {
                continue;
            };
            let b = *self.book(i);
            if until > now {
                at(until);
            } else if b.holds_lock {
                if let (false, Some(t)) = (v.probing, b.lock_until) {
                    at(t);
                }
            } else if let Some(t) = b.retry_at {
                if self.flags[i].demand.load(Ordering::Relaxed) {
                    at(t);
                }
            }
        }
        next
    }

    async fn handle(&self, op: Op) {
        if !matches!(op, Op::Down | Op::Resync) && !self.shared.is_available() {
            return;
        }
        let now = Instant::now();
        let cooldown = self.local.cooldown();
        match op {
            Op::Counted(i) => {
                let k = &self.keys[i];
                let (key, ttl) = (k.failures.clone(), ms(cooldown.max(Duration::from_secs(1))));
                let count: Result<(i64,), _> = self
                    .shared
                    .call(move |mut c| async move {
                        redis::pipe()
                            .incr(&key, 1)
                            .pexpire(&key, ttl as i64)
                            .ignore()
                            .query_async(&mut c)
                            .await
                    })
                    .await;
                let Ok((n,)) = count else { return };
                if n == 1 {
                    self.publish("failing", 0, i).await;
                }
                if n >= i64::from(self.local.failure_threshold()) {
                    let (degraded, failures, me) = (
                        k.degraded.clone(),
                        k.failures.clone(),
                        self.shared.instance_id().to_string(),
                    );
                    let won: Result<(Option<String>,), _> = self
                        .shared
                        .call(move |mut c| async move {
                            redis::pipe()
                                .cmd("SET")
                                .arg(&degraded)
                                .arg(me)
                                .arg("NX")
                                .arg("PX")
                                .arg(ms(cooldown))
                                .del(&failures)
                                .ignore()
                                .query_async(&mut c)
                                .await
                        })
                        .await;
                    if let Ok((Some(_),)) = won {
                        // This instance's failure crossed the shared threshold.
                        let e = &self.endpoints[i];
                        self.local.apply_degraded(e, now + cooldown);
                        self.flags[i].from_shared.store(false, Ordering::Release);
                        self.flags[i].maybe_failures.store(false, Ordering::Release);
                        self.new_cooldown(i);
                        let streak = u32::try_from(n).unwrap_or(u32::MAX);
                        self.share_cause(i, Some(streak), ms(cooldown)).await;
                        self.publish("degraded", ms(cooldown), i).await;
                    }
                }
            }
            Op::Degraded(i, until) => {
                let left = ms(until.saturating_duration_since(now));
                let (k, me) = (&self.keys[i], self.shared.instance_id().to_string());
                let (degraded, failures) = (k.degraded.clone(), k.failures.clone());
                let _ = self
                    .shared
                    .call(move |mut c| async move {
                        redis::pipe()
                            .cmd("SET")
                            .arg(&degraded)
                            .arg(me)
                            .arg("PX")
                            .arg(left)
                            .ignore()
                            .del(&failures)
                            .ignore()
                            .exec_async(&mut c)
                            .await
                    })
                    .await;
                self.flags[i].maybe_failures.store(false, Ordering::Release);
                self.release_lock(i).await;
                self.reset_book(i);
                self.share_cause(i, None, left).await;
                self.publish("degraded", left, i).await;
            }
            Op::Parked(i, until) => {
                let left = ms(until.saturating_duration_since(now));
                let me = self.shared.instance_id().to_string();
                self.set_px(self.keys[i].parked.clone(), me, left).await;
                self.share_cause(i, None, left).await;
                self.publish("parked", left, i).await;
            }
            Op::Recovered(i) => {
                let k = &self.keys[i];
                let keys = [
                    k.degraded.clone(),
                    k.parked.clone(),
                    k.failures.clone(),
                    k.cause.clone(),
                ];
                let _ = self
                    .shared
                    .call(move |mut c| async move {
                        redis::cmd("DEL").arg(&keys).exec_async(&mut c).await
                    })
                    .await;
                self.flags[i].maybe_failures.store(false, Ordering::Release);
                self.release_lock(i).await;
                self.reset_book(i);
                self.publish("recovered", 0, i).await;
            }
            Op::ResetFailures(i) => {
                let key = self.keys[i].failures.clone();
                let _ = self
                    .shared
                    .call(move |mut c| async move {
                        redis::cmd("DEL").arg(&key).exec_async(&mut c).await
                    })
                    .await;
            }
            Op::ProbeStarted(i) => {
                if self.book(i).holds_lock {
                    let p = &self.endpoints[i].provider;
                    let hold = p.timeout + p.stream_idle_timeout + Duration::from_secs(1);
                    self.book(i).lock_until = Some(now + hold);
                    self.extend_lock(i, hold).await;
                }
            }
            Op::ProbeEnded(i) => {
                if self.book(i).holds_lock {
                    self.book(i).lock_until = Some(now + LEASE);
                    self.local
                        .set_gate(&self.endpoints[i], ProbeGate::OpenUntil(now + LEASE));
                    self.extend_lock(i, LEASE).await;
                }
            }
            Op::ReleaseLock(i) => self.release_lock(i).await,
            Op::Resync => self.resync().await,
            Op::Down => {
                // Each instance on its own: every probe slot is this instance's again.
                self.synced.store(false, Ordering::Release);
                for (i, e) in self.endpoints.iter().enumerate() {
                    self.local.set_gate(e, ProbeGate::Local);
                    *self.book(i) = Book::default();
                }
            }
        }
    }

    fn reset_book(&self, i: usize) {
        let mut b = self.book(i);
        b.tried_for = None;
        b.retry_at = None;
    }

    /// Tells the others what degraded or parked endpoint `i` (this instance's last
    /// failure of it; `streak` the shared count when known), kept `px` ms in Redis.
    async fn share_cause(&self, i: usize, streak: Option<u32>, px: u64) {
        let h = self.local.snapshot(&self.endpoints[i], Instant::now());
        let Some(last) = h.last_failure else { return };
        let token = cause_token(streak.unwrap_or(h.consecutive_failures), &last);
        self.set_px(self.keys[i].cause.clone(), token.clone(), px)
            .await;
        let payload = format!(
            "cause 0 {} {token} {}",
            self.shared.instance_id(),
            self.endpoints[i].label()
        );
        let _ = self.shared.publish(TOPIC, &payload).await;
    }

    /// `SET key value PX px` (a failure is left to the next resync).
    async fn set_px(&self, key: String, value: String, px: u64) {
        let _ = self
            .shared
            .call(move |mut c| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(value)
                    .arg("PX")
                    .arg(px)
                    .exec_async(&mut c)
                    .await
            })
            .await;
    }

    async fn publish(&self, kind: &str, ms: u64, i: usize) {
        let payload = format!(
            "{kind} {ms} {} {}",
            self.shared.instance_id(),
            self.endpoints[i].label()
        );
        let _ = self.shared.publish(TOPIC, &payload).await;
    }

    /// Runs the lock script on endpoint `i`'s lock: `px` = 0 deletes it.
    async fn lock_script(&self, i: usize, px: u64) -> bool {
        let (key, me) = (
            self.keys[i].probe.clone(),
            self.shared.instance_id().to_string(),
        );
        self.shared
            .call(move |mut c| async move {
                LOCK.key(key)
                    .arg(me)
                    .arg(px)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            .is_ok_and(|n| n == 1)
    }

    async fn extend_lock(&self, i: usize, hold: Duration) {
        if !self.lock_script(i, ms(hold + LOCK_MARGIN)).await {
            tracing::debug!(endpoint = %self.endpoints[i].label(), "shared health: probe lock lost");
        }
    }

    /// Gives the probe lock back, if held: closed here first, then freed in Redis, so
    /// two instances are never open at once.
    async fn release_lock(&self, i: usize) {
        let held = std::mem::take(&mut self.book(i).holds_lock);
        if held {
            self.book(i).lock_until = None;
            if self.synced.load(Ordering::Acquire) {
                self.local.set_gate(&self.endpoints[i], ProbeGate::Closed);
            }
            self.lock_script(i, 0).await;
        }
    }

    /// Reads every endpoint's shared state back (after (re)subscribing), then shares
    /// what this instance learnt alone meanwhile.
    async fn resync(&self) {
        type Row = (i64, i64, i64, Option<String>, Option<String>);
        let mut pipe = redis::pipe();
        for k in &self.keys {
            pipe.pttl(&k.degraded)
                .pttl(&k.parked)
                .exists(&k.failures)
                .get(&k.probe)
                .get(&k.cause);
        }
        let rows: Result<Vec<redis::Value>, _> = self
            .shared
            .call(move |mut c| async move { pipe.query_async(&mut c).await })
            .await;
        let Ok(values) = rows else { return };
        let rows: Vec<Row> = values
            .chunks(5)
            .filter_map(|c| redis::from_redis_value(redis::Value::Array(c.to_vec())).ok())
            .collect();
        if rows.len() != self.keys.len() {
            tracing::warn!("shared health: unexpected answer while catching up");
            return;
        }
        let now = Instant::now();
        let me = self.shared.instance_id();
        for (i, (degraded, parked, failing, probe, cause)) in rows.into_iter().enumerate() {
            let (e, f) = (&self.endpoints[i], &self.flags[i]);
            if degraded > 0 || parked > 0 {
                if let Some((streak, last)) = cause.as_deref().and_then(parse_cause) {
                    self.local.apply_cause(e, streak, last);
                }
            }
            if degraded > 0 {
                self.local
                    .apply_degraded(e, now + Duration::from_millis(degraded as u64));
                f.from_shared.store(true, Ordering::Release);
            } else if let Some(until) = self.local.view(e).degraded_until {
                if f.from_shared.load(Ordering::Acquire) {
                    // Gone from Redis before its cooldown ended: recovered elsewhere
                    // while this instance was not listening. (Gone after it: the
                    // cooldown merely ended; it stays degraded until a probe.)
                    if until > now + RESYNC_SLACK {
                        self.local.apply_recovered(e);
                        f.from_shared.store(false, Ordering::Release);
                    }
                } else if until > now {
                    // Learnt here while Redis was away: news for the others.
                    self.send(Op::Degraded(i, until));
                }
            }
            if parked > 0 {
                self.local
                    .apply_parked(e, now + Duration::from_millis(parked as u64));
            }
            f.maybe_failures.store(failing > 0, Ordering::Release);
            // A lock this instance still holds is kept while its probe is in flight
            // (its result releases it), else given back: its time left is unknown here.
            let holds = probe.as_deref() == Some(me);
            let probing = self.local.view(e).probing;
            *self.book(i) = Book {
                holds_lock: holds,
                lock_until: None,
                ..Book::default()
            };
            self.local.set_gate(e, ProbeGate::Closed);
            if holds && !probing {
                self.send(Op::ReleaseLock(i));
            }
        }
        self.synced.store(true, Ordering::Release);
        tracing::debug!("shared health: caught up with Redis");
    }

    /// Tries, releases or renews probe locks as cooldowns and leases end.
    async fn probe_pass(&self) {
        if !self.synced.load(Ordering::Acquire) || !self.shared.is_up() {
            return;
        }
        let now = Instant::now();
        for (i, e) in self.endpoints.iter().enumerate() {
            let v = self.local.view(e);
            let Some(until) = v.degraded_until else {
                let mut b = self.book(i);
                if b.holds_lock || b.tried_for.is_some() || b.retry_at.is_some() {
                    *b = Book::default();
                }
                continue;
            };
            if now < until {
                continue;
            }
            let b = *self.book(i);
            if b.holds_lock {
                // Held with no probe in flight past its lease: no request here wants it.
                if !v.probing && b.lock_until.is_some_and(|t| now >= t) {
                    self.release_lock(i).await;
                }
                continue;
            }
            let f = &self.flags[i];
            let first = b.tried_for != Some(until);
            let due = b.retry_at.is_none_or(|t| now >= t);
            if !(first || (f.demand.load(Ordering::Acquire) && due)) {
                continue;
            }
            f.demand.store(false, Ordering::Release);
            let (key, me) = (
                self.keys[i].probe.clone(),
                self.shared.instance_id().to_string(),
            );
            let px = ms(LEASE + LOCK_MARGIN);
            let sent = Instant::now();
            let r: Result<(Option<String>, i64), _> = self
                .shared
                .call(move |mut c| async move {
                    redis::pipe()
                        .cmd("SET")
                        .arg(&key)
                        .arg(me)
                        .arg("NX")
                        .arg("PX")
                        .arg(px)
                        .pttl(&key)
                        .query_async(&mut c)
                        .await
                })
                .await;
            let mut b = self.book(i);
            b.tried_for = Some(until);
            match r {
                Ok((Some(_), _)) => {
                    b.holds_lock = true;
                    b.lock_until = Some(sent + LEASE);
                    b.retry_at = None;
                    drop(b);
                    // Open only for the lease this instance is sure of: if its task
                    // runs late, the slot closes here before the lock can expire there.
                    self.local.set_gate(e, ProbeGate::OpenUntil(sent + LEASE));
                    tracing::debug!(endpoint = %e.label(), "shared health: this instance holds the probe");
                }
                Ok((None, pttl)) => {
                    b.retry_at = Some(Instant::now() + Duration::from_millis(pttl.max(50) as u64));
                }
                Err(_) => b.retry_at = Some(Instant::now() + LEASE),
            }
        }
    }
}

/// The background task: shares queued changes in order, and keeps the probe locks.
async fn run(
    weak: Weak<Core>,
    mut ops: mpsc::Receiver<Op>,
    wake: Arc<Notify>,
    mut status: watch::Receiver<bool>,
) {
    loop {
        let next = {
            let Some(core) = weak.upgrade() else { return };
            core.next_wake(Instant::now())
        };
        let far = Instant::now() + Duration::from_secs(3600);
        let op = tokio::select! {
            op = ops.recv() => match op {
                Some(op) => Some(op),
                None => return,
            },
            _ = wake.notified() => None,
            _ = tokio::time::sleep_until(next.unwrap_or(far)) => None,
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                (!*status.borrow_and_update()).then_some(Op::Down)
            }
        };
        let Some(core) = weak.upgrade() else { return };
        if let Some(op) = op {
            core.handle(op).await;
        }
        core.probe_pass().await;
    }
}
