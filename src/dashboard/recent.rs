//! `GET /admin/requests?limit=N`: the most recent requests of the request log,
//! metadata only (never the prompt or the completion), for the dashboard's table.
//!
//! Read from the SQLite request log through a read-only connection of its own (the
//! log's writer thread keeps its connection; WAL lets both run at once), or from the
//! PostgreSQL request log through a connection of its own (the `time_ms` index). A
//! log kept in memory or in JSONL cannot be read here: the route answers 404
//! `not_found` naming `[logging].sink`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::error::GatewayError;
use crate::money::Money;

/// The default number of rows of `GET /admin/requests`, and the most it returns.
pub const DEFAULT_LIMIT: usize = 50;
/// The most rows `GET /admin/requests` returns, whatever `limit` asks.
pub const MAX_LIMIT: usize = 500;

/// One request of `GET /admin/requests`: what the dashboard may show of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecentRequest {
    /// The gateway's request id.
    pub id: String,
    /// Arrival time, RFC 3339 (UTC, seconds).
    pub time: String,
    /// The key's id, when the request was authenticated.
    pub key_id: Option<String>,
    /// The key's name at the time of the request.
    pub key_name: Option<String>,
    /// The gateway model that served, else the one asked for.
    pub model: String,
    /// The provider that served.
    pub provider: Option<String>,
    /// The HTTP status sent.
    pub status: u16,
    /// The SPEC §3.2 error code, when it failed.
    pub error_code: Option<String>,
    /// The amount charged, USD.
    pub cost: Money,
    /// Arrival to the end of the response, milliseconds.
    pub latency_ms: u64,
    /// Arrival to the first content chunk, milliseconds.
    pub ttft_ms: Option<u64>,
    /// The `X-Title` of the app that sent it.
    pub app_title: Option<String>,
}

/// Where the request log can be read, as `[logging].sink` and `[store].url` say.
#[derive(Debug, Clone)]
pub enum RecentSource {
    /// A SQLite log file.
    Sqlite(PathBuf),
    /// The `requests` table of a PostgreSQL database (`[logging].sink = "postgres"`,
    /// or the default beside a PostgreSQL store).
    Postgres(Box<tokio_postgres::Config>),
    /// No readable log; the reason, for the error's message.
    Unavailable(String),
}

impl RecentSource {
    /// The source of the log `config` writes (the same choice as
    /// [`crate::logging::open_sink`]).
    pub fn from_config(config: &Config) -> RecentSource {
        let sink = config.logging.sink.as_str();
        let postgres = sink == "postgres"
            || (sink == "sqlite" && crate::store::is_postgres_url(&config.store.url));
        if postgres {
            return match config.store.url.parse::<tokio_postgres::Config>() {
                Ok(mut pg) => {
                    pg.connect_timeout(PG_TIMEOUT);
                    pg.application_name("switchboard dashboard");
                    RecentSource::Postgres(Box::new(pg))
                }
                Err(e) => RecentSource::Unavailable(format!(
                    "the request log's [store].url is not a PostgreSQL URL ({e})"
                )),
            };
        }
        if sink == "sqlite" {
            return match crate::logging::sqlite_path_beside_store(&config.store.url) {
                Some(path) => RecentSource::Sqlite(path),
                None => RecentSource::Unavailable(
                    "the request log is in memory ([logging].sink = \"sqlite\" with a store that is not a SQLite file): set [logging].sink = \"sqlite:PATH\"".into(),
                ),
            };
        }
        if let Some(path) = sink.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            return RecentSource::Sqlite(PathBuf::from(path));
        }
        RecentSource::Unavailable(format!(
            "[logging].sink = \"{sink}\" cannot be read back: recent requests need a SQLite request log"
        ))
    }

    /// The `limit` most recent requests, newest first (blocking: run it off the
    /// async threads).
    pub fn recent(&self, limit: usize) -> Result<Vec<RecentRequest>, GatewayError> {
        let path = match self {
            RecentSource::Sqlite(path) => path,
            RecentSource::Postgres(pg) => {
                // On a blocking thread of the runtime (the route's `spawn_blocking`).
                let rt = tokio::runtime::Handle::try_current()
                    .map_err(|e| GatewayError::Internal(format!("reading the request log: {e}")))?;
                let pg = (**pg).clone();
                return rt.block_on(async move {
                    tokio::time::timeout(PG_TIMEOUT, recent_postgres(&pg, limit))
                        .await
                        .unwrap_or_else(|_| {
                            Err(GatewayError::StoreUnavailable(format!(
                                "the request log in PostgreSQL did not answer within {PG_TIMEOUT:?}"
                            )))
                        })
                });
            }
            RecentSource::Unavailable(why) => return Err(GatewayError::NotFound(why.clone())),
        };
        let err = |e: rusqlite::Error| {
            GatewayError::Internal(format!("cannot read the request log: {e}"))
        };
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(2)).map_err(err)?;
        // Ids start with their time, so the primary key's order is time order.
        let mut stmt = conn
            .prepare(
                "SELECT id, time_ms, key_id, key_name, COALESCE(model, requested_model), provider,
                        status, error_code, cost_pico, latency_ms, ttft_ms, app_title
                 FROM requests ORDER BY time_ms DESC, id DESC LIMIT ?1",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([limit.min(MAX_LIMIT) as i64], |r| {
                let time_ms: i64 = r.get(1)?;
                Ok(RecentRequest {
                    id: r.get(0)?,
                    time: crate::clock::format_rfc3339((time_ms.max(0) / 1000) as u64),
                    key_id: r.get(2)?,
                    key_name: r.get(3)?,
                    model: r.get(4)?,
                    provider: r.get(5)?,
                    status: r.get::<_, i64>(6)?.clamp(0, 999) as u16,
                    error_code: r.get(7)?,
                    cost: Money::from_pico(r.get(8)?),
                    latency_ms: r.get::<_, i64>(9)?.max(0) as u64,
                    ttft_ms: r.get::<_, Option<i64>>(10)?.map(|t| t.max(0) as u64),
                    app_title: r.get(11)?,
                })
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }
}

/// How long a PostgreSQL read of the recent requests may take, connection included.
const PG_TIMEOUT: Duration = Duration::from_secs(10);

/// The same query on the PostgreSQL request log.
async fn recent_postgres(
    pg: &tokio_postgres::Config,
    limit: usize,
) -> Result<Vec<RecentRequest>, GatewayError> {
    let down = |e: tokio_postgres::Error| {
        GatewayError::StoreUnavailable(format!("the request log in PostgreSQL cannot be read: {e}"))
    };
    let (client, connection) = pg.connect(tokio_postgres::NoTls).await.map_err(down)?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    let rows = client
        .query(
            "SELECT id, time_ms, key_id, key_name, COALESCE(model, requested_model), provider,
                    status, error_code, cost_pico, latency_ms, ttft_ms, app_title
             FROM requests ORDER BY time_ms DESC, id DESC LIMIT $1",
            &[&(limit.min(MAX_LIMIT) as i64)],
        )
        .await
        .map_err(down)?;
    drop(client);
    let _ = task.await;
    let bad = |e: tokio_postgres::Error| GatewayError::Internal(format!("the request log: {e}"));
    rows.iter()
        .map(|r| {
            let time_ms: i64 = r.try_get(1).map_err(bad)?;
            Ok(RecentRequest {
                id: r.try_get(0).map_err(bad)?,
                time: crate::clock::format_rfc3339((time_ms.max(0) / 1000) as u64),
                key_id: r.try_get(2).map_err(bad)?,
                key_name: r.try_get(3).map_err(bad)?,
                model: r.try_get(4).map_err(bad)?,
                provider: r.try_get(5).map_err(bad)?,
                status: r.try_get::<_, i32>(6).map_err(bad)?.clamp(0, 999) as u16,
                error_code: r.try_get(7).map_err(bad)?,
                cost: Money::from_pico(r.try_get(8).map_err(bad)?),
                latency_ms: r.try_get::<_, i64>(9).map_err(bad)?.max(0) as u64,
                ttft_ms: r
                    .try_get::<_, Option<i64>>(10)
                    .map_err(bad)?
                    .map(|t| t.max(0) as u64),
                app_title: r.try_get(11).map_err(bad)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::{LogSink, RequestRecord, SqliteSink};

    fn record(id: &str, time_ms: u64, pico: i64) -> RequestRecord {
        RequestRecord {
            id: id.into(),
            time_ms,
            key_id: Some("k1".into()),
            requested_model: "m".into(),
            model: Some("test/model".into()),
            provider: Some("p".into()),
            attempts: vec![],
            status: 200,
            prompt_tokens: 1,
            completion_tokens: 2,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost: Money::from_pico(pico),
            latency_ms: 12,
            ttft_ms: Some(5),
            streamed: false,
            complete: true,
            finish_reason: None,
            error_code: None,
            prompt: Some(serde_json::json!("secret prompt")),
            completion: Some("secret completion".into()),
            over_reserve: false,
            app_url: None,
            app_title: Some("app".into()),
            cache_hit: false,
            key_name: Some("<b>name</b>".into()),
            key_labels: None,
            client_ip: None,
        }
    }

    #[test]
    fn newest_first_bounded_and_without_content() {
        let dir = std::env::temp_dir().join(format!("sb-recent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("log.db");
        let mut sink = SqliteSink::open(&path).unwrap();
        sink.write(&[
            record("a", 1_000, 5),
            record("b", 2_000, 7),
            record("c", 3_000, 11),
        ])
        .unwrap();
        let source = RecentSource::Sqlite(path);
        let got = source.recent(2).unwrap();
        assert_eq!(
            got.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["c", "b"]
        );
        assert_eq!(got[0].cost, Money::from_pico(11));
        assert_eq!(got[0].time, "1970-01-01T00:00:03Z");
        let text = serde_json::to_string(&got).unwrap();
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("<b>name</b>"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unreadable_sink_is_a_clear_404() {
        let mut config = Config::demo();
        config.logging.sink = "jsonl:/tmp/x.jsonl".into();
        let e = RecentSource::from_config(&config).recent(5).unwrap_err();
        assert!(e.to_string().contains("[logging].sink"), "{e}");
    }
}
