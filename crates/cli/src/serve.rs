//! `gemma serve`: the OpenAI-compatible HTTP server.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use gemma_engine::gemma_media::{AudioLimits, ImageLimits};
use gemma_server::{MediaConfig, ServerConfig};

use crate::CommonArgs;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together, each with its own KV cache of --ctx-size tokens
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub parallel: usize,
    /// Requests waiting for a free slot before new ones are refused with 429
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub queue_size: usize,
    /// Seconds a request may take before it is ended
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub timeout: u64,
    /// Largest accepted request body in bytes (images and audio come in it)
    #[arg(long, default_value_t = 32 * 1024 * 1024, value_name = "BYTES")]
    pub body_limit: usize,
    /// Read image paths and file:// URLs of requests from this directory (and nowhere else);
    /// without it only data: URLs are accepted
    #[arg(long, value_name = "DIR")]
    pub allowed_media_dir: Option<PathBuf>,
    /// Largest image accepted, in pixels (width × height, checked before decoding)
    #[arg(long, default_value_t = ImageLimits::default().max_pixels, value_name = "N")]
    pub max_image_pixels: u64,
    /// Most images per request, pan-and-scan crops counted
    #[arg(long, default_value_t = MediaConfig::default().max_images, value_name = "N")]
    pub max_images: usize,
    /// Longest audio clip accepted, in seconds (clips over 30 s are cut into 30 s windows)
    #[arg(long, default_value_t = AudioLimits::DEFAULT_MAX_SECONDS, value_name = "S")]
    pub max_audio_seconds: f64,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health and /metrics
    #[arg(
        long,
        env = "GEMMA_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Require `Authorization: Bearer KEY` on /metrics
    #[arg(long, value_name = "KEY")]
    pub metrics_key: Option<String>,
    /// Open connections at most (more are closed on arrival)
    #[arg(long, default_value_t = ServerConfig::default().max_connections, value_name = "N")]
    pub max_connections: usize,
    /// Seconds a client may take to send its first byte, and then a request's headers
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub header_timeout: u64,
    /// Safety filter: a classifier checking requests and replies (a text ShieldGemma for text,
    /// ShieldGemma 2 for images; give both with two --shield)
    #[arg(long = "shield", value_name = "MODEL")]
    pub shield: Vec<PathBuf>,
    /// Built-in policies the filter enforces [default: every one of each checked kind] — text:
    /// dangerous, harassment, hate, sexual; images: dangerous, sexual, violence
    #[arg(
        long,
        value_name = "NAME,...",
        value_delimiter = ',',
        requires = "shield"
    )]
    pub shield_policies: Vec<String>,
    /// A policy of your own for the filter, in the built-in policies' style (repeatable)
    #[arg(long, value_name = "TEXT", requires = "shield")]
    pub shield_policy_text: Vec<String>,
    /// Block when P(Yes) of any policy is at or above this
    #[arg(long, default_value_t = 0.5, value_name = "P")]
    pub shield_threshold: f32,
    /// The most generated tokens held back per check of a streamed reply
    #[arg(long, default_value_t = gemma_server::shield::DEFAULT_WINDOW, value_name = "TOKENS")]
    pub shield_window: usize,
    /// Tokens in a streamed reply's first check: the first text waits for this many tokens and
    /// one check; later windows double up to --shield-window
    #[arg(long, default_value_t = gemma_server::shield::DEFAULT_FIRST_WINDOW, value_name = "TOKENS")]
    pub shield_first_window: usize,
    /// What the filter checks: the request before generation (input), the reply (output)
    #[arg(
        long,
        value_name = "STAGE,...",
        value_delimiter = ',',
        default_value = "input,output",
        requires = "shield"
    )]
    pub shield_stages: Vec<ShieldStage>,
    /// MiB of prompt prefixes (keys and values) kept beyond the slots, so a long prompt seen
    /// before — a document, a system prompt — is not computed again (0: keep none)
    #[arg(long, default_value_t = gemma_server::DEFAULT_PROMPT_CACHE_MIB, value_name = "MIB")]
    pub cache_ram: usize,
    /// Longest classifier prompt in tokens [default: each classifier's trained context]; a
    /// policy whose prompt does not fit is refused at start-up
    #[arg(long, value_name = "TOKENS", requires = "shield")]
    pub shield_ctx: Option<usize>,
}

pub fn serve(common: &CommonArgs, args: &ServeArgs) -> Result<()> {
    if args.parallel == 0 || args.queue_size == 0 || args.timeout == 0 {
        anyhow::bail!("--parallel, --queue-size and --timeout must be at least 1");
    }
    if args.max_connections == 0 || args.header_timeout == 0 {
        anyhow::bail!("--max-connections and --header-timeout must be at least 1");
    }
    if args.max_image_pixels == 0 {
        anyhow::bail!("--max-image-pixels must be at least 1");
    }
    if !(args.max_audio_seconds.is_finite() && args.max_audio_seconds > 0.0) {
        anyhow::bail!("--max-audio-seconds must be a positive number of seconds");
    }
    if let Some(dir) = &args.allowed_media_dir {
        if !dir.is_dir() {
            anyhow::bail!("--allowed-media-dir {} is not a directory", dir.display());
        }
    }
    let shield = load_shield(common, args)?;
    let loaded = common.load(&common.load_options())?;
    let trained = loaded.model.context_length();
    let ctx_size = if trained > 0 {
        common.ctx_size.min(trained)
    } else {
        common.ctx_size
    };
    let config = ServerConfig {
        host: args.host.clone(),
        port: args.port,
        parallel: args.parallel,
        ctx_size,
        queue_capacity: args.queue_size,
        request_timeout: Duration::from_secs(args.timeout),
        body_limit: args.body_limit,
        media: MediaConfig {
            allowed_dir: args.allowed_media_dir.clone(),
            limits: ImageLimits {
                max_pixels: args.max_image_pixels,
                ..ImageLimits::default()
            },
            max_images: args.max_images,
            audio_limits: AudioLimits {
                max_seconds: args.max_audio_seconds,
                ..AudioLimits::default()
            },
            ..MediaConfig::default()
        },
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        metrics_key: args.metrics_key.clone().filter(|k| !k.is_empty()),
        max_connections: args.max_connections,
        header_timeout: Duration::from_secs(args.header_timeout),
        shield,
        prompt_cache_bytes: args
            .cache_ram
            .checked_mul(1 << 20)
            .context("--cache-ram is too large")?,
    };
    gemma_server::run(loaded, config)
}

/// Loads and validates the `--shield` classifiers (memory-mapped unless `--no-mmap`): every
/// problem with them or the policies is reported here, before the server starts.
fn load_shield(
    common: &CommonArgs,
    args: &ServeArgs,
) -> Result<Option<std::sync::Arc<gemma_server::ShieldFilter>>> {
    if args.shield.is_empty() {
        return Ok(None);
    }
    let opts = gemma_server::ShieldOptions {
        policies: args
            .shield_policies
            .iter()
            .map(|p| p.trim().to_owned())
            .collect(),
        policy_texts: args.shield_policy_text.clone(),
        threshold: args.shield_threshold,
        window: args.shield_window,
        first_window: args.shield_first_window,
        input: args.shield_stages.contains(&ShieldStage::Input),
        output: args.shield_stages.contains(&ShieldStage::Output),
        ctx_size: args.shield_ctx.unwrap_or(0),
    };
    if args.shield_ctx == Some(0) {
        anyhow::bail!("--shield-ctx must be at least 1 token");
    }
    if !(0.0..=1.0).contains(&opts.threshold) {
        anyhow::bail!("--shield-threshold must be a probability between 0 and 1");
    }
    if opts.window == 0 || opts.first_window == 0 {
        anyhow::bail!("--shield-window and --shield-first-window must be at least 1 token");
    }
    let load_opts = gemma_engine::LoadOptions {
        weights: if common.no_mmap {
            gemma_engine::WeightMemory::Resident
        } else {
            gemma_engine::WeightMemory::Mapped
        },
        // A classifier runs prompts only: the file's layout, in the mapping.
        decodes: false,
        ..common.load_options()
    };
    let models = args
        .shield
        .iter()
        .map(|path| {
            gemma_engine::load(Some(path), &load_opts)
                .with_context(|| format!("--shield {}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let filter = gemma_server::ShieldFilter::new(models, &opts)?;
    for warning in &filter.warnings {
        eprintln!("gemma: warning: safety filter: {warning}");
    }
    Ok(Some(std::sync::Arc::new(filter)))
}

/// Reads the schema of `gemma run --json-schema FILE` and checks it (references, recursion)
/// without the model; what only the grammar compiler can judge is checked when generating.
pub fn read_json_schema(path: &std::path::Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let schema: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    gemma_server::schema::normalize(&schema, "check_")
        .map_err(|e| anyhow::anyhow!("unsupported JSON schema in {}: {e}", path.display()))?;
    Ok(schema)
}

/// `gemma run --json-schema FILE`: generation constrained to the schema, printed to stdout.
/// An answer cut short (by `-n` or the context) is printed, then reported as an error.
pub fn run_json_schema(
    loaded: gemma_engine::LoadedModel,
    ids: &[u32],
    params: &gemma_engine::SamplingParams,
    ctx_size: usize,
    schema: &serde_json::Value,
) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let mut printed = false;
    let result = gemma_server::constrain::generate_json(
        std::sync::Arc::new(loaded),
        ids,
        params,
        ctx_size,
        schema,
        &mut |piece| {
            printed |= !piece.is_empty();
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        },
    );
    if printed {
        writeln!(stdout)?;
    }
    result.map(|_| ())
}

/// A stage of the safety filter (`--shield-stages`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ShieldStage {
    /// The request's text and images, before generation.
    Input,
    /// The reply, in windows as it is generated.
    Output,
}
