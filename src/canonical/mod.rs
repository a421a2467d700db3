//! Canonical JSON digests: two bodies that are the same JSON value (whatever their
//! key order and whitespace) have the same digest.
//!
//! The value is written back with every object's keys sorted (by their UTF-8 bytes;
//! of a key given twice, the last), no whitespace, numbers and strings as
//! `serde_json` writes them, and hashed with SHA-256. A body that is not JSON is
//! hashed as it is (its raw bytes, after a one-byte tag that no JSON text starts
//! with, so it never collides with a JSON body's digest). The keys are sorted here,
//! not left to `serde_json::Map`, whose order depends on a cargo feature any other
//! crate may turn on.
//!
//! The text is written as the body is parsed ([`canonicalize`]), without building a
//! `serde_json::Value` first: the tree's allocations (a string per key and value, a
//! map node per object) and its drop were most of what the response cache's key cost
//! a request (BENCHMARKS.md, eighteenth session). [`write_canonical`] writes the same
//! text from a `Value` (tests hold the two to the same bytes).

mod raw;

use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

/// The SHA-256 of `body` as canonical JSON (sorted keys, no whitespace), or of its
/// raw bytes (tagged) when it is not JSON.
pub(crate) fn canonical_digest(body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut out = Vec::with_capacity(body.len());
    match canonicalize(body, &mut out) {
        Ok(_) => h.update(&out),
        Err(_) => {
            h.update([0xff]);
            h.update(body);
        }
    }
    h.finalize().into()
}

/// What writing a body's canonical text
/// ([`CacheKey::of_body`](crate::cache::CacheKey::of_body)) learnt of a top-level
/// object: its `model` when that is a string, and whether its `stream` is `true` (of a
/// key given twice, the last, as everywhere in the canonical form).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TopLevel {
    /// Whether the body is a JSON object.
    pub object: bool,
    /// Its `"model"`, when a string.
    pub model: Option<String>,
    /// Whether its `"stream"` is `true`.
    pub stream: bool,
}

impl TopLevel {
    /// What a top-level object says, `last(name)` being the canonical text of its
    /// last member called `name`.
    fn of_object<'v>(last: impl Fn(&str) -> Option<&'v [u8]>) -> TopLevel {
        TopLevel {
            object: true,
            model: last("model")
                .filter(|v| v.first() == Some(&b'"'))
                .and_then(|v| serde_json::from_slice(v).ok()),
            stream: last("stream") == Some(b"true".as_slice()),
        }
    }
}

/// Writes the JSON text `body` as canonical JSON into `out` (the same bytes as
/// [`write_canonical`] of its parsed value): from its bytes where they are already
/// canonical ([`raw`]), else parsing and writing in one pass. An error when `body`
/// is not one JSON value (what `serde_json::from_slice` refuses is refused here, with
/// the same depth limit); `out` then holds a part.
pub(crate) fn canonicalize(body: &[u8], out: &mut Vec<u8>) -> Result<TopLevel, serde_json::Error> {
    match raw::canonicalize(body, out) {
        Some(top) => Ok(top),
        None => canonicalize_parsed(body, out),
    }
}

/// [`canonicalize`] through `serde_json`, value by value (the writer of record: the
/// bytes [`raw`] does not copy as they are go through it).
pub(crate) fn canonicalize_parsed(
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<TopLevel, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut top = TopLevel::default();
    // The first object's members (the top level's, of a request body) take about the
    // whole body: sized once, not grown by doubling (a copy and, for a long prompt, a
    // fresh page each time).
    let mut spare = Spare {
        members: Vec::new(),
        values: vec![Vec::with_capacity(body.len())],
    };
    de.deserialize_any(Canon {
        out,
        top: Some(&mut top),
        spare: &mut spare,
    })?;
    de.end()?;
    Ok(top)
}

/// Writes one value's canonical text into `out`; at the top level, also notes what
/// [`TopLevel`] holds.
struct Canon<'a, 'de> {
    out: &'a mut Vec<u8>,
    top: Option<&'a mut TopLevel>,
    spare: &'a mut Spare<'de>,
}

/// The buffers of the objects written so far, kept for the next (a body's objects
/// are many and small: one allocation each, not two per object).
#[derive(Default)]
struct Spare<'de> {
    members: Vec<Vec<(Key<'de>, Range<usize>)>>,
    values: Vec<Vec<u8>>,
}

impl<'de> DeserializeSeed<'de> for Canon<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// A scalar as `serde_json` writes it (into a `Vec`, which cannot fail).
fn scalar<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let _ = serde_json::to_writer(out, v);
}

/// An object's key: borrowed from the body when it has no escapes (so, as for
/// [`Visitor::visit_borrowed_str`], nothing in it needs escaping).
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key<'de>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
        Ok(Key::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
        Ok(Key::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
        Ok(Key::Owned(v))
    }
}

impl<'de> Visitor<'de> for Canon<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        scalar(self.out, &v);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        scalar(self.out, &v);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        scalar(self.out, &v);
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // As a `Value` holds it: a number that is not finite is written `null`.
        scalar(self.out, &serde_json::Number::from_f64(v));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        crate::json::push_str(self.out, v);
        Ok(())
    }

    /// A string of the body that had no escape: `serde_json` borrows only those, and
    /// refuses a raw control character in any, so nothing in it needs escaping and it
    /// is written as it came (what [`push_str`](crate::json::push_str) would write).
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        crate::json::push_quoted(self.out, v.as_bytes());
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.push(b'[');
        let mut first = true;
        loop {
            let at = self.out.len();
            if !first {
                self.out.push(b',');
            }
            let more = seq.next_element_seed(Canon {
                out: &mut *self.out,
                top: None,
                spare: &mut *self.spare,
            })?;
            if more.is_none() {
                self.out.truncate(at);
                break;
            }
            first = false;
        }
        self.out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Each member's value is written into `values` as it is parsed; the members
        // are then sorted by key and written out.
        let mut members = self.spare.members.pop().unwrap_or_default();
        let mut values = self.spare.values.pop().unwrap_or_default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let start = values.len();
            map.next_value_seed(Canon {
                out: &mut values,
                top: None,
                spare: &mut *self.spare,
            })?;
            members.push((key, start..values.len()));
        }
        // Stable: of a key given twice, the later stays after the earlier.
        members.sort_by(|a, b| a.0.as_str().as_bytes().cmp(b.0.as_str().as_bytes()));
        self.out.reserve(values.len() + members.len() * 8 + 2);
        self.out.push(b'{');
        let mut first = true;
        for (i, (key, range)) in members.iter().enumerate() {
            if members
                .get(i + 1)
                .is_some_and(|next| next.0.as_str() == key.as_str())
            {
                continue; // a later member with the same key wins
            }
            if !first {
                self.out.push(b',');
            }
            first = false;
            match key {
                Key::Borrowed(k) => crate::json::push_quoted(self.out, k.as_bytes()),
                Key::Owned(k) => crate::json::push_str(self.out, k),
            }
            self.out.push(b':');
            self.out.extend_from_slice(&values[range.clone()]);
        }
        self.out.push(b'}');
        if let Some(top) = self.top {
            *top = TopLevel::of_object(|name| {
                members
                    .iter()
                    .rev()
                    .find(|(k, _)| k.as_str() == name)
                    .map(|(_, r)| &values[r.clone()])
            });
        }
        members.clear();
        values.clear();
        self.spare.members.push(members);
        self.spare.values.push(values);
        Ok(())
    }
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
    use super::{canonical_digest, canonicalize, write_canonical};

    /// [`canonicalize`] of `body` against [`write_canonical`] of its parsed value:
    /// the same bytes, or both refuse it.
    fn same_as_through_a_value(body: &str) {
        let mut streamed = Vec::new();
        let direct = canonicalize(body.as_bytes(), &mut streamed);
        match serde_json::from_str::<serde_json::Value>(body) {
            Ok(v) => {
                let mut through = Vec::new();
                write_canonical(&v, &mut through);
                assert!(direct.is_ok(), "{body}: {direct:?}");
                assert_eq!(
                    String::from_utf8_lossy(&streamed),
                    String::from_utf8_lossy(&through),
                    "{body}"
                );
                let top = direct.unwrap();
                assert_eq!(top.object, v.is_object(), "{body}");
                assert_eq!(
                    top.model.as_deref(),
                    v.get("model").and_then(|m| m.as_str()),
                    "{body}"
                );
                assert_eq!(top.stream, v.get("stream") == Some(&true.into()), "{body}");
            }
            Err(_) => assert!(direct.is_err(), "{body} was accepted"),
        }
    }

    #[test]
    fn the_text_written_while_parsing_is_the_text_of_the_parsed_value() {
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":1}"#,
            r#"{"b":{"z":1,"a":[{"y":"\n","x":null}]},"a":true,"c":false}"#,
            // A key given twice: the last, at every depth.
            r#"{"a":1,"b":2,"a":3}"#,
            r#"{"o":{"k":[1],"k":{"x":1,"x":2}},"o2":{}}"#,
            // Escapes, in keys and values; text that needs none; unicode.
            r#"{"q\"uote":"a\"b","tab\t":"\u0001\u001f\\","é":"\u00e9\ud83d\ude00","/":"\/"}"#,
            r#"{"":"", "\u0000":"\u0000"}"#,
            // Numbers as a `Value` keeps them.
            r#"[0,-0,-0.0,0.1,1e2,1E-7,1.5e300,-9223372036854775808,18446744073709551615]"#,
            r#"[123456789012345678901234567890,-18446744073709551616,2.5,100000000000000000000.0]"#,
            "  [ 1 , [ ] , { } , [ [ null ] ] ]  ",
            r#""just a string""#,
            "true",
            "null",
            "12",
            // Not JSON, or not one value.
            "",
            "{",
            r#"{"a":1,}"#,
            "[1] [2]",
            "1e400",
            r#"{"a":1}x"#,
            "nul",
            r#""\ud800""#,
        ] {
            same_as_through_a_value(body);
        }
        // The depth limit is the parser's, both ways.
        for depth in [100, 127, 128, 129, 300] {
            same_as_through_a_value(&format!("{}{}", "[".repeat(depth), "]".repeat(depth)));
        }
    }

    #[test]
    fn bodies_of_every_shape_write_the_text_of_their_parsed_value() {
        // A small deterministic generator (xorshift): nested objects and arrays, keys
        // in any order and sometimes twice, every kind of scalar.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        fn value(next: &mut dyn FnMut(u64) -> u64, depth: u32, out: &mut String) {
            let keys = [
                "model",
                "a",
                "b",
                "stream",
                "zz",
                r"\\x",
                "é",
                r"k\n",
                r"\u006dodel",
                r#"q\"k"#,
                r"\/",
            ];
            let strings = [
                "",
                "hi",
                r#"a\"b"#,
                r"\u00e9",
                r"line\nbreak",
                r"\ud83d\ude00",
                // Escapes serde_json writes (copied as they are) and others.
                r"\b\f\r\t\\",
                r"\u0000\u001f\u0007",
                r"\u0008\u0009\u000a\u000c\u000d",
                r"\u001F",
                r"\/",
                "\u{7f}é€",
                "a long run of text past a lane, then\\nan escape, and more text after it",
            ];
            let numbers = [
                "0",
                "-1",
                "3.25",
                "1e3",
                "-2.5E-3",
                "99999999999999999999",
                "9999999999999999999",
                "18446744073709551615",
                "18446744073709551616",
                "-999999999999999999",
                "-9223372036854775808",
                "-9223372036854775809",
                "-0",
                "0.0",
                "1E+2",
                "100",
            ];
            match if depth > 3 { 2 + next(4) } else { next(6) } {
                0 => {
                    out.push('{');
                    for i in 0..next(5) {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(&format!("\"{}\":", keys[next(keys.len() as u64) as usize]));
                        value(next, depth + 1, out);
                    }
                    out.push('}');
                }
                1 => {
                    out.push('[');
                    for i in 0..next(4) {
                        if i > 0 {
                            out.push_str(" , ");
                        }
                        value(next, depth + 1, out);
                    }
                    out.push(']');
                }
                2 => out.push_str(&format!(
                    "\"{}\"",
                    strings[next(strings.len() as u64) as usize]
                )),
                3 => out.push_str(numbers[next(numbers.len() as u64) as usize]),
                4 => out.push_str(if next(2) == 0 { "true" } else { "false" }),
                _ => out.push_str("null"),
            }
        }
        for _ in 0..4000 {
            let mut body = String::new();
            value(&mut next, 0, &mut body);
            same_as_through_a_value(&body);
            // Valid and shallow: the bytes are written by the raw writer, not left to
            // the parsing one (which would hide a raw writer that gives up).
            let mut raw = Vec::new();
            assert!(
                super::raw::canonicalize(body.as_bytes(), &mut raw).is_some(),
                "{body}"
            );
        }
    }

    /// Bodies the raw writer must not take as they are: a raw control character,
    /// bytes that are not UTF-8, broken escapes; and the same bodies refused or
    /// written alike both ways.
    #[test]
    fn what_the_raw_writer_cannot_copy_is_refused_or_written_as_parsed() {
        let bodies: [&[u8]; 12] = [
            b"{\"a\":\"tab\there\"}",
            b"{\"a\":\"\xff\xfe\"}",
            b"{\"\xc3\":1}",
            br#"{"a":"\u12"}"#,
            br#"{"a":"\u12zz"}"#,
            br#"{"a":"\x"}"#,
            br#"{"a":"\ud800"}"#,
            br#"{"a":"unterminated}"#,
            br#"{"a" 1}"#,
            br#"[1,]"#,
            br#"{"a":[1 2]}"#,
            br#"{"a":tru}"#,
        ];
        for body in bodies {
            let mut direct = Vec::new();
            let got = canonicalize(body, &mut direct);
            match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(v) => {
                    let mut through = Vec::new();
                    write_canonical(&v, &mut through);
                    assert_eq!(direct, through, "{}", String::from_utf8_lossy(body));
                }
                Err(_) => assert!(
                    got.is_err(),
                    "{} was accepted",
                    String::from_utf8_lossy(body)
                ),
            }
        }
    }

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
