#!/usr/bin/env bash
# PostgreSQL's CPU per request-log row: the batch as the sink sent it until the
# seventeenth session (`INSERT … SELECT * FROM UNNEST($1, …, $28)` of one binary array
# per column, no `ON CONFLICT`) against a binary `COPY` (what the sink sends now on a
# batch's first try), on the real `requests` table (its schema is read from
# src/logging/postgres.rs), in alternating rounds, with `synchronous_commit = off` as
# the sink's connection has it. CPU is every `postgres` process's
# utime+stime+cutime+cstime from /proc, so nothing else may use the server meanwhile.
#
# Usage: benches/tools/pg_log_copy.sh [ROUNDS] [ROWS...]   (default: 4 rounds, 500 50)
#   (PostgreSQL on 127.0.0.1 with trust auth; python3 with venv; installs psycopg into
#   target/pg-tools-venv on first use)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/pg-tools-venv
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import psycopg' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'psycopg[binary]>=3.1'
fi
sed -n '/^pub const POSTGRES_SCHEMA: &str = "/,/^";/p' src/logging/postgres.rs \
  | sed '1s/^pub const POSTGRES_SCHEMA: &str = "//; $d' > target/pg_log_copy_schema.sql
exec "$venv/bin/python" - "$@" <<'PY'
import subprocess, sys, time
import psycopg

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
sizes = [int(a) for a in sys.argv[2:]] or [500, 50]
DB = "sb_log_copy_bench"
admin = psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True)
admin.execute(f"DROP DATABASE IF EXISTS {DB}")
admin.execute(f"CREATE DATABASE {DB}")
try:
    conn = psycopg.connect(f"host=127.0.0.1 user=postgres dbname={DB}", autocommit=True)
    conn.execute(open("target/pg_log_copy_schema.sql").read())
    conn.execute("SET synchronous_commit = off")
    cols = ("id, time_ms, key_id, requested_model, model, provider, status, prompt_tokens, "
            "completion_tokens, cached_tokens, reasoning_tokens, cost_pico, latency_ms, ttft_ms, "
            "streamed, complete, finish_reason, error_code, attempts, prompt, completion, "
            "over_reserve, app_url, app_title, cache_hit, key_name, key_labels, client_ip")
    types = ("text int8 text text text text int4 int8 int8 int8 int8 int8 int8 int8 bool bool "
             "text text text text text bool text text bool text text text").split()
    insert = (f"INSERT INTO requests ({cols}) SELECT * FROM UNNEST("
              + ", ".join(f"%s::{t}[]" for t in types) + ")")
    copy = f"COPY requests ({cols}) FROM STDIN (FORMAT binary)"
    seq = 0

    def rows(n):
        global seq
        out = []
        for _ in range(n):
            seq += 1
            t = int(time.time() * 1000)
            out.append((f"gen-{t:012x}{seq:020d}", t, "k-hot-0123456789abcdef", "bench/model",
                        "bench/model", "up", 200, 12, 10, 0, 0, 7800000, 1, 1, False, True,
                        "stop", None, '[{"provider":"up","status":"200","latency_ms":1}]',
                        None, None, False, None, None, False, "hot", None, "127.0.0.1"))
        return out

    def ticks():
        total = 0
        pids = subprocess.run(["pgrep", "postgres"], capture_output=True, text=True).stdout
        for p in pids.split():
            try:  # (a process may end between pgrep and the read: not a failure)
                f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
                total += sum(int(x) for x in f[11:15])
            except OSError:
                pass
        return total

    def by_insert(batch):
        conn.execute(insert, [list(c) for c in zip(*batch)], prepare=True, binary=True)

    def by_copy(batch):
        with conn.cursor() as cur, cur.copy(copy) as cp:
            cp.set_types(types)
            for r in batch:
                cp.write_row(r)

    batches = 100
    for r in range(1, rounds + 1):
        for n in sizes:
            for name, write in (("insert", by_insert), ("copy", by_copy)):
                todo = [rows(n) for _ in range(batches)]
                a = ticks()
                for b in todo:
                    write(b)
                us = (ticks() - a) * 10000 / batches
                print(f"round {r}, {name}-{n}: {us:.0f} µs of PostgreSQL CPU per batch, "
                      f"{us / n:.1f} per row", flush=True)
    conn.close()
finally:
    admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
PY
