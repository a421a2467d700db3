//! `Idempotency-Key` (SPEC §8.2) through the whole stack, against fake upstreams
//! that count what they receive: replay, a concurrent repeat, a different body, an
//! error not recorded, a stream replayed byte for byte, the real binary SIGKILLed
//! between the upstream answer and the response, and (with PostgreSQL) two
//! instances on one database.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchboard::money::Money;

/// An OpenAI answer (JSON or SSE, as asked) with 5 prompt and 7 completion tokens:
/// at $1 / $2 per Mtok, $0.000019.
fn answer(seen: &Seen, text: &str) -> axum::response::Response {
    let usage = json!({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12});
    if seen.body["stream"] == true {
        let chunk = |delta: Value, finish: Option<&str>| {
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            .to_string()
        };
        sse(
            vec![
                chunk(json!({"role": "assistant", "content": text}), None),
                chunk(json!({"content": " and more"}), None),
                chunk(json!({}), Some("stop")),
                json!({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage})
                    .to_string(),
                "[DONE]".into(),
            ],
            Duration::ZERO,
        )
    } else {
        json(
            200,
            json!({
                "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage
            }),
        )
    }
}

/// The cost of one [`answer`].
const ONE_CHARGE: &str = "0.000019";

fn body(stream: bool) -> Value {
    json!({"model": "test/model", "stream": stream, "stream_options": {"include_usage": true},
           "messages": [{"role": "user", "content": "charge me once"}]})
}

async fn post_idem(base: &str, key: &str, idem: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .header("idempotency-key", idem)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// What the key has spent, from `/v1/credits`.
async fn spent(base: &str) -> Money {
    let v: Value = client()
        .get(format!("{base}/v1/credits"))
        .bearer_auth(TEST_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"]["total_usage"].to_string().parse().unwrap()
}

fn base(gw: &TestGateway) -> String {
    gw.url("")
}

/// Tests that move `switchboard_idempotency_waiting` (one gauge for the whole
/// process) run one at a time, so that each counts only its own waiting repeats.
static WAITERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAITING: &str = "switchboard_idempotency_waiting";

#[tokio::test]
async fn a_repeat_replays_without_an_upstream_call_or_a_second_charge() {
    let up = upstream(|seen, _| async move { answer(&seen, "first answer") }).await;
    let gw = gateway(&openai_config(&[("up", &up.url())], "")).await;
    let first = post_idem(&base(&gw), TEST_KEY, "order-1", &body(false)).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let id = first.headers()["x-request-id"].clone();
    let bytes = first.bytes().await.unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["id"], id.to_str().unwrap());
    assert_eq!(v["usage"]["cost"], json!(0.000019));
    assert_eq!(spent(&base(&gw)).await, ONE_CHARGE.parse().unwrap());

    // Same JSON value, keys in another order.
    let same: Value = serde_json::from_str(
        r#"{"messages":[{"content":"charge me once","role":"user"}],"stream_options":{"include_usage":true},"stream":false,"model":"test/model"}"#,
    )
    .unwrap();
    let again = post_idem(&base(&gw), TEST_KEY, "order-1", &same).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["x-request-id"], id);
    assert_eq!(again.headers()["x-provider"], "up");
    assert_eq!(again.headers()["x-model-used"], "test/model");
    assert_eq!(again.headers()["content-type"], "application/json");
    assert_eq!(again.bytes().await.unwrap(), bytes);
    assert_eq!(up.hits(), 1, "no upstream call for the repeat");
    assert_eq!(spent(&base(&gw)).await, ONE_CHARGE.parse().unwrap());
    // The generation is the first request's, once.
    let path = format!("/v1/generation?id={}", id.to_str().unwrap());
    let (_, g) = get_json(&gw, &path, TEST_KEY).await;
    assert_eq!(g["data"]["total_cost"], json!(0.000019));
}

#[tokio::test]
async fn a_streamed_answer_is_replayed_byte_for_byte() {
    let up = upstream(|seen, _| async move { answer(&seen, "streamed") }).await;
    let gw = gateway(&openai_config(&[("up", &up.url())], "")).await;
    let first = post_idem(&base(&gw), TEST_KEY, "stream-1", &body(true)).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["content-type"], "text/event-stream");
    let text = first.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(sse_text(&text), "streamed and more");
    let again = post_idem(&base(&gw), TEST_KEY, "stream-1", &body(true)).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["content-type"], "text/event-stream");
    assert_eq!(again.headers()["cache-control"], "no-cache");
    assert_eq!(again.text().await.unwrap(), text);
    assert_eq!(up.hits(), 1);
    assert_eq!(spent(&base(&gw)).await, ONE_CHARGE.parse().unwrap());
    // The stream and the non-stream requests are different requests.
    let other = post_idem(&base(&gw), TEST_KEY, "stream-1", &body(false)).await;
    assert_eq!(other.status(), 422);
}

#[tokio::test]
async fn a_different_body_with_the_same_key_is_422_and_another_client_key_is_apart() {
    let up = upstream(|seen, _| async move { answer(&seen, "x") }).await;
    let extra =
        "[[keys]]\nsecret = \"sk-second-client-0123456789\"\nname = \"second\"\ncredits_usd = 1\n";
    let gw = gateway(&openai_config(&[("up", &up.url())], extra)).await;
    assert_eq!(
        post_idem(&base(&gw), TEST_KEY, "k", &body(false))
            .await
            .status(),
        200
    );
    let mut changed = body(false);
    changed["messages"][0]["content"] = json!("something else");
    let res = post_idem(&base(&gw), TEST_KEY, "k", &changed).await;
    assert_eq!(res.status(), 422);
    let e: Value = res.json().await.unwrap();
    assert_eq!(e["error"]["code"], "idempotency_key_reused");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    // The same idempotency key under another client key is its own.
    let res = post_idem(&base(&gw), "sk-second-client-0123456789", "k", &changed).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_eq!(up.hits(), 2);
    // A malformed key is 400.
    let long = "k".repeat(256);
    let res = post_idem(&base(&gw), TEST_KEY, &long, &body(false)).await;
    assert_eq!(res.status(), 400);
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn an_error_is_not_recorded_so_the_retry_runs() {
    let up = upstream(|seen, n| async move {
        if n == 0 {
            json(500, json!({"error": {"message": "boom"}}))
        } else {
            answer(&seen, "second try")
        }
    })
    .await;
    let gw = gateway(&openai_config(
        &[("up", &up.url())],
        "[retry]\nmax_attempts = 1\n",
    ))
    .await;
    let first = post_idem(&base(&gw), TEST_KEY, "retry-me", &body(false)).await;
    assert_eq!(first.status(), 502);
    let second = post_idem(&base(&gw), TEST_KEY, "retry-me", &body(false)).await;
    assert_eq!(second.status(), 200);
    assert!(second.headers().get("idempotent-replayed").is_none());
    let second_bytes = second.bytes().await.unwrap();
    let third = post_idem(&base(&gw), TEST_KEY, "retry-me", &body(false)).await;
    assert_eq!(third.headers()["idempotent-replayed"], "true");
    assert_eq!(third.bytes().await.unwrap(), second_bytes);
    assert_eq!(up.hits(), 2);
    assert_eq!(spent(&base(&gw)).await, ONE_CHARGE.parse().unwrap());
}

#[tokio::test]
async fn a_concurrent_repeat_waits_for_the_first_and_gets_the_same_answer() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let up = upstream(move |seen, _| {
        let g = g.clone();
        async move {
            let _p = g.acquire().await.unwrap();
            answer(&seen, "slow answer")
        }
    })
    .await;
    let gw = gateway(&openai_config(&[("up", &up.url())], "")).await;
    let _one_at_a_time = WAITERS.lock().await;
    let first = tokio::spawn(post_idem_owned(base(&gw), "slow", body(false)));
    // The first has reached the upstream, which holds it.
    let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
    while up.hits() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let repeats: Vec<_> = (0..3)
        .map(|_| tokio::spawn(post_idem_owned(base(&gw), "slow", body(false))))
        .collect();
    // While the first runs, another body is refused at once.
    let mut changed = body(false);
    changed["max_tokens"] = json!(3);
    assert_eq!(
        post_idem(&base(&gw), TEST_KEY, "slow", &changed)
            .await
            .status(),
        422
    );
    // The upstream holds the first: the three repeats are waiting for it.
    wait_for_metric(&base(&gw), WAITING, 3.0).await;
    assert_eq!(up.hits(), 1);
    gate.add_permits(100);
    let (status, headers, first_bytes) = first.await.unwrap();
    assert_eq!(status, 200);
    assert!(headers.get("idempotent-replayed").is_none());
    for r in repeats {
        let (status, headers, bytes) = r.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(headers["idempotent-replayed"], "true");
        assert_eq!(bytes, first_bytes);
    }
    assert_eq!(up.hits(), 1, "exactly one upstream call");
    assert_eq!(spent(&base(&gw)).await, ONE_CHARGE.parse().unwrap());
    // A repeat stops counting before its answer is sent.
    assert_eq!(metric(&metrics_text(&base(&gw)).await, WAITING), Some(0.0));
}

async fn post_idem_owned(
    base: String,
    idem: &'static str,
    body: Value,
) -> (u16, reqwest::header::HeaderMap, bytes::Bytes) {
    let res = post_idem(&base, TEST_KEY, idem, &body).await;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    (status, headers, res.bytes().await.unwrap())
}

/// A whole config for [`ServeProcess`]: its own SQLite store in `dir`, one OpenAI-kind
/// upstream.
fn process_config(dir: &std::path::Path, upstream: &str) -> String {
    format!(
        "[store]\nurl = \"sqlite://{}\"\n\n[logging]\nsink = \"none\"\n\n{}",
        dir.join("switchboard.db").display(),
        // A held stream is not failed as idle while the test kills the process.
        openai_config(&[("up", upstream)], "[retry]\nmax_attempts = 1\n").replace(
            "stream_idle_timeout_secs = 2",
            "stream_idle_timeout_secs = 600"
        )
    )
}

/// SIGKILL while the upstream's answer is complete but the stream not yet ended
/// (content delivered, the upstream holding its end): nothing was settled, so
/// nothing was recorded; after a restart the repeat runs again and the key is
/// charged exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_before_the_commit_reruns_and_charges_once() {
    let up = upstream(|seen, n| async move {
        if n == 0 {
            // The content, then an upstream that never ends its stream.
            let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
                               "choices": [{"index": 0, "delta": {"role": "assistant", "content": "cut"}, "finish_reason": null}]});
            let head: &'static [u8] =
                Box::leak(format!("data: {chunk}\n\n").into_bytes().into_boxed_slice());
            drip("text/event-stream", head, b": \n\n", Duration::from_secs(3600))
        } else {
            answer(&seen, "after restart")
        }
    })
    .await;
    let dir = temp_dir("idem-kill");
    let mut gw = ServeProcess::start(&process_config(&dir, &up.url())).await;
    let first = post_idem(&gw.base, TEST_KEY, "kill-1", &body(true)).await;
    assert_eq!(first.status(), 200);
    let first_id = first.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let mut stream = first.bytes_stream();
    use futures_util::StreamExt;
    let chunk = tokio::time::timeout(SOCKET_TIMEOUT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&chunk).contains("cut"));
    gw.kill();
    drop(stream);
    gw.restart().await;

    let again = post_idem(&gw.base, TEST_KEY, "kill-1", &body(true)).await;
    assert_eq!(again.status(), 200);
    assert!(
        again.headers().get("idempotent-replayed").is_none(),
        "ran again"
    );
    let text = again.text().await.unwrap();
    assert_eq!(sse_text(&text), "after restart and more");
    assert_eq!(up.hits(), 2);
    assert_eq!(spent(&gw.base).await, ONE_CHARGE.parse().unwrap());
    let g = client()
        .get(gw.url(&format!("/v1/generation?id={first_id}")))
        .bearer_auth(TEST_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(g.status(), 404, "the killed request was never charged");
    // And the answer that ran is the one replayed from now on.
    let third = post_idem(&gw.base, TEST_KEY, "kill-1", &body(true)).await;
    assert_eq!(third.headers()["idempotent-replayed"], "true");
    assert_eq!(third.text().await.unwrap(), text);
    assert_eq!(up.hits(), 2);
}

/// SIGKILL after the charge (and so the record, in the same journal line) is
/// committed, while the client has read nothing of the response: after a restart the
/// repeat replays the answer the client never read, and the key is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_the_commit_replays_and_charges_once() {
    let up = upstream(|seen, _| async move { answer(&seen, "committed") }).await;
    let dir = temp_dir("idem-kill-after");
    let mut gw = ServeProcess::start(&process_config(&dir, &up.url())).await;
    // A client that sends its request and never reads the answer.
    let payload = body(false).to_string();
    let addr = gw.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TEST_KEY}\r\nidempotency-key: kill-2\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}",
        payload.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes())
        .await
        .unwrap();
    // The charge is committed (the ledger answers for it) ...
    let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
    while spent(&gw.base).await == Money::ZERO {
        assert!(std::time::Instant::now() < deadline, "never charged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... and the process dies before the client has read a byte.
    gw.kill();
    drop(tcp);
    gw.restart().await;

    let again = post_idem(&gw.base, TEST_KEY, "kill-2", &body(false)).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let v: Value = again.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "committed");
    assert_eq!(up.hits(), 1, "replayed, not run again");
    assert_eq!(spent(&gw.base).await, ONE_CHARGE.parse().unwrap());
}

/// Two gateways on one PostgreSQL database: a repeat on the second of a request
/// done on the first replays it; a concurrent repeat across them waits for the
/// first and replays it; one charge each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_replay_each_others_answers() {
    let Some(db) = switchboard::testing::postgres("two_instances_on_postgres_replay_idempotent")
    else {
        return;
    };
    let gate = Arc::new(tokio::sync::Semaphore::new(1000));
    let g = gate.clone();
    let up = upstream(move |seen, _| {
        let g = g.clone();
        async move {
            let _p = g.acquire().await.unwrap();
            answer(&seen, "shared")
        }
    })
    .await;
    let toml = format!(
        "[store]\nurl = \"{}\"\n\n[logging]\nsink = \"none\"\n\n{}",
        db.url(),
        openai_config(&[("up", &up.url())], "")
    );
    let a = gateway(&toml).await;
    let b = gateway(&toml).await;
    let _one_at_a_time = WAITERS.lock().await;

    let first = post_idem(&base(&a), TEST_KEY, "pg-1", &body(false)).await;
    assert_eq!(first.status(), 200);
    let first_bytes = first.bytes().await.unwrap();
    let again = post_idem(&base(&b), TEST_KEY, "pg-1", &body(false)).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.bytes().await.unwrap(), first_bytes);
    assert_eq!(up.hits(), 1);
    let mut changed = body(false);
    changed["max_tokens"] = json!(2);
    assert_eq!(
        post_idem(&base(&b), TEST_KEY, "pg-1", &changed)
            .await
            .status(),
        422
    );

    // Concurrent, across instances: the first (on A) is held upstream.
    let held = gate.acquire_many(1000).await.unwrap();
    let first = tokio::spawn(post_idem_owned(base(&a), "pg-2", body(false)));
    let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
    while up.hits() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let repeat = tokio::spawn(post_idem_owned(base(&b), "pg-2", body(false)));
    // The repeat on B finds A's lock and waits (polling for the record).
    wait_for_metric(&base(&b), WAITING, 1.0).await;
    assert!(!repeat.is_finished(), "the repeat did not wait");
    assert_eq!(up.hits(), 2);
    drop(held);
    let (s1, h1, b1) = first.await.unwrap();
    let (s2, h2, b2) = repeat.await.unwrap();
    assert_eq!((s1, s2), (200, 200));
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(b1, b2);
    assert_eq!(up.hits(), 2, "one upstream call per idempotency key");
    let two: Money = "0.000038".parse().unwrap();
    assert_eq!(spent(&base(&a)).await, two);
    assert_eq!(spent(&base(&b)).await, two);
    assert_eq!(metric(&metrics_text(&base(&b)).await, WAITING), Some(0.0));
}
