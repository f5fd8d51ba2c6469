//! Matrix multiplication of quantized weights by f32 activations, split across a [`ThreadPool`].

use gemma_formats::GgmlType;

use crate::error::{bytes_for, KernelError};
use crate::gemm;
use crate::pool::ThreadPool;
use crate::quant::{
    self, interleave, selected_kernels, vec_dot_type, Isa, Kernels, QuantizedActs, RowsKernel,
    ROW_GROUP,
};

/// How a matrix's blocks are ordered in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RowLayout {
    /// Row after row, each row its blocks in order (as GGUF stores them).
    #[default]
    RowMajor,
    /// Groups of eight rows stored block by block ([`quant::interleave`]): what the decode
    /// kernels read fastest. Same bytes in number; only Q4_0 and Q8_0, whole groups.
    Interleaved,
}

/// A weight matrix `[rows, cols]` stored in its GGML type: each row is `dtype.bytes_for(cols)`
/// bytes, in the order `layout` says. Build with [`WeightMatrix::new`] (row-major), which checks
/// the sizes.
#[derive(Clone, Copy, Debug)]
pub struct WeightMatrix<'a> {
    pub dtype: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
    pub layout: RowLayout,
}

/// Whether a `[rows, cols]` matrix of `dtype` is worth storing interleaved for the selected
/// kernels: it fits the layout and the ISA has a kernel for it (so never with `GEMMA_ISA=scalar`).
pub fn interleaving_pays(dtype: GgmlType, rows: usize, cols: usize) -> bool {
    interleave::fits(dtype, rows, cols) && selected_kernels().interleaved(dtype).is_some()
}

impl<'a> WeightMatrix<'a> {
    pub fn new(
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<WeightMatrix<'a>, KernelError> {
        let w = WeightMatrix {
            dtype,
            rows,
            cols,
            data,
            layout: RowLayout::RowMajor,
        };
        w.validate()?;
        Ok(w)
    }

    /// Checks that `cols` fits whole blocks of the weight and activation types and that `data`
    /// holds exactly `rows` rows.
    pub fn validate(&self) -> Result<(), KernelError> {
        let shape_error = |reason: String| KernelError::WeightShape {
            dtype: self.dtype,
            rows: self.rows,
            cols: self.cols,
            reason,
        };
        let row_bytes = bytes_for(self.dtype, self.cols).map_err(|e| shape_error(e.to_string()))?;
        bytes_for(vec_dot_type(self.dtype), self.cols).map_err(|e| shape_error(e.to_string()))?;
        let expected = row_bytes
            .checked_mul(self.rows)
            .ok_or_else(|| shape_error("size overflows usize".into()))?;
        if expected != self.data.len() {
            return Err(shape_error(format!(
                "needs {expected} bytes, data has {}",
                self.data.len()
            )));
        }
        if self.layout == RowLayout::Interleaved
            && !interleave::fits(self.dtype, self.rows, self.cols)
        {
            return Err(shape_error("has no interleaved layout".into()));
        }
        Ok(())
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len().checked_div(self.rows).unwrap_or(0)
    }

    /// The bytes of row `r` of a row-major matrix.
    #[track_caller]
    pub fn row(&self, r: usize) -> &'a [u8] {
        assert!(r < self.rows, "row {r} out of range for {} rows", self.rows);
        assert_eq!(self.layout, RowLayout::RowMajor, "row: interleaved matrix");
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
}

/// Dequantizes row `r` of `w` into `dst` (`w.cols` values): an embedding lookup.
///
/// # Panics
/// If `w` is malformed, `r >= w.rows` or `dst.len() != w.cols`.
#[track_caller]
pub fn dequantize_row(w: &WeightMatrix, r: usize, dst: &mut [f32]) {
    if let Err(e) = w.validate() {
        panic!("dequantize_row: {e}");
    }
    assert_eq!(
        dst.len(),
        w.cols,
        "dequantize_row: dst holds {} values, row has {}",
        dst.len(),
        w.cols
    );
    assert!(
        r < w.rows,
        "dequantize_row: row {r} out of range for {} rows",
        w.rows
    );
    let mut buf = Vec::new();
    if let Err(e) = quant::dequantize(w.dtype, row_major(w, r, &mut buf), dst) {
        panic!("dequantize_row: {e}");
    }
}

/// Row `r` of `w` in row-major block order: in place, or copied into `buf` when `w` is
/// interleaved.
fn row_major<'a>(w: &WeightMatrix<'a>, r: usize, buf: &'a mut Vec<u8>) -> &'a [u8] {
    match w.layout {
        RowLayout::RowMajor => w.row(r),
        RowLayout::Interleaved => {
            buf.resize(w.row_bytes(), 0);
            interleave::row_of(w.dtype, w.data, w.cols, r, buf);
            buf
        }
    }
}

/// The multi-row kernel for `w`'s type and layout, if `kernels` has one.
fn rows_kernel(kernels: &Kernels, w: &WeightMatrix) -> Option<RowsKernel> {
    match w.layout {
        RowLayout::RowMajor => kernels.rows(w.dtype),
        RowLayout::Interleaved => kernels.interleaved(w.dtype),
    }
}

/// `y[t * rows + r] = dot(w row r, x[t * cols..(t + 1) * cols])` for every token `t`.
///
/// One numeric path for any number of tokens, so that a token's outputs do not depend on how
/// many tokens share the call (prompt processing and decoding agree bit for bit):
/// - quantized weights: each activation row is quantized once to the weight type's vec_dot
///   type into `scratch` (reused across calls) and rows are split into chunks across `pool`.
///   Types with a multi-row kernel (see [`quant`]) compute tiles of 8 rows × up to 4 tokens
///   with integer block dot products (AVX2 `maddubs`, or AVX-512 VNNI `vpdpbusd`), reading
///   either layout ([`RowLayout`]); from [`INT8_GEMM_MIN_TOKENS`] tokens (interleaved matrices:
///   [`INT8_GEMM_MIN_TOKENS_INTERLEAVED`]), Q4_0, Q5_0, Q8_0, Q4_K and Q6_K take an int8 GEMM over
///   repacked panels instead (16 rows' block sums in one register with `vpdpbusd`, or 8 rows'
///   with AVX2), all against Q8_0 activations.
///   The others apply each weight row to all tokens while it is in cache. Every result is
///   bit-identical to [`quant::vec_dot`] of its row and token (the decode kernel): exact
///   integer block sums, then the scalar reference's float steps in its order.
/// - float weights (F32, F16, BF16): the f32 GEMM of [`gemm`], with unquantized activations;
///   each output is the same chain of fused multiply-adds over `k` whatever the batch or ISA.
///
/// # Panics
/// If `w` is malformed or `x`/`y` do not hold `n_tokens` rows of `cols`/`rows` values.
#[track_caller]
pub fn matmul(
    pool: &ThreadPool,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Vec<u8>,
) {
    matmul_on(selected_kernels(), pool, w, x, n_tokens, y, scratch);
}

/// [`matmul`] on an explicit ISA (tests compare every ISA's results across batch sizes).
///
/// # Panics
/// As [`matmul`], and when `isa` is not available on this CPU.
#[track_caller]
pub fn matmul_with(
    pool: &ThreadPool,
    isa: Isa,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Vec<u8>,
) {
    assert!(
        isa.is_available(),
        "ISA {isa:?} is not available on this CPU"
    );
    let kernels = Kernels::for_isa(isa);
    matmul_on(&kernels, pool, w, x, n_tokens, y, scratch);
}

#[track_caller]
fn matmul_on(
    kernels: &Kernels,
    pool: &ThreadPool,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Vec<u8>,
) {
    if let Err(e) = w.validate() {
        panic!("matmul: {e}");
    }
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(
        x.len(),
        n_tokens * cols,
        "matmul: x must hold {n_tokens} x {cols} values"
    );
    assert_eq!(
        y.len(),
        n_tokens * rows,
        "matmul: y must hold {n_tokens} x {rows} values"
    );
    if rows == 0 || n_tokens == 0 {
        return;
    }
    let act_type = vec_dot_type(w.dtype);
    if act_type == GgmlType::F32 {
        // Float weights: the f32 GEMM for any token count. Each output is one chain of fused
        // multiply-adds over the columns in order, whatever the tile, panel or ISA.
        gemm::gemm_f32_with(pool, kernels.isa, w, x, n_tokens, y);
        return;
    }
    let acts = quant::quantize_acts_with(kernels.isa, act_type, x, cols, n_tokens, scratch);
    let act_row = acts.row_bytes;
    let row_bytes = w.row_bytes();
    let out = OutPtr(y.as_mut_ptr());
    if n_tokens >= int8_gemm_min_tokens(w) && int8_gemm_supports(kernels.isa, w.dtype) {
        run_int8_gemm(kernels.isa, pool, w, &acts, out);
        return;
    }
    if rows_kernel(kernels, w).is_some() {
        run_row_kernels(kernels, pool, &[(*w, out)], &acts);
        return;
    }

    let dot = kernels.dot(w.dtype);
    let chunk = rows_per_task(rows, pool.n_threads());
    pool.run(rows.div_ceil(chunk), &|task| {
        let first = task * chunk;
        let mut buf = Vec::new();
        for r in first..(first + chunk).min(rows) {
            let w_row = row_major(w, r, &mut buf);
            debug_assert_eq!(w_row.len(), row_bytes);
            for t in 0..n_tokens {
                let act = &acts.rows[t * act_row..(t + 1) * act_row];
                // SAFETY: the kernel's CPU features were detected when the table was built, and
                // the slices hold exactly `cols` values of their types (validated above).
                let v = unsafe { dot(w_row, act, cols) };
                // SAFETY: t * rows + r < y.len(), and each (t, r) is written by one task only.
                unsafe { out.write(t * rows + r, v) };
            }
        }
    });
}

/// [`matmul`] of the rows of `w` listed in `rows` only (ascending, each below `w.rows`): an up
/// projection whose outputs are multiplied by a mostly-zero gate needs only the gate's kept
/// rows, and reading only those is the point. Every listed row gets, for every token, exactly
/// its [`matmul`] output (bit for bit: the same quantized activations and dot kernels); every
/// other output is 0, or its [`matmul`] value where a row shares an eight-row group with a listed
/// row of an interleaved matrix (whole groups run). Float weights (their GEMM has no per-row
/// path) compute every row.
///
/// # Panics
/// As [`matmul`], and when `rows` is not ascending or lists a row past `w.rows`.
#[track_caller]
pub fn matmul_rows(
    pool: &ThreadPool,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    rows: &[u32],
    y: &mut [f32],
    scratch: &mut Vec<u8>,
) {
    matmul_rows_on(selected_kernels(), pool, w, x, n_tokens, rows, y, scratch);
}

/// [`matmul_rows`] on an explicit ISA (tests compare it with [`matmul_with`]).
///
/// # Panics
/// As [`matmul_rows`], and when `isa` is not available on this CPU.
#[track_caller]
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows_with(
    pool: &ThreadPool,
    isa: Isa,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    rows: &[u32],
    y: &mut [f32],
    scratch: &mut Vec<u8>,
) {
    assert!(
        isa.is_available(),
        "ISA {isa:?} is not available on this CPU"
    );
    let kernels = Kernels::for_isa(isa);
    matmul_rows_on(&kernels, pool, w, x, n_tokens, rows, y, scratch);
}

#[track_caller]
#[allow(clippy::too_many_arguments)]
fn matmul_rows_on(
    kernels: &Kernels,
    pool: &ThreadPool,
    w: &WeightMatrix,
    x: &[f32],
    n_tokens: usize,
    rows: &[u32],
    y: &mut [f32],
    scratch: &mut Vec<u8>,
) {
    assert!(
        rows.windows(2).all(|p| p[0] < p[1]) && rows.last().is_none_or(|&r| (r as usize) < w.rows),
        "matmul_rows: rows must be ascending and below {}",
        w.rows
    );
    let act_type = vec_dot_type(w.dtype);
    if act_type == GgmlType::F32 {
        matmul_on(kernels, pool, w, x, n_tokens, y, scratch);
        return;
    }
    if let Err(e) = w.validate() {
        panic!("matmul_rows: {e}");
    }
    let cols = w.cols;
    assert_eq!(
        x.len(),
        n_tokens * cols,
        "matmul_rows: x must hold {n_tokens} x {cols} values"
    );
    assert_eq!(
        y.len(),
        n_tokens * w.rows,
        "matmul_rows: y must hold {n_tokens} x {} values",
        w.rows
    );
    y.fill(0.0);
    if rows.is_empty() || n_tokens == 0 {
        return;
    }
    let acts = quant::quantize_acts_with(kernels.isa, act_type, x, cols, n_tokens, scratch);
    let act_row = acts.row_bytes;
    let out = OutPtr(y.as_mut_ptr());
    // About four tasks per thread; a task takes listed rows (row-major) or the groups of its
    // listed rows (interleaved: a group split between two tasks runs in the first only).
    let chunk = rows.len().div_ceil(4 * pool.n_threads()).max(8);
    match (w.layout, kernels.interleaved(w.dtype)) {
        (RowLayout::Interleaved, Some(kernel)) => {
            let group_bytes = ROW_GROUP * w.row_bytes();
            pool.run(rows.len().div_ceil(chunk), &|task| {
                let first = task * chunk;
                let mine = &rows[first..(first + chunk).min(rows.len())];
                // The group of the row before this chunk already ran in the previous task.
                let mut done = first.checked_sub(1).map(|i| rows[i] as usize / ROW_GROUP);
                for &r in mine {
                    let g = r as usize / ROW_GROUP;
                    if done == Some(g) {
                        continue;
                    }
                    done = Some(g);
                    // SAFETY: whole groups (`validate` checked the layout fits); this task
                    // alone writes the rows of group `g`.
                    unsafe {
                        kernel.run(
                            &w.data[g * group_bytes..(g + 1) * group_bytes],
                            ROW_GROUP,
                            cols,
                            &acts,
                            out.at(g * ROW_GROUP),
                            w.rows,
                        );
                    }
                }
            });
        }
        (RowLayout::RowMajor, _) if kernels.rows(w.dtype).is_some() => {
            // Eight listed rows at a time are copied next to each other (from memory they
            // must come from anyway) and run through the eight-row kernel: one row alone
            // would cost the kernel as much as eight.
            let kernel = kernels.rows(w.dtype).expect("checked");
            let row_bytes = w.row_bytes();
            let chunk = chunk.next_multiple_of(ROW_GROUP);
            pool.run(rows.len().div_ceil(chunk), &|task| {
                let first = task * chunk;
                let mine = &rows[first..(first + chunk).min(rows.len())];
                let mut packed = vec![0u8; ROW_GROUP * row_bytes];
                let mut tile = vec![0.0f32; n_tokens * ROW_GROUP];
                let mut groups = mine.chunks(ROW_GROUP).peekable();
                while let Some(group) = groups.next() {
                    // The listed rows are scattered: ask for the next group's early.
                    if let Some(next) = groups.peek() {
                        next.iter()
                            .for_each(|&r| crate::sparse::prefetch(w.row(r as usize)));
                    }
                    for (dst, &r) in packed.chunks_exact_mut(row_bytes).zip(group) {
                        dst.copy_from_slice(w.row(r as usize));
                    }
                    // SAFETY: `packed` holds group.len() whole rows; `tile` holds n_tokens
                    // rows of ROW_GROUP results.
                    unsafe {
                        kernel.run(
                            &packed,
                            group.len(),
                            cols,
                            &acts,
                            tile.as_mut_ptr(),
                            ROW_GROUP,
                        )
                    };
                    for t in 0..n_tokens {
                        for (i, &r) in group.iter().enumerate() {
                            // SAFETY: t * rows + r < y.len(); each listed row is in one task.
                            unsafe { out.write(t * w.rows + r as usize, tile[t * ROW_GROUP + i]) };
                        }
                    }
                }
            });
        }
        _ => {
            let dot = kernels.dot(w.dtype);
            pool.run(rows.len().div_ceil(chunk), &|task| {
                let first = task * chunk;
                let mut buf = Vec::new();
                for &r in &rows[first..(first + chunk).min(rows.len())] {
                    let r = r as usize;
                    let w_row = row_major(w, r, &mut buf);
                    for t in 0..n_tokens {
                        let act = &acts.rows[t * act_row..(t + 1) * act_row];
                        // SAFETY: as in `matmul_on`: features detected, sizes validated.
                        let v = unsafe { dot(w_row, act, cols) };
                        // SAFETY: t * rows + r < y.len(); each listed row is in one task.
                        unsafe { out.write(t * w.rows + r, v) };
                    }
                }
            });
        }
    }
}

/// [`matmul`] of several weight matrices with the same input (a layer's q/k/v or gate/up
/// projections): `ys[i]` receives `x · ws[i]ᵀ`, bit-identical to `matmul(ws[i], x)`. When every
/// matrix has a multi-row kernel and the same activation type, the input is quantized once and
/// all rows run as one pool job, so the threads meet once instead of once per matrix.
///
/// # Panics
/// As [`matmul`], for any matrix; also if `ws` and `ys` differ in length.
#[track_caller]
pub fn matmul_shared_input(
    pool: &ThreadPool,
    ws: &[WeightMatrix],
    x: &[f32],
    n_tokens: usize,
    ys: &mut [&mut [f32]],
    scratch: &mut Vec<u8>,
) {
    assert_eq!(
        ws.len(),
        ys.len(),
        "matmul_shared_input: one output per matrix"
    );
    let Some(first) = ws.first() else { return };
    let act_type = vec_dot_type(first.dtype);
    // Prompts take the int8 GEMM matrix by matrix (same bits either way).
    let int8_gemm = ws.iter().any(|w| {
        n_tokens >= int8_gemm_min_tokens(w) && int8_gemm_supports(selected_kernels().isa, w.dtype)
    });
    let shared = n_tokens > 0
        && !int8_gemm
        && ws.len() <= MAX_SHARED_INPUT
        && act_type != GgmlType::F32
        && ws.iter().all(|w| {
            vec_dot_type(w.dtype) == act_type
                && w.cols == first.cols
                && rows_kernel(selected_kernels(), w).is_some()
        });
    if !shared {
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            matmul(pool, w, x, n_tokens, y, scratch);
        }
        return;
    }
    let mut jobs = [(*first, OutPtr(std::ptr::null_mut())); MAX_SHARED_INPUT];
    for ((w, y), job) in ws.iter().zip(ys.iter_mut()).zip(jobs.iter_mut()) {
        if let Err(e) = w.validate() {
            panic!("matmul_shared_input: {e}");
        }
        assert_eq!(
            x.len(),
            n_tokens * w.cols,
            "matmul_shared_input: x must hold {n_tokens} x {} values",
            w.cols
        );
        assert_eq!(
            y.len(),
            n_tokens * w.rows,
            "matmul_shared_input: y must hold {n_tokens} x {} values",
            w.rows
        );
        *job = (*w, OutPtr(y.as_mut_ptr()));
    }
    let acts = quant::quantize_acts(act_type, x, first.cols, n_tokens, scratch);
    run_row_kernels(selected_kernels(), pool, &jobs[..ws.len()], &acts);
}

/// Most matrices one [`matmul_shared_input`] job takes (LAuReL's left factor, q, k and v);
/// more run one at a time.
const MAX_SHARED_INPUT: usize = 4;

/// Runs each `(matrix, output)` pair's multi-row kernel against `acts` as one pool job: every
/// matrix is cut into row chunks (a multiple of [`ROW_GROUP`] rows) and the chunks of all
/// matrices are the job's tasks. Output `t * rows + r` of a pair is row `r`, token `t`.
///
/// Every matrix must be valid, have a rows kernel and `acts.n_tokens()` rows of its `cols`
/// activations, and every output must hold `n_tokens * rows` values no one else touches.
fn run_row_kernels(
    kernels: &Kernels,
    pool: &ThreadPool,
    jobs: &[(WeightMatrix, OutPtr)],
    acts: &QuantizedActs,
) {
    debug_assert!(jobs.len() <= MAX_SHARED_INPUT);
    let threads = pool.n_threads();
    // Row chunk and task count per matrix; tasks are numbered matrix after matrix.
    let mut plan = [(0usize, 0usize); MAX_SHARED_INPUT];
    let mut n_tasks = 0;
    for ((w, _), p) in jobs.iter().zip(plan.iter_mut()) {
        let chunk = rows_per_task(w.rows, threads).next_multiple_of(ROW_GROUP);
        *p = (chunk, w.rows.div_ceil(chunk));
        n_tasks += p.1;
    }
    pool.run(n_tasks, &|mut task| {
        let mut m = 0;
        while task >= plan[m].1 {
            task -= plan[m].1;
            m += 1;
        }
        let (w, out) = &jobs[m];
        let kernel = rows_kernel(kernels, w).expect("callers check for a rows kernel");
        let first = task * plan[m].0;
        let n_rows = plan[m].0.min(w.rows - first);
        // SAFETY: the output holds n_tokens x rows values, and this task alone writes its rows.
        unsafe {
            kernel.run(
                &w.data[first * w.row_bytes()..],
                n_rows,
                w.cols,
                acts,
                out.at(first),
                w.rows,
            );
        }
    });
}

/// Tokens from which [`matmul`] takes the int8 GEMM where it has one: it gives the same bits
/// as the row kernels, so this is a speed choice only (repacking a panel costs about one pass of
/// the row kernel over it).
pub const INT8_GEMM_MIN_TOKENS: usize = 8;

/// [`INT8_GEMM_MIN_TOKENS`] for interleaved matrices. Their row kernels need no reduction per
/// block, and the int8 GEMM must first copy each panel back to row-major order, so the row
/// kernels stay faster up to a few hundred tokens: measured on the Zen 4 EPYC of BENCHMARKS.md
/// (1 thread, default model, t/s row kernels / int8 GEMM) pp32 637 / 217, pp64 725 / 441,
/// pp128 725 / 531, pp256 690 / 652, pp384 516 / 648, pp512 552 / 641; the E2B shape at 2
/// threads pp128 80 / 62, pp512 74 / 81.
pub const INT8_GEMM_MIN_TOKENS_INTERLEAVED: usize = 320;

/// Tokens from which `w` takes the int8 GEMM (where it has one).
fn int8_gemm_min_tokens(w: &WeightMatrix) -> usize {
    match w.layout {
        RowLayout::RowMajor => INT8_GEMM_MIN_TOKENS,
        RowLayout::Interleaved => INT8_GEMM_MIN_TOKENS_INTERLEAVED,
    }
}

/// Whether the int8 GEMM of `isa` handles weights of `dtype` (x86-64 with AVX2 and above).
fn int8_gemm_supports(isa: Isa, dtype: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    return matches!(isa, Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni)
        && quant::int8_gemm::supports(dtype);
    #[cfg(not(target_arch = "x86_64"))]
    return {
        let _ = (isa, dtype);
        false
    };
}

/// The int8 GEMM (see [`quant::int8_gemm`]) over panels split across `pool`: 16 rows with
/// AVX-512 VNNI, 8 with AVX2. `isa` must be available and [`int8_gemm_supports`] `w`, `acts`
/// must be its Q8_0 activations and `out` hold `acts.n_tokens() * w.rows` values no one else
/// touches.
#[cfg(target_arch = "x86_64")]
fn run_int8_gemm(isa: Isa, pool: &ThreadPool, w: &WeightMatrix, acts: &QuantizedActs, out: OutPtr) {
    use quant::int8_gemm::{panel, panel_avx2, PanelOut, PANEL_ROWS, PANEL_ROWS_AVX2};
    type PanelFn = unsafe fn(GgmlType, &[u8], usize, usize, usize, &QuantizedActs, PanelOut);
    let (kernel, panel_rows) = if isa == Isa::Avx512Vnni {
        (panel as PanelFn, PANEL_ROWS)
    } else {
        (panel_avx2 as PanelFn, PANEL_ROWS_AVX2)
    };
    let row_bytes = w.row_bytes();
    pool.run(w.rows.div_ceil(panel_rows), &|task| {
        let r0 = task * panel_rows;
        let n_rows = panel_rows.min(w.rows - r0);
        // Interleaved weights: the panel's rows back in row-major order first (panels are
        // whole groups; the copy is small next to the panel's arithmetic).
        let mut copy = Vec::new();
        let rows_data = match w.layout {
            RowLayout::RowMajor => &w.data[r0 * row_bytes..],
            RowLayout::Interleaved => {
                copy.resize(n_rows * row_bytes, 0);
                for (i, dst) in copy.chunks_exact_mut(row_bytes).enumerate() {
                    interleave::row_of(w.dtype, w.data, w.cols, r0 + i, dst);
                }
                &copy[..]
            }
        };
        let out = PanelOut {
            // SAFETY: r0 < rows, inside the output.
            ptr: unsafe { out.at(r0) },
            token_stride: w.rows,
        };
        // SAFETY: the caller checked the ISA's availability; the sizes were validated and
        // this task alone writes rows r0..r0 + n_rows.
        unsafe { kernel(w.dtype, rows_data, row_bytes, n_rows, w.cols, acts, out) };
    });
}

#[cfg(not(target_arch = "x86_64"))]
fn run_int8_gemm(_: Isa, _: &ThreadPool, _: &WeightMatrix, _: &QuantizedActs, _: OutPtr) {
    unreachable!("int8_gemm_supports is false off x86-64")
}

/// Rows per pool task: about four tasks per thread for load balance, at least 16 rows.
fn rows_per_task(rows: usize, n_threads: usize) -> usize {
    rows.div_ceil(4 * n_threads).max(16).min(rows.max(1))
}

/// The output buffer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: tasks write disjoint indices and `matmul` holds the unique borrow of `y` meanwhile.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    unsafe fn write(&self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }

    /// The pointer to element `i` (a method, so closures capture the whole `Sync` wrapper).
    unsafe fn at(&self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}
