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
    if config.store.url == switchboard::config::StoreConfig::default().url {
        let dir = temp_dir("store");
        config.store.url = format!("sqlite://{}", dir.join("switchboard.db").display());
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
