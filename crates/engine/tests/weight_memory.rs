//! `LoadOptions::weights` (the CLI's `--mmap` / `--no-mmap`): where the weights live must not
//! change a single bit of what the model computes, and `Auto` picks per architecture.

use std::path::{Path, PathBuf};

use gemma_engine::gemma_models::Logits;
use gemma_engine::{ensure_default_model, load, LoadOptions, LoadedModel, WeightMemory};

fn load_as(path: &Path, weights: WeightMemory) -> LoadedModel {
    let opts = LoadOptions {
        weights,
        ..LoadOptions::default()
    };
    load(Some(path), &opts).unwrap()
}

/// Every position's logits for `ids`.
fn all_logits(loaded: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let mut cache = loaded.model.new_cache(64).unwrap();
    loaded
        .model
        .forward(ids, &mut cache, Logits::All)
        .unwrap()
        .to_vec()
}

#[test]
fn gemma3_weights_are_resident_by_default_and_compute_the_same_bits_as_mapped() {
    let path = ensure_default_model().expect("the default model is available");
    let auto = load_as(&path, WeightMemory::Auto);
    let mapped = load_as(&path, WeightMemory::Mapped);
    assert!(
        auto.weights_resident(),
        "Gemma 3 reads every weight per token"
    );
    assert!(!mapped.weights_resident());

    let ids = auto.encode_prompt("The capital of France is").unwrap();
    let (a, m) = (all_logits(&auto, &ids), all_logits(&mapped, &ids));
    assert_eq!(a.len(), ids.len() * auto.model.vocab_size());
    assert!(a.iter().zip(&m).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn gemma3n_weights_stay_mapped_by_default_and_can_be_made_resident() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3n_tiny/model.gguf");
    let auto = load_as(&path, WeightMemory::Auto);
    let resident = load_as(&path, WeightMemory::Resident);
    assert!(!auto.weights_resident(), "PLE rows are read on demand");
    assert!(resident.weights_resident());

    let ids = [2, 17, 99, 5, 240, 3];
    let (a, r) = (all_logits(&auto, &ids), all_logits(&resident, &ids));
    assert_eq!(a.len(), ids.len() * auto.model.vocab_size());
    assert!(a.iter().zip(&r).all(|(x, y)| x.to_bits() == y.to_bits()));
}

/// Names of the GGUF tensors stored in the decode kernels' interleaved layout.
fn interleaved_tensors(loaded: &LoadedModel) -> Vec<String> {
    use gemma_engine::gemma_formats::{ModelFile, TensorSource};
    let ModelFile::Gguf(gguf) = &loaded.file else {
        panic!("a GGUF model")
    };
    gguf.tensors()
        .iter()
        .filter(|info| gguf.tensor(&info.name).is_some_and(|t| t.interleaved))
        .map(|info| info.name.clone())
        .collect()
}

#[test]
fn a_model_that_never_decodes_keeps_the_files_layout_in_the_mapping() {
    // A safety classifier (`decodes: false`) runs prompts only: no matrix is rewritten into
    // the decode layout (nor copied out of the mapping for it), and it computes the same bits.
    let path = ensure_default_model().expect("the default model is available");
    let load_with = |decodes| {
        let opts = LoadOptions {
            weights: WeightMemory::Mapped,
            decodes,
            ..LoadOptions::default()
        };
        load(Some(&path), &opts).unwrap()
    };
    let classifier = load_with(false);
    assert_eq!(interleaved_tensors(&classifier), Vec::<String>::new());
    assert!(!classifier.weights_resident());
    let decoder = load_with(true);
    let pays = gemma_engine::gemma_models::gemma_kernels::matmul::interleaving_pays(
        gemma_engine::gemma_formats::GgmlType::Q8_0,
        256,
        640,
    );
    if pays && std::env::var("GEMMA_INTERLEAVE").map_or(true, |v| v != "0") {
        assert!(
            !interleaved_tensors(&decoder).is_empty(),
            "a decoding model takes the interleaved layout on this CPU"
        );
    }
    let ids = decoder.encode_prompt("The capital of France is").unwrap();
    let (c, d) = (all_logits(&classifier, &ids), all_logits(&decoder, &ids));
    assert!(c.iter().zip(&d).all(|(x, y)| x.to_bits() == y.to_bits()));
}
