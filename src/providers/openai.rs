//! OpenAI chat completions, and every OpenAI-compatible server.
//!
//! `POST {base_url}/chat/completions` with `Authorization: Bearer`. The client body is
//! passed through (unknown fields included) with `model` replaced by the upstream
//! name and OpenRouter-only fields removed (`reasoning` becomes `reasoning_effort`,
//! see [`effort_for_budget`]; an assistant turn's `reasoning_details`, which our own
//! answers carry and OpenRouter-style clients send back, goes only to OpenRouter
//! itself: strict servers refuse a message field they do not know); streams always
//! ask for
//! `stream_options.include_usage` so metering gets the provider's own count.
//!
//! Embeddings (SPEC §7.3): `POST {base_url}/embeddings` with `model`, `input` (one string
//! or one token-id array as such, else a list of them), `dimensions`, `encoding_format: "float"` and `user`
//! ([`embeddings_body`]); `data[].embedding` is read by `index`, `usage.prompt_tokens`
//! is the usage.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{optional_api_key, protocol_error, Adapter, Decoded, StreamDecoder};
use crate::chat::{
    ChatChunk, ChatCompletion, ChatRequest, EmbeddingInput, EmbeddingsInput, Message,
    ReasoningWanted, Stop, Tool, Usage,
};
use crate::config::MaxTokensField;
use crate::context::ProviderCall;
use crate::error::{FailureKind, ProviderError};

/// The OpenAI adapter.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAiAdapter;

/// The body sent upstream, borrowing from the client request.
#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: WireMessages<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<&'a Stop>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a [Tool]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<WireStreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'a str>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct WireStreamOptions {
    include_usage: bool,
}

/// The completion limit sent upstream, as `(max_tokens, max_completion_tokens)`: always
/// the [bound credit admission reserved](crate::credit::completion_bound) per choice.
/// A provider's `max_tokens_field` puts it in that field alone, whatever the client
/// used. Without one it goes in each field the client used; when the client used
/// neither, in `max_completion_tokens` for OpenAI itself (`api.openai.com`, Azure
/// OpenAI: its reasoning models refuse `max_tokens`) and in `max_tokens` for every
/// other OpenAI-compatible server (the field they all know; some ignore the newer
/// one, which would leave the reply unbounded).
fn completion_limit(call: &ProviderCall) -> (Option<u32>, Option<u32>) {
    let req = &call.request;
    let bound = crate::credit::completion_bound(req, &call.endpoint);
    let provider = &call.endpoint.provider;
    let only = |field| match field {
        MaxTokensField::MaxTokens => (Some(bound), None),
        MaxTokensField::MaxCompletionTokens => (None, Some(bound)),
    };
    if let Some(field) = provider.max_tokens_field {
        return only(field);
    }
    match (req.max_tokens, req.max_completion_tokens) {
        (None, None) => {
            let url = &provider.base_url;
            if url.contains("api.openai.com") || url.contains(".openai.azure.com") {
                only(MaxTokensField::MaxCompletionTokens)
            } else {
                only(MaxTokensField::MaxTokens)
            }
        }
        (max_tokens, max_completion_tokens) => (
            max_tokens.map(|_| bound),
            max_completion_tokens.map(|_| bound),
        ),
    }
}

/// The `reasoning_effort` sent for a thinking budget (`reasoning.max_tokens`), by
/// buckets: below 4,096 tokens `low`, below 16,384 `medium`, else `high`.
pub fn effort_for_budget(budget: u32) -> &'static str {
    match budget {
        0..4096 => "low",
        4096..16384 => "medium",
        _ => "high",
    }
}

/// The `reasoning_effort` sent upstream for the request's
/// [reasoning](ChatRequest::reasoning_wanted): an effort as written, a budget by
/// [`effort_for_budget`], nothing when reasoning is off (OpenAI-compatible servers
/// share no "off"; a model that always reasons keeps its default). OpenRouter's
/// `reasoning` object itself is never sent.
fn reasoning_effort(req: &ChatRequest) -> Option<&str> {
    match req.reasoning_wanted()? {
        ReasoningWanted::Effort(e) => Some(e),
        ReasoningWanted::Budget(n) => Some(effort_for_budget(n)),
        ReasoningWanted::Off => None,
    }
}

/// The messages as sent: each as the client wrote it, but an assistant turn's
/// `reasoning_details` left out unless `keep_details` (the upstream is OpenRouter).
struct WireMessages<'a> {
    messages: &'a [Message],
    keep_details: bool,
}

impl Serialize for WireMessages<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.messages.len()))?;
        for m in self.messages {
            if self.keep_details || !m.extra.contains_key("reasoning_details") {
                seq.serialize_element(m)?;
            } else {
                // Rare (a conversation that reasoned): a copy without the field.
                let mut m = m.clone();
                m.extra.remove("reasoning_details");
                seq.serialize_element(&m)?;
            }
        }
        seq.end()
    }
}

/// Builds the exact JSON body sent to an OpenAI-kind provider (used by golden tests).
pub fn wire_body(call: &ProviderCall, stream: bool) -> Result<Vec<u8>, serde_json::Error> {
    let req = &call.request;
    let endpoint = &call.endpoint;
    let (max_tokens, max_completion_tokens) = completion_limit(call);
    let wire = WireRequest {
        model: &endpoint.upstream_model,
        messages: WireMessages {
            messages: &req.messages,
            keep_details: endpoint.provider.base_url.contains("openrouter.ai"),
        },
        max_tokens,
        max_completion_tokens,
        n: req.n,
        temperature: req.temperature,
        top_p: req.top_p,
        stop: req.stop.as_ref(),
        tools: req.tools.as_deref(),
        tool_choice: req.tool_choice.as_ref(),
        response_format: req.response_format.as_ref(),
        seed: req.seed,
        user: req.user.as_deref(),
        stream,
        stream_options: stream.then_some(WireStreamOptions {
            include_usage: true,
        }),
        reasoning_effort: reasoning_effort(req),
        extra: &req.extra,
    };
    serde_json::to_vec(&wire)
}

impl Adapter for OpenAiAdapter {
    fn build_request(
        &self,
        call: &ProviderCall,
        stream: bool,
    ) -> Result<http::Request<Bytes>, ProviderError> {
        let provider = &call.endpoint.provider;
        let key = optional_api_key(call)?;
        let (body, path) = match &call.request.inbound.embeddings {
            Some(e) => (embeddings_body(call, e), "embeddings"),
            None => (wire_body(call, stream), "chat/completions"),
        };
        let body = body.map_err(|e| protocol_error(call, e))?;
        let mut req = http::Request::post(provider.url(path))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, crate::USER_AGENT);
        // No key, no header: a local server that needs none gets none.
        if let Some(key) = key {
            req = match &provider.api_key_header {
                Some(name) => req.header(name, key),
                None => req.header(http::header::AUTHORIZATION, format!("Bearer {key}")),
            };
        }
        req.body(Bytes::from(body))
            .map_err(|e| protocol_error(call, e))
    }

    fn parse_response(&self, call: &ProviderCall, body: &[u8]) -> Result<ChatChunk, ProviderError> {
        if call.request.inbound.is_embeddings() {
            return parse_embeddings(call, body);
        }
        let wire: WireCompletion = crate::chat::from_json(body)
            .map_err(|e| protocol_error(call, format!("not a chat.completion: {e}")))?;
        if let Some(err) = wire.error {
            return Err(ProviderError::new(
                call.endpoint.provider.name.clone(),
                FailureKind::InBand,
                super::default_error_message(err.to_string().as_bytes()),
            ));
        }
        let completion = ChatCompletion {
            id: String::new(),
            object: "chat.completion".into(),
            created: 0,
            model: String::new(),
            provider: None,
            choices: wire.choices,
            usage: wire.usage,
            embeddings: None,
        };
        Ok(completion.into_chunk())
    }

    fn stream_decoder(&self, call: &ProviderCall) -> Box<dyn StreamDecoder> {
        Box::new(OpenAiDecoder {
            provider: call.endpoint.provider.name.clone(),
        })
    }
}

/// An embeddings request's input as OpenAI takes it: one string, one token-id array,
/// or a list of either.
#[derive(Serialize)]
#[serde(untagged)]
enum WireInput<'a> {
    Text(&'a str),
    Texts(Vec<&'a str>),
    Tokens(&'a [u32]),
    TokenLists(Vec<&'a [u32]>),
}

/// `POST {base_url}/embeddings`'s body.
#[derive(Serialize)]
struct WireEmbeddingsRequest<'a> {
    model: &'a str,
    input: WireInput<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
    encoding_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

/// Builds the exact JSON body of an embeddings request to an OpenAI-kind provider
/// (SPEC §7.3): `model` (the upstream name), `input`, `dimensions` when asked,
/// `encoding_format: "float"` (the gateway encodes base64 itself) and `user`.
pub fn embeddings_body(
    call: &ProviderCall,
    e: &EmbeddingsInput,
) -> Result<Vec<u8>, serde_json::Error> {
    let input = match e.inputs.as_slice() {
        [EmbeddingInput::Text(t)] => WireInput::Text(t),
        [EmbeddingInput::Tokens(ids)] => WireInput::Tokens(ids),
        inputs if matches!(inputs.first(), Some(EmbeddingInput::Tokens(_))) => {
            WireInput::TokenLists(
                inputs
                    .iter()
                    .filter_map(|i| match i {
                        EmbeddingInput::Tokens(ids) => Some(ids.as_slice()),
                        EmbeddingInput::Text(_) => None,
                    })
                    .collect(),
            )
        }
        inputs => WireInput::Texts(
            inputs
                .iter()
                .filter_map(|i| match i {
                    EmbeddingInput::Text(t) => Some(t.as_str()),
                    EmbeddingInput::Tokens(_) => None,
                })
                .collect(),
        ),
    };
    serde_json::to_vec(&WireEmbeddingsRequest {
        model: &call.endpoint.upstream_model,
        input,
        dimensions: e.dimensions,
        encoding_format: "float",
        user: call.request.user.as_deref(),
    })
}

/// An embeddings answer: `data[].embedding` by `index`, and `usage.prompt_tokens`.
#[derive(Deserialize)]
struct WireEmbeddings {
    #[serde(default)]
    data: Vec<WireEmbedding>,
    #[serde(default)]
    usage: Option<WireEmbeddingsUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireEmbedding {
    #[serde(default)]
    index: Option<u64>,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct WireEmbeddingsUsage {
    #[serde(default)]
    prompt_tokens: u64,
}

/// The vectors of an embeddings answer, put in input order by their `index` (each
/// index once, below the number of inputs), as one chunk with the upstream's usage.
fn parse_embeddings(call: &ProviderCall, body: &[u8]) -> Result<ChatChunk, ProviderError> {
    let wire: WireEmbeddings = serde_json::from_slice(body)
        .map_err(|e| protocol_error(call, format!("not an embeddings list: {e}")))?;
    if let Some(err) = wire.error {
        return Err(ProviderError::new(
            call.endpoint.provider.name.clone(),
            FailureKind::InBand,
            super::default_error_message(
                serde_json::json!({ "error": err }).to_string().as_bytes(),
            ),
        ));
    }
    let n = wire.data.len();
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; n];
    for (pos, item) in wire.data.into_iter().enumerate() {
        let index = item.index.unwrap_or(pos as u64);
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| vectors.get_mut(i))
            .ok_or_else(|| protocol_error(call, format!("embedding index {index} of {n}")))?;
        if slot.replace(item.embedding).is_some() {
            return Err(protocol_error(
                call,
                format!("embedding index {index} twice"),
            ));
        }
    }
    // Every slot is filled: n distinct indices below n.
    let vectors: Vec<Vec<f32>> = vectors.into_iter().flatten().collect();
    Ok(ChatChunk {
        embeddings: Some(std::sync::Arc::new(vectors)),
        usage: wire.usage.map(|u| Usage::new(u.prompt_tokens, 0)),
        ..ChatChunk::default()
    })
}

/// A lenient `chat.completion`: OpenAI-compatible servers omit various fields.
#[derive(Deserialize)]
struct WireCompletion {
    #[serde(default)]
    choices: Vec<crate::chat::Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

/// A stream chunk, reduced to the fields the gateway uses.
#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<crate::chat::ChunkChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

struct OpenAiDecoder {
    provider: std::sync::Arc<str>,
}

impl StreamDecoder for OpenAiDecoder {
    fn decode(&mut self, _event: &str, data: &str) -> Result<Decoded, ProviderError> {
        if data.trim() == "[DONE]" {
            return Ok(Decoded::Done);
        }
        // Only what the gateway keeps: the upstream's id, model and object are dropped
        // unread (the edge stamps its own).
        let Some(wire) = super::parse_event::<WireChunk>(&self.provider, data)? else {
            return Ok(Decoded::Skip);
        };
        if let Some(err) = wire.error {
            let message = super::default_error_message(
                serde_json::json!({ "error": err }).to_string().as_bytes(),
            );
            return Err(ProviderError::new(
                self.provider.clone(),
                FailureKind::InBand,
                message,
            ));
        }
        Ok(Decoded::Chunk(ChatChunk {
            choices: wire.choices,
            usage: wire.usage,
            ..ChatChunk::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::chat::ChatRequest;
    use crate::config::Config;
    use crate::context::CallContext;
    use serde_json::json;

    fn call(req: Value) -> ProviderCall {
        call_at(req, "http://127.0.0.1:9/v1")
    }

    fn call_at(req: Value, base_url: &str) -> ProviderCall {
        let config = Config::from_toml(&format!(
            r#"
[[providers]]
name = "oa"
kind = "openai"
base_url = "{base_url}"
api_key = "sk-upstream"
[[models]]
id = "openai/gpt-4o-mini"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "oa"
  upstream_model = "gpt-4o-mini"
  prompt_usd_per_mtok = 0.15
  completion_usd_per_mtok = 0.6
"#
        ))
        .unwrap();
        let catalog = Catalog::from_config(&config);
        ProviderCall {
            endpoint: catalog.endpoints()[0].clone(),
            request: std::sync::Arc::new(serde_json::from_value::<ChatRequest>(req).unwrap()),
            ctx: CallContext::new(),
        }
    }

    #[test]
    fn an_assistant_turns_reasoning_details_go_only_to_openrouter() {
        let req = json!({"model": "openai/gpt-4o-mini", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "reasoning": "greet back",
             "reasoning_details": [{"type": "reasoning.text", "text": "greet back", "index": 0}],
             "x_custom": 1},
            {"role": "user", "content": "again"}
        ]});
        let sent = |base_url: &str| -> Value {
            let body = wire_body(&call_at(req.clone(), base_url), false).unwrap();
            serde_json::from_slice::<Value>(&body).unwrap()["messages"].clone()
        };
        let mut want = req["messages"].clone();
        // OpenRouter knows the field; anyone else gets the turn without it, and the
        // rest as the client wrote it.
        assert_eq!(sent("https://openrouter.ai/api/v1"), want);
        want[1].as_object_mut().unwrap().remove("reasoning_details");
        assert_eq!(sent("http://127.0.0.1:9/v1"), want);
    }

    #[test]
    fn openrouter_reasoning_becomes_reasoning_effort_and_is_not_sent() {
        let effort = |extra: Value| {
            let mut r = json!({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
            r.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let body: Value = serde_json::from_slice(&wire_body(&call(r), false).unwrap()).unwrap();
            assert!(body.get("reasoning").is_none(), "{body}");
            body.get("reasoning_effort").cloned()
        };
        assert_eq!(
            effort(json!({"reasoning": {"effort": "high"}})),
            Some(json!("high"))
        );
        // Budgets by buckets.
        for (budget, want) in [
            (1, "low"),
            (4095, "low"),
            (4096, "medium"),
            (16383, "medium"),
            (16384, "high"),
        ] {
            assert_eq!(
                effort(json!({"reasoning": {"max_tokens": budget}})),
                Some(json!(want)),
                "{budget}"
            );
        }
        assert_eq!(
            effort(json!({"reasoning": {"enabled": true}})),
            Some(json!("medium"))
        );
        // `reasoning` wins; `enabled: false` sends none; `reasoning_effort` alone still works.
        assert_eq!(
            effort(json!({"reasoning": {"effort": "low"}, "reasoning_effort": "high"})),
            Some(json!("low"))
        );
        assert_eq!(
            effort(json!({"reasoning": {"enabled": false}, "reasoning_effort": "high"})),
            None
        );
        assert_eq!(
            effort(json!({"reasoning_effort": "minimal"})),
            Some(json!("minimal"))
        );
        assert_eq!(
            effort(json!({"reasoning": {"exclude": true}, "reasoning_effort": "low"})),
            Some(json!("low"))
        );
        assert_eq!(effort(json!({"reasoning": {"exclude": true}})), None);
    }

    #[test]
    fn body_passes_through_unknown_fields_and_drops_openrouter_ones() {
        let c = call(json!({
            "model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "logit_bias": {"1": 2}, "models": ["x"], "provider": {"sort": "price"},
            "usage": {"include": true}, "stream": true
        }));
        let body: Value = serde_json::from_slice(&wire_body(&c, true).unwrap()).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 100,
                "stream": true,
                "stream_options": {"include_usage": true},
                "logit_bias": {"1": 2}
            })
        );
    }

    #[test]
    fn request_carries_the_provider_key() {
        let c = call(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        let req = OpenAiAdapter.build_request(&c, false).unwrap();
        assert_eq!(req.uri(), "http://127.0.0.1:9/v1/chat/completions");
        assert_eq!(req.headers()["authorization"], "Bearer sk-upstream");
    }

    #[test]
    fn in_band_stream_errors_fail_the_attempt() {
        let mut d = OpenAiDecoder {
            provider: "oa".into(),
        };
        let err = d
            .decode(
                "",
                r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
            )
            .unwrap_err();
        assert_eq!(err.kind, FailureKind::InBand);
        assert_eq!(err.message, "overloaded");
        assert!(matches!(d.decode("", "[DONE]").unwrap(), Decoded::Done));
    }

    /// An embeddings call of `inputs` texts, `dimensions` asked or not.
    fn embeddings_call(inputs: usize, dimensions: Option<u32>) -> ProviderCall {
        let mut c = call(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}));
        let mut req = ChatRequest::clone(&c.request);
        req.messages.clear();
        req.inbound.dialect = crate::chat::Dialect::Embeddings;
        req.inbound.embeddings = Some(std::sync::Arc::new(EmbeddingsInput {
            inputs: vec![EmbeddingInput::Text("a".into()); inputs],
            dimensions,
            base64: false,
        }));
        c.request = std::sync::Arc::new(req);
        c
    }

    #[test]
    fn embeddings_answers_are_read_by_index_and_bounded() {
        let c = embeddings_call(2, None);
        let req = OpenAiAdapter.build_request(&c, true).unwrap();
        assert_eq!(req.uri(), "http://127.0.0.1:9/v1/embeddings");
        let body: Value = serde_json::from_slice(req.body()).unwrap();
        assert_eq!(
            body,
            json!({"model": "gpt-4o-mini", "input": ["a", "a"], "encoding_format": "float"})
        );

        let answer = |data: Value| {
            let body = json!({"data": data, "usage": {"prompt_tokens": 2}}).to_string();
            OpenAiAdapter.parse_response(&c, body.as_bytes())
        };
        let chunk = answer(json!([
            {"index": 1, "embedding": [2.0, 2.5]},
            {"index": 0, "embedding": [1.0, 1.5]}
        ]))
        .unwrap();
        assert_eq!(
            chunk.embeddings.as_deref().unwrap(),
            &vec![vec![1.0, 1.5], vec![2.0, 2.5]]
        );
        assert_eq!(chunk.usage.as_ref().unwrap().prompt_tokens, 2);
        assert!(crate::providers::limits::check_embeddings(&chunk, &c).is_ok());

        for bad in [
            json!([{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]),
            json!([{"index": 5, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]),
            json!([{"index": 18446744073709551615u64, "embedding": [1.0]}]),
        ] {
            let err = answer(bad.clone()).expect_err(&bad.to_string());
            assert_eq!(err.kind, FailureKind::Protocol, "{bad}");
        }
        // What parses but is not an answer to this request is refused by the limits.
        for (bad, dims) in [
            (json!([{"index": 0, "embedding": [1.0]}]), None),
            (
                json!([{"embedding": [1.0, 2.0]}, {"embedding": [1.0]}]),
                None,
            ),
            (json!([{"embedding": []}, {"embedding": []}]), None),
            (json!([{"embedding": [1e39]}, {"embedding": [1.0]}]), None),
            (json!([{"embedding": [1.0]}, {"embedding": [1.0]}]), Some(2)),
        ] {
            let c = embeddings_call(2, dims);
            let body = json!({ "data": bad }).to_string();
            let chunk = OpenAiAdapter.parse_response(&c, body.as_bytes()).unwrap();
            assert!(
                crate::providers::limits::check_embeddings(&chunk, &c).is_err(),
                "{bad}"
            );
        }
    }
}
