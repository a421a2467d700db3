//! MeteringLayer alone: a `service_fn` provider that yields the given chunks.

use super::*;
use crate::catalog::Catalog;
use crate::chat::{FunctionCallDelta, Message, Role, ToolCallDelta};
use crate::config::Config;
use crate::tokenize::count;
use futures_util::{StreamExt, TryStreamExt};
use tower::{service_fn, ServiceExt};

/// $1 prompt, $2 completion, $0.5 cache read, $1.25 cache write per Mtok.
fn endpoint() -> Arc<Endpoint> {
    let toml = r#"
[[providers]]
name = "mock"
kind = "mock"
[[models]]
id = "mock/echo"
tokenizer = "o200k_base"
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2
  cache_read_usd_per_mtok = 0.5
  cache_write_usd_per_mtok = 1.25
"#;
    Catalog::from_config(&Config::from_toml(toml).unwrap()).endpoints()[0].clone()
}

fn request() -> Arc<ChatRequest> {
    Arc::new(ChatRequest {
        model: "mock/echo".into(),
        messages: vec![Message::text(Role::User, "Tell me a story about a fox.")],
        ..Default::default()
    })
}

/// Meters `chunks` as the provider's answer; returns the stream and the context.
async fn metered(chunks: Vec<Result<ChatChunk, GatewayError>>) -> (ChunkStream, CallContext) {
    metered_ctx(chunks, CallContext::new()).await
}

async fn metered_ctx(
    chunks: Vec<Result<ChatChunk, GatewayError>>,
    ctx: CallContext,
) -> (ChunkStream, CallContext) {
    let svc = MeteringLayer::new().layer(service_fn(move |_c: ProviderCall| {
        let s: ChunkStream = Box::pin(futures_util::stream::iter(chunks.clone()));
        async move { Ok::<_, GatewayError>(s) }
    }));
    let call = ProviderCall {
        endpoint: endpoint(),
        request: request(),
        ctx: ctx.clone(),
    };
    (svc.oneshot(call).await.unwrap(), ctx)
}

fn words() -> Vec<&'static str> {
    vec![
        "Once", " upon", " a", " time,", " a", " quick", " brown", " fox", " ran.",
    ]
}

fn text_chunks() -> Vec<Result<ChatChunk, GatewayError>> {
    let mut v: Vec<_> = words()
        .into_iter()
        .map(|w| Ok(ChatChunk::text(w)))
        .collect();
    let mut last = ChatChunk::text("");
    last.choices[0].finish_reason = Some("stop".into());
    v.push(Ok(last));
    v
}

fn price(prompt: u64, completion: u64) -> Money {
    Money::from_pico(prompt as i64 * 1_000_000 + completion as i64 * 2_000_000)
}

#[tokio::test]
async fn reported_usage_is_priced_in_place_and_recorded() {
    let mut chunks = text_chunks();
    chunks.push(Ok(ChatChunk::usage(Usage::new(12, 9))));
    let (s, ctx) = metered(chunks).await;
    let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
    let usage = out.last().unwrap().usage.clone().unwrap();
    assert_eq!(usage.cost, Some(price(12, 9)));
    assert_eq!(usage.total_tokens, 21);
    assert_eq!(usage.cached_tokens(), 0);
    assert!(usage.prompt_tokens_details.is_some() && usage.completion_tokens_details.is_some());
    let st = ctx.snapshot();
    assert_eq!(st.cost, price(12, 9));
    assert_eq!(st.usage.unwrap(), usage);
    assert_eq!(st.finish_reason.as_deref(), Some("stop"));
    assert_eq!(out.iter().filter(|c| c.usage.is_some()).count(), 1);
}

#[tokio::test]
async fn without_usage_the_tokenizer_counts_prompt_and_text_and_a_usage_chunk_is_sent() {
    let (s, ctx) = metered(text_chunks()).await;
    let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
    let usage = out
        .last()
        .unwrap()
        .usage
        .clone()
        .expect("metering's own usage chunk");
    let text: String = words().concat();
    assert_eq!(usage.completion_tokens, count("o200k_base", &text));
    assert_eq!(usage.prompt_tokens, prompt_tokens("o200k_base", &request()));
    // 3 priming + 3 framing + "user" + the text.
    assert_eq!(
        usage.prompt_tokens,
        7 + count("o200k_base", "Tell me a story about a fox.")
    );
    assert!(usage.completion_tokens > 0);
    assert_eq!(
        usage.cost,
        Some(price(usage.prompt_tokens, usage.completion_tokens))
    );
    assert_eq!(ctx.snapshot().cost, usage.cost.unwrap());
}

#[tokio::test]
async fn a_stream_dropped_after_k_chunks_is_charged_for_those_chunks_only() {
    let k = 4;
    let (mut s, ctx) = metered(text_chunks()).await;
    for _ in 0..k {
        s.next().await.unwrap().unwrap();
    }
    assert!(ctx.snapshot().usage.is_none(), "not settled while running");
    drop(s);
    let st = ctx.snapshot();
    let delivered: String = words()[..k].concat();
    let usage = st.usage.expect("settled on drop");
    assert_eq!(usage.completion_tokens, count("o200k_base", &delivered));
    assert!(usage.completion_tokens < count("o200k_base", &words().concat()));
    assert_eq!(st.cost, price(usage.prompt_tokens, usage.completion_tokens));
}

#[tokio::test]
async fn a_client_gone_before_any_content_is_not_charged() {
    let (s, ctx) = metered(text_chunks()).await;
    drop(s);
    let st = ctx.snapshot();
    assert!(st.usage.is_none());
    assert_eq!(st.cost, Money::ZERO);
}

#[tokio::test]
async fn tool_call_arguments_are_counted_but_not_names() {
    let call = |name: Option<&str>, args: &str| {
        Ok(ChatChunk::delta(crate::chat::Delta {
            tool_calls: Some(vec![ToolCallDelta {
                index: 0,
                id: name.map(|_| "call_1".into()),
                kind: name.map(|_| "function".into()),
                function: Some(FunctionCallDelta {
                    name: name.map(str::to_string),
                    arguments: Some(args.into()),
                }),
            }]),
            ..Default::default()
        }))
    };
    let chunks = vec![
        call(Some("get_weather"), ""),
        call(None, r#"{"city":"#),
        call(None, r#" "Paris", "unit": "celsius"}"#),
    ];
    let (s, ctx) = metered(chunks).await;
    let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
    let usage = out.last().unwrap().usage.clone().unwrap();
    let args = r#"{"city": "Paris", "unit": "celsius"}"#;
    assert_eq!(usage.completion_tokens, count("o200k_base", args));
    assert_eq!(ctx.snapshot().cost, usage.cost.unwrap());
}

#[tokio::test]
async fn cache_and_reasoning_tokens_are_priced_and_reported() {
    let mut u = Usage::new(1_000, 500);
    u.prompt_tokens_details = Some(PromptTokensDetails {
        cached_tokens: 600,
        cache_write_tokens: 100,
    });
    u.completion_tokens_details = Some(CompletionTokensDetails {
        reasoning_tokens: 300,
    });
    let mut chunks = text_chunks();
    chunks.push(Ok(ChatChunk::usage(u)));
    let (s, ctx) = metered(chunks).await;
    let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
    let usage = out.last().unwrap().usage.clone().unwrap();
    // 300 plain × $1 + 600 × $0.5 + 100 × $1.25 + 500 (300 reasoning incl.) × $2, per M.
    let want =
        Money::from_pico(300 * 1_000_000 + 600 * 500_000 + 100 * 1_250_000 + 500 * 2_000_000);
    assert_eq!(usage.cost, Some(want));
    assert_eq!(usage.cached_tokens(), 600);
    assert_eq!(usage.reasoning_tokens(), 300);
    assert_eq!(ctx.snapshot().cost, want);
    // The cost by kind of token, adding up to it.
    assert_eq!(
        usage.cost_details,
        Some(crate::chat::CostDetails {
            prompt: Money::from_pico(300 * 1_000_000),
            cached_prompt: Money::from_pico(600 * 500_000),
            cache_write: Money::from_pico(100 * 1_250_000),
            completion: Money::from_pico(500 * 2_000_000),
        })
    );
}

#[test]
fn cost_details_add_up_to_a_capped_or_zero_charge() {
    use crate::chat::CostDetails;
    let pricing = crate::catalog::Pricing {
        prompt: "1".parse().unwrap(),
        completion: "2".parse().unwrap(),
        cache_read: "0.5".parse().unwrap(),
        cache_write: "1.25".parse().unwrap(),
    };
    let mut u = Usage::new(1_000, 333);
    u.prompt_tokens_details = Some(PromptTokensDetails {
        cached_tokens: 600,
        cache_write_tokens: 100,
    });
    let sum = |d: CostDetails| {
        d.prompt.pico() + d.cached_prompt.pico() + d.cache_write.pico() + d.completion.pico()
    };
    let full = pricing.checked_cost(&u).unwrap();
    assert_eq!(sum(super::cost_details(&pricing, &u, full)), full.pico());
    // Capped at a reservation: scaled down, still exact.
    for cap in [1, 7, 999_999, full.pico() - 1] {
        let d = super::cost_details(&pricing, &u, Money::from_pico(cap));
        assert_eq!(sum(d), cap, "{cap}");
        assert!(d.prompt.pico() <= 300 * 1_000_000 && d.prompt.pico() >= 0);
    }
    assert_eq!(
        super::cost_details(&pricing, &u, Money::ZERO),
        CostDetails::default()
    );
}

#[tokio::test]
async fn visible_reasoning_counts_as_completion_and_reasoning_tokens() {
    let chunks = vec![
        Ok(ChatChunk::delta(crate::chat::Delta {
            reasoning: Some("Let me think about foxes.".into()),
            ..Default::default()
        })),
        Ok(ChatChunk::text("A fox.")),
    ];
    let (s, _ctx) = metered(chunks).await;
    let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
    let usage = out.last().unwrap().usage.clone().unwrap();
    let r = count("o200k_base", "Let me think about foxes.");
    assert_eq!(usage.reasoning_tokens(), r);
    assert_eq!(usage.completion_tokens, r + count("o200k_base", "A fox."));
}

#[tokio::test]
async fn a_mid_stream_failure_settles_at_once_for_the_delivered_part() {
    let err = GatewayError::UpstreamError("broke off".into());
    let chunks = vec![
        Ok(ChatChunk::text("Once upon")),
        Ok(ChatChunk::text(" a time")),
        Err(err),
        Ok(ChatChunk::text(" never delivered")),
    ];
    let (mut s, ctx) = metered(chunks).await;
    s.next().await.unwrap().unwrap();
    s.next().await.unwrap().unwrap();
    assert!(s.next().await.unwrap().is_err());
    // Settled before the error went up, not only on drop.
    let usage = ctx.snapshot().usage.expect("settled at the error");
    assert_eq!(
        usage.completion_tokens,
        count("o200k_base", "Once upon a time")
    );
    assert!(s.next().await.is_none(), "nothing after the failure");
}

#[tokio::test]
async fn a_cut_after_a_partial_report_counts_the_delivered_completion() {
    // Anthropic-style: the prompt is reported first, the completion at the end.
    let chunks = vec![
        Ok(ChatChunk::usage(Usage::new(40, 1))),
        Ok(ChatChunk::text("Once upon a time")),
        Ok(ChatChunk::text(" there was")),
    ];
    let (mut s, ctx) = metered(chunks).await;
    for _ in 0..3 {
        s.next().await.unwrap().unwrap();
    }
    drop(s);
    let usage = ctx.snapshot().usage.unwrap();
    assert_eq!(usage.prompt_tokens, 40);
    assert_eq!(
        usage.completion_tokens,
        count("o200k_base", "Once upon a time there was")
    );
    assert_eq!(ctx.snapshot().cost, price(40, usage.completion_tokens));
}

#[tokio::test]
async fn a_report_after_the_finish_stands_even_if_done_is_missing() {
    let mut chunks = text_chunks();
    chunks.push(Ok(ChatChunk::usage(Usage::new(12, 30))));
    chunks.push(Ok(ChatChunk::text("")));
    let n = chunks.len();
    let (mut s, ctx) = metered(chunks).await;
    for _ in 0..n - 1 {
        s.next().await.unwrap().unwrap();
    }
    drop(s);
    assert_eq!(ctx.snapshot().usage.unwrap().completion_tokens, 30);
}

#[tokio::test]
async fn nothing_delivered_is_reported_but_not_charged() {
    let mut done = ChatChunk::default();
    done.choices.push(crate::chat::ChunkChoice {
        index: 0,
        delta: Default::default(),
        finish_reason: Some("content_filter".into()),
    });
    let (s, ctx) = metered(vec![Ok(done), Ok(ChatChunk::usage(Usage::new(50, 7)))]).await;
    let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
    assert_eq!(
        out.last().unwrap().usage.as_ref().unwrap().cost,
        Some(Money::ZERO)
    );
    assert_eq!(ctx.snapshot().cost, Money::ZERO);
}

#[tokio::test]
async fn completion_text_is_kept_only_when_the_context_asks() {
    let (s, ctx) = metered(text_chunks()).await;
    let _: Vec<ChatChunk> = s.try_collect().await.unwrap();
    assert!(ctx.snapshot().completion_text.is_none());

    let ctx = CallContext::new();
    ctx.update(|s| s.completion_text = Some(String::new()));
    let (s, ctx) = metered_ctx(text_chunks(), ctx).await;
    let _: Vec<ChatChunk> = s.try_collect().await.unwrap();
    let st = ctx.snapshot();
    assert_eq!(
        st.completion_text.as_deref(),
        Some(words().concat().as_str())
    );
    assert!(st.logged_request.is_some());
}

/// The value of `switchboard_usage_over_reserve_total` for the test endpoint.
fn over_reserve_count() -> u64 {
    crate::telemetry::render()
        .lines()
        .find(|l| {
            l.starts_with("switchboard_usage_over_reserve_total{")
                && l.contains("model=\"mock/echo\"")
                && l.contains("provider=\"mock\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn usage_above_the_reservation_is_charged_the_reservation_and_flagged() {
    let health: Arc<dyn HealthRegistry> = Arc::new(crate::health::InMemoryHealth::new(
        &crate::config::HealthConfig {
            failure_threshold: 1,
            cooldown_secs: 60,
        },
        1,
    ));
    let cap = Reservation {
        amount: price(100, 50),
        tokens: 150,
    };
    let before = over_reserve_count();
    let mut chunks = text_chunks();
    chunks.push(Ok(ChatChunk::usage(Usage::new(
        1_000_000_000_000_000,
        1_000_000_000_000_000,
    ))));
    let ctx = CallContext::new();
    ctx.set_reservation(cap);
    let svc = MeteringLayer::new()
        .health(health.clone())
        .layer(service_fn(move |_c: ProviderCall| {
            let s: ChunkStream = Box::pin(futures_util::stream::iter(chunks.clone()));
            async move { Ok::<_, GatewayError>(s) }
        }));
    let e = endpoint();
    let call = ProviderCall {
        endpoint: e.clone(),
        request: request(),
        ctx: ctx.clone(),
    };
    assert_eq!(
        health.availability(&e, tokio::time::Instant::now()),
        crate::health::Availability::Healthy
    );
    let out: Vec<ChatChunk> = svc
        .oneshot(call)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let usage = out.last().unwrap().usage.clone().unwrap();
    // The client sees the reservation as the cost, and it is the context's cost.
    assert_eq!(usage.cost, Some(cap.amount));
    let st = ctx.snapshot();
    assert_eq!(st.cost, cap.amount);
    assert!(st.over_reserve);
    // One failure of the endpoint (threshold 1: degraded) and the metric.
    assert!(matches!(
        health.availability(&e, tokio::time::Instant::now()),
        crate::health::Availability::Unavailable { .. }
    ));
    assert!(over_reserve_count() > before);
}

#[tokio::test]
async fn within_the_reservation_nothing_is_capped_or_flagged_but_extra_tokens_are() {
    let cap = Reservation {
        amount: price(100, 50),
        tokens: 150,
    };
    // 12 + 9 tokens, well within.
    let mut chunks = text_chunks();
    chunks.push(Ok(ChatChunk::usage(Usage::new(12, 9))));
    let ctx = CallContext::new();
    ctx.set_reservation(cap);
    let (s, ctx) = metered_ctx(chunks, ctx).await;
    let _: Vec<ChatChunk> = s.try_collect().await.unwrap();
    let st = ctx.snapshot();
    assert_eq!((st.cost, st.over_reserve), (price(12, 9), false));
    // Cheaper than the reservation but more tokens than it holds (a dearer endpoint
    // set the money bound): the cost stands, the request is flagged.
    let mut chunks = text_chunks();
    chunks.push(Ok(ChatChunk::usage(Usage::new(140, 20))));
    let ctx = CallContext::new();
    ctx.set_reservation(Reservation {
        amount: price(1_000, 1_000),
        tokens: 150,
    });
    let (s, ctx) = metered_ctx(chunks, ctx).await;
    let _: Vec<ChatChunk> = s.try_collect().await.unwrap();
    let st = ctx.snapshot();
    assert_eq!((st.cost, st.over_reserve), (price(140, 20), true));
    // Without a reservation (no credit layer), absurd usage saturates instead of
    // wrapping or panicking.
    let mut chunks = text_chunks();
    chunks.push(Ok(ChatChunk::usage(Usage::new(u64::MAX, u64::MAX))));
    let (s, ctx) = metered(chunks).await;
    let out: Vec<ChatChunk> = s.try_collect().await.unwrap();
    let usage = out.last().unwrap().usage.clone().unwrap();
    assert_eq!(usage.total_tokens, u64::MAX);
    assert_eq!(ctx.snapshot().cost, Money::from_pico(i64::MAX));
}

#[tokio::test]
async fn time_waiting_on_the_upstream_is_recorded() {
    let svc = MeteringLayer::new().layer(service_fn(|_c: ProviderCall| async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let s: ChunkStream = Box::pin(futures_util::stream::iter([Ok(ChatChunk::text("a"))]).then(
            |c| async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                c
            },
        ));
        Ok::<_, GatewayError>(s)
    }));
    let ctx = CallContext::new();
    let call = ProviderCall {
        endpoint: endpoint(),
        request: request(),
        ctx: ctx.clone(),
    };
    let s = svc.oneshot(call).await.unwrap();
    let _: Vec<ChatChunk> = s.try_collect().await.unwrap();
    assert!(ctx.snapshot().upstream_wait >= Duration::from_millis(60));
}
