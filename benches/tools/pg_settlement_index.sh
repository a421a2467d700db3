#!/usr/bin/env bash
# PostgreSQL's CPU per 30-row insert into a table shaped as sb_settlements, with and
# without its old (key_id, created) index (schema step 7 dropped it), in alternating
# rounds. CPU is every `postgres` process's utime+stime+cutime+cstime from /proc
# (pgbench's backend is reaped by the postmaster when it exits), so nothing else may
# use the server meanwhile.
#
# Usage: benches/tools/pg_settlement_index.sh [ROUNDS] (PostgreSQL on 127.0.0.1, trust)
set -euo pipefail
ROUNDS=${1:-3}
PG=(-h 127.0.0.1 -U postgres)
dir=$(mktemp -d)
trap 'psql "${PG[@]}" -d postgres -qc "DROP DATABASE IF EXISTS sb_idx_bench" >/dev/null; rm -rf "$dir"' EXIT
psql "${PG[@]}" -d postgres -qc "DROP DATABASE IF EXISTS sb_idx_bench" -c "CREATE DATABASE sb_idx_bench"
psql "${PG[@]}" -d sb_idx_bench -q <<'SQL'
CREATE TABLE s_idx (id TEXT PRIMARY KEY, key_id TEXT NOT NULL, cost BIGINT NOT NULL,
  tokens BIGINT NOT NULL, model TEXT NOT NULL, provider TEXT NOT NULL, streamed BOOLEAN NOT NULL,
  prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, latency_ms BIGINT NOT NULL,
  ttft_ms BIGINT, attempts TEXT NOT NULL, finish_reason TEXT, created BIGINT NOT NULL,
  app_url TEXT, app_title TEXT, cache_hit BOOLEAN NOT NULL DEFAULT false);
CREATE INDEX s_idx_kc ON s_idx (key_id, created);
CREATE TABLE s_noidx (LIKE s_idx INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE s_noidx ADD PRIMARY KEY (id);
SQL
for t in idx noidx; do
  cat > "$dir/$t.sql" <<SQL
INSERT INTO s_$t (id, key_id, cost, tokens, model, provider, streamed, prompt_tokens,
  completion_tokens, latency_ms, ttft_ms, attempts, finish_reason, created)
SELECT 'gen-' || lpad(to_hex((extract(epoch from clock_timestamp()) * 1000)::bigint), 12, '0')
       || md5(random()::text), 'key-hot-000000001', 7800000, 22, 'bench/model', 'up', false,
       12, 10, 1, 1, '[{"provider":"up","status":"200","latency_ms":1}]', 'stop',
       extract(epoch from now())::bigint
  FROM generate_series(1, 30);
SQL
done
# (a process may end between pgrep and awk: not a failure)
ticks() { for p in $(pgrep postgres); do awk '{print $14+$15+$16+$17}' "/proc/$p/stat" 2>/dev/null || true; done | awk '{s+=$1} END{print s}'; }
for r in $(seq "$ROUNDS"); do
  for t in idx noidx; do
    a=$(ticks)
    pgbench "${PG[@]}" -n -M prepared -c 1 -t 2000 -f "$dir/$t.sql" sb_idx_bench > /dev/null 2>&1
    b=$(ticks)
    echo "round $r, $t: $(( (b - a) * 10000 / 2000 )) µs of PostgreSQL CPU per 30-row statement"
  done
done
