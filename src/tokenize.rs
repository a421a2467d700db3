//! Token counting for providers that report no usage (SPEC §4), loaded lazily.
//!
//! `o200k_base` and `cl100k_base` count with `bpe-openai`, `p50k_base` and
//! `r50k_base` (which it lacks) with `tiktoken-rs`; both give the same counts.
//! Measured with `cargo bench --bench tokenize -- --quick` on ~1 MB of mixed English
//! and Rust (o200k_base, release, 2-core VM): bpe-openai ≈ 7.0 M tokens/s,
//! tiktoken-rs ≈ 1.6 M tokens/s (on 2 KB texts: 9.7 M vs 2.0 M).
//!
//! Each table is built on first use and kept for the process, so a gateway whose
//! providers always report usage never pays the memory of a tokenizer.
//!
//! # Example
//! ```
//! use switchboard::tokenize;
//!
//! assert!(tokenize::is_known("o200k_base"));
//! assert_eq!(tokenize::count("o200k_base", "hello world"), 2);
//! assert_eq!(tokenize::count("p50k_base", "hello world"), 2);
//! ```

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

/// Tokenizer names accepted in `[[models]].tokenizer`.
pub const KNOWN: &[&str] = &["o200k_base", "cl100k_base", "p50k_base", "r50k_base"];

/// Whether `name` is a tokenizer this build can count with.
pub fn is_known(name: &str) -> bool {
    KNOWN.contains(&name)
}

fn tiktoken(name: &str) -> &'static CoreBPE {
    static P50K: OnceLock<CoreBPE> = OnceLock::new();
    static R50K: OnceLock<CoreBPE> = OnceLock::new();
    match name {
        "r50k_base" => R50K.get_or_init(|| tiktoken_rs::r50k_base().expect("bundled table")),
        _ => P50K.get_or_init(|| tiktoken_rs::p50k_base().expect("bundled table")),
    }
}

/// Counts the tokens of `text` with the named tokenizer (unknown names use `o200k_base`).
pub fn count(tokenizer: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    match tokenizer {
        // `bpe-openai`'s tables are lazily initialised statics.
        "cl100k_base" => bpe_openai::cl100k_base().count(text) as u64,
        "p50k_base" | "r50k_base" => tiktoken(tokenizer).encode_ordinary(text).len() as u64,
        _ => bpe_openai::o200k_base().count(text) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_libraries_agree() {
        let text =
            "fn main() { println!(\"Hello, wörld! 12345\"); }\n\n  The quick brown fox's tail.";
        let tik = tiktoken_rs::o200k_base().unwrap();
        assert_eq!(
            count("o200k_base", text),
            tik.encode_ordinary(text).len() as u64
        );
        let tik = tiktoken_rs::cl100k_base().unwrap();
        assert_eq!(
            count("cl100k_base", text),
            tik.encode_ordinary(text).len() as u64
        );
        assert_eq!(count("o200k_base", ""), 0);
    }
}
