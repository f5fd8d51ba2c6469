//! `gemma_fuzz::gguf` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run gguf corpus/gguf ../crates/fuzz/corpus/gguf
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::gguf(data));
