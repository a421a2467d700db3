//! `loadbench --reload`: fixed-rate load while the config is reloaded every 100 ms
//! (issue 24: no failed request, no latency spike beyond the run's p99).
//!
//! One gateway process serves `bench/model`; the load runs twice at the same rate,
//! first without reloads, then while this process rewrites the config file (the
//! completion price alternates) and calls `POST /admin/reload` every 100 ms. Reported
//! per run: requests answered, failed, p50 / p99 / max latency, reloads done.
//!
//! Run with: cargo run --release --example loadbench -- --reload [--quick] [--secs N]
//! [--rate R]

use super::*;

const ADMIN_ENV: &str = "SB_BENCH_ADMIN";
const ADMIN: &str = "bench-admin-token-0123456789";

pub async fn run(args: &[String]) {
    let a = BenchArgs::parse(args, (3, 10), (1, 1));
    let rate: u64 = args
        .iter()
        .position(|x| x == "--rate")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    pin_self();
    let up = spawn(&["upstream"], Some(0));
    let dir = std::env::temp_dir().join(format!("sb-bench-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = write_config(&dir, up.addr);
    let base = std::fs::read_to_string(&path).unwrap()
        + &format!("\n[admin]\ntoken_env = \"{ADMIN_ENV}\"\n");
    std::fs::write(&path, &base).unwrap();
    std::env::set_var(ADMIN_ENV, ADMIN);
    let gw = spawn(&["gateway", &up.addr.to_string(), &path], Some(1));
    // Warm up.
    let _ = fixed_rate(gw.addr, rate, 1, false).await;

    println!("reload under load: {rate} req/s for {} s per run", a.secs);
    println!("| run | answered | failed | p50 ms | p99 ms | max ms | reloads |");
    println!("|---|---|---|---|---|---|---|");
    let quiet = fixed_rate(gw.addr, rate, a.secs, false).await;
    row("no reloads", &quiet, 0);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reloads = Arc::new(AtomicUsize::new(0));
    let failed_reloads = Arc::new(AtomicUsize::new(0));
    let reloader = {
        let (stop, reloads, failed) = (stop.clone(), reloads.clone(), failed_reloads.clone());
        let (addr, path, base) = (gw.addr, path.clone(), base.clone());
        tokio::spawn(async move {
            let client = client();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let price = if n.is_multiple_of(2) { "0.6" } else { "0.7" };
                let text = base.replace(
                    "completion_usd_per_mtok = 0.6",
                    &format!("completion_usd_per_mtok = {price}"),
                );
                std::fs::write(&path, text).unwrap();
                let req = Request::post(format!("http://{addr}/admin/reload"))
                    .header("authorization", format!("Bearer {ADMIN}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                match client.request(req).await {
                    Ok(res) if res.status() == 200 => {
                        let _ = res.into_body().collect().await;
                        reloads.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let busy = fixed_rate(gw.addr, rate, a.secs, false).await;
    stop.store(true, Ordering::Relaxed);
    let _ = reloader.await;
    row(
        "reload every 100 ms",
        &busy,
        reloads.load(Ordering::Relaxed),
    );
    let failed = failed_reloads.load(Ordering::Relaxed);
    if failed > 0 {
        println!("reloads that failed: {failed}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn row(name: &str, st: &Stats, reloads: usize) {
    println!(
        "| {name} | {} | {} | {:.3} | {:.3} | {:.3} | {reloads} |",
        st.ok,
        st.errors + st.not_sent,
        Stats::pct(&st.total, 0.5),
        Stats::pct(&st.total, 0.99),
        Stats::pct(&st.total, 1.0),
    );
}
