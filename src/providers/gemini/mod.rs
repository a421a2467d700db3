//! Google Gemini: `POST {base_url}/v1beta/models/{model}:generateContent`, and
//! `:streamGenerateContent?alt=sse` for streams, with `x-goog-api-key`.
//!
//! The OpenAI request is translated, not passed through:
//!
//! - `system` / `developer` messages → `systemInstruction`; `user` / `assistant` →
//!   `contents` with roles `user` / `model`, consecutive same-role turns merged;
//! - images: `data:` URLs → `inlineData`, `http(s)` URLs → `fileData` with a MIME type
//!   guessed from the extension; `file` data URLs and `input_audio` → `inlineData`;
//! - `tools` → `functionDeclarations` (parameters as `parametersJsonSchema`, full JSON
//!   Schema); `tool_choice` auto/none/required/named → `AUTO`/`NONE`/`ANY`/`ANY` with
//!   `allowedFunctionNames`; assistant `tool_calls` → `functionCall` parts; `tool`
//!   messages → `functionResponse` parts, named after the call they answer (Gemini needs
//!   the name, OpenAI only sends the id) with the result as a JSON object;
//! - `generationConfig`: `maxOutputTokens`, always (the
//!   [bound credit admission reserved](crate::credit::completion_bound) per choice:
//!   the request's, else the model's `max_output_tokens`, else 4096), `candidateCount`
//!   from `n` above 1, `temperature`, `topP`, `stopSequences`, `seed`,
//!   `responseMimeType: application/json` for `json_object` / `json_schema` (with
//!   `responseJsonSchema`), and `thinkingConfig` from the request's reasoning
//!   ([`ChatRequest::reasoning_wanted`](crate::chat::ChatRequest::reasoning_wanted):
//!   `reasoning.max_tokens` as `thinkingBudget`, an effort by [`thinking_budget`],
//!   0 when reasoning is off; `includeThoughts` unless the budget is 0 or
//!   `reasoning.exclude` asks for no reasoning text).
//!
//! Gemini sends no tool-call ids, so each call gets a stable one (see [`tool_call_id`]).
//! Thought parts become `delta.reasoning`; `finishReason` is mapped by
//! [`finish_reason`]; `usageMetadata` becomes usage with thoughts counted as reasoning
//! (completion) tokens and cached content as cached prompt tokens.
//!
//! Embeddings (SPEC §7.3) go to `:batchEmbedContents` ([`embed`]).
//!
//! # Example
//! ```
//! use switchboard::providers::gemini::{finish_reason, tool_call_id};
//!
//! assert_eq!(finish_reason("MAX_TOKENS", false), "length");
//! assert_eq!(finish_reason("STOP", true), "tool_calls");
//! let id = tool_call_id(0, "get_weather", r#"{"city":"Paris"}"#);
//! assert!(id.starts_with("call_0_"));
//! assert_eq!(id, tool_call_id(0, "get_weather", r#"{"city":"Paris"}"#), "stable");
//! ```

pub mod embed;
mod wire;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::media::{data_url, mime_from_url};
use super::{optional_api_key, protocol_error, Adapter, Decoded, StreamDecoder};
use crate::chat::{
    ChatChunk, ChunkChoice, CompletionTokensDetails, Content, ContentPart, Delta,
    FunctionCallDelta, PromptTokensDetails, ReasoningWanted, Role, Stop, ToolCallDelta, Usage,
};
use crate::context::ProviderCall;
use crate::error::{FailureKind, ProviderError};

use wire::Part;

/// Google's documented placeholder for a `thoughtSignature` the client cannot replay
/// (Gemini 3 and later refuse replayed function calls without one).
pub const SKIP_THOUGHT_SIGNATURE: &str = "skip_thought_signature_validator";

/// The Gemini adapter.
#[derive(Debug, Clone, Copy, Default)]
pub struct GeminiAdapter;

/// The `thinkingBudget` asked for by a `reasoning_effort`: `none` 0 (thinking off
/// where the model allows it), `minimal` 512, `low` 1024, `medium` 8192, `high` 24576;
/// unknown values leave the model's default. Thought summaries are asked for
/// (`includeThoughts`) whenever the budget is not 0.
pub fn thinking_budget(effort: &str) -> Option<u32> {
    match effort {
        "none" => Some(0),
        "minimal" => Some(512),
        "low" => Some(1024),
        "medium" => Some(8192),
        "high" => Some(24576),
        _ => None,
    }
}

/// Maps Gemini's `finishReason` to an OpenAI `finish_reason`: `MAX_TOKENS` → `length`;
/// `SAFETY`, `RECITATION`, `LANGUAGE`, `BLOCKLIST`, `PROHIBITED_CONTENT`, `SPII`,
/// `IMAGE_SAFETY` → `content_filter`; anything else (`STOP`, `OTHER`, …) → `stop`, or
/// `tool_calls` when the candidate called functions.
pub fn finish_reason(reason: &str, called_tools: bool) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "LANGUAGE" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII"
        | "IMAGE_SAFETY" => "content_filter",
        _ if called_tools => "tool_calls",
        _ => "stop",
    }
}

/// The id given to a Gemini function call: `call_{ordinal}_{hash}`, where the hash is
/// the first 16 hex digits of SHA-256 over the name and the JSON arguments. The same
/// answer gets the same ids, streamed or not.
pub fn tool_call_id(ordinal: u32, name: &str, arguments: &str) -> String {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(arguments.as_bytes());
    let digest = h.finalize();
    format!("call_{ordinal}_{}", hex::encode(&digest[..8]))
}

fn client_error(call: &ProviderCall, message: impl Into<String>) -> ProviderError {
    ProviderError::new(
        call.endpoint.provider.name.clone(),
        FailureKind::Status(400),
        message,
    )
}

/// The upstream model name without a leading `models/`.
fn model_name(call: &ProviderCall) -> &str {
    let m = call.endpoint.upstream_model.as_str();
    m.strip_prefix("models/").unwrap_or(m)
}

/// Whether the model wants replayed function calls signed (Gemini 3 and later).
fn wants_thought_signatures(model: &str) -> bool {
    !(model.starts_with("gemini-1") || model.starts_with("gemini-2"))
}

/// Builds the exact JSON body sent to a Gemini-kind provider (used by golden tests).
pub fn wire_body(call: &ProviderCall) -> Result<Vec<u8>, ProviderError> {
    let wire = to_wire(call)?;
    serde_json::to_vec(&wire).map_err(|e| protocol_error(call, e))
}

fn to_wire(call: &ProviderCall) -> Result<wire::Request<'_>, ProviderError> {
    let req = &call.request;
    let sign_calls = wants_thought_signatures(model_name(call));

    // Function names by call id, for the `functionResponse` of each `tool` message.
    let names: HashMap<&str, &str> = req
        .messages
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .flat_map(|m| m.tool_calls.iter().flatten())
        .map(|tc| (tc.id.as_str(), tc.function.name.as_str()))
        .collect();

    let mut system: Vec<Part<'_>> = Vec::new();
    let mut contents: Vec<wire::Content<'_>> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        match m.role {
            Role::System | Role::Developer => {
                if let Some(c) = &m.content {
                    system.extend(
                        content_parts(call, c, i)?
                            .into_iter()
                            .filter(|p| p.text.is_some()),
                    );
                }
            }
            Role::User => {
                let parts = match &m.content {
                    Some(c) => content_parts(call, c, i)?,
                    None => Vec::new(),
                };
                push_turn(&mut contents, "user", parts);
            }
            Role::Assistant => {
                let mut parts: Vec<Part<'_>> = match &m.content {
                    Some(c) => content_parts(call, c, i)?
                        .into_iter()
                        .filter(|p| p.text.is_some())
                        .collect(),
                    None => Vec::new(),
                };
                for (j, tc) in m.tool_calls.iter().flatten().enumerate() {
                    parts.push(Part {
                        function_call: Some(wire::FunctionCall {
                            name: &tc.function.name,
                            args: crate::providers::media::arguments_object(&tc.function.arguments),
                        }),
                        thought_signature: (sign_calls && j == 0).then_some(SKIP_THOUGHT_SIGNATURE),
                        ..Part::default()
                    });
                }
                push_turn(&mut contents, "model", parts);
            }
            Role::Tool => {
                let id = m.tool_call_id.as_deref().unwrap_or_default();
                let name = names.get(id).copied().ok_or_else(|| {
                    client_error(
                        call,
                        format!(
                            "messages[{i}]: `tool_call_id` `{id}` answers no tool call of an earlier assistant message"
                        ),
                    )
                })?;
                let text = m.content.as_ref().map(|c| c.text()).unwrap_or_default();
                let response = match serde_json::from_str::<Value>(&text) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => serde_json::json!({ "content": text }),
                };
                let part = Part {
                    function_response: Some(wire::FunctionResponse { name, response }),
                    ..Part::default()
                };
                push_turn(&mut contents, "user", vec![part]);
            }
        }
    }

    let tools = req.tools.as_ref().filter(|t| !t.is_empty()).map(|tools| {
        vec![wire::Tool {
            function_declarations: tools
                .iter()
                .map(|t| wire::FunctionDeclaration {
                    name: &t.function.name,
                    description: t.function.description.as_deref(),
                    parameters_json_schema: t.function.parameters.as_ref(),
                })
                .collect(),
        }]
    });
    let tool_config = match &req.tool_choice {
        _ if tools.is_none() => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(("AUTO", None)),
            "none" => Some(("NONE", None)),
            "required" => Some(("ANY", None)),
            _ => None,
        },
        Some(Value::Object(o)) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|name| ("ANY", Some(vec![name]))),
        _ => None,
    }
    .map(|(mode, allowed_function_names)| wire::ToolConfig {
        function_calling_config: wire::FunctionCallingConfig {
            mode,
            allowed_function_names,
        },
    });

    let (response_mime_type, response_json_schema) = match req
        .response_format
        .as_ref()
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str)
    {
        Some("json_object") => (Some("application/json"), None),
        Some("json_schema") => (
            Some("application/json"),
            req.response_format
                .as_ref()
                .and_then(|f| f.get("json_schema"))
                .and_then(|s| s.get("schema")),
        ),
        _ => (None, None),
    };
    let budget = match req.reasoning_wanted() {
        Some(ReasoningWanted::Budget(n)) => Some(n),
        Some(ReasoningWanted::Effort(e)) => thinking_budget(e),
        Some(ReasoningWanted::Off) => Some(0),
        None => None,
    };
    let thinking_config = budget.map(|thinking_budget| wire::ThinkingConfig {
        thinking_budget,
        include_thoughts: thinking_budget > 0 && !req.hides_reasoning(),
    });
    let config = wire::GenerationConfig {
        // Always the bound credit admission reserved per choice.
        max_output_tokens: Some(crate::credit::completion_bound(req, &call.endpoint)),
        candidate_count: req.n.filter(|&n| n > 1),
        temperature: req.temperature,
        top_p: req.top_p,
        stop_sequences: req.stop.as_ref().map(|s| match s {
            Stop::One(s) => vec![s.as_str()],
            Stop::Many(v) => v.iter().map(String::as_str).collect(),
        }),
        seed: req.seed,
        response_mime_type,
        response_json_schema,
        thinking_config,
    };

    Ok(wire::Request {
        contents,
        system_instruction: (!system.is_empty())
            .then_some(wire::SystemInstruction { parts: system }),
        tools,
        tool_config,
        generation_config: Some(config),
    })
}

/// Appends parts to the last turn when it has the same role, else starts a turn.
fn push_turn<'a>(contents: &mut Vec<wire::Content<'a>>, role: &'static str, parts: Vec<Part<'a>>) {
    if parts.is_empty() {
        return;
    }
    match contents.last_mut() {
        Some(last) if last.role == role => last.parts.extend(parts),
        _ => contents.push(wire::Content { role, parts }),
    }
}

/// Content as parts: text (empty text dropped), images, files and audio.
fn content_parts<'a>(
    call: &ProviderCall,
    content: &'a Content,
    index: usize,
) -> Result<Vec<Part<'a>>, ProviderError> {
    let text = |s: &'a str| Part {
        text: Some(Cow::Borrowed(s)),
        ..Part::default()
    };
    let parts = match content {
        Content::Text(s) if s.is_empty() => return Ok(Vec::new()),
        Content::Text(s) => return Ok(vec![text(s)]),
        Content::Parts(parts) => parts,
    };
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            ContentPart::Text { text: t, .. } if t.is_empty() => {}
            ContentPart::Text { text: t, .. } => out.push(text(t)),
            ContentPart::ImageUrl { image_url, .. } => {
                let url = image_url.url.as_str();
                if let Some(d) = data_url(url) {
                    out.push(Part {
                        inline_data: Some(wire::Blob {
                            mime_type: d.mime,
                            data: d.data,
                        }),
                        ..Part::default()
                    });
                } else if url.starts_with("http://") || url.starts_with("https://") {
                    out.push(Part {
                        file_data: Some(wire::FileData {
                            mime_type: mime_from_url(url),
                            file_uri: url,
                        }),
                        ..Part::default()
                    });
                } else {
                    return Err(client_error(
                        call,
                        format!(
                            "messages[{index}]: image URLs must be http(s) or base64 `data:` URLs"
                        ),
                    ));
                }
            }
            ContentPart::File { file } => {
                if let Some(d) = file
                    .get("file_data")
                    .and_then(Value::as_str)
                    .and_then(data_url)
                {
                    out.push(Part {
                        inline_data: Some(wire::Blob {
                            mime_type: d.mime,
                            data: d.data,
                        }),
                        ..Part::default()
                    });
                }
            }
            ContentPart::InputAudio { input_audio } => {
                let data = input_audio.get("data").and_then(Value::as_str);
                let mime = match input_audio.get("format").and_then(Value::as_str) {
                    Some("mp3") => Some("audio/mp3"),
                    Some("wav") => Some("audio/wav"),
                    _ => None,
                };
                if let (Some(data), Some(mime_type)) = (data, mime) {
                    out.push(Part {
                        inline_data: Some(wire::Blob { mime_type, data }),
                        ..Part::default()
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Gemini's usage in OpenAI terms: thoughts are completion (reasoning) tokens, cached
/// content is part of the prompt count already.
fn to_usage(u: wire::UsageMetadata) -> Usage {
    let mut usage = Usage::new(
        u.prompt_token_count,
        // Saturating: upstream numbers, and a sum past u64 must not panic.
        u.candidates_token_count
            .saturating_add(u.thoughts_token_count),
    );
    usage.prompt_tokens_details = Some(PromptTokensDetails {
        cached_tokens: u.cached_content_token_count,
        cache_write_tokens: 0,
    });
    usage.completion_tokens_details = Some(CompletionTokensDetails {
        reasoning_tokens: u.thoughts_token_count,
    });
    usage
}

/// Turns `GenerateContentResponse`s into chunks; holds one answer's state (tool-call
/// ordinals per candidate, whether a finish was seen).
#[derive(Default)]
struct Translator {
    started: bool,
    finished: bool,
    tool_calls: HashMap<u32, u32>,
}

impl Translator {
    /// One response (or stream event) as a chunk; `None` when it carries nothing.
    /// `whole` is true for a non-stream answer.
    fn chunk(&mut self, resp: wire::Response, whole: bool) -> Option<ChatChunk> {
        let mut choices = Vec::new();
        for (pos, cand) in resp.candidates.into_iter().enumerate() {
            let index = cand.index.unwrap_or(pos as u32);
            let mut delta = Delta::default();
            let mut calls = Vec::new();
            for part in cand.content.into_iter().flat_map(|c| c.parts) {
                if let Some(fc) = part.function_call {
                    let ordinal = self.tool_calls.entry(index).or_default();
                    let arguments = match fc.args {
                        Some(v @ Value::Object(_)) => v.to_string(),
                        _ => "{}".to_string(),
                    };
                    let id = fc
                        .id
                        .filter(|id| !id.is_empty())
                        .unwrap_or_else(|| tool_call_id(*ordinal, &fc.name, &arguments));
                    calls.push(ToolCallDelta {
                        index: *ordinal,
                        id: Some(id),
                        kind: Some("function".into()),
                        function: Some(FunctionCallDelta {
                            name: Some(fc.name),
                            arguments: Some(arguments),
                        }),
                    });
                    *ordinal += 1;
                } else if let Some(text) = part.text.filter(|t| !t.is_empty()) {
                    let slot = if part.thought == Some(true) {
                        &mut delta.reasoning
                    } else {
                        &mut delta.content
                    };
                    slot.get_or_insert_with(String::new).push_str(&text);
                }
            }
            let called = self.tool_calls.get(&index).is_some_and(|n| *n > 0);
            let finish = cand
                .finish_reason
                .as_deref()
                .map(|r| finish_reason(r, called).to_string());
            if whole && delta.content.is_none() && calls.is_empty() {
                delta.content = Some(String::new());
            }
            delta.tool_calls = (!calls.is_empty()).then_some(calls);
            let empty = delta.content.is_none()
                && delta.reasoning.is_none()
                && delta.tool_calls.is_none()
                && finish.is_none();
            if !empty || whole {
                choices.push(ChunkChoice {
                    index,
                    delta,
                    finish_reason: finish,
                });
            }
        }
        if choices.is_empty() {
            if let Some(reason) = resp.prompt_feedback.and_then(|f| f.block_reason) {
                tracing::debug!(%reason, "gemini blocked the prompt");
                choices.push(ChunkChoice {
                    index: 0,
                    delta: Delta {
                        content: Some(String::new()),
                        ..Delta::default()
                    },
                    finish_reason: Some("content_filter".into()),
                });
            }
        }
        if choices.iter().any(|c| c.finish_reason.is_some()) {
            self.finished = true;
        }
        let usage = resp
            .usage_metadata
            .filter(|_| whole || self.finished)
            .map(to_usage);
        if choices.is_empty() && usage.is_none() {
            return None;
        }
        if !self.started {
            if let Some(first) = choices.first_mut() {
                first.delta.role = Some(Role::Assistant);
                self.started = true;
            }
        }
        Some(ChatChunk {
            object: "chat.completion.chunk".into(),
            choices,
            usage,
            ..ChatChunk::default()
        })
    }
}

fn in_band(provider: &Arc<str>, error: &Value) -> ProviderError {
    let message =
        super::default_error_message(serde_json::json!({ "error": error }).to_string().as_bytes());
    ProviderError::new(provider.clone(), FailureKind::InBand, message)
}

impl Adapter for GeminiAdapter {
    fn build_request(
        &self,
        call: &ProviderCall,
        stream: bool,
    ) -> Result<http::Request<Bytes>, ProviderError> {
        let key = optional_api_key(call)?;
        let (body, url) = match &call.request.inbound.embeddings {
            Some(e) => (embed::body(call, e)?, embed::url(call)),
            None => (wire_body(call)?, chat_url(call, stream)),
        };
        let mut req = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, crate::USER_AGENT);
        if let Some(key) = key {
            req = req.header("x-goog-api-key", key);
        }
        req.body(Bytes::from(body))
            .map_err(|e| protocol_error(call, e))
    }

    fn parse_response(&self, call: &ProviderCall, body: &[u8]) -> Result<ChatChunk, ProviderError> {
        if call.request.inbound.is_embeddings() {
            return embed::parse(call, body);
        }
        let wire: wire::Response = crate::chat::from_json(body)
            .map_err(|e| protocol_error(call, format!("not a GenerateContentResponse: {e}")))?;
        if let Some(err) = &wire.error {
            return Err(in_band(&call.endpoint.provider.name, err));
        }
        Translator::default()
            .chunk(wire, true)
            .ok_or_else(|| protocol_error(call, "an answer with no candidates"))
    }

    fn stream_decoder(&self, call: &ProviderCall) -> Box<dyn StreamDecoder> {
        Box::new(GeminiDecoder {
            provider: call.endpoint.provider.name.clone(),
            translator: Translator::default(),
        })
    }
}

/// The URL of a chat answer, streamed or not.
fn chat_url(call: &ProviderCall, stream: bool) -> String {
    let provider = &call.endpoint.provider;
    let model = model_name(call);
    if stream {
        provider.url(&format!(
            "v1beta/models/{model}:streamGenerateContent?alt=sse"
        ))
    } else {
        provider.url(&format!("v1beta/models/{model}:generateContent"))
    }
}

/// The state of one Gemini stream: each SSE event is a `GenerateContentResponse`.
struct GeminiDecoder {
    provider: Arc<str>,
    translator: Translator,
}

impl StreamDecoder for GeminiDecoder {
    fn decode(&mut self, _event: &str, data: &str) -> Result<Decoded, ProviderError> {
        let Some(resp) = crate::providers::parse_event::<wire::Response>(&self.provider, data)?
        else {
            return Ok(Decoded::Skip);
        };
        if let Some(err) = &resp.error {
            return Err(in_band(&self.provider, err));
        }
        Ok(match self.translator.chunk(resp, false) {
            Some(chunk) => Decoded::Chunk(chunk),
            None => Decoded::Skip,
        })
    }
}

#[cfg(test)]
mod tests;
