//! The ledger's bounds and checked arithmetic, the STRICT migration, and a property
//! test of the ledger (tests of the SQLite store, kept apart to keep `mod.rs` short).

use super::*;

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn temp_dir() -> PathBuf {
    let r: u64 = rand::random();
    let d = std::env::temp_dir().join(format!(
        "switchboard-bounds-{}-{r:016x}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn open_at(path: &Path) -> Result<Arc<SqliteStore>, StoreError> {
    SqliteStore::open(&StoreConfig {
        url: format!("sqlite://{}", path.display()),
        sync: SyncMode::Normal,
        ..Default::default()
    })
}

fn charge(key_id: &str, id: &str, cost: Money, reserved: Money) -> Settlement {
    Settlement {
        key_id: key_id.into(),
        reserved: reserved.into(),
        tokens: 10,
        generation: Generation {
            id: id.into(),
            key_id: key_id.into(),
            model: "m/x".into(),
            provider: "p".into(),
            streamed: false,
            prompt_tokens: 4,
            completion_tokens: 6,
            total_cost: cost,
            latency_ms: 1,
            ttft_ms: None,
            attempts: vec![],
            finish_reason: None,
            created: 1,
            cache_hit: false,
        },
    }
}

fn entry(s: Settlement) -> Arc<Entry> {
    Arc::new(Entry {
        settlement: s,
        day: utc_day(),
    })
}

/// A bare database with the store's schema and key `k`, spending `spent` pico-USD.
fn bare_db(path: &Path, spent: i64) -> Connection {
    let mut conn = open_conn(path, SyncMode::Normal).unwrap();
    prepare_schema(&mut conn, path).unwrap();
    conn.execute(
        "INSERT INTO keys (id, secret_sha256, name, created, credits_pico, spent_pico) VALUES ('k', x'00', 'k', 0, 0, ?1)",
        [spent],
    )
    .unwrap();
    conn
}

fn spent_and_type(conn: &Connection) -> (String, String) {
    conn.query_row(
        "SELECT CAST(spent_pico AS TEXT), typeof(spent_pico) FROM keys WHERE id = 'k'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

/// Reproduced: two settlements in one applier batch wrapped the `i64` sum in
/// `write_batch`, `spent_pico` became −9.2e18, and after a restart the key had
/// $9.2M of credit. Now the sum is checked: the batch fails, nothing is written.
#[test]
fn two_charges_in_one_batch_whose_sum_overflows_are_refused_not_wrapped() {
    let dir = temp_dir();
    let path = dir.join("wrap.db");
    let mut conn = bare_db(&path, 0);
    let half = Money::from_pico(i64::MAX / 2 + 1);
    let batch = [
        entry(charge("k", "gen-1", half, Money::ZERO)),
        entry(charge("k", "gen-2", half, Money::ZERO)),
    ];
    let err = commit(&mut conn, &batch).unwrap_err();
    assert!(err.0.contains("overflow"), "{err}");
    assert_eq!(spent_and_type(&conn), ("0".into(), "integer".into()));
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM settlements", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0, "rolled back");
    let _ = std::fs::remove_dir_all(dir);
}

/// Reproduced: in separate batches `spent_pico + ?` overflowed in SQLite, which
/// stored a REAL; that key got 500s and listing keys failed for every key. Now the
/// update is checked and the table is STRICT: the batch fails, the row stays an
/// integer, and every key can still be read.
#[test]
fn a_charge_that_would_overflow_a_keys_spending_leaves_it_an_integer() {
    let dir = temp_dir();
    let path = dir.join("real.db");
    let mut conn = bare_db(&path, i64::MAX - 10);
    let batch = [entry(charge("k", "gen-1", usd("0.001"), Money::ZERO))];
    assert!(commit(&mut conn, &batch).is_err());
    assert_eq!(
        spent_and_type(&conn),
        ((i64::MAX - 10).to_string(), "integer".into())
    );
    // Even written by hand, a REAL cannot get into a money column.
    let real = conn.execute("UPDATE keys SET spent_pico = 1.5e19 WHERE id = 'k'", []);
    assert!(real.is_err(), "a STRICT table refuses a REAL");
    drop(conn);
    let store = open_at(&path).unwrap();
    let keys = store.list().unwrap();
    assert_eq!(keys[0].spent, Money::from_pico(i64::MAX - 10));
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn the_ledger_refuses_charges_past_its_bounds_before_journaling_them() {
    let dir = temp_dir();
    let path = dir.join("bounds.db");
    let store = open_at(&path).unwrap();
    let k = store
        .create(
            hash_secret("sk-bounds-0123456789"),
            NewKey::new("b", usd("1")),
        )
        .unwrap();
    let id = k.record.id.clone();
    store.reserve(&k.record, usd("0.5").into()).unwrap();
    // Past the largest charge: refused, not journaled, its reservation given back.
    let too_much = MAX_CHARGE.checked_add(Money::from_pico(1)).unwrap();
    let err = store
        .settle(charge(&id, "gen-huge", too_much, usd("0.5")))
        .await
        .unwrap_err();
    assert!(err.0.contains("outside the ledger's bounds"), "{err}");
    let negative = store
        .settle(charge(&id, "gen-neg", usd("-1"), Money::ZERO))
        .await;
    assert!(negative.is_err());
    let b = store.balance(&id).unwrap();
    assert_eq!((b.spent, b.reserved), (Money::ZERO, Money::ZERO));
    assert!(store.generation("gen-huge").unwrap().is_none());
    // Charges larger than their reservation (a bug elsewhere) count up to MAX_SPENT,
    // and no further; those within their reservation need no look at the account.
    for n in 0..2 {
        assert!(store
            .settle(charge(
                &id,
                &format!("gen-big-{n}"),
                MAX_CHARGE,
                Money::ZERO
            ))
            .await
            .unwrap());
    }
    let err = store
        .settle(charge(&id, "gen-big-2", Money::from_pico(1), Money::ZERO))
        .await
        .unwrap_err();
    assert!(err.0.contains("past"), "{err}");
    assert_eq!(store.balance(&id).unwrap().spent, MAX_SPENT);
    store.flush().await;
    drop(store);
    // Replayed and reopened: the same, and every key reads.
    let again = open_at(&path).unwrap();
    assert_eq!(again.balance(&id).unwrap().spent, MAX_SPENT);
    assert_eq!(again.list().unwrap().len(), 1);
    drop(again);
    let _ = std::fs::remove_dir_all(dir);
}

/// Reproduced (at the ledger): a top-up of 9223372 USD answered 500 after
/// committing an overflowed value. Now it is refused in its own transaction.
#[test]
fn a_top_up_past_the_credit_bound_is_refused_with_nothing_written() {
    let dir = temp_dir();
    let store = open_at(&dir.join("topup.db")).unwrap();
    let k = store
        .create(
            hash_secret("sk-topup-0123456789"),
            NewKey::new("t", usd("1")),
        )
        .unwrap();
    let id = k.record.id.clone();
    let err = store.top_up(&id, usd("9223372")).unwrap_err();
    assert!(err.0.contains("refused"), "{err}");
    assert_eq!(store.get(&id).unwrap().unwrap().credits, usd("1"));
    // Up to the bound exactly, then not one pico more.
    let rest = MAX_CREDITS.checked_sub(usd("1")).unwrap();
    assert_eq!(
        store.top_up(&id, rest).unwrap().unwrap().credits,
        MAX_CREDITS
    );
    assert!(store.top_up(&id, Money::from_pico(1)).is_err());
    assert!(store.top_up(&id, Money::ZERO).is_err());
    assert_eq!(store.get(&id).unwrap().unwrap().credits, MAX_CREDITS);
    assert!(store.top_up("key_none", usd("1")).unwrap().is_none());
    // Creation is bounded by the store itself too.
    let over = NewKey::new("o", MAX_CREDITS.checked_add(Money::from_pico(1)).unwrap());
    assert!(store
        .create(hash_secret("sk-over-0123456789ab"), over)
        .is_err());
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

/// The schema before `STRICT` (user_version 0), as databases in use have it.
const OLD_SCHEMA: &str = "
CREATE TABLE keys (
    id TEXT PRIMARY KEY, secret_sha256 BLOB NOT NULL UNIQUE, name TEXT NOT NULL,
    created INTEGER NOT NULL, disabled INTEGER NOT NULL DEFAULT 0,
    credits_pico INTEGER NOT NULL, spent_pico INTEGER NOT NULL DEFAULT 0,
    limit_pico INTEGER, rpm INTEGER, tokens_per_day INTEGER, models TEXT
);
CREATE TABLE settlements (
    request_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, amount_pico INTEGER NOT NULL,
    model TEXT NOT NULL, provider TEXT NOT NULL, streamed INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL, ttft_ms INTEGER, attempts TEXT NOT NULL,
    finish_reason TEXT, created INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE daily_tokens (
    key_id TEXT NOT NULL, day INTEGER NOT NULL, tokens INTEGER NOT NULL,
    PRIMARY KEY (key_id, day)
);
";

fn is_strict(conn: &Connection, table: &str) -> bool {
    conn.query_row(
        "SELECT strict FROM pragma_table_list WHERE name = ?1",
        [table],
        |r| r.get::<_, i64>(0),
    )
    .unwrap()
        == 1
}

#[test]
fn a_database_of_the_old_schema_is_migrated_to_strict_tables_at_open() {
    let dir = temp_dir();
    let path = dir.join("old.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(OLD_SCHEMA).unwrap();
        // Created out of order on purpose: `list` orders by created, then rowid.
        for (id, created, credits, spent, secret) in [
            ("key_b", 5, "2", "0.5", "sk-b"),
            ("key_a", 5, "3", "0.25", "sk-a"),
            ("key_c", 1, "1", "0", "sk-c"),
        ] {
            conn.execute(
                "INSERT INTO keys (id, secret_sha256, name, created, credits_pico, spent_pico, limit_pico, rpm, tokens_per_day, models)
                 VALUES (?1, ?2, ?1, ?3, ?4, ?5, 7, 60, 1000, '[\"mock/*\"]')",
                params![id, &hash_secret(secret)[..], created, usd(credits).pico(), usd(spent).pico()],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO settlements VALUES ('gen-old', 'key_b', 500000000000, 'm/x', 'p', 1, 4, 6, 12, 3, '[]', 'stop', 1)",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO daily_tokens VALUES ('key_b', ?1, 77)",
            [utc_day() as i64],
        )
        .unwrap();
        assert!(!is_strict(&conn, "keys"));
    }
    let store = open_at(&path).unwrap();
    let ids: Vec<_> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|k| k.record.id)
        .collect();
    assert_eq!(ids, ["key_c", "key_b", "key_a"], "order kept");
    let b = store.get("key_b").unwrap().unwrap();
    assert_eq!((b.credits, b.spent), (usd("2"), usd("0.5")));
    assert_eq!(b.record.rpm, Some(60));
    assert_eq!(b.record.models, Some(vec!["mock/*".to_string()]));
    assert_eq!(
        store.find(&hash_secret("sk-a")).unwrap().unwrap().id,
        "key_a"
    );
    assert_eq!(store.tokens_today("key_b").unwrap(), 77);
    let g = store.generation("gen-old").unwrap().unwrap();
    assert_eq!((g.total_cost, g.streamed), (usd("0.5"), true));
    drop(store);
    let conn = Connection::open(&path).unwrap();
    for t in ["keys", "settlements", "daily_tokens"] {
        assert!(is_strict(&conn, t), "{t} is STRICT");
    }
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    // At least the STRICT layout (later additive steps raise the version further).
    assert!(version >= SCHEMA_VERSION, "{version}");
    drop(conn);
    // Opening again migrates nothing more.
    assert_eq!(open_at(&path).unwrap().list().unwrap().len(), 3);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_database_holding_a_real_in_a_money_column_is_refused_with_a_clear_error() {
    let dir = temp_dir();
    let path = dir.join("broken.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(OLD_SCHEMA).unwrap();
        // What the old overflow left: a REAL in spent_pico.
        conn.execute(
            "INSERT INTO keys (id, secret_sha256, name, created, credits_pico, spent_pico) VALUES ('key_x', x'01', 'x', 0, 0, 1.5e19)",
            [],
        )
        .unwrap();
    }
    let err = open_at(&path).unwrap_err();
    assert!(
        err.0.contains("cannot migrate table `keys` to STRICT"),
        "{err}"
    );
    // Nothing was changed: the old table is still there, as it was.
    let conn = Connection::open(&path).unwrap();
    assert!(!is_strict(&conn, "keys"));
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(unix)]
#[tokio::test(flavor = "current_thread")]
async fn the_store_and_its_journal_are_created_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir();
    let path = dir.join("modes.db");
    let store = open_at(&path).unwrap();
    let k = store
        .create(
            hash_secret("sk-modes-0123456789ab"),
            NewKey::new("m", usd("1")),
        )
        .unwrap();
    store.reserve(&k.record, usd("0.5").into()).unwrap();
    store
        .settle(charge(&k.record.id, "gen-m", usd("0.25"), usd("0.5")))
        .await
        .unwrap();
    store.flush().await;
    let mut seen = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        seen.push(e.file_name().to_string_lossy().into_owned());
        assert_eq!(mode, 0o600, "{:?} is {mode:o}", e.file_name());
    }
    for f in [
        "modes.db",
        "modes.db-wal",
        "modes.db-shm",
        "modes.db-ledger",
        "modes.db-ledger.lock",
    ] {
        assert!(seen.iter().any(|s| s == f), "{f} not in {seen:?}");
    }
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Reserve this many micro-USD (refused past what is available).
        Reserve(i64),
        /// Settle the oldest reservation at this share (percent) of it.
        Settle(u8),
        /// Release the oldest reservation.
        Release,
        /// Top up this many micro-USD (refused past the bound).
        TopUp(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1i64..2_000_000).prop_map(Op::Reserve),
            (0u8..=100).prop_map(Op::Settle),
            Just(Op::Release),
            prop_oneof![1i64..5_000_000, Just(MAX_CREDITS.pico() / 1_000_000)].prop_map(Op::TopUp),
        ]
    }

    fn micro(v: i64) -> Money {
        Money::from_pico(v.saturating_mul(1_000_000))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Any sequence of reserve / settle / release / top-up keeps spent ≤ credits
        /// ≤ MAX_CREDITS and reserved ≥ 0, and after a reopen (journal replay) the
        /// SQLite row is the in-memory account.
        #[test]
        fn the_ledger_keeps_its_invariants_and_survives_a_reopen(
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let dir = temp_dir();
            let path = dir.join("prop.db");
            let store = open_at(&path).unwrap();
            let k = store
                .create(hash_secret("sk-prop-0123456789abc"), NewKey::new("p", usd("1")))
                .unwrap();
            let id = k.record.id.clone();
            let mut held: std::collections::VecDeque<Money> = Default::default();
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Reserve(m) => {
                        if store.reserve(&k.record, micro(m).into()).is_ok() {
                            held.push_back(micro(m));
                        }
                    }
                    Op::Settle(pct) => {
                        if let Some(r) = held.pop_front() {
                            let cost = Money::from_pico(r.pico() / 100 * i64::from(pct));
                            let s = charge(&id, &format!("gen-{n}"), cost, r);
                            prop_assert!(rt.block_on(store.settle(s)).unwrap());
                        }
                    }
                    Op::Release => {
                        if let Some(r) = held.pop_front() {
                            store.release(&id, r.into());
                        }
                    }
                    Op::TopUp(m) => {
                        let before = store.balance(&id).unwrap().credits;
                        match store.top_up(&id, micro(m)) {
                            Ok(b) => prop_assert!(b.unwrap().credits <= MAX_CREDITS),
                            Err(_) => prop_assert!(before.checked_add(micro(m)).unwrap() > MAX_CREDITS),
                        }
                    }
                }
                let b = store.balance(&id).unwrap();
                prop_assert!(b.spent <= b.credits && b.credits <= MAX_CREDITS, "{b:?}");
                prop_assert!(!b.reserved.is_negative() && !b.spent.is_negative(), "{b:?}");
                let held_sum = held.iter().fold(Money::ZERO, |a, m| a.checked_add(*m).unwrap());
                prop_assert_eq!(b.reserved, held_sum);
            }
            for r in held.drain(..) {
                store.release(&id, r.into());
            }
            let memory = store.balance(&id).unwrap();
            drop(store); // journal applied or left for replay
            let again = open_at(&path).unwrap();
            let row = again.get(&id).unwrap().unwrap();
            prop_assert_eq!((row.credits, row.spent), (memory.credits, memory.spent));
            let replayed = again.balance(&id).unwrap();
            prop_assert_eq!((replayed.credits, replayed.spent), (memory.credits, memory.spent));
            drop(again);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
