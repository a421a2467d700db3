//! The runtime catalog: providers, models and their endpoints, built once from config.
//!
//! An *endpoint* is one (model, provider) pair with its prices; health, routing and
//! metering all work on `Arc<Endpoint>`, so a request never looks a name up twice.
//!
//! # Example
//! ```
//! use switchboard::{catalog::Catalog, config::Config};
//!
//! let catalog = Catalog::from_config(&Config::demo());
//! let echo = catalog.model("mock/echo").unwrap();
//! assert_eq!(echo.endpoints[0].provider.name.as_ref(), "mock");
//! assert!(catalog.model("nope/nope").is_none());
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::chat::{CostDetails, DataCollection};
pub use crate::config::ModelType;
use crate::config::{Config, MaxTokensField, ProviderKind};
use crate::money::{Money, Price};

/// A configured upstream provider.
#[derive(Debug)]
pub struct Provider {
    /// Unique name (shown in `X-Provider`).
    pub name: Arc<str>,
    /// Wire format.
    pub kind: ProviderKind,
    /// API root without a trailing slash, a query or the version path the adapter
    /// appends ([`normalize_base_url`](crate::config::normalize_base_url)); build
    /// request URLs with [`Provider::url`].
    pub base_url: String,
    /// The configured `base_url`'s query (e.g. Azure OpenAI's `api-version=…`), kept
    /// after every request path.
    pub base_query: Option<String>,
    /// The provider's secret, read from the environment at start.
    pub api_key: Option<String>,
    /// Where the secret was meant to come from (for error messages).
    pub api_key_env: Option<String>,
    /// `openai` kind: the header the key goes in as it is, instead of
    /// `Authorization: Bearer`.
    pub api_key_header: Option<HeaderName>,
    /// `openai` kind: the field the completion limit goes in; `None`: chosen by host.
    pub max_tokens_field: Option<MaxTokensField>,
    /// Until the first byte of each attempt.
    pub timeout: Duration,
    /// Longest silence inside a stream.
    pub stream_idle_timeout: Duration,
    /// Whether it may train on prompts.
    pub data_collection: DataCollection,
    /// The most bytes of one answer: a non-stream body, or a whole stream.
    pub max_response_bytes: usize,
    /// Extra headers sent upstream.
    pub headers: HeaderMap,
}

impl Provider {
    /// The URL of `path` (relative, e.g. `chat/completions`, which may carry its own
    /// query) under the provider's API root, with the base URL's query kept.
    ///
    /// ```
    /// use switchboard::{catalog::Catalog, config::Config};
    ///
    /// let config = Config::from_toml(r#"
    /// [[providers]]
    /// name = "azure"
    /// kind = "openai"
    /// base_url = "https://res.openai.azure.com/openai/deployments/gpt-4o?api-version=2024-10-21"
    /// api_key_header = "api-key"
    /// "#).unwrap();
    /// let azure = Catalog::from_config(&config).provider("azure").unwrap().clone();
    /// assert_eq!(
    ///     azure.url("chat/completions"),
    ///     "https://res.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    /// );
    /// assert!(azure.url("x?alt=sse").ends_with("/x?alt=sse&api-version=2024-10-21"));
    /// ```
    pub fn url(&self, path: &str) -> String {
        let mut url = format!("{}/{}", self.base_url, path.trim_start_matches('/'));
        if let Some(q) = &self.base_query {
            url.push(if path.contains('?') { '&' } else { '?' });
            url.push_str(q);
        }
        url
    }
}

/// A model as clients see it.
#[derive(Debug)]
pub struct Model {
    /// Gateway model id.
    pub id: Arc<str>,
    /// Chat or embedding (`[[models]].type`): which inbound APIs may call it.
    pub kind: ModelType,
    /// Tokenizer name for counting.
    pub tokenizer: String,
    /// Context window, for `/v1/models`.
    pub context_length: Option<u64>,
    /// Default `max_tokens` and the reserve's bound.
    pub max_output_tokens: Option<u32>,
    /// Where it is served, in config order.
    pub endpoints: Vec<Arc<Endpoint>>,
}

/// Token prices of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pricing {
    /// Per prompt token.
    pub prompt: Price,
    /// Per completion token (reasoning included).
    pub completion: Price,
    /// Per cache-read prompt token.
    pub cache_read: Price,
    /// Per cache-write prompt token.
    pub cache_write: Price,
}

impl Pricing {
    /// The cost of a usage report (SPEC §4). Cached and cache-write tokens are part of
    /// `prompt_tokens` and priced at their own rates instead of the prompt rate.
    ///
    /// Saturates at `i64::MAX` pico-USD when the usage is absurd (see
    /// [`Pricing::checked_cost`]): more than any key holds, so the charge is capped by
    /// its reservation, never wrapped.
    pub fn cost(&self, usage: &crate::chat::Usage) -> Money {
        self.checked_cost(usage)
            .unwrap_or(Money::from_pico(i64::MAX))
    }

    /// The cost of a usage report, or `None` when it does not fit in `i64` pico-USD
    /// (only absurd usage can do that: within [`MAX_PRICE`](crate::money::MAX_PRICE)
    /// a billion tokens cost 10¹⁹ pico-USD at most).
    pub fn checked_cost(&self, usage: &crate::chat::Usage) -> Option<Money> {
        let d = self.checked_cost_details(usage)?;
        d.prompt
            .checked_add(d.cached_prompt)?
            .checked_add(d.cache_write)?
            .checked_add(d.completion)
    }

    /// The cost of a usage report by kind of token (they add up to
    /// [`Pricing::checked_cost`]), or `None` when a part does not fit in `i64` pico-USD.
    pub fn checked_cost_details(&self, usage: &crate::chat::Usage) -> Option<CostDetails> {
        let cached = usage.cached_tokens();
        let written = usage.cache_write_tokens();
        let plain = usage
            .prompt_tokens
            .saturating_sub(cached.saturating_add(written));
        Some(CostDetails {
            prompt: self.prompt.checked_times(plain)?,
            cached_prompt: self.cache_read.checked_times(cached)?,
            cache_write: self.cache_write.checked_times(written)?,
            completion: self.completion.checked_times(usage.completion_tokens)?,
        })
    }

    /// Prompt + completion price, USD per million tokens (the draw's `price`).
    pub fn sum_per_mtok(&self) -> f64 {
        self.prompt.per_mtok_f64() + self.completion.per_mtok_f64()
    }
}

/// One (model, provider) pair.
#[derive(Debug)]
pub struct Endpoint {
    /// Index in [`Catalog::endpoints`]; stable for the process.
    pub index: usize,
    /// Gateway model id.
    pub model: Arc<str>,
    /// Tokenizer of the model.
    pub tokenizer: String,
    /// Default completion bound of the model.
    pub max_output_tokens: Option<u32>,
    /// Who serves it.
    pub provider: Arc<Provider>,
    /// The provider's model name.
    pub upstream_model: String,
    /// Prices.
    pub pricing: Pricing,
    /// Share for the weighted draw.
    pub weight: f64,
    /// Mock endpoints: the wait before the answer starts (`delay_ms`; zero elsewhere).
    pub delay: Duration,
    /// Mock endpoints: the wait between a stream's chunks (`chunk_delay_ms`; zero
    /// elsewhere).
    pub chunk_delay: Duration,
}

impl Endpoint {
    /// `model@provider`, for logs and metrics.
    pub fn label(&self) -> String {
        format!("{}@{}", self.model, self.provider.name)
    }
}

/// Every provider, model and endpoint of a config.
#[derive(Debug, Default)]
pub struct Catalog {
    providers: Vec<Arc<Provider>>,
    models: Vec<Arc<Model>>,
    by_id: HashMap<Arc<str>, Arc<Model>>,
    endpoints: Vec<Arc<Endpoint>>,
}

impl Catalog {
    /// Builds the catalog of a validated config; provider keys are read from the
    /// environment now.
    pub fn from_config(config: &Config) -> Catalog {
        let providers: Vec<Arc<Provider>> = config
            .providers
            .iter()
            .map(|p| {
                let mut headers = HeaderMap::new();
                for (k, v) in &p.headers {
                    if let (Ok(k), Ok(v)) = (
                        HeaderName::try_from(k.as_str()),
                        HeaderValue::try_from(v.as_str()),
                    ) {
                        headers.insert(k, v);
                    }
                }
                let base = p.resolved_base_url();
                Arc::new(Provider {
                    name: p.name.as_str().into(),
                    kind: p.kind,
                    base_url: base.as_ref().map(|b| b.root.clone()).unwrap_or_default(),
                    base_query: base.and_then(|b| b.query),
                    api_key_header: p
                        .api_key_header
                        .as_deref()
                        .and_then(|h| HeaderName::try_from(h).ok()),
                    max_tokens_field: p.max_tokens_field,
                    api_key: p
                        .api_key
                        .clone()
                        .or_else(|| p.api_key_env.as_deref().and_then(|v| std::env::var(v).ok())),
                    api_key_env: p.api_key_env.clone(),
                    timeout: Duration::from_secs(p.timeout_secs),
                    stream_idle_timeout: Duration::from_secs(p.stream_idle_timeout_secs),
                    data_collection: p.data_collection,
                    // Validated ≤ 1 GiB, so it fits a usize on every target.
                    max_response_bytes: usize::try_from(p.max_response_bytes).unwrap_or(usize::MAX),
                    headers,
                })
            })
            .collect();
        let mut catalog = Catalog {
            providers,
            ..Catalog::default()
        };
        for m in &config.models {
            let id: Arc<str> = m.id.as_str().into();
            let mut endpoints = Vec::new();
            for e in &m.endpoints {
                let Some(provider) = catalog.provider(&e.provider).cloned() else {
                    continue;
                };
                let endpoint = Arc::new(Endpoint {
                    index: catalog.endpoints.len(),
                    model: id.clone(),
                    tokenizer: m.tokenizer.clone(),
                    max_output_tokens: m.max_output_tokens,
                    provider,
                    upstream_model: e.upstream_model.clone(),
                    pricing: Pricing {
                        prompt: e.prompt_usd_per_mtok,
                        completion: e.completion_usd_per_mtok,
                        cache_read: e.cache_read_usd_per_mtok.unwrap_or(e.prompt_usd_per_mtok),
                        cache_write: e.cache_write_usd_per_mtok.unwrap_or(e.prompt_usd_per_mtok),
                    },
                    weight: e.weight.unwrap_or(1.0),
                    delay: Duration::from_millis(e.delay_ms.unwrap_or(0)),
                    chunk_delay: Duration::from_millis(e.chunk_delay_ms.unwrap_or(0)),
                });
                catalog.endpoints.push(endpoint.clone());
                endpoints.push(endpoint);
            }
            let model = Arc::new(Model {
                id: id.clone(),
                kind: m.kind,
                tokenizer: m.tokenizer.clone(),
                context_length: m.context_length,
                max_output_tokens: m.max_output_tokens,
                endpoints,
            });
            catalog.by_id.insert(id, model.clone());
            catalog.models.push(model);
        }
        catalog
    }

    /// A model by gateway id (without variant suffix).
    pub fn model(&self, id: &str) -> Option<&Arc<Model>> {
        self.by_id.get(id)
    }

    /// Every model, in config order.
    pub fn models(&self) -> &[Arc<Model>] {
        &self.models
    }

    /// A provider by name.
    pub fn provider(&self, name: &str) -> Option<&Arc<Provider>> {
        self.providers.iter().find(|p| p.name.as_ref() == name)
    }

    /// Every provider, in config order.
    pub fn providers(&self) -> &[Arc<Provider>] {
        &self.providers
    }

    /// Every endpoint; `endpoints()[e.index]` is `e`.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{PromptTokensDetails, Usage};

    #[test]
    fn cost_prices_each_token_kind_at_its_rate() {
        let p = |s: &str| s.parse::<Price>().unwrap();
        let pricing = Pricing {
            prompt: p("3"),
            completion: p("15"),
            cache_read: p("0.3"),
            cache_write: p("3.75"),
        };
        let mut usage = Usage::new(1000, 100);
        usage.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: 600,
            cache_write_tokens: 200,
        });
        // 200×3 + 600×0.3 + 200×3.75 + 100×15 = 600 + 180 + 750 + 1500 = 3030 µUSD.
        assert_eq!(pricing.cost(&usage).to_string(), "0.00303");
    }

    #[test]
    fn absurd_usage_saturates_instead_of_wrapping() {
        let p = |s: &str| s.parse::<Price>().unwrap();
        let pricing = Pricing {
            prompt: p("10000"),
            completion: p("10000"),
            cache_read: p("10000"),
            cache_write: p("10000"),
        };
        // 10¹⁵ tokens at $10,000/Mtok is 10²⁵ pico-USD: no i64 holds it.
        let mut usage = Usage::new(1_000_000_000_000_000, 1_000_000_000_000_000);
        assert_eq!(pricing.checked_cost(&usage), None);
        assert_eq!(pricing.cost(&usage), Money::from_pico(i64::MAX));
        // Cache counts past u64 when added: no overflow either.
        usage.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: u64::MAX,
            cache_write_tokens: u64::MAX,
        });
        assert_eq!(pricing.checked_cost(&usage), None);
        // Two halves that together pass i64::MAX: the sum is refused, not wrapped.
        let half = Pricing {
            prompt: Price::from_pico_per_token(1),
            completion: Price::from_pico_per_token(1),
            cache_read: Price::ZERO,
            cache_write: Price::ZERO,
        };
        let u = Usage::new(i64::MAX as u64, i64::MAX as u64);
        assert_eq!(half.checked_cost(&u), None);
        assert!(!half.cost(&u).is_negative());
    }
}
