//! Golden tests: OpenAI request in → exact Anthropic body out; Anthropic answers and
//! event sequences in → OpenAI chunks out (folded with `Aggregator`). Fixtures follow
//! the shapes of Anthropic's Messages and streaming references.

use super::*;
use crate::catalog::Catalog;
use crate::chat::{Aggregator, ChatCompletion, ChatRequest};
use crate::config::Config;
use crate::context::CallContext;
use serde_json::json;

fn call_with(req: Value, max_output_tokens: Option<u32>) -> ProviderCall {
    let max = max_output_tokens
        .map(|n| format!("max_output_tokens = {n}"))
        .unwrap_or_default();
    let config = Config::from_toml(&format!(
        r#"
[[providers]]
name = "claude"
kind = "anthropic"
base_url = "http://127.0.0.1:9"
api_key = "sk-ant-upstream"
[[models]]
id = "anthropic/claude"
{max}
  [[models.endpoints]]
  provider = "claude"
  upstream_model = "claude-sonnet-4-20250514"
  prompt_usd_per_mtok = 3
  completion_usd_per_mtok = 15
"#
    ))
    .unwrap();
    let catalog = Catalog::from_config(&config);
    ProviderCall {
        endpoint: catalog.endpoints()[0].clone(),
        request: Arc::new(serde_json::from_value::<ChatRequest>(req).unwrap()),
        ctx: CallContext::new(),
    }
}

fn call(req: Value) -> ProviderCall {
    call_with(req, Some(1000))
}

fn body(c: &ProviderCall, stream: bool) -> Value {
    serde_json::from_slice(&wire_body(c, stream).unwrap()).unwrap()
}

fn decoder() -> AnthropicDecoder {
    AnthropicDecoder {
        provider: "claude".into(),
        usage: wire::Usage::default(),
        tool_ordinals: HashMap::new(),
        messages_client: false,
    }
}

#[test]
fn for_a_messages_client_every_block_event_comes_with_its_text_as_sent_on_one_line() {
    let mut d = AnthropicDecoder {
        messages_client: true,
        ..decoder()
    };
    let raw = |decoded: Decoded| match decoded {
        Decoded::Chunk(c) => c.choices[0].delta.anthropic.clone(),
        _ => None,
    };
    // A translated event keeps its translation and gains its text.
    let text =
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#;
    let Decoded::Chunk(c) = d.decode("content_block_delta", text).unwrap() else {
        panic!("a chunk")
    };
    assert_eq!(c.choices[0].delta.content.as_deref(), Some("Hi"));
    assert!(
        matches!(&c.choices[0].delta.anthropic, Some(AnthropicRaw::Event("content_block_delta", r)) if r.0.get() == text)
    );
    // Events with no chat form (a stop, an unknown block) are chunks of their own.
    for (name, text) in [
        (
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"future_block","x":1}}"#,
        ),
    ] {
        assert!(
            matches!(raw(d.decode(name, text).unwrap()), Some(AnthropicRaw::Event(n, r)) if n == name && r.0.get() == text)
        );
    }
    // Data sent over several lines is written again on one.
    let multi = "{\"type\": \"content_block_stop\",\n \"index\": 2}";
    let Some(AnthropicRaw::Event(_, r)) = raw(d.decode("content_block_stop", multi).unwrap())
    else {
        panic!("a raw event")
    };
    assert_eq!(r.0.get(), r#"{"index":2,"type":"content_block_stop"}"#);
    // Other events are not passed on as sent; a chat client's decoder passes none.
    let delta = r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"}}"#;
    assert_eq!(raw(d.decode("message_delta", delta).unwrap()), None);
    assert_eq!(
        raw(decoder().decode("content_block_delta", text).unwrap()),
        None
    );
}

/// Feeds `(event, data)` pairs; returns the chunks and whether `Done` was seen.
fn run(events: &[(&str, Value)]) -> (Vec<ChatChunk>, bool) {
    let mut d = decoder();
    let mut chunks = Vec::new();
    for (name, data) in events {
        match d.decode(name, &data.to_string()).unwrap() {
            Decoded::Chunk(c) => chunks.push(c),
            Decoded::Skip => {}
            Decoded::Done => return (chunks, true),
        }
    }
    (chunks, false)
}

fn fold(chunks: Vec<ChatChunk>) -> ChatCompletion {
    let mut agg = Aggregator::default();
    chunks.into_iter().for_each(|c| agg.push(c));
    agg.finish()
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

#[test]
fn text_system_and_multi_turn_merge() {
    let c = call(json!({
        "model": "anthropic/claude",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Hello"},
            {"role": "user", "content": [{"type": "text", "text": "Are you there?"}]},
            {"role": "assistant", "content": "Oui."},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "Bien."}
        ],
        "stop": ["END", "  "], "temperature": 0.5, "top_p": 0.9, "user": "u-42",
        "seed": 7, "logit_bias": {"1": 2}, "response_format": {"type": "json_object"}
    }));
    assert_eq!(
        body(&c, false),
        json!({
            "model": "claude-sonnet-4-20250514",
            "max_tokens": 1000,
            "system": "You are terse.\n\nAnswer in French.",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Hello"},
                    {"type": "text", "text": "Are you there?"}
                ]},
                {"role": "assistant", "content": [{"type": "text", "text": "Oui."}]},
                {"role": "user", "content": [{"type": "text", "text": "Bien."}]}
            ],
            "stop_sequences": ["END"],
            "temperature": 0.5,
            "top_p": 0.9,
            "metadata": {"user_id": "u-42"}
        })
    );
    let streamed = body(&c, true);
    assert_eq!(streamed["stream"], true);
}

#[test]
fn cache_control_keeps_system_blocks_and_user_parts() {
    let c = call(json!({
        "model": "anthropic/claude",
        "max_tokens": 50,
        "messages": [
            {"role": "system", "content": [
                {"type": "text", "text": "Long policy", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Short note"}
            ]},
            {"role": "user", "content": [
                {"type": "text", "text": "Big document", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                {"type": "text", "text": "Question?"}
            ]}
        ],
        "stop": "###"
    }));
    assert_eq!(
        body(&c, false),
        json!({
            "model": "claude-sonnet-4-20250514",
            "max_tokens": 50,
            "system": [
                {"type": "text", "text": "Long policy", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Short note"}
            ],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Big document", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                {"type": "text", "text": "Question?"}
            ]}],
            "stop_sequences": ["###"]
        })
    );
}

#[test]
fn images_from_data_and_http_urls_and_pdf_files() {
    let c = call(json!({
        "model": "anthropic/claude",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}, "cache_control": {"type": "ephemeral"}},
            {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}},
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
        ]}]
    }));
    assert_eq!(
        body(&c, false)["messages"],
        json!([{"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}, "cache_control": {"type": "ephemeral"}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}
        ]}])
    );

    let bad = call(json!({
        "model": "anthropic/claude",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "ftp://example.com/cat.jpg"}}
        ]}]
    }));
    let err = wire_body(&bad, false).unwrap_err();
    assert_eq!(err.kind, FailureKind::Status(400), "a client error");
    assert!(err.message.contains("messages[0]"));
}

#[test]
fn tools_and_tool_choice_map_to_input_schema_and_choice_types() {
    let weather = json!({"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    }});
    let now = json!({"type": "function", "function": {"name": "now"}});
    let base = json!({
        "model": "anthropic/claude",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [weather, now]
    });
    let b = body(&call(base.clone()), false);
    assert_eq!(
        b["tools"],
        json!([
            {"name": "get_weather", "description": "Weather of a city",
             "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
            {"name": "now", "input_schema": {"type": "object", "properties": {}}}
        ])
    );
    assert!(b.get("tool_choice").is_none());

    let choice = |tc: Value, extra: Option<(&str, Value)>| {
        let mut r = base.clone();
        r["tool_choice"] = tc;
        if let Some((k, v)) = extra {
            r[k] = v;
        }
        body(&call(r), false)["tool_choice"].clone()
    };
    assert_eq!(choice(json!("auto"), None), json!({"type": "auto"}));
    assert_eq!(choice(json!("none"), None), json!({"type": "none"}));
    assert_eq!(choice(json!("required"), None), json!({"type": "any"}));
    assert_eq!(
        choice(
            json!({"type": "function", "function": {"name": "get_weather"}}),
            None
        ),
        json!({"type": "tool", "name": "get_weather"})
    );
    assert_eq!(
        choice(json!("auto"), Some(("parallel_tool_calls", json!(false)))),
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        choice(Value::Null, Some(("parallel_tool_calls", json!(false)))),
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );

    // tool_choice without tools is dropped (Anthropic refuses it).
    let no_tools = body(
        &call(json!({
            "model": "anthropic/claude", "tool_choice": "required",
            "messages": [{"role": "user", "content": "hi"}]
        })),
        false,
    );
    assert!(no_tools.get("tool_choice").is_none() && no_tools.get("tools").is_none());
}

#[test]
fn parallel_tool_calls_and_results_round_trip() {
    let c = call(json!({
        "model": "anthropic/claude",
        "messages": [
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {"role": "assistant", "content": "Checking both.", "tool_calls": [
                {"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "toolu_02", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
            ]},
            {"role": "tool", "tool_call_id": "toolu_01", "content": "18C sunny"},
            {"role": "tool", "tool_call_id": "toolu_02", "content": [{"type": "text", "text": "-3C snow"}]},
            {"role": "user", "content": "Which is warmer?"}
        ]
    }));
    assert_eq!(
        body(&c, false)["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Oslo?"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking both."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_02", "content": [{"type": "text", "text": "-3C snow"}]},
                {"type": "text", "text": "Which is warmer?"}
            ]}
        ])
    );
}

#[test]
fn temperature_is_capped_at_anthropics_maximum() {
    let b = body(
        &call(json!({
            "model": "m", "temperature": 1.7,
            "messages": [{"role": "user", "content": "hi"}]
        })),
        false,
    );
    assert_eq!(b["temperature"], 1.0);
}

#[test]
fn max_tokens_falls_back_to_the_model_then_the_default() {
    let msg = json!([{"role": "user", "content": "hi"}]);
    let req = |extra: Value| {
        let mut r = json!({"model": "anthropic/claude", "messages": msg});
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        r
    };
    let b = body(
        &call_with(req(json!({"max_tokens": 10})), Some(1000)),
        false,
    );
    assert_eq!(b["max_tokens"], 10);
    let b = body(
        &call_with(req(json!({"max_completion_tokens": 20})), Some(1000)),
        false,
    );
    assert_eq!(b["max_tokens"], 20);
    let b = body(&call_with(req(json!({})), Some(1000)), false);
    assert_eq!(b["max_tokens"], 1000);
    let b = body(&call_with(req(json!({})), None), false);
    assert_eq!(b["max_tokens"], DEFAULT_MAX_TOKENS);
}

#[test]
fn reasoning_effort_becomes_a_thinking_budget_below_max_tokens() {
    let req = |effort: &str, max: u32, extra: Value| {
        let mut r = json!({
            "model": "anthropic/claude", "max_tokens": max, "reasoning_effort": effort,
            "temperature": 0.3, "top_p": 0.97,
            "messages": [{"role": "user", "content": "Prove it"}]
        });
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body(&call(r), false)
    };
    let b = req("medium", 20000, json!({}));
    assert_eq!(
        b["thinking"],
        json!({"type": "enabled", "budget_tokens": 8192})
    );
    assert!(
        b.get("temperature").is_none(),
        "thinking refuses temperature"
    );
    assert_eq!(b["top_p"], 0.97);
    // Capped below max_tokens.
    let b = req("high", 5000, json!({}));
    assert_eq!(b["thinking"]["budget_tokens"], 4999);
    // Too small a room for the minimum budget: thinking stays off, sampling stays.
    let b = req("low", 1024, json!({}));
    assert!(b.get("thinking").is_none());
    assert_eq!(b["temperature"], 0.3);
    // A forced tool and thinking cannot go together.
    let b = req(
        "low",
        20000,
        json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}),
    );
    assert!(b.get("thinking").is_none());
    assert!(req("none", 20000, json!({})).get("thinking").is_none());
}

#[test]
fn request_goes_to_v1_messages_with_key_and_version() {
    let c = call(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    let req = AnthropicAdapter.build_request(&c, true).unwrap();
    assert_eq!(req.uri(), "http://127.0.0.1:9/v1/messages");
    assert_eq!(req.headers()["x-api-key"], "sk-ant-upstream");
    assert_eq!(req.headers()["anthropic-version"], "2023-06-01");
    assert!(req.headers().get("authorization").is_none());
}

// ---------------------------------------------------------------------------
// Non-stream answers
// ---------------------------------------------------------------------------

fn parse(v: Value) -> ChatCompletion {
    let c = call(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    fold(vec![AnthropicAdapter
        .parse_response(&c, v.to_string().as_bytes())
        .unwrap()])
}

#[test]
fn text_answer_with_thinking_and_cache_usage() {
    let done = parse(json!({
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
        "content": [
            {"type": "thinking", "thinking": "Simple greeting.", "signature": "EqQB"},
            {"type": "text", "text": "Hello"},
            {"type": "text", "text": " there"}
        ],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 5,
                  "cache_creation_input_tokens": 200, "cache_read_input_tokens": 1000}
    }));
    let choice = &done.choices[0];
    assert_eq!(choice.message.content.as_deref(), Some("Hello there"));
    assert_eq!(
        choice.message.reasoning.as_deref(),
        Some("Simple greeting.")
    );
    assert_eq!(choice.finish_reason.as_deref(), Some("stop"));
    let u = done.usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (1210, 5, 1215)
    );
    assert_eq!(u.cached_tokens(), 1000);
    assert_eq!(u.cache_write_tokens(), 200);
}

#[test]
fn parallel_tool_use_answer_becomes_tool_calls() {
    let done = parse(json!({
        "id": "msg_02", "type": "message", "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_B", "name": "get_time", "input": {}}
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 30, "output_tokens": 40}
    }));
    let choice = &done.choices[0];
    assert_eq!(choice.finish_reason.as_deref(), Some("tool_calls"));
    let calls = choice.message.tool_calls.as_ref().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].id, "toolu_A");
    assert_eq!(calls[0].function.name, "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(&calls[0].function.arguments).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(calls[1].id, "toolu_B");
    assert_eq!(calls[1].function.arguments, "{}");
    let u = done.usage.unwrap();
    assert_eq!((u.prompt_tokens, u.cached_tokens()), (30, 0));
}

#[test]
fn stop_reasons_map_to_finish_reasons() {
    for (stop, finish) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ] {
        let done = parse(json!({
            "type": "message", "content": [{"type": "text", "text": "x"}],
            "stop_reason": stop, "usage": {"input_tokens": 1, "output_tokens": 1}
        }));
        assert_eq!(
            done.choices[0].finish_reason.as_deref(),
            Some(finish),
            "{stop}"
        );
    }
}

#[test]
fn error_bodies_keep_the_provider_message() {
    let body = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    assert_eq!(AnthropicAdapter.error_message(body), "Overloaded");
    let c = call(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    let err = AnthropicAdapter.parse_response(&c, body).unwrap_err();
    assert_eq!(
        (err.kind, err.message.as_str()),
        (FailureKind::InBand, "Overloaded")
    );
}

// ---------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------

fn message_start(input: u64, read: u64, written: u64) -> (&'static str, Value) {
    (
        "message_start",
        json!({"type": "message_start", "message": {
            "id": "msg_s", "type": "message", "role": "assistant", "content": [],
            "model": "claude-sonnet-4-20250514", "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1,
                      "cache_creation_input_tokens": written, "cache_read_input_tokens": read}
        }}),
    )
}

#[test]
fn text_stream_maps_to_chunks_with_final_usage() {
    let (chunks, done) = run(&[
        message_start(25, 100, 0),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 15}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    assert!(done);
    // role, "Hello", "!", finish+usage
    assert_eq!(chunks.len(), 4);
    assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
    assert!(!chunks[0].is_content());
    assert!(chunks[1].is_content());
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason(), Some("stop"));
    let done = fold(chunks);
    assert_eq!(done.choices[0].message.content.as_deref(), Some("Hello!"));
    let u = done.usage.unwrap();
    assert_eq!((u.prompt_tokens, u.completion_tokens), (125, 15));
    assert_eq!(u.cached_tokens(), 100);
}

#[test]
fn parallel_tool_use_stream_indexes_tool_calls_by_ordinal() {
    let delta = |i: u32, json: &str| {
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": i,
                   "delta": {"type": "input_json_delta", "partial_json": json}}),
        )
    };
    let start_tool = |i: u32, id: &str, name: &str| {
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": i,
                   "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
        )
    };
    let (chunks, done) = run(&[
        message_start(50, 0, 40),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Two cities."}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQB"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Checking."}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ),
        start_tool(2, "toolu_P", "get_weather"),
        delta(2, ""),
        delta(2, "{\"city\": "),
        ("ping", json!({"type": "ping"})),
        delta(2, "\"Paris\"}"),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 2}),
        ),
        start_tool(3, "toolu_O", "get_weather"),
        delta(3, "{\"city\": \"Oslo\"}"),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 3}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                   "usage": {"input_tokens": 50, "cache_creation_input_tokens": 40, "cache_read_input_tokens": 0, "output_tokens": 89}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    assert!(done);
    let first_tool = chunks
        .iter()
        .find_map(|c| c.choices[0].delta.tool_calls.as_ref())
        .unwrap();
    assert_eq!(
        first_tool[0].index, 0,
        "tool-call ordinal, not block index 2"
    );
    let done = fold(chunks);
    let choice = &done.choices[0];
    assert_eq!(choice.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(choice.message.content.as_deref(), Some("Checking."));
    assert_eq!(choice.message.reasoning.as_deref(), Some("Two cities."));
    let calls = choice.message.tool_calls.as_ref().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[0].id.as_str(), calls[0].function.name.as_str()),
        ("toolu_P", "get_weather")
    );
    assert_eq!(calls[0].function.arguments, "{\"city\": \"Paris\"}");
    assert_eq!(calls[1].id, "toolu_O");
    assert_eq!(calls[1].function.arguments, "{\"city\": \"Oslo\"}");
    let u = done.usage.unwrap();
    assert_eq!((u.prompt_tokens, u.completion_tokens), (90, 89));
    assert_eq!(u.cache_write_tokens(), 40);
}

#[test]
fn max_tokens_stream_ends_with_length() {
    let (chunks, _) = run(&[
        message_start(3, 0, 0),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Once"}}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 1}}),
        ),
    ]);
    assert_eq!(chunks.last().unwrap().finish_reason(), Some("length"));
}

#[test]
fn error_event_fails_the_attempt_in_band() {
    let mut d = decoder();
    let (name, data) = message_start(3, 0, 0);
    assert!(matches!(
        d.decode(name, &data.to_string()).unwrap(),
        Decoded::Chunk(_)
    ));
    let err = d
        .decode(
            "error",
            r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#,
        )
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::InBand);
    assert_eq!(err.message, "Overloaded");
    assert_eq!(
        err.class(),
        crate::error::FailureClass::Retriable,
        "overloaded is retried"
    );
    let bad = d.decode("message_start", "not json").unwrap_err();
    assert_eq!(bad.kind, FailureKind::Protocol);
    assert!(matches!(
        d.decode("whatever", r#"{"type": "brand_new_event"}"#)
            .unwrap(),
        Decoded::Skip
    ));
}

#[test]
fn openrouter_reasoning_becomes_thinking_and_wins_over_reasoning_effort() {
    let body_of = |reasoning: Value, extra: Value| {
        let mut r = json!({
            "model": "anthropic/claude", "max_tokens": 20000, "reasoning": reasoning,
            "messages": [{"role": "user", "content": "Prove it"}]
        });
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body(&call(r), false)
    };
    let thinking = |budget: u32| json!({"type": "enabled", "budget_tokens": budget});
    // A budget as given; an effort by the table; `enabled` alone is medium.
    assert_eq!(
        body_of(json!({"max_tokens": 3000}), json!({}))["thinking"],
        thinking(3000)
    );
    assert_eq!(
        body_of(json!({"effort": "high"}), json!({}))["thinking"],
        thinking(16384)
    );
    assert_eq!(
        body_of(json!({"enabled": true}), json!({}))["thinking"],
        thinking(8192)
    );
    // max_tokens wins over effort; below Anthropic's minimum it is raised to it.
    assert_eq!(
        body_of(json!({"max_tokens": 4000, "effort": "high"}), json!({}))["thinking"],
        thinking(4000)
    );
    assert_eq!(
        body_of(json!({"max_tokens": 100}), json!({}))["thinking"],
        thinking(MIN_THINKING_BUDGET)
    );
    // `reasoning` wins over `reasoning_effort`; `enabled: false` is off.
    let extra = json!({"reasoning_effort": "low"});
    assert_eq!(
        body_of(json!({"effort": "medium"}), extra.clone())["thinking"],
        thinking(8192)
    );
    let b = body_of(json!({"enabled": false}), extra.clone());
    assert!(b.get("thinking").is_none(), "{b}");
    // `exclude` alone leaves `reasoning_effort` in charge (the text is hidden at the edge).
    assert_eq!(
        body_of(json!({"exclude": true}), extra)["thinking"],
        thinking(2048)
    );
    // The caps still hold: below max_tokens.
    let b = body(
        &call(json!({
            "model": "anthropic/claude", "max_tokens": 5000, "reasoning": {"max_tokens": 9000},
            "messages": [{"role": "user", "content": "Prove it"}]
        })),
        false,
    );
    assert_eq!(b["thinking"], thinking(4999));
    // The wire never carries the `reasoning` object itself.
    assert!(body_of(json!({"effort": "low"}), json!({}))
        .get("reasoning")
        .is_none());
}

// ---------------------------------------------------------------------------
// Reasoning kept through a tool loop (OpenRouter's `reasoning_details`)
// ---------------------------------------------------------------------------

#[test]
fn thinking_comes_out_as_reasoning_details_with_its_signature() {
    // Not streamed.
    let done = parse(json!({
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude",
        "content": [
            {"type": "thinking", "thinking": "Check the weather first.", "signature": "EqQB"},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}
        ],
        "stop_reason": "tool_use", "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 5}
    }));
    let v = serde_json::to_value(&done).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["reasoning_details"],
        json!([{"type": "reasoning.text", "text": "Check the weather first.",
                "signature": "EqQB", "index": 0}])
    );
    // Streamed: the text pieces, then the signature, all at index 0; folded, one entry.
    let block = |i: u64, delta: Value| {
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": i, "delta": delta}),
        )
    };
    let (chunks, _) = run(&[
        message_start(10, 0, 0),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "thinking", "thinking": ""}}),
        ),
        block(0, json!({"type": "thinking_delta", "thinking": "Check "})),
        block(0, json!({"type": "thinking_delta", "thinking": "first."})),
        block(0, json!({"type": "signature_delta", "signature": "EqQB"})),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                   "usage": {"output_tokens": 7}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    let details: Vec<Value> = chunks
        .iter()
        .filter_map(|c| {
            let v = serde_json::to_value(&c.choices.first()?.delta).unwrap();
            v.get("reasoning_details").cloned()
        })
        .collect();
    assert_eq!(
        details,
        [
            json!([{"type": "reasoning.text", "text": "Check ", "index": 0}]),
            json!([{"type": "reasoning.text", "text": "first.", "index": 0}]),
            json!([{"type": "reasoning.text", "signature": "EqQB", "index": 0}]),
        ]
    );
    let v = serde_json::to_value(fold(chunks)).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["reasoning_details"],
        json!([{"type": "reasoning.text", "text": "Check first.", "signature": "EqQB", "index": 0}])
    );
}

#[test]
fn reasoning_details_sent_back_keep_thinking_on_through_a_tool_loop() {
    let loop_with = |details: Option<Value>| {
        let mut assistant = json!({"role": "assistant", "content": "", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]});
        if let Some(d) = details {
            assistant["reasoning_details"] = d;
        }
        body(
            &call(json!({
                "model": "anthropic/claude", "max_tokens": 20000, "reasoning_effort": "medium",
                "messages": [
                    {"role": "user", "content": "Weather in Oslo?"},
                    assistant,
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "-3 °C"}
                ]
            })),
            false,
        )
    };
    // Sent back: the signed thinking (and a redacted block) open the assistant turn,
    // and thinking stays on.
    let b = loop_with(Some(json!([
        {"type": "reasoning.text", "text": "Check the weather first.", "signature": "EqQB", "index": 0},
        {"type": "reasoning.encrypted", "data": "ENC", "index": 1},
        {"type": "reasoning.text", "text": "unsigned: Anthropic would refuse it", "index": 2},
        {"type": "reasoning.summary", "summary": "ignored"}
    ])));
    assert_eq!(
        b["thinking"],
        json!({"type": "enabled", "budget_tokens": 8192})
    );
    let turn = &b["messages"][1];
    assert_eq!(turn["role"], "assistant");
    assert_eq!(
        turn["content"][0],
        json!({"type": "thinking", "thinking": "Check the weather first.", "signature": "EqQB"})
    );
    assert_eq!(
        turn["content"][1],
        json!({"type": "redacted_thinking", "data": "ENC"})
    );
    let last = turn["content"].as_array().unwrap().last().unwrap();
    assert_eq!(last["type"], "tool_use", "{turn}");
    assert_eq!(
        turn["content"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["type"] == "thinking")
            .count(),
        1,
        "an unsigned entry was sent"
    );
    // Not sent back (or only unsigned): the turn cannot open with signed thinking, so
    // thinking stays off rather than be refused.
    for details in [None, Some(json!([{"type": "reasoning.text", "text": "x"}]))] {
        let b = loop_with(details);
        assert!(b.get("thinking").is_none(), "{b}");
        assert_eq!(b["messages"][1]["content"][0]["type"], "tool_use", "{b}");
    }
}
