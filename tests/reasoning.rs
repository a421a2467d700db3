//! Reasoning through the real server: OpenRouter's `reasoning` parameter and the
//! `:thinking` variant reach fake Anthropic, Gemini and OpenAI upstreams as each one's
//! own setting (never as `reasoning` itself); `reasoning.exclude` hides the reasoning
//! text, JSON and streamed, while its tokens are still counted and charged as
//! completion tokens, exactly what the key is debited.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchboard::money::Money;

/// One provider of each kind, each serving one model: `anthropic/claude`,
/// `google/gemini`, `openai/o`.
fn config(anthropic: &str, gemini: &str, openai: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
keepalive_secs = 10

[[providers]]
name = "claude"
kind = "anthropic"
base_url = "{anthropic}"
api_key = "sk-ant-upstream-key-0123"
timeout_secs = 5
stream_idle_timeout_secs = 5

[[providers]]
name = "google"
kind = "gemini"
base_url = "{gemini}"
api_key = "goog-upstream-key"
timeout_secs = 5
stream_idle_timeout_secs = 5

[[providers]]
name = "oa"
kind = "openai"
base_url = "{openai}/v1"
api_key = "sk-upstream-oa"
timeout_secs = 5
stream_idle_timeout_secs = 5

[[models]]
id = "anthropic/claude"
max_output_tokens = 16000
  [[models.endpoints]]
  provider = "claude"
  upstream_model = "claude-sonnet-4-20250514"
  prompt_usd_per_mtok = 3
  completion_usd_per_mtok = 15

[[models]]
id = "google/gemini"
max_output_tokens = 16000
  [[models.endpoints]]
  provider = "google"
  upstream_model = "gemini-2.5-flash"
  prompt_usd_per_mtok = 0.3
  completion_usd_per_mtok = 2.5

[[models]]
id = "openai/o"
max_output_tokens = 16000
  [[models.endpoints]]
  provider = "oa"
  upstream_model = "o4-mini"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 4

[[keys]]
secret = "{TEST_KEY}"
credits_usd = 100
"#
    )
}

/// Price in pico-USD of `tokens` at `usd_per_mtok` (a decimal with ≤ 1 fraction digit).
fn pico(tokens: i64, tenths_usd_per_mtok: i64) -> i64 {
    tokens * tenths_usd_per_mtok * 100_000
}

/// Anthropic: a thinking block then the answer; 20 in, 50 out (thinking included).
async fn anthropic_fake() -> Upstream {
    upstream(|seen, _| async move {
        if seen.body["stream"] == true {
            let ev = |name: &str, data: Value| (Some(name.to_string()), data.to_string());
            sse_named(
                vec![
                    ev(
                        "message_start",
                        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
                            "role": "assistant", "content": [], "model": "claude-sonnet-4-20250514",
                            "usage": {"input_tokens": 20, "output_tokens": 1}}}),
                    ),
                    ev(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
                    ),
                    ev(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "SECRET-THOUGHT"}}),
                    ),
                    ev(
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": 0}),
                    ),
                    ev(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
                    ),
                    ev(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Paris"}}),
                    ),
                    ev(
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": 1}),
                    ),
                    ev(
                        "message_delta",
                        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 50}}),
                    ),
                    ev("message_stop", json!({"type": "message_stop"})),
                ],
                Duration::ZERO,
            )
        } else {
            json(
                200,
                json!({"id": "msg_1", "type": "message", "role": "assistant",
                    "model": "claude-sonnet-4-20250514",
                    "content": [{"type": "thinking", "thinking": "SECRET-THOUGHT", "signature": "sig"},
                                {"type": "text", "text": "Paris"}],
                    "stop_reason": "end_turn",
                    "usage": {"input_tokens": 20, "output_tokens": 50}}),
            )
        }
    })
    .await
}

/// Gemini: a thought part then the answer; 10 in, 5 + 30 thoughts out.
async fn gemini_fake() -> Upstream {
    upstream(|_, _| async move {
        json(
            200,
            json!({"candidates": [{"content": {"role": "model", "parts": [
                    {"text": "SECRET-THOUGHT", "thought": true}, {"text": "Paris"}]},
                    "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5,
                    "thoughtsTokenCount": 30, "totalTokenCount": 45}}),
        )
    })
    .await
}

/// OpenAI: visible reasoning and 32 reasoning tokens of 40 out; 10 in.
async fn openai_fake() -> Upstream {
    upstream(|seen, _| async move {
        let usage = json!({"prompt_tokens": 10, "completion_tokens": 40, "total_tokens": 50,
            "completion_tokens_details": {"reasoning_tokens": 32}});
        if seen.body["stream"] == true {
            sse(
                vec![
                    json!({"choices": [{"index": 0, "delta": {"role": "assistant", "reasoning": "SECRET-THOUGHT"}}]}).to_string(),
                    json!({"choices": [{"index": 0, "delta": {"content": "Paris"}}]}).to_string(),
                    json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).to_string(),
                    json!({"choices": [], "usage": usage}).to_string(),
                    "[DONE]".into(),
                ],
                Duration::ZERO,
            )
        } else {
            json(
                200,
                json!({"id": "c1", "object": "chat.completion", "choices": [{"index": 0,
                    "message": {"role": "assistant", "content": "Paris", "reasoning": "SECRET-THOUGHT"},
                    "finish_reason": "stop"}], "usage": usage}),
            )
        }
    })
    .await
}

struct Fakes {
    anthropic: Upstream,
    gemini: Upstream,
    openai: Upstream,
    gw: TestGateway,
}

async fn fakes() -> Fakes {
    let (anthropic, gemini, openai) = (
        anthropic_fake().await,
        gemini_fake().await,
        openai_fake().await,
    );
    let gw = gateway(&config(&anthropic.url(), &gemini.url(), &openai.url())).await;
    Fakes {
        anthropic,
        gemini,
        openai,
        gw,
    }
}

/// A USD amount from JSON, exactly (a small one arrives as `3e-6`).
fn usd(v: &Value) -> Money {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"))
}

fn ask(model: &str, extra: Value) -> Value {
    let mut body =
        json!({"model": model, "messages": [{"role": "user", "content": "Capital of France?"}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

async fn spent(gw: &TestGateway) -> Money {
    let (status, v) = get_json(gw, "/v1/credits", TEST_KEY).await;
    assert_eq!(status, 200);
    usd(&v["data"]["total_usage"])
}

/// Posts `body`; returns the answer (JSON, or the SSE text as a string) and checks the
/// money: `usage.cost` is `want` pico-USD, its `cost_details` add up to it, and the
/// key was debited exactly that (the generation record agrees).
async fn charged(gw: &TestGateway, body: Value, want: i64) -> (Value, String) {
    let before = spent(gw).await;
    let res = post_chat(gw, TEST_KEY, &body).await;
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = res.text().await.unwrap();
    let answer: Value = if body["stream"] == true {
        let last_usage = sse_data(&text)
            .iter()
            .rev()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|v| v["usage"].is_object())
            .expect("a usage chunk");
        json!({"usage": last_usage["usage"]})
    } else {
        serde_json::from_str(&text).unwrap()
    };
    let usage = &answer["usage"];
    let cost = usd(&usage["cost"]);
    assert_eq!(cost, Money::from_pico(want), "{usage}");
    let parts: i64 = ["prompt", "cached_prompt", "cache_write", "completion"]
        .iter()
        .map(|k| usd(&usage["cost_details"][k]).pico())
        .sum();
    assert_eq!(parts, want, "cost_details add up to cost: {usage}");
    assert_eq!(spent(gw).await.pico() - before.pico(), want, "debited");
    let (_, generation) = get_json(gw, &format!("/v1/generation?id={id}"), TEST_KEY).await;
    let total = usd(&generation["data"]["total_cost"]);
    assert_eq!(total, cost);
    (answer, text)
}

#[tokio::test]
async fn anthropic_gets_a_thinking_budget_and_exclude_hides_the_thinking_but_charges_it() {
    let f = fakes().await;
    // 20 × $3 + 50 × $15 (thinking included), per M.
    let want = pico(20, 30) + pico(50, 150);
    let body = ask(
        "anthropic/claude",
        json!({"reasoning": {"max_tokens": 3000, "exclude": true}, "reasoning_effort": "high"}),
    );
    let (answer, text) = charged(&f.gw, body.clone(), want).await;
    let seen = &f.anthropic.requests()[0];
    assert_eq!(
        seen.body["thinking"],
        json!({"type": "enabled", "budget_tokens": 3000})
    );
    assert!(seen.body.get("reasoning").is_none());
    assert_eq!(answer["choices"][0]["message"]["content"], "Paris");
    assert!(!text.contains("SECRET-THOUGHT"), "{text}");
    assert!(
        !text.contains("reasoning_details"),
        "the signature went out: {text}"
    );
    assert_eq!(answer["usage"]["completion_tokens"], 50);
    assert_eq!(
        usd(&answer["usage"]["cost_details"]["completion"]),
        Money::from_pico(pico(50, 150))
    );

    // Streamed: no thinking in any chunk, the same charge.
    let mut stream = body;
    stream["stream"] = json!(true);
    stream["usage"] = json!({"include": true});
    let (_, text) = charged(&f.gw, stream, want).await;
    assert!(!text.contains("SECRET-THOUGHT"), "{text}");
    assert!(!text.contains("\"reasoning\""), "{text}");
    assert_eq!(sse_text(&text), "Paris");

    // Without `exclude` the thinking is returned.
    let (answer, _) = charged(
        &f.gw,
        ask("anthropic/claude", json!({"reasoning": {"effort": "low"}})),
        want,
    )
    .await;
    assert_eq!(
        answer["choices"][0]["message"]["reasoning"],
        "SECRET-THOUGHT"
    );
    assert_eq!(
        f.anthropic.requests()[2].body["thinking"]["budget_tokens"],
        2048
    );
}

#[tokio::test]
async fn gemini_gets_a_thinking_config_and_thoughts_are_charged_as_completion() {
    let f = fakes().await;
    // 10 × $0.3 + (5 + 30 thoughts) × $2.5, per M.
    let want = pico(10, 3) + pico(35, 25);
    let (answer, text) = charged(
        &f.gw,
        ask(
            "google/gemini",
            json!({"reasoning": {"effort": "high", "exclude": true}}),
        ),
        want,
    )
    .await;
    let seen = &f.gemini.requests()[0];
    // The model thinks, and is asked for no thought text.
    assert_eq!(
        seen.body["generationConfig"]["thinkingConfig"],
        json!({"thinkingBudget": 24576})
    );
    assert!(seen.body.get("reasoning").is_none());
    assert!(!text.contains("SECRET-THOUGHT"), "{text}");
    assert_eq!(answer["usage"]["completion_tokens"], 35);
    assert_eq!(
        answer["usage"]["completion_tokens_details"]["reasoning_tokens"],
        30
    );

    // A budget, with thoughts asked for and returned.
    let (answer, _) = charged(
        &f.gw,
        ask("google/gemini", json!({"reasoning": {"max_tokens": 2000}})),
        want,
    )
    .await;
    assert_eq!(
        f.gemini.requests()[1].body["generationConfig"]["thinkingConfig"],
        json!({"thinkingBudget": 2000, "includeThoughts": true})
    );
    assert_eq!(
        answer["choices"][0]["message"]["reasoning"],
        "SECRET-THOUGHT"
    );
}

#[tokio::test]
async fn openai_gets_reasoning_effort_and_reasoning_tokens_are_charged_as_completion() {
    let f = fakes().await;
    // 10 × $1 + 40 (32 reasoning) × $4, per M.
    let want = pico(10, 10) + pico(40, 40);
    let (answer, _) = charged(
        &f.gw,
        ask("openai/o", json!({"reasoning": {"max_tokens": 5000}})),
        want,
    )
    .await;
    let seen = &f.openai.requests()[0];
    assert_eq!(seen.body["reasoning_effort"], "medium");
    assert!(seen.body.get("reasoning").is_none(), "{}", seen.body);
    assert_eq!(
        answer["choices"][0]["message"]["reasoning"],
        "SECRET-THOUGHT"
    );
    assert_eq!(
        answer["usage"]["completion_tokens_details"]["reasoning_tokens"],
        32
    );

    // `exclude`, streamed: no reasoning text, the reasoning tokens still charged.
    let body = ask(
        "openai/o",
        json!({"reasoning": {"effort": "low", "exclude": true}, "stream": true,
               "stream_options": {"include_usage": true}}),
    );
    let (answer, text) = charged(&f.gw, body, want).await;
    assert_eq!(f.openai.requests()[1].body["reasoning_effort"], "low");
    assert!(!text.contains("SECRET-THOUGHT"), "{text}");
    assert_eq!(sse_text(&text), "Paris");
    assert_eq!(
        answer["usage"]["completion_tokens_details"]["reasoning_tokens"],
        32
    );

    // `enabled: false` wins over `reasoning_effort`: nothing is sent.
    charged(
        &f.gw,
        ask(
            "openai/o",
            json!({"reasoning": {"enabled": false}, "reasoning_effort": "high"}),
        ),
        want,
    )
    .await;
    assert!(f.openai.requests()[2]
        .body
        .get("reasoning_effort")
        .is_none());
}

#[tokio::test]
async fn the_thinking_variant_turns_reasoning_on_for_every_kind() {
    let f = fakes().await;
    for model in ["anthropic/claude", "google/gemini", "openai/o"] {
        let res = post_chat(
            &f.gw,
            TEST_KEY,
            &ask(&format!("{model}:thinking"), json!({})),
        )
        .await;
        assert_eq!(res.status(), 200, "{model}");
        assert_eq!(res.headers()["x-model-used"], model);
        let answer: Value = res.json().await.unwrap();
        assert_eq!(answer["model"], model);
        assert_eq!(answer["choices"][0]["message"]["content"], "Paris");
    }
    assert_eq!(
        f.anthropic.requests()[0].body["thinking"],
        json!({"type": "enabled", "budget_tokens": 8192})
    );
    assert_eq!(
        f.gemini.requests()[0].body["generationConfig"]["thinkingConfig"],
        json!({"thinkingBudget": 8192, "includeThoughts": true})
    );
    assert_eq!(f.openai.requests()[0].body["reasoning_effort"], "medium");

    // The request's own choice stands under `:thinking`.
    let res = post_chat(
        &f.gw,
        TEST_KEY,
        &ask("openai/o:thinking", json!({"reasoning_effort": "high"})),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(f.openai.requests()[1].body["reasoning_effort"], "high");

    // An unknown variant names the ones there are.
    let res = post_chat(&f.gw, TEST_KEY, &ask("openai/o:pondering", json!({}))).await;
    assert_eq!(res.status(), 400);
    let err: Value = res.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains(":thinking"),
        "{err}"
    );
}

#[tokio::test]
async fn anthropic_thinking_survives_a_tool_loop_through_reasoning_details() {
    let f = fakes().await;
    let want = pico(20, 30) + pico(50, 150);
    // The first turn's answer carries the thinking with its signature…
    let (first, _) = charged(
        &f.gw,
        ask("anthropic/claude", json!({"reasoning": {"effort": "low"}})),
        want,
    )
    .await;
    let details = first["choices"][0]["message"]["reasoning_details"].clone();
    assert_eq!(
        details,
        json!([{"type": "reasoning.text", "text": "SECRET-THOUGHT", "signature": "sig", "index": 0}])
    );
    // …which the client sends back with the turn that called a tool (as OpenRouter's
    // clients do): Anthropic gets the signed thinking block first in that turn, and
    // thinking stays on for the next step of the loop.
    let body = json!({
        "model": "anthropic/claude", "reasoning": {"effort": "low"},
        "messages": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": null, "reasoning_details": details,
             "tool_calls": [{"id": "toolu_1", "type": "function",
                             "function": {"name": "lookup", "arguments": "{\"q\":\"France\"}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "Paris"}
        ]
    });
    charged(&f.gw, body, want).await;
    let seen = &f.anthropic.requests()[1];
    assert_eq!(
        seen.body["thinking"],
        json!({"type": "enabled", "budget_tokens": 2048})
    );
    let turn = &seen.body["messages"][1];
    assert_eq!(
        turn["content"][0],
        json!({"type": "thinking", "thinking": "SECRET-THOUGHT", "signature": "sig"}),
        "{turn}"
    );
    assert_eq!(turn["content"][1]["type"], "tool_use", "{turn}");
}
