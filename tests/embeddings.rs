//! `POST /v1/embeddings` through the whole stack (SPEC §7.3): the real server against
//! fake OpenAI-kind and Gemini upstreams on 127.0.0.1 and the in-process mock, with
//! the real ledger.

mod common;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use switchboard::money::Money;

/// `oa` and `ob` (OpenAI kind), `gm` (Gemini) and the mock; embedding models on each,
/// and one chat model. `extra` goes after the single-table sections.
fn config(oa: &str, ob: &str, gm: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{extra}

[[providers]]
name = "oa"
kind = "openai"
base_url = "{oa}/v1"
api_key = "sk-upstream-oa"
timeout_secs = 5

[[providers]]
name = "ob"
kind = "openai"
base_url = "{ob}/v1"
api_key = "sk-upstream-ob"
timeout_secs = 5

[[providers]]
name = "gm"
kind = "gemini"
base_url = "{gm}"
api_key = "sk-upstream-gm"
timeout_secs = 5

[[providers]]
name = "mock"
kind = "mock"

[[models]]
id = "oa/embed"
type = "embedding"
  [[models.endpoints]]
  provider = "oa"
  upstream_model = "up-embed"
  prompt_usd_per_mtok = 0.02
  completion_usd_per_mtok = 0

[[models]]
id = "two/embed"
type = "embedding"
  [[models.endpoints]]
  provider = "oa"
  upstream_model = "up-embed"
  prompt_usd_per_mtok = 0.02
  completion_usd_per_mtok = 0
  [[models.endpoints]]
  provider = "ob"
  upstream_model = "up-embed"
  prompt_usd_per_mtok = 0.03
  completion_usd_per_mtok = 0

[[models]]
id = "gm/embed"
type = "embedding"
  [[models.endpoints]]
  provider = "gm"
  upstream_model = "gemini-embedding-001"
  prompt_usd_per_mtok = 0.15
  completion_usd_per_mtok = 0

[[models]]
id = "mock/embed"
type = "embedding"
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "embed"
  prompt_usd_per_mtok = 0.1
  completion_usd_per_mtok = 0

[[models]]
id = "mock/echo"
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[keys]]
secret = "{TEST_KEY}"
name = "embedder"
credits_usd = 1000
"#
    )
}

/// A fake OpenAI embeddings answer: one 3-number vector per input (`[i, i + 0.5,
/// -0.25]`), listed in reverse order (the gateway puts them back by `index`), and
/// `usage.prompt_tokens = 5`.
fn openai_answer(seen: &Seen) -> axum::response::Response {
    let n = match &seen.body["input"] {
        Value::Array(items) if items.iter().all(Value::is_array) || items[0].is_string() => {
            items.len()
        }
        _ => 1,
    };
    let data: Vec<Value> = (0..n)
        .rev()
        .map(|i| {
            let f = i as f32;
            json!({"object": "embedding", "index": i, "embedding": [f, f + 0.5, -0.25]})
        })
        .collect();
    json(
        200,
        json!({"object": "list", "data": data, "model": "up-embed",
               "usage": {"prompt_tokens": 5, "total_tokens": 5}}),
    )
}

async fn unused() -> Upstream {
    upstream(|_, _| async { json(500, json!({"error": {"message": "not this one"}})) }).await
}

async fn embed(gw: &TestGateway, body: &Value) -> reqwest::Response {
    client()
        .post(gw.url("/v1/embeddings"))
        .bearer_auth(TEST_KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn embed_ok(gw: &TestGateway, body: &Value) -> (reqwest::header::HeaderMap, Value) {
    let res = embed(gw, body).await;
    let (status, headers) = (res.status(), res.headers().clone());
    let text = res.text().await.unwrap();
    assert_eq!(status, 200, "{body}: {text}");
    (headers, serde_json::from_str(&text).unwrap())
}

fn vectors(body: &Value) -> Vec<Vec<f32>> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["object"], "embedding");
            assert_eq!(d["index"], i);
            match &d["embedding"] {
                Value::String(b64) => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap();
                    raw.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                }
                v => v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect(),
            }
        })
        .collect()
}

/// GETs `path` with the test key; it must answer 200.
async fn get_ok(gw: &TestGateway, path: &str) -> Value {
    let (status, body) = get_json(gw, path, TEST_KEY).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// An amount of a JSON answer, exactly.
fn money(v: &Value) -> Money {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"))
}

/// What the test key has spent.
async fn spent(gw: &TestGateway) -> Money {
    money(&get_ok(gw, "/v1/credits").await["data"]["total_usage"])
}

#[tokio::test]
async fn an_openai_kind_upstream_gets_the_request_and_its_vectors_come_back() {
    let (oa, ob, gm) = (
        upstream(|seen, _| async move { openai_answer(&seen) }).await,
        unused().await,
        unused().await,
    );
    let gw = gateway(&config(&oa.url(), &ob.url(), &gm.url(), "")).await;
    let (h, body) = embed_ok(
        &gw,
        &json!({"model": "oa/embed", "input": ["alpha", "beta"], "dimensions": 3, "user": "u-1"}),
    )
    .await;
    assert_eq!(h["x-provider"], "oa");
    assert_eq!(h["x-model-used"], "oa/embed");
    let id = h["x-request-id"].to_str().unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "oa/embed");
    assert_eq!(body["id"], id);
    assert_eq!(
        vectors(&body),
        [vec![0.0, 0.5, -0.25], vec![1.0, 1.5, -0.25]]
    );
    // 5 prompt tokens × $0.02/M.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 5, "total_tokens": 5, "cost": 0.0000001})
    );

    let seen = oa.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/embeddings");
    assert_eq!(
        seen[0].header("authorization"),
        Some("Bearer sk-upstream-oa")
    );
    assert_eq!(
        seen[0].body,
        json!({"model": "up-embed", "input": ["alpha", "beta"], "dimensions": 3,
               "encoding_format": "float", "user": "u-1"})
    );

    // base64: the same vectors as little-endian f32s; the upstream is still asked
    // for floats. Token ids pass through as they came.
    let (_, body) = embed_ok(
        &gw,
        &json!({"model": "oa/embed", "input": [[1, 2], [3]], "encoding_format": "base64"}),
    )
    .await;
    assert!(body["data"][0]["embedding"].is_string(), "{body}");
    assert_eq!(
        vectors(&body),
        [vec![0.0, 0.5, -0.25], vec![1.0, 1.5, -0.25]]
    );
    let seen = &oa.requests()[1];
    assert_eq!(
        seen.body,
        json!({"model": "up-embed", "input": [[1, 2], [3]], "encoding_format": "float"})
    );
    let (_, body) = embed_ok(&gw, &json!({"model": "oa/embed", "input": "one"})).await;
    assert_eq!(vectors(&body).len(), 1);
    assert_eq!(oa.requests()[2].body["input"], "one");
}

#[tokio::test]
async fn a_gemini_upstream_gets_a_batch_of_embed_requests() {
    let gm = upstream(|seen, _| async move {
        let n = seen.body["requests"].as_array().map_or(0, Vec::len);
        let embeddings: Vec<Value> = (0..n)
            .map(|i| json!({"values": [i as f32 * 0.25, 0.5]}))
            .collect();
        json(200, json!({ "embeddings": embeddings }))
    })
    .await;
    let (oa, ob) = (unused().await, unused().await);
    let gw = gateway(&config(&oa.url(), &ob.url(), &gm.url(), "")).await;
    let (h, body) = embed_ok(
        &gw,
        &json!({"model": "gm/embed", "input": ["hello world", "bye"], "dimensions": 2}),
    )
    .await;
    assert_eq!(h["x-provider"], "gm");
    assert_eq!(vectors(&body), [vec![0.0, 0.5], vec![0.25, 0.5]]);
    let seen = gm.requests();
    assert_eq!(
        seen[0].path,
        "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    );
    assert_eq!(seen[0].header("x-goog-api-key"), Some("sk-upstream-gm"));
    assert_eq!(
        seen[0].body,
        json!({"requests": [
            {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "hello world"}]}, "outputDimensionality": 2},
            {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "bye"}]}, "outputDimensionality": 2},
        ]})
    );
    // Gemini reports no usage: the model's tokenizer counts the inputs.
    let tokens = switchboard::tokenize::count("o200k_base", "hello world")
        + switchboard::tokenize::count("o200k_base", "bye");
    assert_eq!(body["usage"]["prompt_tokens"], tokens);
    let g = get_ok(
        &gw,
        &format!("/v1/generation?id={}", body["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(g["data"]["prompt_tokens"], tokens);
    assert_eq!(g["data"]["completion_tokens"], 0);
    assert_eq!(g["data"]["total_cost"], body["usage"]["cost"]);

    // Gemini embeds text only: token ids are the client's error, and go nowhere.
    let res = embed(&gw, &json!({"model": "gm/embed", "input": [1, 2, 3]})).await;
    assert_eq!(res.status(), 400);
    let e: Value = res.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("token ids"),
        "{e}"
    );
    assert_eq!(gm.hits(), 1);
}

#[tokio::test]
async fn the_mock_is_deterministic_unit_vectors_and_its_cost_is_the_debit() {
    let (oa, ob, gm) = (unused().await, unused().await, unused().await);
    let gw = gateway(&config(&oa.url(), &ob.url(), &gm.url(), "")).await;
    let ask = json!({"model": "mock/embed", "input": ["the quick brown fox", "jumps"]});
    let before = spent(&gw).await;
    let (_, first) = embed_ok(&gw, &ask).await;
    let (_, again) = embed_ok(&gw, &ask).await;
    let (a, b) = (vectors(&first), vectors(&again));
    assert_eq!(a, b, "deterministic");
    assert_ne!(a[0], a[1]);
    for v in &a {
        assert_eq!(v.len(), 8);
        let norm: f64 = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
    let (_, sized) = embed_ok(
        &gw,
        &json!({"model": "mock/embed", "input": "the quick brown fox", "dimensions": 5}),
    )
    .await;
    assert_eq!(vectors(&sized)[0].len(), 5);

    // Money is exact: cost = prompt tokens × $0.1/M = the generation's cost = the debit.
    let tokens = switchboard::tokenize::count("o200k_base", "the quick brown fox")
        + switchboard::tokenize::count("o200k_base", "jumps");
    assert_eq!(first["usage"]["prompt_tokens"], tokens);
    let cost = money(&first["usage"]["cost"]);
    assert_eq!(cost, Money::from_pico(tokens as i64 * 100_000), "{first}");
    let g = get_ok(
        &gw,
        &format!("/v1/generation?id={}", first["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(g["data"]["total_cost"], first["usage"]["cost"]);
    assert_eq!(g["data"]["model"], "mock/embed");
    let after = spent(&gw).await;
    let sized_cost = money(&sized["usage"]["cost"]);
    assert_eq!(
        after.pico() - before.pico(),
        2 * cost.pico() + sized_cost.pico(),
        "every reply's cost debited, no more"
    );
}

#[tokio::test]
async fn a_failing_endpoint_falls_back_and_a_degraded_one_is_skipped() {
    let oa =
        upstream(|_, _| async { json(503, json!({"error": {"message": "overloaded"}})) }).await;
    let ob = upstream(|seen, _| async move { openai_answer(&seen) }).await;
    let gm = unused().await;
    let gw = gateway(&config(
        &oa.url(),
        &ob.url(),
        &gm.url(),
        "[health]\nfailure_threshold = 1\ncooldown_secs = 600\n",
    ))
    .await;
    let ask = json!({"model": "two/embed", "input": "hello there",
                     "provider": {"order": ["oa", "ob"]}});
    let (h, body) = embed_ok(&gw, &ask).await;
    assert_eq!(h["x-provider"], "ob");
    assert_eq!(vectors(&body), [vec![0.0, 0.5, -0.25]]);
    // ob's price: 5 × $0.03/M.
    assert_eq!(money(&body["usage"]["cost"]), "0.00000015".parse().unwrap());
    assert_eq!((oa.hits(), ob.hits()), (1, 1));

    // `oa` is degraded now: skipped without being contacted.
    let (h, _) = embed_ok(&gw, &ask).await;
    assert_eq!(h["x-provider"], "ob");
    assert_eq!((oa.hits(), ob.hits()), (1, 2));
}

#[tokio::test]
async fn models_of_the_wrong_type_and_bad_inputs_are_400s() {
    let (oa, ob, gm) = (unused().await, unused().await, unused().await);
    let gw = gateway(&config(&oa.url(), &ob.url(), &gm.url(), "")).await;

    let res = embed(&gw, &json!({"model": "mock/echo", "input": "x"})).await;
    assert_eq!(res.status(), 400);
    let e: Value = res.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_request");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`mock/echo` is a chat model"),
        "{e}"
    );

    let res = post_chat(
        &gw,
        TEST_KEY,
        &json!({"model": "mock/embed", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(res.status(), 400);
    let e: Value = res.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_request");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`mock/embed` is an embedding model: call /v1/embeddings"),
        "{e}"
    );
    // A chat model among the fallbacks is refused too.
    let res = embed(
        &gw,
        &json!({"model": "mock/embed", "models": ["mock/echo"], "input": "x"}),
    )
    .await;
    assert_eq!(res.status(), 400);

    for (body, field) in [
        (json!({"model": "mock/embed", "input": ""}), "`input`"),
        (json!({"model": "mock/embed", "input": []}), "`input`"),
        (
            json!({"model": "mock/embed", "input": [1, 2.5]}),
            "`input[1]`",
        ),
        (
            json!({"model": "mock/embed", "input": vec!["a"; 2049]}),
            "`input`",
        ),
        (
            json!({"model": "mock/embed", "input": "x", "dimensions": 0}),
            "`dimensions`",
        ),
        (
            json!({"model": "mock/embed", "input": "x", "encoding_format": "hex"}),
            "`encoding_format`",
        ),
        (
            json!({"model": "mock/embed", "input": "x", "stream": true}),
            "`stream`",
        ),
    ] {
        let res = embed(&gw, &body).await;
        assert_eq!(res.status(), 400, "{body}");
        let e: Value = res.json().await.unwrap();
        assert_eq!(e["error"]["code"], "invalid_request");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(field),
            "{body}: {e}"
        );
    }
    // Nothing was charged for any of them.
    assert_eq!(spent(&gw).await, Money::ZERO);
}

#[tokio::test]
async fn models_list_their_type() {
    let (oa, ob, gm) = (unused().await, unused().await, unused().await);
    let gw = gateway(&config(&oa.url(), &ob.url(), &gm.url(), "")).await;
    let (_, list) = get_json(&gw, "/v1/models", TEST_KEY).await;
    let types: Vec<(String, String)> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        types.contains(&("mock/embed".into(), "embedding".into())),
        "{types:?}"
    );
    assert!(
        types.contains(&("mock/echo".into(), "chat".into())),
        "{types:?}"
    );
    let (status, one) = get_json(&gw, "/v1/models/gm/embed", TEST_KEY).await;
    assert_eq!(status, 200);
    assert_eq!(one["type"], "embedding");
    assert_eq!(one["pricing"]["completion"], "0");
}

#[tokio::test]
async fn a_cached_repeat_is_a_hit_with_no_upstream_call() {
    let oa = upstream(|seen, _| async move { openai_answer(&seen) }).await;
    let (ob, gm) = (unused().await, unused().await);
    let gw = gateway(&config(&oa.url(), &ob.url(), &gm.url(), "")).await;
    let ask = json!({"model": "oa/embed", "input": ["cache", "me"]});
    let post = || {
        client()
            .post(gw.url("/v1/embeddings"))
            .bearer_auth(TEST_KEY)
            .header("x-openrouter-cache", "true")
            .json(&ask)
            .send()
    };
    let miss = post().await.unwrap();
    assert_eq!(miss.headers()["x-openrouter-cache-status"], "MISS");
    let first: Value = miss.json().await.unwrap();
    let spent_after_miss = spent(&gw).await;

    let hit = post().await.unwrap();
    assert_eq!(hit.status(), 200);
    assert_eq!(hit.headers()["x-openrouter-cache-status"], "HIT");
    let hit_id = hit.headers()["x-request-id"].to_str().unwrap().to_string();
    let second: Value = hit.json().await.unwrap();
    assert_eq!(oa.hits(), 1, "no upstream call for a hit");
    assert_eq!(second["id"], hit_id.as_str());
    assert_eq!(second["data"], first["data"]);
    assert_eq!(
        second["usage"],
        json!({"prompt_tokens": 0, "total_tokens": 0, "cost": 0})
    );
    assert_eq!(spent(&gw).await, spent_after_miss, "a hit debits nothing");
}
