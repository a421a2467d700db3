//! The internal schema: OpenAI chat-completions types shared by every layer.
//!
//! Clients speak the OpenAI wire format (plus OpenRouter's extensions), so the
//! internal schema *is* that format, typed. Provider adapters translate from and to
//! it; everything between the HTTP edge and the adapters works on these types only.
//!
//! Fields the schema does not model are kept in `extra` maps and passed through to
//! OpenAI-kind providers (SPEC §3.1), so a new OpenAI parameter works on day one.
//!
//! Replies flow as a stream of [`ChatChunk`]s, whatever the upstream did: a non-stream
//! upstream answer is one complete chunk, and [`Aggregator`] folds chunks back into a
//! [`ChatCompletion`] for non-stream clients. That gives every layer one code path.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod answer;
mod de;
mod inbound;
mod ser;

pub use answer::{
    Aggregator, AnthropicRaw, ChatChunk, ChatCompletion, Choice, ChunkChoice,
    CompletionTokensDetails, CostDetails, Delta, FinishReason, FunctionCallDelta, NativeStop,
    PromptTokensDetails, RawJson, ReasoningDetails, ResponseMessage, ToolCallDelta, Usage,
};

pub use inbound::{
    AnthropicInbound, Dialect, EmbeddingInput, EmbeddingsInput, Inbound, Reasoning,
    ResponsesInbound,
};

/// A chat-completions request as a client sends it (`Deserialize` is in `de.rs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatRequest {
    /// Gateway model id, possibly with a `:floor` / `:nitro` variant suffix.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// OpenRouter: fallback models tried in order after `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// OpenRouter: provider routing preferences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderPreferences>,
    /// Upper bound of completion tokens (legacy name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Upper bound of completion tokens (current name; wins over `max_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// How many choices to generate (1–[`MAX_CHOICES`]; default 1). Admission reserves
    /// the completion bound once per choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// `"none" | "auto" | "required" | {"type":"function","function":{"name"}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// `{"type":"text"|"json_object"|"json_schema", ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// Sampling seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// End-user id for abuse tracking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Whether the client wants an SSE stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// `{"include_usage": bool}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// `"minimal" | "low" | "medium" | "high"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    /// OpenRouter: `{"include": true}` asks for usage in the last stream chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOptions>,
    /// OpenRouter: `{"effort", "max_tokens", "exclude", "enabled"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<Reasoning>,
    /// The inbound API and what it brought beyond this schema; never on the wire.
    #[serde(skip)]
    pub inbound: Inbound,
    /// Every field the schema does not model, kept for OpenAI-kind providers.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The effort `reasoning: {"enabled": true}` and the `:thinking` variant ask for when
/// the request names none.
pub const DEFAULT_REASONING_EFFORT: &str = "medium";

/// What a request asks of the model's reasoning ([`ChatRequest::reasoning_wanted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningWanted<'a> {
    /// No reasoning (`reasoning.enabled: false`, `reasoning.max_tokens: 0`).
    Off,
    /// An effort as the client wrote it (`"minimal"`, `"low"`, `"medium"`, `"high"`,
    /// `"none"`…), mapped by each adapter.
    Effort(&'a str),
    /// A thinking budget in tokens (`reasoning.max_tokens`).
    Budget(u32),
}

/// The largest `n` (choices per request) accepted, as OpenAI's API.
pub const MAX_CHOICES: u32 = 128;

impl ChatRequest {
    /// The completion-token bound the client asked for, if any.
    pub fn max_output_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// How many choices the client asked for (`n`, default 1).
    pub fn choices(&self) -> u32 {
        self.n.unwrap_or(1)
    }

    /// What the request asks of the model's reasoning, the one reading every adapter
    /// maps (docs/providers.md, "Reasoning"); `None` when it says nothing (the model's
    /// default).
    ///
    /// OpenRouter's `reasoning` object wins over `reasoning_effort`: `enabled: false`
    /// (or `max_tokens: 0`) is [`ReasoningWanted::Off`]; else `max_tokens` is a
    /// [budget](ReasoningWanted::Budget); else `effort`; else `enabled: true` is
    /// `reasoning_effort` when given, [`DEFAULT_REASONING_EFFORT`] otherwise. A
    /// `reasoning` object with none of these (only `exclude`) leaves
    /// `reasoning_effort` in charge.
    pub fn reasoning_wanted(&self) -> Option<ReasoningWanted<'_>> {
        if let Some(r) = &self.reasoning {
            if r.enabled == Some(false) || r.max_tokens == Some(0) {
                return Some(ReasoningWanted::Off);
            }
            if let Some(n) = r.max_tokens {
                return Some(ReasoningWanted::Budget(n));
            }
            if let Some(e) = r.effort.as_deref() {
                return Some(ReasoningWanted::Effort(e));
            }
            if r.enabled == Some(true) {
                return Some(ReasoningWanted::Effort(
                    self.reasoning_effort
                        .as_deref()
                        .unwrap_or(DEFAULT_REASONING_EFFORT),
                ));
            }
        }
        self.reasoning_effort
            .as_deref()
            .map(ReasoningWanted::Effort)
    }

    /// Whether the client asked for the reasoning text to be withheld
    /// (`reasoning.exclude`): the model still reasons, and its reasoning tokens are
    /// counted and charged, but the HTTP edge drops `delta.reasoning` before writing.
    pub fn hides_reasoning(&self) -> bool {
        self.reasoning.as_ref().is_some_and(|r| r.exclude)
    }

    /// Whether the client wants `usage` in the final stream chunk.
    pub fn wants_stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
            || self.usage.as_ref().is_some_and(|u| u.include)
    }

    /// Checks what serde cannot: the rules of SPEC §3.2 for 400 `invalid_request`.
    pub fn validate(&self) -> Result<(), String> {
        if self.model.trim().is_empty() {
            return Err("`model` must be a non-empty string".into());
        }
        if self.messages.is_empty() {
            return Err("`messages` must contain at least one message".into());
        }
        for (i, m) in self.messages.iter().enumerate() {
            match m.role {
                Role::Tool if m.tool_call_id.is_none() => {
                    return Err(format!(
                        "messages[{i}]: a `tool` message needs `tool_call_id`"
                    ));
                }
                Role::User | Role::System | Role::Developer | Role::Tool if m.content.is_none() => {
                    return Err(format!("messages[{i}]: `content` is required"));
                }
                Role::Assistant if m.content.is_none() && m.tool_calls.is_none() => {
                    return Err(format!(
                        "messages[{i}]: an `assistant` message needs `content` or `tool_calls`"
                    ));
                }
                _ => {}
            }
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(format!("`temperature` must be between 0 and 2, got {t}"));
            }
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("`top_p` must be between 0 and 1, got {p}"));
            }
        }
        if self.max_output_tokens() == Some(0) {
            return Err("`max_tokens` must be at least 1".into());
        }
        if let Some(n) = self.n {
            if !(1..=MAX_CHOICES).contains(&n) {
                return Err(format!("`n` must be between 1 and {MAX_CHOICES}, got {n}"));
            }
        }
        if let Some(choice) = &self.tool_choice {
            check_tool_choice(choice)?;
        }
        if let Some(format) = &self.response_format {
            check_response_format(format)?;
        }
        Ok(())
    }
}

/// What kind of JSON value `v` is, for error messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, or an object with a string
/// `type` (`{"type":"function","function":{"name"}}`, and OpenAI's newer
/// `allowed_tools` / `custom` forms, passed through).
fn check_tool_choice(choice: &Value) -> Result<(), String> {
    const WANT: &str = r#"`tool_choice` must be "none", "auto", "required" or an object like {"type":"function","function":{"name":"..."}}"#;
    match choice {
        Value::String(s) if matches!(s.as_str(), "none" | "auto" | "required") => Ok(()),
        Value::String(s) => Err(format!("{WANT}; got the string {s:?}")),
        Value::Object(o) => match o.get("type") {
            Some(Value::String(t)) if t == "function" => {
                match o.get("function").and_then(|f| f.get("name")) {
                    Some(Value::String(_)) => Ok(()),
                    _ => Err(format!(
                        "{WANT}; `tool_choice.function.name` must be a string"
                    )),
                }
            }
            Some(Value::String(_)) => Ok(()),
            _ => Err(format!("{WANT}; `tool_choice.type` must be a string")),
        },
        other => Err(format!("{WANT}; got {}", json_kind(other))),
    }
}

/// `response_format`: an object with a string `type` (`"text"`, `"json_object"`,
/// `"json_schema"` with a `json_schema` object, …).
fn check_response_format(format: &Value) -> Result<(), String> {
    const WANT: &str = r#"`response_format` must be an object like {"type":"json_object"}"#;
    let Value::Object(o) = format else {
        return Err(format!("{WANT}; got {}", json_kind(format)));
    };
    match o.get("type") {
        Some(Value::String(t)) if t == "json_schema" => match o.get("json_schema") {
            Some(Value::Object(_)) => Ok(()),
            _ => Err(
                "`response_format.json_schema` must be an object when `type` is \"json_schema\""
                    .into(),
            ),
        },
        Some(Value::String(_)) => Ok(()),
        _ => Err(format!("{WANT}; `response_format.type` must be a string")),
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System prompt.
    System,
    /// OpenAI's newer name for a system prompt.
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// A tool result.
    Tool,
}

impl Role {
    /// The name on the wire (`"system"`, `"assistant"`, …), as serde writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One conversation turn (`Deserialize` is in `de.rs`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// Author.
    pub role: Role,
    /// Text or content parts; absent on assistant turns that only call tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    /// Optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls made by an assistant turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Unmodelled fields, passed through to OpenAI-kind providers.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Message {
    /// A message with plain text content.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: Some(Content::Text(text.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            extra: Map::new(),
        }
    }
}

/// Message content: a string, or an array of typed parts (`Deserialize` is in `de.rs`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text, images and other parts.
    Parts(Vec<ContentPart>),
}

impl Content {
    /// All text of the content, parts joined without separator.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Content::Text(s) => std::borrow::Cow::Borrowed(s),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    ContentPart::Text { text, .. } => Some(text.as_str()),
                    _ => None,
                })
                .collect::<String>()
                .into(),
        }
    }
}

/// One part of an array content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// A text part (may carry Anthropic's `cache_control`).
    Text {
        /// The text.
        text: String,
        /// Anything else on the part, e.g. `cache_control`.
        #[serde(flatten)]
        extra: Map<String, Value>,
    },
    /// An image by URL or `data:` URL.
    ImageUrl {
        /// `{"url", "detail"}`.
        image_url: ImageUrl,
        /// Anything else on the part, e.g. `cache_control`.
        #[serde(flatten)]
        extra: Map<String, Value>,
    },
    /// Audio input (passed through to OpenAI-kind providers only).
    InputAudio {
        /// `{"data", "format"}`.
        input_audio: Value,
    },
    /// A file (passed through to OpenAI-kind providers only).
    File {
        /// `{"file_data" | "file_id", "filename"}`.
        file: Value,
    },
}

/// An image reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageUrl {
    /// `https://…` or `data:image/png;base64,…`.
    pub url: String,
    /// `"auto" | "low" | "high"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `stop`: one sequence or several (`Deserialize` is in `de.rs`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop sequence.
    One(String),
    /// Several stop sequences.
    Many(Vec<String>),
}

impl Stop {
    /// The sequences as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// Always `"function"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function's declaration.
    pub function: FunctionDef,
}

/// A function declaration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDef {
    /// Function name.
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON schema of the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Unmodelled fields (e.g. `strict`).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A complete tool call in an assistant message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Call id, echoed by the `tool` message that answers it.
    pub id: String,
    /// Always `"function"`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// Name and JSON-encoded arguments.
    pub function: FunctionCall,
}

pub(crate) fn function_type() -> String {
    "function".into()
}

/// A function name with its JSON-encoded arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments as a JSON string.
    pub arguments: String,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send `usage` in a last chunk.
    #[serde(default)]
    pub include_usage: bool,
}

/// OpenRouter's `usage` request option.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageOptions {
    /// Send `usage` (with `cost`) in the last chunk.
    #[serde(default)]
    pub include: bool,
}

/// OpenRouter's `provider` routing preferences (SPEC §3.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderPreferences {
    /// Providers to try first, in this order.
    #[serde(default)]
    pub order: Option<Vec<String>>,
    /// Only these providers.
    #[serde(default)]
    pub only: Option<Vec<String>>,
    /// Never these providers.
    #[serde(default)]
    pub ignore: Option<Vec<String>>,
    /// Whether providers outside `order` may serve (default true).
    #[serde(default = "yes")]
    pub allow_fallbacks: bool,
    /// `"price" | "throughput" | "latency"`.
    #[serde(default)]
    pub sort: Option<SortBy>,
    /// Price ceilings in USD per million tokens.
    #[serde(default, deserialize_with = "de::object_or_null")]
    pub max_price: Option<MaxPrice>,
    /// `"deny"` keeps prompts away from providers that may train on them.
    #[serde(default)]
    pub data_collection: Option<DataCollection>,
    /// Only providers that support every parameter of the request.
    #[serde(default)]
    pub require_parameters: bool,
}

impl Default for ProviderPreferences {
    fn default() -> Self {
        ProviderPreferences {
            order: None,
            only: None,
            ignore: None,
            allow_fallbacks: true,
            sort: None,
            max_price: None,
            data_collection: None,
            require_parameters: false,
        }
    }
}

fn yes() -> bool {
    true
}

/// How to sort endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortBy {
    /// Cheapest first.
    Price,
    /// Highest observed tokens/s first.
    Throughput,
    /// Lowest observed time to first token first.
    Latency,
}

/// Price ceilings, USD per million tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaxPrice {
    /// Prompt ceiling.
    #[serde(default)]
    pub prompt: Option<f64>,
    /// Completion ceiling.
    #[serde(default)]
    pub completion: Option<f64>,
}

/// Whether a provider may train on prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataCollection {
    /// The provider may keep and train on prompts.
    Allow,
    /// The provider must not.
    Deny,
}

/// Deserializes a JSON body. The UTF-8 of the whole body is checked once, in one
/// pass, instead of string by string as serde_json's slice reader does (≈ 2k
/// instructions a chat request and its upstream answer, callgrind). Bodies that are
/// not UTF-8 go through the slice reader, for its error.
pub(crate) fn from_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dropping_reasoning_keeps_everything_else() {
        let mut c = ChatChunk::delta(Delta {
            reasoning: Some("hmm".into()),
            ..Delta::default()
        });
        c.drop_reasoning();
        assert!(c.choices.is_empty(), "a reasoning-only choice goes");
        // So does a signature-only one (the end of Anthropic's thinking).
        let mut c = ChatChunk::delta(Delta {
            signature: Some("EqQB".into()),
            ..Delta::default()
        });
        c.drop_reasoning();
        assert!(c.choices.is_empty(), "a signature-only choice goes");
        let mut c = ChatChunk::delta(Delta {
            content: Some("Paris".into()),
            reasoning: Some("hmm".into()),
            ..Delta::default()
        });
        c.choices[0].finish_reason = Some("stop".into());
        c.drop_reasoning();
        assert_eq!(c.choices[0].delta.content.as_deref(), Some("Paris"));
        assert_eq!(c.choices[0].delta.reasoning, None);
        // An empty choice that never carried reasoning stays.
        let mut c = ChatChunk::delta(Delta::default());
        c.drop_reasoning();
        assert_eq!(c.choices.len(), 1);
    }

    /// An index from a chunk was an allocation size (`resize_with(index + 1)`): an
    /// upstream's `choices[].index` of 4294967295 aborted the process.
    #[test]
    fn aggregator_indices_are_not_allocation_sizes() {
        let mut agg = Aggregator::default();
        let mut chunk = ChatChunk::text("far");
        chunk.choices[0].index = 1_000_000;
        chunk.choices[0].delta.tool_calls = Some(vec![ToolCallDelta {
            index: 3_000_000,
            id: Some("call_1".into()),
            ..ToolCallDelta::default()
        }]);
        agg.push(chunk);
        let mut first = ChatChunk::text("near");
        first.choices[0].finish_reason = Some("stop".into());
        agg.push(first);
        let done = agg.finish();
        assert_eq!(done.choices.len(), 2);
        assert_eq!(done.choices[0].index, 0);
        assert_eq!(done.choices[0].message.content.as_deref(), Some("near"));
        assert_eq!(done.choices[1].index, 1_000_000);
        let calls = done.choices[1].message.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].id, "call_1");
    }

    #[test]
    fn usage_totals_saturate() {
        assert_eq!(Usage::new(u64::MAX, 5).total_tokens, u64::MAX);
    }

    #[test]
    fn unknown_fields_are_kept_for_pass_through() {
        let req: ChatRequest = serde_json::from_value(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi", "x_msg": 1}],
            "logit_bias": {"50256": -100}, "parallel_tool_calls": false
        }))
        .unwrap();
        assert_eq!(req.extra["logit_bias"], json!({"50256": -100}));
        assert_eq!(req.messages[0].extra["x_msg"], json!(1));
        let back = serde_json::to_value(&req).unwrap();
        assert_eq!(back["parallel_tool_calls"], json!(false));
    }

    /// Every modelled field and some unmodelled ones, at both levels.
    fn full_request() -> Value {
        json!({
            "model": "openai/gpt-4o", "models": ["a/b"],
            "messages": [
                {"role": "system", "content": "be brief", "name": "sys", "x_msg": {"k": [1, 2]}},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "42"}]}
            ],
            "provider": {"order": ["p"], "allow_fallbacks": false},
            "max_tokens": 10, "max_completion_tokens": 20, "temperature": 0.5, "top_p": 0.9,
            "stop": ["x", "y"], "tools": [{"type": "function", "function": {"name": "f", "strict": true}}],
            "tool_choice": "auto", "response_format": {"type": "json_object"}, "seed": -3,
            "user": "u", "stream": true, "stream_options": {"include_usage": true},
            "reasoning_effort": "low", "usage": {"include": true},
            "logit_bias": {"50256": -100}, "parallel_tool_calls": false
        })
    }

    #[test]
    fn a_request_with_every_field_reads_back_as_written() {
        let written = full_request();
        let req: ChatRequest = serde_json::from_str(&written.to_string()).unwrap();
        assert_eq!(req.stop, Some(Stop::Many(vec!["x".into(), "y".into()])));
        assert_eq!(req.seed, Some(-3));
        assert!(req.stream && req.wants_stream_usage());
        assert_eq!(req.messages[1].content, None);
        assert_eq!(req.messages[0].extra["x_msg"], json!({"k": [1, 2]}));
        let provider = req.provider.as_ref().unwrap();
        assert_eq!(provider.order.as_deref(), Some(&["p".to_string()][..]));
        assert!(!provider.allow_fallbacks);
        let mut expected = written;
        // `null` is "absent": it is not written back; `provider` writes its defaults.
        expected["messages"][1]
            .as_object_mut()
            .unwrap()
            .remove("content");
        expected["provider"] = serde_json::to_value(provider).unwrap();
        assert_eq!(serde_json::to_value(&req).unwrap(), expected);
        let one: ChatRequest = serde_json::from_value(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": "s",
            "temperature": null, "stream": false
        }))
        .unwrap();
        assert_eq!(one.stop, Some(Stop::One("s".into())));
        assert_eq!(one.temperature, None);
    }

    #[test]
    fn a_known_field_twice_or_a_required_one_missing_is_an_error() {
        let err = |body: &str| {
            serde_json::from_str::<ChatRequest>(body)
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(r#"{"model":"a","model":"b","messages":[]}"#).contains("duplicate field `model`")
        );
        assert!(
            err(r#"{"model":"a","messages":[{"role":"user","content":"x","content":"y"}]}"#)
                .contains("duplicate field `content`")
        );
        assert!(err(r#"{"messages":[]}"#).contains("missing field `model`"));
        assert!(err(r#"{"model":"a"}"#).contains("missing field `messages`"));
        assert!(
            err(r#"{"model":"a","messages":[{"content":"x"}]}"#).contains("missing field `role`")
        );
        assert!(err(r#"{"model":"a","messages":[],"stream":null}"#).contains("expected a boolean"));
        assert!(err(r#"["a"]"#).contains("expected a chat request object"));
        // An unmodelled field given twice keeps its last value, as a JSON object does.
        let req: ChatRequest =
            serde_json::from_str(r#"{"model":"a","messages":[],"x":1,"x":2}"#).unwrap();
        assert_eq!(req.extra["x"], json!(2));
    }

    #[test]
    fn content_and_stop_of_the_wrong_type_say_what_they_expect() {
        let err = |body: &str| match crate::normalize::parse_request(body.as_bytes()) {
            Err(crate::error::GatewayError::InvalidRequest(m)) => m,
            other => panic!("expected invalid_request, got {other:?}"),
        };
        let m = err(r#"{"model":"a","messages":[{"role":"user","content":5}]}"#);
        assert!(m.contains("`messages[0].content`"), "{m}");
        assert!(m.contains("a string or an array of content parts"), "{m}");
        let m = err(r#"{"model":"a","messages":[{"role":"user","content":"x"}],"stop":{"a":1}}"#);
        assert!(
            m.contains("`stop`") && m.contains("a string or an array of strings"),
            "{m}"
        );
        let m = err(r#"{"model":"a","messages":[{"role":"user","content":[{"type":"text"}]}]}"#);
        assert!(
            m.contains("`messages[0].content[0]`") && m.contains("text"),
            "{m}"
        );
    }

    #[test]
    fn content_parts_parse() {
        let m: Message = serde_json::from_value(json!({"role": "user", "content": [
            {"type": "text", "text": "what is this", "cache_control": {"type": "ephemeral"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        ]}))
        .unwrap();
        let Some(Content::Parts(parts)) = &m.content else {
            panic!("parts expected")
        };
        assert!(
            matches!(&parts[0], ContentPart::Text { extra, .. } if extra.contains_key("cache_control"))
        );
        assert!(
            matches!(&parts[1], ContentPart::ImageUrl { image_url, .. } if image_url.url.starts_with("data:"))
        );
    }

    #[test]
    fn validate_rejects_empty_messages_and_orphan_tool_messages() {
        let mut req = ChatRequest {
            model: "m".into(),
            ..ChatRequest::default()
        };
        assert!(req.validate().unwrap_err().contains("messages"));
        req.messages.push(Message::text(Role::Tool, "42"));
        assert!(req.validate().unwrap_err().contains("tool_call_id"));
    }

    #[test]
    fn aggregator_joins_text_and_tool_call_fragments() {
        let mut agg = Aggregator::default();
        agg.push(ChatChunk::text("Hel"));
        agg.push(ChatChunk::text("lo"));
        agg.push(ChatChunk::delta(Delta {
            tool_calls: Some(vec![ToolCallDelta {
                index: 0,
                id: Some("call_1".into()),
                kind: Some("function".into()),
                function: Some(FunctionCallDelta {
                    name: Some("f".into()),
                    arguments: Some("{\"a\":".into()),
                }),
            }]),
            ..Delta::default()
        }));
        agg.push(ChatChunk::delta(Delta {
            tool_calls: Some(vec![ToolCallDelta {
                index: 0,
                function: Some(FunctionCallDelta {
                    name: None,
                    arguments: Some("1}".into()),
                }),
                ..ToolCallDelta::default()
            }]),
            ..Delta::default()
        }));
        let done = agg.finish();
        assert_eq!(done.choices[0].message.content.as_deref(), Some("Hello"));
        let calls = done.choices[0].message.tool_calls.as_ref().unwrap();
        assert_eq!(calls[0].id, "call_1");
        assert_eq!(calls[0].function.arguments, "{\"a\":1}");
    }

    #[test]
    fn role_only_chunks_are_not_content() {
        let c = ChatChunk::delta(Delta {
            role: Some(Role::Assistant),
            ..Delta::default()
        });
        assert!(!c.is_content());
        assert!(ChatChunk::text("x").is_content());
    }
}
