//! Idempotency records as a [`Ledger`](super::Ledger) keeps them (SPEC §8.2): the
//! final answer of a request that carried an `Idempotency-Key`, committed in the
//! same commit as its settlement, and the cross-instance lock that makes a repeat
//! wait for the first request.
//!
//! The [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) makes the records
//! and reads them; stores keep them until [`IdempotencyRecord::expires`] and purge
//! them after.

use bytes::Bytes;

/// One recorded answer: who asked (key id and idempotency key), what they sent (the
/// body's fingerprint), and what they got (status, the headers that identify the
/// answer, every body byte).
#[derive(Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The client key the record belongs to (records are never shared between keys).
    pub key_id: String,
    /// The client's `Idempotency-Key`.
    pub idem_key: String,
    /// The SHA-256 of the request (its path and its body as canonical JSON): a repeat
    /// with another one is refused with 422 `idempotency_key_reused`.
    pub fingerprint: [u8; 32],
    /// The HTTP status sent.
    pub status: u16,
    /// The headers replayed with the answer (`X-Request-Id`, `X-Provider`,
    /// `X-Model-Used`, `Content-Type`, …), in order, lower-case names.
    pub headers: Vec<(String, String)>,
    /// Every byte of the body (a stream's whole event stream, `[DONE]` included).
    pub body: Bytes,
    /// Unix seconds when it was recorded.
    pub created: u64,
    /// Unix seconds after which it is gone (`created + [idempotency].ttl_secs`).
    pub expires: u64,
}

impl std::fmt::Debug for IdempotencyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyRecord")
            .field("key_id", &self.key_id)
            .field("idem_key", &self.idem_key)
            .field("status", &self.status)
            .field("body_bytes", &self.body.len())
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl IdempotencyRecord {
    /// The headers as one JSON array of `[name, value]` pairs (how stores keep them).
    pub fn headers_json(&self) -> String {
        serde_json::to_string(&self.headers).unwrap_or_else(|_| "[]".into())
    }

    /// Headers kept as [`headers_json`](Self::headers_json) writes them (an
    /// unreadable value reads as none).
    pub fn headers_from_json(text: &str) -> Vec<(String, String)> {
        serde_json::from_str(text).unwrap_or_default()
    }

    /// Whether it is still kept at `now` (Unix seconds).
    pub fn live_at(&self, now: u64) -> bool {
        self.expires > now
    }
}

/// The right to run the first request of an idempotency key across instances, held
/// until dropped (see [`Ledger::idempotency_lock`](super::Ledger::idempotency_lock)).
/// A store that serves one process only hands out a lock that holds nothing: the
/// layer's own in-process claims are all it needs.
#[must_use = "the lock is released when dropped"]
pub struct IdempotencyLock(Option<Box<dyn FnOnce() + Send + Sync>>);

impl IdempotencyLock {
    /// A lock that holds nothing (one process: the in-process claim suffices).
    pub fn local() -> Self {
        IdempotencyLock(None)
    }

    /// A lock released by calling `release` (once, when dropped).
    pub fn new(release: impl FnOnce() + Send + Sync + 'static) -> Self {
        IdempotencyLock(Some(Box::new(release)))
    }
}

impl Drop for IdempotencyLock {
    fn drop(&mut self) {
        if let Some(release) = self.0.take() {
            release();
        }
    }
}

impl std::fmt::Debug for IdempotencyLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("IdempotencyLock")
            .field(&self.0.as_ref().map(|_| "held"))
            .finish()
    }
}

/// A record as a line of JSON (the SQLite ledger journal's, a PostgreSQL spill
/// file's): the fingerprint in hex, the body in base64; the key id is the line's
/// settlement's.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RecordLine {
    key: String,
    fp: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    created: u64,
    expires: u64,
}

impl RecordLine {
    pub(crate) fn of(r: &IdempotencyRecord) -> Self {
        use base64::Engine;
        RecordLine {
            key: r.idem_key.clone(),
            fp: hex::encode(r.fingerprint),
            status: r.status,
            headers: r.headers.clone(),
            body: base64::engine::general_purpose::STANDARD.encode(&r.body),
            created: r.created,
            expires: r.expires,
        }
    }

    /// The record again, or `None` when the line is damaged.
    pub(crate) fn into_record(self, key_id: &str) -> Option<IdempotencyRecord> {
        use base64::Engine;
        let mut fingerprint = [0u8; 32];
        hex::decode_to_slice(self.fp.as_bytes(), &mut fingerprint).ok()?;
        Some(IdempotencyRecord {
            key_id: key_id.to_owned(),
            idem_key: self.key,
            fingerprint,
            status: self.status,
            headers: self.headers,
            body: base64::engine::general_purpose::STANDARD
                .decode(self.body.as_bytes())
                .ok()?
                .into(),
            created: self.created,
            expires: self.expires,
        })
    }
}
