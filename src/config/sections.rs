//! The single-table sections: `[server]`, `[store]`, `[admin]`, `[health]`, `[retry]`,
//! `[logging]`, `[shared]`, `[idempotency]`, and their checks (`[cache]` lives in
//! [`crate::cache::CacheConfig`]).

use std::net::SocketAddr;

use serde::Deserialize;

use super::Config;

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
    /// SIGTERM / Ctrl-C: how long requests in flight may still finish; streams
    /// still open after it get the mid-stream error (`server_shutting_down`).
    /// 0 to 3600.
    pub shutdown_grace_secs: u64,
    /// The binary's log lines on stderr: `text` (for people) or `json` (one object
    /// per line, for log collectors); the `SWITCHBOARD_LOG_FORMAT` environment
    /// variable wins over it.
    pub log_format: LogFormat,
    /// Proxies (CIDRs or single addresses) whose `X-Forwarded-For` names the client
    /// ([`crate::client_ip`]); empty: the TCP peer is the client.
    pub trusted_proxies: Vec<String>,
}

/// `[server].log_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (ANSI colours only when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    /// `text` or `json` (what `SWITCHBOARD_LOG_FORMAT` may say).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "`{other}` is not a log format; use \"text\" or \"json\""
            )),
        }
    }
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
            shutdown_grace_secs: 30,
            log_format: LogFormat::Text,
            trusted_proxies: Vec::new(),
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

/// `[telemetry]`: OpenTelemetry export (SPEC §9; [`crate::otel`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP collector, `http(s)://HOST:PORT[/PATH]` (e.g.
    /// `http://127.0.0.1:4318`); spans are posted to its `/v1/traces` unless the URL
    /// already ends so. Absent: no export, and no spans beyond the log's.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// How long one export may take before it is abandoned (the batch is dropped).
    pub export_timeout_secs: u64,
}

impl TelemetryConfig {
    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.otlp_endpoint.is_some()
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "switchboard".into(),
            export_timeout_secs: 10,
        }
    }
}

/// The longest `[server].shutdown_grace_secs`: an hour.
pub const MAX_SHUTDOWN_GRACE_SECS: u64 = 3600;

/// The longest `[idempotency].ttl_secs`: a year.
pub const MAX_IDEMPOTENCY_TTL_SECS: u64 = 365 * 86_400;

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig { ttl_secs: 86_400 }
    }
}

/// Checks a listen address, `HOST:PORT`, without resolving it: the host is a name
/// (`localhost`), an IPv4 address or a bracketed IPv6 address (`[::1]`), and the port a
/// number from 0 to 65535 (0: any free port). `serve` resolves the name when it starts.
///
/// ```
/// use switchboard::config::check_listen;
///
/// assert!(check_listen("localhost:8080").is_ok());
/// assert!(check_listen("[::1]:0").is_ok());
/// assert!(check_listen("localhost").unwrap_err().contains("HOST:PORT"));
/// ```
pub fn check_listen(addr: &str) -> Result<(), String> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let wrong = |why: &str| {
        Err(format!(
            "`{addr}` is not an address: {why}; write HOST:PORT, e.g. 127.0.0.1:8080, localhost:8080 or [::1]:8080"
        ))
    };
    let Some((host, port)) = addr.rsplit_once(':') else {
        return wrong("it has no port");
    };
    if port.parse::<u16>().is_err() {
        return wrong(&format!(
            "the port `{port}` is not a number from 0 to 65535"
        ));
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match v6.parse::<std::net::Ipv6Addr>() {
            Ok(_) => Ok(()),
            Err(_) => wrong(&format!("`{v6}` is not an IPv6 address")),
        };
    }
    if host.contains(':') {
        return wrong("an IPv6 address goes in brackets");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return wrong(&format!("`{host}` is not a host name"));
    }
    Ok(())
}

/// Appends the problems of the single-table sections (`[cache]` included) to `bad`, in
/// file order.
pub(super) fn check(config: &Config, bad: &mut impl FnMut(String, String)) {
    if let Err(message) = check_listen(&config.server.listen) {
        bad("server.listen".into(), message);
    }
    if let Err(m) = crate::client_ip::TrustedProxies::parse(&config.server.trusted_proxies) {
        bad("server.trusted_proxies".into(), m);
    }
    if config.server.max_body_bytes == 0 {
        bad("server.max_body_bytes".into(), "must be at least 1".into());
    }
    if config.server.request_timeout_secs == 0 {
        bad(
            "server.request_timeout_secs".into(),
            "must be at least 1".into(),
        );
    }
    if config.server.keepalive_secs == 0 {
        bad("server.keepalive_secs".into(), "must be at least 1".into());
    }
    // A day at most: a timer that long is a mistake, and far past it a
    // `Duration` added to now would overflow.
    for (name, secs) in [
        ("header_timeout_secs", config.server.header_timeout_secs),
        ("idle_timeout_secs", config.server.idle_timeout_secs),
    ] {
        if !(1..=86_400).contains(&secs) {
            bad(
                format!("server.{name}"),
                format!("must be between 1 and 86400 seconds, got {secs}"),
            );
        }
    }
    if !(1..=MAX_IDEMPOTENCY_TTL_SECS).contains(&config.idempotency.ttl_secs) {
        bad(
            "idempotency.ttl_secs".into(),
            format!(
                "must be between 1 and {MAX_IDEMPOTENCY_TTL_SECS} seconds (a year), got {}",
                config.idempotency.ttl_secs
            ),
        );
    }
    if config.server.max_connections == 0 {
        bad("server.max_connections".into(), "must be at least 1".into());
    }
    if config.server.shutdown_grace_secs > MAX_SHUTDOWN_GRACE_SECS {
        bad(
            "server.shutdown_grace_secs".into(),
            format!(
                "must be between 0 and {MAX_SHUTDOWN_GRACE_SECS} seconds (an hour), got {}",
                config.server.shutdown_grace_secs
            ),
        );
    }
    if !(config.store.url.starts_with("sqlite://")
        || config.store.url == "sqlite::memory:"
        || crate::store::is_postgres_url(&config.store.url))
    {
        bad(
            "store.url".into(),
            format!(
                "`{}` is not supported; use sqlite://PATH or postgres://USER@HOST:PORT/DATABASE",
                config.store.url
            ),
        );
    }
    if !(1..=3600).contains(&config.store.reservation_ttl_secs) {
        bad(
            "store.reservation_ttl_secs".into(),
            format!(
                "must be between 1 and 3600 seconds, got {}",
                config.store.reservation_ttl_secs
            ),
        );
    }
    if !(1..=1000).contains(&config.store.pool_size) {
        bad(
            "store.pool_size".into(),
            format!("must be between 1 and 1000, got {}", config.store.pool_size),
        );
    }
    if config.store.spill_dir.trim().is_empty() {
        bad(
            "store.spill_dir".into(),
            "must be a directory path (\".\" is the working directory), got an empty string".into(),
        );
    } else if crate::store::is_postgres_url(&config.store.url) {
        let dir = std::path::Path::new(&config.store.spill_dir);
        if dir.exists() && !dir.is_dir() {
            bad(
                "store.spill_dir".into(),
                format!("`{}` exists and is not a directory", config.store.spill_dir),
            );
        }
    }
    if config.health.failure_threshold == 0 {
        bad(
            "health.failure_threshold".into(),
            "must be at least 1".into(),
        );
    }
    if config.retry.max_attempts == 0 {
        bad("retry.max_attempts".into(), "must be at least 1".into());
    }
    if config.retry.base_backoff_ms > config.retry.max_backoff_ms {
        bad(
            "retry.base_backoff_ms".into(),
            "must not exceed retry.max_backoff_ms".into(),
        );
    }
    if let Some(url) = &config.telemetry.otlp_endpoint {
        if let Err(m) = crate::otel::traces_url(url) {
            bad("telemetry.otlp_endpoint".into(), m);
        }
    }
    if config.telemetry.service_name.trim().is_empty() {
        bad("telemetry.service_name".into(), "must not be empty".into());
    }
    if !(1..=300).contains(&config.telemetry.export_timeout_secs) {
        bad(
            "telemetry.export_timeout_secs".into(),
            format!(
                "must be between 1 and 300 seconds, got {}",
                config.telemetry.export_timeout_secs
            ),
        );
    }
    let sink = config.logging.sink.as_str();
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
        .any(|scheme| config.store.url.starts_with(scheme));
    if sink == "postgres" && !pg_store {
        bad(
                "logging.sink".into(),
                format!(
                    "`postgres` writes the request log into the store's PostgreSQL database, but store.url `{}` is not a PostgreSQL URL (postgres://…); set store.url to one, or choose another sink (sqlite, sqlite:PATH, jsonl:PATH, none)",
                    config.store.url
                ),
            );
    }

    if let Some(url) = &config.shared.redis_url {
        if let Err(message) = crate::shared::check_url(url) {
            bad("shared.redis_url".into(), message);
        }
    }
    for (path, message) in config.cache.problems() {
        bad(path, message);
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, LogFormat, Problem};

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
    fn shutdown_grace_and_log_format_have_defaults_and_bounds() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.server.shutdown_grace_secs, 30);
        assert_eq!(c.server.log_format, LogFormat::Text);
        let c = Config::from_toml("[server]\nshutdown_grace_secs = 0\nlog_format = \"json\"\n")
            .unwrap();
        assert_eq!(c.server.shutdown_grace_secs, 0);
        assert_eq!(c.server.log_format, LogFormat::Json);
        let err = Config::from_toml("[server]\nshutdown_grace_secs = 3601\n").unwrap_err();
        assert_eq!(err.problems[0].path, "server.shutdown_grace_secs", "{err}");
        assert!(
            err.problems[0].message.contains("between 0 and 3600"),
            "{err}"
        );
        let err = Config::from_toml("[server]\nlog_format = \"yaml\"\n").unwrap_err();
        assert_eq!(err.problems[0].path, "server.log_format", "{err}");
        assert!(err.problems[0].message.contains("json"), "{err}");
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        let bad = "JSON5".parse::<LogFormat>().unwrap_err();
        assert!(
            bad.contains("JSON5") && bad.contains("\"text\" or \"json\""),
            "{bad}"
        );
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

    #[test]
    fn listen_takes_host_names_ipv4_and_bracketed_ipv6() {
        for ok in [
            "127.0.0.1:8080",
            "0.0.0.0:0",
            "localhost:8080",
            "gateway.internal:443",
            "[::1]:8080",
            "[::]:0",
        ] {
            let c = Config::from_toml(&format!("[server]\nlisten = \"{ok}\"\n"));
            assert!(c.is_ok(), "{ok}: {:?}", c.err().map(|e| e.to_string()));
        }
        for bad in [
            "localhost",
            "localhost:http",
            "localhost:65536",
            "::1:8080",
            "[nope]:80",
            ":8080",
            "a b:80",
        ] {
            let err = Config::from_toml(&format!("[server]\nlisten = \"{bad}\"\n")).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{bad}: {err}");
            assert_eq!(err.problems[0].path, "server.listen", "{bad}");
            assert!(
                err.problems[0].message.contains("HOST:PORT"),
                "{bad}: {err}"
            );
        }
    }
}
