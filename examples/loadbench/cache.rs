//! `loadbench --cache`: what the response cache costs and saves (SPEC §8.1). Same fake
//! upstream, bare proxy and gateway process as the main bench (the gateway with its
//! default `[cache]`, in memory), three runs:
//!
//! 1. **hits**: the same cacheable request repeated (`X-OpenRouter-Cache: true`,
//!    stored by a first request), at fixed rates, against the upstream directly, the
//!    bare proxy and the gateway: p50 / p90 and CPU µs per request of the server
//!    process. Targets: a hit costs ≤ 0.5× the CPU of a bare-proxy request, and its
//!    p50 over direct stays under 100 µs.
//! 2. **coalescing**: bursts of N identical cacheable requests sent at once (a fresh
//!    body per burst, so each burst starts with nothing stored), against an upstream
//!    that takes 50 ms (`"slow":true` in the body): how many went upstream (`MISS`
//!    answers) and the burst's latency.
//! 3. **all misses**: every request different (a counter in the prompt), with the
//!    cache asked for (each one a miss, recorded and stored) and without: gateway CPU
//!    µs per request, the two steps alternating which goes first, at fixed rates and
//!    at saturation (closed loop, 64 connections: the gateway's CPU per request at
//!    its lowest, so the cache's share at its largest). Target: growth ≤ 10 %. Also
//!    printed: the median of each round's own growth (its two steps back to back).
//!    `--aa` runs both steps without the cache: the noise of the growth.
//!
//! `--body-kb N` makes every request's message ≈ N KB longer (prose and code, with
//! the escapes real prompts have): the cache's key is made from the whole body.
//!
//! Run with: cargo run --release --example loadbench -- --cache [--quick] [--secs N]
//! [--repeat N] [--misses-only] [--aa] [--body-kb N]

use super::*;

/// Requests sent so far with a unique body (run 3).
static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// Makes this process's unique bodies unlike those of any other run (`misses` is run
/// many times against one gateway).
static SALT: std::sync::LazyLock<u128> = std::sync::LazyLock::new(|| {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
});

/// `--body-kb N` (or `LOADBENCH_BODY_KB` for the profiling roles): each request's
/// message grows by ≈ N KB of prose and code (lines, quotes), as an agent's long
/// prompt does; 0 (the default) keeps the one-line message.
static BODY_KB: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

fn body_kb() -> usize {
    *BODY_KB.get_or_init(|| {
        std::env::var("LOADBENCH_BODY_KB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// ≈ `kb` KB of a long prompt, as JSON string content (escapes included).
fn padding(kb: usize) -> String {
    const LINE: &str = r#"\n  fn main() { println!(\"fox {}\"); } // The quick brown fox jumps over the lazy dog."#;
    let mut out = String::with_capacity(kb * 1024 + 128);
    while out.len() < kb * 1024 {
        out.push_str(LINE);
    }
    out
}

/// What a request of a run looks like.
#[derive(Clone, Copy)]
enum Kind {
    /// The same body every time, cache asked for.
    Same,
    /// A new body every time; cache asked for or not.
    Unique { cache: bool },
}

fn cache_request(addr: SocketAddr, kind: Kind) -> Request<Full<Bytes>> {
    let (content, cache) = match kind {
        Kind::Same => ("Say something short about foxes.".to_string(), true),
        Kind::Unique { cache } => (
            format!(
                "Say something short about fox number {} of {}.",
                UNIQUE.fetch_add(1, Ordering::Relaxed),
                *SALT
            ),
            cache,
        ),
    };
    let pad = match body_kb() {
        0 => String::new(),
        kb => padding(kb),
    };
    let body = format!(
        r#"{{"model":"bench/model","messages":[{{"role":"user","content":"{content}{pad}"}}],"max_tokens":64}}"#
    );
    let mut req = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json");
    if cache {
        req = req.header("x-openrouter-cache", "true");
    }
    req.body(Full::new(Bytes::from(body))).unwrap()
}

/// One request; (total time, whether it was a cache hit) or None on error.
async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Option<(Duration, bool)> {
    let t0 = Instant::now();
    let res = match client.request(req).await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => return failed(r.status()),
        Err(e) => return failed(e),
    };
    let hit = res
        .headers()
        .get("x-openrouter-cache-status")
        .is_some_and(|v| v == "HIT");
    res.into_body().collect().await.ok()?;
    Some((t0.elapsed(), hit))
}

/// Open loop at `rate` req/s for `secs`: (latencies µs, errors, hits).
async fn fixed_rate_of(
    addr: SocketAddr,
    rate: u64,
    secs: u64,
    kind: Kind,
) -> (Vec<u64>, usize, usize) {
    let client = client();
    let n = rate * secs;
    let start = Instant::now() + Duration::from_millis(50);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    for i in 0..n {
        let at = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        tokio::time::sleep_until(at.into()).await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            continue;
        };
        let (client, tx) = (client.clone(), tx.clone());
        let req = cache_request(addr, kind);
        tokio::spawn(async move {
            let r = send(&client, req).await;
            drop(permit);
            let _ = tx.send(r);
        });
    }
    drop(tx);
    let (mut lat, mut errors, mut hits) = (Vec::new(), 0, 0);
    while let Some(r) = rx.recv().await {
        match r {
            Some((d, hit)) => {
                lat.push(d.as_micros() as u64);
                hits += usize::from(hit);
            }
            None => errors += 1,
        }
    }
    (lat, errors, hits)
}

/// The order of a round's two steps (0: without the cache, 1: with): each round the
/// other way round than the last, since the second of two steps can pay for the first
/// (the log writer flushing its rows, the allocator).
fn round_order(run: usize) -> [usize; 2] {
    if run.is_multiple_of(2) {
        [0, 1]
    } else {
        [1, 0]
    }
}

/// A run-3 step's name in the tables.
fn step_name(i: usize, cache: bool) -> &'static str {
    match (i, cache) {
        (_, true) => "on (all miss)",
        (1, false) => "off (A/A)",
        _ => "off",
    }
}

/// The median of each round's own growth (its step with the cache against its step
/// without, run back to back), in %: drift of the machine between rounds cancels.
fn paired_growth(cpu: &[Vec<f64>; 2]) -> f64 {
    let ratios = cpu[0]
        .iter()
        .zip(&cpu[1])
        .map(|(off, on)| (on / off - 1.0) * 100.0)
        .collect();
    median(ratios)
}

/// Closed loop with `conc` workers for `secs`, every request of `kind`: (requests/s,
/// completed).
async fn saturate_of(addr: SocketAddr, conc: usize, secs: u64, kind: Kind) -> (f64, u64) {
    let client = client();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let (client, done) = (client.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < stop {
                    if send(&client, cache_request(addr, kind)).await.is_some() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let n = done.load(Ordering::Relaxed);
    (n as f64 / t0.elapsed().as_secs_f64(), n)
}

/// `drive-misses ADDR SECS [off]`: closed loop, 64 connections, every request a miss
/// (see `main`).
pub async fn drive_misses(args: &[String]) {
    let addr = args[0].parse().unwrap();
    let secs = args[1].parse().unwrap();
    let cache = args.get(2).is_none_or(|a| a != "off");
    let (rps, n) = saturate_of(addr, 64, secs, Kind::Unique { cache }).await;
    println!("{n} requests, {rps:.0} req/s");
}

/// `misses ADDR RATE SECS [off]`: every request a miss (see `main`).
pub async fn misses(args: &[String]) {
    let addr = args[0].parse().unwrap();
    let (rate, secs) = (args[1].parse().unwrap(), args[2].parse().unwrap());
    let cache = args.get(3).is_none_or(|a| a != "off");
    let (lat, err, _) = fixed_rate_of(addr, rate, secs, Kind::Unique { cache }).await;
    println!(
        "ok {} err {err} p50 {:.3} ms",
        lat.len(),
        Stats::pct(&lat, 0.5)
    );
}

pub async fn run(args: &[String]) {
    if let Some(kb) = args
        .iter()
        .position(|a| a == "--body-kb")
        .and_then(|i| args.get(i + 1)?.parse().ok())
    {
        BODY_KB.set(kb).ok();
        // The gateway, a process of its own, is told nothing: only bodies change.
    }
    let BenchArgs {
        quick,
        secs,
        repeat,
    } = BenchArgs::parse(args, (1, 5), (1, 5));
    let pin = pin_self();
    let dir = std::env::temp_dir().join(format!("switchboard-bench-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let up = spawn(&["upstream"], Some(0));
    let proxy = spawn(&["proxy", &up.addr.to_string()], Some(1));
    let cfg = write_config(&dir, up.addr);
    // `[cache]` in memory, said out loud.
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    // 16 MiB: run 3 fills it first, so its misses are measured with the cache in its
    // steady state (full, evicting), not while it grows into fresh memory.
    text.push_str("\n[cache]\nenabled_by_default = false\nttl_secs = 3600\nmax_bytes = 16777216\n");
    std::fs::write(&cfg, text).unwrap();
    let gw = spawn(&["gateway", &up.addr.to_string(), &cfg], Some(1));
    println!(
        "# switchboard response cache benchmark ({secs} s per step, {repeat} runs{})",
        if pin {
            ", server under test pinned to CPU 1"
        } else {
            ""
        }
    );
    // Warm up, and store the answer the hit run repeats.
    for addr in [up.addr, proxy.addr, gw.addr] {
        fixed_rate_of(addr, 200, 1, Kind::Same).await;
        fixed_rate_of(addr, 200, 1, Kind::Unique { cache: false }).await;
    }

    let misses_only = args.iter().any(|a| a == "--misses-only");
    if !misses_only {
        println!(
            "\n## 1. Cache hits: the same request repeated, fixed rate, median of {repeat} runs"
        );
        println!("| rate | target | ok | err | hits | p50 ms | p90 ms | CPU µs/req |");
        println!("|---|---|---|---|---|---|---|---|");
        let targets = [
            ("direct", up.addr, up.child.id()),
            ("bare proxy", proxy.addr, proxy.child.id()),
            ("switchboard hit", gw.addr, gw.child.id()),
        ];
        let mut verdicts = Vec::new();
        for rate in [500u64, 1000, 2000] {
            let mut p50 = vec![Vec::new(); 3];
            let mut p90 = vec![Vec::new(); 3];
            let mut cpu = vec![Vec::new(); 3];
            let mut counts = [(0usize, 0usize, 0usize); 3];
            for _ in 0..repeat {
                for (i, (_, addr, pid)) in targets.iter().enumerate() {
                    let c0 = cpu_secs(*pid);
                    let (lat, err, hits) = fixed_rate_of(*addr, rate, secs, Kind::Same).await;
                    cpu[i].push((cpu_secs(*pid) - c0) * 1e6 / lat.len().max(1) as f64);
                    p50[i].push(Stats::pct(&lat, 0.5));
                    p90[i].push(Stats::pct(&lat, 0.9));
                    counts[i].0 += lat.len();
                    counts[i].1 += err;
                    counts[i].2 += hits;
                }
            }
            for (i, (name, _, _)) in targets.iter().enumerate() {
                println!(
                    "| {rate} | {name} | {} | {} | {} | {:.3} | {:.3} | {:.1} |",
                    counts[i].0,
                    counts[i].1,
                    counts[i].2,
                    median(p50[i].clone()),
                    median(p90[i].clone()),
                    median(cpu[i].clone())
                );
            }
            let added: Vec<f64> = p50[2]
                .iter()
                .zip(&p50[0])
                .map(|(g, d)| (g - d) * 1000.0)
                .collect();
            let cpu_ratio = median(cpu[2].clone()) / median(cpu[1].clone());
            verdicts.push((rate, median(added), cpu_ratio));
        }
        println!("\n| rate | hit p50 over direct, µs (target < 100) | hit CPU / bare-proxy CPU (target ≤ 0.5) |");
        println!("|---|---|---|");
        for (rate, added, ratio) in &verdicts {
            println!("| {rate} | {added:.0} | {ratio:.2} |");
        }

        // 1b. Saturation: the CPU per request of a hit when the server is never idle (no
        // per-request wake-ups), against the bare proxy's, each on CPU 1 in turn. A second
        // gateway caches by default, so the main bench's own request (the same body every
        // time, no cache header) is a hit after the first.
        let cfg2 = dir.join("by-default");
        std::fs::create_dir_all(&cfg2).unwrap();
        let cfg2 = write_config(&cfg2, up.addr);
        let mut text = std::fs::read_to_string(&cfg2).unwrap();
        text.push_str("\n[cache]\nenabled_by_default = true\nttl_secs = 3600\n");
        std::fs::write(&cfg2, text).unwrap();
        let gw2 = spawn(&["gateway", &up.addr.to_string(), &cfg2], Some(1));
        saturate(gw2.addr, 64, 1).await;
        saturate(proxy.addr, 64, 1).await;
        println!("\n## 1b. Saturation (64 connections, closed loop), median of {repeat} runs");
        println!("| target | req/s | CPU µs/req |");
        println!("|---|---|---|");
        let mut sat = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..repeat {
            for (i, (addr, pid)) in [(proxy.addr, proxy.child.id()), (gw2.addr, gw2.child.id())]
                .into_iter()
                .enumerate()
            {
                let c0 = cpu_secs(pid);
                let (rps, n) = saturate(addr, 64, secs).await;
                sat[2 * i].push(rps);
                sat[2 * i + 1].push((cpu_secs(pid) - c0) * 1e6 / n.max(1) as f64);
            }
        }
        let (proxy_cpu, hit_cpu) = (median(sat[1].clone()), median(sat[3].clone()));
        println!(
            "| bare proxy | {:.0} | {proxy_cpu:.1} |",
            median(sat[0].clone())
        );
        println!(
            "| switchboard hit | {:.0} | {hit_cpu:.1} |",
            median(sat[2].clone())
        );
        println!(
            "| hit / bare proxy | | {:.2} (target ≤ 0.5) |",
            hit_cpu / proxy_cpu
        );
        drop(gw2);

        println!(
        "\n## 2. Coalescing: bursts of identical requests (fresh body per burst, upstream 50 ms)"
    );
        println!("| burst | bursts | upstream calls per burst (MISS) | answered | burst p50 ms | burst max ms |");
        println!("|---|---|---|---|---|---|");
        let client = client();
        for size in [10usize, 50, 200] {
            let bursts = if quick { 3 } else { 10 };
            let (mut misses, mut ok, mut took) = (0usize, 0usize, Vec::new());
            for b in 0..bursts {
                let body = format!(
                    r#"{{"model":"bench/model","messages":[{{"role":"user","content":"burst {size} {b} {}"}}],"max_tokens":64,"slow":true}}"#,
                    std::process::id()
                );
                let t0 = Instant::now();
                let tasks: Vec<_> = (0..size)
                    .map(|_| {
                        let req = Request::post(format!("http://{}/v1/chat/completions", gw.addr))
                            .header("authorization", format!("Bearer {KEY}"))
                            .header("content-type", "application/json")
                            .header("x-openrouter-cache", "true")
                            .body(Full::new(Bytes::from(body.clone())))
                            .unwrap();
                        let client = client.clone();
                        tokio::spawn(async move { send(&client, req).await })
                    })
                    .collect();
                for t in tasks {
                    if let Ok(Some((_, hit))) = t.await {
                        ok += 1;
                        misses += usize::from(!hit);
                    }
                }
                took.push(t0.elapsed().as_micros() as u64);
            }
            println!(
                "| {size} | {bursts} | {:.2} | {ok}/{} | {:.1} | {:.1} |",
                misses as f64 / bursts as f64,
                size * bursts,
                Stats::pct(&took, 0.5),
                Stats::pct(&took, 1.0)
            );
        }
    }

    // Fill the cache past its bound (about 1.5 KiB an answer): what follows runs with
    // the cache full and evicting, as a long-running gateway's is.
    let fill = if quick { 2 } else { 12 };
    fixed_rate_of(gw.addr, 2000, fill, Kind::Unique { cache: true }).await;
    println!(
        "\n## 3. Every request a miss: cache asked for vs not, fixed rate, the cache full (16 MiB, filled by {} misses first), median of {repeat} runs",
        2000 * fill
    );
    println!("| rate | cache | ok | err | p50 ms | gateway CPU µs/req | of it system µs/req | page faults / req | context switches / req |");
    println!("|---|---|---|---|---|---|---|---|---|");
    // `--aa`: the calibration, both steps without the cache (what the growth reads
    // when nothing differs).
    let aa = args.iter().any(|a| a == "--aa");
    for rate in [500u64, 1000] {
        let mut cpu = [Vec::new(), Vec::new()];
        for run in 0..repeat {
            for i in round_order(run) {
                let cache = i == 1 && !aa;
                let pid = gw.child.id();
                let c0 = cpu_secs(pid);
                let (f0, s0) = faults_and_sys(pid);
                let w0 = ctx_switches(pid);
                let (lat, err, _) =
                    fixed_rate_of(gw.addr, rate, secs, Kind::Unique { cache }).await;
                let n = lat.len().max(1) as f64;
                let per = (cpu_secs(pid) - c0) * 1e6 / n;
                let (f1, s1) = faults_and_sys(pid);
                let (faults, sys) = ((f1 - f0) as f64 / n, (s1 - s0) * 1e6 / n);
                let wakes = (ctx_switches(pid) - w0) as f64 / n;
                cpu[i].push(per);
                println!(
                    "| {rate} | {} | {} | {err} | {:.3} | {per:.1} | {sys:.1} | {faults:.2} | {wakes:.2} |",
                    step_name(i, cache),
                    lat.len(),
                    Stats::pct(&lat, 0.5)
                );
            }
        }
        let (off, on) = (median(cpu[0].clone()), median(cpu[1].clone()));
        println!(
            "| {rate} | growth | | | | {:+.1} % (target ≤ 10 %; median of the rounds' own: {:+.1} %) |",
            (on / off - 1.0) * 100.0,
            paired_growth(&cpu)
        );
    }
    // The same at saturation: the gateway's CPU per request is at its lowest there
    // (no idle wake-ups to share), so the cache's own work is the largest part of it.
    println!(
        "\n## 3b. Every request a miss, saturation (closed loop, 64 connections), the cache full, median of {repeat} runs"
    );
    println!("| round | cache | req/s | gateway CPU µs/req | context switches / req |");
    println!("|---|---|---|---|---|");
    let mut cpu = [Vec::new(), Vec::new()];
    for run in 0..repeat {
        for i in round_order(run) {
            let cache = i == 1 && !aa;
            let pid = gw.child.id();
            let (c0, w0) = (cpu_secs(pid), ctx_switches(pid));
            let (rps, n) = saturate_of(gw.addr, 64, secs, Kind::Unique { cache }).await;
            let n = n.max(1) as f64;
            let per = (cpu_secs(pid) - c0) * 1e6 / n;
            let wakes = (ctx_switches(pid) - w0) as f64 / n;
            cpu[i].push(per);
            println!(
                "| {} | {} | {rps:.0} | {per:.1} | {wakes:.2} |",
                run + 1,
                step_name(i, cache)
            );
        }
    }
    let (off, on) = (median(cpu[0].clone()), median(cpu[1].clone()));
    println!(
        "| saturation | growth | | {:+.1} % (target ≤ 10 %; median of the rounds' own: {:+.1} %) | |",
        (on / off - 1.0) * 100.0,
        paired_growth(&cpu)
    );
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}
