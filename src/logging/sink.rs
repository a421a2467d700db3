//! Where request records go: the [`LogSink`] trait, its SQLite and JSONL
//! implementations (PostgreSQL's is [`PostgresSink`](super::PostgresSink)), and the
//! [`LogWriter`] that feeds a sink off the request path.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::telemetry;

use super::RequestRecord;

/// A destination for request records.
///
/// A sink is owned by the [`LogWriter`]'s thread and only ever called there, in
/// batches, so it may block (disk, network) without delaying any response. An error
/// is logged and counted (`switchboard_log_write_errors_total`); the batch is lost,
/// unless the sink says the error will pass ([`retry`](LogSink::retry): a server that
/// is down), in which case the writer keeps the batch and writes it again after a
/// backoff while new records wait in its bounded queue (and, once that is full, are
/// dropped and counted).
///
/// # Example
/// ```
/// use std::sync::{Arc, Mutex};
/// use switchboard::logging::{LogSink, LogWriter, RequestRecord};
///
/// /// Keeps the ids of every record in memory.
/// struct Ids(Arc<Mutex<Vec<String>>>);
///
/// impl LogSink for Ids {
///     fn write(&mut self, batch: &[RequestRecord]) -> std::io::Result<()> {
///         self.0.lock().unwrap().extend(batch.iter().map(|r| r.id.clone()));
///         Ok(())
///     }
/// }
///
/// let ids = Arc::new(Mutex::new(Vec::new()));
/// let writer = LogWriter::spawn(Box::new(Ids(ids.clone())), 16);
/// writer.send(RequestRecord::from_context(
///     &switchboard::context::CallContext::with_id("gen-1".into()),
///     std::time::Duration::ZERO, true, false,
/// ));
/// assert!(writer.flush(std::time::Duration::from_secs(10)));
/// assert_eq!(*ids.lock().unwrap(), ["gen-1"]);
/// ```
pub trait LogSink: Send + 'static {
    /// Writes a batch of records (in arrival order).
    fn write(&mut self, batch: &[RequestRecord]) -> io::Result<()>;

    /// Makes everything written so far durable; called on flush and at shutdown.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Called once on the writer's thread before any write (a sink that talks to a
    /// server connects and prepares its table here). Does nothing by default.
    fn start(&mut self) {}

    /// Whether a batch whose [`write`](LogSink::write) failed with `error` is to be
    /// kept and written again after a backoff (a server that is unreachable now and
    /// may come back) rather than lost. `false` by default.
    fn retry(&self, error: &io::Error) -> bool {
        let _ = error;
        false
    }
}

/// How many records wait for the writer at most; more are dropped and counted.
pub const DEFAULT_QUEUE: usize = 8192;
/// The most records written in one batch (one transaction in SQLite).
pub const MAX_BATCH: usize = 512;

enum Msg {
    Record(Box<RequestRecord>),
    Flush(mpsc::Sender<()>),
}

/// The handle that hands records to a sink's writer thread through a bounded queue.
///
/// [`send`](LogWriter::send) never blocks: when the queue is full the record is
/// dropped and counted in `switchboard_log_records_dropped_total` (and
/// [`dropped`](LogWriter::dropped)), with a warning when the drops begin. Cheap to
/// clone; the thread drains the queue and exits when the last clone is dropped.
#[derive(Clone)]
pub struct LogWriter {
    tx: Option<SyncSender<Msg>>,
    /// The writer thread, woken early by a flush (records never wake it: it sleeps
    /// through its linger and then drains the queue).
    thread: Option<std::thread::Thread>,
    /// Shared by every clone and the thread (which also uses its count to tell
    /// whether any clone is left).
    shared: Arc<Shared>,
}

/// What a writer's clones and its thread share.
#[derive(Debug)]
struct Shared {
    /// Records dropped because the queue was full (or the thread gone).
    dropped: AtomicU64,
    /// When drops were last warned of: seconds since `since`, plus one (0: never).
    warned: AtomicU64,
    since: Instant,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            dropped: AtomicU64::new(0),
            warned: AtomicU64::new(0),
            since: Instant::now(),
        }
    }
}

/// How often, at most, drops are warned of.
const DROP_WARNING_EVERY: Duration = Duration::from_secs(60);

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter")
            .field("enabled", &self.tx.is_some())
            .finish()
    }
}

impl LogWriter {
    /// A writer that discards every record (`[logging].sink = "none"`).
    pub fn none() -> LogWriter {
        LogWriter {
            tx: None,
            thread: None,
            shared: Arc::default(),
        }
    }

    /// Starts a writer thread for `sink` with a queue of `capacity` records.
    pub fn spawn(sink: Box<dyn LogSink>, capacity: usize) -> LogWriter {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        let shared = Arc::new(Shared::default());
        let ours = shared.clone();
        let handle = std::thread::Builder::new()
            .name("switchboard-logs".into())
            .spawn(move || run(rx, sink, &ours))
            .expect("can spawn the log writer thread");
        LogWriter {
            tx: Some(tx),
            thread: Some(handle.thread().clone()),
            shared,
        }
    }

    /// The writer `[logging]` asks for: its sink opened now, so a bad path fails at
    /// start rather than at the first request.
    pub fn from_config(config: &Config) -> io::Result<LogWriter> {
        Ok(match open_sink(config)? {
            Some(sink) => LogWriter::spawn(sink, DEFAULT_QUEUE),
            None => LogWriter::none(),
        })
    }

    /// Whether records go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a record; never blocks (a full queue drops it and counts the drop).
    pub fn send(&self, record: RequestRecord) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.count_drop("its queue is full"),
            Err(TrySendError::Disconnected(_)) => self.count_drop("its writer has stopped"),
        }
    }

    /// Records dropped so far by this writer and its clones (the queue was full).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn count_drop(&self, why: &str) {
        metrics::counter!(telemetry::LOG_RECORDS_DROPPED).increment(1);
        let shared = &self.shared;
        let total = shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let now = shared.since.elapsed().as_secs() + 1;
        let last = shared.warned.load(Ordering::Relaxed);
        if (last == 0 || now - last >= DROP_WARNING_EVERY.as_secs())
            && shared
                .warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped = total,
                "the request log drops records: {why} (its sink is slow or unreachable); they are counted in {} (this warning repeats at most once a minute)",
                telemetry::LOG_RECORDS_DROPPED
            );
        }
    }

    /// Waits (blocking, up to `timeout`) until every record queued before this call is
    /// written and flushed. For shutdown and tests; false when it timed out.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(tx) = &self.tx else { return true };
        let deadline = Instant::now() + timeout;
        let (ack_tx, ack_rx) = mpsc::channel();
        let mut msg = Msg::Flush(ack_tx);
        loop {
            match tx.try_send(msg) {
                Ok(()) => {
                    if let Some(t) = &self.thread {
                        t.unpark();
                    }
                    break;
                }
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(m)) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        ack_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

/// How long the writer waits for a batch to fill after its first record. Records are
/// off the durability path, so a short wait trades nothing for far fewer, larger
/// transactions (a commit per record costs more than the record under load).
const LINGER: Duration = Duration::from_millis(50);

/// The writer thread: after a first record, sleeps for up to [`LINGER`] (a flush
/// request wakes it early), then drains the queue in batches of up to [`MAX_BATCH`].
///
/// While it lingers it is parked, not waiting on the queue, so senders never wake it:
/// one wake-up per batch instead of one per record (that was 3 context switches per
/// request under load, measured with `perf stat`).
fn run(rx: mpsc::Receiver<Msg>, mut sink: Box<dyn LogSink>, shared: &Arc<Shared>) {
    sink.start();
    let mut batch: Vec<RequestRecord> = Vec::with_capacity(MAX_BATCH);
    let mut acks = Vec::new();
    while let Ok(first) = rx.recv() {
        let until = Instant::now() + LINGER;
        let mut open = true;
        take(first, &mut batch, &mut acks);
        loop {
            // Whatever is queued now; a full batch is written at once.
            loop {
                match rx.try_recv() {
                    Ok(m) => {
                        take(m, &mut batch, &mut acks);
                        if batch.len() >= MAX_BATCH {
                            write(sink.as_mut(), &mut batch, shared);
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            let now = Instant::now();
            if !acks.is_empty() || !open || now >= until {
                break;
            }
            std::thread::park_timeout(until - now);
        }
        write(sink.as_mut(), &mut batch, shared);
        if !acks.is_empty() {
            if let Err(e) = sink.flush() {
                tracing::warn!(error = %e, "could not flush the request log");
            }
            for ack in acks.drain(..) {
                let _ = ack.send(());
            }
        }
        if !open {
            break;
        }
    }
    let _ = sink.flush();
}

fn take(msg: Msg, batch: &mut Vec<RequestRecord>, acks: &mut Vec<mpsc::Sender<()>>) {
    match msg {
        Msg::Record(r) => batch.push(*r),
        Msg::Flush(ack) => acks.push(ack),
    }
}

/// The first wait before a batch is written again (see [`LogSink::retry`]); it
/// doubles after each failure, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two tries of a batch.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Writes and empties `batch` (errors are logged and counted: the log never blocks
/// requests). A batch the sink wants retried is written again after a backoff (a
/// flush wakes it early) for as long as a [`LogWriter`] is left, while new records
/// wait in the queue; with none left, it is tried once more and then lost.
fn write(sink: &mut dyn LogSink, batch: &mut Vec<RequestRecord>, shared: &Arc<Shared>) {
    if batch.is_empty() {
        return;
    }
    let mut failures = 0u32;
    let mut wait = RETRY_FIRST;
    loop {
        let err = match sink.write(batch) {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(
                        records = batch.len(),
                        "the request log writes again (after {failures} failed tries)"
                    );
                }
                break;
            }
            Err(e) => e,
        };
        // The writer thread holds one `Shared`; every `LogWriter` clone another.
        let writers_left = Arc::strong_count(shared) > 1;
        if !(writers_left && sink.retry(&err)) {
            tracing::warn!(error = %err, records = batch.len(), "could not write request records");
            metrics::counter!(telemetry::LOG_WRITE_ERRORS).increment(batch.len() as u64);
            break;
        }
        if failures == 0 {
            tracing::warn!(
                error = %err,
                records = batch.len(),
                "could not write request records; they are kept and tried again (new records wait in the queue, and are dropped and counted once it is full)"
            );
        } else {
            tracing::debug!(error = %err, "request records not written yet");
        }
        failures = failures.saturating_add(1);
        std::thread::park_timeout(wait);
        wait = (wait * 2).min(RETRY_MAX);
    }
    batch.clear();
}

/// The log file `[logging].sink = "sqlite"` uses: `switchboard-logs.db` in the
/// directory of the `[store].url` database (`None` for an in-memory store).
pub fn sqlite_path_beside_store(store_url: &str) -> Option<PathBuf> {
    let path = store_url.strip_prefix("sqlite://")?;
    if path.is_empty() || path.starts_with(':') {
        return None;
    }
    let dir = Path::new(path).parent().unwrap_or(Path::new(""));
    Some(dir.join("switchboard-logs.db"))
}

/// Opens the sink `[logging].sink` names (`None` for `"none"`).
pub fn open_sink(config: &Config) -> io::Result<Option<Box<dyn LogSink>>> {
    let sink = config.logging.sink.as_str();
    if sink == "none" {
        return Ok(None);
    }
    if sink == "postgres" {
        return Ok(Some(Box::new(super::PostgresSink::open(
            &config.store.url,
        )?)));
    }
    if sink == "sqlite" {
        return Ok(Some(Box::new(
            match sqlite_path_beside_store(&config.store.url) {
                Some(path) => SqliteSink::open(&path)?,
                None => SqliteSink::memory()?,
            },
        )));
    }
    if let Some(path) = sink.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        return Ok(Some(Box::new(SqliteSink::open(Path::new(path))?)));
    }
    if let Some(path) = sink.strip_prefix("jsonl:") {
        return Ok(Some(Box::new(JsonlSink::open(Path::new(path))?)));
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "[logging].sink `{sink}` is not one of sqlite, sqlite:PATH, jsonl:PATH, postgres, none"
        ),
    ))
}

/// Appends one JSON object per line ([`RequestRecord`]'s fields) to a file.
#[derive(Debug)]
pub struct JsonlSink {
    out: BufWriter<File>,
}

impl JsonlSink {
    /// Opens (creating, appending to) `path`.
    pub fn open(path: &Path) -> io::Result<JsonlSink> {
        let file = crate::store::private_file_options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot open the request log {}: {e}", path.display()),
                )
            })?;
        Ok(JsonlSink {
            out: BufWriter::new(file),
        })
    }
}

impl LogSink for JsonlSink {
    fn write(&mut self, batch: &[RequestRecord]) -> io::Result<()> {
        for r in batch {
            serde_json::to_writer(&mut self.out, r)?;
            self.out.write_all(b"\n")?;
        }
        // One write per batch, visible to readers at once.
        self.out.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }
}

/// Writes records to the `requests` table of their own SQLite file (WAL), one
/// transaction per batch. Money is kept exact in `cost_pico` (10⁻¹² USD).
pub struct SqliteSink {
    conn: rusqlite::Connection,
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
    over_reserve      INTEGER NOT NULL DEFAULT 0
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

/// The index of a key's history.
const REQUESTS_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS requests_key_time ON requests (key_id, time_ms);";

/// The request log's schema version (`PRAGMA user_version`): 1 = `STRICT`. A log
/// made before is migrated when opened (a copy of its rows, in one transaction).
const SQLITE_VERSION: i64 = 1;

/// The schema of the SQLite request log (what [`SqliteSink`] creates in a new file).
pub const SQLITE_SCHEMA: &str = concat!(
    "CREATE TABLE IF NOT EXISTS requests (",
    requests_columns!(),
    ") STRICT, WITHOUT ROWID;\n",
    "CREATE INDEX IF NOT EXISTS requests_key_time ON requests (key_id, time_ms);\n"
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
        Self::init(conn)
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
            .map_err(|e| io::Error::other(format!("the request log: {e}")))?;
        Ok(SqliteSink {
            conn,
            inserts: ROWS_PER_INSERT.map(insert_sql),
        })
    }

    /// The connection (to query the log, e.g. in tests).
    pub fn connection(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

/// Columns of the `requests` table.
const COLUMNS: usize = 22;

/// Rows per multi-row `INSERT`, largest first: a batch goes in as many 32-row
/// statements as fit, then 8-row ones, then single rows. One statement run per
/// several records, not per record, saves SQLite's per-statement work (opening the
/// B-tree cursors, the halt, the reset). 32 × 22 parameters is well under SQLite's
/// limit of 32,766.
const ROWS_PER_INSERT: [usize; 3] = [32, 8, 1];

/// `INSERT OR IGNORE INTO requests VALUES (?, …), …` for `rows` rows.
fn insert_sql(rows: usize) -> String {
    let row = format!("({})", vec!["?"; COLUMNS].join(","));
    format!(
        "INSERT OR IGNORE INTO requests VALUES {}",
        vec![row; rows].join(",")
    )
}

/// Binds `r` to the 22 parameters after the first `at` (row `n` of a multi-row
/// `INSERT` has `at = n × 22`).
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
    ];
    for (i, v) in values.iter().enumerate() {
        stmt.raw_bind_parameter(at + i + 1, v).map_err(sql_err)?;
    }
    Ok(())
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

    /// A sink that reports each write and holds it until released.
    struct Gated {
        started: mpsc::Sender<usize>,
        release: mpsc::Receiver<()>,
    }
    impl LogSink for Gated {
        fn write(&mut self, batch: &[RequestRecord]) -> io::Result<()> {
            self.started.send(batch.len()).unwrap();
            self.release.recv_timeout(Duration::from_secs(30)).unwrap();
            Ok(())
        }
    }

    fn record(i: usize) -> RequestRecord {
        let ctx = CallContext::with_id(format!("gen-{i}"));
        RequestRecord::from_context(&ctx, Duration::ZERO, true, false)
    }

    #[test]
    fn records_queued_while_the_writer_is_busy_go_in_one_batch_and_a_flush_waits_for_them() {
        let (started_tx, started) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let writer = LogWriter::spawn(
            Box::new(Gated {
                started: started_tx,
                release: release_rx,
            }),
            1024,
        );
        let wait = Duration::from_secs(30);
        writer.send(record(0));
        // The first record is written alone (after its linger).
        assert_eq!(started.recv_timeout(wait).unwrap(), 1);
        // While that write is held, 99 more records and a flush queue up.
        for i in 1..100 {
            writer.send(record(i));
        }
        let flusher = {
            let writer = writer.clone();
            std::thread::spawn(move || writer.flush(wait))
        };
        release.send(()).unwrap();
        // The flush request ends the linger: the 99 go in one batch.
        assert_eq!(started.recv_timeout(wait).unwrap(), 99);
        release.send(()).unwrap();
        assert!(flusher.join().unwrap(), "the flush was acknowledged");
        assert!(started.try_recv().is_err(), "nothing else was written");
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
}
