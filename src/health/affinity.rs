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
//! at most [`AFFINITY_MAX_ENTRIES`] of them, in this process's memory. With `[shared]`
//! ([`Affinity::shared`]) every instance of a deployment tells the others what it
//! learns through Redis's events channel, so a conversation whose turns a load
//! balancer spreads over instances keeps its endpoint (docs/routing.md).
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

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hasher};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::filter::Ordering;
use crate::catalog::Catalog;
use crate::context::ChatCall;
use crate::route::split_variant;
use crate::shared::{ListenerId, Notice, SharedState};

/// The topic of affinity events on the shared events channel.
const TOPIC: &str = "affinity";

/// Affinity events queued for Redis at most (past it, news stays local).
const QUEUE: usize = 1024;

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
///
/// [`Affinity::shared`] shares what it learns with the other instances on one Redis:
/// a new or changed endpoint for a prompt is published at once (`affinity {instance}
/// {key} {model}@{provider}` on the events channel; endpoints travel by label, since
/// catalog indices differ between configurations), and an unchanged one again once
/// half its TTL has passed since the deployment last heard of it, so a conversation
/// that goes on through any instance stays known everywhere. Never on the request's
/// wait: publishing is queued to a task, and while Redis is away each instance keeps
/// its own entries, as without `[shared]`.
#[derive(Clone)]
pub struct Affinity {
    /// The endpoint's catalog index, and when the deployment last heard of it.
    entries: moka::sync::Cache<AffinityKey, (usize, Instant)>,
    ttl: Duration,
    sharing: Option<Arc<Sharing>>,
}

/// What [`Affinity::shared`] adds: the queue to Redis and the listener of the others.
struct Sharing {
    shared: SharedState,
    labels: Vec<Arc<str>>,
    out: mpsc::Sender<(AffinityKey, Arc<str>)>,
    listener: ListenerId,
}

impl Drop for Sharing {
    fn drop(&mut self) {
        self.shared.unlisten(self.listener);
    }
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
            ttl,
            sharing: None,
        }
    }

    /// [`Affinity::new`], shared with every instance on `shared` whose catalog is
    /// `catalog` (the endpoints this instance's plans hold).
    pub fn shared(shared: SharedState, catalog: &Catalog) -> Self {
        Affinity::with_limits(AFFINITY_MAX_ENTRIES, AFFINITY_TTL).sharing(shared, catalog)
    }

    /// These limits, shared as [`Affinity::shared`] says.
    pub fn sharing(mut self, shared: SharedState, catalog: &Catalog) -> Self {
        let labels: Vec<Arc<str>> = catalog
            .endpoints()
            .iter()
            .map(|e| Arc::from(e.label()))
            .collect();
        let by_label: HashMap<Arc<str>, usize> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i))
            .collect();
        let (out, rx) = mpsc::channel(QUEUE);
        shared.spawn(publish(shared.clone(), rx));
        // The listener holds the entries, not the `Affinity`: dropping the last clone
        // drops `Sharing`, which removes the listener (and ends the publisher).
        let (entries, me) = (self.entries.clone(), shared.instance_id().to_string());
        let listener = shared.listen(TOPIC, move |notice| {
            let Notice::Message(payload) = notice else {
                return; // nothing to catch up: a missed event costs one affinity miss
            };
            let Some((instance, key, label)) = parse_event(payload) else {
                tracing::debug!(payload, "shared affinity: unreadable event");
                return;
            };
            if instance == me {
                return;
            }
            if let Some(&i) = by_label.get(label) {
                entries.insert(key, (i, Instant::now()));
            }
        });
        self.sharing = Some(Arc::new(Sharing {
            shared,
            labels,
            out,
            listener,
        }));
        self
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
        self.entries.get(&key).map(|(i, _)| i)
    }

    /// Remembers that the endpoint of catalog index `endpoint` served the prompt of
    /// `key` (for [`AFFINITY_TTL`] from now); shared, tells the other instances when
    /// that is news to them.
    pub fn remember(&self, key: AffinityKey, endpoint: usize) {
        let now = Instant::now();
        let Some(sharing) = &self.sharing else {
            self.entries.insert(key, (endpoint, now));
            return;
        };
        let known = self.entries.get(&key);
        let news = match known {
            Some((i, heard)) => i != endpoint || now.duration_since(heard) >= self.ttl / 2,
            None => true,
        };
        let label = sharing.labels.get(endpoint);
        let sent = news
            && sharing.shared.is_available()
            && label.is_some_and(|l| sharing.out.try_send((key, l.clone())).is_ok());
        let heard = match known {
            Some((i, heard)) if !sent && i == endpoint => heard,
            _ => now,
        };
        self.entries.insert(key, (endpoint, heard));
    }

    /// Counts a request with a key in `switchboard_affinity_total`.
    pub(crate) fn count(hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        crate::telemetry::counter(crate::telemetry::AFFINITY, &[("result", result)]).increment(1);
    }
}

/// Publishes what [`Affinity::remember`] queued, one event each, until every sender
/// is gone.
async fn publish(shared: SharedState, mut rx: mpsc::Receiver<(AffinityKey, Arc<str>)>) {
    while let Some((key, label)) = rx.recv().await {
        let payload = format!("{} {:016x} {label}", shared.instance_id(), key.0);
        if let Err(e) = shared.publish(TOPIC, &payload).await {
            tracing::debug!("shared affinity: not published: {e}");
        }
    }
}

/// The `(instance, key, label)` of an affinity event's payload.
fn parse_event(payload: &str) -> Option<(&str, AffinityKey, &str)> {
    let (instance, rest) = payload.split_once(' ')?;
    let (key, label) = rest.split_once(' ')?;
    if key.len() != 16 {
        return None;
    }
    let key = u64::from_str_radix(key, 16).ok()?;
    Some((instance, AffinityKey(key), label))
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

    /// `shared`, once its events channel is subscribed (events sent before are missed).
    async fn subscribed(shared: SharedState) -> SharedState {
        let on = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = on.clone();
        let id = shared.listen("test-subscribed", move |n| {
            if matches!(n, Notice::Subscribed) {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        assert!(
            crate::shared::tests::eventually(Duration::from_secs(10), || {
                on.load(std::sync::atomic::Ordering::SeqCst)
            })
            .await,
            "the events channel was never subscribed"
        );
        shared.unlisten(id);
        shared
    }

    #[tokio::test]
    async fn what_one_instance_learns_every_instance_prefers() {
        use crate::shared::tests::{eventually, open};
        let Some(r) = crate::testing::redis("what_one_instance_learns_every_instance_prefers")
        else {
            return;
        };
        let abc = crate::health::tests::abc();
        // The other instance's catalog lists the same endpoints in another order.
        let cab = crate::health::tests::catalog(&[
            ("c", "openai", "2", "2", "deny"),
            ("a", "openai", "3", "3", "deny"),
            ("b", "openai", "1", "1", "deny"),
        ]);
        let index = |cat: &Catalog, name: &str| {
            cat.endpoints()
                .iter()
                .find(|e| e.label() == format!("test/model@{name}"))
                .unwrap()
                .index
        };
        let sa = subscribed(open(&r).await).await;
        let sb = subscribed(open(&r).await).await;
        let (a, b) = (
            Affinity::shared(sa.clone(), &abc),
            Affinity::shared(sb, &cab),
        );
        let long = "x".repeat(MIN_PREFIX_BYTES);
        let k = Affinity::key(&call("test/model", &long, "one")).unwrap();

        // Learnt on A (endpoint `b`): B prefers its own index of `b` within 1 s.
        a.remember(k, index(&abc, "b"));
        assert!(
            eventually(Duration::from_secs(1), || b.preferred(k)
                == Some(index(&cab, "b")))
            .await,
            "B prefers {:?}",
            b.preferred(k)
        );
        // The same again on A is no news: nothing published.
        let calls = sa.calls();
        a.remember(k, index(&abc, "b"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            sa.calls(),
            calls,
            "an unchanged endpoint was published again"
        );
        // A change on B (the conversation moved to `c`) reaches A.
        b.remember(k, index(&cab, "c"));
        assert!(
            eventually(Duration::from_secs(1), || a.preferred(k)
                == Some(index(&abc, "c")))
            .await,
            "A prefers {:?}",
            a.preferred(k)
        );
        // Another prompt's key is untouched.
        let other = Affinity::key(&call("test/model", &"y".repeat(MIN_PREFIX_BYTES), "")).unwrap();
        assert_eq!(a.preferred(other), None);
        assert_eq!(b.preferred(other), None);
        // Dropped, an instance's affinity stops listening.
        let before = sa.listeners();
        drop(a);
        assert_eq!(sa.listeners(), before - 1);
    }

    #[tokio::test]
    async fn an_unchanged_endpoint_is_told_again_after_half_its_ttl() {
        use crate::shared::tests::{eventually, open};
        let Some(r) =
            crate::testing::redis("an_unchanged_endpoint_is_told_again_after_half_its_ttl")
        else {
            return;
        };
        let cat = crate::health::tests::abc();
        let (sa, sb) = (
            subscribed(open(&r).await).await,
            subscribed(open(&r).await).await,
        );
        let ttl = Duration::from_millis(400);
        let a = Affinity::with_limits(100, ttl).sharing(sa.clone(), &cat);
        let b = Affinity::with_limits(100, ttl).sharing(sb, &cat);
        let k = Affinity::key(&call("test/model", &"x".repeat(MIN_PREFIX_BYTES), "")).unwrap();
        a.remember(k, 1);
        assert!(eventually(Duration::from_secs(1), || b.preferred(k) == Some(1)).await);
        // Past half the TTL, A's next reply for the prompt tells B again, which keeps
        // the entry past its first TTL.
        let calls = sa.calls();
        tokio::time::sleep(ttl / 2 + Duration::from_millis(20)).await;
        a.remember(k, 1);
        assert!(
            eventually(Duration::from_secs(1), || sa.calls() == calls + 1).await,
            "not published again"
        );
        tokio::time::sleep(ttl / 2).await;
        assert_eq!(b.preferred(k), Some(1), "B forgot a prompt A still serves");
    }

    #[tokio::test]
    async fn with_redis_away_affinity_is_each_instances_own() {
        // Nothing listens on port 1: every call fails at once.
        let s = SharedState::open_with(
            "redis://127.0.0.1:1",
            "sb-away:",
            crate::shared::tests::options(),
        )
        .unwrap();
        let cat = crate::health::tests::abc();
        let a = Affinity::shared(s.clone(), &cat);
        let k = Affinity::key(&call("test/model", &"x".repeat(MIN_PREFIX_BYTES), "")).unwrap();
        a.remember(k, 2);
        assert_eq!(a.preferred(k), Some(2));
        a.remember(k, 0);
        assert_eq!(a.preferred(k), Some(0));
    }

    #[test]
    fn events_name_the_key_in_sixteen_hex_digits() {
        let k = AffinityKey(0xfeed);
        let text = format!("inst {:016x} test/model@a b", k.0);
        assert_eq!(parse_event(&text), Some(("inst", k, "test/model@a b")));
        assert_eq!(parse_event("inst feed test/model@a"), None);
        assert_eq!(parse_event("inst 000000000000feed"), None);
        assert_eq!(parse_event("inst 00000000000zfeed m@p"), None);
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
