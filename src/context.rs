//! The types between typed-tier layers: [`ChatCall`] in, [`ChatReply`] out, and the
//! per-request [`CallContext`] every layer fills in.
//!
//! `CallContext` is created once per request (by `LoggingLayer`, or by `NormalizeLayer`
//! when used alone), travels in the HTTP request's extensions and then inside each
//! call, and is read at the end by credit settlement and logging. It is an `Arc`
//! with a per-request mutex: never global, never contended across requests.
//!
//! # Example
//! ```
//! use switchboard::context::CallContext;
//!
//! let ctx = CallContext::new();
//! assert!(ctx.request_id().starts_with("gen-"));
//! ctx.update(|s| s.streamed = true);
//! assert!(ctx.snapshot().streamed);
//! ```

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::Stream;

use crate::catalog::Endpoint;
use crate::chat::{ChatChunk, ChatRequest, Usage};
use crate::credit::ParkedSettlement;
use crate::error::GatewayError;
use crate::keys::KeyRecord;
use crate::money::Money;
use crate::store::Reservation;

/// The stream of chunks every typed layer passes along.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, GatewayError>> + Send>>;

/// A typed chat call: the request, its context, and (after routing) its plan.
#[derive(Clone)]
pub struct ChatCall {
    /// The parsed client request, shared by every attempt.
    pub request: Arc<ChatRequest>,
    /// Per-request state.
    pub ctx: CallContext,
    /// Candidate endpoints in the order they should be tried; filled by routing.
    pub plan: Vec<Arc<Endpoint>>,
}

impl ChatCall {
    /// A call with an empty plan.
    pub fn new(request: ChatRequest, ctx: CallContext) -> Self {
        ChatCall {
            request: Arc::new(request),
            ctx,
            plan: Vec::new(),
        }
    }
}

impl fmt::Debug for ChatCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatCall")
            .field("request_id", &self.ctx.request_id())
            .field("model", &self.request.model)
            .field(
                "plan",
                &self.plan.iter().map(|e| e.label()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A committed reply: the endpoint that serves it and its chunks.
///
/// By the time a `ChatReply` exists, its first content chunk is ready (SPEC §3.1's
/// commit point); nothing is retried after that.
pub struct ChatReply {
    /// The endpoint that served.
    pub endpoint: Arc<Endpoint>,
    /// Chunks, the already-received first content chunk included.
    pub chunks: ChunkStream,
}

impl fmt::Debug for ChatReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatReply")
            .field("endpoint", &self.endpoint.label())
            .finish_non_exhaustive()
    }
}

/// One upstream attempt: what the provider client is called with.
#[derive(Clone)]
pub struct ProviderCall {
    /// Where to send it.
    pub endpoint: Arc<Endpoint>,
    /// The client request (adapters translate it).
    pub request: Arc<ChatRequest>,
    /// Per-request state.
    pub ctx: CallContext,
}

impl fmt::Debug for ProviderCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderCall")
            .field("request_id", &self.ctx.request_id())
            .field("endpoint", &self.endpoint.label())
            .finish()
    }
}

/// One attempt as recorded for `/v1/generation` and the request log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// Provider name.
    pub provider: Arc<str>,
    /// Gateway model id tried.
    pub model: Arc<str>,
    /// `"200"`, `"503"`, `"timeout"`, ….
    pub status: String,
    /// From the attempt's start to its success (first content) or failure.
    pub latency: Duration,
}

/// What layers record about a request as it goes.
#[derive(Debug, Clone, Default)]
pub struct CallState {
    /// The model the client asked for.
    pub requested_model: String,
    /// The endpoint that served, once committed.
    pub served: Option<Arc<Endpoint>>,
    /// Every attempt, in order.
    pub attempts: Vec<AttemptRecord>,
    /// Metered usage of the served attempt, priced (`usage.cost` set).
    pub usage: Option<Usage>,
    /// The priced cost of the served attempt (equals `usage.cost`).
    pub cost: Money,
    /// Time to the first content chunk.
    pub ttft: Option<Duration>,
    /// Time spent waiting on upstreams (for the overhead metric).
    pub upstream_wait: Duration,
    /// Final `finish_reason`.
    pub finish_reason: Option<String>,
    /// Final status sent (or committed) to the client.
    pub status: u16,
    /// SPEC error code, if the request failed.
    pub error_code: Option<&'static str>,
    /// Whether the client asked for a stream.
    pub streamed: bool,
    /// Completion text delivered (kept only when `log_content` is on): `LoggingLayer`
    /// sets it to `Some("")` to ask, and metering fills it in at the end.
    pub completion_text: Option<String>,
    /// The request, kept for the log only when `log_content` is on (set by metering).
    pub logged_request: Option<Arc<ChatRequest>>,
    /// Set by health filtering when every candidate was degraded and the plan is the
    /// single last-resort endpoint of SPEC §5 (its failure answers 503).
    pub last_resort: bool,
    /// Set by metering when an upstream reported usage above the request's
    /// [reservation](CallContext::reservation): the charge was capped at it.
    pub over_reserve: bool,
    /// The app that sent it (its `HTTP-Referer` header, bounded), set by
    /// [`LoggingLayer`](crate::logging::LoggingLayer).
    pub app_url: Option<String>,
    /// The app's name (its `X-Title` header, bounded), set likewise.
    pub app_title: Option<String>,
    /// Set by the response cache when the answer came from it (SPEC §8.1): no
    /// upstream call, no charge.
    pub cache_hit: Option<CacheHit>,
}

/// What served a [cache](crate::cache) hit: the stored answer's model and provider.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheHit {
    /// The gateway model id that served the stored answer.
    pub model: String,
    /// The provider that served the stored answer.
    pub provider: String,
}

struct Inner {
    request_id: String,
    created: u64,
    started: Instant,
    deadline: OnceLock<Instant>,
    key: OnceLock<Arc<KeyRecord>>,
    reservation: OnceLock<Reservation>,
    state: Mutex<CallState>,
    /// Set by the idempotency layer: credit parks its settlement (below) instead of
    /// committing it.
    defer_settlement: AtomicBool,
    parked: Mutex<Option<ParkedSettlement>>,
    /// Set by `LoggingLayer` only when OpenTelemetry export is on ([`crate::otel`]):
    /// with it off, this stays empty and each check of it is one atomic load.
    trace: OnceLock<crate::otel::RequestTrace>,
}

/// Shared per-request state; cheap to clone.
#[derive(Clone)]
pub struct CallContext(Arc<Inner>);

impl CallContext {
    /// A new context with a fresh request id.
    pub fn new() -> Self {
        Self::with_id(new_request_id())
    }

    /// A new context with the given request id.
    pub fn with_id(request_id: String) -> Self {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        CallContext(Arc::new(Inner {
            request_id,
            created,
            started: Instant::now(),
            deadline: OnceLock::new(),
            key: OnceLock::new(),
            reservation: OnceLock::new(),
            state: Mutex::new(CallState::default()),
            defer_settlement: AtomicBool::new(false),
            parked: Mutex::new(None),
            trace: OnceLock::new(),
        }))
    }

    /// Holds the request's spans (first call wins): they are exported
    /// ([`crate::otel`]). Only `LoggingLayer` calls it, and only when export is on.
    pub(crate) fn set_trace(&self, trace: crate::otel::RequestTrace) {
        let _ = self.0.trace.set(trace);
    }

    /// The request's spans, when export is on (one atomic load when it is off).
    pub(crate) fn trace(&self) -> Option<&crate::otel::RequestTrace> {
        self.0.trace.get()
    }

    /// The `traceparent` header of the attempt in flight: `None` unless export is on
    /// (one atomic load then).
    pub fn upstream_traceparent(&self) -> Option<http::HeaderValue> {
        self.0.trace.get()?.upstream_traceparent()
    }

    /// The gateway's request id (the response `id`, `X-Request-Id`, the ledger key).
    pub fn request_id(&self) -> &str {
        &self.0.request_id
    }

    /// Unix seconds when the request arrived.
    pub fn created(&self) -> u64 {
        self.0.created
    }

    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.0.started
    }

    /// The whole request's deadline, if one is set.
    pub fn deadline(&self) -> Option<Instant> {
        self.0.deadline.get().copied()
    }

    /// Sets the deadline (first call wins).
    pub fn set_deadline(&self, at: Instant) {
        let _ = self.0.deadline.set(at);
    }

    /// The authenticated key, if auth ran.
    pub fn key(&self) -> Option<&Arc<KeyRecord>> {
        self.0.key.get()
    }

    /// Records the authenticated key (first call wins).
    pub fn set_key(&self, key: Arc<KeyRecord>) {
        let _ = self.0.key.set(key);
    }

    /// What credit admission holds for this request, if it ran: the most the
    /// request may be charged (metering caps the cost at it).
    pub fn reservation(&self) -> Option<Reservation> {
        self.0.reservation.get().copied()
    }

    /// Records the reservation (first call wins; set by
    /// [`CreditLayer`](crate::credit::CreditLayer) before any upstream is called).
    pub fn set_reservation(&self, hold: Reservation) {
        let _ = self.0.reservation.set(hold);
    }

    /// Asks [`CreditLayer`](crate::credit::CreditLayer) to park the request's
    /// settlement in this context ([`park_settlement`](Self::park_settlement))
    /// instead of committing it, so that whoever set this commits it together with
    /// something else (the idempotency record of SPEC §8.2).
    pub fn defer_settlement(&self) {
        self.0.defer_settlement.store(true, Ordering::Release);
    }

    /// Whether [`defer_settlement`](Self::defer_settlement) was called.
    pub fn settlement_deferred(&self) -> bool {
        self.0.defer_settlement.load(Ordering::Acquire)
    }

    /// Parks the request's settlement (credit does, when deferred). A parked
    /// settlement that nobody takes commits itself, alone, when dropped (with the
    /// context at the latest): no path loses a charge.
    pub fn park_settlement(&self, parked: ParkedSettlement) {
        let old = self
            .0
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(parked);
        // Dropping an earlier one commits it; there is never more than one.
        drop(old);
    }

    /// Takes the parked settlement, if there is one.
    pub fn take_parked_settlement(&self) -> Option<ParkedSettlement> {
        self.0
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Changes the state under its lock.
    pub fn update<R>(&self, f: impl FnOnce(&mut CallState) -> R) -> R {
        let mut guard = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// A copy of the state.
    pub fn snapshot(&self) -> CallState {
        self.update(|s| s.clone())
    }
}

impl Default for CallContext {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for CallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallContext")
            .field("request_id", &self.0.request_id)
            .finish_non_exhaustive()
    }
}

/// A fresh request id: `gen-`, 8 base-62 digits of the time in milliseconds, then 20
/// random alphanumerics (≈ 119 bits: unguessable, so an id leaks nothing but its time
/// and cannot be enumerated).
///
/// The time prefix makes ids sort by creation, as ULIDs do, so the ledger's and the
/// request log's primary-key indexes grow at their right edge instead of touching a
/// random page per insert (measured: fewer WAL pages per commit; BENCHMARKS.md).
pub fn new_request_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut time = [b'0'; 8];
    for d in time.iter_mut().rev() {
        *d = DIGITS[(ms % 62) as usize];
        ms /= 62;
    }
    let mut id = String::with_capacity(32);
    id.push_str("gen-");
    id.extend(time.iter().map(|&b| b as char));
    Alphanumeric.append_string(&mut rand::rng(), &mut id, 20);
    id
}

#[cfg(test)]
mod tests {
    use super::new_request_id;

    /// The time prefix decoded back to milliseconds.
    fn millis(id: &str) -> u64 {
        id["gen-".len().."gen-".len() + 8]
            .bytes()
            .fold(0, |acc, b| {
                let d = match b {
                    b'0'..=b'9' => b - b'0',
                    b'A'..=b'Z' => b - b'A' + 10,
                    _ => b - b'a' + 36,
                };
                acc * 62 + d as u64
            })
    }

    #[test]
    fn ids_carry_their_time_and_sort_by_it() {
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        let t0 = now();
        let ids: Vec<String> = (0..2000).map(|_| new_request_id()).collect();
        let t1 = now();
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes().skip(4).all(|b| b.is_ascii_alphanumeric()),
                "{id}"
            );
            assert!((t0..=t1).contains(&millis(id)), "{id}: {t0}..{t1}");
        }
        // Created later sorts later (the prefix is fixed-width, in ASCII order).
        for w in ids.windows(2) {
            assert!(w[0][..12] <= w[1][..12], "{} then {}", w[0], w[1]);
        }
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }
}
