//! A hostile client against the real `switchboard` binary: slowloris variants,
//! connection floods, tokenless admin bodies and oversized heads (issue 20).
//!
//! Each slow connection must be closed by the gateway within its `[server]` timeout
//! (measured by the socket closing, with generous slack for a busy machine), a normal
//! request must still be served during the attack, every refusal must carry the JSON
//! body of SPEC §3.2, and the process's RSS must stay under a stated bound. Only
//! 127.0.0.1, bounded in time and count; every connection ends by itself.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
const KEY: &str = "sk-hostile-client-test-key-0123456789";
const ADMIN_TOKEN: &str = "hostile-client-admin-token-0123456789";
/// Around every wait on a real socket: far above any timeout under test.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// How much later than its timeout a connection may close on a busy machine.
const SLACK: Duration = Duration::from_secs(10);

/// `[server]` of the gateway under test.
struct Limits {
    header_timeout_secs: u64,
    idle_timeout_secs: u64,
    request_timeout_secs: u64,
    max_connections: u32,
}

struct Server {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// The process's resident set, in KiB (`VmRSS` of /proc/PID/status).
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    async fn connect(&self) -> TcpStream {
        tokio::time::timeout(SOCKET_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .expect("connect in time")
            .expect("connect")
    }
}

fn config_text(dir: &Path, l: &Limits) -> String {
    format!(
        r#"
[server]
header_timeout_secs = {}
idle_timeout_secs = {}
request_timeout_secs = {}
max_connections = {}

[store]
url = "sqlite://{}"

[admin]
token_env = "SB_HOSTILE_ADMIN"

[logging]
sink = "none"

[[providers]]
name = "mock"
kind = "mock"

[[models]]
id = "mock/echo"
max_output_tokens = 64
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1

[[keys]]
secret = "{KEY}"
name = "hostile"
credits_usd = 10
"#,
        l.header_timeout_secs,
        l.idle_timeout_secs,
        l.request_timeout_secs,
        l.max_connections,
        dir.join("switchboard.db").display()
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `switchboard serve` with `limits` and waits until `/healthz` answers (on a
/// connection it closes, so no probe holds a connection slot afterwards).
async fn serve(limits: Limits) -> Server {
    let dir = common::temp_dir("hostile");
    let config = dir.join("switchboard.toml");
    std::fs::write(&config, config_text(&dir, &limits)).unwrap();
    let log = dir.join("gateway.log");
    for _ in 0..5 {
        let port = free_port();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("SB_HOSTILE_ADMIN", ADMIN_TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        };
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = server.child.try_wait() {
                break; // port taken by someone else: try another
            }
            if let Ok(mut tcp) = TcpStream::connect(server.addr).await {
                let req = b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
                if tcp.write_all(req).await.is_ok() {
                    let (text, _) = read_until_closed(&mut tcp).await;
                    if text.starts_with("HTTP/1.1 200") {
                        return server;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = server.child.kill();
    }
    panic!("switchboard did not start; see {}", log.display());
}

/// Reads until the gateway closes the connection (end of stream or a reset);
/// returns what was read and how long it took. Panics after [`SOCKET_TIMEOUT`].
async fn read_until_closed(tcp: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(SOCKET_TIMEOUT, tcp.read(&mut buf)).await {
            Err(_) => panic!(
                "the gateway kept the connection open for {SOCKET_TIMEOUT:?}; read so far: {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// Reads one HTTP/1.1 response with a `content-length` (status, body).
async fn read_response(tcp: &mut TcpStream) -> (u16, String) {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if data.len() >= end + 4 + len {
                let status = head[9..12].parse().unwrap();
                let body = String::from_utf8_lossy(&data[end + 4..end + 4 + len]).into_owned();
                return (status, body);
            }
        }
        let n = tokio::time::timeout(SOCKET_TIMEOUT, tcp.read(&mut buf))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&buf[..n]);
    }
}

/// The SPEC §3.2 body of an error response: its `error.code`.
fn error_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    let e = &v["error"];
    assert!(
        e["message"].is_string() && e["type"].is_string(),
        "not SPEC-shaped: {body}"
    );
    e["code"].as_str().unwrap().to_string()
}

/// A chat request that must succeed: the gateway keeps serving.
async fn chat_ok(server: &Server) {
    let body = r#"{"model":"mock/echo","messages":[{"role":"user","content":"still here?"}]}"#;
    let mut tcp = server.connect().await;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let (status, body) = read_response(&mut tcp).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("still here?"), "{body}");
}

fn assert_closed_in_time(what: &str, took: Duration, timeout: Duration) {
    assert!(
        took + Duration::from_millis(50) >= timeout,
        "{what}: closed after {took:?}, before its timeout {timeout:?}"
    );
    assert!(
        took <= timeout + SLACK,
        "{what}: closed after {took:?}; its timeout is {timeout:?}"
    );
}

/// Writes `head`, then `byte` every 200 ms until the gateway closes the connection;
/// returns how long after the first write it was closed.
async fn trickle(server: &Server, head: &'static [u8], byte: &'static [u8]) -> Duration {
    let tcp = server.connect().await;
    let (mut rd, mut wr) = tcp.into_split();
    let started = Instant::now();
    wr.write_all(head).await.unwrap();
    let writer = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(byte).await.is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(SOCKET_TIMEOUT, rd.read(&mut buf)).await {
            Err(_) => panic!("a trickled head kept its connection open for {SOCKET_TIMEOUT:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
        }
    }
    writer.abort();
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_in_time_and_the_gateway_keeps_serving() {
    let server = serve(Limits {
        header_timeout_secs: 2,
        idle_timeout_secs: 4,
        request_timeout_secs: 3,
        max_connections: 10_000,
    })
    .await;
    let header = Duration::from_secs(2);
    let idle = Duration::from_secs(4);
    let request = Duration::from_secs(3);
    let rss_before = server.rss_kib();

    // Silence, partial headers, a trickled head: closed `header_timeout` after the
    // connection started, whatever arrives meanwhile.
    let silent = async {
        let mut tcp = server.connect().await;
        read_until_closed(&mut tcp).await
    };
    let partial = async {
        let mut tcp = server.connect().await;
        tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        read_until_closed(&mut tcp).await
    };
    let trickled = trickle(&server, b"GET /healthz HTTP/1.1\r\n", b"x");
    // Bodies that stall halfway (chunked, Content-Length): 408 with a JSON body at
    // the request deadline, then closed.
    let chunked = async {
        let mut tcp = server.connect().await;
        let head = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ntransfer-encoding: chunked\r\n\r\n10\r\n{{\"model\":\"mock/e\r\n");
        tcp.write_all(head.as_bytes()).await.unwrap();
        read_until_closed(&mut tcp).await
    };
    let half = async {
        let mut tcp = server.connect().await;
        let head = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-length: 1000\r\n\r\n{{\"model\":\"mock/echo\",");
        tcp.write_all(head.as_bytes()).await.unwrap();
        read_until_closed(&mut tcp).await
    };
    // An idle keep-alive connection: one request, then nothing.
    let keep_alive = async {
        let mut tcp = server.connect().await;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (status, _) = read_response(&mut tcp).await;
        assert_eq!(status, 200);
        read_until_closed(&mut tcp).await
    };
    // A keep-alive connection whose next head starts after a while, then trickles:
    // `header_timeout` from its first byte.
    let next_head = async {
        let tcp = server.connect().await;
        let (mut rd, mut wr) = tcp.into_split();
        wr.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = rd.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(b"GET /healthz HTTP/1.1\r\n").await;
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if wr.write_all(b"x").await.is_err() {
                    return;
                }
            }
        });
        loop {
            match tokio::time::timeout(SOCKET_TIMEOUT, rd.read(&mut buf)).await {
                Err(_) => panic!("a trickled second head kept its connection open"),
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
            }
        }
        writer.abort();
        started.elapsed()
    };
    // Meanwhile, normal requests are served.
    let normal = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        chat_ok(&server).await;
    };
    let (silent, partial, trickled, chunked, half, keep_alive, next_head, ()) =
        tokio::join!(silent, partial, trickled, chunked, half, keep_alive, next_head, normal);

    assert_closed_in_time("a silent connection", silent.1, header);
    assert_eq!(silent.0, "", "nothing is sent to a silent connection");
    assert_closed_in_time("partial headers", partial.1, header);
    assert_closed_in_time("a trickled head", trickled, header);
    assert_closed_in_time("a trickled second head", next_head, header);
    assert_closed_in_time("an idle keep-alive connection", keep_alive.1, idle);
    for (what, (text, took)) in [
        ("a stalled chunked body", chunked),
        ("a half-sent body", half),
    ] {
        assert_closed_in_time(what, took, request);
        assert!(text.starts_with("HTTP/1.1 408 "), "{what}: {text}");
        let body = text.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(error_code(body), "request_timeout", "{what}");
    }

    // Many slow connections at once: 200 partial 30 KB heads and 200 tokenless admin
    // bodies announced at 2 MB. The admin ones get their 401 at once (the body is
    // never read); all of them are closed in time; memory stays bounded.
    let mut partials = Vec::new();
    for i in 0..200 {
        let mut tcp = server.connect().await;
        let head = format!(
            "GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad-{i}: {}",
            "a".repeat(30_000)
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        partials.push(tcp);
    }
    let mut admins = Vec::new();
    for _ in 0..200 {
        let mut tcp = server.connect().await;
        tcp.write_all(
            b"POST /admin/keys HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 2000000\r\n\r\n{\"credits_usd\":",
        )
        .await
        .unwrap();
        tcp.write_all(&[b' '; 8192]).await.unwrap();
        admins.push(tcp);
    }
    let rss_during = server.rss_kib();
    chat_ok(&server).await;
    for mut tcp in admins {
        let (status, body) = read_response(&mut tcp).await;
        assert_eq!(
            (status, error_code(&body).as_str()),
            (401, "invalid_api_key")
        );
        read_until_closed(&mut tcp).await;
    }
    for mut tcp in partials {
        let (text, _) = read_until_closed(&mut tcp).await;
        assert_eq!(text, "", "a partial head gets no answer, only a close");
    }
    let rss_after = server.rss_kib();
    eprintln!("VmRSS: {rss_before} KiB before, {rss_during} KiB during, {rss_after} KiB after");
    // 200 × 32 KiB of head buffers is 6.4 MiB; the issue saw 557 MB for 1,000
    // partial 300 KB heads and 608 MB for 200 tokenless admin bodies.
    assert!(
        rss_during < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_during} KiB"
    );
    chat_ok(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_heads_get_spec_json_refusals() {
    let server = serve(Limits {
        header_timeout_secs: 10,
        idle_timeout_secs: 10,
        request_timeout_secs: 10,
        max_connections: 100,
    })
    .await;
    let many_headers: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "a 40 KB header",
            format!(
                "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
                "a".repeat(40_000)
            ),
            431,
            "payload_too_large",
        ),
        (
            "120 headers",
            format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{many_headers}\r\n"),
            431,
            "payload_too_large",
        ),
        (
            "a 70 KB URI",
            format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000)),
            431,
            "payload_too_large",
        ),
        (
            "a malformed request line",
            "GARBAGE\r\n\r\n".to_string(),
            400,
            "invalid_request",
        ),
        (
            "a malformed header",
            "GET /healthz HTTP/1.1\r\nho st: x\r\n\r\n".to_string(),
            400,
            "invalid_request",
        ),
        (
            "a bad version",
            "GET /healthz HTTP/9.9\r\nhost: x\r\n\r\n".to_string(),
            400,
            "invalid_request",
        ),
    ];
    for (what, req, status, code) in cases {
        let mut tcp = server.connect().await;
        // The gateway may answer and close before it has read all of a big head.
        let _ = tcp.write_all(req.as_bytes()).await;
        let (text, _) = read_until_closed(&mut tcp).await;
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {text:?}"
        );
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains("content-type: application/json"),
            "{what}: {head}"
        );
        assert_eq!(error_code(body), code, "{what}");
    }
    // Admin bodies past their limit (with the token): 413 with a JSON body.
    let mut tcp = server.connect().await;
    let body = format!(r#"{{"credits_usd":1,"name":"{}"}}"#, "n".repeat(70_000));
    let req = format!(
        "POST /admin/keys HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(req.as_bytes()).await;
    let (status, body) = read_response(&mut tcp).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (413, "payload_too_large")
    );
    chat_ok(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_past_max_connections_is_refused_then_served_again() {
    const MAX: usize = 32;
    let server = serve(Limits {
        header_timeout_secs: 30,
        idle_timeout_secs: 60,
        request_timeout_secs: 30,
        max_connections: MAX as u32,
    })
    .await;
    // Each connection proves it holds a slot with one request, and stays open.
    let mut held = Vec::new();
    let refused = loop {
        assert!(held.len() <= MAX, "more than {MAX} connections were served");
        let mut tcp = server.connect().await;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (status, body) = read_response(&mut tcp).await;
        if status == 503 {
            break (tcp, body);
        }
        assert_eq!(status, 200, "{body}");
        held.push(tcp);
    };
    assert_eq!(held.len(), MAX, "every slot was taken before the refusal");
    let (mut tcp, body) = refused;
    assert_eq!(error_code(&body), "overloaded");
    read_until_closed(&mut tcp).await;

    // More arrive while full: each one is refused the same way.
    for _ in 0..50 {
        let mut tcp = server.connect().await;
        let _ = tcp
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let (status, body) = read_response(&mut tcp).await;
        assert_eq!((status, error_code(&body).as_str()), (503, "overloaded"));
    }

    // One slot freed: the gateway serves again (once it has seen the close).
    drop(held.pop());
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    loop {
        let mut tcp = server.connect().await;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (status, _) = read_response(&mut tcp).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no slot came free after a close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_idle_timeout() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let server = serve(Limits {
        header_timeout_secs: 2,
        idle_timeout_secs: 3,
        request_timeout_secs: 10,
        max_connections: 100,
    })
    .await;
    let tcp = server.connect().await;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("an HTTP/2 handshake");
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/healthz", server.addr))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = h2.send_request(req).await.expect("an HTTP/2 response");
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    let idle_since = Instant::now();
    tokio::time::timeout(SOCKET_TIMEOUT, conn)
        .await
        .expect("the gateway closes an idle HTTP/2 connection")
        .unwrap()
        .ok();
    assert_closed_in_time(
        "an idle HTTP/2 connection",
        idle_since.elapsed(),
        Duration::from_secs(3),
    );
}
