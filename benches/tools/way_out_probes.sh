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
source "$(dirname "$0")/uprobes_common.sh"
probe p cliparse 'role::Client as hyper::proto::h1::Http1Transaction>::parse$'
probe p parseresp 'switchboard::providers::openai::OpenAiAdapter as switchboard::providers::Adapter>::parse_response$'
probe r parsedresp 'switchboard::providers::openai::OpenAiAdapter as switchboard::providers::Adapter>::parse_response$'
probe p aggpush ' switchboard::chat::Aggregator::push$'
probe p settlement ' switchboard::credit::Charge::settlement$'
probe p aggfinish ' switchboard::chat::Aggregator::finish$'
probe p serialize 'switchboard::chat::ChatCompletion>::write_json$'
probe p srvencode 'role::Server as hyper::proto::h1::Http1Transaction>::encode$'
probes_done
