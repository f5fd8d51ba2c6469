//! Scaled dot-product attention over a key/value history split into segments.
//!
//! A segment is a run of consecutive positions stored contiguously (a slice of a KV cache, a
//! ring buffer's two halves, or the keys of the chunk being processed). Scores are never
//! materialised as a T×T matrix: each (query, head) pair streams over the visible keys with an
//! online softmax, so memory stays flat however long the context.
//!
//! Keys and values may be stored as f32, f16 or Q8_0 ([`KvRows`]); a task converts only the
//! block of [`KEY_BLOCK`] rows it is about to use, for its kv head, into a small f32 buffer.
//!
//! Two kernels: the per-query one (every caller by default) and, opted into with
//! [`AttentionParams::tiled`], register-tiled matrix products with the queries across SIMD
//! lanes (the `tiled` module, about twice as fast on a vision tower's attention).

mod tiled;

use super::exp;
use super::kv::KvRows;
use crate::pool::ThreadPool;
use crate::quant::Isa;
use std::ops::Range;

/// Keys and values for `len` consecutive positions starting at `first_pos`; each row holds
/// `n_kv_heads * head_dim` values, in any cache format (`(&[f32]).into()` for plain floats).
#[derive(Clone, Copy, Debug)]
pub struct KvSegment<'a> {
    pub keys: KvRows<'a>,
    pub values: KvRows<'a>,
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
    /// Tasks of at least `tiled::MIN_QUERIES` queries take the tiled kernel (128 queries per
    /// task, an AVX-512 build where available) instead of the per-query one.
    ///
    /// Only the SigLIP vision tower sets this (f32 keys and values, bidirectional within an
    /// image). The text decoders stay on the per-query kernel, with its 32-query tasks and
    /// its AVX2 results (its AVX-512 build gives the same bits): used for Gemma 3 270M's
    /// prefill, the tiled kernel moved the real model's logits with f16 and q8_0 caches beyond
    /// the engine's real-model tolerances (`logits_real_model`, `batch_size` perplexity, the
    /// CLI's f16-cache fixture). Not a kernel error: on those inputs its output differs from
    /// the per-query kernel's by float rounding (at most ~7e-6 of a layer's largest output,
    /// ring caches included), and the per-query kernel fails the same tests when its output is
    /// only re-rounded (its scalar build) or scaled by random factors within 1 ± 5e-7: those
    /// tests sit at the edge of their tolerances, where the quantized activations turn any
    /// rounding change into logit moves of tenths. Switching text needs those tolerances (or
    /// references) revisited.
    pub tiled: bool,
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

/// Queries (token × head of a group) one task aims to handle: they share every key/value block
/// read. A task takes `QUERIES_PER_TASK / group` tokens, between [`MIN_QUERY_BLOCK`] and
/// [`MAX_QUERY_BLOCK`] (see [`query_block`]).
const QUERIES_PER_TASK: usize = 32;
const MIN_QUERY_BLOCK: usize = 8;
const MAX_QUERY_BLOCK: usize = 32;
/// Queries per task with [`AttentionParams::tiled`]: the tiled kernel reads each key/value
/// block once for 128 queries (a vision tower's task re-reads its head's keys and values from
/// L3: 64 queries per task were measured faster than 32, and 128 than 64).
const TILED_QUERIES_PER_TASK: usize = 128;
const TILED_MAX_QUERY_BLOCK: usize = 128;

/// Tokens per task for `group` query heads per kv head: 8 for Gemma 3's grouped heads (4 per kv
/// head on the small models, as before), 32 without grouping (a vision tower's 4096 patches,
/// where reading each key block for only 8 queries left attention bound by the reads).
fn query_block(group: usize) -> usize {
    (QUERIES_PER_TASK / group.max(1)).clamp(MIN_QUERY_BLOCK, MAX_QUERY_BLOCK)
}

/// Tokens per task with [`AttentionParams::tiled`]: [`TILED_QUERIES_PER_TASK`] queries.
fn tiled_query_block(group: usize) -> usize {
    (TILED_QUERIES_PER_TASK / group.max(1)).clamp(MIN_QUERY_BLOCK, TILED_MAX_QUERY_BLOCK)
}

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
/// A task owns one kv head, a block of [`query_block`] tokens (all `g` query heads of the group,
/// so each key/value block is read once for all of them) and, when there are too few such
/// tasks to fill the pool (decoding), one slice of the keys; slices are merged afterwards with
/// their softmax maxima and denominators. Keys are taken [`KEY_BLOCK`] at a time and the online
/// softmax rescales once per block; within a block each key and value row is read once for four
/// queries (register-tiled dot products and accumulations), and the weights come from the
/// polynomial [`exp`](super::exp) eight at a time.
///
/// With [`AttentionParams::tiled`] (the vision tower only), a task takes
/// [`TILED_QUERIES_PER_TASK`] queries and, when it has at least `tiled::MIN_QUERIES`, computes
/// scores and weighted values as register-tiled matrix products with the queries across SIMD
/// lanes (see the `tiled` module; AVX-512 where available), sixteen exponentials at a time.
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
        &[],
        out,
    );
}

/// [`attention`] where a query inside one of `spans` (absolute positions, sorted, disjoint)
/// also sees the later keys of its span: causal OR same-span, and on sliding layers the
/// window still bounds the past (`j > i - window`). This is how Gemma 3 lets an image's soft
/// tokens attend to each other in both directions (transformers 5.24's `token_type_ids` mask;
/// checked against its logits with a block longer than the window). The keys of a span's
/// later positions must be among `segments` (feed a span whole in one call).
#[track_caller]
pub fn attention_spans(
    pool: &ThreadPool,
    p: &AttentionParams,
    q: &[f32],
    q_pos0: usize,
    segments: &[KvSegment<'_>],
    spans: &[Range<usize>],
    out: &mut [f32],
) {
    attention_with(
        pool,
        crate::quant::selected_isa(),
        p,
        q,
        q_pos0,
        segments,
        spans,
        out,
    );
}

/// [`attention`] with an explicit ISA (tests compare the SIMD build with the scalar one).
// The plain entry points' arguments plus the ISA: grouping them would only add a type.
#[allow(clippy::too_many_arguments)]
#[track_caller]
pub fn attention_with(
    pool: &ThreadPool,
    isa: crate::quant::Isa,
    p: &AttentionParams,
    q: &[f32],
    q_pos0: usize,
    segments: &[KvSegment<'_>],
    spans: &[Range<usize>],
    out: &mut [f32],
) {
    let (hd, nh, nkv) = (p.head_dim, p.n_heads, p.n_kv_heads);
    assert!(
        spans.windows(2).all(|w| w[0].end <= w[1].start),
        "attention: bidirectional spans must be sorted and disjoint"
    );
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
            s.keys.n_values() >= s.len * kv_row && s.values.n_values() >= s.len * kv_row,
            "attention: segment of {} positions has too few keys or values",
            s.len
        );
        let quantized = [s.keys, s.values]
            .iter()
            .any(|r| matches!(r, KvRows::Q8_0(_)));
        assert!(
            !quantized || hd.is_multiple_of(super::kv::Q8_0_BLOCK),
            "attention: q8_0 keys or values need a head_dim that is a multiple of 32, got {hd}"
        );
    }
    assert!(isa.is_available(), "ISA {isa:?} is not available");
    let simd = Simd::for_isa(isa);
    let n_tokens = q.len() / q_row;
    if n_tokens == 0 {
        return;
    }
    let group = nh / nkv;
    let query_block = if p.tiled {
        tiled_query_block(group)
    } else {
        query_block(group)
    };
    let n_qblocks = n_tokens.div_ceil(query_block);
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
        spans,
        n_tokens,
        group,
        query_block,
        total_keys,
        n_splits,
        simd,
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
                    let w = exp::exp(ps[hd] - max);
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
    spans: &'a [Range<usize>],
    n_tokens: usize,
    group: usize,
    /// Tokens per task ([`query_block`], or [`tiled_query_block`] when tiled).
    query_block: usize,
    total_keys: usize,
    n_splits: usize,
    // Only x86-64 has SIMD paths; other targets always take the scalar one.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    simd: Simd,
}

/// The instruction sets a task's loops are compiled for. Both kernels have a build for each;
/// the per-query kernel's AVX-512 build gives its AVX2 build's results to the bit (see
/// [`Avx512Math`]), so which of the two runs never changes a model's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// Only x86-64 builds the SIMD levels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Simd {
    Scalar,
    /// AVX2 + FMA + F16C: [`Avx2Math`], and the tiled kernel's `tiled::Avx2`.
    Avx2,
    /// AVX-512F/BW/VL (plus AVX2 + FMA + F16C): `Avx512Math` for the per-query kernel (the
    /// text decoders), `tiled::Avx512` for the tiled one (only with [`AttentionParams::tiled`]).
    Avx512,
}

impl Simd {
    /// The build for `isa` (an ISA the caller checked available, so a forced lower
    /// `GEMMA_ISA` gives the lower build).
    fn for_isa(isa: Isa) -> Simd {
        match isa {
            Isa::Avx512 | Isa::Avx512Vnni => Simd::Avx512,
            Isa::Avx2 => Simd::Avx2,
            _ => Simd::Scalar,
        }
    }
}

/// Receives `(token, head, unnormalised accumulator, max score, denominator)` per query.
type Emit<'e> = dyn FnMut(usize, usize, &[f32], f32, f32) + 'e;

impl Job<'_, '_> {
    /// Key positions `[lo, hi]` visible to a query at `query_pos`: the mask's range, reaching
    /// forward to the end of a bidirectional span holding the query (the window's lower bound
    /// stays).
    fn visible_range(&self, query_pos: usize) -> (usize, usize) {
        let (lo, hi) = self.p.mask.visible_range(query_pos);
        let i = self.spans.partition_point(|s| s.end <= query_pos);
        match self.spans.get(i) {
            Some(s) if s.start <= query_pos => (lo, hi.max(s.end - 1)),
            _ => (lo, hi),
        }
    }

    fn run_task(&self, base_task: usize, split: usize, emit: &mut Emit<'_>) {
        TASK_STATE.with(|state| {
            let state = &mut *state.borrow_mut();
            #[cfg(target_arch = "x86_64")]
            match self.simd {
                Simd::Avx512 => {
                    // SAFETY: AVX-512F/BW/VL, AVX2, FMA and F16C were detected (the ISA was
                    // checked by the caller).
                    unsafe { self.run_task_avx512(base_task, split, state, emit) };
                    return;
                }
                Simd::Avx2 => {
                    // SAFETY: AVX2 + FMA + F16C were detected (the ISA was checked by the caller).
                    unsafe { self.run_task_avx2(base_task, split, state, emit) };
                    return;
                }
                Simd::Scalar => {}
            }
            self.run_task_generic::<ScalarMath, tiled::Scalar>(base_task, split, state, emit);
        });
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_task_avx2(
        &self,
        base_task: usize,
        split: usize,
        state: &mut Vec<f32>,
        emit: &mut Emit<'_>,
    ) {
        self.run_task_generic::<Avx2Math, tiled::Avx2>(base_task, split, state, emit);
    }

    /// The per-query kernel with [`Avx512Math`] (the same bits as [`Job::run_task_avx2`]), and
    /// with [`AttentionParams::tiled`] the tiled kernel's AVX-512 build.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn run_task_avx512(
        &self,
        base_task: usize,
        split: usize,
        state: &mut Vec<f32>,
        emit: &mut Emit<'_>,
    ) {
        self.run_task_generic::<Avx512Math, tiled::Avx512>(base_task, split, state, emit);
    }

    /// Compiled once per [`Simd`] level, inside the `run_task_*` function enabling its features.
    /// With [`AttentionParams::tiled`], a task of at least [`tiled::MIN_QUERIES`] queries takes
    /// the tiled kernel; every other task runs the per-query kernel below.
    #[inline(always)]
    fn run_task_generic<M: VecMath, T: tiled::TileMath>(
        &self,
        base_task: usize,
        split: usize,
        state: &mut Vec<f32>,
        emit: &mut Emit<'_>,
    ) {
        if self.p.tiled {
            let task = self.task(base_task, split);
            if task.nq >= tiled::MIN_QUERIES {
                tiled::run_task::<M, T>(self, &task, state, emit);
                return;
            }
        }
        let p = self.p;
        let (hd, nh) = (p.head_dim, p.n_heads);
        let kv_row = p.n_kv_heads * hd;
        let q_row = nh * hd;
        let n_qblocks = self.n_tokens.div_ceil(self.query_block);
        let (kv_h, qb) = (base_task / n_qblocks, base_task % n_qblocks);
        let t0 = qb * self.query_block;
        let nt = self.query_block.min(self.n_tokens - t0);
        let nq = nt * self.group;
        // Segments not stored as f32 are converted a block at a time into key/value buffers.
        let converted = self
            .segments
            .iter()
            .any(|s| !matches!((s.keys, s.values), (KvRows::F32(_), KvRows::F32(_))));
        let block_buf = if converted { KEY_BLOCK * hd } else { 0 };
        // state: acc[nq * hd], max[nq], denom[nq], scores[nq * KEY_BLOCK], keys and
        // values[block_buf]. Grown, never shrunk; only the softmax state needs initialising.
        let needed = nq * hd + 2 * nq + nq * KEY_BLOCK + 2 * block_buf;
        if state.len() < needed {
            state.resize(needed, 0.0);
        }
        let (acc, rest) = state[..needed].split_at_mut(nq * hd);
        let (maxes, rest) = rest.split_at_mut(nq);
        let (denoms, rest) = rest.split_at_mut(nq);
        let (scores, rest) = rest.split_at_mut(nq * KEY_BLOCK);
        let (key_buf, value_buf) = rest.split_at_mut(block_buf);
        acc.fill(0.0);
        denoms.fill(0.0);
        maxes.fill(f32::NEG_INFINITY);
        let query = |qi: usize| {
            let (t, hg) = (qi / self.group, qi % self.group);
            &self.q[(t0 + t) * q_row + (kv_h * self.group + hg) * hd..][..hd]
        };

        // This split's slice of the concatenated keys, and the positions any query here sees.
        let key_lo = split * self.total_keys / self.n_splits;
        let key_hi = (split + 1) * self.total_keys / self.n_splits;
        let mut ranges = [(0usize, 0usize); MAX_QUERY_BLOCK];
        for (t, r) in ranges[..nt].iter_mut().enumerate() {
            *r = self.visible_range(self.q_pos0 + t0 + t);
        }
        let vis_lo = ranges[..nt].iter().map(|r| r.0).min().unwrap_or(0);
        let vis_hi = ranges[..nt].iter().map(|r| r.1).max().unwrap_or(0);

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
                // Row `j` of this block for this kv head is `rows[(j - b0) * stride..][..hd]`.
                let head = kv_h * hd;
                let (keys, k_stride) = block_rows::<M>(seg.keys, b0, b1, kv_row, head, hd, key_buf);
                let (values, v_stride) =
                    block_rows::<M>(seg.values, b0, b1, kv_row, head, hd, value_buf);
                // Scores of every query against every key of the block (row `qi` of `scores`,
                // column `j - b0`), four queries per key read; keys a query does not see are
                // scored too but never used.
                let mut qi = 0;
                while qi + 4 <= nq {
                    let quad = [query(qi), query(qi + 1), query(qi + 2), query(qi + 3)];
                    for j in b0..b1 {
                        let dots = M::dot4(&quad, &keys[(j - b0) * k_stride..][..hd]);
                        for (r, d) in dots.into_iter().enumerate() {
                            scores[(qi + r) * KEY_BLOCK + j - b0] = d;
                        }
                    }
                    qi += 4;
                }
                for qi in qi..nq {
                    for j in b0..b1 {
                        let key = &keys[(j - b0) * k_stride..][..hd];
                        scores[qi * KEY_BLOCK + j - b0] = M::dot(query(qi), key);
                    }
                }
                // Keys of this block query `qi` sees: a contiguous sub-range (empty if lo >= hi).
                let visible = |qi: usize| {
                    let (v_lo, v_hi) = ranges[qi / self.group];
                    let j_lo = b0.max(v_lo.saturating_sub(seg.first_pos)).min(b1);
                    let j_hi = b1.min((v_hi + 1).saturating_sub(seg.first_pos));
                    (j_lo, j_hi.max(j_lo))
                };
                // Scores become softmax weights in place; keys a query does not see weigh 0.
                for qi in 0..nq {
                    let (j_lo, j_hi) = visible(qi);
                    let row = &mut scores[qi * KEY_BLOCK..][..b1 - b0];
                    row[..j_lo - b0].fill(0.0);
                    row[j_hi - b0..].fill(0.0);
                    if j_lo == j_hi {
                        continue;
                    }
                    let row = &mut row[j_lo - b0..j_hi - b0];
                    let block_max = match p.softcap {
                        // A running scalar max is one long dependency chain (a quarter of a
                        // vision tower's attention time): eight lanes break it.
                        None => M::scale_max(row, p.scale),
                        Some(cap) => {
                            let mut block_max = f32::NEG_INFINITY;
                            for s in row.iter_mut() {
                                *s *= p.scale;
                                *s = cap * (*s / cap).tanh();
                                block_max = block_max.max(*s);
                            }
                            block_max
                        }
                    };
                    let acc_q = &mut acc[qi * hd..(qi + 1) * hd];
                    let new_max = maxes[qi].max(block_max);
                    if new_max > maxes[qi] {
                        // Rescale what was accumulated under the old maximum.
                        let correction = exp::exp(maxes[qi] - new_max);
                        denoms[qi] *= correction;
                        acc_q.iter_mut().for_each(|a| *a *= correction);
                        maxes[qi] = new_max;
                    }
                    denoms[qi] += M::exp_shifted_sum(row, new_max);
                }
                // acc += weights · values, four queries per value row read.
                let mut qi = 0;
                while qi + 4 <= nq {
                    let (lo, hi) = (0..4)
                        .map(|r| visible(qi + r))
                        .filter(|(lo, hi)| lo < hi)
                        .fold((b1, b0), |(l, h), (lo, hi)| (l.min(lo), h.max(hi)));
                    if lo < hi {
                        let weights: [&[f32]; 4] = std::array::from_fn(|r| {
                            &scores[(qi + r) * KEY_BLOCK..][lo - b0..hi - b0]
                        });
                        let rows = &values[(lo - b0) * v_stride..];
                        M::axpy4(&mut acc[qi * hd..(qi + 4) * hd], &weights, rows, v_stride);
                    }
                    qi += 4;
                }
                for qi in qi..nq {
                    let (j_lo, j_hi) = visible(qi);
                    for j in j_lo..j_hi {
                        let value = &values[(j - b0) * v_stride..][..hd];
                        let w = scores[qi * KEY_BLOCK + j - b0];
                        M::axpy(&mut acc[qi * hd..(qi + 1) * hd], w, value);
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

    /// The tiled kernel's view of task `base_task`, key split `split`.
    fn task(&self, base_task: usize, split: usize) -> Task {
        let n_qblocks = self.n_tokens.div_ceil(self.query_block);
        let (kv_h, qb) = (base_task / n_qblocks, base_task % n_qblocks);
        let t0 = qb * self.query_block;
        let nt = self.query_block.min(self.n_tokens - t0);
        let mut ranges = [(0usize, 0usize); TILED_MAX_QUERY_BLOCK];
        for (t, r) in ranges[..nt].iter_mut().enumerate() {
            *r = self.visible_range(self.q_pos0 + t0 + t);
        }
        Task {
            kv_h,
            t0,
            nt,
            nq: nt * self.group,
            split,
            ranges,
        }
    }

    /// Query `qi` of `task` (token `qi / group`, head `qi % group` of the kv head's group).
    #[inline(always)]
    fn query(&self, task: &Task, qi: usize) -> &[f32] {
        let (hd, q_row) = (self.p.head_dim, self.p.n_heads * self.p.head_dim);
        let (t, hg) = (qi / self.group, qi % self.group);
        &self.q[(task.t0 + t) * q_row + (task.kv_h * self.group + hg) * hd..][..hd]
    }

    /// Values a key/value buffer of `block` rows needs: 0 when every segment is f32 (read in
    /// place), else `block · head_dim` (other formats are converted a block at a time).
    fn block_buffer_len(&self, block: usize) -> usize {
        let converted = self
            .segments
            .iter()
            .any(|s| !matches!((s.keys, s.values), (KvRows::F32(_), KvRows::F32(_))));
        if converted {
            block * self.p.head_dim
        } else {
            0
        }
    }

    /// Calls `f` on every block of at most `block` consecutive keys of the task's split that
    /// some query of the task sees, as f32 rows of the task's kv head (converted through
    /// `key_buf` / `value_buf`, [`Job::block_buffer_len`] values each): in position order, or
    /// the same blocks last to first when `backward`.
    ///
    /// Keys read in place are prefetched a block ahead: a head's rows are a short run in every
    /// long kv row, which the hardware prefetcher does not follow.
    #[inline(always)]
    fn for_each_block<M: VecMath>(
        &self,
        task: &Task,
        block: usize,
        backward: bool,
        key_buf: &mut [f32],
        value_buf: &mut [f32],
        mut f: impl FnMut(&KeyBlock<'_>),
    ) {
        let hd = self.p.head_dim;
        let kv_row = self.p.n_kv_heads * hd;
        let head = task.kv_h * hd;
        // This split's slice of the concatenated keys, and the positions any query here sees.
        let key_lo = task.split * self.total_keys / self.n_splits;
        let key_hi = (task.split + 1) * self.total_keys / self.n_splits;
        let ranges = &task.ranges[..task.nt];
        let vis_lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let vis_hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        // One loop for both directions (a closure per direction would not be inlined into
        // the caller's SIMD build).
        let n_segs = self.segments.len();
        let mut edge = if backward { self.total_keys } else { 0 };
        for s in 0..n_segs {
            let seg = &self.segments[if backward { n_segs - 1 - s } else { s }];
            let seg_start = if backward { edge - seg.len } else { edge };
            edge = if backward { seg_start } else { edge + seg.len };
            let seg_end = seg_start + seg.len;
            // Indices of this segment inside the split, clipped to the visible positions.
            let lo = key_lo.max(seg_start) - seg_start;
            let hi = key_hi.min(seg_end).saturating_sub(seg_start);
            let lo = lo.max(vis_lo.saturating_sub(seg.first_pos));
            let hi = hi.min((vis_hi + 1).saturating_sub(seg.first_pos));
            let n_blocks = hi.saturating_sub(lo).div_ceil(block);
            for i in 0..n_blocks {
                let b = if backward { n_blocks - 1 - i } else { i };
                let b0 = lo + b * block;
                let b1 = (b0 + block).min(hi);
                if i + 1 < n_blocks {
                    let next = if backward { b0 - block } else { b1 };
                    let rows = next..(next + block).min(hi);
                    for r in [seg.keys, seg.values] {
                        if let KvRows::F32(v) = r {
                            let v = &v[rows.start * kv_row + head..];
                            M::prefetch_rows(v, kv_row, rows.len(), hd);
                        }
                    }
                }
                let (keys, k_stride) =
                    block_rows::<M>(seg.keys, b0, b1, kv_row, head, hd, &mut *key_buf);
                let (values, v_stride) =
                    block_rows::<M>(seg.values, b0, b1, kv_row, head, hd, &mut *value_buf);
                f(&KeyBlock {
                    pos: seg.first_pos + b0,
                    n: b1 - b0,
                    keys,
                    k_stride,
                    values,
                    v_stride,
                });
            }
        }
    }
}

/// The queries of one tiled task: kv head `kv_h`, tokens `t0..t0 + nt` (all `group` query heads of
/// each, `nq = nt · group` queries, token-major), and one split of the keys.
struct Task {
    kv_h: usize,
    t0: usize,
    nt: usize,
    nq: usize,
    split: usize,
    /// Key positions `[lo, hi]` visible to each token (the first `nt` entries).
    ranges: [(usize, usize); TILED_MAX_QUERY_BLOCK],
}

/// Keys at positions `pos..pos + n` for one kv head, as f32: key `j` is
/// `keys[j * k_stride..][..head_dim]`, value `j` is `values[j * v_stride..][..head_dim]`.
struct KeyBlock<'r> {
    pos: usize,
    n: usize,
    keys: &'r [f32],
    k_stride: usize,
    values: &'r [f32],
    v_stride: usize,
}

impl KeyBlock<'_> {
    /// Keys `j_lo..j_hi` of this block (indices into it) inside the visible positions
    /// `[lo, hi]`; empty (`j_lo == j_hi`) if none.
    #[inline(always)]
    fn visible(&self, (lo, hi): (usize, usize)) -> (usize, usize) {
        let j_lo = lo.saturating_sub(self.pos).min(self.n);
        let j_hi = (hi + 1).saturating_sub(self.pos).min(self.n);
        (j_lo, j_hi.max(j_lo))
    }
}

/// Rows `b0..b1` of `rows` for the head starting at value `head` of each row, as f32: the
/// stored rows themselves (stride `kv_row`) for f32, else converted into `buf` (stride
/// `head_dim`).
#[inline(always)]
fn block_rows<'r, M: VecMath>(
    rows: KvRows<'r>,
    b0: usize,
    b1: usize,
    kv_row: usize,
    head: usize,
    hd: usize,
    buf: &'r mut [f32],
) -> (&'r [f32], usize) {
    if let KvRows::F32(v) = rows {
        return (&v[b0 * kv_row + head..], kv_row);
    }
    for j in b0..b1 {
        M::read(&rows, j * kv_row + head, &mut buf[(j - b0) * hd..][..hd]);
    }
    (buf, hd)
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

/// Inner products of the attention loops: plain Rust, or AVX2 with fused multiply-adds, or
/// AVX-512 with the AVX2 results to the bit.
trait VecMath {
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// Four queries against one key (the key is read once for all four).
    fn dot4(queries: &[&[f32]; 4], key: &[f32]) -> [f32; 4];
    fn axpy(acc: &mut [f32], w: f32, v: &[f32]);
    /// For four queries `r` (accumulators `acc[r·hd..(r+1)·hd]`, `hd = acc.len() / 4`):
    /// `acc_r += Σ_j weights[r][j] · rows[j·stride..][..hd]`; each value row is read once.
    fn axpy4(acc: &mut [f32], weights: &[&[f32]; 4], rows: &[f32], stride: usize);
    /// `x[i] *= scale`; returns the largest result (the same value whatever the order).
    fn scale_max(x: &mut [f32], scale: f32) -> f32;
    /// `x[i] = e^(x[i] - shift)`; returns their sum.
    fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32;
    /// Values `offset..offset + dst.len()` of `rows`, as f32.
    fn read(rows: &KvRows<'_>, offset: usize, dst: &mut [f32]);
    /// Hints that `rows[j·stride..][..len]`, `j < n` (as far as `rows` goes), is read soon
    /// (tiled kernel only).
    fn prefetch_rows(rows: &[f32], stride: usize, n: usize, len: usize) {
        let _ = (rows, stride, n, len);
    }
}

struct ScalarMath;

impl VecMath for ScalarMath {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot8(a, b)
    }
    #[inline(always)]
    fn dot4(queries: &[&[f32]; 4], key: &[f32]) -> [f32; 4] {
        queries.map(|q| dot8(q, key))
    }
    #[inline(always)]
    fn axpy(acc: &mut [f32], w: f32, v: &[f32]) {
        axpy8(acc, w, v)
    }
    #[inline(always)]
    fn axpy4(acc: &mut [f32], weights: &[&[f32]; 4], rows: &[f32], stride: usize) {
        let hd = acc.len() / 4;
        for (r, acc_r) in acc.chunks_exact_mut(hd).enumerate() {
            for (j, &w) in weights[r].iter().enumerate() {
                axpy8(acc_r, w, &rows[j * stride..][..hd]);
            }
        }
    }
    #[inline(always)]
    fn scale_max(x: &mut [f32], scale: f32) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut chunks = x.chunks_exact_mut(8);
        for chunk in &mut chunks {
            for (v, m) in chunk.iter_mut().zip(&mut lanes) {
                *v *= scale;
                *m = m.max(*v);
            }
        }
        let mut best = lanes.into_iter().fold(f32::NEG_INFINITY, f32::max);
        for v in chunks.into_remainder() {
            *v *= scale;
            best = best.max(*v);
        }
        best
    }
    #[inline(always)]
    fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
        exp::exp_shifted_sum_scalar(x, shift)
    }
    #[inline(always)]
    fn read(rows: &KvRows<'_>, offset: usize, dst: &mut [f32]) {
        rows.read_into(Isa::Scalar, offset, dst)
    }
}

/// The sum of a vector's eight lanes, in the fixed order every x86 build's dot products end
/// with: the two 128-bit halves, then lanes 0+2 and 1+3, then those two.
///
/// # Safety
/// AVX must be available (callers run inside a `run_task_*` enabling it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum8(s: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_movehdup_ps(h));
    _mm_cvtss_f32(h)
}

/// Only used inside `Job::run_task_avx2` and `Job::run_task_avx512`, which are reached only
/// when AVX2 + FMA + F16C were detected.
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
            // A half chunk left (head_dim 72 = 4·16 + 8, SigLIP's) is one more vector.
            let mut done = chunks * 16;
            if n - done >= 8 {
                let (pa, pb) = (a.as_ptr().add(done), b.as_ptr().add(done));
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), s0);
                done += 8;
            }
            let mut total = hsum8(_mm256_add_ps(s0, s1));
            for i in done..n {
                total += a[i] * b[i];
            }
            total
        }
    }

    #[inline(always)]
    fn dot4(queries: &[&[f32]; 4], key: &[f32]) -> [f32; 4] {
        use std::arch::x86_64::*;
        let n = key.len();
        assert!(queries.iter().all(|q| q.len() == n));
        let chunks = n / 16;
        // SAFETY: AVX2 + FMA detected (see the struct); loads stay inside `n` values of each
        // slice (lengths checked above).
        unsafe {
            // Two accumulators per query: eight independent FMA chains.
            let mut lo = [_mm256_setzero_ps(); 4];
            let mut hi = [_mm256_setzero_ps(); 4];
            for c in 0..chunks {
                let pk = key.as_ptr().add(16 * c);
                let (k0, k1) = (_mm256_loadu_ps(pk), _mm256_loadu_ps(pk.add(8)));
                for r in 0..4 {
                    let pq = queries[r].as_ptr().add(16 * c);
                    lo[r] = _mm256_fmadd_ps(_mm256_loadu_ps(pq), k0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(8)), k1, hi[r]);
                }
            }
            // A half chunk left (head_dim 72) is one more vector per query.
            let mut done = chunks * 16;
            if n - done >= 8 {
                let k0 = _mm256_loadu_ps(key.as_ptr().add(done));
                for r in 0..4 {
                    let q0 = _mm256_loadu_ps(queries[r].as_ptr().add(done));
                    lo[r] = _mm256_fmadd_ps(q0, k0, lo[r]);
                }
                done += 8;
            }
            let mut out = [0.0f32; 4];
            for r in 0..4 {
                out[r] = hsum8(_mm256_add_ps(lo[r], hi[r]));
                for i in done..n {
                    out[r] += queries[r][i] * key[i];
                }
            }
            out
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

    #[inline(always)]
    fn axpy4(acc: &mut [f32], weights: &[&[f32]; 4], rows: &[f32], stride: usize) {
        use std::arch::x86_64::*;
        let hd = acc.len() / 4;
        let n = weights[0].len();
        assert!(weights.iter().all(|w| w.len() == n));
        assert!(n == 0 || rows.len() >= (n - 1) * stride + hd);
        let chunks = hd / 16;
        // SAFETY: AVX2 + FMA detected (see the struct). Accumulator loads and stores stay
        // inside `acc` (4·hd values), value loads inside row `j < n` (length checked above),
        // weight reads inside each `n`-long slice.
        unsafe {
            // Sixteen dimensions of four queries (eight registers) stay in registers while
            // every value row of the block is added in.
            for c in 0..chunks {
                let mut a = [_mm256_setzero_ps(); 8];
                for r in 0..4 {
                    let pa = acc.as_ptr().add(r * hd + 16 * c);
                    a[2 * r] = _mm256_loadu_ps(pa);
                    a[2 * r + 1] = _mm256_loadu_ps(pa.add(8));
                }
                for j in 0..n {
                    let pv = rows.as_ptr().add(j * stride + 16 * c);
                    let (v0, v1) = (_mm256_loadu_ps(pv), _mm256_loadu_ps(pv.add(8)));
                    for r in 0..4 {
                        let w = _mm256_set1_ps(*weights[r].get_unchecked(j));
                        a[2 * r] = _mm256_fmadd_ps(w, v0, a[2 * r]);
                        a[2 * r + 1] = _mm256_fmadd_ps(w, v1, a[2 * r + 1]);
                    }
                }
                for r in 0..4 {
                    let pa = acc.as_mut_ptr().add(r * hd + 16 * c);
                    _mm256_storeu_ps(pa, a[2 * r]);
                    _mm256_storeu_ps(pa.add(8), a[2 * r + 1]);
                }
            }
        }
        // A half chunk left (head_dim 72 = 4·16 + 8): eight dimensions of the four queries.
        let mut done = chunks * 16;
        if hd - done >= 8 {
            // SAFETY: as above, for dimensions `done..done + 8 <= hd`.
            unsafe {
                let mut a: [__m256; 4] =
                    std::array::from_fn(|r| _mm256_loadu_ps(acc.as_ptr().add(r * hd + done)));
                for j in 0..n {
                    let v0 = _mm256_loadu_ps(rows.as_ptr().add(j * stride + done));
                    for (r, a_r) in a.iter_mut().enumerate() {
                        let w = _mm256_set1_ps(*weights[r].get_unchecked(j));
                        *a_r = _mm256_fmadd_ps(w, v0, *a_r);
                    }
                }
                for (r, a_r) in a.iter().enumerate() {
                    _mm256_storeu_ps(acc.as_mut_ptr().add(r * hd + done), *a_r);
                }
            }
            done += 8;
        }
        for r in 0..4 {
            for d in done..hd {
                let mut sum = acc[r * hd + d];
                for (j, &w) in weights[r].iter().enumerate() {
                    sum += w * rows[j * stride + d];
                }
                acc[r * hd + d] = sum;
            }
        }
    }

    #[inline(always)]
    fn scale_max(x: &mut [f32], scale: f32) -> f32 {
        use std::arch::x86_64::*;
        let chunks = x.len() / 8;
        // SAFETY: AVX2 detected (see the struct); loads and stores stay inside `x`.
        let mut best = unsafe {
            let s = _mm256_set1_ps(scale);
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in 0..chunks {
                let p = x.as_mut_ptr().add(8 * c);
                let v = _mm256_mul_ps(_mm256_loadu_ps(p), s);
                _mm256_storeu_ps(p, v);
                m = _mm256_max_ps(m, v);
            }
            let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_max_ss(h, _mm_movehdup_ps(h));
            _mm_cvtss_f32(h)
        };
        for v in &mut x[chunks * 8..] {
            *v *= scale;
            best = best.max(*v);
        }
        best
    }

    #[inline(always)]
    fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
        // SAFETY: AVX2 + FMA detected (see the struct).
        unsafe { exp::exp_shifted_sum_avx2(x, shift) }
    }

    #[inline(always)]
    fn read(rows: &KvRows<'_>, offset: usize, dst: &mut [f32]) {
        // `Isa::Avx2` (AVX2 + FMA + F16C) was checked available by `attention_with`.
        rows.read_into(Isa::Avx2, offset, dst)
    }

    #[inline(always)]
    fn prefetch_rows(rows: &[f32], stride: usize, n: usize, len: usize) {
        use std::arch::x86_64::*;
        for j in 0..n {
            let Some(row) = rows.get(j * stride..(j * stride + len).min(rows.len())) else {
                return;
            };
            // Into L2: a block is too much for L1 next to the task's own buffers. Every line
            // of the row: its first value's, every 16th after, and its last value's.
            let last = row.len().saturating_sub(1);
            for i in (0..row.len()).step_by(16).chain([last]) {
                // SAFETY: a prefetch (SSE, part of x86-64) of an address inside `row`.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(row.as_ptr().add(i).cast()) };
            }
        }
    }
}

/// [`Avx2Math`] on 512-bit registers, giving its results to the bit; only used inside
/// `Job::run_task_avx512`, which is reached only when AVX-512F/BW/VL, AVX2, FMA and F16C were
/// detected.
///
/// Where [`Avx2Math`] keeps two eight-lane accumulators per query, `lo` over values
/// `16c..16c + 8` and `hi` over `16c + 8..16c + 16`, one 512-bit register holds `lo` in its low
/// half and `hi` in its high half: every lane sees the same products in the same order. A half
/// chunk left (head_dim 72) is a fused multiply-add on the low half only (masked), and the
/// reduction adds the halves (`lo + hi`) before the same eight-lane sum ([`hsum8`]; `dot4`
/// reduces its four queries side by side, [`hsum16x4`]). The multiply-adds of `axpy`/`axpy4`
/// are element-wise, so wider vectors (and `axpy4`'s tiles of 32 dimensions) change nothing as
/// long as the same elements are fused (those of whole 8-lane vectors) and the rest left to
/// the same scalar loop. Exponentials are 16 lanes of the same steps
/// ([`exp::exp_shifted_sum_avx512`]), f16 rows convert 16 values at a time (exactly);
/// `scale_max` stays AVX2's (its cost is negligible).
#[cfg(target_arch = "x86_64")]
struct Avx512Math;

/// `lo + hi` of a 512-bit accumulator, then [`hsum8`]: [`Avx2Math`]'s reduction of `lo` and
/// `hi`.
///
/// # Safety
/// AVX-512F must be available (callers run inside `Job::run_task_avx512`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum16(s: std::arch::x86_64::__m512) -> f32 {
    use std::arch::x86_64::*;
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
    hsum8(_mm256_add_ps(_mm512_castps512_ps256(s), hi))
}

/// [`hsum16`] of four accumulators at once, the same additions lane for lane (same operands,
/// same order) with the four queries side by side: `lo + hi` of two queries per addition,
/// then the 128-bit halves of all four in one, then lanes 0+2 and 1+3, then those two.
///
/// # Safety
/// AVX-512F must be available (callers run inside `Job::run_task_avx512`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum16x4(acc: [std::arch::x86_64::__m512; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    // 128-bit quarters: `lo` is quarters 0 and 1 of a register, `hi` quarters 2 and 3.
    // [lo_a, lo_b] + [hi_a, hi_b] = [s_a, s_b], each `s` eight lanes as in `hsum16`.
    let pair = |a: __m512, b: __m512| {
        let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
        let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
        _mm512_add_ps(lo, hi)
    };
    let (s01, s23) = (pair(acc[0], acc[1]), pair(acc[2], acc[3]));
    // Low 128 bits of each `s` + its high 128 bits: quarter `r` is query `r`'s four lanes.
    let low = _mm512_shuffle_f32x4::<0b10_00_10_00>(s01, s23);
    let high = _mm512_shuffle_f32x4::<0b11_01_11_01>(s01, s23);
    let h = _mm512_add_ps(low, high);
    // Per quarter: [h0 + h2, h1 + h3, ..] (`_mm_movehl_ps(h, h)`), then lane 0 plus lane 1.
    let h = _mm512_add_ps(h, _mm512_permute_ps::<0b11_10_11_10>(h));
    let h = _mm512_add_ps(h, _mm512_movehdup_ps(h));
    let mut lanes = [0.0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), h);
    [lanes[0], lanes[4], lanes[8], lanes[12]]
}

/// The low eight lanes of a 512-bit register (a half chunk of 16 values).
#[cfg(target_arch = "x86_64")]
const LOW_HALF: std::arch::x86_64::__mmask16 = 0x00ff;

#[cfg(target_arch = "x86_64")]
impl VecMath for Avx512Math {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let n = a.len().min(b.len());
        let chunks = n / 16;
        // SAFETY: AVX-512F + FMA detected (see the struct); full loads stay inside `n` values,
        // the masked ones read only their eight low lanes, inside `n` too.
        unsafe {
            let mut s = _mm512_setzero_ps();
            for c in 0..chunks {
                let (pa, pb) = (a.as_ptr().add(16 * c), b.as_ptr().add(16 * c));
                s = _mm512_fmadd_ps(_mm512_loadu_ps(pa), _mm512_loadu_ps(pb), s);
            }
            let mut done = chunks * 16;
            if n - done >= 8 {
                let qa = _mm512_maskz_loadu_ps(LOW_HALF, a.as_ptr().add(done));
                let qb = _mm512_maskz_loadu_ps(LOW_HALF, b.as_ptr().add(done));
                s = _mm512_mask3_fmadd_ps(qa, qb, s, LOW_HALF);
                done += 8;
            }
            let mut total = hsum16(s);
            for i in done..n {
                total += a[i] * b[i];
            }
            total
        }
    }

    #[inline(always)]
    fn dot4(queries: &[&[f32]; 4], key: &[f32]) -> [f32; 4] {
        use std::arch::x86_64::*;
        let n = key.len();
        assert!(queries.iter().all(|q| q.len() == n));
        let chunks = n / 16;
        // SAFETY: AVX-512F + FMA detected (see the struct); loads stay inside `n` values of
        // each slice (lengths checked above), the masked ones read only their low eight lanes.
        unsafe {
            // One accumulator per query: Avx2Math's `lo` and `hi` side by side.
            let mut acc = [_mm512_setzero_ps(); 4];
            for c in 0..chunks {
                let k = _mm512_loadu_ps(key.as_ptr().add(16 * c));
                for r in 0..4 {
                    let q = _mm512_loadu_ps(queries[r].as_ptr().add(16 * c));
                    acc[r] = _mm512_fmadd_ps(q, k, acc[r]);
                }
            }
            // A half chunk left (head_dim 72): into the low halves (`lo`) only.
            let mut done = chunks * 16;
            if n - done >= 8 {
                let k = _mm512_maskz_loadu_ps(LOW_HALF, key.as_ptr().add(done));
                for r in 0..4 {
                    let q = _mm512_maskz_loadu_ps(LOW_HALF, queries[r].as_ptr().add(done));
                    acc[r] = _mm512_mask3_fmadd_ps(q, k, acc[r], LOW_HALF);
                }
                done += 8;
            }
            let mut out = hsum16x4(acc);
            for r in 0..4 {
                for i in done..n {
                    out[r] += queries[r][i] * key[i];
                }
            }
            out
        }
    }

    #[inline(always)]
    fn axpy(acc: &mut [f32], w: f32, v: &[f32]) {
        use std::arch::x86_64::*;
        let n = acc.len().min(v.len());
        let chunks = n / 16;
        let mut done = chunks * 16;
        // SAFETY: AVX-512F + FMA detected (see the struct); loads and stores stay inside `n`
        // values of both slices.
        unsafe {
            let wv = _mm512_set1_ps(w);
            for c in 0..chunks {
                let pa = acc.as_mut_ptr().add(16 * c);
                let x = _mm512_loadu_ps(v.as_ptr().add(16 * c));
                _mm512_storeu_ps(pa, _mm512_fmadd_ps(wv, x, _mm512_loadu_ps(pa)));
            }
            // Fused like Avx2Math's last whole vector.
            if n - done >= 8 {
                let pa = acc.as_mut_ptr().add(done);
                let x = _mm256_loadu_ps(v.as_ptr().add(done));
                let y = _mm256_fmadd_ps(_mm256_set1_ps(w), x, _mm256_loadu_ps(pa));
                _mm256_storeu_ps(pa, y);
                done += 8;
            }
        }
        for i in done..n {
            acc[i] += w * v[i];
        }
    }

    #[inline(always)]
    fn axpy4(acc: &mut [f32], weights: &[&[f32]; 4], rows: &[f32], stride: usize) {
        use std::arch::x86_64::*;
        let hd = acc.len() / 4;
        let n = weights[0].len();
        assert!(weights.iter().all(|w| w.len() == n));
        assert!(n == 0 || rows.len() >= (n - 1) * stride + hd);
        let chunks = hd / 32;
        // SAFETY: AVX-512F + FMA detected (see the struct). Accumulator loads and stores stay
        // inside `acc` (4·hd values), value loads inside row `j < n` (length checked above),
        // weight reads inside each `n`-long slice.
        unsafe {
            // Thirty-two dimensions of four queries (eight registers) stay in registers while
            // every value row of the block is added in.
            for c in 0..chunks {
                let mut a = [_mm512_setzero_ps(); 8];
                for r in 0..4 {
                    let pa = acc.as_ptr().add(r * hd + 32 * c);
                    a[2 * r] = _mm512_loadu_ps(pa);
                    a[2 * r + 1] = _mm512_loadu_ps(pa.add(16));
                }
                for j in 0..n {
                    let pv = rows.as_ptr().add(j * stride + 32 * c);
                    let (v0, v1) = (_mm512_loadu_ps(pv), _mm512_loadu_ps(pv.add(16)));
                    for r in 0..4 {
                        let w = _mm512_set1_ps(*weights[r].get_unchecked(j));
                        a[2 * r] = _mm512_fmadd_ps(w, v0, a[2 * r]);
                        a[2 * r + 1] = _mm512_fmadd_ps(w, v1, a[2 * r + 1]);
                    }
                }
                for r in 0..4 {
                    let pa = acc.as_mut_ptr().add(r * hd + 32 * c);
                    _mm512_storeu_ps(pa, a[2 * r]);
                    _mm512_storeu_ps(pa.add(16), a[2 * r + 1]);
                }
            }
        }
        let mut done = chunks * 32;
        // Sixteen dimensions left (head_dim 16 or 48): one register per query.
        if hd - done >= 16 {
            // SAFETY: as above, for dimensions `done..done + 16 <= hd`.
            unsafe {
                let mut a: [__m512; 4] =
                    std::array::from_fn(|r| _mm512_loadu_ps(acc.as_ptr().add(r * hd + done)));
                for j in 0..n {
                    let v0 = _mm512_loadu_ps(rows.as_ptr().add(j * stride + done));
                    for (r, a_r) in a.iter_mut().enumerate() {
                        let w = _mm512_set1_ps(*weights[r].get_unchecked(j));
                        *a_r = _mm512_fmadd_ps(w, v0, *a_r);
                    }
                }
                for (r, a_r) in a.iter().enumerate() {
                    _mm512_storeu_ps(acc.as_mut_ptr().add(r * hd + done), *a_r);
                }
            }
            done += 16;
        }
        // Eight (head_dim 72 = 2·32 + 8) and the scalar rest exactly as Avx2Math does them.
        if hd - done >= 8 {
            // SAFETY: as above, for dimensions `done..done + 8 <= hd`.
            unsafe {
                let mut a: [__m256; 4] =
                    std::array::from_fn(|r| _mm256_loadu_ps(acc.as_ptr().add(r * hd + done)));
                for j in 0..n {
                    let v0 = _mm256_loadu_ps(rows.as_ptr().add(j * stride + done));
                    for (r, a_r) in a.iter_mut().enumerate() {
                        let w = _mm256_set1_ps(*weights[r].get_unchecked(j));
                        *a_r = _mm256_fmadd_ps(w, v0, *a_r);
                    }
                }
                for (r, a_r) in a.iter().enumerate() {
                    _mm256_storeu_ps(acc.as_mut_ptr().add(r * hd + done), *a_r);
                }
            }
            done += 8;
        }
        for r in 0..4 {
            for d in done..hd {
                let mut sum = acc[r * hd + d];
                for (j, &w) in weights[r].iter().enumerate() {
                    sum += w * rows[j * stride + d];
                }
                acc[r * hd + d] = sum;
            }
        }
    }

    #[inline(always)]
    fn scale_max(x: &mut [f32], scale: f32) -> f32 {
        Avx2Math::scale_max(x, scale)
    }

    #[inline(always)]
    fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
        // SAFETY: AVX-512F, AVX2 and FMA detected (see the struct).
        unsafe { exp::exp_shifted_sum_avx512(x, shift) }
    }

    #[inline(always)]
    fn read(rows: &KvRows<'_>, offset: usize, dst: &mut [f32]) {
        // `Isa::Avx512` (AVX-512F/BW/VL, AVX2, FMA, F16C) was checked available by
        // `attention_with`; f16 rows convert sixteen values at a time (exactly, like AVX2).
        rows.read_into(Isa::Avx512, offset, dst)
    }

    #[inline(always)]
    fn prefetch_rows(rows: &[f32], stride: usize, n: usize, len: usize) {
        Avx2Math::prefetch_rows(rows, stride, n, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::kv::{CacheType, KvBuffer};

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
        naive_spans(p, q, q_pos0, k, v, n_keys, &[])
    }

    /// [`naive`] where queries in a span also see the span's later keys (the sliding window
    /// still bounds the past).
    fn naive_spans(
        p: &AttentionParams,
        q: &[f32],
        q_pos0: usize,
        k: &[f32],
        v: &[f32],
        n_keys: usize,
        spans: &[Range<usize>],
    ) -> Vec<f32> {
        let same_span = |i: usize, j: usize| spans.iter().any(|s| s.contains(&i) && s.contains(&j));
        let (hd, nh, nkv) = (p.head_dim, p.n_heads, p.n_kv_heads);
        let n_tokens = q.len() / (nh * hd);
        let mut out = vec![0.0; q.len()];
        for t in 0..n_tokens {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let qv = &q[(t * nh + h) * hd..][..hd];
                let scores: Vec<Option<f64>> = (0..n_keys)
                    .map(|j| {
                        let i = q_pos0 + t;
                        let in_window = match p.mask {
                            AttentionMask::Causal => true,
                            AttentionMask::SlidingWindow(w) => j + w > i,
                        };
                        (p.mask.visible(i, j) || (same_span(i, j) && in_window)).then(|| {
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

    /// Every instruction set this CPU runs that picks its own attention loops (scalar, AVX2,
    /// AVX-512, and the selected one).
    fn simd_levels() -> Vec<Isa> {
        let mut isas: Vec<Isa> = [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect();
        let selected = crate::quant::selected_isa();
        if !isas.contains(&selected) {
            isas.push(selected);
        }
        isas
    }

    /// `(tiled, isa)`: the per-query kernel and the tiled one on every [`simd_levels`] level.
    fn kernels() -> Vec<(bool, Isa)> {
        [false, true]
            .into_iter()
            .flat_map(|tiled| simd_levels().into_iter().map(move |isa| (tiled, isa)))
            .collect()
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
                tiled: false,
            };
            let n_keys = 9;
            let k = pseudo_random(n_keys * 16, 1);
            let v = pseudo_random(n_keys * 16, 2);
            // The last 4 positions are queries; keys are split into three segments.
            let q = pseudo_random(4 * 32, 3);
            let segs = [
                KvSegment {
                    keys: KvRows::F32(&k[..2 * 16]),
                    values: KvRows::F32(&v[..2 * 16]),
                    first_pos: 0,
                    len: 2,
                },
                KvSegment {
                    keys: KvRows::F32(&k[2 * 16..5 * 16]),
                    values: KvRows::F32(&v[2 * 16..5 * 16]),
                    first_pos: 2,
                    len: 3,
                },
                KvSegment {
                    keys: KvRows::F32(&k[5 * 16..]),
                    values: KvRows::F32(&v[5 * 16..]),
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

    /// Bidirectional spans (image blocks) longer than the window, starting before and inside
    /// the chunk of queries, on causal and sliding masks, SIMD and scalar.
    #[test]
    // One span covering every position is a case of its own (a vision tower's attention).
    #[allow(clippy::single_range_in_vec_init)]
    fn bidirectional_spans_match_naive_attention() {
        let pool = ThreadPool::new(2);
        let (nh, nkv, hd) = (4, 2, 16);
        let n_keys = 150;
        let k = pseudo_random(n_keys * nkv * hd, 11);
        let v = pseudo_random(n_keys * nkv * hd, 12);
        for mask in [AttentionMask::Causal, AttentionMask::SlidingWindow(7)] {
            for (q_pos0, spans) in [
                (0usize, vec![0..n_keys]),
                (40, vec![45..61, 70..71, 100..140]),
                (100, vec![100..117, 130..150]),
            ] {
                let p = AttentionParams {
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hd,
                    scale: 0.25,
                    softcap: None,
                    mask,
                    tiled: false,
                };
                let n_queries = n_keys - q_pos0;
                let q = pseudo_random(n_queries * nh * hd, 13);
                let split = 60;
                let segs = [
                    KvSegment {
                        keys: KvRows::F32(&k[..split * nkv * hd]),
                        values: KvRows::F32(&v[..split * nkv * hd]),
                        first_pos: 0,
                        len: split,
                    },
                    KvSegment {
                        keys: KvRows::F32(&k[split * nkv * hd..]),
                        values: KvRows::F32(&v[split * nkv * hd..]),
                        first_pos: split,
                        len: n_keys - split,
                    },
                ];
                let expected = naive_spans(&p, &q, q_pos0, &k, &v, n_keys, &spans);
                let plain = naive(&p, &q, q_pos0, &k, &v, n_keys);
                let moved = expected
                    .iter()
                    .zip(&plain)
                    .any(|(a, b)| (a - b).abs() > 1e-3);
                assert!(moved, "spans {spans:?} must change the result");
                for (tiled, isa) in kernels() {
                    let p = AttentionParams { tiled, ..p };
                    let mut out = vec![0.0; q.len()];
                    attention_with(&pool, isa, &p, &q, q_pos0, &segs, &spans, &mut out);
                    for (a, b) in out.iter().zip(&expected) {
                        assert!(
                            (a - b).abs() < 1e-5,
                            "{mask:?} {spans:?} {isa:?} tiled {tiled}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// Head dimensions that are not a multiple of 16 (SigLIP's 72, and others with and
    /// without a half-vector or scalar remainder), through the blocked SIMD and scalar loops.
    #[test]
    // One span covering every position: a vision tower's attention.
    #[allow(clippy::single_range_in_vec_init)]
    fn odd_head_dims_match_naive_attention() {
        let pool = ThreadPool::new(2);
        let n = 70;
        for hd in [72, 12, 24, 40, 9, 3] {
            let p = AttentionParams {
                n_heads: 2,
                n_kv_heads: 2,
                head_dim: hd,
                scale: (hd as f32).powf(-0.5),
                softcap: None,
                mask: AttentionMask::Causal,
                tiled: false,
            };
            let k = pseudo_random(n * 2 * hd, 21);
            let v = pseudo_random(n * 2 * hd, 22);
            let q = pseudo_random(n * 2 * hd, 23);
            let segs = [KvSegment {
                keys: KvRows::F32(&k),
                values: KvRows::F32(&v),
                first_pos: 0,
                len: n,
            }];
            let expected = naive_spans(&p, &q, 0, &k, &v, n, &[0..n]);
            for (tiled, isa) in kernels() {
                let p = AttentionParams { tiled, ..p };
                let mut out = vec![0.0; q.len()];
                attention_with(&pool, isa, &p, &q, 0, &segs, &[0..n], &mut out);
                for (a, b) in out.iter().zip(&expected) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "head_dim {hd} {isa:?} tiled {tiled}: {a} vs {b}"
                    );
                }
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
                    tiled: false,
                };
                let n_keys = 300;
                let k = pseudo_random(n_keys * 16, 4);
                let v = pseudo_random(n_keys * 16, 5);
                let q = pseudo_random(n_queries * 64, 6);
                let q_pos0 = n_keys - n_queries;
                let split = 130;
                let segs = [
                    KvSegment {
                        keys: KvRows::F32(&k[..split * 16]),
                        values: KvRows::F32(&v[..split * 16]),
                        first_pos: 0,
                        len: split,
                    },
                    KvSegment {
                        keys: KvRows::F32(&k[split * 16..]),
                        values: KvRows::F32(&v[split * 16..]),
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
                        &[],
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

    /// Largest error storing `x` in `cache_type` can make in each value: f16 keeps 11
    /// significant bits (|Δ| ≤ |x|·2⁻¹¹ for normal values); Q8_0 rounds to half a step of
    /// `amax / 127` and stores that step as f16 (another `amax·2⁻¹¹`).
    fn storage_error_bounds(cache_type: CacheType, x: &[f32]) -> Vec<f32> {
        let half_ulp = 2f32.powi(-11);
        match cache_type {
            CacheType::F32 => vec![0.0; x.len()],
            CacheType::F16 => x.iter().map(|v| v.abs() * half_ulp).collect(),
            CacheType::Q8_0 => x
                .chunks(32)
                .flat_map(|block| {
                    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    std::iter::repeat_n(amax / 254.0 + amax * half_ulp, block.len())
                })
                .collect(),
        }
    }

    /// Keys and values in f16 and Q8_0, read straight from their stored format in two
    /// segments: the result equals naive attention over the values read back (the kernel reads
    /// the format right), and stays within what the storage precision allows of attention over
    /// the exact f32 values: if every score moves by at most δ, every softmax weight moves by a
    /// factor within e^±2δ, so the output moves by at most (e^2δ − 1)·max|v| + max|Δv|.
    #[test]
    fn f16_and_q8_0_segments_match_naive_attention() {
        let pool = ThreadPool::new(3);
        let (nh, nkv, hd) = (4, 2, 64);
        let row = nkv * hd;
        let n_keys = 200;
        let k: Vec<f32> = pseudo_random(n_keys * row, 7)
            .iter()
            .map(|x| 3.0 * x)
            .collect();
        let v = pseudo_random(n_keys * row, 8);
        let key_bounds_of = |ct| storage_error_bounds(ct, &k);
        let v_max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        for mask in [AttentionMask::Causal, AttentionMask::SlidingWindow(50)] {
            for n_queries in [1usize, 11] {
                let p = AttentionParams {
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hd,
                    scale: 0.125,
                    softcap: None,
                    mask,
                    tiled: false,
                };
                let q = pseudo_random(n_queries * nh * hd, 9);
                let q_pos0 = n_keys - n_queries;
                let exact = naive(&p, &q, q_pos0, &k, &v, n_keys);
                for cache_type in [CacheType::F16, CacheType::Q8_0] {
                    let mut keys = KvBuffer::new(cache_type, k.len());
                    let mut values = KvBuffer::new(cache_type, v.len());
                    keys.store(Isa::Scalar, 0, &k);
                    values.store(Isa::Scalar, 0, &v);
                    let mut k_read = vec![0.0; k.len()];
                    let mut v_read = vec![0.0; v.len()];
                    keys.rows().read_into(Isa::Scalar, 0, &mut k_read);
                    values.rows().read_into(Isa::Scalar, 0, &mut v_read);
                    let split = 77;
                    let segs = [
                        KvSegment {
                            keys: keys.slice(0, split * row),
                            values: values.slice(0, split * row),
                            first_pos: 0,
                            len: split,
                        },
                        KvSegment {
                            keys: keys.slice(split * row, n_keys * row),
                            values: values.slice(split * row, n_keys * row),
                            first_pos: split,
                            len: n_keys - split,
                        },
                    ];
                    let mut out = vec![0.0; q.len()];
                    attention(&pool, &p, &q, q_pos0, &segs, &mut out);
                    let what = format!("{cache_type} {mask:?} {n_queries} queries");

                    let read_back = naive(&p, &q, q_pos0, &k_read, &v_read, n_keys);
                    for (a, b) in out.iter().zip(&read_back) {
                        assert!((a - b).abs() < 1e-5, "{what}: {a} vs {b} (read back)");
                    }

                    let key_bounds = key_bounds_of(cache_type);
                    let v_bound = storage_error_bounds(cache_type, &v)
                        .into_iter()
                        .fold(0.0f32, f32::max);
                    let mut worst = 0.0f32;
                    for t in 0..n_queries {
                        for h in 0..nh {
                            let query = &q[(t * nh + h) * hd..][..hd];
                            let kvh = h / (nh / nkv);
                            let delta = (0..n_keys)
                                .map(|j| {
                                    let b = &key_bounds[j * row + kvh * hd..][..hd];
                                    p.scale
                                        * query.iter().zip(b).map(|(a, e)| a.abs() * e).sum::<f32>()
                                })
                                .fold(0.0f32, f32::max);
                            let bound = ((2.0 * delta).exp() - 1.0) * v_max + v_bound + 1e-5;
                            for d in 0..hd {
                                let i = (t * nh + h) * hd + d;
                                let err = (out[i] - exact[i]).abs();
                                worst = worst.max(err);
                                assert!(
                                    err <= bound,
                                    "{what}: {} vs {} > {bound}",
                                    out[i],
                                    exact[i]
                                );
                            }
                        }
                    }
                    assert!(worst > 0.0, "{what}: storage must round something");

                    // The AVX2 build reads the formats like the scalar one.
                    if Isa::Avx2.is_available() {
                        let mut scalar = vec![0.0; q.len()];
                        attention_with(&pool, Isa::Scalar, &p, &q, q_pos0, &segs, &[], &mut scalar);
                        for (a, b) in scalar.iter().zip(&out) {
                            assert!(
                                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                                "{what}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Gemma 3 text shapes through both kernels with f16 and Q8_0 caches: head_dim 256, four
    /// query heads on one kv head, a chunk starting mid-cache (`q_pos0` > 0) whose own keys
    /// come as f32 after the cached ones, and on the sliding layer a ring buffer of the 512-key
    /// window holding the history as two segments (positions are not row indices). Equal to
    /// the f64 reference over the values read back, on every instruction set; with a chunk of
    /// 37 tokens (two tiled tasks, keys split across tasks) and of 3 (the per-query fallback).
    #[test]
    fn text_model_shapes_with_f16_and_q8_0_ring_caches_match_naive_attention() {
        let pool = ThreadPool::new(3);
        let (nh, nkv, hd, window) = (4, 1, 256, 512);
        let row = nkv * hd;
        let pos0 = 900;
        for (mask, capacity) in [
            (AttentionMask::SlidingWindow(window), window),
            (AttentionMask::Causal, 2048),
        ] {
            for n_queries in [37usize, 3] {
                let n_keys = pos0 + n_queries;
                let k: Vec<f32> = pseudo_random(n_keys * row, 21)
                    .iter()
                    .map(|x| 4.0 * x)
                    .collect();
                let v = pseudo_random(n_keys * row, 22);
                let q = pseudo_random(n_queries * nh * hd, 23);
                for cache_type in [CacheType::F16, CacheType::Q8_0] {
                    // The cache: position `pos` in row `pos % capacity`, the newest `capacity`.
                    let mut keys = KvBuffer::new(cache_type, capacity * row);
                    let mut values = KvBuffer::new(cache_type, capacity * row);
                    let first = pos0.saturating_sub(capacity);
                    for pos in first..pos0 {
                        let slot = pos % capacity;
                        keys.store(Isa::Scalar, slot * row, &k[pos * row..][..row]);
                        values.store(Isa::Scalar, slot * row, &v[pos * row..][..row]);
                    }
                    // What the kernel should see: the cached rows as read back, then the chunk.
                    let (mut k_seen, mut v_seen) = (k.clone(), v.clone());
                    for pos in first..pos0 {
                        let slot = pos % capacity;
                        keys.rows().read_into(
                            Isa::Scalar,
                            slot * row,
                            &mut k_seen[pos * row..][..row],
                        );
                        values.rows().read_into(
                            Isa::Scalar,
                            slot * row,
                            &mut v_seen[pos * row..][..row],
                        );
                    }
                    let start_slot = first % capacity;
                    let head = (pos0 - first).min(capacity - start_slot);
                    let mut segs = vec![KvSegment {
                        keys: keys.slice(start_slot * row, (start_slot + head) * row),
                        values: values.slice(start_slot * row, (start_slot + head) * row),
                        first_pos: first,
                        len: head,
                    }];
                    let tail = pos0 - first - head;
                    if tail > 0 {
                        segs.push(KvSegment {
                            keys: keys.slice(0, tail * row),
                            values: values.slice(0, tail * row),
                            first_pos: first + head,
                            len: tail,
                        });
                    }
                    segs.push(KvSegment {
                        keys: k[pos0 * row..].into(),
                        values: v[pos0 * row..].into(),
                        first_pos: pos0,
                        len: n_queries,
                    });
                    for (tiled, isa) in kernels() {
                        let p = AttentionParams {
                            n_heads: nh,
                            n_kv_heads: nkv,
                            head_dim: hd,
                            scale: 256f32.powf(-0.5),
                            softcap: None,
                            mask,
                            tiled,
                        };
                        let want = naive(&p, &q, pos0, &k_seen, &v_seen, n_keys);
                        let mut out = vec![0.0; q.len()];
                        attention_with(&pool, isa, &p, &q, pos0, &segs, &[], &mut out);
                        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-5,
                                "{cache_type} {mask:?} {n_queries} queries tiled {tiled} \
                                 {isa:?}: value {i}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Long prefill-sized calls through the tiled path (many query blocks, padded query lanes,
    /// key blocks cut by segments, masks and spans) and its small-tail fallback: head_dim 72
    /// and 16, without grouping and with groups of 3 and 4, causal and sliding, with and
    /// without bidirectional spans, f32 and f16 keys and values, a soft cap, on every
    /// instruction set, against the f64 reference.
    #[test]
    // Single spans (a whole image block) are cases of their own.
    #[allow(clippy::single_range_in_vec_init)]
    fn long_tiled_attention_matches_naive_attention() {
        let pool = ThreadPool::new(3);
        let n_keys = 420;
        let cases = [
            // (n_heads, n_kv_heads, head_dim, mask, q_pos0, spans, softcap)
            (4, 4, 72, AttentionMask::Causal, 0, vec![0..n_keys], None),
            (4, 4, 72, AttentionMask::Causal, 40, vec![], None),
            (
                2,
                2,
                72,
                AttentionMask::SlidingWindow(150),
                0,
                vec![30..260],
                None,
            ),
            (
                4,
                1,
                16,
                AttentionMask::Causal,
                20,
                vec![100..230, 300..301],
                None,
            ),
            (
                6,
                2,
                16,
                AttentionMask::SlidingWindow(100),
                0,
                vec![],
                Some(3.0),
            ),
            (6, 2, 72, AttentionMask::Causal, 150, vec![140..400], None),
            // A SigLIP layer's shape (one span over everything), Gemma 3 270M's (4 heads of
            // 256 on one kv head), and head_dim 64 grouped.
            (2, 2, 72, AttentionMask::Causal, 0, vec![0..n_keys], None),
            (4, 1, 256, AttentionMask::Causal, 0, vec![0..n_keys], None),
            (8, 2, 64, AttentionMask::Causal, 0, vec![0..n_keys], None),
            (
                8,
                2,
                64,
                AttentionMask::SlidingWindow(90),
                60,
                vec![200..330],
                None,
            ),
        ];
        for (nh, nkv, hd, mask, q_pos0, spans, softcap) in cases {
            let p = AttentionParams {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                scale: (hd as f32).powf(-0.5),
                softcap,
                mask,
                tiled: true,
            };
            let row = nkv * hd;
            let k: Vec<f32> = pseudo_random(n_keys * row, 31)
                .iter()
                .map(|x| 2.0 * x)
                .collect();
            let v = pseudo_random(n_keys * row, 32);
            let q = pseudo_random((n_keys - q_pos0) * nh * hd, 33);
            for cache_type in [CacheType::F32, CacheType::F16] {
                let mut keys = KvBuffer::new(cache_type, k.len());
                let mut values = KvBuffer::new(cache_type, v.len());
                keys.store(Isa::Scalar, 0, &k);
                values.store(Isa::Scalar, 0, &v);
                let mut k_read = vec![0.0; k.len()];
                let mut v_read = vec![0.0; v.len()];
                keys.rows().read_into(Isa::Scalar, 0, &mut k_read);
                values.rows().read_into(Isa::Scalar, 0, &mut v_read);
                let expected = naive_spans(&p, &q, q_pos0, &k_read, &v_read, n_keys, &spans);
                // Two segments, the first ending inside a key block.
                let split = 137;
                let segs = [
                    KvSegment {
                        keys: keys.slice(0, split * row),
                        values: values.slice(0, split * row),
                        first_pos: 0,
                        len: split,
                    },
                    KvSegment {
                        keys: keys.slice(split * row, n_keys * row),
                        values: values.slice(split * row, n_keys * row),
                        first_pos: split,
                        len: n_keys - split,
                    },
                ];
                for isa in simd_levels() {
                    let mut out = vec![0.0; q.len()];
                    attention_with(&pool, isa, &p, &q, q_pos0, &segs, &spans, &mut out);
                    for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
                        assert!(
                            (a - b).abs() < 1e-5,
                            "{nh}/{nkv} heads of {hd}, {mask:?}, from {q_pos0}, spans {spans:?}, \
                             {cache_type} {isa:?}, value {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// A forced lower ISA (`GEMMA_ISA=avx2`) gives the lower build; AVX-512 (with or without
    /// VNNI) the AVX-512 one, for both kernels.
    #[test]
    fn simd_builds_follow_the_isa() {
        assert_eq!(Simd::for_isa(Isa::Scalar), Simd::Scalar);
        assert_eq!(Simd::for_isa(Isa::Neon), Simd::Scalar);
        assert_eq!(Simd::for_isa(Isa::Avx2), Simd::Avx2);
        assert_eq!(Simd::for_isa(Isa::Avx512), Simd::Avx512);
        assert_eq!(Simd::for_isa(Isa::Avx512Vnni), Simd::Avx512);
    }

    /// The per-query kernel's AVX-512 build gives its AVX2 build's output to the bit, on the
    /// shapes the tests above cover and the text models': head_dim 256, 128, 72, 64 and odd
    /// ones (half-vector and scalar remainders), grouped and ungrouped heads, causal and
    /// sliding masks, bidirectional spans, a soft cap, f32, f16 and Q8_0 caches in two
    /// segments followed by the chunk's own f32 keys, decoding (one token, keys split across
    /// tasks) and prefill chunks (several query blocks, a partial group of four queries).
    /// Skipped on CPUs without AVX-512.
    #[test]
    fn avx512_per_query_kernel_equals_avx2_bit_for_bit() {
        let levels: Vec<Isa> = [Isa::Avx512, Isa::Avx512Vnni]
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect();
        if levels.is_empty() {
            return;
        }
        let pool = ThreadPool::new(3);
        let shapes = [
            // (n_heads, n_kv_heads, head_dim)
            (4, 1, 256),
            (8, 2, 256),
            (4, 2, 128),
            (2, 2, 72),
            (6, 2, 72),
            (8, 2, 64),
            (3, 1, 48),
            (4, 1, 16),
            (2, 2, 40),
            (2, 2, 24),
            (2, 2, 12),
            (5, 5, 9),
            (2, 1, 3),
        ];
        let n_keys = 300;
        let mut checked = 0;
        for (case, (nh, nkv, hd)) in shapes.into_iter().enumerate() {
            let row = nkv * hd;
            let k: Vec<f32> = pseudo_random(n_keys * row, 41 + case as u32)
                .iter()
                .map(|x| 4.0 * x)
                .collect();
            let v = pseudo_random(n_keys * row, 61 + case as u32);
            let mut cache_types = vec![CacheType::F32, CacheType::F16];
            if hd.is_multiple_of(32) {
                cache_types.push(CacheType::Q8_0);
            }
            for mask in [AttentionMask::Causal, AttentionMask::SlidingWindow(70)] {
                for n_queries in [1usize, 3, 45] {
                    let q_pos0 = n_keys - n_queries;
                    let q = pseudo_random(n_queries * nh * hd, 81 + n_queries as u32);
                    let spans = if n_queries > 1 {
                        vec![q_pos0 - 10..q_pos0 + 2, q_pos0 + 20..n_keys - 5]
                    } else {
                        vec![]
                    };
                    for &cache_type in &cache_types {
                        let cached = q_pos0;
                        let mut keys = KvBuffer::new(cache_type, cached * row);
                        let mut values = KvBuffer::new(cache_type, cached * row);
                        keys.store(Isa::Scalar, 0, &k[..cached * row]);
                        values.store(Isa::Scalar, 0, &v[..cached * row]);
                        // The cache in two segments (the first ending inside a key block),
                        // then the chunk's own keys.
                        let split = 101;
                        let segs = [
                            KvSegment {
                                keys: keys.slice(0, split * row),
                                values: values.slice(0, split * row),
                                first_pos: 0,
                                len: split,
                            },
                            KvSegment {
                                keys: keys.slice(split * row, cached * row),
                                values: values.slice(split * row, cached * row),
                                first_pos: split,
                                len: cached - split,
                            },
                            KvSegment {
                                keys: k[cached * row..].into(),
                                values: v[cached * row..].into(),
                                first_pos: cached,
                                len: n_queries,
                            },
                        ];
                        for (softcap, spans) in [(None, &spans[..]), (Some(5.0), &[][..])] {
                            let p = AttentionParams {
                                n_heads: nh,
                                n_kv_heads: nkv,
                                head_dim: hd,
                                scale: (hd as f32).powf(-0.5),
                                softcap,
                                mask,
                                tiled: false,
                            };
                            let mut want = vec![0.0; q.len()];
                            attention_with(
                                &pool,
                                Isa::Avx2,
                                &p,
                                &q,
                                q_pos0,
                                &segs,
                                spans,
                                &mut want,
                            );
                            assert!(
                                want.iter().all(|x| x.is_finite())
                                    && want.iter().any(|&x| x != 0.0)
                            );
                            for &isa in &levels {
                                let mut out = vec![f32::NAN; q.len()];
                                attention_with(&pool, isa, &p, &q, q_pos0, &segs, spans, &mut out);
                                for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                                    assert_eq!(
                                        a.to_bits(),
                                        b.to_bits(),
                                        "{nh}/{nkv} heads of {hd}, {mask:?}, {n_queries} queries, \
                                         {cache_type}, softcap {softcap:?}, spans {spans:?}, \
                                         {isa:?}: value {i}: {a} vs {b}"
                                    );
                                }
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(checked >= 2 * 13 * 2 * 3 * 2);
    }

    #[test]
    fn sliding_window_counts_the_query_itself() {
        let m = AttentionMask::SlidingWindow(2);
        assert!(m.visible(5, 5) && m.visible(5, 4));
        assert!(!m.visible(5, 3) && !m.visible(5, 6));
    }
}
