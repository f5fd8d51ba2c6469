//! Model definitions for the Gemma families: configs, weights, forward passes, KV caches.
//!
//! Each architecture is a config (data) plus one forward pass; kernels live in `gemma-kernels`.
//! Three text families: [`gemma2`] (Gemma 2 and ShieldGemma: soft-capped attention and logits),
//! [`gemma3`] (plus its SigLIP tower in [`vision`]) and [`gemma3n`]. What more than one family
//! does alike (checkpoint names, the sliding/global cache plan, the embedding lookup, attention
//! over the KV cache, the sandwich-norm attention and MLP blocks, the output head) is written once
//! in the private `decoder` module; each family's forward pass calls it and spells out its own
//! quirks.

pub mod audio;
mod decoder;
mod error;
pub mod gemma2;
pub mod gemma3;
pub mod gemma3n;
mod hf_config;
mod kv_cache;
pub mod vision;
pub mod weights;

pub use audio::{Gemma3nAudio, Gemma3nAudioConfig};
pub use error::ModelError;
pub use gemma2::{Gemma2, Gemma2Config};
pub use gemma3::{Gemma3, Gemma3Config};
pub use gemma3n::{Gemma3n, Gemma3nConfig};
pub use gemma_kernels;
pub use gemma_kernels::ops::kv::CacheType;
pub use kv_cache::{KvCache, SeqStep, SoftTokens};
pub use vision::{
    Gemma3Vision, Gemma3VisionConfig, Gemma3nVision, Gemma3nVisionConfig, SiglipVisionConfig,
    SiglipVisionTower,
};
pub use weights::{interleave_decoder_weights, Loader, WeightLayout};

use gemma_formats::{GgufFile, HfFolder, ModelFile, TensorSource};

/// Which logits `forward` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (`vocab_size` values): generation.
    Last,
    /// Every token's (`tokens × vocab_size` values): scoring, perplexity, parity checks.
    All,
    /// None (an empty slice): the tokens only fill the cache, as a prompt's earlier chunks or
    /// streamed audio do. Saves the LM head, a read of the whole embedding table.
    None,
}

/// A loaded decoder of any supported architecture: [`Decoder`] through `Deref`.
// One per process, never moved in a hot loop: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Model {
    Gemma2(Gemma2),
    Gemma3(Gemma3),
    Gemma3n(Gemma3n),
}

/// Most decoder layers a config may declare. Per-layer tables are sized from the count, so the
/// readers check it as soon as they read it, before allocating anything (`validate()` checks it
/// again).
pub(crate) const MAX_LAYERS: usize = 1024;

/// `n` if it is a plausible decoder layer count.
pub(crate) fn layer_count(n: usize) -> Result<usize, ModelError> {
    if n == 0 || n > MAX_LAYERS {
        return Err(ModelError::Config(format!("implausible layer count {n}")));
    }
    Ok(n)
}

/// Gemma 3 `<end_of_turn>`: chat generation stops there as well as at EOS (Gemma 2's is 107).
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
        "gemma2" => {
            let cfg = Gemma2Config::from_gguf(f)?;
            let loader = Loader {
                source: f,
                layout: WeightLayout::Gguf,
            };
            Ok(Model::Gemma2(Gemma2::load(cfg, &loader)?))
        }
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

/// Where a transformers checkpoint keeps the text decoder's tensors. The last two are
/// ShieldGemma 2's (`ShieldGemma2ForImageClassification` wraps a Gemma 3 model in `model.`):
/// the published checkpoint's names, and what transformers 5 saves.
const HF_PREFIXES: [&str; 6] = [
    "model.",
    "model.language_model.",
    "language_model.model.",
    "",
    "model.language_model.model.",
    "model.model.language_model.model.",
];

/// The prefix under which `folder` keeps the text decoder (where `embed_tokens` is).
fn hf_prefix(folder: &HfFolder) -> Result<&'static str, ModelError> {
    HF_PREFIXES
        .into_iter()
        .find(|p| folder.tensor(&format!("{p}embed_tokens.weight")).is_some())
        .ok_or_else(|| ModelError::MissingTensor("model.embed_tokens.weight".into()))
}

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
        "gemma2" => {
            // The classification heads put `score` where the LM head would be: refuse them
            // rather than read the tied embedding as a head.
            if arch.contains("Classification") {
                return Err(ModelError::Config(format!(
                    "{arch} is a classifier head, not a causal LM (Gemma2ForCausalLM)"
                )));
            }
            let config = Gemma2Config::from_hf_config(cfg)?;
            let loader = Loader {
                source: folder,
                layout: WeightLayout::HuggingFace {
                    prefix: hf_prefix(folder)?,
                },
            };
            Ok(Model::Gemma2(Gemma2::load(config, &loader)?))
        }
        // ShieldGemma 2 is Gemma 3 with its vision tower, read as a classifier by the engine.
        "gemma3_text" | "gemma3" | "shieldgemma2" => {
            let config = Gemma3Config::from_hf_config(cfg)?;
            let loader = Loader {
                source: folder,
                layout: WeightLayout::HuggingFace {
                    prefix: hf_prefix(folder)?,
                },
            };
            Ok(Model::Gemma3(Gemma3::load(config, &loader)?))
        }
        "gemma3n_text" | "gemma3n" => {
            let config = Gemma3nConfig::from_hf_config(cfg)?;
            let loader = Loader {
                source: folder,
                layout: WeightLayout::HuggingFace {
                    prefix: hf_prefix(folder)?,
                },
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

/// What every decoder family offers the engine: configuration, caches, and one forward pass
/// that takes token ids plus, optionally, a tower's soft tokens. The engine, the server's
/// scheduler and the towers talk to models only through this.
pub trait Decoder: Send + Sync {
    fn architecture(&self) -> &'static str;
    fn vocab_size(&self) -> usize;
    /// Width of an embedding row: what soft tokens must match.
    fn hidden_size(&self) -> usize;
    /// Ids generation may produce: the whole vocabulary, except for Gemma 3n, whose image and
    /// audio ids at its end (`<end_of_image>`, `<end_of_audio>` and the towers' own ids) are not
    /// text: their embeddings come from a tower's embedder, and a sampled one could not be fed
    /// back through the text path. Samplers draw from `logits[..sampleable_vocab()]`.
    fn sampleable_vocab(&self) -> usize {
        self.vocab_size()
    }
    /// Trained context length.
    fn context_length(&self) -> usize;
    /// How the caches `new_cache` makes store keys and values (f32 until set; llama.cpp's
    /// `--cache-type-k/-v`). Caches made earlier keep their format. Q8_0 needs a head
    /// dimension that is a multiple of 32.
    fn set_cache_type(&mut self, cache_type: CacheType) -> Result<(), ModelError>;
    fn cache_type(&self) -> CacheType;
    fn new_cache(&self, ctx_size: usize) -> Result<KvCache, ModelError>;
    fn kv_cache_bytes(&self, ctx_size: usize) -> usize;
    /// Runs `tokens` (positions `cache.len()..`), with the embeddings of `soft`'s positions
    /// replaced, appends their keys and values to `cache`, and returns the logits `logits` asks for.
    fn forward_embeds<'c>(
        &self,
        tokens: &[u32],
        soft: &[SoftTokens<'_>],
        cache: &'c mut KvCache,
        logits: Logits,
    ) -> Result<&'c [f32], ModelError>;
    /// Advances several sequences at once and writes each one's last-token logits, in order,
    /// to `logits_out` (`seqs.len() × vocab_size`). The default runs them one after another;
    /// Gemma 3 shares the matmuls across the batch.
    fn forward_batch(
        &self,
        seqs: &mut [SeqStep<'_>],
        logits_out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        logits_out.clear();
        for s in seqs.iter_mut() {
            let logits = self.forward_embeds(s.tokens, s.soft, s.cache, Logits::Last)?;
            logits_out.extend_from_slice(logits);
        }
        Ok(())
    }
    /// `(name, value)` rows for `gemma info`.
    fn describe(&self) -> Vec<(String, String)>;
    /// Bytes of weights read every token (the resident set when copied into memory).
    fn weight_bytes(&self) -> usize;
    /// Bytes of weights that stay memory-mapped and are read a row per token (Gemma 3n's
    /// per-layer embedding table): not part of `weight_bytes`.
    fn on_demand_bytes(&self) -> usize {
        0
    }
    /// Tokens that end a generated turn: EOS and `<end_of_turn>` (the generation config's
    /// stop list), where the vocabulary has them.
    fn stop_token_ids(&self) -> Vec<u32> {
        [GEMMA_EOS, GEMMA_END_OF_TURN]
            .into_iter()
            .filter(|&id| (id as usize) < self.vocab_size())
            .collect()
    }
}

impl Decoder for Gemma2 {
    fn architecture(&self) -> &'static str {
        "gemma2"
    }
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
    fn hidden_size(&self) -> usize {
        self.config().hidden_size
    }
    fn context_length(&self) -> usize {
        self.config().max_position_embeddings
    }
    fn set_cache_type(&mut self, cache_type: CacheType) -> Result<(), ModelError> {
        Gemma2::set_cache_type(self, cache_type)
    }
    fn cache_type(&self) -> CacheType {
        Gemma2::cache_type(self)
    }
    fn new_cache(&self, ctx_size: usize) -> Result<KvCache, ModelError> {
        Gemma2::new_cache(self, ctx_size)
    }
    fn kv_cache_bytes(&self, ctx_size: usize) -> usize {
        Gemma2::kv_cache_bytes(self, ctx_size)
    }
    fn forward_embeds<'c>(
        &self,
        tokens: &[u32],
        soft: &[SoftTokens<'_>],
        cache: &'c mut KvCache,
        logits: Logits,
    ) -> Result<&'c [f32], ModelError> {
        Gemma2::forward_embeds(self, tokens, soft, cache, logits)
    }
    fn forward_batch(
        &self,
        seqs: &mut [SeqStep<'_>],
        logits_out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        Gemma2::forward_batch(self, seqs, logits_out)
    }
    fn describe(&self) -> Vec<(String, String)> {
        Gemma2::describe(self)
    }
    fn weight_bytes(&self) -> usize {
        Gemma2::weight_bytes(self)
    }
    /// `<eos>` and Gemma 2's `<end_of_turn>` (107; the default's 106 is its `<start_of_turn>`).
    fn stop_token_ids(&self) -> Vec<u32> {
        Gemma2::stop_token_ids(self)
    }
}

impl Decoder for Gemma3 {
    fn architecture(&self) -> &'static str {
        "gemma3"
    }
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
    fn hidden_size(&self) -> usize {
        self.config().hidden_size
    }
    fn context_length(&self) -> usize {
        self.config().max_position_embeddings
    }
    fn set_cache_type(&mut self, cache_type: CacheType) -> Result<(), ModelError> {
        Gemma3::set_cache_type(self, cache_type)
    }
    fn cache_type(&self) -> CacheType {
        Gemma3::cache_type(self)
    }
    fn new_cache(&self, ctx_size: usize) -> Result<KvCache, ModelError> {
        Gemma3::new_cache(self, ctx_size)
    }
    fn kv_cache_bytes(&self, ctx_size: usize) -> usize {
        Gemma3::kv_cache_bytes(self, ctx_size)
    }
    fn forward_embeds<'c>(
        &self,
        tokens: &[u32],
        soft: &[SoftTokens<'_>],
        cache: &'c mut KvCache,
        logits: Logits,
    ) -> Result<&'c [f32], ModelError> {
        Gemma3::forward_embeds(self, tokens, soft, cache, logits)
    }
    fn forward_batch(
        &self,
        seqs: &mut [SeqStep<'_>],
        logits_out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        Gemma3::forward_batch(self, seqs, logits_out)
    }
    fn describe(&self) -> Vec<(String, String)> {
        Gemma3::describe(self)
    }
    fn weight_bytes(&self) -> usize {
        Gemma3::weight_bytes(self)
    }
}

impl Decoder for Gemma3n {
    fn architecture(&self) -> &'static str {
        "gemma3n"
    }
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
    fn sampleable_vocab(&self) -> usize {
        let c = self.config();
        c.first_multimodal_id
            .unwrap_or(c.vocab_size)
            .min(c.vocab_size)
    }
    fn hidden_size(&self) -> usize {
        self.config().hidden_size
    }
    fn context_length(&self) -> usize {
        self.config().max_position_embeddings
    }
    fn set_cache_type(&mut self, cache_type: CacheType) -> Result<(), ModelError> {
        Gemma3n::set_cache_type(self, cache_type)
    }
    fn cache_type(&self) -> CacheType {
        Gemma3n::cache_type(self)
    }
    fn new_cache(&self, ctx_size: usize) -> Result<KvCache, ModelError> {
        Gemma3n::new_cache(self, ctx_size)
    }
    fn kv_cache_bytes(&self, ctx_size: usize) -> usize {
        Gemma3n::kv_cache_bytes(self, ctx_size)
    }
    fn forward_embeds<'c>(
        &self,
        tokens: &[u32],
        soft: &[SoftTokens<'_>],
        cache: &'c mut KvCache,
        logits: Logits,
    ) -> Result<&'c [f32], ModelError> {
        Gemma3n::forward_embeds(self, tokens, soft, cache, logits)
    }
    fn describe(&self) -> Vec<(String, String)> {
        Gemma3n::describe(self)
    }
    fn weight_bytes(&self) -> usize {
        Gemma3n::weight_bytes(self)
    }
    fn on_demand_bytes(&self) -> usize {
        self.per_layer_embedding_bytes()
    }
}

impl Model {
    /// The family-independent interface; the enum stays for family-specific features
    /// (Gemma 3n's MatFormer switching).
    pub fn decoder(&self) -> &(dyn Decoder + 'static) {
        match self {
            Model::Gemma2(m) => m,
            Model::Gemma3(m) => m,
            Model::Gemma3n(m) => m,
        }
    }

    pub fn decoder_mut(&mut self) -> &mut (dyn Decoder + 'static) {
        match self {
            Model::Gemma2(m) => m,
            Model::Gemma3(m) => m,
            Model::Gemma3n(m) => m,
        }
    }

    /// [`Decoder::forward_embeds`] without soft tokens.
    pub fn forward<'c>(
        &self,
        tokens: &[u32],
        cache: &'c mut KvCache,
        logits: Logits,
    ) -> Result<&'c [f32], ModelError> {
        self.decoder().forward_embeds(tokens, &[], cache, logits)
    }
}

impl std::ops::Deref for Model {
    type Target = dyn Decoder;
    fn deref(&self) -> &Self::Target {
        self.decoder()
    }
}

impl std::ops::DerefMut for Model {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.decoder_mut()
    }
}
