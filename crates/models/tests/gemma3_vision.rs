//! Gemma 3's vision tower and projector against a direct f64 transcription of transformers'
//! `SiglipVisionModel` + `Gemma3MultiModalProjector` (convolution as a convolution, attention
//! with an explicit score matrix, LayerNorm, pooling and projection written out), on a tiny
//! random model held in all three layouts: transformers 5 names, the published checkpoints'
//! names, and llama.cpp's mmproj GGUF. Then bad input of every kind: errors, never panics.
//!
//! The shapes are chosen to reach the awkward paths: head_dim 9 (not a SIMD multiple), 36
//! patches (the many-token GEMM) and 9 soft tokens (the few-token dot products), a pooling
//! kernel of 2, a text width different from the vision width.

use std::collections::HashMap;
use std::sync::Arc;

use gemma_formats::{Blob, GgmlType, GgufFile, GgufWriter, MetaValue, TensorData, TensorSource};
use gemma_models::{Gemma3Vision, Gemma3VisionConfig, ModelError};
use serde_json::{json, Value};

const HIDDEN: usize = 36;
const HEADS: usize = 4;
const FFN: usize = 40;
const LAYERS: usize = 2;
const IMAGE: usize = 24;
const PATCH: usize = 4;
const CHANNELS: usize = 3;
const TOKENS: usize = 9;
const TEXT_HIDDEN: usize = 20;
const EPS: f64 = 1e-6;

const SIDE: usize = IMAGE / PATCH;
const PATCHES: usize = SIDE * SIDE;

/// Deterministic pseudo-random values in [-scale, scale).
struct Rng(u64);

impl Rng {
    fn values(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                offset + ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }
}

/// One tensor as transformers names it (after `vision_tower.vision_model.` or at the top),
/// llama.cpp's name, its shape (outermost first) and values.
struct Tensor {
    hf: String,
    gguf: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

struct Layer {
    ln1: (Vec<f32>, Vec<f32>),
    q: (Vec<f32>, Vec<f32>),
    k: (Vec<f32>, Vec<f32>),
    v: (Vec<f32>, Vec<f32>),
    o: (Vec<f32>, Vec<f32>),
    ln2: (Vec<f32>, Vec<f32>),
    fc1: (Vec<f32>, Vec<f32>),
    fc2: (Vec<f32>, Vec<f32>),
}

struct Weights {
    patch: (Vec<f32>, Vec<f32>),
    pos: Vec<f32>,
    layers: Vec<Layer>,
    post: (Vec<f32>, Vec<f32>),
    /// transformers' `w` (the multiplier is `1 + w`).
    soft_norm: Vec<f32>,
    /// `[HIDDEN, TEXT_HIDDEN]`: used as `x @ W`.
    projection: Vec<f32>,
}

fn weights() -> Weights {
    let mut r = Rng(7);
    let mut dense = |rows: usize, cols: usize| {
        let scale = 1.0 / (cols as f32).sqrt();
        (r.values(rows * cols, scale, 0.0), r.values(rows, 0.1, 0.0))
    };
    let patch = dense(HIDDEN, CHANNELS * PATCH * PATCH);
    let layers = (0..LAYERS)
        .map(|_| Layer {
            ln1: (vec![], vec![]),
            q: dense(HIDDEN, HIDDEN),
            k: dense(HIDDEN, HIDDEN),
            v: dense(HIDDEN, HIDDEN),
            o: dense(HIDDEN, HIDDEN),
            ln2: (vec![], vec![]),
            fc1: dense(FFN, HIDDEN),
            fc2: dense(HIDDEN, FFN),
        })
        .collect::<Vec<_>>();
    let mut r = Rng(11);
    let mut norm = || (r.values(HIDDEN, 0.3, 1.0), r.values(HIDDEN, 0.2, 0.0));
    let layers = layers
        .into_iter()
        .map(|mut l| {
            l.ln1 = norm();
            l.ln2 = norm();
            l
        })
        .collect();
    let post = norm();
    let mut r = Rng(13);
    Weights {
        patch,
        pos: r.values(PATCHES * HIDDEN, 0.5, 0.0),
        layers,
        post,
        soft_norm: r.values(HIDDEN, 0.3, 0.0),
        projection: r.values(HIDDEN * TEXT_HIDDEN, 0.2, 0.0),
    }
}

fn tensors(w: &Weights) -> Vec<Tensor> {
    let mut out = Vec::new();
    let mut add = |hf: String, gguf: String, shape: &[usize], values: &[f32]| {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{hf}");
        out.push(Tensor {
            hf,
            gguf,
            shape: shape.to_vec(),
            values: values.to_vec(),
        });
    };
    let vm = "vision_tower.vision_model";
    add(
        format!("{vm}.embeddings.patch_embedding.weight"),
        "v.patch_embd.weight".into(),
        &[HIDDEN, CHANNELS, PATCH, PATCH],
        &w.patch.0,
    );
    add(
        format!("{vm}.embeddings.patch_embedding.bias"),
        "v.patch_embd.bias".into(),
        &[HIDDEN],
        &w.patch.1,
    );
    add(
        format!("{vm}.embeddings.position_embedding.weight"),
        "v.position_embd.weight".into(),
        &[PATCHES, HIDDEN],
        &w.pos,
    );
    for (i, l) in w.layers.iter().enumerate() {
        for (hf, gguf, (weight, bias), rows, cols) in [
            ("layer_norm1", "ln1", &l.ln1, HIDDEN, 0),
            ("layer_norm2", "ln2", &l.ln2, HIDDEN, 0),
            ("self_attn.q_proj", "attn_q", &l.q, HIDDEN, HIDDEN),
            ("self_attn.k_proj", "attn_k", &l.k, HIDDEN, HIDDEN),
            ("self_attn.v_proj", "attn_v", &l.v, HIDDEN, HIDDEN),
            ("self_attn.out_proj", "attn_out", &l.o, HIDDEN, HIDDEN),
            ("mlp.fc1", "ffn_up", &l.fc1, FFN, HIDDEN),
            ("mlp.fc2", "ffn_down", &l.fc2, HIDDEN, FFN),
        ] {
            let shape = if cols == 0 {
                vec![rows]
            } else {
                vec![rows, cols]
            };
            let hf = format!("{vm}.encoder.layers.{i}.{hf}");
            let gguf = format!("v.blk.{i}.{gguf}");
            add(
                format!("{hf}.weight"),
                format!("{gguf}.weight"),
                &shape,
                weight,
            );
            add(format!("{hf}.bias"), format!("{gguf}.bias"), &[rows], bias);
        }
    }
    add(
        format!("{vm}.post_layernorm.weight"),
        "v.post_ln.weight".into(),
        &[HIDDEN],
        &w.post.0,
    );
    add(
        format!("{vm}.post_layernorm.bias"),
        "v.post_ln.bias".into(),
        &[HIDDEN],
        &w.post.1,
    );
    add(
        "multi_modal_projector.mm_input_projection_weight".into(),
        "mm.input_projection.weight".into(),
        &[HIDDEN, TEXT_HIDDEN],
        &w.projection,
    );
    add(
        "multi_modal_projector.mm_soft_emb_norm.weight".into(),
        "mm.soft_emb_norm.weight".into(),
        &[HIDDEN],
        &w.soft_norm,
    );
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Tensors by name, as a Hugging Face folder would hand them out.
struct MapSource(HashMap<String, TensorData>);

impl TensorSource for MapSource {
    fn tensor(&self, name: &str) -> Option<TensorData> {
        self.0.get(name).cloned()
    }
    fn tensor_names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

/// The transformers names in the wild: (tower prefix, projector prefix) of the published
/// checkpoints, of transformers 4.52-4.57 saves, of transformers 5 saves and of transformers 5's
/// in-memory model.
const HF_LAYOUTS: [(&str, &str); 4] = [
    ("vision_tower.vision_model.", "multi_modal_projector."),
    (
        "model.vision_tower.vision_model.",
        "model.multi_modal_projector.",
    ),
    ("vision_tower.", "multi_modal_projector."),
    ("model.vision_tower.", "model.multi_modal_projector."),
];

/// `t.hf` (published names) under another layout.
fn renamed(hf: &str, (tower, projector): (&str, &str)) -> String {
    if let Some(rest) = hf.strip_prefix("vision_tower.vision_model.") {
        format!("{tower}{rest}")
    } else {
        let rest = hf.strip_prefix("multi_modal_projector.").unwrap();
        format!("{projector}{rest}")
    }
}

/// The tensors under `layout`'s names, without the one whose published name is `skip`.
fn hf_source(w: &Weights, layout: (&str, &str), skip: Option<&str>) -> MapSource {
    MapSource(
        tensors(w)
            .into_iter()
            .filter(|t| Some(t.hf.as_str()) != skip)
            .map(|t| {
                let data = TensorData {
                    interleaved: false,
                    dtype: GgmlType::F32,
                    shape: t.shape,
                    data: Blob::from_vec(f32_bytes(&t.values)),
                };
                (renamed(&t.hf, layout), data)
            })
            .collect(),
    )
}

const PUBLISHED: (&str, &str) = HF_LAYOUTS[0];

fn hf_config() -> Value {
    json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "mm_tokens_per_image": TOKENS,
        "text_config": {"hidden_size": TEXT_HIDDEN, "model_type": "gemma3_text"},
        "vision_config": {
            "hidden_size": HIDDEN,
            "intermediate_size": FFN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "image_size": IMAGE,
            "patch_size": PATCH,
            "layer_norm_eps": EPS,
            "num_channels": CHANNELS,
            "hidden_act": "gelu_pytorch_tanh",
            "model_type": "siglip_vision_model",
            "vision_use_head": false
        }
    })
}

/// What llama.cpp's converter writes for this model (`scale_factor` because 6 → 3 is not
/// the default 4).
fn gguf_metadata() -> Vec<(&'static str, MetaValue)> {
    let u = |v: usize| MetaValue::U32(v as u32);
    vec![
        ("general.architecture", MetaValue::String("clip".into())),
        ("clip.projector_type", MetaValue::String("gemma3".into())),
        ("clip.has_vision_encoder", MetaValue::Bool(true)),
        ("clip.use_gelu", MetaValue::Bool(true)),
        ("clip.vision.projection_dim", u(TEXT_HIDDEN)),
        ("clip.vision.image_size", u(IMAGE)),
        ("clip.vision.patch_size", u(PATCH)),
        ("clip.vision.embedding_length", u(HIDDEN)),
        ("clip.vision.feed_forward_length", u(FFN)),
        ("clip.vision.block_count", u(LAYERS)),
        ("clip.vision.attention.head_count", u(HEADS)),
        (
            "clip.vision.attention.layer_norm_epsilon",
            MetaValue::F32(EPS as f32),
        ),
        ("clip.vision.projector.scale_factor", u(SIDE / 3)),
    ]
}

/// The mmproj GGUF: matrices in `dtype` (embeddings in f32, as the converter forces), the
/// soft-embedding norm stored as `1 + w`, as the converter stores it.
fn gguf(
    w: &Weights,
    dtype: GgmlType,
    metadata: Vec<(&'static str, MetaValue)>,
    skip: Option<&str>,
) -> GgufFile {
    let mut writer = GgufWriter::new();
    for (k, v) in metadata {
        writer.add_metadata(k, v).unwrap();
    }
    for t in tensors(w) {
        if Some(t.gguf.as_str()) == skip {
            continue;
        }
        let mut values = t.values;
        if t.gguf == "mm.soft_emb_norm.weight" {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        let is_matrix = t.shape.len() >= 2 && !t.gguf.contains("_embd");
        let (dt, bytes) = if is_matrix && dtype == GgmlType::F16 {
            let bytes = values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            (GgmlType::F16, bytes)
        } else {
            (GgmlType::F32, f32_bytes(&values))
        };
        writer.add_tensor(t.gguf, dt, &t.shape, bytes).unwrap();
    }
    let mut bytes = Vec::new();
    writer.write_to(&mut bytes).unwrap();
    GgufFile::from_bytes(Arc::new(bytes)).unwrap()
}

/// Rounds every matrix to f16 (what the f16 GGUF holds), leaving embeddings and vectors.
fn rounded_to_f16(w: &Weights) -> Weights {
    rounded(w, |x| half::f16::from_f32(x).to_f32(), false)
}

/// Every value rounded with `round` (the layer matrices and the projection only, unless
/// `everything`: then the embeddings, norms and biases too).
fn rounded(w: &Weights, round: fn(f32) -> f32, everything: bool) -> Weights {
    let m = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| round(x)).collect() };
    let o = |v: &[f32]| -> Vec<f32> {
        if everything {
            m(v)
        } else {
            v.to_vec()
        }
    };
    let pair = |(a, b): &(Vec<f32>, Vec<f32>)| (o(a), o(b));
    let dense = |(a, b): &(Vec<f32>, Vec<f32>)| (m(a), o(b));
    Weights {
        patch: pair(&w.patch),
        pos: o(&w.pos),
        layers: w
            .layers
            .iter()
            .map(|l| Layer {
                ln1: pair(&l.ln1),
                q: dense(&l.q),
                k: dense(&l.k),
                v: dense(&l.v),
                o: dense(&l.o),
                ln2: pair(&l.ln2),
                fc1: dense(&l.fc1),
                fc2: dense(&l.fc2),
            })
            .collect(),
        post: pair(&w.post),
        soft_norm: o(&w.soft_norm),
        projection: m(&w.projection),
    }
}

/// The published checkpoints' type: every tensor bf16.
fn bf16_source(w: &Weights) -> MapSource {
    MapSource(
        tensors(w)
            .into_iter()
            .map(|t| {
                let bytes = t
                    .values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                    .collect();
                let data = TensorData {
                    interleaved: false,
                    dtype: GgmlType::BF16,
                    shape: t.shape,
                    data: Blob::from_vec(bytes),
                };
                (t.hf, data)
            })
            .collect(),
    )
}

// ---- the reference, in f64 -------------------------------------------------------------

fn dense(x: &[f64], (w, b): &(Vec<f32>, Vec<f32>)) -> Vec<f64> {
    let (rows, cols) = (b.len(), w.len() / b.len());
    x.chunks_exact(cols)
        .flat_map(|xt| {
            (0..rows).map(move |r| {
                b[r] as f64
                    + (0..cols)
                        .map(|c| w[r * cols + c] as f64 * xt[c])
                        .sum::<f64>()
            })
        })
        .collect()
}

fn layer_norm(x: &[f64], (w, b): &(Vec<f32>, Vec<f32>)) -> Vec<f64> {
    x.chunks_exact(w.len())
        .flat_map(|row| {
            let n = row.len() as f64;
            let mean = row.iter().sum::<f64>() / n;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            row.iter()
                .zip(w.iter().zip(b))
                .map(move |(v, (&w, &b))| (v - mean) / (var + EPS).sqrt() * w as f64 + b as f64)
        })
        .collect()
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

fn reference(w: &Weights, pixels: &[f32]) -> Vec<f64> {
    let hd = HIDDEN / HEADS;
    // Conv2d(kernel = stride = PATCH) written as a convolution, patches row-major, plus the
    // position embedding.
    let mut x = vec![0.0f64; PATCHES * HIDDEN];
    for py in 0..SIDE {
        for px in 0..SIDE {
            for o in 0..HIDDEN {
                let mut acc = w.patch.1[o] as f64;
                for c in 0..CHANNELS {
                    for ky in 0..PATCH {
                        for kx in 0..PATCH {
                            let weight = w.patch.0[((o * CHANNELS + c) * PATCH + ky) * PATCH + kx];
                            let pixel =
                                pixels[(c * IMAGE + py * PATCH + ky) * IMAGE + px * PATCH + kx];
                            acc += weight as f64 * pixel as f64;
                        }
                    }
                }
                let t = py * SIDE + px;
                x[t * HIDDEN + o] = acc + w.pos[t * HIDDEN + o] as f64;
            }
        }
    }
    for l in &w.layers {
        let h = layer_norm(&x, &l.ln1);
        let (q, k, v) = (dense(&h, &l.q), dense(&h, &l.k), dense(&h, &l.v));
        let mut attn = vec![0.0f64; PATCHES * HIDDEN];
        for head in 0..HEADS {
            for i in 0..PATCHES {
                let scores: Vec<f64> = (0..PATCHES)
                    .map(|j| {
                        (0..hd)
                            .map(|d| q[i * HIDDEN + head * hd + d] * k[j * HIDDEN + head * hd + d])
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    attn[i * HIDDEN + head * hd + d] = (0..PATCHES)
                        .map(|j| e[j] / sum * v[j * HIDDEN + head * hd + d])
                        .sum();
                }
            }
        }
        let o = dense(&attn, &l.o);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let h = layer_norm(&x, &l.ln2);
        let mid: Vec<f64> = dense(&h, &l.fc1).into_iter().map(gelu_tanh).collect();
        let o = dense(&mid, &l.fc2);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    }
    let x = layer_norm(&x, &w.post);
    // Projector: AvgPool2d over [HIDDEN, SIDE, SIDE], flatten, Gemma RMSNorm (1 + w), x @ W.
    let (tps, kernel) = (3, SIDE / 3);
    let mut out = Vec::new();
    for ty in 0..tps {
        for tx in 0..tps {
            let pooled: Vec<f64> = (0..HIDDEN)
                .map(|c| {
                    let mut s = 0.0;
                    for ky in 0..kernel {
                        for kx in 0..kernel {
                            s += x[((ty * kernel + ky) * SIDE + tx * kernel + kx) * HIDDEN + c];
                        }
                    }
                    s / (kernel * kernel) as f64
                })
                .collect();
            let ms = pooled.iter().map(|v| v * v).sum::<f64>() / HIDDEN as f64;
            let normed: Vec<f64> = pooled
                .iter()
                .zip(&w.soft_norm)
                .map(|(v, &g)| v / (ms + EPS).sqrt() * (1.0 + g as f64))
                .collect();
            for o in 0..TEXT_HIDDEN {
                out.push(
                    (0..HIDDEN)
                        .map(|c| normed[c] * w.projection[c * TEXT_HIDDEN + o] as f64)
                        .sum(),
                );
            }
        }
    }
    out
}

fn pixels() -> Vec<f32> {
    Rng(99).values(CHANNELS * IMAGE * IMAGE, 1.0, 0.0)
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tolerance: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(&g, w)| (g as f64 - w).abs())
        .fold(0.0, f64::max);
    eprintln!("{what}: worst difference {worst:.2e}");
    assert!(worst < tolerance, "{what}: worst difference {worst}");
}

#[test]
fn every_layout_matches_a_direct_f64_transcription() {
    let w = weights();
    let pixels = pixels();
    let want = reference(&w, &pixels);
    // The output is not trivially small: a scaling mistake cannot hide under the tolerance.
    assert!(want.iter().any(|v| v.abs() > 0.5));
    let mut out = Vec::new();
    for layout in HF_LAYOUTS {
        let vision = Gemma3Vision::load_hf(&hf_config(), &hf_source(&w, layout, None)).unwrap();
        assert_eq!(
            (
                vision.image_size(),
                vision.tokens_per_image(),
                vision.text_hidden()
            ),
            (IMAGE, TOKENS, TEXT_HIDDEN)
        );
        vision.encode(&pixels, &mut out).unwrap();
        assert_close(&format!("hf {layout:?}"), &out, &want, 1e-4);
    }
    let file = gguf(&w, GgmlType::F32, gguf_metadata(), None);
    let vision = Gemma3Vision::load_gguf(&file).unwrap();
    assert_eq!(vision.tokens_per_image(), TOKENS);
    vision.encode(&pixels, &mut out).unwrap();
    assert_close("gguf f32", &out, &want, 1e-4);
    // A second image through the same model and output buffer.
    let other: Vec<f32> = pixels.iter().map(|p| -p * 0.5).collect();
    vision.encode(&other, &mut out).unwrap();
    assert_close("gguf f32, second image", &out, &reference(&w, &other), 1e-4);
    assert!(!vision.describe().is_empty());
    assert!(vision.weight_bytes() > 0);
}

/// f16 matrices (as the converter writes them by default): the reference uses the same
/// rounded weights, and f16 weights multiply f32 activations, so the match is as close as f32.
#[test]
fn f16_mmproj_matches_with_its_rounded_weights() {
    let w = weights();
    let pixels = pixels();
    let want = reference(&rounded_to_f16(&w), &pixels);
    let file = gguf(&w, GgmlType::F16, gguf_metadata(), None);
    let vision = Gemma3Vision::load_gguf(&file).unwrap();
    let mut out = Vec::new();
    vision.encode(&pixels, &mut out).unwrap();
    assert_close("gguf f16", &out, &want, 1e-4);
}

/// A bf16 checkpoint, as published: the reference uses the same rounded values (all of
/// them), activations stay f32.
#[test]
fn bf16_checkpoint_matches_with_its_rounded_weights() {
    let w = weights();
    let pixels = pixels();
    let want = reference(
        &rounded(&w, |x| half::bf16::from_f32(x).to_f32(), true),
        &pixels,
    );
    let vision = Gemma3Vision::load_hf(&hf_config(), &bf16_source(&w)).unwrap();
    let mut out = Vec::new();
    vision.encode(&pixels, &mut out).unwrap();
    assert_close("hf bf16", &out, &want, 1e-4);
}

// ---- bad input ---------------------------------------------------------------------------

fn config_error(result: Result<Gemma3VisionConfig, ModelError>, needle: &str) {
    match result {
        Err(ModelError::Config(m)) => assert!(m.contains(needle), "'{m}' lacks '{needle}'"),
        Err(other) => panic!("expected a config error about '{needle}', got {other}"),
        Ok(_) => panic!("expected a config error about '{needle}'"),
    }
}

#[test]
fn bad_hf_configs_are_errors() {
    let with = |path: &[&str], value: Value| {
        let mut c = hf_config();
        let mut v = &mut c;
        for key in &path[..path.len() - 1] {
            v = &mut v[*key];
        }
        v[path[path.len() - 1]] = value;
        Gemma3VisionConfig::from_hf_config(&c)
    };
    let vc = |key: &'static str, value: Value| with(&["vision_config", key], value);
    config_error(
        vc("patch_size", json!(5)),
        "not a multiple of the patch size",
    );
    config_error(vc("patch_size", json!(0)), "out of range");
    config_error(vc("patch_size", json!(48)), "out of range");
    config_error(vc("hidden_size", json!(0)), "out of range");
    config_error(vc("hidden_size", json!(1u64 << 40)), "out of range");
    config_error(vc("image_size", json!(1u64 << 30)), "out of range");
    config_error(vc("num_hidden_layers", json!(0)), "out of range");
    config_error(vc("num_attention_heads", json!(5)), "attention heads");
    config_error(vc("num_attention_heads", json!(0)), "attention heads");
    config_error(vc("num_channels", json!(0)), "out of range");
    config_error(vc("layer_norm_eps", json!(-1.0)), "layer_norm_eps");
    config_error(vc("layer_norm_eps", json!("small")), "layer_norm_eps");
    config_error(vc("hidden_size", json!("36")), "hidden_size");
    config_error(vc("hidden_size", json!(36.5)), "hidden_size");
    config_error(vc("hidden_size", Value::Null), "hidden_size");
    config_error(vc("hidden_act", json!("relu")), "hidden_act");
    config_error(with(&["mm_tokens_per_image"], json!(8)), "square");
    config_error(with(&["mm_tokens_per_image"], json!(0)), "square");
    // 4 tokens per side cannot pool 6 patches per side by a whole kernel.
    config_error(with(&["mm_tokens_per_image"], json!(16)), "whole number");
    // More tokens than patches.
    config_error(with(&["mm_tokens_per_image"], json!(144)), "pool");
    config_error(
        with(&["mm_tokens_per_image"], json!(-4)),
        "mm_tokens_per_image",
    );
    config_error(
        with(&["text_config", "hidden_size"], json!(0)),
        "text hidden size",
    );
    config_error(with(&["text_config"], json!({})), "text_config.hidden_size");
    config_error(with(&["vision_config"], Value::Null), "vision_config");
    config_error(
        Gemma3VisionConfig::from_hf_config(&json!([])),
        "vision_config",
    );
    // The same checks guard `load_hf`.
    let mut c = hf_config();
    c["vision_config"]["patch_size"] = json!(7);
    let source = hf_source(&weights(), PUBLISHED, None);
    assert!(matches!(
        Gemma3Vision::load_hf(&c, &source),
        Err(ModelError::Config(_))
    ));
}

#[test]
fn bad_mmproj_metadata_is_an_error() {
    let w = weights();
    let with = |key: &'static str, value: Option<MetaValue>| {
        let mut meta: Vec<_> = gguf_metadata()
            .into_iter()
            .filter(|(k, _)| *k != key)
            .collect();
        if let Some(v) = value {
            meta.push((key, v));
        }
        Gemma3VisionConfig::from_gguf(&gguf(&w, GgmlType::F32, meta, None))
    };
    config_error(
        with(
            "clip.projector_type",
            Some(MetaValue::String("llava".into())),
        ),
        "'llava'",
    );
    config_error(with("clip.projector_type", None), "missing");
    // The mixed-modality key is accepted in its place.
    let mut meta: Vec<_> = gguf_metadata()
        .into_iter()
        .filter(|(k, _)| *k != "clip.projector_type")
        .collect();
    meta.push((
        "clip.vision.projector_type",
        MetaValue::String("gemma3".into()),
    ));
    let file = gguf(&w, GgmlType::F32, meta, None);
    assert_eq!(
        Gemma3VisionConfig::from_gguf(&file)
            .unwrap()
            .mm_tokens_per_image,
        TOKENS
    );
    config_error(with("clip.vision.patch_size", None), "patch_size");
    config_error(
        with("clip.vision.patch_size", Some(MetaValue::U32(5))),
        "multiple",
    );
    config_error(with("clip.vision.projection_dim", None), "projection_dim");
    config_error(
        with(
            "clip.vision.projector.scale_factor",
            Some(MetaValue::U32(0)),
        ),
        "scale factor",
    );
    config_error(
        with(
            "clip.vision.projector.scale_factor",
            Some(MetaValue::U32(4)),
        ),
        "scale factor",
    );
    // Without the key llama.cpp pools by 4, which 6 patches per side do not allow.
    config_error(
        with("clip.vision.projector.scale_factor", None),
        "scale factor",
    );
    config_error(
        with("clip.vision.attention.head_count", Some(MetaValue::U32(7))),
        "attention heads",
    );
    config_error(
        with(
            "clip.vision.attention.layer_norm_epsilon",
            Some(MetaValue::F32(f32::NAN)),
        ),
        "layer_norm_eps",
    );
    config_error(
        with("clip.has_vision_encoder", Some(MetaValue::Bool(false))),
        "no vision",
    );
    // A wrongly typed value is a format error naming the key.
    let err = with(
        "clip.vision.image_size",
        Some(MetaValue::String("big".into())),
    )
    .expect_err("a string image size is an error");
    assert!(err.to_string().contains("clip.vision.image_size"), "{err}");
}

#[test]
fn missing_or_misshapen_tensors_are_errors() {
    let w = weights();
    for name in [
        "vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias",
        "vision_tower.vision_model.embeddings.patch_embedding.bias",
        "multi_modal_projector.mm_input_projection_weight",
        "multi_modal_projector.mm_soft_emb_norm.weight",
    ] {
        let layout = HF_LAYOUTS[1];
        let source = hf_source(&w, layout, Some(name));
        match Gemma3Vision::load_hf(&hf_config(), &source) {
            Err(ModelError::MissingTensor(n)) => assert_eq!(n, renamed(name, layout)),
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name}: loaded without it"),
        }
    }
    // Without the patch embedding no layout is recognised.
    let probe = "vision_tower.vision_model.embeddings.patch_embedding.weight";
    assert!(matches!(
        Gemma3Vision::load_hf(&hf_config(), &hf_source(&w, PUBLISHED, Some(probe))),
        Err(ModelError::MissingTensor(_))
    ));
    for name in [
        "v.blk.0.attn_q.weight",
        "mm.input_projection.weight",
        "v.post_ln.bias",
    ] {
        let file = gguf(&w, GgmlType::F32, gguf_metadata(), Some(name));
        match Gemma3Vision::load_gguf(&file) {
            Err(ModelError::MissingTensor(n)) => assert_eq!(n, name),
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name}: loaded without it"),
        }
    }
    // A config that disagrees with the tensors: wrong widths are shape errors.
    let mut c = hf_config();
    c["text_config"]["hidden_size"] = json!(TEXT_HIDDEN + 1);
    assert!(matches!(
        Gemma3Vision::load_hf(&c, &hf_source(&w, PUBLISHED, None)),
        Err(ModelError::TensorShape { .. })
    ));
    let mut c = hf_config();
    c["vision_config"]["intermediate_size"] = json!(FFN * 2);
    assert!(matches!(
        Gemma3Vision::load_hf(&c, &hf_source(&w, PUBLISHED, None)),
        Err(ModelError::TensorShape { .. })
    ));
    // The projection stored as a Linear ([out, in]) instead of the raw [in, out] parameter.
    let mut source = hf_source(&w, PUBLISHED, None);
    let name = "multi_modal_projector.mm_input_projection_weight";
    source.0.get_mut(name).unwrap().shape = vec![TEXT_HIDDEN, HIDDEN];
    match Gemma3Vision::load_hf(&hf_config(), &source) {
        Err(ModelError::TensorShape { name: n, .. }) => assert_eq!(n, name),
        other => panic!("expected a shape error, got {:?}", other.err()),
    }
}

#[test]
fn bad_pixel_values_are_errors() {
    let w = weights();
    let vision = Gemma3Vision::load_hf(&hf_config(), &hf_source(&w, PUBLISHED, None)).unwrap();
    let mut out = vec![1.0; 3];
    let n = vision.pixel_len();
    assert_eq!(n, CHANNELS * IMAGE * IMAGE);
    for len in [0, 1, n - 1, n + 1, IMAGE * IMAGE] {
        let err = vision.encode(&vec![0.0; len], &mut out).unwrap_err();
        assert!(matches!(err, ModelError::Config(_)), "{len}: {err}");
    }
    let mut pixels = pixels();
    pixels[17] = f32::NAN;
    assert!(vision.encode(&pixels, &mut out).is_err());
    pixels[17] = f32::INFINITY;
    assert!(vision.encode(&pixels, &mut out).is_err());
}
