//! ShieldGemma 2 (images) and text ShieldGemma (Gemma 2) against transformers
//! (fixtures/shield_tiny, made by scripts/make_shield_fixtures.py): each prompt's text and token
//! ids exactly, and P(Yes) within 1e-4, for every built-in policy and a custom one, from both
//! ShieldGemma 2 checkpoint layouts; the policies of one input batched over their shared prefix
//! equal to one forward pass per prompt (within 1e-5), also when a kept cache checks a growing
//! reply; and the checks that refuse what cannot be classified.

use std::path::{Path, PathBuf};

use gemma_engine::gemma_models::CacheType;
use gemma_engine::shield::{Modality, SHIELDGEMMA2_TEMPLATE};
use gemma_engine::{
    load, resolve_policies, ImageOptions, LoadOptions, LoadedModel, PolicySpec, Session, Shield,
    ShieldCache, ShieldInput, ShieldPrompt,
};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/shield_tiny")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(case: &Value) -> Vec<u32> {
    case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn load_model(path: &Path) -> LoadedModel {
    load(
        Some(path),
        &LoadOptions {
            cache_type: CacheType::F32,
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

fn spec(case: &Value, custom_key: &str) -> PolicySpec {
    let policy = case["policy"].as_str().unwrap();
    if policy == "custom" {
        PolicySpec::Custom(reference()[custom_key].as_str().unwrap().to_owned())
    } else {
        PolicySpec::Named(policy.to_owned())
    }
}

fn check_image_layout(layout: &str) {
    let reference = reference();
    let loaded = load_model(&fixture_dir().join(layout));
    let shield = Shield::new(&loaded, 4096).unwrap();
    assert_eq!(
        shield.yes_no(),
        (
            reference["yes_token_id"].as_u64().unwrap() as u32,
            reference["no_token_id"].as_u64().unwrap() as u32
        )
    );
    assert!(shield.takes_images());
    assert!(!shield.takes_text(), "ShieldGemma 2 classifies images only");
    let cases = reference["image_cases"].as_array().unwrap();
    let mut worst = 0f32;
    for case in cases {
        let policies =
            resolve_policies(Modality::Image, &[spec(case, "image_custom_policy")]).unwrap();
        let policy = &policies[0];
        assert_eq!(policy.text(false), case["policy_text"].as_str().unwrap());
        let file = case["image"].as_str().unwrap();
        let bytes = std::fs::read(fixture_dir().join(file)).unwrap();
        let image = loaded
            .prepare_image(&bytes, &ImageOptions::default())
            .unwrap();
        let input = ShieldInput::Image {
            label: file,
            image: &image,
        };
        let prompt = shield.prompt(&input, policy).unwrap();
        assert_eq!(
            prompt.text,
            case["prompt"].as_str().unwrap(),
            "{file} {}",
            policy.name
        );
        assert_eq!(prompt.ids, ids(case), "{file} {}", policy.name);
        let got = shield.classify(&[input], &policies, &[]).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].policy, case["policy"].as_str().unwrap());
        let want = case["p_yes"].as_f64().unwrap() as f32;
        let diff = (got[0].p_yes - want).abs();
        worst = worst.max(diff);
        assert!(
            diff < 1e-4,
            "{layout} {file} {}: P(Yes) {} vs reference {want}",
            policy.name,
            got[0].p_yes
        );
    }
    eprintln!(
        "{layout}: {} image cases, max |ΔP(Yes)| = {worst:.2e}",
        cases.len()
    );
}

#[test]
fn shieldgemma2_matches_transformers() {
    check_image_layout("image");
}

#[test]
fn shieldgemma2_published_layout_matches_transformers() {
    check_image_layout("image_published");
}

#[test]
fn built_in_template_is_the_converters() {
    // The fixture's chat_template.jinja is what transformers saved from the converter's
    // template; the engine's copy (used when a model file has none) must be the same text.
    let saved = std::fs::read_to_string(fixture_dir().join("image/chat_template.jinja")).unwrap();
    assert_eq!(saved, SHIELDGEMMA2_TEMPLATE);
}

#[test]
fn all_image_policies_in_one_call() {
    let reference = reference();
    let loaded = load_model(&fixture_dir().join("image"));
    let shield = Shield::new(&loaded, 4096).unwrap();
    let specs = [
        PolicySpec::Named("dangerous".into()),
        PolicySpec::Named("sexual".into()),
        PolicySpec::Named("violence".into()),
        PolicySpec::Custom(reference["image_custom_policy"].as_str().unwrap().into()),
    ];
    let policies = resolve_policies(Modality::Image, &specs).unwrap();
    let files = ["img_a_97x73.png", "img_b_50x120.png"];
    let images: Vec<_> = files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(fixture_dir().join(f)).unwrap();
            loaded
                .prepare_image(&bytes, &ImageOptions::default())
                .unwrap()
        })
        .collect();
    let inputs: Vec<_> = files
        .iter()
        .zip(&images)
        .map(|(f, image)| ShieldInput::Image { label: f, image })
        .collect();
    let got = shield.classify(&inputs, &policies, &[]).unwrap();
    let cases = reference["image_cases"].as_array().unwrap();
    assert_eq!(got.len(), cases.len());
    for (g, case) in got.iter().zip(cases) {
        assert_eq!(g.input, case["image"].as_str().unwrap());
        assert_eq!(g.policy, case["policy"].as_str().unwrap());
        assert!((g.p_yes - case["p_yes"].as_f64().unwrap() as f32).abs() < 1e-4);
    }
}

#[test]
fn text_shieldgemma_matches_transformers() {
    let reference = reference();
    let loaded = load_model(&fixture_dir().join("text"));
    assert_eq!(loaded.model.architecture(), "gemma2");
    let shield = Shield::new(&loaded, 4096).unwrap();
    assert!(shield.takes_text() && !shield.takes_images());
    let cases = reference["text_cases"].as_array().unwrap();
    let mut worst = 0f32;
    for case in cases {
        let policies =
            resolve_policies(Modality::Text, &[spec(case, "text_custom_policy")]).unwrap();
        let response = case["response"].as_str();
        let input = ShieldInput::Text {
            label: "text",
            prompt: case["user_prompt"].as_str().unwrap(),
            response,
        };
        let prompt = shield.prompt(&input, &policies[0]).unwrap();
        let what = format!("{} {}", case["input"], case["policy"]);
        assert_eq!(prompt.text, case["prompt"].as_str().unwrap(), "{what}");
        assert_eq!(prompt.ids, ids(case), "{what}");
        let got = shield.classify(&[input], &[], &policies).unwrap();
        let want = case["p_yes"].as_f64().unwrap() as f32;
        let diff = (got[0].p_yes - want).abs();
        worst = worst.max(diff);
        assert!(
            diff < 1e-4,
            "{what}: P(Yes) {} vs reference {want}",
            got[0].p_yes
        );
    }
    eprintln!("{} text cases, max |ΔP(Yes)| = {worst:.2e}", cases.len());
}

#[test]
fn bad_inputs_are_refused() {
    let text = load_model(&fixture_dir().join("text"));
    let shield = Shield::new(&text, 4096).unwrap();
    // An image for a text-only shield.
    let err = shield
        .check_modality(Modality::Image)
        .unwrap_err()
        .to_string();
    assert!(err.contains("takes no images"), "{err}");
    // A policy longer than the context.
    let small = Shield::new(&text, 64).unwrap();
    let policies = resolve_policies(Modality::Text, &[]).unwrap();
    let err = small
        .check_text_policies(&policies, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than the context of 64 tokens"), "{err}");
    let input = ShieldInput::Text {
        label: "text",
        prompt: "hello",
        response: None,
    };
    let err = small
        .classify(&[input], &[], &policies)
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than the context"), "{err}");
    // Text for ShieldGemma 2.
    let image = load_model(&fixture_dir().join("image"));
    let err = Shield::new(&image, 4096)
        .unwrap()
        .check_modality(Modality::Text)
        .unwrap_err()
        .to_string();
    assert!(err.contains("image classifier"), "{err}");
    // A model without a tokenizer is no classifier.
    let gemma2 = load_model(&fixture_dir().join("../gemma2_tiny"));
    let err = Shield::new(&gemma2, 4096).err().unwrap().to_string();
    assert!(err.contains("no tokenizer"), "{err}");
}

/// P(Yes) of each prompt with one forward pass of its own (the unbatched reference).
fn one_at_a_time(loaded: &LoadedModel, shield: &Shield<'_>, prompts: &[ShieldPrompt]) -> Vec<f32> {
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap();
    let mut session = Session::new(loaded, longest).unwrap();
    prompts
        .iter()
        .map(|p| shield.p_yes(&mut session, p).unwrap())
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < tol, "{what}: {got:?} vs {want:?}");
    worst
}

#[test]
fn batched_policies_equal_one_at_a_time() {
    let reference = reference();
    // Text: the four policies and a custom one, on a prompt and on a response.
    let loaded = load_model(&fixture_dir().join("text"));
    let shield = Shield::new(&loaded, 4096).unwrap();
    let mut specs: Vec<PolicySpec> = ["dangerous", "harassment", "hate", "sexual"]
        .iter()
        .map(|p| PolicySpec::Named((*p).into()))
        .collect();
    specs.push(PolicySpec::Custom(
        reference["text_custom_policy"].as_str().unwrap().into(),
    ));
    let policies = resolve_policies(Modality::Text, &specs).unwrap();
    let cases = reference["text_cases"].as_array().unwrap();
    let mut worst = 0f32;
    for response in [None, cases[5]["response"].as_str()] {
        let input = ShieldInput::Text {
            label: "text",
            prompt: cases[0]["user_prompt"].as_str().unwrap(),
            response,
        };
        let prompts = shield.prompts(&input, &policies).unwrap();
        let mut cache = ShieldCache::new();
        let batched = shield.p_yes_all(&mut cache, &prompts).unwrap();
        let stats = cache.stats();
        let common = stats.prefix_fed;
        assert!(
            common > 20 && stats.reused == 0,
            "the prompts share their preamble and input: {stats:?}"
        );
        let total: usize = prompts.iter().map(|p| p.ids.len()).sum();
        assert_eq!(
            common + stats.suffix_fed,
            total - (prompts.len() - 1) * common
        );
        let single = one_at_a_time(&loaded, &shield, &prompts);
        worst = worst.max(assert_close(&batched, &single, 1e-5, "text"));
        // And the fixture's reference values.
        let kind = if response.is_some() {
            "prompt_response"
        } else {
            "prompt"
        };
        let want: Vec<f32> = cases
            .iter()
            .filter(|c| c["input"] == kind)
            .map(|c| c["p_yes"].as_f64().unwrap() as f32)
            .collect();
        assert_close(&batched, &want, 1e-4, "text vs transformers");
    }
    // Images: the three policies and a custom one on each image (the image's soft tokens are
    // in the shared prefix).
    let loaded = load_model(&fixture_dir().join("image"));
    let shield = Shield::new(&loaded, 4096).unwrap();
    let specs = [
        PolicySpec::Named("dangerous".into()),
        PolicySpec::Named("sexual".into()),
        PolicySpec::Named("violence".into()),
        PolicySpec::Custom(reference["image_custom_policy"].as_str().unwrap().into()),
    ];
    let policies = resolve_policies(Modality::Image, &specs).unwrap();
    let mut cache = ShieldCache::new();
    for (k, file) in ["img_a_97x73.png", "img_b_50x120.png"].iter().enumerate() {
        let bytes = std::fs::read(fixture_dir().join(file)).unwrap();
        let image = loaded
            .prepare_image(&bytes, &ImageOptions::default())
            .unwrap();
        let input = ShieldInput::Image {
            label: file,
            image: &image,
        };
        let prompts = shield.prompts(&input, &policies).unwrap();
        // One placement of the image for all policies.
        for p in &prompts[1..] {
            assert!(std::sync::Arc::ptr_eq(
                &p.soft[0].embeds,
                &prompts[0].soft[0].embeds
            ));
        }
        let batched = shield.p_yes_all(&mut cache, &prompts).unwrap();
        let stats = cache.stats();
        let image_end = prompts[0].soft[0].range(loaded.model.hidden_size()).end;
        assert!(
            stats.reused + stats.prefix_fed > image_end,
            "the image is in the shared prefix: {stats:?}"
        );
        if k == 1 {
            // The kept cache holds the first image's prompt: at most the tokens before the
            // image are reused (none here: the fixture's small sliding window no longer holds
            // them), never the other image's soft tokens.
            let image_at = prompts[0].soft[0].start;
            assert!(stats.reused <= image_at, "{stats:?}");
        }
        let single = one_at_a_time(&loaded, &shield, &prompts);
        worst = worst.max(assert_close(&batched, &single, 1e-5, file));
    }
    eprintln!("batched vs one at a time: max |ΔP(Yes)| = {worst:.2e}");
}

#[test]
fn a_kept_cache_checks_a_growing_reply_incrementally() {
    // As the server checks a streamed reply: every window, the response prompt with the reply
    // so far. The kept cache's results equal a fresh cache's and one pass per prompt, and each
    // check feeds the new part of the reply (plus the policies' suffixes), not all of it.
    let reference = reference();
    let loaded = load_model(&fixture_dir().join("text"));
    let shield = Shield::new(&loaded, 4096).unwrap();
    let policies = resolve_policies(Modality::Text, &[]).unwrap();
    let user = reference["text_cases"][0]["user_prompt"].as_str().unwrap();
    let reply = "Mix flour, water, salt and yeast in a bowl. Knead the dough for ten minutes, \
                 until it is smooth and springs back.\n\nLet it rise for an hour, shape it, \
                 let it rise again, then bake it at 230 degrees for forty minutes. Cool it \
                 on a rack before you cut it: the crumb is still setting.";
    // Long enough to outgrow the first cache.
    let reply = [reply; 4].join(" ");
    let words: Vec<&str> = reply.split_inclusive(' ').collect();
    let mut kept = ShieldCache::new();
    let mut worst = 0f32;
    let mut grown = 0;
    let ends = (3..=words.len()).step_by(5).chain([words.len()]);
    for (checks, end) in ends.enumerate() {
        let so_far: String = words[..end].concat();
        let input = ShieldInput::Text {
            label: "response",
            prompt: user,
            response: Some(&so_far),
        };
        let prompts = shield.prompts(&input, &policies).unwrap();
        let room = kept.capacity();
        let incremental = shield.p_yes_all(&mut kept, &prompts).unwrap();
        let stats = kept.stats();
        if checks > 0 && kept.capacity() > room {
            grown += 1;
        }
        let mut fresh = ShieldCache::new();
        let from_scratch = shield.p_yes_all(&mut fresh, &prompts).unwrap();
        let common = fresh.stats().prefix_fed;
        assert_eq!(stats.reused + stats.prefix_fed, common, "{stats:?}");
        if checks > 0 {
            // Everything up to about the end of the last reply is reused (its last tokens
            // may change: retokenization); the new words, the end of turn and the principle's
            // heading are fed (the policies' suffixes after them are in suffix_fed).
            assert!(stats.reused > 40, "{stats:?}");
            assert!(
                stats.prefix_fed < 50,
                "only the new words are fed: {stats:?}"
            );
        }
        worst = worst.max(assert_close(&incremental, &from_scratch, 1e-5, &so_far));
        let single = one_at_a_time(&loaded, &shield, &prompts);
        worst = worst.max(assert_close(&incremental, &single, 1e-5, &so_far));
    }
    // The reply outgrew its cache and the prefix moved into the larger one: the checks after
    // that still reused it (asserted above).
    assert!(
        grown >= 1,
        "the cache never grew (capacity {})",
        kept.capacity()
    );
    eprintln!("kept cache vs fresh prompts: max |ΔP(Yes)| = {worst:.2e}");
}

#[test]
fn a_primed_cache_feeds_only_the_first_window() {
    // As the server primes a stream's cache while the main model prefills: the response
    // prompt up to the reply. The first window's check then reuses the preamble and the user's
    // text, feeds the window and the suffixes, and gives the fresh prompt's P(Yes).
    let reference = reference();
    let loaded = load_model(&fixture_dir().join("text"));
    let shield = Shield::new(&loaded, 4096).unwrap();
    let policies = resolve_policies(Modality::Text, &[]).unwrap();
    let user = reference["text_cases"][0]["user_prompt"].as_str().unwrap();
    let user = format!("{user} Explain every step, and say what can go wrong with each.");
    let mut worst = 0f32;
    for first_window in ["Mix", " Sure", "1.", "\n\nFirst, mix the flour"] {
        let mut primed = ShieldCache::new();
        let head = ShieldInput::Text {
            label: "response",
            prompt: &user,
            response: Some(""),
        };
        shield.prime(&mut primed, &head, &policies).unwrap();
        let input = ShieldInput::Text {
            label: "response",
            prompt: &user,
            response: Some(first_window),
        };
        let prompts = shield.prompts(&input, &policies).unwrap();
        let got = shield.p_yes_all(&mut primed, &prompts).unwrap();
        let stats = primed.stats();
        let mut fresh = ShieldCache::new();
        let want = shield.p_yes_all(&mut fresh, &prompts).unwrap();
        let common = fresh.stats().prefix_fed;
        assert_eq!(stats.reused + stats.prefix_fed, common, "{stats:?}");
        // The user's text is in the primed part; the window, the few tokens before it that
        // may tokenize with it, the end of turn and the heading are fed.
        let user_tokens = loaded.encode_prompt(&user).unwrap().len();
        let window_tokens = loaded.encode_prompt(first_window).unwrap().len();
        assert!(stats.reused > user_tokens, "{first_window:?}: {stats:?}");
        assert!(
            stats.prefix_fed < window_tokens + 25,
            "{first_window:?}: {stats:?}"
        );
        worst = worst.max(assert_close(&got, &want, 1e-5, first_window));
        let single = one_at_a_time(&loaded, &shield, &prompts);
        worst = worst.max(assert_close(&got, &single, 1e-5, first_window));
    }
    // A prompt that does not fit the classifier is refused and leaves the cache empty.
    let small = Shield::new(&loaded, 64).unwrap();
    let mut cache = ShieldCache::new();
    let long = "bread ".repeat(100);
    let head = ShieldInput::Text {
        label: "response",
        prompt: &long,
        response: Some(""),
    };
    assert!(small.prime(&mut cache, &head, &policies).is_err());
    eprintln!("primed vs fresh: max |ΔP(Yes)| = {worst:.2e}");
}
