//! AVX2 dequantization for the weight types of the default model (Q4_0, Q5_0, Q8_0, Q4_K, Q6_K).
//!
//! Each value is computed with the same float operations, in the same order, as the scalar
//! reference (`d * q`, or `(d * scale) * q - dmin * min` for Q4_K, never fused), so the results
//! are bit-identical; only the unpacking of the quants is vectorized.

use std::arch::x86_64::*;

use gemma_formats::GgmlType;

use super::avx2::f16_at;
use super::layout::{self, offs, QK, QK_K};

/// Dequantizes `src` (whole blocks of `dtype`) into `dst`; false when `dtype` has no AVX2 path
/// here (the caller then uses the scalar one). Sizes must already match.
///
/// # Safety
/// Needs AVX2 + FMA + F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize(dtype: GgmlType, src: &[u8], dst: &mut [f32]) -> bool {
    debug_assert_eq!(dtype.bytes_for(dst.len()), Some(src.len()));
    match dtype {
        GgmlType::Q4_0 => each_block::<18, QK>(src, dst, q4_q5_0::<false>),
        GgmlType::Q5_0 => each_block::<22, QK>(src, dst, q4_q5_0::<true>),
        GgmlType::Q8_0 => each_block::<34, QK>(src, dst, q8_0),
        GgmlType::Q4_K => each_block::<144, QK_K>(src, dst, q4_k),
        GgmlType::Q6_K => each_block::<210, QK_K>(src, dst, q6_k),
        GgmlType::BF16 => bf16(src, dst),
        _ => return false,
    }
    true
}

/// Applies `block` to every (block bytes, output values) pair; inlined into each caller above so
/// that the block function inlines too.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn each_block<const SIZE: usize, const VALUES: usize>(
    src: &[u8],
    dst: &mut [f32],
    block: unsafe fn(&[u8], &mut [f32]),
) {
    for (b, y) in src.chunks_exact(SIZE).zip(dst.chunks_exact_mut(VALUES)) {
        block(b, y);
    }
}

/// bf16 → f32 is exact (the bits shifted up by 16), so eight at a time gives the scalar
/// conversion's results; a vision tower's bf16 weights are packed this way for the GEMM.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16(src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    let full = n - n % 8;
    for (b, y) in src[..2 * full]
        .chunks_exact(16)
        .zip(dst[..full].chunks_exact_mut(8))
    {
        let h = _mm_loadu_si128(b.as_ptr().cast());
        let v = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
        _mm256_storeu_ps(y.as_mut_ptr(), _mm256_castsi256_ps(v));
    }
    for (b, y) in src[2 * full..].chunks_exact(2).zip(&mut dst[full..]) {
        *y = layout::bf16_at(b, 0);
    }
}

/// Stores `d * (i8 value)` for the 32 signed bytes of `q` into `y[..32]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_scaled_i8(q: __m256i, d: f32, y: &mut [f32]) {
    let y = &mut y[..QK];
    let d = _mm256_set1_ps(d);
    let lo = _mm256_castsi256_si128(q);
    let hi = _mm256_extracti128_si256::<1>(q);
    for (i, part) in [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)]
        .into_iter()
        .enumerate()
    {
        let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part));
        _mm256_storeu_ps(y[8 * i..].as_mut_ptr(), _mm256_mul_ps(d, v));
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0(b: &[u8], y: &mut [f32]) {
    let q = _mm256_loadu_si256(b[offs::Q8_0_QS..offs::Q8_0_QS + QK].as_ptr().cast());
    store_scaled_i8(q, f16_at(b, 0), y);
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_q5_0<const Q5: bool>(b: &[u8], y: &mut [f32]) {
    let (qs_off, offset) = if Q5 {
        (offs::Q5_0_QS, 16)
    } else {
        (offs::Q4_0_QS, 8)
    };
    let qs = &b[qs_off..qs_off + 16];
    let mut q = nibbles(qs);
    if Q5 {
        q = _mm256_or_si256(q, fifth_bits(layout::u32_at(b, offs::Q5_0_QH)));
    }
    let q = _mm256_sub_epi8(q, _mm256_set1_epi8(offset));
    store_scaled_i8(q, f16_at(b, 0), y);
}

/// The 32 quants of a 16-byte nibble field in value order: low nibbles, then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(qs: &[u8]) -> __m256i {
    let raw = _mm_loadu_si128(qs[..16].as_ptr().cast());
    let m4 = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(raw, m4);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), m4);
    _mm256_set_m128i(hi, lo)
}

/// 0x10 in byte `j` when bit `j` of `qh` is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth_bits(qh: u32) -> __m256i {
    super::avx2::q5_high_bits(qh)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k(b: &[u8], y: &mut [f32]) {
    let y = &mut y[..QK_K];
    let d = f16_at(b, 0);
    let dmin = f16_at(b, offs::Q4_K_DMIN);
    let (scales, mins) = layout::k4_scales_mins(&b[offs::Q4_K_SCALES..offs::Q4_K_SCALES + 12]);
    let m4 = _mm256_set1_epi8(0x0F);
    for chunk in 0..4 {
        let off = offs::Q4_K_QS + 32 * chunk;
        let raw = _mm256_loadu_si256(b[off..off + 32].as_ptr().cast());
        let halves = [
            _mm256_and_si256(raw, m4),
            _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4),
        ];
        for (h, q) in halves.into_iter().enumerate() {
            let sub = 2 * chunk + h;
            // Scalar reference: (d * scale) * q - dmin * min.
            let dl = _mm256_set1_ps(d * scales[sub] as f32);
            let ml = _mm256_set1_ps(dmin * mins[sub] as f32);
            let out = &mut y[32 * sub..32 * sub + 32];
            for (i, part) in byte_quarters(q).into_iter().enumerate() {
                let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
                let value = _mm256_sub_ps(_mm256_mul_ps(dl, v), ml);
                _mm256_storeu_ps(out[8 * i..].as_mut_ptr(), value);
            }
        }
    }
}

/// The four 8-byte parts of `q`, each in the low half of a 128-bit register.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn byte_quarters(q: __m256i) -> [__m128i; 4] {
    let lo = _mm256_castsi256_si128(q);
    let hi = _mm256_extracti128_si256::<1>(q);
    [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)]
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k(b: &[u8], y: &mut [f32]) {
    let y = &mut y[..QK_K];
    let d = f16_at(b, offs::Q6_K_D);
    // The unpacker reads raw pointers: the whole block must be there (it reads below `d`).
    assert!(b.len() > offs::Q6_K_D);
    for half in 0..2 {
        // Quarter k of the half: values 128 * half + 32 * k .., stored unsigned with offset 32.
        let quarters = super::avx2_rows::q6k_half_quarters(b.as_ptr(), half);
        for (k, q) in quarters.into_iter().enumerate() {
            let q = _mm256_sub_epi8(q, _mm256_set1_epi8(32));
            let first = 128 * half + 32 * k;
            for (i, part) in byte_quarters(q).into_iter().enumerate() {
                let v = first + 8 * i;
                // Scalar reference: (d * scale) * q, one scale per 16 values.
                let scale = b[offs::Q6_K_SCALES + v / 16] as i8 as f32;
                let dl = _mm256_set1_ps(d * scale);
                let value = _mm256_mul_ps(dl, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)));
                _mm256_storeu_ps(y[v..v + 8].as_mut_ptr(), value);
            }
        }
    }
}
