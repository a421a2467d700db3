//! `Gateway::serve`'s own accept loop: HTTP/1.1 and HTTP/2 with prior knowledge (h2c)
//! on one port, the version chosen by peeking at the first bytes.

mod common;

use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[tokio::test]
async fn http2_with_prior_knowledge_is_served_on_the_same_port_as_http1() {
    let up = upstream(|_, _| async { json(200, serde_json::json!({})) }).await;
    let gw = gateway(&openai_config(&[("a", &up.url())], "")).await;

    // HTTP/2: the client sends the connection preface first.
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("an HTTP/2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/v1/models", gw.addr))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = h2.send_request(req).await.expect("an HTTP/2 response");
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(list["data"][0]["id"], "test/model");

    // HTTP/1.1 on the same listener.
    let res = client().get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(res.version(), http::Version::HTTP_11);
    assert_eq!(res.status(), 200);
}

/// The accept loop hands `POST /v1/chat/completions` (and `/api/v1/…`) to the chat
/// service without the router; everything near it must still get the router's answer.
#[tokio::test]
async fn chat_completions_skip_the_router_and_near_misses_still_reach_it() {
    let up = upstream(|_, _| async {
        json(
            200,
            serde_json::json!({
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            }),
        )
    })
    .await;
    let gw = gateway(&openai_config(&[("a", &up.url())], "")).await;
    let c = client();
    let body =
        serde_json::json!({"model": "test/model", "messages": [{"role": "user", "content": "x"}]});
    for path in [
        "/v1/chat/completions",
        "/api/v1/chat/completions",
        "/v1/chat/completions?trace=1",
    ] {
        let res = c
            .post(gw.url(path))
            .bearer_auth(TEST_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        assert_eq!(res.headers()["x-provider"], "a", "{path}");
        assert!(res.headers().contains_key("x-request-id"), "{path}");
        let v: serde_json::Value = res.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "hi", "{path}");
    }
    assert_eq!(up.hits(), 3);
    // Not the chat route: the router's SPEC-shaped 404 / 405, the upstream untouched.
    for (method, path, status, code) in [
        ("POST", "/v1/chat/completions/", 404, "not_found"),
        ("POST", "/v2/chat/completions", 404, "not_found"),
        ("POST", "/V1/chat/completions", 404, "not_found"),
        ("PUT", "/v1/chat/completions", 405, "method_not_allowed"),
        ("GET", "/api/v1/chat/completions", 405, "method_not_allowed"),
    ] {
        let res = c
            .request(method.parse().unwrap(), gw.url(path))
            .bearer_auth(TEST_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "{method} {path}");
        let v: serde_json::Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{method} {path}");
    }
    assert_eq!(up.hits(), 3);
}
