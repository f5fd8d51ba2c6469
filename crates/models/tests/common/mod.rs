//! Helpers shared by the parity tests: the fixtures' `reference.json` and logit comparisons.

#![allow(dead_code)]

use std::path::Path;

use serde_json::Value;

/// What a fixture script recorded from transformers: the prompt, the logits at every position,
/// and the greedy continuation.
pub struct Reference {
    pub ids: Vec<u32>,
    pub vocab: usize,
    pub logits: Vec<Vec<f32>>,
    pub greedy: Vec<u32>,
}

impl Reference {
    /// `dir/reference.json`.
    pub fn read(dir: &Path) -> Reference {
        let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
        let v: Value = serde_json::from_str(&text).unwrap();
        let ids = |key: &str| -> Vec<u32> {
            v[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        Reference {
            ids: ids("input_ids"),
            vocab: v["vocab_size"].as_u64().unwrap() as usize,
            logits: v["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect()
                })
                .collect(),
            greedy: ids("greedy_continuation"),
        }
    }
}

/// Largest |difference| between two equally long logit vectors.
pub fn max_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "logits length");
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
