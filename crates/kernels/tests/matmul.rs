//! matmul against a naive per-element reference, determinism across thread counts, and shape
//! errors.

use gemma_kernels::quant;
use gemma_kernels::{dequantize_row, matmul, GgmlType, KernelError, ThreadPool, WeightMatrix};

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
}

/// Weights made by quantizing random floats where we can, else random bytes with sane scales.
fn random_matrix(dtype: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let bytes = dtype.bytes_for(rows * cols).unwrap();
    let mut out = vec![0u8; bytes];
    let x = rng.floats(rows * cols);
    if quant::quantize(dtype, &x, &mut out).is_ok() {
        return out;
    }
    for b in out.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    let scale_offsets: &[usize] = match dtype {
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
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

/// y[t][r] = vec_dot(row r, quantize(x[t])) one element at a time; for float weights, one
/// chain of fused multiply-adds over the dequantized row in column order.
fn naive(w: &WeightMatrix, x: &[f32], n_tokens: usize) -> Vec<f32> {
    let act_type = quant::vec_dot_type(w.dtype);
    let mut y = vec![0.0; n_tokens * w.rows];
    for t in 0..n_tokens {
        let xt = &x[t * w.cols..(t + 1) * w.cols];
        if act_type == GgmlType::F32 {
            let mut row = vec![0.0f32; w.cols];
            for r in 0..w.rows {
                dequantize_row(w, r, &mut row);
                y[t * w.rows + r] = row
                    .iter()
                    .zip(xt)
                    .fold(0.0, |acc, (&a, &b)| a.mul_add(b, acc));
            }
            continue;
        }
        let mut act = vec![0u8; act_type.bytes_for(w.cols).unwrap()];
        quant::quantize(act_type, xt, &mut act).unwrap();
        for r in 0..w.rows {
            y[t * w.rows + r] = quant::vec_dot(w.dtype, w.row(r), &act, w.cols);
        }
    }
    y
}

#[test]
fn matmul_matches_naive_reference_for_every_type() {
    let pool = ThreadPool::new(3);
    let mut rng = Rng(0x1234_5678);
    let mut scratch = Vec::new();
    for dtype in GgmlType::ALL {
        let cols = if dtype.block_size() == 256 { 512 } else { 96 };
        // Row counts off the 8-row groups and token counts off the 4-token chunks.
        for (rows, n_tokens) in [(37, 1), (70, 3), (1, 2), (19, 9)] {
            let data = random_matrix(dtype, rows, cols, &mut rng);
            let w = WeightMatrix::new(dtype, rows, cols, &data).unwrap();
            let x = rng.floats(n_tokens * cols);
            let mut y = vec![f32::NAN; n_tokens * rows];
            matmul(&pool, &w, &x, n_tokens, &mut y, &mut scratch);
            let expected = naive(&w, &x, n_tokens);
            for (i, (a, b)) in y.iter().zip(&expected).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{dtype} rows={rows} tokens={n_tokens} element {i}: {a} vs {b}"
                );
            }
        }
    }
}

/// One numeric path: on every available ISA and for every weight type the models use, a matmul
/// of N tokens equals N single-token matmuls bit for bit (prompt processing and decoding agree,
/// and a batched request computes what it would alone), for N on both sides of the old switch
/// to the f32 GEMM (20) and off every tile size. Quantized types also equal the ISA's one-row
/// `vec_dot` of their row and token (the decode kernel).
#[test]
fn matmul_of_n_tokens_equals_n_single_token_matmuls_on_every_isa() {
    use gemma_kernels::matmul_with;
    let pool = ThreadPool::new(2);
    let mut rng = Rng(0xbeef);
    let mut scratch = Vec::new();
    for dtype in [
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
    ] {
        let cols = match dtype.block_size() {
            256 => 512,
            1 => 301,
            _ => 96,
        };
        let rows = 45;
        let data = random_matrix(dtype, rows, cols, &mut rng);
        let w = WeightMatrix::new(dtype, rows, cols, &data).unwrap();
        let max_tokens = 37;
        let x = rng.floats(max_tokens * cols);
        let act_type = quant::vec_dot_type(dtype);
        for isa in quant::available_isas() {
            let mut alone = vec![0.0f32; max_tokens * rows];
            for t in 0..max_tokens {
                let xt = &x[t * cols..(t + 1) * cols];
                let mut y = vec![f32::NAN; rows];
                matmul_with(&pool, isa, &w, xt, 1, &mut y, &mut scratch);
                if act_type != GgmlType::F32 {
                    let mut act = vec![0u8; act_type.bytes_for(cols).unwrap()];
                    quant::quantize(act_type, xt, &mut act).unwrap();
                    for (r, got) in y.iter().enumerate() {
                        let reference = quant::vec_dot_with(isa, dtype, w.row(r), &act, cols);
                        assert_eq!(
                            got.to_bits(),
                            reference.to_bits(),
                            "{dtype} {isa:?} token {t} row {r}: {got} vs vec_dot {reference}"
                        );
                    }
                }
                alone[t * rows..(t + 1) * rows].copy_from_slice(&y);
            }
            for n_tokens in [2, 3, 4, 5, 7, 8, 13, 19, 20, 25, max_tokens] {
                let mut y = vec![f32::NAN; n_tokens * rows];
                let xs = &x[..n_tokens * cols];
                matmul_with(&pool, isa, &w, xs, n_tokens, &mut y, &mut scratch);
                for (i, (a, b)) in y.iter().zip(&alone).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{dtype} {isa:?} batch of {n_tokens}: element {i} differs from the \
                         token alone"
                    );
                }
            }
            // The ISA the process selected gives the same bits through `matmul`.
            if isa == quant::selected_isa() {
                let mut y = vec![f32::NAN; max_tokens * rows];
                matmul(&pool, &w, &x, max_tokens, &mut y, &mut scratch);
                assert!(y
                    .iter()
                    .zip(&alone)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
}

#[test]
fn matmul_is_deterministic_across_thread_counts_and_reuses_scratch() {
    let mut rng = Rng(99);
    let (rows, cols, n_tokens) = (300, 512, 4);
    let data = random_matrix(GgmlType::Q4_K, rows, cols, &mut rng);
    let w = WeightMatrix::new(GgmlType::Q4_K, rows, cols, &data).unwrap();
    let x = rng.floats(n_tokens * cols);
    let mut first = vec![0.0; n_tokens * rows];
    let mut scratch = Vec::new();
    matmul(
        &ThreadPool::new(1),
        &w,
        &x,
        n_tokens,
        &mut first,
        &mut scratch,
    );
    let capacity = scratch.capacity();
    for threads in [2, 4] {
        let pool = ThreadPool::new(threads);
        for _ in 0..3 {
            let mut y = vec![0.0; n_tokens * rows];
            matmul(&pool, &w, &x, n_tokens, &mut y, &mut scratch);
            assert!(
                y.iter()
                    .zip(&first)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{threads} threads"
            );
            assert_eq!(
                scratch.capacity(),
                capacity,
                "scratch must not grow once warmed"
            );
        }
    }
    // Also close to the float product of the dequantized weights.
    let mut row = vec![0.0; cols];
    for r in [0, 150, 299] {
        dequantize_row(&w, r, &mut row);
        let exact: f32 = row.iter().zip(&x[..cols]).map(|(a, b)| a * b).sum();
        let magnitude: f32 = row.iter().zip(&x[..cols]).map(|(a, b)| (a * b).abs()).sum();
        assert!(
            (first[r] - exact).abs() <= 0.02 * magnitude,
            "row {r}: {} vs {exact}",
            first[r]
        );
    }
}

#[test]
fn dequantize_row_matches_whole_matrix_dequantization() {
    let mut rng = Rng(5);
    let (rows, cols) = (4, 256);
    let data = random_matrix(GgmlType::Q6_K, rows, cols, &mut rng);
    let w = WeightMatrix::new(GgmlType::Q6_K, rows, cols, &data).unwrap();
    let mut all = vec![0.0; rows * cols];
    quant::dequantize(GgmlType::Q6_K, &data, &mut all).unwrap();
    let mut row = vec![0.0; cols];
    for r in 0..rows {
        dequantize_row(&w, r, &mut row);
        assert_eq!(row, all[r * cols..(r + 1) * cols]);
    }
}

#[test]
fn weight_shape_errors_are_typed() {
    let data = vec![0u8; 144 * 2];
    assert!(WeightMatrix::new(GgmlType::Q4_K, 2, 256, &data).is_ok());
    for (rows, cols) in [(3, 256), (2, 128), (1, 512 + 32)] {
        let err = WeightMatrix::new(GgmlType::Q4_K, rows, cols, &data).unwrap_err();
        assert!(
            matches!(err, KernelError::WeightShape { .. }),
            "{rows}x{cols}: {err}"
        );
    }
    // Q4_0 rows must also fit whole Q8_0 activation blocks; F32 accepts any width.
    assert!(WeightMatrix::new(GgmlType::Q4_0, 1, 48, &[0u8; 27]).is_err());
    assert!(WeightMatrix::new(GgmlType::F32, 1, 3, &[0u8; 12]).is_ok());
    assert!(WeightMatrix::new(GgmlType::F32, usize::MAX, 3, &[0u8; 12]).is_err());
}

#[test]
#[should_panic(expected = "matmul: x must hold")]
fn matmul_rejects_wrong_activation_length() {
    let data = vec![0u8; 34];
    let w = WeightMatrix::new(GgmlType::Q8_0, 1, 32, &data).unwrap();
    let mut y = vec![0.0; 1];
    matmul(
        &ThreadPool::new(1),
        &w,
        &[0.0; 31],
        1,
        &mut y,
        &mut Vec::new(),
    );
}

#[test]
#[should_panic(expected = "matmul: Q8_0 weight matrix")]
fn matmul_rejects_hand_built_malformed_matrix() {
    let data = vec![0u8; 30];
    let w = WeightMatrix {
        dtype: GgmlType::Q8_0,
        rows: 1,
        cols: 32,
        data: &data,
        layout: Default::default(),
    };
    let mut y = vec![0.0; 1];
    matmul(
        &ThreadPool::new(1),
        &w,
        &[0.0; 32],
        1,
        &mut y,
        &mut Vec::new(),
    );
}

/// The dequantize-once f32 GEMM (every token count for float weights; quantized weights only
/// when called directly): compare with an f64 product of the dequantized weights and the
/// unquantized activations, on every ISA.
#[test]
fn gemm_path_matches_dequantized_f64_reference() {
    use gemma_kernels::gemm::{gemm_f32_with, PANEL_ROWS_AVX512, TILE_TOKENS_AVX512};
    use gemma_kernels::quant::available_isas;
    let pool = ThreadPool::new(3);
    let mut rng = Rng(0xfeed);
    let mut scratch = Vec::new();
    for dtype in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        // 32-value types: 320 columns, one whole and one partial packing chunk of 256; float
        // types: a partial chunk that is not a multiple of the 8-column transposition or of a
        // 16-float vector.
        let cols = match dtype.block_size() {
            256 => 512,
            1 => 301,
            _ => 320,
        };
        // Rows and tokens that are not multiples of any panel (16 or 32 rows) or tile (6 or
        // 12 tokens) size.
        let rows = 2 * PANEL_ROWS_AVX512 + 5;
        let n_tokens = 2 * TILE_TOKENS_AVX512 + 1;
        let data = random_matrix(dtype, rows, cols, &mut rng);
        let w = WeightMatrix::new(dtype, rows, cols, &data).unwrap();
        let x = rng.floats(n_tokens * cols);
        let mut dense = vec![0.0f32; rows * cols];
        for r in 0..rows {
            dequantize_row(&w, r, &mut dense[r * cols..(r + 1) * cols]);
        }
        let expected: Vec<f64> = (0..n_tokens * rows)
            .map(|i| {
                let (t, r) = (i / rows, i % rows);
                (0..cols)
                    .map(|k| dense[r * cols + k] as f64 * x[t * cols + k] as f64)
                    .sum()
            })
            .collect();
        let check = |y: &[f32], what: &str| {
            for (i, (a, b)) in y.iter().zip(&expected).enumerate() {
                assert!(
                    (*a as f64 - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{dtype} {what} element {i}: {a} vs {b}"
                );
            }
        };
        if dtype.block_size() == 1 {
            let mut y = vec![f32::NAN; n_tokens * rows];
            matmul(&pool, &w, &x, n_tokens, &mut y, &mut scratch);
            check(&y, "matmul");
        }
        for isa in available_isas() {
            let mut y = vec![f32::NAN; n_tokens * rows];
            gemm_f32_with(&pool, isa, &w, &x, n_tokens, &mut y);
            check(&y, isa.name());
        }
    }
}

#[test]
fn shared_input_matmul_equals_separate_matmuls_bit_for_bit() {
    use gemma_kernels::matmul_shared_input;
    let mut rng = Rng(0x5eed_cafe);
    let cols = 256;
    // q/k/v-like (one activation type, uneven row counts), gate/up-like, and a mix of
    // activation types (Q8_0 and Q8_K), which takes the one-matrix-at-a-time path.
    let sets: [&[(GgmlType, usize)]; 4] = [
        &[
            (GgmlType::Q5_0, 72),
            (GgmlType::Q5_0, 24),
            (GgmlType::Q8_0, 13),
        ],
        &[(GgmlType::Q5_0, 200), (GgmlType::Q4_0, 200)],
        &[
            (GgmlType::Q4_K, 40),
            (GgmlType::Q5_0, 9),
            (GgmlType::Q6_K, 8),
        ],
        // More matrices than one job takes: one at a time.
        &[(GgmlType::Q8_0, 8); 5],
    ];
    for set in sets {
        let data: Vec<Vec<u8>> = set
            .iter()
            .map(|&(dtype, rows)| random_matrix(dtype, rows, cols, &mut rng))
            .collect();
        let ws: Vec<WeightMatrix> = set
            .iter()
            .zip(&data)
            .map(|(&(dtype, rows), d)| WeightMatrix::new(dtype, rows, cols, d).unwrap())
            .collect();
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for n_tokens in [1, 2, 5, 32] {
                let x = rng.floats(n_tokens * cols);
                let mut scratch = Vec::new();
                let separate: Vec<Vec<f32>> = ws
                    .iter()
                    .map(|w| {
                        let mut y = vec![0.0; n_tokens * w.rows];
                        matmul(&pool, w, &x, n_tokens, &mut y, &mut scratch);
                        y
                    })
                    .collect();
                let mut outs: Vec<Vec<f32>> = ws
                    .iter()
                    .map(|w| vec![f32::NAN; n_tokens * w.rows])
                    .collect();
                let mut ys: Vec<&mut [f32]> = outs.iter_mut().map(|y| &mut y[..]).collect();
                matmul_shared_input(&pool, &ws, &x, n_tokens, &mut ys, &mut scratch);
                for (i, (a, b)) in separate.iter().zip(&outs).enumerate() {
                    assert!(
                        a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
                        "{set:?} matrix {i}, {threads} threads, {n_tokens} tokens"
                    );
                }
            }
        }
    }
}

/// The interleaved layout changes how weights are read, never the numbers: on every ISA (the
/// interleaved kernels, the int8 GEMM over de-interleaved panels, and the one-row fallback
/// without SIMD), alone or batched with shared inputs, every output equals the row-major
/// matrix's bit for bit; rows read back unchanged for embedding lookups.
#[test]
fn interleaved_matrices_compute_the_same_bits_as_row_major_ones() {
    use gemma_kernels::quant::interleave;
    use gemma_kernels::{matmul_shared_input, matmul_with, RowLayout};
    let pool = ThreadPool::new(2);
    let mut rng = Rng(0x1a7e_12ea);
    let mut scratch = Vec::new();
    for dtype in [
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let (rows, cols) = (
            56,
            dtype.block_size() * if dtype.block_size() == 256 { 2 } else { 5 },
        );
        let mut data = random_matrix(dtype, rows, cols, &mut rng);
        if dtype == GgmlType::Q8_0 {
            // -128 weights (not produced by the quantizer) and +127 next to each other.
            let row_bytes = dtype.bytes_for(cols).unwrap();
            for r in 0..rows {
                data[r * row_bytes + 2 + r % 32] = 0x80;
                data[r * row_bytes + 3 + r % 30] = 0x7f;
            }
        }
        let w = WeightMatrix::new(dtype, rows, cols, &data).unwrap();
        let mut packed = data.clone();
        interleave::interleave_in_place(dtype, &mut packed, cols, &mut Vec::new());
        let wi = WeightMatrix {
            data: &packed,
            layout: RowLayout::Interleaved,
            ..w
        };
        wi.validate().unwrap();
        // Past the int8 GEMM's switch for interleaved matrices (which copies panels back).
        let max_tokens = gemma_kernels::matmul::INT8_GEMM_MIN_TOKENS_INTERLEAVED + 1;
        let mut x = rng.floats(max_tokens * cols);
        // Activation blocks at the extremes of the Q8_0 range.
        for v in x[..32].iter_mut() {
            *v = if v.is_sign_negative() { -1.0 } else { 1.0 };
        }
        for isa in quant::available_isas() {
            for n_tokens in [1, 2, 3, 4, 5, 7, 8, 9, 19, max_tokens - 1, max_tokens] {
                let xs = &x[..n_tokens * cols];
                let mut want = vec![f32::NAN; n_tokens * rows];
                let mut got = vec![f32::NAN; n_tokens * rows];
                matmul_with(&pool, isa, &w, xs, n_tokens, &mut want, &mut scratch);
                matmul_with(&pool, isa, &wi, xs, n_tokens, &mut got, &mut scratch);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{dtype} {isa:?} {n_tokens} tokens: element {i}: interleaved {a}, \
                         row-major {b}"
                    );
                }
            }
        }
        // With a row-major matrix of another type in the same shared-input job.
        let other = random_matrix(GgmlType::Q5_0, 24, cols, &mut rng);
        let wo = WeightMatrix::new(GgmlType::Q5_0, 24, cols, &other).unwrap();
        for n_tokens in [1, 3] {
            let xs = &x[..n_tokens * cols];
            let mut want = vec![0.0; n_tokens * rows];
            matmul(&pool, &w, xs, n_tokens, &mut want, &mut scratch);
            let mut got = vec![f32::NAN; n_tokens * rows];
            let mut got_other = vec![f32::NAN; n_tokens * 24];
            matmul_shared_input(
                &pool,
                &[wi, wo],
                xs,
                n_tokens,
                &mut [&mut got, &mut got_other],
                &mut scratch,
            );
            assert!(got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
        for r in [0, 7, 8, rows - 1] {
            dequantize_row(&w, r, &mut a);
            dequantize_row(&wi, r, &mut b);
            assert_eq!(a, b, "{dtype} row {r}");
        }
    }
}

#[test]
fn an_interleaved_layout_needs_whole_groups_of_a_supported_type() {
    use gemma_kernels::RowLayout;
    let data = vec![0u8; 12 * 18];
    let w = WeightMatrix {
        dtype: GgmlType::Q4_0,
        rows: 12,
        cols: 32,
        data: &data,
        layout: RowLayout::Interleaved,
    };
    assert!(w.validate().is_err(), "12 rows are not whole groups of 8");
}
