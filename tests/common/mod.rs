//! Shared harness for integration tests: the real gateway on 127.0.0.1:0, and fake
//! upstream providers as real axum servers on 127.0.0.1:0.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use futures_util::StreamExt;
use switchboard::config::Config;
use switchboard::Gateway;
use tokio::net::TcpListener;

/// Generous bound around anything that crosses a real socket (busy 2-core CI).
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// One request as a fake upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
    pub body: serde_json::Value,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A fake upstream: counts and records every request it receives.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub hits: Arc<AtomicUsize>,
}

impl Upstream {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Starts a fake upstream whose every request is answered by `handler` (any path).
/// The handler gets the recorded request and its index (0-based) among all requests.
pub async fn upstream<F, Fut>(handler: F) -> Upstream
where
    F: Fn(Seen, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send + 'static,
{
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hits = Arc::new(AtomicUsize::new(0));
    let (s2, h2) = (seen.clone(), hits.clone());
    let app = axum::Router::new().fallback(move |req: Request| {
        let handler = handler.clone();
        let (seen, hits) = (s2.clone(), h2.clone());
        async move {
            let (parts, body) = req.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            let rec = Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().map(str::to_string),
                headers: parts.headers,
                body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            };
            seen.lock().unwrap().push(rec.clone());
            let n = hits.fetch_add(1, Ordering::SeqCst);
            handler(rec, n).await
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Upstream { addr, seen, hits }
}

/// A JSON response.
pub fn json(status: u16, body: serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// An SSE response of `data:` events (each string is one event's data), sent with
/// `gap` between events.
pub fn sse(events: Vec<String>, gap: Duration) -> Response {
    sse_named(events.into_iter().map(|d| (None, d)).collect(), gap)
}

/// An SSE response of `(event name, data)` pairs, sent with `gap` between them.
pub fn sse_named(events: Vec<(Option<String>, String)>, gap: Duration) -> Response {
    let stream = futures_util::stream::iter(events).then(move |(name, data)| async move {
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        let mut s = String::new();
        if let Some(n) = name {
            s.push_str(&format!("event: {n}\n"));
        }
        s.push_str(&format!("data: {data}\n\n"));
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(s))
    });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// A response that never comes.
pub async fn hang() -> Response {
    std::future::pending::<()>().await;
    unreachable!()
}

/// A running gateway.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Builds the gateway from TOML (validated like `switchboard check`) and serves it on
/// 127.0.0.1:0.
pub async fn gateway(toml: &str) -> TestGateway {
    let config = Config::from_toml(toml).unwrap_or_else(|e| panic!("test config: {e}"));
    gateway_with(config).await
}

/// A fresh directory of its own under the system temp dir (pid + counter + random).
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let r: u64 = rand::random();
    let dir = std::env::temp_dir().join(format!(
        "switchboard-test-{tag}-{}-{n}-{r:016x}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Serves a built config on 127.0.0.1:0. Unless the config names its own store,
/// each gateway gets a store of its own in a fresh temporary directory.
pub async fn gateway_with(mut config: Config) -> TestGateway {
    let defaults = switchboard::config::StoreConfig::default();
    if config.store.url == defaults.url {
        let dir = temp_dir("store");
        config.store.url = format!("sqlite://{}", dir.join("switchboard.db").display());
    }
    // A PostgreSQL store's spill files go to a temp dir, never the working directory.
    if switchboard::store::is_postgres_url(&config.store.url)
        && config.store.spill_dir == defaults.spill_dir
    {
        config.store.spill_dir = temp_dir("spill").display().to_string();
    }
    // The request log of a test gateway goes to a temp dir, never the working directory.
    if config.logging.sink == "sqlite"
        && switchboard::logging::sqlite_path_beside_store(&config.store.url)
            .is_some_and(|p| p.is_relative())
    {
        let path = temp_dir("logs").join("switchboard-logs.db");
        config.logging.sink = format!("sqlite:{}", path.display());
    }
    let gateway = Gateway::builder()
        .config(config)
        .build()
        .expect("gateway builds");
    serve_built(gateway).await
}

/// An HTTP client for tests (no proxy, generous timeout).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(SOCKET_TIMEOUT)
        .build()
        .unwrap()
}

/// POSTs a chat-completions body to the gateway with the client key `key`.
pub async fn post_chat(gw: &TestGateway, key: &str, body: &serde_json::Value) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// POSTs a non-stream `mock/lorem` request (see [`EXACT_LOREM`]) for `max_tokens`
/// tokens with the client key `key`.
pub async fn post_lorem(gw: &TestGateway, key: &str, max_tokens: u32) -> reqwest::Response {
    let body = serde_json::json!({"model": "mock/lorem", "max_tokens": max_tokens,
                                  "messages": [{"role": "user", "content": "go"}]});
    post_chat(gw, key, &body).await
}

/// GETs `path` from the gateway with the client key `key`: the status, and the body
/// as JSON (`Null` when it is not JSON).
pub async fn get_json(gw: &TestGateway, path: &str, key: &str) -> (u16, serde_json::Value) {
    let res = client()
        .get(gw.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(serde_json::Value::Null))
}

/// Two gateways built from one config `toml` on one SQLite store of their own (so
/// they know the same keys), no request log: with a `[shared]` Redis, two instances
/// of one deployment.
pub async fn gateway_pair(toml: &str) -> (TestGateway, TestGateway) {
    let mut config = Config::from_toml(toml).unwrap();
    let dir = temp_dir("pair");
    config.store.url = format!("sqlite://{}", dir.join("switchboard.db").display());
    config.logging.sink = "none".into();
    let store = switchboard::store::SqliteStore::open(&config.store).unwrap();
    store.bootstrap(&config.keys).unwrap();
    let build = || {
        Gateway::builder()
            .config(config.clone())
            .store(store.clone())
            .build()
            .unwrap()
    };
    (serve_built(build()).await, serve_built(build()).await)
}

/// Parses an SSE body into its `data:` payloads (comments dropped).
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .flat_map(|event| event.lines())
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// Joins the `delta.content` of every chunk in an SSE body.
pub fn sse_text(text: &str) -> String {
    sse_data(text)
        .iter()
        .filter(|d| d.as_str() != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// `[[providers]]` `mock` and `[[models]]` `mock/lorem` (at most 100 tokens out) with a
/// free prompt and $1 per Mtok of completion: the lorem mock writes exactly
/// `max_tokens` words, so a request with `max_tokens = n` reserves and costs exactly
/// $n × 10⁻⁶. A TOML fragment to put after the single-table sections.
pub const EXACT_LOREM: &str = r#"
[[providers]]
name = "mock"
kind = "mock"

[[models]]
id = "mock/lorem"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "lorem"
  prompt_usd_per_mtok = 0
  completion_usd_per_mtok = 1
"#;

/// The client key of [`openai_config`] (config secrets are at least 20 characters;
/// only the built-in demo's `sk-demo` is shorter).
pub const TEST_KEY: &str = "sk-test-client-key-0123456789";

/// A config with one OpenAI-kind provider per `(name, base_url)`, all serving model
/// `test/model` in the given order, prices $1/$2 per Mtok, and the demo mock models.
pub fn openai_config(upstreams: &[(&str, &str)], extra: &str) -> String {
    let mut s = String::from("[server]\nlisten = \"127.0.0.1:0\"\nkeepalive_secs = 10\n\n");
    for (name, url) in upstreams {
        s.push_str(&format!(
            "[[providers]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"{url}/v1\"\napi_key = \"sk-upstream-{name}\"\ntimeout_secs = 2\nstream_idle_timeout_secs = 2\n\n"
        ));
    }
    s.push_str("[[models]]\nid = \"test/model\"\nmax_output_tokens = 100\n");
    for (name, _) in upstreams {
        s.push_str(&format!(
            "  [[models.endpoints]]\n  provider = \"{name}\"\n  upstream_model = \"up-model\"\n  prompt_usd_per_mtok = 1\n  completion_usd_per_mtok = 2\n"
        ));
    }
    s.push('\n');
    s.push_str(extra);
    // The client key the tests use, with generous credits.
    s.push_str(&format!(
        "\n[[keys]]\nsecret = \"{TEST_KEY}\"\nname = \"demo\"\ncredits_usd = 1000\n"
    ));
    s
}

/// A new empty directory under the system temp dir, unique in this process.
pub fn fresh_temp_dir() -> std::path::PathBuf {
    temp_dir("tmp")
}

/// Serves an already built gateway (e.g. with a custom log sink) on 127.0.0.1:0.
pub async fn serve_built(gateway: Gateway) -> TestGateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let g = gateway.clone();
    tokio::spawn(async move {
        let _ = g
            .serve(
                listener,
                async {
                    let _ = rx.await;
                },
                Duration::from_secs(5),
            )
            .await;
    });
    TestGateway {
        addr,
        gateway,
        shutdown: Some(tx),
    }
}

/// The data-segment limit (`RLIMIT_DATA`, which covers heap and anonymous maps) the
/// real binary runs under in process-level hostile tests: 2 GiB. A normal gateway
/// takes ≈ 1.07 GB of it (mimalloc reserves a 1 GiB arena up front; RSS ≈ 47 MB), so
/// an allocation bomb (the 412 GB and 68 GB ones of issue 20) fails and kills the
/// process under test, never the machine.
pub const PROCESS_DATA_LIMIT: u64 = 2 << 30;

/// The real `switchboard serve` process, under [`PROCESS_DATA_LIMIT`]; killed on drop.
pub struct GatewayProcess {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its stderr.
    pub log: std::path::PathBuf,
}

impl GatewayProcess {
    /// Writes `toml` (which must not set `[store]` or `[server].listen`) beside a
    /// fresh store, starts `switchboard serve` on a free port under `prlimit`, and
    /// waits until it answers `/healthz`.
    pub async fn start(toml: &str) -> GatewayProcess {
        let dir = temp_dir("process");
        let config = dir.join("switchboard.toml");
        let store = dir.join("switchboard.db");
        std::fs::write(
            &config,
            format!("[store]\nurl = \"sqlite://{}\"\n\n{toml}", store.display()),
        )
        .unwrap();
        let log = dir.join("stderr.log");
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = std::process::Command::new("prlimit")
                .arg(format!("--data={PROCESS_DATA_LIMIT}"))
                .arg("--")
                .arg(env!("CARGO_BIN_EXE_switchboard"))
                .args(["serve", "--config"])
                .arg(&config)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .env("RUST_LOG", "info")
                .stdout(std::process::Stdio::null())
                .stderr(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                        .unwrap(),
                )
                .spawn()
                .expect("prlimit (util-linux) runs the switchboard binary");
            let mut gw = GatewayProcess {
                child,
                base: format!("http://127.0.0.1:{port}"),
                log: log.clone(),
            };
            let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = gw.child.try_wait() {
                    break; // the port was taken meanwhile: try another
                }
                if let Ok(r) = client().get(gw.url("/healthz")).send().await {
                    if r.status() == 200 {
                        return gw;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!(
            "switchboard did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Panics, with the exit status and the end of its log, if the process has died.
    pub fn assert_alive(&mut self, after: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("the gateway died ({status}) after {after}; its log ends:\n{tail}");
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 200 response whose body is `chunk` repeated forever (no `Content-Length`):
/// an upstream that never ends its answer.
pub fn endless(content_type: &str, head: &'static [u8], chunk: &'static [u8]) -> Response {
    let body = futures_util::stream::once(async move { bytes::Bytes::from_static(head) })
        .chain(futures_util::stream::repeat(bytes::Bytes::from_static(
            chunk,
        )))
        .map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .status(200)
        .header("content-type", content_type)
        .body(Body::from_stream(body))
        .unwrap()
}

/// A 200 response that sends `head`, then one byte of `drip` every `every`, forever.
pub fn drip(
    content_type: &str,
    head: &'static [u8],
    drip: &'static [u8],
    every: Duration,
) -> Response {
    let drops =
        futures_util::stream::iter(drip.iter().cycle().copied()).then(move |b| async move {
            tokio::time::sleep(every).await;
            bytes::Bytes::from(vec![b])
        });
    let body = futures_util::stream::once(async move { bytes::Bytes::from_static(head) })
        .chain(drops)
        .map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .status(200)
        .header("content-type", content_type)
        .body(Body::from_stream(body))
        .unwrap()
}

/// 10¹⁵: the usage a broken upstream reported (issue 20).
pub const ABSURD_TOKENS: u64 = 1_000_000_000_000_000;

/// An OpenAI-style answer whose usage is absurd ([`ABSURD_TOKENS`] prompt and
/// completion tokens), JSON or SSE as the request asked.
pub fn absurd_usage_answer(seen: &Seen) -> axum::response::Response {
    use serde_json::{json as json_value, Value};
    let usage = json_value!({"prompt_tokens": ABSURD_TOKENS, "completion_tokens": ABSURD_TOKENS, "total_tokens": 2 * ABSURD_TOKENS});
    if seen.body["stream"] == true {
        let chunk = |delta: Value, finish: Option<&str>| {
            json_value!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            .to_string()
        };
        sse(
            vec![
                chunk(json_value!({"role": "assistant", "content": "Hello"}), None),
                chunk(json_value!({"content": " there"}), None),
                chunk(json_value!({}), Some("stop")),
                json_value!({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage})
                    .to_string(),
                "[DONE]".into(),
            ],
            std::time::Duration::ZERO,
        )
    } else {
        json(
            200,
            json_value!({
                "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}],
                "usage": usage
            }),
        )
    }
}

// ---------------------------------------------------------------------------
// Many instances (tests/scale_out.rs): whole-config `switchboard serve` processes
// and a TCP relay that can take a server away and give it back.
// ---------------------------------------------------------------------------

/// The admin token every [`ServeProcess`] runs with (in `SWITCHBOARD_ADMIN_TOKEN`,
/// the default `[admin].token_env`).
pub const ADMIN_TOKEN: &str = "sb-test-admin-token-0123456789";

/// A free port on 127.0.0.1 (free when asked: the caller retries if it is taken).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The last `lines` lines of a file (empty when it cannot be read).
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A real `switchboard serve` process running a WHOLE given config (its own
/// `[store]`, `[shared]`, `[logging]`: nothing is added but `--listen`), on a free
/// port of 127.0.0.1, with [`ADMIN_TOKEN`] and `RUST_LOG=info`. It can be SIGKILLed
/// ([`kill`](Self::kill)) and started again on the same config
/// ([`restart`](Self::restart)); it is SIGKILLed on drop.
pub struct ServeProcess {
    child: Option<std::process::Child>,
    /// The config file it runs.
    pub config: std::path::PathBuf,
    /// `http://127.0.0.1:PORT` of the current run.
    pub base: String,
    /// Its stderr (every run appends).
    pub log: std::path::PathBuf,
}

impl ServeProcess {
    /// Writes `toml` to a fresh directory and starts it; waits until `/readyz`
    /// answers 200 (the store is reachable). Panics with the log's end if it never does.
    pub async fn start(toml: &str) -> ServeProcess {
        let mut p = ServeProcess::spawn(toml).await;
        p.wait_ready().await;
        p
    }

    /// Writes `toml` to a fresh directory and starts it; waits only until it answers
    /// `/healthz` (the process serves HTTP), whatever its store says.
    pub async fn spawn(toml: &str) -> ServeProcess {
        let dir = temp_dir("serve");
        let config = dir.join("switchboard.toml");
        std::fs::write(&config, toml).unwrap();
        let mut p = ServeProcess {
            child: None,
            log: dir.join("stderr.log"),
            config,
            base: String::new(),
        };
        p.launch().await;
        p
    }

    /// Starts the process (the first run or a restart) and waits for `/healthz`.
    async fn launch(&mut self) {
        for _ in 0..5 {
            let port = free_port();
            let log_before = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
            let child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
                .args(["serve", "--config"])
                .arg(&self.config)
                // Whatever the config leaves relative (a PostgreSQL store's spill dir,
                // `.` by default) lands in this process's own directory, never in the
                // crate root.
                .current_dir(self.config.parent().expect("the config is in its dir"))
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .env("RUST_LOG", "info")
                .env("SWITCHBOARD_ADMIN_TOKEN", ADMIN_TOKEN)
                .stdout(std::process::Stdio::null())
                .stderr(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&self.log)
                        .unwrap(),
                )
                .spawn()
                .expect("the switchboard binary runs");
            self.child = Some(child);
            self.base = format!("http://127.0.0.1:{port}");
            let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
            while std::time::Instant::now() < deadline {
                if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                    // Only a port taken meanwhile is worth another try; any other
                    // exit is what the test is about.
                    let log = std::fs::read(&self.log).unwrap_or_default();
                    let this_run = String::from_utf8_lossy(&log[log_before.min(log.len())..]);
                    assert!(
                        this_run.contains("cannot listen on"),
                        "switchboard serve exited ({status}); its log ends:\n{}",
                        tail(&self.log, 30)
                    );
                    break;
                }
                if let Ok(r) = client().get(self.url("/healthz")).send().await {
                    if r.status() == 200 {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.kill();
        }
        panic!(
            "switchboard serve did not start ({}); its log ends:\n{}",
            self.config.display(),
            tail(&self.log, 30)
        );
    }

    /// Polls `/readyz` until it answers 200 (within [`SOCKET_TIMEOUT`]).
    pub async fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
        loop {
            self.assert_alive("starting");
            if let Ok(r) = client().get(self.url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/readyz never answered 200; the log ends:\n{}",
                tail(&self.log, 30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The process id of the current run (e.g. to send it SIGHUP).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL (`Child::kill` on unix), and reap it. Nothing runs at exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same config (after [`kill`](Self::kill)), on a free
    /// port, and waits for `/readyz` 200.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
        self.wait_ready().await;
    }

    /// Its stderr so far (every run).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics, with the exit status and the end of its log, if the process has died.
    pub fn assert_alive(&mut self, after: &str) {
        let Some(child) = self.child.as_mut() else {
            panic!("the gateway is not running ({after})");
        };
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the gateway died ({status}) {after}; its log ends:\n{}",
                tail(&self.log, 30)
            );
        }
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of a Prometheus sample `name` (with its labels, exactly as rendered,
/// e.g. `switchboard_shared_state_up` or `foo_total{op="lease"}`) in `/metrics` text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `/metrics` text of the gateway at `base` (`http://127.0.0.1:port`).
pub async fn metrics_text(base: &str) -> String {
    let res = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.text().await.unwrap()
}

/// Polls `/metrics` of the gateway at `base` until sample `name` (as in [`metric`];
/// absent counts as 0) is `want`; panics after [`SOCKET_TIMEOUT`] with the last value.
/// The registry is process-wide: a test that waits on a gauge must be the only one
/// of its binary moving it meanwhile.
pub async fn wait_for_metric(base: &str, name: &str, want: f64) {
    let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
    loop {
        let now = metric(&metrics_text(base).await, name).unwrap_or(0.0);
        if now == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} is {now}, never {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The sum of every sample of metric `name` (all label sets) in `/metrics` text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.rsplit_once("} ")?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// A TCP relay on 127.0.0.1 to a real server (PostgreSQL, Redis): point a gateway at
/// [`port`](Self::port) instead of the server's, and [`down`](Self::down) takes the
/// server away from it (every relayed connection closed, new ones refused) and
/// [`up`](Self::up) gives it back on the same port, so a test sees a server fail
/// and return without touching the real one.
pub struct TcpRelay {
    port: u16,
    target: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TcpRelay {
    /// Relays a free port of 127.0.0.1 to `target` (`host:port`).
    pub async fn start(target: &str) -> TcpRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut relay = TcpRelay {
            port,
            target: target.to_string(),
            task: None,
        };
        relay.task = Some(tokio::spawn(Self::relay(listener, relay.target.clone())));
        relay
    }

    async fn relay(listener: TcpListener, target: String) {
        // Dropping the set (when this task is aborted) aborts every connection's
        // task, which closes both of its sockets.
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((mut inbound, _)) = accepted else { continue };
                    let target = target.clone();
                    conns.spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    }

    /// The relay's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server is gone: every relayed connection is closed and the port refuses
    /// new ones.
    pub async fn down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// The server is back, on the same port.
    pub async fn up(&mut self) {
        self.down().await;
        let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the relay's port {} could not be bound again: {e}",
                        self.port
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.task = Some(tokio::spawn(Self::relay(listener, self.target.clone())));
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `url` (`scheme://[user@]host:port/…`) with its port replaced by `port` (and its
/// host by 127.0.0.1), and the `host:port` it named: to send a gateway's store or
/// Redis connections through a [`TcpRelay`].
pub fn through_port(url: &str, port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let target = if hostport.contains(':') {
        hostport.to_string()
    } else {
        let default = if scheme.starts_with("redis") {
            6379
        } else {
            5432
        };
        format!("{hostport}:{default}")
    };
    (format!("{scheme}://{user}127.0.0.1:{port}{path}"), target)
}

/// Sends SIGTERM to a gateway process started by a test.
pub fn sigterm(child: &std::process::Child) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Waits (60 s at most) for a gateway process to exit after SIGTERM; its exit code
/// (-1 when killed by a signal).
pub fn wait_exit(child: &mut std::process::Child) -> i32 {
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("the gateway did not exit within 60 s of SIGTERM");
}

/// Reads a `switchboard serve` child's stderr (piped) until its "listening on" line;
/// returns the address it printed (`127.0.0.1:PORT` or `[::1]:PORT`), the lines up to
/// and including that one, and a receiver of the lines after it (drop it, or keep
/// reading: a thread forwards every line, so the child never blocks on a full pipe).
pub fn until_listening(
    child: &mut std::process::Child,
) -> (String, Vec<String>, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no listening line; stderr so far: {seen:#?}"));
        // Text or JSON logs: the address ends at white space or the closing quote.
        let addr = line.split("listening on http://").nth(1).map(|rest| {
            rest.chars()
                .take_while(|c| !c.is_whitespace() && *c != '"')
                .collect::<String>()
        });
        seen.push(line);
        if let Some(addr) = addr {
            return (addr, seen, rx);
        }
    }
}
