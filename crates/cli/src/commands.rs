//! The text-producing commands: run, chat, tokenize, logits, perplexity.

use std::io::{self, BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma_engine::gemma_media::{
    sample_frames, soundtrack, AudioLimits, FrameSampling, ImageLimits, VideoLimits, VideoSource,
};
use gemma_engine::gemma_tokenizer::ChatMessage;
use gemma_engine::{
    AudioOptions, Chat, GenerationStats, ImageOptions, LoadOptions, LoadedModel, PreparedAudio,
    PreparedImage, SamplingParams, Session, Tuning, WeightMemory, DEFAULT_BATCH_SIZE,
};

use crate::{CommonArgs, SamplingArgs};

#[derive(Args)]
pub struct RunArgs {
    /// The prompt (a user message for instruction-tuned models; base models continue it)
    pub prompt: String,
    /// Feed the prompt as is, without the chat template
    #[arg(long, conflicts_with = "chat")]
    pub raw: bool,
    /// Use the chat template even with a base (pretrained) model, which otherwise continues
    /// the prompt as plain text
    #[arg(long)]
    pub chat: bool,
    /// System instructions (merged into the first user turn by Gemma's template)
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Constrain the output to JSON valid under the JSON Schema in FILE
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<PathBuf>,
    #[command(flatten)]
    pub media: MediaArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Images, video and audio, shared by run, chat and logits.
#[derive(Args, Clone, Debug)]
pub struct MediaArgs {
    /// Audio clip to let the model hear (WAV, FLAC, MP3, OGG/Vorbis; Gemma 3n); repeatable,
    /// placed before the prompt text in the order the media options are given. Clips over 30 s
    /// are cut into 30 s windows at pauses
    #[arg(long = "audio", value_name = "FILE")]
    pub audio: Vec<PathBuf>,
    /// Longest audio accepted per clip, in seconds
    #[arg(long, default_value_t = AudioLimits::DEFAULT_MAX_SECONDS, value_name = "S")]
    pub max_audio_seconds: f64,
    /// Image to show the model (JPEG, PNG, WebP, GIF, BMP); repeatable, placed before the
    /// prompt text in the order the media options are given (`--image A --audio B --image C`)
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<PathBuf>,
    /// Video as sampled frames, each with its mm:ss timestamp: a folder of images, an animated
    /// GIF or WebP, or any file ffmpeg reads (needs ffmpeg on PATH). For Gemma 3n the soundtrack
    /// (through ffmpeg) follows each frame, cut at the frames' times
    #[arg(long, value_name = "PATH")]
    pub video: Option<PathBuf>,
    /// Add Gemma 3's pan-and-scan crops of non-square images (off by default, as in transformers)
    #[arg(long)]
    pub pan_and_scan: bool,
    /// Video frames sampled per second
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    pub fps: f64,
    /// Most video frames; a longer clip is sampled evenly over its whole length [default: 16;
    /// Gemma 3n 6, whose frames come with their sound: a 30 s clip fits the default context]
    #[arg(long, value_name = "N")]
    pub max_frames: Option<usize>,
    /// Drop video frames that barely differ from the last kept one
    #[arg(long)]
    pub keyframes: bool,
    /// Leave a video's soundtrack out (Gemma 3n)
    #[arg(long)]
    pub no_video_audio: bool,
    /// Largest image accepted, in pixels (width × height), checked before decoding
    #[arg(long, default_value_t = 64_000_000, value_name = "N")]
    pub max_image_pixels: u64,
    /// Most images in one prompt (pan-and-scan crops and video frames count)
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_images: usize,
    /// The order the media options were given in (filled from the command line).
    #[arg(skip)]
    pub order: Vec<MediaKind>,
}

/// One media option of the command line, for [`MediaArgs::order`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaKind {
    Image,
    Audio,
    Video,
}

impl MediaArgs {
    fn is_empty(&self) -> bool {
        self.images.is_empty() && self.video.is_none() && self.audio.is_empty()
    }

    /// Fills [`MediaArgs::order`] from the positions of `--image`, `--audio` and `--video` in
    /// the parsed command line.
    pub fn set_order(&mut self, matches: &clap::ArgMatches) {
        let mut at: Vec<(usize, MediaKind)> = Vec::new();
        for (id, kind) in [
            ("images", MediaKind::Image),
            ("audio", MediaKind::Audio),
            ("video", MediaKind::Video),
        ] {
            if let Some(indices) = matches.indices_of(id) {
                at.extend(indices.map(|i| (i, kind)));
            }
        }
        at.sort_by_key(|&(i, _)| i);
        self.order = at.into_iter().map(|(_, k)| k).collect();
    }

    /// The media in command-line order: the order recorded by [`MediaArgs::set_order`], or,
    /// without one, images, then the video, then audio.
    fn in_order(&self) -> Vec<MediaKind> {
        let counts = |k: MediaKind| self.order.iter().filter(|&&o| o == k).count();
        if counts(MediaKind::Image) == self.images.len()
            && counts(MediaKind::Audio) == self.audio.len()
            && counts(MediaKind::Video) == usize::from(self.video.is_some())
        {
            return self.order.clone();
        }
        let mut order = vec![MediaKind::Image; self.images.len()];
        order.extend(self.video.iter().map(|_| MediaKind::Video));
        order.extend(std::iter::repeat_n(MediaKind::Audio, self.audio.len()));
        order
    }

    fn image_options(&self) -> ImageOptions {
        ImageOptions {
            pan_and_scan: self.pan_and_scan,
            limits: ImageLimits {
                max_pixels: self.max_image_pixels,
                ..ImageLimits::default()
            },
        }
    }

    fn audio_options(&self) -> AudioOptions {
        AudioOptions {
            limits: AudioLimits {
                max_seconds: self.max_audio_seconds,
                ..AudioLimits::default()
            },
        }
    }

    /// The images, video frames (with their sound for Gemma 3n) and audio clips prepared for
    /// the model, in the order the options were given, and the text of their slots: one image
    /// marker per image, a timestamp before each frame, one audio marker per clip.
    fn prepare(&self, loaded: &LoadedModel) -> Result<Prepared> {
        if self.is_empty() {
            return Ok(Prepared::default());
        }
        let opts = self.image_options();
        let audio_opts = self.audio_options();
        let mut out = Prepared::default();
        let (mut images, mut clips) = (self.images.iter(), self.audio.iter());
        for kind in self.in_order() {
            match kind {
                MediaKind::Image => {
                    let path = images.next().expect("counted");
                    let bytes = read_media(path)?;
                    let image = loaded
                        .prepare_image(&bytes, &opts)
                        .with_context(|| format!("image {}", path.display()))?;
                    out.images.push(image);
                    out.slots.push_str(gemma_engine::vision::IMAGE_MARKER);
                }
                MediaKind::Audio => {
                    let path = clips.next().expect("counted");
                    let bytes = read_media(path)?;
                    let clip = loaded
                        .prepare_audio(&bytes, &audio_opts)
                        .with_context(|| format!("audio {}", path.display()))?;
                    out.audio.push(clip);
                    out.slots.push_str(gemma_engine::audio::AUDIO_MARKER);
                }
                MediaKind::Video => {
                    let path = self.video.as_ref().expect("counted");
                    let video = self
                        .prepare_video(loaded, path, &opts, &audio_opts)
                        .with_context(|| format!("video {}", path.display()))?;
                    out.images.extend(video.images);
                    out.audio.extend(video.audio);
                    out.slots.push_str(&video.text);
                }
            }
        }
        let views: usize = out.images.iter().map(|i| i.views.len()).sum();
        if views > self.max_images {
            bail!(
                "the prompt would hold {views} images (crops and frames included), above \
                 --max-images {}",
                self.max_images
            );
        }
        Ok(out)
    }

    fn prepare_video(
        &self,
        loaded: &LoadedModel,
        path: &std::path::Path,
        opts: &ImageOptions,
        audio_opts: &AudioOptions,
    ) -> Result<gemma_engine::video::PreparedVideo> {
        loaded.vision()?;
        let source = VideoSource::open(path, MAX_MEDIA_BYTES)?;
        let sampling = FrameSampling {
            fps: self.fps,
            max_frames: self
                .max_frames
                .unwrap_or_else(|| loaded.default_max_frames()),
            keyframes: self.keyframes,
            ..FrameSampling::default()
        };
        let limits = VideoLimits {
            frame: opts.limits.clone(),
            ..VideoLimits::default()
        };
        let frames = sample_frames(&source, &sampling, &limits)?;
        // Only a model that hears gets the soundtrack (and only then is ffmpeg asked for it).
        let sound = if loaded.audio.is_some() && !self.no_video_audio {
            soundtrack(&source, &audio_opts.limits)?
        } else {
            None
        };
        loaded.prepare_video(
            &frames,
            sound.as_ref().map(|a| a.samples_16k.as_slice()),
            opts,
        )
    }
}

/// What [`MediaArgs::prepare`] gives: the media and the prompt text that stands for them.
#[derive(Default)]
struct Prepared {
    images: Vec<PreparedImage>,
    audio: Vec<PreparedAudio>,
    slots: String,
}

/// Media files are read whole; this bounds them (a 10-minute 4K clip goes through ffmpeg,
/// which streams it, so only images and animations count here).
const MAX_MEDIA_BYTES: u64 = 256 << 20;

pub(crate) fn read_media(path: &std::path::Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if len > MAX_MEDIA_BYTES {
        bail!(
            "{} is {} bytes, above the {} byte limit for a media file",
            path.display(),
            len,
            MAX_MEDIA_BYTES
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Prompt batching, shared by run, chat and perplexity.
#[derive(Args, Clone, Copy, Debug)]
pub struct BatchArgs {
    /// Prompt tokens per forward pass (llama.cpp's -b); smaller bounds memory on long prompts
    #[arg(short = 'b', long, default_value_t = DEFAULT_BATCH_SIZE, value_name = "N")]
    pub batch_size: usize,
}

#[derive(Args)]
pub struct ChatArgs {
    /// System instructions for the whole conversation
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Add Gemma 3's pan-and-scan crops to images given with /image
    #[arg(long)]
    pub pan_and_scan: bool,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args)]
pub struct TokenizeArgs {
    pub text: String,
    /// Do not add the BOS token
    #[arg(long)]
    pub no_bos: bool,
    /// Treat special-token text such as `<start_of_turn>` as plain text
    #[arg(long)]
    pub no_special: bool,
}

#[derive(Args)]
pub struct LogitsArgs {
    /// Raw prompt (no chat template; BOS is added if the tokenizer asks for it)
    #[arg(required_unless_present = "ids", conflicts_with = "ids")]
    pub prompt: Option<String>,
    /// Token ids instead of a prompt, e.g. 2,17,9 (works without a tokenizer)
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub ids: Option<Vec<u32>>,
    /// How many of the highest logits to print
    #[arg(long, default_value_t = 10, value_name = "K")]
    pub top: usize,
    /// Images fill the runs of the image token in --ids in order (one run per image, plus one
    /// per pan-and-scan crop after it); with a prompt, one slot each before the text
    #[command(flatten)]
    pub media: MediaArgs,
}

#[derive(Args)]
pub struct PerplexityArgs {
    /// Text file to score
    pub file: PathBuf,
    /// Tokens per evaluated chunk (llama-perplexity's -c); the second half of each is scored
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub chunk_size: usize,
    #[command(flatten)]
    pub batch: BatchArgs,
}

/// The model with the default batch size.
pub(crate) fn load_for(common: &CommonArgs) -> Result<LoadedModel> {
    load(common, DEFAULT_BATCH_SIZE)
}

fn load(common: &CommonArgs, batch_size: usize) -> Result<LoadedModel> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    common.load(&LoadOptions {
        batch_size,
        ..common.load_options()
    })
}

/// `--ctx-size`, capped at what the model was trained for.
pub(crate) fn context_size(common: &CommonArgs, loaded: &LoadedModel) -> usize {
    let trained = loaded.model.context_length();
    if trained > 0 && common.ctx_size > trained {
        if !common.quiet {
            eprintln!(
                "gemma: --ctx-size {} is above the model's trained context; using {trained}",
                common.ctx_size
            );
        }
        return trained;
    }
    common.ctx_size
}

pub fn run(common: &CommonArgs, args: &RunArgs) -> Result<()> {
    let params = args.sampling.to_params()?;
    if args.raw && args.system.is_some() {
        bail!("--system needs the chat template, so it cannot be combined with --raw");
    }
    // A schema is read and checked before the model loads: a bad one fails at once.
    let schema = args
        .json_schema
        .as_deref()
        .map(crate::serve::read_json_schema)
        .transpose()?;
    let loaded = load(common, args.batch.batch_size)?;
    check_logit_bias(&params, &loaded)?;
    // A base model follows no instructions: it continues the prompt, with sampling that keeps
    // a small model from looping (scripts/base_sampling.py measured it). A system prompt or a
    // schema asks for turns, so they keep the template.
    let continue_text = loaded.tuning == Tuning::Base
        && !args.raw
        && !args.chat
        && args.system.is_none()
        && schema.is_none();
    let params = if continue_text {
        if !common.quiet {
            eprintln!(
                "gemma: {} is a base (pretrained) model: it continues text rather than \
                 following instructions, so the prompt is continued as written (--chat applies \
                 the chat template; --model an instruction-tuned GGUF to ask questions)",
                loaded.display_name
            );
        }
        args.sampling
            .to_params_over(SamplingParams::base_model_defaults())?
    } else {
        params
    };
    let Prepared {
        images,
        audio,
        slots,
    } = args.media.prepare(&loaded)?;
    let prompt = if args.raw || continue_text {
        format!("{slots}{}", args.prompt)
    } else {
        let user = ChatMessage {
            role: "user".into(),
            content: format!("{slots}{}", args.prompt),
        };
        loaded.render_chat(args.system.as_deref(), &[user])?
    };
    let ctx_size = context_size(common, &loaded);
    let (ids, soft) = loaded.encode_with_media_in(&prompt, &images, &audio, false, ctx_size)?;
    if let Some(schema) = &schema {
        if !soft.is_empty() {
            bail!("--json-schema does not take images or audio yet");
        }
        return crate::serve::run_json_schema(loaded, &ids, &params, ctx_size, schema);
    }
    let mut session = Session::new(&loaded, ctx_size)?;
    let mut out = TextSink::stdout();
    let stats = session.generate_with(&ids, &soft, &params, &mut |text| out.write(text));
    out.end_line();
    let stats = stats?;
    if !common.quiet {
        report(&stats);
    }
    Ok(())
}

pub fn chat(common: &CommonArgs, args: &ChatArgs) -> Result<()> {
    let params = args.sampling.to_params()?;
    let loaded = load(common, args.batch.batch_size)?;
    check_logit_bias(&params, &loaded)?;
    let mut chat = Chat::new(&loaded, context_size(common, &loaded), args.system.clone())?;
    if loaded.tuning == Tuning::Base && !common.quiet {
        eprintln!(
            "gemma: {} is a base (pretrained) model: it was not trained to chat, so expect \
             answers that wander or repeat (--model an instruction-tuned GGUF to chat)",
            loaded.display_name
        );
    }
    let interactive = io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "gemma: chatting; /image FILE and /audio FILE add an image or an audio clip to the \
             next message, /clear starts over, /exit or Ctrl-D ends"
        );
    }
    let image_opts = ImageOptions {
        pan_and_scan: args.pan_and_scan,
        ..ImageOptions::default()
    };
    let mut pending_images = Vec::new();
    let mut pending_audio = Vec::new();
    // The slots of the pending media in the order they were added.
    let mut pending_slots = String::new();
    let mut out = TextSink::stdout();
    let mut lines = io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/clear" => {
                chat.clear();
                pending_images.clear();
                pending_audio.clear();
                pending_slots.clear();
                eprintln!("gemma: conversation cleared");
                continue;
            }
            _ => {}
        }
        if let Some(path) = line.trim().strip_prefix("/image ") {
            let path = PathBuf::from(path.trim());
            let image = read_media(&path).and_then(|bytes| {
                loaded
                    .prepare_image(&bytes, &image_opts)
                    .with_context(|| format!("image {}", path.display()))
            });
            match image {
                Ok(image) => {
                    pending_images.push(image);
                    pending_slots.push_str(gemma_engine::vision::IMAGE_MARKER);
                    eprintln!("gemma: image added to the next message");
                }
                Err(e) if interactive => eprintln!("error: {e:#}"),
                Err(e) => return Err(e),
            }
            continue;
        }
        if let Some(path) = line.trim().strip_prefix("/audio ") {
            let path = PathBuf::from(path.trim());
            let clip = read_media(&path).and_then(|bytes| {
                loaded
                    .prepare_audio(&bytes, &AudioOptions::default())
                    .with_context(|| format!("audio {}", path.display()))
            });
            match clip {
                Ok(clip) => {
                    pending_audio.push(clip);
                    pending_slots.push_str(gemma_engine::audio::AUDIO_MARKER);
                    eprintln!("gemma: audio added to the next message");
                }
                Err(e) if interactive => eprintln!("error: {e:#}"),
                Err(e) => return Err(e),
            }
            continue;
        }
        let images = std::mem::take(&mut pending_images);
        let audio = std::mem::take(&mut pending_audio);
        let slots = std::mem::take(&mut pending_slots);
        let turn = chat.send_with_slots(&slots, line.trim(), images, audio, &params, &mut |text| {
            out.write(text)
        });
        out.end_line();
        match turn {
            Ok(turn) if !common.quiet => report(&turn.stats),
            Ok(_) => {}
            // At a terminal the conversation goes on; in a script the error is the result.
            Err(e) if interactive => eprintln!("error: {e:#} (/clear starts a new conversation)"),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn tokenize(common: &CommonArgs, args: &TokenizeArgs) -> Result<()> {
    // Only the vocabulary is read: no copy of the weights.
    let loaded = common.load(&LoadOptions {
        weights: WeightMemory::Mapped,
        ..common.load_options()
    })?;
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .context("this model has no tokenizer")?;
    let add_bos = tokenizer.add_bos_default() && !args.no_bos;
    let ids = tokenizer.encode(&args.text, add_bos, !args.no_special)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

pub fn logits(common: &CommonArgs, args: &LogitsArgs) -> Result<()> {
    let loaded = load(common, DEFAULT_BATCH_SIZE)?;
    let ctx_size = context_size(common, &loaded);
    let Prepared {
        images,
        audio,
        slots,
    } = args.media.prepare(&loaded)?;
    let (ids, soft) = match (&args.ids, &args.prompt) {
        (Some(ids), _) => {
            let soft = loaded.place_media(ids, &images, &audio)?;
            (ids.clone(), soft)
        }
        (None, Some(prompt)) => loaded.encode_with_media_in(
            &format!("{slots}{prompt}"),
            &images,
            &audio,
            false,
            ctx_size,
        )?,
        (None, None) => bail!("give a prompt or --ids"),
    };
    if ids.is_empty() {
        bail!("there are no tokens to evaluate");
    }
    let mut session = Session::new(&loaded, ctx_size)?;
    let logits = session.evaluate(&ids, &soft)?;
    let top = top_logits(logits, args.top);
    let json = serde_json::json!({ "ids": ids, "top": top });
    println!("{json}");
    Ok(())
}

/// The `k` highest logits as (id, logit), highest first; ties list the lower id first.
fn top_logits(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let k = k.min(order.len());
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, by_logit);
    }
    order.truncate(k);
    order.sort_unstable_by(by_logit);
    order
        .into_iter()
        .map(|id| (id, logits[id as usize]))
        .collect()
}

pub fn perplexity(common: &CommonArgs, args: &PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let loaded = load(common, args.batch.batch_size)?;
    let quiet = common.quiet;
    let result =
        gemma_engine::perplexity(&loaded, &text, args.chunk_size, &mut |done, total, ppl| {
            if !quiet {
                eprintln!("[{done}/{total}] {ppl:.4}");
            }
        })?;
    println!(
        "PPL = {:.4} +/- {:.5} ({} chunks of {} tokens, {} tokens scored)",
        result.ppl, result.ppl_std_err, result.chunks, args.chunk_size, result.scored_tokens
    );
    Ok(())
}

/// `--logit-bias` ids must be in the model's vocabulary.
fn check_logit_bias(params: &SamplingParams, loaded: &LoadedModel) -> Result<()> {
    let vocab = loaded.model.vocab_size();
    if let Some((id, _)) = params
        .logit_bias
        .iter()
        .find(|(id, _)| *id as usize >= vocab)
    {
        bail!("--logit-bias: token {id} is outside the vocabulary ({vocab} tokens)");
    }
    Ok(())
}

fn report(stats: &GenerationStats) {
    eprintln!(
        "gemma: prompt {} tokens, {:.1} tok/s; generated {} tokens, {:.1} tok/s; stopped: {}",
        stats.prompt_tokens,
        stats.prompt_tokens_per_sec(),
        stats.generated_tokens,
        stats.gen_tokens_per_sec(),
        stats.stop_reason.as_str()
    );
}

/// Streams generated text to stdout. A closed pipe (e.g. `| head`) ends generation quietly.
pub(crate) struct TextSink {
    out: io::Stdout,
    at_line_start: bool,
    broken: bool,
}

impl TextSink {
    pub(crate) fn stdout() -> Self {
        TextSink {
            out: io::stdout(),
            at_line_start: true,
            broken: false,
        }
    }

    /// Returns false once stdout is gone, which asks the generator to stop.
    pub(crate) fn write(&mut self, text: &str) -> bool {
        if self.broken {
            return false;
        }
        let mut out = self.out.lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            self.broken = true;
            return false;
        }
        if !text.is_empty() {
            self.at_line_start = text.ends_with('\n');
        }
        true
    }

    /// Ends the answer with a newline unless it already has one.
    pub(crate) fn end_line(&mut self) {
        if !self.at_line_start {
            self.write("\n");
        }
        self.at_line_start = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_logits_sorts_and_breaks_ties_by_id() {
        let logits = [0.5f32, 2.0, -1.0, 2.0, 1.0];
        assert_eq!(top_logits(&logits, 3), vec![(1, 2.0), (3, 2.0), (4, 1.0)]);
        assert_eq!(top_logits(&logits, 10).len(), 5);
        assert!(top_logits(&logits, 0).is_empty());
    }
}
