//! `POST /v1/responses` (SPEC §7.2) through the whole stack, against fake OpenAI,
//! Anthropic and Gemini upstreams and the mock: what each upstream receives, the
//! `response` object, the typed event stream, errors before and after the start,
//! money, the response cache and idempotency.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use switchboard::money::Money;

const KEY: &str = "sk-test-responses-0123456789";
const POOR: &str = "sk-test-responses-poor-0123";
const NOWHERE: &str = "http://127.0.0.1:9";

fn config(oai: &str, ant: &str, gem: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
keepalive_secs = 10

[[providers]]
name = "oai"
kind = "openai"
base_url = "{oai}/v1"
api_key = "sk-upstream-oai"
timeout_secs = 5
stream_idle_timeout_secs = 5

[[providers]]
name = "claude"
kind = "anthropic"
base_url = "{ant}"
api_key = "sk-ant-upstream"
timeout_secs = 5
stream_idle_timeout_secs = 5

[[providers]]
name = "google"
kind = "gemini"
base_url = "{gem}"
api_key = "goog-upstream-key"
timeout_secs = 5
stream_idle_timeout_secs = 5

[[providers]]
name = "mock"
kind = "mock"

[[models]]
id = "openai/m"
max_output_tokens = 8192
  [[models.endpoints]]
  provider = "oai"
  upstream_model = "up-model"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[models]]
id = "anthropic/claude"
max_output_tokens = 8192
  [[models.endpoints]]
  provider = "claude"
  upstream_model = "claude-sonnet-4"
  prompt_usd_per_mtok = 3
  completion_usd_per_mtok = 15

[[models]]
id = "google/gemini"
max_output_tokens = 8192
  [[models.endpoints]]
  provider = "google"
  upstream_model = "gemini-2.5-flash"
  prompt_usd_per_mtok = 0.3
  completion_usd_per_mtok = 2.5

[[models]]
id = "mock/echo"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1

[[models]]
id = "mock/lorem"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "lorem"
  prompt_usd_per_mtok = 0
  completion_usd_per_mtok = 1

[[keys]]
secret = "{KEY}"
credits_usd = 100

[[keys]]
secret = "{POOR}"
credits_usd = 0.000001
"#
    )
}

async fn gw_for(oai: &str, ant: &str, gem: &str) -> TestGateway {
    gateway(&config(oai, ant, gem)).await
}

async fn mock_gw() -> TestGateway {
    gw_for(NOWHERE, NOWHERE, NOWHERE).await
}

fn request(gw: &TestGateway, key: &str, body: &Value) -> reqwest::RequestBuilder {
    client()
        .post(gw.url("/v1/responses"))
        .bearer_auth(key)
        .json(body)
}

async fn post(gw: &TestGateway, body: Value) -> reqwest::Response {
    request(gw, KEY, &body).send().await.unwrap()
}

/// The events of a Responses stream: each `event:` name equals its data's `type`,
/// and `sequence_number`s count 0, 1, 2…
fn events(text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        if block.lines().all(|l| l.starts_with(':')) {
            continue;
        }
        let mut lines = block.lines();
        let name = lines.next().and_then(|l| l.strip_prefix("event: "));
        let data = lines.next().and_then(|l| l.strip_prefix("data: "));
        let (Some(name), Some(data)) = (name, data) else {
            panic!("not an event: {block:?} in {text}");
        };
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["type"], name, "{block}");
        assert_eq!(v["sequence_number"], out.len(), "{text}");
        out.push(v);
    }
    out
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

fn joined(events: &[Value], kind: &str) -> String {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| e["delta"].as_str().unwrap())
        .collect()
}

fn money(v: &Value) -> Money {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"))
}

async fn spent(gw: &TestGateway) -> Money {
    let (s, key) = get_json(gw, "/v1/key", KEY).await;
    assert_eq!(s, 200, "{key}");
    money(&key["data"]["usage"])
}

/// The generation record's `total_cost` of request `id`.
async fn generation_cost(gw: &TestGateway, id: &str) -> Money {
    let (s, g) = get_json(gw, &format!("/v1/generation?id={id}"), KEY).await;
    assert_eq!(s, 200, "{g}");
    money(&g["data"]["total_cost"])
}

fn chat_chunk(delta: Value, finish: Option<&str>) -> String {
    json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    .to_string()
}

fn chat_usage(prompt: u64, completion: u64) -> String {
    json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
           "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                    "total_tokens": prompt + completion}})
    .to_string()
}

fn chat_completion(message: Value, finish: &str, prompt: u64, completion: u64) -> Response {
    json(
        200,
        json!({"id": "c", "object": "chat.completion", "created": 1, "model": "up-model",
               "choices": [{"index": 0, "message": message, "finish_reason": finish}],
               "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion}}),
    )
}

fn schema() -> Value {
    json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
}

/// The same request's `response` object, for the golden test.
fn golden(id: &str, created_at: &Value) -> Value {
    json!({
        "id": id, "object": "response", "created_at": created_at, "status": "completed",
        "background": false, "error": null, "incomplete_details": null,
        "instructions": "Be brief.", "max_output_tokens": 50, "model": "openai/m",
        "provider": "oai",
        "output": [{"type": "message", "id": format!("msg_{id}_0"), "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "{\"city\":\"Paris\"}",
                                 "annotations": [], "logprobs": []}]}],
        "parallel_tool_calls": true, "previous_response_id": null,
        "reasoning": {"effort": "low"}, "store": false, "temperature": 0.5,
        "text": {"format": {"type": "json_schema", "name": "place", "schema": schema(), "strict": true}},
        "tool_choice": "auto", "tools": [], "top_p": null, "truncation": "disabled",
        "usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                  "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": 15, "cost": 0.000018,
                  "cost_details": {"prompt": 0.000012, "cached_prompt": 0, "cache_write": 0,
                                   "completion": 0.000006}},
        "user": "u-1", "metadata": {"app": "demo"}
    })
}

#[tokio::test]
async fn openai_string_input_golden_json_with_format_effort_and_exact_money() {
    let up = upstream(|_, _| async {
        chat_completion(
            json!({"role": "assistant", "content": "{\"city\":\"Paris\"}"}),
            "stop",
            12,
            3,
        )
    })
    .await;
    let gw = gw_for(&up.url(), NOWHERE, NOWHERE).await;
    let before = spent(&gw).await;
    let res = post(
        &gw,
        json!({"model": "openai/m", "input": "Where?", "instructions": "Be brief.",
               "max_output_tokens": 50, "temperature": 0.5, "user": "u-1", "store": true,
               "metadata": {"app": "demo"}, "reasoning": {"effort": "low"},
               "text": {"format": {"type": "json_schema", "name": "place", "schema": schema(), "strict": true}},
               "some_future_field": 1}),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "oai");
    assert_eq!(res.headers()["x-model-used"], "openai/m");
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = res.text().await.unwrap();
    assert!(text.contains(r#""cost":0.000018"#), "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body, golden(&id, &body["created_at"]));
    assert!(body["created_at"].as_u64().unwrap() > 1_600_000_000);

    // What the upstream got: chat, with the format and effort translated.
    let seen = &up.requests()[0];
    assert_eq!(seen.path, "/v1/chat/completions");
    let b = &seen.body;
    assert_eq!(
        b["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where?"}])
    );
    assert_eq!(
        b["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "place", "schema": schema(), "strict": true}})
    );
    assert_eq!(b["reasoning_effort"], "low");
    assert_eq!(b["max_completion_tokens"], 50);
    assert_eq!(
        (b["temperature"].as_f64(), b["user"].as_str()),
        (Some(0.5), Some("u-1"))
    );
    for absent in [
        "input",
        "instructions",
        "store",
        "metadata",
        "text",
        "reasoning",
        "some_future_field",
    ] {
        assert!(b.get(absent).is_none(), "{absent} sent upstream: {b}");
    }

    // Money is exact: the reply's cost is the generation's and the debit.
    let cost = money(&body["usage"]["cost"]);
    assert_eq!(cost, Money::from_pico(18_000_000));
    assert_eq!(generation_cost(&gw, &id).await, cost);
    assert_eq!(spent(&gw).await - before, cost);
}

#[tokio::test]
async fn openai_stream_is_the_typed_event_sequence_ending_in_completed_with_usage() {
    let up = upstream(|_, _| async {
        sse(
            vec![
                chat_chunk(json!({"role": "assistant", "content": ""}), None),
                chat_chunk(json!({"content": "Hel"}), None),
                chat_chunk(json!({"content": "lo"}), None),
                chat_chunk(json!({}), Some("stop")),
                chat_usage(9, 2),
                "[DONE]".into(),
            ],
            Duration::ZERO,
        )
    })
    .await;
    let gw = gw_for(&up.url(), NOWHERE, NOWHERE).await;
    let before = spent(&gw).await;
    let res = post(
        &gw,
        json!({"model": "openai/m", "input": "Hi", "stream": true}),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = res.text().await.unwrap();
    let ev = events(&text);
    assert_eq!(
        types(&ev),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ],
        "{text}"
    );
    assert_eq!(up.requests()[0].body["stream"], true);
    let created = &ev[0]["response"];
    assert_eq!(
        (created["id"].as_str(), created["status"].as_str()),
        (Some(id.as_str()), Some("in_progress"))
    );
    assert_eq!(created["output"], json!([]));
    let msg_id = format!("msg_{id}_0");
    assert_eq!(
        ev[2]["item"],
        json!({"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []})
    );
    assert_eq!(ev[2]["output_index"], 0);
    assert_eq!(
        ev[3]["part"],
        json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
    );
    assert_eq!(
        ev[4],
        json!({"type": "response.output_text.delta", "sequence_number": 4, "output_index": 0,
               "item_id": msg_id, "content_index": 0, "delta": "Hel", "logprobs": []})
    );
    assert_eq!(joined(&ev, "response.output_text.delta"), "Hello");
    assert_eq!(ev[6]["text"], "Hello");
    assert_eq!(ev[8]["item"]["status"], "completed");
    assert_eq!(ev[8]["item"]["content"][0]["text"], "Hello");
    let done = &ev[9]["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"], json!([ev[8]["item"]]));
    let u = &done["usage"];
    assert_eq!(
        (&u["input_tokens"], &u["output_tokens"], &u["total_tokens"]),
        (&json!(9), &json!(2), &json!(11))
    );
    let cost = money(&u["cost"]);
    assert_eq!(cost, Money::from_pico(13_000_000));
    assert_eq!(generation_cost(&gw, &id).await, cost);
    assert_eq!(spent(&gw).await - before, cost);
}

#[tokio::test]
async fn openai_function_call_round_trip_streamed_and_sent_back() {
    let up = upstream(|seen: Seen, n| async move {
        if n == 0 {
            let call = |i: u32, id: Option<&str>, name: Option<&str>, args: &str| {
                let mut f = json!({"arguments": args});
                if let Some(name) = name {
                    f["name"] = json!(name);
                }
                let mut tc = json!({"index": i, "function": f});
                if let Some(id) = id {
                    tc["id"] = json!(id);
                    tc["type"] = json!("function");
                }
                chat_chunk(json!({"tool_calls": [tc]}), None)
            };
            assert_eq!(seen.body["tools"][0]["function"]["name"], "get_weather");
            sse(
                vec![
                    call(0, Some("call_P"), Some("get_weather"), ""),
                    call(0, None, None, "{\"city\":"),
                    call(0, None, None, "\"Paris\"}"),
                    call(
                        1,
                        Some("call_O"),
                        Some("get_weather"),
                        "{\"city\":\"Oslo\"}",
                    ),
                    chat_chunk(json!({}), Some("tool_calls")),
                    chat_usage(20, 10),
                    "[DONE]".into(),
                ],
                Duration::ZERO,
            )
        } else {
            chat_completion(
                json!({"role": "assistant", "content": "Sunny and rainy."}),
                "stop",
                40,
                4,
            )
        }
    })
    .await;
    let gw = gw_for(&up.url(), NOWHERE, NOWHERE).await;
    let tools = json!([{"type": "function", "name": "get_weather", "description": "Weather",
                        "parameters": schema(), "strict": true}]);
    let res = post(
        &gw,
        json!({"model": "openai/m", "input": "Weather in Paris and Oslo?", "tools": tools,
               "tool_choice": "required", "parallel_tool_calls": true, "stream": true}),
    )
    .await;
    let ev = events(&res.text().await.unwrap());
    assert_eq!(
        types(&ev),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(
        (&ev[2]["item"]["call_id"], &ev[2]["item"]["arguments"]),
        (&json!("call_P"), &json!(""))
    );
    assert_eq!(ev[5]["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(ev[5]["name"], "get_weather");
    assert_eq!(ev[7]["output_index"], 1);
    let out = &ev[11]["response"]["output"];
    assert_eq!(
        out[1],
        json!({"type": "function_call", "id": out[1]["id"], "call_id": "call_O", "name": "get_weather",
               "arguments": "{\"city\":\"Oslo\"}", "status": "completed"})
    );
    assert_eq!(ev[11]["response"]["tools"], tools);
    let seen = &up.requests()[0].body;
    assert_eq!(seen["tool_choice"], "required");
    assert_eq!(seen["parallel_tool_calls"], true);
    assert_eq!(seen["tools"][0]["function"]["strict"], true);

    // The client sends the calls back with their outputs, and the whole history.
    let mut input = vec![json!({"role": "user", "content": "Weather in Paris and Oslo?"})];
    input.extend(out.as_array().unwrap().iter().cloned());
    input.push(json!({"type": "function_call_output", "call_id": "call_P", "output": "sunny"}));
    input.push(json!({"type": "function_call_output", "call_id": "call_O", "output": "rain"}));
    let res = post(
        &gw,
        json!({"model": "openai/m", "input": input, "tools": tools}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["output"][0]["content"][0]["text"], "Sunny and rainy.");
    let msgs = &up.requests()[1].body["messages"];
    assert_eq!(
        *msgs,
        json!([
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {"role": "assistant", "tool_calls": [
                {"id": "call_P", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_O", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}
            ]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_P"},
            {"role": "tool", "content": "rain", "tool_call_id": "call_O"}
        ])
    );
}

fn ant_ev(name: &str, data: Value) -> (Option<String>, String) {
    (Some(name.to_string()), data.to_string())
}

#[tokio::test]
async fn anthropic_gets_system_thinking_and_tool_blocks_and_streams_reasoning_items() {
    let up = upstream(|seen: Seen, _| async move {
        if seen.body["stream"] == true {
            let delta = |i: u32, d: Value| {
                ant_ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i, "delta": d}),
                )
            };
            sse_named(
                vec![
                    ant_ev(
                        "message_start",
                        json!({"type": "message_start", "message": {
                        "id": "msg_1", "type": "message", "role": "assistant", "content": [],
                        "model": "claude-sonnet-4", "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": 20, "output_tokens": 1}}}),
                    ),
                    ant_ev(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "thinking", "thinking": ""}}),
                    ),
                    delta(
                        0,
                        json!({"type": "thinking_delta", "thinking": "Paris is "}),
                    ),
                    delta(
                        0,
                        json!({"type": "thinking_delta", "thinking": "in France."}),
                    ),
                    delta(0, json!({"type": "signature_delta", "signature": "sig"})),
                    ant_ev(
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": 0}),
                    ),
                    ant_ev(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": 1,
                        "content_block": {"type": "text", "text": ""}}),
                    ),
                    delta(1, json!({"type": "text_delta", "text": "France."})),
                    ant_ev(
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": 1}),
                    ),
                    ant_ev(
                        "message_delta",
                        json!({"type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                        "usage": {"output_tokens": 30}}),
                    ),
                    ant_ev("message_stop", json!({"type": "message_stop"})),
                ],
                Duration::ZERO,
            )
        } else {
            json(
                200,
                json!({"id": "msg_2", "type": "message", "role": "assistant",
                "model": "claude-sonnet-4", "content": [{"type": "text", "text": "Sunny."}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 50, "output_tokens": 3}}),
            )
        }
    })
    .await;
    let gw = gw_for(NOWHERE, &up.url(), NOWHERE).await;
    let res = post(
        &gw,
        json!({"model": "anthropic/claude", "instructions": "Be brief.", "stream": true,
               "input": [{"role": "user", "content": [{"type": "input_text", "text": "Where is Paris?"}]}],
               "max_output_tokens": 4096, "reasoning": {"effort": "low"},
               "text": {"format": {"type": "json_schema", "name": "x", "schema": schema()}}}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let ev = events(&res.text().await.unwrap());
    assert_eq!(
        types(&ev),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.reasoning_summary_part.added",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.done",
            "response.reasoning_summary_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(
        joined(&ev, "response.reasoning_summary_text.delta"),
        "Paris is in France."
    );
    assert_eq!(ev[4]["summary_index"], 0);
    let done = &ev[15]["response"];
    assert_eq!(
        done["output"][0]["summary"],
        json!([{"type": "summary_text", "text": "Paris is in France."}])
    );
    assert_eq!(done["output"][1]["content"][0]["text"], "France.");
    assert_eq!(done["usage"]["output_tokens"], 30);
    assert_eq!(done["model"], "anthropic/claude");

    let b = &up.requests()[0].body;
    assert_eq!(b["system"], "Be brief.");
    assert_eq!(
        b["thinking"],
        json!({"type": "enabled", "budget_tokens": 2048})
    );
    assert_eq!(b["max_tokens"], 4096);
    // Anthropic has no structured output: the format is dropped, not sent.
    assert!(
        b.get("response_format").is_none() && b.get("text").is_none(),
        "{b}"
    );

    // A function call round trip: tool_use and tool_result blocks upstream.
    let res = post(
        &gw,
        json!({"model": "anthropic/claude", "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "x"}]},
            {"type": "function_call", "call_id": "toolu_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call_output", "call_id": "toolu_1", "output": "sunny"}
        ], "tools": [{"type": "function", "name": "get_weather", "parameters": schema()}]}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["output"][0]["content"][0]["text"], "Sunny.");
    let msgs = &up.requests()[1].body["messages"];
    assert_eq!(
        msgs[1]["content"][0],
        json!({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}})
    );
    assert_eq!(msgs[2]["content"][0]["type"], "tool_result");
    assert_eq!(msgs[2]["content"][0]["tool_use_id"], "toolu_1");
}

#[tokio::test]
async fn gemini_gets_the_json_schema_and_thinking_and_its_calls_come_back_as_items() {
    let up = upstream(|_, _| async {
        json(
            200,
            json!({"candidates": [{"content": {"role": "model", "parts": [
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
                  "finishReason": "STOP", "index": 0}],
                  "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 20,
                                    "thoughtsTokenCount": 10, "cachedContentTokenCount": 16,
                                    "totalTokenCount": 70}}),
        )
    })
    .await;
    let gw = gw_for(NOWHERE, NOWHERE, &up.url()).await;
    let res = post(
        &gw,
        json!({"model": "google/gemini", "input": [
                 {"role": "user", "content": "Weather?"},
                 {"type": "function_call", "call_id": "c0", "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
                 {"type": "function_call_output", "call_id": "c0", "output": "{\"sky\":\"rain\"}"},
                 {"role": "user", "content": "And Paris?"}],
               "tools": [{"type": "function", "name": "get_weather", "parameters": schema()}],
               "reasoning": {"effort": "low"},
               "text": {"format": {"type": "json_schema", "name": "x", "schema": schema()}}}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let call = &body["output"][0];
    assert_eq!(call["type"], "function_call");
    assert_eq!(
        (&call["name"], &call["arguments"]),
        (&json!("get_weather"), &json!("{\"city\":\"Paris\"}"))
    );
    assert!(
        call["call_id"].as_str().unwrap().starts_with("call_"),
        "{call}"
    );
    assert_eq!(body["output"].as_array().unwrap().len(), 1, "{body}");
    let u = &body["usage"];
    assert_eq!(u["input_tokens_details"]["cached_tokens"], 16);
    assert_eq!(u["output_tokens_details"]["reasoning_tokens"], 10);

    let b = &up.requests()[0].body;
    let g = &b["generationConfig"];
    assert_eq!(g["responseMimeType"], "application/json");
    assert_eq!(g["responseJsonSchema"], schema());
    assert!(
        g["thinkingConfig"]["thinkingBudget"].as_u64().unwrap() > 0,
        "{b}"
    );
    let contents = b["contents"].as_array().unwrap();
    assert_eq!(
        contents[1]["parts"][0]["functionCall"]["name"],
        "get_weather"
    );
    assert_eq!(
        contents[2]["parts"][0]["functionResponse"]["name"],
        "get_weather"
    );
}

#[tokio::test]
async fn mock_answers_and_a_max_output_tokens_cut_is_incomplete_at_its_exact_price() {
    let gw = mock_gw().await;
    let res = post(&gw, json!({"model": "mock/echo", "input": "hello there"})).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["output"][0]["content"][0]["text"], "hello there");
    assert_eq!(body["status"], "completed");

    for stream in [false, true] {
        let before = spent(&gw).await;
        let res = post(
            &gw,
            json!({"model": "mock/lorem", "input": "go", "max_output_tokens": 5, "stream": stream}),
        )
        .await;
        let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
        let text = res.text().await.unwrap();
        let body = if stream {
            let ev = events(&text);
            assert_eq!(
                joined(&ev, "response.output_text.delta"),
                "lorem ipsum dolor sit amet"
            );
            let last = ev.last().unwrap();
            assert_eq!(last["type"], "response.completed");
            last["response"].clone()
        } else {
            serde_json::from_str(&text).unwrap()
        };
        assert_eq!(body["status"], "incomplete", "{body}");
        assert_eq!(
            body["incomplete_details"],
            json!({"reason": "max_output_tokens"})
        );
        assert_eq!(body["output"][0]["status"], "incomplete");
        assert_eq!(body["max_output_tokens"], 5);
        let cost = money(&body["usage"]["cost"]);
        assert_eq!(cost, Money::from_pico(5_000_000), "5 words at $1/Mtok");
        assert_eq!(generation_cost(&gw, &id).await, cost);
        assert_eq!(spent(&gw).await - before, cost);
    }
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["type"].is_string() && body["error"]["message"].is_string(),
        "{body}"
    );
}

#[tokio::test]
async fn errors_before_the_start_are_spec_shaped_and_stateful_requests_are_refused() {
    let gw = mock_gw().await;
    let send = |key: &'static str, body: Value| {
        let req = request(&gw, key, &body);
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap())
        }
    };
    let (s, b) = send(
        KEY,
        json!({"model": "mock/echo", "input": "x", "previous_response_id": "resp_1"}),
    )
    .await;
    assert_error(s, &b, 400, "invalid_request");
    assert_eq!(
        b["error"]["message"],
        "previous_response_id is not supported: this gateway is stateless; send the whole conversation in `input`"
    );
    assert_eq!(b["error"]["type"], "invalid_request_error");
    let (s, b) = send(
        KEY,
        json!({"model": "mock/echo", "input": "x", "tools": [{"type": "file_search"}]}),
    )
    .await;
    assert_error(s, &b, 400, "invalid_request");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`file_search`"),
        "{b}"
    );
    let (s, b) = send(
        KEY,
        json!({"model": "mock/echo", "input": "x", "background": true}),
    )
    .await;
    assert_error(s, &b, 400, "invalid_request");
    let (s, b) = send(KEY, json!({"model": "mock/echo", "input": 7})).await;
    assert_error(s, &b, 400, "invalid_request");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("`input`"),
        "{b}"
    );

    for stream in [false, true] {
        let (s, b) = send(
            "sk-unknown-key-0123456789",
            json!({"model": "mock/echo", "input": "x", "stream": stream}),
        )
        .await;
        assert_error(s, &b, 401, "invalid_api_key");
        let (s, b) = send(
            KEY,
            json!({"model": "no/such", "input": "x", "stream": stream}),
        )
        .await;
        assert_error(s, &b, 404, "model_not_found");
        let (s, b) = send(
            POOR,
            json!({"model": "mock/lorem", "input": "x", "max_output_tokens": 50, "stream": stream}),
        )
        .await;
        assert_error(s, &b, 402, "insufficient_credits");
    }
    // Under /api/v1 too.
    let res = client()
        .post(gw.url("/api/v1/responses"))
        .bearer_auth(KEY)
        .json(&json!({"model": "mock/echo", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["object"], "response");
}

#[tokio::test]
async fn an_upstream_break_after_the_start_is_response_failed_with_the_output_so_far() {
    // Content, then the body breaks off once the client has seen that content.
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let g2 = go.clone();
    let up = upstream(move |_, _| {
        let go = g2.clone();
        async move {
            let head = format!(
                "data: {}\n\n",
                chat_chunk(json!({"content": "partial"}), None)
            );
            let body = futures_util::stream::iter([Some(head), None]).then(move |e| {
                let go = go.clone();
                async move {
                    match e {
                        Some(head) => Ok(bytes::Bytes::from(head)),
                        None => {
                            go.notified().await;
                            Err(std::io::Error::other("upstream broke"))
                        }
                    }
                }
            });
            Response::builder()
                .status(200)
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(body))
                .unwrap()
        }
    })
    .await;
    let gw = gw_for(&up.url(), NOWHERE, NOWHERE).await;
    let mut res = post(
        &gw,
        json!({"model": "openai/m", "input": "Hi", "stream": true}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut text = String::new();
    while !text.contains("response.output_text.delta") {
        let chunk = res
            .chunk()
            .await
            .unwrap()
            .expect("the delta before the end");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    go.notify_one();
    while let Some(chunk) = res.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let ev = events(&text);
    let last = ev.last().unwrap();
    assert_eq!(last["type"], "response.failed", "{text}");
    let r = &last["response"];
    assert_eq!(r["status"], "failed");
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["error"]["code"], "upstream_error", "{r}");
    assert!(r["error"]["message"].is_string());
    assert_eq!(r["output"][0]["content"][0]["text"], "partial");
    assert_eq!(r["output"][0]["status"], "incomplete");
    assert_eq!(joined(&ev, "response.output_text.delta"), "partial");
    assert!(!text.contains("response.completed"));
}

#[tokio::test]
async fn a_cached_answer_is_a_hit_the_second_time_streamed_or_not() {
    let up = upstream(|seen: Seen, _| async move {
        if seen.body["stream"] == true {
            sse(
                vec![
                    chat_chunk(json!({"content": "cached"}), None),
                    chat_chunk(json!({}), Some("stop")),
                    chat_usage(5, 1),
                    "[DONE]".into(),
                ],
                Duration::ZERO,
            )
        } else {
            chat_completion(
                json!({"role": "assistant", "content": "cached"}),
                "stop",
                5,
                1,
            )
        }
    })
    .await;
    let gw = gw_for(&up.url(), NOWHERE, NOWHERE).await;
    for (n, stream) in [(1, false), (2, true)] {
        let body = json!({"model": "openai/m", "input": "same", "stream": stream});
        let ask = || {
            request(&gw, KEY, &body)
                .header("x-openrouter-cache", "true")
                .send()
        };
        let miss = ask().await.unwrap();
        assert_eq!(miss.headers()["x-openrouter-cache-status"], "MISS");
        let miss_text = miss.text().await.unwrap();
        let hit = ask().await.unwrap();
        assert_eq!(hit.headers()["x-openrouter-cache-status"], "HIT");
        let hit_id = hit.headers()["x-request-id"].to_str().unwrap().to_string();
        let hit_text = hit.text().await.unwrap();
        assert_eq!(up.hits(), n, "the hit called no upstream");
        let (miss_r, hit_r) = if stream {
            let (m, h) = (events(&miss_text), events(&hit_text));
            assert_eq!(types(&m), types(&h));
            assert_eq!(joined(&h, "response.output_text.delta"), "cached");
            (
                m.last().unwrap()["response"].clone(),
                h.last().unwrap()["response"].clone(),
            )
        } else {
            (
                serde_json::from_str::<Value>(&miss_text).unwrap(),
                serde_json::from_str::<Value>(&hit_text).unwrap(),
            )
        };
        assert_eq!(hit_r["id"], hit_id.as_str(), "the hit has its own id");
        assert_ne!(hit_r["id"], miss_r["id"]);
        assert_eq!(hit_r["output"][0]["content"][0]["text"], "cached");
        assert!(money(&miss_r["usage"]["cost"]) > Money::ZERO);
        assert_eq!(money(&hit_r["usage"]["cost"]), Money::ZERO);
        assert_eq!(hit_r["usage"]["input_tokens"], 0);
    }
}

#[tokio::test]
async fn an_idempotency_key_repeat_replays_the_recorded_answer() {
    let up = upstream(|_, _| async {
        chat_completion(
            json!({"role": "assistant", "content": "once"}),
            "stop",
            5,
            1,
        )
    })
    .await;
    let gw = gw_for(&up.url(), NOWHERE, NOWHERE).await;
    let body = json!({"model": "openai/m", "input": "do it once"});
    let send = || {
        request(&gw, KEY, &body)
            .header("idempotency-key", "resp-key-1")
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body: Value = first.json().await.unwrap();
    let before = spent(&gw).await;
    let again = send().await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again_body: Value = again.json().await.unwrap();
    assert_eq!(again_body, first_body);
    assert_eq!(up.hits(), 1);
    assert_eq!(spent(&gw).await, before, "no second charge");
}
