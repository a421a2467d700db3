//! Many instances, one gateway (SPEC §6, issue 21): two or three real `switchboard
//! serve` processes on one PostgreSQL database and one Redis prefix, against fake
//! upstreams on 127.0.0.1.
//!
//! Every test takes a database of its own (`switchboard::testing::postgres`) and a
//! Redis key prefix of its own (`switchboard::testing::redis`), and returns early,
//! saying so on the terminal, when either server is missing (`.ci/run` sets
//! `SWITCHBOARD_REQUIRE_SHARED=1`, which makes that a failure). The tests run one at a
//! time ([`serial`]): several of them measure SPEC §6's "within 1 s", which is a
//! bound on the gateway, not on a machine running eight gateways at once.
//!
//! - `money`: concurrency spread over instances, SIGKILL mid-load, `/v1/generation`
//!   on any instance;
//! - `keys`: key changes seen everywhere within 1 s, concurrent first start;
//! - `limits`: one `rpm` and one `tokens_per_day` budget, one view of endpoint health;
//! - `failures`: PostgreSQL or Redis unreachable, at start or taken away while serving.

mod common;

#[path = "scale_out/failures.rs"]
mod failures;
#[path = "scale_out/keys.rs"]
mod keys;
#[path = "scale_out/limits.rs"]
mod limits;
#[path = "scale_out/money.rs"]
mod money;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::money::Money;
use switchboard::testing::{TestDb, TestRedis};

/// One test's servers: a private database and a private Redis prefix.
pub struct Shared {
    pub db: TestDb,
    pub redis: TestRedis,
}

/// Both servers for `test`, or `None` (said on the terminal) when one is missing.
pub fn shared(test: &str) -> Option<Shared> {
    let db = switchboard::testing::postgres(test)?;
    let redis = switchboard::testing::redis(test)?;
    Some(Shared { db, redis })
}

/// Holds the scale-out tests to one at a time (see the module doc).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// Pico-USD per USD/Mtok per token: prices are $1 (prompt) and $2 (completion) per
/// Mtok in [`openai_config`], i.e. 1,000,000 and 2,000,000 pico-USD per token.
pub const PICO_PER_PROMPT_TOKEN: i64 = 1_000_000;
/// See [`PICO_PER_PROMPT_TOKEN`].
pub const PICO_PER_COMPLETION_TOKEN: i64 = 2_000_000;
/// `max_output_tokens` of [`openai_config`]'s `test/model`: the completion bound of
/// every request here (none sets `max_tokens`).
pub const COMPLETION_BOUND: i64 = 100;

/// The prompt-token bound of one user message of `content`, as admission computes it
/// (`switchboard::credit::prompt_bound`: the messages' JSON bytes, 3 tokens of framing
/// per message, 3 to prime the reply).
pub fn prompt_bound(content: &str) -> i64 {
    let req: switchboard::chat::ChatRequest =
        serde_json::from_value(ask(content, false)).expect("a chat request");
    switchboard::credit::prompt_bound(&req) as i64
}

/// The reservation of a request with one user message of `content` and `n` choices.
pub fn reserve(content: &str, n: i64) -> Money {
    Money::from_pico(
        prompt_bound(content) * PICO_PER_PROMPT_TOKEN
            + n * COMPLETION_BOUND * PICO_PER_COMPLETION_TOKEN,
    )
}

/// The whole config of one instance: [`openai_config`] (provider per upstream,
/// `test/model`, [`TEST_KEY`] with $1000) plus `[store]` on the test database with
/// `reservation_ttl_secs = ttl`, `[shared]` on the test prefix, the request log in
/// PostgreSQL, and `extra` (more sections, `[[keys]]`).
pub fn config(s: &Shared, upstreams: &[(&str, &str)], ttl: u64, extra: &str) -> String {
    config_on(
        s.db.url(),
        Some((s.redis.url(), s.redis.prefix())),
        upstreams,
        ttl,
        extra,
    )
}

/// [`config`] with the store and Redis URLs given (e.g. through a [`TcpRelay`], or
/// a wrong port); `redis = None` leaves `[shared]` out.
pub fn config_on(
    store_url: &str,
    redis: Option<(&str, &str)>,
    upstreams: &[(&str, &str)],
    ttl: u64,
    extra: &str,
) -> String {
    let shared = redis.map_or(String::new(), |(url, prefix)| {
        format!("[shared]\nredis_url = \"{url}\"\nprefix = \"{prefix}\"\n\n")
    });
    let sections = format!(
        "\n[store]\nurl = \"{store_url}\"\nreservation_ttl_secs = {ttl}\npool_size = 4\n\n\
         {shared}[logging]\nsink = \"postgres\"\n\n{extra}\n"
    );
    openai_config(upstreams, &sections)
}

/// A `[[keys]]` entry.
pub fn key_entry(secret: &str, credits_usd: &str, more: &str) -> String {
    format!("[[keys]]\nsecret = \"{secret}\"\nname = \"{secret}\"\ncredits_usd = \"{credits_usd}\"\n{more}\n")
}

/// Starts `n` instances of `toml` at once (all spawned before any is waited for),
/// each ready (`/readyz` 200).
pub async fn start_all(toml: &str, n: usize) -> Vec<ServeProcess> {
    let mut all = Vec::new();
    for _ in 0..n {
        all.push(ServeProcess::spawn(toml).await);
    }
    for p in &mut all {
        p.wait_ready().await;
    }
    all
}

/// A chat request with one user message of `content`, usage included in streams.
pub fn ask(content: &str, stream: bool) -> Value {
    json!({
        "model": "test/model",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        "stream_options": {"include_usage": true}
    })
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub request_id: Option<String>,
    pub text: String,
}

impl Answer {
    /// The error `code` of an error body.
    pub fn code(&self) -> String {
        serde_json::from_str::<Value>(&self.text)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// `usage.cost` (the last one in the body: a stream's usage chunk), exactly.
    pub fn cost(&self) -> Money {
        money_field(&self.text, "cost").unwrap_or_else(|| panic!("no usage.cost in {}", self.text))
    }
}

/// POSTs `body` to `base`'s chat completions with `key`, reads the whole answer.
pub async fn chat(base: &str, key: &str, body: &Value) -> Answer {
    let res = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST to {base}: {e}"));
    let status = res.status().as_u16();
    let request_id = res
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = res.text().await.unwrap_or_default();
    Answer {
        status,
        request_id,
        text,
    }
}

/// GETs `path` on `base` with `key`: (status, body).
pub async fn get(base: &str, path: &str, key: &str) -> (u16, String) {
    let res = client()
        .get(format!("{base}{path}"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {base}{path}: {e}"));
    (res.status().as_u16(), res.text().await.unwrap_or_default())
}

/// `(total_credits, total_usage)` of `key` from `/v1/credits` on `base`, exactly.
pub async fn credits(base: &str, key: &str) -> (Money, Money) {
    let (status, text) = get(base, "/v1/credits", key).await;
    assert_eq!(status, 200, "/v1/credits: {text}");
    (
        money_field(&text, "total_credits").expect("total_credits"),
        money_field(&text, "total_usage").expect("total_usage"),
    )
}

/// The decimal text of the last `"field":` number in `text`, parsed exactly (a
/// `serde_json::Value` would pass it through f64).
pub fn money_field(text: &str, field: &str) -> Option<Money> {
    let pat = format!("\"{field}\":");
    let at = text.rfind(&pat)? + pat.len();
    let num: String = text[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-' || *c == 'e')
        .collect();
    num.parse().ok()
}

/// An admin API call on `base`: (status, JSON body).
pub async fn admin(base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client()
        .request(method.parse().unwrap(), format!("{base}{path}"))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// An OpenAI-style answer of an honest upstream whose every choice used its whole
/// completion limit: usage = the prompt bound of its one message and `n` × the
/// `max_tokens` it was sent, so the cost is exactly the reservation. JSON, or SSE with
/// `gap` between five content chunks (then the usage chunk and `[DONE]`).
pub fn full_answer(seen: &Seen, gap: Duration) -> axum::response::Response {
    let n = seen.body["n"].as_u64().unwrap_or(1);
    let limit = seen.body["max_tokens"]
        .as_u64()
        .or(seen.body["max_completion_tokens"].as_u64())
        .unwrap_or(COMPLETION_BOUND as u64);
    let content = seen.body["messages"][0]["content"].as_str().unwrap_or("");
    let prompt = prompt_bound(content) as u64;
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": n * limit,
                       "total_tokens": prompt + n * limit});
    if seen.body["stream"] == true {
        let chunk = |delta: Value, finish: Option<&str>| {
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            .to_string()
        };
        let mut events = vec![chunk(json!({"role": "assistant", "content": "w0 "}), None)];
        for i in 1..5 {
            events.push(chunk(json!({"content": format!("w{i} ")}), None));
        }
        events.push(chunk(json!({}), Some("length")));
        events.push(
            json!({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage})
                .to_string(),
        );
        events.push("[DONE]".into());
        sse(events, gap)
    } else {
        let choices: Vec<Value> = (0..n)
            .map(|i| json!({"index": i, "message": {"role": "assistant", "content": "words "}, "finish_reason": "length"}))
            .collect();
        json(
            200,
            json!({"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
                   "choices": choices, "usage": usage}),
        )
    }
}

/// Polls `cond` every 50 ms until it holds or `within` has passed since `since`;
/// returns whether it held (and when, measured from `since`).
pub async fn poll_until<F, Fut>(since: Instant, within: Duration, mut cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        // When the check was made: by then the change had taken effect.
        let at = since.elapsed();
        if cond().await {
            return Some(at);
        }
        if since.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
