//! The ledger's journal: a settlement is durable once its line is appended here,
//! and SQLite gets it afterwards, in the background, many at a time.
//!
//! Why a file of our own: a SQLite commit of one settlement measured ≈ 38 µs (three
//! WAL frames of two `pwrite`s each, four to six `fcntl` locks on the shared-memory
//! index, B-tree work), on the critical path of every response and about a fifth of
//! the gateway's CPU at 1k req/s. An append of a batch to this file is one `write`
//! (plus `fdatasync` with `sync = "full"`), which survives what the SQLite commit
//! survived: a process crash (into the page cache) or, with `fdatasync`, power loss.
//!
//! - One line of JSON per settlement, `\n`-terminated. A line without its newline or
//!   that does not parse is a write cut by a crash, never answered, so replay skips it.
//! - The applier takes the lines written so far by renaming the journal to
//!   `…-ledger.applying` (a fresh journal takes its place), commits them to SQLite in
//!   one transaction, then deletes that file. A crash anywhere in between leaves the
//!   lines in one of the two files, and replay at the next open commits them again:
//!   `INSERT OR IGNORE` on the request id makes that charge each one once.
//! - `…-ledger.lock` is held (`flock`) for as long as the store owns the ledger: one
//!   process appends and replays at a time.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Generation, GenerationAttempt, Settlement};
use crate::money::Money;

/// A settlement as the journal holds it: with the UTC day its tokens count against,
/// fixed when it was journaled (SQLite may get it after midnight).
#[derive(Debug)]
pub(super) struct Entry {
    pub settlement: Settlement,
    pub day: u64,
}

/// One journal line (all an [`Entry`] needs but the reservation, which is memory only).
#[derive(Serialize, Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    key: Cow<'a, str>,
    pico: i64,
    tokens: u64,
    day: u64,
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(borrow)]
    provider: Cow<'a, str>,
    streamed: bool,
    prompt: u64,
    completion: u64,
    latency_ms: u64,
    ttft_ms: Option<u64>,
    attempts: Cow<'a, [GenerationAttempt]>,
    #[serde(borrow)]
    finish: Option<Cow<'a, str>>,
    created: u64,
}

impl Entry {
    /// Appends this entry's line (JSON and `\n`) to `out`.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        let g = &self.settlement.generation;
        let line = Line {
            id: Cow::Borrowed(&g.id),
            key: Cow::Borrowed(&self.settlement.key_id),
            pico: g.total_cost.pico(),
            tokens: self.settlement.tokens,
            day: self.day,
            model: Cow::Borrowed(&g.model),
            provider: Cow::Borrowed(&g.provider),
            streamed: g.streamed,
            prompt: g.prompt_tokens,
            completion: g.completion_tokens,
            latency_ms: g.latency_ms,
            ttft_ms: g.ttft_ms,
            attempts: Cow::Borrowed(&g.attempts),
            finish: g.finish_reason.as_deref().map(Cow::Borrowed),
            created: g.created,
        };
        // Strings, integers and booleans: serialising into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &line);
        out.push(b'\n');
    }

    /// The entry of one line, or `None` for a cut or damaged one.
    fn parse(line: &[u8]) -> Option<Entry> {
        let l: Line<'_> = serde_json::from_slice(line).ok()?;
        Some(Entry {
            settlement: Settlement {
                key_id: l.key.clone().into_owned(),
                reserved: Money::ZERO,
                tokens: l.tokens,
                generation: Generation {
                    id: l.id.into_owned(),
                    key_id: l.key.into_owned(),
                    model: l.model.into_owned(),
                    provider: l.provider.into_owned(),
                    streamed: l.streamed,
                    prompt_tokens: l.prompt,
                    completion_tokens: l.completion,
                    total_cost: Money::from_pico(l.pico),
                    latency_ms: l.latency_ms,
                    ttft_ms: l.ttft_ms,
                    attempts: l.attempts.into_owned(),
                    finish_reason: l.finish.map(Cow::into_owned),
                    created: l.created,
                },
            },
            day: l.day,
        })
    }
}

/// The journal's files, next to the database: `<db>-ledger`, `<db>-ledger.applying`,
/// `<db>-ledger.lock`.
#[derive(Debug, Clone)]
pub(super) struct Paths {
    pub journal: PathBuf,
    pub applying: PathBuf,
    pub lock: PathBuf,
}

impl Paths {
    pub fn new(db: &Path) -> Paths {
        let with = |suffix: &str| {
            let mut p = db.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        };
        Paths {
            journal: with("-ledger"),
            applying: with("-ledger.applying"),
            lock: with("-ledger.lock"),
        }
    }
}

/// Takes the ledger's lock: `Ok(None)` when another store (another process, or
/// another open of the same file here) holds it.
pub(super) fn lock(paths: &Paths) -> std::io::Result<Option<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&paths.lock)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Opens a fresh journal for appending (the old one is replayed first, see [`read`]).
pub(super) fn create(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The entries left in `path` (none if it does not exist), and how many lines were
/// skipped as cut or damaged.
pub(super) fn read(path: &Path) -> std::io::Result<(Vec<Entry>, usize)> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::new(file);
    let (mut entries, mut skipped) = (Vec::new(), 0);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        // Only a complete line was answered; a cut one (no newline) never was.
        let parsed = line
            .strip_suffix(b"\n")
            .filter(|l| !l.is_empty())
            .and_then(Entry::parse);
        match parsed {
            Some(e) => entries.push(e),
            None if line.iter().all(|b| b.is_ascii_whitespace() || *b == 0) => {}
            None => skipped += 1,
        }
    }
    Ok((entries, skipped))
}

/// Appends `buf` (one `write`, retried only if the kernel takes part of it), then
/// `fdatasync` if `durable`; `len` is the file's length, kept by the caller. On
/// failure the file is cut back to `len`: a batch not answered as committed is never
/// replayed, and a half-written one is never followed by the next batch.
pub(super) fn append(
    file: &mut File,
    len: &mut u64,
    buf: &[u8],
    durable: bool,
) -> std::io::Result<()> {
    let written = file
        .write_all(buf)
        .and_then(|()| if durable { file.sync_data() } else { Ok(()) });
    match written {
        Ok(()) => {
            *len += buf.len() as u64;
            Ok(())
        }
        Err(e) => {
            if let Err(cut) = file.set_len(*len) {
                tracing::error!("cannot cut the ledger journal back after a failed write: {cut}");
            }
            Err(e)
        }
    }
}

/// Makes renames and creations in `dir` durable (`sync = "full"`).
pub(super) fn sync_dir(file: &Path) -> std::io::Result<()> {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}
