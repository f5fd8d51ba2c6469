//! Gemma 3 text decoder (270M, 1B, 4B, 12B, 27B), read top to bottom in `forward`.
//!
//! Quirks, each applied where it happens: embeddings scaled by `sqrt(hidden)`; RMSNorm
//! multiplies by `1 + w`; sandwich norms around attention and MLP; per-head q/k norms before
//! RoPE; scores scaled by `query_pre_attn_scalar^-0.5`; 5 sliding-window layers per global
//! one, with different RoPE bases; GELU-tanh gated MLP; LM head tied to the embedding.

mod config;

pub use config::{Gemma3Config, LayerType, RopeParams};

use gemma_kernels::matmul;
use gemma_kernels::ops::attention::{attention_spans, AttentionMask, AttentionParams, KvSegment};
use gemma_kernels::ops::kv::CacheType;
use gemma_kernels::ops::{self, Rope};
use gemma_kernels::pool::ThreadPool;

use crate::kv_cache::{check_soft_tokens, is_soft, sized, KvCache, Scratch, SeqStep, SoftTokens};
use crate::weights::{linear, linear_shared_input, Linear, Loader, WeightLayout};
use crate::{Logits, ModelError};

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Per-head RMSNorm multipliers (`1 + w`), `head_dim` long.
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: Vec<f32>,
    post_attention_layernorm: Vec<f32>,
    pre_feedforward_layernorm: Vec<f32>,
    post_feedforward_layernorm: Vec<f32>,
}

pub struct Gemma3 {
    config: Gemma3Config,
    embed_tokens: Linear,
    /// `sqrt(hidden_size)`, rounded as the reference rounds it (see `load`).
    embed_scale: f32,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    /// `None`: tied to `embed_tokens` (all released Gemma 3 models).
    lm_head: Option<Linear>,
    rope_local: Rope,
    rope_global: Rope,
    /// How caches made by `new_cache` store keys and values (f32 unless set).
    cache_type: CacheType,
}

/// Tensor names of one checkpoint layout.
struct Names {
    layout: WeightLayout,
}

impl Names {
    fn embed(&self) -> String {
        match self.layout {
            WeightLayout::Gguf => "token_embd.weight".into(),
            WeightLayout::HuggingFace { prefix } => format!("{prefix}embed_tokens.weight"),
        }
    }
    fn final_norm(&self) -> String {
        match self.layout {
            WeightLayout::Gguf => "output_norm.weight".into(),
            WeightLayout::HuggingFace { prefix } => format!("{prefix}norm.weight"),
        }
    }
    fn lm_head(&self) -> String {
        match self.layout {
            WeightLayout::Gguf => "output.weight".into(),
            WeightLayout::HuggingFace { .. } => "lm_head.weight".into(),
        }
    }
    /// `hf` is the transformers suffix inside `layers.N.`; the GGUF name is derived from it.
    fn layer(&self, i: usize, hf: &str) -> String {
        match self.layout {
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
                    other => unreachable!("no GGUF name for {other}"),
                };
                format!("blk.{i}.{gguf}.weight")
            }
        }
    }
}

impl Gemma3 {
    pub fn load(config: Gemma3Config, loader: &Loader<'_>) -> Result<Gemma3, ModelError> {
        config.validate()?;
        let c = &config;
        let n = Names {
            layout: loader.layout,
        };
        let (h, hd) = (c.hidden_size, c.head_dim);
        let q_dim = c.num_attention_heads * hd;
        let kv_dim = c.num_key_value_heads * hd;
        let embed_tokens = loader.linear(&n.embed(), c.vocab_size, h)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| -> Result<DecoderLayer, ModelError> {
                let lin = |name: &str, rows, cols| loader.linear(&n.layer(i, name), rows, cols);
                let norm = |name: &str, len| loader.gemma_norm(&n.layer(i, name), len);
                Ok(DecoderLayer {
                    self_attn: Attention {
                        q_proj: lin("self_attn.q_proj", q_dim, h)?,
                        k_proj: lin("self_attn.k_proj", kv_dim, h)?,
                        v_proj: lin("self_attn.v_proj", kv_dim, h)?,
                        o_proj: lin("self_attn.o_proj", h, q_dim)?,
                        q_norm: norm("self_attn.q_norm", hd)?,
                        k_norm: norm("self_attn.k_norm", hd)?,
                    },
                    mlp: Mlp {
                        gate_proj: lin("mlp.gate_proj", c.intermediate_size, h)?,
                        up_proj: lin("mlp.up_proj", c.intermediate_size, h)?,
                        down_proj: lin("mlp.down_proj", h, c.intermediate_size)?,
                    },
                    input_layernorm: norm("input_layernorm", h)?,
                    post_attention_layernorm: norm("post_attention_layernorm", h)?,
                    pre_feedforward_layernorm: norm("pre_feedforward_layernorm", h)?,
                    post_feedforward_layernorm: norm("post_feedforward_layernorm", h)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let lm_head = match loader.source.tensor(&n.lm_head()) {
            Some(_) => Some(loader.linear(&n.lm_head(), c.vocab_size, h)?),
            None => None,
        };
        // transformers multiplies by `sqrt(hidden)` cast to the embedding's dtype (bf16 turns
        // 25.298 into 25.25 for the 270M); llama.cpp scales GGUF embeddings by the f32 value.
        let scale = (h as f32).sqrt();
        let embed_scale = match (loader.layout, embed_tokens.dtype) {
            (WeightLayout::HuggingFace { .. }, gemma_formats::GgmlType::BF16) => {
                half::bf16::from_f32(scale).to_f32()
            }
            (WeightLayout::HuggingFace { .. }, gemma_formats::GgmlType::F16) => {
                half::f16::from_f32(scale).to_f32()
            }
            _ => scale,
        };
        Ok(Gemma3 {
            rope_local: Rope::new(hd, c.rope_local.theta, c.rope_local.linear_factor),
            rope_global: Rope::new(hd, c.rope_global.theta, c.rope_global.linear_factor),
            norm: loader.gemma_norm(&n.final_norm(), h)?,
            config,
            embed_tokens,
            embed_scale,
            layers,
            lm_head,
            cache_type: CacheType::F32,
        })
    }

    pub fn config(&self) -> &Gemma3Config {
        &self.config
    }

    /// Ring capacity per layer: the window for sliding layers, the context for global ones.
    fn kv_capacities(&self, ctx_size: usize) -> Vec<usize> {
        self.config
            .layer_types
            .iter()
            .map(|t| match t {
                LayerType::Sliding => self.config.sliding_window.min(ctx_size),
                LayerType::Full => ctx_size,
            })
            .collect()
    }

    fn kv_row(&self) -> usize {
        self.config.num_key_value_heads * self.config.head_dim
    }

    /// Storage format of the caches `new_cache` makes from now on (caches already made keep
    /// theirs). Q8_0 needs a head dimension that is a multiple of 32.
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
        if ctx_size == 0 {
            return Err(ModelError::Config("context size must be at least 1".into()));
        }
        KvCache::new(
            ctx_size,
            &self.kv_capacities(ctx_size),
            self.kv_row(),
            self.cache_type,
        )
    }

    pub fn kv_cache_bytes(&self, ctx_size: usize) -> usize {
        KvCache::bytes_for(
            &self.kv_capacities(ctx_size),
            self.kv_row(),
            self.cache_type,
        )
    }

    pub fn weight_bytes(&self) -> usize {
        let layer_bytes = |l: &DecoderLayer| {
            let a = &l.self_attn;
            let m = &l.mlp;
            [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]
            .iter()
            .map(|w| w.bytes())
            .sum::<usize>()
        };
        self.embed_tokens.bytes()
            + self.lm_head.as_ref().map_or(0, Linear::bytes)
            + self.layers.iter().map(layer_bytes).sum::<usize>()
    }

    /// Runs `tokens` (positions `cache.len()..`) through the decoder, appends their keys and
    /// values to `cache`, and returns logits for the last token or for every token.
    pub fn forward<'c>(
        &self,
        tokens: &[u32],
        cache: &'c mut KvCache,
        logits: Logits,
    ) -> Result<&'c [f32], ModelError> {
        self.forward_embeds(tokens, &[], cache, logits)
    }

    /// [`Gemma3::forward`] with some positions' embeddings replaced by `soft` (image soft
    /// tokens), which may attend to their own run in both directions.
    pub fn forward_embeds<'c>(
        &self,
        tokens: &[u32],
        soft: &[SoftTokens<'_>],
        cache: &'c mut KvCache,
        logits: Logits,
    ) -> Result<&'c [f32], ModelError> {
        let mut scratch = std::mem::take(&mut cache.scratch);
        let result = self.run(
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
        Ok(&cache.scratch.logits[..n_rows * self.config.vocab_size])
    }

    /// Runs the new tokens of several sequences in one pass (the matmuls are shared, attention
    /// stays per sequence) and writes each sequence's last-token logits, in order, to
    /// `logits_out` (`seqs.len() × vocab_size` values).
    pub fn forward_batch(
        &self,
        seqs: &mut [SeqStep<'_>],
        logits_out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let Some(first) = seqs.first_mut() else {
            logits_out.clear();
            return Ok(());
        };
        let mut scratch = std::mem::take(&mut first.cache.scratch);
        let result = self.run(seqs, &mut scratch, Logits::Last);
        if result.is_ok() {
            logits_out.clear();
            logits_out.extend_from_slice(&scratch.logits[..seqs.len() * self.config.vocab_size]);
        }
        seqs[0].cache.scratch = scratch;
        result.map(|_| ())
    }

    /// The forward pass over a batch of sequences. Tokens of all sequences are stacked row after
    /// row; only attention and the KV cache are per sequence. Leaves logits in `scratch.logits`
    /// (per sequence: its last row, or every row for `Logits::All`) and returns how many rows.
    fn run(
        &self,
        seqs: &mut [SeqStep<'_>],
        scratch: &mut Scratch,
        logits: Logits,
    ) -> Result<usize, ModelError> {
        let c = &self.config;
        // Check everything before touching any cache, so a rejected batch changes nothing.
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(ModelError::Config(
                    "forward needs at least one token".into(),
                ));
            }
            check_soft_tokens(s.soft, s.tokens.len(), c.hidden_size)?;
            // A replaced position's id is a placeholder and never looked up.
            let out_of_range = s.tokens.iter().enumerate().find(|&(i, &id)| {
                id as usize >= c.vocab_size && !is_soft(s.soft, c.hidden_size, i)
            });
            if let Some((_, &id)) = out_of_range {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab: c.vocab_size,
                });
            }
            s.cache.reserve(s.tokens.len())?;
        }
        let pool = ThreadPool::global();
        let n_tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let (h, hd) = (c.hidden_size, c.head_dim);
        let q_dim = c.num_attention_heads * hd;
        let kv_dim = self.kv_row();
        let ffn = c.intermediate_size;

        // Embedding lookup, scaled by sqrt(hidden); soft tokens are taken as they are (the
        // reference scatters the projector's output over the scaled embeddings, unscaled).
        let x = sized(&mut scratch.x, n_tokens * h);
        let embed = self.embed_tokens.matrix();
        let mut rows = x.chunks_exact_mut(h);
        for s in seqs.iter() {
            let mut soft = s.soft.iter().peekable();
            let mut t = 0;
            while t < s.tokens.len() {
                if let Some(run) = soft.next_if(|r| r.offset == t) {
                    for src in run.embeds.chunks_exact(h) {
                        rows.next().expect("one row per token").copy_from_slice(src);
                    }
                    t = run.rows(h).end;
                    continue;
                }
                let row = rows.next().expect("one row per token");
                matmul::dequantize_row(&embed, s.tokens[t] as usize, row);
                ops::scale_inplace(row, self.embed_scale);
                t += 1;
            }
        }
        // Each sequence's bidirectional runs, as absolute positions.
        let spans: Vec<Vec<std::ops::Range<usize>>> = seqs
            .iter()
            .map(|s| {
                let pos0 = s.cache.len();
                s.soft
                    .iter()
                    .filter(|r| r.bidirectional)
                    .map(|r| {
                        let rows = r.rows(h);
                        pos0 + rows.start..pos0 + rows.end
                    })
                    .collect()
            })
            .collect();

        // Each token's rotations, shared by all layers of a kind.
        let rot_local = sized(&mut scratch.rope_local, n_tokens * hd);
        let rot_global = sized(&mut scratch.rope_global, n_tokens * hd);
        let positions = seqs
            .iter()
            .flat_map(|s| (0..s.tokens.len()).map(|t| s.cache.len() + t));
        for ((pos, local), global) in positions
            .zip(rot_local.chunks_exact_mut(hd))
            .zip(rot_global.chunks_exact_mut(hd))
        {
            self.rope_local.rotation(pos, local);
            self.rope_global.rotation(pos, global);
        }

        let scale = c.query_pre_attn_scalar.powf(-0.5);
        for (i, layer) in self.layers.iter().enumerate() {
            let attn_params = AttentionParams {
                n_heads: c.num_attention_heads,
                n_kv_heads: c.num_key_value_heads,
                head_dim: hd,
                scale,
                softcap: c.attn_logit_softcapping,
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
            let a = &layer.self_attn;

            // Attention block: x += post_norm(o_proj(attn(rope(norm(q)), rope(norm(k)), v))).
            let normed = sized(&mut scratch.normed, n_tokens * h);
            normed.copy_from_slice(x);
            ops::rms_norm_inplace(normed, &layer.input_layernorm, c.rms_norm_eps);
            let q = sized(&mut scratch.q, n_tokens * q_dim);
            let k = sized(&mut scratch.k, n_tokens * kv_dim);
            let v = sized(&mut scratch.v, n_tokens * kv_dim);
            linear_shared_input(
                pool,
                [&a.q_proj, &a.k_proj, &a.v_proj],
                normed,
                n_tokens,
                [&mut *q, &mut *k, &mut *v],
                &mut scratch.quantized,
            );
            ops::rms_norm_inplace(q, &a.q_norm, c.rms_norm_eps);
            ops::rms_norm_inplace(k, &a.k_norm, c.rms_norm_eps);
            let attn_out = sized(&mut scratch.attn, n_tokens * q_dim);
            let mut row = 0;
            for (s, spans) in seqs.iter_mut().zip(&spans) {
                let (n, pos0) = (s.tokens.len(), s.cache.len());
                let q = &mut q[row * q_dim..(row + n) * q_dim];
                let k = &mut k[row * kv_dim..(row + n) * kv_dim];
                let v = &mut v[row * kv_dim..(row + n) * kv_dim];
                for t in 0..n {
                    let rotation = &rotations[(row + t) * hd..(row + t + 1) * hd];
                    rope.apply_rotation(&mut q[t * q_dim..(t + 1) * q_dim], rotation);
                    rope.apply_rotation(&mut k[t * kv_dim..(t + 1) * kv_dim], rotation);
                }
                let kv = &mut s.cache.layers[i];
                kv.round_to_storage(k);
                kv.round_to_storage(v);
                {
                    let fresh = KvSegment {
                        keys: (&*k).into(),
                        values: (&*v).into(),
                        first_pos: pos0,
                        len: n,
                    };
                    // Cached history (at most two ring segments) followed by this chunk's keys.
                    let mut segments = [fresh; 3];
                    let mut n_segments = 0;
                    for seg in kv.segments(pos0) {
                        segments[n_segments] = seg;
                        n_segments += 1;
                    }
                    segments[n_segments] = fresh;
                    let out = &mut attn_out[row * q_dim..(row + n) * q_dim];
                    let segments = &segments[..=n_segments];
                    attention_spans(pool, &attn_params, q, pos0, segments, spans, out);
                }
                kv.write(pos0, k, v);
                row += n;
            }
            let proj = sized(&mut scratch.proj, n_tokens * h);
            linear(
                pool,
                &a.o_proj,
                attn_out,
                n_tokens,
                proj,
                &mut scratch.quantized,
            );
            ops::rms_norm_inplace(proj, &layer.post_attention_layernorm, c.rms_norm_eps);
            ops::add_inplace(x, proj);

            // MLP block: x += post_norm(down(gelu_tanh(gate(norm(x))) * up(norm(x)))).
            let m = &layer.mlp;
            normed.copy_from_slice(x);
            ops::rms_norm_inplace(normed, &layer.pre_feedforward_layernorm, c.rms_norm_eps);
            let gate = sized(&mut scratch.gate, n_tokens * ffn);
            let up = sized(&mut scratch.up, n_tokens * ffn);
            linear_shared_input(
                pool,
                [&m.gate_proj, &m.up_proj],
                normed,
                n_tokens,
                [&mut *gate, &mut *up],
                &mut scratch.quantized,
            );
            ops::gelu_tanh_mul_parallel(pool, gate, up);
            linear(
                pool,
                &m.down_proj,
                gate,
                n_tokens,
                proj,
                &mut scratch.quantized,
            );
            ops::rms_norm_inplace(proj, &layer.post_feedforward_layernorm, c.rms_norm_eps);
            ops::add_inplace(x, proj);
            // Cheap next to the layer's matmuls, and it names where a broken checkpoint breaks.
            if !ops::all_finite(x) {
                return Err(ModelError::NonFinite {
                    where_: format!("layer {i}"),
                });
            }
        }
        for s in seqs.iter_mut() {
            s.cache.advance(s.tokens.len());
        }

        // Gather the rows whose logits are wanted, then final norm and LM head on those only.
        let mut n_rows = 0;
        let mut row = 0;
        for s in seqs.iter() {
            let n = s.tokens.len();
            let wanted = match logits {
                Logits::Last => row + n - 1..row + n,
                Logits::All => row..row + n,
            };
            for r in wanted {
                scratch.x.copy_within(r * h..(r + 1) * h, n_rows * h);
                n_rows += 1;
            }
            row += n;
        }
        let hidden = &mut scratch.x[..n_rows * h];
        ops::rms_norm_inplace(hidden, &self.norm, c.rms_norm_eps);
        let out = sized(&mut scratch.logits, n_rows * c.vocab_size);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        linear(pool, head, hidden, n_rows, out, &mut scratch.quantized);
        if let Some(cap) = c.final_logit_softcapping {
            ops::softcap_inplace(out, cap);
        }
        if !ops::all_finite(out) {
            return Err(ModelError::NonFinite {
                where_: "the LM head (the logits)".into(),
            });
        }
        Ok(n_rows)
    }

    pub fn describe(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let n_global = c
            .layer_types
            .iter()
            .filter(|t| **t == LayerType::Full)
            .count();
        vec![
            ("vocab_size".into(), c.vocab_size.to_string()),
            ("hidden_size".into(), c.hidden_size.to_string()),
            ("layers".into(), c.num_hidden_layers.to_string()),
            (
                "layer pattern".into(),
                format!(
                    "{} sliding (window {}), {} global",
                    c.num_hidden_layers - n_global,
                    c.sliding_window,
                    n_global
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
                "query_pre_attn_scalar".into(),
                c.query_pre_attn_scalar.to_string(),
            ),
            ("ffn".into(), c.intermediate_size.to_string()),
            (
                "rope".into(),
                format!(
                    "local theta {}, global theta {} (linear factor {})",
                    c.rope_local.theta, c.rope_global.theta, c.rope_global.linear_factor
                ),
            ),
            ("rms_norm_eps".into(), c.rms_norm_eps.to_string()),
            (
                "context_length".into(),
                c.max_position_embeddings.to_string(),
            ),
            ("embed_scale".into(), self.embed_scale.to_string()),
            (
                "lm_head".into(),
                if self.lm_head.is_some() {
                    "separate".into()
                } else {
                    "tied to embeddings".into()
                },
            ),
        ]
    }
}
