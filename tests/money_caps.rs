//! A key is never charged more than it holds (SPEC §4), whatever the client asks or
//! the upstream reports: `n` is reserved, every upstream is sent the reserved
//! completion limit, a usage report above the reservation is charged the
//! reservation (and flagged), and `tokens_per_day` is reserved like money. The real
//! server against fake OpenAI and Gemini upstreams on 127.0.0.1:0.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::{json, Value};
use switchboard::chat::ChatRequest;
use switchboard::config::{Config, HealthConfig};
use switchboard::credit::{reservation_for, DEFAULT_MAX_OUTPUT_TOKENS};
use switchboard::health::{Availability, HealthRegistry, InMemoryHealth};
use switchboard::money::Money;
use switchboard::store::{hash_secret, Reservation};
use switchboard::Gateway;

// Client secrets (20 characters or more, as config secrets must be).
const POOR: &str = "sk-poor-0123456789abcdef";
const MANY: &str = "sk-many-0123456789abcdef";
const TWENTY: &str = "sk-twenty-0123456789abcdef";
const DAY: &str = "sk-day-0123456789abcdef";
const RICH: &str = "sk-rich-0123456789abcdef";

/// An OpenAI-style answer with `n` choices and the usage an honest upstream reports
/// for them: each choice used its whole limit.
fn honest_completion(seen: &Seen) -> Value {
    let n = seen.body["n"].as_u64().unwrap_or(1);
    let limit = seen.body["max_tokens"]
        .as_u64()
        .or(seen.body["max_completion_tokens"].as_u64())
        .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
    let choices: Vec<Value> = (0..n)
        .map(|i| json!({"index": i, "message": {"role": "assistant", "content": "word "}, "finish_reason": "length"}))
        .collect();
    json!({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
        "choices": choices,
        "usage": {"prompt_tokens": 10, "completion_tokens": n * limit, "total_tokens": 10 + n * limit}
    })
}

/// Sends `body` with `secret` `count` times at once; how many were served (200). Any
/// status but 200 and `refused` fails the test.
async fn served_at_once(
    gw: &TestGateway,
    secret: &'static str,
    body: &Value,
    count: usize,
    refused: u16,
) -> usize {
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let (url, body) = (gw.url("/v1/chat/completions"), body.clone());
            tokio::spawn(async move {
                client()
                    .post(url)
                    .bearer_auth(secret)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut served = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => served += 1,
            s if s == refused => {}
            other => panic!("unexpected status {other}"),
        }
    }
    served
}

fn ask(max_tokens: Option<u32>, n: Option<u32>, stream: bool) -> Value {
    let mut body = json!({
        "model": "test/model",
        "messages": [{"role": "user", "content": "Write as much as you may."}],
        "stream": stream,
        "stream_options": {"include_usage": true}
    });
    if let Some(m) = max_tokens {
        body["max_tokens"] = json!(m);
    }
    if let Some(n) = n {
        body["n"] = json!(n);
    }
    body
}

/// `[[keys]]` entries: `(secret, credits_usd, tokens_per_day)`.
fn keys(list: &[(&str, &str, Option<u64>)]) -> String {
    list.iter()
        .map(|(secret, credits, tpd)| {
            let tpd = tpd.map_or(String::new(), |t| format!("tokens_per_day = {t}\n"));
            format!("[[keys]]\nsecret = \"{secret}\"\nname = \"{secret}\"\ncredits_usd = {credits}\n{tpd}\n")
        })
        .collect()
}

/// The gateway of `toml` with a health registry of its own (1 failure degrades).
async fn gateway_with_health(toml: &str) -> (TestGateway, Arc<InMemoryHealth>) {
    let mut config = Config::from_toml(toml).unwrap_or_else(|e| panic!("test config: {e}"));
    config.store.url = format!(
        "sqlite://{}",
        temp_dir("store").join("switchboard.db").display()
    );
    let endpoints = switchboard::catalog::Catalog::from_config(&config)
        .endpoints()
        .len();
    let health = Arc::new(InMemoryHealth::new(
        &HealthConfig {
            failure_threshold: 1,
            cooldown_secs: 600,
        },
        endpoints,
    ));
    let gateway = Gateway::builder()
        .config(config)
        .health_registry(health.clone())
        .build()
        .expect("gateway builds");
    (serve_built(gateway).await, health)
}

async fn credits_remaining(gw: &TestGateway, key: &str) -> Money {
    let v: Value = client()
        .get(gw.url("/v1/key"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    serde_json::from_value(v["data"]["credits_remaining"].clone()).unwrap()
}

fn key_id(gw: &TestGateway, secret: &str) -> String {
    gw.gateway
        .keys()
        .find(&hash_secret(secret))
        .unwrap()
        .unwrap()
        .id
}

/// What admission holds for `body` on `model` of the gateway.
fn reservation(gw: &TestGateway, body: &Value, model: &str) -> Reservation {
    let req: ChatRequest = serde_json::from_value(body.clone()).unwrap();
    let plan = gw.gateway.catalog().model(model).unwrap().endpoints.clone();
    reservation_for(&req, &plan)
}

/// The value of `switchboard_usage_over_reserve_total` for `provider`.
async fn over_reserve_metric(gw: &TestGateway, provider: &str) -> u64 {
    let text = client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| {
            l.starts_with("switchboard_usage_over_reserve_total{")
                && l.contains(&format!("provider=\"{provider}\""))
                && l.contains("model=\"test/model\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn n_is_reserved_for_every_choice_and_concurrent_requests_never_overdraw() {
    let up = upstream(|seen, _| async move { json(200, honest_completion(&seen)) }).await;
    let toml = openai_config(
        &[("alpha", &up.url())],
        &keys(&[(POOR, "0.01", None), (MANY, "0.01", None)]),
    );
    let gw = gateway(&toml).await;

    // 128 choices × 1,000 tokens × $2/Mtok = $0.256 > $0.01: refused before any call.
    let res = post_chat(&gw, POOR, &ask(Some(1000), Some(128), false)).await;
    assert_eq!(res.status(), 402);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "insufficient_credits");
    assert_eq!(up.hits(), 0);

    // 4 × 1,000 × $2/Mtok = $0.008 (+ the prompt) fits: served, and the upstream is
    // asked for exactly what was reserved.
    let res = post_chat(&gw, POOR, &ask(Some(1000), Some(4), false)).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["choices"].as_array().unwrap().len(), 4);
    let seen = &up.requests()[0];
    assert_eq!(
        (seen.body["n"].as_u64(), seen.body["max_tokens"].as_u64()),
        (Some(4), Some(1000))
    );
    let cost: Money = serde_json::from_value(body["usage"]["cost"].clone()).unwrap();
    let left = credits_remaining(&gw, POOR).await;
    assert_eq!(left, "0.01".parse::<Money>().unwrap() - cost);
    assert!(!left.is_negative(), "{left}");

    // 20 at once, each reserving 2 choices ($0.004 + the prompt): never below zero.
    let served = served_at_once(&gw, MANY, &ask(Some(1000), Some(2), false), 20, 402).await;
    // Two fit in $0.01 ($0.00401 charged each), a third never does.
    assert_eq!(served, 2, "{served} served");
    let left = credits_remaining(&gw, MANY).await;
    assert!(!left.is_negative(), "credits_remaining {left}");
    let b = gw.gateway.ledger().balance(&key_id(&gw, MANY)).unwrap();
    assert_eq!(b.reserved, Money::ZERO);

    // Outside 1..=128, or not an integer: 400 before anything else.
    for bad in [
        json!(0),
        json!(129),
        json!(-1),
        json!(2.5),
        json!("2"),
        json!([2]),
    ] {
        let mut body = ask(Some(10), None, false);
        body["n"] = bad.clone();
        let res = post_chat(&gw, POOR, &body).await;
        assert_eq!(res.status(), 400, "n = {bad}");
        let err: Value = res.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_request", "n = {bad}");
    }
    assert_eq!(up.hits(), 1 + served);
}

/// One absurd usage report, JSON or streamed: charged exactly the reservation, the
/// client's `usage.cost` is the debit, the key stays solvent, and the request is
/// flagged in the log, the metric and the endpoint's health.
async fn absurd_usage_is_charged_the_reservation(stream: bool) {
    let provider = if stream { "huge-sse" } else { "huge-json" };
    let up = upstream(|seen, _| async move { absurd_usage_answer(&seen) }).await;
    let log = fresh_temp_dir().join("requests.jsonl");
    let toml = openai_config(
        &[(provider, &up.url())],
        &format!(
            "[logging]\nsink = \"jsonl:{}\"\n\n{}",
            log.display(),
            keys(&[(POOR, "0.01", None)])
        ),
    );
    let (gw, health) = gateway_with_health(&toml).await;
    let endpoint = gw.gateway.catalog().model("test/model").unwrap().endpoints[0].clone();
    let metric_before = over_reserve_metric(&gw, provider).await;

    let body = ask(Some(10), None, stream);
    let hold = reservation(&gw, &body, "test/model");
    let res = post_chat(&gw, POOR, &body).await;
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let usage = if stream {
        let text = res.text().await.unwrap();
        let data = sse_data(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
        let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        assert_eq!(sse_text(&text), "Hello there");
        last["usage"].clone()
    } else {
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hello there");
        v["usage"].clone()
    };
    let cost: Money = serde_json::from_value(usage["cost"].clone()).unwrap();
    assert_eq!(cost, hold.amount, "usage.cost is the reservation");
    // The tokens reported are shown as reported.
    assert_eq!(usage["prompt_tokens"].as_u64(), Some(ABSURD_TOKENS));

    // The debit is exactly the cost shown, and the key is still solvent.
    let left = credits_remaining(&gw, POOR).await;
    assert_eq!(left, "0.01".parse::<Money>().unwrap() - cost);
    assert!(!left.is_negative());
    let generation: Value = client()
        .get(gw.url(&format!("/v1/generation?id={id}")))
        .bearer_auth(POOR)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_value::<Money>(generation["data"]["total_cost"].clone()).unwrap(),
        cost
    );
    // At most the reserved tokens count against the key's day.
    let key = key_id(&gw, POOR);
    assert_eq!(gw.gateway.ledger().tokens_today(&key).unwrap(), hold.tokens);
    let b = gw.gateway.ledger().balance(&key).unwrap();
    assert_eq!((b.reserved, b.reserved_tokens), (Money::ZERO, 0));

    // Flagged: the metric, the request log, and one failure of the endpoint.
    assert!(over_reserve_metric(&gw, provider).await > metric_before);
    assert!(matches!(
        health.availability(&endpoint, tokio::time::Instant::now()),
        Availability::Unavailable { .. }
    ));
    let started = std::time::Instant::now();
    let record = loop {
        assert!(gw.gateway.logs().flush(SOCKET_TIMEOUT));
        let found = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|r| r["id"] == id);
        if let Some(r) = found {
            break r;
        }
        assert!(started.elapsed() < SOCKET_TIMEOUT, "no log record for {id}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(record["over_reserve"], true);
    assert_eq!(
        serde_json::from_value::<Money>(record["cost"].clone()).unwrap(),
        cost
    );
}

#[tokio::test]
async fn absurd_usage_in_a_json_reply_is_charged_the_reservation_and_flagged() {
    absurd_usage_is_charged_the_reservation(false).await;
}

#[tokio::test]
async fn absurd_usage_in_a_stream_is_charged_the_reservation_and_flagged() {
    absurd_usage_is_charged_the_reservation(true).await;
}

#[tokio::test]
async fn tokens_per_day_is_reserved_like_money() {
    // The upstream reports exactly what was reserved: the prompt bound and the limit.
    let body = ask(Some(10), None, false);
    let req: ChatRequest = serde_json::from_value(body.clone()).unwrap();
    let prompt = switchboard::credit::prompt_bound(&req);
    let up = upstream(move |seen, _| async move {
        let limit = seen.body["max_tokens"].as_u64().unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
        json(
            200,
            json!({
                "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "word"}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": limit, "total_tokens": prompt + limit}
            }),
        )
    })
    .await;
    let bound = prompt + 10;
    // Room for two such requests in a day, not three.
    let limit = 2 * bound + bound / 2;
    let toml = openai_config(
        &[("alpha", &up.url())],
        &keys(&[(TWENTY, "10", Some(20)), (DAY, "10", Some(limit))]),
    );
    let gw = gateway(&toml).await;
    assert_eq!(reservation(&gw, &body, "test/model").tokens, bound);

    // 20 tokens a day: a 5,001-token request (or one with the model's 100) is refused
    // at admission, with a Retry-After, and reaches no upstream.
    for max in [Some(5_000), None] {
        let res = post_chat(&gw, TWENTY, &ask(max, None, false)).await;
        assert_eq!(res.status(), 429);
        let after: u64 = res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=86_400).contains(&after), "{after}");
        let err: Value = res.json().await.unwrap();
        assert_eq!(err["error"]["code"], "rate_limited");
    }
    assert_eq!(up.hits(), 0);
    assert_eq!(
        gw.gateway
            .ledger()
            .tokens_today(&key_id(&gw, TWENTY))
            .unwrap(),
        0
    );

    // Ten at once on a key with room for two: never more than the limit together.
    let served = served_at_once(&gw, DAY, &body, 10, 429).await;
    let key = key_id(&gw, DAY);
    let used = gw.gateway.ledger().tokens_today(&key).unwrap();
    assert_eq!(served, 2, "served {served}, {used} tokens of {limit}");
    assert_eq!(used, 2 * bound);
    assert!(used <= limit);
    assert_eq!(
        gw.gateway.ledger().balance(&key).unwrap().reserved_tokens,
        0
    );
}

#[tokio::test]
async fn upstreams_are_sent_the_completion_limit_that_was_reserved() {
    let oa = upstream(|seen, _| async move { json(200, honest_completion(&seen)) }).await;
    let gem = upstream(|_, _| async {
        json(
            200,
            json!({
                "candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4}
            }),
        )
    })
    .await;
    // Neither model has a max_output_tokens: the reserve's bound is the default.
    let toml = format!(
        r#"[[providers]]
name = "oa"
kind = "openai"
base_url = "{}/v1"
api_key = "sk-up"

[[providers]]
name = "google"
kind = "gemini"
base_url = "{}"
api_key = "goog-up"

[[models]]
id = "open/unbounded"
  [[models.endpoints]]
  provider = "oa"
  upstream_model = "up-model"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[models]]
id = "gem/unbounded"
  [[models.endpoints]]
  provider = "google"
  upstream_model = "gemini-2.5-flash"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

{}"#,
        oa.url(),
        gem.url(),
        keys(&[(RICH, "10", None)])
    );
    let gw = gateway(&toml).await;
    let body = |model: &str, extra: Value| {
        let mut b = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };

    // openai kind: no client limit → `max_tokens` (an OpenAI-compatible server) equal
    // to the per-choice bound reserved; `n` goes with it.
    for (extra, n) in [(json!({}), 1), (json!({"n": 3}), 3)] {
        let b = body("open/unbounded", extra);
        let hold = reservation(&gw, &b, "open/unbounded");
        let res = post_chat(&gw, RICH, &b).await;
        assert_eq!(res.status(), 200);
        let seen = oa.requests().pop().unwrap();
        assert_eq!(
            seen.body["max_tokens"].as_u64(),
            Some(DEFAULT_MAX_OUTPUT_TOKENS)
        );
        assert!(seen.body.get("max_completion_tokens").is_none());
        assert_eq!(seen.body["n"].as_u64().unwrap_or(1), n);
        let prompt = switchboard::credit::prompt_bound(&serde_json::from_value(b).unwrap());
        assert_eq!(hold.tokens, prompt + n * DEFAULT_MAX_OUTPUT_TOKENS);
    }
    // The client's field is kept, with the bound in it.
    let res = post_chat(
        &gw,
        RICH,
        &body("open/unbounded", json!({"max_completion_tokens": 50})),
    )
    .await;
    assert_eq!(res.status(), 200);
    let seen = oa.requests().pop().unwrap();
    assert_eq!(seen.body["max_completion_tokens"].as_u64(), Some(50));
    assert!(seen.body.get("max_tokens").is_none());

    // gemini: generationConfig.maxOutputTokens, always.
    let res = post_chat(&gw, RICH, &body("gem/unbounded", json!({}))).await;
    assert_eq!(res.status(), 200);
    let seen = gem.requests().pop().unwrap();
    assert_eq!(
        seen.body["generationConfig"]["maxOutputTokens"].as_u64(),
        Some(DEFAULT_MAX_OUTPUT_TOKENS)
    );
}
