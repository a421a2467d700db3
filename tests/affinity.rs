//! Prompt-cache affinity through the real server: two equal endpoints of one model on
//! two fake OpenAI upstreams. Conversations sharing a long prefix stay on the endpoint
//! that served it first; short prompts spread by the weighted draw; a degraded
//! endpoint loses its conversations for good; `provider.order` wins over affinity.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use serde_json::{json, Value};

/// A fake OpenAI upstream answering "ok", or 500 while `fail` is set.
async fn fake(fail: Arc<AtomicBool>) -> Upstream {
    upstream(move |_, _| {
        let fail = fail.clone();
        async move {
            if fail.load(Ordering::SeqCst) {
                return json(500, json!({"error": {"message": "down"}}));
            }
            json(
                200,
                json!({"id": "c1", "object": "chat.completion", "choices": [{"index": 0,
                    "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1500, "completion_tokens": 1,
                        "prompt_tokens_details": {"cached_tokens": 1024}}}),
            )
        }
    })
    .await
}

/// A conversation: the shared system prompt (when given), then its own question.
fn chat(system: Option<&str>, question: &str) -> Value {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(json!({"role": "system", "content": s}));
    }
    messages.push(json!({"role": "user", "content": question}));
    json!({"model": "test/model", "messages": messages})
}

async fn served_by(gw: &TestGateway, body: &Value) -> String {
    let res = post_chat(gw, TEST_KEY, body).await;
    assert_eq!(res.status(), 200);
    res.headers()["x-provider"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn a_long_prefix_stays_on_its_endpoint_until_it_degrades() {
    let (fail_a, fail_b) = (Arc::default(), Arc::default());
    let (a, b) = (
        fake(Arc::clone(&fail_a)).await,
        fake(Arc::clone(&fail_b)).await,
    );
    let extra = "[health]\nfailure_threshold = 1\ncooldown_secs = 300\n";
    let gw = gateway(&openai_config(&[("a", &a.url()), ("b", &b.url())], extra)).await;
    let system = "You are a meticulous assistant for a travel agency. ".repeat(120);
    assert!(system.len() > 6000);

    // Two conversations sharing the 6 KB system prompt: all on the first one's endpoint.
    let first = served_by(&gw, &chat(Some(&system), "Plan a week in Rome.")).await;
    for i in 0..20 {
        let question = if i % 2 == 0 {
            format!("Plan a week in Rome. Follow-up {i}.")
        } else {
            format!("What should I pack for Oslo in March? ({i})")
        };
        assert_eq!(
            served_by(&gw, &chat(Some(&system), &question)).await,
            first,
            "request {i} left its endpoint"
        );
    }
    let (stuck, other, fail_stuck) = if first == "a" {
        (&a, &b, &fail_a)
    } else {
        (&b, &a, &fail_b)
    };
    assert_eq!((stuck.hits(), other.hits()), (21, 0));

    // `provider.order` wins over affinity (and such a request teaches it nothing).
    let other_name = if first == "a" { "b" } else { "a" };
    let mut ordered = chat(Some(&system), "Plan a week in Rome.");
    ordered["provider"] = json!({"order": [other_name]});
    assert_eq!(served_by(&gw, &ordered).await, other_name);
    assert_eq!(
        served_by(&gw, &chat(Some(&system), "And Naples?")).await,
        first
    );

    // The endpoint degrades (threshold 1): the conversation moves at once, and stays.
    fail_stuck.store(true, Ordering::SeqCst);
    let stuck_hits = stuck.hits();
    for i in 0..10 {
        assert_eq!(
            served_by(&gw, &chat(Some(&system), &format!("Day {i}?"))).await,
            other_name,
            "request {i} after the degrade"
        );
    }
    // Only the first of them tried the failing endpoint.
    assert_eq!(stuck.hits(), stuck_hits + 1);
    // Back up, but degraded for its cooldown, and the conversation lives elsewhere now.
    fail_stuck.store(false, Ordering::SeqCst);
    for i in 0..5 {
        assert_eq!(
            served_by(&gw, &chat(Some(&system), &format!("Evening {i}?"))).await,
            other_name
        );
    }
    let metrics = metrics_text(&gw.url("")).await;
    let hits = metric(&metrics, "switchboard_affinity_total{result=\"hit\"}").unwrap_or(0.0);
    assert!(hits >= 20.0, "{metrics}");
}

#[tokio::test]
async fn short_prompts_spread_by_the_weighted_draw() {
    let (a, b) = (fake(Arc::default()).await, fake(Arc::default()).await);
    let gw = gateway(&openai_config(&[("a", &a.url()), ("b", &b.url())], "")).await;
    for i in 0..20 {
        served_by(&gw, &chat(Some("Be brief."), &format!("Question {i}"))).await;
    }
    // Equal weights and prices: each endpoint drawn with probability ½ (all 20 on one
    // side: p = 2⁻¹⁹).
    assert!(a.hits() > 0 && b.hits() > 0, "{} / {}", a.hits(), b.hits());
    assert_eq!(a.hits() + b.hits(), 20);
}
