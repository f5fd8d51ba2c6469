//! `gemma_fuzz::tokenizer_json` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run tokenizer_json corpus/tokenizer_json ../crates/fuzz/corpus/tokenizer_json
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::tokenizer_json(data));
