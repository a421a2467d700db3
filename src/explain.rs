//! `POST /v1/route`: why a request would go where it goes (SPEC §9), a dry run of a
//! chat-completions body.
//!
//! [`Explainer`] runs the request through the very functions the layers call —
//! [`route::plan_each`](crate::route::plan_each) (models, variants, allow-list,
//! `provider` preferences), [`health::filter_plan_each`](crate::health::filter_plan_each)
//! (health, `order` / `sort` / variants, the weighted draw, prompt-cache affinity) and
//! [`credit::reservation_for`](crate::credit::reservation_for) — and writes down what
//! they decided: every candidate endpoint, kept or not and why, the kept ones in the
//! order they would be tried, each draw's shares, and the reserve. The layers pass
//! those functions a visitor that does nothing; this one collects the decisions
//! ([`Exclusion`], [`Decision`]) and only here are they put into words.
//!
//! No upstream is called, nothing is reserved or charged, no generation record is
//! written; the request counts in the key's `rpm` like any client request (the
//! gateway mounts it behind auth and the rate limit). A body that is not a chat
//! request is 400, as chat answers; any later refusal the real request would get
//! (404 `model_not_found`, 403 `forbidden`, 404 `no_endpoints`, 503
//! `no_healthy_provider`, …) is a 200 whose `data.error` carries it, with every
//! candidate found up to there, so the explain shows *why*.
//!
//! The weighted draw is random per request: the explain draws as if the random
//! number were 0 (the cheapest endpoint with a weight first) and gives each endpoint
//! of the draw its `share`, the probability of being drawn first
//! ([`draw_shares`]).
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use switchboard::{catalog::Catalog, config::{Config, HealthConfig}};
//! use switchboard::explain::Explainer;
//! use switchboard::health::{HealthRegistry, InMemoryHealth};
//!
//! let catalog = Arc::new(Catalog::from_config(&Config::demo()));
//! let health: Arc<dyn HealthRegistry> =
//!     Arc::new(InMemoryHealth::for_catalog(&HealthConfig::default(), &catalog));
//! let explainer = Explainer::new(catalog, health);
//! let request = switchboard::normalize::parse_request(
//!     br#"{"model":"mock/echo","messages":[{"role":"user","content":"hi"}],
//!          "provider":{"ignore":["mock"]}}"#,
//! ).unwrap();
//! let x = explainer.explain(request, None);
//! assert!(!x.plan[0].kept);
//! assert!(x.plan[0].reason.contains("provider.ignore"), "{}", x.plan[0].reason);
//! assert_eq!(x.error.as_ref().unwrap().code, "no_endpoints");
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response};
use serde::Serialize;
use tokio::time::Instant;

use crate::catalog::{Catalog, Endpoint};
use crate::chat::{ChatRequest, SortBy};
use crate::context::{CallContext, ChatCall};
use crate::error::{Body, BoxError, GatewayError};
use crate::health::{
    draw_shares, filter_plan_each, Affinity, Availability, Decision, HealthRegistry, Ordering,
    Placement,
};
use crate::keys::KeyRecord;
use crate::money::Money;
use crate::route::{plan_each, split_variant, with_thinking, Exclusion, Variant};

/// The `POST /v1/route` endpoint: a cheap value over the gateway's catalog and
/// health registry (and the health filter's prompt-cache affinity), rebuilt with
/// the stack. Behind the auth layer, which puts the caller's [`KeyRecord`] in the
/// request's extensions. See the [module docs](self).
#[derive(Clone)]
pub struct Explainer {
    catalog: Arc<Catalog>,
    health: Arc<dyn HealthRegistry>,
    affinity: Option<Affinity>,
    max_body_bytes: usize,
    body_timeout: Duration,
}

impl std::fmt::Debug for Explainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Explainer").finish_non_exhaustive()
    }
}

/// What `POST /v1/route` answers, under `data`.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The requested model, as the request names it.
    pub model: String,
    /// The kept endpoints in the order they would be tried, then the others.
    pub plan: Vec<Step>,
    /// What credit would reserve for the request (USD); `null` when it would be
    /// refused before that.
    pub reserve_usd: Option<Money>,
    /// The refusal the real request would get, `null` when it would be sent.
    pub error: Option<Refusal>,
}

/// One candidate endpoint of an [`Explanation`].
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The endpoint's model id.
    pub model: String,
    /// The endpoint's provider.
    pub provider: String,
    /// Whether the request would try it.
    pub kept: bool,
    /// Why it is kept where it is, or why not.
    pub reason: String,
    /// In a weighted draw: the probability it goes first; `null` elsewhere.
    pub share: Option<f64>,
}

/// The error a real request would get: SPEC §3.2's object and its status.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    /// The HTTP status.
    pub status: u16,
    /// The message.
    pub message: String,
    /// The OpenAI error class.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The SPEC §3.2 code.
    pub code: &'static str,
}

impl From<&GatewayError> for Refusal {
    fn from(e: &GatewayError) -> Self {
        Refusal {
            status: e.status().as_u16(),
            message: e.to_string(),
            kind: e.kind(),
            code: e.code(),
        }
    }
}

/// Why an endpoint is out: routing's or health's decision.
enum Out {
    Route(Exclusion),
    Unavailable { until: Instant, parked: bool },
    NoFallbacks,
}

impl Explainer {
    /// The explain over `catalog` and `health` (no affinity; bodies up to 1 MiB, read
    /// within 60 s: see [`limits`](Self::limits)).
    pub fn new(catalog: Arc<Catalog>, health: Arc<dyn HealthRegistry>) -> Self {
        Explainer {
            catalog,
            health,
            affinity: None,
            max_body_bytes: 1 << 20,
            body_timeout: Duration::from_secs(60),
        }
    }

    /// The prompt-cache [`Affinity`] the health filter uses (the same entries).
    pub fn affinity(mut self, affinity: Option<Affinity>) -> Self {
        self.affinity = affinity;
        self
    }

    /// Bodies of at most `max_body_bytes`, read within `body_timeout`.
    pub fn limits(mut self, max_body_bytes: usize, body_timeout: Duration) -> Self {
        self.max_body_bytes = max_body_bytes;
        self.body_timeout = body_timeout;
        self
    }

    /// Explains `request` as the key `key` would send it.
    pub fn explain(&self, request: ChatRequest, key: Option<Arc<KeyRecord>>) -> Explanation {
        let ctx = CallContext::new();
        if let Some(key) = key {
            ctx.set_key(key);
        }
        let model = request.model.clone();
        let mut call = ChatCall::new(request, ctx);
        // As `Route::call`.
        if let Some(thinking) = with_thinking(&call.request) {
            call.request = Arc::new(thinking);
        }
        let mut out: Vec<(Arc<Endpoint>, Out)> = Vec::new();
        let routed = plan_each(&self.catalog, &call, |e, why| {
            out.push((e.clone(), Out::Route(why)))
        });
        let now = Instant::now();
        let mut placed: HashMap<usize, Placement> = HashMap::new();
        let mut shares: HashMap<usize, f64> = HashMap::new();
        let filtered = routed.and_then(|plan| {
            call.plan = plan;
            // As `HealthFilter::call`.
            let preferred = self
                .affinity
                .as_ref()
                .zip(Affinity::key(&call))
                .and_then(|(a, k)| a.preferred(k));
            let health = self.health.as_ref();
            filter_plan_each(&mut call, health, &|| 0.0, preferred, |d| match d {
                Decision::Unavailable { endpoint, until } => {
                    let parked = health.parked(endpoint, now);
                    out.push((endpoint.clone(), Out::Unavailable { until, parked }));
                }
                Decision::NoFallbacks { endpoint } => {
                    out.push((endpoint.clone(), Out::NoFallbacks));
                }
                Decision::Placed { endpoint, at } => {
                    placed.insert(endpoint.index, at);
                }
                Decision::Draw { group } => {
                    for (e, s) in group.iter().zip(draw_shares(group)) {
                        shares.insert(e.index, s);
                    }
                }
            })
        });
        let mut steps = Vec::with_capacity(call.plan.len() + out.len());
        let (reserve_usd, error) = match filtered {
            Ok(()) => {
                for e in &call.plan {
                    let share = shares.get(&e.index).copied();
                    let reason = self.placed_reason(&call, e, placed.get(&e.index), share, now);
                    steps.push(step(e, true, reason, share));
                }
                // As `Credit::call`.
                let hold = crate::credit::reservation_for(&call.request, &call.plan);
                (Some(hold.amount), None)
            }
            Err(e) => (None, Some(Refusal::from(&e))),
        };
        for (e, why) in &out {
            let kept = call.plan.iter().any(|p| Arc::ptr_eq(p, e));
            let listed = steps
                .iter()
                .any(|s| *s.model == *e.model && *s.provider == *e.provider.name);
            if !kept && !listed {
                steps.push(step(e, false, out_reason(e, why, now), None));
            }
        }
        Explanation {
            model,
            plan: steps,
            reserve_usd,
            error,
        }
    }

    fn placed_reason(
        &self,
        call: &ChatCall,
        e: &Endpoint,
        at: Option<&Placement>,
        share: Option<f64>,
        now: Instant,
    ) -> String {
        let price = format!(
            "{}/M prompt + {}/M completion",
            e.pricing.prompt, e.pricing.completion
        );
        let sort = call.request.provider.as_ref().and_then(|p| p.sort);
        let variant = split_variant(&call.request.model).ok().and_then(|(_, v)| v);
        let asked = |s: SortBy, v: Variant, name: &str| match (sort, variant) {
            (Some(x), _) if x == s => format!("provider.sort = {name}"),
            (_, Some(x)) if x == v => format!(
                ":{}",
                if v == Variant::Floor {
                    "floor"
                } else {
                    "nitro"
                }
            ),
            _ => format!("sort {name}"),
        };
        let mut reason = match at.copied() {
            Some(Placement::ProviderOrder) => {
                "named in provider.order: tried in that order, before the others".to_string()
            }
            Some(Placement::Sorted(Ordering::Price)) => format!(
                "{}: cheapest first ({price})",
                asked(SortBy::Price, Variant::Floor, "price")
            ),
            Some(Placement::Sorted(Ordering::Throughput)) => format!(
                "{}: highest observed throughput first ({})",
                asked(SortBy::Throughput, Variant::Nitro, "throughput"),
                self.health
                    .throughput(e)
                    .map_or("not observed yet".into(), |t| format!("{t:.1} tokens/s"))
            ),
            Some(Placement::Sorted(Ordering::Latency)) => format!(
                "provider.sort = latency: lowest observed time to first token first ({})",
                self.health
                    .ttft(e)
                    .map_or("not observed yet".into(), |t| format!(
                        "{} ms",
                        t.as_millis()
                    ))
            ),
            Some(Placement::Sorted(Ordering::Default)) => {
                format!("after any provider.order ones, cheapest first ({price})")
            }
            Some(Placement::Drawn | Placement::AfterDraw) => {
                let pct = share.unwrap_or(0.0) * 100.0;
                let rule = if e.pricing.sum_per_mtok() == 0.0 {
                    "∝ weight among the free endpoints"
                } else {
                    "∝ weight / price²"
                };
                format!(
                    "weighted draw {rule} (weight {}, {price}): first in {pct:.1}% of requests, else tried cheapest first",
                    e.weight
                )
            }
            Some(Placement::Affinity) => {
                "prompt-cache affinity: it served this prompt last, so it goes first".into()
            }
            Some(Placement::LastResort) => format!(
                "last resort: every candidate is unavailable, and its cooldown ends soonest ({})",
                wall_clock(
                    match self.health.availability(e, now) {
                        Availability::Unavailable { until } => until,
                        _ => now,
                    },
                    now
                )
            ),
            None => format!("the only endpoint of `{}` left", e.model),
        };
        if self.health.availability(e, now) == Availability::HalfOpen {
            reason.push_str("; degraded, cooldown over: this request would probe it");
        }
        reason
    }

    /// Answers one `POST /v1/route` request.
    pub async fn handle<B>(self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let key = req.extensions().get::<Arc<KeyRecord>>().cloned();
        let read = tokio::time::timeout(
            self.body_timeout,
            crate::normalize::read_body(req.into_body(), self.max_body_bytes),
        )
        .await
        .map_err(|_| crate::normalize::body_timed_out())
        .and_then(|r| r)
        .and_then(|bytes| crate::normalize::parse_request(&bytes));
        let request = match read {
            Ok(r) => r,
            Err(e) => return e.into_response(),
        };
        #[derive(Serialize)]
        struct Answer {
            data: Explanation,
        }
        let data = self.explain(request, key);
        match serde_json::to_vec(&Answer { data }) {
            Ok(body) => {
                let mut res = Response::new(Body::from(body));
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                res
            }
            Err(e) => GatewayError::Internal(e.to_string()).into_response(),
        }
    }
}

fn step(e: &Endpoint, kept: bool, reason: String, share: Option<f64>) -> Step {
    Step {
        model: e.model.to_string(),
        provider: e.provider.name.to_string(),
        kept,
        reason,
        share,
    }
}

/// The words for an endpoint left out.
fn out_reason(e: &Endpoint, why: &Out, now: Instant) -> String {
    let provider = &e.provider.name;
    match why {
        Out::Route(Exclusion::AllowList) => format!("model `{}` not in key's allow-list", e.model),
        Out::Route(Exclusion::Only) => format!("provider `{provider}` not in provider.only"),
        Out::Route(Exclusion::Ignore) => {
            format!("provider `{provider}` ignored by request (provider.ignore)")
        }
        Out::Route(Exclusion::NotOrdered) => format!(
            "provider `{provider}` not in provider.order, and allow_fallbacks is false"
        ),
        Out::Route(Exclusion::MaxPrice { prompt, price, max }) => {
            let side = if *prompt { "prompt" } else { "completion" };
            format!("{side} price {price}/M above max_price {max}/M (provider.max_price.{side}, USD per million tokens)")
        }
        Out::Route(Exclusion::DataCollection) => format!(
            "provider `{provider}` may collect data (data_collection = \"allow\"); the request denies it (provider.data_collection)"
        ),
        Out::Route(Exclusion::RequireParameters(p)) => format!(
            "provider `{provider}` does not honour `{p}` (provider.require_parameters)"
        ),
        Out::Unavailable { until, parked: true } => {
            format!("parked until {} by Retry-After", wall_clock(*until, now))
        }
        Out::Unavailable { until, .. } if *until <= now => {
            "degraded, cooldown over: another request is probing it".into()
        }
        Out::Unavailable { until, .. } => {
            format!("degraded until {}", wall_clock(*until, now))
        }
        Out::NoFallbacks => {
            "allow_fallbacks is false: only the first endpoint is tried".into()
        }
    }
}

/// A health deadline on tokio's clock as RFC 3339 (UTC, whole seconds, rounded up).
fn wall_clock(until: Instant, now: Instant) -> String {
    let left = until.saturating_duration_since(now);
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(left);
    let secs = unix.as_secs() + u64::from(unix.subsec_nanos() > 0);
    crate::clock::format_rfc3339(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Message, Role};
    use crate::config::HealthConfig;
    use crate::context::ChatReply;
    use crate::error::ProviderError;
    use crate::health::tests::abc;
    use crate::health::{HealthFilterLayer, InMemoryHealth, Permit, MIN_PREFIX_BYTES};
    use crate::route::RouteLayer;
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    /// The plan the real layers (route, then the health filter drawing 0) hand on.
    async fn real_plan(
        catalog: &Arc<Catalog>,
        health: &Arc<dyn HealthRegistry>,
        affinity: &Affinity,
        req: ChatRequest,
    ) -> Vec<String> {
        let svc = ServiceBuilder::new()
            .layer(RouteLayer::new(catalog.clone()))
            .layer(
                HealthFilterLayer::new(health.clone())
                    .random(|| 0.0)
                    .affinity(Some(affinity.clone())),
            )
            .service(service_fn(|call: ChatCall| async move {
                let plan: Vec<String> = call.plan.iter().map(|e| e.label()).collect();
                Err::<ChatReply, _>(GatewayError::Internal(plan.join(",")))
            }));
        let err = svc
            .oneshot(ChatCall::new(req, CallContext::new()))
            .await
            .unwrap_err();
        err.to_string().split(',').map(str::to_string).collect()
    }

    fn kept(x: &Explanation) -> Vec<String> {
        x.plan
            .iter()
            .filter(|s| s.kept)
            .map(|s| format!("{}@{}", s.model, s.provider))
            .collect()
    }

    #[tokio::test]
    async fn affinity_and_the_last_resort_are_the_layers_choices() {
        let catalog = abc();
        let cfg = HealthConfig {
            failure_threshold: 1,
            cooldown_secs: 60,
        };
        let health: Arc<dyn HealthRegistry> = Arc::new(InMemoryHealth::for_catalog(&cfg, &catalog));
        let affinity = Affinity::new();
        let explainer =
            Explainer::new(catalog.clone(), health.clone()).affinity(Some(affinity.clone()));
        let req = ChatRequest {
            model: "test/model".into(),
            messages: vec![Message::text(Role::User, "x".repeat(MIN_PREFIX_BYTES))],
            ..Default::default()
        };
        // The dearest endpoint served this prompt: it goes first.
        let call = ChatCall::new(req.clone(), CallContext::new());
        let key = Affinity::key(&call).unwrap();
        let a = catalog.model("test/model").unwrap().endpoints[0].clone();
        affinity.remember(key, a.index);
        let x = explainer.explain(req.clone(), None);
        assert_eq!(
            kept(&x),
            real_plan(&catalog, &health, &affinity, req.clone()).await
        );
        assert_eq!(x.plan[0].provider, "a");
        assert!(
            x.plan[0].reason.contains("affinity"),
            "{}",
            x.plan[0].reason
        );

        // Every endpoint degraded: the one whose cooldown ends soonest, as a last resort.
        for e in &catalog.model("test/model").unwrap().endpoints {
            let permit = Permit::acquire(&health, e, false).unwrap();
            permit.failure(&ProviderError::status("p", 503, "down"));
        }
        let x = explainer.explain(req.clone(), None);
        assert_eq!(kept(&x), real_plan(&catalog, &health, &affinity, req).await);
        assert_eq!(kept(&x).len(), 1);
        assert!(
            x.plan[0].reason.starts_with("last resort"),
            "{}",
            x.plan[0].reason
        );
        assert!(x.plan[1..]
            .iter()
            .all(|s| s.reason.starts_with("degraded until ")));
        assert!(x.error.is_none() && x.reserve_usd.is_some());
    }
}
