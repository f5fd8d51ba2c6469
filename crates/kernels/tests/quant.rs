//! Quantization kernels against the gguf Python package's reference results (fixtures), SIMD
//! kernels against the scalar reference, and dot products against float math.

use std::path::PathBuf;

use gemma_kernels::quant::{self, Isa};
use gemma_kernels::{GgmlType, KernelError};

// ------------------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------------------

struct Fixture {
    input: Option<Vec<f32>>,
    bytes: Vec<u8>,
    dequantized: Vec<f32>,
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/quant")
}

fn read_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Parses `<TYPE>_<kind>.bin` (layout in scripts/make_quant_fixtures.py); None if absent.
fn load_fixture(dtype: GgmlType, kind: &str) -> Option<Fixture> {
    let path = fixture_dir().join(format!("{}_{kind}.bin", dtype.name()));
    let data = std::fs::read(&path).ok()?;
    assert_eq!(&data[0..4], b"GQF1", "{}: bad magic", path.display());
    let word =
        |i: usize| u32::from_le_bytes(data[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize;
    let (n_values, n_bytes, has_input) = (word(0), word(1), word(2) == 1);
    let mut pos = 16;
    let input = has_input.then(|| {
        let v = read_f32s(&data[pos..pos + 4 * n_values]);
        pos += 4 * n_values;
        v
    });
    let bytes = data[pos..pos + n_bytes].to_vec();
    pos += n_bytes;
    let dequantized = read_f32s(&data[pos..pos + 4 * n_values]);
    assert_eq!(
        pos + 4 * n_values,
        data.len(),
        "{}: trailing bytes",
        path.display()
    );
    Some(Fixture {
        input,
        bytes,
        dequantized,
    })
}

fn same_float(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Types the gguf package dequantizes: every implemented type except Q8_1 and Q8_K.
fn types_with_fixtures() -> Vec<GgmlType> {
    GgmlType::ALL
        .into_iter()
        .filter(|t| !matches!(t, GgmlType::Q8_1 | GgmlType::Q8_K))
        .collect()
}

#[test]
fn dequantize_matches_gguf_package_bit_for_bit() {
    let mut checked = 0;
    for dtype in types_with_fixtures() {
        for kind in ["random", "roundtrip"] {
            let Some(fx) = load_fixture(dtype, kind) else {
                assert!(kind == "roundtrip", "missing fixture {dtype} {kind}");
                continue;
            };
            let mut out = vec![0.0f32; fx.dequantized.len()];
            quant::dequantize(dtype, &fx.bytes, &mut out).unwrap();
            for (i, (&got, &want)) in out.iter().zip(&fx.dequantized).enumerate() {
                assert!(
                    same_float(got, want),
                    "{dtype} {kind}: value {i}: got {got:e}, want {want:e}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 21, "expected 13 random + 8 roundtrip fixtures");
}

#[test]
fn quantize_matches_gguf_package_bytes() {
    let quantizable = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];
    for dtype in quantizable {
        let fx = load_fixture(dtype, "roundtrip").expect("roundtrip fixture");
        let input = fx.input.expect("roundtrip fixtures carry their input");
        let mut out = vec![0u8; fx.bytes.len()];
        quant::quantize(dtype, &input, &mut out).unwrap();
        let block = dtype.type_size();
        for (b, (got, want)) in out.chunks(block).zip(fx.bytes.chunks(block)).enumerate() {
            if dtype == GgmlType::F16 || dtype == GgmlType::BF16 {
                // NaN payloads may differ; everything else must be identical.
                let g = u16::from_le_bytes([got[0], got[1]]);
                let w = u16::from_le_bytes([want[0], want[1]]);
                let nan = |h: u16| {
                    if dtype == GgmlType::F16 {
                        h & 0x7c00 == 0x7c00 && h & 0x3ff != 0
                    } else {
                        h & 0x7f80 == 0x7f80 && h & 0x7f != 0
                    }
                };
                assert!(
                    g == w || (nan(g) && nan(w)),
                    "{dtype} value {b}: {g:#06x} vs {w:#06x}"
                );
            } else {
                assert_eq!(
                    got,
                    want,
                    "{dtype} block {b} (input {:?})",
                    &input[b * dtype.block_size()..][..4]
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Deterministic random data
// ------------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Roughly normal (sum of uniforms), scaled.
    fn normal(&mut self, scale: f32) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum::<f32>() - 2.0;
        s * scale * 1.7
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    fn floats(&mut self, n: usize) -> Vec<f32> {
        let group_scale: Vec<f32> = (0..n.div_ceil(32))
            .map(|_| (self.uniform() * 6.0 - 3.0).exp())
            .collect();
        (0..n).map(|i| self.normal(group_scale[i / 32])).collect()
    }
}

fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// Random bytes forming valid weights of `n` values: arbitrary quants, finite moderate scales.
fn random_weights(dtype: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    if !dtype.is_quantized() {
        let x = rng.floats(n);
        let mut out = vec![0u8; dtype.bytes_for(n).unwrap()];
        quant::quantize(dtype, &x, &mut out).unwrap();
        return out;
    }
    let size = dtype.type_size();
    let mut out = rng.bytes(dtype.bytes_for(n).unwrap());
    let f16_fields: &[usize] = match dtype {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    };
    for block in out.chunks_exact_mut(size) {
        for &off in f16_fields {
            let sign = if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
            put_f16(block, off, sign * (0.001 + rng.uniform() * 0.05));
        }
        if dtype == GgmlType::Q8_K {
            block[0..4].copy_from_slice(&(0.001 + rng.uniform() * 0.05).to_le_bytes());
        }
    }
    out
}

fn activations(dtype: GgmlType, x: &[f32]) -> Vec<u8> {
    let act_type = quant::vec_dot_type(dtype);
    let mut act = vec![0u8; act_type.bytes_for(x.len()).unwrap()];
    quant::quantize(act_type, x, &mut act).unwrap();
    act
}

fn dequantized(dtype: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    quant::dequantize(dtype, bytes, &mut out).unwrap();
    out
}

fn lengths_for(dtype: GgmlType) -> Vec<usize> {
    match dtype.block_size() {
        1 => vec![1, 7, 8, 31, 32, 33, 100, 256, 1000, 2048],
        32 => vec![32, 64, 96, 160, 640, 2048],
        _ => vec![256, 512, 768, 2560],
    }
}

// ------------------------------------------------------------------------------------------------
// Dot products
// ------------------------------------------------------------------------------------------------

/// ggml's pairs, except Q4_K and Q6_K: Q8_0 activations (a scale per 32 values) instead of
/// Q8_K (one per 256), see `scalar::dot_q4_k`.
#[test]
fn vec_dot_types() {
    use GgmlType::*;
    let expected = [
        (F32, F32),
        (F16, F32),
        (BF16, F32),
        (Q4_0, Q8_0),
        (Q5_0, Q8_0),
        (Q8_0, Q8_0),
        (Q4_1, Q8_1),
        (Q5_1, Q8_1),
        (Q2_K, Q8_K),
        (Q3_K, Q8_K),
        (Q4_K, Q8_0),
        (Q5_K, Q8_K),
        (Q6_K, Q8_0),
    ];
    for (w, a) in expected {
        assert_eq!(quant::vec_dot_type(w), a, "{w}");
    }
}

#[test]
fn every_isa_matches_scalar_dot() {
    let isas = quant::available_isas();
    assert_eq!(isas[0], Isa::Scalar);
    eprintln!(
        "testing ISAs {isas:?}, selected {:?}",
        quant::selected_isa()
    );
    let mut rng = Rng(7);
    for dtype in GgmlType::ALL {
        for n in lengths_for(dtype) {
            for _trial in 0..3 {
                let w = random_weights(dtype, n, &mut rng);
                let x = rng.floats(n);
                let act = activations(dtype, &x);
                let reference = quant::scalar::vec_dot(dtype, &w, &act, n);
                // Float summation order differs between kernels: bound by the sum of |terms|.
                let wd = dequantized(dtype, &w, n);
                let ad = dequantized(quant::vec_dot_type(dtype), &act, n);
                let magnitude: f64 = wd
                    .iter()
                    .zip(&ad)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                let tol = 1e-5 * magnitude + 1e-30;
                for &isa in &isas {
                    let got = quant::vec_dot_with(isa, dtype, &w, &act, n);
                    assert!(
                        ((got - reference) as f64).abs() <= tol,
                        "{dtype} n={n} {isa:?}: {got} vs scalar {reference} (tol {tol:e})"
                    );
                }
                assert_eq!(
                    quant::vec_dot(dtype, &w, &act, n),
                    quant::vec_dot_with(quant::selected_isa(), dtype, &w, &act, n)
                );
            }
        }
    }
}

/// SIMD dequantization (which feeds the prompt GEMM) must give the scalar reference's bits for
/// every type, including types it leaves to the scalar code.
#[test]
fn every_isa_dequantizes_bit_for_bit_like_scalar() {
    let mut rng = Rng(13);
    for dtype in GgmlType::ALL {
        for n in lengths_for(dtype) {
            let w = random_weights(dtype, n, &mut rng);
            let reference = dequantized(dtype, &w, n);
            let mut scalar_out = vec![0.0f32; n];
            quant::scalar::dequantize(dtype, &w, &mut scalar_out).unwrap();
            for isa in quant::available_isas() {
                let mut out = vec![f32::NAN; n];
                quant::dequantize_with(isa, dtype, &w, &mut out).unwrap();
                for (i, (a, b)) in out.iter().zip(&scalar_out).enumerate() {
                    assert!(
                        same_float(*a, *b),
                        "{dtype} n={n} {isa:?} value {i}: {a:e} vs scalar {b:e}"
                    );
                }
            }
            assert!(reference
                .iter()
                .zip(&scalar_out)
                .all(|(a, b)| same_float(*a, *b)));
        }
    }
}

/// The types whose SIMD kernels (AVX2 and above) reduce each block to one integer sum per row and
/// scale it exactly as the scalar reference does: their results must be the same bits. This is
/// what keeps a token's logits independent of how many rows and tokens a matmul batches.
#[test]
fn multi_row_kernel_types_equal_scalar_bit_for_bit() {
    let exact_isas: Vec<Isa> = quant::available_isas()
        .into_iter()
        .filter(|isa| matches!(isa, Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni))
        .collect();
    let mut rng = Rng(11);
    for dtype in [
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        for n in lengths_for(dtype) {
            for trial in 0..4 {
                let mut w = random_weights(dtype, n, &mut rng);
                if trial == 0 && dtype == GgmlType::Q8_0 {
                    // Extreme quants: -128 weights against negative activations.
                    for block in w.chunks_exact_mut(34) {
                        block[2..].fill(0x80);
                    }
                }
                let x = rng.floats(n);
                let act = activations(dtype, &x);
                let reference = quant::scalar::vec_dot(dtype, &w, &act, n);
                for &isa in &exact_isas {
                    let got = quant::vec_dot_with(isa, dtype, &w, &act, n);
                    assert_eq!(
                        got.to_bits(),
                        reference.to_bits(),
                        "{dtype} n={n} {isa:?}: {got} vs scalar {reference}"
                    );
                }
            }
        }
    }
}

/// |x - dequantize(quantize(x))| per value for the activation formats (f16 scale rounding
/// included): at most 0.6 of a quantization step.
fn activation_error_bound(act_type: GgmlType, x: &[f32]) -> Vec<f64> {
    if act_type == GgmlType::F32 {
        return vec![0.0; x.len()];
    }
    let block = act_type.block_size();
    x.chunks(block)
        .flat_map(|b| {
            let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            std::iter::repeat_n(0.6 * amax / 127.0, b.len())
        })
        .collect()
}

#[test]
fn quantized_dot_approximates_float_dot() {
    let mut rng = Rng(11);
    for dtype in GgmlType::ALL {
        for n in lengths_for(dtype) {
            let w = random_weights(dtype, n, &mut rng);
            let x = rng.floats(n);
            let act = activations(dtype, &x);
            let wd = dequantized(dtype, &w, n);
            let exact: f64 = wd.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let magnitude: f64 = wd
                .iter()
                .zip(&x)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let act_type = quant::vec_dot_type(dtype);
            let per_value = activation_error_bound(act_type, &x);
            let mut bound: f64 = wd
                .iter()
                .zip(&per_value)
                .map(|(w, e)| w.abs() as f64 * e)
                .sum();
            if act_type == GgmlType::Q8_1 {
                // min * s uses s = f16(d * sum(q)): two f16 roundings of the block sum.
                for (block, xs) in w.chunks(dtype.type_size()).zip(x.chunks(32)) {
                    let m = half::f16::from_le_bytes([block[2], block[3]]).to_f32() as f64;
                    let sum_abs: f64 = xs.iter().map(|v| v.abs() as f64).sum();
                    bound += m.abs() * sum_abs * 2f64.powi(-9);
                }
            }
            bound += 1e-5 * magnitude + 1e-30;
            for isa in quant::available_isas() {
                let got = quant::vec_dot_with(isa, dtype, &w, &act, n) as f64;
                assert!(
                    (got - exact).abs() <= bound,
                    "{dtype} n={n} {isa:?}: {got} vs float dot {exact} (bound {bound:e})"
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Activation quantizers without package fixtures
// ------------------------------------------------------------------------------------------------

#[test]
fn q8_1_and_q8_k_quantizers_are_consistent() {
    let mut rng = Rng(3);
    let mut x = rng.floats(1024);
    x[256..512].fill(0.0); // all-zero super-block
    for dtype in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K] {
        let q = activations_of(dtype, &x);
        let back = dequantized(dtype, &q, x.len());
        let bound = activation_error_bound(dtype, &x);
        for i in 0..x.len() {
            assert!(
                ((back[i] - x[i]) as f64).abs() <= bound[i] + 1e-30,
                "{dtype} value {i}: {} vs {}",
                back[i],
                x[i]
            );
        }
        for (block, xs) in q
            .chunks(dtype.type_size())
            .zip(x.chunks(dtype.block_size()))
        {
            match dtype {
                GgmlType::Q8_1 => {
                    // ggml multiplies by the unrounded f32 scale.
                    let d = xs.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
                    let sum: i32 = block[4..].iter().map(|&b| b as i8 as i32).sum();
                    let s = half::f16::from_le_bytes([block[2], block[3]]);
                    assert_eq!(
                        s,
                        half::f16::from_f32(sum as f32 * d),
                        "Q8_1 s = d * sum(q)"
                    );
                }
                GgmlType::Q8_K => {
                    let qs = &block[4..260];
                    assert!(
                        qs.iter().all(|&b| b as i8 != -128),
                        "Q8_K stays in -127..=127"
                    );
                    for g in 0..16 {
                        let sum: i32 = qs[16 * g..16 * g + 16]
                            .iter()
                            .map(|&b| b as i8 as i32)
                            .sum();
                        let stored = i16::from_le_bytes([block[260 + 2 * g], block[261 + 2 * g]]);
                        assert_eq!(sum, stored as i32, "Q8_K bsums[{g}]");
                    }
                }
                _ => {}
            }
        }
    }
}

fn activations_of(dtype: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; dtype.bytes_for(x.len()).unwrap()];
    quant::quantize(dtype, x, &mut out).unwrap();
    out
}

// ------------------------------------------------------------------------------------------------
// Size errors
// ------------------------------------------------------------------------------------------------

#[test]
fn size_mismatches_are_typed_errors() {
    let mut out = vec![0.0f32; 64];
    assert_eq!(
        quant::dequantize(GgmlType::Q4_0, &[0u8; 35], &mut out),
        Err(KernelError::ByteLength {
            dtype: GgmlType::Q4_0,
            values: 64,
            expected: 36,
            actual: 35
        })
    );
    let mut odd = vec![0.0f32; 33];
    assert!(matches!(
        quant::dequantize(GgmlType::Q8_0, &[0u8; 34], &mut odd),
        Err(KernelError::NotWholeBlocks {
            dtype: GgmlType::Q8_0,
            values: 33,
            block_size: 32
        })
    ));
    let mut bytes = vec![0u8; 10];
    assert!(matches!(
        quant::quantize(GgmlType::Q8_0, &[0.0; 32], &mut bytes),
        Err(KernelError::ByteLength { .. })
    ));
    let mut k_bytes = vec![0u8; 144];
    assert_eq!(
        quant::quantize(GgmlType::Q4_K, &[0.0; 256], &mut k_bytes),
        Err(KernelError::QuantizeUnsupported(GgmlType::Q4_K))
    );
    assert!(quant::dequantize(GgmlType::F16, &[0u8; 3], &mut [0.0; 2]).is_err());
}

#[test]
#[should_panic(expected = "vec_dot activations")]
fn vec_dot_with_wrong_activation_size_panics_with_message() {
    quant::vec_dot(GgmlType::Q8_0, &[0u8; 34], &[0u8; 33], 32);
}

#[test]
fn isa_names_round_trip() {
    for isa in [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Vnni,
        Isa::Neon,
    ] {
        assert_eq!(Isa::from_name(isa.name()), Some(isa));
    }
    assert!(quant::available_isas().contains(&quant::selected_isa()));
}

#[test]
fn gemma_isa_caps_the_selection() {
    let x86 = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni];
    assert_eq!(quant::choose_isa(&x86, None), Isa::Avx512Vnni);
    assert_eq!(quant::choose_isa(&x86, Some("avx512")), Isa::Avx512);
    assert_eq!(quant::choose_isa(&x86, Some("AVX2")), Isa::Avx2);
    assert_eq!(quant::choose_isa(&x86, Some("scalar")), Isa::Scalar);
    assert_eq!(quant::choose_isa(&x86, Some("bogus")), Isa::Avx512Vnni);
    // Asking for more than the CPU has gives the best available.
    assert_eq!(
        quant::choose_isa(&[Isa::Scalar, Isa::Avx2], Some("avx512")),
        Isa::Avx2
    );
    assert_eq!(
        quant::choose_isa(&[Isa::Scalar, Isa::Neon], Some("avx2")),
        Isa::Neon
    );
    let expected = quant::choose_isa(
        &quant::available_isas(),
        std::env::var("GEMMA_ISA").ok().as_deref(),
    );
    assert_eq!(quant::selected_isa(), expected);
}
