//! Writes the GGUF seeds of `corpus/gguf/` from the tiny fixtures (each under 64 KB; named
//! `.bin` because the repository ignores `*.gguf` outside `fixtures/`):
//!   cargo run --release -p gemma-fuzz --example make_gguf_seeds
use std::path::Path;

use gemma_formats::{GgmlType, GgufFile, GgufWriter, MetaValue};

fn shrink(fixture: &str, out: &Path, with_tensors: bool) {
    let file = GgufFile::open(Path::new(fixture)).expect("open fixture");
    let arch = file.architecture().expect("architecture").to_owned();
    let mut w = GgufWriter::new();
    for (key, value) in file.metadata() {
        let value = if *key == format!("{arch}.block_count") {
            MetaValue::U32(1)
        } else {
            value.clone()
        };
        w.add_metadata(key.clone(), value).expect("metadata");
    }
    if with_tensors {
        for info in file.tensors() {
            if info.name.starts_with("blk.") && !info.name.starts_with("blk.0.") {
                continue;
            }
            let blob = file.tensor_data(info);
            let (dtype, data) = if info.dtype == GgmlType::F32 && info.shape.len() == 2 {
                let halves: Vec<u8> = blob
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let x = f32::from_le_bytes(c.try_into().unwrap());
                        half::f16::from_f32(x).to_le_bytes()
                    })
                    .collect();
                (GgmlType::F16, halves)
            } else {
                (info.dtype, blob.to_vec())
            };
            w.add_tensor(info.name.clone(), dtype, &info.shape, data)
                .expect("tensor");
        }
    }
    w.write_file(out).expect("write");
    println!(
        "{}: {} bytes",
        out.display(),
        std::fs::metadata(out).unwrap().len()
    );
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("../../fixtures");
    let out = root.join("corpus/gguf");
    std::fs::create_dir_all(&out).unwrap();
    let f = |p: &str| fixtures.join(p).to_string_lossy().into_owned();
    shrink(
        &f("gemma3_tiny/model.gguf"),
        &out.join("gemma3_1layer_f16.bin"),
        true,
    );
    shrink(
        &f("gemma3_tiny/model.gguf"),
        &out.join("gemma3_metadata_only.bin"),
        false,
    );
    shrink(
        &f("gemma2_tiny/model.gguf"),
        &out.join("gemma2_1layer_f16.bin"),
        true,
    );
    shrink(
        &f("gemma3n_tiny/model.gguf"),
        &out.join("gemma3n_metadata_only.bin"),
        false,
    );
    shrink(
        &f("gemma3_vision_tiny/mmproj.gguf"),
        &out.join("mmproj_metadata_only.bin"),
        false,
    );
}
