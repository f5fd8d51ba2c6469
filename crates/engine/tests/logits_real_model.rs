//! The real default model (Gemma 3 270M Q4_K_M) against transformers' float32 run on the same
//! GGUF file (`scripts/make_real_model_reference.py`): for every prompt, one of them longer than
//! the 512-token sliding window, our tokenizer gives llama.cpp's ids, our greedy next token is
//! the reference's, and the reference's top-10 logits are matched within 0.75.

use std::path::PathBuf;

use gemma_engine::default_model::ensure_default_model;
use gemma_formats::{open_model_source, ModelFile};
use gemma_models::{load_model, Logits};
use gemma_tokenizer::Tokenizer;
use serde_json::Value;

const LOGIT_TOLERANCE: f32 = 0.75;

#[test]
fn real_model_matches_transformers_reference() {
    let path = ensure_default_model().expect("default model");
    let file = open_model_source(&path).unwrap();
    let ModelFile::Gguf(gguf) = &file else {
        panic!("default model is GGUF")
    };
    let tokenizer = Tokenizer::from_gguf(gguf).unwrap();
    let model = load_model(&file).unwrap();

    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_270m/reference.json");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    let mut longest = 0;
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        longest = longest.max(ids.len());
        assert_eq!(
            tokenizer.encode(text, true, true).unwrap(),
            ids,
            "tokenization of {text:?}"
        );

        let mut cache = model.new_cache(2048).unwrap();
        let logits = model.forward(&ids, &mut cache, Logits::Last).unwrap();
        let ours = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        let mut worst = 0.0f32;
        for pair in case["top"].as_array().unwrap() {
            let id = pair[0].as_u64().unwrap() as usize;
            let want = pair[1].as_f64().unwrap() as f32;
            let got = logits[id];
            worst = worst.max((got - want).abs());
            assert!(
                (got - want).abs() <= LOGIT_TOLERANCE,
                "{text:?}: logit of token {id} is {got}, reference {want}"
            );
        }
        eprintln!(
            "{} tokens: greedy {ours}, worst top-10 logit difference {worst:.3}",
            ids.len()
        );
        assert_eq!(
            ours as u64,
            case["greedy"].as_u64().unwrap(),
            "greedy next token after {text:?}"
        );
    }
    assert!(
        longest > 512,
        "one prompt must be longer than the sliding window"
    );
}
