//! Test support for the scale-out tests (hidden, not a stable API): a private
//! PostgreSQL database and a private Redis key prefix per test, cleaned up on drop.
//!
//! Where the servers live: `SWITCHBOARD_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`, a database the tests may create
//! databases from) and `SWITCHBOARD_TEST_REDIS` (default `redis://127.0.0.1:6379`).
//!
//! When a server does not answer, [`postgres`] and [`redis`] return `None` and write a
//! line to the terminal (past the test harness's capture, so `cargo test` shows it)
//! saying that the test did not run and why; the test then returns early. With
//! `SWITCHBOARD_REQUIRE_SHARED=1` (set by `.ci/run`) they panic instead, so CI never
//! passes without running them.

use std::io::Write as _;
use std::time::Duration;

/// The variable that turns a missing PostgreSQL or Redis into a test failure.
pub const REQUIRE_VAR: &str = "SWITCHBOARD_REQUIRE_SHARED";

fn admin_url() -> String {
    std::env::var("SWITCHBOARD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The Redis URL the tests use.
pub fn redis_url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn required() -> bool {
    std::env::var(REQUIRE_VAR).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Says (or, under [`REQUIRE_VAR`], fails) that a test could not run.
fn not_run(test: &str, why: &str) {
    if required() {
        panic!("{test}: {why}, and {REQUIRE_VAR} is set: the scale-out tests must run");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\nNOT RUN: {test}: {why}. Start PostgreSQL and Redis (see docs/deployment.md) to run the scale-out tests; {REQUIRE_VAR}=1 makes this a failure.\n"
    );
}

fn random_suffix() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric
        .sample_string(&mut rand::rng(), 12)
        .to_lowercase()
}

/// Runs `f` on a runtime of its own, on a thread of its own (usable from sync code,
/// from `Drop`, and from inside another runtime).
fn on_own_runtime<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a test runtime")
            .block_on(f())
    })
    .join()
    .expect("the test-support thread panicked")
}

async fn admin_exec(sql: String) -> Result<(), String> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| "connecting timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let task = tokio::spawn(conn);
    let r = client.batch_execute(&sql).await.map_err(|e| e.to_string());
    drop(client);
    let _ = task.await;
    r
}

/// A database of its own for one test, dropped (with its connections) on drop.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    /// `postgres://…/NAME`: what goes into `[store].url`.
    pub fn url(&self) -> &str {
        &self.url
    }
    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = on_own_runtime(move || Box::pin(admin_exec(sql)));
    }
}

/// A fresh database for `test`, or `None` (said on the terminal) when PostgreSQL
/// does not answer. Panics under [`REQUIRE_VAR`].
pub fn postgres(test: &str) -> Option<TestDb> {
    let name = format!("sb_test_{}", random_suffix());
    let sql = format!("CREATE DATABASE {name}");
    match on_own_runtime(move || Box::pin(admin_exec(sql))) {
        Ok(()) => {
            let base = admin_url();
            let cut = base.rfind('/').expect("a database URL has a path");
            let url = format!("{}/{name}", &base[..cut]);
            Some(TestDb { name, url })
        }
        Err(e) => {
            not_run(
                test,
                &format!("PostgreSQL at {} is not reachable ({e})", admin_url()),
            );
            None
        }
    }
}

/// A key prefix of its own in Redis for one test; its keys are deleted on drop.
#[derive(Debug)]
pub struct TestRedis {
    url: String,
    prefix: String,
}

impl TestRedis {
    /// What goes into `[shared].redis_url`.
    pub fn url(&self) -> &str {
        &self.url
    }
    /// What goes into `[shared].prefix`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

async fn redis_conn(url: String) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    tokio::time::timeout(
        Duration::from_secs(10),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "connecting timed out".to_string())?
    .map_err(|e| e.to_string())
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let (url, pattern) = (self.url.clone(), format!("{}*", self.prefix));
        let _ = on_own_runtime(move || {
            Box::pin(async move {
                let mut c = redis_conn(url).await?;
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(&pattern)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| e.to_string())?;
                if !keys.is_empty() {
                    let _: () = redis::cmd("DEL")
                        .arg(keys)
                        .query_async(&mut c)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            })
        });
    }
}

/// A fresh key prefix for `test`, or `None` (said on the terminal) when Redis does
/// not answer. Panics under [`REQUIRE_VAR`].
pub fn redis(test: &str) -> Option<TestRedis> {
    let url = redis_url();
    let probe = url.clone();
    let ping = on_own_runtime(move || {
        Box::pin(async move {
            let mut c = redis_conn(probe).await?;
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .map_err(|e| e.to_string())
        })
    });
    match ping {
        Ok(_) => Some(TestRedis {
            url,
            prefix: format!("sbtest:{}:", random_suffix()),
        }),
        Err(e) => {
            not_run(test, &format!("Redis at {url} is not reachable ({e})"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_database_is_created_usable_and_dropped() {
        let Some(db) = postgres("a_test_database_is_created_usable_and_dropped") else {
            return;
        };
        let (url, name) = (db.url().to_string(), db.name().to_string());
        let one: i32 = on_own_runtime(move || {
            Box::pin(async move {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                c.query_one("SELECT 1", &[]).await.unwrap().get(0)
            })
        });
        assert_eq!(one, 1);
        drop(db);
        let left = on_own_runtime(move || {
            Box::pin(async move {
                let (c, conn) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                c.query("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                    .await
                    .unwrap()
                    .len()
            })
        });
        assert_eq!(left, 0, "the test database is dropped");
    }

    #[test]
    fn a_test_prefix_is_emptied_on_drop() {
        let Some(r) = redis("a_test_prefix_is_emptied_on_drop") else {
            return;
        };
        let (url, key) = (r.url().to_string(), format!("{}k", r.prefix()));
        let (u2, k2) = (url.clone(), key.clone());
        on_own_runtime(move || {
            Box::pin(async move {
                let mut c = redis_conn(u2).await.unwrap();
                let _: () = redis::cmd("SET")
                    .arg(&k2)
                    .arg("1")
                    .query_async(&mut c)
                    .await
                    .unwrap();
            })
        });
        drop(r);
        let n: i64 = on_own_runtime(move || {
            Box::pin(async move {
                let mut c = redis_conn(url).await.unwrap();
                redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async(&mut c)
                    .await
                    .unwrap()
            })
        });
        assert_eq!(n, 0);
    }
}
