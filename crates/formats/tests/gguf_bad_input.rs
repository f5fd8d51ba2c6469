//! Every class of malformed GGUF input gives its own typed error, never a panic, and the
//! message names the offending field.

mod common;

use common::{assert_mentions, parse, parse_err, Raw};
use gemma_formats::{GgmlType, GgufError, GgufWriter, MetaValue};

const F32: u32 = 0;
const Q8_0: u32 = 8;

/// A valid file with metadata of several kinds and two tensors.
fn sample_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", MetaValue::String("gemma3".into()))
        .unwrap()
        .add_metadata("a.u32", MetaValue::U32(7))
        .unwrap()
        .add_metadata("a.bool", MetaValue::Bool(true))
        .unwrap()
        .add_metadata(
            "a.strings",
            MetaValue::Array(vec![
                MetaValue::String("x".into()),
                MetaValue::String("yz".into()),
            ]),
        )
        .unwrap()
        .add_metadata(
            "a.nested",
            MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::F64(1.5)])]),
        )
        .unwrap()
        .add_tensor("norm", GgmlType::F32, &[3], vec![1; 12])
        .unwrap()
        .add_tensor("embd", GgmlType::Q8_0, &[2, 32], vec![2; 68])
        .unwrap();
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    bytes
}

#[test]
fn sample_file_is_valid() {
    let file = parse(sample_file()).unwrap();
    assert_eq!(file.tensors().len(), 2);
    assert_eq!(file.metadata().len(), 5);
}

#[test]
fn truncation_at_every_cut_point_is_an_error_until_the_data_is_complete() {
    let bytes = sample_file();
    let file = parse(bytes.clone()).unwrap();
    let data_end = file
        .tensors()
        .iter()
        .map(|t| t.offset + t.n_bytes)
        .max()
        .unwrap();
    for cut in 0..bytes.len() {
        let result = parse(bytes[..cut].to_vec());
        if cut < data_end {
            let err = result
                .err()
                .unwrap_or_else(|| panic!("cut at {cut} parsed"));
            assert!(
                matches!(
                    err,
                    GgufError::Truncated { .. }
                        | GgufError::CountTooLarge { .. }
                        | GgufError::StringTooLong { .. }
                        | GgufError::OutOfBounds { .. }
                ),
                "cut at {cut}: unexpected error {err:?}"
            );
        } else {
            // Only trailing padding was cut.
            assert!(result.is_ok(), "cut at {cut}: {:?}", result.err());
        }
    }
}

#[test]
fn truncated_header_names_the_field() {
    let err = parse_err(b"GGUF\x03\x00".to_vec());
    assert!(matches!(err, GgufError::Truncated { .. }), "{err:?}");
    assert_mentions(&err, &["version"]);
}

#[test]
fn wrong_magic() {
    let mut bytes = sample_file();
    bytes[..4].copy_from_slice(b"GGML");
    let err = parse_err(bytes);
    assert!(
        matches!(err, GgufError::BadMagic { found } if &found == b"GGML"),
        "{err:?}"
    );
    assert_mentions(&err, &["magic"]);
}

#[test]
fn versions_1_and_99_are_rejected() {
    for version in [1, 99] {
        let err = Raw::header(version, 0, 0).parse().unwrap_err();
        assert!(
            matches!(err, GgufError::UnsupportedVersion { version: v } if v == version),
            "{err:?}"
        );
        assert_mentions(&err, &[&format!("version {version}")]);
    }
}

#[test]
fn version_2_is_accepted() {
    let mut raw = Raw::header(2, 0, 1);
    raw.kv_u32("x", 1);
    assert_eq!(raw.parse().unwrap().version(), 2);
}

#[test]
fn absurd_tensor_count() {
    let err = Raw::header(3, 1 << 60, 0).parse().unwrap_err();
    assert!(
        matches!(err, GgufError::CountTooLarge { count, .. } if count == 1 << 60),
        "{err:?}"
    );
    assert_mentions(&err, &["tensor count"]);
}

#[test]
fn absurd_kv_count() {
    let err = Raw::header(3, 0, u64::MAX).parse().unwrap_err();
    assert!(
        matches!(
            err,
            GgufError::CountTooLarge {
                count: u64::MAX,
                ..
            }
        ),
        "{err:?}"
    );
    assert_mentions(&err, &["kv count"]);
}

#[test]
fn absurd_key_length() {
    let mut raw = Raw::header(3, 0, 1);
    raw.u64(1 << 62).zeros(16);
    let err = raw.parse().unwrap_err();
    assert!(
        matches!(err, GgufError::StringTooLong { len, .. } if len == 1 << 62),
        "{err:?}"
    );
    assert_mentions(&err, &["key of metadata entry #0"]);
}

#[test]
fn absurd_string_value_length() {
    let mut raw = Raw::header(3, 0, 1);
    raw.str("general.name").u32(8).u64(u64::MAX - 3).zeros(8);
    let err = raw.parse().unwrap_err();
    assert!(matches!(err, GgufError::StringTooLong { .. }), "{err:?}");
    assert_mentions(&err, &["metadata 'general.name'"]);
}

#[test]
fn absurd_array_length() {
    let mut raw = Raw::header(3, 0, 1);
    // Array (9) of strings (8) claiming 2^60 elements.
    raw.str("tokenizer.ggml.tokens")
        .u32(9)
        .u32(8)
        .u64(1 << 60)
        .zeros(64);
    let err = raw.parse().unwrap_err();
    assert!(matches!(err, GgufError::CountTooLarge { .. }), "{err:?}");
    assert_mentions(&err, &["metadata 'tokenizer.ggml.tokens'"]);
}

#[test]
fn array_nested_too_deep() {
    let depth = 100;
    let mut raw = Raw::header(3, 0, 1);
    raw.str("deep").u32(9);
    for _ in 0..depth {
        raw.u32(9).u64(1);
    }
    raw.u32(0).u64(0);
    let err = raw.parse().unwrap_err();
    assert!(matches!(err, GgufError::NestingTooDeep { .. }), "{err:?}");
    assert_mentions(&err, &["metadata 'deep'"]);
}

#[test]
fn invalid_utf8_key() {
    let mut raw = Raw::header(3, 0, 1);
    raw.u64(2).u8(0xff).u8(0xfe).u32(4).u32(0);
    let err = raw.parse().unwrap_err();
    assert!(matches!(err, GgufError::InvalidUtf8 { .. }), "{err:?}");
    assert_mentions(&err, &["key of metadata entry #0", "UTF-8"]);
}

#[test]
fn invalid_bool_byte() {
    let mut raw = Raw::header(3, 0, 1);
    raw.str("flag").u32(7).u8(2);
    let err = raw.parse().unwrap_err();
    assert!(
        matches!(err, GgufError::InvalidBool { byte: 2, .. }),
        "{err:?}"
    );
    assert_mentions(&err, &["metadata 'flag'"]);
}

#[test]
fn unknown_value_type() {
    let mut raw = Raw::header(3, 0, 1);
    raw.str("general.name").u32(77).u64(0);
    let err = raw.parse().unwrap_err();
    assert!(
        matches!(err, GgufError::UnknownValueType { type_id: 77, .. }),
        "{err:?}"
    );
    assert_mentions(&err, &["metadata 'general.name'", "77"]);
}

#[test]
fn duplicate_metadata_key() {
    let mut raw = Raw::header(3, 0, 2);
    raw.kv_u32("gemma3.block_count", 1)
        .kv_u32("gemma3.block_count", 2);
    let err = raw.parse().unwrap_err();
    assert!(matches!(err, GgufError::DuplicateKey { ref key } if key == "gemma3.block_count"));
    assert_mentions(&err, &["'gemma3.block_count'"]);
}

#[test]
fn bad_alignment_values() {
    for alignment in [0u32, 3, 48] {
        let mut raw = Raw::header(3, 0, 1);
        raw.kv_u32("general.alignment", alignment);
        let err = raw.parse().unwrap_err();
        assert!(matches!(err, GgufError::BadAlignment { .. }), "{err:?}");
        assert_mentions(&err, &["general.alignment", &alignment.to_string()]);
    }
    let mut raw = Raw::header(3, 0, 1);
    raw.kv_str("general.alignment", "32");
    let err = raw.parse().unwrap_err();
    assert!(matches!(err, GgufError::MetadataType { .. }), "{err:?}");
    assert_mentions(&err, &["general.alignment", "string"]);
}

#[test]
fn custom_alignment_is_honoured() {
    let mut raw = Raw::header(3, 1, 1);
    raw.kv_u32("general.alignment", 64)
        .tensor_info("t", &[4], F32, 0)
        .pad_to(64);
    let data_start = raw.bytes.len();
    raw.zeros(16);
    let file = raw.parse().unwrap();
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.tensors()[0].offset, data_start);
}

/// One-tensor file: header, the tensor info, padding, then `data_len` zero bytes.
fn one_tensor(name: &str, ne: &[u64], type_id: u32, offset: u64, data_len: usize) -> Vec<u8> {
    let mut raw = Raw::header(3, 1, 0);
    raw.tensor_info(name, ne, type_id, offset)
        .pad_to(32)
        .zeros(data_len);
    raw.bytes
}

#[test]
fn too_many_dims() {
    let err = parse_err(one_tensor(
        "blk.0.attn_q.weight",
        &[1, 1, 1, 1, 1],
        F32,
        0,
        4,
    ));
    assert!(
        matches!(err, GgufError::TooManyDims { n_dims: 5, .. }),
        "{err:?}"
    );
    assert_mentions(&err, &["tensor 'blk.0.attn_q.weight'", "n_dims"]);
}

#[test]
fn tensor_past_end_of_file() {
    let bytes = one_tensor("blk.0.attn_q.weight", &[32], F32, 0, 100);
    let file_size = bytes.len();
    let err = parse_err(bytes);
    match &err {
        GgufError::OutOfBounds {
            name,
            start,
            end,
            file_size: size,
        } => {
            assert_eq!(name, "blk.0.attn_q.weight");
            assert_eq!(*end - *start, 128);
            assert_eq!(*size, file_size);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_mentions(
        &err,
        &[
            "tensor 'blk.0.attn_q.weight'",
            "past the end of the file",
            &format!("({file_size} bytes)"),
        ],
    );
}

#[test]
fn tensor_offset_beyond_file_does_not_overflow() {
    let err = parse_err(one_tensor("t", &[1], F32, u64::MAX - 31, 4));
    assert!(matches!(err, GgufError::OutOfBounds { .. }), "{err:?}");
}

#[test]
fn misaligned_offset() {
    let err = parse_err(one_tensor("blk.0.attn_k.weight", &[4], F32, 4, 64));
    assert!(
        matches!(
            err,
            GgufError::MisalignedOffset {
                offset: 4,
                alignment: 32,
                ..
            }
        ),
        "{err:?}"
    );
    assert_mentions(
        &err,
        &["tensor 'blk.0.attn_k.weight'", "offset 4", "alignment 32"],
    );
}

#[test]
fn overlapping_tensors() {
    let mut raw = Raw::header(3, 2, 0);
    raw.tensor_info("a", &[16], F32, 0)
        .tensor_info("b", &[16], F32, 32)
        .pad_to(32)
        .zeros(128);
    let err = raw.parse().unwrap_err();
    assert!(
        matches!(err, GgufError::OverlappingTensors { .. }),
        "{err:?}"
    );
    assert_mentions(&err, &["'a'", "'b'", "overlap"]);
}

#[test]
fn duplicate_tensor_names() {
    let mut raw = Raw::header(3, 2, 0);
    raw.tensor_info("token_embd.weight", &[8], F32, 0)
        .tensor_info("token_embd.weight", &[8], F32, 32)
        .pad_to(32)
        .zeros(64);
    let err = raw.parse().unwrap_err();
    assert!(
        matches!(err, GgufError::DuplicateTensorName { .. }),
        "{err:?}"
    );
    assert_mentions(&err, &["'token_embd.weight'"]);
}

#[test]
fn unknown_tensor_type_id() {
    let err = parse_err(one_tensor("w", &[32], 99, 0, 128));
    assert!(
        matches!(err, GgufError::UnknownTensorType { type_id: 99, .. }),
        "{err:?}"
    );
    assert_mentions(&err, &["tensor 'w'", "99"]);
}

#[test]
fn element_count_overflow() {
    let err = parse_err(one_tensor("w", &[1 << 40, 1 << 40], F32, 0, 0));
    assert!(matches!(err, GgufError::ShapeOverflow { .. }), "{err:?}");
    assert_mentions(&err, &["tensor 'w'", "overflow"]);
    // Each dimension must also fit in ggml's int64.
    let err = parse_err(one_tensor("w", &[u64::MAX], F32, 0, 0));
    assert!(matches!(err, GgufError::ShapeOverflow { .. }), "{err:?}");
    // Elements fit but bytes do not.
    let err = parse_err(one_tensor("w", &[1 << 62], F32, 0, 0));
    assert!(matches!(err, GgufError::ShapeOverflow { .. }), "{err:?}");
}

#[test]
fn partial_quant_block() {
    let err = parse_err(one_tensor("w", &[16, 2], Q8_0, 0, 68));
    assert!(
        matches!(
            err,
            GgufError::PartialBlock {
                ne0: 16,
                block_size: 32,
                ..
            }
        ),
        "{err:?}"
    );
    assert_mentions(&err, &["tensor 'w'", "Q8_0"]);
}

#[test]
fn truncated_tensor_info_names_the_tensor() {
    let mut raw = Raw::header(3, 1, 0);
    raw.str("blk.3.ffn_up.weight").u32(2).u64(640);
    let err = raw.parse().unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err:?}");
    assert_mentions(&err, &["tensor 'blk.3.ffn_up.weight' dimensions"]);
}

#[test]
fn zero_sized_tensors_are_allowed_and_never_overlap() {
    let mut raw = Raw::header(3, 2, 0);
    raw.tensor_info("empty", &[0, 4], F32, 0)
        .tensor_info("x", &[4], F32, 0)
        .pad_to(32)
        .zeros(16);
    let file = raw.parse().unwrap();
    assert_eq!(file.tensor_info("empty").unwrap().n_bytes, 0);
    assert_eq!(file.tensor_info("empty").unwrap().shape, vec![4, 0]);
}

#[test]
fn empty_input() {
    let err = parse_err(Vec::new());
    assert!(matches!(err, GgufError::Truncated { .. }), "{err:?}");
    assert_mentions(&err, &["magic"]);
}

#[test]
fn typed_getters_report_wrong_types() {
    let mut w = GgufWriter::new();
    w.add_metadata("u", MetaValue::U32(5))
        .unwrap()
        .add_metadata("neg", MetaValue::I32(-5))
        .unwrap()
        .add_metadata("wide", MetaValue::U64(u64::MAX))
        .unwrap()
        .add_metadata("f64", MetaValue::F64(0.25))
        .unwrap()
        .add_metadata(
            "ints",
            MetaValue::Array(vec![MetaValue::U8(1), MetaValue::U8(2)]),
        )
        .unwrap()
        .add_metadata("big", MetaValue::Array(vec![MetaValue::U64(u64::MAX)]))
        .unwrap()
        .add_metadata("doubles", MetaValue::Array(vec![MetaValue::F64(0.5)]))
        .unwrap();
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    let file = parse(bytes).unwrap();

    assert_eq!(file.get_u64("u").unwrap(), Some(5));
    assert_eq!(file.get_u64("wide").unwrap(), Some(u64::MAX));
    assert_eq!(file.get_u64("missing").unwrap(), None);
    assert_eq!(file.get_f32("f64").unwrap(), Some(0.25));
    assert_eq!(file.get_i64_array("ints").unwrap(), Some(vec![1, 2]));
    assert_eq!(file.get_f32_array("doubles").unwrap(), Some(vec![0.5]));

    let err = file.get_u64("neg").unwrap_err();
    match &err {
        GgufError::MetadataType {
            key,
            expected,
            found,
        } => {
            assert_eq!(key, "neg");
            assert_eq!(*expected, "non-negative integer");
            assert!(found.contains("-5"), "{found}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let err = file.get_str("u").unwrap_err();
    assert!(matches!(err, GgufError::MetadataType { .. }));
    assert_mentions(&err, &["'u'", "u32", "string"]);
    assert!(matches!(
        file.get_bool("u"),
        Err(GgufError::MetadataType { .. })
    ));
    assert!(matches!(
        file.get_f32("u"),
        Err(GgufError::MetadataType { .. })
    ));
    assert!(matches!(
        file.get_str_array("ints"),
        Err(GgufError::MetadataType { .. })
    ));
    assert!(matches!(
        file.get_f32_array("ints"),
        Err(GgufError::MetadataType { .. })
    ));
    assert!(matches!(
        file.get_i64_array("big"),
        Err(GgufError::MetadataType { .. })
    ));
    let err = file.architecture().unwrap_err();
    assert!(matches!(err, GgufError::MissingKey { .. }));
    assert_mentions(&err, &["general.architecture"]);
}

mod mutations {
    use super::*;
    use gemma_formats::TensorSource;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random byte edits of a valid file: the reader returns Ok or a typed error, never
        /// panics, and whatever it accepts is safe to read in full.
        #[test]
        fn mutated_files_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
            let mut bytes = sample_file();
            for (index, value) in edits {
                let at = index.index(bytes.len());
                bytes[at] = value;
            }
            if let Ok(file) = parse(bytes) {
                for info in file.tensors() {
                    prop_assert!(info.offset + info.n_bytes <= file.file_size());
                    prop_assert_eq!(file.tensor(&info.name).unwrap().data.len(), info.n_bytes);
                }
            }
        }
    }
}
