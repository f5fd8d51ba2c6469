//! `gemma`: run Gemma models locally on the CPU.

mod bench;
mod commands;
mod extract;
mod info;
mod serve;
mod shield;
mod transcribe;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use gemma_engine::SamplingParams;

#[derive(Parser)]
#[command(name = "gemma", version, about = "Run Gemma models locally on the CPU")]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every command understands.
#[derive(Args, Clone, Debug)]
pub struct CommonArgs {
    /// GGUF file or Hugging Face model folder [default: Gemma 3 270M, downloaded on first use]
    #[arg(long, global = true, env = "GEMMA_MODEL", value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Context size in tokens (KV cache length)
    #[arg(long, global = true, default_value_t = 4096, value_name = "N")]
    pub ctx_size: usize,
    /// Compute threads [default: all cores]
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    /// No loading messages on stderr
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Gemma 3n: run the MatFormer sub-model described by this JSON file (see docs/matformer.md)
    #[arg(long, global = true, value_name = "CONFIG")]
    pub matformer: Option<PathBuf>,
    /// KV cache storage: f16 (as llama.cpp), f32 (exact) or q8_0 (about half of f16)
    #[arg(long, global = true, default_value = "f16", value_name = "TYPE")]
    pub cache_type: gemma_engine::gemma_models::CacheType,
    /// Read GGUF weights in place from the memory-mapped file (the default for Gemma 3n)
    #[arg(long, global = true, conflicts_with = "no_mmap")]
    pub mmap: bool,
    /// Copy GGUF weights into memory, in huge pages where the OS allows (the default for
    /// Gemma 2 and 3: faster generation)
    #[arg(long, global = true)]
    pub no_mmap: bool,
    /// llama.cpp's multimodal projector GGUF (vision tower) for a text GGUF
    #[arg(long, global = true, value_name = "FILE")]
    pub mmproj: Option<PathBuf>,
    /// Gemma 3n: store the audio encoder's matrices as q8_0 (half the bytes of the published
    /// bf16 per streamed chunk, int8 dot products; close to, not equal to, the reference) or
    /// f16, f32; `stored` keeps the checkpoint's type
    #[arg(long, global = true, default_value = "stored", value_name = "TYPE")]
    pub audio_weights: AudioWeights,
    /// Reuse the vision encoding of a video or camera frame that is (nearly) unchanged from the
    /// last one encoded (see --vision-cache-threshold)
    #[arg(long, global = true)]
    pub vision_cache: bool,
    /// --vision-cache: a frame is unchanged when the mean absolute difference of its
    /// preprocessed pixels from the last encoded frame is under LEVELS (of 255) and no cell of
    /// a 16×16 grid differs by 4 × LEVELS or more
    #[arg(long, global = true, default_value_t = 2.0, value_name = "LEVELS")]
    pub vision_cache_threshold: f32,
}

/// `--audio-weights`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AudioWeights {
    Stored,
    #[value(name = "q8_0")]
    Q8_0,
    F16,
    Bf16,
    F32,
}

impl AudioWeights {
    fn dtype(self) -> Option<gemma_engine::gemma_formats::GgmlType> {
        use gemma_engine::gemma_formats::GgmlType;
        match self {
            AudioWeights::Stored => None,
            AudioWeights::Q8_0 => Some(GgmlType::Q8_0),
            AudioWeights::F16 => Some(GgmlType::F16),
            AudioWeights::Bf16 => Some(GgmlType::BF16),
            AudioWeights::F32 => Some(GgmlType::F32),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt, streaming the text to stdout
    Run(commands::RunArgs),
    /// Interactive multi-turn chat on stdin (`/clear` resets, `/exit` or EOF ends)
    Chat(commands::ChatArgs),
    /// Print the token ids of TEXT as a JSON array
    Tokenize(commands::TokenizeArgs),
    /// Print the top next-token logits after a raw prompt as JSON
    Logits(commands::LogitsArgs),
    /// Perplexity of a text file (llama.cpp's definition)
    Perplexity(commands::PerplexityArgs),
    /// Architecture, hyper-parameters, tensors and memory needs of a model (--json for scripts)
    Info(info::InfoArgs),
    /// Prompt-processing and generation speed, llama-bench style (-m, -p, -n, -d, -t, -r, --json)
    Bench(bench::BenchArgs),
    /// OpenAI-compatible HTTP server (chat/completions, completions, responses, audio
    /// transcriptions and translations, models, metrics; Ollama's API)
    Serve(serve::ServeArgs),
    /// Gemma 3n: write a MatFormer sub-model (and/or a requantized PLE table) as a new GGUF
    Extract(extract::ExtractArgs),
    /// Gemma 3n: speech to text, or to another language (--translate-to); `-` streams PCM from
    /// stdin
    Transcribe(transcribe::TranscribeArgs),
    /// Safety classifier: P(Yes) per policy from ShieldGemma 2 (--image) or ShieldGemma (--text);
    /// exit code 1 when --threshold is passed, 2 on errors
    Shield(shield::ShieldArgs),
}

/// Sampling and stopping options shared by `run` and `chat`. The cuts and penalties left
/// unset take the model's defaults: [`SamplingParams::default`] for instruction-tuned models,
/// [`SamplingParams::base_model_defaults`] when `run` continues text with a base model.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature (0 = greedy) [default: 1; base models 0.8]
    #[arg(long = "temp")]
    pub temperature: Option<f32>,
    /// Top-k cut (0 = off) [default: 64; base models 40]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Top-p (nucleus) cut (1 = off) [default: 0.95]
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Min-p cut relative to the most likely token (0 = off) [default: 0; base models 0.05]
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Repetition penalty over the last --repeat-last-n tokens (1 = off) [default: 1; base
    /// models 1.1]
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// Window of the penalties
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Subtracted per earlier occurrence
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Subtracted once if the token occurred
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Random seed for reproducible sampling
    #[arg(long)]
    pub seed: Option<u64>,
    /// Maximum tokens to generate
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop when the output contains STR (repeatable)
    #[arg(long, value_name = "STR")]
    pub stop: Vec<String>,
    /// Keep the last tokens of a prompt that does not fit the context instead of failing
    #[arg(long)]
    pub truncate: bool,
    /// Add BIAS to token ID's logit, as ID=BIAS or llama.cpp's ID+BIAS / ID-BIAS (repeatable;
    /// -100 all but bans a token, +100 all but forces it)
    #[arg(short = 'l', long = "logit-bias", value_name = "ID=BIAS", value_parser = parse_logit_bias)]
    pub logit_bias: Vec<(u32, f32)>,
}

/// `ID=BIAS`, `ID+BIAS` or `ID-BIAS` with a finite bias in [-100, 100].
fn parse_logit_bias(s: &str) -> Result<(u32, f32), String> {
    let at = s
        .find(['=', '+', '-'])
        .ok_or_else(|| format!("{s:?}: expected ID=BIAS, ID+BIAS or ID-BIAS"))?;
    let id = s[..at]
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("{s:?}: {:?} is not a token id", &s[..at]))?;
    let bias_text = if &s[at..at + 1] == "=" {
        &s[at + 1..]
    } else {
        &s[at..]
    };
    let bias = bias_text
        .trim()
        .parse::<f32>()
        .ok()
        .filter(|b| (-100.0..=100.0).contains(b))
        .ok_or_else(|| format!("{s:?}: the bias must be a number between -100 and 100"))?;
    Ok((id, bias))
}

impl CommonArgs {
    /// The model (or the default one) with `--ctx-size`, `--cache-type` and `--matformer`
    /// applied; `opts` says how it is loaded (see [`CommonArgs::load_options`]).
    pub fn load(
        &self,
        opts: &gemma_engine::LoadOptions,
    ) -> anyhow::Result<gemma_engine::LoadedModel> {
        gemma_engine::load_with_matformer(self.model.as_deref(), opts, self.matformer.as_deref())
    }

    /// Load options from the global flags; commands override what they set themselves.
    pub fn load_options(&self) -> gemma_engine::LoadOptions {
        gemma_engine::LoadOptions {
            ctx_size: self.ctx_size,
            verbose: !self.quiet,
            cache_type: self.cache_type,
            weights: match (self.mmap, self.no_mmap) {
                (true, _) => gemma_engine::WeightMemory::Mapped,
                (_, true) => gemma_engine::WeightMemory::Resident,
                _ => gemma_engine::WeightMemory::Auto,
            },
            mmproj: self.mmproj.clone(),
            audio_weights: self.audio_weights.dtype(),
            vision_cache: self.vision_cache.then_some(self.vision_cache_threshold),
            ..gemma_engine::LoadOptions::default()
        }
    }
}

impl SamplingArgs {
    /// The options over the instruction-tuned defaults (checked).
    pub fn to_params(&self) -> anyhow::Result<SamplingParams> {
        self.to_params_over(SamplingParams::default())
    }

    /// The options over `defaults` (checked): what the user set wins, the rest is `defaults`'.
    pub fn to_params_over(&self, defaults: SamplingParams) -> anyhow::Result<SamplingParams> {
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(defaults.repeat_penalty),
            repeat_last_n: self.repeat_last_n,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            truncate: self.truncate,
            logit_bias: self.logit_bias.clone(),
        };
        let finite = [
            params.temperature,
            params.top_p,
            params.min_p,
            params.repeat_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        ]
        .iter()
        .all(|v| v.is_finite());
        let checks = [
            (
                finite,
                "sampling options must be finite numbers (not inf or NaN)",
            ),
            (params.temperature >= 0.0, "--temp must be at least 0"),
            (
                (0.0..=1.0).contains(&params.top_p),
                "--top-p must be between 0 and 1",
            ),
            (
                (0.0..=1.0).contains(&params.min_p),
                "--min-p must be between 0 and 1",
            ),
            (
                params.repeat_penalty > 0.0,
                "--repeat-penalty must be positive",
            ),
        ];
        if let Some((_, message)) = checks.iter().find(|(ok, _)| !ok) {
            anyhow::bail!("{message}");
        }
        Ok(params)
    }
}

fn main() -> ExitCode {
    install_panic_hook();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // `--image A --audio B --image C`: the media go into the prompt in that order.
    if let Some((_, sub)) = matches.subcommand() {
        match &mut cli.command {
            Command::Run(args) => args.media.set_order(sub),
            Command::Logits(args) => args.media.set_order(sub),
            _ => {}
        }
    }
    // `gemma shield` exits 1 for "flagged", so its errors take 2 (as grep's do).
    let error_code = match cli.command {
        Command::Shield(_) => {
            PANIC_EXIT_CODE.store(2, std::sync::atomic::Ordering::Relaxed);
            ExitCode::from(2)
        }
        _ => ExitCode::FAILURE,
    };
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` joins the cause chain with ": ", which keeps the message on one line.
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {message}");
            error_code
        }
    }
}

fn dispatch(mut cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Bench(args) = &cli.command {
        cli.common.threads = args.bench_threads.or(cli.common.threads);
    }
    if let Some(threads) = cli.common.threads {
        if threads == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        // More threads than cores only makes them wait for each other (0.1 token/s at 1000).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = if threads > cores {
            eprintln!("gemma: --threads {threads} is above the {cores} cores here; using {cores}");
            cores
        } else {
            threads
        };
        // Read by the kernels' thread pool when it starts, which is after this point.
        std::env::set_var("GEMMA_THREADS", threads.to_string());
    }
    if cli.common.ctx_size == 0 {
        anyhow::bail!("--ctx-size must be at least 1");
    }
    let common = &cli.common;
    if let Command::Shield(args) = &cli.command {
        let flagged = shield::shield(common, args)?;
        return Ok(if flagged {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    match &cli.command {
        Command::Run(args) => commands::run(common, args),
        Command::Chat(args) => commands::chat(common, args),
        Command::Tokenize(args) => commands::tokenize(common, args),
        Command::Logits(args) => commands::logits(common, args),
        Command::Perplexity(args) => commands::perplexity(common, args),
        Command::Info(args) => info::info(common, args),
        Command::Bench(args) => bench::bench(common, args),
        Command::Serve(args) => serve::serve(common, args),
        Command::Extract(args) => extract::extract(common, args),
        Command::Transcribe(args) => transcribe::transcribe(common, args),
        Command::Shield(_) => unreachable!("handled above"),
    }
    .map(|()| ExitCode::SUCCESS)
}

/// The exit code of a panic: 1, or 2 for `gemma shield` (whose 1 means "flagged").
static PANIC_EXIT_CODE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(1);

/// A bug must still end with one readable line and exit code 1, not a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".into());
        let place = info
            .location()
            .map(|l| format!(" ({}:{})", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error, please report it: {}{place}",
            message.replace('\n', " ")
        );
        std::process::exit(PANIC_EXIT_CODE.load(std::sync::atomic::Ordering::Relaxed));
    }));
}
