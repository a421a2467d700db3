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
    utc_day, Balance, Generation, GenerationAttempt, Ledger, Reservation, Settlement, StoreError,
};

impl SqliteStore {
    /// [`Ledger::reserve`], decided here and now (the accounts are in memory).
    pub fn reserve(&self, key: &KeyRecord, hold: Reservation) -> Result<(), GatewayError> {
        let acc = self.account(&key.id)?;
        match Self::try_reserve(&acc, key, hold) {
            Err(GatewayError::InsufficientCredits(_)) => {
                // Before refusing: a top-up made by another process (the CLI) is in the
                // database, not yet in memory. Credits only grow, so this is the only
                // way memory can be behind.
                self.refresh_credits(&key.id)?;
                Self::try_reserve(&acc, key, hold)
            }
            other => other,
        }
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
        let a = acc.lock().unwrap_or_else(|e| e.into_inner());
        Ok(if a.day == utc_day() { a.day_tokens } else { 0 })
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
                        cache_hit
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
                        cache_hit: r.get(13)?,
                    })
                },
            )
            .optional()?)
        })
    }
}
