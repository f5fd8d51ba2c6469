//! `gemma_fuzz::safetensors_index` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run safetensors_index corpus/safetensors_index ../crates/fuzz/corpus/safetensors_index
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::safetensors_index(data));
