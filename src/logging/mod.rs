//! `LoggingLayer`: one [`RequestRecord`] per request, written off the request path.
//!
//! The outermost HTTP layer. It creates the request's [`CallContext`] and puts it in
//! the request extensions (every layer below fills it in), opens a `tracing` span with
//! the request id, and wraps the response body. When the body ends, fails, or is
//! dropped because the client went away — and only after the inner body has been
//! dropped, so the credit settlement inside comes first — it emits exactly one record
//! to a [`LogWriter`] (a bounded queue; a full queue drops and counts, never waits)
//! and records the request's metrics (see [`telemetry`]). It also reads the app
//! attribution headers, `HTTP-Referer` and `X-Title`, into the context (at most
//! [`MAX_APP_BYTES`](crate::store::MAX_APP_BYTES) each): the record and the
//! request's generation stats carry them as `app_url` and `app_title`.
//!
//! # Example
//! ```
//! use std::sync::{Arc, Mutex};
//! use switchboard::context::CallContext;
//! use switchboard::logging::{LoggingLayer, LogSink, LogWriter, RequestRecord};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! struct Memory(Arc<Mutex<Vec<RequestRecord>>>);
//! impl LogSink for Memory {
//!     fn write(&mut self, batch: &[RequestRecord]) -> std::io::Result<()> {
//!         self.0.lock().unwrap().extend_from_slice(batch);
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let records = Arc::new(Mutex::new(Vec::new()));
//! let writer = LogWriter::spawn(Box::new(Memory(records.clone())), 64);
//! let svc = ServiceBuilder::new()
//!     .layer(LoggingLayer::new(writer.clone()))
//!     .service(service_fn(|req: http::Request<String>| async move {
//!         let ctx = req.extensions().get::<CallContext>().unwrap().clone();
//!         ctx.update(|s| s.status = 200);
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hello")))
//!     }));
//! let res = svc.oneshot(http::Request::new(String::new())).await.unwrap();
//! drop(res); // the body is done: the record is emitted
//! assert!(writer.flush(std::time::Duration::from_secs(10)));
//! let records = records.lock().unwrap();
//! assert_eq!(records.len(), 1);
//! assert_eq!(records[0].status, 200);
//! assert!(records[0].id.starts_with("gen-"));
//! # }
//! ```

mod body;
mod future;
mod postgres;
mod record;
mod sink;
mod sqlite;
mod usage;

use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tower::{Layer, Service};

pub use body::LoggedBody;
pub use future::ResponseFuture;
pub use postgres::{PostgresSink, POSTGRES_SCHEMA};
pub use record::{AttemptLog, RequestRecord};
pub use sink::{
    open_sink, sqlite_path_beside_store, JsonlSink, LogSink, LogWriter, DEFAULT_QUEUE, MAX_BATCH,
};
pub use sqlite::{SqliteSink, SQLITE_SCHEMA};
pub use usage::{
    GroupBy, GroupValue, PostgresUsage, SqliteUsage, UsageQuery, UsageRow, UsageSource,
};

use crate::context::CallContext;
use crate::telemetry;

/// Builds [`Logging`] services.
#[derive(Debug, Clone)]
pub struct LoggingLayer {
    writer: LogWriter,
    log_content: bool,
    telemetry: Option<crate::otel::Telemetry>,
}

impl LoggingLayer {
    /// Logs to `writer`, without content.
    pub fn new(writer: LogWriter) -> Self {
        telemetry::install();
        LoggingLayer {
            writer,
            log_content: false,
            telemetry: None,
        }
    }

    /// Starts the spans `telemetry` exports ([`crate::otel`],
    /// `[telemetry].otlp_endpoint`): the request span (continuing a client's
    /// `traceparent`) and a child per upstream attempt. `None` (the default): no span.
    pub fn telemetry(mut self, telemetry: Option<crate::otel::Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Also keeps prompts and completions (`[logging].log_content`).
    pub fn log_content(mut self, on: bool) -> Self {
        self.log_content = on;
        self
    }
}

impl<S> Layer<S> for LoggingLayer {
    type Service = Logging<S>;
    fn layer(&self, inner: S) -> Logging<S> {
        Logging {
            inner,
            layer: self.clone(),
        }
    }
}

/// Creates the call context and logs each request; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Logging<S> {
    inner: S,
    layer: LoggingLayer,
}

impl<S> Logging<S> {
    /// Wraps `inner`, logging to `writer`.
    pub fn new(inner: S, writer: LogWriter) -> Self {
        LoggingLayer::new(writer).layer(inner)
    }

    /// A [`LoggingLayer`].
    pub fn layer(writer: LogWriter) -> LoggingLayer {
        LoggingLayer::new(writer)
    }
}

impl<S, B, ResBody> Service<Request<B>> for Logging<S>
where
    S: Service<Request<B>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<LoggedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let ctx = req
            .extensions()
            .get::<CallContext>()
            .cloned()
            .unwrap_or_default();
        // App attribution (SPEC §8.3): kept bounded, whatever the client sends.
        let header = |name: &str| {
            req.headers().get(name).and_then(|v| {
                crate::store::bounded_app_field(&String::from_utf8_lossy(v.as_bytes()))
            })
        };
        let (app_url, app_title) = (header("http-referer"), header("x-title"));
        if self.layer.log_content || app_url.is_some() || app_title.is_some() {
            ctx.update(|s| {
                if self.layer.log_content {
                    // Asks metering to keep the completion text and the request.
                    s.completion_text = Some(String::new());
                }
                s.app_url = app_url;
                s.app_title = app_title;
            });
        }
        req.extensions_mut().insert(ctx.clone());
        if let Some(t) = &self.layer.telemetry {
            // A span of its own, held by the context and never entered: entering it at
            // every poll of a stream costs more than the export (BENCHMARKS.md).
            crate::otel::request_span(t, &ctx, req.headers());
        }
        let span = tracing::info_span!("request", id = %ctx.request_id());
        let guard = Guard {
            ctx,
            writer: self.layer.writer.clone(),
            log_content: self.layer.log_content,
            stream: false,
            complete: false,
            client_ip: req
                .extensions()
                .get::<crate::client_ip::ClientIp>()
                .map(|c| c.0),
        };
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        ResponseFuture::new(inner, guard, span)
    }
}

/// Emits the record when dropped; always the last field of its owner, so it is
/// dropped after the inner future or body (and the settlement they hold).
pub(crate) struct Guard {
    ctx: CallContext,
    writer: LogWriter,
    log_content: bool,
    /// Counted in `switchboard_streams_in_flight`.
    stream: bool,
    /// The body was sent to its end.
    complete: bool,
    /// The client's address ([`crate::client_ip`]), into the record (formatted by the
    /// sink, on the log writer's thread).
    client_ip: Option<std::net::IpAddr>,
}

impl Guard {
    /// The request id of the call this guard logs.
    pub(crate) fn request_id(&self) -> &str {
        self.ctx.request_id()
    }

    /// Marks the response as a stream in flight.
    pub(crate) fn start_stream(&mut self) {
        if !self.stream {
            self.stream = true;
            telemetry::gauge(telemetry::STREAMS_IN_FLIGHT, &[]).increment(1.0);
        }
    }

    /// Records the status sent, unless a layer below already did.
    pub(crate) fn note_status(&self, status: u16) {
        self.ctx.update(|s| {
            if s.status == 0 {
                s.status = status;
            }
        });
    }

    pub(crate) fn set_complete(&mut self) {
        self.complete = true;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.stream {
            telemetry::gauge(telemetry::STREAMS_IN_FLIGHT, &[]).decrement(1.0);
        }
        let total = self.ctx.started().elapsed();
        let mut record =
            RequestRecord::from_context(&self.ctx, total, self.complete, self.log_content);
        record.client_ip = self.client_ip;
        let upstream_wait: Duration = self.ctx.update(|s| s.upstream_wait);
        telemetry::observe(&record, total, upstream_wait);
        crate::otel::finish(&self.ctx, &record);
        tracing::info!(
            request_id = %record.id,
            status = record.status,
            model = record.model.as_deref().unwrap_or("-"),
            provider = record.provider.as_deref().unwrap_or("-"),
            prompt_tokens = record.prompt_tokens,
            completion_tokens = record.completion_tokens,
            cost = %record.cost,
            latency_ms = record.latency_ms,
            complete = record.complete,
            "request finished"
        );
        self.writer.send(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Money;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tower::{service_fn, ServiceExt};

    #[derive(Clone, Default)]
    struct Memory(Arc<Mutex<Vec<RequestRecord>>>);
    impl LogSink for Memory {
        fn write(&mut self, batch: &[RequestRecord]) -> std::io::Result<()> {
            self.0.lock().unwrap().extend_from_slice(batch);
            Ok(())
        }
    }

    /// A body that "settles" (writes a cost into the context) when dropped, as the
    /// credit stage does.
    struct Settling {
        ctx: CallContext,
    }
    impl Drop for Settling {
        fn drop(&mut self) {
            self.ctx.update(|s| s.cost = Money::from_pico(42));
        }
    }
    impl http_body::Body for Settling {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    fn setup() -> (Memory, LogWriter) {
        let mem = Memory::default();
        let writer = LogWriter::spawn(Box::new(mem.clone()), 16);
        (mem, writer)
    }

    #[tokio::test]
    async fn the_record_comes_after_the_inner_body_is_dropped_and_only_once() {
        let (mem, writer) = setup();
        let svc = LoggingLayer::new(writer.clone()).layer(service_fn(
            |req: http::Request<()>| async move {
                let ctx = req.extensions().get::<CallContext>().unwrap().clone();
                ctx.update(|s| s.status = 200);
                let mut res = http::Response::new(Settling { ctx });
                res.headers_mut()
                    .insert("content-type", "text/event-stream".parse().unwrap());
                Ok::<_, std::convert::Infallible>(res)
            },
        ));
        let res = svc.oneshot(http::Request::new(())).await.unwrap();
        assert!(writer.flush(Duration::from_secs(10)));
        assert!(
            mem.0.lock().unwrap().is_empty(),
            "nothing before the body is done"
        );
        drop(res); // the client went away mid-stream
        assert!(writer.flush(Duration::from_secs(10)));
        let recs = mem.0.lock().unwrap().clone();
        assert_eq!(recs.len(), 1);
        assert_eq!(
            recs[0].cost,
            Money::from_pico(42),
            "settled before the record"
        );
        assert!(!recs[0].complete);
        assert_eq!(recs[0].status, 200);
    }

    #[tokio::test]
    async fn the_status_of_a_response_from_outside_the_typed_stack_is_recorded() {
        let (mem, writer) = setup();
        let svc =
            LoggingLayer::new(writer.clone()).layer(service_fn(|_req: http::Request<()>| async {
                let mut res = http::Response::new(String::from("no key"));
                *res.status_mut() = http::StatusCode::UNAUTHORIZED;
                Ok::<_, std::convert::Infallible>(res)
            }));
        drop(svc.oneshot(http::Request::new(())).await.unwrap());
        assert!(writer.flush(Duration::from_secs(10)));
        assert_eq!(mem.0.lock().unwrap()[0].status, 401);
    }

    #[tokio::test]
    async fn a_request_dropped_before_its_response_is_logged_as_499() {
        let (mem, writer) = setup();
        let svc =
            LoggingLayer::new(writer.clone()).layer(service_fn(|_req: http::Request<()>| async {
                std::future::pending::<()>().await;
                Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
            }));
        let fut = svc.oneshot(http::Request::new(()));
        assert!(tokio::time::timeout(Duration::from_millis(10), fut)
            .await
            .is_err());
        assert!(writer.flush(Duration::from_secs(10)));
        let recs = mem.0.lock().unwrap().clone();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].status, 499);
    }

    #[tokio::test]
    async fn content_is_asked_for_only_with_log_content() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        for on in [false, true] {
            let seen = seen.clone();
            let svc = LoggingLayer::new(LogWriter::none())
                .log_content(on)
                .layer(service_fn(move |req: http::Request<()>| {
                    let ctx = req.extensions().get::<CallContext>().unwrap().clone();
                    seen.lock()
                        .unwrap()
                        .push(ctx.snapshot().completion_text.is_some());
                    async { Ok::<_, std::convert::Infallible>(http::Response::new(String::new())) }
                }));
            drop(svc.oneshot(http::Request::new(())).await.unwrap());
        }
        assert_eq!(*seen.lock().unwrap(), [false, true]);
    }

    #[test]
    fn the_sqlite_log_sits_beside_the_store() {
        assert_eq!(
            sqlite_path_beside_store("sqlite://switchboard.db").unwrap(),
            std::path::Path::new("switchboard-logs.db")
        );
        assert_eq!(
            sqlite_path_beside_store("sqlite:///var/lib/sb/main.db").unwrap(),
            std::path::Path::new("/var/lib/sb/switchboard-logs.db")
        );
        assert!(sqlite_path_beside_store("sqlite::memory:").is_none());
    }

    #[test]
    fn the_sqlite_sink_writes_a_batch_in_one_transaction() {
        let mut sink = SqliteSink::memory().unwrap();
        let ctx = CallContext::new();
        ctx.update(|s| {
            s.status = 200;
            s.cost = Money::from_pico(1_500_000);
        });
        let a = RequestRecord::from_context(&ctx, Duration::from_millis(5), true, false);
        let mut b = a.clone();
        b.id = "gen-other".into();
        sink.write(&[a, b]).unwrap();
        let (n, pico): (i64, i64) = sink
            .connection()
            .query_row("SELECT COUNT(*), SUM(cost_pico) FROM requests", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((n, pico), (2, 3_000_000));
    }
}
