//! Gemma 3n MatFormer extraction, run-time switching, quantized PLE tables, conditional loading
//! of multimodal towers, and clear errors for broken files and impossible configurations.
//! Expected logits come from transformers (`fixtures/gemma3n_tiny/reference*.json`, written by
//! `scripts/make_gemma3n_fixtures.py`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use gemma_formats::{
    Blob, GgmlType, GgufFile, GgufWriter, HfFolder, MetaValue, TensorData, TensorSource,
};
use gemma_models::gemma3n::{extract_gguf, ExtractOptions, MatformerConfig};
use gemma_models::{Gemma3n, Gemma3nConfig, Loader, Logits, ModelError, WeightLayout};
use serde_json::Value;

const TOLERANCE: f32 = 1e-3;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gemma3n_tiny")
        .join(name)
}

struct Reference {
    ids: Vec<u32>,
    widths: Option<Vec<usize>>,
    skip: Option<Vec<usize>>,
    logits: Vec<f32>,
}

impl Reference {
    /// The MatFormer configuration the reference was built with.
    fn matformer(&self) -> MatformerConfig {
        let m = MatformerConfig::per_layer(self.widths.clone().unwrap());
        match &self.skip {
            Some(skip) => m.skipping(skip.clone()).unwrap(),
            None => m,
        }
    }
}

fn reference(name: &str) -> Reference {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap();
    let ints = |key: &str| -> Option<Vec<usize>> {
        v.get(key)?
            .as_array()
            .map(|a| a.iter().map(|x| x.as_u64().unwrap() as usize).collect())
    };
    Reference {
        ids: ints("input_ids")
            .unwrap()
            .into_iter()
            .map(|i| i as u32)
            .collect(),
        widths: ints("intermediate_size"),
        skip: ints("layers_to_skip"),
        logits: v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter())
            .map(|x| x.as_f64().unwrap() as f32)
            .collect(),
    }
}

fn matformer_widths() -> Vec<usize> {
    reference("reference_matformer.json").widths.unwrap()
}

fn gguf() -> GgufFile {
    GgufFile::open(&fixture("model.gguf")).expect("fixture GGUF")
}

/// A writer's output, opened again from memory.
fn reopen(w: &GgufWriter) -> GgufFile {
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    GgufFile::from_bytes(Arc::new(bytes)).expect("extracted GGUF opens")
}

fn load(source: &dyn TensorSource, config: Gemma3nConfig, layout: WeightLayout) -> Gemma3n {
    Gemma3n::load(config, &Loader { source, layout }).expect("loads")
}

fn load_gguf(f: &GgufFile) -> Gemma3n {
    load(f, Gemma3nConfig::from_gguf(f).unwrap(), WeightLayout::Gguf)
}

fn logits(model: &Gemma3n, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(64).unwrap();
    model
        .forward(ids, &mut cache, Logits::All)
        .unwrap()
        .to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn extract(f: &GgufFile, widths: Option<Vec<usize>>, ple_type: Option<GgmlType>) -> GgufFile {
    let opts = ExtractOptions {
        matformer: widths.map(MatformerConfig::per_layer),
        ple_type,
    };
    reopen(&extract_gguf(f, &opts).expect("extracts"))
}

#[test]
fn extracted_sub_model_matches_transformers_and_the_in_place_slice() {
    let r = reference("reference_matformer.json");
    let src = gguf();
    let small = extract(&src, r.widths.clone(), None);
    assert!(small.file_size() < src.file_size());
    assert_eq!(
        small.tensor_info("blk.3.ffn_down.weight").unwrap().shape,
        vec![32, 48]
    );
    let extracted = load_gguf(&small);
    assert_eq!(
        extracted.config().intermediate_size,
        r.widths.clone().unwrap()
    );
    let got = logits(&extracted, &r.ids);
    let d = max_diff(&got, &r.logits);
    assert!(d <= TOLERANCE, "extracted vs transformers: {d}");

    let mut in_place = load_gguf(&src);
    in_place
        .set_matformer(&MatformerConfig::per_layer(r.widths.unwrap()))
        .unwrap();
    let d = max_diff(&logits(&in_place, &r.ids), &got);
    assert!(d <= 1e-5, "extracted vs in-place slice: {d}");
}

#[test]
fn extracted_layer_skipping_sub_model_matches_transformers_and_the_in_place_one() {
    let r = reference("reference_matformer_skip.json");
    let src = gguf();
    let opts = ExtractOptions {
        matformer: Some(r.matformer()),
        ple_type: None,
    };
    let small = reopen(&extract_gguf(&src, &opts).expect("extracts"));
    assert!(small.file_size() < src.file_size());
    // Kept layers 0, 2, 4, 6, 7 renumbered 0-4; nothing of a sixth block remains.
    assert_eq!(small.get_u64("gemma3n.block_count").unwrap(), Some(5));
    assert_eq!(
        small.get_u64("gemma3n.attention.shared_kv_layers").unwrap(),
        Some(2)
    );
    assert!(small.tensor_info("blk.5.attn_q.weight").is_none());
    assert!(small
        .tensors()
        .iter()
        .all(|t| !t.name.starts_with("blk.5.")));
    assert_eq!(
        small.tensor_info("blk.3.ffn_down.weight").unwrap().shape,
        vec![32, 40]
    );
    assert_eq!(
        small
            .tensor_info("per_layer_token_embd.weight")
            .unwrap()
            .shape,
        vec![256, 5 * 8]
    );
    assert_eq!(
        small
            .tensor_info("per_layer_model_proj.weight")
            .unwrap()
            .shape,
        vec![5 * 8, 32]
    );
    // Kept layer 3 is stored layer 6: same attention weights, its own PLE columns.
    let bytes =
        |f: &GgufFile, name: &str| f.tensor_data(f.tensor_info(name).unwrap()).bytes().to_vec();
    assert_eq!(
        bytes(&small, "blk.3.attn_q.weight"),
        bytes(&src, "blk.6.attn_q.weight")
    );
    let (ple_src, ple_new) = (
        bytes(&src, "per_layer_token_embd.weight"),
        bytes(&small, "per_layer_token_embd.weight"),
    );
    let row = 7; // token 7, layer block 6 (source) vs block 3 (extracted), 8 f32 each
    assert_eq!(
        &ple_new[(row * 40 + 3 * 8) * 4..][..32],
        &ple_src[(row * 64 + 6 * 8) * 4..][..32]
    );

    let extracted = load_gguf(&small);
    let c = extracted.config();
    assert_eq!(c.num_hidden_layers, 5);
    assert_eq!(c.intermediate_size, r.widths.clone().unwrap());
    assert_eq!(c.num_kv_shared_layers, 2);
    let got = logits(&extracted, &r.ids);
    let d = max_diff(&got, &r.logits);
    assert!(d <= TOLERANCE, "extracted vs transformers: {d}");

    let mut in_place = load_gguf(&src);
    in_place.set_matformer(&r.matformer()).unwrap();
    assert_eq!(in_place.active_layers(), &[0, 2, 4, 6, 7]);
    assert_eq!(in_place.config(), extracted.config());
    let d = max_diff(&logits(&in_place, &r.ids), &got);
    assert!(d <= 1e-5, "extracted vs in-place sub-model: {d}");
    assert!(in_place.weight_bytes() < load_gguf(&src).weight_bytes());
}

#[test]
fn extract_slices_quantized_ple_blocks_and_requantizes_after_skipping() {
    let r = reference("reference_matformer_skip.json");
    let src = gguf();
    // F16 keeps each layer's 8 columns a whole number of blocks.
    let f16 = extract(&src, None, Some(GgmlType::F16));
    let opts = ExtractOptions {
        matformer: Some(r.matformer()),
        ple_type: None,
    };
    let from_f16 = reopen(&extract_gguf(&f16, &opts).unwrap());
    assert_eq!(
        from_f16
            .tensor_info("per_layer_token_embd.weight")
            .unwrap()
            .dtype,
        GgmlType::F16
    );
    let d = max_diff(&logits(&load_gguf(&from_f16), &r.ids), &r.logits);
    assert!(d <= 0.01, "F16 PLE table, layers skipped: {d}");
    // Cut per layer from F32, then stored as F16 in the same pass.
    let both = ExtractOptions {
        matformer: Some(r.matformer()),
        ple_type: Some(GgmlType::F16),
    };
    let direct = reopen(&extract_gguf(&src, &both).unwrap());
    let ple = |f: &GgufFile| {
        f.tensor_data(f.tensor_info("per_layer_token_embd.weight").unwrap())
            .bytes()
            .to_vec()
    };
    assert_eq!(ple(&direct), ple(&from_f16));
    // Q8_0 blocks hold 32 values, more than one layer's 8 columns: a clear error, no panic.
    let q8 = ExtractOptions {
        matformer: Some(r.matformer()),
        ple_type: Some(GgmlType::Q8_0),
    };
    let e = extract_gguf(&src, &q8).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("per_layer_token_embd"), "{e}");
}

#[test]
fn a_loaded_model_switches_configurations_without_reloading() {
    let full = reference("reference.json");
    let sliced = reference("reference_matformer.json");
    let mut model = load_gguf(&gguf());
    let stored = model.stored_ffn_widths();
    let check = |model: &Gemma3n, want: &Reference, what: &str| {
        let d = max_diff(&logits(model, &want.ids), &want.logits);
        assert!(d <= TOLERANCE, "{what}: {d}");
    };
    check(&model, &full, "full");
    model
        .set_matformer(&MatformerConfig::per_layer(matformer_widths()))
        .unwrap();
    check(&model, &sliced, "sliced");
    assert_eq!(model.stored_ffn_widths(), stored);
    let skipping = reference("reference_matformer_skip.json");
    model.set_matformer(&skipping.matformer()).unwrap();
    check(&model, &skipping, "layers skipped");
    assert_eq!(model.config().num_hidden_layers, 5);
    // A cache made for the 5-layer sub-model cannot feed the full model: an error, no panic.
    let mut stale = model.new_cache(64).unwrap();
    model
        .forward(&skipping.ids, &mut stale, Logits::Last)
        .unwrap();
    model
        .set_matformer(&MatformerConfig::per_layer(stored.clone()))
        .unwrap();
    check(&model, &full, "back to full");
    let e = model
        .forward(&[5], &mut stale, Logits::Last)
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("start a new cache"), "{e}");
    assert_eq!(model.active_layers(), &[0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(model.config().num_hidden_layers, 8);
}

#[test]
fn ple_table_is_stored_quantized_and_still_runs() {
    let r = reference("reference.json");
    let src = gguf();
    let f32_model = load_gguf(&src);
    let want = logits(&f32_model, &r.ids);
    for (dtype, tolerance) in [(GgmlType::Q8_0, 0.05), (GgmlType::Q4_0, 0.5)] {
        let q = extract(&src, None, Some(dtype));
        let info = q.tensor_info("per_layer_token_embd.weight").unwrap();
        assert_eq!(info.dtype, dtype);
        let model = load_gguf(&q);
        assert!(model.per_layer_embedding_bytes() < f32_model.per_layer_embedding_bytes() / 3);
        assert_eq!(model.weight_bytes(), f32_model.weight_bytes());
        let d = max_diff(&logits(&model, &r.ids), &want);
        assert!(d > 0.0 && d <= tolerance, "{dtype:?}: {d}");
    }
}

/// Wraps a source, adds tower tensors, and records every tensor fetched.
struct Recording<'a> {
    inner: &'a dyn TensorSource,
    towers: Vec<String>,
    fetched: Mutex<BTreeSet<String>>,
}

impl TensorSource for Recording<'_> {
    fn tensor(&self, name: &str) -> Option<TensorData> {
        self.fetched.lock().unwrap().insert(name.to_string());
        if self.towers.iter().any(|t| t == name) {
            // Bytes that fit no shape: reading them as weights would fail.
            return Some(TensorData {
                interleaved: false,
                dtype: GgmlType::Q4_K,
                shape: vec![3, 7],
                data: Blob::from_vec(vec![0xff; 5]),
            });
        }
        self.inner.tensor(name)
    }
    fn tensor_names(&self) -> Vec<String> {
        let mut names = self.inner.tensor_names();
        names.extend(self.towers.iter().cloned());
        names
    }
}

fn assert_towers_untouched(
    inner: &dyn TensorSource,
    towers: &[&str],
    config: Gemma3nConfig,
    layout: WeightLayout,
) {
    let source = Recording {
        inner,
        towers: towers.iter().map(|s| s.to_string()).collect(),
        fetched: Mutex::new(BTreeSet::new()),
    };
    let model = load(&source, config, layout);
    let r = reference("reference.json");
    let mut cache = model.new_cache(32).unwrap();
    let mut next = model
        .forward(&r.ids, &mut cache, Logits::Last)
        .unwrap()
        .to_vec();
    for _ in 0..4 {
        let id = (0..next.len())
            .max_by(|&a, &b| next[a].total_cmp(&next[b]))
            .unwrap() as u32;
        next = model
            .forward(&[id], &mut cache, Logits::Last)
            .unwrap()
            .to_vec();
    }
    let fetched = source.fetched.lock().unwrap();
    assert!(fetched.len() > 100, "text weights were fetched");
    for t in towers {
        assert!(!fetched.contains(*t), "{t} was read by a text-only session");
    }
}

#[test]
fn vision_and_audio_towers_are_never_read_for_text() {
    let f = gguf();
    assert_towers_untouched(
        &f,
        &[
            "v.blk.0.attn_q.weight",
            "a.conv1d.0.weight",
            "mm.input_projection.weight",
        ],
        Gemma3nConfig::from_gguf(&f).unwrap(),
        WeightLayout::Gguf,
    );
    let folder = HfFolder::open(&fixture("")).unwrap();
    assert_towers_untouched(
        &folder,
        &[
            "model.vision_tower.timm_model.conv_stem.conv.weight",
            "model.audio_tower.subsample_conv_projection.conv_0.conv.weight",
            "model.embed_vision.embedding.weight",
            "model.embed_audio.embedding.weight",
        ],
        Gemma3nConfig::from_hf_config(folder.config()).unwrap(),
        WeightLayout::HuggingFace { prefix: "model." },
    );
}

/// Hides one tensor of a source.
struct Without<'a>(&'a dyn TensorSource, &'a str);

impl TensorSource for Without<'_> {
    fn tensor(&self, name: &str) -> Option<TensorData> {
        (name != self.1).then(|| self.0.tensor(name)).flatten()
    }
    fn tensor_names(&self) -> Vec<String> {
        let mut names = self.0.tensor_names();
        names.retain(|n| n != self.1);
        names
    }
}

#[test]
fn a_missing_ple_table_is_a_clear_error() {
    let f = gguf();
    let config = Gemma3nConfig::from_gguf(&f).unwrap();
    let source = Without(&f, "per_layer_token_embd.weight");
    let loader = Loader {
        source: &source,
        layout: WeightLayout::Gguf,
    };
    match Gemma3n::load(config, &loader) {
        Err(ModelError::MissingTensor(name)) => assert_eq!(name, "per_layer_token_embd.weight"),
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("loaded without a PLE table"),
    }
}

/// The fixture GGUF with one metadata value replaced.
fn with_metadata(key: &str, value: MetaValue) -> GgufFile {
    let src = gguf();
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata() {
        let v = if k == key { value.clone() } else { v.clone() };
        w.add_metadata(k.clone(), v).unwrap();
    }
    for info in src.tensors() {
        let data = src.tensor_data(info).bytes().to_vec();
        w.add_tensor(info.name.clone(), info.dtype, &info.shape, data)
            .unwrap();
    }
    reopen(&w)
}

#[test]
fn inconsistent_per_layer_lists_are_rejected() {
    let seven_widths = MetaValue::Array(vec![MetaValue::U32(32); 7]);
    let f = with_metadata("gemma3n.feed_forward_length", seven_widths);
    let e = Gemma3nConfig::from_gguf(&f).unwrap_err();
    assert!(
        e.to_string()
            .contains("intermediate_size has 7 entries for 8 layers"),
        "{e}"
    );
    let nine_types = MetaValue::Array(vec![MetaValue::Bool(true); 9]);
    let f = with_metadata("gemma3n.attention.sliding_window_pattern", nine_types);
    let e = Gemma3nConfig::from_gguf(&f).unwrap_err();
    assert!(e.to_string().contains("layer_types has 9 entries"), "{e}");
}

#[test]
fn impossible_matformer_configs_are_clear_errors() {
    let bad = [
        (
            r#"{"ffn_widths": [16, 16]}"#,
            "2 MLP widths for a model of 8 layers",
        ),
        (
            r#"{"ffn_widths": 4096}"#,
            "layer 0 for an MLP of 4096 units",
        ),
        (
            r#"{"ffn_widths": [16, 16, 16, 16, 16, 16, 16, 0]}"#,
            "not a positive integer",
        ),
        (
            r#"{"ffn_widths": 16, "layers_to_skip": [8]}"#,
            "skips layer 8, but the model has 8 layers (0-7)",
        ),
        (r#"{"layers_to_skip": [1, 3, 1]}"#, "lists layer 1 twice"),
        (
            r#"{"layers_to_skip": [0, 1, 2, 3, 4, 5, 6, 7]}"#,
            "skips all 8 layers",
        ),
        (
            r#"{"layers_to_skip": [4]}"#,
            "skips layer 4, whose keys and values the kept KV-shared layer 6 reads",
        ),
        (
            r#"{"layers_to_skip": [2, 5]}"#,
            "skips layer 2, whose keys and values the kept KV-shared layer 7 reads",
        ),
        (
            r#"{"ffn_widths": [16, 16, 16, 16, 16, 16, 16, 16], "layers_to_skip": [1]}"#,
            "8 MLP widths, but keeps 7 layers (skips 1)",
        ),
        (
            r#"{"ffn_widths": [16, 16, 16, 64, 16], "layers_to_skip": [0, 1, 3]}"#,
            "asks layer 6 for an MLP of 64 units, but the checkpoint stores only 56",
        ),
        (
            r#"{"layers_to_skip": 3}"#,
            "expected a list of layer indices",
        ),
        (r#"{"layers_to_skip": [-1]}"#, "expected layer indices"),
        (r#"{"layers_to_skip": []}"#, "give 'ffn_widths' and/or"),
        (r#"{"ffn_width": 16}"#, "unknown key 'ffn_width'"),
        (r#"{"ffn_widths": 16, "intermediate_size": 16}"#, "not both"),
        (r#"[16]"#, "expected a JSON object"),
        (r#"{"ffn_widths": "#, "not valid JSON"),
    ];
    let src = gguf();
    let mut model = load_gguf(&src);
    let r = reference("reference.json");
    let before = logits(&model, &r.ids);
    for (json, needle) in bad {
        let e = MatformerConfig::from_json(json)
            .and_then(|m| model.set_matformer(&m))
            .expect_err(json);
        assert!(e.to_string().contains(needle), "{json}: {e}");
        // A refused configuration leaves the active model as it was.
        assert_eq!(model.active_layers().len(), 8, "{json}");
        let e = MatformerConfig::from_json(json)
            .and_then(|m| {
                extract_gguf(
                    &src,
                    &ExtractOptions {
                        matformer: Some(m),
                        ple_type: None,
                    },
                )
                .map(|_| ())
            })
            .expect_err(json);
        assert!(e.to_string().contains(needle), "extract {json}: {e}");
    }
    assert_eq!(logits(&model, &r.ids), before);
    // Skipping a source together with every consumer that reads it is fine: nobody reads it.
    let m = MatformerConfig::from_json(r#"{"layers_to_skip": [4, 6]}"#).unwrap();
    model.set_matformer(&m).unwrap();
    assert_eq!(model.config().num_kv_shared_layers, 2);
    // A model loaded at narrower widths cannot be widened again.
    let config = Gemma3nConfig::from_gguf(&src)
        .unwrap()
        .with_ffn_widths(vec![16; 8])
        .unwrap();
    let mut narrow = load(&src, config, WeightLayout::Gguf);
    let e = narrow
        .set_matformer(&MatformerConfig::per_layer(vec![32; 8]))
        .unwrap_err();
    assert!(e.to_string().contains("stores only 16"), "{e}");
}
