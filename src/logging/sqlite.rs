//! [`SqliteSink`]: the request log in a SQLite file of its own (`[logging].sink =
//! "sqlite"` or `"sqlite:PATH"`), and the `requests` table's columns, which the
//! PostgreSQL sink mirrors.

use std::io;
use std::path::Path;
use std::time::Duration;

use super::{LogSink, RequestRecord};

/// Writes records to the `requests` table of their own SQLite file (WAL), one
/// transaction per batch. Money is kept exact in `cost_pico` (10⁻¹² USD).
pub struct SqliteSink {
    conn: rusqlite::Connection,
    /// The file (`None` in memory): what [`LogSink::usage_source`] reads.
    path: Option<std::path::PathBuf>,
    /// The `INSERT` of each size in [`ROWS_PER_INSERT`] (prepared once, cached).
    inserts: [String; 3],
}

impl std::fmt::Debug for SqliteSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSink").finish_non_exhaustive()
    }
}

/// The column definitions of the request log's `requests` table (one text for
/// [`REQUESTS_TABLE`] and [`SQLITE_SCHEMA`]).
macro_rules! requests_columns {
    () => {
        "
    id                TEXT PRIMARY KEY,
    time_ms           INTEGER NOT NULL,
    key_id            TEXT,
    requested_model   TEXT NOT NULL,
    model             TEXT,
    provider          TEXT,
    status            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    reasoning_tokens  INTEGER NOT NULL,
    cost_pico         INTEGER NOT NULL,
    latency_ms        INTEGER NOT NULL,
    ttft_ms           INTEGER,
    streamed          INTEGER NOT NULL,
    complete          INTEGER NOT NULL,
    finish_reason     TEXT,
    error_code        TEXT,
    attempts          TEXT NOT NULL,
    prompt            TEXT,
    completion        TEXT,
    over_reserve      INTEGER NOT NULL DEFAULT 0,
    app_url           TEXT,
    app_title         TEXT,
    cache_hit         INTEGER NOT NULL DEFAULT 0,
    key_name          TEXT,
    key_labels        TEXT,
    client_ip         TEXT
"
    };
}

/// The `requests` table of the SQLite request log, `{table}` standing for its name.
///
/// One B-tree keyed by the request id, which starts with its time, so records
/// append at its right edge and `ORDER BY id` is time order. `STRICT`: an `INTEGER`
/// column (`cost_pico`, the token counts) never holds anything else.
const REQUESTS_TABLE: &str = concat!(
    "CREATE TABLE {table} (",
    requests_columns!(),
    ") STRICT, WITHOUT ROWID"
);

/// The columns of `requests` copied by the migration, in order (`over_reserve`, the
/// last, came after the first layout and takes its default).
const REQUESTS_COLUMNS: &str = "id, time_ms, key_id, requested_model, model, provider, status, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_pico, latency_ms, ttft_ms, streamed, complete, finish_reason, error_code, attempts, prompt, completion";

/// The indexes: a key's history, and a time range (`GET /admin/usage`). Made when a
/// log is created or migrated, and again at every open (a log of version 1 made
/// before the time index gets it then).
const REQUESTS_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS requests_key_time ON requests (key_id, time_ms);
CREATE INDEX IF NOT EXISTS requests_time ON requests (time_ms);";

/// The request log's schema version (`PRAGMA user_version`): 1 = `STRICT`. A log
/// made before is migrated when opened (a copy of its rows, in one transaction).
const SQLITE_VERSION: i64 = 1;

/// The schema of the SQLite request log (what [`SqliteSink`] creates in a new file).
pub const SQLITE_SCHEMA: &str = concat!(
    "CREATE TABLE IF NOT EXISTS requests (",
    requests_columns!(),
    ") STRICT, WITHOUT ROWID;\n",
    "CREATE INDEX IF NOT EXISTS requests_key_time ON requests (key_id, time_ms);\n",
    "CREATE INDEX IF NOT EXISTS requests_time ON requests (time_ms);\n"
);

/// A count as SQLite's signed integer: past `i64::MAX` it is `i64::MAX`, never a
/// negative number.
pub(super) fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn sql_err(e: rusqlite::Error) -> io::Error {
    io::Error::other(e)
}

impl SqliteSink {
    /// Opens (creating) the log database at `path`.
    pub fn open(path: &Path) -> io::Result<SqliteSink> {
        super::sink::create_log_dir(path)?;
        // Created here, mode 0600, so that SQLite's -wal and -shm take the same mode.
        crate::store::create_private(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create the request log {}: {e}", path.display()),
            )
        })?;
        let conn = rusqlite::Connection::open(path).map_err(|e| {
            io::Error::other(format!(
                "cannot open the request log {}: {e}",
                path.display()
            ))
        })?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql_err)?;
        let mut sink = Self::init(conn)?;
        sink.path = Some(path.to_path_buf());
        Ok(sink)
    }

    /// An in-memory log (for an in-memory store, and tests).
    pub fn memory() -> io::Result<SqliteSink> {
        Self::init(rusqlite::Connection::open_in_memory().map_err(sql_err)?)
    }

    fn init(mut conn: rusqlite::Connection) -> io::Result<SqliteSink> {
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql_err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(sql_err)?;
        let requests = crate::store::schema::Table {
            name: "requests",
            columns: REQUESTS_COLUMNS,
            create: REQUESTS_TABLE,
            rowid: false,
        };
        crate::store::schema::migrate(&mut conn, SQLITE_VERSION, &[requests], REQUESTS_INDEX)
            .and_then(|()| add_missing_columns(&conn))
            .and_then(|()| {
                conn.execute_batch(REQUESTS_INDEX)
                    .map_err(|e| format!("cannot create its indexes: {e}"))
            })
            .map_err(|e| io::Error::other(format!("the request log: {e}")))?;
        Ok(SqliteSink {
            conn,
            path: None,
            inserts: ROWS_PER_INSERT.map(insert_sql),
        })
    }

    /// The connection (to query the log, e.g. in tests).
    pub fn connection(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

/// Columns added to `requests` after its `STRICT` layout (version 1), with their
/// types: a log made before gets them (`ALTER TABLE … ADD COLUMN`) when opened
/// (`cache_hit`: 0 on the rows already there).
const ADDED_COLUMNS: [(&str, &str); 6] = [
    ("app_url", "TEXT"),
    ("app_title", "TEXT"),
    ("cache_hit", "INTEGER NOT NULL DEFAULT 0"),
    ("key_name", "TEXT"),
    ("key_labels", "TEXT"),
    ("client_ip", "TEXT"),
];

/// Adds the [`ADDED_COLUMNS`] that `requests` lacks.
fn add_missing_columns(conn: &rusqlite::Connection) -> Result<(), String> {
    let have: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('requests')")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| e.to_string())?;
    for (name, ty) in ADDED_COLUMNS {
        if !have.iter().any(|h| h == name) {
            conn.execute_batch(&format!("ALTER TABLE requests ADD COLUMN {name} {ty}"))
                .map_err(|e| format!("cannot add column `{name}`: {e}"))?;
        }
    }
    Ok(())
}

/// Columns of the `requests` table.
const COLUMNS: usize = 28;

/// Every column of `requests`, in the order [`bind`] binds them.
const INSERT_COLUMNS: &str = "id, time_ms, key_id, requested_model, model, provider, status, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_pico, latency_ms, ttft_ms, streamed, complete, finish_reason, error_code, attempts, prompt, completion, over_reserve, app_url, app_title, cache_hit, key_name, key_labels, client_ip";

/// Rows per multi-row `INSERT`, largest first: a batch goes in as many 32-row
/// statements as fit, then 8-row ones, then single rows. One statement run per
/// several records, not per record, saves SQLite's per-statement work (opening the
/// B-tree cursors, the halt, the reset). 32 × 28 parameters is well under SQLite's
/// limit of 32,766.
const ROWS_PER_INSERT: [usize; 3] = [32, 8, 1];

/// `INSERT OR IGNORE INTO requests (…) VALUES (?, …), …` for `rows` rows (the
/// columns named: a log that got its later columns by `ALTER TABLE` may hold them
/// in another order).
fn insert_sql(rows: usize) -> String {
    let row = format!("({})", vec!["?"; COLUMNS].join(","));
    format!(
        "INSERT OR IGNORE INTO requests ({INSERT_COLUMNS}) VALUES {}",
        vec![row; rows].join(",")
    )
}

/// Binds `r` to the 28 parameters after the first `at` (row `n` of a multi-row
/// `INSERT` has `at = n × 28`).
/// `scratch` holds the row's `attempts` JSON (SQLite copies bound text).
fn bind(
    stmt: &mut rusqlite::Statement<'_>,
    at: usize,
    r: &RequestRecord,
    scratch: &mut Vec<u8>,
) -> io::Result<()> {
    scratch.clear();
    attempts_json(scratch, &r.attempts);
    // JSON of `&str`s and integers: UTF-8 by construction.
    let attempts = std::str::from_utf8(scratch).map_err(io::Error::other)?;
    let prompt = r.prompt.as_ref().map(|p| p.to_string());
    let labels = labels_json(&r.key_labels);
    let values: [&dyn rusqlite::ToSql; COLUMNS] = [
        &r.id,
        &int(r.time_ms),
        &r.key_id,
        &r.requested_model,
        &r.model,
        &r.provider,
        &r.status,
        &int(r.prompt_tokens),
        &int(r.completion_tokens),
        &int(r.cached_tokens),
        &int(r.reasoning_tokens),
        &r.cost.pico(),
        &int(r.latency_ms),
        &r.ttft_ms.map(int),
        &r.streamed,
        &r.complete,
        &r.finish_reason,
        &r.error_code,
        &attempts,
        &prompt,
        &r.completion,
        &r.over_reserve,
        &r.app_url,
        &r.app_title,
        &r.cache_hit,
        &r.key_name,
        &labels,
        &r.client_ip,
    ];
    for (i, v) in values.iter().enumerate() {
        stmt.raw_bind_parameter(at + i + 1, v).map_err(sql_err)?;
    }
    Ok(())
}

/// The `key_labels` column: the labels as a JSON object (`NULL` without a key).
pub(super) fn labels_json(labels: &Option<crate::keys::Labels>) -> Option<String> {
    labels
        .as_ref()
        .map(|l| serde_json::to_string(l).unwrap_or_default())
}

/// The `attempts` column: the JSON array `serde_json` writes for `attempts`, written
/// directly (serde escapes every field name at every row).
pub(super) fn attempts_json(out: &mut Vec<u8>, attempts: &[super::AttemptLog]) {
    crate::json::push_attempts(
        out,
        attempts.iter().map(|a| crate::json::Attempt {
            provider: &a.provider,
            model: Some(&a.model),
            status: &a.status,
            latency_ms: a.latency_ms,
        }),
    );
}

impl LogSink for SqliteSink {
    /// A read-only reader of the file ([`SqliteUsage`](super::SqliteUsage)); none for
    /// a log in memory (no other connection can see it).
    fn usage_source(&self) -> Option<std::sync::Arc<dyn super::UsageSource>> {
        let path = self.path.clone()?;
        Some(std::sync::Arc::new(super::SqliteUsage::new(path)))
    }

    fn write(&mut self, batch: &[RequestRecord]) -> io::Result<()> {
        let mut scratch = Vec::with_capacity(256);
        let tx = self.conn.transaction().map_err(sql_err)?;
        let mut rest = batch;
        for (rows, sql) in ROWS_PER_INSERT.iter().zip(&self.inserts) {
            if rest.len() < *rows {
                continue;
            }
            let mut insert = tx.prepare_cached(sql).map_err(sql_err)?;
            let mut chunks = rest.chunks_exact(*rows);
            for chunk in &mut chunks {
                for (n, r) in chunk.iter().enumerate() {
                    bind(&mut insert, n * COLUMNS, r, &mut scratch)?;
                }
                insert.raw_execute().map_err(sql_err)?;
            }
            rest = chunks.remainder();
        }
        tx.commit().map_err(sql_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::CallContext;
    use crate::logging::JsonlSink;

    fn record(i: usize) -> RequestRecord {
        let ctx = CallContext::with_id(format!("gen-{i}"));
        RequestRecord::from_context(&ctx, Duration::ZERO, true, false)
    }

    #[test]
    fn the_attempts_column_is_what_serde_json_writes() {
        let attempt =
            |provider: &str, model: &str, status: &str, latency_ms| super::super::AttemptLog {
                provider: provider.into(),
                model: model.into(),
                status: status.into(),
                latency_ms,
            };
        for attempts in [
            vec![],
            vec![attempt("a", "m/x", "200", 12)],
            vec![
                attempt("p\"q", "m\\n\u{1}", "timeout", 0),
                attempt("é😀", "", "503", u64::MAX),
            ],
        ] {
            let mut ours = Vec::new();
            attempts_json(&mut ours, &attempts);
            assert_eq!(ours, serde_json::to_vec(&attempts).unwrap());
        }
    }

    #[test]
    fn sqlite_rows_in_full_inserts_and_the_rest_are_all_written_once() {
        let mut sink = SqliteSink::memory().unwrap();
        // 73 records: two 32-row inserts, an 8-row one and a single row; an id twice.
        let mut batch: Vec<RequestRecord> = (0..72).map(record).collect();
        batch.push(record(5));
        for (i, r) in batch.iter_mut().enumerate() {
            r.status = 200 + (i % 72) as u16;
            r.prompt_tokens = i as u64;
        }
        sink.write(&batch).unwrap();
        // Written again (a retried batch): nothing doubles.
        sink.write(&batch).unwrap();
        let conn = sink.connection();
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 72);
        for i in [0usize, 31, 32, 63, 64, 71] {
            let (status, prompt, attempts): (u16, i64, String) = conn
                .query_row(
                    "SELECT status, prompt_tokens, attempts FROM requests WHERE id = ?1",
                    [format!("gen-{i}")],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap();
            assert_eq!(
                (status, prompt, attempts.as_str()),
                (200 + i as u16, i as i64, "[]")
            );
        }
    }

    #[test]
    fn the_cache_hit_flag_is_a_column_of_the_sqlite_log() {
        let mut sink = SqliteSink::memory().unwrap();
        let mut hit = record(1);
        hit.cache_hit = true;
        // In a multi-row insert (8 rows) and in a single-row one.
        let mut batch: Vec<RequestRecord> = (10..18).map(record).collect();
        batch[3].cache_hit = true;
        batch.push(hit);
        sink.write(&batch).unwrap();
        let hits: Vec<String> = sink
            .connection()
            .prepare("SELECT id FROM requests WHERE cache_hit = 1 ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(hits, ["gen-1", "gen-13"]);
        let misses: i64 = sink
            .connection()
            .query_row(
                "SELECT count(*) FROM requests WHERE cache_hit = 0",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(misses, 7);
    }

    /// Rows per second the SQLite request log takes, in batches of 10, 50 and 300 (run
    /// with `cargo test --release --lib -- --ignored log_sink_throughput --nocapture`).
    #[test]
    #[ignore]
    fn log_sink_throughput() {
        let dir = std::env::temp_dir().join(format!("switchboard-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for batch in [10usize, 50, 300] {
            let path = dir.join(format!("log-{batch}.db"));
            let mut sink = SqliteSink::open(&path).unwrap();
            let total = 60_000;
            let records: Vec<RequestRecord> = (0..total)
                .map(|i| {
                    let mut r = record(i);
                    r.id = format!("gen-{i:012}-abcdefghijklmnopqrst");
                    r.key_id = Some("key-1".into());
                    r.model = Some("bench/model".into());
                    r.provider = Some("up".into());
                    r
                })
                .collect();
            let started = std::time::Instant::now();
            for b in records.chunks(batch) {
                sink.write(b).unwrap();
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "batch {batch}: {:.0} rows/s, {:.2} µs per row",
                total as f64 / secs,
                secs * 1e6 / total as f64
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn log_dir() -> std::path::PathBuf {
        let r: u64 = rand::random();
        let d =
            std::env::temp_dir().join(format!("switchboard-sink-{}-{r:016x}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_request_log_of_the_old_schema_is_migrated_to_a_strict_table() {
        let dir = log_dir();
        let path = dir.join("old.db");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            // The layout before STRICT (and before WITHOUT ROWID, with a time index),
            // and before the `over_reserve` column.
            conn.execute_batch(&format!(
                "CREATE TABLE requests ({});
                 CREATE INDEX requests_time ON requests (time_ms);",
                REQUESTS_TABLE
                    .split_once('(')
                    .unwrap()
                    .1
                    .rsplit_once(')')
                    .unwrap()
                    .0
                    .replace(",\n    over_reserve      INTEGER NOT NULL DEFAULT 0", "")
            ))
            .unwrap();
            conn.execute(
                &format!("INSERT INTO requests ({REQUESTS_COLUMNS}) VALUES ('gen-1', 1, 'key_a', 'm/x', 'm/x', 'p', 200, 4, 6, 0, 0, 500, 12, NULL, 0, 1, 'stop', NULL, '[]', NULL, NULL)"),
                [],
            )
            .unwrap();
        }
        let sink = SqliteSink::open(&path).unwrap();
        let c = sink.connection();
        let strict: i64 = c
            .query_row(
                "SELECT strict FROM pragma_table_list WHERE name = 'requests'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(strict, 1);
        let ids: Vec<String> = c
            .prepare("SELECT id FROM requests")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ids, ["gen-1"]);
        drop(sink);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_version_1_request_log_gets_the_attribution_and_cache_hit_columns() {
        let dir = log_dir();
        let path = dir.join("v1.db");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            // The STRICT layout of version 1: no `app_url`, `app_title`, `cache_hit`.
            let v1 = REQUESTS_TABLE.replace(
                ",\n    key_name          TEXT,\n    key_labels        TEXT,\n    client_ip         TEXT",
                "",
            );
            let v1 = v1.replace(
                ",\n    app_url           TEXT,\n    app_title         TEXT,\n    cache_hit         INTEGER NOT NULL DEFAULT 0",
                "",
            );
            assert_ne!(v1, REQUESTS_TABLE);
            conn.execute_batch(&format!(
                "{}; PRAGMA user_version = 1;",
                v1.replace("{table}", "requests")
            ))
            .unwrap();
            conn.execute(
                &format!("INSERT INTO requests ({REQUESTS_COLUMNS}) VALUES ('gen-1', 1, 'key_a', 'm/x', 'm/x', 'p', 200, 4, 6, 0, 0, 500, 12, NULL, 0, 1, 'stop', NULL, '[]', NULL, NULL)"),
                [],
            )
            .unwrap();
        }
        let mut sink = SqliteSink::open(&path).unwrap();
        let mut r = record(2);
        r.app_url = Some("https://app.example/".into());
        r.app_title = Some("The App".into());
        r.cache_hit = true;
        sink.write(&[r]).unwrap();
        let rows: Vec<(String, Option<String>, Option<String>, i64)> = sink
            .connection()
            .prepare("SELECT id, app_url, app_title, cache_hit FROM requests ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            [
                ("gen-1".into(), None, None, 0),
                (
                    "gen-2".into(),
                    Some("https://app.example/".into()),
                    Some("The App".into()),
                    1
                )
            ]
        );
        drop(sink);
        // Opened again: nothing more to add.
        drop(SqliteSink::open(&path).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(unix)]
    #[test]
    fn request_logs_are_created_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = log_dir();
        let mut sqlite = SqliteSink::open(&dir.join("log.db")).unwrap();
        let mut jsonl = JsonlSink::open(&dir.join("log.jsonl")).unwrap();
        let batch = [record(1), record(2)];
        sqlite.write(&batch).unwrap();
        jsonl.write(&batch).unwrap();
        let mut names = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let mode = e.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{:?} is {mode:o}", e.file_name());
            names.push(e.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        assert_eq!(names, ["log.db", "log.db-shm", "log.db-wal", "log.jsonl"]);
        drop(sqlite);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
