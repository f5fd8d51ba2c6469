//! Parity with transformers on a tiny random-weight `Gemma3ForConditionalGeneration` (fixtures
//! from `scripts/make_gemma3_vision_fixtures.py`): for every image of every case (one image,
//! three of different sizes, a pan-and-scan original with its crops), the SigLIP tower's
//! `last_hidden_state` and the projector's image features within 1e-4, from the checkpoint as
//! transformers 5.24 saves it (`vision_tower.X`), under the published names
//! (`vision_tower.vision_model.X`), under transformers 4.52-4.57's names
//! (`model.vision_tower.vision_model.X`), and from llama.cpp's mmproj conversion. The converter
//! stores the projection in f16 whatever the output type, so the mmproj's features are held to
//! the reference computed with that rounded projection (`image_features_f16proj`).

use std::path::PathBuf;

use gemma_formats::{GgufFile, HfFolder};
use gemma_models::Gemma3Vision;
use serde_json::Value;

const TOLERANCE: f32 = 1e-4;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_vision_tiny")
}

/// A tensor stored as `ref/*.bin` (little-endian f32): its shape and values.
fn tensor(entry: &Value) -> (Vec<usize>, Vec<f32>) {
    assert_eq!(entry["dtype"], "f32");
    let shape: Vec<usize> = entry["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let path = fixture_dir().join(entry["file"].as_str().unwrap());
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(
        values.len(),
        shape.iter().product::<usize>(),
        "{}",
        path.display()
    );
    (shape, values)
}

/// One image: pixel values, tower output, image features, and the features with the
/// projection rounded to f16 (each flattened).
struct Image {
    case: String,
    pixels: Vec<f32>,
    hidden: Vec<f32>,
    features: Vec<f32>,
    features_f16proj: Vec<f32>,
}

fn images() -> Vec<Image> {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).expect("reference");
    let reference: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for case in reference["cases"].as_array().unwrap() {
        if case.get("pixel_values").is_none_or(Value::is_null) {
            continue;
        }
        let (pv_shape, pixels) = tensor(&case["pixel_values"]);
        let (_, hidden) = tensor(&case["vision_hidden"]);
        let (_, features) = tensor(&case["image_features"]);
        let (_, features_f16proj) = tensor(&case["image_features_f16proj"]);
        let n = pv_shape[0];
        let per = |v: &[f32], i: usize| v[i * v.len() / n..(i + 1) * v.len() / n].to_vec();
        for i in 0..n {
            out.push(Image {
                case: format!("{} image {i}", case["name"].as_str().unwrap()),
                pixels: per(&pixels, i),
                hidden: per(&hidden, i),
                features: per(&features, i),
                features_f16proj: per(&features_f16proj, i),
            });
        }
    }
    assert!(out.len() >= 5, "the fixture holds several images");
    out
}

fn worst(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// Runs every image through `vision` and checks the tower's output and the image features
/// (against the f16-projection reference when `f16_projection`) within [`TOLERANCE`].
fn check(what: &str, vision: &Gemma3Vision, f16_projection: bool) {
    assert_eq!(vision.image_size(), 64);
    assert_eq!(vision.tokens_per_image(), 16);
    assert_eq!(vision.text_hidden(), 32);
    let (mut hidden, mut features) = (Vec::new(), Vec::new());
    for image in images() {
        vision.tower().forward(&image.pixels, &mut hidden).unwrap();
        let d_hidden = worst(&hidden, &image.hidden);
        vision.encode(&image.pixels, &mut features).unwrap();
        let want = if f16_projection {
            &image.features_f16proj
        } else {
            &image.features
        };
        let d = worst(&features, want);
        eprintln!(
            "{what}, {}: tower differs by {d_hidden:.2e}, features by {d:.2e}",
            image.case
        );
        assert!(d_hidden < TOLERANCE, "{what}, {}: tower", image.case);
        assert!(d < TOLERANCE, "{what}, {}: features", image.case);
    }
}

fn hf(dir: &str) -> Gemma3Vision {
    let folder = HfFolder::open(&fixture_dir().join(dir)).unwrap();
    Gemma3Vision::load_hf(folder.config(), &folder).unwrap()
}

fn mmproj() -> Gemma3Vision {
    let file = GgufFile::open(&fixture_dir().join("mmproj.gguf")).unwrap();
    Gemma3Vision::load_gguf(&file).unwrap()
}

#[test]
fn transformers_5_checkpoint_matches() {
    check("hf", &hf("hf"), false);
}

#[test]
fn published_checkpoint_names_match() {
    check("hf_published", &hf("hf_published"), false);
}

#[test]
fn transformers_4_checkpoint_names_match() {
    check("hf_transformers4", &hf("hf_transformers4"), false);
}

#[test]
fn llama_cpp_mmproj_matches() {
    check("mmproj", &mmproj(), true);
}

/// The mmproj's projection really is rounded: against the f32 reference its features differ
/// by more than the tolerance, so the f16-projection reference is the one that tests it.
#[test]
fn the_mmproj_projection_is_f16() {
    let image = &images()[0];
    let mut features = Vec::new();
    mmproj().encode(&image.pixels, &mut features).unwrap();
    assert!(worst(&features, &image.features) > TOLERANCE);
}
