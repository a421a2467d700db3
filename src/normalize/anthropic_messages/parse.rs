//! An Anthropic Messages request body read into a [`ChatRequest`], checked field by
//! field with errors that name the field (SPEC §3.2, §7.1).
//!
//! The body is read once as a JSON object; the chat translation is built from it
//! and the object itself rides along in [`AnthropicInbound`] for anthropic-kind
//! upstreams, which get it with nothing lost.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::chat::{
    AnthropicInbound, ChatRequest, Content, ContentPart, Dialect, FunctionCall, FunctionDef,
    ImageUrl, Inbound, Message, Reasoning, Role, Stop, Tool, ToolCall,
};
use crate::error::GatewayError;
use crate::normalize::fields::{field, invalid as bad, object, wrong as want};

/// What a request body must carry: `/v1/messages` requires `max_tokens`,
/// `/v1/messages/count_tokens` does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Require {
    /// `POST /v1/messages`.
    MaxTokens,
    /// `POST /v1/messages/count_tokens`.
    Nothing,
}

fn string<'a>(
    o: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a str>, GatewayError> {
    match field(o, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(want(path, "a string", v)),
    }
}

fn number(o: &Map<String, Value>, key: &str) -> Result<Option<f64>, GatewayError> {
    match field(o, key) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(v) => Err(want(key, "a number", v)),
    }
}

/// Parses and checks a `/v1/messages` body (`anthropic-beta` from `headers`).
pub(crate) fn parse(
    bytes: &[u8],
    headers: &http::HeaderMap,
    require: Require,
) -> Result<ChatRequest, GatewayError> {
    let body: Value = crate::chat::from_json(bytes)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(body) = body else {
        return Err(want("body", "a JSON object", &body));
    };
    let mut req = translate(&body, require)?;
    req.validate().map_err(GatewayError::InvalidRequest)?;
    let beta = headers
        .get("anthropic-beta")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    req.inbound = Inbound {
        dialect: Dialect::AnthropicMessages,
        anthropic: Some(Arc::new(AnthropicInbound { body, beta })),
        ..Inbound::default()
    };
    Ok(req)
}

/// The chat request a Messages body means.
fn translate(body: &Map<String, Value>, require: Require) -> Result<ChatRequest, GatewayError> {
    let model = match field(body, "model") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) | None => {
            return Err(bad("`model` is required: a gateway model id"))
        }
        Some(v) => return Err(want("model", "a string", v)),
    };
    let max_tokens = match field(body, "max_tokens") {
        None if require == Require::MaxTokens => {
            return Err(bad("`max_tokens` is required (a positive integer)"))
        }
        None => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
            _ => return Err(want("max_tokens", "a positive integer", v)),
        },
    };
    let mut messages = Vec::new();
    if let Some(system) = field(body, "system") {
        messages.push(Message {
            content: Some(system_content(system)?),
            ..Message::text(Role::System, "")
        });
    }
    let turns = match field(body, "messages") {
        Some(Value::Array(turns)) => turns,
        Some(v) => return Err(want("messages", "an array", v)),
        None => return Err(bad("`messages` is required")),
    };
    if turns.is_empty() {
        return Err(bad("`messages` must contain at least one message"));
    }
    for (i, turn) in turns.iter().enumerate() {
        read_turn(turn, i, &mut messages)?;
    }

    let mut extra = Map::new();
    if let Some(k) = field(body, "top_k") {
        if k.as_u64().is_none() {
            return Err(want("top_k", "a non-negative integer", k));
        }
        extra.insert("top_k".into(), k.clone());
    }
    let tools = match field(body, "tools") {
        None => None,
        Some(Value::Array(tools)) => Some(read_tools(tools)?),
        Some(v) => return Err(want("tools", "an array", v)),
    };
    let tool_choice = match field(body, "tool_choice") {
        None => None,
        Some(v) => {
            let o = object(v, "tool_choice")?;
            if o.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
                extra.insert("parallel_tool_calls".into(), Value::Bool(false));
            }
            Some(match string(o, "type", "tool_choice.type")? {
                Some("auto") => Value::from("auto"),
                Some("any") => Value::from("required"),
                Some("none") => Value::from("none"),
                Some("tool") => {
                    let name = string(o, "name", "tool_choice.name")?.ok_or_else(|| {
                        bad("`tool_choice.name` is required when `tool_choice.type` is \"tool\"")
                    })?;
                    serde_json::json!({"type": "function", "function": {"name": name}})
                }
                other => {
                    return Err(bad(format!(
                        "`tool_choice.type` must be \"auto\", \"any\", \"tool\" or \"none\", got {other:?}"
                    )))
                }
            })
        }
    };
    let stop = match field(body, "stop_sequences") {
        None => None,
        Some(Value::Array(seqs)) => Some(Stop::Many(
            seqs.iter()
                .enumerate()
                .map(|(i, s)| {
                    s.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| want(&format!("stop_sequences[{i}]"), "a string", s))
                })
                .collect::<Result<_, _>>()?,
        )),
        Some(v) => return Err(want("stop_sequences", "an array of strings", v)),
    };
    let user = match field(body, "metadata") {
        None => None,
        Some(v) => {
            string(object(v, "metadata")?, "user_id", "metadata.user_id")?.map(str::to_owned)
        }
    };
    let reasoning = match field(body, "thinking") {
        None => None,
        Some(v) => {
            let o = object(v, "thinking")?;
            match string(o, "type", "thinking.type")? {
                Some("enabled") => {
                    let budget = match field(o, "budget_tokens") {
                        Some(b) => match b.as_u64().and_then(|n| u32::try_from(n).ok()) {
                            Some(n) => Some(n),
                            None => {
                                return Err(want("thinking.budget_tokens", "a positive integer", b))
                            }
                        },
                        None => None,
                    };
                    Some(Reasoning {
                        max_tokens: budget,
                        enabled: Some(true),
                        ..Reasoning::default()
                    })
                }
                Some("disabled") => Some(Reasoning {
                    enabled: Some(false),
                    ..Reasoning::default()
                }),
                // Newer kinds (e.g. "adaptive") reach anthropic-kind upstreams as sent.
                Some(_) => None,
                None => return Err(bad("`thinking.type` is required")),
            }
        }
    };
    let stream = match field(body, "stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(want("stream", "a boolean", v)),
    };
    Ok(ChatRequest {
        model,
        messages,
        max_tokens,
        temperature: number(body, "temperature")?,
        top_p: number(body, "top_p")?,
        stop,
        tools,
        tool_choice,
        user,
        stream,
        reasoning,
        extra,
        ..ChatRequest::default()
    })
}

/// `system`: a string, or text blocks (their `cache_control` kept on the parts).
fn system_content(system: &Value) -> Result<Content, GatewayError> {
    match system {
        Value::String(s) => Ok(Content::Text(s.clone())),
        Value::Array(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (j, b) in blocks.iter().enumerate() {
                let path = format!("system[{j}]");
                let o = object(b, &path)?;
                match string(o, "type", &format!("{path}.type"))? {
                    Some("text") => parts.push(text_part(o, &path)?),
                    other => {
                        return Err(bad(format!(
                            "`{path}.type` must be \"text\", got {other:?}"
                        )))
                    }
                }
            }
            Ok(Content::Parts(parts))
        }
        v => Err(want("system", "a string or an array of text blocks", v)),
    }
}

/// A `text` block as a text part, `cache_control` (and `citations`) in its extra.
fn text_part(o: &Map<String, Value>, path: &str) -> Result<ContentPart, GatewayError> {
    let text = string(o, "text", &format!("{path}.text"))?
        .ok_or_else(|| bad(format!("`{path}.text` is required")))?;
    let mut extra = Map::new();
    if let Some(cc) = field(o, "cache_control") {
        extra.insert("cache_control".into(), cc.clone());
    }
    Ok(ContentPart::Text {
        text: text.to_owned(),
        extra,
    })
}

/// An `image` block (base64 → `data:` URL; url source) as an image part.
fn image_part(o: &Map<String, Value>, path: &str) -> Result<ContentPart, GatewayError> {
    let source_path = format!("{path}.source");
    let source = object(
        field(o, "source").ok_or_else(|| bad(format!("`{source_path}` is required")))?,
        &source_path,
    )?;
    let required = |key: &str| -> Result<&str, GatewayError> {
        string(source, key, &format!("{source_path}.{key}"))?
            .ok_or_else(|| bad(format!("`{source_path}.{key}` is required")))
    };
    let url = match string(source, "type", &format!("{source_path}.type"))? {
        Some("base64") => format!(
            "data:{};base64,{}",
            required("media_type")?,
            required("data")?
        ),
        Some("url") => required("url")?.to_owned(),
        other => {
            return Err(bad(format!(
                "`{source_path}.type` must be \"base64\" or \"url\", got {other:?}"
            )))
        }
    };
    let mut extra = Map::new();
    if let Some(cc) = field(o, "cache_control") {
        extra.insert("cache_control".into(), cc.clone());
    }
    Ok(ContentPart::ImageUrl {
        image_url: ImageUrl { url, detail: None },
        extra,
    })
}

/// Content parts as chat content: plain text when no part carries anything else.
fn parts_content(parts: Vec<ContentPart>) -> Content {
    let plain = parts
        .iter()
        .all(|p| matches!(p, ContentPart::Text { extra, .. } if extra.is_empty()));
    if plain {
        Content::Text(
            parts
                .into_iter()
                .filter_map(|p| match p {
                    ContentPart::Text { text, .. } => Some(text),
                    _ => None,
                })
                .collect(),
        )
    } else {
        Content::Parts(parts)
    }
}

/// One turn, appended as chat messages: a user turn's `tool_result` blocks become
/// `tool` messages ahead of its other content; an assistant turn's `tool_use` blocks
/// its tool calls; `thinking` / `redacted_thinking` blocks have no chat form (an
/// anthropic-kind upstream gets them from the body as sent).
fn read_turn(turn: &Value, i: usize, out: &mut Vec<Message>) -> Result<(), GatewayError> {
    let path = format!("messages[{i}]");
    let o = object(turn, &path)?;
    let role = match string(o, "role", &format!("{path}.role"))? {
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        other => {
            return Err(bad(format!(
                "`{path}.role` must be \"user\" or \"assistant\", got {other:?}"
            )))
        }
    };
    let blocks = match field(o, "content") {
        Some(Value::String(s)) => {
            out.push(Message::text(role, s.clone()));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        Some(v) => {
            return Err(want(
                &format!("{path}.content"),
                "a string or an array of content blocks",
                v,
            ))
        }
        None => return Err(bad(format!("`{path}.content` is required"))),
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let path = format!("{path}.content[{j}]");
        let o = object(b, &path)?;
        let kind = string(o, "type", &format!("{path}.type"))?
            .ok_or_else(|| bad(format!("`{path}.type` is required")))?;
        match (kind, role) {
            ("text", _) => parts.push(text_part(o, &path)?),
            ("image", Role::User) => parts.push(image_part(o, &path)?),
            ("tool_result", Role::User) => out.push(tool_result(o, &path)?),
            ("tool_use", Role::Assistant) => {
                let id = string(o, "id", &format!("{path}.id"))?
                    .ok_or_else(|| bad(format!("`{path}.id` is required")))?;
                let name = string(o, "name", &format!("{path}.name"))?
                    .ok_or_else(|| bad(format!("`{path}.name` is required")))?;
                let arguments = match field(o, "input") {
                    None => "{}".to_owned(),
                    Some(v @ Value::Object(_)) => v.to_string(),
                    Some(v) => return Err(want(&format!("{path}.input"), "an object", v)),
                };
                calls.push(ToolCall {
                    id: id.to_owned(),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: name.to_owned(),
                        arguments,
                    },
                });
            }
            ("thinking" | "redacted_thinking", Role::Assistant) => {}
            ("image" | "tool_result" | "thinking" | "redacted_thinking" | "tool_use", _) => {
                return Err(bad(format!(
                    "`{path}`: a `{kind}` block cannot be in a `{}` turn",
                    role.as_str()
                )))
            }
            // Documents, search results, server tools…: no chat form; anthropic-kind
            // upstreams get them as sent.
            _ => {}
        }
    }
    let has_calls = !calls.is_empty();
    if !parts.is_empty() || (role == Role::Assistant && !has_calls) {
        out.push(Message {
            content: Some(parts_content(parts)),
            tool_calls: has_calls.then_some(calls),
            ..Message::text(role, "")
        });
    } else if has_calls {
        out.push(Message {
            content: None,
            tool_calls: Some(calls),
            ..Message::text(role, "")
        });
    }
    Ok(())
}

/// A `tool_result` block as a `tool` message (`is_error` kept in its extra).
fn tool_result(o: &Map<String, Value>, path: &str) -> Result<Message, GatewayError> {
    let id = string(o, "tool_use_id", &format!("{path}.tool_use_id"))?
        .ok_or_else(|| bad(format!("`{path}.tool_use_id` is required")))?;
    let content = match field(o, "content") {
        None => Content::Text(String::new()),
        Some(Value::String(s)) => Content::Text(s.clone()),
        Some(Value::Array(blocks)) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (k, b) in blocks.iter().enumerate() {
                let path = format!("{path}.content[{k}]");
                let bo = object(b, &path)?;
                match string(bo, "type", &format!("{path}.type"))? {
                    Some("text") => parts.push(text_part(bo, &path)?),
                    Some("image") => parts.push(image_part(bo, &path)?),
                    _ => {}
                }
            }
            parts_content(parts)
        }
        Some(v) => {
            return Err(want(
                &format!("{path}.content"),
                "a string or an array of content blocks",
                v,
            ))
        }
    };
    let mut m = Message {
        content: Some(content),
        tool_call_id: Some(id.to_owned()),
        ..Message::text(Role::Tool, "")
    };
    if let Some(e) = field(o, "is_error") {
        m.extra.insert("is_error".into(), e.clone());
    }
    Ok(m)
}

/// `tools`: custom tools as functions (`input_schema` → parameters, `cache_control`
/// into the function's extra); server tools (a `type` other than `custom`) have no
/// chat form and reach only anthropic-kind upstreams.
fn read_tools(tools: &[Value]) -> Result<Vec<Tool>, GatewayError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let path = format!("tools[{i}]");
        let o = object(t, &path)?;
        match string(o, "type", &format!("{path}.type"))? {
            None | Some("custom") => {}
            Some(_) => continue,
        }
        let name = string(o, "name", &format!("{path}.name"))?
            .ok_or_else(|| bad(format!("`{path}.name` is required")))?;
        let parameters = match field(o, "input_schema") {
            None => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(v) => return Err(want(&format!("{path}.input_schema"), "an object", v)),
        };
        let mut extra = Map::new();
        if let Some(cc) = field(o, "cache_control") {
            extra.insert("cache_control".into(), cc.clone());
        }
        out.push(Tool {
            kind: "function".into(),
            function: FunctionDef {
                name: name.to_owned(),
                description: string(o, "description", &format!("{path}.description"))?
                    .map(str::to_owned),
                parameters,
                extra,
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parsed(body: Value) -> Result<ChatRequest, GatewayError> {
        let mut h = http::HeaderMap::new();
        h.insert(
            "anthropic-beta",
            "prompt-caching-2024-07-31".parse().unwrap(),
        );
        parse(body.to_string().as_bytes(), &h, Require::MaxTokens)
    }

    fn message_of(err: GatewayError) -> String {
        assert_eq!(err.code(), "invalid_request", "{err}");
        err.to_string()
    }

    #[test]
    fn a_full_request_maps_onto_chat() {
        let body = json!({
            "model": "anthropic/claude", "max_tokens": 300, "top_k": 5,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}
                ]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "sig"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": 1}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "found", "is_error": true},
                    {"type": "text", "text": "and?"}
                ]}
            ],
            "tools": [{"name": "look", "description": "Looks", "input_schema": {"type": "object"},
                       "cache_control": {"type": "ephemeral"}},
                      {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"], "temperature": 0.5, "top_p": 0.9,
            "metadata": {"user_id": "u-1"},
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "stream": true
        });
        let req = parsed(body.clone()).unwrap();
        assert_eq!(req.model, "anthropic/claude");
        assert_eq!(req.max_tokens, Some(300));
        assert_eq!(req.extra["top_k"], 5);
        assert_eq!(req.extra["parallel_tool_calls"], false);
        assert_eq!(req.tool_choice, Some(json!("required")));
        assert_eq!(req.stop, Some(Stop::Many(vec!["END".into()])));
        assert_eq!(req.user.as_deref(), Some("u-1"));
        assert_eq!(req.reasoning.as_ref().unwrap().max_tokens, Some(2048));
        assert!(req.stream);
        let roles: Vec<Role> = req.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::User
            ]
        );
        let Some(Content::Parts(system)) = &req.messages[0].content else {
            panic!("system parts")
        };
        assert!(
            matches!(&system[0], ContentPart::Text { extra, .. } if extra.contains_key("cache_control"))
        );
        let Some(Content::Parts(user)) = &req.messages[1].content else {
            panic!("user parts")
        };
        assert!(
            matches!(&user[1], ContentPart::ImageUrl { image_url, .. } if image_url.url == "data:image/png;base64,AAAA")
        );
        assert!(
            matches!(&user[2], ContentPart::ImageUrl { image_url, .. } if image_url.url == "https://x.test/a.png")
        );
        let assistant = &req.messages[2];
        assert_eq!(
            assistant.content,
            Some(Content::Text("Let me look.".into()))
        );
        let call = &assistant.tool_calls.as_ref().unwrap()[0];
        assert_eq!(
            (call.id.as_str(), call.function.arguments.as_str()),
            ("toolu_1", r#"{"q":1}"#)
        );
        let tool = &req.messages[3];
        assert_eq!(tool.tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(tool.extra["is_error"], true);
        let tools = req.tools.as_ref().unwrap();
        assert_eq!(tools.len(), 1, "server tools have no chat form");
        assert_eq!(
            tools[0].function.parameters,
            Some(json!({"type": "object"}))
        );
        assert!(tools[0].function.extra.contains_key("cache_control"));
        let inbound = req.inbound.anthropic.as_ref().unwrap();
        assert_eq!(Value::Object(inbound.body.clone()), body);
        assert_eq!(inbound.beta.as_deref(), Some("prompt-caching-2024-07-31"));
        assert_eq!(req.inbound.dialect, Dialect::AnthropicMessages);
    }

    #[test]
    fn tool_choices_and_thinking_off_map() {
        let base = |extra: Value| {
            let mut b = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            parsed(b).unwrap()
        };
        assert_eq!(
            base(json!({"tool_choice": {"type": "auto"}})).tool_choice,
            Some(json!("auto"))
        );
        assert_eq!(
            base(json!({"tool_choice": {"type": "none"}})).tool_choice,
            Some(json!("none"))
        );
        assert_eq!(
            base(json!({"tool_choice": {"type": "tool", "name": "f"}})).tool_choice,
            Some(json!({"type": "function", "function": {"name": "f"}}))
        );
        assert_eq!(
            base(json!({"thinking": {"type": "disabled"}}))
                .reasoning
                .unwrap()
                .enabled,
            Some(false)
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let ok =
            json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]});
        let with = |k: &str, v: Value| {
            let mut b = ok.clone();
            b[k] = v;
            b
        };
        let mut no_max = ok.clone();
        no_max.as_object_mut().unwrap().remove("max_tokens");
        let cases = [
            (no_max, "max_tokens"),
            (with("max_tokens", json!(0)), "max_tokens"),
            (with("max_tokens", json!("10")), "max_tokens"),
            (with("messages", json!([])), "at least one"),
            (with("messages", json!({})), "messages"),
            (
                with("messages", json!([{"role": "system", "content": "x"}])),
                "messages[0].role",
            ),
            (
                with("messages", json!([{"role": "user", "content": 5}])),
                "messages[0].content",
            ),
            (
                with(
                    "messages",
                    json!([{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]),
                ),
                "messages[0].content[0].source.type",
            ),
            (
                with(
                    "messages",
                    json!([{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]),
                ),
                "messages[0].content[0]",
            ),
            (
                with(
                    "messages",
                    json!([{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": []}]}]),
                ),
                "messages[0].content[0].input",
            ),
            (with("system", json!(3)), "system"),
            (
                with("tool_choice", json!({"type": "sometimes"})),
                "tool_choice.type",
            ),
            (with("stop_sequences", json!("END")), "stop_sequences"),
            (with("temperature", json!("hot")), "temperature"),
            (with("stream", json!("yes")), "stream"),
            (
                with("thinking", json!({"type": "enabled", "budget_tokens": -1})),
                "thinking.budget_tokens",
            ),
            (with("model", json!(7)), "model"),
        ];
        for (body, needle) in cases {
            let m = message_of(parsed(body.clone()).expect_err(&body.to_string()));
            assert!(m.contains(needle), "{body}: {m}");
        }
        let m =
            message_of(parse(b"{nope", &http::HeaderMap::new(), Require::MaxTokens).unwrap_err());
        assert!(m.contains("not valid JSON"), "{m}");
        // count_tokens does not need max_tokens.
        let mut no_max = ok.clone();
        no_max.as_object_mut().unwrap().remove("max_tokens");
        assert!(parse(
            no_max.to_string().as_bytes(),
            &http::HeaderMap::new(),
            Require::Nothing
        )
        .is_ok());
    }

    #[test]
    fn an_assistant_turn_of_thinking_only_still_validates() {
        let req = parsed(json!({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "zz"}]},
            {"role": "user", "content": "y"}
        ]}))
        .unwrap();
        assert_eq!(req.messages[1].content, Some(Content::Text(String::new())));
    }
}
