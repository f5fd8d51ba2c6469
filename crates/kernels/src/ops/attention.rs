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
    #[cfg(test)]
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

impl AttentionMask {
    /// Key positions `[lo, hi]` visible to a query at `query_pos`.
    #[inline]
    fn visible_range(self, query_pos: usize) -> (usize, usize) {
        match self {
            AttentionMask::Causal => (0, query_pos),
            AttentionMask::SlidingWindow(w) => ((query_pos + 1).saturating_sub(w), query_pos),
        }
    }
}

/// Queries (tokens) handled by one task: they share every key/value block read.
const QUERY_BLOCK: usize = 8;
/// Keys scored together before the softmax state is updated once for the block.
const KEY_BLOCK: usize = 64;

struct SharedPtr(*mut f32);
// SAFETY: tasks write disjoint regions (see each use).
unsafe impl Sync for SharedPtr {}

thread_local! {
    /// Per-thread softmax state of one task: accumulators, maxima, denominators, scores.
    static TASK_STATE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Caller-side partial results when the keys are split across tasks (decoding).
    static PARTIALS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out[t, h, :] = softmax_j(scale · q[t, h]·k[j, h/g]) · v[j, h/g]` over the visible keys of all
/// segments, where query `t` sits at position `q_pos0 + t` and `g = n_heads / n_kv_heads`.
///
/// A task owns one kv head, a block of [`QUERY_BLOCK`] tokens (all `g` query heads of the group,
/// so each key/value block is read once for all of them) and, when there are too few such
/// tasks to fill the pool (decoding), one slice of the keys; slices are merged afterwards with
/// their softmax maxima and denominators. Keys are taken [`KEY_BLOCK`] at a time and the online
/// softmax rescales once per block.
#[track_caller]
pub fn attention(
    pool: &ThreadPool,
    p: &AttentionParams,
    q: &[f32],
    q_pos0: usize,
    segments: &[KvSegment<'_>],
    out: &mut [f32],
) {
    attention_with(
        pool,
        crate::quant::selected_isa(),
        p,
        q,
        q_pos0,
        segments,
        out,
    );
}

/// [`attention`] with an explicit ISA (tests compare the SIMD build with the scalar one).
#[track_caller]
pub fn attention_with(
    pool: &ThreadPool,
    isa: crate::quant::Isa,
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
    assert!(isa.is_available(), "ISA {isa:?} is not available");
    let use_avx2 = matches!(
        isa,
        crate::quant::Isa::Avx2 | crate::quant::Isa::Avx512 | crate::quant::Isa::Avx512Vnni
    );
    let n_tokens = q.len() / q_row;
    if n_tokens == 0 {
        return;
    }
    let group = nh / nkv;
    let n_qblocks = n_tokens.div_ceil(QUERY_BLOCK);
    let base_tasks = nkv * n_qblocks;
    let total_keys: usize = segments.iter().map(|s| s.len).sum();
    let want = 2 * pool.n_threads();
    let n_splits = if base_tasks >= want {
        1
    } else {
        want.div_ceil(base_tasks)
            .min(total_keys.div_ceil(4 * KEY_BLOCK))
            .max(1)
    };
    let job = Job {
        p,
        q,
        q_pos0,
        segments,
        n_tokens,
        group,
        total_keys,
        n_splits,
        use_avx2,
    };
    // Partial result layout per (split, token, head): acc[hd], max, denominator.
    let part_len = hd + 2;
    if n_splits == 1 {
        let out_ptr = SharedPtr(out.as_mut_ptr());
        let out_ptr = &out_ptr;
        pool.run(base_tasks, &|task| {
            job.run_task(task, 0, &mut |t, h, acc, _max, denom| {
                let inv = if denom > 0.0 { 1.0 / denom } else { 0.0 };
                // SAFETY: (t, h) belongs to this task's kv head and query block only.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.0.add(t * q_row + h * hd), hd)
                };
                for (d, a) in dst.iter_mut().zip(acc) {
                    *d = a * inv;
                }
            });
        });
        return;
    }
    PARTIALS.with(|partials| {
        let partials = &mut *partials.borrow_mut();
        let needed = n_splits * n_tokens * nh * part_len;
        if partials.len() < needed {
            partials.resize(needed, 0.0);
        }
        let part_ptr = SharedPtr(partials.as_mut_ptr());
        let part_ptr = &part_ptr;
        pool.run(base_tasks * n_splits, &|task| {
            let (base, split) = (task / n_splits, task % n_splits);
            job.run_task(base, split, &mut |t, h, acc, max, denom| {
                let at = ((split * n_tokens + t) * nh + h) * part_len;
                // SAFETY: (split, t, h) is written by this task only; `needed` covers it.
                let dst = unsafe { std::slice::from_raw_parts_mut(part_ptr.0.add(at), part_len) };
                dst[..hd].copy_from_slice(acc);
                dst[hd] = max;
                dst[hd + 1] = denom;
            });
        });
        for t in 0..n_tokens {
            for h in 0..nh {
                let part =
                    |s: usize| &partials[((s * n_tokens + t) * nh + h) * part_len..][..part_len];
                let max = (0..n_splits)
                    .map(|s| part(s)[hd])
                    .fold(f32::NEG_INFINITY, f32::max);
                let dst = &mut out[t * q_row + h * hd..][..hd];
                dst.fill(0.0);
                let mut denom = 0.0;
                for s in 0..n_splits {
                    let ps = part(s);
                    if ps[hd + 1] == 0.0 {
                        continue;
                    }
                    let w = (ps[hd] - max).exp();
                    denom += ps[hd + 1] * w;
                    for (d, a) in dst.iter_mut().zip(&ps[..hd]) {
                        *d += a * w;
                    }
                }
                let inv = if denom > 0.0 { 1.0 / denom } else { 0.0 };
                dst.iter_mut().for_each(|d| *d *= inv);
            }
        }
    });
}

/// Everything a task needs to know about one attention call.
struct Job<'a, 'b> {
    p: &'a AttentionParams,
    q: &'a [f32],
    q_pos0: usize,
    segments: &'a [KvSegment<'b>],
    n_tokens: usize,
    group: usize,
    total_keys: usize,
    n_splits: usize,
    // Only x86-64 has an AVX2 path; other targets always take the generic one.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    use_avx2: bool,
}

/// Receives `(token, head, unnormalised accumulator, max score, denominator)` per query.
type Emit<'e> = dyn FnMut(usize, usize, &[f32], f32, f32) + 'e;

impl Job<'_, '_> {
    fn run_task(&self, base_task: usize, split: usize, emit: &mut Emit<'_>) {
        TASK_STATE.with(|state| {
            let state = &mut *state.borrow_mut();
            #[cfg(target_arch = "x86_64")]
            if self.use_avx2 {
                // SAFETY: AVX2 + FMA were detected (the ISA was checked by the caller).
                unsafe { self.run_task_avx2(base_task, split, state, emit) };
                return;
            }
            self.run_task_generic::<ScalarMath>(base_task, split, state, emit);
        });
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_task_avx2(
        &self,
        base_task: usize,
        split: usize,
        state: &mut Vec<f32>,
        emit: &mut Emit<'_>,
    ) {
        self.run_task_generic::<Avx2Math>(base_task, split, state, emit);
    }

    /// Compiled twice: with plain loops, and inside [`Job::run_task_avx2`] with AVX2 + FMA.
    #[inline(always)]
    fn run_task_generic<M: VecMath>(
        &self,
        base_task: usize,
        split: usize,
        state: &mut Vec<f32>,
        emit: &mut Emit<'_>,
    ) {
        let p = self.p;
        let (hd, nh) = (p.head_dim, p.n_heads);
        let kv_row = p.n_kv_heads * hd;
        let q_row = nh * hd;
        let n_qblocks = self.n_tokens.div_ceil(QUERY_BLOCK);
        let (kv_h, qb) = (base_task / n_qblocks, base_task % n_qblocks);
        let t0 = qb * QUERY_BLOCK;
        let nt = QUERY_BLOCK.min(self.n_tokens - t0);
        let nq = nt * self.group;
        // state: acc[nq * hd], max[nq], denom[nq], scores[KEY_BLOCK]
        state.clear();
        state.resize(nq * hd + 2 * nq + KEY_BLOCK, 0.0);
        let (acc, rest) = state.split_at_mut(nq * hd);
        let (maxes, rest) = rest.split_at_mut(nq);
        let (denoms, scores) = rest.split_at_mut(nq);
        maxes.fill(f32::NEG_INFINITY);

        // This split's slice of the concatenated keys, and the positions any query here sees.
        let key_lo = split * self.total_keys / self.n_splits;
        let key_hi = (split + 1) * self.total_keys / self.n_splits;
        let (vis_lo, _) = p.mask.visible_range(self.q_pos0 + t0);
        let (_, vis_hi) = p.mask.visible_range(self.q_pos0 + t0 + nt - 1);

        let mut seg_start = 0;
        for seg in self.segments {
            let seg_end = seg_start + seg.len;
            // Indices of this segment inside the split, clipped to the visible positions.
            let lo = key_lo.max(seg_start) - seg_start;
            let hi = key_hi.min(seg_end).saturating_sub(seg_start);
            let lo = lo.max(vis_lo.saturating_sub(seg.first_pos));
            let hi = hi.min((vis_hi + 1).saturating_sub(seg.first_pos));
            seg_start = seg_end;
            let mut b0 = lo;
            while b0 < hi {
                let b1 = (b0 + KEY_BLOCK).min(hi);
                for qi in 0..nq {
                    let (t, hg) = (qi / self.group, qi % self.group);
                    let h = kv_h * self.group + hg;
                    let q_pos = self.q_pos0 + t0 + t;
                    let (v_lo, v_hi) = p.mask.visible_range(q_pos);
                    // Keys of this block the query sees: a contiguous sub-range.
                    let j_lo = b0.max(v_lo.saturating_sub(seg.first_pos));
                    let j_hi = b1.min((v_hi + 1).saturating_sub(seg.first_pos));
                    if j_lo >= j_hi {
                        continue;
                    }
                    let query = &self.q[(t0 + t) * q_row + h * hd..][..hd];
                    let mut block_max = f32::NEG_INFINITY;
                    for j in j_lo..j_hi {
                        let key = &seg.keys[j * kv_row + kv_h * hd..][..hd];
                        let mut s = M::dot(query, key) * p.scale;
                        if let Some(cap) = p.softcap {
                            s = cap * (s / cap).tanh();
                        }
                        scores[j - j_lo] = s;
                        block_max = block_max.max(s);
                    }
                    let acc_q = &mut acc[qi * hd..(qi + 1) * hd];
                    let new_max = maxes[qi].max(block_max);
                    if new_max > maxes[qi] {
                        // Rescale what was accumulated under the old maximum.
                        let correction = (maxes[qi] - new_max).exp();
                        denoms[qi] *= correction;
                        acc_q.iter_mut().for_each(|a| *a *= correction);
                        maxes[qi] = new_max;
                    }
                    for j in j_lo..j_hi {
                        let w = (scores[j - j_lo] - new_max).exp();
                        denoms[qi] += w;
                        let value = &seg.values[j * kv_row + kv_h * hd..][..hd];
                        M::axpy(acc_q, w, value);
                    }
                }
                b0 = b1;
            }
        }
        for qi in 0..nq {
            let (t, hg) = (qi / self.group, qi % self.group);
            emit(
                t0 + t,
                kv_h * self.group + hg,
                &acc[qi * hd..(qi + 1) * hd],
                maxes[qi],
                denoms[qi],
            );
        }
    }
}

/// Dot product with eight independent lanes (the scalar build's loop).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (ac, bc) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            lanes[l] += ac[l] * bc[l];
        }
    }
    let mut total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for i in chunks * 8..a.len() {
        total += a[i] * b[i];
    }
    total
}

/// `acc += w * v` (the scalar build's loop).
#[inline(always)]
fn axpy8(acc: &mut [f32], w: f32, v: &[f32]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a += w * x;
    }
}

/// Inner products of the attention loops: plain Rust, or AVX2 with fused multiply-adds.
trait VecMath {
    fn dot(a: &[f32], b: &[f32]) -> f32;
    fn axpy(acc: &mut [f32], w: f32, v: &[f32]);
}

struct ScalarMath;

impl VecMath for ScalarMath {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot8(a, b)
    }
    #[inline(always)]
    fn axpy(acc: &mut [f32], w: f32, v: &[f32]) {
        axpy8(acc, w, v)
    }
}

/// Only used inside `Job::run_task_avx2`, which is reached only when AVX2 + FMA were detected.
#[cfg(target_arch = "x86_64")]
struct Avx2Math;

#[cfg(target_arch = "x86_64")]
impl VecMath for Avx2Math {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let n = a.len().min(b.len());
        let chunks = n / 16;
        // SAFETY: AVX2 + FMA detected (see the struct); loads stay inside `n` values.
        unsafe {
            let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for c in 0..chunks {
                let (pa, pb) = (a.as_ptr().add(16 * c), b.as_ptr().add(16 * c));
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), s1);
            }
            let s = _mm256_add_ps(s0, s1);
            let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_movehdup_ps(h));
            let mut total = _mm_cvtss_f32(h);
            for i in chunks * 16..n {
                total += a[i] * b[i];
            }
            total
        }
    }

    #[inline(always)]
    fn axpy(acc: &mut [f32], w: f32, v: &[f32]) {
        use std::arch::x86_64::*;
        let n = acc.len().min(v.len());
        let chunks = n / 8;
        // SAFETY: as in `dot`.
        unsafe {
            let wv = _mm256_set1_ps(w);
            for c in 0..chunks {
                let pa = acc.as_mut_ptr().add(8 * c);
                let x = _mm256_loadu_ps(v.as_ptr().add(8 * c));
                _mm256_storeu_ps(pa, _mm256_fmadd_ps(wv, x, _mm256_loadu_ps(pa)));
            }
        }
        for i in chunks * 8..n {
            acc[i] += w * v[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax attention with an explicit score vector, in f64, for comparison
    /// (the soft cap, when set, applied to every score).
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
                let scores: Vec<Option<f64>> = (0..n_keys)
                    .map(|j| {
                        p.mask.visible(q_pos0 + t, j).then(|| {
                            let kv = &k[(j * nkv + kvh) * hd..][..hd];
                            let s: f64 = qv.iter().zip(kv).map(|(a, b)| (a * b) as f64).sum();
                            let s = s * p.scale as f64;
                            p.softcap
                                .map_or(s, |cap| cap as f64 * (s / cap as f64).tanh())
                        })
                    })
                    .collect();
                let max = scores
                    .iter()
                    .flatten()
                    .copied()
                    .fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores
                    .iter()
                    .map(|s| s.map_or(0.0, |s| (s - max).exp()))
                    .collect();
                let sum: f64 = exps.iter().sum();
                for j in 0..n_keys {
                    let vv = &v[(j * nkv + kvh) * hd..][..hd];
                    for d in 0..hd {
                        out[(t * nh + h) * hd + d] += (exps[j] / sum * vv[d] as f64) as f32;
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

    /// Many keys and queries: several query blocks, key blocks, ring-like segments, and the
    /// key-split path (one query, few tasks) against the naive reference.
    #[test]
    fn blocked_and_split_attention_match_naive_attention() {
        let pool = ThreadPool::new(3);
        for mask in [AttentionMask::Causal, AttentionMask::SlidingWindow(70)] {
            for n_queries in [1usize, 2, 19] {
                let p = AttentionParams {
                    n_heads: 4,
                    n_kv_heads: 1,
                    head_dim: 16,
                    scale: 0.25,
                    softcap: Some(5.0),
                    mask,
                };
                let n_keys = 300;
                let k = pseudo_random(n_keys * 16, 4);
                let v = pseudo_random(n_keys * 16, 5);
                let q = pseudo_random(n_queries * 64, 6);
                let q_pos0 = n_keys - n_queries;
                let split = 130;
                let segs = [
                    KvSegment {
                        keys: &k[..split * 16],
                        values: &v[..split * 16],
                        first_pos: 0,
                        len: split,
                    },
                    KvSegment {
                        keys: &k[split * 16..],
                        values: &v[split * 16..],
                        first_pos: split,
                        len: n_keys - split,
                    },
                ];
                let mut out = vec![0.0; q.len()];
                attention(&pool, &p, &q, q_pos0, &segs, &mut out);
                let mut softcapped = naive(&p, &q, q_pos0, &k, &v, n_keys);
                for (a, b) in out.iter().zip(&softcapped) {
                    assert!((a - b).abs() < 1e-5, "{mask:?} {n_queries}: {a} vs {b}");
                }
                // The AVX2 build (fused multiply-adds) agrees with the scalar build.
                if crate::quant::Isa::Avx2.is_available() {
                    let mut scalar = vec![0.0; q.len()];
                    attention_with(
                        &pool,
                        crate::quant::Isa::Scalar,
                        &p,
                        &q,
                        q_pos0,
                        &segs,
                        &mut scalar,
                    );
                    softcapped.copy_from_slice(&out);
                    for (a, b) in scalar.iter().zip(&softcapped) {
                        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
                    }
                }
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
