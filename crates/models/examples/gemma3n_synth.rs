//! Memory figures for Gemma 3n at real E2B/E4B shapes, without the real weights
//! (driven by `scripts/gemma3n_memory.sh`).
//!
//! `gemma3n_synth write e2b|e4b OUT.gguf`: a GGUF with the published text-decoder shapes and
//! random Q4_0 matrices (the PLE table too), norms of 1, no tokenizer.
//! `gemma3n_synth run MODEL.gguf N`: loads it, greedily generates N tokens after an 8-token
//! prompt, and prints one JSON line with peak resident memory (VmHWM) and the model's sizes.
//! `gemma3n_synth slice SRC.gguf WIDTH OUT.gguf`: what `gemma extract --matformer` writes for
//! `{"ffn_widths": WIDTH}`.

use std::time::Instant;

use gemma_formats::{open_model_source, GgmlType, GgufWriter, MetaValue};
use gemma_models::{load_model, Logits, Model};

struct Shape {
    name: &'static str,
    layers: usize,
    ffn: usize,
    kv_shared: usize,
}

const E2B: Shape = Shape {
    name: "E2B",
    layers: 30,
    ffn: 8192,
    kv_shared: 10,
};
const E4B: Shape = Shape {
    name: "E4B",
    layers: 35,
    ffn: 16384,
    kv_shared: 15,
};
const HIDDEN: usize = 2048;
const VOCAB: usize = 262_400;
const PLE_VOCAB: usize = 262_144;
const PLE_DIM: usize = 256;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 256;
const LAUREL_RANK: usize = 64;
const STREAMS: usize = 4;
const SPARSE_LAYERS: usize = 10;
/// Φ⁻¹(0.95): the published activation sparsity of the first 10 layers.
const SPARSITY_Z: f32 = 1.644_853_6;
const MATRIX_TYPE: GgmlType = GgmlType::Q4_0;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["write", "e2b", out] => write(&E2B, out),
        ["write", "e4b", out] => write(&E4B, out),
        ["run", model, n] => run(model, n.parse().map_err(|e| format!("N: {e}"))),
        ["slice", src, width, out] => slice(src, width, out),
        _ => Err(
            "usage: gemma3n_synth write e2b|e4b OUT.gguf | run MODEL.gguf N | slice SRC.gguf WIDTH OUT.gguf"
                .into(),
        ),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// xorshift64*: fast, reproducible filler bytes.
struct Rng(u64);

impl Rng {
    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

struct Builder {
    w: GgufWriter,
    rng: Rng,
    params: usize,
    ple_params: usize,
}

impl Builder {
    /// Random Q4_0 blocks: a small fixed scale, random 4-bit values.
    fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<(), String> {
        let n: usize = shape.iter().product();
        self.params += n;
        let mut data = vec![0u8; MATRIX_TYPE.bytes_for(n).unwrap()];
        self.rng.fill(&mut data);
        let scale = half::f16::from_f32(0.02).to_le_bytes();
        for block in data.chunks_exact_mut(MATRIX_TYPE.type_size()) {
            block[..2].copy_from_slice(&scale);
        }
        self.w
            .add_tensor(name, MATRIX_TYPE, shape, data)
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    fn f32s(&mut self, name: &str, shape: &[usize], value: f32) -> Result<(), String> {
        let n: usize = shape.iter().product();
        self.params += n;
        let data = std::iter::repeat_n(value.to_le_bytes(), n)
            .flatten()
            .collect();
        self.w
            .add_tensor(name, GgmlType::F32, shape, data)
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    fn meta(&mut self, key: &str, v: MetaValue) -> Result<(), String> {
        self.w
            .add_metadata(format!("gemma3n.{key}"), v)
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

fn write(s: &Shape, out: &str) -> Result<(), String> {
    let l = s.layers;
    let mut b = Builder {
        w: GgufWriter::new(),
        rng: Rng(0x9e37_79b9_7f4a_7c15),
        params: 0,
        ple_params: 0,
    };
    b.w.add_metadata("general.architecture", MetaValue::String("gemma3n".into()))
        .map_err(|e| e.to_string())?;
    let u = |v: usize| MetaValue::U32(v as u32);
    b.meta("block_count", u(l))?;
    b.meta("context_length", u(32_768))?;
    b.meta("embedding_length", u(HIDDEN))?;
    b.meta("embedding_length_per_layer_input", u(PLE_DIM))?;
    b.meta("feed_forward_length", MetaValue::Array(vec![u(s.ffn); l]))?;
    b.meta("attention.head_count", u(HEADS))?;
    b.meta("attention.head_count_kv", u(KV_HEADS))?;
    b.meta("attention.key_length", u(HEAD_DIM))?;
    b.meta("attention.value_length", u(HEAD_DIM))?;
    b.meta("attention.sliding_window", u(512))?;
    b.meta(
        "attention.sliding_window_pattern",
        MetaValue::Array((0..l).map(|i| MetaValue::Bool((i + 1) % 5 != 0)).collect()),
    )?;
    b.meta(
        "activation_sparsity_scale",
        MetaValue::Array(
            (0..l)
                .map(|i| {
                    MetaValue::F32(if i < SPARSE_LAYERS {
                        SPARSITY_Z
                    } else {
                        f32::NEG_INFINITY
                    })
                })
                .collect(),
        ),
    )?;
    b.meta("altup.num_inputs", u(STREAMS))?;
    b.meta("altup.active_idx", u(0))?;
    b.meta("attention.shared_kv_layers", u(s.kv_shared))?;
    b.meta("rope.freq_base", MetaValue::F32(1_000_000.0))?;
    b.meta("final_logit_softcapping", MetaValue::F32(30.0))?;
    b.meta("attention.layer_norm_rms_epsilon", MetaValue::F32(1e-6))?;

    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    b.matrix("token_embd.weight", &[VOCAB, HIDDEN])?;
    let before = b.params;
    b.matrix("per_layer_token_embd.weight", &[PLE_VOCAB, l * PLE_DIM])?;
    b.ple_params = b.params - before;
    b.matrix("per_layer_model_proj.weight", &[l * PLE_DIM, HIDDEN])?;
    b.f32s("per_layer_proj_norm.weight", &[PLE_DIM], 1.0)?;
    b.matrix("altup_proj.weight", &[STREAMS - 1, HIDDEN, HIDDEN])?;
    b.matrix("altup_unembd_proj.weight", &[STREAMS - 1, HIDDEN, HIDDEN])?;
    b.f32s("output_norm.weight", &[HIDDEN], 1.0)?;
    for i in 0..l {
        let name = |t: &str| format!("blk.{i}.{t}.weight");
        // Published files keep k/v on KV-sharing layers too; they are never read.
        for (t, shape) in [
            ("attn_q", [q, HIDDEN]),
            ("attn_k", [kv, HIDDEN]),
            ("attn_v", [kv, HIDDEN]),
            ("attn_output", [HIDDEN, q]),
            ("ffn_gate", [s.ffn, HIDDEN]),
            ("ffn_up", [s.ffn, HIDDEN]),
            ("ffn_down", [HIDDEN, s.ffn]),
            ("inp_gate", [PLE_DIM, HIDDEN]),
            ("proj", [HIDDEN, PLE_DIM]),
            ("laurel_l", [LAUREL_RANK, HIDDEN]),
            ("laurel_r", [HIDDEN, LAUREL_RANK]),
        ] {
            b.matrix(&name(t), &shape)?;
        }
        for t in ["attn_q_norm", "attn_k_norm"] {
            b.f32s(&name(t), &[HEAD_DIM], 1.0)?;
        }
        for t in [
            "attn_norm",
            "post_attention_norm",
            "ffn_norm",
            "post_ffw_norm",
            "post_norm",
            "altup_correct_scale",
            "altup_router_norm",
            "laurel_post_norm",
        ] {
            b.f32s(&name(t), &[HIDDEN], 1.0)?;
        }
        b.f32s(&name("altup_correct_coef"), &[STREAMS, STREAMS], 0.01)?;
        b.f32s(
            &name("altup_predict_coef"),
            &[STREAMS * STREAMS, STREAMS],
            0.01,
        )?;
        b.f32s(&name("altup_router"), &[STREAMS, HIDDEN], 0.001)?;
    }
    b.w.write_file(std::path::Path::new(out))
        .map_err(|e| e.to_string())?;
    println!(
        "{{\"shape\":\"{}\",\"params\":{},\"ple_params\":{}}}",
        s.name, b.params, b.ple_params
    );
    Ok(())
}

fn slice(src: &str, width: &str, out: &str) -> Result<(), String> {
    use gemma_models::gemma3n::{extract_gguf, ExtractOptions, MatformerConfig};
    let src =
        gemma_formats::GgufFile::open(std::path::Path::new(src)).map_err(|e| e.to_string())?;
    let matformer = MatformerConfig::from_json(&format!("{{\"ffn_widths\": {width}}}"))
        .map_err(|e| e.to_string())?;
    let opts = ExtractOptions {
        matformer: Some(matformer),
        ple_type: None,
    };
    extract_gguf(&src, &opts)
        .map_err(|e| e.to_string())?
        .write_file(std::path::Path::new(out))
        .map_err(|e| e.to_string())
}

fn status_kib(key: &str) -> usize {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn run(path: &str, n: Result<usize, String>) -> Result<(), String> {
    let n = n?;
    let t0 = Instant::now();
    let file = open_model_source(std::path::Path::new(path)).map_err(|e| e.to_string())?;
    let model = load_model(&file).map_err(|e| e.to_string())?;
    let Model::Gemma3n(g) = &model else {
        return Err("not a Gemma 3n model".into());
    };
    let load_s = t0.elapsed().as_secs_f64();
    let rss_loaded = status_kib("VmRSS:");
    let ctx = 4096;
    let mut cache = model.new_cache(ctx).map_err(|e| e.to_string())?;
    let text_vocab = g
        .config()
        .first_multimodal_id
        .unwrap_or(g.config().vocab_size);
    let mut tokens: Vec<u32> = vec![2, 818, 5279, 529, 7001, 563, 496, 236743];
    let t1 = Instant::now();
    let mut logits = model
        .forward(&tokens, &mut cache, Logits::Last)
        .map_err(|e| e.to_string())?
        .to_vec();
    for _ in 0..n {
        let next = (0..text_vocab)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap_or(0) as u32;
        tokens.push(next);
        logits = model
            .forward(&[next], &mut cache, Logits::Last)
            .map_err(|e| e.to_string())?
            .to_vec();
    }
    let gen_s = t1.elapsed().as_secs_f64();
    println!(
        "{{\"model\":\"{path}\",\"generated\":{n},\"load_s\":{load_s:.2},\"gen_s\":{gen_s:.2},\
         \"vm_hwm_kib\":{},\"vm_rss_after_load_kib\":{rss_loaded},\"resident_weight_bytes\":{},\
         \"ple_bytes\":{},\"kv_cache_bytes\":{},\"file_bytes\":{}}}",
        status_kib("VmHWM:"),
        model.weight_bytes(),
        g.per_layer_embedding_bytes(),
        model.kv_cache_bytes(ctx),
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    );
    Ok(())
}
