//! Budgets per period (`limit_reset`) on the SQLite store, with a clock set by hand:
//! the day, week and month a charge counts in, admission against what is left of
//! the period, and the period spending across a restart, a crash and a migration.

use super::*;
use crate::clock::{parse_rfc3339, ManualClock};
use crate::keys::{KeyRecord, LimitReset};

/// Unix seconds of an RFC 3339 time.
fn at(text: &str) -> u64 {
    parse_rfc3339(text).unwrap()
}

/// A key with $10 of credits and a $1 limit per `reset` period, in `store`.
fn period_key(store: &SqliteStore, secret: &str, reset: LimitReset) -> KeyRecord {
    store
        .create(
            hash_secret(secret),
            NewKey {
                limit: Some(usd("1")),
                limit_reset: Some(reset),
                ..NewKey::new("periodic", usd("10"))
            },
        )
        .unwrap()
        .record
}

fn usage(daily: &str, weekly: &str, monthly: &str) -> PeriodUsage {
    PeriodUsage {
        daily: usd(daily),
        weekly: usd(weekly),
        monthly: usd(monthly),
    }
}

fn refused(store: &SqliteStore, key: &KeyRecord, amount: &str) -> String {
    let err = SqliteStore::reserve(store, key, usd(amount).into()).unwrap_err();
    assert_eq!(err.code(), "insufficient_credits", "{err}");
    err.to_string()
}

#[tokio::test(flavor = "current_thread")]
async fn a_daily_limit_refuses_past_it_and_the_next_utc_day_admits_again() {
    let dir = temp_dir();
    let manual = ManualClock::new(at("2025-03-05T23:00:00Z")); // a Wednesday
    let store = file_store(&dir);
    store.set_clock(manual.clock());
    let key = period_key(&store, "sk-daily-1", LimitReset::Daily);

    store.reserve(&key, usd("0.75").into()).unwrap();
    // What requests in flight hold counts against the period's remainder.
    let message = refused(&store, &key, "0.5");
    assert!(
        message.contains("$0.25 left of its $1 daily spending limit"),
        "{message}"
    );
    assert!(message.contains("midnight UTC"), "{message}");
    assert!(store
        .settle(settlement(&key.id, "gen-d1", "0.75", "0.75"))
        .await
        .unwrap());
    refused(&store, &key, "0.5");
    store.reserve(&key, usd("0.25").into()).unwrap();
    store.release(&key.id, usd("0.25").into());
    assert_eq!(store.usage(&key.id).unwrap(), usage("0.75", "0.75", "0.75"));

    // Midnight UTC: the day starts over; the week and the month do not.
    manual.set(at("2025-03-06T00:00:00Z"));
    assert_eq!(store.usage(&key.id).unwrap(), usage("0", "0.75", "0.75"));
    store.reserve(&key, usd("0.9").into()).unwrap();
    assert!(store
        .settle(settlement(&key.id, "gen-d2", "0.5", "0.9"))
        .await
        .unwrap());
    refused(&store, &key, "0.6");
    assert_eq!(store.usage(&key.id).unwrap(), usage("0.5", "1.25", "1.25"));
    // The lifetime counts on: credits still cap the total.
    assert_eq!(store.balance(&key.id).unwrap().spent, usd("1.25"));
    drop(store);

    // The day's spending is in SQLite: a restart finds it, on either day.
    let store = file_store(&dir);
    store.set_clock(manual.clock());
    assert_eq!(store.usage(&key.id).unwrap(), usage("0.5", "1.25", "1.25"));
    refused(&store, &key, "0.6");
    drop(store);
    // Back on Wednesday, Thursday's charge is in the week and the month, not the day.
    manual.set(at("2025-03-05T23:30:00Z"));
    let store = file_store(&dir);
    store.set_clock(manual.clock());
    assert_eq!(store.usage(&key.id).unwrap(), usage("0.75", "1.25", "1.25"));
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn a_weekly_limit_starts_over_on_monday_at_midnight_utc() {
    let dir = temp_dir();
    let manual = ManualClock::new(at("2025-03-09T23:59:59Z")); // a Sunday
    let store = file_store(&dir);
    store.set_clock(manual.clock());
    let key = period_key(&store, "sk-weekly-1", LimitReset::Weekly);
    // Spent on the Tuesday and the Sunday of the same week.
    manual.set(at("2025-03-04T10:00:00Z"));
    store.reserve(&key, usd("0.5").into()).unwrap();
    assert!(store
        .settle(settlement(&key.id, "gen-w1", "0.5", "0.5"))
        .await
        .unwrap());
    manual.set(at("2025-03-09T23:59:59Z"));
    store.reserve(&key, usd("0.25").into()).unwrap();
    assert!(store
        .settle(settlement(&key.id, "gen-w2", "0.25", "0.25"))
        .await
        .unwrap());
    assert_eq!(store.usage(&key.id).unwrap(), usage("0.25", "0.75", "0.75"));
    let message = refused(&store, &key, "0.5");
    assert!(message.contains("weekly spending limit"), "{message}");
    assert!(message.contains("Monday"), "{message}");

    manual.advance(1); // Monday 2025-03-10, 00:00:00 UTC
    assert_eq!(store.usage(&key.id).unwrap(), usage("0", "0", "0.75"));
    store.reserve(&key, usd("1").into()).unwrap();
    store.release(&key.id, usd("1").into());
    drop(store);
    // Read back from `daily_spend`: Monday's week holds nothing yet, Sunday's all.
    let store = file_store(&dir);
    store.set_clock(manual.clock());
    assert_eq!(store.usage(&key.id).unwrap(), usage("0", "0", "0.75"));
    drop(store);
    manual.set(at("2025-03-09T12:00:00Z"));
    let store = file_store(&dir);
    store.set_clock(manual.clock());
    assert_eq!(store.usage(&key.id).unwrap(), usage("0.25", "0.75", "0.75"));
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn a_monthly_limit_follows_calendar_months() {
    let dir = temp_dir();
    let manual = ManualClock::new(at("2024-01-31T12:00:00Z"));
    let store = file_store(&dir);
    store.set_clock(manual.clock());
    let key = period_key(&store, "sk-monthly-1", LimitReset::Monthly);
    let spend = |id: &'static str, cost: &'static str| {
        let store = store.clone();
        let key = key.clone();
        async move {
            store.reserve(&key, usd(cost).into()).unwrap();
            assert!(store
                .settle(settlement(&key.id, id, cost, cost))
                .await
                .unwrap());
        }
    };
    spend("gen-m1", "0.75").await;
    refused(&store, &key, "0.5");
    // February (29 days in 2024) is one period, from its first to its last day.
    manual.set(at("2024-02-01T00:00:00Z"));
    assert_eq!(store.usage(&key.id).unwrap().monthly, Money::ZERO);
    spend("gen-m2", "0.5").await;
    manual.set(at("2024-02-29T23:59:59Z"));
    assert_eq!(store.usage(&key.id).unwrap().monthly, usd("0.5"));
    spend("gen-m3", "0.5").await;
    let message = refused(&store, &key, "0.01");
    assert!(message.contains("monthly"), "{message}");
    manual.advance(1); // 2024-03-01
    assert_eq!(store.usage(&key.id).unwrap(), usage("0", "0.5", "0"));
    spend("gen-m4", "1").await;
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn period_spending_survives_a_crash_before_sqlite_has_it() {
    let dir = temp_dir();
    let manual = ManualClock::new(at("2025-06-30T22:00:00Z"));
    let store = file_store(&dir);
    store.set_clock(manual.clock());
    let key = period_key(&store, "sk-crash-1", LimitReset::Daily);
    store.reserve(&key, usd("0.25").into()).unwrap();
    assert!(store
        .settle(settlement(&key.id, "gen-c1", "0.25", "0.25"))
        .await
        .unwrap());
    store.flush().await;
    // The applier stops, as in a crash: the next charge is only in the journal.
    store.writer.apply_paused.store(true, Ordering::SeqCst);
    store.reserve(&key, usd("0.5").into()).unwrap();
    assert!(store
        .settle(settlement(&key.id, "gen-c2", "0.5", "0.5"))
        .await
        .unwrap());
    drop(store);
    let in_sqlite: i64 = Connection::open(dir.join("ledger.db"))
        .unwrap()
        .query_row(
            "SELECT coalesce(sum(spent_pico), 0) FROM daily_spend",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(in_sqlite, usd("0.25").pico(), "gen-c2 only journaled");

    // Replayed at open into the day it was journaled on (the clock's, not today's).
    manual.set(at("2025-07-01T08:00:00Z"));
    let store = file_store(&dir);
    store.set_clock(manual.clock());
    assert_eq!(store.usage(&key.id).unwrap(), usage("0", "0.75", "0"));
    manual.set(at("2025-06-30T23:00:00Z"));
    drop(store);
    let store = file_store(&dir);
    store.set_clock(manual.clock());
    assert_eq!(store.usage(&key.id).unwrap(), usage("0.75", "0.75", "0.75"));
    refused(&store, &key, "0.5");
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn a_version_1_database_is_migrated_to_version_2_at_open() {
    let dir = temp_dir();
    let path = dir.join("v1.db");
    let now = now_unix();
    {
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn, 1, &TABLES, "").unwrap();
        conn.execute(
            "INSERT INTO keys (id, secret_sha256, name, created, credits_pico, spent_pico, limit_pico)
             VALUES ('key_v1', ?1, 'old', 1, ?2, ?3, ?4)",
            params![
                &hash_secret("sk-v1-0123456789abcdef")[..],
                usd("5").pico(),
                usd("0.75").pico(),
                usd("1").pico()
            ],
        )
        .unwrap();
        // Spent today and 40 days ago.
        for (id, cost, created) in [
            ("gen-today", "0.5", now),
            ("gen-old", "0.25", now - 40 * 86_400),
        ] {
            conn.execute(
                "INSERT INTO settlements VALUES (?1, 'key_v1', ?2, 'm/x', 'p', 0, 4, 6, 12, 3, '[]', 'stop', ?3)",
                params![id, usd(cost).pico(), created as i64],
            )
            .unwrap();
        }
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 1);
    }
    let store = file_store_at(&path);
    let key = store.get("key_v1").unwrap().unwrap();
    assert_eq!(
        (key.record.limit_reset, key.record.expires_at),
        (None, None)
    );
    assert_eq!(key.spent, usd("0.75"));
    // The settlements already there count in their days.
    let u = store.usage("key_v1").unwrap();
    assert_eq!((u.daily, u.monthly >= usd("0.5")), (usd("0.5"), true));
    let g = store.generation("gen-today").unwrap().unwrap();
    assert_eq!((g.app_url, g.app_title), (None, None));
    // The new columns work.
    let patched = store
        .update(
            "key_v1",
            &KeyPatch {
                limit_reset: Some(Some(LimitReset::Daily)),
                expires_at: Some(Some(4_102_444_800)),
                ..KeyPatch::default()
            },
        )
        .unwrap()
        .unwrap();
    assert_eq!(patched.record.limit_reset, Some(LimitReset::Daily));
    let err = SqliteStore::reserve(&store, &patched.record, usd("0.6").into()).unwrap_err();
    assert_eq!(
        err.code(),
        "insufficient_credits",
        "0.5 of the day's $1 spent"
    );
    drop(store);
    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, LATEST_VERSION);
    assert!(is_strict_table(&conn, "daily_spend"));
    drop(conn);
    // Opening again migrates nothing more (the backfill is not counted twice).
    let store = file_store_at(&path);
    assert_eq!(store.usage("key_v1").unwrap().daily, usd("0.5"));
    assert_eq!(
        store.get("key_v1").unwrap().unwrap().record.expires_at,
        Some(4_102_444_800)
    );
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn attribution_is_kept_with_the_settlement_through_the_journal() {
    let dir = temp_dir();
    let store = file_store(&dir);
    let key = store
        .create(hash_secret("sk-app-1"), NewKey::new("app", usd("1")))
        .unwrap()
        .record;
    store.reserve(&key, usd("0.25").into()).unwrap();
    let mut s = settlement(&key.id, "gen-app", "0.25", "0.25");
    s.generation.app_url = Some("https://app.example/ü".into());
    s.generation.app_title = Some("My \"App\"".into());
    store.writer.apply_paused.store(true, Ordering::SeqCst);
    assert!(store.settle(s).await.unwrap());
    // From the journal, then from SQLite after a replay.
    let g = store.generation("gen-app").unwrap().unwrap();
    assert_eq!(g.app_url.as_deref(), Some("https://app.example/ü"));
    drop(store);
    let store = file_store(&dir);
    let g = store.generation("gen-app").unwrap().unwrap();
    assert_eq!(g.app_url.as_deref(), Some("https://app.example/ü"));
    assert_eq!(g.app_title.as_deref(), Some("My \"App\""));
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

fn is_strict_table(conn: &Connection, table: &str) -> bool {
    conn.query_row(
        "SELECT strict FROM pragma_table_list WHERE name = ?1",
        [table],
        |r| r.get::<_, i64>(0),
    )
    .map(|s| s == 1)
    .unwrap_or(false)
}
