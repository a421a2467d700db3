//! [`RequestRecord`]: what the request log keeps of one request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::context::CallContext;
use crate::money::Money;

/// One request, as written to the log (one JSON object per line in a JSONL sink, one
/// row in the SQLite sink). Never holds a secret; holds what users wrote only when
/// `[logging].log_content = true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The gateway's request id (the response `id`, `X-Request-Id`).
    pub id: String,
    /// Arrival time, Unix milliseconds.
    pub time_ms: u64,
    /// The key's id (never its secret), when the request was authenticated.
    pub key_id: Option<String>,
    /// The model the client asked for.
    pub requested_model: String,
    /// The gateway model id that served.
    pub model: Option<String>,
    /// The provider that served.
    pub provider: Option<String>,
    /// Every upstream attempt, in order.
    pub attempts: Vec<AttemptLog>,
    /// HTTP status sent (499: the client went away before the response was ready).
    pub status: u16,
    /// Prompt tokens charged (cached ones included).
    pub prompt_tokens: u64,
    /// Completion tokens charged (reasoning included).
    pub completion_tokens: u64,
    /// Prompt tokens read from the provider's cache.
    pub cached_tokens: u64,
    /// Completion tokens spent on reasoning.
    pub reasoning_tokens: u64,
    /// The amount charged, USD (exact decimal).
    pub cost: Money,
    /// Arrival to the end of the response (or the client going away), milliseconds.
    pub latency_ms: u64,
    /// Arrival to the first content chunk, milliseconds.
    pub ttft_ms: Option<u64>,
    /// Whether the client asked for a stream.
    pub streamed: bool,
    /// Whether the whole response body was sent (false: error or client gone).
    pub complete: bool,
    /// The final `finish_reason`.
    pub finish_reason: Option<String>,
    /// The SPEC §3.2 error code, if the request failed.
    pub error_code: Option<String>,
    /// The prompt messages, only with `log_content = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<serde_json::Value>,
    /// The completion text delivered, only with `log_content = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    /// Whether an upstream reported usage above the request's reservation (the
    /// charge was capped at the reservation; see [`crate::metering`]).
    #[serde(default)]
    pub over_reserve: bool,
    /// The app that sent it: its `HTTP-Referer` header (bounded).
    #[serde(default)]
    pub app_url: Option<String>,
    /// The app's name: its `X-Title` header (bounded).
    #[serde(default)]
    pub app_title: Option<String>,
    /// Whether the answer came from the response cache (no upstream call, no charge;
    /// see [`crate::cache`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cache_hit: bool,
    /// The key's name, when the request was authenticated.
    #[serde(default)]
    pub key_name: Option<String>,
    /// The key's labels (a JSON object), when the request was authenticated.
    #[serde(default)]
    pub key_labels: Option<crate::keys::Labels>,
    /// The client's address: the TCP peer, or with `[server].trusted_proxies` the
    /// nearest untrusted address of `X-Forwarded-For`.
    #[serde(default)]
    pub client_ip: Option<std::net::IpAddr>,
}

/// One upstream attempt of a [`RequestRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptLog {
    /// Provider name.
    pub provider: String,
    /// Gateway model id tried.
    pub model: String,
    /// `"200"`, `"503"`, `"timeout"`, ….
    pub status: String,
    /// From the attempt's start to its first content or its failure, milliseconds.
    pub latency_ms: u64,
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl RequestRecord {
    /// The record of a request from its context, `total` after it arrived.
    /// `complete` says whether the response body was sent to its end; content is
    /// included only when `log_content` is on.
    pub fn from_context(
        ctx: &CallContext,
        total: Duration,
        complete: bool,
        log_content: bool,
    ) -> RequestRecord {
        let s = ctx.snapshot();
        let arrived = SystemTime::now()
            .checked_sub(total)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, millis);
        let usage = s.usage.as_ref();
        let (model, provider) = match &s.served {
            Some(e) => (
                Some((*e.model).to_owned()),
                Some((*e.provider.name).to_owned()),
            ),
            None => match &s.cache_hit {
                Some(hit) => (Some(hit.model.clone()), Some(hit.provider.clone())),
                None => (None, None),
            },
        };
        let prompt = if log_content {
            s.logged_request
                .as_ref()
                .and_then(|r| serde_json::to_value(&r.messages).ok())
        } else {
            None
        };
        RequestRecord {
            id: ctx.request_id().to_string(),
            time_ms: arrived,
            key_id: ctx.key().map(|k| k.id.clone()),
            requested_model: s.requested_model,
            model,
            provider,
            attempts: s
                .attempts
                .iter()
                .map(|a| AttemptLog {
                    provider: (*a.provider).to_owned(),
                    model: (*a.model).to_owned(),
                    status: a.status.clone(),
                    latency_ms: millis(a.latency),
                })
                .collect(),
            // Nothing was sent: the client went away before the response was ready.
            status: if s.status == 0 { 499 } else { s.status },
            prompt_tokens: usage.map_or(0, |u| u.prompt_tokens),
            completion_tokens: usage.map_or(0, |u| u.completion_tokens),
            cached_tokens: usage.map_or(0, |u| u.cached_tokens()),
            reasoning_tokens: usage.map_or(0, |u| u.reasoning_tokens()),
            cost: s.cost,
            latency_ms: millis(total),
            ttft_ms: s.ttft.map(millis),
            streamed: s.streamed,
            complete,
            finish_reason: s.finish_reason,
            error_code: s.error_code.map(str::to_string),
            prompt,
            completion: if log_content { s.completion_text } else { None },
            over_reserve: s.over_reserve,
            app_url: s.app_url,
            app_title: s.app_title,
            cache_hit: s.cache_hit.is_some(),
            key_name: ctx.key().map(|k| k.name.clone()),
            key_labels: ctx.key().map(|k| k.labels.clone()),
            client_ip: None,
        }
    }
}
