//! Gemma 3n with images through the engine, against transformers' `Gemma3nForConditionalGeneration`
//! (fixtures/gemma3n_vision_tiny, made by scripts/make_gemma3n_vision_fixtures.py): from the image
//! files to the logits at every position (our decoding and preprocessing, the MobileNet-V5 tower,
//! `embed_vision`'s soft and hard paths, prompt text as `Gemma3nProcessor` writes it) for an
//! image-only prompt, two images, and an image, an audio clip and text interleaved; the tower read
//! only when an image arrives; video with its soundtrack; `--vision-cache`; and bad input.

use std::path::PathBuf;

use gemma_engine::gemma_media::{Frame, RgbImage};
use gemma_engine::gemma_models::{CacheType, Logits, SoftTokens};
use gemma_engine::gemma_tokenizer::ChatMessage;
use gemma_engine::vision::{VisionFamily, IMAGE_MARKER};
use gemma_engine::{
    load, AudioOptions, ImageOptions, LoadOptions, LoadedModel, PreparedAudio, PreparedImage,
    SamplingParams, Session, SoftSpan,
};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture_dir() -> PathBuf {
    root().join("fixtures/gemma3n_vision_tiny")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load_with(opts: LoadOptions) -> LoadedModel {
    load(
        Some(&fixture_dir()),
        &LoadOptions {
            cache_type: CacheType::F32,
            ..opts
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

fn loaded() -> LoadedModel {
    load_with(LoadOptions::default())
}

fn image(loaded: &LoadedModel, name: &str) -> PreparedImage {
    let bytes = std::fs::read(root().join("fixtures/images").join(name)).unwrap();
    loaded
        .prepare_image(&bytes, &ImageOptions::default())
        .unwrap()
}

fn clip(loaded: &LoadedModel, path: &str) -> PreparedAudio {
    let bytes = std::fs::read(root().join(path)).unwrap();
    loaded
        .prepare_audio(&bytes, &AudioOptions::default())
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn read_f32(rel: &str) -> Vec<f32> {
    std::fs::read(fixture_dir().join(rel))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
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
    let mut cache = loaded.model.new_cache(1024).unwrap();
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

/// The fixture's prompt `name`, built as the engine builds chat prompts: the chat template over
/// the content (one marker per image or clip, in order), markers expanded, tokenized, media placed.
fn engine_prompt(loaded: &LoadedModel, prompt: &Value) -> (Vec<u32>, Vec<SoftSpan>) {
    let mut content = String::new();
    let mut images = Vec::new();
    let mut audio = Vec::new();
    for part in prompt["content"].as_array().unwrap() {
        match part["type"].as_str().unwrap() {
            "image" => {
                images.push(image(loaded, part["image"].as_str().unwrap()));
                content.push_str(IMAGE_MARKER);
            }
            "audio" => {
                audio.push(clip(loaded, "fixtures/audio/speech_16k_mono.wav"));
                content.push_str(gemma_engine::audio::AUDIO_MARKER);
            }
            "text" => content.push_str(part["text"].as_str().unwrap().trim()),
            other => panic!("part type {other}"),
        }
    }
    let user = ChatMessage {
        role: "user".into(),
        content,
    };
    let rendered = loaded.render_chat(None, &[user]).unwrap();
    loaded
        .encode_with_media(&rendered, &images, &audio, false)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Image-only, two images, and image + audio + text: ids equal the processor's and the logits at
/// every position are within 1e-2 of transformers', from our own decoding and preprocessing of
/// the image files (and of the WAV).
#[test]
fn prompts_match_the_reference_logits() {
    let loaded = loaded();
    let vision = loaded.vision().expect("a Gemma 3n folder with its tower");
    assert_eq!(vision.family, VisionFamily::Gemma3n);
    assert!(!vision.is_loaded(), "the tower is read on the first image");
    let r = reference();
    for (name, prompt) in r["prompts"].as_object().unwrap() {
        let (ids_ours, soft) = engine_prompt(&loaded, prompt);
        assert_eq!(ids_ours, ids(&prompt["input_ids"]), "{name}: ids");
        // `<end_of_image>` goes through embed_vision's hard path; image runs are causal.
        let eoi = r["eoi_token_id"].as_u64().unwrap() as u32;
        let n_eoi = ids_ours.iter().filter(|&&i| i == eoi).count();
        assert!(n_eoi >= 1);
        assert!(soft.iter().all(|s| !s.bidirectional));
        let logits = all_logits(&loaded, &ids_ours, &soft);
        let want = read_f32(prompt["logits"].as_str().unwrap());
        let d = max_diff(&logits, &want);
        eprintln!("{name}: {} tokens, logits max diff {d:.2e}", ids_ours.len());
        assert!(d < 1e-2, "{name}: logits differ by {d}");
    }
    assert!(vision.is_loaded());
}

/// The same logits through a session fed in chunks of the batch size (the seam the CLI, server
/// and Python package use), and greedy generation runs.
#[test]
fn session_prefill_and_greedy_generation() {
    let loaded = load_with(LoadOptions {
        batch_size: 37,
        ..LoadOptions::default()
    });
    let r = reference();
    let prompt = &r["prompts"]["image_audio_text"];
    let (ids, soft) = engine_prompt(&loaded, prompt);
    let want = read_f32(prompt["logits"].as_str().unwrap());
    let vocab = loaded.model.vocab_size();
    let mut session = Session::new(&loaded, 1024).unwrap();
    let last = session.evaluate(&ids, &soft).unwrap().to_vec();
    let d = max_diff(&last, &want[want.len() - vocab..]);
    assert!(
        d < 1e-2,
        "last logits through a chunked session differ by {d}"
    );
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 8,
        ..SamplingParams::default()
    };
    let mut session = Session::new(&loaded, 1024).unwrap();
    let stats = session
        .generate_with(&ids, &soft, &params, &mut |_| true)
        .unwrap();
    assert!(stats.generated_tokens >= 1);
    // Greedy's first token is the reference's argmax at the last position.
    let tail = &want[want.len() - vocab..];
    let sampleable = loaded.model.sampleable_vocab();
    let argmax = (0..sampleable)
        .max_by(|&a, &b| tail[a].total_cmp(&tail[b]))
        .unwrap() as u32;
    assert_eq!(stats.tokens[0], argmax);
}

#[test]
fn text_only_prompts_never_read_the_towers() {
    let loaded = loaded();
    let ids = [2u32, 10, 20, 30];
    let soft = loaded.place_media(&ids, &[], &[]).unwrap();
    assert!(soft.is_empty());
    let mut session = Session::new(&loaded, 64).unwrap();
    session.evaluate(&ids, &soft).unwrap();
    let (text_ids, soft) = loaded
        .encode_with_media("<start_of_turn>user\nHello<end_of_turn>\n", &[], &[], false)
        .unwrap();
    assert!(soft.is_empty());
    session.reset();
    session.evaluate(&text_ids, &soft).unwrap();
    assert!(!loaded.vision().unwrap().is_loaded());
    assert!(!loaded.hearing().unwrap().is_loaded());
}

/// The block for one image, as `Gemma3nProcessor.full_image_sequence` writes it.
#[test]
fn image_text_is_the_processors() {
    let loaded = loaded();
    let img = image(&loaded, "rgb_300x200.png");
    let expanded = loaded
        .vision()
        .unwrap()
        .expand_markers(&loaded.file, &format!("A{IMAGE_MARKER}B"), &[img])
        .unwrap();
    let block = format!(
        "\n\n<start_of_image>{}<end_of_image>\n\n",
        "<image_soft_token>".repeat(256)
    );
    assert_eq!(expanded, format!("A{block}B"));
    assert!(
        !loaded.vision().unwrap().is_loaded(),
        "no tower needed for text"
    );
}

/// `gemma logits --ids` style: image runs and audio runs of an id list filled in order, and
/// the reference's logits at the last position.
#[test]
fn id_runs_fill_in_order() {
    let loaded = loaded();
    let r = reference();
    let prompt = &r["prompts"]["image_audio_text"];
    let prompt_ids = ids(&prompt["input_ids"]);
    let images = [image(&loaded, "rgb_300x200.png")];
    let audio = [clip(&loaded, "fixtures/audio/speech_16k_mono.wav")];
    let soft = loaded.place_media(&prompt_ids, &images, &audio).unwrap();
    // One image run, one audio run, `<end_of_image>` and `<end_of_audio>` hard embeddings.
    assert_eq!(soft.len(), 4);
    let logits = all_logits(&loaded, &prompt_ids, &soft);
    let want = read_f32(prompt["logits"].as_str().unwrap());
    assert!(max_diff(&logits, &want) < 1e-2);
    // Too few images for the runs is an error, not a panic.
    let two = ids(&r["prompts"]["two_images"]["input_ids"]);
    let err = loaded.place_media(&two, &images, &[]).unwrap_err();
    assert!(
        format!("{err:#}").contains("run(s) of the image token"),
        "{err:#}"
    );
}

/// `--vision-cache`: a frame equal to or within noise of the last encoded one reuses its
/// encoding; a changed frame is encoded again.
#[test]
fn vision_cache_reuses_unchanged_frames() {
    let cached = load_with(LoadOptions {
        vision_cache: Some(gemma_engine::vision::DEFAULT_VISION_CACHE_THRESHOLD),
        ..LoadOptions::default()
    });
    let base = gemma_engine::gemma_media::decode_image(
        &std::fs::read(root().join("fixtures/images/rgb_300x200.png")).unwrap(),
        &Default::default(),
    )
    .unwrap();
    // ±1 level of noise: a still camera.
    let mut noisy = base.clone();
    for (i, v) in noisy.iter_mut().enumerate() {
        *v = if i % 3 == 0 {
            v.saturating_add(1)
        } else {
            v.saturating_sub(1)
        };
    }
    // A different scene.
    let changed = RgbImage::from_fn(base.width(), base.height(), |x, y| {
        gemma_engine::gemma_media::Rgb([(x % 256) as u8, (y % 256) as u8, 200])
    });
    let frames: Vec<Frame> = [base.clone(), noisy, changed, base.clone()]
        .into_iter()
        .enumerate()
        .map(|(i, image)| Frame {
            image,
            timestamp_secs: i as f64,
        })
        .collect();
    let (views, _) = cached
        .prepare_frames(&frames, &ImageOptions::default())
        .unwrap();
    let vision = cached.vision().unwrap();
    let enc: Vec<_> = views
        .iter()
        .map(|v| vision.encode(&cached.file, v).unwrap().remove(0))
        .collect();
    let reuse = vision.reuse.as_ref().unwrap();
    // Frame 1 (noise) reused frame 0's encoding; frame 2 was encoded; frame 3 (the first scene
    // again, far from frame 2) was encoded again.
    assert_eq!(reuse.reused(), 1);
    assert_eq!(enc[1], enc[0]);
    assert_ne!(enc[2], enc[0]);
    assert!(max_diff(&enc[3], &enc[0]) < 1e-5);
    // Without the cache, the noisy frame has an encoding of its own (close, not equal).
    let plain = loaded();
    let (views, _) = plain
        .prepare_frames(&frames[..2], &ImageOptions::default())
        .unwrap();
    let v = plain.vision().unwrap();
    let a = v.encode(&plain.file, &views[0]).unwrap().remove(0);
    let b = v.encode(&plain.file, &views[1]).unwrap().remove(0);
    assert_ne!(a, b);
    assert_eq!(a, enc[0]);
}

fn have_ffmpeg() -> bool {
    std::process::Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A 30-second clip with sound: frames sampled at Gemma 3n's defaults, the soundtrack cut at the
/// frames' times, each segment right after its frame; the prompt at the real sizes (256 image
/// tokens, 188 audio tokens) fits the default 4096-token context with room to answer.
#[test]
fn video_with_sound_fits_the_default_context() {
    if !have_ffmpeg() {
        eprintln!("skipped: ffmpeg is not on the PATH");
        return;
    }
    let dir = std::env::temp_dir().join(format!("gemma3n-video-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clip_path = dir.join("clip.mp4");
    let status = std::process::Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i"])
        .arg("testsrc=size=160x120:rate=10:duration=30")
        .args([
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=30:sample_rate=16000",
        ])
        .args(["-shortest", "-pix_fmt", "yuv420p"])
        .arg(&clip_path)
        .status()
        .unwrap();
    assert!(status.success());
    let loaded = loaded();
    let source = gemma_engine::gemma_media::VideoSource::open(&clip_path, 1 << 30).unwrap();
    let sampling = gemma_engine::gemma_media::FrameSampling {
        max_frames: loaded.default_max_frames(),
        ..Default::default()
    };
    let frames =
        gemma_engine::gemma_media::sample_frames(&source, &sampling, &Default::default()).unwrap();
    assert_eq!(frames.len(), 6, "one frame per 5 s");
    let sound = gemma_engine::gemma_media::soundtrack(&source, &Default::default())
        .unwrap()
        .expect("the clip has sound");
    assert!((sound.seconds - 30.0).abs() < 0.2, "{} s", sound.seconds);
    let video = loaded
        .prepare_video(&frames, Some(&sound.samples_16k), &ImageOptions::default())
        .unwrap();
    assert_eq!(video.images.len(), 6);
    assert_eq!(video.audio.len(), 6, "one sound segment per frame");
    assert!(video
        .text
        .starts_with(&format!("00:00 {IMAGE_MARKER}<audio_soft_token>00:05 ")));
    for clip in &video.audio {
        assert!((clip.seconds - 5.0).abs() < 0.1, "{} s", clip.seconds);
    }
    let user = ChatMessage {
        role: "user".into(),
        content: format!("{}What happens in this video?", video.text),
    };
    let rendered = loaded.render_chat(None, &[user]).unwrap();
    let (ids, soft) = loaded
        .encode_with_media(&rendered, &video.images, &video.audio, false)
        .unwrap();
    // The fixture's audio window is 16 tokens (2.56 s), so a 5 s segment is several windows
    // here; the real models' window is 188 tokens (30 s): one per segment. Its images are 256
    // tokens already, as the real ones.
    let windows: usize = video.audio.iter().map(|a| a.windows.len()).sum();
    assert_eq!(
        soft.len(),
        6 + 6 + 2 * windows,
        "runs and end-of-media embeddings"
    );
    // Swapping each fixture window's audio tokens for one 188-token window per segment, and
    // keeping the text around every fixture window (more windows than the real model's), bounds
    // the real prompt from above.
    let h = loaded.hearing().unwrap();
    let real = ids.len() - windows * h.config.soft_tokens_per_clip + video.audio.len() * 188;
    eprintln!("30 s video at real sizes: at most {real} prompt tokens");
    assert!(
        real + 1024 <= 4096,
        "{real} tokens leave less than 1024 of the default context to answer"
    );
    let mut session = Session::new(&loaded, 4096).unwrap();
    session.evaluate(&ids, &soft).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Broken and hostile images, images for a model without a tower, and too many images for the
/// context: clear errors, never a panic.
#[test]
fn bad_images_are_clear_errors() {
    let loaded = loaded();
    let opts = ImageOptions::default();
    let e = loaded
        .prepare_image(b"\x89PNG\r\n\x1a\nbroken", &opts)
        .unwrap_err();
    eprintln!("broken: {e:#}");
    // A decompression bomb: a PNG header claiming 100 000 × 100 000 pixels.
    let bomb = png_header(100_000, 100_000);
    let e = loaded.prepare_image(&bomb, &opts).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("pixels") || msg.contains("large"), "{msg}");
    // Pan-and-scan is Gemma 3's.
    let png = std::fs::read(root().join("fixtures/images/rgb_300x200.png")).unwrap();
    let e = loaded
        .prepare_image(
            &png,
            &ImageOptions {
                pan_and_scan: true,
                ..ImageOptions::default()
            },
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("pan-and-scan"));
    // Too many images for the context: refused before the tower runs, with the token count.
    let img = image(&loaded, "rgb_300x200.png");
    let images = vec![img; 20];
    let text = format!("{}Describe.", IMAGE_MARKER.repeat(20));
    let e = loaded
        .encode_with_media_in(&text, &images, &[], false, 4096)
        .unwrap_err();
    assert!(format!("{e:#}").contains("context size is 4096"), "{e:#}");
    assert!(
        !loaded.vision().unwrap().is_loaded(),
        "refused before the tower runs"
    );
    // Without the early check, the session refuses it all the same.
    let (ids, soft) = loaded
        .encode_with_media(&text, &images, &[], false)
        .unwrap();
    let mut session = Session::new(&loaded, 4096).unwrap();
    let e = session.evaluate(&ids, &soft).unwrap_err();
    assert!(format!("{e:#}").contains("context size"), "{e:#}");
    // A model without a vision tower (the audio fixture: vision_config, no tower tensors).
    let audio_only = load(
        Some(&root().join("fixtures/gemma3n_audio_tiny")),
        &LoadOptions::default(),
    )
    .unwrap();
    assert!(audio_only.vision.is_none());
    let e = audio_only.prepare_image(&png, &opts).unwrap_err();
    assert!(format!("{e:#}").contains("takes no images"), "{e:#}");
}

fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(b"IHDR");
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut chunk = |body: &[u8]| {
        out.extend_from_slice(&(body.len() as u32 - 4).to_be_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(&crc32(body).to_be_bytes());
    };
    chunk(&ihdr);
    // A few bytes of zlib data (an empty stream): the header alone claims the pixels.
    chunk(b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01");
    chunk(b"IEND");
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
