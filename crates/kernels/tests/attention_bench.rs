//! Timing of attention over a long cache in each storage format (not a test: nothing is
//! asserted about speed). Shapes of Gemma 3 270M's global layers: 4 query heads, 1 kv head,
//! head_dim 256.
//! `cargo test --release -p gemma-kernels --test attention_bench -- --ignored --nocapture`

use std::time::Instant;

use gemma_kernels::ops::attention::{attention, AttentionMask, AttentionParams, KvSegment};
use gemma_kernels::ops::kv::{CacheType, KvBuffer};
use gemma_kernels::quant::selected_isa;
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
