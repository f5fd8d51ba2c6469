//! `gemma bench`: prompt-processing and generation speed, reported like llama.cpp's
//! `llama-bench` (same flags, same test names, mean ± standard deviation over repetitions).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma_engine::gemma_formats::TensorSource;
use gemma_engine::gemma_models::{Logits, Model};
use gemma_engine::{LoadOptions, LoadedModel};

use crate::CommonArgs;

#[derive(Args)]
pub struct BenchArgs {
    /// Model file (as llama-bench's -m; same as the global --model)
    #[arg(short = 'm', value_name = "PATH")]
    pub model_file: Option<std::path::PathBuf>,
    /// Prompt lengths to process, comma separated (0 = no prompt test)
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Tokens to generate one at a time, comma separated (0 = no generation test)
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Tokens already in the context before each test (not timed), comma separated
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub depth: Vec<usize>,
    /// Threads (as llama-bench's -t; one value per run, like the global --threads)
    #[arg(short = 't', value_name = "N")]
    pub bench_threads: Option<usize>,
    /// Repetitions of each test
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub repetitions: usize,
    /// Prompt tokens per forward pass
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch_size: usize,
    /// Print a JSON array instead of the table
    #[arg(long)]
    pub json: bool,
    /// Also measure the machine's plain memory-read bandwidth on the same threads (1 GiB, best
    /// of 5) and report each generation test as a fraction of the limit it sets: weight bytes
    /// read per token over that bandwidth
    #[arg(long)]
    pub read_bandwidth: bool,
}

/// One row of the report.
struct TestResult {
    name: String,
    n_prompt: usize,
    n_gen: usize,
    depth: usize,
    samples_ts: Vec<f64>,
}

impl TestResult {
    fn mean(&self) -> f64 {
        self.samples_ts.iter().sum::<f64>() / self.samples_ts.len().max(1) as f64
    }

    /// Sample standard deviation (n - 1), as llama-bench reports.
    fn stddev(&self) -> f64 {
        let n = self.samples_ts.len();
        if n < 2 {
            return 0.0;
        }
        let mean = self.mean();
        let var = self
            .samples_ts
            .iter()
            .map(|s| (s - mean).powi(2))
            .sum::<f64>()
            / (n - 1) as f64;
        var.sqrt()
    }
}

/// Threads the kernels' pool will use (`GEMMA_THREADS`, set by `main` from `--threads`/`-t`).
fn configured_threads() -> usize {
    std::env::var("GEMMA_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs the benchmark. `-t` is applied by `main` (as `--threads`) before the pool starts.
pub fn bench(common: &CommonArgs, args: &BenchArgs) -> Result<()> {
    if args.repetitions == 0 {
        bail!("-r must be at least 1");
    }
    if args.batch_size == 0 {
        bail!("-b must be at least 1");
    }
    let tests = plan(args);
    if tests.is_empty() {
        bail!("nothing to run: every -p and -n value is 0");
    }
    let needed = tests.iter().map(|(p, g, d)| p + g + d).max().unwrap_or(0);
    let ctx_size = needed.max(1);
    let model_path = args.model_file.as_deref().or(common.model.as_deref());
    let opts = LoadOptions {
        ctx_size,
        verbose: !common.quiet && !args.json,
        batch_size: args.batch_size,
        ..common.load_options()
    };
    let loaded = gemma_engine::load_with_matformer(model_path, &opts, common.matformer.as_deref())?;
    let trained = loaded.model.context_length();
    if trained > 0 && ctx_size > trained {
        bail!(
            "a test needs {ctx_size} positions (prompt + generation + depth), above the model's \
             trained context of {trained}"
        );
    }
    let threads = configured_threads();
    let model_name = model_path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "default (gemma-3-270m-q4_k_m.gguf)".into());

    let bytes_per_token = weight_bytes_per_token(&loaded);
    let bandwidth = if args.read_bandwidth {
        Some(measure_read_bandwidth()?)
    } else {
        None
    };
    if let (Some(bw), false) = (bandwidth, args.json) {
        println!(
            "read bandwidth: {:.2} GB/s on {threads} thread(s); weights read per generated token: \
             {:.1} MB",
            bw / 1e9,
            bytes_per_token as f64 / 1e6
        );
    }
    // Tokens/s a generation test would reach if reading the weights were all it did.
    let limit = bandwidth.map(|bw| bw / bytes_per_token.max(1) as f64);

    let mut results = Vec::new();
    for &(n_prompt, n_gen, depth) in &tests {
        let mut result = TestResult {
            name: test_name(n_prompt, n_gen, depth),
            n_prompt,
            n_gen,
            depth,
            samples_ts: Vec::new(),
        };
        // One untimed warm-up run, then the measured repetitions.
        for rep in 0..=args.repetitions {
            let seconds = run_once(&loaded, ctx_size, n_prompt, n_gen, depth, args.batch_size)?;
            if rep > 0 {
                result.samples_ts.push((n_prompt + n_gen) as f64 / seconds);
            }
        }
        if !args.json {
            if results.is_empty() {
                println!("| model | threads | test | t/s |");
                println!("| --- | ---: | ---: | ---: |");
            }
            let fraction = match limit {
                Some(limit) if n_gen > 0 => {
                    format!(
                        " ({:.0} % of the bandwidth limit)",
                        100.0 * result.mean() / limit
                    )
                }
                _ => String::new(),
            };
            println!(
                "| {model_name} | {threads} | {} | {:.2} ± {:.2}{fraction} |",
                result.name,
                result.mean(),
                result.stddev()
            );
        }
        results.push(result);
    }
    if args.json {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                let mut row = serde_json::json!({
                    "model_filename": model_name,
                    "test": r.name,
                    "n_prompt": r.n_prompt,
                    "n_gen": r.n_gen,
                    "n_depth": r.depth,
                    "n_batch": args.batch_size,
                    "threads": threads,
                    "repetitions": args.repetitions,
                    "tokens_per_second": r.mean(),
                    "avg_ts": r.mean(),
                    "stddev_ts": r.stddev(),
                    "samples_ts": r.samples_ts,
                    "weight_bytes_per_token": bytes_per_token,
                });
                if let Some(bw) = bandwidth {
                    row["read_bandwidth_bytes_per_s"] = bw.into();
                }
                if let (Some(limit), true) = (limit, r.n_gen > 0) {
                    row["fraction_of_bandwidth_limit"] = (r.mean() / limit).into();
                }
                row
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}

/// Bytes of weights one generated token reads: every tensor, except the tables read a row per
/// token (the token embedding when the model has a separate output matrix, Gemma 3n's per-layer
/// embeddings) and any vision or audio tower. The KV cache read at depth is not counted.
fn weight_bytes_per_token(loaded: &LoadedModel) -> usize {
    let names = loaded.file.tensor_names();
    let untied = names
        .iter()
        .any(|n| n == "output.weight" || n.ends_with("lm_head.weight"));
    let row_tables = |name: &str| {
        name.contains("per_layer_token_embd")
            || name.contains("embed_tokens_per_layer")
            || (untied && (name == "token_embd.weight" || name.ends_with("embed_tokens.weight")))
    };
    // GGUF mmproj prefixes and Hugging Face module names.
    let towers = |name: &str| {
        ["v.", "a.", "mm."].iter().any(|p| name.starts_with(p))
            || ["vision_tower", "audio_tower", "embed_vision", "embed_audio"]
                .iter()
                .any(|p| name.contains(p))
    };
    names
        .iter()
        .filter(|n| !row_tables(n) && !towers(n))
        .filter_map(|n| loaded.file.tensor(n).map(|t| t.data.len()))
        .sum()
}

/// Best plain read rate of 1 GiB in huge pages (as the engine holds weights) on the pool.
fn measure_read_bandwidth() -> Result<f64> {
    use gemma_engine::gemma_formats::HugePageBytes;
    use gemma_engine::gemma_models::gemma_kernels::{membench, ThreadPool};
    let mut buffer = HugePageBytes::zeroed(1 << 30).context("cannot allocate 1 GiB to measure")?;
    // Written first so that every page is backed (a zero page would read from cache).
    for (i, b) in buffer.as_mut().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    Ok(membench::read_bandwidth(
        ThreadPool::global(),
        buffer.as_ref(),
        5,
    ))
}

/// (prompt, generation, depth) triples in llama-bench's order: every pp test, then every tg
/// test, each at every depth.
fn plan(args: &BenchArgs) -> Vec<(usize, usize, usize)> {
    let mut tests = Vec::new();
    for &p in args.n_prompt.iter().filter(|&&p| p > 0) {
        for &d in &args.depth {
            tests.push((p, 0, d));
        }
    }
    for &g in args.n_gen.iter().filter(|&&g| g > 0) {
        for &d in &args.depth {
            tests.push((0, g, d));
        }
    }
    tests
}

fn test_name(n_prompt: usize, n_gen: usize, depth: usize) -> String {
    let base = if n_prompt > 0 {
        format!("pp{n_prompt}")
    } else {
        format!("tg{n_gen}")
    };
    if depth > 0 {
        format!("{base} @ d{depth}")
    } else {
        base
    }
}

/// Deterministic token ids spread over the first `vocab` ids (llama-bench feeds random tokens).
/// The lowest ids are special tokens, so they are skipped: 1000 of a real vocabulary, a quarter
/// of a small one (test models), so every id is below `vocab` whatever its size.
fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let first = if vocab > 4000 { 1000 } else { vocab / 4 };
    let span = vocab.saturating_sub(first).max(1) as u64;
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (first as u64 + s % span) as u32
        })
        .collect()
}

/// Ids a text prompt may hold: Gemma 3n's vocabulary ends with image/audio ids that only their
/// own embedders take.
fn text_vocab(model: &Model) -> usize {
    let vocab = model.vocab_size();
    match model {
        Model::Gemma3n(g) => g
            .config()
            .first_multimodal_id
            .map_or(vocab, |m| m.min(vocab)),
        _ => vocab,
    }
}

/// Seconds for one repetition: fill `depth` tokens (untimed), then time `n_prompt` tokens in
/// batches or `n_gen` single-token steps.
fn run_once(
    loaded: &LoadedModel,
    ctx_size: usize,
    n_prompt: usize,
    n_gen: usize,
    depth: usize,
    batch: usize,
) -> Result<f64> {
    let model = &loaded.model;
    let vocab = text_vocab(model);
    let mut cache = model
        .new_cache(ctx_size)
        .context("cannot allocate the KV cache")?;
    for chunk in token_ids(depth, vocab, 1).chunks(batch) {
        model.forward(chunk, &mut cache, Logits::Last)?;
    }
    let start = Instant::now();
    if n_prompt > 0 {
        for chunk in token_ids(n_prompt, vocab, 2).chunks(batch) {
            model.forward(chunk, &mut cache, Logits::Last)?;
        }
    } else {
        let mut next = token_ids(1, vocab, 3)[0];
        for _ in 0..n_gen {
            let logits = model.forward(&[next], &mut cache, Logits::Last)?;
            // Greedy choice keeps the step realistic (the logits are read) and cheap.
            next = argmax(&logits[..vocab]);
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The first position of the largest logit (NaNs never win; 0 if nothing beats -inf).
fn argmax(logits: &[f32]) -> u32 {
    // The maximum over eight independent lanes (vectorized; a 262k vocabulary is scanned once
    // per generated token), then its first position.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_bench() {
        assert_eq!(test_name(512, 0, 0), "pp512");
        assert_eq!(test_name(0, 128, 4096), "tg128 @ d4096");
    }

    #[test]
    fn token_ids_fit_any_vocabulary() {
        for vocab in [1, 2, 5, 256, 4001, 262_144] {
            let ids = token_ids(500, vocab, 7);
            assert!(ids.iter().all(|&id| (id as usize) < vocab), "vocab {vocab}");
        }
        let ids = token_ids(500, 262_144, 7);
        assert!(ids.iter().all(|&id| id >= 1000), "special tokens skipped");
        assert!(
            ids.iter().any(|&id| id > 200_000),
            "spread over the vocabulary"
        );
        assert!(token_ids(500, 256, 7).iter().all(|&id| id >= 64));
        assert_eq!(token_ids(3, 256, 9), token_ids(3, 256, 9));
    }

    #[test]
    fn argmax_is_the_first_largest_finite_or_infinite_logit() {
        // Against the plain one-pass scan, on lengths around the 8-lane chunking.
        let scan = |l: &[f32]| {
            let mut best = 0;
            for (i, v) in l.iter().enumerate() {
                if *v > l[best] {
                    best = i;
                }
            }
            best as u32
        };
        for len in [1, 7, 8, 9, 17, 1000] {
            for peak in [0, len / 2, len - 1] {
                let mut l: Vec<f32> = (0..len).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
                l[peak] = 9.0;
                assert_eq!(argmax(&l), scan(&l), "len {len}, peak {peak}");
                l[len - 1] = 9.0; // a tie: the first one wins
                assert_eq!(argmax(&l), scan(&l), "len {len}, tie");
                l[0] = f32::NAN;
                let first_peak = l.iter().position(|&v| v == 9.0).unwrap_or(0) as u32;
                assert_eq!(argmax(&l), first_peak, "len {len}, NaN never wins");
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::INFINITY, 1.0]), 1);
    }

    #[test]
    fn stddev_is_the_sample_deviation() {
        let r = TestResult {
            name: String::new(),
            n_prompt: 1,
            n_gen: 0,
            depth: 0,
            samples_ts: vec![1.0, 2.0, 3.0],
        };
        assert_eq!(r.mean(), 2.0);
        assert!((r.stddev() - 1.0).abs() < 1e-12);
    }
}
