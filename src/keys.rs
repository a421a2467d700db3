//! Client keys: the record that authentication yields and every later layer reads.
//!
//! A [`KeyRecord`] is what `AuthLayer` caches and puts in the request's
//! [`CallContext`](crate::context::CallContext). It never holds the secret (only its
//! id) and never the balance: balances are read from the ledger (SPEC §4).
//!
//! # Example
//! ```
//! use switchboard::keys::KeyRecord;
//!
//! let key = KeyRecord {
//!     models: Some(vec!["openai/*".into(), "mock/echo".into()]),
//!     ..KeyRecord::new("key_1", "alice")
//! };
//! assert!(key.allows_model("openai/gpt-4o-mini"));
//! assert!(key.allows_model("mock/echo"));
//! assert!(!key.allows_model("anthropic/claude-sonnet-4"));
//! ```

use crate::money::Money;

/// A client key as the layers see it (no secret, no balance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Stable id (`key_…`), safe to log.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Disabled keys get 403.
    pub disabled: bool,
    /// Lifetime spending limit.
    pub limit: Option<Money>,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per UTC day.
    pub tokens_per_day: Option<u64>,
    /// Allow-list of model globs (`*` matches any run of characters); `None` allows all.
    pub models: Option<Vec<String>>,
}

impl KeyRecord {
    /// An enabled key with no limits.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        KeyRecord {
            id: id.into(),
            name: name.into(),
            disabled: false,
            limit: None,
            rpm: None,
            tokens_per_day: None,
            models: None,
        }
    }

    /// Whether the allow-list admits `model` (a gateway id without variant suffix).
    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|pats| pats.iter().any(|p| glob_match(p, model)))
    }
}

/// `*`-only glob matching (the allow-list syntax of SPEC §2).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything/at-all"));
        assert!(glob_match("openai/*", "openai/gpt-4o"));
        assert!(!glob_match("openai/*", "anthropic/x"));
        assert!(glob_match("*/gpt-*-mini", "openai/gpt-4o-mini"));
        assert!(glob_match("a*a", "aa"));
        assert!(!glob_match("a*a", "a"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }
}
