//! `Logits::None` fills the cache without computing logits: a prefix fed that way, then the rest,
//! gives the logits of the whole prompt fed at once, for every family.

use std::path::PathBuf;

use gemma_formats::{HfFolder, ModelFile};
use gemma_models::{load_model, Logits};

#[test]
fn a_prefix_without_logits_leaves_the_cache_as_with_them() {
    for fixture in ["gemma3_tiny", "gemma3n_tiny", "gemma2_tiny"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(fixture);
        let model = load_model(&ModelFile::Hf(HfFolder::open(&dir).unwrap())).unwrap();
        let ids: Vec<u32> = (0..12).map(|i| 2 + (i * 37 % 200) as u32).collect();
        let mut cache = model.new_cache(64).unwrap();
        let want = model
            .forward(&ids, &mut cache, Logits::Last)
            .unwrap()
            .to_vec();
        let mut cache = model.new_cache(64).unwrap();
        let none = model.forward(&ids[..7], &mut cache, Logits::None).unwrap();
        assert!(none.is_empty(), "{fixture}");
        assert_eq!(cache.len(), 7);
        let got = model.forward(&ids[7..], &mut cache, Logits::Last).unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{fixture}: {diff}");
    }
}
