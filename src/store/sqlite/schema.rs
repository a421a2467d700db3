//! SQLite schemas as `STRICT` tables, and the migration of databases made before.
//!
//! In a `STRICT` table an `INTEGER` column holds integers only: an integer overflow in
//! SQL (which SQLite turns into a REAL) is an error that rolls the transaction back,
//! never a REAL stored in a money column that every later read fails on. SQLite cannot
//! make an existing table `STRICT`, so a database of an older layout is migrated at
//! open, in one transaction: each table is created anew as `STRICT`, its rows copied
//! (rowids kept), the old one dropped and the new one renamed. `PRAGMA user_version`
//! records that it is done.
//!
//! Later versions are additive steps, each run once after the one before, in a
//! transaction of its own that also sets `user_version` (see [`migrate_v2`]).

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use crate::store::StoreError;

/// A table of a schema: its name, its columns (to copy) and its definition, where
/// `{table}` stands for the name it is created under.
pub(crate) struct Table {
    pub name: &'static str,
    pub columns: &'static str,
    pub create: &'static str,
    /// Whether the table has rowids (to keep them, and so the order of `rowid`).
    pub rowid: bool,
}

/// Brings the database of `conn` to `version` with `tables` (plus `extra` statements,
/// e.g. indexes, run after). A database below `version` has every existing table of
/// the list copied into its `STRICT` form; a missing table is created. Another
/// connection doing it at the same moment waits (`BEGIN IMMEDIATE`), then finds it done.
pub(crate) fn migrate(
    conn: &mut Connection,
    version: i64,
    tables: &[Table],
    extra: &str,
) -> Result<(), String> {
    let current = |c: &Connection| -> rusqlite::Result<i64> {
        c.query_row("PRAGMA user_version", [], |r| r.get(0))
    };
    if current(conn).map_err(|e| e.to_string())? >= version {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| e.to_string())?;
    if current(&tx).map_err(|e| e.to_string())? >= version {
        return Ok(());
    }
    for t in tables {
        let exists = tx
            .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")
            .and_then(|mut s| s.exists([t.name]))
            .map_err(|e| e.to_string())?;
        if !exists {
            tx.execute_batch(&t.create.replace("{table}", t.name))
                .map_err(|e| format!("cannot create table `{}`: {e}", t.name))?;
            continue;
        }
        let new = format!("{}_strict", t.name);
        let (rowid, with_rowid) = if t.rowid {
            ("rowid, ", "rowid, ")
        } else {
            ("", "")
        };
        let sql = format!(
            "DROP TABLE IF EXISTS {new};
             {create};
             INSERT INTO {new} ({rowid}{cols}) SELECT {with_rowid}{cols} FROM {old};
             DROP TABLE {old};
             ALTER TABLE {new} RENAME TO {old};",
            create = t.create.replace("{table}", &new),
            cols = t.columns,
            old = t.name,
        );
        tx.execute_batch(&sql).map_err(|e| {
            format!(
                "cannot migrate table `{}` to STRICT (a value of the wrong type in it: fix or remove that row, then start again): {e}",
                t.name
            )
        })?;
    }
    tx.execute_batch(extra).map_err(|e| e.to_string())?;
    tx.pragma_update(None, "user_version", version)
        .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}

/// The store's schema version (`PRAGMA user_version`): 1 = `STRICT` tables (see
/// the module docs).
pub(super) const SCHEMA_VERSION: i64 = 1;

/// The store's tables, each `STRICT`: an `INTEGER` column never holds a REAL.
pub(super) const TABLES: [Table; 3] = [
    Table {
        name: "keys",
        columns: "id, secret_sha256, name, created, disabled, credits_pico, spent_pico, limit_pico, rpm, tokens_per_day, models",
        create: "CREATE TABLE {table} (
    id             TEXT PRIMARY KEY,
    secret_sha256  BLOB NOT NULL UNIQUE,
    name           TEXT NOT NULL,
    created        INTEGER NOT NULL,
    disabled       INTEGER NOT NULL DEFAULT 0,
    credits_pico   INTEGER NOT NULL,
    spent_pico     INTEGER NOT NULL DEFAULT 0,
    limit_pico     INTEGER,
    rpm            INTEGER,
    tokens_per_day INTEGER,
    models         TEXT
) STRICT",
        rowid: true,
    },
    // One B-tree keyed by the (time-ordered) request id, so a settlement appends at its
    // right edge; per-key history is in the request log, indexed by key and time.
    Table {
        name: "settlements",
        columns: "request_id, key_id, amount_pico, model, provider, streamed, prompt_tokens, completion_tokens, latency_ms, ttft_ms, attempts, finish_reason, created",
        create: "CREATE TABLE {table} (
    request_id        TEXT PRIMARY KEY,
    key_id            TEXT NOT NULL,
    amount_pico       INTEGER NOT NULL,
    model             TEXT NOT NULL,
    provider          TEXT NOT NULL,
    streamed          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms        INTEGER NOT NULL,
    ttft_ms           INTEGER,
    attempts          TEXT NOT NULL,
    finish_reason     TEXT,
    created           INTEGER NOT NULL
) STRICT, WITHOUT ROWID",
        rowid: false,
    },
    Table {
        name: "daily_tokens",
        columns: "key_id, day, tokens",
        create: "CREATE TABLE {table} (
    key_id TEXT NOT NULL,
    day    INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (key_id, day)
) STRICT",
        rowid: true,
    },
];

/// Creates the store's tables, or migrates those of an older layout (in one
/// transaction per version; see the module docs).
pub(super) fn prepare_schema(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > LATEST_VERSION {
        return Err(StoreError(format!(
            "the store {} is of schema version {found}, newer than this switchboard knows ({LATEST_VERSION}): run a newer switchboard",
            path.display()
        )));
    }
    migrate(conn, SCHEMA_VERSION, &TABLES, "")
        .and_then(|()| migrate_v2(conn))
        .and_then(|()| add_step(conn, CACHE_HIT_VERSION, CACHE_HIT_COLUMN))
        .and_then(|()| add_step(conn, IDEMPOTENCY_VERSION, IDEMPOTENCY_TABLE))
        .and_then(|()| add_step(conn, KEY_LIFECYCLE_VERSION, KEY_LIFECYCLE))
        .map_err(|e| StoreError(format!("cannot prepare the store {}: {e}", path.display())))
}

/// Version 2 (SPEC §8.3): a key's `limit_reset` and `expires_at`; the app that sent a
/// settled request (`app_url`, `app_title`); and `daily_spend`, what each key spent
/// each UTC day, written in the same transaction as the settlements it counts (the
/// spending of the current day, week and month is summed from it). The days of the
/// settlements already there are counted in at once (their arrival day).
const V2: &str = "
ALTER TABLE keys ADD COLUMN limit_reset TEXT CHECK (limit_reset IN ('daily', 'weekly', 'monthly'));
ALTER TABLE keys ADD COLUMN expires_at INTEGER;
ALTER TABLE settlements ADD COLUMN app_url TEXT;
ALTER TABLE settlements ADD COLUMN app_title TEXT;
CREATE TABLE IF NOT EXISTS daily_spend (
    key_id     TEXT NOT NULL,
    day        INTEGER NOT NULL,
    spent_pico INTEGER NOT NULL,
    PRIMARY KEY (key_id, day)
) STRICT, WITHOUT ROWID;
INSERT INTO daily_spend (key_id, day, spent_pico)
SELECT key_id, created / 86400, sum(amount_pico) FROM settlements
 WHERE amount_pico > 0 GROUP BY key_id, created / 86400;
";

/// The version [`prepare_schema`] brings a database to.
pub(crate) const LATEST_VERSION: i64 = KEY_LIFECYCLE_VERSION;

/// Brings a version-1 database to version 2 ([`V2`]), once; another connection doing
/// it at the same moment waits (`BEGIN IMMEDIATE`), then finds it done.
pub(super) fn migrate_v2(conn: &mut Connection) -> Result<(), String> {
    add_step(conn, 2, V2)
}

/// Version 3: `settlements.cache_hit`, set on the free record of a response-cache hit
/// (SPEC §8.1).
pub(super) const CACHE_HIT_VERSION: i64 = 3;

/// See [`CACHE_HIT_VERSION`].
const CACHE_HIT_COLUMN: &str =
    "ALTER TABLE settlements ADD COLUMN cache_hit INTEGER NOT NULL DEFAULT 0;";

/// Version 4: the `idempotency` table (SPEC §8.2).
pub(super) const IDEMPOTENCY_VERSION: i64 = 4;

/// The answers recorded for `Idempotency-Key`s, one per client key and idempotency
/// key, written in the applier's transaction that writes their settlement
/// (`request_id`), deleted once `expires` (Unix seconds) has passed. A rowid table:
/// its rows hold whole response bodies, which `WITHOUT ROWID` tables are not for.
const IDEMPOTENCY_TABLE: &str = "
CREATE TABLE IF NOT EXISTS idempotency (
    key_id      TEXT NOT NULL,
    idem_key    TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    request_id  TEXT NOT NULL,
    status      INTEGER NOT NULL,
    headers     TEXT NOT NULL,
    body        BLOB NOT NULL,
    created     INTEGER NOT NULL,
    expires     INTEGER NOT NULL,
    PRIMARY KEY (key_id, idem_key)
) STRICT;
CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency (expires);
";

/// Version 5: a key's `labels` (a JSON object), its deletion (`deleted_at`, Unix
/// seconds; the row stays for the books) and the secret a rotation replaced
/// (`old_secret_sha256`, found until `old_secret_until`).
pub(super) const KEY_LIFECYCLE_VERSION: i64 = 5;

/// See [`KEY_LIFECYCLE_VERSION`].
const KEY_LIFECYCLE: &str = "
ALTER TABLE keys ADD COLUMN labels TEXT;
ALTER TABLE keys ADD COLUMN deleted_at INTEGER;
ALTER TABLE keys ADD COLUMN old_secret_sha256 BLOB;
ALTER TABLE keys ADD COLUMN old_secret_until INTEGER;
CREATE INDEX IF NOT EXISTS keys_old_secret ON keys (old_secret_sha256) WHERE old_secret_sha256 IS NOT NULL;
";

/// Brings the database of `conn` to `version` by running `sql` (statements that
/// are safe to run again), unless it is there already: an additive step after
/// [`migrate`], in one `BEGIN IMMEDIATE` transaction (another connection doing it at
/// the same moment waits, then finds it done).
pub(crate) fn add_step(conn: &mut Connection, version: i64, sql: &str) -> Result<(), String> {
    let current = |c: &Connection| -> rusqlite::Result<i64> {
        c.query_row("PRAGMA user_version", [], |r| r.get(0))
    };
    if current(conn).map_err(|e| e.to_string())? >= version {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| e.to_string())?;
    if current(&tx).map_err(|e| e.to_string())? >= version {
        return Ok(());
    }
    tx.execute_batch(sql)
        .map_err(|e| format!("cannot migrate to schema version {version}: {e}"))?;
    tx.pragma_update(None, "user_version", version)
        .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}
