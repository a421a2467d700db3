//! The `switchboard` binary itself: the demo with no config, `check`, graceful shutdown.

mod common;

use common::{sigterm, until_listening, wait_exit};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// A fresh empty directory (the binary's working directory: no switchboard.toml).
fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "switchboard-cli-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts `switchboard serve` and returns it with the address it printed.
/// Also returns the stderr lines printed up to the listening line. Callers wait for the
/// child with `wait_exit` (which kills it if it does not exit).
fn serve(dir: &PathBuf, args: &[&str]) -> (Child, String, Vec<String>) {
    serve_on(dir, "127.0.0.1:0", args)
}

/// [`serve`] with `--listen listen`.
#[allow(clippy::zombie_processes)]
fn serve_on(dir: &PathBuf, listen: &str, args: &[&str]) -> (Child, String, Vec<String>) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(["--listen", listen])
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, seen, rx) = until_listening(&mut child);
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in rx {});
    (child, addr, seen)
}

#[tokio::test]
async fn demo_starts_without_config_or_network_and_stops_on_sigterm() {
    let dir = temp_dir();
    let (mut child, addr, said) = serve(&dir, &[]);
    assert!(
        said.iter().any(|l| l.contains("built-in demo")),
        "{said:#?}"
    );
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth("sk-demo")
        .json(&serde_json::json!({"model": "mock/echo", "messages": [{"role": "user", "content": "hello demo"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "hello demo");
    sigterm(&child);
    assert_eq!(wait_exit(&mut child), 0);
}

#[tokio::test]
async fn sigterm_lets_an_open_stream_finish() {
    // A fake upstream that streams slowly: 5 chunks, 300 ms apart.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async {
        let chunks = (0..5).map(|i| {
            serde_json::json!({"choices": [{"index": 0, "delta": {"content": format!("w{i} ")}, "finish_reason": if i == 4 { Some("stop") } else { None }}]}).to_string()
        });
        let events = futures_util::stream::iter(chunks.chain(["[DONE]".to_string()])).then(|d| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, std::convert::Infallible>(format!("data: {d}\n\n"))
        });
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from_stream(events))
            .unwrap()
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    use futures_util::StreamExt;

    let dir = temp_dir();
    let config = format!(
        r#"
[[providers]]
name = "slow"
kind = "openai"
base_url = "http://{up}/v1"
api_key = "sk-up"
[[models]]
id = "slow/model"
  [[models.endpoints]]
  provider = "slow"
  upstream_model = "m"
  prompt_usd_per_mtok = 0
  completion_usd_per_mtok = 0
[[keys]]
secret = "sk-test-client-0123456789"
credits_usd = 10
"#
    );
    std::fs::write(dir.join("switchboard.toml"), config).unwrap();
    let (mut child, addr, _) = serve(&dir, &[]);
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth("sk-test-client-0123456789")
        .json(&serde_json::json!({"model": "slow/model", "stream": true, "messages": [{"role": "user", "content": "go"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("w0"));
    sigterm(&child); // while four chunks are still to come
    let mut rest = String::new();
    while let Some(b) = body.next().await {
        rest.push_str(&String::from_utf8_lossy(&b.unwrap()));
    }
    assert!(rest.contains("w4"), "the stream was cut: {rest}");
    assert!(rest.ends_with("data: [DONE]\n\n"));
    assert_eq!(wait_exit(&mut child), 0);
    // New connections are refused once shutting down.
    assert!(std::net::TcpStream::connect(&addr).is_err());
}

#[test]
fn check_reports_every_problem_with_its_path_and_exits_1() {
    let dir = temp_dir();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        // A missing key is no problem (a keyless local server); an empty variable name is.
        "[server]\nlisten = \"nope\"\n[[providers]]\nname = \"x\"\nkind = \"openai\"\napi_key_env = \"\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "server.listen",
        "providers[0].base_url",
        "providers[0].api_key_env",
    ] {
        assert!(err.contains(path), "{path} not named in: {err}");
    }

    // The demo's text as a config file: its short `sk-demo` is refused there (only
    // the built-in demo is exempt), by `check` and by `serve`.
    let short = dir.join("short.toml");
    std::fs::write(
        &short,
        switchboard::config::DEMO_TOML.replace("127.0.0.1:8080", "127.0.0.1:0"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&short)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keys[0].secret") && err.contains("at least 20 characters"),
        "{err}"
    );
    let mut serving = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&short)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = serving.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = serving.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.and_then(|s| s.code()), Some(1), "serve refuses it");

    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        switchboard::config::DEMO_TOML.replace("sk-demo", "sk-demo-0123456789abcdef"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_taken_port_is_exit_2_with_a_hint() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = temp_dir();
    let out = Command::new(BIN)
        .args(["serve", "--listen", &addr])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}

#[test]
fn usage_errors_exit_1() {
    let out = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn serve_listens_on_a_host_name() {
    let dir = temp_dir();
    let (mut child, addr, said) = serve_on(&dir, "localhost:0", &[]);
    assert!(
        said.iter().any(|l| l.contains("`localhost:0` resolved to")),
        "it says what the name resolved to: {said:#?}"
    );
    let res = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "ok");
    sigterm(&child);
    assert_eq!(wait_exit(&mut child), 0);
}

#[test]
fn a_listen_host_that_does_not_resolve_is_exit_2_naming_the_setting() {
    let dir = temp_dir();
    // `.invalid` never resolves (RFC 6761).
    let out = Command::new(BIN)
        .args(["serve", "--listen", "no-such-host.invalid:8080"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--listen `no-such-host.invalid:8080`: cannot resolve"),
        "{err}"
    );
    let file = dir.join("unresolvable.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"no-such-host.invalid:0\"\n[store]\nurl = \"sqlite::memory:\"\n[logging]\nsink = \"none\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&file)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.listen `no-such-host.invalid:0`"),
        "{err}"
    );
    // A malformed --listen is a usage error, before anything starts.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "localhost"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--listen: `localhost` is not an address")
    );
}

#[test]
fn check_accepts_host_names_and_bracketed_ipv6_without_resolving() {
    let dir = temp_dir();
    for listen in ["localhost:8080", "[::1]:8080", "no-such-host.invalid:80"] {
        let file = dir.join("listen.toml");
        std::fs::write(&file, format!("[server]\nlisten = \"{listen}\"\n")).unwrap();
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{listen}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn check_prints_every_type_error_and_every_semantic_problem_in_one_run() {
    let dir = temp_dir();
    let file = dir.join("many.toml");
    std::fs::write(
        &file,
        r#"[server]
max_body_bytes = "big"
lisen = "127.0.0.1:1"

[[providers]]
name = "broken"
kind = "telepathy"

[[providers]]
name = "m"
kind = "mock"
timeout_secs = 0

[[models]]
id = "a/b"
context_length = "long"
  [[models.endpoints]]
  provider = "broken"
  upstream_model = "x"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 1

[[keys]]
secret = "sk-a-long-enough-secret-1"
credits_usd = 1
rpm = 0
"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = err.lines().skip(1).map(str::trim).collect();
    assert!(
        err.lines().next().unwrap().ends_with("has 6 problem(s):"),
        "{err}"
    );
    for (line, want) in problems.iter().zip([
        "server.max_body_bytes: invalid type: string \"big\", expected a whole number, 0 or more (line 2)",
        "server.lisen: unknown field `lisen`, expected one of `listen`",
        "providers[0].kind: unknown variant `telepathy`, expected one of `openai`, `anthropic`, `gemini`, `mock` (line 7)",
        "models[0].context_length: invalid type: string \"long\", expected a whole number, 0 or more (line 16)",
        "providers[1].timeout_secs: must be at least 1",
        "keys[0].rpm: must be from 1 to",
    ]) {
        assert!(line.starts_with(want), "{want:?} is not {line:?} in:\n{err}");
    }
}

/// A config on the mock provider with `store` and `sink`, no keys.
fn mock_config(store: &str, sink: &str) -> String {
    format!(
        "[store]\nurl = \"{store}\"\n[logging]\nsink = \"{sink}\"\n[[providers]]\nname = \"mock\"\nkind = \"mock\"\n"
    )
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn missing_store_and_log_directories_are_created() {
    let dir = temp_dir();
    // The store's directory, with the default request log beside the store.
    let store = dir.join("state/a/b/switchboard.db");
    let file = dir.join("beside.toml");
    std::fs::write(
        &file,
        mock_config(&format!("sqlite://{}", store.display()), "sqlite"),
    )
    .unwrap();
    let (mut child, _, _) = serve(&dir, &["--config", file.to_str().unwrap()]);
    sigterm(&child);
    assert_eq!(wait_exit(&mut child), 0);
    assert!(store.is_file(), "{}", store.display());
    assert!(store.with_file_name("switchboard-logs.db").is_file());
    #[cfg(unix)]
    for d in ["state", "state/a", "state/a/b"] {
        assert_eq!(mode(&dir.join(d)), 0o700, "{d}");
    }

    // `jsonl:PATH` and `sqlite:PATH` logs in directories of their own.
    for (sink, log) in [
        ("jsonl", "logs/j/requests.jsonl"),
        ("sqlite", "logs/s/requests.db"),
    ] {
        let file = dir.join(format!("{sink}.toml"));
        let log = dir.join(log);
        std::fs::write(
            &file,
            mock_config(
                &format!(
                    "sqlite://{}",
                    dir.join(format!("{sink}/store.db")).display()
                ),
                &format!("{sink}:{}", log.display()),
            ),
        )
        .unwrap();
        let (mut child, _, _) = serve(&dir, &["--config", file.to_str().unwrap()]);
        sigterm(&child);
        assert_eq!(wait_exit(&mut child), 0);
        assert!(log.is_file(), "{}", log.display());
        #[cfg(unix)]
        assert_eq!(mode(log.parent().unwrap()), 0o700);
    }

    // `keys create` makes the store's directory too.
    let file = dir.join("keys.toml");
    let store = dir.join("for-keys/x/keys.db");
    std::fs::write(
        &file,
        mock_config(&format!("sqlite://{}", store.display()), "none"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["keys", "create", "--credits", "1", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(store.is_file());
}

#[test]
fn a_directory_that_cannot_be_made_names_the_setting_and_is_exit_2() {
    let dir = temp_dir();
    let a_file = dir.join("a-file");
    std::fs::write(&a_file, "not a directory").unwrap();
    let under = a_file.join("sub");

    // The store (with the default log beside it): the store is named, not the log.
    let file = dir.join("store.toml");
    let url = format!("sqlite://{}/switchboard.db", under.display());
    std::fs::write(&file, mock_config(&url, "sqlite")).unwrap();
    for command in [
        &["serve", "--listen", "127.0.0.1:0"][..],
        &["keys", "list"][..],
    ] {
        let out = Command::new(BIN)
            .args(command)
            .arg("--config")
            .arg(&file)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{command:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "cannot create the directory `{}` of store.url `{url}`",
                under.display()
            )) && err.contains("create it yourself"),
            "{command:?}: {err}"
        );
        assert!(!err.contains("request log"), "{command:?}: {err}");
    }

    // A log path.
    for sink in ["jsonl", "sqlite"] {
        let file = dir.join(format!("{sink}.toml"));
        let log = under.join("requests.log");
        std::fs::write(
            &file,
            mock_config("sqlite::memory:", &format!("{sink}:{}", log.display())),
        )
        .unwrap();
        let out = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&file)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{sink}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "[logging].sink: cannot create the directory `{}` of the request log {}",
                under.display(),
                log.display()
            )),
            "{sink}: {err}"
        );
    }
}
