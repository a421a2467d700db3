//! The spill file against a real PostgreSQL: charges that could not be committed
//! survive the process and are committed once by the next store on the same disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::tests::{config, make_key, money_hold, settlement, spent_of, usd, Proxy};
use super::super::*;
use super::Line;
use crate::testing::postgres;

/// A directory of its own under the system temp dir, deleted on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use rand::distr::{Alphanumeric, SampleString};
        let dir = std::env::temp_dir().join(format!(
            "switchboard-pg-{tag}-{}-{}",
            std::process::id(),
            Alphanumeric.sample_string(&mut rand::rng(), 8)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// [`config`] with a spill dir of its own.
fn config_spilling(url: &str, spill: &TempDir) -> StoreConfig {
    StoreConfig {
        spill_dir: spill.path().display().to_string(),
        ..config(url, 30)
    }
}

/// The `pending-*.jsonl` files in a spill dir, with their contents.
fn spill_files(dir: &TempDir) -> Vec<(std::path::PathBuf, String)> {
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("pending-") && name.ends_with(".jsonl")
        })
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    files.sort();
    files
}

/// Opens a store (off the async workers: `open` blocks).
async fn open_with(config: StoreConfig) -> Arc<PgStore> {
    tokio::task::spawn_blocking(move || PgStore::open(&config).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_postgres_did_not_commit_survives_a_crash_in_the_spill_file() {
    let Some(db) = postgres("a_charge_postgres_did_not_commit_survives_a_crash") else {
        return;
    };
    let spill = TempDir::new("spill");
    let mut proxy = Proxy::start(0).await;
    let url = db.url().replace(":5432/", &format!(":{}/", proxy.port));
    let store = open_with(config_spilling(&url, &spill)).await;
    let key = make_key(&store, "crash", NewKey::new("crash", usd("1")));
    let hold = money_hold("0.01");
    Ledger::reserve(&*store, &key, hold).await.unwrap();
    Ledger::reserve(&*store, &key, hold).await.unwrap();
    assert!(spill_files(&spill).is_empty(), "nothing spilled while up");

    proxy.cut().await;
    // The content went out; the charge cannot be committed.
    let waiting = store.settle(settlement(&key.id, "served-1", usd("0.004"), hold, 7));
    store.settle_detached(settlement(&key.id, "served-2", usd("0.003"), hold, 5));
    let err = waiting.await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    // By the time its waiter hears it failed, the charge is on disk.
    let files = spill_files(&spill);
    assert_eq!(files.len(), 1, "{files:?}");
    let (path, text) = &files[0];
    assert!(
        path.ends_with(format!("pending-{}.jsonl", store.instance())),
        "{path:?}"
    );
    assert!(text.ends_with('\n'), "{text}");
    for id in ["served-1", "served-2"] {
        assert_eq!(
            text.matches(&format!("\"id\":\"{id}\"")).count(),
            1,
            "{text}"
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    // The process dies with the charges still queued.
    tokio::task::spawn_blocking(move || store.crash())
        .await
        .unwrap();
    assert_eq!(
        spill_files(&spill).len(),
        1,
        "the file outlives the process"
    );

    // PostgreSQL back; the next instance on this disk commits them, once.
    let _proxy = Proxy::start(proxy.port).await;
    let next = open_with(config_spilling(&url, &spill)).await;
    let (n, id) = (next.clone(), key.id.clone());
    let (spent, one, two, tokens) = tokio::task::spawn_blocking(move || {
        (
            spent_of(&n, &id),
            n.generation("served-1").unwrap(),
            n.generation("served-2").unwrap(),
            n.tokens_today(&id).unwrap(),
        )
    })
    .await
    .unwrap();
    assert_eq!(spent, usd("0.007"));
    assert_eq!(tokens, 12);
    let one = one.expect("the generation row of the replayed charge");
    assert_eq!(one.total_cost, usd("0.004"));
    assert_eq!(one.model, "mock/echo");
    assert_eq!(one.ttft_ms, Some(3));
    assert_eq!(one.attempts.len(), 1);
    assert!(two.is_some());
    assert!(
        spill_files(&spill).is_empty(),
        "the replayed file is deleted"
    );
    // Opening again replays nothing more.
    drop(next);
    let again = open_with(config_spilling(&url, &spill)).await;
    let (a, id) = (again.clone(), key.id.clone());
    let spent = tokio::task::spawn_blocking(move || spent_of(&a, &id))
        .await
        .unwrap();
    assert_eq!(spent, usd("0.007"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spill_file_is_deleted_once_its_charges_commit() {
    let Some(db) = postgres("a_spill_file_is_deleted_once_its_charges_commit") else {
        return;
    };
    let spill = TempDir::new("spill");
    let mut proxy = Proxy::start(0).await;
    let url = db.url().replace(":5432/", &format!(":{}/", proxy.port));
    let store = open_with(config_spilling(&url, &spill)).await;
    let key = make_key(&store, "blip", NewKey::new("blip", usd("1")));
    let hold = money_hold("0.01");
    Ledger::reserve(&*store, &key, hold).await.unwrap();
    proxy.cut().await;
    let err = store
        .settle(settlement(&key.id, "while-down", usd("0.004"), hold, 0))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert_eq!(spill_files(&spill).len(), 1);

    // PostgreSQL back: the writer commits the charge and the file goes.
    let _proxy = Proxy::start(proxy.port).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !spill_files(&spill).is_empty() {
        assert!(Instant::now() < deadline, "the spill file stayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, id) = (store.clone(), key.id.clone());
    let spent = tokio::task::spawn_blocking(move || spent_of(&s, &id))
        .await
        .unwrap();
    assert_eq!(spent, usd("0.004"));
}

/// Writes `pending-<name>.jsonl` in `dir` with the lines of `settlements` for `ledger`.
fn write_spill(dir: &TempDir, name: &str, ledger: &str, settlements: &[Settlement]) -> String {
    let mut text = String::new();
    for s in settlements {
        text.push_str(&serde_json::to_string(&Line::of(ledger, s)).unwrap());
        text.push('\n');
    }
    std::fs::write(dir.path().join(format!("pending-{name}.jsonl")), &text).unwrap();
    text
}

#[test]
fn two_instances_replaying_one_spill_file_at_once_charge_once() {
    let Some(db) = postgres("two_instances_replaying_one_spill_file_at_once") else {
        return;
    };
    let spill = TempDir::new("spill");
    let first = PgStore::open(&config_spilling(db.url(), &spill)).unwrap();
    let key = make_key(&first, "twice", NewKey::new("twice", usd("1")));
    let ledger = first.shared.spill.ledger().to_string();
    assert!(!ledger.is_empty());
    let owed: Vec<Settlement> = (0..40)
        .map(|n| {
            settlement(
                &key.id,
                &format!("dead-{n}"),
                Money::from_pico(1_000_000 + n),
                Reservation::NONE,
                1,
            )
        })
        .collect();
    let total = owed
        .iter()
        .fold(Money::ZERO, |t, s| t + s.generation.total_cost);
    write_spill(&spill, "i-dead-one", &ledger, &owed[..25]);
    write_spill(&spill, "i-dead-two", &ledger, &owed[20..]);
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let opened: Vec<_> = (0..2)
        .map(|_| {
            let (barrier, config) = (barrier.clone(), config_spilling(db.url(), &spill));
            std::thread::spawn(move || {
                barrier.wait();
                PgStore::open(&config).unwrap()
            })
        })
        .collect();
    let stores: Vec<Arc<PgStore>> = opened.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(spent_of(&stores[0], &key.id), total);
    assert_eq!(stores[1].tokens_today(&key.id).unwrap(), 40);
    for s in &owed {
        assert!(first.generation(&s.generation.id).unwrap().is_some());
    }
    assert!(spill_files(&spill).is_empty());
}

#[test]
fn a_torn_last_line_is_skipped_and_the_complete_ones_are_replayed() {
    let Some(db) = postgres("a_torn_last_line_is_skipped") else {
        return;
    };
    let spill = TempDir::new("spill");
    let first = PgStore::open(&config_spilling(db.url(), &spill)).unwrap();
    let key = make_key(&first, "torn", NewKey::new("torn", usd("1")));
    let ledger = first.shared.spill.ledger().to_string();
    let owed = [
        settlement(&key.id, "whole-1", usd("0.001"), Reservation::NONE, 0),
        settlement(&key.id, "whole-2", usd("0.002"), Reservation::NONE, 0),
        settlement(&key.id, "torn-3", usd("0.004"), Reservation::NONE, 0),
    ];
    let text = write_spill(&spill, "i-torn", &ledger, &owed);
    // The process died in the middle of the third line.
    let cut = text.len() - 40;
    std::fs::write(spill.path().join("pending-i-torn.jsonl"), &text[..cut]).unwrap();
    // And another database's leftovers are none of this one's business.
    write_spill(&spill, "i-elsewhere", "another-ledger", &owed[..1]);

    let next = PgStore::open(&config_spilling(db.url(), &spill)).unwrap();
    assert_eq!(spent_of(&next, &key.id), usd("0.003"));
    assert!(next.generation("whole-1").unwrap().is_some());
    assert!(next.generation("whole-2").unwrap().is_some());
    assert!(next.generation("torn-3").unwrap().is_none());
    let left = spill_files(&spill);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].0.ends_with("pending-i-elsewhere.jsonl"));
}

#[test]
fn a_live_instances_spill_file_is_left_to_it() {
    let Some(db) = postgres("a_live_instances_spill_file_is_left_to_it") else {
        return;
    };
    let spill = TempDir::new("spill");
    let first = PgStore::open(&config_spilling(db.url(), &spill)).unwrap();
    let key = make_key(&first, "live", NewKey::new("live", usd("1")));
    // What `first` keeps while PostgreSQL does not answer (its file, locked).
    let owed = settlement(&key.id, "owed", usd("0.001"), Reservation::NONE, 0);
    let lines = first.shared.spill.lines(std::iter::once(&owed));
    first.shared.spill.append(lines).unwrap();
    assert_eq!(spill_files(&spill).len(), 1);
    let second = PgStore::open(&config_spilling(db.url(), &spill)).unwrap();
    assert_eq!(spent_of(&second, &key.id), Money::ZERO);
    assert_eq!(
        spill_files(&spill).len(),
        1,
        "not taken from a live instance"
    );
    // Once it has let go of it (a process that ended), the next open replays it.
    first.shared.spill.close();
    let third = PgStore::open(&config_spilling(db.url(), &spill)).unwrap();
    assert_eq!(spent_of(&third, &key.id), usd("0.001"));
    assert!(spill_files(&spill).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_closed_while_postgres_is_down_keeps_its_charges_for_the_next() {
    let Some(db) = postgres("a_store_closed_while_postgres_is_down_keeps_its_charges") else {
        return;
    };
    let spill = TempDir::new("spill");
    let mut proxy = Proxy::start(0).await;
    let url = db.url().replace(":5432/", &format!(":{}/", proxy.port));
    let store = open_with(config_spilling(&url, &spill)).await;
    let key = make_key(&store, "stop", NewKey::new("stop", usd("1")));
    let hold = money_hold("0.01");
    Ledger::reserve(&*store, &key, hold).await.unwrap();
    proxy.cut().await;
    let pending = store.settle(settlement(&key.id, "at-stop", usd("0.005"), hold, 0));
    // A graceful stop (the gateway shutting down) while PostgreSQL is still away: it
    // gives up waiting, the charge stays in the file, the file's lock is let go.
    tokio::task::spawn_blocking(move || drop(store))
        .await
        .unwrap();
    assert!(pending.await.is_err());
    assert_eq!(spill_files(&spill).len(), 1);

    let next = open_with(config_spilling(db.url(), &spill)).await;
    let (n, id) = (next.clone(), key.id.clone());
    let spent = tokio::task::spawn_blocking(move || spent_of(&n, &id))
        .await
        .unwrap();
    assert_eq!(spent, usd("0.005"));
    assert!(spill_files(&spill).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_postgres_never_answers_is_kept_before_its_waiter_hears() {
    let Some(db) = postgres("a_charge_postgres_never_answers_is_kept") else {
        return;
    };
    let spill = TempDir::new("spill");
    let mut proxy = Proxy::start(0).await;
    let url = db.url().replace(":5432/", &format!(":{}/", proxy.port));
    let store = open_with(config_spilling(&url, &spill)).await;
    let key = make_key(&store, "silent", NewKey::new("silent", usd("1")));
    let hold = money_hold("0.01");
    Ledger::reserve(&*store, &key, hold).await.unwrap();
    // No error, no closed connection: PostgreSQL just never answers.
    proxy.freeze();
    let waiting = store.settle(settlement(&key.id, "unanswered", usd("0.002"), hold, 0));
    let err = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiter hears within seconds")
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    let files = spill_files(&spill);
    assert_eq!(files.len(), 1);
    assert!(files[0].1.contains("\"id\":\"unanswered\""), "{files:?}");
    tokio::task::spawn_blocking(move || store.crash())
        .await
        .unwrap();
    proxy.cut().await;

    let next = open_with(config_spilling(db.url(), &spill)).await;
    let (n, id) = (next.clone(), key.id.clone());
    let spent = tokio::task::spawn_blocking(move || spent_of(&n, &id))
        .await
        .unwrap();
    assert_eq!(spent, usd("0.002"));
    assert!(spill_files(&spill).is_empty());
}

/// A recorded settlement (SPEC §8.2) PostgreSQL could not commit is spilled WITH its
/// record: after a crash, the replay commits both in one statement, never the charge
/// without the answer a repeat would replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spilled_recorded_charge_is_replayed_with_its_record() {
    let Some(db) = postgres("a_spilled_recorded_charge_is_replayed_with_its_record") else {
        return;
    };
    let spill = TempDir::new("spill-idem");
    let mut proxy = Proxy::start(0).await;
    let url = db.url().replace(":5432/", &format!(":{}/", proxy.port));
    let store = open_with(config_spilling(&url, &spill)).await;
    let key = make_key(&store, "idem", NewKey::new("idem", usd("1")));
    let hold = money_hold("0.01");
    Ledger::reserve(&*store, &key, hold).await.unwrap();
    let record = crate::store::IdempotencyRecord {
        key_id: key.id.clone(),
        idem_key: "order-77".into(),
        fingerprint: [9; 32],
        status: 200,
        headers: vec![("x-request-id".into(), "recorded-1".into())],
        body: bytes::Bytes::from_static(b"{\"answer\":42}"),
        created: 1_000,
        expires: u64::MAX / 4,
    };
    proxy.cut().await;
    let err = store
        .settle_recorded(
            settlement(&key.id, "recorded-1", usd("0.004"), hold, 7),
            record.clone(),
        )
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    let files = spill_files(&spill);
    assert_eq!(files.len(), 1);
    assert!(files[0].1.contains("\"record\":{"), "{}", files[0].1);
    tokio::task::spawn_blocking(move || store.crash())
        .await
        .unwrap();

    let _proxy = Proxy::start(proxy.port).await;
    let next = open_with(config_spilling(&url, &spill)).await;
    let (n, id) = (next.clone(), key.id.clone());
    let spent = tokio::task::spawn_blocking(move || spent_of(&n, &id))
        .await
        .unwrap();
    assert_eq!(spent, usd("0.004"));
    let found = next
        .idempotency_record(&key.id, "order-77", 2_000)
        .await
        .unwrap();
    assert_eq!(found, Some(record));
    assert!(spill_files(&spill).is_empty());
}
