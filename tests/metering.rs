//! Metering against real fake upstreams: counting without usage, client disconnects,
//! mid-stream failures (SPEC §4).

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use switchboard::chat::Usage;
use switchboard::money::Money;
use switchboard::tokenize::count;

const CLIENT_KEY: &str = TEST_KEY;

fn chunk(delta: Value, finish: Option<&str>) -> String {
    json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    .to_string()
}

/// Content events for `words`, a finish, and no usage event at all.
fn events_without_usage(words: &[String]) -> Vec<String> {
    let mut ev = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    ev.extend(words.iter().map(|w| chunk(json!({"content": w}), None)));
    ev.push(chunk(json!({}), Some("stop")));
    ev.push("[DONE]".into());
    ev
}

fn story(n: usize) -> Vec<String> {
    (0..n).map(|i| format!(" word{i} and more")).collect()
}

/// $1 / $2 per Mtok, as in `openai_config`.
fn price(prompt: u64, completion: u64) -> Money {
    Money::from_pico(prompt as i64 * 1_000_000 + completion as i64 * 2_000_000)
}

/// Sets a flag when dropped: the fake upstream's body stream was dropped, i.e. the
/// gateway closed the upstream connection.
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// An SSE response whose body stream raises `dropped` when it is dropped; after the
/// events it fails (`fail_at_end`) or ends.
fn guarded_sse(
    events: Vec<String>,
    gap: Duration,
    dropped: Arc<AtomicBool>,
    fail_at_end: bool,
) -> Response {
    let flag = DropFlag(dropped);
    let body =
        futures_util::stream::iter(events.into_iter().map(Some).chain([None])).then(move |e| {
            let _keep = &flag;
            async move {
                tokio::time::sleep(gap).await;
                match e {
                    Some(data) => Ok(bytes::Bytes::from(format!("data: {data}\n\n"))),
                    None if fail_at_end => Err(std::io::Error::other("upstream broke")),
                    None => Ok(bytes::Bytes::new()),
                }
            }
        });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(body))
        .unwrap()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < SOCKET_TIMEOUT,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits for the log record of request `id` in the JSONL file.
async fn record_of(path: &Path, id: &str) -> Value {
    let mut found = None;
    eventually("the request record", || {
        found = records(path).into_iter().find(|r| r["id"] == id);
        found.is_some()
    })
    .await;
    found.unwrap()
}

fn jsonl_config(url: &str) -> (String, std::path::PathBuf) {
    let path = fresh_temp_dir().join("requests.jsonl");
    let extra = format!("[logging]\nsink = \"jsonl:{}\"\n", path.display());
    (openai_config(&[("alpha", url)], &extra), path)
}

fn ask(stream: bool, text: &str) -> Value {
    json!({"model": "test/model", "stream": stream,
           "stream_options": {"include_usage": true},
           "messages": [{"role": "user", "content": text}]})
}

async fn post(gw: &TestGateway, body: &Value) -> reqwest::Response {
    post_chat(gw, CLIENT_KEY, body).await
}

#[tokio::test]
async fn an_upstream_without_usage_is_counted_with_the_tokenizer() {
    let words = story(20);
    let w2 = words.clone();
    let up = upstream(move |_, _| {
        let events = events_without_usage(&w2);
        async move { sse(events, Duration::ZERO) }
    })
    .await;
    let gw = gateway(&openai_config(&[("alpha", &up.url())], "")).await;
    let res = post(&gw, &ask(true, "Tell me a story")).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    let usage: Usage = serde_json::from_value(last["usage"].clone()).expect("a usage chunk");
    let delivered = sse_text(&text);
    assert_eq!(delivered, words.concat());
    assert!(usage.completion_tokens > 0 && usage.prompt_tokens > 0);
    assert_eq!(usage.completion_tokens, count("o200k_base", &delivered));
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
    assert_eq!(
        usage.cost,
        Some(price(usage.prompt_tokens, usage.completion_tokens))
    );
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        last["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );
}

#[tokio::test]
async fn a_non_stream_answer_without_usage_is_counted_too() {
    let up = upstream(|_, _| async {
        json(
            200,
            json!({"id": "x", "object": "chat.completion", "created": 1, "model": "up-model",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, friend."},
                                "finish_reason": "stop"}]}),
        )
    })
    .await;
    let gw = gateway(&openai_config(&[("alpha", &up.url())], "")).await;
    let body: Value = post(&gw, &ask(false, "hi")).await.json().await.unwrap();
    let usage: Usage = serde_json::from_value(body["usage"].clone()).unwrap();
    assert_eq!(
        usage.completion_tokens,
        count("o200k_base", "Hello there, friend.")
    );
    assert_eq!(
        usage.cost,
        Some(price(usage.prompt_tokens, usage.completion_tokens))
    );
}

#[tokio::test]
async fn a_client_that_goes_away_is_charged_for_what_it_got_and_the_upstream_is_closed() {
    let words = story(400);
    let full_text = words.concat();
    let dropped = Arc::new(AtomicBool::new(false));
    let (w2, d2) = (words.clone(), dropped.clone());
    let up = upstream(move |_, _| {
        let (events, dropped) = (events_without_usage(&w2), d2.clone());
        async move { guarded_sse(events, Duration::from_millis(25), dropped, false) }
    })
    .await;
    let (config, log) = jsonl_config(&up.url());
    let gw = gateway(&config).await;
    let res = post(&gw, &ask(true, "Tell me a long story")).await;
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    // Read until a few content chunks arrived, then go away.
    let mut body = res.bytes_stream();
    let mut seen = String::new();
    while sse_text(&seen).matches("word").count() < 3 {
        let bytes = tokio::time::timeout(SOCKET_TIMEOUT, body.next())
            .await
            .expect("chunks keep coming")
            .expect("the stream is not over")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&bytes));
    }
    drop(body);

    eventually("the upstream body to be dropped", || {
        dropped.load(Ordering::SeqCst)
    })
    .await;
    let rec = record_of(&log, &id).await;
    let cost: Money = serde_json::from_value(rec["cost"].clone()).unwrap();
    let completion = rec["completion_tokens"].as_u64().unwrap();
    let prompt = rec["prompt_tokens"].as_u64().unwrap();
    let full = price(prompt, count("o200k_base", &full_text));
    assert!(cost > Money::ZERO, "{rec}");
    assert!(cost < full, "charged {cost} of a full {full}: {rec}");
    assert!(completion >= count("o200k_base", &sse_text(&seen)), "{rec}");
    assert!(completion < count("o200k_base", &full_text) / 2, "{rec}");
    assert_eq!(cost, price(prompt, completion));
    assert_eq!(rec["complete"], false);
    assert_eq!(rec["status"], 200);
}

#[tokio::test]
async fn a_mid_stream_upstream_failure_ends_with_an_error_event_and_charges_the_delivered_part() {
    let words = story(5);
    let dropped = Arc::new(AtomicBool::new(false));
    let (w2, d2) = (words.clone(), dropped.clone());
    let up = upstream(move |_, _| {
        // Content, then the body breaks off: no finish, no usage, no [DONE].
        let mut events = events_without_usage(&w2);
        events.truncate(events.len() - 2);
        let d = d2.clone();
        async move { guarded_sse(events, Duration::from_millis(5), d, true) }
    })
    .await;
    let (config, log) = jsonl_config(&up.url());
    let gw = gateway(&config).await;
    let res = post(&gw, &ask(true, "Tell me a story")).await;
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = res.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]", "{text}");
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert!(err["error"]["code"].is_string(), "{text}");
    assert_eq!(err["choices"][0]["finish_reason"], "error");
    let delivered = sse_text(&text);
    assert_eq!(delivered, words.concat());

    let rec = record_of(&log, &id).await;
    let completion = rec["completion_tokens"].as_u64().unwrap();
    assert_eq!(completion, count("o200k_base", &delivered), "{rec}");
    let cost: Money = serde_json::from_value(rec["cost"].clone()).unwrap();
    assert_eq!(
        cost,
        price(rec["prompt_tokens"].as_u64().unwrap(), completion)
    );
    assert!(cost > Money::ZERO);
    assert_eq!(rec["error_code"], err["error"]["code"]);
    assert_eq!(rec["finish_reason"], "error");
}
