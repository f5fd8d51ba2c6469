//! The f32 GEMM: tokens against one weight matrix with unquantized activations. [`crate::matmul`]
//! uses it for float weights (F32, F16, BF16) at every token count, since each output is the
//! same chain of fused multiply-adds over `k` whatever the tile, panel or ISA; quantized weights
//! take the quantized-activation kernels at every token count instead (one numeric path for
//! prompt processing and decoding), and reach this GEMM only when it is called directly.
//!
//! With many tokens the cost of a quantized dot product is dominated by unpacking the weight
//! block again for every token. Here each task dequantizes a panel of [`PANEL_ROWS`] weight rows
//! once into f32, stores it k-major (`panel[k * PANEL_ROWS + i]` = row `i`, column `k`), and then
//! sweeps every token over it with a register-tiled FMA kernel: [`TILE_TOKENS`] tokens × 16 rows
//! of accumulators, one broadcast activation and two weight vectors per step. Packing uses the
//! SIMD dequantizers (bit-identical to the scalar ones) on column chunks that stay in L1, an
//! in-register 8 × 8 transpose, and prefetches the next panel's weights. Activations stay in
//! f32 (no quantization), so results are at least as close to a float reference as the
//! quantized-activation path used for decoding.

use std::cell::RefCell;

use crate::matmul::WeightMatrix;
use crate::pool::ThreadPool;
use crate::quant::{self, Isa};

/// Weight rows dequantized together by the AVX2 and scalar tiles (two AVX2 vectors of f32).
pub const PANEL_ROWS: usize = 16;
/// Tokens processed together by the AVX2 and scalar register tiles.
pub const TILE_TOKENS: usize = 6;
/// Weight rows dequantized together by the AVX-512 tile (two AVX-512 vectors of f32).
pub const PANEL_ROWS_AVX512: usize = 32;
/// Tokens processed together by the AVX-512 tile (24 accumulators of the 32 zmm registers).
pub const TILE_TOKENS_AVX512: usize = 12;

thread_local! {
    /// Per-thread buffers: dequantized rows (row-major) and the k-major panel.
    static PANEL_BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

struct OutPtr(*mut f32);
// SAFETY: every task writes the outputs of its own row panel only (disjoint elements of `y`).
unsafe impl Sync for OutPtr {}

/// The tile kernel (and panel shape) a GEMM runs with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    /// 16-row panels, 6-token tiles, plain Rust.
    Scalar,
    /// 16-row panels, 6-token tiles of AVX2 FMAs.
    Avx2,
    /// 32-row panels, 12-token tiles of AVX-512 FMAs.
    Avx512,
}

impl Kernel {
    fn for_isa(isa: Isa) -> Kernel {
        if !cfg!(target_arch = "x86_64") {
            return Kernel::Scalar;
        }
        match isa {
            Isa::Avx512 | Isa::Avx512Vnni => Kernel::Avx512,
            Isa::Avx2 => Kernel::Avx2,
            Isa::Scalar | Isa::Neon => Kernel::Scalar,
        }
    }

    /// Whether AVX2 (dequantizers, transposition, prefetch) may be used for packing.
    fn simd(self) -> bool {
        self != Kernel::Scalar
    }
}

/// `y[t * rows + r] = Σ_k w[r, k] · x[t * cols + k]` with f32 activations, split across `pool`
/// by panels of weight rows ([`PANEL_ROWS`], or [`PANEL_ROWS_AVX512`] with AVX-512). Uses the
/// AVX2 or AVX-512 tile when the selected ISA allows it.
///
/// # Panics
/// If `w` is malformed or `x`/`y` do not hold `n_tokens` rows of `cols`/`rows` values.
#[track_caller]
pub fn gemm_f32(pool: &ThreadPool, w: &WeightMatrix, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    gemm_f32_with(pool, quant::selected_isa(), w, x, n_tokens, y);
}

/// [`gemm_f32`] with an explicit ISA for its tile kernel (tests compare SIMD with scalar).
///
/// # Panics
/// As [`gemm_f32`], and when `isa` is not available on this CPU.
#[track_caller]
pub fn gemm_f32_with(
    pool: &ThreadPool,
    isa: Isa,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    if let Err(e) = w.validate() {
        panic!("gemm_f32: {e}");
    }
    assert!(isa.is_available(), "ISA {isa:?} is not available");
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(
        x.len(),
        n_tokens * cols,
        "gemm_f32: x must hold {n_tokens} x {cols}"
    );
    assert_eq!(
        y.len(),
        n_tokens * rows,
        "gemm_f32: y must hold {n_tokens} x {rows}"
    );
    if rows == 0 || n_tokens == 0 {
        return;
    }
    match Kernel::for_isa(isa) {
        Kernel::Avx512 => {
            run::<PANEL_ROWS_AVX512, TILE_TOKENS_AVX512>(pool, Kernel::Avx512, w, x, n_tokens, y)
        }
        kernel => run::<PANEL_ROWS, TILE_TOKENS>(pool, kernel, w, x, n_tokens, y),
    }
}

/// The GEMM with panels of `P` rows and tiles of up to `T` tokens (sizes checked by the caller).
fn run<const P: usize, const T: usize>(
    pool: &ThreadPool,
    kernel: Kernel,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    let (rows, cols) = (w.rows, w.cols);
    let out = OutPtr(y.as_mut_ptr());
    let out = &out;
    pool.run(rows.div_ceil(P), &|task| {
        PANEL_BUFFERS.with(|buffers| {
            let (rows_buf, panel_buf) = &mut *buffers.borrow_mut();
            let r0 = task * P;
            let n_rows = P.min(rows - r0);
            let panel = pack_panel::<P>(kernel.simd(), w, r0, n_rows, rows_buf, panel_buf);
            // Tiles of near-equal size (32 tokens: 6,6,5,5,5,5 rather than 6,6,6,6,6,2): a
            // narrow tile does fewer multiply-adds per weight load. Each output sums over k in
            // the same order whatever its tile, so the tiling does not change results.
            let n_tiles = n_tokens.div_ceil(T);
            let mut t0 = 0;
            for tile_index in 0..n_tiles {
                let nt = (n_tokens - t0).div_ceil(n_tiles - tile_index);
                let xs = &x[t0 * cols..(t0 + nt) * cols];
                let mut acc = [[0.0f32; P]; T];
                tile(kernel, panel, xs, cols, nt, &mut acc);
                for (t, acc_t) in acc.iter().enumerate().take(nt) {
                    for (i, &v) in acc_t.iter().enumerate().take(n_rows) {
                        // SAFETY: (t0 + t, r0 + i) is in bounds and owned by this panel's task.
                        unsafe { *out.0.add((t0 + t) * rows + r0 + i) = v };
                    }
                }
                t0 += nt;
            }
        });
    });
}

/// Columns dequantized at a time: 16 rows of them (16 KiB; 32 KiB for 32-row panels) stay in
/// L1 until transposed.
const PACK_COLUMNS: usize = 256;

/// Dequantizes rows `r0..r0 + n_rows` of `w` and stores them k-major (`P` values per column)
/// in a 64-byte-aligned slice of `panel_buf`, which it returns, padding missing rows with
/// zeros. Works in column chunks of [`PACK_COLUMNS`] (a multiple of every block size) so the
/// row-major staging buffer stays in L1.
fn pack_panel<'a, const P: usize>(
    simd: bool,
    w: &WeightMatrix,
    r0: usize,
    n_rows: usize,
    rows_buf: &mut Vec<f32>,
    panel_buf: &'a mut Vec<f32>,
) -> &'a mut [f32] {
    let cols = w.cols;
    let block = w.dtype.block_size();
    let block_bytes = w.dtype.type_size();
    rows_buf.resize(P * PACK_COLUMNS.min(cols), 0.0);
    // Aligned so that no vector load of a panel column straddles two cache lines.
    panel_buf.resize(P * cols + 15, 0.0);
    let offset = panel_buf.as_ptr().align_offset(64).min(15);
    let panel = &mut panel_buf[offset..offset + P * cols];
    #[cfg(target_arch = "x86_64")]
    if simd {
        // The weights come from memory once per forward pass, and the panel's rows read in
        // chunks defeat the hardware prefetcher: fetch the next panel (the rows that follow)
        // into L2 while this one is packed and multiplied.
        let row_bytes = w.row_bytes();
        let next = &w.data[(r0 + n_rows) * row_bytes..];
        let next = &next[..next.len().min(P * row_bytes)];
        // SAFETY: AVX2 (and so SSE) availability was checked by the caller.
        unsafe { avx2::prefetch_l2(next) };
    }
    for c0 in (0..cols).step_by(PACK_COLUMNS) {
        let width = PACK_COLUMNS.min(cols - c0);
        let (b0, b1) = (c0 / block * block_bytes, (c0 + width) / block * block_bytes);
        for i in 0..P {
            let dst = &mut rows_buf[i * width..(i + 1) * width];
            if i < n_rows {
                let src = &w.row(r0 + i)[b0..b1];
                quant::dequantize_unchecked(simd, w.dtype, src, dst);
            } else {
                dst.fill(0.0);
            }
        }
        #[cfg(target_arch = "x86_64")]
        let done = if simd {
            // SAFETY: AVX2 availability was checked by the caller; the buffers hold P rows of
            // `width` values and P x cols values.
            unsafe { avx2::transpose_to_panel::<P>(rows_buf, width, &mut panel[c0 * P..]) };
            width - width % 8
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = 0;
        for k in done..width {
            for i in 0..P {
                panel[(c0 + k) * P + i] = rows_buf[i * width + k];
            }
        }
    }
    panel
}

/// `acc[t][i] = Σ_k panel[k * P + i] · xs[t * cols + k]` for `t < nt`.
fn tile<const P: usize, const T: usize>(
    kernel: Kernel,
    panel: &[f32],
    xs: &[f32],
    cols: usize,
    nt: usize,
    acc: &mut [[f32; P]; T],
) {
    assert!(panel.len() >= cols * P && xs.len() >= nt * cols && nt <= T);
    #[cfg(target_arch = "x86_64")]
    match kernel {
        Kernel::Avx2 => {
            assert!(P == PANEL_ROWS && T == TILE_TOKENS);
            let acc = acc.as_flattened_mut();
            // SAFETY: AVX2/FMA availability was checked by the caller (selected or asserted
            // ISA); sizes asserted above.
            unsafe {
                match nt {
                    1 => avx2::tile::<1>(panel, xs, cols, acc),
                    2 => avx2::tile::<2>(panel, xs, cols, acc),
                    3 => avx2::tile::<3>(panel, xs, cols, acc),
                    4 => avx2::tile::<4>(panel, xs, cols, acc),
                    5 => avx2::tile::<5>(panel, xs, cols, acc),
                    _ => avx2::tile::<6>(panel, xs, cols, acc),
                }
            }
            return;
        }
        Kernel::Avx512 => {
            assert!(P == PANEL_ROWS_AVX512 && T == TILE_TOKENS_AVX512);
            let acc = acc.as_flattened_mut();
            // SAFETY: AVX-512F availability was checked by the caller (selected or asserted
            // ISA); sizes asserted above.
            unsafe {
                match nt {
                    1 => avx512::tile::<1>(panel, xs, cols, acc),
                    2 => avx512::tile::<2>(panel, xs, cols, acc),
                    3 => avx512::tile::<3>(panel, xs, cols, acc),
                    4 => avx512::tile::<4>(panel, xs, cols, acc),
                    5 => avx512::tile::<5>(panel, xs, cols, acc),
                    6 => avx512::tile::<6>(panel, xs, cols, acc),
                    7 => avx512::tile::<7>(panel, xs, cols, acc),
                    8 => avx512::tile::<8>(panel, xs, cols, acc),
                    9 => avx512::tile::<9>(panel, xs, cols, acc),
                    10 => avx512::tile::<10>(panel, xs, cols, acc),
                    11 => avx512::tile::<11>(panel, xs, cols, acc),
                    _ => avx512::tile::<12>(panel, xs, cols, acc),
                }
            }
            return;
        }
        Kernel::Scalar => {}
    }
    let _ = kernel;
    tile_scalar(panel, xs, cols, nt, acc);
}

/// Scalar reference of the tile kernels.
pub(crate) fn tile_scalar<const P: usize, const T: usize>(
    panel: &[f32],
    xs: &[f32],
    cols: usize,
    nt: usize,
    acc: &mut [[f32; P]; T],
) {
    for (t, acc_t) in acc.iter_mut().enumerate().take(nt) {
        let xt = &xs[t * cols..(t + 1) * cols];
        for (k, &xv) in xt.iter().enumerate() {
            let column = &panel[k * P..(k + 1) * P];
            for (a, &wv) in acc_t.iter_mut().zip(column) {
                *a = wv.mul_add(xv, *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{PANEL_ROWS, TILE_TOKENS};

    /// Prefetches every cache line of `bytes` into L2.
    ///
    /// # Safety
    /// Needs SSE (always there with AVX2).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn prefetch_l2(bytes: &[u8]) {
        for line in bytes.chunks(64) {
            _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast());
        }
    }

    /// `panel[k * P + i] = rows[i * cols + k]` for the columns `k < cols - cols % 8`, by 8 x 8
    /// blocks transposed in registers (`P` a multiple of 8).
    ///
    /// # Safety
    /// Needs AVX2 (the sizes are asserted).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transpose_to_panel<const P: usize>(
        rows: &[f32],
        cols: usize,
        panel: &mut [f32],
    ) {
        assert!(P.is_multiple_of(8) && rows.len() >= P * cols && panel.len() >= P * cols);
        for i0 in (0..P).step_by(8) {
            for k0 in (0..cols - cols % 8).step_by(8) {
                let r: [__m256; 8] = std::array::from_fn(|i| {
                    _mm256_loadu_ps(rows.as_ptr().add((i0 + i) * cols + k0))
                });
                for (j, column) in transpose8(r).into_iter().enumerate() {
                    _mm256_storeu_ps(panel.as_mut_ptr().add((k0 + j) * P + i0), column);
                }
            }
        }
    }

    /// Rows to columns of an 8 x 8 block of f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// `NT` tokens × 16 rows of accumulators in registers (2·NT ymm), FMA per column `k`.
    ///
    /// # Safety
    /// Needs AVX2 + FMA; `panel` holds `cols * 16` values, `xs` `NT * cols` and `acc` `NT * 16`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const NT: usize>(
        panel: &[f32],
        xs: &[f32],
        cols: usize,
        acc: &mut [f32],
    ) {
        assert!(NT <= TILE_TOKENS && acc.len() >= NT * PANEL_ROWS);
        let mut sums = [[_mm256_setzero_ps(); 2]; NT];
        let p = panel.as_ptr();
        let x = xs.as_ptr();
        for k in 0..cols {
            let w0 = _mm256_loadu_ps(p.add(k * PANEL_ROWS));
            let w1 = _mm256_loadu_ps(p.add(k * PANEL_ROWS + 8));
            for (t, s) in sums.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*x.add(t * cols + k));
                s[0] = _mm256_fmadd_ps(w0, b, s[0]);
                s[1] = _mm256_fmadd_ps(w1, b, s[1]);
            }
        }
        for (s, a) in sums.iter().zip(acc.chunks_exact_mut(PANEL_ROWS)) {
            _mm256_storeu_ps(a.as_mut_ptr(), s[0]);
            _mm256_storeu_ps(a.as_mut_ptr().add(8), s[1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{PANEL_ROWS_AVX512, TILE_TOKENS_AVX512};

    /// `NT` tokens × 32 rows of accumulators in registers (2·NT zmm, 24 at most), FMA per
    /// column `k` with the activation broadcast from memory.
    ///
    /// # Safety
    /// Needs AVX-512F; `panel` holds `cols * 32` values, `xs` `NT * cols` and `acc` `NT * 32`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn tile<const NT: usize>(
        panel: &[f32],
        xs: &[f32],
        cols: usize,
        acc: &mut [f32],
    ) {
        assert!(
            NT <= TILE_TOKENS_AVX512
                && panel.len() >= cols * PANEL_ROWS_AVX512
                && xs.len() >= NT * cols
                && acc.len() >= NT * PANEL_ROWS_AVX512
        );
        let mut sums = [[_mm512_setzero_ps(); 2]; NT];
        let p = panel.as_ptr();
        let x = xs.as_ptr();
        for k in 0..cols {
            let w0 = _mm512_loadu_ps(p.add(k * PANEL_ROWS_AVX512));
            let w1 = _mm512_loadu_ps(p.add(k * PANEL_ROWS_AVX512 + 16));
            for (t, s) in sums.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*x.add(t * cols + k));
                s[0] = _mm512_fmadd_ps(w0, b, s[0]);
                s[1] = _mm512_fmadd_ps(w1, b, s[1]);
            }
        }
        for (s, a) in sums.iter().zip(acc.chunks_exact_mut(PANEL_ROWS_AVX512)) {
            _mm512_storeu_ps(a.as_mut_ptr(), s[0]);
            _mm512_storeu_ps(a.as_mut_ptr().add(16), s[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma_formats::GgmlType;

    fn floats(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn simd_panel_packing_matches_scalar() {
        if !Isa::Avx2.is_available() {
            return;
        }
        let cols = 96;
        let data = quantized_rows(GgmlType::Q8_0, 37, cols);
        let w = WeightMatrix::new(GgmlType::Q8_0, 37, cols, &data).unwrap();
        for (r0, n_rows) in [(0, PANEL_ROWS), (16, 5)] {
            check_packing::<PANEL_ROWS>(&w, r0, n_rows);
        }
        for (r0, n_rows) in [(0, PANEL_ROWS_AVX512), (32, 5)] {
            check_packing::<PANEL_ROWS_AVX512>(&w, r0, n_rows);
        }
    }

    fn check_packing<const P: usize>(w: &WeightMatrix, r0: usize, n_rows: usize) {
        let cols = w.cols;
        let (mut rows_a, mut panel_a) = (Vec::new(), Vec::new());
        let (mut rows_b, mut panel_b) = (Vec::new(), Vec::new());
        let a = pack_panel::<P>(false, w, r0, n_rows, &mut rows_a, &mut panel_a);
        let b = pack_panel::<P>(true, w, r0, n_rows, &mut rows_b, &mut panel_b);
        assert_eq!(a, b, "P = {P}, rows {r0}..+{n_rows}");
        assert_eq!(a.len(), P * cols);
        assert_eq!(b.as_ptr() as usize % 64, 0);
        assert_eq!(a[P + 1], rows_a[cols + 1]);
        // Padding rows are zero.
        assert!((0..cols).all(|k| a[k * P + n_rows..(k + 1) * P].iter().all(|&v| v == 0.0)));
    }

    fn quantized_rows(dtype: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
        let x = floats(rows * cols, 3);
        let mut out = vec![0u8; dtype.bytes_for(rows * cols).unwrap()];
        quant::quantize(dtype, &x, &mut out).unwrap();
        out
    }

    fn check_tile<const P: usize, const T: usize>(kernel: Kernel) {
        for cols in [1, 7, 40, 77] {
            let panel = floats(cols * P, 1);
            let xs = floats(T * cols, 2);
            for nt in 1..=T {
                let mut expected = [[0.0; P]; T];
                let mut got = [[0.0; P]; T];
                tile_scalar(&panel, &xs, cols, nt, &mut expected);
                tile(kernel, &panel, &xs, cols, nt, &mut got);
                // Both use fused multiply-adds in the same order: identical bits.
                assert_eq!(got, expected, "{kernel:?} cols = {cols}, nt = {nt}");
            }
        }
    }

    #[test]
    fn simd_tile_matches_scalar_tile() {
        if Isa::Avx2.is_available() {
            check_tile::<PANEL_ROWS, TILE_TOKENS>(Kernel::Avx2);
        }
        if Isa::Avx512.is_available() {
            check_tile::<PANEL_ROWS_AVX512, TILE_TOKENS_AVX512>(Kernel::Avx512);
        }
    }

    /// Whole GEMMs on every available ISA equal the scalar GEMM bit for bit (each output is
    /// the same chain of fused multiply-adds over k), for float weights and sizes that are not
    /// multiples of any panel, tile or vector width.
    #[test]
    fn gemm_on_every_isa_equals_scalar_bits() {
        let pool = ThreadPool::new(2);
        for dtype in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            for (rows, cols, n_tokens) in [(45, 33, 23), (70, 130, 37), (31, 300, 25), (33, 17, 1)]
            {
                let data = quantized_rows(dtype, rows, cols);
                let w = WeightMatrix::new(dtype, rows, cols, &data).unwrap();
                let x = floats(n_tokens * cols, 9);
                let mut expected = vec![f32::NAN; n_tokens * rows];
                gemm_f32_with(&pool, Isa::Scalar, &w, &x, n_tokens, &mut expected);
                for isa in quant::available_isas() {
                    let mut y = vec![f32::NAN; n_tokens * rows];
                    gemm_f32_with(&pool, isa, &w, &x, n_tokens, &mut y);
                    let same = y
                        .iter()
                        .zip(&expected)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{dtype} {rows}x{cols}, {n_tokens} tokens on {isa:?}");
                }
            }
        }
    }

    /// A token's outputs do not depend on which other tokens share the GEMM (the server puts
    /// several sequences' prompt chunks in one pass): the rows of a batch equal the same tokens
    /// run alone, bit for bit, on every ISA, whatever tile each lands in.
    #[test]
    fn a_tokens_result_does_not_depend_on_the_rest_of_the_batch() {
        let pool = ThreadPool::new(2);
        let (rows, cols) = (70, 256);
        for dtype in [GgmlType::Q8_0, GgmlType::F16, GgmlType::BF16] {
            let data = quantized_rows(dtype, rows, cols);
            let w = WeightMatrix::new(dtype, rows, cols, &data).unwrap();
            let n_tokens = 64 + 40 + 23;
            let x = floats(n_tokens * cols, 5);
            for isa in quant::available_isas() {
                let mut together = vec![f32::NAN; n_tokens * rows];
                gemm_f32_with(&pool, isa, &w, &x, n_tokens, &mut together);
                let mut start = 0;
                for part in [64, 40, 23] {
                    let mut alone = vec![f32::NAN; part * rows];
                    let xs = &x[start * cols..(start + part) * cols];
                    gemm_f32_with(&pool, isa, &w, xs, part, &mut alone);
                    let same = alone
                        .iter()
                        .zip(&together[start * rows..(start + part) * rows])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{dtype}, tokens {start}..{} on {isa:?}", start + part);
                    start += part;
                }
            }
        }
    }
}
