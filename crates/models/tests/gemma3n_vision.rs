//! Gemma 3n's MobileNet-V5 vision tower and `embed_vision` against transformers + timm
//! (fixtures/gemma3n_vision_tiny, made by scripts/make_gemma3n_vision_fixtures.py): the tower's
//! output, the scaled tokens, the soft tokens and the hard embeddings; and errors, never
//! panics, for missing or misshapen tensors and wrong inputs.

use std::path::PathBuf;

use gemma_formats::{Blob, GgmlType, HfFolder, TensorData, TensorSource};
use gemma_models::vision::{Gemma3nVision, Gemma3nVisionConfig};
use gemma_models::{Loader, ModelError, WeightLayout};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3n_vision_tiny")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn read_f32(rel: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixture_dir().join(rel)).unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn pixels(r: &Value, image: &str) -> Vec<f32> {
    let rel = r["images"][image]["pixels_u8"].as_str().unwrap();
    std::fs::read(fixture_dir().join(rel))
        .unwrap()
        .into_iter()
        .map(|v| v as f32 / 255.0)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

fn load() -> Gemma3nVision {
    let folder = HfFolder::open(&fixture_dir()).expect("fixture folder");
    Gemma3nVision::from_hf(&folder).expect("tower loads")
}

#[test]
fn config_from_fixture() {
    let folder = HfFolder::open(&fixture_dir()).unwrap();
    let c = Gemma3nVisionConfig::from_hf_config(folder.config()).unwrap();
    assert_eq!(c.image_size, 768);
    assert_eq!(c.tokens_per_image, 256);
    assert_eq!(c.text_hidden_size, 32);
    assert_eq!((c.vocab_offset, c.vocab_size), (256, 128));
    assert_eq!(c.hidden_size, 2048);
    assert_eq!(
        (c.image_token_id, c.boi_token_id, c.eoi_token_id),
        (257, 250, 256)
    );
    let v = load();
    // timm's arch def for mobilenetv5_300m_enc, read back from the tensor names.
    assert_eq!(v.stage_depths(), vec![3, 5, 37, 39]);
    assert!(v.weight_bytes() > 0);
}

#[test]
fn tower_and_soft_tokens_match_reference() {
    let r = reference();
    let t = &r["tower"];
    let image = t["image"].as_str().unwrap();
    let px = pixels(&r, image);
    let v = load();

    let scaled = v.encode_tower(&px).unwrap();
    assert_eq!(shape(&t["tower_scaled_shape"]), vec![256, 2048]);
    let want_scaled = read_f32(t["tower_scaled"].as_str().unwrap());
    // The raw tower output [2048, 16, 16] is the transpose of the tokens, unscaled.
    let tower = read_f32(t["tower"].as_str().unwrap());
    let scale = 2048f32.sqrt();
    let mut ours_chw = vec![0.0f32; tower.len()];
    for tok in 0..256 {
        for c in 0..2048 {
            ours_chw[c * 256 + tok] = scaled[tok * 2048 + c] / scale;
        }
    }
    let d_tower = max_diff(&ours_chw, &tower);
    eprintln!("tower max |diff| {d_tower:e}");
    assert!(d_tower < 1e-3, "tower output differs by {d_tower}");
    let d_scaled = max_diff(&scaled, &want_scaled);
    assert!(
        d_scaled < 1e-3 * scale,
        "scaled tokens differ by {d_scaled}"
    );

    let soft = v.encode_image(&px).unwrap();
    let want_soft = read_f32(t["soft_tokens"].as_str().unwrap());
    assert_eq!(shape(&t["soft_tokens_shape"]), vec![256, 32]);
    let d_soft = max_diff(&soft, &want_soft);
    eprintln!("soft tokens max |diff| {d_soft:e}");
    assert!(d_soft < 1e-3, "soft tokens differ by {d_soft}");

    let ids: Vec<u32> = t["hard_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let hard = v.embed_hard(&ids).unwrap();
    let want_hard: Vec<f32> = t["hard_embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let d_hard = max_diff(&hard, &want_hard);
    assert!(d_hard < 1e-4, "hard embeddings differ by {d_hard}");
    assert!(matches!(
        v.embed_hard(&[3]),
        Err(ModelError::TokenOutOfRange { .. })
    ));
}

#[test]
fn bad_pixels_are_errors() {
    let v = load();
    assert!(v.encode_image(&[]).is_err());
    assert!(v.encode_image(&vec![0.5; 3 * 767 * 767]).is_err());
    assert!(v.encode_tower(&vec![0.5; 4 * 768 * 768]).is_err());
    let mut px = vec![0.5; 3 * 768 * 768];
    px[17] = f32::NAN;
    assert!(v.encode_image(&px).is_err());
}

/// The fixture's tensors with one dropped or replaced.
struct Patched {
    inner: HfFolder,
    name: String,
    replacement: Option<TensorData>,
}

impl TensorSource for Patched {
    fn tensor(&self, name: &str) -> Option<TensorData> {
        if name == self.name {
            return self.replacement.clone();
        }
        self.inner.tensor(name)
    }
    fn tensor_names(&self) -> Vec<String> {
        self.inner.tensor_names()
    }
}

fn load_patched(name: &str, replacement: Option<TensorData>) -> Result<Gemma3nVision, ModelError> {
    let inner = HfFolder::open(&fixture_dir()).unwrap();
    let config = Gemma3nVisionConfig::from_hf_config(inner.config()).unwrap();
    let source = Patched {
        inner,
        name: name.into(),
        replacement,
    };
    let loader = Loader {
        source: &source,
        layout: WeightLayout::HuggingFace { prefix: "model." },
    };
    Gemma3nVision::load(config, &loader, "model.")
}

fn f32_tensor(shape: &[usize]) -> TensorData {
    let n: usize = shape.iter().product();
    TensorData {
        interleaved: false,
        dtype: GgmlType::F32,
        shape: shape.to_vec(),
        data: Blob::from_vec(vec![0u8; 4 * n]),
    }
}

#[test]
fn missing_and_misshapen_tensors_are_errors() {
    let t = "model.vision_tower.timm_model.";
    for name in [
        format!("{t}conv_stem.conv.weight"),
        format!("{t}blocks.0.0.bn1.weight"),
        format!("{t}blocks.1.0.pw_proj.conv.weight"),
        format!("{t}blocks.2.9.attn.key.norm.weight"),
        format!("{t}blocks.3.1.attn.output.proj.weight"),
        format!("{t}msfa.ffn.pw_proj.conv.weight"),
        format!("{t}msfa.norm.weight"),
        "model.embed_vision.embedding_projection.weight".into(),
    ] {
        let e = load_patched(&name, None).err();
        assert!(e.is_some(), "loading without {name} succeeded");
    }
    // Wrong shapes: a conv weight with the wrong input width, a norm of the wrong length, a
    // 3-D conv weight, a depthwise weight with groups != channels, a key width that does not
    // divide the query's.
    for (name, shape) in [
        (format!("{t}blocks.0.1.conv_exp.weight"), vec![32, 9, 3, 3]),
        (format!("{t}blocks.0.1.bn1.weight"), vec![31]),
        (format!("{t}blocks.1.2.pw_exp.conv.weight"), vec![64, 16, 3]),
        (
            format!("{t}blocks.1.1.dw_start.conv.weight"),
            vec![16, 2, 5, 5],
        ),
        (
            format!("{t}blocks.2.9.attn.key.proj.weight"),
            vec![60, 40, 1, 1],
        ),
        (
            format!("{t}blocks.3.1.attn.query.proj.weight"),
            vec![1536, 81, 1, 1],
        ),
        (
            format!("{t}msfa.ffn.pw_exp.conv.weight"),
            vec![240, 119, 1, 1],
        ),
        (
            format!("{t}msfa.ffn.pw_proj.conv.weight"),
            vec![2000, 240, 1, 1],
        ),
        (format!("{t}conv_stem.conv.weight"), vec![64, 4, 3, 3]),
    ] {
        let e = load_patched(&name, Some(f32_tensor(&shape))).err();
        assert!(
            e.is_some(),
            "loading with {name} of shape {shape:?} succeeded"
        );
    }
    // Bytes that do not fit the stated type.
    let bad = TensorData {
        interleaved: false,
        dtype: GgmlType::BF16,
        shape: vec![64],
        data: Blob::from_vec(vec![0u8; 7]),
    };
    assert!(load_patched(&format!("{t}conv_stem.bn.weight"), Some(bad)).is_err());
    // The unpatched fixture loads through the same path.
    assert!(load_patched("none", None).is_ok());
}

#[test]
fn bad_configs_are_errors() {
    let folder = HfFolder::open(&fixture_dir()).unwrap();
    let good = folder.config().clone();
    let mut c = good.clone();
    c["vision_soft_tokens_per_image"] = 250.into();
    assert!(Gemma3nVisionConfig::from_hf_config(&c).is_err());
    let mut c = good.clone();
    c["vision_config"]["vocab_offset"] = 390.into();
    assert!(Gemma3nVisionConfig::from_hf_config(&c).is_err());
    let mut c = good.clone();
    c.as_object_mut().unwrap().remove("vision_config");
    assert!(Gemma3nVisionConfig::from_hf_config(&c).is_err());
    let mut c = good.clone();
    c["vision_config"]["architecture"] = "resnet50".into();
    assert!(Gemma3nVisionConfig::from_hf_config(&c).is_err());
    // A token grid the MSFA cannot pool to (48 is not a multiple of 10).
    let mut c = good;
    c["vision_soft_tokens_per_image"] = 100.into();
    let config = Gemma3nVisionConfig::from_hf_config(&c).unwrap();
    let loader = Loader {
        source: &folder,
        layout: WeightLayout::HuggingFace { prefix: "model." },
    };
    assert!(Gemma3nVision::load(config, &loader, "model.").is_err());
}

/// The committed clip's log-mel features (the reference feature extractor's, from
/// fixtures/audio), as `[frames, 128]`.
fn clip_features(path: &str) -> Vec<f32> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/audio");
    let stem = std::path::Path::new(path)
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap();
    let audio_ref: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("reference.json")).unwrap())
            .unwrap();
    let clip = audio_ref["clips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == stem)
        .unwrap_or_else(|| panic!("no features for {stem}"));
    std::fs::read(root.join(clip["features"].as_str().unwrap()))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Logits at every position of the three chat prompts (image only; two images and text; image,
/// text, audio, text), the media entering the decoder as soft tokens: each image's 256 tokens
/// on its `<image_soft_token>` run, `<end_of_image>` and `<end_of_audio>` through their
/// embedders' hard paths, the clip's 16 audio tokens on its run. Causal throughout (Gemma 3n
/// has no bidirectional image mask).
#[test]
fn logits_match_transformers_for_image_prompts() {
    use gemma_models::{load_model, Gemma3nAudio, KvCache, Logits, SoftTokens};
    const LOGITS_TOLERANCE: f32 = 1e-2;
    let r = reference();
    let folder = HfFolder::open(&fixture_dir()).unwrap();
    let vision = Gemma3nVision::from_hf(&folder).unwrap();
    let audio = Gemma3nAudio::from_hf(&folder).unwrap();
    let model = load_model(&gemma_formats::ModelFile::Hf(folder)).expect("decoder");
    let vc = vision.config().clone();
    let ac = audio.config().clone();
    let vocab = r["vocab_size"].as_u64().unwrap() as usize;
    let eoi = vision.embed_hard(&[vc.eoi_token_id]).unwrap();
    let eoa = audio.embed_hard(&[ac.eoa_token_id]).unwrap();
    for (kind, p) in r["prompts"].as_object().unwrap() {
        let ids: Vec<u32> = p["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let images: Vec<Vec<f32>> = p["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|name| {
                vision
                    .encode_image(&pixels(&r, name.as_str().unwrap()))
                    .unwrap()
            })
            .collect();
        let clips: Vec<Vec<f32>> = p["audio"]
            .as_array()
            .unwrap()
            .iter()
            .map(|path| {
                audio
                    .encode_clip(&clip_features(path.as_str().unwrap()))
                    .unwrap()
            })
            .collect();
        let mut soft = Vec::new();
        let (mut next_image, mut next_clip) = (0, 0);
        let mut i = 0;
        while i < ids.len() {
            let id = ids[i];
            if id == vc.image_token_id || id == ac.audio_token_id {
                let run = ids[i..].iter().take_while(|&&t| t == id).count();
                let embeds = if id == vc.image_token_id {
                    next_image += 1;
                    &images[next_image - 1]
                } else {
                    next_clip += 1;
                    &clips[next_clip - 1]
                };
                assert_eq!(
                    run * vc.text_hidden_size,
                    embeds.len(),
                    "{kind}: run at {i}"
                );
                soft.push(SoftTokens {
                    offset: i,
                    embeds,
                    bidirectional: false,
                });
                i += run;
                continue;
            }
            if id == vc.eoi_token_id || id == ac.eoa_token_id {
                soft.push(SoftTokens {
                    offset: i,
                    embeds: if id == vc.eoi_token_id { &eoi } else { &eoa },
                    bidirectional: false,
                });
            }
            i += 1;
        }
        assert_eq!(
            (next_image, next_clip),
            (images.len(), clips.len()),
            "{kind}"
        );
        let mut cache: KvCache = model.new_cache(ids.len() + 8).unwrap();
        let logits = model
            .forward_embeds(&ids, &soft, &mut cache, Logits::All)
            .unwrap()
            .to_vec();
        let want = read_f32(p["logits"].as_str().unwrap());
        assert_eq!(shape(&p["logits_shape"]), vec![ids.len(), vocab]);
        assert_eq!(logits.len(), want.len());
        let diff = max_diff(&logits, &want);
        eprintln!("{kind}: logits max |diff| {diff:.2e}");
        assert!(diff < LOGITS_TOLERANCE, "{kind}: logits differ by {diff}");
    }
}

/// The fixture as llama.cpp's `convert_hf_to_gguf.py --mmproj` lays it out (names and shapes
/// checked against the converter's output for this fixture: `v.*` with `blocks.` → `blk.`, the
/// stem bias `[1, 64, 1, 1]`, `mm.embedding`, `mm.hard_emb_norm`, `mm.soft_emb_norm`,
/// `mm.input_projection`, values unchanged), in memory.
fn fixture_as_mmproj(projector: &str) -> gemma_formats::GgufFile {
    use gemma_formats::{GgufWriter, MetaValue};
    let folder = HfFolder::open(&fixture_dir()).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in [
        ("general.architecture", MetaValue::String("clip".into())),
        ("clip.has_vision_encoder", MetaValue::Bool(true)),
        (
            "clip.vision.projector_type",
            MetaValue::String(projector.into()),
        ),
        ("clip.vision.image_size", MetaValue::U32(768)),
        ("clip.vision.patch_size", MetaValue::U32(3)),
        ("clip.vision.embedding_length", MetaValue::U32(2048)),
        ("clip.vision.projection_dim", MetaValue::U32(32)),
        (
            "clip.vision.attention.layer_norm_epsilon",
            MetaValue::F32(1e-6),
        ),
    ] {
        w.add_metadata(k, v).unwrap();
    }
    let mut names = folder.tensor_names();
    names.sort();
    for name in names {
        let t = folder.tensor(&name).unwrap();
        let (new, shape) = if let Some(rest) = name.strip_prefix("model.vision_tower.timm_model.") {
            let new = match rest.strip_prefix("blocks.") {
                Some(b) => format!("v.blk.{b}"),
                None => format!("v.{rest}"),
            };
            // Gammas as llama.cpp's graph wants them (the converter leaves them [C]; both load).
            let shape = if rest == "conv_stem.conv.bias" || rest.ends_with("layer_scale.gamma") {
                vec![1, t.shape[0], 1, 1]
            } else {
                t.shape.clone()
            };
            (new, shape)
        } else if let Some(rest) = name.strip_prefix("model.embed_vision.") {
            let new = match rest {
                "embedding.weight" => "mm.embedding.weight",
                "hard_embedding_norm.weight" => "mm.hard_emb_norm.weight",
                "soft_embedding_norm.weight" => "mm.soft_emb_norm.weight",
                "embedding_projection.weight" => "mm.input_projection.weight",
                other => panic!("unexpected {other}"),
            };
            (new.to_string(), t.shape.clone())
        } else {
            continue;
        };
        w.add_tensor(new, t.dtype, &shape, t.data.bytes().to_vec())
            .unwrap();
    }
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    gemma_formats::GgufFile::from_bytes(std::sync::Arc::new(bytes)).unwrap()
}

#[test]
fn mmproj_gguf_gives_the_same_tokens() {
    let r = reference();
    let px = pixels(&r, r["tower"]["image"].as_str().unwrap());
    let hf = load();
    let gguf = fixture_as_mmproj("gemma3nv");
    let v = Gemma3nVision::from_gguf(&gguf).unwrap();
    let c = v.config();
    assert_eq!(
        (c.image_size, c.tokens_per_image, c.text_hidden_size),
        (768, 256, 32)
    );
    assert_eq!((c.vocab_size, c.hidden_size), (128, 2048));
    // The mmproj has no ids: the published ones.
    assert_eq!(c.vocab_offset, 262_144);
    assert_eq!(v.stage_depths(), hf.stage_depths());
    assert_eq!(v.weight_bytes(), hf.weight_bytes());
    let soft = v.encode_image(&px).unwrap();
    assert_eq!(soft, hf.encode_image(&px).unwrap());
    let want = read_f32(r["tower"]["soft_tokens"].as_str().unwrap());
    assert!(max_diff(&soft, &want) < 1e-3);
    assert_eq!(
        v.embed_hard(&[262_144 + 5]).unwrap(),
        hf.embed_hard(&[256 + 5]).unwrap()
    );
    // Another projector type is an error.
    let err = Gemma3nVision::from_gguf(&fixture_as_mmproj("gemma3"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("gemma3nv"), "{err}");
}

/// With `GEMMA3N_VISION_MMPROJ=FILE`: llama.cpp's own conversion of this fixture
/// (`convert_hf_to_gguf.py --mmproj` on a copy of fixtures/gemma3n_vision_tiny without
/// `model.audio_tower.*`, which that converter cannot map for transformers 5 names) gives the
/// reference soft tokens (within 1e-2: the converter may store the projection as f16).
#[test]
fn llama_cpp_mmproj_when_given() {
    let Ok(path) = std::env::var("GEMMA3N_VISION_MMPROJ") else {
        eprintln!("GEMMA3N_VISION_MMPROJ not set: skipped");
        return;
    };
    let r = reference();
    let px = pixels(&r, r["tower"]["image"].as_str().unwrap());
    let gguf = gemma_formats::GgufFile::open(std::path::Path::new(&path)).unwrap();
    let v = Gemma3nVision::from_gguf(&gguf).unwrap();
    let want = read_f32(r["tower"]["soft_tokens"].as_str().unwrap());
    let d = max_diff(&v.encode_image(&px).unwrap(), &want);
    eprintln!("llama.cpp mmproj: soft tokens max |diff| {d:e}");
    assert!(d < 1e-2, "soft tokens differ by {d}");
}
