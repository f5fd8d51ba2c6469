//! Feeds arbitrary bytes to the GGUF reader: it must return `Err` or a file whose every
//! accessor works, never panic or allocate without bound.
//!
//!   cargo +nightly fuzz run gguf_reader
#![no_main]

use std::sync::Arc;

use gemma_formats::{GgufFile, MetaValue, TensorSource};
use libfuzzer_sys::fuzz_target;

fn touch(value: &MetaValue) -> usize {
    match value {
        MetaValue::Array(items) => items.iter().map(touch).sum::<usize>() + 1,
        MetaValue::String(s) => s.len(),
        other => other.type_name().len(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(Arc::new(data.to_vec())) else {
        return;
    };
    let mut checksum = file.version() as usize + file.alignment() + file.file_size();
    for (key, value) in file.metadata() {
        checksum += touch(value);
        assert!(file.get(key).is_some());
        // Typed getters must return Ok or a typed error, whatever the stored type.
        let _ = file.get_str(key);
        let _ = file.get_u64(key);
        let _ = file.get_f32(key);
        let _ = file.get_bool(key);
        let _ = file.get_str_array(key);
        let _ = file.get_f32_array(key);
        let _ = file.get_i64_array(key);
    }
    let _ = file.architecture();
    for info in file.tensors() {
        let blob = file.tensor_data(info);
        assert_eq!(blob.len(), info.n_bytes);
        checksum += blob.iter().map(|&b| b as usize).sum::<usize>();
        let tensor = file.tensor(&info.name).expect("listed tensor is present");
        assert_eq!(tensor.shape, info.shape);
    }
    std::hint::black_box(checksum);
});
