//! A once-per-process check that a SIMD kernel table agrees with the scalar reference, run
//! before the table is selected. It guards against kernels that could not be exercised on the
//! development machines (AVX-512 and NEON were written without such hardware at hand); a
//! disagreement is reported on stderr and the next lower ISA is used instead. The activation
//! quantizers of the table's ISA are checked too (they must give the scalar bytes).

use gemma_formats::GgmlType;

use super::{layout, quantize_acts_with, scalar, vec_dot_type, Isa, Kernels};

pub(super) fn agrees_with_scalar(kernels: &Kernels) -> bool {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    if !quantizers_agree(kernels.isa, &mut rng) {
        return false;
    }
    for dtype in GgmlType::ALL {
        // Odd block counts and a float tail exercise the paired/remainder code paths.
        let n = match dtype.block_size() {
            1 => 77,
            32 => 96,
            _ => 512,
        };
        let w = sample_weights(dtype, n, &mut rng);
        let x: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
        let act_type = vec_dot_type(dtype);
        let mut act = vec![0u8; act_type.bytes_for(n).expect("whole blocks")];
        scalar::quantize(act_type, &x, &mut act).expect("activation types are quantizable");

        let reference = scalar::vec_dot(dtype, &w, &act, n);
        // SAFETY: the table's ISA was detected on this CPU; sizes match by construction.
        let got = unsafe { kernels.dot(dtype)(&w, &act, n) };
        let tolerance = 1e-4 * magnitude(dtype, &w, act_type, &act, n) + 1e-6;
        if (got - reference).abs() > tolerance || got.is_nan() {
            eprintln!(
                "gemma-kernels: {:?} {dtype} dot kernel disagrees with the scalar reference \
                 ({got} vs {reference}); using a lower instruction set",
                kernels.isa
            );
            return false;
        }
    }
    true
}

/// Whether `isa`'s activation quantizers write the scalar path's bytes (Q8_0 with its block
/// info, Q8_K) for a few rows of values of mixed magnitudes.
fn quantizers_agree(isa: Isa, rng: &mut XorShift) -> bool {
    let (cols, tokens) = (512, 3);
    let x: Vec<f32> = (0..cols * tokens)
        .map(|i| rng.unit() * [0.01, 1.0, 300.0][i / 96 % 3])
        .collect();
    for act_type in [GgmlType::Q8_0, GgmlType::Q8_K] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let got = quantize_acts_with(isa, act_type, &x, cols, tokens, &mut a);
        let want = quantize_acts_with(Isa::Scalar, act_type, &x, cols, tokens, &mut b);
        if (got.rows, got.q8_0_info) != (want.rows, want.q8_0_info) {
            eprintln!(
                "gemma-kernels: {isa:?} {act_type} activation quantization disagrees with the \
                 scalar reference; using a lower instruction set"
            );
            return false;
        }
    }
    true
}

/// Sum of |w_i * a_i| over the dequantized operands: the scale of float rounding differences.
fn magnitude(dtype: GgmlType, w: &[u8], act_type: GgmlType, act: &[u8], n: usize) -> f32 {
    let mut wd = vec![0.0; n];
    let mut ad = vec![0.0; n];
    scalar::dequantize_unchecked(dtype, w, &mut wd);
    scalar::dequantize_unchecked(act_type, act, &mut ad);
    wd.iter().zip(&ad).map(|(a, b)| (a * b).abs()).sum()
}

/// Random quants with small, finite scales (float types: random values).
fn sample_weights(dtype: GgmlType, n: usize, rng: &mut XorShift) -> Vec<u8> {
    let mut w = vec![0u8; dtype.bytes_for(n).expect("whole blocks")];
    if !dtype.is_quantized() {
        let x: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
        scalar::quantize(dtype, &x, &mut w).expect("float types are quantizable");
        return w;
    }
    w.iter_mut().for_each(|b| *b = rng.next() as u8);
    for block in w.chunks_exact_mut(dtype.type_size()) {
        for &off in layout::f16_scale_offsets(dtype) {
            layout::put_f16(block, off, 0.01 * rng.unit());
        }
        if dtype == GgmlType::Q8_K {
            block[0..4].copy_from_slice(&(0.01 * rng.unit()).to_le_bytes());
        }
    }
    w
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Isa;

    #[test]
    fn every_available_isa_passes_the_self_check() {
        for isa in super::super::available_isas() {
            assert!(agrees_with_scalar(&Kernels::for_isa(isa)), "{isa:?}");
        }
    }

    #[test]
    fn a_wrong_kernel_fails_the_self_check() {
        fn broken(_: &[u8], _: &[u8], _: usize) -> f32 {
            1.0
        }
        let mut kernels = Kernels::for_isa(Isa::Scalar);
        kernels.dots[GgmlType::Q6_K as usize] = broken;
        assert!(!agrees_with_scalar(&kernels));
    }
}
