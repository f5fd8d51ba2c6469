//! The CLI on the tiny Gemma 2 fixture (`scripts/make_gemma2_fixtures.py`): `logits --ids`
//! agrees with transformers from the GGUF and the Hugging Face folder, `info` names the
//! architecture and its soft-caps, and with a synthetic vocabulary added to the GGUF, `tokenize`
//! and `run` continue the reference prompt as transformers does.

mod common;

use std::path::PathBuf;

use common::{
    assert_clean_error, assert_top5_logits_match, gemma, gguf_with_synthetic_tokenizer, stderr,
    stdout, synthetic_char, TempDir,
};
use serde_json::Value;

fn fixture(name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma2_tiny");
    dir.join(name).to_string_lossy().into_owned()
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap()
}

fn ids(r: &Value, key: &str) -> Vec<u32> {
    r[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
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
    let dir = TempDir::new("g2-tok");
    let model = gguf_with_synthetic_tokenizer(&fixture("model.gguf"), &dir);
    let r = reference();
    let input = ids(&r, "input_ids");
    assert_eq!(input[0], 2, "the reference prompt starts with BOS");
    let prompt: String = input[1..].iter().map(|&id| synthetic_char(id)).collect();
    let want: String = ids(&r, "greedy_continuation")
        .iter()
        .map(|&id| synthetic_char(id))
        .collect();

    let tokenized = gemma(&["tokenize", "-q", "--model", &model, &prompt], None);
    assert!(tokenized.status.success(), "{}", stderr(&tokenized));
    let got: Vec<u32> = serde_json::from_str(stdout(&tokenized).trim()).unwrap();
    assert_eq!(got, input);

    let n = want.chars().count().to_string();
    let run = gemma(
        &[
            "run", "-q", "--model", &model, "--raw", "--temp", "0", "-n", &n, &prompt,
        ],
        None,
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(stdout(&run).trim_end(), want);
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
