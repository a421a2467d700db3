//! The PostgreSQL schema: tables prefixed `sb_`, the two SQL functions the ledger calls
//! (`sb_lease`, `sb_settle`, and `sb_shrink` for giving leases back), and their
//! migration at open.
//!
//! Migrations run in one transaction under `pg_advisory_xact_lock(`[`LOCK_ID`]`)`:
//! several instances starting at once wait for each other, and each step is applied
//! once. `sb_schema_version` records the steps done; a later step is a new entry of
//! [`migrations`] (step 3: periods, expiry, attribution; step 8: `sb_settle_fresh`).

use crate::money::{MAX_CREDITS, MAX_SPENT};

/// The advisory lock held while migrating ("SWITCHBD" in ASCII).
pub(super) const LOCK_ID: i64 = 0x5357_4954_4348_4244;

/// The schema steps, in order: step `n` brings the database to version `n + 1`.
pub(super) fn migrations() -> Vec<String> {
    vec![
        step_1(),
        step_2(),
        step_3(),
        step_4(),
        step_5(),
        step_6(),
        step_7(),
        step_8(),
        step_9(),
    ]
}

/// Version 3 (SPEC §8.3): a key's `limit_reset` and `expires_at`; the app that sent
/// a settled request (`app_url`, `app_title`); `sb_daily_spend`, what each key spent
/// each UTC day (settlements already there counted in on their arrival day), from
/// which the spending of a key's current period is summed; and `sb_lease` and
/// `sb_settle` anew (the old ones dropped: their arguments changed), now given the
/// instance's clock (`p_now`, Unix seconds) for the day, the week and the month, so
/// a key's period budget is one budget across instances and a new period frees it.
fn step_3() -> String {
    let max_spent = MAX_SPENT.pico();
    format!(
        r#"
ALTER TABLE sb_keys ADD COLUMN IF NOT EXISTS limit_reset TEXT
    CHECK (limit_reset IN ('daily', 'weekly', 'monthly'));
ALTER TABLE sb_keys ADD COLUMN IF NOT EXISTS expires_at BIGINT;
ALTER TABLE sb_settlements ADD COLUMN IF NOT EXISTS app_url TEXT;
ALTER TABLE sb_settlements ADD COLUMN IF NOT EXISTS app_title TEXT;

CREATE TABLE IF NOT EXISTS sb_daily_spend (
    key_id TEXT NOT NULL,
    day    BIGINT NOT NULL,
    spent  BIGINT NOT NULL CHECK (spent BETWEEN 0 AND {max_spent}),
    PRIMARY KEY (key_id, day)
);
INSERT INTO sb_daily_spend (key_id, day, spent)
SELECT key_id, created / 86400, least(sum(cost), {max_spent})::bigint
  FROM sb_settlements WHERE cost > 0 GROUP BY key_id, created / 86400
ON CONFLICT DO NOTHING;

-- The first UTC day of the period of p_reset that holds UTC day p_day.
CREATE OR REPLACE FUNCTION sb_period_start(p_reset TEXT, p_day BIGINT) RETURNS BIGINT
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT CASE p_reset
        WHEN 'daily' THEN p_day
        -- 1970-01-01 (day 0) was a Thursday: weeks start on Mondays.
        WHEN 'weekly' THEN p_day - ((p_day + 3) % 7)
        WHEN 'monthly' THEN (date_trunc('month', date '1970-01-01' + p_day::integer)::date
                             - date '1970-01-01')::bigint
    END
$fn$;

DROP FUNCTION IF EXISTS sb_lease(TEXT, TEXT, BIGINT, BIGINT, BIGINT, BIGINT, BIGINT);
DROP FUNCTION IF EXISTS sb_settle(TEXT, TEXT[], TEXT[], BIGINT[], BIGINT[], BIGINT[], BIGINT[],
    TEXT[], TEXT[], BOOLEAN[], BIGINT[], BIGINT[], BIGINT[], BIGINT[], TEXT[], TEXT[], BIGINT[]);
"#
    ) + &lease_function(false)
        + &settle_function(false, false)
}

/// `sb_lease` (see its SQL comment). With `day_counter` (version 9) the current
/// period's spending also counts what the key row holds for its latest day
/// (`spent_today` of `spent_day`), which the settlements no longer write to
/// `sb_daily_spend` until that day is over.
fn lease_function(day_counter: bool) -> String {
    let (today_on_key, and_key_row) = if day_counter {
        (
            r#"        IF k.spent_day IS NOT NULL
           AND k.spent_day >= sb_period_start(k.limit_reset, today)
           AND sb_period_start(k.limit_reset, k.spent_day) = sb_period_start(k.limit_reset, today)
        THEN
            pspent := pspent + k.spent_today;
        END IF;
"#,
            ", and the key row's spent_today when its spent_day is in the period",
        )
    } else {
        ("", "")
    };
    format!(
        r#"
-- Sets this instance's lease on a key to what it needs plus headroom, or refuses.
-- Under the key's row lock: expired leases of the key are deleted; what is free for
-- this instance is least(credits - spent, limit_usd - period spent) - the other
-- instances' leases, where the period spent is the key's lifetime spending, or with
-- limit_reset what it spent since its current period began (sb_daily_spend, days
-- from p_now{and_key_row}); with free >= need (and the same for tokens against tokens_per_day)
-- the lease becomes need + least(headroom, (free - need) / 8), never less than it
-- was, else it stays as it was (ok = false). A refusal that the other instances'
-- leases could lift asks them to give back what they do not use (pressure = true,
-- NOTIFY sb_lease_pressure).
CREATE OR REPLACE FUNCTION sb_lease(
    p_key TEXT, p_instance TEXT, p_need BIGINT, p_headroom BIGINT,
    p_need_tokens BIGINT, p_headroom_tokens BIGINT, p_ttl_ms BIGINT, p_now BIGINT)
RETURNS TABLE (ok BOOLEAN, pressure BOOLEAN, amount BIGINT, tokens BIGINT, ver BIGINT,
               credits BIGINT, spent BIGINT, limit_usd BIGINT, others BIGINT,
               tokens_per_day BIGINT, tokens_used BIGINT, others_tokens BIGINT,
               period_spent BIGINT)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    k sb_keys%ROWTYPE;
    today BIGINT := p_now / 86400;
    mine_amount BIGINT := 0;
    mine_tokens BIGINT := 0;
    o NUMERIC;
    ot NUMERIC;
    used BIGINT;
    pspent NUMERIC;
    free NUMERIC;
    tfree NUMERIC;
    fits BOOLEAN;
    new_amount BIGINT;
    new_tokens BIGINT;
    v BIGINT;
BEGIN
    SELECT * INTO k FROM sb_keys WHERE id = p_key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    DELETE FROM sb_leases l WHERE l.key_id = p_key AND l.expires_at <= now();
    SELECT coalesce(sum(l.amount), 0), coalesce(sum(l.tokens), 0) INTO o, ot
      FROM sb_leases l WHERE l.key_id = p_key AND l.instance <> p_instance;
    SELECT l.amount, l.tokens INTO mine_amount, mine_tokens
      FROM sb_leases l WHERE l.key_id = p_key AND l.instance = p_instance;
    mine_amount := coalesce(mine_amount, 0);
    mine_tokens := coalesce(mine_tokens, 0);
    used := CASE WHEN k.tokens_day = today THEN k.tokens_used ELSE 0 END;
    IF k.limit_reset IS NULL THEN
        pspent := k.spent;
    ELSE
        SELECT coalesce(sum(d.spent), 0) INTO pspent FROM sb_daily_spend d
         WHERE d.key_id = p_key AND d.day >= sb_period_start(k.limit_reset, today)
           AND sb_period_start(k.limit_reset, d.day) = sb_period_start(k.limit_reset, today);
{today_on_key}    END IF;
    free := least(k.credits::numeric - k.spent,
                  coalesce(k.limit_usd::numeric - pspent, k.credits::numeric - k.spent)) - o;
    tfree := CASE WHEN k.tokens_per_day IS NULL THEN NULL
                  ELSE k.tokens_per_day::numeric - used - ot END;
    fits := free >= p_need AND (tfree IS NULL OR tfree >= p_need_tokens);
    v := nextval('sb_lease_versions');
    IF fits THEN
        new_amount := greatest(mine_amount, p_need + least(p_headroom::numeric, floor((free - p_need) / 8)));
        new_tokens := CASE WHEN tfree IS NULL THEN mine_tokens
            ELSE greatest(mine_tokens, p_need_tokens + least(p_headroom_tokens::numeric, floor((tfree - p_need_tokens) / 8))) END;
        INSERT INTO sb_leases AS l (key_id, instance, amount, tokens, ver, expires_at)
        VALUES (p_key, p_instance, new_amount, new_tokens, v, now() + p_ttl_ms * interval '1 millisecond')
        ON CONFLICT (key_id, instance) DO UPDATE
            SET amount = excluded.amount, tokens = excluded.tokens, ver = excluded.ver,
                expires_at = excluded.expires_at;
        RETURN QUERY SELECT true, false, new_amount, new_tokens, v, k.credits, k.spent,
            k.limit_usd, o::bigint, k.tokens_per_day, used, ot::bigint, pspent::bigint;
    ELSE
        pressure := (o > 0 OR ot > 0) AND free + o >= p_need
            AND (tfree IS NULL OR tfree + ot >= p_need_tokens);
        IF pressure THEN
            PERFORM pg_notify('sb_lease_pressure', p_key || ' ' || p_instance);
        END IF;
        RETURN QUERY SELECT false, pressure, mine_amount, mine_tokens, v, k.credits, k.spent,
            k.limit_usd, o::bigint, k.tokens_per_day, used, ot::bigint, pspent::bigint;
    END IF;
END
$fn$;

"#
    )
}

/// `sb_settle` (or, `fresh`, `sb_settle_fresh`: see [`step_8`]) (see the SQL
/// comment). With `day_counter` (version 9) a key's spending of the day is added on
/// its own row (`spent_today`, `spent_day`), which the statement updates anyway,
/// instead of upserting a row of `sb_daily_spend` per key and batch; the first
/// settlement of a later day moves the total of the day before into
/// `sb_daily_spend`.
fn settle_function(fresh: bool, day_counter: bool) -> String {
    let name = if fresh {
        "sb_settle_fresh"
    } else {
        "sb_settle"
    };
    let comment = if fresh {
        "-- sb_settle for a batch none of whose ids can have been settled before: a plain\n\
         -- INSERT (a settled id makes the primary key refuse the statement whole), and\n\
         -- only the lease rows returned (kind 'l').\n"
    } else {
        "-- Commits a batch of settlements of one instance: the rows (a request id already\n\
         -- settled is skipped), their cost added to spent and to the day's spending, their\n\
         -- tokens to the day's count (the day of p_now, the instance's clock), and this\n\
         -- instance's leases of those keys shrunk by the reservations the new rows release\n\
         -- (p_instance NULL, a replay of spilled charges: no lease). Key rows, then lease\n\
         -- rows, are locked in key order (no deadlock with another instance's batch).\n\
         -- Returns the ids inserted (kind 'i') and each changed lease (kind 'l'). The CTEs\n\
         -- run though nothing reads them.\n"
    };
    let (skip_settled, settled, inserted) = if fresh {
        ("", "input i", "")
    } else {
        (
            r#"        ON CONFLICT ON CONSTRAINT sb_settlements_pkey DO NOTHING
        RETURNING sb_settlements.id
"#,
            "input i JOIN ins ON ins.id = i.id",
            r#"    SELECT 'i'::text, ins.id, NULL::bigint, NULL::bigint, NULL::bigint FROM ins
    UNION ALL
"#,
        )
    };
    let (day_on_key, daily) = if day_counter {
        (
            r#",
               spent_today = CASE WHEN k.spent_day = today THEN k.spent_today ELSE 0 END
                             + d.cost,
               spent_day = today"#,
            r#"    ), roll AS (
        -- What the key row counted for an earlier day, into that day's row.
        INSERT INTO sb_daily_spend AS s (key_id, day, spent)
        SELECT k.id, k.spent_day, k.spent_today FROM sb_keys k JOIN done d ON d.key_id = k.id
         WHERE k.spent_day <> today AND k.spent_today > 0
        ON CONFLICT (key_id, day) DO UPDATE SET spent = s.spent + excluded.spent
        RETURNING s.key_id
"#,
        )
    } else {
        (
            "",
            r#"    ), daily AS (
        INSERT INTO sb_daily_spend AS s (key_id, day, spent)
        SELECT d.key_id, today, d.cost FROM done d WHERE d.cost > 0
        ON CONFLICT (key_id, day) DO UPDATE SET spent = s.spent + excluded.spent
        RETURNING s.key_id
"#,
        )
    };
    format!(
        r#"
{comment}CREATE OR REPLACE FUNCTION {name}(
    p_instance TEXT, p_ids TEXT[], p_keys TEXT[], p_costs BIGINT[], p_tokens BIGINT[],
    p_reserved BIGINT[], p_reserved_tokens BIGINT[], p_models TEXT[], p_providers TEXT[],
    p_streamed BOOLEAN[], p_prompt BIGINT[], p_completion BIGINT[], p_latency BIGINT[],
    p_ttft BIGINT[], p_attempts TEXT[], p_finish TEXT[], p_created BIGINT[],
    p_app_url TEXT[], p_app_title TEXT[], p_now BIGINT)
RETURNS TABLE (kind TEXT, id TEXT, amount BIGINT, tokens BIGINT, ver BIGINT)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    today BIGINT := p_now / 86400;
BEGIN
    PERFORM 1 FROM sb_keys k WHERE k.id = ANY(p_keys) ORDER BY k.id FOR UPDATE;
    PERFORM 1 FROM sb_leases l WHERE l.instance = p_instance AND l.key_id = ANY(p_keys)
      ORDER BY l.key_id FOR UPDATE;
    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_keys, p_costs, p_tokens, p_reserved, p_reserved_tokens,
                             p_models, p_providers, p_streamed, p_prompt, p_completion,
                             p_latency, p_ttft, p_attempts, p_finish, p_created,
                             p_app_url, p_app_title)
            AS t(id, key_id, cost, tokens, reserved, reserved_tokens, model, provider,
                 streamed, prompt_tokens, completion_tokens, latency_ms, ttft_ms,
                 attempts, finish_reason, created, app_url, app_title)
    ), ins AS (
        INSERT INTO sb_settlements (id, key_id, cost, tokens, model, provider, streamed,
            prompt_tokens, completion_tokens, latency_ms, ttft_ms, attempts, finish_reason,
            created, app_url, app_title)
        SELECT i.id, i.key_id, i.cost, i.tokens, i.model, i.provider, i.streamed,
               i.prompt_tokens, i.completion_tokens, i.latency_ms, i.ttft_ms, i.attempts,
               i.finish_reason, i.created, i.app_url, i.app_title
          FROM input i
{skip_settled}    ), done AS (
        SELECT i.key_id, sum(i.cost) AS cost, sum(i.tokens) AS tokens,
               sum(i.reserved) AS reserved, sum(i.reserved_tokens) AS reserved_tokens
          FROM {settled}
         GROUP BY i.key_id
    ), spend AS (
        UPDATE sb_keys k
           SET spent = k.spent + d.cost,
               tokens_used = least(
                   CASE WHEN k.tokens_day = today THEN k.tokens_used ELSE 0 END + d.tokens,
                   9223372036854775807),
               tokens_day = today{day_on_key}
          FROM done d
         WHERE k.id = d.key_id
        RETURNING k.id
{daily}    ), lease AS (
        UPDATE sb_leases l
           SET amount = greatest(l.amount - d.reserved, 0),
               tokens = greatest(l.tokens - d.reserved_tokens, 0),
               ver = nextval('sb_lease_versions')
          FROM done d
         WHERE l.key_id = d.key_id AND l.instance = p_instance
        RETURNING l.key_id, l.amount, l.tokens, l.ver
    )
{inserted}    SELECT 'l'::text, lease.key_id, lease.amount, lease.tokens, lease.ver FROM lease;
END
$fn$;
"#
    )
}

/// `sb_settle_fresh`: `sb_settle` for a batch none of whose request ids can have been
/// settled before (the writer's first try of a batch). The rows go in with a plain
/// `INSERT` (no `ON CONFLICT` check before each row, no speculative insertion) and no
/// id comes back: if one was settled after all, the primary key refuses the whole
/// statement (`unique_violation`, nothing committed) and the writer sends the batch
/// again through `sb_settle`, which skips it. So a request id is still charged at
/// most once, by the primary key, and a batch costs PostgreSQL 10–20 % less (48 rows:
/// 560–630 µs of CPU against 690–750; 24 rows: 430–500 against 490–550;
/// `benches/tools/pg_settle_statements.sh`, BENCHMARKS.md, sixteenth session). Same
/// arguments as `sb_settle`; returns only the lease rows (kind 'l'). Idempotent.
fn step_8() -> String {
    settle_function(true, false)
}

/// Version 9: a key's spending of its latest UTC day on the key row (`spent_day`,
/// `spent_today`) instead of a row of `sb_daily_spend` upserted for every key of
/// every settlement batch. A batch already updates each key's row (`spent`, the
/// day's tokens); the upsert was a third row per key and batch (with the lease's),
/// most of what a batch over many keys cost PostgreSQL beyond one over a single key
/// (BENCHMARKS.md, seventeenth session). The first settlement of a later day moves
/// the day before's total into `sb_daily_spend`; readers of a period's spending add
/// the key row's counter when its day is in the period (`sb_lease`, and
/// `/v1/key`'s usage). What `sb_daily_spend` holds from before stays: the counter
/// starts at 0, so nothing is counted twice. `sb_lease`, `sb_settle` and
/// `sb_settle_fresh` are replaced (same arguments). Idempotent.
fn step_9() -> String {
    let max_spent = MAX_SPENT.pico();
    format!(
        r#"
ALTER TABLE sb_keys ADD COLUMN IF NOT EXISTS spent_day BIGINT;
ALTER TABLE sb_keys ADD COLUMN IF NOT EXISTS spent_today BIGINT NOT NULL DEFAULT 0
    CHECK (spent_today BETWEEN 0 AND {max_spent});
"#
    ) + &lease_function(true)
        + &settle_function(false, true)
        + &settle_function(true, true)
}

/// Without `sb_settlements_key_created`: nothing reads settlements by key and time
/// (`/v1/generation` reads one by its id, the usage API reads the request log), and
/// the index cost PostgreSQL ≈ 1–1.5 µs of CPU per settlement row (30-row inserts,
/// `benches/tools/pg_settlement_index.sh`: 170–195 µs with it, 140–150 without;
/// BENCHMARKS.md, fifteenth session). Idempotent.
fn step_7() -> String {
    "DROP INDEX IF EXISTS sb_settlements_key_created;".into()
}

/// Keys' `labels` (a JSON object), deletion (`deleted_at`, Unix seconds; the row
/// stays for the books) and the secret a rotation replaced (`old_secret_sha256`,
/// found until `old_secret_until`). Idempotent.
fn step_6() -> String {
    r#"
ALTER TABLE sb_keys ADD COLUMN IF NOT EXISTS labels TEXT;
ALTER TABLE sb_keys ADD COLUMN IF NOT EXISTS deleted_at BIGINT;
ALTER TABLE sb_keys ADD COLUMN IF NOT EXISTS old_secret_sha256 BYTEA;
ALTER TABLE sb_keys ADD COLUMN IF NOT EXISTS old_secret_until BIGINT;
CREATE INDEX IF NOT EXISTS sb_keys_old_secret ON sb_keys (old_secret_sha256)
 WHERE old_secret_sha256 IS NOT NULL;
"#
    .into()
}

/// The idempotency records of SPEC §8.2: one per client key and idempotency key,
/// inserted by the statement that commits its settlement (see `writer::statement`),
/// deleted once `expires` (Unix seconds) has passed.
fn step_5() -> String {
    r#"
CREATE TABLE IF NOT EXISTS sb_idempotency (
    key_id      TEXT NOT NULL,
    idem_key    TEXT NOT NULL,
    fingerprint BYTEA NOT NULL,
    request_id  TEXT NOT NULL,
    status      INTEGER NOT NULL,
    headers     TEXT NOT NULL,
    body        BYTEA NOT NULL,
    created     BIGINT NOT NULL,
    expires     BIGINT NOT NULL,
    PRIMARY KEY (key_id, idem_key)
);
CREATE INDEX IF NOT EXISTS sb_idempotency_expires ON sb_idempotency (expires);
"#
    .into()
}

/// The response cache's step (SPEC §8.1):
/// `sb_settlements.cache_hit`, set on the free record of a cache hit (by an `UPDATE`
/// in the transaction of the `sb_settle` that inserts it, so `sb_settle` itself is
/// unchanged). Idempotent.
fn step_4() -> String {
    "ALTER TABLE sb_settlements ADD COLUMN IF NOT EXISTS cache_hit BOOLEAN NOT NULL DEFAULT false;"
        .into()
}

/// Version 2: `sb_ledger`, the database's identity (one random id): a spill file
/// (charges an instance could not commit, kept on its disk) is replayed only into the
/// database it is owed to.
fn step_2() -> String {
    r#"
CREATE TABLE IF NOT EXISTS sb_ledger (
    one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    id   TEXT NOT NULL
);
INSERT INTO sb_ledger (id)
VALUES (md5(random()::text || clock_timestamp()::text || pg_backend_pid()::text))
ON CONFLICT DO NOTHING;
"#
    .into()
}

/// Version 1: keys, leases, settlements; `sb_lease`, `sb_settle`, `sb_shrink`.
fn step_1() -> String {
    let max_credits = MAX_CREDITS.pico();
    let max_spent = MAX_SPENT.pico();
    format!(
        r#"
CREATE TABLE IF NOT EXISTS sb_keys (
    id             TEXT PRIMARY KEY,
    n              BIGINT GENERATED ALWAYS AS IDENTITY,
    secret_sha256  BYTEA NOT NULL UNIQUE,
    name           TEXT NOT NULL,
    created        BIGINT NOT NULL,
    disabled       BOOLEAN NOT NULL DEFAULT false,
    credits        BIGINT NOT NULL CHECK (credits BETWEEN 0 AND {max_credits}),
    spent          BIGINT NOT NULL DEFAULT 0 CHECK (spent BETWEEN 0 AND {max_spent}),
    limit_usd      BIGINT CHECK (limit_usd BETWEEN 0 AND {max_credits}),
    rpm            INTEGER CHECK (rpm >= 1),
    tokens_per_day BIGINT CHECK (tokens_per_day >= 0),
    models         TEXT,
    tokens_day     BIGINT NOT NULL DEFAULT 0,
    tokens_used    BIGINT NOT NULL DEFAULT 0 CHECK (tokens_used >= 0)
);

-- Each instance's escrow on a key: money and tokens it may admit against without
-- asking, until expires_at (PostgreSQL's clock). ver orders the answers about a row.
CREATE TABLE IF NOT EXISTS sb_leases (
    key_id     TEXT NOT NULL,
    instance   TEXT NOT NULL,
    amount     BIGINT NOT NULL CHECK (amount >= 0),
    tokens     BIGINT NOT NULL CHECK (tokens >= 0),
    ver        BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (key_id, instance)
);
CREATE INDEX IF NOT EXISTS sb_leases_instance ON sb_leases (instance);
CREATE SEQUENCE IF NOT EXISTS sb_lease_versions;

-- One row per settled request, keyed by the gateway's request id (never twice);
-- /v1/generation reads it.
CREATE TABLE IF NOT EXISTS sb_settlements (
    id                TEXT PRIMARY KEY,
    key_id            TEXT NOT NULL,
    cost              BIGINT NOT NULL CHECK (cost >= 0),
    tokens            BIGINT NOT NULL CHECK (tokens >= 0),
    model             TEXT NOT NULL,
    provider          TEXT NOT NULL,
    streamed          BOOLEAN NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    latency_ms        BIGINT NOT NULL,
    ttft_ms           BIGINT,
    attempts          TEXT NOT NULL,
    finish_reason     TEXT,
    created           BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS sb_settlements_key_created ON sb_settlements (key_id, created);

-- Sets this instance's lease on a key to what it needs plus headroom, or refuses.
-- Under the key's row lock: expired leases of the key are deleted; what is free for
-- this instance is cap - spent - the other instances' leases (cap = least(credits,
-- limit_usd)); with free >= need (and the same for tokens against tokens_per_day)
-- the lease becomes need + least(headroom, (free - need) / 8), never less than it
-- was, else it stays as it was (ok = false). A refusal that the other instances'
-- leases could lift asks them to give back what they do not use (pressure = true,
-- NOTIFY sb_lease_pressure).
CREATE OR REPLACE FUNCTION sb_lease(
    p_key TEXT, p_instance TEXT, p_need BIGINT, p_headroom BIGINT,
    p_need_tokens BIGINT, p_headroom_tokens BIGINT, p_ttl_ms BIGINT)
RETURNS TABLE (ok BOOLEAN, pressure BOOLEAN, amount BIGINT, tokens BIGINT, ver BIGINT,
               credits BIGINT, spent BIGINT, limit_usd BIGINT, others BIGINT,
               tokens_per_day BIGINT, tokens_used BIGINT, others_tokens BIGINT)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    k sb_keys%ROWTYPE;
    today BIGINT := floor(extract(epoch FROM now()) / 86400)::bigint;
    mine_amount BIGINT := 0;
    mine_tokens BIGINT := 0;
    o NUMERIC;
    ot NUMERIC;
    used BIGINT;
    free NUMERIC;
    tfree NUMERIC;
    fits BOOLEAN;
    new_amount BIGINT;
    new_tokens BIGINT;
    v BIGINT;
BEGIN
    SELECT * INTO k FROM sb_keys WHERE id = p_key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    DELETE FROM sb_leases l WHERE l.key_id = p_key AND l.expires_at <= now();
    SELECT coalesce(sum(l.amount), 0), coalesce(sum(l.tokens), 0) INTO o, ot
      FROM sb_leases l WHERE l.key_id = p_key AND l.instance <> p_instance;
    SELECT l.amount, l.tokens INTO mine_amount, mine_tokens
      FROM sb_leases l WHERE l.key_id = p_key AND l.instance = p_instance;
    mine_amount := coalesce(mine_amount, 0);
    mine_tokens := coalesce(mine_tokens, 0);
    used := CASE WHEN k.tokens_day = today THEN k.tokens_used ELSE 0 END;
    free := least(k.credits, coalesce(k.limit_usd, k.credits))::numeric - k.spent - o;
    tfree := CASE WHEN k.tokens_per_day IS NULL THEN NULL
                  ELSE k.tokens_per_day::numeric - used - ot END;
    fits := free >= p_need AND (tfree IS NULL OR tfree >= p_need_tokens);
    v := nextval('sb_lease_versions');
    IF fits THEN
        new_amount := greatest(mine_amount, p_need + least(p_headroom::numeric, floor((free - p_need) / 8)));
        new_tokens := CASE WHEN tfree IS NULL THEN mine_tokens
            ELSE greatest(mine_tokens, p_need_tokens + least(p_headroom_tokens::numeric, floor((tfree - p_need_tokens) / 8))) END;
        INSERT INTO sb_leases AS l (key_id, instance, amount, tokens, ver, expires_at)
        VALUES (p_key, p_instance, new_amount, new_tokens, v, now() + p_ttl_ms * interval '1 millisecond')
        ON CONFLICT (key_id, instance) DO UPDATE
            SET amount = excluded.amount, tokens = excluded.tokens, ver = excluded.ver,
                expires_at = excluded.expires_at;
        RETURN QUERY SELECT true, false, new_amount, new_tokens, v, k.credits, k.spent,
            k.limit_usd, o::bigint, k.tokens_per_day, used, ot::bigint;
    ELSE
        pressure := (o > 0 OR ot > 0) AND free + o >= p_need
            AND (tfree IS NULL OR tfree + ot >= p_need_tokens);
        IF pressure THEN
            PERFORM pg_notify('sb_lease_pressure', p_key || ' ' || p_instance);
        END IF;
        RETURN QUERY SELECT false, pressure, mine_amount, mine_tokens, v, k.credits, k.spent,
            k.limit_usd, o::bigint, k.tokens_per_day, used, ot::bigint;
    END IF;
END
$fn$;

-- Commits a batch of settlements of one instance: the rows (a request id already
-- settled is skipped), their cost added to spent and their tokens to the day's
-- count, and this instance's leases of those keys shrunk by the reservations the
-- new rows release (p_instance NULL, a replay of spilled charges: no lease). Key rows, then lease rows, are locked in key order (no deadlock
-- with another instance's batch). Returns the ids inserted (kind 'i') and each
-- changed lease (kind 'l'). The spend CTE runs though nothing reads it.
CREATE OR REPLACE FUNCTION sb_settle(
    p_instance TEXT, p_ids TEXT[], p_keys TEXT[], p_costs BIGINT[], p_tokens BIGINT[],
    p_reserved BIGINT[], p_reserved_tokens BIGINT[], p_models TEXT[], p_providers TEXT[],
    p_streamed BOOLEAN[], p_prompt BIGINT[], p_completion BIGINT[], p_latency BIGINT[],
    p_ttft BIGINT[], p_attempts TEXT[], p_finish TEXT[], p_created BIGINT[])
RETURNS TABLE (kind TEXT, id TEXT, amount BIGINT, tokens BIGINT, ver BIGINT)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    today BIGINT := floor(extract(epoch FROM now()) / 86400)::bigint;
BEGIN
    PERFORM 1 FROM sb_keys k WHERE k.id = ANY(p_keys) ORDER BY k.id FOR UPDATE;
    PERFORM 1 FROM sb_leases l WHERE l.instance = p_instance AND l.key_id = ANY(p_keys)
      ORDER BY l.key_id FOR UPDATE;
    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_keys, p_costs, p_tokens, p_reserved, p_reserved_tokens,
                             p_models, p_providers, p_streamed, p_prompt, p_completion,
                             p_latency, p_ttft, p_attempts, p_finish, p_created)
            AS t(id, key_id, cost, tokens, reserved, reserved_tokens, model, provider,
                 streamed, prompt_tokens, completion_tokens, latency_ms, ttft_ms,
                 attempts, finish_reason, created)
    ), ins AS (
        INSERT INTO sb_settlements (id, key_id, cost, tokens, model, provider, streamed,
            prompt_tokens, completion_tokens, latency_ms, ttft_ms, attempts, finish_reason, created)
        SELECT i.id, i.key_id, i.cost, i.tokens, i.model, i.provider, i.streamed,
               i.prompt_tokens, i.completion_tokens, i.latency_ms, i.ttft_ms, i.attempts,
               i.finish_reason, i.created
          FROM input i
        ON CONFLICT ON CONSTRAINT sb_settlements_pkey DO NOTHING
        RETURNING sb_settlements.id
    ), done AS (
        SELECT i.key_id, sum(i.cost) AS cost, sum(i.tokens) AS tokens,
               sum(i.reserved) AS reserved, sum(i.reserved_tokens) AS reserved_tokens
          FROM input i JOIN ins ON ins.id = i.id
         GROUP BY i.key_id
    ), spend AS (
        UPDATE sb_keys k
           SET spent = k.spent + d.cost,
               tokens_used = least(
                   CASE WHEN k.tokens_day = today THEN k.tokens_used ELSE 0 END + d.tokens,
                   9223372036854775807),
               tokens_day = today
          FROM done d
         WHERE k.id = d.key_id
        RETURNING k.id
    ), lease AS (
        UPDATE sb_leases l
           SET amount = greatest(l.amount - d.reserved, 0),
               tokens = greatest(l.tokens - d.reserved_tokens, 0),
               ver = nextval('sb_lease_versions')
          FROM done d
         WHERE l.key_id = d.key_id AND l.instance = p_instance
        RETURNING l.key_id, l.amount, l.tokens, l.ver
    )
    SELECT 'i'::text, ins.id, NULL::bigint, NULL::bigint, NULL::bigint FROM ins
    UNION ALL
    SELECT 'l'::text, lease.key_id, lease.amount, lease.tokens, lease.ver FROM lease;
END
$fn$;

-- Shrinks this instance's leases of some keys to at most the given amounts (what it
-- has in use), deleting those left empty. Returns every given key's lease after it
-- (0, 0 for none), with a version to order the answer.
CREATE OR REPLACE FUNCTION sb_shrink(
    p_instance TEXT, p_keys TEXT[], p_amounts BIGINT[], p_tokens BIGINT[])
RETURNS TABLE (key_id TEXT, amount BIGINT, tokens BIGINT, ver BIGINT)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM sb_keys k WHERE k.id = ANY(p_keys) ORDER BY k.id FOR UPDATE;
    PERFORM 1 FROM sb_leases l WHERE l.instance = p_instance AND l.key_id = ANY(p_keys)
      ORDER BY l.key_id FOR UPDATE;
    UPDATE sb_leases l
       SET amount = least(l.amount, t.amount), tokens = least(l.tokens, t.tokens)
      FROM unnest(p_keys, p_amounts, p_tokens) AS t(key_id, amount, tokens)
     WHERE l.key_id = t.key_id AND l.instance = p_instance;
    DELETE FROM sb_leases l
     WHERE l.instance = p_instance AND l.key_id = ANY(p_keys) AND l.amount = 0 AND l.tokens = 0;
    RETURN QUERY
    SELECT t.key_id, coalesce(l.amount, 0), coalesce(l.tokens, 0), nextval('sb_lease_versions')
      FROM unnest(p_keys) AS t(key_id)
      LEFT JOIN sb_leases l ON l.key_id = t.key_id AND l.instance = p_instance
     ORDER BY t.key_id;
END
$fn$;
"#
    )
}
