//! OpenTelemetry export (SPEC §9): one span per request and a child span per upstream
//! attempt, sent over OTLP/HTTP (protobuf) in batches, off the request path.
//!
//! [`Telemetry`] is the exporter of a `[telemetry]` section: the gateway builder makes
//! one when `otlp_endpoint` is set (or takes one given to
//! [`GatewayBuilder::telemetry`](crate::gateway::GatewayBuilder::telemetry)) and
//! hands it to `LoggingLayer` ([`LoggingLayer::telemetry`](crate::logging::LoggingLayer::telemetry)),
//! which starts the spans with the OpenTelemetry SDK's tracer directly. With export
//! off, the request path is unchanged (one atomic load where an attempt starts).
//!
//! The spans are the SDK's own, not `tracing` spans bridged by
//! `tracing-opentelemetry`: the bridge put a span in the `tracing` registry per
//! request and per attempt and looked the span up again for every attribute; with
//! it, export on cost +16–19 % gateway CPU per request at 1,000 req/s, without it
//! +14–17 % (BENCHMARKS.md, thirteenth session; most of what is left is the SDK's
//! batch export thread). A library user's own `tracing` subscriber is not involved.
//!
//! The request span (kind SERVER) continues a client's W3C `traceparent`; each attempt
//! span (kind CLIENT, named `chat {upstream model}`) is its child, and the upstream
//! request carries the attempt's `traceparent`. Attributes follow the GenAI semantic
//! conventions (`gen_ai.operation.name`, `gen_ai.request.model`,
//! `gen_ai.response.model`, `gen_ai.provider.name`, `gen_ai.usage.input_tokens`,
//! `gen_ai.usage.output_tokens`, `gen_ai.response.finish_reasons`, `error.type`),
//! plus `switchboard.cost_usd` and `switchboard.key_id`; they are set once, when the
//! request ends, from its [`CallContext`].
//!
//! The exporter runs on a thread of its own: spans wait in a bounded queue (2,048;
//! dropped when full) and are posted in batches, so a slow or dead collector costs
//! requests nothing.
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

use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, StringValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::catalog::Endpoint;
use crate::chat::{ChatRequest, Dialect};
use crate::config::ProviderKind;
use crate::config::TelemetryConfig;
use crate::context::CallContext;
use crate::logging::RequestRecord;

/// An exported span: the OpenTelemetry SDK's own (ended when dropped).
pub type ExportedSpan = opentelemetry_sdk::trace::Span;

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

/// The exporter of one `[telemetry]` section: the SDK's tracer and its batch span
/// processor (a thread of its own; a bounded queue of 2,048 spans, dropped when full;
/// batches of up to 512 posted as OTLP/HTTP protobuf). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Telemetry {
    /// The exporter for `config` (its `otlp_endpoint` must be set).
    pub fn new(config: &TelemetryConfig) -> Result<Telemetry, OtelError> {
        let endpoint = config
            .otlp_endpoint
            .as_deref()
            .ok_or_else(|| OtelError("not set".into()))?;
        let url = traces_url(endpoint).map_err(OtelError)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(Duration::from_secs(config.export_timeout_secs.max(1)))
            .build()
            .map_err(|e| OtelError(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("switchboard");
        Ok(Telemetry { provider, tracer })
    }

    /// Exports every span ended so far; `false` if the collector did not take them.
    pub fn flush(&self) -> bool {
        self.provider.force_flush().is_ok()
    }

    /// Flushes, then stops the exporter (spans ended later are dropped).
    pub fn shutdown(&self) -> bool {
        self.provider.shutdown().is_ok()
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

/// Starts the request's span (kind SERVER), the child of a valid client
/// `traceparent`, and keeps it in `ctx` for the attempts and [`finish`].
pub(crate) fn request_span(t: &Telemetry, ctx: &CallContext, headers: &http::HeaderMap) {
    let parent = if headers.contains_key("traceparent") {
        TraceContextPropagator::new().extract(&Headers(headers))
    } else {
        Context::new()
    };
    let span = t
        .tracer
        .span_builder("request")
        .with_kind(SpanKind::Server)
        .start_with_context(&t.tracer, &parent);
    ctx.set_trace(t.tracer.clone(), Context::new().with_span(span));
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
/// of the request's, and makes it the `traceparent` of the upstream request; `None`
/// (one atomic load) when export is off.
pub(crate) fn attempt_span(
    ctx: &CallContext,
    request: &ChatRequest,
    endpoint: &Endpoint,
) -> Option<ExportedSpan> {
    let (tracer, parent) = ctx.trace_parent()?;
    let op = operation(request);
    ctx.set_trace_operation(op);
    let span = tracer
        .span_builder(format!("{op} {}", endpoint.upstream_model))
        .with_kind(SpanKind::Client)
        .with_attributes([
            KeyValue::new("gen_ai.operation.name", op),
            KeyValue::new("gen_ai.request.model", endpoint.upstream_model.clone()),
            KeyValue::new(
                "gen_ai.provider.name",
                provider_name(endpoint.provider.kind),
            ),
            KeyValue::new(
                "switchboard.provider",
                StringValue::from(endpoint.provider.name.clone()),
            ),
        ])
        .start_with_context(&tracer, &parent);
    ctx.set_upstream_traceparent(traceparent(span.span_context()));
    Some(span)
}

/// Marks a failed attempt's span: `error.type` and an error status.
pub(crate) fn attempt_failed(span: &mut ExportedSpan, error_type: &str) {
    span.set_attribute(KeyValue::new("error.type", error_type.to_string()));
    span.set_status(Status::error(error_type.to_string()));
}

/// The W3C `traceparent` naming `sc`.
fn traceparent(sc: &SpanContext) -> Option<http::HeaderValue> {
    if !sc.is_valid() {
        return None;
    }
    let v = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    http::HeaderValue::from_str(&v).ok()
}

/// Ends the request's spans with their attributes, from its final `record` (called
/// once, when the record is emitted).
pub(crate) fn finish(ctx: &CallContext, record: &RequestRecord) {
    let Some((request, served)) = ctx.take_trace_spans() else {
        return;
    };
    let op = ctx.trace_operation();
    // What the request span and the attempt that served share.
    let mut outcome: Vec<KeyValue> = Vec::with_capacity(5);
    if let Some(model) = &record.model {
        outcome.push(KeyValue::new("gen_ai.response.model", model.clone()));
    }
    if record.model.is_some() || record.prompt_tokens > 0 {
        outcome.push(KeyValue::new(
            "gen_ai.usage.input_tokens",
            to_i64(record.prompt_tokens),
        ));
        outcome.push(KeyValue::new(
            "gen_ai.usage.output_tokens",
            to_i64(record.completion_tokens),
        ));
    }
    if let Some(reason) = &record.finish_reason {
        outcome.push(KeyValue::new(
            "gen_ai.response.finish_reasons",
            Value::Array(vec![StringValue::from(reason.clone())].into()),
        ));
    }
    outcome.push(KeyValue::new(
        "switchboard.cost_usd",
        record.cost.as_usd_f64(),
    ));
    if let Some(mut served) = served {
        served.set_attributes(outcome.iter().cloned());
        served.end();
    }
    let span = request.span();
    span.update_name(format!("{op} {}", record.requested_model));
    let mut attrs = outcome;
    attrs.push(KeyValue::new("gen_ai.operation.name", op));
    attrs.push(KeyValue::new(
        "gen_ai.request.model",
        record.requested_model.clone(),
    ));
    attrs.push(KeyValue::new(
        "http.response.status_code",
        i64::from(record.status),
    ));
    if let Some(key) = &record.key_id {
        attrs.push(KeyValue::new("switchboard.key_id", key.clone()));
    }
    if let Some(kind) = ctx.update(|s| s.served.as_ref().map(|e| e.provider.kind)) {
        attrs.push(KeyValue::new("gen_ai.provider.name", provider_name(kind)));
    }
    if let Some(provider) = &record.provider {
        attrs.push(KeyValue::new("switchboard.provider", provider.clone()));
    }
    if let Some(code) = &record.error_code {
        attrs.push(KeyValue::new("error.type", code.clone()));
        span.set_status(Status::error(code.clone()));
    }
    span.set_attributes(attrs);
    span.end();
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
