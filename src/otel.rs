//! OpenTelemetry export (SPEC §9): one span per request and a child span per upstream
//! attempt, sent over OTLP/HTTP (protobuf) in batches, off the request path.
//!
//! [`layer`] builds a `tracing` layer for a `[telemetry]` section and the
//! [`Telemetry`] handle that flushes it; `switchboard serve` adds it to its subscriber
//! when `otlp_endpoint` is set, and library users add it to theirs. The gateway's
//! `LoggingLayer` creates the spans only when the config turns export on
//! ([`LoggingLayer::otel`](crate::logging::LoggingLayer::otel)): with it off, the
//! request path is unchanged.
//!
//! The request span (kind SERVER) continues a client's W3C `traceparent`; each attempt
//! span (kind CLIENT, named `chat {upstream model}`) is its child, and the upstream
//! request carries the attempt's `traceparent`. Attributes follow the GenAI semantic
//! conventions (`gen_ai.operation.name`, `gen_ai.request.model`,
//! `gen_ai.response.model`, `gen_ai.provider.name`, `gen_ai.usage.input_tokens`,
//! `gen_ai.usage.output_tokens`, `gen_ai.response.finish_reasons`, `error.type`),
//! plus `switchboard.cost_usd` and `switchboard.key_id`; they are set once, when the
//! request ends, from its [`CallContext`](crate::context::CallContext).
//!
//! The exporter runs on a thread of its own: spans wait in a bounded queue (2,048;
//! dropped when full) and are posted in batches, so a slow or dead collector costs
//! requests nothing.
//!
//! # Example
//! ```
//! use switchboard::config::TelemetryConfig;
//! use tracing_subscriber::prelude::*;
//!
//! let config = TelemetryConfig {
//!     otlp_endpoint: Some("http://127.0.0.1:4318".into()),
//!     ..TelemetryConfig::default()
//! };
//! let (otel, telemetry) = switchboard::otel::layer(&config).unwrap();
//! let subscriber = tracing_subscriber::registry().with(otel);
//! tracing::subscriber::with_default(subscriber, || {
//!     // … serve a gateway built with the same config …
//! });
//! telemetry.shutdown(); // flushes what is queued
//! ```

use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::catalog::Endpoint;
use crate::chat::{ChatRequest, Dialect};
use crate::config::ProviderKind;
use crate::config::TelemetryConfig;
use crate::context::CallContext;
use crate::logging::RequestRecord;

/// The `tracing` target of the exported spans; the layer from [`layer`] sees only
/// spans of this target (no events, no other spans).
pub const TARGET: &str = "switchboard::otel";

/// The path spans are posted to, under the collector's URL.
const TRACES_PATH: &str = "/v1/traces";

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint: {0}")]
pub struct OtelError(String);

/// The URL spans are posted to: `endpoint` with `/v1/traces` appended unless it
/// already ends so; an error says what is wrong with `endpoint`.
///
/// ```
/// assert_eq!(
///     switchboard::otel::traces_url("http://127.0.0.1:4318").unwrap(),
///     "http://127.0.0.1:4318/v1/traces"
/// );
/// assert!(switchboard::otel::traces_url("127.0.0.1:4318").is_err());
/// ```
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

/// The exporter behind a [`layer`]: flush it, and shut it down when the program ends
/// (dropping it shuts it down too).
#[derive(Debug, Clone)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports every span ended so far; waits for the collector (at most the export
    /// timeout). `false` when the export failed.
    pub fn flush(&self) -> bool {
        self.provider.force_flush().is_ok()
    }

    /// Flushes, then stops the exporter thread.
    pub fn shutdown(&self) -> bool {
        self.provider.shutdown().is_ok()
    }
}

/// Builds the export layer for `config` and its [`Telemetry`] handle. The exporter
/// thread starts at once; nothing connects until the first batch.
pub fn layer<S>(config: &TelemetryConfig) -> Result<(impl Layer<S>, Telemetry), OtelError>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
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
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // What the spans carry is set by the gateway; the rest costs CPU per request.
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_target(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.is_span() && m.target() == TARGET
        }));
    Ok((layer, Telemetry { provider }))
}

/// Reads `traceparent` (and `tracestate`) from request headers.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The request span (`LoggingLayer`, export on): kind SERVER, a child of the client's
/// `traceparent` when it sent a valid one.
/// The span lives in `ctx` (never entered) until [`finish`].
pub(crate) fn request_span(ctx: &CallContext, headers: &http::HeaderMap) {
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        id = %ctx.request_id(),
        otel.kind = "server",
    );
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    ctx.set_trace_span(span);
}

/// The `gen_ai.provider.name` of a provider kind (GenAI semantic conventions).
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

/// Starts an attempt's span (kind CLIENT) under the request span `parent`, and points
/// the upstream `traceparent` at it. Called by fallback only when export is on.
pub(crate) fn attempt_span(
    ctx: &CallContext,
    parent: &tracing::Span,
    request: &ChatRequest,
    endpoint: &Endpoint,
) -> tracing::Span {
    let op = operation(request);
    ctx.set_trace_operation(op);
    let span = tracing::info_span!(
        target: TARGET,
        parent: parent,
        "attempt",
        otel.name = format!("{op} {}", endpoint.upstream_model),
        otel.kind = "client",
    );
    span.set_attribute("gen_ai.operation.name", op);
    span.set_attribute("gen_ai.request.model", endpoint.upstream_model.to_string());
    span.set_attribute(
        "gen_ai.provider.name",
        provider_name(endpoint.provider.kind),
    );
    span.set_attribute("switchboard.provider", endpoint.provider.name.to_string());
    ctx.set_upstream_traceparent(traceparent(&span));
    span
}

/// Marks an attempt's span failed with `error_type` (`error.type`: `"503"`,
/// `"timeout"`, …).
pub(crate) fn attempt_failed(span: &tracing::Span, error_type: &str) {
    span.set_attribute("error.type", error_type.to_string());
    span.set_status(opentelemetry::trace::Status::error(error_type.to_string()));
}

/// The W3C `traceparent` of `span`.
fn traceparent(span: &tracing::Span) -> Option<http::HeaderValue> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
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
    // The span has started (its attempts are its children): renamed on the SDK's span.
    request
        .context()
        .span()
        .update_name(format!("{op} {}", record.requested_model));
    request.set_attribute("gen_ai.operation.name", op);
    request.set_attribute("gen_ai.request.model", record.requested_model.clone());
    request.set_attribute("http.response.status_code", i64::from(record.status));
    if let Some(key) = &record.key_id {
        request.set_attribute("switchboard.key_id", key.clone());
    }
    if let Some(code) = &record.error_code {
        request.set_attribute("error.type", code.clone());
        request.set_status(opentelemetry::trace::Status::error(code.clone()));
    }
    // The attempt span has its provider already.
    if let Some(kind) = ctx.update(|s| s.served.as_ref().map(|e| e.provider.kind)) {
        request.set_attribute("gen_ai.provider.name", provider_name(kind));
    }
    if let Some(provider) = &record.provider {
        request.set_attribute("switchboard.provider", provider.clone());
    }
    for span in std::iter::once(&request).chain(served.as_ref()) {
        if let Some(model) = &record.model {
            span.set_attribute("gen_ai.response.model", model.clone());
        }
        if record.model.is_some() || record.prompt_tokens > 0 {
            span.set_attribute("gen_ai.usage.input_tokens", to_i64(record.prompt_tokens));
            span.set_attribute(
                "gen_ai.usage.output_tokens",
                to_i64(record.completion_tokens),
            );
        }
        if let Some(reason) = &record.finish_reason {
            span.set_attribute(
                "gen_ai.response.finish_reasons",
                opentelemetry::Value::Array(
                    vec![opentelemetry::StringValue::from(reason.clone())].into(),
                ),
            );
        }
        span.set_attribute("switchboard.cost_usd", record.cost.as_usd_f64());
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
