//! `[shared].redis_url` unreachable (SPEC §6): the gateway starts, serves, limits `rpm`
//! on its own, warns, and shows `switchboard_shared_state_up 0`. Alone in its binary:
//! the gauge and the log are process-wide.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;

const LIMITED_KEY: &str = "sk-test-limited-key-0123456789";

/// Collects what the gateway logs.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn with_redis_unreachable_the_gateway_serves_and_says_so() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();

    let good = upstream(|_, _| async {
        json(
            200,
            json!({
                "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
            }),
        )
    })
    .await;
    let extra = format!(
        "[shared]\nredis_url = \"redis://127.0.0.1:1\"\nprefix = \"down:\"\n\
         [[keys]]\nsecret = \"{LIMITED_KEY}\"\nname = \"limited\"\ncredits_usd = 10\nrpm = 2\n"
    );
    let gw = gateway(&openai_config(&[("good", &good.url())], &extra)).await;
    let ask = json!({"model": "test/model", "messages": [{"role": "user", "content": "hi"}]});

    // Served; rpm kept by this instance alone.
    for _ in 0..3 {
        assert_eq!(post_chat(&gw, TEST_KEY, &ask).await.status(), 200);
    }
    assert_eq!(post_chat(&gw, LIMITED_KEY, &ask).await.status(), 200);
    assert_eq!(post_chat(&gw, LIMITED_KEY, &ask).await.status(), 200);
    let res = post_chat(&gw, LIMITED_KEY, &ask).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "30");

    // The gauge and the warning (poll: the ping task may be the one that notices).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = client()
            .get(gw.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains("switchboard_shared_state_up 0") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no gauge at 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = logs.text();
    let warnings: Vec<_> = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("Redis is unreachable"))
        .collect();
    assert_eq!(warnings.len(), 1, "warned once: {text}");
    assert!(
        warnings[0].contains("redis://127.0.0.1:1"),
        "{}",
        warnings[0]
    );
}
