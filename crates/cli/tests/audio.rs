//! The CLI with audio on the tiny Gemma 3n audio fixture (fixtures/gemma3n_audio_tiny, from
//! transformers): `logits --audio --ids` fills the audio-token run and matches the reference's
//! last-position logits from the WAV file; `run --audio` and `transcribe` generate the
//! reference's greedy text; `transcribe -` streams PCM from stdin; `info` shows the tower; bad
//! audio and misuse end in one clear error line.

mod common;

use std::path::PathBuf;

use common::{assert_clean_error, gemma, gemma_bytes, stderr, stdout, TempDir};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn model() -> String {
    fixtures()
        .join("gemma3n_audio_tiny")
        .to_string_lossy()
        .into_owned()
}

fn wav(name: &str) -> String {
    fixtures()
        .join(format!("audio/{name}.wav"))
        .to_string_lossy()
        .into_owned()
}

fn reference_prompt(clip: &str, kind: &str) -> (String, Vec<f32>, usize) {
    let text =
        std::fs::read_to_string(fixtures().join("gemma3n_audio_tiny/reference.json")).unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    let vocab = r["vocab_size"].as_u64().unwrap() as usize;
    let c = r["clips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == clip)
        .unwrap();
    let p = &c["prompts"][kind];
    let ids: Vec<String> = p["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let logits: Vec<f32> = p["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    (
        ids.join(","),
        logits[logits.len() - vocab..].to_vec(),
        vocab,
    )
}

#[test]
fn logits_with_audio_match_the_reference() {
    for kind in ["audio_only", "between_text"] {
        let (ids, want, _) = reference_prompt("speech_16k_mono", kind);
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
                &wav("speech_16k_mono"),
                "--ids",
                &ids,
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
            assert_eq!(id, order[rank], "{kind}: rank {rank}");
            assert!(
                (logit - want[id]).abs() < 1e-2,
                "{kind}: {logit} vs {}",
                want[id]
            );
        }
    }
}

#[test]
fn info_shows_the_audio_tower() {
    let out = gemma(&["info", "--model", &model()], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("USM conformer (3 blocks, width 32)"),
        "{text}"
    );
    assert!(text.contains("read on the first clip"), "{text}");
}

#[test]
fn bad_audio_and_misuse_are_clean_errors() {
    let dir = TempDir::new("audio-cli");
    let broken = dir.path().join("broken.wav");
    std::fs::write(
        &broken,
        b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00garbage",
    )
    .unwrap();
    let (ids, _, _) = reference_prompt("speech_16k_mono", "audio_only");
    let broken = broken.to_string_lossy().into_owned();
    let missing = dir
        .path()
        .join("missing.wav")
        .to_string_lossy()
        .into_owned();
    let text_model = fixtures()
        .join("gemma3_tiny")
        .to_string_lossy()
        .into_owned();
    let model = model();
    let speech = wav("speech_16k_mono");
    for (args, needle) in [
        (
            vec![
                "logits", "-q", "--model", &model, "--audio", &broken, "--ids", &ids,
            ],
            "audio",
        ),
        (
            vec![
                "logits", "-q", "--model", &model, "--audio", &missing, "--ids", &ids,
            ],
            "cannot read",
        ),
        (
            // Two clips for one run of audio tokens.
            vec![
                "logits", "-q", "--model", &model, "--audio", &speech, "--audio", &speech, "--ids",
                &ids,
            ],
            "window",
        ),
        (
            // Audio ids without a clip.
            vec!["logits", "-q", "--model", &model, "--ids", &ids],
            "window",
        ),
        (
            vec![
                "logits",
                "-q",
                "--model",
                &model,
                "--audio",
                &speech,
                "--max-audio-seconds",
                "1",
                "--ids",
                &ids,
            ],
            "long",
        ),
        (
            vec![
                "logits",
                "-q",
                "--model",
                &text_model,
                "--audio",
                &speech,
                "--ids",
                "2,3",
            ],
            "takes no audio",
        ),
    ] {
        let out = gemma(&args, None);
        assert_clean_error(&out, &[needle]);
    }
}

fn greedy_text() -> String {
    let text =
        std::fs::read_to_string(fixtures().join("gemma3n_audio_tiny/reference.json")).unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    r["chat"]["greedy_text"].as_str().unwrap().to_string()
}

/// The reference suppressed EOS and `<end_of_turn>`; a bias of -100 does the same here.
const GREEDY: [&str; 8] = ["--temp", "0", "-n", "12", "-l", "1=-100", "-l", "6=-100"];

#[test]
fn run_and_transcribe_generate_the_reference_text() {
    let model = model();
    let speech = wav("speech_16k_mono");
    let mut args = vec![
        "run",
        "-q",
        "--model",
        &model,
        "--audio",
        &speech,
        "Transcribe this audio.",
    ];
    args.extend(GREEDY);
    let out = gemma(&args, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim_end(), greedy_text());

    // `transcribe` asks the same question ("Transcribe this audio.") of each window.
    let mut args = vec!["transcribe", "-q", "--model", &model, &speech];
    args.extend(GREEDY);
    let out = gemma(&args, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim_end(), greedy_text().trim());
    args.push("--timestamps");
    let out = gemma(&args, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("[00:00.00 - 00:02.01] "),
        "{}",
        stdout(&out)
    );
}

/// Raw PCM of a 16-bit WAV: the bytes of its `data` chunk.
fn pcm_of(name: &str) -> Vec<u8> {
    let wav = std::fs::read(wav(name)).unwrap();
    let at = wav.windows(4).position(|w| w == b"data").unwrap();
    let len = u32::from_le_bytes(wav[at + 4..at + 8].try_into().unwrap()) as usize;
    wav[at + 8..at + 8 + len].to_vec()
}

#[test]
fn transcribe_streams_pcm_from_stdin() {
    let model = model();
    let pcm = pcm_of("speech_16k_mono");
    let mut texts = Vec::new();
    for chunk_ms in ["160", "1000", "7"] {
        let mut args = vec![
            "transcribe",
            "-q",
            "--model",
            &model,
            "-",
            "--chunk-ms",
            chunk_ms,
        ];
        args.extend(GREEDY);
        let out = gemma_bytes(&args, Some(&pcm));
        assert!(out.status.success(), "{}", stderr(&out));
        texts.push(stdout(&out));
    }
    assert!(!texts[0].trim().is_empty());
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
    // Stereo at 44.1 kHz through the streaming resampler, translated.
    let stereo = pcm_of("speech_44k1_stereo");
    let mut args = vec![
        "transcribe",
        "-q",
        "--model",
        &model,
        "-",
        "--rate",
        "44100",
        "--channels",
        "2",
        "--translate-to",
        "fr",
    ];
    args.extend(GREEDY);
    let out = gemma_bytes(&args, Some(&stereo));
    assert!(out.status.success(), "{}", stderr(&out));
    // Bad streams.
    let base = ["transcribe", "-q", "--model", model.as_str(), "-"];
    assert_clean_error(&gemma_bytes(&base, Some(&[])), &["no audio"]);
    assert_clean_error(&gemma_bytes(&base, Some(&pcm[..pcm.len() - 1])), &["frame"]);
    let mut args = base.to_vec();
    args.extend(["--rate", "0"]);
    assert_clean_error(&gemma_bytes(&args, Some(&pcm)), &["0 Hz"]);
    let text_model = fixtures()
        .join("gemma3_tiny")
        .to_string_lossy()
        .into_owned();
    let out = gemma(
        &[
            "transcribe",
            "-q",
            "--model",
            &text_model,
            &wav("speech_16k_mono"),
        ],
        None,
    );
    assert_clean_error(&out, &["takes no audio"]);
}

/// `--audio-weights q8_0` runs the tower on int8 dot products: close to the reference, not
/// equal (the top logits keep their order here).
#[test]
fn q8_0_audio_weights_stay_close() {
    let (ids, want, _) = reference_prompt("speech_16k_mono", "between_text");
    let model = model();
    let speech = wav("speech_16k_mono");
    let args = [
        "logits",
        "-q",
        "--model",
        &model,
        "--cache-type",
        "f32",
        "--top",
        "3",
        "--audio",
        &speech,
        "--ids",
        &ids,
        "--audio-weights",
        "q8_0",
    ];
    let out = gemma(&args, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let mut moved = 0.0f32;
    for p in json["top"].as_array().unwrap() {
        let (id, logit) = (
            p[0].as_u64().unwrap() as usize,
            p[1].as_f64().unwrap() as f32,
        );
        assert!(
            (logit - want[id]).abs() < 0.1,
            "{id}: {logit} vs {}",
            want[id]
        );
        moved = moved.max((logit - want[id]).abs());
    }
    // The weights really were requantized (as stored, the logits agree within 1e-4).
    assert!(moved > 1e-3, "{moved}");
    let mut bad = args.to_vec();
    *bad.last_mut().unwrap() = "q3";
    let out = gemma(&bad, None);
    assert!(!out.status.success());
}
