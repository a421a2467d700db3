//! Charges that could not be committed, kept on the instance's own disk until they
//! are: `<spill_dir>/pending-<instance>.jsonl`, one JSON line per settlement.
//!
//! When a batch of settlements fails to commit (PostgreSQL cannot be reached, or does
//! not answer within a second), the writer appends every settlement it holds to this file and `fsync`s it before any
//! waiting `settle` gets its error: from then on the charge survives the process
//! (SIGKILL, OOM, a stop while PostgreSQL is still down). Once every spilled
//! settlement has committed, the file is deleted.
//!
//! The instance holds an exclusive lock ([`File::try_lock`]) on its file for as long
//! as it may append to it; the kernel drops the lock when the process dies. At open,
//! [`replay`] commits every `pending-*.jsonl` of the spill dir whose lock is free (a
//! dead instance's leftovers) and that was written for this database (each line names
//! the ledger, [`ledger_id`]), then deletes it. A replay touches no lease (the lease of
//! a dead instance is gone or expiring) and is idempotent: the request id is the
//! settlement's primary key, so a file replayed twice (two instances opening at once,
//! or a crash mid-replay) charges once. A torn last line (a crash mid-append) is
//! skipped with a warning.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{Op, Shared};
use crate::money::Money;
use crate::store::idempotency::RecordLine;
use crate::store::{
    Generation, GenerationAttempt, IdempotencyRecord, Reservation, Settlement, StoreError,
};

/// How a spill file's name starts and ends.
const PREFIX: &str = "pending-";
const SUFFIX: &str = ".jsonl";

/// Settlements per replay statement at most.
const REPLAY_BATCH: usize = 512;

/// One spilled settlement: everything `sb_settle` needs, and the ledger it is for.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Line {
    /// [`ledger_id`] of the database it is owed to.
    ledger: String,
    id: String,
    key_id: String,
    /// Pico-USD.
    cost: i64,
    tokens: u64,
    model: String,
    provider: String,
    streamed: bool,
    prompt_tokens: u64,
    completion_tokens: u64,
    latency_ms: u64,
    ttft_ms: Option<u64>,
    attempts: Vec<GenerationAttempt>,
    finish_reason: Option<String>,
    created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    app_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    app_title: Option<String>,
    /// The idempotency record committed with it (SPEC §8.2), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    record: Option<RecordLine>,
    #[serde(default)]
    cache_hit: bool,
}

impl Line {
    /// The line of a settlement owed to `ledger`.
    pub(super) fn of(ledger: &str, s: &Settlement) -> Line {
        let g = &s.generation;
        Line {
            ledger: ledger.to_string(),
            id: g.id.clone(),
            key_id: s.key_id.clone(),
            cost: g.total_cost.pico(),
            tokens: s.tokens,
            model: g.model.clone(),
            provider: g.provider.clone(),
            streamed: g.streamed,
            prompt_tokens: g.prompt_tokens,
            completion_tokens: g.completion_tokens,
            latency_ms: g.latency_ms,
            ttft_ms: g.ttft_ms,
            attempts: g.attempts.clone(),
            finish_reason: g.finish_reason.clone(),
            created: g.created,
            app_url: g.app_url.clone(),
            app_title: g.app_title.clone(),
            record: None,
            cache_hit: g.cache_hit,
        }
    }

    /// The line of a settlement and its idempotency record.
    fn with_record(mut self, record: Option<&IdempotencyRecord>) -> Line {
        self.record = record.map(RecordLine::of);
        self
    }

    /// The settlement and its record again (a damaged record reads as none).
    fn settlement_and_record(mut self) -> (Settlement, Option<IdempotencyRecord>) {
        let record = self.record.take().and_then(|r| r.into_record(&self.key_id));
        (self.settlement(), record)
    }

    /// The settlement again (holding no reservation: a replay touches no lease).
    fn settlement(self) -> Settlement {
        Settlement {
            key_id: self.key_id.clone(),
            reserved: Reservation::NONE,
            tokens: self.tokens,
            generation: Generation {
                id: self.id,
                key_id: self.key_id,
                model: self.model,
                provider: self.provider,
                streamed: self.streamed,
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.completion_tokens,
                total_cost: Money::from_pico(self.cost),
                latency_ms: self.latency_ms,
                ttft_ms: self.ttft_ms,
                attempts: self.attempts,
                finish_reason: self.finish_reason,
                created: self.created,
                app_url: self.app_url,
                app_title: self.app_title,
                cache_hit: self.cache_hit,
            },
        }
    }
}

/// The open spill file and the settlements in it not committed yet.
#[derive(Default)]
struct Open {
    /// Holds the file's lock while set.
    file: Option<File>,
    pending: HashSet<String>,
}

/// This instance's spill file.
pub(super) struct Spill {
    path: PathBuf,
    /// [`ledger_id`], known once the schema is migrated.
    ledger: std::sync::OnceLock<String>,
    open: Mutex<Open>,
}

impl Spill {
    /// The spill file of `instance` in `dir` (nothing is created yet).
    pub fn new(dir: &Path, instance: &str) -> Spill {
        Spill {
            path: dir.join(format!("{PREFIX}{instance}{SUFFIX}")),
            ledger: Default::default(),
            open: Default::default(),
        }
    }

    /// Where the file is (or would be).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ledger the lines are for.
    pub fn set_ledger(&self, id: String) {
        let _ = self.ledger.set(id);
    }

    /// The ledger's id, for tests.
    #[cfg(test)]
    pub fn ledger(&self) -> &str {
        self.ledger.get().map(String::as_str).unwrap_or("")
    }

    /// The lines of `settlements`, ready to [`append`](Self::append).
    #[cfg(test)]
    pub fn lines<'a>(&self, settlements: impl Iterator<Item = &'a Settlement>) -> Lines {
        self.lines_with(settlements.map(|s| (s, None)))
    }

    /// The lines of `settlements` with their idempotency records, ready to
    /// [`append`](Self::append).
    pub fn lines_with<'a>(
        &self,
        settlements: impl Iterator<Item = (&'a Settlement, Option<&'a IdempotencyRecord>)>,
    ) -> Lines {
        let ledger = self.ledger.get().map(String::as_str).unwrap_or("");
        let mut lines = Lines::default();
        for (s, record) in settlements {
            let line = Line::of(ledger, s).with_record(record);
            // A line of plain strings and numbers always serializes.
            if serde_json::to_writer(&mut lines.bytes, &line).is_ok() {
                lines.bytes.push(b'\n');
                lines.ids.push(line.id);
            }
        }
        lines
    }

    /// Appends `lines` and `fsync`s the file (creating it, mode 0600 and locked, if
    /// need be). Blocking: call it off the async workers.
    pub fn append(&self, lines: Lines) -> std::io::Result<()> {
        if lines.ids.is_empty() {
            return Ok(());
        }
        let mut open = self.open.lock();
        if open.file.is_none() {
            let file = crate::store::private_file_options()
                .create(true)
                .append(true)
                .open(&self.path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(std::io::Error::other(format!(
                        "{} is locked by another process",
                        self.path.display()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
            // The new name itself survives a power loss too.
            #[cfg(unix)]
            if let Some(dir) = self.path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                File::open(dir)?.sync_all()?;
            }
            open.file = Some(file);
        }
        let file = open.file.as_mut().expect("opened above");
        let before = file.metadata()?.len();
        let written = file.write_all(&lines.bytes).and_then(|()| file.sync_data());
        if let Err(e) = written {
            // No half line left for the next append to run into (a full disk).
            let _ = file.set_len(before);
            return Err(e);
        }
        open.pending.extend(lines.ids);
        Ok(())
    }

    /// These settlements are committed (or refused for good): once none is left, the
    /// file is deleted.
    pub fn committed<'a>(&self, ids: impl Iterator<Item = &'a str>) {
        let mut open = self.open.lock();
        if open.pending.is_empty() {
            return;
        }
        for id in ids {
            open.pending.remove(id);
        }
        if open.pending.is_empty() && open.file.is_some() {
            // Deleted while locked: no replay can take it for a live file.
            match std::fs::remove_file(&self.path) {
                Ok(()) => tracing::info!(
                    "every charge kept in {} is committed; the file is deleted",
                    self.path.display()
                ),
                Err(e) => tracing::warn!(
                    "cannot delete {} (its charges are all committed; replaying it charges nothing): {e}",
                    self.path.display()
                ),
            }
            open.file = None;
        }
    }

    /// How many settlements are in the file and not committed.
    pub fn pending(&self) -> usize {
        self.open.lock().pending.len()
    }

    /// Lets go of the file (its lock) as a process that ends does: what is in it is
    /// replayed by the next store opened on this spill dir.
    pub fn close(&self) {
        self.open.lock().file = None;
    }
}

/// Serialized spill lines and their request ids.
#[derive(Default)]
pub(super) struct Lines {
    bytes: Vec<u8>,
    ids: Vec<String>,
}

/// Creates the spill dir if missing (mode 0700).
pub(super) fn create_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(|e| {
        StoreError(format!(
            "cannot create store.spill_dir {}: {e}",
            dir.display()
        ))
    })
}

/// The database's ledger id (`sb_ledger`, made by the migration).
pub(super) async fn ledger_id(shared: &Arc<Shared>) -> Result<String, StoreError> {
    let client = shared.client().await?;
    shared.count(Op::Migrate);
    let row = client
        .query_one("SELECT id FROM sb_ledger", &[])
        .await
        .map_err(|e| shared.error(e))?;
    Ok(row.get(0))
}

/// What one spill file held.
struct Parsed {
    /// The settlements for this ledger, with their idempotency records.
    mine: Vec<(Settlement, Option<IdempotencyRecord>)>,
    /// Lines for another ledger.
    foreign: usize,
}

/// Parses a spill file: a torn last line (a crash mid-append) is skipped with a
/// warning, another bad line with an error.
fn parse(path: &Path, text: &str, ledger: &str) -> Parsed {
    let mut parsed = Parsed {
        mine: Vec::new(),
        foreign: 0,
    };
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    for (n, raw) in lines.iter().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Line>(raw) {
            Ok(line) if line.ledger == ledger => parsed.mine.push(line.settlement_and_record()),
            Ok(_) => parsed.foreign += 1,
            Err(e) if n + 1 == lines.len() && !complete => tracing::warn!(
                "{}: the last line is torn (the process died while writing it) and is skipped: {e}",
                path.display()
            ),
            Err(e) => tracing::error!(
                "{}: line {} is not a settlement and is skipped: {e}",
                path.display(),
                n + 1
            ),
        }
    }
    parsed
}

/// Whether `file` (locked) is still the file at `path`: a file deleted and made again
/// since it was opened is left to the next replay.
fn still_there(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        path.exists()
    }
}

/// Commits the spill files of dead instances in `dir` (see the [module docs](self));
/// how many charges were replayed. Runs on the caller's thread (blocking), the
/// statements on the store's runtime.
pub(super) fn replay(shared: &Arc<Shared>, dir: &Path) -> Result<u64, StoreError> {
    let ledger = shared.spill.ledger.get().cloned().unwrap_or_default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            return Err(StoreError(format!(
                "cannot read store.spill_dir {}: {e}",
                dir.display()
            )))
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(PREFIX) && name.ends_with(SUFFIX)
        })
        .map(|e| e.path())
        .filter(|p| p != shared.spill.path())
        .collect();
    paths.sort();
    let mut replayed = 0;
    for path in paths {
        replayed += replay_file(shared, &path, &ledger)?;
    }
    Ok(replayed)
}

/// Replays one spill file unless a live instance holds it; deletes it once done.
fn replay_file(shared: &Arc<Shared>, path: &Path, ledger: &str) -> Result<u64, StoreError> {
    let describe = |e: std::io::Error| StoreError(format!("cannot read {}: {e}", path.display()));
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(describe(e)),
    };
    match file.try_lock() {
        Ok(()) => {}
        // A live instance's (or another replay's): not ours to take.
        Err(std::fs::TryLockError::WouldBlock) => return Ok(0),
        Err(std::fs::TryLockError::Error(e)) => return Err(describe(e)),
    }
    if !still_there(&file, path) {
        return Ok(0);
    }
    let text = std::io::read_to_string(&file).map_err(describe)?;
    let parsed = parse(path, &text, ledger);
    if parsed.mine.is_empty() && parsed.foreign > 0 {
        // Another database's charges: left for a store of that database.
        return Ok(0);
    }
    let total = parsed.mine.len();
    let mut charged = 0u64;
    for chunk in parsed.mine.chunks(REPLAY_BATCH) {
        charged += commit(shared, chunk)?;
    }
    if parsed.foreign > 0 {
        tracing::error!(
            "{}: {} line(s) are for another database and are left in the file",
            path.display(),
            parsed.foreign
        );
    } else if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(
            "cannot delete {} (replayed; replaying it again charges nothing): {e}",
            path.display()
        );
    }
    tracing::info!(
        "replayed {}: {charged} charge(s) committed, {} committed before",
        path.display(),
        total as u64 - charged
    );
    Ok(charged)
}

/// Commits replayed settlements (touching no lease), a few attempts while PostgreSQL
/// does not answer; one by one when it refuses the batch (the one at fault is logged
/// and skipped). How many were charged now.
fn commit(
    shared: &Arc<Shared>,
    settlements: &[(Settlement, Option<IdempotencyRecord>)],
) -> Result<u64, StoreError> {
    use super::writer::{statement, Failure};
    let mut delay = Duration::from_millis(200);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (s, rows) = (shared.clone(), settlements.to_vec());
        let answer = shared
            .block(async move {
                let rows: Vec<(&Settlement, Option<&IdempotencyRecord>)> =
                    rows.iter().map(|(s, r)| (s, r.as_ref())).collect();
                Ok(statement(&s, &rows, None, false).await)
            })
            .unwrap_or_else(|e| Err(Failure::Retry(e)));
        match answer {
            Ok(c) => return Ok(c.inserted.len() as u64),
            Err(Failure::Refused(e)) if settlements.len() > 1 => {
                tracing::warn!(
                    "PostgreSQL refused {} replayed settlements ({e}); committing them one by one",
                    settlements.len()
                );
                let mut charged = 0;
                for one in settlements {
                    charged += commit(shared, std::slice::from_ref(one))?;
                }
                return Ok(charged);
            }
            Err(Failure::Refused(e)) => {
                tracing::error!(
                    "ledger: replayed settlement {} refused, not charged: {e}",
                    settlements[0].0.generation.id
                );
                return Ok(0);
            }
            Err(Failure::Retry(e)) if attempt >= 3 => return Err(e),
            Err(Failure::Retry(_)) => {
                std::thread::sleep(delay);
                delay *= 4;
            }
        }
    }
}

#[cfg(test)]
mod tests;
