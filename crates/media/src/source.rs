//! Where media bytes come from in a request: `data:` URLs, and local files confined to the
//! directory the server operator allowed (`--allowed-media-dir`).

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

use crate::error::MediaError;

/// Decodes a `data:[<mime>][;params][;base64],<data>` URL (RFC 2397) into its MIME type
/// (lower-case, parameters dropped; `text/plain` when absent) and bytes.
///
/// Only base64 payloads are accepted: media is binary. Padding is optional, ASCII whitespace
/// (line breaks some clients insert) is ignored, and the URL-safe alphabet is accepted too. The
/// payload length is checked against `max_bytes` before anything is decoded.
pub fn decode_data_url(url: &str, max_bytes: usize) -> Result<(String, Vec<u8>), MediaError> {
    let bad = |m: &str| MediaError::DataUrl(m.to_owned());
    let scheme = url
        .get(..5)
        .ok_or_else(|| bad("it does not start with \"data:\""))?;
    if !scheme.eq_ignore_ascii_case("data:") {
        return Err(bad("it does not start with \"data:\""));
    }
    let (header, payload) = url[5..]
        .split_once(',')
        .ok_or_else(|| bad("there is no ',' before the data"))?;
    let mut parts = header.split(';');
    let mime = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let is_base64 = parts.any(|p| p.trim().eq_ignore_ascii_case("base64"));
    if !is_base64 {
        return Err(bad(
            "the data is not base64-encoded (expected \";base64,\")",
        ));
    }
    if mime.len() > 100 {
        return Err(bad("the MIME type is longer than 100 characters"));
    }
    if !mime.is_empty() && !valid_mime(&mime) {
        return Err(bad(&format!("{mime:?} is not a MIME type")));
    }
    // The URL is already in memory; what must be bounded is the decoded copy. Every 4 base64
    // characters decode to at most 3 bytes, so refuse oversized payloads before decoding.
    let compact: Vec<u8> = payload
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let upper_bound = compact.len().div_ceil(4) * 3;
    if upper_bound.saturating_sub(2) > max_bytes {
        return Err(MediaError::TooManyBytes {
            what: "data URL payload".into(),
            size: upper_bound as u64,
            limit: max_bytes as u64,
        });
    }
    let url_safe = compact.iter().any(|&b| b == b'-' || b == b'_');
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let engine = if url_safe {
        GeneralPurpose::new(&base64::alphabet::URL_SAFE, config)
    } else {
        GeneralPurpose::new(&base64::alphabet::STANDARD, config)
    };
    let bytes = engine
        .decode(&compact)
        .map_err(|e| bad(&format!("invalid base64 ({e})")))?;
    if bytes.len() > max_bytes {
        return Err(MediaError::TooManyBytes {
            what: "data URL payload".into(),
            size: bytes.len() as u64,
            limit: max_bytes as u64,
        });
    }
    Ok((
        if mime.is_empty() {
            "text/plain".into()
        } else {
            mime
        },
        bytes,
    ))
}

/// `type/subtype` made of RFC 2045 token characters.
fn valid_mime(mime: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    matches!(mime.split_once('/'), Some((t, s)) if token(t) && token(s))
}

/// Resolves `requested` (absolute, or relative to `allowed_dir`) to a canonical path inside
/// `allowed_dir`, following symlinks, and refuses anything that ends up outside it — `..`
/// components and symlinks pointing out included. The file must exist.
///
/// The check is made on the canonical path at call time; open the returned path (not the
/// original) so that the file read is the one checked. [`read_allowed_file`] does both.
pub fn resolve_allowed_path(allowed_dir: &Path, requested: &Path) -> Result<PathBuf, MediaError> {
    let allowed = allowed_dir
        .canonicalize()
        .map_err(|source| MediaError::Io {
            path: allowed_dir.to_owned(),
            source,
        })?;
    let joined = allowed.join(requested); // an absolute `requested` replaces the base
                                          // Refuse what is outside on its face before touching the file system, so that errors cannot
                                          // be used to probe which files exist elsewhere. The directory may be named through a
                                          // symlink, so a path under its name as given passes this first check too.
    let given = std::path::absolute(allowed_dir)
        .ok()
        .and_then(|p| lexically_normal(&p));
    let inside_by_name = lexically_normal(&joined).is_some_and(|p| {
        p.starts_with(&allowed) || given.as_ref().is_some_and(|g| p.starts_with(g))
    });
    if !inside_by_name {
        return Err(MediaError::OutsideAllowedDir {
            path: requested.to_owned(),
            allowed,
        });
    }
    let resolved = joined.canonicalize().map_err(|source| MediaError::Io {
        path: requested.to_owned(),
        source,
    })?;
    if !resolved.starts_with(&allowed) {
        return Err(MediaError::OutsideAllowedDir {
            path: requested.to_owned(),
            allowed,
        });
    }
    Ok(resolved)
}

/// `path` with `.` and `..` resolved by name alone (no symlinks followed); `None` if `..` climbs
/// above the root.
fn lexically_normal(path: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    Some(out)
}

/// Reads a file confined to `allowed_dir` (see [`resolve_allowed_path`]), refusing files larger
/// than `max_bytes` (also if the file grows while being read) and anything but regular files.
pub fn read_allowed_file(
    allowed_dir: &Path,
    requested: &Path,
    max_bytes: u64,
) -> Result<Vec<u8>, MediaError> {
    let path = resolve_allowed_path(allowed_dir, requested)?;
    let io_err = |source| MediaError::Io {
        path: requested.to_owned(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(io_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    if meta.len() > max_bytes {
        return Err(MediaError::TooManyBytes {
            what: requested.display().to_string(),
            size: meta.len(),
            limit: max_bytes,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > max_bytes {
        return Err(MediaError::TooManyBytes {
            what: requested.display().to_string(),
            size: bytes.len() as u64,
            limit: max_bytes,
        });
    }
    Ok(bytes)
}
