//! Budgets per period, key expiry and app attribution through the real server
//! (SPEC §8.3), with the gateway's clock set by hand: no test waits for midnight.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchboard::clock::{parse_rfc3339, ManualClock};
use switchboard::config::Config;
use switchboard::gateway::Gateway;

/// `mock/lorem` at $1 per Mtok of completion and a free prompt: a request with
/// `max_tokens = n` reserves and costs exactly $n × 10⁻⁶.
fn config_text(keys: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{EXACT_LOREM}
{keys}
"#
    )
}

/// A gateway on `clock`, with its store and its SQLite request log in a fresh
/// directory (the log's path is returned).
async fn gateway_on(toml: &str, clock: &ManualClock) -> (TestGateway, std::path::PathBuf) {
    let dir = temp_dir("periods");
    let mut config = Config::from_toml(toml).unwrap_or_else(|e| panic!("test config: {e}"));
    config.store.url = format!("sqlite://{}", dir.join("switchboard.db").display());
    let log = dir.join("requests.db");
    config.logging.sink = format!("sqlite:{}", log.display());
    let gateway = Gateway::builder()
        .config(config)
        .clock(clock.clock())
        .build()
        .expect("gateway builds");
    (serve_built(gateway).await, log)
}

fn at(text: &str) -> u64 {
    parse_rfc3339(text).unwrap()
}

async fn ask(gw: &TestGateway, key: &str, max_tokens: u32) -> (u16, Value) {
    let res = post_lorem(gw, key, max_tokens).await;
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn key_info(gw: &TestGateway, key: &str) -> (u16, Value) {
    get_json(gw, "/api/v1/key", key).await
}

const DAILY: &str = "sk-daily-budget-0123456789";

#[tokio::test]
async fn a_daily_budget_refuses_past_it_a_new_day_admits_again_and_the_key_expires() {
    // Sunday 2029-12-30, noon UTC; the key expires at the turn of the year.
    let manual = ManualClock::new(at("2029-12-30T12:00:00Z"));
    let (gw, _) = gateway_on(
        &config_text(&format!(
            r#"
[[keys]]
secret = "{DAILY}"
name = "daily"
credits_usd = 1
limit_usd = 0.00005
limit_reset = "daily"
expires_at = "2030-01-01T00:00:00Z"
"#
        )),
        &manual,
    )
    .await;
    assert_eq!(ask(&gw, DAILY, 20).await.0, 200);
    assert_eq!(ask(&gw, DAILY, 20).await.0, 200);
    // $0.00004 of the day's $0.00005 spent: a reserve of $0.00002 does not fit.
    let (status, body) = ask(&gw, DAILY, 20).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_credits");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("daily spending limit"), "{message}");
    assert_eq!(ask(&gw, DAILY, 10).await.0, 200);

    let (status, info) = key_info(&gw, DAILY).await;
    assert_eq!(status, 200);
    let d = &info["data"];
    assert_eq!(d["limit_reset"], "daily");
    assert_eq!(d["usage_daily"].as_f64(), Some(0.00005));
    assert_eq!(d["usage_weekly"].as_f64(), Some(0.00005));
    assert_eq!(d["usage_monthly"].as_f64(), Some(0.00005));
    assert_eq!(d["limit_remaining"].as_f64(), Some(0.0));
    assert_eq!(d["usage"].as_f64(), Some(0.00005));
    assert_eq!(d["expires_at"], "2030-01-01T00:00:00Z");

    // Monday 2029-12-31: a new day and a new week, the same month.
    manual.set(at("2029-12-31T00:00:00Z"));
    assert_eq!(ask(&gw, DAILY, 20).await.0, 200);
    let d = key_info(&gw, DAILY).await.1["data"].clone();
    assert_eq!(d["usage_daily"].as_f64(), Some(0.00002));
    assert_eq!(d["usage_weekly"].as_f64(), Some(0.00002));
    assert_eq!(d["usage_monthly"].as_f64(), Some(0.00007));
    assert_eq!(d["limit_remaining"].as_f64(), Some(0.00003));
    assert_eq!(d["credits_remaining"].as_f64(), Some(0.99993));

    // Its expiry: 401 "key expired" at once, cached record or not.
    manual.set(at("2030-01-01T00:00:00Z"));
    let (status, body) = ask(&gw, DAILY, 1).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["message"], "key expired");
    let (status, body) = key_info(&gw, DAILY).await;
    assert_eq!(
        (status, body["error"]["message"].as_str()),
        (401, Some("key expired"))
    );
}

#[tokio::test]
async fn attribution_headers_reach_the_generation_and_the_request_log_bounded() {
    let manual = ManualClock::new(at("2026-05-01T10:00:00Z"));
    let key = "sk-attribution-0123456789";
    let (gw, log) = gateway_on(
        &config_text(&format!("[[keys]]\nsecret = \"{key}\"\ncredits_usd = 1\n")),
        &manual,
    )
    .await;
    // 300 two-byte characters: 600 bytes, cut to 512 at a character boundary.
    let long_title = "é".repeat(300);
    let mut ids = Vec::new();
    for (stream, referer, title) in [
        (
            false,
            Some("https://myapp.example/chat"),
            Some(long_title.as_str()),
        ),
        (true, Some("https://other.example/"), Some("Other app")),
        (false, None, None),
    ] {
        let mut req = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(
                &json!({"model": "mock/lorem", "max_tokens": 3, "stream": stream,
                          "messages": [{"role": "user", "content": "go"}]}),
            );
        if let Some(r) = referer {
            req = req.header("HTTP-Referer", r);
        }
        if let Some(t) = title {
            req = req.header("X-Title", t);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 200);
        ids.push(res.headers()["x-request-id"].to_str().unwrap().to_string());
        res.bytes().await.unwrap();
    }
    let cut = "é".repeat(256);
    let expected = [
        (json!("https://myapp.example/chat"), json!(cut)),
        (json!("https://other.example/"), json!("Other app")),
        (Value::Null, Value::Null),
    ];
    for (id, (url, title)) in ids.iter().zip(&expected) {
        let (status, g) = get_json(&gw, &format!("/v1/generation?id={id}"), key).await;
        assert_eq!(status, 200);
        assert_eq!(
            (&g["data"]["app_url"], &g["data"]["app_title"]),
            (url, title),
            "{g}"
        );
    }
    assert!(gw.gateway.logs().flush(Duration::from_secs(30)));
    let conn = rusqlite::Connection::open(&log).unwrap();
    for (id, (url, title)) in ids.iter().zip(&expected) {
        let (u, t): (Option<String>, Option<String>) = conn
            .query_row(
                "SELECT app_url, app_title FROM requests WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (
                u.map(Value::from).unwrap_or(Value::Null),
                t.map(Value::from).unwrap_or(Value::Null)
            ),
            (url.clone(), title.clone())
        );
    }
}

#[tokio::test]
async fn the_admin_api_sets_changes_and_clears_a_period_and_an_expiry() {
    std::env::set_var("SB_TEST_ADMIN_PERIODS", "the-admin-token");
    let manual = ManualClock::new(at("2026-05-01T10:00:00Z"));
    let (gw, _) = gateway_on(
        &config_text("[admin]\ntoken_env = \"SB_TEST_ADMIN_PERIODS\"\n"),
        &manual,
    )
    .await;
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth("the-admin-token");
    let send = |req: reqwest::RequestBuilder, body: Value| async move {
        let res = admin(req).json(&body).send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json::<Value>().await.unwrap())
    };

    let (status, made) = send(
        client().post(gw.url("/admin/keys")),
        json!({"name": "p", "credits_usd": 1, "limit_usd": 0.00003, "limit_reset": "weekly",
               "expires_at": "2026-06-01T02:00:00+02:00"}),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["data"]["limit_reset"], "weekly");
    assert_eq!(made["data"]["expires_at"], "2026-06-01T00:00:00Z");
    let id = made["data"]["id"].as_str().unwrap().to_string();
    let secret = made["data"]["secret"].as_str().unwrap().to_string();
    assert_eq!(ask(&gw, &secret, 20).await.0, 200);
    assert_eq!(ask(&gw, &secret, 20).await.0, 402, "past the week's limit");

    // Bad values: 400, naming the field; nothing created or changed.
    for body in [
        json!({"credits_usd": 1, "limit_reset": "hourly"}),
        json!({"credits_usd": 1, "expires_at": "next tuesday"}),
    ] {
        let (status, e) = send(client().post(gw.url("/admin/keys")), body.clone()).await;
        assert_eq!(status, 400, "{body} {e}");
        let message = e["error"]["message"].as_str().unwrap();
        let field = body
            .as_object()
            .unwrap()
            .keys()
            .find(|k| *k != "credits_usd")
            .unwrap();
        assert!(message.contains(field.as_str()), "{message}");
    }
    let patch_url = gw.url(&format!("/admin/keys/{id}"));
    let (status, _) = send(client().patch(&patch_url), json!({"limit_reset": "yearly"})).await;
    assert_eq!(status, 400);
    let (status, _) = send(client().patch(&patch_url), json!({"expires_at": "soon"})).await;
    assert_eq!(status, 400);

    // Monthly: the same $0.00002 spent this month; the view shows each period.
    let (status, shown) = send(
        client().patch(&patch_url),
        json!({"limit_reset": "monthly"}),
    )
    .await;
    assert_eq!(status, 200, "{shown}");
    let d = &shown["data"];
    assert_eq!(d["limit_reset"], "monthly");
    assert_eq!(d["expires_at"], "2026-06-01T00:00:00Z");
    assert_eq!(d["usage_daily"].as_f64(), Some(0.00002));
    assert_eq!(d["usage_weekly"].as_f64(), Some(0.00002));
    assert_eq!(d["usage_monthly"].as_f64(), Some(0.00002));
    assert_eq!(
        key_info(&gw, &secret).await.1["data"]["limit_reset"],
        "monthly"
    );

    // Cleared: the limit is the key's lifetime again, and the key never expires.
    let (status, shown) = send(
        client().patch(&patch_url),
        json!({"limit_reset": null, "expires_at": null}),
    )
    .await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["data"]["limit_reset"], Value::Null);
    assert_eq!(shown["data"]["expires_at"], Value::Null);
    manual.set(at("2027-01-01T00:00:00Z"));
    // A new month, but no period any more: $0.00002 of the lifetime $0.00003 is spent.
    assert_eq!(ask(&gw, &secret, 20).await.0, 402);
    assert_eq!(ask(&gw, &secret, 10).await.0, 200);
    let list: Value = admin(client().get(gw.url("/admin/keys")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = &list["data"][0];
    assert_eq!(listed["usage_daily"].as_f64(), Some(0.00001));
    assert_eq!(listed["usage_monthly"].as_f64(), Some(0.00001));
    assert_eq!(listed["usage"].as_f64(), Some(0.00003));
}

#[test]
fn a_config_with_a_bad_period_or_expiry_names_each_problem_with_its_path() {
    let err = Config::from_toml(&config_text(
        r#"
[[keys]]
secret = "sk-bad-period-0123456789"
credits_usd = 1
limit_reset = "hourly"
expires_at = "2030-02-30T00:00:00Z"
"#,
    ))
    .unwrap_err();
    let paths: Vec<_> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["keys[0].limit_reset", "keys[0].expires_at"],
        "{err}"
    );
    assert!(
        err.to_string().contains("daily, weekly or monthly"),
        "{err}"
    );
    assert!(err.to_string().contains("RFC 3339"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_a_daily_budget_and_attribution_work_the_same() {
    let Some(db) = switchboard::testing::postgres("on_postgresql_a_daily_budget_and_attribution")
    else {
        return;
    };
    let manual = ManualClock::new(at("2026-05-01T23:00:00Z"));
    let mut config = Config::from_toml(&config_text(&format!(
        "[[keys]]\nsecret = \"{DAILY}\"\ncredits_usd = 1\nlimit_usd = 0.00003\nlimit_reset = \"daily\"\n"
    )))
    .unwrap();
    config.store.url = db.url().to_string();
    config.store.spill_dir = temp_dir("periods-spill").display().to_string();
    config.logging.sink = "postgres".into();
    let gateway = Gateway::builder()
        .config(config)
        .clock(manual.clock())
        .build()
        .expect("gateway builds");
    let gw = serve_built(gateway).await;

    let res = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(DAILY)
        .header("HTTP-Referer", "https://pg-app.example/")
        .header("X-Title", "PG app")
        .json(&json!({"model": "mock/lorem", "max_tokens": 20,
                      "messages": [{"role": "user", "content": "go"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    res.bytes().await.unwrap();
    assert_eq!(ask(&gw, DAILY, 20).await.0, 402);
    let d = key_info(&gw, DAILY).await.1["data"].clone();
    assert_eq!(d["usage_daily"].as_f64(), Some(0.00002), "{d}");
    manual.set(at("2026-05-02T00:00:00Z"));
    assert_eq!(ask(&gw, DAILY, 20).await.0, 200);
    let d = key_info(&gw, DAILY).await.1["data"].clone();
    assert_eq!(d["usage_daily"].as_f64(), Some(0.00002), "{d}");
    assert_eq!(
        d["usage_monthly"].as_f64(),
        Some(0.00004),
        "May 1 and 2: {d}"
    );

    let (_, g) = get_json(&gw, &format!("/v1/generation?id={id}"), DAILY).await;
    assert_eq!(g["data"]["app_url"], "https://pg-app.example/");
    assert_eq!(g["data"]["app_title"], "PG app");
    assert!(gw.gateway.logs().flush(Duration::from_secs(30)));
    let (client, conn) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT app_url, app_title FROM requests WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("https://pg-app.example/")
    );
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("PG app"));
}

#[tokio::test]
async fn fifty_concurrent_requests_on_a_daily_budget_that_covers_five() {
    let manual = ManualClock::new(at("2026-05-01T10:00:00Z"));
    let key = "sk-concurrent-daily-0123456789";
    let (gw, _) = gateway_on(
        &config_text(&format!(
            "[[keys]]\nsecret = \"{key}\"\ncredits_usd = 1\nlimit_usd = 0.0001\nlimit_reset = \"daily\"\n"
        )),
        &manual,
    )
    .await;
    let gw = std::sync::Arc::new(gw);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move { ask(&gw, key, 20).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(served, 5, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 402),
        "{statuses:?}"
    );
    let d = key_info(&gw, key).await.1["data"].clone();
    assert_eq!(d["usage_daily"].as_f64(), Some(0.0001), "{d}");
    assert_eq!(d["limit_remaining"].as_f64(), Some(0.0), "{d}");
}
