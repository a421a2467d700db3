//! Anthropic Messages: `POST {base_url}/v1/messages` with `x-api-key` and
//! `anthropic-version: 2023-06-01` (override it with the provider's `headers`).
//!
//! The OpenAI request is translated, not passed through:
//!
//! - `system` / `developer` messages are lifted into `system` (a string, or text blocks
//!   when any part carries `cache_control`, which is kept);
//! - consecutive same-role turns are merged (Anthropic wants strict alternation), and
//!   `tool` messages become `tool_result` blocks of a user turn, ahead of its text;
//! - `max_tokens` is always set to the
//!   [bound credit admission reserved](crate::credit::completion_bound): the
//!   request's, else the model's `max_output_tokens`, else [`DEFAULT_MAX_TOKENS`].
//!   Anthropic has no `n`: one choice is answered (a request that asks for more with
//!   `provider.require_parameters` skips Anthropic endpoints);
//! - `stop` → `stop_sequences`, `temperature` (capped at 1, Anthropic's maximum),
//!   `top_p`, `user` → `metadata.user_id`;
//! - images: `data:` URLs → base64 sources, `http(s)` URLs → URL sources; PDF files
//!   (`file.file_data` data URLs) → document blocks;
//! - `tools` → `input_schema`, `tool_choice` auto/none/required/named → auto/none/any/tool,
//!   `parallel_tool_calls: false` → `disable_parallel_tool_use`;
//! - reasoning ([`ChatRequest::reasoning_wanted`]: OpenRouter's `reasoning`, else
//!   `reasoning_effort`) → extended thinking: `reasoning.max_tokens` as the budget
//!   (at least [`MIN_THINKING_BUDGET`]), an effort by [`thinking_budget`], under the
//!   caps and rules told there;
//! - an assistant turn's OpenRouter `reasoning_details` (what our answers carry) →
//!   its `thinking` blocks (signed `reasoning.text` entries) and `redacted_thinking`
//!   blocks (`reasoning.encrypted`), first in the turn, so thinking goes on through a
//!   tool loop.
//!
//! A request that came in by `/v1/messages` is not translated: the client's own body
//! goes up with only `model`, `max_tokens` and `stream` set, with its `anthropic-beta`
//! header ([`pass_through_body`]).
//!
//! Answers come back as OpenAI chunks: text, `thinking` as `delta.reasoning` (its
//! signature in `delta.signature`, written only inside `reasoning_details`),
//! `tool_use` blocks as tool calls (indexed by their ordinal among tool calls), the
//! `stop_reason` mapped by [`finish_reason`], and usage with cache reads and writes.
//!
//! # Example
//! ```
//! use switchboard::{catalog::Catalog, config::Config, context::{CallContext, ProviderCall}};
//! use switchboard::chat::{ChatRequest, Message, Role};
//! use switchboard::providers::anthropic;
//!
//! let config = Config::from_toml(r#"
//! [[providers]]
//! name = "claude"
//! kind = "anthropic"
//! base_url = "https://api.anthropic.com"
//! api_key = "sk-ant-test"
//! [[models]]
//! id = "anthropic/claude-sonnet-4"
//!   [[models.endpoints]]
//!   provider = "claude"
//!   upstream_model = "claude-sonnet-4-20250514"
//!   prompt_usd_per_mtok = 3
//!   completion_usd_per_mtok = 15
//! "#).unwrap();
//! let call = ProviderCall {
//!     endpoint: Catalog::from_config(&config).endpoints()[0].clone(),
//!     request: ChatRequest {
//!         model: "anthropic/claude-sonnet-4".into(),
//!         messages: vec![Message::text(Role::System, "Be brief."), Message::text(Role::User, "Hi")],
//!         ..Default::default()
//!     }
//!     .into(),
//!     ctx: CallContext::new(),
//! };
//! let body: serde_json::Value =
//!     serde_json::from_slice(&anthropic::wire_body(&call, false).unwrap()).unwrap();
//! assert_eq!(body["system"], "Be brief.");
//! assert_eq!(body["max_tokens"], anthropic::DEFAULT_MAX_TOKENS);
//! assert_eq!(body["messages"][0]["content"][0]["text"], "Hi");
//! ```

mod wire;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::media::data_url;
use super::{optional_api_key, protocol_error, Adapter, Decoded, StreamDecoder};
use crate::chat::{
    AnthropicRaw, ChatChunk, ChatRequest, ChunkChoice, Content, ContentPart, Delta, Dialect,
    FunctionCallDelta, NativeStop, PromptTokensDetails, RawJson, ReasoningWanted, Role, Stop,
    ToolCallDelta, Usage,
};
use crate::context::ProviderCall;
use crate::error::{FailureKind, ProviderError};

use wire::{Block, Source};

/// The `anthropic-version` header sent unless the provider's `headers` override it.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// `max_tokens` when neither the request nor the model's `max_output_tokens` sets one
/// (Anthropic requires it).
pub const DEFAULT_MAX_TOKENS: u32 = crate::credit::DEFAULT_MAX_OUTPUT_TOKENS as u32;

/// The smallest thinking budget Anthropic accepts.
pub const MIN_THINKING_BUDGET: u32 = 1024;

/// The Anthropic adapter.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnthropicAdapter;

/// The thinking budget asked for by a `reasoning_effort`: `minimal` 1024, `low` 2048,
/// `medium` 8192, `high` 16384 tokens; anything else (`none`, unknown) turns
/// thinking off.
///
/// The budget is then capped below `max_tokens` (thinking counts against it), and
/// thinking is left off when that leaves less than [`MIN_THINKING_BUDGET`], when
/// `tool_choice` forces a tool (Anthropic refuses both together), or when the last
/// assistant turn called tools without its signed thinking sent back in
/// `reasoning_details` (Anthropic wants such a turn to open with it). With thinking on, `temperature` is dropped and `top_p` is kept only
/// from 0.95 up, as Anthropic requires.
pub fn thinking_budget(effort: &str) -> Option<u32> {
    match effort {
        "minimal" => Some(1024),
        "low" => Some(2048),
        "medium" => Some(8192),
        "high" => Some(16384),
        _ => None,
    }
}

/// The thinking budget a request asks for, before the caps of [`thinking_budget`]:
/// a [budget](ReasoningWanted::Budget) as given (raised to
/// [`MIN_THINKING_BUDGET`]), an effort by [`thinking_budget`], none when reasoning is
/// off or not asked for.
fn requested_thinking(req: &ChatRequest) -> Option<u32> {
    match req.reasoning_wanted()? {
        ReasoningWanted::Budget(n) => Some(n.max(MIN_THINKING_BUDGET)),
        ReasoningWanted::Effort(e) => thinking_budget(e),
        ReasoningWanted::Off => None,
    }
}

/// The thinking blocks an assistant turn carries back in OpenRouter's
/// `reasoning_details`: each signed `reasoning.text` entry as a `thinking` block, each
/// `reasoning.encrypted` one as `redacted_thinking`; entries without a signature (or
/// data) are left out, since Anthropic would refuse them.
fn thinking_blocks(m: &crate::chat::Message) -> Vec<Block<'_>> {
    let Some(Value::Array(details)) = m.extra.get("reasoning_details") else {
        return Vec::new();
    };
    fn text<'v>(d: &'v Value, k: &str) -> Option<&'v str> {
        d.get(k)?.as_str()
    }
    details
        .iter()
        .filter_map(|d| match text(d, "type")? {
            "reasoning.text" => Some(Block::Thinking {
                thinking: text(d, "text").unwrap_or_default(),
                signature: text(d, "signature").filter(|s| !s.is_empty())?,
            }),
            "reasoning.encrypted" => Some(Block::RedactedThinking {
                data: text(d, "data").filter(|s| !s.is_empty())?,
            }),
            _ => None,
        })
        .collect()
}

/// Maps Anthropic's `stop_reason` to an OpenAI `finish_reason`: `end_turn`,
/// `stop_sequence` and `pause_turn` → `stop`; `max_tokens` and
/// `model_context_window_exceeded` → `length`; `tool_use` → `tool_calls`;
/// `refusal` → `content_filter`; anything else → `stop`.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// Anthropic's `stop_reason` values, as documented (anything else is not passed on).
const STOP_REASONS: [&str; 7] = [
    "end_turn",
    "max_tokens",
    "stop_sequence",
    "tool_use",
    "pause_turn",
    "refusal",
    "model_context_window_exceeded",
];

/// `stop_reason` as one of [`STOP_REASONS`], if it is one.
fn native_stop_reason(stop_reason: &str) -> Option<&'static str> {
    STOP_REASONS.iter().copied().find(|r| *r == stop_reason)
}

/// What a `/v1/messages` client is told of why the answer stopped: the upstream's
/// own `stop_reason` (a documented one) and `stop_sequence` (only beside
/// `"stop_sequence"`, and bounded like any text the gateway repeats).
fn native_stop(stop_reason: Option<&str>, sequence: Option<String>) -> Option<NativeStop> {
    let reason = native_stop_reason(stop_reason?)?;
    let sequence = sequence.filter(|s| reason == "stop_sequence" && s.len() <= MAX_STOP_SEQUENCE);
    Some(NativeStop { reason, sequence })
}

/// The longest `stop_sequence` passed on to a client (the client's own stop
/// sequences are far shorter; a longer one is not what it sent).
const MAX_STOP_SEQUENCE: usize = 1024;

fn client_error(call: &ProviderCall, message: impl Into<String>) -> ProviderError {
    ProviderError::new(
        call.endpoint.provider.name.clone(),
        FailureKind::Status(400),
        message,
    )
}

/// Builds the exact JSON body sent to an Anthropic-kind provider (used by golden tests).
pub fn wire_body(call: &ProviderCall, stream: bool) -> Result<Vec<u8>, ProviderError> {
    let wire = to_wire(call, stream)?;
    serde_json::to_vec(&wire).map_err(|e| protocol_error(call, e))
}

fn to_wire(call: &ProviderCall, stream: bool) -> Result<wire::Request<'_>, ProviderError> {
    let req = &call.request;
    // The bound credit admission reserved (Anthropic answers one choice whatever `n`).
    let max_tokens = crate::credit::completion_bound(req, &call.endpoint);

    let mut system: Vec<Block<'_>> = Vec::new();
    let mut turns: Vec<wire::Message<'_>> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        match m.role {
            Role::System | Role::Developer => {
                if let Some(c) = &m.content {
                    system.extend(
                        content_blocks(call, c, i)?
                            .into_iter()
                            .filter(|b| matches!(b, Block::Text { .. })),
                    );
                }
            }
            Role::User => {
                let blocks = match &m.content {
                    Some(c) => content_blocks(call, c, i)?,
                    None => Vec::new(),
                };
                push_turn(&mut turns, "user", blocks);
            }
            Role::Assistant => {
                // Its thinking first, as Anthropic wants it (OpenRouter's
                // `reasoning_details`, which our answers carry).
                let mut blocks = thinking_blocks(m);
                if let Some(c) = &m.content {
                    blocks.extend(content_blocks(call, c, i)?);
                }
                for tc in m.tool_calls.iter().flatten() {
                    blocks.push(Block::ToolUse {
                        id: &tc.id,
                        name: &tc.function.name,
                        input: crate::providers::media::arguments_object(&tc.function.arguments),
                    });
                }
                push_turn(&mut turns, "assistant", blocks);
            }
            Role::Tool => {
                let content = match &m.content {
                    Some(Content::Text(s)) => wire::ToolResultContent::Text(s),
                    Some(c @ Content::Parts(_)) => {
                        wire::ToolResultContent::Blocks(content_blocks(call, c, i)?)
                    }
                    None => wire::ToolResultContent::Text(""),
                };
                let block = Block::ToolResult {
                    tool_use_id: m.tool_call_id.as_deref().unwrap_or_default(),
                    content,
                };
                push_turn(&mut turns, "user", vec![block]);
            }
        }
    }
    // Anthropic wants a user turn's tool results ahead of its other blocks.
    for t in turns.iter_mut().filter(|t| t.role == "user") {
        t.content
            .sort_by_key(|b| !matches!(b, Block::ToolResult { .. }));
    }

    let system = if system.is_empty() {
        None
    } else if system.iter().any(|b| {
        matches!(
            b,
            Block::Text {
                cache_control: Some(_),
                ..
            }
        )
    }) {
        Some(wire::System::Blocks(system))
    } else {
        let texts: Vec<&str> = system
            .iter()
            .filter_map(|b| match b {
                Block::Text { text, .. } => Some(text.as_ref()),
                _ => None,
            })
            .collect();
        Some(wire::System::Text(texts.join("\n\n")))
    };

    let tools: Option<Vec<wire::ToolDef<'_>>> =
        req.tools.as_ref().filter(|t| !t.is_empty()).map(|tools| {
            tools
                .iter()
                .map(|t| wire::ToolDef {
                    name: &t.function.name,
                    description: t.function.description.as_deref(),
                    input_schema: match &t.function.parameters {
                        Some(p) => Cow::Borrowed(p),
                        None => Cow::Owned(serde_json::json!({"type": "object", "properties": {}})),
                    },
                    cache_control: t.function.extra.get("cache_control"),
                })
                .collect()
        });

    let mut tool_choice = match &req.tool_choice {
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(("auto", None)),
            "none" => Some(("none", None)),
            "required" => Some(("any", None)),
            _ => None,
        },
        Some(Value::Object(o)) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|name| ("tool", Some(name))),
        _ => None,
    }
    .map(|(kind, name)| wire::ToolChoice {
        kind,
        name,
        disable_parallel_tool_use: None,
    });
    if tools.is_none() {
        tool_choice = None;
    } else if req.extra.get("parallel_tool_calls") == Some(&Value::Bool(false)) {
        let choice = tool_choice.get_or_insert(wire::ToolChoice {
            kind: "auto",
            name: None,
            disable_parallel_tool_use: None,
        });
        if choice.kind != "none" {
            choice.disable_parallel_tool_use = Some(true);
        }
    }

    let forced_tool = tool_choice
        .as_ref()
        .is_some_and(|c| c.kind == "any" || c.kind == "tool");
    // Anthropic wants the turn that called tools to start with its signed thinking
    // when thinking is on: without it (a client that did not send back
    // `reasoning_details`), thinking stays off.
    let last_assistant_called_tools = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == Role::Assistant)
        .is_some_and(|m| {
            m.tool_calls.as_ref().is_some_and(|t| !t.is_empty()) && thinking_blocks(m).is_empty()
        });
    let thinking = requested_thinking(req)
        .map(|b| b.min(max_tokens.saturating_sub(1)))
        .filter(|b| *b >= MIN_THINKING_BUDGET)
        .filter(|_| !forced_tool && !last_assistant_called_tools)
        .map(|budget_tokens| wire::Thinking {
            kind: "enabled",
            budget_tokens,
        });
    let (temperature, top_p) = if thinking.is_some() {
        (None, req.top_p.filter(|p| *p >= 0.95))
    } else {
        // Anthropic's temperature range is 0..=1, OpenAI's 0..=2.
        (req.temperature.map(|t| t.min(1.0)), req.top_p)
    };

    let stop_sequences = req.stop.as_ref().map(|s| match s {
        Stop::One(s) => vec![s.as_str()],
        Stop::Many(v) => v.iter().map(String::as_str).collect(),
    });
    // Anthropic refuses whitespace-only stop sequences.
    let stop_sequences = stop_sequences
        .map(|v| {
            v.into_iter()
                .filter(|s| !s.trim().is_empty())
                .collect::<Vec<_>>()
        })
        .filter(|v| !v.is_empty());

    Ok(wire::Request {
        model: &call.endpoint.upstream_model,
        max_tokens,
        system,
        messages: turns,
        stop_sequences,
        temperature,
        top_p,
        tools,
        tool_choice,
        thinking,
        metadata: req
            .user
            .as_deref()
            .map(|user_id| wire::Metadata { user_id }),
        stream,
    })
}

/// The body sent for a `/v1/messages` request (SPEC §7.1): the client's own body,
/// nothing lost (`cache_control`, signed `thinking` blocks, `top_k`, fields the
/// gateway does not know), with only `model` (the endpoint's upstream name),
/// `max_tokens` (the [bound admission reserved](crate::credit::completion_bound))
/// and `stream` (as this call wants) set by the gateway.
pub fn pass_through_body(
    call: &ProviderCall,
    inbound: &crate::chat::AnthropicInbound,
    stream: bool,
) -> Result<Vec<u8>, ProviderError> {
    let mut body = inbound.body.clone();
    body.insert(
        "model".into(),
        Value::String(call.endpoint.upstream_model.clone()),
    );
    body.insert(
        "max_tokens".into(),
        Value::from(crate::credit::completion_bound(
            &call.request,
            &call.endpoint,
        )),
    );
    body.insert("stream".into(), Value::Bool(stream));
    serde_json::to_vec(&body).map_err(|e| protocol_error(call, e))
}

/// Appends blocks to the last turn when it has the same role, else starts a turn.
fn push_turn<'a>(turns: &mut Vec<wire::Message<'a>>, role: &'static str, blocks: Vec<Block<'a>>) {
    if blocks.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some(last) if last.role == role => last.content.extend(blocks),
        _ => turns.push(wire::Message {
            role,
            content: blocks,
        }),
    }
}

/// Content as blocks: text (empty text dropped; Anthropic refuses it), images,
/// PDF documents. Audio and other files are dropped.
fn content_blocks<'a>(
    call: &ProviderCall,
    content: &'a Content,
    index: usize,
) -> Result<Vec<Block<'a>>, ProviderError> {
    let parts = match content {
        Content::Text(s) if s.is_empty() => return Ok(Vec::new()),
        Content::Text(s) => {
            return Ok(vec![Block::Text {
                text: Cow::Borrowed(s),
                cache_control: None,
            }])
        }
        Content::Parts(parts) => parts,
    };
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            ContentPart::Text { text, extra } => {
                if !text.is_empty() {
                    out.push(Block::Text {
                        text: Cow::Borrowed(text),
                        cache_control: extra.get("cache_control"),
                    });
                }
            }
            ContentPart::ImageUrl { image_url, extra } => {
                let url = image_url.url.as_str();
                let source = if let Some(d) = data_url(url) {
                    Source::Base64 {
                        media_type: d.mime,
                        data: d.data,
                    }
                } else if url.starts_with("http://") || url.starts_with("https://") {
                    Source::Url { url }
                } else {
                    return Err(client_error(
                        call,
                        format!(
                            "messages[{index}]: image URLs must be http(s) or base64 `data:` URLs"
                        ),
                    ));
                };
                out.push(Block::Image {
                    source,
                    cache_control: extra.get("cache_control"),
                });
            }
            ContentPart::File { file } => {
                if let Some(d) = file
                    .get("file_data")
                    .and_then(Value::as_str)
                    .and_then(data_url)
                    .filter(|d| d.mime == "application/pdf")
                {
                    out.push(Block::Document {
                        source: Source::Base64 {
                            media_type: d.mime,
                            data: d.data,
                        },
                        cache_control: None,
                    });
                }
            }
            ContentPart::InputAudio { .. } => {}
        }
    }
    Ok(out)
}

/// Anthropic's usage in OpenAI terms: prompt = input + cache reads + cache writes.
fn to_usage(u: wire::Usage) -> Usage {
    let read = u.cache_read_input_tokens.unwrap_or(0);
    let written = u.cache_creation_input_tokens.unwrap_or(0);
    let mut usage = Usage::new(
        // Saturating: upstream numbers, and a sum past u64 must not panic.
        u.input_tokens
            .unwrap_or(0)
            .saturating_add(read)
            .saturating_add(written),
        u.output_tokens.unwrap_or(0),
    );
    usage.prompt_tokens_details = Some(PromptTokensDetails {
        cached_tokens: read,
        cache_write_tokens: written,
    });
    usage
}

fn one_choice(delta: Delta, finish_reason: Option<&str>) -> ChatChunk {
    ChatChunk {
        choices: vec![ChunkChoice {
            index: 0,
            delta,
            finish_reason: finish_reason.map(str::to_string),
        }],
        ..ChatChunk::delta(Delta::default())
    }
}

impl Adapter for AnthropicAdapter {
    fn build_request(
        &self,
        call: &ProviderCall,
        stream: bool,
    ) -> Result<http::Request<Bytes>, ProviderError> {
        let key = optional_api_key(call)?;
        let inbound = call.request.inbound.anthropic.as_deref();
        let body = match inbound {
            Some(inbound) => pass_through_body(call, inbound, stream)?,
            None => wire_body(call, stream)?,
        };
        let mut req = http::Request::post(call.endpoint.provider.url("v1/messages"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("anthropic-version", ANTHROPIC_VERSION)
            .header(http::header::USER_AGENT, crate::USER_AGENT);
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        if let Some(beta) = inbound.and_then(|i| i.beta.as_deref()) {
            req = req.header("anthropic-beta", beta);
        }
        req.body(Bytes::from(body))
            .map_err(|e| protocol_error(call, e))
    }

    fn parse_response(&self, call: &ProviderCall, body: &[u8]) -> Result<ChatChunk, ProviderError> {
        let wire: wire::Response = crate::chat::from_json(body)
            .map_err(|e| protocol_error(call, format!("not an Anthropic message: {e}")))?;
        if let Some(err) = wire.error.filter(|_| wire.kind == "error") {
            return Err(ProviderError::new(
                call.endpoint.provider.name.clone(),
                FailureKind::InBand,
                err.message,
            ));
        }
        let mut content: Option<String> = None;
        let mut reasoning: Option<String> = None;
        let mut signature: Option<String> = None;
        let mut calls = Vec::new();
        for block in wire.content {
            match block {
                wire::ResponseBlock::Text { text } => {
                    content.get_or_insert_with(String::new).push_str(&text)
                }
                wire::ResponseBlock::Thinking {
                    thinking,
                    signature: sig,
                } => {
                    reasoning
                        .get_or_insert_with(String::new)
                        .push_str(&thinking);
                    // One signature covers the reasoning: the last block's (an
                    // answer holds one thinking block before its text).
                    if sig.is_some() {
                        signature = sig;
                    }
                }
                wire::ResponseBlock::ToolUse { id, name, input } => {
                    let arguments = match input {
                        Value::Null => "{}".to_string(),
                        v => v.to_string(),
                    };
                    calls.push(ToolCallDelta {
                        index: calls.len() as u32,
                        id: Some(id),
                        kind: Some("function".into()),
                        function: Some(FunctionCallDelta {
                            name: Some(name),
                            arguments: Some(arguments),
                        }),
                    });
                }
                wire::ResponseBlock::Other => {}
            }
        }
        if content.is_none() && calls.is_empty() {
            content = Some(String::new());
        }
        let delta = Delta {
            role: Some(Role::Assistant),
            content,
            reasoning,
            tool_calls: (!calls.is_empty()).then_some(calls),
            signature,
            anthropic: match call.request.inbound.dialect {
                // The blocks as sent, for a `/v1/messages` client.
                Dialect::AnthropicMessages => {
                    #[derive(serde::Deserialize)]
                    struct Blocks<'a> {
                        #[serde(borrow)]
                        content: Option<&'a serde_json::value::RawValue>,
                    }
                    serde_json::from_slice::<Blocks>(body)
                        .ok()
                        .and_then(|b| b.content)
                        .map(|c| AnthropicRaw::Content(RawJson(c.to_owned())))
                }
                _ => None,
            },
            native_stop: native_stop(wire.stop_reason.as_deref(), wire.stop_sequence),
        };
        let finish = finish_reason(wire.stop_reason.as_deref().unwrap_or("end_turn"));
        let mut chunk = one_choice(delta, Some(finish));
        chunk.usage = wire.usage.map(to_usage);
        Ok(chunk)
    }

    fn stream_decoder(&self, call: &ProviderCall) -> Box<dyn StreamDecoder> {
        Box::new(AnthropicDecoder {
            provider: call.endpoint.provider.name.clone(),
            usage: wire::Usage::default(),
            tool_ordinals: HashMap::new(),
            messages_client: call.request.inbound.dialect == Dialect::AnthropicMessages,
        })
    }
}

/// The state of one Anthropic stream.
struct AnthropicDecoder {
    provider: Arc<str>,
    /// Usage so far (input counts from `message_start`).
    usage: wire::Usage,
    /// Content-block index → tool-call ordinal.
    tool_ordinals: HashMap<u32, u32>,
    /// The client asked `/v1/messages`: content-block events are passed on as sent
    /// ([`AnthropicRaw`]).
    messages_client: bool,
}

impl AnthropicDecoder {
    fn tool_delta(&self, block: u32, f: impl FnOnce(&mut ToolCallDelta)) -> Decoded {
        match self.tool_ordinals.get(&block) {
            Some(&index) => {
                let mut d = ToolCallDelta {
                    index,
                    ..ToolCallDelta::default()
                };
                f(&mut d);
                Decoded::Chunk(ChatChunk::delta(Delta {
                    tool_calls: Some(vec![d]),
                    ..Delta::default()
                }))
            }
            None => Decoded::Skip,
        }
    }
}

impl StreamDecoder for AnthropicDecoder {
    fn decode(&mut self, _event: &str, data: &str) -> Result<Decoded, ProviderError> {
        let Some(event) = crate::providers::parse_event::<wire::Event>(&self.provider, data)?
        else {
            return Ok(Decoded::Skip);
        };
        // A `/v1/messages` client gets every content-block event as sent, beside its
        // translation (which metering and the log read).
        let name = match &event {
            wire::Event::ContentBlockStart { .. } => Some("content_block_start"),
            wire::Event::ContentBlockDelta { .. } => Some("content_block_delta"),
            wire::Event::ContentBlockStop {} => Some("content_block_stop"),
            _ => None,
        };
        let decoded = self.translate(event)?;
        let Some(name) = name.filter(|_| self.messages_client) else {
            return Ok(decoded);
        };
        let raw = Some(AnthropicRaw::Event(name, raw_json(&self.provider, data)?));
        Ok(match decoded {
            Decoded::Chunk(mut chunk) => {
                if let Some(c) = chunk.choices.first_mut() {
                    c.delta.anthropic = raw;
                }
                Decoded::Chunk(chunk)
            }
            Decoded::Skip => Decoded::Chunk(ChatChunk::delta(Delta {
                anthropic: raw,
                ..Delta::default()
            })),
            other => other,
        })
    }
}

/// An event's `data` kept as it came, on one line (it parsed already: an error here is
/// one too). Data sent over several `data:` lines holds line breaks, which JSON allows
/// only between tokens: such a text is written again without them, so that it stays
/// one `data:` line for the client.
fn raw_json(provider: &Arc<str>, text: &str) -> Result<RawJson, ProviderError> {
    let bad = |e: serde_json::Error| {
        ProviderError::new(
            provider.clone(),
            FailureKind::Protocol,
            format!("bad event: {e}"),
        )
    };
    let text = text.trim();
    let one_line = if text.contains(['\n', '\r']) {
        serde_json::from_str::<Value>(text)
            .map_err(bad)?
            .to_string()
    } else {
        text.to_owned()
    };
    serde_json::value::RawValue::from_string(one_line)
        .map(RawJson)
        .map_err(bad)
}

impl AnthropicDecoder {
    /// One event in chat terms.
    fn translate(&mut self, event: wire::Event) -> Result<Decoded, ProviderError> {
        Ok(match event {
            wire::Event::MessageStart { message } => {
                if let Some(u) = message.usage {
                    self.usage = self.usage.updated(u);
                }
                Decoded::Chunk(ChatChunk::delta(Delta {
                    role: Some(Role::Assistant),
                    ..Delta::default()
                }))
            }
            wire::Event::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                wire::StartBlock::Text { text } if !text.is_empty() => {
                    Decoded::Chunk(ChatChunk::text(text))
                }
                wire::StartBlock::Thinking { thinking } if !thinking.is_empty() => {
                    Decoded::Chunk(ChatChunk::delta(Delta {
                        reasoning: Some(thinking),
                        ..Delta::default()
                    }))
                }
                wire::StartBlock::ToolUse { id, name } => {
                    let ordinal = self.tool_ordinals.len() as u32;
                    self.tool_ordinals.insert(index, ordinal);
                    self.tool_delta(index, |d| {
                        d.id = Some(id);
                        d.kind = Some("function".into());
                        d.function = Some(FunctionCallDelta {
                            name: Some(name),
                            arguments: Some(String::new()),
                        });
                    })
                }
                _ => Decoded::Skip,
            },
            wire::Event::ContentBlockDelta { index, delta } => match delta {
                wire::BlockDelta::TextDelta { text } if !text.is_empty() => {
                    Decoded::Chunk(ChatChunk::text(text))
                }
                wire::BlockDelta::ThinkingDelta { thinking } if !thinking.is_empty() => {
                    Decoded::Chunk(ChatChunk::delta(Delta {
                        reasoning: Some(thinking),
                        ..Delta::default()
                    }))
                }
                wire::BlockDelta::SignatureDelta { signature } if !signature.is_empty() => {
                    Decoded::Chunk(ChatChunk::delta(Delta {
                        signature: Some(signature),
                        ..Delta::default()
                    }))
                }
                wire::BlockDelta::InputJsonDelta { partial_json } if !partial_json.is_empty() => {
                    self.tool_delta(index, |d| {
                        d.function = Some(FunctionCallDelta {
                            name: None,
                            arguments: Some(partial_json),
                        });
                    })
                }
                _ => Decoded::Skip,
            },
            wire::Event::MessageDelta { delta, usage } => {
                if let Some(u) = usage {
                    self.usage = self.usage.updated(u);
                }
                let finish = finish_reason(delta.stop_reason.as_deref().unwrap_or("end_turn"));
                let native = native_stop(delta.stop_reason.as_deref(), delta.stop_sequence);
                let mut chunk = one_choice(
                    Delta {
                        native_stop: native,
                        ..Delta::default()
                    },
                    Some(finish),
                );
                chunk.usage = Some(to_usage(self.usage));
                Decoded::Chunk(chunk)
            }
            wire::Event::MessageStop {} => Decoded::Done,
            wire::Event::Error { error } => {
                let message = if error.message.is_empty() {
                    error.kind
                } else {
                    error.message
                };
                return Err(ProviderError::new(
                    self.provider.clone(),
                    FailureKind::InBand,
                    message,
                ));
            }
            wire::Event::ContentBlockStop {} | wire::Event::Ping {} | wire::Event::Other => {
                Decoded::Skip
            }
        })
    }
}

#[cfg(test)]
mod tests;
