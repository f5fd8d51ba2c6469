//! Gemma 3 with images against transformers' `Gemma3ForConditionalGeneration` and its processor
//! (fixtures/gemma3_vision_tiny, made by scripts/make_gemma3_vision_fixtures.py): the chat
//! prompt's expansion and token ids, our preprocessing of the images, and the logits at every
//! position (bidirectional image blocks longer than the sliding window, three images, a
//! pan-and-scan image with three crops), from every checkpoint layout and from a text GGUF
//! with llama.cpp's mmproj.

use std::path::{Path, PathBuf};

use gemma_engine::gemma_models::{CacheType, Logits, SoftTokens};
use gemma_engine::{
    load, ImageOptions, LoadOptions, LoadedModel, PreparedImage, Session, SoftSpan,
};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_vision_tiny")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A little-endian f32 array described by `{"file", "shape"}`.
fn array(desc: &Value) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(fixture_dir().join(desc["file"].as_str().unwrap())).unwrap();
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let shape: Vec<usize> = desc["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(values.len(), shape.iter().product::<usize>());
    (values, shape)
}

fn ids(case: &Value) -> Vec<u32> {
    case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// The model in one of its checkpoint layouts, with an exact (f32) KV cache.
fn load_layout(layout: &str, batch_size: usize) -> LoadedModel {
    let dir = fixture_dir();
    let (path, mmproj) = match layout {
        "gguf" => (dir.join("text.gguf"), Some(dir.join("mmproj.gguf"))),
        folder => (dir.join(folder), None),
    };
    load(
        Some(&path),
        &LoadOptions {
            cache_type: CacheType::F32,
            batch_size,
            mmproj,
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{layout}: {e:#}"))
}

/// Our preprocessing of the case's images.
fn prepare(loaded: &LoadedModel, case: &Value) -> Vec<PreparedImage> {
    let opts = ImageOptions {
        pan_and_scan: case["pan_and_scan"].as_bool().unwrap(),
        ..ImageOptions::default()
    };
    case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| {
            let bytes = std::fs::read(fixture_dir().join(name.as_str().unwrap())).unwrap();
            loaded.prepare_image(&bytes, &opts).unwrap()
        })
        .collect()
}

/// The reference processor's pixel values as prepared images (views in order, per image).
fn reference_images(case: &Value) -> Vec<PreparedImage> {
    let (pixels, shape) = array(&case["pixel_values"]);
    let per_view = shape[1..].iter().product::<usize>();
    let mut views = pixels.chunks_exact(per_view).map(<[f32]>::to_vec);
    case["num_crops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|crops| {
            let n = 1 + crops.as_u64().unwrap() as usize;
            let views: Vec<Vec<f32>> = views.by_ref().take(n).collect();
            // Distinct keys: a reference pixel array is its own content.
            // Keys identify content: these are the pixels' bits, folded.
            let keys = views.iter().map(|v| content_key(v)).collect();
            PreparedImage { views, keys }
        })
        .collect()
}

/// A content key for a pixel array (FNV-1a over its bits, spread over 32 bytes).
fn content_key(pixels: &[f32]) -> [u8; 32] {
    let mut key = [0u8; 32];
    for (lane, chunk) in key.chunks_exact_mut(8).enumerate() {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ lane as u64;
        for v in pixels {
            h = (h ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3);
        }
        chunk.copy_from_slice(&h.to_le_bytes());
    }
    key
}

fn all_logits(loaded: &LoadedModel, ids: &[u32], soft: &[SoftSpan]) -> Vec<f32> {
    let soft: Vec<SoftTokens<'_>> = soft
        .iter()
        .map(|s| SoftTokens {
            offset: s.start,
            embeds: &s.embeds,
            bidirectional: s.bidirectional,
        })
        .collect();
    let mut cache = loaded.model.new_cache(256).unwrap();
    loaded
        .model
        .forward_embeds(ids, &soft, &mut cache, Logits::All)
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

fn image_cases(r: &Value) -> Vec<&Value> {
    r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["images"].as_array().unwrap().is_empty())
        .collect()
}

/// Our preprocessing equals the reference processor's pixel values within 2/255.
#[test]
fn preprocessing_matches_the_reference_processor() {
    let r = reference();
    let loaded = load_layout("hf", 512);
    for case in image_cases(&r) {
        let ours: Vec<f32> = prepare(&loaded, case)
            .into_iter()
            .flat_map(|i| i.views.into_iter().flatten())
            .collect();
        let (reference, _) = array(&case["pixel_values"]);
        let d = max_diff(&ours, &reference);
        eprintln!("{}: pixel_values max diff {d}", case["name"]);
        assert!(d <= 2.0 / 255.0 + 1e-6, "{}: {d}", case["name"]);
    }
}

/// The chat prompt expands and tokenizes to the reference processor's ids, and the logits at
/// every position match, from our own preprocessing, for every transformers layout.
#[test]
fn prompts_and_logits_match_transformers() {
    let r = reference();
    for layout in ["hf", "hf_published", "hf_transformers4"] {
        let loaded = load_layout(layout, 512);
        assert!(
            !loaded.vision.as_ref().unwrap().is_loaded(),
            "{layout}: the tower is read on the first image, not at load"
        );
        for case in r["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let images = prepare(&loaded, case);
            let (ids_ours, soft) = loaded
                .encode_with_images(case["prompt"].as_str().unwrap(), &images)
                .unwrap();
            assert_eq!(ids_ours, ids(case), "{layout} {name}: token ids");
            let logits = all_logits(&loaded, &ids_ours, &soft);
            let (reference, _) = array(&case["logits"]);
            let d = max_diff(&logits, &reference);
            eprintln!("{layout} {name}: logits max diff {d}");
            assert!(d < 1e-3, "{layout} {name}: logits differ by {d}");
        }
    }
}

/// Fed the reference processor's own pixel values, the tower and decoder alone match (so a
/// preprocessing difference cannot hide a model difference, or the reverse); a causal mask
/// over the image blocks would be far off.
#[test]
fn logits_from_reference_pixels_match_and_need_the_bidirectional_mask() {
    let r = reference();
    let loaded = load_layout("hf", 512);
    for case in image_cases(&r) {
        let name = case["name"].as_str().unwrap();
        let ids = ids(case);
        let soft = loaded.place_images(&ids, &reference_images(case)).unwrap();
        let logits = all_logits(&loaded, &ids, &soft);
        let (reference, _) = array(&case["logits"]);
        let d = max_diff(&logits, &reference);
        assert!(d < 1e-3, "{name}: logits differ by {d}");
        let causal: Vec<SoftSpan> = soft
            .iter()
            .map(|s| SoftSpan {
                bidirectional: false,
                ..s.clone()
            })
            .collect();
        let d_causal = max_diff(&all_logits(&loaded, &ids, &causal), &reference);
        assert!(
            d_causal > 0.1,
            "{name}: the image mask makes no difference ({d_causal})"
        );
    }
}

/// A text GGUF with llama.cpp's mmproj (converted by llama.cpp's own script) gives the same
/// logits as the reference run with the projection rounded as the mmproj stores it.
#[test]
fn text_gguf_with_mmproj_matches() {
    let r = reference();
    let loaded = load_layout("gguf", 512);
    for case in r["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let images = prepare(&loaded, case);
        let (ids_ours, soft) = loaded
            .encode_with_images(case["prompt"].as_str().unwrap(), &images)
            .unwrap();
        assert_eq!(ids_ours, ids(case), "gguf {name}: token ids");
        let logits = all_logits(&loaded, &ids_ours, &soft);
        let desc = if case.get("logits_f16proj").is_some() {
            &case["logits_f16proj"]
        } else {
            &case["logits"]
        };
        let (reference, _) = array(desc);
        let d = max_diff(&logits, &reference);
        eprintln!("gguf {name}: logits max diff {d}");
        assert!(d < 1e-3, "gguf {name}: logits differ by {d}");
    }
}

/// Prompt chunks smaller than an image block never cut it: a session fed 5 tokens at a time
/// (the block is 16 tokens, the window 8) ends with the reference's last logits.
#[test]
fn chunked_prefill_keeps_image_blocks_whole() {
    let r = reference();
    let loaded = load_layout("hf", 5);
    for case in image_cases(&r) {
        let name = case["name"].as_str().unwrap();
        let images = prepare(&loaded, case);
        let (ids, soft) = loaded
            .encode_with_images(case["prompt"].as_str().unwrap(), &images)
            .unwrap();
        let mut session = Session::new(&loaded, 256).unwrap();
        let last = session.evaluate(&ids, &soft).unwrap().to_vec();
        let (reference, shape) = array(&case["logits"]);
        let vocab = shape[1];
        let d = max_diff(&last, &reference[reference.len() - vocab..]);
        assert!(d < 1e-3, "{name}: last logits differ by {d}");
    }
}

/// Bad uses of images are errors naming the problem.
#[test]
fn image_mistakes_are_clear_errors() {
    let r = reference();
    let loaded = load_layout("hf", 512);
    let case = &r["cases"][1];
    let images = prepare(&loaded, case);
    // One slot, two images.
    let two = [images[0].views.clone(), images[0].views.clone()]
        .into_iter()
        .map(|views| PreparedImage {
            keys: vec![[0; 32]; views.len()],
            views,
        })
        .collect::<Vec<_>>();
    let err = loaded
        .encode_with_images(case["prompt"].as_str().unwrap(), &two)
        .unwrap_err();
    assert!(format!("{err:#}").contains("image slot"), "{err:#}");
    // Image tokens in the ids but no image.
    let err = loaded.place_images(&ids(case), &[]).unwrap_err();
    assert!(format!("{err:#}").contains("no image"), "{err:#}");
    // A run of the wrong length.
    let mut short = ids(case);
    let image_id = r["image_token_id"].as_u64().unwrap() as u32;
    let at = short.iter().position(|&i| i == image_id).unwrap();
    short.remove(at);
    let err = loaded.place_images(&short, &images).unwrap_err();
    assert!(format!("{err:#}").contains("tokens long"), "{err:#}");
    // A broken image.
    let err = loaded
        .prepare_image(b"\x89PNG\r\n\x1a\nbroken", &ImageOptions::default())
        .unwrap_err();
    assert!(!format!("{err:#}").is_empty());
    // A text-only model.
    let text_only = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_tiny");
    let text = load(Some(&text_only), &LoadOptions::default()).unwrap();
    let err = text
        .prepare_image(
            &std::fs::read(fixture_dir().join("img_a_97x73.png")).unwrap(),
            &ImageOptions::default(),
        )
        .unwrap_err();
    assert!(format!("{err:#}").contains("takes no images"), "{err:#}");
}
