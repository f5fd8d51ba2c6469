//! Timing of attention (not a test: nothing is asserted about speed): decoding over a long
//! cache in each storage format, at Gemma 3 270M's global layers' shapes (4 query heads, 1 kv
//! head, head_dim 256), the same with 8 query heads on 2 kv heads comparing the AVX2 and
//! AVX-512 builds, and a vision tower's bidirectional attention.
//! `cargo test --release -p gemma-kernels --test attention_bench -- --ignored --nocapture`

use std::time::Instant;

use gemma_kernels::ops::attention::{
    attention, attention_with, AttentionMask, AttentionParams, KvSegment,
};
use gemma_kernels::ops::kv::{CacheType, KvBuffer};
use gemma_kernels::quant::{selected_isa, Isa};
use gemma_kernels::ThreadPool;

#[test]
#[ignore = "benchmark; run explicitly"]
fn decode_attention_at_depth() {
    let pool = ThreadPool::new(1);
    let (nh, hd, n_keys) = (4, 256, 4096);
    let p = AttentionParams {
        n_heads: nh,
        n_kv_heads: 1,
        head_dim: hd,
        scale: 0.0625,
        softcap: None,
        mask: AttentionMask::Causal,
        tiled: false,
    };
    let values: Vec<f32> = (0..n_keys * hd)
        .map(|i| ((i as f32) * 0.013).sin())
        .collect();
    for n_queries in [1usize, 64] {
        let q: Vec<f32> = (0..n_queries * nh * hd)
            .map(|i| ((i as f32) * 0.07).cos())
            .collect();
        let mut out = vec![0.0; q.len()];
        for cache_type in CacheType::ALL {
            let mut k = KvBuffer::new(cache_type, values.len());
            let mut v = KvBuffer::new(cache_type, values.len());
            k.store(selected_isa(), 0, &values);
            v.store(selected_isa(), 0, &values);
            let seg = [KvSegment {
                keys: k.rows(),
                values: v.rows(),
                first_pos: 0,
                len: n_keys,
            }];
            let q_pos0 = n_keys - n_queries;
            let iters = if n_queries == 1 { 200 } else { 10 };
            attention(&pool, &p, &q, q_pos0, &seg, &mut out);
            let start = Instant::now();
            for _ in 0..iters {
                attention(&pool, &p, &q, q_pos0, &seg, &mut out);
            }
            let per_call = start.elapsed().as_secs_f64() / iters as f64;
            let bytes = k.bytes() + v.bytes();
            println!(
                "{cache_type:>5}, {n_queries:>2} queries x {n_keys} keys: {:8.1} µs per call, {:5.2} GB/s of cache",
                per_call * 1e6,
                bytes as f64 / per_call / 1e9
            );
        }
    }
}

/// Decoding one token over an f16 cache of 4096 positions, head_dim 256, with 4 query heads on
/// 1 kv head (Gemma 3 270M / 1B) and 8 on 2: the per-query kernel's AVX2 build against its
/// AVX-512 build (the same output bits), alternated over several rounds, the best round's CPU
/// time reported. Also an f32 cache, and a 64-token chunk (prefill) over the same keys.
#[test]
#[ignore = "benchmark; run explicitly"]
fn decode_attention_avx2_vs_avx512() {
    let pool = ThreadPool::new(1);
    let (hd, n_keys) = (256, 4096);
    let isas: Vec<Isa> = [Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|isa| isa.is_available())
        .collect();
    for (nh, nkv) in [(4, 1), (8, 2)] {
        let p = AttentionParams {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            scale: 0.0625,
            softcap: None,
            mask: AttentionMask::Causal,
            tiled: false,
        };
        let n = n_keys * nkv * hd;
        let keys: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.013).sin()).collect();
        let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.029).cos()).collect();
        for cache_type in [CacheType::F16, CacheType::F32] {
            let mut k = KvBuffer::new(cache_type, n);
            let mut v = KvBuffer::new(cache_type, n);
            k.store(Isa::Scalar, 0, &keys);
            v.store(Isa::Scalar, 0, &values);
            let seg = [KvSegment {
                keys: k.rows(),
                values: v.rows(),
                first_pos: 0,
                len: n_keys,
            }];
            for n_queries in [1usize, 64] {
                let q: Vec<f32> = (0..n_queries * nh * hd)
                    .map(|i| ((i as f32) * 0.07).cos())
                    .collect();
                let q_pos0 = n_keys - n_queries;
                let mut outs = vec![vec![0.0f32; q.len()]; isas.len()];
                let mut best = vec![f64::INFINITY; isas.len()];
                let iters = if n_queries == 1 { 100 } else { 3 };
                for _round in 0..7 {
                    for (i, &isa) in isas.iter().enumerate() {
                        let out = &mut outs[i];
                        attention_with(&pool, isa, &p, &q, q_pos0, &seg, &[], out);
                        let (start, wall) = (thread_cpu_seconds(), Instant::now());
                        for _ in 0..iters {
                            attention_with(&pool, isa, &p, &q, q_pos0, &seg, &[], out);
                        }
                        let s = wall.elapsed().as_secs_f64();
                        let cpu = thread_cpu_seconds().zip(start).map_or(s, |(b, a)| b - a);
                        best[i] = best[i].min(cpu / iters as f64);
                    }
                }
                for (i, isa) in isas.iter().enumerate() {
                    let same = outs[i]
                        .iter()
                        .zip(&outs[0])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    println!(
                        "{nh} heads / {nkv} kv of {hd}, {cache_type:>3}, {n_queries:>2} tokens x \
                         {n_keys} keys, {isa:?}: {:8.1} µs per call, {:.2}x AVX2, same bits: {same}",
                        best[i] * 1e6,
                        best[0] / best[i]
                    );
                }
            }
        }
    }
}

/// A SigLIP layer's attention (Gemma 3's vision tower): 4096 patches, 16 heads of 72, every
/// patch sees every other. Reports multiply-adds per second (scores plus weighted values).
#[test]
#[ignore = "benchmark; run explicitly"]
// One span covering every position: a vision tower's attention.
#[allow(clippy::single_range_in_vec_init)]
fn vision_attention() {
    let pool = ThreadPool::new(1);
    let (n, nh, hd) = (4096, 16, 72);
    let p = AttentionParams {
        n_heads: nh,
        n_kv_heads: nh,
        head_dim: hd,
        scale: (hd as f32).powf(-0.5),
        softcap: None,
        mask: AttentionMask::Causal,
        tiled: false,
    };
    let data = |phase: f32| -> Vec<f32> {
        (0..n * nh * hd)
            .map(|i| ((i as f32) * 0.013 + phase).sin())
            .collect()
    };
    let (q, k, v) = (data(0.0), data(1.0), data(2.0));
    let seg = [KvSegment {
        keys: (&k[..]).into(),
        values: (&v[..]).into(),
        first_pos: 0,
        len: n,
    }];
    let mut out = vec![0.0; q.len()];
    // The per-query kernel (AVX2 and AVX-512 builds) and the tiled one the vision tower uses.
    for (tiled, isa) in [
        (false, Isa::Avx2),
        (false, Isa::Avx512),
        (true, Isa::Avx2),
        (true, Isa::Avx512),
    ] {
        if !isa.is_available() {
            continue;
        }
        let p = AttentionParams { tiled, ..p };
        let (start, cpu) = (Instant::now(), thread_cpu_seconds());
        attention_with(&pool, isa, &p, &q, 0, &seg, &[0..n], &mut out);
        let s = start.elapsed().as_secs_f64();
        let cpu = thread_cpu_seconds().zip(cpu).map_or(s, |(b, a)| b - a);
        let macs = 2.0 * (nh * n * n * hd) as f64;
        println!(
            "{isa:?}, tiled {tiled}: {s:.3} s wall, {cpu:.3} s CPU, {:.1} G multiply-adds per CPU second",
            macs / cpu / 1e9
        );
    }
}

/// CPU time of the calling thread (which runs every task of a one-thread pool), from
/// `/proc/thread-self/schedstat`; `None` off Linux. On a shared machine the wall clock
/// also counts other processes' turns.
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    Some(stat.split_whitespace().next()?.parse::<f64>().ok()? / 1e9)
}
