#!/usr/bin/env bash
# Two builds' response cache side by side on all-miss traffic at saturation: one fake
# upstream (CPU 0), the gateways of loadbench binaries A and B (each with the bench's
# config plus an in-memory `[cache]` of 16 MiB, both on CPU 1, one driven at a time),
# and in each round, in turn: A with the cache asked for, B asked, A not asked, B not
# asked (`loadbench drive-misses`: 64 connections, a new body every request). Prints
# each gateway's CPU µs per request and its growth (asked / not asked) per round.
#
# Usage: benches/tools/cache_miss_ab.sh A_LOADBENCH B_LOADBENCH [ROUNDS] [SECS]
# Environment: LOADBENCH_BODY_KB=N makes every body ≈ N KB longer (a long prompt;
# the driver is B's binary, so B must know the variable); MAXB_A / MAXB_B set each
# cache's `max_bytes`; HACK_B is passed to B's gateway as SB_HACK (throwaway builds).
set -euo pipefail
A=$(realpath "$1"); B=$(realpath "$2"); R=${3:-6}; S=${4:-3}
MA=${MAXB_A:-16777216}; MB=${MAXB_B:-16777216}
DRIVER=$B
dir=$(mktemp -d); mkdir "$dir/a" "$dir/b"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
wait_addr() { for _ in $(seq 100); do [[ -s $1 ]] && { head -1 "$1"; return; }; sleep 0.1; done; echo "no address in $1" >&2; exit 1; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
taskset -c 0 "$A" upstream > "$dir/up.addr" &
UP=$(wait_addr "$dir/up.addr")
config() { # binary, dir, max_bytes -> the config's path
  local cfg; cfg=$("$1" config "$2" "$UP")
  printf '\n[cache]\nenabled_by_default = false\nttl_secs = 3600\nmax_bytes = %s\n' "$3" >> "$cfg"
  echo "$cfg"
}
ca=$(config "$A" "$dir/a" "$MA"); cb=$(config "$B" "$dir/b" "$MB")
(cd "$dir/a" && RUST_LOG=warn exec taskset -c 1 "$A" gateway "$UP" "$ca" > "$dir/a/addr") & PA=$!
(cd "$dir/b" && SB_HACK=${HACK_B:-} RUST_LOG=warn exec taskset -c 1 "$B" gateway "$UP" "$cb" > "$dir/b/addr") & PB=$!
GA=$(wait_addr "$dir/a/addr"); GB=$(wait_addr "$dir/b/addr")
for g in "$GA" "$GB"; do taskset -c 0 "$DRIVER" drive-misses "$g" 4 > /dev/null; done  # fill
one() { # addr, pid, "" or off -> CPU µs per request
  local c0 c1 n
  c0=$(ticks "$2")
  n=$(taskset -c 0 "$DRIVER" drive-misses "$1" "$S" $3 | awk '{print $1}')
  c1=$(ticks "$2")
  awk -v t=$((c1 - c0)) -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}'
}
for r in $(seq "$R"); do
  aon=$(one "$GA" $PA ""); bon=$(one "$GB" $PB ""); aoff=$(one "$GA" $PA off); boff=$(one "$GB" $PB off)
  awk -v r="$r" -v a="$aon" -v b="$bon" -v c="$aoff" -v d="$boff" 'BEGIN {
    printf "round %d: A asked %s not %s (%+.1f %%)  B asked %s not %s (%+.1f %%)\n", r, a, c, (a / c - 1) * 100, b, d, (b / d - 1) * 100 }'
done
