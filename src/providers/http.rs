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
use eventsource_stream::{EventStream, Eventsource};
use futures_util::Stream;
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::{Instant, Sleep};

use super::{Adapter, Decoded, StreamDecoder};
use crate::chat::ChatChunk;
use crate::context::{ChunkStream, ProviderCall};
use crate::error::{FailureKind, GatewayError, ProviderError};

/// The pooled HTTPS-or-HTTP client every adapter shares.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

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
        .build(https)
}

/// Sends one attempt and returns its chunks.
pub async fn send(
    client: &HttpsClient,
    adapter: Arc<dyn Adapter>,
    call: ProviderCall,
) -> Result<ChunkStream, GatewayError> {
    let provider = call.endpoint.provider.clone();
    let name = provider.name.clone();
    let stream = call.request.stream;
    let mut req = adapter.build_request(&call, stream)?;
    for (k, v) in &provider.headers {
        req.headers_mut().insert(k.clone(), v.clone());
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
    if !status.is_success() {
        let retry_after = retry_after(resp.headers());
        let body = read_limited(resp.into_body(), provider.stream_idle_timeout).await;
        let message = adapter.error_message(&body);
        return Err(ProviderError::status(name, status.as_u16(), message)
            .with_retry_after(retry_after)
            .into());
    }

    if !stream {
        let body =
            match tokio::time::timeout(provider.stream_idle_timeout, resp.into_body().collect())
                .await
            {
                Err(_) => {
                    return Err(
                        ProviderError::new(name, FailureKind::StreamIdle, "body stalled").into(),
                    )
                }
                Ok(Err(e)) => {
                    return Err(ProviderError::new(
                        name,
                        FailureKind::StreamBroken,
                        error_chain(&e),
                    )
                    .into())
                }
                Ok(Ok(b)) => b.to_bytes(),
            };
        let chunk = adapter.parse_response(&call, &body)?;
        return Ok(Box::pin(futures_util::stream::once(
            async move { Ok(chunk) },
        )));
    }

    let events = BodyDataStream::new(resp.into_body()).eventsource();
    Ok(Box::pin(SseChunks {
        events,
        decoder: adapter.stream_decoder(&call),
        idle: Box::pin(tokio::time::sleep(provider.stream_idle_timeout)),
        idle_for: provider.stream_idle_timeout,
        provider: name,
        finished: false,
        saw_finish: false,
    }))
}

/// Reads at most [`MAX_ERROR_BODY`] bytes of a body, giving up after `idle`.
async fn read_limited(body: hyper::body::Incoming, idle: Duration) -> Bytes {
    let limited = http_body_util::Limited::new(body, MAX_ERROR_BODY);
    match tokio::time::timeout(idle, limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => Bytes::new(),
    }
}

/// `Retry-After` in seconds (integer or decimal), or `retry-after-ms`.
pub fn retry_after(headers: &::http::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    headers
        .get(::http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
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

pin_project_lite::pin_project! {
    /// SSE events → chunks, with an idle timeout between events.
    struct SseChunks {
        #[pin]
        events: EventStream<BodyDataStream<hyper::body::Incoming>>,
        decoder: Box<dyn StreamDecoder>,
        idle: Pin<Box<Sleep>>,
        idle_for: Duration,
        provider: Arc<str>,
        finished: bool,
        saw_finish: bool,
    }
}

impl Stream for SseChunks {
    type Item = Result<ChatChunk, GatewayError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        if *this.finished {
            return Poll::Ready(None);
        }
        loop {
            match this.events.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(event))) => {
                    let deadline = Instant::now() + *this.idle_for;
                    this.idle.as_mut().reset(deadline);
                    match this.decoder.decode(&event.event, &event.data) {
                        Ok(Decoded::Chunk(chunk)) => {
                            if chunk.finish_reason().is_some() {
                                *this.saw_finish = true;
                            }
                            return Poll::Ready(Some(Ok(chunk)));
                        }
                        Ok(Decoded::Skip) => continue,
                        Ok(Decoded::Done) => {
                            *this.finished = true;
                            return Poll::Ready(None);
                        }
                        Err(e) => {
                            *this.finished = true;
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    *this.finished = true;
                    let err = ProviderError::new(
                        this.provider.clone(),
                        FailureKind::StreamBroken,
                        e.to_string(),
                    );
                    return Poll::Ready(Some(Err(err.into())));
                }
                Poll::Ready(None) => {
                    *this.finished = true;
                    if *this.saw_finish {
                        return Poll::Ready(None);
                    }
                    let err = ProviderError::new(
                        this.provider.clone(),
                        FailureKind::StreamBroken,
                        "the stream ended before the answer was complete",
                    );
                    return Poll::Ready(Some(Err(err.into())));
                }
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        *this.finished = true;
                        let err = ProviderError::new(
                            this.provider.clone(),
                            FailureKind::StreamIdle,
                            format!("no event for {}s", this.idle_for.as_secs()),
                        );
                        return Poll::Ready(Some(Err(err.into())));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::retry_after;

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let mut h = ::http::HeaderMap::new();
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&h).unwrap().as_secs(), 3);
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&h).unwrap().as_millis(), 250);
    }
}
