//! `CacheLayer`: the response cache and request coalescing of SPEC §8.1, at the HTTP
//! tier, for any JSON `POST` endpoint (chat completions today; messages, responses
//! and embeddings when they exist: the layer knows JSON and SSE, not their schemas).
//!
//! A request asks for caching with `X-OpenRouter-Cache: true` (or by default with
//! `[cache].enabled_by_default`; `false` turns it off) and may set
//! `X-OpenRouter-Cache-TTL` (1–86400 s; a bad value of either header is a 400
//! `invalid_request`). A request that does not ask passes straight through: one
//! header lookup, its body not even read.
//!
//! A cacheable request's body is read (within `max_body_bytes` and the body timeout)
//! and parsed as JSON (anything else passes through, for the inner service to refuse);
//! its [`CacheKey`] is the client key's id, the endpoint, the model as requested, the
//! stream mode and the body as canonical JSON. Then:
//! - **hit** (the [`CacheBackend`] has the answer): no inner call, no charge. The
//!   stored answer is sent with this request's own id (`X-Request-Id` and every `id`
//!   string of the answer that was the stored request's id), every number inside a
//!   `usage` object set to 0, `X-OpenRouter-Cache-Status: HIT`; a stream is replayed
//!   event for event, `[DONE]` last. With a [`Ledger`] it has its own generation
//!   record (`cache_hit: true`, cost 0, the stored answer's model and provider),
//!   committed before the answer is sent, touching no money;
//! - **coalesced** (an identical request is in flight in this process): it waits for
//!   that one and gets its answer as a hit; a streamed one gets the events as they
//!   arrive. If the first fails before its answer started (not a 200, or gone),
//!   exactly one waiting request takes over as the new first, the others follow it;
//! - **miss**: the request goes on (`X-OpenRouter-Cache-Status: MISS`), its answer
//!   recorded as it passes (and followed by coalesced requests); only a complete 200
//!   answer is stored (no error recorded in the [`CallContext`]; a stream only if it
//!   ended with `data: [DONE]`), never an error or a cut stream. An answer larger
//!   than `max_entry_bytes` is neither stored nor followed: its followers run on
//!   their own (one already streaming gets an error event).
//!
//! With [`RedisBackend`] (`[shared].redis_url`) answers are shared by every instance,
//! and a `SET NX PX` lock makes one instance compute an answer while the same request
//! on the others waits for the stored entry (polling with backoff, at most the lock's
//! lifetime), then is a hit. Details and limits: `docs/caching.md`.
//!
//! `switchboard_cache_requests_total{status="hit|miss|coalesced"}` counts them, and
//! the gauge `switchboard_cache_waiting` the requests waiting now for an identical
//! one's answer (coalesced followers, a streamed one until its end, and those waiting
//! for another instance).
//!
//! # Example
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use switchboard::cache::{CacheLayer, MemoryBackend};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let counted = calls.clone();
//! let svc = ServiceBuilder::new()
//!     .layer(CacheLayer::new(Arc::new(MemoryBackend::new(1 << 20))))
//!     .service(service_fn(move |_req: http::Request<axum::body::Body>| {
//!         counted.fetch_add(1, Ordering::SeqCst);
//!         async {
//!             let res = http::Response::builder()
//!                 .header("content-type", "application/json")
//!                 .header("x-request-id", "gen-first")
//!                 .body(axum::body::Body::from(r#"{"id":"gen-first","usage":{"total_tokens":7}}"#))
//!                 .unwrap();
//!             Ok::<_, std::convert::Infallible>(res)
//!         }
//!     }));
//! let ask = |body: &'static str| {
//!     http::Request::post("/v1/chat/completions")
//!         .header("x-openrouter-cache", "true")
//!         .body(axum::body::Body::from(body))
//!         .unwrap()
//! };
//! let first = svc.clone().oneshot(ask(r#"{"model":"m","messages":[]}"#)).await.unwrap();
//! assert_eq!(first.headers()["x-openrouter-cache-status"], "MISS");
//! axum::body::to_bytes(first.into_body(), usize::MAX).await.unwrap(); // stored at its end
//!
//! // The same JSON, keys in another order: a hit, with its own id and zero usage.
//! let again = svc.oneshot(ask(r#"{ "messages": [], "model": "m" }"#)).await.unwrap();
//! assert_eq!(again.headers()["x-openrouter-cache-status"], "HIT");
//! let id = again.headers()["x-request-id"].to_str().unwrap().to_string();
//! let body = axum::body::to_bytes(again.into_body(), usize::MAX).await.unwrap();
//! assert_eq!(body, format!(r#"{{"id":"{id}","usage":{{"total_tokens":0}}}}"#));
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! # }
//! ```

mod answer;
mod backend;
mod body;
mod config;
mod flight;
mod key;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, Either, FutureExt};
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};

pub use answer::{AnswerMeta, CachedAnswer};
pub use backend::{CacheBackend, Claim, MemoryBackend, RedisBackend};
pub use config::{CacheConfig, MAX_BYTES, MAX_TTL_SECS};
pub use key::{write_canonical, CacheKey, TopLevel};

use crate::context::{CacheHit, CallContext};
use crate::error::{Body, GatewayError};
use crate::keys::KeyRecord;
use crate::money::Money;
use crate::normalize::{X_MODEL_USED, X_PROVIDER, X_REQUEST_ID};
use crate::store::{Generation, Ledger, Reservation, Settlement};
use crate::telemetry;
use flight::{End, Flights, Head, Role};

/// `X-OpenRouter-Cache`: `true` asks for caching, `false` turns it off.
pub const X_CACHE: &str = "x-openrouter-cache";
/// `X-OpenRouter-Cache-TTL`: seconds (1–86400).
pub const X_CACHE_TTL: &str = "x-openrouter-cache-ttl";
/// `X-OpenRouter-Cache-Status`: `HIT` or `MISS`.
pub const X_CACHE_STATUS: &str = "x-openrouter-cache-status";

// The names as `HeaderName`s: looked up or inserted by `&str`, a name is parsed and
// hashed anew on every request.
const CACHE_NAME: HeaderName = HeaderName::from_static(X_CACHE);
const CACHE_TTL_NAME: HeaderName = HeaderName::from_static(X_CACHE_TTL);
const CACHE_STATUS_NAME: HeaderName = HeaderName::from_static(X_CACHE_STATUS);

/// Builds [`Cache`] services; clones share the backend and the requests in flight.
#[derive(Clone)]
pub struct CacheLayer {
    shared: Arc<Shared>,
}

struct Shared {
    backend: Arc<dyn CacheBackend>,
    /// [`CacheBackend::is_local`] of `backend`.
    local: bool,
    flights: Arc<Flights>,
    ledger: Option<Arc<dyn Ledger>>,
    enabled_by_default: bool,
    ttl: u64,
    max_body_bytes: usize,
    body_timeout: Duration,
    max_entry_bytes: usize,
    shared_wait: Duration,
}

impl std::fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLayer")
            .field("enabled_by_default", &self.shared.enabled_by_default)
            .field("ttl_secs", &self.shared.ttl)
            .finish_non_exhaustive()
    }
}

impl CacheLayer {
    /// Caches in `backend`: only requests that ask, for 300 s unless they say, bodies
    /// up to 10 MiB read within 600 s, answers up to 8 MiB; no generation records.
    pub fn new(backend: Arc<dyn CacheBackend>) -> Self {
        CacheLayer {
            shared: Arc::new(Shared {
                local: backend.is_local(),
                backend,
                flights: Arc::default(),
                ledger: None,
                enabled_by_default: false,
                ttl: CacheConfig::default().ttl_secs,
                max_body_bytes: 10_485_760,
                body_timeout: Duration::from_secs(600),
                max_entry_bytes: 8 << 20,
                shared_wait: Duration::from_secs(60),
            }),
        }
    }

    /// The layer `[cache]` describes: in memory, or in Redis with `shared`.
    pub fn from_config(config: &CacheConfig, shared: Option<crate::shared::SharedState>) -> Self {
        let backend: Arc<dyn CacheBackend> = match shared {
            Some(s) => Arc::new(RedisBackend::new(s, config.max_bytes)),
            None => Arc::new(MemoryBackend::new(config.max_bytes)),
        };
        CacheLayer::new(backend)
            .enabled_by_default(config.enabled_by_default)
            .ttl(Duration::from_secs(config.ttl_secs))
            // An answer may take an eighth of the cache at most (half a shard).
            .max_entry_bytes(MemoryBackend::largest_body(config.max_bytes).min(32 << 20) as usize)
    }

    /// The same backend (its entries), the same requests in flight and the same
    /// ledger, with the settings of `config` but its `max_bytes` (the backend's size,
    /// fixed when it was made): what a config reload builds (`gateway::reload`).
    /// The body limits are set again by the caller.
    pub fn reconfigured(&self, config: &CacheConfig) -> Self {
        let old = &self.shared;
        CacheLayer {
            shared: Arc::new(Shared {
                backend: old.backend.clone(),
                local: old.local,
                flights: old.flights.clone(),
                ledger: old.ledger.clone(),
                enabled_by_default: old.enabled_by_default,
                ttl: old.ttl,
                max_body_bytes: old.max_body_bytes,
                body_timeout: old.body_timeout,
                max_entry_bytes: old.max_entry_bytes,
                shared_wait: old.shared_wait,
            }),
        }
        .enabled_by_default(config.enabled_by_default)
        .ttl(Duration::from_secs(config.ttl_secs))
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        let shared = Arc::get_mut(&mut self.shared).expect("configured before it is cloned");
        f(shared);
        self
    }

    /// Caches requests that send no `X-OpenRouter-Cache` header.
    pub fn enabled_by_default(self, on: bool) -> Self {
        self.edit(|s| s.enabled_by_default = on)
    }

    /// How long answers are kept unless a request says (whole seconds, at least 1).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.edit(|s| s.ttl = ttl.as_secs().clamp(1, MAX_TTL_SECS))
    }

    /// Writes a generation record for each hit through `ledger`.
    pub fn ledger(self, ledger: Arc<dyn Ledger>) -> Self {
        self.edit(|s| s.ledger = Some(ledger))
    }

    /// Larger request bodies get 413 (as `NormalizeLayer` would).
    pub fn max_body_bytes(self, n: usize) -> Self {
        self.edit(|s| s.max_body_bytes = n)
    }

    /// How long a request body may take to arrive (408 after it).
    pub fn body_timeout(self, d: Duration) -> Self {
        self.edit(|s| s.body_timeout = d)
    }

    /// Answers larger than this are neither stored nor followed. A backend may keep
    /// less: a [`MemoryBackend`] of `max_bytes` keeps answers up to
    /// [`MemoryBackend::largest_body`] (an eighth of it); a larger one is still
    /// followed by identical requests in flight, then not kept. [`from_config`]
    /// sets this to what its backend keeps; with [`CacheLayer::new`] and a small
    /// backend, set it to match.
    ///
    /// [`from_config`]: CacheLayer::from_config
    pub fn max_entry_bytes(self, n: usize) -> Self {
        self.edit(|s| s.max_entry_bytes = n)
    }

    /// How long a request waits at most for another instance computing the same
    /// answer (with a shared backend).
    pub fn shared_wait(self, d: Duration) -> Self {
        self.edit(|s| s.shared_wait = d)
    }

    /// Requests of this layer in flight now, as leaders (tests).
    #[doc(hidden)]
    pub fn flights_in_progress(&self) -> usize {
        self.shared.flights.len()
    }

    /// Requests of this layer following a leader now (tests).
    #[doc(hidden)]
    pub fn flight_followers(&self) -> usize {
        self.shared.flights.followers()
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;
    fn layer(&self, inner: S) -> Cache<S> {
        Cache {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Answers from the cache, coalesces identical requests, records misses; see the
/// [module docs](self).
#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").finish_non_exhaustive()
    }
}

impl<S> Cache<S> {
    /// Wraps `inner` with a cache in `backend`.
    pub fn new(inner: S, backend: Arc<dyn CacheBackend>) -> Self {
        CacheLayer::new(backend).layer(inner)
    }

    /// A [`CacheLayer`].
    pub fn layer(backend: Arc<dyn CacheBackend>) -> CacheLayer {
        CacheLayer::new(backend)
    }
}

/// Whether `headers` ask for caching (`Some(ttl secs)`), or a 400.
fn asked(headers: &HeaderMap, shared: &Shared) -> Result<Option<u64>, GatewayError> {
    let on = match headers.get(CACHE_NAME) {
        None => shared.enabled_by_default,
        Some(v) => match v.to_str().map(str::trim) {
            Ok(t) if t.eq_ignore_ascii_case("true") || t == "1" => true,
            Ok(t) if t.eq_ignore_ascii_case("false") || t == "0" => false,
            _ => {
                return Err(GatewayError::InvalidRequest(
                    "X-OpenRouter-Cache must be `true` or `false`".into(),
                ))
            }
        },
    };
    if !on {
        return Ok(None);
    }
    match headers.get(CACHE_TTL_NAME) {
        None => Ok(Some(shared.ttl)),
        Some(v) => match v.to_str().ok().and_then(|t| t.trim().parse::<u64>().ok()) {
            Some(t) if (1..=MAX_TTL_SECS).contains(&t) => Ok(Some(t)),
            _ => Err(GatewayError::InvalidRequest(format!(
                "X-OpenRouter-Cache-TTL must be whole seconds between 1 and {MAX_TTL_SECS}"
            ))),
        },
    }
}

impl<S> Service<Request<Body>> for Cache<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if req.method() != http::Method::POST {
            return Either::Left(self.inner.call(req));
        }
        let ttl = match asked(req.headers(), &self.shared) {
            Ok(Some(ttl)) => ttl,
            // Not asked: nothing read, nothing added.
            Ok(None) => return Either::Left(self.inner.call(req)),
            Err(e) => return Either::Right(future::ready(Ok(refuse(&req, e))).boxed()),
        };
        // `inner` is called later, in the future: take the service we readied and
        // leave a clone in its place (tower-service's "be careful when cloning inner
        // services").
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(cached(inner, self.shared.clone(), req, ttl).boxed())
    }
}

/// The SPEC-shaped error answer of a refused request, with its context's status.
fn refuse(req: &Request<Body>, e: GatewayError) -> Response<Body> {
    let ctx = req.extensions().get::<CallContext>().cloned();
    if let Some(ctx) = &ctx {
        ctx.update(|s| {
            s.status = e.status().as_u16();
            s.error_code = Some(e.code());
        });
    }
    let mut res = e.into_response();
    if let Some(id) = ctx.and_then(|c| HeaderValue::from_str(c.request_id()).ok()) {
        res.headers_mut().insert(X_REQUEST_ID, id);
    }
    res
}

/// What a cacheable request is about.
struct Ask {
    key: CacheKey,
    ttl: u64,
    streamed: bool,
    model: String,
    ctx: CallContext,
    key_record: Option<Arc<KeyRecord>>,
}

async fn cached<S>(
    inner: S,
    shared: Arc<Shared>,
    req: Request<Body>,
    ttl: u64,
) -> Result<Response<Body>, Infallible>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let (mut parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > shared.max_body_bytes as u64) {
        // Too large to cache; the inner service answers 413 without reading it.
        return inner.oneshot(Request::from_parts(parts, body)).await;
    }
    let read = http_body_util::Limited::new(body, shared.max_body_bytes).collect();
    let bytes = match tokio::time::timeout(shared.body_timeout, read).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) => {
            let e = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                GatewayError::PayloadTooLarge(format!(
                    "the request body is larger than {} bytes ([server].max_body_bytes)",
                    shared.max_body_bytes
                ))
            } else {
                GatewayError::InvalidRequest(format!("could not read the request body: {e}"))
            };
            return Ok(refuse(&Request::from_parts(parts, Body::empty()), e));
        }
        Err(_) => {
            let e = crate::normalize::body_timed_out();
            return Ok(refuse(&Request::from_parts(parts, Body::empty()), e));
        }
    };
    let key_record = parts.extensions.get::<Arc<KeyRecord>>().cloned();
    let Some((key, top)) = CacheKey::of_body(
        key_record.as_ref().map_or("", |k| k.id.as_str()),
        parts.uri.path(),
        &bytes,
    ) else {
        // Not a JSON object: not cacheable; the inner service explains what is wrong.
        return inner
            .oneshot(Request::from_parts(parts, Body::from(bytes)))
            .await;
    };
    let ctx = match parts.extensions.get::<CallContext>() {
        Some(c) => c.clone(),
        None => {
            let c = CallContext::new();
            parts.extensions.insert(c.clone());
            c
        }
    };
    let ask = Ask {
        key,
        ttl,
        streamed: top.stream,
        model: top.model.unwrap_or_default(),
        ctx,
        key_record,
    };
    loop {
        let found = if shared.local {
            shared.backend.get_local(&ask.key)
        } else {
            shared.backend.get(&ask.key).await
        };
        if let Some(answer) = found {
            count("hit");
            return Ok(hit(&shared, &ask, &answer).await);
        }
        match shared.flights.join_or_lead(ask.key, shared.max_entry_bytes) {
            Role::Lead(mut guard) => {
                // The flight before this one may have stored its answer and ended
                // between the look above and the lead: look again (in this process;
                // no round trip), or this request would call upstream a second time.
                if let Some(answer) = shared.backend.get_local(&ask.key) {
                    guard.finish(answer.clone());
                    count("hit");
                    return Ok(hit(&shared, &ask, &answer).await);
                }
                let claim = if shared.local {
                    Claim::Granted
                } else {
                    shared.backend.claim(&ask.key).await
                };
                match claim {
                    Claim::Granted => guard.release_with(shared.backend.clone()),
                    Claim::Busy => {
                        // Another instance computes it: wait for its answer.
                        let waiting = shared.flights.waiting();
                        let answer = shared.backend.wait(&ask.key, shared.shared_wait).await;
                        drop(waiting);
                        if let Some(answer) = answer {
                            guard.finish(answer.clone());
                            count("hit");
                            return Ok(hit(&shared, &ask, &answer).await);
                        }
                    }
                }
                count("miss");
                let req = Request::from_parts(parts, Body::from(bytes));
                return Ok(lead(inner, &shared, &ask, req, guard).await);
            }
            Role::Follow(flight) => {
                // Counted in `switchboard_cache_waiting` while it follows (a streamed
                // follower's body keeps it until its end).
                let waiting = shared.flights.waiting();
                let mut changes = flight.changes();
                loop {
                    changes.borrow_and_update();
                    let (head, end) = {
                        let st = flight.state.lock();
                        (st.head.clone(), st.end.clone())
                    };
                    match end {
                        Some(End::Done(answer)) => {
                            count("coalesced");
                            return Ok(hit(&shared, &ask, &answer).await);
                        }
                        // The first failed: look again, and lead if nobody else does.
                        Some(End::Failed) => break,
                        None => {}
                    }
                    if let (true, Some(head)) = (ask.streamed, head) {
                        count("coalesced");
                        return Ok(
                            follow_stream(&shared, &ask, flight.clone(), &head, waiting).await
                        );
                    }
                    if changes.changed().await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}

/// `switchboard_cache_requests_total{status}`.
fn count(status: &'static str) {
    telemetry::counter(telemetry::CACHE_REQUESTS, &[("status", status)]).increment(1);
}

/// The headers every cached answer carries.
fn cache_headers(h: &mut HeaderMap, status: &'static str, ttl: u64) {
    h.insert(CACHE_STATUS_NAME, HeaderValue::from_static(status));
    h.insert(CACHE_TTL_NAME, HeaderValue::from(ttl));
}

/// Calls the inner service as the flight's leader; records its answer as it passes.
async fn lead<S>(
    inner: S,
    shared: &Arc<Shared>,
    ask: &Ask,
    req: Request<Body>,
    guard: flight::LeadGuard,
) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let Ok(res) = inner.oneshot(req).await;
    let (mut parts, body) = res.into_parts();
    cache_headers(&mut parts.headers, "MISS", ask.ttl);
    if parts.status != StatusCode::OK {
        drop(guard); // followers take over
        return Response::from_parts(parts, body);
    }
    let text = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = text(header::CONTENT_TYPE.as_str()).unwrap_or_default();
    let sse = content_type.starts_with("text/event-stream");
    guard.start(Head {
        provider: text(X_PROVIDER),
        model: text(X_MODEL_USED),
        old_id: text(X_REQUEST_ID).unwrap_or_else(|| ask.ctx.request_id().to_string()),
        content_type,
    });
    let recorder = body::Recorder {
        guard,
        ctx: Some(ask.ctx.clone()),
        backend: shared.backend.clone(),
        key: ask.key,
        ttl_secs: ask.ttl,
        sse,
    };
    Response::from_parts(parts, Body::new(body::RecordingBody::new(body, recorder)))
}

/// Records a cached answer in the context (for the request log) and, with a ledger,
/// as a generation of its own: zero cost, no reservation, `cache_hit: true`.
async fn note_hit(shared: &Shared, ask: &Ask, meta: &AnswerMeta) {
    let ctx = &ask.ctx;
    if let Some(key) = &ask.key_record {
        ctx.set_key(key.clone());
    }
    let (app_url, app_title) = ctx.update(|s| {
        s.status = 200;
        s.streamed = ask.streamed;
        s.requested_model.clone_from(&ask.model);
        s.finish_reason.clone_from(&meta.finish_reason);
        s.cache_hit = Some(CacheHit {
            model: meta.model.clone().unwrap_or_default(),
            provider: meta.provider.clone().unwrap_or_default(),
        });
        (s.app_url.clone(), s.app_title.clone())
    });
    let (Some(ledger), Some(key)) = (&shared.ledger, &ask.key_record) else {
        return;
    };
    let settlement = Settlement {
        key_id: key.id.clone(),
        reserved: Reservation::NONE,
        tokens: 0,
        generation: Generation {
            id: ctx.request_id().to_string(),
            key_id: key.id.clone(),
            model: meta.model.clone().unwrap_or_default(),
            provider: meta.provider.clone().unwrap_or_default(),
            streamed: ask.streamed,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_cost: Money::ZERO,
            latency_ms: ctx.started().elapsed().as_millis() as u64,
            ttft_ms: Some(ctx.started().elapsed().as_millis() as u64),
            attempts: Vec::new(),
            finish_reason: meta.finish_reason.clone(),
            created: ctx.created(),
            app_url,
            app_title,
            cache_hit: true,
        },
    };
    // The record is committed before the answer goes out, as a charge would be; a
    // store that does not confirm in time keeps it queued, and the answer goes out.
    match tokio::time::timeout(Duration::from_secs(2), ledger.settle(settlement)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("cache hit {}: no generation record: {e}", ctx.request_id()),
        Err(_) => tracing::warn!(
            "cache hit {}: the store did not confirm its generation record within 2 s",
            ctx.request_id()
        ),
    }
}

/// The headers of a hit: the stored answer's, this request's id, the cache's.
fn hit_head(
    ask: &Ask,
    content_type: &str,
    provider: Option<&str>,
    model: Option<&str>,
    ttl: u64,
) -> http::response::Builder {
    let mut res = Response::builder().status(StatusCode::OK);
    let h = res.headers_mut().expect("a fresh builder");
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if content_type.starts_with("text/event-stream") {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    for (name, value) in [(X_PROVIDER, provider), (X_MODEL_USED, model)] {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            h.insert(name, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(ask.ctx.request_id()) {
        h.insert(X_REQUEST_ID, v);
    }
    cache_headers(h, "HIT", ttl);
    res
}

/// A stored answer, sent as this request's own.
async fn hit(shared: &Shared, ask: &Ask, answer: &CachedAnswer) -> Response<Body> {
    note_hit(shared, ask, &answer.meta).await;
    let body: Bytes = answer.render(ask.ctx.request_id());
    let m = &answer.meta;
    hit_head(
        ask,
        &m.content_type,
        m.provider.as_deref(),
        m.model.as_deref(),
        m.ttl_secs,
    )
    .body(Body::from(body))
    .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// A streamed follower's answer: the leader's events as they arrive.
async fn follow_stream(
    shared: &Shared,
    ask: &Ask,
    flight: Arc<flight::Flight>,
    head: &Head,
    waiting: flight::Waiting,
) -> Response<Body> {
    let meta = AnswerMeta {
        content_type: head.content_type.clone(),
        provider: head.provider.clone(),
        model: head.model.clone(),
        finish_reason: None,
        streamed: true,
        ttl_secs: ask.ttl,
        expires_unix_ms: 0,
        id_at: Vec::new(),
        id_len: 0,
    };
    note_hit(shared, ask, &meta).await;
    let body = body::follower_body(
        flight,
        head.old_id.clone(),
        ask.ctx.request_id().to_string(),
        ask.ctx.clone(),
        waiting,
    );
    hit_head(
        ask,
        &head.content_type,
        head.provider.as_deref(),
        head.model.as_deref(),
        ask.ttl,
    )
    .body(body)
    .unwrap_or_else(|_| Response::new(Body::empty()))
}
