//! The real server against fake Gemini upstreams (SPEC §5): an OpenAI-format client
//! gets OpenAI-shaped answers, JSON and streamed, with tools; the upstream sees its own
//! `x-goog-api-key`, never the client's key, and streams ask for `alt=sse`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const CLIENT_KEY: &str = "sk-client-never-forwarded";

fn config(url: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
keepalive_secs = 10

[[providers]]
name = "google"
kind = "gemini"
base_url = "{url}"
api_key = "goog-upstream-key"
timeout_secs = 5
stream_idle_timeout_secs = 5

[[models]]
id = "google/gemini-2.5-flash"
max_output_tokens = 256
  [[models.endpoints]]
  provider = "google"
  upstream_model = "gemini-2.5-flash"
  prompt_usd_per_mtok = 0.3
  completion_usd_per_mtok = 2.5

[[keys]]
secret = "{CLIENT_KEY}"
credits_usd = 100
"#
    )
}

async fn post(gw: &TestGateway, body: Value) -> reqwest::Response {
    post_chat(gw, CLIENT_KEY, &body).await
}

fn assert_gemini_headers(seen: &Seen) {
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.header("x-goog-api-key"), Some("goog-upstream-key"));
    assert!(seen.header("authorization").is_none());
    assert!(
        !format!("{:?}", seen.headers).contains(CLIENT_KEY),
        "client key leaked upstream"
    );
}

fn tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    }}])
}

#[tokio::test]
async fn json_function_calls_come_back_as_tool_calls_and_results_go_up_named() {
    let up = upstream(|_, _| async {
        json(
            200,
            json!({
                "candidates": [{
                    "content": {"role": "model", "parts": [
                        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                        {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}
                    ]},
                    "finishReason": "STOP", "index": 0
                }],
                "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 20,
                                  "thoughtsTokenCount": 10, "cachedContentTokenCount": 16, "totalTokenCount": 70},
                "modelVersion": "gemini-2.5-flash"
            }),
        )
    })
    .await;
    let gw = gateway(&config(&up.url())).await;
    let res = post(
        &gw,
        json!({
            "model": "google/gemini-2.5-flash", "tools": tools(),
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris and Oslo?"}
            ]
        }),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "google");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "google/gemini-2.5-flash");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    let id0 = calls[0]["id"].as_str().unwrap().to_string();
    let id1 = calls[1]["id"].as_str().unwrap().to_string();
    assert!(id0.starts_with("call_0_") && id1.starts_with("call_1_"));
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(calls[1]["function"]["arguments"], "{\"city\":\"Oslo\"}");
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], 40);
    assert_eq!(usage["completion_tokens"], 30);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 16);
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 10);

    let seen = &up.requests()[0];
    assert_gemini_headers(seen);
    assert_eq!(seen.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(seen.query, None);
    assert_eq!(
        seen.body["systemInstruction"],
        json!({"parts": [{"text": "Be brief."}]})
    );
    assert_eq!(seen.body["generationConfig"]["maxOutputTokens"], 256);
    assert_eq!(
        seen.body["tools"][0]["functionDeclarations"][0]["name"],
        "get_weather"
    );

    // The client answers with the ids it got; Gemini gets the function names back.
    let res = post(
        &gw,
        json!({
            "model": "google/gemini-2.5-flash", "tools": tools(),
            "messages": [
                {"role": "user", "content": "Weather in Paris and Oslo?"},
                {"role": "assistant", "content": null, "tool_calls": calls},
                {"role": "tool", "tool_call_id": id0, "content": "{\"temp\": 18}"},
                {"role": "tool", "tool_call_id": id1, "content": "-3C"}
            ]
        }),
    )
    .await;
    assert_eq!(res.status(), 200);
    let seen = &up.requests()[1];
    assert_eq!(
        seen.body["contents"][2],
        json!({"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
            {"functionResponse": {"name": "get_weather", "response": {"content": "-3C"}}}
        ]})
    );
}

#[tokio::test]
async fn streamed_text_uses_alt_sse_and_ends_with_usage_and_done() {
    let up = upstream(|_, _| async {
        let ev = |t: &str, last: bool| {
            let mut v = json!({"candidates": [{"content": {"role": "model", "parts": [{"text": t}]}, "index": 0}],
                               "modelVersion": "gemini-2.5-flash"});
            if last {
                v["candidates"][0]["finishReason"] = json!("STOP");
                v["usageMetadata"] = json!({"promptTokenCount": 7, "candidatesTokenCount": 3, "totalTokenCount": 10});
            }
            v.to_string()
        };
        sse(
            vec![ev("Hello", false), ev(" wor", false), ev("ld", true)],
            Duration::ZERO,
        )
    })
    .await;
    let gw = gateway(&config(&up.url())).await;
    let res = post(
        &gw,
        json!({
            "model": "google/gemini-2.5-flash", "stream": true,
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
        .any(|c| c["choices"][0]["finish_reason"] == "stop"));
    let usage = chunks.iter().rev().find_map(|c| c.get("usage")).unwrap();
    assert_eq!(usage["prompt_tokens"], 7);
    assert_eq!(usage["completion_tokens"], 3);

    let seen = &up.requests()[0];
    assert_gemini_headers(seen);
    assert_eq!(
        seen.path,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    );
    assert_eq!(seen.query.as_deref(), Some("alt=sse"));
}

#[tokio::test]
async fn streamed_function_call_arrives_as_a_tool_call_chunk() {
    let up = upstream(|_, _| async {
        sse(
            vec![json!({
                "candidates": [{"content": {"role": "model", "parts": [
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}
                ]}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 6, "totalTokenCount": 18}
            })
            .to_string()],
            Duration::ZERO,
        )
    })
    .await;
    let gw = gateway(&config(&up.url())).await;
    let res = post(
        &gw,
        json!({
            "model": "google/gemini-2.5-flash", "stream": true, "tools": tools(),
            "tool_choice": "required",
            "messages": [{"role": "user", "content": "Weather in Paris?"}]
        }),
    )
    .await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let chunks: Vec<Value> = sse_data(&text)
        .iter()
        .filter(|d| d.as_str() != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let tc = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .unwrap();
    assert_eq!(tc[0]["index"], 0);
    assert!(tc[0]["id"].as_str().unwrap().starts_with("call_0_"));
    assert_eq!(tc[0]["function"]["name"], "get_weather");
    assert_eq!(tc[0]["function"]["arguments"], "{\"city\":\"Paris\"}");
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "tool_calls"));
    let seen = &up.requests()[0];
    assert_eq!(
        seen.body["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY"}})
    );
}

#[tokio::test]
async fn quota_429_maps_to_rate_limited_with_the_provider_message() {
    let up = upstream(|_, _| async {
        let mut r = json(
            429,
            json!({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED"}}),
        );
        r.headers_mut()
            .insert("retry-after", http::HeaderValue::from_static("7"));
        r
    })
    .await;
    let gw = gateway(&config(&up.url())).await;
    let res = post(
        &gw,
        json!({"model": "google/gemini-2.5-flash", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "7");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Resource has been exhausted"));
}

#[tokio::test]
async fn in_band_stream_error_before_content_fails_the_attempt() {
    let up = upstream(|_, _| async {
        sse(
            vec![json!({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}})
                .to_string()],
            Duration::ZERO,
        )
    })
    .await;
    let gw = gateway(&config(&up.url())).await;
    let res = post(
        &gw,
        json!({"model": "google/gemini-2.5-flash", "stream": true,
               "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(res.status(), 502);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("The model is overloaded."));
}
