//! `gemma transcribe`: speech to text (or to another language) with Gemma 3n.
//!
//! A file is heard the way the reference hears a clip: cut into windows of at most 30 s (at
//! pauses), each window one prompt. `-` reads raw 16-bit PCM from stdin as it arrives (a
//! microphone through `arecord -f S16_LE -r 16000 -c 1 -t raw` or `ffmpeg ... -f s16le -`): the
//! audio is encoded and enters the KV cache while it is spoken, and each window's text comes out
//! as soon as the window is full or the input ends.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma_engine::audio::AudioTask;
use gemma_engine::gemma_media::{AudioLimits, Pcm16Stream};
use gemma_engine::{AudioOptions, LiveAudio, SamplingParams};

use crate::{CommonArgs, SamplingArgs};

#[derive(Args)]
pub struct TranscribeArgs {
    /// Audio file (WAV, FLAC, MP3, OGG/Vorbis), or `-` for raw 16-bit little-endian PCM on
    /// stdin, read as it arrives
    pub input: PathBuf,
    /// Translate the speech into this language (a name, or a code such as fr) instead of
    /// transcribing it
    #[arg(long, value_name = "LANG")]
    pub translate_to: Option<String>,
    /// Ask this instead of the transcription / translation instruction
    #[arg(long, value_name = "TEXT", conflicts_with = "translate_to")]
    pub prompt: Option<String>,
    /// Sample rate of the PCM on stdin
    #[arg(long, default_value_t = 16_000, value_name = "HZ")]
    pub rate: u32,
    /// Channels of the PCM on stdin (interleaved)
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub channels: usize,
    /// Most stdin audio taken in at a time, in milliseconds. Each push takes what has arrived
    /// (a microphone's pipe delivers a few ms at a time), so a machine slower than real time
    /// catches up with larger pushes instead of falling further behind
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    pub chunk_ms: u32,
    /// Longest audio accepted, in seconds (for stdin: in total)
    #[arg(long, default_value_t = 3600.0, value_name = "S")]
    pub max_audio_seconds: f64,
    /// Print each window's time span before its text
    #[arg(long)]
    pub timestamps: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

fn stamp(seconds: f64) -> String {
    let total = seconds.max(0.0);
    let minutes = (total / 60.0).floor();
    format!("{:02}:{:05.2}", minutes as u64, total - minutes * 60.0)
}

pub fn transcribe(common: &CommonArgs, args: &TranscribeArgs) -> Result<()> {
    let instruction = match (&args.prompt, &args.translate_to) {
        (Some(p), _) => p.clone(),
        (None, Some(lang)) => AudioTask::Translate { to: lang.clone() }.instruction(),
        (None, None) => AudioTask::Transcribe.instruction(),
    };
    // Greedy unless asked otherwise: the text should not depend on luck.
    let params = args.sampling.to_params_over(SamplingParams {
        temperature: 0.0,
        max_tokens: 512,
        ..SamplingParams::default()
    })?;
    let limits = AudioLimits {
        max_seconds: args.max_audio_seconds,
        ..AudioLimits::default()
    };
    let loaded = crate::commands::load_for(common)?;
    loaded.hearing()?;
    let ctx_size = crate::commands::context_size(common, &loaded);
    if args.input.as_os_str() == "-" {
        return transcribe_stdin(&loaded, args, &instruction, &params, &limits, ctx_size);
    }
    let bytes = crate::commands::read_media(&args.input)?;
    let clip = loaded
        .prepare_audio(&bytes, &AudioOptions { limits })
        .with_context(|| format!("audio {}", args.input.display()))?;
    let timestamps = args.timestamps;
    let out = std::cell::RefCell::new(crate::commands::TextSink::stdout());
    loaded.transcribe(
        &clip,
        &instruction,
        &params,
        ctx_size,
        &mut |i, start, end| {
            let mut out = out.borrow_mut();
            if i > 0 {
                out.write("\n");
            }
            if timestamps {
                out.write(&format!("[{} - {}] ", stamp(start), stamp(end)));
            }
        },
        &mut |text| out.borrow_mut().write(text),
    )?;
    out.borrow_mut().end_line();
    Ok(())
}

fn transcribe_stdin(
    loaded: &gemma_engine::LoadedModel,
    args: &TranscribeArgs,
    instruction: &str,
    params: &SamplingParams,
    limits: &AudioLimits,
    ctx_size: usize,
) -> Result<()> {
    if args.chunk_ms == 0 {
        bail!("--chunk-ms must be at least 1");
    }
    let mut pcm = Pcm16Stream::new(args.rate, args.channels, limits).context("stdin PCM")?;
    let mut live = LiveAudio::new(loaded, instruction, ctx_size)?;
    let mut out = crate::commands::TextSink::stdout();
    let frame_bytes = 2 * args.channels;
    let chunk = (args.rate as usize * args.chunk_ms as usize / 1000).max(1) * frame_bytes;
    let mut buf = vec![0u8; chunk];
    let mut stdin = std::io::stdin().lock();
    let mut heard = 0.0f64;
    let mut windows = 0usize;
    let mut answer = |live: &mut LiveAudio, heard: f64, windows: &mut usize| -> Result<()> {
        if *windows > 0 {
            out.write("\n");
        }
        if args.timestamps {
            let start = heard - live.window_seconds();
            out.write(&format!("[{} - {}] ", stamp(start), stamp(heard)));
        }
        live.answer(params, &mut |text| out.write(text))?;
        *windows += 1;
        Ok(())
    };
    let mut feed = |live: &mut LiveAudio, samples: &[f32], heard: &mut f64, windows: &mut usize| {
        let mut at = 0;
        while at < samples.len() {
            let taken = live.push(&samples[at..])?;
            at += taken;
            *heard += taken as f64 / 16_000.0;
            if live.window_full() {
                answer(live, *heard, windows)?;
            }
        }
        anyhow::Ok(())
    };
    loop {
        // Whatever is available, up to one chunk: a pipe from a microphone gives it in time.
        let n = match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot read stdin"),
        };
        let samples = pcm.push(&buf[..n]).context("stdin PCM")?;
        feed(&mut live, &samples, &mut heard, &mut windows)?;
    }
    let rest = pcm.finish().context("stdin PCM")?;
    feed(&mut live, &rest, &mut heard, &mut windows)?;
    if live.window_seconds() > 0.0 {
        answer(&mut live, heard, &mut windows)?;
    } else if windows == 0 {
        bail!("no audio on stdin");
    }
    out.end_line();
    Ok(())
}
