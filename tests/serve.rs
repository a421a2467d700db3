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
