//! The instance's one settlement writer: everything queued is committed in one
//! statement (`sb_settle`), retried until it commits. While it does not commit,
//! everything the writer holds is kept in the instance's spill file ([`super::spill`])
//! before any waiting `settle` is answered with an error.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::escrow::{statement_id, Amounts, Effect};
use super::{Op, PerKey, Shared, WAIT};
use crate::money::MAX_CHARGE;
use crate::store::{IdempotencyRecord, Settlement, StoreError};

/// Settlements per statement at most.
const MAX_BATCH: usize = 512;

/// The longest a settlement waits in the queue for others to join its statement
/// (see [`linger`]).
const LINGER: Duration = Duration::from_millis(1);

/// The size of the last statement from which the writer lingers: below it, requests
/// rarely overlap and a settlement goes at once.
const LINGER_FROM: usize = 8;

/// How long a flush waits while PostgreSQL does not answer (a gateway shutting down
/// must not wait for ever).
const FLUSH_WAIT: Duration = Duration::from_secs(if cfg!(test) { 2 } else { 30 });

/// How long a statement may go unanswered before what it commits is spilled.
const SILENT: Duration = Duration::from_secs(1);

type Waiter = oneshot::Sender<Result<bool, StoreError>>;

/// A settlement's waiter (if any), when it was queued, whether its reservation
/// counts in its key's account here, and whether it is in the spill file.
struct Waiting {
    waiter: Option<Waiter>,
    since: Instant,
    counted: bool,
    spilled: bool,
}

/// A queued settlement (and the idempotency record committed with it).
struct Queued {
    settlement: Box<Settlement>,
    meta: Waiting,
    record: Option<Box<IdempotencyRecord>>,
}

enum Item {
    Settle(Queued),
    /// Answered once what is before it is committed, or after [`FLUSH_WAIT`] while
    /// PostgreSQL does not answer (`None` then).
    Flush(Option<oneshot::Sender<()>>, Instant),
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    /// Settlements taken by the writer and not committed yet.
    in_flight: usize,
    /// Whether those are all in the spill file.
    in_flight_spilled: bool,
    closing: bool,
    /// How many queued items make `settle` wake the writer: 1 while it waits for
    /// work, more while it lingers for a larger statement ([`linger`]), none while it
    /// commits (it looks at the queue again after).
    wake_at: usize,
    /// Told, once the queue is empty after `closing`.
    stopped: Option<std::sync::mpsc::Sender<()>>,
}

/// The queue between `settle` and the writer task.
#[derive(Default)]
pub(super) struct Writer {
    queue: Mutex<Queue>,
    wake: tokio::sync::Notify,
    /// Tests: the writer takes nothing while set.
    #[cfg(test)]
    pub paused: std::sync::atomic::AtomicBool,
}

impl Writer {
    /// Queues a settlement; with `wait`, the receiver answers once it is committed
    /// (`true`: charged, `false`: that request id was settled before).
    pub fn settle(
        &self,
        shared: &Shared,
        s: Settlement,
        wait: bool,
    ) -> Option<oneshot::Receiver<Result<bool, StoreError>>> {
        self.settle_recorded(shared, s, None, wait)
    }

    /// [`settle`](Self::settle), with the idempotency record to commit in the same
    /// statement (and to keep with it in the spill file).
    pub fn settle_recorded(
        &self,
        shared: &Shared,
        s: Settlement,
        record: Option<Box<IdempotencyRecord>>,
        wait: bool,
    ) -> Option<oneshot::Receiver<Result<bool, StoreError>>> {
        let (tx, rx) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let reserved = Amounts::of(s.reserved);
        let cost = s.generation.total_cost;
        if !cost.within(MAX_CHARGE) {
            let why = format!(
                "settlement {} refused, not charged: a charge of ${cost} is outside the ledger's bounds ($0 to ${MAX_CHARGE})",
                s.generation.id
            );
            tracing::error!("ledger: {why}");
            shared.release(&s.key_id, s.reserved);
            if let Some(tx) = tx {
                let _ = tx.send(Err(StoreError(why)));
            }
            return rx;
        }
        let mut q = self.queue.lock();
        if q.closing {
            drop(q);
            shared.release(&s.key_id, s.reserved);
            if let Some(tx) = tx {
                let _ = tx.send(Err(StoreError::unavailable(
                    "the store is closing; this charge was not committed",
                )));
            }
            return rx;
        }
        let counted = match shared.existing(&s.key_id) {
            Some(cell) => {
                cell.state.lock().queue_settling(reserved);
                true
            }
            None => false,
        };
        q.items.push_back(Item::Settle(Queued {
            settlement: Box::new(s),
            meta: Waiting {
                waiter: tx,
                since: Instant::now(),
                counted,
                spilled: false,
            },
            record,
        }));
        let wake = q.items.len() >= q.wake_at;
        drop(q);
        if wake {
            self.wake.notify_one();
        }
        rx
    }

    /// Tests: wakes the writer (after a pause).
    #[cfg(test)]
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Answers once everything queued before it is committed.
    pub fn flush(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut q = self.queue.lock();
        if q.closing && q.items.is_empty() && q.in_flight == 0 {
            let _ = tx.send(());
        } else {
            q.items.push_back(Item::Flush(Some(tx), Instant::now()));
        }
        drop(q);
        self.wake.notify_one();
        rx
    }

    /// Stops taking settlements and waits (at most `bound`) for the queued ones to be
    /// committed; how many were not.
    pub fn close_and_wait(&self, bound: Duration) -> usize {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut q = self.queue.lock();
            q.closing = true;
            q.stopped = Some(tx);
        }
        self.wake.notify_one();
        if rx.recv_timeout(bound).is_ok() {
            return 0;
        }
        let q = self.queue.lock();
        q.in_flight
            + q.items
                .iter()
                .filter(|i| matches!(i, Item::Settle(_)))
                .count()
    }

    /// The next batch (settlements up to the first flush after them), answering the
    /// flushes that have nothing left before them; `None` when the writer may stop.
    fn take(&self) -> Option<Vec<Queued>> {
        #[cfg(test)]
        if self.paused.load(std::sync::atomic::Ordering::SeqCst) {
            return Some(Vec::new());
        }
        let mut q = self.queue.lock();
        let mut batch = Vec::new();
        while let Some(item) = q.items.pop_front() {
            match item {
                Item::Flush(tx, _) if batch.is_empty() => {
                    if let Some(tx) = tx {
                        let _ = tx.send(());
                    }
                }
                Item::Flush(tx, since) => {
                    q.items.push_front(Item::Flush(tx, since));
                    break;
                }
                Item::Settle(s) => {
                    batch.push(s);
                    if batch.len() == MAX_BATCH {
                        break;
                    }
                }
            }
        }
        q.in_flight = batch.len();
        q.in_flight_spilled = false;
        // Committing, the writer looks at the queue again after; idle, it waits for
        // the next settlement.
        q.wake_at = if batch.is_empty() { 1 } else { usize::MAX };
        if batch.is_empty() && q.closing {
            if let Some(tx) = q.stopped.take() {
                let _ = tx.send(());
            }
            return None;
        }
        Some(batch)
    }

    /// Writes what is not in the spill file yet, of `batch` (the settlements being
    /// committed) and of the queue, to it, and `fsync`s it (on a blocking thread).
    /// What could not be written stays marked as not spilled (tried again next time).
    async fn spill(
        &self,
        shared: &Arc<Shared>,
        batch: &[Box<Settlement>],
        records: &[Option<Box<IdempotencyRecord>>],
        meta: &mut [Waiting],
    ) {
        let (lines, queued) = {
            let q = self.queue.lock();
            let queued: Vec<usize> = q
                .items
                .iter()
                .enumerate()
                .filter_map(|(n, i)| match i {
                    Item::Settle(s) if !s.meta.spilled => Some(n),
                    _ => None,
                })
                .collect();
            let from_queue = queued.iter().filter_map(|n| match &q.items[*n] {
                Item::Settle(s) => Some((&*s.settlement, s.record.as_deref())),
                Item::Flush(..) => None,
            });
            let from_batch = batch
                .iter()
                .zip(records)
                .zip(meta.iter())
                .filter(|(_, m)| !m.spilled)
                .map(|((s, r), _)| (&**s, r.as_deref()));
            (
                shared.spill.lines_with(from_batch.chain(from_queue)),
                queued,
            )
        };
        let s = shared.clone();
        let written = tokio::task::spawn_blocking(move || s.spill.append(lines))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match written {
            Ok(()) => {
                for m in meta.iter_mut() {
                    m.spilled = true;
                }
                // Only the writer takes from the queue: what was queued then is still
                // where it was.
                let mut q = self.queue.lock();
                for n in queued {
                    if let Some(Item::Settle(s)) = q.items.get_mut(n) {
                        s.meta.spilled = true;
                    }
                }
            }
            Err(e) => tracing::error!(
                "cannot keep the charges PostgreSQL did not commit in {}: {e}; they are held in memory only",
                shared.spill.path().display()
            ),
        }
    }

    /// At close, with settlements left: writes the queued ones not in the spill file
    /// yet to it (on this thread); how many settlements are on no disk.
    pub fn spill_rest(&self, shared: &Shared) -> usize {
        let mut q = self.queue.lock();
        let mut lost = if q.in_flight_spilled { 0 } else { q.in_flight };
        let lines = shared
            .spill
            .lines_with(q.items.iter().filter_map(|i| match i {
                Item::Settle(s) if !s.meta.spilled => Some((&*s.settlement, s.record.as_deref())),
                _ => None,
            }));
        let unspilled = q
            .items
            .iter()
            .filter(|i| matches!(i, Item::Settle(s) if !s.meta.spilled))
            .count();
        if unspilled > 0 {
            match shared.spill.append(lines) {
                Ok(()) => {
                    for item in q.items.iter_mut() {
                        if let Item::Settle(s) = item {
                            s.meta.spilled = true;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(
                        "cannot keep {unspilled} charge(s) in {}: {e}",
                        shared.spill.path().display()
                    );
                    lost += unspilled;
                }
            }
        }
        lost
    }

    /// Answers, with an error, the waiters queued for longer than [`WAIT`] (their
    /// charges stay queued and are committed when PostgreSQL answers).
    fn answer_overdue(&self, waiters: &mut [Waiting], server: &str) {
        let now = Instant::now();
        let overdue = |waiter: &mut Option<Waiter>, since: Instant| {
            if now.duration_since(since) >= WAIT {
                if let Some(w) = waiter.take() {
                    let _ = w.send(Err(StoreError::unavailable(format!(
                        "PostgreSQL at {server} does not answer; this charge is queued and will be committed when it does"
                    ))));
                }
            }
        };
        for w in waiters.iter_mut() {
            overdue(&mut w.waiter, w.since);
        }
        let mut q = self.queue.lock();
        for item in q.items.iter_mut() {
            match item {
                Item::Settle(s) => overdue(&mut s.meta.waiter, s.meta.since),
                Item::Flush(tx, since) if now.duration_since(*since) >= FLUSH_WAIT => {
                    if let Some(tx) = tx.take() {
                        tracing::error!(
                            "PostgreSQL at {server} does not answer: a flush gives up waiting; the charges before it stay queued"
                        );
                        let _ = tx.send(());
                    }
                }
                Item::Flush(..) => {}
            }
        }
    }
}

/// Whether the writer, free since `free` and whose last statement committed `last`
/// settlements, waits before taking the `queued` settlements: `Some((until, want))`
/// to wait until `until`, or until `want` are queued.
///
/// Group commit, as PostgreSQL's own `commit_delay` does for the WAL: under load a
/// statement's fixed cost (the round trip, the function, the key and lease updates,
/// the commit's WAL flush) is most of what a settlement costs PostgreSQL, and shared
/// by every settlement in it. When the last statement was large ([`LINGER_FROM`] or
/// more), requests overlap, and waiting at most [`LINGER`] for half as many again
/// makes statements larger, and fewer. A quiet gateway (smaller statements) never
/// waits. BENCHMARKS.md (sixteenth session) has what it saves and costs.
fn linger(last: usize, queued: usize, free: Instant, now: Instant) -> Option<(Instant, usize)> {
    let want = (last + last / 2).min(MAX_BATCH);
    let until = free + LINGER;
    (last >= LINGER_FROM && queued < want && now < until).then_some((until, want))
}

/// How many settlements are queued, unless a flush or the close is waiting (those go
/// at once: `None`).
fn queued(q: &Queue) -> Option<usize> {
    if q.closing || q.items.iter().any(|i| matches!(i, Item::Flush(..))) {
        return None;
    }
    Some(q.items.len())
}

/// The writer task: takes what is queued (after lingering for more, under load:
/// [`linger`]), commits it, and again.
pub(super) async fn run(shared: Arc<Shared>) {
    let mut last = 0;
    // When the writer was last done with a statement (or idle).
    let mut free = Instant::now();
    loop {
        let notified = shared.writer.wake.notified();
        let wait = {
            let mut q = shared.writer.queue.lock();
            let wait = queued(&q).and_then(|n| linger(last, n, free, Instant::now()));
            if let Some((_, want)) = wait {
                q.wake_at = want;
            }
            wait
        };
        if let Some((until, _)) = wait {
            tokio::select! {
                () = tokio::time::sleep_until(until.into()) => {}
                () = notified => {}
            }
            continue;
        }
        let Some(batch) = shared.writer.take() else {
            return;
        };
        if batch.is_empty() {
            // Idle: the next settlement goes at once.
            last = 0;
            notified.await;
            continue;
        }
        last = batch.len();
        commit(&shared, batch).await;
        shared.writer.queue.lock().in_flight = 0;
        free = Instant::now();
    }
}

/// Why a batch did not commit.
pub(super) enum Failure {
    /// PostgreSQL did not answer, or the transaction met another (deadlock,
    /// serialization): try again.
    Retry(StoreError),
    /// PostgreSQL refused the statement (a bound): one of the settlements is at
    /// fault.
    Refused(StoreError),
}

/// What `sb_settle` answered: the request ids inserted, and this instance's leases
/// after it.
pub(super) struct Committed {
    pub inserted: HashSet<String>,
    leases: Vec<(String, Amounts, i64)>,
}

/// Commits a batch, retrying until it commits; a batch PostgreSQL refuses is
/// committed one settlement at a time, and the one at fault is refused alone.
async fn commit(shared: &Arc<Shared>, batch: Vec<Queued>) {
    let mut records: Vec<Option<Box<IdempotencyRecord>>> = Vec::with_capacity(batch.len());
    let (batch, mut waiters): (Vec<Box<Settlement>>, Vec<Waiting>) = batch
        .into_iter()
        .map(|q| {
            records.push(q.record);
            (q.settlement, q.meta)
        })
        .unzip();
    // Each request id once per statement; a repeat is answered `false` after it.
    let mut seen = HashSet::with_capacity(batch.len());
    let first: Vec<bool> = batch
        .iter()
        .map(|s| seen.insert(s.generation.id.clone()))
        .collect();
    let mut in_statement: PerKey<Amounts> = PerKey::default();
    let mut all: PerKey<Amounts> = PerKey::default();
    for ((s, first), w) in batch.iter().zip(&first).zip(&waiters) {
        let r = Amounts::of(s.reserved);
        let add = |m: &mut PerKey<Amounts>| {
            let e = m.entry(s.key_id.clone()).or_default();
            e.money = e.money.saturating_add(r.money);
            e.tokens = e.tokens.saturating_add(r.tokens);
        };
        if w.counted {
            add(&mut all);
        }
        if *first {
            add(&mut in_statement);
        }
    }
    let id = statement_id();
    for (key_id, r) in &in_statement {
        if let Some(cell) = shared.existing(key_id) {
            cell.state.lock().push(id, Effect::Sub(*r));
        }
    }
    let rows: Vec<(&Settlement, Option<&IdempotencyRecord>)> = batch
        .iter()
        .zip(&records)
        .zip(&first)
        .filter(|(_, f)| **f)
        .map(|((s, r), _)| (&**s, r.as_deref()))
        .collect();
    let mut delay = Duration::from_millis(50);
    let mut failing = false;
    let outcome = loop {
        // A try after one that failed may follow a commit whose answer was lost.
        let attempt = statement(shared, &rows, Some(&shared.instance), !failing);
        tokio::pin!(attempt);
        let answer = loop {
            tokio::select! {
                answer = &mut attempt => break answer,
                // PostgreSQL is silent (a network that drops packets): the charges go
                // on disk meanwhile, before any waiter is told.
                () = tokio::time::sleep(SILENT) => {
                    shared.writer.spill(shared, &batch, &records, &mut waiters).await;
                    if waiters.iter().all(|w| w.spilled) {
                        shared.writer.queue.lock().in_flight_spilled = true;
                    }
                    shared.writer.answer_overdue(&mut waiters, &shared.server);
                }
            }
        };
        match answer {
            Ok(c) => break Ok(c),
            Err(Failure::Refused(e)) => break Err(e),
            Err(Failure::Retry(e)) => {
                if !failing {
                    tracing::error!(
                        "could not commit {} settlement(s): {e}; they stay queued and are retried until PostgreSQL commits them",
                        rows.len()
                    );
                    failing = true;
                }
                // On disk (fsync'd) before anyone is told it did not commit.
                shared
                    .writer
                    .spill(shared, &batch, &records, &mut waiters)
                    .await;
                if waiters.iter().all(|w| w.spilled) {
                    shared.writer.queue.lock().in_flight_spilled = true;
                }
                shared.writer.answer_overdue(&mut waiters, &shared.server);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    drop(rows);
    // Per key, under its lock at once: the statement is answered, the lease is what
    // PostgreSQL says, and the holds of the settled requests end.
    let leases: PerKey<(Amounts, i64)> = match &outcome {
        Ok(c) => c
            .leases
            .iter()
            .map(|(k, l, v)| (k.clone(), (*l, *v)))
            .collect(),
        Err(_) => PerKey::default(),
    };
    let keys: HashSet<&String> = in_statement.keys().chain(all.keys()).collect();
    for key_id in keys {
        if let Some(cell) = shared.existing(key_id) {
            let mut a = cell.state.lock();
            a.settled_statement(id);
            if let Some((lease, ver)) = leases.get(key_id) {
                a.observe(*ver, *lease);
            }
            if outcome.is_ok() {
                if let Some(r) = all.get(key_id) {
                    a.end_settling(*r);
                }
            }
        }
    }
    if waiters.iter().any(|w| w.spilled) && !(outcome.is_err() && batch.len() > 1) {
        // Committed, or refused for good: either way not owed any more.
        shared.spill.committed(
            batch
                .iter()
                .zip(&waiters)
                .filter(|(_, w)| w.spilled)
                .map(|(s, _)| s.generation.id.as_str()),
        );
    }
    match outcome {
        Ok(committed) => {
            if failing {
                tracing::info!(
                    "committed {} settlement(s) held back while PostgreSQL did not answer",
                    batch.len()
                );
            }
            for ((s, first), w) in batch.iter().zip(first).zip(waiters) {
                if let Some(w) = w.waiter {
                    let charged = first && committed.inserted.contains(&s.generation.id);
                    let _ = w.send(Ok(charged));
                }
            }
        }
        Err(e) if batch.len() > 1 => {
            tracing::warn!(
                "PostgreSQL refused a batch of {} settlements ({e}); committing them one by one",
                batch.len()
            );
            for ((settlement, meta), record) in batch.into_iter().zip(waiters).zip(records) {
                let one = Queued {
                    settlement,
                    meta,
                    record,
                };
                Box::pin(commit(shared, vec![one])).await;
            }
        }
        Err(e) => {
            for (s, w) in batch.iter().zip(waiters) {
                tracing::error!(
                    "ledger: settlement {} refused, not charged: {e}",
                    s.generation.id
                );
                if let Some(cell) = shared.existing(&s.key_id).filter(|_| w.counted) {
                    cell.state.lock().end_settling(Amounts::of(s.reserved));
                }
                if let Some(w) = w.waiter {
                    let _ = w.send(Err(StoreError(format!("settlement refused: {e}"))));
                }
            }
        }
    }
}

/// The idempotency records of a batch as the columns `SETTLE_RECORDED` unnests.
struct RecordColumns<'a> {
    key_ids: Vec<&'a str>,
    idem_keys: Vec<&'a str>,
    fingerprints: Vec<&'a [u8]>,
    request_ids: Vec<&'a str>,
    statuses: Vec<i32>,
    headers: Vec<String>,
    bodies: Vec<&'a [u8]>,
    created: Vec<i64>,
    expires: Vec<i64>,
}

impl<'a> RecordColumns<'a> {
    /// The records of `rows`, one per client key and idempotency key (the last one:
    /// `ON CONFLICT DO UPDATE` may not touch a row twice in one statement, and the
    /// instance's locks never let two first requests of one key run at once anyway).
    fn of(rows: &[(&'a Settlement, Option<&'a IdempotencyRecord>)]) -> Self {
        let mut last: std::collections::HashMap<(&str, &str), usize> = Default::default();
        for (n, (s, r)) in rows.iter().enumerate() {
            if let Some(r) = r {
                last.insert((s.key_id.as_str(), r.idem_key.as_str()), n);
            }
        }
        let mut picked: Vec<usize> = last.into_values().collect();
        picked.sort_unstable();
        let mut c = RecordColumns {
            key_ids: Vec::new(),
            idem_keys: Vec::new(),
            fingerprints: Vec::new(),
            request_ids: Vec::new(),
            statuses: Vec::new(),
            headers: Vec::new(),
            bodies: Vec::new(),
            created: Vec::new(),
            expires: Vec::new(),
        };
        for n in picked {
            let (s, Some(r)) = rows[n] else { continue };
            c.key_ids.push(&s.key_id);
            c.idem_keys.push(&r.idem_key);
            c.fingerprints.push(&r.fingerprint);
            c.request_ids.push(&s.generation.id);
            c.statuses.push(i32::from(r.status));
            c.headers.push(r.headers_json());
            c.bodies.push(&r.body);
            c.created.push(int(r.created));
            c.expires.push(int(r.expires));
        }
        c
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 9] {
        [
            &self.key_ids,
            &self.idem_keys,
            &self.fingerprints,
            &self.request_ids,
            &self.statuses,
            &self.headers,
            &self.bodies,
            &self.created,
            &self.expires,
        ]
    }
}

/// A count as PostgreSQL's `BIGINT` (past `i64::MAX`, `i64::MAX`).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `sb_settle_fresh` of a batch (see [`statement`]).
const SETTLE_FRESH: &str = "SELECT * FROM sb_settle_fresh($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)";

/// `sb_settle` of a batch.
const SETTLE: &str = "SELECT * FROM sb_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)";

/// `sb_settle` of a batch and, in the same statement (so in the same transaction),
/// the idempotency records of the settlements it inserts (SPEC §8.2): a record whose
/// settlement was committed before is not written. `s` is evaluated once (a CTE
/// read twice is materialized, and `sb_settle` is volatile).
const SETTLE_RECORDED: &str = "WITH s AS (
    SELECT * FROM sb_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)
), rec AS (
    INSERT INTO sb_idempotency AS t (key_id, idem_key, fingerprint, request_id, status, headers,
        body, created, expires)
    SELECT r.key_id, r.idem_key, r.fingerprint, r.request_id, r.status, r.headers, r.body,
           r.created, r.expires
      FROM unnest($21::text[], $22::text[], $23::bytea[], $24::text[], $25::int4[], $26::text[],
                  $27::bytea[], $28::int8[], $29::int8[])
        AS r(key_id, idem_key, fingerprint, request_id, status, headers, body, created, expires)
     WHERE r.request_id IN (SELECT s.id FROM s WHERE s.kind = 'i')
    ON CONFLICT (key_id, idem_key) DO UPDATE
        SET fingerprint = excluded.fingerprint, request_id = excluded.request_id,
            status = excluded.status, headers = excluded.headers, body = excluded.body,
            created = excluded.created, expires = excluded.expires
)
SELECT * FROM s";

/// `sb_settle` and the `cache_hit` flag of the response-cache hits among its rows, in
/// one transaction (only batches with hits pay the extra statement).
async fn settle_with_hits(
    client: &mut deadpool_postgres::Client,
    stmt: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    hits: &[&str],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let rows = tx.query(stmt, params).await?;
    tx.execute(
        "UPDATE sb_settlements SET cache_hit = true WHERE id = ANY($1)",
        &[&hits],
    )
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// One `sb_settle` round trip, for `instance`'s leases (`None`: touching no lease, for
/// a replay), with the idempotency records of the rows that have one.
///
/// `fresh`: none of the rows can have been settled before (the writer's first try of
/// a batch), so a plain batch (no idempotency record, no cache hit) goes through
/// `sb_settle_fresh`, cheaper for PostgreSQL; should one have been settled after all,
/// PostgreSQL refuses that statement whole and the batch goes again at once through
/// `sb_settle`, which skips it (two round trips, still charged once).
pub(super) async fn statement(
    shared: &Arc<Shared>,
    rows: &[(&Settlement, Option<&IdempotencyRecord>)],
    instance: Option<&str>,
    fresh: bool,
) -> Result<Committed, Failure> {
    let recorded = rows.iter().any(|(_, r)| r.is_some());
    let hits: Vec<&str> = rows
        .iter()
        .filter(|(s, _)| s.generation.cache_hit)
        .map(|(s, _)| s.generation.id.as_str())
        .collect();
    if fresh && !recorded && hits.is_empty() {
        if let Some(committed) = try_statement(shared, rows, instance, Sql::Fresh, &hits).await? {
            return Ok(committed);
        }
    }
    let sql = if recorded { Sql::Recorded } else { Sql::Settle };
    try_statement(shared, rows, instance, sql, &hits)
        .await?
        .ok_or_else(|| Failure::Retry(StoreError("sb_settle answered nothing".into())))
}

/// Which statement settles a batch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sql {
    /// `sb_settle_fresh` ([`SETTLE_FRESH`]).
    Fresh,
    /// `sb_settle` ([`SETTLE`]).
    Settle,
    /// `sb_settle` and the idempotency records ([`SETTLE_RECORDED`]).
    Recorded,
}

/// [`statement`] through `sql`; `None` when [`Sql::Fresh`] met a request id settled
/// before (nothing committed).
async fn try_statement(
    shared: &Arc<Shared>,
    rows: &[(&Settlement, Option<&IdempotencyRecord>)],
    instance: Option<&str>,
    sql: Sql,
    hits: &[&str],
) -> Result<Option<Committed>, Failure> {
    // Nothing but the rows themselves can make PostgreSQL refuse them for good.
    let mut client = shared.client().await.map_err(Failure::Retry)?;
    let fresh = sql == Sql::Fresh;
    let text = match sql {
        Sql::Fresh => SETTLE_FRESH,
        Sql::Settle => SETTLE,
        Sql::Recorded => SETTLE_RECORDED,
    };
    let stmt = shared
        .prepare(&client, text)
        .await
        .map_err(Failure::Retry)?;
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut costs = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut reserved = Vec::with_capacity(n);
    let mut reserved_tokens = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut providers = Vec::with_capacity(n);
    let mut streamed = Vec::with_capacity(n);
    let mut prompt = Vec::with_capacity(n);
    let mut completion = Vec::with_capacity(n);
    let mut latency = Vec::with_capacity(n);
    let mut ttft = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut finish = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut app_url = Vec::with_capacity(n);
    let mut app_title = Vec::with_capacity(n);
    for (s, _) in rows {
        let g = &s.generation;
        let r = Amounts::of(s.reserved);
        ids.push(g.id.as_str());
        keys.push(s.key_id.as_str());
        costs.push(g.total_cost.pico());
        tokens.push(int(s.tokens));
        reserved.push(r.money);
        reserved_tokens.push(r.tokens);
        models.push(g.model.as_str());
        providers.push(g.provider.as_str());
        streamed.push(g.streamed);
        prompt.push(int(g.prompt_tokens));
        completion.push(int(g.completion_tokens));
        latency.push(int(g.latency_ms));
        ttft.push(g.ttft_ms.map(int));
        attempts.push(serde_json::to_string(&g.attempts).unwrap_or_else(|_| "[]".into()));
        finish.push(g.finish_reason.as_deref());
        created.push(int(g.created));
        app_url.push(g.app_url.as_deref());
        app_title.push(g.app_title.as_deref());
    }
    // The day (week, month) the charges count in: this instance's clock.
    let now = int(shared.now());
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
        &instance,
        &ids,
        &keys,
        &costs,
        &tokens,
        &reserved,
        &reserved_tokens,
        &models,
        &providers,
        &streamed,
        &prompt,
        &completion,
        &latency,
        &ttft,
        &attempts,
        &finish,
        &created,
        &app_url,
        &app_title,
        &now,
    ];
    let records = (sql == Sql::Recorded).then(|| RecordColumns::of(rows));
    if let Some(r) = &records {
        params.extend(r.params());
    }
    shared.count(Op::Settle);
    let answer = if hits.is_empty() {
        client.query(&stmt, &params).await
    } else {
        settle_with_hits(&mut client, &stmt, &params, hits).await
    };
    let inserted = if fresh {
        rows.iter().map(|(s, _)| s.generation.id.clone()).collect()
    } else {
        HashSet::with_capacity(rows.len())
    };
    let rows = match answer {
        Ok(rows) => rows,
        Err(e) if fresh && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            // One of them was settled before: nothing was committed.
            return Ok(None);
        }
        Err(e) => {
            // A data exception (22…) or a constraint (23…, e.g. a spending past
            // MAX_SPENT) is the rows' fault; anything else (unreachable, deadlock,
            // serialization, …) passes.
            let refused = e
                .code()
                .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"));
            let err = shared.error(e);
            return Err(if refused {
                Failure::Refused(err)
            } else {
                Failure::Retry(err)
            });
        }
    };
    shared.mark_up();
    let mut committed = Committed {
        inserted,
        leases: Vec::new(),
    };
    for r in rows {
        let kind: &str = r.get(0);
        let id: String = r.get(1);
        if kind == "i" {
            committed.inserted.insert(id);
        } else {
            let lease = Amounts {
                money: r.get::<_, Option<i64>>(2).unwrap_or(0),
                tokens: r.get::<_, Option<i64>>(3).unwrap_or(0),
            };
            committed
                .leases
                .push((id, lease, r.get::<_, Option<i64>>(4).unwrap_or(0)));
        }
    }
    Ok(Some(committed))
}

#[cfg(test)]
mod linger_tests {
    use super::*;

    #[test]
    fn a_quiet_writer_never_lingers() {
        let free = Instant::now();
        for last in 0..LINGER_FROM {
            assert_eq!(
                linger(last, 1, free, free),
                None,
                "last statement of {last}"
            );
        }
    }

    #[test]
    fn under_load_the_writer_waits_for_half_as_many_again_at_most_linger_after_it_was_free() {
        let free = Instant::now();
        assert_eq!(linger(20, 5, free, free), Some((free + LINGER, 30)));
        assert_eq!(
            linger(20, 29, free, free + LINGER / 2),
            Some((free + LINGER, 30))
        );
        // Enough are queued, or the time is up: it goes.
        assert_eq!(linger(20, 30, free, free), None);
        assert_eq!(linger(20, 5, free, free + LINGER), None);
        // Never more than a statement takes.
        assert_eq!(
            linger(MAX_BATCH, 1, free, free),
            Some((free + LINGER, MAX_BATCH))
        );
    }

    fn settlement() -> Item {
        Item::Settle(Queued {
            settlement: Box::new(super::super::tests::settlement(
                "key-1",
                "gen-1",
                crate::money::Money::ZERO,
                crate::money::Money::ZERO.into(),
                0,
            )),
            meta: Waiting {
                waiter: None,
                since: Instant::now(),
                counted: false,
                spilled: false,
            },
            record: None,
        })
    }

    #[test]
    fn a_flush_or_the_close_ends_the_linger() {
        let mut q = Queue::default();
        assert_eq!(queued(&q), Some(0));
        q.items.push_back(settlement());
        q.items.push_back(settlement());
        assert_eq!(queued(&q), Some(2));
        q.items.push_back(Item::Flush(None, Instant::now()));
        assert_eq!(queued(&q), None, "a flush waits");
        q.items.pop_back();
        q.closing = true;
        assert_eq!(queued(&q), None, "closing");
    }
}
