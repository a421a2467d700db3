//! Keys, credits and limits through the real server (SPEC §3, §4).

mod common;

use std::sync::Arc;

use common::*;
use serde_json::{json, Value};
use switchboard::money::Money;

/// Mock models where a reserve equals the cost: the prompt is free, `mock/lorem`
/// writes exactly `max_tokens` words, each at $1 per Mtok.
fn exact_config(keys: &str) -> String {
    format!(
        r#"
{EXACT_LOREM}
[[models]]
id = "mock/echo"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 0.123457
  completion_usd_per_mtok = 1.234567

{keys}
"#
    )
}

async fn post(gw: &TestGateway, key: Option<&str>, body: Value) -> reqwest::Response {
    let mut req = client().post(gw.url("/v1/chat/completions")).json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.unwrap()
}

/// The decimal text of the first `"field":` number in `text`, parsed exactly.
fn money_field(text: &str, field: &str) -> Option<Money> {
    let pat = format!("\"{field}\":");
    let at = text.rfind(&pat)? + pat.len();
    let num: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-')
        .collect();
    num.parse().ok()
}

async fn total_usage(gw: &TestGateway, key: &str) -> Money {
    let res = client()
        .get(gw.url("/v1/credits"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    money_field(&res.text().await.unwrap(), "total_usage").unwrap()
}

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

async fn fifty_on_a_key_that_covers_five(stream: bool) {
    let gw = gateway(&exact_config(
        "[[keys]]\nsecret = \"sk-five-x-0123456789abc\"\ncredits_usd = 0.0005\n",
    ))
    .await;
    let gw = Arc::new(gw);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move {
                let res = post(
                    &gw,
                    Some("sk-five-x-0123456789abc"),
                    json!({"model": "mock/lorem", "max_tokens": 100, "stream": stream,
                           "messages": [{"role": "user", "content": "go"}]}),
                )
                .await;
                let status = res.status().as_u16();
                let text = res.text().await.unwrap();
                if status == 200 && stream {
                    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
                    assert!(!text.contains("\"error\""), "{text}");
                }
                if status != 200 {
                    assert_eq!(status, 402, "{text}");
                    assert!(text.contains("insufficient_credits"), "{text}");
                }
                status
            })
        })
        .collect();
    let mut served = 0;
    for t in tasks {
        served += usize::from(t.await.unwrap() == 200);
    }
    assert!(served <= 5, "{served} served");
    assert_eq!(served, 5, "each reserve equals its cost, so exactly 5 fit");
    let spent = total_usage(&gw, "sk-five-x-0123456789abc").await;
    assert_eq!(spent, usd("0.0005"));
    let (s, key) = get_json(&gw, "/v1/key", "sk-five-x-0123456789abc").await;
    assert_eq!(s, 200);
    assert_eq!(key["data"]["credits_remaining"].to_string(), "0");
}

#[tokio::test]
async fn fifty_concurrent_requests_on_a_key_that_covers_five() {
    fifty_on_a_key_that_covers_five(false).await;
}

#[tokio::test]
async fn fifty_concurrent_streams_on_a_key_that_covers_five() {
    fifty_on_a_key_that_covers_five(true).await;
}

#[tokio::test]
async fn a_thousand_costs_sum_to_the_balance_change_exactly() {
    let gw = Arc::new(
        gateway(&exact_config(
            "[[keys]]\nsecret = \"sk-exact-1-0123456789abc\"\ncredits_usd = 100\n",
        ))
        .await,
    );
    let before = total_usage(&gw, "sk-exact-1-0123456789abc").await;
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let gw = gw.clone();
            let sem = sem.clone();
            tokio::spawn(async move {
                let _permit = sem.acquire().await.unwrap();
                let stream = i % 2 == 1;
                let words = vec!["word"; 1 + i % 37].join(" ");
                let res = post(
                    &gw,
                    Some("sk-exact-1-0123456789abc"),
                    json!({"model": "mock/echo", "stream": stream,
                           "stream_options": {"include_usage": true},
                           "messages": [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": words}]}),
                )
                .await;
                assert_eq!(res.status(), 200);
                let text = res.text().await.unwrap();
                money_field(&text, "cost").unwrap_or_else(|| panic!("no cost in {text}"))
            })
        })
        .collect();
    let mut sum = Money::ZERO;
    for t in tasks {
        sum = sum + t.await.unwrap();
    }
    let after = total_usage(&gw, "sk-exact-1-0123456789abc").await;
    assert!(sum > Money::ZERO);
    assert_eq!(after - before, sum, "balance change vs sum of usage.cost");
}

#[tokio::test]
async fn rejected_requests_never_reach_an_upstream_and_cost_nothing() {
    let up = upstream(|_, _| async {
        json(
            200,
            json!({"id": "x", "object": "chat.completion", "created": 1, "model": "up-model",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 1}}),
        )
    })
    .await;
    std::env::set_var("SB_TEST_ADMIN_REJECTS", "admin-token-rejects");
    let keys = r#"
[admin]
token_env = "SB_TEST_ADMIN_REJECTS"

[[keys]]
secret = "sk-poor-1-0123456789abc"
credits_usd = 0.000001

[[keys]]
secret = "sk-gone-1-0123456789abc"
name = "gone"
credits_usd = 1

[[keys]]
secret = "sk-narrow-0123456789abc"
credits_usd = 1
models = ["mock/*"]

[[keys]]
secret = "sk-slow-1-0123456789abc"
credits_usd = 1
rpm = 1
"#;
    let gw = gateway(&openai_config(&[("alpha", &up.url())], keys)).await;
    // Disable `gone` through the admin API.
    let list: Value = client()
        .get(gw.url("/admin/keys"))
        .bearer_auth("admin-token-rejects")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let gone = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "gone")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = client()
        .patch(gw.url(&format!("/admin/keys/{gone}")))
        .bearer_auth("admin-token-rejects")
        .json(&json!({"disabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let ask = json!({"model": "test/model", "messages": [{"role": "user", "content": "hi"}]});
    let cases: Vec<(Option<&str>, Value, u16, &str)> = vec![
        (None, ask.clone(), 401, "invalid_api_key"),
        (Some("sk-nobody"), ask.clone(), 401, "invalid_api_key"),
        (
            Some("sk-poor-1-0123456789abc"),
            ask.clone(),
            402,
            "insufficient_credits",
        ),
        (
            Some("sk-gone-1-0123456789abc"),
            ask.clone(),
            403,
            "forbidden",
        ),
        (
            Some("sk-narrow-0123456789abc"),
            ask.clone(),
            403,
            "forbidden",
        ),
        (
            Some(TEST_KEY),
            json!({"model": "test/model"}),
            400,
            "invalid_request",
        ),
        (
            Some(TEST_KEY),
            json!({"model": "nope/nope", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "model_not_found",
        ),
    ];
    for (key, body, status, code) in cases {
        let res = post(&gw, key, body).await;
        assert_eq!(res.status().as_u16(), status, "{key:?}");
        // Refusals name their request too.
        assert!(
            res.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .starts_with("gen-"),
            "{key:?}"
        );
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{key:?}: {v}");
    }
    // rpm = 1: the first goes through, the second is 429 with Retry-After.
    assert_eq!(
        post(&gw, Some("sk-slow-1-0123456789abc"), ask.clone())
            .await
            .status(),
        200
    );
    let res = post(&gw, Some("sk-slow-1-0123456789abc"), ask.clone()).await;
    assert_eq!(res.status(), 429);
    let after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&after));
    assert_eq!(
        up.hits(),
        1,
        "only the one admitted request reached the upstream"
    );

    for key in [
        "sk-poor-1-0123456789abc",
        "sk-narrow-0123456789abc",
        TEST_KEY,
    ] {
        assert_eq!(total_usage(&gw, key).await, Money::ZERO, "{key}");
    }
}

#[tokio::test]
async fn key_credits_and_generation_routes_show_the_ledger() {
    let gw = gateway(&exact_config(
        r#"
[[keys]]
secret = "sk-owner-1-0123456789abc"
name = "owner"
credits_usd = 2
limit_usd = 1.5
rpm = 600

[[keys]]
secret = "sk-other-1-0123456789abc"
credits_usd = 1
"#,
    ))
    .await;
    let res = post(
        &gw,
        Some("sk-owner-1-0123456789abc"),
        json!({"model": "mock/lorem", "max_tokens": 7, "messages": [{"role": "user", "content": "go"}]}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_string();

    let (s, key) = get_json(&gw, "/v1/key", "sk-owner-1-0123456789abc").await;
    assert_eq!(s, 200);
    assert_eq!(
        key,
        json!({"data": {"name": "owner", "usage": 0.000007, "limit": 1.5,
                        "limit_remaining": 1.499993, "credits_remaining": 1.999993,
                        "rate_limit": {"requests": 600, "interval": "1m"},
                        "limit_reset": null, "usage_daily": 0.000007,
                        "usage_weekly": 0.000007, "usage_monthly": 0.000007,
                        "expires_at": null}})
    );
    let (_, credits) = get_json(&gw, "/api/v1/credits", "sk-owner-1-0123456789abc").await;
    assert_eq!(
        credits,
        json!({"data": {"total_credits": 2, "total_usage": 0.000007}})
    );
    let (s, g) = get_json(
        &gw,
        &format!("/v1/generation?id={id}"),
        "sk-owner-1-0123456789abc",
    )
    .await;
    assert_eq!(s, 200);
    let d = &g["data"];
    assert_eq!(d["id"], id.as_str());
    assert_eq!(d["model"], "mock/lorem");
    assert_eq!(d["provider"], "mock");
    assert_eq!(d["streamed"], false);
    assert_eq!(d["completion_tokens"], 7);
    assert_eq!(d["total_cost"].as_f64(), Some(0.000007));
    assert_eq!(d["finish_reason"], "length");
    assert_eq!(d["attempts"][0]["provider"], "mock");
    assert_eq!(d["attempts"][0]["status"], "200");
    assert!(d["latency_ms"].is_u64() && d["ttft_ms"].is_u64());

    // Someone else's generation does not exist for you.
    let (s, e) = get_json(
        &gw,
        &format!("/v1/generation?id={id}"),
        "sk-other-1-0123456789abc",
    )
    .await;
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("not_found")));
    let (_, other) = get_json(&gw, "/v1/key", "sk-other-1-0123456789abc").await;
    assert_eq!(other["data"]["rate_limit"], Value::Null);
    assert_eq!(other["data"]["limit"], Value::Null);

    let res = client().get(gw.url("/v1/key")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let res = client().get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn admin_api_creates_tops_up_and_disables_keys() {
    std::env::set_var("SB_TEST_ADMIN_API", "the-admin-token");
    let gw = gateway(&exact_config(
        "[admin]\ntoken_env = \"SB_TEST_ADMIN_API\"\n",
    ))
    .await;
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth("the-admin-token");

    // Wrong or missing token: 401.
    let res = client()
        .get(gw.url("/admin/keys"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        client()
            .get(gw.url("/admin/keys"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    let res = admin(client().post(gw.url("/admin/keys")))
        .json(&json!({"name": "bob", "credits_usd": 0.00001, "models": ["mock/lorem"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let made: Value = res.json().await.unwrap();
    let secret = made["data"]["secret"].as_str().unwrap().to_string();
    let id = made["data"]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("key_"));

    let ask = json!({"model": "mock/lorem", "max_tokens": 20, "messages": [{"role": "user", "content": "go"}]});
    // $0.00001 cannot cover the reserve of 20 tokens at $1/M ($0.00002): 402.
    assert_eq!(post(&gw, Some(&secret), ask.clone()).await.status(), 402);
    let res = admin(client().patch(gw.url(&format!("/admin/keys/{id}"))))
        .json(&json!({"top_up_usd": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let shown: Value = res.json().await.unwrap();
    assert_eq!(shown["data"]["credits"].as_f64(), Some(1.00001));
    assert_eq!(post(&gw, Some(&secret), ask.clone()).await.status(), 200);

    // Never a secret in a listing.
    let list = admin(client().get(gw.url("/admin/keys")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(list.contains(&id) && !list.contains(&secret), "{list}");
    let one: Value = admin(client().get(gw.url(&format!("/admin/keys/{id}"))))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["data"]["usage"].as_f64(), Some(0.00002));

    // Disabled: refused at once in this process.
    let res = admin(client().patch(gw.url(&format!("/admin/keys/{id}"))))
        .json(&json!({"disabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(post(&gw, Some(&secret), ask.clone()).await.status(), 403);

    let res = admin(client().get(gw.url("/admin/keys/key_nope")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = admin(client().post(gw.url("/admin/keys")))
        .json(&json!({"name": "no credits field"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}

/// Reproduced: `PATCH /admin/keys/ID {"top_up_usd": 9223372}` answered 500 after
/// committing, leaving a key that could not be read. Every amount is now checked
/// against its bound before anything is written.
#[tokio::test]
async fn admin_api_refuses_amounts_past_their_bounds_with_nothing_written() {
    std::env::set_var("SB_TEST_ADMIN_BOUNDS", "the-admin-token");
    let gw = gateway(&exact_config(
        "[admin]\ntoken_env = \"SB_TEST_ADMIN_BOUNDS\"\n",
    ))
    .await;
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth("the-admin-token");
    let res = admin(client().post(gw.url("/admin/keys")))
        .json(&json!({"name": "rich", "credits_usd": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let made: Value = res.json().await.unwrap();
    let id = made["data"]["id"].as_str().unwrap().to_string();

    for body in [
        json!({"top_up_usd": 9223372, "name": "renamed"}),
        json!({"top_up_usd": 1000000, "name": "renamed"}), // $1 + $1M > $1M
        json!({"limit_usd": 9223372, "name": "renamed"}),
        json!({"rpm": 4000000000u32, "name": "renamed"}),
        json!({"tokens_per_day": 9223372036854775807u64, "name": "renamed"}),
    ] {
        let res = admin(client().patch(gw.url(&format!("/admin/keys/{id}"))))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{body}");
        let err: Value = res.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_request", "{err}");
        assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
    }
    for body in [
        json!({"credits_usd": 1000000.5}),
        json!({"credits_usd": 1, "limit_usd": 2000000}),
    ] {
        let res = admin(client().post(gw.url("/admin/keys")))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{body}");
    }
    // Nothing was written, and every key still reads.
    let (status, list) = {
        let res = admin(client().get(gw.url("/admin/keys")))
            .send()
            .await
            .unwrap();
        (res.status(), res.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200, "{list}");
    let rich = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap();
    assert_eq!(rich["name"], "rich");
    assert_eq!(rich["credits"].as_f64(), Some(1.0));
    assert_eq!(rich["limit"], Value::Null);
    // Up to the bound is fine.
    let res = admin(client().patch(gw.url(&format!("/admin/keys/{id}"))))
        .json(&json!({"top_up_usd": 999999}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let shown: Value = res.json().await.unwrap();
    assert_eq!(shown["data"]["credits"].as_f64(), Some(1_000_000.0));
}

#[tokio::test]
async fn admin_api_is_absent_without_its_token_variable() {
    let gw = gateway(&exact_config(
        "[admin]\ntoken_env = \"SB_TEST_ADMIN_NEVER_SET\"\n",
    ))
    .await;
    let res = client()
        .get(gw.url("/admin/keys"))
        .bearer_auth("")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn a_reply_without_completion_tokens_costs_nothing() {
    let up = upstream(|_, _| async {
        json(
            200,
            json!({"id": "x", "object": "chat.completion", "created": 1, "model": "up-model",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 7, "completion_tokens": 0}}),
        )
    })
    .await;
    let gw = gateway(&openai_config(&[("alpha", &up.url())], "")).await;
    let before = total_usage(&gw, TEST_KEY).await;
    let res = post(
        &gw,
        Some(TEST_KEY),
        json!({"model": "test/model", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert_eq!(money_field(&text, "cost"), Some(Money::ZERO), "{text}");
    assert_eq!(total_usage(&gw, TEST_KEY).await, before);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_pays_for_what_was_delivered() {
    let events: Vec<String> = std::iter::once(
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hello"}, "finish_reason": null}]})
        .to_string(),
    )
    .chain((0..200).map(|_| {
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
               "choices": [{"index": 0, "delta": {"content": " more"}, "finish_reason": null}]})
        .to_string()
    }))
    .collect();
    let up = upstream(move |_, _| {
        let events = events.clone();
        async move { sse(events, std::time::Duration::from_millis(50)) }
    })
    .await;
    let gw = gateway(&openai_config(&[("alpha", &up.url())], "")).await;
    let mut res = post(
        &gw,
        Some(TEST_KEY),
        json!({"model": "test/model", "stream": true, "max_tokens": 500,
               "messages": [{"role": "user", "content": "talk"}]}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let first = String::from_utf8(res.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    let id_at = first.find("\"id\":\"").unwrap() + 6;
    let id = first[id_at..].split('"').next().unwrap().to_string();
    drop(res); // the client goes away after the first chunk

    // The cut is settled from the drop guard, without anyone waiting: poll for it.
    let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
    let g = loop {
        let (s, g) = get_json(&gw, &format!("/v1/generation?id={id}"), TEST_KEY).await;
        if s == 200 {
            break g;
        }
        assert!(std::time::Instant::now() < deadline, "never settled");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let completion = g["data"]["completion_tokens"].as_u64().unwrap();
    assert!(
        (1..200).contains(&completion),
        "charged for what was delivered up to the cut, not the whole answer: {g}"
    );
    let raw = client()
        .get(gw.url(&format!("/v1/generation?id={id}")))
        .bearer_auth(TEST_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let cost = money_field(&raw, "total_cost").unwrap();
    assert!(cost > Money::ZERO);
    // The only charge on the key is this one, to the unit.
    assert_eq!(total_usage(&gw, TEST_KEY).await, cost);
}

/// A store that delegates to SQLite but can be told to stop answering `ping`.
struct Flaky {
    inner: Arc<switchboard::store::SqliteStore>,
    down: std::sync::atomic::AtomicBool,
}

mod flaky_impl {
    use super::Flaky;
    use futures_util::future::BoxFuture;
    use switchboard::keys::KeyRecord;
    use switchboard::money::Money;
    use switchboard::store::*;

    impl KeyStore for Flaky {
        fn find(&self, h: &SecretHash) -> Result<Option<KeyRecord>, StoreError> {
            self.inner.find(h)
        }
        fn get(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
            KeyStore::get(&*self.inner, id)
        }
        fn list(&self) -> Result<Vec<StoredKey>, StoreError> {
            self.inner.list()
        }
        fn create(&self, h: SecretHash, n: NewKey) -> Result<StoredKey, StoreError> {
            self.inner.create(h, n)
        }
        fn update(&self, id: &str, p: &KeyPatch) -> Result<Option<StoredKey>, StoreError> {
            self.inner.update(id, p)
        }
        fn ping(&self) -> Result<(), StoreError> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError("disk on fire".into()));
            }
            self.inner.ping()
        }
    }

    impl Ledger for Flaky {
        fn reserve(&self, k: &KeyRecord, a: Reservation) -> switchboard::store::Admission {
            Ledger::reserve(&*self.inner, k, a)
        }
        fn release(&self, id: &str, a: Reservation) {
            self.inner.release(id, a)
        }
        fn settle(&self, s: Settlement) -> BoxFuture<'static, Result<bool, StoreError>> {
            self.inner.settle(s)
        }
        fn settle_detached(&self, s: Settlement) {
            self.inner.settle_detached(s)
        }
        fn flush(&self) -> BoxFuture<'static, ()> {
            self.inner.flush()
        }
        fn balance(&self, id: &str) -> Result<Balance, StoreError> {
            self.inner.balance(id)
        }
        fn tokens_today(&self, id: &str) -> Result<u64, StoreError> {
            self.inner.tokens_today(id)
        }
        fn top_up(&self, id: &str, a: Money) -> Result<Option<Balance>, StoreError> {
            self.inner.top_up(id, a)
        }
        fn generation(&self, id: &str) -> Result<Option<Generation>, StoreError> {
            self.inner.generation(id)
        }
    }
}

#[tokio::test]
async fn readyz_follows_the_store_and_builders_take_a_store_of_their_own() {
    use switchboard::store::{hash_secret, KeyStore, NewKey, SqliteStore};
    let sqlite = SqliteStore::open(&switchboard::config::StoreConfig {
        url: "sqlite::memory:".into(),
        ..Default::default()
    })
    .unwrap();
    sqlite
        .create(hash_secret("sk-own-store"), NewKey::new("own", usd("1")))
        .unwrap();
    let flaky = Arc::new(Flaky {
        inner: sqlite,
        down: Default::default(),
    });
    let mut config = switchboard::config::Config::from_toml(&exact_config("")).unwrap();
    // The store is given; the request log would sit beside the default store URL
    // (`./switchboard-logs.db`, in the crate root): none.
    config.logging.sink = "none".into();
    let gateway = switchboard::Gateway::builder()
        .config(config)
        .store(flaky.clone())
        .build()
        .unwrap();
    use tower::ServiceExt;
    let get = |path: &str, key: Option<&str>| {
        let mut b = http::Request::get(path);
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        b.body(axum::body::Body::empty()).unwrap()
    };
    let r = gateway.router();
    assert_eq!(
        r.clone()
            .oneshot(get("/readyz", None))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        r.clone()
            .oneshot(get("/v1/credits", Some("sk-own-store")))
            .await
            .unwrap()
            .status(),
        200
    );
    flaky.down.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(r.oneshot(get("/readyz", None)).await.unwrap().status(), 503);
}

#[tokio::test]
async fn a_second_gateway_on_the_same_sqlite_store_refuses_and_names_postgresql() {
    let dir = temp_dir("second-instance");
    let mut config = switchboard::config::Config::from_toml(&exact_config("")).unwrap();
    config.store.url = format!("sqlite://{}", dir.join("switchboard.db").display());
    config.logging.sink = "none".into();
    let first = switchboard::Gateway::builder()
        .config(config.clone())
        .build()
        .expect("the first gateway owns the store");
    let err = switchboard::Gateway::builder()
        .config(config.clone())
        .build()
        .map(drop)
        .expect_err("a second gateway on the same SQLite store must refuse")
        .to_string();
    assert!(
        err.contains("is in use by another switchboard process"),
        "{err}"
    );
    // SPEC §6: the refusal names PostgreSQL as the way to run several instances.
    assert!(
        err.contains("to run several instances on one ledger, give them a PostgreSQL store")
            && err.contains("[store].url = \"postgres://")
            && err.contains("docs/deployment.md"),
        "{err}"
    );
    // Once the first is gone, the store opens again.
    drop(first);
    switchboard::Gateway::builder()
        .config(config)
        .build()
        .expect("the store is free again");
    let _ = std::fs::remove_dir_all(dir);
}

/// `DELETE /admin/keys/{id}` and `POST /admin/keys/{id}/rotate` count at once on
/// this gateway; labels go in with `POST` and `PATCH`; without the admin variable
/// the answer names it.
#[tokio::test]
async fn admin_api_rotates_deletes_and_labels_keys() {
    std::env::set_var("SB_TEST_ADMIN_ROTATE", "the-admin-token");
    let gw = gateway(&exact_config(
        "[admin]\ntoken_env = \"SB_TEST_ADMIN_ROTATE\"\n",
    ))
    .await;
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth("the-admin-token");
    let ask = json!({"model": "mock/lorem", "max_tokens": 3, "messages": [{"role": "user", "content": "go"}]});

    let res = admin(client().post(gw.url("/admin/keys")))
        .json(&json!({"name": "bob", "credits_usd": 1, "labels": {"team": "search"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let made: Value = res.json().await.unwrap();
    let (id, first) = (
        made["data"]["id"].as_str().unwrap().to_string(),
        made["data"]["secret"].as_str().unwrap().to_string(),
    );
    assert_eq!(made["data"]["labels"], json!({"team": "search"}));
    assert_eq!(made["data"]["deleted"], json!(false));
    assert_eq!(post(&gw, Some(&first), ask.clone()).await.status(), 200);

    // Labels are replaced by PATCH; bad ones refused with the label named.
    let res = admin(client().patch(gw.url(&format!("/admin/keys/{id}"))))
        .json(&json!({"labels": {"tier": "gold"}}))
        .send()
        .await
        .unwrap();
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["data"]["labels"], json!({"tier": "gold"}), "{v}");
    let res = admin(client().patch(gw.url(&format!("/admin/keys/{id}"))))
        .json(&json!({"labels": {"no spaces": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`no spaces`"),
        "{v}"
    );

    // Rotate with a grace: both secrets work; then at once: only the newest.
    let res = admin(client().post(gw.url(&format!("/admin/keys/{id}/rotate"))))
        .json(&json!({"grace_secs": 3600}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let second = v["data"]["secret"].as_str().unwrap().to_string();
    assert_eq!(v["data"]["id"], json!(id));
    assert_eq!(post(&gw, Some(&first), ask.clone()).await.status(), 200);
    assert_eq!(post(&gw, Some(&second), ask.clone()).await.status(), 200);
    let res = admin(client().post(gw.url(&format!("/admin/keys/{id}/rotate"))))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let third = v["data"]["secret"].as_str().unwrap().to_string();
    for old in [&first, &second] {
        assert_eq!(post(&gw, Some(old), ask.clone()).await.status(), 401);
    }
    assert_eq!(post(&gw, Some(&third), ask.clone()).await.status(), 200);
    assert_eq!(
        total_usage(&gw, &third).await,
        usd("0.000012"),
        "one balance across the secrets"
    );
    let res = admin(client().post(gw.url(&format!("/admin/keys/{id}/rotate"))))
        .json(&json!({"grace_secs": 99999999}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);

    // Delete: refused at once, hidden from the list unless ?all=true, still shown.
    let res = admin(client().delete(gw.url(&format!("/admin/keys/{id}"))))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["data"]["deleted"], json!(true));
    let res = post(&gw, Some(&third), ask.clone()).await;
    assert_eq!(res.status(), 401);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["message"], "key deleted");
    let list: Value = admin(client().get(gw.url("/admin/keys")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!list.to_string().contains(&id));
    let all: Value = admin(client().get(gw.url("/admin/keys?all=true")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(all.to_string().contains(&id));
    let one: Value = admin(client().get(gw.url(&format!("/admin/keys/{id}"))))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["data"]["usage"], json!(0.000012));
    for res in [
        admin(client().delete(gw.url("/admin/keys/key_nope")))
            .send()
            .await
            .unwrap(),
        admin(client().post(gw.url("/admin/keys/key_nope/rotate")))
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(res.status(), 404);
    }
}

#[tokio::test]
async fn admin_api_off_names_the_variable_that_turns_it_on() {
    let gw = gateway(&exact_config(
        "[admin]\ntoken_env = \"SB_TEST_ADMIN_NEVER_SET\"\n",
    ))
    .await;
    let res = client().get(gw.url("/admin/keys")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        v["error"]["message"],
        "the admin API is off: set SB_TEST_ADMIN_NEVER_SET (see [admin].token_env) and restart"
    );
}
