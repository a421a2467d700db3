//! The `response` object: its output items, usage, status, and the request's
//! settings echoed as the client sent them.
//!
//! Written with serde straight to bytes (never through `serde_json::Value`), so
//! `usage.cost` keeps its exact decimal digits.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::chat::{ChatCompletion, ChatRequest, Usage};
use crate::error::GatewayError;
use crate::money::Money;

/// An output item of a `response`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Item {
    /// The model's reasoning text, as one summary part.
    Reasoning {
        /// `rs_…`.
        id: String,
        /// `[{"type":"summary_text","text"}]` (empty while streaming).
        summary: Vec<SummaryText>,
    },
    /// The assistant's text.
    Message {
        /// `msg_…`.
        id: String,
        /// `in_progress`, `completed` or `incomplete`.
        status: &'static str,
        /// Always `assistant`.
        role: &'static str,
        /// One `output_text` part (none while streaming, before its part is added).
        content: Vec<OutputText>,
    },
    /// A tool call.
    FunctionCall {
        /// `fc_…`.
        id: String,
        /// The id the `function_call_output` answering it names.
        call_id: String,
        /// The function's name.
        name: String,
        /// JSON-encoded arguments.
        arguments: String,
        /// `in_progress`, `completed` or `incomplete`.
        status: &'static str,
    },
}

impl Item {
    /// The item's `id`.
    pub(super) fn id(&self) -> &str {
        match self {
            Item::Reasoning { id, .. }
            | Item::Message { id, .. }
            | Item::FunctionCall { id, .. } => id,
        }
    }

    /// Sets the status of an item that has one.
    pub(super) fn set_status(&mut self, to: &'static str) {
        match self {
            Item::Message { status, .. } | Item::FunctionCall { status, .. } => *status = to,
            Item::Reasoning { .. } => {}
        }
    }
}

/// The id of the output item at `index` of the response `request_id`: derived from
/// the request id, unique within the response.
pub(super) fn item_id(prefix: &str, request_id: &str, index: usize) -> String {
    format!("{prefix}_{request_id}_{index}")
}

/// A `summary_text` part of a reasoning item.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct SummaryText {
    /// Always `summary_text`.
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    /// The reasoning text.
    pub(super) text: String,
}

impl SummaryText {
    pub(super) fn new(text: String) -> Self {
        SummaryText {
            kind: "summary_text",
            text,
        }
    }
}

/// An `output_text` part of a message item.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct OutputText {
    /// Always `output_text`.
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    /// The text.
    pub(super) text: String,
    /// Always empty: the gateway adds no citations.
    pub(super) annotations: [(); 0],
    /// Always empty: no log probabilities.
    pub(super) logprobs: [(); 0],
}

impl OutputText {
    pub(super) fn new(text: String) -> Self {
        OutputText {
            kind: "output_text",
            text,
            annotations: [],
            logprobs: [],
        }
    }
}

/// `usage` of a `response`, with the gateway's `cost`.
#[derive(Debug, Serialize)]
struct ResponseUsage {
    input_tokens: u64,
    input_tokens_details: InputDetails,
    output_tokens: u64,
    output_tokens_details: OutputDetails,
    total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost: Option<Money>,
    /// The charge by kind of token (cache reads and writes priced apart).
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_details: Option<crate::chat::CostDetails>,
}

#[derive(Debug, Serialize)]
struct InputDetails {
    cached_tokens: u64,
    cache_write_tokens: u64,
}

#[derive(Debug, Serialize)]
struct OutputDetails {
    reasoning_tokens: u64,
}

impl From<&Usage> for ResponseUsage {
    fn from(u: &Usage) -> Self {
        ResponseUsage {
            input_tokens: u.prompt_tokens,
            input_tokens_details: InputDetails {
                cached_tokens: u.cached_tokens(),
                cache_write_tokens: u.cache_write_tokens(),
            },
            output_tokens: u.completion_tokens,
            output_tokens_details: OutputDetails {
                reasoning_tokens: u.reasoning_tokens(),
            },
            total_tokens: u.total_tokens,
            cost: u.cost,
            cost_details: u.cost_details,
        }
    }
}

/// `incomplete_details`.
#[derive(Debug, Serialize)]
struct Incomplete {
    reason: &'static str,
}

/// `error` of a failed response.
#[derive(Debug, Serialize)]
struct ErrorObject {
    code: &'static str,
    message: String,
}

/// `status` and `incomplete_details.reason` of an answer that stopped for
/// `finish_reason`: `length` → `max_output_tokens`, `content_filter` →
/// `content_filter`, anything else completed.
pub(super) fn status_of(finish_reason: Option<&str>) -> (&'static str, Option<&'static str>) {
    match finish_reason {
        Some("length") => ("incomplete", Some("max_output_tokens")),
        Some("content_filter") => ("incomplete", Some("content_filter")),
        _ => ("completed", None),
    }
}

/// Everything a `response` object says, borrowed.
pub(super) struct Head<'a> {
    /// The gateway's request id.
    pub(super) id: &'a str,
    /// Unix seconds.
    pub(super) created_at: u64,
    /// The gateway model id that served (or was asked for, before any served).
    pub(super) model: &'a str,
    /// The provider that served, when one did.
    pub(super) provider: Option<&'a str>,
    /// The request, for its echoed settings.
    pub(super) request: &'a ChatRequest,
}

/// The `response` object, serialised as the API writes it.
#[derive(Serialize)]
pub(super) struct ResponseObject<'a> {
    id: &'a str,
    object: &'static str,
    created_at: u64,
    status: &'static str,
    background: bool,
    error: Option<ErrorObject>,
    incomplete_details: Option<Incomplete>,
    instructions: &'a Value,
    max_output_tokens: &'a Value,
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    output: &'a [Item],
    parallel_tool_calls: &'a Value,
    previous_response_id: Option<()>,
    reasoning: &'a Value,
    store: bool,
    temperature: &'a Value,
    text: &'a Value,
    tool_choice: &'a Value,
    tools: &'a Value,
    top_p: &'a Value,
    truncation: &'static str,
    usage: Option<ResponseUsage>,
    user: &'a Value,
    metadata: &'a Value,
}

/// Defaults of the echoed settings the client did not send, as the API reports them.
struct Defaults {
    null: Value,
    yes: Value,
    reasoning: Value,
    text: Value,
    auto: Value,
    empty_list: Value,
    empty_map: Value,
}

fn defaults() -> &'static Defaults {
    static D: std::sync::OnceLock<Defaults> = std::sync::OnceLock::new();
    D.get_or_init(|| Defaults {
        null: Value::Null,
        yes: Value::Bool(true),
        reasoning: serde_json::json!({"effort": null, "summary": null}),
        text: serde_json::json!({"format": {"type": "text"}}),
        auto: Value::String("auto".into()),
        empty_list: Value::Array(Vec::new()),
        empty_map: Value::Object(Map::new()),
    })
}

impl<'a> Head<'a> {
    fn echo(&self, name: &str, default: &'a Value) -> &'a Value {
        self.request
            .inbound
            .responses
            .as_ref()
            .and_then(|r| r.echo.get(name))
            .filter(|v| !v.is_null())
            .unwrap_or(default)
    }

    /// The object with `status`, `output` and `usage`; `finish_reason` sets an
    /// `incomplete` status, `error` a `failed` one.
    pub(super) fn object(
        &self,
        output: &'a [Item],
        usage: Option<&Usage>,
        finish_reason: Option<&str>,
        in_progress: bool,
        error: Option<&GatewayError>,
    ) -> ResponseObject<'a> {
        let d = defaults();
        let (status, reason) = match (error, in_progress) {
            (Some(_), _) => ("failed", None),
            (None, true) => ("in_progress", None),
            (None, false) => status_of(finish_reason),
        };
        let echo = |name: &str, default: &'a Value| self.echo(name, default);
        ResponseObject {
            id: self.id,
            object: "response",
            created_at: self.created_at,
            status,
            background: false,
            error: error.map(|e| ErrorObject {
                code: e.code(),
                message: e.to_string(),
            }),
            incomplete_details: reason.map(|reason| Incomplete { reason }),
            instructions: echo("instructions", &d.null),
            max_output_tokens: echo("max_output_tokens", &d.null),
            model: self.model,
            provider: self.provider,
            output,
            parallel_tool_calls: echo("parallel_tool_calls", &d.yes),
            previous_response_id: None,
            reasoning: echo("reasoning", &d.reasoning),
            store: false,
            temperature: echo("temperature", &d.null),
            text: echo("text", &d.text),
            tool_choice: echo("tool_choice", &d.auto),
            tools: echo("tools", &d.empty_list),
            top_p: echo("top_p", &d.null),
            truncation: "disabled",
            usage: usage.map(ResponseUsage::from),
            user: echo("user", &d.null),
            metadata: echo("metadata", &d.empty_map),
        }
    }
}

/// The output items of a folded answer: its reasoning, its text (always, unless it
/// only called tools), its tool calls.
fn output_items(completion: &ChatCompletion, status: &'static str) -> Vec<Item> {
    let id = completion.id.as_str();
    let mut items = Vec::new();
    let Some(choice) = completion.choices.first() else {
        return items;
    };
    let m = &choice.message;
    if let Some(r) = m.reasoning.as_ref().filter(|r| !r.is_empty()) {
        items.push(Item::Reasoning {
            id: item_id("rs", id, items.len()),
            summary: vec![SummaryText::new(r.clone())],
        });
    }
    let calls = m.tool_calls.as_deref().unwrap_or_default();
    let text = m.content.as_deref().unwrap_or_default();
    if !text.is_empty() || calls.is_empty() {
        items.push(Item::Message {
            id: item_id("msg", id, items.len()),
            status,
            role: "assistant",
            content: vec![OutputText::new(text.to_owned())],
        });
    }
    for call in calls {
        items.push(Item::FunctionCall {
            id: item_id("fc", id, items.len()),
            call_id: call.id.clone(),
            name: call.function.name.clone(),
            arguments: call.function.arguments.clone(),
            status: "completed",
        });
    }
    items
}

/// The `response` object of a folded reply (its `id`, `model`, `provider` and
/// `created` already stamped by Normalize).
pub(crate) fn json_body(completion: &ChatCompletion, request: &ChatRequest) -> Vec<u8> {
    let finish = completion
        .choices
        .first()
        .and_then(|c| c.finish_reason.as_deref());
    let (status, _) = status_of(finish);
    let output = output_items(completion, status);
    let head = Head {
        id: &completion.id,
        created_at: completion.created,
        model: &completion.model,
        provider: completion.provider.as_deref(),
        request,
    };
    let object = head.object(&output, completion.usage.as_ref(), finish, false, None);
    // Serialising borrowed strings, numbers and `Value`s cannot fail.
    serde_json::to_vec(&object).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Choice, FunctionCall, ResponseMessage, Role, ToolCall};
    use serde_json::json;

    fn completion(
        content: Option<&str>,
        reasoning: Option<&str>,
        calls: &[(&str, &str, &str)],
        finish: &str,
    ) -> ChatCompletion {
        let mut usage = Usage::new(10, 5);
        usage.cost = Some("0.000020000001".parse().unwrap());
        ChatCompletion {
            id: "gen-1".into(),
            object: "chat.completion".into(),
            created: 1_700_000_000,
            model: "openai/gpt".into(),
            provider: Some("openai".into()),
            embeddings: None,
            choices: vec![Choice {
                index: 0,
                message: ResponseMessage {
                    role: Role::Assistant,
                    content: content.map(str::to_owned),
                    reasoning: reasoning.map(str::to_owned),
                    reasoning_signature: None,
                    anthropic_content: None,
                    native_stop: None,
                    tool_calls: (!calls.is_empty()).then(|| {
                        calls
                            .iter()
                            .map(|(id, name, args)| ToolCall {
                                id: (*id).into(),
                                kind: "function".into(),
                                function: FunctionCall {
                                    name: (*name).into(),
                                    arguments: (*args).into(),
                                },
                            })
                            .collect()
                    }),
                },
                finish_reason: Some(finish.into()),
            }],
            usage: Some(usage),
        }
    }

    fn body(c: &ChatCompletion, request: &ChatRequest) -> Value {
        let bytes = json_body(c, request);
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.contains(r#""cost":0.000020000001"#),
            "cost written exactly: {text}"
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn a_text_answer_is_one_message_item_with_defaults_echoed() {
        let v = body(
            &completion(Some("Hi."), None, &[], "stop"),
            &ChatRequest::default(),
        );
        assert_eq!(
            v,
            json!({
                "id": "gen-1", "object": "response", "created_at": 1_700_000_000u64,
                "status": "completed", "background": false, "error": null,
                "incomplete_details": null, "instructions": null, "max_output_tokens": null,
                "model": "openai/gpt", "provider": "openai",
                "output": [{"type": "message", "id": "msg_gen-1_0", "status": "completed",
                            "role": "assistant",
                            "content": [{"type": "output_text", "text": "Hi.", "annotations": [], "logprobs": []}]}],
                "parallel_tool_calls": true, "previous_response_id": null,
                "reasoning": {"effort": null, "summary": null}, "store": false,
                "temperature": null, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
                "tools": [], "top_p": null, "truncation": "disabled",
                "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                          "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": 15, "cost": 0.000020000001},
                "user": null, "metadata": {}
            })
        );
    }

    #[test]
    fn reasoning_and_calls_are_items_in_order_and_length_is_incomplete() {
        let c = completion(
            None,
            Some("Two cities."),
            &[
                ("call_1", "w", "{\"city\":\"Paris\"}"),
                ("call_2", "w", "{}"),
            ],
            "tool_calls",
        );
        let v = body(&c, &ChatRequest::default());
        let types: Vec<&str> = v["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["reasoning", "function_call", "function_call"]);
        assert_eq!(
            v["output"][0],
            json!({"type": "reasoning", "id": "rs_gen-1_0", "summary": [{"type": "summary_text", "text": "Two cities."}]})
        );
        assert_eq!(
            v["output"][1],
            json!({"type": "function_call", "id": "fc_gen-1_1", "call_id": "call_1", "name": "w",
                   "arguments": "{\"city\":\"Paris\"}", "status": "completed"})
        );
        assert_eq!(v["status"], "completed");

        let v = body(
            &completion(Some("lorem"), None, &[], "length"),
            &ChatRequest::default(),
        );
        assert_eq!(v["status"], "incomplete");
        assert_eq!(
            v["incomplete_details"],
            json!({"reason": "max_output_tokens"})
        );
        assert_eq!(v["output"][0]["status"], "incomplete");
        let v = body(
            &completion(Some(""), None, &[], "content_filter"),
            &ChatRequest::default(),
        );
        assert_eq!(v["incomplete_details"], json!({"reason": "content_filter"}));
    }
}
