//! `gemma_rs`: the Python face of gemma-rs.
//!
//! One [`Model`] holds an `Arc<LoadedModel>` (weights, tokenizer, chat template, vision tower)
//! shared by every call; each generation makes its own [`Session`] (KV cache), so any number
//! of Python threads can generate at once. Everything that computes runs with the GIL
//! released; the kernels' process-wide thread pool interleaves concurrent forward passes.
//! Text is produced by the same engine calls as `gemma run` (`Session::generate_with`,
//! `gemma_server::constrain::generate_json_with` for `json_schema=`), so the outputs match the
//! CLI's for the same options.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gemma_engine::audio::{AudioTask, AUDIO_MARKER};
use gemma_engine::gemma_formats::FormatError;
use gemma_engine::gemma_models::CacheType;
use gemma_engine::gemma_tokenizer::{ChatMessage, Tokenizer};
use gemma_engine::vision::IMAGE_MARKER;
use gemma_engine::{
    AudioOptions, ImageOptions, LoadOptions, LoadedModel, PreparedAudio, PreparedImage,
    SamplingParams, Session, SoftSpan, StopReason,
};
use gemma_server::GrammarCompiler;
use numpy::PyArray1;
use pyo3::create_exception;
use pyo3::exceptions::{
    PyFileNotFoundError, PyRuntimeError, PyRuntimeWarning, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyString};

create_exception!(
    gemma_rs,
    GemmaError,
    PyRuntimeError,
    "An error reported by the gemma-rs engine; the message is its whole cause chain."
);

/// Media files are read whole; the bound of `gemma run --image`.
const MAX_MEDIA_BYTES: u64 = 256 << 20;

/// How often a blocked call looks for a pending Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// Text pieces a stream may hold before generation waits for the reader.
const STREAM_BUFFER: usize = 64;

/// The engine's error as a Python exception: `FileNotFoundError` for a model path that does
/// not exist, else [`GemmaError`]; the message is the whole chain, as the CLI prints it.
fn engine_error(e: anyhow::Error) -> PyErr {
    let message = format!("{e:#}");
    let not_found = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<FormatError>(),
            Some(FormatError::NotFound { .. })
        )
    });
    if not_found {
        PyFileNotFoundError::new_err(message)
    } else {
        GemmaError::new_err(message)
    }
}

trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(engine_error)
    }
}

/// An image argument: a path (str or os.PathLike) or the file's bytes.
enum MediaArg {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

impl MediaArg {
    fn extract(obj: &Bound<'_, PyAny>) -> PyResult<MediaArg> {
        if let Ok(b) = obj.cast::<PyBytes>() {
            return Ok(MediaArg::Bytes(b.as_bytes().to_vec()));
        }
        if let Ok(b) = obj.cast::<PyByteArray>() {
            return Ok(MediaArg::Bytes(b.to_vec()));
        }
        obj.extract::<PathBuf>().map(MediaArg::Path).map_err(|_| {
            PyTypeError::new_err(format!(
                "an image is a path (str or os.PathLike) or bytes, not {}",
                obj.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })
    }

    fn describe(&self) -> String {
        match self {
            MediaArg::Path(p) => p.display().to_string(),
            MediaArg::Bytes(b) => format!("of {} bytes", b.len()),
        }
    }

    /// The file's bytes (read now for a path).
    fn bytes(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        Ok(match self {
            MediaArg::Bytes(b) => b.as_slice().into(),
            MediaArg::Path(p) => read_media(p)?.into(),
        })
    }

    /// Reads and preprocesses the image for `loaded`, as `gemma run --image` does.
    fn prepare(&self, loaded: &LoadedModel, opts: &ImageOptions) -> Result<PreparedImage> {
        loaded
            .prepare_image(&self.bytes()?, opts)
            .with_context(|| format!("image {}", self.describe()))
    }
}

impl MediaArg {
    /// Reads and prepares the audio clip for `loaded`, as `gemma run --audio` does.
    fn prepare_audio(&self, loaded: &LoadedModel) -> Result<PreparedAudio> {
        loaded
            .prepare_audio(&self.bytes()?, &AudioOptions::default())
            .with_context(|| format!("audio {}", self.describe()))
    }
}

fn read_media(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if len > MAX_MEDIA_BYTES {
        bail!(
            "{} is {len} bytes, above the {MAX_MEDIA_BYTES} byte limit for a media file",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn extract_images(images: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<MediaArg>> {
    let Some(images) = images.filter(|i| !i.is_none()) else {
        return Ok(Vec::new());
    };
    if images.is_instance_of::<PyString>() || images.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err(
            "images is a list of paths or bytes, not a single one",
        ));
    }
    images.try_iter()?.map(|i| MediaArg::extract(&i?)).collect()
}

/// `json_schema=`: a dict (or bool) schema, or its JSON text.
fn extract_schema(schema: Option<&Bound<'_, PyAny>>) -> PyResult<Option<serde_json::Value>> {
    let Some(schema) = schema.filter(|s| !s.is_none()) else {
        return Ok(None);
    };
    let text: String = if let Ok(s) = schema.cast::<PyString>() {
        s.to_str()?.to_owned()
    } else {
        let json = schema.py().import("json")?;
        json.call_method1("dumps", (schema,))?.extract()?
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| PyValueError::new_err(format!("json_schema is not valid JSON: {e}")))?;
    // The checks of `gemma run --json-schema` (references, recursion) before any work.
    gemma_server::schema::normalize(&value, "check_")
        .map_err(|e| PyValueError::new_err(format!("unsupported JSON schema: {e}")))?;
    Ok(Some(value))
}

/// One chat message with its images and audio clips, each kind in the order of its slots in
/// `content`.
struct Message {
    role: String,
    content: String,
    images: Vec<MediaArg>,
    audio: Vec<MediaArg>,
}

/// `[{"role": ..., "content": ...}]`; content is text or a list of parts
/// `{"type": "text", "text": ...}` / `{"type": "image", "image": path-or-bytes}` /
/// `{"type": "audio", "audio": path-or-bytes}` (Gemma 3n).
fn extract_messages(messages: &Bound<'_, PyAny>) -> PyResult<Vec<Message>> {
    let mut out = Vec::new();
    for (i, item) in messages.try_iter()?.enumerate() {
        let item = item?;
        let dict = item
            .cast::<PyDict>()
            .map_err(|_| PyTypeError::new_err(format!("messages[{i}] must be a dict")))?;
        let get = |key: &str| -> PyResult<Bound<'_, PyAny>> {
            dict.get_item(key)?
                .ok_or_else(|| PyValueError::new_err(format!("messages[{i}] has no {key:?} key")))
        };
        let role: String = get("role")?
            .extract()
            .map_err(|_| PyTypeError::new_err(format!("messages[{i}][\"role\"] must be a str")))?;
        let content = get("content")?;
        let mut message = Message {
            role,
            content: String::new(),
            images: Vec::new(),
            audio: Vec::new(),
        };
        if let Ok(text) = content.cast::<PyString>() {
            message.content = text.to_str()?.to_owned();
        } else {
            for (j, part) in content.try_iter()?.enumerate() {
                let part = part?;
                let where_ = format!("messages[{i}][\"content\"][{j}]");
                let part = part.cast::<PyDict>().map_err(|_| {
                    PyTypeError::new_err(format!("{where_} must be a dict with a \"type\""))
                })?;
                let kind: String = part
                    .get_item("type")?
                    .map(|t| t.extract())
                    .transpose()?
                    .unwrap_or_default();
                match kind.as_str() {
                    "text" => {
                        let text: String = part
                            .get_item("text")?
                            .ok_or_else(|| {
                                PyValueError::new_err(format!("{where_} has no \"text\""))
                            })?
                            .extract()?;
                        message.content.push_str(&text);
                    }
                    "image" => {
                        let image = part.get_item("image")?.ok_or_else(|| {
                            PyValueError::new_err(format!("{where_} has no \"image\""))
                        })?;
                        message.images.push(MediaArg::extract(&image)?);
                        message.content.push_str(IMAGE_MARKER);
                    }
                    "audio" => {
                        let clip = part.get_item("audio")?.ok_or_else(|| {
                            PyValueError::new_err(format!("{where_} has no \"audio\""))
                        })?;
                        message.audio.push(MediaArg::extract(&clip)?);
                        message.content.push_str(AUDIO_MARKER);
                    }
                    other => {
                        return Err(PyValueError::new_err(format!(
                            "{where_} has type {other:?}; \"text\", \"image\" and \"audio\" \
                             are known"
                        )))
                    }
                }
            }
        }
        out.push(message);
    }
    if out.is_empty() {
        return Err(PyValueError::new_err("messages is empty"));
    }
    Ok(out)
}

/// What to feed: a raw prompt, one templated user turn (`gemma run` without `--raw`), or a
/// conversation.
enum Prompt {
    Raw(String),
    User {
        text: String,
        system: Option<String>,
    },
    Chat(Vec<Message>),
}

/// Everything one generation needs, gathered from the Python arguments with the GIL held.
struct Request {
    prompt: Prompt,
    images: Vec<MediaArg>,
    pan_and_scan: bool,
    params: SamplingParams,
    schema: Option<serde_json::Value>,
}

/// A request turned into token ids and soft tokens (images encoded): ready to generate.
struct Prepared {
    ids: Vec<u32>,
    soft: Vec<SoftSpan>,
    params: SamplingParams,
    schema: Option<serde_json::Value>,
}

/// How a generation ended, as the OpenAI API words it.
fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::EndOfTurn | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::Cancelled => "cancelled",
    }
}

struct Shared {
    loaded: Arc<LoadedModel>,
    n_ctx: usize,
    /// The JSON-schema compiler over this model's vocabulary, built on first use (a moment).
    grammar: Mutex<Option<Arc<GrammarCompiler>>>,
}

impl Shared {
    fn grammar(&self) -> Result<Arc<GrammarCompiler>> {
        let mut slot = self.grammar.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(compiler) = &*slot {
            return Ok(compiler.clone());
        }
        let end = gemma_server::constrain::json_end_token(&self.loaded)?;
        let compiler = Arc::new(GrammarCompiler::new(self.loaded.clone(), end)?);
        *slot = Some(compiler.clone());
        Ok(compiler)
    }

    /// Reads and encodes images, renders the template and tokenizes (no GIL).
    fn prepare(&self, req: Request) -> Result<Prepared> {
        let loaded = &*self.loaded;
        let opts = ImageOptions {
            pan_and_scan: req.pan_and_scan,
            ..ImageOptions::default()
        };
        let slots = IMAGE_MARKER.repeat(req.images.len());
        let mut images = Vec::new();
        let mut audio = Vec::new();
        let text = match req.prompt {
            Prompt::Raw(text) => format!("{slots}{text}"),
            Prompt::User { text, system } => {
                let user = ChatMessage {
                    role: "user".into(),
                    content: format!("{slots}{text}"),
                };
                loaded.render_chat(system.as_deref(), &[user])?
            }
            Prompt::Chat(messages) => {
                // `images=` go before the text of the last user message.
                let last_user = messages.iter().rposition(|m| m.role == "user");
                if !req.images.is_empty() && last_user.is_none() {
                    bail!("images= needs a user message to go in");
                }
                let mut rendered = Vec::with_capacity(messages.len());
                for (i, m) in messages.into_iter().enumerate() {
                    let mut content = m.content;
                    if Some(i) == last_user {
                        content.insert_str(0, &slots);
                        for image in &req.images {
                            images.push(image.prepare(loaded, &opts)?);
                        }
                    }
                    for image in &m.images {
                        images.push(image.prepare(loaded, &opts)?);
                    }
                    for clip in &m.audio {
                        audio.push(clip.prepare_audio(loaded)?);
                    }
                    rendered.push(ChatMessage {
                        role: m.role,
                        content,
                    });
                }
                loaded.render_chat(None, &rendered)?
            }
        };
        if images.is_empty() {
            for image in &req.images {
                images.push(image.prepare(loaded, &opts)?);
            }
        }
        let (ids, soft) = loaded.encode_with_media(&text, &images, &audio, false)?;
        if req.schema.is_some() && !soft.is_empty() {
            bail!("json_schema does not take images or audio yet");
        }
        Ok(Prepared {
            ids,
            soft,
            params: req.params,
            schema: req.schema,
        })
    }

    /// Generates, passing each piece of text to `on_text` (which returns `false` to stop).
    fn run(&self, p: &Prepared, on_text: &mut dyn FnMut(&str) -> bool) -> Result<StopReason> {
        if let Some(schema) = &p.schema {
            let mut open = true;
            gemma_server::constrain::generate_json_with(
                &*self.grammar()?,
                &self.loaded,
                &p.ids,
                &p.params,
                self.n_ctx,
                schema,
                &mut |piece| {
                    if !piece.is_empty() {
                        open = on_text(piece);
                    }
                    open
                },
            )?;
            return Ok(if open {
                StopReason::EndOfTurn
            } else {
                StopReason::Cancelled
            });
        }
        let mut session = Session::new(&self.loaded, self.n_ctx)?;
        let stats = session.generate_with(&p.ids, &p.soft, &p.params, on_text)?;
        Ok(stats.stop_reason)
    }
}

/// A Gemma model loaded by the gemma-rs engine.
///
/// `Model(path=None, n_ctx=4096, threads=None, cache_type=None, mmproj=None, batch_size=512)`:
/// `path` is a GGUF file or a Hugging Face folder; `None` is the default model (Gemma 3 270M),
/// fetched and cached like `gemma run` does. Thread-safe: every call has its own KV cache.
#[pyclass(module = "gemma_rs", frozen)]
struct Model {
    shared: Arc<Shared>,
}

fn tokenizer(loaded: &LoadedModel) -> PyResult<&Tokenizer> {
    loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| GemmaError::new_err("this model has no tokenizer"))
}

/// `threads=`: the kernels' pool is process-wide and starts with the first model; its size
/// comes from `GEMMA_THREADS` then, as in the CLI.
fn apply_threads(py: Python<'_>, threads: Option<usize>) -> PyResult<()> {
    static STARTED: AtomicBool = AtomicBool::new(false);
    let mut wanted = None;
    if let Some(n) = threads {
        if n == 0 {
            return Err(PyValueError::new_err("threads must be at least 1"));
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = n.min(cores);
        if !STARTED.load(Ordering::SeqCst) {
            std::env::set_var("GEMMA_THREADS", n.to_string());
        }
        wanted = Some(n);
    }
    let actual = py.detach(|| gemma_kernels::ThreadPool::global().n_threads());
    STARTED.store(true, Ordering::SeqCst);
    if let Some(n) = wanted.filter(|&n| n != actual) {
        let message = std::ffi::CString::new(format!(
            "threads={n} is ignored: the compute threads are shared by the whole process and \
             were started with {actual} by the first model"
        ))
        .expect("no NUL in the message");
        PyErr::warn(py, &py.get_type::<PyRuntimeWarning>(), &message, 1)?;
    }
    Ok(())
}

/// The sampling keyword arguments, checked as `gemma run` checks its flags.
#[allow(clippy::too_many_arguments)]
fn sampling_params(
    max_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    repeat_last_n: usize,
    frequency_penalty: f32,
    presence_penalty: f32,
    seed: Option<u64>,
    stop: Option<&Bound<'_, PyAny>>,
    truncate: bool,
) -> PyResult<SamplingParams> {
    let finite = [
        temperature,
        top_p,
        min_p,
        repeat_penalty,
        frequency_penalty,
        presence_penalty,
    ]
    .iter()
    .all(|v| v.is_finite());
    let checks = [
        (
            finite,
            "sampling options must be finite numbers (not inf or NaN)",
        ),
        (temperature >= 0.0, "temperature must be at least 0"),
        (
            (0.0..=1.0).contains(&top_p),
            "top_p must be between 0 and 1",
        ),
        (
            (0.0..=1.0).contains(&min_p),
            "min_p must be between 0 and 1",
        ),
        (repeat_penalty > 0.0, "repeat_penalty must be positive"),
    ];
    if let Some((_, message)) = checks.iter().find(|(ok, _)| !ok) {
        return Err(PyValueError::new_err(*message));
    }
    let stop: Vec<String> = match stop.filter(|s| !s.is_none()) {
        None => Vec::new(),
        Some(s) if s.is_instance_of::<PyString>() => vec![s.extract()?],
        Some(s) => s.extract()?,
    };
    Ok(SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        repeat_penalty,
        repeat_last_n,
        frequency_penalty,
        presence_penalty,
        seed,
        max_tokens,
        stop,
        truncate,
        logit_bias: Vec::new(),
    })
}

/// Ids or text (then tokenized as a raw prompt, BOS added as `gemma logits PROMPT` does).
#[derive(FromPyObject)]
enum TokensOrText {
    Text(String),
    Ids(Vec<u32>),
}

impl Model {
    /// Runs a prepared request to the end on this thread (GIL released), collecting the text.
    /// A Ctrl-C (checked every [`SIGNAL_POLL`]) stops generation and raises.
    fn complete(&self, py: Python<'_>, req: Request) -> PyResult<String> {
        let shared = &*self.shared;
        let mut text = String::new();
        let mut interrupt: Option<PyErr> = None;
        let result = py.detach(|| {
            let prepared = shared.prepare(req)?;
            let mut last_check = Instant::now();
            shared.run(&prepared, &mut |piece| {
                text.push_str(piece);
                if last_check.elapsed() >= SIGNAL_POLL {
                    last_check = Instant::now();
                    if let Err(e) = Python::attach(|py| py.check_signals()) {
                        interrupt = Some(e);
                        return false;
                    }
                }
                true
            })
        });
        if let Some(e) = interrupt {
            return Err(e);
        }
        result.py_err()?;
        Ok(text)
    }

    /// Prepares a request here (so that bad input raises at once) and generates on a thread of
    /// its own, handing the pieces to the returned iterator.
    fn start_stream(&self, py: Python<'_>, req: Request) -> PyResult<TextStream> {
        let shared = self.shared.clone();
        let prepared = py.detach(|| shared.prepare(req)).py_err()?;
        let (tx, rx) = sync_channel::<Event>(STREAM_BUFFER);
        std::thread::Builder::new()
            .name("gemma-rs-stream".into())
            .spawn(move || {
                let sender: SyncSender<Event> = tx;
                let result = shared.run(&prepared, &mut |piece| {
                    sender.send(Event::Text(piece.to_owned())).is_ok()
                });
                let _ = sender.send(match result {
                    Ok(reason) => Event::Done(reason),
                    Err(e) => Event::Failed(e),
                });
            })
            .map_err(|e| GemmaError::new_err(format!("cannot start a thread: {e}")))?;
        Ok(TextStream {
            rx: Mutex::new(Some(rx)),
            finish: Mutex::new(None),
        })
    }
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path=None, n_ctx=4096, threads=None, cache_type=None, mmproj=None, batch_size=512))]
    fn new(
        py: Python<'_>,
        path: Option<PathBuf>,
        n_ctx: usize,
        threads: Option<usize>,
        cache_type: Option<&str>,
        mmproj: Option<PathBuf>,
        batch_size: usize,
    ) -> PyResult<Model> {
        if n_ctx == 0 {
            return Err(PyValueError::new_err("n_ctx must be at least 1"));
        }
        if batch_size == 0 {
            return Err(PyValueError::new_err("batch_size must be at least 1"));
        }
        let cache_type = match cache_type {
            None => CacheType::F16,
            Some(s) => CacheType::from_str(s).map_err(|e| {
                PyValueError::new_err(format!("cache_type {s:?}: {e} (f16, q8_0 or f32)"))
            })?,
        };
        apply_threads(py, threads)?;
        let opts = LoadOptions {
            ctx_size: n_ctx,
            verbose: false,
            cache_type,
            batch_size,
            mmproj,
            ..LoadOptions::default()
        };
        let loaded = py
            .detach(|| gemma_engine::load(path.as_deref(), &opts))
            .py_err()?;
        // `--ctx-size`, capped at what the model was trained for (as the CLI does).
        let trained = loaded.model.context_length();
        let n_ctx = if trained > 0 {
            n_ctx.min(trained)
        } else {
            n_ctx
        };
        Ok(Model {
            shared: Arc::new(Shared {
                loaded: Arc::new(loaded),
                n_ctx,
                grammar: Mutex::new(None),
            }),
        })
    }

    /// The context size every call gets (its KV cache length).
    #[getter]
    fn n_ctx(&self) -> usize {
        self.shared.n_ctx
    }

    /// Where the model was loaded from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.shared.loaded.source.clone()
    }

    /// `gemma2`, `gemma3`, `gemma3n`, ...
    #[getter]
    fn architecture(&self) -> String {
        self.shared.loaded.model.architecture().to_string()
    }

    /// Rows of the logits.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.shared.loaded.model.vocab_size()
    }

    /// Whether the model takes images (`images=`).
    #[getter]
    fn has_vision(&self) -> bool {
        self.shared.loaded.vision.is_some()
    }

    /// Whether the model takes audio (`audio=`, audio message parts, `transcribe`): Gemma 3n
    /// from its Hugging Face folder.
    #[getter]
    fn has_audio(&self) -> bool {
        self.shared.loaded.audio.is_some()
    }

    /// Speech to text (or to `translate_to`, a language name or code), as `gemma transcribe`:
    /// a clip over 30 s is cut into 30 s windows at pauses, each window one prompt asking the
    /// transcription (or `prompt`) instruction, the windows' texts joined by newlines. Greedy
    /// by default. `logit_bias` maps token ids to biases added to their logits.
    #[pyo3(signature = (audio, translate_to=None, prompt=None, max_tokens=512, temperature=0.0,
        seed=None, logit_bias=None))]
    #[allow(clippy::too_many_arguments)]
    fn transcribe(
        &self,
        py: Python<'_>,
        audio: &Bound<'_, PyAny>,
        translate_to: Option<String>,
        prompt: Option<String>,
        max_tokens: usize,
        temperature: f32,
        seed: Option<u64>,
        logit_bias: Option<std::collections::HashMap<u32, f32>>,
    ) -> PyResult<String> {
        let clip = MediaArg::extract(audio)?;
        if translate_to.is_some() && prompt.is_some() {
            return Err(PyValueError::new_err(
                "give translate_to or prompt, not both",
            ));
        }
        let instruction = match (prompt, translate_to) {
            (Some(p), _) => p,
            (None, Some(to)) => AudioTask::Translate { to }.instruction(),
            (None, None) => AudioTask::Transcribe.instruction(),
        };
        let mut params = sampling_params(
            max_tokens,
            temperature,
            64,
            0.95,
            0.0,
            1.0,
            64,
            0.0,
            0.0,
            seed,
            None,
            false,
        )?;
        params.logit_bias = logit_bias.unwrap_or_default().into_iter().collect();
        params.logit_bias.sort_unstable_by_key(|&(id, _)| id);
        let shared = &*self.shared;
        py.detach(|| -> Result<String> {
            let loaded = &*shared.loaded;
            let clip = clip.prepare_audio(loaded)?;
            let segments = loaded.transcribe(
                &clip,
                &instruction,
                &params,
                shared.n_ctx,
                &mut |_, _, _| {},
                &mut |_| true,
            )?;
            Ok(segments
                .iter()
                .map(|s| s.text.as_str())
                .collect::<Vec<_>>()
                .join("\n"))
        })
        .py_err()
    }

    fn __repr__(&self) -> String {
        format!(
            "gemma_rs.Model(path={:?}, architecture={:?}, n_ctx={})",
            self.shared.loaded.source.display().to_string(),
            self.shared.loaded.model.architecture(),
            self.shared.n_ctx
        )
    }

    /// Token ids of `text`, as `gemma tokenize` prints them (`add_bos=False` is `--no-bos`,
    /// `special=False` is `--no-special`).
    #[pyo3(signature = (text, add_bos=true, special=true))]
    fn tokenize(
        &self,
        py: Python<'_>,
        text: &str,
        add_bos: bool,
        special: bool,
    ) -> PyResult<Vec<u32>> {
        let t = tokenizer(&self.shared.loaded)?;
        let text = text.to_owned();
        py.detach(|| {
            t.encode(&text, t.add_bos_default() && add_bos, special)
                .map_err(anyhow::Error::from)
        })
        .py_err()
    }

    /// The text of `ids`; special tokens are written out unless `skip_special`.
    #[pyo3(signature = (ids, skip_special=false))]
    fn detokenize(&self, ids: Vec<u32>, skip_special: bool) -> PyResult<String> {
        let t = tokenizer(&self.shared.loaded)?;
        t.decode(&ids, skip_special)
            .map_err(anyhow::Error::from)
            .py_err()
    }

    /// Renders `messages` with the model's chat template (what `chat` feeds, image slots as
    /// `<start_of_image>`).
    #[pyo3(signature = (messages, add_generation_prompt=true))]
    fn apply_chat_template(
        &self,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let messages: Vec<ChatMessage> = extract_messages(messages)?
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect();
        self.shared
            .loaded
            .chat_template
            .render(&messages, add_generation_prompt)
            .map_err(anyhow::Error::from)
            .py_err()
    }

    /// The next-token logits (float32, shape `[vocab_size]`) after `ids` (or after a raw text
    /// prompt): `gemma logits --ids ...` before its top-k cut. `images` fill the runs of the
    /// image token in `ids` in order (with a text prompt: one slot each before the text), as
    /// `gemma logits --image` does; `audio` (Gemma 3n) fills the runs of the audio token, one
    /// per 30 s window, as `gemma logits --audio`.
    #[pyo3(signature = (ids, images=None, pan_and_scan=false, audio=None))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        ids: TokensOrText,
        images: Option<&Bound<'_, PyAny>>,
        pan_and_scan: bool,
        audio: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let shared = &*self.shared;
        let images = extract_images(images)?;
        let audio = extract_images(audio)?;
        let logits = py
            .detach(|| -> Result<Vec<f32>> {
                let loaded = &*shared.loaded;
                let opts = ImageOptions {
                    pan_and_scan,
                    ..ImageOptions::default()
                };
                let images = images
                    .iter()
                    .map(|i| i.prepare(loaded, &opts))
                    .collect::<Result<Vec<_>>>()?;
                let audio = audio
                    .iter()
                    .map(|a| a.prepare_audio(loaded))
                    .collect::<Result<Vec<_>>>()?;
                let (ids, soft) = match ids {
                    TokensOrText::Ids(ids) => {
                        let soft = loaded.place_media(&ids, &images, &audio)?;
                        (ids, soft)
                    }
                    TokensOrText::Text(text) => {
                        let slots = format!(
                            "{}{}",
                            IMAGE_MARKER.repeat(images.len()),
                            AUDIO_MARKER.repeat(audio.len())
                        );
                        loaded.encode_with_media(
                            &format!("{slots}{text}"),
                            &images,
                            &audio,
                            false,
                        )?
                    }
                };
                if ids.is_empty() {
                    bail!("there are no tokens to evaluate");
                }
                let mut session = Session::new(loaded, shared.n_ctx)?;
                Ok(session.evaluate(&ids, &soft)?.to_vec())
            })
            .py_err()?;
        Ok(PyArray1::from_vec(py, logits))
    }

    /// Generates a continuation of `prompt` and returns its text. `raw=True` (the default)
    /// feeds the prompt as is, like `gemma run --raw`; `raw=False` wraps it in the chat
    /// template as one user turn (with `system`), like `gemma run`. `images` (paths or
    /// bytes) go before the text, one slot each. `json_schema` (a dict or JSON text)
    /// constrains the output as `gemma run --json-schema` does.
    #[pyo3(signature = (prompt, max_tokens=256, temperature=1.0, top_k=64, top_p=0.95, min_p=0.0,
        repeat_penalty=1.0, repeat_last_n=64, frequency_penalty=0.0, presence_penalty=0.0,
        seed=None, stop=None, json_schema=None, images=None, raw=true, system=None,
        truncate=false, pan_and_scan=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: String,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: usize,
        frequency_penalty: f32,
        presence_penalty: f32,
        seed: Option<u64>,
        stop: Option<&Bound<'_, PyAny>>,
        json_schema: Option<&Bound<'_, PyAny>>,
        images: Option<&Bound<'_, PyAny>>,
        raw: bool,
        system: Option<String>,
        truncate: bool,
        pan_and_scan: bool,
    ) -> PyResult<String> {
        let req = text_request(
            prompt,
            raw,
            system,
            sampling_params(
                max_tokens,
                temperature,
                top_k,
                top_p,
                min_p,
                repeat_penalty,
                repeat_last_n,
                frequency_penalty,
                presence_penalty,
                seed,
                stop,
                truncate,
            )?,
            json_schema,
            images,
            pan_and_scan,
        )?;
        self.complete(py, req)
    }

    /// [`generate`] as an iterator of text pieces, produced while you read them.
    #[pyo3(signature = (prompt, max_tokens=256, temperature=1.0, top_k=64, top_p=0.95, min_p=0.0,
        repeat_penalty=1.0, repeat_last_n=64, frequency_penalty=0.0, presence_penalty=0.0,
        seed=None, stop=None, json_schema=None, images=None, raw=true, system=None,
        truncate=false, pan_and_scan=false))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: String,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: usize,
        frequency_penalty: f32,
        presence_penalty: f32,
        seed: Option<u64>,
        stop: Option<&Bound<'_, PyAny>>,
        json_schema: Option<&Bound<'_, PyAny>>,
        images: Option<&Bound<'_, PyAny>>,
        raw: bool,
        system: Option<String>,
        truncate: bool,
        pan_and_scan: bool,
    ) -> PyResult<TextStream> {
        let req = text_request(
            prompt,
            raw,
            system,
            sampling_params(
                max_tokens,
                temperature,
                top_k,
                top_p,
                min_p,
                repeat_penalty,
                repeat_last_n,
                frequency_penalty,
                presence_penalty,
                seed,
                stop,
                truncate,
            )?,
            json_schema,
            images,
            pan_and_scan,
        )?;
        self.start_stream(py, req)
    }

    /// The assistant's answer to `messages` (`[{"role": "system"|"user"|"assistant",
    /// "content": str or parts}]`), rendered with the model's chat template. Image parts
    /// `{"type": "image", "image": path-or-bytes}` sit where they are; `images=` go before
    /// the text of the last user message.
    #[pyo3(signature = (messages, max_tokens=256, temperature=1.0, top_k=64, top_p=0.95,
        min_p=0.0, repeat_penalty=1.0, repeat_last_n=64, frequency_penalty=0.0,
        presence_penalty=0.0, seed=None, stop=None, json_schema=None, images=None,
        truncate=false, pan_and_scan=false))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: usize,
        frequency_penalty: f32,
        presence_penalty: f32,
        seed: Option<u64>,
        stop: Option<&Bound<'_, PyAny>>,
        json_schema: Option<&Bound<'_, PyAny>>,
        images: Option<&Bound<'_, PyAny>>,
        truncate: bool,
        pan_and_scan: bool,
    ) -> PyResult<String> {
        let req = Request {
            prompt: Prompt::Chat(extract_messages(messages)?),
            images: extract_images(images)?,
            pan_and_scan,
            params: sampling_params(
                max_tokens,
                temperature,
                top_k,
                top_p,
                min_p,
                repeat_penalty,
                repeat_last_n,
                frequency_penalty,
                presence_penalty,
                seed,
                stop,
                truncate,
            )?,
            schema: extract_schema(json_schema)?,
        };
        self.complete(py, req)
    }

    /// [`chat`] as an iterator of text pieces.
    #[pyo3(signature = (messages, max_tokens=256, temperature=1.0, top_k=64, top_p=0.95,
        min_p=0.0, repeat_penalty=1.0, repeat_last_n=64, frequency_penalty=0.0,
        presence_penalty=0.0, seed=None, stop=None, json_schema=None, images=None,
        truncate=false, pan_and_scan=false))]
    #[allow(clippy::too_many_arguments)]
    fn stream_chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: usize,
        frequency_penalty: f32,
        presence_penalty: f32,
        seed: Option<u64>,
        stop: Option<&Bound<'_, PyAny>>,
        json_schema: Option<&Bound<'_, PyAny>>,
        images: Option<&Bound<'_, PyAny>>,
        truncate: bool,
        pan_and_scan: bool,
    ) -> PyResult<TextStream> {
        let req = Request {
            prompt: Prompt::Chat(extract_messages(messages)?),
            images: extract_images(images)?,
            pan_and_scan,
            params: sampling_params(
                max_tokens,
                temperature,
                top_k,
                top_p,
                min_p,
                repeat_penalty,
                repeat_last_n,
                frequency_penalty,
                presence_penalty,
                seed,
                stop,
                truncate,
            )?,
            schema: extract_schema(json_schema)?,
        };
        self.start_stream(py, req)
    }
}

fn text_request(
    prompt: String,
    raw: bool,
    system: Option<String>,
    params: SamplingParams,
    json_schema: Option<&Bound<'_, PyAny>>,
    images: Option<&Bound<'_, PyAny>>,
    pan_and_scan: bool,
) -> PyResult<Request> {
    if raw && system.is_some() {
        return Err(PyValueError::new_err(
            "system needs the chat template, so it cannot be combined with raw=True",
        ));
    }
    Ok(Request {
        prompt: if raw {
            Prompt::Raw(prompt)
        } else {
            Prompt::User {
                text: prompt,
                system,
            }
        },
        images: extract_images(images)?,
        pan_and_scan,
        params,
        schema: extract_schema(json_schema)?,
    })
}

enum Event {
    Text(String),
    Done(StopReason),
    Failed(anyhow::Error),
}

/// Text pieces of a generation running on its own thread. Dropping the iterator (or
/// `close()`) stops the generation.
#[pyclass(module = "gemma_rs", frozen)]
struct TextStream {
    rx: Mutex<Option<Receiver<Event>>>,
    finish: Mutex<Option<&'static str>>,
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        loop {
            let event = py.detach(|| {
                let rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
                match rx.as_ref() {
                    None => Err(RecvTimeoutError::Disconnected),
                    Some(rx) => rx.recv_timeout(SIGNAL_POLL),
                }
            });
            let done = |this: &Self| {
                this.rx
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
            };
            match event {
                Ok(Event::Text(text)) => return Ok(Some(text)),
                Ok(Event::Done(reason)) => {
                    *self.finish.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(finish_reason(reason));
                    done(self);
                    return Ok(None);
                }
                Ok(Event::Failed(e)) => {
                    done(self);
                    return Err(engine_error(e));
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        self.close();
                        return Err(e);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            }
        }
    }

    /// Stops the generation (the rest of the text is dropped).
    fn close(&self) {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        if rx.take().is_some() {
            let mut finish = self.finish.lock().unwrap_or_else(PoisonError::into_inner);
            finish.get_or_insert("cancelled");
        }
    }

    /// `"stop"` (end of turn or a stop string), `"length"` (max_tokens or the context),
    /// `"cancelled"` (closed early), or `None` while the stream runs.
    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        *self.finish.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[pymodule]
fn _gemma_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<TextStream>()?;
    m.add("GemmaError", m.py().get_type::<GemmaError>())?;
    m.add(
        "DEFAULT_MODEL_FILE",
        gemma_engine::default_model::DEFAULT_MODEL_FILE,
    )?;
    m.add_function(wrap_pyfunction!(default_model_path, m)?)?;
    m.add_function(wrap_pyfunction!(cache_dir, m)?)?;
    Ok(())
}

/// Where the default model is cached (it may not be there yet).
#[pyfunction]
fn default_model_path() -> PathBuf {
    gemma_engine::default_model_path()
}

/// gemma-rs's cache directory (`$GEMMA_CACHE_DIR`, else `$XDG_CACHE_HOME/gemma-rs`, else
/// `~/.cache/gemma-rs`).
#[pyfunction]
fn cache_dir() -> PathBuf {
    gemma_engine::cache_dir()
}
