//! `--cache-type` and `--batch-size` on the tiny Gemma 3 fixture (no tokenizer, head_dim 16).

mod common;

use std::path::PathBuf;

use common::{assert_clean_error, gemma, stderr, stdout};
use serde_json::Value;

fn fixture(name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_tiny");
    dir.join(name).to_string_lossy().into_owned()
}

/// The top logit ids after `ids` with the given cache type.
fn top_ids(cache_type: &str, ids: &str) -> Vec<u64> {
    let model = fixture("model.gguf");
    let out = gemma(
        &[
            "logits",
            "-q",
            "--model",
            &model,
            "--cache-type",
            cache_type,
            "--top",
            "3",
            "--ids",
            ids,
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    json["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[0].as_u64().unwrap())
        .collect()
}

#[test]
fn f16_and_f32_caches_rank_the_same_next_tokens() {
    let ids = "2,17,9,40,33,5,81";
    assert_eq!(top_ids("f16", ids), top_ids("f32", ids));
}

#[test]
fn info_reports_the_smaller_cache() {
    let model = fixture("model.gguf");
    let size = |cache_type: &str| {
        let out = gemma(
            &[
                "info",
                "--model",
                &model,
                "--ctx-size",
                "64",
                "--cache-type",
                cache_type,
            ],
            None,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let line = text
            .lines()
            .find(|l| l.contains("KV cache at --ctx-size 64"))
            .unwrap_or_else(|| panic!("no KV cache line: {text}"))
            .to_string();
        assert!(line.ends_with(&format!("({cache_type})")), "{line}");
        line
    };
    // 6 sliding layers × 5 positions + 1 global × 64, keys and values, 2 kv heads × 16 dims.
    assert!(size("f32").contains("23.5 KiB"));
    assert!(size("f16").contains("11.8 KiB"));
}

#[test]
fn q8_0_on_heads_of_16_is_a_clean_error() {
    let model = fixture("model.gguf");
    let out = gemma(
        &[
            "logits",
            "--model",
            &model,
            "--cache-type",
            "q8_0",
            "--ids",
            "2,3",
        ],
        None,
    );
    assert_clean_error(&out, &["q8_0", "multiple of 32"]);
}

#[test]
fn unknown_cache_type_is_refused() {
    let out = gemma(&["info", "--cache-type", "q4_0"], None);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("q4_0") && err.contains("f16") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn zero_batch_size_is_a_clean_error() {
    let model = fixture("model.gguf");
    let out = gemma(&["run", "--model", &model, "-b", "0", "hello"], None);
    assert_clean_error(&out, &["--batch-size"]);
}
