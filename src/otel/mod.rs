//! OpenTelemetry export (SPEC §9): one span per request and a child span per upstream
//! attempt, sent over OTLP/HTTP (protobuf) in batches, off the request path.
//!
//! [`Telemetry`] is the exporter of a `[telemetry]` section: the gateway builder makes
//! one when `otlp_endpoint` is set (or takes one given to
//! [`GatewayBuilder::telemetry`](crate::gateway::GatewayBuilder::telemetry)) and
//! hands it to `LoggingLayer` ([`LoggingLayer::telemetry`](crate::logging::LoggingLayer::telemetry)),
//! which starts the request's spans. With export off, the request path is unchanged
//! (one atomic load where an attempt starts and ends).
//!
//! The request span (kind SERVER) continues a client's W3C `traceparent` (parsed by
//! the OpenTelemetry SDK's propagator; an unsampled parent means no export); each
//! attempt span (kind CLIENT, named `chat {upstream model}`) is its child, and the
//! upstream request carries the attempt's `traceparent`. Attributes follow the GenAI
//! semantic conventions (`gen_ai.operation.name`, `gen_ai.request.model`,
//! `gen_ai.response.model`, `gen_ai.response.id`, `gen_ai.provider.name`,
//! `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
//! `gen_ai.response.finish_reasons`, `error.type`), plus `switchboard.cost_usd`,
//! `switchboard.key_id` and `switchboard.provider`; they are written once, when the
//! span ends, from the request's record and [`CallContext`].
//!
//! **How.** A span here is its ids and start time while the request runs; when it
//! ends it is encoded to OTLP protobuf at once, on the request's thread, from
//! borrowed parts (`wire.rs`: no attribute copied, no allocation beyond the batch
//! buffer), and appended to the open batch; a thread of the exporter's own posts the
//! batches (at most 2,048 spans wait, dropped when full), so a slow or dead collector
//! costs requests nothing. Three designs were measured (BENCHMARKS.md, thirteenth and
//! fourteenth sessions, 1,000 req/s, gateway CPU per request with export on against
//! off): `tracing` spans bridged by
//! `tracing-opentelemetry`, +16–19 % gateway CPU per request; the SDK's own spans with
//! its batch processor and the `opentelemetry-otlp` exporter, +13–24 % (the SDK's
//! span machinery and its allocations on the request threads, then the exporter's
//! conversion of every span into generated structs and their encoding); this one, +2.5–3.3 % (+1–6 % streamed). The ids come from
//! the SDK's `RandomIdGenerator`.
//!
//! # Example
//! ```
//! use switchboard::config::TelemetryConfig;
//!
//! let config = TelemetryConfig {
//!     otlp_endpoint: Some("http://127.0.0.1:4318".into()),
//!     ..TelemetryConfig::default()
//! };
//! let telemetry = switchboard::otel::Telemetry::new(&config).unwrap();
//! // … `Gateway::builder().telemetry(telemetry.clone())`, or a config with the same
//! // `[telemetry]` and the builder makes its own (`Gateway::telemetry` returns it) …
//! telemetry.shutdown(); // flushes what is queued
//! ```

use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

use crate::catalog::Endpoint;
use crate::chat::{ChatRequest, Dialect};
use crate::config::ProviderKind;
use crate::config::TelemetryConfig;
use crate::context::CallContext;
use crate::logging::RequestRecord;

mod export;
mod wire;

pub use export::{EXPORT_FAILURES, SPANS_DROPPED};
use wire::{Attr, SpanParts, Val};

/// Where spans are posted under the collector's base URL (OTLP/HTTP).
const TRACES_PATH: &str = "/v1/traces";

/// `[telemetry].otlp_endpoint` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint: {0}")]
pub struct OtelError(String);

/// The URL spans are posted to: `endpoint` with `/v1/traces` appended, unless it ends
/// so already. An error says why `endpoint` is not an `http(s)://` URL with a host.
pub fn traces_url(endpoint: &str) -> Result<String, String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("`{endpoint}` is not a URL ({e}); e.g. http://127.0.0.1:4318"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(format!(
            "`{endpoint}` must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:4318"
        ));
    }
    let base = endpoint.trim_end_matches('/');
    Ok(if base.ends_with(TRACES_PATH) {
        base.to_string()
    } else {
        format!("{base}{TRACES_PATH}")
    })
}

/// The exporter of one `[telemetry]` section: spans are encoded as they end and
/// posted in batches of up to 512 as OTLP/HTTP protobuf by a thread of its own (at
/// most 2,048 spans wait; later ones are dropped and counted in
/// `switchboard_otlp_spans_dropped_total`). Cheap to clone; the last clone dropped
/// posts what is queued and ends the thread.
#[derive(Debug, Clone)]
pub struct Telemetry {
    exporter: Arc<export::Exporter>,
}

impl Telemetry {
    /// The exporter for `config` (its `otlp_endpoint` must be set); its poster
    /// thread starts now. `OTEL_EXPORTER_OTLP_HEADERS` that cannot be read is an error.
    pub fn new(config: &TelemetryConfig) -> Result<Telemetry, OtelError> {
        let endpoint = config
            .otlp_endpoint
            .as_deref()
            .ok_or_else(|| OtelError("not set".into()))?;
        let url = traces_url(endpoint).map_err(OtelError)?;
        let url: http::Uri = url.parse().map_err(|e| OtelError(format!("{e}")))?;
        let timeout = Duration::from_secs(config.export_timeout_secs.max(1));
        let settings = export::Settings::from_env(url, timeout).map_err(OtelError)?;
        let mut resource = Vec::new();
        for a in [
            Attr("service.name", Val::Str(&config.service_name)),
            Attr("telemetry.sdk.name", Val::Str("switchboard")),
            Attr("telemetry.sdk.language", Val::Str("rust")),
            Attr("telemetry.sdk.version", Val::Str(env!("CARGO_PKG_VERSION"))),
        ] {
            wire::put_kv(&mut resource, 1, &a);
        }
        let exporter = export::Exporter::new(settings, resource)
            .map_err(|e| OtelError(format!("cannot start the exporter's thread: {e}")))?;
        Ok(Telemetry {
            exporter: Arc::new(exporter),
        })
    }

    /// Exports every span ended so far; `false` if the collector did not take them.
    pub fn flush(&self) -> bool {
        self.exporter.flush()
    }

    /// Posts what is queued (waiting at most `export_timeout_secs`), then stops the
    /// exporter (spans ended later are dropped); `false` if not all was taken.
    pub fn shutdown(&self) -> bool {
        self.exporter.shutdown()
    }
}

/// A request's headers, read by the W3C trace-context propagator.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// A request's spans while it runs, held in its [`CallContext`] (only when export is
/// on): the request span's ids and start, and the upstream attempt in flight.
pub(crate) struct RequestTrace {
    telemetry: Telemetry,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// The client's span, when its `traceparent` was valid (always remote).
    parent: Option<[u8; 8]>,
    /// The client's `tracestate`, carried by every span of the trace.
    trace_state: String,
    /// W3C trace flags: the client's, else sampled. Unsampled spans are not exported.
    flags: u8,
    /// Unix nanoseconds.
    start: u64,
    /// `gen_ai.operation.name`, known once the request is parsed (first attempt).
    operation: OnceLock<&'static str>,
    spans: Mutex<Spans>,
}

/// What changes while the request runs.
#[derive(Default)]
struct Spans {
    /// The request span has been exported: later attempts make no span.
    ended: bool,
    /// The attempt in flight, or the one that served (until the request ends).
    attempt: Option<Attempt>,
    /// The `traceparent` of the attempt in flight, for the upstream request.
    upstream: Option<http::HeaderValue>,
}

/// An upstream attempt's span, not yet ended.
struct Attempt {
    span_id: [u8; 8],
    start: u64,
    endpoint: Arc<Endpoint>,
    served: bool,
}

impl RequestTrace {
    /// The `traceparent` header naming the attempt in flight.
    pub(crate) fn upstream_traceparent(&self) -> Option<http::HeaderValue> {
        self.lock().upstream.clone()
    }

    /// `gen_ai.operation.name`: `chat` until an attempt says otherwise.
    fn operation(&self) -> &'static str {
        self.operation.get().copied().unwrap_or("chat")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Spans> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

thread_local! {
    /// Where a request's spans are encoded before they are queued.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encodes the spans `write` puts in the thread's scratch buffer and queues them.
fn submit(t: &Telemetry, spans: usize, write: impl FnOnce(&mut Vec<u8>)) {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        buf.clear();
        write(&mut buf);
        t.exporter.submit(&buf, spans);
    });
}

/// A span's attributes, gathered without allocating (the gateway's spans carry
/// at most 16).
struct Attrs<'a> {
    buf: [Attr<'a>; 16],
    n: usize,
}

impl<'a> Attrs<'a> {
    fn new() -> Self {
        Attrs {
            buf: [Attr("", Val::Int(0)); 16],
            n: 0,
        }
    }

    fn push(&mut self, a: Attr<'a>) {
        self.buf[self.n] = a;
        self.n += 1;
    }

    fn as_slice(&self) -> &[Attr<'a>] {
        &self.buf[..self.n]
    }
}

fn now() -> u64 {
    wire::nanos(SystemTime::now())
}

/// Starts the request's span (kind SERVER), the child of a valid client
/// `traceparent`, and keeps it in `ctx` for the attempts and [`finish`].
pub(crate) fn request_span(t: &Telemetry, ctx: &CallContext, headers: &http::HeaderMap) {
    let start = now();
    let ids = RandomIdGenerator::default();
    let parent = headers
        .contains_key("traceparent")
        .then(|| {
            let cx = TraceContextPropagator::new().extract(&Headers(headers));
            cx.span().span_context().clone()
        })
        .filter(|sc| sc.is_valid());
    let (trace_id, parent, trace_state, flags) = match parent {
        Some(sc) => (
            sc.trace_id().to_bytes(),
            Some(sc.span_id().to_bytes()),
            sc.trace_state().header(),
            sc.trace_flags().to_u8(),
        ),
        None => (ids.new_trace_id().to_bytes(), None, String::new(), 1),
    };
    ctx.set_trace(RequestTrace {
        telemetry: t.clone(),
        trace_id,
        span_id: ids.new_span_id().to_bytes(),
        parent,
        trace_state,
        flags,
        start,
        operation: OnceLock::new(),
        spans: Mutex::new(Spans::default()),
    });
}

/// `gen_ai.provider.name` of a provider kind (the GenAI conventions' values; the
/// mock is ours).
fn provider_name(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::OpenAi => "openai",
        ProviderKind::Anthropic => "anthropic",
        ProviderKind::Gemini => "gcp.gemini",
        ProviderKind::Mock => "switchboard.mock",
    }
}

/// `gen_ai.operation.name` of a request.
fn operation(request: &ChatRequest) -> &'static str {
    match request.inbound.dialect {
        Dialect::Embeddings => "embeddings",
        Dialect::Completions => "text_completion",
        _ => "chat",
    }
}

/// Starts an attempt's span (kind CLIENT, `{operation} {upstream model}`), the child
/// of the request's, and makes it the `traceparent` of the upstream request. One
/// atomic load when export is off.
pub(crate) fn attempt_span(ctx: &CallContext, request: &ChatRequest, endpoint: &Arc<Endpoint>) {
    let Some(tr) = ctx.trace() else {
        return;
    };
    let _ = tr.operation.set(operation(request));
    let span_id = RandomIdGenerator::default().new_span_id().to_bytes();
    let upstream = traceparent(&tr.trace_id, &span_id, tr.flags);
    let mut spans = tr.lock();
    if spans.ended {
        return;
    }
    spans.attempt = Some(Attempt {
        span_id,
        start: now(),
        endpoint: endpoint.clone(),
        served: false,
    });
    spans.upstream = Some(upstream);
}

/// The attempt in flight served the request: its span stays open until the request
/// ends, to carry the outcome.
pub(crate) fn attempt_served(ctx: &CallContext) {
    if let Some(tr) = ctx.trace() {
        if let Some(a) = tr.lock().attempt.as_mut() {
            a.served = true;
        }
    }
}

/// The attempt in flight failed: its span ends now, with `error.type` and an error
/// status.
pub(crate) fn attempt_failed(ctx: &CallContext, error_type: &str) {
    let Some(tr) = ctx.trace() else {
        return;
    };
    let Some(a) = tr.lock().attempt.take() else {
        return;
    };
    if tr.sampled() {
        let end = now();
        submit(&tr.telemetry, 1, |buf| {
            put_attempt(buf, tr, &a, end, &[], Some(error_type));
        });
    }
}

/// The base attributes of an attempt's span, then `more`.
fn put_attempt(
    buf: &mut Vec<u8>,
    tr: &RequestTrace,
    a: &Attempt,
    end: u64,
    more: &[Attr<'_>],
    error: Option<&str>,
) {
    let op = tr.operation();
    let e = &a.endpoint;
    let mut attrs = Attrs::new();
    attrs.push(Attr("gen_ai.operation.name", Val::Str(op)));
    attrs.push(Attr("gen_ai.request.model", Val::Str(&e.upstream_model)));
    attrs.push(Attr(
        "gen_ai.provider.name",
        Val::Str(provider_name(e.provider.kind)),
    ));
    attrs.push(Attr("switchboard.provider", Val::Str(&e.provider.name)));
    for a in more {
        attrs.push(*a);
    }
    if let Some(err) = error {
        attrs.push(Attr("error.type", Val::Str(err)));
    }
    wire::put_span(
        buf,
        2,
        &SpanParts {
            trace_id: tr.trace_id,
            span_id: a.span_id,
            parent: Some((tr.span_id, false)),
            trace_state: &tr.trace_state,
            name: &[op, " ", &e.upstream_model],
            kind: wire::CLIENT,
            start: a.start,
            end,
            attrs: attrs.as_slice(),
            status: error.map_or((wire::UNSET, ""), |err| (wire::ERROR, err)),
            flags: tr.flags,
        },
    );
}

/// The W3C `traceparent` naming span `span_id` of trace `trace_id`.
fn traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> http::HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut v = [0u8; 55];
    v[..3].copy_from_slice(b"00-");
    let mut i = 3;
    for b in trace_id {
        v[i] = HEX[usize::from(b >> 4)];
        v[i + 1] = HEX[usize::from(b & 15)];
        i += 2;
    }
    v[i] = b'-';
    i += 1;
    for b in span_id {
        v[i] = HEX[usize::from(b >> 4)];
        v[i + 1] = HEX[usize::from(b & 15)];
        i += 2;
    }
    v[i] = b'-';
    v[i + 1] = HEX[usize::from(flags >> 4)];
    v[i + 2] = HEX[usize::from(flags & 15)];
    http::HeaderValue::from_bytes(&v).expect("hex digits and dashes")
}

/// Ends the request's spans with their attributes, from its final `record` (called
/// once, when the record is emitted): the attempt that served (or one still in flight
/// when the client went away) and the request's own.
pub(crate) fn finish(ctx: &CallContext, record: &RequestRecord) {
    let Some(tr) = ctx.trace() else {
        return;
    };
    let attempt = {
        let mut spans = tr.lock();
        if std::mem::replace(&mut spans.ended, true) {
            return;
        }
        spans.attempt.take()
    };
    if !tr.sampled() {
        return;
    }
    let end = now();
    let op = tr.operation();
    let served_kind = ctx.update(|s| s.served.as_ref().map(|e| e.provider.kind));
    // What the request span and the attempt that served share.
    let reasons: [&str; 1] = [record.finish_reason.as_deref().unwrap_or("")];
    let mut outcome = Attrs::new();
    if let Some(model) = &record.model {
        outcome.push(Attr("gen_ai.response.model", Val::Str(model)));
    }
    if record.model.is_some() || record.prompt_tokens > 0 {
        let (input, output) = (record.prompt_tokens, record.completion_tokens);
        outcome.push(Attr("gen_ai.usage.input_tokens", Val::Int(to_i64(input))));
        outcome.push(Attr("gen_ai.usage.output_tokens", Val::Int(to_i64(output))));
    }
    if record.finish_reason.is_some() {
        outcome.push(Attr("gen_ai.response.finish_reasons", Val::Strs(&reasons)));
    }
    outcome.push(Attr(
        "switchboard.cost_usd",
        Val::F64(record.cost.as_usd_f64()),
    ));
    let outcome = outcome.as_slice();

    let mut attrs = Attrs::new();
    for a in outcome {
        attrs.push(*a);
    }
    attrs.push(Attr("gen_ai.operation.name", Val::Str(op)));
    attrs.push(Attr(
        "gen_ai.request.model",
        Val::Str(&record.requested_model),
    ));
    attrs.push(Attr(
        "http.response.status_code",
        Val::Int(i64::from(record.status)),
    ));
    attrs.push(Attr("gen_ai.response.id", Val::Str(&record.id)));
    if let Some(key) = &record.key_id {
        attrs.push(Attr("switchboard.key_id", Val::Str(key)));
    }
    if let Some(kind) = served_kind {
        attrs.push(Attr("gen_ai.provider.name", Val::Str(provider_name(kind))));
    }
    if let Some(provider) = &record.provider {
        attrs.push(Attr("switchboard.provider", Val::Str(provider)));
    }
    if let Some(code) = &record.error_code {
        attrs.push(Attr("error.type", Val::Str(code)));
    }
    let spans = 1 + usize::from(attempt.is_some());
    submit(&tr.telemetry, spans, |buf| {
        if let Some(a) = &attempt {
            let more = if a.served { outcome } else { &[] };
            put_attempt(buf, tr, a, end, more, None);
        }
        wire::put_span(
            buf,
            2,
            &SpanParts {
                trace_id: tr.trace_id,
                span_id: tr.span_id,
                parent: tr.parent.map(|p| (p, true)),
                trace_state: &tr.trace_state,
                name: &[op, " ", &record.requested_model],
                kind: wire::SERVER,
                start: tr.start,
                end,
                attrs: attrs.as_slice(),
                status: record
                    .error_code
                    .as_deref()
                    .map_or((wire::UNSET, ""), |c| (wire::ERROR, c)),
                flags: tr.flags,
            },
        );
    });
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
