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
    /// With a `limit`: the limit applies to each such period (UTC), not to the
    /// key's lifetime.
    pub limit_reset: Option<LimitReset>,
    /// Unix seconds from which the key is refused (401 "key expired").
    pub expires_at: Option<u64>,
    /// Free-form `k=v` tags (see [`check_labels`]), recorded with each request.
    pub labels: Labels,
    /// Unix seconds of its deletion: a deleted key is refused (401 "key deleted")
    /// and kept for the books (its ledger rows and balance stay).
    pub deleted_at: Option<u64>,
    /// Set only on a record found by a secret that a rotation replaced: the Unix
    /// second from which that old secret is refused (the end of its grace period).
    pub secret_expires_at: Option<u64>,
}

/// A key's labels: free-form `k=v` tags, ordered by key.
pub type Labels = std::collections::BTreeMap<String, String>;

/// The most labels a key holds.
pub const MAX_LABELS: usize = 16;
/// The longest label key (`[A-Za-z0-9_.-]`).
pub const MAX_LABEL_KEY: usize = 64;
/// The longest label value, in characters.
pub const MAX_LABEL_VALUE: usize = 256;

/// Checks a key's labels: at most [`MAX_LABELS`], each key 1 to [`MAX_LABEL_KEY`]
/// characters of `[A-Za-z0-9_.-]`, each value at most [`MAX_LABEL_VALUE`] characters
/// with no control characters. The error names the label and how to fix it.
///
/// # Example
/// ```
/// use switchboard::keys::{check_labels, parse_label, Labels};
///
/// let mut labels = Labels::new();
/// let (k, v) = parse_label("team=search").unwrap();
/// labels.insert(k, v);
/// assert!(check_labels(&labels).is_ok());
/// assert!(parse_label("team").unwrap_err().contains("k=v"));
/// labels.insert("bad key".into(), "x".into());
/// assert!(check_labels(&labels).unwrap_err().contains("`bad key`"));
/// ```
pub fn check_labels(labels: &Labels) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "a key holds at most {MAX_LABELS} labels (got {}): remove some",
            labels.len()
        ));
    }
    for (k, v) in labels {
        if k.is_empty()
            || k.len() > MAX_LABEL_KEY
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(format!(
                "label key `{k}` is not valid: use 1 to {MAX_LABEL_KEY} characters of A-Z, a-z, 0-9, `_`, `.`, `-`"
            ));
        }
        if v.chars().count() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(format!(
                "the value of label `{k}` is not valid: use at most {MAX_LABEL_VALUE} characters, no control characters"
            ));
        }
    }
    Ok(())
}

/// Parses one `k=v` label (the CLI's `--label`); the key is checked by
/// [`check_labels`] with the others.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) => Ok((k.trim().to_string(), v.to_string())),
        None => Err(format!(
            "`{s}` is not a label: write it as k=v (e.g. team=search)"
        )),
    }
}

/// The period a key's `limit_usd` applies to (SPEC §8.3): UTC days, weeks Monday to
/// Sunday, or calendar months.
///
/// # Example
/// ```
/// use switchboard::keys::LimitReset;
///
/// let weekly: LimitReset = "weekly".parse().unwrap();
/// assert_eq!(weekly.as_str(), "weekly");
/// // UTC day 20_151 (2025-03-04) is a Tuesday: its week began the day before.
/// assert_eq!(weekly.period_start(20_151), 20_150);
/// assert!("hourly".parse::<LimitReset>().unwrap_err().contains("daily, weekly or monthly"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitReset {
    /// From each UTC midnight.
    Daily,
    /// From each Monday, 00:00 UTC.
    Weekly,
    /// From the first of each calendar month, 00:00 UTC.
    Monthly,
}

impl LimitReset {
    /// Every period, shortest first.
    pub const ALL: [LimitReset; 3] = [LimitReset::Daily, LimitReset::Weekly, LimitReset::Monthly];

    /// `"daily"`, `"weekly"` or `"monthly"`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitReset::Daily => "daily",
            LimitReset::Weekly => "weekly",
            LimitReset::Monthly => "monthly",
        }
    }

    /// The first UTC day of the period that holds UTC day `day`.
    pub fn period_start(self, day: u64) -> u64 {
        match self {
            LimitReset::Daily => day,
            LimitReset::Weekly => crate::clock::week_start(day),
            LimitReset::Monthly => crate::clock::month_start(day),
        }
    }
}

impl std::fmt::Display for LimitReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LimitReset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "daily" => Ok(LimitReset::Daily),
            "weekly" => Ok(LimitReset::Weekly),
            "monthly" => Ok(LimitReset::Monthly),
            other => Err(format!(
                "`{other}` is not a limit reset: use daily, weekly or monthly (UTC)"
            )),
        }
    }
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
            limit_reset: None,
            expires_at: None,
            labels: Labels::new(),
            deleted_at: None,
            secret_expires_at: None,
        }
    }

    /// Whether the key has been deleted.
    pub fn deleted(&self) -> bool {
        self.deleted_at.is_some()
    }

    /// Whether the key has expired at Unix seconds `now` (its `expires_at` is past).
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
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
