//! [`RedisHealth`]: two (or three) instances on one Redis prefix (real Redis, real time).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::tests::{abc, call};
use super::*;
use crate::catalog::Catalog;
use crate::config::HealthConfig;
use crate::shared::tests::{eventually, open, open_at, options, Proxy};
use crate::shared::SharedState;
use crate::testing;

/// One instance's registry: `threshold` failures, `cooldown`, caught up with Redis.
async fn instance(
    shared: SharedState,
    cat: &Catalog,
    threshold: u32,
    cooldown: Duration,
) -> Arc<RedisHealth> {
    let cfg = HealthConfig {
        failure_threshold: threshold,
        cooldown_secs: 0,
    };
    let local = InMemoryHealth::new(&cfg, cat.endpoints().len()).with_cooldown(cooldown);
    let h = Arc::new(RedisHealth::with_local(shared, local, cat));
    assert!(
        eventually(Duration::from_secs(10), || h.is_synced()).await,
        "the registry never caught up with Redis"
    );
    h
}

fn dyn_reg(h: &Arc<RedisHealth>) -> Arc<dyn HealthRegistry> {
    h.clone()
}

/// One attempt on `e` that ends with `status` (or a success for 200).
fn attempt(h: &Arc<RedisHealth>, e: &Arc<Endpoint>, status: u16) {
    let p = Permit::acquire(&dyn_reg(h), e, false).expect("the endpoint is available");
    if status == 200 {
        p.success();
    } else {
        p.failure(&ProviderError::status("p", status, "boom"));
    }
}

fn unavailable(h: &RedisHealth, e: &Endpoint) -> bool {
    matches!(
        h.availability(e, Instant::now()),
        Availability::Unavailable { .. }
    )
}

fn until(h: &RedisHealth, e: &Endpoint) -> Duration {
    match h.availability(e, Instant::now()) {
        Availability::Unavailable { until } => until.saturating_duration_since(Instant::now()),
        other => panic!("{other:?}"),
    }
}

async fn get_i64(s: &SharedState, key: String) -> Option<i64> {
    s.call(|mut c| async move { ::redis::cmd("GET").arg(key).query_async(&mut c).await })
        .await
        .unwrap()
}

async fn pttl(s: &SharedState, key: String) -> i64 {
    s.call(|mut c| async move { ::redis::cmd("PTTL").arg(key).query_async(&mut c).await })
        .await
        .unwrap()
}

#[tokio::test]
async fn failures_through_one_instance_degrade_it_on_the_other() {
    let Some(r) = testing::redis("failures_through_one_instance_degrade_it_on_the_other") else {
        return;
    };
    let cat = abc();
    let a_ep = cat.endpoints()[0].clone();
    let a = instance(open(&r).await, &cat, 3, Duration::from_secs(60)).await;
    let b = instance(open(&r).await, &cat, 3, Duration::from_secs(60)).await;
    for _ in 0..3 {
        attempt(&a, &a_ep, 503);
    }
    assert!(unavailable(&a, &a_ep));
    // B never tried it, and skips it within 1 s.
    let t0 = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || unavailable(&b, &a_ep)).await,
        "B did not learn of the degraded endpoint within 1 s"
    );
    let learnt = t0.elapsed();
    let left = until(&b, &a_ep);
    assert!(
        left > Duration::from_secs(58) && left <= Duration::from_secs(60),
        "{left:?}"
    );
    let mut c = call("test/model", None);
    c.plan = cat.endpoints()[..3].to_vec();
    filter_plan(&mut c, b.as_ref(), &|| 0.0).unwrap();
    let plan: Vec<_> = c.plan.iter().map(|e| e.provider.name.to_string()).collect();
    assert_eq!(plan, ["b", "c"], "learnt in {learnt:?}");
    // The state is in Redis, under the prefix, for the cooldown.
    let key = format!("{}health:degraded:test/model@a", r.prefix());
    let ttl = pttl(b.shared(), key).await;
    assert!(ttl > 55_000 && ttl <= 60_000, "{ttl}");
}

#[tokio::test]
async fn consecutive_failures_are_counted_across_instances() {
    let Some(r) = testing::redis("consecutive_failures_are_counted_across_instances") else {
        return;
    };
    let cat = abc();
    let [e_a, e_b] = [0, 1].map(|i| cat.endpoints()[i].clone());
    let a = instance(open(&r).await, &cat, 3, Duration::from_secs(60)).await;
    let b = instance(open(&r).await, &cat, 3, Duration::from_secs(60)).await;
    let failures = |e: &str| format!("{}health:failures:test/model@{e}", r.prefix());

    // A success anywhere resets the shared count: 2 failures, a success on B, 2 more:
    // never 3 in a row, so still healthy (without the reset the count would be 4).
    attempt(&a, &e_a, 503);
    attempt(&b, &e_a, 503);
    let s = a.shared().clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while get_i64(&s, failures("a")).await != Some(2) {
        assert!(Instant::now() < deadline, "the failures were not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    attempt(&b, &e_a, 200);
    while get_i64(&s, failures("a")).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the success did not reset the count"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    attempt(&a, &e_a, 503);
    attempt(&b, &e_a, 503);
    while get_i64(&s, failures("a")).await != Some(2) {
        assert!(Instant::now() < deadline, "the failures were not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!unavailable(&a, &e_a) && !unavailable(&b, &e_a));

    // Two more failures through A and one through B: 3 in a row across the two
    // (neither reached 3 on its own), so degraded on both.
    attempt(&a, &e_b, 502);
    attempt(&a, &e_b, 502);
    attempt(&b, &e_b, 502);
    assert!(
        eventually(Duration::from_secs(2), || unavailable(&a, &e_b)
            && unavailable(&b, &e_b))
        .await,
        "3 consecutive failures across instances did not degrade the endpoint"
    );

    // Successes on a healthy endpoint nobody saw fail cost no Redis call at all.
    let e_c = cat.endpoints()[2].clone();
    let before = a.shared().calls();
    for _ in 0..200 {
        attempt(&a, &e_c, 200);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(a.shared().calls(), before);
}

#[tokio::test]
async fn after_the_cooldown_one_probe_across_instances_and_its_success_recovers_all() {
    let Some(r) = testing::redis(
        "after_the_cooldown_one_probe_across_instances_and_its_success_recovers_all",
    ) else {
        return;
    };
    let cat = abc();
    let e = cat.endpoints()[0].clone();
    let cooldown = Duration::from_millis(1000);
    let a = instance(open(&r).await, &cat, 1, cooldown).await;
    let b = instance(open(&r).await, &cat, 1, cooldown).await;
    attempt(&a, &e, 500);
    assert!(eventually(Duration::from_secs(1), || unavailable(&b, &e)).await);

    // After the cooldown exactly one of them may probe; never both.
    let half = |h: &RedisHealth| h.availability(&e, Instant::now()) == Availability::HalfOpen;
    let deadline = Instant::now() + cooldown + Duration::from_secs(5);
    let (winner, loser) = loop {
        let (ha, hb) = (half(&a), half(&b));
        assert!(!(ha && hb), "both instances may probe");
        if ha {
            break (a.clone(), b.clone());
        }
        if hb {
            break (b.clone(), a.clone());
        }
        assert!(Instant::now() < deadline, "no instance got the probe");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let probe = Permit::acquire(&dyn_reg(&winner), &e, false).unwrap();
    assert_eq!(probe.kind(), PermitKind::Probe);
    assert!(Permit::acquire(&dyn_reg(&loser), &e, false).is_none());
    assert!(Permit::acquire(&dyn_reg(&winner), &e, false).is_none());
    // While the probe is in flight (past the lock's lease) the other stays out.
    let watch_until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < watch_until {
        assert!(
            unavailable(&loser, &e),
            "the other instance got a second probe"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its success recovers the endpoint on both, and frees the lock.
    probe.success();
    assert_eq!(
        winner.availability(&e, Instant::now()),
        Availability::Healthy
    );
    assert!(
        eventually(Duration::from_secs(1), || {
            loser.availability(&e, Instant::now()) == Availability::Healthy
        })
        .await,
        "the recovery did not reach the other instance within 1 s"
    );
    // What degraded it is gone with it, here and in Redis.
    assert_eq!(loser.snapshot(&e, Instant::now()).last_failure, None);
    let cause = format!("{}health:cause:test/model@a", r.prefix());
    assert_eq!(pttl(winner.shared(), cause).await, -2);
    let lock = format!("{}health:probe:test/model@a", r.prefix());
    let s = winner.shared().clone();
    assert!(
        eventually_async(Duration::from_secs(2), || {
            let (s, lock) = (s.clone(), lock.clone());
            async move { pttl(&s, lock).await == -2 }
        })
        .await,
        "the probe lock was not released"
    );
}

async fn eventually_async<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_unused_probe_slot_passes_to_the_instance_that_wants_it() {
    let Some(r) = testing::redis("an_unused_probe_slot_passes_to_the_instance_that_wants_it")
    else {
        return;
    };
    let cat = abc();
    let e = cat.endpoints()[0].clone();
    let cooldown = Duration::from_millis(300);
    let a = instance(open(&r).await, &cat, 1, cooldown).await;
    let b = instance(open(&r).await, &cat, 1, cooldown).await;
    attempt(&a, &e, 500);
    assert!(eventually(Duration::from_secs(1), || unavailable(&b, &e)).await);
    let half = |h: &RedisHealth| h.availability(&e, Instant::now()) == Availability::HalfOpen;
    // Whoever holds the probe slot first gets no request; the other keeps asking
    // (its requests want the endpoint) and gets it once the idle holder lets go.
    assert!(eventually(Duration::from_secs(5), || half(&a) || half(&b)).await);
    let (idle, busy) = if half(&a) { (a, b) } else { (b, a) };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(6);
    loop {
        // (Read the idle one's local state: asking it would be a request wanting it.)
        let (hi, hb) = (
            idle.local().availability(&e, Instant::now()) == Availability::HalfOpen,
            half(&busy),
        );
        assert!(!(hi && hb), "both instances may probe");
        if hb {
            break;
        }
        assert!(Instant::now() < deadline, "the idle holder never let go");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let probe = Permit::acquire(&dyn_reg(&busy), &e, false).unwrap();
    assert_eq!(probe.kind(), PermitKind::Probe);
    // A failed probe degrades it again, everywhere.
    probe.failure(&ProviderError::status("a", 503, ""));
    assert!(unavailable(&busy, &e));
    assert!(
        eventually(Duration::from_secs(1), || {
            matches!(idle.availability(&e, Instant::now()), Availability::Unavailable { until } if until > Instant::now())
        })
        .await
    );
}

#[tokio::test]
async fn a_retry_after_park_through_one_instance_is_seen_by_the_other() {
    let Some(r) = testing::redis("a_retry_after_park_through_one_instance_is_seen_by_the_other")
    else {
        return;
    };
    let cat = abc();
    let e = cat.endpoints()[1].clone();
    let a = instance(open(&r).await, &cat, 1, Duration::from_secs(60)).await;
    let b = instance(open(&r).await, &cat, 1, Duration::from_secs(60)).await;
    let p = Permit::acquire(&dyn_reg(&a), &e, false).unwrap();
    p.failure(
        &ProviderError::status("b", 429, "slow down")
            .with_retry_after(Some(Duration::from_secs(5))),
    );
    assert!(unavailable(&a, &e));
    assert!(
        eventually(Duration::from_secs(1), || unavailable(&b, &e)).await,
        "B did not learn of the park within 1 s"
    );
    // Parked for its Retry-After, not degraded for the cooldown.
    let left = until(&b, &e);
    assert!(
        left > Duration::from_secs(3) && left <= Duration::from_secs(5),
        "{left:?}"
    );
}

#[tokio::test]
async fn what_degraded_or_parked_an_endpoint_is_seen_on_every_instance() {
    let Some(r) = testing::redis("what_degraded_or_parked_an_endpoint_is_seen_on_every_instance")
    else {
        return;
    };
    let cat = abc();
    let [e0, e1] = [0, 1].map(|i| cat.endpoints()[i].clone());
    let a = instance(open(&r).await, &cat, 3, Duration::from_secs(60)).await;
    let b = instance(open(&r).await, &cat, 3, Duration::from_secs(60)).await;
    for _ in 0..3 {
        attempt(&a, &e0, 503);
    }
    let p = Permit::acquire(&dyn_reg(&a), &e1, false).unwrap();
    p.failure(
        &ProviderError::status("b", 429, "slow down")
            .with_retry_after(Some(Duration::from_secs(30))),
    );
    let seen = |h: &RedisHealth| {
        let now = Instant::now();
        let (d, p) = (h.snapshot(&e0, now), h.snapshot(&e1, now));
        (
            d.state,
            d.consecutive_failures,
            d.last_failure,
            p.state,
            p.last_failure,
        )
    };
    let want = (
        HealthState::Degraded,
        3,
        Some(LastFailure {
            kind: FailureKind::Status(503),
            retry_after: None,
        }),
        HealthState::Parked,
        Some(LastFailure {
            kind: FailureKind::Status(429),
            retry_after: Some(Duration::from_secs(30)),
        }),
    );
    assert_eq!(seen(&a), want);
    // B, which never tried either endpoint, learns why within 1 s…
    assert!(
        eventually(Duration::from_secs(1), || seen(&b) == want).await,
        "B shows {:?}",
        seen(&b)
    );
    // …and so does an instance that starts later, from Redis.
    let c = instance(open(&r).await, &cat, 3, Duration::from_secs(60)).await;
    assert_eq!(seen(&c), want);
}

#[tokio::test]
async fn every_candidate_degraded_elsewhere_leaves_the_soonest_as_last_resort() {
    let Some(r) =
        testing::redis("every_candidate_degraded_elsewhere_leaves_the_soonest_as_last_resort")
    else {
        return;
    };
    let cat = abc();
    let a = instance(open(&r).await, &cat, 1, Duration::from_secs(60)).await;
    let b = instance(open(&r).await, &cat, 1, Duration::from_secs(60)).await;
    let [ea, eb, ec] = [0, 1, 2].map(|i| cat.endpoints()[i].clone());
    attempt(&a, &eb, 503);
    tokio::time::sleep(Duration::from_millis(50)).await;
    attempt(&a, &ea, 503);
    attempt(&a, &ec, 503);
    assert!(
        eventually(Duration::from_secs(1), || {
            unavailable(&b, &ea) && unavailable(&b, &eb) && unavailable(&b, &ec)
        })
        .await
    );
    let mut c = call("test/model", None);
    c.plan = cat.endpoints()[..3].to_vec();
    filter_plan(&mut c, b.as_ref(), &|| 0.0).unwrap();
    assert_eq!(c.plan.len(), 1);
    assert_eq!(c.plan[0].provider.name.as_ref(), "b");
    assert!(c.ctx.snapshot().last_resort);
    // The last resort goes through B, and its success restores it on A as well.
    let t = b.acquire(&eb, Instant::now(), true).unwrap();
    assert_eq!(t.kind, PermitKind::LastResort);
    b.record(&eb, t, AttemptOutcome::Success, Instant::now());
    assert!(
        eventually(Duration::from_secs(1), || {
            a.availability(&eb, Instant::now()) == Availability::Healthy
        })
        .await
    );
}

#[tokio::test]
async fn with_redis_down_health_is_the_instances_own() {
    let cat = abc();
    let e = cat.endpoints()[0].clone();
    let shared = SharedState::open_with("redis://127.0.0.1:1", "down:", options()).unwrap();
    let cfg = HealthConfig {
        failure_threshold: 2,
        cooldown_secs: 0,
    };
    let local = InMemoryHealth::new(&cfg, 3).with_cooldown(Duration::from_millis(300));
    let h = Arc::new(RedisHealth::with_local(shared.clone(), local, &cat));
    attempt(&h, &e, 503);
    attempt(&h, &e, 503);
    assert!(unavailable(&h, &e));
    assert!(eventually(Duration::from_secs(5), || !shared.is_available()).await);
    assert!(!h.is_synced());
    // Its own cooldown, its own single probe, its own recovery.
    assert!(
        eventually(Duration::from_secs(2), || {
            h.availability(&e, Instant::now()) == Availability::HalfOpen
        })
        .await
    );
    let probe = Permit::acquire(&dyn_reg(&h), &e, false).unwrap();
    assert_eq!(probe.kind(), PermitKind::Probe);
    assert!(Permit::acquire(&dyn_reg(&h), &e, false).is_none());
    probe.success();
    assert_eq!(h.availability(&e, Instant::now()), Availability::Healthy);
}

#[tokio::test]
async fn an_instance_that_was_cut_off_catches_up_and_shares_what_it_learnt() {
    let Some(r) =
        testing::redis("an_instance_that_was_cut_off_catches_up_and_shares_what_it_learnt")
    else {
        return;
    };
    let cat = abc();
    let [ea, eb, ec] = [0, 1, 2].map(|i| cat.endpoints()[i].clone());
    let proxy = Proxy::start(r.url()).await;
    let away = instance(
        open_at(&proxy.url(), r.prefix()).await,
        &cat,
        1,
        Duration::from_secs(60),
    )
    .await;
    let other = instance(open(&r).await, &cat, 1, Duration::from_secs(60)).await;

    // b is degraded (through `other`) while both listen.
    attempt(&other, &eb, 503);
    assert!(eventually(Duration::from_secs(1), || unavailable(&away, &eb)).await);

    proxy.cut();
    assert!(eventually(Duration::from_secs(5), || !away.shared().is_up()).await);
    // Meanwhile: `other` degrades a and recovers b (a last resort answered), unheard
    // by `away`; `away` degrades c on its own.
    attempt(&other, &ea, 503);
    let t = other.acquire(&eb, Instant::now(), true).unwrap();
    other.record(&eb, t, AttemptOutcome::Success, Instant::now());
    attempt(&away, &ec, 503);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!unavailable(&away, &ea));
    assert!(unavailable(&away, &eb));
    assert!(!unavailable(&other, &ec));

    // Back: each learns what the other found.
    proxy.restore();
    assert!(
        eventually(Duration::from_secs(10), || unavailable(&away, &ea)).await,
        "the instance back did not catch up"
    );
    assert!(
        eventually(Duration::from_secs(1), || !unavailable(&away, &eb)).await,
        "the recovery it missed was not caught up"
    );
    assert!(
        eventually(Duration::from_secs(5), || unavailable(&other, &ec)).await,
        "what it learnt alone was not shared"
    );
}

#[tokio::test(start_paused = true)]
async fn the_probe_gate_opens_only_for_the_holders_lease() {
    use super::memory::ProbeGate;
    let cat = abc();
    let e = cat.endpoints()[0].clone();
    let cfg = HealthConfig {
        failure_threshold: 1,
        cooldown_secs: 10,
    };
    let reg = InMemoryHealth::new(&cfg, 3);
    let t = reg.acquire(&e, Instant::now(), false).unwrap();
    reg.record(
        &e,
        t,
        AttemptOutcome::from_error(&ProviderError::status("a", 503, "")),
        Instant::now(),
    );
    let start = Instant::now();
    let after = start + Duration::from_secs(10);
    // Local (alone): half-open once the cooldown is over.
    assert_eq!(reg.availability(&e, after), Availability::HalfOpen);
    // Shared, slot elsewhere: unavailable, and not a last-resort candidate either
    // (`until` is past: someone is probing it).
    reg.set_gate(&e, ProbeGate::Closed);
    assert_eq!(
        reg.availability(&e, after),
        Availability::Unavailable { until: after }
    );
    assert!(reg.acquire(&e, after, false).is_none());
    // Held here until a moment: half-open until then only.
    let lease_end = after + Duration::from_secs(1);
    reg.set_gate(&e, ProbeGate::OpenUntil(lease_end));
    assert_eq!(reg.availability(&e, after), Availability::HalfOpen);
    assert!(matches!(
        reg.availability(&e, lease_end),
        Availability::Unavailable { .. }
    ));
    assert!(reg.acquire(&e, lease_end, false).is_none());
    let probe = reg.acquire(&e, after, false).unwrap();
    assert_eq!(probe.kind, PermitKind::Probe);
    // Before the cooldown the gate changes nothing.
    assert!(matches!(
        reg.availability(&e, start),
        Availability::Unavailable { .. }
    ));
    // Events name the endpoint last, so a label may hold spaces.
    assert_eq!(
        super::redis::parse_event("degraded 1500 abc test/model@a b"),
        Some(("degraded", 1500, "abc", "test/model@a b"))
    );
    assert_eq!(super::redis::parse_event("degraded soon abc x"), None);
}

#[tokio::test]
async fn a_dropped_registry_leaves_no_listener_behind() {
    let Some(r) = testing::redis("a_dropped_registry_leaves_no_listener_behind") else {
        return;
    };
    let cat = abc();
    let shared = open(&r).await;
    let before = shared.listeners();
    // What a config reload does: a new registry, then the old one dropped.
    for _ in 0..3 {
        let h = instance(shared.clone(), &cat, 3, Duration::from_secs(60)).await;
        assert_eq!(shared.listeners(), before + 1);
        drop(h);
        // Its background task lets go of it at its next turn.
        assert!(
            eventually(Duration::from_secs(10), || shared.listeners() == before).await,
            "a dropped registry's listener is still there"
        );
    }
}
