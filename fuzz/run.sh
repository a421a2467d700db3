#!/usr/bin/env bash
# Runs every fuzz target for a bounded time, one after the other (docs/fuzzing.md).
#
#   fuzz/run.sh [SECONDS] [TARGET...]     SECONDS per target, default 120
#
# Meant for a scheduled job (nightly), not for .ci/run: it needs the nightly
# toolchain and cargo-fuzz (installed here if missing) and takes SECONDS x 11.
# An allocation over 2 GiB, an RSS over 2 GiB, a panic, an overflow (the targets
# are built with overflow checks) or a run over 10 s is a finding. It carries on
# through findings, so that one bug does not hide the next, and at the end exits
# 1 and lists every crash file (fuzz/artifacts/<target>/), or exits 0.
#
# A finding: minimise it (`cargo +nightly fuzz tmin TARGET FILE`), keep it under
# fuzz/regressions/<target>/ and add its case to tests/fuzz_regressions.rs.
#
# New inputs that reach new code go to fuzz/work/corpus/<target>/ (not committed);
# the committed seeds in fuzz/corpus/<target>/ are read, never written.
set -euo pipefail

seconds=${1:-120}
shift || true
cd "$(dirname "$0")"

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(request sse openai_response openai_stream anthropic_response anthropic_stream
             gemini_response gemini_stream aggregator journal_replay canonical)
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# Release build with debug assertions and overflow checks (-a), AddressSanitizer
# (cargo-fuzz's default: malloc_limit_mb is enforced through its allocator).
build=(-O -a)
mkdir -p work
if ! nice -n 10 cargo +nightly fuzz build "${build[@]}" >work/build.log 2>&1; then
    tail -30 work/build.log >&2
    echo "fuzz/run.sh: the fuzz targets do not build" >&2
    exit 2
fi

found=()
for t in "${targets[@]}"; do
    mkdir -p "work/corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | sort)
    echo "== $t: ${seconds}s"
    # -fork=1 with -ignore_*: a crash is saved and the run goes on in a new child.
    nice -n 10 cargo +nightly fuzz run "${build[@]}" "$t" "work/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
        -max_len=16384 -dict=dict/json.dict \
        -fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 \
        -print_final_stats=1 \
        >"work/$t.log" 2>&1 || true
    grep -E '^#[0-9]+.*DONE|stat::number_of_executed_units|INFO: fuzzed for' "work/$t.log" | tail -2 || true
    after=$(find "artifacts/$t" -type f | sort)
    new=$(comm -13 <(echo "$before") <(echo "$after") | sed '/^$/d')
    if [ -n "$new" ]; then
        while IFS= read -r f; do found+=("fuzz/$f"); done <<<"$new"
        echo "   findings (log: fuzz/work/$t.log):"
        echo "$new" | sed 's|^|     fuzz/|'
    fi
done

# What journal_replay runs that crashed left behind (a store each, in memory).
rm -rf /dev/shm/switchboard-fuzz-* "${TMPDIR:-/tmp}"/switchboard-fuzz-* 2>/dev/null || true

if [ ${#found[@]} -gt 0 ]; then
    echo
    echo "fuzz/run.sh: ${#found[@]} finding(s):"
    printf '  %s\n' "${found[@]}"
    exit 1
fi
echo "fuzz/run.sh: no findings"
