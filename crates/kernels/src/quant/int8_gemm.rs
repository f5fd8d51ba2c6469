//! The int8 GEMM for prompt processing over Q4_0, Q5_0, Q8_0, Q4_K and Q6_K weights, all
//! against Q8_0 activations (AVX-512 VNNI, or AVX2): the same results, bit for bit, as the
//! multi-row kernels and the scalar reference, with far fewer instructions per product.
//!
//! A task takes a panel of [`PANEL_ROWS`] weight rows (AVX2: [`PANEL_ROWS_AVX2`]) and repacks
//! it once into a buffer it then sweeps for every token: per 32-value block, eight vectors where
//! vector `g` holds quants `4g..4g + 4` of each row (one i32 lane per row), then per-row scales
//! and sums (see [`Kind`]). Tokens go through the panel in tiles of up to [`TILE_TOKENS`]: per
//! block, eight `vpdpbusd` (AVX2: `vpmaddubsw` + `vpmaddwd`) with the token's four-quant groups
//! broadcast give all the panel's exact integer block sums in one register, without a
//! horizontal reduction. Every integer step is exact in i32 and the float steps are the scalar
//! reference's, lane by lane, in block order, so a token's result does not depend on the number
//! of tokens in the matmul, nor on whether this kernel or a row kernel computed it.

use std::arch::x86_64::*;
use std::cell::RefCell;

use gemma_formats::GgmlType;

use super::layout::{self, offs, QK};
use super::{QuantizedActs, Q8_0_INFO_BYTES};

/// Weight rows per panel of the AVX-512 VNNI kernel: one i32 lane of a 512-bit register each.
pub(crate) const PANEL_ROWS: usize = 16;
/// Weight rows per panel of the AVX2 kernel (256-bit registers).
pub(crate) const PANEL_ROWS_AVX2: usize = 8;
/// Tokens per register tile (an f32 accumulator each).
const TILE_TOKENS: usize = 8;

thread_local! {
    static PACKED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// How a type's 32-value blocks are packed and combined with the activations. After the quants,
/// each block holds vectors of per-row values (4 bytes each): the scale (at [`scale`]), then the
/// extras below (from [`extra`]). Signed weights meet the activations as VNNI needs them
/// (unsigned `a + 128`, then a correction); the AVX2 tile takes `|w|` against `a·sign(w)` instead
/// and needs no correction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Q4_0, Q5_0: unsigned quants; `d`; `isum = Σ q·a − offset·Σa`.
    Offset = 0,
    /// Q8_0: signed quants, activations taken as unsigned `a + 128`; `d`, then `Σq` (i32) to
    /// subtract `128·Σq`.
    Signed = 1,
    /// Q4_K: unsigned nibbles; `d·scale` of the sub-block, then `dmin·min` (f32):
    /// `((d·scale)·d_a)·Σ q·a − ((dmin·min)·d_a)·Σa`.
    Q4K = 2,
    /// Q6_K: signed quants `q − 32`, activations unsigned as for Q8_0; `d`, then per half of
    /// 16 values `Σq` and the integer scale (i32): `Σ scale·(Σ q·a)` exact, times `d·d_a`.
    Q6K = 3,
}

impl Kind {
    /// The kind a tile kernel's `KIND` parameter names (`Kind as u8`).
    const fn of_code(code: u8) -> Kind {
        match code {
            0 => Kind::Offset,
            1 => Kind::Signed,
            2 => Kind::Q4K,
            _ => Kind::Q6K,
        }
    }

    fn of(dtype: GgmlType) -> Option<Kind> {
        Some(match dtype {
            GgmlType::Q4_0 | GgmlType::Q5_0 => Kind::Offset,
            GgmlType::Q8_0 => Kind::Signed,
            GgmlType::Q4_K => Kind::Q4K,
            GgmlType::Q6_K => Kind::Q6K,
            _ => return None,
        })
    }

    /// Bytes of one packed block for panels of `lanes` rows.
    const fn block_bytes(self, lanes: usize) -> usize {
        extra(lanes) + 4 * lanes * if matches!(self, Kind::Q6K) { 4 } else { 1 }
    }
}

/// Where, in a packed block for panels of `lanes` rows, the per-row scales start (after eight
/// vectors of four quants per row) and the extras after them; each is `4 * lanes` bytes.
const fn scale(lanes: usize) -> usize {
    32 * lanes
}
const fn extra(lanes: usize) -> usize {
    36 * lanes
}

/// Whether this kernel handles weights of `dtype`.
pub(crate) fn supports(dtype: GgmlType) -> bool {
    Kind::of(dtype).is_some()
}

/// Where results go: row `i` of the panel and token `t` at `ptr + t * token_stride + i`.
#[derive(Clone, Copy)]
pub(crate) struct PanelOut {
    pub ptr: *mut f32,
    pub token_stride: usize,
}

/// Computes the `n_rows` (at most [`PANEL_ROWS`]) rows at the start of `w_rows` (rows of
/// `row_bytes` bytes of `dtype`, `cols` values) against every token of `acts` (Q8_0 rows and
/// their block info), with AVX-512 VNNI.
///
/// # Safety
/// Needs AVX-512 F, BW, VL and VNNI. `dtype` must be one [`supports`] accepts, the sizes must
/// fit, and `out` must be valid for writes at every (row, token) position, touched by no one
/// else meanwhile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn panel(
    dtype: GgmlType,
    w_rows: &[u8],
    row_bytes: usize,
    n_rows: usize,
    cols: usize,
    acts: &QuantizedActs,
    out: PanelOut,
) {
    sweep(
        dtype,
        w_rows,
        row_bytes,
        n_rows,
        PANEL_ROWS,
        cols,
        acts,
        &|job| {
            macro_rules! run {
                ($kind:expr) => {
                    match job.nt {
                        8 => tile::<8, { $kind as u8 }>(&job),
                        5..=7 => widen(tile::<7, { $kind as u8 }>(&job)),
                        3..=4 => widen(tile::<4, { $kind as u8 }>(&job)),
                        _ => widen(tile::<2, { $kind as u8 }>(&job)),
                    }
                };
            }
            // SAFETY: the caller promised VNNI; `sweep` hands over a packed panel and valid tokens.
            let acc: [__m512; TILE_TOKENS] = unsafe {
                match job.kind {
                    Kind::Offset => run!(Kind::Offset),
                    Kind::Signed => run!(Kind::Signed),
                    Kind::Q4K => run!(Kind::Q4K),
                    Kind::Q6K => run!(Kind::Q6K),
                }
            };
            for (t, v) in acc.iter().enumerate().take(job.nt) {
                // SAFETY: the caller promised the output positions of the panel's rows and tokens.
                unsafe {
                    let dst = out.ptr.add((job.t0 + t) * out.token_stride);
                    _mm512_mask_storeu_ps(dst, ((1u32 << n_rows) - 1) as u16, *v);
                }
            }
        },
    );
}

/// [`panel`] with AVX2 (`vpmaddubsw` and `vpmaddwd` for the byte products) and panels of
/// [`PANEL_ROWS_AVX2`] rows.
///
/// # Safety
/// Needs AVX2, FMA and F16C; otherwise as [`panel`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn panel_avx2(
    dtype: GgmlType,
    w_rows: &[u8],
    row_bytes: usize,
    n_rows: usize,
    cols: usize,
    acts: &QuantizedActs,
    out: PanelOut,
) {
    sweep(
        dtype,
        w_rows,
        row_bytes,
        n_rows,
        PANEL_ROWS_AVX2,
        cols,
        acts,
        &|job| {
            macro_rules! run {
                ($kind:expr) => {
                    match job.nt {
                        8 => tile_avx2::<8, { $kind as u8 }>(&job),
                        5..=7 => widen_avx2(tile_avx2::<7, { $kind as u8 }>(&job)),
                        3..=4 => widen_avx2(tile_avx2::<4, { $kind as u8 }>(&job)),
                        _ => widen_avx2(tile_avx2::<2, { $kind as u8 }>(&job)),
                    }
                };
            }
            // SAFETY: the caller promised AVX2; `sweep` hands over a packed panel and valid tokens.
            let acc: [__m256; TILE_TOKENS] = unsafe {
                match job.kind {
                    Kind::Offset => run!(Kind::Offset),
                    Kind::Signed => run!(Kind::Signed),
                    Kind::Q4K => run!(Kind::Q4K),
                    Kind::Q6K => run!(Kind::Q6K),
                }
            };
            for (t, v) in acc.iter().enumerate().take(job.nt) {
                let mut lanes = [0.0f32; PANEL_ROWS_AVX2];
                // SAFETY: `lanes` holds 8 floats; the caller promised the output positions.
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), *v);
                    let dst = out.ptr.add((job.t0 + t) * out.token_stride);
                    std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, n_rows);
                }
            }
        },
    );
}

/// One tile of tokens against a packed panel: what [`sweep`] hands its tile kernel.
struct TileJob {
    kind: Kind,
    /// The packed panel and its number of 32-value blocks.
    packed: *const u8,
    n_blocks: usize,
    /// Tokens `t0..t0 + nt`; their Q8_0 rows and block infos (past `nt`, the last repeated).
    t0: usize,
    nt: usize,
    rows: [*const u8; TILE_TOKENS],
    infos: [*const u8; TILE_TOKENS],
    /// log2 of the offset of Q4_0 (3) or Q5_0 (4) quants.
    shift: u32,
}

/// Packs the panel of `lanes` rows (rows past `n_rows` repeat the last; their results are
/// dropped), then hands `tile` every tile of up to [`TILE_TOKENS`] tokens.
#[allow(clippy::too_many_arguments)]
fn sweep(
    dtype: GgmlType,
    w_rows: &[u8],
    row_bytes: usize,
    n_rows: usize,
    lanes: usize,
    cols: usize,
    acts: &QuantizedActs,
    tile: &dyn Fn(TileJob),
) {
    let kind = Kind::of(dtype).expect("callers check `supports`");
    assert!((1..=lanes).contains(&n_rows));
    assert!(w_rows.len() >= n_rows * row_bytes && cols.is_multiple_of(dtype.block_size()));
    let n_blocks = cols / QK;
    let n_tokens = acts.n_tokens();
    let info_bytes = n_blocks * Q8_0_INFO_BYTES;
    assert!(acts.row_bytes == n_blocks * 34 && acts.q8_0_info.len() >= n_tokens * info_bytes);
    PACKED.with(|packed| {
        let packed = &mut *packed.borrow_mut();
        packed.clear();
        packed.resize(n_blocks * kind.block_bytes(lanes), 0);
        for i in 0..lanes {
            let r = i.min(n_rows - 1);
            let row = &w_rows[r * row_bytes..(r + 1) * row_bytes];
            // SAFETY: `sweep` runs under `panel` or `panel_avx2`, whose callers promised AVX2
            // (or more); the row holds whole blocks (checked by the matmul's validation).
            unsafe { pack_row(dtype, kind, lanes, row, i, packed) };
        }
        let mut t0 = 0;
        while t0 < n_tokens {
            let nt = (n_tokens - t0).min(TILE_TOKENS);
            let token = |t: usize| t0 + t.min(nt - 1);
            tile(TileJob {
                kind,
                packed: packed.as_ptr(),
                n_blocks,
                t0,
                nt,
                rows: std::array::from_fn(|t| acts.rows[token(t) * acts.row_bytes..].as_ptr()),
                infos: std::array::from_fn(|t| acts.q8_0_info[token(t) * info_bytes..].as_ptr()),
                shift: if dtype == GgmlType::Q5_0 { 4 } else { 3 },
            });
            t0 += nt;
        }
    });
}

#[inline(always)]
fn widen<const N: usize>(acc: [__m512; N]) -> [__m512; TILE_TOKENS] {
    // SAFETY: an all-zero __m512 is a valid value.
    let mut out = [unsafe { std::mem::zeroed::<__m512>() }; TILE_TOKENS];
    out[..N].copy_from_slice(&acc);
    out
}

#[inline(always)]
fn widen_avx2<const N: usize>(acc: [__m256; N]) -> [__m256; TILE_TOKENS] {
    // SAFETY: an all-zero __m256 is a valid value.
    let mut out = [unsafe { std::mem::zeroed::<__m256>() }; TILE_TOKENS];
    out[..N].copy_from_slice(&acc);
    out
}

/// Unpacks row `i` of a panel of `lanes` rows into the packed layout, block by block of 32
/// values: vector `g` (`4 * lanes` bytes) holds quants `4g..4g + 4` of every row.
///
/// # Safety
/// Needs AVX2 (the quants are unpacked with the row kernels' helpers); `row` must hold whole
/// blocks of `dtype` for `packed`'s blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_row(
    dtype: GgmlType,
    kind: Kind,
    lanes: usize,
    row: &[u8],
    i: usize,
    packed: &mut [u8],
) {
    use super::avx2_rows::{fifth_bits, load256, nibbles, q6k_half_quarters};
    let block_bytes = kind.block_bytes(lanes);
    let (vb, scale, extra) = (4 * lanes, scale(lanes), extra(lanes));
    let put = |dst: &mut [u8], off: usize, v: [u8; 4]| {
        dst[off + 4 * i..off + 4 * i + 4].copy_from_slice(&v)
    };
    let mut k4 = ([0u8; 8], [0u8; 8]);
    for (b, dst) in packed.chunks_exact_mut(block_bytes).enumerate() {
        let q: __m256i = match dtype {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                let block = &row[b * dtype.type_size()..(b + 1) * dtype.type_size()];
                put(dst, scale, layout::f16_at(block, 0).to_le_bytes());
                match dtype {
                    GgmlType::Q4_0 => nibbles(block[offs::Q4_0_QS..].as_ptr()),
                    GgmlType::Q5_0 => _mm256_or_si256(
                        nibbles(block[offs::Q5_0_QS..].as_ptr()),
                        fifth_bits(block[offs::Q5_0_QH..].as_ptr()),
                    ),
                    _ => {
                        let qs = &block[offs::Q8_0_QS..offs::Q8_0_QS + QK];
                        let sum: i32 = qs.iter().map(|&v| v as i8 as i32).sum();
                        put(dst, extra, sum.to_le_bytes());
                        load256(qs.as_ptr())
                    }
                }
            }
            GgmlType::Q4_K => {
                let (k, sub) = (b / 8, b % 8);
                let block = &row[k * 144..(k + 1) * 144];
                if sub == 0 {
                    k4 = layout::k4_scales_mins(&block[offs::Q4_K_SCALES..offs::Q4_K_SCALES + 12]);
                }
                // The scalar reference's products, rounded as it rounds them.
                let d_sub = layout::f16_at(block, 0) * k4.0[sub] as f32;
                let m_sub = layout::f16_at(block, offs::Q4_K_DMIN) * k4.1[sub] as f32;
                put(dst, scale, d_sub.to_le_bytes());
                put(dst, extra, m_sub.to_le_bytes());
                // Sub-blocks 2j and 2j + 1: the low and high nibbles of the same 32 bytes.
                let raw = load256(block[offs::Q4_K_QS + 32 * (sub / 2)..].as_ptr());
                let shifted = _mm256_srl_epi16(raw, _mm_cvtsi32_si128(4 * (sub % 2) as i32));
                _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F))
            }
            GgmlType::Q6_K => {
                let (k, sub) = (b / 8, b % 8);
                let block = &row[k * 210..(k + 1) * 210];
                put(
                    dst,
                    scale,
                    layout::f16_at(block, offs::Q6_K_D).to_le_bytes(),
                );
                let quarter = q6k_half_quarters(block.as_ptr(), sub / 4)[sub % 4];
                let q = _mm256_sub_epi8(quarter, _mm256_set1_epi8(32));
                let mut values = [0i8; QK];
                _mm256_storeu_si256(values.as_mut_ptr().cast(), q);
                for h in 0..2 {
                    let sum: i32 = values[16 * h..16 * h + 16].iter().map(|&v| v as i32).sum();
                    let group_scale = block[offs::Q6_K_SCALES + 2 * sub + h] as i8 as i32;
                    put(dst, extra + vb * h, sum.to_le_bytes());
                    put(dst, extra + 2 * vb + vb * h, group_scale.to_le_bytes());
                }
                q
            }
            _ => unreachable!("callers check `supports`"),
        };
        let mut groups = [0u32; 8];
        _mm256_storeu_si256(groups.as_mut_ptr().cast(), q);
        for (g, v) in groups.iter().enumerate() {
            put(dst, g * vb, v.to_le_bytes());
        }
    }
}

/// `NT` tokens against the packed panel of [`Kind`] `KIND`: one f32 accumulator of 16 rows per
/// token.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile<const NT: usize, const KIND: u8>(job: &TileJob) -> [__m512; NT] {
    const OFFSET: u8 = Kind::Offset as u8;
    const SIGNED: u8 = Kind::Signed as u8;
    const Q4K: u8 = Kind::Q4K as u8;
    const LANES: usize = PANEL_ROWS;
    const VB: usize = 4 * LANES;
    let (
        TileJob {
            packed,
            n_blocks,
            rows,
            infos,
            shift,
            ..
        },
        extra,
    ) = (job, extra(LANES));
    let block_bytes = Kind::of_code(KIND).block_bytes(LANES);
    let mut acc = [_mm512_setzero_ps(); NT];
    let bias = _mm512_set1_epi8(-128);
    let vec = |p: *const u8, off: usize| _mm512_loadu_si512(p.add(off).cast());
    for k in 0..*n_blocks {
        let p = packed.add(k * block_bytes);
        let w: [__m512i; 8] = std::array::from_fn(|g| vec(p, VB * g));
        let dw = _mm512_loadu_ps(p.add(scale(LANES)).cast());
        for t in 0..NT {
            let a = rows[t].add(k * 34 + offs::Q8_0_QS);
            let group = |g: usize| _mm512_set1_epi32(a.add(4 * g).cast::<i32>().read_unaligned());
            let info = infos[t].add(k * Q8_0_INFO_BYTES);
            let da = _mm512_set1_ps(info.cast::<f32>().read_unaligned());
            let quant_sum = info.add(4).cast::<i32>().read_unaligned();
            let mut isum = _mm512_setzero_si512();
            match KIND {
                OFFSET | Q4K => {
                    for (g, &wg) in w.iter().enumerate() {
                        isum = _mm512_dpbusd_epi32(isum, wg, group(g));
                    }
                }
                SIGNED => {
                    for (g, &wg) in w.iter().enumerate() {
                        isum = _mm512_dpbusd_epi32(isum, _mm512_xor_si512(group(g), bias), wg);
                    }
                }
                _ => {
                    // Two halves of 16 values with their own integer scales.
                    let mut half = [_mm512_setzero_si512(); 2];
                    for (g, &wg) in w.iter().enumerate() {
                        half[g / 4] =
                            _mm512_dpbusd_epi32(half[g / 4], _mm512_xor_si512(group(g), bias), wg);
                    }
                    for (h, part) in half.iter().enumerate() {
                        let correction = _mm512_slli_epi32::<7>(vec(p, extra + VB * h));
                        let scale = vec(p, extra + 2 * VB + VB * h);
                        let exact = _mm512_sub_epi32(*part, correction);
                        isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(exact, scale));
                    }
                }
            }
            acc[t] = match KIND {
                Q4K => {
                    // ((d·scale)·d_a)·isum − ((dmin·min)·d_a)·Σa, as the scalar reference.
                    let m_sub = _mm512_loadu_ps(p.add(extra).cast());
                    let term = _mm512_sub_ps(
                        _mm512_mul_ps(_mm512_mul_ps(dw, da), _mm512_cvtepi32_ps(isum)),
                        _mm512_mul_ps(_mm512_mul_ps(m_sub, da), _mm512_set1_ps(quant_sum as f32)),
                    );
                    _mm512_add_ps(acc[t], term)
                }
                _ => {
                    if KIND == OFFSET {
                        isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(quant_sum << *shift));
                    } else if KIND == SIGNED {
                        let correction = _mm512_slli_epi32::<7>(vec(p, extra));
                        isum = _mm512_sub_epi32(isum, correction);
                    }
                    // The scalar reference's step: sum += (d_w · d_a) · isum.
                    let d = _mm512_mul_ps(dw, da);
                    _mm512_add_ps(acc[t], _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum)))
                }
            };
        }
    }
    acc
}

/// [`tile`] with AVX2 on panels of [`PANEL_ROWS_AVX2`] rows. `vpmaddubsw` multiplies unsigned by
/// signed bytes into saturating i16 pairs, so signed weights (Q8_0, Q6_K) take `|w|` against
/// `a · sign(w)` (pairs within ±2·128·127, exact) instead of VNNI's `a + 128`; unsigned weights
/// below 32 against activations within ±127 give pairs within ±7874, so four groups add in
/// i16 before one `vpmaddwd`. The integer block sums are the same exact values, and the float
/// steps the same as [`tile`]'s.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const NT: usize, const KIND: u8>(job: &TileJob) -> [__m256; NT] {
    const SIGNED: u8 = Kind::Signed as u8;
    const Q4K: u8 = Kind::Q4K as u8;
    const Q6K: u8 = Kind::Q6K as u8;
    const OFFSET: u8 = Kind::Offset as u8;
    const LANES: usize = PANEL_ROWS_AVX2;
    const VB: usize = 4 * LANES;
    let (
        TileJob {
            packed,
            n_blocks,
            rows,
            infos,
            shift,
            ..
        },
        extra,
    ) = (job, extra(LANES));
    let block_bytes = Kind::of_code(KIND).block_bytes(LANES);
    let ones16 = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); NT];
    let vec = |p: *const u8, off: usize| _mm256_loadu_si256(p.add(off).cast());
    for k in 0..*n_blocks {
        let p = packed.add(k * block_bytes);
        let w: [__m256i; 8] = std::array::from_fn(|g| vec(p, VB * g));
        let signed = KIND == SIGNED || KIND == Q6K;
        let w_abs: [__m256i; 8] = if signed {
            std::array::from_fn(|g| _mm256_abs_epi8(w[g]))
        } else {
            w
        };
        let dw = _mm256_loadu_ps(p.add(scale(LANES)).cast());
        for t in 0..NT {
            let a = rows[t].add(k * 34 + offs::Q8_0_QS);
            let group = |g: usize| _mm256_set1_epi32(a.add(4 * g).cast::<i32>().read_unaligned());
            // Σ w·a over group g's four values, as i16 pairs.
            let pairs = |g: usize| {
                if signed {
                    _mm256_maddubs_epi16(w_abs[g], _mm256_sign_epi8(group(g), w[g]))
                } else {
                    _mm256_maddubs_epi16(w[g], group(g))
                }
            };
            let info = infos[t].add(k * Q8_0_INFO_BYTES);
            let da = _mm256_set1_ps(info.cast::<f32>().read_unaligned());
            let quant_sum = info.add(4).cast::<i32>().read_unaligned();
            let isum = if signed {
                let mut half = [_mm256_setzero_si256(); 2];
                for g in 0..8 {
                    half[g / 4] =
                        _mm256_add_epi32(half[g / 4], _mm256_madd_epi16(pairs(g), ones16));
                }
                if KIND == Q6K {
                    // Two halves of 16 values with their own integer scales.
                    let scaled =
                        |h: usize| _mm256_mullo_epi32(half[h], vec(p, extra + 2 * VB + VB * h));
                    _mm256_add_epi32(scaled(0), scaled(1))
                } else {
                    _mm256_add_epi32(half[0], half[1])
                }
            } else {
                let four = |g: usize| {
                    let s = _mm256_add_epi16(pairs(g), pairs(g + 1));
                    _mm256_add_epi16(s, _mm256_add_epi16(pairs(g + 2), pairs(g + 3)))
                };
                let isum = _mm256_add_epi32(
                    _mm256_madd_epi16(four(0), ones16),
                    _mm256_madd_epi16(four(4), ones16),
                );
                if KIND == OFFSET {
                    _mm256_sub_epi32(isum, _mm256_set1_epi32(quant_sum << *shift))
                } else {
                    isum
                }
            };
            acc[t] = if KIND == Q4K {
                // ((d·scale)·d_a)·isum − ((dmin·min)·d_a)·Σa, as the scalar reference.
                let m_sub = _mm256_loadu_ps(p.add(extra).cast());
                let term = _mm256_sub_ps(
                    _mm256_mul_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(isum)),
                    _mm256_mul_ps(_mm256_mul_ps(m_sub, da), _mm256_set1_ps(quant_sum as f32)),
                );
                _mm256_add_ps(acc[t], term)
            } else {
                let d = _mm256_mul_ps(dw, da);
                _mm256_add_ps(acc[t], _mm256_mul_ps(d, _mm256_cvtepi32_ps(isum)))
            };
        }
    }
    acc
}
