//! Fuzz targets: one function per parser of untrusted input. Each takes arbitrary bytes, feeds
//! them to the parser and then to whatever consumes a successful parse, and ignores errors; it
//! must never panic, hang or allocate without bound.
//!
//! The same functions are driven two ways:
//! - on stable Rust by `tests/fuzz.rs` (part of `cargo test --release --workspace`): the seed
//!   corpus in `corpus/<target>/`, then a seeded mutation loop ([`driver`]) for
//!   `GEMMA_FUZZ_SECONDS` (default 6) per target;
//! - by libFuzzer from `fuzz/` at the repository root: `cargo +nightly fuzz run <target>`.

pub mod driver;

use std::path::PathBuf;
use std::sync::Arc;

use gemma_formats::{GgufFile, HfFolder, MetaValue, ModelFile, TensorSource};
use gemma_media::{FrameSampling, ImageLimits, Preprocess, VideoLimits, VideoSource};
use gemma_tokenizer::{ChatMessage, ChatTemplate, HfTokenizer, Tokenizer};

/// A fuzz target: its name (the corpus folder and the cargo-fuzz binary) and its function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, in the order the test runs them.
pub const TARGETS: &[Target] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("safetensors_index", safetensors_index),
    ("config_json", config_json),
    ("tokenizer_json", tokenizer_json),
    ("chat_template", chat_template),
    ("request_json", request_json),
    ("ollama_request", ollama_request),
    ("responses_request", responses_request),
    ("data_url", data_url),
    ("image", image),
    ("animation", animation),
    ("json_schema", json_schema),
    ("audio", audio),
];

fn touch(value: &MetaValue) -> usize {
    match value {
        MetaValue::Array(items) => items.iter().map(touch).sum::<usize>() + 1,
        MetaValue::String(s) => s.len(),
        other => other.type_name().len(),
    }
}

/// A GGUF file: the reader and every accessor, then the GGUF tokenizer, the decoder loader and
/// the vision-tower (mmproj) loader on whatever parses.
pub fn gguf(data: &[u8]) {
    let Ok(file) = GgufFile::from_bytes(Arc::new(data.to_vec())) else {
        return;
    };
    let mut checksum = file.version() as usize + file.alignment() + file.file_size();
    for (key, value) in file.metadata() {
        checksum += touch(value);
        assert!(file.get(key).is_some(), "listed key {key:?} is missing");
        // Typed getters return Ok or a typed error, whatever the stored type.
        let _ = file.get_str(key);
        let _ = file.get_u64(key);
        let _ = file.get_f32(key);
        let _ = file.get_bool(key);
        let _ = file.get_str_array(key);
        let _ = file.get_f32_array(key);
        let _ = file.get_i64_array(key);
    }
    let _ = file.architecture();
    for info in file.tensors() {
        let blob = file.tensor_data(info);
        assert_eq!(blob.len(), info.n_bytes);
        checksum += blob.iter().map(|&b| b as usize).sum::<usize>();
        let tensor = file.tensor(&info.name).expect("listed tensor is present");
        assert_eq!(tensor.shape, info.shape);
    }
    std::hint::black_box(checksum);
    if let Ok(tokenizer) = Tokenizer::from_gguf(&file) {
        if let Ok(ids) = tokenizer.encode("Hello <start_of_turn>world\n\n", true, true) {
            let _ = tokenizer.decode(&ids, false);
        }
    }
    let _ = gemma_models::Gemma3Vision::load_gguf(&file);
    let _ = gemma_models::load_model(&ModelFile::Gguf(file));
}

/// Where the targets whose parser reads files write them: one folder per process.
pub fn scratch_root() -> PathBuf {
    std::env::temp_dir().join(format!("gemma-fuzz-{}", std::process::id()))
}

fn scratch_dir(target: &str) -> PathBuf {
    let dir = scratch_root().join(target);
    std::fs::create_dir_all(&dir).expect("cannot create the fuzz scratch folder");
    dir
}

fn touch_folder(folder: &HfFolder) {
    let mut checksum = folder.shard_paths().len();
    for name in folder.tensor_names() {
        let tensor = folder.tensor(&name).expect("listed tensor is present");
        checksum += tensor.shape.iter().sum::<usize>();
    }
    std::hint::black_box(checksum);
}

/// `model.safetensors` (header and data) in a Hugging Face folder.
pub fn safetensors(data: &[u8]) {
    let dir = scratch_dir("safetensors");
    std::fs::write(dir.join("config.json"), b"{}").expect("write config.json");
    std::fs::write(dir.join("model.safetensors"), data).expect("write model.safetensors");
    if let Ok(folder) = HfFolder::open(&dir) {
        touch_folder(&folder);
    }
}

/// A safetensors file holding one tensor `name` of `dtype` and `shape` (data zero-filled).
pub fn safetensors_file(name: &str, dtype: &str, shape: &[usize], elem_bytes: usize) -> Vec<u8> {
    let n_bytes = elem_bytes * shape.iter().product::<usize>();
    let header = serde_json::json!({
        name: {"dtype": dtype, "shape": shape, "data_offsets": [0, n_bytes]}
    })
    .to_string();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + n_bytes, 0);
    out
}

/// `model.safetensors.index.json` next to two small valid shards (`a` in the first, `b` in
/// the second).
pub fn safetensors_index(data: &[u8]) {
    let dir = scratch_dir("safetensors_index");
    std::fs::write(dir.join("config.json"), b"{}").expect("write config.json");
    let shards = [
        ("model-00001-of-00002.safetensors", "a", "F32", 4),
        ("model-00002-of-00002.safetensors", "b", "F16", 2),
    ];
    for (file, tensor, dtype, elem_bytes) in shards {
        if !dir.join(file).exists() {
            let bytes = safetensors_file(tensor, dtype, &[2, 3], elem_bytes);
            std::fs::write(dir.join(file), bytes).expect("write shard");
        }
    }
    std::fs::write(dir.join("model.safetensors.index.json"), data).expect("write index");
    if let Ok(folder) = HfFolder::open(&dir) {
        touch_folder(&folder);
    }
}

/// `config.json` as read by each architecture's config (`validate()` included).
pub fn config_json(data: &[u8]) {
    let Ok(root) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let _ = gemma_models::Gemma2Config::from_hf_config(&root);
    let _ = gemma_models::Gemma3Config::from_hf_config(&root);
    let _ = gemma_models::Gemma3nConfig::from_hf_config(&root);
    let _ = gemma_models::Gemma3VisionConfig::from_hf_config(&root);
}

/// `tokenizer.json` (with and without a `tokenizer_config.json`), then a round trip.
pub fn tokenizer_json(data: &[u8]) {
    let config = serde_json::json!({"bos_token": "<bos>", "eos_token": "<eos>"});
    for config in [None, Some(&config)] {
        let Ok(hf) = HfTokenizer::from_bytes(data, config) else {
            continue;
        };
        let tokenizer = Tokenizer::Hf(Box::new(hf));
        for parse_special in [false, true] {
            if let Ok(ids) = tokenizer.encode("Hi <bos> there\n\n ünï", true, parse_special) {
                let _ = tokenizer.decode(&ids, false);
                let _ = tokenizer.decode(&ids, true);
            }
        }
    }
}

/// A Jinja chat template: compiled, then rendered on a small conversation.
pub fn chat_template(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(template) = ChatTemplate::new(source, "<bos>", "<eos>") else {
        return;
    };
    let conversation = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello!"),
        ChatMessage::new("user", "  Bye  "),
    ];
    for messages in [&conversation[..], &conversation[1..2], &[]] {
        let _ = template.render(messages, true);
        let _ = template.render(messages, false);
    }
}

/// A request body of `/v1/chat/completions` or `/v1/completions`.
pub fn request_json(data: &[u8]) {
    use gemma_server::api::{ChatCompletionRequest, CompletionRequest};
    if let Ok(request) = serde_json::from_slice::<ChatCompletionRequest>(data) {
        std::hint::black_box(format!("{request:?}").len());
    }
    if let Ok(request) = serde_json::from_slice::<CompletionRequest>(data) {
        std::hint::black_box(format!("{request:?}").len());
    }
}

/// A request body of Ollama's `/api/chat`, `/api/generate` or `/api/show`, parsed and turned
/// into the server's own requests as the handlers do before any model work.
pub fn ollama_request(data: &[u8]) {
    use gemma_server::ollama::{
        to_chat_request, to_generate_request, OllamaChatRequest, OllamaGenerateRequest,
        OllamaShowRequest,
    };
    if let Ok(request) = serde_json::from_slice::<OllamaChatRequest>(data) {
        std::hint::black_box(format!("{:?}", to_chat_request(request)).len());
    }
    if let Ok(request) = serde_json::from_slice::<OllamaGenerateRequest>(data) {
        std::hint::black_box(format!("{:?}", to_generate_request(request)).len());
    }
    if let Ok(request) = serde_json::from_slice::<OllamaShowRequest>(data) {
        std::hint::black_box(format!("{request:?}").len());
    }
}

/// A request body of `/v1/responses`, parsed and turned into the server's chat request.
pub fn responses_request(data: &[u8]) {
    use gemma_server::responses::{to_chat_request, ResponsesRequest};
    if let Ok(request) = serde_json::from_slice::<ResponsesRequest>(data) {
        std::hint::black_box(format!("{:?}", to_chat_request(&request)).len());
    }
}

/// A `data:` URL (as in an `image_url` part).
pub fn data_url(data: &[u8]) {
    let Ok(url) = std::str::from_utf8(data) else {
        return;
    };
    let _ = gemma_media::decode_data_url(url, 1 << 16);
}

fn small_image_limits() -> ImageLimits {
    ImageLimits {
        max_pixels: 1 << 20,
        max_side: 4096,
        max_alloc_bytes: 64 << 20,
    }
}

/// An image (JPEG, PNG, WebP, GIF, BMP): decoded under small limits, then preprocessed.
pub fn image(data: &[u8]) {
    let _ = gemma_media::probe_image(data);
    let Ok(img) = gemma_media::decode_image(data, &small_image_limits()) else {
        return;
    };
    let values = gemma_media::pixel_values(&img, &Preprocess::gemma3_with_size(16));
    assert_eq!(values.len(), 3 * 16 * 16);
}

/// An animated GIF or WebP (or a still image) sampled as a video, under tight limits.
pub fn animation(data: &[u8]) {
    let limits = VideoLimits {
        frame: small_image_limits(),
        max_total_pixels: 4 << 20,
        max_decoded_pixels: 16 << 20,
        max_folder_files: 16,
    };
    let sampling = FrameSampling {
        fps: 2.0,
        max_frames: 8,
        keyframes: true,
        ..FrameSampling::default()
    };
    let source = VideoSource::Animation(data.to_vec());
    if let Ok(frames) = gemma_media::sample_frames(&source, &sampling, &limits) {
        assert!(!frames.is_empty() && frames.len() <= 8);
    }
}

/// A JSON schema (`response_format`, a tool's `parameters`, `--json-schema`): normalized by
/// the server's rules, compiled to a grammar over one-byte tokens, and then walked for a few
/// dozen tokens (choices taken from the input's bytes), as generation would.
pub fn json_schema(data: &[u8]) {
    use gemma_server::GrammarCompiler;
    use toktrie::{ApproximateTokEnv, TokEnv};
    thread_local! {
        static COMPILER: (GrammarCompiler, TokEnv) = {
            let env = ApproximateTokEnv::single_byte_env();
            (GrammarCompiler::from_env(&env).expect("a byte-level compiler"), env)
        };
    }
    let Ok(schema) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(normalized) = gemma_server::schema::normalize(&schema, "fuzz_") {
        std::hint::black_box(normalized.into_document());
    }
    COMPILER.with(|(compiler, _env)| {
        let Ok(mut matcher) = compiler.json_schema(&schema) else {
            return;
        };
        for step in 0..48 {
            let Ok(mask) = matcher.compute_mask() else {
                return;
            };
            let allowed = mask.num_set();
            if allowed == 0 || matcher.is_stopped() {
                return;
            }
            let mut pick = data[step % data.len()] as usize % allowed;
            let mut token = None;
            mask.iter_set_entries(|t| {
                if token.is_none() {
                    if pick == 0 {
                        token = Some(t as u32);
                    } else {
                        pick -= 1;
                    }
                }
            });
            let Some(token) = token else {
                return;
            };
            if matcher.consume_token(token).is_err() {
                return;
            }
        }
    });
}

/// An audio file (WAV, FLAC, MP3, OGG/Vorbis) decoded under small limits, then its first
/// second through the log-mel front end; and the same bytes as raw 16-bit PCM.
pub fn audio(data: &[u8]) {
    use gemma_media::{decode_audio, log_mel, pcm16_to_audio, AudioLimits};
    let limits = AudioLimits {
        max_seconds: 4.0,
        max_bytes: 1 << 16,
    };
    if let Ok(audio) = decode_audio(data, &limits) {
        // 4 s at 16 kHz, plus the resampler's rounding.
        assert!(audio.samples_16k.len() <= 4 * 16_000 + 64);
        assert!(audio.samples_16k.iter().all(|x| x.is_finite()));
        let head = &audio.samples_16k[..audio.samples_16k.len().min(16_000)];
        let mel = log_mel(head);
        assert!(mel.features.iter().all(|x| x.is_finite()));
    }
    if let Some((&first, rest)) = data.split_first() {
        let rate = [8_000, 11_025, 16_000, 22_050, 44_100, 48_000, 0, 7][first as usize % 8];
        let channels = (first as usize >> 3) % 4;
        if let Ok(audio) = pcm16_to_audio(rest, rate, channels, &limits) {
            assert!(audio.samples_16k.iter().all(|x| x.is_finite()));
        }
    }
}
