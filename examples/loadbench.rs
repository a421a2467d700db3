//! Load benchmark: a fast fake upstream, a bare hyper reverse proxy (the floor), and
//! switchboard with the full default stack, all on 127.0.0.1, measured in one run.
//!
//! Run with: cargo run --profile dist --example loadbench (the production build, as
//! BENCHMARKS.md's table is measured; `--release` builds faster and runs ≈ 8 % more
//! instructions per request)
//! (optional: `-- --quick` for a short run, `-- --secs N` per step, `-- --repeat N`
//! runs of the fixed-rate and saturation steps, medians reported (default 5),
//! `-- --memory-only` for just the RSS-per-open-stream step, `-- --shared` for the
//! many-instances comparison: SQLite against one and two instances on PostgreSQL +
//! Redis, see `loadbench/shared.rs` (`--saturation` skips its fixed rates, `--rates 2000,4000`
//! sets them, `--only ×1` keeps one target beside `sqlite`); run that one with `--release`; `-- --cache` for
//! the response cache: hits, coalescing bursts, all misses, see `loadbench/cache.rs`;
//! `-- --dialects` for the inbound APIs of SPEC §7 against chat completions, see
//! `loadbench/dialects.rs`; `-- --reload` for fixed-rate load while the config is
//! reloaded every 100 ms, see `loadbench/reload.rs`; `-- --otlp` for OpenTelemetry
//! export on against off, see `loadbench/otlp.rs`)
//! Profiling aids: `loadbench drive ADDR SECS` saturates a server at ADDR;
//! `loadbench rate ADDR RATE SECS [stream]` sends RATE req/s to it and prints percentiles;
//! `loadbench config DIR UPSTREAM` writes the gateway config the bench serves.
//!
//! Each server runs in its own process (this binary re-executed with a role), so CPU
//! time and RSS are per process, read from /proc. The server under test is pinned to
//! CPU 1 and everything else to CPU 0 when `taskset` exists. Fixed-rate steps are
//! open loop: requests are sent on schedule whether or not earlier ones were answered,
//! so a slow server cannot slow the sender (no coordinated omission); latency is timed
//! from each send. Targets are interleaved within each repeat, and added latency is
//! the median of the paired per-run differences.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

const COMPLETION: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"up","choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox jumps over the lazy dog."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":10,"total_tokens":22}}"#;
const KEY: &str = "sk-bench-key-0001-0123456789";

#[path = "loadbench/cache.rs"]
mod cache;
#[path = "loadbench/dialects.rs"]
mod dialects;
#[path = "loadbench/otlp.rs"]
mod otlp;
#[path = "loadbench/reload.rs"]
mod reload;
#[path = "loadbench/shared.rs"]
mod shared;

/// The same allocator as the `switchboard` binary, for every role (the bare proxy too).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let role = args.get(1).map(String::as_str).unwrap_or("bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    match role {
        "upstream" => rt.block_on(upstream()),
        "collector" => rt.block_on(otlp::collector()),
        "proxy" => rt.block_on(proxy(args[2].parse().unwrap())),
        "gateway" => rt.block_on(gateway(args[2].parse().unwrap(), &args[3])),
        // `drive ADDR SECS`: saturate ADDR for SECS seconds (for profiling a server).
        "drive" => rt.block_on(async {
            let (rps, n) = saturate(args[2].parse().unwrap(), 64, args[3].parse().unwrap()).await;
            println!("{n} requests, {rps:.0} req/s");
        }),
        // `rate ADDR RATE SECS [stream]`: open loop at RATE req/s (for profiling latency).
        "rate" => rt.block_on(async {
            let (rate, secs) = (args[3].parse().unwrap(), args[4].parse().unwrap());
            let stream = args.get(5).is_some_and(|a| a == "stream");
            let st = fixed_rate(args[2].parse().unwrap(), rate, secs, stream).await;
            println!(
                "ok {} err {} p50 {:.3} p90 {:.3} p99 {:.3} ms; TTFB p50 {:.3} p90 {:.3} ms",
                st.ok,
                st.errors,
                Stats::pct(&st.total, 0.5),
                Stats::pct(&st.total, 0.9),
                Stats::pct(&st.total, 0.99),
                Stats::pct(&st.ttfb, 0.5),
                Stats::pct(&st.ttfb, 0.9)
            );
        }),
        // `misses ADDR RATE SECS [off]`: open loop at RATE req/s, every request a new
        // body asking for the cache (all misses; `off`: not asking), for profiling.
        "misses" => rt.block_on(cache::misses(&args[2..])),
        // `drive-misses ADDR SECS [off]`: closed loop (64 connections), every request a
        // miss as `misses` sends them (for profiling).
        "drive-misses" => rt.block_on(cache::drive_misses(&args[2..])),
        // `config DIR UPSTREAM`: write the bench's gateway config into DIR, print its path
        // (for scripts that serve the gateway themselves, e.g. benches/tools/awake_cpu.sh).
        "config" => println!(
            "{}",
            write_config(std::path::Path::new(&args[2]), args[3].parse().unwrap())
        ),
        // `cliff ADDR SECS PID`: the bench's no-cliff step against a running server.
        "cliff" => rt.block_on(async {
            let (addr, secs) = (args[2].parse().unwrap(), args[3].parse().unwrap());
            no_cliff(addr, args[4].parse().unwrap(), secs, 10)
                .await
                .print();
        }),
        _ if args.iter().any(|a| a == "--shared") => rt.block_on(shared::run(&args[1..])),
        _ if args.iter().any(|a| a == "--cache") => rt.block_on(cache::run(&args[1..])),
        _ if args.iter().any(|a| a == "--dialects") => rt.block_on(dialects::run(&args[1..])),
        _ if args.iter().any(|a| a == "--reload") => rt.block_on(reload::run(&args[1..])),
        _ if args.iter().any(|a| a == "--otlp") => rt.block_on(otlp::run(&args[1..])),
        _ => rt.block_on(bench(&args[1..])),
    }
}

// ---------------------------------------------------------------------------
// Roles
// ---------------------------------------------------------------------------

async fn listen() -> tokio::net::TcpListener {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", l.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    l
}

async fn serve_fn<F, Fut>(f: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<
            Output = Result<
                Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>,
                Infallible,
            >,
        > + Send
        + 'static,
{
    let listener = listen().await;
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let _ = stream.set_nodelay(true);
        let f = f.clone();
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(f))
                .await;
        });
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The fake upstream: a fixed completion, or 20 SSE chunks; `"hold": true` in a stream
/// request sends one chunk and then keeps the stream open (for the RSS-per-stream test).
async fn upstream() {
    serve_fn(|req: Request<Incoming>| async move {
        let anthropic = req.uri().path().ends_with("/messages");
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let text = std::str::from_utf8(&body).unwrap_or("");
        let stream = text.contains("\"stream\":true");
        // `--dialects`: Anthropic's wire format on its path.
        if anthropic {
            return Ok::<_, Infallible>(if stream {
                let s = futures_util::stream::iter(
                    dialects::message_events()
                        .into_iter()
                        .map(|b| Ok::<_, Infallible>(hyper::body::Frame::data(b))),
                );
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(BodyExt::boxed(http_body_util::StreamBody::new(s)))
                    .unwrap()
            } else {
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(dialects::MESSAGE.as_bytes())).boxed())
                    .unwrap()
            });
        }
        // `--cache`'s coalescing bursts: an upstream that takes its time.
        if text.contains("\"slow\":true") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let res = if !stream {
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(COMPLETION.as_bytes())).boxed())
                .unwrap()
        } else {
            let hold = text.contains("\"hold\":true");
            let mut events: Vec<Bytes> = (0..20)
                .map(|i| {
                    Bytes::from(format!(
                        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"up\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}]}}\n\n"
                    ))
                })
                .collect();
            events.push(Bytes::from_static(b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"up\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"up\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":20,\"total_tokens\":32}}\n\ndata: [DONE]\n\n"));
            let body: BoxBody = if hold {
                let first = events.swap_remove(0);
                let s = futures_util::stream::once(async move { Ok::<_, Infallible>(hyper::body::Frame::data(first)) })
                    .chain(futures_util::stream::pending());
                BodyExt::boxed(http_body_util::StreamBody::new(s))
            } else {
                let s = futures_util::stream::iter(events.into_iter().map(|b| Ok::<_, Infallible>(hyper::body::Frame::data(b))));
                BodyExt::boxed(http_body_util::StreamBody::new(s))
            };
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        };
        Ok::<_, Infallible>(res)
    })
    .await
}

use futures_util::StreamExt;

/// The floor: a bare hyper reverse proxy with a pooled client, streaming bodies through.
async fn proxy(upstream: SocketAddr) {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(http);
    serve_fn(move |req: Request<Incoming>| {
        let client = client.clone();
        async move {
            let (mut parts, body) = req.into_parts();
            let pq = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            parts.uri = format!("http://{upstream}{pq}").parse().unwrap();
            parts.headers.remove(hyper::header::HOST);
            let res = match client.request(Request::from_parts(parts, body)).await {
                Ok(r) => r.map(|b| b.map_err(|_| unreachable_infallible()).boxed()),
                Err(_) => Response::builder()
                    .status(502)
                    .body(Full::new(Bytes::new()).boxed())
                    .unwrap(),
            };
            Ok::<_, Infallible>(res)
        }
    })
    .await
}

fn unreachable_infallible() -> Infallible {
    // A broken upstream body ends the proxied body; the bench never triggers it.
    std::process::abort()
}

/// switchboard with the full default stack, from a config file; with
/// `[telemetry].otlp_endpoint`, its spans exported (the gateway makes the exporter).
async fn gateway(_upstream: SocketAddr, config_path: &str) {
    let config = switchboard::config::Config::from_file(std::path::Path::new(config_path)).unwrap();
    let gw = switchboard::Gateway::builder()
        .config(config)
        // `--reload` rewrites it and calls `POST /admin/reload`.
        .config_file(config_path)
        .build()
        .unwrap();
    let listener = listen().await;
    gw.serve(listener, std::future::pending(), Duration::from_secs(1))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// Orchestration and load
// ---------------------------------------------------------------------------

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every mode's flags say: `--quick`, `--secs N` (default `secs` = (quick,
/// full)), `--repeat N` (default `repeat` = (quick, full), at least 1).
struct BenchArgs {
    quick: bool,
    secs: u64,
    repeat: usize,
}

impl BenchArgs {
    fn parse(args: &[String], secs: (u64, u64), repeat: (usize, usize)) -> Self {
        let quick = args.iter().any(|a| a == "--quick");
        let value = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
        };
        BenchArgs {
            quick,
            secs: value("--secs")
                .and_then(|v| v.parse().ok())
                .unwrap_or(if quick { secs.0 } else { secs.1 }),
            repeat: value("--repeat")
                .and_then(|v| v.parse().ok())
                .unwrap_or(if quick { repeat.0 } else { repeat.1 })
                .max(1),
        }
    }
}

/// Pins this process (the load generator) to CPU 0 when `taskset` exists; whether it
/// did.
fn pin_self() -> bool {
    let pin = has_taskset();
    if pin {
        let _ = Command::new("taskset")
            .args(["-cp", "0", &std::process::id().to_string()])
            .output();
    }
    pin
}

fn has_taskset() -> bool {
    Command::new("taskset").arg("--version").output().is_ok()
}

fn spawn(role: &[&str], cpu: Option<usize>) -> Server {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = match cpu.filter(|_| has_taskset()) {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &c.to_string()]).arg(&exe);
            cmd
        }
        None => Command::new(&exe),
    };
    let mut child = cmd
        .args(role)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    Server {
        child,
        addr: line.trim().parse().unwrap(),
    }
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Minor page faults and system-mode CPU seconds of `pid` so far (where a change of
/// allocation pattern shows: fresh pages cost a fault and zeroing in the kernel).
fn faults_and_sys(pid: u32) -> (u64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let minflt = f.get(7).and_then(|s| s.parse().ok()).unwrap_or(0);
    let stime: f64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    (minflt, stime / 100.0)
}

/// Context switches (voluntary + involuntary) over every thread of `pid`: a thread
/// that parks and is woken again pays one, so at a fixed rate this counts wake-ups.
fn ctx_switches(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .map(|t| {
            std::fs::read_to_string(t.path().join("status"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Resident set size in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build(http)
}

fn body(stream: bool, hold: bool) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"bench/model","messages":[{{"role":"user","content":"Say something short about foxes."}}],"max_tokens":64,"stream":{stream}{}}}"#,
        if hold { r#","hold":true"# } else { "" }
    ))
}

/// Which key each request uses: [`KEY`] (`0`, the default: every request on one hot
/// key), the first N bench keys in turn (`N`), or the tight key of `--shared`'s
/// overspend step ([`shared::TIGHT_KEYS`]).
static KEYS_IN_USE: AtomicUsize = AtomicUsize::new(0);
static NEXT_KEY: AtomicUsize = AtomicUsize::new(0);

/// The `i`th bench key (`0` is [`KEY`]).
fn bench_key(i: usize) -> String {
    format!("sk-bench-key-{:04}-0123456789", i + 1)
}

fn request(addr: SocketAddr, stream: bool, hold: bool) -> Request<Full<Bytes>> {
    let key = match KEYS_IN_USE.load(Ordering::Relaxed) {
        0 => format!("Bearer {KEY}"),
        shared::TIGHT_KEYS => format!("Bearer {}", shared::TIGHT),
        n => format!(
            "Bearer {}",
            bench_key(NEXT_KEY.fetch_add(1, Ordering::Relaxed) % n)
        ),
    };
    Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", key)
        .header("content-type", "application/json")
        .body(Full::new(body(stream, hold)))
        .unwrap()
}

/// Sends one request; returns (time to first body byte, total) from when it was sent,
/// or None on error.
///
/// Timed from the send, not from the schedule: the generator is open loop (it never
/// waits for a response before sending the next), so the only lateness between the
/// two is tokio's 1 ms timer granularity, which would add up to 1 ms of noise to
/// every sample and hide the µs differences this bench is after.
async fn one(client: &HttpClient, addr: SocketAddr, stream: bool) -> Option<(Duration, Duration)> {
    let req = request(addr, stream, false);
    let t0 = Instant::now();
    let res = match client.request(req).await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => return failed(r.status()),
        Err(e) => return failed(e),
    };
    let mut body = res.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if frame.is_data() && first.is_none() {
            first = Some(t0.elapsed());
        }
    }
    Some((first.unwrap_or_else(|| t0.elapsed()), t0.elapsed()))
}

/// A failed request: `None`, and with `LB_ERRORS` set, why on stderr (how the
/// burst's "Too many open files" was found).
fn failed<T>(why: impl std::fmt::Debug) -> Option<T> {
    if std::env::var_os("LB_ERRORS").is_some() {
        eprintln!("failed: {why:?}");
    }
    None
}

#[derive(Default, Clone)]
struct Stats {
    ok: usize,
    errors: usize,
    /// Requests an open loop did not send: [`MAX_IN_FLIGHT`] were in flight.
    not_sent: usize,
    ttfb: Vec<u64>,
    total: Vec<u64>,
}

impl Stats {
    fn pct(v: &[u64], p: f64) -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        let mut s = v.to_vec();
        s.sort_unstable();
        let i = ((s.len() as f64 - 1.0) * p).round() as usize;
        s[i] as f64 / 1000.0 // ms
    }
}

/// The median of `v` (NaN when empty).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn fmt_list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Most requests [`fixed_rate`] keeps in flight. Above the server's capacity an open
/// loop has ever more requests in flight, one connection each; past about 10,000 the
/// load generator itself collapsed (100 % of its CPU, which it shares with the
/// upstream, while the server idled), so beyond this it does not send (counted in
/// [`Stats::not_sent`]).
const MAX_IN_FLIGHT: usize = 2048;

/// Open loop at `rate` req/s for `secs`.
async fn fixed_rate(addr: SocketAddr, rate: u64, secs: u64, stream: bool) -> Stats {
    fixed_rate_over(&[addr], rate, secs, stream).await
}

/// Open loop at `rate` req/s for `secs`, the requests sent to `addrs` in turn.
async fn fixed_rate_over(addrs: &[SocketAddr], rate: u64, secs: u64, stream: bool) -> Stats {
    let client = client();
    let n = rate * secs;
    let start = Instant::now() + Duration::from_millis(50);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut not_sent = 0;
    for i in 0..n {
        let at = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        tokio::time::sleep_until(at.into()).await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            not_sent += 1;
            continue;
        };
        let (client, tx) = (client.clone(), tx.clone());
        let addr = addrs[i as usize % addrs.len()];
        tokio::spawn(async move {
            let r = one(&client, addr, stream).await;
            drop(permit);
            let _ = tx.send(r);
        });
    }
    drop(tx);
    let mut st = Stats {
        not_sent,
        ..Stats::default()
    };
    while let Some(r) = rx.recv().await {
        match r {
            Some((a, b)) => {
                st.ok += 1;
                st.ttfb.push(a.as_micros() as u64);
                st.total.push(b.as_micros() as u64);
            }
            None => st.errors += 1,
        }
    }
    st
}

/// Closed loop with `conc` workers for `secs`: (requests/s, completed).
async fn saturate(addr: SocketAddr, conc: usize, secs: u64) -> (f64, u64) {
    saturate_over(&[addr], conc, secs).await
}

/// Closed loop with `conc` workers for `secs`, spread evenly over `addrs`:
/// (requests/s, completed).
async fn saturate_over(addrs: &[SocketAddr], conc: usize, secs: u64) -> (f64, u64) {
    let client = client();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (client, done) = (client.clone(), done.clone());
        let addr = addrs[w % addrs.len()];
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                if one(&client, addr, false).await.is_some() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let n = done.load(Ordering::Relaxed);
    (n as f64 / t0.elapsed().as_secs_f64(), n)
}

/// Opens `n` streams that stay open; returns the RSS growth per stream in KiB.
async fn rss_per_open_stream(server: &Server, n: usize) -> f64 {
    let client = client();
    let before = rss_kib(server.child.id());
    let opened = Arc::new(AtomicUsize::new(0));
    let mut held = Vec::new();
    for _ in 0..n {
        let client = client.clone();
        let addr = server.addr;
        let opened = opened.clone();
        held.push(tokio::spawn(async move {
            if let Ok(res) = client.request(request(addr, true, true)).await {
                let mut body = res.into_body();
                if let Some(Ok(_)) = body.frame().await {
                    opened.fetch_add(1, Ordering::SeqCst);
                }
                std::future::pending::<()>().await;
                drop(body);
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while opened.load(Ordering::SeqCst) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_kib(server.child.id());
    let got = opened.load(Ordering::SeqCst).max(1);
    for h in held {
        h.abort();
    }
    (after.saturating_sub(before)) as f64 / got as f64
}

fn write_config(dir: &std::path::Path, upstream: SocketAddr) -> String {
    let path = dir.join("bench.toml");
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[store]
url = "sqlite://{store}"
[logging]
sink = "sqlite"
[[providers]]
name = "up"
kind = "openai"
base_url = "http://{upstream}/v1"
api_key = "sk-upstream"
[[models]]
id = "bench/model"
max_output_tokens = 64
  [[models.endpoints]]
  provider = "up"
  upstream_model = "up"
  prompt_usd_per_mtok = 0.15
  completion_usd_per_mtok = 0.6
[[keys]]
secret = "{KEY}"
name = "bench"
credits_usd = 1000000
"#,
        store = dir.join("bench.db").display()
    );
    std::fs::write(&path, config).unwrap();
    path.display().to_string()
}

async fn bench(args: &[String]) {
    let BenchArgs {
        quick,
        secs,
        repeat,
    } = BenchArgs::parse(args, (2, 5), (1, 5));
    let streams: usize = if quick { 200 } else { 1000 };
    let pin = pin_self();
    let dir = std::env::temp_dir().join(format!("switchboard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let up = spawn(&["upstream"], Some(0));
    let proxy = spawn(&["proxy", &up.addr.to_string()], Some(1));
    let cfg = write_config(&dir, up.addr);
    let gw = spawn(&["gateway", &up.addr.to_string(), &cfg], Some(1));
    let gw_idle_rss = rss_kib(gw.child.id());
    let proxy_idle_rss = rss_kib(proxy.child.id());
    if args.iter().any(|a| a == "--memory-only") {
        // Just the memory step (after a short warm-up), for work on per-stream memory.
        for addr in [proxy.addr, gw.addr] {
            fixed_rate(addr, 50, 1, true).await;
        }
        let per_proxy = rss_per_open_stream(&proxy, streams).await;
        let per_gw = rss_per_open_stream(&gw, streams).await;
        println!("RSS per open idle stream ({streams} streams): bare proxy {per_proxy:.1} KiB, switchboard {per_gw:.1} KiB");
        println!(
            "RSS idle: bare proxy {:.1} MiB, switchboard {:.1} MiB",
            proxy_idle_rss as f64 / 1024.0,
            gw_idle_rss as f64 / 1024.0
        );
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }

    println!(
        "# switchboard load benchmark ({} s per step, {repeat} runs{})",
        secs,
        if pin {
            ", server under test pinned to CPU 1"
        } else {
            ""
        }
    );
    // Warm up pools and lazily built state.
    for addr in [up.addr, proxy.addr, gw.addr] {
        fixed_rate(addr, 200, 1, false).await;
        fixed_rate(addr, 50, 1, true).await;
    }

    println!("\n## Non-streaming, fixed rate (open loop), latency in ms, median of {repeat} runs");
    println!("| rate | target | ok | err | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|---|---|");
    let targets = [
        ("direct", up.addr, up.child.id()),
        ("bare proxy", proxy.addr, proxy.child.id()),
        ("switchboard", gw.addr, gw.child.id()),
    ];
    // CPU µs per request of the server under test at each rate (the upstream's for
    // "direct"): at a fixed rate both servers get the same batching, unlike saturation.
    let mut cpu_at_rate: Vec<(u64, [f64; 3])> = Vec::new();
    let mut added = Vec::new();
    for rate in [500u64, 1000, 2000] {
        // runs[target] = (p50, p90, p99) per repeat; targets interleaved within a repeat.
        let mut runs: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); targets.len()];
        let mut counts = vec![(0usize, 0usize); targets.len()];
        let mut cpu = [0.0f64; 3];
        for _ in 0..repeat {
            for (i, (_, addr, pid)) in targets.iter().enumerate() {
                let c0 = cpu_secs(*pid);
                let st = fixed_rate(*addr, rate, secs, false).await;
                cpu[i] += (cpu_secs(*pid) - c0) * 1e6;
                runs[i].push((
                    Stats::pct(&st.total, 0.5),
                    Stats::pct(&st.total, 0.9),
                    Stats::pct(&st.total, 0.99),
                ));
                counts[i].0 += st.ok;
                counts[i].1 += st.errors;
            }
        }
        for (i, c) in cpu.iter_mut().enumerate() {
            *c /= counts[i].0.max(1) as f64;
        }
        cpu_at_rate.push((rate, cpu));
        for (i, (name, _, _)) in targets.iter().enumerate() {
            let col = |f: fn(&(f64, f64, f64)) -> f64| median(runs[i].iter().map(f).collect());
            println!(
                "| {rate} | {name} | {} | {} | {:.3} | {:.3} | {:.3} |",
                counts[i].0,
                counts[i].1,
                col(|r| r.0),
                col(|r| r.1),
                col(|r| r.2)
            );
        }
        // Paired differences (same repeat), then their median.
        let diff = |a: usize, b: usize, f: fn(&(f64, f64, f64)) -> f64| {
            median(
                runs[a]
                    .iter()
                    .zip(&runs[b])
                    .map(|(x, y)| f(x) - f(y))
                    .collect(),
            )
        };
        added.push((
            rate,
            diff(2, 1, |r| r.0),
            diff(2, 1, |r| r.1),
            diff(2, 0, |r| r.0),
        ));
    }
    println!("\nAdded latency of switchboard (µs; median of the paired per-run differences):");
    println!("| rate | p50 vs bare proxy | p90 vs bare proxy | p50 vs direct |");
    println!("|---|---|---|---|");
    for (rate, a50, a90, d50) in &added {
        println!(
            "| {rate} | {:.0} | {:.0} | {:.0} |",
            a50 * 1000.0,
            a90 * 1000.0,
            d50 * 1000.0
        );
    }

    println!("\nServer CPU µs per request at a fixed rate (all runs):");
    println!("| rate | upstream (direct) | bare proxy | switchboard | ratio |");
    println!("|---|---|---|---|---|");
    for (rate, c) in &cpu_at_rate {
        println!(
            "| {rate} | {:.1} | {:.1} | {:.1} | {:.2} |",
            c[0],
            c[1],
            c[2],
            c[2] / c[1]
        );
    }

    println!("\n## Saturation (closed loop, 64 connections), median of {repeat} runs");
    println!("| target | req/s | CPU µs per request (server process) | peak RSS MiB |");
    println!("|---|---|---|---|");
    let mut sat: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); 2];
    for _ in 0..repeat {
        for (i, srv) in [&proxy, &gw].into_iter().enumerate() {
            let c0 = cpu_secs(srv.child.id());
            let (rps, n) = saturate(srv.addr, 64, secs).await;
            let c1 = cpu_secs(srv.child.id());
            sat[i].0.push(rps);
            sat[i].1.push((c1 - c0) * 1e6 / n.max(1) as f64);
        }
    }
    let mut medians = Vec::new();
    for (i, (name, srv)) in [("bare proxy", &proxy), ("switchboard", &gw)]
        .into_iter()
        .enumerate()
    {
        let (rps, cpu_us) = (median(sat[i].0.clone()), median(sat[i].1.clone()));
        let rss = rss_kib(srv.child.id()) as f64 / 1024.0;
        println!("| {name} | {rps:.0} | {cpu_us:.1} | {rss:.1} |");
        medians.push((rps, cpu_us));
    }
    let ratios = |f: fn(&(f64, f64)) -> f64| -> Vec<f64> {
        (0..repeat)
            .map(|r| f(&(sat[1].0[r], sat[1].1[r])) / f(&(sat[0].0[r], sat[0].1[r])))
            .collect()
    };
    println!(
        "\nThroughput ratio switchboard / bare proxy: {:.2} (runs: {}); CPU per request ratio: {:.2} (runs: {})",
        medians[1].0 / medians[0].0,
        fmt_list(&ratios(|x| x.0)),
        medians[1].1 / medians[0].1,
        fmt_list(&ratios(|x| x.1)),
    );

    // Let the saturation's backlog (request-log batches, checkpoints) drain first, so
    // the streams measure the stack and not the step before.
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("\n## Streaming (20 chunks), 200 req/s, ms, median of {repeat} runs");
    println!("| target | ok | TTFB p50 | TTFB p99 | total p50 | total p99 |");
    println!("|---|---|---|---|---|---|");
    let stream_targets = [
        ("direct", up.addr),
        ("bare proxy", proxy.addr),
        ("switchboard", gw.addr),
    ];
    // runs[target] = (TTFB p50, TTFB p99, total p50, total p99) per repeat.
    let mut runs: Vec<Vec<[f64; 4]>> = vec![Vec::new(); stream_targets.len()];
    let mut oks = vec![0usize; stream_targets.len()];
    for _ in 0..repeat {
        for (i, (_, addr)) in stream_targets.iter().enumerate() {
            let st = fixed_rate(*addr, 200, secs, true).await;
            oks[i] += st.ok;
            runs[i].push([
                Stats::pct(&st.ttfb, 0.5),
                Stats::pct(&st.ttfb, 0.99),
                Stats::pct(&st.total, 0.5),
                Stats::pct(&st.total, 0.99),
            ]);
        }
    }
    for (i, (name, _)) in stream_targets.iter().enumerate() {
        let col = |j: usize| median(runs[i].iter().map(|r| r[j]).collect());
        println!(
            "| {name} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            oks[i],
            col(0),
            col(1),
            col(2),
            col(3)
        );
    }
    let added_ttfb = median(
        runs[2]
            .iter()
            .zip(&runs[1])
            .map(|(g, p)| g[0] - p[0])
            .collect(),
    );
    let per_run: Vec<f64> = runs[2]
        .iter()
        .zip(&runs[1])
        .map(|(g, p)| (g[0] - p[0]) * 1000.0)
        .collect();
    println!(
        "\nTTFB added over the bare proxy at p50: {:.0} µs (median of the paired per-run differences; runs: {})",
        added_ttfb * 1000.0,
        fmt_list(&per_run)
    );

    println!("\n## Memory");
    let per_proxy = rss_per_open_stream(&proxy, streams).await;
    let per_gw = rss_per_open_stream(&gw, streams).await;
    println!("| target | RSS idle MiB | RSS per open idle stream KiB ({streams} streams) |");
    println!("|---|---|---|");
    println!(
        "| bare proxy | {:.1} | {per_proxy:.1} |",
        proxy_idle_rss as f64 / 1024.0
    );
    println!(
        "| switchboard | {:.1} | {per_gw:.1} |",
        gw_idle_rss as f64 / 1024.0
    );

    println!("\n## No cliff: p99 at 1000 req/s before and after 10 s at 10x");
    // The memory step just closed 1,000 streams (each settled and logged as cut):
    // let that finish, and warm up, so that "before" is the normal rate's p99.
    tokio::time::sleep(Duration::from_secs(2)).await;
    no_cliff(gw.addr, gw.child.id(), secs, if quick { 2 } else { 10 })
        .await
        .print();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The no-cliff step's results.
struct Cliff {
    before: Stats,
    burst: Stats,
    /// The server's CPU time in the quiet second after the burst: work it left behind.
    left_behind: Duration,
    after: Stats,
}

impl Cliff {
    fn print(&self) {
        println!(
            "p99 before {:.3} ms; burst: ok {} err {} not sent {} (p50 {:.1} ms); \
             CPU in the second after it {} ms; p99 after {:.3} ms",
            Stats::pct(&self.before.total, 0.99),
            self.burst.ok,
            self.burst.errors,
            self.burst.not_sent,
            Stats::pct(&self.burst.total, 0.5),
            self.left_behind.as_millis(),
            Stats::pct(&self.after.total, 0.99)
        );
    }
}

/// 1000 req/s for `secs`, 10x for `burst_secs`, a quiet second, then 1000 req/s again.
///
/// The quiet second is for the burst's connections: dropping its client closes
/// ~2,000 of them, on the generator's runtime and in the server, which otherwise
/// delayed the first "after" requests by ~40-90 ms. The server's CPU time in that
/// second is reported: what the burst left it to do.
async fn no_cliff(addr: SocketAddr, pid: u32, secs: u64, burst_secs: u64) -> Cliff {
    let _ = fixed_rate(addr, 1000, 1, false).await;
    let before = fixed_rate(addr, 1000, secs, false).await;
    let burst = fixed_rate(addr, 10_000, burst_secs, false).await;
    let c0 = cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let left_behind = Duration::from_secs_f64(cpu_secs(pid) - c0);
    let after = fixed_rate(addr, 1000, secs, false).await;
    Cliff {
        before,
        burst,
        left_behind,
        after,
    }
}
