//! [`CacheKey`]: what makes two requests identical (SPEC §8.1).

use serde_json::Value;
use sha2::{Digest, Sha256};

/// From this many bytes of canonical text on, a key is hashed with BLAKE3, below
/// with SHA-256 (`cargo bench --bench cache_store -- --quick key_hash`: SHA-256 costs
/// ≈ 0.77 µs a KB here, BLAKE3 ≈ 1.0 µs up to 2 KB and 2.9 µs for 16 KB; a 49-KB
/// conversation's key was half SHA-256; BENCHMARKS.md, twentieth session). The two
/// are told apart by the tag hashed first (`v1`, `v2`), so a key never depends on
/// anything but the request, and the keys of short bodies are those stored before.
const BLAKE3_FROM: usize = 2048;

/// The hash of a request's identity: the client key's id, the endpoint (the path,
/// `/api/v1/…` the same as `/v1/…`), the model as requested, the stream mode and the
/// body as canonical JSON (object keys sorted, no whitespace), so key order and
/// whitespace do not matter. SHA-256, or BLAKE3 from 2 KB of canonical text (faster
/// on long prompts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheKey(pub [u8; 32]);

/// A digest is already uniform: its first 8 bytes are the hash (the crate's `KeyHasher`).
impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// The hasher of maps keyed by [`CacheKey`]: the key's own first 8 bytes, no
/// SipHash over them (a SHA-256 or BLAKE3 digest needs no second hash, and nobody can
/// aim at a bucket without breaking them). In a profile of all-miss traffic with the
/// cache full, SipHash of the keys (lookups, inserts and moka's rehashing of its
/// table as entries come and go) was ≈ 3 % of the gateway's samples.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    /// Not reached by [`CacheKey`]; folds any other input (FNV-1a) so it stays a hash.
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Builds [`KeyHasher`]s.
pub(crate) type KeyHash = std::hash::BuildHasherDefault<KeyHasher>;

impl CacheKey {
    /// The key of a request whose body parsed to `body`.
    pub fn new(key_id: &str, path: &str, body: &Value) -> CacheKey {
        let model = body.get("model").and_then(Value::as_str).unwrap_or("");
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let mut canonical = Vec::with_capacity(256);
        write_canonical(body, &mut canonical);
        CacheKey::of_canonical(key_id, path, model, stream, &canonical)
    }

    /// The key of a request whose body is the JSON object `body` (raw bytes). `None`
    /// when `body` is not a JSON object (not cacheable). The same key as
    /// [`new`](Self::new) of its parsed value, without building that value.
    pub fn of_body(key_id: &str, path: &str, body: &[u8]) -> Option<(CacheKey, TopLevel)> {
        let mut canonical = Vec::with_capacity(body.len());
        let top = canonicalize(body, &mut canonical).ok()?;
        if !top.object {
            return None;
        }
        let model = top.model.as_deref().unwrap_or("");
        let key = CacheKey::of_canonical(key_id, path, model, top.stream, &canonical);
        Some((key, top))
    }

    fn of_canonical(
        key_id: &str,
        path: &str,
        model: &str,
        stream: bool,
        canonical: &[u8],
    ) -> CacheKey {
        let path = path.strip_prefix("/api").unwrap_or(path);
        // Each part is length-prefixed: no two different tuples hash the same input.
        let parts = |tag: &[u8], update: &mut dyn FnMut(&[u8])| {
            for part in [
                tag,
                key_id.as_bytes(),
                path.as_bytes(),
                model.as_bytes(),
                if stream { b"stream" } else { b"json" },
            ] {
                update(&(part.len() as u64).to_be_bytes());
                update(part);
            }
            update(canonical);
        };
        if canonical.len() < BLAKE3_FROM {
            let mut h = Sha256::new();
            parts(b"switchboard-cache-v1", &mut |b| h.update(b));
            CacheKey(h.finalize().into())
        } else {
            let mut h = blake3::Hasher::new();
            parts(b"switchboard-cache-v2", &mut |b| {
                h.update(b);
            });
            CacheKey(*h.finalize().as_bytes())
        }
    }

    /// Lowercase hex (the Redis key's suffix).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

use crate::canonical::canonicalize;
pub use crate::canonical::write_canonical;
pub use crate::canonical::TopLevel;

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, path: &str, body: &str) -> CacheKey {
        CacheKey::new(id, path, &serde_json::from_str(body).unwrap())
    }

    /// A short body's key is the SHA-256 it always was (keys stored before stay
    /// valid; the expected value computed apart, with Python's `hashlib`).
    #[test]
    fn a_short_body_keeps_its_sha256_key() {
        let k = key(
            "k1",
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_eq!(
            k.hex(),
            "9891a306ad1d6e4118f8bd6d545705055596860a6c6fd830ec3a51ca105a9af7"
        );
    }

    /// From 2 KB of canonical text the key is BLAKE3's: key order and whitespace
    /// still do not matter, every byte of content does, and a long body's key is not
    /// the short body's hash (the tag differs).
    #[test]
    fn a_long_body_has_a_blake3_key_with_the_same_rules() {
        let text = "a line of a long prompt\\n".repeat(120);
        let body = |extra: &str| {
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{text}{extra}"}}]}}"#)
        };
        let spaced = format!(
            r#"{{ "messages" : [ {{ "content": "{text}", "role": "user" }} ], "model": "m" }}"#
        );
        let long = key("k1", "/v1/chat/completions", &body(""));
        assert!(body("").len() > super::BLAKE3_FROM);
        assert_eq!(long, key("k1", "/v1/chat/completions", &spaced));
        assert_ne!(long, key("k1", "/v1/chat/completions", &body("!")));
        assert_ne!(long, key("k2", "/v1/chat/completions", &body("")));
        let mut canonical = Vec::new();
        write_canonical(&serde_json::from_str(&body("")).unwrap(), &mut canonical);
        let mut sha = Sha256::new();
        for part in [
            b"switchboard-cache-v1".as_slice(),
            b"k1",
            b"/v1/chat/completions",
            b"m",
            b"json",
        ] {
            sha.update((part.len() as u64).to_be_bytes());
            sha.update(part);
        }
        sha.update(&canonical);
        assert_ne!(long.0, <[u8; 32]>::from(sha.finalize()));
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter_everything_else_does() {
        let a = key(
            "k1",
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
        );
        let b = key("k1", "/api/v1/chat/completions", "{ \"temperature\" : 0,\n \"messages\":[{\"content\":\"hi\",\"role\":\"user\"}], \"model\":\"m\"}");
        assert_eq!(a, b);
        for other in [
            key(
                "k2",
                "/v1/chat/completions",
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
            ),
            key(
                "k1",
                "/v1/embeddings",
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
            ),
            key(
                "k1",
                "/v1/chat/completions",
                r#"{"model":"m2","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
            ),
            key(
                "k1",
                "/v1/chat/completions",
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"stream":true}"#,
            ),
            key(
                "k1",
                "/v1/chat/completions",
                r#"{"model":"m","messages":[{"role":"user","content":"hi!"}],"temperature":0}"#,
            ),
        ] {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn a_key_made_from_the_raw_body_is_the_key_of_its_parsed_value() {
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
            r#"{"stream":true,"model":"m\u00e9","messages":[]}"#,
            r#"{"model":"a","model":"b","stream":false,"stream":true}"#,
            r#"{"model":7,"stream":"true"}"#,
            r#"{}"#,
        ] {
            let (raw, top) = CacheKey::of_body("k1", "/api/v1/chat/completions", body.as_bytes())
                .unwrap_or_else(|| panic!("{body}"));
            assert_eq!(raw, key("k1", "/v1/chat/completions", body), "{body}");
            let v: Value = serde_json::from_str(body).unwrap();
            assert_eq!(top.model.as_deref(), v.get("model").and_then(Value::as_str));
            assert_eq!(
                top.stream,
                v.get("stream").and_then(Value::as_bool) == Some(true)
            );
        }
        for not_an_object in ["[1]", "\"x\"", "{", "{} {}", "nul"] {
            assert!(
                CacheKey::of_body("k1", "/v1/chat/completions", not_an_object.as_bytes()).is_none(),
                "{not_an_object}"
            );
        }
    }

    #[test]
    fn a_key_hashes_to_its_first_eight_bytes() {
        use std::hash::BuildHasher;
        let a = key("k1", "/v1/chat/completions", r#"{"model":"m"}"#);
        let b = key("k1", "/v1/chat/completions", r#"{"model":"n"}"#);
        let h = KeyHash::default();
        let first = |k: &CacheKey| u64::from_le_bytes(k.0[..8].try_into().unwrap());
        assert_eq!(h.hash_one(a), first(&a));
        assert_ne!(h.hash_one(a), h.hash_one(b));
        // Anything else written still hashes (FNV-1a), not to a constant.
        assert_ne!(h.hash_one("x"), h.hash_one("y"));
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let v: Value =
            serde_json::from_str(r#"{"b":{"z":1,"a":[{"y":"\n","x":null}]},"a":true}"#).unwrap();
        let mut out = Vec::new();
        write_canonical(&v, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"a":true,"b":{"a":[{"x":null,"y":"\n"}],"z":1}}"#
        );
    }
}
