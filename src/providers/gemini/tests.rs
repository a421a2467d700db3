//! Golden tests: OpenAI request in → exact Gemini body out; Gemini answers and SSE
//! event sequences in → OpenAI chunks out (folded with `Aggregator`). Fixtures follow
//! the shapes of the Gemini API reference (`GenerateContentResponse`).

use super::*;
use crate::catalog::Catalog;
use crate::chat::{Aggregator, ChatCompletion, ChatRequest};
use crate::config::Config;
use crate::context::CallContext;
use serde_json::json;

fn call_with(req: Value, upstream_model: &str, max_output_tokens: Option<u32>) -> ProviderCall {
    let max = max_output_tokens
        .map(|n| format!("max_output_tokens = {n}"))
        .unwrap_or_default();
    let config = Config::from_toml(&format!(
        r#"
[[providers]]
name = "google"
kind = "gemini"
base_url = "http://127.0.0.1:9"
api_key = "goog-upstream"
[[models]]
id = "google/gemini"
{max}
  [[models.endpoints]]
  provider = "google"
  upstream_model = "{upstream_model}"
  prompt_usd_per_mtok = 0.3
  completion_usd_per_mtok = 2.5
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
    call_with(req, "gemini-2.5-flash", Some(1000))
}

fn body(c: &ProviderCall) -> Value {
    serde_json::from_slice(&wire_body(c).unwrap()).unwrap()
}

fn fold(chunks: Vec<ChatChunk>) -> ChatCompletion {
    let mut agg = Aggregator::default();
    chunks.into_iter().for_each(|c| agg.push(c));
    agg.finish()
}

fn parse(v: Value) -> ChatCompletion {
    let c = call(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    fold(vec![GeminiAdapter
        .parse_response(&c, v.to_string().as_bytes())
        .unwrap()])
}

fn decoder() -> GeminiDecoder {
    GeminiDecoder {
        provider: "google".into(),
        translator: Translator::default(),
    }
}

fn run(events: &[Value]) -> Vec<ChatChunk> {
    let mut d = decoder();
    let mut chunks = Vec::new();
    for e in events {
        match d.decode("", &e.to_string()).unwrap() {
            Decoded::Chunk(c) => chunks.push(c),
            Decoded::Skip => {}
            Decoded::Done => panic!("Gemini streams end with the body"),
        }
    }
    chunks
}

fn text_event(text: &str, finish: Option<&str>, usage: Option<Value>) -> Value {
    let mut cand = json!({"content": {"role": "model", "parts": [{"text": text}]}, "index": 0});
    if let Some(f) = finish {
        cand["finishReason"] = json!(f);
    }
    let mut e =
        json!({"candidates": [cand], "modelVersion": "gemini-2.5-flash", "responseId": "r1"});
    if let Some(u) = usage {
        e["usageMetadata"] = u;
    }
    e
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

#[test]
fn text_system_multi_turn_and_generation_config() {
    let c = call(json!({
        "model": "google/gemini",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "user", "content": [{"type": "text", "text": "Are you there?", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": "Oui."},
            {"role": "user", "content": "Bien."}
        ],
        "max_tokens": 64, "temperature": 0.2, "top_p": 0.8, "stop": "END", "seed": 42,
        "logit_bias": {"1": 2}, "user": "u-1"
    }));
    assert_eq!(
        body(&c),
        json!({
            "systemInstruction": {"parts": [{"text": "You are terse."}, {"text": "Answer in French."}]},
            "contents": [
                {"role": "user", "parts": [{"text": "Hello"}, {"text": "Are you there?"}]},
                {"role": "model", "parts": [{"text": "Oui."}]},
                {"role": "user", "parts": [{"text": "Bien."}]}
            ],
            "generationConfig": {
                "maxOutputTokens": 64, "temperature": 0.2, "topP": 0.8,
                "stopSequences": ["END"], "seed": 42
            }
        })
    );
    // The model's max_output_tokens is the default bound; with none at all, the bound
    // credit reserved (4096) is sent all the same: Gemini's own default is larger.
    let plain = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        body(&call(plain.clone()))["generationConfig"],
        json!({"maxOutputTokens": 1000})
    );
    assert_eq!(
        body(&call_with(plain.clone(), "gemini-2.5-flash", None))["generationConfig"],
        json!({"maxOutputTokens": crate::credit::DEFAULT_MAX_OUTPUT_TOKENS})
    );
    // `n` asks for that many candidates; the limit stays per candidate.
    let mut three = plain;
    three["n"] = json!(3);
    assert_eq!(
        body(&call(three))["generationConfig"],
        json!({"maxOutputTokens": 1000, "candidateCount": 3})
    );
}

#[test]
fn images_become_inline_data_and_file_data() {
    let c = call(json!({
        "model": "google/gemini",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/webp;base64,UklGRg=="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/photo.PNG?x=1"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0x"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
        ]}]
    }));
    assert_eq!(
        body(&c)["contents"],
        json!([{"role": "user", "parts": [
            {"text": "What is this?"},
            {"inlineData": {"mimeType": "image/webp", "data": "UklGRg=="}},
            {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/photo.PNG?x=1"}},
            {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0x"}},
            {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}}
        ]}])
    );
}

#[test]
fn json_modes_set_the_response_mime_type_and_schema() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": false});
    let b = body(&call(json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}}
    })));
    assert_eq!(
        b["generationConfig"]["responseMimeType"],
        "application/json"
    );
    assert_eq!(b["generationConfig"]["responseJsonSchema"], schema);
    let b = body(&call(json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"}
    })));
    assert_eq!(
        b["generationConfig"],
        json!({"maxOutputTokens": 1000, "responseMimeType": "application/json"})
    );
}

#[test]
fn reasoning_effort_becomes_a_thinking_config() {
    let b = |effort: &str| {
        body(&call(json!({
            "model": "m", "reasoning_effort": effort,
            "messages": [{"role": "user", "content": "hi"}]
        })))["generationConfig"]["thinkingConfig"]
            .clone()
    };
    assert_eq!(
        b("high"),
        json!({"thinkingBudget": 24576, "includeThoughts": true})
    );
    assert_eq!(
        b("low"),
        json!({"thinkingBudget": 1024, "includeThoughts": true})
    );
    assert_eq!(b("none"), json!({"thinkingBudget": 0}));
    assert_eq!(b("bogus"), Value::Null);
}

#[test]
fn tools_parallel_calls_and_responses_round_trip_with_names() {
    let c = call(json!({
        "model": "google/gemini",
        "messages": [
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_0_aaaa", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_1_bbbb", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_0_aaaa", "content": "{\"temp\": 18}"},
            {"role": "tool", "tool_call_id": "call_1_bbbb", "content": "12:00"}
        ],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}
    }));
    let b = body(&c);
    assert_eq!(
        b["contents"],
        json!([
            {"role": "user", "parts": [{"text": "Weather in Paris and Oslo?"}]},
            {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"name": "get_time", "args": {}}}
            ]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
                {"functionResponse": {"name": "get_time", "response": {"content": "12:00"}}}
            ]}
        ])
    );
    assert_eq!(
        b["tools"],
        json!([{"functionDeclarations": [
            {"name": "get_weather", "description": "Weather of a city",
             "parametersJsonSchema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
            {"name": "get_time"}
        ]}])
    );
    assert_eq!(
        b["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
    );

    let mode = |choice: &str| {
        let mut r = c.request.as_ref().clone();
        r.tool_choice = Some(json!(choice));
        let c2 = ProviderCall {
            request: Arc::new(r),
            ..c.clone()
        };
        body(&c2)["toolConfig"]["functionCallingConfig"]["mode"].clone()
    };
    assert_eq!(mode("auto"), "AUTO");
    assert_eq!(mode("none"), "NONE");
    assert_eq!(mode("required"), "ANY");
}

#[test]
fn gemini_3_replays_get_the_placeholder_thought_signature() {
    let c = call_with(
        json!({"model": "m", "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}
            ]},
            {"role": "tool", "tool_call_id": "a", "content": "1"},
            {"role": "tool", "tool_call_id": "b", "content": "2"}
        ]}),
        "models/gemini-3-pro-preview",
        None,
    );
    let parts = body(&c)["contents"][1]["parts"].clone();
    assert_eq!(parts[0]["thoughtSignature"], SKIP_THOUGHT_SIGNATURE);
    assert!(
        parts[1].get("thoughtSignature").is_none(),
        "only the first parallel call"
    );
    let req = GeminiAdapter.build_request(&c, false).unwrap();
    assert_eq!(
        req.uri(),
        "http://127.0.0.1:9/v1beta/models/gemini-3-pro-preview:generateContent"
    );
}

#[test]
fn tool_message_for_an_unknown_call_is_a_client_error() {
    let c = call(json!({"model": "m", "messages": [
        {"role": "user", "content": "go"},
        {"role": "tool", "tool_call_id": "nope", "content": "1"}
    ]}));
    let err = wire_body(&c).unwrap_err();
    assert_eq!(err.kind, FailureKind::Status(400));
    assert!(err.message.contains("nope"));
}

#[test]
fn requests_go_to_generate_content_with_the_google_key() {
    let c = call(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    let req = GeminiAdapter.build_request(&c, false).unwrap();
    assert_eq!(
        req.uri(),
        "http://127.0.0.1:9/v1beta/models/gemini-2.5-flash:generateContent"
    );
    assert_eq!(req.headers()["x-goog-api-key"], "goog-upstream");
    assert!(req.headers().get("authorization").is_none());
    let req = GeminiAdapter.build_request(&c, true).unwrap();
    assert_eq!(
        req.uri(),
        "http://127.0.0.1:9/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    );
}

// ---------------------------------------------------------------------------
// Non-stream answers
// ---------------------------------------------------------------------------

#[test]
fn text_answer_with_thoughts_and_cached_usage() {
    let done = parse(json!({
        "candidates": [{
            "content": {"role": "model", "parts": [
                {"text": "The user greets me.", "thought": true},
                {"text": "Hello"}, {"text": " there"}
            ]},
            "finishReason": "STOP", "index": 0
        }],
        "usageMetadata": {"promptTokenCount": 120, "candidatesTokenCount": 5,
                          "thoughtsTokenCount": 30, "cachedContentTokenCount": 100, "totalTokenCount": 155},
        "modelVersion": "gemini-2.5-flash"
    }));
    let ch = &done.choices[0];
    assert_eq!(ch.message.content.as_deref(), Some("Hello there"));
    assert_eq!(ch.message.reasoning.as_deref(), Some("The user greets me."));
    assert_eq!(ch.finish_reason.as_deref(), Some("stop"));
    let u = done.usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (120, 35, 155)
    );
    assert_eq!((u.cached_tokens(), u.reasoning_tokens()), (100, 30));
}

#[test]
fn parallel_function_calls_get_stable_ids_and_tool_calls_finish() {
    let answer = json!({
        "candidates": [{
            "content": {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}
            ]},
            "finishReason": "STOP", "index": 0
        }],
        "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 20, "totalTokenCount": 60}
    });
    let done = parse(answer.clone());
    let ch = &done.choices[0];
    assert_eq!(ch.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(ch.message.content, None);
    let calls = ch.message.tool_calls.as_ref().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0].id,
        tool_call_id(0, "get_weather", r#"{"city":"Paris"}"#)
    );
    assert_eq!(
        calls[1].id,
        tool_call_id(1, "get_weather", r#"{"city":"Oslo"}"#)
    );
    assert_ne!(calls[0].id, calls[1].id);
    assert_eq!(calls[0].function.arguments, r#"{"city":"Paris"}"#);
    assert_eq!(
        parse(answer).choices[0]
            .message
            .tool_calls
            .as_ref()
            .unwrap()[0]
            .id,
        calls[0].id
    );
    let u = done.usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.reasoning_tokens()),
        (40, 20, 0)
    );
}

#[test]
fn finish_reasons_map() {
    for (reason, finish) in [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("OTHER", "stop"),
    ] {
        let done = parse(text_event("x", Some(reason), None));
        assert_eq!(
            done.choices[0].finish_reason.as_deref(),
            Some(finish),
            "{reason}"
        );
    }
    let blocked = parse(json!({
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}
    }));
    assert_eq!(
        blocked.choices[0].finish_reason.as_deref(),
        Some("content_filter")
    );
    assert_eq!(blocked.usage.unwrap().prompt_tokens, 8);
}

#[test]
fn error_bodies_keep_the_provider_message() {
    let body = br#"{"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED"}}"#;
    assert_eq!(
        GeminiAdapter.error_message(body),
        "Resource has been exhausted (e.g. check quota)."
    );
    let c = call(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    let err = GeminiAdapter.parse_response(&c, body).unwrap_err();
    assert_eq!(err.kind, FailureKind::InBand);
}

// ---------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------

#[test]
fn text_stream_maps_each_event_to_a_chunk_with_usage_last() {
    let usage = |c: u64| json!({"promptTokenCount": 9, "candidatesTokenCount": c, "totalTokenCount": 9 + c});
    let chunks = run(&[
        text_event("Hel", None, Some(usage(1))),
        text_event("lo", None, Some(usage(2))),
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]}, "index": 0}]}),
        text_event(" world", Some("STOP"), Some(usage(3))),
    ]);
    assert_eq!(chunks.len(), 3, "the empty event is skipped");
    assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
    assert!(chunks[1].choices[0].delta.role.is_none());
    assert!(
        chunks[..2].iter().all(|c| c.usage.is_none()),
        "usage only with the finish"
    );
    assert_eq!(chunks[2].finish_reason(), Some("stop"));
    let done = fold(chunks);
    assert_eq!(
        done.choices[0].message.content.as_deref(),
        Some("Hello world")
    );
    let u = done.usage.unwrap();
    assert_eq!((u.prompt_tokens, u.completion_tokens), (9, 3));
}

#[test]
fn streamed_parallel_calls_and_thoughts_fold_like_the_json_answer() {
    let chunks = run(&[
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Two lookups.", "thought": true}]}, "index": 0}]}),
        json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "CiQB"}
        ]}, "index": 0}]}),
        json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}
        ]}, "finishReason": "STOP", "index": 0}],
         "usageMetadata": {"promptTokenCount": 50, "candidatesTokenCount": 22, "thoughtsTokenCount": 64,
                           "cachedContentTokenCount": 32, "totalTokenCount": 136}}),
    ]);
    assert_eq!(chunks.len(), 3);
    assert!(
        chunks[0].is_content(),
        "reasoning counts as content for commit"
    );
    let done = fold(chunks);
    let ch = &done.choices[0];
    assert_eq!(ch.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(ch.message.reasoning.as_deref(), Some("Two lookups."));
    let calls = ch.message.tool_calls.as_ref().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0].id,
        tool_call_id(0, "get_weather", r#"{"city":"Paris"}"#)
    );
    assert_eq!(
        calls[1].id,
        tool_call_id(1, "get_weather", r#"{"city":"Oslo"}"#)
    );
    assert_eq!(calls[1].function.arguments, r#"{"city":"Oslo"}"#);
    let u = done.usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (50, 86, 136)
    );
    assert_eq!((u.cached_tokens(), u.reasoning_tokens()), (32, 64));
}

#[test]
fn in_band_stream_errors_fail_the_attempt() {
    let mut d = decoder();
    assert!(matches!(
        d.decode("", &text_event("a", None, None).to_string())
            .unwrap(),
        Decoded::Chunk(_)
    ));
    let err = d
        .decode(
            "",
            r#"{"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}"#,
        )
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::InBand);
    assert_eq!(err.message, "The model is overloaded.");
    assert_eq!(
        d.decode("", "{oops").unwrap_err().kind,
        FailureKind::Protocol
    );
}

#[test]
fn openrouter_reasoning_becomes_a_thinking_config() {
    let b = |extra: Value| {
        let mut r = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let body = body(&call(r));
        assert!(body.get("reasoning").is_none(), "{body}");
        body["generationConfig"]["thinkingConfig"].clone()
    };
    // A budget as given, with the thoughts asked for.
    assert_eq!(
        b(json!({"reasoning": {"max_tokens": 3000}})),
        json!({"thinkingBudget": 3000, "includeThoughts": true})
    );
    // `exclude`: the model thinks, no thought text comes back (`includeThoughts` is
    // false by default).
    assert_eq!(
        b(json!({"reasoning": {"effort": "low", "exclude": true}})),
        json!({"thinkingBudget": 1024})
    );
    // `enabled` alone is medium; `enabled: false` is a zero budget.
    assert_eq!(
        b(json!({"reasoning": {"enabled": true}})),
        json!({"thinkingBudget": 8192, "includeThoughts": true})
    );
    assert_eq!(
        b(json!({"reasoning": {"enabled": false}, "reasoning_effort": "high"})),
        json!({"thinkingBudget": 0})
    );
    // `reasoning` wins over `reasoning_effort`.
    assert_eq!(
        b(json!({"reasoning": {"effort": "high"}, "reasoning_effort": "low"})),
        json!({"thinkingBudget": 24576, "includeThoughts": true})
    );
    // Nothing asked: the model's default.
    assert_eq!(b(json!({})), Value::Null);
}
