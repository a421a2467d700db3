//! Idempotency records in the SQLite store: journaled with their settlement, seen
//! before SQLite has them, replayed with it after a crash, purged once expired.

use super::*;

fn record(key_id: &str, idem: &str, body: &str, expires: u64) -> IdempotencyRecord {
    IdempotencyRecord {
        key_id: key_id.into(),
        idem_key: idem.into(),
        fingerprint: [7; 32],
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-request-id".into(), "gen-first".into()),
        ],
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        created: 1_000,
        expires,
    }
}

fn rows(dir: &Path) -> i64 {
    let c = open_conn(&dir.join("turns.db"), SyncMode::Normal).unwrap();
    c.query_row("SELECT count(*) FROM idempotency", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn a_record_is_seen_from_its_commit_on_and_only_by_its_key_until_it_expires() {
    let dir = temp_dir();
    let (store, id) = store_with_reservation(&dir, SyncMode::Normal, "1");
    assert!(store.keeps_idempotency_records());
    store.writer.apply_paused.store(true, Ordering::SeqCst);
    let rec = record(&id, "order-1", "{\"ok\":true}", 2_000);
    assert!(store
        .settle_recorded(settlement(&id, "gen-1", "0.25", "0.5"), rec.clone())
        .await
        .unwrap());
    // Journaled, not in SQLite yet: seen all the same.
    assert_eq!(rows(&dir), 0);
    let seen = store
        .idempotency_record(&id, "order-1", 1_500)
        .await
        .unwrap();
    assert_eq!(seen.as_ref(), Some(&rec));
    assert!(store
        .idempotency_record("key_other", "order-1", 1_500)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .idempotency_record(&id, "order-2", 1_500)
        .await
        .unwrap()
        .is_none());
    // Expired (by the caller's clock): gone.
    assert!(store
        .idempotency_record(&id, "order-1", 2_000)
        .await
        .unwrap()
        .is_none());
    store.writer.apply_paused.store(false, Ordering::SeqCst);
    store.flush().await;
    assert_eq!(rows(&dir), 1);
    assert_eq!(
        store
            .idempotency_record(&id, "order-1", 1_999)
            .await
            .unwrap(),
        Some(rec)
    );
    assert_eq!(store.balance(&id).unwrap().spent, usd("0.25"));
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn a_crash_before_sqlite_has_it_keeps_charge_and_record_together() {
    let dir = temp_dir();
    let (store, id) = store_with_reservation(&dir, SyncMode::Normal, "1");
    store.writer.apply_paused.store(true, Ordering::SeqCst);
    let rec = record(&id, "order-9", "data: [DONE]\n\n", u64::MAX / 2);
    assert!(store
        .settle_recorded(settlement(&id, "gen-9", "0.125", "0.5"), rec.clone())
        .await
        .unwrap());
    // The same request id again (e.g. a replay of the journal): charged once, and
    // its record is not written twice either.
    let mut other = rec.clone();
    other.body = bytes::Bytes::from_static(b"another answer");
    assert!(!store
        .settle_recorded(settlement(&id, "gen-9", "0.125", "0"), other)
        .await
        .unwrap());
    drop(store); // as a crash: nothing applied to SQLite
    assert_eq!(rows(&dir), 0);
    assert_eq!(spent_in_file(&dir, &id), 0);

    let reopened = file_store_at(&dir.join("turns.db"));
    assert_eq!(rows(&dir), 1);
    assert_eq!(spent_in_file(&dir, &id), usd("0.125").pico());
    assert_eq!(
        reopened
            .idempotency_record(&id, "order-9", 5)
            .await
            .unwrap(),
        Some(rec)
    );
    drop(reopened);
    let again = file_store_at(&dir.join("turns.db"));
    assert_eq!(again.balance(&id).unwrap().spent, usd("0.125"));
    assert_eq!(rows(&dir), 1);
    drop(again);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn purge_deletes_what_expired_and_keeps_the_rest() {
    let dir = temp_dir();
    let (store, id) = store_with_reservation(&dir, SyncMode::Normal, "1");
    for (n, expires) in [(1, 100), (2, 200), (3, 300)] {
        store
            .settle_recorded(
                settlement(&id, &format!("gen-{n}"), "0.001", "0.1"),
                record(&id, &format!("k-{n}"), "x", expires),
            )
            .await
            .unwrap();
    }
    store.flush().await;
    assert_eq!(rows(&dir), 3);
    assert_eq!(store.purge_idempotency(200).await.unwrap(), 2);
    assert_eq!(rows(&dir), 1);
    assert!(store
        .idempotency_record(&id, "k-3", 250)
        .await
        .unwrap()
        .is_some());
    assert!(store
        .idempotency_record(&id, "k-1", 50)
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.purge_idempotency(200).await.unwrap(), 0);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_idempotency_step_runs_once_on_a_database_of_any_earlier_version() {
    let dir = temp_dir();
    let path = dir.join("old.db");
    let mut conn = open_conn(&path, SyncMode::Normal).unwrap();
    prepare_schema(&mut conn, &path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert!(version >= IDEMPOTENCY_VERSION, "{version}");
    // Again: nothing to do, nothing fails.
    prepare_schema(&mut conn, &path).unwrap();
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'idempotency'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 1);
    drop(conn);
    let _ = std::fs::remove_dir_all(dir);
}
