//! The ledger's one group-commit writer (its turn on the caller's runtime or on a
//! thread), the state of the journal it appends to, and the applier thread that
//! commits what was journaled to SQLite.

use std::hash::BuildHasher;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::accounts::Accounts;
use super::commit::commit;
use super::journal::{self, Entry};
use super::{open_conn, WriterConn};
use crate::config::SyncMode;
use crate::money::{Money, MAX_CHARGE, MAX_SPENT};
use crate::store::{IdempotencyRecord, Settlement, StoreError};

pub(super) enum Cmd {
    Settle(
        Box<Settlement>,
        Option<tokio::sync::oneshot::Sender<Result<bool, StoreError>>>,
    ),
    Flush(tokio::sync::oneshot::Sender<()>),
    /// A settlement and its idempotency record, journaled in one line.
    SettleRecorded(
        Box<(Settlement, IdempotencyRecord)>,
        Option<tokio::sync::oneshot::Sender<Result<bool, StoreError>>>,
    ),
}

/// Takes the ledger of the store at `path` if no other store holds it: commits what
/// a previous process left in its journal (a crash), then starts a fresh journal.
/// `None`: another store owns it (this one can administer keys, not settle).
pub(super) fn open_journal(
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
        pending_records: Default::default(),
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

/// How long the applier's commit waits for another connection's write lock
/// (administration, the `keys` CLI) before it retries; a settlement never waits.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// The most settlements appended in one batch.
pub(super) const MAX_BATCH: usize = 1024;

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
pub(super) struct Writer {
    pub(super) queue: parking_lot::Mutex<Queue>,
    /// The connection the applier commits with (and the checkpointer pauses).
    pub(super) conn: Arc<WriterConn>,
    pub(super) accounts: Arc<Accounts>,
    /// The clock of the day each settlement counts in.
    pub(super) clock: Arc<super::ClockCell>,
    /// `None`: another store owns this file's ledger, and settling fails.
    pub(super) journal: Option<parking_lot::Mutex<JournalState>>,
    /// `fdatasync` after each append (`sync = "full"`).
    pub(super) durable: bool,
    /// Whether turns may run on the caller's runtime (`sync = "normal"`).
    pub(super) on_runtime: bool,
    /// Wakes the writer thread with the turn; `None` once the store is dropped.
    pub(super) thread: parking_lot::Mutex<Option<mpsc::Sender<()>>>,
    /// Wakes the applier; `None` once the store is dropped.
    pub(super) applier: parking_lot::Mutex<Option<mpsc::Sender<()>>>,
    /// Turns passed to the thread so far (read by tests).
    pub(super) handoffs: AtomicU64,
    /// Tests stop the applier to leave entries in the journal, as a crash would.
    #[cfg(test)]
    pub(super) apply_paused: std::sync::atomic::AtomicBool,
}

/// The journal and what it holds that SQLite does not have yet.
pub(super) struct JournalState {
    pub(super) paths: journal::Paths,
    pub(super) file: journal::JournalFile,
    /// The next journal, at `paths.next`: the last applied one, emptied (see
    /// `Writer::recycle`), or a new one. Made outside the lock: a new mapped
    /// journal costs a reservation and reading in its pages (≈ 0.8 ms), which
    /// appends should not wait for.
    pub(super) spare: Option<journal::JournalFile>,
    /// The lines of the batch being appended (kept for its capacity).
    pub(super) buf: Vec<u8>,
    /// Journaled, not yet in SQLite, by request id: settling one again is a
    /// duplicate, and `/v1/generation` shows it.
    pub(super) pending: foldhash::HashMap<String, Arc<Entry>>,
    /// The pending entries with an idempotency record, by key id and idempotency key:
    /// a repeat finds its record here until SQLite has it.
    pub(super) pending_records: foldhash::HashMap<(String, String), Arc<Entry>>,
    /// Hashes of the request ids the applier committed lately (two generations of
    /// [`RECENT`]). A settlement whose id is neither pending nor here is new without
    /// asking SQLite, which measured ≈ 10 µs a settlement (a read transaction's
    /// locks); a hit is confirmed in SQLite. An id repeated later than that is still
    /// charged once: the applier finds it in SQLite and takes it back from the
    /// account (it was answered `true`).
    pub(super) recent: [foldhash::HashSet<u64>; 2],
    pub(super) recent_since: Instant,
    pub(super) ids: foldhash::fast::RandomState,
    /// The same entries, in journal order, not yet taken by the applier.
    pub(super) queued: Vec<Arc<Entry>>,
    /// Flushes waiting for what was journaled before them to be in SQLite.
    pub(super) flushes: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The applier was woken for what is queued.
    pub(super) woken: bool,
    /// The store was dropped: its journal is applied and removed, its lock released.
    pub(super) closed: bool,
    /// Reads whether a request id was settled before (in SQLite).
    pub(super) seen: Connection,
    /// Held for as long as this store owns the ledger (released on drop, even if a
    /// turn still out on a runtime keeps the writer alive a moment longer).
    pub(super) lock: Option<std::fs::File>,
}

/// What waits for the writer, and whether a turn is out to append it.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) cmds: Vec<Cmd>,
    pub(super) turn_out: bool,
    /// When the last turn was given back (nothing left to append).
    pub(super) idle_since: Option<Instant>,
}

impl Queue {
    /// The turn is given back: no one holds it, and the writer is idle from now.
    pub(super) fn give_back(&mut self) {
        self.turn_out = false;
        self.idle_since = Some(Instant::now());
    }
}

/// A writer idle for this long is not under load: a new turn appends at once, in
/// the caller, instead of spawning a task that first yields for a batch to form
/// (which costs the runtime an extra poll of its I/O driver, one `epoll_wait`, per
/// append).
pub(super) const QUIET: Duration = Duration::from_micros(250);

/// How long the applier lets journaled settlements gather before committing them
/// to SQLite in one transaction (so SQLite's own commit cost is shared by many).
/// 5 ms cost 66 µs of the applier's CPU per request at 1k req/s (a rotation and a
/// commit for every few requests); 50 ms took the gateway's CPU per request there
/// from 263 to 229 µs (A/B in BENCHMARKS.md). The gateway's own reads overlay what
/// is pending, so only the CLI's view of SQLite trails by this much.
pub(super) const APPLY_AFTER: Duration = Duration::from_millis(50);

impl Writer {
    /// Queues `cmd`; starts a turn when none is out.
    pub(super) fn submit(self: &Arc<Self>, cmd: Cmd) {
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
    pub(super) fn next_batch(&self) -> Option<Vec<Cmd>> {
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
    pub(super) fn give_back_if_idle(&self) -> bool {
        let mut q = self.queue.lock();
        if !q.cmds.is_empty() {
            return false;
        }
        q.give_back();
        true
    }

    /// Holds the turn on this thread until the queue is empty.
    pub(super) fn drain_blocking(&self) {
        while let Some(batch) = self.next_batch() {
            self.commit_batch(batch);
        }
    }

    /// Journals `batch`, applies it to the accounts, answers it.
    pub(super) fn commit_batch(&self, batch: Vec<Cmd>) {
        let day = self.clock.read().day();
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
                        record: None,
                    }));
                    waiters.push(waiter);
                }
                Cmd::SettleRecorded(both, waiter) => {
                    let (s, record) = *both;
                    if let Some(why) = self.refusal(&s, &entries) {
                        self.refuse(&s, why, waiter);
                        continue;
                    }
                    entries.push(Arc::new(Entry {
                        settlement: s,
                        day,
                        record: Some(Box::new(record)),
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
                    a.periods.add(e.day, s.generation.total_cost);
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
    pub(super) fn refusal(&self, s: &Settlement, earlier: &[Arc<Entry>]) -> Option<String> {
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
    pub(super) fn refuse(
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
    pub(super) fn append(&self, entries: &[Arc<Entry>]) -> Result<Vec<bool>, StoreError> {
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
            if let Some(r) = &e.record {
                j.pending_records
                    .insert((r.key_id.clone(), r.idem_key.clone()), e.clone());
            }
            j.queued.push(e.clone());
        }
        if !j.queued.is_empty() && !std::mem::replace(&mut j.woken, true) {
            self.wake_applier();
        }
        Ok(fresh)
    }

    pub(super) fn wake_applier(&self) {
        if let Some(tx) = self.applier.lock().as_ref() {
            let _ = tx.send(());
        }
    }

    /// Answers `flushes` once what was journaled before them is in SQLite.
    pub(super) fn flush_after_apply(&self, flushes: Vec<tokio::sync::oneshot::Sender<()>>) {
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
    pub(super) fn apply_journaled(&self, stopping: bool) {
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
            if let Some(r) = &e.record {
                let scope = (r.key_id.clone(), r.idem_key.clone());
                if j.pending_records
                    .get(&scope)
                    .is_some_and(|p| Arc::ptr_eq(p, e))
                {
                    j.pending_records.remove(&scope);
                }
            }
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
    pub(super) fn take_back_repeats(&self, entries: &[Arc<Entry>], applied: &[bool]) {
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
                a.periods.sub(e.day, s.generation.total_cost);
            }
        }
    }

    /// The journal moves aside (to be applied) and a fresh one takes its place: the
    /// spare, if there is one. Returns the old journal, which the caller reuses
    /// (outside the lock) once SQLite has its lines.
    pub(super) fn rotate(&self, j: &mut JournalState) -> std::io::Result<journal::JournalFile> {
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
pub(super) fn remove_if_there(path: &Path) {
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
    pub(super) fn recycle(
        &self,
        journal: &parking_lot::Mutex<JournalState>,
        mut old: journal::JournalFile,
    ) {
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
    pub(super) fn make_spare(&self, journal: &parking_lot::Mutex<JournalState>) {
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
    pub(super) fn applied_lately(&self, id: &str) -> bool {
        let h = self.ids.hash_one(id);
        self.recent.iter().any(|r| r.contains(&h))
    }
}

/// How long a generation of [`JournalState`]'s recent ids lasts.
pub(super) const RECENT: Duration = Duration::from_secs(30);

/// Whether `id` is in SQLite's settlements already.
pub(super) fn settled_before(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM settlements WHERE request_id=?1")?
        .exists([id])?)
}

/// The applier thread: each time it is woken, lets more settlements gather for
/// [`APPLY_AFTER`], then commits the journaled ones to SQLite; when the store is
/// dropped, commits what is left and stops.
pub(super) fn applier_thread(writer: &Writer, wake: mpsc::Receiver<()>) {
    let mut purged = Instant::now();
    loop {
        let stopping = match wake.recv_timeout(PURGE_EVERY) {
            Ok(()) => false,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = writer.purge_records(crate::store::now_unix());
                purged = Instant::now();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => true,
        };
        if !stopping {
            std::thread::sleep(APPLY_AFTER);
        }
        writer.apply_journaled(stopping);
        if stopping {
            return;
        }
        // Under steady load the wake-ups never time out.
        if purged.elapsed() >= PURGE_EVERY {
            let _ = writer.purge_records(crate::store::now_unix());
            purged = Instant::now();
        }
    }
}

/// How often the applier deletes expired idempotency records.
pub(super) const PURGE_EVERY: Duration = Duration::from_secs(60);

impl Writer {
    /// Deletes the idempotency records expired at `now` (Unix seconds), on the
    /// applier's connection; how many.
    pub(super) fn purge_records(&self, now: u64) -> Result<u64, StoreError> {
        let conn = self.conn.lock();
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let n = conn
            .prepare_cached("DELETE FROM idempotency WHERE expires <= ?1")?
            .execute([super::int(now)])
            .map_err(StoreError::from);
        match &n {
            Ok(n @ 1..) => tracing::debug!("purged {n} expired idempotency record(s)"),
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot purge expired idempotency records: {e}"),
        }
        n.map(|n| n as u64)
    }
}

/// The right to append the writer's queue, held by one task or thread at a time.
/// Dropped unfinished (a task cancelled by a runtime shutting down), it passes to
/// the writer thread.
pub(super) struct Turn {
    pub(super) writer: Arc<Writer>,
    pub(super) done: bool,
}

impl Turn {
    /// Appends on the runtime until the queue is empty, yielding before each batch:
    /// under load, requests that are ready to run now settle into this batch (the
    /// task waits behind them, and behind one poll of the I/O driver).
    pub(super) async fn run_on_runtime(mut self) {
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
    pub(super) fn run_here(mut self, rt: &tokio::runtime::Handle) {
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
    pub(super) fn pass_to_thread(&mut self) {
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
pub(super) fn writer_thread(writer: &Writer, turns: mpsc::Receiver<()>) {
    while turns.recv().is_ok() {
        // Let the threads that woke us queue what they have before the append.
        std::thread::yield_now();
        writer.drain_blocking();
    }
}
