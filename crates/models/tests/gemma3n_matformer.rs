//! MatFormer slicing of Gemma 3n: the fixture checkpoint loaded with narrower per-layer MLP
//! widths must match transformers running the model built at those widths from the sliced
//! weights (`fixtures/gemma3n_tiny/reference_matformer.json`, from
//! `scripts/make_gemma3n_fixtures.py`); the in-place sub-model that also skips layers must
//! match transformers running the model built from the kept layers only
//! (`reference_matformer_skip.json`); and slicing a quantized down projection keeps exactly
//! the first columns of every row.

use std::path::PathBuf;

use gemma_formats::{Blob, GgmlType, HfFolder, TensorData, TensorSource};
use gemma_models::gemma3n::MatformerConfig;
use gemma_models::{Gemma3n, Gemma3nConfig, KvCache, Loader, Logits, ModelError, WeightLayout};
use serde_json::Value;

const TOLERANCE: f32 = 1e-3;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3n_tiny")
}

fn load_sliced(widths: Vec<usize>) -> Result<Gemma3n, ModelError> {
    let folder = HfFolder::open(&fixture_dir()).expect("fixture folder");
    let config = Gemma3nConfig::from_hf_config(folder.config())?.with_ffn_widths(widths)?;
    let loader = Loader {
        source: &folder,
        layout: WeightLayout::HuggingFace { prefix: "model." },
    };
    Gemma3n::load(config, &loader)
}

fn forward_all(model: &Gemma3n, ids: &[u32], chunks: &[usize]) -> Vec<f32> {
    let mut cache: KvCache = model.new_cache(64).unwrap();
    let mut out = Vec::new();
    let mut pos = 0;
    for &n in chunks {
        out.extend_from_slice(
            model
                .forward(&ids[pos..pos + n], &mut cache, Logits::All)
                .unwrap(),
        );
        pos += n;
    }
    assert_eq!(pos, ids.len());
    out
}

#[test]
fn sliced_checkpoint_matches_transformers_at_the_narrower_widths() {
    let text = std::fs::read_to_string(fixture_dir().join("reference_matformer.json"))
        .expect("reference_matformer.json");
    let r: Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<u32> = r["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let widths: Vec<usize> = r["intermediate_size"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let vocab = r["vocab_size"].as_u64().unwrap() as usize;
    let model = load_sliced(widths.clone()).unwrap();
    assert_eq!(model.config().intermediate_size, widths);
    for chunks in [vec![ids.len()], vec![5, 1, 10]] {
        let got = forward_all(&model, &ids, &chunks);
        let mut worst = 0.0f32;
        for (pos, want) in r["logits"].as_array().unwrap().iter().enumerate() {
            for (j, w) in want.as_array().unwrap().iter().enumerate() {
                let d = (got[pos * vocab + j] - w.as_f64().unwrap() as f32).abs();
                worst = worst.max(d);
            }
        }
        assert!(worst <= TOLERANCE, "chunks {chunks:?}: max |diff| {worst}");
        eprintln!("MatFormer slice, chunks {chunks:?}: max |diff| {worst:e}");
    }
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn worst_diff(got: &[f32], want: &Value, vocab: usize) -> f32 {
    let mut worst = 0.0f32;
    for (pos, row) in want.as_array().unwrap().iter().enumerate() {
        for (j, w) in row.as_array().unwrap().iter().enumerate() {
            worst = worst.max((got[pos * vocab + j] - w.as_f64().unwrap() as f32).abs());
        }
    }
    worst
}

#[test]
fn in_place_layer_skipping_matches_transformers_on_the_kept_layers() {
    let text = std::fs::read_to_string(fixture_dir().join("reference_matformer_skip.json"))
        .expect("reference_matformer_skip.json");
    let r: Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<u32> = usizes(&r["input_ids"]).iter().map(|&i| i as u32).collect();
    let vocab = r["vocab_size"].as_u64().unwrap() as usize;
    let m = MatformerConfig::per_layer(usizes(&r["intermediate_size"]))
        .skipping(usizes(&r["layers_to_skip"]))
        .unwrap();
    let mut model = load_sliced(vec![32, 48, 32, 64, 48, 32, 56, 48]).unwrap();
    let full_cache_bytes = model.kv_cache_bytes(64);
    model.set_matformer(&m).unwrap();
    assert_eq!(model.active_layers(), usizes(&r["kept_layers"]).as_slice());
    let c = model.config();
    assert_eq!(c.num_hidden_layers, 5);
    assert_eq!(
        c.num_kv_shared_layers as u64,
        r["num_kv_shared_layers"].as_u64().unwrap()
    );
    let sparse: Vec<bool> = c.activation_sparsity.iter().map(Option::is_some).collect();
    let want_sparse: Vec<bool> = r["activation_sparsity_pattern"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_f64().unwrap() > 0.0)
        .collect();
    assert_eq!(sparse, want_sparse);
    // Kept producers 0, 2, 4 hold caches; skipped producers 1 and 3 no longer do.
    assert!(model.kv_cache_bytes(64) < full_cache_bytes);
    for chunks in [vec![ids.len()], vec![5, 1, 10], vec![1; ids.len()]] {
        let got = forward_all(&model, &ids, &chunks);
        let worst = worst_diff(&got, &r["logits"], vocab);
        assert!(worst <= TOLERANCE, "chunks {chunks:?}: max |diff| {worst}");
        eprintln!("MatFormer layer skipping, chunks {chunks:?}: max |diff| {worst:e}");
    }
}

#[test]
fn widths_wider_than_the_checkpoint_are_rejected() {
    let mut widths = vec![16; 8];
    widths[3] = 128; // the checkpoint's layer 3 MLP holds 64 units
    match load_sliced(widths) {
        Err(ModelError::TensorShape { name, .. }) => {
            assert!(name.contains("layers.3.mlp"), "{name}")
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("sliced an MLP wider than stored"),
    }
    match load_sliced(vec![16; 3]) {
        Err(e @ ModelError::Config(_)) => assert!(e.to_string().contains("3 entries"), "{e}"),
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("accepted 3 widths for 8 layers"),
    }
}

/// One in-memory tensor.
struct OneTensor(TensorData);

impl TensorSource for OneTensor {
    fn tensor(&self, name: &str) -> Option<TensorData> {
        (name == "w").then(|| self.0.clone())
    }
    fn tensor_names(&self) -> Vec<String> {
        vec!["w".into()]
    }
}

#[test]
fn quantized_column_slice_keeps_the_first_blocks_of_every_row() {
    let (rows, cols, keep) = (3, 96, 64); // Q8_0 blocks of 32: keep 2 of 3 per row
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37) % 101) as f32 / 13.0 - 3.5)
        .collect();
    let mut bytes = vec![0u8; GgmlType::Q8_0.bytes_for(rows * cols).unwrap()];
    gemma_kernels::quant::quantize(GgmlType::Q8_0, &values, &mut bytes).unwrap();
    let source = OneTensor(TensorData {
        interleaved: false,
        dtype: GgmlType::Q8_0,
        shape: vec![rows, cols],
        data: Blob::from_vec(bytes),
    });
    let loader = Loader {
        source: &source,
        layout: WeightLayout::HuggingFace { prefix: "" },
    };
    let full = loader.linear("w", rows, cols).unwrap();
    let sliced = full.first_cols("w", keep).unwrap();
    let (mut a, mut b) = (vec![0.0; cols], vec![0.0; keep]);
    for r in 0..rows {
        gemma_kernels::matmul::dequantize_row(&full.matrix(), r, &mut a);
        gemma_kernels::matmul::dequantize_row(&sliced.matrix(), r, &mut b);
        assert_eq!(&a[..keep], &b[..], "row {r}");
    }
    let top = full.first_rows("w", 2).unwrap();
    assert_eq!(top.rows, 2);
    gemma_kernels::matmul::dequantize_row(&top.matrix(), 1, &mut a);
    let mut want = vec![0.0; cols];
    gemma_kernels::matmul::dequantize_row(&full.matrix(), 1, &mut want);
    assert_eq!(a, want);
    // Not a whole number of blocks: a typed error, not a panic.
    assert!(matches!(
        full.first_cols("w", 40),
        Err(ModelError::TensorType { .. })
    ));
}
