//! The response cache and coalescing through the whole stack (SPEC §8.1): real
//! gateways on 127.0.0.1, fake upstreams that count what they receive, the real
//! ledger, and (when it answers) a real Redis shared by two gateways and a real
//! PostgreSQL store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchboard::config::Config;

fn chunk(delta: Value, finish: Option<&str>) -> String {
    json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    .to_string()
}

/// A complete OpenAI answer, JSON or SSE as asked, with usage.
fn answer(seen: &Seen) -> axum::response::Response {
    if seen.body["stream"] == true {
        sse(
            vec![
                chunk(json!({"role": "assistant", "content": "Hel"}), None),
                chunk(json!({"content": "lo there"}), None),
                chunk(json!({}), Some("stop")),
                json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
                       "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
                .to_string(),
                "[DONE]".into(),
            ],
            Duration::ZERO,
        )
    } else {
        json(
            200,
            json!({"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}),
        )
    }
}

fn ask(content: &str) -> Value {
    json!({"model": "test/model", "messages": [{"role": "user", "content": content}]})
}

async fn post(gw: &TestGateway, body: &str, cache: bool) -> reqwest::Response {
    let mut req = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(TEST_KEY)
        .header("content-type", "application/json");
    if cache {
        req = req.header("x-openrouter-cache", "true");
    }
    req.body(body.to_string()).send().await.unwrap()
}

/// GETs `path` with the test key; it must answer 200.
async fn get_ok(gw: &TestGateway, path: &str) -> Value {
    let (status, body) = get_json(gw, path, TEST_KEY).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// What the test key has spent, USD.
async fn spent(gw: &TestGateway) -> f64 {
    get_ok(gw, "/v1/credits").await["data"]["total_usage"]
        .as_f64()
        .unwrap()
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> &'a str {
    res.headers().get(name).map_or("-", |v| v.to_str().unwrap())
}

#[tokio::test]
async fn a_hit_calls_no_upstream_charges_nothing_and_has_its_own_generation() {
    let up = upstream(|seen, _| async move { answer(&seen) }).await;
    let gw = gateway(&openai_config(&[("up", &up.url())], "")).await;
    let body = ask("cache me").to_string();

    let miss = post(&gw, &body, true).await;
    assert_eq!(miss.status(), 200);
    assert_eq!(header(&miss, "x-openrouter-cache-status"), "MISS");
    assert_eq!(header(&miss, "x-openrouter-cache-ttl"), "300");
    let miss_id = header(&miss, "x-request-id").to_string();
    let first: Value = miss.json().await.unwrap();
    assert!(first["usage"]["cost"].as_f64().unwrap() > 0.0);
    let spent_after_miss = spent(&gw).await;
    assert!(spent_after_miss > 0.0);

    let hit = post(&gw, &body, true).await;
    assert_eq!(hit.status(), 200);
    assert_eq!(header(&hit, "x-openrouter-cache-status"), "HIT");
    assert_eq!(header(&hit, "x-provider"), "up");
    assert_eq!(header(&hit, "x-model-used"), "test/model");
    let hit_id = header(&hit, "x-request-id").to_string();
    assert_ne!(hit_id, miss_id);
    let second: Value = hit.json().await.unwrap();
    assert_eq!(up.hits(), 1, "no upstream call for a hit");
    assert_eq!(second["id"], hit_id.as_str());
    assert_eq!(second["choices"], first["choices"]);
    assert_eq!(
        second["usage"],
        json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost": 0,
               "prompt_tokens_details": {"cached_tokens": 0},
               "completion_tokens_details": {"reasoning_tokens": 0},
               "cost_details": {"prompt": 0, "cached_prompt": 0, "cache_write": 0, "completion": 0}})
    );
    assert_eq!(spent(&gw).await, spent_after_miss, "a hit debits nothing");

    let g = get_ok(&gw, &format!("/v1/generation?id={hit_id}")).await["data"].clone();
    assert_eq!(g["cache_hit"], true, "{g}");
    assert_eq!(g["total_cost"], 0.0, "{g}");
    assert_eq!(
        (g["model"].as_str(), g["provider"].as_str()),
        (Some("test/model"), Some("up"))
    );
    let g = get_ok(&gw, &format!("/v1/generation?id={miss_id}")).await["data"].clone();
    assert_eq!(g["cache_hit"], false, "{g}");

    // Without the header the cache is not asked (default off): upstream again.
    let plain = post(&gw, &body, false).await;
    assert!(plain.headers().get("x-openrouter-cache-status").is_none());
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn identical_means_same_json_same_key_and_errors_are_never_stored() {
    let up = upstream(|seen, n| async move {
        if n == 0 {
            json(
                400,
                json!({"error": {"message": "scripted", "type": "invalid_request_error"}}),
            )
        } else {
            answer(&seen)
        }
    })
    .await;
    let other = "sk-test-other-key-0123456789abc";
    let extra = format!("[[keys]]\nsecret = \"{other}\"\nname = \"other\"\ncredits_usd = 10\n");
    let gw = gateway(&openai_config(&[("up", &up.url())], &extra)).await;
    let body =
        r#"{"model":"test/model","messages":[{"role":"user","content":"x"}],"temperature":0.5}"#;
    let res = post(&gw, body, true).await;
    assert_eq!(
        (
            res.status().as_u16(),
            header(&res, "x-openrouter-cache-status")
        ),
        (400, "MISS")
    );
    assert_eq!(
        header(&post(&gw, body, true).await, "x-openrouter-cache-status"),
        "MISS"
    );
    let reordered = "{ \"temperature\": 0.5,\n  \"messages\": [{\"content\": \"x\", \"role\": \"user\"}], \"model\": \"test/model\" }";
    assert_eq!(
        header(
            &post(&gw, reordered, true).await,
            "x-openrouter-cache-status"
        ),
        "HIT"
    );
    assert_eq!(up.hits(), 2);
    // Another key never gets this key's answer.
    let res = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(other)
        .header("x-openrouter-cache", "true")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&res, "x-openrouter-cache-status"), "MISS");
    assert_eq!(up.hits(), 3);
    // A bad TTL is the client's error.
    let res = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(TEST_KEY)
        .header("x-openrouter-cache", "true")
        .header("x-openrouter-cache-ttl", "0")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_request");
}

#[tokio::test]
async fn a_streamed_hit_replays_the_same_content_and_ends_with_done() {
    let up = upstream(|seen, _| async move { answer(&seen) }).await;
    let gw = gateway(&openai_config(&[("up", &up.url())], "")).await;
    let mut body = ask("stream me");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let body = body.to_string();
    let miss = post(&gw, &body, true).await;
    assert_eq!(header(&miss, "x-openrouter-cache-status"), "MISS");
    let miss_text = miss.text().await.unwrap();
    let hit = post(&gw, &body, true).await;
    assert_eq!(header(&hit, "x-openrouter-cache-status"), "HIT");
    assert_eq!(header(&hit, "content-type"), "text/event-stream");
    let hit_id = header(&hit, "x-request-id").to_string();
    let hit_text = hit.text().await.unwrap();
    assert_eq!(up.hits(), 1);
    assert_eq!(sse_text(&hit_text), "Hello there");
    assert_eq!(sse_text(&hit_text), sse_text(&miss_text));
    let (m, h) = (sse_data(&miss_text), sse_data(&hit_text));
    assert_eq!(m.len(), h.len(), "{hit_text}");
    assert_eq!(h.last().map(String::as_str), Some("[DONE]"));
    for (a, b) in m.iter().zip(&h).filter(|(a, _)| a.as_str() != "[DONE]") {
        let (mut a, b): (Value, Value) = (
            serde_json::from_str(a).unwrap(),
            serde_json::from_str(b).unwrap(),
        );
        assert_eq!(b["id"], hit_id.as_str());
        a["id"] = b["id"].clone();
        if let Some(u) = a.get_mut("usage").and_then(Value::as_object_mut) {
            // Every number in `usage`, `cost_details` included, is zeroed in a hit.
            for v in u.values_mut() {
                if v.is_number() {
                    *v = json!(0);
                }
                if let Some(inner) = v.as_object_mut() {
                    inner.values_mut().for_each(|n| *n = json!(0));
                }
            }
        }
        assert_eq!(a, b, "event for event, content byte for byte");
    }
}

/// An upstream that holds its answers until `gate` has permits; answer `n == 0` is a
/// 400 when `fail_first`.
async fn gated(gate: Arc<tokio::sync::Semaphore>, fail_first: bool) -> Upstream {
    upstream(move |seen, n| {
        let gate = gate.clone();
        async move {
            let _permit = gate.acquire().await.unwrap();
            if fail_first && n == 0 {
                return json(
                    400,
                    json!({"error": {"message": "scripted", "type": "invalid_request_error"}}),
                );
            }
            answer(&seen)
        }
    })
    .await
}

/// Tests that move `switchboard_cache_waiting` (one gauge for the whole process) run
/// one at a time, so that each counts only its own waiting requests.
static WAITERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAITING: &str = "switchboard_cache_waiting";

/// `switchboard_cache_requests_total{status}` now.
async fn cache_count(gw: &TestGateway, status: &str) -> f64 {
    let name = format!(r#"switchboard_cache_requests_total{{status="{status}"}}"#);
    metric(&metrics_text(&gw.url("")).await, &name).unwrap_or(0.0)
}

/// Sends `n` identical cacheable requests at once; returns (status, cache status)
/// of each. The gate opens once the upstream holds the first request and the
/// `n - 1` others wait for it (`switchboard_cache_waiting`): every one of them took
/// the coalescing path. Hold [`WAITERS`] around it.
async fn burst(
    gw: &Arc<TestGateway>,
    up: &Upstream,
    gate: &tokio::sync::Semaphore,
    n: usize,
    body: &str,
) -> Vec<(u16, String)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (gw, body) = (gw.clone(), body.to_string());
            tokio::spawn(async move {
                let res = post(&gw, &body, true).await;
                let s = (
                    res.status().as_u16(),
                    header(&res, "x-openrouter-cache-status").to_string(),
                );
                res.bytes().await.unwrap();
                s
            })
        })
        .collect();
    tokio::time::timeout(SOCKET_TIMEOUT, async {
        while up.hits() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the first request reaches the upstream");
    // The upstream holds the first: the others can only be waiting for it.
    wait_for_metric(&gw.url(""), WAITING, (n - 1) as f64).await;
    assert_eq!(up.hits(), 1, "the others wait instead of calling upstream");
    gate.add_permits(1000);
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    // A follower stops counting before its answer is sent.
    let after = metric(&metrics_text(&gw.url("")).await, WAITING);
    assert_eq!(after, Some(0.0), "{out:?}");
    out
}

#[tokio::test]
async fn fifty_identical_requests_make_one_upstream_request_and_one_debit() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let up = gated(gate.clone(), false).await;
    let gw = Arc::new(gateway(&openai_config(&[("up", &up.url())], "")).await);
    let _one_at_a_time = WAITERS.lock().await;
    let before = spent(&gw).await;
    let coalesced = cache_count(&gw, "coalesced").await;
    let got = burst(&gw, &up, &gate, 50, &ask("burst").to_string()).await;
    assert_eq!(up.hits(), 1, "{got:?}");
    // Each of the 49 was answered as a follower of the first, none from the store.
    assert_eq!(cache_count(&gw, "coalesced").await - coalesced, 49.0);
    assert_eq!(
        got.iter().filter(|(s, c)| *s == 200 && c == "MISS").count(),
        1,
        "{got:?}"
    );
    assert_eq!(
        got.iter().filter(|(s, c)| *s == 200 && c == "HIT").count(),
        49,
        "{got:?}"
    );
    // One debit: the cost of one answer (7 prompt tokens at $1/Mtok + 3 at $2/Mtok).
    let one = 7.0 * 1e-6 + 3.0 * 2e-6;
    assert!(
        (spent(&gw).await - before - one).abs() < 1e-12,
        "{}",
        spent(&gw).await
    );
}

#[tokio::test]
async fn when_the_first_fails_one_waiting_request_takes_over() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let up = gated(gate.clone(), true).await;
    let gw = Arc::new(gateway(&openai_config(&[("up", &up.url())], "")).await);
    let _one_at_a_time = WAITERS.lock().await;
    let (miss, hit, coalesced) = (
        cache_count(&gw, "miss").await,
        cache_count(&gw, "hit").await,
        cache_count(&gw, "coalesced").await,
    );
    let got = burst(&gw, &up, &gate, 20, &ask("take over").to_string()).await;
    assert_eq!(up.hits(), 2, "the first and exactly one take-over: {got:?}");
    assert_eq!(cache_count(&gw, "miss").await - miss, 2.0);
    // The other 18 followed the take-over (or, once it was stored, found its answer).
    assert_eq!(
        cache_count(&gw, "hit").await - hit + cache_count(&gw, "coalesced").await - coalesced,
        18.0
    );
    assert_eq!(got.iter().filter(|(s, _)| *s == 400).count(), 1, "{got:?}");
    assert_eq!(
        got.iter().filter(|(s, c)| *s == 200 && c == "MISS").count(),
        1,
        "{got:?}"
    );
    assert_eq!(
        got.iter().filter(|(s, c)| *s == 200 && c == "HIT").count(),
        18,
        "{got:?}"
    );
}

#[tokio::test]
async fn two_gateways_sharing_redis_share_the_cache() {
    let Some(r) = switchboard::testing::redis("two_gateways_sharing_redis_share_the_cache") else {
        return;
    };
    // Its second instance may wait for the first's answer (moving the gauge).
    let _one_at_a_time = WAITERS.lock().await;
    let up = upstream(|seen, _| async move { answer(&seen) }).await;
    let extra = format!(
        "[shared]\nredis_url = \"{}\"\nprefix = \"{}\"\n",
        r.url(),
        r.prefix()
    );
    let (one, two) = gateway_pair(&openai_config(&[("up", &up.url())], &extra)).await;
    let body = ask("shared").to_string();
    let res = post(&one, &body, true).await;
    assert_eq!(header(&res, "x-openrouter-cache-status"), "MISS");
    let first: Value = res.json().await.unwrap();
    // The other instance: a hit (from Redis, or waiting on the first one's lock until
    // its answer is there), no upstream call.
    let res = post(&two, &body, true).await;
    assert_eq!(header(&res, "x-openrouter-cache-status"), "HIT");
    let second: Value = res.json().await.unwrap();
    assert_eq!(second["choices"], first["choices"]);
    assert_eq!(up.hits(), 1);
    // Its streamed twin is another key: a miss on the second, then a hit on the first.
    let mut stream = ask("shared");
    stream["stream"] = json!(true);
    let res = post(&two, &stream.to_string(), true).await;
    assert_eq!(header(&res, "x-openrouter-cache-status"), "MISS");
    res.text().await.unwrap();
    let res = post(&one, &stream.to_string(), true).await;
    assert_eq!(header(&res, "x-openrouter-cache-status"), "HIT");
    assert_eq!(sse_text(&res.text().await.unwrap()), "Hello there");
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn a_hit_on_a_postgres_store_is_a_free_record() {
    let Some(db) = switchboard::testing::postgres("a_hit_on_a_postgres_store_is_a_free_record")
    else {
        return;
    };
    let up = upstream(|seen, _| async move { answer(&seen) }).await;
    let mut config = Config::from_toml(&openai_config(&[("up", &up.url())], "")).unwrap();
    config.store.url = db.url().to_string();
    config.store.spill_dir = temp_dir("cache-pg").display().to_string();
    config.logging.sink = "none".into();
    let gw = gateway_with(config).await;
    let body = ask("pg").to_string();
    post(&gw, &body, true).await.bytes().await.unwrap();
    let before = spent(&gw).await;
    let hit = post(&gw, &body, true).await;
    assert_eq!(header(&hit, "x-openrouter-cache-status"), "HIT");
    let id = header(&hit, "x-request-id").to_string();
    hit.bytes().await.unwrap();
    let g = get_ok(&gw, &format!("/v1/generation?id={id}")).await["data"].clone();
    assert_eq!(
        (g["cache_hit"].as_bool(), g["total_cost"].as_f64()),
        (Some(true), Some(0.0)),
        "{g}"
    );
    assert_eq!(spent(&gw).await, before);
    assert_eq!(up.hits(), 1);
}
