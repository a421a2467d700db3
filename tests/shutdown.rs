//! Stopping: `[server].shutdown_grace_secs` and the drain (streams still open when the
//! grace runs out end with their dialect's mid-stream error and are charged for what
//! they delivered; requests still waiting get a 503), in process and in the binary;
//! and the binary's log format on stderr.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::body::Body;
use common::{
    client, hang, sigterm, temp_dir, until_listening, upstream, wait_exit, Upstream,
    SOCKET_TIMEOUT, TEST_KEY,
};
use futures_util::StreamExt;
use switchboard::config::Config;
use switchboard::money::Money;
use switchboard::Gateway;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// The prompt tokens the fake upstream reports (below any request's prompt bound).
const PROMPT_TOKENS: i64 = 7;
/// What it streams before it stalls.
const DELIVERED: &str = "w0 w1 ";

/// A fake OpenAI upstream: a stream reports its prompt, sends [`DELIVERED`] in two
/// chunks, then stalls for ever; a non-stream request never gets its answer.
async fn stalling_upstream() -> Upstream {
    upstream(|seen, _| async move {
        if seen.body["stream"] != true {
            return hang().await;
        }
        let events = [
            format!(r#"{{"id":"up","choices":[],"usage":{{"prompt_tokens":{PROMPT_TOKENS},"completion_tokens":0,"total_tokens":{PROMPT_TOKENS}}}}}"#),
            r#"{"id":"up","choices":[{"index":0,"delta":{"role":"assistant","content":"w0 "}}]}"#.into(),
            r#"{"id":"up","choices":[{"index":0,"delta":{"content":"w1 "}}]}"#.into(),
        ];
        let events = futures_util::stream::iter(events)
            .map(|d| Ok::<_, std::convert::Infallible>(format!("data: {d}\n\n")))
            .chain(futures_util::stream::pending());
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(events))
            .unwrap()
    })
    .await
}

/// One OpenAI-kind model on `up`, $1 / $2 per Mtok, a one-second grace, the test key.
fn config(up: &Upstream, extra_server: &str) -> String {
    format!(
        r#"[server]
shutdown_grace_secs = 1
{extra_server}

[logging]
sink = "none"

[[providers]]
name = "up"
kind = "openai"
base_url = "{}/v1"
api_key = "sk-upstream-up"
timeout_secs = 120
stream_idle_timeout_secs = 120

[[models]]
id = "test/model"
tokenizer = "o200k_base"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "up"
  upstream_model = "up-model"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[keys]]
secret = "{TEST_KEY}"
name = "drainer"
credits_usd = 10
"#,
        up.url()
    )
}

/// What one stream cut after [`DELIVERED`] costs: the reported prompt and the
/// delivered completion, at $1 / $2 per Mtok.
fn cut_stream_cost() -> Money {
    let completion = switchboard::tokenize::count("o200k_base", DELIVERED) as i64;
    assert!(completion > 0);
    Money::from_pico(PROMPT_TOKENS * 1_000_000 + completion * 2_000_000)
}

/// Sends a streamed request and reads until its first content has arrived.
async fn open_stream(
    base: &str,
    path: &str,
    body: serde_json::Value,
) -> (reqwest::Response, String) {
    let mut res = client()
        .post(format!("{base}{path}"))
        .header("x-api-key", TEST_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{path}");
    let mut text = String::new();
    while !text.contains("w1") {
        let chunk = tokio::time::timeout(SOCKET_TIMEOUT, res.chunk())
            .await
            .expect("the first content arrives")
            .unwrap()
            .expect("the stream stays open");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    (res, text)
}

/// Reads the rest of a stream to its end.
async fn rest(mut res: reqwest::Response, mut text: String) -> String {
    loop {
        match tokio::time::timeout(SOCKET_TIMEOUT, res.chunk())
            .await
            .expect("the stream ends after the grace")
            .unwrap()
        {
            Some(c) => text.push_str(std::str::from_utf8(&c).unwrap()),
            None => return text,
        }
    }
}

fn chat_body(stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "test/model", "stream": stream,
        "messages": [{"role": "user", "content": "say something long please"}]})
}

/// The last two events of a chat stream: the §3.2 error chunk, then `[DONE]`.
fn assert_chat_cut(text: &str) {
    let data = common::sse_data(text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let last: serde_json::Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["object"], "chat.completion.chunk", "{text}");
    assert_eq!(last["error"]["code"], "server_shutting_down", "{text}");
    assert_eq!(last["error"]["type"], "api_error", "{text}");
    assert_eq!(last["choices"][0]["finish_reason"], "error", "{text}");
    assert_eq!(last["provider"], "up", "{text}");
    assert_eq!(common::sse_text(text), DELIVERED, "{text}");
}

#[tokio::test]
async fn when_the_grace_runs_out_every_open_stream_gets_its_error_and_is_charged_what_it_delivered()
{
    let up = stalling_upstream().await;
    let dir = temp_dir("drain");
    let mut config = Config::from_toml(&config(&up, "")).unwrap();
    config.store.url = format!("sqlite://{}", dir.join("switchboard.db").display());
    let gateway = Gateway::builder().config(config).build().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let g = gateway.clone();
    let serving = tokio::spawn(async move {
        g.serve(
            listener,
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        )
        .await
    });

    // One stream per dialect, each past its first content, and a request waiting.
    let chat = open_stream(&base, "/v1/chat/completions", chat_body(true)).await;
    let messages = open_stream(
        &base,
        "/v1/messages",
        serde_json::json!({"model": "test/model", "max_tokens": 50, "stream": true,
            "messages": [{"role": "user", "content": "say something long please"}]}),
    )
    .await;
    let responses = open_stream(
        &base,
        "/v1/responses",
        serde_json::json!({"model": "test/model", "stream": true, "input": "say something long please"}),
    )
    .await;
    let waiting = tokio::spawn(
        client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(TEST_KEY)
            .json(&chat_body(false))
            .send(),
    );
    while up.hits() < 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    stop.send(()).unwrap();
    let chat = rest(chat.0, chat.1).await;
    assert_chat_cut(&chat);

    let messages = rest(messages.0, messages.1).await;
    let last = messages.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: error\n"), "{messages}");
    let err: serde_json::Value =
        serde_json::from_str(last.lines().nth(1).unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err["type"], "error", "{messages}");
    assert_eq!(err["error"]["type"], "api_error", "{messages}");
    assert!(!messages.contains("message_stop"), "{messages}");

    let responses = rest(responses.0, responses.1).await;
    let last = responses.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: response.failed\n"), "{responses}");
    assert!(last.contains("server_shutting_down"), "{responses}");

    let waiting = tokio::time::timeout(SOCKET_TIMEOUT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(waiting.status(), 503);
    let e: serde_json::Value = waiting.json().await.unwrap();
    assert_eq!(e["error"]["code"], "server_shutting_down", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutdown_grace_secs"),
        "{e}"
    );

    tokio::time::timeout(SOCKET_TIMEOUT, serving)
        .await
        .expect("serve returns once the cut requests have ended")
        .unwrap()
        .unwrap();
    // Three streams charged for what each delivered; the waiting request nothing.
    let key = gateway.keys().list().unwrap();
    let key = key.iter().find(|k| k.record.name == "drainer").unwrap();
    let balance = gateway.ledger().balance(&key.record.id).unwrap();
    assert_eq!(balance.spent.pico(), 3 * cut_stream_cost().pico());
    assert_eq!(balance.reserved, Money::ZERO, "every reservation settled");
}

/// `switchboard serve --config FILE --listen 127.0.0.1:0` with `env`; returns the
/// child, its address and the stderr lines up to the listening line, and a
/// receiver of the lines after it. Callers wait for the child with `wait_exit`.
#[allow(clippy::zombie_processes)]
fn serve(
    config: &std::path::Path,
    env: &[(&str, &str)],
) -> (
    Child,
    String,
    Vec<String>,
    std::sync::mpsc::Receiver<String>,
) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("SWITCHBOARD_LOG_FORMAT")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, seen, rx) = until_listening(&mut child);
    (child, format!("http://{addr}"), seen, rx)
}

/// Every line the receiver still gets until the process has closed stderr.
fn remaining(rx: std::sync::mpsc::Receiver<String>) -> Vec<String> {
    rx.iter().collect()
}

#[tokio::test]
async fn sigterm_ends_a_stalled_stream_with_the_error_chunk_exits_0_and_charges_what_was_delivered()
{
    let up = stalling_upstream().await;
    let dir = temp_dir("drain-bin");
    let path = dir.join("switchboard.toml");
    let store = dir.join("switchboard.db");
    let toml = config(&up, "log_format = \"json\"").replace(
        "[logging]",
        &format!(
            "[store]\nurl = \"sqlite://{}\"\n\n[logging]",
            store.display()
        ),
    );
    std::fs::write(&path, toml).unwrap();
    let (mut child, base, before, rx) = serve(&path, &[]);
    let (res, text) = open_stream(&base, "/v1/chat/completions", chat_body(true)).await;
    sigterm(&child);
    let text = rest(res, text).await;
    assert_chat_cut(&text);
    assert_eq!(wait_exit(&mut child), 0);

    // log_format = "json": every line of stderr is one JSON object.
    let lines: Vec<String> = before.into_iter().chain(remaining(rx)).collect();
    let objects: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let said = |what: &str| {
        objects
            .iter()
            .any(|o| o["message"].as_str().is_some_and(|m| m.contains(what)))
    };
    assert!(said("listening on http://"), "{lines:#?}");
    assert!(said("shutdown_grace_secs"), "{lines:#?}");
    assert!(said("switchboard stopped"), "{lines:#?}");

    // The store, read after the exit: the key paid the prompt and what was delivered.
    let out = Command::new(BIN)
        .args(["keys", "list", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let list = String::from_utf8_lossy(&out.stdout);
    let usage = list
        .split('\t')
        .find_map(|f| f.strip_prefix("usage="))
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(usage.parse::<Money>().unwrap(), cut_stream_cost(), "{list}");
}

#[test]
fn text_logs_through_a_pipe_have_no_colours_and_a_bad_log_format_is_refused() {
    let dir = temp_dir("logs");
    let path = dir.join("switchboard.toml");
    let store = dir.join("switchboard.db");
    std::fs::write(
        &path,
        format!(
            "[store]\nurl = \"sqlite://{}\"\n\n[logging]\nsink = \"none\"\n\n{}",
            store.display(),
            common::EXACT_LOREM
        ),
    )
    .unwrap();
    // Text (the default), stderr a pipe: plain lines.
    let (mut child, _, before, rx) = serve(&path, &[]);
    sigterm(&child);
    assert_eq!(wait_exit(&mut child), 0);
    let lines: Vec<String> = before.into_iter().chain(remaining(rx)).collect();
    assert!(
        lines.iter().any(|l| l.contains("listening on")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains('\x1b')),
        "ANSI escapes on a pipe: {lines:#?}"
    );
    assert!(serde_json::from_str::<serde_json::Value>(&lines[0]).is_err());

    // SWITCHBOARD_LOG_FORMAT wins over the config's text.
    let (mut child, _, before, _rx) = serve(&path, &[("SWITCHBOARD_LOG_FORMAT", "json")]);
    sigterm(&child);
    assert_eq!(wait_exit(&mut child), 0);
    let listening: serde_json::Value = serde_json::from_str(before.last().unwrap()).unwrap();
    assert_eq!(listening["level"], "INFO", "{listening}");

    // A bad value: exit 1, naming the variable and the values it takes.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .env("SWITCHBOARD_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SWITCHBOARD_LOG_FORMAT")
            && err.contains("`yaml`")
            && err.contains("\"json\""),
        "{err}"
    );
}
