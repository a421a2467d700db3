//! `[[models]]` and their `[[models.endpoints]]`, and their checks.

use std::collections::HashSet;

use serde::Deserialize;

use super::{Config, ProviderKind};
use crate::money::{Price, MAX_MODEL_TOKENS, MAX_PRICE};

/// `[[models]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// What clients put in `model`.
    pub id: String,
    /// `type`: `"chat"` (the default) or `"embedding"` (served on `/v1/embeddings`
    /// only, SPEC §7.3).
    #[serde(rename = "type", default)]
    pub kind: ModelType,
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

/// What a model does, and so the endpoints that serve it (SPEC §7.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// Chat completions, `/v1/messages`, `/v1/responses`.
    #[default]
    Chat,
    /// `/v1/embeddings`.
    Embedding,
}

impl ModelType {
    /// The config name, as `/v1/models` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Chat => "chat",
            ModelType::Embedding => "embedding",
        }
    }
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
    /// Mock endpoints only: milliseconds before the answer starts (as a slow upstream's
    /// head; past the provider's `timeout_secs`, the attempt times out).
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Mock endpoints only: milliseconds between a stream's chunks (past the
    /// provider's `stream_idle_timeout_secs`, the stream stalls and is cut).
    #[serde(default)]
    pub chunk_delay_ms: Option<u64>,
}

/// The largest `delay_ms` / `chunk_delay_ms` of a mock endpoint (10 minutes).
pub const MAX_MOCK_DELAY_MS: u64 = 600_000;

/// Appends the problems of every `[[models]]` to `bad`, in file order.
pub(super) fn check(config: &Config, bad: &mut impl FnMut(String, String)) {
    let mut ids = HashSet::new();
    for (i, m) in config.models.iter().enumerate() {
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
            match config.providers.iter().find(|p| p.name == e.provider) {
                None => bad(
                    at("provider"),
                    format!("no provider named `{}`", e.provider),
                ),
                Some(p) if p.kind == ProviderKind::Mock => match m.kind {
                    ModelType::Chat if !matches!(e.upstream_model.as_str(), "echo" | "lorem") => {
                        bad(
                            at("upstream_model"),
                            "a mock provider serves `echo` or `lorem` (or `embed` to an embedding model)".into(),
                        )
                    }
                    ModelType::Embedding if e.upstream_model != "embed" => bad(
                        at("upstream_model"),
                        "a mock provider serves embedding models as `embed`".into(),
                    ),
                    _ => {}
                },
                Some(p) if p.kind == ProviderKind::Anthropic && m.kind == ModelType::Embedding => {
                    bad(
                        at("provider"),
                        format!(
                            "`{}` is an anthropic provider, and Anthropic has no embeddings API: serve embedding models from openai, gemini or mock providers",
                            e.provider
                        ),
                    )
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
            let mock = config
                .providers
                .iter()
                .any(|p| p.name == e.provider && p.kind == ProviderKind::Mock);
            for (field, ms) in [
                ("delay_ms", e.delay_ms),
                ("chunk_delay_ms", e.chunk_delay_ms),
            ] {
                match ms {
                    Some(_) if !mock => bad(
                        at(field),
                        format!(
                            "only endpoints of a mock provider take `{field}` (a demo of slow upstreams): remove it"
                        ),
                    ),
                    Some(ms) if ms > MAX_MOCK_DELAY_MS => bad(
                        at(field),
                        format!("must be at most {MAX_MOCK_DELAY_MS} (10 minutes)"),
                    ),
                    _ => {}
                }
            }
            if let Some(w) = e.weight {
                if !(w.is_finite() && w > 0.0) {
                    bad(at("weight"), "must be a positive number".into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ModelType;
    use crate::config::Config;

    #[test]
    fn model_types_default_to_chat_and_bad_ones_name_their_path() {
        let toml = |kind: &str, provider: &str, upstream: &str| {
            format!(
                r#"
[[providers]]
name = "m"
kind = "mock"
[[providers]]
name = "an"
kind = "anthropic"
base_url = "http://127.0.0.1:9"
api_key = "k"
[[models]]
id = "a/chat"
  [[models.endpoints]]
  provider = "m"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1
[[models]]
id = "a/b"
{kind}
  [[models.endpoints]]
  provider = "{provider}"
  upstream_model = "{upstream}"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 0
"#
            )
        };
        let c = Config::from_toml(&toml("type = \"embedding\"", "m", "embed")).unwrap();
        assert_eq!(c.models[0].kind, ModelType::Chat);
        assert_eq!(c.models[1].kind, ModelType::Embedding);

        let err = Config::from_toml(&toml("type = \"vision\"", "m", "embed")).unwrap_err();
        assert_eq!(err.problems[0].path, "models[1].type", "{err}");
        assert!(err.to_string().contains("embedding"), "{err}");

        let err = Config::from_toml(&toml("type = \"embedding\"", "an", "x")).unwrap_err();
        assert_eq!(
            err.problems[0].path, "models[1].endpoints[0].provider",
            "{err}"
        );
        assert!(err.to_string().contains("no embeddings API"), "{err}");

        let err = Config::from_toml(&toml("type = \"embedding\"", "m", "echo")).unwrap_err();
        assert_eq!(
            err.problems[0].path,
            "models[1].endpoints[0].upstream_model"
        );
        let err = Config::from_toml(&toml("", "m", "embed")).unwrap_err();
        assert_eq!(
            err.problems[0].path,
            "models[1].endpoints[0].upstream_model"
        );
    }

    #[test]
    fn delays_are_for_mock_endpoints_and_bounded() {
        let toml = |provider: &str, field: &str| {
            format!(
                r#"
[[providers]]
name = "m"
kind = "mock"
[[providers]]
name = "o"
kind = "openai"
base_url = "http://127.0.0.1:9"
api_key = "k"
[[models]]
id = "a/b"
  [[models.endpoints]]
  provider = "{provider}"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1
  {field}
"#
            )
        };
        let c = Config::from_toml(&toml("m", "delay_ms = 600000\nchunk_delay_ms = 5")).unwrap();
        assert_eq!(c.models[0].endpoints[0].delay_ms, Some(600_000));
        let err = Config::from_toml(&toml("m", "chunk_delay_ms = 600001")).unwrap_err();
        assert_eq!(
            err.problems[0].path,
            "models[0].endpoints[0].chunk_delay_ms"
        );
        assert!(err.to_string().contains("at most 600000"), "{err}");
        let err = Config::from_toml(&toml("o", "delay_ms = 10")).unwrap_err();
        assert_eq!(err.problems[0].path, "models[0].endpoints[0].delay_ms");
        assert!(
            err.to_string()
                .contains("only endpoints of a mock provider"),
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
}
