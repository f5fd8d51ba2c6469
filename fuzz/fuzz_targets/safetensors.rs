//! `gemma_fuzz::safetensors` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run safetensors corpus/safetensors ../crates/fuzz/corpus/safetensors
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::safetensors(data));
