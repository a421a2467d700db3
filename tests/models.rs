//! `GET /v1/models` and `/v1/models/{id}`: the whole catalog without a key, the
//! key's allow-list with one, and a wrong key told so.

mod common;

use common::{client, gateway, TestGateway};

const NARROW: &str = "sk-test-narrow-key-0123456789";
const WIDE: &str = "sk-test-wide-key-01234567890";

const CONFIG: &str = r#"
[logging]
sink = "none"

[[providers]]
name = "mock"
kind = "mock"

[[providers]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key = "sk-upstream-unused"

[[models]]
id = "mock/echo"
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[models]]
id = "mock/lorem"
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "lorem"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[models]]
id = "openai/gpt-4o-mini"
  [[models.endpoints]]
  provider = "openai"
  upstream_model = "gpt-4o-mini"
  prompt_usd_per_mtok = 0.15
  completion_usd_per_mtok = 0.6

[[keys]]
secret = "sk-test-narrow-key-0123456789"
name = "narrow"
credits_usd = 1
models = ["mock/*"]

[[keys]]
secret = "sk-test-wide-key-01234567890"
name = "wide"
credits_usd = 1
"#;

/// GETs `path` with the given headers: status and JSON body.
async fn get(gw: &TestGateway, path: &str, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let mut req = client().get(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

fn ids(list: &serde_json::Value) -> Vec<&str> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn without_a_key_the_whole_catalog_with_one_its_allow_list() {
    let gw = gateway(CONFIG).await;
    let all = ["mock/echo", "mock/lorem", "openai/gpt-4o-mini"];
    for prefix in ["/v1", "/api/v1"] {
        let (s, list) = get(&gw, &format!("{prefix}/models"), &[]).await;
        assert_eq!(s, 200, "{list}");
        assert_eq!(ids(&list), all);
    }
    let bearer = format!("Bearer {NARROW}");
    for auth in [("authorization", bearer.as_str()), ("x-api-key", NARROW)] {
        let (s, list) = get(&gw, "/v1/models", &[auth]).await;
        assert_eq!(s, 200, "{list}");
        assert_eq!(ids(&list), ["mock/echo", "mock/lorem"], "{auth:?}");
        assert_eq!(list["data"][0]["pricing"]["prompt"], "0.000001");
    }
    let (s, list) = get(
        &gw,
        "/v1/models",
        &[("authorization", &format!("Bearer {WIDE}"))],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(ids(&list), all, "no allow-list: every model");
}

#[tokio::test]
async fn one_model_outside_the_allow_list_is_403_and_unknown_ones_404() {
    let gw = gateway(CONFIG).await;
    let narrow = [("x-api-key", NARROW)];
    let (s, m) = get(&gw, "/v1/models/mock/echo", &narrow).await;
    assert_eq!((s, m["id"].as_str()), (200, Some("mock/echo")), "{m}");
    let (s, e) = get(&gw, "/v1/models/openai/gpt-4o-mini", &narrow).await;
    assert_eq!(s, 403, "{e}");
    assert_eq!(e["error"]["code"], "forbidden");
    assert_eq!(e["error"]["type"], "permission_error");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("narrow") && msg.contains("openai/gpt-4o-mini") && msg.contains("allow-list"),
        "{msg}"
    );
    // Without a key it is public, as before.
    let (s, m) = get(&gw, "/v1/models/openai/gpt-4o-mini", &[]).await;
    assert_eq!(
        (s, m["id"].as_str()),
        (200, Some("openai/gpt-4o-mini")),
        "{m}"
    );
    let (s, e) = get(&gw, "/v1/models/nope/nothing", &narrow).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
}

#[tokio::test]
async fn a_wrong_key_is_401_on_both_paths() {
    let gw = gateway(CONFIG).await;
    for path in ["/v1/models", "/v1/models/mock/echo", "/api/v1/models"] {
        for auth in [
            ("authorization", "Bearer sk-test-not-a-key-000000000"),
            ("x-api-key", "sk-test-not-a-key-000000000"),
        ] {
            let (s, e) = get(&gw, path, &[auth]).await;
            assert_eq!(s, 401, "{path} {auth:?}: {e}");
            assert_eq!(e["error"]["code"], "invalid_api_key");
            assert_eq!(e["error"]["type"], "authentication_error");
        }
    }
}
