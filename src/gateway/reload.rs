//! Config reload (SPEC §9): `SIGHUP` or `POST /admin/reload` reads the config file
//! again and swaps in the [`Stack`] it builds, at once for new requests.
//!
//! - A config with problems is refused, every problem with its TOML path (and
//!   line), and the old one stays.
//! - What the process holds from its start cannot change without a restart:
//!   `[server]`'s `listen`, `max_connections`, `header_timeout_secs`,
//!   `idle_timeout_secs`, `shutdown_grace_secs`, `log_format`, `trusted_proxies`;
//!   `[store]`; `[shared]`; `[admin].token_env`; `[logging].sink`;
//!   `[cache].max_bytes`; `[telemetry]`. A change there is not refused: the rest is applied, the old
//!   value is kept, and the report names it in `restart_needed`.
//! - `[[keys]]`, when they differ from those last loaded (unchanged, nothing is
//!   written), are upserted into the store again, as at start: a new secret is
//!   created with its credits; a known one keeps its balance and spending (credits
//!   are granted once) and takes the file's name, limits, rpm, allow-list and expiry;
//!   a key no longer in the file stays in the store as it is (disable it with the
//!   admin API or `switchboard keys`). The auth cache is emptied, so the changes
//!   count at the next request.
//! - Requests in flight keep the stack they started with (streams included: their
//!   endpoint, their price, their health registry) until they end.
//! - Health of the endpoints that still exist (same model id, provider name and
//!   upstream model) is carried over to the new registry, see
//!   [`InMemoryHealth::carry_over`](crate::health::InMemoryHealth::carry_over).
//!
//! # Example
//! ```
//! use switchboard::{config::Config, gateway::Gateway};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut config = Config::demo();
//! config.logging.sink = "none".into();
//! config.store.url = "sqlite::memory:".into();
//! let gateway = Gateway::builder().config(config.clone()).build().unwrap();
//!
//! config.models.retain(|m| m.id != "mock/lorem");
//! config.server.listen = "127.0.0.1:9999".into();
//! let report = gateway.reload(config).unwrap();
//! assert_eq!(report.models_removed, ["mock/lorem"]);
//! assert_eq!(report.restart_needed, ["server.listen"]);
//! assert!(gateway.catalog().model("mock/lorem").is_none());
//! assert_eq!(gateway.config().server.listen, "127.0.0.1:8080"); // kept
//! # }
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::Router;
use http::{HeaderMap, Response, StatusCode};
use serde::Serialize;
use sha2::Digest;

use super::stack::Stack;
use super::Gateway;
use crate::config::{Config, ConfigError, Problem};
use crate::error::{Body, GatewayError};
use crate::store::StoreError;

/// Where a reload reads the config from.
pub(crate) struct Source {
    /// The file the gateway was started with (`None`: built from a value, e.g. the
    /// built-in demo).
    pub(crate) file: Option<PathBuf>,
    /// `--listen`, which overrides the file's `[server].listen`.
    pub(crate) listen: Option<String>,
    /// One reload at a time (each carries over the state of the one before).
    pub(crate) lock: std::sync::Mutex<()>,
}

/// What a reload changed (`POST /admin/reload`'s `data`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    /// Model ids new in the file.
    pub models_added: Vec<String>,
    /// Model ids no longer in it.
    pub models_removed: Vec<String>,
    /// Model ids whose settings or endpoints (prices included) changed.
    pub models_changed: Vec<String>,
    /// Provider names new in the file.
    pub providers_added: Vec<String>,
    /// Provider names no longer in it.
    pub providers_removed: Vec<String>,
    /// Provider names whose settings changed.
    pub providers_changed: Vec<String>,
    /// Bootstrap `[[keys]]` upserted into the store (0 when the file's `[[keys]]`
    /// did not change since the last load).
    pub keys_bootstrapped: usize,
    /// Settings that changed in the file but need a restart: their old values stay
    /// in force (TOML paths, e.g. `server.listen`).
    pub restart_needed: Vec<String>,
    /// The first 16 hex digits of the SHA-256 of the config now in force.
    pub config_hash: String,
}

/// Why a reload did not happen (the old config stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The gateway was not started from a file (e.g. the built-in demo).
    #[error("there is no config file to reload: the gateway was started without one (the built-in demo, or a config built in code); restart it with --config FILE")]
    NoFile,
    /// The file has problems.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not take the `[[keys]]`.
    #[error("[[keys]]: the store refused them: {0}")]
    Store(#[from] StoreError),
}

impl ReloadError {
    /// The problems to show: each with its TOML path.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ReloadError::Config(e) => e.problems.clone(),
            ReloadError::NoFile => vec![Problem {
                path: String::new(),
                message: self.to_string(),
            }],
            ReloadError::Store(_) => vec![Problem {
                path: "keys".into(),
                message: self.to_string(),
            }],
        }
    }

    fn result_label(&self) -> &'static str {
        match self {
            ReloadError::Store(_) => "failed",
            _ => "refused",
        }
    }

    /// The SPEC §3.2 error, with `problems`: `[{"path","message"}]`; 400, or 500
    /// when the store failed.
    pub fn into_response(self) -> Response<Body> {
        let problems = self.problems();
        let (status, base) = match &self {
            ReloadError::Store(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                GatewayError::Internal(format!("reload failed, the old config stays: {self}")),
            ),
            ReloadError::NoFile => (
                StatusCode::BAD_REQUEST,
                GatewayError::InvalidRequest(self.to_string()),
            ),
            ReloadError::Config(e) => (
                StatusCode::BAD_REQUEST,
                GatewayError::InvalidRequest(format!("reload refused, the old config stays: {e}")),
            ),
        };
        let mut error = base.to_json();
        error["problems"] = problems
            .iter()
            .map(|p| serde_json::json!({"path": p.path, "message": p.message}))
            .collect();
        let mut res = Response::new(Body::from(
            serde_json::json!({ "error": error }).to_string(),
        ));
        *res.status_mut() = status;
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        res
    }
}

impl Gateway {
    /// Swaps in `config` (see the module docs): problems refuse it, settings that
    /// need a restart keep their old values and are named in the report, the
    /// `[[keys]]` are upserted, and new requests use the new stack at once.
    ///
    /// Blocking (the store's upsert): call it off the async threads
    /// (`spawn_blocking`) when the store is PostgreSQL.
    pub fn reload(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        let r = self.reload_inner(config);
        record(&r);
        r
    }

    /// Reads the file the gateway was started with ([`GatewayBuilder::config_file`])
    /// and [`reload`](Self::reload)s it. What `SIGHUP` and `POST /admin/reload` do.
    ///
    /// [`GatewayBuilder::config_file`]: super::GatewayBuilder::config_file
    pub fn reload_file(&self) -> Result<ReloadReport, ReloadError> {
        let r = match &self.reload.file {
            None => Err(ReloadError::NoFile),
            Some(path) => Config::from_file(path)
                .map_err(ReloadError::from)
                .and_then(|c| self.reload_inner(c)),
        };
        record(&r);
        r
    }

    fn reload_inner(&self, mut config: Config) -> Result<ReloadReport, ReloadError> {
        let _one = self.reload.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(listen) = &self.reload.listen {
            config.server.listen = listen.clone();
        }
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(ConfigError {
                source_name: "config".into(),
                problems,
            }
            .into());
        }
        let old = self.stack.load_full();
        let restart_needed = keep_restart_settings(&old.config, &mut config);
        // `[[keys]]` as the file had them at the last load: unchanged, nothing is
        // written (a reload for a price must not undo what the admin API changed on
        // a bootstrap key since, nor cost the store a write per key).
        let keys_changed = format!("{:?}", old.config.keys) != format!("{:?}", config.keys);
        let keys_bootstrapped = match &self.process.bootstrap {
            Some(bootstrap) if keys_changed => {
                bootstrap(&config.keys)?;
                // Changed limits and allow-lists count at the next request.
                self.process.auth.invalidate_all();
                config.keys.len()
            }
            _ => 0,
        };
        let mut report = diff(&old.config, &config);
        report.keys_bootstrapped = keys_bootstrapped;
        report.restart_needed = restart_needed;
        report.config_hash = hash(&config);
        let stack = Stack::build(&self.process, config, Some(&old));
        self.stack.store(Arc::new(stack));
        loaded(&report.config_hash);
        Ok(report)
    }
}

/// Publishes the config now in force (`switchboard_config_info`, `…_loaded_…`).
pub(crate) fn loaded(hash: &str) {
    static LAST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(old) = last.take() {
        metrics::gauge!(crate::telemetry::CONFIG_INFO, "hash" => old).set(0.0);
    }
    metrics::gauge!(crate::telemetry::CONFIG_INFO, "hash" => hash.to_string()).set(1.0);
    *last = Some(hash.to_string());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!(crate::telemetry::CONFIG_LOADED).set(now);
}

fn record(r: &Result<ReloadReport, ReloadError>) {
    let result = match r {
        Ok(_) => "ok",
        Err(e) => e.result_label(),
    };
    metrics::counter!(crate::telemetry::CONFIG_RELOADS, "result" => result).increment(1);
}

/// The first 16 hex digits of the SHA-256 of `config` (its every setting).
pub(crate) fn hash(config: &Config) -> String {
    let digest = sha2::Sha256::digest(format!("{config:?}").as_bytes());
    hex::encode(&digest[..8])
}

/// Puts back in `new` the old value of every setting that needs a restart, and
/// names those that differed.
fn keep_restart_settings(old: &Config, new: &mut Config) -> Vec<String> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($path:literal, $($field:tt)+) => {
            if format!("{:?}", old.$($field)+) != format!("{:?}", new.$($field)+) {
                changed.push($path.to_string());
                new.$($field)+ = old.$($field)+.clone();
            }
        };
    }
    keep!("server.listen", server.listen);
    keep!("server.max_connections", server.max_connections);
    keep!("server.header_timeout_secs", server.header_timeout_secs);
    keep!("server.idle_timeout_secs", server.idle_timeout_secs);
    keep!("server.shutdown_grace_secs", server.shutdown_grace_secs);
    keep!("server.log_format", server.log_format);
    keep!("server.trusted_proxies", server.trusted_proxies);
    keep!("store", store);
    keep!("shared", shared);
    keep!("admin.token_env", admin.token_env);
    keep!("logging.sink", logging.sink);
    keep!("cache.max_bytes", cache.max_bytes);
    // The exporter is installed with the process's tracing subscriber.
    keep!("telemetry", telemetry);
    changed
}

/// Models and providers added, removed, changed.
fn diff(old: &Config, new: &Config) -> ReloadReport {
    fn by<'a, T: std::fmt::Debug>(
        items: &'a [T],
        id: impl Fn(&'a T) -> &'a str,
    ) -> BTreeMap<&'a str, String> {
        items.iter().map(|t| (id(t), format!("{t:?}"))).collect()
    }
    fn compare(
        old: &BTreeMap<&str, String>,
        new: &BTreeMap<&str, String>,
    ) -> (Vec<String>, Vec<String>, Vec<String>) {
        let added = new.keys().filter(|k| !old.contains_key(*k));
        let removed = old.keys().filter(|k| !new.contains_key(*k));
        let changed = new
            .iter()
            .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
            .map(|(k, _)| k);
        let own = |it: &mut dyn Iterator<Item = &&str>| it.map(|s| s.to_string()).collect();
        (
            own(&mut { added }),
            own(&mut { removed }),
            own(&mut { changed }),
        )
    }
    let (models_added, models_removed, models_changed) = compare(
        &by(&old.models, |m| m.id.as_str()),
        &by(&new.models, |m| m.id.as_str()),
    );
    let (providers_added, providers_removed, providers_changed) = compare(
        &by(&old.providers, |p| p.name.as_str()),
        &by(&new.providers, |p| p.name.as_str()),
    );
    ReloadReport {
        models_added,
        models_removed,
        models_changed,
        providers_added,
        providers_removed,
        providers_changed,
        ..ReloadReport::default()
    }
}

/// `POST /admin/reload` (admin token): [`Gateway::reload_file`]; 200 with the
/// [`ReloadReport`] as `data`, else [`ReloadError::into_response`].
pub(crate) fn admin_route(gateway: Gateway) -> Router {
    Router::new()
        .route("/admin/reload", axum::routing::post(admin_reload))
        .with_state(gateway)
}

async fn admin_reload(State(gateway): State<Gateway>, headers: HeaderMap) -> Response<Body> {
    if let Err(e) = crate::accounts::admin_check(&gateway.accounts, &headers) {
        return e.into_response();
    }
    let r = tokio::task::spawn_blocking(move || gateway.reload_file()).await;
    match r {
        Ok(Ok(report)) => {
            tracing::info!(?report, "config reloaded (POST /admin/reload)");
            let body = serde_json::json!({ "data": report }).to_string();
            let mut res = Response::new(Body::from(body));
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            res
        }
        Ok(Err(e)) => {
            tracing::warn!("config reload refused (POST /admin/reload): {e}");
            e.into_response()
        }
        Err(e) => GatewayError::Internal(format!("reload task failed: {e}")).into_response(),
    }
}
