//! Video in a prompt: sampled frames as timestamped images and, for models that hear (Gemma 3n),
//! the soundtrack cut at the frames' times into audio clips, each placed right after the frame
//! of its time span: `mm:ss <image><audio of [t_i, t_i+1)>` per frame, the last clip running to
//! the end of the soundtrack.
//!
//! Context: a Gemma 3n image is 256 tokens and a clip 188 (the reference pads every clip to
//! that), about 456 per frame with its sound and the text around them. So Gemma 3n's default
//! is [`DEFAULT_MAX_FRAMES_GEMMA3N`] frames: a 30-second clip (one frame per 5 s) takes about
//! 2 750 tokens, inside the default 4096-token context with room for the question and answer
//! (`crates/engine/tests/gemma3n_vision.rs` checks it at the real sizes).

use anyhow::Result;
use gemma_media::Frame;

use crate::audio::{PreparedAudio, AUDIO_MARKER};
use crate::load::LoadedModel;
use crate::vision::{ImageOptions, PreparedImage, VisionFamily};

/// Gemma 3's default `--max-frames` (16 × ~264 tokens).
pub const DEFAULT_MAX_FRAMES: usize = 16;
/// Gemma 3n's default `--max-frames`: each frame also brings its soundtrack segment.
pub const DEFAULT_MAX_FRAMES_GEMMA3N: usize = 6;

/// A video ready for a prompt: its frames, its sound segments and the text of their slots.
#[derive(Debug, Default)]
pub struct PreparedVideo {
    pub images: Vec<PreparedImage>,
    pub audio: Vec<PreparedAudio>,
    /// One `mm:ss <image marker>` per frame, each followed by an audio marker when the frame has
    /// a sound segment.
    pub text: String,
}

/// The shortest sound segment kept beside a frame (32 ms, one log-mel frame).
const MIN_SEGMENT_SAMPLES: usize = 513;

impl LoadedModel {
    /// `--max-frames` when not given: fewer frames for Gemma 3n, whose frames come with sound.
    pub fn default_max_frames(&self) -> usize {
        match &self.vision {
            Some(v) if v.family == VisionFamily::Gemma3n => DEFAULT_MAX_FRAMES_GEMMA3N,
            _ => DEFAULT_MAX_FRAMES,
        }
    }

    /// Prepares sampled `frames` and, when the model hears and there is one, the 16 kHz
    /// `soundtrack` cut at the frames' timestamps.
    pub fn prepare_video(
        &self,
        frames: &[Frame],
        soundtrack: Option<&[f32]>,
        opts: &ImageOptions,
    ) -> Result<PreparedVideo> {
        let (images, _) = self.prepare_frames(frames, opts)?;
        let hearing = match soundtrack {
            Some(_) => self.audio.as_ref(),
            None => None,
        };
        let samples = soundtrack.unwrap_or_default();
        let mut out = PreparedVideo {
            images,
            ..PreparedVideo::default()
        };
        let rate = gemma_media::mel::SAMPLE_RATE as f64;
        for (i, frame) in frames.iter().enumerate() {
            out.text.push_str(&format!(
                "{} {}",
                gemma_media::mmss(frame.timestamp_secs),
                crate::vision::IMAGE_MARKER
            ));
            let Some(hearing) = hearing else { continue };
            let at = |t: f64| ((t.max(0.0) * rate) as usize).min(samples.len());
            let start = at(frame.timestamp_secs);
            let end = match frames.get(i + 1) {
                Some(next) => at(next.timestamp_secs),
                None => samples.len(),
            };
            if end.saturating_sub(start) < MIN_SEGMENT_SAMPLES {
                continue;
            }
            out.audio
                .push(hearing.prepare_samples(&samples[start..end])?);
            out.text.push_str(AUDIO_MARKER);
        }
        Ok(out)
    }
}
