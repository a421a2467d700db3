//! `[[keys]]`: the bootstrap keys, their `limit_reset` / `expires_at` parsing, and their
//! checks.

use std::collections::HashSet;

use serde::Deserialize;

use super::Config;
use crate::money::{Money, MAX_CREDITS, MAX_RPM, MAX_TOKENS_PER_DAY};

/// The shortest `[[keys]] secret` a config file may hold. Keys are stored as the
/// unsalted SHA-256 of their secret: fine for the 40-character random secrets
/// `switchboard keys create` makes, guessable for short typed ones. The built-in
/// demo's `sk-demo` (SPEC §1) is exempt: it is not a config file.
pub const MIN_SECRET_CHARS: usize = 20;

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
    /// Free-form tags (`labels = { team = "search", env = "prod" }`), recorded with
    /// each request in the log (`key_labels`); the bounds of
    /// [`check_labels`](crate::keys::check_labels).
    #[serde(default)]
    pub labels: crate::keys::Labels,
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

/// Appends the problems of every `[[keys]]` to `bad`, in file order.
pub(super) fn check(config: &Config, bad: &mut impl FnMut(String, String)) {
    let mut secrets = HashSet::new();
    for (i, k) in config.keys.iter().enumerate() {
        let at = |f: &str| format!("keys[{i}].{f}");
        let chars = k.secret.trim().chars().count();
        if chars < 6 || (!config.builtin && chars < MIN_SECRET_CHARS) {
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
        if let Err(e) = crate::keys::check_labels(&k.labels) {
            bad(at("labels"), e);
        }
        if let Some(models) = &k.models {
            for (j, pat) in models.iter().enumerate() {
                if pat.trim().is_empty() {
                    bad(format!("keys[{i}].models[{j}]"), "must not be empty".into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, DEMO_TOML};

    #[test]
    fn labels_are_read_and_bounded() {
        let key = |labels: &str| {
            format!("[[keys]]\nsecret = \"sk-labelled-0123456789\"\ncredits_usd = 1\nlabels = {labels}\n")
        };
        let config = Config::from_toml(&key("{ team = \"search\", env = \"prod\" }")).unwrap();
        assert_eq!(config.keys[0].labels["team"], "search");
        let err = Config::from_toml(&key("{ \"bad key!\" = \"x\" }")).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].path, "keys[0].labels");
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
}
