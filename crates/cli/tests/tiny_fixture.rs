//! Commands on the tiny Gemma 3 fixture, which has no tokenizer: `logits --ids` must work
//! (and agree with transformers), text commands must fail cleanly.

mod common;

use std::path::PathBuf;

use common::{assert_clean_error, gemma, stderr, stdout};
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
    let ids: Vec<String> = reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let last_row: Vec<f64> = reference["logits"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut want: Vec<usize> = (0..last_row.len()).collect();
    want.sort_by(|&a, &b| last_row[b].total_cmp(&last_row[a]));
    want.truncate(5);

    for model in [fixture("model.gguf"), fixture("")] {
        let out = gemma(
            &[
                "logits",
                "-q",
                "--model",
                &model,
                "--top",
                "5",
                "--ids",
                &ids.join(","),
            ],
            None,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
        let top = json["top"].as_array().unwrap();
        let got: Vec<usize> = top
            .iter()
            .map(|p| p[0].as_u64().unwrap() as usize)
            .collect();
        assert_eq!(got, want, "model {model}");
        for pair in top {
            let id = pair[0].as_u64().unwrap() as usize;
            let logit = pair[1].as_f64().unwrap();
            assert!(
                (logit - last_row[id]).abs() < 1e-3,
                "{model}: {logit} vs {}",
                last_row[id]
            );
        }
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
