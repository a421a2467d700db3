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
//! soonest, flagged as the *last resort* ([`CallState::last_resort`]). A long prompt
//! served before goes back to the endpoint that served it, when the request does not
//! order its plan itself and that endpoint is still in the plan: prompt-cache
//! [`Affinity`] (`affinity.rs`).
//!
//! The registry also keeps observed time to first token and throughput per endpoint
//! (time-decayed, peak-sensitive EWMAs, as tower's `load::PeakEwma`), which
//! `sort=latency|throughput` and `:nitro` read.
//!
//! Two registries implement [`HealthRegistry`]: [`InMemoryHealth`] (`memory.rs`, one
//! process) and [`RedisHealth`] (`redis.rs`, `[shared].redis_url`: the same in-memory
//! state, its changes shared with every instance through Redis, one probe at a time
//! across all of them). The layer and the ordering of plans are in `filter.rs`.
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
//! let lorem = catalog.model("mock/lorem").unwrap().endpoints[0].clone();
//! call.plan = vec![echo, lorem];
//! let err = svc.oneshot(call).await.unwrap_err();
//! assert_eq!(err.to_string(), "mock/lorem@mock"); // the degraded one is skipped
//! # }
//! ```
//!
//! [`CallState::last_resort`]: crate::context::CallState::last_resort

mod affinity;
mod filter;
mod memory;
mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::catalog::Endpoint;
use crate::error::{FailureClass, FailureKind, ProviderError};

pub use self::redis::RedisHealth;
pub use affinity::{Affinity, AffinityKey, AFFINITY_MAX_ENTRIES, AFFINITY_TTL, MIN_PREFIX_BYTES};
pub use filter::{
    filter_plan, filter_plan_preferring, order_endpoints, weighted_draw, HealthFilter,
    HealthFilterLayer, Ordering, Random, Remembering,
};
pub use memory::InMemoryHealth;

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
        /// What went wrong (kept as the endpoint's last failure, which
        /// [`HealthRegistry::snapshot`] shows).
        kind: FailureKind,
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
            kind: e.kind,
        }
    }
}

/// An endpoint's state as an operator sees it ([`EndpointHealth::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// Attempts go to it.
    Healthy,
    /// Skipped until its cooldown ends (`until`; past: the next attempt probes it).
    Degraded,
    /// Skipped until an upstream `Retry-After` (429) runs out.
    Parked,
    /// Degraded, with its single probe in flight now.
    Probing,
}

impl HealthState {
    /// `healthy`, `degraded`, `parked` or `probing` (SPEC §9).
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Degraded => "degraded",
            HealthState::Parked => "parked",
            HealthState::Probing => "probing",
        }
    }
}

/// The last failed attempt an endpoint had (what degraded or parked it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastFailure {
    /// What went wrong ([`ProviderError::label`] names it: `"503"`, `"timeout"`, …).
    pub kind: FailureKind,
    /// The upstream's `Retry-After` of a 429 that parked it.
    pub retry_after: Option<Duration>,
}

/// A read-only picture of one endpoint's health ([`HealthRegistry::snapshot`]), for
/// `GET /admin/endpoints`.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointHealth {
    /// Healthy, degraded, parked or probing.
    pub state: HealthState,
    /// Retriable failures in a row since its last success (not reset when it is
    /// degraded; 0 where the registry does not count them).
    pub consecutive_failures: u32,
    /// When its cooldown or park ends (`None` when healthy).
    pub until: Option<Instant>,
    /// Its last failure since its last success, if the registry knows it (one
    /// degraded by another instance through Redis has none here).
    pub last_failure: Option<LastFailure>,
    /// The observed (decayed) time to first token.
    pub ttft: Option<Duration>,
    /// The observed (decayed) throughput, tokens per second.
    pub tokens_per_second: Option<f64>,
}

/// Passive per-endpoint health and observed performance, shared by
/// [`HealthFilter`] (reads) and [`Fallback`](crate::fallback::Fallback) (writes).
///
/// Implementations must be cheap and never block: they are called on every attempt.
/// [`InMemoryHealth`] is the default; [`RedisHealth`] lets many gateway instances
/// agree.
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

    /// A read-only picture of `endpoint`'s health at `now` (`GET /admin/endpoints`);
    /// changes nothing. By default it is built from [`availability`](Self::availability),
    /// [`ttft`](Self::ttft) and [`throughput`](Self::throughput): degraded or healthy,
    /// no failure count, no last failure.
    fn snapshot(&self, endpoint: &Endpoint, now: Instant) -> EndpointHealth {
        let (state, until) = match self.availability(endpoint, now) {
            Availability::Healthy => (HealthState::Healthy, None),
            Availability::HalfOpen => (HealthState::Degraded, None),
            Availability::Unavailable { until } => (HealthState::Degraded, Some(until)),
        };
        EndpointHealth {
            state,
            consecutive_failures: 0,
            until,
            last_failure: None,
            ttft: self.ttft(endpoint),
            tokens_per_second: self.throughput(endpoint),
        }
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

#[cfg(test)]
mod shared_tests;
#[cfg(test)]
pub(crate) mod tests;
