//! The real default model (Gemma 3 270M Q4_K_M) against transformers' float32 run on the same
//! GGUF file (`scripts/make_real_model_reference.py`): for every prompt, one of them longer than
//! the 512-token sliding window, our tokenizer gives llama.cpp's ids, our greedy next token is
//! the reference's, and the reference's top-10 logits are matched within 0.75 — with the exact
//! f32 KV cache, and again with f16 and Q8_0 caches.

use std::path::PathBuf;

use gemma_engine::default_model::ensure_default_model;
use gemma_formats::{open_model_source, ModelFile};
use gemma_models::{load_model, CacheType, Logits, Model};
use gemma_tokenizer::Tokenizer;
use serde_json::Value;

const LOGIT_TOLERANCE: f32 = 0.75;

#[test]
fn real_model_matches_transformers_reference() {
    check_against_reference(CacheType::F32, LOGIT_TOLERANCE);
}

/// f16 and Q8_0 caches are held to the same tolerance and the same greedy tokens. The 0.75
/// is set by the weights path (Q8_0-quantized activations against transformers' f32 matmuls
/// on the dequantized weights: up to 0.73 with an exact f32 cache); the cache's own rounding
/// (relative 2⁻¹¹ for f16, half a step of max/127 per 32 values for Q8_0) is far below that.
/// Measured worst top-10 differences: f32 0.73, f16 0.37, Q8_0 0.52.
#[test]
fn real_model_with_f16_cache_matches_transformers_reference() {
    check_against_reference(CacheType::F16, LOGIT_TOLERANCE);
}

#[test]
fn real_model_with_q8_0_cache_matches_transformers_reference() {
    check_against_reference(CacheType::Q8_0, LOGIT_TOLERANCE);
}

/// Near-ties an f16 cache may tip: with this model's quantized activations, rounding the cache
/// moves the gap between the two best logits by up to ~0.25 (measured over the first steps of
/// the continuation below, before any token differs), so twice that.
const TIE_MARGIN: f32 = 0.5;

/// Greedy decoding with an f16 cache picks f32's token at every step where f32's choice is not
/// a near-tie. Both caches are fed f32's greedy tokens (so one flipped near-tie does not send
/// the rest of the comparison down another text). Run freely, the two continuations of this
/// prompt agree for the first 11 tokens and part at a step where f32's margin is 0.23.
#[test]
fn f16_cache_greedy_tokens_follow_f32() {
    let (mut model, tokenizer) = load_default();
    let prompt = tokenizer
        .encode("The capital of France is", true, true)
        .unwrap();
    // Each step's greedy token and its lead over the second best.
    let steps = |model: &Model, forced: Option<&[u32]>| {
        let mut cache = model.new_cache(256).unwrap();
        let mut logits = model.forward(&prompt, &mut cache, Logits::Last).unwrap();
        let mut out = Vec::new();
        for step in 0..32 {
            let best = argmax(logits);
            let runner_up = logits
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != best as usize)
                .fold(f32::NEG_INFINITY, |m, (_, &v)| m.max(v));
            out.push((best, logits[best as usize] - runner_up));
            let next = forced.map_or(best, |f| f[step]);
            logits = model.forward(&[next], &mut cache, Logits::Last).unwrap();
        }
        out
    };
    let exact = steps(&model, None);
    let tokens: Vec<u32> = exact.iter().map(|&(t, _)| t).collect();
    model.set_cache_type(CacheType::F16).unwrap();
    let f16 = steps(&model, Some(&tokens));
    let mut compared = 0;
    for (step, (&(want, lead), &(got, _))) in exact.iter().zip(&f16).enumerate() {
        if lead >= TIE_MARGIN {
            compared += 1;
            assert_eq!(got, want, "step {step}: f32 leads by {lead}");
        }
    }
    eprintln!("f16 cache: greedy token equal at all {compared} of 32 steps without a near-tie");
    assert!(
        compared >= 16,
        "too few decisive steps to compare: {compared}"
    );
}

fn argmax(logits: &[f32]) -> u32 {
    (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
        .unwrap() as u32
}

fn load_default() -> (Model, Tokenizer) {
    let path = ensure_default_model().expect("default model");
    let file = open_model_source(&path).unwrap();
    let ModelFile::Gguf(gguf) = &file else {
        panic!("default model is GGUF")
    };
    let tokenizer = Tokenizer::from_gguf(gguf).unwrap();
    (load_model(&file).unwrap(), tokenizer)
}

/// The committed reference cases (`fixtures/gemma3_270m/reference.json`, written by
/// `scripts/make_real_model_reference.py`): each case's text, its token ids and the whole case.
fn reference_cases() -> Vec<(String, Vec<u32>, Value)> {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_270m/reference.json");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    cases
        .iter()
        .map(|case| {
            let text = case["text"].as_str().unwrap().to_owned();
            let ids = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            (text, ids, case.clone())
        })
        .collect()
}

fn check_against_reference(cache_type: CacheType, tolerance: f32) {
    let (mut model, tokenizer) = load_default();
    model.set_cache_type(cache_type).unwrap();

    let cases = reference_cases();
    assert!(cases.len() >= 6);
    let mut longest = 0;
    for (text, ids, case) in &cases {
        let text = text.as_str();
        longest = longest.max(ids.len());
        assert_eq!(
            &tokenizer.encode(text, true, true).unwrap(),
            ids,
            "tokenization of {text:?}"
        );

        let mut cache = model.new_cache(2048).unwrap();
        let logits = model.forward(ids, &mut cache, Logits::Last).unwrap();
        let ours = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        let mut worst = 0.0f32;
        for pair in case["top"].as_array().unwrap() {
            let id = pair[0].as_u64().unwrap() as usize;
            let want = pair[1].as_f64().unwrap() as f32;
            let got = logits[id];
            worst = worst.max((got - want).abs());
            assert!(
                (got - want).abs() <= tolerance,
                "{text:?}: logit of token {id} is {got}, reference {want}"
            );
        }
        eprintln!(
            "{cache_type}: {} tokens: greedy {ours}, worst top-10 logit difference {worst:.3}",
            ids.len()
        );
        assert_eq!(
            ours as u64,
            case["greedy"].as_u64().unwrap(),
            "greedy next token after {text:?}"
        );
    }
    assert!(
        longest > 512,
        "one prompt must be longer than the sliding window"
    );
}

/// With the default settings (f16 KV cache, `LoadOptions::default()`, a session's prefill), the
/// next-token logits after each short prompt of `fixtures/accuracy/reference_f64.json` — the
/// float64 NumPy forward of the same dequantized GGUF, `scripts/accuracy_f64.py` — are at least
/// as close to the reference as llama.cpp's, whose distances the fixture records: on the
/// reference's top-10 tokens, our worst difference over the set is at most llama.cpp's worst,
/// and our mean at most llama.cpp's mean; the greedy token is the reference's wherever its lead
/// is decisive. (llama.cpp's distance, not a hand-picked tolerance, is the bar of issue #14.)
#[test]
fn default_settings_as_close_to_f64_reference_as_llama_cpp() {
    let path = ensure_default_model().expect("default model");
    let loaded = gemma_engine::load(Some(&path), &gemma_engine::LoadOptions::default()).unwrap();
    assert_eq!(loaded.model.cache_type(), CacheType::F16);
    let tokenizer = loaded.tokenizer.as_ref().unwrap();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/accuracy/reference_f64.json");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    let (mut ours_worst, mut ours_sum, mut llama_worst, mut llama_sum) = (0f64, 0f64, 0f64, 0f64);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let text = case["text"].as_str().unwrap();
        assert_eq!(tokenizer.encode(text, true, true).unwrap(), ids, "{name}");
        let mut session = gemma_engine::Session::new(&loaded, 512).unwrap();
        let logits = session.evaluate(&ids, &[]).unwrap();
        let top = case["top"].as_array().unwrap();
        let want = case["logits"].as_array().unwrap();
        let d = top
            .iter()
            .zip(want)
            .map(|(id, v)| {
                (logits[id.as_u64().unwrap() as usize] as f64 - v.as_f64().unwrap()).abs()
            })
            .fold(0f64, f64::max);
        let llama = case["llama_cpp_d_logit"]["llama.cpp"].as_f64().unwrap();
        eprintln!(
            "{name}: {} tokens, d = {d:.4} (llama.cpp {llama:.4})",
            ids.len()
        );
        ours_worst = ours_worst.max(d);
        ours_sum += d;
        llama_worst = llama_worst.max(llama);
        llama_sum += llama;
        if case["margin"].as_f64().unwrap() > 0.5 {
            assert_eq!(
                argmax(logits) as u64,
                top[0].as_u64().unwrap(),
                "{name}: greedy token"
            );
        }
    }
    let n = cases.len() as f64;
    eprintln!(
        "worst {ours_worst:.4} (llama.cpp {llama_worst:.4}), mean {:.4} (llama.cpp {:.4})",
        ours_sum / n,
        llama_sum / n
    );
    assert!(
        ours_worst <= llama_worst,
        "worst {ours_worst} > llama.cpp's {llama_worst}"
    );
    assert!(
        ours_sum <= llama_sum,
        "mean {} > llama.cpp's {}",
        ours_sum / n,
        llama_sum / n
    );
}

/// The decode layout (`interleave_decoder_weights`, which `gemma run` and `gemma serve` apply
/// at load) changes no number: the default model's Q8_0 embedding (its LM head, 170 MB)
/// interleaved, in the resident copy and moved out of the mapping, gives the same logits bit
/// for bit as the file as stored, for a prompt and for the decode steps after it.
#[test]
fn interleaved_weights_give_the_same_logits_bit_for_bit() {
    let path = ensure_default_model().expect("default model");
    let load = |resident: bool, interleave: bool| {
        let mut file = open_model_source(&path).unwrap();
        let ModelFile::Gguf(gguf) = &mut file else {
            panic!("default model is GGUF")
        };
        if resident {
            gguf.make_resident().unwrap();
        }
        let done = if interleave {
            gemma_models::interleave_decoder_weights(gguf).unwrap()
        } else {
            0
        };
        (load_model(&file).unwrap(), done)
    };
    let (mut stored, _) = load(true, false);
    let ids: Vec<u32> = vec![
        2, 818, 5279, 529, 7001, 563, 496, 1821, 236743, 236770, 236771,
    ];
    let run = |model: &mut Model| -> Vec<f32> {
        let mut cache = model.new_cache(256).unwrap();
        let mut all = model
            .forward(&ids, &mut cache, Logits::All)
            .unwrap()
            .to_vec();
        let mut next = argmax(&all[all.len() - model.vocab_size()..]);
        for _ in 0..4 {
            let step = model.forward(&[next], &mut cache, Logits::Last).unwrap();
            next = argmax(step);
            all.extend_from_slice(step);
        }
        all
    };
    let want = run(&mut stored);
    for resident in [true, false] {
        let (mut model, done) = load(resident, true);
        // Only where the CPU has the kernels (AVX2 and above; never with GEMMA_ISA=scalar).
        if gemma_models::gemma_kernels::interleaving_pays(
            gemma_models::gemma_kernels::GgmlType::Q8_0,
            262_144,
            640,
        ) {
            assert!(
                done >= 160 << 20,
                "the embedding was interleaved: {done} bytes"
            );
        }
        let got = run(&mut model);
        assert_eq!(got.len(), want.len());
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "resident {resident}: {differ} logits differ");
    }
}

/// What `load` (the path of `gemma run`, `serve` and `bench`) does to a GGUF once read: the
/// decoder's matrices take the decode layout where the CPU has its kernels, and the vocabulary
/// arrays, once the tokenizer is built from them, are freed from the file's metadata.
#[test]
fn loading_interleaves_the_decoder_and_frees_the_vocabulary_arrays() {
    use gemma_formats::TensorSource;
    use gemma_models::gemma_kernels::{interleaving_pays, GgmlType};
    let loaded = gemma_engine::load(None, &gemma_engine::LoadOptions::default()).unwrap();
    let ModelFile::Gguf(gguf) = &loaded.file else {
        panic!("default model is GGUF")
    };
    assert_eq!(gguf.elided_len("tokenizer.ggml.tokens"), Some(262_144));
    assert_eq!(gguf.elided_len("tokenizer.ggml.scores"), Some(262_144));
    let embedding = gguf.tensor("token_embd.weight").unwrap();
    let pays = interleaving_pays(GgmlType::Q8_0, 262_144, 640)
        && std::env::var("GEMMA_INTERLEAVE").map_or(true, |v| v != "0");
    assert_eq!(embedding.interleaved, pays);
    // The tokenizer built before the arrays went still gives the reference's ids.
    let tokenizer = loaded.tokenizer.as_ref().expect("the GGUF's tokenizer");
    let (text, ids, _) = &reference_cases()[0];
    assert_eq!(&tokenizer.encode(text, true, true).unwrap(), ids);
}
