//! Parity with transformers on a tiny random-weight Gemma 2 (fixtures from
//! `scripts/make_gemma2_fixtures.py`: `Gemma2ForCausalLM`, eager attention, f32): logits at
//! every position within 1e-3 with an f32 cache, from the safetensors checkpoint and from its
//! llama.cpp-layout GGUF, whether the prompt (24 positions, window 5) is fed at once, token by
//! token, or in chunks that straddle the window; plus the GGUF reader's defaults and its
//! refusals of broken files.

mod common;

use common::{argmax, max_diff, Reference};

use std::path::{Path, PathBuf};

use gemma_formats::{open_model_source, GgufFile, GgufWriter, MetaValue};
use gemma_models::{load_model, CacheType, Logits, Model, ModelError, SeqStep, SoftTokens};
use serde_json::Value;

const TOLERANCE: f32 = 1e-3;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma2_tiny")
}

fn reference() -> Reference {
    Reference::read(&fixture_dir())
}

fn try_load(path: &Path) -> Result<Model, String> {
    let file = open_model_source(path).map_err(|e| e.to_string())?;
    load_model(&file).map_err(|e| e.to_string())
}

fn load(path: &Path) -> Model {
    try_load(path).unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

fn assert_close(what: &str, pos: usize, got: &[f32], want: &[f32], tolerance: f32) {
    let worst = max_diff(got, want);
    assert!(
        worst <= tolerance,
        "{what}: position {pos}: max |diff| {worst} > {tolerance}"
    );
}

/// Every position's logits with the prompt fed in chunks of the given sizes.
fn run_chunked(model: &Model, ids: &[u32], chunks: &[usize]) -> Vec<f32> {
    let mut cache = model.new_cache(64).unwrap();
    let mut all = Vec::new();
    let mut pos = 0;
    for &n in chunks {
        let logits = model
            .forward(&ids[pos..pos + n], &mut cache, Logits::All)
            .unwrap();
        all.extend_from_slice(logits);
        pos += n;
    }
    assert_eq!(pos, ids.len(), "chunks must cover the prompt");
    assert_eq!(cache.len(), ids.len());
    all
}

fn check_model(what: &str, model: &Model, tolerance: f32) {
    let r = reference();
    assert_eq!(model.architecture(), "gemma2");
    assert_eq!(model.vocab_size(), r.vocab);
    let n = r.ids.len();
    for chunks in [vec![n], vec![1; n], vec![3, 7, 1, 5, 8]] {
        let all = run_chunked(model, &r.ids, &chunks);
        for (pos, want) in r.logits.iter().enumerate() {
            let got = &all[pos * r.vocab..(pos + 1) * r.vocab];
            assert_close(&format!("{what} {chunks:?}"), pos, got, want, tolerance);
        }
    }
    // Greedy continuation, decoding one token at a time from the cache.
    let mut cache = model.new_cache(64).unwrap();
    let mut next = argmax(model.forward(&r.ids, &mut cache, Logits::Last).unwrap());
    let mut generated = vec![next];
    while generated.len() < r.greedy.len() {
        next = argmax(model.forward(&[next], &mut cache, Logits::Last).unwrap());
        generated.push(next);
    }
    assert_eq!(generated, r.greedy, "{what}: greedy continuation");
}

#[test]
fn safetensors_checkpoint_matches_transformers() {
    check_model("safetensors", &load(&fixture_dir()), TOLERANCE);
}

#[test]
fn gguf_conversion_matches_transformers() {
    check_model("gguf", &load(&fixture_dir().join("model.gguf")), TOLERANCE);
}

/// Both readers see the same model: every hyper-parameter the forward pass uses, the
/// alternating layers (even ones sliding) and both soft-caps included.
#[test]
fn both_formats_read_the_same_config() {
    let (Model::Gemma2(hf), Model::Gemma2(gguf)) = (
        load(&fixture_dir()),
        load(&fixture_dir().join("model.gguf")),
    ) else {
        panic!("not Gemma 2");
    };
    let (a, b) = (hf.config(), gguf.config());
    assert_eq!(a, b);
    use gemma_models::gemma2::LayerType::*;
    assert_eq!(a.layer_types, [Sliding, Full, Sliding, Full, Sliding]);
    assert_eq!(a.attn_logit_softcapping, Some(2.0));
    assert_eq!(a.final_logit_softcapping, Some(4.0));
    assert_eq!(a.query_pre_attn_scalar, 24.0);
    assert_eq!(a.rope.theta, 20_000.0);
    assert!(a.sliding_window < reference().ids.len());
}

/// Decoding token by token from the cache gives what one prefill of the whole prompt gives,
/// though the sliding layers' rings (5 slots) wrap many times on the way.
#[test]
fn incremental_decode_equals_one_shot_prefill() {
    let model = load(&fixture_dir().join("model.gguf"));
    let r = reference();
    let n = r.ids.len();
    let whole = run_chunked(&model, &r.ids, &[n]);
    let stepwise = run_chunked(&model, &r.ids, &vec![1; n]);
    let worst = max_diff(&whole, &stepwise);
    // Only the order of f32 sums differs (history split across ring segments).
    assert!(worst <= 1e-5, "token by token vs one prefill: {worst}");
}

/// A prompt longer than the window: the sliding layers hold only the window, yet every
/// position matches the reference (checked above); here the cache plan itself.
#[test]
fn sliding_layers_hold_only_the_window() {
    let model = load(&fixture_dir());
    // 3 sliding layers × 5 positions + 2 global layers × 64 positions, keys and values,
    // 2 kv heads × 16 dims, f32.
    let expected = (3 * 5 + 2 * 64) * 2 * 2 * 16 * 4;
    assert_eq!(model.kv_cache_bytes(64), expected);
    assert_eq!(model.new_cache(64).unwrap().bytes(), expected);
}

/// With an f16 cache: the f32 tolerance plus twice f16's relative rounding of the largest
/// logit (the reasoning of the Gemma 3 parity test).
#[test]
fn f16_cache_matches_transformers() {
    let r = reference();
    let max_logit = r
        .logits
        .iter()
        .flatten()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    let tolerance = TOLERANCE + 2.0 * 2f32.powi(-11) * max_logit;
    for path in [fixture_dir(), fixture_dir().join("model.gguf")] {
        let mut model = load(&path);
        model.set_cache_type(CacheType::F16).unwrap();
        check_model("f16 cache", &model, tolerance);
    }
}

#[test]
fn batched_sequences_match_the_reference() {
    let model = load(&fixture_dir());
    let r = reference();
    let lens = [7usize, 3, 24];
    let mut caches: Vec<_> = lens.iter().map(|_| model.new_cache(64).unwrap()).collect();
    let mut logits = Vec::new();
    let mut steps: Vec<_> = caches
        .iter_mut()
        .zip(lens)
        .map(|(cache, n)| SeqStep::text(&r.ids[..n], cache))
        .collect();
    model.forward_batch(&mut steps, &mut logits).unwrap();
    for (s, n) in lens.into_iter().enumerate() {
        let got = &logits[s * r.vocab..(s + 1) * r.vocab];
        assert_close("batch prefill", n - 1, got, &r.logits[n - 1], TOLERANCE);
    }
    for step in 0..4 {
        let mut steps: Vec<_> = caches[..2]
            .iter_mut()
            .zip(lens)
            .map(|(cache, n)| SeqStep::text(&r.ids[n + step..n + step + 1], cache))
            .collect();
        model.forward_batch(&mut steps, &mut logits).unwrap();
        for (s, n) in lens[..2].iter().enumerate() {
            let got = &logits[s * r.vocab..(s + 1) * r.vocab];
            let pos = n + step;
            assert_close("batch decode", pos, got, &r.logits[pos], TOLERANCE);
        }
    }
}

/// Soft tokens that carry exactly the scaled embeddings of the ids they replace change nothing.
#[test]
fn soft_tokens_replace_embeddings() {
    let model = load(&fixture_dir().join("model.gguf"));
    let r = reference();
    let file = GgufFile::open(&fixture_dir().join("model.gguf")).unwrap();
    let table = file.tensor_info("token_embd.weight").unwrap().clone();
    let bytes = file.tensor_data(&table);
    let h = model.hidden_size();
    let scale = (h as f32).sqrt();
    let embeds: Vec<f32> = r.ids[4..7]
        .iter()
        .flat_map(|&id| {
            let row = &bytes.bytes()[id as usize * h * 4..(id as usize + 1) * h * 4];
            row.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) * scale)
                .collect::<Vec<_>>()
        })
        .collect();
    let soft = [SoftTokens {
        offset: 4,
        embeds: &embeds,
        bidirectional: false,
    }];
    let mut ids = r.ids[..10].to_vec();
    ids[4..7].fill(0);
    let mut cache = model.new_cache(64).unwrap();
    let logits = model
        .forward_embeds(&ids, &soft, &mut cache, Logits::All)
        .unwrap();
    for pos in 0..10 {
        let got = &logits[pos * r.vocab..(pos + 1) * r.vocab];
        assert_close("soft tokens", pos, got, &r.logits[pos], TOLERANCE);
    }
}

/// A copy of the fixture GGUF with `edit_meta` applied to its metadata (returning `None` drops
/// a key) and `edit_tensor` to each tensor (name, shape, bytes).
fn gguf_copy(
    tag: &str,
    edit_meta: impl Fn(&str, &MetaValue) -> Option<MetaValue>,
    edit_tensor: impl Fn(&str, &mut Vec<usize>, &mut Vec<u8>),
) -> PathBuf {
    let src = GgufFile::open(&fixture_dir().join("model.gguf")).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in src.metadata() {
        if key == "general.alignment" {
            continue;
        }
        if let Some(v) = edit_meta(key, value) {
            w.add_metadata(key.as_str(), v).unwrap();
        }
    }
    for info in src.tensors() {
        let mut shape = info.shape.clone();
        let mut data = src.tensor_data(info).bytes().to_vec();
        edit_tensor(&info.name, &mut shape, &mut data);
        w.add_tensor(info.name.as_str(), info.dtype, &shape, data)
            .unwrap();
    }
    let path = std::env::temp_dir().join(format!("gemma2-{tag}-{}.gguf", std::process::id()));
    w.write_file(&path).unwrap();
    path
}

fn gemma2_config(model: &Model) -> &gemma_models::Gemma2Config {
    match model {
        Model::Gemma2(g) => g.config(),
        _ => panic!("not Gemma 2"),
    }
}

/// llama.cpp's gemma2 loader treats both soft-cap keys as optional with defaults 50 and 30,
/// which are also transformers' defaults: a GGUF without them gets those, and runs exactly like
/// the safetensors checkpoint whose config.json leaves them out.
#[test]
fn gguf_without_softcap_keys_takes_the_defaults() {
    let path = gguf_copy(
        "no-softcap",
        |k, v| (!k.ends_with("logit_softcapping")).then(|| v.clone()),
        |_, _, _| {},
    );
    let gguf = load(&path);
    std::fs::remove_file(&path).ok();
    let c = gemma2_config(&gguf);
    assert_eq!(c.attn_logit_softcapping, Some(50.0));
    assert_eq!(c.final_logit_softcapping, Some(30.0));

    // The same weights as a folder whose config.json has no soft-cap keys.
    let dir = std::env::temp_dir().join(format!("gemma2-no-softcap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("config.json")).unwrap())
            .unwrap();
    let obj = config.as_object_mut().unwrap();
    obj.remove("attn_logit_softcapping");
    obj.remove("final_logit_softcapping");
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        fixture_dir().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let hf = load(&dir);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(gemma2_config(&hf), c);

    let r = reference();
    let a = run_chunked(&gguf, &r.ids, &[r.ids.len()]);
    let b = run_chunked(&hf, &r.ids, &[r.ids.len()]);
    assert!(max_diff(&a, &b) <= 1e-4);
    // And the caps matter: with the fixture's own (2 and 4) the logits differ a lot.
    let capped: Vec<f32> = r.logits.iter().flatten().copied().collect();
    assert!(max_diff(&a, &capped) > 0.1);
}

#[test]
fn bad_metadata_is_a_clear_error() {
    let cases: [(&str, MetaValue, &str); 6] = [
        (
            "gemma2.attention.head_count_kv",
            MetaValue::U32(3),
            "key/value heads",
        ),
        ("gemma2.block_count", MetaValue::U32(0), "layer count"),
        (
            "gemma2.attn_logit_softcapping",
            MetaValue::F32(0.0),
            "attn_logit_softcapping",
        ),
        (
            "gemma2.final_logit_softcapping",
            MetaValue::F32(f32::NAN),
            "final_logit_softcapping",
        ),
        (
            "gemma2.attention.sliding_window",
            MetaValue::U32(0),
            "window of 0",
        ),
        (
            "gemma2.attention.key_length",
            MetaValue::U64(u64::MAX / 2),
            "",
        ),
    ];
    for (key, value, message) in cases {
        let path = gguf_copy(
            "bad-meta",
            |k, v| Some(if k == key { value.clone() } else { v.clone() }),
            |_, _, _| {},
        );
        let err = try_load(&path).err();
        std::fs::remove_file(&path).ok();
        let err = err.unwrap_or_else(|| panic!("{key} = {value:?} loaded"));
        assert!(err.contains(message), "{key} = {value:?}: {err}");
    }
    // llama.cpp requires the norm epsilon for gemma2.
    let path = gguf_copy(
        "no-eps",
        |k, v| (k != "gemma2.attention.layer_norm_rms_epsilon").then(|| v.clone()),
        |_, _, _| {},
    );
    let err = try_load(&path).err();
    std::fs::remove_file(&path).ok();
    assert!(err.unwrap().contains("layer_norm_rms_epsilon"));
}

#[test]
fn truncated_or_misshapen_tensors_are_errors() {
    // A tensor with fewer rows than the config implies: named, with both shapes.
    let path = gguf_copy(
        "short-tensor",
        |_, v| Some(v.clone()),
        |name, shape, data| {
            if name == "blk.3.attn_k.weight" {
                shape[0] -= 1;
                data.truncate(data.len() - shape[1] * 4);
            }
        },
    );
    let err = try_load(&path).err();
    std::fs::remove_file(&path).ok();
    let err = err.expect("a short tensor loaded");
    assert!(err.contains("blk.3.attn_k.weight"), "{err}");

    // The file cut off inside the last tensor's data.
    let bytes = std::fs::read(fixture_dir().join("model.gguf")).unwrap();
    let path = std::env::temp_dir().join(format!("gemma2-cut-{}.gguf", std::process::id()));
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = try_load(&path).err();
    std::fs::remove_file(&path).ok();
    assert!(err.is_some(), "a truncated GGUF loaded");

    // The same for the safetensors file.
    let dir = std::env::temp_dir().join(format!("gemma2-cut-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture_dir().join("config.json"), dir.join("config.json")).unwrap();
    let st = std::fs::read(fixture_dir().join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &st[..st.len() - 100]).unwrap();
    let err = try_load(&dir).err();
    std::fs::remove_dir_all(&dir).ok();
    assert!(err.is_some(), "a truncated safetensors file loaded");
}

#[test]
fn out_of_range_ids_and_context_overflow_are_errors() {
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
    assert!(matches!(err, ModelError::TokenOutOfRange { .. }), "{err}");
}

#[test]
fn stops_at_gemma2_end_of_turn() {
    // Gemma 2's `<end_of_turn>` is 107 (106 is `<start_of_turn>`); this vocabulary of 256 has
    // both ids.
    assert_eq!(load(&fixture_dir()).stop_token_ids(), vec![1, 107]);
}

#[test]
fn a_nan_weight_names_its_layer() {
    let path = gguf_copy(
        "nan",
        |_, v| Some(v.clone()),
        |name, _, data| {
            if name == "blk.2.ffn_up.weight" {
                for v in data.chunks_exact_mut(4) {
                    v.copy_from_slice(&f32::NAN.to_le_bytes());
                }
            }
        },
    );
    let model = load(&path);
    std::fs::remove_file(&path).ok();
    let mut cache = model.new_cache(16).unwrap();
    let err = model
        .forward(&[2, 17, 9], &mut cache, Logits::All)
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::NonFinite { where_ } if where_ == "layer 2"),
        "{err}"
    );
}
