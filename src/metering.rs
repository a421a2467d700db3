//! `MeteringLayer`: counts and prices the tokens of each attempt as its chunks pass.
//!
//! Sits around the provider client. Uses the provider's reported usage; when a stream
//! ends without one, it counts with the model's tokenizer — the prompt as the provider
//! would see it and exactly the text and tool arguments delivered — and sends a usage
//! chunk of its own. Every usage chunk leaves with `usage.cost` set at the endpoint's
//! prices, and the priced usage is written to the call context, where credit
//! settlement reads it. A stream dropped mid-way (the client went away) is metered for
//! what passed up to the cut, from its `Drop`.
//!
//! # Example
//! ```
//! use switchboard::{catalog::Catalog, config::Config, metering::MeteringLayer};
//! use switchboard::context::{CallContext, ProviderCall, ChunkStream};
//! use switchboard::chat::{ChatChunk, ChatRequest, Message, Role, Usage};
//! use switchboard::error::GatewayError;
//! use futures_util::TryStreamExt;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let catalog = Catalog::from_config(&Config::demo()); // $1 / $2 per Mtok
//! let svc = ServiceBuilder::new().layer(MeteringLayer::new()).service(service_fn(|_c: ProviderCall| async {
//!     let s: ChunkStream = Box::pin(futures_util::stream::iter([
//!         Ok(ChatChunk::text("hi")),
//!         Ok(ChatChunk::usage(Usage::new(1_000, 500))),
//!     ]));
//!     Ok::<_, GatewayError>(s)
//! }));
//! let ctx = CallContext::new();
//! let call = ProviderCall {
//!     endpoint: catalog.endpoints()[0].clone(),
//!     request: ChatRequest { model: "mock/echo".into(), messages: vec![Message::text(Role::User, "x")], ..Default::default() }.into(),
//!     ctx: ctx.clone(),
//! };
//! let chunks: Vec<ChatChunk> = svc.oneshot(call).await.unwrap().try_collect().await.unwrap();
//! let cost = chunks[1].usage.as_ref().unwrap().cost.unwrap();
//! assert_eq!(cost.to_string(), "0.002"); // 1000 × $1/M + 500 × $2/M
//! assert_eq!(ctx.snapshot().cost, cost);
//! # }
//! ```

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, Stream};
use tower::{Layer, Service};

use crate::catalog::Endpoint;
use crate::chat::{ChatChunk, ChatRequest, Content, Usage};
use crate::context::{CallContext, ChunkStream, ProviderCall};
use crate::error::GatewayError;

/// Builds [`Metering`] services.
#[derive(Debug, Clone, Default)]
pub struct MeteringLayer {
    _priv: (),
}

impl MeteringLayer {
    /// A metering layer.
    pub fn new() -> Self {
        MeteringLayer { _priv: () }
    }
}

impl<S> Layer<S> for MeteringLayer {
    type Service = Metering<S>;
    fn layer(&self, inner: S) -> Metering<S> {
        Metering { inner }
    }
}

/// Meters each attempt's chunks; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Metering<S> {
    inner: S,
}

impl<S> Metering<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Metering { inner }
    }

    /// A [`MeteringLayer`].
    pub fn layer() -> MeteringLayer {
        MeteringLayer::new()
    }
}

impl<S> Service<ProviderCall> for Metering<S>
where
    S: Service<ProviderCall, Response = ChunkStream, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = ChunkStream;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<ChunkStream, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: ProviderCall) -> Self::Future {
        let endpoint = call.endpoint.clone();
        let request = call.request.clone();
        let ctx = call.ctx.clone();
        self.inner
            .call(call)
            .map(move |r| {
                r.map(|inner| -> ChunkStream {
                    Box::pin(Metered {
                        inner,
                        meter: Meter::new(endpoint, request, ctx),
                        ended: false,
                    })
                })
            })
            .boxed()
    }
}

/// The running count of one attempt.
struct Meter {
    endpoint: Arc<Endpoint>,
    request: Arc<ChatRequest>,
    ctx: CallContext,
    /// Text and tool arguments delivered so far (for counting without usage).
    delivered: String,
    /// Whether any content passed (nothing delivered → nothing charged).
    any_content: bool,
    reported: Option<Usage>,
    settled: bool,
}

impl Meter {
    fn new(endpoint: Arc<Endpoint>, request: Arc<ChatRequest>, ctx: CallContext) -> Self {
        Meter {
            endpoint,
            request,
            ctx,
            delivered: String::new(),
            any_content: false,
            reported: None,
            settled: false,
        }
    }

    /// Observes a chunk; prices its usage in place.
    fn observe(&mut self, chunk: &mut ChatChunk) {
        for c in &chunk.choices {
            if let Some(t) = &c.delta.content {
                self.delivered.push_str(t);
            }
            if let Some(t) = &c.delta.reasoning {
                self.delivered.push_str(t);
            }
            for tc in c.delta.tool_calls.iter().flatten() {
                if let Some(f) = &tc.function {
                    if let Some(n) = &f.name {
                        self.delivered.push_str(n);
                    }
                    if let Some(a) = &f.arguments {
                        self.delivered.push_str(a);
                    }
                }
            }
        }
        if chunk.is_content() {
            self.any_content = true;
        }
        if let Some(usage) = chunk.usage.as_mut() {
            self.price(usage);
            self.reported = Some(usage.clone());
            self.record(usage.clone());
        }
        if let Some(f) = chunk.finish_reason() {
            let f = f.to_string();
            self.ctx.update(|s| s.finish_reason = Some(f));
        }
    }

    fn price(&self, usage: &mut Usage) {
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
        // SPEC §4: a request that delivers no completion tokens is not charged, and
        // `usage.cost` is the debit, so it is zero too.
        usage.cost = Some(if usage.completion_tokens == 0 {
            crate::money::Money::ZERO
        } else {
            self.endpoint.pricing.cost(usage)
        });
    }

    fn record(&mut self, usage: Usage) {
        self.settled = true;
        let cost = usage.cost.unwrap_or_default();
        self.ctx.update(|s| {
            s.usage = Some(usage);
            s.cost = cost;
        });
    }

    /// Usage counted with the tokenizer, for a stream that reported none.
    fn counted(&self) -> Usage {
        let tok = &self.endpoint.tokenizer;
        let mut usage = Usage::new(
            prompt_tokens(tok, &self.request),
            crate::tokenize::count(tok, &self.delivered),
        );
        self.price(&mut usage);
        usage
    }

    /// At the end (or cut) of a stream without reported usage: count what passed.
    fn settle_counted(&mut self) -> Option<Usage> {
        if self.settled || self.reported.is_some() {
            return None;
        }
        self.settled = true;
        if !self.any_content {
            return None;
        }
        let usage = self.counted();
        self.record(usage.clone());
        Some(usage)
    }
}

/// The prompt as an OpenAI-style provider counts it: each message's text and tool
/// calls, plus 3 tokens of framing per message and 3 to prime the reply.
pub fn prompt_tokens(tokenizer: &str, req: &ChatRequest) -> u64 {
    let mut n = 3;
    for m in &req.messages {
        n += 3;
        match &m.content {
            Some(Content::Text(t)) => n += crate::tokenize::count(tokenizer, t),
            Some(c @ Content::Parts(_)) => n += crate::tokenize::count(tokenizer, &c.text()),
            None => {}
        }
        for call in m.tool_calls.iter().flatten() {
            n += crate::tokenize::count(tokenizer, &call.function.name);
            n += crate::tokenize::count(tokenizer, &call.function.arguments);
        }
    }
    if let Some(tools) = &req.tools {
        if let Ok(s) = serde_json::to_string(tools) {
            n += crate::tokenize::count(tokenizer, &s);
        }
    }
    n
}

pin_project_lite::pin_project! {
    /// An attempt's chunks, metered.
    struct Metered {
        #[pin]
        inner: ChunkStream,
        meter: Meter,
        ended: bool,
    }

    impl PinnedDrop for Metered {
        fn drop(this: Pin<&mut Self>) {
            // Cut off (client gone, or dropped after an error): meter what passed.
            let this = this.project();
            this.meter.settle_counted();
        }
    }
}

impl Stream for Metered {
    type Item = Result<ChatChunk, GatewayError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        match this.inner.poll_next(cx) {
            Poll::Ready(Some(Ok(mut chunk))) => {
                this.meter.observe(&mut chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(None) => {
                *this.ended = true;
                match this.meter.settle_counted() {
                    Some(usage) => Poll::Ready(Some(Ok(ChatChunk::usage(usage)))),
                    None => Poll::Ready(None),
                }
            }
            other => other,
        }
    }
}
