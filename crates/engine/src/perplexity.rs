//! Perplexity with the same definition as llama.cpp's `llama-perplexity`, so numbers can be
//! compared directly:
//!
//! - the whole text is tokenized once (with BOS when the tokenizer adds one);
//! - it is cut into `n_chunk = n_tokens / n_ctx` chunks of `n_ctx` tokens (the rest is unused),
//!   and at least two chunks' worth of tokens are required;
//! - each chunk is evaluated from an empty cache with its first token replaced by BOS;
//! - only the second half is scored: the logits at positions `n_ctx/2 .. n_ctx-2` predict the
//!   tokens at `n_ctx/2+1 .. n_ctx-1`, so the model always has at least half a window of context;
//! - PPL = exp(mean negative log-likelihood over all scored tokens).

use anyhow::{bail, Result};
use gemma_models::{KvCache, Logits, Model};

use crate::load::LoadedModel;

/// Logits are requested for this many positions at a time while scoring (each position is a
/// whole vocabulary of floats).
const SCORE_BATCH: usize = 32;

#[derive(Clone, Debug, PartialEq)]
pub struct PerplexityResult {
    pub ppl: f64,
    /// Standard error of the PPL estimate, as llama.cpp prints after `+/-`.
    pub ppl_std_err: f64,
    pub chunks: usize,
    pub scored_tokens: usize,
    pub total_tokens: usize,
}

/// Progress after each chunk: (chunks done, chunks total, PPL so far).
pub type ChunkProgress<'a> = &'a mut dyn FnMut(usize, usize, f64);

/// Tokenizes `text` and computes its perplexity with chunks of `n_ctx` tokens.
pub fn perplexity(
    loaded: &LoadedModel,
    text: &str,
    n_ctx: usize,
    progress: ChunkProgress<'_>,
) -> Result<PerplexityResult> {
    let Some(tokenizer) = loaded.tokenizer.as_ref() else {
        bail!("perplexity needs a tokenizer, and this model has none");
    };
    let tokens = tokenizer.encode(text, tokenizer.add_bos_default(), false)?;
    let bos = if tokenizer.add_bos_default() {
        loaded.bos_id()
    } else {
        None
    };
    let mut eval = ModelEvaluator {
        model: &loaded.model,
        cache: loaded.model.new_cache(n_ctx)?,
        batch_size: loaded.batch_size.max(1),
        logits: Vec::new(),
    };
    perplexity_of_tokens(&mut eval, &tokens, n_ctx, bos, progress)
}

/// What perplexity needs from a model; a trait so the bookkeeping can be tested with a fake.
pub(crate) trait Evaluator {
    fn vocab_size(&self) -> usize;
    /// Starts a new sequence.
    fn clear(&mut self);
    /// Feeds `tokens` after the ones already fed; returns logits for all of them, or only
    /// the last one when `all` is false.
    fn eval(&mut self, tokens: &[u32], all: bool) -> Result<&[f32]>;
}

struct ModelEvaluator<'m> {
    model: &'m Model,
    cache: KvCache,
    /// Tokens per forward pass (`--batch-size`).
    batch_size: usize,
    /// Logits gathered across passes when a request spans several.
    logits: Vec<f32>,
}

impl Evaluator for ModelEvaluator<'_> {
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    fn clear(&mut self) {
        self.cache.clear();
    }

    fn eval(&mut self, tokens: &[u32], all: bool) -> Result<&[f32]> {
        let which = if all { Logits::All } else { Logits::Last };
        if tokens.len() <= self.batch_size {
            return Ok(self.model.forward(tokens, &mut self.cache, which)?);
        }
        self.logits.clear();
        let mut pieces = tokens.chunks(self.batch_size).peekable();
        while let Some(piece) = pieces.next() {
            let last_piece = pieces.peek().is_none();
            let logits = self.model.forward(piece, &mut self.cache, which)?;
            if all || last_piece {
                self.logits.extend_from_slice(logits);
            }
        }
        Ok(&self.logits)
    }
}

pub(crate) fn perplexity_of_tokens(
    eval: &mut dyn Evaluator,
    tokens: &[u32],
    n_ctx: usize,
    bos: Option<u32>,
    progress: ChunkProgress<'_>,
) -> Result<PerplexityResult> {
    if n_ctx < 4 {
        bail!("the perplexity context must be at least 4 tokens, got {n_ctx}");
    }
    if tokens.len() < 2 * n_ctx {
        bail!(
            "perplexity with a context of {n_ctx} needs at least {} tokens, but the text has only {}",
            2 * n_ctx,
            tokens.len()
        );
    }
    let vocab = eval.vocab_size();
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary ({vocab} tokens)");
    }
    let n_chunks = tokens.len() / n_ctx;
    let first = n_ctx / 2;
    let mut nll_sum = 0.0f64;
    let mut nll_sq_sum = 0.0f64;
    let mut count = 0usize;
    let mut chunk = vec![0u32; n_ctx];
    for index in 0..n_chunks {
        chunk.copy_from_slice(&tokens[index * n_ctx..(index + 1) * n_ctx]);
        if let Some(bos) = bos {
            chunk[0] = bos;
        }
        eval.clear();
        // The first half only builds context; its logits are not needed.
        eval.eval(&chunk[..first], false)?;
        // Positions first..n_ctx-1 are fed; position p's logits predict token p + 1. The last
        // token is never fed because nothing after it is scored.
        let mut pos = first;
        while pos < n_ctx - 1 {
            let end = (pos + SCORE_BATCH).min(n_ctx - 1);
            let logits = eval.eval(&chunk[pos..end], true)?;
            for (row, target_pos) in (pos + 1..=end).enumerate() {
                let row_logits = &logits[row * vocab..(row + 1) * vocab];
                let nll = negative_log_likelihood(row_logits, chunk[target_pos] as usize);
                nll_sum += nll;
                nll_sq_sum += nll * nll;
                count += 1;
            }
            pos = end;
        }
        progress(index + 1, n_chunks, (nll_sum / count as f64).exp());
    }
    let mean = nll_sum / count as f64;
    let ppl = mean.exp();
    // Standard error of the mean NLL, carried to PPL (d exp(x) = exp(x) dx), as llama.cpp does.
    let variance = nll_sq_sum / count as f64 - mean * mean;
    let std_err = if variance > 0.0 && count > 1 {
        (variance / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(PerplexityResult {
        ppl,
        ppl_std_err: std_err,
        chunks: n_chunks,
        scored_tokens: count,
        total_tokens: tokens.len(),
    })
}

/// `-log softmax(logits)[target]`, computed stably in f64.
fn negative_log_likelihood(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - logits[target] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake model over a vocabulary of `vocab`: it predicts "previous token + 1" with logit
    /// `confidence` (others 0), and records every token it is fed.
    struct CountingModel {
        vocab: usize,
        confidence: f32,
        fed: Vec<Vec<u32>>,
        out: Vec<f32>,
    }

    impl CountingModel {
        fn new(vocab: usize, confidence: f32) -> Self {
            CountingModel {
                vocab,
                confidence,
                fed: Vec::new(),
                out: Vec::new(),
            }
        }
    }

    impl Evaluator for CountingModel {
        fn vocab_size(&self) -> usize {
            self.vocab
        }
        fn clear(&mut self) {
            self.fed.push(Vec::new());
        }
        fn eval(&mut self, tokens: &[u32], all: bool) -> Result<&[f32]> {
            self.fed.last_mut().unwrap().extend_from_slice(tokens);
            let rows: &[u32] = if all {
                tokens
            } else {
                &tokens[tokens.len() - 1..]
            };
            self.out.clear();
            for &t in rows {
                let mut row = vec![0.0f32; self.vocab];
                row[(t as usize + 1) % self.vocab] = self.confidence;
                self.out.extend_from_slice(&row);
            }
            Ok(&self.out)
        }
    }

    fn counting_tokens(n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|i| (i % vocab) as u32).collect()
    }

    #[test]
    fn a_clueless_model_has_perplexity_equal_to_the_vocabulary() {
        let tokens = counting_tokens(100, 10);
        let mut model = CountingModel::new(10, 0.0);
        let r = perplexity_of_tokens(&mut model, &tokens, 16, Some(7), &mut |_, _, _| {}).unwrap();
        assert!((r.ppl - 10.0).abs() < 1e-9, "ppl {}", r.ppl);
    }

    #[test]
    fn scores_the_second_half_of_each_full_chunk() {
        let n_ctx = 16;
        let tokens = counting_tokens(100, 10);
        let mut model = CountingModel::new(10, 3.0);
        let mut seen = Vec::new();
        let r = perplexity_of_tokens(
            &mut model,
            &tokens,
            n_ctx,
            Some(7),
            &mut |done, total, _| seen.push((done, total)),
        )
        .unwrap();
        // 100 / 16 = 6 chunks, each scoring positions 9..=15 (n_ctx - n_ctx/2 - 1 = 7 tokens).
        assert_eq!(r.chunks, 6);
        assert_eq!(r.scored_tokens, 6 * 7);
        assert_eq!(r.total_tokens, 100);
        assert_eq!(seen, (1..=6).map(|d| (d, 6)).collect::<Vec<_>>());
        // Every scored token is "previous + 1", which the model predicts with logit 3:
        // p = e^3 / (e^3 + 9).
        let want = -(3f64.exp() / (3f64.exp() + 9.0)).ln();
        assert!((r.ppl.ln() - want).abs() < 1e-9);
    }

    #[test]
    fn each_chunk_starts_with_bos_from_a_clear_cache() {
        let n_ctx = 8;
        let tokens = counting_tokens(20, 10);
        let mut model = CountingModel::new(10, 1.0);
        perplexity_of_tokens(&mut model, &tokens, n_ctx, Some(9), &mut |_, _, _| {}).unwrap();
        assert_eq!(model.fed.len(), 2);
        for (i, fed) in model.fed.iter().enumerate() {
            let mut want: Vec<u32> = tokens[i * n_ctx..(i + 1) * n_ctx - 1].to_vec();
            want[0] = 9;
            assert_eq!(fed, &want, "chunk {i}");
        }
    }

    #[test]
    fn too_short_a_text_is_an_error_naming_both_counts() {
        let mut model = CountingModel::new(10, 1.0);
        let err = perplexity_of_tokens(&mut model, &[1; 30], 16, None, &mut |_, _, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("32") && err.contains("30"), "{err}");
    }

    #[test]
    fn nll_matches_the_definition() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let want = -((2.0f64).exp() / z).ln();
        assert!((negative_log_likelihood(&logits, 1) - want).abs() < 1e-12);
    }
}
