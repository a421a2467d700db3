//! [`InMemoryHealth`]: the default [`HealthRegistry`], one small mutex per endpoint.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{
    AttemptOutcome, Availability, EndpointHealth, HealthRegistry, HealthState, LastFailure,
    PermitKind, Ticket,
};
use crate::catalog::Endpoint;
use crate::config::HealthConfig;
use crate::error::FailureClass;

/// A time-decayed moving average that jumps at once to bad samples (tower's
/// `PeakEwma` idea): a slow endpoint is noticed at once, a recovered one over `tau`.
#[derive(Debug, Clone, Copy)]
struct Ewma {
    value: f64,
    at: Instant,
}

/// Decay time constant of the observed-performance averages.
const DECAY: Duration = Duration::from_secs(10);

fn ewma_update(slot: &mut Option<Ewma>, sample: f64, now: Instant, worse: fn(f64, f64) -> bool) {
    match slot {
        None => {
            *slot = Some(Ewma {
                value: sample,
                at: now,
            })
        }
        Some(e) => {
            if worse(sample, e.value) {
                e.value = sample;
            } else {
                let dt = now.saturating_duration_since(e.at).as_secs_f64();
                let w = (-dt / DECAY.as_secs_f64()).exp();
                e.value = e.value * w + sample * (1.0 - w);
            }
            e.at = now;
        }
    }
}

/// Who may probe a degraded endpoint once its cooldown is over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum ProbeGate {
    /// This instance alone decides (one probe at a time here).
    #[default]
    Local,
    /// The probe slot is shared and another instance (or none yet) holds it.
    Closed,
    /// This instance holds the shared probe slot until then (a probe taken before
    /// keeps it while in flight).
    OpenUntil(Instant),
}

/// One endpoint's state in [`InMemoryHealth`].
#[derive(Debug, Default)]
struct Slot {
    failures: u32,
    degraded_until: Option<Instant>,
    parked_until: Option<Instant>,
    probing: bool,
    /// Who may probe after the cooldown ([`ProbeGate::Local`] unless
    /// [`RedisHealth`](super::RedisHealth) shares the probe slot through Redis).
    gate: ProbeGate,
    epoch: u64,
    ttft: Option<Ewma>,
    throughput: Option<Ewma>,
    /// Retriable failures in a row since the last success (unlike `failures`, not
    /// reset when degraded): what [`HealthRegistry::snapshot`] shows.
    streak: u32,
    /// The last failure since the last success (for [`HealthRegistry::snapshot`]).
    last_failure: Option<LastFailure>,
}

impl Slot {
    fn availability(&self, now: Instant) -> Availability {
        if let Some(until) = self.degraded_until {
            let slot_here = match self.gate {
                ProbeGate::Local => true,
                ProbeGate::Closed => false,
                ProbeGate::OpenUntil(t) => now < t,
            };
            if now < until || self.probing || !slot_here {
                return Availability::Unavailable { until };
            }
            return Availability::HalfOpen;
        }
        match self.parked_until {
            Some(until) if now < until => Availability::Unavailable { until },
            _ => Availability::Healthy,
        }
    }
}

/// The default [`HealthRegistry`]: one small mutex per endpoint (indexed by
/// [`Endpoint::index`]), so requests to different endpoints never contend. Endpoints
/// beyond the size it was built for are always healthy and untracked.
#[derive(Debug)]
pub struct InMemoryHealth {
    failure_threshold: u32,
    cooldown: Duration,
    slots: Vec<Mutex<Slot>>,
}

impl InMemoryHealth {
    /// A registry for `endpoints` endpoints under the `[health]` settings.
    pub fn new(config: &HealthConfig, endpoints: usize) -> Self {
        InMemoryHealth {
            failure_threshold: config.failure_threshold.max(1),
            cooldown: Duration::from_secs(config.cooldown_secs),
            slots: (0..endpoints)
                .map(|_| Mutex::new(Slot::default()))
                .collect(),
        }
    }

    /// A registry for every endpoint of `catalog`; publishes
    /// `switchboard_endpoint_healthy = 1` for each at once.
    pub fn for_catalog(config: &HealthConfig, catalog: &crate::catalog::Catalog) -> Self {
        catalog
            .endpoints()
            .iter()
            .for_each(|e| set_healthy_gauge(e, true));
        Self::new(config, catalog.endpoints().len())
    }

    /// The same with a cooldown finer than whole seconds (for tests and embedders).
    pub fn with_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    fn slot<R>(&self, e: &Endpoint, f: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        let m = self.slots.get(e.index)?;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        Some(f(&mut g))
    }

    fn degrade(&self, e: &Endpoint, s: &mut Slot, now: Instant) -> Change {
        let until = now + self.cooldown;
        s.degraded_until = Some(until);
        s.failures = 0;
        s.probing = false;
        s.epoch += 1;
        set_healthy_gauge(e, false);
        tracing::warn!(endpoint = %e.label(), cooldown_ms = self.cooldown.as_millis() as u64, "endpoint degraded");
        Change::Degraded { until }
    }

    fn restore(e: &Endpoint, s: &mut Slot) {
        s.degraded_until = None;
        s.failures = 0;
        s.streak = 0;
        s.last_failure = None;
        s.probing = false;
        s.epoch += 1;
        set_healthy_gauge(e, true);
        tracing::info!(endpoint = %e.label(), "endpoint restored");
    }
}

/// What one [`InMemoryHealth::record_change`] did to an endpoint's state (what a shared
/// registry tells the other instances).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing worth sharing (a stale result, a failure that does not count).
    None,
    /// A normal attempt succeeded.
    Succeeded,
    /// A retriable failure was counted, below the threshold.
    Counted,
    /// Degraded until `until` (the threshold was reached, or a probe failed).
    Degraded {
        /// End of the cooldown.
        until: Instant,
    },
    /// Parked by a `Retry-After` until `until`.
    Parked {
        /// End of the park.
        until: Instant,
    },
    /// A probe or last resort got an answer: degraded or parked no more.
    Restored,
    /// A probe was granted (by `acquire`).
    ProbeStarted,
    /// A probe ended without news (cancelled, or our own key at fault): the probe
    /// slot is free again.
    ProbeEnded,
}

/// One endpoint's health as [`InMemoryHealth::view`] shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct View {
    pub(crate) degraded_until: Option<Instant>,
    pub(crate) probing: bool,
}

impl InMemoryHealth {
    /// [`HealthRegistry::record`], saying what changed.
    pub(crate) fn record_change(
        &self,
        e: &Endpoint,
        ticket: Ticket,
        outcome: AttemptOutcome,
        now: Instant,
    ) -> Change {
        self.slot(e, |s| {
            if ticket.epoch != s.epoch {
                // Started before the endpoint last changed state: says nothing of now.
                return Change::None;
            }
            // What the snapshot shows: the last failure, and retriable ones in a row.
            match outcome {
                AttemptOutcome::Success => {
                    s.streak = 0;
                    s.last_failure = None;
                }
                AttemptOutcome::Failed { class, park, kind } => {
                    s.last_failure = Some(LastFailure {
                        kind,
                        retry_after: park,
                    });
                    if class == FailureClass::Retriable && park.is_none() {
                        s.streak = s.streak.saturating_add(1);
                    }
                }
            }
            match (ticket.kind, outcome) {
                (PermitKind::Normal, AttemptOutcome::Success) => {
                    s.failures = 0;
                    Change::Succeeded
                }
                (PermitKind::Normal, AttemptOutcome::Failed { park: Some(d), .. }) => {
                    let until = now + d;
                    let until = s.parked_until.map_or(until, |p| p.max(until));
                    s.parked_until = Some(until);
                    Change::Parked { until }
                }
                (
                    PermitKind::Normal,
                    AttemptOutcome::Failed {
                        class: FailureClass::Retriable,
                        ..
                    },
                ) => {
                    s.failures += 1;
                    if s.failures >= self.failure_threshold {
                        self.degrade(e, s, now)
                    } else {
                        Change::Counted
                    }
                }
                (PermitKind::Normal, AttemptOutcome::Failed { .. }) => Change::None,
                // A probe or last resort that got an answer — even a client fault — shows
                // the endpoint is back.
                (_, AttemptOutcome::Success)
                | (
                    _,
                    AttemptOutcome::Failed {
                        class: FailureClass::Client,
                        ..
                    },
                ) => {
                    let was = s.degraded_until.is_some() || s.parked_until.is_some();
                    if s.degraded_until.is_some() {
                        Self::restore(e, s);
                    }
                    s.parked_until = None;
                    if was {
                        Change::Restored
                    } else {
                        Change::None
                    }
                }
                (
                    _,
                    AttemptOutcome::Failed {
                        class: FailureClass::Retriable,
                        ..
                    },
                ) => self.degrade(e, s, now),
                // Our own key or catalogue at fault: no news; let another probe go.
                (kind, AttemptOutcome::Failed { .. }) => {
                    if kind == PermitKind::Probe {
                        s.probing = false;
                        Change::ProbeEnded
                    } else {
                        Change::None
                    }
                }
            }
        })
        .unwrap_or(Change::None)
    }

    /// [`HealthRegistry::release`], saying whether a probe slot came free.
    pub(crate) fn release_change(&self, e: &Endpoint, ticket: Ticket) -> Change {
        self.slot(e, |s| {
            if ticket.kind == PermitKind::Probe && ticket.epoch == s.epoch {
                s.probing = false;
                Change::ProbeEnded
            } else {
                Change::None
            }
        })
        .unwrap_or(Change::None)
    }

    /// Degraded until `until`, as another instance says. Already degraded: only the
    /// end of the cooldown moves (a probe in flight keeps its chance).
    pub(crate) fn apply_degraded(&self, e: &Endpoint, until: Instant) {
        self.slot(e, |s| {
            if s.degraded_until.is_some() {
                s.degraded_until = Some(until);
                return;
            }
            s.degraded_until = Some(until);
            s.failures = 0;
            s.probing = false;
            s.epoch += 1;
            set_healthy_gauge(e, false);
            tracing::warn!(endpoint = %e.label(), "endpoint degraded (by another instance)");
        });
    }

    /// What degraded or parked `e`, as the instance that saw it says: the failures in
    /// a row and the last of them (what [`HealthRegistry::snapshot`] shows; decisions
    /// never read them).
    pub(crate) fn apply_cause(&self, e: &Endpoint, streak: u32, last: LastFailure) {
        self.slot(e, |s| {
            s.streak = streak;
            s.last_failure = Some(last);
        });
    }

    /// Parked until `until` (at least), as another instance says.
    pub(crate) fn apply_parked(&self, e: &Endpoint, until: Instant) {
        self.slot(e, |s| {
            s.parked_until = Some(s.parked_until.map_or(until, |p| p.max(until)));
        });
    }

    /// Back to healthy, as another instance says; false if it was not degraded or parked.
    pub(crate) fn apply_recovered(&self, e: &Endpoint) -> bool {
        self.slot(e, |s| {
            let was = s.degraded_until.is_some() || s.parked_until.is_some();
            if s.degraded_until.is_some() {
                Self::restore(e, s);
            }
            s.parked_until = None;
            was
        })
        .unwrap_or(false)
    }

    /// Who may probe `e` after its cooldown.
    pub(crate) fn set_gate(&self, e: &Endpoint, gate: ProbeGate) {
        self.slot(e, |s| s.gate = gate);
    }

    /// Degraded until when, and whether a probe is in flight.
    pub(crate) fn view(&self, e: &Endpoint) -> View {
        self.slot(e, |s| View {
            degraded_until: s.degraded_until,
            probing: s.probing,
        })
        .unwrap_or(View {
            degraded_until: None,
            probing: false,
        })
    }

    /// Takes over `old`'s state of each `(old endpoint, new endpoint)` pair: the
    /// consecutive failures, degraded and parked times, observed TTFT and throughput
    /// (what a config reload keeps for the endpoints that still exist; see
    /// `gateway::reload`). A probe in flight on `old` stays `old`'s: here the
    /// endpoint's probe slot is free, and its epoch starts anew (a ticket of `old`
    /// never comes back here). Sets `switchboard_endpoint_healthy` of each pair.
    pub fn carry_over<'a>(
        &self,
        old: &InMemoryHealth,
        pairs: impl IntoIterator<Item = (&'a Endpoint, &'a Endpoint)>,
    ) {
        for (from, to) in pairs {
            let Some(state) = old.slot(from, |s| {
                (
                    s.failures,
                    s.degraded_until,
                    s.parked_until,
                    s.ttft,
                    s.throughput,
                    s.streak,
                    s.last_failure,
                )
            }) else {
                continue;
            };
            let (failures, degraded_until, parked_until, ttft, throughput, streak, last_failure) =
                state;
            self.slot(to, |s| {
                s.streak = streak;
                s.last_failure = last_failure;
                s.failures = failures;
                s.degraded_until = degraded_until;
                s.parked_until = parked_until;
                s.ttft = ttft;
                s.throughput = throughput;
            });
            set_healthy_gauge(to, degraded_until.is_none());
        }
    }

    /// `[health].failure_threshold`.
    pub(crate) fn failure_threshold(&self) -> u32 {
        self.failure_threshold
    }

    /// The cooldown of a degraded endpoint.
    pub(crate) fn cooldown(&self) -> Duration {
        self.cooldown
    }
}

fn set_healthy_gauge(e: &Endpoint, healthy: bool) {
    metrics::gauge!(
        "switchboard_endpoint_healthy",
        "model" => e.model.to_string(),
        "provider" => e.provider.name.to_string()
    )
    .set(if healthy { 1.0 } else { 0.0 });
}

impl HealthRegistry for InMemoryHealth {
    fn availability(&self, e: &Endpoint, now: Instant) -> Availability {
        self.slot(e, |s| s.availability(now))
            .unwrap_or(Availability::Healthy)
    }

    fn parked(&self, e: &Endpoint, now: Instant) -> bool {
        self.slot(e, |s| {
            s.degraded_until.is_none() && s.parked_until.is_some_and(|p| now < p)
        })
        .unwrap_or(false)
    }

    fn acquire(&self, e: &Endpoint, now: Instant, last_resort: bool) -> Option<Ticket> {
        let Some(ticket) = self.slot(e, |s| {
            let kind = match s.availability(now) {
                Availability::Healthy => PermitKind::Normal,
                Availability::HalfOpen => {
                    s.probing = true;
                    PermitKind::Probe
                }
                Availability::Unavailable { .. } if last_resort => PermitKind::LastResort,
                Availability::Unavailable { .. } => return None,
            };
            Some(Ticket {
                kind,
                epoch: s.epoch,
            })
        }) else {
            // Untracked endpoint: always healthy.
            return Some(Ticket {
                kind: PermitKind::Normal,
                epoch: 0,
            });
        };
        ticket
    }

    fn record(&self, e: &Endpoint, ticket: Ticket, outcome: AttemptOutcome, now: Instant) {
        self.record_change(e, ticket, outcome, now);
    }

    fn release(&self, e: &Endpoint, ticket: Ticket) {
        self.release_change(e, ticket);
    }

    fn observe_ttft(&self, e: &Endpoint, ttft: Duration, now: Instant) {
        self.slot(e, |s| {
            ewma_update(&mut s.ttft, ttft.as_secs_f64(), now, |new, old| new > old)
        });
    }

    fn observe_throughput(&self, e: &Endpoint, tokens_per_sec: f64, now: Instant) {
        if tokens_per_sec.is_finite() && tokens_per_sec >= 0.0 {
            self.slot(e, |s| {
                ewma_update(&mut s.throughput, tokens_per_sec, now, |new, old| new < old)
            });
        }
    }

    fn ttft(&self, e: &Endpoint) -> Option<Duration> {
        self.slot(e, |s| s.ttft.map(|t| Duration::from_secs_f64(t.value)))
            .flatten()
    }

    fn throughput(&self, e: &Endpoint) -> Option<f64> {
        self.slot(e, |s| s.throughput.map(|t| t.value)).flatten()
    }

    fn snapshot(&self, e: &Endpoint, now: Instant) -> EndpointHealth {
        self.slot(e, |s| {
            let (state, until) = match (s.degraded_until, s.parked_until) {
                (Some(until), _) if s.probing => (HealthState::Probing, Some(until)),
                (Some(until), _) => (HealthState::Degraded, Some(until)),
                (None, Some(until)) if now < until => (HealthState::Parked, Some(until)),
                _ => (HealthState::Healthy, None),
            };
            EndpointHealth {
                state,
                consecutive_failures: s.streak,
                until,
                last_failure: s.last_failure,
                ttft: s.ttft.map(|t| Duration::from_secs_f64(t.value)),
                tokens_per_second: s.throughput.map(|t| t.value),
            }
        })
        .unwrap_or(EndpointHealth {
            state: HealthState::Healthy,
            consecutive_failures: 0,
            until: None,
            last_failure: None,
            ttft: None,
            tokens_per_second: None,
        })
    }
}
