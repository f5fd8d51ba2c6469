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
