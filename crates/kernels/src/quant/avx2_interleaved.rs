//! Matrix-vector kernels over interleaved weights (see [`super::interleave`]): each group of
//! eight rows against one to [`MAX_TOKENS`] activation rows.
//!
//! A 32-byte load holds four quants of each of the eight rows in that row's i32 lane, so the
//! integer products against four activation bytes broadcast to every lane accumulate per row
//! with no reduction across lanes; the eight scales are one load. The block sums are the same
//! exact integers as in the row-major kernels, then scaled and accumulated with the same float
//! operations in the same order (`scaled_add`), so every result is bit-identical to
//! `scalar::vec_dot` of its row: interleaving changes the speed, never the numbers.

use std::arch::x86_64::*;

use gemma_formats::GgmlType;

// `fifth_bits`: 0x10 in byte `k` where bit `k` of the u32 at a pointer is set: what a Q5_0 mask
// of the interleaved layout needs (the same spread as a row-major block's `qh`).
use super::avx2_rows::{
    act_ptrs, fifth_bits, load256, scaled_add, store, Act, ActRows, Build, Out, RowRange, RowsFn,
    MAX_TOKENS,
};
use super::interleave::GROUP_ROWS;
use super::layout::{offs, QK, QK_K};

/// The kernel over interleaved `dtype` weights for `build` (`range.data` starts at a group and
/// `range.n_rows` is a multiple of [`GROUP_ROWS`]).
pub(super) fn rows_fn(dtype: GgmlType, build: Build) -> Option<RowsFn> {
    Some(match (build, dtype) {
        (Build::Avx2, GgmlType::Q4_0) => rows_q4_0,
        (Build::Avx2, GgmlType::Q5_0) => rows_q5_0,
        (Build::Avx2, GgmlType::Q8_0) => rows_q8_0,
        (Build::Avx512, GgmlType::Q4_0) => wide::rows_q4_0,
        (Build::Avx512, GgmlType::Q5_0) => wide::rows_q5_0,
        (Build::Avx512, GgmlType::Q8_0) => wide::rows_q8_0,
        (Build::Avx512Vnni, GgmlType::Q4_0) => vnni::rows_q4_0,
        (Build::Avx512Vnni, GgmlType::Q5_0) => vnni::rows_q5_0,
        (Build::Avx512Vnni, GgmlType::Q8_0) => vnni::rows_q8_0,
        (Build::Avx2, GgmlType::Q4_K) => rows_q4_k,
        (Build::Avx512, GgmlType::Q4_K) => wide::rows_q4_k,
        (Build::Avx512Vnni, GgmlType::Q4_K) => vnni::rows_q4_k,
        (Build::Avx2, GgmlType::Q6_K) => rows_q6_k,
        (Build::Avx512, GgmlType::Q6_K) => wide::rows_q6_k,
        (Build::Avx512Vnni, GgmlType::Q6_K) => vnni::rows_q6_k,
        _ => return None,
    })
}

/// Bytes ahead of the current block that are prefetched: the stream is sequential, so this
/// only has to stay ahead of the hardware prefetcher's ramp-up at each new task.
const PREFETCH_AHEAD: usize = 2048;

/// Runs `chunk::<NT>` over every group and, inside a group, over token chunks of at most
/// [`MAX_TOKENS`] (the group's weights stay in L1 between chunks), storing the results.
macro_rules! for_each_interleaved_group {
    ($chunk:ident, $range:expr, $a:expr, $cols:expr, $out:expr) => {{
        let (range, a, out): (&RowRange, &ActRows, Out) = ($range, $a, $out);
        let group_bytes = GROUP_ROWS * range.row_bytes;
        for first in (0..range.n_rows).step_by(GROUP_ROWS) {
            let group = range.data.as_ptr().add((first / GROUP_ROWS) * group_bytes);
            let mut t0 = 0;
            while t0 < a.n_tokens {
                let nt = (a.n_tokens - t0).min(MAX_TOKENS);
                match nt {
                    1 => store(
                        &$chunk::<1>(group, act_ptrs::<1>(a, t0), $cols),
                        out,
                        first,
                        GROUP_ROWS,
                        t0,
                    ),
                    2 => store(
                        &$chunk::<2>(group, act_ptrs::<2>(a, t0), $cols),
                        out,
                        first,
                        GROUP_ROWS,
                        t0,
                    ),
                    3 => store(
                        &$chunk::<3>(group, act_ptrs::<3>(a, t0), $cols),
                        out,
                        first,
                        GROUP_ROWS,
                        t0,
                    ),
                    _ => store(
                        &$chunk::<4>(group, act_ptrs::<4>(a, t0), $cols),
                        out,
                        first,
                        GROUP_ROWS,
                        t0,
                    ),
                }
                t0 += nt;
            }
        }
    }};
}

/// Four activation bytes at `p` in every i32 lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn broadcast4(p: *const u8) -> __m256i {
    _mm256_set1_epi32(p.cast::<i32>().read_unaligned())
}

/// The group's eight f16 scales of the block at `block`, as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scales(block: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(block.cast()))
}

/// Byte offset of block `k`'s quants in an activation row.
#[inline(always)]
fn act_quants(k: usize) -> usize {
    k * 34 + offs::Q8_0_QS
}

// ----------------------------------------------------------------------------------------------
// Q4_0: unsigned nibbles, `8 * sum(activations)` subtracted after the sum (exact in i32)
// ----------------------------------------------------------------------------------------------

const Q4_0_BLOCK: usize = GROUP_ROWS * 18;

/// Piece `p`'s low and high nibbles: values `4p..4p + 4` and `16 + 4p..` of each row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_piece(block: *const u8, p: usize) -> (__m256i, __m256i) {
    let mask = _mm256_set1_epi8(0x0F);
    let v = load256(block.add(16 + 32 * p));
    (
        _mm256_and_si256(v, mask),
        _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
    )
}

/// AVX2: `vpmaddubsw` pair sums (at most 2 · 15 · 127 = 3810) added in i16 over the block's
/// eight products per lane (at most 30480: exact), then widened once with `vpmaddwd`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_chunk<const NT: usize>(
    group: *const u8,
    acts: [Act; NT],
    cols: usize,
) -> [__m256; NT] {
    let ones16 = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK {
        let block = group.add(k * Q4_0_BLOCK);
        _mm_prefetch::<_MM_HINT_T0>(block.add(PREFETCH_AHEAD).cast());
        _mm_prefetch::<_MM_HINT_T0>(block.add(PREFETCH_AHEAD + 64).cast());
        let mut pairs = [_mm256_setzero_si256(); NT];
        for p in 0..4 {
            let (lo, hi) = q4_0_piece(block, p);
            for t in 0..NT {
                let a = acts[t].row.add(act_quants(k));
                let l = _mm256_maddubs_epi16(lo, broadcast4(a.add(4 * p)));
                let h = _mm256_maddubs_epi16(hi, broadcast4(a.add(16 + 4 * p)));
                pairs[t] = _mm256_add_epi16(pairs[t], _mm256_add_epi16(l, h));
            }
        }
        let dw = scales(block);
        for t in 0..NT {
            let offset = _mm256_set1_epi32(acts[t].quant_sum(k) << 3);
            let isum = _mm256_sub_epi32(_mm256_madd_epi16(pairs[t], ones16), offset);
            acc[t] = scaled_add(acc[t], dw, acts[t].scale(k), isum);
        }
    }
    acc
}

/// AVX-512 VNNI: `vpdpbusd` straight to i32, low and high nibbles in two chains.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_0_chunk_vnni<const NT: usize>(
    group: *const u8,
    acts: [Act; NT],
    cols: usize,
) -> [__m256; NT] {
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK {
        let block = group.add(k * Q4_0_BLOCK);
        _mm_prefetch::<_MM_HINT_T0>(block.add(PREFETCH_AHEAD).cast());
        _mm_prefetch::<_MM_HINT_T0>(block.add(PREFETCH_AHEAD + 64).cast());
        let mut low = [_mm256_setzero_si256(); NT];
        let mut high = [_mm256_setzero_si256(); NT];
        for p in 0..4 {
            let (lo, hi) = q4_0_piece(block, p);
            for t in 0..NT {
                let a = acts[t].row.add(act_quants(k));
                low[t] = _mm256_dpbusd_epi32(low[t], lo, broadcast4(a.add(4 * p)));
                high[t] = _mm256_dpbusd_epi32(high[t], hi, broadcast4(a.add(16 + 4 * p)));
            }
        }
        let dw = scales(block);
        for t in 0..NT {
            let offset = _mm256_set1_epi32(acts[t].quant_sum(k) << 3);
            let isum = _mm256_sub_epi32(_mm256_add_epi32(low[t], high[t]), offset);
            acc[t] = scaled_add(acc[t], dw, acts[t].scale(k), isum);
        }
    }
    acc
}

// ----------------------------------------------------------------------------------------------
// Q5_0: nibbles plus fifth bits from the group's masks, `16 * sum(activations)` subtracted
// ----------------------------------------------------------------------------------------------

const Q5_0_BLOCK: usize = GROUP_ROWS * 22;
/// Offsets in a Q5_0 group block: the fifth-bit masks (two u32 per piece), then the pieces.
const Q5_0_MASKS: usize = 16;
const Q5_0_PIECES: usize = 48;

/// AVX2: quants up to 31, so `vpmaddubsw` pair sums reach 2 · 31 · 127 = 7874 and only two
/// (a piece's low and high values) are added in i16 before widening.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_chunk<const NT: usize>(
    group: *const u8,
    acts: [Act; NT],
    cols: usize,
) -> [__m256; NT] {
    let ones16 = _mm256_set1_epi16(1);
    let nibble = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK {
        let block = group.add(k * Q5_0_BLOCK);
        for line in 0..3 {
            _mm_prefetch::<_MM_HINT_T0>(block.add(PREFETCH_AHEAD + 64 * line).cast());
        }
        let mut sums = [_mm256_setzero_si256(); NT];
        for p in 0..4 {
            let v = load256(block.add(Q5_0_PIECES + 32 * p));
            let masks = block.add(Q5_0_MASKS + 8 * p);
            let lo = _mm256_or_si256(_mm256_and_si256(v, nibble), fifth_bits(masks));
            let hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble),
                fifth_bits(masks.add(4)),
            );
            for t in 0..NT {
                let a = acts[t].row.add(act_quants(k));
                let l = _mm256_maddubs_epi16(lo, broadcast4(a.add(4 * p)));
                let h = _mm256_maddubs_epi16(hi, broadcast4(a.add(16 + 4 * p)));
                let pair = _mm256_madd_epi16(_mm256_add_epi16(l, h), ones16);
                sums[t] = _mm256_add_epi32(sums[t], pair);
            }
        }
        let dw = scales(block);
        for t in 0..NT {
            let offset = _mm256_set1_epi32(acts[t].quant_sum(k) << 4);
            let isum = _mm256_sub_epi32(sums[t], offset);
            acc[t] = scaled_add(acc[t], dw, acts[t].scale(k), isum);
        }
    }
    acc
}

/// AVX-512 VNNI: the masks applied as byte masks (`vpaddb` of 0x10 under the mask), then
/// `vpdpbusd` in two chains as for Q4_0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q5_0_chunk_vnni<const NT: usize>(
    group: *const u8,
    acts: [Act; NT],
    cols: usize,
) -> [__m256; NT] {
    let nibble = _mm256_set1_epi8(0x0F);
    let fifth = _mm256_set1_epi8(0x10);
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK {
        let block = group.add(k * Q5_0_BLOCK);
        for line in 0..3 {
            _mm_prefetch::<_MM_HINT_T0>(block.add(PREFETCH_AHEAD + 64 * line).cast());
        }
        let mut low = [_mm256_setzero_si256(); NT];
        let mut high = [_mm256_setzero_si256(); NT];
        for p in 0..4 {
            let v = load256(block.add(Q5_0_PIECES + 32 * p));
            let masks = block.add(Q5_0_MASKS + 8 * p).cast::<u32>();
            let lo = _mm256_and_si256(v, nibble);
            let lo = _mm256_mask_add_epi8(lo, masks.read_unaligned(), lo, fifth);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
            let hi = _mm256_mask_add_epi8(hi, masks.add(1).read_unaligned(), hi, fifth);
            for t in 0..NT {
                let a = acts[t].row.add(act_quants(k));
                low[t] = _mm256_dpbusd_epi32(low[t], lo, broadcast4(a.add(4 * p)));
                high[t] = _mm256_dpbusd_epi32(high[t], hi, broadcast4(a.add(16 + 4 * p)));
            }
        }
        let dw = scales(block);
        for t in 0..NT {
            let offset = _mm256_set1_epi32(acts[t].quant_sum(k) << 4);
            let isum = _mm256_sub_epi32(_mm256_add_epi32(low[t], high[t]), offset);
            acc[t] = scaled_add(acc[t], dw, acts[t].scale(k), isum);
        }
    }
    acc
}

// ----------------------------------------------------------------------------------------------
// Q8_0: signed quants
// ----------------------------------------------------------------------------------------------

const Q8_0_BLOCK: usize = GROUP_ROWS * 34;

/// AVX2: |w| against a·sign(w) (exact for w = -128: activations are within ±127), widened per
/// piece (two pair sums of up to 2 · 128 · 127 would overflow i16).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_chunk<const NT: usize>(
    group: *const u8,
    acts: [Act; NT],
    cols: usize,
) -> [__m256; NT] {
    let ones16 = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK {
        let block = group.add(k * Q8_0_BLOCK);
        for line in 0..4 {
            _mm_prefetch::<_MM_HINT_T0>(block.add(PREFETCH_AHEAD + 64 * line).cast());
        }
        let mut sums = [_mm256_setzero_si256(); NT];
        for p in 0..8 {
            let w = load256(block.add(16 + 32 * p));
            let w_abs = _mm256_sign_epi8(w, w);
            for t in 0..NT {
                let a = broadcast4(acts[t].row.add(act_quants(k) + 4 * p));
                let pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(a, w));
                sums[t] = _mm256_add_epi32(sums[t], _mm256_madd_epi16(pairs, ones16));
            }
        }
        let dw = scales(block);
        for t in 0..NT {
            acc[t] = scaled_add(acc[t], dw, acts[t].scale(k), sums[t]);
        }
    }
    acc
}

/// AVX-512 VNNI: the weights made unsigned (w + 128, a flipped sign bit) for `vpdpbusd`, and
/// `128 * sum(activations)` subtracted after the sum (exact in i32); two chains.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0_chunk_vnni<const NT: usize>(
    group: *const u8,
    acts: [Act; NT],
    cols: usize,
) -> [__m256; NT] {
    let flip = _mm256_set1_epi8(-128);
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK {
        let block = group.add(k * Q8_0_BLOCK);
        for line in 0..4 {
            _mm_prefetch::<_MM_HINT_T0>(block.add(PREFETCH_AHEAD + 64 * line).cast());
        }
        let mut even = [_mm256_setzero_si256(); NT];
        let mut odd = [_mm256_setzero_si256(); NT];
        for p in (0..8).step_by(2) {
            let w0 = _mm256_xor_si256(load256(block.add(16 + 32 * p)), flip);
            let w1 = _mm256_xor_si256(load256(block.add(48 + 32 * p)), flip);
            for t in 0..NT {
                let a = acts[t].row.add(act_quants(k) + 4 * p);
                even[t] = _mm256_dpbusd_epi32(even[t], w0, broadcast4(a));
                odd[t] = _mm256_dpbusd_epi32(odd[t], w1, broadcast4(a.add(4)));
            }
        }
        let dw = scales(block);
        for t in 0..NT {
            let offset = _mm256_set1_epi32(acts[t].quant_sum(k) << 7);
            let isum = _mm256_sub_epi32(_mm256_add_epi32(even[t], odd[t]), offset);
            acc[t] = scaled_add(acc[t], dw, acts[t].scale(k), isum);
        }
    }
    acc
}

// ----------------------------------------------------------------------------------------------
// Q4_K: 256-value super-blocks of eight 32-value sub-blocks with 6-bit scales and mins, against
// Q8_0 activations (one scale per 32 values, see `scalar::dot_q4_k`)
// ----------------------------------------------------------------------------------------------

const Q4_K_BLOCK: usize = GROUP_ROWS * 144;
/// Offsets in a Q4_K group super-block: the `dmin` run, the scale pieces, the quant pieces.
const Q4_K_DMIN: usize = 16;
const Q4_K_SCALES: usize = 32;
const Q4_K_QS: usize = 128;

/// The eight rows' 6-bit scales and mins, four sub-blocks per register: byte `j` of lane `r`
/// of `scales[h]` is row `r`'s scale of sub-block `4h + j` (ggml's `get_scale_min_k4`, done for
/// all rows at once on bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_scales_mins(block: *const u8) -> ([__m256i; 2], [__m256i; 2]) {
    let v0 = load256(block.add(Q4_K_SCALES));
    let v1 = load256(block.add(Q4_K_SCALES + 32));
    let v2 = load256(block.add(Q4_K_SCALES + 64));
    let low6 = _mm256_set1_epi8(63);
    let nibble = _mm256_set1_epi8(0x0F);
    // Bits 6 and 7 of a byte moved to bits 4 and 5.
    let top2 = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16::<2>(v), _mm256_set1_epi8(0x30));
    let scales = [
        _mm256_and_si256(v0, low6),
        _mm256_or_si256(_mm256_and_si256(v2, nibble), top2(v0)),
    ];
    let mins = [
        _mm256_and_si256(v1, low6),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(v2), nibble),
            top2(v1),
        ),
    ];
    (scales, mins)
}

/// Sub-block `s`'s byte of each lane (from [`q4_k_scales_mins`]) as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sub_block_byte(v: &[__m256i; 2], s: usize) -> __m256 {
    let lanes = _mm256_srlv_epi32(v[s / 4], _mm256_set1_epi32(8 * (s % 4) as i32));
    _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32(0xFF)))
}

/// `acc + (d_sub·d_a)·isum − (m_sub·d_a)·asum`, lane by lane: `scalar::dot_q4_k`'s step.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_step(
    acc: __m256,
    d_sub: __m256,
    m_sub: __m256,
    act: Act,
    b: usize,
    isum: __m256i,
) -> __m256 {
    let da = _mm256_set1_ps(act.scale(b));
    let plus = _mm256_mul_ps(_mm256_mul_ps(d_sub, da), _mm256_cvtepi32_ps(isum));
    let minus = _mm256_mul_ps(
        _mm256_mul_ps(m_sub, da),
        _mm256_set1_ps(act.quant_sum(b) as f32),
    );
    _mm256_add_ps(acc, _mm256_sub_ps(plus, minus))
}

/// Runs `sums(chunk, block)` for each 64-value chunk of each super-block (the two sub-blocks'
/// exact integer sums per token) and applies the float steps in sub-block order.
macro_rules! q4_k_chunk_body {
    ($group:expr, $acts:expr, $cols:expr, $nt:ident, $sums:expr) => {{
        let (group, acts, cols): (*const u8, [Act; $nt], usize) = ($group, $acts, $cols);
        let mut acc = [_mm256_setzero_ps(); $nt];
        for k in 0..cols / QK_K {
            let block = group.add(k * Q4_K_BLOCK);
            let d = scales(block);
            let dmin = scales(block.add(Q4_K_DMIN));
            let (sc, mn) = q4_k_scales_mins(block);
            for c in 0..4 {
                let quants = block.add(Q4_K_QS + 256 * c);
                for line in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(quants.add(PREFETCH_AHEAD + 64 * line).cast());
                }
                let (low, high): ([__m256i; $nt], [__m256i; $nt]) = $sums(quants, 8 * k + 2 * c);
                for (h, isums) in [low, high].iter().enumerate() {
                    let s = 2 * c + h;
                    let d_sub = _mm256_mul_ps(d, sub_block_byte(&sc, s));
                    let m_sub = _mm256_mul_ps(dmin, sub_block_byte(&mn, s));
                    for t in 0..$nt {
                        acc[t] = q4_k_step(acc[t], d_sub, m_sub, acts[t], 8 * k + s, isums[t]);
                    }
                }
            }
        }
        acc
    }};
}

/// AVX2: a chunk's eight pieces, `vpmaddubsw` pair sums (at most 3810) added in i16 (at most
/// 30480: exact) per sub-block, then widened.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_chunk<const NT: usize>(
    group: *const u8,
    acts: [Act; NT],
    cols: usize,
) -> [__m256; NT] {
    let ones16 = _mm256_set1_epi16(1);
    let nibble = _mm256_set1_epi8(0x0F);
    let sums = |quants: *const u8, b: usize| {
        let mut low = [_mm256_setzero_si256(); NT];
        let mut high = [_mm256_setzero_si256(); NT];
        for p in 0..8 {
            let v = load256(quants.add(32 * p));
            let lo = _mm256_and_si256(v, nibble);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
            for t in 0..NT {
                let a_lo = broadcast4(acts[t].row.add(act_quants(b) + 4 * p));
                let a_hi = broadcast4(acts[t].row.add(act_quants(b + 1) + 4 * p));
                low[t] = _mm256_add_epi16(low[t], _mm256_maddubs_epi16(lo, a_lo));
                high[t] = _mm256_add_epi16(high[t], _mm256_maddubs_epi16(hi, a_hi));
            }
        }
        for t in 0..NT {
            low[t] = _mm256_madd_epi16(low[t], ones16);
            high[t] = _mm256_madd_epi16(high[t], ones16);
        }
        (low, high)
    };
    q4_k_chunk_body!(group, acts, cols, NT, sums)
}

/// AVX-512 VNNI: `vpdpbusd` per sub-block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_k_chunk_vnni<const NT: usize>(
    group: *const u8,
    acts: [Act; NT],
    cols: usize,
) -> [__m256; NT] {
    let nibble = _mm256_set1_epi8(0x0F);
    let sums = |quants: *const u8, b: usize| {
        let mut low = [_mm256_setzero_si256(); NT];
        let mut high = [_mm256_setzero_si256(); NT];
        for p in 0..8 {
            let v = load256(quants.add(32 * p));
            let lo = _mm256_and_si256(v, nibble);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
            for t in 0..NT {
                let a_lo = broadcast4(acts[t].row.add(act_quants(b) + 4 * p));
                let a_hi = broadcast4(acts[t].row.add(act_quants(b + 1) + 4 * p));
                low[t] = _mm256_dpbusd_epi32(low[t], lo, a_lo);
                high[t] = _mm256_dpbusd_epi32(high[t], hi, a_hi);
            }
        }
        (low, high)
    };
    q4_k_chunk_body!(group, acts, cols, NT, sums)
}

// ----------------------------------------------------------------------------------------------
// Q6_K: 256-value super-blocks, 6-bit quants (4 low bits in `ql`, 2 high in `qh`) minus 32,
// one signed 8-bit scale per 16 values, against Q8_0 activations (see `scalar::dot_q6_k`)
// ----------------------------------------------------------------------------------------------

const Q6_K_BLOCK: usize = GROUP_ROWS * 210;
/// Piece offsets in a Q6_K group super-block (after the 16-byte run of `d`): `ql`'s 32 pieces,
/// `qh`'s 16, the scales' 4.
const Q6_K_PIECES: usize = 16;
const Q6_K_QH_PIECE: usize = 32;
const Q6_K_SCALES_PIECE: usize = 48;

/// Sub-block `s`'s quants minus 32, as signed bytes: values `32s..32s + 32` are, in ggml's
/// order, the low or high nibbles (`m / 2`) of the first or second 32 `ql` bytes (`m % 2`) of
/// half `s / 4`, with bits `2m..2m + 2` of that half's `qh` bytes on top (`m = s % 4`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_piece(block: *const u8, s: usize, p: usize) -> __m256i {
    let (n, m) = (s / 4, s % 4);
    let piece = |i: usize| load256(block.add(Q6_K_PIECES + 32 * i));
    let ql = piece(16 * n + 8 * (m % 2) + p);
    let qh = piece(Q6_K_QH_PIECE + 8 * n + p);
    let low = _mm256_and_si256(
        _mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * (m / 2) as i32)),
        _mm256_set1_epi8(0x0F),
    );
    // Bits 2m and 2m + 1 of each qh byte moved to bits 4 and 5.
    let high = if m < 2 {
        _mm256_sll_epi16(qh, _mm_cvtsi32_si128((4 - 2 * m) as i32))
    } else {
        _mm256_srl_epi16(qh, _mm_cvtsi32_si128((2 * m - 4) as i32))
    };
    let q = _mm256_or_si256(low, _mm256_and_si256(high, _mm256_set1_epi8(0x30)));
    _mm256_sub_epi8(q, _mm256_set1_epi8(32))
}

/// Sub-block `s`'s two scales (values `32s..32s + 16` and `32s + 16..`) of each row, as i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_scales(block: *const u8, s: usize) -> (__m256i, __m256i) {
    let v = load256(block.add(Q6_K_PIECES + 32 * (Q6_K_SCALES_PIECE + s / 2)));
    let byte = |b: usize| {
        let top = _mm256_sllv_epi32(v, _mm256_set1_epi32(24 - 8 * b as i32));
        _mm256_srai_epi32::<24>(top)
    };
    let b = 2 * s % 4;
    (byte(b), byte(b + 1))
}

/// `sc0 · sums[0] + sc1 · sums[1]`: the exact integer sum of the sub-block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_isum(scales: (__m256i, __m256i), halves: [__m256i; 2]) -> __m256i {
    _mm256_add_epi32(
        _mm256_mullo_epi32(scales.0, halves[0]),
        _mm256_mullo_epi32(scales.1, halves[1]),
    )
}

/// AVX2: signed quants as |q| against a·sign(q); a half's four pair sums (each at most
/// 2 · 32 · 127 = 8128) added in i16 (at most 32512: exact), then widened.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_chunk<const NT: usize>(
    group: *const u8,
    acts: [Act; NT],
    cols: usize,
) -> [__m256; NT] {
    let ones16 = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK_K {
        let block = group.add(k * Q6_K_BLOCK);
        let d = scales(block);
        for s in 0..8 {
            for line in 0..4 {
                let ahead = block.add(PREFETCH_AHEAD + 210 * s + 64 * line);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            }
            let b = 8 * k + s;
            let mut halves = [[_mm256_setzero_si256(); 2]; NT];
            for p in 0..8 {
                let w = q6_k_piece(block, s, p);
                let w_abs = _mm256_sign_epi8(w, w);
                for t in 0..NT {
                    let a = broadcast4(acts[t].row.add(act_quants(b) + 4 * p));
                    let pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(a, w));
                    halves[t][p / 4] = _mm256_add_epi16(halves[t][p / 4], pairs);
                }
            }
            let sc = q6_k_scales(block, s);
            for t in 0..NT {
                let wide = halves[t].map(|h| _mm256_madd_epi16(h, ones16));
                acc[t] = scaled_add(acc[t], d, acts[t].scale(b), q6_k_isum(sc, wide));
            }
        }
    }
    acc
}

/// AVX-512 VNNI: the same products with `vpdpbusd`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6_k_chunk_vnni<const NT: usize>(
    group: *const u8,
    acts: [Act; NT],
    cols: usize,
) -> [__m256; NT] {
    let mut acc = [_mm256_setzero_ps(); NT];
    for k in 0..cols / QK_K {
        let block = group.add(k * Q6_K_BLOCK);
        let d = scales(block);
        for s in 0..8 {
            for line in 0..4 {
                let ahead = block.add(PREFETCH_AHEAD + 210 * s + 64 * line);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            }
            let b = 8 * k + s;
            let mut halves = [[_mm256_setzero_si256(); 2]; NT];
            for p in 0..8 {
                let w = q6_k_piece(block, s, p);
                let w_abs = _mm256_sign_epi8(w, w);
                for t in 0..NT {
                    let a = broadcast4(acts[t].row.add(act_quants(b) + 4 * p));
                    let h = &mut halves[t][p / 4];
                    *h = _mm256_dpbusd_epi32(*h, w_abs, _mm256_sign_epi8(a, w));
                }
            }
            let sc = q6_k_scales(block, s);
            for t in 0..NT {
                acc[t] = scaled_add(acc[t], d, acts[t].scale(b), q6_k_isum(sc, halves[t]));
            }
        }
    }
    acc
}

// ----------------------------------------------------------------------------------------------
// Entry points per build
// ----------------------------------------------------------------------------------------------

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q4_0(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
    for_each_interleaved_group!(q4_0_chunk, range, a, cols, out)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q5_0(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
    for_each_interleaved_group!(q5_0_chunk, range, a, cols, out)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q8_0(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
    for_each_interleaved_group!(q8_0_chunk, range, a, cols, out)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q4_k(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
    for_each_interleaved_group!(q4_k_chunk, range, a, cols, out)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q6_k(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
    for_each_interleaved_group!(q6_k_chunk, range, a, cols, out)
}

/// The same kernels compiled with AVX-512 (F, BW, VL) and with VNNI (see `avx2_rows::Build`).
macro_rules! build_of_interleaved_kernels {
    ($module:ident, $features:literal, $q4_0:ident, $q5_0:ident, $q8_0:ident, $q4_k:ident, $q6_k:ident) => {
        mod $module {
            use super::*;

            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows_q4_0(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
                for_each_interleaved_group!($q4_0, range, a, cols, out)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows_q4_k(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
                for_each_interleaved_group!($q4_k, range, a, cols, out)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows_q6_k(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
                for_each_interleaved_group!($q6_k, range, a, cols, out)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows_q5_0(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
                for_each_interleaved_group!($q5_0, range, a, cols, out)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows_q8_0(range: &RowRange, a: &ActRows, cols: usize, out: Out) {
                for_each_interleaved_group!($q8_0, range, a, cols, out)
            }
        }
    };
}

build_of_interleaved_kernels!(
    wide,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl",
    q4_0_chunk,
    q5_0_chunk,
    q8_0_chunk,
    q4_k_chunk,
    q6_k_chunk
);
build_of_interleaved_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    q4_0_chunk_vnni,
    q5_0_chunk_vnni,
    q8_0_chunk_vnni,
    q4_k_chunk_vnni,
    q6_k_chunk_vnni
);
