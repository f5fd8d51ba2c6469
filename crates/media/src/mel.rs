//! Gemma 3n's audio front end: the log-mel spectrogram of transformers'
//! `Gemma3nAudioFeatureExtractor` (transformers 5.24, `models/gemma3n/feature_extraction_gemma3n.py`),
//! with its padding, truncation and mask.
//!
//! What the reference does, read from its code (line numbers in transformers 5.24):
//!
//! * **Input**: one 16 kHz mono float waveform. There is **no sample-rate check**: `__call__`
//!   (l. 267) takes `**kwargs`, so `sampling_rate=8000` is accepted and ignored and the audio is
//!   silently treated as 16 kHz. Resampling happens before, when transformers loads a file
//!   (`audio_utils.load_audio`: soundfile decode, channel mean, soxr "soxr_hq" to 16 kHz); our
//!   equivalent is [`crate::decode_audio`].
//! * **Padding and truncation** (l. 271-318, through `SequenceFeatureExtractor.pad`): defaults
//!   `padding="longest"`, `max_length=480_000`, `truncation=True`, `pad_to_multiple_of=128`. A clip
//!   longer than 480 000 samples (30 s) is cut to its first 480 000; a single clip is then
//!   right-padded with zeros to the next multiple of 128 samples. `Gemma3nProcessor` calls the
//!   extractor with exactly these defaults (it sets no audio kwargs; `processing_gemma3n.py`):
//!   it does **not** pad to 30 s. Instead every clip gets 188 audio soft tokens in the prompt and
//!   the model pads the encoder output up to 188 (see `gemma3n_architecture.md` §6). The padded
//!   waveform is converted to float32 (`pad`, `feature_extraction_sequence_utils.py` l. 218).
//! * **Frames** (`_extract_spectrogram`, l. 222-265): windows of `frame_length + 1` = 513 samples
//!   every `hop_length` = 160 samples, `(padded_len - 513) // 160 + 1` of them (none below 513
//!   samples: `_unfold`, l. 97-100). HTK pre-emphasis turns 513 samples into 512:
//!   `[x0 * (1 - 0.97), x[1..512] - 0.97 * x[0..511]]` — the 513th sample is never used. Then a
//!   periodic Hann window of 512 (`0.5 * (1 - cos(2πn/512))`, l. 198-200), a real FFT of 1024
//!   points (the next power of two, doubled by `fft_overdrive`, l. 193-196), the **magnitude**
//!   (not power), 128 triangular HTK-mel filters from 125 to 7600 Hz without area normalisation
//!   (`create_fb_matrix`, l. 28-86), and `ln(max(mel, 1e-5))`. No dither, scale, per-bin mean or
//!   standard deviation by default.
//! * **Mask** (l. 263-265): `attention_mask[::160][:frames]`, so frame `t` is valid exactly when
//!   its first sample `160 t` is a real (not padded) sample. True = valid.
//! * **Precision**: the waveform, pre-emphasis and window are float32 (numpy keeps float32 with
//!   Python-float scalars), the FFT runs in float32 (numpy >= 2), the filterbank is float64, so the
//!   mel sum and log are float64; the result is cast to float32. The float32 pre-emphasis matters
//!   (`x[i] - 0.97 x[i-1]` cancels): done in float64 instead, features move by up to 2e-4, and by
//!   1e-2 in the empty upper bands of upsampled 8 kHz audio. So we do the pre-emphasis and window
//!   exactly as the reference does, in f32, and the FFT, magnitude, mel sum and log in f64.
//! * **The window's bits**: numpy computes the Hann window in float32 with its own SIMD `cos`,
//!   one ulp away from a correctly rounded one at 37 of the 512 points. Those ulps leak through the
//!   window's far side lobes into nearly empty mel bands (the top of upsampled 8 kHz audio, at the
//!   1e-5 floor) and move features there by up to 5e-3. So the window is numpy's, bit for bit
//!   (`mel_window.rs`, written by `scripts/make_audio_fixtures.py`). With it, against the fixtures,
//!   the features agree to about 1e-6 (the reference's float32 FFT rounding).

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

use crate::mel_window::HANN_512_BITS;

/// Sample rate the front end expects.
pub const SAMPLE_RATE: u32 = 16_000;
/// Mel bins per frame (`feature_size`).
pub const MEL_BINS: usize = 128;
/// Samples per analysis window after pre-emphasis (32 ms).
pub const FRAME_LENGTH: usize = 512;
/// Samples between frames (10 ms).
pub const HOP_LENGTH: usize = 160;
/// FFT size (512 rounded up to a power of two, doubled: "fft_overdrive").
pub const FFT_LENGTH: usize = 1024;
/// Longest input the reference keeps: 30 s at 16 kHz; the rest is cut off.
pub const MAX_SAMPLES: usize = 480_000;
/// The reference pads the waveform to a multiple of this many samples.
pub const PAD_MULTIPLE: usize = 128;
/// Floor under the mel energies before the log.
pub const MEL_FLOOR: f64 = 1e-5;

const PREEMPHASIS: f32 = 0.97;
const MIN_FREQUENCY: f64 = 125.0;
const MAX_FREQUENCY: f64 = 7600.0;
const FFT_BINS: usize = FFT_LENGTH / 2 + 1;

/// Log-mel features of one clip: `features` is `[frames, MEL_BINS]` row-major, `mask[t]` is true
/// where frame `t` starts on real audio (false on padding).
#[derive(Debug, Clone, PartialEq)]
pub struct LogMel {
    pub features: Vec<f32>,
    pub mask: Vec<bool>,
}

impl LogMel {
    /// Number of frames (rows of `features`).
    pub fn frames(&self) -> usize {
        self.mask.len()
    }

    /// The 128 features of frame `t`.
    pub fn frame(&self, t: usize) -> &[f32] {
        &self.features[t * MEL_BINS..(t + 1) * MEL_BINS]
    }
}

/// Samples the reference keeps of a clip of `len` samples, and the padded length it analyses:
/// `(min(len, 480000), that rounded up to a multiple of 128)`.
pub fn padded_len(len: usize) -> (usize, usize) {
    let kept = len.min(MAX_SAMPLES);
    (kept, kept.div_ceil(PAD_MULTIPLE) * PAD_MULTIPLE)
}

/// Frames the reference produces for a clip of `len` samples (at most 2997, for 30 s).
pub fn mel_frames(len: usize) -> usize {
    frames_in(padded_len(len).1)
}

/// Whole 513-sample frames at hop 160 in `n` samples.
fn frames_in(n: usize) -> usize {
    if n <= FRAME_LENGTH {
        0
    } else {
        (n - (FRAME_LENGTH + 1)) / HOP_LENGTH + 1
    }
}

/// [`LogMel`] of a 16 kHz mono clip, exactly as `Gemma3nAudioFeatureExtractor()(samples)` computes
/// it (see the module docs): clips over 30 s are truncated, short ones give few (or zero) frames.
/// Builds a [`MelExtractor`]; keep one around to analyse many clips.
pub fn log_mel(samples_16k: &[f32]) -> LogMel {
    MelExtractor::new().log_mel(samples_16k)
}

/// The front end's fixed parts (FFT plan, window, filterbank), reusable across clips.
pub struct MelExtractor {
    fft: Arc<dyn RealToComplex<f64>>,
    window: [f32; FRAME_LENGTH],
    /// Per mel bin: the first FFT bin with a non-zero weight, and the weights from there.
    filters: Vec<(usize, Vec<f64>)>,
}

impl Default for MelExtractor {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MelExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelExtractor").finish_non_exhaustive()
    }
}

impl MelExtractor {
    pub fn new() -> Self {
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(FFT_LENGTH);
        let window = HANN_512_BITS.map(f32::from_bits);
        Self {
            fft,
            window,
            filters: mel_filterbank(),
        }
    }

    /// See [`log_mel`].
    pub fn log_mel(&self, samples_16k: &[f32]) -> LogMel {
        let (kept, _) = padded_len(samples_16k.len());
        let frames = mel_frames(samples_16k.len());
        let mut features = Vec::with_capacity(frames * MEL_BINS);
        let mut work = FrameWork::new(self);
        for t in 0..frames {
            self.frame_into(
                &samples_16k[..kept],
                t * HOP_LENGTH,
                &mut work,
                &mut features,
            );
        }
        let mask = (0..frames).map(|t| t * HOP_LENGTH < kept).collect();
        LogMel { features, mask }
    }

    /// Appends the 128 features of the frame starting at `start`; samples past the end of
    /// `samples` are the reference's zero padding.
    fn frame_into(&self, samples: &[f32], start: usize, w: &mut FrameWork, out: &mut Vec<f32>) {
        let sample = |i: usize| samples.get(i).copied().unwrap_or(0.0);
        // HTK pre-emphasis and window, in f32 as the reference rounds them.
        let first = (1.0f64 - 0.97) as f32;
        for (i, (slot, win)) in w.input.iter_mut().zip(&self.window).enumerate() {
            let y = if i == 0 {
                sample(start) * first
            } else {
                sample(start + i) - PREEMPHASIS * sample(start + i - 1)
            };
            *slot = (y * win) as f64;
        }
        w.input[FRAME_LENGTH..].fill(0.0);
        self.fft
            .process_with_scratch(&mut w.input, &mut w.spectrum, &mut w.scratch)
            .expect("buffers come from the plan");
        for (m, c) in w.magnitude.iter_mut().zip(&w.spectrum) {
            // The reference's |X| is float32.
            *m = abs(c) as f32 as f64;
        }
        for (start_bin, weights) in &self.filters {
            let mel: f64 = weights
                .iter()
                .zip(&w.magnitude[*start_bin..])
                .map(|(w, m)| w * m)
                .sum();
            out.push(mel.max(MEL_FLOOR).ln() as f32);
        }
    }
}

/// Buffers one frame's analysis reuses.
struct FrameWork {
    input: Vec<f64>,
    spectrum: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
    magnitude: [f64; FFT_BINS],
}

impl FrameWork {
    fn new(m: &MelExtractor) -> Self {
        FrameWork {
            input: m.fft.make_input_vec(),
            spectrum: m.fft.make_output_vec(),
            scratch: m.fft.make_scratch_vec(),
            magnitude: [0.0; FFT_BINS],
        }
    }
}

/// The front end over audio that arrives in pieces: [`MelStream::push`] takes 16 kHz samples and
/// returns the frames they complete; [`MelStream::finish`] pads the end as the reference pads a
/// whole clip (zeros up to a multiple of 128 samples) and returns the rest. The frames equal
/// [`log_mel`]'s of the whole clip, except that a stream has no 30 s limit.
pub struct MelStream {
    extractor: Arc<MelExtractor>,
    work: FrameWork,
    /// Samples from absolute index `first` on that a later frame still reads.
    pending: Vec<f32>,
    first: usize,
    /// Samples pushed so far.
    total: usize,
    /// Frames produced so far.
    frames: usize,
    finished: bool,
}

impl MelStream {
    pub fn new(extractor: Arc<MelExtractor>) -> Self {
        let work = FrameWork::new(&extractor);
        MelStream {
            extractor,
            work,
            pending: Vec::new(),
            first: 0,
            total: 0,
            frames: 0,
            finished: false,
        }
    }

    /// Samples pushed so far.
    pub fn samples_in(&self) -> usize {
        self.total
    }

    /// Frames produced so far.
    pub fn frames_out(&self) -> usize {
        self.frames
    }

    /// Feeds 16 kHz mono samples; returns the completed frames, `[frames, MEL_BINS]`.
    pub fn push(&mut self, samples: &[f32]) -> Vec<f32> {
        if self.finished {
            return Vec::new();
        }
        self.pending.extend_from_slice(samples);
        self.total += samples.len();
        // A frame reads FRAME_LENGTH + 1 samples (the reference's 513-sample frames).
        self.emit(frames_in(self.total))
    }

    /// Ends the clip: the last frames over the reference's padding.
    pub fn finish(&mut self) -> Vec<f32> {
        if self.finished {
            return Vec::new();
        }
        let padded = self.total.div_ceil(PAD_MULTIPLE) * PAD_MULTIPLE;
        let out = self.emit(frames_in(padded));
        self.finished = true;
        out
    }

    fn emit(&mut self, ready: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(ready.saturating_sub(self.frames) * MEL_BINS);
        while self.frames < ready {
            let start = self.frames * HOP_LENGTH - self.first;
            self.extractor
                .frame_into(&self.pending, start, &mut self.work, &mut out);
            self.frames += 1;
        }
        // Keep the samples from the next frame's start on.
        let next = self.frames * HOP_LENGTH;
        if next > self.first {
            let drop = (next - self.first).min(self.pending.len());
            self.pending.drain(..drop);
            self.first += drop;
        }
        out
    }
}

fn abs(c: &Complex<f64>) -> f64 {
    c.re.hypot(c.im)
}

/// `create_fb_matrix(513, 125, 7600, 128, 16000, 1024, norm=None)`, stored sparsely per mel bin.
fn mel_filterbank() -> Vec<(usize, Vec<f64>)> {
    let hz_to_mel = |f: f64| 2595.0 * (1.0 + f / 700.0).log10();
    let (m_min, m_max) = (hz_to_mel(MIN_FREQUENCY), hz_to_mel(MAX_FREQUENCY));
    // np.linspace(m_min, m_max, 130): start + i * step, the last point exactly m_max.
    let points = MEL_BINS + 2;
    let step = (m_max - m_min) / (points - 1) as f64;
    let f_pts: Vec<f64> = (0..points)
        .map(|i| {
            let m = if i == points - 1 {
                m_max
            } else {
                i as f64 * step + m_min
            };
            700.0 * (10f64.powf(m / 2595.0) - 1.0)
        })
        .collect();
    let bin_hz = SAMPLE_RATE as f64 / FFT_LENGTH as f64; // 15.625, exact in f32 and f64
    (0..MEL_BINS)
        .map(|m| {
            let (lo, mid, hi) = (f_pts[m], f_pts[m + 1], f_pts[m + 2]);
            let weights: Vec<f64> = (0..FFT_BINS)
                .map(|k| {
                    let f = k as f64 * bin_hz;
                    let down = -(lo - f) / (mid - lo);
                    let up = (hi - f) / (hi - mid);
                    down.min(up).max(0.0)
                })
                .collect();
            let first = weights.iter().position(|&w| w > 0.0).unwrap_or(0);
            let last = weights.iter().rposition(|&w| w > 0.0).unwrap_or(0);
            (first, weights[first..=last.max(first)].to_vec())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_gives_the_whole_clip_frames() {
        // A chirp with noise, 1.3 s: pushed in pieces of many sizes, including ones shorter
        // than a hop and ones that end mid-frame.
        let mut state = 12345u32;
        let samples: Vec<f32> = (0..20_800)
            .map(|i| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let noise = (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                let t = i as f32 / 16_000.0;
                0.5 * (2.0 * std::f32::consts::PI * (200.0 + 900.0 * t) * t).sin() + 0.05 * noise
            })
            .collect();
        let extractor = Arc::new(MelExtractor::new());
        let whole = extractor.log_mel(&samples).features;
        for piece in [1, 100, 160, 513, 2560, 16_000, 20_800] {
            let mut s = MelStream::new(extractor.clone());
            let mut got = Vec::new();
            for chunk in samples.chunks(piece) {
                got.extend(s.push(chunk));
            }
            got.extend(s.finish());
            assert_eq!(got, whole, "pieces of {piece} samples");
            assert_eq!(s.frames_out() * MEL_BINS, whole.len());
        }
        // Too short for a frame, even padded.
        let mut s = MelStream::new(extractor);
        assert!(s.push(&samples[..300]).is_empty());
        assert!(s.finish().is_empty());
    }

    #[test]
    fn frame_counts_match_the_reference() {
        // Checked against Gemma3nAudioFeatureExtractor()(np.zeros(n)) in transformers 5.24.
        for (n, frames) in [
            (0, 0),
            (1, 0),
            (100, 0),
            (512, 0),
            (513, 1),
            (640, 1),
            (641, 2),
            (16_000, 97),
            (480_005, 2997),
            (500_000, 2997),
        ] {
            assert_eq!(mel_frames(n), frames, "n = {n}");
            let lm = log_mel(&vec![0.0; n]);
            assert_eq!(lm.frames(), frames);
            assert_eq!(lm.features.len(), frames * MEL_BINS);
        }
    }

    #[test]
    fn mask_marks_frames_that_start_on_real_audio() {
        let lm = log_mel(&vec![0.1; 1000]);
        // 1000 -> padded 1024 -> (1024 - 513) / 160 + 1 = 4 frames starting at 0, 160, 320, 480.
        assert_eq!(lm.mask, vec![true; 4]);
        let lm = log_mel(&vec![0.1; 600]);
        // 600 -> 640 -> 1 frame.
        assert_eq!(lm.mask, vec![true]);
        let lm = log_mel(&vec![0.1; 32_123]);
        let valid = lm.mask.iter().filter(|&&v| v).count();
        assert_eq!(valid, 32_123usize.div_ceil(HOP_LENGTH).min(lm.frames()));
    }

    #[test]
    fn silence_is_the_floor() {
        let lm = log_mel(&[0.0; 4000]);
        assert!(lm.features.iter().all(|&f| f == (MEL_FLOOR.ln() as f32)));
    }

    #[test]
    fn truncates_at_thirty_seconds() {
        let long: Vec<f32> = (0..MAX_SAMPLES + 7000)
            .map(|i| ((i as f32) * 0.05).sin() * 0.3)
            .collect();
        let a = log_mel(&long);
        let b = log_mel(&long[..MAX_SAMPLES]);
        assert_eq!(a, b);
        assert_eq!(a.frames(), 2997);
    }

    #[test]
    fn window_is_the_periodic_hann_to_a_few_ulps() {
        for (n, &bits) in HANN_512_BITS.iter().enumerate() {
            let w = f32::from_bits(bits);
            let exact = 0.5 * (1.0 - (2.0 * std::f64::consts::PI * n as f64 / 512.0).cos());
            // A few f32 ulps: numpy rounds the argument and the cos in f32.
            assert!((w as f64 - exact).abs() <= 3e-7, "n = {n}: {w} vs {exact}");
        }
    }

    #[test]
    fn filterbank_is_triangular_in_range() {
        let fb = mel_filterbank();
        assert_eq!(fb.len(), MEL_BINS);
        // First filter starts above 125 Hz (bin 8 = 125 Hz has weight 0), last ends below 7600.
        assert!(fb[0].0 >= 8);
        let (start, w) = &fb[MEL_BINS - 1];
        assert!((start + w.len() - 1) as f64 * 15.625 < 7600.0);
        for (_, w) in &fb {
            assert!(w.iter().all(|&x| (0.0..=1.0).contains(&x)));
        }
    }
}
