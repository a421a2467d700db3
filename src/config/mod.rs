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
mod sections;

use std::fmt;
use std::path::Path;

use serde::Deserialize;

pub use keys::{KeyConfig, MIN_SECRET_CHARS};
pub use models::{EndpointConfig, ModelConfig, ModelType};
pub use providers::{ProviderConfig, ProviderKind};
pub use sections::{
    AdminConfig, HealthConfig, IdempotencyConfig, LogFormat, LoggingConfig, RetryConfig,
    ServerConfig, SharedConfig, StoreConfig, SyncMode, MAX_IDEMPOTENCY_TTL_SECS,
    MAX_SHUTDOWN_GRACE_SECS,
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

        sections::check(self, &mut bad);
        providers::check(self, &mut bad);
        models::check(self, &mut bad);
        keys::check(self, &mut bad);
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
            "providers[0].api_key_env",
            "providers[1].name",
            "models[0].id",
            "models[0].endpoints",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
    }
}
