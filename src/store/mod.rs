//! Shared process state behind two small traits: [`KeyStore`] (who may call) and
//! [`Ledger`] (what they hold and what they spent), with the embedded SQLite default
//! [`SqliteStore`].
//!
//! Keys are stored as the SHA-256 of their secret ([`hash_secret`]); the secret itself
//! is shown once, at creation, and never stored. Balances live in the ledger: an
//! in-memory account per key (credits granted, spent, reserved) updated under the
//! key's own lock at admission and right after each durable commit — never a TTL
//! cache. Every settlement is one committed row keyed by the gateway's request id,
//! so settling twice charges once (SPEC §4).
//!
//! # Example
//! A [`KeyStore`] of your own (here a `HashMap`) is a handful of methods:
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use switchboard::keys::KeyRecord;
//! use switchboard::money::Money;
//! use switchboard::store::{hash_secret, KeyPatch, KeyStore, NewKey, SecretHash, StoreError, StoredKey};
//!
//! #[derive(Default)]
//! struct MapKeys(Mutex<HashMap<SecretHash, StoredKey>>);
//!
//! impl KeyStore for MapKeys {
//!     fn find(&self, hash: &SecretHash) -> Result<Option<KeyRecord>, StoreError> {
//!         Ok(self.0.lock().unwrap().get(hash).map(|k| k.record.clone()))
//!     }
//!     fn get(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
//!         Ok(self.0.lock().unwrap().values().find(|k| k.record.id == id).cloned())
//!     }
//!     fn list(&self) -> Result<Vec<StoredKey>, StoreError> {
//!         Ok(self.0.lock().unwrap().values().cloned().collect())
//!     }
//!     fn create(&self, hash: SecretHash, new: NewKey) -> Result<StoredKey, StoreError> {
//!         let key = StoredKey {
//!             record: KeyRecord { limit: new.limit, rpm: new.rpm, tokens_per_day: new.tokens_per_day,
//!                                 models: new.models, limit_reset: new.limit_reset, expires_at: new.expires_at,
//!                                 ..KeyRecord::new(format!("key_{}", hex::encode(&hash[..4])), new.name) },
//!             created: 0, credits: new.credits, spent: Money::ZERO,
//!         };
//!         self.0.lock().unwrap().insert(hash, key.clone());
//!         Ok(key)
//!     }
//!     fn update(&self, id: &str, patch: &KeyPatch) -> Result<Option<StoredKey>, StoreError> {
//!         let mut map = self.0.lock().unwrap();
//!         let Some(k) = map.values_mut().find(|k| k.record.id == id) else { return Ok(None) };
//!         patch.apply(&mut k.record);
//!         Ok(Some(k.clone()))
//!     }
//!     fn ping(&self) -> Result<(), StoreError> { Ok(()) }
//! }
//!
//! let keys = MapKeys::default();
//! let made = keys.create(hash_secret("sk-alice"), NewKey::new("alice", "5".parse().unwrap())).unwrap();
//! assert_eq!(keys.find(&hash_secret("sk-alice")).unwrap().unwrap().id, made.record.id);
//! assert!(keys.find(&hash_secret("sk-mallory")).unwrap().is_none());
//! ```
//!
//! The default store does both jobs:
//! ```
//! use switchboard::config::StoreConfig;
//! use switchboard::keys::KeyRecord;
//! use switchboard::money::Money;
//! use switchboard::store::{Ledger, KeyStore, NewKey, SqliteStore, hash_secret};
//!
//! let store = SqliteStore::open(&StoreConfig { url: "sqlite::memory:".into(), ..Default::default() }).unwrap();
//! let key = store.create(hash_secret("sk-bob"), NewKey::new("bob", "1".parse().unwrap())).unwrap();
//! let sixty_cents: Money = "0.6".parse().unwrap();
//! store.reserve(&key.record, sixty_cents.into()).unwrap();
//! // A second reserve of $0.60 does not fit in what is left of $1.
//! let err = store.reserve(&key.record, sixty_cents.into()).unwrap_err();
//! assert_eq!(err.code(), "insufficient_credits");
//! assert_eq!(store.balance(&key.record.id).unwrap().reserved.to_string(), "0.6");
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::{BoxFuture, Either, Ready};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::GatewayError;
use crate::keys::{KeyRecord, Labels, LimitReset};
use crate::money::Money;

pub(crate) mod idempotency;
pub mod postgres;
mod sqlite;

pub use idempotency::{IdempotencyLock, IdempotencyRecord};
pub use postgres::PgStore;
pub(crate) use sqlite::schema;
pub use sqlite::SqliteStore;

/// The SHA-256 of a key's secret: what the store keeps instead of the secret.
pub type SecretHash = [u8; 32];

/// Hashes a client secret.
pub fn hash_secret(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// A fresh key id: `key_` + 20 random alphanumerics.
pub fn new_key_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("key_{}", Alphanumeric.sample_string(&mut rand::rng(), 20))
}

/// A fresh client secret: `sk-sb-` + 40 random alphanumerics (≈ 238 bits).
pub fn new_secret() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("sk-sb-{}", Alphanumeric.sample_string(&mut rand::rng(), 40))
}

/// Unix seconds now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Today's UTC day number (days since 1970-01-01).
pub fn utc_day() -> u64 {
    now_unix() / 86_400
}

/// How long until the next UTC midnight, when `tokens_per_day` starts over.
pub fn until_utc_midnight() -> std::time::Duration {
    std::time::Duration::from_secs(86_400 - now_unix() % 86_400)
}

/// A key's credits after a top-up of `amount`, or why the top-up is refused: it must
/// be more than 0, and the credits after it at most
/// [`MAX_CREDITS`](crate::money::MAX_CREDITS). The admin API and the CLI check it
/// before writing; a [`Ledger`] checks it again in the transaction that writes it.
pub fn credits_after_top_up(credits: Money, amount: Money) -> Result<Money, String> {
    use crate::money::MAX_CREDITS;
    if amount <= Money::ZERO {
        return Err(format!("the amount must be more than 0 (got {amount})"));
    }
    match credits.checked_add(amount) {
        Some(after) if after <= MAX_CREDITS => Ok(after),
        _ => Err(format!(
            "credits would be more than {MAX_CREDITS} USD, the most a key can hold (it has {credits}; at most {} can be added)",
            MAX_CREDITS.saturating_sub(credits).max(Money::ZERO)
        )),
    }
}

/// Options that create a file readable by its owner only (mode 0600 on Unix): the
/// store, its journal and the request logs hold who spent what.
pub(crate) fn private_file_options() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
}

/// Creates the directory `dir` and those above it that are missing, readable by
/// their owner only (mode 0700 on Unix), like the files the store keeps in them.
pub(crate) fn create_private_dir_all(dir: &std::path::Path) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Creates the directory of a SQLite store (`[store].url = "sqlite://DIR/FILE"`) if it
/// is missing (mode 0700); nothing to do for other stores. The error names the setting
/// and what to do about it.
pub fn create_store_dir(config: &crate::config::StoreConfig) -> Result<(), StoreError> {
    let Some(path) = config.url.strip_prefix("sqlite://") else {
        return Ok(());
    };
    let Some(dir) = std::path::Path::new(path).parent() else {
        return Ok(());
    };
    create_private_dir_all(dir).map_err(|e| {
        StoreError(format!(
            "cannot create the directory `{}` of store.url `{}`: {e}; create it yourself, or set [store].url to a file in a directory this user can write",
            dir.display(),
            config.url
        ))
    })
}

/// Creates `path` empty, mode 0600, unless it exists: SQLite then opens it as it is,
/// and gives its `-wal` and `-shm` files the same mode.
pub(crate) fn create_private(path: &std::path::Path) -> std::io::Result<()> {
    match private_file_options()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        r => r.map(drop),
    }
}

/// A store failure (disk, corruption, a broken writer, a server that does not answer).
#[derive(Debug, Clone, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

/// How the message of an [unavailable](StoreError::unavailable) store error starts.
const UNAVAILABLE: &str = "unavailable: ";

impl StoreError {
    /// The store's server does not answer (or not in time): requests get 503
    /// `store_unavailable` ([`GatewayError::StoreUnavailable`]) instead of 500.
    pub fn unavailable(why: impl std::fmt::Display) -> Self {
        StoreError(format!("{UNAVAILABLE}{why}"))
    }

    /// Whether this is an [unavailable](StoreError::unavailable) error.
    pub fn is_unavailable(&self) -> bool {
        self.0.starts_with(UNAVAILABLE)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

impl From<StoreError> for GatewayError {
    fn from(e: StoreError) -> Self {
        match e.0.strip_prefix(UNAVAILABLE) {
            Some(why) => GatewayError::StoreUnavailable(format!(
                "the gateway's store is unavailable ({why}); try again shortly"
            )),
            None => GatewayError::Internal(e.to_string()),
        }
    }
}

/// A key as stored: the record every layer sees, plus when it was made and its money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// The record (no secret, no balance).
    pub record: KeyRecord,
    /// Unix seconds of creation.
    pub created: u64,
    /// Credits granted in total (creation + top-ups).
    pub credits: Money,
    /// Spent in total (committed settlements).
    pub spent: Money,
}

impl StoredKey {
    /// What the admin API and `switchboard keys show` print (never a secret), with
    /// the spending of the current periods at 0 (see [`view_with`](Self::view_with)).
    pub fn view(&self) -> KeyView {
        self.view_with(PeriodUsage::default())
    }

    /// [`view`](Self::view) with the spending of the current UTC day, week and month
    /// ([`Ledger::usage`]).
    pub fn view_with(&self, usage: PeriodUsage) -> KeyView {
        let r = &self.record;
        KeyView {
            id: r.id.clone(),
            name: r.name.clone(),
            created: self.created,
            disabled: r.disabled,
            credits: self.credits,
            usage: self.spent,
            credits_remaining: self.credits - self.spent,
            limit: r.limit,
            rpm: r.rpm,
            tokens_per_day: r.tokens_per_day,
            models: r.models.clone(),
            limit_reset: r.limit_reset,
            usage_daily: usage.daily,
            usage_weekly: usage.weekly,
            usage_monthly: usage.monthly,
            expires_at: r.expires_at.map(crate::clock::format_rfc3339),
            labels: r.labels.clone(),
            deleted: r.deleted(),
            deleted_at: r.deleted_at.map(crate::clock::format_rfc3339),
            secret: None,
        }
    }
}

/// A key as the admin API and the CLI show it. Serialised directly (not through
/// `serde_json::Value`), so amounts keep their exact decimal digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyView {
    /// Key id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Unix seconds of creation.
    pub created: u64,
    /// Whether requests are refused.
    pub disabled: bool,
    /// Credits granted in total, USD.
    pub credits: Money,
    /// Spent in total, USD.
    pub usage: Money,
    /// `credits - usage`, USD.
    pub credits_remaining: Money,
    /// Lifetime spending limit, USD.
    pub limit: Option<Money>,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per UTC day.
    pub tokens_per_day: Option<u64>,
    /// Allow-list.
    pub models: Option<Vec<String>>,
    /// The period `limit` applies to (`null`: the key's lifetime).
    pub limit_reset: Option<LimitReset>,
    /// Spent in the current UTC day, USD.
    pub usage_daily: Money,
    /// Spent in the current UTC week (from Monday), USD.
    pub usage_weekly: Money,
    /// Spent in the current UTC calendar month, USD.
    pub usage_monthly: Money,
    /// When the key stops working (RFC 3339), if it does.
    pub expires_at: Option<String>,
    /// Free-form `k=v` tags.
    pub labels: Labels,
    /// Whether the key was deleted (refused; kept for the books).
    pub deleted: bool,
    /// When it was deleted (RFC 3339).
    pub deleted_at: Option<String>,
    /// The secret: only in the answer that creates the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// What a new key starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// Display name.
    pub name: String,
    /// Credits granted at creation.
    pub credits: Money,
    /// Lifetime spending limit.
    pub limit: Option<Money>,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per UTC day.
    pub tokens_per_day: Option<u64>,
    /// Allow-list of model globs.
    pub models: Option<Vec<String>>,
    /// The period `limit` applies to (`None`: the key's lifetime).
    pub limit_reset: Option<LimitReset>,
    /// Unix seconds from which the key is refused.
    pub expires_at: Option<u64>,
    /// Free-form `k=v` tags ([`check_labels`](crate::keys::check_labels)).
    pub labels: Labels,
}

impl NewKey {
    /// The key as a store returns it once stored under `id` at `created` (Unix
    /// seconds): nothing spent yet.
    pub fn into_stored(self, id: String, created: u64) -> StoredKey {
        StoredKey {
            record: KeyRecord {
                limit: self.limit,
                rpm: self.rpm,
                tokens_per_day: self.tokens_per_day,
                models: self.models,
                limit_reset: self.limit_reset,
                expires_at: self.expires_at,
                labels: self.labels,
                ..KeyRecord::new(id, self.name)
            },
            created,
            credits: self.credits,
            spent: Money::ZERO,
        }
    }

    /// A key with `credits` and no limits.
    pub fn new(name: impl Into<String>, credits: Money) -> Self {
        NewKey {
            name: name.into(),
            credits,
            limit: None,
            rpm: None,
            tokens_per_day: None,
            models: None,
            limit_reset: None,
            expires_at: None,
            labels: Labels::new(),
        }
    }
}

/// A change to a key's record; `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPatch {
    /// New name.
    pub name: Option<String>,
    /// Disable or re-enable.
    pub disabled: Option<bool>,
    /// New lifetime limit.
    pub limit: Option<Option<Money>>,
    /// New requests per minute.
    pub rpm: Option<Option<u32>>,
    /// New tokens per day.
    pub tokens_per_day: Option<Option<u64>>,
    /// New allow-list.
    pub models: Option<Option<Vec<String>>>,
    /// New period of the limit (`Some(None)`: the key's lifetime).
    pub limit_reset: Option<Option<LimitReset>>,
    /// New expiry, Unix seconds (`Some(None)`: never).
    pub expires_at: Option<Option<u64>>,
    /// New labels (replace all of them).
    pub labels: Option<Labels>,
    /// Deletes the key at these Unix seconds (a key deleted before keeps its time).
    pub delete_at: Option<u64>,
}

impl KeyPatch {
    /// Applies the patch to a record.
    pub fn apply(&self, r: &mut KeyRecord) {
        if let Some(n) = &self.name {
            r.name.clone_from(n);
        }
        if let Some(d) = self.disabled {
            r.disabled = d;
        }
        if let Some(l) = self.limit {
            r.limit = l;
        }
        if let Some(x) = self.rpm {
            r.rpm = x;
        }
        if let Some(x) = self.tokens_per_day {
            r.tokens_per_day = x;
        }
        if let Some(m) = &self.models {
            r.models.clone_from(m);
        }
        if let Some(x) = self.limit_reset {
            r.limit_reset = x;
        }
        if let Some(x) = self.expires_at {
            r.expires_at = x;
        }
        if let Some(l) = &self.labels {
            r.labels.clone_from(l);
        }
        if let Some(t) = self.delete_at {
            r.deleted_at.get_or_insert(t);
        }
    }
}

/// Who may call: key records by secret hash, and their administration.
///
/// Methods may block on I/O (they are called on a cache miss, or by administration);
/// callers in async code run them where blocking is fine.
///
/// # Example
/// A whole implementation over a `HashMap` is the first example of the
/// [module docs](self#example); hand yours to
/// [`GatewayBuilder::store`](crate::gateway::GatewayBuilder::store) (with a [`Ledger`])
/// or straight to [`AuthLayer::new`](crate::auth::AuthLayer::new).
pub trait KeyStore: Send + Sync + 'static {
    /// The key whose secret hashes to `hash`.
    fn find(&self, hash: &SecretHash) -> Result<Option<KeyRecord>, StoreError>;
    /// A key by id.
    fn get(&self, id: &str) -> Result<Option<StoredKey>, StoreError>;
    /// Every key, oldest first.
    fn list(&self) -> Result<Vec<StoredKey>, StoreError>;
    /// Stores a new key under the hash of its secret.
    fn create(&self, hash: SecretHash, new: NewKey) -> Result<StoredKey, StoreError>;
    /// Changes a key's record; `None` when there is no such key.
    fn update(&self, id: &str, patch: &KeyPatch) -> Result<Option<StoredKey>, StoreError>;
    /// Whether the store answers (for `/readyz`).
    fn ping(&self) -> Result<(), StoreError>;
    /// Gives a key the secret that hashes to `hash` (same id, money and limits);
    /// its old secret keeps working until `grace_until` (Unix seconds; `None`: it
    /// stops at once), then [`find`](KeyStore::find) no longer finds it. `None`
    /// when there is no such key. The default refuses: a store that cannot rotate.
    fn rotate(
        &self,
        id: &str,
        hash: SecretHash,
        grace_until: Option<u64>,
    ) -> Result<Option<StoredKey>, StoreError> {
        let _ = (id, hash, grace_until);
        Err(StoreError(
            "this store cannot rotate secrets: create a new key instead".into(),
        ))
    }
    /// Key changes made by any process on this store (other instances, the CLI), for
    /// stores shared by several gateways: the gateway forgets its cached records on
    /// each one. `None` (the default) when only this process changes keys.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<KeyChange>> {
        None
    }
}

/// A key changed somewhere (see [`KeyStore::changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    /// This key was created, changed or topped up.
    Key(String),
    /// Any key may have changed (changes may have been missed, e.g. while the
    /// store's connection was down).
    All,
}

/// A key's money as the ledger holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Balance {
    /// Credits granted in total.
    pub credits: Money,
    /// Spent in total (committed).
    pub spent: Money,
    /// Held by requests in flight.
    pub reserved: Money,
    /// Tokens held by requests in flight (against `tokens_per_day`).
    pub reserved_tokens: u64,
}

/// What admission holds for one request until it settles (SPEC §4): an upper bound
/// of its cost and of its tokens. A settlement never charges more than either.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Reservation {
    /// The most the request may cost.
    pub amount: Money,
    /// The most tokens (prompt + completion) it may count against `tokens_per_day`.
    pub tokens: u64,
}

impl Reservation {
    /// Nothing held (a settlement replayed from the journal).
    pub const NONE: Reservation = Reservation {
        amount: Money::ZERO,
        tokens: 0,
    };
}

impl From<Money> for Reservation {
    /// A hold of `amount` and no tokens.
    fn from(amount: Money) -> Self {
        Reservation { amount, tokens: 0 }
    }
}

/// What a key spent in the current UTC day, week (from Monday) and calendar month:
/// what `limit_usd` is held against under `limit_reset` (SPEC §8.3), and what
/// `GET /v1/key` shows as `usage_daily`, `usage_weekly`, `usage_monthly`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PeriodUsage {
    /// Spent since the last UTC midnight.
    pub daily: Money,
    /// Spent since the last Monday, 00:00 UTC.
    pub weekly: Money,
    /// Spent since the first of the month, 00:00 UTC.
    pub monthly: Money,
}

impl PeriodUsage {
    /// The spending of the period `reset` names.
    pub fn of(&self, reset: LimitReset) -> Money {
        match reset {
            LimitReset::Daily => self.daily,
            LimitReset::Weekly => self.weekly,
            LimitReset::Monthly => self.monthly,
        }
    }
}

/// Bounds an attribution header (`HTTP-Referer`, `X-Title`): at most this many bytes
/// are kept (cut at a character boundary).
pub const MAX_APP_BYTES: usize = 512;

/// `text` cut to at most [`MAX_APP_BYTES`] bytes at a character boundary, without
/// control characters; `None` when nothing is left.
///
/// # Example
/// ```
/// use switchboard::store::{bounded_app_field, MAX_APP_BYTES};
///
/// assert_eq!(bounded_app_field(" My App "), Some("My App".to_string()));
/// assert_eq!(bounded_app_field("a\u{7}b"), Some("ab".to_string()));
/// assert_eq!(bounded_app_field("  "), None);
/// // 600 bytes of two-byte characters: cut to 512, never inside a character.
/// let cut = bounded_app_field(&"é".repeat(300)).unwrap();
/// assert_eq!((cut.len(), cut.chars().count()), (MAX_APP_BYTES, 256));
/// let odd = bounded_app_field(&format!("x{}", "é".repeat(300))).unwrap();
/// assert_eq!(odd.len(), MAX_APP_BYTES - 1);
/// ```
pub fn bounded_app_field(text: &str) -> Option<String> {
    let text = text.trim();
    let mut end = text.len().min(MAX_APP_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let kept: String = text[..end].chars().filter(|c| !c.is_control()).collect();
    (!kept.is_empty()).then_some(kept)
}

impl Balance {
    /// Credits neither spent nor reserved.
    pub fn available(&self) -> Money {
        self.credits - self.spent - self.reserved
    }
}

/// One upstream attempt as `/v1/generation` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct GenerationAttempt {
    /// Provider name.
    pub provider: String,
    /// `"200"`, `"503"`, `"timeout"`, ….
    pub status: String,
    /// From the attempt's start to its success or failure.
    pub latency_ms: u64,
}

/// The stats of one finished request, kept with its ledger row.
///
/// `Default` is an empty row, for building one with `..Default::default()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Generation {
    /// The gateway's request id.
    pub id: String,
    /// The key that made it (not shown to clients).
    #[serde(skip)]
    pub key_id: String,
    /// Model that served.
    pub model: String,
    /// Provider that served.
    pub provider: String,
    /// Whether it was a stream.
    pub streamed: bool,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// What was debited.
    pub total_cost: Money,
    /// From arrival to the end of the response.
    pub latency_ms: u64,
    /// Time to the first content chunk.
    pub ttft_ms: Option<u64>,
    /// Every attempt, in order.
    pub attempts: Vec<GenerationAttempt>,
    /// Why generation stopped.
    pub finish_reason: Option<String>,
    /// The app that sent it: its `HTTP-Referer` header (bounded, see
    /// [`bounded_app_field`]).
    pub app_url: Option<String>,
    /// The app that sent it: its `X-Title` header (bounded likewise).
    pub app_title: Option<String>,
    /// Unix seconds of arrival.
    #[serde(skip)]
    pub created: u64,
    /// Answered from the response cache: no upstream call, cost 0 ([`crate::cache`]).
    pub cache_hit: bool,
}

/// A charge to commit: the amount, the reservation it replaces, and the stats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// The key charged.
    pub key_id: String,
    /// The reservation this settlement releases.
    pub reserved: Reservation,
    /// Tokens counted against the key's day (prompt + completion, at most
    /// `reserved.tokens`).
    pub tokens: u64,
    /// The row (its `id` is the idempotency key, its `total_cost` the debit).
    pub generation: Generation,
}

/// What [`Ledger::reserve`] answers: ready at once when admission is decided in
/// memory (`Either::Left`, no allocation: the hot path), or a future when it needs the
/// store (`Either::Right`, e.g. [`PgStore`] asking PostgreSQL for a larger lease).
pub type Admission =
    Either<Ready<Result<(), GatewayError>>, BoxFuture<'static, Result<(), GatewayError>>>;

/// An [`Admission`] decided already.
pub fn admitted(result: Result<(), GatewayError>) -> Admission {
    Either::Left(futures_util::future::ready(result))
}

/// What keys hold and spend: reservations in memory, settlements committed durably.
///
/// `reserve` decides in memory when it can (its [`Admission`] is then ready at once)
/// and may wait for the store otherwise; `release` never waits; `balance` and
/// `tokens_today` read the accounts or the store; `settle` resolves once the charge
/// is durably committed.
///
/// A [`Reservation`] holds money and tokens: `reserve` refuses with 402 when the
/// money does not fit, and with 429 when the key's `tokens_per_day` cannot hold
/// today's tokens, those held by requests in flight and this request's together.
///
/// # Example
/// A ledger kept only in memory (no durability: for tests and experiments):
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use futures_util::future::{self, BoxFuture, FutureExt};
/// use switchboard::error::GatewayError;
/// use switchboard::keys::KeyRecord;
/// use switchboard::money::Money;
/// use switchboard::store::{admitted, Admission, Balance, Generation, Ledger, Reservation, Settlement, StoreError};
///
/// #[derive(Default)]
/// struct MemoryLedger {
///     accounts: Mutex<HashMap<String, (Balance, u64)>>, // the balance, tokens used today
///     rows: Mutex<HashMap<String, Generation>>,
/// }
///
/// impl MemoryLedger {
///     fn hold(&self, key: &KeyRecord, hold: Reservation) -> Result<(), GatewayError> {
///         let mut map = self.accounts.lock().unwrap();
///         let (b, today) = map.entry(key.id.clone()).or_default();
///         if key.tokens_per_day.is_some_and(|l| *today + b.reserved_tokens + hold.tokens > l) {
///             return Err(GatewayError::RateLimited {
///                 message: format!("key `{}` is out of tokens for today", key.name),
///                 retry_after: Some(switchboard::store::until_utc_midnight()),
///             });
///         }
///         if hold.amount > b.available() {
///             return Err(GatewayError::InsufficientCredits(format!("key `{}` cannot cover ${}", key.name, hold.amount)));
///         }
///         b.reserved = b.reserved + hold.amount;
///         b.reserved_tokens += hold.tokens;
///         Ok(())
///     }
/// }
///
/// impl Ledger for MemoryLedger {
///     fn reserve(&self, key: &KeyRecord, hold: Reservation) -> Admission {
///         // Decided in memory: ready at once.
///         admitted(self.hold(key, hold))
///     }
///     fn release(&self, key_id: &str, hold: Reservation) {
///         if let Some((b, _)) = self.accounts.lock().unwrap().get_mut(key_id) {
///             b.reserved = b.reserved - hold.amount;
///             b.reserved_tokens -= hold.tokens;
///         }
///     }
///     fn settle(&self, s: Settlement) -> BoxFuture<'static, Result<bool, StoreError>> {
///         let mut rows = self.rows.lock().unwrap();
///         let fresh = !rows.contains_key(&s.generation.id);
///         let mut map = self.accounts.lock().unwrap();
///         let (b, today) = map.entry(s.key_id.clone()).or_default();
///         b.reserved = b.reserved - s.reserved.amount;
///         b.reserved_tokens -= s.reserved.tokens;
///         if fresh {
///             b.spent = b.spent + s.generation.total_cost;
///             *today += s.tokens;
///             rows.insert(s.generation.id.clone(), s.generation);
///         }
///         future::ready(Ok(fresh)).boxed()
///     }
///     fn settle_detached(&self, s: Settlement) {
///         let _ = self.settle(s);
///     }
///     fn flush(&self) -> BoxFuture<'static, ()> {
///         future::ready(()).boxed()
///     }
///     fn balance(&self, key_id: &str) -> Result<Balance, StoreError> {
///         Ok(self.accounts.lock().unwrap().get(key_id).map(|a| a.0).unwrap_or_default())
///     }
///     fn tokens_today(&self, key_id: &str) -> Result<u64, StoreError> {
///         Ok(self.accounts.lock().unwrap().get(key_id).map_or(0, |a| a.1))
///     }
///     fn top_up(&self, key_id: &str, amount: Money) -> Result<Option<Balance>, StoreError> {
///         let mut map = self.accounts.lock().unwrap();
///         let (b, _) = map.entry(key_id.to_string()).or_default();
///         b.credits = b.credits + amount;
///         Ok(Some(*b))
///     }
///     fn generation(&self, id: &str) -> Result<Option<Generation>, StoreError> {
///         Ok(self.rows.lock().unwrap().get(id).cloned())
///     }
/// }
///
/// let ledger = MemoryLedger::default();
/// let mut alice = KeyRecord::new("key_1", "alice");
/// alice.tokens_per_day = Some(1_000);
/// ledger.top_up("key_1", "1".parse().unwrap()).unwrap();
/// let hold = |usd: &str, tokens| Reservation { amount: usd.parse().unwrap(), tokens };
/// // Ready at once: `now_or_never` takes the answer without a runtime.
/// let reserve = |h| ledger.reserve(&alice, h).now_or_never().expect("decided in memory");
/// reserve(hold("0.75", 600)).unwrap();
/// let err = reserve(hold("0.5", 100)).unwrap_err();
/// assert_eq!(err.code(), "insufficient_credits");
/// // Money would fit, tokens would not: 600 held + 500 > 1,000 a day.
/// let err = reserve(hold("0.1", 500)).unwrap_err();
/// assert_eq!(err.code(), "rate_limited");
/// ```
pub trait Ledger: Send + Sync + 'static {
    /// Holds `hold` for a request of `key`, or refuses: 429 `rate_limited` (with a
    /// `Retry-After` to UTC midnight) when the key's `tokens_per_day` cannot hold
    /// today's tokens, the tokens held by requests in flight and `hold.tokens`
    /// together; 402 `insufficient_credits` when credits or `limit_usd` remaining
    /// (after what requests in flight hold) cannot cover `hold.amount`; 503
    /// `store_unavailable` when a shared store does not answer.
    ///
    /// The [`Admission`] is ready at once when the ledger decides in memory (always
    /// for [`SqliteStore`], on the fast path for [`PgStore`]); otherwise it resolves
    /// after a store round trip. A hold is taken only when it resolves `Ok`: dropping
    /// it before then holds nothing.
    fn reserve(&self, key: &KeyRecord, hold: Reservation) -> Admission;
    /// Gives back a reservation that will not be settled.
    fn release(&self, key_id: &str, hold: Reservation);
    /// Commits a settlement durably and then releases its reservation; resolves to
    /// `true` when it charged, `false` when that request id was already settled.
    fn settle(&self, s: Settlement) -> BoxFuture<'static, Result<bool, StoreError>>;
    /// Like [`settle`](Ledger::settle) without waiting (for `Drop`, which cannot await).
    fn settle_detached(&self, s: Settlement);
    /// Resolves when everything sent before it is committed.
    fn flush(&self) -> BoxFuture<'static, ()>;
    /// A key's money now.
    fn balance(&self, key_id: &str) -> Result<Balance, StoreError>;
    /// Tokens a key used today (UTC).
    fn tokens_today(&self, key_id: &str) -> Result<u64, StoreError>;
    /// Grants `amount` more credits; `None` when there is no such key.
    fn top_up(&self, key_id: &str, amount: Money) -> Result<Option<Balance>, StoreError>;
    /// One settled request's stats.
    fn generation(&self, id: &str) -> Result<Option<Generation>, StoreError>;

    /// Whether this ledger keeps [idempotency records](IdempotencyRecord) (SPEC §8.2).
    /// The default is `false`: the
    /// [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) then lets requests
    /// through as if they had no `Idempotency-Key`.
    fn keeps_idempotency_records(&self) -> bool {
        false
    }

    /// Like [`settle`](Ledger::settle), and commits `record` in the same commit as
    /// the settlement: after a crash both are there or neither is. A request id
    /// settled before is not charged again, and its record is not written. The
    /// default (a ledger that keeps no records) settles alone.
    fn settle_recorded(
        &self,
        s: Settlement,
        record: IdempotencyRecord,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let _ = record;
        self.settle(s)
    }

    /// The record of `idem_key` of key `key_id` still kept at `now` (Unix seconds),
    /// committed records not yet in the store's tables included. The default: none.
    fn idempotency_record(
        &self,
        key_id: &str,
        idem_key: &str,
        now: u64,
    ) -> BoxFuture<'static, Result<Option<IdempotencyRecord>, StoreError>> {
        let _ = (key_id, idem_key, now);
        Box::pin(futures_util::future::ready(Ok(None)))
    }

    /// Tries to take the lock that lets one instance at a time run the first
    /// request of `idem_key` of key `key_id`: `None` while another instance holds it.
    /// The default (one process) always grants a lock that holds nothing.
    fn idempotency_lock(
        &self,
        key_id: &str,
        idem_key: &str,
    ) -> BoxFuture<'static, Result<Option<IdempotencyLock>, StoreError>> {
        let _ = (key_id, idem_key);
        Box::pin(futures_util::future::ready(Ok(Some(
            IdempotencyLock::local(),
        ))))
    }

    /// Deletes the records expired at `now` (Unix seconds); how many. The default:
    /// nothing to delete.
    fn purge_idempotency(&self, now: u64) -> BoxFuture<'static, Result<u64, StoreError>> {
        let _ = now;
        Box::pin(futures_util::future::ready(Ok(0)))
    }
    /// What a key spent in the current UTC day, week and month. The default is
    /// nothing, for a ledger that keeps no periods (and so cannot hold a key with
    /// `limit_reset` to its period either).
    fn usage(&self, key_id: &str) -> Result<PeriodUsage, StoreError> {
        let _ = key_id;
        Ok(PeriodUsage::default())
    }
}

/// The 402 of a request that `limit_usd` (per its period, with `limit_reset`) cannot
/// cover: `left` is what the limit leaves after what is spent and held.
pub(crate) fn limit_refusal(
    key: &KeyRecord,
    limit: Money,
    left: Money,
    amount: Money,
) -> GatewayError {
    let left = left.max(Money::ZERO);
    GatewayError::InsufficientCredits(match key.limit_reset {
        None => format!(
            "key `{}` has ${left} left of its ${limit} spending limit; this request may cost up to ${amount}. Raise limit_usd or lower max_tokens",
            key.name
        ),
        Some(r) => format!(
            "key `{}` has ${left} left of its ${limit} {r} spending limit; this request may cost up to ${amount}. It starts over {}; or raise limit_usd or lower max_tokens",
            key.name,
            match r {
                LimitReset::Daily => "at midnight UTC",
                LimitReset::Weekly => "on Monday, 00:00 UTC",
                LimitReset::Monthly => "on the first of the month, 00:00 UTC",
            }
        ),
    })
}

/// Whether a `[store].url` names PostgreSQL (`postgres://…` or `postgresql://…`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// A store opened from `[store].url` by [`open`]: the embedded SQLite file, or a
/// PostgreSQL database shared by any number of gateways.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// `sqlite://PATH` or `sqlite::memory:`.
    Sqlite(std::sync::Arc<SqliteStore>),
    /// `postgres://…` or `postgresql://…`.
    Postgres(std::sync::Arc<PgStore>),
}

impl AnyStore {
    /// The store as a [`KeyStore`].
    pub fn keys(&self) -> std::sync::Arc<dyn KeyStore> {
        match self {
            AnyStore::Sqlite(s) => s.clone(),
            AnyStore::Postgres(s) => s.clone(),
        }
    }

    /// The store as a [`Ledger`].
    pub fn ledger(&self) -> std::sync::Arc<dyn Ledger> {
        match self {
            AnyStore::Sqlite(s) => s.clone(),
            AnyStore::Postgres(s) => s.clone(),
        }
    }

    /// Upserts the bootstrap `[[keys]]` of a config ([`SqliteStore::bootstrap`],
    /// [`PgStore::bootstrap`]: the same rules).
    pub fn bootstrap(&self, keys: &[crate::config::KeyConfig]) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.bootstrap(keys),
            AnyStore::Postgres(s) => s.bootstrap(keys),
        }
    }
}

/// Opens the store `config.url` names: [`PgStore`] for a PostgreSQL URL, else
/// [`SqliteStore`].
///
/// # Example
/// ```
/// use switchboard::config::StoreConfig;
/// use switchboard::store::{open, AnyStore, KeyStore};
///
/// let store = open(&StoreConfig { url: "sqlite::memory:".into(), ..Default::default() }).unwrap();
/// assert!(matches!(store, AnyStore::Sqlite(_)));
/// assert!(store.keys().list().unwrap().is_empty());
/// ```
pub fn open(config: &crate::config::StoreConfig) -> Result<AnyStore, StoreError> {
    if is_postgres_url(&config.url) {
        PgStore::open(config).map(AnyStore::Postgres)
    } else {
        SqliteStore::open(config).map(AnyStore::Sqlite)
    }
}
