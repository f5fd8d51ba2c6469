//! AVX-512 activation quantization to Q8_0 (plus the per-block info the matmul kernels read) and
//! Q8_K: the same bytes as the scalar reference in `scalar.rs` and as `avx2_quantize.rs`, whose
//! module doc explains how the scalar rounding is reproduced. Every value goes through the same
//! float operations as there (one multiply, never fused; the same add for the rounding), only
//! on 16 lanes.
//!
//! Q8_0 runs in groups of 16 blocks, a 32-value block being two registers: the 16 block maxima
//! are folded into one register by a transposing reduction ([`fold_lanes`]), so one division
//! gives all 16 scales; the 16 quant sums come out of the same reduction, and two permutes
//! interleave them with the scales into the info. Q8_K packs its quants into 64-byte registers
//! and sums them with `vpsadbw`; its signed maximum comes from a max and a min pass, so the
//! search for the first value of largest magnitude only runs when both signs reach it.

use std::arch::x86_64::*;

use gemma_formats::GgmlType;

use super::layout::{offs, QK, QK_K};
use super::Q8_0_INFO_BYTES;

const Q8_0_BLOCK_BYTES: usize = 34;
const Q8_K_BLOCK_BYTES: usize = 292;

/// Q8_0 blocks per group: one register of block maxima, scales and sums.
const GROUP: usize = 16;

/// Quantizes `x` (whole blocks of `act_type`) into `blocks` and, for Q8_0, writes each block's
/// [`super::QuantizedActs::q8_0_info`] into `info`. False when `act_type` has no AVX-512 path
/// here (the caller then uses the scalar one). Sizes must already match.
///
/// # Safety
/// Needs AVX-512 F + BW + VL and AVX2 + FMA + F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn quantize_blocks(
    act_type: GgmlType,
    x: &[f32],
    blocks: &mut [u8],
    info: &mut [u8],
) -> bool {
    debug_assert_eq!(act_type.bytes_for(x.len()), Some(blocks.len()));
    match act_type {
        GgmlType::Q8_0 => {
            debug_assert_eq!(info.len(), x.len() / QK * Q8_0_INFO_BYTES);
            let (x_groups, x_tail) = x.as_chunks::<{ QK * GROUP }>();
            let (b_groups, b_tail) = blocks.as_chunks_mut::<{ Q8_0_BLOCK_BYTES * GROUP }>();
            let (info_groups, info_tail) = info.as_chunks_mut::<{ Q8_0_INFO_BYTES * GROUP }>();
            for ((x, b), info) in x_groups.iter().zip(b_groups).zip(info_groups) {
                q8_0_group::<true>(x, b, info);
            }
            if !x_tail.is_empty() {
                q8_0_group::<false>(x_tail, b_tail, info_tail);
            }
        }
        GgmlType::Q8_K => {
            for (x, b) in x
                .chunks_exact(QK_K)
                .zip(blocks.chunks_exact_mut(Q8_K_BLOCK_BYTES))
            {
                q8_k_block(x, b);
            }
        }
        _ => return false,
    }
    true
}

/// Up to [`GROUP`] Q8_0 blocks (`WHOLE`: exactly that many): scales, quants, and the info
/// (scale as f32, sum of the quants). The `WHOLE` build knows its trip counts, so that the
/// group stays in registers.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn q8_0_group<const WHOLE: bool>(x: &[f32], b: &mut [u8], info: &mut [u8]) {
    let n = if WHOLE { GROUP } else { x.len() / QK };
    debug_assert_eq!(n * QK, x.len());
    let zero = _mm512_setzero_ps();
    // Per block, the lane-wise max of |x| over its two registers; maxps keeps its second
    // operand where the first is NaN, so NaNs never win (as in the scalar `f32::max` fold).
    // Missing blocks of a short group stay 0.
    let maxima: [__m512i; GROUP] = std::array::from_fn(|k| {
        if k >= n {
            return _mm512_setzero_si512();
        }
        let (lo, hi) = load_block(&x[QK * k..]);
        let acc = _mm512_max_ps(_mm512_abs_ps(lo), zero);
        _mm512_castps_si512(_mm512_max_ps(_mm512_abs_ps(hi), acc))
    });
    let amax = fold_lanes(maxima, |a, b| {
        _mm512_castps_si512(_mm512_max_ps(
            _mm512_castsi512_ps(a),
            _mm512_castsi512_ps(b),
        ))
    });
    // d = amax / 127 and id = inverse(d) per block, as the scalar code (missing blocks: 0).
    let d = _mm512_div_ps(_mm512_castsi512_ps(amax), _mm512_set1_ps(127.0));
    let nonzero = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(d, zero);
    let id = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.0), d);
    let d_half = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(d);
    let d_back = _mm512_cvtph_ps(d_half);
    let mut ids = [0.0f32; GROUP];
    let mut d_bits = [0u16; GROUP];
    _mm512_storeu_ps(ids.as_mut_ptr(), id);
    _mm256_storeu_si256(d_bits.as_mut_ptr().cast(), d_half);

    let sums: [__m512i; GROUP] = std::array::from_fn(|k| {
        if k >= n {
            return _mm512_setzero_si512();
        }
        let id = _mm512_set1_ps(ids[k]);
        let (lo, hi) = load_block(&x[QK * k..]);
        let lo = round_as_i8(_mm512_mul_ps(lo, id));
        let hi = round_as_i8(_mm512_mul_ps(hi, id));
        let b = &mut b[Q8_0_BLOCK_BYTES * k..][..Q8_0_BLOCK_BYTES];
        b[..2].copy_from_slice(&d_bits[k].to_le_bytes());
        let qs = &mut b[offs::Q8_0_QS..];
        // The lanes are in the i8 range already: vpmovdb's truncation keeps them whole.
        _mm_storeu_si128(qs[..16].as_mut_ptr().cast(), _mm512_cvtepi32_epi8(lo));
        _mm_storeu_si128(qs[16..].as_mut_ptr().cast(), _mm512_cvtepi32_epi8(hi));
        _mm512_add_epi32(lo, hi)
    });
    let sums = fold_lanes(sums, |a, b| _mm512_add_epi32(a, b));

    // Info of block k: bytes 8k..8k + 4 its scale (the stored f16 back as f32), 8k + 4..8k + 8
    // its sum: lanes 2k and 2k + 1 of (d_back, sums) interleaved.
    let d_back = _mm512_castps_si512(d_back);
    let pairs = |first: i32| {
        let idx = _mm512_setr_epi32(
            first,
            first + 16,
            first + 1,
            first + 17,
            first + 2,
            first + 18,
            first + 3,
            first + 19,
            first + 4,
            first + 20,
            first + 5,
            first + 21,
            first + 6,
            first + 22,
            first + 7,
            first + 23,
        );
        _mm512_permutex2var_epi32(d_back, idx, sums)
    };
    if WHOLE {
        _mm512_storeu_si512(info.as_mut_ptr().cast(), pairs(0));
        _mm512_storeu_si512(info[64..].as_mut_ptr().cast(), pairs(8));
    } else {
        let mut all = [0u8; GROUP * Q8_0_INFO_BYTES];
        _mm512_storeu_si512(all.as_mut_ptr().cast(), pairs(0));
        _mm512_storeu_si512(all[64..].as_mut_ptr().cast(), pairs(8));
        info.copy_from_slice(&all[..info.len()]);
    }
}

/// One Q8_K block: f32 scale, 256 quants, and the sums of each 16 quants.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn q8_k_block(x: &[f32], b: &mut [u8]) {
    let x = &x[..QK_K];
    let b = &mut b[..Q8_K_BLOCK_BYTES];
    let max = signed_absmax(x);
    if max == 0.0 {
        b.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    let scale = _mm512_set1_ps(iscale);
    // nearest_int, min(127) and the wrapping `as i8` on the float bits, as in avx2_quantize:
    // the low byte of min(mantissa bits, 2^22 + 127) is the quant.
    let magic = _mm512_set1_ps(12_582_912.0);
    let mantissa = _mm512_set1_epi32(0x007f_ffff);
    let limit = _mm512_set1_epi32(0x0040_0000 + 127);
    let byte = _mm512_set1_epi32(0xff);
    // Per 64 quants (four groups of the sums, one per 128-bit lane), the sums of each 8 as
    // unsigned bytes q + 128, one per 64-bit lane.
    let mut sums = [_mm512_setzero_si512(); 4];
    for ((xs, s), out) in x
        .chunks_exact(64)
        .zip(sums.iter_mut())
        .zip(b[offs::Q8_K_QS..offs::Q8_K_BSUMS].chunks_exact_mut(64))
    {
        let q: [__m512i; 4] = std::array::from_fn(|i| {
            let v = _mm512_loadu_ps(xs[16 * i..][..16].as_ptr());
            let shifted = _mm512_add_ps(_mm512_mul_ps(v, scale), magic);
            let bits = _mm512_and_si512(_mm512_castps_si512(shifted), mantissa);
            _mm512_and_si512(_mm512_min_epi32(bits, limit), byte)
        });
        let q = pack_bytes(q);
        _mm512_storeu_si512(out.as_mut_ptr().cast(), q);
        let biased = _mm512_xor_si512(q, _mm512_set1_epi8(-128));
        *s = _mm512_sad_epu8(biased, _mm512_setzero_si512());
    }
    // Both halves of each group added: group k + 4j in the 32-bit lane 4k + j ...
    let halves = |a, b| _mm512_add_epi64(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    let (low, high) = (halves(sums[0], sums[1]), halves(sums[2], sums[3]));
    let groups = _mm512_castps_si512(_mm512_shuffle_ps::<0b10_00_10_00>(
        _mm512_castsi512_ps(low),
        _mm512_castsi512_ps(high),
    ));
    // ... then in order, without the bias (16 * 128 per group); |sum| <= 16 * 128, so the i16
    // truncation of vpmovdw is exact.
    let groups = _mm512_permutexvar_epi32(transpose_4x4(), groups);
    let bsums = _mm512_cvtepi32_epi16(_mm512_sub_epi32(groups, _mm512_set1_epi32(16 * 128)));
    _mm256_storeu_si256(
        b[offs::Q8_K_BSUMS..offs::Q8_K_BSUMS + 32]
            .as_mut_ptr()
            .cast(),
        bsums,
    );
    b[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

/// The 64 low bytes of the 32-bit lanes of `q` (each below 256), in order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn pack_bytes(q: [__m512i; 4]) -> __m512i {
    let [a, b, c, d] = q;
    let packed = _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d));
    // The packs work per 128-bit lane: its 32-bit lane 4k + j holds the bytes of lanes
    // 4k..4k + 4 of a, b, c or d (j = 0, 1, 2, 3), which belong in 32-bit lane 4j + k.
    _mm512_permutexvar_epi32(transpose_4x4(), packed)
}

/// The permutation (an index vector for `vpermd`) swapping the 32-bit lanes 4i + j and 4j + i.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn transpose_4x4() -> __m512i {
    _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)
}

/// Lane k of the result is `op` folded over the 16 lanes of `v[k]`. `op` must give the same
/// result in any order (integer adds; max of floats without NaNs). Four rounds of pairing
/// vectors, each round `op` on two shuffles of a pair keeping half of each: 15 `op`s and 30
/// shuffles for 16 reductions, instead of about 8 dependent steps each.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn fold_lanes(v: [__m512i; 16], op: impl Fn(__m512i, __m512i) -> __m512i) -> __m512i {
    // The rounds leave input n's result in lane 4 * (n % 4) + n / 4 (a 4 x 4 transpose, its
    // own inverse): taking the inputs in that order puts each result in its own lane.
    let v: [__m512i; 16] = std::array::from_fn(|n| v[4 * (n % 4) + n / 4]);
    // Below, "input" counts in that new order.
    // 256-bit halves: half h of result i holds input 2i + h's partial results.
    let v: [__m512i; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        op(
            _mm512_shuffle_i32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_i32x4::<0b11_10_11_10>(a, b),
        )
    });
    // 128-bit lanes: lane j of result i holds input 4i + j's.
    let v: [__m512i; 4] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        op(
            _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b),
        )
    });
    // 64-bit pairs: in lane j of result i, input 8i + j's then 8i + 4 + j's.
    let v: [__m512i; 2] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        op(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
    });
    // Single lanes: lane j holds inputs j, 4 + j, 8 + j, 12 + j.
    let (a, b) = (_mm512_castsi512_ps(v[0]), _mm512_castsi512_ps(v[1]));
    op(
        _mm512_castps_si512(_mm512_shuffle_ps::<0b10_00_10_00>(a, b)),
        _mm512_castps_si512(_mm512_shuffle_ps::<0b11_01_11_01>(a, b)),
    )
}

/// The scalar `signed_absmax`: the first value of largest magnitude, with its sign (NaNs never
/// win; 0.0 when every value is zero or NaN).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn signed_absmax(x: &[f32]) -> f32 {
    // The largest and smallest value (and 0), in two accumulators each to keep the chains short.
    // maxps and minps keep the accumulator where the value is NaN (their second operand), so
    // the accumulators never hold NaNs.
    let mut hi = [_mm512_setzero_ps(); 2];
    let mut lo = [_mm512_setzero_ps(); 2];
    for xs in x.chunks_exact(32) {
        for ((h, l), v) in hi.iter_mut().zip(&mut lo).zip(xs.chunks_exact(16)) {
            let v = _mm512_loadu_ps(v.as_ptr());
            *h = _mm512_max_ps(v, *h);
            *l = _mm512_min_ps(v, *l);
        }
    }
    let hi = _mm512_reduce_max_ps(_mm512_max_ps(hi[0], hi[1]));
    let lo = _mm512_reduce_min_ps(_mm512_min_ps(lo[0], lo[1]));
    // Where only one sign reaches the largest magnitude, that extreme is the answer, without
    // a search for the first one.
    if hi > -lo {
        return hi;
    }
    if -lo > hi {
        return lo;
    }
    if hi == 0.0 {
        return 0.0;
    }
    let target = _mm512_set1_ps(hi);
    for (i, xs) in x.chunks_exact(16).enumerate() {
        let abs = _mm512_abs_ps(_mm512_loadu_ps(xs.as_ptr()));
        let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(abs, target);
        if hit != 0 {
            return x[16 * i + hit.trailing_zeros() as usize];
        }
    }
    unreachable!("the maximum magnitude occurs in the block")
}

/// The two registers of a 32-value block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn load_block(xs: &[f32]) -> (__m512, __m512) {
    let xs = &xs[..QK];
    (
        _mm512_loadu_ps(xs.as_ptr()),
        _mm512_loadu_ps(xs[16..].as_ptr()),
    )
}

/// `f32::round(x) as i8` per lane, as i32: half away from zero, saturating, NaN -> 0.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn round_as_i8(x: __m512) -> __m512i {
    // trunc(x + copysign(0.5 - 2^-25, x)): the add of avx2_quantize::round_as_i8, which says
    // why that truncates to exactly round-half-away (the bit operations run as integers here:
    // AVX-512 F has no float and/or).
    let sign = _mm512_set1_epi32(i32::MIN);
    let below_half = _mm512_set1_epi32(0x3eff_ffff);
    let offset = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(x), sign), below_half);
    let r = _mm512_add_ps(x, _mm512_castsi512_ps(offset));
    // Clamping to [-128, 127] before truncating commutes with it (integer bounds) and makes the
    // i32 lanes the quants themselves, which the Q8_0 sums add. minps and maxps return their
    // second operand, r, where it is NaN; the conversion's mask then gives 0 there (cvttps2dq
    // alone would give i32::MIN). x is NaN exactly where r is.
    let r = _mm512_max_ps(
        _mm512_set1_ps(-128.0),
        _mm512_min_ps(_mm512_set1_ps(127.0), r),
    );
    _mm512_maskz_cvttps_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(x, x), r)
}

#[cfg(test)]
mod tests {
    use super::super::avx2_quantize::tests::rounding_cases;
    use super::super::Isa;
    use super::*;

    fn avx512() -> bool {
        let ok = Isa::Avx512.is_available();
        if !ok {
            eprintln!("AVX-512 F + BW + VL not available: nothing to check");
        }
        ok
    }

    /// `round_as_i8` lane by lane against `f32::round() as i8` (no clamp afterwards: its lanes
    /// are the quants).
    #[test]
    fn rounding_matches_f32_round_as_i8() {
        if !avx512() {
            return;
        }
        let mut lanes = [0.0f32; 16];
        let mut filled = 0;
        let check = |lanes: &[f32; 16]| {
            let mut got = [0i32; 16];
            // SAFETY: AVX-512 checked above; both arrays hold 16 lanes.
            unsafe {
                let r = round_as_i8(_mm512_loadu_ps(lanes.as_ptr()));
                _mm512_storeu_si512(got.as_mut_ptr().cast(), r);
            }
            for (&x, &q) in lanes.iter().zip(&got) {
                assert_eq!(q, x.round() as i8 as i32, "x = {x:e} ({:#x})", x.to_bits());
            }
        };
        for x in rounding_cases() {
            lanes[filled] = x;
            filled += 1;
            if filled == 16 {
                check(&lanes);
                filled = 0;
            }
        }
        check(&lanes);
    }

    /// Each lane of `fold_lanes` is its own input's reduction, for sums and for maxima.
    #[test]
    fn fold_lanes_keeps_every_result_in_its_lane() {
        if !avx512() {
            return;
        }
        let inputs: [[i32; 16]; 16] =
            std::array::from_fn(|k| std::array::from_fn(|j| (k * 1000 + j * j * 7 + k * j) as i32));
        let mut sums = [0i32; 16];
        let mut maxima = [0i32; 16];
        // SAFETY: AVX-512 checked above; the arrays hold 16 lanes each.
        unsafe {
            let v = inputs.map(|lanes| _mm512_loadu_si512(lanes.as_ptr().cast()));
            let s = fold_lanes(v, |a, b| _mm512_add_epi32(a, b));
            let m = fold_lanes(v, |a, b| _mm512_max_epi32(a, b));
            _mm512_storeu_si512(sums.as_mut_ptr().cast(), s);
            _mm512_storeu_si512(maxima.as_mut_ptr().cast(), m);
        }
        for (k, lanes) in inputs.iter().enumerate() {
            assert_eq!(sums[k], lanes.iter().sum::<i32>(), "sum of input {k}");
            assert_eq!(maxima[k], *lanes.iter().max().unwrap(), "max of input {k}");
        }
    }
}
