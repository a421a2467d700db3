//! What a config reload swaps: the [`Stack`] built from one [`Config`], over the
//! [`Process`] parts that live as long as the gateway.
//!
//! The split is the answer to "what survives a reload": the store and ledger, the
//! auth cache, the request-log writer, the rate limiters, the response cache's
//! entries and flights, the idempotency claims, the `[shared]` Redis connections,
//! the provider client's connection pool and the drain belong to the process; the
//! catalog, the health registry (seeded with the old one's state of every endpoint
//! that still exists), and every layer that reads the catalog or a setting belong
//! to the stack. A request takes the stack current when it arrives (one atomic
//! load) and keeps it, through the clones its layers hold, until it ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;

use super::ChatService;
use crate::auth::AuthLayer;
use crate::cache::CacheLayer;
use crate::catalog::{Catalog, Endpoint};
use crate::config::{Config, KeyConfig};
use crate::credit::CreditLayer;
use crate::drain::{Drain, DrainLayer};
use crate::error::Body;
use crate::explain::Explainer;
use crate::fallback::FallbackLayer;
use crate::health::{Affinity, HealthFilterLayer, HealthRegistry, InMemoryHealth, RedisHealth};
use crate::idempotency::IdempotencyLayer;
use crate::logging::{LogWriter, LoggingLayer};
use crate::metering::MeteringLayer;
use crate::normalize::{AnthropicErrorsLayer, CountTokens, NormalizeLayer};
use crate::providers::ProviderClient;
use crate::rate_limit::RateLimitLayer;
use crate::route::RouteLayer;
use crate::store::{Ledger, StoreError};
use http::Response;

/// Upserts a config's `[[keys]]` into the store the gateway opened.
pub(crate) type Bootstrap = Arc<dyn Fn(&[KeyConfig]) -> Result<(), StoreError> + Send + Sync>;

/// What lives as long as the gateway, whatever config is loaded.
pub(crate) struct Process {
    /// Adapters over one pooled HTTP client.
    pub(crate) client: ProviderClient,
    /// The span exporter, with `[telemetry]` (a change of it needs a restart).
    pub(crate) telemetry: Option<crate::otel::Telemetry>,
    /// The request-log writer.
    pub(crate) logs: LogWriter,
    /// Balances and settlements.
    pub(crate) ledger: Arc<dyn Ledger>,
    /// The auth cache.
    pub(crate) auth: AuthLayer,
    /// The rpm budgets of every key.
    pub(crate) rate_limit: RateLimitLayer,
    /// `[shared]`'s Redis, when configured.
    pub(crate) shared: Option<crate::shared::SharedState>,
    /// The idempotency claims in flight (each stack's layer is a clone with its settings).
    pub(crate) idempotency: IdempotencyLayer,
    /// The response cache's backend and flights (each stack's layer is
    /// [`CacheLayer::reconfigured`]).
    pub(crate) cache: CacheLayer,
    /// Tripped by `serve` when the shutdown grace runs out.
    pub(crate) drain: Drain,
    /// A health registry given to the builder: kept as it is across reloads.
    pub(crate) custom_health: Option<Arc<dyn HealthRegistry>>,
    /// `[[keys]]` into the store `build` opened (`None` for a store given to the builder).
    pub(crate) bootstrap: Option<Bootstrap>,
}

/// The in-memory health a stack's registry decides on, for the next stack to carry over.
enum LocalHealth {
    Memory(Arc<InMemoryHealth>),
    Redis(Arc<RedisHealth>),
    /// A registry given to the builder: nothing to carry (it is kept).
    Custom,
}

/// Everything built from one [`Config`]: what a reload replaces at once for new
/// requests (see the module docs).
pub struct Stack {
    pub(crate) config: Arc<Config>,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) health: Arc<dyn HealthRegistry>,
    local: LocalHealth,
    pub(crate) chat: ChatService,
    pub(crate) count_tokens: CountTokens,
    /// `POST /v1/route` over this stack's catalog, health and affinity.
    pub(crate) explainer: Explainer,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("models", &self.catalog.models().len())
            .finish_non_exhaustive()
    }
}

impl Stack {
    /// The config it was built from.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Its catalog.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Its health registry.
    pub fn health(&self) -> &Arc<dyn HealthRegistry> {
        &self.health
    }

    /// Its chat service (HTTP tier).
    pub fn chat(&self) -> &ChatService {
        &self.chat
    }

    fn local_health(&self) -> Option<&InMemoryHealth> {
        match &self.local {
            LocalHealth::Memory(m) => Some(m),
            LocalHealth::Redis(r) => Some(r.local()),
            LocalHealth::Custom => None,
        }
    }

    /// Builds the stack of `config` over `process`; with `old`, the health of every
    /// endpoint both catalogs have (same model id, provider name and upstream model)
    /// is carried over.
    pub(crate) fn build(process: &Process, config: Config, old: Option<&Stack>) -> Stack {
        let catalog = Arc::new(Catalog::from_config(&config));
        // Passive health per endpoint, shared by HealthFilter (reads) and Fallback
        // (writes); `[health]` settings.
        let (health, local): (Arc<dyn HealthRegistry>, LocalHealth) =
            match (&process.custom_health, &process.shared) {
                (Some(h), _) => (h.clone(), LocalHealth::Custom),
                (None, shared) => {
                    let fresh = InMemoryHealth::for_catalog(&config.health, &catalog);
                    if let Some(old) = old {
                        if let Some(before) = old.local_health() {
                            fresh.carry_over(before, same_endpoints(&old.catalog, &catalog));
                        }
                    }
                    match shared {
                        Some(s) => {
                            let r = Arc::new(RedisHealth::with_local(s.clone(), fresh, &catalog));
                            (r.clone(), LocalHealth::Redis(r))
                        }
                        None => {
                            let m = Arc::new(fresh);
                            (m.clone(), LocalHealth::Memory(m))
                        }
                    }
                }
            };

        // Prompt-cache affinity: the health filter's entries, which the route explain
        // reads too; with `[shared]`, learnt by every instance from every other.
        let affinity = match &process.shared {
            Some(s) => Affinity::shared(s.clone(), &catalog),
            None => Affinity::new(),
        };
        // The typed tier, outermost first.
        let typed = ServiceBuilder::new()
            // 1. Route: model id (+ `models`, variants, allow-list) → candidate endpoints.
            //    First, so every later step works on a plan and unknown models cost nothing.
            .layer(RouteLayer::new(catalog.clone()))
            // 2. Health filter: drop degraded endpoints (without contacting them) and
            //    order the healthy ones (order / sort / variants / weighted draw).
            //    After routing, since it works on the plan; before credit, so the
            //    reserve is priced over the endpoints that can really be tried; it
            //    shares its registry with Fallback, which records every outcome.
            .layer(HealthFilterLayer::new(health.clone()).affinity(Some(affinity.clone())))
            // 3. Credit: reserve the worst case over the plan that is left (402 before
            //    any upstream is called), settle to the metered cost before the last
            //    byte. After routing and health filtering (the plan is final), before
            //    fallback, so one reservation covers every attempt and failed attempts
            //    cost nothing.
            .layer(CreditLayer::new(process.ledger.clone()))
            // 4. Fallback: walk the plan until an endpoint commits its first content chunk.
            //    Outside metering, so each attempt is metered on its own and failed
            //    attempts cost nothing.
            .layer(FallbackLayer::new(config.retry.clone()).health(health.clone()))
            // 5. Metering: count and price each attempt's chunks as they pass, right at
            //    the provider, so a cut stream is metered for exactly what passed. It
            //    caps each cost at credit's reservation; an upstream whose usage goes
            //    past it counts as a failure in the shared health registry.
            .layer(MeteringLayer::new().health(health.clone()))
            // 6. Drain: when the shutdown grace runs out (`Gateway::serve`), what still
            //    waits on an upstream fails with `server_shutting_down`. Under
            //    metering, so such a cut is an upstream-side failure: charged for what
            //    was delivered, settled, and ended with the dialect's mid-stream error.
            .layer(DrainLayer::new(process.drain.clone()))
            // 7. The provider client: adapters over one pooled HTTP client.
            .service(process.client.clone());

        // The HTTP tier, outermost first.
        let chat = ServiceBuilder::new()
            // Anthropic-shaped errors on the `/messages` paths (SPEC §7.1), whichever
            // layer below made them (auth, rate limit, idempotency, cache, Normalize,
            // the typed tier). Outermost, so it sees every error; other paths pass
            // through without an allocation.
            .layer(AnthropicErrorsLayer::new())
            .map_response(|res: Response<crate::logging::LoggedBody<Body>>| res.map(Body::new))
            // Logging is outermost: it creates the CallContext every layer below fills
            // in, times the whole request, and emits the record only after the inner
            // body (and the credit settlement it holds) is dropped; it sees requests
            // that auth or rate limits refuse, too.
            .layer(
                LoggingLayer::new(process.logs.clone())
                    .log_content(config.logging.log_content)
                    .telemetry(process.telemetry.clone()),
            )
            // Auth first: nothing else runs, and nothing is read, for an unknown or
            // disabled key (401 / 403). The record (never the balance) is cached.
            .layer(process.auth.clone())
            // Rate limit on the authenticated key id, before the body is even read.
            .layer(process.rate_limit.clone())
            // Idempotency keys (SPEC §8.2): after auth (records are scoped to the key)
            // and rate limits (a replay is a request too); outside Normalize, so it
            // sees the bytes the client gets and holds the last of them until credit's
            // settlement, parked in the context, is committed with the record.
            .layer(
                process
                    .idempotency
                    .clone()
                    .ttl(Duration::from_secs(config.idempotency.ttl_secs))
                    .max_body_bytes(config.server.max_body_bytes as usize)
                    .wait_timeout(Duration::from_secs(config.server.request_timeout_secs)),
            )
            // The response cache: after auth and rate limits (a hit is a request of
            // the key like any other, and answers are never shared between keys),
            // before Normalize and so before credit (a hit costs nothing, calls no
            // upstream). It coalesces identical requests in flight. Requests that do
            // not ask for caching pass through without their body being read.
            .layer(
                process
                    .cache
                    .reconfigured(&config.cache)
                    .max_body_bytes(config.server.max_body_bytes as usize)
                    .body_timeout(Duration::from_secs(config.server.request_timeout_secs)),
            )
            // Normalize is where HTTP ends: body limit, JSON, SSE, keep-alive, deadline.
            .layer(
                NormalizeLayer::new()
                    .max_body_bytes(config.server.max_body_bytes as usize)
                    .keepalive(Duration::from_secs(config.server.keepalive_secs))
                    .request_timeout(Duration::from_secs(config.server.request_timeout_secs)),
            )
            .service(typed);

        let count_tokens = CountTokens::new(
            catalog.clone(),
            config.server.max_body_bytes as usize,
            Duration::from_secs(config.server.request_timeout_secs),
        );
        // `POST /v1/route`: the same catalog, health and affinity as this stack.
        let explainer = Explainer::new(catalog.clone(), health.clone())
            .affinity(Some(affinity))
            .limits(
                config.server.max_body_bytes as usize,
                Duration::from_secs(config.server.request_timeout_secs),
            );
        Stack {
            config: Arc::new(config),
            catalog,
            health,
            local,
            chat: BoxCloneSyncService::new(chat),
            count_tokens,
            explainer,
        }
    }
}

/// The endpoints of `old` that `new` has too, by identity: model id, provider name
/// and upstream model (indices change when a config does).
pub(crate) fn same_endpoints<'a>(
    old: &'a Catalog,
    new: &'a Catalog,
) -> impl Iterator<Item = (&'a Endpoint, &'a Endpoint)> {
    let by_id: HashMap<(&str, &str, &str), &Endpoint> = old
        .endpoints()
        .iter()
        .map(|e| (identity(e), &**e))
        .collect();
    new.endpoints()
        .iter()
        .filter_map(move |e| by_id.get(&identity(e)).map(|o| (*o, &**e)))
}

fn identity(e: &Endpoint) -> (&str, &str, &str) {
    (&e.model, &e.provider.name, &e.upstream_model)
}
