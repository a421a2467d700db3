//! What one client connection may cost: how long it may take to send a request head,
//! how long it may sit idle, and the SPEC-shaped refusals hyper writes on its own.
//!
//! - [`HeadTimer`] is the [`hyper::rt::Timer`] of an HTTP/1 connection. hyper arms
//!   it whenever it waits for a request head (at the connection's start, and again as
//!   soon as each response is written), so a hyper `header_read_timeout` alone would
//!   close an idle keep-alive connection after the *header* timeout. The timer tells
//!   the two waits apart: the first head must arrive within `header_timeout` of the
//!   accept; a later one may keep the client waiting `idle_timeout` for its first
//!   byte, then must be complete within `header_timeout` of it. A trickle (a byte
//!   now and then) is bounded as well as silence.
//! - [`ConnIo`] is the socket as hyper sees it: it counts reads for the timer, and
//!   gives hyper's own refusals (400 malformed request line or header, 414 URI too
//!   long, 431 head too large or too many headers) the JSON body of SPEC §3.2.
//! - [`Activity`] counts an HTTP/2 connection's requests in flight (response bodies
//!   included), so [`close_when_idle`] can close it after `idle_timeout` of nothing.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::error::GatewayError;

/// The largest request head (request line and headers) an HTTP/1 client may send;
/// past it, 431. Every open connection may hold this much while its head arrives.
pub(crate) const MAX_HEAD_BYTES: usize = 32 * 1024;

/// What the [`ConnIo`] and the [`HeadTimer`] of one connection share.
#[derive(Debug, Default)]
pub(crate) struct ConnShared {
    /// Reads that returned bytes, ever (the timer compares two readings).
    reads: AtomicU64,
    /// Whether the timer has armed for the connection's first head already.
    first_head_armed: AtomicBool,
}

/// The socket of one client connection, as hyper reads and writes it.
///
/// Reads are passed through and counted. Writes are passed through, except the
/// response head hyper writes by itself when it cannot parse a request: hyper offers
/// no way to give that response a body (it writes `content-length: 0` and closes), so
/// it is recognised here and replaced by the same status with a SPEC §3.2 body. The
/// check looks at the first bytes of each write only (a few byte comparisons), so the
/// normal path stays as it was; see [`hyper_refusal`] for why it cannot be taken for
/// one of our own responses.
pub(crate) struct ConnIo<T> {
    inner: T,
    shared: Arc<ConnShared>,
    /// A replacement response still being written, and how much of hyper's buffer
    /// to report written once it is.
    replacing: Option<(Bytes, usize)>,
}

impl<T> ConnIo<T> {
    /// Wraps `inner`, sharing read counts with the connection's [`HeadTimer`].
    pub(crate) fn new(inner: T, shared: Arc<ConnShared>) -> Self {
        ConnIo {
            inner,
            shared,
            replacing: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.shared.reads.fetch_add(1, Ordering::Relaxed);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> ConnIo<T> {
    /// Writes the rest of a replacement; `Ready(Ok(n))` reports `n` bytes of hyper's
    /// buffer written once all of it is out.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        while let Some((bytes, claimed)) = &mut self.replacing {
            if bytes.is_empty() {
                let n = *claimed;
                self.replacing = None;
                return Poll::Ready(Ok(n));
            }
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, bytes))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            let _ = bytes.split_to(n);
        }
        Poll::Ready(Ok(0))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.replacing.is_none() {
            match hyper_refusal(buf) {
                Some(body) => this.replacing = Some((body, buf.len())),
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
            }
        }
        this.poll_replacement(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.replacing.is_none() {
            // hyper's refusal is a head alone: one buffer.
            match bufs {
                [only] => match hyper_refusal(only) {
                    Some(body) => this.replacing = Some((body, only.len())),
                    None => return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
                },
                _ => return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
            }
        }
        this.poll_replacement(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.replacing.is_some() {
            std::task::ready!(this.poll_replacement(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.replacing.is_some() {
            std::task::ready!(this.poll_replacement(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The SPEC-shaped replacement for `head` when it is the response hyper writes by
/// itself after a request it could not parse, else `None`.
///
/// hyper's refusal (`Server::on_error` in hyper's `proto/h1/role.rs`) is a 400, 414
/// or 431 head with `content-length: 0`, no `content-type`, and nothing after it.
/// Every response of ours carries `content-type` (errors are JSON), so the two cannot
/// be confused; a body chunk never starts with a status line at a write's start
/// unless a response body itself did (none of ours does).
pub(crate) fn hyper_refusal(head: &[u8]) -> Option<Bytes> {
    let status = head.strip_prefix(b"HTTP/1.1 ")?.get(..4)?;
    let (status, error) = match status {
        b"400 " => (
            "400 Bad Request",
            GatewayError::InvalidRequest(
                "the request line or a header is malformed (not HTTP/1.1)".into(),
            ),
        ),
        b"414 " => (
            "414 URI Too Long",
            GatewayError::InvalidRequest("the request URI is too long".into()),
        ),
        b"431 " => (
            "431 Request Header Fields Too Large",
            GatewayError::PayloadTooLarge(format!(
                "the request head is larger than {MAX_HEAD_BYTES} bytes or has more than 100 headers"
            )),
        ),
        _ => return None,
    };
    if !head.ends_with(b"\r\n\r\n") || head.len() > 512 {
        return None;
    }
    let lower = head.to_ascii_lowercase();
    let has = |needle: &[u8]| lower.windows(needle.len()).any(|w| w == needle);
    if !has(b"\r\ncontent-length: 0\r\n") || has(b"\r\ncontent-type:") {
        return None;
    }
    let body = serde_json::json!({ "error": error.to_json() }).to_string();
    Some(Bytes::from(format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )))
}

/// The timer hyper's HTTP/1 connection arms while it waits for a request head; see
/// the [module docs](self).
#[derive(Debug)]
pub(crate) struct HeadTimer {
    shared: Arc<ConnShared>,
    /// The connection's accept time plus `header_timeout`.
    first_deadline: Instant,
    header: Duration,
    idle: Duration,
}

impl HeadTimer {
    /// A timer for a connection accepted at `accepted`.
    pub(crate) fn new(
        shared: Arc<ConnShared>,
        accepted: Instant,
        header: Duration,
        idle: Duration,
    ) -> Self {
        HeadTimer {
            shared,
            first_deadline: accepted + header,
            header,
            idle,
        }
    }
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        // hyper's HTTP/1 server asks for `sleep_until` only; a plain sleep otherwise.
        Box::pin(PlainSleep {
            sleep: tokio::time::sleep(duration),
        })
    }

    /// hyper arms this when it starts waiting for a head, with its own deadline
    /// (now + the `header_read_timeout` it was given), which is replaced here.
    fn sleep_until(&self, _deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        if !self.shared.first_head_armed.swap(true, Ordering::Relaxed) {
            return Box::pin(HeadSleep {
                sleep: tokio::time::sleep_until(self.first_deadline),
                idle_since_reads: None,
                header: self.header,
                shared: self.shared.clone(),
            });
        }
        Box::pin(HeadSleep {
            sleep: tokio::time::sleep(self.idle),
            idle_since_reads: Some(self.shared.reads.load(Ordering::Relaxed)),
            header: self.header,
            shared: self.shared.clone(),
        })
    }

    /// tokio's clock, so paused time (tests) governs hyper's deadlines too.
    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

pin_project_lite::pin_project! {
    /// A tokio sleep as a hyper sleep.
    struct PlainSleep {
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl Future for PlainSleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().sleep.poll(cx)
    }
}

impl hyper::rt::Sleep for PlainSleep {}

pin_project_lite::pin_project! {
    /// The wait for one request head.
    struct HeadSleep {
        #[pin]
        sleep: tokio::time::Sleep,
        // `Some(reads)` while the connection is idle (the read count when it became
        // so); `None` once the head has started (or for the first head).
        idle_since_reads: Option<u64>,
        header: Duration,
        shared: Arc<ConnShared>,
    }
}

impl Future for HeadSleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        // hyper polls this each time a read leaves the head incomplete, so the first
        // byte of a new head is seen here as soon as it is read.
        if let Some(reads) = *this.idle_since_reads {
            if this.shared.reads.load(Ordering::Relaxed) != reads {
                *this.idle_since_reads = None;
                let deadline = Instant::now() + *this.header;
                this.sleep.as_mut().reset(deadline);
            }
        }
        this.sleep.poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

/// Requests in flight on one HTTP/2 connection, response bodies included.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    active: AtomicUsize,
    changed: tokio::sync::Notify,
}

impl Activity {
    /// Counts a request in flight until the guard is dropped.
    pub(crate) fn start(self: &Arc<Self>) -> ActiveGuard {
        if self.active.fetch_add(1, Ordering::AcqRel) == 0 {
            self.changed.notify_one();
        }
        ActiveGuard(self.clone())
    }
}

/// One request in flight on an HTTP/2 connection (see [`Activity`]).
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_one();
        }
    }
}

/// Resolves once the connection has had no request in flight for `idle`.
pub(crate) async fn close_when_idle(activity: &Activity, idle: Duration) {
    loop {
        if activity.active.load(Ordering::Acquire) > 0 {
            activity.changed.notified().await;
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(idle) => {
                if activity.active.load(Ordering::Acquire) == 0 {
                    return;
                }
            }
            () = activity.changed.notified() => {}
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in [`Activity`] until it ends
    /// or is dropped.
    pub(crate) struct CountedBody<B> {
        #[pin]
        inner: B,
        guard: Option<ActiveGuard>,
    }
}

impl<B> CountedBody<B> {
    /// `inner`, counted by `guard`.
    pub(crate) fn new(inner: B, guard: ActiveGuard) -> Self {
        CountedBody {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: http_body::Body> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        if matches!(res, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.take();
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The `503` a connection past `[server].max_connections` gets, before it is closed
/// without its request being read.
pub(crate) fn overloaded_response() -> &'static [u8] {
    static RESPONSE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    RESPONSE.get_or_init(|| {
        let error = GatewayError::Overloaded(
            "the gateway has as many connections open as [server].max_connections allows; try again shortly"
                .into(),
        );
        let body = serde_json::json!({ "error": error.to_json() }).to_string();
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
}

/// Answers a connection refused past `[server].max_connections`: the 503, the write
/// side closed, then whatever the client sends is read and thrown away (at most 64
/// KiB, for at most a second) so that closing does not reset the connection before
/// the client reads the answer. Never reads a request.
pub(crate) async fn refuse(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(overloaded_response()).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match tcp.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_refusals_get_json_bodies_and_our_responses_pass_untouched() {
        for (head, status, code) in [
            (
                "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n",
                "431",
                "payload_too_large",
            ),
            (
                "HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n",
                "414",
                "invalid_request",
            ),
            (
                "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
                "400",
                "invalid_request",
            ),
        ] {
            let out = hyper_refusal(head.as_bytes()).expect(head);
            let text = std::str::from_utf8(&out).unwrap();
            let (h, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(h.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
            assert!(h.contains(&format!("content-length: {}", body.len())), "{text}");
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["error"]["code"], code, "{text}");
        }
        // Our own responses: they have a content-type (and usually a body).
        for ours in [
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 80\r\n\r\n{\"error\"",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n",
            "{\"error\":{}}",
            "",
        ] {
            assert!(hyper_refusal(ours.as_bytes()).is_none(), "{ours}");
        }
    }

    #[test]
    fn the_overload_refusal_is_a_spec_shaped_503() {
        let text = std::str::from_utf8(overloaded_response()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{text}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "overloaded");
        assert_eq!(v["error"]["type"], "api_error");
    }

    fn timer(header: u64, idle: u64) -> (HeadTimer, Arc<ConnShared>) {
        let shared = Arc::new(ConnShared::default());
        let t = HeadTimer::new(
            shared.clone(),
            Instant::now(),
            Duration::from_secs(header),
            Duration::from_secs(idle),
        );
        (t, shared)
    }

    /// Polls `sleep` once, as hyper does after each read.
    fn poll(sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        sleep.as_mut().poll(&mut cx).is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_head_is_due_header_timeout_after_the_accept() {
        use hyper::rt::Timer;
        let (t, shared) = timer(10, 60);
        tokio::time::advance(Duration::from_secs(3)).await;
        let mut s = t.sleep_until(std::time::Instant::now());
        // A byte now and then does not move the deadline.
        for _ in 0..6 {
            shared.reads.fetch_add(1, Ordering::Relaxed);
            assert!(!poll(&mut s));
            tokio::time::advance(Duration::from_millis(1_000)).await;
        }
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!poll(&mut s), "9.999 s after the accept");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(poll(&mut s), "10 s after the accept");
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_head_may_wait_idle_timeout_then_must_finish_within_header_timeout() {
        use hyper::rt::Timer;
        let (t, shared) = timer(10, 60);
        let first = t.sleep_until(std::time::Instant::now());
        drop(first); // the first request's head arrived

        // Idle: nothing for 59 s is fine; 60 s closes.
        let mut idle = t.sleep_until(std::time::Instant::now());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!poll(&mut idle));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(poll(&mut idle), "idle for idle_timeout");

        // A head that starts after 50 s idle has 10 s from its first byte, however
        // slowly the rest trickles in.
        let mut head = t.sleep_until(std::time::Instant::now());
        tokio::time::advance(Duration::from_secs(50)).await;
        shared.reads.fetch_add(1, Ordering::Relaxed);
        assert!(!poll(&mut head));
        for _ in 0..9 {
            tokio::time::advance(Duration::from_secs(1)).await;
            shared.reads.fetch_add(1, Ordering::Relaxed);
            assert!(!poll(&mut head));
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(poll(&mut head), "10 s after the head's first byte");
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_connection_closes_after_idle_timeout_without_requests() {
        let activity = Arc::new(Activity::default());
        let started = Instant::now();
        let guard = activity.start();
        let a = activity.clone();
        let closer = tokio::spawn(async move {
            close_when_idle(&a, Duration::from_secs(60)).await;
            Instant::now()
        });
        // A request in flight for 100 s keeps the connection open.
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!closer.is_finished());
        drop(guard);
        let closed = closer.await.unwrap();
        assert_eq!(closed - started, Duration::from_secs(160));
    }
}
