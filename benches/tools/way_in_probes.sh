#!/bin/bash
# Registers uprobes (tracefs) on the functions a chat request passes on its way in,
# in the binary BIN (default: the loadbench example), as events sb:NAME.
# Then, with the server running under load:
#   perf record -e 'syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,sb:*' -p PID
#   perf script -F tid,time,event,trace | benches/tools/way_in_stages.py /dev/stdin
# Each probe costs a few µs (a trap), so read the stages against each other, and
# the total against a run without probes. Needs root. Remove with:
#   echo > /sys/kernel/tracing/uprobe_events
source "$(dirname "$0")/uprobes_common.sh"
probe p srvparse 'role::Server as hyper::proto::h1::Http1Transaction>::parse$'
probe p router 'axum::routing::Router<S>::call_with_state$'
probe p logging 'switchboard::logging::Logging<S> as tower_service::Service<http::request::Request<B>>>::call$'
probe p auth 'switchboard::auth::Auth<S> as tower_service::Service<http::request::Request<B>>>::call$'
probe p ratelimit 'switchboard::rate_limit::RateLimit<S> as tower_service::Service<http::request::Request<B>>>::call$'
probe p normalize 'switchboard::normalize::Normalize<S> as tower_service::Service<http::request::Request<B>>>::call$'
probe p parse ' switchboard::normalize::parse_request$'
probe p route 'switchboard::route::Route<S> as tower_service::Service<switchboard::context::ChatCall>>::call$'
probe p health 'switchboard::health::HealthFilter<S> as tower_service::Service<switchboard::context::ChatCall>>::call$'
probe p credit 'switchboard::credit::Credit<S> as tower_service::Service<switchboard::context::ChatCall>>::call$'
probe p fallback 'switchboard::fallback::run::\{\{closure\}\}$'
probe p provider 'switchboard::providers::ProviderClient as tower_service::Service<switchboard::context::ProviderCall>>::call$'
probe p build 'switchboard::providers::openai::OpenAiAdapter as switchboard::providers::Adapter>::build_request$'
probe r built 'switchboard::providers::openai::OpenAiAdapter as switchboard::providers::Adapter>::build_request$'
probe p send 'hyper_util::client::legacy::client::Client<C,B>::send_request::\{\{closure\}\}$'
probe p encode 'role::Client as hyper::proto::h1::Http1Transaction>::encode$'
probes_done
