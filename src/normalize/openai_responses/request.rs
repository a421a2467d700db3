//! A Responses request body read into the chat schema: `input` items become
//! messages, `instructions` a leading system message, `tools`, `tool_choice`,
//! `text.format` and `reasoning` their chat counterparts.
//!
//! Every error is a 400 `invalid_request` that names the field (its JSON path) and
//! says what was expected. Fields the gateway does not serve in a stateless way
//! (`previous_response_id`, `conversation`, `background`, stored files, hosted tools)
//! are refused rather than ignored; other unknown fields are ignored.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::chat::json_kind as kind;
use crate::chat::{
    ChatRequest, Content, ContentPart, Dialect, FunctionCall, FunctionDef, ImageUrl, Inbound,
    Message, Reasoning, ResponsesInbound, Role, Tool, ToolCall,
};
use crate::error::GatewayError;
use crate::normalize::fields::{field, invalid, object, wrong};

/// The message of a request that names `previous_response_id`.
pub const PREVIOUS_RESPONSE_ID: &str = "previous_response_id is not supported: this gateway is stateless; send the whole conversation in `input`";

/// The top-level fields a `response` object echoes as the client sent them.
const ECHOED: &[&str] = &[
    "instructions",
    "tools",
    "tool_choice",
    "temperature",
    "top_p",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "text",
    "reasoning",
    "user",
];

fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    path: &str,
) -> Result<Option<&'a str>, GatewayError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(wrong(&format!("{path}{name}"), "a string", v)),
    }
}

fn req_str<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    path: &str,
) -> Result<&'a str, GatewayError> {
    opt_str(obj, name, path)?
        .ok_or_else(|| invalid(format!("`{path}{name}` is required (a string)")))
}

fn opt_bool(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, GatewayError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong(name, "a boolean", v)),
    }
}

fn opt_f64(obj: &Map<String, Value>, name: &str) -> Result<Option<f64>, GatewayError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(v) => Err(wrong(name, "a number", v)),
    }
}

/// Parses and checks a `POST /v1/responses` body into a chat request.
pub(crate) fn parse(bytes: &[u8], _headers: &http::HeaderMap) -> Result<ChatRequest, GatewayError> {
    let body: Value = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(body) = body else {
        return Err(invalid(format!(
            "the body must be a JSON object, got {}",
            kind(&body)
        )));
    };
    if field(&body, "previous_response_id").is_some() {
        return Err(invalid(PREVIOUS_RESPONSE_ID));
    }
    if field(&body, "conversation").is_some() {
        return Err(invalid(
            "conversation is not supported: this gateway is stateless; send the whole conversation in `input`",
        ));
    }
    if opt_bool(&body, "background")? == Some(true) {
        return Err(invalid(
            "background is not supported: this gateway stores no responses; send the request without `background` (stream it for long answers)",
        ));
    }
    let model = req_str(&body, "model", "")?;
    if model.trim().is_empty() {
        return Err(invalid("`model` must be a non-empty string"));
    }

    let mut messages = Vec::new();
    if let Some(instructions) = opt_str(&body, "instructions", "")? {
        messages.push(Message::text(Role::System, instructions));
    }
    match field(&body, "input") {
        None => {
            return Err(invalid(
                "`input` is required (a string or an array of items)",
            ))
        }
        Some(Value::String(s)) => messages.push(Message::text(Role::User, s.as_str())),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                push_item(&mut messages, item, &format!("input[{i}]"))?;
            }
        }
        Some(v) => return Err(wrong("input", "a string or an array of items", v)),
    }
    if !messages.iter().any(|m| m.role != Role::System) {
        return Err(invalid("`input` must contain at least one message or item"));
    }

    let tools = match field(&body, "tools") {
        None => None,
        Some(Value::Array(list)) => Some(
            list.iter()
                .enumerate()
                .map(|(i, t)| tool(t, &format!("tools[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(v) => return Err(wrong("tools", "an array", v)),
    };
    let tool_choice = field(&body, "tool_choice").map(tool_choice).transpose()?;
    let max_output_tokens = match field(&body, "max_output_tokens") {
        None => None,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n >= 1 => Some(n),
            _ => {
                return Err(invalid(format!(
                    "`max_output_tokens` must be a positive integer, got {v}"
                )))
            }
        },
    };
    let response_format = match field(&body, "text") {
        None => None,
        Some(text) => {
            let text = object(text, "text")?;
            text.get("format")
                .filter(|f| !f.is_null())
                .map(response_format)
                .transpose()?
        }
    };
    let effort = match field(&body, "reasoning") {
        None => None,
        Some(r) => opt_str(object(r, "reasoning")?, "effort", "reasoning.")?.map(str::to_owned),
    };
    if let Some(m) = field(&body, "metadata") {
        let m = object(m, "metadata")?;
        if let Some((k, v)) = m.iter().find(|(_, v)| !v.is_string()) {
            return Err(wrong(&format!("metadata.{k}"), "a string", v));
        }
    }
    let user = opt_str(&body, "user", "")?.map(str::to_owned);
    let stream = opt_bool(&body, "stream")?.unwrap_or(false);
    // Accepted; nothing is ever stored (the answer says `store: false`).
    opt_bool(&body, "store")?;
    let mut extra = Map::new();
    if let Some(p) = opt_bool(&body, "parallel_tool_calls")? {
        extra.insert("parallel_tool_calls".into(), Value::Bool(p));
    }
    if let Some(v) = field(&body, "text").and_then(|t| t.get("verbosity")) {
        if !v.is_null() {
            extra.insert("verbosity".into(), v.clone());
        }
    }
    // OpenRouter's routing extensions work here as on chat completions (SPEC §7).
    let models = match field(&body, "models") {
        None => None,
        Some(v) => Some(
            serde_json::from_value::<Vec<String>>(v.clone())
                .map_err(|_| wrong("models", "an array of model ids", v))?,
        ),
    };
    let provider = match field(&body, "provider") {
        None => None,
        Some(v) => Some(
            serde_json::from_value(v.clone())
                .map_err(|e| invalid(format!("invalid `provider`: {e}")))?,
        ),
    };

    let echo: Map<String, Value> = ECHOED
        .iter()
        .filter_map(|k| body.get(*k).map(|v| ((*k).to_owned(), v.clone())))
        .collect();
    let req = ChatRequest {
        model: model.to_owned(),
        messages,
        models,
        provider,
        max_completion_tokens: max_output_tokens,
        temperature: opt_f64(&body, "temperature")?,
        top_p: opt_f64(&body, "top_p")?,
        tools,
        tool_choice,
        response_format,
        user,
        stream,
        reasoning_effort: effort.clone(),
        reasoning: effort.map(|effort| Reasoning {
            effort: Some(effort),
            ..Reasoning::default()
        }),
        inbound: Inbound {
            dialect: Dialect::OpenAiResponses,
            responses: Some(Arc::new(ResponsesInbound { echo })),
            ..Inbound::default()
        },
        extra,
        ..ChatRequest::default()
    };
    req.validate().map_err(invalid)?;
    Ok(req)
}

/// Appends one `input` item: a message, a function call (merged into the assistant
/// turn before it), a function call's output (a `tool` message); reasoning items
/// are dropped (their text cannot be replayed to another model).
fn push_item(messages: &mut Vec<Message>, item: &Value, path: &str) -> Result<(), GatewayError> {
    let obj = object(item, path)?;
    // `{"role", "content"}` without `type` is a message (the "easy" input form).
    let ty = opt_str(obj, "type", &format!("{path}."))?.unwrap_or("message");
    match ty {
        "message" => messages.push(message(obj, path)?),
        "function_call" => {
            let p = format!("{path}.");
            let call = ToolCall {
                id: req_str(obj, "call_id", &p)?.to_owned(),
                kind: "function".into(),
                function: FunctionCall {
                    name: req_str(obj, "name", &p)?.to_owned(),
                    arguments: req_str(obj, "arguments", &p)?.to_owned(),
                },
            };
            match messages.last_mut() {
                Some(m) if m.role == Role::Assistant => {
                    m.tool_calls.get_or_insert_with(Vec::new).push(call)
                }
                _ => messages.push(Message {
                    role: Role::Assistant,
                    content: None,
                    name: None,
                    tool_calls: Some(vec![call]),
                    tool_call_id: None,
                    extra: Map::new(),
                }),
            }
        }
        "function_call_output" => {
            let p = format!("{path}.");
            let call_id = req_str(obj, "call_id", &p)?;
            let output = match field(obj, "output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        let pp = format!("{path}.output[{j}]");
                        let part = object(part, &pp)?;
                        match part.get("type").and_then(Value::as_str) {
                            Some("input_text" | "output_text") => {
                                text.push_str(req_str(part, "text", &format!("{pp}."))?)
                            }
                            other => {
                                return Err(invalid(format!(
                                    "`{pp}`: a function call output part of type {} is not supported; send text (`input_text`)",
                                    other.map_or("(none)".to_owned(), |t| format!("`{t}`"))
                                )))
                            }
                        }
                    }
                    text
                }
                Some(v) => return Err(wrong(&format!("{p}output"), "a string", v)),
                None => return Err(invalid(format!("`{p}output` is required (a string)"))),
            };
            messages.push(Message {
                role: Role::Tool,
                content: Some(Content::Text(output)),
                name: None,
                tool_calls: None,
                tool_call_id: Some(call_id.to_owned()),
                extra: Map::new(),
            });
        }
        "reasoning" => {}
        "item_reference" => {
            return Err(invalid(format!(
                "`{path}`: item_reference is not supported: this gateway is stateless; send the item itself"
            )))
        }
        other => {
            return Err(invalid(format!(
                "`{path}.type`: input items of type `{other}` are not supported; send `message`, `function_call`, `function_call_output` or `reasoning` items"
            )))
        }
    }
    Ok(())
}

/// A `message` item: role and content (a string, or `input_text` / `input_image` /
/// `input_file` parts; `output_text` / `refusal` parts on assistant turns).
fn message(obj: &Map<String, Value>, path: &str) -> Result<Message, GatewayError> {
    let role = match req_str(obj, "role", &format!("{path}."))? {
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "system" => Role::System,
        "developer" => Role::Developer,
        other => {
            return Err(invalid(format!(
                "`{path}.role` must be \"user\", \"assistant\", \"system\" or \"developer\", got {other:?}"
            )))
        }
    };
    let content = match field(obj, "content") {
        Some(Value::String(s)) => Content::Text(s.clone()),
        Some(Value::Array(parts)) => {
            let parts = parts
                .iter()
                .enumerate()
                .map(|(j, p)| part(p, &format!("{path}.content[{j}]")))
                .collect::<Result<Vec<_>, _>>()?;
            if role == Role::Assistant {
                // Assistant history is text: its parts joined.
                Content::Text(Content::Parts(parts).text().into_owned())
            } else {
                Content::Parts(parts)
            }
        }
        Some(v) => {
            return Err(wrong(
                &format!("{path}.content"),
                "a string or an array of content parts",
                v,
            ))
        }
        None => return Err(invalid(format!("`{path}.content` is required"))),
    };
    Ok(Message {
        role,
        content: Some(content),
        name: None,
        tool_calls: None,
        tool_call_id: None,
        extra: Map::new(),
    })
}

/// One content part of a message item.
fn part(v: &Value, path: &str) -> Result<ContentPart, GatewayError> {
    let obj = object(v, path)?;
    let p = format!("{path}.");
    let no_files = |what: &str| {
        invalid(format!(
            "`{path}.file_id`: {what} by `file_id` are not supported: this gateway stores no files; send the {what} inline"
        ))
    };
    match req_str(obj, "type", &p)? {
        "input_text" | "output_text" | "text" => Ok(ContentPart::Text {
            text: req_str(obj, "text", &p)?.to_owned(),
            extra: Map::new(),
        }),
        "refusal" => Ok(ContentPart::Text {
            text: req_str(obj, "refusal", &p)?.to_owned(),
            extra: Map::new(),
        }),
        "input_image" => {
            if field(obj, "file_id").is_some() {
                return Err(no_files("images (`image_url`: a URL or a data: URL)"));
            }
            let url = opt_str(obj, "image_url", &p)?.ok_or_else(|| {
                invalid(format!(
                    "`{p}image_url` is required (a URL or a data: URL)"
                ))
            })?;
            Ok(ContentPart::ImageUrl {
                image_url: ImageUrl {
                    url: url.to_owned(),
                    detail: opt_str(obj, "detail", &p)?.map(str::to_owned),
                },
                extra: Map::new(),
            })
        }
        "input_file" => {
            if field(obj, "file_id").is_some() {
                return Err(no_files("files (`file_data`: a data: URL)"));
            }
            let data = opt_str(obj, "file_data", &p)?.ok_or_else(|| {
                invalid(format!(
                    "`{p}file_data` is required (a data: URL; `file_url` and `file_id` are not supported)"
                ))
            })?;
            let mut file = Map::new();
            file.insert("file_data".into(), Value::String(data.to_owned()));
            if let Some(name) = opt_str(obj, "filename", &p)? {
                file.insert("filename".into(), Value::String(name.to_owned()));
            }
            Ok(ContentPart::File {
                file: Value::Object(file),
            })
        }
        other => Err(invalid(format!(
            "`{p}type`: content parts of type `{other}` are not supported; send `input_text`, `input_image` or `input_file`"
        ))),
    }
}

/// A `tools` entry: `{"type":"function","name","description","parameters","strict"}`.
fn tool(v: &Value, path: &str) -> Result<Tool, GatewayError> {
    let obj = object(v, path)?;
    let p = format!("{path}.");
    match req_str(obj, "type", &p)? {
        "function" => {}
        other => {
            return Err(invalid(format!(
                "`{p}type`: tools of type `{other}` are not supported: only `function` tools are (this gateway runs no hosted tools)"
            )))
        }
    }
    let parameters = match field(obj, "parameters") {
        None => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(v) => return Err(wrong(&format!("{p}parameters"), "a JSON schema object", v)),
    };
    let mut extra = Map::new();
    match field(obj, "strict") {
        None => {}
        Some(Value::Bool(b)) => {
            extra.insert("strict".into(), Value::Bool(*b));
        }
        Some(v) => return Err(wrong(&format!("{p}strict"), "a boolean", v)),
    }
    Ok(Tool {
        kind: "function".into(),
        function: FunctionDef {
            name: req_str(obj, "name", &p)?.to_owned(),
            description: opt_str(obj, "description", &p)?.map(str::to_owned),
            parameters,
            extra,
        },
    })
}

/// `tool_choice`: `"auto" | "none" | "required"` or `{"type":"function","name"}`, in
/// chat's form.
fn tool_choice(v: &Value) -> Result<Value, GatewayError> {
    const WANT: &str = r#""auto", "none", "required" or {"type":"function","name":"..."}"#;
    match v {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => Ok(v.clone()),
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = req_str(o, "name", "tool_choice.")?;
                Ok(serde_json::json!({"type": "function", "function": {"name": name}}))
            }
            Some(other) => Err(invalid(format!(
                "`tool_choice.type`: `{other}` is not supported; use {WANT}"
            ))),
            None => Err(invalid(format!(
                "`tool_choice.type` must be a string; use {WANT}"
            ))),
        },
        other => Err(invalid(format!(
            "`tool_choice` must be {WANT}, got {}",
            match other {
                Value::String(s) => format!("the string {s:?}"),
                v => kind(v).to_owned(),
            }
        ))),
    }
}

/// `text.format` in chat's `response_format` form.
fn response_format(v: &Value) -> Result<Value, GatewayError> {
    let obj = object(v, "text.format")?;
    match req_str(obj, "type", "text.format.")? {
        "text" => Ok(serde_json::json!({"type": "text"})),
        "json_object" => Ok(serde_json::json!({"type": "json_object"})),
        "json_schema" => {
            let mut schema = Map::new();
            schema.insert(
                "name".into(),
                Value::String(req_str(obj, "name", "text.format.")?.to_owned()),
            );
            match field(obj, "schema") {
                Some(s @ Value::Object(_)) => {
                    schema.insert("schema".into(), s.clone());
                }
                Some(s) => return Err(wrong("text.format.schema", "a JSON schema object", s)),
                None => {
                    return Err(invalid(
                        "`text.format.schema` is required when `type` is \"json_schema\"",
                    ))
                }
            }
            if let Some(d) = opt_str(obj, "description", "text.format.")? {
                schema.insert("description".into(), Value::String(d.to_owned()));
            }
            match field(obj, "strict") {
                None => {}
                Some(Value::Bool(b)) => {
                    schema.insert("strict".into(), Value::Bool(*b));
                }
                Some(s) => return Err(wrong("text.format.strict", "a boolean", s)),
            }
            Ok(serde_json::json!({"type": "json_schema", "json_schema": schema}))
        }
        other => Err(invalid(format!(
            "`text.format.type` must be \"text\", \"json_object\" or \"json_schema\", got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(v: Value) -> Result<ChatRequest, GatewayError> {
        parse(v.to_string().as_bytes(), &http::HeaderMap::new())
    }

    fn err(v: Value) -> String {
        match parse_json(v) {
            Ok(r) => panic!("parsed: {r:?}"),
            Err(e) => {
                assert_eq!(e.code(), "invalid_request");
                e.to_string()
            }
        }
    }

    #[test]
    fn a_string_input_is_one_user_message_after_the_instructions() {
        let r = parse_json(
            json!({"model": "m", "input": "hi", "instructions": "Be brief.",
                                  "max_output_tokens": 20, "temperature": 0.5, "top_p": 0.9,
                                  "user": "u1", "stream": true, "store": true}),
        )
        .unwrap();
        assert_eq!(r.inbound.dialect, Dialect::OpenAiResponses);
        assert_eq!(r.messages.len(), 2);
        assert_eq!(r.messages[0].role, Role::System);
        assert_eq!(
            r.messages[0].content,
            Some(Content::Text("Be brief.".into()))
        );
        assert_eq!(r.messages[1].role, Role::User);
        assert_eq!(r.max_completion_tokens, Some(20));
        assert_eq!((r.temperature, r.top_p), (Some(0.5), Some(0.9)));
        assert_eq!(r.user.as_deref(), Some("u1"));
        assert!(r.stream);
        assert!(
            r.extra.is_empty(),
            "store is not sent upstream: {:?}",
            r.extra
        );
        let echo = &r.inbound.responses.as_ref().unwrap().echo;
        assert_eq!(echo["instructions"], "Be brief.");
        assert!(!echo.contains_key("store"));
    }

    #[test]
    fn items_become_messages_with_calls_merged_and_reasoning_dropped() {
        let r = parse_json(json!({"model": "m", "input": [
            {"role": "developer", "content": "rules"},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "weather?"},
                {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"}
            ]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]}
        ]}))
        .unwrap();
        let roles: Vec<Role> = r.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::Developer,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::Tool
            ]
        );
        let a = &r.messages[2];
        assert_eq!(a.content, Some(Content::Text("Checking.".into())));
        let calls = a.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].id.as_str(), calls[1].id.as_str()), ("c1", "c2"));
        assert_eq!(calls[0].function.arguments, "{\"city\":\"Paris\"}");
        assert_eq!(r.messages[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(r.messages[4].content, Some(Content::Text("rain".into())));
        match &r.messages[1].content {
            Some(Content::Parts(p)) => assert!(matches!(
                &p[1],
                ContentPart::ImageUrl { image_url, .. } if image_url.url == "https://x/y.png" && image_url.detail.as_deref() == Some("low")
            )),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tools_choice_format_and_effort_take_their_chat_forms() {
        let r = parse_json(json!({"model": "m", "input": "x",
            "tools": [{"type": "function", "name": "w", "description": "d",
                       "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "w"},
            "parallel_tool_calls": false,
            "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": true}},
            "reasoning": {"effort": "low", "summary": "auto"}}))
        .unwrap();
        let t = &r.tools.as_ref().unwrap()[0];
        assert_eq!(t.function.name, "w");
        assert_eq!(t.function.extra["strict"], true);
        assert_eq!(
            r.tool_choice,
            Some(json!({"type": "function", "function": {"name": "w"}}))
        );
        assert_eq!(
            r.response_format,
            Some(
                json!({"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": true}})
            )
        );
        assert_eq!(r.reasoning_effort.as_deref(), Some("low"));
        assert_eq!(r.reasoning.as_ref().unwrap().effort.as_deref(), Some("low"));
        assert_eq!(r.extra["parallel_tool_calls"], false);
        for (choice, want) in [("auto", "auto"), ("none", "none"), ("required", "required")] {
            let r = parse_json(json!({"model": "m", "input": "x", "tool_choice": choice})).unwrap();
            assert_eq!(r.tool_choice, Some(json!(want)));
        }
    }

    #[test]
    fn stateful_and_unsupported_requests_are_refused_by_name() {
        assert_eq!(
            err(json!({"model": "m", "input": "x", "previous_response_id": "resp_1"})),
            PREVIOUS_RESPONSE_ID
        );
        assert!(err(json!({"model": "m", "input": "x", "background": true})).contains("background"));
        assert!(
            err(json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}))
                .contains("`web_search`")
        );
        assert!(err(
            json!({"model": "m", "input": [{"type": "message", "role": "user",
            "content": [{"type": "input_image", "file_id": "file_1"}]}]})
        )
        .contains("input[0].content[0].file_id"));
        assert!(
            err(json!({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}))
                .contains("item_reference")
        );
        assert!(
            err(json!({"model": "m", "input": [{"type": "web_search_call"}]}))
                .contains("`web_search_call`")
        );
        // Unknown fields are ignored.
        parse_json(json!({"model": "m", "input": "x", "truncation": "auto", "include": []}))
            .unwrap();
        parse_json(
            json!({"model": "m", "input": "x", "background": false, "previous_response_id": null}),
        )
        .unwrap();
    }

    #[test]
    fn wrongly_typed_fields_are_refused_by_name() {
        for (field, value) in [
            ("model", json!(1)),
            ("input", json!(1)),
            ("input", json!([])),
            ("instructions", json!([])),
            ("tools", json!({})),
            ("tool_choice", json!("sometimes")),
            ("tool_choice", json!({"type": "file_search"})),
            ("max_output_tokens", json!("10")),
            ("max_output_tokens", json!(0)),
            ("temperature", json!("hot")),
            ("temperature", json!(3)),
            ("top_p", json!(true)),
            ("text", json!("json")),
            ("text", json!({"format": {"type": "xml"}})),
            (
                "text",
                json!({"format": {"type": "json_schema", "name": "x"}}),
            ),
            ("reasoning", json!({"effort": 1})),
            ("metadata", json!({"a": 1})),
            ("user", json!(1)),
            ("stream", json!("yes")),
            ("store", json!(1)),
            ("parallel_tool_calls", json!("no")),
        ] {
            let mut body = json!({"model": "m", "input": "x"});
            body[field] = value.clone();
            let e = err(body);
            let head = field.split('.').next().unwrap();
            assert!(
                e.contains(head) || (field == "input" && e.contains("input")),
                "{field}={value}: {e}"
            );
        }
        for item in [
            json!({"role": "bot", "content": "x"}),
            json!({"role": "user"}),
            json!({"role": "user", "content": 1}),
            json!({"type": "function_call", "name": "w", "arguments": "{}"}),
            json!({"type": "function_call_output", "call_id": "c"}),
            json!("text"),
        ] {
            let e = err(json!({"model": "m", "input": [item]}));
            assert!(e.contains("input[0]"), "{item}: {e}");
        }
        assert!(err(json!([1])).contains("JSON object"));
        assert!(err(json!({"model": "m"})).contains("`input` is required"));
    }
}
