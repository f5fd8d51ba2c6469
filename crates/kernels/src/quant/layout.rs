//! Byte layouts of GGML blocks (see ggml-common.h) and small decoding helpers shared by the
//! scalar and SIMD kernels. All multi-byte fields are little-endian.

use half::{bf16, f16};

/// Values per block of the 32-value types.
pub const QK: usize = 32;
/// Values per K-quant super-block.
pub const QK_K: usize = 256;

/// Byte offsets inside the blocks; field order follows ggml's structs.
pub mod offs {
    // Q4_0: d f16, qs[16]
    pub const Q4_0_QS: usize = 2;
    // Q4_1: d f16, m f16, qs[16]
    pub const Q4_1_M: usize = 2;
    pub const Q4_1_QS: usize = 4;
    // Q5_0: d f16, qh u32, qs[16]
    pub const Q5_0_QH: usize = 2;
    pub const Q5_0_QS: usize = 6;
    // Q5_1: d f16, m f16, qh u32, qs[16]
    pub const Q5_1_M: usize = 2;
    pub const Q5_1_QH: usize = 4;
    pub const Q5_1_QS: usize = 8;
    // Q8_0: d f16, qs[32] i8
    pub const Q8_0_QS: usize = 2;
    // Q8_1: d f16, s f16 (= d * sum(qs)), qs[32] i8
    pub const Q8_1_S: usize = 2;
    pub const Q8_1_QS: usize = 4;
    // Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d f16, dmin f16
    pub const Q2_K_QS: usize = 16;
    pub const Q2_K_D: usize = 80;
    pub const Q2_K_DMIN: usize = 82;
    // Q3_K: hmask[32], qs[64], scales[12] (16 x 6 bits), d f16
    pub const Q3_K_QS: usize = 32;
    pub const Q3_K_SCALES: usize = 96;
    pub const Q3_K_D: usize = 108;
    // Q4_K: d f16, dmin f16, scales[12] (8 scales + 8 mins, 6 bits), qs[128]
    pub const Q4_K_DMIN: usize = 2;
    pub const Q4_K_SCALES: usize = 4;
    pub const Q4_K_QS: usize = 16;
    // Q5_K: d f16, dmin f16, scales[12], qh[32], qs[128]
    pub const Q5_K_DMIN: usize = 2;
    pub const Q5_K_SCALES: usize = 4;
    pub const Q5_K_QH: usize = 16;
    pub const Q5_K_QS: usize = 48;
    // Q6_K: ql[128], qh[64], scales[16] i8, d f16
    pub const Q6_K_QH: usize = 128;
    pub const Q6_K_SCALES: usize = 192;
    pub const Q6_K_D: usize = 208;
    // Q8_K: d f32, qs[256] i8, bsums[16] i16 (sums of 16 consecutive qs)
    pub const Q8_K_QS: usize = 4;
    pub const Q8_K_BSUMS: usize = 260;
}

#[inline(always)]
pub fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

#[inline(always)]
pub fn f32_at(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline(always)]
pub fn bf16_at(b: &[u8], off: usize) -> f32 {
    bf16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

#[inline(always)]
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline(always)]
pub fn i16_at(b: &[u8], off: usize) -> i16 {
    i16::from_le_bytes([b[off], b[off + 1]])
}

#[inline(always)]
pub fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

/// Q4_K/Q5_K: unpacks the 12 scale bytes into 8 six-bit scales and 8 six-bit mins.
/// Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; scales/mins 4-7 keep their low
/// nibbles in bytes 8-11 and their top 2 bits in the spare high bits of bytes 0-7.
#[inline(always)]
pub fn k4_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..4 {
        scales[j] = s[j] & 63;
        mins[j] = s[j + 4] & 63;
        scales[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mins[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (scales, mins)
}

/// Q3_K: unpacks the 12 scale bytes into 16 signed scales (stored 6-bit with offset 32).
/// Low nibbles: bytes 0-7 (scales 0-7 low nibble, 8-15 high nibble); top 2 bits: bytes 8-11.
#[inline(always)]
pub fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = ((low | (high << 4)) as i8) - 32;
    }
    out
}

/// Offsets of the f16 scale fields inside one block of `dtype` (empty for float types and Q8_K,
/// whose scale is an f32 at offset 0).
pub fn f16_scale_offsets(dtype: gemma_formats::GgmlType) -> &'static [usize] {
    use gemma_formats::GgmlType as T;
    match dtype {
        T::Q4_0 | T::Q5_0 | T::Q8_0 => &[0],
        T::Q4_1 | T::Q5_1 | T::Q8_1 | T::Q4_K | T::Q5_K => &[0, 2],
        T::Q2_K => &[offs::Q2_K_D, offs::Q2_K_DMIN],
        T::Q3_K => &[offs::Q3_K_D],
        T::Q6_K => &[offs::Q6_K_D],
        T::F32 | T::F16 | T::BF16 | T::Q8_K => &[],
    }
}
