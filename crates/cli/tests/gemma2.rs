//! The CLI on the tiny Gemma 2 fixture (`scripts/make_gemma2_fixtures.py`): `logits --ids`
//! agrees with transformers from the GGUF and the Hugging Face folder, `info` names the
//! architecture and its soft-caps, and with a synthetic vocabulary added to the GGUF, `tokenize`
//! and `run` continue the reference prompt as transformers does.

mod common;

use std::path::PathBuf;

use common::{
    assert_clean_error, assert_tokenize_and_run_continue, assert_top5_logits_match, gemma, stderr,
    stdout,
};
use serde_json::Value;

fn fixture(name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma2_tiny");
    dir.join(name).to_string_lossy().into_owned()
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap()
}

#[test]
fn logits_by_ids_match_transformers_for_gguf_and_hf() {
    let r = reference();
    for model in [fixture("model.gguf"), fixture("")] {
        assert_top5_logits_match(&model, &r);
    }
}

#[test]
fn info_names_the_architecture_and_its_soft_caps() {
    for model in [fixture("model.gguf"), fixture("")] {
        let out = gemma(&["info", "--model", &model], None);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().eq(["architecture", "gemma2"])),
            "{text}"
        );
        let out = gemma(&["info", "--json", "--model", &model], None);
        assert!(out.status.success(), "{}", stderr(&out));
        let info: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(info["architecture"], "gemma2");
        let hp = &info["hyper_parameters"];
        assert_eq!(hp["soft-caps"], "attention 2, final 4", "{info}");
        assert_eq!(
            hp["layer pattern"], "3 sliding (window 5), 2 global",
            "{info}"
        );
    }
    // Without a tokenizer, text commands fail cleanly.
    let run = gemma(
        &["run", "-q", "--model", &fixture("model.gguf"), "hi"],
        None,
    );
    assert_clean_error(&run, &["no tokenizer"]);
}

#[test]
fn tokenize_and_run_continue_like_transformers() {
    assert_tokenize_and_run_continue(&fixture("model.gguf"), &reference());
}

#[test]
fn a_vision_projector_is_refused_for_gemma2() {
    let mmproj = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gemma3_vision_tiny/mmproj.gguf");
    let out = gemma(
        &[
            "logits",
            "-q",
            "--model",
            &fixture("model.gguf"),
            "--mmproj",
            &mmproj.to_string_lossy(),
            "--ids",
            "2,17",
        ],
        None,
    );
    assert_clean_error(&out, &["Gemma 2"]);
}
