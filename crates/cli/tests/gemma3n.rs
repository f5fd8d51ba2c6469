//! The CLI on the tiny Gemma 3n fixture (no tokenizer): `logits --ids` agrees with
//! transformers for the full model and for MatFormer sub-models chosen with `--matformer`
//! (narrower MLPs, and skipped layers), `extract` writes standalone sub-models with the same
//! logits, `info` reports the memory-mapped PLE table, `bench` runs on the tiny vocabulary with
//! and without `--matformer`, and bad inputs end in one clear error line.

mod common;

use std::path::PathBuf;

use common::{
    assert_clean_error, assert_tokenize_and_run_continue, gemma, stderr, stdout, TempDir,
};
use serde_json::Value;

fn fixture(name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3n_tiny");
    dir.join(name).to_string_lossy().into_owned()
}

/// (ids as "a,b,c", the last position's logits, per-layer widths if any).
fn reference(name: &str) -> (String, Vec<f64>, Option<Vec<u64>>) {
    let r: Value = serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap();
    let ids: Vec<String> = r["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let last = r["logits"].as_array().unwrap().last().unwrap();
    let last = last
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let widths = r["intermediate_size"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap()).collect());
    (ids.join(","), last, widths)
}

/// `gemma logits --top 5` → [(id, logit)], with the exact (f32) KV cache the references are
/// held to.
fn top5(extra: &[&str], ids: &str) -> Vec<(usize, f64)> {
    let mut args = vec![
        "logits",
        "-q",
        "--cache-type",
        "f32",
        "--top",
        "5",
        "--ids",
        ids,
    ];
    args.extend_from_slice(extra);
    let out = gemma(&args, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    json["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_f64().unwrap()))
        .collect()
}

fn assert_matches(got: &[(usize, f64)], want: &[f64], what: &str) {
    let mut order: Vec<usize> = (0..want.len()).collect();
    order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
    let ids: Vec<usize> = got.iter().map(|p| p.0).collect();
    assert_eq!(ids, order[..5], "{what}");
    for &(id, v) in got {
        assert!(
            (v - want[id]).abs() < 1e-3,
            "{what}: id {id}: {v} vs {}",
            want[id]
        );
    }
}

fn matformer_file(dir: &TempDir) -> String {
    let (_, _, widths) = reference("reference_matformer.json");
    let json = serde_json::json!({ "ffn_widths": widths.unwrap() }).to_string();
    dir.file("sub.json", json.as_bytes())
        .to_string_lossy()
        .into_owned()
}

/// The layer-skipping sub-model of `reference_matformer_skip.json` as a config file.
fn skip_file(dir: &TempDir) -> String {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("reference_matformer_skip.json")).unwrap(),
    )
    .unwrap();
    let json = serde_json::json!({
        "ffn_widths": r["intermediate_size"],
        "layers_to_skip": r["layers_to_skip"],
    })
    .to_string();
    dir.file("skip.json", json.as_bytes())
        .to_string_lossy()
        .into_owned()
}

#[test]
fn layer_skipping_sub_model_in_place_and_extracted_matches_transformers() {
    let dir = TempDir::new("g3n-skip");
    let config = skip_file(&dir);
    let (ids, want, _) = reference("reference_matformer_skip.json");
    for model in [fixture("model.gguf"), fixture("")] {
        let got = top5(&["--model", &model, "--matformer", &config], &ids);
        assert_matches(&got, &want, &format!("{model} --matformer skip"));
    }
    let out_path = dir.path().join("skip.gguf").to_string_lossy().into_owned();
    let out = gemma(
        &[
            "extract",
            "-q",
            "--matformer",
            &config,
            &fixture("model.gguf"),
            &out_path,
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let size = |p: &str| std::fs::metadata(p).unwrap().len();
    assert!(size(&out_path) < size(&fixture("model.gguf")));
    let extracted = top5(&["--model", &out_path], &ids);
    assert_matches(&extracted, &want, "extracted skip.gguf");

    let info = info_json(&["--model", &out_path]);
    let hp = &info["hyper_parameters"];
    assert_eq!(hp["layers"], "5", "{info}");
    assert_eq!(hp["ffn"], "16,32,24,40,48", "{info}");
    assert!(
        info.to_string().contains("last 2 layers reuse earlier K/V"),
        "{info}"
    );
    let info = info_json(&["--model", &fixture("model.gguf"), "--matformer", &config]);
    assert_eq!(
        info["hyper_parameters"]["layers"], "5 (MatFormer: 8 stored, skipping 1,3,5)",
        "{info}"
    );
}

#[test]
fn bench_runs_on_a_tiny_vocabulary_with_and_without_matformer() {
    let dir = TempDir::new("g3n-bench");
    let config = skip_file(&dir);
    let gguf = fixture("model.gguf");
    let args = [
        "bench", "-m", &gguf, "-p", "16", "-n", "4", "-d", "0,8", "-r", "2",
    ];
    let out = gemma(&[&args[..], &["--json"]].concat(), None);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let tests: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["test"].as_str().unwrap())
        .collect();
    assert_eq!(tests, ["pp16", "pp16 @ d8", "tg4", "tg4 @ d8"]);
    for row in rows.as_array().unwrap() {
        assert!(row["tokens_per_second"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["samples_ts"].as_array().unwrap().len(), 2);
    }
    // The sub-model is the one benchmarked: the load log names its kept layers.
    let out = gemma(&[&args[..], &["--matformer", &config]].concat(), None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("MatFormer sub-model: layers [0, 2, 4, 6, 7]"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("| tg4 @ d8 |"), "{}", stdout(&out));
    let bad = dir.file("bad.json", br#"{"layers_to_skip": [4]}"#);
    let out = gemma(
        &[&args[..], &["-q", "--matformer", &bad.to_string_lossy()]].concat(),
        None,
    );
    assert_clean_error(&out, &["skips layer 4", "KV-shared layer 6"]);
}

/// `--read-bandwidth`: a measured rate, the weight bytes a generated token reads (every tensor
/// but the per-layer embedding table, read a row per token) and each generation test's share
/// of the limit those two set.
#[test]
fn bench_reports_bytes_per_token_and_the_bandwidth_limit() {
    let gguf = fixture("model.gguf");
    let file = gemma_formats::GgufFile::open(std::path::Path::new(&gguf)).unwrap();
    let all: usize = file.tensors().iter().map(|t| t.n_bytes).sum();
    let ple: usize = file
        .tensors()
        .iter()
        .filter(|t| t.name == "per_layer_token_embd.weight")
        .map(|t| t.n_bytes)
        .sum();
    assert!(ple > 0, "the fixture has a per-layer embedding table");
    let args = [
        "bench",
        "-m",
        &gguf,
        "-p",
        "8",
        "-n",
        "4",
        "-r",
        "1",
        "--read-bandwidth",
        "--json",
    ];
    let out = gemma(&args, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Value = serde_json::from_str(&stdout(&out)).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(
            row["weight_bytes_per_token"].as_u64(),
            Some((all - ple) as u64),
            "{row}"
        );
        let bw = row["read_bandwidth_bytes_per_s"].as_f64().unwrap();
        assert!(bw.is_finite() && bw > 1e8, "{row}");
        let fraction = &row["fraction_of_bandwidth_limit"];
        if row["n_gen"].as_u64() == Some(4) {
            let ts = row["tokens_per_second"].as_f64().unwrap();
            let want = ts * (all - ple) as f64 / bw;
            assert!(
                (fraction.as_f64().unwrap() - want).abs() < 1e-9 * want.max(1.0),
                "{row}"
            );
        } else {
            assert!(fraction.is_null(), "prompt tests get no fraction: {row}");
        }
    }
    // Without the flag, no measurement (and no 1 GiB buffer).
    let out = gemma(
        &args[..args.len() - 2]
            .iter()
            .chain(&["--json"])
            .copied()
            .collect::<Vec<_>>(),
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(rows[0]["read_bandwidth_bytes_per_s"].is_null(), "{rows}");
}

#[test]
fn logits_by_ids_match_transformers_full_and_matformer() {
    let (ids, full, _) = reference("reference.json");
    for model in [fixture("model.gguf"), fixture("")] {
        assert_matches(&top5(&["--model", &model], &ids), &full, &model);
    }
    let dir = TempDir::new("g3n-mf");
    let config = matformer_file(&dir);
    let (ids, sliced, _) = reference("reference_matformer.json");
    for model in [fixture("model.gguf"), fixture("")] {
        let got = top5(&["--model", &model, "--matformer", &config], &ids);
        assert_matches(&got, &sliced, &format!("{model} --matformer"));
    }
}

#[test]
fn extract_writes_a_standalone_sub_model_with_the_same_logits() {
    let dir = TempDir::new("g3n-extract");
    let config = matformer_file(&dir);
    let out_path = dir.path().join("sub.gguf").to_string_lossy().into_owned();
    let out = gemma(
        &[
            "extract",
            "-q",
            "--matformer",
            &config,
            "--ple-type",
            "q8_0",
            &fixture("model.gguf"),
            &out_path,
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let size = |p: &str| std::fs::metadata(p).unwrap().len();
    assert!(size(&out_path) < size(&fixture("model.gguf")));

    let (ids, sliced, _) = reference("reference_matformer.json");
    let in_place = top5(
        &["--model", &fixture("model.gguf"), "--matformer", &config],
        &ids,
    );
    let extracted = top5(&["--model", &out_path], &ids);
    assert_eq!(
        in_place.iter().map(|p| p.0).collect::<Vec<_>>(),
        extracted.iter().map(|p| p.0).collect::<Vec<_>>()
    );
    // Only the PLE table was quantized (Q8_0): logits stay within its rounding.
    for ((_, a), (_, b)) in in_place.iter().zip(&extracted) {
        assert!((a - b).abs() < 0.05, "{a} vs {b}");
    }
    assert!((extracted[0].1 - sliced[extracted[0].0]).abs() < 0.05);

    let info = info_json(&["--model", &out_path]);
    assert_eq!(info["architecture"], "gemma3n", "{info}");
    assert_eq!(
        info["hyper_parameters"]["ffn"], "16,32,32,48,16,16,32,48",
        "{info}"
    );
    let types: Vec<&str> = info["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"Q8_0"), "{info}");
    assert!(
        info["memory"]["per_layer_embeddings_bytes"]
            .as_u64()
            .unwrap()
            > 0,
        "{info}"
    );
}

#[test]
fn info_and_text_commands_on_the_fixture() {
    for model in [fixture("model.gguf"), fixture("")] {
        let out = gemma(&["info", "--model", &model], None);
        assert!(out.status.success(), "{}", stderr(&out));
        // The readable table...
        let text = stdout(&out);
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().eq(["architecture", "gemma3n"])),
            "{text}"
        );
        assert!(text.contains("per-layer embeddings"), "{text}");
        // ...and the same facts for scripts.
        let info = info_json(&["--model", &model]);
        assert_eq!(info["architecture"], "gemma3n");
        assert_eq!(info["hyper_parameters"]["layers"], "8", "{info}");
        assert!(
            info["vocab_size"].is_null(),
            "the fixture has no tokenizer: {info}"
        );
        let run = gemma(&["run", "-q", "--model", &model, "hello"], None);
        assert_clean_error(&run, &["no tokenizer"]);
        let tokenize = gemma(&["tokenize", "-q", "--model", &model, "hello"], None);
        assert_clean_error(&tokenize, &["no tokenizer"]);
    }
}

#[test]
fn bad_matformer_inputs_are_one_clear_error() {
    let dir = TempDir::new("g3n-bad");
    let gguf = fixture("model.gguf");
    let (ids, _, _) = reference("reference.json");
    let wide = dir.file("wide.json", br#"{"ffn_widths": 4096}"#);
    let short = dir.file("short.json", br#"{"ffn_widths": [16, 16]}"#);
    let source = dir.file(
        "source.json",
        br#"{"ffn_widths": 16, "layers_to_skip": [2]}"#,
    );
    let past = dir.file("past.json", br#"{"layers_to_skip": [3, 8]}"#);
    let twice = dir.file("twice.json", br#"{"layers_to_skip": [3, 3]}"#);
    let all = dir.file(
        "all.json",
        br#"{"layers_to_skip": [0, 1, 2, 3, 4, 5, 6, 7]}"#,
    );
    let cases = [
        (wide, "4096 units, but the checkpoint stores only 32"),
        (short, "2 MLP widths for a model of 8 layers"),
        (
            source,
            "skips layer 2, whose keys and values the kept KV-shared layer 5 reads",
        ),
        (past, "skips layer 8, but the model has 8 layers"),
        (twice, "lists layer 3 twice"),
        (all, "skips all 8 layers"),
        (dir.path().join("absent.json"), "absent.json"),
    ];
    for (config, needle) in &cases {
        let config = config.to_string_lossy();
        let out = gemma(
            &[
                "logits",
                "-q",
                "--model",
                &gguf,
                "--matformer",
                &config,
                "--ids",
                &ids,
            ],
            None,
        );
        assert_clean_error(&out, &[needle]);
        let target = dir.path().join("x.gguf");
        let out = gemma(
            &[
                "extract",
                "-q",
                "--matformer",
                &config,
                &gguf,
                &target.to_string_lossy(),
            ],
            None,
        );
        assert_clean_error(&out, &[needle]);
        assert!(!target.exists());
    }
    let out = gemma(&["extract", "-q", &gguf, "/tmp/never.gguf"], None);
    assert_clean_error(&out, &["nothing to extract"]);
    let out = gemma(
        &[
            "extract",
            "-q",
            "--ple-type",
            "q5_9",
            &gguf,
            "/tmp/never.gguf",
        ],
        None,
    );
    assert_clean_error(&out, &["q5_9"]);
    let gemma3 = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_tiny");
    let config = dir.file("ok.json", br#"{"ffn_widths": 16}"#);
    let out = gemma(
        &[
            "logits",
            "-q",
            "--model",
            &gemma3.to_string_lossy(),
            "--matformer",
            &config.to_string_lossy(),
            "--ids",
            "2,3",
        ],
        None,
    );
    assert_clean_error(&out, &["Gemma 3n"]);
}

#[test]
fn tokenize_and_run_with_a_tokenizer_continue_like_transformers() {
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap();
    assert_tokenize_and_run_continue(&fixture("model.gguf"), &r);
}

/// `gemma info --json` with `args`, parsed.
fn info_json(args: &[&str]) -> serde_json::Value {
    let out = gemma(&[&["info", "--json"], args].concat(), None);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}
