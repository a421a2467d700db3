//! `RateLimitLayer`: holds each key to its `rpm` (requests per minute).
//!
//! Runs after [`AuthLayer`](crate::auth::AuthLayer) and reads the `Arc<KeyRecord>`
//! it put in the request's extensions (requests without one pass). Each distinct
//! `rpm` value has one governor keyed limiter (GCRA, keyed by key id, burst = `rpm`,
//! one request back every `60/rpm` s), so keys with different limits never share a
//! budget. Over the limit: 429 `rate_limited` with `Retry-After` in whole seconds,
//! rounded up. Time comes from [`TokioClock`], so tests can pause it.
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

use std::collections::HashMap;
use std::convert::Infallible;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{self, Either, Ready};
use governor::clock::Clock;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use http::{Request, Response};
use tower::{Layer, Service};

use crate::error::{Body, GatewayError};
use crate::keys::KeyRecord;

/// A governor clock that reads tokio's clock (so `tokio::time::pause` applies).
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            base: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.base)
    }
}

type KeyedLimiter = RateLimiter<
    String,
    DashMapStateStore<String>,
    TokioClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;

/// Builds [`RateLimit`] services; clones share the same limiters.
#[derive(Clone, Default)]
pub struct RateLimitLayer {
    limiters: Arc<RwLock<HashMap<u32, Arc<KeyedLimiter>>>>,
    clock: TokioClock,
}

impl std::fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer").finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// Limiters on tokio's clock, starting now.
    pub fn new() -> Self {
        Self::default()
    }

    /// The limiter of one `rpm` value, made on first use.
    fn limiter(&self, rpm: NonZeroU32) -> Arc<KeyedLimiter> {
        if let Some(l) = self
            .limiters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&rpm.get())
        {
            return l.clone();
        }
        let mut map = self.limiters.write().unwrap_or_else(|e| e.into_inner());
        map.entry(rpm.get())
            .or_insert_with(|| {
                Arc::new(RateLimiter::new(
                    Quota::per_minute(rpm),
                    DashMapStateStore::default(),
                    self.clock.clone(),
                ))
            })
            .clone()
    }

    /// Counts one request of `key`; the error is the SPEC's 429.
    pub fn check(&self, key: &KeyRecord) -> Result<(), GatewayError> {
        let Some(rpm) = key.rpm.and_then(NonZeroU32::new) else {
            return Ok(());
        };
        self.limiter(rpm).check_key(&key.id).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            GatewayError::RateLimited {
                message: format!(
                    "key `{}` is limited to {rpm} requests per minute; retry later",
                    key.name
                ),
                retry_after: Some(wait.max(Duration::from_secs(1))),
            }
        })
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// Applies per-key `rpm`; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

impl<S> RateLimit<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        RateLimitLayer::new().layer(inner)
    }

    /// A [`RateLimitLayer`].
    pub fn layer() -> RateLimitLayer {
        RateLimitLayer::new()
    }
}

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // `call` calls `inner` at once (the check is synchronous).
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(key) = req.extensions().get::<Arc<KeyRecord>>() {
            if let Err(e) = self.layer.check(key) {
                return Either::Left(future::ready(Ok(e.into_response())));
            }
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    fn svc(
        layer: &RateLimitLayer,
    ) -> impl Service<Request<()>, Response = Response<Body>, Error = Infallible> + Clone {
        layer.layer(service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        }))
    }

    fn req(key: &Arc<KeyRecord>) -> Request<()> {
        let mut r = Request::new(());
        r.extensions_mut().insert(key.clone());
        r
    }

    #[tokio::test(start_paused = true)]
    async fn rpm_is_exhausted_then_refills_with_time() {
        let layer = RateLimitLayer::new();
        let s = svc(&layer);
        let alice = Arc::new(KeyRecord {
            rpm: Some(3),
            ..KeyRecord::new("key_a", "alice")
        });
        let bob = Arc::new(KeyRecord {
            rpm: Some(600),
            ..KeyRecord::new("key_b", "bob")
        });
        for _ in 0..3 {
            assert_eq!(s.clone().oneshot(req(&alice)).await.unwrap().status(), 200);
        }
        let res = s.clone().oneshot(req(&alice)).await.unwrap();
        assert_eq!(res.status(), 429);
        // One request comes back every 20 s.
        assert_eq!(res.headers()["retry-after"], "20");
        // Other keys have their own budget.
        assert_eq!(s.clone().oneshot(req(&bob)).await.unwrap().status(), 200);

        tokio::time::advance(Duration::from_secs(19)).await;
        let res = s.clone().oneshot(req(&alice)).await.unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()["retry-after"], "1");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(s.clone().oneshot(req(&alice)).await.unwrap().status(), 200);
        assert_eq!(s.clone().oneshot(req(&alice)).await.unwrap().status(), 429);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_without_rpm_and_requests_without_keys_pass() {
        let layer = RateLimitLayer::new();
        let s = svc(&layer);
        let free = Arc::new(KeyRecord::new("key_f", "free"));
        for _ in 0..1000 {
            assert_eq!(s.clone().oneshot(req(&free)).await.unwrap().status(), 200);
        }
        assert_eq!(
            s.clone().oneshot(Request::new(())).await.unwrap().status(),
            200
        );
    }
}
