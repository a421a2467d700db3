#!/usr/bin/env bash
# Two builds of the gateway side by side: serves the gateway of loadbench binary A
# and of loadbench binary B (each with its own bench config) against one fake
# upstream, the gateways on CPU 1 and the upstream and the load on CPU 0, as
# loadbench does, and measures them in alternating rounds: 200 streams/s (time to
# first byte) and 1,000 req/s, plus the gateways' CPU time per request. Prints
# loadbench's `rate` line per run and the CPU µs per request of each gateway.
#
# Usage: benches/tools/before_after.sh OLD_LOADBENCH NEW_LOADBENCH [ROUNDS]
# (build each with `cargo build --release --example loadbench` in its checkout)
set -euo pipefail
A=$(realpath "$1"); B=$(realpath "$2"); ROUNDS=${3:-6}
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
wait_addr() { for _ in $(seq 100); do [[ -s $1 ]] && { head -1 "$1"; return; }; sleep 0.1; done; echo "no address in $1" >&2; exit 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

taskset -c 0 "$A" upstream > "$dir/up.addr" &
UP=$(wait_addr "$dir/up.addr")
mkdir -p "$dir/a" "$dir/b"
ca=$("$A" config "$dir/a" "$UP"); cb=$("$B" config "$dir/b" "$UP")
(cd "$dir/a" && RUST_LOG=warn exec taskset -c 1 "$A" gateway "$UP" "$ca" > "$dir/a.addr") & PA=$!
(cd "$dir/b" && RUST_LOG=warn exec taskset -c 1 "$B" gateway "$UP" "$cb" > "$dir/b.addr") & PB=$!
GA=$(wait_addr "$dir/a.addr"); GB=$(wait_addr "$dir/b.addr")
taskset -c 0 "$A" rate "$GA" 500 1 > /dev/null; taskset -c 0 "$B" rate "$GB" 500 1 > /dev/null  # warm-up

for r in $(seq "$ROUNDS"); do
  for mode in "200 3 stream" "1000 3"; do
    for who in old new; do
      # Each build's own load generator: it knows its own bench config's client key.
      addr=$GA pid=$PA lb=$A; [[ $who == new ]] && addr=$GB pid=$PB lb=$B
      before=$(cpu_ticks "$pid")
      # shellcheck disable=SC2086 # $mode is the rate, the seconds and maybe "stream"
      line=$(taskset -c 0 "$lb" rate "$addr" $mode)
      after=$(cpu_ticks "$pid")
      n=$(awk '{print $2}' <<< "$line")
      cpu=$(awk -v t=$((after - before)) -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
      echo "round $r $mode $who: $line; CPU $cpu µs/req"
      sleep 0.5
    done
  done
done
