//! Gemma 3 text hyper-parameters, from GGUF metadata or a Hugging Face `config.json`.

use gemma_formats::GgufFile;
use serde_json::Value;

use crate::decoder::{check_attention_heads, check_nonzero};
pub use crate::decoder::{LayerType, RopeParams};
use crate::ModelError;

#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Attention scores are multiplied by `query_pre_attn_scalar^-0.5` (not `head_dim^-0.5`).
    pub query_pre_attn_scalar: f32,
    pub rms_norm_eps: f32,
    pub sliding_window: usize,
    pub layer_types: Vec<LayerType>,
    pub rope_global: RopeParams,
    pub rope_local: RopeParams,
    /// Trained context length.
    pub max_position_embeddings: usize,
    pub attn_logit_softcapping: Option<f32>,
    pub final_logit_softcapping: Option<f32>,
}

/// Gemma 3 alternates 5 local layers with 1 global one.
const DEFAULT_SLIDING_WINDOW_PATTERN: usize = 6;
const DEFAULT_LOCAL_ROPE_THETA: f32 = 10_000.0;
const DEFAULT_GLOBAL_ROPE_THETA: f32 = 1_000_000.0;

impl Gemma3Config {
    /// Reads `gemma3.*` metadata. The GGUF leaves some values out; they are the published
    /// defaults, applied here: the 5:1 layer pattern, local RoPE base 10 000, and the
    /// query scaling (`hidden/heads` for the 27B model, `head_dim` otherwise — llama.cpp's rule).
    pub fn from_gguf(f: &GgufFile) -> Result<Gemma3Config, ModelError> {
        let arch = f.architecture()?;
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize, ModelError> {
            let v = f
                .get_u64(&key(k))?
                .ok_or_else(|| ModelError::Config(format!("GGUF metadata lacks '{}'", key(k))))?;
            usize::try_from(v)
                .map_err(|_| ModelError::Config(format!("'{}' = {v} is too large", key(k))))
        };
        let hidden_size = req("embedding_length")?;
        let num_hidden_layers = crate::layer_count(req("block_count")?)?;
        let num_attention_heads = req("attention.head_count")?;
        let num_key_value_heads = match f.get_u64(&key("attention.head_count_kv"))? {
            Some(v) => v as usize,
            None => num_attention_heads,
        };
        let head_dim = match f.get_u64(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None => hidden_size / num_attention_heads.max(1),
        };
        if let Some(v) = f.get_u64(&key("attention.value_length"))? {
            if v as usize != head_dim {
                return Err(ModelError::Config(format!(
                    "value_length {v} differs from key_length {head_dim}"
                )));
            }
        }
        let layer_types = match f.get(&key("attention.sliding_window_pattern")) {
            // Newer llama.cpp files store one bool per layer (true = sliding).
            Some(gemma_formats::MetaValue::Array(items)) => LayerType::from_gguf_flags(items)?,
            Some(_) => {
                LayerType::pattern(num_hidden_layers, req("attention.sliding_window_pattern")?)
            }
            None => LayerType::pattern(num_hidden_layers, DEFAULT_SLIDING_WINDOW_PATTERN),
        };
        let linear_factor = match f.get_str(&key("rope.scaling.type"))? {
            None | Some("none") => 1.0,
            Some("linear") => f.get_f32(&key("rope.scaling.factor"))?.unwrap_or(1.0),
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "unsupported rope scaling '{other}'"
                )))
            }
        };
        let query_pre_attn_scalar = if let Some(scale) = f.get_f32(&key("attention.scale"))? {
            // llama.cpp's generic key holds the score multiplier itself.
            if scale.is_nan() || scale <= 0.0 {
                return Err(ModelError::Config(format!(
                    "attention.scale {scale} must be positive"
                )));
            }
            scale.powi(-2)
        } else if num_hidden_layers == 62 {
            // Gemma 3 27B: 5376 / 32 = 168.
            (hidden_size / num_attention_heads.max(1)) as f32
        } else {
            head_dim as f32
        };
        let embd = f
            .tensor_info("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let vocab_size = *embd.shape.first().unwrap_or(&0);
        let cfg = Gemma3Config {
            vocab_size,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            query_pre_attn_scalar,
            rms_norm_eps: f
                .get_f32(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-6),
            sliding_window: req("attention.sliding_window")?,
            layer_types,
            rope_global: RopeParams {
                theta: f
                    .get_f32(&key("rope.freq_base"))?
                    .unwrap_or(DEFAULT_GLOBAL_ROPE_THETA),
                linear_factor,
            },
            rope_local: RopeParams {
                theta: DEFAULT_LOCAL_ROPE_THETA,
                linear_factor: 1.0,
            },
            max_position_embeddings: req("context_length")?,
            attn_logit_softcapping: f.get_f32(&key("attn_logit_softcapping"))?,
            final_logit_softcapping: f.get_f32(&key("final_logit_softcapping"))?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a transformers `Gemma3TextConfig` (or the `text_config` of a `Gemma3Config`),
    /// accepting both the transformers 5 `rope_parameters` form and the older
    /// `rope_theta`/`rope_local_base_freq`/`rope_scaling` keys.
    pub fn from_hf_config(root: &Value) -> Result<Gemma3Config, ModelError> {
        let c = root.get("text_config").unwrap_or(root);
        let num = |k: &str| -> Option<f64> { c.get(k).and_then(Value::as_f64) };
        let req = |k: &str| -> Result<usize, ModelError> {
            c.get(k)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Config(format!("config.json lacks integer '{k}'")))
        };
        let num_hidden_layers = crate::layer_count(req("num_hidden_layers")?)?;
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        let head_dim = c
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .unwrap_or(256);
        let layer_types = match c.get("layer_types").and_then(Value::as_array) {
            Some(items) => LayerType::from_hf(items)?,
            None => LayerType::pattern(
                num_hidden_layers,
                c.get("sliding_window_pattern")
                    .and_then(Value::as_u64)
                    .unwrap_or(DEFAULT_SLIDING_WINDOW_PATTERN as u64) as usize,
            ),
        };
        let rope = |kind: &str,
                    legacy_theta: &str,
                    default_theta: f32,
                    legacy_scaling: bool|
         -> Result<RopeParams, ModelError> {
            let params = c.get("rope_parameters").and_then(|p| p.get(kind));
            let theta = params
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .or_else(|| num(legacy_theta))
                .unwrap_or(default_theta as f64) as f32;
            let scaling = params.or(if legacy_scaling {
                c.get("rope_scaling").filter(|v| !v.is_null())
            } else {
                None
            });
            let linear_factor = match scaling
                .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
                .and_then(Value::as_str)
            {
                None | Some("default") => 1.0,
                Some("linear") => scaling
                    .and_then(|s| s.get("factor"))
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0) as f32,
                Some(other) => {
                    return Err(ModelError::Config(format!(
                        "unsupported rope type '{other}' for {kind}"
                    )))
                }
            };
            Ok(RopeParams {
                theta,
                linear_factor,
            })
        };
        let cfg = Gemma3Config {
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: c
                .get("num_key_value_heads")
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .unwrap_or(num_attention_heads),
            head_dim,
            query_pre_attn_scalar: num("query_pre_attn_scalar").unwrap_or(256.0) as f32,
            rms_norm_eps: num("rms_norm_eps").unwrap_or(1e-6) as f32,
            sliding_window: c
                .get("sliding_window")
                .and_then(Value::as_u64)
                .unwrap_or(4096) as usize,
            layer_types,
            rope_global: rope(
                "full_attention",
                "rope_theta",
                DEFAULT_GLOBAL_ROPE_THETA,
                true,
            )?,
            rope_local: rope(
                "sliding_attention",
                "rope_local_base_freq",
                DEFAULT_LOCAL_ROPE_THETA,
                false,
            )?,
            max_position_embeddings: c
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(131_072) as usize,
            attn_logit_softcapping: num("attn_logit_softcapping").map(|v| v as f32),
            final_logit_softcapping: num("final_logit_softcapping").map(|v| v as f32),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects configurations the forward pass cannot run (zero sizes, heads that do not group).
    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |m: String| Err(ModelError::Config(m));
        check_nonzero(&[
            ("vocab", self.vocab_size),
            ("hidden", self.hidden_size),
            ("ffn", self.intermediate_size),
            ("head_dim", self.head_dim),
        ])?;
        crate::layer_count(self.num_hidden_layers)?;
        check_attention_heads(
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        )?;
        if self.layer_types.len() != self.num_hidden_layers {
            return err(format!(
                "{} layer types for {} layers",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        if self.sliding_window == 0 {
            return err("sliding window of 0".into());
        }
        if self.query_pre_attn_scalar.is_nan() || self.query_pre_attn_scalar <= 0.0 {
            return err(format!(
                "query_pre_attn_scalar {} must be positive",
                self.query_pre_attn_scalar
            ));
        }
        self.rope_local.validate("local")?;
        self.rope_global.validate("global")?;
        Ok(())
    }

    pub fn rope(&self, layer: usize) -> RopeParams {
        match self.layer_types[layer] {
            LayerType::Sliding => self.rope_local,
            LayerType::Full => self.rope_global,
        }
    }
}
