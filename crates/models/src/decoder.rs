//! Pieces of the Gemma text decoders that more than one family uses, each written once:
//! checkpoint tensor names, layer kinds and the cache plan they imply, the embedding lookup
//! (with soft tokens), attention of a batch of sequences over their KV caches, the gated MLP
//! block, and the final norm + LM head. Each family's `forward` stays one readable pass that
//! calls these where its reference does the same thing, and spells out its own quirks.

use std::ops::Range;

use gemma_formats::{GgmlType, MetaValue};
use gemma_kernels::matmul;
use gemma_kernels::ops::attention::{attention_spans, AttentionParams, KvSegment};
use gemma_kernels::ops::kv::CacheType;
use gemma_kernels::ops::{self, Rope};
use gemma_kernels::pool::ThreadPool;
use serde_json::Value;

use crate::kv_cache::{
    check_soft_tokens, is_soft, sized, KvCache, Scratch, SeqStep, SoftTokens, Work,
};
use crate::weights::{linear, linear_shared_input, Linear, Loader, WeightLayout};
use crate::{Logits, ModelError};

/// The attention of one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerType {
    /// Local attention over the last `sliding_window` positions (a ring-buffer cache).
    Sliding,
    /// Global attention over the whole context.
    Full,
}

impl LayerType {
    /// transformers' `layer_types` (`"sliding_attention"` / `"full_attention"`).
    pub(crate) fn from_hf(items: &[Value]) -> Result<Vec<LayerType>, ModelError> {
        items
            .iter()
            .map(|v| match v.as_str() {
                Some("sliding_attention") => Ok(LayerType::Sliding),
                Some("full_attention") => Ok(LayerType::Full),
                _ => Err(ModelError::Config(format!("unknown layer type {v}"))),
            })
            .collect()
    }

    /// llama.cpp's per-layer `attention.sliding_window_pattern` (one bool per layer, true =
    /// sliding).
    pub(crate) fn from_gguf_flags(items: &[MetaValue]) -> Result<Vec<LayerType>, ModelError> {
        items
            .iter()
            .map(|v| match v {
                MetaValue::Bool(true) => Ok(LayerType::Sliding),
                MetaValue::Bool(false) => Ok(LayerType::Full),
                other => Err(ModelError::Config(format!(
                    "sliding_window_pattern holds {other:?}, expected bools"
                ))),
            })
            .collect()
    }

    /// `period - 1` sliding layers, then a full one, repeated (a period of 0: all sliding).
    pub(crate) fn pattern(n_layers: usize, period: usize) -> Vec<LayerType> {
        (0..n_layers)
            .map(|i| {
                if period > 0 && (i + 1) % period == 0 {
                    LayerType::Full
                } else {
                    LayerType::Sliding
                }
            })
            .collect()
    }
}

/// One RoPE: its base, and linear position scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    pub theta: f32,
    /// Linear scaling: positions are divided by this (1.0 = none).
    pub linear_factor: f32,
}

impl RopeParams {
    /// A base of 0 (or 1, or NaN) makes every rotation NaN or zero: refuse it at load.
    pub fn validate(&self, which: &str) -> Result<(), ModelError> {
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(ModelError::Config(format!(
                "{which} RoPE base {} must be a finite number above 1",
                self.theta
            )));
        }
        if !(self.linear_factor.is_finite() && self.linear_factor > 0.0) {
            return Err(ModelError::Config(format!(
                "{which} RoPE scaling factor {} must be a positive finite number",
                self.linear_factor
            )));
        }
        Ok(())
    }
}

/// Refuses a configuration with any of `sizes` (name, value) at zero, naming them all.
pub(crate) fn check_nonzero(sizes: &[(&str, usize)]) -> Result<(), ModelError> {
    if sizes.iter().all(|&(_, v)| v > 0) {
        return Ok(());
    }
    let listed: Vec<String> = sizes.iter().map(|(k, v)| format!("{k} {v}")).collect();
    Err(ModelError::Config(format!(
        "zero size ({})",
        listed.join(", ")
    )))
}

/// Refuses attention heads the forward pass cannot run: none, query heads that do not group
/// over the key/value heads, an odd head dimension (RoPE rotates pairs), or a query width that
/// overflows.
pub(crate) fn check_attention_heads(
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> Result<(), ModelError> {
    if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(ModelError::Config(format!(
            "{n_heads} attention heads cannot share {n_kv_heads} key/value heads"
        )));
    }
    if !head_dim.is_multiple_of(2) {
        return Err(ModelError::Config(format!(
            "head_dim {head_dim} must be even for RoPE"
        )));
    }
    if n_heads.checked_mul(head_dim).is_none() {
        return Err(ModelError::Config(format!(
            "{n_heads} heads of {head_dim} values overflow"
        )));
    }
    Ok(())
}

/// How a decoder's KV cache is laid out: one ring per layer, as long as the window for sliding
/// layers and as the context for global ones.
pub(crate) struct CachePlan<'a> {
    /// The layers that store keys and values.
    pub layer_types: &'a [LayerType],
    pub sliding_window: usize,
    /// Values per position and layer: kv heads × head dimension.
    pub row: usize,
}

impl CachePlan<'_> {
    fn capacities(&self, ctx_size: usize) -> Vec<usize> {
        self.layer_types
            .iter()
            .map(|t| match t {
                LayerType::Sliding => self.sliding_window.min(ctx_size),
                LayerType::Full => ctx_size,
            })
            .collect()
    }

    pub fn new_cache(&self, ctx_size: usize, cache_type: CacheType) -> Result<KvCache, ModelError> {
        if ctx_size == 0 {
            return Err(ModelError::Config("context size must be at least 1".into()));
        }
        KvCache::new(ctx_size, &self.capacities(ctx_size), self.row, cache_type)
    }

    pub fn bytes(&self, ctx_size: usize, cache_type: CacheType) -> usize {
        KvCache::bytes_for(&self.capacities(ctx_size), self.row, cache_type)
    }
}

/// Tensor names of one checkpoint layout; callers speak transformers' names and the llama.cpp
/// names are looked up in one table for all Gemma families.
pub(crate) struct Names {
    pub layout: WeightLayout,
}

impl Names {
    /// A model-level tensor, by its transformers module name (`embed_tokens`, `norm`, ...).
    pub fn top(&self, hf: &str) -> String {
        match self.layout {
            WeightLayout::HuggingFace { prefix } => format!("{prefix}{hf}.weight"),
            WeightLayout::Gguf => {
                let gguf = match hf {
                    "embed_tokens" => "token_embd",
                    "norm" => "output_norm",
                    "embed_tokens_per_layer" => "per_layer_token_embd",
                    "per_layer_model_projection" => "per_layer_model_proj",
                    "per_layer_projection_norm" => "per_layer_proj_norm",
                    "altup_projections" => "altup_proj",
                    "altup_unembed_projections" => "altup_unembd_proj",
                    other => unreachable!("no GGUF name for {other}"),
                };
                format!("{gguf}.weight")
            }
        }
    }

    /// The untied LM head (absent from every released Gemma checkpoint but allowed).
    pub fn lm_head(&self) -> String {
        match self.layout {
            WeightLayout::Gguf => "output.weight".into(),
            WeightLayout::HuggingFace { .. } => "lm_head.weight".into(),
        }
    }

    /// A tensor of layer `i`, by its transformers module path inside the layer.
    pub fn layer(&self, i: usize, hf: &str) -> String {
        match self.layout {
            // A bare parameter, not a module's weight.
            WeightLayout::HuggingFace { prefix } if hf == "altup.correct_output_scale" => {
                format!("{prefix}layers.{i}.{hf}")
            }
            WeightLayout::HuggingFace { prefix } => format!("{prefix}layers.{i}.{hf}.weight"),
            WeightLayout::Gguf => {
                let gguf = match hf {
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "self_attn.q_norm" => "attn_q_norm",
                    "self_attn.k_norm" => "attn_k_norm",
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "post_attention_norm",
                    "pre_feedforward_layernorm" => "ffn_norm",
                    "post_feedforward_layernorm" => "post_ffw_norm",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    // Gemma 3n only.
                    "per_layer_input_gate" => "inp_gate",
                    "per_layer_projection" => "proj",
                    "post_per_layer_input_norm" => "post_norm",
                    "altup.correction_coefs" => "altup_correct_coef",
                    "altup.correct_output_scale" => "altup_correct_scale",
                    "altup.prediction_coefs" => "altup_predict_coef",
                    "altup.modality_router" => "altup_router",
                    "altup.router_norm" => "altup_router_norm",
                    "laurel.linear_left" => "laurel_l",
                    "laurel.linear_right" => "laurel_r",
                    "laurel.post_laurel_norm" => "laurel_post_norm",
                    other => unreachable!("no GGUF name for {other}"),
                };
                format!("blk.{i}.{gguf}.weight")
            }
        }
    }

    /// The separate LM head when the checkpoint has one; `None`: tied to the embedding.
    pub fn optional_lm_head(
        &self,
        loader: &Loader<'_>,
        vocab: usize,
        hidden: usize,
    ) -> Result<Option<Linear>, ModelError> {
        let name = self.lm_head();
        match loader.source.tensor(&name) {
            Some(_) => Ok(Some(loader.linear(&name, vocab, hidden)?)),
            None => Ok(None),
        }
    }
}

/// `sqrt(n)` as the checkpoint's reference multiplies embeddings by it: transformers casts it to
/// the table's dtype (bf16 turns sqrt(640) = 25.298 into 25.25); llama.cpp uses the f32 value.
pub(crate) fn embedding_scale(n: usize, table: &Linear, layout: WeightLayout) -> f32 {
    let s = (n as f32).sqrt();
    match (layout, table.dtype) {
        (WeightLayout::HuggingFace { .. }, GgmlType::BF16) => half::bf16::from_f32(s).to_f32(),
        (WeightLayout::HuggingFace { .. }, GgmlType::F16) => half::f16::from_f32(s).to_f32(),
        _ => s,
    }
}

/// Writes the embeddings of one step's `tokens` to `rows` (`tokens × hidden`): each id's table
/// row times `scale`, except where a run of `soft` tokens replaces them, whose rows are taken as
/// they are (the references scatter a tower's output over the scaled embeddings, unscaled).
pub(crate) fn embed_tokens(
    table: &Linear,
    scale: f32,
    tokens: &[u32],
    soft: &[SoftTokens<'_>],
    rows: &mut [f32],
) {
    let h = table.cols;
    let m = table.matrix();
    for (t, (row, &id)) in rows.chunks_exact_mut(h).zip(tokens).enumerate() {
        if !is_soft(soft, h, t) {
            matmul::dequantize_row(&m, id as usize, row);
            ops::scale_inplace(row, scale);
        }
    }
    for run in soft {
        let r = run.rows(h);
        rows[r.start * h..r.end * h].copy_from_slice(run.embeds);
    }
}

/// [`embed_tokens`] for every step of a batch, stacked row after row into `x`.
pub(crate) fn embed_batch(table: &Linear, scale: f32, seqs: &[SeqStep<'_>], x: &mut [f32]) {
    let mut rows = x;
    for s in seqs {
        let (step, rest) = rows.split_at_mut(s.tokens.len() * table.cols);
        embed_tokens(table, scale, s.tokens, s.soft, step);
        rows = rest;
    }
}

/// Checks a batch before any cache changes, so a rejected batch changes nothing: every step has
/// tokens, well-formed soft tokens, ids inside the vocabulary (a replaced position's id is a
/// placeholder and never looked up), and room in its cache.
pub(crate) fn check_steps(
    seqs: &[SeqStep<'_>],
    vocab: usize,
    hidden: usize,
) -> Result<(), ModelError> {
    for s in seqs {
        if s.tokens.is_empty() {
            return Err(ModelError::Config(
                "forward needs at least one token".into(),
            ));
        }
        check_soft_tokens(s.soft, s.tokens.len(), hidden)?;
        let out_of_range = s
            .tokens
            .iter()
            .enumerate()
            .find(|&(i, &id)| id as usize >= vocab && !is_soft(s.soft, hidden, i));
        if let Some((_, &id)) = out_of_range {
            return Err(ModelError::TokenOutOfRange { id, vocab });
        }
        s.cache.reserve(s.tokens.len())?;
    }
    Ok(())
}

/// Each sequence's bidirectional soft-token runs, as absolute positions.
pub(crate) fn bidirectional_spans(seqs: &[SeqStep<'_>], hidden: usize) -> Vec<Vec<Range<usize>>> {
    seqs.iter()
        .map(|s| {
            let pos0 = s.cache.len();
            s.soft
                .iter()
                .filter(|r| r.bidirectional)
                .map(|r| {
                    let rows = r.rows(hidden);
                    pos0 + rows.start..pos0 + rows.end
                })
                .collect()
        })
        .collect()
}

/// The absolute position of every row of a batch (each sequence continues its cache).
pub(crate) fn positions<'a>(seqs: &'a [SeqStep<'_>]) -> impl Iterator<Item = usize> + 'a {
    seqs.iter()
        .flat_map(|s| (0..s.tokens.len()).map(|t| s.cache.len() + t))
}

/// Fills `out` with `rope`'s rotation for each position, `head_dim` values each.
pub(crate) fn rotations(rope: &Rope, positions: impl Iterator<Item = usize>, out: &mut [f32]) {
    let hd = rope.head_dim();
    for (pos, rotation) in positions.zip(out.chunks_exact_mut(hd)) {
        rope.rotation(pos, rotation);
    }
}

/// How one layer attends over the KV cache: the kernel's parameters, the layer's RoPE with the
/// batch's precomputed rotations, and which cache layer holds its history.
pub(crate) struct CachedAttention<'a> {
    pub params: AttentionParams,
    pub rope: &'a Rope,
    /// One rotation per row of the batch, `head_dim` values each.
    pub rotations: &'a [f32],
    /// Index of the layer in every sequence's [`KvCache`].
    pub layer: usize,
    /// Each sequence's bidirectional runs ([`bidirectional_spans`]).
    pub spans: &'a [Vec<Range<usize>>],
}

impl CachedAttention<'_> {
    /// Attention of a batch's rows (`q`, `k`, `v` stacked sequence after sequence, not yet
    /// rotated): rotates q and k, rounds the new keys and values to the cache's storage (so a
    /// chunk sees its own keys as later tokens will), attends over each sequence's cached
    /// history plus its new keys, writes `out`, then stores the new keys and values.
    pub fn run(
        &self,
        pool: &ThreadPool,
        seqs: &mut [SeqStep<'_>],
        q: &mut [f32],
        k: &mut [f32],
        v: &mut [f32],
        out: &mut [f32],
    ) {
        let p = &self.params;
        let hd = p.head_dim;
        let q_dim = p.n_heads * hd;
        let kv_dim = p.n_kv_heads * hd;
        let mut row = 0;
        for (s, spans) in seqs.iter_mut().zip(self.spans) {
            let (n, pos0) = (s.tokens.len(), s.cache.len());
            let q = &mut q[row * q_dim..(row + n) * q_dim];
            let k = &mut k[row * kv_dim..(row + n) * kv_dim];
            let v = &mut v[row * kv_dim..(row + n) * kv_dim];
            for t in 0..n {
                let rotation = &self.rotations[(row + t) * hd..(row + t + 1) * hd];
                self.rope
                    .apply_rotation(&mut q[t * q_dim..(t + 1) * q_dim], rotation);
                self.rope
                    .apply_rotation(&mut k[t * kv_dim..(t + 1) * kv_dim], rotation);
            }
            let kv = &mut s.cache.layers[self.layer];
            kv.round_to_storage(k);
            kv.round_to_storage(v);
            {
                let fresh = KvSegment {
                    keys: (&*k).into(),
                    values: (&*v).into(),
                    first_pos: pos0,
                    len: n,
                };
                let segments = kv.history_then(pos0, fresh);
                let out = &mut out[row * q_dim..(row + n) * q_dim];
                attention_spans(pool, p, q, pos0, &segments, spans, out);
            }
            kv.write(pos0, k, v);
            row += n;
        }
    }
}

/// Gemma's gated MLP: `down(gelu_tanh(gate(x)) * up(x))`.
pub(crate) struct GatedMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl GatedMlp {
    /// Layer `i`'s `mlp.{gate,up,down}_proj` for `hidden` inputs and `ffn` units.
    pub fn load(
        loader: &Loader<'_>,
        names: &Names,
        i: usize,
        hidden: usize,
        ffn: usize,
    ) -> Result<GatedMlp, ModelError> {
        let lin = |name: &str, rows, cols| loader.linear(&names.layer(i, name), rows, cols);
        Ok(GatedMlp {
            gate_proj: lin("mlp.gate_proj", ffn, hidden)?,
            up_proj: lin("mlp.up_proj", ffn, hidden)?,
            down_proj: lin("mlp.down_proj", hidden, ffn)?,
        })
    }

    pub fn bytes(&self) -> usize {
        self.gate_proj.bytes() + self.up_proj.bytes() + self.down_proj.bytes()
    }

    /// The MLP half of a sandwich-norm layer (Gemma 2, Gemma 3), on `x`'s rows:
    /// `x += post_norm(down(gelu_tanh(gate(h)) * up(h)))` with `h = pre_norm(x)`.
    pub fn residual(
        &self,
        pool: &ThreadPool,
        x: &mut [f32],
        pre_norm: &[f32],
        post_norm: &[f32],
        eps: f32,
        work: &mut Work,
    ) {
        let h = self.down_proj.rows;
        let ffn = self.gate_proj.rows;
        let n_tokens = x.len() / h;
        let normed = sized(&mut work.normed, n_tokens * h);
        normed.copy_from_slice(x);
        ops::rms_norm_inplace(normed, pre_norm, eps);
        let gate = sized(&mut work.gate, n_tokens * ffn);
        let up = sized(&mut work.up, n_tokens * ffn);
        linear_shared_input(
            pool,
            [&self.gate_proj, &self.up_proj],
            normed,
            n_tokens,
            [&mut *gate, &mut *up],
            &mut work.quantized,
        );
        ops::gelu_tanh_mul_parallel(pool, gate, up);
        let proj = sized(&mut work.proj, n_tokens * h);
        linear(
            pool,
            &self.down_proj,
            gate,
            n_tokens,
            proj,
            &mut work.quantized,
        );
        ops::rms_norm_inplace(proj, post_norm, eps);
        ops::add_inplace(x, proj);
    }
}

/// A layer's `self_attn.{q,k,v,o}_proj`.
pub(crate) struct AttentionWeights {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

/// The attention half of a sandwich-norm layer (Gemma 2, Gemma 3), besides its weights.
pub(crate) struct SandwichAttention<'a> {
    /// `input_layernorm`, on the block's input.
    pub pre_norm: &'a [f32],
    /// `post_attention_layernorm`, on the block's output before the residual add.
    pub post_norm: &'a [f32],
    pub eps: f32,
    /// Per-head RMSNorm multipliers of q and k, applied before RoPE (Gemma 3; Gemma 2 has none).
    pub qk_norms: Option<[&'a [f32]; 2]>,
    pub attention: CachedAttention<'a>,
}

impl AttentionWeights {
    /// Layer `i`'s projections for `hidden` inputs, `q_dim` query and `kv_dim` key/value values.
    pub fn load(
        loader: &Loader<'_>,
        names: &Names,
        i: usize,
        hidden: usize,
        q_dim: usize,
        kv_dim: usize,
    ) -> Result<AttentionWeights, ModelError> {
        let lin = |name: &str, rows, cols| loader.linear(&names.layer(i, name), rows, cols);
        Ok(AttentionWeights {
            q_proj: lin("self_attn.q_proj", q_dim, hidden)?,
            k_proj: lin("self_attn.k_proj", kv_dim, hidden)?,
            v_proj: lin("self_attn.v_proj", kv_dim, hidden)?,
            o_proj: lin("self_attn.o_proj", hidden, q_dim)?,
        })
    }

    pub fn bytes(&self) -> usize {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
            .iter()
            .map(|w| w.bytes())
            .sum()
    }

    /// `x += post_norm(o_proj(attention(rope(q), rope(k), v)))` on `x`'s rows (the batch of
    /// `seqs`), with `q, k, v` projected from `pre_norm(x)` and, where the block has them,
    /// normalised per head before RoPE.
    pub fn residual(
        &self,
        pool: &ThreadPool,
        x: &mut [f32],
        block: &SandwichAttention<'_>,
        seqs: &mut [SeqStep<'_>],
        work: &mut Work,
    ) {
        let h = self.o_proj.rows;
        let (q_dim, kv_dim) = (self.q_proj.rows, self.k_proj.rows);
        let n_tokens = x.len() / h;
        let normed = sized(&mut work.normed, n_tokens * h);
        normed.copy_from_slice(x);
        ops::rms_norm_inplace(normed, block.pre_norm, block.eps);
        let q = sized(&mut work.q, n_tokens * q_dim);
        let k = sized(&mut work.k, n_tokens * kv_dim);
        let v = sized(&mut work.v, n_tokens * kv_dim);
        linear_shared_input(
            pool,
            [&self.q_proj, &self.k_proj, &self.v_proj],
            normed,
            n_tokens,
            [&mut *q, &mut *k, &mut *v],
            &mut work.quantized,
        );
        if let Some([q_norm, k_norm]) = block.qk_norms {
            ops::rms_norm_inplace(q, q_norm, block.eps);
            ops::rms_norm_inplace(k, k_norm, block.eps);
        }
        let attn_out = sized(&mut work.attn, n_tokens * q_dim);
        block.attention.run(pool, seqs, q, k, v, attn_out);
        let proj = sized(&mut work.proj, n_tokens * h);
        linear(
            pool,
            &self.o_proj,
            attn_out,
            n_tokens,
            proj,
            &mut work.quantized,
        );
        ops::rms_norm_inplace(proj, block.post_norm, block.eps);
        ops::add_inplace(x, proj);
    }
}

/// Moves the rows whose logits are wanted (per sequence: its last row, or all of them) to the
/// front of `x` (`hidden` values a row) and returns how many there are.
pub(crate) fn gather_logit_rows(
    seqs: &[SeqStep<'_>],
    logits: Logits,
    x: &mut [f32],
    hidden: usize,
) -> usize {
    let mut n_rows = 0;
    let mut row = 0;
    for s in seqs {
        let n = s.tokens.len();
        let wanted = match logits {
            Logits::Last => row + n - 1..row + n,
            Logits::All => row..row + n,
            Logits::None => row..row,
        };
        for r in wanted {
            x.copy_within(r * hidden..(r + 1) * hidden, n_rows * hidden);
            n_rows += 1;
        }
        row += n;
    }
    n_rows
}

/// The end of a decoder: final RMSNorm, LM head, and the final soft-cap where the model has one.
pub(crate) struct OutputHead<'a> {
    pub norm: &'a [f32],
    pub eps: f32,
    /// The LM head, or the embedding table it is tied to.
    pub head: &'a Linear,
    pub softcap: Option<f32>,
}

impl OutputHead<'_> {
    /// Logits of `hidden`'s rows (normalised in place) into `out`, sized to fit.
    pub fn logits<'o>(
        &self,
        pool: &ThreadPool,
        hidden: &mut [f32],
        out: &'o mut Vec<f32>,
        quantized: &mut Vec<u8>,
    ) -> Result<&'o mut [f32], ModelError> {
        let n_rows = hidden.len() / self.head.cols;
        ops::rms_norm_inplace(hidden, self.norm, self.eps);
        let out = sized(out, n_rows * self.head.rows);
        linear(pool, self.head, hidden, n_rows, out, quantized);
        if let Some(cap) = self.softcap {
            ops::softcap_inplace(out, cap);
        }
        if !ops::all_finite(out) {
            return Err(ModelError::NonFinite {
                where_: "the LM head (the logits)".into(),
            });
        }
        Ok(out)
    }
}

/// `forward_embeds` of a decoder whose batched pass is `run(seqs, scratch, logits)` (leaving
/// logits in `scratch.logits` and returning how many rows): one sequence, the cache's own
/// scratch buffers.
pub(crate) fn forward_one<'c>(
    run: impl FnOnce(&mut [SeqStep<'_>], &mut Scratch, Logits) -> Result<usize, ModelError>,
    vocab: usize,
    tokens: &[u32],
    soft: &[SoftTokens<'_>],
    cache: &'c mut KvCache,
    logits: Logits,
) -> Result<&'c [f32], ModelError> {
    let mut scratch = std::mem::take(&mut cache.scratch);
    let result = run(
        &mut [SeqStep {
            tokens,
            soft,
            cache: &mut *cache,
        }],
        &mut scratch,
        logits,
    );
    cache.scratch = scratch;
    let n_rows = result?;
    Ok(&cache.scratch.logits[..n_rows * vocab])
}

/// `forward_batch` of such a decoder: the first sequence's scratch buffers serve the batch, and
/// each sequence's last-token logits go, in order, to `logits_out`.
pub(crate) fn forward_many(
    run: impl FnOnce(&mut [SeqStep<'_>], &mut Scratch, Logits) -> Result<usize, ModelError>,
    vocab: usize,
    seqs: &mut [SeqStep<'_>],
    logits_out: &mut Vec<f32>,
) -> Result<(), ModelError> {
    let Some(first) = seqs.first_mut() else {
        logits_out.clear();
        return Ok(());
    };
    let mut scratch = std::mem::take(&mut first.cache.scratch);
    let result = run(seqs, &mut scratch, Logits::Last);
    if result.is_ok() {
        logits_out.clear();
        logits_out.extend_from_slice(&scratch.logits[..seqs.len() * vocab]);
    }
    seqs[0].cache.scratch = scratch;
    result.map(|_| ())
}
