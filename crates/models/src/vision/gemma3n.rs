//! Gemma 3n's image input (transformers' `Gemma3nForConditionalGeneration.get_image_features`):
//! the MobileNet-V5 tower ([`super::mobilenet`]) and `embed_vision`.
//!
//! One image, `[3, 768, 768]` with values in [0, 1] (the u8 pixels rescaled by 1/255, no mean or
//! std: the published processor has `do_normalize: false`), becomes the tower's `[2048, 16, 16]`
//! map, read as 256 rows of 2048 (row-major over the grid), multiplied by √2048, then
//! `embed_vision`'s soft path (RMSNorm with weight, projection to the text hidden size, RMSNorm
//! without weight): 256 soft tokens. `embed_vision`'s hard path embeds the vision vocabulary's
//! ids (`<end_of_image>` and the like, `vocab_offset ≤ id < vocab_offset + vocab_size`).
//!
//! Checkpoint names: `model.vision_tower.timm_model.*` and `model.embed_vision.*` (published
//! checkpoints and transformers saves), or the same without `model.`.

use gemma_formats::{GgufFile, HfFolder, TensorData, TensorSource};
use gemma_kernels::pool::ThreadPool;
use serde_json::Value;

use super::mobilenet::MobileNetV5;
use crate::gemma3n::embedder::MultimodalEmbedder;
use crate::weights::{Loader, WeightLayout};
use crate::ModelError;

/// The tower's input and output sizes, `embed_vision`'s vocabulary and the prompt's image ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3nVisionConfig {
    /// Side of the square input the tower takes (768; `vision_config.image_size` when present).
    pub image_size: usize,
    /// Soft tokens per image (`vision_soft_tokens_per_image`, 256): the output grid is its
    /// square root on a side.
    pub tokens_per_image: usize,
    pub text_hidden_size: usize,
    /// `embed_vision`'s vocabulary: ids `vocab_offset ..< vocab_offset + vocab_size`.
    pub vocab_offset: u32,
    pub vocab_size: usize,
    /// Width of the tower's output (`vision_config.hidden_size`, 2048; checked against the
    /// MSFA's weights).
    pub hidden_size: usize,
    /// `embed_vision`'s RMSNorm epsilon (`vision_config.rms_norm_eps`).
    pub rms_norm_eps: f32,
    /// The text vocabulary's size (the vision vocabulary must fit in it).
    pub text_vocab_size: usize,
    /// The placeholder id each soft token sits on, and the ids around an image.
    pub image_token_id: u32,
    pub boi_token_id: u32,
    pub eoi_token_id: u32,
}

const DEFAULT_IMAGE_SIZE: usize = 768;

impl Gemma3nVisionConfig {
    /// Reads a transformers `Gemma3nConfig` (`config.json` of a
    /// `Gemma3nForConditionalGeneration`), with transformers' defaults where keys are left out.
    pub fn from_hf_config(root: &Value) -> Result<Gemma3nVisionConfig, ModelError> {
        use crate::hf_config::{float, int, section, token_id as id};
        let vision = section(root, "vision_config", " (not a vision model)")?;
        let text = section(root, "text_config", "")?;
        if let Some(arch) = vision.get("architecture").and_then(Value::as_str) {
            if !arch.starts_with("mobilenetv5") {
                return Err(ModelError::Config(format!(
                    "vision_config.architecture '{arch}' is not a MobileNet-V5"
                )));
            }
        }
        let rms_norm_eps = float(vision, "vision_config", "rms_norm_eps", 1e-6)? as f32;
        let cfg = Gemma3nVisionConfig {
            image_size: int(vision, "image_size", Some(DEFAULT_IMAGE_SIZE as u64))? as usize,
            tokens_per_image: int(root, "vision_soft_tokens_per_image", Some(256))? as usize,
            text_hidden_size: int(text, "hidden_size", None)? as usize,
            vocab_offset: id(vision, "vocab_offset", 262_144)?,
            vocab_size: int(vision, "vocab_size", Some(128))? as usize,
            hidden_size: int(vision, "hidden_size", Some(2048))? as usize,
            rms_norm_eps,
            text_vocab_size: int(text, "vocab_size", Some(262_400))? as usize,
            image_token_id: id(root, "image_token_id", 262_145)?,
            boi_token_id: id(root, "boi_token_id", 255_999)?,
            eoi_token_id: id(root, "eoi_token_id", 262_144)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |m: String| Err(ModelError::Config(m));
        if !(32..=1 << 13).contains(&self.image_size) {
            return err(format!(
                "vision image_size {} is implausible",
                self.image_size
            ));
        }
        let side = self.tokens_per_image.isqrt();
        if side == 0 || side * side != self.tokens_per_image || side > 1024 {
            return err(format!(
                "vision_soft_tokens_per_image {} is not a square grid",
                self.tokens_per_image
            ));
        }
        if !(1..=1 << 16).contains(&self.text_hidden_size)
            || !(1..=1 << 16).contains(&self.hidden_size)
        {
            return err(format!(
                "hidden sizes {} (vision) / {} (text) are implausible",
                self.hidden_size, self.text_hidden_size
            ));
        }
        if !self.rms_norm_eps.is_finite() || self.rms_norm_eps <= 0.0 {
            return err(format!("vision rms_norm_eps {}", self.rms_norm_eps));
        }
        let end = (self.vocab_offset as usize).checked_add(self.vocab_size);
        if self.vocab_size == 0 || end.is_none_or(|end| end > self.text_vocab_size) {
            return err(format!(
                "embed_vision's vocabulary {}..{} does not fit the text vocabulary of {}",
                self.vocab_offset,
                (self.vocab_offset as usize).saturating_add(self.vocab_size),
                self.text_vocab_size
            ));
        }
        for (name, id) in [
            ("image_token_id", self.image_token_id),
            ("boi_token_id", self.boi_token_id),
            ("eoi_token_id", self.eoi_token_id),
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

    /// Side of the output grid (16).
    pub fn grid_side(&self) -> usize {
        self.tokens_per_image.isqrt()
    }
}

/// The vision tower and its embedder.
pub struct Gemma3nVision {
    config: Gemma3nVisionConfig,
    tower: MobileNetV5,
    embed_vision: MultimodalEmbedder,
}

/// Where transformers checkpoints keep the tower and the embedder.
const HF_PREFIXES: [&str; 2] = ["model.", ""];

impl Gemma3nVision {
    /// Loads the tower from a Hugging Face folder whose config has a `vision_config`.
    pub fn from_hf(folder: &HfFolder) -> Result<Gemma3nVision, ModelError> {
        let config = Gemma3nVisionConfig::from_hf_config(folder.config())?;
        let root = HF_PREFIXES
            .into_iter()
            .find(|p| {
                folder
                    .tensor(&format!("{p}vision_tower.timm_model.conv_stem.conv.weight"))
                    .is_some()
            })
            .ok_or_else(|| {
                ModelError::MissingTensor(
                    "model.vision_tower.timm_model.conv_stem.conv.weight".into(),
                )
            })?;
        let loader = Loader {
            source: folder,
            layout: WeightLayout::HuggingFace { prefix: root },
        };
        Gemma3nVision::load(config, &loader, root)
    }

    /// llama.cpp's Gemma 3n mmproj (`clip.vision.projector_type` `gemma3nv`, from
    /// `convert_hf_to_gguf.py --mmproj`): the tower as `v.*` (`blocks.` written `blk.`, the
    /// stem bias, and the layer-scale gammas when llama.cpp's graph is to use them, as
    /// `[1, C, 1, 1]`; every other shape and value as transformers has it) and
    /// `embed_vision` as `mm.embedding`, `mm.hard_emb_norm`, `mm.soft_emb_norm` (`w`, not
    /// `1 + w`) and `mm.input_projection` (forced to f16 by the converter). The mmproj carries no
    /// token ids or vocabulary size: `vocab_offset`, `text_vocab_size` and the image ids are the
    /// published Gemma 3n ones (262144, 262400, 262145, 255999, 262144); a caller pairing it with
    /// another text model sets them from that model.
    pub fn from_gguf(mmproj: &GgufFile) -> Result<Gemma3nVision, ModelError> {
        let err = |m: String| ModelError::Config(m);
        let projector = match mmproj.get_str("clip.vision.projector_type")? {
            Some(p) => Some(p),
            None => mmproj.get_str("clip.projector_type")?,
        };
        if projector != Some("gemma3nv") {
            return Err(err(format!(
                "the mmproj's projector type is {projector:?}, not \"gemma3nv\" (Gemma 3n vision)"
            )));
        }
        if mmproj.get_bool("clip.has_vision_encoder")? == Some(false) {
            return Err(err("the mmproj has no vision encoder".into()));
        }
        let source = GgufNames(mmproj);
        let shape = |name: &str| {
            source
                .tensor(name)
                .map(|t| t.shape)
                .ok_or_else(|| ModelError::MissingTensor(GgufNames::gguf_name(name)))
        };
        let u = |key: &str| mmproj.get_u64(key);
        let table = shape("model.embed_vision.embedding.weight")?;
        let projection = shape("model.embed_vision.embedding_projection.weight")?;
        let (vocab_size, hidden_size, text_hidden_size) = match (&table[..], &projection[..]) {
            ([v, h], [t, h2]) if h == h2 => (*v, *h, *t),
            _ => {
                return Err(err(format!(
                    "mm.embedding {table:?} and mm.input_projection {projection:?} do not fit"
                )))
            }
        };
        let image_size = u("clip.vision.image_size")?.unwrap_or(DEFAULT_IMAGE_SIZE as u64) as usize;
        // The converter writes patch_size = image_size / image_seq_length.
        let tokens_per_image = match u("clip.vision.patch_size")? {
            Some(p) if p > 0 && (image_size as u64).is_multiple_of(p) => image_size / p as usize,
            _ => 256,
        };
        if let Some(h) = u("clip.vision.embedding_length")? {
            if h as usize != hidden_size {
                return Err(err(format!(
                    "clip.vision.embedding_length {h} differs from mm.embedding's width {hidden_size}"
                )));
            }
        }
        let config = Gemma3nVisionConfig {
            image_size,
            tokens_per_image,
            text_hidden_size,
            vocab_offset: 262_144,
            vocab_size,
            hidden_size,
            rms_norm_eps: mmproj
                .get_f32("clip.vision.attention.layer_norm_epsilon")?
                .unwrap_or(1e-6),
            text_vocab_size: 262_400,
            image_token_id: 262_145,
            boi_token_id: 255_999,
            eoi_token_id: 262_144,
        };
        let loader = Loader {
            source: &source,
            layout: WeightLayout::Gguf,
        };
        Gemma3nVision::load(config, &loader, "model.")
    }

    /// Loads from tensors named `{root}vision_tower.timm_model.*` and `{root}embed_vision.*`.
    pub fn load(
        config: Gemma3nVisionConfig,
        loader: &Loader,
        root: &str,
    ) -> Result<Gemma3nVision, ModelError> {
        config.validate()?;
        let tower = MobileNetV5::load(
            loader,
            &format!("{root}vision_tower.timm_model."),
            config.image_size,
            config.grid_side(),
        )?;
        if tower.out_channels() != config.hidden_size {
            return Err(ModelError::Config(format!(
                "the vision tower outputs {} channels but vision_config.hidden_size is {}",
                tower.out_channels(),
                config.hidden_size
            )));
        }
        let embed_vision = MultimodalEmbedder::load(
            loader,
            &format!("{root}embed_vision."),
            config.vocab_offset as usize,
            config.vocab_size,
            config.hidden_size,
            config.text_hidden_size,
            config.rms_norm_eps,
        )?;
        Ok(Gemma3nVision {
            config,
            tower,
            embed_vision,
        })
    }

    pub fn config(&self) -> &Gemma3nVisionConfig {
        &self.config
    }

    /// Blocks per stage of the tower (`[3, 5, 37, 39]` for MobileNet-V5-300M).
    pub fn stage_depths(&self) -> Vec<usize> {
        self.tower.stage_depths()
    }

    /// The tower's output as `[tokens_per_image, hidden_size]` after the ×√hidden_size scale
    /// (before `embed_vision`). `pixels`: `[3, image_size, image_size]` channel-major, values in
    /// [0, 1].
    pub fn encode_tower(&self, pixels: &[f32]) -> Result<Vec<f32>, ModelError> {
        let mut out = self.tower.forward(ThreadPool::global(), pixels)?;
        let scale = (self.config.hidden_size as f32).sqrt();
        out.iter_mut().for_each(|v| *v *= scale);
        Ok(out)
    }

    /// Soft tokens `[tokens_per_image, text_hidden_size]`: tower → ×√hidden → `embed_vision`.
    pub fn encode_image(&self, pixels: &[f32]) -> Result<Vec<f32>, ModelError> {
        let tower = self.encode_tower(pixels)?;
        let out = self.embed_vision.embed_soft(&tower);
        if !out.iter().all(|v| v.is_finite()) {
            return Err(ModelError::NonFinite {
                where_: "Gemma 3n vision soft tokens".into(),
            });
        }
        Ok(out)
    }

    /// `embed_vision`'s hard path: ids in `vocab_offset ..< vocab_offset + vocab_size` →
    /// `ids.len()` rows of `text_hidden_size`.
    pub fn embed_hard(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.embed_vision.embed_hard(ids)
    }

    /// Bytes of the tower's and embedder's weights.
    pub fn weight_bytes(&self) -> usize {
        self.tower.weight_bytes() + self.embed_vision.weight_bytes()
    }
}

/// An mmproj GGUF seen under transformers' names (`model.vision_tower.timm_model.*`,
/// `model.embed_vision.*`), so that one loader reads both layouts.
struct GgufNames<'a>(&'a GgufFile);

impl GgufNames<'_> {
    const TOWER: &'static str = "model.vision_tower.timm_model.";
    const EMBED: [(&'static str, &'static str); 4] = [
        ("model.embed_vision.embedding.weight", "mm.embedding.weight"),
        (
            "model.embed_vision.hard_embedding_norm.weight",
            "mm.hard_emb_norm.weight",
        ),
        (
            "model.embed_vision.soft_embedding_norm.weight",
            "mm.soft_emb_norm.weight",
        ),
        (
            "model.embed_vision.embedding_projection.weight",
            "mm.input_projection.weight",
        ),
    ];

    /// llama.cpp's name for a transformers name (the name itself when it has none).
    fn gguf_name(name: &str) -> String {
        if let Some(rest) = name.strip_prefix(Self::TOWER) {
            return match rest.strip_prefix("blocks.") {
                Some(block) => format!("v.blk.{block}"),
                None => format!("v.{rest}"),
            };
        }
        Self::EMBED
            .iter()
            .find(|(hf, _)| *hf == name)
            .map_or_else(|| name.to_string(), |(_, g)| g.to_string())
    }
}

impl TensorSource for GgufNames<'_> {
    fn tensor(&self, name: &str) -> Option<TensorData> {
        let mut t = self.0.tensor(&Self::gguf_name(name))?;
        // The converter stores the stem bias as [1, C, 1, 1], and llama.cpp's graph wants the
        // layer-scale gammas so too (this converter version leaves the blocks' gammas [C]).
        if name.ends_with("conv_stem.conv.bias") || name.ends_with("layer_scale.gamma") {
            if let [1, c, 1, 1] = t.shape[..] {
                t.shape = vec![c];
            }
        }
        Some(t)
    }

    fn tensor_names(&self) -> Vec<String> {
        self.0.tensor_names()
    }
}
