//! `RateLimitLayer`: holds each key to its `rpm` (requests per minute).
//!
//! Runs after [`AuthLayer`](crate::auth::AuthLayer) and reads the `Arc<KeyRecord>`
//! it put in the request's extensions (requests without one, and keys without `rpm`,
//! pass at once). The budget is GCRA (burst = `rpm`, one request back every `60/rpm`
//! s), kept by an [`RpmLimiter`]:
//! - [`LocalRpm`] (the default): this process's memory (governor, keyed by key id,
//!   one limiter per distinct `rpm` value, so keys with different limits never share
//!   a budget); time comes from [`TokioClock`], so tests can pause it;
//! - [`RedisRpm`] (`[shared].redis_url`): one budget per key across every instance,
//!   in one atomic Lua script on Redis's own clock, falling back to a [`LocalRpm`]
//!   while Redis is down.
//!
//! Over the limit: 429 `rate_limited` with `Retry-After` in whole seconds, rounded up.
//! (`tokens_per_day` is not here: it is charged after the fact and must survive a
//! restart, so it lives with the ledger and is checked by `CreditLayer`.)
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use switchboard::{keys::KeyRecord, rate_limit::RateLimitLayer};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new())
//!     .service(service_fn(|_req: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
//!     }));
//! let key = Arc::new(KeyRecord { rpm: Some(1), ..KeyRecord::new("key_1", "alice") });
//! let req = || {
//!     let mut r = http::Request::new(());
//!     r.extensions_mut().insert(key.clone());
//!     r
//! };
//! assert_eq!(svc.clone().oneshot(req()).await.unwrap().status(), 200);
//! let res = svc.oneshot(req()).await.unwrap();
//! assert_eq!(res.status(), 429);
//! assert_eq!(res.headers()["retry-after"], "60");
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::error::{Body, GatewayError};
use crate::keys::KeyRecord;

mod local;
mod redis;

pub use self::local::{LocalRpm, TokioClock};
pub use self::redis::RedisRpm;

/// What an [`RpmLimiter`] decides: admitted, or refused until the wait has passed.
pub type Verdict = Result<(), Duration>;

/// An [`RpmLimiter`]'s answer: at once, or after a round trip.
pub enum Check {
    /// Decided without waiting (no allocation on this path).
    Ready(Verdict),
    /// Decided by a future (e.g. a Redis call).
    Pending(Pin<Box<dyn Future<Output = Verdict> + Send>>),
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Ready(v) => f.debug_tuple("Ready").field(v).finish(),
            Check::Pending(_) => f.write_str("Pending(..)"),
        }
    }
}

/// Counts one request of a key against its `rpm` budget (GCRA: burst `rpm`, one back
/// every `60/rpm` s). [`LocalRpm`] and [`RedisRpm`] implement it; see the
/// [module docs](self).
///
/// # Example: a limiter that admits everything
/// ```
/// use std::num::NonZeroU32;
/// use switchboard::keys::KeyRecord;
/// use switchboard::rate_limit::{Check, RateLimitLayer, RpmLimiter};
///
/// struct Unlimited;
/// impl RpmLimiter for Unlimited {
///     fn check(&self, _key: &KeyRecord, _rpm: NonZeroU32) -> Check {
///         Check::Ready(Ok(()))
///     }
/// }
/// let layer = RateLimitLayer::with_limiter(std::sync::Arc::new(Unlimited));
/// # let _ = layer;
/// ```
pub trait RpmLimiter: Send + Sync + 'static {
    /// Counts one request of `key` (by its id), limited to `rpm`.
    fn check(&self, key: &KeyRecord, rpm: NonZeroU32) -> Check;
}

/// Builds [`RateLimit`] services; clones share the same limiter.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<dyn RpmLimiter>,
}

impl Default for RateLimitLayer {
    fn default() -> Self {
        RateLimitLayer::new()
    }
}

impl std::fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer").finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// Limits in this process's memory ([`LocalRpm`]), on tokio's clock, starting now.
    pub fn new() -> Self {
        Self::with_limiter(Arc::new(LocalRpm::new()))
    }

    /// One budget per key across every instance sharing `state` ([`RedisRpm`]).
    pub fn shared(state: crate::shared::SharedState) -> Self {
        Self::with_limiter(Arc::new(RedisRpm::new(state)))
    }

    /// Limits with `limiter`.
    pub fn with_limiter(limiter: Arc<dyn RpmLimiter>) -> Self {
        RateLimitLayer { limiter }
    }
}

/// The SPEC's 429 for `key`.
fn refusal(key: &KeyRecord, rpm: NonZeroU32, wait: Duration) -> GatewayError {
    GatewayError::RateLimited {
        message: format!(
            "key `{}` is limited to {rpm} requests per minute; retry later",
            key.name
        ),
        retry_after: Some(wait.max(Duration::from_secs(1))),
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// Applies per-key `rpm`; see the [module docs](self).
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<dyn RpmLimiter>,
}

impl<S> std::fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit").finish_non_exhaustive()
    }
}

impl<S> RateLimit<S> {
    /// Wraps `inner` with a [`LocalRpm`].
    pub fn new(inner: S) -> Self {
        RateLimitLayer::new().layer(inner)
    }

    /// A [`RateLimitLayer`] with a [`LocalRpm`].
    pub fn layer() -> RateLimitLayer {
        RateLimitLayer::new()
    }
}

pin_project! {
    /// The [`RateLimit`] service's future.
    pub struct RateLimitFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        // Waiting for the limiter; holds the ready inner service and the request.
        // (Boxed: only the shared limiter's path pays for holding them.)
        Checking { checking: Option<Box<Checking<S, B>>> },
        // Admitted: the inner service's future.
        Called { #[pin] fut: S::Future },
        // Refused (or done).
        Refused { res: Option<Response<Body>> },
    }
}

/// What waits for a pending limiter: the ready inner service and the request.
struct Checking<S, B> {
    check: Pin<Box<dyn Future<Output = Verdict> + Send>>,
    inner: S,
    req: Request<B>,
    key: Arc<KeyRecord>,
    rpm: NonZeroU32,
}

impl<S, B> RateLimitFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn new(state: State<S, B>) -> Self {
        RateLimitFuture { state }
    }
}

impl<S, B> std::fmt::Debug for RateLimitFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitFuture").finish_non_exhaustive()
    }
}

impl<S, B> Future for RateLimitFuture<S, B>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Called { fut } => return fut.poll(cx),
                StateProj::Refused { res } => {
                    return Poll::Ready(Ok(res
                        .take()
                        .expect("RateLimitFuture polled after completion")))
                }
                StateProj::Checking { checking } => {
                    let c = checking.as_mut().expect("polled after completion");
                    let verdict = ready!(c.check.as_mut().poll(cx));
                    let Checking {
                        mut inner,
                        req,
                        key,
                        rpm,
                        ..
                    } = *checking.take().expect("polled after completion");
                    let next = match verdict {
                        Ok(()) => State::Called {
                            fut: inner.call(req),
                        },
                        Err(wait) => State::Refused {
                            res: Some(refusal(&key, rpm, wait).into_response()),
                        },
                    };
                    state.set(next);
                }
            }
        }
    }
}

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Clone,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RateLimitFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // `call` either calls `inner` at once, or moves this (ready) `inner` into its
        // future to call it once the limiter has answered.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let limited = req
            .extensions()
            .get::<Arc<KeyRecord>>()
            .and_then(|k| Some((k, k.rpm.and_then(NonZeroU32::new)?)));
        let Some((key, rpm)) = limited else {
            return RateLimitFuture::new(State::Called {
                fut: self.inner.call(req),
            });
        };
        match self.limiter.check(key, rpm) {
            Check::Ready(Ok(())) => RateLimitFuture::new(State::Called {
                fut: self.inner.call(req),
            }),
            Check::Ready(Err(wait)) => RateLimitFuture::new(State::Refused {
                res: Some(refusal(key, rpm, wait).into_response()),
            }),
            Check::Pending(check) => {
                let key = key.clone();
                // The service that was polled ready goes into the future; a clone
                // (not yet polled) stays for the next request (tower-service's "Be
                // careful when cloning inner services").
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                RateLimitFuture::new(State::Checking {
                    checking: Some(Box::new(Checking {
                        check,
                        inner,
                        req,
                        key,
                        rpm,
                    })),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests;
