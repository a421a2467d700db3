//! Keys, balances and generations in PostgreSQL, and the schema's migration.
//!
//! Every change to a key (create, update, top-up, a bootstrap that changed it)
//! sends `NOTIFY sb_keys, '<key id>'` in its own transaction (see [`super::listen`]).

use std::sync::Arc;

use tokio_postgres::Row;

use super::escrow::Amounts;
use super::{schema, Op, Shared};
use crate::config::KeyConfig;
use crate::keys::{KeyRecord, Labels, LimitReset};
use crate::money::{Money, MAX_CREDITS};
use crate::store::{
    credits_after_top_up, hash_secret, new_key_id, now_unix, Balance, Generation,
    GenerationAttempt, KeyPatch, NewKey, PeriodUsage, SecretHash, StoreError, StoredKey,
};

const KEY_COLUMNS: &str = "id, name, created, disabled, credits, spent, limit_usd, rpm, tokens_per_day, models, limit_reset, expires_at, labels, deleted_at";

/// The notification channel of key changes (payload: the key id).
pub(super) const KEYS_CHANNEL: &str = "sb_keys";

fn row_to_key(r: &Row) -> StoredKey {
    let models: Option<String> = r.get("models");
    StoredKey {
        record: KeyRecord {
            id: r.get("id"),
            name: r.get("name"),
            disabled: r.get("disabled"),
            limit: r.get::<_, Option<i64>>("limit_usd").map(Money::from_pico),
            rpm: r.get::<_, Option<i32>>("rpm").map(|v| v.max(0) as u32),
            tokens_per_day: r
                .get::<_, Option<i64>>("tokens_per_day")
                .map(|v| v.max(0) as u64),
            models: models.and_then(|m| serde_json::from_str(&m).ok()),
            limit_reset: r
                .get::<_, Option<String>>("limit_reset")
                .and_then(|v| v.parse().ok()),
            expires_at: r
                .get::<_, Option<i64>>("expires_at")
                .map(|v| v.max(0) as u64),
            labels: r
                .get::<_, Option<String>>("labels")
                .and_then(|v| serde_json::from_str(&v).ok())
                .unwrap_or_default(),
            deleted_at: r
                .get::<_, Option<i64>>("deleted_at")
                .map(|v| v.max(0) as u64),
            secret_expires_at: None,
        },
        created: r.get::<_, i64>("created").max(0) as u64,
        credits: Money::from_pico(r.get("credits")),
        spent: Money::from_pico(r.get("spent")),
    }
}

fn models_json(m: &Option<Vec<String>>) -> Option<String> {
    m.as_ref()
        .map(|m| serde_json::to_string(m).unwrap_or_default())
}

/// Labels as stored: a JSON object, `NULL` when there are none.
fn labels_json(l: &Labels) -> Option<String> {
    (!l.is_empty()).then(|| serde_json::to_string(l).unwrap_or_default())
}

fn reset_text(r: Option<LimitReset>) -> Option<&'static str> {
    r.map(LimitReset::as_str)
}

fn expiry(t: Option<u64>) -> Option<i64> {
    t.map(|t| i64::try_from(t).unwrap_or(i64::MAX))
}

fn rpm(v: Option<u32>) -> Option<i32> {
    v.map(|v| i32::try_from(v).unwrap_or(i32::MAX))
}

fn per_day(v: Option<u64>) -> Option<i64> {
    v.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// Refuses credits or a limit outside `0..=`[`MAX_CREDITS`] (the table's CHECKs say
/// the same, less clearly).
fn check_amounts(credits: Money, limit: Option<Money>) -> Result<(), StoreError> {
    if !credits.within(MAX_CREDITS) || limit.is_some_and(|l| !l.within(MAX_CREDITS)) {
        return Err(StoreError(format!(
            "credits and limits must be from $0 to ${MAX_CREDITS}"
        )));
    }
    Ok(())
}

impl Shared {
    /// Creates or migrates the schema, under the advisory lock (see [`schema`]).
    pub(super) async fn migrate(self: &Arc<Self>) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.error(e))?;
        let steps = schema::migrations();
        self.count(Op::Migrate);
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&schema::LOCK_ID])
            .await
            .map_err(|e| self.error(e))?;
        // Made here the first time (under the lock: no other instance races it).
        self.count(Op::Migrate);
        let exists: bool = tx
            .query_one("SELECT to_regclass('sb_schema_version') IS NOT NULL", &[])
            .await
            .map_err(|e| self.error(e))?
            .get(0);
        if !exists {
            self.count(Op::Migrate);
            tx.batch_execute(
                "CREATE TABLE sb_schema_version (
                     version    INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .await
            .map_err(|e| self.error(e))?;
        }
        self.count(Op::Migrate);
        let current: i32 = tx
            .query_one(
                "SELECT coalesce(max(version), 0) FROM sb_schema_version",
                &[],
            )
            .await
            .map_err(|e| self.error(e))?
            .get(0);
        let known = steps.len() as i32;
        if current > known {
            return Err(StoreError(format!(
                "the database's schema is version {current}, newer than this switchboard knows ({known}): run a newer switchboard"
            )));
        }
        for (i, step) in steps.iter().enumerate().skip(current as usize) {
            let version = i as i32 + 1;
            self.count(Op::Migrate);
            tx.batch_execute(step).await.map_err(|e| {
                StoreError(format!(
                    "schema step {version} failed: {}",
                    super::describe(&e)
                ))
            })?;
            self.count(Op::Migrate);
            tx.execute(
                "INSERT INTO sb_schema_version (version) VALUES ($1)",
                &[&version],
            )
            .await
            .map_err(|e| self.error(e))?;
        }
        self.count(Op::Migrate);
        tx.commit().await.map_err(|e| self.error(e))?;
        self.mark_up();
        Ok(())
    }

    pub(super) async fn find(
        self: &Arc<Self>,
        hash: SecretHash,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let client = self.client().await?;
        // The current secret, or one a rotation replaced whose grace has not ended.
        let stmt = self
            .prepare(
                &client,
                &format!(
                    "(SELECT {KEY_COLUMNS}, NULL::bigint AS grace FROM sb_keys WHERE secret_sha256 = $1)
                     UNION ALL
                     (SELECT {KEY_COLUMNS}, old_secret_until FROM sb_keys
                       WHERE old_secret_sha256 = $1 AND old_secret_until > $2)
                     LIMIT 1"
                ),
            )
            .await?;
        self.count(Op::Key);
        let now = expiry(Some(self.now()));
        let row = client
            .query_opt(&stmt, &[&&hash[..], &now])
            .await
            .map_err(|e| self.error(e))?;
        self.mark_up();
        Ok(row.map(|r| {
            let mut record = row_to_key(&r).record;
            record.secret_expires_at = r.get::<_, Option<i64>>("grace").map(|v| v.max(0) as u64);
            record
        }))
    }

    pub(super) async fn get(self: &Arc<Self>, id: &str) -> Result<Option<StoredKey>, StoreError> {
        let client = self.client().await?;
        let stmt = self
            .prepare(
                &client,
                &format!("SELECT {KEY_COLUMNS} FROM sb_keys WHERE id = $1"),
            )
            .await?;
        self.count(Op::Key);
        let row = client
            .query_opt(&stmt, &[&id])
            .await
            .map_err(|e| self.error(e))?;
        self.mark_up();
        Ok(row.map(|r| row_to_key(&r)))
    }

    pub(super) async fn list(self: &Arc<Self>) -> Result<Vec<StoredKey>, StoreError> {
        let client = self.client().await?;
        self.count(Op::Key);
        let rows = client
            .query(
                &format!("SELECT {KEY_COLUMNS} FROM sb_keys ORDER BY created, n"),
                &[],
            )
            .await
            .map_err(|e| self.error(e))?;
        self.mark_up();
        Ok(rows.iter().map(row_to_key).collect())
    }

    pub(super) async fn create(
        self: &Arc<Self>,
        hash: SecretHash,
        new: NewKey,
    ) -> Result<StoredKey, StoreError> {
        check_amounts(new.credits, new.limit)?;
        let id = new_key_id();
        let created = now_unix();
        let client = self.client().await?;
        self.count(Op::Key);
        // One statement: the row and its notification commit together.
        client
            .execute(
                "WITH made AS (
                     INSERT INTO sb_keys (id, secret_sha256, name, created, credits, limit_usd, rpm, tokens_per_day, models, limit_reset, expires_at, labels)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $11, $12, $13)
                     RETURNING id)
                 SELECT pg_notify($10, id) FROM made",
                &[
                    &id,
                    &&hash[..],
                    &new.name,
                    &(created as i64),
                    &new.credits.pico(),
                    &new.limit.map(Money::pico),
                    &rpm(new.rpm),
                    &per_day(new.tokens_per_day),
                    &models_json(&new.models),
                    &KEYS_CHANNEL,
                    &reset_text(new.limit_reset),
                    &expiry(new.expires_at),
                    &labels_json(&new.labels),
                ],
            )
            .await
            .map_err(|e| {
                if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                    StoreError("a key with this secret already exists".into())
                } else {
                    self.error(e)
                }
            })?;
        self.mark_up();
        Ok(new.into_stored(id, created))
    }

    pub(super) async fn update(
        self: &Arc<Self>,
        id: &str,
        patch: &KeyPatch,
    ) -> Result<Option<StoredKey>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.error(e))?;
        self.count(Op::Key);
        let Some(row) = tx
            .query_opt(
                &format!("SELECT {KEY_COLUMNS} FROM sb_keys WHERE id = $1 FOR UPDATE"),
                &[&id],
            )
            .await
            .map_err(|e| self.error(e))?
        else {
            return Ok(None);
        };
        let mut key = row_to_key(&row);
        patch.apply(&mut key.record);
        let r = &key.record;
        self.count(Op::Key);
        tx.execute(
            "UPDATE sb_keys SET name = $1, disabled = $2, limit_usd = $3, rpm = $4, tokens_per_day = $5, models = $6,
                    limit_reset = $8, expires_at = $9, labels = $10, deleted_at = $11
              WHERE id = $7",
            &[
                &r.name,
                &r.disabled,
                &r.limit.map(Money::pico),
                &rpm(r.rpm),
                &per_day(r.tokens_per_day),
                &models_json(&r.models),
                &id,
                &reset_text(r.limit_reset),
                &expiry(r.expires_at),
                &labels_json(&r.labels),
                &expiry(r.deleted_at),
            ],
        )
        .await
        .map_err(|e| self.error(e))?;
        self.count(Op::Key);
        tx.execute("SELECT pg_notify($1, $2)", &[&KEYS_CHANNEL, &id])
            .await
            .map_err(|e| self.error(e))?;
        self.count(Op::Key);
        tx.commit().await.map_err(|e| self.error(e))?;
        self.mark_up();
        Ok(Some(key))
    }

    /// Gives key `id` the secret hashing to `hash`; the old one is found until
    /// `grace_until` (none: never again). The change is told to every instance in
    /// the same statement, so a revoked secret stops everywhere at once.
    pub(super) async fn rotate(
        self: &Arc<Self>,
        id: &str,
        hash: SecretHash,
        grace_until: Option<u64>,
    ) -> Result<Option<StoredKey>, StoreError> {
        {
            let client = self.client().await?;
            self.count(Op::Key);
            let changed = client
                .execute(
                    "WITH turned AS (
                         UPDATE sb_keys
                            SET old_secret_sha256 = CASE WHEN $3::bigint IS NULL THEN NULL ELSE secret_sha256 END,
                                old_secret_until = $3, secret_sha256 = $2
                          WHERE id = $1
                          RETURNING id)
                     SELECT pg_notify($4, id) FROM turned",
                    &[&id, &&hash[..], &expiry(grace_until), &KEYS_CHANNEL],
                )
                .await
                .map_err(|e| {
                    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                        StoreError("a key with this secret already exists".into())
                    } else {
                        self.error(e)
                    }
                })?;
            self.mark_up();
            if changed == 0 {
                return Ok(None);
            }
        }
        self.get(id).await
    }

    /// See [`PgStore::bootstrap`](super::PgStore::bootstrap).
    pub(super) async fn bootstrap(self: &Arc<Self>, keys: &[KeyConfig]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut periods = Vec::with_capacity(keys.len());
        for k in keys {
            check_amounts(k.credits_usd, k.limit_usd)?;
            periods.push(k.period_and_expiry().map_err(StoreError)?);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.error(e))?;
        for (k, (reset, expires)) in keys.iter().zip(periods) {
            let hash = hash_secret(&k.secret);
            let name = k.name.clone().unwrap_or_else(|| "bootstrap".into());
            self.count(Op::Key);
            // A known secret keeps its money and takes the rest; a change is told to
            // the other instances (an unchanged key is not).
            tx.execute(
                "WITH up AS (
                     INSERT INTO sb_keys AS k (id, secret_sha256, name, created, credits, limit_usd, rpm, tokens_per_day, models, limit_reset, expires_at, labels)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $11, $12, $13)
                     ON CONFLICT (secret_sha256) DO UPDATE
                        SET name = excluded.name, limit_usd = excluded.limit_usd, rpm = excluded.rpm,
                            tokens_per_day = excluded.tokens_per_day, models = excluded.models,
                            limit_reset = excluded.limit_reset, expires_at = excluded.expires_at,
                            labels = excluded.labels
                      WHERE (k.name, k.limit_usd, k.rpm, k.tokens_per_day, k.models, k.limit_reset, k.expires_at, k.labels)
                            IS DISTINCT FROM
                            (excluded.name, excluded.limit_usd, excluded.rpm, excluded.tokens_per_day, excluded.models,
                             excluded.limit_reset, excluded.expires_at, excluded.labels)
                     RETURNING k.id)
                 SELECT pg_notify($10, id) FROM up",
                &[
                    &new_key_id(),
                    &&hash[..],
                    &name,
                    &(now_unix() as i64),
                    &k.credits_usd.pico(),
                    &k.limit_usd.map(Money::pico),
                    &rpm(k.rpm),
                    &per_day(k.tokens_per_day),
                    &models_json(&k.models),
                    &KEYS_CHANNEL,
                    &reset_text(reset),
                    &expiry(expires),
                    &labels_json(&k.labels),
                ],
            )
            .await
            .map_err(|e| self.error(e))?;
        }
        self.count(Op::Key);
        tx.commit().await.map_err(|e| self.error(e))?;
        self.mark_up();
        Ok(())
    }

    /// A key's money: credits and spent from PostgreSQL, reserved = this instance's
    /// holds + the other instances' unexpired leases.
    pub(super) async fn balance(self: &Arc<Self>, key_id: &str) -> Result<Balance, StoreError> {
        let client = self.client().await?;
        let stmt = self
            .prepare(
                &client,
                "SELECT k.credits, k.spent,
                        coalesce(sum(l.amount), 0)::bigint, coalesce(sum(l.tokens), 0)::bigint
                   FROM sb_keys k
                   LEFT JOIN sb_leases l
                     ON l.key_id = k.id AND l.instance <> $2 AND l.expires_at > now()
                  WHERE k.id = $1
                  GROUP BY k.id",
            )
            .await?;
        self.count(Op::Balance);
        let row = client
            .query_opt(&stmt, &[&key_id, &self.instance])
            .await
            .map_err(|e| self.error(e))?;
        self.mark_up();
        let Some(row) = row else {
            return Err(StoreError(format!("no key `{key_id}` in the store")));
        };
        let mine = self
            .existing(key_id)
            .map_or(Amounts::default(), |c| c.state.lock().in_use());
        let others = Amounts {
            money: row.get(2),
            tokens: row.get(3),
        };
        Ok(Balance {
            credits: Money::from_pico(row.get(0)),
            spent: Money::from_pico(row.get(1)),
            reserved: Money::from_pico(mine.money.saturating_add(others.money)),
            reserved_tokens: mine.tokens.saturating_add(others.tokens).max(0) as u64,
        })
    }

    pub(super) async fn tokens_today(self: &Arc<Self>, key_id: &str) -> Result<u64, StoreError> {
        let client = self.client().await?;
        self.count(Op::Balance);
        let today = crate::clock::utc_day(self.now()) as i64;
        let row = client
            .query_opt(
                "SELECT CASE WHEN tokens_day = $2 THEN tokens_used ELSE 0 END
                   FROM sb_keys WHERE id = $1",
                &[&key_id, &today],
            )
            .await
            .map_err(|e| self.error(e))?;
        self.mark_up();
        match row {
            Some(r) => Ok(r.get::<_, i64>(0).max(0) as u64),
            None => Err(StoreError(format!("no key `{key_id}` in the store"))),
        }
    }

    /// Adds `amount` to a key's credits under its row lock, by the rules of
    /// [`credits_after_top_up`], and tells the other instances.
    pub(super) async fn top_up(
        self: &Arc<Self>,
        key_id: &str,
        amount: Money,
    ) -> Result<Option<Balance>, StoreError> {
        {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| self.error(e))?;
            self.count(Op::TopUp);
            let Some(row) = tx
                .query_opt(
                    "SELECT credits FROM sb_keys WHERE id = $1 FOR UPDATE",
                    &[&key_id],
                )
                .await
                .map_err(|e| self.error(e))?
            else {
                return Ok(None);
            };
            let after = credits_after_top_up(Money::from_pico(row.get(0)), amount)
                .map_err(|m| StoreError(format!("top-up of key `{key_id}` refused: {m}")))?;
            self.count(Op::TopUp);
            tx.execute(
                "UPDATE sb_keys SET credits = $1 WHERE id = $2",
                &[&after.pico(), &key_id],
            )
            .await
            .map_err(|e| self.error(e))?;
            self.count(Op::TopUp);
            tx.execute("SELECT pg_notify($1, $2)", &[&KEYS_CHANNEL, &key_id])
                .await
                .map_err(|e| self.error(e))?;
            self.count(Op::TopUp);
            tx.commit().await.map_err(|e| self.error(e))?;
        }
        self.balance(key_id).await.map(Some)
    }

    pub(super) async fn generation(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<Option<Generation>, StoreError> {
        let client = self.client().await?;
        let stmt = self
            .prepare(
                &client,
                "SELECT id, key_id, cost, model, provider, streamed, prompt_tokens,
                        completion_tokens, latency_ms, ttft_ms, attempts, finish_reason, created,
                        app_url, app_title, cache_hit
                   FROM sb_settlements WHERE id = $1",
            )
            .await?;
        self.count(Op::Generation);
        let row = client
            .query_opt(&stmt, &[&id])
            .await
            .map_err(|e| self.error(e))?;
        self.mark_up();
        Ok(row.map(|r| {
            let attempts: String = r.get(10);
            let count = |i: usize| r.get::<_, i64>(i).max(0) as u64;
            Generation {
                id: r.get(0),
                key_id: r.get(1),
                total_cost: Money::from_pico(r.get(2)),
                model: r.get(3),
                provider: r.get(4),
                streamed: r.get(5),
                prompt_tokens: count(6),
                completion_tokens: count(7),
                latency_ms: count(8),
                ttft_ms: r.get::<_, Option<i64>>(9).map(|v| v.max(0) as u64),
                attempts: serde_json::from_str::<Vec<GenerationAttempt>>(&attempts)
                    .unwrap_or_default(),
                finish_reason: r.get(11),
                created: count(12),
                app_url: r.get(13),
                app_title: r.get(14),
                cache_hit: r.get(15),
            }
        }))
    }

    /// What a key spent in the current UTC day, week and month (the store's clock),
    /// as committed: the days of `sb_daily_spend` and the key row's count of its
    /// latest day (`spent_day`, `spent_today`; schema version 9).
    pub(super) async fn usage(self: &Arc<Self>, key_id: &str) -> Result<PeriodUsage, StoreError> {
        let today = crate::clock::utc_day(self.now());
        // Each period's first day, and the first day after it.
        let [day, week, month] = LimitReset::ALL.map(|r| r.period_start(today) as i64);
        let week_end = week + 7;
        // 31 days after the first of a month is in the next month.
        let month_end = LimitReset::Monthly.period_start(month as u64 + 31) as i64;
        let client = self.client().await?;
        let stmt = self
            .prepare(
                &client,
                "SELECT coalesce(sum(spent) FILTER (WHERE day = $2), 0)::bigint,
                        coalesce(sum(spent) FILTER (WHERE day >= $3 AND day < $4), 0)::bigint,
                        coalesce(sum(spent) FILTER (WHERE day >= $5 AND day < $6), 0)::bigint
                   FROM (SELECT day, spent FROM sb_daily_spend
                          WHERE key_id = $1 AND day >= least($3::bigint, $5::bigint)
                         UNION ALL
                         SELECT spent_day, spent_today FROM sb_keys
                          WHERE id = $1 AND spent_day >= least($3::bigint, $5::bigint)) t",
            )
            .await?;
        self.count(Op::Balance);
        let row = client
            .query_one(
                &stmt,
                &[&key_id, &day, &week, &week_end, &month, &month_end],
            )
            .await
            .map_err(|e| self.error(e))?;
        self.mark_up();
        Ok(PeriodUsage {
            daily: Money::from_pico(row.get(0)),
            weekly: Money::from_pico(row.get(1)),
            monthly: Money::from_pico(row.get(2)),
        })
    }
}
