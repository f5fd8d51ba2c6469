//! Storage formats of a KV cache (llama.cpp's `--cache-type-k/-v`): f32, IEEE f16, or GGML
//! Q8_0 blocks of 32 values along the head dimension. Rows are quantized when stored and read
//! back a few rows at a time by attention, so the whole cache is never converted.

use std::fmt;
use std::str::FromStr;

use half::f16;
use half::slice::HalfBitsSliceExt;

use crate::quant::Isa;

/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

/// One GGML Q8_0 block: `value[i] = d · qs[i]` (34 bytes, the same layout as `block_q8_0`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; Q8_0_BLOCK],
}

impl BlockQ8_0 {
    /// ggml's reference rounding: `d = max|x| / 127`, `q = round(x / d)` (half away from zero).
    fn quantize(x: &[f32]) -> BlockQ8_0 {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        BlockQ8_0 {
            d: f16::from_f32(d),
            qs: std::array::from_fn(|i| (x[i] * inv).round() as i8),
        }
    }
}

/// How a KV cache stores its keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CacheType {
    /// Exact: the keys and values the model computed.
    #[default]
    F32,
    /// IEEE half precision (llama.cpp's default): 11 significant bits, half the memory.
    F16,
    /// GGML Q8_0 along the head dimension: 8.5 bits per value; needs `head_dim % 32 == 0`.
    Q8_0,
}

impl CacheType {
    pub const ALL: [CacheType; 3] = [CacheType::F32, CacheType::F16, CacheType::Q8_0];

    /// The name llama.cpp uses for `-ctk/-ctv`.
    pub fn name(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
            CacheType::Q8_0 => "q8_0",
        }
    }

    /// Bytes that `n` values (a multiple of 32 for Q8_0) take in this format.
    /// Bytes for `n` values (saturating: an absurd size reads as `usize::MAX`, never wraps).
    pub fn bytes_for(self, n: usize) -> usize {
        match self {
            CacheType::F32 => n.saturating_mul(4),
            CacheType::F16 => n.saturating_mul(2),
            CacheType::Q8_0 => (n / Q8_0_BLOCK).saturating_mul(std::mem::size_of::<BlockQ8_0>()),
        }
    }

    /// Whether rows of heads of `head_dim` values can be stored: Q8_0 blocks must not straddle
    /// two heads, since attention reads one head's slice of a row.
    pub fn check_head_dim(self, head_dim: usize) -> Result<(), String> {
        if self == CacheType::Q8_0 && !head_dim.is_multiple_of(Q8_0_BLOCK) {
            return Err(format!(
                "cache type q8_0 needs a head dimension that is a multiple of {Q8_0_BLOCK}, \
                 this model's is {head_dim} (use f16 or f32)"
            ));
        }
        Ok(())
    }

    /// Replaces `x` by what storing and reading it back gives (identity for f32). Keys and
    /// values still in flight go through this so that every key attention sees has the
    /// precision of the cache, whether it was just computed or stored earlier.
    ///
    /// # Panics
    /// For Q8_0 when `x.len()` is not a multiple of 32.
    #[track_caller]
    pub fn round_trip(self, isa: Isa, x: &mut [f32]) {
        assert!(isa.is_available(), "ISA {isa:?} is not available");
        match self {
            CacheType::F32 => {}
            CacheType::F16 => {
                let mut buf = [f16::ZERO; 64];
                for chunk in x.chunks_mut(64) {
                    let tmp = &mut buf[..chunk.len()];
                    f32_to_f16(isa, chunk, tmp);
                    f16_to_f32(isa, tmp, chunk);
                }
            }
            CacheType::Q8_0 => {
                assert!(
                    x.len().is_multiple_of(Q8_0_BLOCK),
                    "q8_0: {} values are not whole blocks",
                    x.len()
                );
                for chunk in x.chunks_exact_mut(Q8_0_BLOCK) {
                    let block = BlockQ8_0::quantize(chunk);
                    q8_0_to_f32(isa, std::slice::from_ref(&block), chunk);
                }
            }
        }
    }
}

impl fmt::Display for CacheType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CacheType {
    type Err = String;

    fn from_str(s: &str) -> Result<CacheType, String> {
        CacheType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown cache type {s:?} (expected f32, f16 or q8_0)"))
    }
}

/// Borrowed rows of a cache in their stored format; each row holds `n_kv_heads · head_dim`
/// values (for Q8_0: that many divided by 32 blocks).
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Q8_0(&'a [BlockQ8_0]),
}

impl<'a> From<&'a [f32]> for KvRows<'a> {
    fn from(rows: &'a [f32]) -> Self {
        KvRows::F32(rows)
    }
}

impl<'a> From<&'a mut [f32]> for KvRows<'a> {
    fn from(rows: &'a mut [f32]) -> Self {
        KvRows::F32(rows)
    }
}

impl KvRows<'_> {
    pub fn cache_type(&self) -> CacheType {
        match self {
            KvRows::F32(_) => CacheType::F32,
            KvRows::F16(_) => CacheType::F16,
            KvRows::Q8_0(_) => CacheType::Q8_0,
        }
    }

    /// How many values the rows hold.
    pub fn n_values(&self) -> usize {
        match self {
            KvRows::F32(v) => v.len(),
            KvRows::F16(v) => v.len(),
            KvRows::Q8_0(b) => b.len() * Q8_0_BLOCK,
        }
    }

    /// Every value as f32, in a new vector (for tests and inspection, not hot paths).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.n_values()];
        self.read_into(Isa::Scalar, 0, &mut out);
        out
    }

    /// Writes the `dst.len()` values starting at value `offset` into `dst` as f32.
    /// For Q8_0, `offset` and `dst.len()` must be multiples of 32. `isa` must have been
    /// checked with [`Isa::is_available`] by the caller.
    #[inline(always)]
    pub(crate) fn read_into(&self, isa: Isa, offset: usize, dst: &mut [f32]) {
        let n = dst.len();
        match self {
            KvRows::F32(v) => dst.copy_from_slice(&v[offset..offset + n]),
            KvRows::F16(v) => f16_to_f32(isa, &v[offset..offset + n], dst),
            KvRows::Q8_0(b) => {
                let first = offset / Q8_0_BLOCK;
                q8_0_to_f32(isa, &b[first..first + n / Q8_0_BLOCK], dst);
            }
        }
    }
}

/// Owned rows in one cache format, all zero at first.
///
/// The memory comes from a zeroed allocation (f16 and Q8_0 are kept as `u16` words, which the
/// allocator can hand out as untouched zero pages), so the part of a long context a sequence
/// never reaches does not count toward the resident set.
#[derive(Clone, Debug)]
pub struct KvBuffer {
    cache_type: CacheType,
    storage: Storage,
}

#[derive(Clone, Debug)]
enum Storage {
    F32(Vec<f32>),
    /// f16 bit patterns, or Q8_0 blocks of 17 words each.
    Words(Vec<u16>),
}

/// `u16` words per Q8_0 block (34 bytes).
const Q8_0_WORDS: usize = std::mem::size_of::<BlockQ8_0>() / 2;
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::align_of::<BlockQ8_0>() == 2);

fn as_blocks(words: &[u16]) -> &[BlockQ8_0] {
    // SAFETY: `BlockQ8_0` is `repr(C)`, 34 bytes (17 words) with alignment 2, and every bit
    // pattern is a valid block (an f16 and 32 i8); the length is whole blocks.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() / Q8_0_WORDS) }
}

fn as_blocks_mut(words: &mut [u16]) -> &mut [BlockQ8_0] {
    // SAFETY: as in `as_blocks`.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() / Q8_0_WORDS) }
}

impl KvBuffer {
    /// Room for `n_values` values (a multiple of 32 for Q8_0).
    pub fn new(cache_type: CacheType, n_values: usize) -> KvBuffer {
        KvBuffer::try_new(cache_type, n_values).expect("KV buffer allocation")
    }

    /// [`KvBuffer::new`] that reports an allocation the machine refuses (a context size far
    /// beyond its memory) instead of aborting the process.
    pub fn try_new(
        cache_type: CacheType,
        n_values: usize,
    ) -> Result<KvBuffer, std::collections::TryReserveError> {
        fn zeroed<T: Clone + Default>(
            n: usize,
        ) -> Result<Vec<T>, std::collections::TryReserveError> {
            let mut v = Vec::new();
            v.try_reserve_exact(n)?;
            v.resize(n, T::default());
            Ok(v)
        }
        let storage = match cache_type {
            CacheType::F32 => Storage::F32(zeroed(n_values)?),
            CacheType::F16 => Storage::Words(zeroed(n_values)?),
            CacheType::Q8_0 => Storage::Words(zeroed(n_values / Q8_0_BLOCK * Q8_0_WORDS)?),
        };
        Ok(KvBuffer {
            cache_type,
            storage,
        })
    }

    pub fn cache_type(&self) -> CacheType {
        self.cache_type
    }

    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(v) => std::mem::size_of_val(v.as_slice()),
            Storage::Words(v) => std::mem::size_of_val(v.as_slice()),
        }
    }

    /// Every value, borrowed in the stored format.
    pub fn rows(&self) -> KvRows<'_> {
        match (&self.storage, self.cache_type) {
            (Storage::F32(v), _) => KvRows::F32(v),
            (Storage::Words(w), CacheType::Q8_0) => KvRows::Q8_0(as_blocks(w)),
            (Storage::Words(w), _) => KvRows::F16(w.reinterpret_cast()),
        }
    }

    /// Values `[start, end)` (multiples of 32 for Q8_0), borrowed in the stored format.
    pub fn slice(&self, start: usize, end: usize) -> KvRows<'_> {
        match self.rows() {
            KvRows::F32(v) => KvRows::F32(&v[start..end]),
            KvRows::F16(v) => KvRows::F16(&v[start..end]),
            KvRows::Q8_0(v) => KvRows::Q8_0(&v[start / Q8_0_BLOCK..end / Q8_0_BLOCK]),
        }
    }

    /// Copies values `[start, end)` of `src`, a buffer of the same type (its size may differ:
    /// the range must lie in both), into the same place of this one (multiples of 32 for
    /// Q8_0); no conversion, no rounding.
    #[track_caller]
    pub fn copy_range_from(&mut self, src: &KvBuffer, start: usize, end: usize) {
        assert_eq!(
            self.cache_type, src.cache_type,
            "copy between KV buffers of different types"
        );
        assert!(
            start <= end && end <= self.rows().n_values() && end <= src.rows().n_values(),
            "copy of values {start}..{end} between KV buffers of {} and {} values",
            self.rows().n_values(),
            src.rows().n_values()
        );
        let words = |i: usize| match self.cache_type {
            CacheType::Q8_0 => i / Q8_0_BLOCK * Q8_0_WORDS,
            _ => i,
        };
        let (a, b) = (words(start), words(end));
        match (&mut self.storage, &src.storage) {
            (Storage::F32(d), Storage::F32(s)) => d[start..end].copy_from_slice(&s[start..end]),
            (Storage::Words(d), Storage::Words(s)) => d[a..b].copy_from_slice(&s[a..b]),
            _ => unreachable!("same cache type, same storage"),
        }
    }

    /// Stores `src` at value `offset`, converting to the buffer's format (for Q8_0, `offset`
    /// and `src.len()` must be multiples of 32).
    #[track_caller]
    pub fn store(&mut self, isa: Isa, offset: usize, src: &[f32]) {
        assert!(isa.is_available(), "ISA {isa:?} is not available");
        let n = src.len();
        match (&mut self.storage, self.cache_type) {
            (Storage::F32(v), _) => v[offset..offset + n].copy_from_slice(src),
            (Storage::Words(w), CacheType::Q8_0) => {
                assert!(
                    offset.is_multiple_of(Q8_0_BLOCK) && n.is_multiple_of(Q8_0_BLOCK),
                    "q8_0 store of {n} values at {offset}: not whole blocks"
                );
                let first = offset / Q8_0_BLOCK;
                for (dst, x) in as_blocks_mut(w)[first..first + n / Q8_0_BLOCK]
                    .iter_mut()
                    .zip(src.chunks_exact(Q8_0_BLOCK))
                {
                    *dst = BlockQ8_0::quantize(x);
                }
            }
            (Storage::Words(w), _) => {
                let dst: &mut [f16] = w.reinterpret_cast_mut();
                f32_to_f16(isa, src, &mut dst[offset..offset + n]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn uses_f16c(isa: Isa) -> bool {
    // `Isa::Avx2` and above include F16C (see `Isa::is_available`).
    matches!(isa, Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni)
}

// The converters below take an `isa` their callers checked with `Isa::is_available`.

/// f32 → f16 with round-to-nearest-even (F16C on x86 when `isa` has it).
#[track_caller]
fn f32_to_f16(isa: Isa, src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_f16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if uses_f16c(isa) {
        // SAFETY: F16C + AVX2 available (checked by the caller); lengths are equal.
        unsafe { x86::f32_to_f16(src, dst) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa; // only x86 has a SIMD converter
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(*s);
    }
}

/// f16 → f32 (exact).
#[track_caller]
#[inline(always)]
fn f16_to_f32(isa: Isa, src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16_to_f32: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::Avx512Vnni) {
        // SAFETY: AVX-512F, AVX2 and F16C available (checked by the caller); lengths are equal.
        unsafe { x86::f16_to_f32_avx512(src, dst) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if uses_f16c(isa) {
        // SAFETY: F16C + AVX2 available (checked by the caller); lengths are equal.
        unsafe { x86::f16_to_f32(src, dst) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa; // only x86 has a SIMD converter
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Q8_0 blocks → f32 (`d · q`, computed in f32 exactly as ggml's dequantizer).
#[track_caller]
#[inline(always)]
fn q8_0_to_f32(isa: Isa, src: &[BlockQ8_0], dst: &mut [f32]) {
    assert_eq!(
        src.len() * Q8_0_BLOCK,
        dst.len(),
        "q8_0_to_f32: lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if uses_f16c(isa) {
        // SAFETY: as in `f16_to_f32`.
        unsafe { x86::q8_0_to_f32(src, dst) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa; // only x86 has a SIMD converter
    for (block, out) in src.iter().zip(dst.chunks_exact_mut(Q8_0_BLOCK)) {
        let d = block.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&block.qs) {
            *o = d * q as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BlockQ8_0, Q8_0_BLOCK};
    use half::f16;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX + F16C must be available; `src.len() == dst.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
        let n = src.len();
        let chunks = n / 8;
        for c in 0..chunks {
            let x = _mm256_loadu_ps(src.as_ptr().add(8 * c));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            _mm_storeu_si128(dst.as_mut_ptr().add(8 * c) as *mut __m128i, h);
        }
        for i in chunks * 8..n {
            dst[i] = f16::from_f32(src[i]);
        }
    }

    /// # Safety
    /// AVX + F16C must be available; `src.len() == dst.len()`.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub(super) unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
        let n = src.len();
        let chunks = n / 8;
        for c in 0..chunks {
            let h = _mm_loadu_si128(src.as_ptr().add(8 * c) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(8 * c), _mm256_cvtph_ps(h));
        }
        for i in chunks * 8..n {
            dst[i] = src[i].to_f32();
        }
    }

    /// [`f16_to_f32`] sixteen values at a time (the conversion is exact: the same values).
    ///
    /// # Safety
    /// AVX-512F, AVX2 and F16C must be available; `src.len() == dst.len()`.
    #[target_feature(enable = "avx512f,avx2,f16c")]
    #[inline]
    pub(super) unsafe fn f16_to_f32_avx512(src: &[f16], dst: &mut [f32]) {
        let n = src.len();
        let chunks = n / 16;
        for c in 0..chunks {
            let h = _mm256_loadu_si256(src.as_ptr().add(16 * c) as *const __m256i);
            _mm512_storeu_ps(dst.as_mut_ptr().add(16 * c), _mm512_cvtph_ps(h));
        }
        f16_to_f32(&src[chunks * 16..], &mut dst[chunks * 16..]);
    }

    /// # Safety
    /// AVX2 + F16C must be available; `dst.len() == 32 · src.len()`.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub(super) unsafe fn q8_0_to_f32(src: &[BlockQ8_0], dst: &mut [f32]) {
        for (b, block) in src.iter().enumerate() {
            let d = _mm256_set1_ps(block.d.to_f32());
            let qs = block.qs.as_ptr();
            let out = dst.as_mut_ptr().add(b * Q8_0_BLOCK);
            for k in 0..Q8_0_BLOCK / 8 {
                let q8 = _mm_loadl_epi64(qs.add(8 * k) as *const __m128i);
                let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
                _mm256_storeu_ps(out.add(8 * k), _mm256_mul_ps(d, q));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma_formats::GgmlType;

    fn wavy(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.731).sin() * 3.0) * (1.0 + (i % 7) as f32))
            .collect()
    }

    #[test]
    fn q8_0_blocks_match_the_ggml_reference_quantizer() {
        let x = wavy(4 * Q8_0_BLOCK);
        let mut buffer = KvBuffer::new(CacheType::Q8_0, x.len());
        buffer.store(Isa::Scalar, 0, &x);
        let mut reference = vec![0u8; GgmlType::Q8_0.bytes_for(x.len()).unwrap()];
        crate::quant::quantize(GgmlType::Q8_0, &x, &mut reference).unwrap();
        let KvRows::Q8_0(blocks) = buffer.rows() else {
            unreachable!()
        };
        for (block, bytes) in blocks.iter().zip(reference.chunks_exact(34)) {
            assert_eq!(block.d.to_bits().to_le_bytes(), [bytes[0], bytes[1]]);
            let qs: Vec<u8> = block.qs.iter().map(|&q| q as u8).collect();
            assert_eq!(qs, &bytes[2..]);
        }
        let mut back = vec![0.0; x.len()];
        buffer.rows().read_into(Isa::Scalar, 0, &mut back);
        let mut reference_back = vec![0.0; x.len()];
        crate::quant::dequantize(GgmlType::Q8_0, &reference, &mut reference_back).unwrap();
        assert_eq!(back, reference_back);
        assert_eq!(buffer.bytes(), 4 * 34);
    }

    #[test]
    fn simd_conversions_equal_scalar_ones() {
        let isa = crate::quant::selected_isa();
        let mut x = wavy(8 * Q8_0_BLOCK + 5);
        x[3] = 65504.0 * 2.0; // overflows f16 to infinity in both paths
        x[4] = 1e-7; // subnormal in f16
        for cache_type in [CacheType::F16, CacheType::Q8_0] {
            let n = if cache_type == CacheType::Q8_0 {
                8 * Q8_0_BLOCK
            } else {
                x.len()
            };
            let x = if cache_type == CacheType::Q8_0 {
                let mut y = x[..n].to_vec();
                y[3] = 17.0;
                y
            } else {
                x.clone()
            };
            let mut fast = KvBuffer::new(cache_type, n);
            let mut slow = KvBuffer::new(cache_type, n);
            fast.store(isa, 0, &x);
            slow.store(Isa::Scalar, 0, &x);
            let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
            fast.rows().read_into(isa, 0, &mut a);
            slow.rows().read_into(Isa::Scalar, 0, &mut b);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{cache_type}");
            let mut rt = x.clone();
            cache_type.round_trip(isa, &mut rt);
            assert_eq!(bits(&rt), bits(&a), "{cache_type} round trip");
        }
    }

    /// Every f16 bit pattern reads back the same on every instruction set this CPU has (NaNs
    /// only among the SIMD converters, which quiet them alike), from every offset so that each
    /// value goes through the 16-, 8-lane and scalar loops.
    #[test]
    fn f16_reads_equal_on_every_isa() {
        let words: Vec<u16> = (0..=u16::MAX).collect();
        let halves: Vec<f16> = words.iter().map(|&w| f16::from_bits(w)).collect();
        let rows = KvRows::F16(&halves);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let mut want = vec![0.0; halves.len()];
        rows.read_into(Isa::Scalar, 0, &mut want);
        let isas = crate::quant::available_isas();
        for &isa in &isas[1..] {
            for offset in 0..17 {
                let n = halves.len() - offset - (offset * 7) % 23;
                let mut got = vec![0.0; n];
                rows.read_into(isa, offset, &mut got);
                for (i, (g, w)) in got.iter().zip(&want[offset..]).enumerate() {
                    if !w.is_nan() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{isa:?} at {offset}: word {}",
                            offset + i
                        );
                    }
                }
                if isa != isas[1] {
                    let mut first = vec![0.0; n];
                    rows.read_into(isas[1], offset, &mut first);
                    assert_eq!(
                        bits(&got),
                        bits(&first),
                        "{isa:?} vs {:?} at {offset}",
                        isas[1]
                    );
                }
            }
        }
    }

    #[test]
    fn stored_values_keep_the_format_precision() {
        let x = wavy(2 * Q8_0_BLOCK);
        let mut f16_rows = KvBuffer::new(CacheType::F16, x.len());
        f16_rows.store(Isa::Scalar, 0, &x);
        let mut back = vec![0.0; x.len()];
        f16_rows.rows().read_into(Isa::Scalar, 0, &mut back);
        for (a, b) in back.iter().zip(&x) {
            // Half precision keeps 11 significant bits: relative error at most 2^-11.
            assert!((a - b).abs() <= b.abs() * 2f32.powi(-11), "{a} vs {b}");
        }
        let mut q8_rows = KvBuffer::new(CacheType::Q8_0, x.len());
        q8_rows.store(Isa::Scalar, 0, &x);
        q8_rows.rows().read_into(Isa::Scalar, 0, &mut back);
        for (chunk, got) in x.chunks(32).zip(back.chunks(32)) {
            let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (a, b) in got.iter().zip(chunk) {
                // Half a quantization step (amax / 127 / 2), plus the f16 rounding of d.
                assert!((a - b).abs() <= amax / 254.0 * 1.01, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn cache_types_parse_and_size() {
        for t in CacheType::ALL {
            assert_eq!(t.name().parse::<CacheType>().unwrap(), t);
            assert_eq!(KvBuffer::new(t, 256).bytes(), t.bytes_for(256));
            let fresh = KvBuffer::new(t, 256);
            assert_eq!(fresh.cache_type(), t);
            assert!(fresh.rows().to_f32_vec().iter().all(|&v| v == 0.0));
        }
        assert_eq!("Q8_0".parse::<CacheType>().unwrap(), CacheType::Q8_0);
        assert!("q4_0".parse::<CacheType>().unwrap_err().contains("f16"));
        assert!(CacheType::Q8_0.check_head_dim(16).is_err());
        assert!(CacheType::Q8_0.check_head_dim(256).is_ok());
        assert!(CacheType::F16.check_head_dim(16).is_ok());
        assert_eq!(CacheType::F16.bytes_for(256), 512);
        assert_eq!(CacheType::Q8_0.bytes_for(256), 8 * 34);
    }
}
