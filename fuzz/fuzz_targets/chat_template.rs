//! `gemma_fuzz::chat_template` under libFuzzer (nightly), from `fuzz/`:
//!   cargo +nightly fuzz run chat_template corpus/chat_template ../crates/fuzz/corpus/chat_template
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gemma_fuzz::chat_template(data));
