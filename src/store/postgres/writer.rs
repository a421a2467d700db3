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
use crate::store::{Settlement, StoreError};

/// Settlements per statement at most.
const MAX_BATCH: usize = 512;

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

/// A queued settlement.
struct Queued {
    settlement: Box<Settlement>,
    meta: Waiting,
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
        }));
        drop(q);
        self.wake.notify_one();
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
    async fn spill(&self, shared: &Arc<Shared>, batch: &[Box<Settlement>], meta: &mut [Waiting]) {
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
                Item::Settle(s) => Some(&*s.settlement),
                Item::Flush(..) => None,
            });
            let from_batch = batch
                .iter()
                .zip(meta.iter())
                .filter(|(_, m)| !m.spilled)
                .map(|(s, _)| &**s);
            (shared.spill.lines(from_batch.chain(from_queue)), queued)
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
        let lines = shared.spill.lines(q.items.iter().filter_map(|i| match i {
            Item::Settle(s) if !s.meta.spilled => Some(&*s.settlement),
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

/// The writer task: takes what is queued, commits it, and again.
pub(super) async fn run(shared: Arc<Shared>) {
    loop {
        let notified = shared.writer.wake.notified();
        let Some(batch) = shared.writer.take() else {
            return;
        };
        if batch.is_empty() {
            notified.await;
            continue;
        }
        commit(&shared, batch).await;
        shared.writer.queue.lock().in_flight = 0;
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
    let (batch, mut waiters): (Vec<Box<Settlement>>, Vec<Waiting>) =
        batch.into_iter().map(|q| (q.settlement, q.meta)).unzip();
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
    let rows: Vec<&Settlement> = batch
        .iter()
        .zip(&first)
        .filter(|(_, f)| **f)
        .map(|(s, _)| &**s)
        .collect();
    let mut delay = Duration::from_millis(50);
    let mut failing = false;
    let outcome = loop {
        let attempt = statement(shared, &rows, Some(&shared.instance));
        tokio::pin!(attempt);
        let answer = loop {
            tokio::select! {
                answer = &mut attempt => break answer,
                // PostgreSQL is silent (a network that drops packets): the charges go
                // on disk meanwhile, before any waiter is told.
                () = tokio::time::sleep(SILENT) => {
                    shared.writer.spill(shared, &batch, &mut waiters).await;
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
                shared.writer.spill(shared, &batch, &mut waiters).await;
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
            for (settlement, meta) in batch.into_iter().zip(waiters) {
                let one = Queued { settlement, meta };
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

/// A count as PostgreSQL's `BIGINT` (past `i64::MAX`, `i64::MAX`).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

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
/// a replay).
pub(super) async fn statement(
    shared: &Arc<Shared>,
    rows: &[&Settlement],
    instance: Option<&str>,
) -> Result<Committed, Failure> {
    // Nothing but the rows themselves can make PostgreSQL refuse them for good.
    let mut client = shared.client().await.map_err(Failure::Retry)?;
    let stmt = shared
        .prepare(
            &client,
            "SELECT * FROM sb_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
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
    for s in rows {
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
    }
    shared.count(Op::Settle);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 17] = [
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
    ];
    let hits: Vec<&str> = rows
        .iter()
        .filter(|s| s.generation.cache_hit)
        .map(|s| s.generation.id.as_str())
        .collect();
    let answer = if hits.is_empty() {
        client.query(&stmt, &params).await
    } else {
        settle_with_hits(&mut client, &stmt, &params, &hits).await
    };
    let rows = match answer {
        Ok(rows) => rows,
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
        inserted: HashSet::with_capacity(rows.len()),
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
    Ok(committed)
}
