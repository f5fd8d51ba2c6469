//! Convolutions (im2col + GEMM, depthwise) against a naive scalar reference on random shapes,
//! strides and paddings (TF-"SAME" and symmetric), at several thread counts.

use gemma_kernels::conv::{
    conv2d, depthwise_conv2d, depthwise_taps, rms_norm_act_rows, ConvGeometry,
};
use gemma_kernels::{GgmlType, ThreadPool, WeightMatrix};

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            .collect()
    }
}

/// Naive convolution with `groups` = 1 (full) or `c_in` (depthwise): x HWC, w `[c_out, c_in /
/// groups, kh, kw]`, y HWC.
fn reference(
    g: &ConvGeometry,
    c_in: usize,
    c_out: usize,
    depthwise: bool,
    x: &[f32],
    w: &[f32],
) -> Vec<f32> {
    let mut y = vec![0.0f64; g.out_pixels() * c_out];
    let per_group = if depthwise { 1 } else { c_in };
    for oy in 0..g.out_h {
        for ox in 0..g.out_w {
            for o in 0..c_out {
                let mut acc = 0.0f64;
                for i in 0..per_group {
                    let ch = if depthwise { o } else { i };
                    for ky in 0..g.kernel_h {
                        for kx in 0..g.kernel_w {
                            let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                            let ix = (ox * g.stride + kx) as isize - g.pad_left as isize;
                            if iy < 0 || ix < 0 || iy >= g.in_h as isize || ix >= g.in_w as isize {
                                continue;
                            }
                            let xv = x[(iy as usize * g.in_w + ix as usize) * c_in + ch];
                            let wv = w[((o * per_group + i) * g.kernel_h + ky) * g.kernel_w + kx];
                            acc += xv as f64 * wv as f64;
                        }
                    }
                }
                y[(oy * g.out_w + ox) * c_out + o] = acc;
            }
        }
    }
    y.into_iter().map(|v| v as f32).collect()
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn geometry(rng: &mut Rng) -> ConvGeometry {
    loop {
        let (h, w) = (1 + rng.below(23), 1 + rng.below(23));
        let k = [1, 3, 5, 7][rng.below(4)];
        let (kh, kw) = if rng.below(4) == 0 {
            (k, [1, 3, 5][rng.below(3)])
        } else {
            (k, k)
        };
        let stride = 1 + rng.below(3);
        let g = if rng.below(2) == 0 {
            ConvGeometry::same(h, w, kh, kw, stride)
        } else {
            ConvGeometry::symmetric(h, w, kh, kw, stride, rng.below(kh.max(kw)))
        };
        if let Some(g) = g {
            return g;
        }
    }
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "{what}: [{i}] {a} vs {b}"
        );
    }
}

#[test]
fn same_padding_matches_tensorflow() {
    // 768 → 384 with k3 s2: one pixel of padding, after (bottom/right).
    let g = ConvGeometry::same(768, 768, 3, 3, 2).unwrap();
    assert_eq!((g.out_h, g.out_w, g.pad_top, g.pad_left), (384, 384, 0, 0));
    // Odd input: 7 → 4 with k3 s2: total 2, one each side.
    let g = ConvGeometry::same(7, 7, 3, 3, 2).unwrap();
    assert_eq!((g.out_h, g.pad_top), (4, 1));
    // k5 s2 on 96: total 3, 1 before.
    let g = ConvGeometry::same(96, 96, 5, 5, 2).unwrap();
    assert_eq!((g.out_h, g.pad_top), (48, 1));
    // Stride 1, odd kernel: symmetric k/2.
    let g = ConvGeometry::same(10, 9, 5, 5, 1).unwrap();
    assert_eq!((g.out_h, g.out_w, g.pad_top, g.pad_left), (10, 9, 2, 2));
    assert!(ConvGeometry::same(0, 9, 3, 3, 1).is_none());
    assert!(ConvGeometry::same(9, 9, 3, 3, 0).is_none());
    assert!(ConvGeometry::symmetric(2, 2, 5, 5, 1, 1).is_none());
}

#[test]
fn conv2d_matches_reference() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let pools = [ThreadPool::new(1), ThreadPool::new(3)];
    let mut cols = Vec::new();
    let mut scratch = Vec::new();
    for case in 0..60 {
        let g = geometry(&mut rng);
        let c_in = 1 + rng.below(9);
        let c_out = 1 + rng.below(20);
        let x = rng.floats(g.in_pixels() * c_in);
        let w = rng.floats(c_out * c_in * g.taps());
        let want = reference(&g, c_in, c_out, false, &x, &w);
        let bytes = f32_bytes(&w);
        let m = WeightMatrix::new(GgmlType::F32, c_out, c_in * g.taps(), &bytes).unwrap();
        for pool in &pools {
            let mut y = vec![f32::NAN; g.out_pixels() * c_out];
            conv2d(pool, &g, c_in, &m, &x, &mut y, &mut cols, &mut scratch);
            assert_close(
                &y,
                &want,
                &format!("case {case} {g:?} c_in {c_in} c_out {c_out}"),
            );
        }
    }
}

#[test]
fn depthwise_matches_reference() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let pools = [ThreadPool::new(1), ThreadPool::new(4)];
    for case in 0..80 {
        let g = geometry(&mut rng);
        let c = 1 + rng.below(40);
        let x = rng.floats(g.in_pixels() * c);
        let w = rng.floats(c * g.taps());
        let want = reference(&g, c, c, true, &x, &w);
        let taps = depthwise_taps(&w, c, g.taps());
        for pool in &pools {
            let mut y = vec![f32::NAN; g.out_pixels() * c];
            depthwise_conv2d(pool, &g, c, &x, &taps, &mut y);
            assert_close(&y, &want, &format!("case {case} {g:?} c {c}"));
        }
    }
}

#[test]
fn large_conv_runs_in_bands() {
    // More patch values than one band holds: several GEMM bands, the last one partial.
    let mut rng = Rng(7);
    let g = ConvGeometry::same(64, 72, 3, 3, 1).unwrap();
    let (c_in, c_out) = (200, 8);
    let x = rng.floats(g.in_pixels() * c_in);
    let w = rng.floats(c_out * c_in * 9);
    let want = reference(&g, c_in, c_out, false, &x, &w);
    let bytes = f32_bytes(&w);
    let m = WeightMatrix::new(GgmlType::F32, c_out, c_in * 9, &bytes).unwrap();
    let mut y = vec![0.0; g.out_pixels() * c_out];
    conv2d(
        &ThreadPool::new(2),
        &g,
        c_in,
        &m,
        &x,
        &mut y,
        &mut Vec::new(),
        &mut Vec::new(),
    );
    assert_close(&y, &want, "banded");
}

#[test]
fn norm_act_rows_matches_reference() {
    let mut rng = Rng(11);
    let dim = 24;
    let x = rng.floats(dim * 3000);
    let w = rng.floats(dim);
    let b = rng.floats(dim);
    for (bias, gelu) in [(None, false), (Some(&b[..]), true)] {
        let mut want = x.clone();
        for row in want.chunks_exact_mut(dim) {
            if let Some(b) = bias {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
            let ms: f64 = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
            let s = 1.0 / (ms + 1e-6).sqrt();
            for (v, w) in row.iter_mut().zip(&w) {
                let n = *v as f64 * s * *w as f64;
                *v = if gelu {
                    (0.5 * n
                        * (1.0
                            + ((2.0 / std::f64::consts::PI).sqrt() * (n + 0.044715 * n * n * n))
                                .tanh())) as f32
                } else {
                    n as f32
                };
            }
        }
        let mut got = x.clone();
        rms_norm_act_rows(&ThreadPool::new(3), &mut got, bias, &w, 1e-6, gelu);
        assert_close(&got, &want, "norm_act");
    }
}
