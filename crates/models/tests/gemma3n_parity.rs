//! Parity with transformers on a tiny random-weight Gemma 3n text decoder (fixtures from
//! `scripts/make_gemma3n_fixtures.py`): logits at every position in f32, whether the prompt is
//! fed at once, token by token, or in uneven chunks that straddle the sliding window; the greedy
//! continuation; and clear errors for broken checkpoints.

mod common;

use common::{argmax, max_diff, Reference};

use std::path::{Path, PathBuf};

use gemma_formats::open_model_source;
use gemma_models::{load_model, Logits, Model, ModelError};
use serde_json::Value;

/// The issue asks for 1e-2; the f32 forward lands within about 1e-4, so hold it to 1e-3.
const TOLERANCE: f32 = 1e-3;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3n_tiny")
}

fn reference() -> Reference {
    Reference::read(&fixture_dir())
}

fn try_load(path: &Path) -> Result<Model, ModelError> {
    let file = open_model_source(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    load_model(&file)
}

fn load(path: &Path) -> Model {
    try_load(path).unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

/// Feeds the prompt in chunks of the given sizes; returns the worst difference over all positions.
fn chunked_max_diff(model: &Model, r: &Reference, chunks: &[usize]) -> f32 {
    let mut cache = model.new_cache(64).unwrap();
    let mut pos = 0;
    let mut worst = 0.0f32;
    for &n in chunks {
        let logits = model
            .forward(&r.ids[pos..pos + n], &mut cache, Logits::All)
            .unwrap();
        for t in 0..n {
            let d = max_diff(&logits[t * r.vocab..(t + 1) * r.vocab], &r.logits[pos + t]);
            assert!(
                d <= TOLERANCE,
                "chunks {chunks:?}: position {}: max |diff| {d} > {TOLERANCE}",
                pos + t
            );
            worst = worst.max(d);
        }
        pos += n;
    }
    assert_eq!(pos, r.ids.len(), "chunks must cover the prompt");
    assert_eq!(cache.len(), r.ids.len());
    worst
}

fn check_logits(what: &str, model: &Model) {
    let r = reference();
    assert_eq!(model.architecture(), "gemma3n");
    assert_eq!(model.vocab_size(), r.vocab);
    let whole = chunked_max_diff(model, &r, &[r.ids.len()]);
    let single = chunked_max_diff(model, &r, &vec![1; r.ids.len()]);
    // Chunks straddle the window (6) and the producers' cache writes.
    let uneven = chunked_max_diff(model, &r, &[3, 7, 1, 5]);
    let long_first = chunked_max_diff(model, &r, &[9, 2, 5]);
    eprintln!(
        "{what}: max |diff|: whole {whole:e}, token by token {single:e}, \
         chunks {uneven:e} / {long_first:e}"
    );
}

#[test]
fn safetensors_logits_match_transformers_whole_token_by_token_and_chunked() {
    check_logits("safetensors", &load(&fixture_dir()));
}

#[test]
fn gguf_logits_match_transformers_whole_token_by_token_and_chunked() {
    check_logits("gguf", &load(&fixture_dir().join("model.gguf")));
}

#[test]
fn greedy_continuation_matches_transformers() {
    check_greedy(&load(&fixture_dir()));
    check_greedy(&load(&fixture_dir().join("model.gguf")));
}

fn check_greedy(model: &Model) {
    let r = reference();
    let mut cache = model.new_cache(64).unwrap();
    let mut next = argmax(model.forward(&r.ids, &mut cache, Logits::Last).unwrap());
    let mut generated = vec![next];
    while generated.len() < r.greedy.len() {
        next = argmax(model.forward(&[next], &mut cache, Logits::Last).unwrap());
        generated.push(next);
    }
    assert_eq!(generated, r.greedy, "greedy continuation");
}

#[test]
fn kv_consumers_hold_no_cache() {
    let model = load(&fixture_dir());
    // Layers 0-4 produce keys and values (sliding 0, 1, 3, 4 hold the window of 6; full layer 2
    // holds the context); consumers 5-7 hold nothing. 2 kv heads x 8 dims, keys and values, f32.
    let expected = (4 * 6 + 64) * 2 * 2 * 8 * 4;
    assert_eq!(model.kv_cache_bytes(64), expected);
    assert_eq!(model.new_cache(64).unwrap().bytes(), expected);
}

#[test]
fn context_overflow_and_bad_ids_are_errors() {
    let model = load(&fixture_dir());
    let r = reference();
    let mut cache = model.new_cache(8).unwrap();
    let err = model.forward(&r.ids, &mut cache, Logits::Last).unwrap_err();
    assert!(matches!(err, ModelError::ContextOverflow { .. }), "{err}");
    assert_eq!(
        cache.len(),
        0,
        "a rejected chunk must not advance the cache"
    );
    let err = model.forward(&[256], &mut cache, Logits::Last).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let err = model.forward(&[], &mut cache, Logits::Last).unwrap_err();
    assert!(matches!(err, ModelError::Config(_)), "{err}");
}

/// A copy of the fixture folder in a temp dir with the config and tensors edited.
struct BrokenFixture {
    dir: PathBuf,
}

impl BrokenFixture {
    fn new(name: &str, edit_config: impl FnOnce(&mut Value), drop_tensor: Option<&str>) -> Self {
        Self::with_names(name, edit_config, drop_tensor, None)
    }

    fn with_names(
        name: &str,
        edit_config: impl FnOnce(&mut Value),
        drop_tensor: Option<&str>,
        rename_all: Option<fn(&str) -> String>,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("gemma3n-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = fixture_dir();
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                .unwrap();
        edit_config(&mut config);
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
        let bytes = match drop_tensor {
            Some(name) => rename_tensor(&bytes, name),
            None => bytes,
        };
        let bytes = match rename_all {
            Some(f) => rewrite_names(&bytes, f),
            None => bytes,
        };
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        BrokenFixture { dir }
    }
}

impl Drop for BrokenFixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Hides tensor `name` by renaming it in the safetensors header.
fn rename_tensor(bytes: &[u8], name: &str) -> Vec<u8> {
    rewrite_names(bytes, |n| {
        if n == name {
            format!("hidden.{n}")
        } else {
            n.to_string()
        }
    })
}

/// Renames every tensor in a safetensors file; data offsets are relative to the end of the
/// header, so only the header changes.
fn rewrite_names(bytes: &[u8], rename: impl Fn(&str) -> String) -> Vec<u8> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let renamed: serde_json::Map<String, Value> = header
        .into_iter()
        .map(|(k, v)| {
            if k == "__metadata__" {
                (k, v)
            } else {
                (rename(&k), v)
            }
        })
        .collect();
    let mut text = Value::Object(renamed).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + header_len..]);
    out
}

#[test]
fn missing_per_layer_embedding_table_is_a_clear_error() {
    let f = BrokenFixture::new(
        "no-ple",
        |_| {},
        Some("model.embed_tokens_per_layer.weight"),
    );
    match try_load(&f.dir) {
        Err(ModelError::MissingTensor(name)) => {
            assert_eq!(name, "model.embed_tokens_per_layer.weight")
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("loaded a checkpoint without its PLE table"),
    }
}

#[test]
fn consumer_kv_weights_are_optional() {
    // transformers does not even create them; the published checkpoints still carry them.
    let f = BrokenFixture::new(
        "no-consumer-k",
        |_| {},
        Some("model.layers.6.self_attn.k_proj.weight"),
    );
    let model = load(&f.dir);
    let r = reference();
    chunked_max_diff(&model, &r, &[r.ids.len()]);
}

type ConfigEdit = fn(&mut Value);

#[test]
fn inconsistent_per_layer_lists_are_clear_errors() {
    let cases: [(&str, ConfigEdit, &str); 5] = [
        (
            "widths",
            |c| c["intermediate_size"] = serde_json::json!([32, 48, 32]),
            "intermediate_size has 3 entries for 8 layers",
        ),
        (
            "sparsity",
            |c| c["activation_sparsity_pattern"] = serde_json::json!([0.95, 0.0]),
            "activation_sparsity_pattern has 2 entries for 8 layers",
        ),
        (
            "types",
            |c| {
                c["layer_types"].as_array_mut().unwrap().pop();
            },
            "layer_types has 7 entries for 8 layers",
        ),
        (
            "sharing",
            // Only sliding layers before the shared ones: the full consumers have no producer.
            |c| {
                c["layer_types"] = serde_json::json!([
                    "sliding_attention",
                    "sliding_attention",
                    "sliding_attention",
                    "sliding_attention",
                    "sliding_attention",
                    "full_attention",
                    "sliding_attention",
                    "full_attention"
                ])
            },
            "no earlier layer of its type",
        ),
        (
            "streams",
            |c| c["altup_num_inputs"] = serde_json::json!(64),
            "64 AltUp streams (at most 16 supported)",
        ),
    ];
    for (name, edit, expected) in cases {
        let f = BrokenFixture::new(name, edit, None);
        match try_load(&f.dir) {
            Err(e @ ModelError::Config(_)) => {
                assert!(e.to_string().contains(expected), "{name}: {e}")
            }
            Err(other) => panic!("{name}: unexpected error: {other}"),
            Ok(_) => panic!("{name}: loaded an inconsistent config"),
        }
    }
}

#[test]
fn mlp_width_must_match_the_checkpoint() {
    let f = BrokenFixture::new(
        "width-mismatch",
        |c| c["intermediate_size"][3] = serde_json::json!(48),
        None,
    );
    match try_load(&f.dir) {
        Err(ModelError::TensorShape { name, .. }) => {
            assert!(name.contains("layers.3.mlp"), "{name}")
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("loaded MLP weights of the wrong width"),
    }
}

#[test]
fn normal_quantile_matches_torch() {
    let text =
        std::fs::read_to_string(fixture_dir().join("reference.json")).expect("reference.json");
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["normal_icdf"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let (p, want) = (case[0].as_f64().unwrap(), case[1].as_f64().unwrap());
        let got = gemma_models::gemma3n::normal_quantile(p);
        assert!(
            (got - want).abs() <= 1e-8 * want.abs().max(1.0),
            "Φ⁻¹({p}) = {got}, torch {want}"
        );
    }
    assert!(gemma_models::gemma3n::normal_quantile(0.0).is_nan());
    assert!(gemma_models::gemma3n::normal_quantile(1.0).is_nan());
}

#[test]
fn multimodal_checkpoint_layout_loads_its_text_decoder() {
    // A `Gemma3nForConditionalGeneration` folder: the text config nested under `text_config`,
    // tensors under `model.language_model.`, multimodal ids from `vision_config.vocab_offset`.
    let f = BrokenFixture::with_names(
        "conditional",
        |c| {
            let text = c.clone();
            *c = serde_json::json!({
                "architectures": ["Gemma3nForConditionalGeneration"],
                "model_type": "gemma3n",
                "text_config": text,
                "vision_config": {"vocab_offset": 240, "vocab_size": 8},
                "audio_config": {"vocab_offset": 248, "vocab_size": 8},
            });
        },
        None,
        Some(|n| match n.strip_prefix("model.") {
            Some(rest) => format!("model.language_model.{rest}"),
            None => n.to_string(),
        }),
    );
    let model = load(&f.dir);
    let r = reference();
    let worst = chunked_max_diff(&model, &r, &[r.ids.len()]);
    assert!(worst <= TOLERANCE);
    // Image/audio "hard" tokens need the multimodal embedders: a clear error, not text.
    let mut cache = model.new_cache(64).unwrap();
    let err = model
        .forward(&[2, 245], &mut cache, Logits::All)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::TokenOutOfRange {
                id: 245,
                vocab: 240
            }
        ),
        "{err}"
    );
}

/// The fixture GGUF with one byte string of its header replaced by another of the same length
/// (a tensor name or metadata key hidden), written to a temp file.
fn gguf_with_renamed(tag: &str, from: &str, to: &str) -> PathBuf {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(fixture_dir().join("model.gguf")).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("fixture GGUF lacks {from}"));
    bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
    let path = std::env::temp_dir().join(format!("gemma3n-{tag}-{}.gguf", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn gguf_without_per_layer_table_or_altup_metadata_is_a_clear_error() {
    let path = gguf_with_renamed(
        "no-ple",
        "per_layer_token_embd.weight",
        "xer_layer_token_embd.weight",
    );
    let result = try_load(&path);
    let _ = std::fs::remove_file(&path);
    match result {
        Err(ModelError::MissingTensor(name)) => assert_eq!(name, "per_layer_token_embd.weight"),
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("loaded a GGUF without its PLE table"),
    }

    let path = gguf_with_renamed(
        "no-altup",
        "gemma3n.altup.num_inputs",
        "gemma3n.altup.xum_inputs",
    );
    let result = try_load(&path);
    let _ = std::fs::remove_file(&path);
    match result {
        Err(e @ ModelError::Config(_)) => {
            assert!(e.to_string().contains("gemma3n.altup.num_inputs"), "{e}")
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("loaded a GGUF without its AltUp stream count"),
    }
}
