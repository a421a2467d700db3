//! The in-memory accounts: one per key, loaded on its first use, and admission
//! (reserve) under the key's own lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use rusqlite::{params, OptionalExtension};

use super::{money, SqliteStore};
use crate::clock::{month_start, week_start};
use crate::error::GatewayError;
use crate::keys::{KeyRecord, LimitReset};
use crate::money::Money;
use crate::store::{PeriodUsage, Reservation, StoreError, StoredKey};

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
    /// What was spent in the periods of the last settlement (or of the load).
    pub(super) periods: Periods,
}

/// A key's spending in its current UTC day, week and month, by [`LimitReset::ALL`]:
/// each period's first day and what was committed in it. A settlement of a later
/// period starts that period over; one of an earlier period (journaled before
/// midnight, applied after) counts in none of the current ones.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Periods {
    /// The latest day seen: `starts` are its periods' (the fast path of every
    /// settlement and admission of the day).
    day: u64,
    starts: [u64; 3],
    spent: [Money; 3],
}

impl Periods {
    /// The periods of UTC day `today`, with what was spent in each.
    pub(super) fn new(today: u64, spent: [Money; 3]) -> Periods {
        Periods {
            day: today,
            starts: LimitReset::ALL.map(|r| r.period_start(today)),
            spent,
        }
    }

    /// `cost` committed on UTC day `day`.
    pub(super) fn add(&mut self, day: u64, cost: Money) {
        if day == self.day {
            for s in &mut self.spent {
                *s = s.checked_add(cost).unwrap_or(*s);
            }
            return;
        }
        self.day = self.day.max(day);
        for (i, r) in LimitReset::ALL.iter().enumerate() {
            let start = r.period_start(day);
            if start > self.starts[i] {
                self.starts[i] = start;
                self.spent[i] = cost;
            } else if start == self.starts[i] {
                self.spent[i] = self.spent[i].checked_add(cost).unwrap_or(self.spent[i]);
            }
        }
    }

    /// `cost` of UTC day `day` taken back (a repeat SQLite already had).
    pub(super) fn sub(&mut self, day: u64, cost: Money) {
        for (i, r) in LimitReset::ALL.iter().enumerate() {
            if r.period_start(day) == self.starts[i] {
                self.spent[i] = (self.spent[i] - cost).max(Money::ZERO);
            }
        }
    }

    /// What was spent in the periods that hold UTC day `today` (0 in a period that
    /// has seen no settlement yet).
    pub(super) fn at(&self, today: u64) -> PeriodUsage {
        let [daily, weekly, monthly] = std::array::from_fn(|i| {
            if today == self.day || LimitReset::ALL[i].period_start(today) == self.starts[i] {
                self.spent[i]
            } else {
                Money::ZERO
            }
        });
        PeriodUsage {
            daily,
            weekly,
            monthly,
        }
    }
}

/// What `key_id` spent in the day, week and month of UTC day `today`, from
/// `daily_spend` (days of a later period, written under a clock that was ahead, count
/// in none of them).
pub(super) fn periods_from_db(
    c: &rusqlite::Connection,
    key_id: &str,
    today: u64,
) -> Result<Periods, StoreError> {
    let from = week_start(today).min(month_start(today));
    let mut stmt = c.prepare_cached(
        "SELECT day, spent_pico FROM daily_spend WHERE key_id = ?1 AND day >= ?2",
    )?;
    let rows = stmt.query_map(params![key_id, super::int(from)], |r| {
        Ok((r.get::<_, i64>(0)?.max(0) as u64, money(r.get(1)?)))
    })?;
    let mut spent = [Money::ZERO; 3];
    for row in rows {
        let (day, amount) = row?;
        for (i, r) in LimitReset::ALL.iter().enumerate() {
            if r.period_start(day) == r.period_start(today) {
                spent[i] = spent[i].checked_add(amount).unwrap_or(spent[i]);
            }
        }
    }
    Ok(Periods::new(today, spent))
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
        let day = self.clock().day();
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
            let periods = periods_from_db(c, key_id, day)?;
            Ok(row.map(|(credits, spent)| Account {
                credits: money(credits),
                spent: money(spent),
                reserved: Money::ZERO,
                reserved_tokens: 0,
                day,
                day_tokens: tokens.unwrap_or(0) as u64,
                periods,
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

    /// Holds `hold` under the key's lock at Unix seconds `now` (read only by the
    /// rules of the day: a key without them may pass 0): the `tokens_per_day`
    /// check (429), then credits and `limit_usd` (402; with `limit_reset`, what is
    /// left of it in the current period), then both amounts are added to what is
    /// held.
    pub(super) fn try_reserve(
        acc: &Mutex<Account>,
        key: &KeyRecord,
        hold: Reservation,
        now: u64,
    ) -> Result<(), GatewayError> {
        let today = crate::clock::utc_day(now);
        let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(limit) = key.tokens_per_day {
            let used = if a.day == today { a.day_tokens } else { 0 };
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
                    retry_after: Some(std::time::Duration::from_secs(86_400 - now % 86_400)),
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
            let spent = match key.limit_reset {
                Some(r) => a.periods.at(today).of(r),
                None => a.spent,
            };
            let left = limit - spent - a.reserved;
            if amount > left {
                return Err(crate::store::limit_refusal(key, limit, left, amount));
            }
        }
        a.reserved = a.reserved + amount;
        a.reserved_tokens = a.reserved_tokens.saturating_add(hold.tokens);
        Ok(())
    }
}
