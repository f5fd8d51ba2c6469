//! Broken checkpoints fail loudly: NaN weights make the forward pass an error naming the first
//! layer that produced a non-finite value (never `null` logits), and a RoPE base of 0 is
//! refused at load. Both start from the tiny Gemma 3 fixture, copied with one change.

use std::path::PathBuf;

use gemma_formats::{open_model_source, GgmlType, GgufFile, GgufWriter, MetaValue};
use gemma_models::{load_model, Logits, ModelError};

fn fixture() -> GgufFile {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_tiny/model.gguf");
    GgufFile::open(&path).unwrap()
}

/// The fixture rewritten with `edit_meta` applied to each metadata value and `poison` naming
/// an f32 tensor whose values all become NaN.
fn copy_with(
    edit_meta: impl Fn(&str, &MetaValue) -> MetaValue,
    poison: Option<&str>,
    tag: &str,
) -> PathBuf {
    let src = fixture();
    let mut w = GgufWriter::new();
    for (key, value) in src.metadata() {
        if key == "general.alignment" {
            continue;
        }
        w.add_metadata(key.as_str(), edit_meta(key, value)).unwrap();
    }
    for info in src.tensors() {
        let mut data = src.tensor_data(info).bytes().to_vec();
        if Some(info.name.as_str()) == poison {
            assert_eq!(info.dtype, GgmlType::F32);
            for v in data.chunks_exact_mut(4) {
                v.copy_from_slice(&f32::NAN.to_le_bytes());
            }
        }
        w.add_tensor(info.name.as_str(), info.dtype, &info.shape, data)
            .unwrap();
    }
    let path = std::env::temp_dir().join(format!("gemma-models-{tag}-{}.gguf", std::process::id()));
    w.write_file(&path).unwrap();
    path
}

#[test]
fn nan_weights_are_an_error_naming_the_first_layer() {
    let path = copy_with(|_, v| v.clone(), Some("blk.3.ffn_down.weight"), "nan");
    let file = open_model_source(&path).unwrap();
    let model = load_model(&file).unwrap();
    let mut cache = model.new_cache(64).unwrap();
    let err = model
        .forward(&[2, 17, 9, 40], &mut cache, Logits::All)
        .unwrap_err();
    std::fs::remove_file(&path).ok();
    match &err {
        ModelError::NonFinite { where_ } => assert_eq!(where_, "layer 3"),
        other => panic!("expected a non-finite error, got {other}"),
    }
    assert!(err.to_string().contains("layer 3"), "{err}");
}

#[test]
fn a_rope_base_of_zero_is_refused_at_load() {
    let path = copy_with(
        |key, v| {
            if key.ends_with("rope.freq_base") {
                MetaValue::F32(0.0)
            } else {
                v.clone()
            }
        },
        None,
        "rope0",
    );
    let file = open_model_source(&path).unwrap();
    let err = load_model(&file)
        .err()
        .expect("a RoPE base of 0 must not load");
    std::fs::remove_file(&path).ok();
    assert!(err.to_string().contains("RoPE base"), "{err}");
}
