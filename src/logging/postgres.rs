//! [`PostgresSink`]: the request log in the store's PostgreSQL database
//! (`[logging].sink = "postgres"`, SPEC §6); see its docs.

use std::borrow::Cow;
use std::io;
use std::time::Duration;

use futures_util::SinkExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

use super::sqlite::{attempts_json, int};
use super::{LogSink, RequestRecord};

/// The request log's table and indexes in PostgreSQL: the columns of
/// [`SQLITE_SCHEMA`](super::SQLITE_SCHEMA), in the same order, with PostgreSQL's
/// types. Created at start if missing (under an advisory lock: several instances
/// may start at once).
pub const POSTGRES_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS requests (
    id                TEXT PRIMARY KEY,
    time_ms           BIGINT NOT NULL,
    key_id            TEXT,
    requested_model   TEXT NOT NULL,
    model             TEXT,
    provider          TEXT,
    status            INTEGER NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_tokens     BIGINT NOT NULL,
    reasoning_tokens  BIGINT NOT NULL,
    cost_pico         BIGINT NOT NULL,
    latency_ms        BIGINT NOT NULL,
    ttft_ms           BIGINT,
    streamed          BOOLEAN NOT NULL,
    complete          BOOLEAN NOT NULL,
    finish_reason     TEXT,
    error_code        TEXT,
    attempts          TEXT NOT NULL,
    prompt            TEXT,
    completion        TEXT,
    over_reserve      BOOLEAN NOT NULL DEFAULT false,
    app_url           TEXT,
    app_title         TEXT,
    cache_hit         BOOLEAN NOT NULL DEFAULT false,
    key_name          TEXT,
    key_labels        TEXT,
    client_ip         TEXT
);
ALTER TABLE requests ADD COLUMN IF NOT EXISTS app_url TEXT;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS app_title TEXT;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS cache_hit BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS key_name TEXT;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS key_labels TEXT;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS client_ip TEXT;
CREATE INDEX IF NOT EXISTS requests_key_time ON requests (key_id, time_ms);
CREATE INDEX IF NOT EXISTS requests_time ON requests (time_ms);
";

/// The key of the transaction-level advisory lock the table is created under
/// (`pg_advisory_xact_lock`): instances starting at once create it one at a time.
/// ("swbdlog" in ASCII.)
const SCHEMA_LOCK: i64 = 0x0073_7762_646c_6f67;

/// One batch: every column as an array, unnested into rows, in one statement; a
/// record already written is skipped.
const INSERT: &str = "INSERT INTO requests (id, time_ms, key_id, requested_model, model, provider, status, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_pico, latency_ms, ttft_ms, streamed, complete, finish_reason, error_code, attempts, prompt, completion, over_reserve, app_url, app_title, cache_hit, key_name, key_labels, client_ip)
SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int4[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::int8[], $15::bool[], $16::bool[], $17::text[], $18::text[], $19::text[], $20::text[], $21::text[], $22::bool[], $23::text[], $24::text[], $25::bool[], $26::text[], $27::text[], $28::text[])
ON CONFLICT (id) DO NOTHING";

/// A batch's first try: a binary `COPY` of its rows. PostgreSQL then inserts them
/// many to a page and a WAL record (`heap_multi_insert`), with no executor per row and
/// no `ON CONFLICT` check: about half of its CPU per row (500-row batches: 4.2–4.4 µs
/// against 7.4–9.8 for [`INSERT`], and the writer's 0.4 µs against 0.6–0.8; the
/// ignored test `postgres_sink_throughput` and `benches/tools/pg_log_copy.sh`,
/// BENCHMARKS.md, seventeenth session). A record written before makes the primary key refuse the
/// `COPY` whole, and the batch goes again through [`INSERT`] at once.
const COPY: &str = "COPY requests (id, time_ms, key_id, requested_model, model, provider, status, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_pico, latency_ms, ttft_ms, streamed, complete, finish_reason, error_code, attempts, prompt, completion, over_reserve, app_url, app_title, cache_hit, key_name, key_labels, client_ip) FROM STDIN (FORMAT binary)";

/// How long connecting (and preparing the table) may take before it counts as a
/// failure and is tried again later.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one batch's statement may take before the connection is given up (the
/// batch is then written again on a new one).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes request records to the `requests` table of a PostgreSQL database
/// (`[logging].sink = "postgres"`), one statement (one round trip, one transaction)
/// per batch.
///
/// The same columns as the SQLite log ([`SQLITE_SCHEMA`](super::SQLITE_SCHEMA)), in a
/// `requests` table of the database `[store].url` names: money exact in `cost_pico`
/// (`BIGINT`, 10⁻¹² USD), counts `BIGINT`, flags `BOOLEAN` (SQLite's 0 / 1), JSON
/// columns as the same text. Indexed by `(key_id, time_ms)` for a key's history and
/// by `time_ms` for a day's (see [`POSTGRES_SCHEMA`]).
///
/// Off the request path like every sink: the [`LogWriter`](super::LogWriter)'s thread
/// drives a connection of its own on a current-thread tokio runtime the sink owns.
/// A batch is one statement, so one round trip and one transaction. Its first try is
/// a binary `COPY` (the least of PostgreSQL's CPU per row); if a record of it was
/// there already (the server refuses the `COPY` whole) it goes again at once as an
/// `INSERT … SELECT * FROM UNNEST($1, …, $28)` of one array per column, `ON CONFLICT
/// (id) DO NOTHING`, as does a batch tried again after a failure (its first try may
/// have committed, and only the answer been lost): a batch written twice doubles
/// nothing.
///
/// The sink's connection sets `synchronous_commit = off` for its own session: a
/// batch's commit does not wait for the WAL flush (a fifth of PostgreSQL's CPU per
/// request at saturation went to the log's commits; BENCHMARKS.md, ninth session).
/// The records are not money: a crash of PostgreSQL itself (not of the gateway) may
/// lose the last few hundred milliseconds of them; the ledger's own statements keep
/// synchronous commits.
///
/// PostgreSQL unreachable (or restarting): the batch is kept and written again after
/// a backoff ([`LogSink::retry`]), new records wait in the writer's bounded queue,
/// and once that is full they are dropped and counted; nothing blocks or fails a
/// request. The connection, the table and its indexes are made when the writer
/// starts, and again after the connection fails.
///
/// # Example
/// ```no_run
/// use switchboard::logging::{LogWriter, PostgresSink, DEFAULT_QUEUE};
///
/// let sink = PostgresSink::open("postgres://switchboard@127.0.0.1:5432/switchboard")?;
/// let writer = LogWriter::spawn(Box::new(sink), DEFAULT_QUEUE);
/// // … hand `writer` to `Gateway::builder().log_writer(..)` or a `LoggingLayer`.
/// assert!(writer.flush(std::time::Duration::from_secs(10)));
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct PostgresSink {
    config: tokio_postgres::Config,
    /// `host:port/database`, for messages (never the password).
    target: String,
    /// Built on first use, on the writer's thread.
    rt: Option<tokio::runtime::Runtime>,
    conn: Option<Conn>,
    /// Whether the last failure is one that passes (see [`LogSink::retry`]).
    transient: bool,
    /// Whether the batch being written was tried before (its first try may have
    /// committed, and only the answer been lost).
    again: bool,
}

/// A connection with the table ready and the inserts prepared.
struct Conn {
    client: Client,
    insert: Statement,
    copy: Statement,
    /// The task driving the connection (it ends once `client` is dropped).
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSink")
            .field("target", &self.target)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl PostgresSink {
    /// A sink for the database `url` names (`postgres://…` or `postgresql://…`, as
    /// `[store].url`). Only checks the URL: the connection is made on the writer's
    /// thread when it starts, and again whenever it fails.
    pub fn open(url: &str) -> io::Result<PostgresSink> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the request log: [store].url is not a PostgreSQL URL ({e})"),
            )
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("switchboard request log");
        }
        Ok(PostgresSink {
            target: describe(&config),
            config,
            rt: None,
            conn: None,
            transient: false,
            again: false,
        })
    }

    /// Where the records go: `host:port/database` (no credentials).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The sink's runtime, taken out to run a future that borrows the sink (built on
    /// first use; put it back in `self.rt` after).
    fn take_runtime(&mut self) -> io::Result<tokio::runtime::Runtime> {
        match self.rt.take() {
            Some(rt) => Ok(rt),
            None => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| io::Error::other(format!("the request log's runtime: {e}"))),
        }
    }

    /// The connection, made (with the table) if there is none or it was closed.
    async fn connected(&mut self) -> Result<&Conn, Failure> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let conn = tokio::time::timeout(CONNECT_TIMEOUT, connect(&self.config))
                .await
                .map_err(|_| Failure::timeout("connecting", CONNECT_TIMEOUT, true))??;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_ref().expect("connected just now"))
    }

    /// Writes `rows`; a connection that was open before and turns out closed (the
    /// server dropped it while idle) is replaced once, at once.
    async fn write_rows(&mut self, rows: &Rows<'_>) -> Result<u64, Failure> {
        let reused = self.conn.is_some();
        let first = self.try_write(rows, !self.again).await;
        match first {
            Err(f) if reused && f.transient && f.connection => self.try_write(rows, false).await,
            other => other,
        }
    }

    /// One statement of `rows`: a [`COPY`] when `fresh` (no record of them can have
    /// been written), then through [`INSERT`] if one was.
    async fn try_write(&mut self, rows: &Rows<'_>, fresh: bool) -> Result<u64, Failure> {
        let conn = self.connected().await?;
        let params = rows.params();
        let mut written = if fresh {
            tokio::time::timeout(WRITE_TIMEOUT, copy(&conn.client, &conn.copy, rows)).await
        } else {
            tokio::time::timeout(WRITE_TIMEOUT, conn.client.execute(&conn.insert, &params)).await
        };
        if fresh
            && matches!(&written, Ok(Err(e)) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
        {
            // A record of the batch is there already: nothing was written.
            written =
                tokio::time::timeout(WRITE_TIMEOUT, conn.client.execute(&conn.insert, &params))
                    .await;
        }
        let failure = match written {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(e)) => Failure::from(e),
            // Not tried again at once on a new connection: the server may be stuck.
            Err(_) => Failure::timeout("writing a batch", WRITE_TIMEOUT, false),
        };
        if failure.transient {
            // A new connection next time (and the table made again, if it was dropped).
            self.conn = None;
        }
        Err(failure)
    }

    fn fail(&mut self, f: Failure) -> io::Error {
        self.transient = f.transient;
        io::Error::other(format!("PostgreSQL at {}: {}", self.target, f.message))
    }
}

impl Drop for PostgresSink {
    fn drop(&mut self) {
        let conn = self.conn.take();
        let Some(rt) = self.rt.take() else { return };
        if let Some(Conn { client, task, .. }) = conn {
            drop(client);
            // Outside a runtime (the writer's thread): let the connection say goodbye
            // to the server (a `Terminate`), briefly.
            if tokio::runtime::Handle::try_current().is_err() {
                rt.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
                });
            }
        }
        // Never blocks, so the sink may be dropped anywhere (even inside a runtime).
        rt.shutdown_background();
    }
}

impl LogSink for PostgresSink {
    /// A reader of the same database ([`PostgresUsage`](super::PostgresUsage)).
    fn usage_source(&self) -> Option<std::sync::Arc<dyn super::UsageSource>> {
        Some(std::sync::Arc::new(super::PostgresUsage::new(
            self.config.clone(),
            self.target.clone(),
        )))
    }

    fn start(&mut self) {
        let rt = match self.take_runtime() {
            Ok(rt) => rt,
            Err(e) => return tracing::warn!("request log: {e}"),
        };
        let made = rt.block_on(self.connected()).map(drop);
        self.rt = Some(rt);
        match made {
            Ok(()) => tracing::debug!("request log: writing to PostgreSQL at {}", self.target),
            Err(f) => {
                let e = self.fail(f);
                tracing::warn!(
                    "request log: {e}; records wait in the queue and are written once it answers"
                );
            }
        }
    }

    fn write(&mut self, batch: &[RequestRecord]) -> io::Result<()> {
        let rows = Rows::new(batch);
        let rt = self.take_runtime()?;
        let written = rt.block_on(self.write_rows(&rows));
        self.rt = Some(rt);
        match written {
            Ok(_) => {
                self.transient = false;
                self.again = false;
                Ok(())
            }
            Err(f) => {
                // Tried again (a transient failure), it may be there already; given
                // up, the next batch is new.
                self.again = f.transient;
                Err(self.fail(f))
            }
        }
    }

    fn retry(&self, _error: &io::Error) -> bool {
        self.transient
    }
}

/// Connects, creates the table and its indexes if missing (one at a time across
/// instances), and prepares the insert.
async fn connect(config: &tokio_postgres::Config) -> Result<Conn, Failure> {
    let (client, connection) = config.connect(NoTls).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("request log: the PostgreSQL connection ended: {e}");
        }
    });
    // The connection is the log's own: its commits do not wait for the WAL flush
    // (`synchronous_commit = off`; the log is not money, and a PostgreSQL crash loses
    // at most its last ≈ 0.6 s of records, never a charge: the ledger's statements go
    // through the store's own connections, synchronous).
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL client_min_messages = warning; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); {POSTGRES_SCHEMA} COMMIT; SET synchronous_commit = off;"
        ))
        .await?;
    let insert = client.prepare(INSERT).await?;
    let copy = client.prepare(COPY).await?;
    Ok(Conn {
        client,
        insert,
        copy,
        task,
    })
}

/// `rows` through `statement` (a prepared [`COPY`]), one transaction: every row or,
/// on any error (a record written before among them), none.
async fn copy(
    client: &Client,
    statement: &Statement,
    rows: &Rows<'_>,
) -> Result<u64, tokio_postgres::Error> {
    let mut sink = std::pin::pin!(client.copy_in::<_, bytes::Bytes>(statement).await?);
    sink.as_mut().send(rows.copy_data()).await?;
    sink.finish().await
}

/// A `TEXT` field of a binary `COPY` tuple (`None`: NULL; so is a text past 2 GiB,
/// which no request body can reach).
fn put_text(out: &mut Vec<u8>, v: Option<&str>) {
    match v.and_then(|s| Some((s, i32::try_from(s.len()).ok()?))) {
        Some((s, len)) => {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
    }
}

/// An optional text as [`put_text`] takes it.
fn opt<'t>(c: &'t Option<Cow<'_, str>>) -> Option<&'t str> {
    c.as_deref()
}

/// An `INT8` field of a binary `COPY` tuple (`None`: NULL).
fn put_int8(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => {
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&v.to_be_bytes());
        }
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
    }
}

/// An `INT4` field of a binary `COPY` tuple.
fn put_int4(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&4i32.to_be_bytes());
    out.extend_from_slice(&v.to_be_bytes());
}

/// A `BOOL` field of a binary `COPY` tuple.
fn put_bool(out: &mut Vec<u8>, v: bool) {
    out.extend_from_slice(&1i32.to_be_bytes());
    out.push(u8::from(v));
}

/// Why a connection or a write failed, and whether trying again may succeed.
#[derive(Debug)]
struct Failure {
    message: String,
    /// Trying again later may succeed (the server is unreachable, restarting, out of
    /// connections…); else the batch is lost (the data is at fault).
    transient: bool,
    /// The connection itself failed (not the statement).
    connection: bool,
}

impl Failure {
    fn timeout(what: &str, after: Duration, connection: bool) -> Failure {
        Failure {
            message: format!("{what} took more than {after:?}"),
            transient: true,
            connection,
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        let (transient, connection) = match e.as_db_error() {
            // No answer from the server: I/O, a closed connection, a refused connect.
            None => (true, true),
            Some(db) => {
                let code = db.code().code();
                // 08 connection, 53 resources (too many connections), 57 operator
                // intervention (shutting down, starting up), 40 rollback
                // (serialization, deadlock), 58 system error, 28 / 3D the login or
                // the database (fixable without restarting us), 42P01 the table was
                // dropped (made again on the next connection).
                let passes = ["08", "53", "57", "40", "58", "28", "3D"]
                    .iter()
                    .any(|class| code.starts_with(class))
                    || code == "42P01";
                (passes, false)
            }
        };
        Failure {
            message: e
                .as_db_error()
                .map_or_else(|| e.to_string(), |db| db.to_string()),
            transient,
            connection,
        }
    }
}

/// `host:port/database` of a connection config.
fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}:{port}/{}",
        if hosts.is_empty() {
            "localhost".to_string()
        } else {
            hosts.join(",")
        },
        config.get_dbname().unwrap_or("")
    )
}

/// Text as PostgreSQL takes it: a NUL (which `TEXT` cannot hold, and SQLite can) is
/// written as U+FFFD, so one odd byte from a client or an upstream never loses a batch.
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

fn opt_text(s: &Option<String>) -> Option<Cow<'_, str>> {
    s.as_deref().map(text)
}

/// A batch as one array per column, in the table's order.
struct Rows<'a> {
    id: Vec<Cow<'a, str>>,
    time_ms: Vec<i64>,
    key_id: Vec<Option<Cow<'a, str>>>,
    requested_model: Vec<Cow<'a, str>>,
    model: Vec<Option<Cow<'a, str>>>,
    provider: Vec<Option<Cow<'a, str>>>,
    status: Vec<i32>,
    prompt_tokens: Vec<i64>,
    completion_tokens: Vec<i64>,
    cached_tokens: Vec<i64>,
    reasoning_tokens: Vec<i64>,
    cost_pico: Vec<i64>,
    latency_ms: Vec<i64>,
    ttft_ms: Vec<Option<i64>>,
    streamed: Vec<bool>,
    complete: Vec<bool>,
    finish_reason: Vec<Option<Cow<'a, str>>>,
    error_code: Vec<Option<Cow<'a, str>>>,
    attempts: Vec<String>,
    prompt: Vec<Option<String>>,
    completion: Vec<Option<Cow<'a, str>>>,
    over_reserve: Vec<bool>,
    app_url: Vec<Option<Cow<'a, str>>>,
    app_title: Vec<Option<Cow<'a, str>>>,
    cache_hit: Vec<bool>,
    key_name: Vec<Option<Cow<'a, str>>>,
    key_labels: Vec<Option<Cow<'a, str>>>,
    client_ip: Vec<Option<String>>,
}

impl<'a> Rows<'a> {
    fn new(batch: &'a [RequestRecord]) -> Rows<'a> {
        let n = batch.len();
        let mut rows = Rows {
            id: Vec::with_capacity(n),
            time_ms: Vec::with_capacity(n),
            key_id: Vec::with_capacity(n),
            requested_model: Vec::with_capacity(n),
            model: Vec::with_capacity(n),
            provider: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
            prompt_tokens: Vec::with_capacity(n),
            completion_tokens: Vec::with_capacity(n),
            cached_tokens: Vec::with_capacity(n),
            reasoning_tokens: Vec::with_capacity(n),
            cost_pico: Vec::with_capacity(n),
            latency_ms: Vec::with_capacity(n),
            ttft_ms: Vec::with_capacity(n),
            streamed: Vec::with_capacity(n),
            complete: Vec::with_capacity(n),
            finish_reason: Vec::with_capacity(n),
            error_code: Vec::with_capacity(n),
            attempts: Vec::with_capacity(n),
            prompt: Vec::with_capacity(n),
            completion: Vec::with_capacity(n),
            over_reserve: Vec::with_capacity(n),
            app_url: Vec::with_capacity(n),
            app_title: Vec::with_capacity(n),
            cache_hit: Vec::with_capacity(n),
            key_name: Vec::with_capacity(n),
            key_labels: Vec::with_capacity(n),
            client_ip: Vec::with_capacity(n),
        };
        let mut json = Vec::with_capacity(256);
        for r in batch {
            rows.id.push(text(&r.id));
            rows.time_ms.push(int(r.time_ms));
            rows.key_id.push(opt_text(&r.key_id));
            rows.requested_model.push(text(&r.requested_model));
            rows.model.push(opt_text(&r.model));
            rows.provider.push(opt_text(&r.provider));
            rows.status.push(i32::from(r.status));
            rows.prompt_tokens.push(int(r.prompt_tokens));
            rows.completion_tokens.push(int(r.completion_tokens));
            rows.cached_tokens.push(int(r.cached_tokens));
            rows.reasoning_tokens.push(int(r.reasoning_tokens));
            rows.cost_pico.push(r.cost.pico());
            rows.latency_ms.push(int(r.latency_ms));
            rows.ttft_ms.push(r.ttft_ms.map(int));
            rows.streamed.push(r.streamed);
            rows.complete.push(r.complete);
            rows.finish_reason.push(opt_text(&r.finish_reason));
            rows.error_code.push(opt_text(&r.error_code));
            json.clear();
            attempts_json(&mut json, &r.attempts);
            // JSON escapes every control character (NUL included): valid text as is.
            rows.attempts
                .push(String::from_utf8_lossy(&json).into_owned());
            rows.prompt.push(r.prompt.as_ref().map(|p| p.to_string()));
            rows.completion.push(opt_text(&r.completion));
            rows.over_reserve.push(r.over_reserve);
            rows.app_url.push(opt_text(&r.app_url));
            rows.app_title.push(opt_text(&r.app_title));
            rows.cache_hit.push(r.cache_hit);
            rows.key_name.push(opt_text(&r.key_name));
            rows.key_labels
                .push(super::sqlite::labels_json(&r.key_labels));
            rows.client_ip.push(r.client_ip.map(|ip| ip.to_string()));
        }
        rows
    }

    /// The batch in PostgreSQL's binary `COPY` format (the header, a tuple of 28
    /// fields per record in [`COPY`]'s column order, the trailer), in one buffer.
    /// Written here rather than through tokio-postgres's `BinaryCopyInWriter` (a type
    /// check and a dynamic call per value, the data sent in 4-KiB pieces): the writer's
    /// CPU per row is then below the `INSERT`'s (BENCHMARKS.md, seventeenth session).
    fn copy_data(&self) -> bytes::Bytes {
        let n = self.id.len();
        let mut out = Vec::with_capacity(21 + n * 320);
        out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        out.extend_from_slice(&[0; 8]); // flags, header extension length
        for i in 0..n {
            out.extend_from_slice(&28i16.to_be_bytes());
            put_text(&mut out, Some(&self.id[i]));
            put_int8(&mut out, Some(self.time_ms[i]));
            put_text(&mut out, opt(&self.key_id[i]));
            put_text(&mut out, Some(&self.requested_model[i]));
            put_text(&mut out, opt(&self.model[i]));
            put_text(&mut out, opt(&self.provider[i]));
            put_int4(&mut out, self.status[i]);
            put_int8(&mut out, Some(self.prompt_tokens[i]));
            put_int8(&mut out, Some(self.completion_tokens[i]));
            put_int8(&mut out, Some(self.cached_tokens[i]));
            put_int8(&mut out, Some(self.reasoning_tokens[i]));
            put_int8(&mut out, Some(self.cost_pico[i]));
            put_int8(&mut out, Some(self.latency_ms[i]));
            put_int8(&mut out, self.ttft_ms[i]);
            put_bool(&mut out, self.streamed[i]);
            put_bool(&mut out, self.complete[i]);
            put_text(&mut out, opt(&self.finish_reason[i]));
            put_text(&mut out, opt(&self.error_code[i]));
            put_text(&mut out, Some(&self.attempts[i]));
            put_text(&mut out, self.prompt[i].as_deref());
            put_text(&mut out, opt(&self.completion[i]));
            put_bool(&mut out, self.over_reserve[i]);
            put_text(&mut out, opt(&self.app_url[i]));
            put_text(&mut out, opt(&self.app_title[i]));
            put_bool(&mut out, self.cache_hit[i]);
            put_text(&mut out, opt(&self.key_name[i]));
            put_text(&mut out, opt(&self.key_labels[i]));
            put_text(&mut out, self.client_ip[i].as_deref());
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        bytes::Bytes::from(out)
    }

    /// Row `i`'s 28 values, in the table's column order (the throughput test's
    /// multi-row `VALUES`).
    #[cfg(test)]
    fn row(&self, i: usize) -> [&(dyn ToSql + Sync); 28] {
        [
            &self.id[i],
            &self.time_ms[i],
            &self.key_id[i],
            &self.requested_model[i],
            &self.model[i],
            &self.provider[i],
            &self.status[i],
            &self.prompt_tokens[i],
            &self.completion_tokens[i],
            &self.cached_tokens[i],
            &self.reasoning_tokens[i],
            &self.cost_pico[i],
            &self.latency_ms[i],
            &self.ttft_ms[i],
            &self.streamed[i],
            &self.complete[i],
            &self.finish_reason[i],
            &self.error_code[i],
            &self.attempts[i],
            &self.prompt[i],
            &self.completion[i],
            &self.over_reserve[i],
            &self.app_url[i],
            &self.app_title[i],
            &self.cache_hit[i],
            &self.key_name[i],
            &self.key_labels[i],
            &self.client_ip[i],
        ]
    }

    /// The statement's 28 parameters, in the table's column order.
    fn params(&self) -> [&(dyn ToSql + Sync); 28] {
        [
            &self.id,
            &self.time_ms,
            &self.key_id,
            &self.requested_model,
            &self.model,
            &self.provider,
            &self.status,
            &self.prompt_tokens,
            &self.completion_tokens,
            &self.cached_tokens,
            &self.reasoning_tokens,
            &self.cost_pico,
            &self.latency_ms,
            &self.ttft_ms,
            &self.streamed,
            &self.complete,
            &self.finish_reason,
            &self.error_code,
            &self.attempts,
            &self.prompt,
            &self.completion,
            &self.over_reserve,
            &self.app_url,
            &self.app_title,
            &self.cache_hit,
            &self.key_name,
            &self.key_labels,
            &self.client_ip,
        ]
    }
}

#[cfg(test)]
#[path = "postgres_tests.rs"]
mod tests;
