//! `gemma_fuzz::audio` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run audio corpus/audio ../crates/fuzz/corpus/audio
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::audio(data));
