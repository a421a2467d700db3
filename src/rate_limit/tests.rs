use super::*;
use std::num::NonZeroU32;
use tower::{service_fn, ServiceExt};

fn svc(
    layer: &RateLimitLayer,
) -> impl Service<Request<()>, Response = Response<Body>, Error = Infallible> + Clone {
    layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Body::empty()))
    }))
}

fn req(key: &Arc<KeyRecord>) -> Request<()> {
    let mut r = Request::new(());
    r.extensions_mut().insert(key.clone());
    r
}

#[tokio::test(start_paused = true)]
async fn rpm_is_exhausted_then_refills_with_time() {
    let layer = RateLimitLayer::new();
    let s = svc(&layer);
    let alice = Arc::new(KeyRecord {
        rpm: Some(3),
        ..KeyRecord::new("key_a", "alice")
    });
    let bob = Arc::new(KeyRecord {
        rpm: Some(600),
        ..KeyRecord::new("key_b", "bob")
    });
    for _ in 0..3 {
        assert_eq!(s.clone().oneshot(req(&alice)).await.unwrap().status(), 200);
    }
    let res = s.clone().oneshot(req(&alice)).await.unwrap();
    assert_eq!(res.status(), 429);
    // One request comes back every 20 s.
    assert_eq!(res.headers()["retry-after"], "20");
    // Other keys have their own budget.
    assert_eq!(s.clone().oneshot(req(&bob)).await.unwrap().status(), 200);

    tokio::time::advance(Duration::from_secs(19)).await;
    let res = s.clone().oneshot(req(&alice)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "1");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(s.clone().oneshot(req(&alice)).await.unwrap().status(), 200);
    assert_eq!(s.clone().oneshot(req(&alice)).await.unwrap().status(), 429);
}

#[tokio::test(start_paused = true)]
async fn keys_without_rpm_and_requests_without_keys_pass() {
    let layer = RateLimitLayer::new();
    let s = svc(&layer);
    let free = Arc::new(KeyRecord::new("key_f", "free"));
    for _ in 0..1000 {
        assert_eq!(s.clone().oneshot(req(&free)).await.unwrap().status(), 200);
    }
    assert_eq!(
        s.clone().oneshot(Request::new(())).await.unwrap().status(),
        200
    );
}

// ---------------------------------------------------------------------------
// RedisRpm: one budget per key across instances (real Redis, real time)
// ---------------------------------------------------------------------------

use crate::shared::tests::{open, open_at, options};
use crate::shared::SharedState;
use crate::testing;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

async fn decide(limiter: &dyn RpmLimiter, key: &KeyRecord, rpm: u32) -> Verdict {
    match limiter.check(key, nz(rpm)) {
        Check::Ready(v) => v,
        Check::Pending(f) => f.await,
    }
}

#[tokio::test]
async fn one_rpm_budget_across_three_instances() {
    let Some(r) = testing::redis("one_rpm_budget_across_three_instances") else {
        return;
    };
    // Three gateways: three shared states, one prefix.
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(RedisRpm::new(open(&r).await));
    }
    let key = KeyRecord::new("key_burst", "burst");
    let started = tokio::time::Instant::now();
    // 15 requests at once, spread over the three: the burst is 5 in total.
    let verdicts =
        futures_util::future::join_all((0..15).map(|i| decide(&instances[i % 3], &key, 5))).await;
    let took = started.elapsed();
    let admitted = verdicts.iter().filter(|v| v.is_ok()).count();
    assert_eq!(admitted, 5, "{verdicts:?}");
    // Each refusal waits for the next emission, 12 s after the burst, on Redis's clock
    // (less the time the burst itself took).
    for wait in verdicts.iter().filter_map(|v| v.err()) {
        assert!(wait <= Duration::from_secs(12), "{wait:?}");
        assert!(
            wait + took >= Duration::from_secs(12),
            "{wait:?} after {took:?}"
        );
    }
    // Another key has its own budget; a key's state lives under the prefix.
    let other = KeyRecord::new("key_other", "other");
    assert_eq!(decide(&instances[0], &other, 5).await, Ok(()));
    let ttl: i64 = instances[0]
        .shared()
        .call(|mut c| {
            let k = format!("{}rpm:key_burst", r.prefix());
            async move { ::redis::cmd("PTTL").arg(k).query_async(&mut c).await }
        })
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 61_000, "{ttl}");
}

#[tokio::test]
async fn the_budget_refills_one_per_interval_of_redis_time() {
    let Some(r) = testing::redis("the_budget_refills_one_per_interval_of_redis_time") else {
        return;
    };
    let (a, b) = (RedisRpm::new(open(&r).await), RedisRpm::new(open(&r).await));
    // rpm = 60: one request back every second.
    for _ in 0..30 {
        assert_eq!(a.admit("key_r", nz(60)).await.unwrap(), Ok(()));
        assert_eq!(b.admit("key_r", nz(60)).await.unwrap(), Ok(()));
    }
    let wait = a.admit("key_r", nz(60)).await.unwrap().unwrap_err();
    assert!(
        wait <= Duration::from_secs(1) && wait > Duration::ZERO,
        "{wait:?}"
    );
    // Come back when told: exactly one more is admitted (on whichever instance), then
    // the next waits about a whole interval again.
    tokio::time::sleep(wait).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match b.admit("key_r", nz(60)).await.unwrap() {
            Ok(()) => break,
            Err(w) => {
                assert!(tokio::time::Instant::now() < deadline, "never refilled");
                assert!(w <= Duration::from_millis(200), "told to wait {w:?} again");
                tokio::time::sleep(w).await;
            }
        }
    }
    let again = a.admit("key_r", nz(60)).await.unwrap().unwrap_err();
    assert!(
        again > Duration::from_millis(500) && again <= Duration::from_secs(1),
        "{again:?}"
    );
}

#[tokio::test]
async fn the_shared_layer_answers_429_with_retry_after() {
    let Some(r) = testing::redis("the_shared_layer_answers_429_with_retry_after") else {
        return;
    };
    let one = RateLimitLayer::shared(open(&r).await);
    let two = RateLimitLayer::shared(open(&r).await);
    let (s1, s2) = (svc(&one), svc(&two));
    let alice = Arc::new(KeyRecord {
        rpm: Some(2),
        ..KeyRecord::new("key_a", "alice")
    });
    assert_eq!(s1.clone().oneshot(req(&alice)).await.unwrap().status(), 200);
    assert_eq!(s2.clone().oneshot(req(&alice)).await.unwrap().status(), 200);
    let res = s1.clone().oneshot(req(&alice)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "30");
    let res = s2.clone().oneshot(req(&alice)).await.unwrap();
    assert_eq!(res.status(), 429);
}

#[tokio::test]
async fn keys_without_rpm_make_no_redis_calls() {
    let Some(r) = testing::redis("keys_without_rpm_make_no_redis_calls") else {
        return;
    };
    let shared = open(&r).await;
    let layer = RateLimitLayer::shared(shared.clone());
    let s = svc(&layer);
    let free = Arc::new(KeyRecord::new("key_f", "free"));
    let before = shared.calls();
    for _ in 0..500 {
        assert_eq!(s.clone().oneshot(req(&free)).await.unwrap().status(), 200);
    }
    assert_eq!(
        s.clone().oneshot(Request::new(())).await.unwrap().status(),
        200
    );
    assert_eq!(shared.calls(), before, "a key without rpm reached Redis");
    // A key with rpm does (so the count above could have moved).
    let limited = Arc::new(KeyRecord {
        rpm: Some(1000),
        ..KeyRecord::new("key_l", "limited")
    });
    assert_eq!(
        s.clone().oneshot(req(&limited)).await.unwrap().status(),
        200
    );
    assert_eq!(shared.calls(), before + 1);
}

#[tokio::test]
async fn with_redis_down_the_shared_layer_limits_like_the_local_one() {
    let shared = SharedState::open_with("redis://127.0.0.1:1", "down:", options()).unwrap();
    let layer = RateLimitLayer::shared(shared.clone());
    let s = svc(&layer);
    let alice = Arc::new(KeyRecord {
        rpm: Some(3),
        ..KeyRecord::new("key_a", "alice")
    });
    // The first decision finds Redis down (and falls back); the next ones do not wait.
    for _ in 0..3 {
        assert_eq!(s.clone().oneshot(req(&alice)).await.unwrap().status(), 200);
    }
    assert!(!shared.is_available());
    let started = tokio::time::Instant::now();
    let res = s.clone().oneshot(req(&alice)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "20");
    assert!(started.elapsed() < Duration::from_millis(100));
    let calls = shared.calls();
    let res = s.clone().oneshot(req(&alice)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        shared.calls(),
        calls,
        "asked Redis although it is known down"
    );
}

#[tokio::test]
async fn redis_back_shares_the_budget_again() {
    let Some(r) = testing::redis("redis_back_shares_the_budget_again") else {
        return;
    };
    let proxy = crate::shared::tests::Proxy::start(r.url()).await;
    let shared = open_at(&proxy.url(), r.prefix()).await;
    let limiter = RedisRpm::new(shared.clone());
    let other = RedisRpm::new(open(&r).await);
    let key = KeyRecord::new("key_back", "back");
    proxy.cut();
    assert!(
        crate::shared::tests::eventually(Duration::from_secs(5), || !shared.is_available()).await
    );
    // Down: this instance's own budget (2 of rpm 2), unseen by the other instance.
    assert_eq!(decide(&limiter, &key, 2).await, Ok(()));
    assert_eq!(decide(&limiter, &key, 2).await, Ok(()));
    assert!(decide(&limiter, &key, 2).await.is_err());
    assert_eq!(other.admit("key_back", nz(2)).await.unwrap(), Ok(()));
    // Back: shared again, without a restart (the other instance took one of the two).
    proxy.restore();
    assert!(crate::shared::tests::eventually(Duration::from_secs(10), || shared.is_up()).await);
    assert_eq!(decide(&limiter, &key, 2).await, Ok(()));
    assert!(decide(&limiter, &key, 2).await.is_err());
}
