//! OpenTelemetry export (SPEC §9, issue 24) against a fake OTLP/HTTP collector: a real
//! server on 127.0.0.1:0 that decodes the protobuf it is posted.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{json, Value};
use switchboard::config::Config;
use switchboard::logging::{LogSink, RequestRecord};
use switchboard::otel::Telemetry;

/// A fake collector: every span posted to `/v1/traces`, and each post's resource
/// attributes, scope name and headers.
#[derive(Clone)]
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    posts: Arc<Mutex<Vec<Post>>>,
}

/// What one post said besides its spans.
#[derive(Debug, Clone)]
struct Post {
    resource: Vec<(String, String)>,
    scopes: Vec<String>,
    headers: http::HeaderMap,
}

async fn collector() -> Collector {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let posts = Arc::new(Mutex::new(Vec::new()));
    let (s2, p2) = (spans.clone(), posts.clone());
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: http::HeaderMap, body: bytes::Bytes| {
            let (spans, posts) = (s2.clone(), p2.clone());
            async move {
                let body = if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
                    let mut out = Vec::new();
                    std::io::Read::read_to_end(
                        &mut flate2::read::GzDecoder::new(&body[..]),
                        &mut out,
                    )
                    .expect("gzip");
                    bytes::Bytes::from(out)
                } else {
                    body
                };
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut spans = spans.lock().unwrap();
                for rs in req.resource_spans {
                    let resource = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .map(
                            |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(Any::StringValue(v)) => (kv.key.clone(), v.clone()),
                                other => (kv.key.clone(), format!("{other:?}")),
                            },
                        )
                        .collect();
                    let scopes = rs
                        .scope_spans
                        .iter()
                        .map(|ss| {
                            ss.scope
                                .as_ref()
                                .map(|s| s.name.clone())
                                .unwrap_or_default()
                        })
                        .collect();
                    posts.lock().unwrap().push(Post {
                        resource,
                        scopes,
                        headers: headers.clone(),
                    });
                    for ss in rs.scope_spans {
                        spans.extend(ss.spans);
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Collector { url, spans, posts }
}

impl Collector {
    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
    fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }
}

/// The exporter the gateway made from its `[telemetry]`.
fn exporter(gw: &TestGateway) -> Telemetry {
    gw.gateway.telemetry().expect("the config has [telemetry]")
}

/// Flushes (off this thread: the collector answers on it) until `done` holds of
/// what the collector has, or fails after [`SOCKET_TIMEOUT`].
async fn flush_until(t: &Telemetry, c: &Collector, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    let start = Instant::now();
    loop {
        let t2 = t.clone();
        tokio::task::spawn_blocking(move || t2.flush())
            .await
            .unwrap();
        let spans = c.spans();
        if done(&spans) {
            return spans;
        }
        assert!(
            start.elapsed() < SOCKET_TIMEOUT,
            "the collector never got the spans; it has {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Any> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn s_attr(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(Any::StringValue(s)) => s.clone(),
        other => panic!("{key}: not a string: {other:?} in {span:#?}"),
    }
}

fn i_attr(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Any::IntValue(i)) => *i,
        other => panic!("{key}: not an int: {other:?}"),
    }
}

fn f_attr(span: &Span, key: &str) -> f64 {
    match attr(span, key) {
        Some(Any::DoubleValue(f)) => *f,
        other => panic!("{key}: not a double: {other:?}"),
    }
}

fn completion() -> Value {
    json!({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    })
}

async fn ok_upstream() -> Upstream {
    upstream(|_, _| async { json(200, completion()) }).await
}

/// Request records kept in memory (the key id and the cost to compare).
#[derive(Clone, Default)]
struct Memory(Arc<Mutex<Vec<RequestRecord>>>);
impl LogSink for Memory {
    fn write(&mut self, batch: &[RequestRecord]) -> std::io::Result<()> {
        self.0.lock().unwrap().extend_from_slice(batch);
        Ok(())
    }
}

async fn gateway_logged(toml: &str) -> (TestGateway, Memory) {
    let mem = Memory::default();
    let mut config = Config::from_toml(toml).unwrap();
    config.store.url = format!(
        "sqlite://{}",
        temp_dir("otlp").join("switchboard.db").display()
    );
    let gw = switchboard::Gateway::builder()
        .config(config)
        .log_sink(Box::new(mem.clone()))
        .build()
        .unwrap();
    (serve_built(gw).await, mem)
}

fn telemetry_toml(endpoint: &str) -> String {
    format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\nexport_timeout_secs = 2\n")
}

fn body() -> Value {
    json!({"model": "test/model", "messages": [{"role": "user", "content": "hello"}]})
}

/// A chat request carrying a client's `traceparent` with these trace flags.
async fn post_traced(gw: &TestGateway, flags: &str) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(TEST_KEY)
        .header(
            "traceparent",
            format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-{flags}"),
        )
        .header("tracestate", "vendor=a1")
        .json(&body())
        .send()
        .await
        .unwrap()
}

/// The one span of `kind` among `spans`.
fn span_of(spans: &[Span], kind: SpanKind) -> &Span {
    let mut of = spans.iter().filter(|s| s.kind == kind as i32);
    let span = of.next().expect("a span of that kind");
    assert!(of.next().is_none(), "one span of kind {kind:?}: {spans:#?}");
    span
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn request_and_attempt_spans_carry_the_genai_attributes_and_the_client_trace() {
    let c = collector().await;
    let up = ok_upstream().await;
    let (gw, logs) = gateway_logged(&openai_config(
        &[("p1", &up.url())],
        &telemetry_toml(&c.url),
    ))
    .await;
    let res = post_traced(&gw, "01").await;
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer["usage"]["prompt_tokens"], 7);

    let spans = flush_until(&exporter(&gw), &c, |s| s.len() >= 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let request = span_of(&spans, SpanKind::Server);
    let attempt = span_of(&spans, SpanKind::Client);

    // The client's trace continues: same trace id, its span the parent.
    assert_eq!(hex::encode(&request.trace_id), CLIENT_TRACE);
    assert_eq!(hex::encode(&request.parent_span_id), CLIENT_SPAN);
    assert_eq!(attempt.trace_id, request.trace_id);
    assert_eq!(attempt.parent_span_id, request.span_id);

    assert_eq!(request.name, "chat test/model");
    assert_eq!(attempt.name, "chat up-model");
    let records = {
        assert!(gw.gateway.logs().flush(SOCKET_TIMEOUT));
        logs.0.lock().unwrap().clone()
    };
    assert_eq!(records.len(), 1);
    let record = &records[0];
    for span in [request, attempt] {
        assert_eq!(s_attr(span, "gen_ai.operation.name"), "chat");
        assert_eq!(s_attr(span, "gen_ai.provider.name"), "openai");
        assert_eq!(s_attr(span, "switchboard.provider"), "p1");
        assert_eq!(s_attr(span, "gen_ai.response.model"), "test/model");
        assert_eq!(i_attr(span, "gen_ai.usage.input_tokens"), 7);
        assert_eq!(i_attr(span, "gen_ai.usage.output_tokens"), 5);
        match attr(span, "gen_ai.response.finish_reasons") {
            Some(Any::ArrayValue(a)) => {
                assert_eq!(a.values.len(), 1);
                assert_eq!(a.values[0].value, Some(Any::StringValue("stop".into())));
            }
            other => panic!("finish_reasons: {other:?}"),
        }
        // 7 × $1/Mtok + 5 × $2/Mtok = $0.000017, as charged.
        assert_eq!(f_attr(span, "switchboard.cost_usd"), 0.000017);
        assert_eq!(
            f_attr(span, "switchboard.cost_usd"),
            record.cost.as_usd_f64()
        );
    }
    assert_eq!(s_attr(request, "gen_ai.request.model"), "test/model");
    assert_eq!(s_attr(attempt, "gen_ai.request.model"), "up-model");
    assert_eq!(
        s_attr(request, "switchboard.key_id"),
        record.key_id.clone().unwrap()
    );
    assert_eq!(i_attr(request, "http.response.status_code"), 200);
    assert_eq!(s_attr(request, "gen_ai.response.id"), record.id);
    assert_eq!(s_attr(request, "gen_ai.response.id"), answer["id"]);
    assert!(attr(request, "error.type").is_none());
    // The client's tracestate on both; the W3C flags, and whether the parent is
    // remote (bit 9, known: bit 8): the client's span is, the request's is not.
    for span in [request, attempt] {
        assert_eq!(span.trace_state, "vendor=a1");
        assert!(span.start_time_unix_nano > 0);
        assert!(span.start_time_unix_nano <= span.end_time_unix_nano);
        assert_eq!(span.status.as_ref().map(|s| s.code), Some(0));
    }
    assert_eq!(request.flags, 0x301);
    assert_eq!(attempt.flags, 0x101);
    assert!(request.start_time_unix_nano <= attempt.start_time_unix_nano);
    assert!(attempt.end_time_unix_nano <= request.end_time_unix_nano);
    // The resource and the scope.
    let posts = c.posts();
    assert!(!posts.is_empty());
    for p in &posts {
        assert!(p
            .resource
            .contains(&("service.name".into(), "switchboard".into())));
        assert_eq!(p.scopes, vec!["switchboard".to_string()]);
        assert_eq!(p.headers["content-type"], "application/x-protobuf");
        assert!(
            p.headers.get("content-encoding").is_none(),
            "plain by default"
        );
    }

    // The upstream request named the attempt's span.
    let seen = up.requests();
    assert_eq!(
        seen[0].header("traceparent").unwrap(),
        format!("00-{CLIENT_TRACE}-{}-01", hex::encode(&attempt.span_id))
    );
}

#[tokio::test]
async fn a_fallback_request_has_two_attempt_spans() {
    let c = collector().await;
    let bad =
        upstream(|_, _| async { json(503, json!({"error": {"message": "busy", "type": "x"}})) })
            .await;
    let good = ok_upstream().await;
    let gw = gateway(&openai_config(
        &[("a", &bad.url()), ("b", &good.url())],
        &telemetry_toml(&c.url),
    ))
    .await;
    // `a` first (endpoints of one price are otherwise in a weighted random order).
    let mut request = body();
    request["provider"] = json!({"order": ["a", "b"]});
    let res = post_chat(&gw, TEST_KEY, &request).await;
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await.unwrap();

    let spans = flush_until(&exporter(&gw), &c, |s| s.len() >= 3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let request = span_of(&spans, SpanKind::Server);
    // Without a client traceparent: a root span.
    assert!(request.parent_span_id.is_empty());
    let attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    assert_eq!(attempts.len(), 2);
    for a in &attempts {
        assert_eq!(a.parent_span_id, request.span_id);
        assert_eq!(a.trace_id, request.trace_id);
    }
    let failed = attempts
        .iter()
        .find(|a| s_attr(a, "switchboard.provider") == "a")
        .unwrap();
    assert_eq!(s_attr(failed, "error.type"), "503");
    let status = failed.status.clone().unwrap();
    assert_eq!((status.code, status.message.as_str()), (2, "503"));
    // The failed attempt has no outcome; it ended before the one that served began.
    assert!(attr(failed, "gen_ai.usage.output_tokens").is_none());
    let served = attempts
        .iter()
        .find(|a| s_attr(a, "switchboard.provider") == "b")
        .unwrap();
    assert!(attr(served, "error.type").is_none());
    assert_eq!(i_attr(served, "gen_ai.usage.output_tokens"), 5);
    assert!(failed.end_time_unix_nano <= served.start_time_unix_nano);
    assert_eq!(s_attr(request, "switchboard.provider"), "b");
    // Each upstream saw its own attempt's span.
    for (up, span) in [(&bad, failed), (&good, served)] {
        let tp = up.requests()[0].header("traceparent").unwrap().to_string();
        assert_eq!(
            tp,
            format!(
                "00-{}-{}-01",
                hex::encode(&request.trace_id),
                hex::encode(&span.span_id)
            )
        );
    }
}

#[tokio::test]
async fn with_export_off_no_span_is_made_and_upstreams_get_no_traceparent() {
    let c = collector().await;
    let up = ok_upstream().await;
    // A collector is listening, but the gateway's config has no [telemetry].
    let gw = gateway(&openai_config(&[("p1", &up.url())], "")).await;
    assert!(gw.gateway.telemetry().is_none());
    let res = post_traced(&gw, "01").await;
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await.unwrap();
    assert!(gw.gateway.logs().flush(SOCKET_TIMEOUT));
    assert!(c.spans().is_empty(), "{:#?}", c.spans());
    assert!(up.requests()[0].header("traceparent").is_none());
}

/// A client's `traceparent` that says "not sampled": nothing is exported, and the
/// upstream still gets the trace, unsampled, so that it does not record either.
#[tokio::test]
async fn an_unsampled_client_trace_is_followed_and_not_exported() {
    let c = collector().await;
    let up = ok_upstream().await;
    let gw = gateway(&openai_config(
        &[("p1", &up.url())],
        &telemetry_toml(&c.url),
    ))
    .await;
    let res = post_traced(&gw, "00").await;
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await.unwrap();
    // A sampled request after it, so that a flush has something to deliver.
    let res = post_chat(&gw, TEST_KEY, &body()).await;
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await.unwrap();
    let spans = flush_until(&exporter(&gw), &c, |s| s.len() >= 2).await;
    assert_eq!(spans.len(), 2, "only the sampled request's: {spans:#?}");
    assert!(spans
        .iter()
        .all(|s| hex::encode(&s.trace_id) != CLIENT_TRACE));
    let tp = up.requests()[0].header("traceparent").unwrap().to_string();
    assert!(tp.starts_with(&format!("00-{CLIENT_TRACE}-")), "{tp}");
    assert!(tp.ends_with("-00"), "{tp}");
    assert!(!tp.contains(CLIENT_SPAN), "the attempt's own span id: {tp}");
}

/// A client that goes away while the upstream is still working: the request span
/// (499) and the attempt cut short are both exported, when the request ends.
#[tokio::test]
async fn a_client_gone_mid_attempt_still_leaves_both_spans() {
    let c = collector().await;
    let slow = upstream(|_, _| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        json(200, completion())
    })
    .await;
    let gw = gateway(&openai_config(
        &[("p1", &slow.url())],
        &telemetry_toml(&c.url),
    ))
    .await;
    let sent = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(TEST_KEY)
        .timeout(Duration::from_millis(300))
        .json(&body())
        .send()
        .await;
    assert!(sent.is_err(), "the client gave up: {sent:?}");
    let spans = flush_until(&exporter(&gw), &c, |s| s.len() >= 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let request = span_of(&spans, SpanKind::Server);
    let attempt = span_of(&spans, SpanKind::Client);
    assert_eq!(i_attr(request, "http.response.status_code"), 499);
    assert_eq!(attempt.parent_span_id, request.span_id);
    assert_eq!(s_attr(attempt, "switchboard.provider"), "p1");
    assert!(attr(attempt, "gen_ai.usage.output_tokens").is_none());
}

/// A collector that accepts connections and never answers.
async fn silent_collector() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    url
}

#[tokio::test]
async fn a_dead_collector_never_holds_up_a_request() {
    // A closed port, and a collector that never answers.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let silent = silent_collector().await;
    for endpoint in [closed, silent] {
        let up = ok_upstream().await;
        let gw = gateway(&openai_config(
            &[("p1", &up.url())],
            &telemetry_toml(&endpoint),
        ))
        .await;
        // Far more requests than one batch, each answered well within a bound that a
        // request waiting on an export (2 s timeout) would blow many times over.
        let started = Instant::now();
        for _ in 0..100 {
            let res = tokio::time::timeout(SOCKET_TIMEOUT, post_chat(&gw, TEST_KEY, &body()))
                .await
                .expect("a request waited on the collector");
            assert_eq!(res.status(), 200);
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["choices"][0]["message"]["content"], "hi");
        }
        assert!(
            started.elapsed() < SOCKET_TIMEOUT,
            "100 requests took {:?} with the collector at {endpoint} down",
            started.elapsed()
        );
        assert_eq!(up.hits(), 100);
        // The upstream requests still carry the trace.
        assert!(up.requests()[99].header("traceparent").is_some());
        let t = exporter(&gw);
        // Shutting the exporter down gives up after its timeout; off this thread.
        tokio::task::spawn_blocking(move || t.shutdown())
            .await
            .unwrap();
    }
}

#[test]
fn check_names_a_bad_endpoint() {
    let err = Config::from_toml("[telemetry]\notlp_endpoint = \"127.0.0.1:4318\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
    let err = Config::from_toml(
        "[telemetry]\notlp_endpoint = \"http://c:4318\"\nexport_timeout_secs = 0\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("telemetry.export_timeout_secs"), "{err}");
    let ok = Config::from_toml(&openai_config(
        &[("p1", "http://127.0.0.1:9")],
        &telemetry_toml("http://127.0.0.1:4318"),
    ))
    .unwrap();
    assert!(ok.telemetry.enabled());
}

/// `switchboard serve` flushes the spans it holds when SIGTERM stops it: with the
/// exporter's timer set far off (`OTEL_BSP_SCHEDULE_DELAY`), only that flush can
/// deliver them.
#[tokio::test]
async fn the_binary_exports_what_it_holds_when_sigterm_stops_it() {
    let c = collector().await;
    let up = ok_upstream().await;
    let dir = fresh_temp_dir();
    let path = dir.join("switchboard.toml");
    std::fs::write(
        &path,
        openai_config(&[("p1", &up.url())], &telemetry_toml(&c.url)),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .current_dir(&dir)
        .env("RUST_LOG", "info")
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .env(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-api-key=s3cr%3Dt%2C1, x-team = blue",
        )
        .env("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, _, _rx) = until_listening(&mut child);
    let res = client()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(TEST_KEY)
        .json(&body())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await.unwrap();
    assert!(c.spans().is_empty(), "nothing exported before the stop");
    sigterm(&child);
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
    assert_eq!(code, 0);
    let spans = c.spans();
    assert_eq!(spans.len(), 2, "the request and its attempt: {spans:#?}");
    assert!(spans.iter().any(|s| s.kind == SpanKind::Server as i32));
    assert!(spans.iter().any(|s| s.kind == SpanKind::Client as i32));
    // OTEL_EXPORTER_OTLP_HEADERS, percent-decoded, on every post; gzip asked for.
    for p in c.posts() {
        assert_eq!(p.headers["x-api-key"], "s3cr=t,1");
        assert_eq!(p.headers["x-team"], "blue");
        assert_eq!(p.headers["content-encoding"], "gzip");
    }
}
