//! AVX-512 (F + BW) dot kernels, in two builds: byte products through `vpmaddubsw`+`vpmaddwd`,
//! or through VNNI `vpdpbusd` (no intermediate i16, no saturation). Two 32-value blocks (or one
//! 64-value K-quant chunk) fill a 512-bit register; decoding reuses the AVX2 helpers (every
//! AVX-512 CPU has AVX2). Types without a kernel here use the AVX2 one.

use std::arch::x86_64::*;

use gemma_formats::GgmlType;

use super::avx2::{self, f16_at, load256};
use super::layout::{self, offs, QK, QK_K};
use super::DotFn;

pub(super) fn dot_fn(dtype: GgmlType, vnni: bool) -> Option<DotFn> {
    let float: Option<DotFn> = match dtype {
        GgmlType::F32 => Some(dot_f32),
        GgmlType::F16 => Some(dot_f16),
        GgmlType::BF16 => Some(dot_bf16),
        _ => None,
    };
    float.or_else(|| {
        if vnni {
            vnni::dot_fn(dtype)
        } else {
            bw::dot_fn(dtype)
        }
    })
}

/// Byte products summed in fours: `vpmaddubsw` pairs (exact for our value ranges) then `vpmaddwd`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn mul_sum_bw(u: __m512i, s: __m512i) -> __m512i {
    _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1))
}

/// Byte products summed in fours with VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn mul_sum_vnni(u: __m512i, s: __m512i) -> __m512i {
    _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn load512(s: &[u8], off: usize) -> __m512i {
    _mm512_loadu_si512(s[off..off + 64].as_ptr().cast())
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
}

/// Lanes 0-7 get `lo`, lanes 8-15 `hi` (one value per 32-byte half).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn halves_ps(lo: f32, hi: f32) -> __m512 {
    _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(lo), _mm512_set1_ps(hi))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn halves_epi32(lo: i32, hi: i32) -> __m512i {
    _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(lo), _mm512_set1_epi32(hi))
}

/// x's sign moved onto y, so that |x| (unsigned) times the result equals x times y.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn abs_and_signed(x: __m512i, y: __m512i) -> (__m512i, __m512i) {
    let negative = _mm512_movepi8_mask(x);
    let y_signed = _mm512_mask_sub_epi8(y, negative, _mm512_setzero_si512(), y);
    (_mm512_abs_epi8(x), y_signed)
}

// ----------------------------------------------------------------------------------------------
// Float weights
// ----------------------------------------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn dot_float(
    a: &[u8],
    n: usize,
    load: impl Fn(usize) -> __m512,
    scalar_w: impl Fn(usize) -> f32,
) -> f32 {
    let load_a = |i: usize| _mm512_loadu_ps(a[4 * i..4 * i + 64].as_ptr().cast());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (k, acc_k) in acc.iter_mut().enumerate() {
            let v = i + 16 * k;
            *acc_k = _mm512_fmadd_ps(load(v), load_a(v), *acc_k);
        }
        i += 64;
    }
    while i + 16 <= n {
        acc[0] = _mm512_fmadd_ps(load(i), load_a(i), acc[0]);
        i += 16;
    }
    let total = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    let mut sum = _mm512_reduce_add_ps(total);
    for j in i..n {
        sum += scalar_w(j) * layout::f32_at(a, 4 * j);
    }
    sum
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn dot_f32(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_float(
        a,
        n,
        |i| _mm512_loadu_ps(w[4 * i..4 * i + 64].as_ptr().cast()),
        |j| layout::f32_at(w, 4 * j),
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn dot_f16(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_float(
        a,
        n,
        |i| _mm512_cvtph_ps(load256(w, 2 * i)),
        |j| layout::f16_at(w, 2 * j),
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn dot_bf16(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_float(
        a,
        n,
        |i| {
            _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(load256(w, 2 * i)),
                16,
            ))
        },
        |j| layout::bf16_at(w, 2 * j),
    )
}

// ----------------------------------------------------------------------------------------------
// Quantized kernels, generated for both byte-product instructions
// ----------------------------------------------------------------------------------------------

macro_rules! quant_kernels {
    ($features:literal, $mul_sum:path) => {
        use super::*;

        pub(super) fn dot_fn(dtype: GgmlType) -> Option<DotFn> {
            Some(match dtype {
                GgmlType::Q4_0 => dot_q4_0,
                GgmlType::Q4_1 => dot_q4_1,
                GgmlType::Q5_0 => dot_q5_0,
                GgmlType::Q5_1 => dot_q5_1,
                GgmlType::Q8_0 => dot_q8_0,
                GgmlType::Q5_K => dot_q5_k,
                _ => return None,
            })
        }

        /// Pairs of 32-value blocks. `block(i)` gives (scale, 32 weight bytes, 32 activation
        /// bytes, float term added once); `signed` says whether weight bytes are signed.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn dot_blocks32(
            n: usize,
            signed: bool,
            block: impl Fn(usize) -> (f32, __m256i, __m256i, f32),
        ) -> f32 {
            let nb = n / QK;
            let mut acc = _mm512_setzero_ps();
            let mut extra = 0.0f32;
            let mut i = 0;
            while i + 2 <= nb {
                let (d0, x0, y0, e0) = block(i);
                let (d1, x1, y1, e1) = block(i + 1);
                let (x, y) = (join(x0, x1), join(y0, y1));
                let lanes = if signed {
                    let (ux, sy) = abs_and_signed(x, y);
                    $mul_sum(ux, sy)
                } else {
                    $mul_sum(x, y)
                };
                acc = _mm512_fmadd_ps(halves_ps(d0, d1), _mm512_cvtepi32_ps(lanes), acc);
                extra += e0 + e1;
                i += 2;
            }
            let mut sum = _mm512_reduce_add_ps(acc);
            if i < nb {
                let (d, x, y, e) = block(i);
                let lanes = if signed {
                    avx2::mul_sum_i8_i8(x, y)
                } else {
                    avx2::mul_sum_u8_i8(x, y)
                };
                sum += d * avx2::hsum_ps(_mm256_cvtepi32_ps(lanes)) + e;
            }
            sum + extra
        }

        #[target_feature(enable = $features)]
        unsafe fn dot_q4_0(w: &[u8], a: &[u8], n: usize) -> f32 {
            dot_blocks32(n, true, |i| {
                let (wo, ao) = (i * 18, i * 34);
                let q =
                    _mm256_sub_epi8(avx2::q4_nibbles(w, wo + offs::Q4_0_QS), _mm256_set1_epi8(8));
                (
                    f16_at(w, wo) * f16_at(a, ao),
                    q,
                    load256(a, ao + offs::Q8_0_QS),
                    0.0,
                )
            })
        }

        #[target_feature(enable = $features)]
        unsafe fn dot_q4_1(w: &[u8], a: &[u8], n: usize) -> f32 {
            dot_blocks32(n, false, |i| {
                let (wo, ao) = (i * 20, i * 36);
                let q = avx2::q4_nibbles(w, wo + offs::Q4_1_QS);
                let min_term = f16_at(w, wo + offs::Q4_1_M) * f16_at(a, ao + offs::Q8_1_S);
                (
                    f16_at(w, wo) * f16_at(a, ao),
                    q,
                    load256(a, ao + offs::Q8_1_QS),
                    min_term,
                )
            })
        }

        #[target_feature(enable = $features)]
        unsafe fn dot_q5_0(w: &[u8], a: &[u8], n: usize) -> f32 {
            dot_blocks32(n, true, |i| {
                let (wo, ao) = (i * 22, i * 34);
                let high = avx2::q5_high_bits(layout::u32_at(w, wo + offs::Q5_0_QH));
                let q = _mm256_or_si256(avx2::q4_nibbles(w, wo + offs::Q5_0_QS), high);
                let q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
                (
                    f16_at(w, wo) * f16_at(a, ao),
                    q,
                    load256(a, ao + offs::Q8_0_QS),
                    0.0,
                )
            })
        }

        #[target_feature(enable = $features)]
        unsafe fn dot_q5_1(w: &[u8], a: &[u8], n: usize) -> f32 {
            dot_blocks32(n, false, |i| {
                let (wo, ao) = (i * 24, i * 36);
                let high = avx2::q5_high_bits(layout::u32_at(w, wo + offs::Q5_1_QH));
                let q = _mm256_or_si256(avx2::q4_nibbles(w, wo + offs::Q5_1_QS), high);
                let min_term = f16_at(w, wo + offs::Q5_1_M) * f16_at(a, ao + offs::Q8_1_S);
                (
                    f16_at(w, wo) * f16_at(a, ao),
                    q,
                    load256(a, ao + offs::Q8_1_QS),
                    min_term,
                )
            })
        }

        #[target_feature(enable = $features)]
        unsafe fn dot_q8_0(w: &[u8], a: &[u8], n: usize) -> f32 {
            dot_blocks32(n, true, |i| {
                let (wo, ao) = (i * 34, i * 34);
                let q = load256(w, wo + offs::Q8_0_QS);
                (
                    f16_at(w, wo) * f16_at(a, ao),
                    q,
                    load256(a, ao + offs::Q8_0_QS),
                    0.0,
                )
            })
        }

        /// Q4_K and Q5_K (`qh_off` set): 64 values (two sub-blocks) per 512-bit product.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn dot_k4_family(
            w: &[u8],
            w_size: usize,
            scales_off: usize,
            qs_off: usize,
            qh_off: Option<usize>,
            a: &[u8],
            n: usize,
        ) -> f32 {
            let m4 = _mm256_set1_epi8(0x0F);
            let one = _mm256_set1_epi8(1);
            let mut acc = _mm512_setzero_ps();
            let mut subtract = 0.0f32;
            for i in 0..n / QK_K {
                let (wo, ao) = (i * w_size, i * 292);
                let da = layout::f32_at(a, ao);
                let (scales, mins) =
                    layout::k4_scales_mins(&w[wo + scales_off..wo + scales_off + 12]);
                let mut high = match qh_off {
                    Some(off) => load256(w, wo + off),
                    None => _mm256_setzero_si256(),
                };
                let mut isum = _mm512_setzero_si512();
                for j in 0..4 {
                    let raw = load256(w, wo + qs_off + 32 * j);
                    let mut lo = _mm256_and_si256(raw, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                    if qh_off.is_some() {
                        let bit = _mm256_slli_epi16(_mm256_and_si256(high, one), 4);
                        lo = _mm256_or_si256(lo, bit);
                        high = _mm256_srli_epi16(high, 1);
                        let bit = _mm256_slli_epi16(_mm256_and_si256(high, one), 4);
                        hi = _mm256_or_si256(hi, bit);
                        high = _mm256_srli_epi16(high, 1);
                    }
                    let y = load512(a, ao + offs::Q8_K_QS + 64 * j);
                    let lanes = $mul_sum(join(lo, hi), y);
                    let sc = halves_epi32(scales[2 * j] as i32, scales[2 * j + 1] as i32);
                    isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(lanes, sc));
                }
                let min_sum = avx2::bsums_dot(a, ao, avx2::k4_group_mins(&mins));
                let d = f16_at(w, wo) * da;
                acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(isum), acc);
                subtract += f16_at(w, wo + 2) * da * min_sum as f32;
            }
            _mm512_reduce_add_ps(acc) - subtract
        }

        #[target_feature(enable = $features)]
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
    };
}

mod bw {
    quant_kernels!("avx512f,avx512bw,avx2,fma,f16c", super::mul_sum_bw);
}

mod vnni {
    quant_kernels!(
        "avx512f,avx512bw,avx512vnni,avx2,fma,f16c",
        super::mul_sum_vnni
    );
}
