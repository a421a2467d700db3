//! `POST /v1/completions` (the legacy completions API) through the whole stack: the
//! real server against the in-process mock and fake OpenAI / Anthropic upstreams on
//! 127.0.0.1, with the real ledger.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchboard::money::Money;

/// `oa` (OpenAI kind), `an` (Anthropic kind) and the mock, one model each.
fn config(oa: &str, an: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[providers]]
name = "oa"
kind = "openai"
base_url = "{oa}/v1"
api_key = "sk-upstream-oa"
timeout_secs = 5
stream_idle_timeout_secs = 5

[[providers]]
name = "an"
kind = "anthropic"
base_url = "{an}"
api_key = "sk-upstream-an"
timeout_secs = 5
stream_idle_timeout_secs = 5

[[providers]]
name = "mock"
kind = "mock"

[[models]]
id = "oa/model"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "oa"
  upstream_model = "up-model"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[models]]
id = "an/claude"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "an"
  upstream_model = "claude-x"
  prompt_usd_per_mtok = 3
  completion_usd_per_mtok = 15

[[models]]
id = "mock/echo"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[keys]]
secret = "{TEST_KEY}"
name = "legacy"
credits_usd = 1000
"#
    )
}

async fn unused() -> Upstream {
    upstream(|_, _| async { json(500, json!({"error": {"message": "not this one"}})) }).await
}

async fn complete(gw: &TestGateway, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .bearer_auth(TEST_KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn complete_ok(gw: &TestGateway, body: &Value) -> (reqwest::header::HeaderMap, Value) {
    let res = complete(gw, "/v1/completions", body).await;
    let (status, headers) = (res.status(), res.headers().clone());
    let text = res.text().await.unwrap();
    assert_eq!(status, 200, "{body}: {text}");
    (headers, serde_json::from_str(&text).unwrap())
}

fn money(v: &Value) -> Money {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"))
}

async fn spent(gw: &TestGateway) -> Money {
    let (status, body) = get_json(gw, "/v1/credits", TEST_KEY).await;
    assert_eq!(status, 200, "{body}");
    money(&body["data"]["total_usage"])
}

async fn generation(gw: &TestGateway, id: &str) -> Value {
    let (status, body) = get_json(gw, &format!("/v1/generation?id={id}"), TEST_KEY).await;
    assert_eq!(status, 200, "{body}");
    body["data"].clone()
}

/// The `data:` payloads of an SSE body, `[DONE]` last.
fn events(text: &str) -> Vec<Value> {
    let data = sse_data(text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn the_mock_answers_a_text_completion_charged_as_reported() {
    let (oa, an) = (unused().await, unused().await);
    let gw = gateway(&config(&oa.url(), &an.url())).await;
    let before = spent(&gw).await;
    let (headers, v) = complete_ok(
        &gw,
        &json!({"model": "mock/echo", "prompt": ["three little words"], "n": 2}),
    )
    .await;
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "mock/echo");
    assert_eq!(v["provider"], "mock");
    assert_eq!(headers["x-provider"], "mock");
    assert_eq!(headers["x-request-id"], v["id"].as_str().unwrap());
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["text"], "three little words");
        assert_eq!(c["index"], i);
        assert_eq!(c["logprobs"], Value::Null);
        assert_eq!(c["finish_reason"], "stop");
    }
    // 3 prompt words; 3 words per choice, 2 choices: 3 × $1 + 6 × $2 per Mtok.
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let cost = money(&v["usage"]["cost"]);
    assert_eq!(cost, "0.000015".parse().unwrap());
    assert_eq!(spent(&gw).await, before + cost);
    let g = generation(&gw, v["id"].as_str().unwrap()).await;
    assert_eq!(money(&g["total_cost"]), cost);
    assert_eq!(g["completion_tokens"], 6);
    assert_eq!(g["model"], "mock/echo");

    // The same under /api/v1, streamed, usage asked for.
    let before = spent(&gw).await;
    let res = complete(
        &gw,
        "/api/v1/completions",
        &json!({"model": "mock/echo", "prompt": "one two", "stream": true,
                "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let ev = events(&res.text().await.unwrap());
    let text: String = ev
        .iter()
        .filter_map(|e| e["choices"].get(0)?["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "one two");
    assert!(ev
        .iter()
        .all(|e| e["object"] == "text_completion" && e["id"] == id.as_str()));
    let usage = &ev.last().unwrap()["usage"];
    assert_eq!(ev.last().unwrap()["choices"], json!([]));
    assert_eq!(usage["completion_tokens"], 2);
    let cost = money(&usage["cost"]);
    assert_eq!(spent(&gw).await, before + cost);
    assert_eq!(money(&generation(&gw, &id).await["total_cost"]), cost);
    assert_eq!(generation(&gw, &id).await["streamed"], true);
}

#[tokio::test]
async fn an_openai_kind_upstream_gets_a_chat_request_and_a_cut_stream_ends_in_shape() {
    let oa = upstream(|seen, n| async move {
        if n == 0 {
            assert_eq!(seen.path, "/v1/chat/completions");
            return json(
                200,
                json!({"id": "up", "object": "chat.completion", "created": 1, "model": "up-model",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}}),
            );
        }
        // Content, then the stream ends without finishing.
        let chunk = |t: &str| {
            json!({"id": "up", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
                   "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]})
            .to_string()
        };
        sse(vec![chunk("par"), chunk("tial")], Duration::ZERO)
    })
    .await;
    let an = unused().await;
    let gw = gateway(&config(&oa.url(), &an.url())).await;
    let (_, v) = complete_ok(
        &gw,
        &json!({"model": "oa/model", "prompt": "Say hello", "max_tokens": 7, "temperature": 0.2,
                "stop": ["\n"], "seed": 3, "user": "u-1", "echo": false}),
    )
    .await;
    assert_eq!(v["choices"][0]["text"], "Hello!");
    assert_eq!(v["provider"], "oa");
    // 10 × $1 + 4 × $2 per Mtok.
    assert_eq!(money(&v["usage"]["cost"]), "0.000018".parse().unwrap());
    let sent = &oa.requests()[0].body;
    assert_eq!(sent["model"], "up-model");
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": "Say hello"}])
    );
    assert_eq!(
        (
            &sent["max_tokens"],
            &sent["temperature"],
            &sent["seed"],
            &sent["user"]
        ),
        (&json!(7), &json!(0.2), &json!(3), &json!("u-1"))
    );
    assert_eq!(sent["stop"], json!(["\n"]));
    assert!(
        sent.get("prompt").is_none() && sent.get("echo").is_none(),
        "{sent}"
    );

    let res = complete(
        &gw,
        "/v1/completions",
        &json!({"model": "oa/model", "prompt": "go", "stream": true}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let ev = events(&res.text().await.unwrap());
    let last = ev.last().unwrap();
    assert_eq!(last["object"], "text_completion");
    assert_eq!(last["error"]["code"], "upstream_error", "{last}");
    assert_eq!(last["choices"][0]["finish_reason"], "error");
    assert_eq!(last["provider"], "oa");
    let text: String = ev[..ev.len() - 1]
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, "partial");
}

#[tokio::test]
async fn an_anthropic_kind_upstream_streams_a_completion() {
    let an = upstream(|seen, _| async move {
        assert_eq!(seen.path, "/v1/messages");
        let ev = |name: &str, data: Value| (Some(name.to_string()), data.to_string());
        sse_named(
            vec![
                ev(
                    "message_start",
                    json!({"type": "message_start", "message": {
                    "id": "msg_1", "type": "message", "role": "assistant", "content": [],
                    "model": "claude-x", "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 5, "output_tokens": 1}}}),
                ),
                ev(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
                ),
                ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": "Hi "}}),
                ),
                ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": "there"}}),
                ),
                ev(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0}),
                ),
                ev(
                    "message_delta",
                    json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": {"output_tokens": 2}}),
                ),
                ev("message_stop", json!({"type": "message_stop"})),
            ],
            Duration::ZERO,
        )
    })
    .await;
    let oa = unused().await;
    let gw = gateway(&config(&oa.url(), &an.url())).await;
    let before = spent(&gw).await;
    let res = complete(
        &gw,
        "/v1/completions",
        &json!({"model": "an/claude", "prompt": "Greet me", "stream": true,
                "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let ev = events(&res.text().await.unwrap());
    let text: String = ev
        .iter()
        .filter_map(|e| e["choices"].get(0)?["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "Hi there");
    let finish: Vec<_> = ev
        .iter()
        .filter_map(|e| e["choices"].get(0)?["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, ["stop"]);
    let cost = money(&ev.last().unwrap()["usage"]["cost"]);
    // 5 × $3 + 2 × $15 per Mtok.
    assert_eq!(cost, "0.000045".parse().unwrap());
    assert_eq!(spent(&gw).await, before + cost);
    assert_eq!(money(&generation(&gw, &id).await["total_cost"]), cost);
    let sent = &an.requests()[0].body;
    assert_eq!(sent["messages"][0]["role"], "user");
    // No max_tokens asked: the model's bound, as in chat.
    assert_eq!(sent["max_tokens"], 100);
}

#[tokio::test]
async fn bad_prompts_unknown_models_and_missing_keys_are_refused_in_the_error_format() {
    let (oa, an) = (unused().await, unused().await);
    let gw = gateway(&config(&oa.url(), &an.url())).await;
    let before = spent(&gw).await;
    for (body, status, code, names) in [
        (
            json!({"model": "mock/echo", "prompt": 12}),
            400,
            "invalid_request",
            "`prompt`",
        ),
        (
            json!({"model": "mock/echo", "prompt": ["a", "b"]}),
            400,
            "invalid_request",
            "`prompt`",
        ),
        (
            json!({"model": "mock/echo", "prompt": [1, 2]}),
            400,
            "invalid_request",
            "token ids",
        ),
        (
            json!({"model": "mock/echo", "prompt": "x", "echo": true}),
            400,
            "invalid_request",
            "`echo",
        ),
        (
            json!({"model": "mock/echo", "prompt": "x", "best_of": 4}),
            400,
            "invalid_request",
            "`best_of`",
        ),
        (
            json!({"model": "nope/model", "prompt": "x"}),
            404,
            "model_not_found",
            "nope/model",
        ),
    ] {
        let res = complete(&gw, "/v1/completions", &body).await;
        assert_eq!(res.status(), status, "{body}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(names),
            "{body}: {v}"
        );
    }
    let res = client()
        .post(gw.url("/v1/completions"))
        .json(&json!({"model": "mock/echo", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert_eq!(spent(&gw).await, before, "a refused request costs nothing");
    assert_eq!(oa.hits() + an.hits(), 0);
}
