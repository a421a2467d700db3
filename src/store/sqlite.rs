//! The embedded store: one SQLite file in WAL mode, a ledger journal with one
//! group-commit writer and an applier thread,
//! passive checkpoints from a connection of their own, and in-memory accounts.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use rusqlite::{params, Connection, OptionalExtension};

use super::journal::{self, Entry};
use super::schema;
use super::Reservation;
use super::{
    hash_secret, new_key_id, now_unix, utc_day, Balance, Generation, GenerationAttempt, KeyPatch,
    KeyStore, Ledger, NewKey, SecretHash, Settlement, StoreError, StoredKey,
};
use crate::config::{KeyConfig, StoreConfig, SyncMode};
use crate::error::GatewayError;
use crate::keys::KeyRecord;
use crate::money::{Money, MAX_CHARGE, MAX_CREDITS, MAX_SPENT};

/// The store's schema version (`PRAGMA user_version`): 1 = `STRICT` tables (see
/// [`schema`]).
const SCHEMA_VERSION: i64 = 1;

/// The store's tables, each `STRICT`: an `INTEGER` column never holds a REAL.
const TABLES: [schema::Table; 3] = [
    schema::Table {
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
    schema::Table {
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
    schema::Table {
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
/// transaction; see [`schema`]).
fn prepare_schema(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    schema::migrate(conn, SCHEMA_VERSION, &TABLES, "")
        .map_err(|e| StoreError(format!("cannot prepare the store {}: {e}", path.display())))
}

/// A count (tokens, milliseconds, seconds) as SQLite's signed integer: past
/// `i64::MAX` it is `i64::MAX` (only an absurd upstream report gets there), never a
/// negative number.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One key's money, in memory; changed only under its own lock.
#[derive(Debug, Default)]
struct Account {
    credits: Money,
    spent: Money,
    reserved: Money,
    /// Tokens held by requests in flight (against `tokens_per_day`).
    reserved_tokens: u64,
    day: u64,
    day_tokens: u64,
}

type Accounts = RwLock<HashMap<String, Arc<Mutex<Account>>>>;

enum Cmd {
    Settle(
        Box<Settlement>,
        Option<tokio::sync::oneshot::Sender<Result<bool, StoreError>>>,
    ),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The embedded SQLite [`KeyStore`] + [`Ledger`]; see the [module docs](super).
///
/// - WAL mode, `synchronous=NORMAL` (or `FULL` with `[store].sync = "full"`);
/// - one writer: whoever holds its turn takes every settlement waiting in its
///   queue, appends them to the ledger journal in one `write` (see the `journal`
///   module), updates the in-memory accounts, then answers each waiter (group
///   commit: one write per batch, not per request). With `sync = "normal"` the turn
///   runs on the caller's tokio runtime, else on a writer thread (see `Writer` in
///   this module);
/// - an applier thread commits what was journaled to SQLite every 50 ms, in one
///   transaction; opening the store first commits what a crashed process left in
///   the journal (idempotent by request id);
/// - WAL auto-checkpoints are off on the applier; a checkpoint thread copies the
///   WAL back from its own connection, so the copying never runs inside a commit;
///   when steady load keeps that from ever finishing, it finishes it with the
///   applier paused for a short pass, so the WAL starts over instead of growing (see
///   `Checkpointer` in this module);
/// - administration (create, update, top-up) writes through short transactions of
///   its own; SQLite serialises them with the writer.
///
/// Balances: the in-memory account of a key (credits, spent, reserved) is the
/// balance. Spending only ever happens through this ledger. Credits only grow
/// (creation, top-ups); a top-up through [`Ledger::top_up`] counts at once, and one
/// made by another process (the `switchboard keys top-up` CLI) is seen the moment it
/// matters: before refusing a request with 402, the ledger re-reads the key's credits
/// from the database. One store owns a file's ledger at a time (it holds
/// `<db>-ledger.lock`, see [`SqliteStore::owns_ledger`]).
///
/// Repeats: a request id settled again while it is journaled, or within 30–60 s of
/// reaching SQLite, resolves `false`. One repeated later resolves `true`, and the
/// applier, finding the id in SQLite, takes the charge back from the account: it is
/// never charged twice either way.
pub struct SqliteStore {
    path: PathBuf,
    temporary: bool,
    sync: SyncMode,
    readers: Mutex<Vec<Connection>>,
    accounts: Arc<Accounts>,
    writer: Arc<Writer>,
    /// The writer thread, then the applier (joined in this order on drop).
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    _stop_checkpoints: mpsc::Sender<()>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The file a store URL names: `sqlite://PATH`, or a private temporary file for
/// `sqlite::memory:` (removed when the store is dropped).
pub fn store_path(url: &str) -> Result<(PathBuf, bool), StoreError> {
    if url == "sqlite::memory:" {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let r: u64 = rand::random();
        let p = std::env::temp_dir().join(format!(
            "switchboard-mem-{}-{n}-{r:016x}.db",
            std::process::id()
        ));
        return Ok((p, true));
    }
    match url.strip_prefix("sqlite://") {
        Some(p) if !p.is_empty() => Ok((PathBuf::from(p), false)),
        _ => Err(StoreError(format!(
            "store.url `{url}` is not supported; use sqlite://PATH"
        ))),
    }
}

fn open_conn(path: &Path, sync: SyncMode) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|e| {
        StoreError(format!(
            "cannot open the store {}: {e} (check [store].url and that its directory exists and is writable)",
            path.display()
        ))
    })?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError(format!(
            "the store {} cannot use WAL mode (got `{mode}`)",
            path.display()
        )));
    }
    let s = match sync {
        SyncMode::Normal => "NORMAL",
        SyncMode::Full => "FULL",
    };
    conn.execute_batch(&format!("PRAGMA synchronous={s};"))?;
    Ok(conn)
}

fn money(v: i64) -> Money {
    Money::from_pico(v)
}

/// Refuses credits or a limit outside `0..=`[`MAX_CREDITS`] (callers validate first;
/// this keeps the store's own bound whoever calls it).
fn check_amounts(credits: Money, limit: Option<Money>) -> Result<(), StoreError> {
    if !credits.within(MAX_CREDITS) || limit.is_some_and(|l| !l.within(MAX_CREDITS)) {
        return Err(StoreError(format!(
            "credits and limits must be from $0 to ${MAX_CREDITS}"
        )));
    }
    Ok(())
}

fn row_to_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredKey> {
    let models: Option<String> = r.get("models")?;
    let record = KeyRecord {
        id: r.get("id")?,
        name: r.get("name")?,
        disabled: r.get::<_, i64>("disabled")? != 0,
        limit: r.get::<_, Option<i64>>("limit_pico")?.map(money),
        rpm: r.get::<_, Option<i64>>("rpm")?.map(|v| v as u32),
        tokens_per_day: r.get::<_, Option<i64>>("tokens_per_day")?.map(|v| v as u64),
        models: models.and_then(|m| serde_json::from_str(&m).ok()),
    };
    Ok(StoredKey {
        record,
        created: r.get::<_, i64>("created")? as u64,
        credits: money(r.get("credits_pico")?),
        spent: money(r.get("spent_pico")?),
    })
}

const KEY_COLUMNS: &str = "id, name, created, disabled, credits_pico, spent_pico, limit_pico, rpm, tokens_per_day, models";

fn models_json(m: &Option<Vec<String>>) -> Option<String> {
    m.as_ref()
        .map(|m| serde_json::to_string(m).unwrap_or_default())
}

impl SqliteStore {
    /// Opens (creating on first start) the store `config.url` names.
    pub fn open(config: &StoreConfig) -> Result<Arc<SqliteStore>, StoreError> {
        let (path, temporary) = store_path(&config.url)?;
        let sync = config.sync;
        // Created here, mode 0600, so that SQLite's own files (-wal, -shm) take the
        // same mode; the journal's files are created 0600 too.
        super::create_private(&path).map_err(|e| {
            StoreError(format!(
                "cannot create the store {}: {e} (check [store].url and that its directory exists and is writable)",
                path.display()
            ))
        })?;
        let mut writer_conn = open_conn(&path, sync)?;
        prepare_schema(&mut writer_conn, &path)?;
        // Checkpoints run from their own connection (below), never inside a commit.
        // After a burst, a WAL that starts over is cut back to this size.
        writer_conn.execute_batch(&format!(
            "PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit={WAL_SIZE_LIMIT};"
        ))?;
        // The applier holds it for each commit; the checkpointer, to pause commits
        // for its last pass.
        let writer_conn = Arc::new(WriterConn::new(writer_conn));

        let journal = open_journal(&path, sync, &writer_conn)?;
        let accounts: Arc<Accounts> = Arc::default();
        let (turns, turns_rx) = mpsc::channel::<()>();
        let (wake, wake_rx) = mpsc::channel::<()>();
        let writer = Arc::new(Writer {
            queue: Default::default(),
            conn: writer_conn.clone(),
            accounts: accounts.clone(),
            journal: journal.map(parking_lot::Mutex::new),
            durable: sync == SyncMode::Full,
            on_runtime: sync == SyncMode::Normal,
            thread: parking_lot::Mutex::new(Some(turns)),
            applier: parking_lot::Mutex::new(Some(wake)),
            handoffs: AtomicU64::new(0),
            #[cfg(test)]
            apply_paused: Default::default(),
        });
        let w = writer.clone();
        let writer_thread = std::thread::Builder::new()
            .name("switchboard-ledger".into())
            .spawn(move || writer_thread(&w, turns_rx))
            .map_err(|e| StoreError(format!("cannot start the ledger writer: {e}")))?;
        let w = writer.clone();
        let applier_thread = std::thread::Builder::new()
            .name("switchboard-apply".into())
            .spawn(move || applier_thread(&w, wake_rx))
            .map_err(|e| StoreError(format!("cannot start the ledger applier: {e}")))?;

        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let checkpointer = Checkpointer {
            conn: open_conn(&path, sync)?,
            writer: writer_conn,
        };
        std::thread::Builder::new()
            .name("switchboard-checkpoint".into())
            .spawn(move || checkpointer.run(stop_rx))
            .map_err(|e| StoreError(format!("cannot start the checkpointer: {e}")))?;

        Ok(Arc::new(SqliteStore {
            path,
            temporary,
            sync,
            readers: Mutex::new(Vec::new()),
            accounts,
            writer,
            threads: Mutex::new(vec![writer_thread, applier_thread]),
            _stop_checkpoints: stop_tx,
        }))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this store owns its file's ledger (holds `<db>-ledger.lock`) and so
    /// can settle. Another store open on the same file (the `keys` CLI next to a
    /// running gateway) administers keys, and its settlements fail.
    pub fn owns_ledger(&self) -> bool {
        self.writer.journal.is_some()
    }

    /// A stored key with the spending this process knows of: its in-memory account
    /// is ahead of the row by what is journaled and not applied yet.
    fn with_account(&self, mut key: StoredKey) -> StoredKey {
        if let Some(acc) = self
            .accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key.record.id)
        {
            let a = acc.lock().unwrap_or_else(|e| e.into_inner());
            key.spent = key.spent.max(a.spent);
            key.credits = key.credits.max(a.credits);
        }
        key
    }

    /// Upserts the bootstrap `[[keys]]` of a config: a new secret is created with its
    /// credits; a known one keeps what it has and has spent (credits are granted once)
    /// and takes the config's name, limit, rpm, tokens per day and models.
    pub fn bootstrap(&self, keys: &[KeyConfig]) -> Result<(), StoreError> {
        self.with_conn(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for k in keys {
                check_amounts(k.credits_usd, k.limit_usd)?;
                let hash = hash_secret(&k.secret);
                let name = k.name.clone().unwrap_or_else(|| "bootstrap".into());
                let updated = tx.execute(
                    "UPDATE keys SET name=?1, limit_pico=?2, rpm=?3, tokens_per_day=?4, models=?5 WHERE secret_sha256=?6",
                    params![
                        name,
                        k.limit_usd.map(Money::pico),
                        k.rpm,
                        k.tokens_per_day.map(|t| t as i64),
                        models_json(&k.models),
                        &hash[..]
                    ],
                )?;
                if updated == 0 {
                    tx.execute(
                        "INSERT INTO keys (id, secret_sha256, name, created, disabled, credits_pico, spent_pico, limit_pico, rpm, tokens_per_day, models)
                         VALUES (?1, ?2, ?3, ?4, 0, ?5, 0, ?6, ?7, ?8, ?9)",
                        params![
                            new_key_id(),
                            &hash[..],
                            name,
                            now_unix() as i64,
                            k.credits_usd.pico(),
                            k.limit_usd.map(Money::pico),
                            k.rpm,
                            k.tokens_per_day.map(|t| t as i64),
                            models_json(&k.models)
                        ],
                    )?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Runs `f` on a pooled connection (readers and administration).
    fn with_conn<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let pooled = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => open_conn(&self.path, self.sync)?,
        };
        let out = f(&mut conn);
        let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < 8 {
            pool.push(conn);
        }
        out
    }

    /// The account of `key_id`, loaded from the database on first use.
    fn account(&self, key_id: &str) -> Result<Arc<Mutex<Account>>, StoreError> {
        if let Some(a) = self
            .accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key_id)
        {
            return Ok(a.clone());
        }
        // First use. No settlement of this key can be in flight (settling needs a
        // reservation, which needs the account), so the row read here is current.
        let day = utc_day();
        let loaded = self.with_conn(|c| {
            let row = c
                .query_row(
                    "SELECT credits_pico, spent_pico FROM keys WHERE id=?1",
                    [key_id],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                )
                .optional()?;
            let tokens: Option<i64> = c
                .query_row(
                    "SELECT tokens FROM daily_tokens WHERE key_id=?1 AND day=?2",
                    params![key_id, day as i64],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(row.map(|(credits, spent)| Account {
                credits: money(credits),
                spent: money(spent),
                reserved: Money::ZERO,
                reserved_tokens: 0,
                day,
                day_tokens: tokens.unwrap_or(0) as u64,
            }))
        })?;
        let account =
            loaded.ok_or_else(|| StoreError(format!("no key `{key_id}` in the store")))?;
        let mut map = self.accounts.write().unwrap_or_else(|e| e.into_inner());
        Ok(map
            .entry(key_id.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(account)))
            .clone())
    }

    /// Re-reads a key's credits (they only grow, so the larger value is current).
    fn refresh_credits(&self, key_id: &str) -> Result<(), StoreError> {
        let credits: Option<i64> = self.with_conn(|c| {
            Ok(
                c.query_row("SELECT credits_pico FROM keys WHERE id=?1", [key_id], |r| {
                    r.get(0)
                })
                .optional()?,
            )
        })?;
        if let (Some(credits), Some(acc)) = (
            credits,
            self.accounts
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(key_id),
        ) {
            let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
            a.credits = a.credits.max(money(credits));
        }
        Ok(())
    }

    /// Holds `hold` under the key's lock: the `tokens_per_day` check (429), then
    /// credits and `limit_usd` (402), then both amounts are added to what is held.
    fn try_reserve(
        acc: &Mutex<Account>,
        key: &KeyRecord,
        hold: Reservation,
    ) -> Result<(), GatewayError> {
        let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(limit) = key.tokens_per_day {
            let used = if a.day == utc_day() { a.day_tokens } else { 0 };
            let held = used.saturating_add(a.reserved_tokens);
            if held.saturating_add(hold.tokens) > limit {
                let message = if hold.tokens > limit {
                    format!(
                        "key `{}` may use {limit} tokens a day (UTC) and this request may use up to {} (prompt + max_tokens × n); lower max_tokens or n",
                        key.name, hold.tokens
                    )
                } else {
                    format!(
                        "key `{}` has used {used} of its {limit} tokens for today (UTC), {} more are held by requests in flight, and this request may use up to {}; it resets at midnight UTC",
                        key.name, a.reserved_tokens, hold.tokens
                    )
                };
                return Err(GatewayError::RateLimited {
                    message,
                    retry_after: Some(super::until_utc_midnight()),
                });
            }
        }
        let amount = hold.amount;
        let available = a.credits - a.spent - a.reserved;
        if amount > available {
            return Err(GatewayError::InsufficientCredits(format!(
                "key `{}` has ${} of credit available (after requests in flight); this request may cost up to ${amount}. Add credits or lower max_tokens",
                key.name,
                available.max(Money::ZERO)
            )));
        }
        if let Some(limit) = key.limit {
            let left = limit - a.spent - a.reserved;
            if amount > left {
                return Err(GatewayError::InsufficientCredits(format!(
                    "key `{}` has ${} left of its ${limit} spending limit; this request may cost up to ${amount}. Raise limit_usd or lower max_tokens",
                    key.name,
                    left.max(Money::ZERO)
                )));
            }
        }
        a.reserved = a.reserved + amount;
        a.reserved_tokens = a.reserved_tokens.saturating_add(hold.tokens);
        Ok(())
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Nothing can queue a settlement any more (that takes the store). The writer
        // thread finishes the turn it may hold, then stops; what is still queued
        // (behind a turn out on a runtime, not polled yet) is journaled here; the
        // applier commits everything to SQLite and stops; the empty journal is
        // removed and the ledger's lock released, so the file can be opened again
        // at once.
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let mut threads = threads.into_iter();
        self.writer.thread.lock().take();
        if let Some(t) = threads.next() {
            let _ = t.join();
        }
        loop {
            let cmds = std::mem::take(&mut self.writer.queue.lock().cmds);
            if cmds.is_empty() {
                break;
            }
            self.writer.commit_batch(cmds);
        }
        self.writer.applier.lock().take();
        if let Some(t) = threads.next() {
            let _ = t.join();
        }
        if let Some(journal) = &self.writer.journal {
            let mut j = journal.lock();
            if j.queued.is_empty() && j.file.len() == 0 {
                let _ = std::fs::remove_file(&j.paths.journal);
            }
            if j.spare.take().is_some() {
                let _ = std::fs::remove_file(&j.paths.next);
            }
            j.closed = true;
            j.lock = None;
        }
        if self.temporary {
            self.readers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            for suffix in [
                "",
                "-wal",
                "-shm",
                "-ledger",
                "-ledger.applying",
                "-ledger.lock",
            ] {
                let mut p = self.path.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Takes the ledger of the store at `path` if no other store holds it: commits what
/// a previous process left in its journal (a crash), then starts a fresh journal.
/// `None`: another store owns it (this one can administer keys, not settle).
fn open_journal(
    path: &Path,
    sync: SyncMode,
    conn: &WriterConn,
) -> Result<Option<JournalState>, StoreError> {
    let paths = journal::Paths::new(path);
    let io = |what: &str, p: &Path, e: std::io::Error| {
        StoreError(format!(
            "cannot {what} the ledger journal {}: {e}",
            p.display()
        ))
    };
    let Some(lock) = journal::lock(&paths).map_err(|e| io("lock", &paths.lock, e))? else {
        return Ok(None);
    };
    let mut left = Vec::new();
    let mut cut = 0;
    for p in [&paths.applying, &paths.journal] {
        let (entries, skipped) = journal::read(p).map_err(|e| io("read", p, e))?;
        left.extend(entries.into_iter().map(Arc::new));
        cut += skipped;
    }
    if cut > 0 {
        tracing::warn!("ledger journal: {cut} line(s) cut by a crash were never answered as committed; skipped");
    }
    if !left.is_empty() {
        let applied = commit(&mut conn.lock(), &left)?;
        let new = applied.iter().filter(|a| **a).count();
        tracing::info!(
            "ledger journal: committed {new} settlement(s) a previous run left ({} were in SQLite already)",
            left.len() - new
        );
    }
    for p in [&paths.applying, &paths.journal, &paths.next] {
        match std::fs::remove_file(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", p, e)),
            _ => {}
        }
    }
    let durable = sync == SyncMode::Full;
    let file = journal::JournalFile::create(&paths.journal, durable)
        .map_err(|e| io("create", &paths.journal, e))?;
    let spare = journal::JournalFile::create(&paths.next, durable).ok();
    if sync == SyncMode::Full {
        journal::sync_dir(&paths.journal)
            .map_err(|e| io("sync the directory of", &paths.journal, e))?;
    }
    Ok(Some(JournalState {
        paths,
        file,
        spare,
        buf: Vec::new(),
        pending: Default::default(),
        recent: Default::default(),
        recent_since: Instant::now(),
        ids: Default::default(),
        queued: Vec::new(),
        flushes: Vec::new(),
        woken: false,
        closed: false,
        seen: open_conn(path, sync)?,
        lock: Some(lock),
    }))
}

/// WAL frames (pages) past which the checkpointer makes sure the WAL starts over.
const RESTART_FRAMES: i64 = 1000;
/// Frames added during a passive pass below which the next pass may pause commits:
/// it then has about this many frames to copy.
const CATCH_UP_FRAMES: i64 = 128;
/// Bytes a WAL file is cut back to when it starts over (after a burst).
const WAL_SIZE_LIMIT: i64 = 64 << 20;
/// Tries of a checkpoint pass that could not start (see [`Checkpointer::passive`]).
const BUSY_PASSES: u32 = 8;

/// Copies the WAL back into the database file, off the commit path.
///
/// A passive checkpoint never blocks a commit, but it copies only the frames that
/// existed when it began, and SQLite starts a WAL over (writes from its beginning
/// again) only once every frame is copied. Under steady load commits never pause
/// for a whole checkpoint, so passive checkpoints alone let the WAL grow without
/// bound: 140 MB after 10 s at 1k req/s, every commit writing to fresh pages. So
/// once the WAL is over [`RESTART_FRAMES`], the checkpointer repeats passive passes
/// until one sees few new frames, then copies those with the writer connection held:
/// commits wait for that short pass (measured 0.5–2 ms at saturation, once every
/// 500 ms), and the next commit starts the WAL over.
struct Checkpointer {
    conn: Connection,
    writer: Arc<WriterConn>,
}

impl Checkpointer {
    fn run(self, stop: mpsc::Receiver<()>) {
        loop {
            let stopping = !matches!(
                stop.recv_timeout(Duration::from_millis(500)),
                Err(mpsc::RecvTimeoutError::Timeout)
            );
            self.checkpoint();
            if stopping {
                break;
            }
        }
    }

    /// Passive passes until few frames come in during one, then, if the WAL is long
    /// enough to be worth starting over, a last pass with commits paused.
    fn checkpoint(&self) {
        let mut log = match self.passive() {
            Ok((log, _)) => log,
            Err(e) => return tracing::warn!("ledger checkpoint failed: {e}"),
        };
        // A pass reports the frames it saw; the difference with the next one's is
        // what came in meanwhile, what a paused pass would have to copy.
        for _ in 0..4 {
            if log < RESTART_FRAMES {
                return;
            }
            match self.passive() {
                Ok((now, _)) => {
                    let added = now - log;
                    log = now;
                    if added < CATCH_UP_FRAMES {
                        break;
                    }
                }
                Err(e) => return tracing::warn!("ledger checkpoint failed: {e}"),
            }
        }
        if log < RESTART_FRAMES {
            return;
        }
        let _paused = self.writer.lock();
        if let Err(e) = self.passive() {
            tracing::warn!("ledger checkpoint failed: {e}");
        }
    }

    /// `PRAGMA wal_checkpoint(PASSIVE)`: (frames in the WAL, frames copied).
    ///
    /// A pass that cannot start reports -1 frames (`SQLITE_BUSY`: a commit was
    /// updating the WAL index just then, a window a descheduled writer stretches on
    /// a busy machine); it is tried again, up to [`BUSY_PASSES`] times, so that a
    /// race with one commit does not skip the whole checkpoint (and the WAL's start
    /// over) until the next period.
    fn passive(&self) -> rusqlite::Result<(i64, i64)> {
        let mut tries = 1;
        loop {
            let pass: (i64, i64) =
                self.conn
                    .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get(1)?, r.get(2)?))
                    })?;
            if pass.0 >= 0 || tries == BUSY_PASSES {
                return Ok(pass);
            }
            tries += 1;
            std::thread::yield_now();
        }
    }
}

/// The applier's connection: locked for each commit, and by the checkpointer to
/// pause commits for its last pass.
type WriterConn = parking_lot::Mutex<Connection>;

/// How long the applier's commit waits for another connection's write lock
/// (administration, the `keys` CLI) before it retries; a settlement never waits.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// The most settlements appended in one batch.
const MAX_BATCH: usize = 1024;

/// [`commit`] on the writer connection, handing it straight to a thread waiting for
/// it when done (a fair unlock): the writer takes it again within microseconds,
/// which would starve the checkpointer of an unfair lock.
#[cfg(test)]
fn commit_fair(conn: &WriterConn, batch: &[Arc<Entry>]) -> Result<Vec<bool>, StoreError> {
    let mut guard = conn.lock();
    let result = commit(&mut guard, batch);
    parking_lot::MutexGuard::unlock_fair(guard);
    result
}

/// The ledger's one writer (SPEC §4): settlements queue here, and whoever holds the
/// writer's *turn* appends everything queued to the journal in one write, applies it
/// to the accounts, answers the waiters, and repeats until the queue is empty. The
/// applier thread then commits what was journaled to SQLite, in the background.
///
/// With `sync = "normal"` an append is one `write` into the page cache (a few µs),
/// so the turn stays on the caller's tokio runtime: under load it is a task that
/// first yields, so that the requests ready to run join its batch, then appends
/// right there; an idle writer (see [`QUIET`]) appends in the caller, at once. No
/// thread hand-off: at 1k req/s the hand-off to a writer thread and back was a
/// quarter of the gateway's CPU. The
/// writer thread takes the turn when an append could block a runtime worker:
/// `sync = "full"` (an `fdatasync` per batch), no runtime (a caller outside tokio),
/// or a runtime that is shutting down (a turn dropped unfinished passes to the
/// thread, so nothing queued is lost). SQLite's locks (another connection writing,
/// the checkpointer's paused pass) are only ever waited for by the applier.
struct Writer {
    queue: parking_lot::Mutex<Queue>,
    /// The connection the applier commits with (and the checkpointer pauses).
    conn: Arc<WriterConn>,
    accounts: Arc<Accounts>,
    /// `None`: another store owns this file's ledger, and settling fails.
    journal: Option<parking_lot::Mutex<JournalState>>,
    /// `fdatasync` after each append (`sync = "full"`).
    durable: bool,
    /// Whether turns may run on the caller's runtime (`sync = "normal"`).
    on_runtime: bool,
    /// Wakes the writer thread with the turn; `None` once the store is dropped.
    thread: parking_lot::Mutex<Option<mpsc::Sender<()>>>,
    /// Wakes the applier; `None` once the store is dropped.
    applier: parking_lot::Mutex<Option<mpsc::Sender<()>>>,
    /// Turns passed to the thread so far (read by tests).
    handoffs: AtomicU64,
    /// Tests stop the applier to leave entries in the journal, as a crash would.
    #[cfg(test)]
    apply_paused: std::sync::atomic::AtomicBool,
}

/// The journal and what it holds that SQLite does not have yet.
struct JournalState {
    paths: journal::Paths,
    file: journal::JournalFile,
    /// The next journal, at `paths.next`: the last applied one, emptied (see
    /// `Writer::recycle`), or a new one. Made outside the lock: a new mapped
    /// journal costs a reservation and reading in its pages (≈ 0.8 ms), which
    /// appends should not wait for.
    spare: Option<journal::JournalFile>,
    /// The lines of the batch being appended (kept for its capacity).
    buf: Vec<u8>,
    /// Journaled, not yet in SQLite, by request id: settling one again is a
    /// duplicate, and `/v1/generation` shows it.
    pending: foldhash::HashMap<String, Arc<Entry>>,
    /// Hashes of the request ids the applier committed lately (two generations of
    /// [`RECENT`]). A settlement whose id is neither pending nor here is new without
    /// asking SQLite, which measured ≈ 10 µs a settlement (a read transaction's
    /// locks); a hit is confirmed in SQLite. An id repeated later than that is still
    /// charged once: the applier finds it in SQLite and takes it back from the
    /// account (it was answered `true`).
    recent: [foldhash::HashSet<u64>; 2],
    recent_since: Instant,
    ids: foldhash::fast::RandomState,
    /// The same entries, in journal order, not yet taken by the applier.
    queued: Vec<Arc<Entry>>,
    /// Flushes waiting for what was journaled before them to be in SQLite.
    flushes: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The applier was woken for what is queued.
    woken: bool,
    /// The store was dropped: its journal is applied and removed, its lock released.
    closed: bool,
    /// Reads whether a request id was settled before (in SQLite).
    seen: Connection,
    /// Held for as long as this store owns the ledger (released on drop, even if a
    /// turn still out on a runtime keeps the writer alive a moment longer).
    lock: Option<std::fs::File>,
}

/// What waits for the writer, and whether a turn is out to append it.
#[derive(Default)]
struct Queue {
    cmds: Vec<Cmd>,
    turn_out: bool,
    /// When the last turn was given back (nothing left to append).
    idle_since: Option<Instant>,
}

impl Queue {
    /// The turn is given back: no one holds it, and the writer is idle from now.
    fn give_back(&mut self) {
        self.turn_out = false;
        self.idle_since = Some(Instant::now());
    }
}

/// A writer idle for this long is not under load: a new turn appends at once, in
/// the caller, instead of spawning a task that first yields for a batch to form
/// (which costs the runtime an extra poll of its I/O driver, one `epoll_wait`, per
/// append).
const QUIET: Duration = Duration::from_micros(250);

/// How long the applier lets journaled settlements gather before committing them
/// to SQLite in one transaction (so SQLite's own commit cost is shared by many).
/// 5 ms cost 66 µs of the applier's CPU per request at 1k req/s (a rotation and a
/// commit for every few requests); 50 ms took the gateway's CPU per request there
/// from 263 to 229 µs (A/B in BENCHMARKS.md). The gateway's own reads overlay what
/// is pending, so only the CLI's view of SQLite trails by this much.
const APPLY_AFTER: Duration = Duration::from_millis(50);

impl Writer {
    /// Queues `cmd`; starts a turn when none is out.
    fn submit(self: &Arc<Self>, cmd: Cmd) {
        let quiet = {
            let mut q = self.queue.lock();
            q.cmds.push(cmd);
            if std::mem::replace(&mut q.turn_out, true) {
                return;
            }
            q.idle_since.is_some_and(|t| t.elapsed() >= QUIET)
        };
        let mut turn = Turn {
            writer: self.clone(),
            done: false,
        };
        if self.on_runtime {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                if quiet {
                    turn.run_here(&rt);
                } else {
                    rt.spawn(turn.run_on_runtime());
                }
                return;
            }
        }
        turn.pass_to_thread();
    }

    /// The next batch of the turn's holder, or `None` after giving the turn back
    /// (nothing left to append).
    fn next_batch(&self) -> Option<Vec<Cmd>> {
        let mut q = self.queue.lock();
        if q.cmds.is_empty() {
            q.give_back();
            return None;
        }
        if q.cmds.len() <= MAX_BATCH {
            return Some(std::mem::take(&mut q.cmds));
        }
        Some(q.cmds.drain(..MAX_BATCH).collect())
    }

    /// Gives the turn back if nothing is queued; `false` (the turn kept) otherwise.
    fn give_back_if_idle(&self) -> bool {
        let mut q = self.queue.lock();
        if !q.cmds.is_empty() {
            return false;
        }
        q.give_back();
        true
    }

    /// Holds the turn on this thread until the queue is empty.
    fn drain_blocking(&self) {
        while let Some(batch) = self.next_batch() {
            self.commit_batch(batch);
        }
    }

    /// Journals `batch`, applies it to the accounts, answers it.
    fn commit_batch(&self, batch: Vec<Cmd>) {
        let day = utc_day();
        let mut entries = Vec::with_capacity(batch.len());
        let mut waiters = Vec::with_capacity(batch.len());
        let mut flushes = Vec::new();
        for cmd in batch {
            match cmd {
                Cmd::Settle(s, waiter) => {
                    if let Some(why) = self.refusal(&s, &entries) {
                        self.refuse(&s, why, waiter);
                        continue;
                    }
                    entries.push(Arc::new(Entry {
                        settlement: *s,
                        day,
                    }));
                    waiters.push(waiter);
                }
                Cmd::Flush(w) => flushes.push(w),
            }
        }
        let result = if entries.is_empty() {
            Ok(Vec::new())
        } else {
            self.append(&entries)
        };
        if let Err(e) = &result {
            tracing::error!(
                "ledger commit of {} settlement(s) failed: {e}",
                entries.len()
            );
        }
        // Accounts change only after the commit, and before anyone is answered; a
        // failed commit charged nothing, and releases its reservations all the same.
        {
            let map = self.accounts.read().unwrap_or_else(|e| e.into_inner());
            for (i, e) in entries.iter().enumerate() {
                let s = &e.settlement;
                let Some(acc) = map.get(&s.key_id) else {
                    continue;
                };
                let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
                a.reserved = (a.reserved - s.reserved.amount).max(Money::ZERO);
                a.reserved_tokens = a.reserved_tokens.saturating_sub(s.reserved.tokens);
                if result.as_ref().is_ok_and(|applied| applied[i]) {
                    // Within MAX_SPENT + MAX_CREDITS by `refusal`: never `None`.
                    a.spent = a
                        .spent
                        .checked_add(s.generation.total_cost)
                        .unwrap_or(Money::from_pico(i64::MAX));
                    if a.day != e.day {
                        a.day = e.day;
                        a.day_tokens = 0;
                    }
                    a.day_tokens = a.day_tokens.saturating_add(s.tokens);
                }
            }
        }
        for (i, waiter) in waiters.into_iter().enumerate() {
            if let Some(w) = waiter {
                let _ = w.send(match &result {
                    Ok(applied) => Ok(applied[i]),
                    Err(e) => Err(e.clone()),
                });
            }
        }
        if !flushes.is_empty() {
            self.flush_after_apply(flushes);
        }
    }

    /// Why the ledger refuses a settlement before journaling it, if it does: a charge
    /// outside `0..=`[`MAX_CHARGE`], or one larger than its own reservation that would
    /// take the key's spending past [`MAX_SPENT`] (`earlier`: this batch's entries so
    /// far).
    ///
    /// A charge within its reservation needs no look at the account: reservations are
    /// admitted only while credits (≤ [`MAX_CREDITS`]) cover spent + reserved, so such
    /// charges never add more than the key's credits, and once a key's spending is
    /// past its credits no reservation is admitted. Spending thus stays below
    /// `MAX_SPENT + MAX_CREDITS` (3 × 10¹⁸ pico-USD < `i64::MAX`), in memory and in
    /// SQLite: no sum can overflow.
    fn refusal(&self, s: &Settlement, earlier: &[Arc<Entry>]) -> Option<String> {
        let cost = s.generation.total_cost;
        if !cost.within(MAX_CHARGE) {
            return Some(format!(
                "a charge of ${cost} is outside the ledger's bounds ($0 to ${MAX_CHARGE})"
            ));
        }
        if cost <= s.reserved.amount {
            return None;
        }
        let spent = self
            .accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&s.key_id)
            .map_or(Money::ZERO, |a| {
                a.lock().unwrap_or_else(|e| e.into_inner()).spent
            });
        let after = earlier
            .iter()
            .filter(|e| e.settlement.key_id == s.key_id)
            .try_fold(spent, |sum, e| {
                sum.checked_add(e.settlement.generation.total_cost)
            })
            .and_then(|sum| sum.checked_add(cost));
        match after {
            Some(after) if after <= MAX_SPENT => None,
            _ => Some(format!(
                "a charge of ${cost} (more than its reservation of ${}) would take the spending of key `{}` past ${MAX_SPENT}",
                s.reserved.amount, s.key_id
            )),
        }
    }

    /// Answers a refused settlement with an error and gives back its reservation:
    /// nothing of it is journaled or charged.
    fn refuse(
        &self,
        s: &Settlement,
        why: String,
        waiter: Option<tokio::sync::oneshot::Sender<Result<bool, StoreError>>>,
    ) {
        tracing::error!(
            "ledger: settlement {} refused, not charged: {why}",
            s.generation.id
        );
        if let Some(acc) = self
            .accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&s.key_id)
        {
            let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
            a.reserved = (a.reserved - s.reserved.amount).max(Money::ZERO);
            a.reserved_tokens = a.reserved_tokens.saturating_sub(s.reserved.tokens);
        }
        if let Some(w) = waiter {
            let _ = w.send(Err(StoreError(format!("settlement refused: {why}"))));
        }
    }

    /// Appends the settlements not seen before to the journal, in one write; per
    /// settlement, whether it charged (false: its request id was settled before).
    fn append(&self, entries: &[Arc<Entry>]) -> Result<Vec<bool>, StoreError> {
        let Some(journal) = &self.journal else {
            return Err(StoreError(
                "another process owns this store's ledger (its -ledger.lock is held); settle through that gateway".into(),
            ));
        };
        let mut guard = journal.lock();
        let j = &mut *guard;
        if j.closed {
            return Err(StoreError("the store is closed".into()));
        }
        let mut fresh = Vec::with_capacity(entries.len());
        // Ids new in this batch so far (a batch is up to MAX_BATCH long).
        let mut batch_ids = foldhash::HashSet::<&str>::default();
        for e in entries {
            let id = e.settlement.generation.id.as_str();
            let twice = j.pending.contains_key(id)
                || batch_ids.contains(id)
                || (j.applied_lately(id) && settled_before(&j.seen, id)?);
            if !twice && entries.len() > 1 {
                batch_ids.insert(id);
            }
            fresh.push(!twice);
        }
        j.buf.clear();
        for (e, _) in entries.iter().zip(&fresh).filter(|(_, f)| **f) {
            e.write_line(&mut j.buf);
        }
        if !j.buf.is_empty() {
            j.file
                .append(&j.buf, self.durable)
                .map_err(|e| StoreError(format!("cannot write the ledger journal: {e}")))?;
        }
        for (e, _) in entries.iter().zip(&fresh).filter(|(_, f)| **f) {
            j.pending
                .insert(e.settlement.generation.id.clone(), e.clone());
            j.queued.push(e.clone());
        }
        if !j.queued.is_empty() && !std::mem::replace(&mut j.woken, true) {
            self.wake_applier();
        }
        Ok(fresh)
    }

    fn wake_applier(&self) {
        if let Some(tx) = self.applier.lock().as_ref() {
            let _ = tx.send(());
        }
    }

    /// Answers `flushes` once what was journaled before them is in SQLite.
    fn flush_after_apply(&self, flushes: Vec<tokio::sync::oneshot::Sender<()>>) {
        let Some(journal) = &self.journal else {
            return;
        };
        let mut j = journal.lock();
        j.flushes.extend(flushes);
        if !std::mem::replace(&mut j.woken, true) {
            drop(j);
            self.wake_applier();
        }
    }

    /// Commits everything journaled so far to SQLite: takes it (the journal starts
    /// over in a fresh file), commits it in one transaction, deletes the file it was
    /// in, answers the flushes. A failed commit is retried (with `stopping`, left in
    /// the journal files for the next open to replay).
    fn apply_journaled(&self, stopping: bool) {
        let Some(journal) = &self.journal else {
            return;
        };
        #[cfg(test)]
        if self.apply_paused.load(Ordering::SeqCst) {
            journal.lock().woken = false;
            return;
        }
        let (entries, flushes, rotated) = {
            let mut j = journal.lock();
            j.woken = false;
            let flushes = std::mem::take(&mut j.flushes);
            if j.queued.is_empty() {
                drop(j);
                flushes.into_iter().for_each(|w| {
                    let _ = w.send(());
                });
                return;
            }
            let entries = std::mem::take(&mut j.queued);
            // If the journal cannot start over, its lines stay: replay commits them
            // again, and the request id makes that charge nothing twice.
            let rotated = match self.rotate(&mut j) {
                Ok(old) => Some(old),
                Err(e) => {
                    tracing::warn!("the ledger journal cannot start over: {e}");
                    None
                }
            };
            (entries, flushes, rotated)
        };
        let mut delay = Duration::from_millis(10);
        loop {
            let done = {
                let mut conn = self.conn.lock();
                conn.busy_timeout(BUSY_TIMEOUT)
                    .map_err(StoreError::from)
                    .and_then(|()| commit(&mut conn, &entries))
            };
            match done {
                Ok(applied) => break self.take_back_repeats(&entries, &applied),
                Err(e) if stopping => {
                    return tracing::error!(
                        "{} journaled settlement(s) are not in SQLite yet ({e}); the next start commits them",
                        entries.len()
                    );
                }
                Err(e) => {
                    tracing::error!(
                        "committing {} journaled settlement(s) to SQLite failed ({e}); retrying in {delay:?}",
                        entries.len()
                    );
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
        if let Some(old) = rotated {
            self.recycle(journal, old);
        }
        let mut j = journal.lock();
        if j.recent_since.elapsed() >= RECENT {
            j.recent.swap(0, 1);
            j.recent[0].clear();
            j.recent_since = Instant::now();
        }
        // A pending id is never journaled again, so its entry is this one.
        for e in &entries {
            let id = &e.settlement.generation.id;
            j.pending.remove(id);
            let h = j.ids.hash_one(id);
            j.recent[0].insert(h);
        }
        drop(j);
        flushes.into_iter().for_each(|w| {
            let _ = w.send(());
        });
    }

    /// Takes back from the accounts the entries SQLite already had (`applied` false):
    /// a request id settled again after [`RECENT`], answered as charged.
    fn take_back_repeats(&self, entries: &[Arc<Entry>], applied: &[bool]) {
        let map = self.accounts.read().unwrap_or_else(|e| e.into_inner());
        for (e, _) in entries.iter().zip(applied).filter(|(_, a)| !**a) {
            let s = &e.settlement;
            tracing::warn!(
                "request {} was settled before; not charged again",
                s.generation.id
            );
            if let Some(acc) = map.get(&s.key_id) {
                let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
                a.spent = a.spent - s.generation.total_cost;
                if a.day == e.day {
                    a.day_tokens = a.day_tokens.saturating_sub(s.tokens);
                }
            }
        }
    }

    /// The journal moves aside (to be applied) and a fresh one takes its place: the
    /// spare, if there is one. Returns the old journal, which the caller reuses
    /// (outside the lock) once SQLite has its lines.
    fn rotate(&self, j: &mut JournalState) -> std::io::Result<journal::JournalFile> {
        std::fs::rename(&j.paths.journal, &j.paths.applying)?;
        let fresh = match j.spare.take() {
            Some(spare) => std::fs::rename(&j.paths.next, &j.paths.journal).map(|()| spare),
            None => journal::JournalFile::create(&j.paths.journal, self.durable),
        };
        let fresh = match fresh {
            Ok(f) => f,
            Err(e) => {
                // Keep appending to the file we have, under its old name.
                std::fs::rename(&j.paths.applying, &j.paths.journal)?;
                return Err(e);
            }
        };
        let old = std::mem::replace(&mut j.file, fresh);
        // The lines are in a file either way; only the renames' durability waits.
        if self.durable {
            if let Err(e) = journal::sync_dir(&j.paths.journal) {
                tracing::error!(
                    "cannot sync the ledger journal's directory (sync = \"full\"): {e}"
                );
            }
        }
        Ok(old)
    }
}

/// Removes `path`, if it is there.
fn remove_if_there(path: &Path) {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!("cannot remove {}: {e}", path.display())
        }
        _ => {}
    }
}

impl Writer {
    /// After SQLite has all of `old`'s lines: `old` (at `paths.applying`) becomes
    /// the next journal (renamed to `paths.next`, never replayed, then emptied),
    /// else it is removed and a new next journal is made. All outside the lock
    /// (see `JournalState::spare`).
    fn recycle(&self, journal: &parking_lot::Mutex<JournalState>, mut old: journal::JournalFile) {
        // Only the applier thread rotates, recycles and makes spares, so what this
        // reads stays true until it acts on it.
        let (applying, next, reuse) = {
            let j = journal.lock();
            let reuse = j.spare.is_none() && !j.closed;
            (j.paths.applying.clone(), j.paths.next.clone(), reuse)
        };
        if !reuse {
            drop(old);
            return remove_if_there(&applying);
        }
        // Renamed first: a crash while it is emptied leaves it where replay never
        // looks (and where the next open removes it).
        if let Err(e) = std::fs::rename(&applying, &next) {
            tracing::debug!("the applied ledger journal is not reused: {e}");
            drop(old);
            remove_if_there(&applying);
            return self.make_spare(journal);
        }
        match old.recycle() {
            Ok(()) => journal.lock().spare = Some(old),
            Err(e) => {
                tracing::debug!("the applied ledger journal is not reused: {e}");
                drop(old);
                remove_if_there(&next);
                self.make_spare(journal);
            }
        }
    }

    /// Makes the next journal ready at `paths.next`, if none is (outside the lock:
    /// see `JournalState::spare`). Without one, the next rotation makes its own.
    fn make_spare(&self, journal: &parking_lot::Mutex<JournalState>) {
        let next = {
            let j = journal.lock();
            if j.spare.is_some() || j.closed {
                return;
            }
            j.paths.next.clone()
        };
        match journal::JournalFile::create(&next, self.durable) {
            Ok(spare) => {
                let mut j = journal.lock();
                if j.closed {
                    drop(spare);
                    let _ = std::fs::remove_file(&next);
                } else {
                    j.spare = Some(spare);
                }
            }
            Err(e) => tracing::debug!("cannot make the next ledger journal ready: {e}"),
        }
    }
}

impl JournalState {
    /// Whether the applier committed a request id of the same hash lately.
    fn applied_lately(&self, id: &str) -> bool {
        let h = self.ids.hash_one(id);
        self.recent.iter().any(|r| r.contains(&h))
    }
}

/// How long a generation of [`JournalState`]'s recent ids lasts.
const RECENT: Duration = Duration::from_secs(30);

/// Whether `id` is in SQLite's settlements already.
fn settled_before(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM settlements WHERE request_id=?1")?
        .exists([id])?)
}

/// The applier thread: each time it is woken, lets more settlements gather for
/// [`APPLY_AFTER`], then commits the journaled ones to SQLite; when the store is
/// dropped, commits what is left and stops.
fn applier_thread(writer: &Writer, wake: mpsc::Receiver<()>) {
    loop {
        let stopping = wake.recv().is_err();
        if !stopping {
            std::thread::sleep(APPLY_AFTER);
        }
        writer.apply_journaled(stopping);
        if stopping {
            return;
        }
    }
}

/// The right to append the writer's queue, held by one task or thread at a time.
/// Dropped unfinished (a task cancelled by a runtime shutting down), it passes to
/// the writer thread.
struct Turn {
    writer: Arc<Writer>,
    done: bool,
}

impl Turn {
    /// Appends on the runtime until the queue is empty, yielding before each batch:
    /// under load, requests that are ready to run now settle into this batch (the
    /// task waits behind them, and behind one poll of the I/O driver).
    async fn run_on_runtime(mut self) {
        loop {
            tokio::task::yield_now().await;
            let Some(batch) = self.writer.next_batch() else {
                self.done = true;
                return;
            };
            self.writer.commit_batch(batch);
        }
    }

    /// Appends the caller's batch right here (an idle writer, see [`QUIET`]): no
    /// batch is forming, and a spawned turn would run as soon as the caller yields
    /// anyway, after a task allocation, two task switches and a wake-up of the
    /// waiter (settlement → commit went 13 → 8–10 µs on a cold worker, uprobes,
    /// BENCHMARKS.md, fifth session). Whatever other workers queued meanwhile goes
    /// to a task, so a caller never appends more than its own batch.
    fn run_here(mut self, rt: &tokio::runtime::Handle) {
        if let Some(batch) = self.writer.next_batch() {
            self.writer.commit_batch(batch);
            if !self.writer.give_back_if_idle() {
                rt.spawn(self.run_on_runtime());
                return;
            }
        }
        self.done = true;
    }

    /// Hands the turn to the writer thread; appends here if the thread has stopped.
    fn pass_to_thread(&mut self) {
        self.done = true;
        self.writer.handoffs.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .writer
            .thread
            .lock()
            .as_ref()
            .is_some_and(|tx| tx.send(()).is_ok());
        if !sent {
            self.writer.drain_blocking();
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if !self.done {
            self.pass_to_thread();
        }
    }
}

/// The writer thread: holds the turn each time it is handed one.
fn writer_thread(writer: &Writer, turns: mpsc::Receiver<()>) {
    while turns.recv().is_ok() {
        // Let the threads that woke us queue what they have before the append.
        std::thread::yield_now();
        writer.drain_blocking();
    }
}

/// `BEGIN IMMEDIATE` (the write lock, up front), as a cached statement:
/// `Connection::transaction` parses it, and `COMMIT`, anew for every commit.
fn begin(conn: &Connection) -> rusqlite::Result<()> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    Ok(())
}

/// One transaction for a batch; per entry, whether it charged (false: that
/// request id was committed before).
fn commit(conn: &mut Connection, batch: &[Arc<Entry>]) -> Result<Vec<bool>, StoreError> {
    begin(conn)?;
    finish_commit(conn, batch)
}

/// The statements and `COMMIT` of the transaction [`begin`] opened; rolls it back on
/// failure.
fn finish_commit(conn: &mut Connection, batch: &[Arc<Entry>]) -> Result<Vec<bool>, StoreError> {
    let done = write_batch(conn, batch).and_then(|applied| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(applied)
    });
    if done.is_err() && !conn.is_autocommit() {
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!("ledger rollback failed: {e}");
        }
    }
    done
}

/// The statements of one batch, inside the transaction [`begin`] opened.
fn write_batch(tx: &Connection, batch: &[Arc<Entry>]) -> Result<Vec<bool>, StoreError> {
    let mut applied = Vec::with_capacity(batch.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO settlements (request_id, key_id, amount_pico, model, provider, streamed,
               prompt_tokens, completion_tokens, latency_ms, ttft_ms, attempts, finish_reason, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        // Checked in SQL too: a sum that would overflow updates nothing (and the
        // batch fails) instead of turning into a REAL (which the STRICT table would
        // refuse anyway). The ledger's bounds keep it far from there: see
        // `Writer::refusal`.
        let mut spend = tx.prepare_cached(
            "UPDATE keys SET spent_pico = spent_pico + ?1 WHERE id = ?2 AND spent_pico <= ?3 - ?1",
        )?;
        let mut key_exists = tx.prepare_cached("SELECT 1 FROM keys WHERE id = ?1")?;
        // A day's count saturates at i64::MAX (it is only compared with a limit).
        let mut tokens_stmt = tx.prepare_cached(
            "INSERT INTO daily_tokens (key_id, day, tokens) VALUES (?1, ?2, ?3)
             ON CONFLICT (key_id, day) DO UPDATE SET tokens = CASE
               WHEN tokens > 9223372036854775807 - excluded.tokens THEN 9223372036854775807
               ELSE tokens + excluded.tokens END",
        )?;
        // One UPDATE and one UPSERT per key (and day) per batch, not per settlement:
        // a batch is usually many requests of few keys.
        let mut per_key: HashMap<(&str, u64), (Money, u64)> = HashMap::new();
        let mut attempts = Vec::with_capacity(128);
        for e in batch {
            let s = &e.settlement;
            let g = &s.generation;
            attempts.clear();
            journal::attempts_json(&mut attempts, &g.attempts);
            // JSON of `&str`s and integers: UTF-8 by construction.
            let attempts = std::str::from_utf8(&attempts).unwrap_or("[]");
            let n = insert.execute(params![
                g.id,
                s.key_id,
                g.total_cost.pico(),
                g.model,
                g.provider,
                g.streamed,
                int(g.prompt_tokens),
                int(g.completion_tokens),
                int(g.latency_ms),
                g.ttft_ms.map(int),
                attempts,
                g.finish_reason,
                int(g.created)
            ])?;
            if n == 1 {
                let entry = per_key.entry((&s.key_id, e.day)).or_default();
                entry.0 = entry.0.checked_add(g.total_cost).ok_or_else(|| {
                    StoreError(format!(
                        "the charges of key `{}` in one batch overflow; nothing of the batch was written",
                        s.key_id
                    ))
                })?;
                entry.1 = entry.1.saturating_add(s.tokens);
            }
            applied.push(n == 1);
        }
        for ((key_id, day), (cost, tokens)) in per_key {
            if spend.execute(params![cost.pico(), key_id, i64::MAX])? == 0
                && key_exists.exists([key_id])?
            {
                return Err(StoreError(format!(
                    "charging ${cost} to key `{key_id}` would overflow its spending; nothing of the batch was written"
                )));
            }
            if tokens > 0 {
                tokens_stmt.execute(params![key_id, int(day), int(tokens)])?;
            }
        }
    }
    Ok(applied)
}

impl KeyStore for SqliteStore {
    fn find(&self, hash: &SecretHash) -> Result<Option<KeyRecord>, StoreError> {
        self.with_conn(|c| {
            Ok(c.query_row(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE secret_sha256=?1"),
                [&hash[..]],
                row_to_key,
            )
            .optional()?
            .map(|k| k.record))
        })
    }

    fn get(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        let key = self.with_conn(|c| {
            Ok(c.query_row(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE id=?1"),
                [id],
                row_to_key,
            )
            .optional()?)
        })?;
        Ok(key.map(|k| self.with_account(k)))
    }

    fn list(&self) -> Result<Vec<StoredKey>, StoreError> {
        let keys = self.with_conn(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {KEY_COLUMNS} FROM keys ORDER BY created, rowid"
            ))?;
            let rows = stmt.query_map([], row_to_key)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })?;
        Ok(keys.into_iter().map(|k| self.with_account(k)).collect())
    }

    fn create(&self, hash: SecretHash, new: NewKey) -> Result<StoredKey, StoreError> {
        check_amounts(new.credits, new.limit)?;
        let id = new_key_id();
        let created = now_unix();
        self.with_conn(|c| {
            c.execute(
                "INSERT INTO keys (id, secret_sha256, name, created, disabled, credits_pico, spent_pico, limit_pico, rpm, tokens_per_day, models)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5, 0, ?6, ?7, ?8, ?9)",
                params![
                    id,
                    &hash[..],
                    new.name,
                    created as i64,
                    new.credits.pico(),
                    new.limit.map(Money::pico),
                    new.rpm,
                    new.tokens_per_day.map(|t| t as i64),
                    models_json(&new.models)
                ],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    StoreError("a key with this secret already exists".into())
                }
                e => e.into(),
            })?;
            Ok(())
        })?;
        Ok(StoredKey {
            record: KeyRecord {
                limit: new.limit,
                rpm: new.rpm,
                tokens_per_day: new.tokens_per_day,
                models: new.models,
                ..KeyRecord::new(id, new.name)
            },
            created,
            credits: new.credits,
            spent: Money::ZERO,
        })
    }

    fn update(&self, id: &str, patch: &KeyPatch) -> Result<Option<StoredKey>, StoreError> {
        self.with_conn(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let Some(mut key) = tx
                .query_row(
                    &format!("SELECT {KEY_COLUMNS} FROM keys WHERE id=?1"),
                    [id],
                    row_to_key,
                )
                .optional()?
            else {
                return Ok(None);
            };
            patch.apply(&mut key.record);
            let r = &key.record;
            tx.execute(
                "UPDATE keys SET name=?1, disabled=?2, limit_pico=?3, rpm=?4, tokens_per_day=?5, models=?6 WHERE id=?7",
                params![
                    r.name,
                    r.disabled,
                    r.limit.map(Money::pico),
                    r.rpm,
                    r.tokens_per_day.map(|t| t as i64),
                    models_json(&r.models),
                    id
                ],
            )?;
            tx.commit()?;
            Ok(Some(key))
        })
        .map(|k| k.map(|k| self.with_account(k)))
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|c| {
            c.query_row("SELECT count(*) FROM keys", [], |_| Ok(()))?;
            Ok(())
        })
    }
}

impl SqliteStore {
    /// [`Ledger::reserve`], decided here and now (the accounts are in memory).
    pub fn reserve(&self, key: &KeyRecord, hold: Reservation) -> Result<(), GatewayError> {
        let acc = self.account(&key.id)?;
        match Self::try_reserve(&acc, key, hold) {
            Err(GatewayError::InsufficientCredits(_)) => {
                // Before refusing: a top-up made by another process (the CLI) is in the
                // database, not yet in memory. Credits only grow, so this is the only
                // way memory can be behind.
                self.refresh_credits(&key.id)?;
                Self::try_reserve(&acc, key, hold)
            }
            other => other,
        }
    }
}

impl Ledger for SqliteStore {
    fn reserve(&self, key: &KeyRecord, hold: Reservation) -> super::Admission {
        super::admitted(SqliteStore::reserve(self, key, hold))
    }

    fn release(&self, key_id: &str, hold: Reservation) {
        if let Some(acc) = self
            .accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key_id)
        {
            let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
            a.reserved = (a.reserved - hold.amount).max(Money::ZERO);
            a.reserved_tokens = a.reserved_tokens.saturating_sub(hold.tokens);
        }
    }

    fn settle(&self, s: Settlement) -> BoxFuture<'static, Result<bool, StoreError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writer.submit(Cmd::Settle(Box::new(s), Some(tx)));
        async move {
            rx.await
                .unwrap_or_else(|_| Err(StoreError("the ledger writer has stopped".into())))
        }
        .boxed()
    }

    fn settle_detached(&self, s: Settlement) {
        self.writer.submit(Cmd::Settle(Box::new(s), None));
    }

    fn flush(&self) -> BoxFuture<'static, ()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writer.submit(Cmd::Flush(tx));
        async move {
            let _ = rx.await;
        }
        .boxed()
    }

    fn balance(&self, key_id: &str) -> Result<Balance, StoreError> {
        let acc = self.account(key_id)?;
        let a = acc.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Balance {
            credits: a.credits,
            spent: a.spent,
            reserved: a.reserved,
            reserved_tokens: a.reserved_tokens,
        })
    }

    fn tokens_today(&self, key_id: &str) -> Result<u64, StoreError> {
        let acc = self.account(key_id)?;
        let a = acc.lock().unwrap_or_else(|e| e.into_inner());
        Ok(if a.day == utc_day() { a.day_tokens } else { 0 })
    }

    /// Refuses (with nothing written) a top-up that is not more than 0 or that would
    /// take the key's credits past [`MAX_CREDITS`], checked in the transaction that
    /// writes it (see [`credits_after_top_up`](super::credits_after_top_up)).
    fn top_up(&self, key_id: &str, amount: Money) -> Result<Option<Balance>, StoreError> {
        let found = self.with_conn(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let credits: Option<i64> = tx
                .query_row("SELECT credits_pico FROM keys WHERE id=?1", [key_id], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(credits) = credits else {
                return Ok(false);
            };
            let after = super::credits_after_top_up(money(credits), amount)
                .map_err(|m| StoreError(format!("top-up of key `{key_id}` refused: {m}")))?;
            tx.execute(
                "UPDATE keys SET credits_pico = ?1 WHERE id = ?2",
                params![after.pico(), key_id],
            )?;
            tx.commit()?;
            Ok(true)
        })?;
        if !found {
            return Ok(None);
        }
        self.refresh_credits(key_id)?;
        self.balance(key_id).map(Some)
    }

    fn generation(&self, id: &str) -> Result<Option<Generation>, StoreError> {
        // Journaled and not in SQLite yet (for a few milliseconds).
        if let Some(journal) = &self.writer.journal {
            if let Some(e) = journal.lock().pending.get(id) {
                return Ok(Some(e.settlement.generation.clone()));
            }
        }
        self.with_conn(|c| {
            Ok(c.query_row(
                "SELECT request_id, key_id, amount_pico, model, provider, streamed, prompt_tokens,
                        completion_tokens, latency_ms, ttft_ms, attempts, finish_reason, created
                 FROM settlements WHERE request_id=?1",
                [id],
                |r| {
                    let attempts: String = r.get(10)?;
                    Ok(Generation {
                        id: r.get(0)?,
                        key_id: r.get(1)?,
                        total_cost: money(r.get(2)?),
                        model: r.get(3)?,
                        provider: r.get(4)?,
                        streamed: r.get(5)?,
                        prompt_tokens: r.get::<_, i64>(6)? as u64,
                        completion_tokens: r.get::<_, i64>(7)? as u64,
                        latency_ms: r.get::<_, i64>(8)? as u64,
                        ttft_ms: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
                        attempts: serde_json::from_str::<Vec<GenerationAttempt>>(&attempts)
                            .unwrap_or_default(),
                        finish_reason: r.get(11)?,
                        created: r.get::<_, i64>(12)? as u64,
                    })
                },
            )
            .optional()?)
        })
    }
}

#[cfg(test)]
#[path = "sqlite_bounds.rs"]
mod bounds;

#[cfg(test)]
mod tests {
    use super::*;

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
        let d =
            std::env::temp_dir().join(format!("switchboard-unit-{}-{r:016x}", std::process::id()));
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
        }
    }

    fn entry(settlement: Settlement) -> Arc<Entry> {
        Arc::new(Entry {
            settlement,
            day: utc_day(),
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
}
