//! Per-sequence state of a decoder: the key/value history of every layer plus reusable
//! activation buffers, so decoding a token allocates nothing.
//!
//! Global layers keep every position up to the context size. Sliding-window layers keep a ring
//! buffer of `window` positions, so their memory is bounded by the window whatever the context.
//!
//! Rows are stored in the cache's [`CacheType`] (f32, f16 or Q8_0), quantized as they are
//! written; attention reads them in that format.

use gemma_kernels::ops::attention::KvSegment;
use gemma_kernels::ops::kv::{CacheType, KvBuffer};
use gemma_kernels::quant::selected_isa;

use crate::ModelError;

/// Storage of one layer's keys and values: `capacity` rows of `row` values each; position `p`
/// lives in row `p % capacity`.
#[derive(Clone, Debug)]
pub(crate) struct LayerKv {
    keys: KvBuffer,
    values: KvBuffer,
    capacity: usize,
    row: usize,
}

impl LayerKv {
    fn new(capacity: usize, row: usize, cache_type: CacheType) -> Result<LayerKv, ModelError> {
        let n = capacity.checked_mul(row).ok_or(ModelError::OutOfMemory {
            what: "the KV cache",
            bytes: usize::MAX,
        })?;
        let buffer = || {
            KvBuffer::try_new(cache_type, n).map_err(|_| ModelError::OutOfMemory {
                what: "the KV cache",
                bytes: cache_type.bytes_for(n),
            })
        };
        Ok(LayerKv {
            keys: buffer()?,
            values: buffer()?,
            capacity,
            row,
        })
    }

    /// The stored positions `[max(0, len - capacity), len)` as at most two contiguous segments.
    pub(crate) fn segments(&self, len: usize) -> impl Iterator<Item = KvSegment<'_>> {
        let first = len.saturating_sub(self.capacity);
        let start_slot = first % self.capacity.max(1);
        let count = len - first;
        let head = count.min(self.capacity - start_slot);
        let tail = count - head;
        let row = self.row;
        let seg = move |slot: usize, pos: usize, n: usize| KvSegment {
            keys: self.keys.slice(slot * row, (slot + n) * row),
            values: self.values.slice(slot * row, (slot + n) * row),
            first_pos: pos,
            len: n,
        };
        [
            (head > 0).then(|| seg(start_slot, first, head)),
            (tail > 0).then(|| seg(0, first + head, tail)),
        ]
        .into_iter()
        .flatten()
    }

    /// The history a chunk starting at `pos0` attends to: the stored positions before it (at
    /// most two ring segments), then the chunk's own keys and values `fresh`.
    pub(crate) fn history_then<'a>(&'a self, pos0: usize, fresh: KvSegment<'a>) -> KvSegments<'a> {
        let mut segments = [fresh; 3];
        let mut len = 0;
        for seg in self.segments(pos0) {
            segments[len] = seg;
            len += 1;
        }
        segments[len] = fresh;
        KvSegments {
            segments,
            len: len + 1,
        }
    }

    /// Stores `n` rows of keys and values for positions `first_pos..first_pos + n`; a ring keeps
    /// only the newest `capacity` of them.
    pub(crate) fn write(&mut self, first_pos: usize, keys: &[f32], values: &[f32]) {
        let row = self.row;
        let n = keys.len() / row;
        let skip = n.saturating_sub(self.capacity);
        let isa = selected_isa();
        // Runs of consecutive slots (at most two: up to the end of the ring, then from 0) are
        // stored with one call each.
        let mut i = skip;
        while i < n {
            let slot = (first_pos + i) % self.capacity;
            let run = (n - i).min(self.capacity - slot);
            let src = i * row..(i + run) * row;
            self.keys.store(isa, slot * row, &keys[src.clone()]);
            self.values.store(isa, slot * row, &values[src]);
            i += run;
        }
    }

    fn bytes(&self) -> usize {
        self.keys.bytes() + self.values.bytes()
    }

    /// Rounds keys or values about to be attended to (but not yet stored) to this layer's
    /// storage precision, so a chunk sees its own keys exactly as later tokens will see them
    /// stored: results do not depend on how a prompt is cut into chunks.
    pub(crate) fn round_to_storage(&self, x: &mut [f32]) {
        self.keys.cache_type().round_trip(selected_isa(), x);
    }
}

/// Up to three segments of keys and values, in position order ([`LayerKv::history_then`]).
pub(crate) struct KvSegments<'a> {
    segments: [KvSegment<'a>; 3],
    len: usize,
}

impl<'a> std::ops::Deref for KvSegments<'a> {
    type Target = [KvSegment<'a>];
    fn deref(&self) -> &Self::Target {
        &self.segments[..self.len]
    }
}

/// Reusable activation buffers for a forward pass (grown on demand, never shrunk).
#[derive(Clone, Debug, Default)]
pub(crate) struct Scratch {
    /// The hidden states, `tokens × hidden`.
    pub x: Vec<f32>,
    /// Each token's local and global RoPE rotation (`head_dim` values per token).
    pub rope_local: Vec<f32>,
    pub rope_global: Vec<f32>,
    pub logits: Vec<f32>,
    /// What the blocks use in passing: a block borrows these while `x` and the rotations are
    /// borrowed elsewhere.
    pub work: Work,
    /// Gemma 3n's own buffers.
    pub gemma3n: Gemma3nWork,
}

/// Buffers of Gemma 3n's forward pass beyond the shared ones: AltUp streams, LAuReL, the
/// per-layer inputs, the KV-source layers' keys and values of the chunk.
#[derive(Clone, Debug, Default)]
pub(crate) struct Gemma3nWork {
    pub embeds: Vec<f32>,
    pub ple: Vec<f32>,
    pub ple_row: Vec<f32>,
    pub streams: Vec<f32>,
    pub predictions: Vec<f32>,
    pub active: Vec<f32>,
    pub laurel: Vec<f32>,
    pub laurel_low: Vec<f32>,
    pub gate_ple: Vec<f32>,
    pub unembedded: Vec<f32>,
    /// Per layer: the chunk's keys and values, if the layer is a KV source.
    pub shared_kv: Vec<Option<(Vec<f32>, Vec<f32>)>>,
    /// AltUp's mixing coefficients of every token.
    pub coefs: Vec<f32>,
}

/// Intermediate buffers of the decoder blocks.
#[derive(Clone, Debug, Default)]
pub(crate) struct Work {
    pub normed: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub attn: Vec<f32>,
    pub proj: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub quantized: Vec<u8>,
    /// A sparse MLP's kept rows (Gemma 3n) and its non-zero activations.
    pub kept_rows: Vec<u32>,
    pub sparse: gemma_kernels::sparse::SparseScratch,
}

/// One sequence's share of a batched forward pass: its new tokens, the soft tokens that
/// replace some of their embeddings, and its cache.
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    /// Sorted by `offset`, disjoint, each inside `tokens` (see [`SoftTokens`]).
    pub soft: &'a [SoftTokens<'a>],
    pub cache: &'a mut KvCache,
}

impl<'a> SeqStep<'a> {
    /// A step of text tokens only.
    pub fn text(tokens: &'a [u32], cache: &'a mut KvCache) -> SeqStep<'a> {
        SeqStep {
            tokens,
            soft: &[],
            cache,
        }
    }
}

/// Embedding rows from a tower (an image's or an audio clip's soft tokens) that replace the
/// token embeddings of a run of positions. The ids at those positions stay what the prompt
/// holds (the placeholder id): Gemma 3n still derives its per-layer inputs from them.
#[derive(Clone, Copy, Debug)]
pub struct SoftTokens<'a> {
    /// Index in the step's `tokens` of the first replaced position.
    pub offset: usize,
    /// `n × hidden_size` values, row-major; taken as they are (not scaled like token embeddings).
    pub embeds: &'a [f32],
    /// The run attends to itself in both directions (Gemma 3 image blocks); then the run must
    /// be fed whole in one step, since its first positions read its last ones' keys.
    pub bidirectional: bool,
}

impl SoftTokens<'_> {
    /// Positions of the step's tokens this run replaces.
    pub fn rows(&self, hidden: usize) -> std::ops::Range<usize> {
        self.offset..self.offset + self.embeds.len() / hidden.max(1)
    }
}

/// Checks that `soft` fits `n_tokens` tokens of width `hidden`: whole rows, sorted, disjoint.
pub(crate) fn check_soft_tokens(
    soft: &[SoftTokens<'_>],
    n_tokens: usize,
    hidden: usize,
) -> Result<(), ModelError> {
    let mut end = 0;
    for s in soft {
        let rows = s.rows(hidden);
        if s.embeds.is_empty() || !s.embeds.len().is_multiple_of(hidden) {
            return Err(ModelError::Config(format!(
                "soft tokens of {} values are not whole rows of the hidden size {hidden}",
                s.embeds.len()
            )));
        }
        if rows.start < end || rows.end > n_tokens {
            return Err(ModelError::Config(format!(
                "soft tokens at positions {rows:?} overlap others or pass the {n_tokens} tokens \
                 of the step"
            )));
        }
        end = rows.end;
    }
    Ok(())
}

/// Whether token `i` of a step is replaced by one of `soft` (sorted, disjoint).
pub(crate) fn is_soft(soft: &[SoftTokens<'_>], hidden: usize, i: usize) -> bool {
    soft.iter().any(|s| s.rows(hidden).contains(&i))
}

/// Grows `buf` to `n` values (no shrink, so steady-state decoding reuses the allocation).
pub(crate) fn sized(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// The state of one sequence: KV history for every layer and scratch buffers.
/// Cloning snapshots it (a prefix cache keeps such snapshots).
#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    len: usize,
    ctx_size: usize,
    cache_type: CacheType,
    pub(crate) scratch: Scratch,
}

impl KvCache {
    /// `capacities[i]` positions of `row` values for layer `i`, stored as `cache_type` (rows
    /// must be whole Q8_0 blocks for Q8_0; the models check the head dimension).
    pub(crate) fn new(
        ctx_size: usize,
        capacities: &[usize],
        row: usize,
        cache_type: CacheType,
    ) -> Result<KvCache, ModelError> {
        let total = KvCache::bytes_for(capacities, row, cache_type);
        let layers = capacities
            .iter()
            .map(|&c| LayerKv::new(c.max(1), row, cache_type))
            .collect::<Result<Vec<_>, _>>()
            // Name the whole cache's size, not the one layer that failed.
            .map_err(|_| ModelError::OutOfMemory {
                what: "the KV cache",
                bytes: total,
            })?;
        Ok(KvCache {
            layers,
            len: 0,
            ctx_size,
            cache_type,
            scratch: Scratch::default(),
        })
    }

    /// Bytes the cache will hold for `capacities` (same rule as `new`, without allocating;
    /// saturating, so an absurd context reads as `usize::MAX`).
    pub(crate) fn bytes_for(capacities: &[usize], row: usize, cache_type: CacheType) -> usize {
        capacities.iter().fold(0usize, |sum, &c| {
            let layer = cache_type.bytes_for(c.max(1).saturating_mul(row));
            sum.saturating_add(layer.saturating_mul(2))
        })
    }

    /// How keys and values are stored.
    pub fn cache_type(&self) -> CacheType {
        self.cache_type
    }

    /// Positions processed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn ctx_size(&self) -> usize {
        self.ctx_size
    }

    /// Forgets the sequence; memory is kept for the next one.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Drops every position from `len` on, so the sequence continues from there. A ring that
    /// has already overwritten history the continuation needs makes this an error: a query at
    /// `len` needs the `capacity - 1` positions before it, which must not have been evicted.
    pub fn truncate(&mut self, len: usize) -> Result<(), ModelError> {
        self.check_truncate(len)?;
        self.len = len;
        Ok(())
    }

    /// Whether `truncate(len)` is possible (see there).
    fn check_truncate(&self, len: usize) -> Result<(), ModelError> {
        if len > self.len {
            return Err(ModelError::Config(format!(
                "cannot truncate a cache of {} positions to {len}",
                self.len
            )));
        }
        for layer in &self.layers {
            let first_stored = self.len.saturating_sub(layer.capacity);
            let first_needed = len.saturating_sub(layer.capacity - 1);
            if first_stored > first_needed {
                return Err(ModelError::Config(format!(
                    "cannot truncate to {len} positions: a sliding-window layer no longer holds position {first_needed}"
                )));
            }
        }
        Ok(())
    }

    /// Makes this cache hold the first `len` positions of `src` (a cache of the same model and
    /// type), copying only the rows those positions occupy, as `truncate(len)` on a clone of
    /// `src` would but without cloning all of it. The two may differ in context size (a cache
    /// grown into a larger one) where every layer either has the same capacity in both or
    /// holds all `len` positions in both. Errors like `truncate` when a sliding-window layer
    /// of `src` no longer holds what the next position needs.
    pub fn copy_prefix_from(&mut self, src: &KvCache, len: usize) -> Result<(), ModelError> {
        // Position p sits in row p % capacity: the same row in both caches when the capacities
        // are equal or no layer has wrapped around.
        let same_rows = self.layers.len() == src.layers.len()
            && self.cache_type == src.cache_type
            && len <= self.ctx_size
            && self.layers.iter().zip(&src.layers).all(|(a, b)| {
                a.row == b.row && (a.capacity == b.capacity || len <= a.capacity.min(b.capacity))
            });
        if !same_rows {
            return Err(ModelError::Config(
                "cannot copy a KV prefix between caches of different shapes".into(),
            ));
        }
        src.check_truncate(len)?;
        let ctx_size = self.ctx_size;
        // The positions a later token may still read: all of them for a layer as long as the
        // context (a global layer, even one `len` fills), the last `capacity - 1` for a ring
        // (as in `truncate`).
        let first_kept = |dst: &LayerKv| {
            if dst.capacity >= ctx_size {
                0
            } else {
                len.saturating_sub(dst.capacity - 1).min(len)
            }
        };
        for (dst, from) in self.layers.iter().zip(&src.layers) {
            // A larger destination ring reads further back than the source's ring may hold.
            let first = first_kept(dst);
            if first < src.len.saturating_sub(from.capacity) {
                return Err(ModelError::Config(format!(
                    "cannot copy {len} positions: a sliding-window layer no longer holds position {first}"
                )));
            }
        }
        for (dst, from) in self.layers.iter_mut().zip(&src.layers) {
            let mut pos = first_kept(dst);
            while pos < len {
                let slot = pos % from.capacity;
                let run = (len - pos).min(from.capacity - slot);
                let range = (slot * from.row, (slot + run) * from.row);
                dst.keys.copy_range_from(&from.keys, range.0, range.1);
                dst.values.copy_range_from(&from.values, range.0, range.1);
                pos += run;
            }
        }
        self.len = len;
        Ok(())
    }

    /// Bytes held by keys and values.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }

    /// Checks that `n` more positions fit.
    pub(crate) fn reserve(&self, n: usize) -> Result<(), ModelError> {
        let needed = self.len + n;
        if needed > self.ctx_size {
            return Err(ModelError::ContextOverflow {
                needed,
                ctx_size: self.ctx_size,
            });
        }
        Ok(())
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys of the stored positions, in position order, as f32.
    fn stored_keys(kv: &LayerKv, len: usize) -> (Vec<usize>, Vec<f32>) {
        let segs: Vec<_> = kv.segments(len).collect();
        let positions = segs
            .iter()
            .flat_map(|s| s.first_pos..s.first_pos + s.len)
            .collect();
        let keys = segs.iter().flat_map(|s| s.keys.to_f32_vec()).collect();
        (positions, keys)
    }

    #[test]
    fn ring_keeps_the_newest_positions_in_order() {
        let mut kv = LayerKv::new(4, 1, CacheType::F32).unwrap();
        let rows: Vec<f32> = (0..7).map(|p| p as f32).collect();
        kv.write(0, &rows[..3], &rows[..3]);
        kv.write(3, &rows[3..], &rows[3..]);
        let (positions, keys) = stored_keys(&kv, 7);
        assert_eq!(positions, vec![3, 4, 5, 6]);
        assert_eq!(keys, vec![3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn chunk_longer_than_ring_keeps_its_tail() {
        let mut kv = LayerKv::new(3, 2, CacheType::F32).unwrap();
        let rows: Vec<f32> = (0..10).map(|v| v as f32).collect();
        kv.write(0, &rows, &rows);
        let segs: Vec<_> = kv.segments(5).collect();
        let (_, keys) = stored_keys(&kv, 5);
        assert_eq!(keys, vec![4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
        assert_eq!(segs[0].first_pos, 2);
    }

    /// Every format keeps the same positions as f32, each row as storing it once gives, when
    /// chunks wrap around the ring; and memory shrinks with the format.
    #[test]
    fn rings_in_every_format_hold_rounded_rows() {
        let row = 64;
        let all: Vec<f32> = (0..11 * row)
            .map(|i| ((i as f32) * 0.37).sin() * (1 + i / row) as f32)
            .collect();
        let mut bytes = Vec::new();
        for cache_type in CacheType::ALL {
            let mut kv = LayerKv::new(4, row, cache_type).unwrap();
            for (start, end) in [(0, 3), (3, 9), (9, 10), (10, 11)] {
                let chunk = &all[start * row..end * row];
                kv.write(start, chunk, chunk);
            }
            let (positions, keys) = stored_keys(&kv, 11);
            assert_eq!(positions, vec![7, 8, 9, 10], "{cache_type}");
            let mut expected = all[7 * row..].to_vec();
            cache_type.round_trip(selected_isa(), &mut expected);
            assert_eq!(keys, expected, "{cache_type}");
            bytes.push(kv.bytes());
        }
        assert_eq!(bytes, vec![2 * 4 * 64 * 4, 2 * 4 * 64 * 2, 2 * 4 * 2 * 34]);
    }

    #[test]
    fn an_absurd_cache_is_an_error_not_an_abort() {
        // 2^40 positions of 2^20 values: the size overflows; 2^34 × 256 f32s: the machine
        // refuses. Both must come back as errors naming the KV cache.
        for (ctx, row) in [(1usize << 40, 1usize << 20), (1 << 34, 256)] {
            let err = KvCache::new(ctx, &[ctx], row, CacheType::F32).unwrap_err();
            assert!(err.to_string().contains("KV cache"), "{err}");
        }
        let bytes = KvCache::bytes_for(&[usize::MAX, usize::MAX], 1 << 20, CacheType::F16);
        assert_eq!(bytes, usize::MAX, "sizes saturate instead of wrapping");
    }

    /// A cache of one global layer (16 positions) and one ring (4), with `n` positions of
    /// values `base + position` stored.
    fn filled(cache_type: CacheType, n: usize, base: f32) -> KvCache {
        let row = 32;
        let mut cache = KvCache::new(16, &[16, 4], row, cache_type).unwrap();
        let rows: Vec<f32> = (0..n * row).map(|i| base + (i / row) as f32).collect();
        for layer in &mut cache.layers {
            layer.write(0, &rows, &rows);
        }
        cache.len = n;
        cache
    }

    /// Copying a prefix gives the rows a truncated clone of the source holds, at every
    /// position a later token can read, whatever the destination held before.
    #[test]
    fn copied_prefix_equals_a_truncated_clone() {
        for cache_type in CacheType::ALL {
            // The ring (4 slots) holds positions 5..9: continuing from 8 needs 5..8.
            let src = filled(cache_type, 9, 0.0);
            let mut dst = filled(cache_type, 12, 100.0);
            dst.copy_prefix_from(&src, 8).unwrap();
            let mut clone = src.clone();
            clone.truncate(8).unwrap();
            assert_eq!(dst.len(), 8);
            for (layer, readable) in [(0, 0..8), (1, 5..8)] {
                let (pos_a, keys_a) = stored_keys(&dst.layers[layer], 8);
                let (pos_b, keys_b) = stored_keys(&clone.layers[layer], 8);
                assert_eq!(pos_a, pos_b);
                let row = 32;
                let first = pos_a[0];
                for p in readable {
                    let at = (p - first) * row..(p - first + 1) * row;
                    assert_eq!(
                        keys_a[at.clone()],
                        keys_b[at],
                        "{cache_type} layer {layer} pos {p}"
                    );
                }
            }
        }
    }

    /// A cache grown into a larger context takes the prefix over (rows at the same places
    /// while nothing wrapped); a different type or a wrapped ring of another size is refused.
    #[test]
    fn a_prefix_moves_into_a_larger_cache() {
        let src = filled(CacheType::F32, 4, 0.0);
        let mut big = KvCache::new(16, &[16, 8], 32, CacheType::F32).unwrap();
        big.copy_prefix_from(&src, 3).unwrap();
        assert_eq!(big.len(), 3);
        for layer in 0..2 {
            let (pos_a, keys_a) = stored_keys(&big.layers[layer], 3);
            let (pos_b, keys_b) = stored_keys(&src.layers[layer], 3);
            assert_eq!((pos_a, keys_a), (pos_b, keys_b), "layer {layer}");
        }
        // The source's ring (4 slots) wrapped: the larger ring would need what it dropped.
        let wrapped = filled(CacheType::F32, 9, 0.0);
        assert!(big.copy_prefix_from(&wrapped, 8).is_err());
    }

    /// A destination exactly as long as the prefix (a snapshot of it) still gets every
    /// position of its global layer, the first one included.
    #[test]
    fn a_cache_as_long_as_the_prefix_holds_all_of_it() {
        let src = filled(CacheType::F32, 9, 1.0);
        let mut exact = KvCache::new(8, &[8, 4], 32, CacheType::F32).unwrap();
        exact.copy_prefix_from(&src, 8).unwrap();
        let (pos_a, keys_a) = stored_keys(&exact.layers[0], 8);
        let (pos_b, keys_b) = stored_keys(&src.layers[0], 8);
        assert_eq!((pos_a, keys_a), (pos_b, keys_b[..8 * 32].to_vec()));
        // And back into a full-size cache: the same positions as the source's.
        let mut back = KvCache::new(16, &[16, 4], 32, CacheType::F32).unwrap();
        back.copy_prefix_from(&exact, 8).unwrap();
        let mut clone = src.clone();
        clone.truncate(8).unwrap();
        assert_eq!(
            stored_keys(&back.layers[0], 8),
            stored_keys(&clone.layers[0], 8)
        );
    }

    #[test]
    fn copying_what_a_ring_evicted_is_an_error() {
        let src = filled(CacheType::F32, 10, 0.0);
        let mut dst = filled(CacheType::F32, 2, 100.0);
        // The ring holds positions 6..10; continuing from 7 needs 4..7.
        assert!(dst.copy_prefix_from(&src, 7).is_err());
        assert!(dst.copy_prefix_from(&src, 11).is_err());
        let other = filled(CacheType::F16, 10, 0.0);
        assert!(dst.copy_prefix_from(&other, 4).is_err());
        assert_eq!(dst.len(), 2, "a refused copy leaves the cache as it was");
    }
}
