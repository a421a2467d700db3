//! The [`KeyStore`] impl of [`SqliteStore`]: key rows in and out of SQLite.

use rusqlite::{params, OptionalExtension};

use super::{money, SqliteStore};
use crate::keys::{KeyRecord, Labels, LimitReset};
use crate::money::{Money, MAX_CREDITS};
use crate::store::{
    new_key_id, now_unix, KeyPatch, KeyStore, NewKey, SecretHash, StoreError, StoredKey,
};

/// Refuses credits or a limit outside `0..=`[`MAX_CREDITS`] (callers validate first;
/// this keeps the store's own bound whoever calls it).
pub(super) fn check_amounts(credits: Money, limit: Option<Money>) -> Result<(), StoreError> {
    if !credits.within(MAX_CREDITS) || limit.is_some_and(|l| !l.within(MAX_CREDITS)) {
        return Err(StoreError(format!(
            "credits and limits must be from $0 to ${MAX_CREDITS}"
        )));
    }
    Ok(())
}

pub(super) fn row_to_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredKey> {
    let models: Option<String> = r.get("models")?;
    let record = KeyRecord {
        id: r.get("id")?,
        name: r.get("name")?,
        disabled: r.get::<_, i64>("disabled")? != 0,
        limit: r.get::<_, Option<i64>>("limit_pico")?.map(money),
        rpm: r.get::<_, Option<i64>>("rpm")?.map(|v| v as u32),
        tokens_per_day: r.get::<_, Option<i64>>("tokens_per_day")?.map(|v| v as u64),
        models: models.and_then(|m| serde_json::from_str(&m).ok()),
        limit_reset: r
            .get::<_, Option<String>>("limit_reset")?
            .and_then(|v| v.parse().ok()),
        expires_at: r
            .get::<_, Option<i64>>("expires_at")?
            .map(|v| v.max(0) as u64),
        labels: labels_from(r.get("labels")?),
        deleted_at: r
            .get::<_, Option<i64>>("deleted_at")?
            .map(|v| v.max(0) as u64),
        secret_expires_at: None,
    };
    Ok(StoredKey {
        record,
        created: r.get::<_, i64>("created")? as u64,
        credits: money(r.get("credits_pico")?),
        spent: money(r.get("spent_pico")?),
    })
}

pub(super) const KEY_COLUMNS: &str = "id, name, created, disabled, credits_pico, spent_pico, limit_pico, rpm, tokens_per_day, models, limit_reset, expires_at, labels, deleted_at";

/// Labels as stored: a JSON object, `NULL` when there are none.
pub(super) fn labels_json(l: &Labels) -> Option<String> {
    (!l.is_empty()).then(|| serde_json::to_string(l).unwrap_or_default())
}

/// Labels from their stored JSON.
pub(super) fn labels_from(v: Option<String>) -> Labels {
    v.and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default()
}

/// `limit_reset` as stored.
pub(super) fn reset_text(r: Option<LimitReset>) -> Option<&'static str> {
    r.map(LimitReset::as_str)
}

/// `expires_at` as stored (Unix seconds).
pub(super) fn expiry(t: Option<u64>) -> Option<i64> {
    t.map(super::int)
}

pub(super) fn models_json(m: &Option<Vec<String>>) -> Option<String> {
    m.as_ref()
        .map(|m| serde_json::to_string(m).unwrap_or_default())
}

impl KeyStore for SqliteStore {
    fn find(&self, hash: &SecretHash) -> Result<Option<KeyRecord>, StoreError> {
        let now = super::int(self.now());
        self.with_conn(|c| {
            // The current secret, or one a rotation replaced whose grace has not ended.
            Ok(c.query_row(
                &format!(
                    "SELECT {KEY_COLUMNS}, CASE WHEN secret_sha256 = ?1 THEN NULL ELSE old_secret_until END AS grace
                       FROM keys WHERE secret_sha256 = ?1
                     UNION ALL
                     SELECT {KEY_COLUMNS}, old_secret_until FROM keys
                      WHERE old_secret_sha256 = ?1 AND old_secret_until > ?2
                     LIMIT 1"
                ),
                params![&hash[..], now],
                |r| {
                    let mut k = row_to_key(r)?;
                    k.record.secret_expires_at =
                        r.get::<_, Option<i64>>("grace")?.map(|v| v.max(0) as u64);
                    Ok(k)
                },
            )
            .optional()?
            .map(|k| k.record))
        })
    }

    fn get(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        let key = self.with_conn(|c| {
            Ok(c.query_row(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE id=?1"),
                [id],
                row_to_key,
            )
            .optional()?)
        })?;
        Ok(key.map(|k| self.with_account(k)))
    }

    fn list(&self) -> Result<Vec<StoredKey>, StoreError> {
        let keys = self.with_conn(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {KEY_COLUMNS} FROM keys ORDER BY created, rowid"
            ))?;
            let rows = stmt.query_map([], row_to_key)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })?;
        Ok(keys.into_iter().map(|k| self.with_account(k)).collect())
    }

    fn create(&self, hash: SecretHash, new: NewKey) -> Result<StoredKey, StoreError> {
        check_amounts(new.credits, new.limit)?;
        let id = new_key_id();
        let created = now_unix();
        self.with_conn(|c| {
            c.execute(
                "INSERT INTO keys (id, secret_sha256, name, created, disabled, credits_pico, spent_pico, limit_pico, rpm, tokens_per_day, models, limit_reset, expires_at, labels)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5, 0, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    id,
                    &hash[..],
                    new.name,
                    created as i64,
                    new.credits.pico(),
                    new.limit.map(Money::pico),
                    new.rpm,
                    new.tokens_per_day.map(|t| t as i64),
                    models_json(&new.models),
                    reset_text(new.limit_reset),
                    expiry(new.expires_at),
                    labels_json(&new.labels)
                ],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    StoreError("a key with this secret already exists".into())
                }
                e => e.into(),
            })?;
            Ok(())
        })?;
        Ok(new.into_stored(id, created))
    }

    fn update(&self, id: &str, patch: &KeyPatch) -> Result<Option<StoredKey>, StoreError> {
        self.with_conn(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let Some(mut key) = tx
                .query_row(
                    &format!("SELECT {KEY_COLUMNS} FROM keys WHERE id=?1"),
                    [id],
                    row_to_key,
                )
                .optional()?
            else {
                return Ok(None);
            };
            patch.apply(&mut key.record);
            let r = &key.record;
            tx.execute(
                "UPDATE keys SET name=?1, disabled=?2, limit_pico=?3, rpm=?4, tokens_per_day=?5, models=?6, limit_reset=?7, expires_at=?8, labels=?10, deleted_at=?11 WHERE id=?9",
                params![
                    r.name,
                    r.disabled,
                    r.limit.map(Money::pico),
                    r.rpm,
                    r.tokens_per_day.map(|t| t as i64),
                    models_json(&r.models),
                    reset_text(r.limit_reset),
                    expiry(r.expires_at),
                    id,
                    labels_json(&r.labels),
                    expiry(r.deleted_at)
                ],
            )?;
            tx.commit()?;
            Ok(Some(key))
        })
        .map(|k| k.map(|k| self.with_account(k)))
    }

    fn rotate(
        &self,
        id: &str,
        hash: SecretHash,
        grace_until: Option<u64>,
    ) -> Result<Option<StoredKey>, StoreError> {
        self.with_conn(|c| {
            // The old secret becomes the one found until `grace_until` (none: from
            // now on it finds nothing); a secret rotated out before is forgotten.
            let changed = c
                .execute(
                    "UPDATE keys SET old_secret_sha256 = CASE WHEN ?3 IS NULL THEN NULL ELSE secret_sha256 END,
                                     old_secret_until = ?3, secret_sha256 = ?2
                      WHERE id = ?1",
                    params![id, &hash[..], expiry(grace_until)],
                )
                .map_err(|e| match e {
                    rusqlite::Error::SqliteFailure(f, _)
                        if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        StoreError("a key with this secret already exists".into())
                    }
                    e => e.into(),
                })?;
            Ok(changed)
        })?;
        self.get(id)
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|c| {
            c.query_row("SELECT count(*) FROM keys", [], |_| Ok(()))?;
            Ok(())
        })
    }
}
