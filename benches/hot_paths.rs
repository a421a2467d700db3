//! Micro-benchmarks of the per-request and per-chunk hot paths.
//!
//! Run with: cargo bench --bench hot_paths

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures_util::StreamExt;
use switchboard::catalog::Catalog;
use switchboard::chat::{ChatChunk, ChatRequest, Usage};
use switchboard::config::Config;
use switchboard::context::{CallContext, ChatCall, ChunkStream, ProviderCall};
use switchboard::error::GatewayError;
use switchboard::metering::MeteringLayer;
use switchboard::providers::{
    anthropic::AnthropicAdapter, gemini::GeminiAdapter, openai::OpenAiAdapter, Adapter,
};
use tower::{Layer, ServiceExt};

const BODY: &str = r#"{"model":"bench/model","messages":[{"role":"system","content":"You are a helpful assistant that answers briefly."},{"role":"user","content":"Tell me about the history of the printing press in three sentences, please."}],"max_tokens":256,"temperature":0.7,"stream":true,"stream_options":{"include_usage":true}}"#;

const CHUNK: &str = r#"{"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" printing"},"finish_reason":null}]}"#;

/// One Anthropic `content_block_delta` event's data.
const ANTHROPIC_CHUNK: &str =
    r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" printing"}}"#;

/// One Gemini `streamGenerateContent?alt=sse` event's data.
const GEMINI_CHUNK: &str = r#"{"candidates":[{"content":{"parts":[{"text":" printing"}],"role":"model"},"index":0}],"modelVersion":"gemini-2.0-flash"}"#;

fn catalog() -> Arc<Catalog> {
    let config = Config::from_toml(
        r#"
[[providers]]
name = "a"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key = "sk-a"
[[providers]]
name = "b"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key = "sk-b"
[[providers]]
name = "c"
kind = "anthropic"
base_url = "http://127.0.0.1:9"
api_key = "sk-c"
[[providers]]
name = "d"
kind = "gemini"
base_url = "http://127.0.0.1:9"
api_key = "sk-d"
[[models]]
id = "bench/model"
max_output_tokens = 1024
  [[models.endpoints]]
  provider = "a"
  upstream_model = "m"
  prompt_usd_per_mtok = 0.15
  completion_usd_per_mtok = 0.6
  [[models.endpoints]]
  provider = "b"
  upstream_model = "m"
  prompt_usd_per_mtok = 0.2
  completion_usd_per_mtok = 0.8
  [[models.endpoints]]
  provider = "c"
  upstream_model = "m"
  prompt_usd_per_mtok = 0.25
  completion_usd_per_mtok = 1.0
  [[models.endpoints]]
  provider = "d"
  upstream_model = "m"
  prompt_usd_per_mtok = 0.3
  completion_usd_per_mtok = 1.2
"#,
    )
    .unwrap();
    Arc::new(Catalog::from_config(&config))
}

/// A call to the endpoint of provider `name`.
fn provider_call_to(catalog: &Catalog, name: &str) -> ProviderCall {
    let endpoint = catalog
        .endpoints()
        .iter()
        .find(|e| &*e.provider.name == name)
        .unwrap()
        .clone();
    ProviderCall {
        endpoint,
        ..provider_call(catalog)
    }
}

fn provider_call(catalog: &Catalog) -> ProviderCall {
    ProviderCall {
        endpoint: catalog.endpoints()[0].clone(),
        request: Arc::new(switchboard::normalize::parse_request(BODY.as_bytes()).unwrap()),
        ctx: CallContext::new(),
    }
}

fn request_path(c: &mut Criterion) {
    let catalog = catalog();
    let mut g = c.benchmark_group("request");
    g.bench_function("parse_and_validate", |b| {
        b.iter(|| switchboard::normalize::parse_request(BODY.as_bytes()).unwrap())
    });
    let req: ChatRequest = switchboard::normalize::parse_request(BODY.as_bytes()).unwrap();
    g.bench_function("route_plan", |b| {
        b.iter_batched(
            || ChatCall::new(req.clone(), CallContext::new()),
            |call| switchboard::route::plan(&catalog, &call).unwrap(),
            BatchSize::SmallInput,
        )
    });
    let call = provider_call(&catalog);
    g.bench_function("openai_build_request", |b| {
        b.iter(|| OpenAiAdapter.build_request(&call, true).unwrap())
    });
    let anthropic = provider_call_to(&catalog, "c");
    g.bench_function("anthropic_build_request", |b| {
        b.iter(|| AnthropicAdapter.build_request(&anthropic, true).unwrap())
    });
    let gemini = provider_call_to(&catalog, "d");
    g.bench_function("gemini_build_request", |b| {
        b.iter(|| GeminiAdapter.build_request(&gemini, true).unwrap())
    });
    g.bench_function("call_context_new", |b| b.iter(CallContext::new));
    g.finish();
}

fn chunk_path(c: &mut Criterion) {
    let catalog = catalog();
    let call = provider_call(&catalog);
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Elements(1));
    let mut decoder = OpenAiAdapter.stream_decoder(&call);
    g.bench_function("openai_decode", |b| {
        b.iter(|| decoder.decode("", CHUNK).unwrap())
    });
    let anthropic = provider_call_to(&catalog, "c");
    let mut decoder = AnthropicAdapter.stream_decoder(&anthropic);
    g.bench_function("anthropic_decode", |b| {
        b.iter(|| {
            decoder
                .decode("content_block_delta", ANTHROPIC_CHUNK)
                .unwrap()
        })
    });
    let gemini = provider_call_to(&catalog, "d");
    let mut decoder = GeminiAdapter.stream_decoder(&gemini);
    g.bench_function("gemini_decode", |b| {
        b.iter(|| decoder.decode("", GEMINI_CHUNK).unwrap())
    });
    let chunk: ChatChunk = serde_json::from_str(CHUNK).unwrap();
    // As the gateway encodes: the stream's stamp (id, object, created, model,
    // provider), encoded once per stream, copied; then the chunk's choices.
    let prefix = br#"data: {"id":"gen-0VcYRlFHjnPccekiRvK4TxyzAbCd","object":"chat.completion.chunk","created":1700000000,"model":"bench/model","provider":"up","choices":"#;
    g.bench_function("sse_encode", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(prefix.len() + 160);
            out.extend_from_slice(prefix);
            serde_json::to_writer(&mut out, &chunk.choices).unwrap();
            out.extend_from_slice(b"}\n\n");
            bytes::Bytes::from(out)
        })
    });
    g.finish();

    // SSE parsing of one upstream read holding a whole 22-event stream (how the load
    // bench's upstream, and a fast model, deliver it), per event: the parser this
    // crate uses against `eventsource-stream`, the crate it replaced.
    let read = {
        let mut s = String::new();
        for _ in 0..22 {
            s.push_str("data: ");
            s.push_str(CHUNK);
            s.push_str("\n\n");
        }
        bytes::Bytes::from(s)
    };
    let mut g3 = c.benchmark_group("sse_parse");
    g3.throughput(Throughput::Elements(22));
    g3.bench_function("switchboard", |b| {
        b.iter(|| {
            let mut p = switchboard::providers::sse::SseParser::default();
            p.push(&read);
            let mut n = 0;
            while let Some(e) = p.next_event().unwrap() {
                n += e.data.len();
            }
            n
        })
    });
    g3.bench_function("eventsource_stream", |b| {
        use eventsource_stream::Eventsource;
        use futures_util::FutureExt;
        b.iter(|| {
            futures_util::stream::iter([Ok::<_, std::io::Error>(read.clone())])
                .eventsource()
                .fold(0, |n, e| async move { n + e.unwrap().data.len() })
                .now_or_never()
                .unwrap()
        })
    });
    g3.finish();

    // Metering: 1,000 chunks through a metered stream, reported per chunk.
    const N: u64 = 1000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g2 = c.benchmark_group("metering");
    g2.throughput(Throughput::Elements(N));
    g2.bench_function("per_chunk_x1000", |b| {
        b.iter_batched(
            || {
                let mut chunks: Vec<Result<ChatChunk, GatewayError>> =
                    (0..N).map(|_| Ok(chunk.clone())).collect();
                chunks.push(Ok(ChatChunk::usage(Usage::new(100, N))));
                chunks
            },
            |chunks| {
                rt.block_on(async {
                    let svc =
                        MeteringLayer::new().layer(tower::service_fn(move |_c: ProviderCall| {
                            let chunks = chunks.clone();
                            async move {
                                let s: ChunkStream = Box::pin(futures_util::stream::iter(chunks));
                                Ok::<_, GatewayError>(s)
                            }
                        }));
                    let s = svc.oneshot(call.clone()).await.unwrap();
                    s.fold(0usize, |n, _| async move { n + 1 }).await
                })
            },
            BatchSize::LargeInput,
        )
    });
    g2.finish();
}

fn tokenize(c: &mut Criterion) {
    let text = "The printing press, invented by Johannes Gutenberg around 1440, transformed how knowledge spread across Europe. ".repeat(20);
    let tokens = switchboard::tokenize::count("o200k_base", &text);
    let mut g = c.benchmark_group("tokenize");
    g.throughput(Throughput::Elements(tokens));
    g.bench_function("o200k_count_2kB", |b| {
        b.iter(|| switchboard::tokenize::count("o200k_base", &text))
    });
    g.finish();
}

criterion_group!(benches, request_path, chunk_path, tokenize);
criterion_main!(benches);
