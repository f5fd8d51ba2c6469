//! AVX2 activation quantization to Q8_0 (plus the per-block info the matmul kernels read) and
//! Q8_K, bit-identical to the scalar reference in `scalar.rs`.
//!
//! The block scales are computed with the same scalar expressions; each value gets the same
//! single f32 multiply (never fused), then the scalar rounding is reproduced exactly: Q8_0 rounds
//! half away from zero and converts saturating (`f32::round() as i8`, NaN -> 0), Q8_K uses
//! ggml's `nearest_int` bit trick, `min(127)` and a wrapping `as i8`, on the same float bits.

use std::arch::x86_64::*;

use gemma_formats::GgmlType;

use super::layout::{offs, QK, QK_K};
use super::Q8_0_INFO_BYTES;

const Q8_0_BLOCK_BYTES: usize = 34;
const Q8_K_BLOCK_BYTES: usize = 292;

/// Quantizes `x` (whole blocks of `act_type`) into `blocks` and, for Q8_0, writes each block's
/// [`super::QuantizedActs::q8_0_info`] into `info`. False when `act_type` has no AVX2 path here
/// (the caller then uses the scalar one). Sizes must already match.
///
/// # Safety
/// Needs AVX2 + FMA + F16C.
#[target_feature(enable = "avx2,fma,f16c")]
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
            let groups = x
                .chunks(QK * GROUP)
                .zip(blocks.chunks_mut(Q8_0_BLOCK_BYTES * GROUP))
                .zip(info.chunks_mut(Q8_0_INFO_BYTES * GROUP));
            for ((x, b), info) in groups {
                q8_0_group(x, b, info);
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

/// Q8_0 blocks per group: the scale divisions of a group's blocks run as one vector division,
/// instead of a serial max -> divide -> divide chain per block.
const GROUP: usize = 8;

/// Up to [`GROUP`] Q8_0 blocks: scales, quants, and the info (scale as f32, sum of the quants).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_group(x: &[f32], b: &mut [u8], info: &mut [u8]) {
    let mut amax = [0.0f32; GROUP];
    for (a, xs) in amax.iter_mut().zip(x.chunks_exact(QK)) {
        let mut acc = _mm256_setzero_ps();
        for v in xs.chunks_exact(8) {
            acc = max_ignoring_nan(abs(_mm256_loadu_ps(v.as_ptr())), acc);
        }
        *a = hmax(acc);
    }
    // d = amax / 127 and id = inverse(d) per block, as the scalar code (unused lanes stay 0).
    let zero = _mm256_setzero_ps();
    let d = _mm256_div_ps(_mm256_loadu_ps(amax.as_ptr()), _mm256_set1_ps(127.0));
    let nonzero = _mm256_cmp_ps::<_CMP_NEQ_UQ>(d, zero);
    let id = _mm256_and_ps(nonzero, _mm256_div_ps(_mm256_set1_ps(1.0), d));
    let d_half = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(d);
    let mut ids = [0.0f32; GROUP];
    let mut d_bits = [0u16; GROUP];
    let mut d_back = [0.0f32; GROUP];
    _mm256_storeu_ps(ids.as_mut_ptr(), id);
    _mm_storeu_si128(d_bits.as_mut_ptr().cast(), d_half);
    _mm256_storeu_ps(d_back.as_mut_ptr(), _mm256_cvtph_ps(d_half));

    let blocks = x
        .chunks_exact(QK)
        .zip(b.chunks_exact_mut(Q8_0_BLOCK_BYTES))
        .zip(info.chunks_exact_mut(Q8_0_INFO_BYTES));
    for (k, ((xs, b), info)) in blocks.enumerate() {
        let id = _mm256_set1_ps(ids[k]);
        let mut q = [_mm256_setzero_si256(); 4];
        for (qi, v) in q.iter_mut().zip(xs.chunks_exact(8)) {
            *qi = round_as_i8(_mm256_mul_ps(_mm256_loadu_ps(v.as_ptr()), id));
        }
        let packed = pack_i32_to_i8(q, false);
        _mm256_storeu_si256(b[offs::Q8_0_QS..].as_mut_ptr().cast(), packed);
        b[..2].copy_from_slice(&d_bits[k].to_le_bytes());
        let sum = sum_i8(packed);
        info[..4].copy_from_slice(&d_back[k].to_le_bytes());
        info[4..].copy_from_slice(&sum.to_le_bytes());
    }
}

/// One Q8_K block: f32 scale, 256 quants, and the sums of each 16 quants.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_k_block(x: &[f32], b: &mut [u8]) {
    let x = &x[..QK_K];
    let b = &mut b[..Q8_K_BLOCK_BYTES];
    let max = signed_absmax(x);
    if max == 0.0 {
        b.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    let scale = _mm256_set1_ps(iscale);
    // nearest_int: adding 1.5 * 2^23 leaves 2^22 + the rounded value in the low mantissa bits.
    // min(127) is then a min of those bits with 2^22 + 127, and the wrapping `as i8` keeps the
    // low byte, which subtracting 2^22 does not change.
    let magic = _mm256_set1_ps(12_582_912.0);
    let mantissa = _mm256_set1_epi32(0x007f_ffff);
    let limit = _mm256_set1_epi32(0x0040_0000 + 127);
    let mut packed = [_mm256_setzero_si256(); QK_K / 32];
    for ((xs, p), out) in x
        .chunks_exact(32)
        .zip(packed.iter_mut())
        .zip(b[offs::Q8_K_QS..offs::Q8_K_BSUMS].chunks_exact_mut(32))
    {
        let mut q = [_mm256_setzero_si256(); 4];
        for (qi, v) in q.iter_mut().zip(xs.chunks_exact(8)) {
            let shifted = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(v.as_ptr()), scale), magic);
            let bits = _mm256_and_si256(_mm256_castps_si256(shifted), mantissa);
            *qi = _mm256_min_epi32(bits, limit);
        }
        *p = pack_i32_to_i8(q, true);
        _mm256_storeu_si256(out.as_mut_ptr().cast(), *p);
    }
    let bsums = group_sums(&packed);
    _mm256_storeu_si256(
        b[offs::Q8_K_BSUMS..offs::Q8_K_BSUMS + 32]
            .as_mut_ptr()
            .cast(),
        bsums,
    );
    b[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

/// The 16 sums (as i16, in order) of each 16 consecutive signed bytes of `q`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_sums(q: &[__m256i; QK_K / 32]) -> __m256i {
    let ones_u8 = _mm256_set1_epi8(1);
    let ones_i16 = _mm256_set1_epi16(1);
    // Per vector, four i32 sums of 4 bytes: lane 0 for its first group, lane 1 for its second.
    let mut quads = [_mm256_setzero_si256(); QK_K / 32];
    for (quad, &v) in quads.iter_mut().zip(q) {
        *quad = _mm256_madd_epi16(_mm256_maddubs_epi16(ones_u8, v), ones_i16);
    }
    // Two rounds of pairwise adds: lane 0 gets groups 0, 2, 4, 6 (of 8), lane 1 groups 1, 3, 5, 7.
    let [a, b, c, d, e, f, g, h] = quads;
    let first = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    let second = _mm256_hadd_epi32(_mm256_hadd_epi32(e, f), _mm256_hadd_epi32(g, h));
    let sums = _mm256_packs_epi32(first, second);
    let even = _mm256_castsi256_si128(sums);
    let odd = _mm256_extracti128_si256::<1>(sums);
    _mm256_setr_m128i(_mm_unpacklo_epi16(even, odd), _mm_unpackhi_epi16(even, odd))
}

/// The scalar `signed_absmax`: the first value of largest magnitude, with its sign (NaNs never
/// win; 0.0 when every value is zero or NaN).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn signed_absmax(x: &[f32]) -> f32 {
    // Four accumulators keep the max chain short.
    let mut acc = [_mm256_setzero_ps(); 4];
    for xs in x.chunks_exact(32) {
        for (a, v) in acc.iter_mut().zip(xs.chunks_exact(8)) {
            *a = max_ignoring_nan(abs(_mm256_loadu_ps(v.as_ptr())), *a);
        }
    }
    let amax = hmax(_mm256_max_ps(
        _mm256_max_ps(acc[0], acc[1]),
        _mm256_max_ps(acc[2], acc[3]),
    ));
    if amax == 0.0 {
        return 0.0;
    }
    let target = _mm256_set1_ps(amax);
    for (i, xs) in x.chunks_exact(8).enumerate() {
        let hit = _mm256_cmp_ps::<_CMP_EQ_OQ>(abs(_mm256_loadu_ps(xs.as_ptr())), target);
        let mask = _mm256_movemask_ps(hit);
        if mask != 0 {
            return x[8 * i + mask.trailing_zeros() as usize];
        }
    }
    unreachable!("the maximum magnitude occurs in the block")
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn abs(v: __m256) -> __m256 {
    _mm256_andnot_ps(_mm256_set1_ps(-0.0), v)
}

/// `max(v, acc)` per lane, keeping `acc` where `v` is NaN (as `f32::max` does); `acc` must not
/// hold NaNs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn max_ignoring_nan(v: __m256, acc: __m256) -> __m256 {
    // maxps returns its second operand when either is NaN.
    _mm256_max_ps(v, acc)
}

/// Largest lane of `v` (no NaN lanes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

/// Sum of the 32 signed bytes of `q`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sum_i8(q: __m256i) -> i32 {
    // Sums of 8 bytes as unsigned (q + 128) per 64-bit lane, then of the four lanes.
    let sums = _mm256_sad_epu8(
        _mm256_xor_si256(q, _mm256_set1_epi8(-128)),
        _mm256_setzero_si256(),
    );
    let s = _mm_add_epi64(
        _mm256_castsi256_si128(sums),
        _mm256_extracti128_si256::<1>(sums),
    );
    let s = _mm_add_epi64(s, _mm_unpackhi_epi64(s, s));
    _mm_cvtsi128_si32(s) - 32 * 128
}

/// `f32::round(x) as i8` per lane, as i32: half away from zero, saturating, NaN -> 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round_as_i8(x: __m256) -> __m256i {
    // trunc(x + copysign(0.5 - 2^-25, x)) is exactly round-half-away for every float: below
    // one half the sum stays under the next integer, from one half on it reaches it (the sum's
    // rounding error never crosses an integer), and large x are integers already.
    let below_half = _mm256_set1_ps(f32::from_bits(0x3eff_ffff));
    let offset = _mm256_or_ps(_mm256_and_ps(x, _mm256_set1_ps(-0.0)), below_half);
    let r = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm256_add_ps(x, offset));
    // NaN -> 0 and anything above 127 -> 127; below i32 range cvtps2dq gives i32::MIN, which
    // saturates to -128 like the rest of the negatives when packed.
    let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
    _mm256_cvtps_epi32(_mm256_min_ps(r, _mm256_set1_ps(127.0)))
}

/// Packs 32 i32 lanes (in order) into 32 bytes: saturating to i8,
/// or (with `low_bytes`) keeping each value's low byte, as a wrapping `as i8` does.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_i32_to_i8(q: [__m256i; 4], low_bytes: bool) -> __m256i {
    let packed = if low_bytes {
        let byte = _mm256_set1_epi32(0xff);
        let [a, b, c, d] = q;
        let [a, b, c, d] = [
            _mm256_and_si256(a, byte),
            _mm256_and_si256(b, byte),
            _mm256_and_si256(c, byte),
            _mm256_and_si256(d, byte),
        ];
        _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d))
    } else {
        let [a, b, c, d] = q;
        _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d))
    };
    // The packs work per 128-bit lane; put the 4-byte groups back in value order.
    _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// The tests of both SIMD quantizers: each compares the scalar path with every SIMD level this
/// CPU has ([`simd_levels`]) through `quantize_acts_with`.
#[cfg(test)]
pub(super) mod tests {
    use std::time::Instant;

    use super::super::{quantize_acts_with, Isa};
    use super::*;

    /// xorshift64*: deterministic inputs without a dev-dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// The SIMD levels with quantizers of their own that this CPU runs (AVX2, AVX-512; VNNI
    /// uses AVX-512's). Empty, with a note, when there is nothing to compare.
    fn simd_levels() -> Vec<Isa> {
        let levels: Vec<Isa> = [Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect();
        if levels.is_empty() {
            eprintln!("AVX2 + FMA + F16C not available: nothing to compare");
        }
        levels
    }

    fn any_simd() -> bool {
        !simd_levels().is_empty()
    }

    /// Quantizes `x` as `n_tokens` rows with the scalar path and each of [`simd_levels`]; panics
    /// with the first differing byte (block bytes and Q8_0 info are compared as one buffer).
    fn assert_same(act_type: GgmlType, x: &[f32], n_tokens: usize, what: &str) {
        let cols = x.len() / n_tokens;
        let mut scalar = Vec::new();
        let mut simd = Vec::new();
        let a = quantize_acts_with(Isa::Scalar, act_type, x, cols, n_tokens, &mut scalar);
        let (a_rows, a_info) = (a.rows.to_vec(), a.q8_0_info.to_vec());
        for isa in simd_levels() {
            let b = quantize_acts_with(isa, act_type, x, cols, n_tokens, &mut simd);
            assert_eq!(b.rows.len(), a_rows.len());
            assert_eq!(b.q8_0_info.len(), a_info.len());
            let block_bytes = act_type.type_size();
            if let Some(i) = (0..a_rows.len()).find(|&i| a_rows[i] != b.rows[i]) {
                let block = i / block_bytes;
                let values = &x[block * act_type.block_size()..][..act_type.block_size()];
                panic!(
                    "{act_type} {what}: block byte {i} (block {block}, offset {}) scalar {} \
                     {isa:?} {}; block values {values:?}",
                    i % block_bytes,
                    a_rows[i],
                    b.rows[i]
                );
            }
            if let Some(i) = (0..a_info.len()).find(|&i| a_info[i] != b.q8_0_info[i]) {
                panic!(
                    "{act_type} {what}: info byte {i} scalar {} {isa:?} {}",
                    a_info[i], b.q8_0_info[i]
                );
            }
        }
    }

    fn block_size(act_type: GgmlType) -> usize {
        act_type.block_size()
    }

    /// Values of every kind the scalar code treats specially.
    fn special(rng: &mut Rng) -> f32 {
        const SPECIAL: [f32; 14] = [
            0.0,
            -0.0,
            1e-45,
            -1e-45,
            1e-40,
            -3e-39,
            1e30,
            -1e30,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            0.5,
            -0.5,
            127.0,
        ];
        SPECIAL[rng.below(SPECIAL.len())]
    }

    fn non_finite(rng: &mut Rng) -> f32 {
        const BITS: [u32; 6] = [
            0x7fc0_0000, // quiet NaN
            0xffc0_0000, // negative quiet NaN (x86's default NaN)
            0x7fc0_1234, // quiet NaN with payload
            0x7f80_0001, // signalling NaN
            0x7f80_0000, // +inf
            0xff80_0000, // -inf
        ];
        f32::from_bits(BITS[rng.below(BITS.len())])
    }

    /// Every float of the ranges that matter most to the rounding (|x| in [0.25, 256), where
    /// all the ties are) and a stride through all others.
    pub(in super::super) fn rounding_cases() -> impl Iterator<Item = f32> {
        let dense = (0x3e80_0000u32..0x4380_0000).flat_map(|b| [b, b | 0x8000_0000]);
        let sparse = (0..=u32::MAX).step_by(251);
        dense.chain(sparse).map(f32::from_bits)
    }

    /// `round_as_i8` lane by lane against `f32::round() as i8` on the [`rounding_cases`].
    #[test]
    fn rounding_matches_f32_round_as_i8() {
        if !Isa::Avx2.is_available() {
            return;
        }
        let mut lanes = [0.0f32; 8];
        let mut filled = 0;
        let check = |lanes: &[f32; 8]| {
            let mut got = [0i32; 8];
            // SAFETY: AVX2 checked above; both arrays hold 8 lanes.
            unsafe {
                let r = round_as_i8(_mm256_loadu_ps(lanes.as_ptr()));
                _mm256_storeu_si256(got.as_mut_ptr().cast(), r);
            }
            for (&x, &q) in lanes.iter().zip(&got) {
                // The packing saturates to i8 afterwards, so compare after the same clamp.
                let simd = q.clamp(-128, 127);
                assert_eq!(
                    simd,
                    x.round() as i8 as i32,
                    "x = {x:e} ({:#x})",
                    x.to_bits()
                );
            }
        };
        for x in rounding_cases() {
            lanes[filled] = x;
            filled += 1;
            if filled == 8 {
                check(&lanes);
                filled = 0;
            }
        }
        check(&lanes);
    }

    #[test]
    fn random_values_of_many_magnitudes() {
        if !any_simd() {
            return;
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for act_type in [GgmlType::Q8_0, GgmlType::Q8_K] {
            for exp in (-149..=127).step_by(3) {
                let scale = 2f32.powi(exp);
                for &cols in &[256, 512, 2048] {
                    let n_tokens = 1 + rng.below(3);
                    let x: Vec<f32> = (0..cols * n_tokens).map(|_| rng.unit() * scale).collect();
                    assert_same(act_type, &x, n_tokens, &format!("scale 2^{exp}"));
                }
            }
            for &scale in &[1e-30, 1e-6, 1e-3, 1.0, 3.7, 1e3, 1e20, 1e30, 3e38] {
                let x: Vec<f32> = (0..4096).map(|_| rng.unit() * scale).collect();
                assert_same(act_type, &x, 1, &format!("scale {scale}"));
            }
        }
    }

    #[test]
    fn every_row_length() {
        if !any_simd() {
            return;
        }
        let mut rng = Rng(7);
        for act_type in [GgmlType::Q8_0, GgmlType::Q8_K] {
            let bs = block_size(act_type);
            for blocks in 1..=4096 / bs {
                let cols = blocks * bs;
                for n_tokens in [1, 2] {
                    let x: Vec<f32> = (0..cols * n_tokens).map(|_| rng.unit() * 8.0).collect();
                    assert_same(act_type, &x, n_tokens, &format!("cols {cols}"));
                }
            }
        }
    }

    #[test]
    fn exact_half_ties_round_like_the_scalar_code() {
        if !any_simd() {
            return;
        }
        for act_type in [GgmlType::Q8_0, GgmlType::Q8_K] {
            let bs = block_size(act_type);
            // An extreme of +-127 * 2^e gives a scale of exactly 2^e (Q8_0: d; Q8_K: 1/iscale),
            // so k + 0.5 times 2^e lands exactly on a tie.
            for exp in [-20, -3, 0, 1, 5, 30] {
                let unit = 2f32.powi(exp);
                for extreme_sign in [1.0f32, -1.0] {
                    let mut x = Vec::with_capacity(2048);
                    let mut k = -127.5f32;
                    while x.len() < 2048 {
                        if x.len() % bs == 0 {
                            x.push(extreme_sign * 127.0 * unit);
                        } else {
                            x.push(k * unit);
                            k = if k >= 126.5 { -127.5 } else { k + 1.0 };
                        }
                    }
                    assert_same(act_type, &x, 1, &format!("ties, unit 2^{exp}"));
                }
            }
        }
    }

    #[test]
    fn zeros_single_values_and_equal_extremes() {
        if !any_simd() {
            return;
        }
        for act_type in [GgmlType::Q8_0, GgmlType::Q8_K] {
            let bs = block_size(act_type);
            assert_same(act_type, &vec![0.0; 4 * bs], 2, "zeros");
            assert_same(act_type, &vec![-0.0; 4 * bs], 1, "negative zeros");
            for pos in 0..bs {
                for v in [1.0f32, -2.5, 1e-42, -1e30] {
                    let mut x = vec![0.0; bs];
                    x[pos] = v;
                    assert_same(act_type, &x, 1, &format!("single {v} at {pos}"));
                }
            }
            // +-equal extremes: the first one keeps its sign in Q8_K.
            for first in [0, 3, bs / 2, bs - 2] {
                for second in [first + 1, bs - 1] {
                    for (a, b) in [(3.0f32, -3.0f32), (-3.0, 3.0), (-3.0, -3.0)] {
                        let mut x: Vec<f32> = (0..bs).map(|i| (i as f32 * 0.37).sin()).collect();
                        x[first] = a;
                        x[second] = b;
                        assert_same(
                            act_type,
                            &x,
                            1,
                            &format!("extremes {a}@{first} {b}@{second}"),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn special_and_mixed_values() {
        if !any_simd() {
            return;
        }
        let mut rng = Rng(0xdead_beef);
        for act_type in [GgmlType::Q8_0, GgmlType::Q8_K] {
            let bs = block_size(act_type);
            // Subnormals: tiny extremes make the scale underflow or its inverse overflow.
            for extreme_bits in [1u32, 2, 126, 127, 128, 200, 1000, 0x7f_ffff, 0x80_0000] {
                let extreme = f32::from_bits(extreme_bits);
                let x: Vec<f32> = (0..4 * bs)
                    .map(|i| match i % 5 {
                        0 => extreme,
                        1 => -extreme,
                        2 => f32::from_bits(rng.below(extreme_bits as usize + 1) as u32),
                        3 => -0.0,
                        _ => 0.0,
                    })
                    .collect();
                assert_same(
                    act_type,
                    &x,
                    2,
                    &format!("subnormal extreme {extreme_bits}"),
                );
            }
            for round in 0..400 {
                let x: Vec<f32> = (0..2 * bs)
                    .map(|_| match rng.below(10) {
                        0..=2 => special(&mut rng),
                        _ => rng.unit() * 2f32.powi(rng.below(40) as i32 - 20),
                    })
                    .collect();
                assert_same(act_type, &x, 1, &format!("mixed round {round}"));
            }
        }
    }

    #[test]
    fn nan_and_infinite_inputs_match_too() {
        if !any_simd() {
            return;
        }
        let mut rng = Rng(42);
        for act_type in [GgmlType::Q8_0, GgmlType::Q8_K] {
            let bs = block_size(act_type);
            for round in 0..300 {
                let x: Vec<f32> = (0..2 * bs)
                    .map(|_| match rng.below(12) {
                        0 => non_finite(&mut rng),
                        1 => special(&mut rng),
                        _ => rng.unit(),
                    })
                    .collect();
                assert_same(act_type, &x, 1, &format!("non-finite round {round}"));
            }
            for bits in [0x7fc0_0000u32, 0x7f80_0001, 0x7f80_0000, 0xff80_0000] {
                assert_same(
                    act_type,
                    &vec![f32::from_bits(bits); bs],
                    1,
                    "all non-finite",
                );
            }
        }
    }

    #[test]
    fn other_types_and_short_inputs_keep_the_scalar_path() {
        if !any_simd() {
            return;
        }
        let mut rng = Rng(3);
        let x: Vec<f32> = (0..512).map(|_| rng.unit()).collect();
        assert_same(GgmlType::Q8_1, &x, 2, "Q8_1 falls back");
        // Fewer values than n_tokens rows: only whole rows are quantized, the rest stays zero.
        let mut scalar = Vec::new();
        let mut simd = Vec::new();
        let a = quantize_acts_with(Isa::Scalar, GgmlType::Q8_0, &x[..320], 64, 6, &mut scalar);
        let a = (a.rows.to_vec(), a.q8_0_info.to_vec());
        for isa in simd_levels() {
            let b = quantize_acts_with(isa, GgmlType::Q8_0, &x[..320], 64, 6, &mut simd);
            assert_eq!(
                (a.0.as_slice(), a.1.as_slice()),
                (b.rows, b.q8_0_info),
                "{isa:?}"
            );
        }
    }

    /// Timing of one activation row, scalar vs each of [`simd_levels`] (not asserted):
    /// `cargo test --release -p gemma-kernels --lib time_quantize_acts -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn time_quantize_acts() {
        let mut rng = Rng(11);
        for (act_type, cols) in [
            (GgmlType::Q8_0, 640),
            (GgmlType::Q8_0, 2048),
            (GgmlType::Q8_K, 256),
            (GgmlType::Q8_K, 2048),
        ] {
            let x: Vec<f32> = (0..cols).map(|_| rng.unit() * 4.0).collect();
            let mut scratch = Vec::new();
            let mut line = format!("{act_type} cols {cols}:");
            let mut scalar_ns = 0.0;
            for isa in std::iter::once(Isa::Scalar).chain(simd_levels()) {
                let iters = 20_000;
                let mut best = f64::INFINITY;
                for _ in 0..5 {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let acts = quantize_acts_with(
                            isa,
                            act_type,
                            std::hint::black_box(&x),
                            cols,
                            1,
                            &mut scratch,
                        );
                        std::hint::black_box(acts.rows);
                    }
                    best = best.min(start.elapsed().as_nanos() as f64 / iters as f64);
                }
                if isa == Isa::Scalar {
                    scalar_ns = best;
                    line += &format!(" scalar {best:.0} ns");
                } else {
                    let speedup = scalar_ns / best;
                    line += &format!(", {} {best:.0} ns ({speedup:.1}x)", isa.name());
                }
            }
            println!("{line}");
        }
    }
}
