//! [`UsageSource`]: usage aggregated from the request log, in SQL, for
//! `GET /admin/usage` (SPEC §9): [`SqliteUsage`] reads the SQLite log on a read-only
//! connection of its own (WAL lets it read while the writer thread writes), and
//! [`PostgresUsage`] the `requests` table of the PostgreSQL log. A JSONL log cannot
//! answer (its sink provides no source).
//!
//! Everything is computed by the database over the rows of the range (the `time_ms`
//! index): counts, token sums, the cost as an integer sum of `cost_pico` (exact,
//! never a float), and nearest-rank percentiles (the value at rank ⌈p·n⌉ of the
//! group's values in ascending order): PostgreSQL's `percentile_disc`, SQLite's
//! `ROW_NUMBER()` and `COUNT()` over each group. At most [`UsageQuery::limit`] groups
//! come back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::error::GatewayError;
use crate::money::Money;

/// What usage may be grouped by (`group_by=` of `GET /admin/usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// The key: `key_id`, with a `key_name` it had in the range.
    Key,
    /// The model that served, else the one asked for: `model`.
    Model,
    /// The provider that served (`null` when none did): `provider`.
    Provider,
    /// The app: `app_title` and `app_url` (`X-Title`, `HTTP-Referer`).
    App,
    /// The UTC hour the request arrived in: `hour` (its start, RFC 3339).
    Hour,
    /// The UTC day the request arrived on: `day` (its start, RFC 3339).
    Day,
}

impl std::str::FromStr for GroupBy {
    type Err = String;

    fn from_str(s: &str) -> Result<GroupBy, String> {
        Ok(match s {
            "key" => GroupBy::Key,
            "model" => GroupBy::Model,
            "provider" => GroupBy::Provider,
            "app" => GroupBy::App,
            "hour" => GroupBy::Hour,
            "day" => GroupBy::Day,
            other => {
                return Err(format!(
                    "`{other}` is not one of key, model, provider, app, hour, day"
                ))
            }
        })
    }
}

/// How a grouping column is read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnType {
    /// Text, or `NULL`.
    Text,
    /// Unix milliseconds of a bucket's start, written as RFC 3339.
    Time,
}

/// A column a group is made of, or one it carries: its name in the answer, its SQL.
struct Column {
    name: &'static str,
    sql: &'static str,
    ty: ColumnType,
}

impl GroupBy {
    /// The columns that make the group.
    fn columns(self) -> &'static [Column] {
        const fn text(name: &'static str, sql: &'static str) -> Column {
            Column {
                name,
                sql,
                ty: ColumnType::Text,
            }
        }
        const KEY: [Column; 1] = [text("key_id", "key_id")];
        const MODEL: [Column; 1] = [text("model", "COALESCE(model, requested_model)")];
        const PROVIDER: [Column; 1] = [text("provider", "provider")];
        const APP: [Column; 2] = [text("app_title", "app_title"), text("app_url", "app_url")];
        const HOUR: [Column; 1] = [Column {
            name: "hour",
            sql: "(time_ms / 3600000) * 3600000",
            ty: ColumnType::Time,
        }];
        const DAY: [Column; 1] = [Column {
            name: "day",
            sql: "(time_ms / 86400000) * 86400000",
            ty: ColumnType::Time,
        }];
        match self {
            GroupBy::Key => &KEY,
            GroupBy::Model => &MODEL,
            GroupBy::Provider => &PROVIDER,
            GroupBy::App => &APP,
            GroupBy::Hour => &HOUR,
            GroupBy::Day => &DAY,
        }
    }

    /// What the group carries besides (an aggregate over its rows).
    fn carried(self) -> &'static [Column] {
        match self {
            GroupBy::Key => &[Column {
                name: "key_name",
                sql: "MAX(key_name)",
                ty: ColumnType::Text,
            }],
            _ => &[],
        }
    }

    fn is_time(self) -> bool {
        matches!(self, GroupBy::Hour | GroupBy::Day)
    }
}

/// One question to a [`UsageSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// One or two groupings, different from each other.
    pub group_by: Vec<GroupBy>,
    /// Records that arrived at or after this, Unix milliseconds…
    pub from_ms: u64,
    /// …and before this.
    pub to_ms: u64,
    /// The most groups returned: ordered by time (oldest first) when grouped by
    /// `hour` or `day`, else by cost, then requests, descending.
    pub limit: usize,
}

/// One group's value of one of its columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupValue {
    /// A text column (`NULL`: `None`).
    Text(Option<String>),
    /// A bucket's start, Unix milliseconds.
    Time(u64),
}

/// One group's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// The group: each column's name and value, in the order of `group_by`.
    pub group: Vec<(&'static str, GroupValue)>,
    /// Records in the group.
    pub requests: u64,
    /// Those that failed: status ≥ 400 (499 included: the client left before the
    /// answer), or an error code (a stream that failed after its 200).
    pub errors: u64,
    /// Prompt tokens charged.
    pub prompt_tokens: u64,
    /// Completion tokens charged.
    pub completion_tokens: u64,
    /// The sum of the charges, exact.
    pub cost: Money,
    /// Nearest-rank median of `latency_ms`.
    pub latency_ms_p50: Option<u64>,
    /// Nearest-rank 95th percentile of `latency_ms`.
    pub latency_ms_p95: Option<u64>,
    /// Nearest-rank median of `ttft_ms` over the records that have one.
    pub ttft_ms_p50: Option<u64>,
}

/// What answers usage questions from a request log; given by the log's sink
/// ([`LogSink::usage_source`](super::LogSink::usage_source)) and held by its
/// [`LogWriter`](super::LogWriter). Queries run off the async threads (a blocking
/// task, or an async database client).
pub trait UsageSource: Send + Sync + 'static {
    /// The groups of `query`, aggregated by the database.
    fn query(&self, query: UsageQuery) -> BoxFuture<'static, Result<Vec<UsageRow>, GatewayError>>;
}

/// The errors column: failed requests.
const ERROR_SQL: &str = "CASE WHEN status >= 400 OR error_code IS NOT NULL THEN 1 ELSE 0 END";

/// The grouping columns (`g0`, `g1`, …) and carried columns of `query`, in order.
fn layout(query: &UsageQuery) -> (Vec<&'static Column>, Vec<&'static Column>) {
    let groups = query.group_by.iter().flat_map(|g| g.columns()).collect();
    let carried = query.group_by.iter().flat_map(|g| g.carried()).collect();
    (groups, carried)
}

/// `ORDER BY …` of `query` over the grouping columns `g0…`.
fn order_by(query: &UsageQuery) -> String {
    let mut keys: Vec<String> = Vec::new();
    let mut i = 0;
    for g in &query.group_by {
        for _ in g.columns() {
            if g.is_time() {
                keys.push(format!("g{i} ASC"));
            }
            i += 1;
        }
    }
    keys.push("cost DESC".into());
    keys.push("requests DESC".into());
    // Ties in a stable order.
    keys.extend((0..i).map(|i| format!("g{i}")));
    keys.join(", ")
}

fn list(n: usize) -> String {
    (0..n)
        .map(|i| format!("g{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The pieces both statements are built from.
struct Parts {
    /// The group columns' aliases, `g0, g1`.
    g: String,
    /// The group expressions with their aliases, each followed by `, `.
    base_groups: String,
    /// The columns carried along with the groups (e.g. `key_name`), each followed by
    /// `, `.
    carried_sql: String,
}

fn parts(query: &UsageQuery) -> Parts {
    let (groups, carried) = layout(query);
    let g = list(groups.len());
    let base_groups: String = groups
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} AS g{i}, ", c.sql))
        .collect();
    let carried_sql: String = carried.iter().map(|c| format!("{}, ", c.sql)).collect();
    Parts {
        g,
        base_groups,
        carried_sql,
    }
}

/// The SQLite statement: `?1` from, `?2` to, `?3` limit.
fn sqlite_sql(query: &UsageQuery) -> String {
    let Parts {
        g,
        base_groups,
        carried_sql,
    } = parts(query);
    format!(
        "WITH base AS (
           SELECT {base_groups}key_name, status, error_code, prompt_tokens, completion_tokens,
                  cost_pico, latency_ms, ttft_ms
           FROM requests WHERE time_ms >= ?1 AND time_ms < ?2),
         ranked AS (
           SELECT *,
             ROW_NUMBER() OVER (PARTITION BY {g} ORDER BY latency_ms) AS l_rn,
             COUNT(*) OVER (PARTITION BY {g}) AS l_n,
             ROW_NUMBER() OVER (PARTITION BY {g}, ttft_ms IS NULL ORDER BY ttft_ms) AS t_rn,
             COUNT(ttft_ms) OVER (PARTITION BY {g}) AS t_n
           FROM base)
         SELECT {g}, {carried_sql}
           COUNT(*) AS requests, SUM({ERROR_SQL}), SUM(prompt_tokens), SUM(completion_tokens),
           SUM(cost_pico) AS cost,
           MAX(CASE WHEN l_rn = (l_n * 50 + 99) / 100 THEN latency_ms END),
           MAX(CASE WHEN l_rn = (l_n * 95 + 99) / 100 THEN latency_ms END),
           MAX(CASE WHEN ttft_ms IS NOT NULL AND t_rn = (t_n * 50 + 99) / 100 THEN ttft_ms END)
         FROM ranked GROUP BY {g} ORDER BY {order} LIMIT ?3",
        order = order_by(query),
    )
}

/// The PostgreSQL statement: `$1` from, `$2` to, `$3` limit.
fn postgres_sql(query: &UsageQuery) -> String {
    let Parts {
        g,
        base_groups,
        carried_sql,
    } = parts(query);
    format!(
        "SELECT {g}, {carried_sql}
           COUNT(*) AS requests, SUM({ERROR_SQL})::bigint, SUM(prompt_tokens)::bigint,
           SUM(completion_tokens)::bigint, SUM(cost_pico)::bigint AS cost,
           percentile_disc(0.5) WITHIN GROUP (ORDER BY latency_ms),
           percentile_disc(0.95) WITHIN GROUP (ORDER BY latency_ms),
           percentile_disc(0.5) WITHIN GROUP (ORDER BY ttft_ms)
         FROM (SELECT {base_groups}key_name, status, error_code, prompt_tokens,
                      completion_tokens, cost_pico, latency_ms, ttft_ms
               FROM requests WHERE time_ms >= $1 AND time_ms < $2) AS base
         GROUP BY {g} ORDER BY {order} LIMIT $3",
        order = order_by(query),
    )
}

/// A count read back: a negative one (never written) reads as 0.
fn count(v: Option<i64>) -> u64 {
    v.map_or(0, |v| u64::try_from(v).unwrap_or(0))
}

/// Builds a row from its values read in statement order (`get(i)` as integer or text).
fn row(
    query: &UsageQuery,
    int: impl Fn(usize) -> Result<Option<i64>, String>,
    text: impl Fn(usize) -> Result<Option<String>, String>,
) -> Result<UsageRow, String> {
    let (groups, carried) = layout(query);
    let mut group = Vec::with_capacity(groups.len() + carried.len());
    let mut i = 0;
    let mut carried_at = groups.len();
    for g in &query.group_by {
        for c in g.columns() {
            let v = match c.ty {
                ColumnType::Text => GroupValue::Text(text(i)?),
                ColumnType::Time => GroupValue::Time(count(int(i)?)),
            };
            group.push((c.name, v));
            i += 1;
        }
        for c in g.carried() {
            group.push((c.name, GroupValue::Text(text(carried_at)?)));
            carried_at += 1;
        }
    }
    let at = groups.len() + carried.len();
    let opt = |v: Option<i64>| v.map(|v| u64::try_from(v).unwrap_or(0));
    Ok(UsageRow {
        group,
        requests: count(int(at)?),
        errors: count(int(at + 1)?),
        prompt_tokens: count(int(at + 2)?),
        completion_tokens: count(int(at + 3)?),
        cost: Money::from_pico(int(at + 4)?.unwrap_or(0)),
        latency_ms_p50: opt(int(at + 5)?),
        latency_ms_p95: opt(int(at + 6)?),
        ttft_ms_p50: opt(int(at + 7)?),
    })
}

fn limit(query: &UsageQuery) -> i64 {
    i64::try_from(query.limit).unwrap_or(i64::MAX)
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Usage from a SQLite request log file, on a read-only connection opened per query
/// in a blocking task.
#[derive(Debug, Clone)]
pub struct SqliteUsage {
    path: PathBuf,
}

impl SqliteUsage {
    /// A source reading the log at `path` (written by a [`SqliteSink`](super::SqliteSink)).
    pub fn new(path: PathBuf) -> SqliteUsage {
        SqliteUsage { path }
    }

    /// Runs `query` now, on this thread.
    pub fn query_blocking(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, GatewayError> {
        use rusqlite::OpenFlags;
        let fail = |e: rusqlite::Error| {
            GatewayError::Internal(format!(
                "the request log {} cannot be read: {e}",
                self.path.display()
            ))
        };
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(fail)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(fail)?;
        let mut stmt = conn.prepare(&sqlite_sql(query)).map_err(fail)?;
        let mut rows = stmt
            .query(rusqlite::params![
                ms(query.from_ms),
                ms(query.to_ms),
                limit(query)
            ])
            .map_err(fail)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(fail)? {
            out.push(
                row(
                    query,
                    |i| r.get::<_, Option<i64>>(i).map_err(|e| e.to_string()),
                    |i| r.get::<_, Option<String>>(i).map_err(|e| e.to_string()),
                )
                .map_err(GatewayError::Internal)?,
            );
        }
        Ok(out)
    }
}

impl UsageSource for SqliteUsage {
    fn query(&self, query: UsageQuery) -> BoxFuture<'static, Result<Vec<UsageRow>, GatewayError>> {
        let this = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.query_blocking(&query))
                .await
                .map_err(|e| GatewayError::Internal(format!("usage query task failed: {e}")))?
        })
    }
}

/// How long a usage query on PostgreSQL may take (connecting included).
const POSTGRES_TIMEOUT: Duration = Duration::from_secs(30);

/// Usage from the PostgreSQL request log: a connection of its own per query, driven
/// on the caller's runtime (the query is async: no thread waits on it).
#[derive(Clone)]
pub struct PostgresUsage {
    config: Arc<tokio_postgres::Config>,
    target: String,
}

impl std::fmt::Debug for PostgresUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresUsage")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl PostgresUsage {
    /// A source for the database of `config` (`target`: `host:port/db`, for messages).
    pub fn new(config: tokio_postgres::Config, target: String) -> PostgresUsage {
        PostgresUsage {
            config: Arc::new(config),
            target,
        }
    }

    async fn run(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, GatewayError> {
        let down = |e: tokio_postgres::Error| {
            GatewayError::StoreUnavailable(format!(
                "the request log in PostgreSQL at {} cannot be read: {e}",
                self.target
            ))
        };
        let (client, connection) = self
            .config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(down)?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        let rows = client
            .query(
                &postgres_sql(query),
                &[&ms(query.from_ms), &ms(query.to_ms), &limit(query)],
            )
            .await
            .map_err(|e| match e.as_db_error() {
                Some(db) => GatewayError::Internal(format!(
                    "the request log in PostgreSQL at {}: {}",
                    self.target,
                    db.message()
                )),
                None => down(e),
            })?;
        drop(client);
        let _ = task.await;
        rows.iter()
            .map(|r| {
                row(
                    query,
                    |i| r.try_get::<_, Option<i64>>(i).map_err(|e| e.to_string()),
                    |i| r.try_get::<_, Option<String>>(i).map_err(|e| e.to_string()),
                )
                .map_err(GatewayError::Internal)
            })
            .collect()
    }
}

impl UsageSource for PostgresUsage {
    fn query(&self, query: UsageQuery) -> BoxFuture<'static, Result<Vec<UsageRow>, GatewayError>> {
        let this = self.clone();
        Box::pin(async move {
            match tokio::time::timeout(POSTGRES_TIMEOUT, this.run(&query)).await {
                Ok(r) => r,
                Err(_) => Err(GatewayError::StoreUnavailable(format!(
                    "the request log in PostgreSQL at {} did not answer within {POSTGRES_TIMEOUT:?}",
                    this.target
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::CallContext;
    use crate::logging::{LogSink, RequestRecord, SqliteSink};

    fn record(i: u64, key: &str, latency: u64, ttft: Option<u64>, status: u16) -> RequestRecord {
        let mut r = RequestRecord::from_context(
            &CallContext::with_id(format!("gen-{i:04}")),
            Duration::ZERO,
            true,
            false,
        );
        r.time_ms = 1_000_000 + i * 1000;
        r.key_id = Some(key.into());
        r.key_name = Some(format!("name-{key}"));
        r.model = Some("m/x".into());
        r.latency_ms = latency;
        r.ttft_ms = ttft;
        r.status = status;
        r.cost = Money::from_pico(i as i64 * 1_000_001);
        r
    }

    /// The value at rank ⌈p·n/100⌉ (1-based) of the sorted values.
    fn nearest_rank(mut v: Vec<u64>, p: usize) -> Option<u64> {
        v.sort_unstable();
        let n = v.len();
        (n > 0).then(|| v[(n * p).div_ceil(100) - 1])
    }

    #[test]
    fn sqlite_percentiles_are_nearest_rank_per_group_and_costs_exact() {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-usage-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let path = dir.join("log.db");
        let mut sink = SqliteSink::open(&path).unwrap();
        // Group sizes 1, 2, 7 and 20 (ranks at their edges), unsorted latencies.
        let mut records = Vec::new();
        let mut i = 0;
        for (key, n) in [("a", 1u64), ("b", 2), ("c", 7), ("d", 20)] {
            for j in 0..n {
                i += 1;
                let latency = (j * 37 + 11) % 101;
                let ttft = (j % 3 != 0).then_some(latency / 2);
                let status = if j == 1 { 502 } else { 200 };
                records.push(record(i, key, latency, ttft, status));
            }
        }
        sink.write(&records).unwrap();
        let usage = SqliteUsage::new(path.clone());
        let q = UsageQuery {
            group_by: vec![GroupBy::Key],
            from_ms: 0,
            to_ms: u64::MAX / 2,
            limit: 1000,
        };
        let rows = usage.query_blocking(&q).unwrap();
        assert_eq!(rows.len(), 4);
        for r in &rows {
            let GroupValue::Text(Some(key)) = &r.group[0].1 else {
                panic!("{r:?}")
            };
            let mine: Vec<&RequestRecord> = records
                .iter()
                .filter(|x| x.key_id.as_deref() == Some(key))
                .collect();
            let lat: Vec<u64> = mine.iter().map(|x| x.latency_ms).collect();
            let ttft: Vec<u64> = mine.iter().filter_map(|x| x.ttft_ms).collect();
            let cost = mine.iter().map(|x| x.cost.pico()).sum::<i64>();
            assert_eq!(
                r.group[1],
                ("key_name", GroupValue::Text(Some(format!("name-{key}"))))
            );
            assert_eq!(r.requests, mine.len() as u64, "{key}");
            assert_eq!(
                r.errors,
                mine.iter().filter(|x| x.status >= 400).count() as u64
            );
            assert_eq!(r.cost, Money::from_pico(cost), "{key}");
            assert_eq!(r.latency_ms_p50, nearest_rank(lat.clone(), 50), "{key}");
            assert_eq!(r.latency_ms_p95, nearest_rank(lat, 95), "{key}");
            assert_eq!(r.ttft_ms_p50, nearest_rank(ttft, 50), "{key}");
        }
        // Ordered by cost, descending.
        let costs: Vec<i64> = rows.iter().map(|r| r.cost.pico()).collect();
        let mut sorted = costs.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(costs, sorted);
        // A range and a limit.
        let q = UsageQuery {
            group_by: vec![GroupBy::Model],
            from_ms: 1_000_000 + 2 * 1000,
            to_ms: 1_000_000 + 4 * 1000,
            limit: 1,
        };
        let rows = usage.query_blocking(&q).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].requests, 2, "records 2 and 3");
        drop(sink);
        let _ = std::fs::remove_dir_all(dir);
    }
}
