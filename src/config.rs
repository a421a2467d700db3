//! `switchboard.toml`: the configuration of SPEC §2, with errors that name their TOML path.
//!
//! [`Config::from_toml`] parses and validates; every problem it finds is reported as
//! `path: message` (e.g. `models[1].endpoints[0].provider: no provider named "opnai"`),
//! so `switchboard check` can print them all at once.
//!
//! # Example
//! ```
//! use switchboard::config::Config;
//!
//! let err = Config::from_toml(r#"
//! [[models]]
//! id = "x/y"
//!   [[models.endpoints]]
//!   provider = "nowhere"
//!   upstream_model = "y"
//!   prompt_usd_per_mtok = 1
//!   completion_usd_per_mtok = 2
//! "#).unwrap_err();
//! assert!(err.to_string().contains("models[0].endpoints[0].provider"));
//!
//! let demo = Config::demo();
//! assert!(demo.models.iter().any(|m| m.id == "mock/echo"));
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use crate::chat::DataCollection;
use crate::money::{
    Money, Price, MAX_CREDITS, MAX_MODEL_TOKENS, MAX_PRICE, MAX_RPM, MAX_TOKENS_PER_DAY,
};

/// The shortest `[[keys]] secret` a config file may hold. Keys are stored as the
/// unsalted SHA-256 of their secret: fine for the 40-character random secrets
/// `switchboard keys create` makes, guessable for short typed ones. The built-in
/// demo's `sk-demo` (SPEC §1) is exempt: it is not a config file.
pub const MIN_SECRET_CHARS: usize = 20;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[store]`.
    #[serde(default)]
    pub store: StoreConfig,
    /// `[admin]`.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[health]`.
    #[serde(default)]
    pub health: HealthConfig,
    /// `[retry]`.
    #[serde(default)]
    pub retry: RetryConfig,
    /// `[logging]`.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// `[shared]`: Redis shared by many instances (SPEC §6).
    #[serde(default)]
    pub shared: SharedConfig,
    /// `[idempotency]`: how long `Idempotency-Key` answers are kept (SPEC §8.2).
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    /// `[cache]`: the response cache (SPEC §8.1).
    #[serde(default)]
    pub cache: crate::cache::CacheConfig,
    /// `[[providers]]`.
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    /// `[[models]]`.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// `[[keys]]`: bootstrap keys, upserted on start.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// Set by [`Config::demo`] only: the built-in demo, whose fixed key `sk-demo` is
    /// exempt from [`MIN_SECRET_CHARS`]. Never read from a file.
    #[serde(skip)]
    pub builtin: bool,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: String,
    /// Larger request bodies get 413.
    pub max_body_bytes: u64,
    /// Whole request, streams included.
    pub request_timeout_secs: u64,
    /// No first chunk after this long: commit the 200 and send SSE comments.
    pub keepalive_secs: u64,
    /// A client must send its request headers within this: from the connection's
    /// start for its first request, from the first byte of each next one.
    pub header_timeout_secs: u64,
    /// A keep-alive connection with no request in flight is closed after this.
    pub idle_timeout_secs: u64,
    /// Open client connections at most; past it, new ones get 503 and are closed.
    pub max_connections: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 10_485_760,
            request_timeout_secs: 600,
            keepalive_secs: 10,
            header_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_connections: 10_000,
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://PATH` (or `sqlite::memory:` for tests), or `postgres://…` /
    /// `postgresql://…` for a database shared by several gateways (SPEC §6).
    pub url: String,
    /// `normal` survives a process crash; `full` also power loss (SQLite).
    pub sync: SyncMode,
    /// PostgreSQL: what an instance that died had reserved is released after this
    /// (its leases expire); 1 to 3600.
    pub reservation_ttl_secs: u64,
    /// PostgreSQL: connections in each instance's pool; 1 to 1000.
    pub pool_size: u32,
    /// PostgreSQL: the directory where an instance keeps the charges PostgreSQL could
    /// not commit (`pending-<instance>.jsonl`, replayed at the next open); created if
    /// missing (mode 0700).
    pub spill_dir: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://switchboard.db".into(),
            sync: SyncMode::Normal,
            reservation_ttl_secs: 30,
            pool_size: 16,
            spill_dir: ".".into(),
        }
    }
}

/// `[store].sync`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// WAL + `synchronous=NORMAL`.
    #[default]
    Normal,
    /// WAL + `synchronous=FULL` (fsync at every group commit).
    Full,
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Environment variable holding the admin token; `/admin/*` is off without it.
    pub token_env: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token_env: "SWITCHBOARD_ADMIN_TOKEN".into(),
        }
    }
}

/// `[health]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Consecutive retriable failures that mark an endpoint degraded.
    pub failure_threshold: u32,
    /// How long a degraded endpoint is skipped before one probe.
    pub cooldown_secs: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            failure_threshold: 5,
            cooldown_secs: 60,
        }
    }
}

/// `[retry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per request across all endpoints.
    pub max_attempts: u32,
    /// Backoff before re-trying the same endpoint; doubles each time.
    pub base_backoff_ms: u64,
    /// Backoff ceiling.
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            base_backoff_ms: 100,
            max_backoff_ms: 3200,
        }
    }
}

/// `[logging]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `sqlite`, `sqlite:PATH`, `jsonl:PATH`, `postgres` (the `requests` table of
    /// the `[store].url` PostgreSQL database) or `none`.
    pub sink: String,
    /// Store prompts and completions in request logs.
    pub log_content: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            sink: "sqlite".into(),
            log_content: false,
        }
    }
}

/// `[shared]`: the Redis that several instances share rate limits and endpoint health
/// through (SPEC §6; [`crate::shared`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedConfig {
    /// `redis://HOST:PORT[/DB]`, `rediss://…` (TLS) or `unix:///path`; absent: each
    /// instance on its own.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and channel.
    pub prefix: String,
}

impl Default for SharedConfig {
    fn default() -> Self {
        SharedConfig {
            redis_url: None,
            prefix: "switchboard:".into(),
        }
    }
}

/// `[idempotency]`: requests with an `Idempotency-Key` (SPEC §8.2;
/// [`crate::idempotency`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// How long a recorded answer is replayed, in seconds; purged after.
    pub ttl_secs: u64,
}

/// The longest `[idempotency].ttl_secs`: a year.
pub const MAX_IDEMPOTENCY_TTL_SECS: u64 = 365 * 86_400;

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig { ttl_secs: 86_400 }
    }
}

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI chat completions (and every OpenAI-compatible server).
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini `generateContent`.
    Gemini,
    /// In-process answers, no network.
    Mock,
}

impl ProviderKind {
    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Mock => "mock",
        }
    }
}

/// `[[providers]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Unique name; appears in `X-Provider`.
    pub name: String,
    /// Wire format.
    pub kind: ProviderKind,
    /// API root, e.g. `https://api.openai.com/v1`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Environment variable with the provider's secret.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The secret itself (prefer `api_key_env`; handy for local servers and tests).
    #[serde(default)]
    pub api_key: Option<String>,
    /// Per attempt, until the first byte.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// A stream silent this long is failed.
    #[serde(default = "default_idle")]
    pub stream_idle_timeout_secs: u64,
    /// Whether the provider may train on prompts.
    #[serde(default = "default_data_collection")]
    pub data_collection: DataCollection,
    /// The largest non-stream upstream body, and the most bytes of one streamed
    /// reply; a larger one is a failed attempt.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// Extra headers sent upstream.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// The smallest `max_response_bytes` accepted (1 KiB): below it no real answer fits.
const MIN_RESPONSE_BYTES: u64 = 1024;
/// The largest `max_response_bytes` accepted (1 GiB): the gateway holds a whole
/// non-stream body in memory.
const MAX_RESPONSE_BYTES: u64 = 1 << 30;

fn default_timeout() -> u64 {
    120
}
fn default_idle() -> u64 {
    60
}
fn default_max_response_bytes() -> u64 {
    crate::providers::limits::DEFAULT_MAX_RESPONSE_BYTES
}
fn default_data_collection() -> DataCollection {
    DataCollection::Deny
}

/// `[[models]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// What clients put in `model`.
    pub id: String,
    /// Tokenizer for counting when a provider reports no usage.
    #[serde(default = "default_tokenizer")]
    pub tokenizer: String,
    /// Shown in `/v1/models`.
    #[serde(default)]
    pub context_length: Option<u64>,
    /// The default `max_tokens`, and the reserve's bound.
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    /// Where the model is served.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
}

fn default_tokenizer() -> String {
    "o200k_base".into()
}

/// `[[models.endpoints]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Provider name.
    pub provider: String,
    /// The provider's name for the model.
    pub upstream_model: String,
    /// USD per 1,000,000 prompt tokens.
    pub prompt_usd_per_mtok: Price,
    /// USD per 1,000,000 completion tokens.
    pub completion_usd_per_mtok: Price,
    /// Default: the prompt price.
    #[serde(default)]
    pub cache_read_usd_per_mtok: Option<Price>,
    /// Default: the prompt price.
    #[serde(default)]
    pub cache_write_usd_per_mtok: Option<Price>,
    /// Share for load balancing (default 1).
    #[serde(default)]
    pub weight: Option<f64>,
}

/// `[[keys]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The client secret (stored hashed).
    pub secret: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Credit granted when the key is first created.
    pub credits_usd: Money,
    /// Lifetime spending limit.
    #[serde(default)]
    pub limit_usd: Option<Money>,
    /// Requests per minute.
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Tokens per UTC day.
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    /// Allow-list of model globs.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// `"daily"`, `"weekly"` or `"monthly"`: `limit_usd` applies to each such UTC
    /// period instead of the key's lifetime (SPEC §8.3).
    #[serde(default)]
    pub limit_reset: Option<String>,
    /// When the key stops working, RFC 3339 (`2026-01-31T00:00:00Z`).
    #[serde(default)]
    pub expires_at: Option<String>,
}

impl KeyConfig {
    /// `limit_reset` and `expires_at` (Unix seconds) parsed, or what is wrong with
    /// them (a config that passed [`Config::problems`] has nothing wrong).
    pub fn period_and_expiry(
        &self,
    ) -> Result<(Option<crate::keys::LimitReset>, Option<u64>), String> {
        let reset = self
            .limit_reset
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| {
                format!(
                    "key `{}`: limit_reset: {e}",
                    self.name.as_deref().unwrap_or("bootstrap")
                )
            })?;
        let expires = self
            .expires_at
            .as_deref()
            .map(crate::clock::parse_rfc3339)
            .transpose()
            .map_err(|e| {
                format!(
                    "key `{}`: expires_at: {e}",
                    self.name.as_deref().unwrap_or("bootstrap")
                )
            })?;
        Ok((reset, expires))
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// TOML path, e.g. `providers[0].base_url`.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    /// Where the config came from.
    pub source_name: String,
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} has {} problem(s):",
            self.source_name,
            self.problems.len()
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The built-in demo config of SPEC §1 (no network, no secrets needed).
pub const DEMO_TOML: &str = r#"
[server]
listen = "127.0.0.1:8080"

[store]
url = "sqlite://switchboard.db"

[[providers]]
name = "mock"
kind = "mock"

[[models]]
id = "mock/echo"
tokenizer = "o200k_base"
context_length = 8192
max_output_tokens = 1024
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1.0
  completion_usd_per_mtok = 2.0

[[models]]
id = "mock/lorem"
tokenizer = "o200k_base"
context_length = 8192
max_output_tokens = 256
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "lorem"
  prompt_usd_per_mtok = 1.0
  completion_usd_per_mtok = 2.0

[[keys]]
secret = "sk-demo"
name = "demo"
credits_usd = 1.0
"#;

impl Config {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::parse_named(text, "config")
    }

    /// Reads, parses and validates a file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![Problem {
                path: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        Self::parse_named(&text, &name)
    }

    /// The built-in demo.
    pub fn demo() -> Config {
        Self::parse_as(DEMO_TOML, "built-in demo config", true).expect("the demo config is valid")
    }

    fn parse_named(text: &str, name: &str) -> Result<Config, ConfigError> {
        Self::parse_as(text, name, false)
    }

    fn parse_as(text: &str, name: &str, builtin: bool) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            source_name: name.to_string(),
            problems,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| {
            fail(vec![Problem {
                path: String::new(),
                message: format!("not valid TOML: {}", e.to_string().trim()),
            }])
        })?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.message().to_string();
            let line = inner
                .span()
                .map(|s| format!(" (line {})", text[..s.start].lines().count().max(1)))
                .unwrap_or_default();
            fail(vec![Problem {
                path: if path == "." { String::new() } else { path },
                message: format!("{message}{line}"),
            }])
        })?;
        config.builtin = builtin;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    /// Semantic checks serde cannot make; empty when the config is usable.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |path: String, message: String| out.push(Problem { path, message });

        if self.server.listen.parse::<SocketAddr>().is_err() {
            bad(
                "server.listen".into(),
                format!(
                    "`{}` is not an address like 127.0.0.1:8080",
                    self.server.listen
                ),
            );
        }
        if self.server.max_body_bytes == 0 {
            bad("server.max_body_bytes".into(), "must be at least 1".into());
        }
        if self.server.request_timeout_secs == 0 {
            bad(
                "server.request_timeout_secs".into(),
                "must be at least 1".into(),
            );
        }
        if self.server.keepalive_secs == 0 {
            bad("server.keepalive_secs".into(), "must be at least 1".into());
        }
        // A day at most: a timer that long is a mistake, and far past it a
        // `Duration` added to now would overflow.
        for (name, secs) in [
            ("header_timeout_secs", self.server.header_timeout_secs),
            ("idle_timeout_secs", self.server.idle_timeout_secs),
        ] {
            if !(1..=86_400).contains(&secs) {
                bad(
                    format!("server.{name}"),
                    format!("must be between 1 and 86400 seconds, got {secs}"),
                );
            }
        }
        if !(1..=MAX_IDEMPOTENCY_TTL_SECS).contains(&self.idempotency.ttl_secs) {
            bad(
                "idempotency.ttl_secs".into(),
                format!(
                    "must be between 1 and {MAX_IDEMPOTENCY_TTL_SECS} seconds (a year), got {}",
                    self.idempotency.ttl_secs
                ),
            );
        }
        if self.server.max_connections == 0 {
            bad("server.max_connections".into(), "must be at least 1".into());
        }
        if !(self.store.url.starts_with("sqlite://")
            || self.store.url == "sqlite::memory:"
            || crate::store::is_postgres_url(&self.store.url))
        {
            bad(
                "store.url".into(),
                format!(
                    "`{}` is not supported; use sqlite://PATH or postgres://USER@HOST:PORT/DATABASE",
                    self.store.url
                ),
            );
        }
        if !(1..=3600).contains(&self.store.reservation_ttl_secs) {
            bad(
                "store.reservation_ttl_secs".into(),
                format!(
                    "must be between 1 and 3600 seconds, got {}",
                    self.store.reservation_ttl_secs
                ),
            );
        }
        if !(1..=1000).contains(&self.store.pool_size) {
            bad(
                "store.pool_size".into(),
                format!("must be between 1 and 1000, got {}", self.store.pool_size),
            );
        }
        if self.store.spill_dir.trim().is_empty() {
            bad(
                "store.spill_dir".into(),
                "must be a directory path (\".\" is the working directory), got an empty string"
                    .into(),
            );
        } else if crate::store::is_postgres_url(&self.store.url) {
            let dir = std::path::Path::new(&self.store.spill_dir);
            if dir.exists() && !dir.is_dir() {
                bad(
                    "store.spill_dir".into(),
                    format!("`{}` exists and is not a directory", self.store.spill_dir),
                );
            }
        }
        if self.health.failure_threshold == 0 {
            bad(
                "health.failure_threshold".into(),
                "must be at least 1".into(),
            );
        }
        if self.retry.max_attempts == 0 {
            bad("retry.max_attempts".into(), "must be at least 1".into());
        }
        if self.retry.base_backoff_ms > self.retry.max_backoff_ms {
            bad(
                "retry.base_backoff_ms".into(),
                "must not exceed retry.max_backoff_ms".into(),
            );
        }
        let sink = self.logging.sink.as_str();
        let sink_ok = matches!(sink, "sqlite" | "none" | "postgres")
            || sink.strip_prefix("sqlite:").is_some_and(|p| !p.is_empty())
            || sink.strip_prefix("jsonl:").is_some_and(|p| !p.is_empty());
        if !sink_ok {
            bad(
                "logging.sink".into(),
                format!("`{sink}` is not one of sqlite, sqlite:PATH, jsonl:PATH, postgres, none"),
            );
        }
        // The request log goes into the store's own PostgreSQL database.
        let pg_store = ["postgres://", "postgresql://"]
            .iter()
            .any(|scheme| self.store.url.starts_with(scheme));
        if sink == "postgres" && !pg_store {
            bad(
                "logging.sink".into(),
                format!(
                    "`postgres` writes the request log into the store's PostgreSQL database, but store.url `{}` is not a PostgreSQL URL (postgres://…); set store.url to one, or choose another sink (sqlite, sqlite:PATH, jsonl:PATH, none)",
                    self.store.url
                ),
            );
        }

        if let Some(url) = &self.shared.redis_url {
            if let Err(message) = crate::shared::check_url(url) {
                bad("shared.redis_url".into(), message);
            }
        }
        for (path, message) in self.cache.problems() {
            bad(path, message);
        }

        let mut names = HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            let at = |f: &str| format!("providers[{i}].{f}");
            if p.name.trim().is_empty() {
                bad(at("name"), "must not be empty".into());
            } else if !names.insert(p.name.as_str()) {
                bad(
                    at("name"),
                    format!("`{}` is used by another provider", p.name),
                );
            }
            if p.kind != ProviderKind::Mock {
                match p.base_url.as_deref() {
                    None => bad(
                        at("base_url"),
                        format!("required for kind `{}`", p.kind.as_str()),
                    ),
                    Some(u) => {
                        let ok = (u.starts_with("http://") || u.starts_with("https://"))
                            && u.parse::<http::Uri>().is_ok();
                        if !ok {
                            bad(at("base_url"), format!("`{u}` is not an http(s) URL"));
                        }
                    }
                }
                if p.api_key.is_none() && p.api_key_env.is_none() {
                    bad(
                        at("api_key_env"),
                        "name the environment variable that holds this provider's key".into(),
                    );
                }
            }
            if p.timeout_secs == 0 {
                bad(at("timeout_secs"), "must be at least 1".into());
            }
            if p.stream_idle_timeout_secs == 0 {
                bad(at("stream_idle_timeout_secs"), "must be at least 1".into());
            }
            if !(MIN_RESPONSE_BYTES..=MAX_RESPONSE_BYTES).contains(&p.max_response_bytes) {
                bad(
                    at("max_response_bytes"),
                    format!(
                        "must be between {MIN_RESPONSE_BYTES} and {MAX_RESPONSE_BYTES} (1 GiB); the default is {}",
                        default_max_response_bytes()
                    ),
                );
            }
            for (k, v) in &p.headers {
                if http::HeaderName::try_from(k.as_str()).is_err()
                    || http::HeaderValue::try_from(v.as_str()).is_err()
                {
                    bad(
                        at(&format!("headers.{k}")),
                        "is not a valid HTTP header".into(),
                    );
                }
            }
        }

        let mut ids = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let at = |f: &str| format!("models[{i}].{f}");
            if m.id.trim().is_empty() {
                bad(at("id"), "must not be empty".into());
            } else if m.id.contains(':') {
                bad(
                    at("id"),
                    "must not contain `:` (reserved for :floor / :nitro)".into(),
                );
            } else if !ids.insert(m.id.as_str()) {
                bad(at("id"), format!("`{}` is used by another model", m.id));
            }
            if !crate::tokenize::is_known(&m.tokenizer) {
                bad(
                    at("tokenizer"),
                    format!(
                        "`{}` is not one of {}",
                        m.tokenizer,
                        crate::tokenize::KNOWN.join(", ")
                    ),
                );
            }
            if m.max_output_tokens
                .is_some_and(|t| t == 0 || u64::from(t) > MAX_MODEL_TOKENS)
            {
                bad(
                    at("max_output_tokens"),
                    format!("must be from 1 to {MAX_MODEL_TOKENS}"),
                );
            }
            if m.context_length.is_some_and(|t| t > MAX_MODEL_TOKENS) {
                bad(
                    at("context_length"),
                    format!("must be at most {MAX_MODEL_TOKENS}"),
                );
            }
            if m.endpoints.is_empty() {
                bad(
                    at("endpoints"),
                    "a model needs at least one [[models.endpoints]]".into(),
                );
            }
            for (j, e) in m.endpoints.iter().enumerate() {
                let at = |f: &str| format!("models[{i}].endpoints[{j}].{f}");
                match self.providers.iter().find(|p| p.name == e.provider) {
                    None => bad(
                        at("provider"),
                        format!("no provider named `{}`", e.provider),
                    ),
                    Some(p) if p.kind == ProviderKind::Mock => {
                        if !matches!(e.upstream_model.as_str(), "echo" | "lorem") {
                            bad(
                                at("upstream_model"),
                                "a mock provider serves `echo` or `lorem`".into(),
                            );
                        }
                    }
                    Some(_) => {}
                }
                if e.upstream_model.trim().is_empty() {
                    bad(at("upstream_model"), "must not be empty".into());
                }
                for (field, price) in [
                    ("prompt_usd_per_mtok", Some(e.prompt_usd_per_mtok)),
                    ("completion_usd_per_mtok", Some(e.completion_usd_per_mtok)),
                    ("cache_read_usd_per_mtok", e.cache_read_usd_per_mtok),
                    ("cache_write_usd_per_mtok", e.cache_write_usd_per_mtok),
                ] {
                    if price.is_some_and(|p| p > MAX_PRICE) {
                        bad(
                            at(field),
                            format!("must be at most {MAX_PRICE} USD per million tokens"),
                        );
                    }
                }
                if let Some(w) = e.weight {
                    if !(w.is_finite() && w > 0.0) {
                        bad(at("weight"), "must be a positive number".into());
                    }
                }
            }
        }

        let mut secrets = HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let at = |f: &str| format!("keys[{i}].{f}");
            let chars = k.secret.trim().chars().count();
            if chars < 6 || (!self.builtin && chars < MIN_SECRET_CHARS) {
                bad(
                    at("secret"),
                    format!(
                        "must be at least {MIN_SECRET_CHARS} characters (it is stored as an unsalted SHA-256: a short secret can be guessed from it; `switchboard keys create` makes random ones)"
                    ),
                );
            } else if !secrets.insert(k.secret.as_str()) {
                bad(at("secret"), "is used by another key".into());
            }
            if !k.credits_usd.within(MAX_CREDITS) {
                bad(
                    at("credits_usd"),
                    format!("must be from 0 to {MAX_CREDITS} USD"),
                );
            }
            if k.limit_usd.is_some_and(|l| !l.within(MAX_CREDITS)) {
                bad(
                    at("limit_usd"),
                    format!("must be from 0 to {MAX_CREDITS} USD"),
                );
            }
            if k.rpm.is_some_and(|r| r == 0 || r > MAX_RPM) {
                bad(
                    at("rpm"),
                    format!("must be from 1 to {MAX_RPM} (leave it out for no limit)"),
                );
            }
            if k.tokens_per_day.is_some_and(|t| t > MAX_TOKENS_PER_DAY) {
                bad(
                    at("tokens_per_day"),
                    format!("must be at most {MAX_TOKENS_PER_DAY} (leave it out for no limit)"),
                );
            }
            if let Some(Err(e)) = k
                .limit_reset
                .as_deref()
                .map(str::parse::<crate::keys::LimitReset>)
            {
                bad(at("limit_reset"), e);
            }
            if let Some(Err(e)) = k.expires_at.as_deref().map(crate::clock::parse_rfc3339) {
                bad(at("expires_at"), e);
            }
            if let Some(models) = &k.models {
                for (j, pat) in models.iter().enumerate() {
                    if pat.trim().is_empty() {
                        bad(format!("keys[{i}].models[{j}]"), "must not be empty".into());
                    }
                }
            }
        }
        out
    }

    /// Problems that do not stop the gateway but will fail requests (e.g. a provider
    /// key variable that is not set in this environment).
    pub fn warnings(&self) -> Vec<Problem> {
        self.providers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind != ProviderKind::Mock && p.api_key.is_none())
            .filter_map(|(i, p)| {
                let var = p.api_key_env.as_deref()?;
                std::env::var_os(var).is_none().then(|| Problem {
                    path: format!("providers[{i}].api_key_env"),
                    message: format!(
                        "environment variable `{var}` is not set; requests to `{}` will fail over",
                        p.name
                    ),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_is_valid() {
        let c = Config::demo();
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.keys[0].credits_usd, "1".parse().unwrap());
    }

    #[test]
    fn shared_redis_url_schemes_are_checked() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.shared.redis_url, None);
        assert_eq!(c.shared.prefix, "switchboard:");
        for ok in [
            "redis://127.0.0.1:6379",
            "redis://:secret@10.0.0.5:6380/2",
            "unix:///run/redis.sock",
            "rediss://cache.example:6380",
        ] {
            let c = Config::from_toml(&format!(
                "[shared]\nredis_url = \"{ok}\"\nprefix = \"a:\"\n"
            ));
            assert!(c.is_ok(), "{ok}: {:?}", c.err().map(|e| e.to_string()));
        }
        for bad in ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis://h:port"] {
            let err = Config::from_toml(&format!("[shared]\nredis_url = \"{bad}\"\n")).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{bad}: {err}");
            assert_eq!(err.problems[0].path, "shared.redis_url", "{bad}");
        }
        // The password never shows in the message.
        let err =
            Config::from_toml("[shared]\nredis_url = \"http://u:hunter2@h:1\"\n").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(Config::from_toml("[shared]\nredis = \"x\"\n").is_err());
    }

    #[test]
    fn store_spill_dir_is_a_directory_path() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.store.spill_dir, ".");
        let pg = "[store]\nurl = \"postgres://sb@127.0.0.1:5432/sb\"\n";
        let c = Config::from_toml(&format!("{pg}spill_dir = \"/var/lib/switchboard\"\n")).unwrap();
        assert_eq!(c.store.spill_dir, "/var/lib/switchboard");
        let err = Config::from_toml(&format!("{pg}spill_dir = \" \"\n")).unwrap_err();
        assert_eq!(err.problems[0].path, "store.spill_dir", "{err}");
        // A file is not a directory.
        let file = std::env::current_exe().unwrap();
        let err =
            Config::from_toml(&format!("{pg}spill_dir = \"{}\"\n", file.display())).unwrap_err();
        assert_eq!(err.problems[0].path, "store.spill_dir", "{err}");
        assert!(err.problems[0].message.contains("not a directory"), "{err}");
    }

    #[test]
    fn type_errors_name_the_toml_path() {
        let err = Config::from_toml("[server]\nmax_body_bytes = \"big\"\n").unwrap_err();
        assert_eq!(err.problems[0].path, "server.max_body_bytes");
        let err = Config::from_toml("[server]\nlisen = \"x\"\n").unwrap_err();
        assert!(err.problems[0].message.contains("lisen"), "{err}");
    }

    #[test]
    fn server_connection_limits_have_defaults_and_bounds() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.server.header_timeout_secs, 10);
        assert_eq!(c.server.idle_timeout_secs, 60);
        assert_eq!(c.server.max_connections, 10_000);
        let err = Config::from_toml(
            "[server]\nheader_timeout_secs = 0\nidle_timeout_secs = 86401\nmax_connections = 0\n",
        )
        .unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.header_timeout_secs",
                "server.idle_timeout_secs",
                "server.max_connections"
            ],
            "{err}"
        );
    }

    #[test]
    fn prices_are_exact_decimals() {
        let c = Config::from_toml(
            r#"
[[providers]]
name = "m"
kind = "mock"
[[models]]
id = "m/echo"
  [[models.endpoints]]
  provider = "m"
  upstream_model = "echo"
  prompt_usd_per_mtok = 0.15
  completion_usd_per_mtok = "0.000001"
"#,
        )
        .unwrap();
        let e = &c.models[0].endpoints[0];
        assert_eq!(e.prompt_usd_per_mtok.pico_per_token(), 150_000);
        assert_eq!(e.completion_usd_per_mtok.pico_per_token(), 1);
        let err = Config::from_toml(
            "[[providers]]\nname='m'\nkind='mock'\n[[models]]\nid='a'\n[[models.endpoints]]\nprovider='m'\nupstream_model='echo'\nprompt_usd_per_mtok=0.0000001\ncompletion_usd_per_mtok=1\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("prompt_usd_per_mtok"), "{err}");
    }

    #[test]
    fn short_config_secrets_are_refused_but_the_demos_is_not() {
        let key = |secret: &str| format!("[[keys]]\nsecret = \"{secret}\"\ncredits_usd = 1\n");
        let err = Config::from_toml(&key("sk-only-19-chars-xx")).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].path, "keys[0].secret");
        assert!(
            err.problems[0].message.contains("at least 20 characters"),
            "{err}"
        );
        // The demo's own text, read as a config file, is refused like any other.
        let err = Config::from_toml(DEMO_TOML).unwrap_err();
        assert_eq!(err.problems[0].path, "keys[0].secret");
        // Twenty characters are enough; the built-in demo is exempt.
        Config::from_toml(&key("sk-exactly-20-chars-")).unwrap();
        let demo = Config::demo();
        assert!(demo.builtin && demo.problems().is_empty());
    }

    #[test]
    fn amounts_past_their_bounds_are_problems_with_their_paths() {
        let err = Config::from_toml(
            r#"
[[providers]]
name = "m"
kind = "mock"
[[models]]
id = "m/echo"
context_length = 100000001
max_output_tokens = 100000001
  [[models.endpoints]]
  provider = "m"
  upstream_model = "echo"
  prompt_usd_per_mtok = 10000.000001
  completion_usd_per_mtok = 10000
  cache_read_usd_per_mtok = 99999999
[[keys]]
secret = "sk-a-long-enough-secret-1"
credits_usd = "1000000.000000000001"
limit_usd = 9223372
rpm = 1000001
tokens_per_day = 1000000000000001
[[keys]]
secret = "sk-a-long-enough-secret-2"
credits_usd = 1000000
limit_usd = 1000000
rpm = 1000000
tokens_per_day = 1000000000000000
"#,
        )
        .unwrap_err();
        let paths: Vec<_> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "models[0].max_output_tokens",
                "models[0].context_length",
                "models[0].endpoints[0].prompt_usd_per_mtok",
                "models[0].endpoints[0].cache_read_usd_per_mtok",
                "keys[0].credits_usd",
                "keys[0].limit_usd",
                "keys[0].rpm",
                "keys[0].tokens_per_day",
            ],
            "{err}"
        );
        assert!(err.to_string().contains("from 0 to 1000000 USD"), "{err}");
    }

    #[test]
    fn every_semantic_problem_is_listed() {
        let err = Config::from_toml(
            r#"
[server]
listen = "nowhere"
[[providers]]
name = "oa"
kind = "openai"
[[providers]]
name = "oa"
kind = "mock"
[[models]]
id = "a:b"
"#,
        )
        .unwrap_err();
        let paths: Vec<_> = err.problems.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "server.listen",
            "providers[0].base_url",
            "providers[0].api_key_env",
            "providers[1].name",
            "models[0].id",
            "models[0].endpoints",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
    }

    #[test]
    fn a_postgres_request_log_needs_a_postgresql_store() {
        let err = Config::from_toml("[logging]\nsink = \"postgres\"\n").unwrap_err();
        let p: Vec<&Problem> = err
            .problems
            .iter()
            .filter(|p| p.path == "logging.sink")
            .collect();
        assert_eq!(p.len(), 1, "{err}");
        // Both keys are named: the sink's path, and store.url in the message.
        assert!(
            p[0].message.contains("store.url `sqlite://switchboard.db`")
                && p[0].message.contains("not a PostgreSQL URL"),
            "{err}"
        );
        for url in ["postgres://u@127.0.0.1:5432/db", "postgresql://u@h/db"] {
            let toml = format!("[store]\nurl = \"{url}\"\n[logging]\nsink = \"postgres\"\n");
            // store.url itself is the store's to judge; the sink has no complaint.
            if let Err(err) = Config::from_toml(&toml) {
                assert!(
                    err.problems.iter().all(|p| p.path != "logging.sink"),
                    "{err}"
                );
            }
        }
        let err = Config::from_toml("[logging]\nsink = \"mysql\"\n").unwrap_err();
        assert!(
            err.to_string().contains("jsonl:PATH, postgres, none"),
            "{err}"
        );
    }
}
