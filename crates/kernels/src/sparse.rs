//! Products with activations that are mostly zero.
//!
//! Gemma 3n's first MLPs keep only the top of a Gaussian fit of their gate (activation sparsity
//! 0.95 in E2B and E4B): about 5 % of a token's MLP activations are non-zero. A row-major down
//! projection must still be read whole (each row mixes every activation), so this module keeps
//! it transposed, one row per input, and adds up only the rows of the non-zero inputs: a tenth
//! of the bytes per token, for the memory-bound decode. (The up projection needs no copy: only
//! its kept rows are computed, see [`crate::matmul::matmul_rows`].)
//!
//! Numerics: activations stay f32 (no activation quantization); quantized weights are stored
//! as 8-bit values with one f32 scale per 32 outputs, requantized from the stored type's exact
//! values (an error of at most half a step of 1/127 of the block's largest weight, far below
//! the 4- to 6-bit original's); float weights keep their exact values. Each output is the sum,
//! input by input in increasing order, of `(a · scale) · q` (or `a · w`), with separate roundings
//! (Rust never fuses), so a token's outputs do not depend on the ISA, the thread count or the
//! other tokens of the call.

use crate::matmul::{dequantize_row, WeightMatrix};
use crate::pool::ThreadPool;
use crate::quant::Isa;
use gemma_formats::GgmlType;

/// Outputs per scale of the 8-bit store (and the unit that tasks split the outputs in).
const BLOCK: usize = 32;

/// A weight `[outputs, inputs]` stored transposed for inputs that are mostly zero: `y = W · x`
/// costs one stored row per non-zero input.
#[derive(Clone, Debug)]
pub struct SparseInputMatrix {
    outputs: usize,
    inputs: usize,
    store: Store,
}

#[derive(Clone, Debug)]
enum Store {
    /// `qs[j * outputs + r]`, scaled by `scales[j * outputs / BLOCK + r / BLOCK]`.
    Int8 { qs: Vec<i8>, scales: Vec<f32> },
    /// `w[j * outputs + r]`: float weights, exact.
    F32(Vec<f32>),
    /// BF16 weights, exact: the high half of each f32.
    Bf16(Vec<u16>),
}

/// The non-zero inputs of each token, reused across calls.
#[derive(Clone, Debug, Default)]
pub struct SparseScratch {
    /// `(input, value)` of every token's non-zero inputs, token after token.
    entries: Vec<(u32, f32)>,
    /// Token `t`'s entries are `entries[starts[t]..starts[t + 1]]`.
    starts: Vec<usize>,
}

impl SparseInputMatrix {
    /// `w` transposed: 8-bit with f32 scales for quantized types whose outputs are whole
    /// blocks of 32, BF16 for BF16, f32 otherwise.
    ///
    /// # Panics
    /// If `w` is malformed.
    #[track_caller]
    pub fn from_weights(w: &WeightMatrix) -> SparseInputMatrix {
        if let Err(e) = w.validate() {
            panic!("SparseInputMatrix: {e}");
        }
        let (outputs, inputs) = (w.rows, w.cols);
        let float = matches!(w.dtype, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
        // Rows dequantized a block of outputs at a time (a few MiB at most, never the matrix).
        let mut rows = vec![0.0f32; BLOCK.min(outputs.max(1)) * inputs];
        let mut for_each_block = |f: &mut dyn FnMut(usize, &[f32])| {
            for r0 in (0..outputs).step_by(BLOCK) {
                let n = BLOCK.min(outputs - r0);
                for (i, row) in rows.chunks_exact_mut(inputs.max(1)).take(n).enumerate() {
                    dequantize_row(w, r0 + i, row);
                }
                f(r0, &rows[..n * inputs]);
            }
        };
        let store = if float || !outputs.is_multiple_of(BLOCK) {
            let mut t = vec![0.0f32; inputs * outputs];
            for_each_block(&mut |r0, block| {
                for (i, row) in block.chunks_exact(inputs.max(1)).enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        t[j * outputs + r0 + i] = v;
                    }
                }
            });
            if w.dtype == GgmlType::BF16 {
                // Dequantized BF16 values are exactly their high halves.
                Store::Bf16(t.iter().map(|v| (v.to_bits() >> 16) as u16).collect())
            } else {
                Store::F32(t)
            }
        } else {
            let blocks = outputs / BLOCK;
            let mut qs = vec![0i8; inputs * outputs];
            let mut scales = vec![0.0f32; inputs * blocks];
            let mut amax = vec![0.0f32; inputs];
            for_each_block(&mut |r0, block| {
                // Row by row (contiguous reads): each input's largest weight in this block of
                // outputs, then its quantized weights.
                amax.fill(0.0);
                for row in block.chunks_exact(inputs) {
                    for (m, v) in amax.iter_mut().zip(row) {
                        *m = m.max(v.abs());
                    }
                }
                for (j, m) in amax.iter_mut().enumerate() {
                    let scale = *m / 127.0;
                    scales[j * blocks + r0 / BLOCK] = scale;
                    // Now the multiplier.
                    *m = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                }
                // Input by input: 32 contiguous bytes out, reads from 32 rows that the next
                // inputs read too.
                for (j, &inv) in amax.iter().enumerate() {
                    let dst = &mut qs[j * outputs + r0..][..BLOCK];
                    for (i, q) in dst.iter_mut().enumerate() {
                        *q = round_to_i8(block[i * inputs + j] * inv);
                    }
                }
            });
            Store::Int8 { qs, scales }
        };
        SparseInputMatrix {
            outputs,
            inputs,
            store,
        }
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Int8 { qs, scales } => qs.len() + 4 * scales.len(),
            Store::F32(w) => 4 * w.len(),
            Store::Bf16(w) => 2 * w.len(),
        }
    }

    /// `y[t * outputs + r] = Σ_j W[r, j] · x[t * width + j]` over the first `width` inputs
    /// (a narrower activation, as a MatFormer slice's, leaves the other inputs out: they would
    /// add nothing), reading one stored row per non-zero input.
    ///
    /// # Panics
    /// If `width > inputs` or `x`/`y` do not hold `n_tokens` rows of `width`/`outputs` values.
    #[track_caller]
    pub fn matmul(
        &self,
        pool: &ThreadPool,
        x: &[f32],
        width: usize,
        n_tokens: usize,
        y: &mut [f32],
        scratch: &mut SparseScratch,
    ) {
        self.matmul_with(
            pool,
            crate::quant::selected_isa(),
            x,
            width,
            n_tokens,
            y,
            scratch,
        );
    }

    /// [`SparseInputMatrix::matmul`] with the loops compiled for `isa` (the same bits on
    /// every ISA; tests check).
    ///
    /// # Panics
    /// As [`SparseInputMatrix::matmul`], and when `isa` is not available on this CPU.
    #[track_caller]
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_with(
        &self,
        pool: &ThreadPool,
        isa: Isa,
        x: &[f32],
        width: usize,
        n_tokens: usize,
        y: &mut [f32],
        scratch: &mut SparseScratch,
    ) {
        assert!(
            isa.is_available(),
            "ISA {isa:?} is not available on this CPU"
        );
        assert!(
            width <= self.inputs,
            "sparse matmul: {width} inputs given, the matrix has {}",
            self.inputs
        );
        assert_eq!(
            x.len(),
            n_tokens * width,
            "sparse matmul: x must hold {n_tokens} x {width} values"
        );
        assert_eq!(
            y.len(),
            n_tokens * self.outputs,
            "sparse matmul: y must hold {n_tokens} x {} values",
            self.outputs
        );
        if n_tokens == 0 || self.outputs == 0 {
            return;
        }
        let SparseScratch { entries, starts } = scratch;
        entries.clear();
        starts.clear();
        starts.push(0);
        for t in 0..n_tokens {
            // `!= 0.0` keeps NaN, which must reach the output as the dense product's would.
            entries.extend(
                x[t * width..(t + 1) * width]
                    .iter()
                    .enumerate()
                    .filter(|(_, &a)| a != 0.0)
                    .map(|(j, &a)| (j as u32, a)),
            );
            starts.push(entries.len());
        }
        let (entries, starts) = (&entries[..], &starts[..]);
        let outputs = self.outputs;
        // Tasks take whole blocks of outputs, one per thread: each reads a longer stretch of
        // every kept row.
        let chunk = outputs
            .div_ceil(pool.n_threads())
            .next_multiple_of(BLOCK)
            .min(outputs);
        let out = OutPtr(y.as_mut_ptr());
        let simd = isa != Isa::Scalar;
        pool.run(outputs.div_ceil(chunk), &|task| {
            let r0 = task * chunk;
            let n = chunk.min(outputs - r0);
            for t in 0..n_tokens {
                // SAFETY: rows r0..r0 + n of token t are inside `y`, and only this task
                // touches them.
                let y_t = unsafe { std::slice::from_raw_parts_mut(out.at(t * outputs + r0), n) };
                let token = &entries[starts[t]..starts[t + 1]];
                accumulate(simd, &self.store, outputs, r0, token, y_t);
            }
        });
    }
}

/// `y = Σ over `token`'s entries (j, a) of a · W[r0.., j]`, in entry order.
fn accumulate(
    simd: bool,
    store: &Store,
    outputs: usize,
    r0: usize,
    token: &[(u32, f32)],
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        unsafe { accumulate_avx2(store, outputs, r0, token, y) };
        return;
    }
    let _ = simd;
    accumulate_generic(store, outputs, r0, token, y);
}

/// [`accumulate_generic`] with the 8-bit store's loop in AVX2 (the same multiplies and adds,
/// unfused, so the same bits); float stores as compiled with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn accumulate_avx2(
    store: &Store,
    outputs: usize,
    r0: usize,
    token: &[(u32, f32)],
    y: &mut [f32],
) {
    use std::arch::x86_64::*;
    let Store::Int8 { qs, scales } = store else {
        accumulate_generic(store, outputs, r0, token, y);
        return;
    };
    y.fill(0.0);
    let n = y.len();
    let blocks = outputs / BLOCK;
    let yp = y.as_mut_ptr();
    for (k, &(j, a)) in token.iter().enumerate() {
        if let Some(&(ahead, _)) = token.get(k + PREFETCH_AHEAD) {
            prefetch(&qs[ahead as usize * outputs + r0..][..n]);
        }
        let j = j as usize;
        let row = &qs[j * outputs + r0..][..n];
        let row_scales = &scales[j * blocks + r0 / BLOCK..][..n / BLOCK];
        for (b, &scale) in row_scales.iter().enumerate() {
            let s = _mm256_set1_ps(a * scale);
            let q = row.as_ptr().add(b * BLOCK);
            for k in 0..BLOCK / 8 {
                let q8 = _mm_loadl_epi64(q.add(8 * k) as *const __m128i);
                let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
                let dst = yp.add(b * BLOCK + 8 * k);
                _mm256_storeu_ps(
                    dst,
                    _mm256_add_ps(_mm256_loadu_ps(dst), _mm256_mul_ps(s, w)),
                );
            }
        }
    }
}

#[inline(always)]
fn accumulate_generic(
    store: &Store,
    outputs: usize,
    r0: usize,
    token: &[(u32, f32)],
    y: &mut [f32],
) {
    y.fill(0.0);
    let n = y.len();
    match store {
        Store::Int8 { qs, scales } => {
            let blocks = outputs / BLOCK;
            for &(j, a) in token {
                let j = j as usize;
                let row = &qs[j * outputs + r0..][..n];
                let row_scales = &scales[j * blocks + r0 / BLOCK..][..n / BLOCK];
                for ((y, q), &scale) in y
                    .chunks_exact_mut(BLOCK)
                    .zip(row.chunks_exact(BLOCK))
                    .zip(row_scales)
                {
                    let s = a * scale;
                    for (y, &q) in y.iter_mut().zip(q) {
                        *y += s * q as f32;
                    }
                }
            }
        }
        Store::F32(w) => {
            for &(j, a) in token {
                let row = &w[j as usize * outputs + r0..][..n];
                for (y, &w) in y.iter_mut().zip(row) {
                    *y += a * w;
                }
            }
        }
        Store::Bf16(w) => {
            for &(j, a) in token {
                let row = &w[j as usize * outputs + r0..][..n];
                for (y, &w) in y.iter_mut().zip(row) {
                    *y += a * f32::from_bits((w as u32) << 16);
                }
            }
        }
    }
}

/// Rows ahead of the one being added that [`accumulate`] asks the memory for: the rows of the
/// kept inputs are scattered, so without this each waits for DRAM in turn.
const PREFETCH_AHEAD: usize = 8;

/// Asks for every cache line of `items` to be brought into the caches (a hint: no effect on
/// results, nothing off x86-64).
#[inline]
pub(crate) fn prefetch<T>(items: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = items.as_ptr().cast::<i8>();
        for offset in (0..std::mem::size_of_val(items)).step_by(64) {
            // SAFETY: SSE is part of x86-64; the address is inside `items`, and a prefetch
            // never faults anyway.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    start.add(offset),
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = items;
}

/// `v` (within ±127.5) rounded half away from zero, without a libm call.
#[inline]
fn round_to_i8(v: f32) -> i8 {
    (v + 0.5f32.copysign(v)).clamp(-127.0, 127.0) as i8
}

/// The output buffer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: tasks write disjoint ranges and `matmul_with` holds the unique borrow of `y`.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer to element `i` (a method, so closures capture the whole `Sync` wrapper).
    unsafe fn at(&self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}
