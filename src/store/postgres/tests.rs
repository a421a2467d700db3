//! PgStore against a real PostgreSQL (a private database per test, see
//! [`crate::testing::postgres`]): two or more stores on one database are two or more
//! instances of one gateway.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::error::GatewayError;
use crate::store::{hash_secret, GenerationAttempt};
use crate::testing::{postgres, TestDb};

pub(super) fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

/// The spill dir of the tests that do not look at it: one for all of them, never the
/// working directory (a spill file is only replayed into its own database).
fn shared_spill_dir() -> String {
    std::env::temp_dir()
        .join("switchboard-pg-spill")
        .display()
        .to_string()
}

pub(super) fn config(url: &str, ttl: u64) -> StoreConfig {
    StoreConfig {
        url: url.into(),
        reservation_ttl_secs: ttl,
        pool_size: 8,
        spill_dir: shared_spill_dir(),
        ..Default::default()
    }
}

fn open(db: &TestDb, ttl: u64) -> Arc<PgStore> {
    PgStore::open(&config(db.url(), ttl)).unwrap()
}

pub(super) fn make_key(store: &PgStore, name: &str, new: NewKey) -> KeyRecord {
    store
        .create(hash_secret(&format!("sk-{name}-0123456789abcdef")), new)
        .unwrap()
        .record
}

pub(super) fn money_hold(usd_text: &str) -> Reservation {
    usd(usd_text).into()
}

pub(super) fn settlement(
    key_id: &str,
    id: &str,
    cost: Money,
    reserved: Reservation,
    tokens: u64,
) -> Settlement {
    Settlement {
        key_id: key_id.into(),
        reserved,
        tokens,
        generation: Generation {
            id: id.into(),
            key_id: key_id.into(),
            model: "mock/echo".into(),
            provider: "mock".into(),
            streamed: false,
            prompt_tokens: tokens / 2,
            completion_tokens: tokens - tokens / 2,
            total_cost: cost,
            latency_ms: 12,
            ttft_ms: Some(3),
            attempts: vec![GenerationAttempt {
                provider: "mock".into(),
                status: "200".into(),
                latency_ms: 11,
            }],
            finish_reason: Some("stop".into()),
            created: 1_700_000_000,
            ..Default::default()
        },
    }
}

/// What PostgreSQL says a key spent.
pub(super) fn spent_of(store: &PgStore, key_id: &str) -> Money {
    store.get(key_id).unwrap().unwrap().spent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_spend_more_than_the_credits_and_charge_each_request_once() {
    let Some(db) = postgres("two_instances_never_spend_more_than_the_credits") else {
        return;
    };
    let (a, b) = (open(&db, 30), open(&db, 30));
    // Room for about five holds of $0.01.
    let key = make_key(&a, "few", NewKey::new("few", usd("0.05")));
    let hold = money_hold("0.01");
    let charged = Arc::new(std::sync::Mutex::new(Vec::<Money>::new()));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let store = if worker % 2 == 0 {
            a.clone()
        } else {
            b.clone()
        };
        let (key, charged, refused) = (key.clone(), charged.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..12 {
                match Ledger::reserve(&*store, &key, hold).await {
                    Ok(()) => {
                        // Each charge a few pico-dollars under its hold (and each
                        // one different): a sixth admission would overspend.
                        let cost = hold.amount - Money::from_pico(1 + (worker * 12 + n) as i64);
                        assert!(cost <= hold.amount);
                        let id = format!("req-{worker}-{n}");
                        if store
                            .settle(settlement(&key.id, &id, cost, hold, 0))
                            .await
                            .unwrap()
                        {
                            charged.lock().unwrap().push(cost);
                        }
                    }
                    Err(e) => {
                        assert_eq!(e.code(), "insufficient_credits", "{e}");
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    a.flush().await;
    b.flush().await;
    let charged = charged.lock().unwrap().clone();
    let sum = charged.iter().fold(Money::ZERO, |s, c| s + *c);
    let (a2, id) = (a.clone(), key.id.clone());
    let spent = tokio::task::spawn_blocking(move || spent_of(&a2, &id))
        .await
        .unwrap();
    assert_eq!(
        spent, sum,
        "spent is the sum of every charge, to the pico-dollar"
    );
    assert!(spent <= usd("0.05"), "spent {spent} past the credits");
    assert_eq!(
        charged.len(),
        5,
        "every hold that fits is admitted, and no more"
    );
    assert!(refused.load(Ordering::Relaxed) > 0);

    // The same request id settled on both instances: charged once.
    let top = usd("1");
    let (a2, id) = (a.clone(), key.id.clone());
    tokio::task::spawn_blocking(move || a2.top_up(&id, top).unwrap())
        .await
        .unwrap();
    Ledger::reserve(&*a, &key, hold).await.unwrap();
    Ledger::reserve(&*b, &key, hold).await.unwrap();
    let cost = usd("0.003");
    let (x, y) = tokio::join!(
        a.settle(settlement(&key.id, "req-twice", cost, hold, 0)),
        b.settle(settlement(&key.id, "req-twice", cost, hold, 0))
    );
    assert!(x.unwrap() ^ y.unwrap(), "exactly one of the two charged");
    let (a2, id) = (a.clone(), key.id.clone());
    let after = tokio::task::spawn_blocking(move || spent_of(&a2, &id))
        .await
        .unwrap();
    assert_eq!(after, spent + cost);
    // Both holds are released either way.
    let (a2, b2, id) = (a.clone(), b.clone(), key.id.clone());
    let (ra, rb) = tokio::task::spawn_blocking(move || {
        (
            a2.shared.existing(&id).unwrap().state.lock().in_use(),
            b2.shared.existing(&id).unwrap().state.lock().in_use(),
        )
    })
    .await
    .unwrap();
    assert_eq!((ra.money, rb.money), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_leases_of_one_instance_never_refuse_another() {
    let Some(db) = postgres("idle_leases_of_one_instance_never_refuse_another") else {
        return;
    };
    let (a, b) = (open(&db, 30), open(&db, 30));
    let key = make_key(&a, "shared", NewKey::new("shared", usd("1")));
    // A serves a few requests: its lease keeps headroom beyond what it settled.
    for n in 0..3 {
        Ledger::reserve(&*a, &key, money_hold("0.01"))
            .await
            .unwrap();
        let s = settlement(
            &key.id,
            &format!("a-{n}"),
            usd("0.005"),
            money_hold("0.01"),
            0,
        );
        assert!(a.settle(s).await.unwrap());
    }
    let lease_a = a.shared.existing(&key.id).unwrap().state.lock().limit();
    assert!(lease_a.money > 0, "A holds an idle lease");
    // B may take everything that is not spent.
    let free = usd("1") - usd("0.015");
    Ledger::reserve(&*b, &key, free.into()).await.unwrap();
    let err = Ledger::reserve(&*b, &key, Money::from_pico(1).into())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "insufficient_credits");
    assert!(err.to_string().contains("$0 of credit available"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instances_lease_holds_its_money_until_the_ttl() {
    let Some(db) = postgres("a_dead_instances_lease_holds_its_money_until_the_ttl") else {
        return;
    };
    let ttl = 2;
    let (a, b) = (open(&db, ttl), open(&db, ttl));
    let key = make_key(&a, "dies", NewKey::new("dies", usd("1")));
    Ledger::reserve(&*a, &key, money_hold("0.9")).await.unwrap();
    // Killed: no settlement, no lease given back.
    tokio::task::spawn_blocking(move || a.crash())
        .await
        .unwrap();
    let died = Instant::now();
    let err = Ledger::reserve(&*b, &key, money_hold("0.5"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "insufficient_credits", "{err}");
    let deadline = died + Duration::from_secs(ttl + 10);
    loop {
        match Ledger::reserve(&*b, &key, money_hold("0.5")).await {
            Ok(()) => break,
            Err(e) => {
                assert_eq!(e.code(), "insufficient_credits", "{e}");
                assert!(
                    Instant::now() < deadline,
                    "the dead instance's lease never expired"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Its lease was renewed at most ttl/3 before it died: it lasted at least that.
    assert!(
        died.elapsed() >= Duration::from_millis(ttl * 1000 * 2 / 3 - 300),
        "{:?}",
        died.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_in_use_are_renewed_and_idle_ones_given_back() {
    let Some(db) = postgres("leases_in_use_are_renewed_and_idle_ones_given_back") else {
        return;
    };
    let ttl = 1;
    let (a, b) = (open(&db, ttl), open(&db, ttl));
    let key = make_key(&a, "held", NewKey::new("held", usd("1")));
    Ledger::reserve(&*a, &key, money_hold("0.6")).await.unwrap();
    let leases = a.round_trips(Some("lease"));
    // Past two TTLs with the hold in flight: the lease is renewed, not expired.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(a.round_trips(Some("renew")) >= 3);
    // A still admits within it without asking…
    Ledger::reserve(&*a, &key, money_hold("0.01"))
        .now_or_never()
        .expect("on the fast path")
        .unwrap();
    assert_eq!(a.round_trips(Some("lease")), leases);
    // …and B cannot have what A holds.
    let err = Ledger::reserve(&*b, &key, money_hold("0.5"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "insufficient_credits", "{err}");

    // Released and idle: the lease is given back within about two renewal periods.
    a.release(&key.id, money_hold("0.6"));
    a.release(&key.id, money_hold("0.01"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (b2, id) = (b.clone(), key.id.clone());
        let reserved = tokio::task::spawn_blocking(move || b2.balance(&id).unwrap().reserved)
            .await
            .unwrap();
        if reserved == Money::ZERO {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A kept an idle lease of {reserved}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(a.round_trips(Some("shrink")) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_day_is_one_budget_across_instances() {
    let Some(db) = postgres("tokens_per_day_is_one_budget_across_instances") else {
        return;
    };
    let (a, b) = (open(&db, 30), open(&db, 30));
    let key = make_key(
        &a,
        "tokens",
        NewKey {
            tokens_per_day: Some(1_000),
            ..NewKey::new("tokens", usd("100"))
        },
    );
    let hold = |tokens| Reservation {
        amount: usd("0.001"),
        tokens,
    };
    Ledger::reserve(&*a, &key, hold(600)).await.unwrap();
    let err = Ledger::reserve(&*b, &key, hold(500)).await.unwrap_err();
    assert_eq!(err.code(), "rate_limited", "{err}");
    assert!(
        err.to_string()
            .contains("600 more are held by requests in flight"),
        "{err}"
    );
    Ledger::reserve(&*b, &key, hold(400)).await.unwrap();
    // A's request used 300 of its 600: 300 + 400 held on B; 300 are left today.
    assert!(a
        .settle(settlement(&key.id, "t-a", usd("0.0005"), hold(600), 300))
        .await
        .unwrap());
    let err = Ledger::reserve(&*a, &key, hold(301)).await.unwrap_err();
    assert_eq!(err.code(), "rate_limited", "{err}");
    Ledger::reserve(&*a, &key, hold(300)).await.unwrap();
    let (a2, id) = (a.clone(), key.id.clone());
    let today = tokio::task::spawn_blocking(move || a2.tokens_today(&id).unwrap())
        .await
        .unwrap();
    assert_eq!(today, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_queued_together_commit_in_one_statement_and_never_twice() {
    let Some(db) = postgres("settlements_queued_together_commit_in_one_statement") else {
        return;
    };
    let store = open(&db, 30);
    let key = make_key(&store, "batch", NewKey::new("batch", usd("10")));
    let hold = money_hold("0.01");
    // One more than is settled: it stays held throughout.
    for _ in 0..101 {
        Ledger::reserve(&*store, &key, hold).await.unwrap();
    }
    let before = store.round_trips(Some("settle"));
    store.shared.writer.paused.store(true, Ordering::SeqCst);
    let mut waits = Vec::new();
    for n in 0..100 {
        // Every fifth one repeats the request id before it.
        let id = format!("r-{}", if n % 5 == 4 { n - 1 } else { n });
        waits.push(store.settle(settlement(
            &key.id,
            &id,
            Money::from_pico(1_000 + n),
            hold,
            0,
        )));
    }
    store.shared.writer.paused.store(false, Ordering::SeqCst);
    store.shared.writer.wake();
    let answers = futures_util::future::join_all(waits).await;
    let charged: Vec<bool> = answers.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        store.round_trips(Some("settle")) - before,
        1,
        "one statement for the batch"
    );
    assert_eq!(charged.iter().filter(|c| **c).count(), 80);
    let expected: i64 = (0..100).filter(|n| n % 5 != 4).map(|n| 1_000 + n).sum();
    let (s2, id) = (store.clone(), key.id.clone());
    let (spent, generation) =
        tokio::task::spawn_blocking(move || (spent_of(&s2, &id), s2.generation("r-3").unwrap()))
            .await
            .unwrap();
    assert_eq!(spent, Money::from_pico(expected));
    // The first settlement of an id is the one kept.
    let g = generation.unwrap();
    assert_eq!(
        (g.total_cost, g.key_id.as_str()),
        (Money::from_pico(1_003), key.id.as_str())
    );
    assert_eq!(g.attempts[0].status, "200");
    // Every settled hold is released (each once: the one left is still held).
    let a = store.shared.existing(&key.id).unwrap();
    let account = a.state.lock();
    assert_eq!(account.in_use(), escrow::Amounts::of(hold));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_settled_by_an_earlier_statement_is_skipped_by_a_later_batch() {
    let Some(db) = postgres("a_request_id_settled_by_an_earlier_statement") else {
        return;
    };
    let store = open(&db, 30);
    let key = make_key(&store, "again", NewKey::new("again", usd("10")));
    let hold = money_hold("0.01");
    for _ in 0..12 {
        Ledger::reserve(&*store, &key, hold).await.unwrap();
    }
    let one = |id: &str, pico: i64| settlement(&key.id, id, Money::from_pico(pico), hold, 0);
    assert!(store.settle(one("r-early", 7_000)).await.unwrap());
    // A batch of ten new ids and the early one again: the writer's first try
    // (`sb_settle_fresh`) is refused whole by the primary key, the second
    // (`sb_settle`) skips the early id.
    let before = store.round_trips(Some("settle"));
    store.shared.writer.paused.store(true, Ordering::SeqCst);
    let mut waits = Vec::new();
    for n in 0..10 {
        waits.push(store.settle(one(&format!("r-{n}"), 1_000 + n)));
    }
    waits.push(store.settle(one("r-early", 9_999_999)));
    store.shared.writer.paused.store(false, Ordering::SeqCst);
    store.shared.writer.wake();
    let charged: Vec<bool> = futures_util::future::join_all(waits)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(charged, [vec![true; 10], vec![false]].concat());
    assert_eq!(store.round_trips(Some("settle")) - before, 2);
    let expected = 7_000 + (0..10).map(|n| 1_000 + n).sum::<i64>();
    let (s2, id) = (store.clone(), key.id.clone());
    let (spent, early) = tokio::task::spawn_blocking(move || {
        (spent_of(&s2, &id), s2.generation("r-early").unwrap())
    })
    .await
    .unwrap();
    assert_eq!(spent, Money::from_pico(expected));
    assert_eq!(early.unwrap().total_cost, Money::from_pico(7_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changes_on_one_instance_reach_the_other_within_a_second() {
    let Some(db) = postgres("key_changes_on_one_instance_reach_the_other") else {
        return;
    };
    let (a, b) = (open(&db, 30), open(&db, 30));
    let mut changes = b.changes().unwrap();
    let next = |changes: &mut tokio::sync::broadcast::Receiver<KeyChange>| {
        let mut c = changes.resubscribe();
        std::mem::swap(&mut c, changes);
        async move {
            let started = Instant::now();
            let got = tokio::time::timeout(Duration::from_secs(1), c.recv())
                .await
                .expect("within a second")
                .unwrap();
            (got, started.elapsed())
        }
    };
    let (a2, wait) = (a.clone(), next(&mut changes));
    let made =
        tokio::task::spawn_blocking(move || make_key(&a2, "seen", NewKey::new("seen", usd("1"))))
            .await
            .unwrap();
    assert_eq!(wait.await.0, KeyChange::Key(made.id.clone()));

    let (a2, id, wait) = (a.clone(), made.id.clone(), next(&mut changes));
    tokio::task::spawn_blocking(move || {
        a2.update(
            &id,
            &KeyPatch {
                disabled: Some(true),
                ..Default::default()
            },
        )
        .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(wait.await.0, KeyChange::Key(made.id.clone()));
    let (b2, id) = (b.clone(), made.id.clone());
    assert!(
        tokio::task::spawn_blocking(move || b2.get(&id).unwrap().unwrap().record.disabled)
            .await
            .unwrap()
    );

    let (a2, id, wait) = (a.clone(), made.id.clone(), next(&mut changes));
    tokio::task::spawn_blocking(move || a2.top_up(&id, usd("2")).unwrap())
        .await
        .unwrap();
    assert_eq!(wait.await.0, KeyChange::Key(made.id.clone()));
}

#[test]
fn four_instances_starting_at_once_migrate_one_schema() {
    let Some(db) = postgres("four_instances_starting_at_once_migrate_one_schema") else {
        return;
    };
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let url = db.url().to_string();
    let opened: Vec<_> = (0..4)
        .map(|_| {
            let (barrier, url) = (barrier.clone(), url.clone());
            std::thread::spawn(move || {
                barrier.wait();
                PgStore::open(&config(&url, 30))
            })
        })
        .collect();
    let stores: Vec<Arc<PgStore>> = opened
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    let s = stores[0].shared.clone();
    let versions: Vec<i32> = s
        .block({
            let s = s.clone();
            async move {
                let c = s.client().await?;
                let rows = c
                    .query(
                        "SELECT version FROM sb_schema_version ORDER BY version",
                        &[],
                    )
                    .await
                    .map_err(|e| s.error(e))?;
                // Step 7 took the settlements' (key, time) index away again.
                let gone: bool = c
                    .query_one(
                        "SELECT to_regclass('sb_settlements_key_created') IS NULL",
                        &[],
                    )
                    .await
                    .map_err(|e| s.error(e))?
                    .get(0);
                assert!(gone, "sb_settlements_key_created is still there");
                Ok(rows.iter().map(|r| r.get(0)).collect())
            }
        })
        .unwrap();
    let all: Vec<i32> = (1..=super::schema::migrations().len() as i32).collect();
    assert_eq!(versions, all);
    // And every one of them works on it.
    for (n, store) in stores.iter().enumerate() {
        make_key(store, &format!("k{n}"), NewKey::new("k", usd("1")));
    }
    assert_eq!(stores[3].list().unwrap().len(), 4);
}

#[test]
fn an_unreachable_server_is_store_unavailable_within_seconds() {
    // Port 1 on loopback: nothing listens there.
    let started = Instant::now();
    let err =
        PgStore::open(&config("postgres://postgres@127.0.0.1:1/switchboard", 30)).unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let g = GatewayError::from(err);
    assert_eq!(
        (g.status().as_u16(), g.code(), g.kind()),
        (503, "store_unavailable", "api_error")
    );
}

/// A TCP proxy to PostgreSQL that can be cut and restored on the same port.
pub(super) struct Proxy {
    pub(super) port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
    /// While set, what arrives is held, not passed on (a network that drops packets).
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

/// Copies `from` to `to`, holding what it read while `frozen`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub(super) async fn start(port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = frozen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let Ok(out) = tokio::net::TcpStream::connect("127.0.0.1:5432").await else {
                    continue;
                };
                let ((in_r, in_w), (out_r, out_w)) = (inbound.into_split(), out.into_split());
                conns.spawn(pump(in_r, out_w, f.clone()));
                conns.spawn(pump(out_r, in_w, f.clone()));
            }
        });
        Proxy {
            port,
            task: Some(task),
            frozen,
        }
    }

    /// Closes the listener and every connection through it.
    pub(super) async fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Holds everything sent through it (nothing is closed) until `thaw`.
    pub(super) fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_going_away_is_503_at_once_and_everything_recovers() {
    let Some(db) = postgres("postgres_going_away_is_503_at_once") else {
        return;
    };
    let mut proxy = Proxy::start(0).await;
    let url = db.url().replace(":5432/", &format!(":{}/", proxy.port));
    assert_ne!(url, db.url());
    let store = tokio::task::spawn_blocking(move || PgStore::open(&config(&url, 30)).unwrap())
        .await
        .unwrap();
    let key = make_key(&store, "blip", NewKey::new("blip", usd("1")));
    let hold = money_hold("0.01");
    Ledger::reserve(&*store, &key, hold).await.unwrap();
    Ledger::reserve(&*store, &key, hold).await.unwrap();

    proxy.cut().await;
    // The first round trip that fails marks the store down…
    let s2 = store.clone();
    let started = Instant::now();
    let err = tokio::task::spawn_blocking(move || s2.ping().unwrap_err())
        .await
        .unwrap();
    assert!(err.is_unavailable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(6));
    // …then even a reservation the lease covers is refused at once.
    let err = Ledger::reserve(&*store, &key, hold)
        .now_or_never()
        .expect("at once")
        .unwrap_err();
    assert_eq!(err.code(), "store_unavailable");
    // A charge made meanwhile waits in the queue (its waiter gets an error after 5 s).
    let queued = store.settle(settlement(&key.id, "while-down", usd("0.004"), hold, 0));
    let err = queued.await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    // A flush (a gateway shutting down) does not wait for ever.
    tokio::time::timeout(Duration::from_secs(10), store.flush())
        .await
        .expect("a flush gives up while PostgreSQL does not answer");

    // Back: the store notices within a few seconds, commits the queued charge, serves.
    let _proxy = Proxy::start(proxy.port).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !store.is_up() {
        assert!(Instant::now() < deadline, "the store never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.flush().await;
    let (s2, id) = (store.clone(), key.id.clone());
    let (spent, row) = tokio::task::spawn_blocking(move || {
        (spent_of(&s2, &id), s2.generation("while-down").unwrap())
    })
    .await
    .unwrap();
    assert_eq!(spent, usd("0.004"));
    assert!(row.is_some());
    Ledger::reserve(&*store, &key, hold).await.unwrap();
}

/// Not a test: statements per request under load (`cargo test --release -- --ignored
/// round_trips_per_request --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn round_trips_per_request() {
    let Some(db) = postgres("round_trips_per_request") else {
        return;
    };
    let (a, b) = (open(&db, 30), open(&db, 30));
    let key = make_key(&a, "hot", NewKey::new("hot", usd("1000")));
    let hold = money_hold("0.001");
    let requests = 20_000;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..64 {
        let store = if worker % 2 == 0 {
            a.clone()
        } else {
            b.clone()
        };
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..requests / 64 {
                Ledger::reserve(&*store, &key, hold).await.unwrap();
                let id = format!("w{worker}-{n}");
                store
                    .settle(settlement(&key.id, &id, usd("0.0004"), hold, 0))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let n = (requests / 64 * 64) as f64;
    for op in ["lease", "settle", "renew", "shrink", "prepare"] {
        let total = a.round_trips(Some(op)) + b.round_trips(Some(op));
        eprintln!("{op}: {total} ({:.4} per request)", total as f64 / n);
    }
    eprintln!(
        "{n} requests in {elapsed:?} ({:.0}/s); all statements: {:.4} per request",
        n / elapsed.as_secs_f64(),
        (a.round_trips(None) + b.round_trips(None)) as f64 / n
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_with_a_large_balance_asks_for_a_lease_about_once_per_256_requests() {
    let Some(db) = postgres("a_hot_key_asks_for_a_lease_about_once_per_256") else {
        return;
    };
    let a = open(&db, 30);
    // ⅛ of $1,000 is far more than 256 holds of $0.001: only the headroom binds.
    let key = make_key(&a, "hot", NewKey::new("hot", usd("1000")));
    let hold = money_hold("0.001");
    let requests = 1_000;
    for n in 0..requests {
        Ledger::reserve(&*a, &key, hold).await.unwrap();
        let id = format!("seq-{n}");
        assert!(a
            .settle(settlement(&key.id, &id, usd("0.0004"), hold, 0))
            .await
            .unwrap());
    }
    // One after another, each lease covers the request that asks and 256 more (32 gave
    // ≈ 31 statements here).
    let leases = a.round_trips(Some("lease"));
    assert!(
        (1..=6).contains(&leases),
        "{leases} lease statements for {requests} requests"
    );
    let (a2, id) = (a.clone(), key.id.clone());
    let spent = tokio::task::spawn_blocking(move || spent_of(&a2, &id))
        .await
        .unwrap();
    assert_eq!(spent, usd("0.4"), "every charge once, to the pico-dollar");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_queued_behind_one_lease_round_trip_share_its_answer() {
    let Some(db) = postgres("refusals_share_a_lease_round_trip") else {
        return;
    };
    let a = open(&db, 30);
    let key = make_key(&a, "spent", NewKey::new("spent", usd("0.001")));
    let hold = money_hold("0.01");
    // Fifty requests the key cannot pay arrive while the key's slow path is busy (the
    // test holds its turn): they queue behind one lease round trip.
    let cell = a.shared.account(&key.id);
    let turn = cell.leasing.lock().await;
    let before = a.round_trips(Some("lease"));
    let admissions: Vec<_> = (0..50).map(|_| Ledger::reserve(&*a, &key, hold)).collect();
    drop(turn);
    for r in futures_util::future::join_all(admissions).await {
        let e = r.expect_err("the key holds $0.001");
        assert!(
            matches!(&e, GatewayError::InsufficientCredits(m) if m.contains("$0.001")),
            "{e:?}"
        );
    }
    assert_eq!(
        a.round_trips(Some("lease")) - before,
        1,
        "one round trip answers every request queued behind it"
    );
    // A request that arrives after that answer asks PostgreSQL again.
    assert!(Ledger::reserve(&*a, &key, hold).await.is_err());
    assert_eq!(a.round_trips(Some("lease")) - before, 2);
    // A smaller need is not refused by a larger one's answer.
    Ledger::reserve(&*a, &key, money_hold("0.0005"))
        .await
        .unwrap();
    // A top-up is seen by the next request: its round trip starts after it arrives.
    let (a2, id) = (a.clone(), key.id.clone());
    tokio::task::spawn_blocking(move || a2.top_up(&id, usd("1")).unwrap())
        .await
        .unwrap();
    Ledger::reserve(&*a, &key, hold).await.unwrap();
}

#[test]
fn bootstrap_keys_carry_their_labels_and_take_changed_ones() {
    let Some(db) = postgres("bootstrap_keys_carry_their_labels_and_take_changed_ones") else {
        return;
    };
    let store = open(&db, 30);
    let mut key: crate::config::KeyConfig = toml::from_str(
        "secret = \"sk-boot-labels-0123456789\"\ncredits_usd = 5\nlabels = { team = \"search\" }\n",
    )
    .unwrap();
    store.bootstrap(std::slice::from_ref(&key)).unwrap();
    let hash = hash_secret("sk-boot-labels-0123456789");
    let rec = store.find(&hash).unwrap().unwrap();
    assert_eq!(rec.labels, key.labels);
    key.labels = [("team".to_string(), "ads".to_string())].into();
    store.bootstrap(std::slice::from_ref(&key)).unwrap();
    let again = store.find(&hash).unwrap().unwrap();
    assert_eq!(
        (again.id.as_str(), &again.labels),
        (rec.id.as_str(), &key.labels)
    );
}
