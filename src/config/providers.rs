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

    /// The `base_url` used when the config gives none: the provider's public API for
    /// `anthropic` and `gemini`. `openai` has none on purpose: the kind also speaks to
    /// local and third-party servers, and a forgotten `base_url` must not send their
    /// prompts to a public API.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::Anthropic => Some("https://api.anthropic.com"),
            ProviderKind::Gemini => Some("https://generativelanguage.googleapis.com"),
            ProviderKind::OpenAi | ProviderKind::Mock => None,
        }
    }

    /// The version paths the adapter appends itself (`/v1/messages`,
    /// `/v1beta/models/…`): a `base_url` ending in one has it removed.
    fn version_paths(self) -> &'static [&'static str] {
        match self {
            ProviderKind::Anthropic => &["/v1"],
            ProviderKind::Gemini => &["/v1beta", "/v1"],
            ProviderKind::OpenAi | ProviderKind::Mock => &[],
        }
    }
}

/// The field an `openai`-kind provider gets the completion limit in
/// (`[[providers]] max_tokens_field`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    /// `max_tokens`: every OpenAI-compatible server knows it.
    MaxTokens,
    /// `max_completion_tokens`: OpenAI's reasoning models refuse anything else.
    MaxCompletionTokens,
}

impl MaxTokensField {
    /// The JSON field name.
    pub fn as_str(self) -> &'static str {
        match self {
            MaxTokensField::MaxTokens => "max_tokens",
            MaxTokensField::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

/// A provider's API root as requests are built on it ([`ProviderConfig::resolved_base_url`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// Scheme, host and path prefix: no trailing slash, no query, no version path the
    /// adapter appends itself.
    pub root: String,
    /// The query string (without `?`) kept after every request path, e.g. Azure
    /// OpenAI's `api-version=2024-10-21`.
    pub query: Option<String>,
    /// The version path removed from the end of the configured URL (`/v1`), for
    /// `check`'s warning.
    pub stripped: Option<&'static str>,
}

/// Normalises a configured `base_url` of `kind`: the query is split off and kept,
/// trailing slashes go, and then a version path the adapter appends itself (anthropic
/// `/v1`, gemini `/v1beta` or `/v1`), so `https://api.anthropic.com/v1/` still calls
/// `…/v1/messages`, never `…/v1/v1/messages`.
///
/// ```
/// use switchboard::config::{normalize_base_url, ProviderKind};
///
/// let b = normalize_base_url(ProviderKind::Anthropic, "https://api.anthropic.com/v1/");
/// assert_eq!(b.root, "https://api.anthropic.com");
/// assert_eq!(b.stripped, Some("/v1"));
/// let b = normalize_base_url(
///     ProviderKind::OpenAi,
///     "https://res.openai.azure.com/openai/deployments/gpt-4o?api-version=2024-10-21",
/// );
/// assert_eq!(b.root, "https://res.openai.azure.com/openai/deployments/gpt-4o");
/// assert_eq!(b.query.as_deref(), Some("api-version=2024-10-21"));
/// ```
pub fn normalize_base_url(kind: ProviderKind, url: &str) -> BaseUrl {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, (!q.is_empty()).then(|| q.to_string())),
        None => (url, None),
    };
    let mut root = path.trim_end_matches('/');
    let mut stripped = None;
    if let Some(v) = kind.version_paths().iter().find(|v| root.ends_with(**v)) {
        let rest = root[..root.len() - v.len()].trim_end_matches('/');
        // Never strip the URL down to its scheme (`https://v1` is a host).
        if rest
            .split_once("://")
            .is_some_and(|(_, host)| !host.is_empty())
        {
            root = rest;
            stripped = Some(*v);
        }
    }
    BaseUrl {
        root: root.to_string(),
        query,
        stripped,
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
    /// API root, e.g. `https://api.openai.com/v1`; a query string (Azure OpenAI's
    /// `?api-version=…`) is kept after every request path. Optional for `anthropic`
    /// and `gemini` ([`ProviderKind::default_base_url`]); see [`normalize_base_url`].
    #[serde(default)]
    pub base_url: Option<String>,
    /// Environment variable with the provider's secret. With neither this nor
    /// `api_key`, the provider is keyless (a local server) and no key header is sent.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The secret itself (prefer `api_key_env`; handy for local servers and tests).
    #[serde(default)]
    pub api_key: Option<String>,
    /// `openai` kind only: the header the key is sent in, as it is (e.g. Azure
    /// OpenAI's `api-key`), instead of `Authorization: Bearer KEY`.
    #[serde(default)]
    pub api_key_header: Option<String>,
    /// `openai` kind only: the field the completion limit is sent in, whatever the
    /// client used; unset: `max_completion_tokens` for `api.openai.com` and Azure
    /// OpenAI, `max_tokens` for every other server.
    #[serde(default)]
    pub max_tokens_field: Option<MaxTokensField>,
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

impl ProviderConfig {
    /// The API root requests go to: the configured `base_url` (else the kind's
    /// [default](ProviderKind::default_base_url)), [normalised](normalize_base_url).
    /// `None` for `mock`, and for an `openai` provider without one (a problem `check`
    /// reports).
    pub fn resolved_base_url(&self) -> Option<BaseUrl> {
        if self.kind == ProviderKind::Mock {
            return None;
        }
        let url = self.base_url.as_deref().or(self.kind.default_base_url())?;
        Some(normalize_base_url(self.kind, url))
    }
}

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
                None if p.kind.default_base_url().is_none() => bad(
                    at("base_url"),
                    format!(
                        "required for kind `{}`: the API root the requests go to, e.g. \
                         `https://api.openai.com/v1` for OpenAI itself or \
                         `http://127.0.0.1:8000/v1` for a local server",
                        p.kind.as_str()
                    ),
                ),
                None => {}
                Some(u) => {
                    let ok = (u.starts_with("http://") || u.starts_with("https://"))
                        && u.parse::<http::Uri>().is_ok();
                    if !ok {
                        bad(
                            at("base_url"),
                            format!(
                                "`{u}` is not an http(s) URL, e.g. `https://api.openai.com/v1`"
                            ),
                        );
                    } else if p.kind == ProviderKind::OpenAi {
                        let root = normalize_base_url(p.kind, u).root;
                        if let Some(rest) = root
                            .strip_suffix("/chat/completions")
                            .or_else(|| root.strip_suffix("/embeddings"))
                        {
                            bad(
                                at("base_url"),
                                format!(
                                    "`{u}` ends in the request path the gateway appends itself; \
                                     give the API root, `{rest}`"
                                ),
                            );
                        }
                    }
                }
            }
        }
        if let Some(var) = &p.api_key_env {
            if var.trim().is_empty() || var.contains(['=', '\0']) {
                bad(
                    at("api_key_env"),
                    format!(
                        "`{var}` is not an environment variable name; name the variable \
                         that holds the key (e.g. `OPENAI_API_KEY`), or remove the line \
                         for a server that needs no key"
                    ),
                );
            }
        }
        if p.kind != ProviderKind::OpenAi {
            let kind = p.kind.as_str();
            if p.max_tokens_field.is_some() {
                let how = match p.kind {
                    ProviderKind::Anthropic => "Anthropic always gets `max_tokens`",
                    ProviderKind::Gemini => "Gemini always gets `generationConfig.maxOutputTokens`",
                    _ => "the mock takes no completion limit field",
                };
                bad(
                    at("max_tokens_field"),
                    format!("applies to kind `openai` only, not `{kind}` ({how}); remove it"),
                );
            }
            if p.api_key_header.is_some() {
                bad(
                    at("api_key_header"),
                    format!(
                        "applies to kind `openai` only, not `{kind}` (its key header is fixed); \
                         remove it, or set a header in `headers`"
                    ),
                );
            }
        }
        if let Some(h) = &p.api_key_header {
            if http::HeaderName::try_from(h.as_str()).is_err() {
                bad(
                    at("api_key_header"),
                    format!("`{h}` is not an HTTP header name, e.g. `api-key`"),
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

/// The warnings of every `[[providers]]`: things `check` accepts but says, e.g. a
/// `base_url` whose version path was removed.
pub(super) fn warnings(config: &Config, warn: &mut impl FnMut(String, String)) {
    for (i, p) in config.providers.iter().enumerate() {
        let (Some(url), Some(b)) = (p.base_url.as_deref(), p.resolved_base_url()) else {
            continue;
        };
        if let Some(v) = b.stripped {
            warn(
                format!("providers[{i}].base_url"),
                format!(
                    "`{url}` ends in `{v}`, which the `{}` adapter appends itself; \
                     using `{}` (write that to silence this warning)",
                    p.kind.as_str(),
                    b.root
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_paths_and_trailing_slashes_are_stripped() {
        let n = normalize_base_url;
        let cases = [
            (
                ProviderKind::Anthropic,
                "https://api.anthropic.com",
                "https://api.anthropic.com",
                None,
            ),
            (
                ProviderKind::Anthropic,
                "https://api.anthropic.com/",
                "https://api.anthropic.com",
                None,
            ),
            (
                ProviderKind::Anthropic,
                "https://api.anthropic.com/v1",
                "https://api.anthropic.com",
                Some("/v1"),
            ),
            (
                ProviderKind::Anthropic,
                "https://api.anthropic.com/v1//",
                "https://api.anthropic.com",
                Some("/v1"),
            ),
            (
                ProviderKind::Anthropic,
                "http://127.0.0.1:9/proxy/v1",
                "http://127.0.0.1:9/proxy",
                Some("/v1"),
            ),
            // Whole path segments only, and never the host.
            (
                ProviderKind::Anthropic,
                "https://h/apiv1",
                "https://h/apiv1",
                None,
            ),
            (ProviderKind::Anthropic, "https://v1", "https://v1", None),
            (
                ProviderKind::Gemini,
                "https://generativelanguage.googleapis.com/v1beta/",
                "https://generativelanguage.googleapis.com",
                Some("/v1beta"),
            ),
            (
                ProviderKind::Gemini,
                "https://generativelanguage.googleapis.com/v1",
                "https://generativelanguage.googleapis.com",
                Some("/v1"),
            ),
            (
                ProviderKind::OpenAi,
                "https://api.openai.com/v1/",
                "https://api.openai.com/v1",
                None,
            ),
            (
                ProviderKind::OpenAi,
                "http://127.0.0.1:8000/v1",
                "http://127.0.0.1:8000/v1",
                None,
            ),
        ];
        for (kind, url, root, stripped) in cases {
            let b = n(kind, url);
            assert_eq!(
                (b.root.as_str(), b.stripped, b.query),
                (root, stripped, None),
                "{url}"
            );
        }
        let b = n(
            ProviderKind::OpenAi,
            "https://r.openai.azure.com/openai/deployments/d/?api-version=2024-10-21",
        );
        assert_eq!(b.root, "https://r.openai.azure.com/openai/deployments/d");
        assert_eq!(b.query.as_deref(), Some("api-version=2024-10-21"));
        assert_eq!(n(ProviderKind::OpenAi, "http://h/v1?").query, None);
    }

    fn problems(provider: &str) -> Vec<String> {
        let text = format!("[[providers]]\nname = \"p\"\n{provider}\n");
        match Config::from_toml(&text) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn defaults_keyless_providers_and_misplaced_fields() {
        // Anthropic and Gemini need neither base_url nor key.
        assert!(problems("kind = \"anthropic\"").is_empty());
        assert!(problems("kind = \"gemini\"").is_empty());
        let c = Config::from_toml("[[providers]]\nname = \"a\"\nkind = \"anthropic\"\n").unwrap();
        assert_eq!(
            c.providers[0].resolved_base_url().unwrap().root,
            "https://api.anthropic.com"
        );
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        // A keyless local server.
        assert!(problems("kind = \"openai\"\nbase_url = \"http://127.0.0.1:8000/v1\"").is_empty());
        // OpenAI kind keeps base_url required, with the example in the message.
        let p = problems("kind = \"openai\"");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("providers[0].base_url: required")
                && p[0].contains("https://api.openai.com/v1"),
            "{p:?}"
        );
        // An empty variable name.
        let p = problems("kind = \"gemini\"\napi_key_env = \" \"");
        assert!(
            p.len() == 1 && p[0].starts_with("providers[0].api_key_env:"),
            "{p:?}"
        );
        // Fields for the openai kind only.
        let p = problems(
            "kind = \"anthropic\"\nmax_tokens_field = \"max_tokens\"\napi_key_header = \"api-key\"",
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].contains("max_tokens_field: applies to kind `openai` only")
                && p[0].contains("always gets `max_tokens`"),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("providers[0].api_key_header: applies"),
            "{p:?}"
        );
        let p = problems(
            "kind = \"openai\"\nbase_url = \"https://x/v1\"\nmax_tokens_field = \"max_token\"",
        );
        assert!(p.len() == 1 && p[0].contains("max_tokens_field"), "{p:?}");
        let p = problems(
            "kind = \"openai\"\nbase_url = \"https://x/v1\"\napi_key_header = \"api key\"",
        );
        assert!(
            p.len() == 1 && p[0].contains("not an HTTP header name"),
            "{p:?}"
        );
        // The request path itself in base_url.
        let p = problems(
            "kind = \"openai\"\nbase_url = \"https://api.openai.com/v1/chat/completions\"",
        );
        assert!(
            p.len() == 1 && p[0].contains("give the API root, `https://api.openai.com/v1`"),
            "{p:?}"
        );
    }

    #[test]
    fn a_stripped_version_path_is_a_warning() {
        let c = Config::from_toml(
            "[[providers]]\nname = \"a\"\nkind = \"anthropic\"\nbase_url = \"https://api.anthropic.com/v1\"\napi_key = \"k\"\n",
        )
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].path, "providers[0].base_url");
        assert!(
            w[0].message.contains("using `https://api.anthropic.com`"),
            "{w:?}"
        );
    }
}
