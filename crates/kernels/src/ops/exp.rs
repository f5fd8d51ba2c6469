//! `exp` for softmax weights: a polynomial with range reduction, eight lanes at a time on AVX2
//! and sixteen on AVX-512 (the same bits as AVX2).
//!
//! `exp(x) = 2^n · exp(r)` with `n = round(x / ln 2)` and `|r| ≤ ln 2 / 2`; `exp(r)` is
//! `1 + r + r² · P(r)` with a degree-5 minimax `P` (the classic single-precision coefficients).
//! Maximum relative error over `[-87, 88]`: 8e-8 measured (about 1 ulp), tested below 2.5e-7
//! against `f64::exp` on both versions.
//! Inputs below −87.33 (where the result would be subnormal, < 1.2e-38) give exactly 0, so
//! masked or far-below-max scores vanish and never make NaN; inputs above 88.0 saturate at
//! `exp(88.0)` (softmax only ever passes `score − max ≤ 0`).
//! The scalar and AVX2 versions follow the same steps; they may differ in the last bit because
//! AVX2 fuses multiply-adds.

/// Below this, `exp` returns 0.
const LOWEST: f32 = -87.336_55;
/// Above this, `exp` saturates (keeps `n ≤ 127`).
const HIGHEST: f32 = 88.0;
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so `x − n·ln2` stays exact for |n| ≤ 128 (Cody–Waite).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5·2^23 rounds to the nearest integer (ties to even).
const ROUND_MAGIC: f32 = 12_582_912.0;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` (see the module notes for accuracy and the range).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    if x < LOWEST {
        return 0.0;
    }
    let x = x.min(HIGHEST);
    let n = (x * LOG2_E + ROUND_MAGIC) - ROUND_MAGIC;
    let r = x - n * LN2_HI;
    let r = r - n * LN2_LO;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let e_r = p * (r * r) + r + 1.0;
    // 2^n built in the exponent field; n is in [-126, 127] here.
    let two_n = f32::from_bits((((n as i32) + 127) as u32) << 23);
    e_r * two_n
}

/// [`exp`] without the branch, for loops the compiler should vectorise: inputs are clamped to
/// `[LOWEST, HIGHEST]`, so far-negative inputs give about 1.2e-38 instead of 0.
#[inline(always)]
pub fn exp_clamped(x: f32) -> f32 {
    let x = x.clamp(LOWEST, HIGHEST);
    let t = x * LOG2_E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = x - n * LN2_HI;
    let r = r - n * LN2_LO;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let e_r = p * (r * r) + r + 1.0;
    // `t` is 1.5·2^23 + n, so its low mantissa bits hold n: integer lanes, no float→int cast
    // (whose saturating semantics would not vectorise).
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let two_n = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    e_r * two_n
}

/// `x[i] = e^(x[i] − shift)` for every `i`; returns the sum of the results (softmax weights
/// and their denominator in one pass).
#[inline(always)]
pub fn exp_shifted_sum_scalar(x: &mut [f32], shift: f32) -> f32 {
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = exp(*v - shift);
        sum += *v;
    }
    sum
}

/// [`exp_shifted_sum_scalar`] on AVX2 + FMA.
///
/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn exp_shifted_sum_avx2(x: &mut [f32], shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    let chunks = n / 8;
    let s = _mm256_set1_ps(shift);
    let mut acc = _mm256_setzero_ps();
    for c in 0..chunks {
        let p = x.as_mut_ptr().add(8 * c);
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), s));
        _mm256_storeu_ps(p, e);
        acc = _mm256_add_ps(acc, e);
    }
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_movehdup_ps(h));
    let mut sum = _mm_cvtss_f32(h);
    for v in &mut x[chunks * 8..] {
        *v = exp(*v - shift);
        sum += *v;
    }
    sum
}

/// [`exp_shifted_sum_avx2`] with the exponentials sixteen lanes at a time ([`exp16`], the same
/// bits as [`exp8`]): each vector's two halves are added into the same eight-lane sum, low half
/// then high, in the order the AVX2 loop adds its vectors, so the same weights and the same sum
/// to the bit.
///
/// # Safety
/// AVX-512F, AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
pub unsafe fn exp_shifted_sum_avx512(x: &mut [f32], shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    let chunks = n / 16;
    let s16 = _mm512_set1_ps(shift);
    let mut acc = _mm256_setzero_ps();
    for c in 0..chunks {
        let p = x.as_mut_ptr().add(16 * c);
        let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p), s16));
        _mm512_storeu_ps(p, e);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
        acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
        acc = _mm256_add_ps(acc, hi);
    }
    // Eight values left: one AVX2 vector, as the AVX2 loop's last.
    let mut done = chunks * 16;
    if n - done >= 8 {
        let p = x.as_mut_ptr().add(done);
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), _mm256_set1_ps(shift)));
        _mm256_storeu_ps(p, e);
        acc = _mm256_add_ps(acc, e);
        done += 8;
    }
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_movehdup_ps(h));
    let mut sum = _mm_cvtss_f32(h);
    for v in &mut x[done..] {
        *v = exp(*v - shift);
        sum += *v;
    }
    sum
}

/// Eight lanes of [`exp`].
///
/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LOWEST));
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(LOWEST)),
        _mm256_set1_ps(HIGHEST),
    );
    let magic = _mm256_set1_ps(ROUND_MAGIC);
    let n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(LOG2_E), magic), magic);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let e_r = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let bias = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bias));
    _mm256_andnot_ps(underflow, _mm256_mul_ps(e_r, two_n))
}

/// Sixteen lanes of [`exp`]: the steps of [`exp8`] on AVX-512, so the same bits lane for lane.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let kept = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(LOWEST));
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(LOWEST)),
        _mm512_set1_ps(HIGHEST),
    );
    let magic = _mm512_set1_ps(ROUND_MAGIC);
    let n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(LOG2_E), magic), magic);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let e_r = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
        _mm512_set1_ps(1.0),
    );
    let bias = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    let two_n = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(bias));
    _mm512_maskz_mul_ps(kept, e_r, two_n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error against f64 over `[lo, hi]` sampled densely, plus the worst case.
    fn worst_relative_error(f: impl Fn(&mut [f32]), lo: f32, hi: f32) -> f64 {
        let n = 200_001;
        let mut xs: Vec<f32> = (0..n)
            .map(|i| lo + (hi - lo) * i as f32 / (n - 1) as f32)
            .collect();
        let inputs = xs.clone();
        f(&mut xs);
        inputs
            .iter()
            .zip(&xs)
            .map(|(&x, &got)| {
                let want = (x as f64).exp();
                ((got as f64 - want) / want).abs()
            })
            .fold(0.0, f64::max)
    }

    fn scalar_all(x: &mut [f32]) {
        exp_shifted_sum_scalar(x, 0.0);
    }

    #[test]
    fn scalar_exp_is_accurate_over_the_softmax_range() {
        let err = worst_relative_error(scalar_all, -87.0, 0.0);
        assert!(err < 2.5e-7, "relative error {err}");
        let err = worst_relative_error(scalar_all, 0.0, 88.0);
        assert!(err < 2.5e-7, "relative error {err}");
        let err = worst_relative_error(scalar_all, -1.0, 1.0);
        assert!(err < 2.5e-7, "relative error {err}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp_is_accurate_and_equals_scalar_within_an_ulp() {
        if !crate::quant::Isa::Avx2.is_available() {
            return;
        }
        // SAFETY: AVX2 + FMA checked above.
        let avx2 = |x: &mut [f32]| unsafe {
            exp_shifted_sum_avx2(x, 0.0);
        };
        for (lo, hi) in [(-87.0, 0.0), (0.0, 88.0), (-1.0, 1.0)] {
            let err = worst_relative_error(avx2, lo, hi);
            assert!(err < 2.5e-7, "[{lo}, {hi}]: relative error {err}");
        }
        let xs: Vec<f32> = (0..100_003).map(|i| -90.0 + i as f32 * 0.001).collect();
        let (mut a, mut b) = (xs.clone(), xs.clone());
        // SAFETY: AVX2 + FMA checked above.
        let sum_a = unsafe { exp_shifted_sum_avx2(&mut a, 0.5) };
        let sum_b = exp_shifted_sum_scalar(&mut b, 0.5);
        for ((x, a), b) in xs.iter().zip(&a).zip(&b) {
            assert!(
                (a - b).abs() <= 2.0 * f32::EPSILON * b.abs(),
                "{x}: {a} vs {b}"
            );
        }
        assert!((sum_a - sum_b).abs() <= 1e-5 * sum_b);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp_equals_avx2_exp_bit_for_bit() {
        use std::arch::x86_64::*;
        if !crate::quant::Isa::Avx512.is_available() {
            return;
        }
        let mut xs: Vec<f32> = (0..200_000).map(|i| -90.0 + i as f32 * 0.0009).collect();
        xs.extend([
            f32::NEG_INFINITY,
            -1e30,
            -87.4,
            -87.3,
            0.0,
            -0.0,
            100.0,
            f32::INFINITY,
        ]);
        xs.resize(xs.len().next_multiple_of(16), 0.0);
        for chunk in xs.chunks_exact(16) {
            let (mut a, mut b) = ([0.0f32; 16], [0.0f32; 16]);
            // SAFETY: AVX-512F (and so AVX2 + FMA) checked above; 16 values in and out.
            unsafe {
                _mm512_storeu_ps(a.as_mut_ptr(), exp16(_mm512_loadu_ps(chunk.as_ptr())));
                for h in 0..2 {
                    let v = exp8(_mm256_loadu_ps(chunk.as_ptr().add(8 * h)));
                    _mm256_storeu_ps(b.as_mut_ptr().add(8 * h), v);
                }
            }
            for i in 0..16 {
                assert_eq!(a[i].to_bits(), b[i].to_bits(), "exp({})", chunk[i]);
            }
        }
    }

    /// The AVX-512 softmax pass gives the AVX2 one's weights and sum to the bit, on every
    /// length (whole 16-lane vectors, a half vector and a scalar tail), with values far below
    /// the shift (zero weights) among them.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp_shifted_sum_equals_avx2_bit_for_bit() {
        if !crate::quant::Isa::Avx512.is_available() {
            return;
        }
        let xs: Vec<f32> = (0..200)
            .map(|i| ((i as f32) * 0.37).sin() * 40.0 - if i % 11 == 0 { 100.0 } else { 0.0 })
            .collect();
        for n in 0..xs.len() {
            for shift in [0.0f32, 3.5, -20.0] {
                let (mut a, mut b) = (xs[..n].to_vec(), xs[..n].to_vec());
                // SAFETY: AVX-512F (and so AVX2 + FMA) checked above.
                let (sum_a, sum_b) = unsafe {
                    (
                        exp_shifted_sum_avx512(&mut a, shift),
                        exp_shifted_sum_avx2(&mut b, shift),
                    )
                };
                assert_eq!(
                    sum_a.to_bits(),
                    sum_b.to_bits(),
                    "{n} values, shift {shift}"
                );
                for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{n} values, shift {shift}: {i}");
                }
            }
        }
    }

    #[test]
    fn clamped_exp_equals_exp_in_range() {
        for i in -8700..=8800 {
            let x = i as f32 * 0.01 + 0.003;
            assert_eq!(exp_clamped(x).to_bits(), exp(x).to_bits(), "{x}");
        }
        assert!(exp_clamped(-1e30) < 1.2e-38 && exp_clamped(-1e30) >= 0.0);
        assert_eq!(exp_clamped(1e30), exp(88.0));
        assert!(exp_clamped(f32::NAN).is_nan());
    }

    #[test]
    fn very_negative_inputs_give_zero_and_nothing_gives_nan() {
        let specials = vec![
            f32::NEG_INFINITY,
            -1e30,
            -1000.0,
            -103.0,
            -87.4,
            -87.3,
            0.0,
            -0.0,
            88.0,
            100.0,
            1e30,
            f32::INFINITY,
        ];
        let inputs = specials.clone();
        let check = |out: &[f32]| {
            for (x, y) in inputs.iter().zip(out) {
                assert!(!y.is_nan() && *y >= 0.0, "exp({x}) = {y}");
                if *x < -87.34 {
                    assert_eq!(*y, 0.0, "exp({x})");
                }
                if *x == 0.0 {
                    assert_eq!(*y, 1.0);
                }
            }
        };
        let mut scalar = specials.clone();
        exp_shifted_sum_scalar(&mut scalar, 0.0);
        check(&scalar);
        assert!(scalar[3] == 0.0 && scalar[5] > 0.0 && scalar[5] < 1.3e-38);
        #[cfg(target_arch = "x86_64")]
        if crate::quant::Isa::Avx2.is_available() {
            // Pad to whole vectors so every value goes through `exp8`.
            let mut inputs16 = specials.clone();
            inputs16.resize(16, -1e30);
            // SAFETY: AVX2 + FMA checked above.
            unsafe { exp_shifted_sum_avx2(&mut inputs16, 0.0) };
            check(&inputs16[..inputs.len()]);
        }
    }
}
