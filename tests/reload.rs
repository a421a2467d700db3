//! Config reload (SPEC §9, issue 24): `POST /admin/reload` and `SIGHUP` swap the
//! config for new requests while requests in flight finish on the old one.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use switchboard::config::Config;
use switchboard::Gateway;

const ADMIN_ENV: &str = "SB_TEST_RELOAD_ADMIN";
const ADMIN: &str = "reload-admin-token-0123456789";

fn chunk(delta: Value, finish: Option<&str>) -> String {
    json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    .to_string()
}

/// A config: `[server]`, a temporary store, no request log, the admin token, then
/// `body` and the test key.
fn config_text(dir: &std::path::Path, body: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"sqlite://{}\"\n\n[logging]\nsink = \"none\"\n\n[admin]\ntoken_env = \"{ADMIN_ENV}\"\n\n{body}\n[[keys]]\nsecret = \"{TEST_KEY}\"\nname = \"t\"\ncredits_usd = 100\n",
        dir.join("switchboard.db").display()
    )
}

fn provider(name: &str, url: &str) -> String {
    format!("[[providers]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"{url}/v1\"\napi_key = \"sk-upstream-{name}\"\ntimeout_secs = 5\n\n")
}

fn model(id: &str, endpoints: &[(&str, u32)]) -> String {
    let mut s = format!("[[models]]\nid = \"{id}\"\nmax_output_tokens = 1000\n");
    for (p, completion) in endpoints {
        s.push_str(&format!("  [[models.endpoints]]\n  provider = \"{p}\"\n  upstream_model = \"up-model\"\n  prompt_usd_per_mtok = 0\n  completion_usd_per_mtok = {completion}\n"));
    }
    s.push('\n');
    s
}

/// Writes `text` as the config file, builds the gateway from it (with the file to
/// reload) and serves it.
async fn start(dir: &std::path::Path, text: &str) -> (TestGateway, PathBuf) {
    std::env::set_var(ADMIN_ENV, ADMIN);
    let file = dir.join("switchboard.toml");
    std::fs::write(&file, text).unwrap();
    let config = Config::from_file(&file).unwrap();
    let gateway = Gateway::builder()
        .config(config)
        .config_file(&file)
        .build()
        .unwrap();
    (serve_built(gateway).await, file)
}

async fn reload(gw: &TestGateway, token: Option<&str>) -> (u16, Value) {
    let mut req = client().post(gw.url("/admin/reload"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn spent(gw: &TestGateway) -> f64 {
    let (status, v) = get_json(gw, "/v1/credits", TEST_KEY).await;
    assert_eq!(status, 200, "{v}");
    v["data"]["total_usage"].as_f64().unwrap()
}

fn ask(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "max_tokens": 1000,
           "stream_options": {"include_usage": stream},
           "messages": [{"role": "user", "content": "go"}]})
}

/// 500 completion tokens; the stream holds its last events until `gate` opens.
fn answer(stream: bool, gate: Option<Arc<tokio::sync::Semaphore>>) -> axum::response::Response {
    let usage = json!({"prompt_tokens": 1, "completion_tokens": 500, "total_tokens": 501});
    if !stream {
        return json(
            200,
            json!({"id": "x", "object": "chat.completion", "created": 1, "model": "up-model",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "new"},
                                "finish_reason": "stop"}], "usage": usage}),
        );
    }
    let first = vec![chunk(json!({"role": "assistant", "content": "old "}), None)];
    let mut last = vec![chunk(json!({"content": "price"}), Some("stop"))];
    last.push(
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
               "choices": [], "usage": usage})
        .to_string(),
    );
    last.push("[DONE]".into());
    let events = futures_util::stream::iter(first)
        .map(|e| Ok::<_, std::convert::Infallible>(bytes::Bytes::from(format!("data: {e}\n\n"))))
        .chain(
            futures_util::stream::once(async move {
                if let Some(g) = gate {
                    let _ = g.acquire().await.unwrap();
                }
                futures_util::stream::iter(last.into_iter().map(|e| {
                    Ok::<_, std::convert::Infallible>(bytes::Bytes::from(format!("data: {e}\n\n")))
                }))
            })
            .flatten(),
        );
    axum::response::Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(events))
        .unwrap()
}

#[tokio::test]
async fn a_stream_in_flight_ends_on_the_old_config_and_new_requests_use_the_new() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let a = upstream(move |seen, _| {
        let g = g.clone();
        async move { answer(seen.body["stream"] == true, Some(g)) }
    })
    .await;
    let b = upstream(|seen, _| async move { answer(seen.body["stream"] == true, None) }).await;
    let dir = fresh_temp_dir();
    let (gw, file) = start(
        &dir,
        &config_text(
            &dir,
            &(provider("a", &a.url()) + &model("test/model", &[("a", 2)])),
        ),
    )
    .await;

    // A stream on provider `a` at $2/Mtok, held open after its first chunk.
    let res = post_chat(&gw, TEST_KEY, &ask("test/model", true)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "a");
    let mut body = res.bytes_stream();
    let mut text = String::new();
    while !text.contains("old ") {
        let next = tokio::time::timeout(SOCKET_TIMEOUT, body.next()).await;
        text.push_str(&String::from_utf8_lossy(&next.unwrap().unwrap().unwrap()));
    }

    // The new file: `a` is gone, `test/model` is on `b` at $20/Mtok, a new model.
    std::fs::write(
        &file,
        config_text(
            &dir,
            &(provider("b", &b.url())
                + &model("test/model", &[("b", 20)])
                + &model("test/new", &[("b", 20)])),
        ),
    )
    .unwrap();
    assert_eq!(reload(&gw, None).await.0, 401, "the admin token is needed");
    let (status, report) = reload(&gw, Some(ADMIN)).await;
    assert_eq!(status, 200, "{report}");
    let d = &report["data"];
    assert_eq!(d["models_added"], json!(["test/new"]));
    assert_eq!(d["models_changed"], json!(["test/model"]));
    assert_eq!(d["providers_added"], json!(["b"]));
    assert_eq!(d["providers_removed"], json!(["a"]));
    assert_eq!(d["restart_needed"], json!([]));

    // The stream still ends on `a`, charged at the old price: 500 × $2/Mtok.
    gate.add_permits(1);
    while let Some(next) = tokio::time::timeout(SOCKET_TIMEOUT, body.next())
        .await
        .unwrap()
    {
        text.push_str(&String::from_utf8_lossy(&next.unwrap()));
    }
    assert!(text.contains("[DONE]"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
    let usage: Value = sse_data(&text)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .map(|v| v["usage"].clone())
        .expect("a usage chunk");
    assert_eq!(usage["cost"].as_f64().unwrap(), 0.001, "{usage}");
    assert_eq!(spent(&gw).await, 0.001);

    // New requests: `b` at the new price; `a` is never called again.
    let res = post_chat(&gw, TEST_KEY, &ask("test/model", false)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "b");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["usage"]["cost"].as_f64().unwrap(), 0.01, "{v}");
    let res = post_chat(&gw, TEST_KEY, &ask("test/new", false)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(spent(&gw).await, 0.021);
    assert_eq!(a.hits(), 1);
    assert_eq!(b.hits(), 2);
    let (_, models) = get_json(&gw, "/v1/models", TEST_KEY).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["test/model", "test/new"]);
}

#[tokio::test]
async fn a_broken_file_is_refused_with_its_problems_and_the_old_config_stays() {
    let a = upstream(|seen, _| async move { answer(seen.body["stream"] == true, None) }).await;
    let dir = fresh_temp_dir();
    let good = provider("a", &a.url()) + &model("test/model", &[("a", 2)]);
    let (gw, file) = start(&dir, &config_text(&dir, &good)).await;
    // An endpoint on a provider that does not exist, and a type error.
    let broken = good.replace("provider = \"a\"", "provider = \"nowhere\"")
        + "[health]\nfailure_threshold = \"three\"\n";
    std::fs::write(&file, config_text(&dir, &broken)).unwrap();
    let (status, v) = reload(&gw, Some(ADMIN)).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_request");
    let paths: Vec<&str> = v["error"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"models[0].endpoints[0].provider"), "{v}");
    assert!(paths.contains(&"health.failure_threshold"), "{v}");
    // The old config serves on.
    let res = post_chat(&gw, TEST_KEY, &ask("test/model", false)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "a");
    assert_eq!(
        gw.gateway.catalog().model("test/model").unwrap().endpoints[0]
            .provider
            .name
            .as_ref(),
        "a"
    );
    let metrics = metrics_text(&gw.url("")).await;
    assert!(
        metric_sum(
            &metrics,
            "switchboard_config_reloads_total{result=\"refused\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn health_of_an_endpoint_that_still_exists_survives_a_reload() {
    let a = upstream(|_, _| async { json(503, json!({"error": {"message": "down"}})) }).await;
    let b = upstream(|seen, _| async move { answer(seen.body["stream"] == true, None) }).await;
    let dir = fresh_temp_dir();
    let health = "[health]\nfailure_threshold = 1\ncooldown_secs = 600\n\n";
    let providers = provider("a", &a.url()) + &provider("b", &b.url());
    let (gw, file) = start(
        &dir,
        &config_text(
            &dir,
            &(health.to_string() + &providers + &model("test/model", &[("a", 2), ("b", 2)])),
        ),
    )
    .await;
    let mut body = ask("test/model", false);
    body["provider"] = json!({"order": ["a", "b"]});
    let res = post_chat(&gw, TEST_KEY, &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "b");
    assert_eq!(a.hits(), 1, "`a` failed once: degraded (threshold 1)");

    // A model first in the file: every endpoint's index moves.
    std::fs::write(
        &file,
        config_text(
            &dir,
            &(health.to_string()
                + &providers
                + &model("test/first", &[("b", 2)])
                + &model("test/model", &[("a", 2), ("b", 2)])),
        ),
    )
    .unwrap();
    let (status, v) = reload(&gw, Some(ADMIN)).await;
    assert_eq!(status, 200, "{v}");
    let res = post_chat(&gw, TEST_KEY, &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "b");
    assert_eq!(a.hits(), 1, "`a` is still degraded: not contacted");
}

#[tokio::test]
async fn a_listen_change_needs_a_restart_and_keeps_the_old_address() {
    let a = upstream(|seen, _| async move { answer(seen.body["stream"] == true, None) }).await;
    let dir = fresh_temp_dir();
    let body = provider("a", &a.url()) + &model("test/model", &[("a", 2)]);
    let (gw, file) = start(&dir, &config_text(&dir, &body)).await;
    let text = config_text(&dir, &body).replace("127.0.0.1:0", "127.0.0.1:1")
        + "[retry]\nmax_attempts = 1\n";
    std::fs::write(&file, text).unwrap();
    let (status, v) = reload(&gw, Some(ADMIN)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["restart_needed"], json!(["server.listen"]));
    assert_eq!(v["data"]["models_changed"], json!([]));
    let config = gw.gateway.config();
    assert_eq!(config.server.listen, "127.0.0.1:0", "the old address stays");
    assert_eq!(config.retry.max_attempts, 1, "the rest is applied");
}

#[tokio::test]
async fn without_a_file_a_reload_says_so() {
    std::env::set_var(ADMIN_ENV, ADMIN);
    let mut config = Config::demo();
    config.admin.token_env = ADMIN_ENV.into();
    config.logging.sink = "none".into();
    let gw = gateway_with(config).await;
    let (status, v) = reload(&gw, Some(ADMIN)).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no config file to reload"),
        "{v}"
    );
}

#[tokio::test]
async fn sighup_reloads_the_binary_s_config() {
    let toml = "[logging]\nsink = \"none\"\n\n[[providers]]\nname = \"mock\"\nkind = \"mock\"\n\n";
    let echo = "[[models]]\nid = \"mock/echo\"\n  [[models.endpoints]]\n  provider = \"mock\"\n  upstream_model = \"echo\"\n  prompt_usd_per_mtok = 1\n  completion_usd_per_mtok = 2\n\n";
    let key = format!("[[keys]]\nsecret = \"{TEST_KEY}\"\ncredits_usd = 1\n");
    let mut gw = ServeProcess::start(&format!("{toml}{echo}{key}")).await;
    let extra = echo.replace("mock/echo", "mock/again");
    std::fs::write(&gw.config, format!("{toml}{echo}{extra}{key}")).unwrap();
    hup(gw.pid());
    let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
    loop {
        let res = client()
            .get(gw.url("/v1/models/mock/again"))
            .send()
            .await
            .unwrap();
        if res.status() == 200 {
            break;
        }
        gw.assert_alive("SIGHUP");
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            tail(&gw.log, 20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.log_text().contains("config reloaded (SIGHUP)"));

    // A broken file: logged, and the old config stays.
    std::fs::write(
        &gw.config,
        format!("{toml}{echo}{extra}{key}[retry]\nmax_attempts = -1\n"),
    )
    .unwrap();
    hup(gw.pid());
    let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
    while !gw.log_text().contains("config reload refused (SIGHUP)") {
        gw.assert_alive("SIGHUP");
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            tail(&gw.log, 20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gw.log_text().contains("retry.max_attempts"),
        "{}",
        tail(&gw.log, 5)
    );
    let res = client()
        .get(gw.url("/v1/models/mock/again"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

fn hup(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test]
async fn unchanged_keys_are_not_written_again_so_admin_changes_stay() {
    let a = upstream(|seen, _| async move { answer(seen.body["stream"] == true, None) }).await;
    let dir = fresh_temp_dir();
    let body = provider("a", &a.url()) + &model("test/model", &[("a", 2)]);
    let (gw, file) = start(&dir, &config_text(&dir, &body)).await;
    // The admin API (here the store it writes to) gives the bootstrap key an rpm.
    let keys = gw.gateway.keys().clone();
    let id = keys.list().unwrap()[0].record.id.clone();
    let patch = switchboard::store::KeyPatch {
        rpm: Some(Some(7)),
        ..Default::default()
    };
    keys.update(&id, &patch).unwrap().unwrap();

    // A price change: [[keys]] untouched, so nothing is written and the rpm stays.
    let priced = provider("a", &a.url()) + &model("test/model", &[("a", 3)]);
    std::fs::write(&file, config_text(&dir, &priced)).unwrap();
    let (status, v) = reload(&gw, Some(ADMIN)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["keys_bootstrapped"], 0);
    assert_eq!(v["data"]["models_changed"], json!(["test/model"]));
    assert_eq!(keys.get(&id).unwrap().unwrap().record.rpm, Some(7));

    // A change to [[keys]] is applied: the file's values again (no rpm).
    let renamed = config_text(&dir, &priced).replace("name = \"t\"", "name = \"t2\"");
    std::fs::write(&file, renamed).unwrap();
    let (status, v) = reload(&gw, Some(ADMIN)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["keys_bootstrapped"], 1);
    let record = keys.get(&id).unwrap().unwrap().record;
    assert_eq!(record.name, "t2");
    assert_eq!(record.rpm, None);
}
