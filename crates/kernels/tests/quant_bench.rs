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
