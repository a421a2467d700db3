//! The first request's response body: passes frames through and keeps a copy; once
//! credit has parked the request's settlement it holds the frames that follow, and
//! when the inner body ends it commits the settlement (with the record of the answer,
//! when it is a complete 200) and only then lets the held frames go.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::flight::Claim;
use super::Pending;
use crate::context::CallContext;
use crate::credit::ParkedSettlement;
use crate::error::{Body, BoxError};
use crate::store::{IdempotencyLock, IdempotencyRecord, Ledger, StoreError};

/// The most body bytes recorded; a larger answer is not recorded (a repeat runs
/// again).
pub(crate) const MAX_RECORDED_BYTES: usize = 64 << 20;

enum State {
    /// Reading the inner body.
    Streaming,
    /// The settlement (and record) is being committed.
    Committing(BoxFuture<'static, Result<bool, StoreError>>),
    /// Letting the held frames go, then the end (or the inner body's error).
    Releasing,
    Done,
}

/// See the [module docs](self).
pub(crate) struct RecordingBody {
    inner: Body,
    ctx: CallContext,
    /// What the record needs besides the body; `None`: this answer is not recorded
    /// (not a 200).
    pending: Option<Pending>,
    /// Every body byte so far; `None` once recording was given up.
    recorded: Option<BytesMut>,
    parked: Option<ParkedSettlement>,
    held: VecDeque<Frame<Bytes>>,
    /// The inner body's error, passed on after the commit.
    error: Option<BoxError>,
    state: State,
    claim: Option<Claim>,
    lock: Option<IdempotencyLock>,
    /// The ledger and scope of a record being committed: if its commit fails but the
    /// charge stays queued (the store is unavailable), the claims are kept until the
    /// record lands, so that no repeat runs (and is charged) meanwhile.
    /// The last item is the record's expiry: past it the record would not be replayed
    /// anyway, so the claims are let go then at the latest.
    awaiting: Option<(Arc<dyn Ledger>, String, String, u64)>,
    /// The layer's clock, for reading the record back as the layer would.
    clock: super::Clock,
}

impl RecordingBody {
    pub(crate) fn new(
        inner: Body,
        ctx: CallContext,
        pending: Option<Pending>,
        claim: Claim,
        lock: IdempotencyLock,
        clock: super::Clock,
    ) -> Self {
        RecordingBody {
            inner,
            ctx,
            recorded: pending.as_ref().map(|_| BytesMut::new()),
            pending,
            parked: None,
            held: VecDeque::new(),
            error: None,
            state: State::Streaming,
            claim: Some(claim),
            lock: Some(lock),
            awaiting: None,
            clock,
        }
    }

    /// The inner body ended (or failed): commits what is parked, with the record when
    /// the answer is a complete 200.
    fn finish(&mut self) {
        if self.parked.is_none() {
            self.parked = self.ctx.take_parked_settlement();
        }
        let Some(parked) = self.parked.take() else {
            // Nothing charged (no credit in the stack, a refusal, a cache hit): no
            // record, and nothing to wait for.
            self.state = State::Releasing;
            return;
        };
        let failed = self.error.is_some() || self.ctx.snapshot().error_code.is_some();
        let record = match (self.pending.take(), self.recorded.take()) {
            (Some(p), Some(body)) if !failed => Some(p.into_record(body.freeze())),
            _ => None,
        };
        self.state = State::Committing(match record {
            Some(r) => {
                self.awaiting = Some((
                    parked.ledger().clone(),
                    r.key_id.clone(),
                    r.idem_key.clone(),
                    r.expires,
                ));
                parked.commit_recorded(r)
            }
            None => parked.commit(),
        });
    }

    /// The commit of charge and record failed, but both stay queued and will land
    /// (the store is unavailable; PostgreSQL's spill file keeps them). A repeat that
    /// ran meanwhile would be charged a second time, so the claims move to a task
    /// that holds them until the record can be read back.
    fn keep_claims_until_recorded(&mut self) {
        let Some((ledger, key_id, idem_key, expires)) = self.awaiting.take() else {
            return;
        };
        let (claim, lock) = (self.claim.take(), self.lock.take());
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let clock = self.clock.clone();
        rt.spawn(async move {
            let mut wait = std::time::Duration::from_millis(250);
            loop {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
                let now = clock();
                if now >= expires {
                    tracing::warn!(
                        "Idempotency-Key {idem_key:?}: its record did not land before it expired; repeats run again"
                    );
                    break;
                }
                match ledger.idempotency_record(&key_id, &idem_key, now).await {
                    Ok(Some(_)) => break,
                    Ok(None) | Err(_) => continue,
                }
            }
            drop((claim, lock));
        });
    }

    /// Releases the claims: a repeat waiting for this request looks again.
    fn release_claims(&mut self) {
        self.lock = None;
        self.claim = None;
    }
}

impl HttpBody for RecordingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Streaming => match Pin::new(&mut this.inner).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(data), Some(rec)) = (frame.data_ref(), &mut this.recorded) {
                            if rec.len() + data.len() > MAX_RECORDED_BYTES {
                                tracing::warn!(
                                    "request {}: an answer over {MAX_RECORDED_BYTES} bytes is not recorded for its Idempotency-Key",
                                    this.ctx.request_id()
                                );
                                this.recorded = None;
                            } else {
                                rec.extend_from_slice(data);
                            }
                        }
                        if this.parked.is_none() {
                            this.parked = this.ctx.take_parked_settlement();
                        }
                        // Settled upstream-side: what follows waits for the commit.
                        if this.parked.is_some() {
                            this.held.push_back(frame);
                            continue;
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Poll::Ready(Some(Err(e))) => {
                        this.error = Some(e.into());
                        this.finish();
                    }
                    Poll::Ready(None) => this.finish(),
                },
                State::Committing(commit) => {
                    let result = futures_util::ready!(commit.as_mut().poll(cx));
                    if let Err(e) = result {
                        tracing::error!(
                            "request {}: could not commit its charge (and its idempotency record): {e}",
                            this.ctx.request_id()
                        );
                        // The end is never sent for a charge that is not committed:
                        // the client sees the answer cut, as SPEC §4 requires.
                        this.held.clear();
                        this.error.get_or_insert_with(|| {
                            format!("the gateway could not record this request's charge: {e}")
                                .into()
                        });
                        if e.is_unavailable() {
                            this.keep_claims_until_recorded();
                        }
                    }
                    this.release_claims();
                    this.state = State::Releasing;
                }
                State::Releasing => {
                    if let Some(frame) = this.held.pop_front() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    this.release_claims();
                    this.state = State::Done;
                    if let Some(e) = this.error.take() {
                        return Poll::Ready(Some(Err(e)));
                    }
                    return Poll::Ready(None);
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            // A whole body (a non-stream answer) keeps its length.
            State::Streaming if self.held.is_empty() => self.inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for RecordingBody {
    fn drop(&mut self) {
        // The client went away: the inner body (and a stream's charge, which then
        // settles what was delivered) goes first; a settlement parked meanwhile
        // commits alone; then the claims end, and a repeat runs again.
        self.inner = Body::empty();
        drop(self.parked.take());
        drop(self.ctx.take_parked_settlement());
        self.release_claims();
    }
}

/// A recorded answer as a response (SPEC §8.2's replay).
pub(crate) fn replay(record: &IdempotencyRecord) -> http::Response<Body> {
    let mut res = http::Response::new(Body::from(record.body.clone()));
    *res.status_mut() = http::StatusCode::from_u16(record.status).unwrap_or(http::StatusCode::OK);
    let h = res.headers_mut();
    for (name, value) in &record.headers {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            h.append(n, v);
        }
    }
    h.insert(
        super::IDEMPOTENT_REPLAYED,
        http::HeaderValue::from_static("true"),
    );
    res
}
