//! The reply types: [`ChatChunk`]s as every reply flows, [`Usage`] with its price,
//! [`ChatCompletion`] for non-stream clients, and [`Aggregator`], which folds the one
//! into the other. What an upstream sent that chat cannot carry rides beside it,
//! internal and never written in chat output ([`AnthropicRaw`], [`NativeStop`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{function_type, FunctionCall, Role, ToolCall};
use crate::money::Money;

/// Token usage, with the gateway's price of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Completion tokens, reasoning included.
    #[serde(default)]
    pub completion_tokens: u64,
    /// `prompt_tokens + completion_tokens`.
    #[serde(default)]
    pub total_tokens: u64,
    /// What the gateway charged for this request, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Money>,
    /// `{"cached_tokens"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// `{"reasoning_tokens"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
    /// How `cost` splits by kind of token, in USD; set where the cost is priced
    /// ([`crate::metering`]), never read from an upstream.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub cost_details: Option<CostDetails>,
}

/// `usage.cost_details`: the charge by kind of token, in USD; the four add up to
/// `cost` exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CostDetails {
    /// Prompt tokens read neither from nor into the provider's cache.
    pub prompt: Money,
    /// Prompt tokens read from the provider's cache (`cached_tokens`).
    pub cached_prompt: Money,
    /// Prompt tokens written to the provider's cache (`cache_write_tokens`).
    pub cache_write: Money,
    /// Completion tokens, reasoning included.
    pub completion: Money,
}

impl Usage {
    /// Usage with prompt and completion counts and the total filled in.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            // Saturating: the counts come from upstreams, and a sum past u64 must not
            // panic (the adapters refuse such usage as a broken answer first).
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            ..Usage::default()
        }
    }

    /// Cache-read tokens (part of `prompt_tokens`).
    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details
            .as_ref()
            .map_or(0, |d| d.cached_tokens)
    }

    /// Cache-write tokens (part of `prompt_tokens`).
    pub fn cache_write_tokens(&self) -> u64 {
        self.prompt_tokens_details
            .as_ref()
            .map_or(0, |d| d.cache_write_tokens)
    }

    /// Reasoning tokens (part of `completion_tokens`).
    pub fn reasoning_tokens(&self) -> u64 {
        self.completion_tokens_details
            .as_ref()
            .map_or(0, |d| d.reasoning_tokens)
    }
}

/// Breakdown of prompt tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Tokens read from the provider's prompt cache.
    #[serde(default)]
    pub cached_tokens: u64,
    /// Tokens written to the provider's prompt cache (Anthropic).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_tokens: u64,
}

/// Breakdown of completion tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionTokensDetails {
    /// Tokens spent on hidden reasoning.
    #[serde(default)]
    pub reasoning_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Why generation stopped.
pub type FinishReason = String;

/// One `chat.completion.chunk`: the unit every layer passes along.
///
/// Adapters fill `choices` and `usage`; the HTTP edge stamps `id`, `model`,
/// `provider` and `created` as it writes each chunk out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatChunk {
    /// The gateway's request id.
    #[serde(default)]
    pub id: String,
    /// Always `"chat.completion.chunk"`.
    #[serde(default = "chunk_object")]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// Gateway model id that served.
    #[serde(default)]
    pub model: String,
    /// Provider that served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Deltas, one per choice.
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    /// Usage; on the last chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// An embeddings answer (SPEC §7.3): one vector per input, in order; the chunk
    /// is the whole answer. Never on a chat stream's wire.
    #[serde(skip)]
    pub embeddings: Option<std::sync::Arc<Vec<Vec<f32>>>>,
    /// An error after the stream started (SPEC §3.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

fn chunk_object() -> String {
    "chat.completion.chunk".into()
}

impl ChatChunk {
    /// A chunk with one choice carrying `delta`.
    pub fn delta(delta: Delta) -> Self {
        ChatChunk {
            object: chunk_object(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: None,
            }],
            ..ChatChunk::default()
        }
    }

    /// A chunk with one choice whose delta is `text`.
    pub fn text(text: impl Into<String>) -> Self {
        ChatChunk::delta(Delta {
            content: Some(text.into()),
            ..Delta::default()
        })
    }

    /// A usage-only chunk (`choices: []`), as OpenAI sends last.
    pub fn usage(usage: Usage) -> Self {
        ChatChunk {
            object: chunk_object(),
            usage: Some(usage),
            ..ChatChunk::default()
        }
    }

    /// Whether this chunk carries content or a tool call: the commit point of SPEC §3.1.
    /// Role-only chunks and empty deltas are not content; an embeddings answer is.
    pub fn is_content(&self) -> bool {
        self.embeddings.is_some()
            || self.choices.iter().any(|c| {
                c.delta.content.as_deref().is_some_and(|s| !s.is_empty())
                    || c.delta.reasoning.as_deref().is_some_and(|s| !s.is_empty())
                    || c.delta.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
            })
    }

    /// The first `finish_reason` in the chunk.
    pub fn finish_reason(&self) -> Option<&str> {
        self.choices.iter().find_map(|c| c.finish_reason.as_deref())
    }

    /// Drops the reasoning text and its signature from every choice
    /// (`reasoning.exclude`), and the choices that carried nothing else, so a
    /// reasoning-only chunk writes nothing.
    pub fn drop_reasoning(&mut self) {
        self.choices.retain_mut(|c| {
            let text = c.delta.reasoning.take().is_some();
            let signature = c.delta.signature.take().is_some();
            if !text && !signature {
                return true;
            }
            let d = &c.delta;
            d.role.is_some()
                || d.content.is_some()
                || d.tool_calls.is_some()
                || c.finish_reason.is_some()
        });
    }
}

/// One choice of a chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Choice index.
    #[serde(default)]
    pub index: u32,
    /// What this chunk adds.
    #[serde(default)]
    pub delta: Delta,
    /// Set on the choice's last chunk.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
}

/// The increment of a chunk. Written with OpenRouter's `reasoning_details` beside
/// `reasoning` when there is reasoning or a signature ([`ReasoningDetails`]).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Delta {
    /// `"assistant"` on the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Visible reasoning text (OpenRouter's `reasoning`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// Tool-call fragments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    /// A piece of the signature of the reasoning so far (Anthropic's
    /// `signature_delta`): for `/v1/messages` clients, and in chat output only inside
    /// `reasoning_details`.
    #[serde(skip)]
    pub signature: Option<String>,
    /// An anthropic-kind upstream's own text of what this chunk holds, for
    /// `/v1/messages` clients: internal, never written in chat output.
    #[serde(skip)]
    pub anthropic: Option<AnthropicRaw>,
    /// Why an anthropic-kind upstream stopped, in its own words (on the chunk that
    /// carries `finish_reason`): internal, for `/v1/messages` clients.
    #[serde(skip)]
    pub native_stop: Option<NativeStop>,
}

/// An anthropic-kind upstream's content blocks as it sent them, carried beside their
/// chat translation (which metering, the log and chat clients read) so that a
/// `/v1/messages` client gets every block unchanged: several thinking blocks each with
/// its own signature, `redacted_thinking`, citations, server tool blocks, and block
/// types the gateway does not know yet. Only for a `/v1/messages` client (the
/// adapter knows the call's dialect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnthropicRaw {
    /// A whole answer's `content` array.
    Content(RawJson),
    /// One `content_block_start`, `content_block_delta` or `content_block_stop` event
    /// of a stream: its name and its `data`.
    Event(&'static str, RawJson),
}

/// JSON text kept as it was received (valid JSON: it was parsed to get here).
#[derive(Debug, Clone)]
pub struct RawJson(pub Box<serde_json::value::RawValue>);

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Eq for RawJson {}

/// An anthropic-kind upstream's `stop_reason` and the `stop_sequence` it met, kept
/// beside the chat `finish_reason` they map to, so that a `/v1/messages` client gets
/// them as Anthropic sent them (`stop_sequence`, `pause_turn`,
/// `model_context_window_exceeded` have no `finish_reason` of their own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NativeStop {
    /// Anthropic's `stop_reason` (one of the values it documents).
    pub reason: &'static str,
    /// The client's stop sequence the model met (`stop_reason: "stop_sequence"`).
    pub sequence: Option<String>,
}

/// A fragment of a tool call in a stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which tool call of the choice this fragment extends.
    pub index: u32,
    /// Call id (first fragment only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `"function"` (first fragment only).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name (first fragment) and argument text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
}

/// Name and argument fragments of a streamed tool call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallDelta {
    /// Function name (first fragment only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A piece of the JSON arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// A non-stream `chat.completion` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// The gateway's request id (accepted by `/v1/generation`).
    pub id: String,
    /// Always `"chat.completion"`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Gateway model id that served.
    pub model: String,
    /// Provider that served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The answers.
    pub choices: Vec<Choice>,
    /// Token usage with `cost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// An embeddings answer (SPEC §7.3): one vector per input, in order. Never on a
    /// chat completion's wire.
    #[serde(skip)]
    pub embeddings: Option<std::sync::Arc<Vec<Vec<f32>>>>,
}

/// One answer of a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Choice index.
    pub index: u32,
    /// The assistant message.
    pub message: ResponseMessage,
    /// Why generation stopped.
    pub finish_reason: Option<FinishReason>,
}

/// The assistant message of a completion. Written with OpenRouter's
/// `reasoning_details` beside `reasoning` when there is reasoning or a signature
/// ([`ReasoningDetails`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResponseMessage {
    /// Always `assistant`.
    pub role: Role,
    /// Text; `null` when the model only called tools.
    pub content: Option<String>,
    /// Visible reasoning text, when the provider returns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// Tool calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The signature of `reasoning` (Anthropic's thinking `signature`): for
    /// `/v1/messages` clients, and in chat output only inside `reasoning_details`.
    #[serde(skip)]
    pub reasoning_signature: Option<String>,
    /// An anthropic-kind upstream's `content` array as sent ([`AnthropicRaw`]).
    #[serde(skip)]
    pub anthropic_content: Option<RawJson>,
    /// Why an anthropic-kind upstream stopped ([`Delta::native_stop`]).
    #[serde(skip)]
    pub native_stop: Option<NativeStop>,
}

/// Folds a chunk stream back into one [`ChatCompletion`].
///
/// Used by the HTTP edge for non-stream clients, and by adapters' golden tests.
/// Choices and tool calls are kept by the index their chunks name, sparsely: an
/// index is never an allocation size, whatever a chunk says (the provider tier
/// refuses absurd ones first, [`crate::providers::limits`]).
#[derive(Debug, Default)]
pub struct Aggregator {
    /// `(choice index, choice)`, in order of first appearance.
    choices: Vec<(u32, ChoiceAcc)>,
    usage: Option<Usage>,
    embeddings: Option<std::sync::Arc<Vec<Vec<f32>>>>,
}

#[derive(Debug, Default)]
struct ChoiceAcc {
    content: Option<String>,
    reasoning: Option<String>,
    reasoning_signature: Option<String>,
    anthropic_content: Option<RawJson>,
    native_stop: Option<NativeStop>,
    /// `(tool-call index, call)`, in order of first appearance.
    tool_calls: Vec<(u32, ToolCall)>,
    finish_reason: Option<String>,
}

/// The entry of `index` in a sparse list, added (with `new`) when missing. A linear
/// search: answers hold one choice, or a handful.
fn slot<T>(list: &mut Vec<(u32, T)>, index: u32, new: impl FnOnce() -> T) -> &mut T {
    let at = match list.iter().position(|(i, _)| *i == index) {
        Some(at) => at,
        None => {
            list.push((index, new()));
            list.len() - 1
        }
    };
    &mut list[at].1
}

impl Aggregator {
    /// Adds one chunk.
    pub fn push(&mut self, chunk: ChatChunk) {
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
        }
        if let Some(e) = chunk.embeddings {
            self.embeddings = Some(e);
        }
        for c in chunk.choices {
            let acc = slot(&mut self.choices, c.index, ChoiceAcc::default);
            if let Some(text) = c.delta.content {
                acc.content.get_or_insert_with(String::new).push_str(&text);
            }
            if let Some(text) = c.delta.reasoning {
                acc.reasoning
                    .get_or_insert_with(String::new)
                    .push_str(&text);
            }
            if let Some(sig) = c.delta.signature {
                acc.reasoning_signature
                    .get_or_insert_with(String::new)
                    .push_str(&sig);
            }
            // A stream's events are not folded: its answer is the translation.
            if let Some(AnthropicRaw::Content(raw)) = c.delta.anthropic {
                acc.anthropic_content = Some(raw);
            }
            if c.delta.native_stop.is_some() {
                acc.native_stop = c.delta.native_stop;
            }
            for tc in c.delta.tool_calls.into_iter().flatten() {
                let call = slot(&mut acc.tool_calls, tc.index, || ToolCall {
                    id: String::new(),
                    kind: function_type(),
                    function: FunctionCall {
                        name: String::new(),
                        arguments: String::new(),
                    },
                });
                if let Some(id) = tc.id {
                    call.id = id;
                }
                if let Some(f) = tc.function {
                    if let Some(name) = f.name {
                        call.function.name.push_str(&name);
                    }
                    if let Some(args) = f.arguments {
                        call.function.arguments.push_str(&args);
                    }
                }
            }
            if c.finish_reason.is_some() {
                acc.finish_reason = c.finish_reason;
            }
        }
    }

    /// The completion so far, choices and tool calls in index order; `id`, `model`,
    /// `provider` and `created` are left empty.
    pub fn finish(mut self) -> ChatCompletion {
        self.choices.sort_by_key(|(i, _)| *i);
        let mut choices: Vec<Choice> = self
            .choices
            .into_iter()
            .map(|(index, mut acc)| {
                acc.tool_calls.sort_by_key(|(i, _)| *i);
                let tool_calls: Vec<ToolCall> =
                    acc.tool_calls.into_iter().map(|(_, call)| call).collect();
                Choice {
                    index,
                    message: ResponseMessage {
                        role: Role::Assistant,
                        content: acc.content,
                        reasoning: acc.reasoning,
                        tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                        reasoning_signature: acc.reasoning_signature,
                        anthropic_content: acc.anthropic_content,
                        native_stop: acc.native_stop,
                    },
                    finish_reason: acc.finish_reason,
                }
            })
            .collect();
        if choices.is_empty() {
            choices.push(Choice {
                index: 0,
                message: ResponseMessage {
                    role: Role::Assistant,
                    content: Some(String::new()),
                    reasoning: None,
                    tool_calls: None,
                    reasoning_signature: None,
                    anthropic_content: None,
                    native_stop: None,
                },
                finish_reason: Some("stop".into()),
            });
        }
        ChatCompletion {
            id: String::new(),
            object: "chat.completion".into(),
            created: 0,
            model: String::new(),
            provider: None,
            choices,
            usage: self.usage,
            embeddings: self.embeddings,
        }
    }
}

impl ChatCompletion {
    /// The completion as one chunk, as adapters return non-stream upstream answers.
    pub fn into_chunk(self) -> ChatChunk {
        ChatChunk {
            id: self.id,
            object: chunk_object(),
            created: self.created,
            model: self.model,
            provider: self.provider,
            choices: self
                .choices
                .into_iter()
                .map(|c| ChunkChoice {
                    index: c.index,
                    delta: Delta {
                        role: Some(Role::Assistant),
                        content: c.message.content,
                        reasoning: c.message.reasoning,
                        signature: c.message.reasoning_signature,
                        anthropic: c.message.anthropic_content.map(AnthropicRaw::Content),
                        native_stop: c.message.native_stop,
                        tool_calls: c.message.tool_calls.map(|calls| {
                            calls
                                .into_iter()
                                .enumerate()
                                .map(|(i, call)| ToolCallDelta {
                                    index: i as u32,
                                    id: Some(call.id),
                                    kind: Some(call.kind),
                                    function: Some(FunctionCallDelta {
                                        name: Some(call.function.name),
                                        arguments: Some(call.function.arguments),
                                    }),
                                })
                                .collect()
                        }),
                    },
                    finish_reason: c.finish_reason,
                })
                .collect(),
            usage: self.usage,
            embeddings: self.embeddings,
            error: None,
        }
    }
}

/// OpenRouter's `reasoning_details` of a message or a delta: one `reasoning.text`
/// entry at index 0 with the reasoning text and its signature, each when there
/// (`[{"type":"reasoning.text","text":…,"signature":…,"index":0}]`). A client that
/// sends the assistant turn back with it keeps an anthropic-kind endpoint's
/// thinking through a tool loop (the signature is what Anthropic checks;
/// docs/providers.md). A stream's pieces share index 0: text pieces first, the
/// signature last, as a client that merges them by index expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasoningDetails<'a> {
    /// The reasoning text (or this piece of it).
    pub text: Option<&'a str>,
    /// Its signature (or this piece of it).
    pub signature: Option<&'a str>,
}

impl ReasoningDetails<'_> {
    /// Writes `reasoning` (when there is text) and then `reasoning_details` (when there
    /// is text or a signature) into a message's or delta's map.
    fn write_beside_reasoning<M: serde::ser::SerializeMap>(
        &self,
        m: &mut M,
    ) -> Result<(), M::Error> {
        if let Some(text) = self.text {
            m.serialize_entry("reasoning", text)?;
        }
        if self.text.is_some() || self.signature.is_some() {
            m.serialize_entry("reasoning_details", self)?;
        }
        Ok(())
    }
}

impl Serialize for ReasoningDetails<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        struct Entry<'a>(&'a ReasoningDetails<'a>);
        impl Serialize for Entry<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut m = serializer.serialize_map(None)?;
                m.serialize_entry("type", "reasoning.text")?;
                if let Some(t) = self.0.text {
                    m.serialize_entry("text", t)?;
                }
                if let Some(s) = self.0.signature {
                    m.serialize_entry("signature", s)?;
                }
                m.serialize_entry("index", &0)?;
                m.end()
            }
        }
        let mut seq = serializer.serialize_seq(Some(1))?;
        seq.serialize_element(&Entry(self))?;
        seq.end()
    }
}

impl Serialize for Delta {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = serializer.serialize_map(None)?;
        if let Some(role) = &self.role {
            m.serialize_entry("role", role)?;
        }
        if let Some(content) = &self.content {
            m.serialize_entry("content", content)?;
        }
        ReasoningDetails {
            text: self.reasoning.as_deref(),
            signature: self.signature.as_deref(),
        }
        .write_beside_reasoning(&mut m)?;
        if let Some(calls) = &self.tool_calls {
            m.serialize_entry("tool_calls", calls)?;
        }
        m.end()
    }
}

impl Serialize for ResponseMessage {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = serializer.serialize_map(None)?;
        m.serialize_entry("role", &self.role)?;
        m.serialize_entry("content", &self.content)?;
        ReasoningDetails {
            text: self.reasoning.as_deref(),
            signature: self.reasoning_signature.as_deref(),
        }
        .write_beside_reasoning(&mut m)?;
        if let Some(calls) = &self.tool_calls {
            m.serialize_entry("tool_calls", calls)?;
        }
        m.end()
    }
}
