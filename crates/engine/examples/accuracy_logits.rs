//! gemma-rs's side of `scripts/accuracy_f64.py`: the real model's logits, with the default load
//! options (f16 KV cache, prompt pieces of 512 tokens), at chosen positions and token ids.
//!
//! `accuracy_logits tokenize MODEL.gguf PROMPTS.json`: one JSON line, `{"ids": [[...], ...]}`,
//! each prompt's `text` encoded by our tokenizer with BOS and special tokens (as
//! `gemma logits` and the real-model tests do).
//!
//! `accuracy_logits eval MODEL.gguf REQUEST.json`: REQUEST is
//! `{"cases": [{"ids": [...], "positions": [...], "candidates": [[id, ...], ...]}, ...]}`:
//! a position p asks for the logits that follow `ids[p]` (the prediction of token p + 1), at the
//! candidate ids listed for it (the reference's top-10). `positions` must be the last k
//! positions of `ids`, k < len. Prints one JSON line with, for each case, three runs:
//! - `prefill`: the whole prompt fed in pieces of the default batch size from position 0, as a
//!   session feeds a prompt, with every logit row of the pieces that hold asked positions
//!   (`Logits::All`);
//! - `prefill_last`: the same, asking only the last row (`Logits::Last`, what `gemma logits`
//!   and generation's first token use); only the last position;
//! - `decode`: `ids[..len - k]` prefilled (no logits), then each of the last k tokens fed alone
//!   (`Logits::Last`), as generation feeds its sampled tokens.
//!
//! `ACCURACY_CACHE=f32|q8_0` replaces the f16 cache (for diagnosis). Every matmul quantizes its
//! activations the same way whatever the number of tokens (one numeric path), so `prefill` and
//! `decode` differ only in attention's summation order and in which rows share a pass.
//!
//! For each position and run: the candidates' logits, the engine's own argmax and its logit, and
//! the row's log-sum-exp (for log-probabilities).

use std::path::Path;

use anyhow::{bail, Context, Result};
use gemma_engine::gemma_models::{CacheType, KvCache, Logits, Model};
use gemma_engine::{load, LoadOptions};
use serde_json::{json, Value};

const CTX: usize = 4096;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        bail!("usage: accuracy_logits tokenize|eval MODEL.gguf FILE.json");
    }
    let mut opts = LoadOptions::default();
    // For diagnosis only: ACCURACY_CACHE=f32|f16|q8_0 (default: the default, f16).
    match std::env::var("ACCURACY_CACHE").as_deref() {
        Ok("f32") => opts.cache_type = CacheType::F32,
        Ok("f16") | Err(_) => {}
        Ok("q8_0") => opts.cache_type = CacheType::Q8_0,
        Ok(other) => bail!("ACCURACY_CACHE={other}: f32, f16 or q8_0"),
    }
    let loaded = load(Some(Path::new(&args[2])), &opts)?;
    let input: Value = serde_json::from_str(&std::fs::read_to_string(&args[3])?)?;
    match args[1].as_str() {
        "tokenize" => {
            let tokenizer = loaded
                .tokenizer
                .as_ref()
                .context("the model has no tokenizer")?;
            let mut all = Vec::new();
            for p in input["prompts"].as_array().context("prompts")? {
                let text = p["text"].as_str().context("text")?;
                all.push(tokenizer.encode(text, true, true)?);
            }
            println!("{}", json!({ "ids": all }));
        }
        "eval" => {
            let mut out = Vec::new();
            for case in input["cases"].as_array().context("cases")? {
                out.push(eval_case(&loaded.model, opts.batch_size, case)?);
            }
            println!(
                "{}",
                json!({ "cache_type": opts.cache_type.to_string(), "batch_size": opts.batch_size, "cases": out })
            );
        }
        other => bail!("unknown command {other}"),
    }
    Ok(())
}

fn u32s(v: &Value) -> Result<Vec<u32>> {
    v.as_array()
        .context("expected an array")?
        .iter()
        .map(|x| x.as_u64().map(|x| x as u32).context("expected an id"))
        .collect()
}

/// The candidates' logits and the argmax of one row.
fn row_result(row: &[f32], candidates: &[u32]) -> Value {
    let best = (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
        .unwrap();
    let at: Vec<f32> = candidates.iter().map(|&c| row[c as usize]).collect();
    // log Σ exp, in f64, so the script can compare log-probabilities too.
    let max = row[best] as f64;
    let lse = max
        + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    json!({ "logits": at, "argmax": best, "argmax_logit": row[best], "logsumexp": lse })
}

fn eval_case(model: &Model, batch: usize, case: &Value) -> Result<Value> {
    let ids = u32s(&case["ids"])?;
    let positions: Vec<usize> = u32s(&case["positions"])?
        .into_iter()
        .map(|p| p as usize)
        .collect();
    let candidates: Vec<Vec<u32>> = case["candidates"]
        .as_array()
        .context("candidates")?
        .iter()
        .map(u32s)
        .collect::<Result<_>>()?;
    let n = ids.len();
    let k = positions.len();
    if k == 0 || k >= n || positions.iter().enumerate().any(|(i, &p)| p != n - k + i) {
        bail!("positions must be the last k < len positions");
    }
    let first = n - k;
    let vocab = model.vocab_size();

    // Prefill: pieces of `batch` from 0; all rows of the pieces that hold asked positions.
    let mut prefill = vec![Value::Null; k];
    let mut cache = model.new_cache(CTX)?;
    let mut start = 0;
    while start < n {
        let stop = (start + batch).min(n);
        let wanted = if stop > first {
            Logits::All
        } else {
            Logits::None
        };
        let logits = model.forward(&ids[start..stop], &mut cache, wanted)?;
        for p in start.max(first)..stop {
            let row = &logits[(p - start) * vocab..(p - start + 1) * vocab];
            prefill[p - first] = row_result(row, &candidates[p - first]);
        }
        start = stop;
    }

    // Prefill asking only the last row, as a session does.
    let mut cache = model.new_cache(CTX)?;
    let last = feed(model, &mut cache, &ids, batch)?;
    let prefill_last = row_result(last, &candidates[k - 1]);

    // Decode: the first n - k tokens prefilled, then one token per forward pass.
    let mut cache = model.new_cache(CTX)?;
    let mut start = 0;
    while start < first {
        let stop = (start + batch).min(first);
        model.forward(&ids[start..stop], &mut cache, Logits::None)?;
        start = stop;
    }
    let mut decode = Vec::with_capacity(k);
    for p in first..n {
        let row = model.forward(&ids[p..p + 1], &mut cache, Logits::Last)?;
        decode.push(row_result(row, &candidates[p - first]));
    }
    Ok(json!({ "prefill": prefill, "prefill_last": prefill_last, "decode": decode }))
}

/// Feeds `ids` in pieces of `batch` and returns the last row, as `Session::evaluate` does.
fn feed<'c>(model: &Model, cache: &'c mut KvCache, ids: &[u32], batch: usize) -> Result<&'c [f32]> {
    let mut start = 0;
    while start + batch < ids.len() {
        model.forward(&ids[start..start + batch], cache, Logits::None)?;
        start += batch;
    }
    Ok(model.forward(&ids[start..], cache, Logits::Last)?)
}
