//! Our decoding + preprocessing against transformers 5.24's Gemma3ImageProcessor
//! (`fixtures/images/`, made by `scripts/make_image_fixtures.py`; see its docstring).
//!
//! Every committed image is decoded on each reference route that has stored `pixel_values`, and
//! compared value by value. The largest difference per image is printed (run with
//! `--nocapture`). Values are `k·2/255 − 1`, so one 8-bit level is 2/255 ≈ 0.0078.

use std::path::{Path, PathBuf};

use gemma_media::{
    decode_image_with, pan_and_scan, pixel_values, ImageLimits, PanAndScan, Preprocess,
    ReferenceRoute, RgbImage,
};
use serde_json::Value;

/// One 8-bit level in pixel_values units (mean = std = 0.5).
const LEVEL: f32 = 2.0 / 255.0;
/// The stored references are float16: their rounding near ±1 is at most 2^-12 ≈ 0.00024.
const F16_SLACK: f32 = 3e-4;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/images")
}

fn index() -> Value {
    let text = std::fs::read_to_string(dir().join("reference.json"))
        .expect("fixtures/images/reference.json");
    serde_json::from_str(&text).unwrap()
}

fn read_f16(rel: &str) -> Vec<f32> {
    let bytes = std::fs::read(dir().join(rel)).unwrap();
    bytes
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

fn decode(file: &str, route: ReferenceRoute) -> RgbImage {
    let bytes = std::fs::read(dir().join(file)).unwrap();
    decode_image_with(&bytes, &ImageLimits::default(), route)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn max_diff(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn size(index: &Value) -> u32 {
    index["settings"]["size"]["height"].as_u64().unwrap() as u32
}

/// Every format, JPEG included (decoded by the reference's own libjpeg-turbo decoder, see
/// src/jpeg.rs), must be within one level; the decoded pixels are in fact bit-exact, and the
/// differences seen are f16 rounding.
const TOLERANCE: f32 = LEVEL + F16_SLACK;

#[test]
fn pixel_values_match_the_reference_for_every_image_and_route() {
    let index = index();
    let pre = Preprocess::gemma3_with_size(size(&index));
    let mut compared = 0;
    let mut failures = Vec::new();
    for entry in index["images"].as_array().unwrap() {
        let file = entry["file"].as_str().unwrap();
        for (route_name, route) in [("file", ReferenceRoute::File), ("pil", ReferenceRoute::Pil)] {
            let reference = &entry["references"][route_name];
            let Some(rel) = reference["file"].as_str() else {
                // Not stored: the reference errs (BMP), returns every GIF frame, or gives a
                // 16-bit tensor. We decode all of these; see the dedicated tests below.
                eprintln!(
                    "{file:40} {route_name:4}: no reference ({})",
                    compact(reference)
                );
                continue;
            };
            let ours = pixel_values(&decode(file, route), &pre);
            let diff = max_diff(&ours, &read_f16(rel));
            eprintln!(
                "{file:40} {route_name:4}: max |ours - ref| = {diff:.5} ({:.2} levels)",
                diff / LEVEL
            );
            if diff > TOLERANCE {
                failures.push(format!("{file} ({route_name}): {diff}"));
            }
            compared += 1;
        }
    }
    assert!(compared >= 40, "only {compared} references compared");
    assert!(failures.is_empty(), "beyond tolerance: {failures:?}");
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    s.chars().take(90).collect()
}

#[test]
fn full_size_896_matches() {
    let index = index();
    for entry in index["images"].as_array().unwrap() {
        let Some(rel) = entry["references"]["pil_896"]["file"].as_str() else {
            continue;
        };
        let file = entry["file"].as_str().unwrap();
        let ours = pixel_values(&decode(file, ReferenceRoute::Pil), &Preprocess::gemma3());
        let diff = max_diff(&ours, &read_f16(rel));
        eprintln!(
            "{file:40} 896: max |ours - ref| = {diff:.5} ({:.2} levels)",
            diff / LEVEL
        );
        assert!(diff <= TOLERANCE, "{file} at 896: {diff}");
        return;
    }
    panic!("no 896 reference in fixtures/images/reference.json");
}

#[test]
fn pan_and_scan_matches_crop_counts_and_pixels() {
    let index = index();
    let pre = Preprocess::gemma3_with_size(size(&index));
    let s = &index["pan_and_scan_settings"];
    let settings = PanAndScan {
        min_crop_size: s["pan_and_scan_min_crop_size"].as_u64().unwrap() as u32,
        max_num_crops: s["pan_and_scan_max_num_crops"].as_u64().unwrap() as u32,
        min_ratio_to_activate: s["pan_and_scan_min_ratio_to_activate"].as_f64().unwrap(),
    };
    assert_eq!(
        settings,
        PanAndScan::default(),
        "the fixtures use the published settings"
    );
    let mut checked = 0;
    for entry in index["images"].as_array().unwrap() {
        let pas = &entry["pan_and_scan"];
        if pas.is_null() {
            continue;
        }
        let file = entry["file"].as_str().unwrap();
        let img = decode(file, ReferenceRoute::Pil);
        let crops = pan_and_scan(&img, &settings);
        assert_eq!(
            crops.len() as u64,
            pas["num_crops"].as_u64().unwrap(),
            "{file}: crop count"
        );
        // pixel_values holds the whole image first, then each crop.
        let mut ours = pixel_values(&img, &pre);
        for crop in &crops {
            ours.extend(pixel_values(crop, &pre));
        }
        let diff = max_diff(&ours, &read_f16(pas["file"].as_str().unwrap()));
        eprintln!(
            "{file:40} pan-and-scan, {} crops: max |ours - ref| = {diff:.5}",
            crops.len()
        );
        assert!(diff <= TOLERANCE, "{file} pan-and-scan: {diff}");
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} pan-and-scan references");
}

#[test]
fn cases_the_reference_cannot_store_decode_sensibly() {
    let index = index();
    let pre = Preprocess::gemma3_with_size(size(&index));
    let entry = |name: &str| {
        index["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["file"] == name)
            .unwrap_or_else(|| panic!("{name}"))
            .clone()
    };
    // Animated GIF: the reference's file route returns every frame; its first equals the PIL
    // route, which is what we return on both routes.
    let gif = entry("gif_animated_3frames_64x48.gif");
    assert_eq!(gif["references"]["file"]["first_frame_equals_pil"], true);
    let pil_ref = read_f16(gif["references"]["pil"]["file"].as_str().unwrap());
    let ours = pixel_values(
        &decode("gif_animated_3frames_64x48.gif", ReferenceRoute::File),
        &pre,
    );
    assert!(max_diff(&ours, &pil_ref) <= LEVEL + F16_SLACK);
    // BMP: torchvision refuses it; we decode it (no alpha, so the same pixels as the PIL route).
    let bmp = entry("bmp_rgb_70x50.bmp");
    assert!(bmp["references"]["file"]["error"].is_string());
    let pil_ref = read_f16(bmp["references"]["pil"]["file"].as_str().unwrap());
    let ours = pixel_values(&decode("bmp_rgb_70x50.bmp", ReferenceRoute::File), &pre);
    assert!(max_diff(&ours, &pil_ref) <= LEVEL + F16_SLACK);
    // 16-bit grey: the file route's high byte is a proper 8-bit image, unlike the PIL route's
    // clipping (checked against its reference above) which turns most of it white.
    let file16 = decode("gray16_I16_90x60.png", ReferenceRoute::File);
    let pil16 = decode("gray16_I16_90x60.png", ReferenceRoute::Pil);
    let white = |img: &RgbImage| img.pixels().filter(|p| p.0 == [255; 3]).count();
    assert!(
        white(&pil16) > white(&file16) * 4,
        "{} vs {}",
        white(&pil16),
        white(&file16)
    );
}

#[test]
fn decoded_sizes_and_orientation_match_the_index() {
    for entry in index()["images"].as_array().unwrap() {
        let file = entry["file"].as_str().unwrap();
        let wh: Vec<u32> = entry["size_wh"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            decode(file, ReferenceRoute::Pil).dimensions(),
            (wh[0], wh[1]),
            "{file}"
        );
        // Orientations 5-8 swap width and height once applied (file route).
        let swapped = matches!(entry["exif_orientation"].as_u64(), Some(5..=8));
        let want = if swapped {
            (wh[1], wh[0])
        } else {
            (wh[0], wh[1])
        };
        assert_eq!(
            decode(file, ReferenceRoute::File).dimensions(),
            want,
            "{file}"
        );
    }
}

/// Gemma 3n's processor (`SiglipImageProcessor` with the published settings: bilinear, rescale
/// 1/255 only) on every committed image and route, at 224² and two at the real 768²
/// (fixtures/images/gemma3n, scripts/make_gemma3n_image_fixtures.py): within 2/255.
#[test]
fn gemma3n_pixel_values_match_the_reference() {
    let dir3n = dir().join("gemma3n");
    let text = std::fs::read_to_string(dir3n.join("reference.json"))
        .expect("fixtures/images/gemma3n/reference.json");
    let index: Value = serde_json::from_str(&text).unwrap();
    let published = &index["published_settings"];
    assert_eq!(published["do_normalize"], false);
    assert_eq!(published["size"]["height"], 768);
    let mut compared = 0;
    let mut at_768 = 0;
    let mut failures = Vec::new();
    for entry in index["images"].as_array().unwrap() {
        let file = entry["file"].as_str().unwrap();
        for (size, refs) in entry["references"].as_object().unwrap() {
            let size: u32 = size.parse().unwrap();
            let pre = if size == 768 {
                Preprocess::gemma3n()
            } else {
                Preprocess::gemma3n_with_size(size)
            };
            for (route_name, route) in
                [("file", ReferenceRoute::File), ("pil", ReferenceRoute::Pil)]
            {
                let Some(rel) = refs[route_name]["file"].as_str() else {
                    continue;
                };
                let reference: Vec<f32> = std::fs::read(dir3n.join(rel))
                    .unwrap()
                    .iter()
                    .map(|&v| v as f32 / 255.0)
                    .collect();
                let ours = pixel_values(&decode(file, route), &pre);
                let diff = max_diff(&ours, &reference);
                eprintln!(
                    "{file:40} {route_name:4} {size}: max |ours - ref| = {diff:.5} ({:.2} levels)",
                    diff * 255.0
                );
                if diff > 2.0 / 255.0 + 1e-6 {
                    failures.push(format!("{file} ({route_name}, {size}): {diff}"));
                }
                compared += 1;
                at_768 += usize::from(size == 768);
            }
        }
    }
    assert!(compared >= 40, "only {compared} references compared");
    assert!(at_768 >= 2, "only {at_768} references at 768");
    assert!(failures.is_empty(), "beyond 2/255: {failures:?}");
}
