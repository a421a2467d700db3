//! The real server against a fake OpenAI-compatible upstream (SPEC §3, §5).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const CLIENT_KEY: &str = TEST_KEY;

fn completion(text: &str) -> Value {
    json!({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    })
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    .to_string()
}

fn stream_events(words: &[&str]) -> Vec<String> {
    let mut ev = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    ev.extend(words.iter().map(|w| chunk(json!({"content": w}), None)));
    ev.push(chunk(json!({}), Some("stop")));
    ev.push(
        json!({"id": "c", "object": "chat.completion.chunk", "choices": [],
                   "usage": {"prompt_tokens": 5, "completion_tokens": words.len()}})
        .to_string(),
    );
    ev.push("[DONE]".into());
    ev
}

async fn post(gw: &TestGateway, body: Value) -> reqwest::Response {
    post_chat(gw, CLIENT_KEY, &body).await
}

fn ask(stream: bool) -> Value {
    json!({"model": "test/model", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

#[tokio::test]
async fn json_completion_is_served_with_headers_and_provider_key() {
    let up = upstream(|_, _| async { json(200, completion("Hello there")) }).await;
    let gw = gateway(&openai_config(&[("alpha", &up.url())], "")).await;
    let res = post(&gw, ask(false)).await;
    assert_eq!(res.status(), 200);
    let h = res.headers().clone();
    assert_eq!(h["x-provider"], "alpha");
    assert_eq!(h["x-model-used"], "test/model");
    let id = h["x-request-id"].to_str().unwrap().to_string();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["model"], "test/model");
    assert_eq!(body["provider"], "alpha");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello there");
    assert_eq!(body["usage"]["prompt_tokens"], 7);
    // 7 × $1/M + 3 × $2/M = $0.000013
    assert_eq!(body["usage"]["cost"].to_string(), "0.000013");

    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(
        seen[0].header("authorization"),
        Some("Bearer sk-upstream-alpha")
    );
    assert!(
        seen.iter()
            .all(|s| !format!("{:?}", s.headers).contains(CLIENT_KEY)),
        "client key leaked"
    );
    assert_eq!(seen[0].body["model"], "up-model");
    assert_eq!(
        seen[0].body["max_tokens"], 100,
        "the model's default bound is sent"
    );
}

#[tokio::test]
async fn streamed_completion_reassembles_and_ends_with_done() {
    let up =
        upstream(|_, _| async { sse(stream_events(&["Hel", "lo", " world"]), Duration::ZERO) })
            .await;
    let gw = gateway(&openai_config(&[("alpha", &up.url())], "")).await;
    let mut body = ask(true);
    body["stream_options"] = json!({"include_usage": true});
    let res = post(&gw, body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert_eq!(res.headers()["x-provider"], "alpha");
    let text = res.text().await.unwrap();
    assert_eq!(sse_text(&text), "Hello world");
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    assert!(usage["usage"]["cost"].as_f64().unwrap() > 0.0);
    let seen = &up.requests()[0];
    assert_eq!(seen.body["stream"], true);
    assert_eq!(seen.body["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn upstream_400_comes_back_in_spec_shape() {
    let up = upstream(|_, _| async {
        json(400, json!({"error": {"message": "Invalid schema for function 'f'", "type": "invalid_request_error"}}))
    })
    .await;
    let gw = gateway(&openai_config(&[("alpha", &up.url())], "")).await;
    let res = post(&gw, ask(false)).await;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Invalid schema for function 'f'"));
    assert_eq!(up.hits(), 1, "a client fault is not retried");
}

#[tokio::test]
async fn a_stream_with_gaps_shorter_than_the_idle_timeout_is_served_whole() {
    // 7 events 700 ms apart: 4.9 s in all, more than the 2 s idle timeout, but no
    // silence as long as it. The idle timer counts from the last event.
    let up =
        upstream(|_, _| async { sse(stream_events(&["a", "b", "c"]), Duration::from_millis(700)) })
            .await;
    let gw = gateway(&openai_config(&[("alpha", &up.url())], "")).await;
    let res = post(&gw, ask(true)).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(!text.contains("\"error\""), "{text}");
    assert_eq!(sse_text(&text), "abc");
}

#[tokio::test]
async fn a_stream_that_stalls_after_content_ends_with_an_idle_error() {
    use futures_util::StreamExt;
    let up = upstream(|_, _| async {
        let events: Vec<_> = stream_events(&["a", "b"])
            .into_iter()
            .take(3)
            .map(|d| {
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from(format!("data: {d}\n\n")))
            })
            .collect();
        let body = futures_util::stream::iter(events).chain(futures_util::stream::pending());
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from_stream(body))
            .unwrap()
    })
    .await;
    let gw = gateway(&openai_config(&[("alpha", &up.url())], "")).await;
    let res = post(&gw, ask(true)).await;
    assert_eq!(res.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(30), res.text())
        .await
        .expect("the gateway gives up on a stalled stream")
        .unwrap();
    assert_eq!(sse_text(&text), "ab");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(err["choices"][0]["finish_reason"], "error", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stalled"),
        "{err}"
    );
}

#[tokio::test]
async fn upstream_hang_times_out_with_504() {
    let up = upstream(|_, _| hang()).await;
    let gw = gateway(&openai_config(&[("alpha", &up.url())], "")).await;
    let started = std::time::Instant::now();
    let res = post(&gw, ask(false)).await;
    assert_eq!(res.status(), 504);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout");
    // timeout_secs = 2 in the test config; generous upper bound for a busy machine.
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[tokio::test]
async fn models_list_and_lookup_and_errors_for_paths() {
    let gw = gateway(&openai_config(&[("alpha", "http://127.0.0.1:9")], "")).await;
    let c = client();
    for prefix in ["/v1", "/api/v1"] {
        let list: Value = c
            .get(gw.url(&format!("{prefix}/models")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let m = &list["data"][0];
        assert_eq!(m["id"], "test/model");
        assert_eq!(m["object"], "model");
        assert_eq!(m["pricing"]["prompt"], "0.000001");
        assert_eq!(m["pricing"]["completion"], "0.000002");
    }
    let one: Value = c
        .get(gw.url("/v1/models/test/model"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["id"], "test/model");
    let missing = c.get(gw.url("/v1/models/none/such")).send().await.unwrap();
    assert_eq!(missing.status(), 404);

    let nope = c.get(gw.url("/v2/whatever")).send().await.unwrap();
    assert_eq!(nope.status(), 404);
    let body: Value = nope.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let wrong = c.get(gw.url("/v1/chat/completions")).send().await.unwrap();
    assert_eq!(wrong.status(), 405);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    assert_eq!(
        c.get(gw.url("/healthz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok"
    );
}

#[tokio::test]
async fn unknown_model_is_404_and_reaches_no_upstream() {
    let up = upstream(|_, _| async { json(200, completion("x")) }).await;
    let gw = gateway(&openai_config(&[("alpha", &up.url())], "")).await;
    let mut body = ask(false);
    body["model"] = json!("no/such-model");
    let res = post(&gw, body).await;
    assert_eq!(res.status(), 404);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn demo_config_answers_with_no_network() {
    let gw = gateway_with(switchboard::config::Config::demo()).await;
    let body =
        json!({"model": "mock/echo", "messages": [{"role": "user", "content": "say this back"}]});
    // The built-in demo's own key (exempt from the config secrets' length).
    let res = post_chat(&gw, "sk-demo", &body).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "say this back");
    assert_eq!(body["provider"], "mock");

    let body = json!({"model": "mock/lorem", "max_tokens": 5, "stream": true,
                      "messages": [{"role": "user", "content": "x"}]});
    let res = post_chat(&gw, "sk-demo", &body).await;
    let text = res.text().await.unwrap();
    assert_eq!(sse_text(&text).split_whitespace().count(), 5);
    assert!(text.ends_with("data: [DONE]\n\n"));
}
