//! Gemma 3's image encoder (transformers' `Gemma3ForConditionalGeneration` minus the decoder):
//! the SigLIP tower ([`siglip`]) and the multimodal projector, from a Hugging Face checkpoint
//! or llama.cpp's mmproj GGUF. Gemma 3n's (MobileNet-V5 and `embed_vision`) is [`gemma3n`]
//! ([`Gemma3nVision`], its tower in [`mobilenet`]).
//!
//! One preprocessed image (`[3, 896, 896]`, normalised to [-1, 1]) becomes `mm_tokens_per_image`
//! (256) rows of the text model's hidden size, which the engine passes to the decoder as
//! [`SoftTokens`](crate::SoftTokens) with `bidirectional: true`.
//!
//! Projector quirks, each applied where it happens: the patch grid is average-pooled down to
//! the token grid; the soft-embedding norm is Gemma's RMSNorm with `1 + w` (llama.cpp's
//! converter stores `1 + w`, transformers `w`) and the *vision* epsilon; the projection weight
//! is a raw `[vision_hidden, text_hidden]` parameter used as `x @ W`, the transpose of a
//! Linear; the output is not scaled by `sqrt(hidden)`.
//!
//! Checkpoint names: the tower's tensors sit under `vision_tower.vision_model.` (published
//! checkpoints), `model.vision_tower.vision_model.` (transformers 4.52–4.57 saves),
//! `vision_tower.` (transformers 5 saves: its `SiglipVisionModel` lost the `vision_model`
//! level) or `model.vision_tower.`; the projector's under `multi_modal_projector.` or
//! `model.multi_modal_projector.`. llama.cpp's mmproj names them `v.*` (`fc1`/`fc2` become
//! `ffn_up`/`ffn_down`) and `mm.*`, keeps every shape as transformers has it (outermost first;
//! the projection too, `[vision, text]`), stores the soft-embedding norm as `1 + w`, and its
//! converter forces the embeddings to f32 and the projection to f16 whatever the output type.

pub mod gemma3n;
pub mod mobilenet;
pub mod siglip;

pub use gemma3n::{Gemma3nVision, Gemma3nVisionConfig};
pub use mobilenet::MobileNetV5;
pub use siglip::{SiglipVisionConfig, SiglipVisionTower};

use gemma_formats::{GgufFile, TensorSource};
use gemma_kernels::ops;
use gemma_kernels::pool::ThreadPool;
use serde_json::Value;

use crate::kv_cache::sized;
use crate::weights::{linear, Linear, Loader, WeightLayout};
use crate::ModelError;

/// The tower's hyper-parameters plus the projector's.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3VisionConfig {
    pub vision: SiglipVisionConfig,
    /// Soft tokens per image: a square grid the patch grid is pooled down to.
    pub mm_tokens_per_image: usize,
    /// Width of the text model's embeddings: what the projector outputs.
    pub text_hidden_size: usize,
}

/// llama.cpp's default pooling (`n_merge`) for Gemma 3: 64×64 patches to 16×16 tokens. Its
/// converter writes `clip.vision.projector.scale_factor` only when a model differs.
const GGUF_DEFAULT_SCALE_FACTOR: u64 = 4;
const MAX_TEXT_HIDDEN: usize = 1 << 16;

impl Gemma3VisionConfig {
    /// Patches along a side of the pooling window (AvgPool2d kernel = stride).
    pub fn pool_kernel(&self) -> usize {
        self.vision.patches_per_side() / self.tokens_per_side().max(1)
    }

    /// Tokens along a side of the output grid.
    pub fn tokens_per_side(&self) -> usize {
        self.mm_tokens_per_image.isqrt()
    }

    /// Reads a transformers `Gemma3Config` (`config.json` of a `Gemma3ForConditionalGeneration`):
    /// `vision_config`, `mm_tokens_per_image` (default 256, as transformers) and
    /// `text_config.hidden_size`.
    pub fn from_hf_config(root: &Value) -> Result<Gemma3VisionConfig, ModelError> {
        let vision_config = root
            .get("vision_config")
            .filter(|v| v.is_object())
            .ok_or_else(|| {
                ModelError::Config("config.json has no vision_config (not a vision model)".into())
            })?;
        let mm_tokens_per_image = match root.get("mm_tokens_per_image") {
            None | Some(Value::Null) => 256,
            Some(v) => v.as_u64().ok_or_else(|| {
                ModelError::Config(format!("mm_tokens_per_image is {v}, expected an integer"))
            })? as usize,
        };
        let text_hidden_size = root
            .get("text_config")
            .and_then(|t| t.get("hidden_size"))
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                ModelError::Config("config.json lacks integer 'text_config.hidden_size'".into())
            })? as usize;
        let cfg = Gemma3VisionConfig {
            vision: SiglipVisionConfig::from_hf_config(vision_config)?,
            mm_tokens_per_image,
            text_hidden_size,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads llama.cpp's mmproj metadata: `clip.projector_type` (or `clip.vision.projector_type`)
    /// must be `gemma3`; the text width is `clip.vision.projection_dim`; tokens per image are
    /// `(patches per side / scale_factor)²` with `clip.vision.projector.scale_factor`
    /// defaulting to 4, as llama.cpp computes them.
    pub fn from_gguf(f: &GgufFile) -> Result<Gemma3VisionConfig, ModelError> {
        let projector = match f.get_str("clip.projector_type")? {
            Some(p) => Some(p),
            None => f.get_str("clip.vision.projector_type")?,
        };
        if projector != Some("gemma3") {
            return Err(ModelError::Config(format!(
                "mmproj projector type is {}, expected 'gemma3'",
                projector.map_or("missing".into(), |p| format!("'{p}'"))
            )));
        }
        if f.get_bool("clip.has_vision_encoder")? == Some(false) {
            return Err(ModelError::Config(
                "mmproj file has no vision encoder".into(),
            ));
        }
        if f.get_bool("clip.use_silu")? == Some(true) {
            return Err(ModelError::Config(
                "mmproj file asks for SiLU; SigLIP uses GELU".into(),
            ));
        }
        let vision = SiglipVisionConfig::from_gguf(f)?;
        let text_hidden_size = f.get_u64("clip.vision.projection_dim")?.ok_or_else(|| {
            ModelError::Config("GGUF metadata lacks 'clip.vision.projection_dim'".into())
        })?;
        let scale = f
            .get_u64("clip.vision.projector.scale_factor")?
            .unwrap_or(GGUF_DEFAULT_SCALE_FACTOR);
        let pps = vision.patches_per_side() as u64;
        if scale == 0 || !pps.is_multiple_of(scale) {
            return Err(ModelError::Config(format!(
                "projector scale factor {scale} does not divide {pps} patches per side"
            )));
        }
        let cfg = Gemma3VisionConfig {
            vision,
            mm_tokens_per_image: ((pps / scale) * (pps / scale)) as usize,
            text_hidden_size: usize::try_from(text_hidden_size).unwrap_or(usize::MAX),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The tower's checks, plus a token grid that is square and pools the patch grid by a
    /// whole kernel.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.vision.validate()?;
        let err = |m: String| Err(ModelError::Config(m));
        if !(1..=MAX_TEXT_HIDDEN).contains(&self.text_hidden_size) {
            return err(format!(
                "text hidden size {} out of range",
                self.text_hidden_size
            ));
        }
        let t = self.mm_tokens_per_image;
        let side = self.tokens_per_side();
        if t == 0 || side * side != t {
            return err(format!(
                "mm_tokens_per_image {t} is not a square token grid"
            ));
        }
        let pps = self.vision.patches_per_side();
        if side > pps || !pps.is_multiple_of(side) {
            return err(format!(
                "{pps}x{pps} patches do not pool evenly to {side}x{side} tokens (the pooling \
                 kernel {pps}/{side} is not a whole number)"
            ));
        }
        Ok(())
    }
}

/// transformers' `Gemma3MultiModalProjector`.
struct MultiModalProjector {
    /// `mm_input_projection_weight`, stored `[vision_hidden, text_hidden]` and used as `x @ W`;
    /// held transposed, `[text_hidden, vision_hidden]`, the matrix `linear` multiplies by.
    mm_input_projection: Linear,
    /// Gemma RMSNorm multiplier `1 + w` over the vision width.
    mm_soft_emb_norm: Vec<f32>,
}

/// A loaded Gemma 3 image encoder: SigLIP tower + projector.
pub struct Gemma3Vision {
    config: Gemma3VisionConfig,
    tower: SiglipVisionTower,
    projector: MultiModalProjector,
}

/// Where transformers checkpoints keep the tower's tensors (the path in front of
/// `embeddings.`/`encoder.`/`post_layernorm.`) and the projector's, as saved in the wild:
/// the published checkpoints, transformers 4.52–4.57 saves (common in fine-tunes), transformers
/// 5 saves (its `SiglipVisionModel` has no `vision_model` level any more), and transformers 5's
/// in-memory names.
const HF_LAYOUTS: [(&str, &str); 5] = [
    ("vision_tower.vision_model.", "multi_modal_projector."),
    (
        "model.vision_tower.vision_model.",
        "model.multi_modal_projector.",
    ),
    ("vision_tower.", "multi_modal_projector."),
    ("model.vision_tower.", "model.multi_modal_projector."),
    // ShieldGemma 2 as transformers 5 saves it (its Gemma 3 model nested in `model.`); the
    // published checkpoint uses the second layout.
    (
        "model.model.vision_tower.",
        "model.model.multi_modal_projector.",
    ),
];

impl Gemma3Vision {
    /// Loads from a Hugging Face folder's `config.json` (parsed) and its tensors.
    pub fn load_hf(config: &Value, source: &dyn TensorSource) -> Result<Gemma3Vision, ModelError> {
        let config = Gemma3VisionConfig::from_hf_config(config)?;
        let probe = "embeddings.patch_embedding.weight";
        let (tower, projector) = HF_LAYOUTS
            .into_iter()
            .find(|(tower, _)| source.tensor(&format!("{tower}{probe}")).is_some())
            .ok_or_else(|| ModelError::MissingTensor(format!("{}{probe}", HF_LAYOUTS[0].0)))?;
        // The projector's prefix, checked on its own: a re-saved checkpoint may nest the two
        // differently.
        let projector = [
            "multi_modal_projector.",
            "model.multi_modal_projector.",
            "model.model.multi_modal_projector.",
        ]
        .into_iter()
        .find(|p| {
            let name = format!("{p}mm_input_projection_weight");
            source.tensor(&name).is_some()
        })
        .unwrap_or(projector);
        let loader = Loader {
            source,
            layout: WeightLayout::HuggingFace { prefix: tower },
        };
        Gemma3Vision::load_with(config, &loader, projector)
    }

    /// Loads llama.cpp's mmproj GGUF (`v.*` and `mm.*` tensors).
    pub fn load_gguf(mmproj: &GgufFile) -> Result<Gemma3Vision, ModelError> {
        let config = Gemma3VisionConfig::from_gguf(mmproj)?;
        let loader = Loader {
            source: mmproj,
            layout: WeightLayout::Gguf,
        };
        Gemma3Vision::load_with(config, &loader, "")
    }

    /// `projector` is the transformers prefix of the projector's tensors (unused for GGUF).
    fn load_with(
        config: Gemma3VisionConfig,
        loader: &Loader<'_>,
        projector: &str,
    ) -> Result<Gemma3Vision, ModelError> {
        config.validate()?;
        let (vh, th) = (config.vision.hidden_size, config.text_hidden_size);
        let (projection, norm) = match loader.layout {
            WeightLayout::HuggingFace { .. } => (
                format!("{projector}mm_input_projection_weight"),
                format!("{projector}mm_soft_emb_norm.weight"),
            ),
            WeightLayout::Gguf => (
                "mm.input_projection.weight".to_string(),
                "mm.soft_emb_norm.weight".to_string(),
            ),
        };
        let tower = SiglipVisionTower::load(config.vision.clone(), loader)?;
        let projector = MultiModalProjector {
            // llama.cpp keeps transformers' orientation: its `ne` is [text, vision], i.e.
            // [vision, text] outermost first.
            mm_input_projection: loader.linear_transposed(&projection, th, vh)?,
            mm_soft_emb_norm: loader.gemma_norm(&norm, vh)?,
        };
        Ok(Gemma3Vision {
            config,
            tower,
            projector,
        })
    }

    pub fn config(&self) -> &Gemma3VisionConfig {
        &self.config
    }

    /// The SigLIP tower alone (its output is the projector's input).
    pub fn tower(&self) -> &SiglipVisionTower {
        &self.tower
    }

    /// Side of the square image `encode` takes, in pixels.
    pub fn image_size(&self) -> usize {
        self.config.vision.image_size
    }

    /// Values `encode` takes: `[channels, image_size, image_size]`.
    pub fn pixel_len(&self) -> usize {
        self.config.vision.pixel_len()
    }

    /// Soft tokens per image.
    pub fn tokens_per_image(&self) -> usize {
        self.config.mm_tokens_per_image
    }

    /// Width of each soft token (the text model's hidden size).
    pub fn text_hidden(&self) -> usize {
        self.config.text_hidden_size
    }

    /// Bytes of weight matrices, as stored (the projection as held: transposed, owned).
    pub fn weight_bytes(&self) -> usize {
        self.tower.weight_bytes() + self.projector.mm_input_projection.bytes()
    }

    /// Turns one preprocessed image (`[channels, image_size, image_size]`, normalised as the
    /// Gemma 3 processor does) into `tokens_per_image × text_hidden` values in `out`, row-major
    /// (transformers' `get_image_features`).
    pub fn encode(&self, pixel_values: &[f32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        let c = &self.config;
        let mut patches = Vec::new();
        self.tower.forward(pixel_values, &mut patches)?;

        // Average pooling over the patch grid (transformers reshapes `[patches, hidden]` to
        // `[hidden, side, side]` with patches row-major, pools, and flattens row-major again).
        let vh = c.vision.hidden_size;
        let (pps, tps, k) = (
            c.vision.patches_per_side(),
            c.tokens_per_side(),
            c.pool_kernel(),
        );
        let mut pooled = vec![0.0f32; c.mm_tokens_per_image * vh];
        for (t, token) in pooled.chunks_exact_mut(vh).enumerate() {
            let (ty, tx) = (t / tps, t % tps);
            for ky in 0..k {
                for kx in 0..k {
                    let patch = (ty * k + ky) * pps + tx * k + kx;
                    ops::add_inplace(token, &patches[patch * vh..][..vh]);
                }
            }
            ops::scale_inplace(token, 1.0 / (k * k) as f32);
        }
        // Gemma RMSNorm (`1 + w`), with the vision tower's epsilon.
        let p = &self.projector;
        ops::rms_norm_inplace(&mut pooled, &p.mm_soft_emb_norm, c.vision.layer_norm_eps);
        // x @ W, with W held transposed; no sqrt(hidden) scaling.
        let n = c.mm_tokens_per_image;
        let mut quantized = Vec::new();
        out.clear();
        let y = sized(out, n * c.text_hidden_size);
        linear(
            ThreadPool::global(),
            &p.mm_input_projection,
            &pooled,
            n,
            y,
            &mut quantized,
        );
        Ok(())
    }

    /// `(name, value)` rows for `gemma info`.
    pub fn describe(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let v = &c.vision;
        vec![
            (
                "vision tower".into(),
                format!(
                    "SigLIP, {} layers, hidden {}, ffn {}, {} heads of {}",
                    v.num_hidden_layers,
                    v.hidden_size,
                    v.intermediate_size,
                    v.num_attention_heads,
                    v.head_dim()
                ),
            ),
            (
                "vision input".into(),
                format!(
                    "{}x{} px, {} channels, patch {} ({} patches)",
                    v.image_size,
                    v.image_size,
                    v.num_channels,
                    v.patch_size,
                    v.num_patches()
                ),
            ),
            (
                "vision projector".into(),
                format!(
                    "avg-pool {k}x{k} to {} tokens, RMSNorm, {} -> {}",
                    c.mm_tokens_per_image,
                    v.hidden_size,
                    c.text_hidden_size,
                    k = c.pool_kernel()
                ),
            ),
            ("vision layer_norm_eps".into(), v.layer_norm_eps.to_string()),
            (
                "vision weights".into(),
                format!("{:.1} MiB", self.weight_bytes() as f64 / (1 << 20) as f64),
            ),
        ]
    }
}
