#!/bin/bash
# Registers uprobes (tracefs) on the functions a non-streamed response passes on its
# way out (upstream read -> client write),
# in the binary BIN (default: the loadbench example), as events sb:NAME.
# Then, with the server running under load:
#   perf record -e 'syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,sb:*' -p PID
#   perf script -F tid,time,event,trace | benches/tools/way_out_stages.py /dev/stdin
# Each probe costs a few µs (a trap), so read the stages against each other, and
# the total against a run without probes. Needs root. Remove with:
#   echo > /sys/kernel/tracing/uprobe_events
set -e
BIN=$(realpath "${1:-target/release/examples/loadbench}")
T=/sys/kernel/tracing
echo > $T/uprobe_events
# Offsets are file offsets: the symbol's address minus its segment's (vaddr - offset).
read -r OFF VADDR < <(readelf -lW "$BIN" | awk '$1=="LOAD" && $8=="E" {print $2, $3; exit}')
SHIFT=$((VADDR - OFF))
SYMS=$(mktemp)
nm -C "$BIN" | grep -E ' [tT] ' > "$SYMS"
probe() { # kind name regex: the first (at most 3) functions matching
  local i=0 a
  for a in $(grep -E "$3" "$SYMS" | awk '{print $1}' | head -3); do
    printf '%s:sb/%s%s %s:0x%x\n' "$1" "$2" "${i/#0/}" "$BIN" $((0x$a - SHIFT)) >> $T/uprobe_events
    i=$((i + 1))
  done
}
probe p cliparse 'role::Client as hyper::proto::h1::Http1Transaction>::parse$'
probe p parseresp 'switchboard::providers::openai::OpenAiAdapter as switchboard::providers::Adapter>::parse_response$'
probe r parsedresp 'switchboard::providers::openai::OpenAiAdapter as switchboard::providers::Adapter>::parse_response$'
probe p aggpush ' switchboard::chat::Aggregator::push$'
probe p settlement ' switchboard::credit::Charge::settlement$'
probe p aggfinish ' switchboard::chat::Aggregator::finish$'
probe p serialize 'impl serde_core::ser::Serialize for switchboard::chat::ChatCompletion>::serialize$'
probe p srvencode 'role::Server as hyper::proto::h1::Http1Transaction>::encode$'
rm "$SYMS"
echo "$(wc -l < $T/uprobe_events) probes on $BIN"
