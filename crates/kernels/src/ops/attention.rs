//! Scaled dot-product attention over a key/value history split into segments.
//!
//! A segment is a run of consecutive positions stored contiguously (a slice of a KV cache, a
//! ring buffer's two halves, or the keys of the chunk being processed). Scores are never
//! materialised as a T×T matrix: each (query, head) pair streams over the visible keys with an
//! online softmax, so memory stays flat however long the context.

use crate::pool::ThreadPool;

/// Keys and values for `len` consecutive positions starting at `first_pos`; each row holds
/// `n_kv_heads * head_dim` values.
#[derive(Clone, Copy, Debug)]
pub struct KvSegment<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub first_pos: usize,
    pub len: usize,
}

/// Which keys a query may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMask {
    /// Key `j` is visible to query `i` iff `j <= i`.
    Causal,
    /// Causal, and at most `window` keys back including the query itself: `i - window < j <= i`.
    SlidingWindow(usize),
}

impl AttentionMask {
    #[inline]
    fn visible(self, query_pos: usize, key_pos: usize) -> bool {
        match self {
            AttentionMask::Causal => key_pos <= query_pos,
            AttentionMask::SlidingWindow(w) => key_pos <= query_pos && key_pos + w > query_pos,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q·k` (Gemma 3: `query_pre_attn_scalar^-0.5`; Gemma 3n: 1.0).
    pub scale: f32,
    /// `cap * tanh(score / cap)` before the softmax, when set.
    pub softcap: Option<f32>,
    pub mask: AttentionMask,
}

struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint `head_dim` slice of the output (one per query and head).
unsafe impl Sync for OutPtr {}

/// `out[t, h, :] = softmax_j(scale · q[t, h]·k[j, h/g]) · v[j, h/g]` over the visible keys of all
/// segments, where query `t` sits at position `q_pos0 + t` and `g = n_heads / n_kv_heads`.
#[track_caller]
pub fn attention(
    pool: &ThreadPool,
    p: &AttentionParams,
    q: &[f32],
    q_pos0: usize,
    segments: &[KvSegment<'_>],
    out: &mut [f32],
) {
    let (hd, nh, nkv) = (p.head_dim, p.n_heads, p.n_kv_heads);
    assert!(
        nkv > 0 && nh % nkv == 0,
        "attention: {nh} heads do not group over {nkv} kv heads"
    );
    let q_row = nh * hd;
    let kv_row = nkv * hd;
    assert!(
        q.len().is_multiple_of(q_row),
        "attention: query length {} is not whole tokens of {q_row}",
        q.len()
    );
    assert_eq!(
        out.len(),
        q.len(),
        "attention: output and query sizes differ"
    );
    for s in segments {
        assert!(
            s.keys.len() >= s.len * kv_row && s.values.len() >= s.len * kv_row,
            "attention: segment of {} positions has too few keys or values",
            s.len
        );
    }
    let n_tokens = q.len() / q_row;
    let group = nh / nkv;
    let out_ptr = OutPtr(out.as_mut_ptr());
    let out_ptr = &out_ptr;
    pool.run(n_tokens * nh, &|task| {
        let (t, h) = (task / nh, task % nh);
        let kv_h = h / group;
        let query = &q[t * q_row + h * hd..][..hd];
        let q_pos = q_pos0 + t;
        // SAFETY: task (t, h) owns exactly this slice of `out`; see `OutPtr`.
        let acc = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(t * q_row + h * hd), hd) };
        acc.fill(0.0);
        let mut max = f32::NEG_INFINITY;
        let mut denom = 0.0f32;
        for s in segments {
            for i in 0..s.len {
                let k_pos = s.first_pos + i;
                if !p.mask.visible(q_pos, k_pos) {
                    continue;
                }
                let key = &s.keys[i * kv_row + kv_h * hd..][..hd];
                let mut score = dot(query, key) * p.scale;
                if let Some(cap) = p.softcap {
                    score = cap * (score / cap).tanh();
                }
                if score > max {
                    // Rescale what was accumulated under the old maximum.
                    let correction = (max - score).exp();
                    denom *= correction;
                    acc.iter_mut().for_each(|a| *a *= correction);
                    max = score;
                }
                let weight = (score - max).exp();
                denom += weight;
                let value = &s.values[i * kv_row + kv_h * hd..][..hd];
                acc.iter_mut()
                    .zip(value)
                    .for_each(|(a, v)| *a += weight * v);
            }
        }
        if denom > 0.0 {
            let inv = 1.0 / denom;
            acc.iter_mut().for_each(|a| *a *= inv);
        }
    });
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four independent accumulators let the compiler vectorise without reassociation flags.
    let mut sums = [0.0f32; 4];
    let chunks = a.len() / 4;
    for c in 0..chunks {
        for l in 0..4 {
            sums[l] += a[c * 4 + l] * b[c * 4 + l];
        }
    }
    let mut total = (sums[0] + sums[1]) + (sums[2] + sums[3]);
    for i in chunks * 4..a.len() {
        total += a[i] * b[i];
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax attention with an explicit score vector, for comparison.
    fn naive(
        p: &AttentionParams,
        q: &[f32],
        q_pos0: usize,
        k: &[f32],
        v: &[f32],
        n_keys: usize,
    ) -> Vec<f32> {
        let (hd, nh, nkv) = (p.head_dim, p.n_heads, p.n_kv_heads);
        let n_tokens = q.len() / (nh * hd);
        let mut out = vec![0.0; q.len()];
        for t in 0..n_tokens {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let qv = &q[(t * nh + h) * hd..][..hd];
                let scores: Vec<Option<f32>> = (0..n_keys)
                    .map(|j| {
                        p.mask.visible(q_pos0 + t, j).then(|| {
                            let kv = &k[(j * nkv + kvh) * hd..][..hd];
                            qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * p.scale
                        })
                    })
                    .collect();
                let max = scores
                    .iter()
                    .flatten()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = scores
                    .iter()
                    .map(|s| s.map_or(0.0, |s| (s - max).exp()))
                    .collect();
                let sum: f32 = exps.iter().sum();
                for j in 0..n_keys {
                    let vv = &v[(j * nkv + kvh) * hd..][..hd];
                    for d in 0..hd {
                        out[(t * nh + h) * hd + d] += exps[j] / sum * vv[d];
                    }
                }
            }
        }
        out
    }

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn segmented_online_softmax_matches_naive_attention() {
        let pool = ThreadPool::new(2);
        for mask in [AttentionMask::Causal, AttentionMask::SlidingWindow(3)] {
            let p = AttentionParams {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8,
                scale: 0.3,
                softcap: None,
                mask,
            };
            let n_keys = 9;
            let k = pseudo_random(n_keys * 16, 1);
            let v = pseudo_random(n_keys * 16, 2);
            // The last 4 positions are queries; keys are split into three segments.
            let q = pseudo_random(4 * 32, 3);
            let segs = [
                KvSegment {
                    keys: &k[..2 * 16],
                    values: &v[..2 * 16],
                    first_pos: 0,
                    len: 2,
                },
                KvSegment {
                    keys: &k[2 * 16..5 * 16],
                    values: &v[2 * 16..5 * 16],
                    first_pos: 2,
                    len: 3,
                },
                KvSegment {
                    keys: &k[5 * 16..],
                    values: &v[5 * 16..],
                    first_pos: 5,
                    len: 4,
                },
            ];
            let mut out = vec![0.0; q.len()];
            attention(&pool, &p, &q, 5, &segs, &mut out);
            let expected = naive(&p, &q, 5, &k, &v, n_keys);
            for (a, b) in out.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-5, "{mask:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn sliding_window_counts_the_query_itself() {
        let m = AttentionMask::SlidingWindow(2);
        assert!(m.visible(5, 5) && m.visible(5, 4));
        assert!(!m.visible(5, 3) && !m.visible(5, 6));
    }
}
