//! AVX2 + FMA + F16C dot kernels.
//!
//! Integer products inside a block are exact (`vpmaddubsw` pairs stay far below i16 saturation
//! for the value ranges of every type, given activations in -127..=127 as our quantizers make);
//! per-lane i32 sums are scaled and accumulated in f32 lanes, so results differ from the scalar
//! reference only in float summation order. Loads go through bounds-checked slices.

use std::arch::x86_64::*;

use gemma_formats::GgmlType;

use super::layout::{self, offs, QK, QK_K};
use super::DotFn;

pub(super) fn dot_fn(dtype: GgmlType) -> Option<DotFn> {
    Some(match dtype {
        GgmlType::F32 => dot_f32,
        GgmlType::F16 => dot_f16,
        GgmlType::BF16 => dot_bf16,
        GgmlType::Q4_1 => dot_q4_1,
        GgmlType::Q5_1 => dot_q5_1,
        GgmlType::Q2_K => dot_q2_k,
        GgmlType::Q3_K => dot_q3_k,
        GgmlType::Q5_K => dot_q5_k,
        // Q4_0, Q5_0, Q8_0, Q4_K and Q6_K use the multi-row kernels of `avx2_rows` (one row is
        // a group of one there), which match the scalar reference bit for bit.
        GgmlType::Q4_0
        | GgmlType::Q5_0
        | GgmlType::Q8_0
        | GgmlType::Q4_K
        | GgmlType::Q6_K
        | GgmlType::Q8_1
        | GgmlType::Q8_K => return None,
    })
}

// ----------------------------------------------------------------------------------------------
// Helpers (also used by the AVX-512 kernels, whose feature set includes these)
// ----------------------------------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load128(s: &[u8], off: usize) -> __m128i {
    _mm_loadu_si128(s[off..off + 16].as_ptr().cast())
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load256(s: &[u8], off: usize) -> __m256i {
    _mm256_loadu_si256(s[off..off + 32].as_ptr().cast())
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_ps(s: &[u8], off: usize) -> __m256 {
    _mm256_loadu_ps(s[off..off + 32].as_ptr().cast())
}

/// f16 scale at `s[off..off + 2]` via F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_at(s: &[u8], off: usize) -> f32 {
    let bits = u16::from_le_bytes([s[off], s[off + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Unsigned bytes times signed bytes, summed in groups of four into i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn mul_sum_u8_i8(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// Signed bytes times signed bytes: moves x's sign onto y so the unsigned form applies.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn mul_sum_i8_i8(x: __m256i, y: __m256i) -> __m256i {
    mul_sum_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// The 32 nibbles of a 16-byte Q4 field in value order: low nibbles, then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_nibbles(s: &[u8], off: usize) -> __m256i {
    let raw = load128(s, off);
    let m4 = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(raw, m4);
    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
    _mm256_set_m128i(hi, lo)
}

/// Byte i = 0x10 when bit i of `qh` is set: the fifth bit of the 32 values of a Q5 block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q5_high_bits(qh: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let bit_of_byte = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit_of_byte), bit_of_byte);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// i16 multipliers for `vpmaddwd` over 32 values with one scale per 16: `lo` for the first
/// 16 values (low 128 bits), `hi` for the next 16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scale_pair(lo: i16, hi: i16) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// Sum over the 16 groups of a Q8_K block of `bsums[g] * mult[g]` (`mult`: 16 x i16).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bsums_dot(a: &[u8], ao: usize, mult: __m256i) -> i32 {
    hsum_epi32(_mm256_madd_epi16(load256(a, ao + offs::Q8_K_BSUMS), mult))
}

/// The 8 sub-block mins of Q4_K/Q5_K as 16 i16 multipliers, one per 16-value group.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k4_group_mins(mins: &[u8; 8]) -> __m256i {
    let m = _mm_loadl_epi64(mins.as_ptr().cast());
    _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m))
}

// ----------------------------------------------------------------------------------------------
// Float weights (f32 activations)
// ----------------------------------------------------------------------------------------------

/// Shared float loop: `load(i)` gives 8 weights starting at value i as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_float(
    a: &[u8],
    n: usize,
    load: impl Fn(usize) -> __m256,
    scalar_w: impl Fn(usize) -> f32,
) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc_k) in acc.iter_mut().enumerate() {
            let v = i + 8 * k;
            *acc_k = _mm256_fmadd_ps(load(v), load_ps(a, 4 * v), *acc_k);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(load(i), load_ps(a, 4 * i), acc[0]);
        i += 8;
    }
    let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum_ps(total);
    for j in i..n {
        sum += scalar_w(j) * layout::f32_at(a, 4 * j);
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_float(a, n, |i| load_ps(w, 4 * i), |j| layout::f32_at(w, 4 * j))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_float(
        a,
        n,
        |i| _mm256_cvtph_ps(load128(w, 2 * i)),
        |j| layout::f16_at(w, 2 * j),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_bf16(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_float(
        a,
        n,
        |i| {
            _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(load128(w, 2 * i)),
                16,
            ))
        },
        |j| layout::bf16_at(w, 2 * j),
    )
}

// ----------------------------------------------------------------------------------------------
// 32-value blocks
// ----------------------------------------------------------------------------------------------

/// Loop over 32-value blocks: `block(wb, ab)` returns (weight-activation scale, i32 lanes,
/// extra float term added once per block).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_blocks32(
    w_size: usize,
    a_size: usize,
    n: usize,
    block: impl Fn(usize, usize) -> (f32, __m256i, f32),
) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut extra = 0.0f32;
    for i in 0..n / QK {
        let (d, lanes, add) = block(i * w_size, i * a_size);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lanes), acc);
        extra += add;
    }
    hsum_ps(acc) + extra
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_blocks32(20, 36, n, |wo, ao| {
        let q = q4_nibbles(w, wo + offs::Q4_1_QS);
        let y = load256(a, ao + offs::Q8_1_QS);
        let min_term = f16_at(w, wo + offs::Q4_1_M) * f16_at(a, ao + offs::Q8_1_S);
        (f16_at(w, wo) * f16_at(a, ao), mul_sum_u8_i8(q, y), min_term)
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_1(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_blocks32(24, 36, n, |wo, ao| {
        let high = q5_high_bits(layout::u32_at(w, wo + offs::Q5_1_QH));
        let q = _mm256_or_si256(q4_nibbles(w, wo + offs::Q5_1_QS), high);
        let y = load256(a, ao + offs::Q8_1_QS);
        let min_term = f16_at(w, wo + offs::Q5_1_M) * f16_at(a, ao + offs::Q8_1_S);
        (f16_at(w, wo) * f16_at(a, ao), mul_sum_u8_i8(q, y), min_term)
    })
}

// ----------------------------------------------------------------------------------------------
// K-quants (Q8_K activations: d f32, qs[256], bsums[16])
// ----------------------------------------------------------------------------------------------

/// Loop over super-blocks: `block(wo, ao, act_d)` returns (scale for the i32 lanes, lanes,
/// float term subtracted once per block).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_superblocks(
    w_size: usize,
    a: &[u8],
    n: usize,
    block: impl Fn(usize, usize, f32) -> (f32, __m256i, f32),
) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut subtract = 0.0f32;
    for i in 0..n / QK_K {
        let ao = i * 292;
        let (d, lanes, sub) = block(i * w_size, ao, layout::f32_at(a, ao));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lanes), acc);
        subtract += sub;
    }
    hsum_ps(acc) - subtract
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q2_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_superblocks(84, a, n, |wo, ao, da| {
        let sc = &w[wo..wo + 16];
        let mut isum = _mm256_setzero_si256();
        for h in 0..2 {
            let mut bits = load256(w, wo + offs::Q2_K_QS + 32 * h);
            for s in 0..4 {
                let q = _mm256_and_si256(bits, _mm256_set1_epi8(3));
                bits = _mm256_srli_epi16(bits, 2);
                let y = load256(a, ao + offs::Q8_K_QS + 128 * h + 32 * s);
                let g = 8 * h + 2 * s;
                let scales = scale_pair((sc[g] & 0x0F) as i16, (sc[g + 1] & 0x0F) as i16);
                isum =
                    _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), scales));
            }
        }
        let group_mins = _mm_and_si128(_mm_srli_epi16(load128(w, wo), 4), _mm_set1_epi8(0x0F));
        let min_sum = bsums_dot(a, ao, _mm256_cvtepu8_epi16(group_mins));
        let d = f16_at(w, wo + offs::Q2_K_D) * da;
        let dmin = f16_at(w, wo + offs::Q2_K_DMIN) * da;
        (d, isum, dmin * min_sum as f32)
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q3_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_superblocks(110, a, n, |wo, ao, da| {
        let sc = layout::q3k_scales(&w[wo + offs::Q3_K_SCALES..wo + offs::Q3_K_SCALES + 12]);
        let one = _mm256_set1_epi8(1);
        let mut hmask = load256(w, wo);
        let mut isum = _mm256_setzero_si256();
        for h in 0..2 {
            let mut bits = load256(w, wo + offs::Q3_K_QS + 32 * h);
            for s in 0..4 {
                let low = _mm256_and_si256(bits, _mm256_set1_epi8(3));
                bits = _mm256_srli_epi16(bits, 2);
                // A clear high bit subtracts 4.
                let high_clear = _mm256_xor_si256(_mm256_and_si256(hmask, one), one);
                hmask = _mm256_srli_epi16(hmask, 1);
                let q = _mm256_sub_epi8(low, _mm256_slli_epi16(high_clear, 2));
                let y = load256(a, ao + offs::Q8_K_QS + 128 * h + 32 * s);
                let g = 8 * h + 2 * s;
                let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
                let scales = scale_pair(sc[g] as i16, sc[g + 1] as i16);
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(pairs, scales));
            }
        }
        (f16_at(w, wo + offs::Q3_K_D) * da, isum, 0.0)
    })
}

/// Q4_K and Q5_K share everything but the fifth bit (`qh_off` for Q5_K).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_k4_family(
    w: &[u8],
    w_size: usize,
    scales_off: usize,
    qs_off: usize,
    qh_off: Option<usize>,
    a: &[u8],
    n: usize,
) -> f32 {
    dot_superblocks(w_size, a, n, |wo, ao, da| {
        let (scales, mins) = layout::k4_scales_mins(&w[wo + scales_off..wo + scales_off + 12]);
        let m4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        let mut high = match qh_off {
            Some(off) => load256(w, wo + off),
            None => _mm256_setzero_si256(),
        };
        let mut isum = _mm256_setzero_si256();
        for j in 0..4 {
            let raw = load256(w, wo + qs_off + 32 * j);
            let mut lo = _mm256_and_si256(raw, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            if qh_off.is_some() {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(high, one), 4));
                high = _mm256_srli_epi16(high, 1);
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(high, one), 4));
                high = _mm256_srli_epi16(high, 1);
            }
            let y_lo = load256(a, ao + offs::Q8_K_QS + 64 * j);
            let y_hi = load256(a, ao + offs::Q8_K_QS + 64 * j + 32);
            let p_lo = _mm256_madd_epi16(
                _mm256_maddubs_epi16(lo, y_lo),
                _mm256_set1_epi16(scales[2 * j] as i16),
            );
            let p_hi = _mm256_madd_epi16(
                _mm256_maddubs_epi16(hi, y_hi),
                _mm256_set1_epi16(scales[2 * j + 1] as i16),
            );
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(p_lo, p_hi));
        }
        let min_sum = bsums_dot(a, ao, k4_group_mins(&mins));
        let d = f16_at(w, wo) * da;
        let dmin = f16_at(w, wo + 2) * da;
        (d, isum, dmin * min_sum as f32)
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_k4_family(
        w,
        176,
        offs::Q5_K_SCALES,
        offs::Q5_K_QS,
        Some(offs::Q5_K_QH),
        a,
        n,
    )
}
