//! 2-D convolutions on channel-last (HWC) images: `x[(y * width + x) * channels + c]`.
//!
//! Channel-last because every convolution a CNN tower spends its time in becomes a plain
//! matrix product or a SIMD loop in it: a 1×1 convolution is `[pixels, c_in] · Wᵀ` with the
//! image itself as the activation matrix (no copy, straight into [`matmul`]); a per-pixel norm
//! over channels is a row norm; a depthwise convolution accumulates whole contiguous channel
//! rows per tap, which vectorises over channels with no gathers; and the `[pixels, channels]`
//! output of a tower is already the token-major layout a language model wants.
//!
//! - [`ConvGeometry`]: output size and padding, TF-"SAME" (asymmetric: the extra pixel goes at
//!   the bottom/right, as TensorFlow and timm's `Conv2dSame` pad) or symmetric.
//! - [`conv2d`]: a full `k×k` convolution as im2col + GEMM, in bands of output pixels so that
//!   the patch matrix stays small; the weight is the checkpoint's `[out, in, kh, kw]` viewed as
//!   the `[out, in·kh·kw]` matrix (any stored type [`matmul`] takes).
//! - [`depthwise_conv2d`]: a depthwise `k×k` convolution, threaded over output rows, the inner
//!   loop over channels (autovectorised: no loop-carried dependency, contiguous slices).
//! - A 1×1 convolution needs no function here: [`matmul`] of the image as `[pixels, c_in]`.

use crate::matmul::{matmul, WeightMatrix};
use crate::pool::ThreadPool;

/// Where a convolution's taps fall: input and output sizes, kernel, stride and the padding
/// before the first row and column (the padding after is whatever the output size implies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub in_h: usize,
    pub in_w: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_h: usize,
    pub out_w: usize,
}

/// Largest side, kernel and stride accepted (far above any vision tower; keeps every product
/// in range).
const MAX_SIDE: usize = 1 << 15;

impl ConvGeometry {
    /// TensorFlow's "SAME": `out = ceil(in / stride)`, total padding
    /// `max((out − 1)·stride + k − in, 0)` split with the odd pixel after (bottom/right).
    pub fn same(
        in_h: usize,
        in_w: usize,
        kernel_h: usize,
        kernel_w: usize,
        stride: usize,
    ) -> Option<ConvGeometry> {
        Self::check(in_h, in_w, kernel_h, kernel_w, stride)?;
        let axis = |n: usize, k: usize| {
            let out = n.div_ceil(stride);
            let total = ((out - 1) * stride + k).saturating_sub(n);
            (out, total / 2)
        };
        let (out_h, pad_top) = axis(in_h, kernel_h);
        let (out_w, pad_left) = axis(in_w, kernel_w);
        Some(ConvGeometry {
            in_h,
            in_w,
            kernel_h,
            kernel_w,
            stride,
            pad_top,
            pad_left,
            out_h,
            out_w,
        })
    }

    /// `pad` zeros on every side (PyTorch's `padding=pad`): `out = (in + 2·pad − k) / stride + 1`.
    pub fn symmetric(
        in_h: usize,
        in_w: usize,
        kernel_h: usize,
        kernel_w: usize,
        stride: usize,
        pad: usize,
    ) -> Option<ConvGeometry> {
        Self::check(in_h, in_w, kernel_h, kernel_w, stride)?;
        if pad >= MAX_SIDE || pad >= kernel_h.max(kernel_w) {
            return None;
        }
        let axis = |n: usize, k: usize| (n + 2 * pad).checked_sub(k).map(|r| r / stride + 1);
        Some(ConvGeometry {
            in_h,
            in_w,
            kernel_h,
            kernel_w,
            stride,
            pad_top: pad,
            pad_left: pad,
            out_h: axis(in_h, kernel_h)?,
            out_w: axis(in_w, kernel_w)?,
        })
    }

    fn check(in_h: usize, in_w: usize, kh: usize, kw: usize, stride: usize) -> Option<()> {
        let ok = |v: usize| (1..=MAX_SIDE).contains(&v);
        (ok(in_h) && ok(in_w) && ok(kh) && ok(kw) && ok(stride)).then_some(())
    }

    pub fn in_pixels(&self) -> usize {
        self.in_h * self.in_w
    }

    pub fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    pub fn taps(&self) -> usize {
        self.kernel_h * self.kernel_w
    }

    /// The input row or column tap `k` of output `o` reads, if inside the image.
    #[inline]
    fn source(o: usize, k: usize, stride: usize, pad: usize, n: usize) -> Option<usize> {
        (o * stride + k).checked_sub(pad).filter(|&i| i < n)
    }
}

/// A depthwise weight as stored (`[channels, 1, kh, kw]`, i.e. `[channels, kh·kw]`) rearranged
/// tap-major (`[kh·kw, channels]`), the layout [`depthwise_conv2d`] reads.
pub fn depthwise_taps(weight: &[f32], channels: usize, taps: usize) -> Vec<f32> {
    assert_eq!(
        weight.len(),
        channels * taps,
        "depthwise_taps: weight must hold {channels} x {taps}"
    );
    let mut out = vec![0.0; weight.len()];
    for c in 0..channels {
        for t in 0..taps {
            out[t * channels + c] = weight[c * taps + t];
        }
    }
    out
}

/// `y[oy, ox, c] = Σ_{ky,kx} x[oy·s + ky − pad_top, ox·s + kx − pad_left, c] · w[ky, kx, c]`
/// (zero outside the image) on HWC images; `taps` as [`depthwise_taps`] gives it.
///
/// # Panics
/// If the buffers do not hold `g`'s input, output and taps for `channels`.
#[track_caller]
pub fn depthwise_conv2d(
    pool: &ThreadPool,
    g: &ConvGeometry,
    channels: usize,
    x: &[f32],
    taps: &[f32],
    y: &mut [f32],
) {
    let c = channels;
    assert_eq!(x.len(), g.in_pixels() * c, "depthwise_conv2d: input size");
    assert_eq!(y.len(), g.out_pixels() * c, "depthwise_conv2d: output size");
    assert_eq!(taps.len(), g.taps() * c, "depthwise_conv2d: weight size");
    if c == 0 || y.is_empty() {
        return;
    }
    let row = g.out_w * c;
    // Output rows per task: about 16 tasks per thread, at least one row.
    let rows_per_task = g.out_h.div_ceil(16 * pool.n_threads()).max(1);
    let n_tasks = g.out_h.div_ceil(rows_per_task);
    let out = SharedOut(y.as_mut_ptr());
    let out = &out;
    let simd = simd_selected();
    pool.run(n_tasks, &|task| {
        let first = task * rows_per_task;
        let last = (first + rows_per_task).min(g.out_h);
        // SAFETY: rows first..last are this task's only; `y` holds out_h rows of `row` values.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(out.0.add(first * row), (last - first) * row) };
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2 and FMA are available (the selected ISA).
            unsafe { depthwise_rows_avx2(g, c, x, taps, first, dst) };
            return;
        }
        let _ = simd;
        depthwise_rows(g, c, x, taps, first, dst);
    });
}

/// Output rows `first..` of [`depthwise_conv2d`] into `dst` (whole rows). Plain loops over the
/// channels, inlined into the AVX2 build below (same results: no fused multiply-adds).
#[inline(always)]
fn depthwise_rows(
    g: &ConvGeometry,
    c: usize,
    x: &[f32],
    taps: &[f32],
    first: usize,
    dst: &mut [f32],
) {
    let row = g.out_w * c;
    dst.fill(0.0);
    for (oy, dst_row) in (first..).zip(dst.chunks_exact_mut(row)) {
        for ky in 0..g.kernel_h {
            let Some(iy) = ConvGeometry::source(oy, ky, g.stride, g.pad_top, g.in_h) else {
                continue;
            };
            let src_row = &x[iy * g.in_w * c..(iy + 1) * g.in_w * c];
            for kx in 0..g.kernel_w {
                let w = &taps[(ky * g.kernel_w + kx) * c..][..c];
                for (ox, acc) in dst_row.chunks_exact_mut(c).enumerate() {
                    let Some(ix) = ConvGeometry::source(ox, kx, g.stride, g.pad_left, g.in_w)
                    else {
                        continue;
                    };
                    let src = &src_row[ix * c..(ix + 1) * c];
                    for ((a, &s), &wv) in acc.iter_mut().zip(src).zip(w) {
                        *a += s * wv;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_rows_avx2(
    g: &ConvGeometry,
    c: usize,
    x: &[f32],
    taps: &[f32],
    first: usize,
    dst: &mut [f32],
) {
    depthwise_rows(g, c, x, taps, first, dst);
}

struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint rows (see each use).
unsafe impl Sync for SharedOut {}

/// Patches of output pixels `first .. first + n` as rows of `cols` (`[n, channels·kh·kw]`,
/// each row in `(channel, ky, kx)` order: the order of a `[out, in, kh, kw]` weight's rows);
/// taps outside the image are zero.
///
/// # Panics
/// If `x` is not `g`'s input for `channels`, the pixels are out of range or `cols` is not
/// `n` patches long.
#[track_caller]
pub fn im2col(
    g: &ConvGeometry,
    channels: usize,
    x: &[f32],
    first: usize,
    n: usize,
    cols: &mut [f32],
) {
    let taps = g.taps();
    let patch = channels * taps;
    assert_eq!(x.len(), g.in_pixels() * channels, "im2col: input size");
    assert!(first + n <= g.out_pixels(), "im2col: pixels out of range");
    assert_eq!(cols.len(), n * patch, "im2col: patch buffer size");
    for (p, dst) in (first..first + n).zip(cols.chunks_exact_mut(patch.max(1))) {
        let (oy, ox) = (p / g.out_w, p % g.out_w);
        dst.fill(0.0);
        for ky in 0..g.kernel_h {
            let Some(iy) = ConvGeometry::source(oy, ky, g.stride, g.pad_top, g.in_h) else {
                continue;
            };
            for kx in 0..g.kernel_w {
                let Some(ix) = ConvGeometry::source(ox, kx, g.stride, g.pad_left, g.in_w) else {
                    continue;
                };
                let src = &x[(iy * g.in_w + ix) * channels..][..channels];
                let t = ky * g.kernel_w + kx;
                for (ch, &v) in src.iter().enumerate() {
                    dst[ch * taps + t] = v;
                }
            }
        }
    }
}

/// Patch-matrix elements one band of [`conv2d`] holds (1 Mi floats, 4 MiB).
const BAND_VALUES: usize = 1 << 20;

/// A full convolution on an HWC image: `y[p, o] = Σ w[o, (c, ky, kx)] · patch(p)[(c, ky, kx)]`,
/// `w` the `[c_out, c_in·kh·kw]` view of a `[c_out, c_in, kh, kw]` weight. The patches are
/// built a band of output pixels at a time into `cols` (reused across calls) and multiplied by
/// [`matmul`] (the GEMM for a band of many pixels), threaded by `pool`.
///
/// # Panics
/// If the buffers do not fit `g`, `c_in` and `w`.
#[allow(clippy::too_many_arguments)] // a convolution's geometry, weight, buffers and scratch
#[track_caller]
pub fn conv2d(
    pool: &ThreadPool,
    g: &ConvGeometry,
    c_in: usize,
    w: &WeightMatrix,
    x: &[f32],
    y: &mut [f32],
    cols: &mut Vec<f32>,
    scratch: &mut Vec<u8>,
) {
    let patch = c_in * g.taps();
    assert_eq!(
        w.cols, patch,
        "conv2d: weight columns must be c_in x kh x kw"
    );
    assert_eq!(x.len(), g.in_pixels() * c_in, "conv2d: input size");
    assert_eq!(y.len(), g.out_pixels() * w.rows, "conv2d: output size");
    if patch == 0 || w.rows == 0 {
        return;
    }
    let band = (BAND_VALUES / patch).max(64).min(g.out_pixels());
    let mut first = 0;
    while first < g.out_pixels() {
        let n = band.min(g.out_pixels() - first);
        if cols.len() < n * patch {
            cols.resize(n * patch, 0.0);
        }
        let cols = &mut cols[..n * patch];
        im2col(g, c_in, x, first, n, cols);
        matmul(
            pool,
            w,
            cols,
            n,
            &mut y[first * w.rows..(first + n) * w.rows],
            scratch,
        );
        first += n;
    }
}

/// A CNN's per-pixel norm and activation on an HWC image, in place, split across `pool` by
/// whole pixels: each row of `weight.len()` channels gets `+ bias` (when given), then RMSNorm
/// (`x · rsqrt(mean(x²) + eps) · weight`, timm's `RmsNorm2d` over channels), then GELU-tanh
/// when `gelu`.
///
/// # Panics
/// If `x` is not whole rows of `weight.len()`, or `bias` differs in length from `weight`.
#[track_caller]
pub fn rms_norm_act_rows(
    pool: &ThreadPool,
    x: &mut [f32],
    bias: Option<&[f32]>,
    weight: &[f32],
    eps: f32,
    gelu: bool,
) {
    let dim = weight.len();
    assert!(
        dim > 0 && x.len().is_multiple_of(dim),
        "rms_norm_act_rows: {} values do not split into rows of {dim}",
        x.len()
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), dim, "rms_norm_act_rows: bias length");
    }
    let simd = simd_selected();
    let apply = |rows: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2 and FMA are available (the selected ISA).
            unsafe { norm_act_avx2(rows, bias, weight, eps, gelu) };
            return;
        }
        let _ = simd;
        norm_act(rows, bias, weight, eps, gelu);
    };
    crate::ops::for_each_row_chunk(pool, x, dim, &apply);
}

/// `Σ x²` in eight independent lanes (the compiler keeps them in one vector register).
#[inline]
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|v| v * v).sum::<f32>()
}

/// GELU-tanh as [`crate::ops::gelu_tanh`] (`x · sigmoid(2u)`), with the branch-free polynomial
/// exp so that a row's loop vectorises.
#[inline(always)]
fn gelu_tanh_fast(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + crate::ops::exp::exp_clamped(-2.0 * u))
}

/// Whether the selected ISA has AVX2 + FMA (the plain loops here are then compiled for it).
fn simd_selected() -> bool {
    matches!(
        crate::quant::selected_isa(),
        crate::Isa::Avx2 | crate::Isa::Avx512 | crate::Isa::Avx512Vnni
    )
}

/// The rows of [`rms_norm_act_rows`]. Plain loops, inlined into the AVX2 build below so that
/// they vectorise eight lanes wide (no fused multiply-adds: the compiler keeps the operations
/// as written, so both builds give the same results).
#[inline(always)]
fn norm_act(rows: &mut [f32], bias: Option<&[f32]>, weight: &[f32], eps: f32, gelu: bool) {
    let dim = weight.len();
    for row in rows.chunks_exact_mut(dim) {
        if let Some(b) = bias {
            for (v, b) in row.iter_mut().zip(b) {
                *v += b;
            }
        }
        let scale = 1.0 / (sum_squares(row) / dim as f32 + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
        if gelu {
            for v in row.iter_mut() {
                *v = gelu_tanh_fast(*v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn norm_act_avx2(
    rows: &mut [f32],
    bias: Option<&[f32]>,
    weight: &[f32],
    eps: f32,
    gelu: bool,
) {
    norm_act(rows, bias, weight, eps, gelu);
}
