//! Tests of [`PostgresSink`] against a real PostgreSQL (`crate::testing::postgres`:
//! a database of each test's own), and of the writer around it when the server is
//! unreachable.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::context::CallContext;
use crate::logging::{AttemptLog, LogWriter, SqliteSink, MAX_BATCH, SQLITE_SCHEMA};
use crate::money::Money;

/// Generous bound around anything that crosses a real socket (busy 2-core machine).
const PATIENCE: Duration = Duration::from_secs(30);

fn record(id: &str) -> RequestRecord {
    let mut r = RequestRecord::from_context(
        &CallContext::with_id(id.to_string()),
        Duration::ZERO,
        true,
        false,
    );
    r.requested_model = "test/model".into();
    r
}

/// Records that use every column, with values at their edges.
fn varied() -> Vec<RequestRecord> {
    let mut out = Vec::new();
    let mut a = record("gen-a");
    a.time_ms = 1_700_000_000_123;
    a.key_id = Some("key_alice".into());
    a.model = Some("test/model".into());
    a.provider = Some("alpha".into());
    a.attempts = vec![
        AttemptLog {
            provider: "beta \"quoted\" é😀".into(),
            model: "test/model".into(),
            status: "503".into(),
            latency_ms: 12,
        },
        AttemptLog {
            provider: "alpha".into(),
            model: "test/model".into(),
            status: "200".into(),
            latency_ms: u64::MAX,
        },
    ];
    a.status = 200;
    a.prompt_tokens = 1234;
    a.completion_tokens = 5678;
    a.cached_tokens = 34;
    a.reasoning_tokens = 78;
    // Odd picodollars: exact to the unit, not through a float.
    a.cost = Money::from_pico(123_456_789_012_345);
    a.latency_ms = 987;
    a.ttft_ms = Some(65);
    a.streamed = true;
    a.complete = true;
    a.finish_reason = Some("stop".into());
    a.prompt = Some(serde_json::json!([{"role": "user", "content": "hi \"there\"\n"}]));
    a.completion = Some("The answer\twith a tab, 'quotes' and ünïcödé".into());
    a.over_reserve = true;
    a.app_url = Some("https://app.example/path?q=1".into());
    a.app_title = Some("Ünïcode \"App\"".into());
    out.push(a);
    // A response-cache hit: free, no attempts.
    let mut h = record("gen-h");
    h.status = 200;
    h.key_id = Some("key_alice".into());
    h.model = Some("test/model".into());
    h.provider = Some("alpha".into());
    h.complete = true;
    h.cache_hit = true;
    out.push(h);
    let mut b = record("gen-b");
    b.status = 402;
    b.error_code = Some("insufficient_credits".into());
    b.complete = false;
    // Past i64::MAX: both logs keep i64::MAX.
    b.prompt_tokens = u64::MAX;
    b.latency_ms = u64::MAX;
    b.cost = Money::from_pico(i64::MAX);
    out.push(b);
    let mut c = record("gen-c");
    c.status = 499;
    c.key_id = Some("key_bob".into());
    c.cost = Money::from_pico(1);
    c.ttft_ms = Some(0);
    out.push(c);
    out
}

/// The column names of a `CREATE TABLE` text, in order.
fn column_names(schema: &str) -> Vec<String> {
    let body = schema.split_once('(').unwrap().1;
    let body = &body[..body.find("\n)").unwrap()];
    body.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_postgres_table_has_the_sqlite_columns_in_order() {
    let sqlite = column_names(SQLITE_SCHEMA);
    assert_eq!(sqlite.len(), 28);
    assert_eq!(column_names(POSTGRES_SCHEMA), sqlite);
    let inserted: Vec<String> = INSERT
        .split_once('(')
        .unwrap()
        .1
        .split_once(')')
        .unwrap()
        .0
        .split(", ")
        .map(str::to_string)
        .collect();
    assert_eq!(inserted, sqlite);
    assert_eq!(Rows::new(&varied()).params().len(), sqlite.len());
}

/// Runs `f` with a client of the database at `url`, on a runtime of its own.
fn with_client<T: Send + 'static>(
    url: &str,
    f: impl FnOnce(Client) -> futures_util::future::BoxFuture<'static, T> + Send + 'static,
) -> T {
    let url = url.to_string();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
                tokio::spawn(conn);
                f(client).await
            })
    })
    .join()
    .unwrap()
}

/// Every row of `sql` as text (`simple_query`: PostgreSQL's own text of each value).
fn pg_rows(url: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    let sql = sql.to_string();
    with_client(url, move |c| {
        Box::pin(async move {
            c.simple_query(&sql)
                .await
                .unwrap()
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                    }
                    _ => None,
                })
                .collect()
        })
    })
}

fn pg_exec(url: &str, sql: &str) {
    let sql = sql.to_string();
    with_client(url, move |c| {
        Box::pin(async move { c.batch_execute(&sql).await.unwrap() })
    });
}

fn pg_count(url: &str, filter: &str) -> i64 {
    pg_rows(
        url,
        &format!("SELECT count(*) FROM requests WHERE {filter}"),
    )[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

/// A started sink (connected, table made) for `url`.
fn started(url: &str) -> PostgresSink {
    let mut sink = PostgresSink::open(url).unwrap();
    sink.start();
    assert!(sink.conn.is_some(), "the sink connects at start");
    sink
}

#[test]
fn postgres_rows_hold_what_sqlite_rows_hold_to_the_picodollar() {
    let Some(db) = crate::testing::postgres("postgres_rows_hold_what_sqlite_rows_hold") else {
        return;
    };
    let records = varied();
    let mut pg = started(db.url());
    pg.write(&records).unwrap();
    let mut lite = SqliteSink::memory().unwrap();
    lite.write(&records).unwrap();

    let columns = column_names(SQLITE_SCHEMA);
    let pg_got = pg_rows(
        db.url(),
        &format!("SELECT {} FROM requests ORDER BY id", columns.join(", ")),
    );
    let mut stmt = lite
        .connection()
        .prepare(&format!(
            "SELECT {} FROM requests ORDER BY id",
            columns.join(", ")
        ))
        .unwrap();
    let lite_got: Vec<Vec<Option<String>>> = stmt
        .query_map([], |r| {
            Ok((0..columns.len())
                .map(|i| match r.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Null => None,
                    rusqlite::types::ValueRef::Integer(n) => Some(n.to_string()),
                    rusqlite::types::ValueRef::Text(t) => {
                        Some(String::from_utf8(t.to_vec()).unwrap())
                    }
                    other => panic!("unexpected SQLite value {other:?}"),
                })
                .collect())
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(pg_got.len(), 4);
    // Flags are BOOLEAN in PostgreSQL (t / f), 1 / 0 in SQLite; everything else is
    // the same text.
    let flags = ["streamed", "complete", "over_reserve", "cache_hit"];
    for (p, l) in pg_got.iter().zip(&lite_got) {
        for (i, name) in columns.iter().enumerate() {
            let pv = p[i]
                .as_deref()
                .map(|v| match (flags.contains(&name.as_str()), v) {
                    (true, "t") => "1",
                    (true, "f") => "0",
                    _ => v,
                });
            assert_eq!(pv, l[i].as_deref(), "column {name} of {:?}", p[0]);
        }
    }
    // Attribution, as sent.
    let app = columns.iter().position(|c| c == "app_url").unwrap();
    assert_eq!(
        pg_got[0][app].as_deref(),
        Some("https://app.example/path?q=1")
    );
    assert_eq!(pg_got[0][app + 1].as_deref(), Some("Ünïcode \"App\""));
    assert_eq!(pg_got[1][app], None);
    // Money to the unit (rows by id: gen-a, gen-b, gen-c, gen-h).
    assert_eq!(pg_got[0][11].as_deref(), Some("123456789012345"));
    assert_eq!(pg_got[1][11].as_deref(), Some(&*i64::MAX.to_string()));
    assert_eq!(pg_got[2][11].as_deref(), Some("1"));
    // The cache hit, and only it, is flagged in both.
    let hit = columns.iter().position(|c| c == "cache_hit").unwrap();
    let flagged = |rows: &[Vec<Option<String>>], yes: &str| -> Vec<usize> {
        (0..rows.len())
            .filter(|&i| rows[i][hit].as_deref() == Some(yes))
            .collect()
    };
    assert_eq!(flagged(&pg_got, "t"), [3]);
    assert_eq!(flagged(&lite_got, "1"), [3]);
}

#[test]
fn a_batch_is_one_transaction_and_a_batch_written_again_doubles_nothing() {
    let Some(db) = crate::testing::postgres("a_batch_is_one_transaction") else {
        return;
    };
    let mut sink = started(db.url());
    // A constraint the 4th record of the next batch breaks: the server refuses it.
    pg_exec(
        db.url(),
        "ALTER TABLE requests ADD CONSTRAINT no_598 CHECK (status <> 598)",
    );
    let mut batch: Vec<RequestRecord> = (0..10).map(|i| record(&format!("gen-x{i}"))).collect();
    batch[3].status = 598;
    let err = sink.write(&batch).unwrap_err();
    assert!(err.to_string().contains("no_598"), "{err}");
    assert!(
        !sink.retry(&err),
        "a refused row is the data's fault: not retried"
    );
    assert_eq!(
        pg_count(db.url(), "id LIKE 'gen-x%'"),
        0,
        "none of the batch"
    );

    batch[3].status = 200;
    sink.write(&batch).unwrap();
    assert_eq!(pg_count(db.url(), "id LIKE 'gen-x%'"), 10);
    // One transaction: every row of the batch has the same inserting transaction.
    let xmins = pg_rows(
        db.url(),
        "SELECT count(DISTINCT xmin::text) FROM requests WHERE id LIKE 'gen-x%'",
    );
    assert_eq!(xmins[0][0].as_deref(), Some("1"));
    // Written again (an answer lost after the commit), and an id twice in one batch:
    // the first try's `COPY` is refused whole, the `ON CONFLICT` insert skips them.
    let mut again = batch.clone();
    again.push(record("gen-x0"));
    again.push(record("gen-y"));
    sink.write(&again).unwrap();
    assert_eq!(pg_count(db.url(), "id LIKE 'gen-x%'"), 10);
    assert_eq!(pg_count(db.url(), "id = 'gen-y'"), 1);
    // A batch the `COPY` sends in many chunks, one of its records written before (the
    // last): refused whole, then written once each.
    let first: Vec<RequestRecord> = (0..400).map(|i| record(&format!("gen-z{i}"))).collect();
    sink.write(&first).unwrap();
    let mut second: Vec<RequestRecord> = (0..400).map(|i| record(&format!("gen-w{i}"))).collect();
    second.push(record("gen-z399"));
    sink.write(&second).unwrap();
    assert_eq!(pg_count(db.url(), "id LIKE 'gen-z%'"), 400);
    assert_eq!(pg_count(db.url(), "id LIKE 'gen-w%'"), 400);
}

#[test]
fn the_logs_commits_do_not_wait_for_the_wal_flush_but_other_sessions_do() {
    let Some(db) = crate::testing::postgres("the_logs_commits_do_not_wait") else {
        return;
    };
    let mut sink = started(db.url());
    let rt = sink.take_runtime().unwrap();
    let conn = sink.conn.as_ref().unwrap();
    let setting = rt.block_on(async {
        let row = conn
            .client
            .query_one("SHOW synchronous_commit", &[])
            .await
            .unwrap();
        row.get::<_, String>(0)
    });
    sink.rt = Some(rt);
    assert_eq!(setting, "off", "the log's own session");
    // Only that session: the database's default (the ledger's connections) is kept.
    let other = pg_rows(db.url(), "SHOW synchronous_commit");
    assert_eq!(other[0][0].as_deref(), Some("on"));
    sink.write(&[record("gen-async")]).unwrap();
    assert_eq!(pg_count(db.url(), "id = 'gen-async'"), 1);
}

#[test]
fn a_nul_in_a_text_is_kept_as_a_replacement_character_not_a_lost_batch() {
    let Some(db) = crate::testing::postgres("a_nul_in_a_text") else {
        return;
    };
    let mut sink = started(db.url());
    let mut r = record("gen-nul");
    r.requested_model = "odd\0model".into();
    r.completion = Some("a\0b".into());
    sink.write(&[r, record("gen-fine")]).unwrap();
    let got = pg_rows(
        db.url(),
        "SELECT requested_model, completion FROM requests WHERE id = 'gen-nul'",
    );
    assert_eq!(got[0][0].as_deref(), Some("odd\u{FFFD}model"));
    assert_eq!(got[0][1].as_deref(), Some("a\u{FFFD}b"));
    assert_eq!(pg_count(db.url(), "true"), 2);
}

#[test]
fn a_requests_table_made_before_attribution_gets_its_columns() {
    let Some(db) = crate::testing::postgres("a_requests_table_made_before_attribution") else {
        return;
    };
    // The table as a gateway before `app_url`, `app_title` and `cache_hit` made it.
    let old = POSTGRES_SCHEMA
        .replace(
            ",\n    key_name          TEXT,\n    key_labels        TEXT,\n    client_ip         TEXT",
            "",
        )
        .replace("ALTER TABLE requests ADD COLUMN IF NOT EXISTS key_name TEXT;", "")
        .replace("ALTER TABLE requests ADD COLUMN IF NOT EXISTS key_labels TEXT;", "")
        .replace("ALTER TABLE requests ADD COLUMN IF NOT EXISTS client_ip TEXT;", "")
        .replace(
            ",\n    app_url           TEXT,\n    app_title         TEXT,\n    cache_hit         BOOLEAN NOT NULL DEFAULT false",
            "",
        )
        .replace(
            "ALTER TABLE requests ADD COLUMN IF NOT EXISTS app_url TEXT;",
            "",
        )
        .replace(
            "ALTER TABLE requests ADD COLUMN IF NOT EXISTS app_title TEXT;",
            "",
        )
        .replace(
            "ALTER TABLE requests ADD COLUMN IF NOT EXISTS cache_hit BOOLEAN NOT NULL DEFAULT false;",
            "",
        );
    assert!(
        !old.contains("app_") && !old.contains("cache_hit") && !old.contains("key_name"),
        "{old}"
    );
    pg_exec(db.url(), &old);
    pg_exec(
        db.url(),
        "INSERT INTO requests (id, time_ms, requested_model, status, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_pico, latency_ms, streamed, complete, attempts)
         VALUES ('gen-old', 1, 'm/x', 200, 0, 0, 0, 0, 0, 1, false, true, '[]')",
    );
    let mut sink = started(db.url());
    let mut r = record("gen-new");
    r.app_url = Some("https://app.example/".into());
    r.app_title = Some("The App".into());
    r.cache_hit = true;
    r.key_name = Some("alice".into());
    sink.write(&[r]).unwrap();
    let named = pg_rows(
        db.url(),
        "SELECT key_name FROM requests WHERE id = 'gen-new'",
    );
    assert_eq!(named, [vec![Some("alice".to_string())]]);
    let got = pg_rows(
        db.url(),
        "SELECT id, app_url, app_title, cache_hit FROM requests ORDER BY id",
    );
    assert_eq!(
        got,
        [
            vec![
                Some("gen-new".to_string()),
                Some("https://app.example/".to_string()),
                Some("The App".to_string()),
                Some("t".to_string())
            ],
            vec![
                Some("gen-old".to_string()),
                None,
                None,
                Some("f".to_string())
            ],
        ]
    );
}

#[test]
fn sinks_starting_at_once_make_one_table_without_an_error() {
    let Some(db) = crate::testing::postgres("sinks_starting_at_once") else {
        return;
    };
    let url = db.url().to_string();
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut sink = PostgresSink::open(&url).unwrap();
                barrier.wait();
                sink.start();
                let ok = sink.conn.is_some();
                (ok, sink.transient)
            })
        })
        .collect();
    for s in starts {
        assert_eq!(s.join().unwrap(), (true, false));
    }
    let tables = pg_rows(
        &url,
        "SELECT count(*) FROM pg_indexes WHERE tablename = 'requests'",
    );
    // The primary key and the two indexes.
    assert_eq!(tables[0][0].as_deref(), Some("3"));
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it holds, for up to [`PATIENCE`].
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_unreachable_server_blocks_nothing_and_what_does_not_fit_is_dropped_and_counted() {
    // No server needed: nothing listens on this port.
    let port = closed_port();
    let sink = PostgresSink::open(&format!(
        "postgres://switchboard:secret@127.0.0.1:{port}/nowhere"
    ))
    .unwrap();
    // Messages name the server, never the password.
    assert_eq!(sink.target(), format!("127.0.0.1:{port}/nowhere"));
    let capacity = 8;
    let writer = LogWriter::spawn(Box::new(sink), capacity);
    let sent = 2 * MAX_BATCH + 100;
    let start = Instant::now();
    for i in 0..sent {
        writer.send(record(&format!("gen-{i}")));
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "sending blocked: {:?}",
        start.elapsed()
    );
    // The writer holds at most one batch (being retried) and the queue `capacity`:
    // the rest is dropped and counted, never waited for.
    assert!(
        writer.dropped() >= (sent - MAX_BATCH - capacity) as u64,
        "{} dropped of {sent}",
        writer.dropped()
    );
    // A flush cannot finish while the server is away, and does not wait past its
    // timeout.
    let start = Instant::now();
    assert!(!writer.flush(Duration::from_millis(300)));
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(writer); // the writer thread gives up its batch and stops
}

/// A TCP proxy to PostgreSQL that can be taken down (its connections cut, new ones
/// closed at once) and brought back: a real outage, on loopback.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (u, o) = (up.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !u.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let mut all = o.lock().unwrap();
                all.push(client.try_clone().unwrap());
                all.push(server.try_clone().unwrap());
                drop(all);
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Proxy { port, up, open }
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// New connections are closed at once, open ones are cut.
    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// `url` with its host and port replaced by 127.0.0.1:`port`, and the `host:port` it
/// named.
fn through(url: &str, port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:5432")
    };
    (format!("{scheme}://{user}127.0.0.1:{port}{path}"), hostport)
}

#[test]
fn records_wait_while_postgresql_is_down_and_are_written_when_it_is_back() {
    let Some(db) = crate::testing::postgres("records_wait_while_postgresql_is_down") else {
        return;
    };
    // The table exists before the outage, so the test can count what arrives.
    drop(started(db.url()));
    let (proxy_url, server) = through(db.url(), 0);
    let proxy = Proxy::start(server);
    let proxy_url = proxy_url.replace(":0/", &format!(":{}/", proxy.port));
    let capacity = 64;
    let writer = LogWriter::spawn(Box::new(PostgresSink::open(&proxy_url).unwrap()), capacity);

    // Down from the start: 1,000 records; the writer keeps its batch, the queue fills,
    // the rest is dropped and counted.
    let sent = 1000;
    for i in 0..sent {
        writer.send(record(&format!("gen-down-{i:04}")));
    }
    assert!(writer.dropped() > 0);
    assert!(!writer.flush(Duration::from_millis(300)));
    assert_eq!(pg_count(db.url(), "true"), 0);

    // Back: whatever was not dropped is written, once.
    proxy.up();
    eventually("the kept records to be written", || {
        pg_count(db.url(), "id LIKE 'gen-down-%'") + writer.dropped() as i64 == sent
    });
    assert!(writer.flush(PATIENCE));
    let written = pg_count(db.url(), "id LIKE 'gen-down-%'");
    assert_eq!(written + writer.dropped() as i64, sent);
    assert!(written >= capacity as i64, "the queue's records were kept");
    let dropped = writer.dropped();

    // Down again with a connection open: it is cut, the next batch fails, waits,
    // and goes in on a new connection once the server is back; nothing dropped.
    proxy.down();
    for i in 0..10 {
        writer.send(record(&format!("gen-again-{i}")));
    }
    assert!(!writer.flush(Duration::from_millis(300)));
    proxy.up();
    assert!(writer.flush(PATIENCE));
    assert_eq!(pg_count(db.url(), "id LIKE 'gen-again-%'"), 10);
    assert_eq!(writer.dropped(), dropped);
}

/// Rows per second, the writer thread's CPU and PostgreSQL's per row of four ways to
/// write a batch (the sink's `UNNEST` insert with `ON CONFLICT`, multi-row `VALUES`,
/// the sink's binary `COPY`, and a binary `COPY` into a temporary table merged with
/// `ON CONFLICT DO NOTHING`), in batches of 50 and 500. Run with `cargo test --release --lib -- --ignored postgres_sink_throughput --nocapture`.
#[test]
#[ignore]
fn postgres_sink_throughput() {
    let Some(db) = crate::testing::postgres("postgres_sink_throughput") else {
        return;
    };
    let total = 50_000;
    let records: Vec<RequestRecord> = (0..total)
        .map(|i| {
            let mut r = record(&format!("gen-{i:012}-abcdefghijklmnopqrst"));
            r.key_id = Some("key-1".into());
            r.model = Some("bench/model".into());
            r.provider = Some("up".into());
            r.attempts = vec![AttemptLog {
                provider: "up".into(),
                model: "bench/model".into(),
                status: "200".into(),
                latency_ms: 12,
            }];
            r
        })
        .collect();
    drop(started(db.url()));
    let url = db.url().to_string();
    // This thread's CPU time, from /proc (Linux; zero elsewhere).
    let thread_cpu = || {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, r)| r.split_whitespace().collect());
        // utime + stime, in clock ticks (100 per second).
        let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        Duration::from_millis(ticks * 10)
    };
    // Every `postgres` process's CPU time (nothing else may use the server meanwhile).
    let server_cpu = || {
        let mut ticks = 0u64;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            if let Some((name, rest)) = stat.rsplit_once(')') {
                if name.ends_with("(postgres") {
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    ticks += (11..15)
                        .filter_map(|i| f.get(i)?.parse::<u64>().ok())
                        .sum::<u64>();
                }
            }
        }
        Duration::from_millis(ticks * 10)
    };
    for batch in [50usize, 500] {
        for way in ["unnest", "values", "copy", "copy+merge"] {
            pg_exec(&url, "TRUNCATE requests");
            let mut sink = started(&url);
            let rt = sink.take_runtime().unwrap();
            let conn = sink.conn.take().unwrap();
            if way == "copy+merge" {
                rt.block_on(conn.client.batch_execute(
                    "CREATE TEMP TABLE requests_in (LIKE requests INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
                ))
                .unwrap();
            }
            let (cpu0, server0) = (thread_cpu(), server_cpu());
            let t0 = Instant::now();
            rt.block_on(async {
                for b in records.chunks(batch) {
                    let rows = Rows::new(b);
                    match way {
                        "unnest" => {
                            conn.client
                                .execute(&conn.insert, &rows.params())
                                .await
                                .unwrap();
                        }
                        "values" => {
                            let mut sql = String::from("INSERT INTO requests VALUES ");
                            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
                            for n in 0..rows.id.len() {
                                let row = rows.row(n);
                                if n > 0 {
                                    sql.push(',');
                                }
                                sql.push('(');
                                for (c, v) in row.iter().enumerate() {
                                    if c > 0 {
                                        sql.push(',');
                                    }
                                    sql.push_str(&format!("${}", params.len() + 1));
                                    params.push(*v);
                                }
                                sql.push(')');
                            }
                            sql.push_str(" ON CONFLICT (id) DO NOTHING");
                            let stmt = conn.client.prepare(&sql).await.unwrap();
                            conn.client.execute(&stmt, &params).await.unwrap();
                        }
                        "copy" => {
                            copy(&conn.client, &conn.copy, &rows).await.unwrap();
                        }
                        _ => {
                            // A plain COPY cannot skip ids already there (a batch
                            // written again): a COPY into a temporary table, then an
                            // insert from it that skips them.
                            conn.client.batch_execute("BEGIN").await.unwrap();
                            let stmt = conn
                                .client
                                .prepare(&COPY.replace("COPY requests ", "COPY requests_in "))
                                .await
                                .unwrap();
                            copy(&conn.client, &stmt, &rows).await.unwrap();
                            conn.client
                                .batch_execute(
                                    "INSERT INTO requests SELECT * FROM requests_in ON CONFLICT (id) DO NOTHING; COMMIT",
                                )
                                .await
                                .unwrap();
                        }
                    }
                }
            });
            let secs = t0.elapsed().as_secs_f64();
            let cpu = thread_cpu().saturating_sub(cpu0).as_secs_f64();
            let server = server_cpu().saturating_sub(server0).as_secs_f64();
            assert_eq!(pg_count(&url, "true"), total as i64);
            println!(
                "batch {batch:>3}, {way:>10}: {:>7.0} rows/s, per row {:>5.2} µs wall, {:>5.2} µs of the writer's CPU, {:>5.2} µs of PostgreSQL's",
                total as f64 / secs,
                secs * 1e6 / total as f64,
                cpu * 1e6 / total as f64,
                server * 1e6 / total as f64
            );
            sink.rt = Some(rt);
        }
    }
}
