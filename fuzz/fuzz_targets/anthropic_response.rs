#![no_main]

use switchboard::config::ProviderKind;
use switchboard::fuzzing::response;

libfuzzer_sys::fuzz_target!(|data: &[u8]| response(ProviderKind::Anthropic, data));
