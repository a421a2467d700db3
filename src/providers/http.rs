//! The shared upstream transport: one pooled hyper client, timeouts, SSE decoding.
//!
//! `timeout_secs` bounds each attempt until the response head arrives;
//! `stream_idle_timeout_secs` bounds every silence after that, in streams and in
//! non-stream bodies alike. Dropping the returned stream drops the hyper body, which
//! closes the upstream connection: a client that goes away stops the upstream too.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::{Instant, Sleep};

use super::limits;
use super::redact::redact;
use super::sse::SseParser;
use super::{Adapter, Decoded, StreamDecoder};
use crate::catalog::Provider;
use crate::chat::ChatChunk;
use crate::context::{ChunkStream, ProviderCall};
use crate::error::{FailureKind, GatewayError, ProviderError};

/// The pooled HTTPS-or-HTTP client every adapter shares.
pub type HttpsClient = Client<UpstreamConnector, Full<Bytes>>;

/// Largest error body read from an upstream (the rest is not needed for a message).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Builds the shared client: webpki roots (starts on a machine with no CA bundle),
/// TCP_NODELAY, HTTP/1.1 and HTTP/2 by ALPN, idle connections kept for 90 s.
pub fn new_client() -> HttpsClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(512)
        .build(UpstreamConnector(https))
}

/// An upstream connection: plain TCP, or TLS behind a box.
///
/// hyper-rustls's `MaybeHttpsStream` holds the TLS session inline (≈ 1 KiB), so every
/// plain-HTTP upstream connection (a local model server, a sidecar) would carry that
/// much unused for its whole life; boxed, a TLS connection pays one more allocation.
pub enum UpstreamIo {
    /// Plain HTTP.
    Plain(TokioIo<tokio::net::TcpStream>),
    /// HTTPS.
    Tls(Box<MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>>),
}

impl UpstreamIo {
    fn new(io: MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>) -> Self {
        match io {
            MaybeHttpsStream::Http(tcp) => UpstreamIo::Plain(tcp),
            tls => UpstreamIo::Tls(Box::new(tls)),
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            UpstreamIo::Plain(io) => io.connected(),
            UpstreamIo::Tls(io) => io.connected(),
        }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(io) => io.is_write_vectored(),
            UpstreamIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_flush(cx),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The HTTPS-or-HTTP connector, yielding [`UpstreamIo`].
#[derive(Clone)]
pub struct UpstreamConnector(HttpsConnector<HttpConnector>);

impl std::fmt::Debug for UpstreamConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConnector").finish_non_exhaustive()
    }
}

type MaybeHttps = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

impl tower::Service<::http::Uri> for UpstreamConnector {
    type Response = UpstreamIo;
    type Error = <HttpsConnector<HttpConnector> as tower::Service<::http::Uri>>::Error;
    type Future = futures_util::future::MapOk<
        <HttpsConnector<HttpConnector> as tower::Service<::http::Uri>>::Future,
        fn(MaybeHttps) -> UpstreamIo,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: ::http::Uri) -> Self::Future {
        use futures_util::TryFutureExt;
        self.0
            .call(uri)
            .map_ok(UpstreamIo::new as fn(MaybeHttps) -> UpstreamIo)
    }
}

/// Sends one attempt and returns its chunks.
pub async fn send(
    client: &HttpsClient,
    adapter: Arc<dyn Adapter>,
    call: ProviderCall,
) -> Result<ChunkStream, GatewayError> {
    let provider = call.endpoint.provider.clone();
    let name = provider.name.clone();
    // Embeddings are answered whole (their parse refuses `stream`; never streamed).
    let stream = call.request.stream && !call.request.inbound.is_embeddings();
    let mut req = adapter.build_request(&call, stream)?;
    for (k, v) in &provider.headers {
        req.headers_mut().insert(k.clone(), v.clone());
    }
    // The attempt's span, when OpenTelemetry export is on (one atomic load when off).
    if let Some(tp) = call.ctx.upstream_traceparent() {
        req.headers_mut()
            .insert(::http::HeaderName::from_static("traceparent"), tp);
    }
    let req = req.map(Full::new);

    let resp = match tokio::time::timeout(provider.timeout, client.request(req)).await {
        Err(_) => {
            return Err(ProviderError::new(
                name,
                FailureKind::Timeout,
                format!("no response within {}s", provider.timeout.as_secs()),
            )
            .into())
        }
        Ok(Err(e)) => {
            let kind = if e.is_connect() {
                FailureKind::Connect
            } else {
                FailureKind::StreamBroken
            };
            return Err(ProviderError::new(name, kind, error_chain(&e)).into());
        }
        Ok(Ok(resp)) => resp,
    };

    let status = resp.status();
    let key = provider.api_key.as_deref();
    if !status.is_success() {
        let retry_after = limits::retry_after(resp.headers(), std::time::SystemTime::now());
        let body = read_limited(resp.into_body(), provider.stream_idle_timeout).await;
        let message = redact(&adapter.error_message(&body), key);
        return Err(ProviderError::status(name, status.as_u16(), message)
            .with_retry_after(retry_after)
            .into());
    }

    let max_bytes = provider.max_response_bytes;
    let max_choices = limits::max_choices(&call);
    if !stream {
        let body = resp.into_body();
        if body.size_hint().lower() > max_bytes as u64 {
            return Err(too_large(name, max_bytes).into());
        }
        let limited = http_body_util::Limited::new(body, max_bytes);
        let body = match tokio::time::timeout(provider.stream_idle_timeout, limited.collect()).await
        {
            Err(_) => {
                return Err(
                    ProviderError::new(name, FailureKind::StreamIdle, "body stalled").into(),
                )
            }
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(too_large(name, max_bytes).into())
            }
            Ok(Err(e)) => {
                return Err(
                    ProviderError::new(name, FailureKind::StreamBroken, error_chain(&*e)).into(),
                )
            }
            Ok(Ok(b)) => b.to_bytes(),
        };
        let chunk = adapter
            .parse_response(&call, &body)
            .map_err(|e| redacted(e, key))?;
        if let Err(why) = limits::check_chunk(&chunk, max_choices)
            .and_then(|()| limits::check_embeddings(&chunk, &call))
        {
            return Err(ProviderError::new(name, FailureKind::Protocol, why).into());
        }
        return Ok(Box::pin(futures_util::stream::once(
            async move { Ok(chunk) },
        )));
    }

    Ok(Box::pin(SseChunks {
        body: resp.into_body(),
        parser: SseParser::default(),
        decoder: adapter.stream_decoder(&call),
        idle: Box::pin(tokio::time::sleep(provider.stream_idle_timeout)),
        last_event: Instant::now(),
        idle_for: provider.stream_idle_timeout,
        received: 0,
        max_bytes,
        max_choices,
        upstream: provider,
        provider: name,
        finished: false,
        saw_finish: false,
    }))
}

/// The failure of an answer larger than `max_response_bytes`.
fn too_large(provider: Arc<str>, max: usize) -> ProviderError {
    ProviderError::new(
        provider,
        FailureKind::Protocol,
        format!("the answer is larger than max_response_bytes ({max} bytes)"),
    )
}

/// `e` with its upstream-supplied message redacted ([`redact`]).
fn redacted(mut e: ProviderError, key: Option<&str>) -> ProviderError {
    e.message = redact(&e.message, key);
    e
}

/// Reads at most [`MAX_ERROR_BODY`] bytes of a body, giving up after `idle`.
async fn read_limited(body: hyper::body::Incoming, idle: Duration) -> Bytes {
    let limited = http_body_util::Limited::new(body, MAX_ERROR_BODY);
    match tokio::time::timeout(idle, limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => Bytes::new(),
    }
}

/// `Retry-After` (seconds or an HTTP date) or `retry-after-ms`, clamped to
/// [`MAX_RETRY_AFTER`](limits::MAX_RETRY_AFTER): see [`limits::retry_after`].
pub fn retry_after(headers: &::http::HeaderMap) -> Option<Duration> {
    limits::retry_after(headers, std::time::SystemTime::now())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// SSE events → chunks, with an idle timeout between events.
struct SseChunks {
    body: hyper::body::Incoming,
    parser: SseParser,
    decoder: Box<dyn StreamDecoder>,
    /// Fires `idle_for` after `last_event`. Moved forward only when it fires, not at
    /// every event: resetting a tokio timer per chunk costs more than the check.
    idle: Pin<Box<Sleep>>,
    last_event: Instant,
    idle_for: Duration,
    /// Bytes of the stream so far, bounded by `max_bytes` (`max_response_bytes`).
    received: usize,
    max_bytes: usize,
    /// Choice indices must be below this ([`limits::max_choices`]).
    max_choices: u32,
    /// The provider (its key is redacted from in-band error messages).
    upstream: Arc<Provider>,
    provider: Arc<str>,
    finished: bool,
    saw_finish: bool,
}

impl SseChunks {
    fn broken(&mut self, why: impl Into<String>) -> Poll<Option<Result<ChatChunk, GatewayError>>> {
        self.finished = true;
        let err = ProviderError::new(self.provider.clone(), FailureKind::StreamBroken, why);
        Poll::Ready(Some(Err(err.into())))
    }
}

impl Stream for SseChunks {
    type Item = Result<ChatChunk, GatewayError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        loop {
            let ended = this.parser.is_ended();
            match this.parser.next_event() {
                Ok(Some(event)) => {
                    this.last_event = Instant::now();
                    match this.decoder.decode(event.event, event.data) {
                        Ok(Decoded::Chunk(chunk)) => {
                            if let Err(why) = limits::check_chunk(&chunk, this.max_choices) {
                                this.finished = true;
                                let err = ProviderError::new(
                                    this.provider.clone(),
                                    FailureKind::Protocol,
                                    why,
                                );
                                return Poll::Ready(Some(Err(err.into())));
                            }
                            if chunk.finish_reason().is_some() {
                                this.saw_finish = true;
                            }
                            return Poll::Ready(Some(Ok(chunk)));
                        }
                        Ok(Decoded::Skip) => continue,
                        Ok(Decoded::Done) => {
                            this.finished = true;
                            return Poll::Ready(None);
                        }
                        Err(e) => {
                            this.finished = true;
                            let e = redacted(e, this.upstream.api_key.as_deref());
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    }
                }
                Err(e) => return this.broken(e.to_string()),
                Ok(None) if ended => {
                    this.finished = true;
                    if this.saw_finish {
                        return Poll::Ready(None);
                    }
                    return this.broken("the stream ended before the answer was complete");
                }
                Ok(None) => {}
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        this.received = this.received.saturating_add(data.len());
                        if this.received > this.max_bytes {
                            this.finished = true;
                            let err = too_large(this.provider.clone(), this.max_bytes);
                            return Poll::Ready(Some(Err(err.into())));
                        }
                        this.parser.push(data);
                    }
                }
                Poll::Ready(Some(Err(e))) => return this.broken(error_chain(&e)),
                Poll::Ready(None) => this.parser.end(),
                Poll::Pending => {
                    while this.idle.as_mut().poll(cx).is_ready() {
                        let deadline = this.last_event + this.idle_for;
                        if Instant::now() >= deadline {
                            this.finished = true;
                            let err = ProviderError::new(
                                this.provider.clone(),
                                FailureKind::StreamIdle,
                                format!("no event for {}s", this.idle_for.as_secs()),
                            );
                            return Poll::Ready(Some(Err(err.into())));
                        }
                        this.idle.as_mut().reset(deadline);
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

use std::future::Future as _;
