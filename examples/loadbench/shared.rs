//! `loadbench --shared`: what many instances cost (issue 21). Same fake upstream, same
//! machine, same requests, against
//! (a) `sqlite`: one instance on the embedded SQLite store (the default,
//!     `sync = "normal"`), and `sqlite, sync=full` (an fsync at every group commit,
//!     as PostgreSQL's default `synchronous_commit = on` does at every commit),
//! (b) `pg+redis ×1`: one instance on PostgreSQL + Redis,
//! (c) `pg+redis ×2`: two instances on one PostgreSQL database + Redis prefix, the
//!     load split between them (requests, or connections, in turn),
//! each on a fresh database of its own (`switchboard::testing`, dropped at the end),
//! the request log where that store puts it (SQLite file; PostgreSQL).
//!
//! Reported, per target: added p50/p90 over the bare proxy at fixed rates (open loop,
//! paired per run), saturation throughput (closed loop, 64 connections), CPU per
//! request of the gateway processes plus the PostgreSQL and Redis server processes
//! (utime + stime from /proc of every process named `postgres` / `redis-server`,
//! per pid, before and after each step: other users of those servers count too, so
//! the idle background is printed first), PostgreSQL round trips per request
//! (`switchboard_store_round_trips_total` over every instance's `/metrics`, and the
//! database's `pg_stat_database.xact_commit` over the whole run), a hot-key run (every
//! request on one key: the default) and one spread over 64 keys, and an overspend
//! check after every step: the key's debit (`/v1/credits`) moved by exactly the
//! `usage.cost` of the requests answered 200, and a key with credits for ≈ 2,000
//! requests hammered past its end by every instance is never overdrawn.
//!
//! Gateways are pinned to CPU 1 (both instances of (c) too), the upstream and the load
//! generator to CPU 0; the database servers run where the kernel puts them.

use std::collections::HashMap;

use switchboard::money::Money;
use switchboard::testing::{TestDb, TestRedis};

use super::*;

/// [`KEYS_IN_USE`] value that sends every request with [`TIGHT`].
pub const TIGHT_KEYS: usize = usize::MAX;
/// The overspend step's key: credits for ≈ 2,000 bench requests.
pub const TIGHT: &str = "sk-bench-tight-0001-0123456789";
/// [`TIGHT`]'s credits: 2,000 × $0.0000078 (12 prompt tokens at $0.15/Mtok, 10
/// completion tokens at $0.6/Mtok).
const TIGHT_CREDITS: &str = "0.0156";
/// Keys of the spread run.
const SPREAD: usize = 64;

/// One configuration under test: its gateway processes, and the database and Redis
/// prefix they share (dropped after the servers: field order).
struct Target {
    name: &'static str,
    servers: Vec<Server>,
    db: Option<TestDb>,
    _redis: Option<TestRedis>,
}

impl Target {
    fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.addr).collect()
    }
    fn shared(&self) -> bool {
        self.db.is_some()
    }
}

/// The gateway config of one target: the bench's model and upstream, [`KEY`] and the
/// other bench keys with $1M each, [`TIGHT`], and `store` (the `[store]` section and
/// what goes with it).
fn target_config(path: &std::path::Path, upstream: SocketAddr, store: &str) -> String {
    let mut keys = String::new();
    for i in 0..SPREAD {
        keys.push_str(&format!(
            "[[keys]]\nsecret = \"{}\"\nname = \"bench-{i}\"\ncredits_usd = 1000000\n",
            bench_key(i)
        ));
    }
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
{store}
[[providers]]
name = "up"
kind = "openai"
base_url = "http://{upstream}/v1"
api_key = "sk-upstream"
[[models]]
id = "bench/model"
max_output_tokens = 64
  [[models.endpoints]]
  provider = "up"
  upstream_model = "up"
  prompt_usd_per_mtok = 0.15
  completion_usd_per_mtok = 0.6
{keys}
[[keys]]
secret = "{TIGHT}"
name = "tight"
credits_usd = "{TIGHT_CREDITS}"
"#
    );
    std::fs::write(path, config).unwrap();
    path.display().to_string()
}

/// GET `url` (with a bearer `key`): the body as text ("" on failure).
async fn get_text(client: &HttpClient, url: String, key: Option<&str>) -> String {
    let mut req = Request::get(url);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let Ok(res) = client
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
    else {
        return String::new();
    };
    let body = res.into_body().collect().await.map(|b| b.to_bytes());
    String::from_utf8_lossy(&body.unwrap_or_default()).into_owned()
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

/// `(total_credits, total_usage)` of `key`, from the target's first instance.
async fn credits(client: &HttpClient, t: &Target, key: &str) -> (Money, Money) {
    let text = get_text(
        client,
        format!("http://{}/v1/credits", t.servers[0].addr),
        Some(key),
    )
    .await;
    match (
        money_field(&text, "total_credits"),
        money_field(&text, "total_usage"),
    ) {
        (Some(c), Some(u)) => (c, u),
        _ => panic!("{}: /v1/credits answered {text:?}", t.name),
    }
}

/// Σ of `switchboard_store_round_trips_total` (every `op`) over the target's
/// instances; `None` for a target without PostgreSQL.
async fn round_trips(client: &HttpClient, t: &Target) -> Option<f64> {
    if !t.shared() {
        return None;
    }
    let mut sum = 0.0;
    for s in &t.servers {
        let text = get_text(client, format!("http://{}/metrics", s.addr), None).await;
        sum += text
            .lines()
            .filter(|l| l.starts_with("switchboard_store_round_trips_total"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>();
    }
    Some(sum)
}

/// CPU seconds of every process whose name is `comm`, by pid.
fn cpu_of(comm: &str) -> HashMap<u32, f64> {
    let mut m = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if name.trim_end() == comm {
            m.insert(pid, cpu_secs(pid));
        }
    }
    m
}

/// CPU seconds spent between two [`cpu_of`] snapshots (processes that started in
/// between count whole; those that ended in between are lost).
fn cpu_delta(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, t)| t - before.get(pid).copied().unwrap_or(0.0))
        .filter(|d| *d > 0.0)
        .fold(0.0, |a, d| a + d)
}

/// What a step cost: CPU seconds of the gateways, PostgreSQL and Redis, round trips.
struct Snapshot {
    gateways: f64,
    postgres: HashMap<u32, f64>,
    redis: HashMap<u32, f64>,
    round_trips: Option<f64>,
}

async fn snapshot(client: &HttpClient, t: &Target) -> Snapshot {
    Snapshot {
        round_trips: round_trips(client, t).await,
        gateways: t.servers.iter().map(|s| cpu_secs(s.child.id())).sum(),
        postgres: cpu_of("postgres"),
        redis: cpu_of("redis-server"),
    }
}

/// Per request, in µs of CPU (gateways, PostgreSQL, Redis), and round trips.
#[derive(Clone, Copy, Default)]
struct PerRequest {
    gateways: f64,
    postgres: f64,
    redis: f64,
    round_trips: Option<f64>,
}

impl PerRequest {
    fn between(a: &Snapshot, b: &Snapshot, requests: u64) -> PerRequest {
        let n = requests.max(1) as f64;
        PerRequest {
            gateways: (b.gateways - a.gateways) * 1e6 / n,
            postgres: cpu_delta(&a.postgres, &b.postgres) * 1e6 / n,
            redis: cpu_delta(&a.redis, &b.redis) * 1e6 / n,
            round_trips: a.round_trips.zip(b.round_trips).map(|(x, y)| (y - x) / n),
        }
    }
    fn total(&self) -> f64 {
        self.gateways + self.postgres + self.redis
    }
    /// The median of each column over runs.
    fn median_of(runs: &[PerRequest]) -> PerRequest {
        let col = |f: fn(&PerRequest) -> f64| median(runs.iter().map(f).collect());
        PerRequest {
            gateways: col(|r| r.gateways),
            postgres: col(|r| r.postgres),
            redis: col(|r| r.redis),
            round_trips: runs[0]
                .round_trips
                .map(|_| col(|r| r.round_trips.unwrap_or(f64::NAN))),
        }
    }
    fn cells(&self, sqlite_total: f64) -> String {
        format!(
            "{:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {}",
            self.gateways,
            self.postgres,
            self.redis,
            self.total(),
            self.total() / sqlite_total,
            self.round_trips
                .map_or("—".to_string(), |r| format!("{r:.3}"))
        )
    }
}

/// One overspend check: the debit of the step's keys moved by exactly what the
/// clients were shown, and no key is past its credits.
struct Check {
    target: &'static str,
    step: String,
    served: u64,
    shown: Money,
    debit: Money,
    credits: Option<Money>,
}

impl Check {
    fn ok(&self) -> bool {
        self.shown == self.debit && self.credits.is_none_or(|c| self.debit <= c)
    }
}

/// The debit of the keys a step uses (the hot key, the spread keys, or the tight key).
async fn debit(client: &HttpClient, t: &Target, keys: usize) -> Money {
    let list: Vec<String> = match keys {
        0 => vec![KEY.to_string()],
        TIGHT_KEYS => vec![TIGHT.to_string()],
        n => (0..n).map(bench_key).collect(),
    };
    let mut sum = Money::ZERO;
    for k in list {
        sum = sum + credits(client, t, &k).await.1;
    }
    sum
}

/// `xact_commit` of the target's database (PostgreSQL's statistics, flushed by the
/// backends at most once a second: read it after the run has been quiet a while).
async fn xact_commit(db: &TestDb) -> Option<i64> {
    let admin = match db.url().rfind('/') {
        Some(cut) => format!("{}/postgres", &db.url()[..cut]),
        None => return None,
    };
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .ok()?;
    let task = tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
            &[&db.name()],
        )
        .await
        .ok();
    drop(client);
    let _ = task.await;
    row.map(|r| r.get::<_, i64>(0))
}

/// Starts `n` gateway processes on `config`, pinned to CPU 1.
fn gateways(upstream: SocketAddr, config: &str, n: usize) -> Vec<Server> {
    (0..n)
        .map(|_| spawn(&["gateway", &upstream.to_string(), config], Some(1)))
        .collect()
}

pub async fn run(args: &[String]) {
    let BenchArgs { secs, repeat, .. } = BenchArgs::parse(args, (2, 5), (1, 3));
    let pin = pin_self();
    let (Some(db1), Some(db2)) = (
        switchboard::testing::postgres("loadbench --shared"),
        switchboard::testing::postgres("loadbench --shared"),
    ) else {
        eprintln!("loadbench --shared needs PostgreSQL (SWITCHBOARD_TEST_POSTGRES)");
        return;
    };
    let (Some(r1), Some(r2)) = (
        switchboard::testing::redis("loadbench --shared"),
        switchboard::testing::redis("loadbench --shared"),
    ) else {
        eprintln!("loadbench --shared needs Redis (SWITCHBOARD_TEST_REDIS)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("switchboard-bench-shared-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let client = client();

    let up = spawn(&["upstream"], Some(0));
    let proxy = spawn(&["proxy", &up.addr.to_string()], Some(1));
    // `--sink none` takes the request log out of every target (to see its share).
    let sink = args
        .iter()
        .position(|a| a == "--sink")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let sqlite_store = |name: &str, sync: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        target_config(
            &dir.join(format!("{name}.toml")),
            up.addr,
            &format!(
                "[store]\nurl = \"sqlite://{}\"\nsync = \"{sync}\"\n[logging]\nsink = \"{}\"\n",
                d.join("bench.db").display(),
                sink.unwrap_or("sqlite")
            ),
        )
    };
    let (sqlite, sqlite_full) = (
        sqlite_store("sqlite", "normal"),
        sqlite_store("sqlite-full", "full"),
    );
    let shared_store = |db: &TestDb, r: &TestRedis, file: &str| {
        target_config(
            &dir.join(file),
            up.addr,
            &format!(
                "[store]\nurl = \"{}\"\n[shared]\nredis_url = \"{}\"\nprefix = \"{}\"\n[logging]\nsink = \"{}\"\n",
                db.url(),
                r.url(),
                r.prefix(),
                sink.unwrap_or("postgres")
            ),
        )
    };
    let (pg1, pg2) = (
        shared_store(&db1, &r1, "pg1.toml"),
        shared_store(&db2, &r2, "pg2.toml"),
    );
    // `--only NAME` keeps `sqlite` (every ratio's base) and the targets whose name
    // contains NAME (e.g. `×1`).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1));
    let targets: Vec<Target> = [
        Target {
            name: "sqlite",
            servers: gateways(up.addr, &sqlite, 1),
            db: None,
            _redis: None,
        },
        Target {
            name: "sqlite, sync=full",
            servers: gateways(up.addr, &sqlite_full, 1),
            db: None,
            _redis: None,
        },
        Target {
            name: "pg+redis ×1",
            servers: gateways(up.addr, &pg1, 1),
            db: Some(db1),
            _redis: Some(r1),
        },
        Target {
            name: "pg+redis ×2",
            servers: gateways(up.addr, &pg2, 2),
            db: Some(db2),
            _redis: Some(r2),
        },
    ]
    .into_iter()
    .filter(|t| t.name == "sqlite" || only.is_none_or(|o| t.name.contains(o.as_str())))
    .collect();

    println!(
        "# switchboard many-instances benchmark ({secs} s per step, {repeat} runs{})",
        if pin {
            ", gateways pinned to CPU 1"
        } else {
            ""
        }
    );
    // What PostgreSQL and Redis do with nobody using them (other users count here).
    let (p0, r0) = (cpu_of("postgres"), cpu_of("redis-server"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "\nIdle background before the runs: PostgreSQL {:.1} ms/s, Redis {:.1} ms/s of CPU",
        cpu_delta(&p0, &cpu_of("postgres")) * 500.0,
        cpu_delta(&r0, &cpu_of("redis-server")) * 500.0
    );

    let xact0: Vec<Option<i64>> = {
        let mut v = Vec::new();
        for t in &targets {
            v.push(match &t.db {
                Some(db) => xact_commit(db).await,
                None => None,
            });
        }
        v
    };
    let mut requests_on = vec![0u64; targets.len()];
    // Warm up pools, caches and leases; one request's cost (every answer is alike).
    for (i, t) in targets.iter().enumerate() {
        requests_on[i] += fixed_rate_over(&t.addrs(), 200, 1, false).await.ok as u64;
    }
    fixed_rate(proxy.addr, 200, 1, false).await;
    let cost = {
        let res = client
            .request(request(targets[0].servers[0].addr, false, false))
            .await
            .unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        money_field(&String::from_utf8_lossy(&body), "cost").expect("usage.cost")
    };
    requests_on[0] += 1;
    let mut checks: Vec<Check> = Vec::new();

    // Runs one step on a target: the load, then the snapshot and the overspend check.
    macro_rules! step {
        ($i:expr, $keys:expr, $name:expr, $load:expr) => {{
            let t = &targets[$i];
            KEYS_IN_USE.store($keys, Ordering::SeqCst);
            let d0 = debit(&client, t, $keys).await;
            let s0 = snapshot(&client, t).await;
            let (out, ok) = $load;
            let s1 = snapshot(&client, t).await;
            let d1 = debit(&client, t, $keys).await;
            requests_on[$i] += ok;
            checks.push(Check {
                target: t.name,
                step: $name,
                served: ok,
                shown: Money::from_pico(cost.pico() * ok as i64),
                debit: d1 - d0,
                credits: None,
            });
            KEYS_IN_USE.store(0, Ordering::SeqCst);
            (out, PerRequest::between(&s0, &s1, ok))
        }};
    }

    println!("\n## Fixed rate (open loop), non-streaming, hot key; median of {repeat} runs");
    println!("| rate | target | ok | err | p50 ms | p90 ms | added p50 µs | added p90 µs | CPU µs/req: gateways | PostgreSQL | Redis | total | × sqlite | PG round trips/req |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // `--saturation` skips the fixed rates (PostgreSQL's share at saturation is the
    // issue's target; a profile wants those steps alone); `--rates 2000,4000` sets them.
    let rates: Vec<u64> = if args.iter().any(|a| a == "--saturation") {
        Vec::new()
    } else {
        args.iter()
            .position(|a| a == "--rates")
            .and_then(|i| args.get(i + 1))
            .map_or(vec![500, 1000], |v| {
                v.split(',').filter_map(|r| r.trim().parse().ok()).collect()
            })
    };
    for &rate in &rates {
        // Per run: the proxy's (p50, p90), and each target's.
        let mut proxy_runs: Vec<(f64, f64)> = Vec::new();
        let mut runs: Vec<Vec<(f64, f64, PerRequest)>> = vec![Vec::new(); targets.len()];
        let mut counts = vec![(0usize, 0usize); targets.len()];
        for _ in 0..repeat {
            let st = fixed_rate(proxy.addr, rate, secs, false).await;
            proxy_runs.push((Stats::pct(&st.total, 0.5), Stats::pct(&st.total, 0.9)));
            for i in 0..targets.len() {
                let addrs = targets[i].addrs();
                let (st, per) = step!(i, 0, format!("{rate} req/s"), {
                    let st = fixed_rate_over(&addrs, rate, secs, false).await;
                    let ok = st.ok as u64;
                    (st, ok)
                });
                counts[i].0 += st.ok;
                counts[i].1 += st.errors + st.not_sent;
                runs[i].push((Stats::pct(&st.total, 0.5), Stats::pct(&st.total, 0.9), per));
            }
        }
        let sqlite_total =
            PerRequest::median_of(&runs[0].iter().map(|r| r.2).collect::<Vec<_>>()).total();
        for (i, t) in targets.iter().enumerate() {
            let added = |f: fn(&(f64, f64, PerRequest)) -> f64, g: fn(&(f64, f64)) -> f64| {
                median(
                    runs[i]
                        .iter()
                        .zip(&proxy_runs)
                        .map(|(r, p)| (f(r) - g(p)) * 1000.0)
                        .collect(),
                )
            };
            let per = PerRequest::median_of(&runs[i].iter().map(|r| r.2).collect::<Vec<_>>());
            println!(
                "| {rate} | {} | {} | {} | {:.3} | {:.3} | {:.0} | {:.0} | {} |",
                t.name,
                counts[i].0,
                counts[i].1,
                median(runs[i].iter().map(|r| r.0).collect()),
                median(runs[i].iter().map(|r| r.1).collect()),
                added(|r| r.0, |p| p.0),
                added(|r| r.1, |p| p.1),
                per.cells(sqlite_total)
            );
        }
    }

    println!(
        "\n## Saturation (closed loop, 64 connections), non-streaming; median of {repeat} runs"
    );
    println!("| target | keys | req/s | CPU µs/req: gateways | PostgreSQL | Redis | total | × sqlite | PG round trips/req |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (keys, label, runs_n) in [(0usize, "1 (hot)", repeat), (SPREAD, "64", repeat.min(2))] {
        let mut runs: Vec<Vec<(f64, PerRequest)>> = vec![Vec::new(); targets.len()];
        for _ in 0..runs_n {
            for (i, t) in targets.iter().enumerate() {
                let addrs = t.addrs();
                let (rps, per) = step!(i, keys, format!("saturation, {label} keys"), {
                    let (rps, n) = saturate_over(&addrs, 64, secs).await;
                    (rps, n)
                });
                runs[i].push((rps, per));
            }
        }
        let sqlite_total =
            PerRequest::median_of(&runs[0].iter().map(|r| r.1).collect::<Vec<_>>()).total();
        for (i, t) in targets.iter().enumerate() {
            let per = PerRequest::median_of(&runs[i].iter().map(|r| r.1).collect::<Vec<_>>());
            println!(
                "| {} | {label} | {:.0} | {} |",
                t.name,
                median(runs[i].iter().map(|r| r.0).collect()),
                per.cells(sqlite_total)
            );
        }
    }

    // A key with credits for ≈ 2,000 requests, hammered past its end by every
    // instance of the target at once.
    for i in 0..targets.len() {
        let addrs = targets[i].addrs();
        let ((), _) = step!(i, TIGHT_KEYS, "tight key, saturated past its end".into(), {
            let (_, n) = saturate_over(&addrs, 64, secs.min(3)).await;
            ((), n)
        });
        let (credit, spent) = credits(&client, &targets[i], TIGHT).await;
        let last = checks.last_mut().unwrap();
        last.credits = Some(credit);
        assert_eq!(spent, last.debit, "the tight key was new");
    }

    println!("\n## PostgreSQL round trips by kind over the whole run (switchboard_store_round_trips_total, all instances)");
    println!("| target | requests | op: round trips (per request) |");
    println!("|---|---|---|");
    for (i, t) in targets.iter().enumerate() {
        if !t.shared() {
            continue;
        }
        let mut by_op: std::collections::BTreeMap<String, f64> = Default::default();
        for srv in &t.servers {
            let text = get_text(&client, format!("http://{}/metrics", srv.addr), None).await;
            for l in text.lines() {
                let Some(rest) = l.strip_prefix("switchboard_store_round_trips_total{") else {
                    continue;
                };
                let (labels, value) = rest.rsplit_once("} ").unwrap_or(("", "0"));
                let op = labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("op=\""))
                    .map_or("?", |v| v.trim_end_matches('"'));
                *by_op.entry(op.to_string()).or_default() += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        let n = requests_on[i].max(1) as f64;
        println!(
            "| {} | {} | {} |",
            t.name,
            requests_on[i],
            by_op
                .iter()
                .map(|(op, c)| format!("{op}: {c:.0} ({:.3})", c / n))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // Let the statistics collector see the last transactions.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    println!("\n## PostgreSQL transactions per request over the whole run (pg_stat_database.xact_commit)");
    println!("| target | requests | transactions | per request |");
    println!("|---|---|---|---|");
    for (i, t) in targets.iter().enumerate() {
        let Some(db) = &t.db else { continue };
        if let (Some(a), Some(b)) = (xact0[i], xact_commit(db).await) {
            println!(
                "| {} | {} | {} | {:.3} |",
                t.name,
                requests_on[i],
                b - a,
                (b - a) as f64 / requests_on[i].max(1) as f64
            );
        }
    }

    println!("\n## Overspend checks (after every step: debit moved by Σ usage.cost shown; tight key: debit ≤ credits)");
    println!("| target | step | served | Σ usage.cost | debit | credits | ok |");
    println!("|---|---|---|---|---|---|---|");
    let mut failed = 0;
    for c in &checks {
        failed += usize::from(!c.ok());
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            c.target,
            c.step,
            c.served,
            c.shown,
            c.debit,
            c.credits.map_or("—".to_string(), |m| m.to_string()),
            if c.ok() { "yes" } else { "**NO**" }
        );
    }
    println!(
        "\n{} of {} checks hold{}",
        checks.len() - failed,
        checks.len(),
        if failed == 0 {
            ": zero overspend, every charge once"
        } else {
            " (a request the client counted as failed may still have been charged: see the table)"
        }
    );
    drop(targets);
    let _ = std::fs::remove_dir_all(&dir);
}
