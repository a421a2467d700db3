//! `GET /admin/endpoints` (SPEC §9): every endpoint of the catalog and its health now,
//! from [`HealthRegistry::snapshot`](crate::health::HealthRegistry::snapshot) (with `[shared]`, this instance's view, which
//! follows the others' changes through Redis).
//!
//! `{"data":[{"model","provider","upstream_model","state","consecutive_failures",
//! "until","ttft_ms","tokens_per_second","last_error","retry_after_secs","reason"}]}`:
//! `state` is `healthy`, `degraded`, `parked` or `probing`; `until` the end of a
//! cooldown or park (RFC 3339, rounded up to the second; `null` when healthy; past
//! for a degraded endpoint whose next attempt probes it); `last_error` the label of
//! the last failure since the last success (`"503"`, `"timeout"`, …); `reason` says
//! why an endpoint is not healthy (`null` when it is).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use http::{HeaderMap, Response};
use serde::Serialize;
use tokio::time::Instant;

use super::AdminState;
use crate::error::Body;
use crate::health::{EndpointHealth, HealthState};

/// One endpoint in `GET /admin/endpoints`.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    /// The gateway model id.
    pub model: String,
    /// The provider's name.
    pub provider: String,
    /// The provider's model name.
    pub upstream_model: String,
    /// `healthy`, `degraded`, `parked` or `probing`.
    pub state: &'static str,
    /// Retriable failures in a row since its last success.
    pub consecutive_failures: u32,
    /// The end of its cooldown or park, RFC 3339 (`null` when healthy).
    pub until: Option<String>,
    /// Observed time to first token, milliseconds (decayed average).
    pub ttft_ms: Option<u64>,
    /// Observed throughput, tokens per second (decayed average).
    pub tokens_per_second: Option<f64>,
    /// The last failure since the last success: `"503"`, `"429"`, `"timeout"`, ….
    pub last_error: Option<String>,
    /// The `Retry-After` of the 429 that parked it, seconds.
    pub retry_after_secs: Option<u64>,
    /// Why it is not healthy, in words (`null` when healthy).
    pub reason: Option<String>,
}

/// Unix seconds of `at` (a runtime instant), rounded up, with `now` / `wall` as
/// the same moment on both clocks.
fn wall_secs(at: Instant, now: Instant, wall: SystemTime) -> u64 {
    let t = if at >= now {
        wall + (at - now)
    } else {
        wall.checked_sub(now - at).unwrap_or(UNIX_EPOCH)
    };
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The view of one endpoint's snapshot.
pub fn view(
    e: &crate::catalog::Endpoint,
    h: &EndpointHealth,
    now: Instant,
    wall: SystemTime,
) -> EndpointView {
    let last_error = h.last_failure.map(|f| f.kind.label());
    let retry_after = h.last_failure.and_then(|f| f.retry_after);
    let whole = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let last = last_error
        .as_deref()
        .unwrap_or("unknown here: another instance saw it");
    let reason = match h.state {
        HealthState::Healthy => None,
        HealthState::Degraded => Some(format!(
            "degraded after {} failure(s) in a row; the last: {last}",
            h.consecutive_failures
        )),
        HealthState::Probing => Some(format!(
            "degraded (the last failure: {last}); its one probe is in flight"
        )),
        HealthState::Parked => Some(match retry_after {
            Some(d) => format!(
                "parked: the upstream answered {last} with Retry-After {} s",
                whole(d)
            ),
            None => format!("parked by a Retry-After (the last failure: {last})"),
        }),
    };
    EndpointView {
        model: e.model.to_string(),
        provider: e.provider.name.to_string(),
        upstream_model: e.upstream_model.clone(),
        state: h.state.as_str(),
        consecutive_failures: h.consecutive_failures,
        until: h
            .until
            .map(|u| crate::clock::format_rfc3339(wall_secs(u, now, wall))),
        ttft_ms: h
            .ttft
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        tokens_per_second: h.tokens_per_second.filter(|t| t.is_finite()),
        last_error,
        retry_after_secs: retry_after.map(whole),
        reason,
    }
}

/// `GET /admin/endpoints`.
pub(super) async fn get_endpoints(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Response<Body> {
    if let Err(e) = crate::accounts::admin_check(&state.accounts, &headers) {
        return e.into_response();
    }
    let (now, wall) = (Instant::now(), SystemTime::now());
    let (catalog, health) = (state.current)();
    let data: Vec<EndpointView> = catalog
        .endpoints()
        .iter()
        .map(|e| view(e, &health.snapshot(e, now), now, wall))
        .collect();
    super::json_ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_become_wall_seconds_rounded_up() {
        let now = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_millis(1_000_500);
        assert_eq!(wall_secs(now, now, wall), 1001);
        assert_eq!(wall_secs(now + Duration::from_millis(500), now, wall), 1001);
        assert_eq!(wall_secs(now + Duration::from_millis(501), now, wall), 1002);
        assert_eq!(wall_secs(now + Duration::from_secs(30), now, wall), 1031);
    }
}
