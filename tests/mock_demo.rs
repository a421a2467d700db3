//! The mock provider through the whole stack, as a newcomer tries it on the demo:
//! tool calls on every inbound API, `n` choices, and slow endpoints (`delay_ms`,
//! `chunk_delay_ms`) that time out, fall back and stream in order.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Two mock providers: `slow` (its endpoint held back by `delay_ms`, past its
/// 1 s `timeout_secs`) and `fast`; `mock/echo` on both, slow first by price, and
/// `mock/drip` whose chunks come `chunk_delay_ms` apart.
fn config() -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[providers]]
name = "slow"
kind = "mock"
timeout_secs = 1

[[providers]]
name = "fast"
kind = "mock"

[[models]]
id = "mock/echo"
  [[models.endpoints]]
  provider = "fast"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1

[[models]]
id = "mock/slow-then-fast"
  [[models.endpoints]]
  provider = "slow"
  upstream_model = "echo"
  prompt_usd_per_mtok = 0
  completion_usd_per_mtok = 0
  delay_ms = 600000
  [[models.endpoints]]
  provider = "fast"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1

[[models]]
id = "mock/drip"
  [[models.endpoints]]
  provider = "fast"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1
  chunk_delay_ms = 50

[[keys]]
secret = "{TEST_KEY}"
credits_usd = 100
"#
    )
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "required": ["city"],
                       "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}})
}

async fn post(gw: &TestGateway, path: &str, body: &Value) -> (u16, String) {
    let res = client()
        .post(gw.url(path))
        .bearer_auth(TEST_KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.text().await.unwrap())
}

async fn post_ok(gw: &TestGateway, path: &str, body: &Value) -> Value {
    let (status, text) = post(gw, path, body).await;
    assert_eq!(status, 200, "{body}: {text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn a_tool_call_round_trip_on_chat_messages_and_responses() {
    let gw = gateway(&config()).await;
    // Chat completions: the call, then the result echoed back.
    let v = post_ok(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "mock/echo", "tools": [weather_tool()],
                "messages": [{"role": "user", "content": "Paris"}]}),
    )
    .await;
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "days": 0}));
    let v = post_ok(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "mock/echo", "tools": [weather_tool()], "messages": [
            {"role": "user", "content": "Paris"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 18 C"}]}),
    )
    .await;
    assert_eq!(v["choices"][0]["message"]["content"], "sunny, 18 C");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Streamed: tool-call deltas, the arguments whole once joined.
    let (status, text) = post(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "mock/echo", "stream": true, "tools": [weather_tool()],
                "messages": [{"role": "user", "content": "Rome"}]}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let data = sse_data(&text);
    let args: String = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"city": "Rome", "days": 0})
    );
    assert!(text.contains(r#""finish_reason":"tool_calls""#), "{text}");

    // Anthropic Messages: a tool_use block, then the tool_result echoed.
    let tool =
        json!({"name": "get_weather", "input_schema": weather_tool()["function"]["parameters"]});
    let v = post_ok(
        &gw,
        "/v1/messages",
        &json!({"model": "mock/echo", "max_tokens": 50, "tools": [tool],
                "messages": [{"role": "user", "content": "Oslo"}]}),
    )
    .await;
    assert_eq!(v["stop_reason"], "tool_use", "{v}");
    let block = v["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap()
        .clone();
    assert_eq!(block["input"], json!({"city": "Oslo", "days": 0}));
    let v = post_ok(
        &gw,
        "/v1/messages",
        &json!({"model": "mock/echo", "max_tokens": 50, "tools": [tool], "messages": [
            {"role": "user", "content": "Oslo"},
            {"role": "assistant", "content": [block]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"],
                                          "content": "snow"}]}]}),
    )
    .await;
    assert_eq!(v["content"][0]["text"], "snow", "{v}");

    // Responses: a function_call item.
    let v = post_ok(
        &gw,
        "/v1/responses",
        &json!({"model": "mock/echo", "input": "Lima",
                "tools": [{"type": "function", "name": "get_weather",
                           "parameters": weather_tool()["function"]["parameters"]}]}),
    )
    .await;
    let item = v["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap_or_else(|| panic!("{v}"))
        .clone();
    assert_eq!(item["name"], "get_weather");
    let args: Value = serde_json::from_str(item["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["city"], "Lima");
    let v = post_ok(
        &gw,
        "/v1/responses",
        &json!({"model": "mock/echo", "tools": [{"type": "function", "name": "get_weather"}],
                "input": [{"role": "user", "content": "Lima"}, item,
                          {"type": "function_call_output", "call_id": item["call_id"], "output": "fog"}]}),
    )
    .await;
    assert_eq!(v["output"][0]["content"][0]["text"], "fog", "{v}");
}

#[tokio::test]
async fn n_choices_are_answered_and_charged_each() {
    let gw = gateway(&config()).await;
    let v = post_ok(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "mock/echo", "n": 2, "provider": {"require_parameters": true},
                "messages": [{"role": "user", "content": "a b c"}]}),
    )
    .await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["choices"][1]["message"]["content"], "a b c");
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let (_, g) = get_json(
        &gw,
        &format!("/v1/generation?id={}", v["id"].as_str().unwrap()),
        TEST_KEY,
    )
    .await;
    assert_eq!(g["data"]["total_cost"], v["usage"]["cost"]);
}

#[tokio::test]
async fn a_delay_past_the_timeout_falls_back_to_the_next_endpoint() {
    let gw = gateway(&config()).await;
    let started = Instant::now();
    let v = post_ok(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "mock/slow-then-fast", "provider": {"order": ["slow", "fast"]},
                "messages": [{"role": "user", "content": "hello"}]}),
    )
    .await;
    // slow's 1 s timeout, not its 600 s delay.
    assert!(
        started.elapsed() < SOCKET_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(v["provider"], "fast");
    assert_eq!(v["choices"][0]["message"]["content"], "hello");
    let (_, g) = get_json(
        &gw,
        &format!("/v1/generation?id={}", v["id"].as_str().unwrap()),
        TEST_KEY,
    )
    .await;
    let attempts = g["data"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{g}");
    assert_eq!(attempts[0]["provider"], "slow");
    assert_eq!(attempts[0]["status"], "timeout", "{g}");
}

#[tokio::test]
async fn chunk_delays_stream_every_word_in_order() {
    let gw = gateway(&config()).await;
    let words = "one two three four five";
    let started = Instant::now();
    let (status, text) = post(
        &gw,
        "/v1/chat/completions",
        &json!({"model": "mock/drip", "stream": true,
                "messages": [{"role": "user", "content": words}]}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(sse_text(&text), words);
    // Role, five words, finish, usage: six gaps of 50 ms at least.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
}
