//! Prompt-cache affinity: a long prompt goes back to the endpoint that last served it.
//!
//! Providers cache long prompt prefixes (OpenAI and Gemini implicitly from about 1k
//! tokens, Anthropic where `cache_control` asks), per provider and per account, so
//! the second request of a conversation is cheaper and faster only if it reaches the
//! endpoint that served the first. The weighted draw (SPEC §5) would send it to
//! either. [`Affinity`] remembers, for a prompt of at least [`MIN_PREFIX_BYTES`], the
//! endpoint that served it, keyed by a hash of the model id and the first
//! [`MIN_PREFIX_BYTES`] of the prompt as JSON (`tools`, then `messages`: the system
//! prompt and first turns, what provider caches key on), and
//! [`HealthFilter`](super::HealthFilter) puts that endpoint first in the next such
//! request's plan when it is still there (healthy and allowed).
//!
//! The request's own choices win: `provider.order`, `provider.sort`, `:floor` and
//! `:nitro` leave the plan as they order it. A degraded endpoint is not in the plan,
//! so affinity yields to health; the conversation stays where it lands next.
//!
//! Entries live [`AFFINITY_TTL`] after the last reply they saw (Anthropic's cache lifetime),
//! at most [`AFFINITY_MAX_ENTRIES`] of them, in this process's memory: each instance of a
//! deployment learns its own (docs/routing.md).
//!
//! # Example
//! ```
//! use switchboard::chat::{ChatRequest, Message, Role};
//! use switchboard::context::{CallContext, ChatCall};
//! use switchboard::health::{Affinity, MIN_PREFIX_BYTES};
//!
//! let call = |system: String, user: &str| ChatCall::new(ChatRequest {
//!     model: "test/model".into(),
//!     messages: vec![Message::text(Role::System, system), Message::text(Role::User, user)],
//!     ..Default::default()
//! }, CallContext::new());
//! let long = "You are a careful assistant. ".repeat(200);
//! assert!(long.len() > MIN_PREFIX_BYTES);
//! // Two conversations sharing a long system prompt share a key…
//! let a = Affinity::key(&call(long.clone(), "first question")).unwrap();
//! let b = Affinity::key(&call(long, "another question")).unwrap();
//! assert_eq!(a, b);
//! // …and a short prompt has none.
//! assert!(Affinity::key(&call("Be brief.".into(), "hi")).is_none());
//!
//! let affinity = Affinity::new();
//! assert_eq!(affinity.preferred(a), None);
//! affinity.remember(a, 3);
//! assert_eq!(affinity.preferred(b), Some(3));
//! ```

use std::hash::{DefaultHasher, Hasher};
use std::io;
use std::time::Duration;

use super::filter::Ordering;
use crate::context::ChatCall;
use crate::route::split_variant;

/// The shortest prompt (bytes of `tools` + `messages` as JSON, about 1k tokens) that
/// gets an affinity key, and the length of the prefix the key hashes: about where
/// providers start caching.
pub const MIN_PREFIX_BYTES: usize = 4096;

/// The most prompts remembered at once (least recently used ones go first).
pub const AFFINITY_MAX_ENTRIES: u64 = 100_000;

/// How long a prompt's endpoint is remembered after the last reply to it.
pub const AFFINITY_TTL: Duration = Duration::from_secs(300);

/// A prompt's affinity key: a hash of the model id and the prompt's first
/// [`MIN_PREFIX_BYTES`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AffinityKey(u64);

/// Which endpoint served which long prompt (the rule: docs/routing.md, "Prompt-cache
/// affinity"). Cheap to clone: clones share the entries.
#[derive(Clone)]
pub struct Affinity {
    entries: moka::sync::Cache<AffinityKey, usize>,
}

impl std::fmt::Debug for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Affinity")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl Default for Affinity {
    fn default() -> Self {
        Affinity::new()
    }
}

impl Affinity {
    /// At most [`AFFINITY_MAX_ENTRIES`] prompts, each for [`AFFINITY_TTL`].
    pub fn new() -> Self {
        Affinity::with_limits(AFFINITY_MAX_ENTRIES, AFFINITY_TTL)
    }

    /// At most `max_entries` prompts, each for `ttl` after its last reply.
    pub fn with_limits(max_entries: u64, ttl: Duration) -> Self {
        Affinity {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The call's affinity key: `None` when its prompt is shorter than
    /// [`MIN_PREFIX_BYTES`], or when the request orders its plan itself
    /// (`provider.order`, `provider.sort`, `:floor`, `:nitro`).
    pub fn key(call: &ChatCall) -> Option<AffinityKey> {
        let req = &call.request;
        let ordered = req
            .provider
            .as_ref()
            .is_some_and(|p| p.order.as_ref().is_some_and(|o| !o.is_empty()));
        if ordered || Ordering::of(call) != Ordering::Default {
            return None;
        }
        let model = split_variant(&req.model).map_or(req.model.as_str(), |(id, _)| id);
        let mut prefix = Prefix::default();
        prefix.hasher.write(model.as_bytes());
        prefix.hasher.write_u8(0);
        // A full prefix ends the writing with an error: nothing past it is serialized.
        let _ = serde_json::to_writer(&mut prefix, &req.tools)
            .and_then(|()| serde_json::to_writer(&mut prefix, &req.messages));
        (prefix.len >= MIN_PREFIX_BYTES).then(|| AffinityKey(prefix.hasher.finish()))
    }

    /// The index (in the [catalog](crate::catalog::Catalog::endpoints)) of the endpoint
    /// that last served the prompt of `key`.
    pub fn preferred(&self, key: AffinityKey) -> Option<usize> {
        self.entries.get(&key)
    }

    /// Remembers that the endpoint of catalog index `endpoint` served the prompt of
    /// `key` (for [`AFFINITY_TTL`] from now).
    pub fn remember(&self, key: AffinityKey, endpoint: usize) {
        self.entries.insert(key, endpoint);
    }

    /// Counts a request with a key in `switchboard_affinity_total`.
    pub(crate) fn count(hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        crate::telemetry::counter(crate::telemetry::AFFINITY, &[("result", result)]).increment(1);
    }
}

/// Hashes what is written to it up to [`MIN_PREFIX_BYTES`], then refuses more.
#[derive(Default)]
struct Prefix {
    hasher: DefaultHasher,
    len: usize,
}

impl io::Write for Prefix {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = MIN_PREFIX_BYTES - self.len;
        if room == 0 {
            return Err(io::Error::other("the affinity prefix is complete"));
        }
        let n = buf.len().min(room);
        self.hasher.write(&buf[..n]);
        self.len += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{ChatRequest, Message, ProviderPreferences, Role, SortBy};
    use crate::context::CallContext;

    fn call(model: &str, system: &str, user: &str) -> ChatCall {
        ChatCall::new(
            ChatRequest {
                model: model.into(),
                messages: vec![
                    Message::text(Role::System, system),
                    Message::text(Role::User, user),
                ],
                ..Default::default()
            },
            CallContext::new(),
        )
    }

    #[test]
    fn keys_cover_the_model_and_the_first_bytes_of_the_prompt() {
        let long = "x".repeat(MIN_PREFIX_BYTES);
        let k = Affinity::key(&call("m/a", &long, "one")).unwrap();
        // What follows the prefix does not count; the model and the prefix do.
        assert_eq!(Affinity::key(&call("m/a", &long, "two")), Some(k));
        assert_eq!(Affinity::key(&call("m/a:thinking", &long, "two")), Some(k));
        assert_ne!(Affinity::key(&call("m/b", &long, "one")), Some(k));
        let other = format!("y{}", &long[1..]);
        assert_ne!(Affinity::key(&call("m/a", &other, "one")), Some(k));
        // Just under the threshold: no key.
        let short = "x".repeat(MIN_PREFIX_BYTES - 100);
        assert_eq!(Affinity::key(&call("m/a", &short, "")), None);
    }

    #[test]
    fn requests_that_order_their_plan_have_no_key() {
        let long = "x".repeat(MIN_PREFIX_BYTES);
        for model in ["m/a:floor", "m/a:nitro"] {
            assert_eq!(Affinity::key(&call(model, &long, "q")), None, "{model}");
        }
        for prefs in [
            ProviderPreferences {
                order: Some(vec!["p".into()]),
                ..Default::default()
            },
            ProviderPreferences {
                sort: Some(SortBy::Latency),
                ..Default::default()
            },
        ] {
            let mut c = call("m/a", &long, "q");
            std::sync::Arc::get_mut(&mut c.request).unwrap().provider = Some(prefs);
            assert_eq!(Affinity::key(&c), None);
        }
        // `provider` preferences that do not order (`only`, an empty `order`) keep it.
        let mut c = call("m/a", &long, "q");
        std::sync::Arc::get_mut(&mut c.request).unwrap().provider = Some(ProviderPreferences {
            order: Some(vec![]),
            only: Some(vec!["p".into()]),
            ..Default::default()
        });
        assert!(Affinity::key(&c).is_some());
    }

    #[test]
    fn entries_are_bounded() {
        let a = Affinity::with_limits(10, AFFINITY_TTL);
        for i in 0..1000u64 {
            a.remember(AffinityKey(i), 1);
        }
        a.entries.run_pending_tasks();
        assert!(a.entries.entry_count() <= 10);
    }
}
