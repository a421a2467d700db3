//! Budgets per period, expiry and attribution on PgStore against a real PostgreSQL:
//! one period budget per key across instances, a new period freeing it (a clock set
//! by hand), and the migration of a database of schema version 2.

use std::sync::Arc;

use super::tests::{config, make_key, settlement, usd};
use super::*;
use crate::clock::{parse_rfc3339, ManualClock};
use crate::keys::LimitReset;
use crate::store::hash_secret;
use crate::testing::postgres;

fn at(text: &str) -> u64 {
    parse_rfc3339(text).unwrap()
}

/// A store on `url` reading `clock`.
fn open_with(url: &str, clock: &ManualClock) -> Arc<PgStore> {
    let store = PgStore::open(&config(url, 30)).unwrap();
    store.set_clock(clock.clock());
    store
}

fn periodic(limit: &str, reset: LimitReset) -> NewKey {
    NewKey {
        limit: Some(usd(limit)),
        limit_reset: Some(reset),
        ..NewKey::new("periodic", usd("100"))
    }
}

fn usage(daily: &str, weekly: &str, monthly: &str) -> PeriodUsage {
    PeriodUsage {
        daily: usd(daily),
        weekly: usd(weekly),
        monthly: usd(monthly),
    }
}

async fn refused(store: &PgStore, key: &KeyRecord, amount: &str) -> String {
    let err = Ledger::reserve(store, key, usd(amount).into())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "insufficient_credits", "{err}");
    err.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_limit_is_one_budget_across_instances_and_a_new_day_frees_it() {
    let Some(db) = postgres("a_daily_limit_is_one_budget_across_instances") else {
        return;
    };
    let manual = ManualClock::new(at("2025-03-05T20:00:00Z")); // a Wednesday
    let (a, b) = (open_with(db.url(), &manual), open_with(db.url(), &manual));
    let key = make_key(&a, "daily", periodic("1", LimitReset::Daily));

    Ledger::reserve(&*a, &key, usd("0.6").into()).await.unwrap();
    // A holds 0.6 of the day's $1: B cannot hold 0.5 more.
    let message = refused(&b, &key, "0.5").await;
    assert!(message.contains("daily spending limit"), "{message}");
    assert!(a
        .settle(settlement(
            &key.id,
            "d-a1",
            usd("0.6"),
            usd("0.6").into(),
            0
        ))
        .await
        .unwrap());
    Ledger::reserve(&*b, &key, usd("0.4").into()).await.unwrap();
    assert!(b
        .settle(settlement(
            &key.id,
            "d-b1",
            usd("0.4"),
            usd("0.4").into(),
            0
        ))
        .await
        .unwrap());
    // The day's $1 is spent, whichever instance asks.
    refused(&a, &key, "0.01").await;
    refused(&b, &key, "0.01").await;
    assert_eq!(a.usage(&key.id).unwrap(), usage("1", "1", "1"));

    // Midnight UTC on both instances' clock: a new day, a new budget.
    manual.set(at("2025-03-06T00:00:00Z"));
    assert_eq!(b.usage(&key.id).unwrap(), usage("0", "1", "1"));
    Ledger::reserve(&*a, &key, usd("0.9").into()).await.unwrap();
    refused(&b, &key, "0.5").await;
    assert!(a
        .settle(settlement(
            &key.id,
            "d-a2",
            usd("0.25"),
            usd("0.9").into(),
            0
        ))
        .await
        .unwrap());
    // The day's last $0.75 is B's once A gives back the slack its lease kept past
    // the settlement. A gives it back when B's refusal presses it, but a refusal
    // within a second of B's last pressed one answers at once (no convoy behind a
    // key's slow path), so on a busy machine B may have to ask again: the money
    // is never lost, only late. Asked until it comes, for at most 10 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Ledger::reserve(&*b, &key, usd("0.75").into()).await {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.code(), "insufficient_credits", "{e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("A's slack never came back to B: {e}"),
        }
    }
    b.release(&key.id, usd("0.75").into());
    assert_eq!(b.usage(&key.id).unwrap(), usage("0.25", "1.25", "1.25"));
    // Credits keep the lifetime total.
    assert_eq!(a.get(&key.id).unwrap().unwrap().spent, usd("1.25"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weeks_start_on_monday_and_months_on_the_first_across_instances() {
    let Some(db) = postgres("weeks_start_on_monday_and_months_on_the_first") else {
        return;
    };
    let manual = ManualClock::new(at("2025-03-09T23:59:59Z")); // a Sunday
    let (a, b) = (open_with(db.url(), &manual), open_with(db.url(), &manual));
    let weekly = make_key(&a, "weekly", periodic("1", LimitReset::Weekly));
    let monthly = make_key(&a, "monthly", periodic("1", LimitReset::Monthly));
    for (key, id) in [(&weekly, "w-1"), (&monthly, "m-1")] {
        Ledger::reserve(&*a, key, usd("0.75").into()).await.unwrap();
        assert!(a
            .settle(settlement(&key.id, id, usd("0.75"), usd("0.75").into(), 0))
            .await
            .unwrap());
        refused(&b, key, "0.5").await;
    }
    manual.advance(1); // Monday 2025-03-10, 00:00:00 UTC
    assert_eq!(b.usage(&weekly.id).unwrap(), usage("0", "0", "0.75"));
    Ledger::reserve(&*b, &weekly, usd("1").into())
        .await
        .unwrap();
    b.release(&weekly.id, usd("1").into());
    // The month goes on until the 31st.
    refused(&b, &monthly, "0.5").await;
    manual.set(at("2025-03-31T23:59:59Z"));
    refused(&b, &monthly, "0.5").await;
    manual.advance(1); // 2025-04-01
    assert_eq!(b.usage(&monthly.id).unwrap(), usage("0", "0", "0"));
    Ledger::reserve(&*b, &monthly, usd("1").into())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_keep_their_period_and_expiry_and_settlements_their_app() {
    let Some(db) = postgres("keys_keep_their_period_and_expiry") else {
        return;
    };
    let store = PgStore::open(&config(db.url(), 30)).unwrap();
    let made = store
        .create(
            hash_secret("sk-expiring-0123456789abcdef"),
            NewKey {
                expires_at: Some(4_102_444_800),
                ..periodic("2", LimitReset::Weekly)
            },
        )
        .unwrap();
    let found = store
        .find(&hash_secret("sk-expiring-0123456789abcdef"))
        .unwrap()
        .unwrap();
    assert_eq!(found.limit_reset, Some(LimitReset::Weekly));
    assert_eq!(found.expires_at, Some(4_102_444_800));
    let cleared = store
        .update(
            &made.record.id,
            &KeyPatch {
                limit_reset: Some(None),
                expires_at: Some(None),
                ..KeyPatch::default()
            },
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        (cleared.record.limit_reset, cleared.record.expires_at),
        (None, None)
    );
    let got = store.get(&made.record.id).unwrap().unwrap().record;
    assert_eq!((got.limit_reset, got.expires_at), (None, None));

    let key = &cleared.record;
    Ledger::reserve(&*store, key, usd("0.1").into())
        .await
        .unwrap();
    let mut s = settlement(&key.id, "app-1", usd("0.1"), usd("0.1").into(), 0);
    s.generation.app_url = Some("https://app.example/".into());
    s.generation.app_title = Some("Ünïcode app".into());
    assert!(store.settle(s).await.unwrap());
    let g = store.generation("app-1").unwrap().unwrap();
    assert_eq!(g.app_url.as_deref(), Some("https://app.example/"));
    assert_eq!(g.app_title.as_deref(), Some("Ünïcode app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_schema_version_2_is_migrated_to_3() {
    let Some(db) = postgres("a_database_of_schema_version_2_is_migrated") else {
        return;
    };
    let today = crate::clock::utc_day(crate::store::now_unix()) as i64;
    {
        // What a gateway of schema version 2 made: a key that spent $0.75, $0.5 of
        // it today.
        let (client, conn) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let steps = schema::migrations();
        client
            .batch_execute(
                "CREATE TABLE sb_schema_version (
                     version    INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .await
            .unwrap();
        for (i, step) in steps.iter().take(2).enumerate() {
            client.batch_execute(step).await.unwrap();
            client
                .execute(
                    "INSERT INTO sb_schema_version (version) VALUES ($1)",
                    &[&(i as i32 + 1)],
                )
                .await
                .unwrap();
        }
        client
            .execute(
                "INSERT INTO sb_keys (id, secret_sha256, name, created, credits, spent, limit_usd)
                 VALUES ('key_v2', $1, 'old', 1, $2, $3, $4)",
                &[
                    &&hash_secret("sk-v2-0123456789abcdef")[..],
                    &usd("5").pico(),
                    &usd("0.75").pico(),
                    &usd("1").pico(),
                ],
            )
            .await
            .unwrap();
        for (id, cost, day) in [("g-today", "0.5", today), ("g-old", "0.25", today - 40)] {
            client
                .execute(
                    "INSERT INTO sb_settlements (id, key_id, cost, tokens, model, provider, streamed,
                         prompt_tokens, completion_tokens, latency_ms, attempts, created)
                     VALUES ($1, 'key_v2', $2, 0, 'm/x', 'p', false, 1, 1, 1, '[]', $3)",
                    &[&id, &usd(cost).pico(), &(day * 86_400 + 60)],
                )
                .await
                .unwrap();
        }
    }
    let store = PgStore::open(&config(db.url(), 30)).unwrap();
    let s = store.shared.clone();
    let (versions, leases): (Vec<i32>, i64) = store
        .shared
        .block(async move {
            let c = s.client().await?;
            let v = c
                .query(
                    "SELECT version FROM sb_schema_version ORDER BY version",
                    &[],
                )
                .await
                .map_err(|e| s.error(e))?;
            let l = c
                .query_one(
                    "SELECT count(*) FROM pg_proc WHERE proname = 'sb_lease'",
                    &[],
                )
                .await
                .map_err(|e| s.error(e))?;
            Ok((v.iter().map(|r| r.get(0)).collect(), l.get(0)))
        })
        .unwrap();
    assert_eq!(
        versions,
        (1..=schema::migrations().len() as i32).collect::<Vec<_>>()
    );
    assert_eq!(leases, 1, "the old sb_lease is gone");
    let key = store.get("key_v2").unwrap().unwrap();
    assert_eq!((key.spent, key.record.limit_reset), (usd("0.75"), None));
    // Today's settlement counts in today (the one of 40 days ago in no period now).
    assert_eq!(store.usage("key_v2").unwrap().daily, usd("0.5"));
    // The functions of step 3 serve the old key.
    let key = store
        .update(
            "key_v2",
            &KeyPatch {
                limit_reset: Some(Some(LimitReset::Daily)),
                ..KeyPatch::default()
            },
        )
        .unwrap()
        .unwrap()
        .record;
    refused(&store, &key, "0.6").await;
    Ledger::reserve(&*store, &key, usd("0.5").into())
        .await
        .unwrap();
    assert!(store
        .settle(settlement(
            &key.id,
            "g-new",
            usd("0.5"),
            usd("0.5").into(),
            0
        ))
        .await
        .unwrap());
    assert_eq!(store.usage("key_v2").unwrap().daily, usd("1"));
    assert_eq!(store.get("key_v2").unwrap().unwrap().spent, usd("1.25"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_two_instances_never_pass_the_days_limit() {
    let Some(db) = postgres("concurrent_requests_on_two_instances_never_pass") else {
        return;
    };
    let manual = ManualClock::new(at("2025-03-05T12:00:00Z"));
    let (a, b) = (open_with(db.url(), &manual), open_with(db.url(), &manual));
    // Room for five holds of $0.01 a day, and plenty of credits.
    let key = make_key(&a, "busy", periodic("0.05", LimitReset::Daily));
    let hold: Reservation = usd("0.01").into();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let store = if worker % 2 == 0 {
            a.clone()
        } else {
            b.clone()
        };
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut charged = Money::ZERO;
            for n in 0..6 {
                match Ledger::reserve(&*store, &key, hold).await {
                    Ok(()) => {
                        let id = format!("busy-{worker}-{n}");
                        let cost = usd("0.01");
                        assert!(store
                            .settle(settlement(&key.id, &id, cost, hold, 0))
                            .await
                            .unwrap());
                        charged = charged + cost;
                    }
                    Err(e) => assert_eq!(e.code(), "insufficient_credits", "{e}"),
                }
            }
            charged
        }));
    }
    let mut total = Money::ZERO;
    for t in tasks {
        total = total + t.await.unwrap();
    }
    // Never more than the day's limit (a refusal while another instance's lease
    // holds what it does not use may leave a little of it unspent).
    assert!(total <= usd("0.05") && total >= usd("0.03"), "{total}");
    assert_eq!(a.usage(&key.id).unwrap().daily, total);
    assert_eq!(a.get(&key.id).unwrap().unwrap().spent, total);
    // Whatever is left of the day is still there to spend, and nothing more.
    let left = usd("0.05") - total;
    if left > Money::ZERO {
        Ledger::reserve(&*b, &key, left.into()).await.unwrap();
        b.release(&key.id, left.into());
    }
    refused(&b, &key, &(left + Money::from_pico(1)).to_string()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_latest_day_is_counted_on_its_row_and_moved_to_its_days_row_by_a_later_day() {
    let Some(db) = postgres("latest_day_on_the_key_row") else {
        return;
    };
    let days = [
        "2025-03-03T12:00:00Z", // a Monday
        "2025-03-04T12:00:00Z",
        "2025-03-05T12:00:00Z",
    ];
    let manual = ManualClock::new(at(days[0]));
    let a = open_with(db.url(), &manual);
    let key = make_key(&a, "weekly", periodic("10", LimitReset::Weekly));
    for (i, day) in days.iter().enumerate() {
        manual.set(at(day));
        Ledger::reserve(&*a, &key, usd("1").into()).await.unwrap();
        let id = format!("w-{i}");
        assert!(a
            .settle(settlement(&key.id, &id, usd("0.5"), usd("1").into(), 0))
            .await
            .unwrap());
    }
    assert_eq!(a.usage(&key.id).unwrap(), usage("0.5", "1.5", "1.5"));
    // The days before the latest are rows of sb_daily_spend, moved there by the first
    // settlement of the day after; the latest is counted on the key row.
    let (client, conn) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let first = (at(days[0]) / 86_400) as i64;
    let half = usd("0.5").pico();
    let rows = client
        .query(
            "SELECT day, spent FROM sb_daily_spend WHERE key_id = $1 ORDER BY day",
            &[&key.id],
        )
        .await
        .unwrap();
    let rows: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, vec![(first, half), (first + 1, half)]);
    let row = client
        .query_one(
            "SELECT spent_day, spent_today FROM sb_keys WHERE id = $1",
            &[&key.id],
        )
        .await
        .unwrap();
    let on_row: (Option<i64>, i64) = (row.get(0), row.get(1));
    assert_eq!(on_row, (Some(first + 2), half));
    // The week's $10 budget counts all three days: $8.5 is left.
    refused(&a, &key, "8.6").await;
    Ledger::reserve(&*a, &key, usd("8.4").into()).await.unwrap();
    a.release(&key.id, usd("8.4").into());
    // Next Monday: a new week, the month goes on.
    manual.set(at("2025-03-10T00:00:00Z"));
    assert_eq!(a.usage(&key.id).unwrap(), usage("0", "0", "1.5"));
    Ledger::reserve(&*a, &key, usd("9.9").into()).await.unwrap();
}
