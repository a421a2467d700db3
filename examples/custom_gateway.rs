//! A gateway assembled by hand from a subset of the layers, around a provider of your
//! own (an "in-house model server" answering in-process) and a request log of your own.
//!
//! Run with: cargo run --example custom_gateway
//!
//! The stack: LoggingLayer (custom `LogSink`) → NormalizeLayer → RouteLayer →
//! FallbackLayer → MeteringLayer → your `Service<ProviderCall, Response = ChunkStream>`.
//! No keys, credits or rate limits: leave out the layers you do not need. The model
//! has two endpoints; the first node is draining (503), so fallback moves to the
//! second, metering prices what it streams, and the sink sees one record with both
//! attempts. It checks all of that, prints it, and exits; no network, no files.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream;
use http_body_util::BodyExt;
use serde_json::json;
use switchboard::catalog::Catalog;
use switchboard::chat::{ChatChunk, ChatCompletion, Delta, Role, Usage};
use switchboard::config::{Config, RetryConfig};
use switchboard::context::{ChunkStream, ProviderCall};
use switchboard::error::{GatewayError, ProviderError};
use switchboard::fallback::FallbackLayer;
use switchboard::logging::{LogSink, LogWriter, LoggingLayer, RequestRecord};
use switchboard::metering::MeteringLayer;
use switchboard::normalize::NormalizeLayer;
use switchboard::route::RouteLayer;
use tower::{service_fn, ServiceBuilder, ServiceExt};

/// Two nodes of one in-house model, priced per token like any provider. `kind`,
/// `base_url` and the key are unused here: our own service replaces the HTTP client.
const CONFIG: &str = r#"
[[providers]]
name = "gpu-a"
kind = "openai"
base_url = "http://gpu-a.internal:9000/v1"
api_key_env = "INHOUSE_TOKEN"

[[providers]]
name = "gpu-b"
kind = "openai"
base_url = "http://gpu-b.internal:9000/v1"
api_key_env = "INHOUSE_TOKEN"

[[models]]
id = "inhouse/shouty"
tokenizer = "o200k_base"
  [[models.endpoints]]
  provider = "gpu-a"
  upstream_model = "shouty-7b"
  prompt_usd_per_mtok = 0.5
  completion_usd_per_mtok = 1.5
  [[models.endpoints]]
  provider = "gpu-b"
  upstream_model = "shouty-7b"
  prompt_usd_per_mtok = 0.5
  completion_usd_per_mtok = 1.5
"#;

/// The in-house model server: shouts the last user message back, word by word, and
/// reports its usage (one token per word). Node `gpu-a` is draining.
async fn in_house_model(call: ProviderCall) -> Result<ChunkStream, GatewayError> {
    let node = call.endpoint.provider.name.clone();
    if node.as_ref() == "gpu-a" {
        // A retriable failure: FallbackLayer moves on to the next endpoint.
        return Err(ProviderError::status(node, 503, "node is draining").into());
    }
    let prompt: Vec<String> = call
        .request
        .messages
        .iter()
        .filter_map(|m| m.content.as_ref().map(|c| c.text().into_owned()))
        .collect();
    let last_user = call
        .request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .and_then(|m| m.content.as_ref())
        .map(|c| c.text().to_uppercase())
        .unwrap_or_default();
    let words: Vec<String> = last_user.split_whitespace().map(str::to_string).collect();
    let usage = Usage::new(
        prompt
            .iter()
            .map(|p| p.split_whitespace().count() as u64)
            .sum(),
        words.len() as u64,
    );
    let mut chunks: Vec<Result<ChatChunk, GatewayError>> = words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            Ok(ChatChunk::text(if i == 0 {
                w.clone()
            } else {
                format!(" {w}")
            }))
        })
        .collect();
    let mut finish = ChatChunk::delta(Delta::default());
    finish.choices[0].finish_reason = Some("stop".into());
    chunks.push(Ok(finish));
    chunks.push(Ok(ChatChunk::usage(usage)));
    Ok(Box::pin(stream::iter(chunks)))
}

/// A request log of our own: one line per record on stdout, and a copy in memory.
struct PrintSink(Arc<Mutex<Vec<RequestRecord>>>);

impl LogSink for PrintSink {
    fn write(&mut self, batch: &[RequestRecord]) -> std::io::Result<()> {
        for r in batch {
            let attempts: Vec<String> = r
                .attempts
                .iter()
                .map(|a| format!("{}:{}", a.provider, a.status))
                .collect();
            println!(
                "log: {} {} -> {} via {} [{}] {}+{} tokens ${}",
                r.id,
                r.requested_model,
                r.status,
                r.provider.as_deref().unwrap_or("-"),
                attempts.join(", "),
                r.prompt_tokens,
                r.completion_tokens,
                r.cost
            );
        }
        self.0.lock().unwrap().extend_from_slice(batch);
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let catalog = Arc::new(Catalog::from_config(
        &Config::from_toml(CONFIG).expect("config"),
    ));
    let records = Arc::new(Mutex::new(Vec::new()));
    let logs = LogWriter::spawn(Box::new(PrintSink(records.clone())), 1024);

    // The stack, outermost first (see README "Use as a library" for the ordering rules).
    let gateway = ServiceBuilder::new()
        .layer(LoggingLayer::new(logs.clone())) // one record per request, after the body
        .layer(NormalizeLayer::new().max_body_bytes(64 * 1024)) // HTTP ⇄ typed
        .layer(RouteLayer::new(catalog)) // model → endpoints
        .layer(FallbackLayer::new(RetryConfig::default())) // walk the endpoints
        .layer(MeteringLayer::new()) // count and price each attempt
        .service(service_fn(in_house_model));

    // A non-stream request: fallback skips the draining node, metering prices gpu-b.
    let req = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(
            json!({
                "model": "inhouse/shouty",
                "messages": [{"role": "user", "content": "please answer loudly"}],
            })
            .to_string(),
        )
        .unwrap();
    let res = gateway.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "gpu-b");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    // The typed `ChatCompletion` reads `usage.cost` as exact `Money`, not a float.
    let reply: ChatCompletion = serde_json::from_slice(&body).unwrap();
    let answer = reply.choices[0].message.content.clone().unwrap_or_default();
    assert_eq!(answer, "PLEASE ANSWER LOUDLY");
    let usage = reply.usage.expect("usage");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 3));
    // 3 × $0.5/M + 3 × $1.5/M = $0.000006, exactly (integer pico-dollars inside).
    let cost = usage.cost.expect("usage.cost");
    assert_eq!(cost.to_string(), "0.000006");
    println!("reply: {answer:?} (usage.cost {cost})");

    // A streamed request: the same stack writes SSE.
    let req = http::Request::post("/v1/chat/completions")
        .body(
            json!({
                "model": "inhouse/shouty",
                "stream": true,
                "messages": [{"role": "user", "content": "stream it"}],
            })
            .to_string(),
        )
        .unwrap();
    let res = gateway.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let sse =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(sse.contains(r#""content":"STREAM""#), "{sse}");
    assert!(sse.ends_with("data: [DONE]\n\n"), "{sse}");
    println!("stream: {} SSE events", sse.matches("data: ").count());

    // An unknown model: RouteLayer's 404, SPEC-shaped, and logged too.
    let req = http::Request::post("/v1/chat/completions")
        .body(r#"{"model":"nope/nope","messages":[{"role":"user","content":"hi"}]}"#.to_string())
        .unwrap();
    let res = gateway.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 404);
    drop(res); // the record is emitted when the body is done (here: dropped)

    // Every request reached our sink, with the attempts fallback made.
    assert!(
        logs.flush(Duration::from_secs(10)),
        "the log writer flushes"
    );
    let records = records.lock().unwrap();
    assert_eq!(records.len(), 3);
    let first = &records[0];
    assert_eq!(first.status, 200);
    assert_eq!(first.provider.as_deref(), Some("gpu-b"));
    let statuses: Vec<&str> = first.attempts.iter().map(|a| a.status.as_str()).collect();
    assert_eq!(statuses, ["503", "200"]);
    assert_eq!(first.cost.to_string(), "0.000006");
    assert!(records[1].streamed);
    assert_eq!(records[2].status, 404);
    assert_eq!(records[2].error_code.as_deref(), Some("model_not_found"));
    println!("custom_gateway: all checks passed");
}
