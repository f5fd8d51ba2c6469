//! Whatever the writer writes, the reader reads back unchanged: metadata of every type
//! (including nested arrays and NaN floats, compared bit for bit) and tensor bytes.

mod common;

use std::collections::BTreeMap;

use common::parse;
use gemma_formats::{GgmlType, GgufWriter, MetaValue, TensorSource};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

fn scalar() -> BoxedStrategy<MetaValue> {
    prop_oneof![
        any::<u8>().prop_map(MetaValue::U8),
        any::<i8>().prop_map(MetaValue::I8),
        any::<u16>().prop_map(MetaValue::U16),
        any::<i16>().prop_map(MetaValue::I16),
        any::<u32>().prop_map(MetaValue::U32),
        any::<i32>().prop_map(MetaValue::I32),
        any::<u64>().prop_map(MetaValue::U64),
        any::<i64>().prop_map(MetaValue::I64),
        any::<u32>().prop_map(|bits| MetaValue::F32(f32::from_bits(bits))),
        any::<u64>().prop_map(|bits| MetaValue::F64(f64::from_bits(bits))),
        any::<bool>().prop_map(MetaValue::Bool),
        any::<String>().prop_map(MetaValue::String),
    ]
    .boxed()
}

/// An array whose elements all have the kind of `element`'s first draw.
fn array_of(element: BoxedStrategy<MetaValue>) -> impl Strategy<Value = MetaValue> {
    // Draw one kind, then elements of that kind only.
    element.clone().prop_flat_map(move |first| {
        let kind = std::mem::discriminant(&first);
        vec(element.clone(), 0..6).prop_map(move |rest| {
            let mut items = vec![first.clone()];
            items.extend(
                rest.into_iter()
                    .filter(|v| std::mem::discriminant(v) == kind),
            );
            MetaValue::Array(items)
        })
    })
}

fn value() -> impl Strategy<Value = MetaValue> {
    let arrays = array_of(scalar()).prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner, 0..4).prop_map(MetaValue::Array),
            Just(MetaValue::Array(Vec::new())),
        ]
    });
    prop_oneof![scalar(), arrays]
}

/// Bit-exact equality (so NaN payloads count).
fn same(a: &MetaValue, b: &MetaValue) -> bool {
    match (a, b) {
        (MetaValue::F32(x), MetaValue::F32(y)) => x.to_bits() == y.to_bits(),
        (MetaValue::F64(x), MetaValue::F64(y)) => x.to_bits() == y.to_bits(),
        (MetaValue::Array(x), MetaValue::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        _ => a == b,
    }
}

#[derive(Debug, Clone)]
struct TensorSpec {
    dtype: GgmlType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn tensor() -> impl Strategy<Value = TensorSpec> {
    let dtypes = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];
    (
        proptest::sample::select(dtypes.to_vec()),
        vec(1usize..4, 0..3),
        1usize..3,
    )
        .prop_flat_map(|(dtype, outer, inner_blocks)| {
            let mut shape = outer;
            shape.push(inner_blocks * dtype.block_size());
            let n_bytes = dtype.bytes_for(shape.iter().product()).unwrap();
            vec(any::<u8>(), n_bytes).prop_map(move |data| TensorSpec {
                dtype,
                shape: shape.clone(),
                data,
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn write_then_read_round_trips(
        metadata in btree_map("[a-z_.]{1,12}", value(), 0..8),
        tensors in vec(tensor(), 0..5),
        alignment in proptest::sample::select(vec![None, Some(1usize), Some(8), Some(64)]),
    ) {
        let metadata: BTreeMap<String, MetaValue> = metadata;
        let mut writer = GgufWriter::new();
        for (key, value) in &metadata {
            writer.add_metadata(key.clone(), value.clone()).unwrap();
        }
        if let Some(alignment) = alignment {
            writer.set_alignment(alignment).unwrap();
        }
        for (i, t) in tensors.iter().enumerate() {
            writer.add_tensor(format!("blk.{i}.weight"), t.dtype, &t.shape, t.data.clone()).unwrap();
        }
        let mut bytes = Vec::new();
        writer.write_to(&mut bytes).unwrap();

        let file = parse(bytes).unwrap();
        prop_assert_eq!(file.version(), 3);
        let expected_alignment = alignment.unwrap_or(32);
        prop_assert_eq!(file.alignment(), expected_alignment);

        let read: Vec<&(String, MetaValue)> = file
            .metadata()
            .iter()
            .filter(|(k, _)| k != "general.alignment")
            .collect();
        prop_assert_eq!(read.len(), metadata.len());
        for ((key, value), (read_key, read_value)) in metadata.iter().zip(read) {
            prop_assert_eq!(key, read_key);
            prop_assert!(same(value, read_value), "{key}: wrote {value:?}, read {read_value:?}");
            prop_assert!(same(value, file.get(key).unwrap()));
        }

        prop_assert_eq!(file.tensors().len(), tensors.len());
        for (i, (spec, info)) in tensors.iter().zip(file.tensors()).enumerate() {
            prop_assert_eq!(&info.name, &format!("blk.{i}.weight"));
            prop_assert_eq!(info.dtype, spec.dtype);
            prop_assert_eq!(&info.shape, &spec.shape);
            prop_assert_eq!(info.n_bytes, spec.data.len());
            prop_assert_eq!((info.offset - file.data_offset()) % expected_alignment, 0);
            let data = file.tensor_data(info);
            prop_assert_eq!(data.bytes(), &spec.data[..]);
            let via_source = file.tensor(&info.name).unwrap();
            prop_assert_eq!(&via_source.shape, &spec.shape);
            prop_assert_eq!(via_source.data.bytes(), &spec.data[..]);
        }
        prop_assert_eq!(file.tensor_names().len(), tensors.len());
    }
}

#[test]
fn write_file_then_open_from_disk() {
    let dir = common::TempDir::new("roundtrip");
    let path = dir.path().join("tiny.gguf");
    let mut writer = GgufWriter::new();
    writer
        .add_metadata("general.architecture", MetaValue::String("gemma3".into()))
        .unwrap()
        .add_tensor(
            "w",
            GgmlType::F32,
            &[2, 2],
            [1.0f32, 2.0, 3.0, 4.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        )
        .unwrap();
    writer.write_file(&path).unwrap();
    let file = gemma_formats::GgufFile::open(&path).unwrap();
    assert_eq!(file.architecture().unwrap(), "gemma3");
    assert_eq!(
        file.file_size(),
        std::fs::metadata(&path).unwrap().len() as usize
    );
    let w = file.tensor("w").unwrap();
    assert_eq!(w.shape, vec![2, 2]);
    assert_eq!(&w.data[4..8], &2.0f32.to_le_bytes());
}

#[test]
fn writer_rejects_inconsistent_input() {
    use gemma_formats::GgufWriteError;
    let mut w = GgufWriter::new();
    w.add_metadata("k", MetaValue::U8(1)).unwrap();
    assert!(matches!(
        w.add_metadata("k", MetaValue::U8(2)),
        Err(GgufWriteError::DuplicateKey { .. })
    ));
    assert!(matches!(
        w.add_metadata(
            "mixed",
            MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)])
        ),
        Err(GgufWriteError::MixedArray { .. })
    ));
    assert!(matches!(
        w.set_alignment(0),
        Err(GgufWriteError::BadAlignment { .. })
    ));
    assert!(matches!(
        w.set_alignment(24),
        Err(GgufWriteError::BadAlignment { .. })
    ));
    assert!(matches!(
        w.add_tensor("t", GgmlType::F32, &[2], vec![0; 7]),
        Err(GgufWriteError::DataSize {
            expected: 8,
            actual: 7,
            ..
        })
    ));
    assert!(matches!(
        w.add_tensor("q", GgmlType::Q8_0, &[32, 16], vec![0; 34 * 16]),
        Err(GgufWriteError::BadShape { .. })
    ));
    assert!(matches!(
        w.add_tensor("d", GgmlType::F32, &[1, 1, 1, 1, 1], vec![0; 4]),
        Err(GgufWriteError::TooManyDims { .. })
    ));
    w.add_tensor("t", GgmlType::F32, &[2], vec![0; 8]).unwrap();
    assert!(matches!(
        w.add_tensor("t", GgmlType::F32, &[2], vec![0; 8]),
        Err(GgufWriteError::DuplicateTensor { .. })
    ));
}

/// A GGUF file with tensors of several sizes and alignments.
fn write_multi_tensor_file(path: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let tensors: Vec<(String, Vec<u8>)> = [1usize, 7, 4096, 100_003]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let bytes = (0..4 * n).map(|j| (j * 31 + i * 17) as u8).collect();
            (format!("t{i}"), bytes)
        })
        .collect();
    let mut writer = GgufWriter::new();
    writer
        .add_metadata("general.architecture", MetaValue::String("gemma3".into()))
        .unwrap();
    for (name, bytes) in &tensors {
        writer
            .add_tensor(name, GgmlType::F32, &[bytes.len() / 4], bytes.clone())
            .unwrap();
    }
    writer.write_file(path).unwrap();
    tensors
}

#[test]
fn resident_copy_holds_the_same_tensor_bytes_as_the_mapping() {
    let dir = common::TempDir::new("resident");
    let path = dir.path().join("multi.gguf");
    let tensors = write_multi_tensor_file(&path);
    let mut file = gemma_formats::GgufFile::open(&path).unwrap();
    let mapped: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(name, _)| file.tensor(name).unwrap().data.bytes().to_vec())
        .collect();
    assert!(!file.is_resident());
    assert!(file.make_resident().unwrap());
    assert!(file.is_resident());
    assert!(!file.make_resident().unwrap(), "already resident");
    for ((name, expected), mapped) in tensors.iter().zip(&mapped) {
        let resident = file.tensor(name).unwrap();
        assert_eq!(resident.data.bytes(), &expected[..], "{name}");
        assert_eq!(mapped, expected, "{name}");
    }
    assert_eq!(
        file.file_size(),
        std::fs::metadata(&path).unwrap().len() as usize
    );

    // An image built in memory has no file to copy from and stays as it is.
    let bytes = std::fs::read(&path).unwrap();
    let mut in_memory = gemma_formats::GgufFile::from_bytes(std::sync::Arc::new(bytes)).unwrap();
    assert!(!in_memory.make_resident().unwrap());
    assert_eq!(
        in_memory.tensor("t3").unwrap().data.bytes(),
        &tensors[3].1[..]
    );
}

#[test]
fn a_file_truncated_after_opening_fails_to_become_resident_with_an_error() {
    let dir = common::TempDir::new("resident-truncated");
    let path = dir.path().join("multi.gguf");
    write_multi_tensor_file(&path);
    let mut file = gemma_formats::GgufFile::open(&path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = file
        .make_resident()
        .expect_err("the data section is cut short");
    let msg = err.to_string();
    assert!(msg.contains("multi.gguf"), "{msg}");
    assert!(!file.is_resident());
}

/// `interleave_tensors` rewrites exactly the chosen tensors, in place in a resident copy and
/// into memory of its own for a mapped file, marks them, and leaves the others (and the file
/// on disk) as they were.
#[test]
fn chosen_tensors_are_rewritten_in_both_memory_modes_and_others_are_not() {
    let dir = common::TempDir::new("interleave");
    let path = dir.path().join("multi.gguf");
    let tensors = write_multi_tensor_file(&path);
    let on_disk = std::fs::read(&path).unwrap();
    let choose = |info: &gemma_formats::GgufTensorInfo| info.name == "t1" || info.name == "t3";
    let reverse = |_: &gemma_formats::GgufTensorInfo, bytes: &mut [u8]| bytes.reverse();
    for resident in [false, true] {
        let mut file = gemma_formats::GgufFile::open(&path).unwrap();
        if resident {
            assert!(file.make_resident().unwrap());
        }
        let done = file.interleave_tensors(&choose, &reverse).unwrap();
        assert_eq!(done, tensors[1].1.len() + tensors[3].1.len());
        // A second call finds nothing left to do.
        assert_eq!(file.interleave_tensors(&choose, &reverse).unwrap(), 0);
        for (i, (name, bytes)) in tensors.iter().enumerate() {
            let t = file.tensor(name).unwrap();
            let rewritten = i == 1 || i == 3;
            let mut want = bytes.clone();
            if rewritten {
                want.reverse();
            }
            assert_eq!(t.data.bytes(), &want[..], "{name} (resident: {resident})");
            assert_eq!(t.interleaved, rewritten, "{name}");
        }
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        on_disk,
        "the file is never written"
    );

    // Once a tensor of the resident copy is out, it cannot be rewritten under its reader.
    let mut file = gemma_formats::GgufFile::open(&path).unwrap();
    file.make_resident().unwrap();
    let held = file.tensor("t3").unwrap();
    let err = file.interleave_tensors(&choose, &reverse).unwrap_err();
    assert!(err.to_string().contains("handed out"), "{err}");
    assert_eq!(held.data.bytes(), &tensors[3].1[..]);
    assert!(!file.tensor("t1").unwrap().interleaved);
}

/// `Blob::release` drops a mapped tensor's pages from the resident set (what keeps Gemma 3n's
/// per-layer table from piling up in memory as tokens are read) and changes no byte.
#[cfg(target_os = "linux")]
#[test]
fn released_pages_of_a_mapped_tensor_leave_the_resident_set_and_read_back_the_same() {
    fn rss_file_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
    let dir = common::TempDir::new("release");
    let path = dir.path().join("big.gguf");
    let n = 16 << 20; // 64 MiB of f32
    let bytes: Vec<u8> = (0..4 * n).map(|i| (i % 251) as u8).collect();
    let mut writer = GgufWriter::new();
    writer
        .add_metadata("general.architecture", MetaValue::String("gemma3".into()))
        .unwrap();
    writer
        .add_tensor("big", GgmlType::F32, &[n], bytes.clone())
        .unwrap();
    writer.write_file(&path).unwrap();
    drop(writer);
    let file = gemma_formats::GgufFile::open(&path).unwrap();
    let blob = file.tensor("big").unwrap().data;
    let touch = |b: &[u8]| b.iter().step_by(4096).map(|&x| x as u64).sum::<u64>();
    let sum = touch(blob.bytes());
    let resident = rss_file_kib();
    blob.release(0, blob.len());
    let released = rss_file_kib();
    assert!(
        resident >= released + 48 * 1024,
        "RssFile {resident} KiB before, {released} KiB after releasing 64 MiB"
    );
    assert_eq!(touch(blob.bytes()), sum);
    assert_eq!(blob.bytes(), &bytes[..]);
    // A blob held in memory: nothing to release, nothing changes.
    let owned = gemma_formats::Blob::from_vec(vec![7u8; 100]);
    owned.release(0, 100);
    assert_eq!(owned.bytes(), &[7u8; 100][..]);
}

/// `elide_long_arrays` frees exactly the arrays longer than the limit, keeps their keys (empty)
/// and remembers their lengths; every other value is untouched.
#[test]
fn long_metadata_arrays_are_freed_and_their_lengths_kept() {
    let dir = common::TempDir::new("elide");
    let path = dir.path().join("arrays.gguf");
    let long: Vec<MetaValue> = (0..1000)
        .map(|i| MetaValue::String(format!("t{i}")))
        .collect();
    let short = vec![MetaValue::F32(1.0); 3];
    let mut writer = GgufWriter::new();
    writer
        .add_metadata("general.architecture", MetaValue::String("gemma3".into()))
        .unwrap();
    writer
        .add_metadata("tokenizer.ggml.tokens", MetaValue::Array(long))
        .unwrap();
    writer
        .add_metadata("short", MetaValue::Array(short.clone()))
        .unwrap();
    writer
        .add_tensor("t", GgmlType::F32, &[4], vec![0u8; 16])
        .unwrap();
    writer.write_file(&path).unwrap();
    let mut file = gemma_formats::GgufFile::open(&path).unwrap();
    let entries = file.metadata().len();
    assert_eq!(file.elide_long_arrays(64), 1);
    assert_eq!(file.metadata().len(), entries, "keys stay");
    assert_eq!(file.elided_len("tokenizer.ggml.tokens"), Some(1000));
    assert_eq!(
        file.get("tokenizer.ggml.tokens")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(file.get("short").unwrap().as_array().unwrap().len(), 3);
    assert_eq!(file.elided_len("short"), None);
    assert_eq!(
        file.get_str("general.architecture").unwrap(),
        Some("gemma3")
    );
    assert_eq!(file.elide_long_arrays(64), 0, "nothing left to free");
}
