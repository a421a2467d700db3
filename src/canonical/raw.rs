//! The canonical text of a body written from its bytes, without decoding its strings
//! and encoding them again: a string whose escapes are already those `serde_json`
//! writes (`\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, `\u00xx` for the other control
//! characters) is the same text in the canonical form, so it is copied as it came,
//! checked for UTF-8 and raw control characters, and nothing else. A long prompt's
//! text, most of a request body, then costs a scan for quotes and backslashes
//! instead of a decode and an encode byte by byte (BENCHMARKS.md, twentieth session).
//!
//! Whatever this writer does not take as it is goes through `serde_json`, the writer
//! of record ([`super::canonicalize_parsed`]): a string with another escape (`\/`,
//! `\u00e9`, a surrogate pair) or a number other than a plain integer, one token at a
//! time; and anything it does not accept (not JSON, nesting deeper than [`DEPTH`]), by
//! answering `None`, the whole body. So the text is the same bytes either way, and a
//! body `serde_json` refuses is refused with its error.

use std::ops::Range;

use super::TopLevel;
use crate::json::{escape_mask, escapes, push_quoted, LANE};

/// Nesting deeper than this is left to `serde_json` (whose own limit is 128).
const DEPTH: usize = 64;

/// Writes the canonical text of `body` into `out` and says what it learnt of its top
/// level, or `None` (`out` as it was) when `body` needs the parsing writer.
pub(super) fn canonicalize(body: &[u8], out: &mut Vec<u8>) -> Option<TopLevel> {
    let start = out.len();
    let mut w = Writer {
        b: body,
        i: 0,
        members: Vec::new(),
        // The first object's members (the top level's, of a request body) take about
        // the whole body: sized once, not grown by doubling.
        values: vec![Vec::with_capacity(body.len())],
    };
    let mut top = TopLevel::default();
    w.ws();
    let done = w.value(out, 0, Some(&mut top)).is_some() && {
        w.ws();
        w.i == body.len()
    };
    if done {
        Some(top)
    } else {
        out.truncate(start);
        None
    }
}

/// An object's key: its bytes in the body (no escape in it), or decoded.
enum Key {
    Raw(Range<usize>),
    Decoded(String),
}

struct Writer<'b> {
    b: &'b [u8],
    /// The next byte to read.
    i: usize,
    /// Buffers of the objects written so far, kept for the next (as the parsing
    /// writer does: a body's objects are many and small).
    members: Vec<Vec<(Key, Range<usize>)>>,
    values: Vec<Vec<u8>>,
}

impl Writer<'_> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.b.get(self.i) == Some(&byte)).then(|| self.i += 1)
    }

    fn key_bytes<'k>(&'k self, k: &'k Key) -> &'k [u8] {
        match k {
            Key::Raw(r) => &self.b[r.clone()],
            Key::Decoded(s) => s.as_bytes(),
        }
    }

    fn value(&mut self, out: &mut Vec<u8>, depth: usize, top: Option<&mut TopLevel>) -> Option<()> {
        match *self.b.get(self.i)? {
            b'{' => self.object(out, depth + 1, top),
            b'[' => self.array(out, depth + 1),
            b'"' => self.string(out),
            b't' => self.literal(out, b"true"),
            b'f' => self.literal(out, b"false"),
            b'n' => self.literal(out, b"null"),
            b'-' | b'0'..=b'9' => self.number(out),
            _ => None,
        }
    }

    fn literal(&mut self, out: &mut Vec<u8>, word: &[u8]) -> Option<()> {
        if !self.b[self.i..].starts_with(word) {
            return None;
        }
        self.i += word.len();
        out.extend_from_slice(word);
        Some(())
    }

    /// A plain integer (as `serde_json` writes it back: no sign on zero, no leading
    /// zero, within `u64` or `i64`) as it is; any other number through `serde_json`.
    fn number(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let start = self.i;
        let negative = self.b[start] == b'-';
        let digits = start + usize::from(negative);
        let mut end = digits;
        while self.b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        let plain = match self.b.get(end) {
            Some(b'.' | b'e' | b'E') => false,
            _ => {
                let n = end - digits;
                match (self.b.get(digits), negative) {
                    (Some(b'0'), false) => n == 1,
                    (Some(b'1'..=b'9'), false) => n <= 19,
                    (Some(b'1'..=b'9'), true) => n <= 18,
                    _ => false,
                }
            }
        };
        if plain {
            out.extend_from_slice(&self.b[start..end]);
            self.i = end;
            return Some(());
        }
        // Fraction and exponent: the token's end, then serde_json's reading of it.
        if self.b.get(end) == Some(&b'.') {
            end += 1;
            while self.b.get(end).is_some_and(u8::is_ascii_digit) {
                end += 1;
            }
        }
        if let Some(b'e' | b'E') = self.b.get(end) {
            end += 1;
            if let Some(b'+' | b'-') = self.b.get(end) {
                end += 1;
            }
            while self.b.get(end).is_some_and(u8::is_ascii_digit) {
                end += 1;
            }
        }
        self.i = end;
        super::canonicalize_parsed(&self.b[start..end], out).ok()?;
        Some(())
    }

    /// The string at `i`: as it came when its escapes are canonical, else decoded by
    /// `serde_json` and written again.
    fn string(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let (end, canonical) = self.string_end()?;
        if canonical {
            push_quoted(out, &self.b[self.i + 1..end]);
        } else {
            super::canonicalize_parsed(&self.b[self.i..=end], out).ok()?;
        }
        self.i = end + 1;
        Some(())
    }

    /// The closing quote of the string at `i`, and whether its text is canonical:
    /// every escape one `serde_json` writes, no raw control character, UTF-8. `None`
    /// when it does not end or holds a raw control character (`serde_json` refuses
    /// it; the parsing writer says why).
    ///
    /// The text is looked at a lane of `json::LANE` bytes at a time: a mask of its quotes,
    /// backslashes and control characters, then only those one by one (a prompt has
    /// an escape every few dozen bytes: a search call per escape cost more).
    fn string_end(&self) -> Option<(usize, bool)> {
        let from = self.i + 1;
        // The next byte not inside an escape already read.
        let mut at = from;
        let mut canonical = true;
        let mut lane_at = from;
        let end = 'found: loop {
            let (mut mask, width) = match self.b.get(lane_at..lane_at + LANE) {
                Some(lane) => (escape_mask(lane.try_into().expect("LANE bytes")), LANE),
                None => {
                    let tail = self.b.get(lane_at..)?;
                    let mask = tail
                        .iter()
                        .enumerate()
                        .fold(0u32, |m, (k, &c)| m | (u32::from(escapes(c)) << k));
                    (mask, tail.len())
                }
            };
            while mask != 0 {
                let p = lane_at + mask.trailing_zeros() as usize;
                mask &= mask - 1;
                if p < at {
                    continue; // escaped by the backslash before it
                }
                match self.b[p] {
                    b'"' => break 'found p,
                    b'\\' => {
                        at = p + 2;
                        match *self.b.get(p + 1)? {
                            b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                            b'u' => {
                                let hex = self.b.get(p + 2..p + 6)?;
                                canonical &= matches!(
                                    hex,
                                    [b'0', b'0', b'0' | b'1', b'0'..=b'9' | b'a'..=b'f']
                                ) && !matches!(
                                    hex,
                                    [_, _, b'0', b'8' | b'9' | b'a' | b'c' | b'd']
                                );
                                at = p + 6;
                            }
                            _ => canonical = false,
                        }
                    }
                    _ => return None, // a raw control character
                }
            }
            if width < LANE {
                return None; // the body ends inside the string
            }
            lane_at += LANE;
        };
        Some((
            end,
            canonical && std::str::from_utf8(&self.b[from..end]).is_ok(),
        ))
    }

    fn array(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        if depth > DEPTH {
            return None;
        }
        self.i += 1;
        out.push(b'[');
        self.ws();
        if self.eat(b']').is_some() {
            out.push(b']');
            return Some(());
        }
        loop {
            self.value(out, depth, None)?;
            self.ws();
            match *self.b.get(self.i)? {
                b',' => {
                    self.i += 1;
                    self.ws();
                    out.push(b',');
                }
                b']' => {
                    self.i += 1;
                    out.push(b']');
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn object(
        &mut self,
        out: &mut Vec<u8>,
        depth: usize,
        top: Option<&mut TopLevel>,
    ) -> Option<()> {
        if depth > DEPTH {
            return None;
        }
        self.i += 1;
        let mut members = self.members.pop().unwrap_or_default();
        let mut values = self.values.pop().unwrap_or_default();
        let read = self.members_into(&mut members, &mut values, depth);
        if read.is_some() {
            // Stable: of a key given twice, the later stays after the earlier.
            members.sort_by(|a, b| self.key_bytes(&a.0).cmp(self.key_bytes(&b.0)));
            out.reserve(values.len() + members.len() * 8 + 2);
            out.push(b'{');
            let mut first = true;
            for (i, (key, range)) in members.iter().enumerate() {
                let bytes = self.key_bytes(key);
                if members
                    .get(i + 1)
                    .is_some_and(|next| self.key_bytes(&next.0) == bytes)
                {
                    continue; // a later member with the same key wins
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                match key {
                    Key::Raw(r) => push_quoted(out, &self.b[r.clone()]),
                    Key::Decoded(s) => crate::json::push_str(out, s),
                }
                out.push(b':');
                out.extend_from_slice(&values[range.clone()]);
            }
            out.push(b'}');
            if let Some(top) = top {
                *top = TopLevel::of_object(|name| {
                    members
                        .iter()
                        .rev()
                        .find(|(k, _)| self.key_bytes(k) == name.as_bytes())
                        .map(|(_, r)| &values[r.clone()])
                });
            }
        }
        members.clear();
        values.clear();
        self.members.push(members);
        self.values.push(values);
        read
    }

    /// An object's members after its `{`, each value written into `values`.
    fn members_into(
        &mut self,
        members: &mut Vec<(Key, Range<usize>)>,
        values: &mut Vec<u8>,
        depth: usize,
    ) -> Option<()> {
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            if self.b.get(self.i) != Some(&b'"') {
                return None;
            }
            let (end, _) = self.string_end()?;
            let text = self.i + 1..end;
            let key = if self.b[text.clone()].contains(&b'\\') {
                Key::Decoded(serde_json::from_slice(&self.b[self.i..=end]).ok()?)
            } else {
                std::str::from_utf8(&self.b[text.clone()]).ok()?;
                Key::Raw(text)
            };
            self.i = end + 1;
            self.ws();
            self.eat(b':')?;
            self.ws();
            let start = values.len();
            self.value(values, depth, None)?;
            members.push((key, start..values.len()));
            self.ws();
            match *self.b.get(self.i)? {
                b',' => {
                    self.i += 1;
                    self.ws();
                }
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}
