//! `gemma_fuzz::ollama_request` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run ollama_request corpus/ollama_request ../crates/fuzz/corpus/ollama_request
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::ollama_request(data));
