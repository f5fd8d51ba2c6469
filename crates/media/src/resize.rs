//! Antialiased bilinear resize of 8-bit RGB images, bit-exact with the reference.
//!
//! transformers 5 resizes with torchvision `resize(..., BILINEAR, antialias=True)` on `uint8`
//! tensors. On the CPU PyTorch runs that through `_upsample_bilinear2d_aa` for `uint8`, a port of
//! Pillow-SIMD's separable convolution:
//!
//! * per axis, a triangle filter stretched by the scale when downsampling (support = scale), with
//!   PyTorch's bounds `xmin = trunc(center - support + 0.5)`, `xmax = trunc(center + support + 0.5)`
//!   and weights normalised to sum 1 in `f64`;
//! * the weights are then quantised to `i16` with a precision chosen so that the largest weight
//!   still fits in 15 bits (at most 22 bits), and each output is
//!   `clamp((2^(p-1) + Σ w·pixel) >> p, 0, 255)`;
//! * the horizontal pass runs first and is rounded to `u8`, then the vertical pass; an axis whose
//!   size does not change is skipped.
//!
//! Pillow's `Image.resize(BILINEAR)` is the same algorithm with 22-bit `i32` weights, so it can
//! differ from this by one level on a few pixels; we follow PyTorch because that is what the
//! reference processor runs. Reproducing the integer arithmetic exactly (rather than using a
//! generic resizer) is what makes our `pixel_values` byte-identical to the reference.

use image::RgbImage;

/// Quantised filter taps for one axis.
struct AxisTaps {
    /// For each output index: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output index (zero-padded).
    weights: Vec<i16>,
    ksize: usize,
    /// Fixed-point precision of `weights`, in bits.
    precision: u32,
}

impl AxisTaps {
    /// PyTorch's `_compute_indices_int16_weights_aa` for the linear filter, operation for operation.
    fn new(in_size: usize, out_size: usize) -> AxisTaps {
        let scale = in_size as f64 / out_size as f64;
        // Downsampling stretches the triangle over `scale` input pixels (the antialiasing).
        let (support, invscale) = if scale >= 1.0 {
            (scale, 1.0 / scale)
        } else {
            (1.0, 1.0)
        };
        let ksize = support.ceil() as usize * 2 + 1;

        let mut bounds = Vec::with_capacity(out_size);
        let mut wf = vec![0f64; out_size * ksize];
        for (i, row) in wf.chunks_exact_mut(ksize).enumerate() {
            let center = scale * (i as f64 + 0.5);
            // `as i64` truncates toward zero like the C++ `static_cast<int64_t>`.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let len = (xmax - xmin).max(0) as usize;
            let mut total = 0.0;
            for (j, w) in row.iter_mut().take(len).enumerate() {
                let x = ((j as i64 + xmin) as f64 - center + 0.5) * invscale;
                *w = triangle(x);
                total += *w;
            }
            if total != 0.0 {
                for w in row.iter_mut().take(len) {
                    *w /= total;
                }
            }
            bounds.push((xmin as usize, len));
        }

        // Largest precision (up to 22 bits) for which the biggest weight still fits in an i16.
        let w_max = wf.iter().copied().fold(wf[0], f64::max);
        let mut precision = 0u32;
        while precision < 22 {
            let next = (0.5 + w_max * (1u64 << (precision + 1)) as f64) as i64;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let weights = wf
            .iter()
            .map(|&v| {
                let scaled = v * (1u64 << precision) as f64;
                // Round half away from zero, then truncate (C's `(int)` cast).
                (if v < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i16
            })
            .collect();
        AxisTaps {
            bounds,
            weights,
            ksize,
            precision,
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i16]) {
        let (start, len) = self.bounds[i];
        (start, &self.weights[i * self.ksize..i * self.ksize + len])
    }
}

/// Pillow's bilinear filter: a triangle of half-width 1.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Fixed-point accumulator to `u8`: arithmetic shift, then saturate (PyTorch's `packs`/`packus`).
#[inline(always)]
fn to_u8(acc: i32, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// Resizes `img` to `width`×`height` exactly as the reference processor does (see module docs).
/// The aspect ratio is not kept, as in Gemma's processors.
///
/// # Panics
/// If the source or the target has no pixels ([`decode_image`](crate::decode_image) never
/// returns such an image).
pub fn resize_bilinear_antialias(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    assert!(width > 0 && height > 0, "resize target must not be empty");
    assert!(
        img.width() > 0 && img.height() > 0,
        "cannot resize an empty image"
    );
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let data = match (out_w != in_w, out_h != in_h) {
        (true, true) => vertical(
            &horizontal(img.as_raw(), in_w, in_h, out_w),
            out_w,
            in_h,
            out_h,
        ),
        (true, false) => horizontal(img.as_raw(), in_w, in_h, out_w),
        (false, true) => vertical(img.as_raw(), in_w, in_h, out_h),
        (false, false) => img.as_raw().clone(),
    };
    RgbImage::from_raw(width, height, data).expect("resize produced the buffer size it promised")
}

/// Rows resampled together by [`horizontal`].
const STRIP: usize = 16;

/// Runs `work(first_row, rows)` over `out` (rows of `row_bytes`) cut into contiguous chunks of
/// whole `align`-row groups, on several threads when the image is big enough to be worth it.
/// Each output row is computed by exactly the same arithmetic whatever the split.
fn for_row_chunks(
    out: &mut [u8],
    row_bytes: usize,
    align: usize,
    cost: usize,
    work: impl Fn(usize, &mut [u8]) + Sync,
) {
    let rows = out.len() / row_bytes;
    // About a megapixel of input per thread; small images stay on the caller's thread.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
        .min(cost / (1 << 20) + 1);
    let chunk_rows = rows.div_ceil(threads).div_ceil(align) * align;
    if threads <= 1 || chunk_rows >= rows {
        work(0, out);
        return;
    }
    std::thread::scope(|scope| {
        for (i, chunk) in out.chunks_mut(chunk_rows * row_bytes).enumerate() {
            let work = &work;
            scope.spawn(move || work(i * chunk_rows, chunk));
        }
    });
}

/// Resamples every row from `in_w` to `out_w` pixels.
///
/// Done a strip of [`STRIP`] rows at a time, transposed so that the same pixel of all those rows
/// is contiguous: each tap is then one multiply-add over `STRIP * 3` adjacent values, which the
/// compiler vectorises, instead of three scalar ones.
fn horizontal(src: &[u8], in_w: usize, h: usize, out_w: usize) -> Vec<u8> {
    const LANES: usize = STRIP * 3;
    let taps = AxisTaps::new(in_w, out_w);
    let bias = 1i32 << (taps.precision - 1);
    let p = taps.precision;
    let mut out = vec![0u8; out_w * h * 3];
    for_row_chunks(&mut out, out_w * 3, STRIP, in_w * h, |first_row, out| {
        let mut columns = vec![0u8; in_w * LANES];
        let mut acc = [0i32; LANES];
        for (strip, out_rows) in out.chunks_mut(STRIP * out_w * 3).enumerate() {
            let y0 = first_row + strip * STRIP;
            let rows = out_rows.len() / (out_w * 3);
            let src_rows = &src[y0 * in_w * 3..(y0 + rows) * in_w * 3];
            for (r, row) in src_rows.chunks_exact(in_w * 3).enumerate() {
                for (column, px) in columns.chunks_exact_mut(LANES).zip(row.chunks_exact(3)) {
                    column[r * 3..r * 3 + 3].copy_from_slice(px);
                }
            }
            for x in 0..out_w {
                let (start, weights) = taps.taps(x);
                acc.fill(bias);
                let window = &columns[start * LANES..(start + weights.len()) * LANES];
                for (column, &k) in window.chunks_exact(LANES).zip(weights) {
                    let k = k as i32;
                    for (a, &s) in acc.iter_mut().zip(column) {
                        *a += s as i32 * k;
                    }
                }
                for (r, out_row) in out_rows.chunks_exact_mut(out_w * 3).enumerate() {
                    for c in 0..3 {
                        out_row[x * 3 + c] = to_u8(acc[r * 3 + c], p);
                    }
                }
            }
        }
    });
    out
}

/// Resamples every column from `in_h` to `out_h` pixels (rows are `w` RGB pixels).
fn vertical(src: &[u8], w: usize, in_h: usize, out_h: usize) -> Vec<u8> {
    let taps = AxisTaps::new(in_h, out_h);
    let bias = 1i32 << (taps.precision - 1);
    let p = taps.precision;
    let stride = w * 3;
    let mut out = vec![0u8; out_h * stride];
    for_row_chunks(&mut out, stride, 1, w * in_h, |first_row, out| {
        // One accumulator row: the inner loop runs over contiguous bytes and vectorises.
        let mut acc = vec![0i32; stride];
        for (y, out_row) in out.chunks_exact_mut(stride).enumerate() {
            let (start, weights) = taps.taps(first_row + y);
            acc.fill(bias);
            for (k, &wk) in weights.iter().enumerate() {
                let row = &src[(start + k) * stride..(start + k + 1) * stride];
                let wk = wk as i32;
                for (a, &s) in acc.iter_mut().zip(row) {
                    *a += s as i32 * wk;
                }
            }
            for (o, &a) in out_row.iter_mut().zip(&acc) {
                *o = to_u8(a, p);
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for &(i, o) in &[
            (4000, 896),
            (896, 896),
            (64, 896),
            (3, 7),
            (1000, 1),
            (7, 3),
        ] {
            let t = AxisTaps::new(i, o);
            assert!(t.precision >= 14 && t.precision <= 22);
            for x in 0..o {
                let (start, w) = t.taps(x);
                assert!(start + w.len() <= i);
                let sum: i32 = w.iter().map(|&k| k as i32).sum();
                // Rounding each weight can move the sum by at most half a unit per tap.
                assert!(
                    (sum - (1 << t.precision)).abs() <= w.len() as i32,
                    "{i}->{o} at {x}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([10, 128, 255]));
        for &(w, h) in &[(64, 64), (5, 9), (37, 1), (1, 23)] {
            let out = resize_bilinear_antialias(&img, w, h);
            assert!(out.pixels().all(|p| p.0 == [10, 128, 255]), "{w}x{h}");
        }
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        assert_eq!(resize_bilinear_antialias(&img, 5, 4), img);
    }

    #[test]
    fn halving_uses_the_stretched_triangle() {
        // Halving stretches the triangle over 4 inputs: taps 3/7, 3/7, 1/7 at the left border
        // and 1/7, 3/7, 3/7 at the right one (worked out by hand from PyTorch's formulas).
        let img = RgbImage::from_fn(4, 1, |x, _| {
            image::Rgb([[0, 255, 10, 21][x as usize], 0, 0])
        });
        let out = resize_bilinear_antialias(&img, 2, 1);
        assert_eq!(out.get_pixel(0, 0).0[0], 111); // 110.71
        assert_eq!(out.get_pixel(1, 0).0[0], 50); // 49.71
    }

    /// The textbook form of the same arithmetic, one pixel and channel at a time.
    fn naive(img: &RgbImage, w: u32, h: u32) -> RgbImage {
        let (iw, ih) = (img.width() as usize, img.height() as usize);
        let pass = |src: &dyn Fn(usize, usize, usize) -> u8,
                    taps: &AxisTaps,
                    n: usize,
                    m: usize,
                    horiz: bool| {
            let mut out = vec![0u8; n * m * 3];
            for a in 0..m {
                for b in 0..n {
                    let (start, ws) = taps.taps(b);
                    for c in 0..3 {
                        let mut acc = 1i32 << (taps.precision - 1);
                        for (k, &wk) in ws.iter().enumerate() {
                            let v = if horiz {
                                src(start + k, a, c)
                            } else {
                                src(a, start + k, c)
                            };
                            acc += v as i32 * wk as i32;
                        }
                        let idx = if horiz {
                            (a * n + b) * 3 + c
                        } else {
                            (b * m + a) * 3 + c
                        };
                        out[idx] = to_u8(acc, taps.precision);
                    }
                }
            }
            out
        };
        let raw = img.as_raw();
        let mut cur = raw.clone();
        let mut cw = iw;
        if w as usize != iw {
            let t = AxisTaps::new(iw, w as usize);
            cur = pass(
                &|x, y, c| raw[(y * iw + x) * 3 + c],
                &t,
                w as usize,
                ih,
                true,
            );
            cw = w as usize;
        }
        if h as usize != ih {
            let t = AxisTaps::new(ih, h as usize);
            let prev = cur.clone();
            cur = pass(
                &|x, y, c| prev[(y * cw + x) * 3 + c],
                &t,
                h as usize,
                cw,
                false,
            );
        }
        RgbImage::from_raw(w, h, cur).unwrap()
    }

    #[test]
    fn fast_paths_equal_the_textbook_arithmetic() {
        // Pseudo-random content and sizes that exercise partial strips, upscaling, one-axis
        // resizes and (for the large one) the multi-threaded split.
        let mut seed = 12345u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (seed >> 16) as u8
        };
        for &(iw, ih, ow, oh) in &[
            (37, 23, 16, 16),
            (50, 41, 64, 64),
            (33, 17, 33, 5),
            (9, 40, 20, 40),
            (1500, 1100, 96, 80),
        ] {
            let img = RgbImage::from_fn(iw, ih, |_, _| image::Rgb([rnd(), rnd(), rnd()]));
            assert_eq!(
                resize_bilinear_antialias(&img, ow, oh),
                naive(&img, ow, oh),
                "{iw}x{ih} -> {ow}x{oh}"
            );
        }
    }
}
