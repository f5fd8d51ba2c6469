//! Gemma 3n's sparse MLPs (activation sparsity): only the up rows the gate keeps are computed
//! and only the kept activations' rows of a transposed down projection are added. With the
//! tiny fixture's MLP matrices quantized to Q8_0 where their shapes allow (so both the 8-bit
//! transposed store and the f32 one run), the logits stay next to the dense MLPs' and to
//! transformers' (`fixtures/gemma3n_tiny/reference.json`, from
//! `scripts/make_gemma3n_fixtures.py`), whether the prompt runs whole (the dense up
//! projection), token by token or in chunks (only the kept up rows).

use std::path::PathBuf;

use gemma_formats::{Blob, GgmlType, GgufFile, TensorData, TensorSource};
use gemma_models::{Gemma3n, Gemma3nConfig, Loader, Logits, WeightLayout};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gemma3n_tiny")
        .join(name)
}

/// The fixture GGUF with every MLP matrix whose rows are whole Q8_0 blocks stored as Q8_0.
struct QuantizedMlps(GgufFile);

impl TensorSource for QuantizedMlps {
    fn tensor(&self, name: &str) -> Option<TensorData> {
        let t = self.0.tensor(name)?;
        let mlp =
            name.contains(".ffn_gate.") || name.contains(".ffn_up.") || name.contains(".ffn_down.");
        let cols = *t.shape.last()?;
        if !mlp || t.dtype != GgmlType::F32 || cols % 32 != 0 {
            return Some(t);
        }
        let values: Vec<f32> = t
            .data
            .bytes()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mut bytes = vec![0u8; GgmlType::Q8_0.bytes_for(values.len()).unwrap()];
        gemma_kernels::quant::quantize(GgmlType::Q8_0, &values, &mut bytes).unwrap();
        Some(TensorData {
            dtype: GgmlType::Q8_0,
            shape: t.shape,
            data: Blob::from_vec(bytes),
            interleaved: false,
        })
    }

    fn tensor_names(&self) -> Vec<String> {
        self.0.tensor_names()
    }
}

fn source() -> QuantizedMlps {
    QuantizedMlps(GgufFile::open(&fixture("model.gguf")).expect("fixture GGUF"))
}

fn load(source: &QuantizedMlps, sparse: bool) -> Gemma3n {
    let config = Gemma3nConfig::from_gguf(&source.0).unwrap();
    let loader = Loader {
        source,
        layout: WeightLayout::Gguf,
    };
    Gemma3n::load_with_sparse_mlps(config, &loader, sparse).expect("loads")
}

fn reference() -> (Vec<u32>, Vec<f32>) {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap();
    let ids = v["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter())
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (ids, logits)
}

/// Every position's logits, the prompt fed in chunks of the given sizes.
fn chunked_logits(model: &Gemma3n, ids: &[u32], chunks: &[usize]) -> Vec<f32> {
    let mut cache = model.new_cache(64).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    for &n in chunks.iter().cycle() {
        if at == ids.len() {
            break;
        }
        let n = n.min(ids.len() - at);
        out.extend_from_slice(
            model
                .forward(&ids[at..at + n], &mut cache, Logits::All)
                .unwrap(),
        );
        at += n;
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn sparse_mlps_stay_next_to_dense_ones_and_to_transformers() {
    let src = source();
    // Both down stores run: layer 0's down projection is Q8_0 (8-bit store), layer 1's keeps
    // f32 (48 columns are not whole Q8_0 blocks).
    assert_eq!(
        src.tensor("blk.0.ffn_down.weight").unwrap().dtype,
        GgmlType::Q8_0
    );
    assert_eq!(
        src.tensor("blk.1.ffn_down.weight").unwrap().dtype,
        GgmlType::F32
    );
    let (ids, want) = reference();
    let sparse = chunked_logits(&load(&src, true), &ids, &[ids.len()]);
    let dense = chunked_logits(&load(&src, false), &ids, &[ids.len()]);
    // The tiny random model amplifies rounding: Q8_0 MLPs alone move its logits (up to about
    // 6) by about half a unit from transformers'. Dense MLPs round the activations to Q8_0,
    // sparse ones requantize the down projection to 8 bits: the two differ by less than
    // quantization moves either from the reference, and the sparse one is no farther from it.
    let to_dense = max_diff(&sparse, &dense);
    let (to_ref_sparse, to_ref_dense) = (max_diff(&sparse, &want), max_diff(&dense, &want));
    assert!(
        to_dense > 0.0 && to_dense <= to_ref_dense,
        "sparse vs dense MLPs: {to_dense} (dense vs transformers {to_ref_dense})"
    );
    let (mean_sparse, mean_dense) = (mean_diff(&sparse, &want), mean_diff(&dense, &want));
    assert!(
        mean_sparse <= 1.25 * mean_dense && to_ref_sparse <= 1.25 * to_ref_dense,
        "to transformers, mean / max: sparse {mean_sparse} / {to_ref_sparse}, dense \
         {mean_dense} / {to_ref_dense}"
    );
}

fn mean_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

#[test]
fn sparse_mlp_logits_do_not_depend_on_how_the_prompt_is_cut() {
    let src = source();
    let model = load(&src, true);
    let (ids, _) = reference();
    assert!(
        ids.len() > 8,
        "the whole prompt must take the dense up projection"
    );
    let whole = chunked_logits(&model, &ids, &[ids.len()]);
    // The sparse kernels give the same bits for a token alone or in any batch (the kernels'
    // tests check that); the rest of the Gemma 3n forward pass, dense MLPs included, differs
    // across chunkings by a few f32 roundings (about 4e-6 here), hence the tolerance.
    for chunks in [&[1][..], &[3, 5], &[8], &[2, 7, 1]] {
        let d = max_diff(&chunked_logits(&model, &ids, chunks), &whole);
        assert!(
            d <= 1e-4,
            "chunks {chunks:?}: {d} from the whole prompt's logits"
        );
    }
}
