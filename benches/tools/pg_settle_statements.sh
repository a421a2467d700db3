#!/usr/bin/env bash
# PostgreSQL's CPU per settlement statement and per request-log batch, on the real
# schema (migrated by the switchboard binary), in alternating rounds:
#   settle-N   sb_settle of N rows (ON CONFLICT, returns the inserted ids)
#   fresh-N    sb_settle_fresh of N rows (plain INSERT, returns the leases only)
#   log-oc     a 500-row request-log batch, INSERT … ON CONFLICT (id) DO NOTHING
#   log-plain  the same batch, plain INSERT (a batch's first try)
# plus `select1` (one round trip, nothing else) as the floor. The log's batches run
# with `synchronous_commit = off`, as the sink's connection does. Rows are built in SQL
# from constants and random ids (that part costs every variant alike); pgbench sends
# text parameters, the gateway binary ones, so compare variants, not absolute sizes.
# CPU is every `postgres` process's utime+stime+cutime+cstime from /proc, so nothing
# else may use the server meanwhile.
#
# Usage: benches/tools/pg_settle_statements.sh [ROUNDS] [ROWS...]
#   (PostgreSQL on 127.0.0.1 with trust auth; builds target/release/switchboard)
set -euo pipefail
ROUNDS=${1:-3}
shift || true
SIZES=("${@:-24 48}")
read -r -a SIZES <<< "${SIZES[*]}"
PG=(-h 127.0.0.1 -U postgres)
DB=sb_settle_bench
dir=$(mktemp -d)
trap 'psql "${PG[@]}" -d postgres -qc "DROP DATABASE IF EXISTS $DB" >/dev/null; rm -rf "$dir"' EXIT
cd "$(dirname "$0")/../.."
cargo build --release --quiet --bin switchboard
psql "${PG[@]}" -d postgres -qc "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
cat > "$dir/sb.toml" <<TOML
[store]
url = "postgres://postgres@127.0.0.1/$DB"
[logging]
sink = "postgres"
[[providers]]
name = "up"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
[[models]]
id = "m"
[[models.endpoints]]
provider = "up"
upstream_model = "m"
prompt_usd_per_mtok = 0.15
completion_usd_per_mtok = 0.6
[[keys]]
secret = "sk-bench-hot-00000000000000001"
name = "hot"
credits_usd = 1000000
TOML
target/release/switchboard keys list --config "$dir/sb.toml" > /dev/null
K=$(psql "${PG[@]}" -d $DB -Atc "SELECT id FROM sb_keys LIMIT 1")
psql "${PG[@]}" -d $DB -q <<SQL
INSERT INTO sb_leases (key_id, instance, amount, tokens, ver, expires_at)
VALUES ('$K', 'bench', 100000000000000000, 0, 1, now() + interval '10 years');
SQL
# The request log's table, as the sink makes it.
sed -n '/^pub const POSTGRES_SCHEMA: &str = "/,/^";/p' src/logging/postgres.rs \
  | sed '1s/^pub const POSTGRES_SCHEMA: &str = "//; $d' > "$dir/log.sql"
psql "${PG[@]}" -d $DB -q -f "$dir/log.sql" 2>/dev/null

ID="'gen-' || lpad(to_hex((extract(epoch from clock_timestamp()) * 1000)::bigint), 12, '0') || md5(random()::text)"
for n in "${SIZES[@]}"; do
  for f in settle fresh; do
    fn=sb_settle; [ $f = fresh ] && fn=sb_settle_fresh
    cat > "$dir/$f-$n.sql" <<SQL
SELECT count(*) FROM $fn('bench', ARRAY(SELECT $ID FROM generate_series(1, $n)),
 array_fill('$K'::text, ARRAY[$n]), array_fill(7800000::bigint, ARRAY[$n]), array_fill(22::bigint, ARRAY[$n]),
 array_fill(8000000::bigint, ARRAY[$n]), array_fill(0::bigint, ARRAY[$n]),
 array_fill('bench/model'::text, ARRAY[$n]), array_fill('up'::text, ARRAY[$n]), array_fill(false, ARRAY[$n]),
 array_fill(12::bigint, ARRAY[$n]), array_fill(10::bigint, ARRAY[$n]), array_fill(1::bigint, ARRAY[$n]),
 array_fill(1::bigint, ARRAY[$n]), array_fill('[{"provider":"up","status":"200","latency_ms":1}]'::text, ARRAY[$n]),
 array_fill('stop'::text, ARRAY[$n]), array_fill(1765000000::bigint, ARRAY[$n]),
 array_fill(NULL::text, ARRAY[$n]), array_fill(NULL::text, ARRAY[$n]), extract(epoch from now())::bigint);
SQL
  done
done
COLS="id, time_ms, key_id, requested_model, model, provider, status, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_pico, latency_ms, ttft_ms, streamed, complete, finish_reason, error_code, attempts, prompt, completion, over_reserve, app_url, app_title, cache_hit, key_name, key_labels, client_ip"
ROWS="SELECT $ID, (extract(epoch from clock_timestamp()) * 1000)::bigint, '$K', 'bench/model', 'bench/model', 'up', 200, 12::bigint, 10::bigint, 0::bigint, 0::bigint, 7800000::bigint, 1::bigint, 1::bigint, false, true, 'stop', NULL, '[{\"provider\":\"up\",\"status\":\"200\",\"latency_ms\":1}]', NULL, NULL, false, NULL, NULL, false, 'hot', NULL, '127.0.0.1' FROM generate_series(1, 500)"
echo "INSERT INTO requests ($COLS) $ROWS ON CONFLICT (id) DO NOTHING;" > "$dir/log-oc.sql"
echo "INSERT INTO requests ($COLS) $ROWS;" > "$dir/log-plain.sql"
echo "SELECT 1;" > "$dir/select1.sql"

# (a process may end between pgrep and awk: not a failure)
ticks() { for p in $(pgrep postgres); do awk '{print $14+$15+$16+$17}' "/proc/$p/stat" 2>/dev/null || true; done | awk '{s+=$1} END{print s}'; }
run() { # name, transactions
  local a b opts=""
  # The request log's connection commits without waiting for the WAL flush.
  case $1 in log-*) opts="-c synchronous_commit=off" ;; esac
  a=$(ticks)
  if ! PGOPTIONS="$opts" pgbench "${PG[@]}" -n -M prepared -c 1 -t "$2" -f "$dir/$1.sql" $DB > "$dir/out" 2>&1; then
    echo "round $r, $1: pgbench failed:"; tail -3 "$dir/out"; return
  fi
  b=$(ticks)
  echo "round $r, $1: $(( (b - a) * 10000 / $2 )) µs of PostgreSQL CPU per statement"
}
for r in $(seq "$ROUNDS"); do
  run select1 2000
  for n in "${SIZES[@]}"; do run settle-$n 1000; run fresh-$n 1000; done
  run log-oc 200
  run log-plain 200
done
