//! Hugging Face folders (single file and sharded) written with the `safetensors` serializer,
//! read back through `HfFolder`, plus `open_model_source` dispatch.

mod common;

use std::path::Path;

use common::{assert_mentions, TempDir};
use gemma_formats::{
    open_model_source, FormatError, GgmlType, GgufWriter, HfError, HfFolder, MetaValue, ModelFile,
    TensorSource,
};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes a safetensors file holding `tensors` (name, dtype, shape, bytes).
fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (*name, TensorView::new(*dtype, shape.clone(), data).unwrap())
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn write_config(dir: &Path) {
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "gemma3_text", "hidden_size": 640}"#,
    )
    .unwrap();
}

fn single_file_folder() -> TempDir {
    let dir = TempDir::new("hf-single");
    write_config(dir.path());
    write_safetensors(
        &dir.path().join("model.safetensors"),
        &[
            (
                "model.norm.weight",
                Dtype::F32,
                vec![2, 3],
                f32_bytes(&[1., 2., 3., 4., 5., 6.]),
            ),
            (
                "model.embed.weight",
                Dtype::BF16,
                vec![4],
                vec![1, 2, 3, 4, 5, 6, 7, 8],
            ),
            ("lm_head.weight", Dtype::F16, vec![2, 2], vec![9; 8]),
        ],
    );
    dir
}

#[test]
fn single_file_folder_reads_back() {
    let dir = single_file_folder();
    let folder = HfFolder::open(dir.path()).unwrap();
    assert_eq!(folder.config()["hidden_size"], 640);
    assert_eq!(folder.tensor_names().len(), 3);

    let norm = folder.tensor("model.norm.weight").unwrap();
    assert_eq!(norm.dtype, GgmlType::F32);
    assert_eq!(norm.shape, vec![2, 3]);
    assert_eq!(norm.data.bytes(), &f32_bytes(&[1., 2., 3., 4., 5., 6.])[..]);

    let embed = folder.tensor("model.embed.weight").unwrap();
    assert_eq!(embed.dtype, GgmlType::BF16);
    assert_eq!(embed.data.bytes(), &[1, 2, 3, 4, 5, 6, 7, 8]);

    let head = folder.tensor("lm_head.weight").unwrap();
    assert_eq!(head.dtype, GgmlType::F16);
    assert_eq!(head.shape, vec![2, 2]);
    assert!(folder.tensor("missing").is_none());
    assert!(folder.tokenizer_json_path().is_none());
    assert!(folder.chat_template().is_none());
}

#[test]
fn tokenizer_files_and_chat_template() {
    let dir = single_file_folder();
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "from tokenizer_config", "add_bos_token": true}"#,
    )
    .unwrap();
    let folder = HfFolder::open(dir.path()).unwrap();
    assert_eq!(
        folder.tokenizer_json_path(),
        Some(dir.path().join("tokenizer.json"))
    );
    assert_eq!(folder.tokenizer_config().unwrap()["add_bos_token"], true);
    assert_eq!(
        folder.chat_template().as_deref(),
        Some("from tokenizer_config")
    );

    std::fs::write(
        dir.path().join("chat_template.json"),
        r#"{"chat_template": "from chat_template.json"}"#,
    )
    .unwrap();
    assert_eq!(
        folder.chat_template().as_deref(),
        Some("from chat_template.json")
    );

    std::fs::write(dir.path().join("chat_template.jinja"), "from jinja").unwrap();
    assert_eq!(folder.chat_template().as_deref(), Some("from jinja"));
}

#[test]
fn named_chat_templates_pick_default() {
    let dir = single_file_folder();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
    )
    .unwrap();
    let folder = HfFolder::open(dir.path()).unwrap();
    assert_eq!(folder.chat_template().as_deref(), Some("D"));
}

/// Two shards plus an index; returns the folder.
fn sharded_folder() -> TempDir {
    let dir = TempDir::new("hf-sharded");
    write_config(dir.path());
    write_safetensors(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &[
            ("a", Dtype::F32, vec![2], f32_bytes(&[1., 2.])),
            ("b", Dtype::F32, vec![1], f32_bytes(&[3.])),
        ],
    );
    write_safetensors(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[("c", Dtype::BF16, vec![3], vec![1, 2, 3, 4, 5, 6])],
    );
    write_index(
        dir.path(),
        &[
            ("a", "model-00001-of-00002.safetensors"),
            ("b", "model-00001-of-00002.safetensors"),
            ("c", "model-00002-of-00002.safetensors"),
        ],
    );
    dir
}

fn write_index(dir: &Path, entries: &[(&str, &str)]) {
    let map: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|(t, s)| (t.to_string(), serde_json::Value::from(*s)))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 18}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_folder_reads_back() {
    let dir = sharded_folder();
    let folder = HfFolder::open(dir.path()).unwrap();
    assert_eq!(folder.shard_paths().len(), 2);
    assert_eq!(folder.tensor_names(), vec!["a", "b", "c"]);
    assert_eq!(
        folder.tensor("a").unwrap().data.bytes(),
        &f32_bytes(&[1., 2.])[..]
    );
    assert_eq!(
        folder.tensor("b").unwrap().data.bytes(),
        &f32_bytes(&[3.])[..]
    );
    let c = folder.tensor("c").unwrap();
    assert_eq!(c.dtype, GgmlType::BF16);
    assert_eq!(c.shape, vec![3]);
    assert_eq!(c.data.bytes(), &[1, 2, 3, 4, 5, 6]);
}

#[test]
fn unsupported_dtype_names_tensor_and_dtype() {
    let dir = TempDir::new("hf-dtype");
    write_config(dir.path());
    write_safetensors(
        &dir.path().join("model.safetensors"),
        &[("model.layers.0.ids", Dtype::I32, vec![2], vec![0; 8])],
    );
    let err = HfFolder::open(dir.path()).unwrap_err();
    assert!(matches!(err, HfError::UnsupportedDtype { .. }), "{err:?}");
    assert_mentions(&err, &["'model.layers.0.ids'", "I32"]);
}

#[test]
fn missing_shard() {
    let dir = sharded_folder();
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = HfFolder::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, HfError::MissingShard { ref tensor, .. } if tensor == "c"),
        "{err:?}"
    );
    assert_mentions(&err, &["model-00002-of-00002.safetensors", "'c'"]);
}

#[test]
fn index_entry_missing_from_its_shard() {
    let dir = sharded_folder();
    write_index(
        dir.path(),
        &[
            ("a", "model-00001-of-00002.safetensors"),
            ("c", "model-00001-of-00002.safetensors"),
        ],
    );
    let err = HfFolder::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, HfError::TensorNotInShard { ref tensor, .. } if tensor == "c"),
        "{err:?}"
    );
}

#[test]
fn shard_names_cannot_leave_the_folder() {
    let dir = sharded_folder();
    write_index(dir.path(), &[("a", "../model-00001-of-00002.safetensors")]);
    let err = HfFolder::open(dir.path()).unwrap_err();
    assert!(matches!(err, HfError::BadIndex { .. }), "{err:?}");
    assert_mentions(&err, &["weight_map['a']"]);
}

#[test]
fn index_without_weight_map() {
    let dir = sharded_folder();
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{}").unwrap();
    let err = HfFolder::open(dir.path()).unwrap_err();
    assert!(matches!(err, HfError::BadIndex { .. }), "{err:?}");
    assert_mentions(&err, &["weight_map"]);
}

#[test]
fn duplicate_tensor_across_shards() {
    let dir = sharded_folder();
    write_safetensors(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[
            ("c", Dtype::BF16, vec![3], vec![0; 6]),
            ("a", Dtype::F32, vec![2], vec![0; 8]),
        ],
    );
    let err = HfFolder::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, HfError::DuplicateTensor { ref tensor, .. } if tensor == "a"),
        "{err:?}"
    );
}

#[test]
fn bad_safetensors_headers() {
    let dir = single_file_folder();
    let weights = dir.path().join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();
    let cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}".to_vec(),
        u64::MAX.to_le_bytes().to_vec(),
        good[..good.len() - 1].to_vec(),
    ];
    for bytes in cases {
        std::fs::write(&weights, &bytes).unwrap();
        let err = HfFolder::open(dir.path()).unwrap_err();
        assert!(matches!(err, HfError::Header { .. }), "{err:?}");
        assert_mentions(&err, &["model.safetensors", "header"]);
    }
}

#[test]
fn missing_config_and_missing_weights() {
    let dir = TempDir::new("hf-empty");
    let err = HfFolder::open(dir.path()).unwrap_err();
    assert!(matches!(err, HfError::Io { .. }), "{err:?}");
    assert_mentions(&err, &["config.json"]);

    write_config(dir.path());
    let err = HfFolder::open(dir.path()).unwrap_err();
    assert!(matches!(err, HfError::NoWeights { .. }), "{err:?}");

    std::fs::write(dir.path().join("config.json"), "{oops").unwrap();
    let err = HfFolder::open(dir.path()).unwrap_err();
    assert!(matches!(err, HfError::Json { .. }), "{err:?}");
}

#[test]
fn open_model_source_dispatches_on_path_kind() {
    let folder = single_file_folder();
    assert!(matches!(
        open_model_source(folder.path()).unwrap(),
        ModelFile::Hf(_)
    ));

    let gguf_path = folder.path().join("renamed.bin");
    let mut writer = GgufWriter::new();
    writer
        .add_metadata("general.architecture", MetaValue::String("gemma3".into()))
        .unwrap()
        .add_tensor("w", GgmlType::F32, &[1], vec![0; 4])
        .unwrap();
    writer.write_file(&gguf_path).unwrap();
    let model = open_model_source(&gguf_path).unwrap();
    assert!(matches!(model, ModelFile::Gguf(_)));
    assert_eq!(model.tensor_names(), vec!["w"]);

    let err = open_model_source(&folder.path().join("nope.gguf")).unwrap_err();
    assert!(matches!(err, FormatError::NotFound { .. }), "{err:?}");
    assert_mentions(&err, &["nope.gguf", "does not exist"]);

    let err = open_model_source(&folder.path().join("model.safetensors")).unwrap_err();
    assert!(matches!(err, FormatError::Unrecognized { .. }), "{err:?}");
    assert_mentions(&err, &["pass the folder"]);

    let broken = folder.path().join("broken.gguf");
    std::fs::write(&broken, b"GGML").unwrap();
    let err = open_model_source(&broken).unwrap_err();
    assert!(matches!(err, FormatError::Gguf(_)), "{err:?}");
    assert_mentions(&err, &["magic"]);
}
