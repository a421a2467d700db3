//! `POST /v1/messages` and `/v1/messages/count_tokens` (SPEC §7.1) through the real
//! server, against fake anthropic, openai and gemini upstreams on 127.0.0.1:0 and the
//! mock provider: Anthropic-shaped answers (JSON and events) from every kind, the
//! anthropic pass-through with nothing lost, Anthropic-shaped errors before and after
//! the start, exact money, the response cache and idempotency keys.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const KEY: &str = "sk-messages-client-0123456789";
const POOR: &str = "sk-messages-poor-0123456789ab";
const BETA: &str = "interleaved-thinking-2025-05-14";

fn config(anthropic: &str, openai: &str, gemini: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
keepalive_secs = 10

[[providers]]
name = "claude"
kind = "anthropic"
base_url = "{anthropic}"
api_key = "sk-ant-upstream"
timeout_secs = 5
stream_idle_timeout_secs = 5

[[providers]]
name = "oai"
kind = "openai"
base_url = "{openai}/v1"
api_key = "sk-oai-upstream"
timeout_secs = 5
stream_idle_timeout_secs = 5

[[providers]]
name = "google"
kind = "gemini"
base_url = "{gemini}"
api_key = "goog-upstream"
timeout_secs = 5
stream_idle_timeout_secs = 5

[[providers]]
name = "mock"
kind = "mock"

[[models]]
id = "anthropic/claude"
max_output_tokens = 1000
  [[models.endpoints]]
  provider = "claude"
  upstream_model = "claude-sonnet-4-20250514"
  prompt_usd_per_mtok = 3
  completion_usd_per_mtok = 15

[[models]]
id = "openai/gpt"
  [[models.endpoints]]
  provider = "oai"
  upstream_model = "gpt-up"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[models]]
id = "google/gemini"
  [[models.endpoints]]
  provider = "google"
  upstream_model = "gemini-up"
  prompt_usd_per_mtok = 0.5
  completion_usd_per_mtok = 2.5

[[models]]
id = "mock/echo"
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[keys]]
secret = "{KEY}"
credits_usd = 100

[[keys]]
secret = "{POOR}"
credits_usd = 0.000001
"#
    )
}

/// A gateway whose upstreams are the given fakes (a silent one where `None`).
async fn gw(
    anthropic: Option<&Upstream>,
    openai: Option<&Upstream>,
    gemini: Option<&Upstream>,
) -> TestGateway {
    let unused = "http://127.0.0.1:9".to_string();
    let url = |u: Option<&Upstream>| u.map_or(unused.clone(), Upstream::url);
    gateway(&config(&url(anthropic), &url(openai), &url(gemini))).await
}

async fn post_messages(
    gw: &TestGateway,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// `(event name, data)` of every event of an SSE body (comments dropped).
fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| e.lines().any(|l| l.starts_with("event: ")))
        .map(|e| {
            let mut name = String::new();
            let mut data = Value::Null;
            for l in e.lines() {
                if let Some(n) = l.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = l.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap();
                }
            }
            assert_eq!(data["type"], name.as_str(), "{e}");
            (name, data)
        })
        .collect()
}

fn names(ev: &[(String, Value)]) -> Vec<&str> {
    ev.iter().map(|(n, _)| n.as_str()).collect()
}

/// The text of every `text_delta` of a stream.
fn streamed_text(ev: &[(String, Value)]) -> String {
    ev.iter()
        .filter(|(_, d)| d["delta"]["type"] == "text_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string())
        .collect()
}

/// `usage` (USD) of the key.
async fn key_usage(gw: &TestGateway, key: &str) -> f64 {
    let (s, v) = get_json(gw, "/v1/key", key).await;
    assert_eq!(s, 200, "{v}");
    v["data"]["usage"].as_f64().unwrap()
}

/// The generation record of `id` (`data`).
async fn generation(gw: &TestGateway, id: &str) -> Value {
    // Settlement is committed before the last byte; the record follows it.
    let (s, v) = get_json(gw, &format!("/v1/generation?id={id}"), KEY).await;
    assert_eq!(s, 200, "{v}");
    v["data"].clone()
}

/// Money exact: the answer's `usage.cost` is the generation's `total_cost` and what
/// the key was debited.
async fn assert_charged(gw: &TestGateway, id: &str, cost: &Value, before: f64) {
    let cost = cost.as_f64().expect("usage.cost is a number");
    assert!(cost > 0.0);
    let g = generation(gw, id).await;
    assert_eq!(g["total_cost"].as_f64(), Some(cost), "{g}");
    let after = key_usage(gw, KEY).await;
    assert!(
        ((after - before) - cost).abs() < 1e-12,
        "debited {} for {cost}",
        after - before
    );
}

fn ev(name: &str, data: Value) -> (Option<String>, String) {
    (Some(name.to_string()), data.to_string())
}

/// A client request exercising what only the pass-through keeps.
fn rich_request(stream: bool) -> Value {
    json!({
        "model": "anthropic/claude", "max_tokens": 500, "stream": stream, "top_k": 7,
        "x_future_field": {"kept": true},
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Use the tool.", "signature": "SIG-PREV"},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}
            ]}
        ],
        "tools": [{"name": "weather", "description": "Weather of a city",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    })
}

/// What the pass-through must deliver: the body as sent, with only model,
/// max_tokens and stream set by the gateway, and `anthropic-beta`.
fn assert_passed_through(seen: &Seen, sent: &Value, stream: bool) {
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.header("x-api-key"), Some("sk-ant-upstream"));
    assert_eq!(seen.header("anthropic-beta"), Some(BETA));
    assert!(
        !format!("{:?}", seen.headers).contains(KEY),
        "client key leaked"
    );
    let mut want = sent.clone();
    want["model"] = json!("claude-sonnet-4-20250514");
    want["max_tokens"] = json!(500);
    want["stream"] = json!(stream);
    assert_eq!(seen.body, want);
    assert_eq!(
        seen.body["system"][0]["cache_control"],
        json!({"type": "ephemeral"})
    );
    assert_eq!(
        seen.body["messages"][1]["content"][0]["signature"],
        "SIG-PREV"
    );
    assert_eq!(seen.body["top_k"], 7);
}

#[tokio::test]
async fn anthropic_upstream_gets_the_body_as_sent_and_the_signature_comes_back() {
    let up = upstream(|_, _| async {
        json(200, json!({
            "id": "msg_up", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
            "content": [
                {"type": "thinking", "thinking": "It is warm.", "signature": "SIG-NEW"},
                {"type": "text", "text": "18C in Paris."},
                {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Oslo"}}
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 20, "output_tokens": 30, "cache_read_input_tokens": 80, "cache_creation_input_tokens": 10}
        }))
    })
    .await;
    let gw = gw(Some(&up), None, None).await;
    let before = key_usage(&gw, KEY).await;
    let sent = rich_request(false);
    let res = post_messages(&gw, KEY, &sent, &[("anthropic-beta", BETA)]).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "claude");
    assert_eq!(res.headers()["x-model-used"], "anthropic/claude");
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: Value = res.json().await.unwrap();
    assert_passed_through(&up.requests()[0], &sent, false);

    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["model"], "anthropic/claude");
    assert_eq!(
        body["content"],
        json!([
            {"type": "thinking", "thinking": "It is warm.", "signature": "SIG-NEW"},
            {"type": "text", "text": "18C in Paris."},
            {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Oslo"}}
        ])
    );
    assert_eq!(body["stop_reason"], "tool_use");
    assert_eq!(body["stop_sequence"], Value::Null);
    let u = &body["usage"];
    assert_eq!(
        (
            &u["input_tokens"],
            &u["output_tokens"],
            &u["cache_read_input_tokens"],
            &u["cache_creation_input_tokens"]
        ),
        (&json!(20), &json!(30), &json!(80), &json!(10))
    );
    assert_charged(&gw, &id, &u["cost"], before).await;
}

#[tokio::test]
async fn anthropic_upstream_stream_relays_thinking_signature_text_and_tool_input() {
    let up = upstream(|_, _| async {
        let start = json!({"type": "message_start", "message": {"id": "msg_up", "type": "message", "role": "assistant",
            "content": [], "model": "claude-sonnet-4-20250514", "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5}}});
        let delta = |i: u32, d: Value| ev("content_block_delta", json!({"type": "content_block_delta", "index": i, "delta": d}));
        let stop = |i: u32| ev("content_block_stop", json!({"type": "content_block_stop", "index": i}));
        sse_named(vec![
            ev("message_start", start),
            ev("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}})),
            delta(0, json!({"type": "thinking_delta", "thinking": "Warm."})),
            delta(0, json!({"type": "signature_delta", "signature": "SIG-STREAM"})),
            stop(0),
            ev("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}})),
            ev("ping", json!({"type": "ping"})),
            delta(1, json!({"type": "text_delta", "text": "Checking "})),
            delta(1, json!({"type": "text_delta", "text": "Oslo."})),
            stop(1),
            ev("content_block_start", json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_9", "name": "weather", "input": {}}})),
            delta(2, json!({"type": "input_json_delta", "partial_json": "{\"city\":"})),
            delta(2, json!({"type": "input_json_delta", "partial_json": "\"Oslo\"}"})),
            stop(2),
            ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 40}})),
            ev("message_stop", json!({"type": "message_stop"})),
        ], Duration::ZERO)
    })
    .await;
    let gw = gw(Some(&up), None, None).await;
    let before = key_usage(&gw, KEY).await;
    let sent = rich_request(true);
    let res = post_messages(&gw, KEY, &sent, &[("anthropic-beta", BETA)]).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = res.text().await.unwrap();
    assert_passed_through(&up.requests()[0], &sent, true);
    let ev = events(&text);
    assert_eq!(
        names(&ev),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ],
        "{text}"
    );
    assert_eq!(ev[0].1["message"]["id"], id.as_str());
    assert_eq!(ev[0].1["message"]["model"], "anthropic/claude");
    assert_eq!(ev[1].1["content_block"]["type"], "thinking");
    assert_eq!(
        ev[2].1["delta"],
        json!({"type": "thinking_delta", "thinking": "Warm."})
    );
    assert_eq!(
        ev[3].1["delta"],
        json!({"type": "signature_delta", "signature": "SIG-STREAM"})
    );
    assert_eq!(streamed_text(&ev), "Checking Oslo.");
    assert_eq!(
        ev[9].1["content_block"],
        json!({"type": "tool_use", "id": "toolu_9", "name": "weather", "input": {}})
    );
    let args: String = ev[10..12]
        .iter()
        .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"city": "Oslo"})
    );
    let md = &ev[13].1;
    assert_eq!(md["delta"]["stop_reason"], "tool_use");
    assert_eq!(md["usage"]["input_tokens"], 25);
    assert_eq!(md["usage"]["output_tokens"], 40);
    assert_eq!(md["usage"]["cache_read_input_tokens"], 5);
    assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    assert_charged(&gw, &id, &md["usage"]["cost"], before).await;
}

/// The content of [`stop_sequence_upstream`]'s JSON answer: what the chat schema
/// cannot carry (two thinking blocks each signed, a redacted one, a server tool's
/// blocks, citations, a block type nobody knows yet).
fn rich_content() -> Value {
    json!([
        {"type": "thinking", "thinking": "Count.", "signature": "SIG-A"},
        {"type": "redacted_thinking", "data": "REDACTED-1"},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "count"}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
            {"type": "web_search_result", "url": "https://example.com", "title": "Ex", "encrypted_content": "EC"}]},
        {"type": "thinking", "thinking": "Now answer.", "signature": "SIG-B"},
        {"type": "text", "text": "1, 2, 3", "citations": [
            {"type": "web_search_result_location", "url": "https://example.com", "title": "Ex",
             "encrypted_index": "EI", "cited_text": "1 2 3"}]},
        {"type": "future_block", "x": 1}
    ])
}

/// An anthropic upstream that stops on a stop sequence after blocks the chat schema
/// has no place for: as JSON or as events, as `stream` asks.
async fn stop_sequence_upstream() -> Upstream {
    upstream(|seen, _| async move {
        let stream = seen.body["stream"] == json!(true);
        if !stream {
            return json(200, json!({
                "id": "msg_up", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
                "content": rich_content(),
                "stop_reason": "stop_sequence", "stop_sequence": "END",
                "usage": {"input_tokens": 10, "output_tokens": 6}
            }));
        }
        let start = json!({"type": "message_start", "message": {"id": "msg_up", "type": "message", "role": "assistant",
            "content": [], "model": "claude-sonnet-4-20250514", "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 1}}});
        let delta = |i: u32, d: Value| ev("content_block_delta", json!({"type": "content_block_delta", "index": i, "delta": d}));
        let stop = |i: u32| ev("content_block_stop", json!({"type": "content_block_stop", "index": i}));
        sse_named(vec![
            ev("message_start", start),
            ev("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}})),
            delta(0, json!({"type": "thinking_delta", "thinking": "Count."})),
            delta(0, json!({"type": "signature_delta", "signature": "SIG-A"})),
            stop(0),
            ev("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "REDACTED-1"}})),
            stop(1),
            ev("content_block_start", json!({"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}})),
            delta(2, json!({"type": "text_delta", "text": "1, 2, 3"})),
            delta(2, json!({"type": "citations_delta", "citation": {"type": "web_search_result_location", "cited_text": "1 2 3"}})),
            stop(2),
            ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"}, "usage": {"output_tokens": 6}})),
            ev("message_stop", json!({"type": "message_stop"})),
        ], Duration::ZERO)
    })
    .await
}

#[tokio::test]
async fn anthropic_blocks_stop_reason_and_stop_sequence_reach_a_messages_client_as_sent() {
    let up = stop_sequence_upstream().await;
    let gw = gw(Some(&up), None, None).await;
    let ask = |stream: bool| {
        json!({"model": "anthropic/claude", "max_tokens": 100, "stream": stream,
               "stop_sequences": ["END"], "thinking": {"type": "enabled", "budget_tokens": 1024},
               "messages": [{"role": "user", "content": "Count to 3, then say END."}]})
    };

    let body: Value = post_messages(&gw, KEY, &ask(false), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["content"], rich_content(), "{body}");
    assert_eq!(body["stop_reason"], "stop_sequence");
    assert_eq!(body["stop_sequence"], "END");

    let text = post_messages(&gw, KEY, &ask(true), &[])
        .await
        .text()
        .await
        .unwrap();
    let ev = events(&text);
    // Every content-block event as the upstream sent it, in order, nothing added.
    let blocks: Vec<&(String, Value)> = ev
        .iter()
        .filter(|(n, _)| n.starts_with("content_block_"))
        .collect();
    let want = [
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Count."}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "SIG-A"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "REDACTED-1"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "1, 2, 3"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "citations_delta", "citation": {"type": "web_search_result_location", "cited_text": "1 2 3"}}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 2}),
        ),
    ];
    assert_eq!(blocks.len(), want.len(), "{text}");
    for ((name, data), (want_name, want_data)) in blocks.iter().zip(&want) {
        assert_eq!((name.as_str(), data), (*want_name, want_data), "{text}");
    }
    let md = &ev.iter().find(|(n, _)| n == "message_delta").unwrap().1;
    assert_eq!(md["delta"]["stop_reason"], "stop_sequence");
    assert_eq!(md["delta"]["stop_sequence"], "END");
    assert_eq!(streamed_text(&ev), "1, 2, 3");
}

#[tokio::test]
async fn a_chat_client_of_the_same_upstream_gets_stop_and_nothing_anthropic_only() {
    let up = stop_sequence_upstream().await;
    let gw = gw(Some(&up), None, None).await;
    for stream in [false, true] {
        let res = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(
                &json!({"model": "anthropic/claude", "max_tokens": 100, "stream": stream,
                          "stop": ["END"], "messages": [{"role": "user", "content": "Count."}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        assert!(
            !text.contains("REDACTED") && !text.contains("stop_sequence"),
            "{text}"
        );
        assert!(text.contains(r#""finish_reason":"stop""#), "{text}");
    }
}

/// A tool round trip in Anthropic's shape, as the chat schema carries it.
fn tool_round_trip(model: &str, stream: bool) -> Value {
    json!({
        "model": model, "max_tokens": 64, "stream": stream,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "And Oslo?"}
            ]}
        ],
        "tools": [{"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "auto"}
    })
}

#[tokio::test]
async fn openai_upstream_gets_chat_and_answers_come_back_as_messages() {
    let up = upstream(|seen: Seen, _| async move {
        if seen.body["stream"] == true {
            let chunk = |delta: Value, finish: Value| {
                json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-up",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).to_string()
            };
            sse(vec![
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"content": "Oslo: "}), Value::Null),
                chunk(json!({"content": "-3C."}), Value::Null),
                chunk(json!({}), json!("stop")),
                json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-up", "choices": [],
                       "usage": {"prompt_tokens": 50, "completion_tokens": 4, "total_tokens": 54}}).to_string(),
                "[DONE]".to_string(),
            ], Duration::ZERO)
        } else {
            json(200, json!({
                "id": "c", "object": "chat.completion", "created": 1, "model": "gpt-up",
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                    "tool_calls": [{"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]}}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59}
            }))
        }
    })
    .await;
    let gw = gw(None, Some(&up), None).await;

    // Non-stream: a tool call comes back as a tool_use block.
    let before = key_usage(&gw, KEY).await;
    let res = post_messages(&gw, KEY, &tool_round_trip("openai/gpt", false), &[]).await;
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["model"], "openai/gpt");
    assert_eq!(
        body["content"],
        json!([{"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Oslo"}}])
    );
    assert_eq!(body["stop_reason"], "tool_use");
    assert_eq!(body["usage"]["input_tokens"], 50);
    assert_eq!(body["usage"]["output_tokens"], 9);
    assert_charged(&gw, &id, &body["usage"]["cost"], before).await;

    // What the openai upstream saw: the chat translation.
    let seen = &up.requests()[0];
    assert_eq!(seen.path, "/v1/chat/completions");
    let m = &seen.body["messages"];
    assert_eq!(m[0]["role"], "system");
    assert_eq!(
        m[0]["content"][0]["cache_control"],
        json!({"type": "ephemeral"}),
        "{m}"
    );
    assert_eq!(
        m[1],
        json!({"role": "user", "content": "Weather in Paris?"})
    );
    assert_eq!(m[2]["role"], "assistant");
    assert_eq!(m[2]["content"], "Checking.");
    assert_eq!(m[2]["tool_calls"][0]["id"], "call_1");
    assert_eq!(
        serde_json::from_str::<Value>(
            m[2]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap()
        )
        .unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(m[3]["role"], "tool");
    assert_eq!(m[3]["tool_call_id"], "call_1");
    assert_eq!(m[3]["content"], "18C");
    assert_eq!(m[4], json!({"role": "user", "content": "And Oslo?"}));
    assert_eq!(seen.body["tools"][0]["function"]["name"], "weather");
    assert_eq!(seen.body["tool_choice"], "auto");
    assert_eq!(seen.body["max_tokens"], 64);

    // Stream: text events, stop reason and usage in message_delta.
    let before = key_usage(&gw, KEY).await;
    let res = post_messages(&gw, KEY, &tool_round_trip("openai/gpt", true), &[]).await;
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = res.text().await.unwrap();
    let ev = events(&text);
    assert_eq!(
        names(&ev),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ],
        "{text}"
    );
    assert_eq!(
        ev[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    assert_eq!(streamed_text(&ev), "Oslo: -3C.");
    assert_eq!(ev[5].1["delta"]["stop_reason"], "end_turn");
    assert_eq!(ev[5].1["usage"]["output_tokens"], 4);
    assert_charged(&gw, &id, &ev[5].1["usage"]["cost"], before).await;
}

#[tokio::test]
async fn gemini_upstream_answers_as_messages() {
    let up = upstream(|seen: Seen, _| async move {
        let answer = |t: &str, last: bool| {
            let mut v = json!({"candidates": [{"content": {"role": "model", "parts": [{"text": t}]}, "index": 0}]});
            if last {
                v["candidates"][0]["finishReason"] = json!("MAX_TOKENS");
                v["usageMetadata"] = json!({"promptTokenCount": 11, "candidatesTokenCount": 5, "totalTokenCount": 16});
            }
            v
        };
        if seen.path.ends_with(":streamGenerateContent") {
            sse(vec![answer("Bonjour ", false).to_string(), answer("monde", true).to_string()], Duration::ZERO)
        } else {
            json(200, answer("Bonjour monde", true))
        }
    })
    .await;
    let gw = gw(None, None, Some(&up)).await;
    let body = |stream: bool| {
        json!({"model": "google/gemini", "max_tokens": 5, "stream": stream,
        "system": "Speak French.", "messages": [{"role": "user", "content": "Hello world"}]})
    };

    let before = key_usage(&gw, KEY).await;
    let res = post_messages(&gw, KEY, &body(false), &[]).await;
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "Bonjour monde"}])
    );
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["input_tokens"], 11);
    assert_charged(&gw, &id, &v["usage"]["cost"], before).await;
    let seen = &up.requests()[0];
    assert_eq!(
        seen.body["systemInstruction"]["parts"][0]["text"], "Speak French.",
        "{}",
        seen.body
    );

    let res = post_messages(&gw, KEY, &body(true), &[]).await;
    assert_eq!(res.status(), 200);
    let ev = events(&res.text().await.unwrap());
    assert_eq!(streamed_text(&ev), "Bonjour monde");
    assert_eq!(names(&ev).last(), Some(&"message_stop"));
    let md = &ev[ev.len() - 2].1;
    assert_eq!(md["delta"]["stop_reason"], "max_tokens");
    assert_eq!(md["usage"]["output_tokens"], 5);
}

#[tokio::test]
async fn mock_upstream_answers_as_messages_and_money_is_exact() {
    let gw = gw(None, None, None).await;
    let body = |stream: bool| {
        json!({"model": "mock/echo", "max_tokens": 50, "stream": stream,
        "system": "Echo.", "messages": [{"role": "user", "content": [{"type": "text", "text": "ping pong"}]}]})
    };
    let before = key_usage(&gw, KEY).await;
    let res = post_messages(&gw, KEY, &body(false), &[]).await;
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        (
            &v["type"],
            &v["role"],
            &v["model"],
            &v["content"],
            &v["stop_reason"]
        ),
        (
            &json!("message"),
            &json!("assistant"),
            &json!("mock/echo"),
            &json!([{"type": "text", "text": "ping pong"}]),
            &json!("end_turn")
        )
    );
    assert_charged(&gw, &id, &v["usage"]["cost"], before).await;

    let before = key_usage(&gw, KEY).await;
    let res = post_messages(&gw, KEY, &body(true), &[]).await;
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let ev = events(&res.text().await.unwrap());
    assert_eq!(names(&ev)[..2], ["message_start", "content_block_start"]);
    assert_eq!(streamed_text(&ev), "ping pong");
    assert_eq!(
        names(&ev)[ev.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let md = &ev[ev.len() - 2].1;
    assert_eq!(md["delta"]["stop_reason"], "end_turn");
    assert_charged(&gw, &id, &md["usage"]["cost"], before).await;
}

/// `{"type":"error","error":{"type": kind, …}}` with `status`.
async fn assert_anthropic_error(res: reqwest::Response, status: u16, kind: &str) -> String {
    assert_eq!(res.status(), status);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(
        v.get("code").is_none() && v["error"].get("code").is_none(),
        "{v}"
    );
    v["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn errors_before_the_start_are_anthropic_shaped() {
    let gw = gw(None, None, None).await;
    let ok = json!({"model": "mock/echo", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});

    let res = post_messages(&gw, "sk-nobody-at-all-0123456789", &ok, &[]).await;
    assert_anthropic_error(res, 401, "authentication_error").await;

    let mut no_max = ok.clone();
    no_max.as_object_mut().unwrap().remove("max_tokens");
    let m = assert_anthropic_error(
        post_messages(&gw, KEY, &no_max, &[]).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(m.contains("max_tokens"), "{m}");

    let mut unknown = ok.clone();
    unknown["model"] = json!("nobody/none");
    assert_anthropic_error(
        post_messages(&gw, KEY, &unknown, &[]).await,
        404,
        "not_found_error",
    )
    .await;

    let mut big = ok.clone();
    big["max_tokens"] = json!(100_000);
    assert_anthropic_error(
        post_messages(&gw, POOR, &big, &[]).await,
        402,
        "billing_error",
    )
    .await;

    let res = client()
        .get(gw.url("/api/v1/messages"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_anthropic_error(res, 405, "invalid_request_error").await;

    // Chat completions keep the OpenAI shape.
    let res = post_chat(
        &gw,
        "sk-nobody-at-all-0123456789",
        &json!({"model": "mock/echo", "messages": []}),
    )
    .await;
    assert_eq!(res.status(), 401);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
}

#[tokio::test]
async fn a_stream_broken_after_the_start_ends_with_an_error_event() {
    let up = upstream(|_, _| async {
        sse_named(vec![
            ev("message_start", json!({"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant",
                "content": [], "model": "c", "usage": {"input_tokens": 5, "output_tokens": 1}}})),
            ev("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
            ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "partial"}})),
            ev("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
        ], Duration::ZERO)
    })
    .await;
    let gw = gw(Some(&up), None, None).await;
    let body = json!({"model": "anthropic/claude", "max_tokens": 10, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let res = post_messages(&gw, KEY, &body, &[]).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let ev = events(&text);
    assert_eq!(
        names(&ev)[..3],
        [
            "message_start",
            "content_block_start",
            "content_block_delta"
        ],
        "{text}"
    );
    let (name, last) = ev.last().unwrap();
    assert_eq!(name, "error", "{text}");
    assert_eq!(last["error"]["type"], "api_error");
    assert!(!last["error"]["message"].as_str().unwrap().is_empty());
    assert!(!text.contains("message_stop"));
}

#[tokio::test]
async fn count_tokens_counts_with_the_tokenizer_for_free() {
    let gw = gw(None, None, None).await;
    let body = json!({"model": "mock/echo", "system": "Be brief.",
                      "messages": [{"role": "user", "content": "How many tokens is this sentence?"}]});
    let count = |key: &'static str, body: Value| {
        let gw = &gw;
        async move {
            client()
                .post(gw.url("/v1/messages/count_tokens"))
                .header("x-api-key", key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let before = key_usage(&gw, KEY).await;
    let res = count(KEY, body.clone()).await;
    assert_eq!(res.status(), 200);
    let n = res.json::<Value>().await.unwrap()["input_tokens"]
        .as_u64()
        .unwrap();
    assert!(n > 0);
    let again = count(KEY, body.clone())
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(again, json!({"input_tokens": n}));
    // Longer input, more tokens; the /api/v1 twin answers the same.
    let mut longer = body.clone();
    longer["messages"][0]["content"] =
        json!("How many tokens is this much longer sentence, with more words in it?");
    assert!(
        count(KEY, longer).await.json::<Value>().await.unwrap()["input_tokens"]
            .as_u64()
            .unwrap()
            > n
    );
    let twin = client()
        .post(gw.url("/api/v1/messages/count_tokens"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        twin.json::<Value>().await.unwrap(),
        json!({"input_tokens": n})
    );
    assert_eq!(key_usage(&gw, KEY).await, before, "count_tokens is free");

    assert_anthropic_error(
        count("sk-nobody-at-all-0123456789", body.clone()).await,
        401,
        "authentication_error",
    )
    .await;
    let mut unknown = body.clone();
    unknown["model"] = json!("nobody/none");
    assert_anthropic_error(count(KEY, unknown).await, 404, "not_found_error").await;
    assert_anthropic_error(
        count(KEY, json!({"model": "mock/echo"})).await,
        400,
        "invalid_request_error",
    )
    .await;
}

#[tokio::test]
async fn a_cached_repeat_is_a_hit_for_json_and_stream() {
    let gw = gw(None, None, None).await;
    for stream in [false, true] {
        let body = json!({"model": "mock/echo", "max_tokens": 20, "stream": stream,
                          "messages": [{"role": "user", "content": format!("cache me {stream}")}]});
        let first = post_messages(&gw, KEY, &body, &[("x-openrouter-cache", "true")]).await;
        assert_eq!(first.status(), 200);
        assert_eq!(first.headers()["x-openrouter-cache-status"], "MISS");
        let first_text = first.text().await.unwrap();
        let hit = post_messages(&gw, KEY, &body, &[("x-openrouter-cache", "true")]).await;
        assert_eq!(hit.status(), 200);
        assert_eq!(
            hit.headers()["x-openrouter-cache-status"],
            "HIT",
            "stream {stream}"
        );
        let hit_id = hit.headers()["x-request-id"].to_str().unwrap().to_string();
        let text = hit.text().await.unwrap();
        if stream {
            let ev = events(&text);
            assert_eq!(streamed_text(&ev), streamed_text(&events(&first_text)));
            assert_eq!(names(&ev).last(), Some(&"message_stop"));
            assert_eq!(ev[0].1["message"]["id"], hit_id.as_str());
            assert_eq!(ev[ev.len() - 2].1["usage"]["cost"], 0);
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["id"], hit_id.as_str());
            assert_eq!(v["content"][0]["text"], "cache me false");
            assert_eq!(v["usage"]["cost"], 0);
        }
    }
}

#[tokio::test]
async fn an_idempotent_repeat_replays_without_a_second_call() {
    let up = upstream(|_, _| async {
        json(
            200,
            json!({"id": "m", "type": "message", "role": "assistant", "model": "c",
            "content": [{"type": "text", "text": "once"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 1}}),
        )
    })
    .await;
    let gw = gw(Some(&up), None, None).await;
    let body = json!({"model": "anthropic/claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let first = post_messages(&gw, KEY, &body, &[("idempotency-key", "messages-1")]).await;
    assert_eq!(first.status(), 200);
    let first_id = first.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let first_body = first.text().await.unwrap();
    let after_first = key_usage(&gw, KEY).await;
    let again = post_messages(&gw, KEY, &body, &[("idempotency-key", "messages-1")]).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["x-request-id"].to_str().unwrap(), first_id);
    assert_eq!(again.text().await.unwrap(), first_body);
    assert_eq!(up.hits(), 1);
    assert_eq!(key_usage(&gw, KEY).await, after_first, "no second charge");
}
