//! Gemma 3n text hyper-parameters, from a Hugging Face `config.json` (`Gemma3nTextConfig`, or the
//! `text_config` of a `Gemma3nConfig`).

use serde_json::Value;

use gemma_formats::{GgufFile, MetaValue};

use super::normal_quantile;
use crate::decoder::{check_attention_heads, check_nonzero, LayerType, RopeParams};
use crate::ModelError;

#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3nConfig {
    /// Rows of the embedding and LM head (text plus the multimodal "hard" token ids).
    pub vocab_size: usize,
    /// Rows of the per-layer embedding table: ids at or above this get PLE row 0.
    pub vocab_size_per_layer_input: usize,
    pub hidden_size: usize,
    /// `P`: width of each layer's per-layer input.
    pub hidden_size_per_layer_input: usize,
    /// MLP width of every layer (MatFormer: may differ per layer).
    pub intermediate_size: Vec<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub sliding_window: usize,
    pub layer_types: Vec<LayerType>,
    pub rope_global: RopeParams,
    pub rope_local: RopeParams,
    pub max_position_embeddings: usize,
    pub final_logit_softcapping: Option<f32>,
    /// The last `num_kv_shared_layers` layers reuse earlier layers' keys and values.
    pub num_kv_shared_layers: usize,
    pub laurel_rank: usize,
    pub altup_num_inputs: usize,
    pub altup_active_idx: usize,
    pub altup_correct_scale: bool,
    /// Per layer, for MLPs with activation sparsity `p > 0`: the cutoff's std multiplier
    /// `Φ⁻¹(p)` (transformers' config holds `p`, llama.cpp's GGUF the multiplier). `None`: dense.
    pub activation_sparsity: Vec<Option<f32>>,
    /// First id embedded by a multimodal embedder (`vision_config.vocab_offset`), when the
    /// checkpoint is a `Gemma3nForConditionalGeneration`; such ids are not text.
    pub first_multimodal_id: Option<usize>,
    /// MatFormer: the checkpoint's MLPs may be wider than `intermediate_size`; keep the first
    /// `intermediate_size[l]` units of each (set by `with_ffn_widths`).
    pub slice_ffn: bool,
}

const DEFAULT_LOCAL_ROPE_THETA: f64 = 10_000.0;
const DEFAULT_GLOBAL_ROPE_THETA: f64 = 1_000_000.0;
/// Rows of the published embedding table, and how many of them are text tokens.
const PUBLISHED_VOCAB: usize = 262_400;
const PUBLISHED_TEXT_VOCAB: usize = 262_144;

impl Gemma3nConfig {
    pub fn from_hf_config(root: &Value) -> Result<Gemma3nConfig, ModelError> {
        let c = root.get("text_config").unwrap_or(root);
        let err = |m: String| ModelError::Config(m);
        let int = |k: &str| c.get(k).and_then(Value::as_u64).map(|v| v as usize);
        let req = |k: &str| int(k).ok_or_else(|| err(format!("config.json lacks integer '{k}'")));
        let num = |k: &str| c.get(k).and_then(Value::as_f64);
        // Settings the forward pass hard-codes: reject checkpoints that differ rather than
        // run them wrongly.
        match c.get("hidden_activation").and_then(Value::as_str) {
            None | Some("gelu_pytorch_tanh") => {}
            Some(other) => return Err(err(format!("unsupported hidden_activation '{other}'"))),
        }
        if c.get("attention_bias").and_then(Value::as_bool) == Some(true) {
            return Err(err("attention biases are not supported".into()));
        }
        let num_hidden_layers = crate::layer_count(req("num_hidden_layers")?)?;
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        let n = num_hidden_layers;

        let intermediate_size = match c.get("intermediate_size") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64().map(|v| v as usize).ok_or_else(|| {
                        err(format!("intermediate_size holds {v}, expected integers"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(v) => vec![
                v.as_u64()
                    .ok_or_else(|| err(format!("intermediate_size is {v}")))?
                    as usize;
                n
            ],
            None => return Err(err("config.json lacks 'intermediate_size'".into())),
        };
        let layer_types = match c.get("layer_types").and_then(Value::as_array) {
            Some(items) => LayerType::from_hf(items)?,
            // transformers' default: 4 sliding layers, then a full one.
            None => LayerType::pattern(n, 5),
        };
        let sparsity_pattern = match c.get("activation_sparsity_pattern") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_f64().map(|v| v as f32).ok_or_else(|| {
                        err(format!(
                            "activation_sparsity_pattern holds {v}, expected numbers"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(Value::Number(p)) => vec![p.as_f64().unwrap_or(0.0) as f32; n],
            // transformers' default: 0.95 on the first 10 layers of deep models.
            None | Some(Value::Null) => {
                let sparse = if n > 10 { 10 } else { 0 };
                (0..n)
                    .map(|i| if i < sparse { 0.95 } else { 0.0 })
                    .collect()
            }
            Some(v) => return Err(err(format!("activation_sparsity_pattern is {v}"))),
        };
        let rope = |kind: &str, legacy: &str, default: f64| -> Result<RopeParams, ModelError> {
            let params = c.get("rope_parameters").and_then(|p| p.get(kind));
            match params
                .and_then(|p| p.get("rope_type"))
                .and_then(Value::as_str)
            {
                None | Some("default") => {}
                Some(other) => {
                    return Err(err(format!("unsupported rope type '{other}' for {kind}")))
                }
            }
            let theta = params
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .or_else(|| num(legacy))
                .unwrap_or(default);
            Ok(RopeParams {
                theta: theta as f32,
                linear_factor: 1.0,
            })
        };
        let first_multimodal_id = root
            .get("vision_config")
            .and_then(|v| v.get("vocab_offset"))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .or_else(|| root.get("text_config").map(|_| PUBLISHED_TEXT_VOCAB));
        let cfg = Gemma3nConfig {
            vocab_size: req("vocab_size")?,
            vocab_size_per_layer_input: req("vocab_size_per_layer_input")?,
            hidden_size,
            hidden_size_per_layer_input: req("hidden_size_per_layer_input")?,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: int("num_key_value_heads").unwrap_or(num_attention_heads),
            head_dim: int("head_dim").unwrap_or(256),
            rms_norm_eps: num("rms_norm_eps").unwrap_or(1e-6) as f32,
            sliding_window: int("sliding_window").unwrap_or(512),
            layer_types,
            rope_global: rope("full_attention", "rope_theta", DEFAULT_GLOBAL_ROPE_THETA)?,
            rope_local: rope(
                "sliding_attention",
                "rope_local_base_freq",
                DEFAULT_LOCAL_ROPE_THETA,
            )?,
            max_position_embeddings: int("max_position_embeddings").unwrap_or(32_768),
            final_logit_softcapping: match c.get("final_logit_softcapping") {
                Some(Value::Null) => None,
                Some(v) => v.as_f64().map(|v| v as f32),
                None => Some(30.0),
            },
            num_kv_shared_layers: int("num_kv_shared_layers").unwrap_or(0),
            laurel_rank: req("laurel_rank")?,
            altup_num_inputs: int("altup_num_inputs").unwrap_or(4),
            altup_active_idx: int("altup_active_idx").unwrap_or(0),
            altup_correct_scale: c
                .get("altup_correct_scale")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            activation_sparsity: sparsity_to_multipliers(&sparsity_pattern)?,
            first_multimodal_id,
            slice_ffn: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads llama.cpp's `gemma3n.*` metadata. Values the converter leaves out are the published
    /// ones: local RoPE base 10 000 and the text/multimodal id split of the 262 400-token vocab.
    pub fn from_gguf(f: &GgufFile) -> Result<Gemma3nConfig, ModelError> {
        let arch = f.architecture()?;
        let key = |k: &str| format!("{arch}.{k}");
        let err = |m: String| ModelError::Config(m);
        let opt = |k: &str| -> Result<Option<usize>, ModelError> {
            match f.get_u64(&key(k))? {
                Some(v) => usize::try_from(v)
                    .map(Some)
                    .map_err(|_| err(format!("'{}' = {v} is too large", key(k)))),
                None => Ok(None),
            }
        };
        let req = |k: &str| -> Result<usize, ModelError> {
            opt(k)?.ok_or_else(|| err(format!("GGUF metadata lacks '{}'", key(k))))
        };
        let rows_of = |name: &str| -> Result<usize, ModelError> {
            f.tensor_info(name)
                .and_then(|t| t.shape.first().copied())
                .ok_or_else(|| ModelError::MissingTensor(name.into()))
        };
        let n = crate::layer_count(req("block_count")?)?;
        let num_attention_heads = req("attention.head_count")?;
        let head_dim = req("attention.key_length")?;
        if let Some(v) = opt("attention.value_length")? {
            if v != head_dim {
                return Err(err(format!(
                    "value_length {v} differs from key_length {head_dim}"
                )));
            }
        }
        // One width for all layers, or one per layer.
        let intermediate_size = match f.get(&key("feed_forward_length")) {
            Some(MetaValue::Array(_)) => f
                .get_i64_array(&key("feed_forward_length"))?
                .unwrap_or_default()
                .into_iter()
                .map(|v| usize::try_from(v).map_err(|_| err(format!("MLP width {v}"))))
                .collect::<Result<Vec<_>, _>>()?,
            _ => vec![req("feed_forward_length")?; n],
        };
        let layer_types = match f.get(&key("attention.sliding_window_pattern")) {
            Some(MetaValue::Array(items)) => LayerType::from_gguf_flags(items)?,
            _ => {
                return Err(err(format!(
                    "GGUF metadata lacks the per-layer '{}'",
                    key("attention.sliding_window_pattern")
                )))
            }
        };
        // The std multipliers Φ⁻¹(p); -inf (p = 0) marks a dense layer.
        let activation_sparsity = f
            .get_f32_array(&key("activation_sparsity_scale"))?
            .ok_or_else(|| {
                err(format!(
                    "GGUF metadata lacks '{}'",
                    key("activation_sparsity_scale")
                ))
            })?
            .into_iter()
            .map(|z| (z != f32::NEG_INFINITY).then_some(z))
            .collect();
        let vocab_size = rows_of("token_embd.weight")?;
        let cfg = Gemma3nConfig {
            vocab_size,
            vocab_size_per_layer_input: rows_of("per_layer_token_embd.weight")?,
            hidden_size: req("embedding_length")?,
            hidden_size_per_layer_input: req("embedding_length_per_layer_input")?,
            intermediate_size,
            num_hidden_layers: n,
            num_attention_heads,
            num_key_value_heads: opt("attention.head_count_kv")?.unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: f
                .get_f32(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-6),
            sliding_window: req("attention.sliding_window")?,
            layer_types,
            rope_global: RopeParams {
                theta: f
                    .get_f32(&key("rope.freq_base"))?
                    .unwrap_or(DEFAULT_GLOBAL_ROPE_THETA as f32),
                linear_factor: 1.0,
            },
            rope_local: RopeParams {
                theta: DEFAULT_LOCAL_ROPE_THETA as f32,
                linear_factor: 1.0,
            },
            max_position_embeddings: req("context_length")?,
            final_logit_softcapping: f.get_f32(&key("final_logit_softcapping"))?,
            num_kv_shared_layers: opt("attention.shared_kv_layers")?.unwrap_or(0),
            laurel_rank: rows_of("blk.0.laurel_l.weight")?,
            altup_num_inputs: req("altup.num_inputs")?,
            altup_active_idx: opt("altup.active_idx")?.unwrap_or(0),
            altup_correct_scale: true,
            activation_sparsity,
            // Published vocab: ids from 262 144 on are image/audio tokens.
            first_multimodal_id: (vocab_size == PUBLISHED_VOCAB).then_some(PUBLISHED_TEXT_VOCAB),
            slice_ffn: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects configurations the forward pass cannot run.
    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |m: String| Err(ModelError::Config(m));
        let n = self.num_hidden_layers;
        if n == 0 || n > 1024 {
            return err(format!("implausible layer count {n}"));
        }
        self.rope_local.validate("local")?;
        self.rope_global.validate("global")?;
        check_nonzero(&[
            ("vocab", self.vocab_size),
            ("per-layer vocab", self.vocab_size_per_layer_input),
            ("hidden", self.hidden_size),
            ("per-layer hidden", self.hidden_size_per_layer_input),
            ("head_dim", self.head_dim),
            ("laurel rank", self.laurel_rank),
        ])?;
        for (what, len) in [
            ("intermediate_size", self.intermediate_size.len()),
            ("layer_types", self.layer_types.len()),
            (
                "activation_sparsity_pattern",
                self.activation_sparsity.len(),
            ),
        ] {
            if len != n {
                return err(format!("{what} has {len} entries for {n} layers"));
            }
        }
        if let Some(i) = self.intermediate_size.iter().position(|&w| w == 0) {
            return err(format!("layer {i} has an MLP width of 0"));
        }
        if let Some(z) = self
            .activation_sparsity
            .iter()
            .flatten()
            .find(|z| !z.is_finite())
        {
            return err(format!("activation sparsity multiplier {z} is not finite"));
        }
        check_attention_heads(
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        )?;
        if self.sliding_window == 0 {
            return err("sliding window of 0".into());
        }
        // transformers adds the per-layer input to streams `1..`, i.e. assumes stream 0 active.
        if self.altup_num_inputs > super::MAX_ALTUP_STREAMS {
            return err(format!(
                "{} AltUp streams (at most {} supported)",
                self.altup_num_inputs,
                super::MAX_ALTUP_STREAMS
            ));
        }
        if self.altup_num_inputs < 2 || self.altup_active_idx != 0 {
            return err(format!(
                "AltUp with active stream {} of {} streams (supported: stream 0 of at least 2)",
                self.altup_active_idx, self.altup_num_inputs
            ));
        }
        if self.num_kv_shared_layers >= n && self.num_kv_shared_layers > 0 {
            return err(format!(
                "{} KV-shared layers leave no layer of {n} to produce keys",
                self.num_kv_shared_layers
            ));
        }
        for i in self.first_kv_shared_layer()..n {
            if self.kv_source(i).is_none() {
                return err(format!(
                    "KV-shared layer {i} ({:?}) has no earlier layer of its type to read from",
                    self.layer_types[i]
                ));
            }
        }
        Ok(())
    }

    /// A MatFormer sub-model: the same checkpoint with each layer's MLP cut to `widths[l]` units
    /// (the first rows of gate/up, the first columns of down), as Gemma 3n's nested models are.
    pub fn with_ffn_widths(mut self, widths: Vec<usize>) -> Result<Gemma3nConfig, ModelError> {
        self.intermediate_size = widths;
        self.slice_ffn = true;
        self.validate()?;
        Ok(self)
    }

    /// MatFormer layer skipping: the model made of the layers `kept` (original indices,
    /// ascending), renumbered `0..kept.len()`. Each kept layer brings its own MLP width,
    /// attention type and activation sparsity; the KV-shared count becomes the number of kept
    /// consumer layers. A kept consumer must still find the very layer it read in the full
    /// model, so skipping that source layer is refused (Google's MatFormer Lab reserves the
    /// source layers too; see docs/matformer.md).
    pub fn keep_layers(&self, kept: &[usize]) -> Result<Gemma3nConfig, ModelError> {
        let n = self.num_hidden_layers;
        let err = |m: String| Err(ModelError::Config(m));
        if kept.is_empty() {
            return err(format!("a sub-model must keep at least one of {n} layers"));
        }
        if kept.windows(2).any(|w| w[0] >= w[1]) || kept.iter().any(|&i| i >= n) {
            return err(format!(
                "kept layers {kept:?} are not ascending indices below {n}"
            ));
        }
        let first_shared = self.first_kv_shared_layer();
        for &i in kept.iter().filter(|&&i| i >= first_shared) {
            let source = self.kv_source(i).expect("validated");
            if kept.binary_search(&source).is_err() {
                return err(format!(
                    "MatFormer config skips layer {source}, whose keys and values the kept \
                     KV-shared layer {i} reads (keep layer {source}, or skip layer {i} too)"
                ));
            }
        }
        let mut sub = self.clone();
        sub.num_hidden_layers = kept.len();
        sub.intermediate_size = kept.iter().map(|&i| self.intermediate_size[i]).collect();
        sub.layer_types = kept.iter().map(|&i| self.layer_types[i]).collect();
        sub.activation_sparsity = kept.iter().map(|&i| self.activation_sparsity[i]).collect();
        sub.num_kv_shared_layers = kept.iter().filter(|&&i| i >= first_shared).count();
        sub.validate()?;
        // Sources are the last producer of their type; dropping only other layers keeps them so.
        debug_assert!(
            (0..kept.len()).all(|j| sub.kv_source(j).map(|s| kept[s]) == self.kv_source(kept[j]))
        );
        Ok(sub)
    }

    /// Layers from this index on compute no keys or values of their own.
    pub fn first_kv_shared_layer(&self) -> usize {
        self.num_hidden_layers - self.num_kv_shared_layers
    }

    /// The layer whose keys and values layer `i` attends over: itself, or for a consumer the last
    /// non-consumer layer of the same type.
    pub fn kv_source(&self, i: usize) -> Option<usize> {
        let first = self.first_kv_shared_layer();
        if i < first {
            return Some(i);
        }
        (0..first)
            .rev()
            .find(|&j| self.layer_types[j] == self.layer_types[i])
    }

    pub fn rope(&self, layer: usize) -> RopeParams {
        match self.layer_types[layer] {
            LayerType::Sliding => self.rope_local,
            LayerType::Full => self.rope_global,
        }
    }
}

/// `Φ⁻¹(p)` for every layer with `p > 0`, as transformers computes the cutoff (cast to f32).
fn sparsity_to_multipliers(pattern: &[f32]) -> Result<Vec<Option<f32>>, ModelError> {
    pattern
        .iter()
        .map(|&p| match p {
            0.0 => Ok(None),
            p if p > 0.0 && p < 1.0 => Ok(Some(normal_quantile(p as f64) as f32)),
            p => Err(ModelError::Config(format!(
                "activation sparsity {p} is outside [0, 1)"
            ))),
        })
        .collect()
}
