//! `MeteringLayer`: counts and prices the tokens of each attempt as its chunks pass.
//!
//! Sits around the provider client. Uses the provider's reported usage; when a stream
//! ends without one, it counts with the model's tokenizer — the prompt as the provider
//! would see it and exactly the text, visible reasoning and tool arguments delivered
//! (tool names and call framing are not counted: SPEC §4 counts "the text and tool
//! arguments delivered") — and sends a usage chunk of its own. Every usage chunk
//! leaves with `usage.cost` set at the endpoint's prices (cache reads and writes at
//! theirs), `prompt_tokens_details.cached_tokens` and
//! `completion_tokens_details.reasoning_tokens` filled in, and the priced usage is
//! written to the call context, where credit settlement reads it: `ctx.cost` is
//! exactly the `usage.cost` the client sees.
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
    ChatChunk, ChatRequest, CompletionTokensDetails, Content, PromptTokensDetails, Usage,
};
use crate::context::{CallContext, ChunkStream, ProviderCall};
use crate::error::GatewayError;
use crate::money::Money;

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
        let started = Instant::now();
        self.inner
            .call(call)
            .map(move |r| {
                // Attempt start → response head: time spent on the upstream.
                ctx.update(|s| s.upstream_wait += started.elapsed());
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
    /// Time the stream was pending on the upstream.
    wait: Duration,
    pending_since: Option<Instant>,
    settled: bool,
}

impl Meter {
    fn new(endpoint: Arc<Endpoint>, request: Arc<ChatRequest>, ctx: CallContext) -> Self {
        let keep_text = ctx.update(|s| {
            let keep = s.completion_text.is_some();
            if keep {
                s.logged_request = Some(request.clone());
            }
            keep
        });
        Meter {
            endpoint,
            request,
            ctx,
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
            let (u, cost) = (usage.clone(), usage.cost.unwrap_or_default());
            self.ctx.update(|s| {
                s.usage = Some(u);
                s.cost = cost;
            });
        }
    }

    /// Fills the totals and details, and sets `cost` at the endpoint's prices
    /// (zero when nothing was delivered, SPEC §4).
    fn price(&self, usage: &mut Usage) {
        // Saturating: both counts are the upstream's, and may be absurd.
        usage.total_tokens = usage.prompt_tokens.saturating_add(usage.completion_tokens);
        usage
            .prompt_tokens_details
            .get_or_insert_with(PromptTokensDetails::default);
        usage
            .completion_tokens_details
            .get_or_insert_with(CompletionTokensDetails::default);
        // SPEC §4: nothing delivered, or no completion tokens, is not charged; `usage.cost`
        // is the debit, so it is zero too.
        usage.cost = Some(if self.any_content && usage.completion_tokens > 0 {
            self.endpoint.pricing.cost(usage)
        } else {
            Money::ZERO
        });
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
        self.ctx.update(|s| {
            s.upstream_wait += wait;
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

/// The prompt as an OpenAI-style provider counts it (OpenAI's cookbook convention):
/// 3 tokens of framing per message, its role, name, text and tool calls, 3 tokens to
/// prime the reply, and the tool definitions as JSON.
pub fn prompt_tokens(tokenizer: &str, req: &ChatRequest) -> u64 {
    use crate::tokenize::count;
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
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::chat::{FunctionCallDelta, Message, Role, ToolCallDelta};
    use crate::config::Config;
    use crate::tokenize::count;
    use futures_util::{StreamExt, TryStreamExt};
    use tower::{service_fn, ServiceExt};

    /// $1 prompt, $2 completion, $0.5 cache read, $1.25 cache write per Mtok.
    fn endpoint() -> Arc<Endpoint> {
        let toml = r#"
[[providers]]
name = "mock"
kind = "mock"
[[models]]
id = "mock/echo"
tokenizer = "o200k_base"
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2
  cache_read_usd_per_mtok = 0.5
  cache_write_usd_per_mtok = 1.25
"#;
        Catalog::from_config(&Config::from_toml(toml).unwrap()).endpoints()[0].clone()
    }

    fn request() -> Arc<ChatRequest> {
        Arc::new(ChatRequest {
            model: "mock/echo".into(),
            messages: vec![Message::text(Role::User, "Tell me a story about a fox.")],
            ..Default::default()
        })
    }

    /// Meters `chunks` as the provider's answer; returns the stream and the context.
    async fn metered(chunks: Vec<Result<ChatChunk, GatewayError>>) -> (ChunkStream, CallContext) {
        metered_ctx(chunks, CallContext::new()).await
    }

    async fn metered_ctx(
        chunks: Vec<Result<ChatChunk, GatewayError>>,
        ctx: CallContext,
    ) -> (ChunkStream, CallContext) {
        let svc = MeteringLayer::new().layer(service_fn(move |_c: ProviderCall| {
            let s: ChunkStream = Box::pin(futures_util::stream::iter(chunks.clone()));
            async move { Ok::<_, GatewayError>(s) }
        }));
        let call = ProviderCall {
            endpoint: endpoint(),
            request: request(),
            ctx: ctx.clone(),
        };
        (svc.oneshot(call).await.unwrap(), ctx)
    }

    fn words() -> Vec<&'static str> {
        vec![
            "Once", " upon", " a", " time,", " a", " quick", " brown", " fox", " ran.",
        ]
    }

    fn text_chunks() -> Vec<Result<ChatChunk, GatewayError>> {
        let mut v: Vec<_> = words()
            .into_iter()
            .map(|w| Ok(ChatChunk::text(w)))
            .collect();
        let mut last = ChatChunk::text("");
        last.choices[0].finish_reason = Some("stop".into());
        v.push(Ok(last));
        v
    }

    fn price(prompt: u64, completion: u64) -> Money {
        Money::from_pico(prompt as i64 * 1_000_000 + completion as i64 * 2_000_000)
    }

    #[tokio::test]
    async fn reported_usage_is_priced_in_place_and_recorded() {
        let mut chunks = text_chunks();
        chunks.push(Ok(ChatChunk::usage(Usage::new(12, 9))));
        let (s, ctx) = metered(chunks).await;
        let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
        let usage = out.last().unwrap().usage.clone().unwrap();
        assert_eq!(usage.cost, Some(price(12, 9)));
        assert_eq!(usage.total_tokens, 21);
        assert_eq!(usage.cached_tokens(), 0);
        assert!(usage.prompt_tokens_details.is_some() && usage.completion_tokens_details.is_some());
        let st = ctx.snapshot();
        assert_eq!(st.cost, price(12, 9));
        assert_eq!(st.usage.unwrap(), usage);
        assert_eq!(st.finish_reason.as_deref(), Some("stop"));
        assert_eq!(out.iter().filter(|c| c.usage.is_some()).count(), 1);
    }

    #[tokio::test]
    async fn without_usage_the_tokenizer_counts_prompt_and_text_and_a_usage_chunk_is_sent() {
        let (s, ctx) = metered(text_chunks()).await;
        let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
        let usage = out
            .last()
            .unwrap()
            .usage
            .clone()
            .expect("metering's own usage chunk");
        let text: String = words().concat();
        assert_eq!(usage.completion_tokens, count("o200k_base", &text));
        assert_eq!(usage.prompt_tokens, prompt_tokens("o200k_base", &request()));
        // 3 priming + 3 framing + "user" + the text.
        assert_eq!(
            usage.prompt_tokens,
            7 + count("o200k_base", "Tell me a story about a fox.")
        );
        assert!(usage.completion_tokens > 0);
        assert_eq!(
            usage.cost,
            Some(price(usage.prompt_tokens, usage.completion_tokens))
        );
        assert_eq!(ctx.snapshot().cost, usage.cost.unwrap());
    }

    #[tokio::test]
    async fn a_stream_dropped_after_k_chunks_is_charged_for_those_chunks_only() {
        let k = 4;
        let (mut s, ctx) = metered(text_chunks()).await;
        for _ in 0..k {
            s.next().await.unwrap().unwrap();
        }
        assert!(ctx.snapshot().usage.is_none(), "not settled while running");
        drop(s);
        let st = ctx.snapshot();
        let delivered: String = words()[..k].concat();
        let usage = st.usage.expect("settled on drop");
        assert_eq!(usage.completion_tokens, count("o200k_base", &delivered));
        assert!(usage.completion_tokens < count("o200k_base", &words().concat()));
        assert_eq!(st.cost, price(usage.prompt_tokens, usage.completion_tokens));
    }

    #[tokio::test]
    async fn a_client_gone_before_any_content_is_not_charged() {
        let (s, ctx) = metered(text_chunks()).await;
        drop(s);
        let st = ctx.snapshot();
        assert!(st.usage.is_none());
        assert_eq!(st.cost, Money::ZERO);
    }

    #[tokio::test]
    async fn tool_call_arguments_are_counted_but_not_names() {
        let call = |name: Option<&str>, args: &str| {
            Ok(ChatChunk::delta(crate::chat::Delta {
                tool_calls: Some(vec![ToolCallDelta {
                    index: 0,
                    id: name.map(|_| "call_1".into()),
                    kind: name.map(|_| "function".into()),
                    function: Some(FunctionCallDelta {
                        name: name.map(str::to_string),
                        arguments: Some(args.into()),
                    }),
                }]),
                ..Default::default()
            }))
        };
        let chunks = vec![
            call(Some("get_weather"), ""),
            call(None, r#"{"city":"#),
            call(None, r#" "Paris", "unit": "celsius"}"#),
        ];
        let (s, ctx) = metered(chunks).await;
        let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
        let usage = out.last().unwrap().usage.clone().unwrap();
        let args = r#"{"city": "Paris", "unit": "celsius"}"#;
        assert_eq!(usage.completion_tokens, count("o200k_base", args));
        assert_eq!(ctx.snapshot().cost, usage.cost.unwrap());
    }

    #[tokio::test]
    async fn cache_and_reasoning_tokens_are_priced_and_reported() {
        let mut u = Usage::new(1_000, 500);
        u.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: 600,
            cache_write_tokens: 100,
        });
        u.completion_tokens_details = Some(CompletionTokensDetails {
            reasoning_tokens: 300,
        });
        let mut chunks = text_chunks();
        chunks.push(Ok(ChatChunk::usage(u)));
        let (s, ctx) = metered(chunks).await;
        let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
        let usage = out.last().unwrap().usage.clone().unwrap();
        // 300 plain × $1 + 600 × $0.5 + 100 × $1.25 + 500 (300 reasoning incl.) × $2, per M.
        let want =
            Money::from_pico(300 * 1_000_000 + 600 * 500_000 + 100 * 1_250_000 + 500 * 2_000_000);
        assert_eq!(usage.cost, Some(want));
        assert_eq!(usage.cached_tokens(), 600);
        assert_eq!(usage.reasoning_tokens(), 300);
        assert_eq!(ctx.snapshot().cost, want);
    }

    #[tokio::test]
    async fn visible_reasoning_counts_as_completion_and_reasoning_tokens() {
        let chunks = vec![
            Ok(ChatChunk::delta(crate::chat::Delta {
                reasoning: Some("Let me think about foxes.".into()),
                ..Default::default()
            })),
            Ok(ChatChunk::text("A fox.")),
        ];
        let (s, _ctx) = metered(chunks).await;
        let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
        let usage = out.last().unwrap().usage.clone().unwrap();
        let r = count("o200k_base", "Let me think about foxes.");
        assert_eq!(usage.reasoning_tokens(), r);
        assert_eq!(usage.completion_tokens, r + count("o200k_base", "A fox."));
    }

    #[tokio::test]
    async fn a_mid_stream_failure_settles_at_once_for_the_delivered_part() {
        let err = GatewayError::UpstreamError("broke off".into());
        let chunks = vec![
            Ok(ChatChunk::text("Once upon")),
            Ok(ChatChunk::text(" a time")),
            Err(err),
            Ok(ChatChunk::text(" never delivered")),
        ];
        let (mut s, ctx) = metered(chunks).await;
        s.next().await.unwrap().unwrap();
        s.next().await.unwrap().unwrap();
        assert!(s.next().await.unwrap().is_err());
        // Settled before the error went up, not only on drop.
        let usage = ctx.snapshot().usage.expect("settled at the error");
        assert_eq!(
            usage.completion_tokens,
            count("o200k_base", "Once upon a time")
        );
        assert!(s.next().await.is_none(), "nothing after the failure");
    }

    #[tokio::test]
    async fn a_cut_after_a_partial_report_counts_the_delivered_completion() {
        // Anthropic-style: the prompt is reported first, the completion at the end.
        let chunks = vec![
            Ok(ChatChunk::usage(Usage::new(40, 1))),
            Ok(ChatChunk::text("Once upon a time")),
            Ok(ChatChunk::text(" there was")),
        ];
        let (mut s, ctx) = metered(chunks).await;
        for _ in 0..3 {
            s.next().await.unwrap().unwrap();
        }
        drop(s);
        let usage = ctx.snapshot().usage.unwrap();
        assert_eq!(usage.prompt_tokens, 40);
        assert_eq!(
            usage.completion_tokens,
            count("o200k_base", "Once upon a time there was")
        );
        assert_eq!(ctx.snapshot().cost, price(40, usage.completion_tokens));
    }

    #[tokio::test]
    async fn a_report_after_the_finish_stands_even_if_done_is_missing() {
        let mut chunks = text_chunks();
        chunks.push(Ok(ChatChunk::usage(Usage::new(12, 30))));
        chunks.push(Ok(ChatChunk::text("")));
        let n = chunks.len();
        let (mut s, ctx) = metered(chunks).await;
        for _ in 0..n - 1 {
            s.next().await.unwrap().unwrap();
        }
        drop(s);
        assert_eq!(ctx.snapshot().usage.unwrap().completion_tokens, 30);
    }

    #[tokio::test]
    async fn nothing_delivered_is_reported_but_not_charged() {
        let mut done = ChatChunk::default();
        done.choices.push(crate::chat::ChunkChoice {
            index: 0,
            delta: Default::default(),
            finish_reason: Some("content_filter".into()),
        });
        let (s, ctx) = metered(vec![Ok(done), Ok(ChatChunk::usage(Usage::new(50, 7)))]).await;
        let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
        assert_eq!(
            out.last().unwrap().usage.as_ref().unwrap().cost,
            Some(Money::ZERO)
        );
        assert_eq!(ctx.snapshot().cost, Money::ZERO);
    }

    #[tokio::test]
    async fn completion_text_is_kept_only_when_the_context_asks() {
        let (s, ctx) = metered(text_chunks()).await;
        let _: Vec<ChatChunk> = s.try_collect().await.unwrap();
        assert!(ctx.snapshot().completion_text.is_none());

        let ctx = CallContext::new();
        ctx.update(|s| s.completion_text = Some(String::new()));
        let (s, ctx) = metered_ctx(text_chunks(), ctx).await;
        let _: Vec<ChatChunk> = s.try_collect().await.unwrap();
        let st = ctx.snapshot();
        assert_eq!(
            st.completion_text.as_deref(),
            Some(words().concat().as_str())
        );
        assert!(st.logged_request.is_some());
    }

    #[tokio::test]
    async fn time_waiting_on_the_upstream_is_recorded() {
        let svc = MeteringLayer::new().layer(service_fn(|_c: ProviderCall| async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let s: ChunkStream = Box::pin(
                futures_util::stream::iter([Ok(ChatChunk::text("a"))]).then(|c| async {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    c
                }),
            );
            Ok::<_, GatewayError>(s)
        }));
        let ctx = CallContext::new();
        let call = ProviderCall {
            endpoint: endpoint(),
            request: request(),
            ctx: ctx.clone(),
        };
        let s = svc.oneshot(call).await.unwrap();
        let _: Vec<ChatChunk> = s.try_collect().await.unwrap();
        assert!(ctx.snapshot().upstream_wait >= Duration::from_millis(60));
    }
}
