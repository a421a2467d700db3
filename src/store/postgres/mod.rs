//! The shared store: keys, ledger and generation stats in one PostgreSQL database,
//! for any number of gateways that behave as one (SPEC §6).
//!
//! `[store].url = "postgres://…"` (or `postgresql://…`) selects [`PgStore`]. Each
//! `switchboard serve` process opens it with an instance id of its own (random, made at
//! open); the schema is created or migrated at open, under an advisory lock, so
//! several instances may start at once.
//!
//! # Exact money across instances: escrow leases
//!
//! A PostgreSQL round trip per reservation and per settlement, all on a hot key's one
//! row, would cost more than the rest of a request. Instead each instance holds a
//! **lease** on each key it serves: a slice of the key's money (and of its
//! `tokens_per_day`) that it may admit requests against on its own, in memory, until
//! the lease expires. PostgreSQL keeps, for every key and at every commit,
//!
//! ```text
//! spent + Σ unexpired leases.amount ≤ cap = min(credits, limit_usd)
//! tokens_used(today) + Σ unexpired leases.tokens ≤ tokens_per_day   (when set)
//! ```
//!
//! and each instance admits only what its lease covers, so requests spread over any
//! number of instances can never together spend more than the key holds.
//!
//! - **Fast path (no round trip).** Per key, an instance keeps `in_use` (what the
//!   requests it admitted hold) and `limit` (what its lease is known to cover, until
//!   `valid_until`). `reserve` admits when `in_use + hold ≤ limit` and the lease is
//!   valid, under the key's mutex: the answer is ready at once.
//! - **Slow path (one round trip).** Otherwise `sb_lease` (a SQL function) sets this
//!   instance's lease to `need + headroom` in one statement, `need = in_use + hold`:
//!   under the key's row lock it drops expired leases, computes what is free for this
//!   instance (`cap − spent − the other instances' leases`) and grants nothing new when
//!   that is less than `need` (402, or 429 for tokens). The headroom is 256 × this hold
//!   but at most ⅛ of what is free beyond `need`: a hot key with a large balance asks
//!   about once per 256 requests, other instances are never starved, and a nearly
//!   exhausted key ends with leases ≈ exactly what is in use (then every admission is
//!   a round trip: exact, and slow only when the money is nearly gone). A refusal
//!   that the other instances' leases could lift sends them a notification
//!   (`sb_lease_pressure`): each gives back what it does not use, and the slow path
//!   asks again for about 0.6 s before refusing (for a second after that, refusals of
//!   the key are at once). So a request is refused only when `cap − spent − what
//!   other instances have in use` cannot hold it. Concurrent
//!   slow paths of one key in one instance take turns: the next one first checks
//!   whether the previous round trip made room.
//! - **Validity.** `t0` is taken before the lease statement is sent, and the lease is
//!   used until `t0 + ttl − ttl/5`: always before PostgreSQL's `expires_at` (its own
//!   clock, `now() + ttl` when the statement ran). A task renews every lease of the
//!   instance every `ttl / 3` in one statement, and gives back the leases of keys idle
//!   that long. A lease that was not renewed is not used again (the next admission
//!   asks).
//! - **Settlement (group commit).** `settle` queues the charge for the instance's
//!   one writer task, which commits everything queued (up to 512) in one statement
//!   (`sb_settle`): the rows (`ON CONFLICT (id) DO NOTHING`: a request id is never
//!   charged twice), their cost added to `spent` and their tokens to the day's count,
//!   and this instance's leases shrunk by the reservations they release, atomically.
//!   The charge is at most its reservation, which was within the lease, so `spent +
//!   leases` never grows. `settle` resolves after that commit (SPEC §4: before the
//!   last byte). If the commit fails, the batch is kept and retried with backoff
//!   until it commits (a waiting `settle` gets an error after 5 s; the charge stays
//!   queued).
//! - **What the instance believes of its leases** is a lower bound of what
//!   PostgreSQL holds. Every statement that changes a lease row returns its new
//!   amounts with a version (`sb_lease_versions`, taken under the key's row lock), so
//!   answers are applied in commit order whatever connection they came on; and the
//!   effects of statements still in flight that may shrink it (settlements, giving
//!   back) are applied to it in advance.
//! - **SIGKILL.** Settlements are committed rows; a dead instance's leases expire
//!   after `reservation_ttl_secs` and the money is free again for the others.
//! - **PostgreSQL down.** A failed round trip marks the store down, and a ping every
//!   second while it is down marks it up again. While it is down, admission answers
//!   503 `store_unavailable` at once, even on the fast path (nothing is served that
//!   might not be charged), and so do key lookups, balances and `/readyz`. The pool
//!   reconnects by itself. A request admitted before may still finish meanwhile: its
//!   content is delivered and its settlement cannot commit (the statement fails, or
//!   goes unanswered for a second: a network that drops packets). The writer then appends
//!   everything it holds to the instance's **spill file**,
//!   `[store].spill_dir/pending-<instance>.jsonl` (mode 0600, locked by the
//!   instance), and `fsync`s it before any waiting `settle` gets its error; the file
//!   is deleted once all of it has committed. If the process dies first (SIGKILL,
//!   OOM, a stop while PostgreSQL is still down), the next `PgStore::open` on that
//!   spill dir commits the files of instances that are gone (their lock is free) for
//!   this database (each line names it: `sb_ledger`), with a settlement that touches
//!   no lease, then deletes them; a torn last line (a crash mid-write) is skipped.
//!   Replays are idempotent (the request id is the key of the row): two instances
//!   replaying one file at once charge once. **Overshoot bound:** a charge replayed
//!   after its key's lease expired lands on top of what the other instances have
//!   leased since, so it may take the key past its cap by at most that request's
//!   reservation (a charge is never more than its reservation; several replayed
//!   charges of one key, by the sum of theirs). This is the one case, an outage
//!   longer than `reservation_ttl_secs` followed by a crash, where a cap can be
//!   exceeded: the charge is recorded rather than lost (`spent` may then exceed
//!   `credits`, and the key is refused until topped up).
//!
//! **Budgets per period** (`limit_reset`, SPEC §8.3): the cap of a key with one is
//! `min(credits − spent, limit_usd − what the current period spent)`, the period's
//! spending summed from what each key spent each UTC day (written by `sb_settle` in
//! the same transaction as the rows: the key row counts its latest day, `spent_day`
//! and `spent_today`, and the first settlement of a later day moves that day's total
//! into `sb_daily_spend`) under the key's row lock in `sb_lease`; so a period is one budget across instances, and a lease granted in an
//! earlier period is still within the cap in the next one (a new period only frees
//! money). The day, week and month come from the instance's [`Clock`] (`p_now` of
//! both functions, [`PgStore::set_clock`]); the leases' expiry stays on PostgreSQL's
//! clock. A charge replayed from a spill file counts in the day it is replayed.
//!
//! Key changes (create, update, top-up) send `NOTIFY sb_keys` in their transaction;
//! each instance `LISTEN`s on a connection of its own (reconnected when lost, after
//! which every key counts as changed) and passes them on through
//! [`KeyStore::changes`], which the gateway uses to empty its auth cache: a change
//! made anywhere counts everywhere within a second.
//!
//! Every statement sent is counted in `switchboard_store_round_trips_total{op}` (op =
//! `lease`, `settle`, `shrink`, `renew`, `key`, `balance`, `generation`, `top_up`,
//! `ping`, `migrate`, `prepare`, `release`), and per store in
//! [`PgStore::round_trips`].
//!
//! # Threads
//! [`KeyStore`] and most [`Ledger`] methods are synchronous (auth calls them from
//! `spawn_blocking`, the `keys` CLI with no runtime at all). A `PgStore` owns a small
//! tokio runtime (2 workers) that owns the pool and the background tasks; the
//! synchronous methods run their work there and wait for it with a plain blocking wait
//! bounded by 5 s (then `store_unavailable`). Never call them from that runtime
//! ([`PgStore::runtime`]) itself.
//!
//! # Example
//! ```no_run
//! use switchboard::config::StoreConfig;
//! use switchboard::store::{hash_secret, KeyStore, Ledger, NewKey, PgStore};
//!
//! let store = PgStore::open(&StoreConfig {
//!     url: "postgres://switchboard@127.0.0.1:5432/switchboard".into(),
//!     ..Default::default()
//! })
//! .unwrap();
//! let key = store.create(hash_secret("sk-alice-0123456789abcdef"), NewKey::new("alice", "5".parse().unwrap())).unwrap();
//! assert_eq!(store.balance(&key.record.id).unwrap().credits.to_string(), "5");
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio_postgres::NoTls;

use super::{
    Admission, Balance, Generation, IdempotencyLock, IdempotencyRecord, KeyChange, KeyPatch,
    KeyStore, Ledger, NewKey, PeriodUsage, Reservation, SecretHash, Settlement, StoreError,
    StoredKey,
};
use crate::clock::Clock;
use crate::config::{KeyConfig, StoreConfig};
use crate::keys::KeyRecord;
use crate::money::Money;

mod escrow;
mod idempotency;
mod keys;
mod listen;
mod schema;
mod spill;
mod writer;

#[cfg(test)]
mod period_tests;
#[cfg(test)]
mod tests;

/// The counter of statements sent to PostgreSQL, by `op`.
pub const ROUND_TRIPS: &str = "switchboard_store_round_trips_total";

/// How long a synchronous call, an admission or a settlement waits for PostgreSQL.
const WAIT: Duration = Duration::from_secs(5);
/// How long opening may wait for the schema to be created or checked: every
/// statement of a migration, behind the advisory lock another instance starting at
/// the same time may hold (seconds on a busy server, not milliseconds).
const OPEN_WAIT: Duration = Duration::from_secs(60);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What a statement was for (the `op` label of [`ROUND_TRIPS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Op {
    Lease,
    Settle,
    Shrink,
    Renew,
    Key,
    Balance,
    Generation,
    TopUp,
    Ping,
    Migrate,
    Prepare,
    Release,
    Idempotency,
}

impl Op {
    const ALL: [Op; 13] = [
        Op::Lease,
        Op::Settle,
        Op::Shrink,
        Op::Renew,
        Op::Key,
        Op::Balance,
        Op::Generation,
        Op::TopUp,
        Op::Ping,
        Op::Migrate,
        Op::Prepare,
        Op::Release,
        Op::Idempotency,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Lease => "lease",
            Op::Settle => "settle",
            Op::Shrink => "shrink",
            Op::Renew => "renew",
            Op::Key => "key",
            Op::Balance => "balance",
            Op::Generation => "generation",
            Op::TopUp => "top_up",
            Op::Ping => "ping",
            Op::Migrate => "migrate",
            Op::Prepare => "prepare",
            Op::Release => "release",
            Op::Idempotency => "idempotency",
        }
    }
}

/// What the runtime's tasks share.
pub(crate) struct Shared {
    pool: Pool,
    /// Where the server is, for messages (never the password).
    server: String,
    pg_config: tokio_postgres::Config,
    instance: String,
    ttl: Duration,
    handle: tokio::runtime::Handle,
    up: AtomicBool,
    pinging: AtomicBool,
    closing: AtomicBool,
    accounts: escrow::Accounts,
    writer: writer::Writer,
    spill: spill::Spill,
    changes: tokio::sync::broadcast::Sender<KeyChange>,
    listening: AtomicBool,
    round_trips: [AtomicU64; Op::ALL.len()],
    /// The idempotency locks' connection.
    locks: idempotency::Locks,
    /// The clock of the day, week and month (`tokens_per_day`, `limit_reset`).
    clock: parking_lot::RwLock<Clock>,
}

/// Keys and ledger in PostgreSQL, shared by any number of gateways; see the
/// [module docs](self) for how money stays exact across them.
pub struct PgStore {
    shared: Arc<Shared>,
    /// The store's own runtime (taken on drop).
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("server", &self.shared.server)
            .field("instance", &self.shared.instance)
            .finish_non_exhaustive()
    }
}

/// `host:port/database` of a config, for messages.
fn describe_server(c: &tokio_postgres::Config) -> String {
    let host = c
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", c.get_dbname().unwrap_or(""))
}

/// Whether a driver error means the server cannot be reached (as opposed to a
/// statement it refused).
fn unreachable(e: &tokio_postgres::Error) -> bool {
    if let Some(code) = e.code() {
        let c = code.code();
        // Connection exceptions, shutdown, cannot connect now, too many connections.
        return c.starts_with("08") || c.starts_with("57P") || c.starts_with("53");
    }
    let text = e.to_string();
    [
        "error communicating",
        "connection closed",
        "error connecting",
        "timeout waiting",
        "error performing TLS",
        "authentication error",
    ]
    .iter()
    .any(|p| text.starts_with(p))
}

/// A driver error with its cause (the server's message, or the OS error).
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_string(),
        };
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

impl Shared {
    /// Unix seconds now, by the store's clock.
    fn now(&self) -> u64 {
        self.clock.read().now()
    }

    /// Counts one statement sent.
    fn count(&self, op: Op) {
        self.round_trips[op as usize].fetch_add(1, Ordering::Relaxed);
        crate::telemetry::counter(ROUND_TRIPS, &[("op", op.name())]).increment(1);
    }

    /// Whether PostgreSQL answered last time it was asked.
    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// PostgreSQL answered.
    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!("PostgreSQL at {} answers again", self.server);
        }
    }

    /// PostgreSQL did not answer: refuse what needs it until a ping succeeds.
    fn mark_down(self: &Arc<Self>, why: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "PostgreSQL at {} is unreachable ({why}); chat requests get 503 store_unavailable until it answers",
                self.server
            );
        }
        if !self.pinging.swap(true, Ordering::Relaxed) && !self.closing.load(Ordering::Relaxed) {
            let shared = self.clone();
            self.handle.spawn(async move {
                let mut wait = Duration::from_millis(200);
                loop {
                    tokio::time::sleep(wait).await;
                    wait = Duration::from_secs(1);
                    if shared.closing.load(Ordering::Relaxed) || shared.ping().await.is_ok() {
                        break;
                    }
                }
                shared.pinging.store(false, Ordering::Relaxed);
            });
        }
    }

    /// The error of a failed statement; an unreachable server marks the store down.
    fn error(self: &Arc<Self>, e: tokio_postgres::Error) -> StoreError {
        let text = describe(&e);
        if unreachable(&e) {
            self.mark_down(&text);
            StoreError::unavailable(format!("PostgreSQL at {}: {text}", self.server))
        } else {
            StoreError(format!("PostgreSQL at {}: {text}", self.server))
        }
    }

    /// A pooled connection.
    async fn client(self: &Arc<Self>) -> Result<deadpool_postgres::Client, StoreError> {
        match self.pool.get().await {
            Ok(c) => Ok(c),
            Err(deadpool_postgres::PoolError::Backend(e)) => Err(self.error(e)),
            Err(e) => {
                let text = e.to_string();
                self.mark_down(&text);
                Err(StoreError::unavailable(format!(
                    "PostgreSQL at {}: {text}",
                    self.server
                )))
            }
        }
    }

    /// A prepared statement of `client` (a round trip the first time on a connection).
    async fn prepare(
        self: &Arc<Self>,
        client: &deadpool_postgres::Client,
        sql: &str,
    ) -> Result<tokio_postgres::Statement, StoreError> {
        let before = client.statement_cache.size();
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.error(e))?;
        if client.statement_cache.size() != before {
            self.count(Op::Prepare);
        }
        Ok(stmt)
    }

    /// `SELECT 1`.
    async fn ping(self: &Arc<Self>) -> Result<(), StoreError> {
        let client = self.client().await?;
        self.count(Op::Ping);
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| self.error(e))?;
        self.mark_up();
        Ok(())
    }

    /// Runs `work` on the store's runtime and waits for it here (a plain blocking
    /// wait, bounded by [`WAIT`]).
    fn block<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.block_within(WAIT, work)
    }

    /// [`block`](Self::block), bounded by `wait`.
    fn block_within<T: Send + 'static>(
        self: &Arc<Self>,
        wait: Duration,
        work: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let server = self.server.clone();
        self.handle.spawn(async move {
            let r = tokio::time::timeout(wait, work).await.unwrap_or_else(|_| {
                Err(StoreError::unavailable(format!(
                    "PostgreSQL at {server} did not answer within {} s",
                    wait.as_secs()
                )))
            });
            let _ = tx.send(r);
        });
        rx.recv_timeout(wait + Duration::from_secs(1))
            .unwrap_or_else(|_| {
                Err(StoreError::unavailable(format!(
                    "PostgreSQL at {} did not answer within {} s",
                    self.server,
                    wait.as_secs()
                )))
            })
    }
}

impl PgStore {
    /// Connects to the database `config.url` names (creating or migrating its schema)
    /// and starts the instance's tasks: the settlement writer, lease renewal, and the
    /// key-change listener. An unreachable server is a
    /// [`store_unavailable`](StoreError::unavailable) error within a few seconds.
    pub fn open(config: &StoreConfig) -> Result<Arc<PgStore>, StoreError> {
        let mut pg_config: tokio_postgres::Config = config.url.parse().map_err(|e| {
            StoreError(format!(
                "store.url is not a PostgreSQL URL like postgres://USER@HOST:PORT/DATABASE: {e}"
            ))
        })?;
        pg_config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("switchboard");
        }
        let server = describe_server(&pg_config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("switchboard-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError(format!("cannot start the store's runtime: {e}")))?;
        let manager = Manager::from_config(
            pg_config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1) as usize)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError(format!("cannot make the PostgreSQL pool: {e}")))?;
        let instance = {
            use rand::distr::{Alphanumeric, SampleString};
            format!("i-{}", Alphanumeric.sample_string(&mut rand::rng(), 16))
        };
        let spill_dir = std::path::PathBuf::from(&config.spill_dir);
        spill::create_dir(&spill_dir)?;
        let spill = spill::Spill::new(&spill_dir, &instance);
        let shared = Arc::new(Shared {
            pool,
            server: server.clone(),
            pg_config,
            instance,
            ttl: Duration::from_secs(config.reservation_ttl_secs.clamp(1, 3600)),
            handle: runtime.handle().clone(),
            up: AtomicBool::new(true),
            pinging: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            accounts: Default::default(),
            writer: Default::default(),
            spill,
            changes: tokio::sync::broadcast::channel(1024).0,
            listening: AtomicBool::new(false),
            round_trips: Default::default(),
            locks: Default::default(),
            clock: Default::default(),
        });
        metrics::describe_counter!(
            ROUND_TRIPS,
            "Statements sent to PostgreSQL, by what they were for"
        );
        let store = PgStore {
            shared: shared.clone(),
            runtime: Some(runtime),
        };
        let s = shared.clone();
        let migrated = shared.block_within(OPEN_WAIT, async move {
            s.migrate().await?;
            spill::ledger_id(&s).await
        });
        // Charges that dead instances kept on this disk, before anything else.
        let replayed = migrated.and_then(|ledger| {
            shared.spill.set_ledger(ledger);
            spill::replay(&shared, &spill_dir)
        });
        if let Err(e) = replayed {
            // Nothing was started yet (no settlement can be queued): the drop of
            // `store` only stops its runtime.
            store.shared.closing.store(true, Ordering::Relaxed);
            let why = e.0.strip_prefix(super::UNAVAILABLE).unwrap_or(&e.0);
            let message = format!(
                "cannot open the store: {why}; check [store].url and that PostgreSQL is running and reachable (serve needs it at start to create or check the schema)"
            );
            return Err(if e.is_unavailable() {
                StoreError::unavailable(message)
            } else {
                StoreError(message)
            });
        }
        tracing::info!(
            "store: PostgreSQL at {server}, this instance is {}",
            shared.instance
        );
        if let Ok(n @ 1..) = replayed {
            tracing::warn!(
                "store: {n} charge(s) that stopped instances could not commit were replayed from {}",
                spill_dir.display()
            );
        }
        let handle = shared.handle.clone();
        handle.spawn(writer::run(shared.clone()));
        handle.spawn(escrow::renew_forever(shared.clone()));
        handle.spawn(idempotency::purge_forever(shared.clone()));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        handle.spawn(listen::run(shared.clone(), ready_tx));
        // Key changes made by others count from the moment `open` returns.
        if ready_rx.recv_timeout(WAIT).is_err() {
            tracing::warn!(
                "PostgreSQL at {server}: not listening for key changes yet (retrying); keys changed elsewhere count here within {} s meanwhile",
                crate::auth::DEFAULT_TTL.as_secs()
            );
        }
        Ok(Arc::new(store))
    }

    /// Sets the clock of its day accounting: `tokens_per_day`, the periods of
    /// `limit_reset`, the day a settlement counts in (default: the system clock).
    /// Each instance passes its own clock's time to PostgreSQL with every lease and
    /// settlement. For tests that cross midnight without waiting for it.
    pub fn set_clock(&self, clock: Clock) {
        *self.shared.clock.write() = clock;
    }

    /// This instance's id (its leases carry it).
    pub fn instance(&self) -> &str {
        &self.shared.instance
    }

    /// The connection pool (tokio-postgres clients), for other tables in the same
    /// database (e.g. a request log). Its connections run on [`PgStore::runtime`]:
    /// use it from there (`runtime().spawn(…)`).
    pub fn pool(&self) -> &Pool {
        &self.shared.pool
    }

    /// The store's own runtime, where the pool's connections and the store's tasks
    /// run. Spawn work that uses [`PgStore::pool`] on it; never block on the store's
    /// synchronous methods from it.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.shared.handle
    }

    /// Whether PostgreSQL answered the last time it was asked (admission refuses with
    /// 503 while it does not).
    pub fn is_up(&self) -> bool {
        self.shared.is_up()
    }

    /// Statements sent to PostgreSQL by this store for `op` (`lease`, `settle`,
    /// `shrink`, `renew`, `key`, `balance`, `generation`, `top_up`, `ping`,
    /// `migrate`, `prepare`, `release`), or for all of them with `None`.
    pub fn round_trips(&self, op: Option<&str>) -> u64 {
        Op::ALL
            .iter()
            .filter(|o| op.is_none_or(|n| n == o.name()))
            .map(|o| self.shared.round_trips[*o as usize].load(Ordering::Relaxed))
            .sum()
    }

    /// Upserts the bootstrap `[[keys]]` of a config, like
    /// [`SqliteStore::bootstrap`](super::SqliteStore::bootstrap): a new secret is
    /// created with its credits; a known one keeps what it has and has spent and
    /// takes the config's name, limit, rpm, tokens per day and models. Safe when
    /// several instances do it at once.
    pub fn bootstrap(&self, keys: &[KeyConfig]) -> Result<(), StoreError> {
        let s = self.shared.clone();
        let keys = keys.to_vec();
        self.shared.block(async move { s.bootstrap(&keys).await })
    }

    /// For tests: stops like a killed process (nothing flushed, no lease given back,
    /// the spill file let go of as it is).
    #[cfg(test)]
    fn crash(self: Arc<Self>) {
        let mut store = Arc::into_inner(self).expect("the only handle");
        store.shared.closing.store(true, Ordering::Relaxed);
        store.shared.spill.close();
        if let Some(rt) = store.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        // What is queued is committed first (bounded: PostgreSQL may be down), then
        // this instance's leases are given back so other instances need not wait for
        // them to expire.
        let shared = &self.shared;
        if !shared.closing.swap(true, Ordering::Relaxed) {
            let left = shared.writer.close_and_wait(Duration::from_secs(10));
            if left > 0 {
                let lost = shared.writer.spill_rest(shared);
                if lost > 0 {
                    tracing::error!(
                        "{left} settlement(s) could not be committed to PostgreSQL at {} before the store closed: {lost} of those charges are lost",
                        shared.server
                    );
                }
                let kept = shared.spill.pending();
                if kept > 0 {
                    tracing::warn!(
                    "{kept} settlement(s) could not be committed to PostgreSQL at {} before the store closed: they are kept in {} and committed by the next store opened with this spill_dir",
                    shared.server,
                    shared.spill.path().display()
                );
                }
            } else {
                let s = shared.clone();
                let _ = shared.block(async move { s.release_all().await });
            }
        }
        shared.spill.close();
        runtime.shutdown_background();
    }
}

impl KeyStore for PgStore {
    fn find(&self, hash: &SecretHash) -> Result<Option<KeyRecord>, StoreError> {
        let (s, hash) = (self.shared.clone(), *hash);
        self.shared.block(async move { s.find(hash).await })
    }

    fn get(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        let (s, id) = (self.shared.clone(), id.to_string());
        self.shared.block(async move { s.get(&id).await })
    }

    fn list(&self) -> Result<Vec<StoredKey>, StoreError> {
        let s = self.shared.clone();
        self.shared.block(async move { s.list().await })
    }

    fn create(&self, hash: SecretHash, new: NewKey) -> Result<StoredKey, StoreError> {
        let s = self.shared.clone();
        self.shared.block(async move { s.create(hash, new).await })
    }

    fn update(&self, id: &str, patch: &KeyPatch) -> Result<Option<StoredKey>, StoreError> {
        let (s, id, patch) = (self.shared.clone(), id.to_string(), patch.clone());
        self.shared
            .block(async move { s.update(&id, &patch).await })
    }

    fn ping(&self) -> Result<(), StoreError> {
        let s = self.shared.clone();
        self.shared.block(async move { s.ping().await })
    }

    fn rotate(
        &self,
        id: &str,
        hash: SecretHash,
        grace_until: Option<u64>,
    ) -> Result<Option<StoredKey>, StoreError> {
        let (s, id) = (self.shared.clone(), id.to_string());
        self.shared
            .block(async move { s.rotate(&id, hash, grace_until).await })
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<KeyChange>> {
        Some(self.shared.changes.subscribe())
    }
}

impl Ledger for PgStore {
    fn reserve(&self, key: &KeyRecord, hold: Reservation) -> Admission {
        self.shared.reserve(key, hold)
    }

    fn release(&self, key_id: &str, hold: Reservation) {
        self.shared.release(key_id, hold);
    }

    fn settle(&self, s: Settlement) -> BoxFuture<'static, Result<bool, StoreError>> {
        let rx = self.shared.writer.settle(&self.shared, s, true);
        async move {
            match rx {
                Some(rx) => rx.await.unwrap_or_else(|_| {
                    Err(StoreError::unavailable(
                        "the store closed before this charge was committed",
                    ))
                }),
                None => Err(StoreError("the settlement writer is gone".into())),
            }
        }
        .boxed()
    }

    fn settle_detached(&self, s: Settlement) {
        let _ = self.shared.writer.settle(&self.shared, s, false);
    }

    /// Resolves when everything queued before it is committed, or after 30 s
    /// while PostgreSQL does not answer (what is queued stays queued).
    fn flush(&self) -> BoxFuture<'static, ()> {
        let rx = self.shared.writer.flush();
        async move {
            let _ = rx.await;
        }
        .boxed()
    }

    /// `reserved` is what this instance's requests in flight hold plus the leases of
    /// the other instances (what they have in use is not known here: it is at most
    /// that); `reserved_tokens` likewise.
    fn balance(&self, key_id: &str) -> Result<Balance, StoreError> {
        let (s, id) = (self.shared.clone(), key_id.to_string());
        self.shared.block(async move { s.balance(&id).await })
    }

    fn tokens_today(&self, key_id: &str) -> Result<u64, StoreError> {
        let (s, id) = (self.shared.clone(), key_id.to_string());
        self.shared.block(async move { s.tokens_today(&id).await })
    }

    /// Refuses (with nothing written) a top-up that is not more than 0 or that would
    /// take the key's credits past [`MAX_CREDITS`](crate::money::MAX_CREDITS),
    /// checked in the transaction that writes it.
    fn top_up(&self, key_id: &str, amount: Money) -> Result<Option<Balance>, StoreError> {
        let (s, id) = (self.shared.clone(), key_id.to_string());
        self.shared
            .block(async move { s.top_up(&id, amount).await })
    }

    fn generation(&self, id: &str) -> Result<Option<Generation>, StoreError> {
        let (s, id) = (self.shared.clone(), id.to_string());
        self.shared.block(async move { s.generation(&id).await })
    }

    fn keeps_idempotency_records(&self) -> bool {
        true
    }

    fn settle_recorded(
        &self,
        s: Settlement,
        mut record: IdempotencyRecord,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        record.key_id.clone_from(&s.key_id);
        let rx = self
            .shared
            .writer
            .settle_recorded(&self.shared, s, Some(Box::new(record)), true);
        async move {
            match rx {
                Some(rx) => rx.await.unwrap_or_else(|_| {
                    Err(StoreError::unavailable(
                        "the store closed before this charge was committed",
                    ))
                }),
                None => Err(StoreError("the settlement writer is gone".into())),
            }
        }
        .boxed()
    }

    /// A `SELECT` on the store's runtime (bounded like every call by 5 s).
    fn idempotency_record(
        &self,
        key_id: &str,
        idem_key: &str,
        now: u64,
    ) -> BoxFuture<'static, Result<Option<IdempotencyRecord>, StoreError>> {
        let (s, key_id, idem_key) = (
            self.shared.clone(),
            key_id.to_string(),
            idem_key.to_string(),
        );
        self.shared
            .on_runtime(async move { s.idempotency_record(&key_id, &idem_key, now).await })
    }

    /// `pg_try_advisory_lock` on the instance's lock connection (see the
    /// `idempotency` module).
    fn idempotency_lock(
        &self,
        key_id: &str,
        idem_key: &str,
    ) -> BoxFuture<'static, Result<Option<IdempotencyLock>, StoreError>> {
        let (s, key_id, idem_key) = (
            self.shared.clone(),
            key_id.to_string(),
            idem_key.to_string(),
        );
        self.shared
            .on_runtime(async move { s.idempotency_lock(&key_id, &idem_key).await })
    }

    fn purge_idempotency(&self, now: u64) -> BoxFuture<'static, Result<u64, StoreError>> {
        let s = self.shared.clone();
        self.shared
            .on_runtime(async move { s.purge_idempotency(now).await })
    }

    /// What is committed in PostgreSQL (by any instance) in the current periods.
    fn usage(&self, key_id: &str) -> Result<PeriodUsage, StoreError> {
        let (s, id) = (self.shared.clone(), key_id.to_string());
        self.shared.block(async move { s.usage(&id).await })
    }
}

impl Shared {
    /// Runs `work` on the store's runtime (where the pool's connections live), for a
    /// caller on any runtime; bounded by [`WAIT`].
    fn on_runtime<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let server = self.server.clone();
        let task = self.handle.spawn(async move {
            tokio::time::timeout(WAIT, work).await.unwrap_or_else(|_| {
                Err(StoreError::unavailable(format!(
                    "PostgreSQL at {server} did not answer within {} s",
                    WAIT.as_secs()
                )))
            })
        });
        async move {
            task.await
                .unwrap_or_else(|e| Err(StoreError(format!("a store task failed: {e}"))))
        }
        .boxed()
    }
}

/// Per key id: what a batch of settlements or a shrink touches.
type PerKey<T> = HashMap<String, T, foldhash::fast::RandomState>;
