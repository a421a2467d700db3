//! `AuthLayer`: only callers with a known, enabled key get past it.
//!
//! The key arrives as `Authorization: Bearer KEY` or `x-api-key: KEY`. No key, an
//! unknown one, a deleted one ("key deleted"), one past its `expires_at` (message
//! "key expired") or an old secret past the grace period of a rotation (the times
//! are checked at every request, cached record or not, by the layer's [`Clock`]) is
//! answered 401 `invalid_api_key`, a disabled one 403 `forbidden`,
//! in the error format of SPEC §3.2 (the model allow-list is checked later, by
//! routing, where the model is known). The secret is hashed (SHA-256) and looked up
//! in the [`KeyStore`]; the key's *record* — never its balance — is cached for a few
//! seconds ([`DEFAULT_TTL`]), so a hot key costs no I/O and a key disabled elsewhere
//! (the CLI, another process) is refused within seconds. Unknown secrets are
//! remembered briefly too, so a flood of bad keys does not reach the store. The
//! record goes into the request's extensions as an `Arc<KeyRecord>`.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use switchboard::auth::AuthLayer;
//! use switchboard::config::StoreConfig;
//! use switchboard::keys::KeyRecord;
//! use switchboard::store::{hash_secret, KeyStore, NewKey, SqliteStore};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = SqliteStore::open(&StoreConfig { url: "sqlite::memory:".into(), ..Default::default() }).unwrap();
//! store.create(hash_secret("sk-alice"), NewKey::new("alice", "1".parse().unwrap())).unwrap();
//! let svc = ServiceBuilder::new()
//!     .layer(AuthLayer::new(store))
//!     .service(service_fn(|req: http::Request<String>| async move {
//!         let key = req.extensions().get::<Arc<KeyRecord>>().unwrap();
//!         Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::from(key.name.clone())))
//!     }));
//! let ok = http::Request::get("/").header("authorization", "Bearer sk-alice").body(String::new()).unwrap();
//! assert_eq!(svc.clone().oneshot(ok).await.unwrap().status(), 200);
//! let bad = http::Request::get("/").header("x-api-key", "sk-nobody").body(String::new()).unwrap();
//! assert_eq!(svc.oneshot(bad).await.unwrap().status(), 401);
//! # }
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{self, BoxFuture};
use http::{Request, Response};
use moka::sync::Cache;
use tower::{Layer, Service, ServiceExt};

use crate::clock::Clock;
use crate::error::{Body, GatewayError};
use crate::keys::KeyRecord;
use crate::store::{hash_secret, KeyStore, SecretHash};

/// How long a key record is cached: a disable made elsewhere counts within this.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);
/// How long an unknown secret is remembered as unknown.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(2);

/// Builds [`Auth`] services; clones share one cache.
#[derive(Clone)]
pub struct AuthLayer {
    keys: Arc<dyn KeyStore>,
    known: Cache<SecretHash, Arc<KeyRecord>>,
    unknown: Cache<SecretHash, ()>,
    clock: Clock,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer").finish_non_exhaustive()
    }
}

impl AuthLayer {
    /// Authenticates against `keys`, caching records for [`DEFAULT_TTL`].
    pub fn new(keys: Arc<dyn KeyStore>) -> Self {
        Self::with_ttl(keys, DEFAULT_TTL)
    }

    /// Authenticates against `keys`, caching records for `ttl`.
    pub fn with_ttl(keys: Arc<dyn KeyStore>, ttl: Duration) -> Self {
        AuthLayer {
            keys,
            known: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            unknown: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(NEGATIVE_TTL.min(ttl))
                .build(),
            clock: Clock::system(),
        }
    }

    /// The clock that `expires_at` is checked against (default: the system clock).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Forgets every cached record (e.g. after an admin change in this process).
    pub fn invalidate_all(&self) {
        self.known.invalidate_all();
        self.unknown.invalidate_all();
    }

    /// What the caches alone say of a secret.
    fn resolve_cached(&self, secret: Option<&str>) -> Cached {
        let Some(secret) = secret.filter(|s| !s.is_empty()) else {
            return Cached::Refused(GatewayError::InvalidApiKey(
                "no API key: send it as `Authorization: Bearer KEY` or `x-api-key: KEY`".into(),
            ));
        };
        let hash = hash_secret(secret);
        match self.known.get(&hash) {
            Some(record) => match usable(record, &self.clock) {
                Ok(r) => Cached::Key(r),
                Err(e) => Cached::Refused(e),
            },
            None if self.unknown.contains_key(&hash) => Cached::Refused(unknown_key()),
            None => Cached::Miss(hash),
        }
    }

    /// Resolves a secret to its record (cache, then store), or the SPEC error.
    pub async fn authenticate(&self, secret: Option<&str>) -> Result<Arc<KeyRecord>, GatewayError> {
        match self.resolve_cached(secret) {
            Cached::Key(record) => Ok(record),
            Cached::Refused(e) => Err(e),
            Cached::Miss(hash) => self.lookup(hash).await,
        }
    }

    /// Asks the store about a secret the caches do not know.
    async fn lookup(&self, hash: SecretHash) -> Result<Arc<KeyRecord>, GatewayError> {
        let keys = self.keys.clone();
        let found = tokio::task::spawn_blocking(move || keys.find(&hash))
            .await
            .map_err(|e| GatewayError::Internal(format!("key lookup failed: {e}")))??;
        match found {
            Some(r) => {
                let r = Arc::new(r);
                self.known.insert(hash, r.clone());
                usable(r, &self.clock)
            }
            None => {
                self.unknown.insert(hash, ());
                Err(unknown_key())
            }
        }
    }
}

/// What the caches say of a secret.
enum Cached {
    Key(Arc<KeyRecord>),
    Refused(GatewayError),
    /// Not cached either way: the store must be asked.
    Miss(SecretHash),
}

/// The record, unless its key has expired (401) or is disabled (403).
fn usable(record: Arc<KeyRecord>, clock: &Clock) -> Result<Arc<KeyRecord>, GatewayError> {
    if record.deleted_at.is_some() {
        return Err(GatewayError::InvalidApiKey("key deleted".into()));
    }
    if record.expires_at.is_some() && record.expired(clock.now()) {
        return Err(GatewayError::InvalidApiKey("key expired".into()));
    }
    if record.secret_expires_at.is_some_and(|t| clock.now() >= t) {
        return Err(GatewayError::InvalidApiKey(
            "this secret was replaced by a rotation: use the key's new secret".into(),
        ));
    }
    if record.disabled {
        return Err(GatewayError::Forbidden(format!(
            "key `{}` is disabled",
            record.name
        )));
    }
    Ok(record)
}

fn unknown_key() -> GatewayError {
    GatewayError::InvalidApiKey("unknown API key".into())
}

/// The client secret of a request: `Authorization: Bearer KEY`, else `x-api-key`.
pub fn secret_of(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            layer: Arc::new(self.clone()),
        }
    }
}

/// Authenticates each request; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    /// Behind one `Arc`: it is cloned into every request's future (two caches and a
    /// store otherwise).
    layer: Arc<AuthLayer>,
}

impl<S> Auth<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, keys: Arc<dyn KeyStore>) -> Self {
        AuthLayer::new(keys).layer(inner)
    }

    /// An [`AuthLayer`].
    pub fn layer(keys: Arc<dyn KeyStore>) -> AuthLayer {
        AuthLayer::new(keys)
    }
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // A cached key (the usual case) is answered at once and `inner` called here,
        // without cloning the stack below into a future.
        let hash = match self.layer.resolve_cached(secret_of(req.headers())) {
            Cached::Key(key) => {
                req.extensions_mut().insert(key);
                return Box::pin(self.inner.call(req));
            }
            Cached::Refused(e) => return Box::pin(future::ready(Ok(e.into_response()))),
            Cached::Miss(hash) => hash,
        };
        // A store lookup: take the service we readied and leave a clone (tower-service's
        // "be careful when cloning inner services").
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            match layer.lookup(hash).await {
                Ok(key) => {
                    req.extensions_mut().insert(key);
                    inner.oneshot(req).await
                }
                Err(e) => Ok(e.into_response()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;
    use crate::store::{KeyPatch, NewKey, SqliteStore};
    use tower::service_fn;

    fn store() -> Arc<SqliteStore> {
        SqliteStore::open(&StoreConfig {
            url: "sqlite::memory:".into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn echo_name() -> impl Service<
        Request<String>,
        Response = Response<Body>,
        Error = Infallible,
        Future = BoxFuture<'static, Result<Response<Body>, Infallible>>,
    > + Clone
           + Send
           + 'static {
        service_fn(|req: Request<String>| {
            let name = req
                .extensions()
                .get::<Arc<KeyRecord>>()
                .map(|k| k.name.clone())
                .unwrap_or_default();
            Box::pin(async move { Ok(Response::new(Body::from(name))) }) as BoxFuture<'static, _>
        })
    }

    async fn status_and_code(res: Response<Body>) -> (u16, String) {
        use http_body_util::BodyExt;
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let code = v["error"]["code"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        (status, code)
    }

    fn get(header: Option<(&str, &str)>) -> Request<String> {
        let mut b = Request::get("/v1/key");
        if let Some((k, v)) = header {
            b = b.header(k, v);
        }
        b.body(String::new()).unwrap()
    }

    #[tokio::test]
    async fn missing_unknown_and_disabled_keys_are_refused() {
        let store = store();
        let alice = store
            .create(
                hash_secret("sk-alice-1"),
                NewKey::new("alice", Default::default()),
            )
            .unwrap();
        let layer = AuthLayer::new(store.clone());
        let svc = layer.layer(echo_name());

        let (s, code) = status_and_code(svc.clone().oneshot(get(None)).await.unwrap()).await;
        assert_eq!((s, code.as_str()), (401, "invalid_api_key"));
        let (s, code) = status_and_code(
            svc.clone()
                .oneshot(get(Some(("authorization", "Bearer sk-nobody"))))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((s, code.as_str()), (401, "invalid_api_key"));
        let (s, body) = status_and_code(
            svc.clone()
                .oneshot(get(Some(("Authorization", "bearer sk-alice-1"))))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((s, body.as_str()), (200, "alice"));
        let (s, _) = status_and_code(
            svc.clone()
                .oneshot(get(Some(("x-api-key", "sk-alice-1"))))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, 200);

        // Disabled in the store: the cached record is used until its TTL, then 403.
        store
            .update(
                &alice.record.id,
                &KeyPatch {
                    disabled: Some(true),
                    ..Default::default()
                },
            )
            .unwrap();
        layer.invalidate_all();
        let (s, code) = status_and_code(
            svc.clone()
                .oneshot(get(Some(("x-api-key", "sk-alice-1"))))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((s, code.as_str()), (403, "forbidden"));
    }

    #[tokio::test]
    async fn a_disable_elsewhere_counts_within_the_ttl() {
        let store = store();
        let bob = store
            .create(
                hash_secret("sk-bob-12"),
                NewKey::new("bob", Default::default()),
            )
            .unwrap();
        let svc = AuthLayer::with_ttl(store.clone(), Duration::from_millis(50)).layer(echo_name());
        let req = || get(Some(("authorization", "Bearer sk-bob-12")));
        assert_eq!(svc.clone().oneshot(req()).await.unwrap().status(), 200);
        store
            .update(
                &bob.record.id,
                &KeyPatch {
                    disabled: Some(true),
                    ..Default::default()
                },
            )
            .unwrap();
        // moka's expiry runs on the real clock; poll with a generous bound.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = svc.clone().oneshot(req()).await.unwrap().status();
            if s == 403 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "still {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn an_expired_key_is_refused_at_once_even_while_its_record_is_cached() {
        use crate::clock::ManualClock;
        let store = store();
        store
            .create(
                hash_secret("sk-carol-1"),
                NewKey {
                    expires_at: Some(1_000_000),
                    ..NewKey::new("carol", Default::default())
                },
            )
            .unwrap();
        let manual = ManualClock::new(999_999);
        // A cache that keeps the record for an hour: only the clock decides.
        let svc = AuthLayer::with_ttl(store.clone(), Duration::from_secs(3600))
            .clock(manual.clock())
            .layer(echo_name());
        let req = || get(Some(("authorization", "Bearer sk-carol-1")));
        let res = svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(res.status(), 200);
        manual.advance(1);
        let res = svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(res.status(), 401);
        use http_body_util::BodyExt;
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["message"], "key expired");
        // A fresh layer (nothing cached) says the same.
        let fresh = AuthLayer::new(store)
            .clock(manual.clock())
            .layer(echo_name());
        let (s, code) = status_and_code(fresh.oneshot(req()).await.unwrap()).await;
        assert_eq!((s, code.as_str()), (401, "invalid_api_key"));
    }

    #[tokio::test]
    async fn a_rotated_secret_works_until_its_grace_ends_by_the_clock() {
        use crate::clock::ManualClock;
        let store = store();
        let now = crate::store::now_unix();
        let key = store
            .create(
                hash_secret("sk-dave-old"),
                NewKey::new("dave", Default::default()),
            )
            .unwrap();
        store
            .rotate(&key.record.id, hash_secret("sk-dave-new"), Some(now + 600))
            .unwrap()
            .unwrap();
        let manual = ManualClock::new(now);
        // A cache that keeps records for an hour: only the clock decides.
        let svc = AuthLayer::with_ttl(store.clone(), Duration::from_secs(3600))
            .clock(manual.clock())
            .layer(echo_name());
        let req = |s: &str| get(Some(("authorization", &format!("Bearer {s}"))));
        for s in ["sk-dave-old", "sk-dave-new"] {
            let (status, body) = status_and_code(svc.clone().oneshot(req(s)).await.unwrap()).await;
            assert_eq!((status, body.as_str()), (200, "dave"), "{s}");
        }
        manual.advance(600);
        let (status, code) =
            status_and_code(svc.clone().oneshot(req("sk-dave-old")).await.unwrap()).await;
        assert_eq!((status, code.as_str()), (401, "invalid_api_key"));
        let (status, _) =
            status_and_code(svc.clone().oneshot(req("sk-dave-new")).await.unwrap()).await;
        assert_eq!(status, 200);
        // Rotated again at once: the store no longer finds the first two secrets.
        store
            .rotate(&key.record.id, hash_secret("sk-dave-3rd"), None)
            .unwrap();
        assert!(store.find(&hash_secret("sk-dave-old")).unwrap().is_none());
        assert!(store.find(&hash_secret("sk-dave-new")).unwrap().is_none());
        assert_eq!(
            store.find(&hash_secret("sk-dave-3rd")).unwrap().unwrap().id,
            key.record.id
        );
    }

    #[tokio::test]
    async fn a_deleted_key_is_refused_with_its_reason() {
        let store = store();
        let key = store
            .create(
                hash_secret("sk-erin-1"),
                NewKey::new("erin", Default::default()),
            )
            .unwrap();
        store
            .update(
                &key.record.id,
                &KeyPatch {
                    delete_at: Some(1),
                    ..Default::default()
                },
            )
            .unwrap();
        let svc = AuthLayer::new(store).layer(echo_name());
        let res = svc
            .oneshot(get(Some(("x-api-key", "sk-erin-1"))))
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
        use http_body_util::BodyExt;
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["message"], "key deleted");
    }
}
