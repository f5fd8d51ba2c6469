//! Time to encode one image with Gemma 3's vision tower at the real shape (SigLIP so400m:
//! 896 px, patch 14 → 4096 patches, hidden 1152, 27 layers, 16 heads of 72, MLP 4304; projector
//! to 256 tokens of 2560, the 4B's width), without the real weights: random f16 matrices in an
//! in-memory mmproj GGUF laid out as llama.cpp's converter writes it (embeddings in f32).
//!
//! `GEMMA_THREADS=1 cargo run --release -p gemma-models --example siglip_bench [LAYERS] [REPS]`
//! (LAYERS defaults to 27, REPS to 2). Prints one line per encode and a JSON summary.

use std::sync::Arc;
use std::time::Instant;

use gemma_formats::{GgmlType, GgufFile, GgufWriter, MetaValue};
use gemma_kernels::ThreadPool;
use gemma_models::Gemma3Vision;

const IMAGE: usize = 896;
const PATCH: usize = 14;
const HIDDEN: usize = 1152;
const FFN: usize = 4304;
const HEADS: usize = 16;
const TEXT_HIDDEN: usize = 2560;

/// xorshift64*: fast, reproducible values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-scale, scale).
    fn uniform(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }

    /// `n` f16 values of magnitude below 2^-5 (random sign, exponent and mantissa).
    fn f16_bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 * n);
        for _ in 0..n.div_ceil(4) {
            let r = self.next();
            for lane in 0..4 {
                let b = (r >> (16 * lane)) as u16;
                let exponent = 15 - 10 + (b >> 10) % 6; // 2^-10 .. 2^-5
                let bits = (b & 0x8000) | (exponent << 10) | (b & 0x3ff);
                out.extend_from_slice(&bits.to_le_bytes());
            }
        }
        out.truncate(2 * n);
        out
    }

    fn f32_bytes(&mut self, n: usize, scale: f32, offset: f32) -> Vec<u8> {
        (0..n)
            .flat_map(|_| (offset + self.uniform(scale)).to_le_bytes())
            .collect()
    }
}

fn mmproj(layers: usize) -> GgufFile {
    let mut w = GgufWriter::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let u32v = |v: usize| MetaValue::U32(v as u32);
    for (k, v) in [
        ("clip.projector_type", MetaValue::String("gemma3".into())),
        ("clip.has_vision_encoder", MetaValue::Bool(true)),
        ("clip.vision.image_size", u32v(IMAGE)),
        ("clip.vision.patch_size", u32v(PATCH)),
        ("clip.vision.embedding_length", u32v(HIDDEN)),
        ("clip.vision.feed_forward_length", u32v(FFN)),
        ("clip.vision.block_count", u32v(layers)),
        ("clip.vision.attention.head_count", u32v(HEADS)),
        (
            "clip.vision.attention.layer_norm_epsilon",
            MetaValue::F32(1e-6),
        ),
        ("clip.vision.projection_dim", u32v(TEXT_HIDDEN)),
    ] {
        w.add_metadata(k, v).unwrap();
    }
    let n_patches = (IMAGE / PATCH) * (IMAGE / PATCH);
    let mut f16 = |w: &mut GgufWriter, name: String, shape: &[usize]| {
        let n = shape.iter().product();
        w.add_tensor(name, GgmlType::F16, shape, rng.f16_bytes(n))
            .unwrap();
    };
    f16(
        &mut w,
        "v.patch_embd.weight".into(),
        &[HIDDEN, 3, PATCH, PATCH],
    );
    for i in 0..layers {
        for (t, shape) in [
            ("attn_q", [HIDDEN, HIDDEN]),
            ("attn_k", [HIDDEN, HIDDEN]),
            ("attn_v", [HIDDEN, HIDDEN]),
            ("attn_out", [HIDDEN, HIDDEN]),
            ("ffn_up", [FFN, HIDDEN]),
            ("ffn_down", [HIDDEN, FFN]),
        ] {
            f16(&mut w, format!("v.blk.{i}.{t}.weight"), &shape);
        }
    }
    f16(
        &mut w,
        "mm.input_projection.weight".into(),
        &[HIDDEN, TEXT_HIDDEN],
    );
    let mut rng = Rng(0x1234_5678);
    let mut f32t = |w: &mut GgufWriter, name: String, len: usize, offset: f32, shape: &[usize]| {
        w.add_tensor(name, GgmlType::F32, shape, rng.f32_bytes(len, 0.02, offset))
            .unwrap();
    };
    f32t(&mut w, "v.patch_embd.bias".into(), HIDDEN, 0.0, &[HIDDEN]);
    f32t(
        &mut w,
        "v.position_embd.weight".into(),
        n_patches * HIDDEN,
        0.0,
        &[n_patches, HIDDEN],
    );
    for i in 0..layers {
        for (t, len, offset) in [
            ("ln1.weight", HIDDEN, 1.0),
            ("ln1.bias", HIDDEN, 0.0),
            ("ln2.weight", HIDDEN, 1.0),
            ("ln2.bias", HIDDEN, 0.0),
            ("attn_q.bias", HIDDEN, 0.0),
            ("attn_k.bias", HIDDEN, 0.0),
            ("attn_v.bias", HIDDEN, 0.0),
            ("attn_out.bias", HIDDEN, 0.0),
            ("ffn_up.bias", FFN, 0.0),
            ("ffn_down.bias", HIDDEN, 0.0),
        ] {
            f32t(&mut w, format!("v.blk.{i}.{t}"), len, offset, &[len]);
        }
    }
    f32t(&mut w, "v.post_ln.weight".into(), HIDDEN, 1.0, &[HIDDEN]);
    f32t(&mut w, "v.post_ln.bias".into(), HIDDEN, 0.0, &[HIDDEN]);
    f32t(
        &mut w,
        "mm.soft_emb_norm.weight".into(),
        HIDDEN,
        1.0,
        &[HIDDEN],
    );
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    drop(w);
    GgufFile::from_bytes(Arc::new(bytes)).unwrap()
}

/// CPU seconds this process has used (user + system, all threads), from `/proc/self/stat`;
/// `None` off Linux. On a shared machine this, not the wall clock, is what an encode costs.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let layers: usize = args.next().map_or(27, |a| a.parse().expect("LAYERS"));
    let reps: usize = args.next().map_or(2, |a| a.parse().expect("REPS"));
    let threads = ThreadPool::global().n_threads();

    let t = Instant::now();
    let file = mmproj(layers);
    let build_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let vision = Gemma3Vision::load_gguf(&file).expect("load");
    let load_s = t.elapsed().as_secs_f64();
    eprintln!(
        "built {:.0} MiB of weights in {build_s:.1} s, loaded in {:.3} s",
        vision.weight_bytes() as f64 / (1 << 20) as f64,
        load_s
    );

    let mut rng = Rng(42);
    let pixels: Vec<f32> = (0..vision.pixel_len()).map(|_| rng.uniform(1.0)).collect();
    let mut out = Vec::new();
    let mut times = Vec::new();
    let mut cpu_times = Vec::new();
    for rep in 0..reps {
        let (t, cpu) = (Instant::now(), cpu_seconds());
        vision.encode(&pixels, &mut out).expect("encode");
        let s = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds().zip(cpu).map_or(f64::NAN, |(b, a)| b - a);
        eprintln!(
            "encode {rep}: {s:.2} s wall, {cpu:.2} s CPU ({threads} threads, {layers} layers)"
        );
        times.push(s);
        cpu_times.push(cpu);
    }
    assert_eq!(out.len(), vision.tokens_per_image() * vision.text_hidden());
    assert!(out.iter().all(|v| v.is_finite()));
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    let best_cpu = cpu_times.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "{{\"threads\": {threads}, \"layers\": {layers}, \"best_encode_s\": {best:.3}, \
         \"best_encode_cpu_s\": {best_cpu:.3}, \"per_layer_s\": {:.3}, \"load_s\": {load_s:.3}}}",
        best / layers as f64
    );
}
