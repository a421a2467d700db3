#![no_main]

use switchboard::config::ProviderKind;
use switchboard::fuzzing::stream;

libfuzzer_sys::fuzz_target!(|data: &[u8]| stream(ProviderKind::Anthropic, data));
