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

mod keys;
mod models;
mod providers;
mod read;
mod sections;

use std::fmt;
use std::path::Path;

use serde::Deserialize;

pub use keys::{KeyConfig, MIN_SECRET_CHARS};
pub use models::{EndpointConfig, ModelConfig, ModelType};
pub use providers::{normalize_base_url, BaseUrl, MaxTokensField, ProviderConfig, ProviderKind};
pub use sections::{
    check_listen, AdminConfig, HealthConfig, IdempotencyConfig, LogFormat, LoggingConfig,
    RetryConfig, ServerConfig, SharedConfig, StoreConfig, SyncMode, TelemetryConfig,
    MAX_IDEMPOTENCY_TTL_SECS, MAX_SHUTDOWN_GRACE_SECS,
};

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
    /// `[telemetry]`: OpenTelemetry export (SPEC §9).
    #[serde(default)]
    pub telemetry: TelemetryConfig,
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

[[models]]
id = "mock/embed"
type = "embedding"
tokenizer = "o200k_base"
context_length = 8192
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "embed"
  prompt_usd_per_mtok = 0.1
  completion_usd_per_mtok = 0

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
        let (config, mut problems, removed) =
            read::read(text).map_err(|syntax| fail(vec![syntax]))?;
        // The semantic checks of every part that did parse, in the file's indices,
        // without those that only follow from a part that did not.
        if let Some(mut config) = config {
            config.builtin = builtin;
            problems.extend(
                config
                    .problems()
                    .into_iter()
                    .filter(|p| !removed.is_consequence(&config, p))
                    .map(|p| Problem {
                        path: removed.translate(&p.path),
                        message: p.message,
                    }),
            );
            if problems.is_empty() {
                return Ok(config);
            }
        }
        Err(fail(problems))
    }

    /// Semantic checks serde cannot make; empty when the config is usable.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |path: String, message: String| out.push(Problem { path, message });

        sections::check(self, &mut bad);
        providers::check(self, &mut bad);
        models::check(self, &mut bad);
        keys::check(self, &mut bad);
        out
    }

    /// Problems that do not stop the gateway but will fail requests (e.g. a provider
    /// key variable that is not set in this environment).
    pub fn warnings(&self) -> Vec<Problem> {
        let mut out: Vec<Problem> = self
            .providers
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
            .collect();
        providers::warnings(self, &mut |path, message| {
            out.push(Problem { path, message })
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_is_valid() {
        let c = Config::demo();
        assert_eq!(c.models.len(), 3);
        assert_eq!(c.models[2].kind, ModelType::Embedding);
        assert_eq!(c.keys[0].credits_usd, "1".parse().unwrap());
    }

    #[test]
    fn type_errors_name_the_toml_path() {
        let err = Config::from_toml("[server]\nmax_body_bytes = \"big\"\n").unwrap_err();
        assert_eq!(err.problems[0].path, "server.max_body_bytes");
        let err = Config::from_toml("[server]\nlisen = \"x\"\n").unwrap_err();
        assert!(err.problems[0].message.contains("lisen"), "{err}");
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
            "providers[1].name",
            "models[0].id",
            "models[0].endpoints",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
    }

    /// Several type errors in several sections and array elements, and the semantic
    /// problems of what parsed, all in one result with the file's paths.
    #[test]
    fn every_type_error_and_every_semantic_problem_in_one_run() {
        let err = Config::from_toml(
            r#"[server]
listen = "nowhere"
max_body_bytes = "big"
lisen = "127.0.0.1:1"

[retry]
max_attempts = -1

[[providers]]
name = "broken"
kind = "telepathy"
timeout_secs = "soon"

[[providers]]
name = "m"
kind = "mock"
timeout_secs = 0

[[models]]
id = "a/b"
context_length = "long"
  [[models.endpoints]]
  provider = "broken"
  upstream_model = "x"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1
  [[models.endpoints]]
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1
  [[models.endpoints]]
  provider = "m"
  upstream_model = "nope"
  prompt_usd_per_mtok = true
  completion_usd_per_mtok = 1
  [[models.endpoints]]
  provider = "m"
  upstream_model = "nope"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1

[[keys]]
secret = "short"
credits_usd = 1
rpm = "fast"
models = ["a/*", 3]
"#,
        )
        .unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                // Type errors, in the order serde meets them.
                "server.max_body_bytes",
                "server.lisen",
                "retry.max_attempts",
                "providers[0].kind",
                "providers[0].timeout_secs",
                "models[0].context_length",
                "models[0].endpoints[1]",
                "models[0].endpoints[2].prompt_usd_per_mtok",
                "keys[0].rpm",
                "keys[0].models[1]",
                // Semantic problems of what parsed, in the file's indices.
                "server.listen",
                "providers[1].timeout_secs",
                "models[0].endpoints[3].upstream_model",
                "keys[0].secret",
            ],
            "{err}"
        );
        let message = |path: &str| {
            let p = err.problems.iter().find(|p| p.path == path).unwrap();
            p.message.clone()
        };
        assert_eq!(
            message("server.max_body_bytes"),
            "invalid type: string \"big\", expected a whole number, 0 or more (line 3)"
        );
        assert!(
            message("server.lisen").starts_with("unknown field `lisen`, expected one of `listen`"),
            "{err}"
        );
        assert!(message("server.lisen").ends_with("(line 4)"), "{err}");
        assert!(
            message("providers[0].kind")
                .contains("unknown variant `telepathy`, expected one of `openai`"),
            "{err}"
        );
        assert_eq!(
            message("models[0].endpoints[1]"),
            "missing field `provider`: add it (line 27)"
        );
        assert!(
            message("models[0].endpoints[2].prompt_usd_per_mtok").contains("decimal number"),
            "{err}"
        );
        // Provider `broken` did not parse: its endpoint is not also "no provider named
        // broken"; endpoint 2's `upstream_model = "nope"` is checked at its own index.
        assert!(!err.to_string().contains("no provider named"), "{err}");
        assert!(
            !paths.contains(&"models[0].endpoints[2].upstream_model"),
            "an endpoint left out of the checks is not judged: {err}"
        );
    }

    #[test]
    fn an_unknown_section_is_one_problem_and_the_rest_is_still_checked() {
        let err =
            Config::from_toml("[servr]\nlisten = 1\n[retry]\nmax_attempts = 0\n").unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert_eq!(err.problems[0].path, "servr");
        assert!(
            err.problems[0]
                .message
                .starts_with("unknown field `servr`, expected one of `server`"),
            "{err}"
        );
        assert!(err.problems[0].message.ends_with("(line 1)"), "{err}");
        assert_eq!(err.problems[1].path, "retry.max_attempts");
        // A table where an array of tables belongs.
        let err = Config::from_toml("[providers]\nname = \"x\"\n").unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].path, "providers");
        assert!(
            err.problems[0].message.contains("expected an array"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_required_field_does_not_cascade() {
        let err = Config::from_toml(
            r#"
[[providers]]
name = "oa"
[[providers]]
name = "m"
kind = "mock"
[[models]]
id = "a/only-on-oa"
  [[models.endpoints]]
  provider = "oa"
  upstream_model = "x"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1
[[models]]
id = "a/no-endpoint-parses"
  [[models.endpoints]]
  provider = "m"
  upstream_model = "echo"
[[models]]
id = "m/e"
  [[models.endpoints]]
  provider = "gone"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1
"#,
        )
        .unwrap_err();
        let shown: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            shown,
            [
                "providers[0]: missing field `kind`: add it (line 2)",
                "models[1].endpoints[0]: missing field `prompt_usd_per_mtok`: add it (line 16)",
                // A provider that is nowhere in the file is still a problem.
                "models[2].endpoints[0].provider: no provider named `gone`",
            ],
            "{err}"
        );
    }
}
