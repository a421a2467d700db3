//! How to test one switchboard layer on its own: `tower_test::mock` (or a counting
//! `service_fn`) as the inner service, paused tokio time for anything timed, no sockets.
//!
//! Run with: cargo run --example test_a_layer
//!
//! The same code works inside `#[tokio::test(start_paused = true)]`; here it runs as a
//! program so CI shows it working.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use switchboard::catalog::Catalog;
use switchboard::chat::ChatChunk;
use switchboard::config::Config;
use switchboard::context::{ChatCall, ChatReply, ChunkStream};
use switchboard::error::GatewayError;
use switchboard::keys::KeyRecord;
use switchboard::normalize::NormalizeLayer;
use switchboard::rate_limit::RateLimitLayer;
use tower::{service_fn, Layer, ServiceExt};
use tower_test::mock;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true) // timers fire instantly, in order: deterministic tests
        .build()
        .unwrap();
    rt.block_on(async {
        keepalive_comments_while_the_typed_stack_is_slow().await;
        typed_errors_become_spec_responses().await;
        rate_limit_refills_on_the_paused_clock().await;
    });
    println!("test_a_layer: all checks passed");
}

/// NormalizeLayer commits a stream early and sends keep-alive comments when the
/// typed stack takes longer than `keepalive` to produce the first content chunk.
async fn keepalive_comments_while_the_typed_stack_is_slow() {
    // The inner service is a mock: we see each ChatCall and answer when we choose.
    let (inner, mut handle) = mock::pair::<ChatCall, ChatReply>();
    let svc = NormalizeLayer::new()
        .keepalive(Duration::from_secs(10))
        .layer(inner);

    let req = http::Request::post("/v1/chat/completions")
        .body(
            r#"{"model":"mock/echo","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
                .to_string(),
        )
        .unwrap();
    // Read the response as a client would: concurrently, as bytes arrive.
    let client = tokio::spawn(async move {
        let res = svc.oneshot(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    });

    // The layer called the typed stack with the parsed request.
    let (call, send) = handle.next_request().await.expect("a typed call");
    assert_eq!(call.request.model, "mock/echo");
    assert!(call.request.stream);

    // 25 virtual seconds pass before the first chunk is ready: that is two comments
    // (at 10 s and 20 s), then the chunk.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let catalog = Catalog::from_config(&Config::demo());
    let chunks: ChunkStream = Box::pin(futures_util::stream::iter([Ok(ChatChunk::text("hello"))]));
    send.send_response(ChatReply {
        endpoint: catalog.endpoints()[0].clone(),
        chunks,
    });

    let (status, text) = client.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        text.matches(": switchboard processing").count(),
        2,
        "{text}"
    );
    assert!(text.contains(r#""content":"hello""#));
    assert!(text.ends_with("data: [DONE]\n\n"));
}

/// An error from the typed tier becomes the SPEC §3.2 JSON response.
async fn typed_errors_become_spec_responses() {
    let (inner, mut handle) = mock::pair::<ChatCall, ChatReply>();
    let svc = NormalizeLayer::new().layer(inner);
    let req = http::Request::post("/v1/chat/completions")
        .body(r#"{"model":"nope/nope","messages":[{"role":"user","content":"hi"}]}"#.to_string())
        .unwrap();
    let response = tokio::spawn(svc.oneshot(req));
    let (_call, send) = handle.next_request().await.unwrap();
    send.send_error(GatewayError::ModelNotFound("no model `nope/nope`".into()));
    let res = response.await.unwrap().unwrap();
    assert_eq!(res.status(), 404);
    let body: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
}

/// RateLimitLayer reads tokio's clock, so a paused runtime tests a per-minute limit
/// in no time at all. A `service_fn` that counts its calls stands in for the rest of
/// the stack (the HTTP-tier layers want an `Infallible` inner service, which
/// `tower_test::mock` is not): refused requests must never reach it.
async fn rate_limit_refills_on_the_paused_clock() {
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = reached.clone();
    let svc = RateLimitLayer::new().layer(service_fn(move |_req: http::Request<()>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty())) }
    }));
    // AuthLayer puts the key record in the extensions; here we put it there ourselves.
    let key = Arc::new(KeyRecord {
        rpm: Some(6), // one request back every 10 s
        ..KeyRecord::new("key_test", "tester")
    });
    let req = || {
        let mut r = http::Request::new(());
        r.extensions_mut().insert(key.clone());
        r
    };

    for _ in 0..6 {
        assert_eq!(svc.clone().oneshot(req()).await.unwrap().status(), 200);
    }
    let refused = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "10");
    assert_eq!(
        reached.load(Ordering::SeqCst),
        6,
        "a refused request reached the inner service"
    );

    // 10 virtual seconds later exactly one request is back.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(svc.clone().oneshot(req()).await.unwrap().status(), 200);
    assert_eq!(svc.clone().oneshot(req()).await.unwrap().status(), 429);
    assert_eq!(reached.load(Ordering::SeqCst), 7);
}
