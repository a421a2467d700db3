//! Every input the fuzz targets found a bug with (`fuzz/regressions/<target>/`),
//! replayed through the same harness (`switchboard::fuzzing`, docs/fuzzing.md) in a
//! plain `cargo test`: no panic, and a result bounded by the input.
//!
//! Each case runs in a child process (this test binary again) whose address space
//! is limited to [`MEMORY_LIMIT_KIB`], so that an allocation bomb (an upstream
//! `index` of 4294967295 once asked for 412 GB) fails its test instead of the
//! machine.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The address space of the child that replays one input: 2 GiB, as the fuzzers'
/// `-malloc_limit_mb` (fuzz/run.sh).
const MEMORY_LIMIT_KIB: u64 = 2 << 20;
const CHILD_TARGET: &str = "SWITCHBOARD_FUZZ_TARGET";
const CHILD_INPUT: &str = "SWITCHBOARD_FUZZ_INPUT";

fn regressions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions")
}

/// Runs `target` on the saved input `file` in a memory-limited child; fails with
/// the child's panic message (or signal) when the input still finds the bug.
fn replay(target: &str, file: &str) {
    let input = regressions().join(target).join(file);
    assert!(input.is_file(), "no saved input {}", input.display());
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {MEMORY_LIMIT_KIB} && exec \"$0\" \"$@\""
        ))
        .arg(exe)
        .args([
            "child_replays_one_input",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_TARGET, target)
        .env(CHILD_INPUT, &input)
        .output()
        .expect("the child runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{target}/{file} still finds a bug ({}):\n{stderr}",
        out.status
    );
}

/// The child's half of [`replay`]; passes at once when not run as a child.
#[test]
fn child_replays_one_input() {
    let (Ok(target), Ok(input)) = (std::env::var(CHILD_TARGET), std::env::var(CHILD_INPUT)) else {
        return;
    };
    let data = std::fs::read(&input).expect("the saved input reads");
    switchboard::fuzzing::run(&target, &data);
}

/// One test per saved input, and the list [`every_saved_input_has_a_case`] checks.
macro_rules! cases {
    ($( $(#[$attr:meta])* $name:ident: $target:literal / $file:literal; )*) => {
        const CASES: &[(&str, &str)] = &[$(($target, $file)),*];
        $(
            $(#[$attr])*
            #[test]
            fn $name() {
                replay($target, $file);
            }
        )*
    };
}

cases! {
    // An upstream chunk's `choices[].index` is the size the Aggregator grows to: a
    // 34-byte answer asked for 42 GB (fuzz/run.sh, aggregator, 57 s).
    aggregator_choice_index_444444444: "aggregator" / "choice-index-444444444.jsonl";
    // The same, minimised by `cargo fuzz tmin`: 4,445 choices (363 KB of JSON) out
    // of a 28-byte chunk.
    aggregator_choice_index_4444: "aggregator" / "choice-index-4444.jsonl";

    // Issue 20's reports, written by hand and confirmed by the harness (the 90-150 s
    // runs had not found them yet): the index as an allocation size through each
    // adapter (412 GB), the mock writing `max_tokens` words (68 GB), and two
    // settlements whose sum wraps an i64 in one journal replay.
    openai_choice_index_u32_max: "openai_response" / "choice-index-u32-max.json";
    gemini_candidate_index_u32_max: "gemini_response" / "candidate-index-u32-max.json";
    openai_stream_tool_call_index_u32_max: "openai_stream" / "tool-call-index-u32-max.sse";
    request_lorem_max_tokens_u32_max: "request" / "lorem-max-tokens-u32-max.json";
    journal_pico_sum_overflow_in_one_batch: "journal_replay" / "pico-sum-overflow-in-one-batch.ledger";
}

#[test]
fn every_saved_input_has_a_case() {
    let mut missing = Vec::new();
    for target in std::fs::read_dir(regressions()).expect("fuzz/regressions") {
        let target = target.unwrap();
        let name = target.file_name().into_string().unwrap();
        assert!(
            switchboard::fuzzing::TARGETS.contains(&name.as_str()),
            "fuzz/regressions/{name} is not a fuzz target"
        );
        for file in std::fs::read_dir(target.path()).unwrap() {
            let file = file.unwrap().file_name().into_string().unwrap();
            if !CASES.contains(&(name.as_str(), file.as_str())) {
                missing.push(format!("{name}/{file}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "saved inputs without a case in tests/fuzz_regressions.rs: {missing:?}"
    );
}

/// The committed seeds (real answers of each wire format) pass the harness: the
/// fuzzers start from inputs the code gets right.
#[test]
fn every_seed_passes() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut seen = 0;
    for target in switchboard::fuzzing::TARGETS {
        let dir = corpus.join(target);
        let files = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("no seeds for {target} in {}: {e}", dir.display()));
        for file in files {
            let path = file.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let run = std::panic::catch_unwind(|| switchboard::fuzzing::run(target, &data));
            assert!(run.is_ok(), "the seed {} fails", path.display());
            seen += 1;
        }
    }
    assert!(seen >= switchboard::fuzzing::TARGETS.len());
}
