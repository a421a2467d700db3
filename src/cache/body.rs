//! The two bodies of the cache: the leader's, recorded as it passes (and stored when
//! it ends cleanly), and a streamed follower's, the leader's events as they arrive,
//! rewritten for the follower.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use pin_project_lite::pin_project;

use super::answer::{self, AnswerMeta, CachedAnswer};
use super::backend::{unix_ms, CacheBackend};
use super::flight::{End, Flight, LeadGuard, Waiting};
use super::key::CacheKey;
use crate::context::CallContext;
use crate::error::{Body, BoxError, GatewayError};
use crate::normalize::DONE_EVENT;

/// What the leader's body needs to store its answer at the end.
pub(crate) struct Recorder {
    pub guard: LeadGuard,
    pub ctx: Option<CallContext>,
    pub backend: Arc<dyn CacheBackend>,
    pub key: CacheKey,
    pub ttl_secs: u64,
    pub sse: bool,
}

impl Recorder {
    /// The body ended: stores the answer when it is complete and clean (no error
    /// recorded in the context; a stream ending as a complete one does,
    /// [`stream_complete`](crate::normalize::stream_complete)), and ends the flight.
    fn finish(self) {
        let (clean, finish_reason, served) = match &self.ctx {
            Some(ctx) => ctx.update(|s| {
                (
                    s.error_code.is_none() && s.finish_reason.as_deref() != Some("error"),
                    s.finish_reason.clone(),
                    s.served.clone(),
                )
            }),
            None => (true, None, None),
        };
        let Some(head) = self.guard.head() else {
            return; // dropped: failed
        };
        let raw = self.guard.body();
        if !clean || (self.sse && !crate::normalize::stream_complete(&raw)) {
            return;
        }
        let (mut body, mut id_at) = (Vec::with_capacity(raw.len()), Vec::new());
        answer::template(&raw, self.sse, &head.old_id, &mut body, &mut id_at);
        let answer = Arc::new(CachedAnswer {
            meta: AnswerMeta {
                content_type: head.content_type.clone(),
                // An early-committed stream has no `X-Provider`: the context knows.
                provider: head
                    .provider
                    .clone()
                    .or_else(|| served.as_ref().map(|e| e.provider.name.to_string())),
                model: head
                    .model
                    .clone()
                    .or_else(|| served.as_ref().map(|e| e.model.to_string())),
                finish_reason,
                streamed: self.sse,
                ttl_secs: self.ttl_secs,
                expires_unix_ms: unix_ms() + self.ttl_secs * 1000,
                id_at,
                id_len: head.old_id.len() as u32,
            },
            body: Bytes::from(body),
        });
        self.backend.put(&self.key, answer.clone());
        self.guard.finish(answer);
    }
}

pin_project! {
    /// The leader's body: passes every frame on, and records it for the followers and
    /// the store.
    pub(crate) struct RecordingBody {
        #[pin]
        inner: Body,
        rec: Option<Recorder>,
    }
}

impl RecordingBody {
    pub fn new(inner: Body, rec: Recorder) -> Self {
        RecordingBody {
            inner,
            rec: Some(rec),
        }
    }
}

impl http_body::Body for RecordingBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(rec)) = (frame.data_ref(), this.rec.as_ref()) {
                    if !rec.guard.push(data) {
                        // Past the bound: not stored; followers run on their own.
                        *this.rec = None;
                    }
                }
                // A body of known length is not polled again after its last frame
                // (hyper stops at `is_end_stream`): it ends here.
                if this.inner.is_end_stream() {
                    if let Some(rec) = this.rec.take() {
                        rec.finish();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                *this.rec = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                if let Some(rec) = this.rec.take() {
                    rec.finish();
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A streamed follower's body: the leader's events from the first, each rewritten
/// (the follower's id, usage zeroed) once complete, until the leader's end; an error
/// event and `[DONE]` if the leader fails after this follower's answer started.
pub(crate) fn follower_body(
    flight: Arc<Flight>,
    old_id: String,
    new_id: String,
    ctx: CallContext,
    waiting: Waiting,
) -> Body {
    struct F {
        flight: Arc<Flight>,
        changes: tokio::sync::watch::Receiver<u64>,
        cursor: usize,
        pending: Vec<u8>,
        old_id: String,
        new_id: String,
        ctx: CallContext,
        sent_done: bool,
        over: bool,
        /// Counted as waiting until the stream ends (or is dropped).
        _waiting: Waiting,
    }
    let changes = flight.changes();
    let state = F {
        flight,
        changes,
        cursor: 0,
        pending: Vec::new(),
        old_id,
        new_id,
        ctx,
        sent_done: false,
        over: false,
        _waiting: waiting,
    };
    let stream = futures_util::stream::unfold(state, |mut f| async move {
        loop {
            if f.over {
                return None;
            }
            f.changes.borrow_and_update();
            let end = {
                let st = f.flight.state.lock();
                for frame in &st.frames[f.cursor..] {
                    f.pending.extend_from_slice(frame);
                }
                f.cursor = st.frames.len();
                st.end.clone()
            };
            // Complete events only: a frame may end inside one.
            let cut = memchr::memmem::rfind(&f.pending, b"\n\n").map(|i| i + 2);
            let ready = match (cut, &end) {
                (Some(cut), _) => Some(cut),
                (None, Some(End::Done(_))) if !f.pending.is_empty() => Some(f.pending.len()),
                _ => None,
            };
            if let Some(cut) = ready {
                let mut out = Vec::with_capacity(cut + 64);
                answer::rewrite_sse(&f.pending[..cut], &f.old_id, &f.new_id, &mut out);
                f.pending.drain(..cut);
                f.sent_done |= crate::normalize::stream_complete(&out);
                if !out.is_empty() {
                    return Some((Ok::<_, BoxError>(Bytes::from(out)), f));
                }
                continue;
            }
            match end {
                Some(End::Done(_)) => return None,
                Some(End::Failed) => {
                    f.over = true;
                    if f.sent_done {
                        return None;
                    }
                    let e = GatewayError::UpstreamError(
                        "the identical request this one was following failed mid-stream".into(),
                    );
                    f.ctx.update(|s| {
                        s.error_code = Some(e.code());
                        s.finish_reason = Some("error".into());
                    });
                    let chunk = serde_json::json!({
                        "id": f.new_id,
                        "object": "chat.completion.chunk",
                        "error": e.to_json(),
                        "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}],
                    });
                    let mut out = format!("data: {chunk}\n\n").into_bytes();
                    out.extend_from_slice(DONE_EVENT);
                    return Some((Ok(Bytes::from(out)), f));
                }
                None => {
                    if f.changes.changed().await.is_err() {
                        f.over = true;
                    }
                }
            }
        }
    });
    Body::from_stream(stream)
}
