//! AVX2 matrix-vector kernels: eight weight rows at a time against one to [`MAX_TOKENS`]
//! activation rows.
//!
//! Per block, each row's integer products are summed to i32 lanes as in the one-row kernels;
//! then one horizontal reduction turns the eight rows' lanes into one vector holding each row's
//! exact block sum, which is scaled and accumulated with the same float operations, in the same
//! order, as the scalar reference (`sum += (d_w * d_a) * isum`). Every result is therefore
//! bit-identical to `scalar::vec_dot` for its row, whatever group a row falls in and however many
//! tokens run together: batched and single-token decoding agree exactly.
//!
//! Against one row at a time this shares each activation load and scale conversion across eight
//! rows, replaces eight float reductions by one integer transpose-and-add, and prefetches the next
//! group of rows while the current one is computed, so the memory-bound decode path streams the
//! weights at close to the core's read bandwidth. Offset types (Q4_0, Q5_0, Q6_K) multiply their
//! unsigned quants directly and subtract `offset * sum(activations)` afterwards (exact in i32).

use std::arch::x86_64::*;

use gemma_formats::GgmlType;

use super::layout::{offs, QK, QK_K};
use super::{DotFn, Q8_0_INFO_BYTES};

/// Weight rows per kernel call (one i32 lane per row in the reduced vector).
const GROUP_ROWS: usize = super::ROW_GROUP;
/// Tokens computed together; more take several passes over a row group (whose weights are then
/// in L1).
pub(super) const MAX_TOKENS: usize = 4;

/// Consecutive weight rows: row `i` is `data[i * row_bytes..(i + 1) * row_bytes]`, `i < n_rows`.
pub(crate) struct RowRange<'a> {
    pub data: &'a [u8],
    pub row_bytes: usize,
    pub n_rows: usize,
}

/// Where results go: the result of row `i` and token `t` is written to
/// `ptr + t * token_stride + i`.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    pub ptr: *mut f32,
    pub token_stride: usize,
}

/// Quantized activation rows: token `t` is `data[t * row_bytes..(t + 1) * row_bytes]`; for
/// Q8_0 activations, `info[t * info_bytes..]` holds each block's scale (f32) and quant sum (i32),
/// see [`super::QuantizedActs`].
pub(crate) struct ActRows<'a> {
    pub data: &'a [u8],
    pub row_bytes: usize,
    pub info: &'a [u8],
    pub info_bytes: usize,
    pub n_tokens: usize,
}

/// Writes `dot(row i, token t)` to `out` for every row and token given, `cols` values each.
///
/// # Safety
/// Needs AVX2 + FMA + F16C. `rows.data` holds `n_rows` rows of `cols` weights, `acts` `n_tokens`
/// rows of `cols` activations of the vec_dot type (and their info), and `out` is valid for
/// writes at every (row, token) position (see [`super::RowsKernel::run`]).
pub(crate) type RowsFn = unsafe fn(&RowRange, &ActRows, usize, Out);

/// Which build of the row kernels: the AVX2 one, the same code compiled for AVX-512 (F, BW,
/// VL: 32 vector registers, so the 8-row × 4-token accumulators stay in registers), or that
/// plus VNNI (`vpdpbusd` for the byte products of Q8_0, Q4_0 and Q5_0; `vpdpwssd` where the
/// compiler fuses a `vpmaddwd` and its add). Every build gives the same bits: the integer
/// block sums are exact and the float steps are the same operations in the same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Build {
    Avx2,
    Avx512,
    Avx512Vnni,
}

pub(super) fn rows_fn(dtype: GgmlType, build: Build) -> Option<RowsFn> {
    Some(match (build, dtype) {
        (Build::Avx2, GgmlType::Q4_0) => rows_q4_0,
        (Build::Avx2, GgmlType::Q5_0) => rows_q5_0,
        (Build::Avx2, GgmlType::Q8_0) => rows_q8_0,
        (Build::Avx2, GgmlType::Q4_K) => rows_q4_k,
        (Build::Avx2, GgmlType::Q6_K) => rows_q6_k,
        (Build::Avx512, GgmlType::Q4_0) => wide::rows_q4_0,
        (Build::Avx512, GgmlType::Q5_0) => wide::rows_q5_0,
        (Build::Avx512, GgmlType::Q8_0) => wide::rows_q8_0,
        (Build::Avx512, GgmlType::Q4_K) => wide::rows_q4_k,
        (Build::Avx512, GgmlType::Q6_K) => wide::rows_q6_k,
        (Build::Avx512Vnni, GgmlType::Q4_0) => vnni::rows_q4_0,
        (Build::Avx512Vnni, GgmlType::Q5_0) => vnni::rows_q5_0,
        (Build::Avx512Vnni, GgmlType::Q8_0) => vnni::rows_q8_0,
        (Build::Avx512Vnni, GgmlType::Q4_K) => vnni::rows_q4_k,
        (Build::Avx512Vnni, GgmlType::Q6_K) => vnni::rows_q6_k,
        _ => return None,
    })
}

/// One-row dot products through the row kernels (same bits as a row inside a group).
pub(super) fn dot_fn(dtype: GgmlType, build: Build) -> Option<DotFn> {
    Some(match (build, dtype) {
        (Build::Avx2, GgmlType::Q4_0) => dot_q4_0,
        (Build::Avx2, GgmlType::Q5_0) => dot_q5_0,
        (Build::Avx2, GgmlType::Q8_0) => dot_q8_0,
        (Build::Avx2, GgmlType::Q4_K) => dot_q4_k,
        (Build::Avx2, GgmlType::Q6_K) => dot_q6_k,
        (Build::Avx512, GgmlType::Q4_0) => wide::dot_q4_0,
        (Build::Avx512, GgmlType::Q5_0) => wide::dot_q5_0,
        (Build::Avx512, GgmlType::Q8_0) => wide::dot_q8_0,
        (Build::Avx512, GgmlType::Q4_K) => wide::dot_q4_k,
        (Build::Avx512, GgmlType::Q6_K) => wide::dot_q6_k,
        (Build::Avx512Vnni, GgmlType::Q4_0) => vnni::dot_q4_0,
        (Build::Avx512Vnni, GgmlType::Q5_0) => vnni::dot_q5_0,
        (Build::Avx512Vnni, GgmlType::Q8_0) => vnni::dot_q8_0,
        (Build::Avx512Vnni, GgmlType::Q4_K) => vnni::dot_q4_k,
        (Build::Avx512Vnni, GgmlType::Q6_K) => vnni::dot_q6_k,
        _ => return None,
    })
}

// ----------------------------------------------------------------------------------------------
// Shared pieces
// ----------------------------------------------------------------------------------------------

/// Pointers to the eight rows of the group starting at row `first` of `range`; rows past the
/// range repeat its last row (their results are computed and dropped).
#[inline(always)]
fn row_ptrs(range: &RowRange, first: usize) -> [*const u8; GROUP_ROWS] {
    let last = range.n_rows - 1;
    std::array::from_fn(|i| {
        let row = (first + i).min(last);
        range.data.as_ptr().wrapping_add(row * range.row_bytes)
    })
}

/// Token `t0 + t`'s quantized row and block info.
#[derive(Clone, Copy)]
pub(super) struct Act {
    pub(super) row: *const u8,
    pub(super) info: *const u8,
}

impl Act {
    /// Block `k`'s scale (Q8_0 activations).
    #[inline(always)]
    pub(super) unsafe fn scale(self, k: usize) -> f32 {
        self.info
            .add(k * Q8_0_INFO_BYTES)
            .cast::<f32>()
            .read_unaligned()
    }

    /// Block `k`'s quant sum (Q8_0 activations).
    #[inline(always)]
    pub(super) unsafe fn quant_sum(self, k: usize) -> i32 {
        self.info
            .add(k * Q8_0_INFO_BYTES + 4)
            .cast::<i32>()
            .read_unaligned()
    }
}

#[inline(always)]
pub(super) fn act_ptrs<const NT: usize>(a: &ActRows, t0: usize) -> [Act; NT] {
    std::array::from_fn(|t| Act {
        row: a.data.as_ptr().wrapping_add((t0 + t) * a.row_bytes),
        info: a.info.as_ptr().wrapping_add((t0 + t) * a.info_bytes),
    })
}

/// One i32 per row: lane `i` = sum of the eight lanes of `v[i]`. Built from blends and adds
/// with few shuffles (`vphaddd` is three µops with a throughput of one per two cycles on Zen 3).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn reduce8(v: &[__m256i; GROUP_ROWS]) -> __m256i {
    // Lanes 0, 2, 4, 6 from `a`'s row and 1, 3, 5, 7 from `b`'s, each summing two lanes.
    let pair = |a: __m256i, b: __m256i| {
        let keep = _mm256_blend_epi32::<0b1010_1010>(a, b);
        let swap = _mm256_shuffle_epi32::<0b10_11_00_01>(_mm256_blend_epi32::<0b1010_1010>(b, a));
        _mm256_add_epi32(keep, swap)
    };
    // Lanes (0, 1, 4, 5) from `a`'s rows and (2, 3, 6, 7) from `b`'s, each summing four lanes.
    let quad = |a: __m256i, b: __m256i| {
        let keep = _mm256_blend_epi32::<0b1100_1100>(a, b);
        let swap = _mm256_shuffle_epi32::<0b01_00_11_10>(_mm256_blend_epi32::<0b1100_1100>(b, a));
        _mm256_add_epi32(keep, swap)
    };
    let q0123 = quad(pair(v[0], v[1]), pair(v[2], v[3]));
    let q4567 = quad(pair(v[4], v[5]), pair(v[6], v[7]));
    let keep = _mm256_blend_epi32::<0b1111_0000>(q0123, q4567);
    let swap = _mm256_permute2x128_si256::<0x21>(q0123, q4567);
    _mm256_add_epi32(keep, swap)
}

/// One i32 per row: lane `i` = sum of the sixteen i16 of `v[i]`, which are `vpmaddubsw` pair
/// sums of unsigned quants below 32 and activations within ±128, so at most 2 · 31 · 128 = 7936
/// in magnitude: sums of four (two rounds of `vphaddw`) stay exact in i16. Cheaper than widening
/// every row to i32 first and then [`reduce8`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn reduce8_pairs(v: &[__m256i; GROUP_ROWS], ones16: __m256i) -> __m256i {
    // Per 128-bit half: rows 0-3 (and 4-7), two partial sums each, widened to one i32 each.
    let q0123 = _mm256_hadd_epi16(_mm256_hadd_epi16(v[0], v[1]), _mm256_hadd_epi16(v[2], v[3]));
    let q4567 = _mm256_hadd_epi16(_mm256_hadd_epi16(v[4], v[5]), _mm256_hadd_epi16(v[6], v[7]));
    let r0123 = _mm256_madd_epi16(q0123, ones16);
    let r4567 = _mm256_madd_epi16(q4567, ones16);
    // Low halves (rows 0-7 of the first 16 quants) plus high halves (the last 16).
    let low = _mm256_permute2x128_si256::<0x20>(r0123, r4567);
    let high = _mm256_permute2x128_si256::<0x31>(r0123, r4567);
    _mm256_add_epi32(low, high)
}

/// The eight rows' f16 fields at byte `off`, as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16x8(p: &[*const u8; GROUP_ROWS], off: usize) -> __m256 {
    // Packed in general-purpose registers (idle here) rather than with eight vector inserts.
    let h = |i: usize| p[i].add(off).cast::<u16>().read_unaligned() as u64;
    let lo = h(0) | h(1) << 16 | h(2) << 32 | h(3) << 48;
    let hi = h(4) | h(5) << 16 | h(6) << 32 | h(7) << 48;
    _mm256_cvtph_ps(_mm_set_epi64x(hi as i64, lo as i64))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

/// Bytes ahead of a group's first row where its prefetches go: whole groups, about 6 KiB
/// (measured on Zen 3 against a plain read of the same bytes: one 5.4 KiB Q8_0 group ahead, two
/// 3.5 KiB Q5_0 groups; much nearer or further is slower).
#[inline(always)]
fn prefetch_distance(row_bytes: usize) -> usize {
    const TARGET: usize = 6 * 1024;
    let group_bytes = GROUP_ROWS * row_bytes;
    ((TARGET + group_bytes / 2) / group_bytes.max(1)).max(1) * group_bytes
}

/// Prefetches `len` bytes at `p` into L2 (hints only: never faults, so `p` may point past the
/// matrix). L2 rather than L1: a 13 KiB group of long rows plus the one ahead would crowd L1.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prefetch(p: *const u8, len: usize) {
    let mut off = 0;
    while off < len {
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(off).cast());
        off += 64;
    }
}

/// Row `r`'s share of the prefetch for the block at byte `off` of each row: `block_bytes` of the
/// `GROUP_ROWS * block_bytes` that the next group's rows take up from `GROUP_ROWS * off` (over
/// all blocks, the whole next group). Issued between the rows' loads rather than as one burst per
/// block, so that a long burst does not fill the core's miss buffers ahead of the demand loads
/// (Q6_K, 26 lines a block: one burst read at about half the plain-read rate, shares at about
/// the plain-read rate).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prefetch_row_share(next_group: *const u8, off: usize, r: usize, block_bytes: usize) {
    prefetch(
        next_group.wrapping_add(GROUP_ROWS * off + r * block_bytes),
        block_bytes,
    );
}

/// `acc + (dw * da) * isum` lane by lane: the scalar reference's per-block step.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scaled_add(acc: __m256, dw: __m256, da: f32, isum: __m256i) -> __m256 {
    let d = _mm256_mul_ps(dw, _mm256_set1_ps(da));
    _mm256_add_ps(acc, _mm256_mul_ps(d, _mm256_cvtepi32_ps(isum)))
}

/// Runs `chunk::<NT>` over every group of eight rows and, inside a group, over token chunks of
/// at most [`MAX_TOKENS`] (the group's rows stay in L1 between chunks), storing the results.
macro_rules! for_each_group {
    ($chunk:ident, $range:expr, $a:expr, $cols:expr, $out:expr) => {{
        let (range, a, out): (&RowRange, &ActRows, Out) = ($range, $a, $out);
        let row_bytes = range.row_bytes;
        for first in (0..range.n_rows).step_by(GROUP_ROWS) {
            let rows = row_ptrs(range, first);
            let n_rows = GROUP_ROWS.min(range.n_rows - first);
            let mut t0 = 0;
            while t0 < a.n_tokens {
                let nt = (a.n_tokens - t0).min(MAX_TOKENS);
                match nt {
                    1 => {
                        let acc = $chunk::<1>(&rows, act_ptrs::<1>(a, t0), row_bytes, $cols);
                        store(&acc, out, first, n_rows, t0)
                    }
                    2 => {
                        let acc = $chunk::<2>(&rows, act_ptrs::<2>(a, t0), row_bytes, $cols);
                        store(&acc, out, first, n_rows, t0)
                    }
                    3 => {
                        let acc = $chunk::<3>(&rows, act_ptrs::<3>(a, t0), row_bytes, $cols);
                        store(&acc, out, first, n_rows, t0)
                    }
                    _ => {
                        let acc = $chunk::<4>(&rows, act_ptrs::<4>(a, t0), row_bytes, $cols);
                        store(&acc, out, first, n_rows, t0)
                    }
                }
                t0 += nt;
            }
        }
    }};
}

/// Writes the first `n_rows` lanes of each token's accumulator.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn store(acc: &[__m256], out: Out, first: usize, n_rows: usize, t0: usize) {
    for (t, &v) in acc.iter().enumerate() {
        let dst = out.ptr.add((t0 + t) * out.token_stride + first);
        if n_rows == GROUP_ROWS {
            _mm256_storeu_ps(dst, v);
        } else {
            let mut lanes = [0.0f32; GROUP_ROWS];
            _mm256_storeu_ps(lanes.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, n_rows);
        }
    }
}

/// One-row dot product through a row kernel (tests and the start-up self-check: it allocates).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_one(kernel: RowsFn, dtype: GgmlType, w: &[u8], a: &[u8], n: usize) -> f32 {
    let range = RowRange {
        data: w,
        row_bytes: w.len(),
        n_rows: 1,
    };
    let mut info = Vec::new();
    if super::vec_dot_type(dtype) == GgmlType::Q8_0 {
        info.resize(n / QK * Q8_0_INFO_BYTES, 0);
        super::write_q8_0_info(a, &mut info);
    }
    let acts = ActRows {
        data: a,
        row_bytes: a.len(),
        info: &info,
        info_bytes: info.len(),
        n_tokens: 1,
    };
    debug_assert_eq!(dtype.bytes_for(n), Some(w.len()));
    let mut result = 0.0f32;
    let out = Out {
        ptr: &mut result,
        token_stride: 1,
    };
    kernel(&range, &acts, n, out);
    result
}

// ----------------------------------------------------------------------------------------------
// Q8_0 weights (Q8_0 activations)
// ----------------------------------------------------------------------------------------------

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q8_0(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
    for_each_group!(q8_0_chunk, range, a, cols, out)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_chunk<const NT: usize>(
    rows: &[*const u8; GROUP_ROWS],
    acts: [Act; NT],
    row_bytes: usize,
    cols: usize,
) -> [__m256; NT] {
    const W: usize = 34;
    let ones = _mm256_set1_epi16(1);
    let next_group = rows[0].wrapping_add(prefetch_distance(row_bytes));
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK {
        let off = k * W;
        let mut lanes = [[_mm256_setzero_si256(); GROUP_ROWS]; NT];
        for (r, &row) in rows.iter().enumerate() {
            prefetch_row_share(next_group, off, r, W);
            let w = load256(row.add(off + offs::Q8_0_QS));
            // |w| is the unsigned operand: exact even for w = -128 (activations are within ±127).
            let w_abs = _mm256_sign_epi8(w, w);
            for t in 0..NT {
                let y = load256(acts[t].row.add(off + offs::Q8_0_QS));
                let pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(y, w));
                lanes[t][r] = _mm256_madd_epi16(pairs, ones);
            }
        }
        let dw = f16x8(rows, off);
        for t in 0..NT {
            acc[t] = scaled_add(acc[t], dw, acts[t].scale(k), reduce8(&lanes[t]));
        }
    }
    acc
}

/// [`q8_0_chunk`] with `vpdpbusd` for the byte products (the same exact i32 sums).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0_chunk_vnni<const NT: usize>(
    rows: &[*const u8; GROUP_ROWS],
    acts: [Act; NT],
    row_bytes: usize,
    cols: usize,
) -> [__m256; NT] {
    const W: usize = 34;
    let next_group = rows[0].wrapping_add(prefetch_distance(row_bytes));
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK {
        let off = k * W;
        let mut lanes = [[_mm256_setzero_si256(); GROUP_ROWS]; NT];
        for (r, &row) in rows.iter().enumerate() {
            prefetch_row_share(next_group, off, r, W);
            let w = load256(row.add(off + offs::Q8_0_QS));
            let w_abs = _mm256_sign_epi8(w, w);
            for t in 0..NT {
                let y = load256(acts[t].row.add(off + offs::Q8_0_QS));
                lanes[t][r] =
                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w_abs, _mm256_sign_epi8(y, w));
            }
        }
        let dw = f16x8(rows, off);
        for t in 0..NT {
            acc[t] = scaled_add(acc[t], dw, acts[t].scale(k), reduce8(&lanes[t]));
        }
    }
    acc
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_one(rows_q8_0, GgmlType::Q8_0, w, a, n)
}

// ----------------------------------------------------------------------------------------------
// Q4_0 / Q5_0 weights (Q8_0 activations): unsigned quants, offset subtracted after the sum
// ----------------------------------------------------------------------------------------------

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q4_0(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
    for_each_group!(q4_0_chunk, range, a, cols, out)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q5_0(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
    for_each_group!(q5_0_chunk, range, a, cols, out)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_chunk<const NT: usize>(
    rows: &[*const u8; GROUP_ROWS],
    acts: [Act; NT],
    row_bytes: usize,
    cols: usize,
) -> [__m256; NT] {
    q4_q5_chunk::<NT, false>(rows, acts, row_bytes, cols)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_chunk<const NT: usize>(
    rows: &[*const u8; GROUP_ROWS],
    acts: [Act; NT],
    row_bytes: usize,
    cols: usize,
) -> [__m256; NT] {
    q4_q5_chunk::<NT, true>(rows, acts, row_bytes, cols)
}

/// The 32 low-nibble quants of a 16-byte field in value order: the low nibbles in the first
/// 128-bit half, the high nibbles in the second (one broadcast load, one variable shift).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
    let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
    let shifted = _mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F))
}

/// 0x10 in byte `j` when bit `j` of the little-endian u32 at `p` is set: a Q5 block's fifth bits.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn fifth_bits(p: *const u8) -> __m256i {
    super::avx2::q5_high_bits(p.cast::<u32>().read_unaligned())
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_q5_chunk<const NT: usize, const Q5: bool>(
    rows: &[*const u8; GROUP_ROWS],
    acts: [Act; NT],
    row_bytes: usize,
    cols: usize,
) -> [__m256; NT] {
    // Block: d f16, [qh u32,] qs[16]; stored value = quant + offset.
    let (w_size, qs_off, offset_shift) = if Q5 {
        (22, offs::Q5_0_QS, 4)
    } else {
        (18, offs::Q4_0_QS, 3)
    };
    let ones16 = _mm256_set1_epi16(1);
    let next_group = rows[0].wrapping_add(prefetch_distance(row_bytes));
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK {
        let off = k * w_size;
        let a_off = k * 34;
        // One burst per block: spreading these few lines over the rows measured slower here.
        prefetch(
            next_group.wrapping_add(GROUP_ROWS * off),
            GROUP_ROWS * w_size,
        );
        let mut lanes = [[_mm256_setzero_si256(); GROUP_ROWS]; NT];
        for (r, &row) in rows.iter().enumerate() {
            let mut q = nibbles(row.add(off + qs_off));
            if Q5 {
                q = _mm256_or_si256(q, fifth_bits(row.add(off + offs::Q5_0_QH)));
            }
            for t in 0..NT {
                let y = load256(acts[t].row.add(a_off + offs::Q8_0_QS));
                lanes[t][r] = _mm256_maddubs_epi16(q, y);
            }
        }
        let dw = f16x8(rows, off);
        for t in 0..NT {
            let offset = _mm256_set1_epi32(acts[t].quant_sum(k) << offset_shift);
            let isum = _mm256_sub_epi32(reduce8_pairs(&lanes[t], ones16), offset);
            acc[t] = scaled_add(acc[t], dw, acts[t].scale(k), isum);
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_0_chunk_vnni<const NT: usize>(
    rows: &[*const u8; GROUP_ROWS],
    acts: [Act; NT],
    row_bytes: usize,
    cols: usize,
) -> [__m256; NT] {
    q4_q5_chunk_vnni::<NT, false>(rows, acts, row_bytes, cols)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q5_0_chunk_vnni<const NT: usize>(
    rows: &[*const u8; GROUP_ROWS],
    acts: [Act; NT],
    row_bytes: usize,
    cols: usize,
) -> [__m256; NT] {
    q4_q5_chunk_vnni::<NT, true>(rows, acts, row_bytes, cols)
}

/// [`q4_q5_chunk`] with `vpdpbusd`: the byte products summed in fours straight to i32 (no i16
/// pairs to reduce), then the same offset subtraction and float steps.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_q5_chunk_vnni<const NT: usize, const Q5: bool>(
    rows: &[*const u8; GROUP_ROWS],
    acts: [Act; NT],
    row_bytes: usize,
    cols: usize,
) -> [__m256; NT] {
    let (w_size, qs_off, offset_shift) = if Q5 {
        (22, offs::Q5_0_QS, 4)
    } else {
        (18, offs::Q4_0_QS, 3)
    };
    let next_group = rows[0].wrapping_add(prefetch_distance(row_bytes));
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK {
        let off = k * w_size;
        let a_off = k * 34;
        prefetch(
            next_group.wrapping_add(GROUP_ROWS * off),
            GROUP_ROWS * w_size,
        );
        let mut lanes = [[_mm256_setzero_si256(); GROUP_ROWS]; NT];
        for (r, &row) in rows.iter().enumerate() {
            let mut q = nibbles(row.add(off + qs_off));
            if Q5 {
                q = _mm256_or_si256(q, fifth_bits(row.add(off + offs::Q5_0_QH)));
            }
            for t in 0..NT {
                let y = load256(acts[t].row.add(a_off + offs::Q8_0_QS));
                lanes[t][r] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, y);
            }
        }
        let dw = f16x8(rows, off);
        for t in 0..NT {
            let offset = _mm256_set1_epi32(acts[t].quant_sum(k) << offset_shift);
            let isum = _mm256_sub_epi32(reduce8(&lanes[t]), offset);
            acc[t] = scaled_add(acc[t], dw, acts[t].scale(k), isum);
        }
    }
    acc
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_0(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_one(rows_q4_0, GgmlType::Q4_0, w, a, n)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_0(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_one(rows_q5_0, GgmlType::Q5_0, w, a, n)
}

// ----------------------------------------------------------------------------------------------
// K-quants (Q8_0 activations: one scale per 32 values, see `scalar::dot_q4_k`)
// ----------------------------------------------------------------------------------------------

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q4_k(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
    for_each_group!(q4_k_chunk, range, a, cols, out)
}

/// Per 32-value sub-block, as the scalar reference: the rows' exact sums `Σ q·a` in one vector,
/// then `acc + ((d·scale)·d_a)·isum − ((dmin·min)·d_a)·Σa`, the scales and mins transposed so
/// that lane `r` holds row `r`'s.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_chunk<const NT: usize>(
    rows: &[*const u8; GROUP_ROWS],
    acts: [Act; NT],
    row_bytes: usize,
    cols: usize,
) -> [__m256; NT] {
    const W: usize = 144;
    let m4 = _mm256_set1_epi8(0x0F);
    let ones16 = _mm256_set1_epi16(1);
    let next_group = rows[0].wrapping_add(prefetch_distance(row_bytes));
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK_K {
        let off = k * W;
        for r in 0..GROUP_ROWS {
            prefetch_row_share(next_group, off, r, W);
        }
        let (scales, mins) = k4_scales_mins_by_row(rows, off + offs::Q4_K_SCALES);
        let dw = f16x8(rows, off);
        let dmin_w = f16x8(rows, off + offs::Q4_K_DMIN);
        for sub in 0..8 {
            let block = 8 * k + sub;
            let a_off = block * 34 + offs::Q8_0_QS;
            let mut lanes = [[_mm256_setzero_si256(); GROUP_ROWS]; NT];
            for (r, &row) in rows.iter().enumerate() {
                // Sub-blocks 2j and 2j + 1 are the low and high nibbles of the same 32 bytes.
                let raw = load256(row.add(off + offs::Q4_K_QS + 32 * (sub / 2)));
                let q = if sub % 2 == 0 {
                    _mm256_and_si256(raw, m4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4)
                };
                for t in 0..NT {
                    lanes[t][r] = _mm256_maddubs_epi16(q, load256(acts[t].row.add(a_off)));
                }
            }
            let d_sub = _mm256_mul_ps(dw, scales[sub]);
            let m_sub = _mm256_mul_ps(dmin_w, mins[sub]);
            for t in 0..NT {
                let da = _mm256_set1_ps(acts[t].scale(block));
                let asum = _mm256_set1_ps(acts[t].quant_sum(block) as f32);
                let isum = _mm256_cvtepi32_ps(reduce8_pairs(&lanes[t], ones16));
                let term = _mm256_sub_ps(
                    _mm256_mul_ps(_mm256_mul_ps(d_sub, da), isum),
                    _mm256_mul_ps(_mm256_mul_ps(m_sub, da), asum),
                );
                acc[t] = _mm256_add_ps(acc[t], term);
            }
        }
    }
    acc
}

/// The eight rows' Q4_K scales and mins (12 bytes at byte `off` of each row) by sub-block:
/// lane `r` of `scales[sub]` is row `r`'s scale of sub-block `sub`, as f32 (and `mins`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_scales_mins_by_row(
    rows: &[*const u8; GROUP_ROWS],
    off: usize,
) -> ([__m256; 8], [__m256; 8]) {
    // Per row, i32 lane `sub` = scale | min << 16; then transposed.
    let v: [__m256i; GROUP_ROWS] = std::array::from_fn(|r| {
        let (scales, mins) = k4_scales_mins(rows[r].add(off));
        _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(scales, mins))
    });
    let by_sub = transpose8_epi32(&v);
    let low16 = _mm256_set1_epi32(0xFFFF);
    (
        std::array::from_fn(|sub| _mm256_cvtepi32_ps(_mm256_and_si256(by_sub[sub], low16))),
        std::array::from_fn(|sub| _mm256_cvtepi32_ps(_mm256_srli_epi32::<16>(by_sub[sub]))),
    )
}

/// The 8 six-bit scales and 8 six-bit mins of a Q4_K/Q5_K block (12 bytes at `p`, layout as in
/// [`layout::k4_scales_mins`]) as bytes in the low halves of two registers, unpacked with 32-bit
/// integer operations on four values at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_scales_mins(p: *const u8) -> (__m128i, __m128i) {
    let word = |i: usize| p.add(4 * i).cast::<u32>().read_unaligned();
    let (w0, w1, w2) = (word(0), word(1), word(2));
    let low6 = 0x3f3f_3f3f;
    let (low4, top2) = (0x0f0f_0f0f, 0x0303_0303);
    let scales_hi = (w2 & low4) | ((w0 >> 6) & top2) << 4;
    let mins_hi = ((w2 >> 4) & low4) | ((w1 >> 6) & top2) << 4;
    let pack = |lo: u32, hi: u32| _mm_cvtsi64_si128((lo as u64 | (hi as u64) << 32) as i64);
    (pack(w0 & low6, scales_hi), pack(w1 & low6, mins_hi))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_one(rows_q4_k, GgmlType::Q4_K, w, a, n)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q6_k(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
    for_each_group!(q6_k_chunk, range, a, cols, out)
}

/// The four quarters (32 values each, 0..64 with the offset of 32 not removed) of half `half`
/// of the Q6_K block at `b`: low four bits from `ql`, top two from `qh`, three loads for all.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q6k_half_quarters(b: *const u8, half: usize) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(3);
    let l0 = load256(b.add(64 * half));
    let l1 = load256(b.add(64 * half + 32));
    let hb = load256(b.add(offs::Q6_K_QH + 32 * half));
    let high = |bits: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(bits, m2));
    [
        _mm256_or_si256(_mm256_and_si256(l0, m4), high(hb)),
        _mm256_or_si256(_mm256_and_si256(l1, m4), high(_mm256_srli_epi16::<2>(hb))),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4),
            high(_mm256_srli_epi16::<4>(hb)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
            high(_mm256_srli_epi16::<6>(hb)),
        ),
    ]
}

/// [`reduce8_pairs`] without its last add: lane `i` of the first vector is the sum of row `i`'s
/// eight i16 in the low 128 bits (values 0..16 of a 32-value block), of the second those in the
/// high 128 bits (values 16..32). Sums of four i16 must stay exact (|value| ≤ 8191).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn reduce8_pairs_halves(v: &[__m256i; GROUP_ROWS], ones16: __m256i) -> (__m256i, __m256i) {
    let q0123 = _mm256_hadd_epi16(_mm256_hadd_epi16(v[0], v[1]), _mm256_hadd_epi16(v[2], v[3]));
    let q4567 = _mm256_hadd_epi16(_mm256_hadd_epi16(v[4], v[5]), _mm256_hadd_epi16(v[6], v[7]));
    let r0123 = _mm256_madd_epi16(q0123, ones16);
    let r4567 = _mm256_madd_epi16(q4567, ones16);
    (
        _mm256_permute2x128_si256::<0x20>(r0123, r4567),
        _mm256_permute2x128_si256::<0x31>(r0123, r4567),
    )
}

/// The eight rows' 16 Q6_K scales (signed bytes at byte `off` of each row) transposed: lane `r`
/// of vector `g` is row `r`'s scale of 16-value group `g`, as i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_scales_by_row(rows: &[*const u8; GROUP_ROWS], off: usize) -> [__m256i; 16] {
    let raw: [__m128i; GROUP_ROWS] =
        std::array::from_fn(|r| _mm_loadu_si128(rows[r].add(off).cast()));
    let low: [__m256i; GROUP_ROWS] = std::array::from_fn(|r| _mm256_cvtepi8_epi32(raw[r]));
    let high: [__m256i; GROUP_ROWS] =
        std::array::from_fn(|r| _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(raw[r], raw[r])));
    let (a, b) = (transpose8_epi32(&low), transpose8_epi32(&high));
    std::array::from_fn(|g| if g < 8 { a[g] } else { b[g - 8] })
}

/// 8 × 8 transpose of i32: lane `r` of output `j` is lane `j` of input `r`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transpose8_epi32(v: &[__m256i; 8]) -> [__m256i; 8] {
    let lo01 = _mm256_unpacklo_epi32(v[0], v[1]);
    let hi01 = _mm256_unpackhi_epi32(v[0], v[1]);
    let lo23 = _mm256_unpacklo_epi32(v[2], v[3]);
    let hi23 = _mm256_unpackhi_epi32(v[2], v[3]);
    let lo45 = _mm256_unpacklo_epi32(v[4], v[5]);
    let hi45 = _mm256_unpackhi_epi32(v[4], v[5]);
    let lo67 = _mm256_unpacklo_epi32(v[6], v[7]);
    let hi67 = _mm256_unpackhi_epi32(v[6], v[7]);
    // u[j] holds lanes j (low half) and j + 4 (high half) of rows 0-3, w[j] of rows 4-7.
    let u = [
        _mm256_unpacklo_epi64(lo01, lo23),
        _mm256_unpackhi_epi64(lo01, lo23),
        _mm256_unpacklo_epi64(hi01, hi23),
        _mm256_unpackhi_epi64(hi01, hi23),
    ];
    let w = [
        _mm256_unpacklo_epi64(lo45, lo67),
        _mm256_unpackhi_epi64(lo45, lo67),
        _mm256_unpacklo_epi64(hi45, hi67),
        _mm256_unpackhi_epi64(hi45, hi67),
    ];
    std::array::from_fn(|j| {
        if j < 4 {
            _mm256_permute2x128_si256::<0x20>(u[j], w[j])
        } else {
            _mm256_permute2x128_si256::<0x31>(u[j - 4], w[j - 4])
        }
    })
}

/// Per 32-value quarter, as the scalar reference: `Σ scale·(q − 32)·a` exact in i32, then
/// `acc + (d·d_a)·isum`. The offset comes off the `vpmaddubsw` pair sums (`(q − 32)·a` pairs are
/// within ±8128, so sums of four stay in i16); the rows' two 16-value sums per quarter come out
/// of one reduction and take their scales (transposed once per block) in i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_chunk<const NT: usize>(
    rows: &[*const u8; GROUP_ROWS],
    acts: [Act; NT],
    row_bytes: usize,
    cols: usize,
) -> [__m256; NT] {
    const W: usize = 210;
    let thirty_two = _mm256_set1_epi8(32);
    let ones16 = _mm256_set1_epi16(1);
    let next_group = rows[0].wrapping_add(prefetch_distance(row_bytes));
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK_K {
        let off = k * W;
        for r in 0..GROUP_ROWS {
            prefetch_row_share(next_group, off, r, W);
        }
        let scales = q6k_scales_by_row(rows, off + offs::Q6_K_SCALES);
        let dw = f16x8(rows, off + offs::Q6_K_D);
        for half in 0..2 {
            let mut lanes = [[[_mm256_setzero_si256(); GROUP_ROWS]; NT]; 4];
            for (r, &row) in rows.iter().enumerate() {
                let quarters = q6k_half_quarters(row.add(off), half);
                for (i, &q) in quarters.iter().enumerate() {
                    let a_off = (8 * k + 4 * half + i) * 34 + offs::Q8_0_QS;
                    for t in 0..NT {
                        let y = load256(acts[t].row.add(a_off));
                        let offset = _mm256_maddubs_epi16(thirty_two, y);
                        lanes[i][t][r] = _mm256_sub_epi16(_mm256_maddubs_epi16(q, y), offset);
                    }
                }
            }
            for (i, quarter_lanes) in lanes.iter().enumerate() {
                let quarter = 4 * half + i;
                let block = 8 * k + quarter;
                for t in 0..NT {
                    let (lo, hi) = reduce8_pairs_halves(&quarter_lanes[t], ones16);
                    let isum = _mm256_add_epi32(
                        _mm256_mullo_epi32(lo, scales[2 * quarter]),
                        _mm256_mullo_epi32(hi, scales[2 * quarter + 1]),
                    );
                    acc[t] = scaled_add(acc[t], dw, acts[t].scale(block), isum);
                }
            }
        }
    }
    acc
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_one(rows_q6_k, GgmlType::Q6_K, w, a, n)
}

// ----------------------------------------------------------------------------------------------
// The AVX-512 builds
// ----------------------------------------------------------------------------------------------

/// The row kernels (and their one-row dot products) compiled with more target features: the
/// chunk functions are inlined into these entry points and built with the wider register
/// file and instruction encodings. Same bits as the AVX2 build (see [`Build`]).
macro_rules! build_of_row_kernels {
    ($module:ident, $features:literal, $q8_0:ident, $q4_0:ident, $q5_0:ident) => {
        mod $module {
            use super::*;

            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows_q8_0(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
                for_each_group!($q8_0, range, a, cols, out)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows_q4_0(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
                for_each_group!($q4_0, range, a, cols, out)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows_q5_0(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
                for_each_group!($q5_0, range, a, cols, out)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows_q4_k(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
                for_each_group!(q4_k_chunk, range, a, cols, out)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows_q6_k(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
                for_each_group!(q6_k_chunk, range, a, cols, out)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn dot_q8_0(w: &[u8], a: &[u8], n: usize) -> f32 {
                dot_one(rows_q8_0, GgmlType::Q8_0, w, a, n)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn dot_q4_0(w: &[u8], a: &[u8], n: usize) -> f32 {
                dot_one(rows_q4_0, GgmlType::Q4_0, w, a, n)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn dot_q5_0(w: &[u8], a: &[u8], n: usize) -> f32 {
                dot_one(rows_q5_0, GgmlType::Q5_0, w, a, n)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn dot_q4_k(w: &[u8], a: &[u8], n: usize) -> f32 {
                dot_one(rows_q4_k, GgmlType::Q4_K, w, a, n)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn dot_q6_k(w: &[u8], a: &[u8], n: usize) -> f32 {
                dot_one(rows_q6_k, GgmlType::Q6_K, w, a, n)
            }
        }
    };
}

build_of_row_kernels!(
    wide,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl",
    q8_0_chunk,
    q4_0_chunk,
    q5_0_chunk
);
build_of_row_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    q8_0_chunk_vnni,
    q4_0_chunk_vnni,
    q5_0_chunk_vnni
);
