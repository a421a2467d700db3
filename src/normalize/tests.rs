use super::*;
use crate::catalog::Catalog;
use crate::config::Config;
use tower::service_fn;

fn chat_body(extra: &str) -> String {
    format!(r#"{{"model":"mock/echo","messages":[{{"role":"user","content":"hi there"}}]{extra}}}"#)
}

/// A minimal chat request with `"stream": true`.
fn stream_request() -> Request<String> {
    Request::post("/")
        .body(chat_body(r#","stream":true"#))
        .unwrap()
}

async fn body_text(res: Response<Body>) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// An inner service that answers with the given chunks after `delay`.
fn answering(
    chunks: Vec<Result<ChatChunk, GatewayError>>,
    delay: Duration,
) -> impl Service<
    ChatCall,
    Response = ChatReply,
    Error = GatewayError,
    Future = BoxFuture<'static, Result<ChatReply, GatewayError>>,
> + Clone
       + Send
       + 'static {
    let catalog = Arc::new(Catalog::from_config(&Config::demo()));
    service_fn(move |_call: ChatCall| {
        let chunks = chunks.clone();
        let endpoint = catalog.endpoints()[0].clone();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let s: ChunkStream = Box::pin(futures_util::stream::iter(chunks));
            Ok(ChatReply {
                endpoint,
                chunks: s,
            })
        }) as BoxFuture<'static, _>
    })
}

async fn error_of(body: &str) -> (StatusCode, serde_json::Value) {
    let svc = NormalizeLayer::new()
        .max_body_bytes(64)
        .layer(answering(vec![], Duration::ZERO));
    let res = svc
        .oneshot(Request::post("/").body(body.to_string()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    (status, serde_json::from_str(&body_text(res).await).unwrap())
}

#[tokio::test]
async fn bad_json_missing_messages_bad_role_and_big_bodies_are_refused() {
    let (s, e) = error_of("{not json").await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    assert_eq!(e["error"]["type"], "invalid_request_error");

    let (s, e) = error_of(r#"{"model":"m"}"#).await;
    assert_eq!(s, 400);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("messages"),
        "{e}"
    );

    let (s, e) = error_of(r#"{"model":"m","messages":[]}"#).await;
    assert_eq!(s, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at least one"),
        "{e}"
    );

    let (s, e) = error_of(r#"{"model":"m","messages":[{"role":"bot","content":"x"}]}"#).await;
    assert_eq!(s, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[0].role"),
        "{e}"
    );

    let (s, e) = error_of(&"x".repeat(65)).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
}

/// Every field given a value of the wrong JSON type is a 400 that names it;
/// the valid forms of the same fields still parse.
#[test]
fn wrongly_typed_fields_are_refused_by_name() {
    let bad = [
        ("tool_choice", "1"),
        ("tool_choice", "true"),
        ("tool_choice", "[]"),
        ("tool_choice", r#""sometimes""#),
        ("tool_choice", "{}"),
        ("tool_choice", r#"{"type":7}"#),
        ("tool_choice", r#"{"type":"function"}"#),
        ("response_format", "1"),
        ("response_format", "false"),
        ("response_format", r#""json_object""#),
        ("response_format", "[]"),
        ("response_format", "{}"),
        ("response_format", r#"{"type":["text"]}"#),
        ("response_format", r#"{"type":"json_schema"}"#),
        ("stream_options", "[]"),
        ("stream_options", "[true]"),
        ("stream_options", "1"),
        ("usage", "[]"),
        ("usage", "[true]"),
        ("usage", r#""yes""#),
        ("provider", "[]"),
        ("provider", r#"[["a"]]"#),
        ("provider", "true"),
        ("provider", r#"{"max_price":[]}"#),
    ];
    for (field, value) in bad {
        let body = chat_body(&format!(r#","{field}":{value}"#));
        let err = parse_request(body.as_bytes()).expect_err(&body);
        assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(err.code(), "invalid_request", "{body}");
        assert!(
            err.to_string().contains(&format!("`{field}")),
            "{body}: {err}"
        );
    }
    let good = [
        ("tool_choice", r#""auto""#),
        ("tool_choice", r#""none""#),
        ("tool_choice", r#""required""#),
        (
            "tool_choice",
            r#"{"type":"function","function":{"name":"f"}}"#,
        ),
        (
            "tool_choice",
            r#"{"type":"allowed_tools","allowed_tools":{"mode":"auto","tools":[]}}"#,
        ),
        ("tool_choice", "null"),
        ("response_format", r#"{"type":"text"}"#),
        ("response_format", r#"{"type":"json_object"}"#),
        (
            "response_format",
            r#"{"type":"json_schema","json_schema":{"name":"x","schema":{}}}"#,
        ),
        ("stream_options", r#"{"include_usage":true}"#),
        ("stream_options", "{}"),
        ("usage", r#"{"include":true}"#),
        ("provider", r#"{"order":["a"],"max_price":{"prompt":1}}"#),
        ("provider", "null"),
    ];
    for (field, value) in good {
        let body = chat_body(&format!(r#","{field}":{value}"#));
        if let Err(e) = parse_request(body.as_bytes()) {
            panic!("{body}: {e}");
        }
    }
}

#[tokio::test]
async fn non_stream_reply_is_one_completion_with_served_headers() {
    let mut last = ChatChunk::text(" world");
    last.choices[0].finish_reason = Some("stop".into());
    let svc = NormalizeLayer::new().layer(answering(
        vec![Ok(ChatChunk::text("hello")), Ok(last)],
        Duration::ZERO,
    ));
    let res = svc
        .oneshot(Request::post("/").body(chat_body("")).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()[X_PROVIDER], "mock");
    assert_eq!(res.headers()[X_MODEL_USED], "mock/echo");
    let id = res.headers()[X_REQUEST_ID].to_str().unwrap().to_string();
    let v: serde_json::Value = serde_json::from_str(&body_text(res).await).unwrap();
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "hello world");
    assert_eq!(v["provider"], "mock");
}

#[tokio::test]
async fn sse_framing_ends_with_done_and_hides_usage_unless_asked() {
    let chunks = vec![
        Ok(ChatChunk::text("a")),
        Ok(ChatChunk::usage(crate::chat::Usage::new(1, 1))),
    ];
    let svc = NormalizeLayer::new().layer(answering(chunks.clone(), Duration::ZERO));
    let res = svc.oneshot(stream_request()).await.unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert_eq!(res.headers()["cache-control"], "no-cache");
    assert_eq!(res.headers()["x-accel-buffering"], "no");
    let text = body_text(res).await;
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 2, "{text}");
    assert!(events[0].starts_with("data: {") && events[0].contains(r#""content":"a""#));
    assert_eq!(events[1], "data: [DONE]");

    let svc = NormalizeLayer::new().layer(answering(chunks, Duration::ZERO));
    let body = chat_body(r#","stream":true,"stream_options":{"include_usage":true}"#);
    let text = body_text(
        svc.oneshot(Request::post("/").body(body).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert!(text.contains(r#""usage":{"prompt_tokens":1"#), "{text}");
}

#[tokio::test(start_paused = true)]
async fn slow_first_chunk_commits_early_with_keepalive_comments() {
    let svc = NormalizeLayer::new()
        .keepalive(Duration::from_secs(10))
        .layer(answering(
            vec![Ok(ChatChunk::text("late"))],
            Duration::from_secs(25),
        ));
    let res = svc.oneshot(stream_request()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers().get(X_PROVIDER).is_none(),
        "not known at an early commit"
    );
    let text = body_text(res).await;
    // Committed at 10 s, comments at 10 and 20 s, the reply at 25 s.
    assert_eq!(
        text.matches(": switchboard processing").count(),
        2,
        "{text}"
    );
    assert!(text.contains(r#""provider":"mock""#), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test(start_paused = true)]
async fn a_stream_past_the_request_deadline_ends_with_a_timeout_event() {
    // One chunk at once, then silence: the deadline (30 s) cuts it.
    let catalog = Arc::new(Catalog::from_config(&Config::demo()));
    let inner = service_fn(move |_call: ChatCall| {
        let endpoint = catalog.endpoints()[0].clone();
        async move {
            let chunks = futures_util::stream::iter([Ok(ChatChunk::text("first"))])
                .chain(futures_util::stream::pending());
            Ok::<_, GatewayError>(ChatReply {
                endpoint,
                chunks: Box::pin(chunks),
            })
        }
    });
    let svc = NormalizeLayer::new()
        .request_timeout(Duration::from_secs(30))
        .layer(inner);
    let started = Instant::now();
    let res = svc.oneshot(stream_request()).await.unwrap();
    let text = tokio::time::timeout(Duration::from_secs(60), body_text(res))
        .await
        .expect("the deadline ends the stream");
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{text}");
    assert!(events[0].contains(r#""content":"first""#), "{text}");
    assert!(events[1].contains(r#""code":"upstream_timeout""#), "{text}");
    assert!(events[1].contains(r#""finish_reason":"error""#), "{text}");
    assert_eq!(events[2], "data: [DONE]");
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stalls_halfway_is_cut_at_the_request_deadline() {
    // Half a JSON body, then nothing (a half-sent Content-Length or chunked body).
    let half = futures_util::stream::iter([Ok::<_, Infallible>(http_body::Frame::data(
        Bytes::from_static(br#"{"model":"mock/echo","messa"#),
    ))])
    .chain(futures_util::stream::pending());
    let req = Request::post("/")
        .body(http_body_util::StreamBody::new(half))
        .unwrap();
    let svc = NormalizeLayer::new()
        .request_timeout(Duration::from_secs(30))
        .layer(answering(vec![], Duration::ZERO));
    let started = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(3600), svc.oneshot(req))
        .await
        .expect("the deadline bounds the body read")
        .unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    let v: serde_json::Value = serde_json::from_str(&body_text(res).await).unwrap();
    assert_eq!(v["error"]["code"], "request_timeout", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request_timeout_secs"),
        "{v}"
    );
}

#[test]
fn complete_streams_end_with_their_dialects_last_event() {
    assert!(stream_complete(b"data: {}\n\ndata: [DONE]\n\n"));
    assert!(stream_complete(
        b"event: message_delta\ndata: {}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
    ));
    assert!(stream_complete(b"event: response.completed\ndata: {}\n\n"));
    assert!(!stream_complete(b"event: message_start\ndata: {}\n\n"));
    assert!(!stream_complete(b"event: error\ndata: {}\n\n"));
    assert!(!stream_complete(b"data: {}\n\n"));
    assert!(!stream_complete(b"event: message_stop\ndata: {}"));
}

#[test]
fn an_encoded_chunk_is_the_stamped_chunk_as_json() {
    let catalog = Catalog::from_config(&Config::demo());
    let endpoint = &catalog.endpoints()[0];
    let ctx = CallContext::new();
    let mut chunk = ChatChunk::text("say \"hi\"\n");
    chunk.usage = Some(crate::chat::Usage::new(3, 4));
    chunk.usage.as_mut().unwrap().cost = Some("0.000123".parse().unwrap());
    let expected = |usage: bool| {
        let mut v = serde_json::json!({
            "id": ctx.request_id(), "object": "chat.completion.chunk",
            "created": ctx.created(), "model": &*endpoint.model,
            "provider": &*endpoint.provider.name,
            "choices": serde_json::to_value(&chunk.choices).unwrap(),
        });
        if usage {
            v["usage"] = serde_json::to_value(chunk.usage.as_ref().unwrap()).unwrap();
        }
        v
    };
    for wants_usage in [false, true] {
        let w = openai_chat::SseWriter::new(ctx.clone(), Some(endpoint), wants_usage);
        let bytes = w.encode(&chunk).unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        let json = text
            .strip_prefix("data: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .expect("one SSE event");
        let got: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(got, expected(wants_usage), "{text}");
        assert!(json.starts_with(r#"{"id":"gen-"#), "{text}");
        // Byte for byte what serde_json writes for the stamped chunk.
        let stamped = ChatChunk {
            id: ctx.request_id().to_string(),
            created: ctx.created(),
            model: endpoint.model.to_string(),
            provider: Some(endpoint.provider.name.to_string()),
            usage: chunk.usage.clone().filter(|_| wants_usage),
            ..chunk.clone()
        };
        assert_eq!(json, serde_json::to_string(&stamped).unwrap());
    }
    // Nothing for this client: no choices, and usage not asked for.
    let w = openai_chat::SseWriter::new(ctx.clone(), Some(endpoint), false);
    assert!(w
        .encode(&ChatChunk::usage(crate::chat::Usage::new(1, 1)))
        .is_none());
}

#[tokio::test]
async fn error_after_commit_is_a_final_error_chunk() {
    let err = GatewayError::UpstreamError("provider `x` stream broke off".into());
    let svc = NormalizeLayer::new().layer(answering(
        vec![Ok(ChatChunk::text("partial")), Err(err)],
        Duration::ZERO,
    ));
    let text = body_text(svc.oneshot(stream_request()).await.unwrap()).await;
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    let last: serde_json::Value =
        serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error");
    assert_eq!(last["choices"][0]["finish_reason"], "error");
    assert_eq!(events[2], "data: [DONE]");
}
