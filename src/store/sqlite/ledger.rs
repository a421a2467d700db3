//! The [`Ledger`] impl of [`SqliteStore`]: reserve and release on the in-memory
//! accounts, settle and flush through the writer, reads overlaying what is
//! journaled and not in SQLite yet.

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use rusqlite::{params, OptionalExtension};

use super::writer::Cmd;
use super::{money, SqliteStore};
use crate::error::GatewayError;
use crate::keys::KeyRecord;
use crate::money::Money;
#[cfg(doc)]
use crate::money::MAX_CREDITS;
use crate::store::{
    Balance, Generation, GenerationAttempt, IdempotencyRecord, Ledger, PeriodUsage, Reservation,
    Settlement, StoreError,
};

impl SqliteStore {
    /// [`Ledger::reserve`], decided here and now (the accounts are in memory).
    pub fn reserve(&self, key: &KeyRecord, hold: Reservation) -> Result<(), GatewayError> {
        let acc = self.account(&key.id)?;
        // Only the day's rules read the clock.
        let now = if key.tokens_per_day.is_some() || key.limit_reset.is_some() {
            self.now()
        } else {
            0
        };
        match Self::try_reserve(&acc, key, hold, now) {
            Err(GatewayError::InsufficientCredits(_)) => {
                // Before refusing: a top-up made by another process (the CLI) is in the
                // database, not yet in memory. Credits only grow, so this is the only
                // way memory can be behind.
                self.refresh_credits(&key.id)?;
                Self::try_reserve(&acc, key, hold, now)
            }
            other => other,
        }
    }
}

impl SqliteStore {
    /// The idempotency record of a key's `idem_key` still kept at `now`.
    fn find_record(
        &self,
        key_id: &str,
        idem_key: &str,
        now: u64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        if let Some(journal) = &self.writer.journal {
            let j = journal.lock();
            let scope = (key_id.to_string(), idem_key.to_string());
            if let Some(r) = j
                .pending_records
                .get(&scope)
                .and_then(|e| e.record.as_deref())
            {
                return Ok(r.live_at(now).then(|| r.clone()));
            }
        }
        self.with_conn(|c| {
            Ok(c.prepare_cached(
                "SELECT fingerprint, status, headers, body, created, expires FROM idempotency
                 WHERE key_id = ?1 AND idem_key = ?2 AND expires > ?3",
            )?
            .query_row(params![key_id, idem_key, super::int(now)], |r| {
                let fp: Vec<u8> = r.get(0)?;
                let headers: String = r.get(2)?;
                let body: Vec<u8> = r.get(3)?;
                Ok(IdempotencyRecord {
                    key_id: key_id.to_string(),
                    idem_key: idem_key.to_string(),
                    // A fingerprint of another length never matches a request's.
                    fingerprint: fp.try_into().unwrap_or([0; 32]),
                    status: r.get(1)?,
                    headers: IdempotencyRecord::headers_from_json(&headers),
                    body: body.into(),
                    created: r.get::<_, i64>(4)? as u64,
                    expires: r.get::<_, i64>(5)? as u64,
                })
            })
            .optional()?)
        })
    }
}

impl Ledger for SqliteStore {
    fn reserve(&self, key: &KeyRecord, hold: Reservation) -> crate::store::Admission {
        crate::store::admitted(SqliteStore::reserve(self, key, hold))
    }

    fn release(&self, key_id: &str, hold: Reservation) {
        if let Some(acc) = self
            .accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key_id)
        {
            let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
            a.reserved = (a.reserved - hold.amount).max(Money::ZERO);
            a.reserved_tokens = a.reserved_tokens.saturating_sub(hold.tokens);
        }
    }

    fn settle(&self, s: Settlement) -> BoxFuture<'static, Result<bool, StoreError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writer.submit(Cmd::Settle(Box::new(s), Some(tx)));
        async move {
            rx.await
                .unwrap_or_else(|_| Err(StoreError("the ledger writer has stopped".into())))
        }
        .boxed()
    }

    fn settle_detached(&self, s: Settlement) {
        self.writer.submit(Cmd::Settle(Box::new(s), None));
    }

    fn flush(&self) -> BoxFuture<'static, ()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writer.submit(Cmd::Flush(tx));
        async move {
            let _ = rx.await;
        }
        .boxed()
    }

    fn balance(&self, key_id: &str) -> Result<Balance, StoreError> {
        let acc = self.account(key_id)?;
        let a = acc.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Balance {
            credits: a.credits,
            spent: a.spent,
            reserved: a.reserved,
            reserved_tokens: a.reserved_tokens,
        })
    }

    fn tokens_today(&self, key_id: &str) -> Result<u64, StoreError> {
        let acc = self.account(key_id)?;
        let today = self.clock().day();
        let a = acc.lock().unwrap_or_else(|e| e.into_inner());
        Ok(if a.day == today { a.day_tokens } else { 0 })
    }

    /// From the key's account: what was committed in its current periods (it is
    /// ahead of SQLite by what is journaled and not applied yet).
    fn usage(&self, key_id: &str) -> Result<PeriodUsage, StoreError> {
        let acc = self.account(key_id)?;
        let today = self.clock().day();
        let a = acc.lock().unwrap_or_else(|e| e.into_inner());
        Ok(a.periods.at(today))
    }

    /// Refuses (with nothing written) a top-up that is not more than 0 or that would
    /// take the key's credits past [`MAX_CREDITS`], checked in the transaction that
    /// writes it (see [`credits_after_top_up`](super::credits_after_top_up)).
    fn top_up(&self, key_id: &str, amount: Money) -> Result<Option<Balance>, StoreError> {
        let found = self.with_conn(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let credits: Option<i64> = tx
                .query_row("SELECT credits_pico FROM keys WHERE id=?1", [key_id], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(credits) = credits else {
                return Ok(false);
            };
            let after = super::credits_after_top_up(money(credits), amount)
                .map_err(|m| StoreError(format!("top-up of key `{key_id}` refused: {m}")))?;
            tx.execute(
                "UPDATE keys SET credits_pico = ?1 WHERE id = ?2",
                params![after.pico(), key_id],
            )?;
            tx.commit()?;
            Ok(true)
        })?;
        if !found {
            return Ok(None);
        }
        self.refresh_credits(key_id)?;
        self.balance(key_id).map(Some)
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
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writer
            .submit(Cmd::SettleRecorded(Box::new((s, record)), Some(tx)));
        async move {
            rx.await
                .unwrap_or_else(|_| Err(StoreError("the ledger writer has stopped".into())))
        }
        .boxed()
    }

    /// Journaled and not in SQLite yet, then SQLite (a point read by primary key, on
    /// the caller's thread: readers never wait for the writer in WAL mode).
    fn idempotency_record(
        &self,
        key_id: &str,
        idem_key: &str,
        now: u64,
    ) -> BoxFuture<'static, Result<Option<IdempotencyRecord>, StoreError>> {
        let found = self.find_record(key_id, idem_key, now);
        futures_util::future::ready(found).boxed()
    }

    fn purge_idempotency(&self, now: u64) -> BoxFuture<'static, Result<u64, StoreError>> {
        futures_util::future::ready(self.writer.purge_records(now)).boxed()
    }

    fn generation(&self, id: &str) -> Result<Option<Generation>, StoreError> {
        // Journaled and not in SQLite yet (for a few milliseconds).
        if let Some(journal) = &self.writer.journal {
            if let Some(e) = journal.lock().pending.get(id) {
                return Ok(Some(e.settlement.generation.clone()));
            }
        }
        self.with_conn(|c| {
            Ok(c.query_row(
                "SELECT request_id, key_id, amount_pico, model, provider, streamed, prompt_tokens,
                        completion_tokens, latency_ms, ttft_ms, attempts, finish_reason, created,
                        app_url, app_title, cache_hit
                 FROM settlements WHERE request_id=?1",
                [id],
                |r| {
                    let attempts: String = r.get(10)?;
                    Ok(Generation {
                        id: r.get(0)?,
                        key_id: r.get(1)?,
                        total_cost: money(r.get(2)?),
                        model: r.get(3)?,
                        provider: r.get(4)?,
                        streamed: r.get(5)?,
                        prompt_tokens: r.get::<_, i64>(6)? as u64,
                        completion_tokens: r.get::<_, i64>(7)? as u64,
                        latency_ms: r.get::<_, i64>(8)? as u64,
                        ttft_ms: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
                        attempts: serde_json::from_str::<Vec<GenerationAttempt>>(&attempts)
                            .unwrap_or_default(),
                        finish_reason: r.get(11)?,
                        created: r.get::<_, i64>(12)? as u64,
                        app_url: r.get(13)?,
                        app_title: r.get(14)?,
                        cache_hit: r.get(15)?,
                    })
                },
            )
            .optional()?)
        })
    }
}
