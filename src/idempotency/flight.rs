//! In-process claims: one request at a time runs the first request of an
//! idempotency key in this process; repeats that arrive meanwhile wait for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::telemetry;

/// A client key id and an idempotency key.
pub(crate) type Scope = (String, String);

/// The first requests running in this process, by scope.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<Scope, Arc<Flight>>>,
    /// Repeats of this layer waiting now (what `switchboard_idempotency_waiting`
    /// counts for every layer of the process).
    waiting: AtomicUsize,
}

/// One first request running.
struct Flight {
    fingerprint: [u8; 32],
    /// Set to `true` when the claim ends (its answer recorded, or not).
    done: watch::Sender<bool>,
}

/// What [`Flights::claim`] answers.
pub(crate) enum Claimed {
    /// This request runs; the claim ends when dropped.
    Mine(Claim),
    /// Another request of the same scope runs, with this fingerprint; `done` turns
    /// `true` when it ends.
    Busy {
        fingerprint: [u8; 32],
        done: watch::Receiver<bool>,
    },
}

impl Flights {
    /// Claims `scope` for a request of `fingerprint`, unless another one holds it.
    pub(crate) fn claim(self: &Arc<Self>, scope: Scope, fingerprint: [u8; 32]) -> Claimed {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = map.get(&scope) {
            return Claimed::Busy {
                fingerprint: f.fingerprint,
                done: f.done.subscribe(),
            };
        }
        let flight = Arc::new(Flight {
            fingerprint,
            done: watch::channel(false).0,
        });
        map.insert(scope.clone(), flight.clone());
        Claimed::Mine(Claim {
            flights: self.clone(),
            scope,
            flight,
        })
    }

    /// Counts a repeat as waiting for a first request (here or on another instance)
    /// until the guard is dropped.
    pub(crate) fn waiting(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        telemetry::gauge(telemetry::IDEMPOTENCY_WAITING, &[]).increment(1.0);
        Waiting {
            flights: self.clone(),
        }
    }

    /// How many repeats of this layer are waiting now (tests).
    #[cfg(test)]
    pub(crate) fn waiting_now(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// How many claims are held (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

/// A repeat counted as waiting (`switchboard_idempotency_waiting`) while it lives.
pub(crate) struct Waiting {
    flights: Arc<Flights>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.flights.waiting.fetch_sub(1, Ordering::Relaxed);
        telemetry::gauge(telemetry::IDEMPOTENCY_WAITING, &[]).decrement(1.0);
    }
}

/// The right to run the first request of a scope in this process; released (and
/// the requests waiting for it woken) when dropped.
pub(crate) struct Claim {
    flights: Arc<Flights>,
    scope: Scope,
    flight: Arc<Flight>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        {
            let mut map = self.flights.map.lock().unwrap_or_else(|e| e.into_inner());
            if map
                .get(&self.scope)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                map.remove(&self.scope);
            }
        }
        self.flight.done.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_claim_waits_for_the_first_then_may_claim() {
        let flights = Arc::new(Flights::default());
        let scope = || ("key_1".to_string(), "idem-1".to_string());
        let first = match flights.claim(scope(), [1; 32]) {
            Claimed::Mine(c) => c,
            Claimed::Busy { .. } => panic!("nothing held it"),
        };
        let Claimed::Busy {
            fingerprint,
            mut done,
        } = flights.claim(scope(), [2; 32])
        else {
            panic!("the first holds it");
        };
        assert_eq!(fingerprint, [1; 32]);
        // Another scope is free.
        assert!(matches!(
            flights.claim(("key_2".into(), "idem-1".into()), [1; 32]),
            Claimed::Mine(_)
        ));
        assert!(!*done.borrow());
        drop(first);
        done.wait_for(|d| *d).await.unwrap();
        assert_eq!(flights.len(), 0);
        assert!(matches!(flights.claim(scope(), [2; 32]), Claimed::Mine(_)));
    }
}
