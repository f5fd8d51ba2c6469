//! Turning a path (GGUF file or Hugging Face folder) into model + tokenizer + chat template.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use gemma_formats::{open_model_source, ModelFile};
use gemma_models::{interleave_decoder_weights, load_model, CacheType, Model};
use gemma_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

use crate::audio::Hearing;
use crate::default_model::ensure_default_model;
use crate::vision::{Vision, VisionFamily};

/// The GGUF key llama.cpp uses for the vocabulary; its absence means "no tokenizer".
const GGUF_TOKENS_KEY: &str = "tokenizer.ggml.tokens";
const GGUF_CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";
const END_OF_TURN: &str = "<end_of_turn>";

/// Metadata arrays longer than this are freed once the model is loaded (Ollama's `show`
/// leaves out the same ones).
pub const ELIDED_ARRAY_LEN: usize = 64;

/// Prompt tokens per forward pass unless told otherwise (llama.cpp's `-b` default).
pub const DEFAULT_BATCH_SIZE: usize = 512;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Context size the caller plans to use; only for the memory report.
    pub ctx_size: usize,
    /// Print a spinner (on a terminal) and a one-line memory summary to stderr.
    pub verbose: bool,
    /// How every KV cache made for this model stores keys and values (default f16, as
    /// llama.cpp).
    pub cache_type: CacheType,
    /// Prompt tokens per forward pass for sessions and perplexity (at least 1).
    pub batch_size: usize,
    /// Whether a GGUF model's weights are read from the file mapping or copied into memory.
    pub weights: WeightMemory,
    /// llama.cpp's mmproj GGUF holding the vision tower of a text GGUF (`--mmproj`).
    pub mmproj: Option<PathBuf>,
    /// Store Gemma 3n's audio-encoder matrices as this type when the tower is read (`None`:
    /// as the checkpoint stores them). See `UsmEncoder::requantize`.
    pub audio_weights: Option<gemma_formats::GgmlType>,
    /// `--vision-cache`: a video or camera frame whose preprocessed pixels differ from the last
    /// encoded one by less than this many 8-bit levels on average reuses its encoding (see
    /// [`FrameReuse`](crate::vision::FrameReuse)). `None`: every frame is encoded.
    pub vision_cache: Option<f32>,
    /// Whether the model will generate token by token (the default). Then a GGUF's decoder
    /// matrices are stored in the decode kernels' interleaved layout, copied out of the file
    /// mapping. A safety classifier only ever runs prompts (its checks are batches of a window
    /// and the policies' ~100-token suffixes): `false` keeps the file's row-major layout,
    /// which the int8 GEMM reads directly (a ShieldGemma 2B-shape check ~20 % faster) and
    /// which stays in the mapping.
    pub decodes: bool,
}

/// Where a GGUF model's weights live while it runs (llama.cpp's `--mmap` / `--no-mmap`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightMemory {
    /// `Resident` for architectures that read every weight for every token (Gemma 2 and 3);
    /// `Mapped` for Gemma 3n, whose per-layer embeddings are read a row per token and whose
    /// other weights may go unused.
    #[default]
    Auto,
    /// Read in place from the memory-mapped file: loads fastest, shares the page cache with
    /// other processes, and lets the OS drop pages under memory pressure.
    Mapped,
    /// Copied into memory of the process's own, in huge pages where the OS allows: decoding,
    /// which streams every weight per token, runs faster (see `formats/src/resident.rs`).
    Resident,
}

impl WeightMemory {
    /// Whether a GGUF file of architecture `arch` is copied into memory.
    pub fn resident_for(self, arch: &str) -> bool {
        match self {
            WeightMemory::Auto => matches!(arch, "gemma2" | "gemma3"),
            WeightMemory::Mapped => false,
            WeightMemory::Resident => true,
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            ctx_size: 4096,
            verbose: false,
            cache_type: CacheType::F16,
            batch_size: DEFAULT_BATCH_SIZE,
            weights: WeightMemory::Auto,
            mmproj: None,
            audio_weights: None,
            vision_cache: None,
            decodes: true,
        }
    }
}

/// Everything needed to run a model.
pub struct LoadedModel {
    pub model: Model,
    /// `None` for checkpoints shipped without one (some test fixtures); such models can still
    /// be run on token ids.
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: ChatTemplate,
    pub source: PathBuf,
    /// The opened file or folder (metadata and tensor table for `gemma info`).
    pub file: ModelFile,
    /// Prompt tokens per forward pass (`LoadOptions::batch_size`).
    pub batch_size: usize,
    /// The image side, for models with a vision tower (read on the first image).
    pub vision: Option<Vision>,
    /// The audio side, for models with an audio tower (read on the first clip).
    pub audio: Option<Hearing>,
    /// Pretrained or instruction-tuned, as far as the files tell ([`Tuning::detect`]).
    pub tuning: Tuning,
    /// A name for messages: the file's `general.name` (GGUF) or the file or folder name.
    pub display_name: String,
}

/// What a checkpoint was trained to do, as far as its files tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tuning {
    /// Pretrained only: it continues text and does not follow instructions (the default
    /// model, Gemma 3 270M, is one).
    Base,
    /// Instruction-tuned, or at least shipped with a chat template: it answers turns.
    Instruct,
}

impl Tuning {
    /// Words in a model's name that mark an instruction-tuned checkpoint (`gemma-3-1b-it`,
    /// `...-Instruct`, `...-chat`).
    const INSTRUCT_WORDS: [&'static str; 7] = [
        "it",
        "instruct",
        "instruction",
        "chat",
        "sft",
        "dpo",
        "rlhf",
    ];

    /// A chat template in the file marks a model made for turns (converters copy it from
    /// instruction-tuned checkpoints); without one, the names decide: an instruct word in any
    /// of them (split at non-alphanumerics, case-insensitive) marks it, and otherwise it is a
    /// base model.
    pub fn detect(has_chat_template: bool, names: &[&str]) -> Tuning {
        if has_chat_template {
            return Tuning::Instruct;
        }
        let instruct = names.iter().any(|name| {
            name.to_lowercase()
                .split(|c: char| !c.is_alphanumeric())
                .any(|word| Self::INSTRUCT_WORDS.contains(&word) || word.ends_with("instruct"))
        });
        if instruct {
            Tuning::Instruct
        } else {
            Tuning::Base
        }
    }

    /// `base (pretrained)` or `instruction-tuned`.
    pub fn describe(self) -> &'static str {
        match self {
            Tuning::Base => "base (pretrained)",
            Tuning::Instruct => "instruction-tuned",
        }
    }
}

impl LoadedModel {
    /// Whether the weights were copied into memory ([`WeightMemory::Resident`]) rather than
    /// read from the file mapping.
    pub fn weights_resident(&self) -> bool {
        matches!(&self.file, ModelFile::Gguf(gguf) if gguf.is_resident())
    }
}

/// Loads the model at `path`, or the default model (fetched if needed) when `path` is `None`.
pub fn load(path: Option<&Path>, opts: &LoadOptions) -> Result<LoadedModel> {
    if opts.batch_size == 0 {
        bail!("the batch size must be at least 1");
    }
    let source = match path {
        Some(p) => p.to_path_buf(),
        None => ensure_default_model()?,
    };
    let spinner = opts.verbose.then(|| Spinner::start(&source));
    let mut progress = |done: usize, total: usize| {
        if let Some(s) = &spinner {
            s.bytes(done, total);
        }
    };
    let loaded = load_from(
        &source,
        opts.weights,
        opts.mmproj.as_deref(),
        opts.decodes,
        &mut progress,
    );
    drop(spinner);
    let mut loaded = loaded.with_context(|| format!("cannot load {}", source.display()))?;
    loaded
        .model
        .set_cache_type(opts.cache_type)
        .context("--cache-type")?;
    loaded.batch_size = opts.batch_size;
    if let Some(v) = &mut loaded.vision {
        v.verbose = opts.verbose;
        if let Some(t) = opts.vision_cache {
            if !(t.is_finite() && t >= 0.0) {
                bail!("--vision-cache threshold must be a number of levels ≥ 0, not {t}");
            }
            v.reuse = Some(crate::vision::FrameReuse::new(t));
        }
    }
    if let Some(a) = &mut loaded.audio {
        a.verbose = opts.verbose;
        a.weights = opts.audio_weights;
    }
    if opts.verbose {
        eprintln!(
            "gemma: {} ({}): weights {} {}{}, KV cache {} ({}) at --ctx-size {}",
            source.display(),
            loaded.model.architecture(),
            human_bytes(loaded.model.weight_bytes()),
            if loaded.weights_resident() {
                "in memory"
            } else {
                "memory-mapped"
            },
            match loaded.model.on_demand_bytes() {
                0 => String::new(),
                n => format!(" (+{} memory-mapped PLE)", human_bytes(n)),
            },
            human_bytes(loaded.model.kv_cache_bytes(opts.ctx_size)),
            opts.cache_type,
            opts.ctx_size
        );
    }
    Ok(loaded)
}

/// `progress(copied, total)` follows the copy of the weights into memory, when there is one.
fn load_from(
    source: &Path,
    weights: WeightMemory,
    mmproj: Option<&Path>,
    decodes: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel> {
    let mut file = open_model_source(source)?;
    if let ModelFile::Gguf(gguf) = &mut file {
        // An unreadable architecture is reported by `load_model` below.
        if weights.resident_for(gguf.architecture().unwrap_or_default()) {
            gguf.make_resident_with_progress(progress)?;
        }
        // The decode kernels' layout, in place (resident) or moved out of the mapping.
        if decodes {
            interleave_decoder_weights(gguf)?;
        }
    }
    let model = load_model(&file)?;
    let tokenizer = load_tokenizer(&file)?;
    let (chat_template, template_in_file) = load_chat_template(&file, tokenizer.as_ref())?;
    let (tuning, display_name) = identify(&file, source, template_in_file);
    // Gemma 3's SigLIP tower, Gemma 3n's MobileNet-V5 tower.
    let mut vision = match model.architecture() {
        "gemma3" => Vision::detect_family(&file, mmproj, VisionFamily::Gemma3)?,
        "gemma3n" => Vision::detect_family(&file, mmproj, VisionFamily::Gemma3n)?,
        arch => {
            if mmproj.is_some() {
                let family = match arch {
                    "gemma2" => "Gemma 2, a text-only model",
                    other => other,
                };
                bail!("--mmproj adds a vision tower to Gemma 3 or Gemma 3n; this is {family}");
            }
            None
        }
    };
    if let Some(c) = vision.as_ref().and_then(|v| v.config3n()) {
        if c.text_hidden_size != model.hidden_size() {
            bail!(
                "the vision tower's text width {} does not match the decoder's {}",
                c.text_hidden_size,
                model.hidden_size()
            );
        }
    }
    let audio = Hearing::detect(&file)?;
    if let Some(a) = &audio {
        if a.config.text_vocab_size != model.vocab_size()
            || a.config.text_hidden_size != model.hidden_size()
        {
            bail!(
                "the audio tower's text sizes (vocabulary {}, width {}) do not match the \
                 decoder's ({}, {})",
                a.config.text_vocab_size,
                a.config.text_hidden_size,
                model.vocab_size(),
                model.hidden_size()
            );
        }
    }
    if let (Some(v), Some(t), ModelFile::Gguf(_)) = (&mut vision, &tokenizer, &file) {
        // A text GGUF names its image tokens only in its vocabulary.
        let ids = &mut v.ids;
        ids.boi = t.token_id("<start_of_image>").unwrap_or(ids.boi);
        ids.eoi = t.token_id("<end_of_image>").unwrap_or(ids.eoi);
        ids.image = t.token_id("<image_soft_token>").unwrap_or(ids.image);
    }
    if let Some(v) = &vision {
        if v.ids.image as usize >= model.vocab_size() {
            bail!(
                "the image token {} is outside this model's vocabulary ({} tokens): is the \
                 vision tower for this model?",
                v.ids.image,
                model.vocab_size()
            );
        }
    }
    let mut file = file;
    if let ModelFile::Gguf(gguf) = &mut file {
        // Everything that reads the vocabulary arrays (the tokenizer, the image token ids) is
        // built: the file's copy of them goes (about 30 MB for Gemma's vocabulary).
        gguf.elide_long_arrays(ELIDED_ARRAY_LEN);
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        source: source.to_path_buf(),
        file,
        batch_size: DEFAULT_BATCH_SIZE,
        vision,
        audio,
        tuning,
        display_name,
    })
}

/// The model's tuning ([`Tuning::detect`] over its metadata names and its file or folder
/// name) and its display name.
fn identify(file: &ModelFile, source: &Path, template_in_file: bool) -> (Tuning, String) {
    let file_name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut names: Vec<String> = vec![file_name.clone()];
    let mut display = None;
    match file {
        ModelFile::Gguf(gguf) => {
            for key in ["general.name", "general.finetune", "general.basename"] {
                if let Ok(Some(value)) = gguf.get_str(key) {
                    names.push(value.to_owned());
                    if key == "general.name" && !value.trim().is_empty() {
                        display = Some(value.trim().to_owned());
                    }
                }
            }
        }
        ModelFile::Hf(folder) => {
            if let Some(name) = folder
                .config()
                .get("_name_or_path")
                .and_then(|v| v.as_str())
            {
                names.push(name.to_owned());
            }
        }
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let tuning = Tuning::detect(template_in_file, &refs);
    (tuning, display.unwrap_or(file_name))
}

fn load_tokenizer(file: &ModelFile) -> Result<Option<Tokenizer>> {
    match file {
        ModelFile::Gguf(gguf) => {
            if gguf.get(GGUF_TOKENS_KEY).is_none() {
                return Ok(None);
            }
            let tokenizer = Tokenizer::from_gguf(gguf).context("reading the GGUF tokenizer")?;
            Ok(Some(tokenizer))
        }
        ModelFile::Hf(folder) => {
            let Some(path) = folder.tokenizer_json_path() else {
                return Ok(None);
            };
            let config = folder.tokenizer_config();
            let tokenizer = Tokenizer::from_hf_file(&path, config.as_ref())
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(Some(tokenizer))
        }
    }
}

/// The file's own template if it has one (and `true`), else the built-in Gemma 3 template.
fn load_chat_template(
    file: &ModelFile,
    tokenizer: Option<&Tokenizer>,
) -> Result<(ChatTemplate, bool)> {
    let source = match file {
        ModelFile::Gguf(gguf) => gguf
            .get_str(GGUF_CHAT_TEMPLATE_KEY)
            .context("reading the GGUF chat template")?
            .map(str::to_owned),
        ModelFile::Hf(folder) => folder.chat_template(),
    };
    let Some(source) = source else {
        return Ok((ChatTemplate::gemma3_builtin(), false));
    };
    let bos = special_text(tokenizer, |t| t.bos_id()).unwrap_or_default();
    let eos = special_text(tokenizer, |t| t.eos_id()).unwrap_or_default();
    let template =
        ChatTemplate::new(&source, &bos, &eos).context("parsing the model's chat template")?;
    Ok((template, true))
}

/// The text of a special token such as BOS, as templates write it.
fn special_text(
    tokenizer: Option<&Tokenizer>,
    which: impl Fn(&Tokenizer) -> Option<u32>,
) -> Option<String> {
    let t = tokenizer?;
    let bytes = t.token_bytes(which(t)?)?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

impl LoadedModel {
    fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .context("this model has no tokenizer, so text cannot be turned into tokens")
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.tokenizer.as_ref().and_then(|t| t.bos_id())
    }

    /// Tokens that end a generated turn: the model's list plus the tokenizer's EOS and
    /// `<end_of_turn>`.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = self.model.stop_token_ids();
        if let Some(t) = &self.tokenizer {
            ids.extend(t.eos_id());
            ids.extend(t.token_id(END_OF_TURN));
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Tokenizes a whole prompt: special tokens are parsed, and BOS is added when the
    /// tokenizer asks for it unless the text already starts with it (templates write it).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let t = self.tokenizer()?;
        let bos_text = special_text(Some(t), |t| t.bos_id());
        let has_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(&b));
        Ok(t.encode(text, t.add_bos_default() && !has_bos, true)?)
    }

    /// Tokenizes text that continues an existing sequence (no BOS).
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer()?.encode(text, false, true)?)
    }

    /// The text of one token as it appears in a rendered template (special tokens included).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .as_ref()
            .and_then(|t| t.decode(&[id], false).ok())
            .unwrap_or_default()
    }

    /// Renders a conversation with the chat template, ending with the generation prompt.
    pub fn render_chat(&self, system: Option<&str>, messages: &[ChatMessage]) -> Result<String> {
        let mut all = Vec::with_capacity(messages.len() + 1);
        if let Some(system) = system {
            all.push(ChatMessage {
                role: "system".into(),
                content: system.into(),
            });
        }
        all.extend_from_slice(messages);
        Ok(self.chat_template.render(&all, true)?)
    }
}

/// "241.1 MiB" style sizes.
pub fn human_bytes(n: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// What loading is doing, on a terminal's stderr: a spinner, then a byte bar while the weights
/// are copied into memory. Nothing is drawn for loads under a second (most of them).
struct Spinner {
    bar: Option<indicatif::ProgressBar>,
}

impl Spinner {
    /// Loads shorter than this draw nothing.
    const QUIET_FOR: Duration = Duration::from_secs(1);

    fn start(source: &Path) -> Spinner {
        if !std::io::stderr().is_terminal() {
            return Spinner { bar: None };
        }
        let bar =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::hidden());
        bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {msg}").expect("valid"));
        bar.set_message(format!("loading {}", source.display()));
        bar.enable_steady_tick(Duration::from_millis(100));
        // Shown once the load has taken a second (the timer thread ends with the load).
        let shown = bar.downgrade();
        std::thread::spawn(move || {
            std::thread::sleep(Self::QUIET_FOR);
            if let Some(bar) = shown.upgrade() {
                if !bar.is_finished() {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                }
            }
        });
        Spinner { bar: Some(bar) }
    }

    /// The weights' copy into memory: `done` of `total` bytes.
    fn bytes(&self, done: usize, total: usize) {
        let Some(bar) = &self.bar else { return };
        if bar.length() != Some(total as u64) {
            bar.set_length(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .expect("valid")
                .progress_chars("=> "),
            );
            bar.set_message("copying the weights into memory");
        }
        bar.set_position(done as u64);
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_a_readable_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(250 * 1024 * 1024), "250.0 MiB");
    }
}

#[cfg(test)]
mod tuning_tests {
    use super::Tuning;

    #[test]
    fn names_and_templates_decide_the_tuning() {
        // The default model: no template, names without an instruct word.
        let default = ["gemma3-270m-q4_k_m.gguf", "Gemma 3 270m", "gemma-3"];
        assert_eq!(Tuning::detect(false, &default), Tuning::Base);
        assert_eq!(Tuning::detect(true, &default), Tuning::Instruct);
        for name in [
            "gemma-3-270m-it-Q4_K_M.gguf",
            "Gemma 3 1b It",
            "Qwen2.5-0.5B-Instruct",
            "mistral-7b-instruct-v0.2.Q4_0.gguf",
            "tinyllama-chat",
        ] {
            assert_eq!(Tuning::detect(false, &[name]), Tuning::Instruct, "{name}");
        }
        // Words that merely contain "it" or "chat" are not markers.
        for name in [
            "gemma-3-4b-pt",
            "italian-poetry-base",
            "chatter-box",
            "unit-test",
        ] {
            assert_eq!(Tuning::detect(false, &[name]), Tuning::Base, "{name}");
        }
    }
}
