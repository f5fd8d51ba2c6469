//! SigLIP vision tower (transformers' `SiglipVisionModel` without the pooling head), read top
//! to bottom in `forward`.
//!
//! Quirks, each applied where it happens: the patch embedding is a convolution with kernel =
//! stride = patch and a bias, computed as one matmul over the flattened patches; a learned
//! position embedding per patch (no class token); pre-LN encoder layers whose norms are the
//! standard LayerNorm with weight *and* bias (not Gemma's `1 + w` RMSNorm); biases on every
//! projection; attention scaled by `head_dim^-0.5` and fully bidirectional; a non-gated GELU-tanh
//! MLP; a final `post_layernorm`.

use gemma_formats::GgufFile;
use gemma_kernels::matmul;
use gemma_kernels::ops;
use gemma_kernels::ops::attention::{attention_spans, AttentionMask, AttentionParams, KvSegment};
use gemma_kernels::pool::ThreadPool;
use serde_json::Value;

use crate::kv_cache::sized;
use crate::weights::{linear, linear_shared_input, Linear, Loader, WeightLayout};
use crate::ModelError;

/// Hyper-parameters of the tower (transformers' `SiglipVisionConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct SiglipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Side of the square input image, in pixels.
    pub image_size: usize,
    /// Side of a square patch: the convolution's kernel and stride.
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f32,
}

/// Bounds far above any published tower, so that a corrupt config is an error rather than an
/// attempt to allocate terabytes.
const MAX_HIDDEN: usize = 1 << 16;
const MAX_INTERMEDIATE: usize = 1 << 18;
const MAX_LAYERS: usize = 1024;
const MAX_IMAGE_SIZE: usize = 1 << 14;
const MAX_CHANNELS: usize = 16;
const MAX_PATCHES: usize = 1 << 20;

impl SiglipVisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Patches along each side of the image.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Patches (tokens) per image, row-major.
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }

    /// Values of one flattened patch: `channels × patch × patch`.
    pub fn patch_len(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }

    /// Values of one preprocessed image (`[channels, image_size, image_size]`).
    pub fn pixel_len(&self) -> usize {
        self.num_channels * self.image_size * self.image_size
    }

    /// Reads a transformers `vision_config`: the sizes are required; `layer_norm_eps` and
    /// `num_channels` default to `SiglipVisionConfig`'s 1e-6 and 3 (the published Gemma 3
    /// configs leave them out), and `hidden_act` must be the tanh GELU when given.
    pub fn from_hf_config(c: &Value) -> Result<SiglipVisionConfig, ModelError> {
        let err = |m: String| ModelError::Config(m);
        let int = |k: &str| -> Result<Option<usize>, ModelError> {
            match c.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|v| Some(v as usize))
                    .ok_or_else(|| err(format!("vision_config '{k}' is {v}, expected an integer"))),
            }
        };
        let req = |k: &str| {
            int(k)?.ok_or_else(|| err(format!("config.json vision_config lacks integer '{k}'")))
        };
        match c.get("hidden_act").and_then(Value::as_str) {
            None | Some("gelu_pytorch_tanh") => {}
            Some(other) => {
                return Err(err(format!(
                    "unsupported vision hidden_act '{other}' (SigLIP uses gelu_pytorch_tanh)"
                )))
            }
        }
        let layer_norm_eps = match c.get("layer_norm_eps") {
            None | Some(Value::Null) => 1e-6,
            Some(v) => v.as_f64().ok_or_else(|| {
                err(format!(
                    "vision_config 'layer_norm_eps' is {v}, expected a number"
                ))
            })? as f32,
        };
        let cfg = SiglipVisionConfig {
            hidden_size: req("hidden_size")?,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads: req("num_attention_heads")?,
            image_size: req("image_size")?,
            patch_size: req("patch_size")?,
            num_channels: int("num_channels")?.unwrap_or(3),
            layer_norm_eps,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads llama.cpp's `clip.vision.*` metadata (an mmproj GGUF). Images are RGB there.
    pub fn from_gguf(f: &GgufFile) -> Result<SiglipVisionConfig, ModelError> {
        let req = |k: &str| -> Result<usize, ModelError> {
            let key = format!("clip.vision.{k}");
            let v = f
                .get_u64(&key)?
                .ok_or_else(|| ModelError::Config(format!("GGUF metadata lacks '{key}'")))?;
            usize::try_from(v)
                .map_err(|_| ModelError::Config(format!("'{key}' = {v} is too large")))
        };
        let cfg = SiglipVisionConfig {
            hidden_size: req("embedding_length")?,
            intermediate_size: req("feed_forward_length")?,
            num_hidden_layers: req("block_count")?,
            num_attention_heads: req("attention.head_count")?,
            image_size: req("image_size")?,
            patch_size: req("patch_size")?,
            num_channels: 3,
            layer_norm_eps: f
                .get_f32("clip.vision.attention.layer_norm_epsilon")?
                .unwrap_or(1e-6),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects what the forward pass cannot run: zero or absurd sizes, heads that do not split
    /// the hidden size, an image that is not a whole number of patches, a bad epsilon.
    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |m: String| Err(ModelError::Config(m));
        let in_range = |v: usize, max: usize| (1..=max).contains(&v);
        if !in_range(self.hidden_size, MAX_HIDDEN)
            || !in_range(self.intermediate_size, MAX_INTERMEDIATE)
            || !in_range(self.num_hidden_layers, MAX_LAYERS)
            || !in_range(self.num_channels, MAX_CHANNELS)
            || !in_range(self.image_size, MAX_IMAGE_SIZE)
            || !in_range(self.patch_size, self.image_size)
        {
            return err(format!(
                "vision sizes out of range (hidden {}, ffn {}, layers {}, channels {}, image {}, \
                 patch {})",
                self.hidden_size,
                self.intermediate_size,
                self.num_hidden_layers,
                self.num_channels,
                self.image_size,
                self.patch_size
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return err(format!(
                "vision hidden size {} does not split into {} attention heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return err(format!(
                "vision image size {} is not a multiple of the patch size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.num_patches() > MAX_PATCHES {
            return err(format!(
                "{} patches per image ({} px, patch {}) is implausible",
                self.num_patches(),
                self.image_size,
                self.patch_size
            ));
        }
        if !self.layer_norm_eps.is_finite() || self.layer_norm_eps <= 0.0 {
            return err(format!(
                "vision layer_norm_eps {} must be positive",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }
}

/// `nn.LayerNorm`: weight and bias.
struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// `nn.Linear` with a bias: `y = x · Wᵀ + b`.
struct Dense {
    weight: Linear,
    bias: Vec<f32>,
}

struct SelfAttention {
    q_proj: Dense,
    k_proj: Dense,
    v_proj: Dense,
    out_proj: Dense,
}

struct Mlp {
    fc1: Dense,
    fc2: Dense,
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

struct Embeddings {
    /// The convolution weight `[hidden, channels, patch, patch]` viewed as the matrix
    /// `[hidden, channels·patch·patch]`, plus its bias.
    patch_embedding: Dense,
    /// `[num_patches, hidden]`, one row per patch; read a row at a time (f32 in llama.cpp's
    /// files, the checkpoint's type otherwise).
    position_embedding: Linear,
}

/// The SigLIP encoder: pixels in, one `hidden_size` row per patch out (`last_hidden_state`).
pub struct SiglipVisionTower {
    config: SiglipVisionConfig,
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
}

/// Tensor names of one checkpoint layout.
struct Names {
    layout: WeightLayout,
}

impl Names {
    /// `hf` is the transformers path inside the tower (`embeddings.…`, `post_layernorm`),
    /// `param` `weight` or `bias`.
    fn top(&self, hf: &str, param: &str) -> String {
        match self.layout {
            WeightLayout::HuggingFace { prefix } => format!("{prefix}{hf}.{param}"),
            WeightLayout::Gguf => {
                let gguf = match hf {
                    "embeddings.patch_embedding" => "v.patch_embd",
                    "embeddings.position_embedding" => "v.position_embd",
                    "post_layernorm" => "v.post_ln",
                    other => unreachable!("no GGUF name for {other}"),
                };
                format!("{gguf}.{param}")
            }
        }
    }

    /// `hf` is the transformers path inside `encoder.layers.N.`.
    fn layer(&self, i: usize, hf: &str, param: &str) -> String {
        match self.layout {
            WeightLayout::HuggingFace { prefix } => {
                format!("{prefix}encoder.layers.{i}.{hf}.{param}")
            }
            WeightLayout::Gguf => {
                // llama.cpp's converter maps fc1 (hidden -> intermediate) to ffn_up and fc2
                // back to ffn_down.
                let gguf = match hf {
                    "layer_norm1" => "ln1",
                    "layer_norm2" => "ln2",
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.out_proj" => "attn_out",
                    "mlp.fc1" => "ffn_up",
                    "mlp.fc2" => "ffn_down",
                    other => unreachable!("no GGUF name for {other}"),
                };
                format!("v.blk.{i}.{gguf}.{param}")
            }
        }
    }
}

/// The tower's activations, reused by every layer of one image and freed after it: at the real
/// shape four 4096 × 1152 buffers and one 4096 × 4304 (about 145 MB), plus the output.
#[derive(Default)]
struct Scratch {
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mlp: Vec<f32>,
    row: Vec<f32>,
    quantized: Vec<u8>,
}

impl SiglipVisionTower {
    /// Loads the tower's tensors (views of the file; only norms and biases are converted).
    /// With transformers names, the layout's prefix is the path in front of `embeddings.` and
    /// `encoder.` (e.g. `vision_tower.vision_model.`, see [`crate::vision`]).
    pub fn load(
        config: SiglipVisionConfig,
        loader: &Loader<'_>,
    ) -> Result<SiglipVisionTower, ModelError> {
        config.validate()?;
        let c = &config;
        let n = Names {
            layout: loader.layout,
        };
        let h = c.hidden_size;
        let norm = |weight: String, bias: String| -> Result<LayerNorm, ModelError> {
            Ok(LayerNorm {
                weight: loader.vector(&weight, h)?,
                bias: loader.vector(&bias, h)?,
            })
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| -> Result<EncoderLayer, ModelError> {
                let dense = |name: &str, rows, cols| -> Result<Dense, ModelError> {
                    Ok(Dense {
                        weight: loader.linear(&n.layer(i, name, "weight"), rows, cols)?,
                        bias: loader.vector(&n.layer(i, name, "bias"), rows)?,
                    })
                };
                let ln = |name: &str| norm(n.layer(i, name, "weight"), n.layer(i, name, "bias"));
                Ok(EncoderLayer {
                    layer_norm1: ln("layer_norm1")?,
                    self_attn: SelfAttention {
                        q_proj: dense("self_attn.q_proj", h, h)?,
                        k_proj: dense("self_attn.k_proj", h, h)?,
                        v_proj: dense("self_attn.v_proj", h, h)?,
                        out_proj: dense("self_attn.out_proj", h, h)?,
                    },
                    layer_norm2: ln("layer_norm2")?,
                    mlp: Mlp {
                        fc1: dense("mlp.fc1", c.intermediate_size, h)?,
                        fc2: dense("mlp.fc2", h, c.intermediate_size)?,
                    },
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let patch = "embeddings.patch_embedding";
        let embeddings = Embeddings {
            patch_embedding: Dense {
                weight: loader.linear_view(
                    &n.top(patch, "weight"),
                    &[h, c.num_channels, c.patch_size, c.patch_size],
                )?,
                bias: loader.vector(&n.top(patch, "bias"), h)?,
            },
            position_embedding: loader.linear(
                &n.top("embeddings.position_embedding", "weight"),
                c.num_patches(),
                h,
            )?,
        };
        Ok(SiglipVisionTower {
            post_layernorm: norm(
                n.top("post_layernorm", "weight"),
                n.top("post_layernorm", "bias"),
            )?,
            config,
            embeddings,
            layers,
        })
    }

    pub fn config(&self) -> &SiglipVisionConfig {
        &self.config
    }

    /// Bytes of the matrices (the position embedding included), as stored.
    pub fn weight_bytes(&self) -> usize {
        let layer_bytes = |l: &EncoderLayer| {
            let (a, m) = (&l.self_attn, &l.mlp);
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj, &m.fc1, &m.fc2]
                .iter()
                .map(|d| d.weight.bytes())
                .sum::<usize>()
        };
        self.embeddings.patch_embedding.weight.bytes()
            + self.embeddings.position_embedding.bytes()
            + self.layers.iter().map(layer_bytes).sum::<usize>()
    }

    /// Encodes one image, `pixel_values` = `[channels, image_size, image_size]` (normalised),
    /// into `out` = `[num_patches, hidden_size]`, patches row-major (transformers'
    /// `last_hidden_state`, `post_layernorm` applied), on the global thread pool.
    pub fn forward(&self, pixel_values: &[f32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        let c = &self.config;
        if pixel_values.len() != c.pixel_len() {
            return Err(ModelError::Config(format!(
                "an image needs {} values ({} channels of {}x{}), got {}",
                c.pixel_len(),
                c.num_channels,
                c.image_size,
                c.image_size,
                pixel_values.len()
            )));
        }
        if let Some(i) = pixel_values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Config(format!(
                "pixel value {i} is {}, not a finite number",
                pixel_values[i]
            )));
        }
        let pool = ThreadPool::global();
        let mut s = Scratch::default();
        let (n, h, ffn) = (c.num_patches(), c.hidden_size, c.intermediate_size);
        out.clear();
        out.resize(n * h, 0.0);
        let x = &mut out[..];

        // Patch embedding: each patch flattened in the weight's (channel, row, column) order
        // (im2col), then one matmul for all patches, plus the conv's bias.
        let (p, side, pps) = (c.patch_size, c.image_size, c.patches_per_side());
        let patches = sized(&mut s.mlp, n * c.patch_len());
        for (idx, row) in patches.chunks_exact_mut(c.patch_len()).enumerate() {
            let (py, px) = (idx / pps, idx % pps);
            for (ch, ky) in (0..c.num_channels).flat_map(|ch| (0..p).map(move |ky| (ch, ky))) {
                let src = (ch * side + py * p + ky) * side + px * p;
                row[(ch * p + ky) * p..][..p].copy_from_slice(&pixel_values[src..src + p]);
            }
        }
        let e = &self.embeddings;
        linear(
            pool,
            &e.patch_embedding.weight,
            patches,
            n,
            x,
            &mut s.quantized,
        );
        ops::add_bias_inplace(x, &e.patch_embedding.bias);
        // Learned position embedding: row t for patch t (native size, no interpolation).
        let positions = e.position_embedding.matrix();
        let pos_row = sized(&mut s.row, h);
        for (t, row) in x.chunks_exact_mut(h).enumerate() {
            matmul::dequantize_row(&positions, t, pos_row);
            ops::add_inplace(row, pos_row);
        }

        // Every patch sees every other: one bidirectional span over all positions.
        let hd = c.head_dim();
        let attn_params = AttentionParams {
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_attention_heads,
            head_dim: hd,
            scale: (hd as f32).powf(-0.5),
            softcap: None,
            mask: AttentionMask::Causal,
            // f32 keys and values, every patch sees every other: the tiled kernel (about twice
            // as fast here; text decoders stay on the per-query one, see the field's docs).
            tiled: true,
        };
        #[allow(clippy::single_range_in_vec_init)] // one span: every position
        let everything = [0..n];
        let eps = c.layer_norm_eps;
        for layer in &self.layers {
            let a = &layer.self_attn;
            // Attention block: x += out_proj(attn(q, k, v of LN1(x))).
            let normed = sized(&mut s.normed, n * h);
            normed.copy_from_slice(x);
            let ln = &layer.layer_norm1;
            ops::layer_norm_inplace(normed, &ln.weight, &ln.bias, eps);
            let q = sized(&mut s.q, n * h);
            let k = sized(&mut s.k, n * h);
            let v = sized(&mut s.v, n * h);
            linear_shared_input(
                pool,
                [&a.q_proj.weight, &a.k_proj.weight, &a.v_proj.weight],
                normed,
                n,
                [&mut *q, &mut *k, &mut *v],
                &mut s.quantized,
            );
            ops::add_bias_inplace(q, &a.q_proj.bias);
            ops::add_bias_inplace(k, &a.k_proj.bias);
            ops::add_bias_inplace(v, &a.v_proj.bias);
            let kv = [KvSegment {
                keys: (&*k).into(),
                values: (&*v).into(),
                first_pos: 0,
                len: n,
            }];
            // The normed input is spent: the attention output goes there.
            let attn_out = &mut *normed;
            attention_spans(pool, &attn_params, q, 0, &kv, &everything, attn_out);
            // And q is spent: the projection goes there.
            let proj = &mut *q;
            linear(
                pool,
                &a.out_proj.weight,
                attn_out,
                n,
                proj,
                &mut s.quantized,
            );
            ops::add_bias_inplace(proj, &a.out_proj.bias);
            ops::add_inplace(x, proj);

            // MLP block: x += fc2(gelu_tanh(fc1(LN2(x)))).
            let m = &layer.mlp;
            normed.copy_from_slice(x);
            let ln = &layer.layer_norm2;
            ops::layer_norm_inplace(normed, &ln.weight, &ln.bias, eps);
            let hidden = sized(&mut s.mlp, n * ffn);
            linear(pool, &m.fc1.weight, normed, n, hidden, &mut s.quantized);
            ops::add_bias_gelu_tanh_parallel(pool, hidden, &m.fc1.bias);
            linear(pool, &m.fc2.weight, hidden, n, proj, &mut s.quantized);
            ops::add_bias_inplace(proj, &m.fc2.bias);
            ops::add_inplace(x, proj);
        }
        let ln = &self.post_layernorm;
        ops::layer_norm_inplace(x, &ln.weight, &ln.bias, eps);
        Ok(())
    }
}
