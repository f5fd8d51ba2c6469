//! `gemma_fuzz::config_json` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run config_json corpus/config_json ../crates/fuzz/corpus/config_json
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::config_json(data));
