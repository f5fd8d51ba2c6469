//! `gemma info`: what a model is and what it needs, as aligned tables (or `--json`).

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Args;
use gemma_engine::gemma_formats::{ModelFile, TensorSource};
use gemma_engine::{human_bytes, LoadOptions, LoadedModel, Tuning, WeightMemory};
use serde_json::{json, Value};

use crate::CommonArgs;

#[derive(Args, Clone, Debug)]
pub struct InfoArgs {
    /// One JSON object for scripts (sizes in bytes) instead of the tables
    #[arg(long)]
    pub json: bool,
}

/// Everything `info` reports, gathered once and then printed either way.
struct Report {
    model: String,
    name: String,
    tuning: Tuning,
    architecture: String,
    format: String,
    tokenizer: Option<usize>,
    hyper_parameters: Vec<(String, String)>,
    tensors: BTreeMap<&'static str, (usize, usize)>,
    weights: usize,
    on_demand: usize,
    unread: usize,
    ctx_size: usize,
    kv: usize,
    cache_type: String,
}

pub fn info(common: &CommonArgs, args: &InfoArgs) -> Result<()> {
    let loaded = common.load(&LoadOptions {
        verbose: false,
        // Only the metadata and tensor table are read: no copy of the weights.
        weights: WeightMemory::Mapped,
        ..common.load_options()
    })?;
    let report = gather(&loaded, common.ctx_size);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

fn gather(loaded: &LoadedModel, ctx_size: usize) -> Report {
    let model = &loaded.model;
    let format = match &loaded.file {
        ModelFile::Gguf(gguf) => format!(
            "GGUF v{}, {} metadata entries, {} tensors",
            gguf.version(),
            gguf.metadata().len(),
            gguf.tensors().len()
        ),
        ModelFile::Hf(folder) => format!(
            "Hugging Face folder, {} safetensors file(s)",
            folder.shard_paths().len()
        ),
    };
    let mut hyper_parameters = model.describe();
    if let Some(vision) = &loaded.vision {
        hyper_parameters.extend(vision.describe());
    }
    if let Some(audio) = &loaded.audio {
        hyper_parameters.extend(audio.describe());
    }
    let tensors = tensor_table(&loaded.file);
    let weights = model.weight_bytes();
    let on_demand = model.on_demand_bytes();
    let stored: usize = tensors.values().map(|(_, b)| b).sum();
    Report {
        model: loaded.source.display().to_string(),
        name: loaded.display_name.clone(),
        tuning: loaded.tuning,
        architecture: model.architecture().to_string(),
        format,
        tokenizer: loaded.tokenizer.as_ref().map(|t| t.vocab_size()),
        hyper_parameters,
        tensors,
        weights,
        on_demand,
        unread: if on_demand > 0 {
            stored.saturating_sub(weights + on_demand)
        } else {
            0
        },
        ctx_size,
        kv: model.kv_cache_bytes(ctx_size),
        cache_type: model.cache_type().to_string(),
    }
}

impl Report {
    fn kind(&self) -> &'static str {
        match self.tuning {
            Tuning::Base => {
                "base (pretrained): `run` continues the prompt as text (--chat for the template)"
            }
            Tuning::Instruct => "instruction-tuned: `run` sends the prompt as a chat turn",
        }
    }

    fn to_text(&self) -> String {
        let mut out = String::new();
        let tokenizer = match self.tokenizer {
            Some(n) => format!("{n} tokens"),
            None => "none (token ids only)".into(),
        };
        table(
            &mut out,
            None,
            &[
                ("model", self.model.clone()),
                ("name", self.name.clone()),
                ("kind", self.kind().into()),
                ("architecture", self.architecture.clone()),
                ("format", self.format.clone()),
                ("tokenizer", tokenizer),
            ],
        );
        table(
            &mut out,
            Some("hyper-parameters"),
            &self
                .hyper_parameters
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect::<Vec<_>>(),
        );
        out.push_str("\ntensors\n");
        out.push_str(&format!("  {:<8} {:>6} {:>12}\n", "type", "count", "size"));
        for (dtype, (count, bytes)) in &self.tensors {
            out.push_str(&format!(
                "  {dtype:<8} {count:>6} {:>12}\n",
                human_bytes(*bytes)
            ));
        }
        let kv_key = format!("KV cache at --ctx-size {}", self.ctx_size);
        let mut memory = vec![("weights", human_bytes(self.weights))];
        if self.on_demand > 0 {
            memory.push((
                "per-layer embeddings (memory-mapped, read per token)",
                human_bytes(self.on_demand),
            ));
        }
        if self.unread > 0 {
            memory.push((
                "stored, not resident (towers, shared-layer K/V, cut MLP parts)",
                human_bytes(self.unread),
            ));
        }
        memory.push((
            kv_key.as_str(),
            format!("{} ({})", human_bytes(self.kv), self.cache_type),
        ));
        memory.push(("total", human_bytes(self.weights + self.kv)));
        table(&mut out, Some("memory"), &memory);
        out
    }

    fn to_json(&self) -> Value {
        let hyper: serde_json::Map<String, Value> = self
            .hyper_parameters
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let tensors: Vec<Value> = self
            .tensors
            .iter()
            .map(|(dtype, (count, bytes))| json!({"type": dtype, "count": count, "bytes": bytes}))
            .collect();
        json!({
            "model": self.model,
            "name": self.name,
            "tuning": match self.tuning { Tuning::Base => "base", Tuning::Instruct => "instruct" },
            "architecture": self.architecture,
            "format": self.format,
            "vocab_size": self.tokenizer,
            "hyper_parameters": hyper,
            "tensors": tensors,
            "memory": {
                "weights_bytes": self.weights,
                "per_layer_embeddings_bytes": self.on_demand,
                "stored_not_resident_bytes": self.unread,
                "ctx_size": self.ctx_size,
                "kv_cache_bytes": self.kv,
                "cache_type": self.cache_type,
                "total_bytes": self.weights + self.kv,
            },
        })
    }
}

/// Rows as two aligned columns under an optional heading (indented when headed).
fn table(out: &mut String, heading: Option<&str>, rows: &[(&str, String)]) {
    let indent = if heading.is_some() { "  " } else { "" };
    if let Some(h) = heading {
        out.push_str(&format!("\n{h}\n"));
    }
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    for (key, value) in rows {
        out.push_str(&format!("{indent}{key:<width$}  {value}\n"));
    }
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
