//! Time to encode one image with Gemma 3n's vision tower (MobileNet-V5 + `embed_vision`) from a
//! Hugging Face folder: load time, each encode, the median, frames per second and peak RSS.
//!
//! `GEMMA_THREADS=1 cargo run --release -p gemma-models --example vision3n_encode -- FOLDER [REPS]`
//!
//! FOLDER (or a llama.cpp mmproj `.gguf` file, read by `Gemma3nVision::from_gguf`) holds
//! `config.json` and safetensors with `model.vision_tower.timm_model.*` and
//! `model.embed_vision.*` (`scripts/bench_vision_gemma3n.sh` makes one at the real
//! `mobilenetv5_300m_enc` shape with random weights). The image is a fixed synthetic pattern
//! (the tower's cost does not depend on the pixels). The first encode also pages the weights in
//! (they stay mapped until first use) and is reported separately from the steady state.
//! Prints one line per encode and a JSON summary on the last line.
//!
//! `vision3n_encode FOLDER --check PIXELS OUT` instead encodes the u8 image `PIXELS`
//! (`[3, image_size, image_size]`, value/255) once and writes `encode_tower`'s output
//! (`[tokens, 2048]` f32 little-endian, after the ×√2048) to `OUT`, for a comparison with timm
//! (`scripts/bench_vision_gemma3n.sh --check`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use gemma_formats::{GgufFile, HfFolder};
use gemma_kernels::ThreadPool;
use gemma_models::vision::Gemma3nVision;

/// Peak resident set size of this process, in MiB (Linux `VmHWM`), if known.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The tower from a Hugging Face folder or an mmproj GGUF file.
fn load(path: &Path) -> Gemma3nVision {
    let loaded = if path.extension().is_some_and(|e| e == "gguf") {
        let f = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Gemma3nVision::from_gguf(&f)
    } else {
        let hf = HfFolder::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Gemma3nVision::from_hf(&hf)
    };
    loaded.unwrap_or_else(|e| panic!("load: {e}"))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(folder) = args.next().map(PathBuf::from) else {
        eprintln!("usage: vision3n_encode FOLDER [REPS]");
        std::process::exit(2);
    };
    let rest: Vec<String> = args.collect();
    if rest.first().map(String::as_str) == Some("--check") {
        let (Some(pixels), Some(out)) = (rest.get(1), rest.get(2)) else {
            eprintln!("usage: vision3n_encode FOLDER --check PIXELS OUT");
            std::process::exit(2);
        };
        let vision = load(&folder);
        let px: Vec<f32> = std::fs::read(pixels)
            .unwrap_or_else(|e| panic!("{pixels}: {e}"))
            .into_iter()
            .map(|v| v as f32 / 255.0)
            .collect();
        let t = Instant::now();
        let tokens = vision
            .encode_tower(&px)
            .unwrap_or_else(|e| panic!("encode: {e}"));
        eprintln!("encoded in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
        let bytes: Vec<u8> = tokens.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(out, bytes).unwrap_or_else(|e| panic!("{out}: {e}"));
        return;
    }
    let reps: usize = rest.first().map_or(3, |r| r.parse().expect("REPS"));
    let threads = ThreadPool::global().n_threads();

    let t0 = Instant::now();
    let vision = load(&folder);
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let c = vision.config().clone();
    eprintln!(
        "loaded in {load_ms:.0} ms: stages {:?}, {} MiB of weights, {} tokens of {} per image, \
         {threads} threads",
        vision.stage_depths(),
        vision.weight_bytes() >> 20,
        c.tokens_per_image,
        c.text_hidden_size
    );

    let side = c.image_size;
    let pixels: Vec<f32> = (0..3 * side * side)
        .map(|i| ((i * 7919) % 256) as f32 / 255.0)
        .collect();
    let mut times = Vec::new();
    let mut first_ms = 0.0;
    for rep in 0..=reps {
        let t = Instant::now();
        let out = vision
            .encode_image(&pixels)
            .unwrap_or_else(|e| panic!("encode: {e}"));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(out.len(), c.tokens_per_image * c.text_hidden_size);
        if rep == 0 {
            first_ms = ms;
            eprintln!("encode 0 (first, pages the weights in): {ms:.1} ms");
        } else {
            eprintln!("encode {rep}: {ms:.1} ms");
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = if times.is_empty() {
        first_ms
    } else {
        times[times.len() / 2]
    };
    println!(
        "{{\"threads\": {threads}, \"load_ms\": {load_ms:.1}, \"first_encode_ms\": {first_ms:.1}, \
         \"encode_ms_median\": {median:.1}, \"frames_per_s\": {:.3}, \"encode_ms\": {:?}, \
         \"weight_mib\": {}, \"peak_rss_mib\": {}}}",
        1e3 / median,
        times
            .iter()
            .map(|t| (t * 10.0).round() / 10.0)
            .collect::<Vec<_>>(),
        vision.weight_bytes() >> 20,
        peak_rss_mib().map_or("null".into(), |m| format!("{m:.0}"))
    );
}
