//! Token sampling: penalties, temperature, top-k, top-p, min-p and a seeded draw.
//!
//! Order of the steps: penalties (llama.cpp semantics) → temperature → top-k → top-p → min-p →
//! draw. Temperature comes before the cut-offs as in Hugging Face `generate`, whose
//! `generation_config.json` is where Gemma's recommended values come from.

/// Everything that controls one generation. Defaults are Gemma's recommended settings
/// (temperature 1.0, top-k 64, top-p 0.95) with all penalties off.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 (or below) means greedy decoding.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables the cut.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability sums to at least `top_p`.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely token's.
    pub min_p: f32,
    /// Divides positive / multiplies negative logits of tokens seen in the last `repeat_last_n`.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// Subtracted once per occurrence in the recent window.
    pub frequency_penalty: f32,
    /// Subtracted once if the token occurs in the recent window at all.
    pub presence_penalty: f32,
    /// Fixed seed for reproducible sampling; `None` seeds from the clock.
    pub seed: Option<u64>,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Generation stops when the output contains one of these; the stop string is not emitted.
    pub stop: Vec<String>,
    /// If the prompt does not fit the context, keep its last tokens instead of failing.
    pub truncate: bool,
    /// Added to a token's logit after the penalties (OpenAI's `logit_bias`: -100 all but bans
    /// a token, +100 all but forces it). Ids must be in the vocabulary; others are ignored.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 64,
            top_p: 0.95,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
            truncate: false,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Defaults for continuing text with a base (pretrained) model, whose samples loop far
    /// more than an instruction-tuned model's under [`SamplingParams::default`]:
    /// `scripts/base_sampling.py` measures the repetition of each setting (see
    /// BENCHMARKS.md, "Sampling defaults for base models").
    pub fn base_model_defaults() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.1,
            ..SamplingParams::default()
        }
    }

    /// Greedy decoding (temperature 0) with everything else at its default.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }
}

/// One token still in the running, with its (adjusted) logit and, once computed, probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub id: u32,
    pub logit: f32,
    pub prob: f32,
}

/// SplitMix64: tiny, fast and good enough for sampling; the same seed gives the same stream.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks the next token from a logits vector. Buffers are reused between calls so the
/// per-token path does not allocate once warmed up.
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    candidates: Vec<Candidate>,
    /// The logits after penalties (one f32 per vocabulary entry).
    adjusted: Vec<f32>,
    /// The top-k selection, worst candidate on top.
    heap: std::collections::BinaryHeap<Ranked>,
    recent_counts: Vec<(u32, u32)>,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(clock_seed);
        Sampler {
            params: params.clone(),
            rng: SplitMix64::new(seed),
            candidates: Vec::new(),
            adjusted: Vec::new(),
            heap: std::collections::BinaryHeap::new(),
            recent_counts: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token. `history` is every token so far (prompt and generated);
    /// only its last `repeat_last_n` entries feed the penalties.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "sampling from an empty logits vector");
        if self.params.temperature <= 0.0 {
            self.load_penalized(logits, history);
            return argmax(&self.adjusted);
        }
        self.filter(logits, history);
        let total: f64 = self.candidates.iter().map(|c| c.prob as f64).sum();
        let mut target = self.rng.next_f64() * total;
        for c in &self.candidates {
            target -= c.prob as f64;
            if target < 0.0 {
                return c.id;
            }
        }
        // Rounding left a sliver at the end: the last candidate takes it.
        self.candidates.last().map(|c| c.id).unwrap_or(0)
    }

    /// The tokens that survive penalties, temperature and the top-k/top-p/min-p cuts, with
    /// probabilities renormalized over the survivors. Greedy mode returns the single winner.
    pub fn candidates(&mut self, logits: &[f32], history: &[u32]) -> &[Candidate] {
        if self.params.temperature <= 0.0 {
            self.load_penalized(logits, history);
            let best = argmax(&self.adjusted);
            let winner = Candidate {
                id: best,
                logit: self.adjusted[best as usize],
                prob: 1.0,
            };
            self.candidates.clear();
            self.candidates.push(winner);
        } else {
            self.filter(logits, history);
            let total: f32 = self.candidates.iter().map(|c| c.prob).sum();
            for c in &mut self.candidates {
                c.prob /= total;
            }
        }
        &self.candidates
    }

    /// Fills `candidates` with every token and its logit after the repetition penalties.
    /// `adjusted` = the logits with the penalties applied.
    fn load_penalized(&mut self, logits: &[f32], history: &[u32]) {
        self.adjusted.clear();
        self.adjusted.extend_from_slice(logits);
        self.apply_penalties(history);
        for &(id, bias) in &self.params.logit_bias {
            if let Some(logit) = self.adjusted.get_mut(id as usize) {
                *logit += bias;
            }
        }
    }

    fn apply_penalties(&mut self, history: &[u32]) {
        let p = &self.params;
        let penalties_off =
            p.repeat_penalty == 1.0 && p.frequency_penalty == 0.0 && p.presence_penalty == 0.0;
        if penalties_off || p.repeat_last_n == 0 {
            return;
        }
        let window = &history[history.len().saturating_sub(p.repeat_last_n)..];
        self.recent_counts.clear();
        for &id in window {
            match self.recent_counts.iter_mut().find(|(seen, _)| *seen == id) {
                Some((_, count)) => *count += 1,
                None => self.recent_counts.push((id, 1)),
            }
        }
        for &(id, count) in &self.recent_counts {
            let Some(logit) = self.adjusted.get_mut(id as usize) else {
                continue;
            };
            if *logit <= 0.0 {
                *logit *= p.repeat_penalty;
            } else {
                *logit /= p.repeat_penalty;
            }
            *logit -= count as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }

    /// Runs the non-greedy pipeline; leaves unnormalized probabilities in `candidates`.
    fn filter(&mut self, logits: &[f32], history: &[u32]) {
        self.load_penalized(logits, history);
        let inv_temp = 1.0 / self.params.temperature;
        let scaled = self.adjusted.iter().map(|&logit| logit * inv_temp);
        let top_k = self.params.top_k;
        self.candidates.clear();
        if top_k > 0 && top_k < self.adjusted.len() {
            // One pass keeping the k best (without building a candidate per vocabulary entry:
            // 262k of them for Gemma), best first.
            self.heap.clear();
            for (id, logit) in scaled.enumerate() {
                let entry = Ranked(Candidate {
                    id: id as u32,
                    logit,
                    prob: 0.0,
                });
                if self.heap.len() < top_k {
                    self.heap.push(entry);
                } else if let Some(mut worst) = self.heap.peek_mut() {
                    // Ids only grow, so an equal logit never displaces the earlier token.
                    if logit.total_cmp(&worst.0.logit).is_gt() {
                        *worst = entry;
                    }
                }
            }
            self.candidates.extend(self.heap.drain().map(|r| r.0));
            self.candidates.sort_unstable_by(by_logit_desc);
        } else {
            self.candidates
                .extend(scaled.enumerate().map(|(id, logit)| Candidate {
                    id: id as u32,
                    logit,
                    prob: 0.0,
                }));
        }
        let top_p = self.params.top_p;
        let needs_order = top_p < 1.0;
        if needs_order {
            self.candidates.sort_unstable_by(by_logit_desc);
        }
        softmax_into_probs(&mut self.candidates);
        if needs_order {
            let mut cumulative = 0.0f32;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                cumulative += c.prob;
                if cumulative >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
        }
        let min_p = self.params.min_p;
        if min_p > 0.0 {
            let max_prob = self.candidates.iter().map(|c| c.prob).fold(0.0, f32::max);
            let threshold = min_p * max_prob;
            self.candidates.retain(|c| c.prob >= threshold);
        }
    }
}

/// Highest logit first; equal logits keep the lower id first so results are deterministic.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// A candidate ordered by rank: `a < b` when `a` comes first in [`by_logit_desc`] order, so a
/// max-heap holds the worst one on top.
#[derive(Clone, Copy, Debug)]
struct Ranked(Candidate);

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        by_logit_desc(&self.0, &other.0)
    }
}

/// The id with the highest logit; ties go to the lowest id.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (id, &logit) in logits.iter().enumerate().skip(1) {
        if logit > logits[best] {
            best = id;
        }
    }
    best as u32
}

fn softmax_into_probs(candidates: &mut [Candidate]) {
    let max = candidates
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for c in candidates.iter_mut() {
        c.prob = (c.logit - max).exp();
        sum += c.prob;
    }
    for c in candidates.iter_mut() {
        c.prob /= sum;
    }
}

fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ ((std::process::id() as u64) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    /// A straightforward, allocation-happy version of the same definition to compare with.
    fn naive_survivors(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
        let mut items: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l as f64 / p.temperature as f64))
            .collect();
        items.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            items.truncate(p.top_k);
        }
        let max = items[0].1;
        let z: f64 = items.iter().map(|(_, l)| (l - max).exp()).sum();
        let mut probs: Vec<(u32, f64)> = items
            .iter()
            .map(|&(id, l)| (id, (l - max).exp() / z))
            .collect();
        if p.top_p < 1.0 {
            let mut kept = Vec::new();
            let mut cum = 0.0;
            for &(id, pr) in &probs {
                kept.push((id, pr));
                cum += pr;
                if cum >= p.top_p as f64 {
                    break;
                }
            }
            probs = kept;
        }
        if p.min_p > 0.0 {
            let top = probs[0].1;
            probs.retain(|&(_, pr)| pr >= p.min_p as f64 * top);
        }
        let z: f64 = probs.iter().map(|(_, pr)| pr).sum();
        probs.iter().map(|&(id, pr)| (id, pr / z)).collect()
    }

    fn survivors(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
        let mut sampler = Sampler::new(p);
        let mut got: Vec<(u32, f64)> = sampler
            .candidates(logits, &[])
            .iter()
            .map(|c| (c.id, c.prob as f64))
            .collect();
        got.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
        got
    }

    fn assert_same_set(got: &[(u32, f64)], want: &[(u32, f64)]) {
        let ids = |v: &[(u32, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(ids(got), ids(want));
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g.1 - w.1).abs() < 1e-5,
                "prob of {}: {} vs {}",
                g.0,
                g.1,
                w.1
            );
        }
    }

    /// Probabilities 0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02 shuffled over ids.
    fn hand_made_logits() -> Vec<f32> {
        let probs = [0.05f32, 0.4, 0.02, 0.15, 0.25, 0.03, 0.1];
        probs.iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn greedy_picks_the_largest_logit() {
        let logits = [0.1, 2.5, -1.0, 2.4];
        let mut s = Sampler::new(&SamplingParams::greedy());
        assert_eq!(s.sample(&logits, &[]), 1);
    }

    #[test]
    fn greedy_ties_go_to_the_lowest_id() {
        let logits = [0.0, 3.0, 1.0, 3.0];
        let mut s = Sampler::new(&SamplingParams::greedy());
        assert_eq!(s.sample(&logits, &[]), 1);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01)
            .collect();
        let want = Sampler::new(&SamplingParams::greedy()).sample(&logits, &[]);
        for seed in 0..20 {
            let p = SamplingParams {
                top_k: 1,
                seed: Some(seed),
                ..SamplingParams::default()
            };
            assert_eq!(Sampler::new(&p).sample(&logits, &[]), want);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        let logits = hand_made_logits();
        for top_p in [0.3f32, 0.5, 0.7, 0.8, 0.9, 0.97, 0.999] {
            let p = params(1.0, 0, top_p, 0.0);
            assert_same_set(&survivors(&logits, &p), &naive_survivors(&logits, &p));
        }
        // 0.4 + 0.25 = 0.65 reaches 0.6: exactly ids 1 and 4 remain.
        let got = survivors(&logits, &params(1.0, 0, 0.6, 0.0));
        assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 4]);
    }

    #[test]
    fn min_p_drops_tokens_below_the_relative_threshold() {
        let logits = hand_made_logits();
        for min_p in [0.05f32, 0.1, 0.3, 0.5, 0.9] {
            let p = params(1.0, 0, 1.0, min_p);
            assert_same_set(&survivors(&logits, &p), &naive_survivors(&logits, &p));
        }
        // Threshold 0.3 * 0.4 = 0.12 keeps 0.4, 0.25 and 0.15.
        let got = survivors(&logits, &params(1.0, 0, 1.0, 0.3));
        assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 4, 3]);
    }

    #[test]
    fn combined_cuts_and_temperature_match_the_naive_definition() {
        let logits: Vec<f32> = (0..200).map(|i| ((i * 37) % 101) as f32 * 0.05).collect();
        for (t, k, tp, mp) in [
            (0.7, 40, 0.9, 0.05),
            (1.3, 0, 0.8, 0.0),
            (1.0, 64, 0.95, 0.1),
        ] {
            let p = params(t, k, tp, mp);
            assert_same_set(&survivors(&logits, &p), &naive_survivors(&logits, &p));
        }
    }

    /// Top-k over a large vocabulary where many logits tie at the cut: the k kept are the
    /// highest, and among equal logits the lowest ids, as the naive sort says.
    #[test]
    fn top_k_over_many_ties_keeps_the_lowest_ids_at_the_cut() {
        let logits: Vec<f32> = (0..20_000)
            .map(|i| ((i * 7919) % 23) as f32 * 0.25)
            .collect();
        for k in [1, 5, 64, 1000] {
            let p = params(0.8, k, 1.0, 0.0);
            assert_same_set(&survivors(&logits, &p), &naive_survivors(&logits, &p));
        }
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits() {
        let logits = [2.0f32, -2.0, 1.0, 3.0];
        let p = SamplingParams {
            temperature: 0.0,
            repeat_penalty: 2.0,
            repeat_last_n: 2,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(&p);
        // Token 3 is outside the window of the last 2, tokens 0 and 1 are inside.
        s.load_penalized(&logits, &[3, 0, 1]);
        let got = s.adjusted.clone();
        assert_eq!(got, vec![1.0, -4.0, 1.0, 3.0]);
    }

    #[test]
    fn logit_bias_is_added_after_the_penalties_and_steers_greedy_choice() {
        let logits = [2.0f32, -2.0, 1.0, 3.0];
        let p = SamplingParams {
            temperature: 0.0,
            repeat_penalty: 2.0,
            repeat_last_n: 4,
            logit_bias: vec![(3, -100.0), (1, 5.0), (99, 7.0)],
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(&p);
        s.load_penalized(&logits, &[1]);
        // Token 1 is penalized first (-2 * 2 = -4), then biased (+5); id 99 is not in the
        // vocabulary and changes nothing.
        assert_eq!(s.adjusted, vec![2.0, 1.0, 1.0, -97.0]);
        assert_eq!(s.sample(&logits, &[1]), 0);
        let mut forced = Sampler::new(&SamplingParams {
            temperature: 0.8,
            logit_bias: vec![(2, 100.0)],
            seed: Some(7),
            ..SamplingParams::default()
        });
        for _ in 0..20 {
            assert_eq!(forced.sample(&logits, &[]), 2);
        }
    }

    #[test]
    fn frequency_and_presence_penalties_subtract_per_count_and_once() {
        let logits = [2.0f32, -2.0, 1.0, 3.0];
        let p = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            repeat_last_n: 64,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(&p);
        s.load_penalized(&logits, &[2, 2, 2, 0]);
        let got = s.adjusted.clone();
        assert_eq!(got, vec![2.0 - 0.5 - 0.25, -2.0, 1.0 - 1.5 - 0.25, 3.0]);
    }

    #[test]
    fn penalties_change_the_greedy_choice() {
        let logits = [0.0f32, 2.0, 1.5];
        let p = SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.5,
            ..SamplingParams::default()
        };
        assert_eq!(Sampler::new(&p).sample(&logits, &[]), 1);
        assert_eq!(Sampler::new(&p).sample(&logits, &[1]), 2);
    }

    #[test]
    fn out_of_range_history_ids_are_ignored() {
        let p = SamplingParams {
            temperature: 0.0,
            repeat_penalty: 2.0,
            ..SamplingParams::default()
        };
        assert_eq!(Sampler::new(&p).sample(&[1.0, 0.5], &[99, 1_000_000]), 0);
    }

    #[test]
    fn same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..500).map(|i| (i % 13) as f32 * 0.1).collect();
        let run = |seed| {
            let mut s = Sampler::new(&SamplingParams {
                seed: Some(seed),
                top_k: 0,
                top_p: 1.0,
                ..SamplingParams::default()
            });
            (0..50).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn sampled_frequencies_follow_the_distribution() {
        let probs = [0.5f64, 0.3, 0.15, 0.05];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let mut s = Sampler::new(&SamplingParams {
            top_k: 0,
            top_p: 1.0,
            seed: Some(1234),
            ..SamplingParams::default()
        });
        let n = 10_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&logits, &[]) as usize] += 1;
        }
        for (count, p) in counts.iter().zip(probs) {
            let freq = *count as f64 / n as f64;
            // Five standard deviations of a binomial proportion.
            let tolerance = 5.0 * (p * (1.0 - p) / n as f64).sqrt();
            assert!((freq - p).abs() < tolerance, "freq {freq} vs p {p}");
        }
    }

    #[test]
    fn uniform_floats_stay_in_the_unit_interval() {
        let mut rng = SplitMix64::new(0);
        let mean = (0..10_000).map(|_| rng.next_f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02);
        assert!((0..1000)
            .map(|_| rng.next_f64())
            .all(|x| (0.0..1.0).contains(&x)));
    }
}
