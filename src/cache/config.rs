//! `[cache]`: the response cache's settings (SPEC §8.1).

use serde::Deserialize;

/// `[cache]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Cache requests that do not send `X-OpenRouter-Cache` (`false`: only those that
    /// send `X-OpenRouter-Cache: true`).
    pub enabled_by_default: bool,
    /// How long an answer is kept when the request sends no `X-OpenRouter-Cache-TTL`,
    /// seconds (1–86400).
    pub ttl_secs: u64,
    /// The most bytes of answers kept in this process's memory (the whole cache
    /// without `[shared]`; a local copy of Redis's entries with it).
    pub max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled_by_default: false,
            ttl_secs: 300,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The longest TTL (`ttl_secs`, `X-OpenRouter-Cache-TTL`): a day.
pub const MAX_TTL_SECS: u64 = 86_400;

/// The most `max_bytes` may be: 64 GiB (a weight moka can count; far above any sane
/// in-process cache).
pub const MAX_BYTES: u64 = 64 << 30;

impl CacheConfig {
    /// Problems as (TOML path, message), empty when usable.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !(1..=MAX_TTL_SECS).contains(&self.ttl_secs) {
            out.push((
                "cache.ttl_secs".into(),
                format!(
                    "must be between 1 and {MAX_TTL_SECS} seconds, got {}",
                    self.ttl_secs
                ),
            ));
        }
        if !(4096..=MAX_BYTES).contains(&self.max_bytes) {
            out.push((
                "cache.max_bytes".into(),
                format!(
                    "must be between 4096 and {MAX_BYTES} bytes, got {}",
                    self.max_bytes
                ),
            ));
        }
        out
    }
}
