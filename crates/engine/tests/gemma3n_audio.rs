//! Gemma 3n with audio through the engine, against transformers' `Gemma3nForConditionalGeneration`
//! (fixtures/gemma3n_audio_tiny, made by scripts/make_gemma3n_audio_fixtures.py): from the WAV
//! file to the logits at every position (our decoding and log-mel, the tower, the reference's
//! padding of a clip, `<end_of_audio>` through `embed_audio`), the tower read only when audio
//! arrives, and bad input.

use std::path::PathBuf;

use gemma_engine::audio::{prepare_samples, AUDIO_MARKER};
use gemma_engine::gemma_models::{CacheType, Logits, SoftTokens};
use gemma_engine::{load, AudioOptions, LoadOptions, LoadedModel, PreparedAudio, SoftSpan};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture_dir() -> PathBuf {
    root().join("fixtures/gemma3n_audio_tiny")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn loaded() -> LoadedModel {
    load(
        Some(&fixture_dir()),
        &LoadOptions {
            cache_type: CacheType::F32,
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

fn clip(loaded: &LoadedModel, name: &str) -> PreparedAudio {
    let bytes = std::fs::read(root().join(format!("fixtures/audio/{name}.wav"))).unwrap();
    loaded
        .prepare_audio(&bytes, &AudioOptions::default())
        .unwrap()
}

fn ids(prompt: &Value) -> Vec<u32> {
    prompt["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
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

/// From the committed 16 kHz WAVs (our decoder and front end, not the reference's features):
/// logits at every position within 1e-2 of transformers', for an audio-only prompt and a clip
/// between text.
#[test]
fn wav_to_logits_matches_transformers() {
    let loaded = loaded();
    assert!(
        loaded.vision.is_none(),
        "Gemma 3n's vision_config is not SigLIP"
    );
    let hearing = loaded.hearing().unwrap();
    assert!(!hearing.is_loaded(), "the tower is read on the first clip");
    let r = reference();
    for c in r["clips"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        if !name.contains("16k") {
            continue; // the 8 kHz clip goes through soxr in the reference, rubato here
        }
        let audio = clip(&loaded, name);
        assert_eq!(audio.windows.len(), 1);
        for (kind, prompt) in c["prompts"].as_object().unwrap() {
            let ids = ids(prompt);
            let soft = loaded
                .place_media(&ids, &[], std::slice::from_ref(&audio))
                .unwrap();
            // The clip's run and `<end_of_audio>`.
            assert_eq!(soft.len(), 2, "{name} {kind}");
            let logits = all_logits(&loaded, &ids, &soft);
            let want: Vec<f32> = prompt["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let d = max_diff(&logits, &want);
            eprintln!("{name} {kind}: logits max diff {d:.2e}");
            assert!(d < 1e-2, "{name} {kind}: logits differ by {d}");
        }
    }
    assert!(hearing.is_loaded());
}

#[test]
fn text_only_prompts_never_read_the_tower() {
    let loaded = loaded();
    let ids = [2u32, 10, 20, 30];
    let soft = loaded.place_media(&ids, &[], &[]).unwrap();
    assert!(soft.is_empty());
    let mut session = gemma_engine::Session::new(&loaded, 64).unwrap();
    session.evaluate(&ids, &soft).unwrap();
    assert!(!loaded.hearing().unwrap().is_loaded());
}

#[test]
fn markers_expand_as_the_reference_processor_writes_them() {
    let loaded = loaded();
    let hearing = loaded.hearing().unwrap();
    let n = hearing.config.soft_tokens_per_clip;
    let block = format!(
        "\n\n<start_of_audio>{}<end_of_audio>\n\n",
        "<audio_soft_token>".repeat(n)
    );
    let audio = clip(&loaded, "speech_16k_mono");
    let text = format!("Say {AUDIO_MARKER} again");
    assert_eq!(
        hearing
            .expand_markers(&text, std::slice::from_ref(&audio))
            .unwrap(),
        format!("Say {block} again")
    );
    // A marker without a clip, or a clip without a marker, is an error.
    assert!(hearing.expand_markers(&text, &[]).is_err());
    assert!(hearing.expand_markers("no slot", &[audio]).is_err());
}

#[test]
fn long_clips_are_cut_into_30_s_windows_at_a_pause() {
    // 65 s of a tone with a pause at 29 s: windows of at most 30 s, cut in the pause.
    let mut samples: Vec<f32> = (0..65 * 16_000)
        .map(|i| (i as f32 * 0.031).sin() * 0.2)
        .collect();
    samples[29 * 16_000..29 * 16_000 + 1600].fill(0.0);
    let audio = prepare_samples(&samples, 480_000).unwrap();
    assert_eq!(audio.windows.len(), 3, "{audio:?}");
    assert!((audio.starts[1] - 29.05).abs() < 0.06, "{:?}", audio.starts);
    // A window's features are those of the reference for that stretch alone.
    let cut = (audio.starts[1] * 16_000.0).round() as usize;
    assert_eq!(
        audio.windows[0],
        gemma_engine::gemma_media::log_mel(&samples[..cut]).features
    );
}

#[test]
fn windows_fill_one_run_each() {
    let loaded = loaded();
    let hearing = loaded.hearing().unwrap();
    // The tiny model's clips hold 16 tokens (2.59 s): 6 s is at least three windows.
    assert_eq!(hearing.window_samples(), 41_472);
    let samples: Vec<f32> = (0..6 * 16_000)
        .map(|i| (i as f32 * 0.031).sin() * 0.2)
        .collect();
    let audio = hearing.prepare_samples(&samples).unwrap();
    let n = audio.windows.len();
    assert!(n >= 3, "{audio:?}");
    let text = hearing
        .expand_markers(AUDIO_MARKER, std::slice::from_ref(&audio))
        .unwrap();
    assert_eq!(text.matches("<start_of_audio>").count(), n);
    let c = &hearing.config;
    let block: Vec<u32> = std::iter::once(c.boa_token_id)
        .chain(std::iter::repeat_n(
            c.audio_token_id,
            c.soft_tokens_per_clip,
        ))
        .chain(std::iter::once(c.eoa_token_id))
        .collect();
    let mut ids = vec![2u32];
    for _ in 0..n {
        ids.extend(&block);
    }
    let soft = loaded
        .place_media(&ids, &[], std::slice::from_ref(&audio))
        .unwrap();
    assert_eq!(soft.len(), 2 * n);
    assert!(soft.windows(2).all(|w| w[0].start < w[1].start));
    all_logits(&loaded, &ids, &soft);
    // A run short is an error that says so.
    let err = loaded
        .place_media(&ids[..1 + (n - 1) * block.len()], &[], &[audio])
        .unwrap_err();
    assert!(err.to_string().contains("window"), "{err}");
}

#[test]
fn bad_audio_is_a_clear_error() {
    let loaded = loaded();
    let opts = AudioOptions::default();
    for (what, bytes) in [
        ("empty", Vec::new()),
        ("garbage", b"RIFF\x10\x00\x00\x00WAVEfmt nonsense".to_vec()),
        ("text", b"hello, this is not audio".to_vec()),
    ] {
        assert!(loaded.prepare_audio(&bytes, &opts).is_err(), "{what}");
    }
    // Too short for one frame.
    let err = prepare_samples(&[0.0; 100], 480_000).unwrap_err();
    assert!(err.to_string().contains("ms"), "{err}");
    // A run of the wrong length.
    let c = &loaded.hearing().unwrap().config;
    let audio = clip(&loaded, "clipping_16k_mono");
    let mut ids = vec![2u32, c.boa_token_id];
    ids.extend(std::iter::repeat_n(
        c.audio_token_id,
        c.soft_tokens_per_clip - 1,
    ));
    ids.push(c.eoa_token_id);
    let err = loaded.place_media(&ids, &[], &[audio]).unwrap_err();
    assert!(err.to_string().contains("tokens long"), "{err}");
    // A limit on the duration.
    let bytes = std::fs::read(root().join("fixtures/audio/speech_16k_mono.wav")).unwrap();
    let short = AudioOptions {
        limits: gemma_engine::gemma_media::AudioLimits {
            max_seconds: 1.0,
            ..Default::default()
        },
    };
    assert!(loaded.prepare_audio(&bytes, &short).is_err());
}

#[test]
fn audio_for_a_model_without_an_audio_tower_is_refused() {
    let text_only = load(
        Some(&root().join("fixtures/gemma3_tiny")),
        &LoadOptions::default(),
    )
    .unwrap();
    let bytes = std::fs::read(root().join("fixtures/audio/speech_16k_mono.wav")).unwrap();
    let err = text_only
        .prepare_audio(&bytes, &AudioOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("takes no audio"), "{err}");
}

/// The chat request of the reference (an audio part, then a text part) rendered by the model's
/// chat template and expanded, tokenized and placed by us gives the processor's ids and the
/// reference's logits at every position.
#[test]
fn chat_prompt_ids_and_logits_match_the_processor() {
    let loaded = loaded();
    let r = reference();
    let chat = &r["chat"];
    let user = gemma_engine::gemma_tokenizer::ChatMessage {
        role: "user".into(),
        content: format!(
            "{AUDIO_MARKER}{}",
            chat["messages"][0]["content"][1]["text"].as_str().unwrap()
        ),
    };
    let rendered = loaded.render_chat(None, &[user]).unwrap();
    assert_eq!(rendered, chat["prompt"].as_str().unwrap());
    let audio = clip(
        &loaded,
        chat["messages"][0]["content"][0]["clip"].as_str().unwrap(),
    );
    let (ids_ours, soft) = loaded
        .encode_with_media(&rendered, &[], std::slice::from_ref(&audio), false)
        .unwrap();
    assert_eq!(ids_ours, ids(chat), "token ids");
    let logits = all_logits(&loaded, &ids_ours, &soft);
    let want: Vec<f32> = chat["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let d = max_diff(&logits, &want);
    eprintln!("chat: logits max diff {d:.2e}");
    assert!(d < 1e-2, "chat: logits differ by {d}");
}

/// Greedy generation from the chat prompt gives the reference's continuation (EOS and
/// `<end_of_turn>` pushed away by a logit bias, as the reference suppresses them; the media ids
/// are never sampled).
#[test]
fn greedy_generation_matches_the_reference() {
    let loaded = loaded();
    let r = reference();
    let chat = &r["chat"];
    let audio = clip(&loaded, "speech_16k_mono");
    let (ids, soft) = loaded
        .encode_with_media(
            chat["prompt"].as_str().unwrap(),
            &[],
            std::slice::from_ref(&audio),
            false,
        )
        .unwrap();
    let params = gemma_engine::SamplingParams {
        temperature: 0.0,
        max_tokens: 12,
        logit_bias: [(1u32, -100.0f32), (6, -100.0)].into_iter().collect(),
        ..gemma_engine::SamplingParams::default()
    };
    let mut session = gemma_engine::Session::new(&loaded, 128).unwrap();
    let mut text = String::new();
    let stats = session
        .generate_with(&ids, &soft, &params, &mut |t| {
            text.push_str(t);
            true
        })
        .unwrap();
    let want: Vec<u32> = chat["greedy_continuation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(stats.tokens, want);
    assert_eq!(text, chat["greedy_text"].as_str().unwrap());
}

/// Streaming: the clip pushed as it would arrive (160 ms, 480 ms and 1 s pieces, and odd
/// sizes), its tokens fed to the KV cache as they come, answers exactly as the same prompt fed
/// at once with the whole-clip encoder's tokens (no padding: a stream's prompt holds the tokens
/// the audio produced).
#[test]
fn streamed_audio_answers_as_the_prompt_fed_at_once() {
    use gemma_engine::audio::AudioTask;
    let loaded = loaded();
    let hearing = loaded.hearing().unwrap();
    let c = &hearing.config;
    let bytes = std::fs::read(root().join("fixtures/audio/speech_16k_mono.wav")).unwrap();
    let samples = gemma_engine::gemma_media::decode_audio(&bytes, &Default::default())
        .unwrap()
        .samples_16k;
    let params = gemma_engine::SamplingParams {
        temperature: 0.0,
        max_tokens: 10,
        logit_bias: vec![(1, -100.0), (6, -100.0)],
        ..gemma_engine::SamplingParams::default()
    };
    let instruction = AudioTask::Transcribe.instruction();

    // At once: the prompt with exactly the clip's tokens.
    let tower = hearing.tower(&loaded.file).unwrap();
    let feats = gemma_engine::gemma_media::log_mel(&samples).features;
    let encoded = tower.encoder().encode(&feats).unwrap();
    let n = encoded.len() / tower.config().usm.hidden_size;
    let user = gemma_engine::gemma_tokenizer::ChatMessage {
        role: "user".into(),
        content: format!("{AUDIO_MARKER}{instruction}"),
    };
    let rendered = loaded.render_chat(None, &[user]).unwrap();
    let block = format!(
        "\n\n<start_of_audio>{}<end_of_audio>\n\n",
        AUDIO_MARKER.repeat(n)
    );
    let ids = loaded
        .encode_prompt(&rendered.replace(AUDIO_MARKER, &block))
        .unwrap();
    let start = ids.iter().position(|&i| i == c.audio_token_id).unwrap();
    let eoa = ids.iter().position(|&i| i == c.eoa_token_id).unwrap();
    assert_eq!(eoa - start, n);
    let soft = vec![
        SoftSpan {
            start,
            embeds: tower.project(&encoded).into(),
            bidirectional: false,
            key: [1; 32],
        },
        SoftSpan {
            start: eoa,
            embeds: tower.embed_hard(&[c.eoa_token_id]).unwrap().into(),
            bidirectional: false,
            key: [2; 32],
        },
    ];
    let mut session = gemma_engine::Session::new(&loaded, 128).unwrap();
    let at_once = session
        .generate_with(&ids, &soft, &params, &mut |_| true)
        .unwrap()
        .tokens;
    assert_eq!(at_once.len(), 10);

    for piece in [2560, 7680, 16_000, 333] {
        let mut live = gemma_engine::LiveAudio::new(&loaded, &instruction, 128).unwrap();
        let mut max_behind = 0usize;
        let mut fed = 0;
        for chunk in samples.chunks(piece) {
            assert_eq!(live.push(chunk).unwrap(), chunk.len());
            fed += chunk.len();
            // Tokens lag the audio by at most the look-ahead (token k needs 16k + 7 frames).
            let due = (fed.saturating_sub(513) / 160 + 1) / 16;
            max_behind = max_behind.max(due.saturating_sub(live.tokens()));
        }
        assert!(
            max_behind <= 1,
            "pieces of {piece}: tokens lag by {max_behind}"
        );
        let mut text = String::new();
        let streamed = live
            .answer(&params, &mut |t| {
                text.push_str(t);
                true
            })
            .unwrap();
        assert_eq!(streamed.tokens, at_once, "pieces of {piece}");
        // Only the look-ahead's tokens and the suffix were left to prefill.
        assert!(streamed.prompt_tokens < 12, "{}", streamed.prompt_tokens);
        // The next window starts afresh and gives the same answer.
        live.push(&samples).unwrap();
        let again = live.answer(&params, &mut |_| true).unwrap();
        assert_eq!(again.tokens, at_once);
    }
}

/// A chat with clips in two turns, fed incrementally (the cache kept between turns), answers
/// the third turn exactly as the whole conversation fed at once.
#[test]
fn chat_turns_with_audio_reuse_the_cache_exactly() {
    let loaded = loaded();
    let params = gemma_engine::SamplingParams {
        temperature: 0.0,
        max_tokens: 6,
        logit_bias: vec![(1, -100.0), (6, -100.0)],
        ..gemma_engine::SamplingParams::default()
    };
    let a = clip(&loaded, "speech_16k_mono");
    let b = clip(&loaded, "clipping_16k_mono");
    let mut chat = gemma_engine::Chat::new(&loaded, 256, None).unwrap();
    let t1 = chat
        .send_with_media(
            "Transcribe this audio.",
            vec![],
            vec![a.clone()],
            &params,
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(t1.stats.prompt_tokens, 33);
    chat.send("Again please.", &params, &mut |_| true).unwrap();
    let t3 = chat
        .send_with_media(
            "And this one?",
            vec![],
            vec![b.clone()],
            &params,
            &mut |_| true,
        )
        .unwrap();
    // Only the new turn was fed.
    assert!(t3.stats.prompt_tokens < 40, "{}", t3.stats.prompt_tokens);

    // The conversation before the third answer, fed at once.
    let history = &chat.messages()[..chat.messages().len() - 1];
    let rendered = loaded.render_chat(None, history).unwrap();
    let (ids, soft) = loaded
        .encode_with_media(&rendered, &[], &[a, b], false)
        .unwrap();
    let mut session = gemma_engine::Session::new(&loaded, 256).unwrap();
    let at_once = session
        .generate_with(&ids, &soft, &params, &mut |_| true)
        .unwrap();
    assert_eq!(t3.stats.tokens, at_once.tokens);
}
