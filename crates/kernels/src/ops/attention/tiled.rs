//! Attention for large query blocks as small matrix products, for callers that opt in with
//! [`AttentionParams::tiled`](super::AttentionParams::tiled) (the vision tower; not the text
//! decoders, see the field).
//!
//! The per-query path reads each key for four queries and ends every dot product with a
//! horizontal sum; with 32 queries per task that leaves attention bound by shuffles and loads.
//! Here a task puts its queries across SIMD lanes instead:
//!
//! - once per task, the queries are transposed (and scaled) into `qt[d][q]`, `q` padded to a
//!   multiple of [`LANES`] with zero queries whose results are never emitted;
//! - per block of [`KEY_BLOCK`] keys, the scores `s[j][q] = Σ_d k[j][d] · qt[d][q]` come from a
//!   register tile of key rows × query vectors: each step broadcasts one key element and
//!   multiplies it into whole vectors of queries, so no horizontal sums;
//! - the online softmax runs down the columns: block maximum, rescale factor, exponentials
//!   ([`exp8`](super::exp::exp8) / [`exp16`](super::exp::exp16)) and denominators are
//!   vertical operations on query lanes;
//! - `acc[d][q] = acc[d][q] · corr[q] + Σ_j v[j][d] · s[j][q]` is the same tile with value
//!   elements broadcast, the rescale folded into loading the accumulators;
//! - the accumulators are transposed back one query at a time when emitted.
//!
//! Masked keys get a score of −∞ (weight 0), so a block is scored whole; only blocks that cut
//! some query's visible range are masked at all.

use super::{exp, Emit, Job, KeyBlock, Task, VecMath};

/// Below this many queries in a task the per-query path is used (decoding: one token's heads).
pub(super) const MIN_QUERIES: usize = 16;
/// Query lanes are padded to a multiple of this (one AVX-512 vector, two AVX2 vectors).
const LANES: usize = 16;
/// Keys scored before each softmax update: a multiple of the tile heights (6 and 12 keys).
const KEY_BLOCK: usize = 96;

/// The task's queries against every key it sees; emits one result per query like the
/// per-query path.
#[inline(always)]
pub(super) fn run_task<M: VecMath, T: TileMath>(
    job: &Job<'_, '_>,
    task: &Task,
    state: &mut Vec<f32>,
    emit: &mut Emit<'_>,
) {
    let p = job.p;
    let hd = p.head_dim;
    let nq = task.nq;
    let nqp = nq.next_multiple_of(LANES);
    let block_buf = job.block_buffer_len(KEY_BLOCK);
    // state: qt and acc [hd * nqp], scores [KEY_BLOCK * nqp], max, denom and corr [nqp], one
    // output row [hd], key and value buffers [block_buf]. Grown, never shrunk.
    let needed = 2 * hd * nqp + KEY_BLOCK * nqp + 3 * nqp + hd + 2 * block_buf;
    if state.len() < needed {
        state.resize(needed, 0.0);
    }
    let (qt, rest) = state[..needed].split_at_mut(hd * nqp);
    let (acc, rest) = rest.split_at_mut(hd * nqp);
    let (scores, rest) = rest.split_at_mut(KEY_BLOCK * nqp);
    let (maxes, rest) = rest.split_at_mut(nqp);
    let (denoms, rest) = rest.split_at_mut(nqp);
    let (corr, rest) = rest.split_at_mut(nqp);
    let (row, rest) = rest.split_at_mut(hd);
    let (key_buf, value_buf) = rest.split_at_mut(block_buf);

    // Scaling the queries scales every score: one multiply per query value, not per score.
    qt.fill(0.0);
    for qi in 0..nq {
        for (d, &x) in job.query(task, qi).iter().enumerate() {
            qt[d * nqp + qi] = x * p.scale;
        }
    }
    acc.fill(0.0);
    denoms.fill(0.0);
    maxes.fill(f32::NEG_INFINITY);
    let range = |qi: usize| task.ranges[qi / job.group];
    // A block needs masking only if it starts before some query's first visible key or ends
    // after some query's last.
    let latest_lo = (0..nq).map(|qi| range(qi).0).max().unwrap_or(0);
    let earliest_hi = (0..nq).map(|qi| range(qi).1).min().unwrap_or(usize::MAX);

    // Consecutive tasks of a kv head sweep its keys in alternate directions: the blocks one
    // task read last are still in cache when the next starts.
    let backward = (task.t0 / job.query_block) % 2 == 1;
    job.for_each_block::<M>(
        task,
        KEY_BLOCK,
        backward,
        key_buf,
        value_buf,
        |b: &KeyBlock<'_>| {
            let s = &mut scores[..b.n * nqp];
            T::gemm(s, b.keys, b.k_stride, 1, qt, b.n, hd, nqp, None);
            if let Some(cap) = p.softcap {
                s.iter_mut().for_each(|x| *x = cap * (*x / cap).tanh());
            }
            if b.pos < latest_lo || b.pos + b.n - 1 > earliest_hi {
                for qi in 0..nq {
                    let (j_lo, j_hi) = b.visible(range(qi));
                    for j in (0..j_lo).chain(j_hi..b.n) {
                        s[j * nqp + qi] = f32::NEG_INFINITY;
                    }
                }
            }
            T::softmax(s, b.n, nqp, maxes, denoms, corr);
            T::gemm(acc, b.values, 1, b.v_stride, s, hd, b.n, nqp, Some(corr));
        },
    );

    for qi in 0..nq {
        for (d, r) in row.iter_mut().enumerate() {
            *r = acc[d * nqp + qi];
        }
        let (t, hg) = (qi / job.group, qi % job.group);
        emit(
            task.t0 + t,
            task.kv_h * job.group + hg,
            row,
            maxes[qi],
            denoms[qi],
        );
    }
}

/// The two kernels of the tiled path, for one instruction set.
pub(super) trait TileMath {
    /// `c[r·nqp + q] = Σ_k x[r·rs + k·cs] · y[k·nqp + q]` for `r < rows`, `q < nqp` (a
    /// multiple of [`LANES`]), plus `c[r·nqp + q] · corr[q]` when `corr` is given.
    #[allow(clippy::too_many_arguments)] // a GEMM's shapes and strides
    fn gemm(
        c: &mut [f32],
        x: &[f32],
        rs: usize,
        cs: usize,
        y: &[f32],
        rows: usize,
        inner: usize,
        nqp: usize,
        corr: Option<&[f32]>,
    );

    /// One online-softmax step for every query lane `q` over the `n` scores `s[j·nqp + q]`:
    /// `max[q]` takes the block's maximum, `corr[q] = e^(old max − new max)`, the scores
    /// become `e^(s − max)` and `denom[q] = denom[q] · corr[q] + Σ_j` of them. A lane that
    /// has seen only −∞ keeps max −∞ and weights 0 (shifting by 0, never −∞ − −∞).
    fn softmax(
        s: &mut [f32],
        n: usize,
        nqp: usize,
        max: &mut [f32],
        denom: &mut [f32],
        corr: &mut [f32],
    );
}

/// Checks the slice lengths a [`TileMath::gemm`] call reads and writes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn check_gemm(
    c: &[f32],
    x: &[f32],
    rs: usize,
    cs: usize,
    y: &[f32],
    rows: usize,
    inner: usize,
    nqp: usize,
    corr: Option<&[f32]>,
) {
    assert!(nqp.is_multiple_of(LANES) && c.len() >= rows * nqp && y.len() >= inner * nqp);
    assert!(rows == 0 || inner == 0 || x.len() > (rows - 1) * rs + (inner - 1) * cs);
    assert!(corr.is_none_or(|f| f.len() >= nqp));
}

/// Plain loops (the reference for the SIMD kernels, and the non-x86 build).
pub(super) struct Scalar;

impl TileMath for Scalar {
    #[inline(always)]
    fn gemm(
        c: &mut [f32],
        x: &[f32],
        rs: usize,
        cs: usize,
        y: &[f32],
        rows: usize,
        inner: usize,
        nqp: usize,
        corr: Option<&[f32]>,
    ) {
        check_gemm(c, x, rs, cs, y, rows, inner, nqp, corr);
        for r in 0..rows {
            let c_row = &mut c[r * nqp..][..nqp];
            match corr {
                Some(f) => c_row.iter_mut().zip(f).for_each(|(a, f)| *a *= f),
                None => c_row.fill(0.0),
            }
            for k in 0..inner {
                let xv = x[r * rs + k * cs];
                for (a, yv) in c_row.iter_mut().zip(&y[k * nqp..][..nqp]) {
                    *a += xv * yv;
                }
            }
        }
    }

    #[inline(always)]
    fn softmax(
        s: &mut [f32],
        n: usize,
        nqp: usize,
        max: &mut [f32],
        denom: &mut [f32],
        corr: &mut [f32],
    ) {
        for q in 0..nqp {
            let new_max = (0..n).map(|j| s[j * nqp + q]).fold(max[q], f32::max);
            let shift = if new_max == f32::NEG_INFINITY {
                0.0
            } else {
                new_max
            };
            let mut sum = 0.0;
            for j in 0..n {
                let w = exp::exp(s[j * nqp + q] - shift);
                s[j * nqp + q] = w;
                sum += w;
            }
            corr[q] = exp::exp(max[q] - shift);
            denom[q] = denom[q] * corr[q] + sum;
            max[q] = new_max;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{check_gemm, TileMath};
    use crate::ops::exp::{exp16, exp8};

    /// AVX2 + FMA kernels; only reached from code compiled with those features after they were
    /// detected (`Job::run_task_avx2`).
    pub(in crate::ops::attention) struct Avx2;

    /// AVX-512F kernels; only reached from `Job::run_task_avx512`, after detection.
    pub(in crate::ops::attention) struct Avx512;

    /// Rows per AVX2 tile: 6 rows × 2 vectors = 12 accumulators, plus 2 `y` vectors and a
    /// broadcast, of the 16 registers.
    const AVX2_ROWS: usize = 6;
    /// Rows per AVX-512 tile: 12 rows × 2 vectors = 24 accumulators of the 32 registers.
    const AVX512_ROWS: usize = 12;

    /// One tile of [`TileMath::gemm`]: `R` rows × `V` vectors of 8 lanes.
    ///
    /// # Safety
    /// AVX2 + FMA; `c` (row stride `nqp`) and `y` (row stride `nqp`) hold `8·V` lanes of `R`
    /// and `inner` rows, `x[r·rs + k·cs]` exists for `r < R`, `k < inner`, and `corr` is null
    /// or holds `8·V` values.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_avx2<const R: usize, const V: usize>(
        c: *mut f32,
        x: *const f32,
        rs: usize,
        cs: usize,
        y: *const f32,
        inner: usize,
        nqp: usize,
        corr: *const f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        if !corr.is_null() {
            let f: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(corr.add(8 * v)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                for (v, a) in acc_r.iter_mut().enumerate() {
                    *a = _mm256_mul_ps(_mm256_loadu_ps(c.add(r * nqp + 8 * v)), f[v]);
                }
            }
        }
        for k in 0..inner {
            let yv: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(y.add(k * nqp + 8 * v)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xb = _mm256_broadcast_ss(&*x.add(r * rs + k * cs));
                for (a, yv) in acc_r.iter_mut().zip(&yv) {
                    *a = _mm256_fmadd_ps(xb, *yv, *a);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (v, a) in acc_r.iter().enumerate() {
                _mm256_storeu_ps(c.add(r * nqp + 8 * v), *a);
            }
        }
    }

    /// One tile of [`TileMath::gemm`]: `R` rows × `V` vectors of 16 lanes.
    ///
    /// # Safety
    /// AVX-512F; as [`tile_avx2`] with 16-lane vectors.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_avx512<const R: usize, const V: usize>(
        c: *mut f32,
        x: *const f32,
        rs: usize,
        cs: usize,
        y: *const f32,
        inner: usize,
        nqp: usize,
        corr: *const f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        if !corr.is_null() {
            let f: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(corr.add(16 * v)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                for (v, a) in acc_r.iter_mut().enumerate() {
                    *a = _mm512_mul_ps(_mm512_loadu_ps(c.add(r * nqp + 16 * v)), f[v]);
                }
            }
        }
        for k in 0..inner {
            let yv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(y.add(k * nqp + 16 * v)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*x.add(r * rs + k * cs));
                for (a, yv) in acc_r.iter_mut().zip(&yv) {
                    *a = _mm512_fmadd_ps(xb, *yv, *a);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (v, a) in acc_r.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * nqp + 16 * v), *a);
            }
        }
    }

    /// Picks the tile for `$rows` remaining rows (1 ..= the tile height) at compile time.
    macro_rules! dispatch_rows {
        ($tile:ident, $v:literal, $rows:expr, ($($n:literal)*), $args:tt) => {
            match $rows {
                $($n => dispatch_rows!(@call $tile, $n, $v, $args),)*
                _ => unreachable!(),
            }
        };
        (@call $tile:ident, $n:literal, $v:literal, ($($a:expr),*)) => {
            $tile::<$n, $v>($($a),*)
        };
    }

    impl TileMath for Avx2 {
        #[inline(always)]
        fn gemm(
            c: &mut [f32],
            x: &[f32],
            rs: usize,
            cs: usize,
            y: &[f32],
            rows: usize,
            inner: usize,
            nqp: usize,
            corr: Option<&[f32]>,
        ) {
            check_gemm(c, x, rs, cs, y, rows, inner, nqp, corr);
            // Query vectors outside, rows inside: the `y` columns of a lane group stay in L1
            // while every row tile passes over them.
            for q0 in (0..nqp).step_by(16) {
                let mut r0 = 0;
                while r0 < rows {
                    let n = AVX2_ROWS.min(rows - r0);
                    // SAFETY: AVX2 + FMA (see the struct); lanes `q0..q0 + 16 <= nqp`, rows
                    // `r0..r0 + n <= rows` and the `x` elements are in bounds (checked above).
                    unsafe {
                        let cp = c.as_mut_ptr().add(r0 * nqp + q0);
                        let xp = x.as_ptr().add(r0 * rs);
                        let yp = y.as_ptr().add(q0);
                        let fp = corr.map_or(std::ptr::null(), |f| f.as_ptr().add(q0));
                        dispatch_rows!(
                            tile_avx2, 2, n, (1 2 3 4 5 6),
                            (cp, xp, rs, cs, yp, inner, nqp, fp)
                        );
                    }
                    r0 += n;
                }
            }
        }

        #[inline(always)]
        fn softmax(
            s: &mut [f32],
            n: usize,
            nqp: usize,
            max: &mut [f32],
            denom: &mut [f32],
            corr: &mut [f32],
        ) {
            assert!(nqp.is_multiple_of(8) && s.len() >= n * nqp);
            assert!(max.len() >= nqp && denom.len() >= nqp && corr.len() >= nqp);
            // SAFETY: AVX2 + FMA (see the struct); every access is lane group `q0..q0 + 8` of
            // a row `j < n` of `s` or of the `nqp`-long vectors (lengths checked above).
            unsafe {
                let sp = s.as_mut_ptr();
                for q0 in (0..nqp).step_by(8) {
                    let old = _mm256_loadu_ps(max.as_ptr().add(q0));
                    let mut m = old;
                    for j in 0..n {
                        m = _mm256_max_ps(m, _mm256_loadu_ps(sp.add(j * nqp + q0)));
                    }
                    let unseen = _mm256_cmp_ps::<_CMP_EQ_OQ>(m, _mm256_set1_ps(f32::NEG_INFINITY));
                    let shift = _mm256_andnot_ps(unseen, m);
                    let mut sum = _mm256_setzero_ps();
                    for j in 0..n {
                        let p = sp.add(j * nqp + q0);
                        let w = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), shift));
                        _mm256_storeu_ps(p, w);
                        sum = _mm256_add_ps(sum, w);
                    }
                    let f = exp8(_mm256_sub_ps(old, shift));
                    let d = _mm256_loadu_ps(denom.as_ptr().add(q0));
                    _mm256_storeu_ps(denom.as_mut_ptr().add(q0), _mm256_fmadd_ps(d, f, sum));
                    _mm256_storeu_ps(corr.as_mut_ptr().add(q0), f);
                    _mm256_storeu_ps(max.as_mut_ptr().add(q0), m);
                }
            }
        }
    }

    impl TileMath for Avx512 {
        #[inline(always)]
        fn gemm(
            c: &mut [f32],
            x: &[f32],
            rs: usize,
            cs: usize,
            y: &[f32],
            rows: usize,
            inner: usize,
            nqp: usize,
            corr: Option<&[f32]>,
        ) {
            check_gemm(c, x, rs, cs, y, rows, inner, nqp, corr);
            let mut q0 = 0;
            while q0 < nqp {
                // Four vectors (64 lanes) of 6 rows, two (32 lanes) or one of 12 rows.
                let vectors = match nqp - q0 {
                    64.. => 4,
                    32.. => 2,
                    _ => 1,
                };
                let height = if vectors == 4 { 6 } else { AVX512_ROWS };
                let mut r0 = 0;
                while r0 < rows {
                    let n = height.min(rows - r0);
                    // SAFETY: AVX-512F (see the struct); lanes `q0..q0 + 16 or 32 <= nqp`,
                    // rows `r0..r0 + n <= rows`, `x` elements in bounds (checked above).
                    unsafe {
                        let cp = c.as_mut_ptr().add(r0 * nqp + q0);
                        let xp = x.as_ptr().add(r0 * rs);
                        let yp = y.as_ptr().add(q0);
                        let fp = corr.map_or(std::ptr::null(), |f| f.as_ptr().add(q0));
                        if vectors == 4 {
                            dispatch_rows!(
                                tile_avx512, 4, n, (1 2 3 4 5 6),
                                (cp, xp, rs, cs, yp, inner, nqp, fp)
                            );
                        } else if vectors == 2 {
                            dispatch_rows!(
                                tile_avx512, 2, n, (1 2 3 4 5 6 7 8 9 10 11 12),
                                (cp, xp, rs, cs, yp, inner, nqp, fp)
                            );
                        } else {
                            dispatch_rows!(
                                tile_avx512, 1, n, (1 2 3 4 5 6 7 8 9 10 11 12),
                                (cp, xp, rs, cs, yp, inner, nqp, fp)
                            );
                        }
                    }
                    r0 += n;
                }
                q0 += 16 * vectors;
            }
        }

        #[inline(always)]
        fn softmax(
            s: &mut [f32],
            n: usize,
            nqp: usize,
            max: &mut [f32],
            denom: &mut [f32],
            corr: &mut [f32],
        ) {
            assert!(nqp.is_multiple_of(16) && s.len() >= n * nqp);
            assert!(max.len() >= nqp && denom.len() >= nqp && corr.len() >= nqp);
            // SAFETY: AVX-512F (see the struct); every access is lane group `q0..q0 + 16` of
            // a row `j < n` of `s` or of the `nqp`-long vectors (lengths checked above).
            unsafe {
                let sp = s.as_mut_ptr();
                for q0 in (0..nqp).step_by(16) {
                    let old = _mm512_loadu_ps(max.as_ptr().add(q0));
                    let mut m = old;
                    for j in 0..n {
                        m = _mm512_max_ps(m, _mm512_loadu_ps(sp.add(j * nqp + q0)));
                    }
                    let seen =
                        _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(m, _mm512_set1_ps(f32::NEG_INFINITY));
                    let shift = _mm512_maskz_mov_ps(seen, m);
                    let mut sum = _mm512_setzero_ps();
                    for j in 0..n {
                        let p = sp.add(j * nqp + q0);
                        let w = exp16(_mm512_sub_ps(_mm512_loadu_ps(p), shift));
                        _mm512_storeu_ps(p, w);
                        sum = _mm512_add_ps(sum, w);
                    }
                    let f = exp16(_mm512_sub_ps(old, shift));
                    let d = _mm512_loadu_ps(denom.as_ptr().add(q0));
                    _mm512_storeu_ps(denom.as_mut_ptr().add(q0), _mm512_fmadd_ps(d, f, sum));
                    _mm512_storeu_ps(corr.as_mut_ptr().add(q0), f);
                    _mm512_storeu_ps(max.as_mut_ptr().add(q0), m);
                }
            }
        }
    }
}
