//! `[[providers]]`: the upstreams and the wire format each speaks, and their checks.

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use super::Config;
use crate::chat::DataCollection;

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

/// Appends the problems of every `[[providers]]` to `bad`, in file order.
pub(super) fn check(config: &Config, bad: &mut impl FnMut(String, String)) {
    let mut names = HashSet::new();
    for (i, p) in config.providers.iter().enumerate() {
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
}
