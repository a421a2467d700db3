//! `DrainLayer`: when the shutdown grace runs out, every attempt still waiting on its
//! upstream fails with `server_shutting_down`, as an upstream failure would.
//!
//! [`Gateway::serve`](crate::gateway::Gateway::serve) stops accepting at SIGTERM and
//! lets requests in flight finish for `[server].shutdown_grace_secs`; then it calls
//! [`Drain::expire`]. The layer sits right around the provider client, under
//! [`MeteringLayer`](crate::metering::MeteringLayer), so the end of a request cut
//! there takes the path of a stream broken by its upstream: metering charges the
//! prompt and what was delivered, credit commits that charge, and Normalize writes
//! the dialect's mid-stream error (a chat chunk with `finish_reason: "error"` then
//! `data: [DONE]`, Anthropic's `event: error`, Responses' `response.failed`); a
//! request not yet answered gets a 503 body. [`GatewayError::ShuttingDown`] is not a
//! provider's failure: fallback does not retry it and health does not count it.
//!
//! Cost while not shutting down: one atomic load per poll of the attempt's future or
//! stream. The first time an attempt waits on its upstream, it registers its waker
//! with the drain's [`Notify`] (no allocation; registered again only if the task
//! polling it changes), so that [`Drain::expire`] wakes it.
//!
//! # Example
//! ```
//! use switchboard::chat::ChatChunk;
//! use switchboard::context::{ChunkStream, ProviderCall};
//! use switchboard::drain::{Drain, DrainLayer};
//! use switchboard::error::GatewayError;
//! use futures_util::StreamExt;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let catalog = switchboard::catalog::Catalog::from_config(&switchboard::config::Config::demo());
//! # let call = ProviderCall {
//! #     endpoint: catalog.endpoints()[0].clone(),
//! #     request: Default::default(),
//! #     ctx: Default::default(),
//! # };
//! let drain = Drain::new();
//! // An upstream that sends one chunk, then stalls.
//! let svc = ServiceBuilder::new().layer(DrainLayer::new(drain.clone())).service(service_fn(|_c: ProviderCall| async {
//!     let s: ChunkStream = Box::pin(
//!         futures_util::stream::iter([Ok(ChatChunk::text("hi"))]).chain(futures_util::stream::pending()),
//!     );
//!     Ok::<_, GatewayError>(s)
//! }));
//! let mut chunks = svc.oneshot(call).await.unwrap();
//! assert!(chunks.next().await.unwrap().is_ok());
//! drain.expire(); // the grace ran out
//! let err = chunks.next().await.unwrap().unwrap_err();
//! assert_eq!(err.code(), "server_shutting_down");
//! assert!(chunks.next().await.is_none());
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_util::Stream;
use pin_project_lite::pin_project;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tower::{Layer, Service};

use crate::chat::ChatChunk;
use crate::context::{ChunkStream, ProviderCall};
use crate::error::GatewayError;

/// The signal that the shutdown grace ran out; cheap to clone, shared by the layer
/// and whoever serves the gateway.
#[derive(Clone, Default)]
pub struct Drain(Arc<Shared>);

#[derive(Default)]
struct Shared {
    expired: AtomicBool,
    notify: Arc<Notify>,
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain")
            .field("expired", &self.is_expired())
            .finish()
    }
}

impl Drain {
    /// A drain that has not expired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends every attempt in flight, and every one started from now on, with
    /// [`GatewayError::ShuttingDown`].
    pub fn expire(&self) {
        self.0.expired.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Whether [`expire`](Self::expire) was called.
    pub fn is_expired(&self) -> bool {
        self.0.expired.load(Ordering::Acquire)
    }

    fn watch(&self) -> Watch {
        Watch {
            drain: self.clone(),
            notified: self.0.notify.clone().notified_owned(),
            waker: None,
        }
    }
}

/// The error of an attempt cut by the drain.
pub fn shutting_down() -> GatewayError {
    GatewayError::ShuttingDown(
        "the gateway is shutting down and this request did not finish within its shutdown grace ([server].shutdown_grace_secs); send it again"
            .into(),
    )
}

pin_project! {
    /// One attempt's view of the [`Drain`]: the flag, and a registration with the
    /// drain's `Notify` made the first time the attempt waits.
    struct Watch {
        drain: Drain,
        #[pin]
        notified: OwnedNotified,
        // The waker registered with `notified` (compared, not re-registered, while
        // the same task polls).
        waker: Option<Waker>,
    }
}

impl Watch {
    /// Whether the drain expired; call when the attempt is about to wait, so that
    /// the expiry wakes it.
    fn expired_or_register(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let this = self.project();
        if this.drain.is_expired() {
            return true;
        }
        if this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return false;
        }
        // Registers (or moves) the waker; `expire` sets the flag before it notifies.
        let notified = this.notified.poll(cx).is_ready();
        *this.waker = Some(cx.waker().clone());
        notified || this.drain.is_expired()
    }
}

/// Builds [`Drained`] services.
#[derive(Debug, Clone)]
pub struct DrainLayer {
    drain: Drain,
}

impl DrainLayer {
    /// Attempts end with [`GatewayError::ShuttingDown`] once `drain` expires.
    pub fn new(drain: Drain) -> Self {
        DrainLayer { drain }
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Drained<S>;
    fn layer(&self, inner: S) -> Drained<S> {
        Drained {
            inner,
            drain: self.drain.clone(),
        }
    }
}

/// Ends attempts when the drain expires; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Drained<S> {
    inner: S,
    drain: Drain,
}

impl<S> Drained<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, drain: Drain) -> Self {
        DrainLayer::new(drain).layer(inner)
    }

    /// A [`DrainLayer`].
    pub fn layer(drain: Drain) -> DrainLayer {
        DrainLayer::new(drain)
    }
}

impl<S> Service<ProviderCall> for Drained<S>
where
    S: Service<ProviderCall, Response = ChunkStream, Error = GatewayError>,
{
    type Response = ChunkStream;
    type Error = GatewayError;
    type Future = DrainedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: ProviderCall) -> Self::Future {
        DrainedFuture {
            inner: self.inner.call(call),
            watch: self.drain.watch(),
            drain: self.drain.clone(),
        }
    }
}

pin_project! {
    /// The [`Drained`] service's future: the attempt until its response head.
    pub struct DrainedFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        watch: Watch,
        drain: Drain,
    }
}

impl<F> std::fmt::Debug for DrainedFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainedFuture").finish_non_exhaustive()
    }
}

impl<F> Future for DrainedFuture<F>
where
    F: Future<Output = Result<ChunkStream, GatewayError>>,
{
    type Output = Result<ChunkStream, GatewayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // Checked first: an attempt started after the expiry never reaches its upstream.
        if this.drain.is_expired() {
            return Poll::Ready(Err(shutting_down()));
        }
        match this.inner.poll(cx) {
            Poll::Ready(Ok(inner)) => Poll::Ready(Ok(Box::pin(DrainedStream {
                inner: Some(inner),
                watch: this.drain.watch(),
            }))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.watch.expired_or_register(cx) => {
                Poll::Ready(Err(shutting_down()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

pin_project! {
    /// An attempt's chunks: the upstream's, then [`GatewayError::ShuttingDown`] if the
    /// drain expires first (the upstream stream is dropped then).
    struct DrainedStream {
        inner: Option<ChunkStream>,
        #[pin]
        watch: Watch,
    }
}

impl Stream for DrainedStream {
    type Item = Result<ChatChunk, GatewayError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        // Checked before the upstream too: a stream that never waits (chunks always
        // ready) is still cut when the grace runs out.
        if this.watch.drain.is_expired() {
            *this.inner = None;
            return Poll::Ready(Some(Err(shutting_down())));
        }
        match inner.as_mut().poll_next(cx) {
            Poll::Ready(item) => Poll::Ready(item),
            Poll::Pending if this.watch.as_mut().expired_or_register(cx) => {
                *this.inner = None;
                Poll::Ready(Some(Err(shutting_down())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::config::Config;
    use futures_util::StreamExt;
    use std::time::Duration;
    use tower::{service_fn, ServiceExt};

    fn call() -> ProviderCall {
        let catalog = Catalog::from_config(&Config::demo());
        ProviderCall {
            endpoint: catalog.endpoints()[0].clone(),
            request: Default::default(),
            ctx: Default::default(),
        }
    }

    /// A provider whose head comes after `head`, then `n` chunks one second apart,
    /// then silence.
    fn slow(
        head: Duration,
        n: usize,
    ) -> impl Service<
        ProviderCall,
        Response = ChunkStream,
        Error = GatewayError,
        Future = futures_util::future::BoxFuture<'static, Result<ChunkStream, GatewayError>>,
    > + Clone {
        service_fn(move |_c: ProviderCall| {
            Box::pin(async move {
                tokio::time::sleep(head).await;
                let s: ChunkStream = Box::pin(
                    futures_util::stream::iter(0..n)
                        .then(|i| async move {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            Ok(ChatChunk::text(format!("w{i} ")))
                        })
                        .chain(futures_util::stream::pending()),
                );
                Ok(s)
            }) as futures_util::future::BoxFuture<'static, _>
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_ends_with_shutting_down_when_the_grace_runs_out() {
        let drain = Drain::new();
        let svc = DrainLayer::new(drain.clone()).layer(slow(Duration::ZERO, 2));
        let mut chunks = svc.oneshot(call()).await.unwrap();
        let started = tokio::time::Instant::now();
        assert!(chunks.next().await.unwrap().is_ok());
        assert!(chunks.next().await.unwrap().is_ok());
        // The grace: 30 s from now; the stream is silent meanwhile.
        let d = drain.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            d.expire();
        });
        let err = tokio::time::timeout(Duration::from_secs(3600), chunks.next())
            .await
            .expect("the expiry wakes the stalled stream")
            .unwrap()
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(32));
        assert_eq!(err.code(), "server_shutting_down");
        assert_eq!(err.status(), 503);
        assert!(err.to_string().contains("shutdown_grace_secs"), "{err}");
        assert!(chunks.next().await.is_none(), "nothing after the error");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_for_its_head_and_one_started_after_get_503() {
        let drain = Drain::new();
        let svc = DrainLayer::new(drain.clone()).layer(slow(Duration::from_secs(600), 1));
        let waiting = tokio::spawn(svc.clone().oneshot(call()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished());
        drain.expire();
        let err = match waiting.await.unwrap() {
            Err(e) => e,
            Ok(_) => panic!("answered after the expiry"),
        };
        assert_eq!(err.code(), "server_shutting_down");
        // A new attempt (e.g. fallback's next) fails at once, before its upstream.
        let svc = DrainLayer::new(drain).layer(slow(Duration::ZERO, 1));
        assert!(matches!(
            svc.oneshot(call()).await,
            Err(GatewayError::ShuttingDown(_))
        ));
    }

    #[tokio::test]
    async fn a_stream_that_never_waits_is_cut_too_and_nothing_changes_before() {
        let drain = Drain::new();
        let svc = DrainLayer::new(drain.clone()).layer(service_fn(|_c: ProviderCall| async {
            let s: ChunkStream = Box::pin(futures_util::stream::repeat_with(|| {
                Ok(ChatChunk::text("x"))
            }));
            Ok::<_, GatewayError>(s)
        }));
        let mut chunks = svc.oneshot(call()).await.unwrap();
        for _ in 0..100 {
            assert!(chunks.next().await.unwrap().is_ok());
        }
        drain.expire();
        assert!(matches!(
            chunks.next().await,
            Some(Err(GatewayError::ShuttingDown(_)))
        ));
        assert!(chunks.next().await.is_none());
    }
}
