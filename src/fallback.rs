//! `FallbackLayer`: walks the plan until an endpoint commits its first content chunk.
//!
//! Turns a typed `Service<ProviderCall>` (metering around the provider client) into a
//! `Service<ChatCall>`. Each attempt is recorded in the call context. An attempt that
//! fails — an error status, a timeout, or a stream that errors before its first
//! content or tool-call chunk — is classified once ([`ProviderError::class`]):
//! retriable and failover failures move on to the next endpoint at once; client
//! faults go back as they are. The reply is returned only when the first content
//! chunk is ready (SPEC §3.1's commit point); nothing is retried after it.
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
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};
use tower::{Layer, Service, ServiceExt};

use crate::catalog::Endpoint;
use crate::config::RetryConfig;
use crate::context::{AttemptRecord, CallContext, ChatCall, ChatReply, ChunkStream, ProviderCall};
use crate::error::{FailureClass, GatewayError, ProviderError};

/// Builds [`Fallback`] services.
#[derive(Debug, Clone)]
pub struct FallbackLayer {
    retry: RetryConfig,
}

impl FallbackLayer {
    /// Falls back under the `[retry]` settings.
    pub fn new(retry: RetryConfig) -> Self {
        FallbackLayer { retry }
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;
    fn layer(&self, inner: S) -> Fallback<S> {
        Fallback::new(inner, self.retry.clone())
    }
}

/// Tries the plan's endpoints in turn; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Fallback<S> {
    inner: S,
    retry: RetryConfig,
}

impl<S> Fallback<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, retry: RetryConfig) -> Self {
        Fallback { inner, retry }
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
        let max_attempts = self.retry.max_attempts.max(1) as usize;
        Box::pin(run(inner, call, max_attempts))
    }
}

/// What one attempt came to.
enum Outcome {
    Committed(ChatReply),
    Failed(ProviderError),
}

async fn run<S>(inner: S, call: ChatCall, max_attempts: usize) -> Result<ChatReply, GatewayError>
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
    let mut failures: Vec<ProviderError> = Vec::new();
    for endpoint in call.plan.iter().take(max_attempts) {
        let pc = ProviderCall {
            endpoint: endpoint.clone(),
            request: call.request.clone(),
            ctx: call.ctx.clone(),
        };
        match attempt(inner.clone(), pc).await? {
            Outcome::Committed(reply) => return Ok(reply),
            Outcome::Failed(e) => {
                call.ctx.update(|s| {
                    s.usage = None;
                    s.cost = crate::money::Money::ZERO;
                });
                if e.class() == FailureClass::Client {
                    return Err(e.into());
                }
                failures.push(e);
            }
        }
    }
    Err(final_error(failures))
}

/// One attempt: call, then read until the first content chunk.
async fn attempt<S>(inner: S, pc: ProviderCall) -> Result<Outcome, GatewayError>
where
    S: Service<ProviderCall, Response = ChunkStream, Error = GatewayError>,
{
    let started = Instant::now();
    let ctx = pc.ctx.clone();
    let endpoint = pc.endpoint.clone();
    let result = inner.oneshot(pc).await;
    let mut upstream = match result {
        Ok(s) => s,
        Err(GatewayError::Provider(e)) => {
            record(&ctx, &endpoint, e.label(), started.elapsed());
            return Ok(Outcome::Failed(e));
        }
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
            Some(Err(GatewayError::Provider(e))) => {
                record(&ctx, &endpoint, e.label(), started.elapsed());
                return Ok(Outcome::Failed(e));
            }
            Some(Err(other)) => return Err(other),
            // A complete answer without content (e.g. an empty completion) still commits.
            None => break,
        }
    }
    let latency = started.elapsed();
    record(&ctx, &endpoint, "200".into(), latency);
    ctx.update(|s| {
        s.served = Some(endpoint.clone());
        s.ttft.get_or_insert(latency);
    });
    let chunks: ChunkStream = Box::pin(stream::iter(held.into_iter().map(Ok)).chain(upstream));
    Ok(Outcome::Committed(ChatReply { endpoint, chunks }))
}

fn record(ctx: &CallContext, endpoint: &Arc<Endpoint>, status: String, latency: Duration) {
    ctx.update(|s| {
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
