//! Per-chunk cost of metering: a 1,000-chunk stream drained bare and through
//! `MeteringLayer` (with a reported usage, and without one so the tokenizer counts).
//!
//! Run with: `cargo bench --bench metering -- --quick`
//! (elements/s are chunks/s; the difference of the per-chunk times is metering's cost).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures_util::StreamExt;
use switchboard::catalog::Catalog;
use switchboard::chat::{ChatChunk, ChatRequest, Message, Role, Usage};
use switchboard::config::Config;
use switchboard::context::{CallContext, ChunkStream, ProviderCall};
use switchboard::error::GatewayError;
use switchboard::metering::MeteringLayer;
use tower::{service_fn, Layer, ServiceExt};

const N: usize = 1_000;

fn chunks(with_usage: bool) -> Vec<Result<ChatChunk, GatewayError>> {
    let mut v: Vec<_> = (0..N)
        .map(|i| Ok(ChatChunk::text(format!(" token{}", i % 50))))
        .collect();
    if with_usage {
        v.push(Ok(ChatChunk::usage(Usage::new(20, N as u64))));
    }
    v
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let catalog = Catalog::from_config(&Config::demo());
    let endpoint = catalog.endpoints()[0].clone();
    let request = Arc::new(ChatRequest {
        model: "mock/echo".into(),
        messages: vec![Message::text(Role::User, "Tell me a story")],
        ..Default::default()
    });
    // Warm the tokenizer once, as a running gateway would have.
    switchboard::tokenize::count("o200k_base", "warm up");

    let mut g = c.benchmark_group("stream_of_1000_chunks");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("bare", |b| {
        b.iter_batched(
            || -> ChunkStream { Box::pin(futures_util::stream::iter(chunks(true))) },
            |s| rt.block_on(s.count()),
            BatchSize::SmallInput,
        )
    });
    for (name, with_usage) in [
        ("metered, usage reported", true),
        ("metered, tokenizer counts", false),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let mut items = Some(chunks(with_usage));
                    let svc = MeteringLayer::new().layer(service_fn(move |_c: ProviderCall| {
                        let items = items.take().unwrap_or_default();
                        let s: ChunkStream = Box::pin(futures_util::stream::iter(items));
                        async move { Ok::<_, GatewayError>(s) }
                    }));
                    let call = ProviderCall {
                        endpoint: endpoint.clone(),
                        request: request.clone(),
                        ctx: CallContext::new(),
                    };
                    (svc, call)
                },
                |(svc, call)| {
                    rt.block_on(async move { svc.oneshot(call).await.unwrap().count().await })
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
