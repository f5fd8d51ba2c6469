//! `gemma info`: what a model is and what it needs.

use std::collections::BTreeMap;

use anyhow::Result;
use gemma_engine::gemma_formats::{ModelFile, TensorSource};
use gemma_engine::{human_bytes, LoadOptions, WeightMemory};

use crate::CommonArgs;

pub fn info(common: &CommonArgs) -> Result<()> {
    let loaded = common.load(&LoadOptions {
        verbose: false,
        // Only the metadata and tensor table are read: no copy of the weights.
        weights: WeightMemory::Mapped,
        ..common.load_options()
    })?;
    let model = &loaded.model;
    println!("model: {}", loaded.source.display());
    println!("architecture: {}", model.architecture());
    match &loaded.file {
        ModelFile::Gguf(gguf) => println!(
            "format: GGUF v{}, {} metadata entries, {} tensors",
            gguf.version(),
            gguf.metadata().len(),
            gguf.tensors().len()
        ),
        ModelFile::Hf(folder) => println!(
            "format: Hugging Face folder, {} safetensors file(s)",
            folder.shard_paths().len()
        ),
    }
    match &loaded.tokenizer {
        Some(t) => println!("tokenizer: {} tokens", t.vocab_size()),
        None => println!("tokenizer: none"),
    }

    println!();
    println!("hyper-parameters:");
    for (key, value) in model.describe() {
        println!("  {key}: {value}");
    }

    if let Some(vision) = &loaded.vision {
        for (key, value) in vision.describe() {
            println!("  {key}: {value}");
        }
    }

    println!();
    println!("tensors by type:");
    println!("  {:<6} {:>6} {:>12}", "type", "count", "bytes");
    for (dtype, (count, bytes)) in tensor_table(&loaded.file) {
        println!("  {dtype:<6} {count:>6} {:>12}", human_bytes(bytes));
    }

    let weights = model.weight_bytes();
    let kv = model.kv_cache_bytes(common.ctx_size);
    println!();
    println!("memory:");
    println!("  weights: {}", human_bytes(weights));
    let on_demand = model.on_demand_bytes();
    if on_demand > 0 {
        println!(
            "  per-layer embeddings (memory-mapped, read per token): {}",
            human_bytes(on_demand)
        );
    }
    let stored: usize = tensor_table(&loaded.file).values().map(|(_, b)| b).sum();
    let unread = stored.saturating_sub(weights + on_demand);
    if on_demand > 0 && unread > 0 {
        println!(
            "  stored, not resident (towers, shared-layer K/V, cut MLP parts; norms copied): {}",
            human_bytes(unread)
        );
    }
    println!(
        "  KV cache at --ctx-size {}: {} ({})",
        common.ctx_size,
        human_bytes(kv),
        model.cache_type()
    );
    println!("  total: {}", human_bytes(weights + kv));
    Ok(())
}

/// Tensor count and bytes per element type, in type-name order.
fn tensor_table(file: &ModelFile) -> BTreeMap<&'static str, (usize, usize)> {
    let mut table = BTreeMap::new();
    for name in file.tensor_names() {
        if let Some(t) = file.tensor(&name) {
            let entry = table.entry(t.dtype.name()).or_insert((0, 0));
            entry.0 += 1;
            entry.1 += t.data.len();
        }
    }
    table
}
