//! Rough timings of the dot kernels per ISA (not a correctness test):
//! `cargo test --release -p gemma-kernels --test quant_bench -- --ignored --nocapture`

use std::time::Instant;

use gemma_kernels::quant;
use gemma_kernels::GgmlType;

#[test]
#[ignore = "benchmark; run explicitly"]
fn dot_kernel_timings() {
    let n = 4096;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    for dtype in GgmlType::ALL {
        let mut w = vec![0u8; dtype.bytes_for(n).unwrap()];
        if quant::quantize(dtype, &x, &mut w).is_err() {
            // K-quant weights: arbitrary quants with small f16 scales.
            for (i, b) in w.iter_mut().enumerate() {
                *b = (i * 31 % 251) as u8;
            }
            let scale = half::f16::from_f32(0.01).to_bits().to_le_bytes();
            let offsets: &[usize] = match dtype {
                GgmlType::Q2_K => &[80, 82],
                GgmlType::Q3_K => &[108],
                GgmlType::Q6_K => &[208],
                _ => &[0, 2],
            };
            for block in w.chunks_exact_mut(dtype.type_size()) {
                for &off in offsets {
                    block[off..off + 2].copy_from_slice(&scale);
                }
            }
        }
        let act_type = quant::vec_dot_type(dtype);
        let mut act = vec![0u8; act_type.bytes_for(n).unwrap()];
        quant::quantize(act_type, &x, &mut act).unwrap();
        let mut line = format!("{:>5} n={n}:", dtype.name());
        for isa in quant::available_isas() {
            let reps = 2000;
            let start = Instant::now();
            let mut sink = 0.0f32;
            for _ in 0..reps {
                sink += quant::vec_dot_with(isa, dtype, std::hint::black_box(&w), &act, n);
            }
            let ns = start.elapsed().as_nanos() as f64 / reps as f64;
            line += &format!("  {}={ns:.0}ns", isa.name());
            std::hint::black_box(sink);
        }
        eprintln!("{line}");
    }
}

/// Matrix-vector throughput on matrices larger than the last-level cache (the decode case):
/// `cargo test --release -p gemma-kernels --test quant_bench -- --ignored --nocapture matvec`
#[test]
#[ignore = "benchmark; run explicitly"]
fn matvec_bandwidth() {
    use gemma_kernels::membench::read_all_parallel;
    use gemma_kernels::{matmul, ThreadPool, WeightMatrix};
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let pool = ThreadPool::new(threads);
    // BENCH_ROWS_DIV=512 shrinks the matrices into L2: the kernels' compute rate alone.
    let div: usize = std::env::var("BENCH_ROWS_DIV")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for (dtype, rows, cols) in [
        (GgmlType::Q4_0, 65_536, 2048),
        (GgmlType::Q8_0, 262_144, 640),
        (GgmlType::Q5_0, 131_072, 640),
        (GgmlType::Q4_K, 65_536, 1024),
        (GgmlType::Q6_K, 65_536, 2048),
    ] {
        let rows = rows / div;
        let bytes = dtype.bytes_for(rows * cols).unwrap();
        // In huge pages, as the engine holds GGUF weights (`GgufFile::make_resident`).
        let mut data = gemma_formats::HugePageBytes::zeroed(bytes).unwrap();
        let data = data.as_mut();
        fill_weights(dtype, data);
        // BENCH_INTERLEAVED=1: the decode layout where the type has one.
        let interleaved = std::env::var("BENCH_INTERLEAVED").is_ok_and(|v| v == "1")
            && gemma_kernels::interleaving_pays(dtype, rows, cols);
        if interleaved {
            quant::interleave::interleave_in_place(dtype, data, cols, &mut Vec::new());
        }
        let data = &*data;
        let mut w = WeightMatrix::new(dtype, rows, cols, data).unwrap();
        if interleaved {
            w.layout = gemma_kernels::RowLayout::Interleaved;
        }
        let x: Vec<f32> = (0..cols).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
        let mut y = vec![0.0; rows];
        let mut scratch = Vec::new();
        // Alternate with a plain read of the same bytes: the ratio is what the kernel reaches of
        // the bandwidth available at that moment (the machine is shared).
        let (mut best, mut best_read) = (f64::MAX, f64::MAX);
        for _ in 0..8 {
            let start = Instant::now();
            for _ in 0..div {
                matmul(&pool, &w, &x, 1, &mut y, &mut scratch);
            }
            best = best.min(start.elapsed().as_secs_f64() / div as f64);
            let start = Instant::now();
            for _ in 0..div {
                read_all_parallel(&pool, data);
            }
            best_read = best_read.min(start.elapsed().as_secs_f64() / div as f64);
        }
        eprintln!(
            "{:>5}{} {rows}x{cols}: {:.2} ms, {:.2} GB/s; plain read {:.2} GB/s; ratio {:.2}",
            dtype.name(),
            if interleaved { " (interleaved)" } else { "" },
            best * 1e3,
            bytes as f64 / best / 1e9,
            bytes as f64 / best_read / 1e9,
            best_read / best
        );
    }
}

/// The prompt GEMM over the row-major and the interleaved (decode) layout of the same matrix:
/// `cargo test --release -p gemma-kernels --test quant_bench -- --ignored --nocapture gemm_layouts`
#[test]
#[ignore = "benchmark; run explicitly"]
fn gemm_layouts() {
    use gemma_kernels::{matmul, RowLayout, ThreadPool, WeightMatrix};
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let pool = ThreadPool::new(threads);
    let tokens = 512;
    for (dtype, rows, cols) in [
        (GgmlType::Q4_0, 2048, 640),
        (GgmlType::Q8_0, 2048, 640),
        (GgmlType::Q5_0, 640, 2048),
        (GgmlType::Q4_K, 2048, 1024),
        (GgmlType::Q6_K, 1024, 2048),
    ] {
        let bytes = dtype.bytes_for(rows * cols).unwrap();
        let mut data = vec![0u8; bytes];
        fill_weights(dtype, &mut data);
        let mut interleaved = data.clone();
        quant::interleave::interleave_in_place(dtype, &mut interleaved, cols, &mut Vec::new());
        let x: Vec<f32> = (0..tokens * cols)
            .map(|i| (i % 17) as f32 / 8.0 - 1.0)
            .collect();
        let mut outs = [vec![0.0; tokens * rows], vec![0.0; tokens * rows]];
        let mut row_major = WeightMatrix::new(dtype, rows, cols, &data).unwrap();
        row_major.layout = RowLayout::RowMajor;
        let mut decode_layout = WeightMatrix::new(dtype, rows, cols, &interleaved).unwrap();
        decode_layout.layout = RowLayout::Interleaved;
        let mut scratch = Vec::new();
        // Alternating, best of many: the machine is shared.
        let mut ms = [f64::MAX; 2];
        for _ in 0..20 {
            for (slot, w) in [&row_major, &decode_layout].into_iter().enumerate() {
                let start = Instant::now();
                matmul(&pool, w, &x, tokens, &mut outs[slot], &mut scratch);
                ms[slot] = ms[slot].min(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        assert_eq!(outs[0], outs[1], "{dtype}: the layouts agree");
        eprintln!(
            "{:>5} {rows}x{cols}, {tokens} tokens: row-major {:.2} ms, interleaved {:.2} ms ({:.2}x)",
            dtype.name(),
            ms[0],
            ms[1],
            ms[1] / ms[0]
        );
    }
}

/// Arbitrary quants with every block's f16 scales (`d`, Q4_K's `dmin`) set to 0.01, so sums stay
/// finite.
fn fill_weights(dtype: GgmlType, data: &mut [u8]) {
    data.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 131 % 251) as u8);
    let scale = half::f16::from_f32(0.01).to_bits().to_le_bytes();
    let offsets: &[usize] = match dtype {
        GgmlType::Q6_K => &[208],
        GgmlType::Q4_K => &[0, 2],
        _ => &[0],
    };
    for block in data.chunks_exact_mut(dtype.type_size()) {
        for &off in offsets {
            block[off..off + 2].copy_from_slice(&scale);
        }
    }
}

/// A sparse MLP's up and down projections at Gemma 3n E2B's shape (hidden 2048, MLP 8192, Q4_0)
/// for one token keeping 5 % of its activations, over ten layers' worth of weights (more than
/// the last-level cache, as in decoding): dense products of the decode layout against
/// `matmul_rows` plus the transposed down projection.
/// `BENCH_THREADS=2 cargo test --release -p gemma-kernels --test quant_bench -- --ignored
/// --nocapture sparse_mlp`
#[test]
#[ignore = "benchmark; run explicitly"]
fn sparse_mlp() {
    use gemma_kernels::sparse::{SparseInputMatrix, SparseScratch};
    use gemma_kernels::{matmul, matmul_rows, RowLayout, ThreadPool, WeightMatrix};
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let pool = ThreadPool::new(threads);
    let (h, ffn, layers) = (2048, 8192, 10);
    let dtype = GgmlType::Q4_0;
    let bytes = dtype.bytes_for(h * ffn).unwrap();
    let mut up = Vec::new();
    let mut up_interleaved = Vec::new();
    let mut down_interleaved = Vec::new();
    let mut down_sparse = Vec::new();
    for layer in 0..layers {
        let mut data = vec![0u8; bytes];
        fill_weights(dtype, &mut data);
        data[layer] ^= 1; // distinct copies
        let mut packed = data.clone();
        quant::interleave::interleave_in_place(dtype, &mut packed, h, &mut Vec::new());
        up.push(data.clone());
        up_interleaved.push(packed);
        let mut packed = data.clone();
        quant::interleave::interleave_in_place(dtype, &mut packed, ffn, &mut Vec::new());
        down_sparse.push(SparseInputMatrix::from_weights(
            &WeightMatrix::new(dtype, h, ffn, &data).unwrap(),
        ));
        down_interleaved.push(packed);
    }
    let x: Vec<f32> = (0..h).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
    // Every 20th activation kept, at scattered places.
    let kept: Vec<u32> = (0..ffn as u32)
        .filter(|j| j.wrapping_mul(2654435761).is_multiple_of(20))
        .collect();
    let mut act = vec![0.0f32; ffn];
    kept.iter().for_each(|&j| act[j as usize] = 0.5);
    let (mut y_up, mut y_down) = (vec![0.0; ffn], vec![0.0; h]);
    let mut scratch = Vec::new();
    let mut sparse_scratch = SparseScratch::default();
    // Best of many, alternating: the machine is shared. Dense, sparse up, sparse down.
    let mut ms = [f64::MAX; 3];
    for _ in 0..30 {
        let start = Instant::now();
        for l in 0..layers {
            let mut w = WeightMatrix::new(dtype, ffn, h, &up_interleaved[l]).unwrap();
            w.layout = RowLayout::Interleaved;
            matmul(&pool, &w, &x, 1, &mut y_up, &mut scratch);
            let mut w = WeightMatrix::new(dtype, h, ffn, &down_interleaved[l]).unwrap();
            w.layout = RowLayout::Interleaved;
            matmul(&pool, &w, &act, 1, &mut y_down, &mut scratch);
        }
        ms[0] = ms[0].min(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        for data in &up {
            let w = WeightMatrix::new(dtype, ffn, h, data).unwrap();
            matmul_rows(&pool, &w, &x, 1, &kept, &mut y_up, &mut scratch);
        }
        let mid = Instant::now();
        ms[1] = ms[1].min((mid - start).as_secs_f64() * 1e3);
        for down in &down_sparse {
            down.matmul(&pool, &act, ffn, 1, &mut y_down, &mut sparse_scratch);
        }
        ms[2] = ms[2].min(mid.elapsed().as_secs_f64() * 1e3);
    }
    eprintln!(
        "{layers} layers, {} of {ffn} kept, {threads} threads: dense up + down {:.3} ms, sparse \
         {:.3} ms (up {:.3}, down {:.3}): {:.1}x",
        kept.len(),
        ms[0],
        ms[1] + ms[2],
        ms[1],
        ms[2],
        ms[0] / (ms[1] + ms[2])
    );
}
