//! Scalar reference kernels for every type: the definition the SIMD kernels are tested against.
//!
//! Dequantization evaluates the same float expressions, in the same order, as ggml's reference
//! (and the `gguf` Python package), so results are bit-identical. Dot products sum integer
//! products inside each block and apply the block scales once, as llama.cpp does.

use gemma_formats::GgmlType;
use half::f16;

use super::layout::{self, offs, QK, QK_K};
use crate::error::{check_len, KernelError};

/// Checked scalar dequantization (same contract as [`super::dequantize`]).
pub fn dequantize(dtype: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    check_len(dtype, dst.len(), src.len())?;
    dequantize_unchecked(dtype, src, dst);
    Ok(())
}

/// Checked scalar quantization (same contract as [`super::quantize`]).
pub fn quantize(dtype: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    check_len(dtype, src.len(), dst.len())?;
    quantize_unchecked(dtype, src, dst)
}

/// Scalar dot product (same contract as [`super::vec_dot`]).
#[track_caller]
pub fn vec_dot(dtype: GgmlType, w_row: &[u8], act: &[u8], n: usize) -> f32 {
    super::assert_dot_sizes(dtype, w_row, act, n);
    vec_dot_unchecked(dtype, w_row, act, n)
}

/// Sizes must already match; a mismatch panics on slice indexing.
pub(crate) fn dequantize_unchecked(dtype: GgmlType, src: &[u8], dst: &mut [f32]) {
    let bs = dtype.type_size();
    let blocks = src.chunks_exact(bs);
    match dtype {
        GgmlType::F32 => {
            for (b, y) in blocks.zip(dst.iter_mut()) {
                *y = layout::f32_at(b, 0);
            }
        }
        GgmlType::F16 => {
            for (b, y) in blocks.zip(dst.iter_mut()) {
                *y = layout::f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (b, y) in blocks.zip(dst.iter_mut()) {
                *y = layout::bf16_at(b, 0);
            }
        }
        _ => {
            let per_block = dtype.block_size();
            for (b, y) in blocks.zip(dst.chunks_exact_mut(per_block)) {
                dequantize_block(dtype, b, y);
            }
        }
    }
}

fn dequantize_block(dtype: GgmlType, b: &[u8], y: &mut [f32]) {
    match dtype {
        GgmlType::Q4_0 => {
            let d = layout::f16_at(b, 0);
            let qs = &b[offs::Q4_0_QS..];
            for j in 0..QK / 2 {
                y[j] = d * ((qs[j] & 0x0F) as i32 - 8) as f32;
                y[j + QK / 2] = d * ((qs[j] >> 4) as i32 - 8) as f32;
            }
        }
        GgmlType::Q4_1 => {
            let d = layout::f16_at(b, 0);
            let m = layout::f16_at(b, offs::Q4_1_M);
            let qs = &b[offs::Q4_1_QS..];
            for j in 0..QK / 2 {
                y[j] = d * (qs[j] & 0x0F) as f32 + m;
                y[j + QK / 2] = d * (qs[j] >> 4) as f32 + m;
            }
        }
        GgmlType::Q5_0 => {
            let d = layout::f16_at(b, 0);
            let qh = layout::u32_at(b, offs::Q5_0_QH);
            let qs = &b[offs::Q5_0_QS..];
            for j in 0..QK / 2 {
                let (lo, hi) = q5_pair(qs[j], qh, j);
                y[j] = d * (lo as i32 - 16) as f32;
                y[j + QK / 2] = d * (hi as i32 - 16) as f32;
            }
        }
        GgmlType::Q5_1 => {
            let d = layout::f16_at(b, 0);
            let m = layout::f16_at(b, offs::Q5_1_M);
            let qh = layout::u32_at(b, offs::Q5_1_QH);
            let qs = &b[offs::Q5_1_QS..];
            for j in 0..QK / 2 {
                let (lo, hi) = q5_pair(qs[j], qh, j);
                y[j] = d * lo as f32 + m;
                y[j + QK / 2] = d * hi as f32 + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = layout::f16_at(b, 0);
            for (yj, &q) in y.iter_mut().zip(&b[offs::Q8_0_QS..]) {
                *yj = d * q as i8 as f32;
            }
        }
        GgmlType::Q8_1 => {
            let d = layout::f16_at(b, 0);
            for (yj, &q) in y.iter_mut().zip(&b[offs::Q8_1_QS..]) {
                *yj = d * q as i8 as f32;
            }
        }
        GgmlType::Q8_K => {
            let d = layout::f32_at(b, 0);
            for (yj, &q) in y.iter_mut().zip(&b[offs::Q8_K_QS..offs::Q8_K_QS + QK_K]) {
                *yj = d * q as i8 as f32;
            }
        }
        GgmlType::Q2_K => dequantize_q2_k(b, y),
        GgmlType::Q3_K => dequantize_q3_k(b, y),
        GgmlType::Q4_K => dequantize_q4_k(b, y),
        GgmlType::Q5_K => dequantize_q5_k(b, y),
        GgmlType::Q6_K => dequantize_q6_k(b, y),
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!("float types are not blocked")
        }
    }
}

/// The two 5-bit values of byte `j` of a Q5 block: value `j` (low nibble, bit `j` of `qh`) and
/// value `j + 16` (high nibble, bit `j + 16`).
#[inline(always)]
fn q5_pair(q: u8, qh: u32, j: usize) -> (u8, u8) {
    let lo = (q & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
    let hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    (lo, hi)
}

/// Q2_K value `v` (0..256): 2 bits of `qs[(v / 128) * 32 + v % 32]` at shift `2 * ((v / 32) % 4)`.
#[inline(always)]
fn q2k_value(qs: &[u8], v: usize) -> u8 {
    (qs[(v / 128) * 32 + v % 32] >> (2 * ((v / 32) % 4))) & 3
}

fn dequantize_q2_k(b: &[u8], y: &mut [f32]) {
    let d = layout::f16_at(b, offs::Q2_K_D);
    let dmin = layout::f16_at(b, offs::Q2_K_DMIN);
    let qs = &b[offs::Q2_K_QS..offs::Q2_K_QS + QK_K / 4];
    for (v, yv) in y.iter_mut().enumerate() {
        let sc = b[v / 16];
        let dl = d * (sc & 0x0F) as f32;
        let ml = dmin * (sc >> 4) as f32;
        *yv = dl * q2k_value(qs, v) as f32 - ml;
    }
}

/// Q3_K value `v` as a signed number in -4..=3: the low 2 bits are laid out like Q2_K; the high
/// bit is bit `v / 32` of `hmask[v % 32]`, and a *clear* bit subtracts 4.
#[inline(always)]
fn q3k_value(b: &[u8], v: usize) -> i8 {
    let low = q2k_value(&b[offs::Q3_K_QS..offs::Q3_K_QS + QK_K / 4], v) as i8;
    let high_set = (b[v % 32] >> (v / 32)) & 1 == 1;
    if high_set {
        low
    } else {
        low - 4
    }
}

fn dequantize_q3_k(b: &[u8], y: &mut [f32]) {
    let d = layout::f16_at(b, offs::Q3_K_D);
    let scales = layout::q3k_scales(&b[offs::Q3_K_SCALES..offs::Q3_K_SCALES + 12]);
    for (v, yv) in y.iter_mut().enumerate() {
        let dl = d * scales[v / 16] as f32;
        *yv = dl * q3k_value(b, v) as f32;
    }
}

/// Q4_K/Q5_K low 4 bits of value `v`: chunk `v / 64` uses `qs[32 * chunk..][..32]`, low nibbles
/// for the first 32 values and high nibbles for the next 32.
#[inline(always)]
fn q4k_nibble(qs: &[u8], v: usize) -> u8 {
    (qs[(v / 64) * 32 + v % 32] >> (4 * ((v / 32) % 2))) & 0x0F
}

fn dequantize_q4_k(b: &[u8], y: &mut [f32]) {
    let d = layout::f16_at(b, 0);
    let dmin = layout::f16_at(b, offs::Q4_K_DMIN);
    let (scales, mins) = layout::k4_scales_mins(&b[offs::Q4_K_SCALES..offs::Q4_K_SCALES + 12]);
    let qs = &b[offs::Q4_K_QS..offs::Q4_K_QS + QK_K / 2];
    for (v, yv) in y.iter_mut().enumerate() {
        let sub = v / 32;
        let dl = d * scales[sub] as f32;
        let ml = dmin * mins[sub] as f32;
        *yv = dl * q4k_nibble(qs, v) as f32 - ml;
    }
}

#[inline(always)]
fn q5k_value(b: &[u8], v: usize) -> u8 {
    let low = q4k_nibble(&b[offs::Q5_K_QS..offs::Q5_K_QS + QK_K / 2], v);
    let high = (b[offs::Q5_K_QH + v % 32] >> (v / 32)) & 1;
    low | (high << 4)
}

fn dequantize_q5_k(b: &[u8], y: &mut [f32]) {
    let d = layout::f16_at(b, 0);
    let dmin = layout::f16_at(b, offs::Q5_K_DMIN);
    let (scales, mins) = layout::k4_scales_mins(&b[offs::Q5_K_SCALES..offs::Q5_K_SCALES + 12]);
    for (v, yv) in y.iter_mut().enumerate() {
        let sub = v / 32;
        let dl = d * scales[sub] as f32;
        let ml = dmin * mins[sub] as f32;
        *yv = dl * q5k_value(b, v) as f32 - ml;
    }
}

/// Q6_K value `v` in -32..=31. Each half of 128 values uses `ql[64 * half..][..64]` and
/// `qh[32 * half..][..32]`; quarter `k` of the half takes low nibbles of `ql[32 * (k % 2) + l]`
/// for k < 2 and high nibbles for k >= 2, plus bits `2k..2k+2` of `qh[l]`.
#[inline(always)]
fn q6k_value(b: &[u8], v: usize) -> i8 {
    let half = v / 128;
    let k = (v % 128) / 32;
    let l = v % 32;
    let low = (b[64 * half + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0F;
    let high = (b[offs::Q6_K_QH + 32 * half + l] >> (2 * k)) & 3;
    (low | (high << 4)) as i8 - 32
}

fn dequantize_q6_k(b: &[u8], y: &mut [f32]) {
    let d = layout::f16_at(b, offs::Q6_K_D);
    for (v, yv) in y.iter_mut().enumerate() {
        let dl = d * b[offs::Q6_K_SCALES + v / 16] as i8 as f32;
        *yv = dl * q6k_value(b, v) as f32;
    }
}

// ---------------------------------------------------------------------------------------------
// Quantization (round-to-nearest, as ggml's *_ref quantizers)
// ---------------------------------------------------------------------------------------------

pub(crate) fn quantize_unchecked(
    dtype: GgmlType,
    src: &[f32],
    dst: &mut [u8],
) -> Result<(), KernelError> {
    match dtype {
        GgmlType::F32 => {
            for (x, b) in src.iter().zip(dst.chunks_exact_mut(4)) {
                b.copy_from_slice(&x.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
                b.copy_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
                b.copy_from_slice(&f32_to_bf16_bits(*x).to_le_bytes());
            }
        }
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q8_0
        | GgmlType::Q8_1
        | GgmlType::Q8_K => {
            let blocks = src.chunks_exact(dtype.block_size());
            for (x, b) in blocks.zip(dst.chunks_exact_mut(dtype.type_size())) {
                quantize_block(dtype, x, b);
            }
        }
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
            return Err(KernelError::QuantizeUnsupported(dtype));
        }
    }
    Ok(())
}

/// f32 -> bf16 with round-to-nearest-even; NaNs are kept NaN (quiet bit set), as ggml does.
pub(crate) fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounded = bits as u64 + 0x7fff + ((bits >> 16) & 1) as u64;
    (rounded >> 16) as u16
}

/// Reciprocal used by the quantizers: zero scale gives a zero multiplier (all-zero block).
#[inline(always)]
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// The value of largest magnitude, keeping its sign (the first one on ties).
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn quantize_block(dtype: GgmlType, x: &[f32], b: &mut [u8]) {
    match dtype {
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            // d maps the extreme value onto -8 (Q4) or -16 (Q5), using the full signed range.
            let half_range = if dtype == GgmlType::Q4_0 { 8.0 } else { 16.0 };
            let d = signed_absmax(x) / -half_range;
            let id = inverse(d);
            let max_q = (2.0 * half_range - 1.0) as u8;
            let q: [u8; QK] =
                std::array::from_fn(|j| ((x[j] * id + (half_range + 0.5)) as u8).min(max_q));
            layout::put_f16(b, 0, d);
            pack_low_bits(dtype, &q, b);
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let min = x.iter().copied().fold(f32::INFINITY, f32::min);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let levels = if dtype == GgmlType::Q4_1 { 15.0 } else { 31.0 };
            let d = (max - min) / levels;
            let id = inverse(d);
            let q: [u8; QK] =
                std::array::from_fn(|j| (((x[j] - min) * id + 0.5) as u8).min(levels as u8));
            layout::put_f16(b, 0, d);
            layout::put_f16(b, 2, min);
            pack_low_bits(dtype, &q, b);
        }
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = inverse(d);
            let qs_off = if dtype == GgmlType::Q8_0 {
                offs::Q8_0_QS
            } else {
                offs::Q8_1_QS
            };
            let mut sum = 0i32;
            for (j, &v) in x.iter().enumerate() {
                let q = (v * id).round() as i8;
                sum += q as i32;
                b[qs_off + j] = q as u8;
            }
            layout::put_f16(b, 0, d);
            if dtype == GgmlType::Q8_1 {
                layout::put_f16(b, offs::Q8_1_S, sum as f32 * d);
            }
        }
        GgmlType::Q8_K => quantize_q8_k_block(x, b),
        _ => unreachable!("not a quantizable block type"),
    }
}

/// Writes the low nibbles of `q` into the `qs` field of a Q4/Q5 block and, for Q5, bit 4 of each
/// value into `qh` (value j -> bit j). Byte j holds value j (low nibble) and j + 16 (high nibble).
fn pack_low_bits(dtype: GgmlType, q: &[u8; QK], b: &mut [u8]) {
    let (qh_off, qs_off) = match dtype {
        GgmlType::Q4_0 => (None, offs::Q4_0_QS),
        GgmlType::Q4_1 => (None, offs::Q4_1_QS),
        GgmlType::Q5_0 => (Some(offs::Q5_0_QH), offs::Q5_0_QS),
        GgmlType::Q5_1 => (Some(offs::Q5_1_QH), offs::Q5_1_QS),
        _ => unreachable!(),
    };
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let lo = q[j];
        let hi = q[j + QK / 2];
        b[qs_off + j] = (lo & 0x0F) | ((hi & 0x0F) << 4);
        qh |= (((lo >> 4) & 1) as u32) << j;
        qh |= (((hi >> 4) & 1) as u32) << (j + QK / 2);
    }
    if let Some(off) = qh_off {
        b[off..off + 4].copy_from_slice(&qh.to_le_bytes());
    }
}

/// Round half to even via the 1.5 * 2^23 trick, like ggml's `nearest_int`, for |x| < 2^22.
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn quantize_q8_k_block(x: &[f32], b: &mut [u8]) {
    let max = signed_absmax(x);
    if max == 0.0 {
        b.fill(0);
        return;
    }
    // The extreme value maps to -127 so every value fits in -127..=127.
    let iscale = -127.0 / max;
    let mut qs = [0i8; QK_K];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    b[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    for (dst, &q) in b[offs::Q8_K_QS..].iter_mut().zip(qs.iter()) {
        *dst = q as u8;
    }
    for (g, group) in qs.chunks_exact(16).enumerate() {
        let sum: i16 = group.iter().map(|&q| q as i16).sum();
        let off = offs::Q8_K_BSUMS + 2 * g;
        b[off..off + 2].copy_from_slice(&sum.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products
// ---------------------------------------------------------------------------------------------

pub(crate) fn vec_dot_unchecked(dtype: GgmlType, w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_fn(dtype)(w, a, n)
}

fn dot_float(w: &[u8], a: &[u8], n: usize, w_size: usize, load: impl Fn(&[u8]) -> f32) -> f32 {
    let weights = w.chunks_exact(w_size).take(n);
    let acts = a
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let mut sum = 0.0f32;
    for (wv, av) in weights.zip(acts) {
        sum += load(wv) * av;
    }
    sum
}

/// Iterates over matching (weight block, activation block) pairs.
fn block_pairs<'a>(
    w: &'a [u8],
    w_size: usize,
    a: &'a [u8],
    a_size: usize,
    n_blocks: usize,
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
    w.chunks_exact(w_size)
        .zip(a.chunks_exact(a_size))
        .take(n_blocks)
}

/// Sum over a 32-value block of weight value times Q8 activation.
#[inline(always)]
fn isum32(a_qs: &[u8], weight: impl Fn(usize) -> i32) -> i32 {
    (0..QK).map(|j| weight(j) * a_qs[j] as i8 as i32).sum()
}

fn dot_q4_0(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in block_pairs(w, 18, a, 34, n / QK) {
        let qs = &wb[offs::Q4_0_QS..];
        let isum = isum32(&ab[offs::Q8_0_QS..], |j| {
            ((qs[j % 16] >> (4 * (j / 16))) & 0x0F) as i32 - 8
        });
        sum += layout::f16_at(wb, 0) * layout::f16_at(ab, 0) * isum as f32;
    }
    sum
}

fn dot_q4_1(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in block_pairs(w, 20, a, 36, n / QK) {
        let qs = &wb[offs::Q4_1_QS..];
        let isum = isum32(&ab[offs::Q8_1_QS..], |j| {
            ((qs[j % 16] >> (4 * (j / 16))) & 0x0F) as i32
        });
        let d = layout::f16_at(wb, 0) * layout::f16_at(ab, 0);
        sum +=
            d * isum as f32 + layout::f16_at(wb, offs::Q4_1_M) * layout::f16_at(ab, offs::Q8_1_S);
    }
    sum
}

fn q5_value(qs: &[u8], qh: u32, j: usize) -> i32 {
    let (lo, hi) = q5_pair(qs[j % 16], qh, j % 16);
    if j < 16 {
        lo as i32
    } else {
        hi as i32
    }
}

fn dot_q5_0(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in block_pairs(w, 22, a, 34, n / QK) {
        let qh = layout::u32_at(wb, offs::Q5_0_QH);
        let qs = &wb[offs::Q5_0_QS..];
        let isum = isum32(&ab[offs::Q8_0_QS..], |j| q5_value(qs, qh, j) - 16);
        sum += layout::f16_at(wb, 0) * layout::f16_at(ab, 0) * isum as f32;
    }
    sum
}

fn dot_q5_1(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in block_pairs(w, 24, a, 36, n / QK) {
        let qh = layout::u32_at(wb, offs::Q5_1_QH);
        let qs = &wb[offs::Q5_1_QS..];
        let isum = isum32(&ab[offs::Q8_1_QS..], |j| q5_value(qs, qh, j));
        let d = layout::f16_at(wb, 0) * layout::f16_at(ab, 0);
        sum +=
            d * isum as f32 + layout::f16_at(wb, offs::Q5_1_M) * layout::f16_at(ab, offs::Q8_1_S);
    }
    sum
}

fn dot_q8_0(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in block_pairs(w, 34, a, 34, n / QK) {
        let qs = &wb[offs::Q8_0_QS..];
        let isum = isum32(&ab[offs::Q8_0_QS..], |j| qs[j] as i8 as i32);
        sum += layout::f16_at(wb, 0) * layout::f16_at(ab, 0) * isum as f32;
    }
    sum
}

fn dot_q8_1(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in block_pairs(w, 36, a, 36, n / QK) {
        let qs = &wb[offs::Q8_1_QS..];
        let isum = isum32(&ab[offs::Q8_1_QS..], |j| qs[j] as i8 as i32);
        sum += layout::f16_at(wb, 0) * layout::f16_at(ab, 0) * isum as f32;
    }
    sum
}

/// The parts of a Q8_K activation block the K-quant dots need.
struct Q8kBlock<'a> {
    d: f32,
    qs: &'a [u8],
    ab: &'a [u8],
}

impl<'a> Q8kBlock<'a> {
    fn new(ab: &'a [u8]) -> Self {
        Q8kBlock {
            d: layout::f32_at(ab, 0),
            qs: &ab[offs::Q8_K_QS..offs::Q8_K_QS + QK_K],
            ab,
        }
    }
    #[inline(always)]
    fn q(&self, v: usize) -> i32 {
        self.qs[v] as i8 as i32
    }
    /// Sum of the 16 activations of group `g`.
    #[inline(always)]
    fn bsum(&self, g: usize) -> i32 {
        layout::i16_at(self.ab, offs::Q8_K_BSUMS + 2 * g) as i32
    }
}

/// Integer sum over values `range` of weight value times activation.
#[inline(always)]
fn isum_range(act: &Q8kBlock, range: std::ops::Range<usize>, weight: impl Fn(usize) -> i32) -> i32 {
    range.map(|v| weight(v) * act.q(v)).sum()
}

fn dot_q2_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in block_pairs(w, 84, a, 292, n / QK_K) {
        let act = Q8kBlock::new(ab);
        let qs = &wb[offs::Q2_K_QS..];
        let mut isum = 0i32;
        let mut min_sum = 0i32;
        for (g, &sc) in wb[..16].iter().enumerate() {
            let part = isum_range(&act, g * 16..g * 16 + 16, |v| q2k_value(qs, v) as i32);
            isum += (sc & 0x0F) as i32 * part;
            min_sum += (sc >> 4) as i32 * act.bsum(g);
        }
        let d = layout::f16_at(wb, offs::Q2_K_D) * act.d;
        let dmin = layout::f16_at(wb, offs::Q2_K_DMIN) * act.d;
        sum += d * isum as f32 - dmin * min_sum as f32;
    }
    sum
}

fn dot_q3_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in block_pairs(w, 110, a, 292, n / QK_K) {
        let act = Q8kBlock::new(ab);
        let scales = layout::q3k_scales(&wb[offs::Q3_K_SCALES..offs::Q3_K_SCALES + 12]);
        let mut isum = 0i32;
        for (g, &sc) in scales.iter().enumerate() {
            isum += sc as i32 * isum_range(&act, g * 16..g * 16 + 16, |v| q3k_value(wb, v) as i32);
        }
        sum += layout::f16_at(wb, offs::Q3_K_D) * act.d * isum as f32;
    }
    sum
}

/// Shared by Q4_K and Q5_K: `value` gives the unsigned quant of value v.
fn dot_k4_family(
    wb: &[u8],
    act: &Q8kBlock,
    scales_off: usize,
    value: impl Fn(usize) -> i32,
) -> f32 {
    let (scales, mins) = layout::k4_scales_mins(&wb[scales_off..scales_off + 12]);
    let mut isum = 0i32;
    let mut min_sum = 0i32;
    for sub in 0..8 {
        isum += scales[sub] as i32 * isum_range(act, sub * 32..sub * 32 + 32, &value);
        min_sum += mins[sub] as i32 * (act.bsum(2 * sub) + act.bsum(2 * sub + 1));
    }
    let d = layout::f16_at(wb, 0) * act.d;
    let dmin = layout::f16_at(wb, 2) * act.d;
    d * isum as f32 - dmin * min_sum as f32
}

/// Q4_K weights against Q8_0 activations (one scale per 32 values, as each of Q4_K's
/// sub-blocks has its own scale and min): per sub-block, `(d·scale·d_a)·Σ q·a −
/// (dmin·min·d_a)·Σ a`. ggml pairs Q4_K with Q8_K (one activation scale per 256 values), which
/// loses the small values that share 256 with an outlier: simulated in float64 on the default
/// model (`scripts/activation_quant_sim.py`), the first generated token's top-10 logits move
/// 0.40 on average from the exact ones with Q8_K activations, 0.30 with these.
fn dot_q4_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in block_pairs(w, 144, a, 8 * 34, n / QK_K) {
        let d = layout::f16_at(wb, 0);
        let dmin = layout::f16_at(wb, offs::Q4_K_DMIN);
        let (scales, mins) = layout::k4_scales_mins(&wb[offs::Q4_K_SCALES..offs::Q4_K_SCALES + 12]);
        let qs = &wb[offs::Q4_K_QS..];
        for (sub, act) in ab.chunks_exact(34).enumerate() {
            let a_qs = &act[offs::Q8_0_QS..];
            let isum = isum32(a_qs, |j| q4k_nibble(qs, 32 * sub + j) as i32);
            let asum = isum32(a_qs, |_| 1);
            let da = layout::f16_at(act, 0);
            let (d_sub, m_sub) = (d * scales[sub] as f32, dmin * mins[sub] as f32);
            sum += (d_sub * da) * isum as f32 - (m_sub * da) * asum as f32;
        }
    }
    sum
}

fn dot_q5_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in block_pairs(w, 176, a, 292, n / QK_K) {
        sum += dot_k4_family(wb, &Q8kBlock::new(ab), offs::Q5_K_SCALES, |v| {
            q5k_value(wb, v) as i32
        });
    }
    sum
}

/// Q6_K weights against Q8_0 activations (see [`dot_q4_k`]): per 32 values, the two 16-value
/// groups' integer scales stay in the exact integer sum, then `(d·d_a)·isum`.
fn dot_q6_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in block_pairs(w, 210, a, 8 * 34, n / QK_K) {
        let d = layout::f16_at(wb, offs::Q6_K_D);
        for (sub, act) in ab.chunks_exact(34).enumerate() {
            let a_qs = &act[offs::Q8_0_QS..];
            let isum = isum32(a_qs, |j| {
                let sc = wb[offs::Q6_K_SCALES + 2 * sub + j / 16] as i8 as i32;
                sc * q6k_value(wb, 32 * sub + j) as i32
            });
            sum += (d * layout::f16_at(act, 0)) * isum as f32;
        }
    }
    sum
}

fn dot_q8_k(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in block_pairs(w, 292, a, 292, n / QK_K) {
        let wq = Q8kBlock::new(wb);
        let act = Q8kBlock::new(ab);
        let isum = isum_range(&act, 0..QK_K, |v| wq.q(v));
        sum += wq.d * act.d * isum as f32;
    }
    sum
}

fn dot_f32(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_float(w, a, n, 4, |b| layout::f32_at(b, 0))
}

fn dot_f16(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_float(w, a, n, 2, |b| layout::f16_at(b, 0))
}

fn dot_bf16(w: &[u8], a: &[u8], n: usize) -> f32 {
    dot_float(w, a, n, 2, |b| layout::bf16_at(b, 0))
}

/// The scalar kernel of `dtype` (safe: slice indexing is bounds-checked).
pub(crate) fn dot_fn(dtype: GgmlType) -> fn(&[u8], &[u8], usize) -> f32 {
    match dtype {
        GgmlType::F32 => dot_f32,
        GgmlType::F16 => dot_f16,
        GgmlType::BF16 => dot_bf16,
        GgmlType::Q4_0 => dot_q4_0,
        GgmlType::Q4_1 => dot_q4_1,
        GgmlType::Q5_0 => dot_q5_0,
        GgmlType::Q5_1 => dot_q5_1,
        GgmlType::Q8_0 => dot_q8_0,
        GgmlType::Q8_1 => dot_q8_1,
        GgmlType::Q2_K => dot_q2_k,
        GgmlType::Q3_K => dot_q3_k,
        GgmlType::Q4_K => dot_q4_k,
        GgmlType::Q5_K => dot_q5_k,
        GgmlType::Q6_K => dot_q6_k,
        GgmlType::Q8_K => dot_q8_k,
    }
}
