//! Audio from strangers: WAV, FLAC, MP3 and OGG/Vorbis files (through `symphonia`, pure Rust) and
//! raw 16-bit little-endian PCM, down-mixed to mono and resampled to 16 kHz for Gemma 3n's
//! feature extractor ([`crate::log_mel`]).
//!
//! What the reference does with an audio file (transformers 5.24 `audio_utils.load_audio`, the
//! path `processor.apply_chat_template` takes for `{"type": "audio", "path": ...}`; without
//! torchcodec installed it uses `_load_audio_soundfile`, l. 196-209): decode to float32 with
//! soundfile (integer PCM scaled by 1/32768, 1/2^23, ...), average the channels, and resample a
//! rate other than 16 kHz with soxr's "soxr_hq" to exactly `ceil(n * 16000 / rate)` samples. We do
//! the same steps: symphonia decodes (same scaling), channels are averaged in f32, and
//! [`resample_to_16k`] resamples to the same length.
//!
//! The resampler is rubato's asynchronous sinc resampler (`rubato::Async::new_sinc`) at a fixed
//! ratio: a 256-tap windowed sinc (BlackmanHarris², rubato's automatic cutoff for that length,
//! about 0.95 of the lower Nyquist frequency) tabulated at 1024 points per input sample and
//! cubic-interpolated between them, fed 1024-sample chunks. That is the configuration rubato
//! documents as equal in quality to its FFT resampler, and unlike the FFT resampler its cost and
//! memory do not depend on the ratio (44 101 Hz → 16 kHz would need 44 101-point FFTs there).
//! Two things on top of rubato (see `Resampler16k`): exact alignment (rubato's own delay
//! trimming leaves its output up to one sample early), and a per-thread cache of the last
//! resampler (building one costs tens of ms). Against soxr_hq on the fixtures the resampled signals
//! differ by 0.16-0.32 % RMS of the signal and the log-mel features below 3.4 kHz by at most 3e-4
//! (`tests/audio.rs`).
//!
//! Bounds: the byte length is checked first; the sample rate, channel count and, where the
//! container states it, the duration are checked from the header before anything is decoded
//! ([`MediaError::AudioTooLong`] with `from_header`); the duration is enforced again while
//! decoding, for containers that do not state it or state it wrongly. Decoding streams: packets
//! are down-mixed and resampled as they come, so memory is the 16 kHz output (600 s = 38 MB),
//! whatever the source rate and channel count.

use std::io::Cursor;
use std::ops::Range;

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{
    Async, FixedAsync, Indexing, Resampler, SincInterpolationParameters, SincInterpolationType,
    WindowFunction,
};
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::common::Limit;
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

use crate::error::human_seconds;
use crate::mel::SAMPLE_RATE;
use crate::MediaError;

/// Lowest sample rate accepted (Hz).
pub const MIN_SAMPLE_RATE: u32 = 1_000;
/// Highest sample rate accepted (Hz).
pub const MAX_SAMPLE_RATE: u32 = 384_000;
/// Most channels accepted.
pub const MAX_CHANNELS: usize = 32;

/// Input frames per resampler call.
const RESAMPLER_CHUNK: usize = 1024;
/// Taps of the resampler's sinc filter (a multiple of 8, as rubato wants).
const SINC_LEN: usize = 256;
/// Sinc table points per input sample (rubato interpolates between them, cubic).
const OVERSAMPLING: usize = 1024;

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// How much audio one request may bring.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AudioLimits {
    /// Longest clip accepted, in seconds of source audio (checked from the header when it says,
    /// and while decoding).
    pub max_seconds: f64,
    /// Largest encoded input accepted, in bytes.
    pub max_bytes: u64,
}

impl AudioLimits {
    /// Default [`AudioLimits::max_seconds`]: 10 minutes (Gemma 3n hears 30 s at a time; longer
    /// clips are for callers that cut them into windows).
    pub const DEFAULT_MAX_SECONDS: f64 = 600.0;
    /// Default [`AudioLimits::max_bytes`]: 256 MiB (10 min of 48 kHz stereo 24-bit WAV is 173 MB).
    pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

    pub(crate) fn validate(&self) -> Result<(), MediaError> {
        if !(self.max_seconds.is_finite() && self.max_seconds > 0.0) {
            return Err(MediaError::BadAudio(format!(
                "the duration limit must be a positive number of seconds, not {}",
                self.max_seconds
            )));
        }
        Ok(())
    }

    fn check_bytes(&self, len: usize) -> Result<(), MediaError> {
        if len as u64 > self.max_bytes {
            return Err(MediaError::TooManyBytes {
                what: "audio".into(),
                size: len as u64,
                limit: self.max_bytes,
            });
        }
        Ok(())
    }

    /// Most source frames allowed at `rate`.
    fn max_frames(&self, rate: u32) -> u64 {
        (self.max_seconds * rate as f64).floor() as u64
    }
}

impl Default for AudioLimits {
    fn default() -> Self {
        Self {
            max_seconds: Self::DEFAULT_MAX_SECONDS,
            max_bytes: Self::DEFAULT_MAX_BYTES,
        }
    }
}

/// The largest sample magnitude accepted from a float file (full scale is 1.0): far beyond
/// any real clipping, and small enough that the log-mel front end cannot overflow.
pub const MAX_SAMPLE_MAGNITUDE: f32 = 1.0e4;

/// A decoded clip, ready for [`crate::log_mel`].
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    /// Mono (mean of the channels), 16 kHz, float in [-1, 1] for integer sources.
    pub samples_16k: Vec<f32>,
    /// The source's sample rate (Hz).
    pub source_rate: u32,
    /// The source's channel count.
    pub channels: usize,
    /// Duration of the source: its frames divided by its rate.
    pub seconds: f64,
}

/// Decodes a WAV (PCM, float, A-law, µ-law), FLAC, MP3 or OGG/Vorbis file to 16 kHz mono.
///
/// The format is detected from the bytes. Errors (never panics) on: input over
/// `limits.max_bytes`, an unknown format, a sample rate outside
/// [`MIN_SAMPLE_RATE`]..=[`MAX_SAMPLE_RATE`], no channels or more than [`MAX_CHANNELS`], a clip
/// longer than `limits.max_seconds` (from the header before decoding where the container states the
/// length), truncated or corrupt data, and audio with no samples.
pub fn decode_audio(bytes: &[u8], limits: &AudioLimits) -> Result<Audio, MediaError> {
    limits.validate()?;
    limits.check_bytes(bytes.len())?;
    if bytes.is_empty() {
        return Err(MediaError::BadAudio("the data is empty (0 bytes)".into()));
    }
    let mss = MediaSourceStream::new(Box::new(Cursor::new(bytes)), Default::default());
    // Tags are skipped above 64 KiB, pictures (cover art) always: we read neither.
    let meta_opts = MetadataOptions::default()
        .limit_tag_bytes(Limit::Maximum(64 << 10))
        .limit_visual_bytes(Limit::Maximum(0));
    let mut format = symphonia::default::get_probe()
        .probe(&Hint::new(), mss, FormatOptions::default(), meta_opts)
        .map_err(probe_error)?;
    let fmt = format.format_info().short_name.to_string();
    let track = format
        .default_track(TrackType::Audio)
        .ok_or_else(|| MediaError::AudioCorrupt {
            format: fmt.clone(),
            message: "the file has no audio track with a codec we decode".into(),
        })?;
    let track_id = track.id;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| MediaError::AudioCorrupt {
            format: fmt.clone(),
            message: "the audio track has no codec parameters".into(),
        })?
        .clone();
    let num_frames = track.num_frames;
    let gapless_info = track.delay.is_some() || track.padding.is_some();

    // Header checks, before decoding anything.
    let mut rate = params.sample_rate;
    let mut channels = params.channels.as_ref().map(|c| c.count());
    if let Some(r) = rate {
        check_rate(r)?;
    }
    if let Some(c) = channels {
        check_channels(c)?;
    }
    if let (Some(r), Some(n)) = (rate, num_frames) {
        if n == 0 {
            return Err(MediaError::BadAudio(
                "the file contains no audio samples".to_string(),
            ));
        }
        if n > limits.max_frames(r) {
            return Err(MediaError::AudioTooLong {
                seconds: n as f64 / r as f64,
                max_seconds: limits.max_seconds,
                from_header: true,
            });
        }
    }

    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(|e| match e {
            SymphoniaError::Unsupported(what) => MediaError::AudioCorrupt {
                format: fmt.clone(),
                message: format!("unsupported codec: {what}"),
            },
            other => corrupt(&fmt, other),
        })?;

    let mut mono: Option<MonoTo16k> = None;
    let mut planes: Vec<Vec<f32>> = Vec::new();
    let mut decode_errors = 0usize;
    let mut last_decode_error = None;
    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(MediaError::AudioCorrupt {
                    format: fmt,
                    message: "the data ends in the middle of a packet (truncated file)".into(),
                })
            }
            Err(SymphoniaError::ResetRequired) => {
                return Err(MediaError::AudioCorrupt {
                    format: fmt,
                    message:
                        "the stream changes its layout midway (chained streams are not supported)"
                            .into(),
                })
            }
            Err(e) => return Err(corrupt(&fmt, e)),
        };
        if packet.track_id != track_id {
            continue;
        }
        let buf = match decoder.decode(&packet) {
            Ok(buf) => buf,
            Err(SymphoniaError::DecodeError(what)) => {
                // One bad packet (a damaged MP3 frame) is skipped, as players do; a stream with
                // nothing decodable fails below.
                decode_errors += 1;
                last_decode_error = Some(what);
                continue;
            }
            Err(e) => return Err(corrupt(&fmt, e)),
        };
        let spec_rate = buf.spec().rate();
        let spec_channels = buf.spec().channels().count();
        match (rate, channels) {
            (Some(r), _) if r != spec_rate => {
                return Err(MediaError::BadAudio(format!(
                    "the sample rate changes midway, from {r} Hz to {spec_rate} Hz"
                )))
            }
            (_, Some(c)) if c != spec_channels => {
                return Err(MediaError::BadAudio(format!(
                    "the channel count changes midway, from {c} to {spec_channels}"
                )))
            }
            _ => {}
        }
        if mono.is_none() {
            check_rate(spec_rate)?;
            check_channels(spec_channels)?;
            rate = Some(spec_rate);
            channels = Some(spec_channels);
            mono = Some(MonoTo16k::new(spec_rate, spec_channels, limits)?);
        }
        if buf.frames() == 0 {
            continue;
        }
        buf.copy_to_vecs_planar::<f32>(&mut planes);
        mono.as_mut()
            .expect("set above")
            .push_planar(&planes[..spec_channels])?;
    }

    let Some(mono) = mono else {
        return Err(match last_decode_error {
            Some(what) => MediaError::AudioCorrupt {
                format: fmt,
                message: format!(
                    "no packet could be decoded ({decode_errors} failed; last: {what})"
                ),
            },
            None => MediaError::BadAudio("the file contains no audio samples".to_string()),
        });
    };
    if mono.frames == 0 {
        return Err(MediaError::BadAudio(
            "the file contains no audio samples".to_string(),
        ));
    }
    if let Some(n) = num_frames {
        // WAV, FLAC and OGG state exact lengths, and a file that ends early is truncated. So does
        // an MP3 with a LAME header (it states the encoder's delay and padding too); other MP3
        // lengths come from a Xing/VBRI frame count or are estimated from the file size: allow
        // 2 % and two frames there.
        let exact = !fmt.starts_with("mp") || gapless_info;
        let slack = if exact { 0 } else { n / 50 + 2304 };
        if mono.frames + slack < n {
            return Err(MediaError::AudioCorrupt {
                format: fmt,
                message: format!(
                    "the header announces {} but the data holds {} (truncated file)",
                    human_seconds(n as f64 / mono.rate as f64),
                    human_seconds(mono.frames as f64 / mono.rate as f64)
                ),
            });
        }
    }
    mono.finish()
}

/// Raw interleaved 16-bit little-endian PCM at `rate` Hz with `channels` channels (what
/// `ffmpeg -f s16le` writes; for `gemma transcribe -`) to 16 kHz mono. Samples are scaled by
/// 1/32768 as soundfile and symphonia do. The byte length must be a whole number of frames.
pub fn pcm16_to_audio(
    bytes: &[u8],
    rate: u32,
    channels: usize,
    limits: &AudioLimits,
) -> Result<Audio, MediaError> {
    limits.validate()?;
    limits.check_bytes(bytes.len())?;
    check_rate(rate)?;
    check_channels(channels)?;
    let frame_bytes = 2 * channels;
    if bytes.is_empty() {
        return Err(MediaError::BadAudio(
            "the PCM data is empty (0 bytes)".into(),
        ));
    }
    if !bytes.len().is_multiple_of(frame_bytes) {
        return Err(MediaError::BadAudio(format!(
            "{} bytes of 16-bit PCM is not a whole number of {channels}-channel frames ({frame_bytes} bytes each)",
            bytes.len()
        )));
    }
    let frames = (bytes.len() / frame_bytes) as u64;
    if frames > limits.max_frames(rate) {
        return Err(MediaError::AudioTooLong {
            seconds: frames as f64 / rate as f64,
            max_seconds: limits.max_seconds,
            from_header: true,
        });
    }
    let mut mono = MonoTo16k::new(rate, channels, limits)?;
    let mut planes = vec![Vec::new(); channels];
    // Convert in blocks so that the planar copy stays small.
    for block in bytes.chunks(frame_bytes * 8192) {
        let n = block.len() / frame_bytes;
        for (c, plane) in planes.iter_mut().enumerate() {
            plane.clear();
            plane.extend((0..n).map(|i| {
                let o = i * frame_bytes + 2 * c;
                i16::from_le_bytes([block[o], block[o + 1]]) as f32 / 32768.0
            }));
        }
        mono.push_planar(&planes)?;
    }
    mono.finish()
}

/// Raw interleaved 16-bit little-endian PCM arriving in pieces (a microphone through `arecord`
/// or `ffmpeg -f s16le`), turned into 16 kHz mono as it comes: [`Pcm16Stream::push`] returns the
/// samples ready so far, [`Pcm16Stream::finish`] the rest. Together they are exactly what
/// [`pcm16_to_audio`] gives for the whole input; a piece may end mid-frame.
pub struct Pcm16Stream {
    mono: MonoTo16k,
    /// Bytes of an incomplete frame carried to the next push.
    partial: Vec<u8>,
    channels: usize,
    planes: Vec<Vec<f32>>,
}

impl Pcm16Stream {
    pub fn new(rate: u32, channels: usize, limits: &AudioLimits) -> Result<Self, MediaError> {
        limits.validate()?;
        check_rate(rate)?;
        check_channels(channels)?;
        Ok(Pcm16Stream {
            mono: MonoTo16k::new(rate, channels, limits)?,
            partial: Vec::new(),
            channels,
            planes: vec![Vec::new(); channels],
        })
    }

    /// Feeds bytes; returns the 16 kHz mono samples they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<f32>, MediaError> {
        let frame_bytes = 2 * self.channels;
        self.partial.extend_from_slice(bytes);
        let whole = self.partial.len() / frame_bytes * frame_bytes;
        if whole > 0 {
            let n = whole / frame_bytes;
            for (c, plane) in self.planes.iter_mut().enumerate() {
                plane.clear();
                plane.extend((0..n).map(|i| {
                    let o = i * frame_bytes + 2 * c;
                    i16::from_le_bytes([self.partial[o], self.partial[o + 1]]) as f32 / 32768.0
                }));
            }
            self.mono.push_planar(&self.planes)?;
            self.partial.drain(..whole);
        }
        Ok(self.mono.take_ready())
    }

    /// Ends the input: the last samples. A trailing incomplete frame is an error.
    pub fn finish(mut self) -> Result<Vec<f32>, MediaError> {
        if !self.partial.is_empty() {
            return Err(MediaError::BadAudio(format!(
                "the PCM input ends inside a frame ({} stray bytes of a {}-byte frame)",
                self.partial.len(),
                2 * self.channels
            )));
        }
        let mut out = self.mono.take_ready();
        out.extend(self.mono.finish()?.samples_16k);
        Ok(out)
    }
}

/// Resamples mono audio at `rate` Hz to 16 kHz: `ceil(len * 16000 / rate)` samples, as the
/// reference's soxr path gives (see the module docs for the filter). 16 kHz input is returned as
/// is.
pub fn resample_to_16k(mono: &[f32], rate: u32) -> Result<Vec<f32>, MediaError> {
    check_rate(rate)?;
    if rate == SAMPLE_RATE {
        return Ok(mono.to_vec());
    }
    let mut r = Resampler16k::new(rate)?;
    r.push(mono)?;
    r.finish()
}

/// Cuts a clip longer than `max_len` samples into windows of at most `max_len`, each cut at the
/// quietest hop (160 samples, 10 ms: least energy) among the last `search` samples before the
/// limit, so that words are not split where a pause is near. A short last window is avoided:
/// when the tail would be under `search` samples, the last two windows are cut again at the
/// quietest hop near their middle. Every sample lands in exactly one window, in order.
pub fn split_windows(samples: &[f32], max_len: usize, search: usize) -> Vec<Range<usize>> {
    const HOP: usize = 160;
    let max_len = max_len.max(2 * HOP);
    let search = search.clamp(HOP, max_len / 2);
    let energy = |r: Range<usize>| -> f64 { samples[r].iter().map(|&x| (x as f64).powi(2)).sum() };
    // The quietest hop starting in `lo..hi` (hops kept inside the clip); its middle is the cut.
    let quietest = |lo: usize, hi: usize| -> usize {
        let mut best = (f64::INFINITY, hi);
        let mut at = lo;
        while at + HOP <= hi.min(samples.len()) {
            let e = energy(at..at + HOP);
            if e < best.0 {
                best = (e, at + HOP / 2);
            }
            at += HOP;
        }
        best.1
    };
    let mut windows = Vec::new();
    let mut start = 0;
    while samples.len() - start > max_len {
        let end = quietest(start + max_len - search, start + max_len);
        windows.push(start..end);
        start = end;
    }
    windows.push(start..samples.len());
    if windows.len() >= 2 && windows[windows.len() - 1].len() < search {
        let last = windows.pop().expect("two windows");
        let prev = windows.pop().expect("two windows");
        let mid = (prev.start + last.end) / 2;
        let cut = quietest(mid - search / 2, mid + search / 2);
        windows.push(prev.start..cut);
        windows.push(cut..last.end);
    }
    windows
}

fn check_rate(rate: u32) -> Result<(), MediaError> {
    if rate == 0 {
        return Err(MediaError::BadAudio("the sample rate is 0 Hz".into()));
    }
    if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&rate) {
        return Err(MediaError::BadAudio(format!(
            "the sample rate {rate} Hz is outside the supported {MIN_SAMPLE_RATE}..={MAX_SAMPLE_RATE} Hz"
        )));
    }
    Ok(())
}

fn check_channels(channels: usize) -> Result<(), MediaError> {
    if channels == 0 {
        return Err(MediaError::BadAudio("the audio has no channels".into()));
    }
    if channels > MAX_CHANNELS {
        return Err(MediaError::BadAudio(format!(
            "the audio has {channels} channels, more than the {MAX_CHANNELS} supported"
        )));
    }
    Ok(())
}

/// An error from symphonia's probe: no format recognised, or a recognised one (named by the
/// message's `riff:` / `wav:` / `flac:` ... prefix) that failed to open.
fn probe_error(e: SymphoniaError) -> MediaError {
    let prefix = |msg: &str| -> String {
        match msg.split_once(": ") {
            Some((p, _)) if p.len() <= 8 && p.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                p.to_string()
            }
            _ => String::new(),
        }
    };
    match e {
        SymphoniaError::Unsupported(what) if what.starts_with("core (probe)") => {
            MediaError::UnknownAudioFormat {
                detail: String::new(),
            }
        }
        SymphoniaError::Unsupported(what) => MediaError::AudioCorrupt {
            format: prefix(what),
            message: format!("unsupported: {what}"),
        },
        SymphoniaError::DecodeError(what) => MediaError::AudioCorrupt {
            format: prefix(what),
            message: what.to_string(),
        },
        other => corrupt("", other),
    }
}

fn corrupt(format: &str, e: SymphoniaError) -> MediaError {
    let message = match e {
        SymphoniaError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the data ends early (truncated file)".to_string()
        }
        other => other.to_string(),
    };
    MediaError::AudioCorrupt {
        format: format.to_string(),
        message,
    }
}

/// Down-mix (mean of the channels, in f32 as numpy's float32 mean) and resample, as packets
/// arrive, counting source frames against the limit.
struct MonoTo16k {
    rate: u32,
    channels: usize,
    frames: u64,
    max_frames: u64,
    max_seconds: f64,
    mixed: Vec<f32>,
    /// None at 16 kHz: samples go straight to `out`.
    resampler: Option<Resampler16k>,
    out: Vec<f32>,
}

impl MonoTo16k {
    fn new(rate: u32, channels: usize, limits: &AudioLimits) -> Result<Self, MediaError> {
        Ok(Self {
            rate,
            channels,
            frames: 0,
            max_frames: limits.max_frames(rate),
            max_seconds: limits.max_seconds,
            mixed: Vec::new(),
            resampler: if rate == SAMPLE_RATE {
                None
            } else {
                Some(Resampler16k::new(rate)?)
            },
            out: Vec::new(),
        })
    }

    fn push_planar(&mut self, planes: &[Vec<f32>]) -> Result<(), MediaError> {
        let n = planes.first().map_or(0, Vec::len);
        self.frames += n as u64;
        if self.frames > self.max_frames {
            return Err(MediaError::AudioTooLong {
                seconds: self.frames as f64 / self.rate as f64,
                max_seconds: self.max_seconds,
                from_header: false,
            });
        }
        self.mixed.clear();
        if planes.len() == 1 {
            self.mixed.extend_from_slice(&planes[0][..n]);
        } else {
            // numpy: sum channel by channel in float32, then divide by the count.
            self.mixed.extend_from_slice(&planes[0][..n]);
            for plane in &planes[1..] {
                for (m, &x) in self.mixed.iter_mut().zip(plane) {
                    *m += x;
                }
            }
            let count = planes.len() as f32;
            for m in &mut self.mixed {
                *m /= count;
            }
        }
        // Float formats can carry NaN, infinity or absurd magnitudes (full scale is 1): they
        // would overflow the front end and poison every feature downstream, so they are the
        // file's error.
        if let Some(at) = self
            .mixed
            .iter()
            .position(|x| x.is_nan() || x.abs() > MAX_SAMPLE_MAGNITUDE)
        {
            let frame = self.frames - n as u64 + at as u64;
            return Err(MediaError::BadAudio(format!(
                "the audio has a NaN, infinite or out-of-range sample at {:.3} s (float \
                 samples are at most {MAX_SAMPLE_MAGNITUDE} in magnitude; full scale is 1)",
                frame as f64 / self.rate as f64
            )));
        }
        match &mut self.resampler {
            None => self.out.extend_from_slice(&self.mixed),
            Some(r) => r.push(&self.mixed)?,
        }
        Ok(())
    }

    /// 16 kHz samples ready so far (the rest comes from later pushes and `finish`).
    fn take_ready(&mut self) -> Vec<f32> {
        match &mut self.resampler {
            None => std::mem::take(&mut self.out),
            Some(r) => r.take_ready(),
        }
    }

    fn finish(self) -> Result<Audio, MediaError> {
        let samples_16k = match self.resampler {
            None => self.out,
            Some(r) => r.finish()?,
        };
        Ok(Audio {
            samples_16k,
            source_rate: self.rate,
            channels: self.channels,
            seconds: self.frames as f64 / self.rate as f64,
        })
    }
}

/// Streaming front of rubato's sinc resampler: chunks in, the 16 kHz signal out, aligned so that
/// output sample `k` is the source at time `k / 16000` s exactly, as soxr's is.
///
/// Alignment: rubato's sinc resampler (5.1) puts output `j` at input time
/// `(j + 1) / ratio - sinc_len / 2` (input samples; `ratio` = 16000 / rate), so its delay is
/// `sinc_len / 2 * ratio - 1` output samples, a fraction in general. Its own `output_delay()` rounds
/// that down without the `- 1`, which leaves its `process_all` early by up to a whole output
/// sample (exactly 1 at 8 kHz, 0.56 at 44.1 kHz; measured against exact tones). We prepend `lead`
/// zeros so that the delay is a whole number of output samples, and trim exactly that. What is
/// left is rubato's sinc table being read one oversampling step (1/1024 input sample) off: the
/// output is early by that much, 0.5 µs at 8 kHz, a 1e-3 relative error on a 2.5 kHz tone.
struct Resampler16k {
    /// Always Some; an Option so that `drop` can hand it to [`CACHED`].
    inner: Option<Async<f32>>,
    rate: u32,
    /// Output samples to drop at the start.
    delay: usize,
    frames_in: u64,
    pending: Vec<f32>,
    chunk_out: Vec<f32>,
    out: Vec<f32>,
    /// Output samples handed out by `take_ready` (after the delay was dropped).
    taken: usize,
    /// Delay samples already dropped from the front of `out`.
    dropped: usize,
}

impl Resampler16k {
    fn new(rate: u32) -> Result<Self, MediaError> {
        let params = SincInterpolationParameters::new(SINC_LEN, WindowFunction::BlackmanHarris2)
            .oversampling_factor(OVERSAMPLING)
            .interpolation(SincInterpolationType::Cubic);
        let inner = match CACHED.with(|c| c.borrow_mut().take()) {
            Some((r, mut inner)) if r == rate => {
                inner.reset();
                inner
            }
            _ => Async::<f32>::new_sinc(
                SAMPLE_RATE as f64 / rate as f64,
                1.0,
                &params,
                RESAMPLER_CHUNK,
                1,
                FixedAsync::Input,
            )
            .map_err(|e| {
                MediaError::BadAudio(format!("cannot resample {rate} Hz to 16 kHz: {e}"))
            })?,
        };
        let chunk_out = vec![0.0; inner.output_frames_max()];
        let inner = Some(inner);
        // Delay in input samples is SINC_LEN / 2 (+ lead); in output samples that times
        // 16000 / rate, a whole number once it is a multiple of rate / gcd(rate, 16000).
        let step = (rate / gcd(rate, SAMPLE_RATE)) as usize;
        let half = SINC_LEN / 2;
        let lead = (step - half % step) % step;
        let delay = (half + lead) * SAMPLE_RATE as usize / rate as usize - 1;
        debug_assert_eq!((half + lead) * SAMPLE_RATE as usize % rate as usize, 0);
        let mut r = Self {
            inner,
            rate,
            delay,
            frames_in: 0,
            pending: Vec::with_capacity(2 * RESAMPLER_CHUNK),
            chunk_out,
            out: Vec::new(),
            taken: 0,
            dropped: 0,
        };
        r.push(&vec![0.0; lead])?;
        r.frames_in = 0;
        Ok(r)
    }

    fn push(&mut self, mono: &[f32]) -> Result<(), MediaError> {
        self.frames_in += mono.len() as u64;
        self.pending.extend_from_slice(mono);
        let mut offset = 0;
        while self.pending.len() - offset >= RESAMPLER_CHUNK {
            self.step(offset, None)?;
            offset += RESAMPLER_CHUNK;
        }
        self.pending.drain(..offset);
        Ok(())
    }

    /// One call of the resampler on `pending[offset..]` (`partial`: that many valid frames, the
    /// rest silence).
    fn step(&mut self, offset: usize, partial: Option<usize>) -> Result<(), MediaError> {
        let failed = |e: &dyn std::fmt::Display| {
            MediaError::BadAudio(format!("resampling to 16 kHz failed: {e}"))
        };
        let len = self.pending.len().max(offset + RESAMPLER_CHUNK);
        if self.pending.len() < len {
            // A partial chunk: the resampler reads only `partial` frames, but the buffer must
            // cover a whole chunk.
            self.pending.resize(len, 0.0);
        }
        let input = InterleavedSlice::new(&self.pending[..], 1, len).map_err(|e| failed(&e))?;
        let out_len = self.chunk_out.len();
        let mut output = InterleavedSlice::new_mut(&mut self.chunk_out[..], 1, out_len)
            .map_err(|e| failed(&e))?;
        let mut indexing = Indexing::new().input_offset(offset);
        if let Some(p) = partial {
            indexing = indexing.partial_len(p);
        }
        let (_, produced) = self
            .inner
            .as_mut()
            .expect("taken only by drop")
            .process_into_buffer(&input, &mut output, Some(&indexing))
            .map_err(|e| failed(&e))?;
        self.out.extend_from_slice(&self.chunk_out[..produced]);
        Ok(())
    }

    /// Drops what is left of the delay from the front of `out`.
    fn drop_delay(&mut self) {
        let n = (self.delay - self.dropped).min(self.out.len());
        self.out.drain(..n);
        self.dropped += n;
    }

    /// The output produced so far and not yet taken. What a later `finish` returns continues
    /// it; all of it together is what `finish` alone would return.
    fn take_ready(&mut self) -> Vec<f32> {
        self.drop_delay();
        // Never hand out past the final length, which the source length so far bounds.
        let expected = (self.frames_in * SAMPLE_RATE as u64).div_ceil(self.rate as u64) as usize;
        let n = self.out.len().min(expected.saturating_sub(self.taken));
        self.taken += n;
        self.out.drain(..n).collect()
    }

    fn finish(mut self) -> Result<Vec<f32>, MediaError> {
        let expected = (self.frames_in * SAMPLE_RATE as u64).div_ceil(self.rate as u64) as usize;
        let rest = self.pending.len();
        if rest > 0 {
            self.step(0, Some(rest))?;
        }
        self.pending.clear();
        while self.dropped + self.out.len() < expected - self.taken + self.delay {
            self.step(0, Some(0))?;
        }
        self.drop_delay();
        self.out.truncate(expected - self.taken);
        Ok(std::mem::take(&mut self.out))
    }
}

impl Drop for Resampler16k {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            // A thread being torn down has no cache left: then the resampler is just dropped.
            let _ = CACHED.try_with(|c| *c.borrow_mut() = Some((self.rate, inner)));
        }
    }
}

thread_local! {
    /// The last resampler this thread finished with, and its source rate. Building one computes
    /// its 256 x 1024-point sinc table (tens of ms); clips usually come at the same few rates.
    static CACHED: std::cell::RefCell<Option<(u32, Async<f32>)>> = const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcm_stream_equals_the_whole_conversion() {
        // 1.2 s of stereo at 44.1 kHz and of mono at 16 kHz, fed in pieces that end mid-frame.
        for (rate, channels) in [(44_100u32, 2usize), (16_000, 1), (8_000, 1)] {
            let frames = rate as usize * 6 / 5;
            let mut bytes = Vec::with_capacity(frames * channels * 2);
            for i in 0..frames {
                for c in 0..channels {
                    let t = i as f32 / rate as f32;
                    let v = (0.3
                        * (2.0 * std::f32::consts::PI * (440.0 + 100.0 * c as f32) * t).sin()
                        * 32767.0) as i16;
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            let limits = AudioLimits::default();
            let whole = pcm16_to_audio(&bytes, rate, channels, &limits)
                .unwrap()
                .samples_16k;
            for piece in [3usize, 1000, 4097, bytes.len()] {
                let mut s = Pcm16Stream::new(rate, channels, &limits).unwrap();
                let mut got = Vec::new();
                for chunk in bytes.chunks(piece) {
                    got.extend(s.push(chunk).unwrap());
                }
                got.extend(s.finish().unwrap());
                assert_eq!(got.len(), whole.len(), "{rate} Hz pieces of {piece}");
                assert_eq!(got, whole, "{rate} Hz pieces of {piece}");
            }
        }
        let mut s = Pcm16Stream::new(16_000, 2, &AudioLimits::default()).unwrap();
        s.push(&[1, 2, 3]).unwrap();
        assert!(s.finish().is_err(), "a stray partial frame is an error");
    }

    #[test]
    fn windows_cut_at_the_quiet_hop_and_cover_the_clip() {
        // 70 s of tone with a silent 50 ms gap at 28.5 s and another at 57 s.
        let n = 70 * 16_000;
        let mut samples: Vec<f32> = (0..n).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
        for gap in [28_500 * 16, 57_000 * 16] {
            samples[gap..gap + 800].fill(0.0);
        }
        let w = split_windows(&samples, 480_000, 32_000);
        assert_eq!(w.len(), 3, "{w:?}");
        assert_eq!(w[0].start, 0);
        assert_eq!(w[2].end, n);
        for pair in w.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        assert!(w.iter().all(|r| r.len() <= 480_000));
        // Each cut is inside a gap.
        assert!(
            (28_500 * 16..28_500 * 16 + 800).contains(&w[0].end),
            "{w:?}"
        );
        assert!(
            (57_000 * 16..57_000 * 16 + 800).contains(&w[1].end),
            "{w:?}"
        );
        // Short clips are one window; a tail shorter than the search span is evened out.
        assert_eq!(
            split_windows(&samples[..1000], 480_000, 32_000),
            vec![0..1000]
        );
        let w = split_windows(&samples[..480_100], 480_000, 32_000);
        assert_eq!(w.len(), 2);
        assert!(
            w.iter().all(|r| r.len() >= 32_000 && r.len() <= 480_000),
            "{w:?}"
        );
    }
    use std::f64::consts::PI;

    /// Output sample k must be the source at k / 16000 s: two tones, every rate we test, checked
    /// sample by sample (soxr_hq gets within 3e-7 of these; a resampler a tenth of an output
    /// sample off is at ~1e-2).
    #[test]
    fn output_is_aligned_with_the_source() {
        let f = |t: f64| 0.5 * (2.0 * PI * 440.0 * t).sin() + 0.3 * (2.0 * PI * 2500.0 * t).sin();
        for rate in [
            8000u32, 11_025, 22_050, 32_000, 44_100, 48_000, 96_000, 44_101,
        ] {
            let x: Vec<f32> = (0..rate)
                .map(|i| f(i as f64 / rate as f64) as f32)
                .collect();
            let y = resample_to_16k(&x, rate).unwrap();
            assert_eq!(y.len(), 16_000);
            // Away from the ends, where the filter sees the clip's edges.
            let worst = (400..15_600)
                .map(|k| (y[k] as f64 - f(k as f64 / 16_000.0)).abs())
                .fold(0.0, f64::max);
            assert!(worst < 2e-3, "rate {rate}: {worst}");
        }
    }

    #[test]
    fn pushing_in_pieces_changes_nothing() {
        let x: Vec<f32> = (0..10_000).map(|i| ((i as f32) * 0.003).sin()).collect();
        let whole = resample_to_16k(&x, 44_100).unwrap();
        let mut r = Resampler16k::new(44_100).unwrap();
        for piece in x.chunks(333) {
            r.push(piece).unwrap();
        }
        assert_eq!(r.finish().unwrap(), whole);
    }

    #[test]
    fn a_reused_resampler_starts_clean() {
        // The thread's cached resampler, left mid-clip (a failed decode drops it there), must
        // give the same output as a fresh one.
        let x: Vec<f32> = (0..7000).map(|i| ((i as f32) * 0.02).sin()).collect();
        CACHED.with(|c| c.borrow_mut().take());
        let fresh = resample_to_16k(&x, 22_050).unwrap();
        let mut abandoned = Resampler16k::new(22_050).unwrap();
        abandoned.push(&x[..5000]).unwrap();
        drop(abandoned);
        assert!(CACHED.with(|c| c.borrow().is_some()));
        assert_eq!(resample_to_16k(&x, 22_050).unwrap(), fresh);
        // Another rate replaces it.
        let other = resample_to_16k(&x, 48_000).unwrap();
        assert_eq!(other.len(), 7000usize.div_ceil(3));
        assert_eq!(resample_to_16k(&x, 22_050).unwrap(), fresh);
    }

    #[test]
    fn a_tone_survives_resampling_at_its_level() {
        // 1 kHz at 44.1 kHz -> 16 kHz: same tone, same level, right length.
        let x: Vec<f32> = (0..44_100)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 44_100.0).sin() * 0.5)
            .collect();
        let y = resample_to_16k(&x, 44_100).unwrap();
        assert_eq!(y.len(), 16_000);
        for (i, &v) in y.iter().enumerate().take(15_000).skip(1000) {
            let want = (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16_000.0).sin() * 0.5;
            assert!((v - want).abs() < 2e-3, "sample {i}: {v} vs {want}");
        }
    }
}
