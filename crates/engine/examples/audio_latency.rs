//! Streaming-audio latency of Gemma 3n at the real E2B shapes, without the real weights
//! (driven by `scripts/bench_audio.sh`).
//!
//! `audio_latency write DIR`: a Hugging Face folder holding the published audio tower's shapes
//! (USM conformer: width 1536, 12 blocks, 8 heads, SSCP channels 128/32; `embed_audio` into
//! E2B's width 2048) with random bf16 weights, as the published checkpoints store them, and the
//! config.json that describes them.
//!
//! `audio_latency run DIR DECODER.gguf`: streams 30 s of a synthetic voice-like signal in
//! 160 ms chunks through the whole live path (log-mel front end, streaming encoder,
//! `embed_audio`, the decoder's forward pass appending the tokens to its KV cache) and prints one
//! JSON line: per-chunk time from the chunk's arrival to its tokens being in the cache (median,
//! p90, max; and the median of its front end + encoder + embedder part); the same 30 s arriving
//! live (at 16 000 samples a second, each push taking what has arrived): each token's lag from
//! the arrival of the last sample it needs to its being in the cache (median, p90, and the last
//! token's); the whole-clip encode time of the same 30 s, and the tower's weight bytes. The
//! thread count is `GEMMA_THREADS`; `AUDIO_WEIGHTS=bf16|f16|q8_0` stores the tower's matrices
//! so (default bf16, as published); `AUDIO_CHUNK_MS` sets the push size (default 160).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use gemma_engine::gemma_formats::{open_model_source, HfFolder, ModelFile};
use gemma_engine::gemma_media::{log_mel, MelExtractor, MelStream};
use gemma_engine::gemma_models::audio::AudioStream;
use gemma_engine::gemma_models::{load_model, Gemma3nAudio, KvCache, Logits, Model, SoftTokens};

const D: usize = 1536;
const LAYERS: usize = 12;
const TEXT_HIDDEN: usize = 2048;
const AUDIO_TOKEN: u32 = 262_273;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

fn bf16(v: f32) -> [u8; 2] {
    ((v.to_bits() >> 16) as u16).to_le_bytes()
}

fn write(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut tensors: Vec<(String, Vec<usize>, f32)> = Vec::new();
    let mut t =
        |name: String, shape: &[usize], scale: f32| tensors.push((name, shape.to_vec(), scale));
    let p = "model.audio_tower.";
    let s = "subsample_conv_projection.";
    t(format!("{p}{s}conv_0.conv.weight"), &[128, 1, 3, 3], 0.3);
    t(format!("{p}{s}conv_0.norm.weight"), &[128], 0.0);
    t(format!("{p}{s}conv_1.conv.weight"), &[32, 128, 3, 3], 0.03);
    t(format!("{p}{s}conv_1.norm.weight"), &[32], 0.0);
    t(format!("{p}{s}input_proj_linear.weight"), &[D, 1024], 0.03);
    for l in 0..LAYERS {
        let b = format!("{p}conformer.{l}.");
        for f in ["ffw_layer_start", "ffw_layer_end"] {
            t(format!("{b}{f}.pre_layer_norm.weight"), &[D], 0.0);
            t(format!("{b}{f}.ffw_layer_1.weight"), &[4 * D, D], 0.025);
            t(format!("{b}{f}.ffw_layer_2.weight"), &[D, 4 * D], 0.012);
            t(format!("{b}{f}.post_layer_norm.weight"), &[D], 0.0);
        }
        let a = format!("{b}attention.");
        t(format!("{a}pre_attn_norm.weight"), &[D], 0.0);
        for m in [
            "q_proj",
            "k_proj",
            "v_proj",
            "relative_position_embedding.pos_proj",
        ] {
            t(format!("{a}attn.{m}.weight"), &[D, D], 0.025);
        }
        t(format!("{a}attn.per_dim_scale"), &[D / 8], -1.0);
        t(format!("{a}post.weight"), &[D, D], 0.025);
        t(format!("{a}post_norm.weight"), &[D], 0.0);
        let c = format!("{b}lconv1d.");
        t(format!("{c}pre_layer_norm.weight"), &[D], 0.0);
        t(format!("{c}linear_start.weight"), &[2 * D, D], 0.025);
        t(format!("{c}depthwise_conv1d.weight"), &[D, 1, 5], 0.4);
        t(format!("{c}conv_norm.weight"), &[D], 0.0);
        t(format!("{c}linear_end.weight"), &[D, D], 0.025);
        t(format!("{b}norm.weight"), &[D], 0.0);
    }
    let e = "model.embed_audio.";
    t(format!("{e}embedding.weight"), &[128, D], 1.0);
    t(format!("{e}hard_embedding_norm.weight"), &[D], 0.0);
    t(format!("{e}soft_embedding_norm.weight"), &[D], 0.0);
    t(
        format!("{e}embedding_projection.weight"),
        &[TEXT_HIDDEN, D],
        0.025,
    );

    // safetensors: u64 header length, the JSON header, then the data in order.
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, _) in &tensors {
        let bytes = 2 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let file = std::fs::File::create(dir.join("model.safetensors")).map_err(|e| e.to_string())?;
    let mut w = std::io::BufWriter::new(file);
    let io = |e: std::io::Error| e.to_string();
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for (_, shape, scale) in &tensors {
        let n: usize = shape.iter().product();
        for _ in 0..n {
            // Scale 0: a norm weight of 1; -1: a per-dim scale around 0.
            let v = match *scale {
                0.0 => 1.0 + 0.1 * rng.next(),
                -1.0 => 0.2 * rng.next(),
                s => 2.0 * s * rng.next(),
            };
            w.write_all(&bf16(v)).map_err(io)?;
        }
    }
    w.flush().map_err(io)?;
    let config = serde_json::json!({
        "model_type": "gemma3n",
        "architectures": ["Gemma3nForConditionalGeneration"],
        "audio_config": {"model_type": "gemma3n_audio"},
        "text_config": {"hidden_size": TEXT_HIDDEN, "vocab_size": 262_400},
        "audio_soft_tokens_per_image": 188,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {} ({} tensors, {} bytes)",
        dir.display(),
        tensors.len(),
        offset
    );
    Ok(())
}

/// 30 s of a voice-like signal: a harmonic tone with a moving pitch, syllable envelopes and a
/// little noise.
fn signal(seconds: usize) -> Vec<f32> {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    (0..seconds * 16_000)
        .map(|i| {
            let t = i as f32 / 16_000.0;
            let pitch = 120.0 + 30.0 * (t * 0.7).sin();
            let env = (t * 4.0 * std::f32::consts::PI).sin().abs();
            let voice: f32 = (1..6)
                .map(|h| (2.0 * std::f32::consts::PI * pitch * h as f32 * t).sin() / h as f32)
                .sum();
            0.2 * env * voice + 0.01 * rng.next()
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The live path over one stream: front end, streaming encoder, `embed_audio`, and the decoder
/// appending the tokens to its cache after the prompt's prefix.
struct Listener<'a> {
    tower: &'a Gemma3nAudio,
    model: &'a Model,
    mel: MelStream,
    stream: AudioStream<'a>,
    cache: KvCache,
}

impl<'a> Listener<'a> {
    fn start(
        tower: &'a Gemma3nAudio,
        model: &'a Model,
        extractor: &std::sync::Arc<MelExtractor>,
    ) -> Result<Self, String> {
        let mut cache = model.new_cache(1024).map_err(|e| e.to_string())?;
        // The prompt's prefix, as a live session feeds it before the audio.
        model
            .forward(&[2, 105, 2364, 107, 108, 256_000], &mut cache, Logits::None)
            .map_err(|e| e.to_string())?;
        Ok(Listener {
            tower,
            model,
            mel: MelStream::new(extractor.clone()),
            stream: tower.stream(),
            cache,
        })
    }

    /// Takes `samples`; returns the tokens they completed (now in the cache) and the time the
    /// part before the decoder took, in ms.
    fn push(&mut self, samples: &[f32]) -> Result<(usize, f64), String> {
        let started = Instant::now();
        let frames = self.mel.push(samples);
        let encoded = self.stream.push(&frames).map_err(|e| e.to_string())?;
        let n = encoded.len() / D;
        if n == 0 {
            return Ok((0, started.elapsed().as_secs_f64() * 1e3));
        }
        let embeds = self.tower.project(&encoded);
        let encoder_ms = started.elapsed().as_secs_f64() * 1e3;
        let soft = [SoftTokens {
            offset: 0,
            embeds: &embeds,
            bidirectional: false,
        }];
        self.model
            .forward_embeds(&vec![AUDIO_TOKEN; n], &soft, &mut self.cache, Logits::None)
            .map_err(|e| e.to_string())?;
        Ok((n, encoder_ms))
    }
}

fn run(dir: &Path, decoder: &Path) -> Result<(), String> {
    let folder = HfFolder::open(dir).map_err(|e| e.to_string())?;
    let mut tower = Gemma3nAudio::from_hf(&folder).map_err(|e| e.to_string())?;
    let weights = std::env::var("AUDIO_WEIGHTS").unwrap_or_else(|_| "bf16".into());
    match weights.as_str() {
        "bf16" => {}
        "q8_0" => tower.requantize(gemma_engine::gemma_formats::GgmlType::Q8_0),
        "f16" => tower.requantize(gemma_engine::gemma_formats::GgmlType::F16),
        other => return Err(format!("AUDIO_WEIGHTS={other}: bf16, f16 or q8_0")),
    }
    let chunk_ms: usize = std::env::var("AUDIO_CHUNK_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(160);
    let file: ModelFile = open_model_source(decoder).map_err(|e| e.to_string())?;
    let model = load_model(&file).map_err(|e| e.to_string())?;
    let samples = signal(30);
    let extractor = std::sync::Arc::new(MelExtractor::new());

    // Warm-up: one encode of 1 s (page in the weights, settle the thread pool).
    tower
        .encoder()
        .encode(&log_mel(&samples[..16_000]).features)
        .map_err(|e| e.to_string())?;

    let mut times = Vec::new();
    let mut encoder_times = Vec::new();
    let mut tokens = 0usize;
    let mut live = Listener::start(&tower, &model, &extractor)?;
    for chunk in samples.chunks(16 * chunk_ms) {
        let started = Instant::now();
        let (n, encoder_ms) = live.push(chunk)?;
        if n > 0 {
            encoder_times.push(encoder_ms);
        }
        tokens += n;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    encoder_times.sort_by(f64::total_cmp);

    // Live: the audio arrives at its own pace (16 000 samples a wall-clock second) and each
    // push takes everything that has arrived, so a machine slower than real time catches up
    // with larger pushes.
    let mut live = Listener::start(&tower, &model, &extractor)?;
    let start = Instant::now();
    let mut taken = 0usize;
    let mut lags = Vec::new();
    let mut pushes = 0usize;
    let mut live_tokens = 0usize;
    while taken < samples.len() {
        let arrived = ((start.elapsed().as_secs_f64() * 16_000.0) as usize).min(samples.len());
        if arrived == taken {
            std::thread::sleep(std::time::Duration::from_millis(5));
            continue;
        }
        let (n, _) = live.push(&samples[taken..arrived])?;
        taken = arrived;
        // Token k needs mel frames up to 16k + 6, i.e. samples up to 160 (16k + 6) + 513: its
        // lag runs from that sample's arrival to now.
        let done = start.elapsed().as_secs_f64();
        for k in live_tokens..live_tokens + n {
            let needed = (160 * (16 * k + 6) + 513).min(samples.len());
            lags.push((done - needed as f64 / 16_000.0) * 1e3);
        }
        live_tokens += n;
        pushes += 1;
    }
    let final_lag = *lags.last().unwrap_or(&0.0);
    lags.sort_by(f64::total_cmp);

    let started = Instant::now();
    let whole = tower
        .encode_clip(&log_mel(&samples).features)
        .map_err(|e| e.to_string())?;
    let whole_ms = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(whole.len(), 188 * TEXT_HIDDEN);
    println!(
        "{}",
        serde_json::json!({
            "threads": std::env::var("GEMMA_THREADS").unwrap_or_default(),
            "tower_weights": weights,
            "chunk_ms": chunk_ms,
            "chunks": times.len(),
            "tokens": tokens,
            "chunk_ms_median": percentile(&sorted, 0.5),
            "chunk_ms_p90": percentile(&sorted, 0.9),
            "chunk_ms_max": sorted[sorted.len() - 1],
            "encoder_ms_median": percentile(&encoder_times, 0.5),
            "whole_clip_30s_encode_ms": whole_ms,
            "live_pushes": pushes,
            "live_lag_ms_median": percentile(&lags, 0.5),
            "live_lag_ms_p90": percentile(&lags, 0.9),
            "live_lag_ms_at_end": final_lag,
            "tower_weight_bytes": tower.weight_bytes(),
        })
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["write", dir] => write(Path::new(dir)),
        ["run", dir, decoder] => run(Path::new(dir), Path::new(decoder)),
        _ => Err("usage: audio_latency write DIR | run DIR DECODER.gguf".into()),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
