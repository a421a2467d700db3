//! Gateways on one PostgreSQL database (SPEC §6), in this process and through the
//! real binary: one gateway for keys, money and generations, the `keys` CLI against
//! PostgreSQL, and 503 `store_unavailable` when PostgreSQL goes away.
//! Each test has a database of its own (`switchboard::testing::postgres`) and says on
//! the terminal when PostgreSQL is not there to run it.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::money::Money;
use switchboard::store::{hash_secret, KeyPatch, NewKey};
use switchboard::testing::postgres;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
const OWNER: &str = "sk-owner-pg-0123456789abc";

/// Mock models (the prompt free, `mock/lorem` writing exactly `max_tokens` words at
/// $1 per Mtok) on the store `url`, with one bootstrap key.
fn config(url: &str) -> String {
    config_ttl(url, 5)
}

fn config_ttl(url: &str, ttl: u64) -> String {
    format!(
        r#"
[store]
url = "{url}"
reservation_ttl_secs = {ttl}

[logging]
sink = "none"
{EXACT_LOREM}
[[keys]]
secret = "{OWNER}"
name = "owner"
credits_usd = 2
"#
    )
}

/// Polls `status_of` until it answers `want`; how long that took.
async fn within<F, Fut>(limit: Duration, want: u16, mut status_of: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let started = Instant::now();
    loop {
        let got = status_of().await;
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "still {got} after {:?}, not {want}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_database_are_one_gateway() {
    let Some(db) = postgres("two_gateways_on_one_database_are_one_gateway") else {
        return;
    };
    let a = gateway(&config(db.url())).await;
    let b = gateway(&config(db.url())).await;

    // Served on A, charged once, and its generation answered on B.
    let res = post_lorem(&a, OWNER, 7).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_string();
    assert_eq!(body["usage"]["cost"], json!(0.000007));
    let (s, g) = get_json(&b, &format!("/v1/generation?id={id}"), OWNER).await;
    assert_eq!(s, 200, "{g}");
    assert_eq!(g["data"]["total_cost"], json!(0.000007));
    let (_, credits) = get_json(&b, "/v1/credits", OWNER).await;
    assert_eq!(
        credits,
        json!({"data": {"total_credits": 2, "total_usage": 0.000007}})
    );
    for gw in [&a, &b] {
        let ready = client().get(gw.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200);
    }

    // A key unknown to B (and remembered as unknown) works on B within a second of
    // its creation on A; disabled on A, it is refused on B within a second.
    let secret = "sk-made-on-a-0123456789abcdef";
    assert_eq!(post_lorem(&b, secret, 1).await.status(), 401);
    let keys = a.gateway.keys().clone();
    let made = tokio::task::spawn_blocking(move || {
        keys.create(
            hash_secret(secret),
            NewKey::new("made", "1".parse().unwrap()),
        )
        .unwrap()
    })
    .await
    .unwrap();
    let took = within(Duration::from_secs(1), 200, || async {
        post_lorem(&b, secret, 1).await.status().as_u16()
    })
    .await;
    eprintln!("a key made on A served on B after {took:?}");
    let keys = a.gateway.keys().clone();
    let id = made.record.id.clone();
    tokio::task::spawn_blocking(move || {
        keys.update(
            &id,
            &KeyPatch {
                disabled: Some(true),
                ..Default::default()
            },
        )
        .unwrap()
    })
    .await
    .unwrap();
    within(Duration::from_secs(1), 403, || async {
        post_lorem(&b, secret, 1).await.status().as_u16()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_two_gateways_never_spend_more_than_the_key_holds() {
    let Some(db) = postgres("requests_spread_over_two_gateways_never_overspend") else {
        return;
    };
    let a = gateway(&config(db.url())).await;
    let b = gateway(&config(db.url())).await;
    // $0.0005: five requests of 100 tokens at $1/Mtok (a reserve equals the cost).
    let keys = a.gateway.keys().clone();
    let secret = "sk-five-requests-0123456789";
    let key = tokio::task::spawn_blocking(move || {
        keys.create(
            hash_secret(secret),
            NewKey::new("five", "0.0005".parse().unwrap()),
        )
        .unwrap()
    })
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for n in 0..24 {
        let gw = if n % 2 == 0 { &a } else { &b };
        let url = gw.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let res = client()
                .post(url)
                .bearer_auth(secret)
                .json(&json!({"model": "mock/lorem", "max_tokens": 100,
                              "messages": [{"role": "user", "content": "go"}]}))
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap();
            (status, body)
        }));
    }
    let mut costs = Money::ZERO;
    let mut served = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            200 => {
                served += 1;
                costs = costs + body["usage"]["cost"].to_string().parse::<Money>().unwrap();
            }
            402 => assert_eq!(body["error"]["code"], "insufficient_credits"),
            s => panic!("unexpected {s}: {body}"),
        }
    }
    let keys = a.gateway.keys().clone();
    let stored = tokio::task::spawn_blocking(move || keys.get(&key.record.id).unwrap().unwrap())
        .await
        .unwrap();
    assert_eq!(
        stored.spent, costs,
        "the debit is the sum of every usage.cost"
    );
    assert!(stored.spent <= stored.credits);
    assert_eq!(
        served, 5,
        "every request the credit covers is served, no more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgres_is_503_store_unavailable_and_readyz_503() {
    let Some(db) = postgres("an_unreachable_postgres_is_503_store_unavailable") else {
        return;
    };
    // The gateway reaches PostgreSQL through a proxy that the test cuts.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let proxy = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            conns.spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect("127.0.0.1:5432").await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    let url = db.url().replace(":5432/", &format!(":{port}/"));
    assert_ne!(url, db.url());
    let gw = gateway(&config(&url)).await;
    assert_eq!(post_lorem(&gw, OWNER, 3).await.status(), 200);

    proxy.abort();
    let _ = proxy.await;
    let ready = client().get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    // A key cached by auth: refused at admission. An unknown one: at the lookup.
    for key in [OWNER, "sk-never-seen-0123456789abc"] {
        let started = Instant::now();
        let res = post_lorem(&gw, key, 3).await;
        assert_eq!(res.status(), 503);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
        assert_eq!(body["error"]["type"], "api_error");
        assert!(started.elapsed() < Duration::from_secs(7));
    }
    let (s, body) = get_json(&gw, "/v1/credits", OWNER).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (503, Some("store_unavailable"))
    );
}

fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("keys")
        .args(args)
        .arg("--config")
        .arg(config)
        // Its spill dir (`.` by default) is the config's directory, not the crate root.
        .current_dir(config.parent().unwrap())
        .output()
        .unwrap()
}

#[test]
fn the_keys_cli_administers_a_postgres_store() {
    let Some(db) = postgres("the_keys_cli_administers_a_postgres_store") else {
        return;
    };
    let dir = temp_dir("pg-cli");
    let path = dir.join("switchboard.toml");
    std::fs::write(&path, config(db.url())).unwrap();
    let stdout = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();

    let made = cli(
        &path,
        &[
            "create",
            "--credits",
            "0.5",
            "--name",
            "cli-pg",
            "--rpm",
            "60",
        ],
    );
    assert_eq!(made.status.code(), Some(0), "{made:?}");
    let text = stdout(&made);
    let id = text.split('\t').next().unwrap().to_string();
    assert!(id.starts_with("key_"), "{text}");
    assert!(text.contains("secret: sk-sb-"), "{text}");

    let list = stdout(&cli(&path, &["list"]));
    assert!(list.contains(&id) && list.contains("owner"), "{list}");
    assert!(!list.contains("sk-"), "no secret in a listing: {list}");

    let show = cli(&path, &["show", &id]);
    assert_eq!(show.status.code(), Some(0));
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(
        (shown["rpm"].clone(), shown["credits"].clone()),
        (json!(60), json!(0.5))
    );

    let topped = cli(&path, &["top-up", &id, "1.25"]);
    assert_eq!(topped.status.code(), Some(0), "{topped:?}");
    assert!(
        stdout(&topped).contains("credits=1.75"),
        "{}",
        stdout(&topped)
    );
    assert_eq!(
        cli(&path, &["top-up", "key_nope", "1"]).status.code(),
        Some(1)
    );

    let disabled = cli(&path, &["disable", &id]);
    assert_eq!(disabled.status.code(), Some(0));
    assert!(stdout(&disabled).contains("DISABLED"));
    let shown: Value = serde_json::from_slice(&cli(&path, &["show", &id]).stdout).unwrap();
    assert_eq!(shown["disabled"], true);

    // A server that does not answer: a runtime failure (exit 2) within seconds.
    let broken = dir.join("broken.toml");
    std::fs::write(
        &broken,
        config("postgres://postgres@127.0.0.1:1/switchboard"),
    )
    .unwrap();
    let started = Instant::now();
    let out = cli(&broken, &["list"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:1"),
        "{out:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_stops_gives_its_leases_back_at_once() {
    let Some(db) = postgres("a_gateway_that_stops_gives_its_leases_back") else {
        return;
    };
    // Leases that would last 60 s if nobody gave them back.
    let a = gateway(&config_ttl(db.url(), 60)).await;
    let b = gateway(&config_ttl(db.url(), 60)).await;
    assert_eq!(post_lorem(&a, OWNER, 7).await.status(), 200);
    let (_, key) = get_json(&b, "/v1/key", OWNER).await;
    assert_eq!(key["data"]["usage"], json!(0.000007));
    let ledger = b.gateway.ledger().clone();
    let keys = b.gateway.keys().clone();
    let reserved_on_b = move || {
        let id = keys.list().unwrap()[0].record.id.clone();
        ledger.balance(&id).unwrap().reserved
    };
    let held = tokio::task::spawn_blocking(reserved_on_b.clone())
        .await
        .unwrap();
    assert!(held > Money::ZERO, "A holds a lease with headroom");
    drop(a);
    let started = Instant::now();
    loop {
        if tokio::task::spawn_blocking(reserved_on_b.clone())
            .await
            .unwrap()
            == Money::ZERO
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the stopped gateway's lease was not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP relay to PostgreSQL on `port` (0: any), aborted to cut every connection.
async fn relay(port: u16) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            conns.spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect("127.0.0.1:5432").await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (port, task)
}

/// The `pending-*.jsonl` files of a spill dir.
fn spill_files(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("pending-") && name.ends_with(".jsonl")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_served_while_postgres_is_gone_is_charged_once_after_a_sigkill() {
    use futures_util::StreamExt;
    let Some(db) = postgres("a_stream_served_while_postgres_is_gone_is_charged_once") else {
        return;
    };
    // An upstream that streams its first words, then waits for the test to say go.
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let g = go.clone();
    let up = upstream(move |_, _| {
        let go = g.clone();
        async move {
            let chunk = |delta: Value, finish: Option<&str>| {
                json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                .to_string()
            };
            let first = vec![
                chunk(json!({"role": "assistant", "content": ""}), None),
                chunk(json!({"content": "Hello"}), None),
            ];
            let rest = vec![
                chunk(json!({"content": " there"}), None),
                chunk(json!({}), Some("stop")),
                json!({"id": "c", "object": "chat.completion.chunk", "choices": [],
                       "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
                .to_string(),
                "[DONE]".to_string(),
            ];
            let event = |d: String| Ok::<_, std::convert::Infallible>(bytes::Bytes::from(format!("data: {d}\n\n")));
            let head = futures_util::stream::iter(first.into_iter().map(event));
            let tail = futures_util::stream::once(async move {
                go.notified().await;
                futures_util::stream::iter(rest.into_iter().map(event))
            })
            .flatten();
            axum::response::Response::builder()
                .status(200)
                .header("content-type", "text/event-stream")
                .body(axum::body::Body::from_stream(head.chain(tail)))
                .unwrap()
        }
    })
    .await;
    let dir = temp_dir("pg-spill");
    let spill = dir.join("spill");
    let (port, cut) = relay(0).await;
    let through_relay = db.url().replace(":5432/", &format!(":{port}/"));
    let config = |url: &str| {
        let extra = format!(
            "[store]\nurl = \"{url}\"\nspill_dir = \"{}\"\n\n[logging]\nsink = \"none\"\n",
            spill.display()
        );
        openai_config(&[("up", &up.url())], &extra)
    };
    let mut first = ServeProcess::spawn(&config(&through_relay)).await;

    let res = client()
        .post(first.url("/v1/chat/completions"))
        .bearer_auth(TEST_KEY)
        .json(
            &json!({"model": "test/model", "stream": true, "max_tokens": 10,
                      "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("Hello") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), body.next())
            .await
            .expect("the first words in time")
            .expect("more of the stream")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let id_at = seen.find("\"id\":\"").unwrap() + 6;
    let id = seen[id_at..].split('"').next().unwrap().to_string();
    // The content is out; PostgreSQL goes away before the charge is committed.
    cut.abort();
    let _ = cut.await;
    go.notify_one();
    let deadline = Instant::now() + Duration::from_secs(30);
    while spill_files(&spill).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the charge was never kept on disk: {}",
            first.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill(); // SIGKILL, PostgreSQL still gone
    drop(body);

    // A new process on the same disk, PostgreSQL answering again.
    let second = ServeProcess::spawn(&config(db.url())).await;
    assert!(
        spill_files(&spill).is_empty(),
        "the spill file is replayed and deleted at start"
    );
    // 5 prompt tokens at $1/Mtok + 2 completion tokens at $2/Mtok.
    let res = client()
        .get(second.url(&format!("/v1/generation?id={id}")))
        .bearer_auth(TEST_KEY)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let generation: Value = res.json().await.unwrap();
    assert_eq!(status, 200, "{generation}");
    assert_eq!(generation["data"]["total_cost"], json!(0.000009));
    let res = client()
        .get(second.url("/v1/credits"))
        .bearer_auth(TEST_KEY)
        .send()
        .await
        .unwrap();
    let credits: Value = res.json().await.unwrap();
    assert_eq!(credits["data"]["total_usage"], json!(0.000009), "{credits}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A rotation or a deletion on one gateway is refused on the other within a second
/// (the `sb_keys` notification empties its auth cache), and the key keeps its money.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotate_or_delete_on_one_gateway_is_refused_on_the_other_at_once() {
    let Some(db) = postgres("a_rotate_or_delete_on_one_gateway_is_refused_on_the_other") else {
        return;
    };
    let a = gateway(&config(db.url())).await;
    let b = gateway(&config(db.url())).await;
    let old = "sk-rotated-on-a-0123456789abcdef";
    let keys = a.gateway.keys().clone();
    let made = tokio::task::spawn_blocking(move || {
        keys.create(
            hash_secret(old),
            NewKey::new("rotating", "1".parse().unwrap()),
        )
        .unwrap()
    })
    .await
    .unwrap();
    // B caches the record of the old secret.
    assert_eq!(post_lorem(&b, old, 3).await.status(), 200);

    let (keys, id) = (a.gateway.keys().clone(), made.record.id.clone());
    let (rotated, new) = tokio::task::spawn_blocking(move || {
        switchboard::accounts::rotate_key(&*keys, &id, 0, switchboard::store::now_unix())
            .unwrap()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(rotated.record.id, made.record.id);
    within(Duration::from_secs(1), 401, || async {
        post_lorem(&b, old, 1).await.status().as_u16()
    })
    .await;
    assert_eq!(post_lorem(&b, &new, 1).await.status(), 200);
    let (s, credits) = get_json(&b, "/v1/credits", &new).await;
    assert_eq!(s, 200);
    assert_eq!(credits["data"]["total_credits"], json!(1));

    let (keys, id) = (a.gateway.keys().clone(), made.record.id.clone());
    tokio::task::spawn_blocking(move || {
        keys.update(
            &id,
            &KeyPatch {
                delete_at: Some(switchboard::store::now_unix()),
                ..Default::default()
            },
        )
        .unwrap()
        .unwrap()
    })
    .await
    .unwrap();
    within(Duration::from_secs(1), 401, || async {
        post_lorem(&b, &new, 1).await.status().as_u16()
    })
    .await;
    let res = post_lorem(&b, &new, 1).await;
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["message"], "key deleted");
    // Kept for the books: shown with its spending, marked deleted.
    let keys = b.gateway.keys().clone();
    let id = made.record.id.clone();
    let kept = tokio::task::spawn_blocking(move || keys.get(&id).unwrap().unwrap())
        .await
        .unwrap();
    assert!(kept.record.deleted());
    assert_eq!(kept.credits, "1".parse::<Money>().unwrap());
}
