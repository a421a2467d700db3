//! Two gateways in one process, one store and one Redis prefix (`[shared]`): one `rpm`
//! budget per key and one view of endpoint health (SPEC §6). The multi-process tests
//! are in tests/scale_out.rs; these check the builder's wiring with real fake
//! upstreams and a real Redis.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn completion(text: &str) -> Value {
    json!({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    })
}

async fn fixed(status: u16) -> Upstream {
    upstream(move |_, _| async move {
        if status == 200 {
            json(200, completion("fine"))
        } else {
            json(
                status,
                json!({"error": {"message": "scripted", "type": "x"}}),
            )
        }
    })
    .await
}

const LIMITED_KEY: &str = "sk-test-limited-key-0123456789";

#[tokio::test]
async fn two_gateways_share_rpm_and_endpoint_health() {
    let Some(r) = switchboard::testing::redis("two_gateways_share_rpm_and_endpoint_health") else {
        return;
    };
    let (flaky, good) = (fixed(503).await, fixed(200).await);
    let extra = format!(
        "[health]\nfailure_threshold = 2\ncooldown_secs = 60\n\
         [shared]\nredis_url = \"{}\"\nprefix = \"{}\"\n\
         [[keys]]\nsecret = \"{LIMITED_KEY}\"\nname = \"limited\"\ncredits_usd = 10\nrpm = 3\n",
        r.url(),
        r.prefix()
    );
    let (one, two) = gateway_pair(&openai_config(
        &[("flaky", &flaky.url()), ("good", &good.url())],
        &extra,
    ))
    .await;
    let ask = json!({"model": "test/model", "messages": [{"role": "user", "content": "hi"}],
                     "provider": {"order": ["flaky", "good"]}});

    // Health: two failures through the first gateway degrade `flaky`…
    for _ in 0..2 {
        let res = post_chat(&one, TEST_KEY, &ask).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-provider"], "good");
    }
    assert_eq!(flaky.hits(), 2);
    // …and within 1 s (the SPEC's bound) the second skips it without contacting it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..3 {
        let res = post_chat(&two, TEST_KEY, &ask).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-provider"], "good");
    }
    assert_eq!(
        flaky.hits(),
        2,
        "the second gateway contacted the degraded endpoint"
    );

    // rpm = 3 is one budget across both gateways.
    let only_good = json!({"model": "test/model", "messages": [{"role": "user", "content": "hi"}],
                           "provider": {"only": ["good"]}});
    let mut statuses = Vec::new();
    for gw in [&one, &two, &one, &two, &one, &two] {
        let res = post_chat(gw, LIMITED_KEY, &only_good).await;
        if res.status() == 429 {
            let after: u64 = res.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=20).contains(&after), "{after}");
        }
        statuses.push(res.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);

    // Redis answered: the gauge says so.
    let metrics = client()
        .get(one.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("switchboard_shared_state_up 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("shared"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn a_conversation_keeps_its_endpoint_whichever_gateway_serves_it() {
    let Some(r) = switchboard::testing::redis(
        "a_conversation_keeps_its_endpoint_whichever_gateway_serves_it",
    ) else {
        return;
    };
    let (a, b) = (fixed(200).await, fixed(200).await);
    let extra = format!(
        "[shared]\nredis_url = \"{}\"\nprefix = \"{}\"\n",
        r.url(),
        r.prefix()
    );
    // Two equal endpoints: without a shared affinity, the second turn's endpoint is a
    // coin toss on the other gateway.
    let (one, two) =
        gateway_pair(&openai_config(&[("a", &a.url()), ("b", &b.url())], &extra)).await;
    let turn = |system: &str, question: &str| {
        json!({"model": "test/model", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question}]})
    };
    let served = |res: &reqwest::Response| {
        assert_eq!(res.status(), 200);
        res.headers()["x-provider"].to_str().unwrap().to_string()
    };
    // Eight conversations, each with its own long system prompt, start on the first…
    let mut started = Vec::new();
    for i in 0..8 {
        let system = format!("Conversation {i}. ") + &"You answer briefly. ".repeat(250);
        let res = post_chat(&one, TEST_KEY, &turn(&system, "First question")).await;
        started.push((system, served(&res)));
    }
    // …and go on through the second, after the 1 s the SPEC allows shared state.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, (system, first)) in started.iter().enumerate() {
        let res = post_chat(&two, TEST_KEY, &turn(system, "A follow-up")).await;
        assert_eq!(&served(&res), first, "conversation {i} changed endpoint");
    }
}
