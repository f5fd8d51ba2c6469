//! Products with mostly-zero activations (Gemma 3n's activation sparsity): `matmul_rows` gives
//! exactly `matmul`'s bits on the rows it computes, and `SparseInputMatrix` matches a float64
//! product, with the same bits whatever the batch, thread count or ISA.

use gemma_kernels::matmul::{matmul_rows_with, matmul_with};
use gemma_kernels::quant::{self, interleave};
use gemma_kernels::sparse::{SparseInputMatrix, SparseScratch};
use gemma_kernels::{dequantize_row, GgmlType, RowLayout, ThreadPool, WeightMatrix};

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn float(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.float()).collect()
    }
    /// Values of which about `density` are non-zero (as after Gemma 3n's Gaussian top-k).
    fn sparse(&mut self, n: usize, density: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let keep = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                if keep < density {
                    self.float().abs() * 3.0
                } else {
                    0.0
                }
            })
            .collect()
    }
}

fn quantized(dtype: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = vec![0u8; dtype.bytes_for(rows * cols).unwrap()];
    let x = rng.floats(rows * cols);
    if dtype == GgmlType::F32 {
        out.iter_mut()
            .zip(x.iter().flat_map(|v| v.to_le_bytes()))
            .for_each(|(o, b)| *o = b);
        return out;
    }
    if dtype == GgmlType::BF16 {
        out.iter_mut()
            .zip(
                x.iter()
                    .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()),
            )
            .for_each(|(o, b)| *o = b);
        return out;
    }
    if quant::quantize(dtype, &x, &mut out).is_ok() {
        return out;
    }
    // K-quants (no quantizer here): random bytes with sane super-block scales.
    for b in out.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    let scale_offsets: &[usize] = match dtype {
        GgmlType::Q4_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        other => panic!("no random generator for {other}"),
    };
    for block in out.chunks_exact_mut(dtype.type_size()) {
        for &off in scale_offsets {
            let d = half::f16::from_f32(0.001 + 0.01 * rng.float().abs());
            block[off..off + 2].copy_from_slice(&d.to_bits().to_le_bytes());
        }
    }
    out
}

fn dense(w: &WeightMatrix) -> Vec<f32> {
    let mut out = vec![0.0; w.rows * w.cols];
    for (r, row) in out.chunks_exact_mut(w.cols).enumerate() {
        dequantize_row(w, r, row);
    }
    out
}

#[test]
fn matmul_rows_gives_matmuls_bits_on_the_listed_rows_and_zero_elsewhere() {
    let pool = ThreadPool::new(2);
    let mut rng = Rng(0x5a_17e5);
    let mut scratch = Vec::new();
    for dtype in [
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::F32,
    ] {
        let (rows, cols) = (72, 512);
        let data = quantized(dtype, rows, cols, &mut rng);
        let w = WeightMatrix::new(dtype, rows, cols, &data).unwrap();
        let mut packed = data.clone();
        let mut layouts = vec![w];
        if interleave::fits(dtype, rows, cols) {
            interleave::interleave_in_place(dtype, &mut packed, cols, &mut Vec::new());
            layouts.push(WeightMatrix {
                data: &packed,
                layout: RowLayout::Interleaved,
                ..w
            });
        }
        let x = rng.floats(9 * cols);
        let lists: [Vec<u32>; 4] = [
            vec![],
            vec![0, 5, 6, 17, 40, 71],
            (0..rows as u32).step_by(3).collect(),
            (0..rows as u32).collect(),
        ];
        for isa in quant::available_isas() {
            for &w in &layouts {
                for n_tokens in [1, 2, 5, 9] {
                    let xs = &x[..n_tokens * cols];
                    let mut want = vec![f32::NAN; n_tokens * rows];
                    matmul_with(&pool, isa, &w, xs, n_tokens, &mut want, &mut scratch);
                    for list in &lists {
                        let mut got = vec![f32::NAN; n_tokens * rows];
                        matmul_rows_with(
                            &pool,
                            isa,
                            &w,
                            xs,
                            n_tokens,
                            list,
                            &mut got,
                            &mut scratch,
                        );
                        for t in 0..n_tokens {
                            for r in 0..rows {
                                let (g, e) = (got[t * rows + r], want[t * rows + r]);
                                let listed = list.contains(&(r as u32));
                                let group_mate = w.layout == RowLayout::Interleaved
                                    && list.iter().any(|&l| l as usize / 8 == r / 8);
                                let ok = if listed || dtype == GgmlType::F32 {
                                    g.to_bits() == e.to_bits()
                                } else if group_mate {
                                    g.to_bits() == e.to_bits() || g == 0.0
                                } else {
                                    g.to_bits() == 0
                                };
                                assert!(
                                    ok,
                                    "{dtype} {:?} {isa:?} {n_tokens} tokens, {} rows listed: \
                                     row {r} token {t}: {g}, matmul {e}",
                                    w.layout,
                                    list.len()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
#[should_panic(expected = "ascending")]
fn matmul_rows_rejects_an_unsorted_list() {
    let data = vec![0u8; GgmlType::Q8_0.bytes_for(16 * 32).unwrap()];
    let w = WeightMatrix::new(GgmlType::Q8_0, 16, 32, &data).unwrap();
    let mut y = vec![0.0; 16];
    gemma_kernels::matmul_rows(
        &ThreadPool::new(1),
        &w,
        &[0.5; 32],
        1,
        &[3, 2],
        &mut y,
        &mut Vec::new(),
    );
}

/// Σ_j W[r, j] x[j] in f64 over the stored (dequantized) weights.
fn reference(w: &[f32], outputs: usize, inputs: usize, x: &[f32]) -> Vec<f64> {
    (0..outputs)
        .map(|r| {
            (0..inputs)
                .map(|j| w[r * inputs + j] as f64 * x[j] as f64)
                .sum()
        })
        .collect()
}

#[test]
fn sparse_input_matmul_matches_a_float64_product_of_the_stored_weights() {
    let pool = ThreadPool::new(3);
    let mut rng = Rng(0xd0_e5e1);
    let mut scratch = SparseScratch::default();
    // (type, outputs, inputs, bound on |error| / Σ_j |x_j| · block max of |W[.., j]|): 8-bit
    // requantization of quantized weights costs at most half a step of 1/127 of a block's
    // largest weight; float weights (f32, bf16) are kept exact (f32 rounding only).
    for (dtype, outputs, inputs, tol) in [
        (GgmlType::Q4_0, 96, 320, 1.0 / 254.0),
        (GgmlType::Q4_K, 64, 512, 1.0 / 254.0),
        (GgmlType::Q6_K, 64, 256, 1.0 / 254.0),
        (GgmlType::Q8_0, 40, 128, 1.0 / 254.0),
        (GgmlType::F32, 48, 96, 1e-6),
        (GgmlType::BF16, 32, 64, 1e-6),
    ] {
        let data = quantized(dtype, outputs, inputs, &mut rng);
        let w = WeightMatrix::new(dtype, outputs, inputs, &data).unwrap();
        let stored = dense(&w);
        let m = SparseInputMatrix::from_weights(&w);
        assert_eq!((m.outputs(), m.inputs()), (outputs, inputs));
        let n_tokens = 6;
        let mut x = rng.sparse(n_tokens * inputs, 0.06);
        x[inputs..2 * inputs].fill(0.0); // a token with nothing kept
        x[2 * inputs..3 * inputs].copy_from_slice(&rng.floats(inputs)); // and a dense one
        let mut y = vec![f32::NAN; n_tokens * outputs];
        m.matmul(&pool, &x, inputs, n_tokens, &mut y, &mut scratch);
        for t in 0..n_tokens {
            let xt = &x[t * inputs..(t + 1) * inputs];
            let want = reference(&stored, outputs, inputs, xt);
            for r in 0..outputs {
                // Each weight may move by `tol` of the largest in its 32-output block.
                let block = r / 32 * 32..(r / 32 * 32 + 32).min(outputs);
                let magnitude: f64 = (0..inputs)
                    .map(|j| {
                        let amax = block
                            .clone()
                            .map(|b| stored[b * inputs + j].abs())
                            .fold(0.0f32, f32::max);
                        (amax as f64 * xt[j] as f64).abs()
                    })
                    .sum();
                let err = (y[t * outputs + r] as f64 - want[r]).abs();
                assert!(
                    err <= tol * magnitude + 1e-5 * want[r].abs() + 1e-6,
                    "{dtype} token {t} output {r}: {} vs {} (magnitude {magnitude})",
                    y[t * outputs + r],
                    want[r]
                );
            }
        }
        assert!(y[outputs..2 * outputs].iter().all(|v| v.to_bits() == 0));
    }
}

#[test]
fn sparse_input_matmul_has_the_same_bits_alone_batched_on_any_isa_and_thread_count() {
    let mut rng = Rng(0xb175);
    let (outputs, inputs, n_tokens) = (256, 1024, 7);
    for dtype in [GgmlType::Q4_0, GgmlType::F32] {
        let data = quantized(dtype, outputs, inputs, &mut rng);
        let w = WeightMatrix::new(dtype, outputs, inputs, &data).unwrap();
        let m = SparseInputMatrix::from_weights(&w);
        let x = rng.sparse(n_tokens * inputs, 0.05);
        let mut scratch = SparseScratch::default();
        let mut want = vec![0.0; n_tokens * outputs];
        m.matmul_with(
            &ThreadPool::new(1),
            quant::Isa::Scalar,
            &x,
            inputs,
            n_tokens,
            &mut want,
            &mut scratch,
        );
        for isa in quant::available_isas() {
            for threads in [1, 2, 5] {
                let pool = ThreadPool::new(threads);
                let mut batched = vec![f32::NAN; n_tokens * outputs];
                m.matmul_with(&pool, isa, &x, inputs, n_tokens, &mut batched, &mut scratch);
                let mut alone = vec![f32::NAN; outputs];
                for t in 0..n_tokens {
                    let xt = &x[t * inputs..(t + 1) * inputs];
                    m.matmul_with(&pool, isa, xt, inputs, 1, &mut alone, &mut scratch);
                    for r in 0..outputs {
                        let e = want[t * outputs + r].to_bits();
                        assert_eq!(batched[t * outputs + r].to_bits(), e, "{dtype} {isa:?}");
                        assert_eq!(alone[r].to_bits(), e, "{dtype} {isa:?} token {t} alone");
                    }
                }
            }
        }
    }
}

#[test]
fn a_narrower_activation_equals_the_zero_padded_one_and_nan_reaches_the_output() {
    let pool = ThreadPool::new(2);
    let mut rng = Rng(0x9a_dded);
    let (outputs, inputs, width) = (64, 256, 160);
    let data = quantized(GgmlType::Q4_0, outputs, inputs, &mut rng);
    let w = WeightMatrix::new(GgmlType::Q4_0, outputs, inputs, &data).unwrap();
    let m = SparseInputMatrix::from_weights(&w);
    let mut scratch = SparseScratch::default();
    let narrow = rng.sparse(2 * width, 0.1);
    let mut padded = vec![0.0; 2 * inputs];
    for t in 0..2 {
        padded[t * inputs..t * inputs + width].copy_from_slice(&narrow[t * width..(t + 1) * width]);
    }
    let (mut a, mut b) = (vec![0.0; 2 * outputs], vec![0.0; 2 * outputs]);
    m.matmul(&pool, &narrow, width, 2, &mut a, &mut scratch);
    m.matmul(&pool, &padded, inputs, 2, &mut b, &mut scratch);
    assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));

    let mut x = vec![0.0; inputs];
    x[17] = f32::NAN;
    m.matmul(&pool, &x, inputs, 1, &mut a[..outputs], &mut scratch);
    assert!(a[..outputs].iter().all(|v| v.is_nan()));
}

#[test]
#[should_panic(expected = "inputs given")]
fn a_wider_activation_than_the_matrix_is_rejected() {
    let data = vec![0u8; GgmlType::Q8_0.bytes_for(32 * 32).unwrap()];
    let w = WeightMatrix::new(GgmlType::Q8_0, 32, 32, &data).unwrap();
    let m = SparseInputMatrix::from_weights(&w);
    let mut y = vec![0.0; 32];
    m.matmul(
        &ThreadPool::new(1),
        &[0.0; 64],
        64,
        1,
        &mut y,
        &mut SparseScratch::default(),
    );
}
