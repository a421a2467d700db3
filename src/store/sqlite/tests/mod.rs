//! Tests of the SQLite store (the ledger's bounds and its property test are in
//! `bounds.rs`).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rusqlite::{params, Connection};

use super::checkpoint::*;
use super::commit::*;
use super::journal::Entry;
use super::schema::*;
use super::writer::*;
use super::*;
use crate::config::{KeyConfig, StoreConfig, SyncMode};
use crate::money::{Money, MAX_CHARGE, MAX_CREDITS, MAX_SPENT};
use crate::store::*;

mod bounds;
mod idempotency;
mod periods;

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn file_store(dir: &Path) -> Arc<SqliteStore> {
    SqliteStore::open(&StoreConfig {
        url: format!("sqlite://{}", dir.join("ledger.db").display()),
        sync: SyncMode::Normal,
        ..Default::default()
    })
    .unwrap()
}

fn file_store_at(path: &Path) -> Arc<SqliteStore> {
    SqliteStore::open(&StoreConfig {
        url: format!("sqlite://{}", path.display()),
        sync: SyncMode::Normal,
        ..Default::default()
    })
    .unwrap()
}

fn temp_dir() -> PathBuf {
    let r: u64 = rand::random();
    let d = std::env::temp_dir().join(format!("switchboard-unit-{}-{r:016x}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn settlement(key_id: &str, id: &str, cost: &str, reserved: &str) -> Settlement {
    Settlement {
        key_id: key_id.into(),
        reserved: usd(reserved).into(),
        tokens: 10,
        generation: Generation {
            id: id.into(),
            key_id: key_id.into(),
            model: "m/x".into(),
            provider: "p".into(),
            streamed: false,
            prompt_tokens: 4,
            completion_tokens: 6,
            total_cost: usd(cost),
            latency_ms: 12,
            ttft_ms: Some(3),
            attempts: vec![GenerationAttempt {
                provider: "p".into(),
                status: "200".into(),
                latency_ms: 3,
            }],
            finish_reason: Some("stop".into()),
            created: 1,
            ..Default::default()
        },
    }
}

fn bootstrap_key(secret: &str, credits: &str, rpm: Option<u32>) -> KeyConfig {
    KeyConfig {
        secret: secret.into(),
        name: Some("boot".into()),
        credits_usd: usd(credits),
        limit_usd: None,
        rpm,
        tokens_per_day: None,
        models: None,
        limit_reset: None,
        expires_at: None,
        labels: Default::default(),
    }
}

fn entry(settlement: Settlement) -> Arc<Entry> {
    Arc::new(Entry {
        settlement,
        day: utc_day(),
        record: None,
    })
}

#[test]
fn one_batch_of_many_keys_charges_each_key_its_own_sum_once() {
    let dir = temp_dir();
    let path = dir.join("batch.db");
    let mut conn = open_conn(&path, SyncMode::Normal).unwrap();
    prepare_schema(&mut conn, &path).unwrap();
    for k in ["ka", "kb"] {
        conn.execute(
            "INSERT INTO keys (id, secret_sha256, name, created, credits_pico) VALUES (?1, ?2, ?1, 0, 0)",
            params![k, k.as_bytes()],
        )
        .unwrap();
    }
    let batch = [
        settlement("ka", "gen-1", "0.25", "1"),
        settlement("kb", "gen-2", "0.5", "1"),
        settlement("ka", "gen-3", "0.125", "1"),
        settlement("ka", "gen-1", "0.25", "1"), // a repeat: not charged again
    ];
    let refs: Vec<Arc<Entry>> = batch.into_iter().map(entry).collect();
    assert_eq!(commit(&mut conn, &refs).unwrap(), [true, true, true, false]);
    let spent = |c: &Connection, k: &str| -> i64 {
        c.query_row("SELECT spent_pico FROM keys WHERE id = ?1", [k], |r| {
            r.get(0)
        })
        .unwrap()
    };
    let tokens = |c: &Connection, k: &str| -> i64 {
        c.query_row(
            "SELECT tokens FROM daily_tokens WHERE key_id = ?1",
            [k],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(spent(&conn, "ka"), usd("0.375").pico());
    assert_eq!(spent(&conn, "kb"), usd("0.5").pico());
    assert_eq!((tokens(&conn, "ka"), tokens(&conn, "kb")), (20, 10));
    // A second batch adds to what the first wrote.
    let again = [settlement("kb", "gen-4", "0.5", "1")];
    let refs: Vec<Arc<Entry>> = again.into_iter().map(entry).collect();
    assert_eq!(commit(&mut conn, &refs).unwrap(), [true]);
    assert_eq!(spent(&conn, "kb"), usd("1").pico());
    assert_eq!(tokens(&conn, "kb"), 20);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_wal_starts_over_while_commits_never_stop() {
    let dir = temp_dir();
    let path = dir.join("wal.db");
    let mut conn = open_conn(&path, SyncMode::Normal).unwrap();
    prepare_schema(&mut conn, &path).unwrap();
    conn.execute_batch("PRAGMA wal_autocheckpoint=0;").unwrap();
    conn.execute(
        "INSERT INTO keys (id, secret_sha256, name, created, credits_pico) VALUES ('k', x'00', 'k', 0, 0)",
        [],
    )
    .unwrap();
    let writer = Arc::new(WriterConn::new(conn));
    let checkpointer = Checkpointer {
        conn: open_conn(&path, SyncMode::Normal).unwrap(),
        writer: writer.clone(),
    };
    let settle = |n: usize| {
        let s = settlement("k", &format!("gen-{n:08}"), "0.001", "0.001");
        commit_fair(&writer, &[entry(s)]).unwrap();
    };
    // A WAL past the restart threshold (each commit writes at least one frame;
    // nothing has checkpointed yet), then a committer that never pauses.
    let n = 2 * RESTART_FRAMES as usize;
    for i in 0..n {
        settle(i);
    }
    let wal_len = std::fs::metadata(dir.join("wal.db-wal")).unwrap().len();
    let before = ((wal_len - 32) / (24 + 4096)) as i64;
    assert!(before >= 2 * RESTART_FRAMES, "{before} frames");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let committer = std::thread::spawn({
        let (writer, stop) = (writer.clone(), stop.clone());
        move || {
            let mut m = 0;
            while !stop.load(Ordering::Relaxed) {
                let s = settlement("k", &format!("gen-bg-{m:08}"), "0.001", "0.001");
                commit_fair(&writer, &[entry(s)]).unwrap();
                m += 1;
            }
            m
        }
    });
    // The first commit after the paused pass starts the WAL over: only the
    // frames since then are in it (passive passes alone never get there). The
    // first commit can still find the WAL in use and miss the restart (the
    // checkpointer runs again on its period), so the WAL must start over within
    // two checkpoints, not necessarily the first. (Until `passive` retried a
    // pass that could not start, this failed about once in 40 runs beside two
    // busy loops: the first checkpoint's first pass met a commit mid-update,
    // reported -1 frames and gave up.)
    //
    // Each pass is followed by a settlement of its own (a new id): a repeated one
    // is ignored and writes no frame, so it could not start the WAL over.
    let (mut after, mut passes) = (i64::MAX, 0);
    while passes < 2 {
        checkpointer.checkpoint();
        settle(n + passes);
        passes += 1;
        after = checkpointer.passive().unwrap().0;
        if after < before {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let background = committer.join().unwrap();
    assert!(
        after < before,
        "the WAL did not start over: {before} frames before the checkpoint, {after} after ({background} commits meanwhile)"
    );
    let spent: i64 = writer
        .lock()
        .query_row("SELECT spent_pico FROM keys WHERE id = 'k'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(
        spent,
        (n + passes + background) as i64 * usd("0.001").pico()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn settling_twice_charges_once_and_survives_a_reopen() {
    let dir = temp_dir();
    let store = file_store(&dir);
    let k = store
        .create(hash_secret("sk-one-1"), NewKey::new("one", usd("1")))
        .unwrap();
    let id = k.record.id.clone();
    store.reserve(&k.record, usd("0.5").into()).unwrap();
    store.reserve(&k.record, usd("0.5").into()).unwrap();
    assert!(store
        .settle(settlement(&id, "gen-a", "0.25", "0.5"))
        .await
        .unwrap());
    // The same request id again: no second charge (but its reservation goes).
    assert!(!store
        .settle(settlement(&id, "gen-a", "0.25", "0.5"))
        .await
        .unwrap());
    let b = store.balance(&id).unwrap();
    assert_eq!((b.spent, b.reserved), (usd("0.25"), Money::ZERO));
    assert_eq!(store.tokens_today(&id).unwrap(), 10);
    // Once in SQLite, a repeat is recognised from the recent ids (and SQLite).
    store.flush().await;
    assert!(!store
        .settle(settlement(&id, "gen-a", "0.25", "0"))
        .await
        .unwrap());
    drop(store);

    let again = file_store(&dir);
    let b = again.balance(&id).unwrap();
    assert_eq!((b.credits, b.spent), (usd("1"), usd("0.25")));
    assert_eq!(again.tokens_today(&id).unwrap(), 10);
    let g = again.generation("gen-a").unwrap().unwrap();
    assert_eq!(g.total_cost, usd("0.25"));
    assert_eq!(g.attempts[0].status, "200");
    assert_eq!(g.key_id, id);
    // A repeat older than the recent ids (here: from before the reopen) resolves
    // as charged, and the applier takes it back: still one charge.
    assert!(again
        .settle(settlement(&id, "gen-a", "0.25", "0"))
        .await
        .unwrap());
    again.flush().await;
    let b = again.balance(&id).unwrap();
    assert_eq!(b.spent, usd("0.25"));
    assert_eq!(again.tokens_today(&id).unwrap(), 10);
    let in_file: i64 = open_conn(&dir.join("ledger.db"), SyncMode::Normal)
        .unwrap()
        .query_row("SELECT spent_pico FROM keys WHERE id = ?1", [&id], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(in_file, usd("0.25").pico());
    drop(again);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn bootstrap_keys_keep_what_they_spent_and_take_new_limits() {
    let dir = temp_dir();
    let store = file_store(&dir);
    store
        .bootstrap(&[bootstrap_key("sk-boot-1", "5", None)])
        .unwrap();
    let rec = store.find(&hash_secret("sk-boot-1")).unwrap().unwrap();
    store.reserve(&rec, usd("1").into()).unwrap();
    store
        .settle(settlement(&rec.id, "gen-b", "1", "1"))
        .await
        .unwrap();
    drop(store);

    // Restart with changed credits and an rpm: credits are granted once only.
    let store = file_store(&dir);
    store
        .bootstrap(&[bootstrap_key("sk-boot-1", "100", Some(7))])
        .unwrap();
    let again = store.find(&hash_secret("sk-boot-1")).unwrap().unwrap();
    assert_eq!(again.id, rec.id);
    assert_eq!(again.rpm, Some(7));
    let b = store.balance(&rec.id).unwrap();
    assert_eq!((b.credits, b.spent), (usd("5"), usd("1")));
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bootstrap_keys_carry_their_labels_and_take_changed_ones() {
    let dir = temp_dir();
    let store = file_store(&dir);
    let mut key = bootstrap_key("sk-boot-labels-1", "5", None);
    key.labels = [("team".to_string(), "search".to_string())].into();
    store.bootstrap(std::slice::from_ref(&key)).unwrap();
    let rec = store
        .find(&hash_secret("sk-boot-labels-1"))
        .unwrap()
        .unwrap();
    assert_eq!(rec.labels, key.labels);
    key.labels = [("team".to_string(), "ads".to_string())].into();
    store.bootstrap(&[key.clone()]).unwrap();
    let again = store
        .find(&hash_secret("sk-boot-labels-1"))
        .unwrap()
        .unwrap();
    assert_eq!(
        (again.id.as_str(), &again.labels),
        (rec.id.as_str(), &key.labels)
    );
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_top_up_by_another_process_counts_before_a_refusal() {
    let dir = temp_dir();
    let gateway = file_store(&dir);
    let k = gateway
        .create(hash_secret("sk-two-2"), NewKey::new("two", usd("0.1")))
        .unwrap();
    gateway.reserve(&k.record, usd("0.1").into()).unwrap();
    assert!(gateway.reserve(&k.record, usd("0.1").into()).is_err());
    // The CLI opens the same file and tops up.
    let cli = file_store(&dir);
    cli.top_up(&k.record.id, usd("0.1")).unwrap().unwrap();
    drop(cli);
    gateway.reserve(&k.record, usd("0.1").into()).unwrap();
    assert_eq!(gateway.balance(&k.record.id).unwrap().credits, usd("0.2"));
    // A top-up through this ledger counts at once.
    gateway.top_up(&k.record.id, usd("1")).unwrap().unwrap();
    assert_eq!(gateway.balance(&k.record.id).unwrap().available(), usd("1"));
    drop(gateway);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn secrets_never_reach_the_database_file() {
    let dir = temp_dir();
    let store = file_store(&dir);
    store
        .bootstrap(&[bootstrap_key("sk-bootstrap-secret-XYZ", "1", None)])
        .unwrap();
    store
        .create(
            hash_secret("sk-created-secret-QQQ"),
            NewKey::new("c", usd("1")),
        )
        .unwrap();
    let rec = store
        .find(&hash_secret("sk-created-secret-QQQ"))
        .unwrap()
        .unwrap();
    store.reserve(&rec, usd("0.1").into()).unwrap();
    store
        .settle(settlement(&rec.id, "gen-c", "0.1", "0.1"))
        .await
        .unwrap();
    let scan = || {
        for entry in std::fs::read_dir(&dir).unwrap() {
            // The WAL may vanish as the last connection (the checkpointer) closes.
            let Ok(bytes) = std::fs::read(entry.unwrap().path()) else {
                continue;
            };
            for secret in ["sk-bootstrap-secret-XYZ", "sk-created-secret-QQQ"] {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret} found in the store"
                );
            }
        }
    };
    scan(); // open: the database, its WAL and shared memory
    drop(store);
    scan(); // closed and checkpointed
    let _ = std::fs::remove_dir_all(dir);
}

/// A store with one key holding $1, and a reservation of `reserved` on it.
fn store_with_reservation(
    dir: &Path,
    sync: SyncMode,
    reserved: &str,
) -> (Arc<SqliteStore>, String) {
    let store = SqliteStore::open(&StoreConfig {
        url: format!("sqlite://{}", dir.join("turns.db").display()),
        sync,
        ..Default::default()
    })
    .unwrap();
    let k = store
        .create(hash_secret("sk-turns-1"), NewKey::new("turns", usd("1")))
        .unwrap();
    store.reserve(&k.record, usd(reserved).into()).unwrap();
    (store, k.record.id)
}

/// Polls `f` to its end on this thread, outside any runtime.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

fn spent_in_file(dir: &Path, key_id: &str) -> i64 {
    let c = open_conn(&dir.join("turns.db"), SyncMode::Normal).unwrap();
    c.query_row("SELECT spent_pico FROM keys WHERE id = ?1", [key_id], |r| {
        r.get(0)
    })
    .unwrap()
}

/// The journal's lines (without a mapped journal's reserved NUL tail).
fn journal_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("turns.db-ledger"))
        .unwrap_or_default()
        .replace('\0', "")
}

#[tokio::test(flavor = "current_thread")]
async fn a_settlement_is_journaled_before_it_resolves_and_in_sqlite_after_a_flush() {
    let dir = temp_dir();
    let (store, id) = store_with_reservation(&dir, SyncMode::Normal, "0.5");
    assert!(store.writer.on_runtime);
    assert!(store
        .settle(settlement(&id, "gen-rt", "0.25", "0.5"))
        .await
        .unwrap());
    let handoffs = store.writer.handoffs.load(Ordering::Relaxed);
    assert_eq!(handoffs, 0, "journaled on the runtime");
    // Durable once resolved: the line is in the file, whatever SQLite has yet.
    assert!(journal_text(&dir).contains("\"id\":\"gen-rt\""));
    let b = store.balance(&id).unwrap();
    assert_eq!((b.spent, b.reserved), (usd("0.25"), Money::ZERO));
    assert_eq!(store.get(&id).unwrap().unwrap().spent, usd("0.25"));
    assert_eq!(
        store.generation("gen-rt").unwrap().unwrap().total_cost,
        usd("0.25")
    );
    store.flush().await;
    // Another connection (another process, say) sees it once applied; the
    // journal started over, in the file made ready for it, and the applier made
    // the next one ready.
    assert_eq!(spent_in_file(&dir, &id), usd("0.25").pico());
    assert!(!journal_text(&dir).contains("gen-rt"));
    assert!(dir.join("turns.db-ledger.next").exists());
    {
        let j = store.writer.journal.as_ref().unwrap().lock();
        assert!(j.spare.is_some());
        assert_eq!(j.file.is_mapped(), cfg!(target_os = "linux"));
    }
    assert!(store
        .writer
        .journal
        .as_ref()
        .unwrap()
        .lock()
        .pending
        .is_empty());
    // The applied journal was emptied to be the next one: nothing of it is left
    // to find, and the next turn's journal (it) holds only that turn's line.
    let next = std::fs::read(dir.join("turns.db-ledger.next")).unwrap();
    assert!(next.iter().all(|&b| b == 0), "emptied for reuse");
    for (g, then) in [("gen-rt2", "gen-rt"), ("gen-rt3", "gen-rt2")] {
        let s = settlement(&id, g, "0.125", "0");
        assert!(store.settle(s).await.unwrap());
        assert!(journal_text(&dir).contains(g));
        assert!(!journal_text(&dir).contains(&format!("\"{then}\"")));
        store.flush().await;
    }
    assert_eq!(spent_in_file(&dir, &id), usd("0.5").pico());
    drop(store);
    assert!(!dir.join("turns.db-ledger").exists(), "removed when empty");
    assert!(!dir.join("turns.db-ledger.next").exists(), "removed");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn an_idle_writer_journals_in_the_caller_and_a_busy_one_in_a_task() {
    use futures_util::FutureExt;
    let dir = temp_dir();
    let (store, id) = store_with_reservation(&dir, SyncMode::Normal, "1");
    // Not idle yet (nothing was appended): the turn is a task, so nothing is
    // journaled until this task yields.
    let first = store.settle(settlement(&id, "gen-task", "0.25", "0.5"));
    assert!(!journal_text(&dir).contains("gen-task"));
    assert!(first.await.unwrap());
    // The task looks for more once (after one more yield), then gives the turn back.
    tokio::task::yield_now().await;
    assert!(!store.writer.queue.lock().turn_out);
    // Idle for longer than QUIET: the caller appends before `settle` returns.
    std::thread::sleep(QUIET * 2);
    let second = store.settle(settlement(&id, "gen-here", "0.25", "0.5"));
    assert!(journal_text(&dir).contains("\"id\":\"gen-here\""));
    assert_eq!(second.now_or_never().map(Result::unwrap), Some(true));
    assert_eq!(store.balance(&id).unwrap().spent, usd("0.5"));
    // A duplicate is answered as one, inline too, and charges nothing more.
    std::thread::sleep(QUIET * 2);
    let again = store.settle(settlement(&id, "gen-here", "0.25", "0.5"));
    assert_eq!(again.now_or_never().map(Result::unwrap), Some(false));
    assert_eq!(store.writer.handoffs.load(Ordering::Relaxed), 0);
    store.flush().await;
    assert_eq!(spent_in_file(&dir, &id), usd("0.5").pico());
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn another_connections_write_lock_never_holds_up_a_settlement() {
    let dir = temp_dir();
    let (store, id) = store_with_reservation(&dir, SyncMode::Normal, "0.5");
    // Administration (or the CLI) holds the database's write lock.
    let other = open_conn(&dir.join("turns.db"), SyncMode::Normal).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    // This runtime has one thread: were the settlement to wait for the lock (up
    // to the 10 s busy timeout), this would time out.
    let settled = tokio::time::timeout(
        BUSY_TIMEOUT / 2,
        store.settle(settlement(&id, "gen-busy", "0.25", "0.5")),
    )
    .await
    .expect("settled while SQLite was locked");
    assert!(settled.unwrap());
    assert_eq!(store.writer.handoffs.load(Ordering::Relaxed), 0);
    assert_eq!(store.balance(&id).unwrap().spent, usd("0.25"));
    // The applier waits for the lock, then commits.
    let flushed = tokio::spawn(store.flush());
    other.execute_batch("COMMIT").unwrap();
    flushed.await.unwrap();
    assert_eq!(spent_in_file(&dir, &id), usd("0.25").pico());
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

// The lock is held across awaits on purpose: it stands for the checkpointer's.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "current_thread")]
async fn the_checkpointers_pause_never_holds_up_a_settlement() {
    let dir = temp_dir();
    let (store, id) = store_with_reservation(&dir, SyncMode::Normal, "0.5");
    let paused = store.writer.conn.lock(); // as the checkpointer's last pass does
    let settled = tokio::time::timeout(
        BUSY_TIMEOUT / 2,
        store.settle(settlement(&id, "gen-ckpt", "0.25", "0.5")),
    )
    .await
    .expect("settled while commits to SQLite were paused");
    assert!(settled.unwrap());
    assert_eq!(store.writer.handoffs.load(Ordering::Relaxed), 0);
    drop(paused);
    store.flush().await;
    assert_eq!(spent_in_file(&dir, &id), usd("0.25").pico());
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn a_crash_before_sqlite_has_them_loses_no_settlement_and_replay_charges_each_once() {
    let dir = temp_dir();
    let (store, id) = store_with_reservation(&dir, SyncMode::Normal, "1");
    // gen-a reaches SQLite; then the applier stops, as in a crash.
    assert!(store
        .settle(settlement(&id, "gen-a", "0.125", "0.25"))
        .await
        .unwrap());
    store.flush().await;
    store.writer.apply_paused.store(true, Ordering::SeqCst);
    for g in ["gen-b", "gen-c"] {
        assert!(store
            .settle(settlement(&id, g, "0.125", "0.25"))
            .await
            .unwrap());
    }
    assert!(!store
        .settle(settlement(&id, "gen-b", "0.125", "0"))
        .await
        .unwrap());
    assert_eq!(spent_in_file(&dir, &id), usd("0.125").pico());
    drop(store);
    // The process died while applying (gen-b and gen-c moved aside) and after
    // it had journaled gen-a again (in SQLite already) and gen-d, and in the
    // middle of writing another line (never answered).
    let journal = dir.join("turns.db-ledger");
    std::fs::rename(&journal, dir.join("turns.db-ledger.applying")).unwrap();
    let mut lines = Vec::new();
    for (g, cost) in [("gen-a", "0.125"), ("gen-d", "0.0625")] {
        let mut s = settlement(&id, g, cost, "0.25");
        s.key_id = id.clone();
        entry(s).write_line(&mut lines);
    }
    lines.extend_from_slice(b"{\"id\":\"gen-e\",\"key\":\"");
    std::fs::write(&journal, &lines).unwrap();

    let reopened = file_store_at(&dir.join("turns.db"));
    assert!(reopened.owns_ledger());
    let expected = usd("0.125") + usd("0.125") + usd("0.125") + usd("0.0625");
    assert_eq!(spent_in_file(&dir, &id), expected.pico());
    assert_eq!(reopened.balance(&id).unwrap().spent, expected);
    assert_eq!(reopened.tokens_today(&id).unwrap(), 40);
    assert!(reopened.generation("gen-d").unwrap().is_some());
    assert!(reopened.generation("gen-e").unwrap().is_none());
    assert!(!dir.join("turns.db-ledger.applying").exists());
    assert_eq!(journal_text(&dir), "");
    drop(reopened);
    // Replayed once: opening again charges nothing more.
    let again = file_store_at(&dir.join("turns.db"));
    assert_eq!(again.balance(&id).unwrap().spent, expected);
    drop(again);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn a_second_store_on_the_same_file_administers_keys_but_cannot_settle() {
    let dir = temp_dir();
    let (owner, id) = store_with_reservation(&dir, SyncMode::Normal, "0.5");
    let second = file_store_at(&dir.join("turns.db"));
    assert!(owner.owns_ledger());
    assert!(!second.owns_ledger());
    second.top_up(&id, usd("1")).unwrap().unwrap();
    let refused = second
        .settle(settlement(&id, "gen-second", "0.25", "0"))
        .await
        .unwrap_err();
    assert!(refused.0.contains("another process owns"), "{refused}");
    assert!(second.generation("gen-second").unwrap().is_none());
    // The owner's settlement goes through; the second store's did not count.
    assert!(owner
        .settle(settlement(&id, "gen-own", "0.25", "0.5"))
        .await
        .unwrap());
    owner.flush().await;
    assert_eq!(spent_in_file(&dir, &id), usd("0.25").pico());
    drop(second);
    drop(owner);
    // Once the owner is gone, the next store to open takes the ledger.
    assert!(file_store_at(&dir.join("turns.db")).owns_ledger());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_settlement_queued_as_its_runtime_shuts_down_is_committed_all_the_same() {
    let dir = temp_dir();
    let (store, id) = store_with_reservation(&dir, SyncMode::Normal, "0.5");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // A stream cut as the runtime stops: its turn is spawned, never polled, and
    // dropped with the runtime; the writer thread takes the turn over.
    rt.block_on(async { store.settle_detached(settlement(&id, "gen-shut", "0.25", "0.5")) });
    assert_eq!(store.writer.handoffs.load(Ordering::Relaxed), 0);
    drop(rt);
    assert_eq!(store.writer.handoffs.load(Ordering::Relaxed), 1);
    // No runtime here: the flush goes through the thread, behind the settlement.
    block_on(store.flush());
    let b = store.balance(&id).unwrap();
    assert_eq!((b.spent, b.reserved), (usd("0.25"), Money::ZERO));
    assert_eq!(spent_in_file(&dir, &id), usd("0.25").pico());
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn with_sync_full_every_append_is_the_threads() {
    let dir = temp_dir();
    let (store, id) = store_with_reservation(&dir, SyncMode::Full, "0.5");
    assert!(!store.writer.on_runtime);
    assert!(store
        .settle(settlement(&id, "gen-full", "0.25", "0.5"))
        .await
        .unwrap());
    assert_eq!(store.writer.handoffs.load(Ordering::Relaxed), 1);
    assert!(journal_text(&dir).contains("\"id\":\"gen-full\""));
    store.flush().await;
    assert_eq!(spent_in_file(&dir, &id), usd("0.25").pico());
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_settlements_on_two_workers_charge_each_exactly_once() {
    let dir = temp_dir();
    let (store, id) = store_with_reservation(&dir, SyncMode::Normal, "0");
    let record = store.get(&id).unwrap().unwrap().record;
    let n = 400;
    for _ in 0..n {
        store.reserve(&record, usd("0.001").into()).unwrap();
    }
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let store = store.clone();
            let id = id.clone();
            tokio::spawn(async move {
                // Every request id twice, racing: one charge each.
                let a = store.settle(settlement(&id, &format!("gen-{i:04}"), "0.001", "0.001"));
                let b = store.settle(settlement(&id, &format!("gen-{i:04}"), "0.001", "0"));
                let (a, b) = tokio::join!(a, b);
                a.unwrap() as u32 + b.unwrap() as u32
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 1);
    }
    let b = store.balance(&id).unwrap();
    assert_eq!((b.spent, b.reserved), (usd("0.4"), Money::ZERO));
    store.flush().await;
    assert_eq!(spent_in_file(&dir, &id), usd("0.4").pico());
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

/// Settlement latency at low load: one waiter settling one request at a time, the
/// cost each request pays before its last byte when no batch forms (run with
/// `taskset -c 1 cargo test --release --lib -- --ignored ledger_latency --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore]
async fn ledger_latency() {
    let dir = temp_dir();
    let store = file_store(&dir);
    let k = store
        .create(hash_secret("sk-latency"), NewKey::new("lat", usd("1000")))
        .unwrap();
    let n = 5000;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        store.reserve(&k.record, usd("0.001").into()).unwrap();
        let s = settlement(&k.record.id, &format!("gen-{i:06}"), "0.0005", "0.001");
        let t0 = std::time::Instant::now();
        assert!(store.settle(s).await.unwrap());
        times.push(t0.elapsed().as_nanos() as u64);
    }
    times.sort_unstable();
    let pct = |p: f64| times[((n - 1) as f64 * p) as usize] as f64 / 1000.0;
    println!(
        "ledger_latency: {n} sequential settlements: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs",
        pct(0.5),
        pct(0.9),
        pct(0.99)
    );
    let b = store.balance(&k.record.id).unwrap();
    assert_eq!(b.reserved, Money::ZERO);
    assert_eq!(b.spent, Money::from_pico(n as i64 * 500_000_000));
    let _ = std::fs::remove_dir_all(dir);
}

/// The applier's cost per settlement row, by batch size (release build:
/// `cargo test --release --lib -- --ignored settlement_rows_throughput --nocapture`).
#[test]
#[ignore]
fn settlement_rows_throughput() {
    for batch in [10, 50, 300] {
        let dir = temp_dir();
        let (store, id) = store_with_reservation(&dir, SyncMode::Normal, "0");
        let mut conn = open_conn(&dir.join("turns.db"), SyncMode::Normal).unwrap();
        let n = 60_000;
        let entries: Vec<Arc<Entry>> = (0..n)
            .map(|i| {
                Arc::new(Entry {
                    settlement: settlement(&id, &format!("gen-{i:08}"), "0.000001", "0"),
                    day: 1,
                    record: None,
                })
            })
            .collect();
        let started = std::time::Instant::now();
        for chunk in entries.chunks(batch) {
            assert!(commit(&mut conn, chunk).unwrap().iter().all(|new| *new));
        }
        let per_row = started.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!("settlement_rows_throughput batch={batch}: {per_row:.2} µs per row");
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Settled writes per second through the group-commit writer (run on demand:
/// `cargo test --lib -- --ignored ledger_throughput --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn ledger_throughput() {
    let dir = temp_dir();
    for sync in [SyncMode::Normal, SyncMode::Full] {
        let store = SqliteStore::open(&StoreConfig {
            url: format!("sqlite://{}", dir.join(format!("{sync:?}.db")).display()),
            sync,
            ..Default::default()
        })
        .unwrap();
        let k = store
            .create(
                hash_secret(&format!("sk-tp-{sync:?}")),
                NewKey::new("tp", usd("1000")),
            )
            .unwrap();
        let (tasks, per_task) = (64, 200);
        for _ in 0..tasks * per_task {
            store.reserve(&k.record, usd("0.001").into()).unwrap();
        }
        let started = std::time::Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let store = store.clone();
                let id = k.record.id.clone();
                tokio::spawn(async move {
                    for i in 0..per_task {
                        let s = settlement(&id, &format!("gen-{t}-{i}"), "0.0005", "0.001");
                        assert!(store.settle(s).await.unwrap());
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        let n = tasks * per_task;
        println!(
            "ledger_throughput sync={sync:?}: {n} settlements by {tasks} concurrent waiters in {secs:.2}s = {:.0}/s",
            n as f64 / secs
        );
        let b = store.balance(&k.record.id).unwrap();
        assert_eq!(b.reserved, Money::ZERO);
        assert_eq!(b.spent, Money::from_pico(n as i64 * 500_000_000));
    }
    let _ = std::fs::remove_dir_all(dir);
}
