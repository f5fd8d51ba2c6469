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
    let row = |key: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key:?} row: {out}"))
            .trim_start()[key.len()..]
            .trim()
            .to_string()
    };
    assert_eq!(row("architecture"), "gemma3");
    assert_eq!(row("layers"), "18");
    assert!(row("format").starts_with("GGUF v3"), "{out}");
    assert!(row("kind").starts_with("base (pretrained)"), "{out}");
    assert!(
        row("KV cache at --ctx-size 1024").ends_with("(f16)"),
        "{out}"
    );
    let (json, _) = ok(
        &["info", "--json", "--model", &model, "--ctx-size", "1024"],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["name"], "Gemma 3 270m");
    assert_eq!(v["tuning"], "base");
    assert_eq!(v["vocab_size"], 262144);
    assert_eq!(v["hyper_parameters"]["layers"], "18");
    assert!(
        v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["type"] == "Q4_K"),
        "{v}"
    );
    let memory = &v["memory"];
    assert_eq!(memory["ctx_size"], 1024);
    assert_eq!(
        memory["total_bytes"].as_u64().unwrap(),
        memory["weights_bytes"].as_u64().unwrap() + memory["kv_cache_bytes"].as_u64().unwrap()
    );
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

/// The default model is a base model: `run` continues the prompt as written, with the base
/// sampling defaults, and says so once on stderr; `--chat` and `--raw` opt out.
#[test]
fn a_base_model_continues_the_prompt_and_says_so() {
    let model = real_model();
    let prompt = "The three primary colors are";
    let (continued, note) = ok(
        &["run", "--model", &model, "--temp", "0", "-n", "10", prompt],
        None,
    );
    let notes: Vec<&str> = note
        .lines()
        .filter(|l| l.contains("base (pretrained)"))
        .collect();
    assert_eq!(notes.len(), 1, "one line about the model's kind: {note}");
    assert!(
        notes[0].contains("Gemma 3 270m") && notes[0].contains("--chat"),
        "{note}"
    );
    // The same as the raw prompt under the base defaults (greedy: the penalty is what shows).
    let (raw, raw_err) = ok(
        &[
            "run",
            "-q",
            "--model",
            &model,
            "--raw",
            "--temp",
            "0",
            "-n",
            "10",
            "--repeat-penalty",
            "1.1",
            "--min-p",
            "0.05",
            "--top-k",
            "40",
            prompt,
        ],
        None,
    );
    assert_eq!(continued, raw);
    assert!(!raw_err.contains("base (pretrained)"), "{raw_err}");
    // --chat renders the template: a different prompt, so (here) a different answer, no note.
    let (chat, chat_err) = ok(
        &[
            "run", "--model", &model, "--chat", "--temp", "0", "-n", "10", prompt,
        ],
        None,
    );
    assert!(!chat_err.contains("base (pretrained)"), "{chat_err}");
    let prompt_tokens = |err: &str| -> usize {
        let line = err.lines().find(|l| l.contains("gemma: prompt ")).unwrap();
        line.split("gemma: prompt ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // The raw prompt is BOS + 5 tokens; the template adds the turn markers.
    assert!(
        prompt_tokens(&chat_err) > prompt_tokens(&note) + 4,
        "{note}\n{chat_err}"
    );
    assert!(!chat.trim().is_empty());
    let both = gemma(&["run", "--model", &model, "--chat", "--raw", prompt], None);
    assert!(!both.status.success());
}

/// `--logit-bias` (ID=BIAS or llama.cpp's ID+BIAS) steers greedy decoding; bad values are
/// clean errors.
#[test]
fn logit_bias_forces_and_bans_tokens() {
    let model = real_model();
    let greedy = [
        "run", "-q", "--model", &model, "--raw", "--temp", "0", "-n", "1",
    ];
    let run = |extra: &[&str]| {
        ok(
            &[&greedy[..], extra, &["The capital of France is"]].concat(),
            None,
        )
        .0
    };
    let plain = run(&[]);
    let tokenize = |text: &str| -> Vec<u32> {
        let (out, _) = ok(
            &["tokenize", "-q", "--model", &model, "--no-bos", text],
            None,
        );
        serde_json::from_str(out.trim()).unwrap()
    };
    let zebra = tokenize(" zebra")[0].to_string();
    let forced = run(&["--logit-bias", &format!("{zebra}+100")]);
    assert_eq!(forced.trim(), "zebra", "{forced:?}");
    let first = tokenize(plain.trim_end_matches('\n'))[0].to_string();
    let banned = run(&["-l", &format!("{first}=-100")]);
    assert_ne!(banned, plain);
    for bad in ["abc=1", "5=101", "5", "999999999=1"] {
        let out = gemma(&[&greedy[..], &["--logit-bias", bad, "x"]].concat(), None);
        assert!(!out.status.success(), "{bad}");
        assert!(
            stderr(&out).contains("logit-bias") || stderr(&out).contains("logit_bias"),
            "{bad}: {}",
            stderr(&out)
        );
    }
}
