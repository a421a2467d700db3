//! An existing axum app that mounts the gateway under `/llm` and puts the gateway's
//! `AuthLayer` + `RateLimitLayer` in front of its own API, over ONE key store: the
//! key that calls `/llm/v1/chat/completions` also opens `/api/todos`.
//!
//! Run with: cargo run --example wrap_axum_app
//!
//! It serves on 127.0.0.1 (a free port), calls its own route and the mounted gateway
//! with real HTTP requests (the `mock` provider answers: no network), checks the
//! answers, prints them and exits. It leaves no files (in-memory store, no request log).

use std::future::IntoFuture;
use std::sync::Arc;

use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use switchboard::auth::AuthLayer;
use switchboard::chat::ChatCompletion;
use switchboard::config::Config;
use switchboard::keys::KeyRecord;
use switchboard::money::Money;
use switchboard::rate_limit::RateLimitLayer;
use switchboard::store::{hash_secret, NewKey};
use switchboard::Gateway;
use tower::ServiceBuilder;

/// The app's own handler: the key `AuthLayer` let through is in the extensions.
async fn list_todos(Extension(key): Extension<Arc<KeyRecord>>) -> Json<Value> {
    Json(json!({ "owner": key.name, "todos": ["write docs", "ship it"] }))
}

/// The whole integration: this is what the README quotes.
fn app(gateway: &Gateway) -> Router {
    // Our own API, behind the gateway's keys: auth first (401/403, nothing else runs
    // for a bad key), then that key's `rpm` (429 + Retry-After).
    let guard = ServiceBuilder::new()
        .layer(AuthLayer::new(gateway.keys().clone()))
        .layer(RateLimitLayer::new());
    let api = Router::new()
        .route("/api/todos", get(list_todos))
        .layer(guard);
    // The gateway under a path of our choosing: clients use base URL `http://host/llm/v1`.
    Router::new().merge(api).nest("/llm", gateway.router())
}

#[tokio::main]
async fn main() {
    let mut config = Config::demo(); // a `mock` provider and the key `sk-demo` with $1
    config.store.url = "sqlite::memory:".into(); // keep the example free of files
    config.logging.sink = "none".into();
    let gateway = Gateway::builder().config(config).build().expect("gateway");

    // Keys made at run time (admin API, CLI, or here) work at once, for both.
    gateway
        .keys()
        .create(
            hash_secret("sk-team-rpm2"),
            NewKey {
                rpm: Some(2),
                ..NewKey::new("team", "1".parse().unwrap())
            },
        )
        .expect("create a key");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(axum::serve(listener, app(&gateway)).into_future());
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap();

    // 1. Our own route, with the gateway's demo key.
    let res = http
        .get(format!("{base}/api/todos"))
        .bearer_auth("sk-demo")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let todos: Value = res.json().await.unwrap();
    assert_eq!(todos["owner"], "demo");
    println!("GET /api/todos (sk-demo)          -> 200 {todos}");

    // 2. Without a key: the SPEC's 401, in the OpenAI error shape.
    let res = http.get(format!("{base}/api/todos")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_api_key");
    println!(
        "GET /api/todos (no key)           -> 401 {}",
        err["error"]["code"]
    );

    // 3. A key with rpm = 2: the third call within the minute is refused.
    let call = || {
        http.get(format!("{base}/api/todos"))
            .header("x-api-key", "sk-team-rpm2")
            .send()
    };
    assert_eq!(call().await.unwrap().status(), 200);
    assert_eq!(call().await.unwrap().status(), 200);
    let res = call().await.unwrap();
    assert_eq!(res.status(), 429);
    let retry_after = res.headers()["retry-after"].to_str().unwrap().to_string();
    assert!(retry_after.parse::<u64>().unwrap() >= 1);
    println!("GET /api/todos (rpm 2, 3rd call)  -> 429, Retry-After: {retry_after}");

    // 4. The mounted gateway, same key: an OpenAI-compatible chat completion, charged.
    let res = http
        .post(format!("{base}/llm/v1/chat/completions"))
        .bearer_auth("sk-demo")
        .json(&json!({
            "model": "mock/echo",
            "messages": [{"role": "user", "content": "hello from my app"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "mock");
    let reply: ChatCompletion = res.json().await.unwrap(); // `usage.cost` as exact Money
    let answer = reply.choices[0].message.content.clone().unwrap_or_default();
    assert_eq!(answer, "hello from my app");
    let cost = reply.usage.and_then(|u| u.cost).expect("usage.cost");
    assert!(cost > Money::ZERO);
    println!("POST /llm/v1/chat/completions     -> 200 {answer:?}, usage.cost {cost}");

    // 5. The charge is on the key: `/llm/v1/key` shows it, and so does the ledger.
    let key: Value = http
        .get(format!("{base}/llm/v1/key"))
        .bearer_auth("sk-demo")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(key["data"]["name"], "demo");
    assert_eq!(key["data"]["usage"].to_string(), cost.to_string());
    let demo_id = gateway
        .keys()
        .find(&hash_secret("sk-demo"))
        .unwrap()
        .unwrap()
        .id;
    let balance = gateway.ledger().balance(&demo_id).unwrap();
    assert_eq!(balance.spent, cost);
    println!(
        "GET /llm/v1/key                   -> usage {}, ledger spent ${}",
        key["data"]["usage"], balance.spent
    );

    // 6. The gateway's own 404s stay SPEC-shaped under the mount point.
    let res = http
        .get(format!("{base}/llm/v1/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);

    server.abort();
    gateway.ledger().flush().await;
    println!("wrap_axum_app: all checks passed");
}
