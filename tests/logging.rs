//! Request logs and metrics against the real server: the JSONL and SQLite sinks, one
//! record per request, no content unless asked, `/metrics`, and a sink that blocks.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::config::Config;
use switchboard::logging::{LogSink, LogWriter, RequestRecord};
use switchboard::money::Money;
use switchboard::Gateway;

const CLIENT_KEY: &str = TEST_KEY;

fn completion(text: &str) -> Value {
    json!({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    })
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    .to_string()
}

fn stream_events(words: &[&str]) -> Vec<String> {
    let mut ev: Vec<String> = words
        .iter()
        .map(|w| chunk(json!({"content": w}), None))
        .collect();
    ev.push(chunk(json!({}), Some("stop")));
    ev.push(
        json!({"id": "c", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 5, "completion_tokens": words.len(),
                         "prompt_tokens_details": {"cached_tokens": 2}}})
        .to_string(),
    );
    ev.push("[DONE]".into());
    ev
}

/// An upstream answering JSON or SSE as the request asks.
async fn answering() -> Upstream {
    upstream(|seen, _| async move {
        if seen.body["stream"] == true {
            sse(stream_events(&["The", " answer"]), Duration::ZERO)
        } else {
            json(200, completion("The answer"))
        }
    })
    .await
}

async fn post(gw: &TestGateway, body: &Value) -> reqwest::Response {
    post_chat(gw, CLIENT_KEY, body).await
}

fn ask(model: &str, stream: bool, text: &str) -> Value {
    json!({"model": model, "stream": stream, "stream_options": {"include_usage": true},
           "messages": [{"role": "user", "content": text}]})
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

async fn send_three(gw: &TestGateway, secret: &str) -> (Vec<String>, Vec<Value>) {
    let mut ids = Vec::new();
    let mut bodies = Vec::new();
    let res = post(gw, &ask("test/model", false, secret)).await;
    assert_eq!(res.status(), 200);
    ids.push(res.headers()["x-request-id"].to_str().unwrap().to_string());
    bodies.push(res.json::<Value>().await.unwrap());
    let res = post(gw, &ask("test/model", true, secret)).await;
    assert_eq!(res.status(), 200);
    ids.push(res.headers()["x-request-id"].to_str().unwrap().to_string());
    let text = res.text().await.unwrap();
    let data = sse_data(&text);
    bodies.push(serde_json::from_str(&data[data.len() - 2]).unwrap());
    let res = post(gw, &ask("nope/missing", false, secret)).await;
    assert_eq!(res.status(), 404);
    ids.push(res.headers()["x-request-id"].to_str().unwrap().to_string());
    bodies.push(res.json::<Value>().await.unwrap());
    (ids, bodies)
}

#[tokio::test]
async fn the_jsonl_sink_holds_one_record_per_request_and_no_prompt_text() {
    let up = answering().await;
    let log = fresh_temp_dir().join("requests.jsonl");
    let extra = format!("[logging]\nsink = \"jsonl:{}\"\n", log.display());
    let gw = gateway(&openai_config(&[("alpha", &up.url())], &extra)).await;
    let secret = "PURPLE-ELEPHANT-SECRET-PROMPT";
    let (ids, bodies) = send_three(&gw, secret).await;

    eventually("three records", || records(&log).len() >= 3).await;
    // Give a wrongly doubled record the chance to show up.
    assert!(gw.gateway.logs().flush(SOCKET_TIMEOUT));
    let recs = records(&log);
    assert_eq!(recs.len(), 3, "{recs:?}");
    for id in &ids {
        assert_eq!(recs.iter().filter(|r| &r["id"] == id).count(), 1, "{id}");
    }
    let file = std::fs::read_to_string(&log).unwrap();
    assert!(
        !file.contains("PURPLE-ELEPHANT"),
        "prompt text leaked: {file}"
    );
    assert!(
        !file.contains("The answer"),
        "completion text leaked: {file}"
    );
    assert!(!file.contains("sk-upstream") && !file.contains(CLIENT_KEY));

    let json_rec = recs.iter().find(|r| r["id"] == ids[0]).unwrap();
    assert_eq!(json_rec["status"], 200);
    assert_eq!(json_rec["requested_model"], "test/model");
    assert_eq!(json_rec["model"], "test/model");
    assert_eq!(json_rec["provider"], "alpha");
    assert_eq!(json_rec["streamed"], false);
    assert_eq!(json_rec["complete"], true);
    assert_eq!(json_rec["finish_reason"], "stop");
    assert_eq!(json_rec["prompt_tokens"], 7);
    assert_eq!(json_rec["completion_tokens"], 3);
    assert_eq!(json_rec["cost"], bodies[0]["usage"]["cost"]);
    assert_eq!(json_rec["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(json_rec["attempts"][0]["provider"], "alpha");
    assert_eq!(json_rec["attempts"][0]["status"], "200");
    assert!(json_rec["ttft_ms"].is_u64());
    assert!(json_rec.get("prompt").is_none() && json_rec.get("completion").is_none());

    let stream_rec = recs.iter().find(|r| r["id"] == ids[1]).unwrap();
    assert_eq!(stream_rec["streamed"], true);
    assert_eq!(stream_rec["complete"], true);
    assert_eq!(stream_rec["cached_tokens"], 2);
    assert_eq!(stream_rec["cost"], bodies[1]["usage"]["cost"]);
    let cost: Money = serde_json::from_value(stream_rec["cost"].clone()).unwrap();
    // 3 plain prompt × $1 + 2 cached × $1 (cache price defaults to the prompt's) + 2 × $2, per M.
    assert_eq!(cost, Money::from_pico(5_000_000 + 4_000_000));

    let missing = recs.iter().find(|r| r["id"] == ids[2]).unwrap();
    assert_eq!(missing["status"], 404);
    assert_eq!(missing["error_code"], "model_not_found");
    assert_eq!(missing["requested_model"], "nope/missing");
    assert_eq!(missing["cost"], 0);
    assert!(missing["model"].is_null());
}

#[tokio::test]
async fn log_content_keeps_the_prompt_and_the_completion() {
    let up = answering().await;
    let log = fresh_temp_dir().join("requests.jsonl");
    let extra = format!(
        "[logging]\nsink = \"jsonl:{}\"\nlog_content = true\n",
        log.display()
    );
    let gw = gateway(&openai_config(&[("alpha", &up.url())], &extra)).await;
    let res = post(&gw, &ask("test/model", true, "what is the answer?")).await;
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    res.text().await.unwrap();
    eventually("the record", || records(&log).iter().any(|r| r["id"] == id)).await;
    let rec = records(&log).into_iter().find(|r| r["id"] == id).unwrap();
    assert_eq!(rec["prompt"][0]["content"], "what is the answer?");
    assert_eq!(rec["prompt"][0]["role"], "user");
    assert_eq!(rec["completion"], "The answer");
}

#[tokio::test]
async fn the_sqlite_sink_lives_beside_the_store_and_answers_spend_queries() {
    let up = answering().await;
    let dir = fresh_temp_dir();
    let extra = format!(
        "[store]\nurl = \"sqlite://{}\"\n\n[logging]\nsink = \"sqlite\"\n",
        dir.join("switchboard.db").display()
    );
    let gw = gateway(&openai_config(&[("alpha", &up.url())], &extra)).await;
    let (_ids, bodies) = send_three(&gw, "hello").await;
    assert!(gw.gateway.logs().flush(SOCKET_TIMEOUT));
    let conn = rusqlite::Connection::open(dir.join("switchboard-logs.db")).unwrap();
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 3);
    // The documented spend-per-model query (docs/observability.md).
    let (model, requests, pico): (String, i64, i64) = conn
        .query_row(
            "SELECT model, COUNT(*), SUM(cost_pico) FROM requests
             WHERE model IS NOT NULL GROUP BY model ORDER BY SUM(cost_pico) DESC",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((model.as_str(), requests), ("test/model", 2));
    let c0: Money = serde_json::from_value(bodies[0]["usage"]["cost"].clone()).unwrap();
    let c1: Money = serde_json::from_value(bodies[1]["usage"]["cost"].clone()).unwrap();
    assert_eq!(pico, (c0 + c1).pico());
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

async fn metrics(gw: &TestGateway) -> String {
    let res = client().get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    res.text().await.unwrap()
}

#[tokio::test]
async fn metrics_counters_move() {
    let up = answering().await;
    // A provider name of its own: other tests in this process share the registry.
    let gw = gateway(&openai_config(&[("metricsprov", &up.url())], "")).await;
    let series =
        r#"switchboard_requests_total{model="test/model",provider="metricsprov",status="200"}"#;
    let tokens = r#"switchboard_tokens_total{model="test/model",kind="completion"}"#;
    let before = metrics(&gw).await;
    let res = post(&gw, &ask("test/model", false, "hi")).await;
    assert_eq!(res.status(), 200);
    res.bytes().await.unwrap();
    let res = post(&gw, &ask("test/model", true, "hi")).await;
    res.bytes().await.unwrap();
    let mut after = String::new();
    let start = Instant::now();
    while sample(&after, series) < sample(&before, series) + 2.0 {
        assert!(
            start.elapsed() < SOCKET_TIMEOUT,
            "requests_total did not move: {after}"
        );
        after = metrics(&gw).await;
    }
    assert_eq!(sample(&after, series), sample(&before, series) + 2.0);
    assert!(
        sample(&after, tokens) >= sample(&before, tokens) + 5.0,
        "{after}"
    );
    for name in [
        "switchboard_request_duration_seconds_bucket",
        "switchboard_ttft_seconds_bucket",
        "switchboard_overhead_seconds_bucket",
        "switchboard_streams_in_flight",
        r#"switchboard_cost_usd_total{model="test/model"}"#,
        r#"switchboard_attempts_total{provider="metricsprov",status="200"}"#,
    ] {
        assert!(after.contains(name), "{name} missing from:\n{after}");
    }
}

/// A sink whose writes never return; it says when the writer is stuck in it.
struct Stuck(Arc<std::sync::atomic::AtomicBool>);
impl LogSink for Stuck {
    fn write(&mut self, _batch: &[RequestRecord]) -> std::io::Result<()> {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        loop {
            std::thread::park();
        }
    }
}

#[tokio::test]
async fn a_sink_that_blocks_forever_delays_no_response_and_drops_are_counted() {
    let up = answering().await;
    let mut config = Config::from_toml(&openai_config(
        &[("alpha", &up.url())],
        "[logging]\nsink = \"none\"\n",
    ))
    .unwrap();
    // A store of its own: never the default `./switchboard.db` in the crate root.
    config.store.url = format!(
        "sqlite://{}",
        temp_dir("stuck-log").join("switchboard.db").display()
    );
    let stuck = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gateway = Gateway::builder()
        .config(config)
        .log_writer(LogWriter::spawn(Box::new(Stuck(stuck.clone())), 1))
        .build()
        .unwrap();
    let gw = serve_built(gateway).await;
    let dropped = "switchboard_log_records_dropped_total";
    let before = sample(&metrics(&gw).await, dropped);
    let reqs = Arc::new(ask("test/model", false, "hi"));
    // A first request, whose record the writer takes and gets stuck writing.
    let res = post(&gw, &reqs).await;
    assert_eq!(res.status(), 200);
    res.bytes().await.unwrap();
    let start = Instant::now();
    while !stuck.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            start.elapsed() < SOCKET_TIMEOUT,
            "the writer never reached the sink"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..6 {
        let res = tokio::time::timeout(SOCKET_TIMEOUT, post(&gw, &reqs))
            .await
            .expect("a blocked log delays no response");
        assert_eq!(res.status(), 200);
        res.bytes().await.unwrap();
    }
    // The writer is stuck in the sink; one record waits in the queue: the rest of the
    // six are dropped.
    let start = Instant::now();
    loop {
        let now = sample(&metrics(&gw).await, dropped);
        if now >= before + 4.0 {
            break;
        }
        assert!(
            start.elapsed() < SOCKET_TIMEOUT,
            "drops not counted: {now} vs {before}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
