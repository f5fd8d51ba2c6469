//! Per-sequence state of a decoder: the key/value history of every layer plus reusable
//! activation buffers, so decoding a token allocates nothing.
//!
//! Global layers keep every position up to the context size. Sliding-window layers keep a ring
//! buffer of `window` positions, so their memory is bounded by the window whatever the context.

use gemma_kernels::ops::attention::KvSegment;

use crate::ModelError;

/// Storage of one layer's keys and values: `capacity` rows of `row` floats each; position `p`
/// lives in row `p % capacity`.
#[derive(Clone, Debug)]
pub(crate) struct LayerKv {
    keys: Vec<f32>,
    values: Vec<f32>,
    capacity: usize,
    row: usize,
}

impl LayerKv {
    fn new(capacity: usize, row: usize) -> LayerKv {
        LayerKv {
            keys: vec![0.0; capacity * row],
            values: vec![0.0; capacity * row],
            capacity,
            row,
        }
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
            keys: &self.keys[slot * row..(slot + n) * row],
            values: &self.values[slot * row..(slot + n) * row],
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

    /// Stores `n` rows of keys and values for positions `first_pos..first_pos + n`; a ring keeps
    /// only the newest `capacity` of them.
    pub(crate) fn write(&mut self, first_pos: usize, keys: &[f32], values: &[f32]) {
        let n = keys.len() / self.row;
        let skip = n.saturating_sub(self.capacity);
        for i in skip..n {
            let slot = (first_pos + i) % self.capacity;
            let dst = slot * self.row..(slot + 1) * self.row;
            self.keys[dst.clone()].copy_from_slice(&keys[i * self.row..(i + 1) * self.row]);
            self.values[dst].copy_from_slice(&values[i * self.row..(i + 1) * self.row]);
        }
    }

    fn bytes(&self) -> usize {
        (self.keys.len() + self.values.len()) * std::mem::size_of::<f32>()
    }
}

/// Reusable activation buffers for a forward pass (grown on demand, never shrunk).
#[derive(Clone, Debug, Default)]
pub(crate) struct Scratch {
    pub x: Vec<f32>,
    pub normed: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub attn: Vec<f32>,
    pub proj: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub logits: Vec<f32>,
    pub quantized: Vec<u8>,
}

/// One sequence's share of a batched forward pass: its new tokens and its cache.
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
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
    pub(crate) scratch: Scratch,
}

impl KvCache {
    /// `capacities[i]` positions of `row` floats for layer `i`.
    pub(crate) fn new(ctx_size: usize, capacities: &[usize], row: usize) -> KvCache {
        KvCache {
            layers: capacities
                .iter()
                .map(|&c| LayerKv::new(c.max(1), row))
                .collect(),
            len: 0,
            ctx_size,
            scratch: Scratch::default(),
        }
    }

    /// Bytes the cache will hold for `capacities` (same rule as `new`, without allocating).
    pub(crate) fn bytes_for(capacities: &[usize], row: usize) -> usize {
        capacities
            .iter()
            .map(|&c| 2 * c.max(1) * row * std::mem::size_of::<f32>())
            .sum()
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

    #[test]
    fn ring_keeps_the_newest_positions_in_order() {
        let mut kv = LayerKv::new(4, 1);
        let rows: Vec<f32> = (0..7).map(|p| p as f32).collect();
        kv.write(0, &rows[..3], &rows[..3]);
        kv.write(3, &rows[3..], &rows[3..]);
        let segs: Vec<_> = kv.segments(7).collect();
        let positions: Vec<usize> = segs
            .iter()
            .flat_map(|s| s.first_pos..s.first_pos + s.len)
            .collect();
        let keys: Vec<f32> = segs.iter().flat_map(|s| s.keys.iter().copied()).collect();
        assert_eq!(positions, vec![3, 4, 5, 6]);
        assert_eq!(keys, vec![3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn chunk_longer_than_ring_keeps_its_tail() {
        let mut kv = LayerKv::new(3, 2);
        let rows: Vec<f32> = (0..10).map(|v| v as f32).collect();
        kv.write(0, &rows, &rows);
        let segs: Vec<_> = kv.segments(5).collect();
        let keys: Vec<f32> = segs.iter().flat_map(|s| s.keys.iter().copied()).collect();
        assert_eq!(keys, vec![4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
        assert_eq!(segs[0].first_pos, 2);
    }
}
