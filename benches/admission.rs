//! The hot-path cost of letting a request in: auth (cached record) + credit admission
//! (the reserve's bound over the plan, the reservation, and its release).
//!
//! Run with: cargo bench --bench admission -- --quick

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;
use switchboard::auth::AuthLayer;
use switchboard::catalog::Catalog;
use switchboard::chat::{ChatRequest, Message, Role};
use switchboard::config::{Config, StoreConfig};
use switchboard::credit::reservation_for;
use switchboard::store::{hash_secret, KeyStore, Ledger, NewKey, SqliteStore};

fn admission(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let store = SqliteStore::open(&StoreConfig {
        url: "sqlite::memory:".into(),
        ..Default::default()
    })
    .unwrap();
    store
        .create(
            hash_secret("sk-bench"),
            NewKey::new("bench", "1000".parse().unwrap()),
        )
        .unwrap();
    let auth = AuthLayer::new(store.clone());
    // Warm the record cache (the first lookup reads the store).
    rt.block_on(auth.authenticate(Some("sk-bench"))).unwrap();
    let catalog = Catalog::from_config(&Config::demo());
    let plan: Vec<_> = catalog.endpoints().to_vec();
    let req = ChatRequest {
        model: "mock/echo".into(),
        messages: vec![
            Message::text(Role::System, "You are a helpful assistant."),
            Message::text(Role::User, "Say hello in three languages, briefly please."),
        ],
        max_tokens: Some(256),
        ..Default::default()
    };
    let ledger: Arc<dyn Ledger> = store.clone();
    c.bench_function("auth (cached) + credit admission", |b| {
        b.iter(|| {
            let key = auth
                .authenticate(Some("sk-bench"))
                .now_or_never()
                .expect("a cached record answers without waiting")
                .unwrap();
            let hold = reservation_for(&req, &plan);
            ledger
                .reserve(&key, hold)
                .now_or_never()
                .expect("SQLite admits in memory")
                .unwrap();
            ledger.release(&key.id, hold);
        })
    });
}

criterion_group!(benches, admission);
criterion_main!(benches);
