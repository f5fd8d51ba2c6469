//! Parity with transformers on a tiny random-weight Gemma 3 (fixtures from
//! `scripts/make_gemma3_fixtures.py`): logits at every position within 1e-3 in f32, from the
//! safetensors checkpoint and from its GGUF conversion, whether the prompt is fed at once, token
//! by token, or in uneven chunks that straddle the sliding window. The same checks run with an
//! f16 KV cache at a tolerance derived from f16's precision (see [`F16_TOLERANCE`]).

mod common;

use common::{argmax, Reference};

use std::path::PathBuf;

use gemma_formats::open_model_source;
use gemma_models::{load_model, CacheType, Logits, Model};

const TOLERANCE: f32 = 1e-3;

/// Tolerance with an f16 cache: the f32 test's [`TOLERANCE`] plus twice f16's relative
/// rounding (2⁻¹¹) of the largest reference logit. Every stored key and value carries a
/// relative error of at most 2⁻¹¹, so scores and attention outputs, and through the residual
/// stream the logits, move by about that fraction of their size (measured on this fixture:
/// 4.3e-3 at most, logits up to 6.3, i.e. 1.4 · 2⁻¹¹ · max|logit|). A wrong read of the cache
/// (another row, a lost block) moves logits by O(0.1) and still fails.
fn f16_tolerance(r: &Reference) -> f32 {
    let max_logit = r
        .logits
        .iter()
        .flatten()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    TOLERANCE + 2.0 * 2f32.powi(-11) * max_logit
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_tiny")
}

fn reference() -> Reference {
    Reference::read(&fixture_dir())
}

fn load(path: PathBuf) -> Model {
    let file = open_model_source(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    load_model(&file).unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

fn assert_close(what: &str, pos: usize, got: &[f32], want: &[f32]) {
    assert_close_within(what, pos, got, want, TOLERANCE);
}

fn assert_close_within(what: &str, pos: usize, got: &[f32], want: &[f32], tolerance: f32) {
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
        worst <= tolerance,
        "{what}: position {pos}: max |diff| {worst} > {tolerance}"
    );
}

/// Feeds the prompt in chunks of the given sizes and compares every position's logits.
fn check_chunked(what: &str, model: &Model, r: &Reference, chunks: &[usize], tolerance: f32) {
    let mut cache = model.new_cache(64).unwrap();
    let mut pos = 0;
    for &n in chunks {
        let logits = model
            .forward(&r.ids[pos..pos + n], &mut cache, Logits::All)
            .unwrap();
        for t in 0..n {
            assert_close_within(
                what,
                pos + t,
                &logits[t * r.vocab..(t + 1) * r.vocab],
                &r.logits[pos + t],
                tolerance,
            );
        }
        pos += n;
    }
    assert_eq!(pos, r.ids.len(), "chunks must cover the prompt");
    assert_eq!(cache.len(), r.ids.len());
}

fn check_model(what: &str, model: &Model) {
    check_model_within(what, model, TOLERANCE);
}

fn check_model_within(what: &str, model: &Model, tolerance: f32) {
    let r = reference();
    assert_eq!(model.vocab_size(), r.vocab);
    check_chunked(
        &format!("{what} (whole prompt)"),
        model,
        &r,
        &[r.ids.len()],
        tolerance,
    );
    check_chunked(
        &format!("{what} (token by token)"),
        model,
        &r,
        &vec![1; r.ids.len()],
        tolerance,
    );
    check_chunked(
        &format!("{what} (uneven chunks)"),
        model,
        &r,
        &[3, 7, 1, 5],
        tolerance,
    );

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

#[test]
fn safetensors_checkpoint_matches_transformers() {
    check_model("safetensors", &load(fixture_dir()));
}

#[test]
fn gguf_conversion_matches_transformers() {
    check_model("gguf", &load(fixture_dir().join("model.gguf")));
}

fn load_with_cache(path: PathBuf, cache_type: CacheType) -> Model {
    let mut model = load(path);
    model.set_cache_type(cache_type).unwrap();
    model
}

#[test]
fn f16_cache_matches_transformers() {
    let tolerance = f16_tolerance(&reference());
    let gguf = load_with_cache(fixture_dir().join("model.gguf"), CacheType::F16);
    check_model_within("gguf, f16 cache", &gguf, tolerance);
    let hf = load_with_cache(fixture_dir(), CacheType::F16);
    check_model_within("safetensors, f16 cache", &hf, tolerance);
}

/// Cutting the prompt into chunks barely changes the logits with an f16 cache: keys of the
/// chunk in flight are rounded to f16 before attention, as stored ones are. (Without that
/// rounding the chunkings differ by the f16 error itself, ~2e-3 here; with it only f32
/// summation order differs, which now and then flips one f16 rounding: ~5e-5 measured.)
#[test]
fn f16_cache_logits_do_not_depend_on_chunking() {
    let model = load_with_cache(fixture_dir().join("model.gguf"), CacheType::F16);
    let r = reference();
    let run = |chunks: &[usize]| {
        let mut cache = model.new_cache(64).unwrap();
        let mut all = Vec::new();
        let mut pos = 0;
        for &n in chunks {
            all.extend_from_slice(
                model
                    .forward(&r.ids[pos..pos + n], &mut cache, Logits::All)
                    .unwrap(),
            );
            pos += n;
        }
        all
    };
    let whole = run(&[r.ids.len()]);
    for chunks in [vec![1; r.ids.len()], vec![3, 7, 1, 5]] {
        let other = run(&chunks);
        let worst = whole
            .iter()
            .zip(&other)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 3e-4, "{chunks:?}: {worst}");
    }
}

/// Q8_0 blocks are 32 values along the head dimension; this fixture's heads have 16.
#[test]
fn q8_0_cache_needs_heads_of_whole_blocks() {
    let mut model = load(fixture_dir().join("model.gguf"));
    let err = model.set_cache_type(CacheType::Q8_0).unwrap_err();
    assert!(err.to_string().contains("multiple of 32"), "{err}");
    assert_eq!(
        model.cache_type(),
        CacheType::F32,
        "a refused type changes nothing"
    );
}

#[test]
fn cache_memory_shrinks_with_the_cache_type() {
    let mut model = load(fixture_dir());
    let f32_bytes = model.kv_cache_bytes(64);
    model.set_cache_type(CacheType::F16).unwrap();
    assert_eq!(model.kv_cache_bytes(64) * 2, f32_bytes);
    let cache = model.new_cache(64).unwrap();
    assert_eq!(cache.bytes() * 2, f32_bytes);
    assert_eq!(cache.cache_type(), CacheType::F16);
    // A snapshot keeps the format and the contents.
    let r = reference();
    let mut cache = cache;
    model
        .forward(&r.ids[..6], &mut cache, Logits::Last)
        .unwrap();
    let mut copy = cache.clone();
    let a = model
        .forward(&r.ids[6..7], &mut cache, Logits::Last)
        .unwrap()
        .to_vec();
    let b = model
        .forward(&r.ids[6..7], &mut copy, Logits::Last)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(copy.bytes(), cache.bytes());
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
            .map(|(cache, &(a, b))| gemma_models::SeqStep::text(&r.ids[a..b], cache))
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
            .map(|(cache, &(_, b))| {
                gemma_models::SeqStep::text(&r.ids[b + step..b + step + 1], cache)
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
