//! The interleaved weight layout for decoding: eight rows per group, stored block by block.
//!
//! Row-major blocks make a matrix-vector product sum each row's block on its own and then
//! reduce eight rows' partial sums across vector lanes, and gather eight scattered f16 scales,
//! once per 32 weights: about half of the decode kernel's instructions (see `avx2_rows`).
//! Stored interleaved, block `k` of a group of eight rows is one contiguous piece:
//!
//! ```text
//! [d of rows 0..8: 8 × f16] [quants: 4-byte piece p of row r at 16 + (p * 8 + r) * 4]
//! ```
//!
//! so one 32-byte load holds four quants of each of the eight rows in the row's own i32 lane:
//! `vpdpbusd` (or `vpmaddubsw` + `vpmaddwd`) against four activation bytes broadcast to every
//! lane leaves each row's sum in its lane with no reduction, and the eight scales are one
//! 16-byte load. This is the layout llama.cpp repacks Q4_0 into at load time on x86
//! (`block_q4_0x8`); the bytes are the same in number, so a matrix is rewritten in place.
//!
//! Q4_0 blocks have four pieces (16 bytes of nibbles per row: piece `p` holds values
//! `4p..4p + 4` in its low nibbles and `16 + 4p..` in its high ones), Q8_0 blocks eight.
//! Q5_0 blocks store their fifth bits between the scales and the four nibble pieces, as the
//! masks the kernels add them with: for each piece `p`, one u32 whose bit `4r + j` is the fifth
//! bit of row `r`'s value `4p + j`, then one for the values `16 + 4p + j` (32 bytes, as the
//! eight rows' `qh` fields were).
//! Q4_K super-blocks store `d` and `dmin` as two 16-byte runs, then their 12 scale bytes and
//! 128 quant bytes as 35 pieces (so the 6-bit scales of eight rows unpack in three registers).
//! Q6_K super-blocks store `d` (last in the row-major block) as a 16-byte run, then `ql`,
//! `qh` and the 16 scales as 52 pieces.
//! Only whole groups are interleaved: a matrix whose row count is not a multiple of eight
//! keeps the row-major layout.

use gemma_formats::GgmlType;

/// Rows per interleaved group (one i32 lane each in a 256-bit register).
pub const GROUP_ROWS: usize = 8;
/// Bytes of one piece of one row.
const PIECE: usize = 4;

/// The types with an interleaved layout and kernels for it.
pub fn supports(dtype: GgmlType) -> bool {
    matches!(
        dtype,
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q6_K
    )
}

/// Whether a `[rows, cols]` matrix of `dtype` can be stored interleaved.
pub fn fits(dtype: GgmlType, rows: usize, cols: usize) -> bool {
    supports(dtype)
        && rows > 0
        && rows.is_multiple_of(GROUP_ROWS)
        && cols.is_multiple_of(dtype.block_size())
}

/// Byte offsets of the f16 fields in a row's block, stored as eight-row runs of 16 bytes at
/// the start of a group block: `d` (and Q4_K's `dmin`; Q6_K keeps `d` last).
fn half_fields(dtype: GgmlType) -> &'static [usize] {
    match dtype {
        GgmlType::Q4_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[0],
    }
}

/// The bytes of a row's block other than its f16 fields: the Q5_0 `qh`, then the pieces.
fn rest(dtype: GgmlType) -> std::ops::Range<usize> {
    match dtype {
        GgmlType::Q6_K => 0..208,
        _ => 2 * half_fields(dtype).len()..dtype.type_size(),
    }
}

/// Bytes of the Q5_0 fifth-bit masks after the f16 runs (32), or 0.
fn mask_bytes(dtype: GgmlType) -> usize {
    if dtype == GgmlType::Q5_0 {
        8 * PIECE
    } else {
        0
    }
}

/// Where the 4-byte pieces start in an interleaved group block.
fn pieces_at(dtype: GgmlType) -> usize {
    16 * half_fields(dtype).len() + mask_bytes(dtype)
}

/// Q5_0: bit `4r + j` of mask `2p + half` is bit `16 * half + 4p + j` of row `r`'s `qh`.
fn set_fifth_bits(masks: &mut [u8], r: usize, qh: u32) {
    for p in 0..4 {
        for half in 0..2 {
            let at = 4 * (2 * p + half);
            let mut mask = u32::from_le_bytes(masks[at..at + 4].try_into().unwrap());
            for j in 0..4 {
                let bit = (qh >> (16 * half + 4 * p + j)) & 1;
                mask = (mask & !(1 << (4 * r + j))) | (bit << (4 * r + j));
            }
            masks[at..at + 4].copy_from_slice(&mask.to_le_bytes());
        }
    }
}

/// Row `r`'s `qh` from the group's Q5_0 masks (the inverse of [`set_fifth_bits`]).
fn fifth_bits_of(masks: &[u8], r: usize) -> u32 {
    let mut qh = 0u32;
    for p in 0..4 {
        for half in 0..2 {
            let at = 4 * (2 * p + half);
            let mask = u32::from_le_bytes(masks[at..at + 4].try_into().unwrap());
            for j in 0..4 {
                qh |= ((mask >> (4 * r + j)) & 1) << (16 * half + 4 * p + j);
            }
        }
    }
    qh
}

/// Rewrites whole groups of row-major blocks (`data`, rows of `cols` weights of `dtype`, a
/// multiple of [`GROUP_ROWS`] rows) into the interleaved layout, in place; `scratch` is reused.
///
/// # Panics
/// If [`fits`] is false for the shape `data` holds.
pub fn interleave_in_place(dtype: GgmlType, data: &mut [u8], cols: usize, scratch: &mut Vec<u8>) {
    let row_bytes = dtype.bytes_for(cols).expect("whole blocks");
    let group_bytes = GROUP_ROWS * row_bytes;
    assert!(
        fits(dtype, data.len() / row_bytes.max(1), cols) && data.len().is_multiple_of(group_bytes),
        "interleave: {} bytes are not whole groups of {dtype:?} rows of {cols}",
        data.len()
    );
    scratch.clear();
    scratch.resize(group_bytes, 0);
    for group in data.chunks_exact_mut(group_bytes) {
        scratch.copy_from_slice(group);
        for r in 0..GROUP_ROWS {
            let row = &scratch[r * row_bytes..(r + 1) * row_bytes];
            for (k, block) in row.chunks_exact(dtype.type_size()).enumerate() {
                write_block_row(dtype, group, k, r, block);
            }
        }
    }
}

/// The row-major bytes of row `r` of an interleaved matrix (`data` from its first group,
/// rows of `cols` weights) into `dst` (one row).
pub fn row_of(dtype: GgmlType, data: &[u8], cols: usize, r: usize, dst: &mut [u8]) {
    let row_bytes = dtype.bytes_for(cols).expect("whole blocks");
    let group = &data[(r / GROUP_ROWS) * GROUP_ROWS * row_bytes..][..GROUP_ROWS * row_bytes];
    let size = dtype.type_size();
    let block_bytes = GROUP_ROWS * size;
    let r = r % GROUP_ROWS;
    for (k, out) in dst[..row_bytes].chunks_exact_mut(size).enumerate() {
        let src = &group[k * block_bytes..(k + 1) * block_bytes];
        for (h, &at) in half_fields(dtype).iter().enumerate() {
            out[at..at + 2].copy_from_slice(&src[16 * h + 2 * r..][..2]);
        }
        let mut next = rest(dtype);
        if mask_bytes(dtype) > 0 {
            let qh = fifth_bits_of(&src[16..pieces_at(dtype)], r);
            out[next.start..next.start + 4].copy_from_slice(&qh.to_le_bytes());
            next.start += 4;
        }
        for (p, piece) in out[next].chunks_exact_mut(PIECE).enumerate() {
            let at = pieces_at(dtype) + (p * GROUP_ROWS + r) * PIECE;
            piece.copy_from_slice(&src[at..at + PIECE]);
        }
    }
}

/// Writes row `r`'s row-major block `k` into its interleaved group.
fn write_block_row(dtype: GgmlType, group: &mut [u8], k: usize, r: usize, block: &[u8]) {
    let block_bytes = GROUP_ROWS * dtype.type_size();
    let dst = &mut group[k * block_bytes..(k + 1) * block_bytes];
    for (h, &at) in half_fields(dtype).iter().enumerate() {
        dst[16 * h + 2 * r..][..2].copy_from_slice(&block[at..at + 2]);
    }
    let mut rest = &block[rest(dtype)];
    if mask_bytes(dtype) > 0 {
        let qh = u32::from_le_bytes(rest[..4].try_into().unwrap());
        set_fifth_bits(&mut dst[16..pieces_at(dtype)], r, qh);
        rest = &rest[4..];
    }
    for (p, piece) in rest.chunks_exact(PIECE).enumerate() {
        let at = pieces_at(dtype) + (p * GROUP_ROWS + r) * PIECE;
        dst[at..at + PIECE].copy_from_slice(piece);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_back_after_interleaving() {
        for dtype in [
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            let (rows, cols) = (24, 512);
            let row_bytes = dtype.bytes_for(cols).unwrap();
            let original: Vec<u8> = (0..rows * row_bytes)
                .map(|i| (i * 37 % 251) as u8)
                .collect();
            let mut data = original.clone();
            interleave_in_place(dtype, &mut data, cols, &mut Vec::new());
            assert_ne!(data, original);
            let mut row = vec![0u8; row_bytes];
            for r in 0..rows {
                row_of(dtype, &data, cols, r, &mut row);
                assert_eq!(row, original[r * row_bytes..(r + 1) * row_bytes], "row {r}");
            }
        }
    }

    #[test]
    fn only_whole_groups_of_supported_types_fit() {
        assert!(fits(GgmlType::Q4_0, 16, 64));
        assert!(!fits(GgmlType::Q4_0, 12, 64));
        assert!(fits(GgmlType::Q4_K, 16, 256));
        assert!(!fits(GgmlType::Q4_K, 16, 128));
        assert!(fits(GgmlType::Q6_K, 16, 256));
        assert!(!fits(GgmlType::Q5_K, 16, 256));
        assert!(!fits(GgmlType::Q8_0, 0, 64));
    }
}
