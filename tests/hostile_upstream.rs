//! A hostile upstream against the real `switchboard` binary (issue 20): absurd
//! indices, usage numbers and headers, giant and endless bodies, lines that never
//! end, slow drips, echoed credentials.
//!
//! Every case runs against `switchboard serve` under a memory limit
//! ([`PROCESS_DATA_LIMIT`]), so an allocation bomb kills the process under test and
//! fails the test instead of the machine. Each hostile provider serves its own model
//! `h/NAME` with a healthy OpenAI-kind provider `good` behind it: asked with
//! `provider.only = [NAME]` the client must get the right error, asked with
//! `provider.order = [NAME, "good"]` it must be served by `good`; after each case the
//! process must still be alive.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// One hostile provider of a test config.
struct Hostile {
    name: &'static str,
    kind: &'static str,
    url: String,
    /// Extra `[[providers]]` lines (limits, timeouts).
    extra: &'static str,
}

fn hostile(name: &'static str, kind: &'static str, up: &Upstream, extra: &'static str) -> Hostile {
    let url = if kind == "openai" {
        format!("{}/v1", up.url())
    } else {
        up.url()
    };
    Hostile {
        name,
        kind,
        url,
        extra,
    }
}

/// The healthy upstream every model falls back to.
async fn good_upstream() -> Upstream {
    upstream(|seen, _| async move {
        if seen.body["stream"] == json!(true) {
            let events = [
                json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "fine"}}]}),
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
                json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}),
            ];
            let mut data: Vec<String> = events.iter().map(Value::to_string).collect();
            data.push("[DONE]".into());
            sse(data, Duration::ZERO)
        } else {
            json(
                200,
                json!({
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                }),
            )
        }
    })
    .await
}

fn config(good: &Upstream, hostiles: &[Hostile], extra: &str) -> String {
    let mut s = String::from(
        "[health]\nfailure_threshold = 1000\n\n[retry]\nmax_attempts = 3\nbase_backoff_ms = 10\nmax_backoff_ms = 20\n\n",
    );
    s.push_str(&format!(
        "[[providers]]\nname = \"good\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\napi_key = \"sk-upstream-good\"\ntimeout_secs = 30\nstream_idle_timeout_secs = 30\n\n",
        good.url()
    ));
    for h in hostiles {
        s.push_str(&format!(
            "[[providers]]\nname = \"{}\"\nkind = \"{}\"\nbase_url = \"{}\"\napi_key = \"sk-upstream-{}\"\ntimeout_secs = 30\n{}\n\n",
            h.name, h.kind, h.url, h.name, h.extra
        ));
    }
    for h in hostiles {
        s.push_str(&format!(
            "[[models]]\nid = \"h/{}\"\nmax_output_tokens = 100\n",
            h.name
        ));
        for p in [h.name, "good"] {
            s.push_str(&format!(
                "  [[models.endpoints]]\n  provider = \"{p}\"\n  upstream_model = \"m\"\n  prompt_usd_per_mtok = 1\n  completion_usd_per_mtok = 2\n"
            ));
        }
        s.push('\n');
    }
    s.push_str(extra);
    s.push_str("\n[[keys]]\nsecret = \"sk-hostile-client-key-000\"\nname = \"hostile\"\ncredits_usd = 1000\n");
    s
}

/// Asks model `h/NAME`, through `NAME` only or with `good` behind it.
async fn ask(
    gw: &GatewayProcess,
    key: &str,
    name: &str,
    stream: bool,
    only: bool,
) -> reqwest::Response {
    let provider = if only {
        json!({"only": [name]})
    } else {
        json!({"order": [name, "good"]})
    };
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({
            "model": format!("h/{name}"), "stream": stream, "provider": provider,
            "messages": [{"role": "user", "content": "hello"}]
        }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{name}: no answer from the gateway: {e}"))
}

/// The SPEC §3.2 error of a response, checking its shape.
async fn error_of(res: reqwest::Response, what: &str) -> Value {
    let body: Value = res
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what}: not a JSON error body: {e}"));
    let err = &body["error"];
    for field in ["message", "type", "code"] {
        assert!(
            err[field].is_string(),
            "{what}: error without {field}: {body}"
        );
    }
    err.clone()
}

/// `NAME` alone gives `status` with `code`; with `good` behind it the request is
/// served by `good`; the process is alive after both.
async fn check_case(gw: &mut GatewayProcess, name: &str, stream: bool, status: u16, code: &str) {
    let what = format!("{name} (stream: {stream})");
    let res = ask(gw, "sk-hostile-client-key-000", name, stream, true).await;
    assert_eq!(res.status(), status, "{what}: status alone");
    let err = error_of(res, &what).await;
    assert_eq!(err["code"], code, "{what}: {err}");
    gw.assert_alive(&what);

    let res = ask(gw, "sk-hostile-client-key-000", name, stream, false).await;
    assert_eq!(res.status(), 200, "{what}: with a fallback");
    assert_eq!(res.headers()["x-provider"], "good", "{what}");
    let text = res.text().await.unwrap();
    let content = if stream {
        sse_text(&text)
    } else {
        serde_json::from_str::<Value>(&text).unwrap()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(content, "fine", "{what}: {text}");
    gw.assert_alive(&what);
}

fn sse_of(events: Vec<Value>) -> axum::response::Response {
    let mut data: Vec<String> = events.iter().map(Value::to_string).collect();
    data.push("[DONE]".into());
    sse(data, Duration::ZERO)
}

/// `choices[].index` of 4294967295 was an allocation size (412 GB: the process
/// aborted); the tool-call index too. Every index from an upstream is bounded, in
/// both kinds that carry one, streamed or not.
#[tokio::test]
async fn absurd_indices_are_broken_answers_not_allocations() {
    let good = good_upstream().await;
    let oa_choice = upstream(|_, _| async {
        json(
            200,
            json!({"choices": [{"index": 4294967295u32, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
        )
    })
    .await;
    let oa_tools = upstream(|_, _| async {
        let calls: Vec<Value> = (0..1025)
            .map(|i| json!({"id": format!("c{i}"), "type": "function", "function": {"name": "f", "arguments": "{}"}}))
            .collect();
        json(
            200,
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": calls}, "finish_reason": "tool_calls"}]}),
        )
    })
    .await;
    let oa_choice_stream = upstream(|_, _| async {
        sse_of(vec![
            json!({"choices": [{"index": 4294967295u32, "delta": {"role": "assistant", "content": "x"}}]}),
            json!({"choices": [{"index": 4294967295u32, "delta": {}, "finish_reason": "stop"}]}),
        ])
    })
    .await;
    let oa_tool_stream = upstream(|_, _| async {
        sse_of(vec![
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
                {"index": 4294967295u32, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        ])
    })
    .await;
    let gemini = |stream_too: bool| async move {
        upstream(move |seen, _| async move {
            let answer = json!({
                "candidates": [{"content": {"role": "model", "parts": [{"text": "x"}]}, "finishReason": "STOP", "index": 4294967295u32}],
                "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1}
            });
            if stream_too && seen.path.contains("streamGenerateContent") {
                sse(vec![answer.to_string()], Duration::ZERO)
            } else {
                json(200, answer)
            }
        })
        .await
    };
    let gem = gemini(true).await;
    // Anthropic's content-block index is only a key: a large one is served.
    let anthropic = upstream(|_, _| async {
        let block = 4294967295u32;
        sse_named(
            vec![
                (Some("message_start".into()), json!({"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1}}}).to_string()),
                (Some("content_block_start".into()), json!({"type": "content_block_start", "index": block, "content_block": {"type": "text", "text": ""}}).to_string()),
                (Some("content_block_delta".into()), json!({"type": "content_block_delta", "index": block, "delta": {"type": "text_delta", "text": "fine"}}).to_string()),
                (Some("content_block_stop".into()), json!({"type": "content_block_stop", "index": block}).to_string()),
                (Some("message_delta".into()), json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}).to_string()),
                (Some("message_stop".into()), json!({"type": "message_stop"}).to_string()),
            ],
            Duration::ZERO,
        )
    })
    .await;
    let mut gw = GatewayProcess::start(&config(
        &good,
        &[
            hostile("oa_choice", "openai", &oa_choice, ""),
            hostile("oa_tools", "openai", &oa_tools, ""),
            hostile("oa_choice_stream", "openai", &oa_choice_stream, ""),
            hostile("oa_tool_stream", "openai", &oa_tool_stream, ""),
            hostile("gem", "gemini", &gem, ""),
            hostile("anth", "anthropic", &anthropic, ""),
        ],
        "",
    ))
    .await;

    check_case(&mut gw, "oa_choice", false, 502, "upstream_error").await;
    check_case(&mut gw, "oa_tools", false, 502, "upstream_error").await;
    check_case(&mut gw, "oa_choice_stream", true, 502, "upstream_error").await;
    check_case(&mut gw, "oa_tool_stream", true, 502, "upstream_error").await;
    check_case(&mut gw, "gem", false, 502, "upstream_error").await;
    check_case(&mut gw, "gem", true, 502, "upstream_error").await;

    let res = ask(&gw, "sk-hostile-client-key-000", "anth", true, true).await;
    assert_eq!(res.status(), 200);
    assert_eq!(sse_text(&res.text().await.unwrap()), "fine");
    gw.assert_alive("a large anthropic block index");
}

/// Usage numbers no real answer has: u64::MAX counts (whose sums overflowed and
/// panicked the request task), and numbers that are not u64 at all: broken answers.
#[tokio::test]
async fn absurd_usage_numbers_never_panic() {
    let good = good_upstream().await;
    let max = u64::MAX;
    let oa_max = upstream(move |_, _| async move {
        json(
            200,
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": max, "completion_tokens": max, "total_tokens": max,
                             "prompt_tokens_details": {"cached_tokens": max}}}),
        )
    })
    .await;
    let gem_max = upstream(move |_, _| async move {
        json(
            200,
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "x"}]}, "finishReason": "STOP", "index": 0}],
                   "usageMetadata": {"promptTokenCount": max, "candidatesTokenCount": max, "thoughtsTokenCount": max}}),
        )
    })
    .await;
    let anth_max = upstream(move |_, _| async move {
        json(
            200,
            json!({"type": "message", "role": "assistant", "content": [{"type": "text", "text": "x"}], "stop_reason": "end_turn",
                   "usage": {"input_tokens": max, "output_tokens": max, "cache_read_input_tokens": max, "cache_creation_input_tokens": max}}),
        )
    })
    .await;
    // Not u64s: a float, a negative number, a number past u64.
    let not_u64 = upstream(|_, n| async move {
        let usage = ["1e15", "-5", "100000000000000000000000000000"][n % 3];
        let body = format!(
            r#"{{"choices": [{{"index": 0, "message": {{"role": "assistant", "content": "x"}}, "finish_reason": "stop"}}],
                "usage": {{"prompt_tokens": {usage}, "completion_tokens": 1, "total_tokens": 2}}}}"#
        );
        axum::response::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .unwrap()
    })
    .await;
    let at_bound = upstream(|_, _| async {
        let n = 1u64 << 53;
        json(
            200,
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": n, "completion_tokens": n, "total_tokens": n}}),
        )
    })
    .await;
    let mut gw = GatewayProcess::start(&config(
        &good,
        &[
            hostile("at_bound", "openai", &at_bound, ""),
            hostile("oa_max", "openai", &oa_max, ""),
            hostile("gem_max", "gemini", &gem_max, ""),
            hostile("anth_max", "anthropic", &anth_max, ""),
            hostile("not_u64", "openai", &not_u64, ""),
        ],
        // Its own key: whatever such a charge does to a balance is not this test's.
        "[[keys]]\nsecret = \"sk-usage-client-key-00000\"\nname = \"usage\"\ncredits_usd = 1000\n",
    ))
    .await;

    for name in ["oa_max", "gem_max", "anth_max"] {
        check_case(&mut gw, name, false, 502, "upstream_error").await;
    }
    // 1e15, -5, 1e29: one of each per round (the upstream cycles through them).
    for _ in 0..3 {
        let res = ask(&gw, "sk-hostile-client-key-000", "not_u64", false, true).await;
        assert_eq!(res.status(), 502);
        assert_eq!(error_of(res, "not_u64").await["code"], "upstream_error");
        gw.assert_alive("usage that is not a u64");
    }
    check_case(&mut gw, "not_u64", false, 502, "upstream_error").await;
    // Below the bound, a large count is served (what it may cost is the credit
    // layer's business): 2^53 tokens is still a number.
    let res = ask(&gw, "sk-usage-client-key-00000", "at_bound", false, true).await;
    let status = res.status();
    let text = res.text().await.unwrap();
    if status != 200 {
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v["error"]["code"].is_string(), "{status} {text}");
    }
    gw.assert_alive("usage at the bound");
}

/// `Retry-After: 1e20` (or `inf`, or a huge `retry-after-ms`) panicked the request
/// task at `Duration::from_secs_f64`: the client got a closed connection. Every form
/// is clamped to a day or ignored; an HTTP date is read.
#[tokio::test]
async fn absurd_retry_after_headers_are_clamped() {
    let good = good_upstream().await;
    // (provider, header, value, the client's Retry-After, or None for "1 to a day")
    let cases: [(&'static str, &'static str, &'static str, Option<u64>); 8] = [
        ("ra_1e20", "retry-after", "1e20", Some(86400)),
        ("ra_inf", "retry-after", "inf", Some(86400)),
        ("ra_nan", "retry-after", "NaN", None),
        ("ra_neg", "retry-after", "-1", None),
        ("ra_u64", "retry-after", "18446744073709551616", Some(86400)),
        ("ra_ms", "retry-after-ms", "1e300", Some(86400)),
        (
            "ra_far_date",
            "retry-after",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            Some(86400),
        ),
        (
            "ra_past_date",
            "retry-after",
            "Sun, 06 Nov 1994 08:49:37 GMT",
            None,
        ),
    ];
    let mut hostiles = Vec::new();
    for (name, header, value, _) in cases {
        let up = upstream(move |_, _| async move {
            axum::response::Response::builder()
                .status(429)
                .header("content-type", "application/json")
                .header(header, value)
                .body(axum::body::Body::from(
                    r#"{"error":{"message":"slow down"}}"#,
                ))
                .unwrap()
        })
        .await;
        hostiles.push(hostile(name, "openai", &up, ""));
    }
    let mut gw = GatewayProcess::start(&config(&good, &hostiles, "")).await;
    for (name, _, value, want) in cases {
        let res = ask(&gw, "sk-hostile-client-key-000", name, false, true).await;
        assert_eq!(res.status(), 429, "{name}");
        let after: u64 = res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("{name}: Retry-After is not whole seconds: {e}"));
        match want {
            Some(secs) => assert_eq!(after, secs, "{name}: {value}"),
            None => assert!((1..=86400).contains(&after), "{name}: {after}"),
        }
        assert_eq!(error_of(res, name).await["code"], "rate_limited");
        gw.assert_alive(name);
        // Parked or not, the model is still served by `good`.
        let res = ask(&gw, "sk-hostile-client-key-000", name, false, false).await;
        assert_eq!(res.status(), 200, "{name} with a fallback");
        assert_eq!(res.headers()["x-provider"], "good");
        gw.assert_alive(name);
    }
}

static LINE: [u8; 65536] = [b'x'; 65536];

/// Giant and endless bodies, lines that never end, slow drips: each is a failed
/// attempt (fallback, else 502 / 504), and memory stays bounded.
#[tokio::test]
async fn giant_endless_and_dripping_bodies_are_failed_attempts() {
    let good = good_upstream().await;
    // A valid chat.completion of 300 MB (it went through to the client, RSS +900 MB),
    // announced by Content-Length: refused before it is read.
    let giant = upstream(|_, _| async {
        const HEAD: &[u8] = br#"{"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":""#;
        const TAIL: &[u8] = br#""}}]}"#;
        let body = futures_util::stream::once(async { bytes::Bytes::from_static(HEAD) })
            .chain(futures_util::stream::iter(
                (0..4800).map(|_| bytes::Bytes::from_static(&LINE)),
            ))
            .chain(futures_util::stream::once(async { bytes::Bytes::from_static(TAIL) }))
            .map(Ok::<_, std::convert::Infallible>);
        axum::response::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .header(
                "content-length",
                (HEAD.len() + 4800 * LINE.len() + TAIL.len()).to_string(),
            )
            .body(axum::body::Body::from_stream(body))
            .unwrap()
    })
    .await;
    // The same without Content-Length (chunked): cut off at the limit.
    let giant_chunked = upstream(|_, _| async {
        const HEAD: &[u8] = br#"{"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":""#;
        const TAIL: &[u8] = br#""}}]}"#;
        let body = futures_util::stream::once(async { bytes::Bytes::from_static(HEAD) })
            .chain(futures_util::stream::iter(
                (0..32).map(|_| bytes::Bytes::from_static(&LINE)),
            ))
            .chain(futures_util::stream::once(async { bytes::Bytes::from_static(TAIL) }))
            .map(Ok::<_, std::convert::Infallible>);
        axum::response::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(axum::body::Body::from_stream(body))
            .unwrap()
    })
    .await;
    let endless_json =
        upstream(|_, _| async { endless("application/json", b"{\"choices\":[", &LINE) }).await;
    let endless_pings = upstream(|_, _| async {
        endless(
            "text/event-stream",
            b"",
            b": still thinking, still thinking, still thinking\n",
        )
    })
    .await;
    let endless_content = upstream(|_, _| async {
        endless(
            "text/event-stream",
            b"",
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"more \"}}]}\n\n",
        )
    })
    .await;
    let endless_line =
        upstream(|_, _| async { endless("text/event-stream", b"data: ", &LINE) }).await;
    let drip_json = upstream(|_, _| async {
        drip(
            "application/json",
            b"{\"choices\":[",
            b" ",
            Duration::from_millis(100),
        )
    })
    .await;
    let drip_sse = upstream(|_, _| async {
        drip(
            "text/event-stream",
            b"",
            b"data: {\"choices\":",
            Duration::from_millis(100),
        )
    })
    .await;
    const SMALL: &str = "max_response_bytes = 1048576\nstream_idle_timeout_secs = 30";
    const DRIP: &str = "stream_idle_timeout_secs = 2";
    let mut gw = GatewayProcess::start(&config(
        &good,
        &[
            hostile("giant", "openai", &giant, SMALL),
            hostile("giant_chunked", "openai", &giant_chunked, SMALL),
            hostile("endless_json", "openai", &endless_json, SMALL),
            hostile("endless_pings", "openai", &endless_pings, SMALL),
            hostile("endless_content", "openai", &endless_content, SMALL),
            // Above the SSE parser's 16 MiB event cap, so that cap is what ends it.
            hostile(
                "endless_line",
                "openai",
                &endless_line,
                "max_response_bytes = 67108864\nstream_idle_timeout_secs = 30",
            ),
            hostile("drip_json", "openai", &drip_json, DRIP),
            hostile("drip_sse", "openai", &drip_sse, DRIP),
        ],
        "",
    ))
    .await;

    check_case(&mut gw, "giant", false, 502, "upstream_error").await;
    check_case(&mut gw, "giant_chunked", false, 502, "upstream_error").await;
    check_case(&mut gw, "endless_json", false, 502, "upstream_error").await;
    check_case(&mut gw, "endless_pings", true, 502, "upstream_error").await;
    check_case(&mut gw, "endless_line", true, 502, "upstream_error").await;
    check_case(&mut gw, "drip_json", false, 504, "upstream_timeout").await;
    check_case(&mut gw, "drip_sse", true, 504, "upstream_timeout").await;

    // Content was forwarded, then the stream passed max_response_bytes: the SPEC
    // §3.2 mid-stream error chunk, then [DONE].
    let res = ask(
        &gw,
        "sk-hostile-client-key-000",
        "endless_content",
        true,
        true,
    )
    .await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "error", "{last}");
    assert_eq!(last["error"]["code"], "upstream_error", "{last}");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_response_bytes"),
        "{last}"
    );
    // At most max_response_bytes of upstream events were relayed.
    let event = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"more \"}}]}\n\n";
    let most = (1 << 20) / event.len();
    let relayed = data.len() - 2;
    assert!(
        relayed > 0 && relayed <= most,
        "{relayed} chunks relayed, at most {most}"
    );
    gw.assert_alive("an endless stream of content");
}

/// An upstream that echoes its request leaked `Authorization: Bearer <provider
/// key>` to the client: its messages are relayed with credentials redacted.
#[tokio::test]
async fn echoed_credentials_are_redacted() {
    let good = good_upstream().await;
    // 400: the request's fault, relayed to the client as it is (but redacted).
    let echo400 = upstream(|seen, _| async move {
        let auth = seen.header("authorization").unwrap_or_default().to_string();
        json(
            400,
            json!({"error": {"message": format!("bad request; you sent authorization: {auth}")}}),
        )
    })
    .await;
    // 500 with a plain-text body: the 502 lists the attempt's message.
    let echo500 = upstream(|seen, _| async move {
        let auth = seen.header("authorization").unwrap_or_default().to_string();
        axum::response::Response::builder()
            .status(500)
            .body(axum::body::Body::from(format!(
                "upstream crashed on request: Authorization: {auth}\n"
            )))
            .unwrap()
    })
    .await;
    // A 200 that is not a chat.completion: the parser's error quotes the string.
    let echo_bad = upstream(|seen, _| async move {
        let auth = seen.header("authorization").unwrap_or_default().to_string();
        json(200, json!({"choices": auth}))
    })
    .await;
    // Gemini's key arrives in `x-goog-api-key`; an in-band stream error echoes it.
    let echo_gem = upstream(|seen, _| async move {
        let key = seen
            .header("x-goog-api-key")
            .unwrap_or_default()
            .to_string();
        sse(
            vec![
                json!({"error": {"code": 500, "message": format!("internal; key={key} {key}")}})
                    .to_string(),
            ],
            Duration::ZERO,
        )
    })
    .await;
    let mut gw = GatewayProcess::start(&config(
        &good,
        &[
            hostile("echo400", "openai", &echo400, ""),
            hostile("echo500", "openai", &echo500, ""),
            hostile("echo_bad", "openai", &echo_bad, ""),
            hostile("echo_gem", "gemini", &echo_gem, ""),
        ],
        "",
    ))
    .await;
    for (name, stream, status) in [
        ("echo400", false, 400),
        ("echo500", false, 502),
        ("echo_bad", false, 502),
        ("echo_gem", true, 502),
    ] {
        let res = ask(&gw, "sk-hostile-client-key-000", name, stream, true).await;
        assert_eq!(res.status(), status, "{name}");
        let text = res.text().await.unwrap();
        assert!(
            !text.contains(&format!("sk-upstream-{name}")),
            "{name} leaked its key: {text}"
        );
        assert!(text.contains("[REDACTED]"), "{name}: {text}");
        gw.assert_alive(name);
    }
}

/// `mock/lorem` with `max_tokens: 4294967295` on a free model aborted the process on
/// a 68 GB allocation: it writes at most 4,096 words.
#[tokio::test]
async fn mock_lorem_with_a_huge_max_tokens_is_capped() {
    let mut gw = GatewayProcess::start(
        r#"
[[providers]]
name = "mock"
kind = "mock"

[[models]]
id = "mock/lorem"
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "lorem"
  prompt_usd_per_mtok = 0
  completion_usd_per_mtok = 0

[[keys]]
secret = "sk-hostile-client-key-000"
name = "hostile"
credits_usd = 1
"#,
    )
    .await;
    for stream in [false, true] {
        let res = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth("sk-hostile-client-key-000")
            .json(
                &json!({"model": "mock/lorem", "max_tokens": 4294967295u32, "stream": stream,
                          "messages": [{"role": "user", "content": "go"}]}),
            )
            .send()
            .await
            .unwrap_or_else(|e| panic!("stream {stream}: no answer: {e}"));
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        let words = if stream {
            sse_text(&text)
        } else {
            serde_json::from_str::<Value>(&text).unwrap()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(words.split_whitespace().count(), 4096, "stream {stream}");
        gw.assert_alive("mock/lorem with max_tokens 4294967295");
    }
}
