//! `loadbench --otlp`: what OpenTelemetry export costs (SPEC §9, issue 24). Two
//! gateway processes with the same config but one: the second has
//! `[telemetry].otlp_endpoint`, pointing at a collector that accepts every batch and
//! drops it (`loadbench collector`). Both serve the fake upstream at a fixed rate,
//! interleaved within each repeat; reported: p50 latency and each gateway's CPU µs per
//! request (the exporter's thread included), and the ratio on / off.
//! Target (issue 24): CPU per request with export on ≤ 1.10 × off.
//!
//! Runs alternate which gateway goes first. `--aa` exports from neither (the
//! calibration: what the ratio reads when nothing differs).
//!
//! Run with: cargo run --release --example loadbench -- --otlp [--quick] [--secs N]
//! [--repeat N] [--rate R] [--aa]

use super::*;

/// The collector role: `POST /v1/traces` read to its end and answered 200, empty.
pub async fn collector() {
    serve_fn(|req: Request<Incoming>| async move {
        let _ = req.into_body().collect().await;
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "application/x-protobuf")
                .body(Full::new(Bytes::new()).boxed())
                .unwrap(),
        )
    })
    .await
}

pub async fn run(args: &[String]) {
    let BenchArgs { secs, repeat, .. } = BenchArgs::parse(args, (1, 4), (1, 5));
    let rate: u64 = args
        .iter()
        .position(|a| a == "--rate")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(1000);
    let pin = pin_self();
    let dir = std::env::temp_dir().join(format!("switchboard-bench-otlp-{}", std::process::id()));
    let (dir_off, dir_on) = (dir.join("off"), dir.join("on"));
    std::fs::create_dir_all(&dir_off).unwrap();
    std::fs::create_dir_all(&dir_on).unwrap();
    let up = spawn(&["upstream"], Some(0));
    let col = spawn(&["collector"], Some(0));
    let cfg_off = write_config(&dir_off, up.addr);
    let cfg_on = write_config(&dir_on, up.addr);
    let mut text = std::fs::read_to_string(&cfg_on).unwrap();
    text.push_str(&format!(
        "\n[telemetry]\notlp_endpoint = \"http://{}\"\n",
        col.addr
    ));
    // `--aa`: the calibration, both gateways without export (what the on / off ratio
    // reads when nothing differs).
    let aa = args.iter().any(|a| a == "--aa");
    if !aa {
        std::fs::write(&cfg_on, text).unwrap();
    }
    let off = spawn(&["gateway", &up.addr.to_string(), &cfg_off], Some(1));
    let on = spawn(&["gateway", &up.addr.to_string(), &cfg_on], Some(1));
    println!(
        "# switchboard OTLP export benchmark ({rate} req/s, {secs} s per step, {repeat} runs{})",
        if pin {
            ", gateways pinned to CPU 1"
        } else {
            ""
        }
    );
    // Warm-up: connections, caches, the exporter's first batches.
    for gw in [&off, &on] {
        let st = fixed_rate(gw.addr, 200, 1, false).await;
        assert!(
            st.errors == 0 && st.ok > 0,
            "warm-up fails: run with LB_ERRORS=1"
        );
    }
    for stream in [false, true] {
        println!(
            "\n## {} (median of {repeat} runs)",
            if stream { "Streamed" } else { "Not streamed" }
        );
        println!("| export | ok | err | p50 ms | gateway CPU µs/req | CPU / off |");
        println!("|---|---|---|---|---|---|");
        let targets = [("off", &off), ("on", &on)];
        let mut cpu = vec![Vec::new(); 2];
        let mut p50 = vec![Vec::new(); 2];
        let mut counts = [(0usize, 0usize); 2];
        for run in 0..repeat {
            // Each run in the other order than the last: the second of two steps on
            // one CPU can pay for the first (caches, the first's log writer flushing).
            let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let gw = targets[i].1;
                let pid = gw.child.id();
                let c0 = cpu_secs(pid);
                let st = fixed_rate(gw.addr, rate, secs, stream).await;
                cpu[i].push((cpu_secs(pid) - c0) * 1e6 / st.ok.max(1) as f64);
                p50[i].push(Stats::pct(&st.total, 0.5));
                counts[i].0 += st.ok;
                counts[i].1 += st.errors;
            }
        }
        let base = median(cpu[0].clone());
        for (i, (name, _)) in targets.iter().enumerate() {
            let c = median(cpu[i].clone());
            println!(
                "| {name} | {} | {} | {:.3} | {c:.1} | {:.3} |",
                counts[i].0,
                counts[i].1,
                median(p50[i].clone()),
                c / base
            );
        }
    }
    drop((off, on, col, up));
    let _ = std::fs::remove_dir_all(&dir);
}
