//! Token counting for providers that report no usage (SPEC §4), loaded lazily.
//!
//! Each BPE table is built on first use and kept for the process, so a gateway whose
//! providers always report usage never pays the memory of a tokenizer.
//!
//! # Example
//! ```
//! use switchboard::tokenize;
//!
//! assert!(tokenize::is_known("o200k_base"));
//! assert_eq!(tokenize::count("o200k_base", "hello world"), 2);
//! ```

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

/// Tokenizer names accepted in `[[models]].tokenizer`.
pub const KNOWN: &[&str] = &["o200k_base", "cl100k_base", "p50k_base", "r50k_base"];

/// Whether `name` is a tokenizer this build can count with.
pub fn is_known(name: &str) -> bool {
    KNOWN.contains(&name)
}

fn bpe(name: &str) -> &'static CoreBPE {
    static O200K: OnceLock<CoreBPE> = OnceLock::new();
    static CL100K: OnceLock<CoreBPE> = OnceLock::new();
    static P50K: OnceLock<CoreBPE> = OnceLock::new();
    static R50K: OnceLock<CoreBPE> = OnceLock::new();
    match name {
        "cl100k_base" => CL100K.get_or_init(|| tiktoken_rs::cl100k_base().expect("bundled table")),
        "p50k_base" => P50K.get_or_init(|| tiktoken_rs::p50k_base().expect("bundled table")),
        "r50k_base" => R50K.get_or_init(|| tiktoken_rs::r50k_base().expect("bundled table")),
        _ => O200K.get_or_init(|| tiktoken_rs::o200k_base().expect("bundled table")),
    }
}

/// Counts the tokens of `text` with the named tokenizer (unknown names use `o200k_base`).
pub fn count(tokenizer: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    bpe(tokenizer).encode_ordinary(text).len() as u64
}
