//! Element-wise and normalisation ops on f32 activations, plus attention.
//!
//! These are the non-matmul pieces of a transformer forward pass. They are written for
//! clarity first; each takes its output buffer from the caller so the decode loop does not
//! allocate.

use crate::pool::ThreadPool;
use crate::quant::Isa;

/// Runs an element-wise loop (`$f($args)`, an `#[inline(always)]` function) compiled for the
/// widest vectors `$isa` allows: AVX-512, AVX2, or the baseline. The loops hold no fused
/// multiply-adds (Rust never forms them), so every build computes the same bits; only the
/// vector width changes.
macro_rules! element_wise {
    ($isa:expr, $f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2")]
            unsafe fn wide(f: impl FnOnce()) {
                f()
            }
            #[target_feature(enable = "avx2")]
            unsafe fn avx2(f: impl FnOnce()) {
                f()
            }
            match $isa {
                // SAFETY: callers check that `$isa` is available on this CPU.
                Isa::Avx512 | Isa::Avx512Vnni => unsafe {
                    wide(#[inline(always)] || $f($($arg),*))
                },
                // SAFETY: as above.
                Isa::Avx2 => unsafe { avx2(#[inline(always)] || $f($($arg),*)) },
                _ => $f($($arg),*),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $isa;
            $f($($arg),*)
        }
    }};
}

/// RMSNorm of each `dim`-sized row of `x`, multiplied by `weight` (the *effective* multiplier:
/// Gemma 3's `1 + w` is folded in at load time, Gemma 3n uses `w` as is), in place.
/// Computed in f32 like the reference (`x * rsqrt(mean(x²) + eps) * weight`).
#[track_caller]
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    assert!(
        dim > 0 && x.len().is_multiple_of(dim),
        "rms_norm: {} values do not split into rows of {dim}",
        x.len()
    );
    for row in x.chunks_exact_mut(dim) {
        let scale = rms_scale(row, eps);
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// RMSNorm without a weight (Gemma 3n's value norm), in place.
pub fn rms_norm_no_weight_inplace(x: &mut [f32], dim: usize, eps: f32) {
    assert!(dim > 0 && x.len().is_multiple_of(dim));
    for row in x.chunks_exact_mut(dim) {
        let scale = rms_scale(row, eps);
        row.iter_mut().for_each(|v| *v *= scale);
    }
}

fn rms_scale(row: &[f32], eps: f32) -> f32 {
    // Accumulate in f64: rows are short and this keeps the norm independent of summation order.
    let sum_sq: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let mean = (sum_sq / row.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// LayerNorm of each `dim`-sized row of `x` (`dim = weight.len()`), in place: PyTorch's
/// `nn.LayerNorm`, `(x - mean) / sqrt(var + eps) * weight + bias` with the biased variance
/// (SigLIP's norms; not Gemma's RMSNorm). Mean and variance accumulate in f64, two passes,
/// so the result does not depend on summation order and a large mean does not cancel the
/// variance away.
#[track_caller]
pub fn layer_norm_inplace(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let dim = weight.len();
    assert!(
        dim > 0 && bias.len() == dim && x.len().is_multiple_of(dim),
        "layer_norm: {} values do not split into rows of {dim}, or the bias has {} values",
        x.len(),
        bias.len()
    );
    for row in x.chunks_exact_mut(dim) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
        let var = row
            .iter()
            .map(|&v| {
                let d = v as f64 - mean;
                d * d
            })
            .sum::<f64>()
            / dim as f64;
        let scale = (1.0 / (var + eps as f64).sqrt()) as f32;
        let mean = mean as f32;
        for ((v, w), b) in row.iter_mut().zip(weight).zip(bias) {
            *v = (*v - mean) * scale * w + b;
        }
    }
}

/// Adds `bias` to every `bias.len()`-sized row of `x` (a linear layer's bias).
#[track_caller]
pub fn add_bias_inplace(x: &mut [f32], bias: &[f32]) {
    let dim = bias.len();
    assert!(
        dim > 0 && x.len().is_multiple_of(dim),
        "add_bias: {} values do not split into rows of {dim}",
        x.len()
    );
    for row in x.chunks_exact_mut(dim) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`).
///
/// Computed as `x · sigmoid(2u)`, which equals `0.5 · x · (1 + tanh(u))` exactly in real
/// arithmetic and needs one `exp` instead of a (much slower) `tanh`; the `exp` is
/// [`exp::exp_clamped`], so loops over it vectorise (libm's `expf` was a call per value).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    // For very negative u the exp saturates at e^88, so x / e^88 stands in for the limit -0
    // (-6e-36 at x = -1000).
    x / (1.0 + exp::exp_clamped(-2.0 * u))
}

/// `gate = gelu_tanh(gate) * up`, the gated MLP's activation, in place into `gate`.
#[track_caller]
pub fn gelu_tanh_mul_inplace(gate: &mut [f32], up: &[f32]) {
    gelu_tanh_mul_with(crate::quant::selected_isa(), gate, up);
}

/// [`gelu_tanh_mul_inplace`] compiled for `isa` (the same bits on every ISA; tests check).
#[track_caller]
pub fn gelu_tanh_mul_with(isa: Isa, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gelu_mul: gate and up lengths differ");
    assert!(
        isa.is_available(),
        "ISA {isa:?} is not available on this CPU"
    );
    #[inline(always)]
    fn body(gate: &mut [f32], up: &[f32]) {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = gelu_tanh(*g) * u;
        }
    }
    element_wise!(isa, body(gate, up));
}

/// [`gelu_tanh_mul_inplace`] split across `pool` in chunks (prefill has millions of values).
#[track_caller]
pub fn gelu_tanh_mul_parallel(pool: &ThreadPool, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gelu_mul: gate and up lengths differ");
    const CHUNK: usize = 16 * 1024;
    if gate.len() <= CHUNK {
        gelu_tanh_mul_inplace(gate, up);
        return;
    }
    struct GatePtr(*mut f32);
    // SAFETY: each task writes its own chunk of `gate`.
    unsafe impl Sync for GatePtr {}
    let ptr = GatePtr(gate.as_mut_ptr());
    let ptr = &ptr;
    let n = gate.len();
    pool.run(n.div_ceil(CHUNK), &|task| {
        let start = task * CHUNK;
        let len = CHUNK.min(n - start);
        // SAFETY: disjoint chunk of the exclusively borrowed `gate`.
        let g = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(start), len) };
        gelu_tanh_mul_inplace(g, &up[start..start + len]);
    });
}

/// `x = gelu_tanh(x + bias)` for every `bias.len()`-sized row of `x` (a non-gated MLP's
/// first projection and activation, SigLIP's `fc1`), split across `pool` by whole rows.
#[track_caller]
pub fn add_bias_gelu_tanh_parallel(pool: &ThreadPool, x: &mut [f32], bias: &[f32]) {
    let dim = bias.len();
    assert!(
        dim > 0 && x.len().is_multiple_of(dim),
        "bias_gelu: {} values do not split into rows of {dim}",
        x.len()
    );
    let apply = |rows: &mut [f32]| {
        for row in rows.chunks_exact_mut(dim) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = gelu_tanh(*v + b);
            }
        }
    };
    for_each_row_chunk(pool, x, dim, &apply);
}

/// Runs `apply` over `x` cut into whole rows of `dim` values, about 16 K values a task, split
/// across `pool` (each task gets its own rows); on the caller's thread when one task would do.
#[track_caller]
pub fn for_each_row_chunk(
    pool: &ThreadPool,
    x: &mut [f32],
    dim: usize,
    apply: &(dyn Fn(&mut [f32]) + Sync),
) {
    assert!(
        dim > 0 && x.len().is_multiple_of(dim),
        "for_each_row_chunk: {} values do not split into rows of {dim}",
        x.len()
    );
    const CHUNK: usize = 16 * 1024;
    let rows_per_task = CHUNK.div_ceil(dim);
    let n_rows = x.len() / dim;
    if n_rows <= rows_per_task || pool.n_threads() == 1 {
        apply(x);
        return;
    }
    struct RowsPtr(*mut f32);
    // SAFETY: each task writes its own rows of `x`.
    unsafe impl Sync for RowsPtr {}
    let ptr = RowsPtr(x.as_mut_ptr());
    let ptr = &ptr;
    pool.run(n_rows.div_ceil(rows_per_task), &|task| {
        let first = task * rows_per_task;
        let n = rows_per_task.min(n_rows - first);
        // SAFETY: rows `first..first + n` of the exclusively borrowed `x`, disjoint per task.
        let rows = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(first * dim), n * dim) };
        apply(rows);
    });
}

/// `y += x`.
#[track_caller]
/// Whether every value is finite (no NaN, no infinity). Reads 8 lanes at a time with no
/// early exit, so the compiler vectorizes it.
pub fn all_finite(x: &[f32]) -> bool {
    let mut chunks = x.chunks_exact(8);
    let mut bad = false;
    for c in chunks.by_ref() {
        bad |= c.iter().fold(false, |b, v| b | !v.is_finite());
    }
    bad |= chunks.remainder().iter().any(|v| !v.is_finite());
    !bad
}

pub fn add_inplace(y: &mut [f32], x: &[f32]) {
    assert_eq!(y.len(), x.len(), "add: lengths differ");
    y.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

/// `x *= s`.
pub fn scale_inplace(x: &mut [f32], s: f32) {
    x.iter_mut().for_each(|v| *v *= s);
}

/// `cap * tanh(x / cap)` (Gemma's logit soft-capping), with `tanh(y) = ±(1 − t) / (1 + t)`,
/// `t = e^(−2|y|)` from [`exp::exp_clamped`]: a loop the compiler vectorises, where libm's
/// `tanhf` cost a call per logit (262,144 per generated token of a Gemma 3n; about 5 % of its
/// decode). Absolute error under 2.5e-7 of `tanh` (tested), so under 1e-5 of a logit capped at
/// 30; ±∞ give ±cap and NaN stays NaN, as with `tanh`.
pub fn softcap_inplace(x: &mut [f32], cap: f32) {
    softcap_with(crate::quant::selected_isa(), x, cap);
}

/// [`softcap_inplace`] compiled for `isa` (the same bits on every ISA; tests check).
#[track_caller]
pub fn softcap_with(isa: Isa, x: &mut [f32], cap: f32) {
    assert!(
        isa.is_available(),
        "ISA {isa:?} is not available on this CPU"
    );
    #[inline(always)]
    fn body(x: &mut [f32], cap: f32) {
        x.iter_mut().for_each(|v| {
            let y = *v / cap;
            let t = exp::exp_clamped(-2.0 * y.abs());
            *v = cap * ((1.0 - t) / (1.0 + t)).copysign(y);
        });
    }
    element_wise!(isa, body(x, cap));
}

/// Rotary position embedding with the "rotate half" (NeoX) layout used by Gemma.
#[derive(Clone, Debug)]
pub struct Rope {
    /// Per-pair inverse frequency, already divided by the linear scaling factor.
    inv_freq: Vec<f32>,
    head_dim: usize,
}

impl Rope {
    /// `theta` is the base; `linear_factor` divides positions (1.0 for none).
    pub fn new(head_dim: usize, theta: f32, linear_factor: f32) -> Rope {
        assert!(
            head_dim.is_multiple_of(2),
            "rope needs an even head_dim, got {head_dim}"
        );
        let inv_freq = (0..head_dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f64 / head_dim as f64;
                ((1.0 / (theta as f64).powf(exponent)) / linear_factor as f64) as f32
            })
            .collect();
        Rope { inv_freq, head_dim }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Rotate every head of one token (`x` = `n_heads * head_dim` values) at `pos`.
    #[track_caller]
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        assert!(
            x.len().is_multiple_of(self.head_dim),
            "rope: {} values are not whole heads of {}",
            x.len(),
            self.head_dim
        );
        let half = self.head_dim / 2;
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let (sin, cos) = sin_cos(pos, f);
            for head in x.chunks_exact_mut(self.head_dim) {
                rotate_pair(head, i, half, sin, cos);
            }
        }
    }

    /// The rotation at `pos` as `head_dim` values, `(sin, cos)` per frequency: computed once per
    /// token and applied by every layer with this rope ([`Rope::apply_rotation`]), instead of
    /// `head_dim / 2` f64 sin/cos per head and layer.
    #[track_caller]
    pub fn rotation(&self, pos: usize, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            self.head_dim,
            "rope: rotation holds head_dim values"
        );
        for (pair, &f) in out.chunks_exact_mut(2).zip(&self.inv_freq) {
            let (sin, cos) = sin_cos(pos, f);
            pair.copy_from_slice(&[sin, cos]);
        }
    }

    /// [`Rope::apply`] with a rotation from [`Rope::rotation`] (the same bits).
    #[track_caller]
    pub fn apply_rotation(&self, x: &mut [f32], rotation: &[f32]) {
        assert!(
            x.len().is_multiple_of(self.head_dim) && rotation.len() == self.head_dim,
            "rope: {} values are not whole heads of {}, or the rotation is not one head",
            x.len(),
            self.head_dim
        );
        let half = self.head_dim / 2;
        for (i, pair) in rotation.chunks_exact(2).enumerate() {
            for head in x.chunks_exact_mut(self.head_dim) {
                rotate_pair(head, i, half, pair[0], pair[1]);
            }
        }
    }
}

/// The angle `pos * f` is formed in f32 as the reference does; sin/cos are then exact.
#[inline]
fn sin_cos(pos: usize, f: f32) -> (f32, f32) {
    let angle = (pos as f32 * f) as f64;
    (angle.sin() as f32, angle.cos() as f32)
}

/// Rotates the pair `(head[i], head[i + half])` by the angle with `sin` and `cos`.
#[inline(always)]
fn rotate_pair(head: &mut [f32], i: usize, half: usize, sin: f32, cos: f32) {
    let (a, b) = (head[i], head[i + half]);
    head[i] = a * cos - b * sin;
    head[i + half] = b * cos + a * sin;
}

/// In-place softmax over `x`.
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

pub mod attention;
pub mod exp;
pub mod kv;

#[cfg(test)]
mod gelu_tests {
    use super::*;

    /// The textbook tanh form, in f64.
    fn gelu_reference(x: f64) -> f64 {
        let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044_715 * x * x * x);
        0.5 * x * (1.0 + u.tanh())
    }

    #[test]
    fn sigmoid_form_matches_tanh_form() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let got = gelu_tanh(x) as f64;
            let want = gelu_reference(x as f64);
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{x}: {got} vs {want}"
            );
        }
        assert!(gelu_tanh(-1000.0).abs() < 1e-30);
        assert_eq!(gelu_tanh(1000.0), 1000.0);
    }

    #[test]
    fn parallel_gelu_mul_matches_serial() {
        let pool = ThreadPool::new(3);
        let n = 40_000;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let up: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut serial = gate.clone();
        gelu_tanh_mul_inplace(&mut serial, &up);
        let mut parallel = gate;
        gelu_tanh_mul_parallel(&pool, &mut parallel, &up);
        assert_eq!(serial, parallel);
    }

    /// The AVX2 and AVX-512 builds of the element-wise loops give the baseline's bits.
    #[test]
    fn element_wise_loops_give_the_same_bits_on_every_isa() {
        let n = 10_007;
        let mut gate: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 12.0).collect();
        gate.extend([0.0, -0.0, 1e-30, -1e4, 1e4, f32::NAN, f32::INFINITY]);
        let up: Vec<f32> = (0..gate.len()).map(|i| (i as f32 * 0.11).cos()).collect();
        let logits: Vec<f32> = gate.iter().map(|g| g * 7.0).collect();
        let (mut want_g, mut want_s) = (gate.clone(), logits.clone());
        gelu_tanh_mul_with(Isa::Scalar, &mut want_g, &up);
        softcap_with(Isa::Scalar, &mut want_s, 30.0);
        for isa in crate::quant::available_isas() {
            let (mut g, mut s) = (gate.clone(), logits.clone());
            gelu_tanh_mul_with(isa, &mut g, &up);
            softcap_with(isa, &mut s, 30.0);
            assert!(
                g.iter()
                    .zip(&want_g)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?}"
            );
            assert!(
                s.iter()
                    .zip(&want_s)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?}"
            );
        }
    }

    /// Soft-capping against `cap · tanh(x / cap)` in f64: near 0 (where `tanh(y) ≈ y`), across
    /// the range, far past it, and at the special values.
    #[test]
    fn softcap_is_capped_tanh() {
        let cap = 30.0f32;
        let mut x: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 1e-3).collect();
        x.extend([
            1e-30,
            -1e-30,
            1e-8,
            0.0,
            -0.0,
            1e6,
            -1e6,
            f32::MAX,
            f32::MIN,
        ]);
        let mut capped = x.clone();
        softcap_inplace(&mut capped, cap);
        for (&v, &c) in x.iter().zip(&capped) {
            let want = cap as f64 * (v as f64 / cap as f64).tanh();
            assert!(
                (c as f64 - want).abs() <= 2.5e-7 * cap as f64,
                "softcap({v}) = {c}, want {want}"
            );
            assert!(c.abs() <= cap);
        }
        let mut special = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
        softcap_inplace(&mut special, cap);
        assert_eq!(special[..2], [cap, -cap]);
        assert!(special[2].is_nan());
    }
}

#[cfg(test)]
mod rope_tests {
    use super::*;

    #[test]
    fn a_precomputed_rotation_rotates_exactly_as_apply() {
        for (theta, factor) in [(10_000.0, 1.0), (1_000_000.0, 8.0)] {
            let rope = Rope::new(64, theta, factor);
            let mut rotation = vec![0.0; 64];
            for pos in [0, 1, 17, 4095, 131_071] {
                let heads: Vec<f32> = (0..4 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
                let (mut a, mut b) = (heads.clone(), heads.clone());
                rope.apply(&mut a, pos);
                rope.rotation(pos, &mut rotation);
                rope.apply_rotation(&mut b, &rotation);
                assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
                assert_eq!(a == heads, pos == 0, "position 0 is the identity");
            }
        }
    }

    /// The rotation of pair `i` by `pos * inv_freq[i]`, in f64, against the kernel.
    #[test]
    fn rotation_turns_each_pair_by_position_times_frequency() {
        let rope = Rope::new(8, 10_000.0, 1.0);
        let mut x: Vec<f32> = vec![1.0, 0.5, -2.0, 0.25, 0.0, 1.5, 3.0, -1.0];
        let before = x.clone();
        let pos = 5;
        rope.apply(&mut x, pos);
        for i in 0..4 {
            let angle = pos as f64 * (1.0 / 10_000f64.powf(2.0 * i as f64 / 8.0));
            let (a, b) = (before[i] as f64, before[i + 4] as f64);
            let expected = (
                a * angle.cos() - b * angle.sin(),
                b * angle.cos() + a * angle.sin(),
            );
            assert!((x[i] as f64 - expected.0).abs() < 1e-5, "pair {i}");
            assert!((x[i + 4] as f64 - expected.1).abs() < 1e-5, "pair {i}");
        }
    }
}

#[cfg(test)]
mod layer_norm_tests {
    use super::*;

    /// `nn.LayerNorm` written out in f64.
    fn layer_norm_reference(row: &[f32], w: &[f32], b: &[f32], eps: f64) -> Vec<f64> {
        let n = row.len() as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        row.iter()
            .zip(w.iter().zip(b))
            .map(|(&v, (&w, &b))| (v as f64 - mean) / (var + eps).sqrt() * w as f64 + b as f64)
            .collect()
    }

    #[test]
    fn layer_norm_matches_the_textbook_formula() {
        let dim = 37;
        // A large offset: the mean must not swamp the variance.
        let x: Vec<f32> = (0..3 * dim)
            .map(|i| (i as f32 * 0.61).sin() * 3.0 + 100.0 * (i / dim) as f32)
            .collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + (i as f32 * 0.3).cos()).collect();
        let b: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut got = x.clone();
        layer_norm_inplace(&mut got, &w, &b, 1e-6);
        for (row, out) in x.chunks_exact(dim).zip(got.chunks_exact(dim)) {
            let want = layer_norm_reference(row, &w, &b, 1e-6);
            for (g, e) in out.iter().zip(&want) {
                assert!((*g as f64 - e).abs() < 1e-5, "{g} vs {e}");
            }
        }
        // A constant row normalises to the bias (the variance is 0; eps keeps it finite).
        let mut flat = vec![4.0f32; dim];
        layer_norm_inplace(&mut flat, &w, &b, 1e-6);
        assert_eq!(flat, b);
    }

    #[test]
    fn bias_is_added_to_every_row() {
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        add_bias_inplace(&mut x, &[10.0, 20.0, 30.0]);
        assert_eq!(x, [11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
    }

    #[test]
    fn parallel_bias_gelu_matches_serial() {
        let pool = ThreadPool::new(3);
        let dim = 300;
        let x: Vec<f32> = (0..200 * dim)
            .map(|i| (i as f32 * 0.37).sin() * 4.0)
            .collect();
        let bias: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut serial = x.clone();
        for row in serial.chunks_exact_mut(dim) {
            for (v, b) in row.iter_mut().zip(&bias) {
                *v = gelu_tanh(*v + b);
            }
        }
        let mut parallel = x;
        add_bias_gelu_tanh_parallel(&pool, &mut parallel, &bias);
        assert_eq!(serial, parallel);
    }
}
