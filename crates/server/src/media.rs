//! Images and audio in requests: where image bytes may come from (`data:` URLs always, local
//! files only under `--allowed-media-dir`, never the network), audio (base64 in the request or
//! an uploaded file), the limits on both, and turning them into prepared images and clips. Runs
//! on the blocking thread that prepares the request.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use gemma_engine::gemma_media::{self, AudioLimits, ImageLimits, MediaError};
use gemma_engine::{AudioOptions, ImageOptions, LoadedModel, PreparedAudio, PreparedImage};

use crate::error::ApiError;

/// What the operator allows images to cost.
#[derive(Clone, Debug)]
pub struct MediaConfig {
    /// Local paths and `file://` URLs are read only under this directory (`--allowed-media-dir`);
    /// without it they are refused.
    pub allowed_dir: Option<PathBuf>,
    /// Bounds on one decoded image (`--max-image-pixels`).
    pub limits: ImageLimits,
    /// Most images per request, pan-and-scan crops counted (`--max-images`).
    pub max_images: usize,
    /// Largest encoded image (a data URL's decoded payload or a file), in bytes.
    pub max_image_bytes: usize,
    /// Bounds on one audio clip: `max_seconds` is `--max-audio-seconds` (longer clips are a
    /// 400; clips over the model's 30 s are cut into windows up to it).
    pub audio_limits: AudioLimits,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            allowed_dir: None,
            limits: ImageLimits::default(),
            max_images: 16,
            max_image_bytes: 32 * 1024 * 1024,
            audio_limits: AudioLimits::default(),
        }
    }
}

/// An image part of a request, in the order its marker appears in the rendered prompt.
#[derive(Debug)]
pub struct ImageRef {
    pub url: String,
    /// Where it is in the request, for error messages (`messages[1].content[2].image_url`).
    pub param: String,
}

/// Reads, decodes and preprocesses every image of a request, in order. Refuses requests with
/// more images (crops counted) than allowed before decoding what it need not.
pub fn prepare_images(
    loaded: &LoadedModel,
    config: &MediaConfig,
    refs: &[ImageRef],
    pan_and_scan: bool,
) -> Result<Vec<PreparedImage>, ApiError> {
    if refs.is_empty() {
        return Ok(Vec::new());
    }
    if let Err(e) = loaded.vision() {
        return Err(ApiError::bad_request(format!("{e:#}"))
            .with_param(&refs[0].param)
            .with_code("images_not_supported"));
    }
    if refs.len() > config.max_images {
        return Err(too_many(refs.len(), config.max_images, false));
    }
    let opts = ImageOptions {
        pan_and_scan,
        limits: config.limits.clone(),
    };
    let mut images = Vec::with_capacity(refs.len());
    let mut views = 0;
    for (i, r) in refs.iter().enumerate() {
        let bytes = image_bytes(config, &r.url).map_err(|e| e.with_param(&r.param))?;
        let image = loaded.prepare_image(&bytes, &opts).map_err(|e| {
            if e.downcast_ref::<MediaError>().is_some() {
                ApiError::bad_request(format!("{} is not a usable image: {e:#}", r.param))
                    .with_param(&r.param)
                    .with_code("invalid_image")
            } else {
                ApiError::internal(format!("{e:#}"))
            }
        })?;
        views += image.views.len();
        // Each image left still needs at least one view.
        if views + (refs.len() - i - 1) > config.max_images {
            return Err(too_many(
                views + refs.len() - i - 1,
                config.max_images,
                true,
            ));
        }
        images.push(image);
    }
    Ok(images)
}

fn too_many(n: usize, max: usize, crops: bool) -> ApiError {
    let what = if crops {
        format!("at least {n} images counting the pan-and-scan crops")
    } else {
        format!("{n} images")
    };
    ApiError::bad_request(format!(
        "the request has {what}; this server takes at most {max} per request (--max-images)"
    ))
    .with_param("messages")
    .with_code("too_many_images")
}

/// An audio part of a request (`input_audio`), in the order its marker appears in the
/// rendered prompt.
#[derive(Debug)]
pub struct AudioRef {
    /// Base64 (or a `data:audio/...;base64,` URL, which some clients send).
    pub data: String,
    /// The `format` the client named (`wav`, `mp3`, ...), if any.
    pub format: Option<String>,
    /// Where it is in the request, for error messages (`messages[0].content[1].input_audio`).
    pub param: String,
}

/// The audio formats the decoder reads, as `input_audio.format` names them (the bytes are
/// sniffed; the name only has to be one of these).
pub const AUDIO_FORMATS: &[&str] = &["wav", "mp3", "flac", "ogg", "oga", "x-wav", "wave", "mpeg"];

/// The refusal of audio for a model without an audio tower.
pub fn no_hearing(loaded: &LoadedModel, param: &str) -> Option<ApiError> {
    loaded.hearing().err().map(|e| {
        ApiError::bad_request(format!("{e:#}"))
            .with_param(param)
            .with_code("audio_not_supported")
    })
}

/// Decodes every audio part of a request, in order: base64, then the file (WAV, FLAC, MP3,
/// OGG/Vorbis) under the configured limits, cut into the model's windows.
pub fn prepare_audio(
    loaded: &LoadedModel,
    config: &MediaConfig,
    refs: &[AudioRef],
) -> Result<Vec<PreparedAudio>, ApiError> {
    if let Some(r) = refs.first() {
        if let Some(e) = no_hearing(loaded, &r.param) {
            return Err(e);
        }
    }
    refs.iter()
        .map(|r| {
            if let Some(format) = &r.format {
                let f = format.trim().to_ascii_lowercase();
                if !AUDIO_FORMATS.contains(&f.as_str()) {
                    return Err(ApiError::bad_request(format!(
                        "{}.format is {format:?}; this server reads wav, mp3, flac and ogg audio",
                        r.param
                    ))
                    .with_param(&r.param)
                    .with_code("invalid_audio"));
                }
            }
            let bytes = audio_bytes(config, &r.data).map_err(|e| e.with_param(&r.param))?;
            clip(loaded, config, &bytes, &r.param)
        })
        .collect()
}

/// Decodes and prepares one audio file's bytes; every failure is the client's (a 400 naming
/// `param`), as the model's hearing was checked before.
pub fn clip(
    loaded: &LoadedModel,
    config: &MediaConfig,
    bytes: &[u8],
    param: &str,
) -> Result<PreparedAudio, ApiError> {
    if let Some(e) = no_hearing(loaded, param) {
        return Err(e);
    }
    let opts = AudioOptions {
        limits: config.audio_limits,
    };
    loaded.prepare_audio(bytes, &opts).map_err(|e| {
        let mut message = format!("{param} is not usable audio: {e:#}");
        if matches!(
            e.downcast_ref::<MediaError>(),
            Some(MediaError::AudioTooLong { .. })
        ) {
            message.push_str(" (--max-audio-seconds)");
        }
        ApiError::bad_request(message)
            .with_param(param)
            .with_code("invalid_audio")
    })
}

/// The bytes of base64 audio data: plain base64 as OpenAI sends it (padding optional,
/// whitespace ignored), or a `data:` URL.
fn audio_bytes(config: &MediaConfig, data: &str) -> Result<Vec<u8>, ApiError> {
    let invalid = |m: String| ApiError::bad_request(m).with_code("invalid_audio");
    let data = data.trim();
    if data.is_empty() {
        return Err(invalid("the audio data is empty".into()));
    }
    let limit = config.audio_limits.max_bytes.min(usize::MAX as u64) as usize;
    if data.len() > 5 && data[..5].eq_ignore_ascii_case("data:") {
        let (mime, bytes) =
            gemma_media::decode_data_url(data, limit).map_err(|e| invalid(format!("{e}")))?;
        if !(mime.starts_with("audio/") || mime == "application/octet-stream") {
            return Err(invalid(format!(
                "the data URL holds {mime}, not audio (expected data:audio/...;base64,...)"
            )));
        }
        return Ok(bytes);
    }
    if data.len() / 4 * 3 > limit {
        return Err(invalid(format!(
            "the audio data is over the limit of {limit} bytes"
        )));
    }
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine
        .decode(compact.as_bytes())
        .map_err(|e| invalid(format!("the audio data is not valid base64 ({e})")))
}

const REMOTE: &str = "remote image URLs are not fetched: send the image as a data: URL \
                      (data:image/png;base64,...)";

/// The encoded bytes an image URL stands for.
pub(crate) fn image_bytes(config: &MediaConfig, url: &str) -> Result<Vec<u8>, ApiError> {
    let url = url.trim();
    if url.is_empty() {
        return Err(ApiError::bad_request("the image URL is empty"));
    }
    match scheme(url).map(|s| s.to_ascii_lowercase()).as_deref() {
        Some("data") => {
            let (mime, bytes) = gemma_media::decode_data_url(url, config.max_image_bytes)
                .map_err(|e| ApiError::bad_request(e.to_string()).with_code("invalid_image"))?;
            if !(mime.starts_with("image/") || mime == "application/octet-stream") {
                return Err(ApiError::bad_request(format!(
                    "the data URL holds {mime}, not an image (expected data:image/...;base64,...)"
                ))
                .with_code("invalid_image"));
            }
            Ok(bytes)
        }
        Some("file") => read_local(config, &file_url_path(url)?),
        Some("http") | Some("https") => Err(ApiError::bad_request(REMOTE)),
        Some(other) => Err(ApiError::bad_request(format!(
            "unsupported image URL scheme \"{other}:\": {REMOTE}"
        ))),
        None => read_local(config, Path::new(url)),
    }
}

/// The scheme of `url` (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`, before a
/// `:`); `None` for a plain path. One letter is a Windows drive, not a scheme.
fn scheme(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (scheme.len() > 1
        && first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)))
    .then_some(scheme)
}

/// The path of a `file:` URL: `file:///abs/path` or `file://localhost/abs/path`,
/// percent-decoded.
fn file_url_path(url: &str) -> Result<PathBuf, ApiError> {
    let rest = &url[5..];
    let path = match rest.strip_prefix("//") {
        Some(after) if after.starts_with('/') => after,
        Some(after)
            if after
                .get(..10)
                .is_some_and(|host| host.eq_ignore_ascii_case("localhost/")) =>
        {
            &after[9..]
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "a file URL must name a local absolute path (file:///path/to/image.png)",
            ))
        }
        None if rest.starts_with('/') => rest,
        None => {
            return Err(ApiError::bad_request(
                "a file URL must name an absolute path (file:///path/to/image.png)",
            ))
        }
    };
    let decoded = percent_decode(path)
        .ok_or_else(|| ApiError::bad_request("the file URL has a bad percent-escape"))?;
    Ok(PathBuf::from(decoded))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn read_local(config: &MediaConfig, path: &Path) -> Result<Vec<u8>, ApiError> {
    let Some(dir) = &config.allowed_dir else {
        return Err(ApiError::bad_request(
            "local image files are not read by this server (it was started without \
             --allowed-media-dir): send the image as a data: URL",
        ));
    };
    gemma_media::read_allowed_file(dir, path, config.max_image_bytes as u64).map_err(|e| {
        let message = match e {
            MediaError::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidInput => {
                format!("cannot read the image file {}: {source}", path.display())
            }
            // A path outside the directory and a missing one get the same answer: a client
            // learns nothing about which files the server has.
            MediaError::OutsideAllowedDir { .. } | MediaError::Io { .. } => format!(
                "{} is not a file in the directory this server reads images from \
                 (--allowed-media-dir)",
                path.display()
            ),
            other => other.to_string(),
        };
        ApiError::bad_request(message).with_code("invalid_image")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_paths() {
        assert_eq!(scheme("data:image/png;base64,AA"), Some("data"));
        assert_eq!(scheme("HTTPS://x"), Some("HTTPS"));
        assert_eq!(scheme("/tmp/a.png"), None);
        assert_eq!(scheme("C:\\a.png"), None);
        assert_eq!(scheme("a/b:c.png"), None);
        assert_eq!(
            file_url_path("file:///tmp/a%20b.png").unwrap(),
            PathBuf::from("/tmp/a b.png")
        );
        assert_eq!(
            file_url_path("file://localhost/tmp/a.png").unwrap(),
            PathBuf::from("/tmp/a.png")
        );
        assert!(file_url_path("file://host/tmp/a.png").is_err());
        assert!(file_url_path("file:a.png").is_err());
        assert!(file_url_path("file:///a%zz").is_err());
    }

    #[test]
    fn remote_and_local_urls_are_refused_without_permission() {
        let config = MediaConfig::default();
        for url in ["http://example.com/a.png", "https://example.com/a.png"] {
            let e = image_bytes(&config, url).unwrap_err();
            assert!(
                e.message.contains("remote image URLs are not fetched"),
                "{e}"
            );
        }
        let e = image_bytes(&config, "ftp://example.com/a.png").unwrap_err();
        assert!(e.message.contains("not fetched"), "{e}");
        let e = image_bytes(&config, "/etc/passwd").unwrap_err();
        assert!(e.message.contains("--allowed-media-dir"), "{e}");
        let e = image_bytes(&config, "data:text/plain;base64,aGk=").unwrap_err();
        assert!(e.message.contains("not an image"), "{e}");
        let e = image_bytes(&config, "data:image/png;base64,@@@").unwrap_err();
        assert!(e.message.contains("base64"), "{e}");
    }
}
