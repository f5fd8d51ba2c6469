//! Gemma 2 text hyper-parameters, from GGUF metadata (llama.cpp's `gemma2.*` keys) or a Hugging
//! Face `config.json` (`Gemma2Config`).
//!
//! Values a file leaves out take the defaults of the reader that made it: transformers'
//! `Gemma2Config` for `config.json` (soft-caps 50 and 30, window 4096, `query_pre_attn_scalar`
//! 256, even layers sliding, RoPE base 10 000), llama.cpp's `gemma2` loader for GGUF (the same
//! soft-caps and window, pattern 2, and its rule for the score scale).

use gemma_formats::{GgufFile, MetaValue};
use serde_json::Value;

use crate::decoder::{check_attention_heads, check_nonzero};
pub use crate::decoder::{LayerType, RopeParams};
use crate::ModelError;

#[derive(Clone, Debug, PartialEq)]
pub struct Gemma2Config {
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
    /// Which layers attend locally (transformers' `layer_types`; even layers in every
    /// published checkpoint).
    pub layer_types: Vec<LayerType>,
    /// One RoPE for every layer (Gemma 3 has two).
    pub rope: RopeParams,
    /// Trained context length.
    pub max_position_embeddings: usize,
    /// `cap * tanh(score / cap)` on attention scores before the softmax (50 in every release).
    pub attn_logit_softcapping: Option<f32>,
    /// `cap * tanh(logit / cap)` on the final logits (30 in every release).
    pub final_logit_softcapping: Option<f32>,
}

/// transformers' `Gemma2Config` and llama.cpp's `gemma2` loader agree on these.
const DEFAULT_ATTN_SOFTCAP: f32 = 50.0;
const DEFAULT_FINAL_SOFTCAP: f32 = 30.0;
const DEFAULT_SLIDING_WINDOW: usize = 4096;
/// One sliding layer, then a global one (llama.cpp's `set_swa_pattern(2)`; transformers'
/// default `layer_types`).
const SLIDING_WINDOW_PATTERN: usize = 2;
const DEFAULT_ROPE_THETA: f32 = 10_000.0;
/// Gemma 2 27B's layer count: llama.cpp scales its scores by `(hidden / heads)^-0.5`.
const LAYERS_27B: usize = 46;

impl Gemma2Config {
    /// Reads llama.cpp's `gemma2.*` metadata, as its `gemma2` loader does: the soft-caps and
    /// the window are optional (defaults 50, 30, 4096), the layer pattern is fixed at 2 unless
    /// the file lists one bool per layer, and the score scale is `head_dim^-0.5` except for
    /// the 27B model (`(hidden / heads)^-0.5`) unless the file has llama.cpp's generic
    /// `attention.scale`.
    pub fn from_gguf(f: &GgufFile) -> Result<Gemma2Config, ModelError> {
        let arch = f.architecture()?;
        let key = |k: &str| format!("{arch}.{k}");
        let opt = |k: &str| -> Result<Option<usize>, ModelError> {
            match f.get_u64(&key(k))? {
                Some(v) => usize::try_from(v)
                    .map(Some)
                    .map_err(|_| ModelError::Config(format!("'{}' = {v} is too large", key(k)))),
                None => Ok(None),
            }
        };
        let req = |k: &str| -> Result<usize, ModelError> {
            opt(k)?.ok_or_else(|| ModelError::Config(format!("GGUF metadata lacks '{}'", key(k))))
        };
        let req_f32 = |k: &str| -> Result<f32, ModelError> {
            f.get_f32(&key(k))?
                .ok_or_else(|| ModelError::Config(format!("GGUF metadata lacks '{}'", key(k))))
        };
        let hidden_size = req("embedding_length")?;
        let num_hidden_layers = crate::layer_count(req("block_count")?)?;
        let num_attention_heads = req("attention.head_count")?;
        if num_attention_heads == 0 {
            return Err(ModelError::Config(format!(
                "'{}' is 0",
                key("attention.head_count")
            )));
        }
        let head_dim = opt("attention.key_length")?.unwrap_or(hidden_size / num_attention_heads);
        if let Some(v) = opt("attention.value_length")? {
            if v != head_dim {
                return Err(ModelError::Config(format!(
                    "value_length {v} differs from key_length {head_dim}"
                )));
            }
        }
        let layer_types = match f.get(&key("attention.sliding_window_pattern")) {
            Some(MetaValue::Array(items)) => LayerType::from_gguf_flags(items)?,
            Some(_) => {
                LayerType::pattern(num_hidden_layers, req("attention.sliding_window_pattern")?)
            }
            None => LayerType::pattern(num_hidden_layers, SLIDING_WINDOW_PATTERN),
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
        let query_pre_attn_scalar = match f.get_f32(&key("attention.scale"))? {
            // llama.cpp's generic key holds the score multiplier itself.
            Some(scale) if !(scale.is_finite() && scale > 0.0) => {
                return Err(ModelError::Config(format!(
                    "attention.scale {scale} must be a positive finite number"
                )))
            }
            Some(scale) => scale.powi(-2),
            None if num_hidden_layers == LAYERS_27B => (hidden_size / num_attention_heads) as f32,
            None => head_dim as f32,
        };
        let embd = f
            .tensor_info("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let cfg = Gemma2Config {
            vocab_size: embd.shape.first().copied().unwrap_or(0),
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: opt("attention.head_count_kv")?.unwrap_or(num_attention_heads),
            head_dim,
            query_pre_attn_scalar,
            // llama.cpp requires it for this architecture.
            rms_norm_eps: req_f32("attention.layer_norm_rms_epsilon")?,
            sliding_window: opt("attention.sliding_window")?.unwrap_or(DEFAULT_SLIDING_WINDOW),
            layer_types,
            rope: RopeParams {
                theta: f
                    .get_f32(&key("rope.freq_base"))?
                    .unwrap_or(DEFAULT_ROPE_THETA),
                linear_factor,
            },
            max_position_embeddings: req("context_length")?,
            attn_logit_softcapping: Some(
                f.get_f32(&key("attn_logit_softcapping"))?
                    .unwrap_or(DEFAULT_ATTN_SOFTCAP),
            ),
            final_logit_softcapping: Some(
                f.get_f32(&key("final_logit_softcapping"))?
                    .unwrap_or(DEFAULT_FINAL_SOFTCAP),
            ),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a transformers `Gemma2Config`, with its defaults for what the file leaves out. A
    /// soft-cap written as `null` is off; one left out is transformers' default.
    pub fn from_hf_config(c: &Value) -> Result<Gemma2Config, ModelError> {
        let err = |m: String| ModelError::Config(m);
        let int = |k: &str| -> Result<Option<usize>, ModelError> {
            match c.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|v| usize::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| err(format!("config.json: '{k}' is {v}, not a size"))),
            }
        };
        let req = |k: &str| -> Result<usize, ModelError> {
            int(k)?.ok_or_else(|| err(format!("config.json lacks integer '{k}'")))
        };
        let num = |k: &str| -> Result<Option<f32>, ModelError> {
            match c.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(|v| Some(v as f32))
                    .ok_or_else(|| err(format!("config.json: '{k}' is {v}, not a number"))),
            }
        };
        // Absent: transformers' default; `null`: off.
        let softcap = |k: &str, default: f32| -> Result<Option<f32>, ModelError> {
            match c.get(k) {
                Some(Value::Null) => Ok(None),
                None => Ok(Some(default)),
                Some(_) => num(k),
            }
        };
        // Settings the forward pass hard-codes: reject checkpoints that differ rather than
        // run them wrongly.
        match c.get("hidden_activation").and_then(Value::as_str) {
            None | Some("gelu_pytorch_tanh") => {}
            Some(other) => return Err(err(format!("unsupported hidden_activation '{other}'"))),
        }
        if c.get("attention_bias").and_then(Value::as_bool) == Some(true) {
            return Err(err("attention biases are not supported".into()));
        }
        if c.get("use_bidirectional_attention")
            .and_then(Value::as_bool)
            == Some(true)
        {
            return Err(err(
                "bidirectional attention (an embedding model) is not supported".into(),
            ));
        }
        let num_hidden_layers = crate::layer_count(req("num_hidden_layers")?)?;
        let layer_types = match c.get("layer_types") {
            Some(Value::Array(items)) => LayerType::from_hf(items)?,
            None | Some(Value::Null) => {
                LayerType::pattern(num_hidden_layers, SLIDING_WINDOW_PATTERN)
            }
            Some(other) => return Err(err(format!("layer_types is {other}, not a list"))),
        };
        let sliding_window = match c.get("sliding_window") {
            None => DEFAULT_SLIDING_WINDOW,
            // No window: only possible when no layer slides (checked by `validate`).
            Some(Value::Null) => 0,
            Some(_) => req("sliding_window")?,
        };
        // transformers 5 keeps the RoPE settings in `rope_parameters`; older files have
        // `rope_theta` (and no scaling: Gemma 2 was never released with any).
        let rope_params = c.get("rope_parameters").filter(|v| !v.is_null());
        let theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| err(format!("rope_theta is {v}, not a number")))?
                as f32,
            None => num("rope_theta")?.unwrap_or(DEFAULT_ROPE_THETA),
        };
        let scaling = rope_params.or(c.get("rope_scaling").filter(|v| !v.is_null()));
        let linear_factor = match scaling
            .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
            .and_then(Value::as_str)
        {
            None | Some("default") => 1.0,
            Some("linear") => scaling
                .and_then(|s| s.get("factor"))
                .and_then(Value::as_f64)
                .unwrap_or(1.0) as f32,
            Some(other) => return Err(err(format!("unsupported rope type '{other}'"))),
        };
        let cfg = Gemma2Config {
            vocab_size: req("vocab_size")?,
            hidden_size: req("hidden_size")?,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads: req("num_attention_heads")?,
            num_key_value_heads: int("num_key_value_heads")?.unwrap_or(4),
            head_dim: int("head_dim")?.unwrap_or(256),
            query_pre_attn_scalar: num("query_pre_attn_scalar")?.unwrap_or(256.0),
            rms_norm_eps: num("rms_norm_eps")?.unwrap_or(1e-6),
            sliding_window,
            layer_types,
            rope: RopeParams {
                theta,
                linear_factor,
            },
            max_position_embeddings: int("max_position_embeddings")?.unwrap_or(8192),
            attn_logit_softcapping: softcap("attn_logit_softcapping", DEFAULT_ATTN_SOFTCAP)?,
            final_logit_softcapping: softcap("final_logit_softcapping", DEFAULT_FINAL_SOFTCAP)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects configurations the forward pass cannot run: zero or overflowing sizes, heads
    /// that do not group, a layer list of the wrong length, a sliding layer without a window,
    /// and scales or caps that are not positive finite numbers.
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
        if self.sliding_window == 0 && self.layer_types.contains(&LayerType::Sliding) {
            return err("sliding layers with a window of 0".into());
        }
        let positive = |what: &str, v: f32| -> Result<(), ModelError> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(ModelError::Config(format!(
                    "{what} {v} must be a positive finite number"
                )))
            }
        };
        positive("query_pre_attn_scalar", self.query_pre_attn_scalar)?;
        positive("rms_norm_eps", self.rms_norm_eps)?;
        if let Some(cap) = self.attn_logit_softcapping {
            positive("attn_logit_softcapping", cap)?;
        }
        if let Some(cap) = self.final_logit_softcapping {
            positive("final_logit_softcapping", cap)?;
        }
        self.rope.validate("the")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal() -> Value {
        json!({
            "model_type": "gemma2",
            "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16
        })
    }

    #[test]
    fn left_out_values_take_transformers_defaults() {
        let c = Gemma2Config::from_hf_config(&minimal()).unwrap();
        assert_eq!(c.attn_logit_softcapping, Some(50.0));
        assert_eq!(c.final_logit_softcapping, Some(30.0));
        assert_eq!(c.sliding_window, 4096);
        assert_eq!(c.query_pre_attn_scalar, 256.0);
        assert_eq!(c.rope.theta, 10_000.0);
        assert_eq!(c.max_position_embeddings, 8192);
        use LayerType::*;
        assert_eq!(c.layer_types, [Sliding, Full, Sliding, Full]);
    }

    #[test]
    fn layer_types_and_null_caps_are_read_as_written() {
        let mut v = minimal();
        v["layer_types"] = json!([
            "full_attention",
            "full_attention",
            "sliding_attention",
            "full_attention"
        ]);
        v["attn_logit_softcapping"] = Value::Null;
        v["final_logit_softcapping"] = json!(12.5);
        v["rope_theta"] = json!(20000.0);
        let c = Gemma2Config::from_hf_config(&v).unwrap();
        use LayerType::*;
        assert_eq!(c.layer_types, [Full, Full, Sliding, Full]);
        assert_eq!(c.attn_logit_softcapping, None);
        assert_eq!(c.final_logit_softcapping, Some(12.5));
        assert_eq!(c.rope.theta, 20_000.0);
    }

    #[test]
    fn bad_configs_are_refused() {
        let cases: [(&str, Value); 7] = [
            ("layer_types", json!(["sliding_attention"])),
            ("attn_logit_softcapping", json!(0.0)),
            ("final_logit_softcapping", json!(-3.0)),
            ("num_key_value_heads", json!(3)),
            ("hidden_activation", json!("relu")),
            ("sliding_window", json!(-1)),
            ("use_bidirectional_attention", json!(true)),
        ];
        for (key, value) in cases {
            let mut v = minimal();
            v[key] = value.clone();
            let e = Gemma2Config::from_hf_config(&v).unwrap_err();
            assert!(matches!(e, ModelError::Config(_)), "{key} = {value}: {e}");
        }
        let mut v = minimal();
        v["sliding_window"] = Value::Null;
        assert!(
            Gemma2Config::from_hf_config(&v).is_err(),
            "sliding layers need a window"
        );
    }
}
