//! `FallbackLayer`: walks the plan until an endpoint commits its first content chunk.
//!
//! Turns a typed `Service<ProviderCall>` (metering around the provider client) into a
//! `Service<ChatCall>`. Each attempt is recorded in the call context (provider, status,
//! latency). An attempt that fails — an error status, a timeout, or a stream that
//! errors before its first content or tool-call chunk — is classified once
//! ([`ProviderError::class`]): retriable and failover failures move on to the next
//! endpoint at once; client faults (400, 413, 422…) go back as they are. The reply is
//! returned only when the first content chunk is ready (SPEC §3.1's commit point);
//! nothing is retried after it.
//!
//! Retry rules (SPEC §5, `[retry]`): a different endpoint is tried at once; when the
//! plan is exhausted and attempts remain, it is walked again, and an endpoint is
//! re-tried only after its backoff (`base_backoff_ms` doubling up to `max_backoff_ms`,
//! or the upstream's `Retry-After` when longer; a `Retry-After` longer than
//! `max_backoff_ms` is left to the client, as a 429). At most `max_attempts` attempts,
//! never past the request's deadline. Failover failures (401/402/403/404) are not
//! re-tried on the same endpoint.
//!
//! Health (shared with [`HealthFilterLayer`](crate::health::HealthFilterLayer)):
//! each attempt takes a [`Permit`] (a degraded endpoint, or one whose single probe is
//! taken, is skipped without being contacted) and records its outcome; the time to
//! first token is observed at commit, the throughput when the stream ends. When the
//! plan is a last resort (every candidate degraded), its one failure answers 503.
//!
//! Final errors (SPEC §3.2): 429 with `Retry-After` when every attempt was
//! rate-limited, 504 when the last attempt timed out, else 502 listing every attempt.
//!
//! Metrics: `switchboard_endpoint_attempts_total{model,provider,outcome}`,
//! `switchboard_endpoint_failures_total{model,provider,class,status}`,
//! `switchboard_fallbacks_total` (counted once per request, from its record, by
//! [`telemetry`](crate::telemetry)).
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use switchboard::{catalog::Catalog, config::{Config, RetryConfig}};
//! use switchboard::context::{CallContext, ChatCall, ProviderCall};
//! use switchboard::chat::{ChatChunk, ChatRequest, Message, Role};
//! use switchboard::error::{GatewayError, ProviderError};
//! use switchboard::fallback::FallbackLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let catalog = Catalog::from_config(&Config::demo());
//! let svc = ServiceBuilder::new()
//!     .layer(FallbackLayer::new(RetryConfig::default()))
//!     .service(service_fn(|call: ProviderCall| async move {
//!         if call.endpoint.upstream_model == "echo" {
//!             return Err(ProviderError::status("mock", 503, "busy").into());
//!         }
//!         let s: switchboard::context::ChunkStream =
//!             Box::pin(futures_util::stream::iter([Ok(ChatChunk::text("hello"))]));
//!         Ok::<_, GatewayError>(s)
//!     }));
//! let mut call = ChatCall::new(ChatRequest {
//!     model: "mock/echo".into(),
//!     messages: vec![Message::text(Role::User, "hi")],
//!     ..Default::default()
//! }, CallContext::new());
//! call.plan = catalog.endpoints().to_vec(); // echo first, then lorem
//! let ctx = call.ctx.clone();
//! let reply = svc.oneshot(call).await.unwrap();
//! assert_eq!(reply.endpoint.model.as_ref(), "mock/lorem");
//! assert_eq!(ctx.snapshot().attempts.len(), 2);
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{stream, Stream, StreamExt};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::catalog::Endpoint;
use crate::config::{HealthConfig, RetryConfig};
use crate::context::{AttemptRecord, CallContext, ChatCall, ChatReply, ChunkStream, ProviderCall};
use crate::error::{FailureClass, FailureKind, GatewayError, ProviderError};
use crate::health::{HealthRegistry, InMemoryHealth, Permit, PermitKind};

/// Builds [`Fallback`] services.
#[derive(Clone)]
pub struct FallbackLayer {
    retry: RetryConfig,
    health: Arc<dyn HealthRegistry>,
}

impl FallbackLayer {
    /// Falls back under the `[retry]` settings. Health is not tracked until
    /// [`FallbackLayer::health`] gives the registry shared with
    /// [`HealthFilterLayer`](crate::health::HealthFilterLayer).
    pub fn new(retry: RetryConfig) -> Self {
        FallbackLayer {
            retry,
            health: Arc::new(InMemoryHealth::new(&HealthConfig::default(), 0)),
        }
    }

    /// Records every attempt's outcome (and observed speed) in `registry`, and takes
    /// a permit from it per attempt.
    pub fn health(mut self, registry: Arc<dyn HealthRegistry>) -> Self {
        self.health = registry;
        self
    }
}

impl std::fmt::Debug for FallbackLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;
    fn layer(&self, inner: S) -> Fallback<S> {
        Fallback {
            inner,
            retry: self.retry.clone(),
            health: self.health.clone(),
        }
    }
}

/// Tries the plan's endpoints in turn; see the [module docs](self).
#[derive(Clone)]
pub struct Fallback<S> {
    inner: S,
    retry: RetryConfig,
    health: Arc<dyn HealthRegistry>,
}

impl<S> std::fmt::Debug for Fallback<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fallback")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl<S> Fallback<S> {
    /// Wraps `inner` (health untracked; see [`FallbackLayer::health`]).
    pub fn new(inner: S, retry: RetryConfig) -> Self {
        FallbackLayer::new(retry).layer(inner)
    }

    /// A [`FallbackLayer`].
    pub fn layer(retry: RetryConfig) -> FallbackLayer {
        FallbackLayer::new(retry)
    }
}

impl<S> Service<ChatCall> for Fallback<S>
where
    S: Service<ProviderCall, Response = ChunkStream, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = ChatReply;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<ChatReply, GatewayError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is taken per attempt inside `call`, since it calls `inner` many times.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: ChatCall) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(run(inner, call, self.retry.clone(), self.health.clone()))
    }
}

/// The wait before the `n`th re-try (n ≥ 1) of the same endpoint: `base_backoff_ms`
/// doubling each time, at most `max_backoff_ms`.
pub fn backoff(retry: &RetryConfig, n: u32) -> Duration {
    let factor = 1u64 << n.saturating_sub(1).min(32);
    Duration::from_millis(
        retry
            .base_backoff_ms
            .saturating_mul(factor)
            .min(retry.max_backoff_ms),
    )
}

/// What one attempt came to.
enum Outcome {
    Committed(ChatReply),
    Failed(ProviderError),
}

/// Per plan entry: how retrying it stands.
#[derive(Clone, Copy, Default)]
struct Track {
    tries: u32,
    last_end: Option<Instant>,
    retry_after: Option<Duration>,
    done: bool,
}

async fn run<S>(
    inner: S,
    call: ChatCall,
    retry: RetryConfig,
    health: Arc<dyn HealthRegistry>,
) -> Result<ChatReply, GatewayError>
where
    S: Service<ProviderCall, Response = ChunkStream, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send,
{
    if call.plan.is_empty() {
        return Err(GatewayError::NoEndpoints(format!(
            "no endpoint can serve `{}`",
            call.request.model
        )));
    }
    let max_attempts = retry.max_attempts.max(1) as usize;
    let last_resort = call.ctx.update(|s| s.last_resort);
    let deadline = call.ctx.deadline().map(Instant::from_std);
    let max_wait = Duration::from_millis(retry.max_backoff_ms);
    let mut track = vec![Track::default(); call.plan.len()];
    let mut failures: Vec<ProviderError> = Vec::new();
    // Round after round over the plan: a different endpoint at once, the same one only
    // after its backoff (and its Retry-After).
    'rounds: loop {
        let mut tried = false;
        for (i, endpoint) in call.plan.iter().enumerate() {
            if failures.len() >= max_attempts {
                break 'rounds;
            }
            let t = track[i];
            if t.done {
                continue;
            }
            if let Some(last_end) = t.last_end {
                if last_resort || t.retry_after.is_some_and(|r| r > max_wait) {
                    // A last resort is tried once; a long Retry-After goes to the client.
                    track[i].done = true;
                    continue;
                }
                let wait = backoff(&retry, t.tries).max(t.retry_after.unwrap_or_default());
                let at = last_end + wait;
                if deadline.is_some_and(|d| at >= d) {
                    track[i].done = true;
                    continue;
                }
                tokio::time::sleep_until(at).await;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break 'rounds;
            }
            let Some(permit) = Permit::acquire(&health, endpoint, last_resort) else {
                // Degraded, parked, or its one probe taken by another request: skipped
                // without being contacted.
                track[i].done = true;
                continue;
            };
            tried = true;
            let pc = ProviderCall {
                endpoint: endpoint.clone(),
                request: call.request.clone(),
                ctx: call.ctx.clone(),
            };
            // OpenTelemetry export on: a child span of the request's, which the
            // upstream request's `traceparent` names. Off: one atomic load.
            crate::otel::attempt_span(&call.ctx, &call.request, endpoint);
            let outcome = attempt(inner.clone(), pc, permit, &health, deadline).await?;
            let e = match outcome {
                Outcome::Committed(reply) => {
                    crate::otel::attempt_served(&call.ctx);
                    return Ok(reply);
                }
                Outcome::Failed(e) => e,
            };
            crate::otel::attempt_failed(&call.ctx, &e.label());
            // Failed attempts cost nothing.
            call.ctx.update(|s| {
                s.usage = None;
                s.cost = crate::money::Money::ZERO;
            });
            let class = e.class();
            if class == FailureClass::Client {
                return Err(e.into());
            }
            track[i] = Track {
                tries: t.tries + 1,
                last_end: Some(Instant::now()),
                retry_after: e.retry_after,
                // Our key or catalogue at fault: the same endpoint will say the same.
                done: class == FailureClass::Failover,
            };
            let out_of_time = e.message == DEADLINE;
            failures.push(e);
            if out_of_time {
                break 'rounds;
            }
        }
        if !tried {
            break;
        }
    }
    if failures.is_empty() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(GatewayError::UpstreamTimeout(
                "the request deadline passed before an endpoint answered".into(),
            ));
        }
        return Err(GatewayError::NoHealthyProvider(format!(
            "every endpoint of `{}` is degraded or being probed; try again shortly",
            call.request.model
        )));
    }
    if last_resort {
        return Err(GatewayError::NoHealthyProvider(format!(
            "every endpoint of `{}` is degraded; the last-resort attempt failed too: {}",
            call.request.model,
            failures
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    Err(final_error(failures))
}

/// The message of a failure made up when the request deadline cut an attempt.
const DEADLINE: &str = "the request deadline ([server].request_timeout_secs) passed";

/// One attempt: call, then read until the first content chunk.
async fn attempt<S>(
    inner: S,
    pc: ProviderCall,
    permit: Permit,
    health: &Arc<dyn HealthRegistry>,
    deadline: Option<Instant>,
) -> Result<Outcome, GatewayError>
where
    S: Service<ProviderCall, Response = ChunkStream, Error = GatewayError>,
{
    let started = Instant::now();
    let ctx = pc.ctx.clone();
    let endpoint = pc.endpoint.clone();
    let work = first_content(inner, pc);
    let result = match deadline {
        Some(d) => match tokio::time::timeout_at(d, work).await {
            Ok(r) => r,
            Err(_) => {
                // Cut by the request's deadline, not the provider's timeout: no news of
                // the endpoint's health, so the permit is released unrecorded.
                drop(permit);
                let e = ProviderError::new(
                    endpoint.provider.name.clone(),
                    FailureKind::Timeout,
                    DEADLINE,
                );
                record(&ctx, &endpoint, e.label(), started.elapsed());
                count_attempt(&endpoint, Some(&e));
                return Ok(Outcome::Failed(e));
            }
        },
        None => work.await,
    };
    let (held, upstream) = match result {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            record(&ctx, &endpoint, e.label(), started.elapsed());
            count_attempt(&endpoint, Some(&e));
            permit.failure(&e);
            return Ok(Outcome::Failed(e));
        }
        Err(other) => return Err(other),
    };
    let latency = started.elapsed();
    record(&ctx, &endpoint, "200".into(), latency);
    count_attempt(&endpoint, None);
    if permit.kind() != PermitKind::Normal {
        tracing::info!(endpoint = %endpoint.label(), "probe succeeded");
    }
    permit.success();
    let now = Instant::now();
    health.observe_ttft(&endpoint, latency, now);
    ctx.update(|s| {
        s.served = Some(endpoint.clone());
        s.ttft.get_or_insert(latency);
    });
    let chunks: ChunkStream = Box::pin(stream::iter(held.into_iter().map(Ok)).chain(upstream));
    let chunks: ChunkStream = Box::pin(Observed {
        inner: chunks,
        health: health.clone(),
        endpoint: endpoint.clone(),
        started,
        committed: now,
        tokens: 0,
        reported: None,
        ended: false,
    });
    Ok(Outcome::Committed(ChatReply { endpoint, chunks }))
}

type Held = (Vec<crate::chat::ChatChunk>, ChunkStream);

/// Calls the provider and reads until the first content chunk: `Ok(Err(_))` is the
/// attempt's failure, `Err(_)` a non-provider error that ends the request.
async fn first_content<S>(
    inner: S,
    pc: ProviderCall,
) -> Result<Result<Held, ProviderError>, GatewayError>
where
    S: Service<ProviderCall, Response = ChunkStream, Error = GatewayError>,
{
    let mut upstream = match inner.oneshot(pc).await {
        Ok(s) => s,
        Err(GatewayError::Provider(e)) => return Ok(Err(e)),
        Err(other) => return Err(other),
    };
    let mut held = Vec::new();
    loop {
        match upstream.next().await {
            Some(Ok(chunk)) => {
                let content = chunk.is_content();
                held.push(chunk);
                if content {
                    break;
                }
            }
            Some(Err(GatewayError::Provider(e))) => return Ok(Err(e)),
            Some(Err(other)) => return Err(other),
            // A complete answer without content (e.g. an empty completion) still commits.
            None => break,
        }
    }
    Ok(Ok((held, upstream)))
}

fn count_attempt(endpoint: &Endpoint, failure: Option<&ProviderError>) {
    let outcome = match failure.map(ProviderError::class) {
        None => "success",
        Some(FailureClass::Retriable) => "retriable",
        Some(FailureClass::Failover) => "failover",
        Some(FailureClass::Client) => "client",
    };
    let (model, provider) = (&*endpoint.model, &*endpoint.provider.name);
    crate::telemetry::counter(
        "switchboard_endpoint_attempts_total",
        &[
            ("model", model),
            ("provider", provider),
            ("outcome", outcome),
        ],
    )
    .increment(1);
    if let Some(e) = failure {
        metrics::counter!(
            "switchboard_endpoint_failures_total",
            "model" => model.to_string(),
            "provider" => provider.to_string(),
            "class" => outcome,
            "status" => e.label()
        )
        .increment(1);
    }
}

/// The committed stream, observed: its throughput goes to the health registry when it
/// ends (a stream cut short says nothing reliable and is not observed).
struct Observed {
    inner: ChunkStream,
    health: Arc<dyn HealthRegistry>,
    endpoint: Arc<Endpoint>,
    started: Instant,
    committed: Instant,
    tokens: u64,
    reported: Option<u64>,
    ended: bool,
}

impl Stream for Observed {
    type Item = Result<crate::chat::ChatChunk, GatewayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.inner.as_mut().poll_next(cx);
        match &item {
            Poll::Ready(Some(Ok(chunk))) => {
                if chunk.is_content() {
                    self.tokens += 1;
                }
                if let Some(u) = &chunk.usage {
                    self.reported = Some(u.completion_tokens);
                }
            }
            Poll::Ready(None) if !self.ended => {
                self.ended = true;
                let now = Instant::now();
                let tokens = self.reported.unwrap_or(self.tokens);
                // Generation time after the first token; for a one-chunk answer, the
                // whole attempt.
                let mut span = now.saturating_duration_since(self.committed);
                if span < Duration::from_millis(1) {
                    span = now.saturating_duration_since(self.started);
                }
                if tokens > 0 && span >= Duration::from_millis(1) {
                    self.health.observe_throughput(
                        &self.endpoint,
                        tokens as f64 / span.as_secs_f64(),
                        now,
                    );
                }
            }
            _ => {}
        }
        item
    }
}

fn record(ctx: &CallContext, endpoint: &Arc<Endpoint>, status: String, latency: Duration) {
    ctx.update(|s| {
        // Most requests make one attempt; the record lives as long as the stream.
        s.attempts.reserve_exact(1);
        s.attempts.push(AttemptRecord {
            provider: endpoint.provider.name.clone(),
            model: endpoint.model.clone(),
            status,
            latency,
        })
    });
}

/// The client's error when every attempt failed (SPEC §3.2): 429 when all were
/// rate-limited, 504 when the last timed out, else 502 listing every attempt.
pub fn final_error(failures: Vec<ProviderError>) -> GatewayError {
    let Some(last) = failures.last() else {
        return GatewayError::UpstreamError("no attempt was made".into());
    };
    let list = failures
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    let summary = format!("all {} attempt(s) failed: {list}", failures.len());
    if failures.iter().all(ProviderError::is_rate_limit) {
        let retry_after = failures.iter().filter_map(|f| f.retry_after).min();
        return GatewayError::RateLimited {
            message: summary,
            retry_after: retry_after.or(Some(Duration::from_secs(1))),
        };
    }
    if last.is_timeout() {
        return GatewayError::UpstreamTimeout(summary);
    }
    GatewayError::UpstreamError(summary)
}

#[cfg(test)]
mod tests;
