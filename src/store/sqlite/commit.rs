//! The transaction that brings a batch of journaled settlements into SQLite (the
//! applier's, and replay's at open): one row per request id, one spending update,
//! one day's token count and one day's spending per key.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{params, Connection};

use super::int;
use super::journal::{self, Entry};
#[cfg(test)]
use super::WriterConn;
use crate::money::Money;
use crate::store::StoreError;

/// [`commit`] on the writer connection, handing it straight to a thread waiting for
/// it when done (a fair unlock): the writer takes it again within microseconds,
/// which would starve the checkpointer of an unfair lock.
#[cfg(test)]
pub(super) fn commit_fair(
    conn: &WriterConn,
    batch: &[Arc<Entry>],
) -> Result<Vec<bool>, StoreError> {
    let mut guard = conn.lock();
    let result = commit(&mut guard, batch);
    parking_lot::MutexGuard::unlock_fair(guard);
    result
}

/// `BEGIN IMMEDIATE` (the write lock, up front), as a cached statement:
/// `Connection::transaction` parses it, and `COMMIT`, anew for every commit.
pub(super) fn begin(conn: &Connection) -> rusqlite::Result<()> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    Ok(())
}

/// One transaction for a batch; per entry, whether it charged (false: that
/// request id was committed before).
pub(super) fn commit(conn: &mut Connection, batch: &[Arc<Entry>]) -> Result<Vec<bool>, StoreError> {
    begin(conn)?;
    finish_commit(conn, batch)
}

/// The statements and `COMMIT` of the transaction [`begin`] opened; rolls it back on
/// failure.
pub(super) fn finish_commit(
    conn: &mut Connection,
    batch: &[Arc<Entry>],
) -> Result<Vec<bool>, StoreError> {
    let done = write_batch(conn, batch).and_then(|applied| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(applied)
    });
    if done.is_err() && !conn.is_autocommit() {
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!("ledger rollback failed: {e}");
        }
    }
    done
}

/// The statements of one batch, inside the transaction [`begin`] opened.
pub(super) fn write_batch(tx: &Connection, batch: &[Arc<Entry>]) -> Result<Vec<bool>, StoreError> {
    let mut applied = Vec::with_capacity(batch.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO settlements (request_id, key_id, amount_pico, model, provider, streamed,
               prompt_tokens, completion_tokens, latency_ms, ttft_ms, attempts, finish_reason, created,
               app_url, app_title, cache_hit)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?;
        // Checked in SQL too: a sum that would overflow updates nothing (and the
        // batch fails) instead of turning into a REAL (which the STRICT table would
        // refuse anyway). The ledger's bounds keep it far from there: see
        // `Writer::refusal`.
        let mut spend = tx.prepare_cached(
            "UPDATE keys SET spent_pico = spent_pico + ?1 WHERE id = ?2 AND spent_pico <= ?3 - ?1",
        )?;
        let mut key_exists = tx.prepare_cached("SELECT 1 FROM keys WHERE id = ?1")?;
        // A day's count saturates at i64::MAX (it is only compared with a limit).
        let mut tokens_stmt = tx.prepare_cached(
            "INSERT INTO daily_tokens (key_id, day, tokens) VALUES (?1, ?2, ?3)
             ON CONFLICT (key_id, day) DO UPDATE SET tokens = CASE
               WHEN tokens > 9223372036854775807 - excluded.tokens THEN 9223372036854775807
               ELSE tokens + excluded.tokens END",
        )?;
        // What each key spent each day: the periods of `limit_reset` are summed from it.
        let mut spend_day = tx.prepare_cached(
            "INSERT INTO daily_spend (key_id, day, spent_pico) VALUES (?1, ?2, ?3)
             ON CONFLICT (key_id, day) DO UPDATE SET spent_pico = spent_pico + excluded.spent_pico",
        )?;
        // One UPDATE and one UPSERT per key (and day) per batch, not per settlement:
        // a batch is usually many requests of few keys.
        let mut record = tx.prepare_cached(
            "INSERT OR REPLACE INTO idempotency (key_id, idem_key, fingerprint, request_id, status,
               headers, body, created, expires)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        let mut per_key: HashMap<(&str, u64), (Money, u64)> = HashMap::new();
        let mut attempts = Vec::with_capacity(128);
        for e in batch {
            let s = &e.settlement;
            let g = &s.generation;
            attempts.clear();
            journal::attempts_json(&mut attempts, &g.attempts);
            // JSON of `&str`s and integers: UTF-8 by construction.
            let attempts = std::str::from_utf8(&attempts).unwrap_or("[]");
            let n = insert.execute(params![
                g.id,
                s.key_id,
                g.total_cost.pico(),
                g.model,
                g.provider,
                g.streamed,
                int(g.prompt_tokens),
                int(g.completion_tokens),
                int(g.latency_ms),
                g.ttft_ms.map(int),
                attempts,
                g.finish_reason,
                int(g.created),
                g.app_url,
                g.app_title,
                g.cache_hit
            ])?;
            if n == 1 {
                // In the same transaction as its settlement (SPEC §8.2); a request id
                // settled before brings no record either.
                if let Some(r) = &e.record {
                    record.execute(params![
                        s.key_id,
                        r.idem_key,
                        &r.fingerprint[..],
                        g.id,
                        r.status,
                        r.headers_json(),
                        &r.body[..],
                        int(r.created),
                        int(r.expires)
                    ])?;
                }
                let entry = per_key.entry((&s.key_id, e.day)).or_default();
                entry.0 = entry.0.checked_add(g.total_cost).ok_or_else(|| {
                    StoreError(format!(
                        "the charges of key `{}` in one batch overflow; nothing of the batch was written",
                        s.key_id
                    ))
                })?;
                entry.1 = entry.1.saturating_add(s.tokens);
            }
            applied.push(n == 1);
        }
        for ((key_id, day), (cost, tokens)) in per_key {
            if spend.execute(params![cost.pico(), key_id, i64::MAX])? == 0
                && key_exists.exists([key_id])?
            {
                return Err(StoreError(format!(
                    "charging ${cost} to key `{key_id}` would overflow its spending; nothing of the batch was written"
                )));
            }
            if tokens > 0 {
                tokens_stmt.execute(params![key_id, int(day), int(tokens)])?;
            }
            if cost > Money::ZERO {
                spend_day.execute(params![key_id, int(day), cost.pico()])?;
            }
        }
    }
    Ok(applied)
}
