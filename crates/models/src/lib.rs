//! Model definitions for the Gemma families: configs, weights, forward passes, KV caches.
//!
//! Each architecture is a config (data) plus one forward pass; kernels live in `gemma-kernels`.

mod error;
pub mod gemma3;
pub mod gemma3n;
mod kv_cache;
pub mod weights;

pub use error::ModelError;
pub use gemma3::{Gemma3, Gemma3Config};
pub use gemma3n::{Gemma3n, Gemma3nConfig};
pub use gemma_kernels::ops::kv::CacheType;
pub use kv_cache::{KvCache, SeqStep};
pub use weights::{Loader, WeightLayout};

use gemma_formats::{GgufFile, HfFolder, ModelFile, TensorSource};

/// Which logits `forward` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (`vocab_size` values): generation.
    Last,
    /// Every token's (`tokens × vocab_size` values): scoring, perplexity, parity checks.
    All,
}

/// A loaded decoder of any supported architecture.
// One per process, never moved in a hot loop: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Model {
    Gemma3(Gemma3),
    Gemma3n(Gemma3n),
}

/// Gemma 3 `<end_of_turn>`: chat generation stops there as well as at EOS.
const GEMMA_END_OF_TURN: u32 = 106;
const GEMMA_EOS: u32 = 1;

/// Loads the decoder stored in `file`, dispatching on its architecture.
pub fn load_model(file: &ModelFile) -> Result<Model, ModelError> {
    match file {
        ModelFile::Gguf(f) => load_gguf(f),
        ModelFile::Hf(folder) => load_hf(folder),
    }
}

fn load_gguf(f: &GgufFile) -> Result<Model, ModelError> {
    match f.architecture()? {
        "gemma3" => {
            let cfg = Gemma3Config::from_gguf(f)?;
            let loader = Loader {
                source: f,
                layout: WeightLayout::Gguf,
            };
            Ok(Model::Gemma3(Gemma3::load(cfg, &loader)?))
        }
        "gemma3n" => {
            let cfg = Gemma3nConfig::from_gguf(f)?;
            let loader = Loader {
                source: f,
                layout: WeightLayout::Gguf,
            };
            Ok(Model::Gemma3n(Gemma3n::load(cfg, &loader)?))
        }
        other => Err(ModelError::UnknownArchitecture(other.to_string())),
    }
}

/// Where a transformers checkpoint keeps the text decoder's tensors.
const HF_PREFIXES: [&str; 4] = [
    "model.",
    "model.language_model.",
    "language_model.model.",
    "",
];

fn load_hf(folder: &HfFolder) -> Result<Model, ModelError> {
    let cfg = folder.config();
    let model_type = cfg.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let arch = cfg
        .get("architectures")
        .and_then(|v| v.as_array())
        .and_then(|a| a.first())
        .and_then(|v| v.as_str())
        .unwrap_or("");
    match model_type {
        "gemma3_text" | "gemma3" => {
            let config = Gemma3Config::from_hf_config(cfg)?;
            let prefix = HF_PREFIXES
                .into_iter()
                .find(|p| folder.tensor(&format!("{p}embed_tokens.weight")).is_some())
                .ok_or_else(|| ModelError::MissingTensor("model.embed_tokens.weight".into()))?;
            let loader = Loader {
                source: folder,
                layout: WeightLayout::HuggingFace { prefix },
            };
            Ok(Model::Gemma3(Gemma3::load(config, &loader)?))
        }
        "gemma3n_text" | "gemma3n" => {
            let config = Gemma3nConfig::from_hf_config(cfg)?;
            let prefix = HF_PREFIXES
                .into_iter()
                .find(|p| folder.tensor(&format!("{p}embed_tokens.weight")).is_some())
                .ok_or_else(|| ModelError::MissingTensor("model.embed_tokens.weight".into()))?;
            let loader = Loader {
                source: folder,
                layout: WeightLayout::HuggingFace { prefix },
            };
            Ok(Model::Gemma3n(Gemma3n::load(config, &loader)?))
        }
        _ => Err(ModelError::UnknownArchitecture(if model_type.is_empty() {
            arch.to_string()
        } else {
            model_type.to_string()
        })),
    }
}

impl Model {
    pub fn architecture(&self) -> &str {
        match self {
            Model::Gemma3(_) => "gemma3",
            Model::Gemma3n(_) => "gemma3n",
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Model::Gemma3(m) => m.config().vocab_size,
            Model::Gemma3n(m) => m.config().vocab_size,
        }
    }

    /// Trained context length.
    pub fn context_length(&self) -> usize {
        match self {
            Model::Gemma3(m) => m.config().max_position_embeddings,
            Model::Gemma3n(m) => m.config().max_position_embeddings,
        }
    }

    /// How the caches `new_cache` makes store keys and values (f32 until set; llama.cpp's
    /// `--cache-type-k/-v`). Caches made earlier keep their format. Q8_0 needs a head
    /// dimension that is a multiple of 32.
    pub fn set_cache_type(&mut self, cache_type: CacheType) -> Result<(), ModelError> {
        match self {
            Model::Gemma3(m) => m.set_cache_type(cache_type),
            Model::Gemma3n(m) => m.set_cache_type(cache_type),
        }
    }

    pub fn cache_type(&self) -> CacheType {
        match self {
            Model::Gemma3(m) => m.cache_type(),
            Model::Gemma3n(m) => m.cache_type(),
        }
    }

    pub fn new_cache(&self, ctx_size: usize) -> Result<KvCache, ModelError> {
        match self {
            Model::Gemma3(m) => m.new_cache(ctx_size),
            Model::Gemma3n(m) => m.new_cache(ctx_size),
        }
    }

    pub fn kv_cache_bytes(&self, ctx_size: usize) -> usize {
        match self {
            Model::Gemma3(m) => m.kv_cache_bytes(ctx_size),
            Model::Gemma3n(m) => m.kv_cache_bytes(ctx_size),
        }
    }

    pub fn forward<'c>(
        &self,
        tokens: &[u32],
        cache: &'c mut KvCache,
        logits: Logits,
    ) -> Result<&'c [f32], ModelError> {
        match self {
            Model::Gemma3(m) => m.forward(tokens, cache, logits),
            Model::Gemma3n(m) => m.forward(tokens, cache, logits),
        }
    }

    /// Advances several sequences at once and writes each one's last-token logits, in order,
    /// to `logits_out` (`seqs.len() × vocab_size`). Gemma 3 shares the matmuls across the
    /// batch; other architectures run the sequences one after another.
    pub fn forward_batch(
        &self,
        seqs: &mut [SeqStep<'_>],
        logits_out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        match self {
            Model::Gemma3(m) => m.forward_batch(seqs, logits_out),
            _ => {
                logits_out.clear();
                for s in seqs.iter_mut() {
                    logits_out.extend_from_slice(self.forward(s.tokens, s.cache, Logits::Last)?);
                }
                Ok(())
            }
        }
    }

    pub fn describe(&self) -> Vec<(String, String)> {
        match self {
            Model::Gemma3(m) => m.describe(),
            Model::Gemma3n(m) => m.describe(),
        }
    }

    /// Bytes of weights that stay memory-mapped and are read a row per token (Gemma 3n's
    /// per-layer embedding table): not part of the resident set `weight_bytes` counts.
    pub fn on_demand_bytes(&self) -> usize {
        match self {
            Model::Gemma3(_) => 0,
            Model::Gemma3n(m) => m.per_layer_embedding_bytes(),
        }
    }

    pub fn weight_bytes(&self) -> usize {
        match self {
            Model::Gemma3(m) => m.weight_bytes(),
            Model::Gemma3n(m) => m.weight_bytes(),
        }
    }

    /// Tokens that end a generated turn: EOS and `<end_of_turn>` (the generation config's stop list).
    pub fn stop_token_ids(&self) -> Vec<u32> {
        match self {
            Model::Gemma3(m) => [GEMMA_EOS, GEMMA_END_OF_TURN]
                .into_iter()
                .filter(|&id| (id as usize) < m.config().vocab_size)
                .collect(),
            Model::Gemma3n(m) => [GEMMA_EOS, GEMMA_END_OF_TURN]
                .into_iter()
                .filter(|&id| (id as usize) < m.config().vocab_size)
                .collect(),
        }
    }
}
