//! `gemma_fuzz::request_json` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run request_json corpus/request_json ../crates/fuzz/corpus/request_json
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::request_json(data));
