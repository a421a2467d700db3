//! `MeteringLayer`: counts and prices the tokens of each attempt as its chunks pass.
//!
//! Sits around the provider client. Uses the provider's reported usage; when a stream
//! ends without one, it counts with the model's tokenizer — the prompt as the provider
//! would see it and exactly the text, visible reasoning and tool arguments delivered
//! (tool names and call framing are not counted: SPEC §4 counts "the text and tool
//! arguments delivered") — and sends a usage chunk of its own. Every usage chunk
//! leaves with `usage.cost` set at the endpoint's prices (cache reads and writes at
//! theirs), `prompt_tokens_details.cached_tokens` and
//! `completion_tokens_details.reasoning_tokens` filled in (an embeddings answer, SPEC
//! §7.3, is its prompt tokens at the prompt rate: the upstream's count, else the
//! tokenizer over its inputs), and the priced usage is
//! written to the call context, where credit settlement reads it: `ctx.cost` is
//! exactly the `usage.cost` the client sees.
//!
//! The cost never exceeds the request's [reservation](CallContext::reservation)
//! (SPEC §4: a key is never charged more than admission held for it). A usage report
//! that prices above it, or counts more tokens than were reserved, or is too large to
//! price at all, is a broken upstream answer: the cost is the reservation, and the
//! request is flagged — `CallState::over_reserve` (the request log's `over_reserve`),
//! the metric `switchboard_usage_over_reserve_total{model,provider}`, a warning naming
//! the endpoint, and one failure of the endpoint in the [`HealthRegistry`] given with
//! [`MeteringLayer::health`] (through a [`Permit`], as fallback records attempts).
//!
//! The attempt settles once, when its stream ends, fails (before the error goes up),
//! or is dropped (the client went away; the upstream stream, and with it the upstream
//! connection, is dropped right after). A cut stream is charged for the prompt and
//! what was delivered up to the cut; a usage report that came after the finish stands
//! even if `[DONE]` never came. Nothing delivered, nothing charged. A layer above that
//! settles in its own `Drop` must drop this stream first.
//!
//! It also records the time to first token (from the request's arrival) and the time
//! spent waiting on the upstream (`ctx.upstream_wait`: attempt start to response head,
//! plus every wait for the next chunk), from which `switchboard_overhead_seconds`
//! is derived. Per chunk it only appends text to buffers and flips flags; the
//! context's lock is taken a handful of times per attempt, never per chunk.
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
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, Stream};
use tower::{Layer, Service};

use crate::catalog::Endpoint;
use crate::chat::{
    ChatChunk, ChatRequest, CompletionTokensDetails, Content, CostDetails, PromptTokensDetails,
    Usage,
};
use crate::context::{CallContext, ChunkStream, ProviderCall};
use crate::error::{FailureKind, GatewayError, ProviderError};
use crate::health::{HealthRegistry, Permit};
use crate::money::Money;
use crate::store::Reservation;

/// Builds [`Metering`] services.
#[derive(Clone, Default)]
pub struct MeteringLayer {
    health: Option<Arc<dyn HealthRegistry>>,
}

impl std::fmt::Debug for MeteringLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteringLayer")
            .field("health", &self.health.is_some())
            .finish()
    }
}

impl MeteringLayer {
    /// A metering layer.
    pub fn new() -> Self {
        MeteringLayer { health: None }
    }

    /// Counts a failure of an endpoint whose usage report is above the reservation
    /// in `registry` (the one shared with
    /// [`FallbackLayer::health`](crate::fallback::FallbackLayer::health)).
    pub fn health(mut self, registry: Arc<dyn HealthRegistry>) -> Self {
        self.health = Some(registry);
        self
    }
}

impl<S> Layer<S> for MeteringLayer {
    type Service = Metering<S>;
    fn layer(&self, inner: S) -> Metering<S> {
        Metering {
            inner,
            health: self.health.clone(),
        }
    }
}

/// Meters each attempt's chunks; see the [module docs](self).
#[derive(Clone)]
pub struct Metering<S> {
    inner: S,
    health: Option<Arc<dyn HealthRegistry>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Metering<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metering")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Metering<S> {
    /// Wraps `inner` (no health registry: see [`MeteringLayer::health`]).
    pub fn new(inner: S) -> Self {
        Metering {
            inner,
            health: None,
        }
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
        let health = self.health.clone();
        let started = Instant::now();
        self.inner
            .call(call)
            .map(move |r| {
                // Attempt start → response head: time spent on the upstream.
                ctx.update(|s| s.upstream_wait += started.elapsed());
                r.map(|inner| -> ChunkStream {
                    Box::pin(Metered {
                        inner,
                        meter: Meter::new(endpoint, request, ctx, health),
                        ended: false,
                    })
                })
            })
            .boxed()
    }
}

/// How a metered stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The upstream finished the stream.
    Complete,
    /// An error, or dropped before its end (the client went away).
    Cut,
}

/// The running count of one attempt.
///
/// Per chunk it only appends the delivered text to buffers (amortised, no allocation
/// once they have grown) and flips flags; the context's lock is taken once for the
/// finish reason, once per usage report and once at the end.
struct Meter {
    endpoint: Arc<Endpoint>,
    request: Arc<ChatRequest>,
    ctx: CallContext,
    /// Content text delivered (counted when no usage is reported; logged when asked).
    text: String,
    /// Visible reasoning text delivered (counted as completion and reasoning tokens).
    reasoning: String,
    /// Tool-call arguments delivered (counted; names and framing are not, SPEC §4).
    arguments: String,
    /// Whether the context asked for the completion text (`log_content`).
    keep_text: bool,
    /// Whether any content or tool call passed (nothing delivered → nothing charged).
    any_content: bool,
    /// Whether a choice finished.
    saw_finish: bool,
    /// The provider's last usage report, priced.
    reported: Option<Usage>,
    /// Whether that report came after the finish (so it is final even if cut).
    report_final: bool,
    /// What credit admission holds for the request: the cost is capped at it.
    cap: Option<Reservation>,
    /// Whether a usage report above `cap` was seen (and flagged).
    over: bool,
    /// Where such an endpoint's failure is counted.
    health: Option<Arc<dyn HealthRegistry>>,
    /// Time the stream was pending on the upstream.
    wait: Duration,
    pending_since: Option<Instant>,
    settled: bool,
}

impl Meter {
    fn new(
        endpoint: Arc<Endpoint>,
        request: Arc<ChatRequest>,
        ctx: CallContext,
        health: Option<Arc<dyn HealthRegistry>>,
    ) -> Self {
        let keep_text = ctx.update(|s| {
            let keep = s.completion_text.is_some();
            if keep {
                s.logged_request = Some(request.clone());
            }
            keep
        });
        let cap = ctx.reservation();
        Meter {
            endpoint,
            request,
            ctx,
            cap,
            over: false,
            health,
            text: String::new(),
            reasoning: String::new(),
            arguments: String::new(),
            keep_text,
            any_content: false,
            saw_finish: false,
            reported: None,
            report_final: false,
            wait: Duration::ZERO,
            pending_since: None,
            settled: false,
        }
    }

    /// Observes a chunk on its way out; prices its usage in place.
    fn observe(&mut self, chunk: &mut ChatChunk) {
        let had_content = self.any_content;
        if chunk.embeddings.is_some() {
            // An embeddings answer: the vectors are what is delivered.
            self.any_content = true;
        }
        let mut finish = None;
        for c in &chunk.choices {
            let d = &c.delta;
            if let Some(t) = d.content.as_deref().filter(|t| !t.is_empty()) {
                self.text.push_str(t);
                self.any_content = true;
            }
            if let Some(t) = d.reasoning.as_deref().filter(|t| !t.is_empty()) {
                self.reasoning.push_str(t);
                self.any_content = true;
            }
            if let Some(calls) = d.tool_calls.as_deref().filter(|c| !c.is_empty()) {
                self.any_content = true;
                for tc in calls {
                    if let Some(a) = tc.function.as_ref().and_then(|f| f.arguments.as_deref()) {
                        self.arguments.push_str(a);
                    }
                }
            }
            if finish.is_none() {
                finish = c.finish_reason.as_deref();
            }
        }
        if self.any_content && !had_content {
            // Time to first token, from the request's arrival (not the attempt's start).
            let ttft = self.ctx.started().elapsed();
            self.ctx.update(|s| s.ttft = Some(ttft));
        }
        if let Some(f) = finish {
            if !self.saw_finish {
                self.saw_finish = true;
                let f = f.to_string();
                self.ctx.update(|s| s.finish_reason = Some(f));
            }
        }
        if let Some(usage) = chunk.usage.as_mut() {
            self.price(usage);
            self.report_final = self.saw_finish;
            self.reported = Some(usage.clone());
            let (u, cost, over) = (usage.clone(), usage.cost.unwrap_or_default(), self.over);
            self.ctx.update(|s| {
                s.usage = Some(u);
                s.cost = cost;
                s.over_reserve |= over;
            });
        }
    }

    /// Fills the totals and details, and sets `cost` at the endpoint's prices
    /// (zero when nothing was delivered, SPEC §4), at most the reservation.
    fn price(&mut self, usage: &mut Usage) {
        usage.total_tokens = usage.prompt_tokens.saturating_add(usage.completion_tokens);
        usage
            .prompt_tokens_details
            .get_or_insert_with(PromptTokensDetails::default);
        usage
            .completion_tokens_details
            .get_or_insert_with(CompletionTokensDetails::default);
        // SPEC §4: nothing delivered, or no completion tokens, is not charged; `usage.cost`
        // is the debit, so it is zero too.
        // Embeddings generate no completion: their delivered vectors are charged for
        // the prompt alone.
        let charged = usage.completion_tokens > 0 || self.request.inbound.is_embeddings();
        let cost = if self.any_content && charged {
            self.endpoint.pricing.checked_cost(usage)
        } else {
            Some(Money::ZERO)
        };
        let charged = match self.cap {
            Some(cap) => match cost {
                Some(c) if c <= cap.amount => {
                    if usage.total_tokens > cap.tokens {
                        self.flag_over_reserve(usage, cap);
                    }
                    c
                }
                // Above the reservation, or too large to price: charge what was held.
                _ => {
                    self.flag_over_reserve(usage, cap);
                    cap.amount
                }
            },
            None => cost.unwrap_or(Money::from_pico(i64::MAX)),
        };
        usage.cost = Some(charged);
        usage.cost_details = Some(cost_details(&self.endpoint.pricing, usage, charged));
    }

    /// A usage report above the reservation: a broken upstream answer. Flagged once
    /// per attempt: the context's flag (set by the caller's next update), the metric,
    /// a warning, and one failure of the endpoint.
    fn flag_over_reserve(&mut self, usage: &Usage, cap: Reservation) {
        if std::mem::replace(&mut self.over, true) {
            return;
        }
        let e = &self.endpoint;
        crate::telemetry::counter(
            crate::telemetry::USAGE_OVER_RESERVE,
            &[("model", &*e.model), ("provider", &*e.provider.name)],
        )
        .increment(1);
        tracing::warn!(
            endpoint = %e.label(),
            request_id = %self.ctx.request_id(),
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            reserved_tokens = cap.tokens,
            reserved_usd = %cap.amount,
            "upstream reported usage above the request's reservation; charging the reservation"
        );
        if let Some(permit) = self
            .health
            .as_ref()
            .and_then(|h| Permit::acquire(h, e, false))
        {
            permit.failure(&ProviderError::new(
                e.provider.name.clone(),
                FailureKind::Protocol,
                "reported usage above the request's reservation",
            ));
        }
    }

    /// Completion and reasoning tokens of what was delivered, by the tokenizer.
    fn delivered_tokens(&self) -> (u64, u64) {
        let tok = self.endpoint.tokenizer.as_str();
        let reasoning = crate::tokenize::count(tok, &self.reasoning);
        let completion = crate::tokenize::count(tok, &self.text)
            + reasoning
            + crate::tokenize::count(tok, &self.arguments);
        (completion, reasoning)
    }

    /// Settles the attempt once: the final usage goes to the context. Returns the
    /// usage chunk to send when the stream completed without a report of its own.
    fn finish(&mut self, end: End) -> Option<Usage> {
        if self.settled {
            return None;
        }
        self.settled = true;
        if let Some(t) = self.pending_since.take() {
            self.wait += t.elapsed();
        }
        let (usage, emit) = match self.reported.take() {
            // The provider's report stands when the stream completed, or when it came
            // after the finish (only `[DONE]` was missing).
            Some(r) if end == End::Complete || self.report_final => {
                self.reported = Some(r);
                (None, false)
            }
            // Cut before the report was final (e.g. only the prompt was reported so
            // far): the completion is what was delivered.
            Some(mut r) => {
                let (completion, reasoning) = self.delivered_tokens();
                if completion > r.completion_tokens {
                    r.completion_tokens = completion;
                    r.completion_tokens_details = Some(CompletionTokensDetails {
                        reasoning_tokens: reasoning.max(r.reasoning_tokens()),
                    });
                }
                self.price(&mut r);
                (Some(r), false)
            }
            // Cut with nothing delivered (a failed attempt, or a client gone before
            // the first chunk): nothing to count or charge.
            None if end == End::Cut && !self.any_content => (None, false),
            None => {
                let tok = self.endpoint.tokenizer.as_str();
                let (completion, reasoning) = self.delivered_tokens();
                let mut u = Usage::new(prompt_tokens(tok, &self.request), completion);
                u.completion_tokens_details = Some(CompletionTokensDetails {
                    reasoning_tokens: reasoning,
                });
                self.price(&mut u);
                (Some(u), end == End::Complete)
            }
        };
        let text = if self.keep_text && self.any_content {
            let mut t = std::mem::take(&mut self.text);
            if !self.arguments.is_empty() {
                if !t.is_empty() {
                    t.push('\n');
                }
                t.push_str(&self.arguments);
            }
            Some(t)
        } else {
            None
        };
        let wait = self.wait;
        let recorded = usage.clone();
        let over = self.over;
        self.ctx.update(|s| {
            s.upstream_wait += wait;
            s.over_reserve |= over;
            if let Some(u) = recorded {
                s.cost = u.cost.unwrap_or_default();
                s.usage = Some(u);
            }
            if let Some(t) = text {
                s.completion_text = Some(t);
            }
        });
        usage.filter(|_| emit)
    }
}

/// `usage.cost_details` for a charge of `charged`: the usage priced by kind of token
/// when that is the charge; otherwise (nothing charged, or capped at the reservation)
/// each part scaled down in proportion, the rounding's remainder on `completion`, so
/// the four always add up to `charged` exactly.
pub fn cost_details(
    pricing: &crate::catalog::Pricing,
    usage: &Usage,
    charged: Money,
) -> CostDetails {
    let full = pricing.checked_cost_details(usage);
    let parts = full.map(|d| [d.prompt, d.cached_prompt, d.cache_write, d.completion]);
    let total: Option<i128> = parts.map(|p| p.iter().map(|m| i128::from(m.pico())).sum());
    let [prompt, cached_prompt, cache_write, _] = match (parts, total) {
        (Some(_), Some(t)) if t == i128::from(charged.pico()) => return full.unwrap_or_default(),
        (Some(p), Some(t)) if t > 0 && charged.pico() > 0 => p.map(|m| {
            // ≤ charged, so it fits in i64.
            let share = i128::from(m.pico()) * i128::from(charged.pico()) / t;
            Money::from_pico(i64::try_from(share).unwrap_or(0))
        }),
        _ => [Money::ZERO; 4],
    };
    let completion = Money::from_pico(
        charged.pico() - prompt.pico() - cached_prompt.pico() - cache_write.pico(),
    );
    CostDetails {
        prompt,
        cached_prompt,
        cache_write,
        completion,
    }
}

/// The prompt as an OpenAI-style provider counts it (OpenAI's cookbook convention):
/// 3 tokens of framing per message, its role, name, text and tool calls, 3 tokens to
/// prime the reply, and the tool definitions as JSON.
/// For an embeddings request, its [inputs' tokens](embedding_tokens).
pub fn prompt_tokens(tokenizer: &str, req: &ChatRequest) -> u64 {
    use crate::tokenize::count;
    if let Some(e) = &req.inbound.embeddings {
        return embedding_tokens(tokenizer, e);
    }
    let mut n = 3;
    for m in &req.messages {
        n += 3;
        n += count(tokenizer, m.role.as_str());
        if let Some(name) = &m.name {
            n += 1 + count(tokenizer, name);
        }
        match &m.content {
            Some(Content::Text(t)) => n += count(tokenizer, t),
            Some(c @ Content::Parts(_)) => n += count(tokenizer, &c.text()),
            None => {}
        }
        for call in m.tool_calls.iter().flatten() {
            n += count(tokenizer, &call.function.name);
            n += count(tokenizer, &call.function.arguments);
        }
    }
    if let Some(tools) = &req.tools {
        if let Ok(s) = serde_json::to_string(tools) {
            n += count(tokenizer, &s);
        }
    }
    n
}

/// The prompt tokens of an embeddings request (SPEC §7.3): each text input by the
/// tokenizer, each token-id input by its length.
pub fn embedding_tokens(tokenizer: &str, e: &crate::chat::EmbeddingsInput) -> u64 {
    e.inputs
        .iter()
        .map(|i| match i {
            crate::chat::EmbeddingInput::Text(t) => crate::tokenize::count(tokenizer, t),
            crate::chat::EmbeddingInput::Tokens(ids) => ids.len() as u64,
        })
        .fold(0u64, u64::saturating_add)
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
            // Cut off (the client went away): meter what passed. The upstream stream
            // (and with it the upstream connection) is dropped right after.
            let this = this.project();
            this.meter.finish(End::Cut);
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
        let polled = this.inner.poll_next(cx);
        let meter = this.meter;
        match polled {
            Poll::Pending => {
                if meter.pending_since.is_none() {
                    meter.pending_since = Some(Instant::now());
                }
                return Poll::Pending;
            }
            Poll::Ready(_) => {
                if let Some(t) = meter.pending_since.take() {
                    meter.wait += t.elapsed();
                }
            }
        }
        match polled {
            Poll::Ready(Some(Ok(mut chunk))) => {
                meter.observe(&mut chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                // A failure ends the attempt: settle now, before the error reaches
                // the layers above (credit settles from the context).
                *this.ended = true;
                meter.finish(End::Cut);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                *this.ended = true;
                match meter.finish(End::Complete) {
                    Some(usage) => Poll::Ready(Some(Ok(ChatChunk::usage(usage)))),
                    None => Poll::Ready(None),
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests;
