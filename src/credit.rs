//! `CreditLayer`: reserves a request's worst-case cost before any upstream is called,
//! and settles it to the metered cost, durably, before the response's last byte.
//!
//! Admission (SPEC §4): the reserve is an upper bound of the cost at the dearest
//! endpoint still in the plan — the prompt's bytes as its token bound (every token
//! is at least one byte) plus 3 tokens of framing per message and 3 to prime the
//! reply (and [`IMAGE_TOKEN_BOUND`] per image, [`TOOLS_TOKEN_BOUND`] with tools),
//! priced at the endpoint's dearest
//! prompt rate, plus `n` times the [completion bound](completion_bound) of one
//! choice — the request's `max_tokens` (else the model's `max_output_tokens`, else
//! [`DEFAULT_MAX_OUTPUT_TOKENS`]) — at its completion rate. Every adapter sends that
//! bound upstream as the provider's completion limit. An embeddings request (SPEC
//! §7.3) reserves its [inputs' bound](embeddings_prompt_bound) at the prompt rate and
//! no completion (no adapter sends it a completion limit). The tokens are reserved the
//! same way (the prompt bound plus `n` completion bounds). The ledger refuses with
//! 402 `insufficient_credits` when the key's credits or `limit_usd` remaining (after
//! what requests in flight hold) cannot cover the money, and with 429 until the next
//! UTC midnight when its `tokens_per_day` cannot hold today's tokens, those held in
//! flight and this request's. The ledger usually decides at once, in memory, and the
//! inner service is called right away; a shared store
//! ([`PgStore`](crate::store::PgStore)) may first need a round trip (its
//! [`Admission`](crate::store::Admission) is then a future), and the inner service is
//! called once it is granted.
//!
//! The charge never exceeds the reservation, whatever an upstream reports: the
//! reservation is recorded in the [`CallContext`] before any upstream is called,
//! metering caps the cost at it (and flags the request), and the settlement counts
//! at most the reserved tokens against the key's day.
//!
//! Settlement: the reply's chunk stream is wrapped. When it ends (or fails) the
//! charge — the cost that metering wrote into the [`CallContext`], the very number
//! the client sees as `usage.cost` — is committed through the ledger and awaited
//! *before* the stream reports its end, so `[DONE]` (or the JSON body) goes out
//! only after the commit. A stream dropped early (client gone) settles what was
//! delivered through the writer's channel without waiting (`Drop` cannot await). A
//! call that fails before a reply releases the reservation and charges nothing.
//! Calls without a key in their context (no `AuthLayer` in front) pass uncharged.
//!
//! Deferred settlement: when the request's context asks for it
//! ([`CallContext::defer_settlement`], set by the
//! [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer)), the settlement of a
//! reply that ends is not committed here but parked in the context as a
//! [`ParkedSettlement`], and the stream ends at once: the layer that asked commits it
//! together with the answer's idempotency record, in one commit, before it sends the
//! last bytes. A parked settlement that nobody takes commits itself alone when
//! dropped, so no path loses a charge.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use switchboard::{catalog::Catalog, config::{Config, StoreConfig}, credit::CreditLayer};
//! use switchboard::chat::{ChatChunk, ChatRequest, Message, Role};
//! use switchboard::context::{CallContext, ChatCall, ChatReply, ChunkStream};
//! use switchboard::error::GatewayError;
//! use switchboard::store::{hash_secret, KeyStore, Ledger, NewKey, SqliteStore};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = SqliteStore::open(&StoreConfig { url: "sqlite::memory:".into(), ..Default::default() }).unwrap();
//! // A key with a millionth of a dollar: not enough for a 1024-token reply at $2/Mtok.
//! let key = store.create(hash_secret("sk-poor"), NewKey::new("poor", "0.000001".parse().unwrap())).unwrap();
//! let catalog = Catalog::from_config(&Config::demo());
//! let svc = ServiceBuilder::new()
//!     .layer(CreditLayer::new(store.clone()))
//!     .service(service_fn(|_call: ChatCall| async {
//!         Err::<ChatReply, _>(GatewayError::Internal("never reached".into()))
//!     }));
//! let ctx = CallContext::new();
//! ctx.set_key(Arc::new(key.record.clone()));
//! let mut call = ChatCall::new(ChatRequest {
//!     model: "mock/echo".into(),
//!     messages: vec![Message::text(Role::User, "hi")],
//!     ..Default::default()
//! }, ctx);
//! call.plan = vec![catalog.endpoints()[0].clone()];
//! let err = svc.oneshot(call).await.unwrap_err();
//! assert_eq!(err.code(), "insufficient_credits");
//! assert_eq!(store.balance(&key.record.id).unwrap().reserved.pico(), 0);
//! # }
//! ```

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{self, BoxFuture, Either};
use futures_util::{FutureExt, Stream};
use tower::{Layer, Service};

use crate::catalog::{Endpoint, Pricing};
use crate::chat::{ChatChunk, ChatRequest};
use crate::context::{CallContext, ChatCall, ChatReply, ChunkStream};
use crate::error::GatewayError;
use crate::money::Money;
use crate::store::{Generation, GenerationAttempt, Ledger, Reservation, Settlement, StoreError};

/// The completion-token bound when neither the request nor the model gives one.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;

/// The prompt-token allowance per image part, on top of its bytes: providers price
/// an image by its size, not by the length of its URL (OpenAI ≤ ~1,100 tokens for a
/// high-detail 2048² image, Anthropic ~1,600 for its largest), so this is generous.
pub const IMAGE_TOKEN_BOUND: u64 = 4096;

/// The prompt-token allowance of a request with tools, on top of their bytes:
/// providers add a tool-use system prompt the client never sent (Anthropic: 313–530
/// tokens, by model and `tool_choice`), so a short request with one small tool would
/// otherwise count more prompt tokens than its bytes.
pub const TOOLS_TOKEN_BOUND: u64 = 1024;

/// Builds [`Credit`] services.
#[derive(Clone)]
pub struct CreditLayer {
    ledger: Arc<dyn Ledger>,
}

impl std::fmt::Debug for CreditLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreditLayer").finish_non_exhaustive()
    }
}

impl CreditLayer {
    /// Reserves and settles through `ledger`.
    pub fn new(ledger: Arc<dyn Ledger>) -> Self {
        CreditLayer { ledger }
    }
}

impl<S> Layer<S> for CreditLayer {
    type Service = Credit<S>;
    fn layer(&self, inner: S) -> Credit<S> {
        Credit::new(inner, self.ledger.clone())
    }
}

/// Reserves, calls, settles; see the [module docs](self).
#[derive(Clone)]
pub struct Credit<S> {
    inner: S,
    ledger: Arc<dyn Ledger>,
}

impl<S> std::fmt::Debug for Credit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credit").finish_non_exhaustive()
    }
}

impl<S> Credit<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, ledger: Arc<dyn Ledger>) -> Self {
        Credit { inner, ledger }
    }

    /// A [`CreditLayer`].
    pub fn layer(ledger: Arc<dyn Ledger>) -> CreditLayer {
        CreditLayer::new(ledger)
    }
}

/// The prompt-token bound of a request: its messages' (and tools') JSON bytes, plus
/// the framing tokens metering counts (3 per message, 3 to prime the reply), plus
/// [`IMAGE_TOKEN_BOUND`] per image and [`TOOLS_TOKEN_BOUND`] when it has tools; for
/// an embeddings request, [`embeddings_prompt_bound`].
pub fn prompt_bound(req: &ChatRequest) -> u64 {
    if let Some(e) = &req.inbound.embeddings {
        return embeddings_prompt_bound(e);
    }
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    let _ = serde_json::to_writer(&mut n, &req.messages);
    if let Some(tools) = req.tools.as_ref().filter(|t| !t.is_empty()) {
        let _ = serde_json::to_writer(&mut n, tools);
        n.0 += TOOLS_TOKEN_BOUND;
    }
    let images = req
        .messages
        .iter()
        .filter_map(|m| match &m.content {
            Some(crate::chat::Content::Parts(parts)) => Some(
                parts
                    .iter()
                    .filter(|p| matches!(p, crate::chat::ContentPart::ImageUrl { .. }))
                    .count() as u64,
            ),
            _ => None,
        })
        .sum::<u64>();
    // Bounded by the body size (`max_body_bytes`); saturating all the same.
    n.0.saturating_add(3)
        .saturating_add(3u64.saturating_mul(req.messages.len() as u64))
        .saturating_add(images.saturating_mul(IMAGE_TOKEN_BOUND))
}

/// The prompt-token bound of an embeddings request (SPEC §7.3): each text input's
/// bytes (every token is at least one byte) or each token-id input's length, plus
/// [`EMBEDDING_FRAMING_TOKENS`] per input.
pub fn embeddings_prompt_bound(e: &crate::chat::EmbeddingsInput) -> u64 {
    e.inputs
        .iter()
        .map(|i| match i {
            crate::chat::EmbeddingInput::Text(t) => t.len() as u64,
            crate::chat::EmbeddingInput::Tokens(ids) => ids.len() as u64,
        })
        .fold(0u64, |n, len| {
            n.saturating_add(len)
                .saturating_add(EMBEDDING_FRAMING_TOKENS)
        })
}

/// The prompt tokens allowed per embeddings input on top of its bytes: room for the
/// start / end markers some upstreams count.
pub const EMBEDDING_FRAMING_TOKENS: u64 = 2;

/// The completion-token bound of one choice of `req` at `endpoint`: the request's
/// `max_completion_tokens` / `max_tokens`, else the model's `max_output_tokens`, else
/// [`DEFAULT_MAX_OUTPUT_TOKENS`]; 0 for an embeddings request. Every adapter sends it upstream as the provider's
/// completion limit, so a reply cannot outgrow what admission reserved for it.
pub fn completion_bound(req: &ChatRequest, endpoint: &Endpoint) -> u32 {
    // Embeddings generate nothing: no completion is reserved, and none is charged.
    if req.inbound.is_embeddings() {
        return 0;
    }
    req.max_output_tokens()
        .or(endpoint.max_output_tokens)
        .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS as u32)
}

/// What admission holds for a request over a plan: the largest cost bound among its
/// endpoints (the [prompt bound](prompt_bound) at the dearest prompt rate plus `n`
/// [completion bounds](completion_bound) at the completion rate), and the largest
/// token bound (the prompt bound plus `n` completion bounds). A bound too large for
/// [`Money`] is `i64::MAX` pico-USD, which no key can cover.
pub fn reservation_for(req: &ChatRequest, plan: &[Arc<Endpoint>]) -> Reservation {
    let prompt = prompt_bound(req);
    let n = u64::from(req.choices());
    let mut hold = Reservation::NONE;
    for e in plan {
        // ≤ 128 × u32::MAX: no overflow.
        let completion = n * u64::from(completion_bound(req, e));
        hold.tokens = hold.tokens.max(prompt.saturating_add(completion));
        hold.amount = hold.amount.max(cost_bound(&e.pricing, prompt, completion));
    }
    hold
}

/// The money [`reservation_for`] a request over a plan.
pub fn reserve_for(req: &ChatRequest, plan: &[Arc<Endpoint>]) -> Money {
    reservation_for(req, plan).amount
}

/// `prompt` tokens at the dearest prompt-side rate plus `completion` tokens at the
/// completion rate, or `i64::MAX` pico-USD when that overflows.
fn cost_bound(p: &Pricing, prompt: u64, completion: u64) -> Money {
    let prompt_price = p.prompt.max(p.cache_read).max(p.cache_write);
    prompt_price
        .checked_times(prompt)
        .zip(p.completion.checked_times(completion))
        .and_then(|(a, b)| a.checked_add(b))
        .unwrap_or(Money::from_pico(i64::MAX))
}

/// The hold taken for a call by admission, recorded in the context so that metering
/// caps the charge at it.
fn charge_for(
    ledger: &Arc<dyn Ledger>,
    key_id: String,
    hold: Reservation,
    call: &ChatCall,
) -> Charge {
    call.ctx.set_reservation(hold);
    Charge {
        ledger: ledger.clone(),
        key_id,
        reserved: hold,
        ctx: call.ctx.clone(),
        done: false,
    }
}

/// Waits for the reply; wraps its chunks so that the charge settles before the end.
async fn respond<F>(reply: F, charge: Option<Charge>) -> Result<ChatReply, GatewayError>
where
    F: std::future::Future<Output = Result<ChatReply, GatewayError>>,
{
    // `charge` lives in this future: dropped before a reply, it releases.
    match reply.await {
        Ok(reply) => Ok(match charge {
            Some(charge) => ChatReply {
                endpoint: reply.endpoint,
                chunks: Box::pin(Settling {
                    inner: Some(reply.chunks),
                    charge: Some(charge),
                    commit: None,
                    error: None,
                    finished: false,
                }),
            },
            None => reply,
        }),
        Err(e) => {
            if let Some(c) = charge {
                c.release();
            }
            Err(e)
        }
    }
}

impl<S> Service<ChatCall> for Credit<S>
where
    S: Service<ChatCall, Response = ChatReply, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ChatReply;
    type Error = GatewayError;
    type Future = Either<
        future::Ready<Result<ChatReply, GatewayError>>,
        BoxFuture<'static, Result<ChatReply, GatewayError>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: ChatCall) -> Self::Future {
        let Some(key) = call.ctx.key() else {
            // No key (no AuthLayer in front): passes uncharged.
            return Either::Right(respond(self.inner.call(call), None).boxed());
        };
        let hold = reservation_for(&call.request, &call.plan);
        match self.ledger.reserve(key, hold) {
            // Decided in memory (the hot path): `inner` is called here and now.
            Either::Left(ready) => match ready.into_inner() {
                Ok(()) => {
                    let charge = charge_for(&self.ledger, key.id.clone(), hold, &call);
                    Either::Right(respond(self.inner.call(call), Some(charge)).boxed())
                }
                Err(e) => Either::Left(future::ready(Err(e))),
            },
            // The ledger has to ask its store first. `inner` is called after that, in
            // the future: take the service we readied and leave a clone in its place
            // (tower-service's "be careful when cloning inner services").
            Either::Right(admission) => {
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let ledger = self.ledger.clone();
                let key_id = key.id.clone();
                Either::Right(
                    async move {
                        admission.await?;
                        // Nothing awaits between the hold and the charge that owns it.
                        let charge = charge_for(&ledger, key_id, hold, &call);
                        respond(inner.call(call), Some(charge)).await
                    }
                    .boxed(),
                )
            }
        }
    }
}

/// A reservation waiting to be settled or released; settles from `Drop` if neither.
struct Charge {
    ledger: Arc<dyn Ledger>,
    key_id: String,
    reserved: Reservation,
    ctx: CallContext,
    done: bool,
}

impl Charge {
    /// The settlement of what the context says was served, or `None` when nothing was.
    fn settlement(&self) -> Option<Settlement> {
        let s = self.ctx.snapshot();
        let endpoint = s.served.clone()?;
        let (prompt, completion) = s
            .usage
            .as_ref()
            .map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens));
        // Metering prices a reply without completion tokens at zero (SPEC §4), and
        // caps the cost at the reservation; the charge is the context's cost, the same
        // integer the client sees. The cap here only guards a stack without metering.
        let cost = s.cost.min(self.reserved.amount);
        Some(Settlement {
            key_id: self.key_id.clone(),
            reserved: self.reserved,
            tokens: prompt.saturating_add(completion).min(self.reserved.tokens),
            generation: Generation {
                id: self.ctx.request_id().to_string(),
                key_id: self.key_id.clone(),
                model: (*endpoint.model).to_owned(),
                provider: (*endpoint.provider.name).to_owned(),
                streamed: s.streamed,
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_cost: cost,
                latency_ms: self.ctx.started().elapsed().as_millis() as u64,
                ttft_ms: s.ttft.map(|t| t.as_millis() as u64),
                attempts: s
                    .attempts
                    .iter()
                    .map(|a| GenerationAttempt {
                        provider: (*a.provider).to_owned(),
                        status: a.status.clone(),
                        latency_ms: a.latency.as_millis() as u64,
                    })
                    .collect(),
                finish_reason: s.finish_reason.clone(),
                created: self.ctx.created(),
                app_url: s.app_url,
                app_title: s.app_title,
                cache_hit: false,
            },
        })
    }

    fn release(mut self) {
        self.done = true;
        self.ledger.release(&self.key_id, self.reserved);
    }

    /// Sends the settlement; the future resolves once it is committed. A deferred
    /// one ([`CallContext::defer_settlement`]) is parked in the context instead.
    fn settle(mut self) -> Option<BoxFuture<'static, Result<bool, StoreError>>> {
        self.done = true;
        match self.settlement() {
            Some(s) if self.ctx.settlement_deferred() => {
                self.ctx
                    .park_settlement(ParkedSettlement::new(self.ledger.clone(), s));
                None
            }
            Some(s) => Some(self.ledger.settle(s)),
            None => {
                self.ledger.release(&self.key_id, self.reserved);
                None
            }
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        match self.settlement() {
            Some(s) => self.ledger.settle_detached(s),
            None => self.ledger.release(&self.key_id, self.reserved),
        }
    }
}

/// A settlement credit did not commit itself because the request asked it to wait
/// ([`CallContext::defer_settlement`]): parked in the request's context when its
/// reply ends, for the [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) to
/// commit together with the request's idempotency record
/// ([`commit_recorded`](Self::commit_recorded)), or alone ([`commit`](Self::commit)).
/// Dropped without either, it commits itself alone through the ledger's writer
/// (like a stream cut by the client), so no path loses a charge.
pub struct ParkedSettlement {
    ledger: Arc<dyn Ledger>,
    settlement: Option<Settlement>,
}

impl ParkedSettlement {
    /// `settlement`, to be committed through `ledger`.
    pub(crate) fn new(ledger: Arc<dyn Ledger>, settlement: Settlement) -> Self {
        ParkedSettlement {
            ledger,
            settlement: Some(settlement),
        }
    }

    /// The charge it holds.
    pub fn settlement(&self) -> Option<&Settlement> {
        self.settlement.as_ref()
    }

    /// The ledger it commits through.
    pub(crate) fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// Whether its ledger keeps idempotency records.
    pub fn keeps_records(&self) -> bool {
        self.ledger.keeps_idempotency_records()
    }

    /// Commits the settlement alone; resolves once it is committed.
    pub fn commit(mut self) -> BoxFuture<'static, Result<bool, StoreError>> {
        match self.settlement.take() {
            Some(s) => self.ledger.settle(s),
            None => future::ready(Ok(false)).boxed(),
        }
    }

    /// Commits the settlement and `record` in one commit; resolves once committed.
    pub fn commit_recorded(
        mut self,
        record: crate::store::IdempotencyRecord,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        match self.settlement.take() {
            Some(s) => self.ledger.settle_recorded(s, record),
            None => future::ready(Ok(false)).boxed(),
        }
    }
}

impl Drop for ParkedSettlement {
    fn drop(&mut self) {
        if let Some(s) = self.settlement.take() {
            self.ledger.settle_detached(s);
        }
    }
}

impl std::fmt::Debug for ParkedSettlement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkedSettlement")
            .field("id", &self.settlement.as_ref().map(|s| &s.generation.id))
            .finish_non_exhaustive()
    }
}

/// The reply's chunks; commits the charge before reporting the end.
struct Settling {
    inner: Option<ChunkStream>,
    charge: Option<Charge>,
    commit: Option<BoxFuture<'static, Result<bool, StoreError>>>,
    error: Option<GatewayError>,
    finished: bool,
}

impl Settling {
    /// Ends the upstream side and starts the commit.
    fn finish(&mut self) {
        // Drop the upstream stream first: a cut stream's metering records on drop.
        self.inner = None;
        self.finished = true;
        if let Some(charge) = self.charge.take() {
            self.commit = charge.settle();
        }
    }
}

impl Stream for Settling {
    type Item = Result<ChatChunk, GatewayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(commit) = this.commit.as_mut() {
                let result = futures_util::ready!(commit.as_mut().poll(cx));
                this.commit = None;
                if let Err(e) = result {
                    tracing::error!("could not commit a charge: {e}");
                    this.error.get_or_insert(if e.is_unavailable() {
                        // A shared store keeps the charge queued until it commits.
                        GatewayError::StoreUnavailable(
                            "the gateway's store did not confirm this request's charge in time; it stays queued and will be recorded"
                                .into(),
                        )
                    } else {
                        GatewayError::Internal(
                            "the gateway could not record this request's charge; it was not charged"
                                .into(),
                        )
                    });
                }
            }
            if this.finished {
                return Poll::Ready(this.error.take().map(Err));
            }
            let Some(inner) = this.inner.as_mut() else {
                this.finish();
                continue;
            };
            match futures_util::ready!(inner.as_mut().poll_next(cx)) {
                Some(Ok(chunk)) => return Poll::Ready(Some(Ok(chunk))),
                Some(Err(e)) => {
                    // Settle what was delivered before passing the error on.
                    this.error = Some(e);
                    this.finish();
                }
                None => this.finish(),
            }
        }
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        // Client gone: meter the cut (drop the upstream first), then settle detached.
        self.inner = None;
        self.charge = None;
    }
}

#[cfg(test)]
mod tests;
