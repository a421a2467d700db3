//! `POST /v1/route` (SPEC §9): the explained plan is the plan a real request takes,
//! for each reason an endpoint is kept, dropped or placed. Real requests walk their
//! whole plan against fake upstreams that answer 404 (a failover failure: the next
//! endpoint at once, no retry, no health change), and the order they reach the fakes
//! in is compared with the explained order.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use serde_json::{json, Value};

/// The order the fakes were reached in (provider names), for requests saying "walk".
type Log = Arc<Mutex<Vec<String>>>;

/// A fake named `name`: "walk" → 404 (logged), "fail" → 500, "park" → 429 with
/// `Retry-After: 120`, anything else → a completion.
async fn fake(name: &'static str, log: &Log) -> Upstream {
    let log = log.clone();
    upstream(move |seen, _| {
        let log = log.clone();
        async move {
            let said = seen.body["messages"][0]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            match said.as_str() {
                "walk" => {
                    log.lock().unwrap().push(name.to_string());
                    json(404, json!({"error": {"message": "no such model here"}}))
                }
                "fail" => json(500, json!({"error": {"message": "down"}})),
                "park" => {
                    let mut res = json(429, json!({"error": {"message": "slow down"}}));
                    res.headers_mut()
                        .insert("retry-after", http::HeaderValue::from_static("120"));
                    res
                }
                _ => json(
                    200,
                    json!({"id": "x", "object": "chat.completion", "created": 1, "model": "up",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                        "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
                ),
            }
        }
    })
    .await
}

/// The key with an allow-list (`test/model` only) and a tight rpm.
const NARROW_KEY: &str = "sk-narrow-client-key-0123456789";

/// Providers a, b, c (c collects data) serving `test/model` at $1+$1, $2+$2, $3+$3
/// per Mtok, and `test/other` served by b; the test key, and [`NARROW_KEY`].
async fn setup(health: &str) -> (TestGateway, [Upstream; 3], Log) {
    let log: Log = Arc::default();
    let ups = [
        fake("a", &log).await,
        fake("b", &log).await,
        fake("c", &log).await,
    ];
    let mut s = String::from("[server]\nlisten = \"127.0.0.1:0\"\n\n");
    for (name, up) in ["a", "b", "c"].iter().zip(&ups) {
        let dc = if *name == "c" { "allow" } else { "deny" };
        s.push_str(&format!(
            "[[providers]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\napi_key = \"sk-upstream-{name}\"\ntimeout_secs = 5\ndata_collection = \"{dc}\"\n\n",
            up.url()
        ));
    }
    s.push_str("[[models]]\nid = \"test/model\"\nmax_output_tokens = 100\n");
    for (name, price) in [("a", 1), ("b", 2), ("c", 3)] {
        s.push_str(&format!(
            "  [[models.endpoints]]\n  provider = \"{name}\"\n  upstream_model = \"up\"\n  prompt_usd_per_mtok = {price}\n  completion_usd_per_mtok = {price}\n"
        ));
    }
    s.push_str("\n[[models]]\nid = \"test/other\"\n  [[models.endpoints]]\n  provider = \"b\"\n  upstream_model = \"up\"\n  prompt_usd_per_mtok = 1\n  completion_usd_per_mtok = 1\n\n");
    s.push_str(health);
    s.push_str(&format!(
        "\n[[keys]]\nsecret = \"{TEST_KEY}\"\nname = \"demo\"\ncredits_usd = 1000\n\n[[keys]]\nsecret = \"{NARROW_KEY}\"\nname = \"narrow\"\ncredits_usd = 10\nrpm = 30\nmodels = [\"test/model\"]\n"
    ));
    (gateway(&s).await, ups, log)
}

fn body(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": "test/model", "max_tokens": 10,
                       "messages": [{"role": "user", "content": content}]});
    if let (Some(b), Some(extra)) = (b.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            b.insert(k.clone(), v.clone());
        }
    }
    b
}

async fn explain_as(gw: &TestGateway, key: &str, body: &Value) -> (u16, Value) {
    let res = client()
        .post(gw.url("/v1/route"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn explain(gw: &TestGateway, body: &Value) -> Value {
    let (status, v) = explain_as(gw, TEST_KEY, body).await;
    assert_eq!(status, 200, "{v}");
    v["data"].clone()
}

/// The explained plan's kept `model@provider`s, in order.
fn kept(data: &Value) -> Vec<String> {
    data["plan"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kept"] == true)
        .map(|s| s["provider"].as_str().unwrap().to_string())
        .collect()
}

/// The reason given for `provider`'s step.
fn reason<'a>(data: &'a Value, provider: &str, kept: bool) -> &'a str {
    data["plan"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["provider"] == provider && s["kept"] == kept)
        .unwrap_or_else(|| panic!("no step {provider} kept={kept} in {data}"))["reason"]
        .as_str()
        .unwrap()
}

/// Sends the "walk" request as a real chat request: the providers it reached, in order.
async fn walk(gw: &TestGateway, log: &Log, key: &str, extra: Value) -> (u16, Vec<String>) {
    log.lock().unwrap().clear();
    let res = post_chat(gw, key, &body("walk", extra)).await;
    let status = res.status().as_u16();
    let _ = res.bytes().await;
    (status, log.lock().unwrap().clone())
}

/// Explain and the real path agree on the kept endpoints and their order.
async fn same_plan(gw: &TestGateway, log: &Log, extra: Value) -> Value {
    let data = explain(gw, &body("walk", extra.clone())).await;
    assert!(data["error"].is_null(), "{data}");
    let (status, reached) = walk(gw, log, TEST_KEY, extra).await;
    assert_eq!(status, 502, "every fake answers 404");
    assert_eq!(kept(&data), reached, "explained {data}");
    data
}

#[tokio::test]
async fn order_sort_and_variants_are_the_real_order() {
    let (gw, _, log) = setup("").await;
    let d = same_plan(&gw, &log, json!({"provider": {"order": ["c", "a"]}})).await;
    assert_eq!(kept(&d), ["c", "a", "b"]);
    assert!(reason(&d, "c", true).contains("provider.order"));
    assert!(reason(&d, "b", true).contains("cheapest first"));
    let d = same_plan(&gw, &log, json!({"provider": {"sort": "price"}})).await;
    assert_eq!(kept(&d), ["a", "b", "c"]);
    assert!(
        reason(&d, "a", true).contains("provider.sort = price"),
        "{d}"
    );
    let d = same_plan(&gw, &log, json!({"model": "test/model:floor"})).await;
    assert!(reason(&d, "b", true).starts_with(":floor"), "{d}");
    // Nothing observed yet: throughput keeps the price order.
    let d = same_plan(&gw, &log, json!({"provider": {"sort": "throughput"}})).await;
    assert!(reason(&d, "a", true).contains("not observed yet"), "{d}");
    // `allow_fallbacks: false` with `order`: only the ordered ones.
    let d = same_plan(
        &gw,
        &log,
        json!({"provider": {"order": ["b"], "allow_fallbacks": false}}),
    )
    .await;
    assert_eq!(kept(&d), ["b"]);
    assert!(
        reason(&d, "a", false).contains("allow_fallbacks is false"),
        "{d}"
    );
    // Without `order`: the first alone.
    let d = same_plan(
        &gw,
        &log,
        json!({"provider": {"sort": "price", "allow_fallbacks": false}}),
    )
    .await;
    assert_eq!(kept(&d), ["a"]);
    assert!(reason(&d, "c", false).contains("only the first"), "{d}");
}

#[tokio::test]
async fn only_ignore_max_price_and_data_collection_drop_what_the_real_path_drops() {
    let (gw, _, log) = setup("").await;
    let d = same_plan(
        &gw,
        &log,
        json!({"provider": {"only": ["c", "b"], "sort": "price"}}),
    )
    .await;
    assert_eq!(kept(&d), ["b", "c"]);
    assert_eq!(reason(&d, "a", false), "provider `a` not in provider.only");

    let d = same_plan(
        &gw,
        &log,
        json!({"provider": {"ignore": ["b"], "sort": "price"}}),
    )
    .await;
    assert_eq!(kept(&d), ["a", "c"]);
    assert!(reason(&d, "b", false).contains("ignored by request"), "{d}");

    let d = same_plan(
        &gw,
        &log,
        json!({"provider": {"max_price": {"prompt": 2.5}, "sort": "price"}}),
    )
    .await;
    assert_eq!(kept(&d), ["a", "b"]);
    assert!(
        reason(&d, "c", false).starts_with("prompt price 3/M above max_price 2.5/M"),
        "{d}"
    );

    let d = same_plan(
        &gw,
        &log,
        json!({"provider": {"data_collection": "deny", "sort": "price"}}),
    )
    .await;
    assert_eq!(kept(&d), ["a", "b"]);
    assert!(reason(&d, "c", false).contains("data_collection"), "{d}");

    // Preferences that leave nothing: 200 with every candidate out and the error the
    // real request gets.
    let extra = json!({"provider": {"only": ["zzz"]}});
    let d = explain(&gw, &body("walk", extra.clone())).await;
    assert!(kept(&d).is_empty());
    assert_eq!(d["plan"].as_array().unwrap().len(), 3);
    assert_eq!(d["error"]["code"], "no_endpoints");
    assert_eq!(d["error"]["status"], 404);
    assert!(d["reserve_usd"].is_null());
    let res = post_chat(&gw, TEST_KEY, &body("walk", extra)).await;
    assert_eq!(res.status(), 404);
    let real: Value = res.json().await.unwrap();
    assert_eq!(real["error"]["message"], d["error"]["message"]);
}

#[tokio::test]
async fn the_allow_list_drops_what_the_real_path_drops() {
    let (gw, _, log) = setup("").await;
    // A fallback model outside the key's allow-list: its endpoints are out.
    let extra = json!({"models": ["test/other"], "provider": {"sort": "price"}});
    let (status, v) = explain_as(&gw, NARROW_KEY, &body("walk", extra.clone())).await;
    assert_eq!(status, 200, "{v}");
    let d = &v["data"];
    let (_, reached) = walk(&gw, &log, NARROW_KEY, extra.clone()).await;
    assert_eq!(kept(d), reached);
    assert_eq!(reached, ["a", "b", "c"]);
    let other = d["plan"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["model"] == "test/other")
        .unwrap();
    assert_eq!(other["kept"], false);
    assert_eq!(
        other["reason"],
        "model `test/other` not in key's allow-list"
    );
    // The test key may use it: the real path and the explain both try it last.
    let d = same_plan(&gw, &log, extra).await;
    assert_eq!(kept(&d), ["a", "b", "c", "b"]);

    // The first model outside it: 403 for real, 200 with the 403 in the explain.
    let extra = json!({"model": "test/other"});
    let (_, v) = explain_as(&gw, NARROW_KEY, &body("walk", extra.clone())).await;
    assert_eq!(v["data"]["error"]["code"], "forbidden");
    assert_eq!(v["data"]["error"]["status"], 403);
    assert_eq!(v["data"]["plan"][0]["kept"], false);
    let (status, reached) = walk(&gw, &log, NARROW_KEY, extra).await;
    assert_eq!((status, reached.len()), (403, 0));

    // An unknown model: the explain carries the real 404.
    let (_, v) = explain_as(&gw, TEST_KEY, &body("walk", json!({"model": "no/such"}))).await;
    assert_eq!(v["data"]["error"]["code"], "model_not_found");
    assert_eq!(v["data"]["plan"], json!([]));
}

#[tokio::test]
async fn a_degraded_endpoint_is_out_until_its_cooldown_ends() {
    let (gw, _, log) = setup("[health]\nfailure_threshold = 1\ncooldown_secs = 600\n").await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let res = post_chat(
        &gw,
        TEST_KEY,
        &body("fail", json!({"provider": {"only": ["b"]}})),
    )
    .await;
    assert_eq!(res.status(), 502);
    let extra = json!({"provider": {"sort": "price"}});
    let data = explain(&gw, &body("walk", extra.clone())).await;
    let why = reason(&data, "b", false);
    let until = why
        .strip_prefix("degraded until ")
        .unwrap_or_else(|| panic!("{why}"));
    let until = switchboard::clock::parse_rfc3339(until).unwrap();
    assert!(
        (before + 600..=before + 660).contains(&until),
        "{until} vs {before}"
    );
    assert_eq!(kept(&data), ["a", "c"]);
    // The real request skips it as well.
    let (_, reached) = walk(&gw, &log, TEST_KEY, extra).await;
    assert_eq!(kept(&data), reached);
}

#[tokio::test]
async fn a_parked_endpoint_is_out_by_its_retry_after() {
    let (gw, _, log) = setup("").await;
    let res = post_chat(
        &gw,
        TEST_KEY,
        &body("park", json!({"provider": {"only": ["a"]}})),
    )
    .await;
    assert_eq!(res.status(), 429);
    let data = same_plan(&gw, &log, json!({"provider": {"sort": "price"}})).await;
    assert_eq!(kept(&data), ["b", "c"]);
    let why = reason(&data, "a", false);
    assert!(why.starts_with("parked until "), "{why}");
    assert!(why.ends_with(" by Retry-After"), "{why}");
}

#[tokio::test]
async fn weighted_shares_are_the_draws_and_explain_costs_nothing() {
    let (gw, ups, _) = setup("").await;
    let credits = || async { get_json(&gw, "/v1/credits", TEST_KEY).await.1 };
    let before = credits().await;
    let data = explain(&gw, &body("hi", json!({}))).await;
    // The draw's group, cheapest first, as the health filter sorts it.
    let catalog = gw.gateway.catalog();
    let group = catalog.model("test/model").unwrap().endpoints.clone();
    let shares = switchboard::health::draw_shares(&group);
    // The draw itself, over an even grid of random numbers, picks each that often.
    let n = 100_000;
    let mut picks = [0usize; 3];
    for i in 0..n {
        let r = (i as f64 + 0.5) / n as f64;
        picks[switchboard::health::weighted_draw(&group, &move || r)] += 1;
    }
    let steps = data["plan"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    let mut sum = 0.0;
    for (i, e) in group.iter().enumerate() {
        let step = steps
            .iter()
            .find(|s| s["provider"] == e.provider.name.as_ref())
            .unwrap();
        let share = step["share"].as_f64().unwrap();
        assert_eq!(share, shares[i]);
        assert!(
            (share - picks[i] as f64 / n as f64).abs() < 1e-3,
            "{share} {picks:?}"
        );
        assert!(step["reason"].as_str().unwrap().contains("weighted draw"));
        sum += share;
    }
    assert!((sum - 1.0).abs() < 1e-9);
    // $2, $4, $6 per Mtok: ¼ : 1/16 : 1/36.
    assert!((shares[0] - 0.7347).abs() < 1e-3, "{shares:?}");
    // The reserve is what credit reserves over that plan.
    let request =
        switchboard::normalize::parse_request(body("hi", json!({})).to_string().as_bytes())
            .unwrap();
    let reserve = switchboard::credit::reserve_for(&request, &group);
    assert_eq!(data["reserve_usd"].to_string(), reserve.to_string());
    // No upstream called, nothing charged.
    assert!(ups.iter().all(|u| u.hits() == 0));
    assert_eq!(credits().await, before);
}

#[tokio::test]
async fn bad_body_400_no_key_401_and_rpm_counts() {
    let (gw, _, _) = setup("").await;
    let res = client()
        .post(gw.url("/v1/route"))
        .bearer_auth(TEST_KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_request");
    let (status, v) = explain_as(
        &gw,
        TEST_KEY,
        &json!({"model": "test/model", "messages": []}),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );

    let res = client()
        .post(gw.url("/api/v1/route"))
        .json(&body("hi", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    // Also under /api/v1.
    let res = client()
        .post(gw.url("/api/v1/route"))
        .bearer_auth(TEST_KEY)
        .json(&body("hi", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // The key's rpm (30) counts explains like any client request.
    let mut refused = 0;
    for _ in 0..31 {
        let (status, _) = explain_as(&gw, NARROW_KEY, &body("hi", json!({}))).await;
        refused += usize::from(status == 429);
    }
    assert_eq!(refused, 1);
}
