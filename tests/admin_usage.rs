//! `GET /admin/usage` and `GET /admin/endpoints` (SPEC §9) against the real server:
//! usage per key, model, provider, app, hour and day equal to what the requests were
//! charged and took (computed here from the log's own rows), on the SQLite log and
//! on the PostgreSQL one (skipped without PostgreSQL, see `switchboard::testing`);
//! the admin token, bad parameters, a log that cannot answer; endpoint health after
//! failing and rate-limited upstreams.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard::config::Config;
use switchboard::context::CallContext;
use switchboard::logging::{LogSink, LogWriter, RequestRecord};
use switchboard::money::Money;
use switchboard::Gateway;

const KEY_ONE: &str = "sk-usage-key-one-0123456789";
const KEY_TWO: &str = "sk-usage-key-two-0123456789";

/// Picodollars per prompt and completion token of each provider.
fn prices(provider: &str) -> (i64, i64) {
    match provider {
        "alpha" => (1_000_000, 2_000_000),
        "beta" => (3_000_000, 5_000_000),
        other => panic!("no provider {other}"),
    }
}

/// Two providers on one fake upstream, `test/a` on alpha ($1 / $2 per Mtok) and
/// `test/b` on beta ($3 / $5), two keys, one attempt per request, the admin API on
/// through `token_env`.
fn config(upstream: &str, token_env: &str) -> Config {
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[admin]
token_env = "{token_env}"

[retry]
max_attempts = 1

[[providers]]
name = "alpha"
kind = "openai"
base_url = "{upstream}/v1"
api_key = "sk-upstream-alpha"
timeout_secs = 5

[[providers]]
name = "beta"
kind = "openai"
base_url = "{upstream}/v1"
api_key = "sk-upstream-beta"
timeout_secs = 5

[[models]]
id = "test/a"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "alpha"
  upstream_model = "up-a"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[models]]
id = "test/b"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "beta"
  upstream_model = "up-b"
  prompt_usd_per_mtok = 3
  completion_usd_per_mtok = 5

[[keys]]
secret = "{KEY_ONE}"
name = "one"
credits_usd = 100

[[keys]]
secret = "{KEY_TWO}"
name = "two"
credits_usd = 100
"#
    );
    Config::from_toml(&toml).unwrap()
}

/// Answers `n=K` with K completion tokens and 10 + K prompt tokens (SSE when asked),
/// and `fail` with a 500.
async fn counting_upstream() -> Upstream {
    upstream(|seen, _| async move {
        let text = seen.body["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if text == "fail" {
            return json(500, json!({"error": {"message": "boom"}}));
        }
        let k: u64 = text.trim_start_matches("n=").parse().unwrap_or(1);
        let usage = json!({"prompt_tokens": 10 + k, "completion_tokens": k, "total_tokens": 10 + 2 * k});
        if seen.body["stream"] == true {
            let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up",
                "choices": [{"index": 0, "delta": {"content": "word"}, "finish_reason": "stop"}]});
            let tail = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up",
                "choices": [], "usage": usage});
            sse(
                vec![chunk.to_string(), tail.to_string(), "[DONE]".into()],
                Duration::ZERO,
            )
        } else {
            json(
                200,
                json!({"id": "x", "object": "chat.completion", "created": 1, "model": "up",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "word"}, "finish_reason": "stop"}],
                    "usage": usage}),
            )
        }
    })
    .await
}

/// One row of the request log, as the test reads it back.
#[derive(Debug, Clone)]
struct LogRow {
    time_ms: u64,
    key_id: Option<String>,
    key_name: Option<String>,
    model: Option<String>,
    provider: Option<String>,
    status: u16,
    error_code: Option<String>,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_pico: i64,
    latency_ms: u64,
    ttft_ms: Option<u64>,
    app_title: Option<String>,
    app_url: Option<String>,
}

const SELECT: &str = "SELECT time_ms, key_id, key_name, COALESCE(model, requested_model), provider, status, error_code, prompt_tokens, completion_tokens, cost_pico, latency_ms, ttft_ms, app_title, app_url FROM requests";

fn sqlite_rows(path: &std::path::Path) -> Vec<LogRow> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn.prepare(SELECT).unwrap();
    stmt.query_map([], |r| {
        Ok(LogRow {
            time_ms: r.get::<_, i64>(0)? as u64,
            key_id: r.get(1)?,
            key_name: r.get(2)?,
            model: r.get(3)?,
            provider: r.get(4)?,
            status: r.get(5)?,
            error_code: r.get(6)?,
            prompt_tokens: r.get::<_, i64>(7)? as u64,
            completion_tokens: r.get::<_, i64>(8)? as u64,
            cost_pico: r.get(9)?,
            latency_ms: r.get::<_, i64>(10)? as u64,
            ttft_ms: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
            app_title: r.get(12)?,
            app_url: r.get(13)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

async fn postgres_rows(url: &str) -> Vec<LogRow> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query(SELECT, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| LogRow {
            time_ms: r.get::<_, i64>(0) as u64,
            key_id: r.get(1),
            key_name: r.get(2),
            model: r.get(3),
            provider: r.get(4),
            status: r.get::<_, i32>(5) as u16,
            error_code: r.get(6),
            prompt_tokens: r.get::<_, i64>(7) as u64,
            completion_tokens: r.get::<_, i64>(8) as u64,
            cost_pico: r.get(9),
            latency_ms: r.get::<_, i64>(10) as u64,
            ttft_ms: r.get::<_, Option<i64>>(11).map(|v| v as u64),
            app_title: r.get(12),
            app_url: r.get(13),
        })
        .collect()
}

/// A group of `GET /admin/usage`, `cost` read as exact money.
#[derive(Debug, Deserialize)]
struct Group {
    group: BTreeMap<String, Value>,
    requests: u64,
    errors: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost: Money,
    latency_ms_p50: Option<u64>,
    latency_ms_p95: Option<u64>,
    ttft_ms_p50: Option<u64>,
}

fn nearest_rank(mut v: Vec<u64>, p: usize) -> Option<u64> {
    v.sort_unstable();
    let n = v.len();
    (n > 0).then(|| v[(n * p).div_ceil(100) - 1])
}

fn rfc3339(ms: u64) -> String {
    switchboard::clock::format_rfc3339(ms / 1000)
}

/// The group columns of `row` for one grouping, as the API names them.
fn group_of(row: &LogRow, by: &str) -> Vec<(String, Value)> {
    let s = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
    match by {
        "key" => vec![
            ("key_id".into(), s(&row.key_id)),
            ("key_name".into(), s(&row.key_name)),
        ],
        "model" => vec![("model".into(), s(&row.model))],
        "provider" => vec![("provider".into(), s(&row.provider))],
        "app" => vec![
            ("app_title".into(), s(&row.app_title)),
            ("app_url".into(), s(&row.app_url)),
        ],
        "hour" => vec![(
            "hour".into(),
            json!(rfc3339(row.time_ms / 3_600_000 * 3_600_000)),
        )],
        "day" => vec![(
            "day".into(),
            json!(rfc3339(row.time_ms / 86_400_000 * 86_400_000)),
        )],
        other => panic!("{other}"),
    }
}

/// What `GET /admin/usage?group_by=…` must say of `rows` (already in the range).
fn expected(rows: &[LogRow], group_by: &str) -> BTreeMap<String, Value> {
    let mut groups: BTreeMap<String, (BTreeMap<String, Value>, Vec<&LogRow>)> = BTreeMap::new();
    for r in rows {
        let g: BTreeMap<String, Value> =
            group_by.split(',').flat_map(|by| group_of(r, by)).collect();
        let key = serde_json::to_string(&g).unwrap();
        groups
            .entry(key)
            .or_insert_with(|| (g, Vec::new()))
            .1
            .push(r);
    }
    groups
        .into_iter()
        .map(|(k, (g, rs))| {
            let v = json!({
                "group": g,
                "requests": rs.len(),
                "errors": rs.iter().filter(|r| r.status >= 400 || r.error_code.is_some()).count(),
                "prompt_tokens": rs.iter().map(|r| r.prompt_tokens).sum::<u64>(),
                "completion_tokens": rs.iter().map(|r| r.completion_tokens).sum::<u64>(),
                "cost_pico": rs.iter().map(|r| r.cost_pico).sum::<i64>(),
                "latency_ms_p50": nearest_rank(rs.iter().map(|r| r.latency_ms).collect(), 50),
                "latency_ms_p95": nearest_rank(rs.iter().map(|r| r.latency_ms).collect(), 95),
                "ttft_ms_p50": nearest_rank(rs.iter().filter_map(|r| r.ttft_ms).collect(), 50),
            });
            (k, v)
        })
        .collect()
}

/// `GET path` with the admin token `token` (none: no header): status and raw body.
async fn admin_get(gw: &TestGateway, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = client().get(gw.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

async fn usage(gw: &TestGateway, token: &str, query: &str) -> Vec<Group> {
    let (status, body) = admin_get(gw, &format!("/admin/usage?{query}"), Some(token)).await;
    assert_eq!(status, 200, "{query}: {body}");
    #[derive(Deserialize)]
    struct Data {
        data: Vec<Group>,
    }
    serde_json::from_str::<Data>(&body).unwrap().data
}

/// Asserts the answer to `group_by` over `rows` (all in the range).
async fn check(gw: &TestGateway, token: &str, query: &str, group_by: &str, rows: &[LogRow]) {
    let got = usage(gw, token, query).await;
    let want = expected(rows, group_by);
    assert_eq!(got.len(), want.len(), "{query}: {got:?}");
    for g in &got {
        let key = serde_json::to_string(&g.group).unwrap();
        let w = want
            .get(&key)
            .unwrap_or_else(|| panic!("{query}: unexpected group {key}"));
        let label = format!("{query} {key}");
        assert_eq!(g.requests, w["requests"].as_u64().unwrap(), "{label}");
        assert_eq!(g.errors, w["errors"].as_u64().unwrap(), "{label}");
        assert_eq!(
            g.prompt_tokens,
            w["prompt_tokens"].as_u64().unwrap(),
            "{label}"
        );
        assert_eq!(
            g.completion_tokens,
            w["completion_tokens"].as_u64().unwrap(),
            "{label}"
        );
        assert_eq!(
            g.cost,
            Money::from_pico(w["cost_pico"].as_i64().unwrap()),
            "{label}"
        );
        assert_eq!(g.latency_ms_p50, w["latency_ms_p50"].as_u64(), "{label}");
        assert_eq!(g.latency_ms_p95, w["latency_ms_p95"].as_u64(), "{label}");
        assert_eq!(g.ttft_ms_p50, w["ttft_ms_p50"].as_u64(), "{label}");
    }
    // Ordered by time for hour / day, else by cost, descending.
    if group_by.contains("hour") || group_by.contains("day") {
        let times: Vec<String> = got
            .iter()
            .map(|g| {
                g.group
                    .get("hour")
                    .or(g.group.get("day"))
                    .unwrap()
                    .to_string()
            })
            .collect();
        let mut sorted = times.clone();
        sorted.sort();
        assert_eq!(times, sorted, "{query}");
    } else {
        let costs: Vec<Money> = got.iter().map(|g| g.cost).collect();
        let mut sorted = costs.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(costs, sorted, "{query}");
    }
}

/// Sends the requests: per key, per model, three of them (one streamed, one from an
/// app), a failing one (502) and an unknown model (404). Returns what the clients
/// were charged, summed.
async fn traffic(gw: &TestGateway) -> Money {
    let mut charged = Money::ZERO;
    for key in [KEY_ONE, KEY_TWO] {
        for model in ["test/a", "test/b"] {
            for k in 1..=3u64 {
                let stream = k == 2;
                let body = json!({"model": model, "stream": stream,
                    "stream_options": {"include_usage": true},
                    "messages": [{"role": "user", "content": format!("n={k}")}]});
                let mut req = client()
                    .post(gw.url("/v1/chat/completions"))
                    .bearer_auth(key)
                    .json(&body);
                if k == 3 {
                    req = req
                        .header("X-Title", "Usage App")
                        .header("HTTP-Referer", "https://usage.example/");
                }
                let res = req.send().await.unwrap();
                assert_eq!(res.status(), 200);
                let usage: Value = if stream {
                    let data = sse_data(&res.text().await.unwrap());
                    serde_json::from_str::<Value>(&data[data.len() - 2]).unwrap()["usage"].clone()
                } else {
                    res.json::<Value>().await.unwrap()["usage"].clone()
                };
                let cost: Money = serde_json::from_value(usage["cost"].clone()).unwrap();
                charged = charged + cost;
            }
        }
    }
    let fail = json!({"model": "test/a", "messages": [{"role": "user", "content": "fail"}]});
    assert_eq!(post_chat(gw, KEY_ONE, &fail).await.status(), 502);
    let missing =
        json!({"model": "nope/missing", "messages": [{"role": "user", "content": "n=1"}]});
    assert_eq!(post_chat(gw, KEY_TWO, &missing).await.status(), 404);
    assert!(gw.gateway.logs().flush(SOCKET_TIMEOUT));
    charged
}

fn at(text: &str) -> u64 {
    switchboard::clock::parse_rfc3339(text).unwrap() * 1000
}

/// Records of long ago (2025-01-01 and 02), outside the default range, for the
/// hour and day buckets and `from` / `to`.
fn old_records() -> Vec<RequestRecord> {
    let times = [
        "2025-01-01T10:15:00Z",
        "2025-01-01T10:45:00Z",
        "2025-01-01T11:05:00Z",
        "2025-01-02T09:00:00Z",
    ];
    times
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut r = RequestRecord::from_context(
                &CallContext::with_id(format!("gen-old-{i}")),
                Duration::ZERO,
                true,
                false,
            );
            r.time_ms = at(t);
            r.key_id = Some("key_old".into());
            r.key_name = Some("old".into());
            r.model = Some("test/a".into());
            r.provider = Some("alpha".into());
            r.status = if i == 1 { 503 } else { 200 };
            r.prompt_tokens = 100 + i as u64;
            r.completion_tokens = 7 * i as u64;
            r.cost = Money::from_pico(123_456_789_012 + i as i64);
            r.latency_ms = 100 * (i as u64 + 1);
            r.ttft_ms = (i != 2).then_some(10 * (i as u64 + 1));
            r
        })
        .collect()
}

/// The whole usage check on a gateway whose log holds `rows()` (read back after the
/// traffic and the old records).
async fn usage_is_what_was_spent(gw: &TestGateway, token: &str, rows: Vec<LogRow>, charged: Money) {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (recent, old): (Vec<LogRow>, Vec<LogRow>) = rows
        .into_iter()
        .partition(|r| r.time_ms + 24 * 3_600_000 > now_ms);
    assert_eq!(recent.len(), 14, "12 served, a 502 and a 404");
    assert_eq!(old.len(), 4);
    // What the test spent is what the log holds, each row at the endpoint's prices.
    let served: Vec<&LogRow> = recent.iter().filter(|r| r.status == 200).collect();
    assert_eq!(served.len(), 12);
    for r in &served {
        let (p, c) = prices(r.provider.as_deref().unwrap());
        assert_eq!(
            r.cost_pico,
            p * r.prompt_tokens as i64 + c * r.completion_tokens as i64
        );
    }
    assert_eq!(
        Money::from_pico(recent.iter().map(|r| r.cost_pico).sum()),
        charged
    );

    for group_by in [
        "key",
        "model",
        "provider",
        "app",
        "key,model",
        "model,hour",
        "day",
    ] {
        check(
            gw,
            token,
            &format!("group_by={group_by}"),
            group_by,
            &recent,
        )
        .await;
    }
    // The key of the old records is outside the default range.
    let keys = usage(gw, token, "group_by=key").await;
    assert!(keys.iter().all(|g| g.group["key_id"] != "key_old"));
    let total: Money = keys.iter().fold(Money::ZERO, |a, g| a + g.cost);
    assert_eq!(total, charged);

    // Hour and day buckets, and the range.
    let range = "from=2025-01-01T00:00:00Z&to=2025-01-03T00:00:00Z";
    check(gw, token, &format!("group_by=hour&{range}"), "hour", &old).await;
    check(
        gw,
        token,
        &format!("group_by=day,key&{range}"),
        "day,key",
        &old,
    )
    .await;
    let hours = usage(gw, token, &format!("group_by=hour&{range}")).await;
    let buckets: Vec<&Value> = hours.iter().map(|g| &g.group["hour"]).collect();
    assert_eq!(
        buckets,
        [
            "2025-01-01T10:00:00Z",
            "2025-01-01T11:00:00Z",
            "2025-01-02T09:00:00Z"
        ]
    );
    let window: Vec<LogRow> = old
        .iter()
        .filter(|r| {
            r.time_ms >= at("2025-01-01T10:30:00Z") && r.time_ms < at("2025-01-01T11:05:00Z")
        })
        .cloned()
        .collect();
    assert_eq!(window.len(), 1, "`from` inclusive, `to` exclusive");
    check(
        gw,
        token,
        "group_by=model&from=2025-01-01T10:30:00Z&to=2025-01-01T11:05:00Z",
        "model",
        &window,
    )
    .await;
    // `from` alone: up to now (the old records from then on, and the recent ones).
    let since = usage(gw, token, "group_by=key&from=2025-01-01T11:00:00Z").await;
    let old_key = since
        .iter()
        .find(|g| g.group["key_id"] == "key_old")
        .unwrap();
    assert_eq!(old_key.requests, 2);
}

async fn refusals(gw: &TestGateway, token: &str) {
    for (query, names) in [
        ("", "`group_by`"),
        ("group_by=week", "`group_by`"),
        ("group_by=key,model,day", "`group_by`"),
        ("group_by=key&from=yesterday", "`from`"),
        ("group_by=key&to=2025-02-30T00:00:00Z", "`to`"),
        (
            "group_by=key&from=2025-01-02T00:00:00Z&to=2025-01-01T00:00:00Z",
            "`from`",
        ),
    ] {
        let (status, body) = admin_get(gw, &format!("/admin/usage?{query}"), Some(token)).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{query}: {body}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap().contains(names),
            "{query}: {body}"
        );
    }
    for path in ["/admin/usage?group_by=key", "/admin/endpoints"] {
        for t in [None, Some("wrong-token")] {
            let (status, body) = admin_get(gw, path, t).await;
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                (status, v["error"]["code"].as_str()),
                (401, Some("invalid_api_key")),
                "{path}"
            );
        }
    }
}

#[tokio::test]
async fn usage_on_the_sqlite_log_is_what_the_requests_spent_and_took() {
    let token = "sb-usage-sqlite-admin-token";
    std::env::set_var("SB_TEST_USAGE_SQLITE_ADMIN", token);
    let up = counting_upstream().await;
    let mut config = config(&up.url(), "SB_TEST_USAGE_SQLITE_ADMIN");
    let log = temp_dir("usage-log").join("log.db");
    config.logging.sink = format!("sqlite:{}", log.display());
    let gw = gateway_with(config).await;

    let charged = traffic(&gw).await;
    // Records of long ago, written into the same file beside the gateway's writer.
    let mut old = switchboard::logging::SqliteSink::open(&log).unwrap();
    old.write(&old_records()).unwrap();
    drop(old);
    // The time index is there.
    let conn = rusqlite::Connection::open(&log).unwrap();
    let plan: String = conn
        .query_row(
            "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM requests WHERE time_ms >= 1 AND time_ms < 2",
            [],
            |r| r.get(3),
        )
        .unwrap();
    assert!(plan.contains("requests_time"), "{plan}");

    usage_is_what_was_spent(&gw, token, sqlite_rows(&log), charged).await;
    refusals(&gw, token).await;
}

#[tokio::test]
async fn usage_on_the_postgres_log_is_what_the_requests_spent_and_took() {
    let Some(db) = switchboard::testing::postgres(
        "usage_on_the_postgres_log_is_what_the_requests_spent_and_took",
    ) else {
        return;
    };
    let token = "sb-usage-postgres-admin-token";
    std::env::set_var("SB_TEST_USAGE_PG_ADMIN", token);
    let up = counting_upstream().await;
    let mut config = config(&up.url(), "SB_TEST_USAGE_PG_ADMIN");
    config.store.url = format!(
        "sqlite://{}",
        temp_dir("usage-pg").join("switchboard.db").display()
    );
    config.logging.sink = "none".into();
    let mut log_config = config.clone();
    log_config.store.url = db.url().to_string();
    log_config.logging.sink = "postgres".into();
    let writer = LogWriter::from_config(&log_config).unwrap();
    assert!(writer.usage().is_some(), "the PostgreSQL sink can answer");
    let gw = serve_built(
        Gateway::builder()
            .config(config)
            .log_writer(writer)
            .build()
            .unwrap(),
    )
    .await;

    let charged = traffic(&gw).await;
    let url = db.url().to_string();
    tokio::task::spawn_blocking(move || {
        let mut sink = switchboard::logging::PostgresSink::open(&url).unwrap();
        sink.write(&old_records()).unwrap();
    })
    .await
    .unwrap();

    usage_is_what_was_spent(&gw, token, postgres_rows(db.url()).await, charged).await;
    refusals(&gw, token).await;

    // The dashboard's recent requests read the same table (`GET /admin/requests`).
    let source = switchboard::dashboard::RecentSource::from_config(&log_config);
    assert!(matches!(
        source,
        switchboard::dashboard::RecentSource::Postgres(_)
    ));
    let recent = tokio::task::spawn_blocking(move || source.recent(3))
        .await
        .unwrap()
        .unwrap();
    let (client, conn) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let newest = client
        .query(
            "SELECT id, cost_pico, status, key_name FROM requests ORDER BY time_ms DESC, id DESC LIMIT 3",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(recent.len(), 3);
    for (got, row) in recent.iter().zip(&newest) {
        assert_eq!(got.id, row.get::<_, String>(0));
        assert_eq!(got.cost, Money::from_pico(row.get(1)));
        assert_eq!(i32::from(got.status), row.get::<_, i32>(2));
        assert_eq!(got.key_name, row.get::<_, Option<String>>(3));
    }
}

#[tokio::test]
async fn usage_is_404_when_admin_is_off_or_the_log_cannot_be_queried() {
    let up = counting_upstream().await;
    // No such variable: the admin API is off.
    let off = gateway_with(config(&up.url(), "SB_TEST_USAGE_NO_SUCH_VARIABLE")).await;
    for path in ["/admin/usage?group_by=key", "/admin/endpoints"] {
        let (status, body) = admin_get(&off, path, Some("anything")).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    // A JSONL log: 404 naming `[logging].sink`.
    let token = "sb-usage-jsonl-admin-token";
    std::env::set_var("SB_TEST_USAGE_JSONL_ADMIN", token);
    let mut config = config(&up.url(), "SB_TEST_USAGE_JSONL_ADMIN");
    let log = temp_dir("usage-jsonl").join("log.jsonl");
    config.logging.sink = format!("jsonl:{}", log.display());
    let gw = gateway_with(config).await;
    let (status, body) = admin_get(&gw, "/admin/usage?group_by=key", Some(token)).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("[logging].sink = \"jsonl:"),
        "{body}"
    );
    // A bad parameter is still a 400 first.
    let (status, _) = admin_get(&gw, "/admin/usage?group_by=week", Some(token)).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn endpoints_show_degraded_parked_and_healthy_with_their_reasons() {
    let up = upstream(|seen, _| async move {
        match seen.body["model"].as_str().unwrap_or("") {
            "flaky" => json(500, json!({"error": {"message": "boom"}})),
            "limited" => {
                let mut r = json(429, json!({"error": {"message": "slow down"}}));
                r.headers_mut().insert("retry-after", "120".parse().unwrap());
                r
            }
            _ => json(
                200,
                json!({"id": "x", "object": "chat.completion", "created": 1, "model": "up",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}),
            ),
        }
    })
    .await;
    let token = "sb-endpoints-admin-token";
    std::env::set_var("SB_TEST_ENDPOINTS_ADMIN", token);
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\ntoken_env = \"SB_TEST_ENDPOINTS_ADMIN\"\n[retry]\nmax_attempts = 1\n[health]\nfailure_threshold = 2\ncooldown_secs = 600\n[logging]\nsink = \"none\"\n\n[[providers]]\nname = \"p\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\napi_key = \"sk-up\"\ntimeout_secs = 5\n",
        up.url()
    );
    for m in ["flaky", "limited", "good"] {
        toml.push_str(&format!(
            "\n[[models]]\nid = \"test/{m}\"\n  [[models.endpoints]]\n  provider = \"p\"\n  upstream_model = \"{m}\"\n  prompt_usd_per_mtok = 1\n  completion_usd_per_mtok = 1\n"
        ));
    }
    toml.push_str(&format!(
        "\n[[keys]]\nsecret = \"{TEST_KEY}\"\nname = \"demo\"\ncredits_usd = 10\n"
    ));
    let gw = gateway(&toml).await;
    let ask = |m: &str| json!({"model": m, "messages": [{"role": "user", "content": "hi"}]});

    // Healthy before anything.
    let (status, body) = admin_get(&gw, "/admin/endpoints", Some(token)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    for e in v["data"].as_array().unwrap() {
        assert_eq!(e["state"], "healthy", "{e}");
        assert_eq!(e["until"], Value::Null);
        assert_eq!(e["reason"], Value::Null);
        assert_eq!(e["consecutive_failures"], 0);
    }

    // Two failures in a row degrade `flaky` (threshold 2); a third request is its
    // last resort, which fails too.
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for i in 0..3 {
        let status = post_chat(&gw, TEST_KEY, &ask("test/flaky")).await.status();
        // The third is refused (503) or its last resort fails (502).
        assert!(status == 502 || (i == 2 && status == 503), "{i}: {status}");
    }
    let flaky_hits = up
        .requests()
        .iter()
        .filter(|s| s.body["model"] == "flaky")
        .count();
    // One 429 with Retry-After: 120 parks `limited`.
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(
        post_chat(&gw, TEST_KEY, &ask("test/limited"))
            .await
            .status(),
        429
    );
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1;
    for _ in 0..2 {
        assert_eq!(
            post_chat(&gw, TEST_KEY, &ask("test/good")).await.status(),
            200
        );
    }

    let (status, body) = admin_get(&gw, "/admin/endpoints", Some(token)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let of = |m: &str| {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["model"] == format!("test/{m}"))
            .unwrap()
            .clone()
    };
    let flaky = of("flaky");
    assert_eq!(flaky["state"], "degraded", "{flaky}");
    assert_eq!(flaky["provider"], "p");
    assert_eq!(flaky["consecutive_failures"], flaky_hits as u64, "{flaky}");
    assert!(flaky_hits >= 2);
    assert_eq!(flaky["last_error"], "500");
    assert!(flaky["reason"].as_str().unwrap().contains("500"), "{flaky}");
    let until = switchboard::clock::parse_rfc3339(flaky["until"].as_str().unwrap()).unwrap();
    assert!(until >= started + 600 && until <= after + 600, "{flaky}");

    let limited = of("limited");
    assert_eq!(limited["state"], "parked", "{limited}");
    assert_eq!(limited["last_error"], "429");
    assert_eq!(limited["retry_after_secs"], 120);
    assert_eq!(
        limited["consecutive_failures"], 0,
        "a park is not a failure"
    );
    assert!(
        limited["reason"]
            .as_str()
            .unwrap()
            .contains("Retry-After 120 s"),
        "{limited}"
    );
    let until = switchboard::clock::parse_rfc3339(limited["until"].as_str().unwrap()).unwrap();
    assert!(until >= before + 120 && until <= after + 120, "{limited}");

    let good = of("good");
    assert_eq!(good["state"], "healthy", "{good}");
    assert_eq!(good["reason"], Value::Null);
    assert_eq!(good["last_error"], Value::Null);
    assert!(
        good["ttft_ms"].is_u64(),
        "an observed time to first token: {good}"
    );
}
