//! Where request records go: the [`LogSink`] trait, its JSONL implementation
//! (SQLite's is [`SqliteSink`](super::SqliteSink), PostgreSQL's
//! [`PostgresSink`](super::PostgresSink)), [`open_sink`] which picks one from the
//! config, and the [`LogWriter`] that feeds a sink off the request path.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::telemetry;

use super::{RequestRecord, SqliteSink};

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

    /// What answers `GET /admin/usage` from the records this sink writes, if it can
    /// (a SQLite file, PostgreSQL); asked once, when its [`LogWriter`] is spawned,
    /// which keeps it ([`LogWriter::usage`]). `None` by default.
    fn usage_source(&self) -> Option<Arc<dyn super::UsageSource>> {
        None
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
    /// What the sink gave to query what it wrote ([`LogSink::usage_source`]).
    usage: Option<Arc<dyn super::UsageSource>>,
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
            usage: None,
        }
    }

    /// Starts a writer thread for `sink` with a queue of `capacity` records.
    pub fn spawn(sink: Box<dyn LogSink>, capacity: usize) -> LogWriter {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        let usage = sink.usage_source();
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
            usage,
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

    /// What answers usage queries over the records written ([`LogSink::usage_source`]
    /// of the sink): `None` for a JSONL file, a log in memory, or no log.
    pub fn usage(&self) -> Option<&Arc<dyn super::UsageSource>> {
        self.usage.as_ref()
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
    // `sqlite` (the default) means "beside the store"; a PostgreSQL store has no
    // directory, so its request log goes into its own database.
    let beside_postgres = sink == "sqlite" && crate::store::is_postgres_url(&config.store.url);
    if sink == "postgres" || beside_postgres {
        return Ok(Some(Box::new(super::PostgresSink::open(
            &config.store.url,
        )?)));
    }
    if sink == "sqlite" {
        return Ok(Some(Box::new(
            match sqlite_path_beside_store(&config.store.url) {
                Some(path) => SqliteSink::open(&path)?,
                None => {
                    if !config.store.url.starts_with("sqlite:") {
                        tracing::warn!(
                            "[logging].sink = \"sqlite\" (the default) keeps the request log in memory: the store is not a SQLite file; set [logging].sink = \"sqlite:PATH\""
                        );
                    }
                    SqliteSink::memory()?
                }
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

/// Creates the missing directories above a request log file (mode 0700, as the
/// store's); the error names the log, its directory and what to do.
pub(super) fn create_log_dir(path: &Path) -> io::Result<()> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    crate::store::create_private_dir_all(dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot create the directory `{}` of the request log {}: {e}; create it yourself, or set [logging].sink to a path in a directory this user can write",
                dir.display(),
                path.display()
            ),
        )
    })
}

/// Appends one JSON object per line ([`RequestRecord`]'s fields) to a file.
#[derive(Debug)]
pub struct JsonlSink {
    out: BufWriter<File>,
}

impl JsonlSink {
    /// Opens (creating, appending to) `path`.
    pub fn open(path: &Path) -> io::Result<JsonlSink> {
        create_log_dir(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::CallContext;

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
    fn a_jsonl_line_carries_the_app_attribution() {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-jsonl-app-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.jsonl");
        let mut sink = JsonlSink::open(&path).unwrap();
        let mut with = record(1);
        with.app_url = Some("https://app.example/".into());
        with.app_title = Some("App \"one\"".into());
        sink.write(&[with.clone(), record(2)]).unwrap();
        sink.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<RequestRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0], with);
        assert_eq!(
            (lines[1].app_url.as_deref(), lines[1].app_title.as_deref()),
            (None, None)
        );
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["app_url"], "https://app.example/");
        // A line written before the fields existed still reads.
        let mut old: serde_json::Value = first.clone();
        old.as_object_mut().unwrap().remove("app_url");
        old.as_object_mut().unwrap().remove("app_title");
        let back: RequestRecord = serde_json::from_value(old).unwrap();
        assert_eq!(back.app_url, None);
        let _ = std::fs::remove_dir_all(dir);
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

    /// A sink for a server that is away until `up` is set: it fails (asking for a
    /// retry) until then, and says when it is dropped (its writer thread has ended).
    struct Away {
        up: Arc<std::sync::atomic::AtomicBool>,
        tries: Arc<AtomicU64>,
        written: Arc<std::sync::Mutex<Vec<String>>>,
        dropped: Arc<std::sync::atomic::AtomicBool>,
    }
    impl LogSink for Away {
        fn write(&mut self, batch: &[RequestRecord]) -> io::Result<()> {
            self.tries.fetch_add(1, Ordering::SeqCst);
            if !self.up.load(Ordering::SeqCst) {
                return Err(io::Error::other("the server is away"));
            }
            let mut w = self.written.lock().unwrap();
            w.extend(batch.iter().map(|r| r.id.clone()));
            Ok(())
        }
        fn retry(&self, _error: &io::Error) -> bool {
            true
        }
    }
    impl Drop for Away {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn until(what: &str, f: impl Fn() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_batch_the_sink_asks_to_retry_is_kept_until_it_is_written_and_the_overflow_is_counted() {
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tries = Arc::new(AtomicU64::new(0));
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let capacity = 16;
        let writer = LogWriter::spawn(
            Box::new(Away {
                up: up.clone(),
                tries: tries.clone(),
                written: written.clone(),
                dropped: gone.clone(),
            }),
            capacity,
        );
        writer.send(record(0));
        until("a first failed try", || tries.load(Ordering::SeqCst) >= 1);
        // The writer holds record 0 and retries it; the queue takes `capacity` more,
        // the rest is dropped and counted.
        for i in 1..100 {
            writer.send(record(i));
        }
        assert_eq!(writer.dropped(), 100 - 1 - capacity as u64);
        until("a second try, after the backoff", || {
            tries.load(Ordering::SeqCst) >= 2
        });
        up.store(true, Ordering::SeqCst);
        assert!(writer.flush(Duration::from_secs(30)));
        let w = written.lock().unwrap().clone();
        let mut want: Vec<String> = (0..=capacity).map(|i| format!("gen-{i}")).collect();
        want.sort();
        let mut got = w.clone();
        got.sort();
        assert_eq!(got, want, "each kept record written once");

        // Away again, and every writer handle dropped: the thread tries what it holds
        // once more and ends (it does not wait for a server forever).
        up.store(false, Ordering::SeqCst);
        writer.send(record(1000));
        drop(writer);
        until("the writer thread to end", || gone.load(Ordering::SeqCst));
        assert_eq!(written.lock().unwrap().len(), capacity + 1);
    }

    #[test]
    fn a_batch_the_sink_does_not_ask_to_retry_is_lost_once() {
        struct Broken(Arc<AtomicU64>);
        impl LogSink for Broken {
            fn write(&mut self, _batch: &[RequestRecord]) -> io::Result<()> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Err(io::Error::other("disk full"))
            }
        }
        let tries = Arc::new(AtomicU64::new(0));
        let writer = LogWriter::spawn(Box::new(Broken(tries.clone())), 16);
        writer.send(record(0));
        // The flush is answered: nothing is kept, nothing waits.
        assert!(writer.flush(Duration::from_secs(30)));
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }
}
