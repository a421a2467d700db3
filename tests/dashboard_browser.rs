//! `GET /dashboard` in a real headless Chromium (SPEC §9, issue 24): login, the
//! exact spend of the requests made, a degraded endpoint, a hostile key name shown as
//! text, no console errors, the cookie's flags, and data routes closed without it.
//! Screenshots at desktop and phone widths go to `target/dashboard/`.
//!
//! Without `/usr/bin/chromium` (or `$CHROME`) the test says it did not run and
//! passes, unless `SWITCHBOARD_REQUIRE_BROWSER=1`.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::cdp::browser_protocol::page::{
    CaptureScreenshotFormat, EventJavascriptDialogOpening,
};
use chromiumoxide::cdp::js_protocol::runtime::{
    ConsoleApiCalledType, EventConsoleApiCalled, EventExceptionThrown,
};
use chromiumoxide::page::{Page, ScreenshotParams};
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

const ADMIN_ENV: &str = "SB_DASHBOARD_BROWSER_ADMIN";
const ADMIN_TOKEN: &str = "dashboard-admin-token-0123456789";
const HOSTILE: &str = "<script>alert(1)</script>";

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("CHROME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    path.exists().then_some(path)
}

/// Prompt 10 + completion 20 tokens at $1 / $2 per Mtok: $0.00005 a request.
fn completion() -> Value {
    json!({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
    })
}

fn config(good: &str, bad: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[admin]
token_env = "{ADMIN_ENV}"

[health]
failure_threshold = 1
cooldown_secs = 3600

[retry]
max_attempts = 1

[[providers]]
name = "good"
kind = "openai"
base_url = "{good}/v1"
api_key = "sk-upstream-good"
timeout_secs = 5

[[providers]]
name = "bad"
kind = "openai"
base_url = "{bad}/v1"
api_key = "sk-upstream-bad"
timeout_secs = 5

[[models]]
id = "test/model"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "good"
  upstream_model = "up-model"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2

[[models]]
id = "test/broken"
max_output_tokens = 100
  [[models.endpoints]]
  provider = "bad"
  upstream_model = "up-model"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2
"#
    )
}

/// Evaluates `expr` until it yields `want` (30 s at most), returning the last value.
async fn wait_for(page: &Page, expr: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    loop {
        let v: Value = page
            .evaluate(expr)
            .await
            .ok()
            .and_then(|r| r.into_value().ok())
            .unwrap_or(Value::Null);
        if want(&v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(page: &Page, width: i64, height: i64, mobile: bool, name: &str) -> PathBuf {
    page.execute(
        SetDeviceMetricsOverrideParams::builder()
            .width(width)
            .height(height)
            .device_scale_factor(1.0)
            .mobile(mobile)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    // Let layout settle on the new width (two animation frames).
    let _ = page
        .evaluate(
            "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))",
        )
        .await;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/dashboard");
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| PathBuf::from(t).join("dashboard"))
        .unwrap_or(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    page.save_screenshot(
        ScreenshotParams::builder()
            .format(CaptureScreenshotFormat::Png)
            .full_page(true)
            .build(),
        &path,
    )
    .await
    .unwrap();
    println!("screenshot: {}", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_logs_in_and_shows_spend_health_and_hostile_names_as_text() {
    let Some(chrome) = chromium() else {
        if std::env::var("SWITCHBOARD_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
            panic!("SWITCHBOARD_REQUIRE_BROWSER=1 but no /usr/bin/chromium (or $CHROME): install chromium");
        }
        println!("dashboard browser test did not run: no /usr/bin/chromium (set CHROME, or apt-get install chromium)");
        return;
    };

    // The gateway: SQLite store and request log in a temp dir, a good and a failing
    // upstream.
    std::env::set_var(ADMIN_ENV, ADMIN_TOKEN);
    let good = upstream(|_, _| async { json(200, completion()) }).await;
    let bad = upstream(|_, _| async {
        json(
            500,
            json!({"error": {"message": "scripted 500", "type": "x"}}),
        )
    })
    .await;
    let gw = gateway(&config(&good.url(), &bad.url())).await;
    let http = client();

    // A key with a hostile name, and paid requests with it.
    let res = http
        .post(gw.url("/admin/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": HOSTILE, "credits_usd": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let made: Value = res.json().await.unwrap();
    let secret = made["data"]["secret"].as_str().unwrap().to_string();
    let body = json!({"model": "test/model", "messages": [{"role": "user", "content": "hi"}]});
    let mut ids = Vec::new();
    for _ in 0..3 {
        let res = http
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&secret)
            .header("X-Title", "<img src=x onerror=alert(2)>")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // One request to the failing endpoint: it is degraded (threshold 1).
    let broken = json!({"model": "test/broken", "messages": [{"role": "user", "content": "hi"}]});
    let res = http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&broken)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_server_error(), "{}", res.status());
    // The exact total, from the gateway's own generation records.
    let mut total_pico: i64 = 0;
    for id in &ids {
        let (status, g) = get_json(&gw, &format!("/v1/generation?id={id}"), &secret).await;
        assert_eq!(status, 200, "{g}");
        let cost = g["data"]["total_cost"].to_string();
        total_pico += cost.parse::<switchboard::money::Money>().unwrap().pico();
    }
    assert_eq!(total_pico, 3 * 50_000_000, "3 × $0.00005");
    let want_total = "$0.00015";
    {
        let logs = gw.gateway.logs().clone();
        tokio::task::spawn_blocking(move || assert!(logs.flush(SOCKET_TIMEOUT)))
            .await
            .unwrap();
    }

    // Plain HTTP: the login cookie's flags; data routes closed without it, open with it.
    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let res = no_redirects
        .post(gw.url("/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().get("set-cookie").is_none());
    let res = no_redirects
        .post(gw.url("/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()["location"], "/dashboard");
    let set_cookie = res.headers()["set-cookie"].to_str().unwrap().to_string();
    let attrs: Vec<&str> = set_cookie.split(';').map(str::trim).collect();
    assert_eq!(attrs[0], format!("switchboard_admin={ADMIN_TOKEN}"));
    assert!(attrs.contains(&"HttpOnly"), "{set_cookie}");
    assert!(attrs.contains(&"SameSite=Strict"), "{set_cookie}");
    assert!(attrs.contains(&"Path=/"), "{set_cookie}");
    for path in [
        "/admin/usage?group_by=key",
        "/admin/endpoints",
        "/admin/requests?limit=5",
        "/admin/keys",
    ] {
        let res = http.get(gw.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 401, "{path} without the cookie");
        let res = http
            .get(gw.url(path))
            .header("cookie", "switchboard_admin=not-the-token")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{path} with a wrong cookie");
        let res = http
            .get(gw.url(path))
            .header("cookie", attrs[0])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path} with the cookie");
        assert_eq!(res.headers()["cache-control"], "no-store", "{path}");
        assert_eq!(res.headers()["x-content-type-options"], "nosniff", "{path}");
    }
    let recent: Value = http
        .get(gw.url("/admin/requests?limit=10"))
        .header("cookie", attrs[0])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let recent_text = recent.to_string();
    assert_eq!(recent["data"].as_array().unwrap().len(), 4, "{recent_text}");
    assert!(!recent_text.contains("\"prompt\"") && !recent_text.contains("completion\""));
    let page_res = http.get(gw.url("/dashboard")).send().await.unwrap();
    let csp = page_res.headers()["content-security-policy"]
        .to_str()
        .unwrap();
    assert!(
        csp.contains("default-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );

    // The browser.
    let profile = temp_dir("chromium");
    let (mut browser, mut handler) = Browser::launch(
        BrowserConfig::builder()
            .chrome_executable(chrome)
            .no_sandbox()
            .user_data_dir(&profile)
            .window_size(1366, 900)
            .arg("--disable-gpu")
            .arg("--disable-dev-shm-usage")
            .build()
            .unwrap(),
    )
    .await
    .expect("chromium starts");
    let events = tokio::spawn(async move { while handler.next().await.is_some() {} });
    let page = browser.new_page("about:blank").await.unwrap();
    let problems = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut console = page
        .event_listener::<EventConsoleApiCalled>()
        .await
        .unwrap();
    let mut thrown = page.event_listener::<EventExceptionThrown>().await.unwrap();
    let mut dialogs = page
        .event_listener::<EventJavascriptDialogOpening>()
        .await
        .unwrap();
    {
        let p = problems.clone();
        tokio::spawn(async move {
            while let Some(e) = console.next().await {
                if matches!(
                    e.r#type,
                    ConsoleApiCalledType::Error
                        | ConsoleApiCalledType::Warning
                        | ConsoleApiCalledType::Assert
                ) {
                    p.lock()
                        .unwrap()
                        .push(format!("console {:?}: {:?}", e.r#type, e.args));
                }
            }
        });
        let p = problems.clone();
        tokio::spawn(async move {
            while let Some(e) = thrown.next().await {
                p.lock()
                    .unwrap()
                    .push(format!("exception: {:?}", e.exception_details));
            }
        });
        let p = problems.clone();
        tokio::spawn(async move {
            while let Some(e) = dialogs.next().await {
                p.lock()
                    .unwrap()
                    .push(format!("dialog opened: {}", e.message));
            }
        });
    }

    // The login form, then the page after logging in.
    page.goto(gw.url("/dashboard")).await.unwrap();
    let has_form = wait_for(
        &page,
        "!!document.querySelector('form#login input[name=token]')",
        |v| v == &json!(true),
    )
    .await;
    assert_eq!(has_form, json!(true), "the login form");
    let shown_spend = page
        .evaluate("document.getElementById('kpi-spend')")
        .await
        .unwrap()
        .into_value::<Value>()
        .unwrap_or(Value::Null);
    assert!(
        shown_spend.is_null() || shown_spend == json!({}),
        "no data before login"
    );
    page.find_element("input[name=token]")
        .await
        .unwrap()
        .click()
        .await
        .unwrap()
        .type_str(ADMIN_TOKEN)
        .await
        .unwrap();
    page.find_element("form#login button[type=submit]")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let spend = wait_for(
        &page,
        "(document.getElementById('kpi-spend') || {}).textContent || null",
        |v| v == &json!(want_total),
    )
    .await;
    assert_eq!(spend, json!(want_total), "the exact total spend");
    // The degraded endpoint, with its state.
    let degraded = wait_for(
        &page,
        "[...document.querySelectorAll('#endpoints tr')].map(r => r.innerText).filter(t => t.includes('bad')).join('|')",
        |v| v.as_str().is_some_and(|t| t.contains("degraded")),
    )
    .await;
    assert!(
        degraded.as_str().unwrap_or("").contains("degraded"),
        "{degraded}"
    );
    // The hostile key name as literal text, in the top keys and the recent requests;
    // no element made of it, no dialog.
    let names = wait_for(
        &page,
        &format!(
            "[...document.querySelectorAll('#top-keys td, #recent td')].filter(td => td.textContent === {}).length",
            json!(HOSTILE)
        ),
        |v| v.as_u64().is_some_and(|n| n >= 2),
    )
    .await;
    assert!(
        names.as_u64().unwrap_or(0) >= 2,
        "the key name as text: {names}"
    );
    let scripts: Value = page
        .evaluate("document.scripts.length + document.querySelectorAll('main img').length")
        .await
        .unwrap()
        .into_value()
        .unwrap();
    assert_eq!(scripts, json!(1), "only app.js runs; no element from data");
    let status: Value = page
        .evaluate("document.getElementById('status').textContent")
        .await
        .unwrap()
        .into_value()
        .unwrap();
    assert!(
        status.as_str().unwrap_or("").starts_with("updated"),
        "{status}"
    );

    let desktop = screenshot(&page, 1366, 900, false, "desktop.png").await;
    let phone = screenshot(&page, 390, 844, true, "phone.png").await;
    // The phone layout does not scroll sideways.
    let overflow: Value = page
        .evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        .await
        .unwrap()
        .into_value()
        .unwrap();
    assert_eq!(overflow, json!(true), "no horizontal scroll at 390 px");
    assert!(desktop.exists() && phone.exists());

    // Logging out clears the cookie: back to the login form.
    page.execute(
        SetDeviceMetricsOverrideParams::builder()
            .width(1366)
            .height(900)
            .device_scale_factor(1.0)
            .mobile(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    page.find_element("form.logout button")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let back = wait_for(&page, "!!document.querySelector('form#login')", |v| {
        v == &json!(true)
    })
    .await;
    assert_eq!(back, json!(true), "logged out");

    let problems = problems.lock().unwrap().clone();
    assert!(
        problems.is_empty(),
        "console errors, exceptions or dialogs: {problems:#?}"
    );
    browser.close().await.unwrap();
    let _ = browser.wait().await;
    events.abort();
    let _ = std::fs::remove_dir_all(profile);
}
