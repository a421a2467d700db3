//! The exporter: spans arrive already encoded (`wire.rs`, on the thread that
//! ended them), are appended to the open batch under a short lock, and a thread of
//! the exporter's own posts the batches. It wakes once per batch, wraps the spans in
//! the resource's and scope's messages and posts them with the upstream transport's
//! client (so an `https://` collector works, with the same webpki roots).
//!
//! Bounds: at most `max_queue` spans wait (further ones are dropped and counted in
//! `switchboard_otlp_spans_dropped_total`); a batch is posted when it holds
//! `max_batch` spans or `schedule_delay` after the last post; a post that fails or
//! outlasts the export timeout is dropped (`switchboard_otlp_export_failures_total`).
//! The standard `OTEL_BSP_SCHEDULE_DELAY` (ms), `OTEL_BSP_MAX_QUEUE_SIZE` and
//! `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` variables set them (5,000 / 2,048 / 512), and
//! `OTEL_EXPORTER_OTLP_TRACES_HEADERS` (or `OTEL_EXPORTER_OTLP_HEADERS`),
//! `key=value` pairs separated by commas, adds headers to every post (a hosted
//! backend's API key); `OTEL_EXPORTER_OTLP_TRACES_COMPRESSION` (or
//! `OTEL_EXPORTER_OTLP_COMPRESSION`) `gzip` compresses them.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::wire;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// The `InstrumentationScope.name` of every span.
const SCOPE: &str = "switchboard";

/// Counter: spans dropped because the queue was full.
pub const SPANS_DROPPED: &str = "switchboard_otlp_spans_dropped_total";
/// Counter: batch posts that failed (refused, unreachable or timed out).
pub const EXPORT_FAILURES: &str = "switchboard_otlp_export_failures_total";

/// How the processor batches and posts.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    /// Where batches are posted (`…/v1/traces`).
    pub url: http::Uri,
    /// Headers every post carries, beyond the content type.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Whether posts are gzip-compressed (`Content-Encoding: gzip`).
    pub gzip: bool,
    /// How long one post may take.
    pub timeout: Duration,
    /// The longest a span waits for its batch to fill.
    pub schedule_delay: Duration,
    /// Spans held at most; later ones are dropped.
    pub max_queue: usize,
    /// Spans per post at most.
    pub max_batch: usize,
}

impl Settings {
    /// Settings for `url` and `timeout`, the rest from the standard environment
    /// variables (defaults where unset or unreadable).
    pub fn from_env(url: http::Uri, timeout: Duration) -> Result<Settings, String> {
        // Each bounded, so that no setting can make a wait overflow or a queue hold
        // more than a few hundred megabytes of spans.
        let num = |name: &str, default: usize, max: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(default)
                .min(max)
        };
        let max_queue = num("OTEL_BSP_MAX_QUEUE_SIZE", 2048, 1 << 20);
        let headers = std::env::var("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_HEADERS"))
            .map(|v| parse_headers(&v))
            .unwrap_or(Ok(Vec::new()))?;
        let gzip = compression(
            std::env::var("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION")
                .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_COMPRESSION"))
                .ok()
                .as_deref(),
        )?;
        Ok(Settings {
            url,
            headers,
            gzip,
            timeout,
            schedule_delay: Duration::from_millis(
                num("OTEL_BSP_SCHEDULE_DELAY", 5000, 86_400_000) as u64
            ),
            max_queue,
            max_batch: num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, max_queue),
        })
    }
}

/// `key=value,key2=value2` (values percent-decoded, as the OTLP exporter
/// specification says) into headers; an error names the pair that is not one.
pub(super) fn parse_headers(v: &str) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, String> {
    let mut out = Vec::new();
    for (i, pair) in v.split(',').map(str::trim).enumerate() {
        if pair.is_empty() {
            continue;
        }
        // Names the pair by its place and key, never by its value (a secret, often).
        let bad = |what: &str| format!("OTEL_EXPORTER_OTLP_HEADERS: pair {} {what}", i + 1);
        let (k, val) = pair
            .split_once('=')
            .ok_or_else(|| bad("is not key=value"))?;
        let name = http::HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| bad("has a key that is not a header name"))?;
        let mut value =
            http::HeaderValue::from_bytes(&percent_decode(val.trim())).map_err(|_| {
                bad(&format!(
                    "(`{name}`) has a value that is not a header value"
                ))
            })?;
        // Kept out of debug output.
        value.set_sensitive(true);
        out.push((name, value));
    }
    Ok(out)
}

/// Whether `OTEL_EXPORTER_OTLP_COMPRESSION`'s value asks for gzip (unset, empty or
/// `none`: no); an error for anything else.
fn compression(v: Option<&str>) -> Result<bool, String> {
    match v.map(str::trim) {
        None | Some("" | "none") => Ok(false),
        Some("gzip") => Ok(true),
        Some(other) => Err(format!(
            "OTEL_EXPORTER_OTLP_COMPRESSION: `{other}` is neither `gzip` nor `none`"
        )),
    }
}

/// `body` gzip-compressed (the fast level: spans are repetitive, and the CPU is the
/// exporter thread's).
fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(body);
    enc.finish().unwrap_or_default()
}

/// `%XX` escapes decoded; anything else kept as it is.
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// A batch being filled or waiting to be posted: `Span` messages, each already
/// keyed as field 2 of a `ScopeSpans`.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    spans: usize,
}

/// What the request threads and the poster share.
struct Queue {
    /// Oldest first; only the last one is still being filled.
    batches: VecDeque<Batch>,
    /// Spans in `batches`.
    spans: usize,
    /// Emptied batches, kept for their capacity.
    spare: Vec<Vec<u8>>,
    /// Flushes asked for, and done (with whether every post of the last one took).
    flush_asked: u64,
    flush_done: u64,
    flush_ok: bool,
    /// Set by shutdown: post what is held, then stop …
    stopping: bool,
    /// … by then (one export timeout after the shutdown began).
    stop_by: Option<Instant>,
    /// The poster has stopped.
    stopped: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the poster (a batch full, a flush, a stop).
    wake: Condvar,
    /// Wakes flushers and shutdown (a flush done, the poster stopped).
    done: Condvar,
    settings: Settings,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits on `done` until `ready` holds of the queue: the guard, or `None` if
    /// `deadline` came first.
    fn wait_done<'a>(
        &'a self,
        mut q: MutexGuard<'a, Queue>,
        deadline: Instant,
        ready: impl Fn(&Queue) -> bool,
    ) -> Option<MutexGuard<'a, Queue>> {
        while !ready(&q) {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            q = self
                .done
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Some(q)
    }
}

/// The exporter (see the module docs).
pub(super) struct Exporter {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("url", &self.shared.settings.url)
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// An exporter posting per `settings`, under `resource` (a `Resource` message's
    /// fields); its poster thread starts now.
    pub fn new(settings: Settings, resource: Vec<u8>) -> std::io::Result<Exporter> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                batches: VecDeque::new(),
                spans: 0,
                spare: Vec::new(),
                flush_asked: 0,
                flush_done: 0,
                flush_ok: true,
                stopping: false,
                stop_by: None,
                stopped: false,
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
            settings,
        });
        let poster = Poster {
            shared: shared.clone(),
            resource,
        };
        let thread = std::thread::Builder::new()
            .name("switchboard-otlp".into())
            .spawn(move || poster.run())?;
        Ok(Exporter {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Asks the poster to stop once it has posted what is held (within one export
    /// timeout), and waits for it, `margin` past that at most.
    fn stop(&self, margin: Duration) -> bool {
        let mut q = self.shared.lock();
        q.stopping = true;
        let by = *q
            .stop_by
            .get_or_insert(Instant::now() + self.shared.settings.timeout);
        self.shared.wake.notify_one();
        let Some(q) = self.shared.wait_done(q, by + margin, |q| q.stopped) else {
            return false;
        };
        let ok = q.flush_ok;
        drop(q);
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        ok
    }

    /// How long a flush may wait: every batch that can be held, each taking at
    /// most the export timeout.
    fn patience(&self) -> Duration {
        let s = &self.shared.settings;
        let posts = s.max_queue.div_ceil(s.max_batch.max(1)) as u32 + 1;
        s.timeout * posts
    }

    /// Queues `spans` encoded spans (`Span` messages keyed as field 2 of a
    /// `ScopeSpans`, [`wire::put_span`]); dropped and counted if the queue is full or
    /// the exporter stopping.
    pub fn submit(&self, bytes: &[u8], spans: usize) {
        let s = &self.shared.settings;
        let mut q = self.shared.lock();
        if q.stopping || q.spans >= s.max_queue {
            drop(q);
            metrics::counter!(SPANS_DROPPED).increment(spans as u64);
            return;
        }
        if q.batches.back().is_none_or(|b| b.spans >= s.max_batch) {
            let bytes = q.spare.pop().unwrap_or_default();
            q.batches.push_back(Batch { bytes, spans: 0 });
        }
        let b = q.batches.back_mut().expect("a batch is open");
        b.bytes.extend_from_slice(bytes);
        b.spans += spans;
        let full = b.spans >= s.max_batch;
        q.spans += spans;
        if full {
            self.shared.wake.notify_one();
        }
    }

    /// Posts every span queued so far and waits for it; whether the collector took
    /// every batch.
    pub fn flush(&self) -> bool {
        let mut q = self.shared.lock();
        if q.stopped {
            return false;
        }
        q.flush_asked += 1;
        let asked = q.flush_asked;
        self.shared.wake.notify_one();
        let deadline = Instant::now() + self.patience();
        self.shared
            .wait_done(q, deadline, |q| q.flush_done >= asked || q.stopped)
            .is_some_and(|q| q.flush_done >= asked && q.flush_ok)
    }

    /// Posts what is queued (within one export timeout), then stops the poster;
    /// whether the collector took it all. Spans submitted later are dropped.
    pub fn shutdown(&self) -> bool {
        self.stop(Duration::from_secs(1))
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // Without a shutdown, the poster posts what is held and ends by itself.
        self.shared.lock().stopping = true;
        self.shared.wake.notify_one();
    }
}

/// The poster thread's side.
struct Poster {
    shared: Arc<Shared>,
    /// The `Resource` message's fields.
    resource: Vec<u8>,
}

impl Poster {
    fn run(self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "OTLP export: no runtime; spans are not exported");
                self.finish_stop(false);
                return;
            }
        };
        let client = rt.block_on(async { crate::providers::http::new_client() });
        let s = &self.shared.settings;
        let mut body = Vec::new();
        let mut next = Instant::now() + s.schedule_delay;
        // Whether the last post failed (a failure is logged once, then the recovery).
        let mut failing = false;
        loop {
            // Wait for a full batch, the timer, a flush or a stop.
            let mut q = self.shared.lock();
            loop {
                let full = q.batches.front().is_some_and(|b| b.spans >= s.max_batch);
                if full || q.stopping || q.flush_asked > q.flush_done {
                    break;
                }
                let now = Instant::now();
                if now >= next {
                    break;
                }
                q = self
                    .shared
                    .wake
                    .wait_timeout(q, next - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let stopping = q.stopping;
            let stop_by = if stopping {
                Some(*q.stop_by.get_or_insert(Instant::now() + s.timeout))
            } else {
                None
            };
            let flush = q.flush_asked;
            let draining = stopping || flush > q.flush_done || Instant::now() >= next;
            // Everything held now when draining, else the full batches.
            let mut taken = Vec::new();
            while let Some(b) = q.batches.front() {
                if !draining && b.spans < s.max_batch {
                    break;
                }
                let b = q.batches.pop_front().expect("checked");
                q.spans -= b.spans;
                taken.push(b);
            }
            drop(q);
            if draining {
                next = Instant::now() + s.schedule_delay;
            }
            let mut ok = true;
            // A stop posts what is held within one export timeout of its start, all
            // batches together (a post under way then included).
            for mut b in taken {
                let limit =
                    stop_by.map_or(s.timeout, |by| by.saturating_duration_since(Instant::now()));
                if b.spans > 0 {
                    self.request_body(&mut body, &b.bytes);
                    let took = self.post(&rt, &client, &mut body, limit, &mut failing);
                    ok &= took;
                }
                b.bytes.clear();
                let mut q = self.shared.lock();
                if q.spare.len() < 4 {
                    q.spare.push(std::mem::take(&mut b.bytes));
                }
            }
            if stopping {
                self.finish_stop(ok);
                return;
            }
            if flush > 0 {
                let mut q = self.shared.lock();
                if flush > q.flush_done {
                    q.flush_done = flush;
                    q.flush_ok = ok;
                    self.shared.done.notify_all();
                }
            }
        }
    }

    /// Marks the poster stopped (after its last posts, which took if `ok`).
    fn finish_stop(&self, ok: bool) {
        let mut q = self.shared.lock();
        q.stopped = true;
        q.flush_ok = ok;
        q.flush_done = q.flush_asked;
        self.shared.done.notify_all();
    }

    /// The `ExportTraceServiceRequest` holding `spans`, written into `body`.
    fn request_body(&self, body: &mut Vec<u8>, spans: &[u8]) {
        let resource = &self.resource;
        let name = SCOPE.as_bytes();
        let version = env!("CARGO_PKG_VERSION").as_bytes();
        let scope_len = 2
            + wire::varint_len(name.len() as u64)
            + name.len()
            + wire::varint_len(version.len() as u64)
            + version.len();
        let scope_spans_len = 1 + wire::varint_len(scope_len as u64) + scope_len + spans.len();
        let resource_spans_len = 1
            + wire::varint_len(resource.len() as u64)
            + resource.len()
            + 1
            + wire::varint_len(scope_spans_len as u64)
            + scope_spans_len;
        body.clear();
        body.reserve(resource_spans_len + 8);
        wire::put_len(body, 1, resource_spans_len); // ExportTraceServiceRequest.resource_spans
        wire::put_len(body, 1, resource.len()); // ResourceSpans.resource
        body.extend_from_slice(resource);
        wire::put_len(body, 2, scope_spans_len); // ResourceSpans.scope_spans
        wire::put_len(body, 1, scope_len); // ScopeSpans.scope
        wire::put_len(body, 1, name.len());
        body.extend_from_slice(name);
        wire::put_len(body, 2, version.len());
        body.extend_from_slice(version);
        body.extend_from_slice(spans); // ScopeSpans.spans
    }

    /// Posts `body`; whether the collector took it (2xx).
    fn post(
        &self,
        rt: &tokio::runtime::Runtime,
        client: &crate::providers::http::HttpsClient,
        body: &mut Vec<u8>,
        limit: Duration,
        failing: &mut bool,
    ) -> bool {
        let s = &self.shared.settings;
        let mut req = http::Request::post(s.url.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf");
        let payload = if s.gzip {
            req = req.header(http::header::CONTENT_ENCODING, "gzip");
            gzip(body)
        } else {
            std::mem::take(body)
        };
        let mut req = req
            .body(Full::new(Bytes::from(payload)))
            .expect("a valid request");
        for (k, v) in &s.headers {
            req.headers_mut().append(k.clone(), v.clone());
        }
        let result = rt.block_on(async {
            tokio::time::timeout(limit, async {
                let res = client.request(req).await.map_err(|e| e.to_string())?;
                let status = res.status();
                // Read the answer to the end, so that the connection is kept.
                let _ = res.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("answered {status}"))
                }
            })
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
        });
        match result {
            Ok(()) => {
                if std::mem::take(failing) {
                    tracing::info!(collector = %s.url, "OTLP export works again");
                }
                true
            }
            Err(e) => {
                metrics::counter!(EXPORT_FAILURES).increment(1);
                if !std::mem::replace(failing, true) {
                    tracing::warn!(
                        collector = %s.url,
                        error = %e,
                        "OTLP export failed; its batch is dropped (logged again once it works)"
                    );
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_pairs_with_percent_escapes() {
        let h = parse_headers("api-key=a%3Db%2c, x-team = blue ,,").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].0, "api-key");
        assert_eq!(h[0].1, "a=b,");
        assert_eq!(h[1].0, "x-team");
        assert_eq!(h[1].1, "blue");
        assert!(h.iter().all(|(_, v)| v.is_sensitive()));
        // An escape cut short is kept as written.
        assert_eq!(parse_headers("k=100%").unwrap()[0].1, "100%");
        assert_eq!(parse_headers("k=%zz").unwrap()[0].1, "%zz");
        for (bad, says) in [
            ("a=1,Bearer s3cret", "pair 2 is not key=value"),
            ("bad key=s3cret", "pair 1 has a key"),
            ("k=s3cret\nbreak", "pair 1 (`k`) has a value"),
        ] {
            let err = parse_headers(bad).unwrap_err();
            assert!(err.starts_with("OTEL_EXPORTER_OTLP_HEADERS: "), "{err}");
            assert!(err.contains(says), "{bad}: {err}");
            assert!(!err.contains("s3cret"), "the value is not repeated: {err}");
        }
        assert!(parse_headers("").unwrap().is_empty());
    }

    #[test]
    fn compression_is_gzip_or_none() {
        assert!(!compression(None).unwrap());
        assert!(!compression(Some(" none ")).unwrap());
        assert!(compression(Some("gzip")).unwrap());
        let err = compression(Some("zstd")).unwrap_err();
        assert!(err.contains("`zstd` is neither"), "{err}");
        // What is compressed comes back whole.
        let body = b"spans spans spans".repeat(100);
        let mut out = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&gzip(&body)[..]),
            &mut out,
        )
        .unwrap();
        assert_eq!(out, body);
    }
}
