//! `gemma_fuzz::json_schema` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run json_schema corpus/json_schema ../crates/fuzz/corpus/json_schema
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::json_schema(data));
