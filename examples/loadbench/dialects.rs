//! `loadbench --dialects`: what the inbound APIs of SPEC §7 cost next to chat
//! completions. The same fake upstream answers OpenAI chat on `/v1/chat/completions`
//! and Anthropic Messages on `/v1/messages` (the same 10-word answer, or 20 streamed
//! text pieces, with usage); one gateway process serves `bench/model` (an openai-kind
//! endpoint) and `bench/claude` (an anthropic-kind one). Four cases, streamed and not,
//! interleaved within each repeat at a fixed rate:
//!
//! 1. chat completions → openai upstream (the baseline);
//! 2. `/v1/messages` → anthropic upstream (the same dialect both sides: pass-through);
//! 3. `/v1/responses` → openai upstream (the Responses API's nearest upstream);
//! 4. chat completions → anthropic upstream (for reference: a translated call).
//!
//! Reported: p50 latency and the gateway's CPU µs per request, and each case's CPU
//! over the baseline's. Target (issue 22): cases 2 and 3 ≤ 1.2× case 1.
//!
//! Run with: cargo run --release --example loadbench -- --dialects [--quick] [--secs N]
//! [--repeat N] [--rate R]

use super::*;

/// The Anthropic message the fake upstream answers on `/v1/messages`.
pub const MESSAGE: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"up","content":[{"type":"text","text":"The quick brown fox jumps over the lazy dog."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":10}}"#;

/// The Anthropic stream the fake upstream answers on `/v1/messages` with `"stream":true`.
pub fn message_events() -> Vec<Bytes> {
    let mut events = vec![Bytes::from_static(
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"up\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    )];
    events.extend((0..20).map(|i| {
        Bytes::from(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"tok{i} \"}}}}\n\n"
        ))
    }));
    events.push(Bytes::from_static(
        b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":20}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ));
    events
}

/// One case of the run.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    path: &'static str,
    model: &'static str,
}

const CASES: [Case; 4] = [
    Case {
        name: "chat → openai",
        path: "/v1/chat/completions",
        model: "bench/model",
    },
    Case {
        name: "messages → anthropic",
        path: "/v1/messages",
        model: "bench/claude",
    },
    Case {
        name: "responses → openai",
        path: "/v1/responses",
        model: "bench/model",
    },
    Case {
        name: "chat → anthropic",
        path: "/v1/chat/completions",
        model: "bench/claude",
    },
];

fn case_request(addr: SocketAddr, case: Case, stream: bool) -> Request<Full<Bytes>> {
    let prompt = "Say something short about foxes.";
    let body = match case.path {
        "/v1/responses" => format!(
            r#"{{"model":"{}","input":"{prompt}","max_output_tokens":64,"stream":{stream}}}"#,
            case.model
        ),
        _ => format!(
            r#"{{"model":"{}","messages":[{{"role":"user","content":"{prompt}"}}],"max_tokens":64,"stream":{stream}}}"#,
            case.model
        ),
    };
    Request::post(format!("http://{addr}{}", case.path))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// One request, read to its end: its latency, or None on error.
async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Option<Duration> {
    let t0 = Instant::now();
    let res = match client.request(req).await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => return failed(r.status()),
        Err(e) => return failed(e),
    };
    res.into_body().collect().await.ok()?;
    Some(t0.elapsed())
}

/// Open loop at `rate` req/s for `secs`: (latencies µs, errors).
async fn fixed_rate_of(
    addr: SocketAddr,
    rate: u64,
    secs: u64,
    case: Case,
    stream: bool,
) -> (Vec<u64>, usize) {
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
        let req = case_request(addr, case, stream);
        tokio::spawn(async move {
            let r = send(&client, req).await;
            drop(permit);
            let _ = tx.send(r);
        });
    }
    drop(tx);
    let (mut lat, mut errors) = (Vec::new(), 0);
    while let Some(r) = rx.recv().await {
        match r {
            Some(d) => lat.push(d.as_micros() as u64),
            None => errors += 1,
        }
    }
    (lat, errors)
}

pub async fn run(args: &[String]) {
    let BenchArgs { secs, repeat, .. } = BenchArgs::parse(args, (1, 4), (1, 5));
    let rate: u64 = args
        .iter()
        .position(|a| a == "--rate")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(1000);
    let pin = pin_self();
    let dir =
        std::env::temp_dir().join(format!("switchboard-bench-dialects-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let up = spawn(&["upstream"], Some(0));
    let cfg = write_config(&dir, up.addr);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text = text.replacen(
        "[[models]]",
        &format!(
            "[[providers]]\nname = \"upa\"\nkind = \"anthropic\"\nbase_url = \"http://{}\"\napi_key = \"sk-upstream\"\n\n[[models]]\nid = \"bench/claude\"\nmax_output_tokens = 64\n  [[models.endpoints]]\n  provider = \"upa\"\n  upstream_model = \"up\"\n  prompt_usd_per_mtok = 0.15\n  completion_usd_per_mtok = 0.6\n\n[[models]]",
            up.addr
        ),
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let gw = spawn(&["gateway", &up.addr.to_string(), &cfg], Some(1));
    println!(
        "# switchboard inbound APIs benchmark ({rate} req/s, {secs} s per step, {repeat} runs{})",
        if pin { ", gateway pinned to CPU 1" } else { "" }
    );
    for stream in [false, true] {
        for case in CASES {
            let (lat, err) = fixed_rate_of(gw.addr, 200, 1, case, stream).await;
            assert!(
                err == 0 && !lat.is_empty(),
                "{} (stream {stream}) fails: run with LB_ERRORS=1",
                case.name
            );
        }
    }
    for stream in [false, true] {
        println!(
            "\n## {} (median of {repeat} runs)",
            if stream { "Streamed" } else { "Not streamed" }
        );
        println!("| case | ok | err | p50 ms | gateway CPU µs/req | CPU / chat → openai |");
        println!("|---|---|---|---|---|---|");
        let mut cpu = vec![Vec::new(); CASES.len()];
        let mut p50 = vec![Vec::new(); CASES.len()];
        let mut counts = vec![(0usize, 0usize); CASES.len()];
        for _ in 0..repeat {
            for (i, case) in CASES.into_iter().enumerate() {
                let pid = gw.child.id();
                let c0 = cpu_secs(pid);
                let (lat, err) = fixed_rate_of(gw.addr, rate, secs, case, stream).await;
                cpu[i].push((cpu_secs(pid) - c0) * 1e6 / lat.len().max(1) as f64);
                p50[i].push(Stats::pct(&lat, 0.5));
                counts[i].0 += lat.len();
                counts[i].1 += err;
            }
        }
        let base = median(cpu[0].clone());
        for (i, case) in CASES.iter().enumerate() {
            let c = median(cpu[i].clone());
            println!(
                "| {} | {} | {} | {:.3} | {c:.1} | {:.2} |",
                case.name,
                counts[i].0,
                counts[i].1,
                median(p50[i].clone()),
                c / base
            );
        }
    }
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}
