//! Tokenizer speed: tiktoken-rs vs bpe-openai on ~1 MB of mixed English and code.
//!
//! Run with: `cargo bench --bench tokenize -- --quick`
//! (reports elements/s, where an element is one o200k_base token).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

/// ~1 MB of mixed English prose and Rust code (this crate's own sources, which are
/// about half doc comments), repeated.
fn corpus() -> String {
    let parts = [
        include_str!("../src/chat.rs"),
        include_str!("../src/money.rs"),
        include_str!("../src/normalize/mod.rs"),
    ];
    let mut s = String::with_capacity(1 << 20);
    while s.len() < 1 << 20 {
        for p in parts {
            s.push_str(p);
        }
    }
    s.truncate(s.floor_char_boundary_compat(1 << 20));
    s
}

trait FloorCompat {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}
impl FloorCompat for String {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

fn tokenizers(c: &mut Criterion) {
    let text = corpus();
    let tik = tiktoken_rs::o200k_base().unwrap();
    let bpe = bpe_openai::o200k_base();
    let n_tik = tik.encode_ordinary(&text).len();
    let n_bpe = bpe.count(&text);
    assert_eq!(n_tik, n_bpe, "both libraries must agree");
    let mut g = c.benchmark_group("o200k_base_1MB");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n_tik as u64));
    g.bench_function("tiktoken-rs encode_ordinary", |b| {
        b.iter(|| black_box(tik.encode_ordinary(black_box(&text)).len()))
    });
    g.bench_function("bpe-openai count", |b| {
        b.iter(|| black_box(bpe.count(black_box(&text))))
    });
    g.finish();

    // Short texts, as a typical response is: a few hundred tokens.
    let short = &text[..2000];
    let mut g = c.benchmark_group("o200k_base_2KB");
    g.throughput(Throughput::Elements(bpe.count(short) as u64));
    g.bench_function("tiktoken-rs encode_ordinary", |b| {
        b.iter(|| black_box(tik.encode_ordinary(black_box(short)).len()))
    });
    g.bench_function("bpe-openai count", |b| {
        b.iter(|| black_box(bpe.count(black_box(short))))
    });
    g.finish();
}

criterion_group!(benches, tokenizers);
criterion_main!(benches);
