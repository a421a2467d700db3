//! The in-memory accounts: one per key, loaded on its first use, and admission
//! (reserve) under the key's own lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use rusqlite::{params, OptionalExtension};

use super::{money, SqliteStore};
use crate::error::GatewayError;
use crate::keys::KeyRecord;
use crate::money::Money;
use crate::store::{utc_day, Reservation, StoreError, StoredKey};

/// One key's money, in memory; changed only under its own lock.
#[derive(Debug, Default)]
pub(super) struct Account {
    pub(super) credits: Money,
    pub(super) spent: Money,
    pub(super) reserved: Money,
    /// Tokens held by requests in flight (against `tokens_per_day`).
    pub(super) reserved_tokens: u64,
    pub(super) day: u64,
    pub(super) day_tokens: u64,
}

pub(super) type Accounts = RwLock<HashMap<String, Arc<Mutex<Account>>>>;

impl SqliteStore {
    /// A stored key with the spending this process knows of: its in-memory account
    /// is ahead of the row by what is journaled and not applied yet.
    pub(super) fn with_account(&self, mut key: StoredKey) -> StoredKey {
        if let Some(acc) = self
            .accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key.record.id)
        {
            let a = acc.lock().unwrap_or_else(|e| e.into_inner());
            key.spent = key.spent.max(a.spent);
            key.credits = key.credits.max(a.credits);
        }
        key
    }

    /// The account of `key_id`, loaded from the database on first use.
    pub(super) fn account(&self, key_id: &str) -> Result<Arc<Mutex<Account>>, StoreError> {
        if let Some(a) = self
            .accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key_id)
        {
            return Ok(a.clone());
        }
        // First use. No settlement of this key can be in flight (settling needs a
        // reservation, which needs the account), so the row read here is current.
        let day = utc_day();
        let loaded = self.with_conn(|c| {
            let row = c
                .query_row(
                    "SELECT credits_pico, spent_pico FROM keys WHERE id=?1",
                    [key_id],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                )
                .optional()?;
            let tokens: Option<i64> = c
                .query_row(
                    "SELECT tokens FROM daily_tokens WHERE key_id=?1 AND day=?2",
                    params![key_id, day as i64],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(row.map(|(credits, spent)| Account {
                credits: money(credits),
                spent: money(spent),
                reserved: Money::ZERO,
                reserved_tokens: 0,
                day,
                day_tokens: tokens.unwrap_or(0) as u64,
            }))
        })?;
        let account =
            loaded.ok_or_else(|| StoreError(format!("no key `{key_id}` in the store")))?;
        let mut map = self.accounts.write().unwrap_or_else(|e| e.into_inner());
        Ok(map
            .entry(key_id.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(account)))
            .clone())
    }

    /// Re-reads a key's credits (they only grow, so the larger value is current).
    pub(super) fn refresh_credits(&self, key_id: &str) -> Result<(), StoreError> {
        let credits: Option<i64> = self.with_conn(|c| {
            Ok(
                c.query_row("SELECT credits_pico FROM keys WHERE id=?1", [key_id], |r| {
                    r.get(0)
                })
                .optional()?,
            )
        })?;
        if let (Some(credits), Some(acc)) = (
            credits,
            self.accounts
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(key_id),
        ) {
            let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
            a.credits = a.credits.max(money(credits));
        }
        Ok(())
    }

    /// Holds `hold` under the key's lock: the `tokens_per_day` check (429), then
    /// credits and `limit_usd` (402), then both amounts are added to what is held.
    pub(super) fn try_reserve(
        acc: &Mutex<Account>,
        key: &KeyRecord,
        hold: Reservation,
    ) -> Result<(), GatewayError> {
        let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(limit) = key.tokens_per_day {
            let used = if a.day == utc_day() { a.day_tokens } else { 0 };
            let held = used.saturating_add(a.reserved_tokens);
            if held.saturating_add(hold.tokens) > limit {
                let message = if hold.tokens > limit {
                    format!(
                        "key `{}` may use {limit} tokens a day (UTC) and this request may use up to {} (prompt + max_tokens × n); lower max_tokens or n",
                        key.name, hold.tokens
                    )
                } else {
                    format!(
                        "key `{}` has used {used} of its {limit} tokens for today (UTC), {} more are held by requests in flight, and this request may use up to {}; it resets at midnight UTC",
                        key.name, a.reserved_tokens, hold.tokens
                    )
                };
                return Err(GatewayError::RateLimited {
                    message,
                    retry_after: Some(super::until_utc_midnight()),
                });
            }
        }
        let amount = hold.amount;
        let available = a.credits - a.spent - a.reserved;
        if amount > available {
            return Err(GatewayError::InsufficientCredits(format!(
                "key `{}` has ${} of credit available (after requests in flight); this request may cost up to ${amount}. Add credits or lower max_tokens",
                key.name,
                available.max(Money::ZERO)
            )));
        }
        if let Some(limit) = key.limit {
            let left = limit - a.spent - a.reserved;
            if amount > left {
                return Err(GatewayError::InsufficientCredits(format!(
                    "key `{}` has ${} left of its ${limit} spending limit; this request may cost up to ${amount}. Raise limit_usd or lower max_tokens",
                    key.name,
                    left.max(Money::ZERO)
                )));
            }
        }
        a.reserved = a.reserved + amount;
        a.reserved_tokens = a.reserved_tokens.saturating_add(hold.tokens);
        Ok(())
    }
}
