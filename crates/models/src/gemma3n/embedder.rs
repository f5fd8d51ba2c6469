//! `Gemma3nMultimodalEmbedder` (`embed_audio`, `embed_vision`): how a tower's output and the
//! tower's own "hard" token ids enter the text model's embedding space.
//!
//! - Soft tokens (a tower's output rows): `soft_embedding_norm` → `embedding_projection` →
//!   `embedding_post_projection_norm`.
//! - Hard ids (`vocab_offset ≤ id < vocab_offset + vocab_size`: `<end_of_audio>`, the padding of
//!   a clip, `<end_of_image>`): a row of the embedder's own table → `hard_embedding_norm` → the
//!   same projection and post norm. The text model's table has rows for these ids too, but the
//!   reference never reads them.
//!
//! Norms are Gemma 3n's RMSNorm (`w` as stored; the post norm has no weight) with the tower
//! config's `rms_norm_eps`. The output is not scaled by `sqrt(hidden)`.

use gemma_kernels::matmul;
use gemma_kernels::ops;
use gemma_kernels::pool::ThreadPool;

use crate::weights::{linear, Linear, Loader};
use crate::ModelError;

pub struct MultimodalEmbedder {
    /// First id of the embedder's vocabulary in the text vocabulary.
    pub vocab_offset: usize,
    pub vocab_size: usize,
    /// Width of the tower's output rows.
    pub hidden_size: usize,
    /// Width of the text model's embeddings.
    pub text_hidden_size: usize,
    eps: f32,
    embedding: Linear,
    hard_embedding_norm: Vec<f32>,
    soft_embedding_norm: Vec<f32>,
    /// `[text_hidden, hidden]`.
    embedding_projection: Linear,
}

impl MultimodalEmbedder {
    /// Loads the tensors under `prefix` (`model.embed_audio.` in the published checkpoints).
    pub fn load(
        loader: &Loader,
        prefix: &str,
        vocab_offset: usize,
        vocab_size: usize,
        hidden_size: usize,
        text_hidden_size: usize,
        eps: f32,
    ) -> Result<MultimodalEmbedder, ModelError> {
        if !eps.is_finite() || eps <= 0.0 {
            return Err(ModelError::Config(format!(
                "embedder rms_norm_eps {eps} must be positive"
            )));
        }
        let name = |n: &str| format!("{prefix}{n}");
        Ok(MultimodalEmbedder {
            vocab_offset,
            vocab_size,
            hidden_size,
            text_hidden_size,
            eps,
            embedding: loader.linear(&name("embedding.weight"), vocab_size, hidden_size)?,
            hard_embedding_norm: loader.vector(&name("hard_embedding_norm.weight"), hidden_size)?,
            soft_embedding_norm: loader.vector(&name("soft_embedding_norm.weight"), hidden_size)?,
            embedding_projection: loader.linear(
                &name("embedding_projection.weight"),
                text_hidden_size,
                hidden_size,
            )?,
        })
    }

    /// Whether `id` is one of this embedder's hard ids.
    pub fn covers(&self, id: u32) -> bool {
        (self.vocab_offset..self.vocab_offset + self.vocab_size).contains(&(id as usize))
    }

    /// Soft tokens: `n` rows of `hidden_size` → `n` rows of `text_hidden_size`.
    pub fn embed_soft(&self, rows: &[f32]) -> Vec<f32> {
        let n = rows.len() / self.hidden_size.max(1);
        let mut x = rows[..n * self.hidden_size].to_vec();
        ops::rms_norm_inplace(&mut x, &self.soft_embedding_norm, self.eps);
        self.project(x, n)
    }

    /// Hard ids → `ids.len()` rows of `text_hidden_size`.
    pub fn embed_hard(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let h = self.hidden_size;
        let mut x = vec![0.0; ids.len() * h];
        let table = self.embedding.matrix();
        for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
            if !self.covers(id) {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab: self.vocab_offset + self.vocab_size,
                });
            }
            matmul::dequantize_row(&table, id as usize - self.vocab_offset, row);
        }
        ops::rms_norm_inplace(&mut x, &self.hard_embedding_norm, self.eps);
        Ok(self.project(x, ids.len()))
    }

    fn project(&self, x: Vec<f32>, n: usize) -> Vec<f32> {
        let mut y = vec![0.0; n * self.text_hidden_size];
        let mut scratch = Vec::new();
        linear(
            ThreadPool::global(),
            &self.embedding_projection,
            &x,
            n,
            &mut y,
            &mut scratch,
        );
        ops::rms_norm_no_weight_inplace(&mut y, self.text_hidden_size, self.eps);
        y
    }

    /// Bytes of the embedder's weights.
    pub fn weight_bytes(&self) -> usize {
        self.embedding.bytes() + self.embedding_projection.bytes()
    }
}
