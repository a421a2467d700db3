//! [`HealthFilterLayer`]: drops unavailable endpoints from a plan and orders the rest.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{self, Either, Ready};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::affinity::{Affinity, AffinityKey};
use super::{Availability, HealthRegistry};
use crate::catalog::Endpoint;
use crate::chat::SortBy;
use crate::context::{ChatCall, ChatReply};
use crate::error::GatewayError;
use crate::route::{split_variant, Variant};

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
    affinity: Option<Affinity>,
}

impl HealthFilterLayer {
    /// Filters and orders plans with `registry`'s view of health.
    pub fn new(registry: Arc<dyn HealthRegistry>) -> Self {
        HealthFilterLayer {
            registry,
            random: Arc::new(rand::random::<f64>),
            affinity: Some(Affinity::new()),
        }
    }

    /// Prompt-cache affinity ([`Affinity`]; on by default, with its own entries per
    /// layer): `None` turns it off.
    pub fn affinity(mut self, affinity: Option<Affinity>) -> Self {
        self.affinity = affinity;
        self
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
            affinity: self.affinity.clone(),
        }
    }
}

/// Drops unavailable endpoints from the plan and orders the rest; see the
/// [module docs](crate::health).
#[derive(Clone)]
pub struct HealthFilter<S> {
    inner: S,
    registry: Arc<dyn HealthRegistry>,
    random: Random,
    affinity: Option<Affinity>,
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

/// Where the health filter puts a kept endpoint, and why: what [`filter_plan_each`]
/// reports. Plain data (no text is made on the request path); the route explain
/// ([`crate::explain`]) writes the sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Named in `provider.order`: first, in that order.
    ProviderOrder,
    /// After any `order` ones, under this [`Ordering`] (`Default`: cheapest first,
    /// when there is no draw).
    Sorted(Ordering),
    /// First by the weighted draw ([`weighted_draw`]).
    Drawn,
    /// After the drawn one, cheapest first.
    AfterDraw,
    /// First: it served this prompt before (prompt-cache [`Affinity`]).
    Affinity,
    /// Every candidate is unavailable: the one whose cooldown ends soonest, once.
    LastResort,
}

/// One decision of [`filter_plan_each`] about the endpoints of a plan.
#[derive(Debug, Clone, Copy)]
pub enum Decision<'a> {
    /// Dropped: degraded, parked or being probed until `until` (may be past while a
    /// probe is in flight).
    Unavailable {
        /// The endpoint.
        endpoint: &'a Arc<Endpoint>,
        /// When its cooldown or park ends.
        until: Instant,
    },
    /// Kept, at a place decided by `at` (a later decision may move it again).
    Placed {
        /// The endpoint.
        endpoint: &'a Arc<Endpoint>,
        /// Why there.
        at: Placement,
    },
    /// The weighted draw picks the first of `group` (sorted cheapest first): see
    /// [`draw_shares`].
    Draw {
        /// The endpoints drawn among.
        group: &'a [Arc<Endpoint>],
    },
    /// Dropped: `allow_fallbacks: false` without `order` keeps the first endpoint only.
    NoFallbacks {
        /// The endpoint.
        endpoint: &'a Arc<Endpoint>,
    },
}

/// Orders one model's healthy endpoints (stable: ties keep plan order).
pub fn order_endpoints(
    group: Vec<Arc<Endpoint>>,
    how: Ordering,
    provider_order: &[String],
    registry: &dyn HealthRegistry,
    random: &dyn Fn() -> f64,
) -> Vec<Arc<Endpoint>> {
    order_each(group, how, provider_order, registry, random, &mut |_| {})
}

/// [`order_endpoints`], telling `each` where it puts every endpoint.
fn order_each(
    mut group: Vec<Arc<Endpoint>>,
    how: Ordering,
    provider_order: &[String],
    registry: &dyn HealthRegistry,
    random: &dyn Fn() -> f64,
    each: &mut impl FnMut(Decision<'_>),
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
    for endpoint in &head {
        each(Decision::Placed {
            endpoint,
            at: Placement::ProviderOrder,
        });
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
            each(Decision::Draw { group: &rest });
            let first = weighted_draw(&rest, random);
            let e = rest.remove(first);
            rest.insert(0, e);
            for (i, endpoint) in rest.iter().enumerate() {
                let at = if i == 0 {
                    Placement::Drawn
                } else {
                    Placement::AfterDraw
                };
                each(Decision::Placed { endpoint, at });
            }
            head.extend(rest);
            return head;
        }
        Ordering::Default => {}
    }
    for endpoint in &rest {
        each(Decision::Placed {
            endpoint,
            at: Placement::Sorted(how),
        });
    }
    head.extend(rest);
    head
}

/// The draw's weight of each endpoint of `group`: `weight / price²`, or, when any is
/// free, `weight` for the free ones and 0 for the others.
fn draw_weights(group: &[Arc<Endpoint>]) -> Vec<f64> {
    let any_free = group.iter().any(|e| price_key(e) == 0);
    group
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
        .collect()
}

/// SPEC §5's draw: the index of the first endpoint, with probability ∝ `weight /
/// price²` (price = prompt + completion USD/Mtok); free endpoints, when there are any,
/// are drawn among themselves ∝ `weight`. `group` is sorted cheapest first.
pub fn weighted_draw(group: &[Arc<Endpoint>], random: &dyn Fn() -> f64) -> usize {
    let weights = draw_weights(group);
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

/// The probability that [`weighted_draw`] puts each endpoint of `group` first: its
/// weight over their sum (the first for sure when no weight counts).
pub fn draw_shares(group: &[Arc<Endpoint>]) -> Vec<f64> {
    let mut shares = draw_weights(group);
    let total: f64 = shares.iter().sum();
    let counts = total.is_finite() && total > 0.0;
    for (i, s) in shares.iter_mut().enumerate() {
        *s = match (counts, i) {
            (true, _) => *s / total,
            (false, 0) => 1.0,
            (false, _) => 0.0,
        };
    }
    shares
}

/// Filters and orders `call.plan` in place (see the [module docs](crate::health)); 503
/// `no_healthy_provider` when no endpoint may be contacted, not even as a last resort
/// (every one is being probed).
pub fn filter_plan(
    call: &mut ChatCall,
    registry: &dyn HealthRegistry,
    random: &dyn Fn() -> f64,
) -> Result<(), GatewayError> {
    filter_plan_preferring(call, registry, random, None)
}

/// [`filter_plan`], then, unless the request orders its plan itself (`provider.order`,
/// `sort`, `:floor`, `:nitro`), the endpoint of catalog index `preferred` (prompt-cache
/// [`Affinity`]) first among its model's endpoints, when it is still in the plan.
pub fn filter_plan_preferring(
    call: &mut ChatCall,
    registry: &dyn HealthRegistry,
    random: &dyn Fn() -> f64,
    preferred: Option<usize>,
) -> Result<(), GatewayError> {
    filter_plan_each(call, registry, random, preferred, |_| {})
}

/// [`filter_plan_preferring`], telling `each` of every [`Decision`] it makes: which
/// endpoints it drops and why, where it puts the others and why (the route explain's
/// view; [`HealthFilterLayer`] passes a closure that does nothing).
pub fn filter_plan_each(
    call: &mut ChatCall,
    registry: &dyn HealthRegistry,
    random: &dyn Fn() -> f64,
    preferred: Option<usize>,
    mut each: impl FnMut(Decision<'_>),
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
            .filter(|endpoint| match registry.availability(endpoint, now) {
                Availability::Unavailable { until } => {
                    each(Decision::Unavailable { endpoint, until });
                    false
                }
                _ => true,
            })
            .collect();
        let mut ordered = order_each(healthy, how, &provider_order, registry, random, &mut each);
        if let Some(p) = preferred.filter(|_| how == Ordering::Default && provider_order.is_empty())
        {
            if let Some(i) = ordered.iter().position(|e| e.index == p) {
                let e = ordered.remove(i);
                each(Decision::Placed {
                    endpoint: &e,
                    at: Placement::Affinity,
                });
                ordered.insert(0, e);
            }
        }
        if only_first {
            for endpoint in ordered.iter().skip(1) {
                each(Decision::NoFallbacks { endpoint });
            }
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
                each(Decision::Placed {
                    endpoint: &e,
                    at: Placement::LastResort,
                });
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
    type Future = Either<Ready<Result<ChatReply, GatewayError>>, Remembering<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: ChatCall) -> Self::Future {
        let key = self.affinity.as_ref().and_then(|_| Affinity::key(&call));
        let preferred = key
            .zip(self.affinity.as_ref())
            .and_then(|(k, a)| a.preferred(k));
        let filtered = filter_plan_preferring(
            &mut call,
            self.registry.as_ref(),
            self.random.as_ref(),
            preferred,
        );
        match filtered {
            Ok(()) => {
                if key.is_some() {
                    let hit = preferred.is_some_and(|p| call.plan.iter().any(|e| e.index == p));
                    Affinity::count(hit);
                }
                let remember = key.zip(self.affinity.clone());
                Either::Right(Remembering {
                    inner: self.inner.call(call),
                    remember,
                })
            }
            Err(e) => Either::Left(future::ready(Err(e))),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's future; when the reply commits, its endpoint is remembered
    /// for the prompt's [`Affinity`] key (if the request has one).
    pub struct Remembering<F> {
        #[pin]
        inner: F,
        remember: Option<(AffinityKey, Affinity)>,
    }
}

impl<F> std::future::Future for Remembering<F>
where
    F: std::future::Future<Output = Result<ChatReply, GatewayError>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let (Ok(reply), Some((key, affinity))) = (&out, this.remember.take()) {
            affinity.remember(key, reply.endpoint.index);
        }
        Poll::Ready(out)
    }
}
