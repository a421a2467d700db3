//! Canonical JSON digests: two bodies that are the same JSON value (whatever their
//! key order and whitespace) have the same digest.
//!
//! The value is written back with every object's keys sorted (by their UTF-8 bytes)
//! and no whitespace, numbers and strings as `serde_json` writes them, and hashed
//! with SHA-256. A body that is not JSON is hashed as it is (its raw bytes, after a
//! one-byte tag that no JSON text starts with, so it never collides with a JSON
//! body's digest). The keys are sorted here, not left to `serde_json::Map`, whose
//! order depends on a cargo feature any other crate may turn on.

use sha2::{Digest, Sha256};

/// The SHA-256 of `body` as canonical JSON (sorted keys, no whitespace), or of its
/// raw bytes (tagged) when it is not JSON.
pub(crate) fn canonical_digest(body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => {
            let mut out = Vec::with_capacity(body.len());
            write_canonical(&v, &mut out);
            h.update(&out);
        }
        Err(_) => {
            h.update([0xff]);
            h.update(body);
        }
    }
    h.finalize().into()
}

/// `v` as canonical JSON: object keys in byte order at every depth, no whitespace,
/// strings and numbers as `serde_json` writes them. Sorted here, whatever order the
/// map keeps (serde_json's `preserve_order` feature may be on in a build). The
/// response cache's key and the idempotency fingerprint are both made of it.
pub fn write_canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                crate::json::push_str(out, k);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::canonical_digest;

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":1}"#;
        let b = br#"{ "n": 1,
            "messages": [ { "content": "hi", "role": "user" } ], "model" : "m" }"#;
        assert_eq!(canonical_digest(a), canonical_digest(b));
    }

    #[test]
    fn values_order_in_arrays_and_types_do() {
        let base = canonical_digest(br#"{"a":[1,2],"b":"x"}"#);
        for other in [
            &br#"{"a":[2,1],"b":"x"}"#[..],
            br#"{"a":[1,2],"b":"y"}"#,
            br#"{"a":[1,2],"b":["x"]}"#,
            br#"{"a":[1,2]}"#,
            br#"{"a":[1,2],"b":"x","c":null}"#,
        ] {
            assert_ne!(
                base,
                canonical_digest(other),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn a_body_that_is_not_json_is_hashed_as_it_is() {
        assert_eq!(
            canonical_digest(b"{not json"),
            canonical_digest(b"{not json")
        );
        assert_ne!(
            canonical_digest(b"{not json"),
            canonical_digest(b"{not json ")
        );
        // Never the digest of a JSON body, whatever its bytes.
        assert_ne!(canonical_digest(b"\"x\""), canonical_digest(b"\"x"));
    }
}
