//! The one error type of the crate. Media comes from strangers, so every message says what was
//! wrong with the input (and which limit or option applies) in words a user can act on.

use std::path::PathBuf;

/// Everything that can go wrong while reading or preparing media.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// The bytes are not one of the image formats we decode.
    #[error("not a supported image: the data is not JPEG, PNG, WebP, GIF or BMP{detail}")]
    UnknownFormat {
        /// Extra words, e.g. the name of a recognised but unsupported format.
        detail: String,
    },

    /// The header announces more pixels than allowed (checked before decoding).
    #[error(
        "image is {width}x{height} = {}, above the limit of {} (--max-image-pixels)",
        human_pixels(*width as u64 * *height as u64),
        human_pixels(*max_pixels)
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        max_pixels: u64,
    },

    /// One side of the image is longer than allowed (checked before decoding).
    #[error("image is {width}x{height}: a side is longer than the limit of {max_side} pixels")]
    SideTooLong {
        width: u32,
        height: u32,
        max_side: u32,
    },

    /// A width or height of zero.
    #[error("image is {width}x{height}: it has no pixels")]
    Empty { width: u32, height: u32 },

    /// Decoding would need more memory than allowed.
    #[error("decoding this {what} needs more memory than the limit of {} MiB", limit_bytes / (1024 * 1024))]
    MemoryLimit { what: String, limit_bytes: u64 },

    /// Truncated, corrupt or otherwise undecodable data in a recognised format.
    #[error("corrupt or truncated {format} image: {message}")]
    Corrupt {
        format: &'static str,
        message: String,
    },

    /// A valid file using a feature the decoder does not implement.
    #[error("unsupported {format} image: {message}")]
    Unsupported {
        format: &'static str,
        message: String,
    },

    /// A `data:` URL that could not be read.
    #[error("bad data URL: {0}")]
    DataUrl(String),

    /// Input larger than the byte limit the caller set.
    #[error("{what} is {} bytes, above the limit of {} bytes", size, limit)]
    TooManyBytes { what: String, size: u64, limit: u64 },

    /// A path outside the directory media may be read from.
    #[error("{} is outside the allowed media directory {}", path.display(), allowed.display())]
    OutsideAllowedDir { path: PathBuf, allowed: PathBuf },

    /// A file-system error, with the path it concerns.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// An external tool (ffmpeg, ffprobe) is not installed.
    #[error("`{tool}` was not found on PATH; it is needed to read video files such as {}. Install ffmpeg, or pass a folder of frames or an animated GIF/WebP instead", path.display())]
    ToolMissing { tool: String, path: PathBuf },

    /// An external tool ran but failed.
    #[error("`{tool}` failed on {}: {message}", path.display())]
    ToolFailed {
        tool: String,
        path: PathBuf,
        message: String,
    },

    /// A video source that yields nothing usable, or a bad sampling request.
    #[error("video {0}")]
    Video(String),

    /// The bytes are not one of the audio formats we decode.
    #[error("not a supported audio file: the data is not WAV, FLAC, MP3 or OGG/Vorbis{detail}")]
    UnknownAudioFormat {
        /// Extra words, e.g. what the demuxer said.
        detail: String,
    },

    /// Audio longer than allowed, found from the header (before decoding) or while decoding.
    #[error(
        "audio is {}{} long, above the limit of {}",
        if *from_header { "announced as " } else { "at least " },
        human_seconds(*seconds),
        human_seconds(*max_seconds)
    )]
    AudioTooLong {
        seconds: f64,
        max_seconds: f64,
        /// True when the length came from the header and nothing was decoded.
        from_header: bool,
    },

    /// Audio parameters we refuse: a sample rate of 0 or out of range, no channels, too many
    /// channels, no samples, a rate that changes mid-stream.
    #[error("invalid audio: {0}")]
    BadAudio(String),

    /// Truncated, corrupt or otherwise undecodable audio data.
    #[error("corrupt or truncated {}audio: {message}", audio_kind(format))]
    AudioCorrupt {
        /// The container as symphonia names it ("wave", "flac", "mp3", "ogg"), or "" if unknown.
        format: String,
        message: String,
    },
}

/// "WAV ", "FLAC ", "" ...: the container's usual name, to put before "audio".
fn audio_kind(format: &str) -> String {
    match format {
        "" => String::new(),
        "wave" | "wav" | "riff" => "WAV ".into(),
        "ogg" => "OGG ".into(),
        other => format!("{} ", other.to_ascii_uppercase()),
    }
}

/// "12.5 s", "10 min", "2 h 5 min": how long a clip is, in words a user reads at a glance.
pub(crate) fn human_seconds(s: f64) -> String {
    if !s.is_finite() {
        return format!("{s} s");
    }
    if s < 60.0 {
        let t = format!("{s:.1}");
        return format!("{} s", t.strip_suffix(".0").unwrap_or(&t));
    }
    let minutes = (s / 60.0).round() as u64;
    if minutes < 60 {
        format!("{minutes} min")
    } else if minutes.is_multiple_of(60) {
        format!("{} h", minutes / 60)
    } else {
        format!("{} h {} min", minutes / 60, minutes % 60)
    }
}

/// "2.5 gigapixels", "64 megapixels", "1200 pixels": decimal units, as cameras count.
pub(crate) fn human_pixels(n: u64) -> String {
    fn trim(x: f64) -> String {
        // One decimal, without a useless ".0".
        let s = format!("{x:.1}");
        s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
    }
    if n >= 1_000_000_000 {
        format!("{} gigapixels", trim(n as f64 / 1e9))
    } else if n >= 1_000_000 {
        format!("{} megapixels", trim(n as f64 / 1e6))
    } else {
        format!("{n} pixels")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_message_reads_well() {
        let e = MediaError::TooManyPixels {
            width: 50_000,
            height: 50_000,
            max_pixels: 64_000_000,
        };
        assert_eq!(
            e.to_string(),
            "image is 50000x50000 = 2.5 gigapixels, above the limit of 64 megapixels (--max-image-pixels)"
        );
        assert_eq!(human_pixels(999), "999 pixels");
        assert_eq!(human_pixels(12_345_678), "12.3 megapixels");
    }

    #[test]
    fn audio_length_message_reads_well() {
        let e = MediaError::AudioTooLong {
            seconds: 36_000.0,
            max_seconds: 600.0,
            from_header: true,
        };
        assert_eq!(
            e.to_string(),
            "audio is announced as 10 h long, above the limit of 10 min"
        );
        assert_eq!(human_seconds(12.5), "12.5 s");
        assert_eq!(human_seconds(3.0), "3 s");
        assert_eq!(human_seconds(7500.0), "2 h 5 min");
    }
}
