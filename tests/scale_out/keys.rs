//! Keys across instances (SPEC §6): a key created, topped up or disabled on one
//! instance (admin API or CLI) acts on another within 1 s; the schema is created
//! safely by instances starting at once.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard::money::Money;

use super::*;

/// SPEC §6's bound on a key change reaching every instance.
const WITHIN: Duration = Duration::from_secs(1);

/// The status and error code of a chat request on `base` with `secret`.
async fn status(base: &str, secret: &str) -> (u16, String) {
    let a = chat(base, secret, &ask("hi", false)).await;
    (a.status, a.code())
}

/// Polls `base` with `secret` until the answer is `want`, within [`WITHIN`] of `since`.
async fn acts_within(base: &str, secret: &str, since: Instant, want: (u16, &str), what: &str) {
    let last = std::sync::Arc::new(std::sync::Mutex::new((0, String::new())));
    let at = poll_until(since, WITHIN, || {
        let last = last.clone();
        async move {
            let got = status(base, secret).await;
            let hit = (got.0, got.1.as_str()) == want;
            *last.lock().unwrap() = got;
            hit
        }
    })
    .await;
    assert!(
        at.is_some(),
        "{what}: not in effect on the other instance within {WITHIN:?} (last answer {:?})",
        last.lock().unwrap()
    );
}

/// Admin API on instance 1, requests on instance 2: a new key works there within
/// 1 s (even after an unknown-key answer was cached), a top-up counts there at once
/// (balances are never cached), a disable answers 403 there within 1 s although the
/// key was in its auth cache; then the same through the `keys` CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changes_on_one_instance_act_on_another_within_a_second() {
    let Some(s) = shared("key_changes_on_one_instance_act_on_another_within_a_second") else {
        return;
    };
    let _serial = serial().await;
    let up = upstream(|seen, _| async move { full_answer(&seen, Duration::ZERO) }).await;
    let toml = config(&s, &[("up", &up.url())], 30, "");
    let gws = start_all(&toml, 2).await;
    let (one, two) = (gws[0].base.clone(), gws[1].base.clone());

    // Created on 1 with no credits: known on 2 (402, not 401) within 1 s.
    let (st, created) = admin(
        &one,
        "POST",
        "/admin/keys",
        Some(json!({"credits_usd": 0, "name": "fresh"})),
    )
    .await;
    let t = Instant::now();
    assert_eq!(st, 201, "{created}");
    let secret = created["data"]["secret"].as_str().unwrap().to_string();
    let id = created["data"]["id"].as_str().unwrap().to_string();
    acts_within(&two, &secret, t, (402, "insufficient_credits"), "create").await;

    // Topped up on 1: usable on 2 at once.
    let (st, body) = admin(
        &one,
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(json!({"top_up_usd": 1})),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(status(&two, &secret).await, (200, String::new()), "top-up");

    // Disabled on 1 (the key is in 2's auth cache now): 403 on 2 within 1 s.
    let (st, body) = admin(
        &one,
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(json!({"disabled": true})),
    )
    .await;
    let t = Instant::now();
    assert_eq!(st, 200, "{body}");
    acts_within(&two, &secret, t, (403, "forbidden"), "disable").await;

    // The same through the CLI (its own process, no gateway): create, then disable.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("keys")
            .args(args)
            .arg("--config")
            .arg(&gws[0].config)
            .current_dir(gws[0].config.parent().unwrap())
            .output()
            .unwrap();
        assert!(out.status.success(), "keys {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let out = cli(&["create", "--credits", "1", "--name", "cli"]);
    let t = Instant::now();
    let id = out.split('\t').next().unwrap().trim().to_string();
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .expect("the CLI prints the secret")
        .trim()
        .to_string();
    acts_within(&two, &secret, t, (200, ""), "CLI create").await;
    cli(&["disable", &id]);
    let t = Instant::now();
    acts_within(&two, &secret, t, (403, "forbidden"), "CLI disable").await;
}

/// A secret that instance 2 has just answered 401 for (and cached as unknown) works
/// there within 1 s of being created elsewhere (by the `[[keys]]` bootstrap of an
/// instance starting): the unknown-key cache is cleared by the change too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_answer_is_not_cached_past_a_create_elsewhere() {
    let Some(s) = shared("an_unknown_key_answer_is_not_cached_past_a_create_elsewhere") else {
        return;
    };
    let _serial = serial().await;
    let up = upstream(|seen, _| async move { full_answer(&seen, Duration::ZERO) }).await;
    let toml = config(&s, &[("up", &up.url())], 30, "");
    let gws = start_all(&toml, 2).await;
    // The admin API makes up secrets, so the negative cache is warmed with a key that
    // a restart of instance 1 then bootstraps from `[[keys]]`.
    const LATE: &str = "sk-scale-late-key-0123456789";
    assert_eq!(status(&gws[1].base, LATE).await.0, 401);
    let mut one = ServeProcess::spawn(&format!("{toml}\n{}", key_entry(LATE, "1", ""))).await;
    one.wait_ready().await;
    let t = Instant::now();
    acts_within(&gws[1].base, LATE, t, (200, ""), "bootstrap of a new key").await;
}

/// Four instances started at the same moment on an empty database all come up (the
/// schema migration is safe concurrently: none exits), bootstrap the same `[[keys]]`
/// entry into one key, and serve it; three times on fresh databases, then once more
/// on a database already made (the migration finds nothing to do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_at_once_on_an_empty_database_all_come_up() {
    const TEST: &str = "instances_starting_at_once_on_an_empty_database_all_come_up";
    let Some(s) = shared(TEST) else {
        return;
    };
    let _serial = serial().await;
    let up = upstream(|seen, _| async move { full_answer(&seen, Duration::ZERO) }).await;
    let mut dbs = vec![s.db];
    for _ in 0..2 {
        dbs.push(switchboard::testing::postgres(TEST).expect("PostgreSQL answered just now"));
    }
    let each = reserve("hi", 1).pico();
    for (round, db) in (0..4).zip(dbs.iter().chain(dbs.last())) {
        let toml = config_on(
            db.url(),
            Some((s.redis.url(), s.redis.prefix())),
            &[("up", &up.url())],
            30,
            "",
        );
        // Spawned together (each `spawn` starts its process before its first wait).
        let (a, b, c, d) = tokio::join!(
            ServeProcess::spawn(&toml),
            ServeProcess::spawn(&toml),
            ServeProcess::spawn(&toml),
            ServeProcess::spawn(&toml)
        );
        let mut gws = [a, b, c, d];
        for gw in &mut gws {
            gw.wait_ready().await;
            let a = chat(&gw.base, TEST_KEY, &ask("hi", false)).await;
            assert_eq!(a.status, 200, "round {round}: {}", a.text);
        }
        let (st, list) = admin(&gws[0].base, "GET", "/admin/keys", None).await;
        assert_eq!(st, 200, "{list}");
        assert_eq!(
            list["data"].as_array().unwrap().len(),
            1,
            "one key, bootstrapped once: {list}"
        );
        let (_, debit) = credits(&gws[1].base, TEST_KEY).await;
        let served = if round == 3 { 8 } else { 4 };
        assert_eq!(debit, Money::from_pico(each * served), "round {round}");
    }
}
