//! The CLI with Gemma 3n images (fixtures/gemma3n_vision_tiny, from transformers):
//! `logits --ids --image --audio` fills the image and audio runs in order and matches the
//! reference's last-position logits; `run --image A --audio B` puts the media in argument order
//! and generates; `info` shows the tower; misuse ends in one clear error line.

mod common;

use std::path::PathBuf;

use common::{assert_clean_error, gemma, stderr, stdout};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn model() -> String {
    fixtures()
        .join("gemma3n_vision_tiny")
        .to_string_lossy()
        .into_owned()
}

fn path(rel: &str) -> String {
    fixtures().join(rel).to_string_lossy().into_owned()
}

fn reference() -> Value {
    let text =
        std::fs::read_to_string(fixtures().join("gemma3n_vision_tiny/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn last_logits(prompt: &Value, vocab: usize) -> Vec<f32> {
    let bytes = std::fs::read(
        fixtures()
            .join("gemma3n_vision_tiny")
            .join(prompt["logits"].as_str().unwrap()),
    )
    .unwrap();
    let all: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    all[all.len() - vocab..].to_vec()
}

fn ids_arg(prompt: &Value) -> String {
    prompt["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn logits_with_image_and_audio_match_the_reference() {
    let r = reference();
    let vocab = r["vocab_size"].as_u64().unwrap() as usize;
    let prompt = &r["prompts"]["image_audio_text"];
    let want = last_logits(prompt, vocab);
    let out = gemma(
        &[
            "logits",
            "-q",
            "--model",
            &model(),
            "--cache-type",
            "f32",
            "--top",
            "5",
            "--audio",
            &path("audio/speech_16k_mono.wav"),
            "--image",
            &path("images/rgb_300x200.png"),
            "--ids",
            &ids_arg(prompt),
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let mut order: Vec<usize> = (0..want.len()).collect();
    order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
    for (rank, p) in json["top"].as_array().unwrap().iter().enumerate() {
        let (id, logit) = (
            p[0].as_u64().unwrap() as usize,
            p[1].as_f64().unwrap() as f32,
        );
        assert_eq!(id, order[rank], "rank {rank}");
        assert!((logit - want[id]).abs() < 1e-2, "{logit} vs {}", want[id]);
    }
}

/// `gemma logits PROMPT --image A --audio B`: the slots go before the text in argument order,
/// so `--image --audio` and `--audio --image` are different prompts; the image-first one is the
/// reference's `<image><audio>` layout.
#[test]
fn media_go_into_the_prompt_in_argument_order() {
    let run = |first: &str, a: &str, second: &str, b: &str| {
        let out = gemma(
            &[
                "logits",
                "-q",
                "--model",
                &model(),
                "--cache-type",
                "f32",
                first,
                a,
                second,
                b,
                "Hi",
            ],
            None,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
        json["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect::<Vec<_>>()
    };
    let (img, wav) = (
        path("images/rgb_300x200.png"),
        path("audio/speech_16k_mono.wav"),
    );
    let image_first = run("--image", &img, "--audio", &wav);
    let audio_first = run("--audio", &wav, "--image", &img);
    let r = reference();
    let (image_id, audio_id) = (
        r["image_token_id"].as_u64().unwrap() as u32,
        r["audio_token_id"].as_u64().unwrap() as u32,
    );
    let first = |ids: &[u32]| {
        ids.iter()
            .find(|&&i| i == image_id || i == audio_id)
            .copied()
            .unwrap()
    };
    assert_eq!(first(&image_first), image_id);
    assert_eq!(first(&audio_first), audio_id);
}

/// (Two images and a clip would pass the tiny model's 512-token trained context.)
#[test]
fn run_with_image_and_audio_generates() {
    let out = gemma(
        &[
            "run",
            "-q",
            "--model",
            &model(),
            "--temp",
            "0",
            "-n",
            "4",
            "--image",
            &path("images/rgb_300x200.png"),
            "--audio",
            &path("audio/speech_16k_mono.wav"),
            "What is here?",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn info_shows_the_vision_tower() {
    let out = gemma(&["info", "--model", &model()], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("MobileNet-V5 tower"), "{text}");
    assert!(text.contains("read on the first image"), "{text}");
}

#[test]
fn misuse_is_a_clean_error() {
    let r = reference();
    let ids = ids_arg(&r["prompts"]["image_only"]);
    let model = model();
    let img = path("images/rgb_300x200.png");
    let audio_model = path("gemma3n_audio_tiny");
    for (args, needle) in [
        // Image ids without an image.
        (
            vec!["logits", "-q", "--model", &model, "--ids", &ids],
            "no image",
        ),
        // Two images for one run.
        (
            vec![
                "logits", "-q", "--model", &model, "--image", &img, "--image", &img, "--ids", &ids,
            ],
            "run(s) of the image token",
        ),
        (
            vec![
                "logits",
                "-q",
                "--model",
                &model,
                "--image",
                &img,
                "--pan-and-scan",
                "Hi",
            ],
            "pan-and-scan",
        ),
        (
            vec![
                "logits",
                "-q",
                "--model",
                &audio_model,
                "--image",
                &img,
                "Hi",
            ],
            "takes no images",
        ),
    ] {
        let out = gemma(&args, None);
        assert_clean_error(&out, &[needle]);
    }
}

/// `gemma chat`: `/audio` then `/image` go into the next message in that order.
#[test]
fn chat_takes_audio_and_images_in_order() {
    let stdin = format!(
        "/audio {}\n/image {}\nWho is speaking?\n",
        path("audio/speech_16k_mono.wav"),
        path("images/rgb_300x200.png")
    );
    let out = gemma(
        &["chat", "-q", "--model", &model(), "--temp", "0", "-n", "3"],
        Some(&stdin),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("image added"), "{}", stderr(&out));
}

/// `gemma run --video` with a clip that has sound: a frame and its soundtrack segment (the
/// tiny model's 512-token context holds one frame with 3 s of sound).
#[test]
fn run_with_a_video_and_its_sound() {
    let ok = std::process::Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: ffmpeg is not on the PATH");
        return;
    }
    let dir = common::TempDir::new("gemma3n-video");
    let clip = dir.path().join("clip.mp4");
    let status = std::process::Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i"])
        .arg("testsrc=size=96x64:rate=5:duration=3")
        .args([
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=300:duration=3:sample_rate=16000",
        ])
        .args(["-shortest", "-pix_fmt", "yuv420p"])
        .arg(&clip)
        .status()
        .unwrap();
    assert!(status.success());
    let clip = clip.to_string_lossy().into_owned();
    let model = model();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "logits",
            "-q",
            "--model",
            &model,
            "--video",
            &clip,
            "--max-frames",
            "1",
        ];
        args.extend_from_slice(extra);
        args.push("What happens?");
        let out = gemma(&args, None);
        assert!(out.status.success(), "{}", stderr(&out));
        let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
        json["ids"].as_array().unwrap().len()
    };
    let with_sound = run(&[]);
    let silent = run(&["--no-video-audio"]);
    assert!(with_sound > silent + 16, "{with_sound} vs {silent} tokens");
}
