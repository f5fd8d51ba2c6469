//! Media decoding and preprocessing shared by the CLI, the server and the Python package.
//!
//! Media comes from strangers, so everything here treats its input as hostile: formats are
//! detected from the bytes, sizes are checked from headers before pixels are decoded, decoder
//! allocations are capped, and bad data is an error with a message a user can act on — never a
//! panic or an out-of-memory abort.
//!
//! * Images: [`decode_image`] (JPEG, PNG, WebP, GIF first frame, BMP → RGB8, converted as the
//!   reference does — see [`ReferenceRoute`] for its two ways of treating EXIF and alpha),
//!   [`pixel_values`] (resize + normalise, bit-exact with transformers' Gemma 3 processor),
//!   [`pan_and_scan`] (Gemma 3's crops, exactly as the reference cuts them).
//! * Video: [`sample_frames`] from a [`VideoSource`] (folder of frames, animated GIF/WebP, or any
//!   file through the `ffmpeg` CLI), [`mmss`] for timestamps.
//! * Audio: [`decode_audio`] (WAV, FLAC, MP3, OGG/Vorbis) and [`pcm16_to_audio`] (raw s16le) to
//!   16 kHz mono, bounded by [`AudioLimits`]; [`log_mel`], Gemma 3n's log-mel front end, equal to
//!   transformers' `Gemma3nAudioFeatureExtractor` (padding, truncation and mask included).
//! * Request plumbing: [`decode_data_url`], [`resolve_allowed_path`] / [`read_allowed_file`].
//!
//! Reference behaviour (what transformers 5.24 does, which the fixtures in `fixtures/images/`
//! pin down) is described on each function. Against those fixtures every non-JPEG image gives
//! bit-identical `pixel_values`; JPEGs differ by at most 3 levels (6/255) because our JPEG
//! decoder's IDCT rounds differently from libjpeg-turbo's (see `src/jpeg.rs`).

mod audio;
mod decode;
mod error;
mod jpeg;
pub mod mel;
mod mel_window;
mod preprocess;
mod resize;
mod source;
mod video;

pub use audio::{
    decode_audio, pcm16_to_audio, resample_to_16k, split_windows, Audio, AudioLimits, Pcm16Stream,
    MAX_CHANNELS, MAX_SAMPLE_MAGNITUDE, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE,
};
pub use decode::{decode_image, decode_image_with, probe_image, ImageLimits, ReferenceRoute};
pub use error::MediaError;
pub use image::{Rgb, RgbImage};
pub use mel::{log_mel, LogMel, MelExtractor, MelStream};
pub use preprocess::{pan_and_scan, pixel_values, PanAndScan, Preprocess};
pub use resize::resize_bilinear_antialias;
pub use source::{decode_data_url, read_allowed_file, resolve_allowed_path};
pub use video::{
    mmss, sample_frames, soundtrack, FfmpegTools, Frame, FrameSampling, VideoLimits, VideoSource,
    MAX_FRAMES,
};
