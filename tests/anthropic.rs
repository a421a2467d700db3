//! The real server against fake Anthropic Messages upstreams (SPEC §5): an OpenAI-format
//! client gets OpenAI-shaped answers, JSON and streamed, with tools; the upstream sees
//! its own key and version header, never the client's key.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const CLIENT_KEY: &str = "sk-client-never-forwarded";

/// One anthropic-kind provider per `(name, url)`, all serving `anthropic/claude`.
fn config(upstreams: &[(&str, &str)]) -> String {
    let mut s = String::from("[server]\nlisten = \"127.0.0.1:0\"\nkeepalive_secs = 10\n\n");
    for (name, url) in upstreams {
        s.push_str(&format!(
            "[[providers]]\nname = \"{name}\"\nkind = \"anthropic\"\nbase_url = \"{url}\"\napi_key = \"sk-ant-{name}\"\ntimeout_secs = 5\nstream_idle_timeout_secs = 5\n\n"
        ));
    }
    s.push_str("[[models]]\nid = \"anthropic/claude\"\nmax_output_tokens = 100\n");
    for (name, _) in upstreams {
        s.push_str(&format!(
            "  [[models.endpoints]]\n  provider = \"{name}\"\n  upstream_model = \"claude-sonnet-4-20250514\"\n  prompt_usd_per_mtok = 3\n  completion_usd_per_mtok = 15\n"
        ));
    }
    s.push_str(&format!(
        "\n[[keys]]\nsecret = \"{CLIENT_KEY}\"\ncredits_usd = 100\n"
    ));
    s
}

async fn post(gw: &TestGateway, body: Value) -> reqwest::Response {
    post_chat(gw, CLIENT_KEY, &body).await
}

fn tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    }}])
}

fn assert_anthropic_headers(seen: &Seen, name: &str) {
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(
        seen.header("x-api-key"),
        Some(format!("sk-ant-{name}").as_str())
    );
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert!(seen.header("authorization").is_none());
    assert!(
        !format!("{:?}", seen.headers).contains(CLIENT_KEY),
        "client key leaked upstream"
    );
}

fn ev(name: &str, data: Value) -> (Option<String>, String) {
    (Some(name.to_string()), data.to_string())
}

fn message_start() -> (Option<String>, String) {
    ev(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [],
            "model": "claude-sonnet-4-20250514", "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 20, "output_tokens": 1, "cache_read_input_tokens": 80, "cache_creation_input_tokens": 0}
        }}),
    )
}

fn text_stream(words: &[&str]) -> Vec<(Option<String>, String)> {
    let mut events = vec![
        message_start(),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev("ping", json!({"type": "ping"})),
    ];
    for w in words {
        events.push(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
        ));
    }
    events.extend([
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": words.len()}}),
        ),
        ev("message_stop", json!({"type": "message_stop"})),
    ]);
    events
}

#[tokio::test]
async fn json_tool_use_answer_comes_back_in_openai_shape() {
    let up = upstream(|_, _| async {
        json(
            200,
            json!({
                "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
                "content": [
                    {"type": "text", "text": "Checking both."},
                    {"type": "tool_use", "id": "toolu_P", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_O", "name": "get_weather", "input": {"city": "Oslo"}}
                ],
                "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": 30, "output_tokens": 40, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 0}
            }),
        )
    })
    .await;
    let gw = gateway(&config(&[("claude", &up.url())])).await;
    let res = post(
        &gw,
        json!({
            "model": "anthropic/claude",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris and Oslo?"}
            ],
            "tools": tools()
        }),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "claude");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "anthropic/claude");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Checking both.");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["id"], "toolu_P");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[1]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Oslo"}));
    assert_eq!(body["usage"]["prompt_tokens"], 1030);
    assert_eq!(body["usage"]["completion_tokens"], 40);
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"],
        1000
    );
    // 30 × $3/M + 1000 × $3/M (cache read defaults to the prompt price) + 40 × $15/M
    assert_eq!(body["usage"]["cost"].to_string(), "0.00369");

    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    assert_anthropic_headers(&seen[0], "claude");
    assert_eq!(seen[0].body["model"], "claude-sonnet-4-20250514");
    assert_eq!(seen[0].body["max_tokens"], 100);
    assert_eq!(seen[0].body["system"], "Be brief.");
    assert_eq!(
        seen[0].body["tools"][0]["input_schema"]["required"],
        json!(["city"])
    );
    assert!(seen[0].body.get("stream").is_none());
}

#[tokio::test]
async fn streamed_text_arrives_as_chunks_with_usage_and_done() {
    let up =
        upstream(|_, _| async { sse_named(text_stream(&["Hello", " wor", "ld"]), Duration::ZERO) })
            .await;
    let gw = gateway(&config(&[("claude", &up.url())])).await;
    let res = post(
        &gw,
        json!({
            "model": "anthropic/claude", "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "Say hello world"}]
        }),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let text = res.text().await.unwrap();
    assert_eq!(sse_text(&text), "Hello world");
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "stop"));
    let usage = chunks.iter().rev().find_map(|c| c.get("usage")).unwrap();
    assert_eq!(usage["prompt_tokens"], 100);
    assert_eq!(usage["completion_tokens"], 3);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 80);

    let seen = &up.requests()[0];
    assert_anthropic_headers(seen, "claude");
    assert_eq!(seen.body["stream"], true);
}

#[tokio::test]
async fn streamed_parallel_tool_calls_reassemble_in_openai_shape() {
    let up = upstream(|_, _| async {
        let tool = |i: u32, id: &str, parts: &[&str]| {
            let mut v = vec![ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": i,
                       "content_block": {"type": "tool_use", "id": id, "name": "get_weather", "input": {}}}),
            )];
            for p in parts {
                v.push(ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i,
                           "delta": {"type": "input_json_delta", "partial_json": p}}),
                ));
            }
            v.push(ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": i}),
            ));
            v
        };
        let mut events = vec![message_start()];
        events.extend(tool(0, "toolu_P", &["", "{\"city\":", " \"Paris\"}"]));
        events.extend(tool(1, "toolu_O", &["{\"city\": \"Oslo\"}"]));
        events.push(ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 55}}),
        ));
        events.push(ev("message_stop", json!({"type": "message_stop"})));
        sse_named(events, Duration::ZERO)
    })
    .await;
    let gw = gateway(&config(&[("claude", &up.url())])).await;
    let res = post(
        &gw,
        json!({
            "model": "anthropic/claude", "stream": true, "tools": tools(), "tool_choice": "required",
            "messages": [{"role": "user", "content": "Weather in Paris and Oslo?"}]
        }),
    )
    .await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    for d in sse_data(&text).iter().filter(|d| d.as_str() != "[DONE]") {
        let c: Value = serde_json::from_str(d).unwrap();
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
        for tc in c["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = tc["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            if let Some(id) = tc["id"].as_str() {
                calls[i].0 = id.into();
            }
            if let Some(n) = tc["function"]["name"].as_str() {
                calls[i].1.push_str(n);
            }
            if let Some(a) = tc["function"]["arguments"].as_str() {
                calls[i].2.push_str(a);
            }
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(
        calls,
        vec![
            (
                "toolu_P".into(),
                "get_weather".into(),
                "{\"city\": \"Paris\"}".into()
            ),
            (
                "toolu_O".into(),
                "get_weather".into(),
                "{\"city\": \"Oslo\"}".into()
            ),
        ]
    );
    let seen = &up.requests()[0];
    assert_eq!(seen.body["tool_choice"], json!({"type": "any"}));
}

#[tokio::test]
async fn overloaded_529_maps_to_upstream_error_with_the_provider_message() {
    let up = upstream(|_, _| async {
        json(
            529,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        )
    })
    .await;
    let gw = gateway(&config(&[("claude", &up.url())])).await;
    let res = post(
        &gw,
        json!({"model": "anthropic/claude", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(res.status(), 502);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("529") && message.contains("Overloaded"),
        "{message}"
    );
}

#[tokio::test]
async fn upstream_400_goes_back_to_the_client_with_its_message() {
    let up = upstream(|_, _| async {
        json(
            400,
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "messages: roles must alternate"}}),
        )
    })
    .await;
    let gw = gateway(&config(&[("claude", &up.url())])).await;
    let res = post(
        &gw,
        json!({"model": "anthropic/claude", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("roles must alternate"));
}

#[tokio::test]
async fn in_band_error_before_content_fails_the_attempt_and_falls_back() {
    let broken = upstream(|_, _| async {
        sse_named(
            vec![
                message_start(),
                ev(
                    "error",
                    json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
                ),
            ],
            Duration::ZERO,
        )
    })
    .await;
    let healthy =
        upstream(|_, _| async { sse_named(text_stream(&["fine"]), Duration::ZERO) }).await;
    let gw = gateway(&config(&[
        ("first", &broken.url()),
        ("second", &healthy.url()),
    ]))
    .await;
    let ask = json!({
        "model": "anthropic/claude", "stream": true,
        "provider": {"order": ["first", "second"]},
        "messages": [{"role": "user", "content": "hi"}]
    });
    let res = post(&gw, ask).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "second");
    let text = res.text().await.unwrap();
    assert_eq!(sse_text(&text), "fine");
    assert_eq!(broken.hits(), 1);
    assert_anthropic_headers(&healthy.requests()[0], "second");

    // With nowhere else to go, the in-band error is the client's 502.
    let gw = gateway(&config(&[("first", &broken.url())])).await;
    let res = post(
        &gw,
        json!({"model": "anthropic/claude", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(res.status(), 502);
    let body: Value = res.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Overloaded"));
}
