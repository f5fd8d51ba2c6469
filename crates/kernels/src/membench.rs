//! Plain memory-read bandwidth: what decoding, which streams every weight once per token, is
//! bounded by. `gemma bench --read-bandwidth` and the kernel benchmarks compare against it.

use std::time::Instant;

use crate::ThreadPool;

/// Sums every byte with eight independent 64-bit accumulators (wide loads, no dependency chain
/// between them: what a bandwidth test does). The sum itself means nothing.
pub fn read_all(data: &[u8]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = data.chunks_exact(64);
    for chunk in &mut chunks {
        for (a, word) in acc.iter_mut().zip(chunk.chunks_exact(8)) {
            *a = a.wrapping_add(u64::from_le_bytes(word.try_into().unwrap()));
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u64, |s, &b| s.wrapping_add(b as u64));
    acc.iter().fold(tail, |s, &a| s.wrapping_add(a))
}

/// [`read_all`] over the pool's threads, each reading one contiguous share of `data`.
pub fn read_all_parallel(pool: &ThreadPool, data: &[u8]) {
    let n = pool.n_threads();
    let share = data.len().div_ceil(n).next_multiple_of(64);
    pool.run(n, &|t| {
        let start = (t * share).min(data.len());
        let end = (start + share).min(data.len());
        std::hint::black_box(read_all(std::hint::black_box(&data[start..end])));
    });
}

/// Best read rate, in bytes per second, of `reps` parallel reads of `data` (which the caller
/// fills first, so that every page is backed).
pub fn read_bandwidth(pool: &ThreadPool, data: &[u8], reps: usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        read_all_parallel(pool, data);
        best = best.min(start.elapsed().as_secs_f64());
    }
    data.len() as f64 / best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_all_sums_every_byte_once() {
        // Odd length: the 64-byte body and the remainder are both read.
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let words: u64 = data
            .chunks_exact(64)
            .flat_map(|c| c.chunks_exact(8))
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .fold(0, u64::wrapping_add);
        let tail: u64 = data[960..].iter().map(|&b| b as u64).sum();
        assert_eq!(read_all(&data), words.wrapping_add(tail));
    }

    #[test]
    fn bandwidth_is_finite_and_positive() {
        let pool = ThreadPool::new(2);
        let data = vec![1u8; 1 << 20];
        let bw = read_bandwidth(&pool, &data, 2);
        assert!(bw.is_finite() && bw > 0.0, "{bw}");
    }
}
