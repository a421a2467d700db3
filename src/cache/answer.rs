//! [`CachedAnswer`]: a stored answer as a template, and the byte-level JSON rewrite
//! that makes it (usage zeroed, the old request id found).
//!
//! The rewrite is API-agnostic: it knows JSON, not chat completions. In every JSON
//! document of an answer (the whole body of a JSON answer, each `data:` line of an
//! SSE one) it sets every number inside an object under a `usage` key (at any depth,
//! nested objects and arrays included) to `0`, and finds every string equal to the
//! answer's old request id (its `X-Request-Id`). Everything else keeps its bytes, so a
//! hit is the stored answer with its own id and zero usage, not a re-serialisation.
//! The work is done once, when the answer is stored; a hit only splices its new id in.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One answer as the cache keeps it: status 200 only, the headers needed to answer,
/// and the body as a template (usage zeroed; the old request id cut out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAnswer {
    /// The answer's headers and where the id goes.
    pub meta: AnswerMeta,
    /// The body, usage zeroed; the old request id at each of `meta.id_at`.
    pub body: Bytes,
}

/// The headers of a [`CachedAnswer`] and its template's id positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerMeta {
    /// `Content-Type` (`application/json`, `text/event-stream`).
    pub content_type: String,
    /// `X-Provider` of the answer that was stored.
    pub provider: Option<String>,
    /// `X-Model-Used` of the answer that was stored.
    pub model: Option<String>,
    /// Its final `finish_reason`, for the hit's generation record.
    pub finish_reason: Option<String>,
    /// Whether it is a stream.
    pub streamed: bool,
    /// The TTL it was stored with, seconds (`X-OpenRouter-Cache-TTL` of a hit).
    pub ttl_secs: u64,
    /// Unix milliseconds after which it is gone (for entries read from Redis).
    pub expires_unix_ms: u64,
    /// Byte offsets of the old request id in the body.
    pub id_at: Vec<u32>,
    /// The old request id's length in bytes.
    pub id_len: u32,
}

impl CachedAnswer {
    /// The answer's bytes as the hit `new_id` sends them: the template with the new
    /// id at every place the old one was (no copy when there is none).
    pub fn render(&self, new_id: &str) -> Bytes {
        if self.meta.id_at.is_empty() {
            return self.body.clone();
        }
        let extra = new_id.len().saturating_sub(self.meta.id_len as usize);
        let mut out = Vec::with_capacity(self.body.len() + extra * self.meta.id_at.len());
        let mut from = 0usize;
        for &at in &self.meta.id_at {
            let at = at as usize;
            out.extend_from_slice(&self.body[from..at]);
            out.extend_from_slice(new_id.as_bytes());
            from = at + self.meta.id_len as usize;
        }
        out.extend_from_slice(&self.body[from..]);
        Bytes::from(out)
    }

    /// The TTL it was stored with.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.meta.ttl_secs)
    }

    /// Bytes it takes (the weight in a byte-bounded cache).
    pub fn weight(&self) -> usize {
        self.body.len() + self.meta.id_at.len() * 4 + 256
    }

    /// Its wire form (for Redis): `SBC1`, the length of the meta JSON (4 bytes, big
    /// endian), the meta JSON, then the body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let meta = serde_json::to_vec(&self.meta).unwrap_or_default();
        let mut out = Vec::with_capacity(8 + meta.len() + self.body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&self.body);
        out
    }

    /// Reads [`to_bytes`](Self::to_bytes); `None` for anything else (a damaged or
    /// foreign value, or ids outside the body).
    pub fn from_bytes(bytes: &[u8]) -> Option<CachedAnswer> {
        let rest = bytes.strip_prefix(MAGIC)?;
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let meta: AnswerMeta = serde_json::from_slice(rest.get(4..4 + len)?).ok()?;
        let body = Bytes::copy_from_slice(&rest[4 + len..]);
        let mut last = 0usize;
        for &at in &meta.id_at {
            let at = at as usize;
            if at < last || at + meta.id_len as usize > body.len() {
                return None;
            }
            last = at + meta.id_len as usize;
        }
        Some(CachedAnswer { meta, body })
    }
}

const MAGIC: &[u8] = b"SBC1";

/// Appends the template of one answer body to `out`: an SSE body event by event
/// (comment-only events, the keep-alive comments, dropped), a JSON body as one
/// document. Offsets of `old_id` (relative to `out`'s start) go to `id_at`.
pub(crate) fn template(
    body: &[u8],
    sse: bool,
    old_id: &str,
    out: &mut Vec<u8>,
    id_at: &mut Vec<u32>,
) {
    if sse {
        sse_events(body, old_id, None, out, id_at);
    } else {
        scan_json(body, old_id.as_bytes(), None, out, id_at);
    }
}

/// Rewrites complete SSE events (`body` ends at an event boundary) for a hit: usage
/// zeroed, `old_id` replaced by `new_id`; appended to `out`.
pub(crate) fn rewrite_sse(body: &[u8], old_id: &str, new_id: &str, out: &mut Vec<u8>) {
    sse_events(body, old_id, Some(new_id.as_bytes()), out, &mut Vec::new());
}

fn sse_events(
    body: &[u8],
    old_id: &str,
    new_id: Option<&[u8]>,
    out: &mut Vec<u8>,
    id_at: &mut Vec<u32>,
) {
    for event in split_inclusive(body, b"\n\n") {
        let lines = event.strip_suffix(b"\n\n").unwrap_or(event);
        if lines.split(|&b| b == b'\n').all(|l| l.starts_with(b":")) {
            continue; // a comment (keep-alive): not part of the answer
        }
        for (i, line) in lines.split(|&b| b == b'\n').enumerate() {
            if i > 0 {
                out.push(b'\n');
            }
            match line.strip_prefix(b"data:") {
                Some(data) if data.trim_ascii() != b"[DONE]" => {
                    out.extend_from_slice(b"data:");
                    scan_json(data, old_id.as_bytes(), new_id, out, id_at);
                }
                _ => out.extend_from_slice(line),
            }
        }
        if event.ends_with(b"\n\n") {
            out.extend_from_slice(b"\n\n");
        }
    }
}

/// `body` split after each `sep` (the last piece may lack it).
fn split_inclusive<'a>(mut body: &'a [u8], sep: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    std::iter::from_fn(move || {
        if body.is_empty() {
            return None;
        }
        let end = memchr::memmem::find(body, sep).map_or(body.len(), |i| i + sep.len());
        let (piece, rest) = body.split_at(end);
        body = rest;
        Some(piece)
    })
}

/// Copies one JSON document to `out`, numbers inside `usage` objects as `0` and each
/// string equal to `old_id` recorded in `id_at` (or replaced by `new_id`). Bytes that
/// are not JSON are copied as they are.
///
/// Copy on change: the scan only notes where it must write something else (a usage
/// number, the id), and copies the unchanged runs between in one piece each; strings
/// (most of an answer's bytes) are skipped with `memchr`.
fn scan_json(
    src: &[u8],
    old_id: &[u8],
    new_id: Option<&[u8]>,
    out: &mut Vec<u8>,
    id_at: &mut Vec<u32>,
) {
    out.reserve(src.len());
    // Per open container: (is an object, inside a usage object).
    let mut stack: Vec<(bool, bool)> = Vec::with_capacity(8);
    let mut expect_key = false;
    let mut usage_next = false;
    // `src[..copied]` is in `out` already.
    let mut copied = 0;
    let mut i = 0;
    while i < src.len() {
        let b = src[i];
        match b {
            b'"' => {
                let end = string_end(src, i);
                let s = &src[i..end];
                if expect_key {
                    usage_next = s == b"\"usage\"";
                    expect_key = false;
                } else {
                    usage_next = false;
                    if !old_id.is_empty()
                        && s.len() == old_id.len() + 2
                        && &s[1..s.len() - 1] == old_id
                    {
                        out.extend_from_slice(&src[copied..i]);
                        out.push(b'"');
                        match new_id {
                            Some(new) => out.extend_from_slice(new),
                            None => {
                                id_at.push(out.len() as u32);
                                out.extend_from_slice(old_id);
                            }
                        }
                        out.push(b'"');
                        copied = end;
                    }
                }
                i = end;
            }
            b'{' | b'[' => {
                let inside = stack.last().is_some_and(|f| f.1);
                stack.push((b == b'{', inside || (usage_next && b == b'{')));
                usage_next = false;
                expect_key = b == b'{';
                i += 1;
            }
            b'}' | b']' => {
                stack.pop();
                expect_key = false;
                i += 1;
            }
            b',' => {
                expect_key = stack.last().is_some_and(|f| f.0);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let mut end = i + 1;
                while end < src.len()
                    && matches!(src[end], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    end += 1;
                }
                if stack.last().is_some_and(|f| f.1) {
                    out.extend_from_slice(&src[copied..i]);
                    out.push(b'0');
                    copied = end;
                }
                usage_next = false;
                i = end;
            }
            _ => {
                if b.is_ascii_alphabetic() {
                    usage_next = false; // true / false / null
                }
                i += 1;
            }
        }
    }
    out.extend_from_slice(&src[copied..]);
}

/// The index just past the string that opens at `start` (or the end of `src`).
fn string_end(src: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < src.len() {
        match memchr::memchr2(b'"', b'\\', &src[i..]) {
            Some(off) if src[i + off] == b'"' => return i + off + 1,
            Some(off) => i += off + 2, // an escape: skip the escaped byte
            None => break,
        }
    }
    src.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &[u8], sse: bool, old: &str) -> CachedAnswer {
        let (mut out, mut id_at) = (Vec::new(), Vec::new());
        template(body, sse, old, &mut out, &mut id_at);
        CachedAnswer {
            meta: AnswerMeta {
                content_type: "application/json".into(),
                provider: None,
                model: None,
                finish_reason: None,
                streamed: sse,
                ttl_secs: 1,
                expires_unix_ms: 0,
                id_at,
                id_len: old.len() as u32,
            },
            body: Bytes::from(out),
        }
    }

    /// The byte-at-a-time scan this module had before copy-on-change (the oracle):
    /// copies one JSON document to `out`, numbers inside `usage` objects as `0` and each
    /// string equal to `old_id` recorded in `id_at` (or replaced by `new_id`). Bytes that
    /// are not JSON are copied as they are.
    fn scan_json_bytewise(
        src: &[u8],
        old_id: &[u8],
        new_id: Option<&[u8]>,
        out: &mut Vec<u8>,
        id_at: &mut Vec<u32>,
    ) {
        // Per open container: (is an object, inside a usage object).
        let mut stack: Vec<(bool, bool)> = Vec::with_capacity(8);
        let mut expect_key = false;
        let mut usage_next = false;
        let mut i = 0;
        while i < src.len() {
            let b = src[i];
            match b {
                b'"' => {
                    let end = string_end_bytewise(src, i);
                    let s = &src[i..end];
                    if expect_key {
                        usage_next = s == b"\"usage\"";
                        expect_key = false;
                        out.extend_from_slice(s);
                    } else {
                        usage_next = false;
                        if !old_id.is_empty()
                            && s.len() == old_id.len() + 2
                            && &s[1..s.len() - 1] == old_id
                        {
                            out.push(b'"');
                            match new_id {
                                Some(new) => out.extend_from_slice(new),
                                None => {
                                    id_at.push(out.len() as u32);
                                    out.extend_from_slice(old_id);
                                }
                            }
                            out.push(b'"');
                        } else {
                            out.extend_from_slice(s);
                        }
                    }
                    i = end;
                }
                b'{' | b'[' => {
                    let inside = stack.last().is_some_and(|f| f.1);
                    stack.push((b == b'{', inside || (usage_next && b == b'{')));
                    usage_next = false;
                    expect_key = b == b'{';
                    out.push(b);
                    i += 1;
                }
                b'}' | b']' => {
                    stack.pop();
                    expect_key = false;
                    out.push(b);
                    i += 1;
                }
                b',' => {
                    expect_key = stack.last().is_some_and(|f| f.0);
                    out.push(b);
                    i += 1;
                }
                b'-' | b'0'..=b'9' => {
                    let mut end = i + 1;
                    while end < src.len()
                        && matches!(src[end], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                    {
                        end += 1;
                    }
                    if stack.last().is_some_and(|f| f.1) {
                        out.push(b'0');
                    } else {
                        out.extend_from_slice(&src[i..end]);
                    }
                    usage_next = false;
                    i = end;
                }
                _ => {
                    if b.is_ascii_alphabetic() {
                        usage_next = false; // true / false / null
                    }
                    out.push(b);
                    i += 1;
                }
            }
        }
    }

    /// The index just past the string that opens at `start` (or the end of `src`).
    fn string_end_bytewise(src: &[u8], start: usize) -> usize {
        let mut i = start + 1;
        while i < src.len() {
            match src[i] {
                b'\\' => i += 2,
                b'"' => return i + 1,
                _ => i += 1,
            }
        }
        src.len()
    }

    #[test]
    fn copy_on_change_writes_what_the_bytewise_scan_wrote() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        let pieces: [&[u8]; 24] = [
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b"\"usage\"",
            b"\"gen-OLD\"",
            b"\"gen-OLDX\"",
            b"\"a\\\"b\"",
            b"\"x\\\\\"",
            b"12",
            b"-3.5e+7",
            b"0",
            b"true",
            b"null",
            b" ",
            b"\n",
            b"\"",
            b"\\",
            b"\"usage",
            b"\"k\"",
            b"\xc3\xa9",
            b"e",
        ];
        for round in 0..20_000 {
            let mut src = Vec::new();
            for _ in 0..rng.random_range(0..40) {
                src.extend_from_slice(pieces[rng.random_range(0..pieces.len())]);
            }
            if round % 2 == 0 {
                // Mostly well-formed: a real answer shape around the noise.
                let mut doc = br#"{"id":"gen-OLD","usage":{"p":1,"d":{"c":[2,3]}},"x":"#.to_vec();
                doc.extend_from_slice(&src);
                doc.push(b'}');
                src = doc;
            }
            for (old, new) in [
                (&b"gen-OLD"[..], None),
                (b"gen-OLD", Some(&b"gen-NEW-1"[..])),
                (b"", None),
            ] {
                let (mut a, mut a_at) = (b"prefix".to_vec(), Vec::new());
                let (mut b, mut b_at) = (b"prefix".to_vec(), Vec::new());
                scan_json(&src, old, new, &mut a, &mut a_at);
                scan_json_bytewise(&src, old, new, &mut b, &mut b_at);
                assert_eq!(
                    (a, a_at),
                    (b, b_at),
                    "{:?} {:?}",
                    String::from_utf8_lossy(&src),
                    new
                );
            }
        }
    }

    #[test]
    fn usage_numbers_are_zeroed_and_the_id_replaced_byte_for_byte_elsewhere() {
        let body = br#"{"id":"gen-OLD","object":"chat.completion","created":17,"choices":[{"index":0,"message":{"content":"gen-OLD \"usage\": 5"}}],"usage":{"prompt_tokens":12,"completion_tokens":3,"cost":0.0000123,"prompt_tokens_details":{"cached_tokens":4},"list":[1,2]},"n":-1.5e3}"#;
        let a = answer(body, false, "gen-OLD");
        assert_eq!(a.meta.id_at.len(), 1, "only the exact string is the id");
        let hit = a.render("gen-NEWER");
        let v: serde_json::Value = serde_json::from_slice(&hit).unwrap();
        assert_eq!(v["id"], "gen-NEWER");
        assert_eq!(v["created"], 17);
        assert_eq!(v["n"], -1.5e3);
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "gen-OLD \"usage\": 5"
        );
        assert_eq!(
            v["usage"],
            serde_json::json!({"prompt_tokens":0,"completion_tokens":0,"cost":0,"prompt_tokens_details":{"cached_tokens":0},"list":[0,0]})
        );
        // The bytes outside the rewritten places are the original's.
        let text = std::str::from_utf8(&hit).unwrap();
        assert!(text.starts_with(r#"{"id":"gen-NEWER","object":"chat.completion","created":17,"#));
    }

    #[test]
    fn sse_answers_drop_comments_and_keep_done() {
        let body = b": switchboard processing\n\ndata: {\"id\":\"gen-1\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"id\":\"gen-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n";
        let a = answer(body, true, "gen-1");
        assert_eq!(a.meta.id_at.len(), 2);
        let hit = String::from_utf8(a.render("gen-2").to_vec()).unwrap();
        assert_eq!(
            hit,
            "data: {\"id\":\"gen-2\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"id\":\"gen-2\",\"choices\":[],\"usage\":{\"prompt_tokens\":0}}\n\ndata: [DONE]\n\n"
        );
        let mut live = Vec::new();
        rewrite_sse(body, "gen-1", "gen-2", &mut live);
        assert_eq!(String::from_utf8(live).unwrap(), hit);
    }

    #[test]
    fn the_wire_form_round_trips_and_refuses_damage() {
        let a = answer(br#"{"id":"gen-1","usage":{"x":1}}"#, false, "gen-1");
        let bytes = a.to_bytes();
        assert_eq!(CachedAnswer::from_bytes(&bytes), Some(a.clone()));
        assert_eq!(CachedAnswer::from_bytes(&bytes[..12]), None);
        let mut short = a.to_bytes();
        short.truncate(short.len() - 20); // the id's place is past the end
        assert_eq!(CachedAnswer::from_bytes(&short), None);
        assert_eq!(CachedAnswer::from_bytes(b"garbage"), None);
    }
}
