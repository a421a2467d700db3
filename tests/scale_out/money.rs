//! Money across instances (SPEC §4 and §6): no overspend when one key's requests are
//! spread over instances, nothing lost or doubled by a SIGKILL, a dead instance's
//! reservations released within `reservation_ttl_secs`, `/v1/generation` anywhere.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use switchboard::money::Money;

use super::*;

const TIGHT: &str = "sk-scale-tight-key-0123456789";

/// 40 requests at once, round-robin over three instances, on a key whose credits
/// cover four reservations (each request costs exactly its reservation): the debit
/// never exceeds the credit, every instance reports the same debit, and it is the
/// sum of the `usage.cost` the clients were shown, to the pico-USD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_spread_over_three_instances_never_overspend() {
    let Some(s) = shared("concurrent_requests_spread_over_three_instances_never_overspend") else {
        return;
    };
    let _serial = serial().await;
    // Every answer takes 300 ms, so the 40 requests are in flight together.
    let up = upstream(|seen, _| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        full_answer(&seen, Duration::ZERO)
    })
    .await;
    let each = reserve("hi", 1);
    // Four reservations and a half: a fifth request would overspend.
    let credit = Money::from_pico(each.pico() * 9 / 2);
    let keys = key_entry(TIGHT, &credit.to_string(), "");
    let toml = config(&s, &[("up", &up.url())], 30, &keys);
    let gws = start_all(&toml, 3).await;

    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let base = gws[i % 3].base.clone();
            tokio::spawn(async move { chat(&base, TIGHT, &ask("hi", i % 2 == 0)).await })
        })
        .collect();
    let (mut served, mut refused, mut shown) = (0i64, 0, Money::ZERO);
    for t in tasks {
        let a = t.await.unwrap();
        match (a.status, a.code().as_str()) {
            (200, _) => {
                assert_eq!(a.cost(), each, "each answer costs its reservation");
                served += 1;
                shown = shown + a.cost();
            }
            (402, "insufficient_credits") => refused += 1,
            _ => panic!("unexpected answer {} {}", a.status, a.text),
        }
    }
    assert!(
        served >= 1 && refused >= 1,
        "served {served}, refused {refused}"
    );
    for gw in &gws {
        let (total, debit) = credits(&gw.base, TIGHT).await;
        assert_eq!(total, credit);
        assert!(
            debit <= credit,
            "overspent: debit {debit} > credit {credit}"
        );
        assert_eq!(debit, shown, "the debit is the sum of the costs shown");
        assert_eq!(debit.pico(), served * each.pico(), "{served} served");
    }
    assert_eq!(
        up.hits() as i64,
        served,
        "only admitted requests reached upstream"
    );
}

/// One request's trace, as a load worker saw it.
#[derive(Debug, Clone, Default)]
struct Seen200 {
    /// `usage.cost` when the whole response arrived.
    completed: Option<Money>,
}

/// Every request id the load's clients saw, with what they saw of it.
type SeenIds = Arc<Mutex<HashMap<String, Seen200>>>;

/// Streams from `workers` tasks per instance on [`TEST_KEY`] until `stop`; every
/// request id a client saw (the 200's `x-request-id`) and, when the whole stream
/// arrived, its `usage.cost`.
fn load(
    bases: &[String],
    workers: usize,
    stop: Arc<AtomicBool>,
) -> (SeenIds, Vec<tokio::task::JoinHandle<()>>) {
    let seen: SeenIds = Arc::default();
    let mut tasks = Vec::new();
    for base in bases {
        for _ in 0..workers {
            let (seen, stop, base) = (seen.clone(), stop.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let sent = client()
                        .post(format!("{base}/v1/chat/completions"))
                        .bearer_auth(TEST_KEY)
                        .json(&ask("load", true))
                        .send()
                        .await;
                    let Ok(res) = sent else { break };
                    if res.status() != 200 {
                        break; // the instance is gone
                    }
                    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
                    seen.lock().unwrap().insert(id.clone(), Seen200::default());
                    let mut text = String::new();
                    let mut body = res.bytes_stream();
                    let mut broken = false;
                    while let Some(chunk) = body.next().await {
                        match chunk {
                            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
                            Err(_) => {
                                broken = true;
                                break;
                            }
                        }
                    }
                    if broken || !text.ends_with("data: [DONE]\n\n") {
                        break;
                    }
                    let cost = money_field(&text, "cost").expect("usage.cost");
                    seen.lock().unwrap().get_mut(&id).unwrap().completed = Some(cost);
                }
            }));
        }
    }
    (seen, tasks)
}

/// Instance A is SIGKILLed in the middle of a streaming load over A and B, while it
/// also holds three streams on a key it has leased all the money of. Then:
/// - B is refused that money while A lives, and can spend it within
///   `reservation_ttl_secs` (2 s) of the kill;
/// - every request a client saw completed has its `/v1/generation` on B with the
///   cost the client was shown, and on A once restarted;
/// - the key's debit is exactly the sum of the generations of the requests the
///   clients saw (completed, or cut by the kill after their settlement): nothing
///   charged twice, nothing settled lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_nothing_doubles_nothing_and_frees_its_reservations() {
    let Some(s) =
        shared("sigkill_mid_load_loses_nothing_doubles_nothing_and_frees_its_reservations")
    else {
        return;
    };
    let _serial = serial().await;
    let up = upstream(|seen, _| async move {
        if seen.body["messages"][0]["content"] == "hold" {
            // One content chunk (the 200 is committed, the reservation held), then
            // nothing until the instance dies.
            let first = json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
                "model": "up-model", "choices": [{"index": 0,
                "delta": {"role": "assistant", "content": "held"}, "finish_reason": null}]});
            let s = futures_util::stream::once(async move {
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from(format!("data: {first}\n\n")))
            })
            .chain(futures_util::stream::pending());
            return axum::response::Response::builder()
                .header("content-type", "text/event-stream")
                .body(axum::body::Body::from_stream(s))
                .unwrap();
        }
        full_answer(&seen, Duration::from_millis(20))
    })
    .await;
    const TTL: u64 = 2;
    // Three held streams take 3 × reserve("hold"); what is left cannot hold a fourth.
    let credit = Money::from_pico(reserve("hold", 1).pico() * 3 + reserve("hold", 1).pico() / 2);
    let keys = key_entry(TIGHT, &credit.to_string(), "");
    // The held streams must outlive the stream idle timeout: the provider's is 2 s.
    let toml = config(&s, &[("up", &up.url())], TTL, &keys)
        .replace(
            "stream_idle_timeout_secs = 2",
            "stream_idle_timeout_secs = 600",
        )
        .replace("timeout_secs = 2\n", "timeout_secs = 600\n");
    let mut gws = start_all(&toml, 2).await;
    let (a, b) = (gws[0].base.clone(), gws[1].base.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let (seen, workers) = load(&[a.clone(), b.clone()], 4, stop.clone());

    // A holds the tight key's money in three streams.
    let mut held = Vec::new();
    for _ in 0..3 {
        let res = client()
            .post(format!("{a}/v1/chat/completions"))
            .bearer_auth(TIGHT)
            .json(&ask("hold", true))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "a held stream is admitted on A");
        let mut body = res.bytes_stream();
        let first = body.next().await.expect("the first chunk").unwrap();
        assert!(String::from_utf8_lossy(&first).contains("held"));
        held.push(body);
    }
    let refused = chat(&b, TIGHT, &ask("probe", false)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (402, "insufficient_credits"),
        "A holds that money while it lives: {}",
        refused.text
    );

    // Kill A in the middle of the load.
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen
        .lock()
        .unwrap()
        .values()
        .filter(|s| s.completed.is_some())
        .count()
        < 60
    {
        assert!(Instant::now() < deadline, "the load did not progress");
        gws[0].assert_alive("under load");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gws[0].kill();
    let killed = Instant::now();
    drop(held);

    // B may spend the whole balance within the TTL: one request with n = 3 holds
    // more than two of A's held streams did.
    let whole = json!({"model": "test/model", "n": 3,
                       "messages": [{"role": "user", "content": "go"}]});
    assert!(reserve("go", 3) <= credit && reserve("go", 3) > credit - reserve("hold", 1));
    let spent_on_b: Arc<Mutex<Option<Money>>> = Arc::default();
    let freed = poll_until(killed, Duration::from_secs(TTL + 3), || {
        let (b, whole, spent) = (b.clone(), whole.clone(), spent_on_b.clone());
        async move {
            let r = chat(&b, TIGHT, &whole).await;
            match (r.status, r.code().as_str()) {
                (200, _) => {
                    *spent.lock().unwrap() = Some(r.cost());
                    true
                }
                (402, "insufficient_credits") => false,
                _ => panic!("unexpected answer {} {}", r.status, r.text),
            }
        }
    })
    .await;
    let freed = freed.expect("the dead instance's reservations were never released");
    assert!(
        freed <= Duration::from_millis(TTL * 1000 + 1000),
        "released {freed:?} after the kill; reservation_ttl_secs = {TTL}"
    );
    let spent_on_b = spent_on_b.lock().unwrap().expect("B's request cost");
    let (_, tight_debit) = credits(&b, TIGHT).await;
    assert_eq!(tight_debit, spent_on_b, "the cut streams were not charged");
    assert!(tight_debit <= credit);

    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    gws[0].restart().await;
    let a = gws[0].base.clone();

    let seen = seen.lock().unwrap().clone();
    let completed = seen.values().filter(|s| s.completed.is_some()).count();
    assert!(completed >= 60, "{completed} completed");
    let mut settled = Money::ZERO;
    for (id, s) in &seen {
        let (status, text) = get(&b, &format!("/v1/generation?id={id}"), TEST_KEY).await;
        match (status, s.completed) {
            (200, Some(cost)) => {
                assert_eq!(money_field(&text, "total_cost"), Some(cost), "{id}: {text}");
                let (again, text_a) = get(&a, &format!("/v1/generation?id={id}"), TEST_KEY).await;
                assert_eq!(again, 200, "{id} on the restarted instance: {text_a}");
            }
            (_, Some(_)) => {
                panic!("completed request {id} has no generation on B: {status} {text}")
            }
            (200, None) => {} // cut by the kill after its settlement committed
            (404, None) => continue, // cut before: never charged
            _ => panic!("{id}: {status} {text}"),
        }
        settled = settled + money_field(&text, "total_cost").unwrap();
    }
    for base in [&a, &b] {
        let (_, debit) = credits(base, TEST_KEY).await;
        assert_eq!(
            debit, settled,
            "the debit is the settled requests' costs, once each"
        );
    }
    // The restarted instance serves.
    assert_eq!(chat(&a, TEST_KEY, &ask("after", false)).await.status, 200);
}

/// `GET /v1/generation?id=` of requests served by instance 1 (a JSON answer and a
/// stream) answers on instance 2 with the cost the client was shown; an unknown id
/// is 404 there, and another key does not see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_served_by_one_instance_answers_on_another() {
    let Some(s) = shared("a_generation_served_by_one_instance_answers_on_another") else {
        return;
    };
    let _serial = serial().await;
    let up = upstream(|seen, _| async move { full_answer(&seen, Duration::ZERO) }).await;
    const OTHER: &str = "sk-scale-other-key-0123456789";
    let toml = config(&s, &[("up", &up.url())], 30, &key_entry(OTHER, "1", ""));
    let gws = start_all(&toml, 2).await;
    for stream in [false, true] {
        let a = chat(&gws[0].base, TEST_KEY, &ask("hello", stream)).await;
        assert_eq!(a.status, 200, "{}", a.text);
        let id = a.request_id.clone().expect("x-request-id");
        let (status, text) = get(&gws[1].base, &format!("/v1/generation?id={id}"), TEST_KEY).await;
        assert_eq!(status, 200, "{text}");
        let g: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(g["data"]["id"], id.as_str());
        assert_eq!(g["data"]["streamed"], stream);
        assert_eq!(g["data"]["provider"], "up");
        assert_eq!(money_field(&text, "total_cost"), Some(a.cost()));
        let (status, _) = get(&gws[1].base, &format!("/v1/generation?id={id}"), OTHER).await;
        assert_eq!(status, 404, "another key's generation is unknown");
    }
    let (status, _) = get(&gws[1].base, "/v1/generation?id=gen-unknown", TEST_KEY).await;
    assert_eq!(status, 404);
}
