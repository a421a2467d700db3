//! Admission against leases: the per-key accounts, the fast path, the slow path
//! (`sb_lease`), giving leases back (`sb_shrink`), and their renewal. See the
//! [module docs](super) for the design.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{Either, FutureExt};
use parking_lot::{Mutex, RwLock};

use super::{Op, PerKey, Shared};
use crate::error::GatewayError;
use crate::keys::KeyRecord;
use crate::money::{Money, MAX_CREDITS, MAX_TOKENS_PER_DAY};
use crate::store::{admitted, Admission, Reservation, StoreError};

/// Money (pico-USD) and tokens, as PostgreSQL's `BIGINT`s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Amounts {
    pub money: i64,
    pub tokens: i64,
}

impl Amounts {
    /// A reservation's amounts (tokens past `i64::MAX` are `i64::MAX`: no key holds
    /// that many).
    pub fn of(r: Reservation) -> Amounts {
        Amounts {
            money: r.amount.pico(),
            tokens: i64::try_from(r.tokens).unwrap_or(i64::MAX),
        }
    }

    fn plus(self, o: Amounts) -> Amounts {
        Amounts {
            money: self.money.saturating_add(o.money),
            tokens: self.tokens.saturating_add(o.tokens),
        }
    }

    /// `self − o`, never below 0.
    fn minus(self, o: Amounts) -> Amounts {
        Amounts {
            money: self.money.saturating_sub(o.money).max(0),
            tokens: self.tokens.saturating_sub(o.tokens).max(0),
        }
    }

    fn min(self, o: Amounts) -> Amounts {
        Amounts {
            money: self.money.min(o.money),
            tokens: self.tokens.min(o.tokens),
        }
    }

    fn is_zero(self) -> bool {
        self.money == 0 && self.tokens == 0
    }
}

/// What a statement in flight may do to this instance's lease of a key, applied in
/// advance to what admission may use (a lower bound of its effect).
#[derive(Debug, Clone, Copy)]
pub(super) enum Effect {
    /// A settlement batch: the lease shrinks by at most these reservations.
    Sub(Amounts),
    /// Giving back: the lease becomes at most this.
    Min(Amounts),
}

/// One key's escrow in this instance.
#[derive(Debug)]
pub(super) struct Account {
    /// The lease as PostgreSQL last reported it (the answer of highest version).
    pg: Amounts,
    pg_ver: i64,
    /// Statements in flight that may shrink the lease, by statement id.
    pending: Vec<(u64, Effect)>,
    /// `pg` with `pending` applied: what admission may hold in all.
    limit: Amounts,
    /// Held by this instance's requests in flight (settlements not committed yet
    /// included).
    in_use: Amounts,
    /// The part of `in_use` whose settlements are queued or being committed.
    settling: Amounts,
    /// The lease is used until then (before PostgreSQL's `expires_at`).
    valid_until: Option<Instant>,
    /// The last admission.
    last_used: Instant,
    /// Until then, a refusal does not wait for other instances to give back (they
    /// were just asked, and did not give enough).
    pressed_until: Option<Instant>,
    /// Lease round trips started for this key (the number of the last one).
    lease_calls: u64,
    /// The last refusal of the slow path, shared with the callers it covers.
    refused: Option<Refused>,
}

/// A refusal PostgreSQL answered to a lease round trip, kept for the callers that
/// arrived before that round trip started (see [`Account::covered`]).
#[derive(Debug, Clone)]
struct Refused {
    /// The number of the round trip ([`Account::lease_calls`]).
    call: u64,
    /// What it asked for (what this instance's requests held, plus the hold asked).
    need: Amounts,
    row: LeaseRow,
}

impl Account {
    fn new() -> Account {
        Account {
            pg: Amounts::default(),
            pg_ver: 0,
            pending: Vec::new(),
            limit: Amounts::default(),
            in_use: Amounts::default(),
            settling: Amounts::default(),
            valid_until: None,
            last_used: Instant::now(),
            pressed_until: None,
            lease_calls: 0,
            refused: None,
        }
    }

    /// The refusal that answers a caller whose fast path failed when `arrived` lease
    /// round trips had started, and who needs `need`: one that PostgreSQL answered to
    /// a round trip started after the caller arrived, for a need no larger than its
    /// own in money and in tokens. The caller is refused as of that answer, which
    /// fell within its own wait (so it is as exact as a round trip of its own);
    /// `sb_lease` refuses a larger need whenever it refuses a smaller one. Under a
    /// flood of requests on a spent key, each round trip answers every caller queued
    /// behind it instead of one (a PostgreSQL statement per refused request before).
    fn covered(&self, arrived: u64, need: Amounts) -> Option<&LeaseRow> {
        self.refused
            .as_ref()
            .filter(|r| {
                r.call > arrived && need.money >= r.need.money && need.tokens >= r.need.tokens
            })
            .map(|r| &r.row)
    }

    /// Whether `hold` fits in the lease now (tokens only when the key has a daily
    /// token limit).
    fn fits(&self, now: Instant, hold: Amounts, tokens_limited: bool) -> bool {
        let want = self.in_use.plus(hold);
        self.valid_until.is_some_and(|v| now < v)
            && want.money <= self.limit.money
            && (!tokens_limited || want.tokens <= self.limit.tokens)
    }

    /// Takes `hold` when it fits.
    fn try_take(&mut self, hold: Amounts, tokens_limited: bool) -> bool {
        let now = Instant::now();
        if !self.fits(now, hold, tokens_limited) {
            return false;
        }
        self.in_use = self.in_use.plus(hold);
        self.last_used = now;
        true
    }

    fn recompute(&mut self) {
        self.limit = self.pending.iter().fold(self.pg, |a, (_, e)| match e {
            Effect::Sub(r) => a.minus(*r),
            Effect::Min(t) => a.min(*t),
        });
    }

    /// PostgreSQL's answer about the lease, as of version `ver`.
    pub fn observe(&mut self, ver: i64, lease: Amounts) {
        if ver > self.pg_ver {
            self.pg_ver = ver;
            self.pg = lease;
            self.recompute();
        }
    }

    /// A statement that may shrink the lease is about to be sent.
    pub fn push(&mut self, id: u64, effect: Effect) {
        self.pending.push((id, effect));
        self.recompute();
    }

    /// That statement has been answered (or given up).
    pub fn settled_statement(&mut self, id: u64) {
        self.pending.retain(|(i, _)| *i != id);
        self.recompute();
    }

    /// Settlements of `reserved` were queued.
    pub fn queue_settling(&mut self, reserved: Amounts) {
        self.settling = self.settling.plus(reserved);
    }

    /// Settlements of `reserved` are committed (or refused): their holds end.
    pub fn end_settling(&mut self, reserved: Amounts) {
        self.settling = self.settling.minus(reserved);
        self.in_use = self.in_use.minus(reserved);
    }

    /// What admission may hold in all (a lower bound of the lease).
    #[cfg(test)]
    pub fn limit(&self) -> Amounts {
        self.limit
    }

    /// What this instance's requests in flight hold.
    pub fn in_use(&self) -> Amounts {
        self.in_use
    }

    fn has_pending_shrink(&self) -> bool {
        self.pending
            .iter()
            .any(|(_, e)| matches!(e, Effect::Min(_)))
    }
}

/// An account and its turn for the slow path.
#[derive(Debug)]
pub(super) struct Cell {
    pub state: Mutex<Account>,
    /// One lease round trip at a time per key; the next one re-checks first.
    pub(super) leasing: tokio::sync::Mutex<()>,
}

/// Accounts by key id.
pub(super) type Accounts = RwLock<HashMap<String, Arc<Cell>, foldhash::fast::RandomState>>;

/// Statement ids for [`Account::pending`].
static STATEMENTS: AtomicU64 = AtomicU64::new(1);

/// A fresh statement id.
pub(super) fn statement_id() -> u64 {
    STATEMENTS.fetch_add(1, Ordering::Relaxed)
}

/// A hold taken by the slow path for a caller that may have gone: given back on drop
/// unless [kept](Granted::keep).
struct Granted {
    cell: Option<Arc<Cell>>,
    hold: Amounts,
}

impl Granted {
    fn keep(mut self) {
        self.cell = None;
    }
}

impl Drop for Granted {
    fn drop(&mut self) {
        if let Some(cell) = self.cell.take() {
            let mut a = cell.state.lock();
            a.in_use = a.in_use.minus(self.hold);
        }
    }
}

/// One answer of `sb_lease`.
#[derive(Debug, Clone)]
pub(super) struct LeaseRow {
    pub ok: bool,
    pub pressure: bool,
    pub lease: Amounts,
    pub ver: i64,
    pub credits: i64,
    pub spent: i64,
    pub limit: Option<i64>,
    pub others: i64,
    pub tokens_per_day: Option<i64>,
    pub tokens_used: i64,
    pub others_tokens: i64,
    /// What `limit` is held against: the lifetime spending, or with `limit_reset`
    /// the spending of the current period.
    pub period_spent: i64,
    /// Unix seconds (the store's clock) when it was asked.
    pub now: u64,
}

/// How long the slow path waits, in turn, for other instances to give back what
/// they do not use after a refusal they could lift (about 0.6 s in all).
const PRESSURE_WAITS: [u64; 6] = [10, 20, 40, 80, 160, 320];

/// A lease asks for this many holds of the request that asks beyond what is in use
/// (`sb_lease` caps it at ⅛ of what is free): a hot key with a large balance makes a
/// lease round trip about once per this many admissions (32 before: at saturation
/// PostgreSQL round trips per request fell from ≈ 0.062 to ≈ 0.039 and its CPU per
/// request by ≈ 5 µs; BENCHMARKS.md, ninth session).
const HEADROOM_HOLDS: i64 = 256;

impl Shared {
    /// The account of `key_id`, made on first use.
    pub(super) fn account(&self, key_id: &str) -> Arc<Cell> {
        if let Some(c) = self.accounts.read().get(key_id) {
            return c.clone();
        }
        self.accounts
            .write()
            .entry(key_id.to_string())
            .or_insert_with(|| {
                Arc::new(Cell {
                    state: Mutex::new(Account::new()),
                    leasing: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// The account of `key_id`, if it has one.
    pub(super) fn existing(&self, key_id: &str) -> Option<Arc<Cell>> {
        self.accounts.read().get(key_id).cloned()
    }

    /// The lease's margin: it is used until `t0 + ttl − margin`.
    fn valid_for(&self) -> Duration {
        self.ttl - self.ttl / 5
    }

    fn unavailable(&self) -> GatewayError {
        StoreError::unavailable(format!("PostgreSQL at {} does not answer", self.server)).into()
    }

    /// [`Ledger::reserve`](crate::store::Ledger::reserve): in memory when the lease
    /// covers it, else a lease round trip on the store's runtime.
    pub(super) fn reserve(self: &Arc<Self>, key: &KeyRecord, hold: Reservation) -> Admission {
        if !self.is_up() {
            return admitted(Err(self.unavailable()));
        }
        let hold = Amounts::of(hold);
        let limited = key.tokens_per_day.is_some();
        let cell = self.account(&key.id);
        let arrived = {
            let mut a = cell.state.lock();
            if a.try_take(hold, limited) {
                return admitted(Ok(()));
            }
            a.lease_calls
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared = self.clone();
        let key = key.clone();
        self.handle.spawn(async move {
            let r =
                tokio::time::timeout(super::WAIT, shared.slow_reserve(&cell, &key, hold, arrived))
                    .await
                    .unwrap_or_else(|_| Err(shared.unavailable()));
            // A caller gone meanwhile drops the hold (`Granted`) with the message.
            let _ = tx.send(r);
        });
        let server = self.server.clone();
        Either::Right(
            async move {
                match rx.await {
                    Ok(Ok(granted)) => {
                        granted.keep();
                        Ok(())
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(StoreError::unavailable(format!(
                        "the store for PostgreSQL at {server} closed"
                    ))
                    .into()),
                }
            }
            .boxed(),
        )
    }

    /// The slow path: one lease round trip at a time per key, then the hold. `arrived`:
    /// the lease round trips started when the fast path failed.
    async fn slow_reserve(
        self: &Arc<Self>,
        cell: &Arc<Cell>,
        key: &KeyRecord,
        hold: Amounts,
        arrived: u64,
    ) -> Result<Granted, GatewayError> {
        let _turn = cell.leasing.lock().await;
        let limited = key.tokens_per_day.is_some();
        let granted = |cell: &Arc<Cell>| Granted {
            cell: Some(cell.clone()),
            hold,
        };
        let mut waits = PRESSURE_WAITS.iter();
        let mut flushed = false;
        for _ in 0..16 {
            // The previous turn's round trip may have made room.
            let (need, t0) = {
                let mut a = cell.state.lock();
                if a.try_take(hold, limited) {
                    return Ok(granted(cell));
                }
                (a.in_use.plus(hold), Instant::now())
            };
            if !self.is_up() {
                return Err(self.unavailable());
            }
            let headroom = Amounts {
                money: hold
                    .money
                    .saturating_mul(HEADROOM_HOLDS)
                    .min(MAX_CREDITS.pico()),
                tokens: if limited {
                    hold.tokens
                        .saturating_mul(HEADROOM_HOLDS)
                        .min(MAX_TOKENS_PER_DAY as i64)
                } else {
                    0
                },
            };
            let need = if limited {
                need
            } else {
                Amounts { tokens: 0, ..need }
            };
            let call = {
                let mut a = cell.state.lock();
                if let Some(row) = a.covered(arrived, need) {
                    return Err(refusal(key, row, a.in_use, hold));
                }
                a.lease_calls += 1;
                a.lease_calls
            };
            let Some(row) = self.lease(&key.id, need, headroom).await? else {
                return Err(GatewayError::Internal(format!(
                    "store: no key `{}` in the store",
                    key.id
                )));
            };
            let settling = {
                let mut a = cell.state.lock();
                a.observe(row.ver, row.lease);
                if row.ok {
                    let until = t0 + self.valid_for();
                    a.valid_until = Some(a.valid_until.map_or(until, |v| v.max(until)));
                }
                // The row's limit is current; the record may be a second behind it.
                if a.try_take(hold, limited && row.tokens_per_day.is_some()) {
                    return Ok(granted(cell));
                }
                !a.settling.is_zero()
            };
            // What this instance's own settlements hold until they commit counts in
            // `need`: let them commit, then ask again.
            if settling && !flushed {
                self.writer.flush().await.ok();
                flushed = true;
                continue;
            }
            if row.ok {
                // Granted, but the statements in flight of this instance may shrink
                // the lease below it: ask again once they are answered.
                tokio::task::yield_now().await;
                continue;
            }
            let pressed = cell
                .state
                .lock()
                .pressed_until
                .is_some_and(|t| Instant::now() < t);
            if row.pressure && !pressed {
                if let Some(ms) = waits.next() {
                    tokio::time::sleep(Duration::from_millis(*ms)).await;
                    continue;
                }
            }
            let mut a = cell.state.lock();
            if row.pressure && !pressed {
                // Asked and waited for: the next refusals for a while are at once
                // (they would wait in turn behind this key's slow path).
                a.pressed_until = Some(Instant::now() + Duration::from_secs(1));
            }
            let refused = refusal(key, &row, a.in_use, hold);
            a.refused = Some(Refused { call, need, row });
            return Err(refused);
        }
        Err(GatewayError::Internal(format!(
            "store: the lease of key `{}` kept changing; try again",
            key.id
        )))
    }

    /// `sb_lease`: sets this instance's lease on `key_id` to `need + headroom` (at most
    /// ⅛ of what is free past `need`), or refuses; `None` when there is no such key.
    async fn lease(
        self: &Arc<Self>,
        key_id: &str,
        need: Amounts,
        headroom: Amounts,
    ) -> Result<Option<LeaseRow>, StoreError> {
        let client = self.client().await?;
        let stmt = self
            .prepare(
                &client,
                "SELECT * FROM sb_lease($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .await?;
        let ttl_ms = self.ttl.as_millis() as i64;
        let now = i64::try_from(self.now()).unwrap_or(i64::MAX);
        let mut tries = 0;
        let row = loop {
            self.count(Op::Lease);
            let answer = client
                .query_opt(
                    &stmt,
                    &[
                        &key_id,
                        &self.instance,
                        &need.money,
                        &headroom.money,
                        &need.tokens,
                        &headroom.tokens,
                        &ttl_ms,
                        &now,
                    ],
                )
                .await;
            match answer {
                Ok(row) => break row,
                // Met another transaction (a deadlock PostgreSQL broke): again.
                Err(e)
                    if tries < 3
                        && e.code()
                            .is_some_and(|c| c.code() == "40P01" || c.code() == "40001") =>
                {
                    tries += 1;
                }
                Err(e) => return Err(self.error(e)),
            }
        };
        self.mark_up();
        let Some(r) = row else {
            return Ok(None);
        };
        let get = |i: usize| -> Result<i64, StoreError> {
            r.try_get::<_, i64>(i)
                .map_err(|e| StoreError(format!("sb_lease answered oddly: {e}")))
        };
        Ok(Some(LeaseRow {
            ok: r.get(0),
            pressure: r.get(1),
            lease: Amounts {
                money: get(2)?,
                tokens: get(3)?,
            },
            ver: get(4)?,
            credits: get(5)?,
            spent: get(6)?,
            limit: r.get(7),
            others: get(8)?,
            tokens_per_day: r.get(9),
            tokens_used: get(10)?,
            others_tokens: get(11)?,
            period_spent: get(12)?,
            now: self.now(),
        }))
    }

    /// [`Ledger::release`](crate::store::Ledger::release): in memory only (the lease
    /// shrinks with the next settlement batch or idle sweep).
    pub(super) fn release(&self, key_id: &str, hold: Reservation) {
        if let Some(cell) = self.existing(key_id) {
            let mut a = cell.state.lock();
            a.in_use = a.in_use.minus(Amounts::of(hold));
        }
    }

    /// Gives back what the leases of some keys hold beyond `targets` (one statement,
    /// `sb_shrink`).
    pub(super) async fn shrink(self: &Arc<Self>, targets: Vec<(String, Arc<Cell>, Amounts)>) {
        if targets.is_empty() {
            return;
        }
        let id = statement_id();
        for (_, cell, t) in &targets {
            cell.state.lock().push(id, Effect::Min(*t));
        }
        let answer = self.shrink_statement(&targets).await;
        let cells: PerKey<&Arc<Cell>> = targets.iter().map(|(k, c, _)| (k.clone(), c)).collect();
        if let Ok(rows) = &answer {
            for (key_id, lease, ver) in rows {
                if let Some(cell) = cells.get(key_id) {
                    cell.state.lock().observe(*ver, *lease);
                }
            }
        }
        for (_, cell, _) in &targets {
            let mut a = cell.state.lock();
            if answer.is_err() {
                // Not known to have happened: the lease stays what PostgreSQL said
                // last, and the lease is not used again before it is renewed.
                a.valid_until = None;
            }
            a.settled_statement(id);
        }
    }

    async fn shrink_statement(
        self: &Arc<Self>,
        targets: &[(String, Arc<Cell>, Amounts)],
    ) -> Result<Vec<(String, Amounts, i64)>, StoreError> {
        let keys: Vec<&str> = targets.iter().map(|(k, _, _)| k.as_str()).collect();
        let money: Vec<i64> = targets.iter().map(|(_, _, t)| t.money).collect();
        let tokens: Vec<i64> = targets.iter().map(|(_, _, t)| t.tokens).collect();
        let client = self.client().await?;
        let stmt = self
            .prepare(&client, "SELECT * FROM sb_shrink($1, $2, $3, $4)")
            .await?;
        self.count(Op::Shrink);
        let rows = client
            .query(&stmt, &[&self.instance, &keys, &money, &tokens])
            .await
            .map_err(|e| self.error(e))?;
        self.mark_up();
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    Amounts {
                        money: r.get(1),
                        tokens: r.get(2),
                    },
                    r.get::<_, i64>(3),
                )
            })
            .collect())
    }

    /// Another instance was refused what this one's lease of `key_id` could give:
    /// give back all of it that is not in use.
    pub(super) async fn on_pressure(self: &Arc<Self>, key_id: &str) {
        let Some(cell) = self.existing(key_id) else {
            return;
        };
        let target = {
            let a = cell.state.lock();
            let spare = a.limit.money > a.in_use.money || a.limit.tokens > a.in_use.tokens;
            if !spare || a.has_pending_shrink() {
                return;
            }
            a.in_use
        };
        self.shrink(vec![(key_id.to_string(), cell, target)]).await;
    }

    /// Renews every lease of this instance (one statement), then gives back the
    /// leases of keys idle since the last time.
    async fn renew_and_sweep(self: &Arc<Self>, idle: Duration) {
        let cells: Vec<(String, Arc<Cell>)> = self
            .accounts
            .read()
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        if cells.is_empty() {
            return;
        }
        let t0 = Instant::now();
        match self.renew_statement().await {
            Ok(renewed) => {
                let until = t0 + self.valid_for();
                for key_id in renewed {
                    if let Some(cell) = self.existing(&key_id) {
                        let mut a = cell.state.lock();
                        a.valid_until = Some(a.valid_until.map_or(until, |v| v.max(until)));
                    }
                }
            }
            Err(e) => {
                tracing::warn!("could not renew this instance's leases: {e}");
                return;
            }
        }
        let now = Instant::now();
        let idle: Vec<(String, Arc<Cell>, Amounts)> = cells
            .into_iter()
            .filter(|(_, cell)| {
                let a = cell.state.lock();
                a.in_use.is_zero()
                    && !a.pg.is_zero()
                    && !a.has_pending_shrink()
                    && now.duration_since(a.last_used) >= idle
            })
            .map(|(k, c)| (k, c, Amounts::default()))
            .collect();
        self.shrink(idle).await;
    }

    async fn renew_statement(self: &Arc<Self>) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let stmt = self
            .prepare(
                &client,
                "UPDATE sb_leases l SET expires_at = now() + $2::bigint * interval '1 millisecond'
                   FROM (SELECT key_id FROM sb_leases
                          WHERE instance = $1 AND expires_at > now()
                          ORDER BY key_id FOR UPDATE) s
                  WHERE l.instance = $1 AND l.key_id = s.key_id
                 RETURNING l.key_id",
            )
            .await?;
        self.count(Op::Renew);
        let ttl_ms = self.ttl.as_millis() as i64;
        let rows = client
            .query(&stmt, &[&self.instance, &ttl_ms])
            .await
            .map_err(|e| self.error(e))?;
        self.mark_up();
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Deletes every lease of this instance (when it closes).
    pub(super) async fn release_all(self: &Arc<Self>) -> Result<(), StoreError> {
        let client = self.client().await?;
        self.count(Op::Release);
        client
            .execute(
                "DELETE FROM sb_leases WHERE instance = $1",
                &[&self.instance],
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }
}

/// Renews the leases every `ttl / 3` and gives back those of keys idle that long.
pub(super) async fn renew_forever(shared: Arc<Shared>) {
    let period = shared.ttl / 3;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if shared.closing.load(Ordering::Relaxed) {
            return;
        }
        if shared.is_up() {
            shared.renew_and_sweep(period).await;
        }
    }
}

/// The 429 or 402 of a refused lease, worded as [`SqliteStore`](crate::store::SqliteStore)
/// words them, with what this instance and the others hold counted as in flight.
fn refusal(key: &KeyRecord, row: &LeaseRow, in_use: Amounts, hold: Amounts) -> GatewayError {
    let name = &key.name;
    if let Some(limit) = row.tokens_per_day {
        let held = in_use.tokens.saturating_add(row.others_tokens);
        if row
            .tokens_used
            .saturating_add(held)
            .saturating_add(hold.tokens)
            > limit
        {
            let message = if hold.tokens > limit {
                format!(
                    "key `{name}` may use {limit} tokens a day (UTC) and this request may use up to {} (prompt + max_tokens × n); lower max_tokens or n",
                    hold.tokens
                )
            } else {
                format!(
                    "key `{name}` has used {} of its {limit} tokens for today (UTC), {held} more are held by requests in flight, and this request may use up to {}; it resets at midnight UTC",
                    row.tokens_used, hold.tokens
                )
            };
            return GatewayError::RateLimited {
                message,
                retry_after: Some(Duration::from_secs(86_400 - row.now % 86_400)),
            };
        }
    }
    let amount = Money::from_pico(hold.money);
    let held = in_use.money.saturating_add(row.others);
    let available = Money::from_pico(row.credits.saturating_sub(row.spent).saturating_sub(held));
    if let Some(limit) = row.limit.filter(|_| amount <= available) {
        let left = Money::from_pico(limit.saturating_sub(row.period_spent).saturating_sub(held));
        if amount > left {
            return crate::store::limit_refusal(key, Money::from_pico(limit), left, amount);
        }
    }
    GatewayError::InsufficientCredits(format!(
        "key `{name}` has ${} of credit available (after requests in flight); this request may cost up to ${amount}. Add credits or lower max_tokens",
        available.max(Money::ZERO)
    ))
}
