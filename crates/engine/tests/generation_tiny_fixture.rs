//! The generation loop on the tiny Gemma 3 fixture (no tokenizer), against the greedy
//! continuation transformers produced (`scripts/make_gemma3_fixtures.py`), from both the GGUF
//! file and the Hugging Face folder.

use std::path::PathBuf;

use gemma_engine::{load, LoadOptions, SamplingParams, Session, StopReason};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_tiny")
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn greedy_continuation(model_path: PathBuf) {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap(),
    )
    .unwrap();
    let prompt = ids(&reference["input_ids"]);
    let want = ids(&reference["greedy_continuation"]);

    let loaded = load(Some(&model_path), &LoadOptions::default()).unwrap();
    assert!(
        loaded.tokenizer.is_none(),
        "the fixture ships without a tokenizer"
    );
    let mut session = Session::new(&loaded, 64).unwrap();
    let params = SamplingParams {
        max_tokens: want.len(),
        ..SamplingParams::greedy()
    };
    let mut texts = 0;
    let stats = session
        .generate(&prompt, &params, &mut |_| {
            texts += 1;
            true
        })
        .unwrap();
    assert_eq!(stats.tokens, want);
    assert_eq!(stats.stop_reason, StopReason::MaxTokens);
    assert_eq!(texts, 0, "no tokenizer, so no text");
    assert_eq!(session.history().len(), prompt.len() + want.len());
}

#[test]
fn gguf_greedy_continuation_matches_transformers() {
    greedy_continuation(fixture_dir().join("model.gguf"));
}

#[test]
fn hf_folder_greedy_continuation_matches_transformers() {
    greedy_continuation(fixture_dir());
}

#[test]
fn out_of_vocabulary_ids_are_an_error() {
    let loaded = load(
        Some(&fixture_dir().join("model.gguf")),
        &LoadOptions::default(),
    )
    .unwrap();
    let mut session = Session::new(&loaded, 64).unwrap();
    let err = session
        .generate(&[2, 100_000], &SamplingParams::greedy(), &mut |_| true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("100000") && err.contains("vocabulary"),
        "{err}"
    );
}
