//! The request log in PostgreSQL (`[logging].sink = "postgres"`, SPEC §6) through the
//! real server: one row per request, charged amounts to the picodollar, and the
//! documented per-key, per-day query. Needs PostgreSQL (`switchboard::testing`);
//! without it the test says so and returns.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchboard::config::Config;
use switchboard::logging::LogWriter;
use switchboard::money::Money;
use switchboard::Gateway;

fn completion(text: &str) -> Value {
    json!({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    })
}

fn stream_events(words: &[&str]) -> Vec<String> {
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        .to_string()
    };
    let mut ev: Vec<String> = words
        .iter()
        .map(|w| chunk(json!({"content": w}), None))
        .collect();
    ev.push(chunk(json!({}), Some("stop")));
    ev.push(
        json!({"id": "c", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 5, "completion_tokens": words.len()}})
        .to_string(),
    );
    ev.push("[DONE]".into());
    ev
}

fn ask(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "stream_options": {"include_usage": true},
           "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test]
async fn requests_through_the_gateway_land_in_postgresql_with_what_they_were_charged() {
    let Some(db) = switchboard::testing::postgres(
        "requests_through_the_gateway_land_in_postgresql_with_what_they_were_charged",
    ) else {
        return;
    };
    let up = upstream(|seen, _| async move {
        if seen.body["stream"] == true {
            sse(stream_events(&["The", " answer"]), Duration::ZERO)
        } else {
            json(200, completion("The answer"))
        }
    })
    .await;
    // The sink is opened from the config, as `serve` does: `[logging].sink = "postgres"`
    // writes into the database `[store].url` names. The gateway's own store stays a
    // SQLite file here, so that this test needs only the sink (with the PostgreSQL
    // store, one `[store].url` serves both), in a directory of its own (never the
    // default `./switchboard.db` in the crate root).
    let mut config = Config::from_toml(&openai_config(
        &[("alpha", &up.url())],
        "[logging]\nsink = \"none\"\n",
    ))
    .unwrap();
    config.store.url = format!(
        "sqlite://{}",
        temp_dir("pg-log").join("switchboard.db").display()
    );
    let mut log_config = config.clone();
    log_config.store.url = db.url().to_string();
    log_config.logging.sink = "postgres".into();
    let writer = LogWriter::from_config(&log_config).unwrap();
    assert!(writer.is_enabled());
    let gateway = Gateway::builder()
        .config(config)
        .log_writer(writer)
        .build()
        .unwrap();
    let gw = serve_built(gateway).await;

    let mut charged = Vec::new();
    for stream in [false, true] {
        let res = post_chat(&gw, TEST_KEY, &ask("test/model", stream)).await;
        assert_eq!(res.status(), 200);
        let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
        let body: Value = if stream {
            let text = res.text().await.unwrap();
            let data = sse_data(&text);
            serde_json::from_str(&data[data.len() - 2]).unwrap()
        } else {
            res.json().await.unwrap()
        };
        let cost: Money = serde_json::from_value(body["usage"]["cost"].clone()).unwrap();
        assert!(cost > Money::ZERO);
        charged.push((id, cost, stream));
    }
    let res = post_chat(&gw, TEST_KEY, &ask("nope/missing", false)).await;
    assert_eq!(res.status(), 404);
    let missing = res.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(gw.gateway.logs().flush(SOCKET_TIMEOUT));

    let (client, conn) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT id, key_id, model, provider, status, cost_pico, streamed, complete, attempts
             FROM requests ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "one row per request");
    for (id, cost, stream) in &charged {
        let row = rows
            .iter()
            .find(|r| r.get::<_, &str>("id") == id)
            .expect("a row for each request");
        // The charge the client was told, to the picodollar.
        assert_eq!(row.get::<_, i64>("cost_pico"), cost.pico(), "{id}");
        assert_eq!(row.get::<_, bool>("streamed"), *stream);
        assert!(row.get::<_, bool>("complete"));
        assert_eq!(row.get::<_, i32>("status"), 200);
        assert_eq!(row.get::<_, Option<&str>>("model"), Some("test/model"));
        assert_eq!(row.get::<_, Option<&str>>("provider"), Some("alpha"));
        assert!(row.get::<_, Option<&str>>("key_id").is_some());
        let attempts: Value = serde_json::from_str(row.get("attempts")).unwrap();
        assert_eq!(attempts[0]["status"], "200");
    }
    let refused = rows
        .iter()
        .find(|r| r.get::<_, &str>("id") == missing)
        .unwrap();
    assert_eq!(refused.get::<_, i32>("status"), 404);
    assert_eq!(refused.get::<_, i64>("cost_pico"), 0);

    // The per-key, per-day query of docs/observability.md: exact sums.
    let day = client
        .query_one(
            "SELECT key_id,
                    to_char(to_timestamp(time_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day,
                    count(*) AS requests,
                    sum(cost_pico)::text AS pico,
                    (sum(cost_pico) / 1e12)::text AS usd
             FROM requests
             WHERE key_id IS NOT NULL
               AND time_ms >= (extract(epoch FROM now() - interval '1 day') * 1000)::bigint
             GROUP BY key_id, day
             ORDER BY day, key_id",
            &[],
        )
        .await
        .unwrap();
    let total = charged.iter().fold(Money::ZERO, |sum, c| sum + c.1);
    assert_eq!(day.get::<_, i64>("requests"), 3);
    assert_eq!(day.get::<_, String>("pico"), total.pico().to_string());
    let usd: Money = day.get::<_, String>("usd").parse().unwrap();
    assert_eq!(usd, total);
}

/// With a PostgreSQL store, the default sink (`sqlite`: "beside the store") has no
/// directory to put a file in: the log goes into the store's database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_sink_with_a_postgres_store_logs_into_its_database() {
    let Some(db) = switchboard::testing::postgres(
        "the_default_sink_with_a_postgres_store_logs_into_its_database",
    ) else {
        return;
    };
    let mut config =
        Config::from_toml(&openai_config(&[("alpha", "http://127.0.0.1:9")], "")).unwrap();
    assert_eq!(config.logging.sink, "sqlite", "the default");
    config.store.url = db.url().to_string();
    let writer = LogWriter::from_config(&config).unwrap();
    assert!(writer.is_enabled());
    let (client, conn) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
    loop {
        let n = client
            .query("SELECT 1 FROM pg_tables WHERE tablename = 'requests'", &[])
            .await
            .unwrap()
            .len();
        if n == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the request log's table was never made in the store's database"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(writer);
}
