use super::*;
use crate::chat::ChatChunk;
use crate::health::tests::{abc, call};
use crate::health::{HealthFilterLayer, InMemoryHealth};
use std::sync::Mutex;
use tower::{service_fn, ServiceBuilder};

/// What a scripted provider does on one call.
#[derive(Clone)]
enum Act {
    Ok,
    Status(u16),
    RetryAfter(u64),
    Hang,
    BrokenBeforeContent,
    /// Waits for the notify, then answers.
    Gate(Arc<tokio::sync::Notify>),
}

type Log = Arc<Mutex<Vec<(String, Duration)>>>;

/// A provider service whose behaviour per call is `script(provider, n)` (n = that
/// provider's 0-based call count); logs (provider, time since `t0`).
fn provider(
    script: impl Fn(&str, usize) -> Act + Send + Sync + 'static,
) -> (
    impl Service<ProviderCall, Response = ChunkStream, Error = GatewayError, Future: Send>
        + Clone
        + Send
        + 'static,
    Log,
) {
    let log: Log = Arc::default();
    let t0 = Instant::now();
    let script = Arc::new(script);
    let l = log.clone();
    let svc = service_fn(move |pc: ProviderCall| {
        let name = pc.endpoint.provider.name.to_string();
        let n = {
            let mut g = l.lock().unwrap();
            let n = g.iter().filter(|(p, _)| *p == name).count();
            g.push((name.clone(), t0.elapsed()));
            n
        };
        let act = script(&name, n);
        async move {
            let ok = || -> ChunkStream {
                Box::pin(stream::iter([
                    Ok(ChatChunk::text("hi")),
                    Ok(ChatChunk::text(" there")),
                ]))
            };
            match act {
                Act::Ok => Ok(ok()),
                Act::Status(s) => Err(ProviderError::status(name, s, "scripted").into()),
                Act::RetryAfter(ms) => Err(ProviderError::status(name, 429, "slow down")
                    .with_retry_after(Some(Duration::from_millis(ms)))
                    .into()),
                Act::Hang => std::future::pending().await,
                Act::BrokenBeforeContent => {
                    let s: ChunkStream = Box::pin(stream::iter([
                        Ok(ChatChunk::delta(crate::chat::Delta {
                            role: Some(crate::chat::Role::Assistant),
                            ..Default::default()
                        })),
                        Err(ProviderError::new(name, FailureKind::StreamBroken, "cut").into()),
                    ]));
                    Ok(s)
                }
                Act::Gate(n) => {
                    n.notified().await;
                    Ok(ok())
                }
            }
        }
    });
    (svc, log)
}

fn retry(max_attempts: u32, base: u64, max: u64) -> RetryConfig {
    RetryConfig {
        max_attempts,
        base_backoff_ms: base,
        max_backoff_ms: max,
    }
}

fn plan_call(providers: &[&str]) -> ChatCall {
    let cat = abc();
    let mut c = call("test/model", None);
    c.plan = providers
        .iter()
        .map(|p| {
            cat.endpoints()
                .iter()
                .find(|e| e.provider.name.as_ref() == *p)
                .unwrap()
                .clone()
        })
        .collect();
    c
}

fn log_of(log: &Log) -> Vec<(String, u64)> {
    log.lock()
        .unwrap()
        .iter()
        .map(|(p, t)| (p.clone(), t.as_millis() as u64))
        .collect()
}

fn at(v: &[(&str, u64)]) -> Vec<(String, u64)> {
    v.iter().map(|(p, t)| (p.to_string(), *t)).collect()
}

#[tokio::test(start_paused = true)]
async fn same_endpoint_only_after_exponential_backoff() {
    let (svc, log) = provider(|_, _| Act::Status(503));
    let fb = FallbackLayer::new(retry(5, 100, 3200)).layer(svc);
    let err = fb.oneshot(plan_call(&["a"])).await.unwrap_err();
    assert_eq!(err.code(), "upstream_error");
    // Waits of 100, 200, 400, 800 ms between the five attempts.
    assert_eq!(
        log_of(&log),
        at(&[("a", 0), ("a", 100), ("a", 300), ("a", 700), ("a", 1500)])
    );
    // Capped at max_backoff_ms.
    let (svc, log) = provider(|_, _| Act::Status(500));
    let fb = FallbackLayer::new(retry(5, 100, 250)).layer(svc);
    fb.oneshot(plan_call(&["a"])).await.unwrap_err();
    assert_eq!(
        log_of(&log),
        at(&[("a", 0), ("a", 100), ("a", 300), ("a", 550), ("a", 800)])
    );
}

#[tokio::test(start_paused = true)]
async fn a_different_endpoint_at_once_then_cycle_with_backoff() {
    let (svc, log) = provider(|p, n| {
        if p == "b" && n == 1 {
            Act::Ok
        } else {
            Act::Status(503)
        }
    });
    let fb = FallbackLayer::new(retry(5, 100, 3200)).layer(svc);
    let call = plan_call(&["a", "b", "c"]);
    let ctx = call.ctx.clone();
    let reply = fb.oneshot(call).await.unwrap();
    assert_eq!(reply.endpoint.provider.name.as_ref(), "b");
    assert_eq!(
        log_of(&log),
        at(&[("a", 0), ("b", 0), ("c", 0), ("a", 100), ("b", 100)])
    );
    let attempts = ctx.snapshot().attempts;
    let statuses: Vec<_> = attempts.iter().map(|a| a.status.as_str()).collect();
    assert_eq!(statuses, ["503", "503", "503", "503", "200"]);
    assert_eq!(attempts[3].provider.as_ref(), "a");
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_long_ones_go_to_the_client() {
    let (svc, log) = provider(|_, n| {
        if n == 0 {
            Act::RetryAfter(700)
        } else {
            Act::Ok
        }
    });
    let fb = FallbackLayer::new(retry(5, 100, 3200)).layer(svc);
    fb.oneshot(plan_call(&["a"])).await.unwrap();
    assert_eq!(log_of(&log), at(&[("a", 0), ("a", 700)]));

    // Longer than max_backoff_ms: not waited for; 429 with Retry-After.
    let (svc, log) = provider(|_, _| Act::RetryAfter(5000));
    let fb = FallbackLayer::new(retry(5, 100, 3200)).layer(svc);
    let err = fb.oneshot(plan_call(&["a", "b"])).await.unwrap_err();
    assert_eq!(log_of(&log), at(&[("a", 0), ("b", 0)]));
    assert_eq!(err.status(), 429);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(5)));
}

#[tokio::test(start_paused = true)]
async fn attempt_limit_and_final_errors() {
    // max_attempts bounds attempts across endpoints.
    let (svc, log) = provider(|_, _| Act::Status(502));
    let fb = FallbackLayer::new(retry(2, 100, 3200)).layer(svc);
    let err = fb.oneshot(plan_call(&["a", "b", "c"])).await.unwrap_err();
    assert_eq!(log_of(&log).len(), 2);
    assert_eq!(err.status(), 502);
    let msg = err.to_string();
    assert!(
        msg.contains("`a` returned 502") && msg.contains("`b` returned 502"),
        "{msg}"
    );

    // The last attempt timed out → 504.
    let (svc, _) = provider(|p, _| {
        if p == "a" {
            Act::Status(500)
        } else {
            Act::Hang
        }
    });
    let svc = tower::timeout::TimeoutLayer::new(Duration::from_secs(1)).layer(svc);
    let svc = tower::util::MapErr::new(svc, |e: tower::BoxError| {
        match e.downcast::<GatewayError>() {
            Ok(g) => *g,
            Err(_) => ProviderError::new("b", FailureKind::Timeout, "").into(),
        }
    });
    let fb = FallbackLayer::new(retry(2, 100, 3200)).layer(svc);
    let err = fb.oneshot(plan_call(&["a", "b"])).await.unwrap_err();
    assert_eq!(err.code(), "upstream_timeout");
}

#[tokio::test(start_paused = true)]
async fn client_faults_go_back_at_once_failover_moves_on() {
    let (svc, log) = provider(|_, _| Act::Status(400));
    let fb = FallbackLayer::new(retry(5, 100, 3200)).layer(svc);
    let err = fb.oneshot(plan_call(&["a", "b"])).await.unwrap_err();
    assert_eq!(err.status(), 400);
    assert_eq!(log_of(&log).len(), 1);

    // 401 fails over and is never re-tried on the same endpoint.
    let (svc, log) = provider(|p, _| {
        if p == "a" {
            Act::Status(401)
        } else {
            Act::Status(503)
        }
    });
    let fb = FallbackLayer::new(retry(4, 100, 3200)).layer(svc);
    let err = fb.oneshot(plan_call(&["a", "b"])).await.unwrap_err();
    assert_eq!(err.status(), 502);
    assert_eq!(
        log_of(&log),
        at(&[("a", 0), ("b", 0), ("b", 100), ("b", 300)])
    );

    // A stream that breaks before its first content chunk falls over too.
    let (svc, _) = provider(|p, _| {
        if p == "a" {
            Act::BrokenBeforeContent
        } else {
            Act::Ok
        }
    });
    let fb = FallbackLayer::new(retry(4, 100, 3200)).layer(svc);
    let reply = fb.oneshot(plan_call(&["a", "b"])).await.unwrap();
    assert_eq!(reply.endpoint.provider.name.as_ref(), "b");
}

#[tokio::test(start_paused = true)]
async fn never_past_the_request_deadline() {
    let (svc, log) = provider(|_, _| Act::Status(503));
    let fb = FallbackLayer::new(retry(10, 100, 3200)).layer(svc);
    let call = plan_call(&["a"]);
    call.ctx
        .set_deadline((Instant::now() + Duration::from_millis(350)).into_std());
    let err = fb.oneshot(call).await.unwrap_err();
    // 0, 100, 300; the next (700) would pass the deadline.
    assert_eq!(log_of(&log), at(&[("a", 0), ("a", 100), ("a", 300)]));
    assert_eq!(err.status(), 502);

    // A hanging attempt is cut at the deadline: 504.
    let (svc, _) = provider(|_, _| Act::Hang);
    let fb = FallbackLayer::new(retry(10, 100, 3200)).layer(svc);
    let call = plan_call(&["a"]);
    call.ctx
        .set_deadline((Instant::now() + Duration::from_secs(3)).into_std());
    let started = Instant::now();
    let err = fb.oneshot(call).await.unwrap_err();
    assert_eq!(err.code(), "upstream_timeout");
    assert_eq!(started.elapsed(), Duration::from_secs(3));
}

fn stack(
    health: Arc<dyn HealthRegistry>,
    attempts: u32,
    svc: impl Service<ProviderCall, Response = ChunkStream, Error = GatewayError, Future: Send>
        + Clone
        + Send
        + 'static,
) -> impl Service<ChatCall, Response = ChatReply, Error = GatewayError, Future: Send> + Clone {
    ServiceBuilder::new()
        .layer(HealthFilterLayer::new(health.clone()).random(|| 0.0))
        .layer(FallbackLayer::new(retry(attempts, 100, 3200)).health(health))
        .service(svc)
}

fn registry(threshold: u32) -> Arc<dyn HealthRegistry> {
    Arc::new(InMemoryHealth::new(
        &HealthConfig {
            failure_threshold: threshold,
            cooldown_secs: 60,
        },
        3,
    ))
}

#[tokio::test(start_paused = true)]
async fn degraded_endpoints_are_not_contacted_then_probed_once() {
    let health = registry(2);
    let (svc, log) = provider(|p, _| if p == "b" { Act::Status(503) } else { Act::Ok });
    let svc = stack(health.clone(), 3, svc);
    // b is cheapest and drawn first (r = 0); it fails twice → degraded.
    for _ in 0..2 {
        let r = svc
            .clone()
            .oneshot(plan_call(&["a", "b", "c"]))
            .await
            .unwrap();
        assert_eq!(r.endpoint.provider.name.as_ref(), "c");
    }
    for _ in 0..5 {
        svc.clone()
            .oneshot(plan_call(&["a", "b", "c"]))
            .await
            .unwrap();
    }
    let hits_b = |log: &Log| log.lock().unwrap().iter().filter(|(p, _)| p == "b").count();
    assert_eq!(hits_b(&log), 2);
    tokio::time::advance(Duration::from_secs(60)).await;
    // One probe (fails → degraded again), then none.
    for _ in 0..3 {
        svc.clone()
            .oneshot(plan_call(&["a", "b", "c"]))
            .await
            .unwrap();
    }
    assert_eq!(hits_b(&log), 3);
}

#[tokio::test(start_paused = true)]
async fn half_open_lets_one_probe_through_under_concurrency() {
    let health = registry(1);
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let (svc, log) = provider(move |_, n| {
        if n == 0 {
            Act::Status(503)
        } else {
            Act::Gate(g.clone())
        }
    });
    let svc = stack(health.clone(), 1, svc);
    svc.clone().oneshot(plan_call(&["a"])).await.unwrap_err(); // degrades a
    tokio::time::advance(Duration::from_secs(60)).await;
    // The probe goes and waits at the gate…
    let probe = tokio::spawn(svc.clone().oneshot(plan_call(&["a"])));
    while log.lock().unwrap().len() < 2 {
        tokio::task::yield_now().await;
    }
    // …while 20 others get 503 at once without contacting it (an endpoint being
    // probed is no last resort either).
    let others =
        futures_util::future::join_all((0..20).map(|_| svc.clone().oneshot(plan_call(&["a"]))))
            .await;
    for r in &others {
        assert_eq!(r.as_ref().unwrap_err().code(), "no_healthy_provider");
    }
    assert_eq!(log.lock().unwrap().len(), 2);
    gate.notify_one();
    let reply = probe.await.unwrap().unwrap();
    assert_eq!(reply.endpoint.provider.name.as_ref(), "a");
    // Restored: a normal request goes straight through.
    let g2 = gate.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        g2.notify_one();
    });
    svc.clone().oneshot(plan_call(&["a"])).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_re_arms() {
    let health = registry(1);
    let (svc, log) = provider(|_, n| {
        if n == 0 {
            Act::Status(503)
        } else if n == 1 {
            Act::Hang
        } else {
            Act::Ok
        }
    });
    let svc = stack(health.clone(), 1, svc);
    svc.clone().oneshot(plan_call(&["a"])).await.unwrap_err();
    tokio::time::advance(Duration::from_secs(60)).await;
    let probe = svc.clone().oneshot(plan_call(&["a"]));
    // The client goes away mid-probe.
    assert!(tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .is_err());
    let reply = svc.clone().oneshot(plan_call(&["a"])).await.unwrap();
    assert_eq!(reply.endpoint.provider.name.as_ref(), "a");
    assert_eq!(log.lock().unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn late_success_from_before_degradation_does_not_restore() {
    let health = registry(2);
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let (svc, _) = provider(move |_, n| {
        if n == 0 {
            Act::Gate(g.clone())
        } else {
            Act::Status(503)
        }
    });
    let svc = stack(health.clone(), 1, svc);
    let slow = tokio::spawn(svc.clone().oneshot(plan_call(&["a"])));
    tokio::task::yield_now().await;
    for _ in 0..2 {
        svc.clone().oneshot(plan_call(&["a"])).await.unwrap_err();
    }
    let a = abc().endpoints()[0].clone();
    assert!(matches!(
        health.availability(&a, Instant::now()),
        crate::health::Availability::Unavailable { .. }
    ));
    gate.notify_one();
    slow.await.unwrap().unwrap();
    assert!(matches!(
        health.availability(&a, Instant::now()),
        crate::health::Availability::Unavailable { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn last_resort_is_tried_once_then_503() {
    let health = registry(1);
    let (svc, log) = provider(|_, _| Act::Status(503));
    let svc = stack(health.clone(), 1, svc);
    let err = svc
        .clone()
        .oneshot(plan_call(&["a", "b"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "upstream_error"); // max_attempts 1: a only…
    svc.clone()
        .oneshot(plan_call(&["a", "b"]))
        .await
        .unwrap_err(); // …then b
    assert_eq!(log.lock().unwrap().len(), 2);
    // Both degraded: the soonest (a) is tried once as last resort, then 503.
    let err = svc
        .clone()
        .oneshot(plan_call(&["a", "b"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "no_healthy_provider");
    assert_eq!(err.status(), 503);
    assert_eq!(log_of(&log)[2].0, "a");
    assert_eq!(log.lock().unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn observed_ttft_and_throughput_feed_the_registry() {
    let health = registry(5);
    let (svc, _) = provider(|_, _| Act::Ok);
    let svc = stack(health.clone(), 1, svc);
    let reply = svc.oneshot(plan_call(&["a"])).await.unwrap();
    let a = reply.endpoint.clone();
    assert_eq!(health.ttft(&a), Some(Duration::ZERO));
    assert!(health.throughput(&a).is_none());
    // The second chunk arrives 100 ms after the first: 2 tokens / 0.1 s.
    tokio::time::advance(Duration::from_millis(100)).await;
    let n = reply.chunks.count().await;
    assert_eq!(n, 2);
    assert_eq!(health.throughput(&a), Some(20.0));
}
