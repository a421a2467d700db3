//! Limits and health across instances (SPEC §6): one `rpm` budget and one
//! `tokens_per_day` budget per key, and an endpoint degraded through one instance
//! skipped by the others without being contacted.

use std::time::{Duration, Instant};

use serde_json::json;

use super::*;

/// `rpm = 5` on three instances: 15 requests fired at once, five per instance, and
/// exactly five are admitted in total (the window is a minute: no timing in it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_is_one_budget_across_three_instances() {
    let Some(s) = shared("rpm_is_one_budget_across_three_instances") else {
        return;
    };
    let _serial = serial().await;
    const RPM: usize = 5;
    const LIMITED: &str = "sk-scale-rpm-key-0123456789";
    let up = upstream(|seen, _| async move { full_answer(&seen, Duration::ZERO) }).await;
    let toml = config(
        &s,
        &[("up", &up.url())],
        30,
        &key_entry(LIMITED, "10", &format!("rpm = {RPM}")),
    );
    let gws = start_all(&toml, 3).await;
    let tasks: Vec<_> = (0..3 * RPM)
        .map(|i| {
            let base = gws[i % 3].base.clone();
            tokio::spawn(async move { chat(&base, LIMITED, &ask("hi", false)).await })
        })
        .collect();
    let (mut admitted, mut limited) = (0, 0);
    for t in tasks {
        let a = t.await.unwrap();
        match (a.status, a.code().as_str()) {
            (200, _) => admitted += 1,
            (429, "rate_limited") => limited += 1,
            _ => panic!("unexpected answer {} {}", a.status, a.text),
        }
    }
    assert_eq!(
        (admitted, limited),
        (RPM, 2 * RPM),
        "at most rpm admitted across all instances, and no fewer"
    );
    assert_eq!(up.hits(), RPM);
    // One more, on any instance: nothing is left this minute.
    let a = chat(&gws[0].base, LIMITED, &ask("hi", false)).await;
    assert_eq!(a.status, 429, "{}", a.text);
}

/// `tokens_per_day` holding four and a half requests' tokens, 40 requests at once
/// over three instances (each answer uses every token it reserved): at most four are
/// admitted in total, the rest get 429 `rate_limited` with a `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_day_is_one_budget_across_three_instances() {
    let Some(s) = shared("tokens_per_day_is_one_budget_across_three_instances") else {
        return;
    };
    let _serial = serial().await;
    const DAILY: &str = "sk-scale-daily-key-0123456789";
    let up = upstream(|seen, _| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        full_answer(&seen, Duration::ZERO)
    })
    .await;
    let per_request = prompt_bound("hi") + COMPLETION_BOUND;
    let daily = per_request * 9 / 2;
    let toml = config(
        &s,
        &[("up", &up.url())],
        30,
        &key_entry(DAILY, "100", &format!("tokens_per_day = {daily}")),
    );
    let gws = start_all(&toml, 3).await;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let base = gws[i % 3].base.clone();
            tokio::spawn(async move {
                let res = client()
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(DAILY)
                    .json(&ask("hi", false))
                    .send()
                    .await
                    .unwrap();
                let retry_after = res.headers().contains_key("retry-after");
                (
                    res.status().as_u16(),
                    retry_after,
                    res.text().await.unwrap(),
                )
            })
        })
        .collect();
    let (mut admitted, mut limited) = (0i64, 0);
    for t in tasks {
        match t.await.unwrap() {
            (200, _, _) => admitted += 1,
            (429, true, text) if text.contains("rate_limited") => limited += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(admitted >= 1, "nothing admitted");
    assert!(
        admitted * per_request <= daily,
        "{admitted} admitted × {per_request} tokens > tokens_per_day {daily}"
    );
    assert_eq!(admitted + limited, 40);
    assert_eq!(up.hits() as i64, admitted);
}

/// Endpoint `bad` (first in the request's `provider.order`) answers 500. Through
/// instance 1 it fails `failure_threshold` (10) times and is degraded; within 1 s,
/// instance 2 serves from `good` without contacting `bad` at all. Instance 2 sends at
/// most a few requests meanwhile (one per 150 ms), far fewer than the threshold, so
/// it cannot have learned it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_degraded_through_one_instance_is_skipped_by_another() {
    let Some(s) = shared("an_endpoint_degraded_through_one_instance_is_skipped_by_another") else {
        return;
    };
    let _serial = serial().await;
    const THRESHOLD: usize = 10;
    let bad = upstream(|_, _| async move {
        json(
            500,
            json!({"error": {"message": "broken", "type": "server_error"}}),
        )
    })
    .await;
    let good = upstream(|seen, _| async move { full_answer(&seen, Duration::ZERO) }).await;
    let toml = config(
        &s,
        &[("bad", &bad.url()), ("good", &good.url())],
        30,
        &format!(
            "[health]\nfailure_threshold = {THRESHOLD}\ncooldown_secs = 600\n\n[retry]\nmax_attempts = 2\n"
        ),
    );
    let gws = start_all(&toml, 2).await;
    let mut body = ask("hi", false);
    body["provider"] = json!({"order": ["bad", "good"]});

    // Through instance 1, one failure per request until the threshold.
    for i in 0..THRESHOLD {
        let a = chat(&gws[0].base, TEST_KEY, &body).await;
        assert_eq!(a.status, 200, "served by the fallback: {}", a.text);
        assert_eq!(bad.hits(), i + 1);
    }
    let degraded = Instant::now();
    // Instance 1 itself no longer contacts it.
    assert_eq!(chat(&gws[0].base, TEST_KEY, &body).await.status, 200);
    assert_eq!(
        bad.hits(),
        THRESHOLD,
        "instance 1 skips the degraded endpoint"
    );

    // Instance 2: within 1 s, a request that never reaches `bad`.
    let mut tried = 0;
    let skipped_at = loop {
        let at = degraded.elapsed();
        let before = bad.hits();
        let a = chat(&gws[1].base, TEST_KEY, &body).await;
        tried += 1;
        assert_eq!(a.status, 200, "{}", a.text);
        if bad.hits() == before {
            break at;
        }
        assert!(
            at < Duration::from_secs(1),
            "instance 2 still contacts the endpoint degraded through instance 1 after {at:?}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    };
    assert!(
        skipped_at <= Duration::from_secs(1) && tried < THRESHOLD,
        "skipped at {skipped_at:?} after {tried} tries"
    );
    // And it stays skipped there.
    for _ in 0..3 {
        assert_eq!(chat(&gws[1].base, TEST_KEY, &body).await.status, 200);
    }
    assert!(bad.hits() < 2 * THRESHOLD);
    let before = bad.hits();
    assert_eq!(chat(&gws[1].base, TEST_KEY, &body).await.status, 200);
    assert_eq!(bad.hits(), before);
    // Instance 2's operator sees why: the failures in a row and the last one, as
    // instance 1 saw them.
    let (st, endpoints) = admin(&gws[1].base, "GET", "/admin/endpoints", None).await;
    assert_eq!(st, 200, "{endpoints}");
    let view = endpoints["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["provider"] == "bad")
        .unwrap()
        .clone();
    assert_eq!(view["state"], "degraded", "{view}");
    assert_eq!(view["consecutive_failures"], THRESHOLD, "{view}");
    assert_eq!(view["last_error"], "500", "{view}");
}
