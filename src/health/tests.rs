use super::*;
use crate::catalog::Catalog;
use crate::chat::{ChatRequest, Message, ProviderPreferences, Role, SortBy};
use crate::config::Config;
use crate::config::HealthConfig;
use crate::context::CallContext;
use crate::context::ChatCall;
use rand::{Rng, SeedableRng};

/// One endpoint of `test/model` at provider `name`: (name, kind, prompt, completion,
/// data_collection).
pub(crate) type Spec<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str);

/// A catalog whose model `test/model` has one endpoint per spec, in order, and whose
/// model `test/other` has one endpoint at the last spec's provider.
pub(crate) fn catalog(specs: &[Spec]) -> Arc<Catalog> {
    let mut t = String::new();
    for (name, kind, _, _, dc) in specs {
        t.push_str(&format!(
            "[[providers]]\nname = \"{name}\"\nkind = \"{kind}\"\ndata_collection = \"{dc}\"\n"
        ));
        if *kind != "mock" {
            t.push_str("base_url = \"http://127.0.0.1:9/v1\"\napi_key = \"k\"\n");
        }
    }
    t.push_str("[[models]]\nid = \"test/model\"\n");
    for (name, kind, p, c, _) in specs {
        let up = if *kind == "mock" { "echo" } else { "up" };
        t.push_str(&format!(
            "[[models.endpoints]]\nprovider = \"{name}\"\nupstream_model = \"{up}\"\nprompt_usd_per_mtok = {p}\ncompletion_usd_per_mtok = {c}\n"
        ));
    }
    let (last, kind, ..) = specs.last().unwrap();
    let up = if *kind == "mock" { "echo" } else { "up" };
    t.push_str(&format!(
        "[[models]]\nid = \"test/other\"\n[[models.endpoints]]\nprovider = \"{last}\"\nupstream_model = \"{up}\"\nprompt_usd_per_mtok = 1\ncompletion_usd_per_mtok = 1\n"
    ));
    Arc::new(Catalog::from_config(&Config::from_toml(&t).unwrap()))
}

/// Three openai-kind endpoints: `a` $3+$3, `b` $1+$1, `c` $2+$2.
pub(crate) fn abc() -> Arc<Catalog> {
    catalog(&[
        ("a", "openai", "3", "3", "deny"),
        ("b", "openai", "1", "1", "deny"),
        ("c", "openai", "2", "2", "deny"),
    ])
}

pub(crate) fn call(model: &str, prefs: Option<ProviderPreferences>) -> ChatCall {
    ChatCall::new(
        ChatRequest {
            model: model.into(),
            messages: vec![Message::text(Role::User, "hi")],
            provider: prefs,
            ..Default::default()
        },
        CallContext::new(),
    )
}

fn names(plan: &[Arc<Endpoint>]) -> Vec<String> {
    plan.iter().map(|e| e.provider.name.to_string()).collect()
}

fn registry(catalog: &Catalog, threshold: u32, cooldown_secs: u64) -> InMemoryHealth {
    InMemoryHealth::new(
        &HealthConfig {
            failure_threshold: threshold,
            cooldown_secs,
        },
        catalog.endpoints().len(),
    )
}

fn filtered(
    catalog: &Catalog,
    reg: &dyn HealthRegistry,
    model: &str,
    prefs: Option<ProviderPreferences>,
    r: f64,
) -> (Vec<String>, bool) {
    let mut c = call(model, prefs);
    c.plan = catalog.endpoints()[..3.min(catalog.endpoints().len())].to_vec();
    filter_plan(&mut c, reg, &move || r).unwrap();
    (names(&c.plan), c.ctx.snapshot().last_resort)
}

fn fail(reg: &dyn HealthRegistry, e: &Endpoint, status: u16) {
    let t = reg.acquire(e, Instant::now(), false).unwrap();
    reg.record(
        e,
        t,
        AttemptOutcome::from_error(&ProviderError::status("p", status, "")),
        Instant::now(),
    );
}

#[test]
fn default_draw_is_weight_over_price_squared_then_cheapest_first() {
    let cat = abc();
    let reg = registry(&cat, 5, 60);
    // Prices a $6, b $2, c $4 → weights 1/36, 1/4, 1/16. Sorted cheapest first
    // (b, c, a) the cumulative weights are 0.25, 0.3125, 0.3403.
    assert_eq!(
        filtered(&cat, &reg, "test/model", None, 0.0).0,
        ["b", "c", "a"]
    );
    // r = 0.8 → 0.8 × 0.3403 = 0.272: past b, inside c; the rest cheapest first.
    assert_eq!(
        filtered(&cat, &reg, "test/model", None, 0.8).0,
        ["c", "b", "a"]
    );
    assert_eq!(
        filtered(&cat, &reg, "test/model", None, 0.95).0,
        ["a", "b", "c"]
    );

    // Empirically, with a seeded generator: P(b) = 0.735, P(c) = 0.184, P(a) = 0.082.
    let rng = std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(7));
    let draw = move || rng.lock().unwrap().random::<f64>();
    let mut firsts = std::collections::HashMap::new();
    for _ in 0..10_000 {
        let mut c = call("test/model", None);
        c.plan = cat.endpoints()[..3].to_vec();
        filter_plan(&mut c, &reg, &draw).unwrap();
        *firsts.entry(names(&c.plan)[0].clone()).or_insert(0) += 1;
    }
    let share = |n: &str| f64::from(firsts[n]) / 10_000.0;
    assert!((share("b") - 0.735).abs() < 0.02, "{firsts:?}");
    assert!((share("c") - 0.184).abs() < 0.02, "{firsts:?}");
    assert!((share("a") - 0.082).abs() < 0.015, "{firsts:?}");
}

#[test]
fn free_endpoints_are_drawn_first_and_weights_count() {
    let cat = catalog(&[
        ("a", "openai", "1", "1", "deny"),
        ("free1", "openai", "0", "0", "deny"),
        ("free2", "openai", "0", "0", "deny"),
    ]);
    let reg = registry(&cat, 5, 60);
    for r in [0.0, 0.3, 0.49] {
        assert_eq!(
            filtered(&cat, &reg, "test/model", None, r).0,
            ["free1", "free2", "a"]
        );
    }
    assert_eq!(
        filtered(&cat, &reg, "test/model", None, 0.6).0,
        ["free2", "free1", "a"]
    );
}

#[test]
fn order_comes_first_then_the_rest_cheapest_first() {
    let cat = abc();
    let reg = registry(&cat, 5, 60);
    let prefs = ProviderPreferences {
        order: Some(vec!["c".into(), "a".into()]),
        ..Default::default()
    };
    assert_eq!(
        filtered(&cat, &reg, "test/model", Some(prefs), 0.95).0,
        ["c", "a", "b"]
    );
    // Without fallbacks and without order: only the drawn first.
    let prefs = ProviderPreferences {
        allow_fallbacks: false,
        ..Default::default()
    };
    assert_eq!(
        filtered(&cat, &reg, "test/model", Some(prefs), 0.0).0,
        ["b"]
    );
}

#[test]
fn floor_and_sort_price_are_strictly_cheapest_first() {
    let cat = abc();
    let reg = registry(&cat, 5, 60);
    for r in [0.0, 0.5, 0.999] {
        assert_eq!(
            filtered(&cat, &reg, "test/model:floor", None, r).0,
            ["b", "c", "a"]
        );
        let prefs = ProviderPreferences {
            sort: Some(SortBy::Price),
            ..Default::default()
        };
        assert_eq!(
            filtered(&cat, &reg, "test/model", Some(prefs), r).0,
            ["b", "c", "a"]
        );
    }
}

#[tokio::test(start_paused = true)]
async fn nitro_and_sorts_use_observed_speed() {
    let cat = abc();
    let reg = registry(&cat, 5, 60);
    let [a, b, c] = [0, 1, 2].map(|i| cat.endpoints()[i].clone());
    let now = Instant::now();
    reg.observe_throughput(&a, 120.0, now);
    reg.observe_throughput(&c, 80.0, now);
    reg.observe_ttft(&a, Duration::from_millis(900), now);
    reg.observe_ttft(&b, Duration::from_millis(200), now);
    reg.observe_ttft(&c, Duration::from_millis(400), now);
    // Unobserved throughput (b) goes last.
    assert_eq!(
        filtered(&cat, &reg, "test/model:nitro", None, 0.0).0,
        ["a", "c", "b"]
    );
    let sort = |s| {
        Some(ProviderPreferences {
            sort: Some(s),
            ..Default::default()
        })
    };
    assert_eq!(
        filtered(&cat, &reg, "test/model", sort(SortBy::Latency), 0.0).0,
        ["b", "c", "a"]
    );
    // `sort` wins over the variant.
    assert_eq!(
        filtered(&cat, &reg, "test/model:nitro", sort(SortBy::Price), 0.0).0,
        ["b", "c", "a"]
    );
    // Peak-sensitive: one slow sample counts at once…
    reg.observe_throughput(&a, 10.0, now);
    assert_eq!(reg.throughput(&a), Some(10.0));
    // …a fast one only over the decay time: after 10 s (one time constant) it
    // moves 1 - 1/e ≈ 63% of the way.
    tokio::time::advance(Duration::from_secs(10)).await;
    reg.observe_throughput(&a, 110.0, Instant::now());
    let v = reg.throughput(&a).unwrap();
    assert!(
        (v - (10.0 + 100.0 * (1.0 - (-1f64).exp()))).abs() < 0.01,
        "{v}"
    );
}

#[tokio::test(start_paused = true)]
async fn threshold_failures_degrade_cooldown_then_one_probe() {
    let cat = abc();
    let reg = registry(&cat, 3, 60);
    let a = cat.endpoints()[0].clone();
    // Failover and client classes do not count; a success resets the count.
    fail(&reg, &a, 401);
    fail(&reg, &a, 400);
    fail(&reg, &a, 503);
    fail(&reg, &a, 500);
    let t = reg.acquire(&a, Instant::now(), false).unwrap();
    reg.record(&a, t, AttemptOutcome::Success, Instant::now());
    fail(&reg, &a, 503);
    fail(&reg, &a, 502);
    assert_eq!(reg.availability(&a, Instant::now()), Availability::Healthy);
    fail(&reg, &a, 529);
    let until = Instant::now() + Duration::from_secs(60);
    assert_eq!(
        reg.availability(&a, Instant::now()),
        Availability::Unavailable { until }
    );
    assert!(reg.acquire(&a, Instant::now(), false).is_none());
    assert_eq!(
        filtered(&cat, &reg, "test/model", None, 0.999).0,
        ["c", "b"]
    );

    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(reg.availability(&a, Instant::now()), Availability::HalfOpen);
    let shared: Arc<dyn HealthRegistry> = Arc::new(reg);
    // Exactly one probe at a time, even with many asking at once.
    let permits: Vec<_> = (0..10)
        .filter_map(|_| Permit::acquire(&shared, &a, false))
        .collect();
    assert_eq!(permits.len(), 1);
    assert_eq!(permits[0].kind(), PermitKind::Probe);
    // While it is in flight the endpoint is out of plans.
    assert_eq!(
        filtered(&cat, shared.as_ref(), "test/model", None, 0.999).0,
        ["c", "b"]
    );
    // A dropped (cancelled) probe re-arms.
    drop(permits);
    let probe = Permit::acquire(&shared, &a, false).unwrap();
    assert_eq!(probe.kind(), PermitKind::Probe);
    // A failed probe degrades it for another cooldown.
    probe.failure(&ProviderError::status("a", 503, ""));
    assert!(Permit::acquire(&shared, &a, false).is_none());
    tokio::time::advance(Duration::from_secs(60)).await;
    let probe = Permit::acquire(&shared, &a, false).unwrap();
    probe.success();
    assert_eq!(
        shared.availability(&a, Instant::now()),
        Availability::Healthy
    );
    assert_eq!(
        Permit::acquire(&shared, &a, false).unwrap().kind(),
        PermitKind::Normal
    );
}

#[tokio::test(start_paused = true)]
async fn a_late_success_does_not_restore() {
    let cat = abc();
    let reg: Arc<dyn HealthRegistry> = Arc::new(registry(&cat, 2, 60));
    let a = cat.endpoints()[0].clone();
    // An attempt starts while the endpoint is healthy…
    let slow = Permit::acquire(&reg, &a, false).unwrap();
    // …others fail it into degradation meanwhile…
    fail(reg.as_ref(), &a, 503);
    fail(reg.as_ref(), &a, 503);
    assert!(matches!(
        reg.availability(&a, Instant::now()),
        Availability::Unavailable { .. }
    ));
    // …and its success, arriving late, changes nothing.
    slow.success();
    assert!(matches!(
        reg.availability(&a, Instant::now()),
        Availability::Unavailable { .. }
    ));
    // Nor does a late failure extend the cooldown.
    let late = reg.acquire(&a, Instant::now(), true).unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    let stale = Ticket {
        kind: PermitKind::Normal,
        epoch: late.epoch - 1,
    };
    reg.record(
        &a,
        stale,
        AttemptOutcome::from_error(&ProviderError::status("a", 503, "")),
        Instant::now(),
    );
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(reg.availability(&a, Instant::now()), Availability::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn retry_after_parks_instead_of_counting() {
    let cat = abc();
    let reg = registry(&cat, 1, 60);
    let a = cat.endpoints()[0].clone();
    let t = reg.acquire(&a, Instant::now(), false).unwrap();
    let throttled =
        ProviderError::status("a", 429, "slow down").with_retry_after(Some(Duration::from_secs(5)));
    reg.record(
        &a,
        t,
        AttemptOutcome::from_error(&throttled),
        Instant::now(),
    );
    // Parked for 5 s, not degraded for 60 (threshold 1 would have done that).
    assert!(reg.acquire(&a, Instant::now(), false).is_none());
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(reg.availability(&a, Instant::now()), Availability::Healthy);
}

#[tokio::test(start_paused = true)]
async fn all_degraded_leaves_the_soonest_as_last_resort() {
    let cat = abc();
    let reg = registry(&cat, 1, 60);
    let [a, b, c] = [0, 1, 2].map(|i| cat.endpoints()[i].clone());
    fail(&reg, &b, 503);
    tokio::time::advance(Duration::from_secs(10)).await;
    fail(&reg, &c, 503);
    fail(&reg, &a, 503);
    let (plan, last) = filtered(&cat, &reg, "test/model", None, 0.0);
    assert_eq!(plan, ["b"]);
    assert!(last);
    // A last-resort grant goes through the cooldown; its success restores.
    let t = reg.acquire(&b, Instant::now(), true).unwrap();
    assert_eq!(t.kind, PermitKind::LastResort);
    reg.record(&b, t, AttemptOutcome::Success, Instant::now());
    assert_eq!(reg.availability(&b, Instant::now()), Availability::Healthy);
    let (plan, last) = filtered(&cat, &reg, "test/model", None, 0.0);
    assert_eq!((plan, last), (vec!["b".to_string()], false));
}

#[test]
fn the_snapshot_shows_the_streak_the_last_failure_probing_and_a_park() {
    let catalog = catalog(&[("a", "openai", "1", "1", "allow")]);
    let e = catalog.endpoints()[0].clone();
    let cfg = HealthConfig {
        failure_threshold: 2,
        cooldown_secs: 10,
    };
    let h = InMemoryHealth::new(&cfg, 1);
    let t0 = Instant::now();
    let fail = |h: &InMemoryHealth, err: ProviderError, now: Instant, last_resort: bool| {
        let t = h.acquire(&e, now, last_resort).unwrap();
        h.record(&e, t, AttemptOutcome::from_error(&err), now);
    };
    let snap = h.snapshot(&e, t0);
    assert_eq!(
        (snap.state, snap.consecutive_failures, snap.until),
        (HealthState::Healthy, 0, None)
    );

    fail(&h, ProviderError::status("a", 503, "busy"), t0, false);
    let snap = h.snapshot(&e, t0);
    assert_eq!(
        (snap.state, snap.consecutive_failures),
        (HealthState::Healthy, 1)
    );
    assert_eq!(snap.last_failure.unwrap().kind, FailureKind::Status(503));

    fail(
        &h,
        ProviderError::new("a", FailureKind::Timeout, "slow"),
        t0,
        false,
    );
    let snap = h.snapshot(&e, t0);
    assert_eq!(snap.state, HealthState::Degraded);
    assert_eq!(snap.consecutive_failures, 2, "not reset by the degrade");
    assert_eq!(snap.until, Some(t0 + Duration::from_secs(10)));
    assert_eq!(snap.last_failure.unwrap().kind.label(), "timeout");

    // The cooldown over, a probe goes: probing; it succeeds: healthy, all cleared.
    let later = t0 + Duration::from_secs(11);
    let probe = h.acquire(&e, later, false).unwrap();
    assert_eq!(probe.kind, PermitKind::Probe);
    assert_eq!(h.snapshot(&e, later).state, HealthState::Probing);
    h.record(&e, probe, AttemptOutcome::Success, later);
    let snap = h.snapshot(&e, later);
    assert_eq!(
        (
            snap.state,
            snap.consecutive_failures,
            snap.last_failure,
            snap.until
        ),
        (HealthState::Healthy, 0, None, None)
    );

    // A 429 with Retry-After parks it: not a failure in the streak.
    let limited = ProviderError::status("a", 429, "slow down")
        .with_retry_after(Some(Duration::from_secs(30)));
    fail(&h, limited, later, false);
    let snap = h.snapshot(&e, later);
    assert_eq!(snap.state, HealthState::Parked);
    assert_eq!(snap.consecutive_failures, 0);
    assert_eq!(snap.until, Some(later + Duration::from_secs(30)));
    assert_eq!(
        snap.last_failure,
        Some(LastFailure {
            kind: FailureKind::Status(429),
            retry_after: Some(Duration::from_secs(30))
        })
    );
    // Once the park is over, healthy again.
    let snap = h.snapshot(&e, later + Duration::from_secs(31));
    assert_eq!((snap.state, snap.until), (HealthState::Healthy, None));
}
