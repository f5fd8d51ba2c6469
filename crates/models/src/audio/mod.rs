//! Gemma 3n's audio input (transformers' `Gemma3nForConditionalGeneration` minus the decoder and
//! the vision side): the USM conformer ([`usm`]) and `embed_audio`, from a Hugging Face
//! checkpoint.
//!
//! A clip's log-mel features (`gemma-media`'s `log_mel`, equal to the reference feature
//! extractor) become one soft token per 160 ms, each a row of the text model's hidden size,
//! which the engine passes to the decoder as [`SoftTokens`](crate::SoftTokens) on the prompt's
//! audio-token run.
//!
//! The reference's prompt holds a fixed `audio_soft_tokens_per_image` (188: 30 s) audio tokens
//! per clip whatever its length, and fills the ones past the clip with the embedding of the
//! hard id `vocab_size − 1` (through `embed_audio`'s hard path); [`Gemma3nAudio::encode_clip`]
//! does exactly that. A stream ([`Gemma3nAudio::stream`]) has no such padding: each token
//! enters the prompt as it is produced.
//!
//! Checkpoint names: `model.audio_tower.*` and `model.embed_audio.*` (published checkpoints and
//! transformers saves), or the same without `model.`. llama.cpp has no Gemma 3n audio encoder
//! (its mmproj converter writes none; `gemma3na` is only a name in its projector list), so
//! there is no GGUF layout to read.

pub mod usm;

pub use usm::{AudioStream, UsmConfig, UsmEncoder};

use gemma_formats::{HfFolder, TensorSource};
use serde_json::Value;

use crate::gemma3n::embedder::MultimodalEmbedder;
use crate::weights::{Loader, WeightLayout};
use crate::ModelError;

/// The tower's hyper-parameters, the embedder's and the prompt's audio ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3nAudioConfig {
    pub usm: UsmConfig,
    /// `embed_audio`'s vocabulary: ids `vocab_offset ..< vocab_offset + vocab_size`.
    pub vocab_offset: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub text_hidden_size: usize,
    /// The text vocabulary's size: `text_vocab_size − 1` is the id whose embedding pads a clip.
    pub text_vocab_size: usize,
    /// Audio tokens per clip in the reference's prompt (`audio_soft_tokens_per_image`).
    pub soft_tokens_per_clip: usize,
    /// The placeholder id each soft token sits on.
    pub audio_token_id: u32,
    pub boa_token_id: u32,
    pub eoa_token_id: u32,
}

const MAX_SOFT_TOKENS: usize = 1 << 16;

impl Gemma3nAudioConfig {
    /// Reads a transformers `Gemma3nConfig` (`config.json` of a
    /// `Gemma3nForConditionalGeneration`), with its defaults where keys are left out.
    pub fn from_hf_config(root: &Value) -> Result<Gemma3nAudioConfig, ModelError> {
        use crate::hf_config::{float, int, section, token_id};
        let audio = section(root, "audio_config", " (not an audio model)")?;
        let text = section(root, "text_config", "")?;
        let id = |k: &str, default: u64| token_id(root, k, default);
        let rms_norm_eps = float(audio, "audio_config", "rms_norm_eps", 1e-6)? as f32;
        let cfg = Gemma3nAudioConfig {
            usm: UsmConfig::from_hf_config(audio)?,
            vocab_offset: int(audio, "vocab_offset", Some(262_272))? as usize,
            vocab_size: int(audio, "vocab_size", Some(128))? as usize,
            rms_norm_eps,
            text_hidden_size: int(text, "hidden_size", None)? as usize,
            text_vocab_size: int(text, "vocab_size", Some(262_400))? as usize,
            soft_tokens_per_clip: int(root, "audio_soft_tokens_per_image", Some(188))? as usize,
            audio_token_id: id("audio_token_id", 262_273)?,
            boa_token_id: id("boa_token_id", 256_000)?,
            eoa_token_id: id("eoa_token_id", 262_272)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        self.usm.validate()?;
        let err = |m: String| Err(ModelError::Config(m));
        let end = self.vocab_offset.checked_add(self.vocab_size);
        if self.vocab_size == 0 || end.is_none_or(|end| end > self.text_vocab_size) {
            return err(format!(
                "embed_audio's vocabulary {}..{} does not fit the text vocabulary of {}",
                self.vocab_offset,
                self.vocab_offset.saturating_add(self.vocab_size),
                self.text_vocab_size
            ));
        }
        if !(1..=MAX_SOFT_TOKENS).contains(&self.soft_tokens_per_clip) {
            return err(format!(
                "audio_soft_tokens_per_image {} is implausible",
                self.soft_tokens_per_clip
            ));
        }
        if !(1..=1 << 16).contains(&self.text_hidden_size) {
            return err(format!("text hidden size {}", self.text_hidden_size));
        }
        let pad = self.text_vocab_size - 1;
        if !(self.vocab_offset..self.vocab_offset + self.vocab_size).contains(&pad) {
            return err(format!(
                "the clip padding id {pad} is not in embed_audio's vocabulary"
            ));
        }
        for (name, id) in [
            ("audio_token_id", self.audio_token_id),
            ("boa_token_id", self.boa_token_id),
            ("eoa_token_id", self.eoa_token_id),
        ] {
            if id as usize >= self.text_vocab_size {
                return err(format!(
                    "{name} {id} is outside the vocabulary ({})",
                    self.text_vocab_size
                ));
            }
        }
        Ok(())
    }

    /// The id whose hard embedding fills a clip's slots past its last token.
    pub fn padding_id(&self) -> u32 {
        (self.text_vocab_size - 1) as u32
    }
}

/// The audio tower and its embedder.
pub struct Gemma3nAudio {
    config: Gemma3nAudioConfig,
    encoder: UsmEncoder,
    embed_audio: MultimodalEmbedder,
}

/// Where transformers checkpoints keep the tower and the embedder.
const HF_PREFIXES: [&str; 2] = ["model.", ""];

impl Gemma3nAudio {
    /// Loads the tower from a Hugging Face folder whose config has an `audio_config`.
    pub fn from_hf(folder: &HfFolder) -> Result<Gemma3nAudio, ModelError> {
        let config = Gemma3nAudioConfig::from_hf_config(folder.config())?;
        let root = HF_PREFIXES
            .into_iter()
            .find(|p| {
                folder
                    .tensor(&format!("{p}embed_audio.embedding.weight"))
                    .is_some()
            })
            .ok_or_else(|| {
                ModelError::MissingTensor("model.embed_audio.embedding.weight".into())
            })?;
        let loader = Loader {
            source: folder,
            layout: WeightLayout::HuggingFace { prefix: root },
        };
        Gemma3nAudio::load(config, &loader, root)
    }

    /// Loads from tensors named `{root}audio_tower.*` and `{root}embed_audio.*`.
    pub fn load(
        config: Gemma3nAudioConfig,
        loader: &Loader,
        root: &str,
    ) -> Result<Gemma3nAudio, ModelError> {
        config.validate()?;
        let encoder = UsmEncoder::load(config.usm.clone(), loader, &format!("{root}audio_tower."))?;
        let embed_audio = MultimodalEmbedder::load(
            loader,
            &format!("{root}embed_audio."),
            config.vocab_offset,
            config.vocab_size,
            config.usm.hidden_size,
            config.text_hidden_size,
            config.rms_norm_eps,
        )?;
        Ok(Gemma3nAudio {
            config,
            encoder,
            embed_audio,
        })
    }

    pub fn config(&self) -> &Gemma3nAudioConfig {
        &self.config
    }

    pub fn encoder(&self) -> &UsmEncoder {
        &self.encoder
    }

    /// See [`UsmEncoder::requantize`].
    pub fn requantize(&mut self, dtype: gemma_formats::GgmlType) {
        self.encoder.requantize(dtype);
    }

    pub fn embedder(&self) -> &MultimodalEmbedder {
        &self.embed_audio
    }

    /// Bytes of the tower's and embedder's weights.
    pub fn weight_bytes(&self) -> usize {
        self.encoder.weight_bytes() + self.embed_audio.weight_bytes()
    }

    /// Most mel frames one clip may have so that its tokens fit the prompt's slots.
    pub fn max_clip_frames(&self) -> usize {
        self.config.soft_tokens_per_clip * self.config.usm.frames_per_token()
    }

    /// Encoder tokens (`[n, audio hidden]`) → soft tokens (`[n, text hidden]`).
    pub fn project(&self, encoded: &[f32]) -> Vec<f32> {
        self.embed_audio.embed_soft(encoded)
    }

    /// A whole clip as the reference puts it in a prompt: its soft tokens, then the padding
    /// id's embedding up to `soft_tokens_per_clip` rows (`[soft_tokens_per_clip, text hidden]`).
    /// A clip with more tokens than that is an error (cut it into windows first).
    pub fn encode_clip(&self, features: &[f32]) -> Result<Vec<f32>, ModelError> {
        let encoded = self.encoder.encode(features)?;
        let n = encoded.len() / self.config.usm.hidden_size;
        let slots = self.config.soft_tokens_per_clip;
        if n > slots {
            return Err(ModelError::Config(format!(
                "the clip gives {n} audio tokens but a clip holds at most {slots} ({:.1} s): \
                 cut it into windows",
                slots as f64 * self.frames_seconds_per_token()
            )));
        }
        let mut out = self.project(&encoded);
        if n < slots {
            let pad = self.embed_audio.embed_hard(&[self.config.padding_id()])?;
            for _ in n..slots {
                out.extend_from_slice(&pad);
            }
        }
        Ok(out)
    }

    /// Seconds of audio per token at the 10 ms mel hop (0.16 for the published tower).
    pub fn frames_seconds_per_token(&self) -> f64 {
        self.config.usm.frames_per_token() as f64 * 0.01
    }

    /// The embeddings of `embed_audio`'s hard ids (`<end_of_audio>`, padding).
    pub fn embed_hard(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.embed_audio.embed_hard(ids)
    }

    /// A stream over one clip (see [`usm`]).
    pub fn stream(&self) -> AudioStream<'_> {
        self.encoder.stream()
    }
}
