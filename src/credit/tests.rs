//! CreditLayer alone: a store on a temporary file, a `service_fn` for the rest of the
//! stack that fills the call context the way fallback and metering do.

use super::*;
use crate::catalog::Catalog;
use crate::chat::{Message, Role, Usage};
use crate::config::{Config, StoreConfig};
use crate::keys::KeyRecord;
use crate::route::RouteLayer;
use crate::store::{hash_secret, KeyStore, NewKey, SqliteStore};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::{service_fn, ServiceBuilder, ServiceExt};

fn store() -> Arc<SqliteStore> {
    SqliteStore::open(&StoreConfig {
        url: "sqlite::memory:".into(),
        ..Default::default()
    })
    .unwrap()
}

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn key(store: &SqliteStore, credits: &str, f: impl FnOnce(&mut NewKey)) -> Arc<KeyRecord> {
    let mut new = NewKey::new("k", usd(credits));
    f(&mut new);
    let secret = crate::store::new_secret();
    Arc::new(store.create(hash_secret(&secret), new).unwrap().record)
}

/// Demo catalog: mock/echo at $1 / $2 per Mtok, max_output_tokens 1024.
fn catalog() -> Arc<Catalog> {
    Arc::new(Catalog::from_config(&Config::demo()))
}

fn call(key: &Arc<KeyRecord>, max_tokens: Option<u32>) -> ChatCall {
    let ctx = CallContext::new();
    ctx.set_key(key.clone());
    let mut call = ChatCall::new(
        ChatRequest {
            model: "mock/echo".into(),
            messages: vec![Message::text(Role::User, "hi")],
            max_tokens,
            ..Default::default()
        },
        ctx,
    );
    call.plan = vec![catalog().endpoints()[0].clone()];
    call
}

type Inner = tower::util::BoxCloneService<ChatCall, ChatReply, GatewayError>;

/// The rest of the stack: serves `words` chunks, and records usage of
/// (5 prompt, `words` completion) tokens priced at the endpoint, like metering.
fn serving(words: u64, hits: Arc<AtomicUsize>) -> Inner {
    tower::util::BoxCloneService::new(service_fn(move |call: ChatCall| {
        let hits = hits.clone();
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            let endpoint = call.plan[0].clone();
            let mut usage = Usage::new(5, words);
            usage.cost = Some(endpoint.pricing.cost(&usage));
            let ctx = call.ctx.clone();
            ctx.update(|s| {
                s.served = Some(endpoint.clone());
                s.cost = usage.cost.unwrap();
                s.usage = Some(usage);
            });
            let chunks: ChunkStream = Box::pin(futures_util::stream::iter(
                (0..words).map(|_| Ok(ChatChunk::text("w "))),
            ));
            Ok(ChatReply { endpoint, chunks })
        }
    }))
}

#[tokio::test]
async fn reservation_over_the_balance_is_refused_before_the_inner_service() {
    let store = store();
    // 1024 completion tokens × $2/M = $0.002048 (+ prompt) > $0.002.
    let k = key(&store, "0.002", |_| {});
    let hits = Arc::new(AtomicUsize::new(0));
    let svc = CreditLayer::new(store.clone()).layer(serving(3, hits.clone()));
    let err = svc.clone().oneshot(call(&k, None)).await.unwrap_err();
    assert_eq!(err.code(), "insufficient_credits");
    assert_eq!(err.status(), 402);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_eq!(store.balance(&k.id).unwrap().reserved, Money::ZERO);
    // A smaller max_tokens fits.
    let reply = svc.oneshot(call(&k, Some(100))).await.unwrap();
    drop(reply.chunks.collect::<Vec<_>>().await);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn limit_usd_caps_like_credits() {
    let store = store();
    let k = key(&store, "10", |n| n.limit = Some(usd("0.0001")));
    let svc = CreditLayer::new(store.clone()).layer(serving(3, Arc::default()));
    let err = svc.oneshot(call(&k, Some(100))).await.unwrap_err();
    assert_eq!(err.code(), "insufficient_credits");
    assert!(err.to_string().contains("limit"), "{err}");
}

#[tokio::test]
async fn settling_below_the_reserve_releases_the_rest_and_commits_before_the_end() {
    let store = store();
    let k = key(&store, "1", |_| {});
    let svc = CreditLayer::new(store.clone()).layer(serving(3, Arc::default()));
    let c = call(&k, Some(100));
    let id = c.ctx.request_id().to_string();
    let reserve = reserve_for(&c.request, &c.plan);
    let mut reply = svc.oneshot(c).await.unwrap();
    // In flight: the reserve is held.
    assert_eq!(store.balance(&k.id).unwrap().reserved, reserve);
    while let Some(chunk) = reply.chunks.next().await {
        chunk.unwrap();
    }
    // The end of the stream came after the commit: the row is there, nothing held.
    let g = store
        .generation(&id)
        .unwrap()
        .expect("committed before the end");
    // 5 × $1/M + 3 × $2/M = $0.000011.
    assert_eq!(g.total_cost, usd("0.000011"));
    assert_eq!(g.completion_tokens, 3);
    let b = store.balance(&k.id).unwrap();
    assert_eq!((b.spent, b.reserved), (usd("0.000011"), Money::ZERO));
    assert!(reserve > b.spent);
}

#[tokio::test]
async fn a_dropped_stream_settles_without_waiting_and_a_failed_call_charges_nothing() {
    let store = store();
    let k = key(&store, "1", |_| {});
    let svc = CreditLayer::new(store.clone()).layer(serving(10, Arc::default()));
    let mut reply = svc.oneshot(call(&k, Some(100))).await.unwrap();
    reply.chunks.next().await.unwrap().unwrap();
    drop(reply); // client gone
    store.flush().await;
    let b = store.balance(&k.id).unwrap();
    assert_eq!((b.spent, b.reserved), (usd("0.000025"), Money::ZERO));

    let failing = CreditLayer::new(store.clone()).layer(service_fn(|_c: ChatCall| async {
        Err::<ChatReply, _>(GatewayError::UpstreamError("all attempts failed".into()))
    }));
    let err = failing.oneshot(call(&k, Some(100))).await.unwrap_err();
    assert_eq!(err.code(), "upstream_error");
    let b2 = store.balance(&k.id).unwrap();
    assert_eq!((b2.spent, b2.reserved), (b.spent, Money::ZERO));
}

#[tokio::test]
async fn an_error_mid_stream_settles_what_was_delivered_then_passes_the_error() {
    let store = store();
    let k = key(&store, "1", |_| {});
    let svc = CreditLayer::new(store.clone()).layer(service_fn(|call: ChatCall| async move {
        let endpoint = call.plan[0].clone();
        let mut usage = Usage::new(5, 1);
        usage.cost = Some(endpoint.pricing.cost(&usage));
        call.ctx.update(|s| {
            s.served = Some(endpoint.clone());
            s.cost = usage.cost.unwrap();
            s.usage = Some(usage);
        });
        let chunks: ChunkStream = Box::pin(futures_util::stream::iter([
            Ok(ChatChunk::text("partial")),
            Err(GatewayError::UpstreamError("stream broke off".into())),
        ]));
        Ok::<_, GatewayError>(ChatReply { endpoint, chunks })
    }));
    let c = call(&k, Some(100));
    let id = c.ctx.request_id().to_string();
    let mut chunks = svc.oneshot(c).await.unwrap().chunks;
    assert!(chunks.next().await.unwrap().is_ok());
    let e = chunks.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), "upstream_error");
    // Committed before the error reached the client.
    assert_eq!(
        store.generation(&id).unwrap().unwrap().total_cost,
        usd("0.000007")
    );
    assert!(chunks.next().await.is_none());
}

#[tokio::test]
async fn tokens_per_day_reserves_the_bound_and_settles_at_most_it() {
    let store = store();
    // A request holds its prompt bound (JSON bytes + framing) plus max_tokens.
    let c = call(&key(&store, "1", |_| {}), Some(10));
    let bound = reservation_for(&c.request, &c.plan).tokens;
    assert_eq!(bound, prompt_bound(&c.request) + 10);
    // Room for two such holds, not three.
    let k = key(&store, "1", |n| {
        n.tokens_per_day = Some(2 * bound + bound / 2)
    });
    let hits = Arc::new(AtomicUsize::new(0));
    let svc = CreditLayer::new(store.clone()).layer(serving(6, hits.clone()));
    let first = svc.clone().oneshot(call(&k, Some(10))).await.unwrap();
    let second = svc.clone().oneshot(call(&k, Some(10))).await.unwrap();
    assert_eq!(store.balance(&k.id).unwrap().reserved_tokens, 2 * bound);
    // The third does not fit beside the two in flight: 429 to midnight, not served.
    let err = svc.clone().oneshot(call(&k, Some(10))).await.unwrap_err();
    assert_eq!(err.code(), "rate_limited");
    let after = err.retry_after().unwrap();
    assert!(after > Duration::ZERO && after <= Duration::from_secs(86_400));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // Settled at what was used (5 + 6 tokens each), the holds released.
    drop(first.chunks.collect::<Vec<_>>().await);
    drop(second.chunks.collect::<Vec<_>>().await);
    assert_eq!(store.tokens_today(&k.id).unwrap(), 22);
    assert_eq!(store.balance(&k.id).unwrap().reserved_tokens, 0);
    // Now it fits.
    let reply = svc.clone().oneshot(call(&k, Some(10))).await.unwrap();
    drop(reply.chunks.collect::<Vec<_>>().await);
    // A request whose bound alone is over the day's limit is never served.
    let small = key(&store, "1", |n| n.tokens_per_day = Some(20));
    let err = svc.oneshot(call(&small, Some(5_000))).await.unwrap_err();
    assert_eq!(err.code(), "rate_limited");
    assert!(err.to_string().contains("lower max_tokens"), "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert_eq!(store.tokens_today(&small.id).unwrap(), 0);
}

#[tokio::test]
async fn allow_list_globs_are_enforced_by_route_before_credit() {
    let store = store();
    let catalog = catalog();
    let hits = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(RouteLayer::new(catalog))
        .layer(CreditLayer::new(store.clone()))
        .service(serving(1, hits.clone()));
    let k = key(&store, "1", |n| n.models = Some(vec!["mock/ec*".into()]));
    let mk = |model: &str| {
        let ctx = CallContext::new();
        ctx.set_key(k.clone());
        ChatCall::new(
            ChatRequest {
                model: model.into(),
                messages: vec![Message::text(Role::User, "hi")],
                max_tokens: Some(5),
                ..Default::default()
            },
            ctx,
        )
    };
    let err = svc.clone().oneshot(mk("mock/lorem")).await.unwrap_err();
    assert_eq!((err.status().as_u16(), err.code()), (403, "forbidden"));
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_eq!(store.balance(&k.id).unwrap().reserved, Money::ZERO);
    let reply = svc.oneshot(mk("mock/echo")).await.unwrap();
    drop(reply.chunks.collect::<Vec<_>>().await);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_calls_never_spend_more_than_the_key_holds() {
    let store = store();
    // Prompt free, completion $1/M: 100 tokens = $0.0001 = the reserve = the cost.
    let cfg = mock_echo(Some(100), "0", "1");
    let catalog = Arc::new(Catalog::from_config(&cfg));
    let k = key(&store, "0.0005", |_| {});
    let hits = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(RouteLayer::new(catalog))
        .layer(CreditLayer::new(store.clone()))
        .service(serving(100, hits.clone()));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let svc = svc.clone();
            let k = k.clone();
            tokio::spawn(async move {
                let ctx = CallContext::new();
                ctx.set_key(k);
                let c = ChatCall::new(
                    ChatRequest {
                        model: "mock/echo".into(),
                        messages: vec![Message::text(Role::User, "hi")],
                        ..Default::default()
                    },
                    ctx,
                );
                match svc.oneshot(c).await {
                    Ok(r) => {
                        tokio::task::yield_now().await;
                        r.chunks.collect::<Vec<_>>().await;
                        true
                    }
                    Err(e) => {
                        assert_eq!(e.code(), "insufficient_credits");
                        false
                    }
                }
            })
        })
        .collect();
    let mut served = 0;
    for t in tasks {
        served += usize::from(t.await.unwrap());
    }
    assert_eq!(served, 5);
    assert_eq!(hits.load(Ordering::SeqCst), 5);
    let b = store.balance(&k.id).unwrap();
    assert_eq!((b.spent, b.reserved), (usd("0.0005"), Money::ZERO));
}

#[test]
fn every_choice_is_reserved_and_the_bound_is_what_upstreams_are_sent() {
    let k = Arc::new(KeyRecord::new("key_x", "x"));
    let mut c = call(&k, Some(1000));
    let one = reservation_for(&c.request, &c.plan);
    Arc::make_mut(&mut c.request).n = Some(128);
    let many = reservation_for(&c.request, &c.plan);
    let prompt = prompt_bound(&c.request);
    assert_eq!(one.tokens, prompt + 1000);
    assert_eq!(many.tokens, prompt + 128 * 1000);
    // mock/echo: $1 prompt, $2 completion per Mtok.
    let price = |tokens: u64, per_mtok: i64| Money::from_pico(tokens as i64 * per_mtok * 1_000_000);
    assert_eq!(many.amount, price(prompt, 1) + price(128_000, 2));
    assert_eq!(one.amount, price(prompt, 1) + price(1000, 2));
    // No max_tokens: the model's max_output_tokens (1024 in the demo), else 4096.
    let plan = &c.plan;
    let req = ChatRequest {
        max_tokens: None,
        ..(*c.request).clone()
    };
    assert_eq!(completion_bound(&req, &plan[0]), 1024);
    assert_eq!(reservation_for(&req, plan).tokens, prompt + 128 * 1024);
    let unbounded = mock_echo(None, "1", "2");
    let e = Catalog::from_config(&unbounded).endpoints()[0].clone();
    assert_eq!(
        u64::from(completion_bound(&req, &e)),
        DEFAULT_MAX_OUTPUT_TOKENS
    );
    // A bound too large to price is more than any key holds.
    let huge = ChatRequest {
        max_tokens: Some(u32::MAX),
        n: Some(128),
        ..req
    };
    let dear = mock_echo(None, "1", "1000");
    let e = Catalog::from_config(&dear).endpoints()[0].clone();
    assert_eq!(
        reservation_for(&huge, &[e]).amount,
        Money::from_pico(i64::MAX)
    );
}

#[tokio::test]
async fn a_cost_above_the_reservation_is_never_charged_and_the_context_holds_it() {
    let store = store();
    let k = key(&store, "1", |_| {});
    // The rest of the stack claims a huge cost and token count (no metering to cap it).
    let svc = CreditLayer::new(store.clone()).layer(service_fn(|call: ChatCall| async move {
        let endpoint = call.plan[0].clone();
        let reserved = call
            .ctx
            .reservation()
            .expect("recorded before the inner call");
        call.ctx.update(|s| {
            s.served = Some(endpoint.clone());
            s.cost = Money::from_pico(i64::MAX);
            s.usage = Some(Usage::new(1_000_000_000_000_000, 1_000_000_000_000_000));
        });
        assert!(reserved.amount > Money::ZERO);
        let chunks: ChunkStream = Box::pin(futures_util::stream::iter([Ok(ChatChunk::text("x"))]));
        Ok::<_, GatewayError>(ChatReply { endpoint, chunks })
    }));
    let c = call(&k, Some(100));
    let hold = reservation_for(&c.request, &c.plan);
    let id = c.ctx.request_id().to_string();
    let reply = svc.oneshot(c).await.unwrap();
    drop(reply.chunks.collect::<Vec<_>>().await);
    let b = store.balance(&k.id).unwrap();
    assert_eq!(
        (b.spent, b.reserved, b.reserved_tokens),
        (hold.amount, Money::ZERO, 0)
    );
    assert_eq!(
        store.generation(&id).unwrap().unwrap().total_cost,
        hold.amount
    );
    assert_eq!(store.tokens_today(&k.id).unwrap(), hold.tokens);
}

#[test]
fn the_prompt_bound_covers_the_counted_prompt() {
    let texts: [String; 4] = [
        "hi".into(),
        "The quick brown fox jumps over the lazy dog. ".repeat(50),
        "日本語のテキストと絵文字 🎉🎉 mixed with English words".into(),
        "a\nb\tc   d".into(),
    ];
    for t in texts {
        let req = ChatRequest {
            model: "m".into(),
            messages: vec![
                Message::text(Role::System, "You are terse."),
                Message::text(Role::User, t.to_string()),
            ],
            ..Default::default()
        };
        let counted = crate::metering::prompt_tokens("o200k_base", &req);
        assert!(prompt_bound(&req) >= counted, "{t}");
    }
    let with_image: ChatRequest = serde_json::from_value(serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
        ]}]
    }))
    .unwrap();
    assert!(prompt_bound(&with_image) > IMAGE_TOKEN_BOUND);
    // Tools: their JSON, plus the allowance for the tool-use prompt a provider adds.
    let plain: ChatRequest = serde_json::from_value(serde_json::json!({
        "model": "m", "messages": [{"role": "user", "content": "weather in Paris?"}]
    }))
    .unwrap();
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let with_tools = ChatRequest {
        tools: Some(serde_json::from_value(tools.clone()).unwrap()),
        ..plain.clone()
    };
    assert_eq!(
        prompt_bound(&with_tools),
        prompt_bound(&plain) + tools.to_string().len() as u64 + TOOLS_TOKEN_BOUND
    );
}

/// A config with one model, `mock/echo`, served by the mock at the given prices (USD
/// per million tokens), with `max_output_tokens` when given.
fn mock_echo(max_output_tokens: Option<u32>, prompt: &str, completion: &str) -> Config {
    let max = max_output_tokens.map_or(String::new(), |m| format!("max_output_tokens = {m}\n"));
    Config::from_toml(&format!(
        "[[providers]]\nname = \"mock\"\nkind = \"mock\"\n[[models]]\nid = \"mock/echo\"\n{max}\
         [[models.endpoints]]\nprovider = \"mock\"\nupstream_model = \"echo\"\n\
         prompt_usd_per_mtok = {prompt}\ncompletion_usd_per_mtok = {completion}\n"
    ))
    .unwrap()
}
