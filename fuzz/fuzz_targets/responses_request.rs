//! `gemma_fuzz::responses_request` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run responses_request corpus/responses_request ../crates/fuzz/corpus/responses_request
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::responses_request(data));
