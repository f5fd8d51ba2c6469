//! gemma-engine: everything between a model file and generated text.
//!
//! - [`load()`]: a path (GGUF file or Hugging Face folder, or the default model) becomes a
//!   [`LoadedModel`] (model + tokenizer + chat template).
//! - [`sampling`]: [`SamplingParams`] and the [`Sampler`].
//! - [`generate`]: [`Session`] (one sequence, KV cache kept between calls) and [`Chat`].
//! - [`perplexity()`]: llama.cpp-compatible perplexity.
//! - [`shield`]: ShieldGemma 2 (images) and ShieldGemma (text) as safety classifiers.
//! - [`default_model`]: the cache directory and fetching the default model from PyPI.

pub mod audio;
pub mod default_model;
mod encoded;
pub mod generate;
pub mod live_audio;
pub mod load;
pub mod matformer;
pub mod perplexity;
pub mod sampling;
pub mod shield;
pub mod stop;
pub mod video;
pub mod vision;

pub use audio::{AudioOptions, Hearing, PreparedAudio};
pub use default_model::{cache_dir, default_model_path, ensure_default_model};
pub use generate::{Chat, GenerationStats, Session, SoftSpan, StopReason, TurnOutput};
pub use live_audio::LiveAudio;
pub use load::{
    human_bytes, load, LoadOptions, LoadedModel, Tuning, WeightMemory, DEFAULT_BATCH_SIZE,
};
pub use matformer::{load_with_matformer, MatformerConfig};
pub use perplexity::{perplexity, PerplexityResult};
pub use sampling::{Sampler, SamplingParams};
pub use shield::{
    resolve_policies, CheckStats, Modality, Policy, PolicySpec, Shield, ShieldCache, ShieldInput,
    ShieldPrompt, ShieldResult,
};
pub use vision::{FrameReuse, ImageOptions, PreparedImage, Vision, VisionFamily};

/// Re-exported so the CLI and tests name one version of each.
pub use gemma_formats;
pub use gemma_media;
pub use gemma_models;
pub use gemma_tokenizer;
