//! Prometheus metrics: one process-wide recorder, rendered at `GET /metrics`.
//!
//! The `metrics` facade has one global recorder per process, and a process may build
//! many gateways (tests do), so the recorder is installed once, on first use, and
//! every gateway renders the same registry. Histograms have fixed buckets and an
//! upkeep thread drains them, so memory stays bounded however long the process runs.
//! Labels are bounded too: `model` and `provider` come from the catalog, never from
//! what a client sent.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `switchboard_requests_total` | counter | `model`, `provider`, `status` |
//! | `switchboard_request_duration_seconds` | histogram | |
//! | `switchboard_ttft_seconds` | histogram | |
//! | `switchboard_overhead_seconds` | histogram (request time − upstream wait) | |
//! | `switchboard_tokens_total` | counter | `model`, `kind` = `prompt`, `completion`, `cached`, `reasoning` |
//! | `switchboard_cost_usd_total` | gauge, only ever increased (USD, float: metrics only) | `model` |
//! | `switchboard_attempts_total` | counter | `provider`, `status` |
//! | `switchboard_fallbacks_total` | counter (attempts after the first) | |
//! | `switchboard_streams_in_flight` | gauge | |
//! | `switchboard_log_records_dropped_total` | counter | |
//! | `switchboard_log_write_errors_total` | counter | |
//! | `switchboard_usage_over_reserve_total` | counter (upstream usage above the request's reservation; charged the reservation) | `model`, `provider` |
//! | `switchboard_cache_requests_total` | counter: cacheable requests by how they were answered ([`crate::cache`]) | `status` = `hit`, `miss`, `coalesced` |
//! | `switchboard_cache_waiting` | gauge: cacheable requests waiting for (or streaming along with) an identical request in flight, here or on another instance | |
//! | `switchboard_idempotency_waiting` | gauge: repeats waiting for the first request of their `Idempotency-Key` ([`crate::idempotency`]), in this process or on another instance | |
//! | `switchboard_affinity_total` | counter: requests with a long prompt by whether their prompt-cache affinity held ([`crate::health::Affinity`]) | `result` = `hit`, `miss` |
//! | `switchboard_config_reloads_total` | counter: config reloads ([`crate::gateway::reload`]) | `result` = `ok`, `refused` (problems in the file, or no file), `failed` (the store could not take the keys) |
//! | `switchboard_config_loaded_timestamp_seconds` | gauge: Unix time the config now in force was loaded | |
//! | `switchboard_config_info` | gauge, 1: the config now in force | `hash` = the first 16 hex digits of its SHA-256 |
//! | `switchboard_otlp_spans_dropped_total` | counter: spans dropped because the OTLP export queue was full ([`crate::otel`]) | |
//! | `switchboard_otlp_export_failures_total` | counter: OTLP batch posts that failed or timed out (their spans dropped) | |
//! | `switchboard_shared_state_up` | gauge: 1 while the `[shared]` Redis answers, 0 while limits and health are local (absent without `[shared]`) | |
//!
//! # Example
//! ```
//! use switchboard::telemetry;
//!
//! telemetry::install(); // a gateway does this when it is built
//! metrics::counter!(telemetry::LOG_RECORDS_DROPPED).increment(1);
//! assert!(telemetry::render().contains("switchboard_log_records_dropped_total"));
//! ```

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Label};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::logging::RequestRecord;

/// Requests by `model`, `provider`, `status`.
pub const REQUESTS: &str = "switchboard_requests_total";
/// Whole request duration, seconds.
pub const REQUEST_DURATION: &str = "switchboard_request_duration_seconds";
/// Time to first token, seconds.
pub const TTFT: &str = "switchboard_ttft_seconds";
/// Time spent in the gateway (request time minus upstream wait), seconds.
pub const OVERHEAD: &str = "switchboard_overhead_seconds";
/// Tokens by `model` and `kind`.
pub const TOKENS: &str = "switchboard_tokens_total";
/// Cost charged, USD, by `model`.
pub const COST: &str = "switchboard_cost_usd_total";
/// Upstream attempts by `provider` and `status`.
pub const ATTEMPTS: &str = "switchboard_attempts_total";
/// Attempts after the first of a request.
pub const FALLBACKS: &str = "switchboard_fallbacks_total";
/// SSE responses being sent.
pub const STREAMS_IN_FLIGHT: &str = "switchboard_streams_in_flight";
/// Request records dropped because the log queue was full.
pub const LOG_RECORDS_DROPPED: &str = "switchboard_log_records_dropped_total";
/// Request records a sink failed to write.
pub const LOG_WRITE_ERRORS: &str = "switchboard_log_write_errors_total";
/// Attempts whose upstream usage was above the request's reservation, by `model` and
/// `provider` (each was charged the reservation; see [`crate::metering`]).
pub const USAGE_OVER_RESERVE: &str = "switchboard_usage_over_reserve_total";

/// Cacheable requests by `status`: `hit` (from the cache), `miss` (went on),
/// `coalesced` (answered by an identical request in flight); see [`crate::cache`].
pub const CACHE_REQUESTS: &str = "switchboard_cache_requests_total";
/// Cacheable requests waiting now for an identical request's answer: coalesced
/// followers (a streamed one until its stream ends) and requests waiting for another
/// instance computing it; see [`crate::cache`].
pub const CACHE_WAITING: &str = "switchboard_cache_waiting";
/// Repeats waiting now for the first request of their `Idempotency-Key` (in this
/// process, or polling for another instance's); see [`crate::idempotency`].
pub const IDEMPOTENCY_WAITING: &str = "switchboard_idempotency_waiting";

/// Requests with a prompt long enough for prompt-cache affinity, by `result`: `hit`
/// (the endpoint that served the prompt before goes first) or `miss`; see
/// [`crate::health::Affinity`].
pub const AFFINITY: &str = "switchboard_affinity_total";

/// Config reloads by `result`: `ok`, `refused`, `failed` ([`crate::gateway::reload`]).
pub const CONFIG_RELOADS: &str = "switchboard_config_reloads_total";
/// Unix time the config now in force was loaded.
pub const CONFIG_LOADED: &str = "switchboard_config_loaded_timestamp_seconds";
/// 1 for the config now in force, by `hash`.
pub const CONFIG_INFO: &str = "switchboard_config_info";

/// Buckets for request durations and TTFT (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Buckets for the gateway's own overhead (seconds): finer at the low end.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once) and returns its handle.
///
/// If another recorder was installed first (by the embedding application), a warning
/// is logged and `/metrics` shows nothing recorded by switchboard.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(TTFT.into()), LATENCY_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(OVERHEAD.into()), OVERHEAD_BUCKETS))
            .expect("bucket lists are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will not show switchboard's metrics");
        }
        describe();
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("switchboard-metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            });
        handle
    })
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    install().render()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REQUESTS,
        "Chat requests by served model, provider and HTTP status"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Whole request time, streams included"
    );
    describe_histogram!(
        TTFT,
        Unit::Seconds,
        "Time from arrival to the first content chunk"
    );
    describe_histogram!(
        OVERHEAD,
        Unit::Seconds,
        "Request time not spent waiting on upstreams"
    );
    describe_counter!(
        TOKENS,
        "Tokens charged, by model and kind (prompt, completion, cached, reasoning)"
    );
    describe_gauge!(
        COST,
        "USD charged, by model (only ever increases; exact amounts are in the ledger)"
    );
    describe_counter!(ATTEMPTS, "Upstream attempts by provider and status");
    describe_counter!(FALLBACKS, "Attempts after the first one of a request");
    describe_gauge!(STREAMS_IN_FLIGHT, "SSE responses being sent");
    describe_counter!(
        LOG_RECORDS_DROPPED,
        "Request records dropped because the log queue was full"
    );
    describe_counter!(
        LOG_WRITE_ERRORS,
        "Request records a log sink failed to write"
    );
    describe_counter!(
        USAGE_OVER_RESERVE,
        "Attempts whose upstream-reported usage was above the request's reservation (charged the reservation), by model and provider"
    );
    describe_gauge!(
        CACHE_WAITING,
        "Cacheable requests waiting now for an identical request's answer (coalesced followers, streamed ones until their end, and waits for another instance)"
    );
    describe_gauge!(
        IDEMPOTENCY_WAITING,
        "Repeats waiting now for the first request of their Idempotency-Key (in this process or on another instance)"
    );
    describe_counter!(
        AFFINITY,
        "Requests with a long prompt by whether the endpoint that last served its prefix went first (hit) or not (miss)"
    );
    describe_counter!(
        CONFIG_RELOADS,
        "Config reloads (SIGHUP, POST /admin/reload) by result: ok, refused, failed"
    );
    describe_gauge!(
        CONFIG_LOADED,
        "Unix time the config now in force was loaded"
    );
    describe_gauge!(CONFIG_INFO, "1 for the config now in force, by hash");
    describe_gauge!(
        crate::shared::SHARED_STATE_UP,
        "1 while the [shared] Redis answers, 0 while rate limits and health are this instance's own"
    );
}

/// Metric handles by name and label values, so a request skips building label sets
/// and hashing them into the registry (≈ 9k instructions per request before, measured
/// with callgrind). Bounded like the labels themselves: catalog names and statuses.
/// Hashed with foldhash: SipHash cost ≈ 2.5k instructions a request here (nine
/// lookups), and the keys are ours, not a client's.
type Handles<T> = RwLock<HashMap<Box<str>, T, foldhash::fast::RandomState>>;

static COUNTERS: OnceLock<Handles<Counter>> = OnceLock::new();
static GAUGES: OnceLock<Handles<Gauge>> = OnceLock::new();
static HISTOGRAMS: OnceLock<Handles<Histogram>> = OnceLock::new();

thread_local! {
    /// Scratch for the lookup key (no allocation once a handle exists).
    static KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The cached handle of `name` with `labels`, registered on first use.
fn handle<T: Clone>(
    cache: &'static OnceLock<Handles<T>>,
    name: &'static str,
    labels: &[(&'static str, &str)],
    register: impl FnOnce(Vec<Label>) -> T,
) -> T {
    let cache = cache.get_or_init(Default::default);
    KEY.with_borrow_mut(|key| {
        key.clear();
        key.push_str(name);
        for (k, v) in labels {
            key.push('\u{1f}');
            key.push_str(k);
            key.push('=');
            key.push_str(v);
        }
        if let Some(h) = cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key.as_str())
        {
            return h.clone();
        }
        install();
        let labels = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.as_str().into())
            .or_insert_with(|| register(labels))
            .clone()
    })
}

/// The counter `name{labels}`, from the handle cache.
pub(crate) fn counter(name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
    handle(&COUNTERS, name, labels, |l| metrics::counter!(name, l))
}

/// The gauge `name{labels}`, from the handle cache.
pub(crate) fn gauge(name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
    handle(&GAUGES, name, labels, |l| metrics::gauge!(name, l))
}

/// The histogram `name` (no labels), from the handle cache.
pub(crate) fn histogram(name: &'static str) -> Histogram {
    handle(&HISTOGRAMS, name, &[], |l| metrics::histogram!(name, l))
}

/// Records the metrics of one finished request.
pub(crate) fn observe(record: &RequestRecord, total: Duration, upstream_wait: Duration) {
    let model = record
        .model
        .as_deref()
        .or_else(|| record.attempts.last().map(|a| a.model.as_str()))
        .unwrap_or("none");
    let provider = record.provider.as_deref().unwrap_or("none");
    let mut status = itoa::Buffer::new();
    counter(
        REQUESTS,
        &[
            ("model", model),
            ("provider", provider),
            ("status", status.format(record.status)),
        ],
    )
    .increment(1);
    histogram(REQUEST_DURATION).record(total.as_secs_f64());
    if let Some(t) = record.ttft_ms {
        histogram(TTFT).record(t as f64 / 1000.0);
    }
    if !record.attempts.is_empty() {
        let overhead = total.saturating_sub(upstream_wait);
        histogram(OVERHEAD).record(overhead.as_secs_f64());
    }
    for (kind, n) in [
        ("prompt", record.prompt_tokens),
        ("completion", record.completion_tokens),
        ("cached", record.cached_tokens),
        ("reasoning", record.reasoning_tokens),
    ] {
        if n > 0 {
            counter(TOKENS, &[("model", model), ("kind", kind)]).increment(n);
        }
    }
    if record.cost.pico() > 0 {
        gauge(COST, &[("model", model)]).increment(record.cost.as_usd_f64());
    }
    for a in &record.attempts {
        counter(
            ATTEMPTS,
            &[
                ("provider", a.provider.as_str()),
                ("status", a.status.as_str()),
            ],
        )
        .increment(1);
    }
    if record.attempts.len() > 1 {
        counter(FALLBACKS, &[]).increment(record.attempts.len() as u64 - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_handles_count_into_the_registry() {
        let before = render();
        let c = counter(FALLBACKS, &[]);
        c.increment(3);
        counter(FALLBACKS, &[]).increment(1);
        let value = |text: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix("switchboard_fallbacks_total "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        assert!(value(&render()) >= value(&before) + 4);
    }

    #[test]
    fn the_same_values_under_other_label_names_are_another_series() {
        counter("switchboard_cache_test_total", &[("a", "x")]).increment(1);
        counter("switchboard_cache_test_total", &[("b", "x")]).increment(2);
        let text = render();
        assert!(
            text.contains(r#"switchboard_cache_test_total{a="x"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"switchboard_cache_test_total{b="x"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn labelled_handles_are_distinct_per_value() {
        counter(ATTEMPTS, &[("provider", "cache-test-a"), ("status", "200")]).increment(2);
        counter(ATTEMPTS, &[("provider", "cache-test-b"), ("status", "200")]).increment(5);
        let text = render();
        assert!(
            text.contains(r#"switchboard_attempts_total{provider="cache-test-a",status="200"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"switchboard_attempts_total{provider="cache-test-b",status="200"} 5"#),
            "{text}"
        );
    }
}
