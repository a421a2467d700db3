//! The ledger's journal: a settlement is durable once its line is appended here,
//! and SQLite gets it afterwards, in the background, many at a time.
//!
//! Why a file of our own: a SQLite commit of one settlement measured ≈ 38 µs (three
//! WAL frames of two `pwrite`s each, four to six `fcntl` locks on the shared-memory
//! index, B-tree work), on the critical path of every response and about a fifth of
//! the gateway's CPU at 1k req/s. An append of a batch to this file is a copy into
//! a memory map (see [`JournalFile`]) or one `write` (plus `fdatasync` with `sync =
//! "full"`), which survives what the SQLite commit survived: a process crash (into
//! the page cache) or, with `fdatasync`, power loss.
//!
//! - One line of JSON per settlement, `\n`-terminated. A line without its newline or
//!   that does not parse is a write cut by a crash, never answered, so replay skips it.
//!   NUL bytes before a line are skipped (a mapped journal's unused space).
//! - The applier takes the lines written so far by renaming the journal to
//!   `…-ledger.applying` (the next journal, waiting at `…-ledger.next`, takes its
//!   place), commits them to SQLite in one transaction, then renames that file to
//!   `…-ledger.next` and empties it for use again. A crash before that rename
//!   leaves the lines in one of the two files replay reads, and it commits them
//!   again: `INSERT OR IGNORE` on the request id makes that charge each one once.
//! - `…-ledger.lock` is held (`flock`) for as long as the store owns the ledger: one
//!   process appends and replays at a time.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::money::{Money, MAX_CHARGE};
use crate::store::idempotency::RecordLine;
use crate::store::{Generation, GenerationAttempt, IdempotencyRecord, Settlement};

/// A settlement as the journal holds it: with the UTC day its tokens count against,
/// fixed when it was journaled (SQLite may get it after midnight).
#[derive(Debug)]
pub(super) struct Entry {
    pub settlement: Settlement,
    pub day: u64,
    /// The idempotency record committed with it (SPEC §8.2), in the same line.
    pub record: Option<Box<IdempotencyRecord>>,
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
    /// Only when set (lines of a settlement without them, and those written before
    /// them, have none).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    app_url: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    app_title: Option<Cow<'a, str>>,
    /// Only written when true (a cache hit's free record): other lines keep their bytes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    cache_hit: bool,
    /// Only in the line of a settlement with an idempotency record (its key id is
    /// the settlement's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idem: Option<RecordLine>,
}

impl Entry {
    /// Appends this entry's line (JSON and `\n`) to `out`: the bytes `serde_json`
    /// writes for a [`Line`], written directly: 1.75k instructions a settlement
    /// against 5.1k through serde (callgrind; serde escapes each field name as a
    /// string at every line), on the way out of every charged response.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        let g = &self.settlement.generation;
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(b"{\"id\":");
        crate::json::push_str(out, &g.id);
        out.extend_from_slice(b",\"key\":");
        crate::json::push_str(out, &self.settlement.key_id);
        out.extend_from_slice(b",\"pico\":");
        out.extend_from_slice(n.format(g.total_cost.pico()).as_bytes());
        out.extend_from_slice(b",\"tokens\":");
        out.extend_from_slice(n.format(self.settlement.tokens).as_bytes());
        out.extend_from_slice(b",\"day\":");
        out.extend_from_slice(n.format(self.day).as_bytes());
        out.extend_from_slice(b",\"model\":");
        crate::json::push_str(out, &g.model);
        out.extend_from_slice(b",\"provider\":");
        crate::json::push_str(out, &g.provider);
        out.extend_from_slice(if g.streamed {
            b",\"streamed\":true,\"prompt\":"
        } else {
            b",\"streamed\":false,\"prompt\":"
        });
        out.extend_from_slice(n.format(g.prompt_tokens).as_bytes());
        out.extend_from_slice(b",\"completion\":");
        out.extend_from_slice(n.format(g.completion_tokens).as_bytes());
        out.extend_from_slice(b",\"latency_ms\":");
        out.extend_from_slice(n.format(g.latency_ms).as_bytes());
        out.extend_from_slice(b",\"ttft_ms\":");
        match g.ttft_ms {
            Some(t) => out.extend_from_slice(n.format(t).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"attempts\":");
        attempts_json(out, &g.attempts);
        out.extend_from_slice(b",\"finish\":");
        match &g.finish_reason {
            Some(f) => crate::json::push_str(out, f),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"created\":");
        out.extend_from_slice(n.format(g.created).as_bytes());
        if let Some(url) = &g.app_url {
            out.extend_from_slice(b",\"app_url\":");
            crate::json::push_str(out, url);
        }
        if let Some(title) = &g.app_title {
            out.extend_from_slice(b",\"app_title\":");
            crate::json::push_str(out, title);
        }
        if g.cache_hit {
            out.extend_from_slice(b",\"cache_hit\":true");
        }
        if let Some(r) = &self.record {
            // Rare (requests with an `Idempotency-Key`): through serde.
            out.extend_from_slice(b",\"idem\":");
            let _ = serde_json::to_writer(&mut *out, &RecordLine::of(r));
        }
        out.extend_from_slice(b"}\n");
    }

    /// The entry of one line, or `None` for a cut or damaged one.
    ///
    /// A line whose charge is outside `0..=`[`MAX_CHARGE`] was never written by the
    /// ledger (it refuses such a charge before journaling it): damaged.
    fn parse(line: &[u8]) -> Option<Entry> {
        let l: Line<'_> = serde_json::from_slice(line).ok()?;
        if !Money::from_pico(l.pico).within(MAX_CHARGE) {
            return None;
        }
        let record = match l.idem {
            // A record that does not decode is a damaged line.
            Some(idem) => Some(Box::new(idem.into_record(&l.key)?)),
            None => None,
        };
        Some(Entry {
            record,
            settlement: Settlement {
                key_id: l.key.clone().into_owned(),
                reserved: crate::store::Reservation::NONE,
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
                    app_url: l.app_url.map(Cow::into_owned),
                    app_title: l.app_title.map(Cow::into_owned),
                    cache_hit: l.cache_hit,
                },
            },
            day: l.day,
        })
    }
}

/// Appends `attempts` as the JSON array `serde_json` writes for them (the journal's
/// `attempts` field, and the ledger row's `attempts` column).
pub(super) fn attempts_json(out: &mut Vec<u8>, attempts: &[GenerationAttempt]) {
    crate::json::push_attempts(
        out,
        attempts.iter().map(|a| crate::json::Attempt {
            provider: &a.provider,
            model: None,
            status: &a.status,
            latency_ms: a.latency_ms,
        }),
    );
}

/// The journal's files, next to the database: `<db>-ledger`, `<db>-ledger.applying`,
/// `<db>-ledger.next`, `<db>-ledger.lock`.
#[derive(Debug, Clone)]
pub(super) struct Paths {
    pub journal: PathBuf,
    pub applying: PathBuf,
    /// The next journal, made ready off the critical path (never appended to under
    /// this name).
    pub next: PathBuf,
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
            next: with("-ledger.next"),
            lock: with("-ledger.lock"),
        }
    }
}

/// Takes the ledger's lock: `Ok(None)` when another store (another process, or
/// another open of the same file here) holds it.
pub(super) fn lock(paths: &Paths) -> std::io::Result<Option<File>> {
    let file = crate::store::private_file_options()
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

/// The journal being appended to.
///
/// With `sync = "normal"` on Linux it is a shared memory map of a file whose blocks
/// are reserved up front (`posix_fallocate`): an append is a copy into the page
/// cache, with no system call, and survives a crash of the process as a `write`
/// does (the kernel owns a shared mapping's pages). `write` measured 17.7–19.9 µs
/// per quiet append on this VM's ext4 (`benches/tools/append_cost.py`), on the
/// critical path of every response settled alone. The reservation means a copy
/// never meets a full disk (which would be `SIGBUS`, not an error). The file keeps
/// its reserved length: the tail past the last line is NUL bytes, which [`read`]
/// skips. A batch that does not fit in what is left goes after the mapped part
/// with `pwrite`.
///
/// Otherwise (`sync = "full"`, which needs `fdatasync` anyway; other systems; or the
/// file system refusing the reservation) it is a file opened for appending.
pub(super) struct JournalFile {
    file: File,
    /// Bytes appended: where the next batch goes.
    len: u64,
    #[cfg(target_os = "linux")]
    map: Option<memmap2::MmapMut>,
}

/// The bytes reserved for a mapped journal. The applier starts a new journal every
/// 50 ms; at 10k settlements a second of ≈ 330 bytes that is ≈ 165 KB.
#[cfg(target_os = "linux")]
const MAPPED_BYTES: usize = 1 << 20;

impl JournalFile {
    /// Creates a fresh journal at `path` (the old one is replayed first, see
    /// [`read`]); `durable`: every append is followed by `fdatasync`.
    pub fn create(path: &Path, durable: bool) -> std::io::Result<JournalFile> {
        #[cfg(target_os = "linux")]
        if !durable {
            match Self::create_mapped(path) {
                Ok(j) => return Ok(j),
                Err(e) => {
                    tracing::debug!("the ledger journal is appended with write(2), not mapped: {e}")
                }
            }
        }
        let file = crate::store::private_file_options()
            .create(true)
            .append(true)
            .open(path)?;
        // Not 0 if a mapped journal was begun here and given up (its reserved NULs
        // stay, and replay skips them): a failed append is cut back to this.
        let len = file.metadata()?.len();
        Ok(JournalFile {
            file,
            len,
            #[cfg(target_os = "linux")]
            map: None,
        })
    }

    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn create_mapped(path: &Path) -> std::io::Result<JournalFile> {
        use std::os::fd::AsRawFd;
        let file = crate::store::private_file_options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)?;
        // SAFETY: a plain call on an open descriptor; it returns an error number.
        let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, MAPPED_BYTES as i64) };
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(err));
        }
        // `populate`: its pages are in the page cache before the first append (else
        // the first touch of each page is a major fault that reads it in: p90 of a
        // quiet response's way out went 211 → 346 µs, BENCHMARKS.md).
        // SAFETY: the mapping is only ever written through this struct, which owns
        // the file; the ledger's lock keeps other processes (replay) out, and the
        // file is never cut shorter than the mapping (see `append`).
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(MAPPED_BYTES)
                .populate()
                .map_mut(&file)?
        };
        Ok(JournalFile {
            file,
            len: 0,
            map: Some(map),
        })
    }

    /// Bytes appended so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Empties the journal for use again, once SQLite has all its lines (and it no
    /// longer has a name replay reads). A mapped journal is zeroed where it was
    /// written, so that it needs no new reservation, mapping or read-in: making a
    /// fresh one measured ≈ 0.8 ms (`strace -T`), and removing the old one ≈ 0.7 ms,
    /// on the gateway's own CPU every 50 ms, which showed in its p99 at 1k req/s.
    pub fn recycle(&mut self) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(map) = &mut self.map {
            let mapped = map.len();
            map[..(self.len as usize).min(mapped)].fill(0);
            if self.len > mapped as u64 {
                // Batches past the map went after it: cut them off, down to the map.
                self.file.set_len(mapped as u64)?;
            }
            self.len = 0;
            return Ok(());
        }
        self.file.set_len(0)?;
        self.len = 0;
        Ok(())
    }

    /// Whether appends are copies into a memory map.
    #[cfg(test)]
    pub fn is_mapped(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.map.is_some();
        #[cfg(not(target_os = "linux"))]
        return false;
    }

    /// Appends `buf` (one copy into the map, or one `write`, retried only if the
    /// kernel takes part of it), then `fdatasync` if `durable`. On failure nothing
    /// of `buf` stays: a batch not answered as committed is never replayed, and a
    /// half-written one is never followed by the next batch.
    pub fn append(&mut self, buf: &[u8], durable: bool) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(map) = &mut self.map {
            debug_assert!(!durable, "a durable journal is never mapped");
            let at = self.len as usize;
            if at + buf.len() <= map.len() {
                map[at..at + buf.len()].copy_from_slice(buf);
                self.len += buf.len() as u64;
                return Ok(());
            }
            // Past the mapped part: after it, never inside it (the NUL gap is
            // skipped on replay), so that cutting a failed write back never makes
            // the file shorter than its mapping.
            use std::os::unix::fs::FileExt;
            let at = self.len.max(map.len() as u64);
            return match self.file.write_all_at(buf, at) {
                Ok(()) => {
                    self.len = at + buf.len() as u64;
                    Ok(())
                }
                Err(e) => {
                    self.cut_back_to(at);
                    Err(e)
                }
            };
        }
        let written = self.file.write_all(buf).and_then(|()| {
            if durable {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.cut_back_to(self.len);
                Err(e)
            }
        }
    }

    fn cut_back_to(&self, len: u64) {
        if let Err(cut) = self.file.set_len(len) {
            tracing::error!("cannot cut the ledger journal back after a failed write: {cut}");
        }
    }
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
        // A mapped journal's reserved tail is NULs, and a batch past the mapped part
        // follows a gap of them (JSON never holds a NUL byte).
        let start = line.iter().position(|&b| b != 0).unwrap_or(line.len());
        // Only a complete line was answered; a cut one (no newline) never was.
        let parsed = line[start..]
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

/// Makes renames and creations in `dir` durable (`sync = "full"`).
pub(super) fn sync_dir(file: &Path) -> std::io::Result<()> {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    use crate::json::testing::odd;

    fn entry(rng: &mut impl Rng) -> Entry {
        let attempts = (0..rng.random_range(0..4))
            .map(|_| GenerationAttempt {
                provider: odd(rng, 8),
                status: odd(rng, 4),
                latency_ms: rng.random(),
            })
            .collect();
        Entry {
            settlement: Settlement {
                key_id: odd(rng, 12),
                reserved: crate::store::Reservation::NONE,
                tokens: rng.random(),
                generation: Generation {
                    id: odd(rng, 30),
                    key_id: String::new(),
                    model: odd(rng, 16),
                    provider: odd(rng, 8),
                    streamed: rng.random(),
                    prompt_tokens: rng.random(),
                    completion_tokens: rng.random(),
                    total_cost: Money::from_pico(rng.random_range(0..=MAX_CHARGE.pico())),
                    latency_ms: rng.random(),
                    ttft_ms: rng.random::<bool>().then(|| rng.random()),
                    attempts,
                    finish_reason: rng.random::<bool>().then(|| odd(rng, 6)),
                    created: rng.random(),
                    app_url: rng.random::<bool>().then(|| odd(rng, 20)),
                    app_title: rng.random::<bool>().then(|| odd(rng, 10)),
                    cache_hit: rng.random::<u8>() < 32,
                },
            },
            day: rng.random(),
            record: rng.random::<bool>().then(|| Box::new(record(rng))),
        }
    }

    fn record(rng: &mut impl Rng) -> IdempotencyRecord {
        let body: Vec<u8> = (0..rng.random_range(0..300))
            .map(|_| rng.random())
            .collect();
        IdempotencyRecord {
            key_id: String::new(),
            idem_key: odd(rng, 20),
            fingerprint: rng.random(),
            status: 200,
            headers: vec![
                (odd(rng, 6), odd(rng, 10)),
                ("x-request-id".into(), odd(rng, 30)),
            ],
            body: body.into(),
            created: rng.random(),
            expires: rng.random(),
        }
    }

    /// What `serde_json` writes for the entry's [`Line`].
    fn through_serde(e: &Entry) -> Vec<u8> {
        let g = &e.settlement.generation;
        let line = Line {
            id: Cow::Borrowed(&g.id),
            key: Cow::Borrowed(&e.settlement.key_id),
            pico: g.total_cost.pico(),
            tokens: e.settlement.tokens,
            day: e.day,
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
            app_url: g.app_url.as_deref().map(Cow::Borrowed),
            app_title: g.app_title.as_deref().map(Cow::Borrowed),
            idem: e.record.as_deref().map(RecordLine::of),
            cache_hit: g.cache_hit,
        };
        let mut out = serde_json::to_vec(&line).unwrap();
        out.push(b'\n');
        out
    }

    #[test]
    fn a_line_is_the_bytes_serde_json_writes_and_parses_back() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let e = entry(&mut rng);
            let mut ours = Vec::new();
            e.write_line(&mut ours);
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&through_serde(&e))
            );
            let back = Entry::parse(ours.strip_suffix(b"\n").unwrap()).expect("parses");
            let (g, b) = (&e.settlement.generation, &back.settlement.generation);
            assert_eq!(
                (&b.id, &b.model, &b.provider),
                (&g.id, &g.model, &g.provider)
            );
            assert_eq!(
                (&b.attempts, &b.finish_reason),
                (&g.attempts, &g.finish_reason)
            );
            assert_eq!((&b.app_url, &b.app_title), (&g.app_url, &g.app_title));
            assert_eq!(back.settlement.key_id, e.settlement.key_id);
            assert_eq!(b.total_cost, g.total_cost);
            match (&e.record, &back.record) {
                (None, None) => {}
                (Some(r), Some(b)) => {
                    let want = IdempotencyRecord {
                        key_id: e.settlement.key_id.clone(),
                        ..(**r).clone()
                    };
                    assert_eq!(**b, want);
                }
                (r, b) => panic!("record {r:?} read back as {b:?}"),
            }
            assert_eq!(b.cache_hit, g.cache_hit);
            let mut json = Vec::new();
            attempts_json(&mut json, &g.attempts);
            assert_eq!(json, serde_json::to_vec(&g.attempts).unwrap());
        }
    }

    #[test]
    fn a_line_with_a_charge_out_of_bounds_is_damaged() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (pico, ok) in [
            (0, true),
            (MAX_CHARGE.pico(), true),
            (MAX_CHARGE.pico() + 1, false),
            (i64::MAX, false),
            (-1, false),
        ] {
            let mut e = entry(&mut rng);
            e.settlement.generation.total_cost = Money::from_pico(pico);
            let mut line = Vec::new();
            e.write_line(&mut line);
            let parsed = Entry::parse(line.strip_suffix(b"\n").unwrap());
            assert_eq!(parsed.is_some(), ok, "{pico}");
        }
    }

    fn temp_dir() -> PathBuf {
        let r: u64 = rand::random();
        let d = std::env::temp_dir().join(format!(
            "switchboard-journal-{}-{r:016x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The ids of `entries`, in order.
    fn ids(entries: &[Entry]) -> Vec<String> {
        entries
            .iter()
            .map(|e| e.settlement.generation.id.clone())
            .collect()
    }

    /// Batches of journal lines for ids `gen-{from}`.., `per` lines a batch.
    fn batches(from: usize, n: usize, per: usize) -> (Vec<Vec<u8>>, Vec<String>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(from as u64);
        let (mut out, mut ids) = (Vec::new(), Vec::new());
        for b in 0..n {
            let mut buf = Vec::new();
            for i in 0..per {
                let mut e = entry(&mut rng);
                e.settlement.generation.id = format!("gen-{}", from + b * per + i);
                ids.push(e.settlement.generation.id.clone());
                e.write_line(&mut buf);
            }
            out.push(buf);
        }
        (out, ids)
    }

    #[test]
    fn a_mapped_journal_reads_back_every_line_and_skips_a_cut_one() {
        let dir = temp_dir();
        let path = dir.join("j-ledger");
        let mut j = JournalFile::create(&path, false).unwrap();
        assert_eq!(j.is_mapped(), cfg!(target_os = "linux"));
        let (bufs, want) = batches(0, 20, 3);
        for b in &bufs {
            j.append(b, false).unwrap();
        }
        // Read while the map is still open, as replay after a crash would find it.
        let (got, skipped) = read(&path).unwrap();
        assert_eq!((ids(&got), skipped), (want.clone(), 0));
        // A copy cut short by a crash: no newline, so never answered, so skipped.
        j.append(b"{\"id\":\"gen-cut\",\"key\":\"", false).unwrap();
        let (got, skipped) = read(&path).unwrap();
        assert_eq!((ids(&got), skipped), (want, 1));
        drop(j);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn batches_past_the_mapped_part_follow_it_and_read_back_in_order() {
        let dir = temp_dir();
        let path = dir.join("j-ledger");
        let mut j = JournalFile::create(&path, false).unwrap();
        // Well past the reserved megabyte, in batches that do not end on its edge.
        let (bufs, want) = batches(0, 1000, 7);
        let total: usize = bufs.iter().map(Vec::len).sum();
        assert!(total > (1 << 20) + (1 << 18), "{total}");
        for b in &bufs {
            j.append(b, false).unwrap();
        }
        let (got, skipped) = read(&path).unwrap();
        assert_eq!(skipped, 0);
        assert_eq!(ids(&got), want);
        drop(j);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_durable_journal_is_appended_not_mapped() {
        let dir = temp_dir();
        let path = dir.join("j-ledger");
        let mut j = JournalFile::create(&path, true).unwrap();
        assert!(!j.is_mapped());
        let (bufs, want) = batches(0, 3, 2);
        for b in &bufs {
            j.append(b, true).unwrap();
        }
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            bufs.iter().map(|b| b.len() as u64).sum::<u64>()
        );
        assert_eq!(ids(&read(&path).unwrap().0), want);
        drop(j);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Set in the child process of [`a_write_cut_short_by_the_file_system_leaves_none_of_its_batch`]:
    /// the directory it works in.
    #[cfg(target_os = "linux")]
    const CUT_SHORT_CHILD: &str = "SWITCHBOARD_JOURNAL_CUT_SHORT_CHILD";

    /// A write the file system refuses part-way (here the file-size limit,
    /// `RLIMIT_FSIZE`: the first `write` is short, the next fails with `EFBIG`, as on
    /// a disk that fills up mid-batch) leaves no byte of its batch in the journal,
    /// and the next batch follows the last whole one: replay finds every committed
    /// line and nothing of the failed one. Both ways of appending that can fail
    /// this way are covered: `write` (`sync = "full"`, and the fallback when the
    /// reservation or the map is refused, which starts after what the file holds)
    /// and the `pwrite` of a batch past the mapped part. The limit is per process,
    /// so this test runs itself again in a child process that sets it.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_write_cut_short_by_the_file_system_leaves_none_of_its_batch() {
        if let Some(dir) = std::env::var_os(CUT_SHORT_CHILD) {
            return cut_short_in_child(Path::new(&dir));
        }
        let dir = temp_dir();
        let name = concat!(
            module_path!(),
            "::a_write_cut_short_by_the_file_system_leaves_none_of_its_batch"
        );
        let name = name.split_once("::").unwrap().1;
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--test-threads=1", "--nocapture"])
            .env(CUT_SHORT_CHILD, &dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the child failed: {text}");
        assert!(text.contains("1 passed"), "the child ran no test: {text}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Sets the soft file-size limit of this process to `bytes`.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn limit_file_size(bytes: u64) {
        // SAFETY: plain calls with valid arguments. Ignoring SIGXFSZ makes a write past
        // the limit fail with EFBIG instead of killing the (child) process.
        unsafe {
            assert_ne!(libc::signal(libc::SIGXFSZ, libc::SIG_IGN), libc::SIG_ERR);
            let mut lim = std::mem::zeroed::<libc::rlimit>();
            assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
            lim.rlim_cur = bytes as libc::rlim_t;
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        }
    }

    #[cfg(target_os = "linux")]
    fn cut_short_in_child(dir: &Path) {
        let too_big = |e: std::io::Error| assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}");

        // Appended with `write`, after what a given-up mapped journal left (NULs).
        let path = dir.join("written-ledger");
        std::fs::write(&path, [0u8; 1000]).unwrap();
        limit_file_size(8192);
        let mut j = JournalFile::create(&path, true).unwrap();
        assert!(!j.is_mapped());
        assert_eq!(j.len(), 1000, "starts after what the file holds");
        let (first, mut want) = batches(0, 1, 3);
        j.append(&first[0], true).unwrap();
        let before = j.len();
        let (big, _) = batches(100, 1, 40);
        assert!(before + big[0].len() as u64 > 8192);
        too_big(j.append(&big[0], true).unwrap_err());
        assert_eq!(j.len(), before);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before, "cut back");
        let (last, last_ids) = batches(200, 1, 2);
        j.append(&last[0], true).unwrap();
        want.extend_from_slice(&last_ids);
        let (got, skipped) = read(&path).unwrap();
        assert_eq!((ids(&got), skipped), (want, 0));

        // Mapped, the batch that no longer fits in the map written after it.
        let path = dir.join("mapped-ledger");
        limit_file_size(MAPPED_BYTES as u64 + 4096);
        let mut j = JournalFile::create(&path, false).unwrap();
        assert!(j.is_mapped());
        let (bufs, all) = batches(1000, 600, 7);
        let mut want = Vec::new();
        for (b, ids) in bufs.iter().zip(all.chunks(7)) {
            if j.len() as usize + b.len() > MAPPED_BYTES {
                break;
            }
            j.append(b, false).unwrap();
            want.extend_from_slice(ids);
        }
        let before = j.len();
        too_big(j.append(&big[0], false).unwrap_err());
        assert_eq!(j.len(), before);
        let size = std::fs::metadata(&path).unwrap().len();
        assert_eq!(
            size, MAPPED_BYTES as u64,
            "cut back to the map, not below it"
        );
        j.append(&last[0], false).unwrap();
        want.extend(last_ids);
        let (got, skipped) = read(&path).unwrap();
        assert_eq!(skipped, 0);
        assert_eq!(ids(&got), want);
    }

    #[test]
    fn a_recycled_journal_holds_only_what_is_appended_after() {
        let dir = temp_dir();
        let path = dir.join("j-ledger");
        for durable in [false, true] {
            let mut j = JournalFile::create(&path, durable).unwrap();
            // Past the mapped part too, so that recycling cuts the file back.
            let (bufs, _) = batches(0, 1000, 7);
            for b in &bufs {
                j.append(b, durable).unwrap();
            }
            j.recycle().unwrap();
            assert_eq!(j.len(), 0);
            let bytes = std::fs::read(&path).unwrap();
            assert!(bytes.iter().all(|&b| b == 0), "emptied");
            assert!(bytes.len() <= 1 << 20, "{}", bytes.len());
            let (bufs, want) = batches(7000, 4, 3);
            for b in &bufs {
                j.append(b, durable).unwrap();
            }
            let (got, skipped) = read(&path).unwrap();
            assert_eq!((ids(&got), skipped), (want, 0));
            drop(j);
            std::fs::remove_file(&path).unwrap();
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
