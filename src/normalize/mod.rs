//! `NormalizeLayer`: where HTTP ends. HTTP + JSON in, typed [`ChatCall`] down, JSON or
//! SSE out.
//!
//! Reads the body under `max_body_bytes` (413), parses it with the JSON path of any
//! error (400), validates it, and calls the typed stack. A non-stream reply is folded
//! into one `chat.completion`; a stream is written as `chat.completion.chunk` events
//! ending in `data: [DONE]`. The response is committed when the typed stack returns
//! (its first content chunk is ready); if that takes longer than `keepalive`, a stream
//! is committed early with `200` and `: switchboard processing` comments until it
//! does. Errors before the commit are SPEC-shaped responses; after it, a final error
//! chunk with `finish_reason: "error"`, then `[DONE]`. The whole request, stream
//! included, is bounded by `request_timeout`.
//!
//! # Example
//! ```
//! use switchboard::normalize::NormalizeLayer;
//! use switchboard::context::{ChatCall, ChatReply};
//! use switchboard::error::GatewayError;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(NormalizeLayer::new().max_body_bytes(1024))
//!     .service(service_fn(|call: ChatCall| async move {
//!         Err::<ChatReply, _>(GatewayError::ModelNotFound(format!("no `{}`", call.request.model)))
//!     }));
//! let req = http::Request::post("/v1/chat/completions")
//!     .body(r#"{"model":"x","messages":[{"role":"user","content":"hi"}]}"#.to_string())
//!     .unwrap();
//! let res = svc.clone().oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 404);
//!
//! let bad = http::Request::post("/v1/chat/completions").body("{".to_string()).unwrap();
//! assert_eq!(svc.oneshot(bad).await.unwrap().status(), 400);
//! # }
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt, TryFutureExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::chat::{Aggregator, ChatChunk, ChatCompletion, ChatRequest, Dialect};
use crate::context::{CallContext, ChatCall, ChatReply, ChunkStream};
use crate::error::{Body, BoxError, GatewayError};
use crate::keys::KeyRecord;

mod anthropic_messages;
mod embeddings;
mod fields;
mod openai_chat;
mod openai_completions;
mod openai_responses;

pub use anthropic_messages::{
    error_type as anthropic_error_type, AnthropicErrors, AnthropicErrorsLayer, CountTokens,
};
pub use openai_chat::parse_request;

/// `X-Request-Id`.
pub const X_REQUEST_ID: &str = "x-request-id";
/// `X-Provider`.
pub const X_PROVIDER: &str = "x-provider";
/// `X-Model-Used`.
pub const X_MODEL_USED: &str = "x-model-used";

/// Builds [`Normalize`] services.
#[derive(Debug, Clone)]
pub struct NormalizeLayer {
    max_body_bytes: usize,
    keepalive: Duration,
    request_timeout: Duration,
}

impl Default for NormalizeLayer {
    fn default() -> Self {
        NormalizeLayer {
            max_body_bytes: 10_485_760,
            keepalive: Duration::from_secs(10),
            request_timeout: Duration::from_secs(600),
        }
    }
}

impl NormalizeLayer {
    /// SPEC defaults: 10 MiB bodies, 10 s keep-alive, 600 s per request.
    pub fn new() -> Self {
        Self::default()
    }

    /// Larger bodies get 413.
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }

    /// How long a stream may wait for its first content before it is committed early.
    pub fn keepalive(mut self, d: Duration) -> Self {
        self.keepalive = d;
        self
    }

    /// The whole request's deadline, streams included.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }
}

impl<S> Layer<S> for NormalizeLayer {
    type Service = Normalize<S>;
    fn layer(&self, inner: S) -> Normalize<S> {
        Normalize {
            inner,
            cfg: Arc::new(self.clone()),
        }
    }
}

/// HTTP ⇄ typed adapter; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Normalize<S> {
    inner: S,
    cfg: Arc<NormalizeLayer>,
}

impl<S> Normalize<S> {
    /// Wraps `inner` with default settings.
    pub fn new(inner: S) -> Self {
        NormalizeLayer::new().layer(inner)
    }

    /// A [`NormalizeLayer`].
    pub fn layer() -> NormalizeLayer {
        NormalizeLayer::new()
    }
}

impl<S, B> Service<Request<B>> for Normalize<S>
where
    S: Service<ChatCall, Response = ChatReply> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // `inner` is called only after the body is read; readiness is awaited then.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let cfg = self.cfg.clone();
        Box::pin(async move {
            let ctx = req
                .extensions()
                .get::<CallContext>()
                .cloned()
                .unwrap_or_default();
            if let Some(key) = req.extensions().get::<Arc<KeyRecord>>() {
                ctx.set_key(key.clone());
            }
            let deadline = Instant::now() + cfg.request_timeout;
            ctx.set_deadline(deadline.into_std());
            let mut res = match handle(inner, &cfg, req, &ctx, deadline).await {
                Ok(res) => res,
                Err(e) => {
                    ctx.update(|s| {
                        s.status = e.status().as_u16();
                        s.error_code = Some(e.code());
                    });
                    e.into_response()
                }
            };
            if let Ok(v) = HeaderValue::from_str(ctx.request_id()) {
                res.headers_mut().insert(X_REQUEST_ID, v);
            }
            Ok(res)
        })
    }
}

/// Reads the request body under `limit` bytes (413 past it).
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, GatewayError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(GatewayError::PayloadTooLarge(format!(
                "the request body is larger than {limit} bytes ([server].max_body_bytes)"
            )))
        }
        Err(e) => Err(GatewayError::InvalidRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// Reads and checks a chat-completions request body.
pub async fn read_request<B>(body: B, limit: usize) -> Result<ChatRequest, GatewayError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    parse_request(&read_body(body, limit).await?)
}

async fn handle<S, B>(
    inner: S,
    cfg: &NormalizeLayer,
    req: Request<B>,
    ctx: &CallContext,
    deadline: Instant,
) -> Result<Response<Body>, GatewayError>
where
    S: Service<ChatCall, Response = ChatReply> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        if len > cfg.max_body_bytes as u64 {
            return Err(GatewayError::PayloadTooLarge(format!(
                "the request body is {len} bytes; the limit is {} ([server].max_body_bytes)",
                cfg.max_body_bytes
            )));
        }
    }
    let dialect = Dialect::from_path(req.uri().path());
    let (parts, body) = req.into_parts();
    // The body is read inside the request's deadline: a client that stalls halfway
    // through it holds the connection no longer than any other request.
    let bytes = tokio::time::timeout_at(deadline, read_body(body, cfg.max_body_bytes))
        .await
        .map_err(|_| body_timed_out())??;
    let request = match dialect {
        Dialect::OpenAiChat => openai_chat::parse_request(&bytes)?,
        Dialect::AnthropicMessages => anthropic_messages::parse(&bytes, &parts.headers)?,
        Dialect::OpenAiResponses => openai_responses::parse(&bytes, &parts.headers)?,
        Dialect::Embeddings => embeddings::parse(&bytes, &parts.headers)?,
        Dialect::Completions => openai_completions::parse(&bytes)?,
    };
    drop(bytes);
    let stream = request.stream;
    ctx.update(|s| {
        s.streamed = stream;
        s.requested_model.clone_from(&request.model);
    });
    let call = ChatCall::new(request, ctx.clone());
    let request = call.request.clone();
    let reply = inner
        .oneshot(call)
        .map_err(|e| GatewayError::from_boxed(e.into()));
    if stream {
        stream_response(reply, cfg.keepalive, ctx.clone(), deadline, request).await
    } else {
        json_response(reply, ctx, deadline, &request).await
    }
}

/// The request body did not arrive before the request's deadline.
pub fn body_timed_out() -> GatewayError {
    GatewayError::RequestTimeout(
        "the request body did not arrive within [server].request_timeout_secs".into(),
    )
}

fn timed_out() -> GatewayError {
    GatewayError::UpstreamTimeout(
        "the request took longer than [server].request_timeout_secs".into(),
    )
}

async fn json_response<F>(
    reply: F,
    ctx: &CallContext,
    deadline: Instant,
    request: &ChatRequest,
) -> Result<Response<Body>, GatewayError>
where
    F: std::future::Future<Output = Result<ChatReply, GatewayError>>,
{
    let work = async {
        let ChatReply {
            endpoint,
            mut chunks,
        } = reply.await?;
        let mut agg = Aggregator::default();
        while let Some(chunk) = chunks.next().await {
            let mut chunk = chunk?;
            if request.hides_reasoning() {
                chunk.drop_reasoning();
            }
            agg.push(chunk);
        }
        Ok::<_, GatewayError>((endpoint, agg))
    };
    let (endpoint, agg) = tokio::time::timeout_at(deadline, work)
        .await
        .map_err(|_| timed_out())??;
    let mut completion = agg.finish();
    completion.id = ctx.request_id().to_string();
    completion.created = ctx.created();
    completion.model = (*endpoint.model).to_owned();
    completion.provider = Some((*endpoint.provider.name).to_owned());
    let body = json_body(&completion, request);
    ctx.update(|s| s.status = 200);
    let mut res = Response::new(Body::from(body));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    served_headers(h, &endpoint.model, &endpoint.provider.name);
    Ok(res)
}

/// The JSON body of a folded reply, in the dialect `request` came in.
pub(crate) fn json_body(completion: &ChatCompletion, request: &ChatRequest) -> Vec<u8> {
    match request.inbound.dialect {
        Dialect::OpenAiChat => openai_chat::json_body(completion),
        Dialect::AnthropicMessages => anthropic_messages::json_body(completion, request),
        Dialect::OpenAiResponses => openai_responses::json_body(completion, request),
        Dialect::Embeddings => embeddings::json_body(completion, request),
        Dialect::Completions => openai_completions::json_body(completion),
    }
}

fn served_headers(h: &mut http::HeaderMap, model: &str, provider: &str) {
    if let Ok(v) = HeaderValue::from_str(provider) {
        h.insert(X_PROVIDER, v);
    }
    if let Ok(v) = HeaderValue::from_str(model) {
        h.insert(X_MODEL_USED, v);
    }
}

fn sse_response(body: Body) -> Response<Body> {
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::OK;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// The keep-alive comment of SPEC §3.1.
pub const KEEPALIVE_COMMENT: &[u8] = b": switchboard processing\n\n";
/// The stream's last event.
pub const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// Whether an SSE body written by Normalize ends as a complete answer does, in any
/// dialect: `data: [DONE]` (chat), Anthropic's `message_stop`, or Responses'
/// `response.completed` as the last event. What the response cache and its
/// followers check before they store or replay a stream as whole.
pub fn stream_complete(body: &[u8]) -> bool {
    if body.ends_with(DONE_EVENT) {
        return true;
    }
    let Some(body) = body.strip_suffix(b"\n\n") else {
        return false;
    };
    let last = match memchr::memmem::rfind(body, b"\n\n") {
        Some(i) => &body[i + 2..],
        None => body,
    };
    last.starts_with(b"event: message_stop\n") || last.starts_with(b"event: response.completed\n")
}

async fn stream_response<F>(
    reply: F,
    keepalive: Duration,
    ctx: CallContext,
    deadline: Instant,
    request: Arc<ChatRequest>,
) -> Result<Response<Body>, GatewayError>
where
    F: std::future::Future<Output = Result<ChatReply, GatewayError>> + Send + 'static,
{
    let mut reply = Box::pin(reply);
    let early = Instant::now() + keepalive;
    tokio::select! {
        r = &mut reply => {
            let ChatReply { endpoint, chunks } = r?;
            ctx.update(|s| s.status = 200);
            let encoder = Encoder::new(ctx, Some(&endpoint), &request);
            let body = encoder.run(chunks, deadline, request.hides_reasoning());
            let mut res = sse_response(Body::from_stream(body));
            served_headers(res.headers_mut(), &endpoint.model, &endpoint.provider.name);
            Ok(res)
        }
        _ = tokio::time::sleep_until(early.min(deadline)) => {
            if early > deadline {
                return Err(timed_out());
            }
            // Commit early: 200 now, comments until the reply is ready.
            ctx.update(|s| s.status = 200);
            let body = keepalive_then_stream(reply, keepalive, ctx, deadline, request);
            Ok(sse_response(Body::from_stream(body)))
        }
    }
}

type SseItem = Result<Bytes, Infallible>;

fn keepalive_then_stream<F>(
    reply: std::pin::Pin<Box<F>>,
    every: Duration,
    ctx: CallContext,
    deadline: Instant,
    request: Arc<ChatRequest>,
) -> impl Stream<Item = SseItem> + Send
where
    F: std::future::Future<Output = Result<ChatReply, GatewayError>> + Send + 'static,
{
    enum Phase<F> {
        Waiting(std::pin::Pin<Box<F>>),
        Streaming(std::pin::Pin<Box<dyn Stream<Item = SseItem> + Send>>),
        Done,
    }
    // The first comment goes out at once: the keep-alive period has already passed.
    let first = futures_util::stream::once(async { Ok(Bytes::from_static(KEEPALIVE_COMMENT)) });
    let rest = futures_util::stream::unfold(Phase::Waiting(reply), move |phase| {
        let ctx = ctx.clone();
        let request = request.clone();
        async move {
            match phase {
                Phase::Waiting(mut reply) => {
                    let tick = Instant::now() + every;
                    tokio::select! {
                        r = &mut reply => match r {
                            Ok(ChatReply { endpoint, chunks }) => {
                                let encoder = Encoder::new(ctx, Some(&endpoint), &request);
                                let mut s: std::pin::Pin<Box<dyn Stream<Item = SseItem> + Send>> = Box::pin(encoder.run(chunks, deadline, request.hides_reasoning()));
                                let first = s.next().await;
                                first.map(|b| (b, Phase::Streaming(s)))
                            }
                            Err(e) => {
                                let last = Encoder::new(ctx, None, &request).error(&e);
                                Some((Ok(last), Phase::Done))
                            }
                        },
                        _ = tokio::time::sleep_until(tick.min(deadline)) => {
                            if Instant::now() >= deadline {
                                let last = Encoder::new(ctx, None, &request).error(&timed_out());
                                Some((Ok(last), Phase::Done))
                            } else {
                                Some((Ok(Bytes::from_static(KEEPALIVE_COMMENT)), Phase::Waiting(reply)))
                            }
                        }
                    }
                }
                Phase::Streaming(mut s) => s.next().await.map(|b| (b, Phase::Streaming(s))),
                Phase::Done => None,
            }
        }
    });
    first.chain(rest)
}

/// Records an error that ends a started stream in the context (SPEC §3.2): every
/// dialect's error event calls it.
pub(crate) fn record_stream_error(ctx: &CallContext, e: &GatewayError) {
    ctx.update(|s| {
        s.error_code = Some(e.code());
        s.finish_reason = Some("error".into());
    });
}

/// Writes a streamed reply in the dialect the request came in by: one encoder per
/// stream, fed every chunk in order, then the end (or the error that ends it).
pub(crate) enum Encoder {
    /// `chat.completion.chunk` events, `[DONE]`.
    Chat(openai_chat::SseWriter),
    /// Anthropic's `message_start` … `message_stop`.
    Messages(anthropic_messages::Encoder),
    /// Responses' typed events with `sequence_number`.
    Responses(openai_responses::Encoder),
    /// Legacy `text_completion` chunks, `[DONE]`.
    Completions(openai_completions::Encoder),
}

impl Encoder {
    /// The encoder of `request`'s dialect; `endpoint` is `None` when the stream ends
    /// before any endpoint committed (an error after an early commit).
    pub(crate) fn new(
        ctx: CallContext,
        endpoint: Option<&crate::catalog::Endpoint>,
        request: &Arc<ChatRequest>,
    ) -> Encoder {
        match request.inbound.dialect {
            Dialect::AnthropicMessages => {
                Encoder::Messages(anthropic_messages::Encoder::new(ctx, endpoint, request))
            }
            Dialect::OpenAiResponses => {
                Encoder::Responses(openai_responses::Encoder::new(ctx, endpoint, request))
            }
            Dialect::Completions => {
                Encoder::Completions(openai_completions::Encoder::new(ctx, endpoint, request))
            }
            // Embeddings refuse `stream` when parsed.
            Dialect::OpenAiChat | Dialect::Embeddings => Encoder::Chat(
                openai_chat::SseWriter::new(ctx, endpoint, request.wants_stream_usage()),
            ),
        }
    }

    /// One chunk's events, or `None` when there is nothing for this client in it.
    pub(crate) fn chunk(&mut self, chunk: &ChatChunk) -> Option<Bytes> {
        match self {
            Encoder::Chat(w) => w.encode(chunk),
            Encoder::Messages(e) => e.chunk(chunk),
            Encoder::Responses(e) => e.chunk(chunk),
            Encoder::Completions(e) => e.chunk(chunk),
        }
    }

    /// The events that end a complete stream.
    pub(crate) fn done(&mut self) -> Bytes {
        match self {
            Encoder::Chat(_) => Bytes::from_static(DONE_EVENT),
            Encoder::Messages(e) => e.done(),
            Encoder::Responses(e) => e.done(),
            Encoder::Completions(e) => e.done(),
        }
    }

    /// The events that end a stream cut by `e` (recorded in the context).
    fn error(&mut self, e: &GatewayError) -> Bytes {
        match self {
            Encoder::Chat(w) => w.error(e),
            Encoder::Messages(m) => m.error(e),
            Encoder::Responses(r) => r.error(e),
            Encoder::Completions(c) => c.error(e),
        }
    }

    fn run(self, chunks: ChunkStream, deadline: Instant, hide_reasoning: bool) -> SseBody {
        SseBody {
            encoder: self,
            chunks,
            hide_reasoning,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            done: false,
        }
    }
}

/// The SSE body: chunks encoded as they come, an error event if the stream fails or
/// the request's deadline passes, else the dialect's end.
///
/// One timer for the whole stream, polled only when no chunk is ready: a
/// `timeout_at` per chunk registered and cancelled a timer for every chunk.
struct SseBody {
    encoder: Encoder,
    chunks: ChunkStream,
    /// `reasoning.exclude`: reasoning text is dropped before encoding.
    hide_reasoning: bool,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl Stream for SseBody {
    type Item = SseItem;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<SseItem>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let e = &mut this.encoder;
        loop {
            let last = match this.chunks.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(mut chunk))) => {
                    if this.hide_reasoning {
                        chunk.drop_reasoning();
                    }
                    match e.chunk(&chunk) {
                        Some(bytes) => return Poll::Ready(Some(Ok(bytes))),
                        None => continue,
                    }
                }
                Poll::Ready(Some(Err(err))) => e.error(&err),
                Poll::Ready(None) => e.done(),
                Poll::Pending => {
                    if std::future::Future::poll(this.deadline.as_mut(), cx).is_pending() {
                        return Poll::Pending;
                    }
                    e.error(&timed_out())
                }
            };
            this.done = true;
            return Poll::Ready(Some(Ok(last)));
        }
    }
}

#[cfg(test)]
mod tests;
