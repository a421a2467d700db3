//! The embedded store: one SQLite file in WAL mode, a ledger journal with one
//! group-commit writer and an applier thread,
//! passive checkpoints from a connection of their own, and in-memory accounts.
//!
//! The files, by what they are: this one holds [`SqliteStore`], its opening and
//! bootstrap; `accounts` the in-memory accounts and admission (reserve); `writer`
//! the group-commit writer, the journal's state and the applier thread; `journal`
//! the journal file; `commit` the transaction that brings a batch into SQLite;
//! `checkpoint` the WAL checkpointer; `schema` the `STRICT` tables and their
//! migration; `keys` the [`KeyStore`] impl; `ledger` the [`Ledger`] impl.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection};

use super::{credits_after_top_up, hash_secret, new_key_id, now_unix, StoreError};
#[cfg(doc)]
use super::{KeyStore, Ledger};
use crate::clock::Clock;
use crate::config::{KeyConfig, StoreConfig, SyncMode};
use crate::money::Money;
use accounts::Accounts;
use checkpoint::{Checkpointer, WAL_SIZE_LIMIT};
use keys::{check_amounts, expiry, models_json, reset_text};
use schema::prepare_schema;
use writer::{applier_thread, open_journal, writer_thread, Writer};

mod accounts;
mod checkpoint;
mod commit;
mod journal;
mod keys;
mod ledger;
pub(crate) mod schema;
#[cfg(test)]
mod tests;
mod writer;

/// A count (tokens, milliseconds, seconds) as SQLite's signed integer: past
/// `i64::MAX` it is `i64::MAX` (only an absurd upstream report gets there), never a
/// negative number.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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
    /// The time of day accounting (shared with the writer).
    clock: Arc<ClockCell>,
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

impl SqliteStore {
    /// Opens (creating on first start) the store `config.url` names.
    pub fn open(config: &StoreConfig) -> Result<Arc<SqliteStore>, StoreError> {
        let (path, temporary) = store_path(&config.url)?;
        super::create_store_dir(config)?;
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
        let clock: Arc<ClockCell> = Arc::default();
        let (turns, turns_rx) = mpsc::channel::<()>();
        let (wake, wake_rx) = mpsc::channel::<()>();
        let writer = Arc::new(Writer {
            queue: Default::default(),
            conn: writer_conn.clone(),
            accounts: accounts.clone(),
            clock: clock.clone(),
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
            clock,
            threads: Mutex::new(vec![writer_thread, applier_thread]),
            _stop_checkpoints: stop_tx,
        }))
    }

    /// Sets the clock of its day accounting: `tokens_per_day`, the periods of
    /// `limit_reset`, the day a settlement counts in (default: the system clock).
    /// For tests that cross midnight without waiting for it.
    pub fn set_clock(&self, clock: Clock) {
        *self.clock.write() = clock;
    }

    /// The clock of its day accounting.
    pub fn clock(&self) -> Clock {
        self.clock.read().clone()
    }

    /// Unix seconds now, by [its clock](Self::set_clock).
    pub(super) fn now(&self) -> u64 {
        self.clock.read().now()
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

    /// Upserts the bootstrap `[[keys]]` of a config: a new secret is created with its
    /// credits; a known one keeps what it has and has spent (credits are granted once)
    /// and takes the config's name, limit, limit reset, expiry, rpm, tokens per day and
    /// models.
    pub fn bootstrap(&self, keys: &[KeyConfig]) -> Result<(), StoreError> {
        self.with_conn(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for k in keys {
                check_amounts(k.credits_usd, k.limit_usd)?;
                let hash = hash_secret(&k.secret);
                let name = k.name.clone().unwrap_or_else(|| "bootstrap".into());
                let (reset, expires) = k.period_and_expiry().map_err(StoreError)?;
                let updated = tx.execute(
                    "UPDATE keys SET name=?1, limit_pico=?2, rpm=?3, tokens_per_day=?4, models=?5, limit_reset=?6, expires_at=?7, labels=?9 WHERE secret_sha256=?8",
                    params![
                        name,
                        k.limit_usd.map(Money::pico),
                        k.rpm,
                        k.tokens_per_day.map(|t| t as i64),
                        models_json(&k.models),
                        reset_text(reset),
                        expiry(expires),
                        &hash[..],
                        keys::labels_json(&k.labels)
                    ],
                )?;
                if updated == 0 {
                    tx.execute(
                        "INSERT INTO keys (id, secret_sha256, name, created, disabled, credits_pico, spent_pico, limit_pico, rpm, tokens_per_day, models, limit_reset, expires_at, labels)
                         VALUES (?1, ?2, ?3, ?4, 0, ?5, 0, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                        params![
                            new_key_id(),
                            &hash[..],
                            name,
                            now_unix() as i64,
                            k.credits_usd.pico(),
                            k.limit_usd.map(Money::pico),
                            k.rpm,
                            k.tokens_per_day.map(|t| t as i64),
                            models_json(&k.models),
                            reset_text(reset),
                            expiry(expires),
                            keys::labels_json(&k.labels)
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

/// The applier's connection: locked for each commit, and by the checkpointer to
/// pause commits for its last pass.
type WriterConn = parking_lot::Mutex<Connection>;

/// The store's clock, settable after open ([`SqliteStore::set_clock`]).
type ClockCell = parking_lot::RwLock<Clock>;
