//! Parity with transformers on a tiny random-weight Gemma 3 (fixtures from
//! `scripts/make_gemma3_fixtures.py`): logits at every position within 1e-3 in f32, from the
//! safetensors checkpoint and from its GGUF conversion, whether the prompt is fed at once, token
//! by token, or in uneven chunks that straddle the sliding window.

use std::path::PathBuf;

use gemma_formats::open_model_source;
use gemma_models::{load_model, Logits, Model};
use serde_json::Value;

const TOLERANCE: f32 = 1e-3;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_tiny")
}

struct Reference {
    ids: Vec<u32>,
    vocab: usize,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn reference() -> Reference {
    let text =
        std::fs::read_to_string(fixture_dir().join("reference.json")).expect("reference.json");
    let v: Value = serde_json::from_str(&text).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    Reference {
        ids: ids("input_ids"),
        vocab: v["vocab_size"].as_u64().unwrap() as usize,
        logits: v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect(),
        greedy: ids("greedy_continuation"),
    }
}

fn load(path: PathBuf) -> Model {
    let file = open_model_source(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    load_model(&file).unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

fn assert_close(what: &str, pos: usize, got: &[f32], want: &[f32]) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: position {pos}: logits length"
    );
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= TOLERANCE,
        "{what}: position {pos}: max |diff| {worst} > {TOLERANCE}"
    );
}

/// Feeds the prompt in chunks of the given sizes and compares every position's logits.
fn check_chunked(what: &str, model: &Model, r: &Reference, chunks: &[usize]) {
    let mut cache = model.new_cache(64).unwrap();
    let mut pos = 0;
    for &n in chunks {
        let logits = model
            .forward(&r.ids[pos..pos + n], &mut cache, Logits::All)
            .unwrap();
        for t in 0..n {
            assert_close(
                what,
                pos + t,
                &logits[t * r.vocab..(t + 1) * r.vocab],
                &r.logits[pos + t],
            );
        }
        pos += n;
    }
    assert_eq!(pos, r.ids.len(), "chunks must cover the prompt");
    assert_eq!(cache.len(), r.ids.len());
}

fn check_model(what: &str, model: &Model) {
    let r = reference();
    assert_eq!(model.vocab_size(), r.vocab);
    check_chunked(&format!("{what} (whole prompt)"), model, &r, &[r.ids.len()]);
    check_chunked(
        &format!("{what} (token by token)"),
        model,
        &r,
        &vec![1; r.ids.len()],
    );
    check_chunked(&format!("{what} (uneven chunks)"), model, &r, &[3, 7, 1, 5]);

    // Greedy continuation, decoding one token at a time from the cache.
    let mut cache = model.new_cache(64).unwrap();
    let mut next = argmax(model.forward(&r.ids, &mut cache, Logits::Last).unwrap());
    let mut generated = vec![next];
    while generated.len() < r.greedy.len() {
        next = argmax(model.forward(&[next], &mut cache, Logits::Last).unwrap());
        generated.push(next);
    }
    assert_eq!(generated, r.greedy, "{what}: greedy continuation");
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn safetensors_checkpoint_matches_transformers() {
    check_model("safetensors", &load(fixture_dir()));
}

#[test]
fn gguf_conversion_matches_transformers() {
    check_model("gguf", &load(fixture_dir().join("model.gguf")));
}

#[test]
fn context_overflow_is_an_error() {
    let model = load(fixture_dir());
    let r = reference();
    let mut cache = model.new_cache(8).unwrap();
    let err = model.forward(&r.ids, &mut cache, Logits::Last).unwrap_err();
    assert!(err.to_string().contains("context size is 8"), "{err}");
    assert_eq!(
        cache.len(),
        0,
        "a rejected chunk must not advance the cache"
    );
    let err = model
        .forward(&[9999], &mut cache, Logits::Last)
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn sliding_layers_hold_only_the_window() {
    let model = load(fixture_dir());
    // 6 sliding layers × 5 positions + 1 global layer × 64 positions, keys and values,
    // 2 kv heads × 16 dims, f32.
    let expected = (6 * 5 + 64) * 2 * 2 * 16 * 4;
    assert_eq!(model.kv_cache_bytes(64), expected);
    assert_eq!(model.new_cache(64).unwrap().bytes(), expected);
}

#[test]
fn batched_sequences_match_the_reference() {
    // Three sequences at different depths advance in one pass each step; every one must see
    // exactly the logits it would see alone.
    let model = load(fixture_dir());
    let r = reference();
    let splits = [(0usize, 7usize), (0, 3), (0, 16)];
    let mut caches: Vec<_> = splits
        .iter()
        .map(|_| model.new_cache(64).unwrap())
        .collect();
    // Prefill each sequence to a different length first, in one batch.
    let mut logits = Vec::new();
    {
        let mut steps: Vec<_> = caches
            .iter_mut()
            .zip(&splits)
            .map(|(cache, &(a, b))| gemma_models::SeqStep {
                tokens: &r.ids[a..b],
                cache,
            })
            .collect();
        model.forward_batch(&mut steps, &mut logits).unwrap();
    }
    for (s, &(_, b)) in splits.iter().enumerate() {
        assert_close(
            "batch prefill",
            b - 1,
            &logits[s * r.vocab..(s + 1) * r.vocab],
            &r.logits[b - 1],
        );
    }
    // Then one token per sequence per step, for the two shorter ones, alongside each other.
    for step in 0..4 {
        let mut steps: Vec<_> = caches[..2]
            .iter_mut()
            .zip(&splits)
            .map(|(cache, &(_, b))| gemma_models::SeqStep {
                tokens: &r.ids[b + step..b + step + 1],
                cache,
            })
            .collect();
        model.forward_batch(&mut steps, &mut logits).unwrap();
        for (s, &(_, b)) in splits[..2].iter().enumerate() {
            assert_close(
                "batch decode",
                b + step,
                &logits[s * r.vocab..(s + 1) * r.vocab],
                &r.logits[b + step],
            );
        }
    }
}

#[test]
fn truncated_cache_continues_like_a_fresh_one() {
    let model = load(fixture_dir());
    let r = reference();
    // Global layers keep everything; the window-5 rings keep 5 positions, so going back one
    // position is possible and going back further is refused.
    let mut cache = model.new_cache(64).unwrap();
    model
        .forward(&r.ids[..12], &mut cache, Logits::Last)
        .unwrap();
    let snapshot = cache.clone();
    cache.truncate(11).unwrap();
    let logits = model
        .forward(&r.ids[11..12], &mut cache, Logits::Last)
        .unwrap();
    assert_close("after truncate", 11, logits, &r.logits[11]);
    let mut far = snapshot.clone();
    assert!(far.truncate(6).is_err());
    assert!(far.truncate(13).is_err());
    // A short sequence whose rings never wrapped can go back anywhere.
    let mut short = model.new_cache(64).unwrap();
    model
        .forward(&r.ids[..4], &mut short, Logits::Last)
        .unwrap();
    short.truncate(1).unwrap();
    let logits = model
        .forward(&r.ids[1..3], &mut short, Logits::Last)
        .unwrap();
    assert_close("short truncate", 2, logits, &r.logits[2]);
}
