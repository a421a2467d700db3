//! SQLite schemas as `STRICT` tables, and the migration of databases made before.
//!
//! In a `STRICT` table an `INTEGER` column holds integers only: an integer overflow in
//! SQL (which SQLite turns into a REAL) is an error that rolls the transaction back,
//! never a REAL stored in a money column that every later read fails on. SQLite cannot
//! make an existing table `STRICT`, so a database of an older layout is migrated at
//! open, in one transaction: each table is created anew as `STRICT`, its rows copied
//! (rowids kept), the old one dropped and the new one renamed. `PRAGMA user_version`
//! records that it is done.

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
/// transaction; see the module docs), then applies the additive steps.
pub(super) fn prepare_schema(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    migrate(conn, SCHEMA_VERSION, &TABLES, "")
        .and_then(|()| add_cache_hit(conn))
        .map_err(|e| StoreError(format!("cannot prepare the store {}: {e}", path.display())))
}

/// The version with `settlements.cache_hit` ([`add_cache_hit`]).
pub(super) const CACHE_HIT_VERSION: i64 = 3;

/// Version 3: `settlements.cache_hit`, set on the free record of a response-cache hit
/// (SPEC §8.1). Additive: gated on `user_version < 3`, and the column is added only
/// when missing, in one `BEGIN IMMEDIATE` transaction (another process doing it at
/// the same moment waits, then finds it done).
fn add_cache_hit(conn: &mut Connection) -> Result<(), String> {
    let version = |c: &Connection| -> rusqlite::Result<i64> {
        c.query_row("PRAGMA user_version", [], |r| r.get(0))
    };
    if version(conn).map_err(|e| e.to_string())? >= CACHE_HIT_VERSION {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| e.to_string())?;
    if version(&tx).map_err(|e| e.to_string())? >= CACHE_HIT_VERSION {
        return Ok(());
    }
    let has = tx
        .prepare("SELECT 1 FROM pragma_table_info('settlements') WHERE name = 'cache_hit'")
        .and_then(|mut s| s.exists([]))
        .map_err(|e| e.to_string())?;
    if !has {
        tx.execute_batch("ALTER TABLE settlements ADD COLUMN cache_hit INTEGER NOT NULL DEFAULT 0")
            .map_err(|e| format!("cannot add settlements.cache_hit: {e}"))?;
    }
    tx.pragma_update(None, "user_version", CACHE_HIT_VERSION)
        .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}
