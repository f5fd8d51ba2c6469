//! `gemma_fuzz::animation` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run animation corpus/animation ../crates/fuzz/corpus/animation
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::animation(data));
