//! Bad input must end in one clear line on stderr and exit code 1, never a panic.

mod common;

use std::io::Read;

use common::{assert_clean_error, gemma, real_model, TempDir};
use gemma_formats::{GgmlType, GgufWriter, MetaValue};

fn info(model: &std::path::Path) -> std::process::Output {
    gemma(
        &["info", "--quiet", "--model", model.to_str().unwrap()],
        None,
    )
}

/// A small, valid GGUF: the given architecture and one f32 tensor of 1024 values.
fn small_gguf(architecture: &str) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_metadata(
        "general.architecture",
        MetaValue::String(architecture.into()),
    )
    .unwrap();
    let data: Vec<u8> = (0..1024u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    w.add_tensor("token_embd.weight", GgmlType::F32, &[1024], data)
        .unwrap();
    w
}

#[test]
fn nonexistent_path() {
    let dir = TempDir::new("missing");
    let missing = dir.path().join("no-such-model.gguf");
    assert_clean_error(&info(&missing), &["no-such-model.gguf", "does not exist"]);
}

#[test]
fn ten_byte_file() {
    let dir = TempDir::new("tiny");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&[0, 0]);
    assert_eq!(bytes.len(), 10);
    let path = dir.file("tiny.gguf", &bytes);
    assert_clean_error(&info(&path), &["tiny.gguf", "truncated"]);
}

#[test]
fn real_model_cut_to_one_megabyte() {
    let dir = TempDir::new("cut");
    let mut head = vec![0u8; 1 << 20];
    std::fs::File::open(real_model())
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    let path = dir.file("cut.gguf", &head);
    // The cut falls inside the vocabulary array, whose declared length no longer fits.
    assert_clean_error(&info(&path), &["cut.gguf", "tokenizer.ggml.tokens"]);
}

#[test]
fn wrong_magic() {
    let dir = TempDir::new("magic");
    let mut bytes = b"GGML".to_vec();
    bytes.extend_from_slice(&[0u8; 60]);
    let path = dir.file("wrong-magic.gguf", &bytes);
    assert_clean_error(&info(&path), &["magic"]);
}

#[test]
fn absurd_tensor_count() {
    let dir = TempDir::new("count");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&(1u64 << 60).to_le_bytes()); // tensor count
    bytes.extend_from_slice(&0u64.to_le_bytes()); // metadata count
    bytes.extend_from_slice(&[0u8; 64]);
    let path = dir.file("count.gguf", &bytes);
    assert_clean_error(&info(&path), &["count", &(1u64 << 60).to_string()]);
}

#[test]
fn tensor_past_end_of_file() {
    let dir = TempDir::new("past-end");
    let path = dir.path().join("short.gguf");
    small_gguf("gemma3").write_file(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // Drop the second half of the tensor's 4096 bytes.
    std::fs::write(&path, &bytes[..bytes.len() - 2048]).unwrap();
    assert_clean_error(&info(&path), &["token_embd.weight", "past the end"]);
}

#[test]
fn unknown_architecture() {
    let dir = TempDir::new("arch");
    let path = dir.path().join("arch.gguf");
    small_gguf("mamba9").write_file(&path).unwrap();
    assert_clean_error(&info(&path), &["mamba9"]);
    let run = gemma(
        &["run", "--quiet", "--model", path.to_str().unwrap(), "hi"],
        None,
    );
    assert_clean_error(&run, &["mamba9"]);
}

#[test]
fn a_text_file_is_not_a_model() {
    let dir = TempDir::new("text");
    let path = dir.file("notes.txt", b"hello, I am not a model\n");
    assert_clean_error(&info(&path), &["notes.txt"]);
}

#[test]
fn prompt_longer_than_the_context() {
    let model = real_model();
    let prompt = "one two three four five six seven eight nine ten eleven twelve";
    let out = gemma(
        &[
            "run",
            "--quiet",
            "--model",
            &model,
            "--ctx-size",
            "8",
            "--raw",
            "--temp",
            "0",
            "-n",
            "4",
            prompt,
        ],
        None,
    );
    assert_clean_error(&out, &["prompt has", "context size is 8"]);
}

#[test]
fn invalid_sampling_option() {
    let dir = TempDir::new("opts");
    let missing = dir.path().join("never-loaded.gguf");
    let out = gemma(
        &[
            "run",
            "--quiet",
            "--model",
            missing.to_str().unwrap(),
            "--top-p",
            "1.5",
            "hi",
        ],
        None,
    );
    assert_clean_error(&out, &["--top-p"]);
}

#[test]
fn zero_threads() {
    let dir = TempDir::new("threads");
    let missing = dir.path().join("never-loaded.gguf");
    let out = gemma(
        &[
            "info",
            "--threads",
            "0",
            "--model",
            missing.to_str().unwrap(),
        ],
        None,
    );
    assert_clean_error(&out, &["--threads"]);
}

fn tiny_model() -> String {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_tiny");
    dir.to_string_lossy().into_owned()
}

#[test]
fn non_finite_sampling_options_are_refused() {
    let dir = TempDir::new("inf");
    let missing = dir.path().join("never-loaded.gguf");
    for (flag, value) in [
        ("--temp", "inf"),
        ("--top-p", "NaN"),
        ("--presence-penalty", "-inf"),
    ] {
        // `--flag=value`, so that "-inf" is not read as a flag.
        let option = format!("{flag}={value}");
        let out = gemma(
            &[
                "run",
                "--quiet",
                "--model",
                missing.to_str().unwrap(),
                &option,
                "hi",
            ],
            None,
        );
        assert_clean_error(&out, &["finite"]);
    }
}

#[test]
fn threads_above_the_core_count_are_clamped_with_a_warning() {
    let model = tiny_model();
    let out = gemma(
        &[
            "logits",
            "--quiet",
            "--threads",
            "1000",
            "--model",
            &model,
            "--ids",
            "2,5",
        ],
        None,
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    let err = common::stderr(&out);
    assert!(
        err.contains("--threads 1000") && err.contains("cores"),
        "{err}"
    );
}

#[test]
fn bench_depth_past_the_trained_context_is_refused() {
    // 100 million positions of depth: a 51 GB cache on the real model, an abort before.
    let model = tiny_model();
    let out = gemma(
        &[
            "bench",
            "--quiet",
            "-m",
            &model,
            "-p",
            "0",
            "-n",
            "1",
            "-d",
            "100000000",
        ],
        None,
    );
    assert_clean_error(&out, &["trained context"]);
}

/// `gemma run --json-schema FILE` with the default model and `extra` options.
fn run_with_schema(schema: &str, extra: &[&str]) -> std::process::Output {
    let model = real_model();
    let dir = TempDir::new("schema");
    let path = dir.file("cyclic.json", schema.as_bytes());
    let mut args = vec!["run", "--quiet", "--model", &model, "--temp", "0"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--json-schema", path.to_str().unwrap(), "Invent a record."]);
    gemma(&args, None)
}

#[test]
fn json_schemas_without_a_finite_document_fail_before_generating() {
    let cyclic = r##"{"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}"##;
    let self_ref = r##"{"$ref": "#"}"##;
    let required_recursion =
        r##"{"type": "object", "properties": {"next": {"$ref": "#"}}, "required": ["next"]}"##;
    for schema in [cyclic, self_ref, required_recursion] {
        let out = run_with_schema(schema, &[]);
        assert_clean_error(&out, &["cyclic.json", "recursive", "levels"]);
        assert!(out.stdout.is_empty(), "{schema}: {:?}", out.stdout);
    }
    let dangling = r##"{"properties": {"a": {"$ref": "#/$defs/missing"}}}"##;
    assert_clean_error(
        &run_with_schema(dangling, &[]),
        &["#/$defs/missing", "points nowhere"],
    );
    let unsupported = r##"{"type": "object", "not": {"required": ["a"]}}"##;
    assert_clean_error(
        &run_with_schema(unsupported, &[]),
        &["unsupported JSON schema", "not"],
    );
    assert_clean_error(&run_with_schema("{\"type\": ", &[]), &["not valid JSON"]);
}

#[test]
fn a_json_answer_cut_by_the_token_limit_is_an_error() {
    let schema =
        r##"{"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}"##;
    let out = run_with_schema(schema, &["-n", "3"]);
    assert_clean_error(&out, &["cut short after 3 tokens"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.starts_with('{'), "{printed}");
}
