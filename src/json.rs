//! Small JSON writers for lines the gateway writes many times a second (the ledger
//! journal, the `attempts` columns), where going through serde costs more than the
//! bytes: `serde_json` escapes every field name as a string, at every line.
//!
//! The output is byte for byte what `serde_json` writes for the same values; the
//! tests of each caller compare the two.

/// Appends `s` as a JSON string, escaped as `serde_json` escapes it: `"` and `\`,
/// the short escapes `\b \t \n \f \r`, other control characters as `\u00xx`;
/// everything else (DEL and non-ASCII included) as it is.
pub(crate) fn push_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Ids, names and statuses: nearly always nothing to escape, checked in one pass.
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    // Text (a prompt, an answer, code): escapes here and there. Each lane of `LANE`
    // bytes is looked at whole, and only its bytes to escape one by one (before, every
    // byte of a string with one escape went through the `match`).
    let mut from = 0;
    let mut i = 0;
    while let Some(lane) = bytes.get(i..i + LANE) {
        let lane: &[u8; LANE] = lane.try_into().expect("a lane is LANE bytes");
        let mut mask = escape_mask(lane);
        while mask != 0 {
            escape_at(out, bytes, &mut from, i + mask.trailing_zeros() as usize);
            mask &= mask - 1;
        }
        i += LANE;
    }
    for j in i..bytes.len() {
        escape_at(out, bytes, &mut from, j);
    }
    out.extend_from_slice(&bytes[from..]);
    out.push(b'"');
}

/// Bytes of text looked at together by [`push_str`] (and the canonical writer).
pub(crate) const LANE: usize = 16;

/// Whether `b` must be escaped in a JSON string: a quote, a backslash, a control
/// character.
#[inline(always)]
pub(crate) fn escapes(b: u8) -> bool {
    (b < 0x20) | (b == b'"') | (b == b'\\')
}

/// A bit for each byte of `lane` that [`escapes`] picks (compiled to a few vector
/// compares and a move mask).
#[inline(always)]
pub(crate) fn escape_mask(lane: &[u8; LANE]) -> u32 {
    lane.iter()
        .enumerate()
        .fold(0u32, |mask, (k, &b)| mask | (u32::from(escapes(b)) << k))
}

/// Appends `text`, already JSON string content (nothing in it to escape, or
/// escaped already), between quotes.
pub(crate) fn push_quoted(out: &mut Vec<u8>, text: &[u8]) {
    out.reserve(text.len() + 2);
    out.push(b'"');
    out.extend_from_slice(text);
    out.push(b'"');
}

/// If `bytes[at]` must be escaped: appends what is before it from `from`, then its
/// escape, and moves `from` past it.
#[inline(always)]
fn escape_at(out: &mut Vec<u8>, bytes: &[u8], from: &mut usize, at: usize) {
    let b = bytes[at];
    let short = match b {
        b'"' => b'"',
        b'\\' => b'\\',
        0x08 => b'b',
        b'\t' => b't',
        b'\n' => b'n',
        0x0c => b'f',
        b'\r' => b'r',
        0x00..=0x1f => b'u',
        _ => return,
    };
    out.extend_from_slice(&bytes[*from..at]);
    *from = at + 1;
    if short == b'u' {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.extend_from_slice(b"\\u00");
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    } else {
        out.push(b'\\');
        out.push(short);
    }
}

/// Whether any byte of `bytes` must be escaped in a JSON string. No early exit: it
/// compiles to a few wide compares instead of a branch a byte.
#[inline(always)]
fn needs_escape(bytes: &[u8]) -> bool {
    bytes.iter().fold(false, |any, &b| any | escapes(b))
}

/// One upstream attempt as the ledger and the request log write it: the fields of
/// `GenerationAttempt` (no model) and of `AttemptLog`, in their order.
pub(crate) struct Attempt<'a> {
    /// Provider name.
    pub provider: &'a str,
    /// Gateway model id (the request log's attempts only).
    pub model: Option<&'a str>,
    /// `"200"`, `"503"`, `"timeout"`, ….
    pub status: &'a str,
    /// Milliseconds.
    pub latency_ms: u64,
}

/// Appends `attempts` as the JSON array `serde_json` writes for the attempt type.
pub(crate) fn push_attempts<'a>(
    out: &mut Vec<u8>,
    attempts: impl IntoIterator<Item = Attempt<'a>>,
) {
    let mut n = itoa::Buffer::new();
    out.push(b'[');
    for (i, a) in attempts.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"provider\":");
        push_str(out, a.provider);
        if let Some(model) = a.model {
            out.extend_from_slice(b",\"model\":");
            push_str(out, model);
        }
        out.extend_from_slice(b",\"status\":");
        push_str(out, a.status);
        out.extend_from_slice(b",\"latency_ms\":");
        out.extend_from_slice(n.format(a.latency_ms).as_bytes());
        out.push(b'}');
    }
    out.push(b']');
}

/// What the writers' tests generate.
#[cfg(test)]
pub(crate) mod testing {
    use rand::Rng;

    /// A string of fewer than `max` characters drawn from what JSON must escape
    /// and what it must not.
    pub(crate) fn odd(rng: &mut impl Rng, max: usize) -> String {
        const CHARS: &[char] = &[
            'a', 'Z', '0', ' ', '"', '\\', '/', '\u{0}', '\u{1}', '\u{8}', '\t', '\n', '\u{b}',
            '\u{c}', '\r', '\u{1f}', '\u{7f}', 'é', '€', '😀', '\u{2028}',
        ];
        let n = rng.random_range(0..max);
        (0..n)
            .map(|_| CHARS[rng.random_range(0..CHARS.len())])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut all: Vec<String> = (0u8..0x80).map(|b| char::from(b).to_string()).collect();
        all.extend(["", "plain id", "é€😀\u{2028}", "a\"b\\c\nd\u{1}e\u{7f}"].map(String::from));
        all.push((0u8..0x80).map(char::from).collect());
        for s in all {
            let mut ours = Vec::new();
            super::push_str(&mut ours, &s);
            assert_eq!(ours, serde_json::to_vec(&s).unwrap(), "{s:?}");
        }
    }

    /// Text longer than a lane: each escape at every position of a line (in a lane,
    /// at its edges, in the tail after the last whole lane), and generated text of
    /// plain runs and escapes, written as `serde_json` writes it.
    #[test]
    fn long_text_is_escaped_as_serde_json_escapes_it() {
        use rand::{Rng, SeedableRng};
        let plain = "The quick brown fox jumps over the lazy dog, é€😀.";
        for special in ['"', '\\', '\n', '\t', '\u{1}', '\u{1f}', '\u{7f}'] {
            for at in 0..=plain.len() {
                if !plain.is_char_boundary(at) {
                    continue;
                }
                let s = format!("{}{special}{}", &plain[..at], &plain[at..]);
                let mut ours = Vec::new();
                super::push_str(&mut ours, &s);
                assert_eq!(ours, serde_json::to_vec(&s).unwrap(), "{s:?}");
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..5_000 {
            let mut s = String::new();
            for _ in 0..rng.random_range(0..12) {
                let run = rng.random_range(0..40);
                s.extend((0..run).map(|i| char::from(b'a' + (i % 26) as u8)));
                s.push_str(&super::testing::odd(&mut rng, 4));
            }
            let mut ours = vec![b'x'];
            super::push_str(&mut ours, &s);
            assert_eq!(ours[1..], serde_json::to_vec(&s).unwrap()[..], "{s:?}");
        }
    }
}
