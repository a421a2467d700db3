#!/usr/bin/env bash
# Is the rest of the added latency the VM waking an idle vCPU, or the gateway's own
# work? Serves the bare proxy and the gateway on CPU 1 (the upstream and the load on
# CPU 0, as loadbench does) and measures both, 4 alternating rounds, without and
# with a SCHED_IDLE busy loop on CPU 1: with it the vCPU never halts between
# requests, so a wake-up is a switch inside the guest, not a VM exit; any other
# thread preempts the loop at once. Prints loadbench's `rate` line per run.
#
# Usage: benches/tools/awake_cpu.sh [LOADBENCH]   (default target/dist/examples/loadbench)
# See BENCHMARKS.md ("Seventh session: the CPU kept awake").
set -euo pipefail
LB=$(realpath "${1:-target/dist/examples/loadbench}")
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
wait_addr() { for _ in $(seq 100); do [[ -s $1 ]] && { head -1 "$1"; return; }; sleep 0.1; done; echo "no address in $1" >&2; exit 1; }

taskset -c 0 "$LB" upstream > "$dir/up.addr" &
UP=$(wait_addr "$dir/up.addr")
config=$("$LB" config "$dir" "$UP")  # the load benchmark's own gateway config
(cd "$dir" && RUST_LOG=warn exec taskset -c 1 "$LB" gateway "$UP" "$config" > "$dir/gw.addr") &
taskset -c 1 "$LB" proxy "$UP" > "$dir/px.addr" &
G=$(wait_addr "$dir/gw.addr"); P=$(wait_addr "$dir/px.addr")
for a in "$G" "$P"; do taskset -c 0 "$LB" rate "$a" 500 1 > /dev/null; done  # warm-up

for r in 1 2 3 4; do
  for awake in no yes; do
    spin=
    if [[ $awake == yes ]]; then
      chrt -i 0 taskset -c 1 sh -c 'while :; do :; done' & spin=$!
    fi
    for mode in "200 3 stream" "1000 3"; do
      for who in proxy gateway; do
        addr=$P; [[ $who == gateway ]] && addr=$G
        # shellcheck disable=SC2086 # $mode is the rate, the seconds and maybe "stream"
        echo "round $r awake=$awake $mode $who: $(taskset -c 0 "$LB" rate "$addr" $mode)"
        sleep 0.5
      done
    done
    if [[ -n $spin ]]; then kill "$spin"; wait "$spin" 2>/dev/null || true; fi
  done
done
