//! The response future of [`Logging`](super::Logging).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use super::{Guard, LoggedBody};

pin_project_lite::pin_project! {
    /// Resolves to the inner response with its body wrapped in [`LoggedBody`]. Dropped
    /// before that (the client went away early), it emits the record itself.
    pub struct ResponseFuture<F> {
        // Declared before `guard`: dropped first, so whatever it holds settles
        // before the record is emitted.
        #[pin]
        inner: F,
        guard: Option<Guard>,
        span: tracing::Span,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, guard: Guard, span: tracing::Span) -> Self {
        ResponseFuture {
            inner,
            guard: Some(guard),
            span,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<LoggedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let mut res = ready!(this.inner.poll(cx))?;
        let mut guard = this.guard.take();
        if let Some(g) = guard.as_ref() {
            // Layers that answer without the typed stack (auth, rate limits) may not
            // record the status they sent.
            g.note_status(res.status().as_u16());
            // Every response names its request, refusals included, so a client can
            // quote the id (and an operator find the record).
            if !res.headers().contains_key(crate::normalize::X_REQUEST_ID) {
                if let Ok(v) = http::HeaderValue::from_str(g.request_id()) {
                    res.headers_mut().insert(crate::normalize::X_REQUEST_ID, v);
                }
            }
        }
        let is_stream = res
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        if is_stream {
            if let Some(g) = guard.as_mut() {
                g.start_stream();
            }
        }
        let span = this.span.clone();
        Poll::Ready(Ok(res.map(|body| LoggedBody::new(body, guard, span))))
    }
}
