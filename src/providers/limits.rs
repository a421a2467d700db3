//! Bounds on what one upstream answer may hold: every index, count, length and
//! duration an upstream sends is checked against a named limit before it is used.
//!
//! An answer past a limit is a broken upstream answer: a retriable
//! [`FailureKind::Protocol`] failure (fallback, else 502), never an allocation sized
//! by the upstream and never a panic.
//!
//! | what | limit |
//! |---|---|
//! | choices of one answer | indices `< n` asked (1 to [`MAX_CHOICES`]) |
//! | tool calls of one choice | indices `<` [`MAX_TOOL_CALLS`] |
//! | each token count of `usage` | `≤` [`MAX_USAGE_TOKENS`] |
//! | a non-stream body, a whole stream | `[[providers]].max_response_bytes` ([`DEFAULT_MAX_RESPONSE_BYTES`]) |
//! | one SSE line or event | [`MAX_EVENT`](super::sse::MAX_EVENT) |
//! | an embeddings answer | one vector per input, all of one length `≤` [`MAX_EMBEDDING_DIMENSIONS`] (the `dimensions` asked, if any), finite numbers, `≤` [`MAX_EMBEDDING_FLOATS`] in all |
//! | `Retry-After` / `retry-after-ms` | [`MAX_RETRY_AFTER`] |
//! | an upstream error message relayed to a client | [`MAX_ERROR_MESSAGE_CHARS`](super::redact::MAX_ERROR_MESSAGE_CHARS), credentials redacted |
//!
//! ```
//! use switchboard::chat::{ChatChunk, ChunkChoice};
//! use switchboard::providers::limits::{check_chunk, MAX_CHOICES};
//!
//! let mut chunk = ChatChunk::text("hi");
//! assert!(check_chunk(&chunk, MAX_CHOICES).is_ok());
//! chunk.choices[0].index = u32::MAX;
//! assert!(check_chunk(&chunk, MAX_CHOICES).is_err());
//! ```

use std::time::{Duration, SystemTime};

use crate::chat::ChatChunk;
use crate::context::ProviderCall;
#[cfg(doc)]
use crate::error::FailureKind;

/// The most choices one answer may carry when the request sets no tighter bound:
/// OpenAI's own maximum `n`.
pub use crate::chat::MAX_CHOICES;

/// The most tool calls one choice may carry (OpenAI accepts at most 128 tools per
/// request; a model may call one several times, so the bound is wider).
pub const MAX_TOOL_CALLS: u32 = 1024;

/// The largest token count an upstream may report in `usage` (2^53, the largest
/// integer a JSON number holds exactly): a sum of a few never overflows a u64, and
/// anything above is no real answer.
pub const MAX_USAGE_TOKENS: u64 = 1 << 53;

/// The default `[[providers]].max_response_bytes`: 32 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 32 << 20;

/// The longest `Retry-After` taken from an upstream (one day); longer ones, and
/// `inf`, are clamped to it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// The most choices an answer to `call` may carry: choice indices must be below it.
pub fn max_choices(call: &ProviderCall) -> u32 {
    call.request.choices().clamp(1, MAX_CHOICES)
}

/// Checks the indices and counts of one chunk (a stream chunk, or a whole non-stream
/// answer) against `max_choices`, [`MAX_TOOL_CALLS`] and [`MAX_USAGE_TOKENS`]; `Err`
/// says what is wrong.
///
/// Cheap enough for every chunk: no allocation unless the chunk is refused.
pub fn check_chunk(chunk: &ChatChunk, max_choices: u32) -> Result<(), String> {
    if let Some(u) = &chunk.usage {
        let counts = [
            u.prompt_tokens,
            u.completion_tokens,
            u.total_tokens,
            u.cached_tokens(),
            u.cache_write_tokens(),
            u.reasoning_tokens(),
        ];
        if let Some(n) = counts.into_iter().find(|n| *n > MAX_USAGE_TOKENS) {
            return Err(format!(
                "a usage count of {n} tokens (at most {MAX_USAGE_TOKENS})"
            ));
        }
    }
    if chunk.choices.len() > max_choices as usize {
        return Err(format!(
            "{} choices in one answer (at most {max_choices})",
            chunk.choices.len()
        ));
    }
    for c in &chunk.choices {
        if c.index >= max_choices {
            return Err(format!(
                "choice index {} (at most {max_choices} choices)",
                c.index
            ));
        }
        if let Some(calls) = &c.delta.tool_calls {
            if calls.len() > MAX_TOOL_CALLS as usize {
                return Err(format!(
                    "{} tool calls in one choice (at most {MAX_TOOL_CALLS})",
                    calls.len()
                ));
            }
            if let Some(tc) = calls.iter().find(|tc| tc.index >= MAX_TOOL_CALLS) {
                return Err(format!(
                    "tool call index {} (at most {MAX_TOOL_CALLS} tool calls)",
                    tc.index
                ));
            }
        }
    }
    Ok(())
}

/// The longest embedding vector an upstream may answer with, and the largest
/// `dimensions` a client may ask for.
pub const MAX_EMBEDDING_DIMENSIONS: u32 = 65_536;

/// The most numbers one embeddings answer may hold (inputs × dimensions): 32 MiB of
/// `f32`s.
pub const MAX_EMBEDDING_FLOATS: u64 = 1 << 23;

/// Checks an embeddings answer to `call` (SPEC §7.3): one vector per input, all of
/// one length from 1 to [`MAX_EMBEDDING_DIMENSIONS`] (the `dimensions` asked for, if
/// any), every number finite. `Err` says what is wrong. A chunk without vectors, or
/// a call that is not an embeddings request, passes (and vectors for a chat request
/// do not).
pub fn check_embeddings(chunk: &ChatChunk, call: &ProviderCall) -> Result<(), String> {
    let (vectors, asked) = match (&chunk.embeddings, &call.request.inbound.embeddings) {
        (None, _) => return Ok(()),
        (Some(_), None) => return Err("embeddings in an answer to a chat request".into()),
        (Some(v), Some(asked)) => (v, asked),
    };
    if vectors.len() != asked.inputs.len() {
        return Err(format!(
            "{} embeddings for {} inputs",
            vectors.len(),
            asked.inputs.len()
        ));
    }
    let Some(first) = vectors.first() else {
        return Ok(());
    };
    let dims = first.len();
    if dims == 0 || dims > MAX_EMBEDDING_DIMENSIONS as usize {
        return Err(format!(
            "embeddings of {dims} dimensions (1 to {MAX_EMBEDDING_DIMENSIONS})"
        ));
    }
    if let Some(d) = asked.dimensions.filter(|d| *d as usize != dims) {
        return Err(format!("embeddings of {dims} dimensions ({d} asked)"));
    }
    if vectors.len() as u64 * dims as u64 > MAX_EMBEDDING_FLOATS {
        return Err(format!(
            "{} embeddings of {dims} dimensions (at most {MAX_EMBEDDING_FLOATS} numbers)",
            vectors.len()
        ));
    }
    for (i, v) in vectors.iter().enumerate() {
        if v.len() != dims {
            return Err(format!(
                "embedding {i} has {} dimensions, embedding 0 {dims}",
                v.len()
            ));
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(format!("embedding {i} holds a number that is not finite"));
        }
    }
    Ok(())
}

/// How long an upstream asks to wait: `retry-after-ms` (milliseconds, decimal), else
/// `Retry-After` as seconds (integer or decimal) or an HTTP date. Clamped to
/// [`MAX_RETRY_AFTER`]; negative, NaN or unreadable values are ignored (`None`), a
/// date in the past is zero.
pub fn retry_after(headers: &::http::HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = value("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if let Some(d) = clamped_secs(ms / 1000.0) {
            return Some(d);
        }
    }
    let v = value(::http::header::RETRY_AFTER.as_str())?;
    match v.parse::<f64>() {
        Ok(secs) => clamped_secs(secs),
        Err(_) => {
            let at = httpdate::parse_http_date(v).ok()?;
            let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
            Some(wait.min(MAX_RETRY_AFTER))
        }
    }
}

/// Seconds as a duration of at most [`MAX_RETRY_AFTER`]; `None` for NaN or negative.
fn clamped_secs(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    let max = MAX_RETRY_AFTER.as_secs_f64();
    // Compared before converting: `Duration::from_secs_f64` panics past u64 seconds.
    Some(if secs >= max {
        MAX_RETRY_AFTER
    } else {
        Duration::from_secs_f64(secs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Delta, ToolCallDelta};

    fn headers(pairs: &[(&str, &str)]) -> ::http::HeaderMap {
        let mut h = ::http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                ::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let now = SystemTime::now();
        let h = headers(&[("retry-after", "3")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(3)));
        let h = headers(&[("retry-after", "1.5"), ("retry-after-ms", "250")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(250)));
    }

    /// Each of these panicked the request task at `Duration::from_secs_f64`.
    #[test]
    fn absurd_retry_after_values_are_clamped_or_ignored_never_a_panic() {
        let now = SystemTime::now();
        for (name, value, want) in [
            ("retry-after", "1e20", Some(MAX_RETRY_AFTER)),
            ("retry-after", "inf", Some(MAX_RETRY_AFTER)),
            ("retry-after", "Infinity", Some(MAX_RETRY_AFTER)),
            ("retry-after", "18446744073709551616", Some(MAX_RETRY_AFTER)),
            ("retry-after", "NaN", None),
            ("retry-after", "-5", None),
            ("retry-after", "-inf", None),
            ("retry-after", "soon", None),
            ("retry-after-ms", "1e300", Some(MAX_RETRY_AFTER)),
            ("retry-after-ms", "inf", Some(MAX_RETRY_AFTER)),
            ("retry-after-ms", "NaN", None),
            ("retry-after-ms", "-1", None),
        ] {
            assert_eq!(
                retry_after(&headers(&[(name, value)]), now),
                want,
                "{name}: {value}"
            );
        }
        // A bad `retry-after-ms` falls back to `Retry-After`.
        let h = headers(&[("retry-after-ms", "NaN"), ("retry-after", "7")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
    }

    #[test]
    fn retry_after_accepts_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        let h = headers(&[("retry-after", "Sun, 06 Nov 1994 08:49:57 GMT")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(20)));
        // In the past: retry now.
        let h = headers(&[("retry-after", "Sun, 06 Nov 1994 08:49:00 GMT")]);
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
        // Far in the future: clamped.
        let h = headers(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")]);
        assert_eq!(retry_after(&h, now), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn indices_and_counts_are_bounded() {
        let mut c = ChatChunk::text("x");
        assert!(check_chunk(&c, 1).is_ok());
        c.choices[0].index = 1;
        assert!(check_chunk(&c, 1).is_err());
        assert!(check_chunk(&c, 2).is_ok());
        c.choices[0].index = 0;
        c.choices[0].delta = Delta {
            tool_calls: Some(vec![ToolCallDelta {
                index: MAX_TOOL_CALLS - 1,
                ..ToolCallDelta::default()
            }]),
            ..Delta::default()
        };
        assert!(check_chunk(&c, 1).is_ok());
        c.choices[0].delta.tool_calls.as_mut().unwrap()[0].index = MAX_TOOL_CALLS;
        assert!(check_chunk(&c, 1)
            .unwrap_err()
            .contains("tool call index 1024"));
        let many = vec![ToolCallDelta::default(); MAX_TOOL_CALLS as usize + 1];
        c.choices[0].delta.tool_calls = Some(many);
        assert!(check_chunk(&c, 1).is_err());
        // Usage counts.
        let mut c = ChatChunk::usage(crate::chat::Usage::new(MAX_USAGE_TOKENS - 1, 1));
        assert!(check_chunk(&c, 1).is_ok());
        c.usage.as_mut().unwrap().prompt_tokens = MAX_USAGE_TOKENS + 1;
        assert!(check_chunk(&c, 1).unwrap_err().contains("usage count"));
        let mut u = crate::chat::Usage::new(1, 1);
        u.prompt_tokens_details = Some(crate::chat::PromptTokensDetails {
            cached_tokens: u64::MAX,
            cache_write_tokens: 0,
        });
        assert!(check_chunk(&ChatChunk::usage(u), 1).is_err());
        // More choice entries than allowed, even all at index 0.
        let mut c = ChatChunk::text("x");
        c.choices.push(c.choices[0].clone());
        assert!(check_chunk(&c, 1).is_err());
    }
}
