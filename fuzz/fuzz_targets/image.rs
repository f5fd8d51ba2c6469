//! `gemma_fuzz::image` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run image corpus/image ../crates/fuzz/corpus/image
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::image(data));
