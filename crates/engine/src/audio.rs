//! Audio in a prompt (Gemma 3n): the lazily loaded audio tower, decoding and the log-mel front
//! end (through `gemma-media`), and turning clips into soft tokens placed on the prompt's
//! audio-token runs.
//!
//! A prompt with audio is assembled the way `Gemma3nProcessor` does it: the chat template writes
//! one `<audio_soft_token>` per audio part ([`AUDIO_MARKER`]); each becomes `"\n\n" +
//! <start_of_audio> + soft_tokens_per_clip × <audio_soft_token> + <end_of_audio> + "\n\n"`;
//! the whole text is tokenized at once; every maximal run of the audio-token id is one window,
//! filled in order with the tower's output (the clip's tokens, then the reference's padding);
//! and `<end_of_audio>`, which lies in `embed_audio`'s own vocabulary, gets its embedding from
//! there, as the reference does. Filling runs of an id list is also the tokenizer-free path
//! (`gemma logits --ids`).
//!
//! Long clips: the reference hears 30 s per clip and silently drops the rest. Here a longer
//! clip is cut into windows of at most 30 s, at the quietest 10 ms within the last 2 s before
//! each limit, and each window is a block of its own in the prompt (`--max-audio-seconds`
//! bounds the whole clip).

use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use gemma_formats::ModelFile;
use gemma_media::mel::{MAX_SAMPLES, SAMPLE_RATE};
use gemma_media::{decode_audio, split_windows, AudioLimits, MelExtractor};
use gemma_models::{Gemma3nAudio, Gemma3nAudioConfig};
use sha2::{Digest, Sha256};

use crate::encoded::EncodedCache;
use crate::generate::SoftSpan;
use crate::load::LoadedModel;
use crate::vision::token_runs;

/// The marker a chat message's text holds where a clip goes (what Gemma 3n's chat template
/// writes for an audio part).
pub const AUDIO_MARKER: &str = "<audio_soft_token>";
const START_OF_AUDIO: &str = "<start_of_audio>";
const END_OF_AUDIO: &str = "<end_of_audio>";

/// Samples searched for a quiet cut before each 30 s limit.
const WINDOW_SEARCH: usize = 2 * SAMPLE_RATE as usize;
/// The shortest window the front end turns into a frame (513 samples, 32 ms); shorter clips are
/// an error rather than zero frames.
const MIN_SAMPLES: usize = 513;

/// How clips are turned into model inputs, per request.
#[derive(Clone, Debug, Default)]
pub struct AudioOptions {
    pub limits: AudioLimits,
}

/// One clip, decoded and analysed: its windows' log-mel features.
#[derive(Clone)]
pub struct PreparedAudio {
    /// `[frames, 128]` log-mel per window (one for clips of 30 s or less).
    pub windows: Vec<Vec<f32>>,
    /// Content key of each window (the clip's samples and the window's place).
    pub keys: Vec<[u8; 32]>,
    /// Where each window starts, in seconds.
    pub starts: Vec<f64>,
    /// Length of the clip in seconds (at 16 kHz).
    pub seconds: f64,
}

impl std::fmt::Debug for PreparedAudio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PreparedAudio({:.2} s, {} windows)",
            self.seconds,
            self.windows.len()
        )
    }
}

/// Decodes an audio file (WAV, FLAC, MP3, OGG/Vorbis) and prepares it: see [`prepare_samples`].
pub fn prepare_audio(bytes: &[u8], window: usize, opts: &AudioOptions) -> Result<PreparedAudio> {
    let audio = decode_audio(bytes, &opts.limits)?;
    prepare_samples(&audio.samples_16k, window)
}

/// Cuts 16 kHz mono samples into windows of at most `window` samples (30 s for the published
/// models: [`Hearing::window_samples`]) and computes each window's log-mel features, as
/// `Gemma3nAudioFeatureExtractor` does for a clip of that window's length.
pub fn prepare_samples(samples_16k: &[f32], window: usize) -> Result<PreparedAudio> {
    if samples_16k.len() < MIN_SAMPLES {
        bail!(
            "the audio is {:.1} ms long; at least {:.0} ms is needed for one frame",
            samples_16k.len() as f64 * 1e3 / SAMPLE_RATE as f64,
            MIN_SAMPLES as f64 * 1e3 / SAMPLE_RATE as f64
        );
    }
    if let Some(i) = samples_16k.iter().position(|v| !v.is_finite()) {
        bail!("the audio holds a non-finite sample at {i}");
    }
    let mut hasher = Sha256::new();
    for v in samples_16k {
        hasher.update(v.to_le_bytes());
    }
    let content: [u8; 32] = hasher.finalize().into();
    let extractor = MelExtractor::new();
    let mut out = PreparedAudio {
        windows: Vec::new(),
        keys: Vec::new(),
        starts: Vec::new(),
        seconds: samples_16k.len() as f64 / SAMPLE_RATE as f64,
    };
    for range in split_windows(samples_16k, window.min(MAX_SAMPLES), WINDOW_SEARCH) {
        let window = &samples_16k[range.clone()];
        // A window shorter than one frame (only possible for a clip's end) is padded with
        // silence to one frame rather than dropped.
        let padded;
        let window = if window.len() < MIN_SAMPLES {
            padded = [window, &vec![0.0; MIN_SAMPLES - window.len()]].concat();
            &padded[..]
        } else {
            window
        };
        out.windows.push(extractor.log_mel(window).features);
        let mut h = Sha256::new();
        h.update(content);
        h.update((range.start as u64).to_le_bytes());
        h.update((range.end as u64).to_le_bytes());
        h.update(b"gemma3n-log-mel");
        out.keys.push(h.finalize().into());
        out.starts.push(range.start as f64 / SAMPLE_RATE as f64);
    }
    Ok(out)
}

/// The audio side of a loaded model. The tower's weights stay memory-mapped and are read for
/// the first time when a clip arrives.
pub struct Hearing {
    pub config: Gemma3nAudioConfig,
    tower: OnceLock<Gemma3nAudio>,
    loading: Mutex<()>,
    /// Encoded windows by content key, as for images.
    encoded: EncodedCache,
    /// Print each window's encode time on stderr (`LoadOptions::verbose`).
    pub verbose: bool,
    /// The type the encoder's matrices are stored as once read (`LoadOptions::audio_weights`).
    pub weights: Option<gemma_formats::GgmlType>,
}

/// How many encoded windows `Hearing` keeps (each `188 × hidden` floats: 1.5 MiB for E2B).
const ENCODED_CACHE_ENTRIES: usize = 32;

impl Hearing {
    /// Finds the model's audio tower: `audio_config` in a Hugging Face folder. `None` for
    /// models without one (and for GGUF files: llama.cpp has no Gemma 3n audio encoder).
    pub fn detect(file: &ModelFile) -> Result<Option<Hearing>> {
        let ModelFile::Hf(folder) = file else {
            return Ok(None);
        };
        if folder
            .config()
            .get("audio_config")
            .is_none_or(|v| v.is_null())
        {
            return Ok(None);
        }
        let config = Gemma3nAudioConfig::from_hf_config(folder.config())
            .context("config.json audio_config")?;
        Ok(Some(Hearing {
            config,
            tower: OnceLock::new(),
            loading: Mutex::new(()),
            encoded: EncodedCache::new(ENCODED_CACHE_ENTRIES),
            verbose: false,
            weights: None,
        }))
    }

    /// The longest window whose tokens fit a clip's slots, in 16 kHz samples: 30 s (the
    /// reference's truncation) for the published models, whose 188 slots hold 30.08 s.
    pub fn window_samples(&self) -> usize {
        use gemma_media::mel::{FRAME_LENGTH, HOP_LENGTH, PAD_MULTIPLE};
        let frames = self.config.soft_tokens_per_clip * self.config.usm.frames_per_token();
        // The longest padded length with at most `frames` frames of 513 samples, hop 160.
        let padded = HOP_LENGTH * (frames - 1) + FRAME_LENGTH + HOP_LENGTH;
        (padded / PAD_MULTIPLE * PAD_MULTIPLE).min(MAX_SAMPLES)
    }

    /// Prepares 16 kHz mono samples for this model: [`prepare_samples`] with its window.
    pub fn prepare_samples(&self, samples_16k: &[f32]) -> Result<PreparedAudio> {
        prepare_samples(samples_16k, self.window_samples())
    }

    /// Whether the tower has been read (it is on the first clip).
    pub fn is_loaded(&self) -> bool {
        self.tower.get().is_some()
    }

    /// The tower, loaded on first use.
    pub fn tower(&self, file: &ModelFile) -> Result<&Gemma3nAudio> {
        if let Some(t) = self.tower.get() {
            return Ok(t);
        }
        let _guard = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = self.tower.get() {
            return Ok(t);
        }
        let ModelFile::Hf(folder) = file else {
            bail!("audio towers are read from Hugging Face folders only");
        };
        let mut tower = Gemma3nAudio::from_hf(folder)
            .context("cannot load the audio tower from the model folder")?;
        if let Some(dtype) = self.weights {
            tower.requantize(dtype);
        }
        Ok(self.tower.get_or_init(|| tower))
    }

    /// The soft tokens of every window of `clip`, in order (`soft_tokens_per_clip × hidden`
    /// each: the clip's tokens, then the reference's padding), encoded once per content key.
    pub fn encode(&self, file: &ModelFile, clip: &PreparedAudio) -> Result<Vec<Arc<[f32]>>> {
        let tower = self.tower(file)?;
        let n = clip.windows.len();
        let windows = clip.windows.iter().zip(&clip.keys).enumerate();
        windows
            .map(|(i, (window, key))| {
                let what = || format!("audio window {}/{n}", i + 1);
                self.encoded
                    .get_or_encode(key, self.verbose, &what, || Ok(tower.encode_clip(window)?))
            })
            .collect()
    }

    /// The text that stands for one window in a prompt, as the reference processor writes it.
    pub fn window_text(&self) -> String {
        format!(
            "\n\n{START_OF_AUDIO}{}{END_OF_AUDIO}\n\n",
            AUDIO_MARKER.repeat(self.config.soft_tokens_per_clip)
        )
    }

    /// Replaces each audio marker of `text` with its clip's windows; the count must match.
    pub fn expand_markers(&self, text: &str, clips: &[PreparedAudio]) -> Result<String> {
        let n_markers = text.matches(AUDIO_MARKER).count();
        if n_markers != clips.len() {
            bail!(
                "the prompt has {n_markers} audio slot(s) ({AUDIO_MARKER}) for {} clip(s)",
                clips.len()
            );
        }
        if clips.is_empty() {
            return Ok(text.to_string());
        }
        let block = self.window_text();
        let mut out = String::with_capacity(text.len() + clips.len() * block.len());
        for (i, piece) in text.split(AUDIO_MARKER).enumerate() {
            if i > 0 {
                out.push_str(&block.repeat(clips[i - 1].windows.len()));
            }
            out.push_str(piece);
        }
        Ok(out)
    }

    /// Soft-token spans for `ids`: each maximal run of the audio-token id is one window, filled
    /// in order from `clips`; every other id of `embed_audio`'s vocabulary (`<end_of_audio>`)
    /// gets its hard embedding. Runs must be exactly `soft_tokens_per_clip` long, one per
    /// window.
    pub fn place(
        &self,
        file: &ModelFile,
        ids: &[u32],
        clips: &[PreparedAudio],
    ) -> Result<Vec<SoftSpan>> {
        let c = &self.config;
        let runs = token_runs(ids, c.audio_token_id);
        let n_windows: usize = clips.iter().map(|a| a.windows.len()).sum();
        if runs.len() != n_windows {
            bail!(
                "the prompt has {} run(s) of the audio token {} but the audio makes {n_windows} \
                 window(s) (a clip over 30 s fills one run per 30 s window)",
                runs.len(),
                c.audio_token_id
            );
        }
        if let Some(r) = runs.iter().find(|r| r.len() != c.soft_tokens_per_clip) {
            bail!(
                "a run of the audio token at position {} is {} tokens long; this model's clips \
                 are {} tokens",
                r.start,
                r.len(),
                c.soft_tokens_per_clip
            );
        }
        let hard_range = c.vocab_offset..c.vocab_offset + c.vocab_size;
        let hard: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|&(_, &id)| id != c.audio_token_id && hard_range.contains(&(id as usize)))
            .map(|(i, _)| i)
            .collect();
        if runs.is_empty() && hard.is_empty() {
            return Ok(Vec::new());
        }
        let tower = self.tower(file)?;
        let mut spans = Vec::with_capacity(runs.len() + hard.len());
        let mut runs = runs.into_iter();
        for clip in clips {
            for (embeds, key) in self.encode(file, clip)?.into_iter().zip(&clip.keys) {
                let run = runs.next().expect("as many runs as windows");
                spans.push(SoftSpan {
                    start: run.start,
                    embeds,
                    bidirectional: false,
                    key: *key,
                });
            }
        }
        for i in hard {
            spans.push(self.hard_span(tower, i, ids[i])?);
        }
        spans.sort_by_key(|s| s.start);
        Ok(spans)
    }

    /// `embed_audio`'s embedding of hard id `id` (`<end_of_audio>`) at position `start`, keyed
    /// by the id.
    pub(crate) fn hard_span(
        &self,
        tower: &Gemma3nAudio,
        start: usize,
        id: u32,
    ) -> Result<SoftSpan> {
        let mut key = [0u8; 32];
        key[..14].copy_from_slice(b"gemma3n-hard-a");
        key[28..].copy_from_slice(&id.to_le_bytes());
        Ok(SoftSpan {
            start,
            embeds: tower.embed_hard(&[id])?.into(),
            bidirectional: false,
            key,
        })
    }

    pub fn describe(&self) -> Vec<(String, String)> {
        let c = &self.config;
        vec![(
            "audio".to_string(),
            format!(
                "USM conformer ({} blocks, width {}), {} tokens per clip of up to {:.0} s, from \
                 the model folder: memory-mapped, {} (audio token {}, start {}, end {})",
                c.usm.num_layers,
                c.usm.hidden_size,
                c.soft_tokens_per_clip,
                c.soft_tokens_per_clip as f64 * c.usm.frames_per_token() as f64 * 0.01,
                if self.is_loaded() {
                    "loaded"
                } else {
                    "read on the first clip"
                },
                c.audio_token_id,
                c.boa_token_id,
                c.eoa_token_id
            ),
        )]
    }
}

impl LoadedModel {
    /// The audio side, or an error saying why there is none.
    pub fn hearing(&self) -> Result<&Hearing> {
        self.audio.as_ref().with_context(|| {
            format!(
                "this {} model takes no audio; Gemma 3n (E2B, E4B) does, from its Hugging Face \
                 folder (llama.cpp's GGUF conversions carry no audio tower)",
                self.model.architecture()
            )
        })
    }

    /// Decodes and prepares an audio file's bytes for this model.
    pub fn prepare_audio(&self, bytes: &[u8], opts: &AudioOptions) -> Result<PreparedAudio> {
        let hearing = self.hearing()?;
        prepare_audio(bytes, hearing.window_samples(), opts)
    }

    /// Places the clips' soft tokens (and `<end_of_audio>`'s embedding) on `ids`.
    pub fn place_audio(&self, ids: &[u32], clips: &[PreparedAudio]) -> Result<Vec<SoftSpan>> {
        match &self.audio {
            Some(h) => h.place(&self.file, ids, clips),
            None if clips.is_empty() => Ok(Vec::new()),
            None => self.hearing().map(|_| Vec::new()),
        }
    }
}

/// What to do with speech: the instruction that follows the audio in the user's turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AudioTask {
    /// Speech recognition: the words as spoken.
    Transcribe,
    /// Speech translation into a language (a name such as "French", or a code such as "fr").
    Translate { to: String },
}

impl AudioTask {
    /// The instruction Google's Gemma 3n examples use for each task.
    pub fn instruction(&self) -> String {
        match self {
            AudioTask::Transcribe => "Transcribe this audio.".to_string(),
            AudioTask::Translate { to } => {
                format!("Translate this audio into {}.", language_name(to))
            }
        }
    }
}

/// An ISO 639-1 code's English name for the common languages; anything else as given.
pub fn language_name(code_or_name: &str) -> String {
    let name = match code_or_name.trim().to_ascii_lowercase().as_str() {
        "en" => "English",
        "fr" => "French",
        "de" => "German",
        "es" => "Spanish",
        "it" => "Italian",
        "pt" => "Portuguese",
        "nl" => "Dutch",
        "ru" => "Russian",
        "ja" => "Japanese",
        "zh" => "Chinese",
        "ko" => "Korean",
        "ar" => "Arabic",
        "hi" => "Hindi",
        "tr" => "Turkish",
        "pl" => "Polish",
        "sv" => "Swedish",
        "uk" => "Ukrainian",
        "vi" => "Vietnamese",
        "id" => "Indonesian",
        "th" => "Thai",
        _ => return code_or_name.trim().to_string(),
    };
    name.to_string()
}

impl PreparedAudio {
    /// Window `i` alone, as a clip of its own.
    pub fn window(&self, i: usize) -> PreparedAudio {
        let end = self.starts.get(i + 1).copied().unwrap_or(self.seconds);
        PreparedAudio {
            windows: vec![self.windows[i].clone()],
            keys: vec![self.keys[i]],
            starts: vec![self.starts[i]],
            seconds: end - self.starts[i],
        }
    }

    /// Where window `i` ends, in seconds.
    pub fn window_end(&self, i: usize) -> f64 {
        self.starts.get(i + 1).copied().unwrap_or(self.seconds)
    }
}

/// One window's text from [`LoadedModel::transcribe`].
#[derive(Clone, Debug, PartialEq)]
pub struct TranscriptSegment {
    pub start: f64,
    pub end: f64,
    pub text: String,
}

impl LoadedModel {
    /// The rendered chat prompt that asks `instruction` about one clip.
    pub fn audio_prompt(&self, instruction: &str) -> Result<String> {
        let user = gemma_tokenizer::ChatMessage {
            role: "user".into(),
            content: format!("{AUDIO_MARKER}{instruction}"),
        };
        self.render_chat(None, &[user])
    }

    /// Transcribes (or translates: `instruction`) a clip window by window, each window a
    /// prompt of its own as the reference processes a clip: `on_window(i, start, end)` before
    /// each window, `on_text` with the text as it is generated (returning `false` stops). Returns
    /// each window's text.
    pub fn transcribe(
        &self,
        clip: &PreparedAudio,
        instruction: &str,
        params: &crate::SamplingParams,
        ctx_size: usize,
        on_window: &mut dyn FnMut(usize, f64, f64),
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Vec<TranscriptSegment>> {
        let prompt = self.audio_prompt(instruction)?;
        let mut session = crate::Session::new(self, ctx_size)?;
        let mut segments = Vec::with_capacity(clip.windows.len());
        for i in 0..clip.windows.len() {
            let (start, end) = (clip.starts[i], clip.window_end(i));
            on_window(i, start, end);
            let (ids, soft) = self.encode_with_media(&prompt, &[], &[clip.window(i)], false)?;
            session.reset();
            let mut text = String::new();
            let mut stopped = false;
            session.generate_with(&ids, &soft, params, &mut |piece| {
                text.push_str(piece);
                stopped = !on_text(piece);
                !stopped
            })?;
            segments.push(TranscriptSegment {
                start,
                end,
                text: text.trim().to_string(),
            });
            if stopped {
                break;
            }
        }
        Ok(segments)
    }
}
