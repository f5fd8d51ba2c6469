//! Commands on the tiny Gemma 3 fixture, which has no tokenizer: `logits --ids` must work
//! (and agree with transformers), text commands must fail cleanly.

mod common;

use std::path::PathBuf;

use common::{assert_clean_error, assert_top5_logits_match, gemma};
use serde_json::Value;

fn fixture(name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_tiny");
    dir.join(name).to_string_lossy().into_owned()
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap()
}

#[test]
fn logits_by_ids_match_transformers_for_gguf_and_hf() {
    let reference = reference();
    for model in [fixture("model.gguf"), fixture("")] {
        assert_top5_logits_match(&model, &reference);
    }
}

#[test]
fn text_commands_need_a_tokenizer() {
    let model = fixture("model.gguf");
    let run = gemma(&["run", "-q", "--model", &model, "hello"], None);
    assert_clean_error(&run, &["no tokenizer"]);
    let tokenize = gemma(&["tokenize", "-q", "--model", &model, "hello"], None);
    assert_clean_error(&tokenize, &["no tokenizer"]);
}

#[test]
fn ids_outside_the_vocabulary_are_rejected() {
    let out = gemma(
        &[
            "logits",
            "-q",
            "--model",
            &fixture("model.gguf"),
            "--ids",
            "2,999999",
        ],
        None,
    );
    assert_clean_error(&out, &["999999"]);
}
