//! Idempotency records in PostgreSQL (SPEC §8.2): read with a `SELECT`, written by
//! the statement that commits their settlement (`writer::statement`), purged every
//! minute by every instance, and the cross-instance lock that lets one instance at a
//! time run the first request of a key.
//!
//! The lock is a session-level advisory lock (`pg_try_advisory_lock`) on the hash
//! of (client key id, idempotency key), held on ONE connection of the instance's own
//! (not the pool's) for all of its requests in flight: released with
//! `pg_advisory_unlock` when the request's answer is committed (or not), and by
//! PostgreSQL itself the moment the connection dies, so a SIGKILLed instance
//! holds nothing. A lock is taken only by the instance's one in-process claim
//! holder of that key (the layer's own claims), so the session's re-entrancy never
//! lets two requests of one key in. If that connection is lost while requests
//! hold locks, those locks are gone: a repeat on another instance may then run
//! instead of waiting (it is still refused if its body differs, once the first is
//! recorded).

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_postgres::NoTls;

use super::{Op, Shared};
use crate::store::{IdempotencyLock, IdempotencyRecord, StoreError};

/// How often each instance deletes expired records.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// The instance's lock connection, made on first use and again after it is lost.
#[derive(Default)]
pub(super) struct Locks {
    conn: tokio::sync::Mutex<Option<LockConn>>,
}

struct LockConn {
    client: Arc<tokio_postgres::Client>,
    /// Which connection this is (locks are released only on the one that took them).
    generation: u64,
}

/// The advisory lock id of a client key's idempotency key.
fn lock_id(key_id: &str, idem_key: &str) -> i64 {
    let mut h = Sha256::new();
    h.update(b"switchboard-idempotency\0");
    h.update(key_id.as_bytes());
    h.update([0]);
    h.update(idem_key.as_bytes());
    let d = h.finalize();
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

impl Shared {
    /// The record of `idem_key` of key `key_id` still kept at `now`.
    pub(super) async fn idempotency_record(
        self: &Arc<Self>,
        key_id: &str,
        idem_key: &str,
        now: u64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let client = self.client().await?;
        let stmt = self
            .prepare(
                &client,
                "SELECT fingerprint, status, headers, body, created, expires FROM sb_idempotency
                 WHERE key_id = $1 AND idem_key = $2 AND expires > $3",
            )
            .await?;
        self.count(Op::Idempotency);
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        let row = client
            .query_opt(&stmt, &[&key_id, &idem_key, &now])
            .await
            .map_err(|e| self.error(e))?;
        Ok(row.map(|r| {
            let fp: Vec<u8> = r.get(0);
            let headers: String = r.get(2);
            let body: Vec<u8> = r.get(3);
            IdempotencyRecord {
                key_id: key_id.to_string(),
                idem_key: idem_key.to_string(),
                // A fingerprint of another length never matches a request's.
                fingerprint: fp.try_into().unwrap_or([0; 32]),
                status: u16::try_from(r.get::<_, i32>(1)).unwrap_or(500),
                headers: IdempotencyRecord::headers_from_json(&headers),
                body: body.into(),
                created: r.get::<_, i64>(4).max(0) as u64,
                expires: r.get::<_, i64>(5).max(0) as u64,
            }
        }))
    }

    /// Deletes the records expired at `now`; how many.
    pub(super) async fn purge_idempotency(self: &Arc<Self>, now: u64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        self.count(Op::Idempotency);
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        client
            .execute("DELETE FROM sb_idempotency WHERE expires <= $1", &[&now])
            .await
            .map_err(|e| self.error(e))
    }

    /// The lock connection (connecting it first if need be).
    async fn lock_conn(self: &Arc<Self>) -> Result<(Arc<tokio_postgres::Client>, u64), StoreError> {
        let mut conn = self.locks.conn.lock().await;
        if let Some(c) = conn.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok((c.client.clone(), c.generation));
        }
        let (client, connection) = self
            .pg_config
            .connect(NoTls)
            .await
            .map_err(|e| self.error(e))?;
        self.handle.spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!("the idempotency lock connection to PostgreSQL ended: {e}");
            }
        });
        let generation = conn.as_ref().map_or(1, |c| c.generation + 1);
        let client = Arc::new(client);
        *conn = Some(LockConn {
            client: client.clone(),
            generation,
        });
        Ok((client, generation))
    }

    /// Tries to take the lock of `idem_key` of key `key_id`; `None` while another
    /// instance holds it.
    pub(super) async fn idempotency_lock(
        self: &Arc<Self>,
        key_id: &str,
        idem_key: &str,
    ) -> Result<Option<IdempotencyLock>, StoreError> {
        let id = lock_id(key_id, idem_key);
        let (client, generation) = self.lock_conn().await?;
        self.count(Op::Idempotency);
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&id])
            .await
            .map_err(|e| self.error(e))?;
        if !row.get::<_, bool>(0) {
            return Ok(None);
        }
        let shared = self.clone();
        Ok(Some(IdempotencyLock::new(move || {
            let s = shared.clone();
            shared
                .handle
                .spawn(async move { s.unlock(id, generation).await });
        })))
    }

    /// Releases a lock taken on connection `generation` (gone with it otherwise).
    async fn unlock(self: &Arc<Self>, id: i64, generation: u64) {
        let client = {
            let conn = self.locks.conn.lock().await;
            match conn.as_ref() {
                Some(c) if c.generation == generation && !c.client.is_closed() => c.client.clone(),
                _ => return,
            }
        };
        self.count(Op::Idempotency);
        if let Err(e) = client
            .query_one("SELECT pg_advisory_unlock($1)", &[&id])
            .await
        {
            // The connection is broken: PostgreSQL has let go of its locks.
            tracing::warn!("cannot release an idempotency lock: {e}");
        }
    }
}

/// Deletes expired records every [`PURGE_EVERY`] (any instance may; the statement is
/// cheap on the `expires` index), until the store closes.
pub(super) async fn purge_forever(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(PURGE_EVERY).await;
        if shared.closing.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        match shared.purge_idempotency(crate::store::now_unix()).await {
            Ok(n @ 1..) => tracing::debug!("purged {n} expired idempotency record(s)"),
            Ok(_) => {}
            Err(e) => tracing::debug!("cannot purge expired idempotency records now: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lock_id;

    #[test]
    fn lock_ids_differ_by_key_and_by_idempotency_key() {
        let a = lock_id("key_1", "order-1");
        assert_eq!(a, lock_id("key_1", "order-1"));
        assert_ne!(a, lock_id("key_2", "order-1"));
        assert_ne!(a, lock_id("key_1", "order-2"));
        // The separator keeps ("ab", "c") apart from ("a", "bc").
        assert_ne!(lock_id("ab", "c"), lock_id("a", "bc"));
    }
}

#[cfg(test)]
mod pg_tests {
    use super::super::tests::{config, make_key, money_hold, settlement, spent_of, usd};
    use super::super::*;
    use crate::store::IdempotencyRecord;
    use crate::testing::postgres;

    async fn open(url: &str) -> Arc<PgStore> {
        let c = config(url, 30);
        tokio::task::spawn_blocking(move || PgStore::open(&c).unwrap())
            .await
            .unwrap()
    }

    fn record(key_id: &str, idem: &str, body: &'static [u8], expires: u64) -> IdempotencyRecord {
        IdempotencyRecord {
            key_id: key_id.into(),
            idem_key: idem.into(),
            fingerprint: [3; 32],
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: bytes::Bytes::from_static(body),
            created: 100,
            expires,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_commit_with_their_settlement_once_and_expire() {
        let Some(db) = postgres("pg_records_commit_with_their_settlement_once") else {
            return;
        };
        let store = open(db.url()).await;
        assert!(store.keeps_idempotency_records());
        let key = make_key(&store, "rec", NewKey::new("rec", usd("1")));
        let hold = money_hold("0.01");
        Ledger::reserve(&*store, &key, hold).await.unwrap();
        let first = record(&key.id, "k-1", b"first", 1_000);
        assert!(store
            .settle_recorded(
                settlement(&key.id, "g-1", usd("0.002"), hold, 4),
                first.clone()
            )
            .await
            .unwrap());
        assert_eq!(
            store.idempotency_record(&key.id, "k-1", 999).await.unwrap(),
            Some(first.clone())
        );
        assert!(store
            .idempotency_record(&key.id, "k-1", 1_000)
            .await
            .unwrap()
            .is_none());
        assert!(store
            .idempotency_record("key_other", "k-1", 999)
            .await
            .unwrap()
            .is_none());
        // The same request id again: not charged, and its (other) record not written.
        assert!(!store
            .settle_recorded(
                settlement(&key.id, "g-1", usd("0.002"), Reservation::NONE, 4),
                record(&key.id, "k-1", b"second", 1_000),
            )
            .await
            .unwrap());
        assert_eq!(
            store.idempotency_record(&key.id, "k-1", 999).await.unwrap(),
            Some(first)
        );
        let (s, id) = (store.clone(), key.id.clone());
        let spent = tokio::task::spawn_blocking(move || spent_of(&s, &id))
            .await
            .unwrap();
        assert_eq!(spent, usd("0.002"));
        // A batch where two settlements carry a record of one key: the last wins,
        // and the batch commits.
        let a = settlement(&key.id, "g-2", usd("0.001"), Reservation::NONE, 2);
        let b = settlement(&key.id, "g-3", usd("0.001"), Reservation::NONE, 2);
        let ra = record(&key.id, "k-2", b"a", 5_000);
        let rb = record(&key.id, "k-2", b"b", 5_000);
        let rows = [(&a, Some(&ra)), (&b, Some(&rb))];
        let committed = super::super::writer::statement(&store.shared, &rows, None, false)
            .await
            .ok()
            .expect("committed");
        assert_eq!(committed.inserted.len(), 2);
        assert_eq!(
            store
                .idempotency_record(&key.id, "k-2", 10)
                .await
                .unwrap()
                .unwrap()
                .body,
            &b"b"[..]
        );
        assert_eq!(store.purge_idempotency(1_000).await.unwrap(), 1);
        assert_eq!(store.purge_idempotency(1_000).await.unwrap(), 0);
        assert!(store
            .idempotency_record(&key.id, "k-2", 10)
            .await
            .unwrap()
            .is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_instance_at_a_time_holds_a_key_and_a_dead_one_holds_nothing() {
        let Some(db) = postgres("pg_one_instance_at_a_time_holds_an_idempotency_key") else {
            return;
        };
        let a = open(db.url()).await;
        let b = open(db.url()).await;
        let held = a
            .idempotency_lock("key_1", "k")
            .await
            .unwrap()
            .expect("free");
        assert!(b.idempotency_lock("key_1", "k").await.unwrap().is_none());
        // Other keys are free.
        let other = b.idempotency_lock("key_1", "k2").await.unwrap();
        assert!(other.is_some());
        drop(held);
        // Released on the lock connection, asynchronously: B gets it soon.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let again = loop {
            if let Some(l) = b.idempotency_lock("key_1", "k").await.unwrap() {
                break l;
            }
            assert!(std::time::Instant::now() < deadline, "never released");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(a.idempotency_lock("key_1", "k").await.unwrap().is_none());
        // B dies holding it: its connection goes, and PostgreSQL frees the lock.
        std::mem::forget(again);
        tokio::task::spawn_blocking(move || {
            let mut store = Arc::into_inner(b).expect("the only handle");
            store.shared.closing.store(true, Ordering::Relaxed);
            if let Some(rt) = store.runtime.take() {
                rt.shutdown_background();
            }
        })
        .await
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while a.idempotency_lock("key_1", "k").await.unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "a dead instance's lock stayed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
