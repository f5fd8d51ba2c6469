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
    logits: Vec<f32>,
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
    model
        .set_matformer(&MatformerConfig::per_layer(stored.clone()))
        .unwrap();
    check(&model, &full, "back to full");
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
            r#"{"ffn_widths": 16, "layers_to_skip": [3]}"#,
            "layers_to_skip is not supported",
        ),
        (r#"{"ffn_width": 16}"#, "unknown key 'ffn_width'"),
        (r#"{"ffn_widths": 16, "intermediate_size": 16}"#, "not both"),
        (r#"[16]"#, "expected a JSON object"),
        (r#"{"ffn_widths": "#, "not valid JSON"),
    ];
    let src = gguf();
    let mut model = load_gguf(&src);
    for (json, needle) in bad {
        let e = MatformerConfig::from_json(json)
            .and_then(|m| model.set_matformer(&m))
            .expect_err(json);
        assert!(e.to_string().contains(needle), "{json}: {e}");
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
