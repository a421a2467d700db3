//! The response cache's in-process store under an all-miss workload: each request
//! looks its key up (a miss) and stores its answer, evicting older ones once the
//! store is full; and a hit. `MemoryBackend` (quick_cache) against the moka cache it
//! replaced (same bound by bytes, per-entry expiry, a hasher of the digest's first 8
//! bytes), each filled before it is measured (twice its bound of distinct answers).
//! And a request's key (`cache_key/…`): from the raw body, written canonical as it is
//! parsed (`CacheKey::of_body`, what the layer does), against the body parsed into a
//! `serde_json::Value` first (`CacheKey::new`, what it did), for the load bench's
//! one-message body and a 12-message conversation; and a 49-KB, 40-turn agent
//! conversation (with serde_json's bare parse of it, `IgnoredAny`, for scale).
//!
//! Run with: cargo bench --bench cache_store -- --quick

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};

/// The gateway's allocator (`src/main.rs`): allocation is much of what a key costs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use switchboard::cache::{AnswerMeta, CacheBackend, CacheKey, CachedAnswer, MemoryBackend};

/// 16 MiB, `[cache].max_bytes`'s default.
const MAX_BYTES: u64 = 16 << 20;

/// An answer as a miss stores it: a chat completion's ≈ 1.5 KB and its headers, the
/// id at two places (a new one each time, as each miss makes its own).
fn answer() -> Arc<CachedAnswer> {
    Arc::new(CachedAnswer {
        meta: AnswerMeta {
            content_type: "application/json".into(),
            provider: Some("upstream".into()),
            model: Some("bench/model".into()),
            finish_reason: Some("stop".into()),
            streamed: false,
            ttl_secs: 300,
            expires_unix_ms: 0,
            id_at: vec![7, 900],
            id_len: 24,
        },
        body: Bytes::from(vec![b'x'; 1500]),
    })
}

fn key(n: u64) -> CacheKey {
    let mut k = [0u8; 32];
    // A digest is uniform: spread the counter over the hashed bytes.
    k[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
    k[8..16].copy_from_slice(&n.to_le_bytes());
    CacheKey(k)
}

/// The hasher the crate uses for cache keys: the digest's first 8 bytes.
#[derive(Default)]
struct FirstBytes(u64);

impl Hasher for FirstBytes {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        if bytes.len() >= 8 && self.0 == 0 {
            self.0 = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        }
    }
}

#[derive(Clone)]
struct Stored {
    answer: Arc<CachedAnswer>,
    ttl: Duration,
}

struct ByTtl;

impl moka::Expiry<CacheKey, Stored> for ByTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Stored,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The moka store as `MemoryBackend` had it before.
fn moka_store() -> moka::sync::Cache<CacheKey, Stored, BuildHasherDefault<FirstBytes>> {
    moka::sync::Cache::builder()
        .max_capacity(MAX_BYTES)
        .weigher(|_k, v: &Stored| v.answer.weight().min(u32::MAX as usize) as u32)
        .expire_after(ByTtl)
        .build_with_hasher(BuildHasherDefault::default())
}

fn cache_store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let fill = 2 * MAX_BYTES / answer().weight() as u64;

    let memory = MemoryBackend::new(MAX_BYTES);
    for n in 0..fill {
        memory.put(&key(n), answer());
    }
    let mut n = fill;
    c.bench_function("cache_store/all_miss/quick_cache", |b| {
        b.iter(|| {
            n += 1;
            let k = key(n);
            assert!(memory.get_local(&k).is_none());
            memory.put(&k, answer());
        })
    });
    let hot = key(u64::MAX);
    memory.put(&hot, answer());
    c.bench_function("cache_store/hit/quick_cache", |b| {
        b.iter(|| memory.get_local(&hot).unwrap())
    });

    let moka = moka_store();
    let ttl = Duration::from_secs(300);
    for n in 0..fill {
        moka.insert(
            key(n),
            Stored {
                answer: answer(),
                ttl,
            },
        );
    }
    let mut n = fill;
    c.bench_function("cache_store/all_miss/moka", |b| {
        b.iter(|| {
            n += 1;
            let k = key(n);
            assert!(moka.get(&k).is_none());
            moka.insert(
                k,
                Stored {
                    answer: answer(),
                    ttl,
                },
            );
        })
    });
    // moka admits a new key into a full store only once its frequency beats the
    // victim's: ask for it until it is kept.
    while moka.get(&hot).is_none() {
        moka.insert(
            hot,
            Stored {
                answer: answer(),
                ttl,
            },
        );
        moka.run_pending_tasks();
    }
    c.bench_function("cache_store/hit/moka", |b| {
        b.iter(|| moka.get(&hot).unwrap())
    });
}

/// A chat body of `turns` messages (the load bench's own when 1).
fn chat_body(turns: usize) -> Vec<u8> {
    let messages: Vec<String> = (0..turns)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            format!(
                r#"{{"role":"{role}","content":"Say something short about fox number {i} of 12345678901234567890, in a sentence or two, with \"quotes\"."}}"#
            )
        })
        .collect();
    format!(
        r#"{{"model":"bench/model","messages":[{}],"max_tokens":64,"temperature":0.7}}"#,
        messages.join(",")
    )
    .into_bytes()
}

/// A long agent conversation (≈ 50 KB): 40 turns of ≈ 1,200 characters each, lines
/// separated by `\n` escapes, as real prompts are.
fn long_body() -> Vec<u8> {
    let line = "The quick brown fox jumps over the lazy dog; fn main() { println!(\\\"hi\\\"); }";
    let messages: Vec<String> = (0..40)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            let content = vec![format!("{line} {i}"); 15].join("\\n");
            format!(r#"{{"role":"{role}","content":"{content}"}}"#)
        })
        .collect();
    format!(
        r#"{{"model":"bench/model","messages":[{}],"max_tokens":64}}"#,
        messages.join(",")
    )
    .into_bytes()
}

fn cache_key(c: &mut Criterion) {
    let long = long_body();
    assert!(serde_json::from_slice::<serde_json::Value>(&long).is_ok());
    c.bench_function(
        &format!("cache_key/long_{}KB/of_body", long.len() / 1000),
        |b| b.iter(|| CacheKey::of_body("key_1", "/v1/chat/completions", &long).unwrap()),
    );
    c.bench_function(
        &format!("cache_key/long_{}KB/parse_only", long.len() / 1000),
        |b| b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(&long).unwrap()),
    );
    for turns in [1, 12] {
        let body = chat_body(turns);
        c.bench_function(&format!("cache_key/{turns}_messages/of_body"), |b| {
            b.iter(|| CacheKey::of_body("key_1", "/v1/chat/completions", &body).unwrap())
        });
        c.bench_function(&format!("cache_key/{turns}_messages/through_value"), |b| {
            b.iter(|| {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                CacheKey::new("key_1", "/v1/chat/completions", &v)
            })
        });
    }
}

/// The key's two hashes by input size (`CacheKey` picks one by the canonical text's
/// length: SHA-256 below the crossover, BLAKE3 from it).
fn key_hash(c: &mut Criterion) {
    use sha2::Digest;
    for kb in [1usize, 2, 4, 8, 16] {
        let data = vec![b'x'; kb * 1024];
        c.bench_function(&format!("key_hash/{kb}KB/sha256"), |b| {
            b.iter(|| sha2::Sha256::digest(&data))
        });
        c.bench_function(&format!("key_hash/{kb}KB/blake3"), |b| {
            b.iter(|| blake3::hash(&data))
        });
    }
}

criterion_group!(benches, cache_store, cache_key, key_hash);
criterion_main!(benches);
