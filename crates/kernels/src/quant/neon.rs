//! aarch64 Advanced SIMD kernels for F32 and Q8_0; other types use the scalar kernels.
//! (Not exercised by this project's CI, which runs on x86-64: kept deliberately small.)

use std::arch::aarch64::*;

use gemma_formats::GgmlType;

use super::layout::{self, offs, QK};
use super::DotFn;

pub(super) fn dot_fn(dtype: GgmlType) -> Option<DotFn> {
    match dtype {
        GgmlType::F32 => Some(dot_f32),
        GgmlType::Q8_0 => Some(dot_q8_0),
        _ => None,
    }
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_f32x4(s: &[u8], value: usize) -> float32x4_t {
    vld1q_f32(s[4 * value..4 * value + 16].as_ptr().cast())
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_i8x16(s: &[u8], off: usize) -> int8x16_t {
    vld1q_s8(s[off..off + 16].as_ptr().cast())
}

#[target_feature(enable = "neon")]
unsafe fn dot_f32(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut acc0 = vdupq_n_f32(0.0);
    let mut acc1 = vdupq_n_f32(0.0);
    let mut i = 0;
    while i + 8 <= n {
        acc0 = vfmaq_f32(acc0, load_f32x4(w, i), load_f32x4(a, i));
        acc1 = vfmaq_f32(acc1, load_f32x4(w, i + 4), load_f32x4(a, i + 4));
        i += 8;
    }
    let mut sum = vaddvq_f32(vaddq_f32(acc0, acc1));
    for j in i..n {
        sum += layout::f32_at(w, 4 * j) * layout::f32_at(a, 4 * j);
    }
    sum
}

#[target_feature(enable = "neon")]
unsafe fn dot_q8_0(w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut sum = 0.0f32;
    for i in 0..n / QK {
        let off = i * 34;
        let mut acc = vdupq_n_s32(0);
        for half in 0..2 {
            let x = load_i8x16(w, off + offs::Q8_0_QS + 16 * half);
            let y = load_i8x16(a, off + offs::Q8_0_QS + 16 * half);
            // i8 x i8 products fit i16; pairwise-accumulate into i32 lanes.
            acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(x), vget_low_s8(y)));
            acc = vpadalq_s16(acc, vmull_high_s8(x, y));
        }
        let isum = vaddvq_s32(acc);
        sum += layout::f16_at(w, off) * layout::f16_at(a, off) * isum as f32;
    }
    sum
}
