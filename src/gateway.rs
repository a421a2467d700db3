//! `Gateway::builder()`: the default stack in named steps, and the axum router around it.
//!
//! The binary serves [`Gateway::router`], so library users get what the binary runs
//! (its accept loop only hands `POST /v1/chat/completions` to the chat service without
//! matching routes first: the same service, the same answers). The order of the
//! steps is the architecture; each says why it sits where it does.
//!
//! # Example
//! ```
//! use switchboard::{config::Config, gateway::Gateway};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut config = Config::demo();
//! config.logging.sink = "none".into(); // no request-log file from a doctest
//! config.store.url = "sqlite::memory:".into(); // a private temporary store
//! let gateway = Gateway::builder().config(config).build().unwrap();
//! let req = http::Request::post("/v1/chat/completions")
//!     .header("authorization", "Bearer sk-demo")
//!     .header("content-type", "application/json")
//!     .body(axum::body::Body::from(
//!         r#"{"model":"mock/echo","messages":[{"role":"user","content":"hello"}]}"#,
//!     ))
//!     .unwrap();
//! let res = gateway.router().oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 200);
//! assert_eq!(res.headers()["x-provider"], "mock");
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::routing::{get, post_service};
use axum::Router;
use http::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;

use crate::accounts::AccountState;
use crate::auth::AuthLayer;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::drain::Drain;
use crate::error::{Body, GatewayError};
use crate::health::HealthRegistry;
use crate::idempotency::IdempotencyLayer;
use crate::logging::{LogSink, LogWriter};
use crate::normalize::AnthropicErrorsLayer;
use crate::providers::ProviderClient;
use crate::rate_limit::RateLimitLayer;
use crate::store::{KeyChange, KeyStore, Ledger, PgStore, SqliteStore, StoreError};

mod conn;
mod models;
pub mod reload;
mod serve;
mod stack;

pub use models::model_json;
use models::{get_model, list_models, ModelsState};
use serve::{serve_connections, ConnLimits, Dispatch};

pub use reload::{ReloadError, ReloadReport};
pub use stack::Stack;

/// The HTTP-tier chat service: what `/v1/chat/completions` is routed to.
pub type ChatService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The chat service of the stack current when a request arrives: one atomic load,
/// then the request holds a clone of that stack's service (and so its config) to
/// its end.
#[derive(Clone)]
struct CurrentChat(Arc<ArcSwap<Stack>>);

impl tower::Service<Request<Body>> for CurrentChat {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = tower::util::Oneshot<ChatService, Request<Body>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        // Every stack's chat service is always ready (a `BoxCloneSyncService` of
        // layers whose `poll_ready` passes through to the provider client's).
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        use tower::ServiceExt;
        self.0.load().chat.clone().oneshot(req)
    }
}

/// Why a gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// No config was given.
    #[error("no config: call .config(..) on the builder")]
    NoConfig,
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The request log (`[logging].sink`) cannot be opened.
    #[error("[logging].sink: {0}")]
    Logging(std::io::Error),
    /// The store cannot be opened (a runtime failure: exit code 2).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// `[shared]` cannot be set up (built outside a tokio runtime).
    #[error(transparent)]
    Shared(#[from] crate::shared::SharedError),
    /// `[telemetry]`'s exporter cannot be set up.
    #[error(transparent)]
    Telemetry(#[from] crate::otel::OtelError),
}

/// Assembles a [`Gateway`].
#[derive(Default)]
pub struct GatewayBuilder {
    config: Option<Config>,
    provider_client: Option<ProviderClient>,
    log_writer: Option<LogWriter>,
    store: Option<(Arc<dyn KeyStore>, Arc<dyn Ledger>)>,
    health: Option<Arc<dyn HealthRegistry>>,
    telemetry: Option<crate::otel::Telemetry>,
    clock: Option<crate::clock::Clock>,
    config_file: Option<std::path::PathBuf>,
    listen: Option<String>,
}

impl std::fmt::Debug for GatewayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayBuilder").finish_non_exhaustive()
    }
}

impl GatewayBuilder {
    /// The configuration (validated again at `build`).
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// A provider client with custom adapters (default: the built-in ones).
    pub fn provider_client(mut self, client: ProviderClient) -> Self {
        self.provider_client = Some(client);
        self
    }

    /// A custom request-log sink instead of the one `[logging].sink` names.
    pub fn log_sink(self, sink: Box<dyn LogSink>) -> Self {
        self.log_writer(LogWriter::spawn(sink, crate::logging::DEFAULT_QUEUE))
    }

    /// A request-log writer of your own (e.g. [`LogWriter::spawn`] with another queue
    /// size) instead of the one `[logging].sink` names.
    pub fn log_writer(mut self, writer: LogWriter) -> Self {
        self.log_writer = Some(writer);
        self
    }

    /// A store of your own for keys and the ledger (default: the store that
    /// `[store].url` names, SQLite or PostgreSQL, opened at `build`, with the
    /// `[[keys]]` upserted).
    pub fn store<S: KeyStore + Ledger>(mut self, store: Arc<S>) -> Self {
        self.store = Some((store.clone(), store));
        self
    }

    /// A health registry of your own (default: [`InMemoryHealth`](crate::health::InMemoryHealth) sized to the
    /// catalog). It is kept as it is across reloads ([`Gateway::reload`]): the
    /// default one is rebuilt for the new catalog, with the state of the endpoints
    /// that still exist carried over.
    pub fn health_registry(mut self, registry: Arc<dyn HealthRegistry>) -> Self {
        self.health = Some(registry);
        self
    }

    /// The clock of the calendar rules (default: the system clock): key expiry in
    /// auth, and `tokens_per_day` and `limit_reset` periods in the store `build`
    /// opens (a store given to [`store`](Self::store) keeps its own: set it there).
    pub fn clock(mut self, clock: crate::clock::Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Exports spans with `telemetry` ([`crate::otel`]) whatever the config's
    /// `[telemetry]` says; without it, a config with `[telemetry].otlp_endpoint` makes
    /// its own exporter ([`Gateway::telemetry`] returns it, to flush or shut down).
    pub fn telemetry(mut self, telemetry: crate::otel::Telemetry) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// The file the config was read from: what `POST /admin/reload` and
    /// [`Gateway::reload_file`] read again (without one, they answer that there is
    /// no file to reload).
    pub fn config_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// The address listened on when it is not the file's `[server].listen` (the
    /// binary's `--listen`): a reloaded file's `[server].listen` is compared with
    /// the address the config was built with, and this keeps it from counting as
    /// a change that needs a restart.
    pub fn listen_override(mut self, addr: impl Into<String>) -> Self {
        self.listen = Some(addr.into());
        self
    }

    /// Builds the stack.
    pub fn build(self) -> Result<Gateway, BuildError> {
        let config = self.config.ok_or(BuildError::NoConfig)?;
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(crate::config::ConfigError {
                source_name: "config".into(),
                problems,
            }
            .into());
        }
        // A SQLite store's directory first: the default request log goes in it too,
        // and a directory that cannot be made is the store's problem, not the log's.
        if self.store.is_none() {
            crate::store::create_store_dir(&config.store)?;
        }
        let logs = match self.log_writer {
            Some(writer) => writer,
            None => LogWriter::from_config(&config).map_err(BuildError::Logging)?,
        };
        crate::telemetry::install();
        let (keys, ledger, bootstrap): (_, _, Option<stack::Bootstrap>) = match self.store {
            Some((k, l)) => (k, l, None),
            // Shared by any number of gateways (SPEC §6).
            None if crate::store::is_postgres_url(&config.store.url) => {
                let store = PgStore::open(&config.store)?;
                if let Some(clock) = &self.clock {
                    store.set_clock(clock.clone());
                }
                store.bootstrap(&config.keys)?;
                let again = store.clone();
                (
                    store.clone() as Arc<dyn KeyStore>,
                    store as Arc<dyn Ledger>,
                    Some(Arc::new(move |keys: &[crate::config::KeyConfig]| {
                        again.bootstrap(keys)
                    })),
                )
            }
            None => {
                let store = SqliteStore::open(&config.store)?;
                if !store.owns_ledger() {
                    return Err(crate::store::StoreError(format!(
                        "the store {} is in use by another switchboard process (it holds {}-ledger.lock); stop it, or give this gateway a [store].url of its own; to run several instances on one ledger, give them a PostgreSQL store ([store].url = \"postgres://…\", docs/deployment.md)",
                        store.path().display(),
                        store.path().display()
                    ))
                    .into());
                }
                if let Some(clock) = &self.clock {
                    store.set_clock(clock.clone());
                }
                store.bootstrap(&config.keys)?;
                let again = store.clone();
                (
                    store.clone() as Arc<dyn KeyStore>,
                    store as Arc<dyn Ledger>,
                    Some(Arc::new(move |keys: &[crate::config::KeyConfig]| {
                        again.bootstrap(keys)
                    })),
                )
            }
        };
        let auth = AuthLayer::new(keys.clone()).clock(self.clock.clone().unwrap_or_default());
        let follows_changes = keys.changes().map(|changes| {
            let anchor = Arc::new(auth.clone());
            forget_on_change(changes, Arc::downgrade(&anchor));
            anchor
        });
        let admin_token = std::env::var(&config.admin.token_env)
            .ok()
            .filter(|t| !t.is_empty())
            .map(|t| crate::store::hash_secret(&t));
        // `[shared].redis_url`: rpm budgets and endpoint health shared with the other
        // instances through Redis (each falls back to its own while Redis is down).
        let shared = match &config.shared.redis_url {
            Some(url) => Some(crate::shared::SharedState::open(
                url,
                &config.shared.prefix,
            )?),
            None => None,
        };
        let rate_limit = match &shared {
            Some(s) => RateLimitLayer::shared(s.clone()),
            None => RateLimitLayer::new(),
        };
        // `[cache]`: answers in memory, or in Redis shared by every instance.
        let cache = crate::cache::CacheLayer::from_config(&config.cache, shared.clone())
            .ledger(ledger.clone());
        // `[telemetry]`: spans exported for the life of the process.
        let telemetry = match self.telemetry {
            Some(t) => Some(t),
            None if config.telemetry.enabled() => {
                Some(crate::otel::Telemetry::new(&config.telemetry)?)
            }
            None => None,
        };
        let process = Arc::new(stack::Process {
            telemetry,
            client: self.provider_client.unwrap_or_default(),
            logs,
            ledger: ledger.clone(),
            auth: auth.clone(),
            rate_limit,
            shared,
            idempotency: IdempotencyLayer::new(ledger.clone()),
            cache,
            drain: Drain::new(),
            custom_health: self.health,
            bootstrap,
        });
        let body_timeout = Duration::from_secs(config.server.request_timeout_secs);
        let admin_token_env = config.admin.token_env.clone();
        reload::loaded(&reload::hash(&config));
        let stack = Stack::build(&process, config, None);
        Ok(Gateway {
            stack: Arc::new(ArcSwap::from_pointee(stack)),
            process,
            reload: Arc::new(reload::Source {
                file: self.config_file,
                listen: self.listen,
                lock: std::sync::Mutex::new(()),
            }),
            _follows_changes: follows_changes,
            accounts: AccountState {
                keys,
                ledger,
                auth,
                admin_token,
                admin_token_env,
                body_timeout,
            },
        })
    }
}

/// Empties the auth cache (records and unknown secrets alike) on every key change
/// made elsewhere, so a key created, disabled or changed on another instance counts
/// here at once; stops when the store or the gateway is gone. A thread of its own:
/// `build` may run with or without a runtime. It holds the auth layer weakly (the
/// layer holds the store, whose drop ends `changes`).
fn forget_on_change(
    mut changes: tokio::sync::broadcast::Receiver<KeyChange>,
    auth: std::sync::Weak<AuthLayer>,
) {
    let spawned = std::thread::Builder::new()
        .name("switchboard-key-changes".into())
        .spawn(move || loop {
            match changes.blocking_recv() {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    match auth.upgrade() {
                        Some(auth) => auth.invalidate_all(),
                        None => return,
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(
            "cannot follow key changes made elsewhere ({e}); they count here within {} s",
            crate::auth::DEFAULT_TTL.as_secs()
        );
    }
}

/// A built gateway: config, catalog, and the assembled chat service.
#[derive(Clone)]
pub struct Gateway {
    /// What the current config built: one atomic load per request, swapped whole
    /// by [`Gateway::reload`].
    stack: Arc<ArcSwap<Stack>>,
    /// What lives as long as the gateway (`stack.rs`).
    process: Arc<stack::Process>,
    /// Where a reload reads the config from.
    reload: Arc<reload::Source>,
    /// What the key-change thread holds weakly (see `forget_on_change`).
    _follows_changes: Option<Arc<AuthLayer>>,
    accounts: AccountState,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

impl Gateway {
    /// Starts a builder.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// The configuration now in force (a reload replaces it).
    pub fn config(&self) -> Arc<Config> {
        self.stack.load().config.clone()
    }

    /// The catalog now in force (a reload replaces it).
    pub fn catalog(&self) -> Arc<Catalog> {
        self.stack.load().catalog.clone()
    }

    /// What the current config built (catalog, health registry, chat service); a
    /// request in flight keeps the one it started with.
    pub fn stack(&self) -> Arc<Stack> {
        self.stack.load_full()
    }

    /// The span exporter (`[telemetry].otlp_endpoint`, or the one given to
    /// [`GatewayBuilder::telemetry`]), to [`flush`](crate::otel::Telemetry::flush) it
    /// or shut it down when the server stops.
    pub fn telemetry(&self) -> Option<crate::otel::Telemetry> {
        self.process.telemetry.clone()
    }

    /// The request-log writer (e.g. to [`LogWriter::flush`] it).
    pub fn logs(&self) -> &LogWriter {
        &self.process.logs
    }

    /// The endpoint health registry the current stack records to (and
    /// `/admin/endpoints` reads); a reload gives the next stack its own, seeded with
    /// this one's state.
    pub fn health(&self) -> Arc<dyn HealthRegistry> {
        self.stack.load().health.clone()
    }

    /// The key store.
    pub fn keys(&self) -> &Arc<dyn KeyStore> {
        &self.accounts.keys
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.accounts.ledger
    }

    /// The drain of this gateway's stack: [`Drain::expire`] ends every request still
    /// waiting on an upstream with `server_shutting_down` (what [`Gateway::serve`]
    /// does when its grace runs out; for those who serve [`Gateway::router`] with a
    /// server of their own).
    pub fn drain(&self) -> &Drain {
        &self.process.drain
    }

    /// The chat-completions service alone (HTTP tier), to mount anywhere: each
    /// request goes to the stack current when it arrives.
    pub fn chat_service(&self) -> ChatService {
        BoxCloneSyncService::new(CurrentChat(self.stack.clone()))
    }

    /// Every route of SPEC §3, under `/v1` and `/api/v1`, with SPEC-shaped 404/405.
    pub fn router(&self) -> Router {
        // Every route reads the current stack per request (one atomic load).
        let chat = CurrentChat(self.stack.clone());
        let v1 = Router::new()
            .route("/chat/completions", post_service(chat.clone()))
            // SPEC §7: the other inbound APIs go through the same stack; Normalize
            // picks the dialect from the path.
            .route("/messages", post_service(chat.clone()))
            .route("/responses", post_service(chat.clone()))
            .route("/embeddings", post_service(chat.clone()))
            .route("/completions", post_service(chat))
            .merge(self.count_tokens_route())
            .merge(self.explain_route())
            .merge(
                Router::new()
                    .route("/models", get(list_models))
                    .route("/models/{*id}", get(get_model))
                    .with_state(ModelsState {
                        stack: self.stack.clone(),
                        auth: self.accounts.auth.clone(),
                    }),
            )
            .merge(crate::accounts::client_routes(self.accounts.clone()));
        Router::new()
            .nest("/v1", v1.clone())
            .nest("/api/v1", v1)
            .route("/healthz", get(|| async { "ok" }))
            .route("/metrics", get(metrics))
            // Admin answers are never cached nor sniffed (the dashboard reads them).
            .merge(
                crate::accounts::admin_routes(self.accounts.clone())
                    .layer(axum::middleware::map_response(crate::dashboard::no_store)),
            )
            .merge(
                reload::admin_route(self.clone())
                    .layer(axum::middleware::map_response(crate::dashboard::no_store)),
            )
            .merge(
                crate::admin::routes(crate::admin::AdminState {
                    accounts: self.accounts.clone(),
                    usage: self.process.logs.usage().cloned(),
                    log_sink: self.config().logging.sink.clone(),
                    current: {
                        let stack = self.stack.clone();
                        Arc::new(move || {
                            let s = stack.load();
                            (s.catalog.clone(), s.health.clone())
                        })
                    },
                })
                .layer(axum::middleware::map_response(crate::dashboard::no_store)),
            )
            // SPEC §9: the operators' page, its login, and the recent requests it lists.
            .merge(
                crate::dashboard::routes(crate::dashboard::DashboardState {
                    accounts: self.accounts.clone(),
                    recent: Arc::new(crate::dashboard::RecentSource::from_config(&self.config())),
                })
                .layer(axum::middleware::map_response(crate::dashboard::no_store)),
            )
            .merge(
                Router::new()
                    .route("/readyz", get(crate::accounts::readyz))
                    .with_state(self.accounts.clone()),
            )
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            // The `/messages` paths' errors made by the router itself (404, 405) and
            // by `count_tokens`' auth, in Anthropic's shape.
            .layer(AnthropicErrorsLayer::new())
    }

    /// `POST /messages/count_tokens` (SPEC §7.1): authenticated like every client
    /// route, free, no upstream call.
    fn count_tokens_route(&self) -> Router {
        let stack = self.stack.clone();
        Router::new()
            .route(
                "/messages/count_tokens",
                axum::routing::post(move |req: Request<axum::body::Body>| {
                    stack.load().count_tokens.clone().handle(req)
                }),
            )
            .route_layer(self.accounts.auth.clone())
    }

    /// `POST /route` (SPEC §9): the route explain of the current stack,
    /// authenticated and counted in the key's `rpm` like chat; free, no upstream call.
    fn explain_route(&self) -> Router {
        let stack = self.stack.clone();
        Router::new()
            .route(
                "/route",
                axum::routing::post(move |req: Request<axum::body::Body>| {
                    stack.load().explainer.clone().handle(req)
                }),
            )
            .route_layer(
                ServiceBuilder::new()
                    .layer(self.accounts.auth.clone())
                    .layer(self.process.rate_limit.clone()),
            )
    }

    /// Serves [`Gateway::router`] on `listener` until `shutdown` resolves, then stops
    /// accepting and lets in-flight requests (streams included) finish for up to
    /// `grace` (`[server].shutdown_grace_secs`). When the grace runs out, every
    /// request still waiting on an upstream is ended through the [`Drain`]: a started
    /// stream with its dialect's mid-stream error (`server_shutting_down`, charged
    /// for what it delivered), any other with a 503. Once the connections have
    /// closed (at most [`LAST_WORDS`] later), the ledger and the request log are
    /// flushed and it returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
    ) -> std::io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // `with_state` once, here: axum's own `serve` re-runs it for every accepted
        // connection (a fresh route table and a boxed clone of every route, ≈ 15 KiB
        // held for as long as the connection is open).
        let config = self.config();
        let app = Dispatch {
            stack: self.stack.clone(),
            router: self.router().with_state(()),
            activity: None,
            // Checked by `Config::problems`; an entry that does not parse trusts nothing.
            proxies: Arc::new(
                crate::client_ip::TrustedProxies::parse(&config.server.trusted_proxies)
                    .unwrap_or_default(),
            ),
            peer: None,
        };
        let limits = ConnLimits::from_config(&config.server);
        let logs = self.process.logs.clone();
        let ledger = self.accounts.ledger.clone();
        let server = serve_connections(listener, app, limits, async move {
            shutdown.await;
            let _ = tx.send(());
        });
        tokio::pin!(server);
        let finished = tokio::select! {
            () = &mut server => true,
            _ = async { let _ = rx.await; tokio::time::sleep(grace).await } => false,
        };
        if !finished {
            tracing::warn!(
                "in-flight requests did not finish within {} s ([server].shutdown_grace_secs); ending them with server_shutting_down",
                grace.as_secs()
            );
            self.process.drain.expire();
            // Each cut request settles its charge, sends its last event and ends.
            if tokio::time::timeout(LAST_WORDS, &mut server).await.is_err() {
                tracing::warn!(
                    "some connections were still open {} s after the grace ran out (clients not reading); closing them",
                    LAST_WORDS.as_secs()
                );
            }
        }
        // Settlements sent without waiting (streams cut by their clients) are
        // committed before exit, then the request records still queued are written out.
        ledger.flush().await;
        let _ = tokio::task::spawn_blocking(move || logs.flush(Duration::from_secs(5))).await;
        Ok(())
    }

    /// Binds `addr` ([`Gateway::serve`] sets TCP_NODELAY on every accepted connection).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
        TcpListener::bind(addr).await
    }
}

/// How long [`Gateway::serve`] waits, after the shutdown grace ran out, for the cut
/// requests to send their last events and their connections to close.
pub const LAST_WORDS: Duration = Duration::from_secs(5);

/// `GET /metrics`: Prometheus text format.
async fn metrics() -> Response<Body> {
    let mut res = Response::new(Body::from(crate::telemetry::render()));
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

async fn not_found(req: Request<axum::body::Body>) -> Response<Body> {
    GatewayError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

async fn method_not_allowed(req: Request<axum::body::Body>) -> Response<Body> {
    GatewayError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

/// `StatusCode` re-export for handlers.
#[doc(hidden)]
pub const _OK: StatusCode = StatusCode::OK;
