//! `gemma_fuzz::data_url` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run data_url corpus/data_url ../crates/fuzz/corpus/data_url
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::data_url(data));
