//! The accept loop: every client connection, its limits (head and idle timeouts, the
//! connection cap), HTTP/1.1 or HTTP/2 by its first bytes, and the graceful end.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use http::{Request, Response};
use tokio::net::TcpListener;

use super::{conn, ChatService, Stack};
use crate::error::Body;

/// What one client connection may cost (`[server]` settings).
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnLimits {
    /// A request head must arrive within this (see [`conn::HeadTimer`]).
    pub(super) header_timeout: Duration,
    /// A keep-alive connection with nothing in flight is closed after this.
    pub(super) idle_timeout: Duration,
    /// Connections open at once; past it, new ones get a 503 and are closed.
    pub(super) max_connections: usize,
}

impl ConnLimits {
    pub(super) fn from_config(server: &crate::config::ServerConfig) -> Self {
        ConnLimits {
            header_timeout: Duration::from_secs(server.header_timeout_secs),
            idle_timeout: Duration::from_secs(server.idle_timeout_secs),
            max_connections: server.max_connections as usize,
        }
    }
}

/// Refused connections answered at once at most (each for at most a second); past
/// it, a refused connection is just closed.
const MAX_REFUSING: usize = 256;

/// Accepts connections on `listener` and serves `app` on each until `shutdown`
/// resolves; then stops accepting, lets every connection finish its requests (the
/// graceful shutdown of `axum::serve`), and returns once all are closed.
///
/// HTTP/1.1 and HTTP/2 (prior knowledge) are both served, as `axum::serve` does, but
/// the version is chosen by peeking at the first bytes ([`opens_with_h2_preface`])
/// rather than by hyper's auto-detection, which reads them and hands them back
/// through a rewind buffer: that first short read makes the HTTP/1 read buffer grow
/// from 8 to 16 KiB, held for the life of every connection.
///
/// Every connection holds a permit of a semaphore of `max_connections` for its whole
/// life; one accepted without a permit gets a 503 ([`conn::refuse`]) and is closed.
/// A client must send its request heads in time and an idle connection is closed
/// ([`conn::HeadTimer`] for HTTP/1, [`conn::close_when_idle`] for HTTP/2).
pub(super) async fn serve_connections(
    listener: TcpListener,
    app: Dispatch,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};

    // Dropping `signal_rx` tells every connection to shut down gracefully; each one
    // holds a `close_rx` until it is closed.
    let (signal_tx, signal_rx) = tokio::sync::watch::channel(());
    tokio::spawn(async move {
        shutdown.await;
        drop(signal_rx);
    });
    let (close_tx, close_rx) = tokio::sync::watch::channel(());
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let refusing = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING));
    let mut heartbeat = timer_wheel_heartbeat();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = heartbeat.tick() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = signal_tx.closed() => break,
        };
        let accepted = tokio::time::Instant::now();
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Past `max_connections`: a 503 without reading the request, then close.
            if let Ok(slot) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    conn::refuse(tcp).await;
                    drop(slot);
                });
            }
            continue;
        };
        // Small SSE events must not wait for Nagle + delayed ACK (a 40 ms stall).
        let _ = tcp.set_nodelay(true);
        let service = Dispatch {
            peer: Some(peer.ip()),
            ..app.clone()
        };
        let signal_tx = signal_tx.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            // A silent client is held here at most until its head is due.
            let h2 = tokio::select! {
                h2 = tokio::time::timeout_at(accepted + limits.header_timeout, opens_with_h2_preface(&tcp)) => match h2 {
                    Ok(h2) => h2,
                    Err(_) => return,
                },
                () = signal_tx.closed() => return,
            };
            let shared = Arc::new(conn::ConnShared::default());
            let io = TokioIo::new(conn::ConnIo::new(tcp, shared.clone()));
            if h2 {
                let activity = Arc::new(conn::Activity::default());
                let service = Dispatch {
                    activity: Some(activity.clone()),
                    ..service
                };
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service);
                until_closed(
                    conn,
                    &signal_tx,
                    conn::close_when_idle(&activity, limits.idle_timeout),
                )
                .await;
            } else {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(conn::HeadTimer::new(
                        shared,
                        accepted,
                        limits.header_timeout,
                        limits.idle_timeout,
                    ))
                    // hyper hands the deadline to `HeadTimer`, which sets its own.
                    .header_read_timeout(limits.header_timeout)
                    .max_header_size(conn::MAX_HEAD_BYTES)
                    .serve_connection(io, service);
                until_closed(conn, &signal_tx, std::future::pending()).await;
            }
            drop(close_rx);
            drop(permit);
        });
    }
    drop(close_rx);
    drop(listener);
    close_tx.closed().await;
}

/// What [`Gateway::serve`] hands hyper: `POST /v1/chat/completions` (and its
/// `/api/v1` twin) straight to the chat service, everything else to the router.
///
/// The router would send those requests to the very same service, after matching
/// the path twice (the `/v1` nest, then the route), rewriting the URI for the nest
/// and boxing a clone of the route: ≈ 20 µs of the way in on a cold worker
/// (uprobe timestamps, BENCHMARKS.md, fifth session). The two paths match exactly
/// what the router matches, so the responses are the same.
#[derive(Clone)]
pub(super) struct Dispatch {
    /// The current stack: `POST …/chat/completions` goes to its chat service.
    pub(super) stack: Arc<ArcSwap<Stack>>,
    pub(super) router: Router,
    /// An HTTP/2 connection's requests in flight (for its idle timeout); `None` on
    /// HTTP/1, where hyper's head timer covers idleness.
    pub(super) activity: Option<Arc<conn::Activity>>,
    /// `[server].trusted_proxies`.
    pub(super) proxies: Arc<crate::client_ip::TrustedProxies>,
    /// The connection's TCP peer.
    pub(super) peer: Option<std::net::IpAddr>,
}

impl Dispatch {
    /// Whether the router would route `req` to the chat service.
    fn is_chat(req: &Request<hyper::body::Incoming>) -> bool {
        req.method() == http::Method::POST
            && matches!(
                req.uri().path(),
                "/v1/chat/completions" | "/api/v1/chat/completions"
            )
    }
}

impl hyper::service::Service<Request<hyper::body::Incoming>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures_util::future::Either<
        futures_util::future::Either<
            tower::util::Oneshot<ChatService, Request<Body>>,
            tower::util::Oneshot<Router, Request<hyper::body::Incoming>>,
        >,
        futures_util::future::BoxFuture<'static, Result<Response<Body>, Infallible>>,
    >;

    fn call(&self, mut req: Request<hyper::body::Incoming>) -> Self::Future {
        use futures_util::future::Either;
        use futures_util::FutureExt;
        use tower::ServiceExt;
        if let Some(peer) = self.peer {
            // Without trusted proxies: the peer, no header read (an `IpAddr` is Copy).
            let client = self.proxies.client_of(peer, req.headers());
            req.extensions_mut().insert(client);
        }
        let fut = if Self::is_chat(&req) {
            // One atomic load; the request keeps the clone it took.
            Either::Left(self.stack.load().chat.clone().oneshot(req.map(Body::new)))
        } else {
            Either::Right(self.router.clone().oneshot(req))
        };
        match &self.activity {
            None => Either::Left(fut),
            // HTTP/2: the request counts as in flight until its response body ends.
            Some(activity) => {
                let guard = activity.start();
                Either::Right(
                    fut.map(move |res| {
                        res.map(|res| res.map(|b| Body::new(conn::CountedBody::new(b, guard))))
                    })
                    .boxed(),
                )
            }
        }
    }
}

/// A timer the accept loop keeps due within [`HEARTBEAT`] at all times, so that
/// registering a request's timeouts does not wake the runtime's driver.
///
/// tokio's timer driver unparks the I/O driver (an `eventfd` write, then an extra
/// `epoll_wait` round) whenever a timer is registered that is due before the
/// driver's next wake. With no timer pending, that is every timer: each request
/// arms four (request deadline, attempt deadline, provider timeout, body timeout),
/// all minutes away. One timer that is always due sooner costs a wake-up a second
/// (measured with `strace -c` at 1k req/s: 2.4 `write` + 3.1 `epoll_wait` per
/// request without it).
fn timer_wheel_heartbeat() -> tokio::time::Interval {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// The period of [`timer_wheel_heartbeat`]: shorter than any request timeout.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Drives one connection to its end, shutting it down gracefully (in-flight requests
/// finish, no new ones are read) once `signal` is closed or `idle` resolves.
async fn until_closed<C>(
    conn: C,
    signal: &tokio::sync::watch::Sender<()>,
    idle: impl Future<Output = ()>,
) where
    C: hyper_util::server::graceful::GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let mut signal_closed = std::pin::pin!(signal.closed());
    let mut idle = std::pin::pin!(idle);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!("connection ended: {e}");
                }
                return;
            }
            () = &mut signal_closed, if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
            () = &mut idle, if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Whether a connection opens with the HTTP/2 client preface (h2c with prior
/// knowledge). Peeks, so the bytes stay in the socket for hyper to read.
async fn opens_with_h2_preface(tcp: &tokio::net::TcpStream) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; PREFACE.len()];
    // A peek returns at once while unread bytes wait, so a client that has sent only
    // part of the preface is re-checked every 10 ms, for at most a second.
    for _ in 0..100 {
        match tcp.peek(&mut buf).await {
            Ok(n) if n > 0 && buf[..n] == PREFACE[..n] => {
                if n == PREFACE.len() {
                    return true;
                }
            }
            // Anything else (HTTP/1, end of stream, an error) is left to HTTP/1.
            _ => return false,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// After a failed `accept`: carry on at once when only that connection failed;
/// otherwise (e.g. out of file descriptors) wait a second, as `axum::serve` does.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept failed: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::opens_with_h2_preface;
    use tokio::io::AsyncWriteExt;

    /// A connected pair on loopback: (client, server side).
    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        (client, l.accept().await.unwrap().0)
    }

    /// Waits until `n` bytes can be peeked on `tcp`.
    async fn arrived(tcp: &tokio::net::TcpStream, n: usize) {
        let mut buf = vec![0; n];
        while tcp.peek(&mut buf).await.unwrap() < n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_preface_sent_in_pieces_is_still_http2_and_its_bytes_stay_unread() {
        let (mut client, server) = pair().await;
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        arrived(&server, 16).await;
        let server = std::sync::Arc::new(server);
        let s = server.clone();
        let check = tokio::spawn(async move { opens_with_h2_preface(&s).await });
        // The check peeks the partial preface (it matches so far) and waits for more.
        tokio::task::yield_now().await;
        assert!(!check.is_finished());
        client.write_all(b"\r\nSM\r\n\r\n").await.unwrap();
        assert!(check.await.unwrap());
        // Peeked, not read: hyper still gets the whole preface.
        arrived(&server, 24).await;
    }

    #[tokio::test]
    async fn http1_requests_are_not_taken_for_http2() {
        let (mut client, server) = pair().await;
        client
            .write_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
            .await
            .unwrap();
        arrived(&server, 4).await;
        assert!(!opens_with_h2_preface(&server).await);
        let (mut client, server) = pair().await;
        client.shutdown().await.unwrap(); // closed before a byte
        assert!(!opens_with_h2_preface(&server).await);
        drop(client);
    }
}
