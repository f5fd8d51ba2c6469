//! Gemma 3n text decoder (E2B, E4B and MatFormer slices of them), read top to bottom in `forward`.
//!
//! Quirks, each applied where it happens: RMSNorm multiplies by `w` (not `1 + w`) and some norms
//! have no weight; AltUp keeps 4 streams per token (predict before a layer, correct after it, a
//! tanh router choosing the coefficients); LAuReL adds a low-rank residual; every layer gets a
//! per-layer embedding (PLE) gated into the inactive streams; attention is unscaled with q/k/v
//! norms; the last `num_kv_shared_layers` layers reuse earlier layers' keys and values; some MLPs
//! keep only the top of a Gaussian fit of their gate (activation sparsity); MLP widths differ per
//! layer; final logits are soft-capped.

mod config;
pub mod embedder;
mod extract;
mod matformer;
mod normal;

pub use config::Gemma3nConfig;
pub use extract::{extract_gguf, ExtractOptions};
pub use matformer::{MatformerConfig, SubModel};
pub use normal::normal_quantile;

use gemma_kernels::matmul;
use gemma_kernels::ops::attention::{attention, AttentionMask, AttentionParams, KvSegment};
use gemma_kernels::ops::kv::CacheType;
use gemma_kernels::ops::{self, Rope};
use gemma_kernels::pool::ThreadPool;
use gemma_kernels::sparse::SparseInputMatrix;

use crate::decoder::{
    embed_tokens, embedding_scale, rotations, CachePlan, LayerType, Names, OutputHead,
};
use crate::kv_cache::{check_soft_tokens, is_soft, sized, KvCache, SoftTokens};
use crate::weights::{linear, linear_shared_input, Linear, Loader, WeightLayout};
use crate::{Logits, ModelError};

/// The AltUp rescaling clamps the mean square of a projected stream at this (transformers' value).
const ALTUP_MIN_MEAN_SQUARE: f32 = 1e-5;
/// Most AltUp streams a model may have (published: 4); checked at load.
pub(crate) const MAX_ALTUP_STREAMS: usize = 16;
/// Per-token work between the matmuls runs across the pool in runs of at least this many
/// tokens (a decoded token stays on the caller).
const TOKENS_PER_TASK: usize = 8;

struct Attention {
    q_proj: Linear,
    /// `None` on KV-consumer layers: they read another layer's keys and values.
    kv: Option<KvProjection>,
    o_proj: Linear,
    q_norm: Vec<f32>,
}

struct KvProjection {
    k_proj: Linear,
    v_proj: Linear,
    k_norm: Vec<f32>,
}

struct Mlp {
    /// The widest gate/up this model can run (the checkpoint's, or the load-time slice's):
    /// `set_matformer` takes row views of these, so switching copies no weights.
    gate_stored: Linear,
    up_stored: Linear,
    /// The active width's rows of `gate_stored` / `up_stored`.
    gate_proj: Linear,
    up_proj: Linear,
    /// May be wider than the active width: the unused columns then meet zeros (or are left
    /// out), which adds exactly nothing.
    down: Down,
    /// `Φ⁻¹(p)` for activation sparsity `p > 0`: gate values below `mean + std · Φ⁻¹(p)` are
    /// cut, the rest shifted down by that cutoff.
    sparsity_std_multiplier: Option<f32>,
}

/// An MLP's down projection.
enum Down {
    /// As stored.
    Dense(Linear),
    /// Transposed for an activation that is mostly zero (a sparse MLP keeps about 5 % of its
    /// activations): one stored row per kept activation is read, a tenth of the bytes.
    SparseInput(SparseInputMatrix),
}

impl Down {
    fn bytes(&self) -> usize {
        match self {
            Down::Dense(w) => w.bytes(),
            Down::SparseInput(w) => w.bytes(),
        }
    }
}

/// Whether sparse MLPs read only their kept rows and columns (the default);
/// `GEMMA_SPARSE_MLP=0` runs them dense, for comparisons.
fn sparse_mlps_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| !std::env::var("GEMMA_SPARSE_MLP").is_ok_and(|v| v == "0"))
}

/// Tokens up to which a sparse MLP computes only the up rows some token keeps: each token
/// keeps about 5 %, so eight keep about a third between them; longer batches keep most rows.
const SPARSE_UP_MAX_TOKENS: usize = 8;

/// The layers of a Gemma 3n GGUF whose MLPs have activation sparsity and will run sparse
/// (none for other architectures, or when sparse MLPs are off): their up and down projections
/// must stay row-major for it.
pub(crate) fn sparse_mlp_layers(gguf: &gemma_formats::GgufFile) -> Vec<usize> {
    if !sparse_mlps_enabled() || !gguf.architecture().is_ok_and(|a| a == "gemma3n") {
        return Vec::new();
    }
    match gguf.get_f32_array("gemma3n.activation_sparsity_scale") {
        Ok(Some(scales)) => scales
            .iter()
            .enumerate()
            .filter(|(_, &z)| z != f32::NEG_INFINITY)
            .map(|(i, _)| i)
            .collect(),
        _ => Vec::new(),
    }
}

/// AltUp's per-layer parameters; the small matrices are kept as f32.
struct AltUp {
    /// `[streams, hidden]`.
    modality_router: Vec<f32>,
    router_norm: Vec<f32>,
    /// `[streams², streams]`.
    prediction_coefs: Vec<f32>,
    /// `[streams, streams]`.
    correction_coefs: Vec<f32>,
    correct_output_scale: Vec<f32>,
}

struct Laurel {
    linear_left: Linear,
    linear_right: Linear,
    post_laurel_norm: Vec<f32>,
}

struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    altup: AltUp,
    laurel: Laurel,
    input_layernorm: Vec<f32>,
    post_attention_layernorm: Vec<f32>,
    pre_feedforward_layernorm: Vec<f32>,
    post_feedforward_layernorm: Vec<f32>,
    per_layer_input_gate: Linear,
    per_layer_projection: Linear,
    post_per_layer_input_norm: Vec<f32>,
}

pub struct Gemma3n {
    /// The active (sub-)model: after `set_matformer` it describes only the kept layers,
    /// renumbered, as a standalone model would.
    config: Gemma3nConfig,
    /// The model as loaded, every stored layer included.
    loaded_config: Gemma3nConfig,
    /// Stored index of every active layer, in order (MatFormer layer skipping drops some).
    active_layers: Vec<usize>,
    embed_tokens: Linear,
    embed_scale: f32,
    /// `[vocab_size_per_layer_input, layers · P]`, looked up one row per token, never expanded.
    embed_tokens_per_layer: Linear,
    per_layer_embed_scale: f32,
    per_layer_model_projection: Linear,
    per_layer_projection_norm: Vec<f32>,
    altup_projections: Vec<Linear>,
    altup_unembed_projections: Vec<Linear>,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    lm_head: Option<Linear>,
    rope_local: Rope,
    rope_global: Rope,
    /// How caches made by `new_cache` store keys and values (f32 unless set).
    cache_type: CacheType,
    /// MLPs with activation sparsity read only their kept rows (see `load_with_sparse_mlps`).
    sparse_mlps: bool,
}

/// The `count` AltUp stream projections: one tensor each in transformers checkpoints,
/// stacked into one `[count, H, H]` tensor by llama.cpp.
fn stream_projections(
    loader: &Loader<'_>,
    names: &Names,
    hf: &str,
    count: usize,
    h: usize,
) -> Result<Vec<Linear>, ModelError> {
    match names.layout {
        WeightLayout::HuggingFace { prefix } => (0..count)
            .map(|i| loader.linear(&format!("{prefix}{hf}.{i}.weight"), h, h))
            .collect(),
        WeightLayout::Gguf => loader.stacked_linears(&names.top(hf), count, h, h),
    }
}

/// A small matrix dequantized to f32, row-major.
fn dense(w: &Linear) -> Vec<f32> {
    let m = w.matrix();
    let mut out = vec![0.0; w.rows * w.cols];
    for (r, row) in out.chunks_exact_mut(w.cols).enumerate() {
        matmul::dequantize_row(&m, r, row);
    }
    out
}

/// Stores the down projection of every MLP with activation sparsity transposed for its sparse
/// activations ([`Down::SparseInput`]), several layers at once.
fn transpose_sparse_downs(layers: &mut [DecoderLayer]) {
    let mut todo: Vec<&mut Mlp> = layers
        .iter_mut()
        .map(|l| &mut l.mlp)
        .filter(|m| m.sparsity_std_multiplier.is_some())
        .collect();
    if todo.is_empty() {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = todo.len().div_ceil(threads);
    std::thread::scope(|s| {
        for mlps in todo.chunks_mut(per_thread) {
            s.spawn(move || {
                for m in mlps.iter_mut() {
                    if let Down::Dense(w) = &m.down {
                        let t = SparseInputMatrix::from_weights(&w.matrix());
                        // Never read again: a memory-mapped file's pages can go.
                        w.release();
                        m.down = Down::SparseInput(t);
                    }
                }
            });
        }
    });
}

impl Gemma3n {
    /// Loads the model; MLPs with activation sparsity run sparse unless `GEMMA_SPARSE_MLP=0`.
    pub fn load(config: Gemma3nConfig, loader: &Loader<'_>) -> Result<Gemma3n, ModelError> {
        Gemma3n::load_with_sparse_mlps(config, loader, sparse_mlps_enabled())
    }

    /// [`Gemma3n::load`], choosing how MLPs with activation sparsity run: `true` computes only
    /// the up rows their gate keeps (the same bits) and adds only the kept activations' rows
    /// of a transposed down projection (8-bit for quantized weights, f32 activations: close
    /// to, not equal to, the dense product); `false` runs them as dense MLPs.
    pub fn load_with_sparse_mlps(
        config: Gemma3nConfig,
        loader: &Loader<'_>,
        sparse_mlps: bool,
    ) -> Result<Gemma3n, ModelError> {
        config.validate()?;
        // Gemma 3n norms hold `w` itself in both layouts (llama.cpp adds no 1 for this model).
        let n = Names {
            layout: loader.layout,
        };
        let c = &config;
        let (h, hd, p) = (c.hidden_size, c.head_dim, c.hidden_size_per_layer_input);
        let n_layers = c.num_hidden_layers;
        let k_streams = c.altup_num_inputs;
        let q_dim = c.num_attention_heads * hd;
        let kv_dim = c.num_key_value_heads * hd;
        let first_shared = c.first_kv_shared_layer();

        let mut layers = (0..n_layers)
            .map(|i| -> Result<DecoderLayer, ModelError> {
                let lin = |name: &str, rows, cols| loader.linear(&n.layer(i, name), rows, cols);
                let norm = |name: &str, len| loader.vector(&n.layer(i, name), len);
                let ffn = c.intermediate_size[i];
                let [gate_proj, up_proj, down_proj] = if c.slice_ffn {
                    // MatFormer: cut the stored (wider) MLP down to this layer's width.
                    let gate = n.layer(i, "mlp.gate_proj");
                    let stored = loader
                        .source
                        .tensor(&gate)
                        .ok_or_else(|| ModelError::MissingTensor(gate.clone()))?
                        .shape
                        .first()
                        .copied()
                        .unwrap_or(0);
                    let name = |m: &str| n.layer(i, &format!("mlp.{m}"));
                    [
                        loader.linear(&gate, stored, h)?.first_rows(&gate, ffn)?,
                        loader
                            .linear(&name("up_proj"), stored, h)?
                            .first_rows(&name("up_proj"), ffn)?,
                        loader
                            .linear(&name("down_proj"), h, stored)?
                            .first_cols(&name("down_proj"), ffn)?,
                    ]
                } else {
                    [
                        lin("mlp.gate_proj", ffn, h)?,
                        lin("mlp.up_proj", ffn, h)?,
                        lin("mlp.down_proj", h, ffn)?,
                    ]
                };
                // Consumers' k/v weights may be present (published checkpoints keep them); they
                // are never read.
                let kv = if i < first_shared {
                    Some(KvProjection {
                        k_proj: lin("self_attn.k_proj", kv_dim, h)?,
                        v_proj: lin("self_attn.v_proj", kv_dim, h)?,
                        k_norm: norm("self_attn.k_norm", hd)?,
                    })
                } else {
                    None
                };
                Ok(DecoderLayer {
                    self_attn: Attention {
                        q_proj: lin("self_attn.q_proj", q_dim, h)?,
                        kv,
                        o_proj: lin("self_attn.o_proj", h, q_dim)?,
                        q_norm: norm("self_attn.q_norm", hd)?,
                    },
                    mlp: Mlp {
                        gate_stored: gate_proj.clone(),
                        up_stored: up_proj.clone(),
                        gate_proj,
                        up_proj,
                        down: Down::Dense(down_proj),
                        sparsity_std_multiplier: c.activation_sparsity[i],
                    },
                    altup: AltUp {
                        modality_router: dense(&lin("altup.modality_router", k_streams, h)?),
                        router_norm: norm("altup.router_norm", h)?,
                        prediction_coefs: dense(&lin(
                            "altup.prediction_coefs",
                            k_streams * k_streams,
                            k_streams,
                        )?),
                        correction_coefs: dense(&lin(
                            "altup.correction_coefs",
                            k_streams,
                            k_streams,
                        )?),
                        correct_output_scale: loader
                            .vector(&n.layer(i, "altup.correct_output_scale"), h)?,
                    },
                    laurel: Laurel {
                        linear_left: lin("laurel.linear_left", c.laurel_rank, h)?,
                        linear_right: lin("laurel.linear_right", h, c.laurel_rank)?,
                        post_laurel_norm: norm("laurel.post_laurel_norm", h)?,
                    },
                    input_layernorm: norm("input_layernorm", h)?,
                    post_attention_layernorm: norm("post_attention_layernorm", h)?,
                    pre_feedforward_layernorm: norm("pre_feedforward_layernorm", h)?,
                    post_feedforward_layernorm: norm("post_feedforward_layernorm", h)?,
                    per_layer_input_gate: lin("per_layer_input_gate", p, h)?,
                    per_layer_projection: lin("per_layer_projection", h, p)?,
                    post_per_layer_input_norm: norm("post_per_layer_input_norm", h)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if sparse_mlps {
            transpose_sparse_downs(&mut layers);
        }

        let embed_tokens = loader.linear(&n.top("embed_tokens"), c.vocab_size, h)?;
        let embed_tokens_per_layer = loader.linear(
            &n.top("embed_tokens_per_layer"),
            c.vocab_size_per_layer_input,
            n_layers * p,
        )?;
        let streams = |name: &str| stream_projections(loader, &n, name, k_streams - 1, h);
        let lm_head = n.optional_lm_head(loader, c.vocab_size, h)?;
        Ok(Gemma3n {
            embed_scale: embedding_scale(h, &embed_tokens, loader.layout),
            per_layer_embed_scale: embedding_scale(p, &embed_tokens_per_layer, loader.layout),
            per_layer_model_projection: loader.linear(
                &n.top("per_layer_model_projection"),
                n_layers * p,
                h,
            )?,
            per_layer_projection_norm: loader.vector(&n.top("per_layer_projection_norm"), p)?,
            altup_projections: streams("altup_projections")?,
            altup_unembed_projections: streams("altup_unembed_projections")?,
            norm: loader.vector(&n.top("norm"), h)?,
            rope_local: Rope::new(hd, c.rope_local.theta, c.rope_local.linear_factor),
            rope_global: Rope::new(hd, c.rope_global.theta, c.rope_global.linear_factor),
            embed_tokens,
            embed_tokens_per_layer,
            active_layers: (0..layers.len()).collect(),
            layers,
            lm_head,
            loaded_config: config.clone(),
            config,
            cache_type: CacheType::F32,
            sparse_mlps,
        })
    }

    pub fn config(&self) -> &Gemma3nConfig {
        &self.config
    }

    /// The widest MLP each layer can run with the weights held.
    pub fn stored_ffn_widths(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.mlp.gate_stored.rows).collect()
    }

    /// Stored index of every layer the active sub-model runs, in order.
    pub fn active_layers(&self) -> &[usize] {
        &self.active_layers
    }

    /// Switches the active MatFormer sub-model between requests: skipped layers are not run,
    /// and every kept layer's MLP becomes a row view of the held weights (no copy), so any
    /// width up to `stored_ffn_widths` can be chosen, and the full model restored, at any
    /// time. Caches stay valid only for the configuration that filled them (a sub-model with
    /// fewer layers has fewer cache layers): start a new sequence after switching.
    pub fn set_matformer(&mut self, m: &MatformerConfig) -> Result<(), ModelError> {
        let sub = m.plan(&self.loaded_config, &self.stored_ffn_widths())?;
        // Build every view before changing anything, so a failure leaves the model as it was.
        let views = sub
            .kept
            .iter()
            .zip(&sub.config.intermediate_size)
            .map(|(&i, &w)| {
                let mlp = &self.layers[i].mlp;
                Ok((
                    mlp.gate_stored.first_rows(&format!("layer {i} gate"), w)?,
                    mlp.up_stored.first_rows(&format!("layer {i} up"), w)?,
                ))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        for (&i, (gate, up)) in sub.kept.iter().zip(views) {
            self.layers[i].mlp.gate_proj = gate;
            self.layers[i].mlp.up_proj = up;
        }
        self.config = sub.config;
        self.active_layers = sub.kept;
        Ok(())
    }

    /// One ring per KV-producing layer (consumers hold none): the window for sliding layers,
    /// the context for global ones.
    fn cache_plan(&self) -> CachePlan<'_> {
        let c = &self.config;
        CachePlan {
            layer_types: &c.layer_types[..c.first_kv_shared_layer()],
            sliding_window: c.sliding_window,
            row: self.kv_row(),
        }
    }

    fn kv_row(&self) -> usize {
        self.config.num_key_value_heads * self.config.head_dim
    }

    /// Storage format of the caches `new_cache` makes from now on (see `Model::set_cache_type`).
    pub fn set_cache_type(&mut self, cache_type: CacheType) -> Result<(), ModelError> {
        cache_type
            .check_head_dim(self.config.head_dim)
            .map_err(ModelError::Config)?;
        self.cache_type = cache_type;
        Ok(())
    }

    pub fn cache_type(&self) -> CacheType {
        self.cache_type
    }

    pub fn new_cache(&self, ctx_size: usize) -> Result<KvCache, ModelError> {
        self.cache_plan().new_cache(ctx_size, self.cache_type)
    }

    pub fn kv_cache_bytes(&self, ctx_size: usize) -> usize {
        self.cache_plan().bytes(ctx_size, self.cache_type)
    }

    /// Bytes of the weights the forward pass reads for every token (the PLE table is read one
    /// row per token and counted separately by `per_layer_embedding_bytes`; a sparse MLP's
    /// up and transposed down projections are counted whole, though a token reads only the
    /// rows it keeps, about a twentieth).
    pub fn weight_bytes(&self) -> usize {
        let layer_bytes = |l: &DecoderLayer| {
            let a = &l.self_attn;
            let m = &l.mlp;
            let kv =
                a.kv.as_ref()
                    .map_or(0, |kv| kv.k_proj.bytes() + kv.v_proj.bytes());
            [
                &a.q_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &l.laurel.linear_left,
                &l.laurel.linear_right,
                &l.per_layer_input_gate,
                &l.per_layer_projection,
            ]
            .iter()
            .map(|w| w.bytes())
            .sum::<usize>()
                + m.down.bytes()
                + kv
        };
        self.embed_tokens.bytes()
            + self.lm_head.as_ref().map_or(0, Linear::bytes)
            + self.per_layer_model_projection.bytes()
            + self
                .altup_projections
                .iter()
                .chain(&self.altup_unembed_projections)
                .map(Linear::bytes)
                .sum::<usize>()
            + self
                .active_layers
                .iter()
                .map(|&i| layer_bytes(&self.layers[i]))
                .sum::<usize>()
    }

    pub fn per_layer_embedding_bytes(&self) -> usize {
        self.embed_tokens_per_layer.bytes()
    }

    fn check_tokens(&self, tokens: &[u32], soft: &[SoftTokens<'_>]) -> Result<(), ModelError> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(ModelError::Config(
                "forward needs at least one token".into(),
            ));
        }
        check_soft_tokens(soft, tokens.len(), c.hidden_size)?;
        if soft.iter().any(|s| s.bidirectional) {
            return Err(ModelError::Config(
                "Gemma 3n attends causally: bidirectional soft tokens are not supported".into(),
            ));
        }
        // Multimodal ids (image/audio "hard" tokens) need their own embedders: text only,
        // unless a tower's soft tokens replace them.
        let limit = c
            .first_multimodal_id
            .unwrap_or(c.vocab_size)
            .min(c.vocab_size);
        let bad = tokens
            .iter()
            .enumerate()
            .find(|&(i, &id)| id as usize >= limit && !is_soft(soft, c.hidden_size, i));
        match bad {
            Some((_, &id)) => Err(ModelError::TokenOutOfRange { id, vocab: limit }),
            None => Ok(()),
        }
    }

    /// Per-layer inputs of every token, `[tokens, stored layers · P]`:
    /// `(rms_norm(projection(E) / sqrt(H)) + table[id] · sqrt(P)) / sqrt(2)`.
    #[allow(clippy::too_many_arguments)]
    fn per_layer_inputs<'a>(
        &self,
        pool: &ThreadPool,
        tokens: &[u32],
        embeds: &[f32],
        out: &'a mut Vec<f32>,
        row: &mut Vec<f32>,
        scratch: &mut Vec<u8>,
    ) -> &'a [f32] {
        let c = &self.config;
        // Every stored layer's columns: a skipped layer's are computed and never read.
        let width = self.layers.len() * c.hidden_size_per_layer_input;
        let ple = sized(out, tokens.len() * width);
        linear(
            pool,
            &self.per_layer_model_projection,
            embeds,
            tokens.len(),
            ple,
            scratch,
        );
        ops::scale_inplace(ple, (c.hidden_size as f32).powf(-0.5));
        ops::rms_norm_inplace(ple, &self.per_layer_projection_norm, c.rms_norm_eps);
        let table = self.embed_tokens_per_layer.matrix();
        let row = sized(row, width);
        let out_scale = 0.5f32.sqrt();
        for (dst, &id) in ple.chunks_exact_mut(width).zip(tokens) {
            let id = id as usize;
            // Ids past the table (multimodal) take row 0, as transformers does.
            let id = if id < c.vocab_size_per_layer_input {
                id
            } else {
                0
            };
            matmul::dequantize_row(&table, id, row);
            // The table (2 GB at E2B) is read a row per token: keep none of it resident.
            self.embed_tokens_per_layer.release_row(id);
            for (d, t) in dst.iter_mut().zip(row.iter()) {
                *d = (*d + t * self.per_layer_embed_scale) * out_scale;
            }
        }
        ple
    }

    /// Runs `tokens` (positions `cache.len()..`) through the decoder, appends the producing
    /// layers' keys and values to `cache`, and returns logits for the last token or every token.
    pub fn forward<'c>(
        &self,
        tokens: &[u32],
        cache: &'c mut KvCache,
        logits: Logits,
    ) -> Result<&'c [f32], ModelError> {
        self.forward_embeds(tokens, &[], cache, logits)
    }

    /// [`Gemma3n::forward`] with some positions' embeddings replaced by a tower's soft tokens
    /// (before the per-layer inputs are derived from the embeddings, as the reference does).
    pub fn forward_embeds<'c>(
        &self,
        tokens: &[u32],
        soft: &[SoftTokens<'_>],
        cache: &'c mut KvCache,
        logits: Logits,
    ) -> Result<&'c [f32], ModelError> {
        self.check_tokens(tokens, soft)?;
        let producers = self.config.first_kv_shared_layer();
        if cache.layers.len() != producers {
            // Made before a MatFormer switch that changed which layers run.
            return Err(ModelError::Config(format!(
                "this KV cache holds {} layers but the active model fills {producers}: start a \
                 new cache after switching MatFormer configurations",
                cache.layers.len()
            )));
        }
        cache.reserve(tokens.len())?;
        let c = &self.config;
        let pool = ThreadPool::global();
        let n_tokens = tokens.len();
        let pos0 = cache.len();
        let (h, hd, p) = (c.hidden_size, c.head_dim, c.hidden_size_per_layer_input);
        let n_streams = c.altup_num_inputs;
        let q_dim = c.num_attention_heads * hd;
        let kv_dim = self.kv_row();
        let first_shared = c.first_kv_shared_layer();
        let plane = n_tokens * h;
        let KvCache {
            layers: kv_layers,
            scratch,
            ..
        } = cache;

        // This model's buffers, taken out of the cache's scratch for the call (put back before
        // the logits; an error return only costs their reuse).
        let mut bufs = std::mem::take(&mut scratch.gemma3n);

        // Embeddings scaled by sqrt(H), and the per-layer inputs derived from them.
        let embeds = sized(&mut bufs.embeds, plane);
        embed_tokens(&self.embed_tokens, self.embed_scale, tokens, soft, embeds);
        let embeds = &*embeds;
        let ple = self.per_layer_inputs(
            pool,
            tokens,
            embeds,
            &mut bufs.ple,
            &mut bufs.ple_row,
            &mut scratch.work.quantized,
        );

        // AltUp streams `[stream, token, hidden]`: the embedding, then projections of it
        // rescaled to its RMS magnitude.
        let streams = sized(&mut bufs.streams, n_streams * plane);
        streams[..plane].copy_from_slice(embeds);
        for (s, proj) in self.altup_projections.iter().enumerate() {
            let dst = &mut streams[(s + 1) * plane..(s + 2) * plane];
            linear(
                pool,
                proj,
                embeds,
                n_tokens,
                dst,
                &mut scratch.work.quantized,
            );
            rescale_to_magnitude(dst, embeds, h);
        }

        // Keys and values of the layers consumers read, for this chunk; written to the cache
        // after the last layer so consumers still see the history the producer saw.
        let shared_kv = &mut bufs.shared_kv;
        shared_kv.resize(first_shared.max(shared_kv.len()), None);
        shared_kv.iter_mut().for_each(|kv| {
            // Keep the buffers of a pair for reuse, marked unset by emptying them.
            if let Some((k, v)) = kv {
                k.clear();
                v.clear();
            }
        });
        let predictions = sized(&mut bufs.predictions, n_streams * plane);
        let active = sized(&mut bufs.active, plane);
        let laurel = sized(&mut bufs.laurel, plane);
        let laurel_low = sized(&mut bufs.laurel_low, n_tokens * c.laurel_rank);
        let gate_ple = sized(&mut bufs.gate_ple, n_tokens * p);
        let coefs = &mut bufs.coefs;

        // Each token's rotations, shared by all layers of a kind.
        let rot_local = sized(&mut scratch.rope_local, n_tokens * hd);
        rotations(&self.rope_local, pos0..pos0 + n_tokens, rot_local);
        let rot_global = sized(&mut scratch.rope_global, n_tokens * hd);
        rotations(&self.rope_global, pos0..pos0 + n_tokens, rot_global);

        // Without logits, the KV-sharing layers at the end have nothing to do: they write no
        // keys or values, and their output only reaches the logits. Filling the cache (earlier
        // prompt chunks, streamed audio) stops at the first of them: a third of E2B's layers.
        let n_run = match logits {
            Logits::None => first_shared.min(self.active_layers.len()),
            Logits::Last | Logits::All => self.active_layers.len(),
        };
        // `i` numbers the active layers (config, KV cache); `stored_layer` picks the weights and
        // the layer's PLE columns, which keep their place in the stored table.
        for (i, &stored_layer) in self.active_layers.iter().enumerate().take(n_run) {
            let layer = &self.layers[stored_layer];
            let kv_src = c.kv_source(i).expect("validated at load");
            let is_source = i < first_shared
                && (first_shared..c.num_hidden_layers).any(|j| c.kv_source(j) == Some(i));
            let attn_params = AttentionParams {
                n_heads: c.num_attention_heads,
                n_kv_heads: c.num_key_value_heads,
                head_dim: hd,
                scale: 1.0,
                softcap: None,
                mask: match c.layer_types[i] {
                    LayerType::Sliding => AttentionMask::SlidingWindow(c.sliding_window),
                    LayerType::Full => AttentionMask::Causal,
                },
                // The per-query kernel: see `AttentionParams::tiled` for why text stays on it.
                tiled: false,
            };
            let (rope, rotations) = match c.layer_types[i] {
                LayerType::Sliding => (&self.rope_local, &*rot_local),
                LayerType::Full => (&self.rope_global, &*rot_global),
            };

            // AltUp predict; the active stream's prediction is this layer's input.
            layer.altup.predict(
                pool,
                streams,
                predictions,
                n_tokens,
                h,
                c.rms_norm_eps,
                coefs,
            );
            active.copy_from_slice(&predictions[..plane]);
            let normed = sized(&mut scratch.work.normed, plane);
            normed.copy_from_slice(active);
            ops::rms_norm_inplace(normed, &layer.input_layernorm, c.rms_norm_eps);

            // LAuReL: normed + norm(right(left(normed))).
            // Everything that reads `normed` (LAuReL's left factor, q, and k/v where this layer
            // computes them) quantizes it once and runs as one pool job.
            let lr = &layer.laurel;
            let a = &layer.self_attn;
            let q = sized(&mut scratch.work.q, n_tokens * q_dim);
            let k = sized(&mut scratch.work.k, n_tokens * kv_dim);
            let v = sized(&mut scratch.work.v, n_tokens * kv_dim);
            match &a.kv {
                Some(kv) => linear_shared_input(
                    pool,
                    [&lr.linear_left, &a.q_proj, &kv.k_proj, &kv.v_proj],
                    normed,
                    n_tokens,
                    [&mut laurel_low[..], &mut *q, &mut *k, &mut *v],
                    &mut scratch.work.quantized,
                ),
                None => linear_shared_input(
                    pool,
                    [&lr.linear_left, &a.q_proj],
                    normed,
                    n_tokens,
                    [&mut laurel_low[..], &mut *q],
                    &mut scratch.work.quantized,
                ),
            }
            linear(
                pool,
                &lr.linear_right,
                laurel_low,
                n_tokens,
                laurel,
                &mut scratch.work.quantized,
            );
            ops::rms_norm_inplace(laurel, &lr.post_laurel_norm, c.rms_norm_eps);
            ops::add_inplace(laurel, normed);

            // Attention, unscaled; q/k normalised with weights, v without.
            ops::rms_norm_inplace(q, &a.q_norm, c.rms_norm_eps);
            for t in 0..n_tokens {
                let rotation = &rotations[t * hd..(t + 1) * hd];
                rope.apply_rotation(&mut q[t * q_dim..(t + 1) * q_dim], rotation);
            }
            if let Some(kv) = &a.kv {
                ops::rms_norm_inplace(k, &kv.k_norm, c.rms_norm_eps);
                ops::rms_norm_no_weight_inplace(v, hd, c.rms_norm_eps);
                for t in 0..n_tokens {
                    let rotation = &rotations[t * hd..(t + 1) * hd];
                    rope.apply_rotation(&mut k[t * kv_dim..(t + 1) * kv_dim], rotation);
                }
                if let Some(stored_kv) = kv_layers.get(i) {
                    stored_kv.round_to_storage(k);
                    stored_kv.round_to_storage(v);
                }
            }
            let attn_out = sized(&mut scratch.work.attn, n_tokens * q_dim);
            {
                let (keys, values): (&[f32], &[f32]) = match &shared_kv[kv_src] {
                    Some((sk, sv)) if kv_src != i && !sk.is_empty() => (sk, sv),
                    _ => (k, v),
                };
                let fresh = KvSegment {
                    keys: keys.into(),
                    values: values.into(),
                    first_pos: pos0,
                    len: n_tokens,
                };
                let segments = kv_layers[kv_src].history_then(pos0, fresh);
                attention(pool, &attn_params, q, pos0, &segments, attn_out);
            }
            if is_source {
                let (sk, sv) = shared_kv[i].get_or_insert_with(Default::default);
                sk.clear();
                sk.extend_from_slice(k);
                sv.clear();
                sv.extend_from_slice(v);
            } else if i < first_shared {
                kv_layers[i].write(pos0, k, v);
            }
            let x = sized(&mut scratch.x, plane);
            linear(
                pool,
                &a.o_proj,
                attn_out,
                n_tokens,
                x,
                &mut scratch.work.quantized,
            );
            ops::rms_norm_inplace(x, &layer.post_attention_layernorm, c.rms_norm_eps);

            // x = ((active + attn) + laurel) / sqrt(2)
            for ((xv, av), lv) in x.iter_mut().zip(active.iter()).zip(laurel.iter()) {
                *xv = ((av + *xv) + lv) / std::f32::consts::SQRT_2;
            }

            // MLP with optional Gaussian top-k sparsity on the gate.
            let m = &layer.mlp;
            let ffn = m.gate_proj.rows;
            let normed = sized(&mut scratch.work.normed, plane);
            normed.copy_from_slice(x);
            ops::rms_norm_inplace(normed, &layer.pre_feedforward_layernorm, c.rms_norm_eps);
            let gate = sized(&mut scratch.work.gate, n_tokens * ffn);
            let up = sized(&mut scratch.work.up, n_tokens * ffn);
            match m.sparsity_std_multiplier {
                Some(z) => {
                    // The gate first: only the rows it keeps (about 5 %) of up are computed,
                    // the same bits as the full product on those rows.
                    linear(
                        pool,
                        &m.gate_proj,
                        normed,
                        n_tokens,
                        gate,
                        &mut scratch.work.quantized,
                    );
                    pool.for_rows_mut(gate, ffn, TOKENS_PER_TASK, &|_, rows| {
                        rows.chunks_exact_mut(ffn)
                            .for_each(|row| gaussian_top_k(row, z))
                    });
                    let kept = &mut scratch.work.kept_rows;
                    kept.clear();
                    let sparse_up = self.sparse_mlps && n_tokens <= SPARSE_UP_MAX_TOKENS;
                    if sparse_up {
                        kept.extend(
                            (0..ffn)
                                .filter(|&j| (0..n_tokens).any(|t| gate[t * ffn + j] != 0.0))
                                .map(|j| j as u32),
                        );
                    }
                    if sparse_up && kept.len() <= ffn / 2 {
                        matmul::matmul_rows(
                            pool,
                            &m.up_proj.matrix(),
                            normed,
                            n_tokens,
                            kept,
                            up,
                            &mut scratch.work.quantized,
                        );
                    } else {
                        linear(
                            pool,
                            &m.up_proj,
                            normed,
                            n_tokens,
                            up,
                            &mut scratch.work.quantized,
                        );
                    }
                }
                None => linear_shared_input(
                    pool,
                    [&m.gate_proj, &m.up_proj],
                    normed,
                    n_tokens,
                    [&mut *gate, &mut *up],
                    &mut scratch.work.quantized,
                ),
            }
            ops::gelu_tanh_mul_parallel(pool, gate, up);
            let proj = sized(&mut scratch.work.proj, plane);
            match &m.down {
                Down::SparseInput(w) => {
                    w.matmul(pool, gate, ffn, n_tokens, proj, &mut scratch.work.sparse);
                }
                Down::Dense(w) if w.cols > ffn => {
                    // A switched sub-model over a wider down projection: zero columns add
                    // nothing.
                    let mut padded = vec![0.0; n_tokens * w.cols];
                    for (dst, src) in padded.chunks_exact_mut(w.cols).zip(gate.chunks_exact(ffn)) {
                        dst[..ffn].copy_from_slice(src);
                    }
                    linear(
                        pool,
                        w,
                        &padded,
                        n_tokens,
                        proj,
                        &mut scratch.work.quantized,
                    );
                }
                Down::Dense(w) => {
                    linear(pool, w, gate, n_tokens, proj, &mut scratch.work.quantized);
                }
            }
            ops::rms_norm_inplace(proj, &layer.post_feedforward_layernorm, c.rms_norm_eps);
            ops::add_inplace(x, proj);

            // AltUp correct: every stream moves towards the layer output.
            layer.altup.correct(
                pool,
                predictions,
                x,
                streams,
                n_tokens,
                h,
                c.rms_norm_eps,
                coefs,
            );

            // Per-layer input: gate the corrected active stream, multiply by this layer's PLE,
            // project back and add to the other streams.
            let first = sized(&mut scratch.work.normed, plane);
            first.copy_from_slice(&streams[..plane]);
            if c.altup_correct_scale {
                for row in first.chunks_exact_mut(h) {
                    row.iter_mut()
                        .zip(&layer.altup.correct_output_scale)
                        .for_each(|(v, s)| *v *= s);
                }
            }
            linear(
                pool,
                &layer.per_layer_input_gate,
                first,
                n_tokens,
                gate_ple,
                &mut scratch.work.quantized,
            );
            let width = self.layers.len() * p;
            for (t, row) in gate_ple.chunks_exact_mut(p).enumerate() {
                let ple_row = &ple[t * width + stored_layer * p..][..p];
                for (g, e) in row.iter_mut().zip(ple_row) {
                    *g = ops::gelu_tanh(*g) * e;
                }
            }
            let proj = sized(&mut scratch.work.proj, plane);
            linear(
                pool,
                &layer.per_layer_projection,
                gate_ple,
                n_tokens,
                proj,
                &mut scratch.work.quantized,
            );
            ops::rms_norm_inplace(proj, &layer.post_per_layer_input_norm, c.rms_norm_eps);
            for s in 1..n_streams {
                ops::add_inplace(&mut streams[s * plane..(s + 1) * plane], proj);
            }
            // Cheap next to the layer's matmuls, and it names where a broken checkpoint breaks.
            if !ops::all_finite(streams) {
                return Err(ModelError::NonFinite {
                    where_: format!("layer {stored_layer}"),
                });
            }
        }
        for (i, kv) in shared_kv.iter().enumerate() {
            if let Some((k, v)) = kv.as_ref().filter(|(k, _)| !k.is_empty()) {
                kv_layers[i].write(pos0, k, v);
            }
        }
        cache.advance(n_tokens);
        let KvCache { scratch, .. } = cache;

        // Unembed: project streams 1.. back, rescale to stream 0's magnitude, average, norm.
        let rows = match logits {
            Logits::Last => n_tokens - 1..n_tokens,
            Logits::All => 0..n_tokens,
            Logits::None => 0..0,
        };
        let n_rows = rows.len();
        let span = rows.start * h..rows.end * h;
        let hidden = sized(&mut scratch.x, n_rows * h);
        hidden.copy_from_slice(&streams[span.clone()]);
        let unembedded = sized(&mut bufs.unembedded, n_rows * h);
        for (s, proj) in self.altup_unembed_projections.iter().enumerate() {
            let src = &streams[(s + 1) * plane..][span.clone()];
            linear(
                pool,
                proj,
                src,
                n_rows,
                unembedded,
                &mut scratch.work.quantized,
            );
            rescale_to_magnitude(unembedded, &streams[span.clone()], h);
            ops::add_inplace(hidden, unembedded);
        }
        ops::scale_inplace(hidden, 1.0 / n_streams as f32);
        scratch.gemma3n = bufs;
        let head = OutputHead {
            norm: &self.norm,
            eps: c.rms_norm_eps,
            head: self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            softcap: c.final_logit_softcapping,
        };
        Ok(head.logits(
            pool,
            hidden,
            &mut scratch.logits,
            &mut scratch.work.quantized,
        )?)
    }

    pub fn describe(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let n_full = c
            .layer_types
            .iter()
            .filter(|t| **t == LayerType::Full)
            .count();
        let sparse: Vec<String> = c
            .activation_sparsity
            .iter()
            .enumerate()
            .filter_map(|(i, z)| z.map(|z| format!("{i}: mean + {z:.4} std")))
            .collect();
        // One number when every layer agrees, else the per-layer list (MatFormer mixes).
        let widths = match c.intermediate_size.split_first() {
            Some((first, rest)) if rest.iter().all(|w| w == first) => first.to_string(),
            _ => c
                .intermediate_size
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(","),
        };
        let skipped: Vec<String> = (0..self.layers.len())
            .filter(|i| !self.active_layers.contains(i))
            .map(|i| i.to_string())
            .collect();
        let layers = if skipped.is_empty() {
            c.num_hidden_layers.to_string()
        } else {
            format!(
                "{} (MatFormer: {} stored, skipping {})",
                c.num_hidden_layers,
                self.layers.len(),
                skipped.join(",")
            )
        };
        vec![
            ("vocab_size".into(), c.vocab_size.to_string()),
            ("hidden_size".into(), c.hidden_size.to_string()),
            ("layers".into(), layers),
            (
                "layer pattern".into(),
                format!(
                    "{} sliding (window {}), {} full",
                    c.num_hidden_layers - n_full,
                    c.sliding_window,
                    n_full
                ),
            ),
            (
                "attention heads".into(),
                format!(
                    "{} (kv {}), head_dim {}",
                    c.num_attention_heads, c.num_key_value_heads, c.head_dim
                ),
            ),
            (
                "kv sharing".into(),
                format!("last {} layers reuse earlier K/V", c.num_kv_shared_layers),
            ),
            ("ffn".into(), widths),
            ("activation sparsity".into(), sparse.join(" ")),
            (
                "altup / laurel / per-layer input".into(),
                format!(
                    "{} streams / rank {} / {} per layer",
                    c.altup_num_inputs, c.laurel_rank, c.hidden_size_per_layer_input
                ),
            ),
            (
                "per-layer embedding table".into(),
                format!(
                    "{} x {} {} ({} bytes, memory-mapped, read per token)",
                    self.embed_tokens_per_layer.rows,
                    self.embed_tokens_per_layer.cols,
                    self.embed_tokens_per_layer.dtype.name(),
                    self.embed_tokens_per_layer.bytes()
                ),
            ),
            (
                "rope".into(),
                format!(
                    "local theta {}, global theta {}",
                    c.rope_local.theta, c.rope_global.theta
                ),
            ),
            ("rms_norm_eps".into(), c.rms_norm_eps.to_string()),
            (
                "context_length".into(),
                c.max_position_embeddings.to_string(),
            ),
        ]
    }
}

impl AltUp {
    /// `tanh(router(router_norm(x) / H))` for one token: the stream mixing weights.
    fn modalities(&self, x: &[f32], eps: f32, out: &mut [f32]) {
        let h = x.len();
        // RMSNorm folded into the dot products, so routing a token allocates nothing.
        let sum_sq: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        let scale = 1.0 / ((sum_sq / h as f64) as f32 + eps).sqrt();
        let inv_h = 1.0 / h as f32;
        for (m, w) in out.iter_mut().zip(self.modality_router.chunks_exact(h)) {
            let dot: f64 = w
                .iter()
                .zip(x)
                .zip(&self.router_norm)
                .map(|((w, &v), n)| (w * (v * scale * n * inv_h)) as f64)
                .sum();
            *m = (dot as f32).tanh();
        }
    }

    /// `pred_j = S_j + Σ_i c[j][i] · S_i`, with `c = prediction_coefs(modalities(S_0))`.
    #[allow(clippy::too_many_arguments)]
    fn predict(
        &self,
        pool: &ThreadPool,
        streams: &[f32],
        pred: &mut [f32],
        n_tokens: usize,
        h: usize,
        eps: f32,
        coefs: &mut Vec<f32>,
    ) {
        let k = self.correction_coefs.len().isqrt();
        let plane = n_tokens * h;
        // Each token's `k × k` mixing coefficients from its router; then each prediction plane.
        // Tokens split across the pool (a prompt's); one token runs on the caller.
        let coefs = sized(coefs, n_tokens * k * k);
        pool.for_rows_mut(coefs, k * k, TOKENS_PER_TASK, &|t0, rows| {
            let mut m = [0.0; MAX_ALTUP_STREAMS];
            for (t, row) in (t0..).zip(rows.chunks_exact_mut(k * k)) {
                self.modalities(&streams[t * h..(t + 1) * h], eps, &mut m[..k]);
                for (c, w) in row.iter_mut().zip(self.prediction_coefs.chunks_exact(k)) {
                    *c = w.iter().zip(&m[..k]).map(|(a, b)| a * b).sum();
                }
            }
        });
        let coefs = &*coefs;
        for (j, dst_plane) in pred.chunks_exact_mut(plane).enumerate().take(k) {
            pool.for_rows_mut(dst_plane, h, TOKENS_PER_TASK, &|t0, rows| {
                for (t, dst) in (t0..).zip(rows.chunks_exact_mut(h)) {
                    let stream = |s: usize| &streams[s * plane + t * h..][..h];
                    // mix = Σ_s c[j][s] · S_s term by term in stream order, a whole row at a
                    // time (contiguous, so vectorised), then S_j + mix.
                    let c = &coefs[t * k * k + j * k..][..k];
                    for (d, &v) in dst.iter_mut().zip(stream(0)) {
                        *d = c[0] * v;
                    }
                    for (s, &cs) in c.iter().enumerate().skip(1) {
                        for (d, &v) in dst.iter_mut().zip(stream(s)) {
                            *d += cs * v;
                        }
                    }
                    for (d, &v) in dst.iter_mut().zip(stream(j)) {
                        *d += v;
                    }
                }
            });
        }
    }

    /// `C_j = pred_j + (correction_coefs(modalities(x))_j + 1) · (x − pred_0)`.
    #[allow(clippy::too_many_arguments)]
    fn correct(
        &self,
        pool: &ThreadPool,
        pred: &[f32],
        x: &[f32],
        out: &mut [f32],
        n_tokens: usize,
        h: usize,
        eps: f32,
        coefs: &mut Vec<f32>,
    ) {
        let k = self.correction_coefs.len().isqrt();
        let plane = n_tokens * h;
        // Each token's `k` coefficients, then each corrected stream, tokens across the pool.
        let coefs = sized(coefs, n_tokens * k);
        pool.for_rows_mut(coefs, k, TOKENS_PER_TASK, &|t0, rows| {
            let mut m = [0.0; MAX_ALTUP_STREAMS];
            for (t, row) in (t0..).zip(rows.chunks_exact_mut(k)) {
                self.modalities(&x[t * h..(t + 1) * h], eps, &mut m[..k]);
                for (coef, w) in row.iter_mut().zip(self.correction_coefs.chunks_exact(k)) {
                    *coef = w.iter().zip(&m[..k]).map(|(a, b)| a * b).sum::<f32>() + 1.0;
                }
            }
        });
        let coefs = &*coefs;
        for (j, dst_plane) in out.chunks_exact_mut(plane).enumerate().take(k) {
            pool.for_rows_mut(dst_plane, h, TOKENS_PER_TASK, &|t0, rows| {
                for (t, dst) in (t0..).zip(rows.chunks_exact_mut(h)) {
                    let coef = coefs[t * k + j];
                    let xt = &x[t * h..(t + 1) * h];
                    let p0 = &pred[t * h..(t + 1) * h];
                    let pj = &pred[j * plane + t * h..][..h];
                    for (((o, &xv), &a), &b) in dst.iter_mut().zip(xt).zip(p0).zip(pj) {
                        let innovation = xv - a;
                        *o = innovation * coef + b;
                    }
                }
            });
        }
    }
}

/// `sqrt(mean(x²))` of one row, accumulated in f64.
fn rms_magnitude(row: &[f32]) -> f32 {
    let sum: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
    (sum / row.len() as f64).sqrt() as f32
}

/// Rescales every `h`-row of `y` to the RMS magnitude of the matching row of `target`.
fn rescale_to_magnitude(y: &mut [f32], target: &[f32], h: usize) {
    for (row, t) in y.chunks_exact_mut(h).zip(target.chunks_exact(h)) {
        let want = rms_magnitude(t);
        let sum: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
        let have = ((sum / h as f64) as f32).max(ALTUP_MIN_MEAN_SQUARE).sqrt();
        row.iter_mut().for_each(|v| *v = *v * want / have);
    }
}

/// Activation sparsity: `relu(x − (mean(x) + std(x) · z))` over one token's gate values, with
/// the population standard deviation.
fn gaussian_top_k(row: &mut [f32], z: f32) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let cutoff = (mean + var.sqrt() * z as f64) as f32;
    row.iter_mut().for_each(|v| *v = (*v - cutoff).max(0.0));
}
