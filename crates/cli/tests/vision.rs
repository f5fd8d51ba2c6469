//! The CLI with images on the tiny Gemma 3 vision fixture (fixtures/gemma3_vision_tiny, from
//! transformers): `logits --image --ids` fills the image-token runs in order and matches the
//! reference's last-position logits (plain, three images, pan-and-scan, and a text GGUF with
//! its mmproj); `run --image` and `--video` work end to end; bad images and misuse end in one
//! clear error line.

mod common;

use std::path::PathBuf;

use common::{assert_clean_error, gemma, stderr, stdout, TempDir};
use serde_json::Value;

fn fixture(name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    dir.join(name).to_string_lossy().into_owned()
}

fn vision(name: &str) -> String {
    fixture(&format!("gemma3_vision_tiny/{name}"))
}

fn case(name: &str) -> Value {
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(vision("reference.json")).unwrap()).unwrap();
    r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

/// The reference's last-position logits of a case.
fn last_logits(case: &Value, key: &str) -> Vec<f32> {
    let desc = &case[key];
    let bytes = std::fs::read(vision(desc["file"].as_str().unwrap())).unwrap();
    let vocab = desc["shape"][1].as_u64().unwrap() as usize;
    let all: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    all[all.len() - vocab..].to_vec()
}

fn ids_arg(case: &Value) -> String {
    let ids: Vec<String> = case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    ids.join(",")
}

/// `gemma logits` with `extra` arguments → [(id, logit)].
fn top5(extra: &[&str]) -> Vec<(usize, f32)> {
    let mut args = vec!["logits", "-q", "--cache-type", "f32", "--top", "5"];
    args.extend_from_slice(extra);
    let out = gemma(&args, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    json["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_u64().unwrap() as usize,
                p[1].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

fn assert_matches(top: &[(usize, f32)], reference: &[f32], what: &str) {
    let mut order: Vec<usize> = (0..reference.len()).collect();
    order.sort_by(|&a, &b| reference[b].total_cmp(&reference[a]));
    for (rank, &(id, logit)) in top.iter().enumerate() {
        assert_eq!(id, order[rank], "{what}: rank {rank}");
        assert!(
            (logit - reference[id]).abs() < 1e-3,
            "{what}: logit of {id}: {logit} vs {}",
            reference[id]
        );
    }
}

#[test]
fn logits_with_images_fill_the_image_runs_in_order() {
    for (name, extra) in [
        ("one_image", vec![]),
        ("three_images", vec![]),
        ("pan_and_scan", vec!["--pan-and-scan"]),
    ] {
        let c = case(name);
        let ids = ids_arg(&c);
        let model = vision("hf");
        let mut args = vec!["--model", model.as_str(), "--ids", ids.as_str()];
        let images: Vec<String> = c["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| vision(i.as_str().unwrap()))
            .collect();
        for image in &images {
            args.extend(["--image", image.as_str()]);
        }
        args.extend(extra.iter().copied());
        assert_matches(&top5(&args), &last_logits(&c, "logits"), name);
    }
}

#[test]
fn logits_from_a_text_gguf_and_its_mmproj() {
    let c = case("one_image");
    let ids = ids_arg(&c);
    let (model, mmproj, image) = (
        vision("text.gguf"),
        vision("mmproj.gguf"),
        vision("img_a_97x73.png"),
    );
    let top = top5(&[
        "--model", &model, "--mmproj", &mmproj, "--image", &image, "--ids", &ids,
    ]);
    assert_matches(&top, &last_logits(&c, "logits_f16proj"), "gguf + mmproj");
}

#[test]
fn run_with_an_image_and_with_a_video() {
    let model = vision("hf");
    let image = vision("img_a_97x73.png");
    let greedy = ["--temp", "0", "-n", "4", "--seed", "1"];
    let mut args = vec!["run", "--model", &model, "--image", &image];
    args.extend(greedy);
    args.push("Describe this image.");
    let first = gemma(&args, None);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("encoded in"), "{}", stderr(&first));
    let again = gemma(&args, None);
    assert_eq!(
        stdout(&first),
        stdout(&again),
        "greedy output is deterministic"
    );

    // A 3-frame GIF as a video: three image blocks, each after its timestamp.
    let gif = fixture("images/gif_animated_3frames_64x48.gif");
    let out = gemma(
        &[
            "logits",
            "-q",
            "--model",
            &model,
            "--video",
            &gif,
            "--fps",
            "10",
            "What happens?",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let ids: Vec<u64> = json["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let boi = ids.iter().filter(|&&i| i == 255).count();
    let image_tokens = ids.iter().filter(|&&i| i == 257).count();
    assert_eq!((boi, image_tokens), (3, 3 * 16), "ids: {ids:?}");
}

#[test]
fn bad_images_and_misuse_are_clear_errors() {
    let tmp = TempDir::new("vision-bad");
    let model = vision("hf");
    let image = vision("img_a_97x73.png");
    let c = case("one_image");
    let ids = ids_arg(&c);

    // A truncated PNG.
    let bytes = std::fs::read(&image).unwrap();
    let cut = tmp.0.join("cut.png");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = gemma(
        &[
            "logits",
            "-q",
            "--model",
            &model,
            "--image",
            cut.to_str().unwrap(),
            "--ids",
            &ids,
        ],
        None,
    );
    assert_clean_error(&out, &["cut.png"]);

    // A header claiming 50000×50000 pixels: refused before decoding.
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&50_000u32.to_be_bytes());
    ihdr.extend_from_slice(&50_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut huge = b"\x89PNG\r\n\x1a\n".to_vec();
    for chunk in [
        ihdr,
        b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01".to_vec(),
        b"IEND".to_vec(),
    ] {
        huge.extend_from_slice(&(chunk.len() as u32 - 4).to_be_bytes());
        huge.extend_from_slice(&chunk);
        huge.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    let huge_path = tmp.0.join("huge.png");
    std::fs::write(&huge_path, &huge).unwrap();
    let out = gemma(
        &[
            "logits",
            "-q",
            "--model",
            &model,
            "--image",
            huge_path.to_str().unwrap(),
            "--ids",
            &ids,
        ],
        None,
    );
    assert_clean_error(&out, &["50000x50000"]);

    // Runs and images disagree: two images for one run.
    let out = gemma(
        &[
            "logits", "-q", "--model", &model, "--image", &image, "--image", &image, "--ids", &ids,
        ],
        None,
    );
    assert_clean_error(&out, &["image token"]);

    // More views than --max-images allows (pan-and-scan crops count).
    let wide = vision("img_c_800x300.png");
    let out = gemma(
        &[
            "logits",
            "-q",
            "--model",
            &model,
            "--image",
            &wide,
            "--pan-and-scan",
            "--max-images",
            "2",
            "Look",
        ],
        None,
    );
    assert_clean_error(&out, &["--max-images"]);

    // An image for a text-only model.
    let out = gemma(
        &[
            "logits",
            "-q",
            "--model",
            &fixture("gemma3_tiny"),
            "--image",
            &image,
            "--ids",
            "2,5",
        ],
        None,
    );
    assert_clean_error(&out, &["takes no images"]);
}

/// PNG's chunk checksum (CRC-32, polynomial 0xEDB88320).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
