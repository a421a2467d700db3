//! When a shared server fails (SPEC §6): PostgreSQL unreachable → `/readyz` 503 and
//! chat 503 `store_unavailable`, never a request served uncharged (at start: `serve`
//! refuses to start, exit 2); Redis unreachable →
//! served on each instance's own limits, `switchboard_shared_state_up 0`, a warning;
//! both recover by themselves. "Unreachable" is a wrong port at start, or a
//! [`TcpRelay`] between the gateway and the real server taken down while it serves.

use std::time::{Duration, Instant};

use switchboard::money::Money;

use super::*;

const SHARED_UP: &str = "switchboard_shared_state_up";

/// Polls `/readyz` on `base` until it answers `want`, within [`SOCKET_TIMEOUT`].
async fn readyz_becomes(base: &str, want: u16) -> Duration {
    let t = Instant::now();
    poll_until(t, SOCKET_TIMEOUT, || async move {
        client()
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == want)
    })
    .await
    .unwrap_or_else(|| panic!("/readyz never answered {want}"))
}

/// Polls `/metrics` on `gw` until `switchboard_shared_state_up` is `want`.
async fn shared_state_becomes(gw: &ServeProcess, want: f64) -> Duration {
    let t = Instant::now();
    poll_until(t, SOCKET_TIMEOUT, || async move {
        metric(&gw.metrics().await, SHARED_UP) == Some(want)
    })
    .await
    .unwrap_or_else(|| panic!("{SHARED_UP} never became {want}"))
}

/// `[store].url` on a port where nothing listens, at start: `serve` cannot create or
/// check the schema, so it refuses to start (exit 2, SPEC §1: "store unreadable") at
/// once, naming the store's address and never its password. (A running instance
/// that loses PostgreSQL answers 503 instead: the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_at_start_refuses_to_start_with_exit_2() {
    let Some(s) = shared("postgres_unreachable_at_start_refuses_to_start_with_exit_2") else {
        return;
    };
    let _serial = serial().await;
    let up = upstream(|seen, _| async move { full_answer(&seen, Duration::ZERO) }).await;
    let port = free_port();
    let nowhere = format!(
        "postgres://postgres:hunter2@127.0.0.1:{port}/{}",
        s.db.name()
    );
    let toml = config_on(
        &nowhere,
        Some((s.redis.url(), s.redis.prefix())),
        &[("up", &up.url())],
        30,
        "",
    );
    let dir = temp_dir("pg-unreachable");
    let path = dir.join("switchboard.toml");
    std::fs::write(&path, toml).unwrap();
    let t = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--config"])
        .arg(&path)
        // Its spill dir (`.` by default) is its own directory, not the crate root.
        .current_dir(&dir)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > SOCKET_TIMEOUT {
            let _ = child.kill();
            panic!("serve kept running without its store");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "gave up after {:?}",
        t.elapsed()
    );
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("store"),
        "the message names the store: {err}"
    );
    assert!(
        !err.contains("hunter2"),
        "the password is never shown: {err}"
    );
    assert_eq!(up.hits(), 0);
}

/// A gateway whose PostgreSQL goes away while it serves: `/readyz` turns 503 and chat
/// requests 503 `store_unavailable` (none served uncharged); when PostgreSQL is back,
/// it recovers by itself, and the key's debit is exactly the sum of the costs of the
/// requests it served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_taken_away_while_serving_answers_503_then_recovers() {
    let Some(s) = shared("postgres_taken_away_while_serving_answers_503_then_recovers") else {
        return;
    };
    let _serial = serial().await;
    let up = upstream(|seen, _| async move { full_answer(&seen, Duration::ZERO) }).await;
    let (_, target) = through_port(s.db.url(), 0);
    let mut relay = TcpRelay::start(&target).await;
    let (via_relay, _) = through_port(s.db.url(), relay.port());
    let toml = config_on(
        &via_relay,
        Some((s.redis.url(), s.redis.prefix())),
        &[("up", &up.url())],
        30,
        "",
    );
    let mut gw = ServeProcess::start(&toml).await;
    let mut shown = Money::ZERO;
    for stream in [false, true] {
        let a = chat(&gw.base, TEST_KEY, &ask("hi", stream)).await;
        assert_eq!(a.status, 200, "{}", a.text);
        shown = shown + a.cost();
    }

    relay.down().await;
    readyz_becomes(&gw.base, 503).await;
    let hits = up.hits();
    for stream in [false, true] {
        let a = chat(&gw.base, TEST_KEY, &ask("hi", stream)).await;
        assert_eq!(
            (a.status, a.code().as_str()),
            (503, "store_unavailable"),
            "{}",
            a.text
        );
    }
    assert_eq!(up.hits(), hits, "nothing sent upstream without a store");
    let (status, text) = get(&gw.base, "/v1/credits", TEST_KEY).await;
    assert_eq!(status, 503, "{text}");

    relay.up().await;
    readyz_becomes(&gw.base, 200).await;
    let back = poll_until(Instant::now(), SOCKET_TIMEOUT, || {
        let base = gw.base.clone();
        async move { chat(&base, TEST_KEY, &ask("hi", false)).await.status == 200 }
    })
    .await;
    assert!(back.is_some(), "chat never recovered");
    shown = shown + reserve("hi", 1); // what that request cost (full_answer)
    let (_, debit) = credits(&gw.base, TEST_KEY).await;
    assert_eq!(debit, shown, "everything served was charged, once");
    gw.assert_alive("after PostgreSQL came back");
}

/// `[shared].redis_url` on a port where nothing listens: the gateway is ready and
/// serves, `rpm` is still held per instance (its own limiter), `/metrics` shows
/// `switchboard_shared_state_up 0`, and a warning is in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_at_start_keeps_serving_on_local_limits() {
    let Some(s) = shared("redis_unreachable_at_start_keeps_serving_on_local_limits") else {
        return;
    };
    let _serial = serial().await;
    const LIMITED: &str = "sk-scale-rpm-key-0123456789";
    let up = upstream(|seen, _| async move { full_answer(&seen, Duration::ZERO) }).await;
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let toml = config_on(
        s.db.url(),
        Some((&nowhere, s.redis.prefix())),
        &[("up", &up.url())],
        30,
        &key_entry(LIMITED, "10", "rpm = 2"),
    );
    let t = Instant::now();
    let gw = ServeProcess::start(&toml).await;
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "started in {:?}",
        t.elapsed()
    );
    for stream in [false, true] {
        let a = chat(&gw.base, TEST_KEY, &ask("hi", stream)).await;
        assert_eq!(a.status, 200, "served without Redis: {}", a.text);
    }
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(chat(&gw.base, LIMITED, &ask("hi", false)).await.status);
        }
        v
    };
    assert_eq!(
        statuses,
        [200, 200, 429],
        "rpm = 2 on the instance's own limiter"
    );
    assert_eq!(metric(&gw.metrics().await, SHARED_UP), Some(0.0));
    let log = gw.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.to_lowercase().contains("redis")),
        "no warning about Redis in the log:\n{log}"
    );
}

/// Two gateways whose Redis goes away while they serve: `switchboard_shared_state_up`
/// turns 0 on both, they keep serving (each on its own limiter: `rpm` still holds per
/// instance), and when Redis is back the gauge returns to 1 by itself and the
/// budget is shared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_taken_away_while_serving_falls_back_and_recovers() {
    let Some(s) = shared("redis_taken_away_while_serving_falls_back_and_recovers") else {
        return;
    };
    let _serial = serial().await;
    const LIMITED: &str = "sk-scale-rpm-key-0123456789";
    let up = upstream(|seen, _| async move { full_answer(&seen, Duration::ZERO) }).await;
    let (_, target) = through_port(s.redis.url(), 0);
    let mut relay = TcpRelay::start(&target).await;
    let (via_relay, _) = through_port(s.redis.url(), relay.port());
    let toml = config_on(
        s.db.url(),
        Some((&via_relay, s.redis.prefix())),
        &[("up", &up.url())],
        30,
        &key_entry(LIMITED, "10", "rpm = 3"),
    );
    let gws = start_all(&toml, 2).await;
    for gw in &gws {
        shared_state_becomes(gw, 1.0).await;
        assert_eq!(
            chat(&gw.base, TEST_KEY, &ask("hi", false)).await.status,
            200
        );
    }

    relay.down().await;
    for gw in &gws {
        shared_state_becomes(gw, 0.0).await;
        assert_eq!(
            chat(&gw.base, TEST_KEY, &ask("hi", true)).await.status,
            200,
            "served without Redis"
        );
        // Its own limiter holds rpm = 3 (it may have counted requests before).
        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(chat(&gw.base, LIMITED, &ask("hi", false)).await.status);
        }
        assert!(
            statuses.contains(&429) && statuses.iter().all(|s| [200, 429].contains(s)),
            "{statuses:?}"
        );
        let log = gw.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.to_lowercase().contains("redis")),
            "no warning about Redis in the log:\n{log}"
        );
    }

    relay.up().await;
    for gw in &gws {
        shared_state_becomes(gw, 1.0).await;
        assert_eq!(
            chat(&gw.base, TEST_KEY, &ask("hi", false)).await.status,
            200
        );
    }
    // Shared again: a new key's rpm = 3 is one budget across both instances.
    let (st, created) = admin(
        &gws[0].base,
        "POST",
        "/admin/keys",
        Some(serde_json::json!({"credits_usd": 10, "rpm": 3})),
    )
    .await;
    assert_eq!(st, 201, "{created}");
    let secret = created["data"]["secret"].as_str().unwrap().to_string();
    let mut admitted = 0;
    for i in 0..6 {
        match chat(&gws[i % 2].base, &secret, &ask("hi", false))
            .await
            .status
        {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 3, "one rpm budget across the instances again");
}
