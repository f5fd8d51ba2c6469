//! The commands on the real default model (fetched on first use). Few tokens each: the point
//! is the plumbing, not the model's prose.

mod common;

use common::{gemma, real_model, stderr, stdout, TempDir};
use serde_json::Value;

fn ok(args: &[&str], stdin: Option<&str>) -> (String, String) {
    let out = gemma(args, stdin);
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "gemma {args:?} failed: {e}");
    assert!(!e.contains("panicked"), "{e}");
    (o, e)
}

#[test]
fn tokenize_starts_with_bos() {
    let model = real_model();
    let (out, _) = ok(
        &["tokenize", "--quiet", "--model", &model, "Hello world"],
        None,
    );
    let ids: Vec<u32> = serde_json::from_str(out.trim()).expect("a JSON array of ids");
    assert_eq!(ids.first(), Some(&2), "{out}");
    assert!(ids.len() >= 3, "{out}");

    let (out, _) = ok(
        &[
            "tokenize",
            "--quiet",
            "--no-bos",
            "--model",
            &model,
            "Hello world",
        ],
        None,
    );
    let no_bos: Vec<u32> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(no_bos, ids[1..]);
}

#[test]
fn tokenize_parses_special_tokens_unless_told_not_to() {
    let model = real_model();
    let text = "<start_of_turn>user";
    let (out, _) = ok(
        &["tokenize", "-q", "--no-bos", "--model", &model, text],
        None,
    );
    let special: Vec<u32> = serde_json::from_str(out.trim()).unwrap();
    let (out, _) = ok(
        &[
            "tokenize",
            "-q",
            "--no-bos",
            "--no-special",
            "--model",
            &model,
            text,
        ],
        None,
    );
    let plain: Vec<u32> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        special.len(),
        2,
        "<start_of_turn> is one token: {special:?}"
    );
    assert!(plain.len() > special.len(), "{plain:?}");
}

#[test]
fn greedy_run_is_deterministic_and_reports_speed() {
    let model = real_model();
    let args = [
        "run",
        "--model",
        &model,
        "--temp",
        "0",
        "-n",
        "8",
        "Name a color of the sky.",
    ];
    let (first, err) = ok(&args, None);
    // The second run reads the weights from the file mapping instead of a copy in memory.
    let (second, mapped_err) = ok(&[&["--mmap"], &args[..]].concat(), None);
    assert!(!first.trim().is_empty(), "no text generated");
    assert_eq!(first, second);
    assert!(err.contains("tok/s"), "speed report missing: {err}");
    assert!(err.contains("in memory"), "{err}");
    assert!(mapped_err.contains("memory-mapped"), "{mapped_err}");

    let both = gemma(&[&["--mmap", "--no-mmap"], &args[..]].concat(), None);
    assert!(!both.status.success());
    assert!(
        stderr(&both).contains("cannot be used with"),
        "{}",
        stderr(&both)
    );
}

#[test]
fn stop_string_cuts_the_output() {
    let model = real_model();
    let base = [
        "run", "-q", "--model", &model, "--raw", "--temp", "0", "-n", "12",
    ];
    let prompt = "The numbers from one to ten are: one, two,";
    let (full, _) = ok(&[&base[..], &[prompt]].concat(), None);
    let full = full.trim_end_matches('\n');
    // Stop at the second half of the continuation: what came before must be all we get.
    let cut = full
        .char_indices()
        .map(|(i, _)| i)
        .nth(full.chars().count() / 2)
        .unwrap();
    let stop = &full[cut..];
    assert!(!stop.trim().is_empty(), "continuation too short: {full:?}");
    let (stopped, _) = ok(&[&base[..], &["--stop", stop, prompt]].concat(), None);
    assert_eq!(
        stopped.trim_end_matches('\n'),
        &full[..full.find(stop).unwrap()]
    );
}

#[test]
fn chat_answers_each_piped_line() {
    let model = real_model();
    let (out, err) = ok(
        &["chat", "--model", &model, "--temp", "0", "-n", "12"],
        Some("Hello!\nWhat is two plus two?\n/exit\nthis line is never read\n"),
    );
    assert!(!out.trim().is_empty(), "no answers");
    let turns = err.lines().filter(|l| l.contains("generated")).count();
    assert_eq!(turns, 2, "expected two answers: {err}");
}

#[test]
fn info_describes_gemma3() {
    let model = real_model();
    let (out, _) = ok(&["info", "--model", &model, "--ctx-size", "1024"], None);
    assert!(out.contains("architecture: gemma3"), "{out}");
    assert!(out.contains("layers: 18"), "{out}");
    assert!(out.contains("GGUF v3"), "{out}");
    assert!(out.contains("q4_K") || out.contains("Q4_K"), "{out}");
    assert!(out.contains("KV cache at --ctx-size 1024"), "{out}");
}

#[test]
fn logits_for_a_prompt_and_for_its_ids_agree() {
    let model = real_model();
    let (out, _) = ok(
        &[
            "logits",
            "-q",
            "--model",
            &model,
            "--top",
            "5",
            "The capital of France is",
        ],
        None,
    );
    let json: Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<u64> = json["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ids[0], 2);
    let top = json["top"].as_array().unwrap();
    assert_eq!(top.len(), 5);
    let logits: Vec<f64> = top.iter().map(|p| p[1].as_f64().unwrap()).collect();
    assert!(
        logits.windows(2).all(|w| w[0] >= w[1]),
        "not sorted: {logits:?}"
    );

    let id_list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let (by_ids, _) = ok(
        &[
            "logits", "-q", "--model", &model, "--top", "5", "--ids", &id_list,
        ],
        None,
    );
    let by_ids: Value = serde_json::from_str(&by_ids).unwrap();
    assert_eq!(by_ids["top"], json["top"]);
}

#[test]
fn perplexity_of_a_small_text() {
    let model = real_model();
    let dir = TempDir::new("ppl");
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(8);
    let file = dir.file("text.txt", text.as_bytes());
    let (out, _) = ok(
        &[
            "perplexity",
            "-q",
            "--model",
            &model,
            "--chunk-size",
            "32",
            file.to_str().unwrap(),
        ],
        None,
    );
    let ppl: f64 = out
        .strip_prefix("PPL = ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no PPL in {out:?}"));
    // A repeated sentence is very predictable once seen: far below the vocabulary size.
    assert!(ppl.is_finite() && (1.0..50.0).contains(&ppl), "{out}");
}
