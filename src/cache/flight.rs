//! Coalescing: the requests in flight by [`CacheKey`], and the live answer of each
//! (its bytes as they arrive) that identical requests follow.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::answer::CachedAnswer;
use super::backend::CacheBackend;
use super::key::{CacheKey, KeyHash};
use crate::telemetry;

/// The leader's response head, once it is a 200.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub content_type: String,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// The leader's request id (its `X-Request-Id`), rewritten for each follower.
    pub old_id: String,
}

/// How a flight ended.
#[derive(Debug, Clone)]
pub(crate) enum End {
    /// A complete answer (stored, or found in the shared cache).
    Done(Arc<CachedAnswer>),
    /// Not a 200, an error, a cut, or past the size bound: nothing stored.
    Failed,
}

#[derive(Default)]
pub(crate) struct State {
    pub head: Option<Arc<Head>>,
    /// The leader's body so far, frame by frame, as it sent them.
    pub frames: Vec<Bytes>,
    pub bytes: usize,
    pub end: Option<End>,
    /// Whether anyone took [`Flight::changes`]: until then a change wakes nobody, and
    /// is not sent (a leader alone, as every miss of all-unique traffic is, skips
    /// three sends, each a lock of all eight of the channel's wait lists).
    watched: bool,
}

/// One request in flight and what identical ones wait on.
pub(crate) struct Flight {
    pub state: Mutex<State>,
    /// Bumped at every change of `state`.
    version: watch::Sender<u64>,
}

impl Flight {
    fn new() -> Self {
        Flight {
            state: Mutex::new(State::default()),
            version: watch::Sender::new(0),
        }
    }

    /// A receiver of the changes (mark it seen before reading `state`). Taken under
    /// the state's lock, so a change is either seen in `state` by its next read or
    /// sent to it ([`changed`](Self::changed)).
    pub fn changes(&self) -> watch::Receiver<u64> {
        let mut st = self.state.lock();
        st.watched = true;
        let rx = self.version.subscribe();
        drop(st);
        rx
    }

    /// Tells the receivers that `state` changed (`watched`: read under the lock that
    /// changed it).
    fn changed(&self, watched: bool) {
        if watched {
            self.version.send_modify(|v| *v += 1);
        }
    }
}

/// The flights of one cache layer (one per process, shared by its clones).
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<CacheKey, Arc<Flight>, KeyHash>>,
}

/// What a request does about a flight.
pub(crate) enum Role {
    /// Nobody computes this key here: this request does.
    Lead(LeadGuard),
    /// Another request does: follow it.
    Follow(Arc<Flight>),
}

impl Flights {
    /// Joins the flight of `key`, or starts one with this request as its leader. Under
    /// one lock: of the requests that find no flight, exactly one leads.
    pub fn join_or_lead(self: &Arc<Self>, key: CacheKey, max_bytes: usize) -> Role {
        let mut map = self.map.lock();
        if let Some(f) = map.get(&key) {
            return Role::Follow(f.clone());
        }
        let flight = Arc::new(Flight::new());
        map.insert(key, flight.clone());
        Role::Lead(LeadGuard {
            flights: self.clone(),
            key,
            flight,
            max_bytes,
            release: None,
            ended: false,
        })
    }

    /// Flights in progress (for tests and metrics).
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Requests following a flight now, over every flight (tests): each follower holds
    /// the flight, besides the map and the leader.
    pub fn followers(&self) -> usize {
        self.map
            .lock()
            .values()
            .map(|f| Arc::strong_count(f).saturating_sub(2))
            .sum()
    }

    /// Counts a request as waiting for an identical one's answer (following it, or
    /// another instance's) until the guard is dropped.
    pub fn waiting(&self) -> Waiting {
        telemetry::gauge(telemetry::CACHE_WAITING, &[]).increment(1.0);
        Waiting(())
    }

    fn remove(&self, key: &CacheKey, flight: &Arc<Flight>) {
        let mut map = self.map.lock();
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
    }
}

/// A request counted as waiting (`switchboard_cache_waiting`) while it lives.
pub(crate) struct Waiting(());

impl Drop for Waiting {
    fn drop(&mut self) {
        telemetry::gauge(telemetry::CACHE_WAITING, &[]).decrement(1.0);
    }
}

/// The leader's hold on its flight: ends it as failed when dropped unfinished (the
/// leader's request or body went away), so a follower takes over.
pub(crate) struct LeadGuard {
    flights: Arc<Flights>,
    key: CacheKey,
    flight: Arc<Flight>,
    /// The most bytes of an answer followed (and stored).
    max_bytes: usize,
    /// A claim across instances to give back at the end.
    release: Option<Arc<dyn CacheBackend>>,
    ended: bool,
}

impl LeadGuard {
    /// Gives back `backend`'s claim of this key when the flight ends.
    pub fn release_with(&mut self, backend: Arc<dyn CacheBackend>) {
        self.release = Some(backend);
    }

    /// The leader's answer is a 200: followers may start.
    pub fn start(&self, head: Head) {
        let watched = {
            let mut st = self.flight.state.lock();
            st.head = Some(Arc::new(head));
            st.watched
        };
        self.flight.changed(watched);
    }

    /// The leader sent `data`; `false` (and nothing kept) once the answer is past the
    /// bound: the caller then drops the guard, failing the flight.
    pub fn push(&self, data: &Bytes) -> bool {
        let mut st = self.flight.state.lock();
        if st.bytes + data.len() > self.max_bytes {
            return false;
        }
        st.bytes += data.len();
        st.frames.push(data.clone());
        let watched = st.watched;
        drop(st);
        self.flight.changed(watched);
        true
    }

    /// The whole body so far, in one piece (a body of one frame, as a JSON answer
    /// usually is, without a copy).
    pub fn body(&self) -> Bytes {
        let st = self.flight.state.lock();
        if let [one] = st.frames.as_slice() {
            return one.clone();
        }
        let mut out = Vec::with_capacity(st.bytes);
        for f in &st.frames {
            out.extend_from_slice(f);
        }
        Bytes::from(out)
    }

    /// The head, if started.
    pub fn head(&self) -> Option<Arc<Head>> {
        self.flight.state.lock().head.clone()
    }

    /// Ends the flight with a complete answer.
    pub fn finish(mut self, answer: Arc<CachedAnswer>) {
        self.end(End::Done(answer));
    }

    fn end(&mut self, end: End) {
        if self.ended {
            return;
        }
        self.ended = true;
        // Out of the map first: a request arriving now looks the key up in the cache
        // (where a done answer already is) or leads anew.
        self.flights.remove(&self.key, &self.flight);
        let failed = matches!(end, End::Failed);
        let watched = {
            let mut st = self.flight.state.lock();
            st.end = Some(end);
            st.watched
        };
        self.flight.changed(watched);
        // A stored answer's claim is given back by the backend's `put`, after the
        // answer is there (so another instance never finds neither).
        if let Some(backend) = self.release.take().filter(|_| failed) {
            backend.release(&self.key);
        }
    }
}

impl Drop for LeadGuard {
    fn drop(&mut self) {
        self.end(End::Failed);
    }
}
