//! The real default model, checked against the header dump in
//! fixtures/formats/default_model_gguf.json (written by scripts/make_gguf_reference.py with
//! the PyPI `gguf` reader).

use std::path::PathBuf;
use std::time::Instant;

use gemma_formats::{GgmlType, GgufFile, MetaValue, TensorSource};
use serde_json::Value;

fn model_path() -> Option<PathBuf> {
    let cache = std::env::var_os("GEMMA_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("gemma-rs")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/gemma-rs")))?;
    let path = cache.join("models/gemma-3-270m-q4_k_m.gguf");
    path.is_file().then_some(path)
}

fn reference() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/formats/default_model_gguf.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Compares one parsed value with the reference's JSON rendering of it.
fn matches_json(value: &MetaValue, expected: &Value) -> bool {
    match value {
        MetaValue::String(s) => expected.as_str() == Some(s),
        MetaValue::Bool(b) => expected.as_bool() == Some(*b),
        MetaValue::F32(f) => expected.as_f64() == Some(f64::from(*f)),
        MetaValue::F64(f) => expected.as_f64() == Some(*f),
        other => match (other.as_i64(), expected.as_i64()) {
            (Some(a), Some(b)) => a == b,
            _ => other.as_u64().is_some() && other.as_u64() == expected.as_u64(),
        },
    }
}

fn type_name(ggml_name: &str) -> &str {
    match ggml_name {
        "FLOAT32" => "f32",
        "FLOAT64" => "f64",
        "UINT8" => "u8",
        "INT8" => "i8",
        "UINT16" => "u16",
        "INT16" => "i16",
        "UINT32" => "u32",
        "INT32" => "i32",
        "UINT64" => "u64",
        "INT64" => "i64",
        "BOOL" => "bool",
        "STRING" => "string",
        other => panic!("unexpected type {other}"),
    }
}

#[test]
fn real_model_header_matches_reference() {
    let Some(path) = model_path() else {
        eprintln!("skipping: default model not in the cache (the engine tests fetch it)");
        return;
    };
    let started = Instant::now();
    let file = GgufFile::open(&path).unwrap();
    eprintln!("opened {} in {:?}", path.display(), started.elapsed());
    let reference = reference();

    assert_eq!(file.version(), 3);
    assert_eq!(reference["version"], 3);
    assert_eq!(file.tensors().len(), 236);
    assert_eq!(reference["tensor_count"], 236);
    assert_eq!(file.metadata().len(), 33);
    assert_eq!(reference["kv_count"], 33);
    assert_eq!(
        file.alignment() as u64,
        reference["alignment"].as_u64().unwrap()
    );
    assert_eq!(
        file.data_offset() as u64,
        reference["data_offset"].as_u64().unwrap()
    );
    assert_eq!(
        file.file_size() as u64,
        reference["file_size"].as_u64().unwrap()
    );
    assert_eq!(file.architecture().unwrap(), "gemma3");

    // Metadata: same keys in the same order, same types and values.
    let keys: Vec<&str> = file.metadata().iter().map(|(k, _)| k.as_str()).collect();
    let expected_keys: Vec<&str> = reference["metadata_keys_in_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(keys, expected_keys);
    for (key, value) in file.metadata() {
        let expected = &reference["metadata"][key];
        let types = expected["type"].as_array().unwrap();
        match value {
            MetaValue::Array(items) => {
                assert_eq!(types[0], "ARRAY", "{key}");
                assert_eq!(
                    items.len() as u64,
                    expected["length"].as_u64().unwrap(),
                    "{key}"
                );
                assert_eq!(
                    value.type_name(),
                    format!("array of {}", type_name(types[1].as_str().unwrap()))
                );
                for (item, want) in items.iter().zip(expected["first"].as_array().unwrap()) {
                    assert!(matches_json(item, want), "{key}: {item:?} vs {want}");
                }
                assert!(
                    matches_json(items.last().unwrap(), &expected["last"]),
                    "{key} last"
                );
            }
            scalar => {
                assert_eq!(
                    scalar.type_name(),
                    type_name(types[0].as_str().unwrap()),
                    "{key}"
                );
                assert!(
                    matches_json(scalar, &expected["value"]),
                    "{key}: {scalar:?} vs {expected}"
                );
            }
        }
    }
    assert_eq!(
        file.get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()
            .len(),
        262144
    );
    assert_eq!(
        file.get_f32_array("tokenizer.ggml.scores")
            .unwrap()
            .unwrap()
            .len(),
        262144
    );
    assert_eq!(
        file.get_i64_array("tokenizer.ggml.token_type")
            .unwrap()
            .unwrap()
            .len(),
        262144
    );
    assert_eq!(file.get_u64("gemma3.block_count").unwrap(), Some(18));
    assert_eq!(
        file.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
        Some(true)
    );

    // Tensors: same order, types, shapes, offsets, sizes and leading bytes.
    let embd = file.tensor_info("token_embd.weight").unwrap();
    assert_eq!(embd.dtype, GgmlType::Q8_0);
    assert_eq!(embd.shape, vec![262144, 640]);
    let expected_tensors = reference["tensors"].as_array().unwrap();
    for (info, expected) in file.tensors().iter().zip(expected_tensors) {
        assert_eq!(info.name, expected["name"].as_str().unwrap());
        assert_eq!(
            info.dtype.name(),
            expected["type"].as_str().unwrap(),
            "{}",
            info.name
        );
        let shape: Vec<usize> = expected["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(info.shape, shape, "{}", info.name);
        assert_eq!(
            info.offset as u64,
            expected["offset"].as_u64().unwrap(),
            "{}",
            info.name
        );
        assert_eq!(
            info.n_bytes as u64,
            expected["n_bytes"].as_u64().unwrap(),
            "{}",
            info.name
        );
        assert!(
            info.offset + info.n_bytes <= file.file_size(),
            "{}",
            info.name
        );
        let data = file.tensor(&info.name).unwrap().data;
        assert_eq!(data.len(), info.n_bytes);
        let head: String = data[..8].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            head,
            expected["first_bytes"].as_str().unwrap(),
            "{}",
            info.name
        );
    }
}
