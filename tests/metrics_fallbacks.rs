//! `switchboard_fallbacks_total` counts each fallback once. Its own test binary, so the
//! process-wide metrics registry holds only this test's requests.

mod common;

use common::*;
use serde_json::json;

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn one_fallback_is_counted_once() {
    let down = upstream(|_, _| async { json(503, json!({"error": {"message": "busy"}})) }).await;
    let up = upstream(|_, _| async {
        json(
            200,
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
        )
    })
    .await;
    let gw = gateway(&openai_config(
        &[("down", &down.url()), ("up", &up.url())],
        "",
    ))
    .await;
    let body = json!({"model": "test/model", "messages": [{"role": "user", "content": "hi"}],
                      "provider": {"order": ["down", "up"]}});
    let res = post_chat(&gw, TEST_KEY, &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-provider"], "up");
    res.bytes().await.unwrap();

    let series = "switchboard_fallbacks_total ";
    let start = std::time::Instant::now();
    loop {
        let text = client()
            .get(gw.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let n = sample(&text, series.trim_end());
        if n > 0.0 {
            assert_eq!(n, 1.0, "one fallback, counted once:\n{text}");
            break;
        }
        assert!(
            start.elapsed() < SOCKET_TIMEOUT,
            "fallbacks_total never moved:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
