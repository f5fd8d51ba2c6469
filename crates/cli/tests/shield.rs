//! `gemma shield` on the tiny ShieldGemma fixtures (scripts/make_shield_fixtures.py): JSON output
//! equal to transformers' P(Yes), the exit codes `--threshold` gives (0 pass, 1 flagged, 2
//! error), and bad inputs refused with one line.

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::{gemma, stderr, stdout};
use serde_json::Value;

fn fixture(name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/shield_tiny");
    dir.join(name).to_string_lossy().into_owned()
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap()
}

fn results(out: &Output) -> Vec<Value> {
    let v: Value = serde_json::from_str(&stdout(out)).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {} / {}", stdout(out), stderr(out));
    });
    v["results"].as_array().unwrap().clone()
}

/// Exit code 2, one `error:` line mentioning every needle, no panic.
fn assert_error(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing: {err}");
    }
}

#[test]
fn image_policies_as_json_match_transformers() {
    let r = reference();
    let img = fixture("img_a_97x73.png");
    let custom = r["image_custom_policy"].as_str().unwrap();
    let out = gemma(
        &[
            "shield",
            "-q",
            "--cache-type",
            "f32",
            "--model",
            &fixture("image"),
            "--image",
            &img,
            "--policy",
            "dangerous",
            "--policy",
            "sexual",
            "--policy",
            "violence",
            "--policy-text",
            custom,
            "--json",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got = results(&out);
    let want: Vec<&Value> = r["image_cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["image"] == "img_a_97x73.png")
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g["input"], img.as_str());
        assert_eq!(g["policy"], w["policy"]);
        let (g, w) = (g["p_yes"].as_f64().unwrap(), w["p_yes"].as_f64().unwrap());
        assert!((g - w).abs() < 1e-4, "{g} vs {w}");
    }
    // Without --policy: the three built-in image policies, per image, in order.
    let out = gemma(
        &[
            "shield",
            "-q",
            "--cache-type",
            "f32",
            "--model",
            &fixture("image_published"),
            "--image",
            &img,
            "--image",
            &fixture("img_b_50x120.png"),
            "--json",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let policies: Vec<String> = results(&out)
        .iter()
        .map(|g| g["policy"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        policies,
        [
            "dangerous",
            "sexual",
            "violence",
            "dangerous",
            "sexual",
            "violence"
        ]
    );
}

#[test]
fn text_policies_for_prompts_and_responses_match_transformers() {
    let r = reference();
    for input in ["prompt", "prompt_response"] {
        let cases: Vec<&Value> = r["text_cases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["input"] == input)
            .collect();
        let user = cases[0]["user_prompt"].as_str().unwrap();
        let model = fixture("text");
        let mut args = vec![
            "shield",
            "-q",
            "--cache-type",
            "f32",
            "--model",
            &model,
            "--text",
            user,
            "--json",
        ];
        if let Some(resp) = cases[0]["response"].as_str() {
            args.extend(["--response", resp]);
        }
        for p in ["dangerous", "harassment", "hate", "sexual"] {
            args.extend(["--policy", p]);
        }
        let custom = r["text_custom_policy"].as_str().unwrap();
        args.extend(["--policy-text", custom]);
        let out = gemma(&args, None);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let got = results(&out);
        assert_eq!(got.len(), cases.len());
        for (g, w) in got.iter().zip(&cases) {
            assert_eq!(g["policy"], w["policy"]);
            let expected_input = if input == "prompt" {
                "text"
            } else {
                "response"
            };
            assert_eq!(g["input"], expected_input);
            let (g, w) = (g["p_yes"].as_f64().unwrap(), w["p_yes"].as_f64().unwrap());
            assert!((g - w).abs() < 1e-4, "{input}: {g} vs {w}");
        }
    }
}

#[test]
fn threshold_sets_the_exit_code() {
    let r = reference();
    let case = r["text_cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["input"] == "prompt" && c["policy"] == "harassment")
        .unwrap();
    let p = case["p_yes"].as_f64().unwrap();
    let user = case["user_prompt"].as_str().unwrap();
    let model = fixture("text");
    let run = |t: f64, stdin: bool| {
        let t = format!("{t}");
        let mut args = vec![
            "shield",
            "-q",
            "--cache-type",
            "f32",
            "--model",
            &model,
            "--policy",
            "harassment",
        ];
        args.extend(["--threshold", &t]);
        if stdin {
            args.extend(["--file", "-"]);
            gemma(&args, Some(user))
        } else {
            args.extend(["--text", user]);
            gemma(&args, None)
        }
    };
    let below = run(p + 0.05, false);
    assert_eq!(below.status.code(), Some(0), "{}", stderr(&below));
    let above = run(p - 0.05, false);
    assert_eq!(above.status.code(), Some(1), "{}", stderr(&above));
    // The plain output still lists the probability: `P(Yes)<TAB>policy<TAB>input`.
    let line = stdout(&above);
    let fields: Vec<&str> = line.trim_end().split('\t').collect();
    assert_eq!(fields[1..], ["harassment", "text"], "{line}");
    assert!(
        (fields[0].parse::<f64>().unwrap() - p).abs() < 1e-4,
        "{line}"
    );
    // The text from stdin, as in a pipeline.
    assert_eq!(run(p - 0.05, true).status.code(), Some(1));
    assert_eq!(run(p + 0.05, true).status.code(), Some(0));
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let img = fixture("img_a_97x73.png");
    let text_model = fixture("text");
    let image_model = fixture("image");
    let vision_model = fixture("../gemma3_vision_tiny/hf");
    let gemma2_model = fixture("../gemma2_tiny");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        // An image for a text-only shield.
        (
            vec!["--model", &text_model, "--image", &img],
            vec!["takes no images"],
        ),
        // Text for ShieldGemma 2.
        (
            vec!["--model", &image_model, "--text", "hi"],
            vec!["image classifier"],
        ),
        // A model without Yes/No tokens (the Gemma 3 vision fixture's tiny vocabulary).
        (
            vec!["--model", &vision_model, "--image", &img],
            vec!["not a safety classifier", "\"Yes\""],
        ),
        // A model without a tokenizer.
        (
            vec!["--model", &gemma2_model, "--text", "hi"],
            vec!["no tokenizer"],
        ),
        // An empty policy.
        (
            vec![
                "--model",
                &text_model,
                "--text",
                "hi",
                "--policy-text",
                "  ",
            ],
            vec!["empty"],
        ),
        // A policy longer than the context.
        (
            vec!["--model", &text_model, "--text", "hi", "--ctx-size", "100"],
            vec!["more than the context of 100 tokens"],
        ),
        // An unknown policy name (checked before the model loads).
        (
            vec![
                "--model",
                &text_model,
                "--text",
                "hi",
                "--policy",
                "violence",
            ],
            vec!["unknown policy \"violence\""],
        ),
        // No input, a response without its prompt, a bad threshold, a missing image.
        (vec!["--model", &text_model], vec!["nothing to classify"]),
        (
            vec!["--model", &text_model, "--response", "x"],
            vec!["--response needs"],
        ),
        (
            vec!["--model", &text_model, "--text", "x", "--threshold", "2"],
            vec!["--threshold"],
        ),
        (
            vec!["--model", &image_model, "--image", "/nonexistent.png"],
            vec!["cannot read the image"],
        ),
        (vec!["--text", "x"], vec!["needs --model"]),
    ];
    for (args, needles) in cases {
        let mut all = vec!["shield", "-q"];
        all.extend(args);
        let out = gemma(&all, None);
        assert_error(&out, &needles);
    }
    // A corrupt image.
    let dir = common::TempDir::new("shield");
    let bad = dir.file("bad.png", b"not an image");
    let bad = bad.to_string_lossy().into_owned();
    let out = gemma(
        &[
            "shield",
            "-q",
            "--cache-type",
            "f32",
            "--model",
            &image_model,
            "--image",
            &bad,
        ],
        None,
    );
    assert_error(&out, &["bad.png"]);
}

/// `gemma serve --shield ...` with a bad filter set-up: one error line, exit 1, before the
/// server starts (never at the first request).
fn serve_with_shield(shield: &str, extra: &[&str]) -> Output {
    let main =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_vision_tiny/hf");
    let mut args = vec![
        "serve",
        "-q",
        "--model",
        main.to_str().unwrap(),
        "--port",
        "0",
        "--shield",
        shield,
    ];
    args.extend_from_slice(extra);
    gemma(&args, None)
}

fn assert_start_up_error(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("serving"),
        "{err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing: {err}");
    }
}

#[test]
fn serve_refuses_a_bad_shield_set_up_at_start_up() {
    let text = fixture("text");
    let out = serve_with_shield(&text, &["--shield-policies", "harassment,nonsense"]);
    assert_start_up_error(&out, &["unknown policy \"nonsense\"", "--shield-policies"]);
    let out = serve_with_shield(&text, &["--shield-policy-text", " "]);
    assert_start_up_error(&out, &["--shield-policy-text", "empty"]);
    let out = serve_with_shield(&text, &["--shield-policies", "violence"]);
    assert_start_up_error(&out, &["image policy", "no --shield model checks images"]);
    let out = serve_with_shield(&text, &["--shield-threshold", "1.5"]);
    assert_start_up_error(&out, &["--shield-threshold"]);
    // A classifier context too small for the policies' prompts.
    let out = serve_with_shield(&text, &["--shield-ctx", "32"]);
    assert_start_up_error(&out, &["more than the context of 32 tokens"]);
    let out = serve_with_shield(&text, &["--shield-ctx", "0"]);
    assert_start_up_error(&out, &["--shield-ctx"]);
    // A model without a tokenizer's "Yes"/"No" is no classifier.
    let out = serve_with_shield(&fixture("../gemma2_tiny"), &[]);
    assert_start_up_error(&out, &["--shield", "no tokenizer"]);
}
