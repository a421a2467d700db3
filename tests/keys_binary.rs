//! The real `switchboard` binary: durability under SIGKILL, the `keys` CLI, and
//! secrets that never reach the database, a log line or a listing (SPEC §1, §4).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::money::Money;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

fn config_text(store: &Path, keys: &str) -> String {
    format!(
        r#"
[store]
url = "sqlite://{}"

[[providers]]
name = "mock"
kind = "mock"

[[models]]
id = "mock/echo"
max_output_tokens = 64
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 0.7
  completion_usd_per_mtok = 1.3

[[models]]
id = "mock/lorem"
max_output_tokens = 64
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "lorem"
  prompt_usd_per_mtok = 0
  completion_usd_per_mtok = 1

{keys}
"#,
        store.display()
    )
}

fn write_config(dir: &Path, keys: &str) -> PathBuf {
    let path = dir.join("switchboard.toml");
    std::fs::write(&path, config_text(&dir.join("ledger.db"), keys)).unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `switchboard serve` and waits until it answers `/healthz`.
async fn serve(config: &Path, log: &Path) -> Server {
    for _ in 0..5 {
        let port = free_port();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = server.child.try_wait() {
                break; // port taken by someone else: try another
            }
            if let Ok(r) = client().get(server.url("/healthz")).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = server.child.kill();
    }
    panic!("switchboard did not start; see {}", log.display());
}

fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("keys")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The decimal text of the last `"field":` number in `text`, parsed exactly.
fn money_field(text: &str, field: &str) -> Option<Money> {
    let pat = format!("\"{field}\":");
    let at = text.rfind(&pat)? + pat.len();
    let num: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-')
        .collect();
    num.parse().ok()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn sigkill_mid_load_loses_no_completed_charge_and_doubles_none() {
    let dir = temp_dir("durable");
    let config = write_config(
        &dir,
        "[[keys]]\nsecret = \"sk-durable-1-0123456789\"\nname = \"durable\"\ncredits_usd = 1000\n",
    );
    let log = dir.join("serve.log");
    let first = serve(&config, &log).await;

    let completed: Arc<Mutex<Vec<(String, Money)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = first.url("/v1/chat/completions");
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (completed, stop, url) = (completed.clone(), stop.clone(), url.clone());
            tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    i += 1;
                    let stream = (w + i).is_multiple_of(2);
                    let words = vec!["ok"; 1 + (w * 7 + i) % 23].join(" ");
                    let sent = client()
                        .post(&url)
                        .bearer_auth("sk-durable-1-0123456789")
                        .json(&json!({"model": "mock/echo", "stream": stream,
                                      "stream_options": {"include_usage": true},
                                      "messages": [{"role": "user", "content": words}]}))
                        .send()
                        .await;
                    let Ok(res) = sent else { break };
                    if res.status() != 200 {
                        break;
                    }
                    let Ok(text) = res.text().await else { break };
                    // Completed means the whole response arrived.
                    if stream && !text.ends_with("data: [DONE]\n\n") {
                        break;
                    }
                    let id_at = text.find("\"id\":\"").unwrap() + 6;
                    let id = text[id_at..].split('"').next().unwrap().to_string();
                    let cost = money_field(&text, "cost").expect("usage.cost");
                    completed.lock().unwrap().push((id, cost));
                }
            })
        })
        .collect();
    // Kill it in the middle of the load.
    let deadline = Instant::now() + Duration::from_secs(120);
    while completed.lock().unwrap().len() < 200 {
        assert!(Instant::now() < deadline, "the load did not progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(first); // Child::kill is SIGKILL on unix
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let completed = completed.lock().unwrap().clone();
    assert!(completed.len() >= 200);

    let second = serve(&config, &log).await;
    let mut sum = Money::ZERO;
    for (id, cost) in &completed {
        let res = client()
            .get(second.url(&format!("/v1/generation?id={id}")))
            .bearer_auth("sk-durable-1-0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            200,
            "completed request {id} is not in the ledger"
        );
        let text = res.text().await.unwrap();
        assert_eq!(money_field(&text, "total_cost"), Some(*cost), "{text}");
        sum = sum + *cost;
    }
    let credits = client()
        .get(second.url("/v1/credits"))
        .bearer_auth("sk-durable-1-0123456789")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let spent = money_field(&credits, "total_usage").unwrap();
    // Requests in flight at the kill may have been committed without their response
    // arriving: at most one per worker, each under the reserve bound.
    assert!(spent >= sum, "spent {spent} < completed {sum}");
    assert!(
        spent - sum <= "0.001".parse().unwrap(),
        "spent {spent} vs completed {sum}"
    );
    drop(second);

    // In the file: one row per request id (a primary key), and the key's spent is
    // exactly the sum of its rows — nothing charged twice.
    let db = rusqlite::Connection::open(dir.join("ledger.db")).unwrap();
    let (rows, total): (i64, i64) = db
        .query_row(
            "SELECT count(*), coalesce(sum(amount_pico), 0) FROM settlements",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let spent_col: i64 = db
        .query_row(
            "SELECT spent_pico FROM keys WHERE name = 'durable'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(spent_col, total);
    assert_eq!(Money::from_pico(total), spent);
    assert!(rows as usize >= completed.len() && rows as usize <= completed.len() + 8);
    let _ = std::fs::remove_dir_all(dir);
}

/// Reproduced: `switchboard keys top-up ID 9223372` answered an error after
/// committing, leaving a key that could not be read. Now: exit 1, nothing written.
#[test]
fn keys_commands_into_a_closed_pipe_end_quietly_and_never_report_success() {
    let dir = temp_dir("cli-closed-pipe");
    let config = write_config(&dir, "");
    assert_eq!(
        cli(&config, &["create", "--credits", "1"]).status.code(),
        Some(0)
    );
    // The reader is gone before the command prints (it opens the store first), as
    // with `keys list | head -0`: every write to stdout fails with EPIPE. A `create`
    // whose secret was never shown must not say it succeeded.
    for args in [&["list"][..], &["create", "--credits", "1"][..]] {
        let mut child = Command::new(BIN)
            .arg("keys")
            .args(args)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
    }
}

#[test]
fn keys_cli_refuses_a_top_up_past_the_bound_with_nothing_written() {
    let dir = temp_dir("cli-bounds");
    let config = write_config(&dir, "");
    let out = cli(&config, &["create", "--credits", "1", "--name", "b"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let id = stdout(&out).split('\t').next().unwrap().to_string();
    for usd in ["9223372", "1000000"] {
        let out = cli(&config, &["top-up", &id, usd]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("1000000 USD"), "{err}");
    }
    let out = cli(&config, &["create", "--credits", "1000001"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = cli(
        &config,
        &["create", "--credits", "1", "--limit-usd", "9223372"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // Nothing written: the key reads as it was, and so does every key.
    let show = cli(&config, &["show", &id]);
    assert_eq!(show.status.code(), Some(0), "{show:?}");
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["credits"].as_f64(), Some(1.0));
    let list = cli(&config, &["list"]);
    assert_eq!(list.status.code(), Some(0), "{list:?}");
    assert_eq!(stdout(&list).lines().count(), 1);
    assert_eq!(
        cli(&config, &["top-up", &id, "999999"]).status.code(),
        Some(0)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn keys_cli_administers_and_never_shows_a_secret() {
    let dir = temp_dir("cli");
    let config = write_config(
        &dir,
        "[[keys]]\nsecret = \"sk-bootstrap-secret-abc\"\nname = \"boot\"\ncredits_usd = 1\n",
    );
    let out = cli(
        &config,
        &[
            "create",
            "--credits",
            "0.00001",
            "--name",
            "cli-made",
            "--rpm",
            "100",
            "--models",
            "mock/*,other/x",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    let secret = text
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .expect("the secret is printed once")
        .to_string();
    let id = text.split('\t').next().unwrap().to_string();
    assert!(id.starts_with("key_"), "{text}");
    assert!(text.contains("models=mock/*,other/x"), "{text}");

    let list = cli(&config, &["list"]);
    assert_eq!(list.status.code(), Some(0));
    let list_text = stdout(&list);
    assert!(
        list_text.contains(&id) && list_text.contains("boot"),
        "{list_text}"
    );
    let show = cli(&config, &["show", &id]);
    assert_eq!(show.status.code(), Some(0));
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["rpm"], 100);
    for o in [&list, &show] {
        for s in [secret.as_str(), "sk-bootstrap-secret-abc"] {
            assert!(!contains(&o.stdout, s) && !contains(&o.stderr, s));
        }
    }

    // Usage errors exit 1; a store that cannot be opened (its directory would be under
    // a file: a missing directory is created) exits 2.
    assert_eq!(
        cli(&config, &["top-up", "key_nope", "1"]).status.code(),
        Some(1)
    );
    assert_eq!(cli(&config, &["top-up", &id, "0"]).status.code(), Some(1));
    assert_eq!(cli(&config, &["create"]).status.code(), Some(1));
    let broken = dir.join("broken.toml");
    let a_file = dir.join("a-file");
    std::fs::write(&a_file, "not a directory").unwrap();
    std::fs::write(&broken, config_text(&a_file.join("x.db"), "")).unwrap();
    assert_eq!(cli(&broken, &["list"]).status.code(), Some(2));

    // The running gateway sees CLI changes: a top-up at once, a disable within seconds.
    let log = dir.join("serve.log");
    let server = serve(&config, &log).await;
    let ask = json!({"model": "mock/lorem", "max_tokens": 20, "messages": [{"role": "user", "content": "go"}]});
    let post = |key: &str| {
        client()
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&ask)
            .send()
    };
    assert_eq!(post(&secret).await.unwrap().status(), 402);
    assert_eq!(post("sk-unknown-secret-zzz").await.unwrap().status(), 401);
    assert_eq!(post("sk-bootstrap-secret-abc").await.unwrap().status(), 200);
    assert_eq!(cli(&config, &["top-up", &id, "2.5"]).status.code(), Some(0));
    assert_eq!(post(&secret).await.unwrap().status(), 200);
    // The CLI reads SQLite, which trails the gateway's journal by one applier pass.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let shown: Value = serde_json::from_slice(&cli(&config, &["show", &id]).stdout).unwrap();
        assert_eq!(shown["credits"].as_f64(), Some(2.50001));
        if shown["usage"].as_f64() == Some(0.00002) {
            break;
        }
        assert_eq!(shown["usage"].as_f64(), Some(0.0), "{shown}");
        assert!(Instant::now() < deadline, "usage not in SQLite: {shown}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert_eq!(cli(&config, &["disable", &id]).status.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = post(&secret).await.unwrap().status();
        if s == 403 {
            break;
        }
        assert!(Instant::now() < deadline, "disable not seen: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(server);

    // Nothing on disk or in the log holds a secret.
    let secrets = [
        secret.as_str(),
        "sk-bootstrap-secret-abc",
        "sk-unknown-secret-zzz",
    ];
    let log_bytes = std::fs::read(&log).unwrap();
    assert!(!log_bytes.is_empty());
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") || path.is_dir() {
            continue; // the config holds the bootstrap secret by design
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue; // a WAL removed as its last connection closed
        };
        for s in secrets {
            assert!(!contains(&bytes, s), "{s} found in {}", path.display());
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Charges capped at their reservation (SPEC §4 invariant 2: an upstream reported
/// absurd usage) are committed as capped: after a SIGKILL the ledger holds each once,
/// at the cost the client was shown, and the key is never overdrawn in money or in
/// tokens.
#[tokio::test]
async fn sigkill_keeps_capped_charges_once_and_never_overdraws_the_key() {
    const SECRET: &str = "sk-capped-0123456789abcdef";
    let up = upstream(|seen: Seen, _| async move { absurd_usage_answer(&seen) }).await;
    let dir = temp_dir("capped");
    let config = dir.join("switchboard.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[store]
url = "sqlite://{store}"

[[providers]]
name = "broken"
kind = "openai"
base_url = "{base}/v1"
api_key = "sk-upstream-broken"

[[models]]
id = "test/model"
max_output_tokens = 50
  [[models.endpoints]]
  provider = "broken"
  upstream_model = "up"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[keys]]
secret = "{SECRET}"
name = "capped"
credits_usd = 0.01
tokens_per_day = 100000
"#,
            store = dir.join("ledger.db").display(),
            base = up.url(),
        ),
    )
    .unwrap();
    let log = dir.join("serve.log");
    let first = serve(&config, &log).await;

    // Until the key cannot cover another reservation: every answer is charged its
    // reservation, never the $9.2M its usage prices at.
    let mut shown: Vec<(String, Money)> = Vec::new();
    let mut refused = false;
    for i in 0..200 {
        let stream = i % 2 == 1;
        let res = client()
            .post(first.url("/v1/chat/completions"))
            .bearer_auth(SECRET)
            .json(&json!({"model": "test/model", "stream": stream,
                          "stream_options": {"include_usage": true},
                          "messages": [{"role": "user", "content": "Say hello."}]}))
            .send()
            .await
            .unwrap();
        if res.status() == 402 {
            refused = true;
            break;
        }
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        let id_at = text.find("\"id\":\"").unwrap() + 6;
        let id = text[id_at..].split('"').next().unwrap().to_string();
        let cost = money_field(&text, "cost").expect("usage.cost");
        assert!(cost < "0.001".parse().unwrap(), "charged {cost}: {text}");
        shown.push((id, cost));
    }
    assert!(refused, "a $0.01 key was never refused");
    assert!(shown.len() >= 10, "only {} requests served", shown.len());
    drop(first); // SIGKILL, straight after the last answer: no graceful flush

    let second = serve(&config, &log).await;
    let mut sum = Money::ZERO;
    for (id, cost) in &shown {
        let text = client()
            .get(second.url(&format!("/v1/generation?id={id}")))
            .bearer_auth(SECRET)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(money_field(&text, "total_cost"), Some(*cost), "{text}");
        sum = sum + *cost;
    }
    let key = client()
        .get(second.url("/v1/key"))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let remaining = money_field(&key, "credits_remaining").unwrap();
    assert!(!remaining.is_negative(), "overdrawn: {key}");
    assert_eq!(money_field(&key, "usage"), Some(sum), "{key}");
    drop(second);

    // In the file: one row per answer, the key's spent their exact sum, and the day's
    // tokens within the key's limit.
    let db = rusqlite::Connection::open(dir.join("ledger.db")).unwrap();
    let (rows, total): (i64, i64) = db
        .query_row(
            "SELECT count(*), coalesce(sum(amount_pico), 0) FROM settlements",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rows as usize, shown.len());
    assert_eq!(Money::from_pico(total), sum);
    let tokens: i64 = db
        .query_row(
            "SELECT coalesce(sum(tokens), 0) FROM daily_tokens",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(tokens > 0 && tokens <= 100_000, "day tokens {tokens}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn keys_cli_creates_a_key_with_a_period_limit_and_an_expiry() {
    let dir = temp_dir("cli-periods");
    let config = write_config(&dir, "");
    let out = cli(
        &config,
        &[
            "create",
            "--credits",
            "1",
            "--name",
            "periodic",
            "--limit-usd",
            "0.5",
            "--limit-reset",
            "daily",
            "--expires-at",
            "2031-01-01T01:00:00+01:00",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    let id = text.split('\t').next().unwrap().to_string();
    assert!(text.contains("\tlimit_reset=daily\t"), "{text}");
    assert!(
        text.contains("\texpires_at=2031-01-01T00:00:00Z\t"),
        "{text}"
    );

    let show = cli(&config, &["show", &id]);
    assert_eq!(show.status.code(), Some(0), "{show:?}");
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["limit_reset"], "daily");
    assert_eq!(shown["expires_at"], "2031-01-01T00:00:00Z");
    assert_eq!(shown["limit"].as_f64(), Some(0.5));
    for period in ["usage_daily", "usage_weekly", "usage_monthly"] {
        assert_eq!(shown[period].as_f64(), Some(0.0), "{period}");
    }
    let list = stdout(&cli(&config, &["list"]));
    assert!(
        list.contains("limit_reset=daily") && list.contains("usage_daily=0"),
        "{list}"
    );

    // Bad values: exit 1, the flag named, nothing created.
    for (flag, value) in [("--limit-reset", "hourly"), ("--expires-at", "tomorrow")] {
        let out = cli(&config, &["create", "--credits", "1", flag, value]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{err}");
    }
    assert!(String::from_utf8_lossy(
        &cli(
            &config,
            &["create", "--credits", "1", "--limit-reset", "hourly"]
        )
        .stderr
    )
    .contains("daily, weekly or monthly"));
    assert_eq!(stdout(&cli(&config, &["list"])).lines().count(), 1);
    let _ = std::fs::remove_dir_all(dir);
}

/// `keys create --label`, `update`, `rotate` (at once and with a grace), `disable`
/// and `enable`, `delete` (kept for the books), `list [--all]`, against a running
/// gateway; each request's log row names the key, its labels and the client.
#[tokio::test]
async fn keys_cli_labels_rotates_enables_and_deletes() {
    let dir = temp_dir("cli-lifecycle");
    let config = write_config(&dir, "");
    let out = cli(
        &config,
        &[
            "create",
            "--credits",
            "1",
            "--name",
            "search-bot",
            "--label",
            "team=search",
            "--label",
            "env=prod",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    let first = text
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .unwrap()
        .to_string();
    let id = text.split('\t').next().unwrap().to_string();
    assert!(
        text.contains(r#"labels={"env":"prod","team":"search"}"#),
        "{text}"
    );
    // Bad labels are refused, naming the label.
    let bad = cli(&config, &["update", &id, "--label", "bad key=x"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("`bad key`"),
        "{bad:?}"
    );
    assert_eq!(cli(&config, &["update", &id]).status.code(), Some(1));
    let up = cli(
        &config,
        &[
            "update",
            &id,
            "--name",
            "search",
            "--label",
            "tier=gold",
            "--unlabel",
            "env",
        ],
    );
    assert_eq!(up.status.code(), Some(0), "{up:?}");
    let list = stdout(&cli(&config, &["list"]));
    assert!(
        list.contains(&format!("{id}\tsearch\t"))
            && list.contains(r#"labels={"team":"search","tier":"gold"}"#),
        "{list}"
    );

    let log = dir.join("serve.log");
    let server = serve(&config, &log).await;
    let ask = json!({"model": "mock/lorem", "max_tokens": 5, "messages": [{"role": "user", "content": "go"}]});
    let status = |key: String| {
        let req = client()
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&ask)
            .send();
        async move { req.await.unwrap().status().as_u16() }
    };
    // The CLI is another process: the gateway sees its changes within its cache's TTL.
    let until = |want: u16, key: String| {
        let status = &status;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let s = status(key.clone()).await;
                if s == want {
                    return;
                }
                assert!(Instant::now() < deadline, "still {s}, not {want}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(status(first.clone()).await, 200);

    // Rotate with a grace of an hour: both secrets work.
    let rot = cli(&config, &["rotate", &id, "--grace-secs", "3600"]);
    assert_eq!(rot.status.code(), Some(0), "{rot:?}");
    let second = stdout(&rot)
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .unwrap()
        .to_string();
    assert_ne!(first, second);
    until(200, second.clone()).await;
    assert_eq!(status(first.clone()).await, 200);
    // Rotate at once: the first and second secrets stop, the third works.
    let rot = cli(&config, &["rotate", &id]);
    assert_eq!(rot.status.code(), Some(0), "{rot:?}");
    let third = stdout(&rot)
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .unwrap()
        .to_string();
    until(401, first.clone()).await;
    until(401, second.clone()).await;
    until(200, third.clone()).await;
    let shown: Value = serde_json::from_slice(&cli(&config, &["show", &id]).stdout).unwrap();
    assert_eq!(
        shown["credits"].as_f64(),
        Some(1.0),
        "same balance: {shown}"
    );

    assert_eq!(cli(&config, &["disable", &id]).status.code(), Some(0));
    until(403, third.clone()).await;
    assert_eq!(cli(&config, &["enable", &id]).status.code(), Some(0));
    until(200, third.clone()).await;

    let del = cli(&config, &["delete", &id]);
    assert_eq!(del.status.code(), Some(0), "{del:?}");
    until(401, third.clone()).await;
    assert!(!stdout(&cli(&config, &["list"])).contains(&id));
    assert!(stdout(&cli(&config, &["list", "--all"])).contains("DELETED"));
    let shown: Value = serde_json::from_slice(&cli(&config, &["show", &id]).stdout).unwrap();
    assert_eq!(
        (shown["deleted"].as_bool(), shown["credits"].as_f64()),
        (Some(true), Some(1.0))
    );
    assert!(shown["deleted_at"].is_string(), "{shown}");
    let refused = cli(&config, &["rotate", &id]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("deleted"));
    drop(server);

    // The request log names the key, its labels and the client.
    let db = rusqlite::Connection::open(dir.join("switchboard-logs.db")).unwrap();
    let (name, labels, ip): (String, String, String) = db
        .query_row(
            "SELECT key_name, key_labels, client_ip FROM requests WHERE key_id = ?1 AND status = 200 ORDER BY time_ms LIMIT 1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (name.as_str(), labels.as_str(), ip.as_str()),
        ("search", r#"{"team":"search","tier":"gold"}"#, "127.0.0.1")
    );
    let _ = std::fs::remove_dir_all(dir);
}
