//! Quantized data: dequantization, quantization and dot products for every [`GgmlType`].
//!
//! Dot products take one weight row and activations already quantized to
//! [`vec_dot_type`] of the weight type, as llama.cpp does. The implementation (scalar, AVX2,
//! AVX-512, NEON) is chosen once per process from the CPU features, or forced lower with the
//! environment variable `GEMMA_ISA=scalar|avx2|avx512|avx512vnni|neon`.
//!
//! On x86-64 with AVX2 (and above), Q4_0, Q5_0, Q8_0, Q4_K and Q6_K weights go through multi-row
//! kernels (eight rows per pass, shared activation loads, prefetching) whose results equal the
//! scalar reference bit for bit; `vec_dot` uses them too, so a row gives the same bits alone, in
//! a matmul or in any batch. With AVX-512 they run in a build for AVX-512 VL (32 registers),
//! with VNNI also with `vpdpbusd`: the same bits again. Dequantization of those types is SIMD
//! as well, also bit-exact, and
//! so is the per-matmul quantization of activations to Q8_0 and Q8_K (in AVX2, or AVX-512 where
//! that is selected).

pub mod interleave;
mod layout;
pub mod scalar;
mod selfcheck;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_dequant;
#[cfg(target_arch = "x86_64")]
mod avx2_interleaved;
#[cfg(target_arch = "x86_64")]
mod avx2_quantize;
#[cfg(target_arch = "x86_64")]
mod avx2_rows;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_quantize;
#[cfg(target_arch = "x86_64")]
pub(crate) mod int8_gemm;
#[cfg(target_arch = "aarch64")]
mod neon;

use std::sync::OnceLock;

use gemma_formats::GgmlType;

use crate::error::{check_len, KernelError};

/// Turns `src` (`dtype.bytes_for(dst.len())` bytes of `dtype`) into f32 values: the same bits as
/// [`scalar::dequantize`], with SIMD unpacking where the selected ISA has it.
pub fn dequantize(dtype: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    dequantize_with(selected_isa(), dtype, src, dst)
}

/// [`dequantize`] on an explicit ISA (tests compare it with the scalar reference).
///
/// # Panics
/// When `isa` is not available on this CPU.
pub fn dequantize_with(
    isa: Isa,
    dtype: GgmlType,
    src: &[u8],
    dst: &mut [f32],
) -> Result<(), KernelError> {
    assert!(
        isa.is_available(),
        "ISA {isa:?} is not available on this CPU"
    );
    check_len(dtype, dst.len(), src.len())?;
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni) {
        // SAFETY: AVX2 availability asserted above; sizes checked.
        if unsafe { avx2_dequant::dequantize(dtype, src, dst) } {
            return Ok(());
        }
    }
    scalar::dequantize(dtype, src, dst)
}

/// [`dequantize`] for callers that checked the sizes and the ISA once: `simd` says AVX2 (or
/// above) is available and selected.
#[inline]
pub(crate) fn dequantize_unchecked(simd: bool, dtype: GgmlType, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(dtype.bytes_for(dst.len()), Some(src.len()));
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the caller promises AVX2; sizes match.
        if unsafe { avx2_dequant::dequantize(dtype, src, dst) } {
            return;
        }
    }
    let _ = simd;
    scalar::dequantize_unchecked(dtype, src, dst);
}

/// Quantizes `src` into `dst` (`dtype.bytes_for(src.len())` bytes) with ggml's round-to-nearest
/// reference quantizers. Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q8_K;
/// the other K-quants give [`KernelError::QuantizeUnsupported`].
pub fn quantize(dtype: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    scalar::quantize(dtype, src, dst)
}

/// The format activations must be quantized to for dot products with weights of `dtype`.
pub fn vec_dot_type(dtype: GgmlType) -> GgmlType {
    match dtype {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => GgmlType::F32,
        // Q4_K and Q6_K too (not ggml's Q8_K): see `scalar::dot_q4_k`.
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q6_K => {
            GgmlType::Q8_0
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => GgmlType::Q8_1,
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q5_K | GgmlType::Q8_K => GgmlType::Q8_K,
    }
}

/// Dot product of one weight row of `n` values of `dtype` with `n` activations stored as
/// `vec_dot_type(dtype)`, using the selected ISA.
///
/// # Panics
/// When `w_row` or `act` is not exactly `n` values of its type (a caller bug, not bad data:
/// weight sizes are checked when a [`crate::WeightMatrix`] is built).
#[track_caller]
pub fn vec_dot(dtype: GgmlType, w_row: &[u8], act: &[u8], n: usize) -> f32 {
    assert_dot_sizes(dtype, w_row, act, n);
    let f = selected_kernels().dot(dtype);
    // SAFETY: the table only holds kernels whose CPU features were detected, and sizes match.
    unsafe { f(w_row, act, n) }
}

/// [`vec_dot`] with an explicit ISA (for tests and benchmarks).
///
/// # Panics
/// When `isa` is not available on this CPU, or on size mismatches as [`vec_dot`].
#[track_caller]
pub fn vec_dot_with(isa: Isa, dtype: GgmlType, w_row: &[u8], act: &[u8], n: usize) -> f32 {
    assert!(
        isa.is_available(),
        "ISA {isa:?} is not available on this CPU"
    );
    assert_dot_sizes(dtype, w_row, act, n);
    let f = dot_fn(isa, dtype);
    // SAFETY: availability checked above, sizes checked.
    unsafe { f(w_row, act, n) }
}

/// Instruction sets with their own kernels. Later ones in x86 order include the earlier ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F + BW + VL (plus AVX2 + FMA + F16C).
    Avx512,
    /// [`Isa::Avx512`] plus AVX512-VNNI (`vpdpbusd`).
    Avx512Vnni,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
        }
    }

    pub fn from_name(name: &str) -> Option<Isa> {
        [
            Isa::Scalar,
            Isa::Avx2,
            Isa::Avx512,
            Isa::Avx512Vnni,
            Isa::Neon,
        ]
        .into_iter()
        .find(|isa| isa.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether this CPU runs the kernels of `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => Isa::Avx512.is_available() && is_x86_feature_detected!("avx512vnni"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Position in the "includes" order, used to honour `GEMMA_ISA` (forcing a lower ISA).
    fn rank(self) -> u8 {
        match self {
            Isa::Scalar => 0,
            Isa::Avx2 | Isa::Neon => 1,
            Isa::Avx512 => 2,
            Isa::Avx512Vnni => 3,
        }
    }
}

/// Every ISA this CPU supports, lowest first (always starts with [`Isa::Scalar`]).
pub fn available_isas() -> Vec<Isa> {
    [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Vnni,
        Isa::Neon,
    ]
    .into_iter()
    .filter(|isa| isa.is_available())
    .collect()
}

/// The ISA [`vec_dot`] and [`crate::matmul`] use: the best available, capped by `GEMMA_ISA`,
/// whose kernels pass a one-time agreement check against the scalar reference.
pub fn selected_isa() -> Isa {
    selected_kernels().isa
}

/// Function type of every dot kernel. Unsafe because SIMD kernels need their CPU features and
/// read `n` values from both slices without bounds checks.
pub(crate) type DotFn = unsafe fn(&[u8], &[u8], usize) -> f32;

/// The dot kernels of one ISA, indexed by `GgmlType as usize`, and the multi-row kernels where
/// the ISA has them.
pub(crate) struct Kernels {
    pub isa: Isa,
    pub(super) dots: [DotFn; GgmlType::ALL.len()],
    pub(super) rows: [Option<RowsKernel>; GgmlType::ALL.len()],
    /// The multi-row kernels over the interleaved layout (see [`interleave`]).
    pub(super) interleaved: [Option<RowsKernel>; GgmlType::ALL.len()],
}

impl Kernels {
    pub(crate) fn for_isa(isa: Isa) -> Kernels {
        Kernels {
            isa,
            dots: std::array::from_fn(|i| dot_fn(isa, GgmlType::ALL[i])),
            rows: std::array::from_fn(|i| rows_kernel(isa, GgmlType::ALL[i])),
            interleaved: std::array::from_fn(|i| interleaved_kernel(isa, GgmlType::ALL[i])),
        }
    }

    #[inline]
    pub fn dot(&self, dtype: GgmlType) -> DotFn {
        self.dots[dtype as usize]
    }

    /// The kernel computing [`ROW_GROUP`] weight rows at once for `dtype`, if this ISA has one.
    #[inline]
    pub fn rows(&self, dtype: GgmlType) -> Option<RowsKernel> {
        self.rows[dtype as usize]
    }

    /// The kernel computing [`ROW_GROUP`] interleaved weight rows at once for `dtype` (same
    /// results as [`Kernels::rows`] on the row-major matrix), if this ISA has one.
    #[inline]
    pub fn interleaved(&self, dtype: GgmlType) -> Option<RowsKernel> {
        self.interleaved[dtype as usize]
    }
}

/// Weight rows one [`RowsKernel`] call computes.
pub(crate) const ROW_GROUP: usize = 8;
/// Bytes of per-block extras stored after Q8_0 activation rows (see [`QuantizedActs`]).
pub(crate) const Q8_0_INFO_BYTES: usize = 8;

/// Activation rows quantized to a weight type's vec_dot type, once per matmul.
pub(crate) struct QuantizedActs<'a> {
    /// `n_tokens` rows of `row_bytes` bytes.
    pub rows: &'a [u8],
    pub row_bytes: usize,
    /// For Q8_0 activations, per token and block, [`Q8_0_INFO_BYTES`] bytes: the block scale as
    /// little-endian f32 and the sum of its 32 quants as little-endian i32 (what the offset
    /// weight types subtract). Empty for other types.
    pub q8_0_info: &'a [u8],
}

impl QuantizedActs<'_> {
    pub fn n_tokens(&self) -> usize {
        self.rows.len().checked_div(self.row_bytes).unwrap_or(0)
    }
}

/// Quantizes `n_tokens` rows of `cols` values of `x` to `act_type` into `scratch` (reused
/// across calls) and adds the Q8_0 per-block extras. `act_type` must not be F32.
pub(crate) fn quantize_acts<'a>(
    act_type: GgmlType,
    x: &[f32],
    cols: usize,
    n_tokens: usize,
    scratch: &'a mut Vec<u8>,
) -> QuantizedActs<'a> {
    quantize_acts_with(selected_kernels().isa, act_type, x, cols, n_tokens, scratch)
}

/// [`quantize_acts`] on `isa`, which must be available on this CPU: Q8_0 and Q8_K go through
/// the AVX-512 quantizers under [`Isa::Avx512`] and [`Isa::Avx512Vnni`], the AVX2 ones under
/// [`Isa::Avx2`] (all the same bytes as the scalar path, which everything else takes).
pub(crate) fn quantize_acts_with<'a>(
    isa: Isa,
    act_type: GgmlType,
    x: &[f32],
    cols: usize,
    n_tokens: usize,
    scratch: &'a mut Vec<u8>,
) -> QuantizedActs<'a> {
    debug_assert!(isa.is_available(), "ISA {isa:?} is not available");
    let row_bytes = act_type.bytes_for(cols).expect("whole blocks");
    let rows_len = n_tokens * row_bytes;
    let info_len = if act_type == GgmlType::Q8_0 {
        n_tokens * (cols / act_type.block_size()) * Q8_0_INFO_BYTES
    } else {
        0
    };
    scratch.clear();
    scratch.resize(rows_len + info_len, 0);
    let (rows, info) = scratch.split_at_mut(rows_len);
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni) {
        // Whole rows only, as the scalar loop below; blocks never straddle rows.
        let used = (x.len() / cols.max(1)).min(n_tokens);
        let per_token_info = info_len / n_tokens.max(1);
        let x = &x[..used * cols];
        let blocks = &mut rows[..used * row_bytes];
        let block_info = &mut info[..used * per_token_info];
        // SAFETY: the caller promises `isa` is available (AVX-512 F + BW + VL, or AVX2 + FMA +
        // F16C); the slices hold `used` whole rows of each kind.
        let done = unsafe {
            if isa == Isa::Avx2 {
                avx2_quantize::quantize_blocks(act_type, x, blocks, block_info)
            } else {
                avx512_quantize::quantize_blocks(act_type, x, blocks, block_info)
            }
        };
        if done {
            return QuantizedActs {
                rows,
                row_bytes,
                q8_0_info: info,
            };
        }
    }
    for (xt, at) in x
        .chunks_exact(cols.max(1))
        .zip(rows.chunks_exact_mut(row_bytes.max(1)))
        .take(n_tokens)
    {
        quantize(act_type, xt, at).expect("activation types are quantizable");
    }
    if act_type == GgmlType::Q8_0 {
        write_q8_0_info(rows, info);
    }
    QuantizedActs {
        rows,
        row_bytes,
        q8_0_info: info,
    }
}

/// The [`QuantizedActs::q8_0_info`] of the Q8_0 blocks in `rows`.
pub(crate) fn write_q8_0_info(rows: &[u8], info: &mut [u8]) {
    for (block, out) in rows
        .chunks_exact(34)
        .zip(info.chunks_exact_mut(Q8_0_INFO_BYTES))
    {
        let sum: i32 = block[2..].iter().map(|&q| q as i8 as i32).sum();
        out[..4].copy_from_slice(&layout::f16_at(block, 0).to_le_bytes());
        out[4..].copy_from_slice(&sum.to_le_bytes());
    }
}

/// A multi-row dot kernel: groups of [`ROW_GROUP`] rows against a few tokens at once, each
/// result bit-identical to [`vec_dot`] of the same row and token. (x86-64 only for now: other
/// targets have no table entries and use the one-row kernels.)
#[derive(Clone, Copy)]
pub(crate) struct RowsKernel {
    dtype: GgmlType,
    #[cfg(target_arch = "x86_64")]
    f: avx2_rows::RowsFn,
}

impl RowsKernel {
    /// Writes `vec_dot(row i, token t)` to `out + t * token_stride + i` for the `n_rows` rows at
    /// the start of `w_rows` (rows of `cols` weights) and every token of `acts`.
    ///
    /// # Panics
    /// When the weight or activation sizes do not fit (a caller bug).
    ///
    /// # Safety
    /// `out` must be valid for writes of f32 at every `t * token_stride + i` with
    /// `t < acts.n_tokens()` and `i < n_rows`, and nothing else may access those places meanwhile.
    #[inline]
    #[track_caller]
    pub unsafe fn run(
        &self,
        w_rows: &[u8],
        n_rows: usize,
        cols: usize,
        acts: &QuantizedActs,
        out: *mut f32,
        token_stride: usize,
    ) {
        let row_bytes = self.dtype.bytes_for(cols).expect("whole blocks");
        let act_type = vec_dot_type(self.dtype);
        let n_tokens = acts.n_tokens();
        let info_per_token = if act_type == GgmlType::Q8_0 {
            (cols / act_type.block_size()) * Q8_0_INFO_BYTES
        } else {
            0
        };
        assert!(n_rows >= 1 && w_rows.len() >= n_rows * row_bytes);
        assert_eq!(Some(acts.row_bytes), act_type.bytes_for(cols));
        assert!(acts.q8_0_info.len() >= n_tokens * info_per_token);
        #[cfg(target_arch = "x86_64")]
        {
            let range = avx2_rows::RowRange {
                data: w_rows,
                row_bytes,
                n_rows,
            };
            let act_rows = avx2_rows::ActRows {
                data: acts.rows,
                row_bytes: acts.row_bytes,
                info: acts.q8_0_info,
                info_bytes: info_per_token,
                n_tokens,
            };
            let out = avx2_rows::Out {
                ptr: out,
                token_stride,
            };
            // SAFETY: the kernel exists only in tables whose ISA (AVX2 or above) was detected;
            // sizes were checked above and `out` is the caller's promise.
            unsafe { (self.f)(&range, &act_rows, cols, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (out, token_stride);
            unreachable!("multi-row kernels exist on x86-64 only");
        }
    }
}

/// The multi-row kernel of `dtype` on `isa` (x86-64 with AVX2 and above only).
fn rows_kernel(isa: Isa, dtype: GgmlType) -> Option<RowsKernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(build) = rows_build(isa) {
            return avx2_rows::rows_fn(dtype, build).map(|f| RowsKernel { dtype, f });
        }
    }
    let _ = (isa, dtype);
    None
}

/// The multi-row kernel of `dtype` over the interleaved layout on `isa` (x86-64 with AVX2 and
/// above only).
fn interleaved_kernel(isa: Isa, dtype: GgmlType) -> Option<RowsKernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(build) = rows_build(isa) {
            return avx2_interleaved::rows_fn(dtype, build).map(|f| RowsKernel { dtype, f });
        }
    }
    let _ = (isa, dtype);
    None
}

/// The build of the multi-row kernels for `isa` (x86-64 with AVX2 and above).
#[cfg(target_arch = "x86_64")]
fn rows_build(isa: Isa) -> Option<avx2_rows::Build> {
    match isa {
        Isa::Avx2 => Some(avx2_rows::Build::Avx2),
        Isa::Avx512 => Some(avx2_rows::Build::Avx512),
        Isa::Avx512Vnni => Some(avx2_rows::Build::Avx512Vnni),
        Isa::Scalar | Isa::Neon => None,
    }
}

pub(crate) fn selected_kernels() -> &'static Kernels {
    static SELECTED: OnceLock<Kernels> = OnceLock::new();
    SELECTED.get_or_init(|| {
        let requested = std::env::var("GEMMA_ISA").ok();
        let mut candidates = available_isas();
        loop {
            let isa = choose_isa(&candidates, requested.as_deref());
            let kernels = Kernels::for_isa(isa);
            if isa == Isa::Scalar || selfcheck::agrees_with_scalar(&kernels) {
                return kernels;
            }
            candidates.retain(|&c| c != isa);
        }
    })
}

/// The best of `available`, capped at the rank of `requested` (a `GEMMA_ISA` value) when that
/// names an ISA. Unknown names are ignored.
pub fn choose_isa(available: &[Isa], requested: Option<&str>) -> Isa {
    let cap = requested
        .and_then(Isa::from_name)
        .map_or(u8::MAX, Isa::rank);
    available
        .iter()
        .copied()
        .filter(|isa| isa.rank() <= cap)
        .max_by_key(|isa| isa.rank())
        .unwrap_or(Isa::Scalar)
}

/// The kernel for `dtype` on `isa`, falling back to the next lower ISA for types without one.
fn dot_fn(isa: Isa, dtype: GgmlType) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        // Types with a multi-row kernel use it for single rows too (also under AVX-512), so that
        // a row gives the same bits alone, in a matmul, or in any batch.
        if let Some(build) = rows_build(isa) {
            if let Some(f) = avx2_rows::dot_fn(dtype, build) {
                return f;
            }
        }
        if matches!(isa, Isa::Avx512 | Isa::Avx512Vnni) {
            if let Some(f) = avx512::dot_fn(dtype, isa == Isa::Avx512Vnni) {
                return f;
            }
        }
        if matches!(isa, Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni) {
            if let Some(f) = avx2::dot_fn(dtype) {
                return f;
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if isa == Isa::Neon {
            if let Some(f) = neon::dot_fn(dtype) {
                return f;
            }
        }
    }
    let _ = isa;
    scalar::dot_fn(dtype)
}

/// Panics unless `w_row` holds `n` values of `dtype` and `act` `n` values of its vec_dot type.
#[track_caller]
pub(crate) fn assert_dot_sizes(dtype: GgmlType, w_row: &[u8], act: &[u8], n: usize) {
    if let Err(e) = check_len(dtype, n, w_row.len()) {
        panic!("vec_dot weight row: {e}");
    }
    if let Err(e) = check_len(vec_dot_type(dtype), n, act.len()) {
        panic!("vec_dot activations: {e}");
    }
}
