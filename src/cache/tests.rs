//! The cache layer alone, around fake inner services.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{service_fn, ServiceExt};

use super::*;
use crate::keys::KeyRecord;

type Inner = tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// What the fake inner service answers with, given the call's index and its body.
type Answer = Arc<dyn Fn(usize, Bytes) -> BoxFuture<'static, Response<Body>> + Send + Sync>;

/// A fake inner service: counts calls, and answers with `answer`.
fn inner(answer: Answer) -> (Inner, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = service_fn(move |req: Request<Body>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        let answer = answer.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, Infallible>(answer(n, body).await)
        }
    });
    (tower::util::BoxCloneSyncService::new(svc), calls)
}

/// The id the fake gives its `n`th answer.
fn id(n: usize) -> String {
    format!("gen-{n:028}")
}

/// A JSON completion echoing the request body's length, with usage.
fn json_answer(n: usize, body: &Bytes) -> Response<Body> {
    let text = format!(
        r#"{{"id":"{}","object":"chat.completion","choices":[{{"message":{{"content":"echo {}"}}}}],"usage":{{"prompt_tokens":5,"completion_tokens":7,"cost":0.25}}}}"#,
        id(n),
        body.len()
    );
    Response::builder()
        .header("content-type", "application/json")
        .header(X_REQUEST_ID, id(n))
        .header(X_PROVIDER, "fake")
        .header(X_MODEL_USED, "fake/model")
        .body(Body::from(text))
        .unwrap()
}

fn sse_events(n: usize) -> Vec<String> {
    let mut events: Vec<String> = ["Hel", "lo"]
        .iter()
        .map(|t| {
            format!(
                r#"data: {{"id":"{}","choices":[{{"delta":{{"content":"{t}"}}}}]}}"#,
                id(n)
            ) + "\n\n"
        })
        .collect();
    events.push(
        format!(
            r#"data: {{"id":"{}","choices":[],"usage":{{"total_tokens":9}}}}"#,
            id(n)
        ) + "\n\n",
    );
    events.push("data: [DONE]\n\n".into());
    events
}

fn sse_answer(n: usize, events: Vec<String>) -> Response<Body> {
    let frames = futures_util::stream::iter(
        events
            .into_iter()
            .map(|e| Ok::<_, Infallible>(Bytes::from(e))),
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .header(X_REQUEST_ID, id(n))
        .body(Body::from_stream(frames))
        .unwrap()
}

fn answering_json() -> Answer {
    Arc::new(|n, body| Box::pin(async move { json_answer(n, &body) }))
}

fn layer() -> CacheLayer {
    CacheLayer::new(Arc::new(MemoryBackend::new(1 << 20)))
}

fn request(key: &str, body: &str) -> Request<Body> {
    let mut req = Request::post("/v1/chat/completions")
        .header(X_CACHE, "true")
        .body(Body::from(body.to_string()))
        .unwrap();
    req.extensions_mut()
        .insert(Arc::new(KeyRecord::new(key, key)));
    req
}

async fn send(svc: &Cache<Inner>, req: Request<Body>) -> (Response<()>, String) {
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        Response::from_parts(parts, ()),
        String::from_utf8(bytes.to_vec()).unwrap(),
    )
}

fn status(res: &Response<()>) -> &str {
    res.headers()
        .get(X_CACHE_STATUS)
        .map_or("-", |v| v.to_str().unwrap())
}

const BODY: &str = r#"{"model":"fake/model","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn a_miss_then_a_hit_with_its_own_id_zero_usage_and_no_inner_call() {
    let (inner, calls) = inner(answering_json());
    let svc = layer().layer(inner);
    let (first, text) = send(&svc, request("k1", BODY)).await;
    assert_eq!(status(&first), "MISS");
    assert_eq!(first.headers()[X_CACHE_TTL], "300");
    assert!(
        text.contains(r#""prompt_tokens":5"#),
        "the miss is the inner answer: {text}"
    );

    let req = request("k1", BODY);
    let ctx = CallContext::new();
    let mut req = req;
    req.extensions_mut().insert(ctx.clone());
    let (hit, text) = send(&svc, req).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no inner call for a hit");
    assert_eq!(status(&hit), "HIT");
    assert_eq!(hit.headers()[X_REQUEST_ID], ctx.request_id());
    assert_eq!(hit.headers()[X_PROVIDER], "fake");
    assert_eq!(hit.headers()[X_MODEL_USED], "fake/model");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["id"], ctx.request_id());
    assert_eq!(
        v["usage"],
        serde_json::json!({"prompt_tokens":0,"completion_tokens":0,"cost":0})
    );
    assert_eq!(
        v["choices"][0]["message"]["content"],
        format!("echo {}", BODY.len())
    );
    let s = ctx.snapshot();
    assert_eq!(s.status, 200);
    assert_eq!(
        s.cache_hit.as_ref().map(|h| h.provider.as_str()),
        Some("fake")
    );
    assert_eq!(s.requested_model, "fake/model");
}

#[tokio::test]
async fn key_order_and_whitespace_do_not_matter_and_keys_are_isolated() {
    let (inner, calls) = inner(answering_json());
    let svc = layer().layer(inner);
    send(&svc, request("k1", BODY)).await;
    let reordered = "{ \"messages\": [ {\"content\":\"hi\", \"role\":\"user\"} ],\n  \"model\": \"fake/model\" }";
    let (res, _) = send(&svc, request("k1", reordered)).await;
    assert_eq!(status(&res), "HIT");
    // Another key: its own miss, never the first key's answer.
    let (res, _) = send(&svc, request("k2", BODY)).await;
    assert_eq!(status(&res), "MISS");
    // Another body: a miss.
    let (res, _) = send(&svc, request("k1", &BODY.replace("hi", "hi!"))).await;
    assert_eq!(status(&res), "MISS");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn an_answer_is_kept_for_its_ttl_only() {
    let (inner, calls) = inner(answering_json());
    let svc = layer().layer(inner);
    let with_ttl = |ttl: &str| {
        let mut r = request("k1", BODY);
        r.headers_mut().insert(X_CACHE_TTL, ttl.parse().unwrap());
        r
    };
    let (res, _) = send(&svc, with_ttl("10")).await;
    assert_eq!(
        (status(&res), &res.headers()[X_CACHE_TTL]),
        ("MISS", &"10".parse::<HeaderValue>().unwrap())
    );
    tokio::time::advance(Duration::from_secs(9)).await;
    let (res, _) = send(&svc, request("k1", BODY)).await;
    assert_eq!(status(&res), "HIT");
    assert_eq!(
        res.headers()[X_CACHE_TTL],
        "10",
        "a hit says the TTL it was stored with"
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    let (res, _) = send(&svc, request("k1", BODY)).await;
    assert_eq!(status(&res), "MISS", "expired after 10 s");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn errors_and_cut_or_unfinished_streams_are_never_stored() {
    // 0: a 502; 1: a stream cut before [DONE]; 2: a stream whose context recorded an
    // error; 3 on: complete streams.
    let answer: Answer = Arc::new(|n, _body| {
        Box::pin(async move {
            match n {
                0 => Response::builder()
                    .status(502)
                    .header(X_REQUEST_ID, id(n))
                    .body(Body::from("{}"))
                    .unwrap(),
                1 => {
                    let mut ev = sse_events(n);
                    ev.truncate(2);
                    sse_answer(n, ev)
                }
                _ => sse_answer(n, sse_events(n)),
            }
        })
    });
    let (inner, calls) = inner(answer);
    let svc = layer().layer(inner);
    let stream_body = BODY.replace("}]}", "}],\"stream\":true}");
    let (res, _) = send(&svc, request("k1", &stream_body)).await;
    assert_eq!((res.status().as_u16(), status(&res)), (502, "MISS"));
    let (res, text) = send(&svc, request("k1", &stream_body)).await;
    assert_eq!(status(&res), "MISS");
    assert!(!text.contains("[DONE]"));
    // The context says the request failed (as Normalize records an error chunk).
    let mut req = request("k1", &stream_body);
    let ctx = CallContext::new();
    req.extensions_mut().insert(ctx.clone());
    let res = svc.clone().oneshot(req).await.unwrap();
    ctx.update(|s| s.error_code = Some("upstream_error"));
    res.into_body().collect().await.unwrap();
    let (res, _) = send(&svc, request("k1", &stream_body)).await;
    assert_eq!(status(&res), "MISS", "nothing stored so far");
    let (res, _) = send(&svc, request("k1", &stream_body)).await;
    assert_eq!(status(&res), "HIT", "the first complete stream was stored");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_streamed_hit_replays_the_same_events() {
    let answer: Answer = Arc::new(|n, _| Box::pin(async move { sse_answer(n, sse_events(n)) }));
    let (inner, _calls) = inner(answer);
    let svc = layer().layer(inner);
    let body = BODY.replace("}]}", "}],\"stream\":true}");
    let (_, first) = send(&svc, request("k1", &body)).await;
    let mut req = request("k1", &body);
    let ctx = CallContext::new();
    req.extensions_mut().insert(ctx.clone());
    let (res, again) = send(&svc, req).await;
    assert_eq!(status(&res), "HIT");
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert_eq!(
        again,
        first
            .replace(&id(0), ctx.request_id())
            .replace(r#""total_tokens":9"#, r#""total_tokens":0"#)
    );
}

#[tokio::test]
async fn requests_that_do_not_ask_pass_through_untouched() {
    let (inner, calls) = inner(answering_json());
    let svc = layer().layer(inner);
    for _ in 0..2 {
        let mut req = request("k1", BODY);
        req.headers_mut().remove(X_CACHE);
        let (res, _) = send(&svc, req).await;
        assert!(res.headers().get(X_CACHE_STATUS).is_none());
    }
    let mut req = request("k1", BODY);
    req.headers_mut().insert(X_CACHE, "false".parse().unwrap());
    send(&svc, req).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // On by default, off by header.
    let (inner, calls) = super::tests::inner(answering_json());
    let svc = layer().enabled_by_default(true).layer(inner);
    let mut req = request("k1", BODY);
    req.headers_mut().remove(X_CACHE);
    send(&svc, req).await;
    let mut req = request("k1", BODY);
    req.headers_mut().remove(X_CACHE);
    assert_eq!(status(&send(&svc, req).await.0), "HIT");
    let mut req = request("k1", BODY);
    req.headers_mut().insert(X_CACHE, "false".parse().unwrap());
    assert_eq!(status(&send(&svc, req).await.0), "-");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn bad_headers_are_400_and_bodies_that_are_not_json_pass_through() {
    let (inner, calls) = inner(answering_json());
    let svc = layer().layer(inner);
    for (name, value) in [
        (X_CACHE, "yes"),
        (X_CACHE_TTL, "0"),
        (X_CACHE_TTL, "86401"),
        (X_CACHE_TTL, "1.5"),
    ] {
        let mut req = request("k1", BODY);
        req.headers_mut().insert(name, value.parse().unwrap());
        let (res, text) = send(&svc, req).await;
        assert_eq!(res.status(), 400, "{name}: {value}");
        assert!(text.contains("invalid_request"), "{text}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let (res, text) = send(&svc, request("k1", "{not json")).await;
    assert!(res.headers().get(X_CACHE_STATUS).is_none());
    assert!(
        text.contains("echo 9"),
        "the inner service got the body as it was: {text}"
    );
}

/// An inner service that answers only once `gate` opens; call `fail_first` makes the
/// first call a 502.
fn gated(gate: Arc<tokio::sync::Semaphore>, fail_first: bool) -> Answer {
    Arc::new(move |n, body| {
        let gate = gate.clone();
        Box::pin(async move {
            let _permit = gate.acquire().await.unwrap();
            if fail_first && n == 0 {
                return Response::builder()
                    .status(502)
                    .body(Body::from("{}"))
                    .unwrap();
            }
            json_answer(n, &body)
        })
    })
}

/// Waits until a leader is in flight (polls the layer's flight count).
async fn until_in_flight(layer: &CacheLayer) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while layer.flights_in_progress() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a leader");
}

/// Waits until a leader is in flight and `n` other requests follow it, so that none is
/// still before its cache lookup when the leader's gate opens (such a late one could
/// find the answer not yet stored and lead anew: a second inner call).
async fn until_followed(layer: &CacheLayer, n: usize) {
    until_in_flight(layer).await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while layer.flight_followers() < n {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every request following the leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identical_requests_in_flight_make_one_inner_call() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (inner, calls) = inner(gated(gate.clone(), false));
    let layer = layer();
    let svc = layer.layer(inner);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            send(&svc, request("k1", BODY)).await
        }));
    }
    until_followed(&layer, 49).await;
    gate.add_permits(1000);
    let mut statuses = std::collections::BTreeMap::new();
    let mut bodies = std::collections::HashSet::new();
    for t in tasks {
        let (res, text) = t.await.unwrap();
        assert_eq!(res.status(), 200);
        *statuses.entry(status(&res).to_string()).or_insert(0) += 1;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        bodies.insert(v["choices"].to_string());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{statuses:?}");
    assert_eq!(statuses.get("MISS"), Some(&1));
    assert_eq!(statuses.get("HIT"), Some(&49));
    assert_eq!(bodies.len(), 1);
    assert_eq!(layer.flights_in_progress(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_first_fails_one_follower_takes_over_and_the_others_get_its_answer() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (inner, calls) = inner(gated(gate.clone(), true));
    let layer = layer();
    let svc = layer.layer(inner);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            send(&svc, request("k1", BODY)).await
        }));
    }
    until_followed(&layer, 19).await;
    gate.add_permits(1000);
    let mut codes = std::collections::BTreeMap::new();
    for t in tasks {
        let (res, _) = t.await.unwrap();
        *codes
            .entry((res.status().as_u16(), status(&res).to_string()))
            .or_insert(0) += 1;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the failed first and one take-over: {codes:?}"
    );
    assert_eq!(codes.get(&(502, "MISS".into())), Some(&1), "{codes:?}");
    assert_eq!(codes.get(&(200, "MISS".into())), Some(&1), "{codes:?}");
    assert_eq!(codes.get(&(200, "HIT".into())), Some(&18), "{codes:?}");
}

#[tokio::test]
async fn streamed_followers_get_the_events_as_they_arrive() {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let rx = Arc::new(parking_lot::Mutex::new(Some(rx)));
    let answer: Answer = Arc::new(move |n, _| {
        let rx = rx.lock().take().expect("one inner call");
        Box::pin(async move {
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header(X_REQUEST_ID, id(n))
                .body(Body::from_stream(frames))
                .unwrap()
        })
    });
    let (inner, calls) = inner(answer);
    let svc = layer().layer(inner);
    let body = BODY.replace("}]}", "}],\"stream\":true}");
    let leader = svc.clone().oneshot(request("k1", &body)).await.unwrap();
    // The leader's client reads its answer as it comes (followers get what it reads).
    let leader =
        tokio::spawn(async move { leader.into_body().collect().await.unwrap().to_bytes() });
    let events = sse_events(0);
    tx.send(Bytes::from(events[0].clone())).unwrap();
    let mut followers = Vec::new();
    for _ in 0..3 {
        let mut req = request("k1", &body);
        let ctx = CallContext::new();
        req.extensions_mut().insert(ctx.clone());
        let (parts, b) = svc.clone().oneshot(req).await.unwrap().into_parts();
        assert_eq!(status(&Response::from_parts(parts, ())), "HIT");
        followers.push((ctx, b));
    }
    // Each follower has the first event before the leader's answer goes on; the
    // second is split across two frames and arrives whole.
    for (ctx, b) in &mut followers {
        let first = b.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, events[0].replace(&id(0), ctx.request_id()));
    }
    let (a, b) = events[1].split_at(10);
    tx.send(Bytes::from(a.to_string())).unwrap();
    tx.send(Bytes::from(b.to_string())).unwrap();
    for e in &events[2..] {
        tx.send(Bytes::from(e.clone())).unwrap();
    }
    drop(tx);
    let leader_text = leader.await.unwrap();
    for (ctx, b) in followers {
        let rest = b.collect().await.unwrap().to_bytes();
        let expected = String::from_utf8_lossy(&leader_text)
            .replace(&id(0), ctx.request_id())
            .replace(r#""total_tokens":9"#, r#""total_tokens":0"#);
        let first = events[0].replace(&id(0), ctx.request_id());
        assert_eq!(
            format!("{first}{}", String::from_utf8_lossy(&rest)),
            expected
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn answers_past_the_entry_bound_are_not_stored() {
    let (inner, calls) = inner(answering_json());
    let svc = layer().max_entry_bytes(64).layer(inner);
    send(&svc, request("k1", BODY)).await;
    let (res, _) = send(&svc, request("k1", BODY)).await;
    assert_eq!(status(&res), "MISS");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// An answer of `body` bytes with the old id at `id_at`, as the memory backend keeps it.
fn stored(body: usize, id_at: Vec<u32>) -> Arc<CachedAnswer> {
    Arc::new(CachedAnswer {
        meta: AnswerMeta {
            content_type: "application/json".into(),
            provider: None,
            model: None,
            finish_reason: None,
            streamed: false,
            ttl_secs: 60,
            expires_unix_ms: 0,
            id_at,
            id_len: 24,
        },
        body: Bytes::from(vec![b'x'; body]),
    })
}

/// Runs `f` on a runtime of its own (the backend reads tokio's clock).
fn on_runtime(f: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f);
}

#[test]
fn the_memory_backend_is_bounded_by_bytes() {
    let backend = MemoryBackend::new(64 * 1024);
    on_runtime(async {
        for i in 0..100u8 {
            backend.put(&CacheKey([i; 32]), stored(4000, Vec::new()));
        }
        assert!(
            backend.weighted_size() <= 64 * 1024,
            "{}",
            backend.weighted_size()
        );
    });
}

#[test]
fn a_new_answer_is_kept_by_a_memory_backend_full_of_one_off_answers() {
    let backend = MemoryBackend::new(64 * 1024);
    on_runtime(async {
        // Ten times what fits, each asked for once: then each new answer is kept
        // (a frequency-based admission would refuse most of them).
        for i in 0..160u8 {
            backend.put(&CacheKey([i; 32]), stored(4000, Vec::new()));
        }
        for i in 160..200u8 {
            let key = CacheKey([i; 32]);
            backend.put(&key, stored(4000, Vec::new()));
            assert!(backend.get_local(&key).is_some(), "answer {i} was not kept");
        }
    });
}

#[test]
fn the_largest_answer_the_layer_stores_fits_the_memory_backend() {
    let max = 64 * 1024;
    let backend = MemoryBackend::new(max);
    let largest = MemoryBackend::largest_body(max) as usize;
    assert_eq!(largest, 8 * 1024);
    on_runtime(async {
        for i in 0..20u8 {
            // An id in every 40-byte chunk: the most bookkeeping a body has.
            let ids = (0..largest as u32 / 40).map(|n| n * 40).collect();
            let key = CacheKey([i; 32]);
            backend.put(&key, stored(largest, ids));
            assert!(backend.get_local(&key).is_some(), "answer {i} was not kept");
        }
    });
}

#[tokio::test]
async fn a_body_of_known_length_is_stored_without_being_polled_past_its_last_frame() {
    let (inner, calls) = inner(answering_json());
    let svc = layer().layer(inner);
    let res = svc.clone().oneshot(request("k1", BODY)).await.unwrap();
    let mut body = res.into_body();
    // hyper stops here: the body says it has ended.
    body.frame().await.unwrap().unwrap();
    assert!(http_body::Body::is_end_stream(&body));
    drop(body);
    let (res, _) = send(&svc, request("k1", BODY)).await;
    assert_eq!(status(&res), "HIT");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A memory backend whose asynchronous look misses once: what a request sees when the
/// flight before it stores its answer and ends between its look and its lead.
struct StaleOnce {
    memory: MemoryBackend,
    stale: std::sync::atomic::AtomicBool,
}

impl CacheBackend for StaleOnce {
    fn get(&self, key: &CacheKey) -> BoxFuture<'static, Option<Arc<CachedAnswer>>> {
        if self.stale.swap(false, Ordering::SeqCst) {
            return Box::pin(async { None });
        }
        self.memory.get(key)
    }
    fn get_local(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        self.memory.get_local(key)
    }
    fn put(&self, key: &CacheKey, answer: Arc<CachedAnswer>) {
        self.memory.put(key, answer)
    }
}

#[tokio::test]
async fn an_answer_stored_between_the_look_and_the_lead_is_a_hit_not_a_second_call() {
    let backend = Arc::new(StaleOnce {
        memory: MemoryBackend::new(1 << 20),
        stale: std::sync::atomic::AtomicBool::new(false),
    });
    let (inner, calls) = inner(answering_json());
    let svc = CacheLayer::new(backend.clone()).layer(inner);
    let (first, _) = send(&svc, request("k1", BODY)).await;
    assert_eq!(status(&first), "MISS");
    // The answer is stored; the next request's first look misses anyway.
    backend.stale.store(true, Ordering::SeqCst);
    let (second, text) = send(&svc, request("k1", BODY)).await;
    assert_eq!(status(&second), "HIT", "{text}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one upstream call in all");
    assert!(
        !backend.stale.load(Ordering::SeqCst),
        "the stale look happened"
    );
}
