//! What each upstream receives, as a newcomer's config sets it up: the completion
//! limit's field (`max_tokens_field`), keyless providers (no key header at all), base
//! URLs that already end in the version path, and Azure OpenAI's deployment URL with
//! its `api-version` query and `api-key` header. Fakes are real servers on 127.0.0.1.

mod common;

use common::*;
use serde_json::{json, Value};

fn completion() -> Value {
    json!({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    })
}

/// One openai-kind provider `p` at `base_url` with the extra provider lines, serving
/// `test/model` (at most 100 tokens out), and [`TEST_KEY`].
fn openai(base_url: &str, provider_lines: &str) -> String {
    format!(
        r#"
[[providers]]
name = "p"
kind = "openai"
base_url = "{base_url}"
timeout_secs = 5
{provider_lines}

[[models]]
id = "test/model"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "p"
  upstream_model = "up-model"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[keys]]
secret = "{TEST_KEY}"
credits_usd = 100
"#
    )
}

async fn ask(gw: &TestGateway, extra: Value) -> Value {
    let mut body = json!({"model": "test/model", "messages": [{"role": "user", "content": "hi"}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let res = post_chat(gw, TEST_KEY, &body).await;
    let status = res.status();
    let answer: Value = res.json().await.unwrap();
    assert_eq!(status, 200, "{answer}");
    answer
}

/// The `(max_tokens, max_completion_tokens)` the upstream received.
fn limits(seen: &Seen) -> (Value, Value) {
    (
        seen.body.get("max_tokens").cloned().unwrap_or(Value::Null),
        seen.body
            .get("max_completion_tokens")
            .cloned()
            .unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn max_tokens_field_puts_the_reserved_bound_in_that_field_alone() {
    let up = upstream(|_, _| async { json(200, completion()) }).await;
    let base = format!("{}/v1", up.url());
    for (line, field, other) in [
        (
            "max_tokens_field = \"max_completion_tokens\"",
            "max_completion_tokens",
            "max_tokens",
        ),
        (
            "max_tokens_field = \"max_tokens\"",
            "max_tokens",
            "max_completion_tokens",
        ),
    ] {
        let gw = gateway(&openai(&base, &format!("api_key = \"sk-up\"\n{line}"))).await;
        let before = up.hits();
        // The client's field, the other one, both, or none: always the configured one,
        // with the bound credit reserved (the client's 50, else the model's 100).
        for (extra, want) in [
            (json!({}), 100),
            (json!({"max_tokens": 50}), 50),
            (json!({"max_completion_tokens": 50}), 50),
            (json!({"max_tokens": 70, "max_completion_tokens": 50}), 50),
            (json!({"max_tokens": 80}), 80),
        ] {
            ask(&gw, extra.clone()).await;
            let seen = up.requests().pop().unwrap();
            assert_eq!(seen.body[field], want, "{line} {extra}: {}", seen.body);
            assert!(
                seen.body.get(other).is_none(),
                "{line} {extra}: {}",
                seen.body
            );
        }
        assert_eq!(up.hits(), before + 5);
    }
}

#[tokio::test]
async fn without_max_tokens_field_the_choice_is_by_host_and_by_the_clients_field() {
    let up = upstream(|_, _| async { json(200, completion()) }).await;
    let gw = gateway(&openai(&format!("{}/v1", up.url()), "api_key = \"sk-up\"")).await;
    // A server that is not OpenAI's: `max_tokens` when the client set none.
    ask(&gw, json!({})).await;
    assert_eq!(limits(&up.requests()[0]), (json!(100), Value::Null));
    // The client's own field otherwise.
    ask(&gw, json!({"max_completion_tokens": 40})).await;
    assert_eq!(limits(&up.requests()[1]), (Value::Null, json!(40)));
}

#[tokio::test]
async fn a_keyless_local_server_gets_no_authorization_header() {
    let up = upstream(|_, _| async { json(200, completion()) }).await;
    // No api_key, no api_key_env: nothing to set, nothing to warn about.
    let toml = openai(&format!("{}/v1/", up.url()), "");
    let config = switchboard::config::Config::from_toml(&toml).unwrap();
    assert!(config.warnings().is_empty(), "{:?}", config.warnings());
    let gw = gateway(&toml).await;
    let answer = ask(&gw, json!({"stream": false})).await;
    assert_eq!(answer["choices"][0]["message"]["content"], "ok");
    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    // The trailing slash of the base URL is gone.
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert!(
        seen[0].header("authorization").is_none(),
        "{:?}",
        seen[0].headers
    );
    assert!(
        !format!("{:?}", seen[0].headers).contains(TEST_KEY),
        "client key leaked"
    );
}

#[tokio::test]
async fn azure_deployment_url_keeps_its_api_version_and_sends_api_key() {
    let up = upstream(|_, _| async { json(200, completion()) }).await;
    let base = format!(
        "{}/openai/deployments/gpt-4o-mini?api-version=2024-10-21",
        up.url()
    );
    let gw = gateway(&openai(
        &base,
        "api_key = \"azure-secret\"\napi_key_header = \"api-key\"",
    ))
    .await;
    ask(&gw, json!({})).await;
    let seen = &up.requests()[0];
    assert_eq!(
        seen.path,
        "/openai/deployments/gpt-4o-mini/chat/completions"
    );
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(seen.header("api-key"), Some("azure-secret"));
    assert!(seen.header("authorization").is_none());
    assert_eq!(seen.body["max_tokens"], 100, "{}", seen.body);
}

#[tokio::test]
async fn an_anthropic_base_url_ending_in_v1_reaches_v1_messages_without_a_key() {
    let up = upstream(|_, _| async {
        json(
            200,
            json!({
                "id": "msg_01", "type": "message", "role": "assistant", "model": "claude",
                "content": [{"type": "text", "text": "hello"}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 3, "output_tokens": 1}
            }),
        )
    })
    .await;
    let toml = format!(
        r#"
[[providers]]
name = "a"
kind = "anthropic"
base_url = "{}/v1/"
timeout_secs = 5

[[models]]
id = "test/model"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "a"
  upstream_model = "claude-haiku-4-5"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 5

[[keys]]
secret = "{TEST_KEY}"
credits_usd = 100
"#,
        up.url()
    );
    let config = switchboard::config::Config::from_toml(&toml).unwrap();
    let warnings = config.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].path, "providers[0].base_url");
    let gw = gateway(&toml).await;
    let answer = ask(&gw, json!({})).await;
    assert_eq!(answer["choices"][0]["message"]["content"], "hello");
    let seen = &up.requests()[0];
    assert_eq!(seen.path, "/v1/messages");
    assert!(seen.header("x-api-key").is_none(), "{:?}", seen.headers);
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
}
