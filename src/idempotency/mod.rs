//! `IdempotencyLayer`: a request repeated with the same `Idempotency-Key` gets the
//! first one's answer again, and is charged once (SPEC §8.2).
//!
//! - The header: 1–255 printable ASCII characters, else 400 `invalid_request`. Its
//!   scope is the authenticated key (the `Arc<KeyRecord>` that
//!   [`AuthLayer`](crate::auth::AuthLayer) put in the request's extensions): keys
//!   never see each other's answers. A request without the header, without a key,
//!   or on a ledger that keeps no records
//!   ([`Ledger::keeps_idempotency_records`]) passes through untouched.
//! - The request's fingerprint is the SHA-256 of its path (`/v1` and `/api/v1` alike)
//!   and its body as canonical JSON (key order and whitespace do not matter): a repeat
//!   with another one is refused with 422 `idempotency_key_reused`.
//! - **The first request runs**, marked so that [`CreditLayer`](crate::credit::CreditLayer)
//!   parks its settlement in the [`CallContext`] instead of committing it. The
//!   response body passes through this layer's wrapper, which keeps a copy of every
//!   byte; once the settlement is parked (the upstream answer is complete) it holds
//!   back what follows (`[DONE]`, or a non-stream body), and when the body ends it
//!   commits the settlement and the record of the answer (status, `X-Request-Id`,
//!   `X-Provider`, `X-Model-Used`, `Content-Type` and the SSE headers, every body
//!   byte) in **one** ledger commit ([`Ledger::settle_recorded`]), and only then
//!   sends the rest. A crash (SIGKILL included) therefore leaves both or neither:
//!   a repeat after it replays the answer, or runs again — charged once either way.
//! - **Not recorded**: an answer that is not a 200, a stream that ended in an error
//!   chunk or was cut, one the client left, or one over 64 MiB. Its settlement is
//!   committed alone (it was charged as any request is), and a repeat runs again. A
//!   request that made no settlement (refused before credit, or answered by a cache)
//!   records nothing either.
//! - **A repeat** gets the recorded status, headers and body bytes, plus
//!   `Idempotent-Replayed: true`: no upstream call, no charge, the original
//!   `X-Request-Id` and ids (it is the same answer). A repeat that arrives while the
//!   first is running waits for it (in this process: on the first's claim; across
//!   instances of a shared store: by polling for the record or the store's lock,
//!   [`Ledger::idempotency_lock`]), then replays its answer, or runs itself if the
//!   first was not recorded. It waits at most the request timeout (then 504). The
//!   gauge `switchboard_idempotency_waiting` counts the repeats waiting now.
//! - Records are kept `[idempotency].ttl_secs` (default a day), then purged by the
//!   store.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use switchboard::auth::AuthLayer;
//! use switchboard::catalog::Catalog;
//! use switchboard::config::{Config, RetryConfig, StoreConfig};
//! use switchboard::credit::CreditLayer;
//! use switchboard::fallback::FallbackLayer;
//! use switchboard::idempotency::IdempotencyLayer;
//! use switchboard::metering::MeteringLayer;
//! use switchboard::normalize::NormalizeLayer;
//! use switchboard::providers::ProviderClient;
//! use switchboard::route::RouteLayer;
//! use switchboard::store::{hash_secret, KeyStore, Ledger, NewKey, SqliteStore};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = SqliteStore::open(&StoreConfig { url: "sqlite::memory:".into(), ..Default::default() }).unwrap();
//! let key = store.create(hash_secret("sk-alice"), NewKey::new("alice", "1".parse().unwrap())).unwrap();
//! let typed = ServiceBuilder::new()
//!     .layer(RouteLayer::new(Arc::new(Catalog::from_config(&Config::demo()))))
//!     .layer(CreditLayer::new(store.clone()))
//!     .layer(FallbackLayer::new(RetryConfig::default()))
//!     .layer(MeteringLayer::new())
//!     .service(ProviderClient::default());
//! let svc = ServiceBuilder::new()
//!     .layer(AuthLayer::new(store.clone()))
//!     .layer(IdempotencyLayer::new(store.clone()))
//!     .layer(NormalizeLayer::new())
//!     .service(typed);
//! let request = || {
//!     http::Request::post("/v1/chat/completions")
//!         .header("authorization", "Bearer sk-alice")
//!         .header("idempotency-key", "order-42")
//!         .body(axum::body::Body::from(r#"{"model":"mock/echo","messages":[{"role":"user","content":"hi"}]}"#))
//!         .unwrap()
//! };
//! let first = svc.clone().oneshot(request()).await.unwrap();
//! let first_id = first.headers()["x-request-id"].clone();
//! let first_body = axum::body::to_bytes(first.into_body(), usize::MAX).await.unwrap();
//! let spent = store.balance(&key.record.id).unwrap().spent;
//!
//! let again = svc.oneshot(request()).await.unwrap();
//! assert_eq!(again.headers()["idempotent-replayed"], "true");
//! assert_eq!(again.headers()["x-request-id"], first_id);
//! assert_eq!(axum::body::to_bytes(again.into_body(), usize::MAX).await.unwrap(), first_body);
//! assert_eq!(store.balance(&key.record.id).unwrap().spent, spent, "charged once");
//! # }
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{header, Request, Response};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tower::{Layer, Service, ServiceExt};

use crate::context::CallContext;
use crate::error::{Body, GatewayError};
use crate::keys::KeyRecord;
use crate::store::{IdempotencyLock, IdempotencyRecord, Ledger};

mod body;
mod flight;

use body::RecordingBody;
use flight::{Claim, Claimed, Flights};

/// `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// `Idempotent-Replayed`, `true` on a replayed answer.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// The longest `Idempotency-Key`.
pub const MAX_KEY_LEN: usize = 255;

/// The response headers recorded with an answer and replayed with it.
const RECORDED_HEADERS: [&str; 6] = [
    "content-type",
    "cache-control",
    "x-accel-buffering",
    crate::normalize::X_REQUEST_ID,
    crate::normalize::X_PROVIDER,
    crate::normalize::X_MODEL_USED,
];

/// How long a repeat waiting for another instance's first request waits between
/// looks, at first and at most.
const POLL_FIRST: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(500);

/// A clock in Unix seconds.
type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Builds [`Idempotency`] services; clones share their in-process claims.
#[derive(Clone)]
pub struct IdempotencyLayer {
    ledger: Arc<dyn Ledger>,
    ttl: Duration,
    max_body_bytes: usize,
    wait: Duration,
    clock: Clock,
    flights: Arc<Flights>,
}

impl std::fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("ttl", &self.ttl)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// Records through `ledger`; answers kept a day, bodies up to 10 MiB, repeats
    /// wait up to 600 s (SPEC defaults).
    pub fn new(ledger: Arc<dyn Ledger>) -> Self {
        IdempotencyLayer {
            ledger,
            ttl: Duration::from_secs(86_400),
            max_body_bytes: 10_485_760,
            wait: Duration::from_secs(600),
            clock: Arc::new(crate::store::now_unix),
            flights: Arc::default(),
        }
    }

    /// How long an answer is replayed (`[idempotency].ttl_secs`).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Larger request bodies get 413 (`[server].max_body_bytes`: this layer reads the
    /// body to fingerprint it).
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }

    /// How long a repeat waits for the first request (`[server].request_timeout_secs`).
    pub fn wait_timeout(mut self, d: Duration) -> Self {
        self.wait = d;
        self
    }

    /// The clock (Unix seconds) that dates records and decides what has expired
    /// (default: the system's; tests inject their own).
    pub fn clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;
    fn layer(&self, inner: S) -> Idempotency<S> {
        Idempotency {
            inner,
            layer: Arc::new(self.clone()),
        }
    }
}

/// Records first answers and replays them; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Idempotency<S> {
    inner: S,
    layer: Arc<IdempotencyLayer>,
}

impl<S> Idempotency<S> {
    /// Wraps `inner`, recording through `ledger`.
    pub fn new(inner: S, ledger: Arc<dyn Ledger>) -> Self {
        IdempotencyLayer::new(ledger).layer(inner)
    }

    /// An [`IdempotencyLayer`].
    pub fn layer(ledger: Arc<dyn Ledger>) -> IdempotencyLayer {
        IdempotencyLayer::new(ledger)
    }
}

/// What the record of a first answer needs besides its body.
pub(crate) struct Pending {
    key_id: String,
    idem_key: String,
    fingerprint: [u8; 32],
    status: u16,
    headers: Vec<(String, String)>,
    created: u64,
    ttl: u64,
}

impl Pending {
    fn into_record(self, body: Bytes) -> IdempotencyRecord {
        IdempotencyRecord {
            key_id: self.key_id,
            idem_key: self.idem_key,
            fingerprint: self.fingerprint,
            status: self.status,
            headers: self.headers,
            body,
            created: self.created,
            expires: self.created.saturating_add(self.ttl),
        }
    }
}

/// The `Idempotency-Key` of a request, `Ok(None)` without one, or the 400.
pub fn idempotency_key(headers: &http::HeaderMap) -> Result<Option<String>, GatewayError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(GatewayError::InvalidRequest(
            "send one `Idempotency-Key` header, not several".into(),
        ));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_KEY_LEN {
        return Err(GatewayError::InvalidRequest(format!(
            "`Idempotency-Key` must be 1 to {MAX_KEY_LEN} characters, got {}",
            bytes.len()
        )));
    }
    if !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(GatewayError::InvalidRequest(
            "`Idempotency-Key` must be printable ASCII characters".into(),
        ));
    }
    // Printable ASCII: valid UTF-8.
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// The fingerprint of a request: its endpoint (the path without `/api` and `/v1`)
/// and its body as canonical JSON.
fn fingerprint(path: &str, body: &[u8]) -> [u8; 32] {
    let endpoint = path.strip_prefix("/api").unwrap_or(path);
    let endpoint = endpoint.strip_prefix("/v1").unwrap_or(endpoint);
    let mut h = Sha256::new();
    h.update(endpoint.as_bytes());
    h.update([0]);
    h.update(crate::canonical::canonical_digest(body));
    h.finalize().into()
}

impl<S> Service<Request<Body>> for Idempotency<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures_util::future::Either<
        S::Future,
        BoxFuture<'static, Result<Response<Body>, Infallible>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        use futures_util::future::Either;
        let refused = |e: GatewayError| -> Self::Future {
            Either::Right(Box::pin(std::future::ready(Ok(e.into_response()))))
        };
        let idem_key = match idempotency_key(req.headers()) {
            Ok(Some(k)) => k,
            // No header (the usual case): `inner` is called here, nothing boxed.
            Ok(None) => return Either::Left(self.inner.call(req)),
            Err(e) => return refused(e),
        };
        let key_id = match req.extensions().get::<Arc<KeyRecord>>() {
            Some(k) if self.layer.ledger.keeps_idempotency_records() => k.id.clone(),
            // No key to scope it to, or a ledger without records: as if no header.
            _ => return Either::Left(self.inner.call(req)),
        };
        // `inner` is called later, in the future: take the service we readied and
        // leave a clone in its place (tower-service's "be careful when cloning
        // inner services").
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Either::Right(Box::pin(async move {
            Ok(
                match first_or_repeat(layer, inner, req, key_id, idem_key).await {
                    Ok(res) => res,
                    Err(e) => e.into_response(),
                },
            )
        }))
    }
}

/// Reads the body, then replays, refuses, waits or runs (see the module docs).
async fn first_or_repeat<S>(
    layer: Arc<IdempotencyLayer>,
    inner: S,
    req: Request<Body>,
    key_id: String,
    idem_key: String,
) -> Result<Response<Body>, GatewayError>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let deadline = tokio::time::Instant::now() + layer.wait;
    let (mut parts, body) = req.into_parts();
    let bytes = read_body(&parts.headers, body, layer.max_body_bytes, deadline).await?;
    let fp = fingerprint(parts.uri.path(), &bytes);
    let ctx = match parts.extensions.get::<CallContext>() {
        Some(ctx) => ctx.clone(),
        None => {
            let ctx = CallContext::new();
            parts.extensions.insert(ctx.clone());
            ctx
        }
    };
    let ledger = &layer.ledger;
    let mut backoff = POLL_FIRST;
    // Counted in `switchboard_idempotency_waiting` from its first wait until it
    // replays, runs or gives up.
    let mut waiting = None;
    let (claim, lock) = loop {
        if let Some(record) = ledger
            .idempotency_record(&key_id, &idem_key, (layer.clock)())
            .await?
        {
            return replay_or_refuse(&record, &fp, &ctx);
        }
        match layer.flights.claim((key_id.clone(), idem_key.clone()), fp) {
            Claimed::Busy {
                fingerprint,
                mut done,
            } => {
                if fingerprint != fp {
                    return Err(reused());
                }
                // Wait for this process's first request, then look again.
                waiting.get_or_insert_with(|| layer.flights.waiting());
                if tokio::time::timeout_at(deadline, done.wait_for(|d| *d))
                    .await
                    .is_err()
                {
                    return Err(still_running());
                }
            }
            Claimed::Mine(claim) => match ledger.idempotency_lock(&key_id, &idem_key).await? {
                Some(lock) => break (claim, lock),
                None => {
                    // Another instance runs it: look again in a moment.
                    drop(claim);
                    if tokio::time::Instant::now() + backoff >= deadline {
                        return Err(still_running());
                    }
                    waiting.get_or_insert_with(|| layer.flights.waiting());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(POLL_MAX);
                }
            },
        }
    };
    drop(waiting);
    // Recorded between the first look and the claim.
    if let Some(record) = ledger
        .idempotency_record(&key_id, &idem_key, (layer.clock)())
        .await?
    {
        return replay_or_refuse(&record, &fp, &ctx);
    }
    run_first(
        &layer,
        inner,
        Request::from_parts(parts, Body::from(bytes)),
        ctx,
        claim,
        lock,
        key_id,
        idem_key,
        fp,
    )
    .await
}

/// Runs the first request of a key, its settlement deferred to this layer's body.
#[allow(clippy::too_many_arguments)]
async fn run_first<S>(
    layer: &IdempotencyLayer,
    inner: S,
    req: Request<Body>,
    ctx: CallContext,
    claim: Claim,
    lock: IdempotencyLock,
    key_id: String,
    idem_key: String,
    fingerprint: [u8; 32],
) -> Result<Response<Body>, GatewayError>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    ctx.defer_settlement();
    let Ok(res) = inner.oneshot(req).await;
    let (parts, body) = res.into_parts();
    let pending = (parts.status == http::StatusCode::OK).then(|| Pending {
        key_id,
        idem_key,
        fingerprint,
        status: parts.status.as_u16(),
        headers: RECORDED_HEADERS
            .iter()
            .flat_map(|name| {
                parts
                    .headers
                    .get_all(*name)
                    .iter()
                    .filter_map(|v| Some(((*name).to_string(), v.to_str().ok()?.to_string())))
            })
            .collect(),
        created: (layer.clock)(),
        ttl: layer.ttl.as_secs(),
    });
    let body = RecordingBody::new(body, ctx, pending, claim, lock, layer.clock.clone());
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// The recorded answer, or 422 when the repeat is not the same request.
fn replay_or_refuse(
    record: &IdempotencyRecord,
    fp: &[u8; 32],
    ctx: &CallContext,
) -> Result<Response<Body>, GatewayError> {
    if &record.fingerprint != fp {
        return Err(reused());
    }
    ctx.update(|s| s.status = record.status);
    Ok(body::replay(record))
}

fn reused() -> GatewayError {
    GatewayError::IdempotencyKeyReused(
        "this Idempotency-Key was used with a different request; use a new key for a new request"
            .into(),
    )
}

fn still_running() -> GatewayError {
    GatewayError::UpstreamTimeout(
        "a request with this Idempotency-Key is still running and did not finish within [server].request_timeout_secs; retry later with the same key".into(),
    )
}

/// Reads the request body under `limit` (413) before `deadline` (408).
async fn read_body(
    headers: &http::HeaderMap,
    body: Body,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Result<Bytes, GatewayError> {
    let too_large = || {
        GatewayError::PayloadTooLarge(format!(
            "the request body is larger than {limit} bytes ([server].max_body_bytes)"
        ))
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|len| len > limit as u64)
    {
        return Err(too_large());
    }
    let read = http_body_util::Limited::new(body, limit).collect();
    match tokio::time::timeout_at(deadline, read).await {
        Err(_) => Err(crate::normalize::body_timed_out()),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Ok(Err(e)) => Err(GatewayError::InvalidRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests;
