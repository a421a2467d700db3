//! The response body of [`Logging`](super::Logging).

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};

use super::Guard;

pin_project_lite::pin_project! {
    /// A response body that emits its request's record when it ends, fails or is
    /// dropped — after the inner body is dropped (field order), so the settlement held
    /// inside comes first.
    pub struct LoggedBody<B> {
        #[pin]
        inner: B,
        guard: Option<Guard>,
        span: tracing::Span,
    }
}

impl<B> LoggedBody<B> {
    pub(crate) fn new(inner: B, guard: Option<Guard>, span: tracing::Span) -> Self {
        LoggedBody { inner, guard, span }
    }
}

impl<B: Body> Body for LoggedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let polled = this.inner.as_mut().poll_frame(cx);
        // The end is `None`, or a last frame after which the body says it is done
        // (hyper stops polling a body that reports its end).
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if ended {
            if let Some(g) = this.guard.as_mut() {
                g.set_complete();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
