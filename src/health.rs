//! `HealthFilterLayer` and the [`HealthRegistry`]: passive per-endpoint health from real
//! traffic, and the order in which the healthy endpoints of a plan are tried.
//!
//! Health (SPEC §5) is learnt from the attempts [`FallbackLayer`](crate::fallback)
//! makes: `failure_threshold` consecutive retriable failures mark an endpoint
//! *degraded* for `cooldown_secs`; degraded endpoints are dropped from plans without
//! being contacted; after the cooldown exactly one attempt at a time may *probe* it
//! (a [`Permit`] taken per attempt, an RAII guard: a dropped probe re-arms), and the
//! probe's success restores it. A 429 carrying `Retry-After` *parks* the endpoint for
//! that long instead of counting as a failure. A result that comes back from an attempt
//! that started before the endpoint's last change of state (an *epoch* counter) is
//! ignored, so a late success cannot restore a degraded endpoint.
//!
//! [`HealthFilter`] sits after routing: it drops unavailable endpoints, then orders the
//! healthy ones: `provider.order` first; `sort` / `:floor` / `:nitro` when asked;
//! otherwise the first endpoint is drawn at random with probability ∝ `weight /
//! price²` (free endpoints first) and the rest follow cheapest first. When every
//! candidate is unavailable, the plan becomes the one endpoint whose cooldown ends
//! soonest, flagged as the *last resort* ([`CallState::last_resort`]).
//!
//! The registry also keeps observed time to first token and throughput per endpoint
//! (time-decayed, peak-sensitive EWMAs, as tower's `load::PeakEwma`), which
//! `sort=latency|throughput` and `:nitro` read.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use switchboard::{catalog::Catalog, config::{Config, HealthConfig}};
//! use switchboard::context::{CallContext, ChatCall};
//! use switchboard::chat::{ChatRequest, Message, Role};
//! use switchboard::error::{GatewayError, ProviderError};
//! use switchboard::health::{HealthFilterLayer, HealthRegistry, InMemoryHealth, Permit};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let catalog = Catalog::from_config(&Config::demo());
//! let cfg = HealthConfig { failure_threshold: 1, cooldown_secs: 60 };
//! let health: Arc<dyn HealthRegistry> =
//!     Arc::new(InMemoryHealth::new(&cfg, catalog.endpoints().len()));
//!
//! // One failed attempt on `mock/echo@mock` degrades it (threshold 1).
//! let echo = catalog.model("mock/echo").unwrap().endpoints[0].clone();
//! let permit = Permit::acquire(&health, &echo, false).unwrap();
//! permit.failure(&ProviderError::status("mock", 503, "busy"));
//!
//! let svc = ServiceBuilder::new()
//!     .layer(HealthFilterLayer::new(health))
//!     .service(service_fn(|call: ChatCall| async move {
//!         let plan: Vec<String> = call.plan.iter().map(|e| e.label()).collect();
//!         Err::<switchboard::context::ChatReply, _>(GatewayError::Internal(plan.join(",")))
//!     }));
//! let mut call = ChatCall::new(ChatRequest {
//!     model: "mock/echo".into(),
//!     messages: vec![Message::text(Role::User, "hi")],
//!     ..Default::default()
//! }, CallContext::new());
//! call.plan = catalog.endpoints().to_vec(); // echo, lorem
//! let err = svc.oneshot(call).await.unwrap_err();
//! assert_eq!(err.to_string(), "mock/lorem@mock"); // the degraded one is skipped
//! # }
//! ```
//!
//! [`CallState::last_resort`]: crate::context::CallState::last_resort

use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{self, Either, Ready};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::catalog::Endpoint;
use crate::chat::SortBy;
use crate::config::HealthConfig;
use crate::context::{ChatCall, ChatReply};
use crate::error::{FailureClass, GatewayError, ProviderError};
use crate::route::{split_variant, Variant};

// ---------------------------------------------------------------------------
// The registry
// ---------------------------------------------------------------------------

/// Whether an endpoint may be contacted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Healthy: any number of attempts may go.
    Healthy,
    /// Degraded, cooldown over, no probe in flight: one attempt may probe it.
    HalfOpen,
    /// Degraded (or parked by a `Retry-After`, or being probed) until `until`.
    Unavailable {
        /// When its cooldown (or park) ends; may be past while a probe is in flight.
        until: Instant,
    },
}

/// What kind of attempt a [`Ticket`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermitKind {
    /// An attempt on a healthy endpoint.
    Normal,
    /// The single probe of a degraded endpoint whose cooldown is over.
    Probe,
    /// The last-resort attempt on an unavailable endpoint (SPEC §5).
    LastResort,
}

/// A grant to make one attempt, as the registry hands it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// What kind of attempt it is.
    pub kind: PermitKind,
    /// The endpoint's epoch when the grant was made; results from an older epoch are
    /// ignored.
    pub epoch: u64,
}

/// How one attempt ended, as health sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The endpoint answered (first content chunk, or a complete answer).
    Success,
    /// The attempt failed.
    Failed {
        /// The shared classification ([`ProviderError::class`]).
        class: FailureClass,
        /// A 429's `Retry-After`: park the endpoint this long instead of counting.
        park: Option<Duration>,
    },
}

impl AttemptOutcome {
    /// The outcome of a failed attempt.
    pub fn from_error(e: &ProviderError) -> Self {
        AttemptOutcome::Failed {
            class: e.class(),
            park: if e.is_rate_limit() {
                e.retry_after
            } else {
                None
            },
        }
    }
}

/// Passive per-endpoint health and observed performance, shared by
/// [`HealthFilter`] (reads) and [`Fallback`](crate::fallback::Fallback) (writes).
///
/// Implementations must be cheap and never block: they are called on every attempt.
/// [`InMemoryHealth`] is the default; a shared one (e.g. Redis) would let many
/// gateway instances agree.
///
/// # Example: a registry that considers every endpoint healthy
/// ```
/// use std::sync::Arc;
/// use switchboard::catalog::Endpoint;
/// use switchboard::health::*;
/// use tokio::time::Instant;
///
/// struct AlwaysHealthy;
/// impl HealthRegistry for AlwaysHealthy {
///     fn availability(&self, _: &Endpoint, _: Instant) -> Availability { Availability::Healthy }
///     fn acquire(&self, _: &Endpoint, _: Instant, _: bool) -> Option<Ticket> {
///         Some(Ticket { kind: PermitKind::Normal, epoch: 0 })
///     }
///     fn record(&self, _: &Endpoint, _: Ticket, _: AttemptOutcome, _: Instant) {}
///     fn release(&self, _: &Endpoint, _: Ticket) {}
/// }
/// let r: Arc<dyn HealthRegistry> = Arc::new(AlwaysHealthy);
/// # let catalog = switchboard::catalog::Catalog::from_config(&switchboard::config::Config::demo());
/// # let e = &catalog.endpoints()[0];
/// assert_eq!(r.availability(e, Instant::now()), Availability::Healthy);
/// assert!(r.throughput(e).is_none());
/// ```
pub trait HealthRegistry: Send + Sync + 'static {
    /// Whether `endpoint` may be contacted at `now`.
    fn availability(&self, endpoint: &Endpoint, now: Instant) -> Availability;

    /// Grants one attempt on `endpoint`, or `None` when it must not be contacted
    /// (degraded, parked, or its single probe already taken). With `last_resort`, an
    /// unavailable endpoint is granted a [`PermitKind::LastResort`] attempt anyway.
    fn acquire(&self, endpoint: &Endpoint, now: Instant, last_resort: bool) -> Option<Ticket>;

    /// Records how the attempt granted by `ticket` ended.
    fn record(&self, endpoint: &Endpoint, ticket: Ticket, outcome: AttemptOutcome, now: Instant);

    /// Gives back a grant whose attempt ended without a result (cancelled, dropped):
    /// a probe re-arms.
    fn release(&self, endpoint: &Endpoint, ticket: Ticket);

    /// Observes one attempt's time to first token.
    fn observe_ttft(&self, _endpoint: &Endpoint, _ttft: Duration, _now: Instant) {}

    /// Observes one finished stream's throughput, tokens per second.
    fn observe_throughput(&self, _endpoint: &Endpoint, _tokens_per_sec: f64, _now: Instant) {}

    /// The decayed time to first token, if any was observed.
    fn ttft(&self, _endpoint: &Endpoint) -> Option<Duration> {
        None
    }

    /// The decayed throughput in tokens per second, if any was observed.
    fn throughput(&self, _endpoint: &Endpoint) -> Option<f64> {
        None
    }
}

/// An attempt's grant as an RAII guard: drop it without a result and the registry is
/// told (so a cancelled probe re-arms); consume it with [`Permit::success`] or
/// [`Permit::failure`] to record the result.
pub struct Permit {
    registry: Arc<dyn HealthRegistry>,
    endpoint: Arc<Endpoint>,
    ticket: Option<Ticket>,
}

impl Permit {
    /// Asks `registry` for one attempt on `endpoint` now.
    pub fn acquire(
        registry: &Arc<dyn HealthRegistry>,
        endpoint: &Arc<Endpoint>,
        last_resort: bool,
    ) -> Option<Permit> {
        let ticket = registry.acquire(endpoint, Instant::now(), last_resort)?;
        Some(Permit {
            registry: registry.clone(),
            endpoint: endpoint.clone(),
            ticket: Some(ticket),
        })
    }

    /// What kind of attempt this is.
    pub fn kind(&self) -> PermitKind {
        self.ticket.map_or(PermitKind::Normal, |t| t.kind)
    }

    /// Records a success.
    pub fn success(mut self) {
        if let Some(t) = self.ticket.take() {
            self.registry
                .record(&self.endpoint, t, AttemptOutcome::Success, Instant::now());
        }
    }

    /// Records a failure (classified with [`ProviderError::class`]).
    pub fn failure(mut self, e: &ProviderError) {
        if let Some(t) = self.ticket.take() {
            self.registry.record(
                &self.endpoint,
                t,
                AttemptOutcome::from_error(e),
                Instant::now(),
            );
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.registry.release(&self.endpoint, t);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("endpoint", &self.endpoint.label())
            .field("ticket", &self.ticket)
            .finish()
    }
}

/// A time-decayed moving average that jumps at once to bad samples (tower's
/// `PeakEwma` idea): a slow endpoint is noticed at once, a recovered one over `tau`.
#[derive(Debug, Clone, Copy)]
struct Ewma {
    value: f64,
    at: Instant,
}

/// Decay time constant of the observed-performance averages.
const DECAY: Duration = Duration::from_secs(10);

fn ewma_update(slot: &mut Option<Ewma>, sample: f64, now: Instant, worse: fn(f64, f64) -> bool) {
    match slot {
        None => {
            *slot = Some(Ewma {
                value: sample,
                at: now,
            })
        }
        Some(e) => {
            if worse(sample, e.value) {
                e.value = sample;
            } else {
                let dt = now.saturating_duration_since(e.at).as_secs_f64();
                let w = (-dt / DECAY.as_secs_f64()).exp();
                e.value = e.value * w + sample * (1.0 - w);
            }
            e.at = now;
        }
    }
}

/// One endpoint's state in [`InMemoryHealth`].
#[derive(Debug, Default)]
struct Slot {
    failures: u32,
    degraded_until: Option<Instant>,
    parked_until: Option<Instant>,
    probing: bool,
    epoch: u64,
    ttft: Option<Ewma>,
    throughput: Option<Ewma>,
}

impl Slot {
    fn availability(&self, now: Instant) -> Availability {
        if let Some(until) = self.degraded_until {
            if now < until || self.probing {
                return Availability::Unavailable { until };
            }
            return Availability::HalfOpen;
        }
        match self.parked_until {
            Some(until) if now < until => Availability::Unavailable { until },
            _ => Availability::Healthy,
        }
    }
}

/// The default [`HealthRegistry`]: one small mutex per endpoint (indexed by
/// [`Endpoint::index`]), so requests to different endpoints never contend. Endpoints
/// beyond the size it was built for are always healthy and untracked.
#[derive(Debug)]
pub struct InMemoryHealth {
    failure_threshold: u32,
    cooldown: Duration,
    slots: Vec<Mutex<Slot>>,
}

impl InMemoryHealth {
    /// A registry for `endpoints` endpoints under the `[health]` settings.
    pub fn new(config: &HealthConfig, endpoints: usize) -> Self {
        InMemoryHealth {
            failure_threshold: config.failure_threshold.max(1),
            cooldown: Duration::from_secs(config.cooldown_secs),
            slots: (0..endpoints)
                .map(|_| Mutex::new(Slot::default()))
                .collect(),
        }
    }

    /// A registry for every endpoint of `catalog`; publishes
    /// `switchboard_endpoint_healthy = 1` for each at once.
    pub fn for_catalog(config: &HealthConfig, catalog: &crate::catalog::Catalog) -> Self {
        catalog
            .endpoints()
            .iter()
            .for_each(|e| set_healthy_gauge(e, true));
        Self::new(config, catalog.endpoints().len())
    }

    /// The same with a cooldown finer than whole seconds (for tests and embedders).
    pub fn with_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    fn slot<R>(&self, e: &Endpoint, f: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        let m = self.slots.get(e.index)?;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        Some(f(&mut g))
    }

    fn degrade(&self, e: &Endpoint, s: &mut Slot, now: Instant) {
        s.degraded_until = Some(now + self.cooldown);
        s.failures = 0;
        s.probing = false;
        s.epoch += 1;
        set_healthy_gauge(e, false);
        tracing::warn!(endpoint = %e.label(), cooldown_ms = self.cooldown.as_millis() as u64, "endpoint degraded");
    }

    fn restore(e: &Endpoint, s: &mut Slot) {
        s.degraded_until = None;
        s.failures = 0;
        s.probing = false;
        s.epoch += 1;
        set_healthy_gauge(e, true);
        tracing::info!(endpoint = %e.label(), "endpoint restored");
    }
}

fn set_healthy_gauge(e: &Endpoint, healthy: bool) {
    metrics::gauge!(
        "switchboard_endpoint_healthy",
        "model" => e.model.to_string(),
        "provider" => e.provider.name.to_string()
    )
    .set(if healthy { 1.0 } else { 0.0 });
}

impl HealthRegistry for InMemoryHealth {
    fn availability(&self, e: &Endpoint, now: Instant) -> Availability {
        self.slot(e, |s| s.availability(now))
            .unwrap_or(Availability::Healthy)
    }

    fn acquire(&self, e: &Endpoint, now: Instant, last_resort: bool) -> Option<Ticket> {
        let Some(ticket) = self.slot(e, |s| {
            let kind = match s.availability(now) {
                Availability::Healthy => PermitKind::Normal,
                Availability::HalfOpen => {
                    s.probing = true;
                    PermitKind::Probe
                }
                Availability::Unavailable { .. } if last_resort => PermitKind::LastResort,
                Availability::Unavailable { .. } => return None,
            };
            Some(Ticket {
                kind,
                epoch: s.epoch,
            })
        }) else {
            // Untracked endpoint: always healthy.
            return Some(Ticket {
                kind: PermitKind::Normal,
                epoch: 0,
            });
        };
        ticket
    }

    fn record(&self, e: &Endpoint, ticket: Ticket, outcome: AttemptOutcome, now: Instant) {
        self.slot(e, |s| {
            if ticket.epoch != s.epoch {
                // Started before the endpoint last changed state: says nothing of now.
                return;
            }
            match (ticket.kind, outcome) {
                (PermitKind::Normal, AttemptOutcome::Success) => s.failures = 0,
                (PermitKind::Normal, AttemptOutcome::Failed { park: Some(d), .. }) => {
                    let until = now + d;
                    s.parked_until = Some(s.parked_until.map_or(until, |p| p.max(until)));
                }
                (
                    PermitKind::Normal,
                    AttemptOutcome::Failed {
                        class: FailureClass::Retriable,
                        ..
                    },
                ) => {
                    s.failures += 1;
                    if s.failures >= self.failure_threshold {
                        self.degrade(e, s, now);
                    }
                }
                (PermitKind::Normal, AttemptOutcome::Failed { .. }) => {}
                // A probe or last resort that got an answer — even a client fault — shows
                // the endpoint is back.
                (_, AttemptOutcome::Success)
                | (
                    _,
                    AttemptOutcome::Failed {
                        class: FailureClass::Client,
                        ..
                    },
                ) => {
                    if s.degraded_until.is_some() {
                        Self::restore(e, s);
                    }
                    s.parked_until = None;
                }
                (
                    _,
                    AttemptOutcome::Failed {
                        class: FailureClass::Retriable,
                        ..
                    },
                ) => self.degrade(e, s, now),
                // Our own key or catalogue at fault: no news; let another probe go.
                (kind, AttemptOutcome::Failed { .. }) => {
                    if kind == PermitKind::Probe {
                        s.probing = false;
                    }
                }
            }
        });
    }

    fn release(&self, e: &Endpoint, ticket: Ticket) {
        self.slot(e, |s| {
            if ticket.kind == PermitKind::Probe && ticket.epoch == s.epoch {
                s.probing = false;
            }
        });
    }

    fn observe_ttft(&self, e: &Endpoint, ttft: Duration, now: Instant) {
        self.slot(e, |s| {
            ewma_update(&mut s.ttft, ttft.as_secs_f64(), now, |new, old| new > old)
        });
    }

    fn observe_throughput(&self, e: &Endpoint, tokens_per_sec: f64, now: Instant) {
        if tokens_per_sec.is_finite() && tokens_per_sec >= 0.0 {
            self.slot(e, |s| {
                ewma_update(&mut s.throughput, tokens_per_sec, now, |new, old| new < old)
            });
        }
    }

    fn ttft(&self, e: &Endpoint) -> Option<Duration> {
        self.slot(e, |s| s.ttft.map(|t| Duration::from_secs_f64(t.value)))
            .flatten()
    }

    fn throughput(&self, e: &Endpoint) -> Option<f64> {
        self.slot(e, |s| s.throughput.map(|t| t.value)).flatten()
    }
}

// ---------------------------------------------------------------------------
// The layer
// ---------------------------------------------------------------------------

/// A source of uniform random numbers in `[0, 1)` for the weighted draw.
pub type Random = Arc<dyn Fn() -> f64 + Send + Sync>;

/// Builds [`HealthFilter`] services.
#[derive(Clone)]
pub struct HealthFilterLayer {
    registry: Arc<dyn HealthRegistry>,
    random: Random,
}

impl HealthFilterLayer {
    /// Filters and orders plans with `registry`'s view of health.
    pub fn new(registry: Arc<dyn HealthRegistry>) -> Self {
        HealthFilterLayer {
            registry,
            random: Arc::new(rand::random::<f64>),
        }
    }

    /// Uses `random` (uniform in `[0, 1)`) for the weighted draw; tests pass a seeded
    /// generator.
    pub fn random(mut self, random: impl Fn() -> f64 + Send + Sync + 'static) -> Self {
        self.random = Arc::new(random);
        self
    }
}

impl fmt::Debug for HealthFilterLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthFilterLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for HealthFilterLayer {
    type Service = HealthFilter<S>;
    fn layer(&self, inner: S) -> HealthFilter<S> {
        HealthFilter {
            inner,
            registry: self.registry.clone(),
            random: self.random.clone(),
        }
    }
}

/// Drops unavailable endpoints from the plan and orders the rest; see the
/// [module docs](self).
#[derive(Clone)]
pub struct HealthFilter<S> {
    inner: S,
    registry: Arc<dyn HealthRegistry>,
    random: Random,
}

impl<S> HealthFilter<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, registry: Arc<dyn HealthRegistry>) -> Self {
        HealthFilterLayer::new(registry).layer(inner)
    }

    /// A [`HealthFilterLayer`].
    pub fn layer(registry: Arc<dyn HealthRegistry>) -> HealthFilterLayer {
        HealthFilterLayer::new(registry)
    }
}

impl<S> fmt::Debug for HealthFilter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthFilter").finish_non_exhaustive()
    }
}

/// How a plan's healthy endpoints are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// The weighted draw for the first, the rest cheapest first (SPEC §5 default).
    Default,
    /// Strictly cheapest first (`:floor`, `sort=price`).
    Price,
    /// Highest observed tokens/s first (`:nitro`, `sort=throughput`).
    Throughput,
    /// Lowest observed time to first token first (`sort=latency`).
    Latency,
}

impl Ordering {
    /// The ordering a request asks for: `provider.sort` wins over a model variant.
    pub fn of(call: &ChatCall) -> Ordering {
        let prefs = call.request.provider.as_ref();
        match prefs.and_then(|p| p.sort) {
            Some(SortBy::Price) => return Ordering::Price,
            Some(SortBy::Throughput) => return Ordering::Throughput,
            Some(SortBy::Latency) => return Ordering::Latency,
            None => {}
        }
        match split_variant(&call.request.model) {
            Ok((_, Some(Variant::Floor))) => Ordering::Price,
            Ok((_, Some(Variant::Nitro))) => Ordering::Throughput,
            _ => Ordering::Default,
        }
    }
}

fn price_key(e: &Endpoint) -> i64 {
    e.pricing.prompt.pico_per_token() + e.pricing.completion.pico_per_token()
}

/// Orders one model's healthy endpoints (stable: ties keep plan order).
pub fn order_endpoints(
    mut group: Vec<Arc<Endpoint>>,
    how: Ordering,
    provider_order: &[String],
    registry: &dyn HealthRegistry,
    random: &dyn Fn() -> f64,
) -> Vec<Arc<Endpoint>> {
    // `order` first, in its order; the rest follow under `how`.
    let mut head = Vec::new();
    for name in provider_order {
        while let Some(i) = group
            .iter()
            .position(|e| e.provider.name.as_ref() == name.as_str())
        {
            head.push(group.remove(i));
        }
    }
    let mut rest = group;
    rest.sort_by_key(|e| price_key(e));
    match how {
        Ordering::Price => {}
        Ordering::Throughput => {
            rest.sort_by(
                |a, b| match (registry.throughput(a), registry.throughput(b)) {
                    (Some(x), Some(y)) => y.total_cmp(&x),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                },
            )
        }
        Ordering::Latency => rest.sort_by(|a, b| match (registry.ttft(a), registry.ttft(b)) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }),
        Ordering::Default if head.is_empty() && rest.len() > 1 => {
            let first = weighted_draw(&rest, random);
            let e = rest.remove(first);
            rest.insert(0, e);
        }
        Ordering::Default => {}
    }
    head.extend(rest);
    head
}

/// SPEC §5's draw: the index of the first endpoint, with probability ∝ `weight /
/// price²` (price = prompt + completion USD/Mtok); free endpoints, when there are any,
/// are drawn among themselves ∝ `weight`. `group` is sorted cheapest first.
pub fn weighted_draw(group: &[Arc<Endpoint>], random: &dyn Fn() -> f64) -> usize {
    let any_free = group.iter().any(|e| price_key(e) == 0);
    let weights: Vec<f64> = group
        .iter()
        .map(|e| {
            let w = e.weight.max(0.0);
            match (any_free, price_key(e)) {
                (true, 0) => w,
                (true, _) => 0.0,
                (false, _) => {
                    let p = e.pricing.sum_per_mtok();
                    w / (p * p)
                }
            }
        })
        .collect();
    let total: f64 = weights.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return 0;
    }
    let mut r = random().clamp(0.0, 1.0) * total;
    for (i, w) in weights.iter().enumerate() {
        if r < *w {
            return i;
        }
        r -= w;
    }
    // Rounding: the last endpoint with a weight.
    weights.iter().rposition(|w| *w > 0.0).unwrap_or(0)
}

/// Filters and orders `call.plan` in place (see the [module docs](self)); 503
/// `no_healthy_provider` when no endpoint may be contacted, not even as a last resort
/// (every one is being probed).
pub fn filter_plan(
    call: &mut ChatCall,
    registry: &dyn HealthRegistry,
    random: &dyn Fn() -> f64,
) -> Result<(), GatewayError> {
    let now = Instant::now();
    let how = Ordering::of(call);
    let prefs = call.request.provider.clone().unwrap_or_default();
    let provider_order = prefs.order.clone().unwrap_or_default();
    let only_first = !prefs.allow_fallbacks && provider_order.is_empty();

    // Group by model, keeping the models' order (`model`, then `models`).
    let mut groups: Vec<Vec<Arc<Endpoint>>> = Vec::new();
    for e in &call.plan {
        match groups.last_mut() {
            Some(g) if g[0].model == e.model => g.push(e.clone()),
            _ => groups.push(vec![e.clone()]),
        }
    }
    let mut plan = Vec::new();
    for g in groups {
        let healthy: Vec<_> = g
            .into_iter()
            .filter(|e| {
                !matches!(
                    registry.availability(e, now),
                    Availability::Unavailable { .. }
                )
            })
            .collect();
        let mut ordered = order_endpoints(healthy, how, &provider_order, registry, random);
        if only_first {
            ordered.truncate(1);
        }
        plan.extend(ordered);
    }
    if plan.is_empty() && !call.plan.is_empty() {
        // Every candidate is unavailable: the one whose cooldown ends soonest, once.
        // One whose cooldown is over is being probed: not a last resort, since exactly
        // one request at a time may probe.
        let soonest = call
            .plan
            .iter()
            .filter_map(|e| match registry.availability(e, now) {
                Availability::Unavailable { until } if until > now => Some((until, e)),
                _ => None,
            })
            .min_by_key(|(until, _)| *until)
            .map(|(_, e)| e.clone());
        match soonest {
            Some(e) => {
                plan.push(e);
                call.ctx.update(|s| s.last_resort = true);
            }
            None => {
                return Err(GatewayError::NoHealthyProvider(format!(
                    "every endpoint of `{}` is degraded and being probed; try again shortly",
                    call.request.model
                )))
            }
        }
    }
    call.plan = plan;
    Ok(())
}

impl<S> Service<ChatCall> for HealthFilter<S>
where
    S: Service<ChatCall, Response = ChatReply, Error = GatewayError>,
{
    type Response = ChatReply;
    type Error = GatewayError;
    type Future = Either<Ready<Result<ChatReply, GatewayError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: ChatCall) -> Self::Future {
        match filter_plan(&mut call, self.registry.as_ref(), self.random.as_ref()) {
            Ok(()) => Either::Right(self.inner.call(call)),
            Err(e) => Either::Left(future::ready(Err(e))),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::chat::{ChatRequest, Message, ProviderPreferences, Role};
    use crate::config::Config;
    use crate::context::CallContext;
    use rand::{Rng, SeedableRng};

    /// One endpoint of `test/model` at provider `name`: (name, kind, prompt, completion,
    /// data_collection).
    pub(crate) type Spec<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str);

    /// A catalog whose model `test/model` has one endpoint per spec, in order, and whose
    /// model `test/other` has one endpoint at the last spec's provider.
    pub(crate) fn catalog(specs: &[Spec]) -> Arc<Catalog> {
        let mut t = String::new();
        for (name, kind, _, _, dc) in specs {
            t.push_str(&format!(
                "[[providers]]\nname = \"{name}\"\nkind = \"{kind}\"\ndata_collection = \"{dc}\"\n"
            ));
            if *kind != "mock" {
                t.push_str("base_url = \"http://127.0.0.1:9/v1\"\napi_key = \"k\"\n");
            }
        }
        t.push_str("[[models]]\nid = \"test/model\"\n");
        for (name, kind, p, c, _) in specs {
            let up = if *kind == "mock" { "echo" } else { "up" };
            t.push_str(&format!(
                "[[models.endpoints]]\nprovider = \"{name}\"\nupstream_model = \"{up}\"\nprompt_usd_per_mtok = {p}\ncompletion_usd_per_mtok = {c}\n"
            ));
        }
        let (last, kind, ..) = specs.last().unwrap();
        let up = if *kind == "mock" { "echo" } else { "up" };
        t.push_str(&format!(
            "[[models]]\nid = \"test/other\"\n[[models.endpoints]]\nprovider = \"{last}\"\nupstream_model = \"{up}\"\nprompt_usd_per_mtok = 1\ncompletion_usd_per_mtok = 1\n"
        ));
        Arc::new(Catalog::from_config(&Config::from_toml(&t).unwrap()))
    }

    /// Three openai-kind endpoints: `a` $3+$3, `b` $1+$1, `c` $2+$2.
    pub(crate) fn abc() -> Arc<Catalog> {
        catalog(&[
            ("a", "openai", "3", "3", "deny"),
            ("b", "openai", "1", "1", "deny"),
            ("c", "openai", "2", "2", "deny"),
        ])
    }

    pub(crate) fn call(model: &str, prefs: Option<ProviderPreferences>) -> ChatCall {
        ChatCall::new(
            ChatRequest {
                model: model.into(),
                messages: vec![Message::text(Role::User, "hi")],
                provider: prefs,
                ..Default::default()
            },
            CallContext::new(),
        )
    }

    fn names(plan: &[Arc<Endpoint>]) -> Vec<String> {
        plan.iter().map(|e| e.provider.name.to_string()).collect()
    }

    fn registry(catalog: &Catalog, threshold: u32, cooldown_secs: u64) -> InMemoryHealth {
        InMemoryHealth::new(
            &HealthConfig {
                failure_threshold: threshold,
                cooldown_secs,
            },
            catalog.endpoints().len(),
        )
    }

    fn filtered(
        catalog: &Catalog,
        reg: &dyn HealthRegistry,
        model: &str,
        prefs: Option<ProviderPreferences>,
        r: f64,
    ) -> (Vec<String>, bool) {
        let mut c = call(model, prefs);
        c.plan = catalog.endpoints()[..3.min(catalog.endpoints().len())].to_vec();
        filter_plan(&mut c, reg, &move || r).unwrap();
        (names(&c.plan), c.ctx.snapshot().last_resort)
    }

    fn fail(reg: &dyn HealthRegistry, e: &Endpoint, status: u16) {
        let t = reg.acquire(e, Instant::now(), false).unwrap();
        reg.record(
            e,
            t,
            AttemptOutcome::from_error(&ProviderError::status("p", status, "")),
            Instant::now(),
        );
    }

    #[test]
    fn default_draw_is_weight_over_price_squared_then_cheapest_first() {
        let cat = abc();
        let reg = registry(&cat, 5, 60);
        // Prices a $6, b $2, c $4 → weights 1/36, 1/4, 1/16. Sorted cheapest first
        // (b, c, a) the cumulative weights are 0.25, 0.3125, 0.3403.
        assert_eq!(
            filtered(&cat, &reg, "test/model", None, 0.0).0,
            ["b", "c", "a"]
        );
        // r = 0.8 → 0.8 × 0.3403 = 0.272: past b, inside c; the rest cheapest first.
        assert_eq!(
            filtered(&cat, &reg, "test/model", None, 0.8).0,
            ["c", "b", "a"]
        );
        assert_eq!(
            filtered(&cat, &reg, "test/model", None, 0.95).0,
            ["a", "b", "c"]
        );

        // Empirically, with a seeded generator: P(b) = 0.735, P(c) = 0.184, P(a) = 0.082.
        let rng = std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(7));
        let draw = move || rng.lock().unwrap().random::<f64>();
        let mut firsts = std::collections::HashMap::new();
        for _ in 0..10_000 {
            let mut c = call("test/model", None);
            c.plan = cat.endpoints()[..3].to_vec();
            filter_plan(&mut c, &reg, &draw).unwrap();
            *firsts.entry(names(&c.plan)[0].clone()).or_insert(0) += 1;
        }
        let share = |n: &str| f64::from(firsts[n]) / 10_000.0;
        assert!((share("b") - 0.735).abs() < 0.02, "{firsts:?}");
        assert!((share("c") - 0.184).abs() < 0.02, "{firsts:?}");
        assert!((share("a") - 0.082).abs() < 0.015, "{firsts:?}");
    }

    #[test]
    fn free_endpoints_are_drawn_first_and_weights_count() {
        let cat = catalog(&[
            ("a", "openai", "1", "1", "deny"),
            ("free1", "openai", "0", "0", "deny"),
            ("free2", "openai", "0", "0", "deny"),
        ]);
        let reg = registry(&cat, 5, 60);
        for r in [0.0, 0.3, 0.49] {
            assert_eq!(
                filtered(&cat, &reg, "test/model", None, r).0,
                ["free1", "free2", "a"]
            );
        }
        assert_eq!(
            filtered(&cat, &reg, "test/model", None, 0.6).0,
            ["free2", "free1", "a"]
        );
    }

    #[test]
    fn order_comes_first_then_the_rest_cheapest_first() {
        let cat = abc();
        let reg = registry(&cat, 5, 60);
        let prefs = ProviderPreferences {
            order: Some(vec!["c".into(), "a".into()]),
            ..Default::default()
        };
        assert_eq!(
            filtered(&cat, &reg, "test/model", Some(prefs), 0.95).0,
            ["c", "a", "b"]
        );
        // Without fallbacks and without order: only the drawn first.
        let prefs = ProviderPreferences {
            allow_fallbacks: false,
            ..Default::default()
        };
        assert_eq!(
            filtered(&cat, &reg, "test/model", Some(prefs), 0.0).0,
            ["b"]
        );
    }

    #[test]
    fn floor_and_sort_price_are_strictly_cheapest_first() {
        let cat = abc();
        let reg = registry(&cat, 5, 60);
        for r in [0.0, 0.5, 0.999] {
            assert_eq!(
                filtered(&cat, &reg, "test/model:floor", None, r).0,
                ["b", "c", "a"]
            );
            let prefs = ProviderPreferences {
                sort: Some(SortBy::Price),
                ..Default::default()
            };
            assert_eq!(
                filtered(&cat, &reg, "test/model", Some(prefs), r).0,
                ["b", "c", "a"]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nitro_and_sorts_use_observed_speed() {
        let cat = abc();
        let reg = registry(&cat, 5, 60);
        let [a, b, c] = [0, 1, 2].map(|i| cat.endpoints()[i].clone());
        let now = Instant::now();
        reg.observe_throughput(&a, 120.0, now);
        reg.observe_throughput(&c, 80.0, now);
        reg.observe_ttft(&a, Duration::from_millis(900), now);
        reg.observe_ttft(&b, Duration::from_millis(200), now);
        reg.observe_ttft(&c, Duration::from_millis(400), now);
        // Unobserved throughput (b) goes last.
        assert_eq!(
            filtered(&cat, &reg, "test/model:nitro", None, 0.0).0,
            ["a", "c", "b"]
        );
        let sort = |s| {
            Some(ProviderPreferences {
                sort: Some(s),
                ..Default::default()
            })
        };
        assert_eq!(
            filtered(&cat, &reg, "test/model", sort(SortBy::Latency), 0.0).0,
            ["b", "c", "a"]
        );
        // `sort` wins over the variant.
        assert_eq!(
            filtered(&cat, &reg, "test/model:nitro", sort(SortBy::Price), 0.0).0,
            ["b", "c", "a"]
        );
        // Peak-sensitive: one slow sample counts at once…
        reg.observe_throughput(&a, 10.0, now);
        assert_eq!(reg.throughput(&a), Some(10.0));
        // …a fast one only over the decay time: after 10 s (one time constant) it
        // moves 1 - 1/e ≈ 63% of the way.
        tokio::time::advance(Duration::from_secs(10)).await;
        reg.observe_throughput(&a, 110.0, Instant::now());
        let v = reg.throughput(&a).unwrap();
        assert!(
            (v - (10.0 + 100.0 * (1.0 - (-1f64).exp()))).abs() < 0.01,
            "{v}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn threshold_failures_degrade_cooldown_then_one_probe() {
        let cat = abc();
        let reg = registry(&cat, 3, 60);
        let a = cat.endpoints()[0].clone();
        // Failover and client classes do not count; a success resets the count.
        fail(&reg, &a, 401);
        fail(&reg, &a, 400);
        fail(&reg, &a, 503);
        fail(&reg, &a, 500);
        let t = reg.acquire(&a, Instant::now(), false).unwrap();
        reg.record(&a, t, AttemptOutcome::Success, Instant::now());
        fail(&reg, &a, 503);
        fail(&reg, &a, 502);
        assert_eq!(reg.availability(&a, Instant::now()), Availability::Healthy);
        fail(&reg, &a, 529);
        let until = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            reg.availability(&a, Instant::now()),
            Availability::Unavailable { until }
        );
        assert!(reg.acquire(&a, Instant::now(), false).is_none());
        assert_eq!(
            filtered(&cat, &reg, "test/model", None, 0.999).0,
            ["c", "b"]
        );

        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(reg.availability(&a, Instant::now()), Availability::HalfOpen);
        let shared: Arc<dyn HealthRegistry> = Arc::new(reg);
        // Exactly one probe at a time, even with many asking at once.
        let permits: Vec<_> = (0..10)
            .filter_map(|_| Permit::acquire(&shared, &a, false))
            .collect();
        assert_eq!(permits.len(), 1);
        assert_eq!(permits[0].kind(), PermitKind::Probe);
        // While it is in flight the endpoint is out of plans.
        assert_eq!(
            filtered(&cat, shared.as_ref(), "test/model", None, 0.999).0,
            ["c", "b"]
        );
        // A dropped (cancelled) probe re-arms.
        drop(permits);
        let probe = Permit::acquire(&shared, &a, false).unwrap();
        assert_eq!(probe.kind(), PermitKind::Probe);
        // A failed probe degrades it for another cooldown.
        probe.failure(&ProviderError::status("a", 503, ""));
        assert!(Permit::acquire(&shared, &a, false).is_none());
        tokio::time::advance(Duration::from_secs(60)).await;
        let probe = Permit::acquire(&shared, &a, false).unwrap();
        probe.success();
        assert_eq!(
            shared.availability(&a, Instant::now()),
            Availability::Healthy
        );
        assert_eq!(
            Permit::acquire(&shared, &a, false).unwrap().kind(),
            PermitKind::Normal
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_success_does_not_restore() {
        let cat = abc();
        let reg: Arc<dyn HealthRegistry> = Arc::new(registry(&cat, 2, 60));
        let a = cat.endpoints()[0].clone();
        // An attempt starts while the endpoint is healthy…
        let slow = Permit::acquire(&reg, &a, false).unwrap();
        // …others fail it into degradation meanwhile…
        fail(reg.as_ref(), &a, 503);
        fail(reg.as_ref(), &a, 503);
        assert!(matches!(
            reg.availability(&a, Instant::now()),
            Availability::Unavailable { .. }
        ));
        // …and its success, arriving late, changes nothing.
        slow.success();
        assert!(matches!(
            reg.availability(&a, Instant::now()),
            Availability::Unavailable { .. }
        ));
        // Nor does a late failure extend the cooldown.
        let late = reg.acquire(&a, Instant::now(), true).unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        let stale = Ticket {
            kind: PermitKind::Normal,
            epoch: late.epoch - 1,
        };
        reg.record(
            &a,
            stale,
            AttemptOutcome::from_error(&ProviderError::status("a", 503, "")),
            Instant::now(),
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(reg.availability(&a, Instant::now()), Availability::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_parks_instead_of_counting() {
        let cat = abc();
        let reg = registry(&cat, 1, 60);
        let a = cat.endpoints()[0].clone();
        let t = reg.acquire(&a, Instant::now(), false).unwrap();
        let throttled = ProviderError::status("a", 429, "slow down")
            .with_retry_after(Some(Duration::from_secs(5)));
        reg.record(
            &a,
            t,
            AttemptOutcome::from_error(&throttled),
            Instant::now(),
        );
        // Parked for 5 s, not degraded for 60 (threshold 1 would have done that).
        assert!(reg.acquire(&a, Instant::now(), false).is_none());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(reg.availability(&a, Instant::now()), Availability::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn all_degraded_leaves_the_soonest_as_last_resort() {
        let cat = abc();
        let reg = registry(&cat, 1, 60);
        let [a, b, c] = [0, 1, 2].map(|i| cat.endpoints()[i].clone());
        fail(&reg, &b, 503);
        tokio::time::advance(Duration::from_secs(10)).await;
        fail(&reg, &c, 503);
        fail(&reg, &a, 503);
        let (plan, last) = filtered(&cat, &reg, "test/model", None, 0.0);
        assert_eq!(plan, ["b"]);
        assert!(last);
        // A last-resort grant goes through the cooldown; its success restores.
        let t = reg.acquire(&b, Instant::now(), true).unwrap();
        assert_eq!(t.kind, PermitKind::LastResort);
        reg.record(&b, t, AttemptOutcome::Success, Instant::now());
        assert_eq!(reg.availability(&b, Instant::now()), Availability::Healthy);
        let (plan, last) = filtered(&cat, &reg, "test/model", None, 0.0);
        assert_eq!((plan, last), (vec!["b".to_string()], false));
    }
}
