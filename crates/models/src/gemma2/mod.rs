//! Gemma 2 text decoder (2B, 9B, 27B, and the ShieldGemma classifiers built on them), read top
//! to bottom in `run`, as transformers' `Gemma2ForCausalLM` computes it.
//!
//! Quirks, each applied where it happens: embeddings scaled by `sqrt(hidden)`; RMSNorm
//! multiplies by `1 + w`; sandwich norms around attention and MLP; no q/k norms; scores scaled by
//! `query_pre_attn_scalar^-0.5` and soft-capped (`cap · tanh(s / cap)`) before the softmax;
//! sliding-window and global layers alternating as `layer_types` says, with one RoPE for all;
//! GELU-tanh gated MLP; LM head tied to the embedding; final logits soft-capped.
//!
//! What it shares with Gemma 3 (names, cache plan, embedding, attention over the cache, the
//! sandwich-norm blocks, output head) lives in `crate::decoder`.

mod config;

pub use config::{Gemma2Config, LayerType, RopeParams};

use gemma_kernels::ops::attention::{AttentionMask, AttentionParams};
use gemma_kernels::ops::kv::CacheType;
use gemma_kernels::ops::{self, Rope};
use gemma_kernels::pool::ThreadPool;

use crate::decoder::{
    bidirectional_spans, check_steps, embed_batch, embedding_scale, forward_many, forward_one,
    gather_logit_rows, positions, rotations, AttentionWeights, CachePlan, CachedAttention,
    GatedMlp, Names, OutputHead, SandwichAttention,
};
use crate::kv_cache::{sized, KvCache, Scratch, SeqStep, SoftTokens};
use crate::weights::{Linear, Loader};
use crate::{Logits, ModelError};

struct DecoderLayer {
    self_attn: AttentionWeights,
    mlp: GatedMlp,
    input_layernorm: Vec<f32>,
    post_attention_layernorm: Vec<f32>,
    pre_feedforward_layernorm: Vec<f32>,
    post_feedforward_layernorm: Vec<f32>,
}

pub struct Gemma2 {
    config: Gemma2Config,
    embed_tokens: Linear,
    /// `sqrt(hidden_size)`, rounded to the embedding's dtype as transformers rounds it.
    embed_scale: f32,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    /// `None`: tied to `embed_tokens` (all released Gemma 2 models).
    lm_head: Option<Linear>,
    rope: Rope,
    /// How caches made by `new_cache` store keys and values (f32 unless set).
    cache_type: CacheType,
}

/// Gemma 2's vocabulary: `<eos>` and `<end_of_turn>` (the generation config's stop list; Gemma
/// 3 moved `<end_of_turn>` to 106, which is Gemma 2's `<start_of_turn>`).
const EOS: u32 = 1;
const END_OF_TURN: u32 = 107;

impl Gemma2 {
    pub fn load(config: Gemma2Config, loader: &Loader<'_>) -> Result<Gemma2, ModelError> {
        config.validate()?;
        let c = &config;
        let n = Names {
            layout: loader.layout,
        };
        let (h, hd) = (c.hidden_size, c.head_dim);
        let q_dim = c.num_attention_heads * hd;
        let kv_dim = c.num_key_value_heads * hd;
        let embed_tokens = loader.linear(&n.top("embed_tokens"), c.vocab_size, h)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| -> Result<DecoderLayer, ModelError> {
                // `1 + w`: added here for transformers checkpoints, stored so by llama.cpp.
                let norm = |name: &str| loader.gemma_norm(&n.layer(i, name), h);
                Ok(DecoderLayer {
                    self_attn: AttentionWeights::load(loader, &n, i, h, q_dim, kv_dim)?,
                    mlp: GatedMlp::load(loader, &n, i, h, c.intermediate_size)?,
                    input_layernorm: norm("input_layernorm")?,
                    post_attention_layernorm: norm("post_attention_layernorm")?,
                    pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
                    post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Gemma2 {
            rope: Rope::new(hd, c.rope.theta, c.rope.linear_factor),
            norm: loader.gemma_norm(&n.top("norm"), h)?,
            lm_head: n.optional_lm_head(loader, c.vocab_size, h)?,
            // transformers casts `sqrt(hidden)` to the embedding's dtype (bf16 turns
            // sqrt(3584) = 59.87 into 60); llama.cpp uses the f32 value.
            embed_scale: embedding_scale(h, &embed_tokens, loader.layout),
            config,
            embed_tokens,
            layers,
            cache_type: CacheType::F32,
        })
    }

    pub fn config(&self) -> &Gemma2Config {
        &self.config
    }

    /// One ring per layer: the window for sliding layers, the context for global ones.
    fn cache_plan(&self) -> CachePlan<'_> {
        let c = &self.config;
        CachePlan {
            layer_types: &c.layer_types,
            sliding_window: c.sliding_window,
            row: c.num_key_value_heads * c.head_dim,
        }
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
        self.cache_plan().new_cache(ctx_size, self.cache_type)
    }

    pub fn kv_cache_bytes(&self, ctx_size: usize) -> usize {
        self.cache_plan().bytes(ctx_size, self.cache_type)
    }

    pub fn weight_bytes(&self) -> usize {
        let layer_bytes = |l: &DecoderLayer| l.self_attn.bytes() + l.mlp.bytes();
        self.embed_tokens.bytes()
            + self.lm_head.as_ref().map_or(0, Linear::bytes)
            + self.layers.iter().map(layer_bytes).sum::<usize>()
    }

    /// Tokens that end a generated turn, where the vocabulary has them.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        [EOS, END_OF_TURN]
            .into_iter()
            .filter(|&id| (id as usize) < self.config.vocab_size)
            .collect()
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

    /// [`Gemma2::forward`] with some positions' embeddings replaced by `soft` (rows taken as
    /// they are; Gemma 2 has no tower of its own, but callers may feed embeddings).
    pub fn forward_embeds<'c>(
        &self,
        tokens: &[u32],
        soft: &[SoftTokens<'_>],
        cache: &'c mut KvCache,
        logits: Logits,
    ) -> Result<&'c [f32], ModelError> {
        let run = |seqs: &mut [SeqStep<'_>], s: &mut Scratch, l| self.run(seqs, s, l);
        forward_one(run, self.config.vocab_size, tokens, soft, cache, logits)
    }

    /// Runs the new tokens of several sequences in one pass (matmuls shared, attention per
    /// sequence) and writes each one's last-token logits, in order, to `logits_out`.
    pub fn forward_batch(
        &self,
        seqs: &mut [SeqStep<'_>],
        logits_out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let run = |seqs: &mut [SeqStep<'_>], s: &mut Scratch, l| self.run(seqs, s, l);
        forward_many(run, self.config.vocab_size, seqs, logits_out)
    }

    /// The forward pass over a batch of sequences stacked row after row. Leaves logits in
    /// `scratch.logits` (per sequence: its last row, or every row for `Logits::All`) and
    /// returns how many rows.
    fn run(
        &self,
        seqs: &mut [SeqStep<'_>],
        scratch: &mut Scratch,
        logits: Logits,
    ) -> Result<usize, ModelError> {
        let c = &self.config;
        check_steps(seqs, c.vocab_size, c.hidden_size)?;
        let pool = ThreadPool::global();
        let n_tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let (h, hd) = (c.hidden_size, c.head_dim);

        // Embedding lookup, scaled by sqrt(hidden).
        let x = sized(&mut scratch.x, n_tokens * h);
        embed_batch(&self.embed_tokens, self.embed_scale, seqs, x);
        let spans = bidirectional_spans(seqs, h);

        // One RoPE for every layer, local or global: each token's rotation, computed once.
        let rotation = sized(&mut scratch.rope_global, n_tokens * hd);
        rotations(&self.rope, positions(seqs), rotation);

        for (i, layer) in self.layers.iter().enumerate() {
            // Attention block: x += post_norm(o_proj(attn(rope(q), rope(k), v))), q, k, v
            // projected from norm(x).
            let block = SandwichAttention {
                pre_norm: &layer.input_layernorm,
                post_norm: &layer.post_attention_layernorm,
                eps: c.rms_norm_eps,
                // Gemma 2 has no q/k norms.
                qk_norms: None,
                attention: CachedAttention {
                    params: AttentionParams {
                        n_heads: c.num_attention_heads,
                        n_kv_heads: c.num_key_value_heads,
                        head_dim: hd,
                        // query_pre_attn_scalar^-0.5, not head_dim^-0.5.
                        scale: c.query_pre_attn_scalar.powf(-0.5),
                        // cap · tanh(score / cap), before the mask and the softmax.
                        softcap: c.attn_logit_softcapping,
                        // Sliding or global as the config lists it, same RoPE either way.
                        mask: match c.layer_types[i] {
                            LayerType::Sliding => AttentionMask::SlidingWindow(c.sliding_window),
                            LayerType::Full => AttentionMask::Causal,
                        },
                        // The per-query kernel: see `AttentionParams::tiled` for why text
                        // stays on it.
                        tiled: false,
                    },
                    rope: &self.rope,
                    rotations: rotation,
                    layer: i,
                    spans: &spans,
                },
            };
            layer
                .self_attn
                .residual(pool, x, &block, seqs, &mut scratch.work);

            // MLP block: x += post_norm(down(gelu_tanh(gate(norm(x))) * up(norm(x)))).
            layer.mlp.residual(
                pool,
                x,
                &layer.pre_feedforward_layernorm,
                &layer.post_feedforward_layernorm,
                c.rms_norm_eps,
                &mut scratch.work,
            );
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

        // Final norm, LM head (tied to the embedding) and the final soft-cap
        // `cap · tanh(logit / cap)`, on the rows whose logits are wanted only.
        let n_rows = gather_logit_rows(seqs, logits, x, h);
        let head = OutputHead {
            norm: &self.norm,
            eps: c.rms_norm_eps,
            head: self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            softcap: c.final_logit_softcapping,
        };
        head.logits(
            pool,
            &mut x[..n_rows * h],
            &mut scratch.logits,
            &mut scratch.work.quantized,
        )?;
        Ok(n_rows)
    }

    pub fn describe(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let n_global = c
            .layer_types
            .iter()
            .filter(|t| **t == LayerType::Full)
            .count();
        let cap = |v: Option<f32>| v.map_or("off".to_string(), |v| v.to_string());
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
            (
                "soft-caps".into(),
                format!(
                    "attention {}, final {}",
                    cap(c.attn_logit_softcapping),
                    cap(c.final_logit_softcapping)
                ),
            ),
            ("ffn".into(), c.intermediate_size.to_string()),
            (
                "rope".into(),
                format!(
                    "theta {} (linear factor {})",
                    c.rope.theta, c.rope.linear_factor
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
