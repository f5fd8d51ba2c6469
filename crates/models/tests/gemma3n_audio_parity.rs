//! Parity with transformers on a tiny random-weight `Gemma3nForConditionalGeneration` with an
//! audio tower of the real block structure (fixtures from
//! `scripts/make_gemma3n_audio_fixtures.py`), fed the reference feature extractor's log-mel of
//! the committed clips (`fixtures/audio`): the encoder's output and the projected soft tokens
//! within 1e-4, logits at every position within 1e-2 (f32 cache) for an audio-only prompt and a
//! clip between text; and the stream: the same clip pushed in pieces of 16, 48 and 100 mel
//! frames (160 ms, 480 ms, 1 s) gives the whole-clip tokens within 1e-4.

use std::path::PathBuf;

use gemma_formats::HfFolder;
use gemma_models::{load_model, Gemma3nAudio, KvCache, Logits, SoftTokens};
use serde_json::Value;

const ENCODER_TOLERANCE: f32 = 1e-4;
const LOGITS_TOLERANCE: f32 = 1e-2;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture_dir() -> PathBuf {
    root().join("fixtures/gemma3n_audio_tiny")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).expect("reference");
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn features(clip: &Value) -> Vec<f32> {
    let path = root()
        .join("fixtures/audio")
        .join(clip["features"].as_str().unwrap());
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let shape = &clip["features_shape"];
    assert_eq!(
        values.len(),
        (shape[0].as_u64().unwrap() * shape[1].as_u64().unwrap()) as usize
    );
    values
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn audio() -> Gemma3nAudio {
    let folder = HfFolder::open(&fixture_dir()).expect("fixture folder");
    Gemma3nAudio::from_hf(&folder).expect("audio tower")
}

#[test]
fn encoder_and_soft_tokens_match_transformers() {
    let audio = audio();
    let reference = reference();
    for clip in reference["clips"].as_array().unwrap() {
        let name = clip["name"].as_str().unwrap();
        let encoded = audio.encoder().encode(&features(clip)).unwrap();
        let want = floats(&clip["encoder"]);
        let diff = max_diff(&encoded, &want);
        eprintln!("{name}: encoder max diff {diff:.2e}");
        assert!(
            diff < ENCODER_TOLERANCE,
            "{name}: encoder differs by {diff}"
        );
        let soft = audio.project(&encoded);
        let diff = max_diff(&soft, &floats(&clip["soft_tokens"]));
        assert!(
            diff < ENCODER_TOLERANCE,
            "{name}: soft tokens differ by {diff}"
        );
    }
}

#[test]
fn streamed_chunks_give_the_whole_clip_tokens() {
    let audio = audio();
    let bins = audio.config().usm.input_feat_size;
    let reference = reference();
    for clip in reference["clips"].as_array().unwrap() {
        let name = clip["name"].as_str().unwrap();
        let feats = features(clip);
        let whole = audio.encoder().encode(&feats).unwrap();
        for frames in [16, 48, 100, 1, 7] {
            let mut s = audio.stream();
            let mut got = Vec::new();
            for chunk in feats.chunks(frames * bins) {
                got.extend(s.push(chunk).unwrap());
            }
            got.extend(s.finish().unwrap());
            let diff = max_diff(&got, &whole);
            assert!(
                diff < ENCODER_TOLERANCE,
                "{name}: chunks of {frames} frames differ by {diff}"
            );
        }
    }
}

#[test]
fn stream_yields_each_token_once_its_frames_are_in() {
    // Token k is conformer frame 4k, SSCP row 4k, which reads mel rows up to 16k + 6: with
    // 160 ms pushes each token comes out at most one push after its own 16 frames.
    let audio = audio();
    let bins = audio.config().usm.input_feat_size;
    let reference = reference();
    let clip = &reference["clips"][0];
    let feats = features(clip);
    let mut s = audio.stream();
    let mut seen = 0;
    for (i, chunk) in feats.chunks(16 * bins).enumerate() {
        seen += s.push(chunk).unwrap().len();
        let tokens = seen / audio.config().usm.hidden_size;
        assert!(tokens + 1 >= i, "push {i}: only {tokens} tokens out");
        assert_eq!(tokens, s.tokens_out());
    }
    assert!(s.push(&[]).unwrap().is_empty());
    s.finish().unwrap();
    assert!(
        s.push(&feats[..bins]).is_err(),
        "a finished stream takes no more audio"
    );
    assert!(
        audio.stream().finish().is_err(),
        "an empty clip is an error"
    );
    assert!(audio.stream().push(&feats[..bins - 1]).is_err());
    let mut bad = feats[..bins].to_vec();
    bad[3] = f32::NAN;
    assert!(audio.stream().push(&bad).is_err());
}

#[test]
fn logits_match_transformers_for_audio_prompts() {
    let audio = audio();
    let folder = HfFolder::open(&fixture_dir()).unwrap();
    let model = load_model(&gemma_formats::ModelFile::Hf(folder)).expect("decoder");
    let c = audio.config().clone();
    let reference = reference();
    let vocab = reference["vocab_size"].as_u64().unwrap() as usize;
    for clip in reference["clips"].as_array().unwrap() {
        let name = clip["name"].as_str().unwrap();
        let clip_embeds = audio.encode_clip(&features(clip)).unwrap();
        for (kind, prompt) in clip["prompts"].as_object().unwrap() {
            let ids: Vec<u32> = prompt["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            // The audio run gets the clip; `<end_of_audio>` its hard embedding.
            let start = ids.iter().position(|&i| i == c.audio_token_id).unwrap();
            let eoa = ids.iter().position(|&i| i == c.eoa_token_id).unwrap();
            assert_eq!(eoa - start, c.soft_tokens_per_clip);
            let eoa_embed = audio.embed_hard(&[c.eoa_token_id]).unwrap();
            let soft = [
                SoftTokens {
                    offset: start,
                    embeds: &clip_embeds,
                    bidirectional: false,
                },
                SoftTokens {
                    offset: eoa,
                    embeds: &eoa_embed,
                    bidirectional: false,
                },
            ];
            let mut cache: KvCache = model.new_cache(64).unwrap();
            let logits = model
                .forward_embeds(&ids, &soft, &mut cache, Logits::All)
                .unwrap()
                .to_vec();
            let want = floats(&prompt["logits"]);
            assert_eq!(logits.len(), ids.len() * vocab);
            let diff = max_diff(&logits, &want);
            eprintln!("{name} {kind}: logits max diff {diff:.2e}");
            assert!(
                diff < LOGITS_TOLERANCE,
                "{name} {kind}: logits differ by {diff}"
            );
            // The audio matters: the padding embedding in every slot gives other logits.
            let pad = audio.embed_hard(&[c.padding_id()]).unwrap();
            let silent: Vec<f32> = pad.repeat(c.soft_tokens_per_clip);
            let soft = [
                SoftTokens {
                    offset: start,
                    embeds: &silent,
                    bidirectional: false,
                },
                SoftTokens {
                    offset: eoa,
                    embeds: &eoa_embed,
                    bidirectional: false,
                },
            ];
            let mut cache: KvCache = model.new_cache(64).unwrap();
            let other = model
                .forward_embeds(&ids, &soft, &mut cache, Logits::All)
                .unwrap();
            assert!(max_diff(other, &want) > 10.0 * LOGITS_TOLERANCE);
        }
    }
}

#[test]
fn a_clip_longer_than_its_slots_is_an_error() {
    let audio = audio();
    let bins = audio.config().usm.input_feat_size;
    let frames = audio.max_clip_frames() + 1;
    let err = audio.encode_clip(&vec![-5.0; frames * bins]).unwrap_err();
    assert!(err.to_string().contains("windows"), "{err}");
    // Exactly the slots' worth is fine.
    let ok = audio
        .encode_clip(&vec![-5.0; audio.max_clip_frames() * bins])
        .unwrap();
    assert_eq!(
        ok.len(),
        audio.config().soft_tokens_per_clip * audio.config().text_hidden_size
    );
}
