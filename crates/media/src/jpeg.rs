//! JPEG decoding with the reference's decoder.
//!
//! The reference (Pillow and torchvision) decodes JPEG with libjpeg-turbo's defaults: the
//! `JDCT_ISLOW` integer IDCT and "fancy" (triangle) chroma upsampling. We call the same decoder —
//! MozJPEG's copy of libjpeg-turbo's decompressor, compiled from source by the `mozjpeg-sys`
//! crate without SIMD (whose IDCT and upsampling give the same pixels as the C code) — through
//! the small C function in `csrc/jpeg_shim.c`, which catches libjpeg's fatal errors with
//! `setjmp`/`longjmp` inside C and returns a code. The pixels are therefore the reference's
//! exactly (measured on `fixtures/images/`). Pure-Rust decoders were not close enough:
//! `jpeg-decoder` rounds its IDCT differently (up to 3 levels), `zune-jpeg` upsamples the edges of
//! 4:2:0 images differently (up to ~40 levels).
//!
//! Before libjpeg sees the data, the frame header is read here to check the size against the
//! limits, and libjpeg's memory and progressive-scan count are capped.

use std::ffi::{c_char, c_int, c_long, c_uint, CStr};

use image::RgbImage;
// Only linked: the libjpeg functions are called from csrc/jpeg_shim.c.
use mozjpeg_sys as _;

use crate::decode::{ImageLimits, ReferenceRoute};
use crate::error::MediaError;

// Result codes of gm_jpeg_decode (csrc/jpeg_shim.c).
const GM_OK: c_int = 0;
const GM_ERROR: c_int = 1;
const GM_TRUNCATED: c_int = 2;
const GM_TOO_MANY_SCANS: c_int = 3;
/// libjpeg's JMSG_LENGTH_MAX.
const MESSAGE_LEN: usize = 200;
/// Progressive files may repeat scans without end; real ones have about ten. (TurboJPEG's
/// `TJFLAG_LIMITSCANS` uses the same cap.)
const MAX_SCANS: c_int = 500;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn gm_jpeg_decode(
        data: *const u8,
        len: usize,
        out: *mut u8,
        out_len: usize,
        width: c_uint,
        height: c_uint,
        components: c_int,
        max_memory: c_long,
        max_scans: c_int,
        message: *mut c_char,
    ) -> c_int;
}

fn corrupt(message: impl Into<String>) -> MediaError {
    MediaError::Corrupt {
        format: "JPEG",
        message: message.into(),
    }
}

/// What the frame header (SOFn) says.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    width: u32,
    height: u32,
    components: u8,
    /// Bits per sample.
    precision: u8,
    /// The SOF marker's low byte: 0xC0 baseline, 0xC2 progressive, 0xC3 lossless, ….
    marker: u8,
}

/// A marker segment: its marker byte and its payload (after the length field), which may be cut
/// short when the data ends inside it.
struct Segment<'a> {
    marker: u8,
    payload: &'a [u8],
}

/// Walks the marker segments before the first scan, calling `visit` on each until it returns
/// `Some`. Errors if the data ends, or the scan starts, before that.
fn walk_segments<'a, T>(
    bytes: &'a [u8],
    mut visit: impl FnMut(Segment<'a>) -> Option<T>,
) -> Result<T, MediaError> {
    let mut pos = 2; // after SOI
    loop {
        // Fill bytes (0xFF) may precede a marker.
        while bytes.get(pos) == Some(&0xFF) && bytes.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (bytes.get(pos), bytes.get(pos + 1)) else {
            return Err(corrupt("the data ends before the frame header"));
        };
        pos += 2;
        match marker {
            // Markers without a length field.
            0x01 | 0xD0..=0xD7 => continue,
            0xD8..=0xDA => return Err(corrupt("no frame header before the image data")),
            _ => {}
        }
        let len = match bytes.get(pos..pos + 2) {
            Some(b) => usize::from(u16::from_be_bytes([b[0], b[1]])),
            None => return Err(corrupt("the data ends inside a marker")),
        };
        if len < 2 {
            return Err(corrupt("a marker segment has an impossible length"));
        }
        let payload = &bytes[pos + 2..(pos + len).min(bytes.len())];
        if let Some(found) = visit(Segment { marker, payload }) {
            return Ok(found);
        }
        pos += len;
    }
}

/// The frame header, read by walking the marker segments ourselves: this checks the size against
/// the limits before the decoder allocates anything.
fn frame_header(bytes: &[u8]) -> Result<Frame, MediaError> {
    walk_segments(bytes, |segment| {
        // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
        let sof =
            matches!(segment.marker, 0xC0..=0xCF) && !matches!(segment.marker, 0xC4 | 0xC8 | 0xCC);
        if !sof {
            return None;
        }
        Some(match segment.payload.get(..6) {
            Some(p) => Ok(Frame {
                precision: p[0],
                height: u32::from(u16::from_be_bytes([p[1], p[2]])),
                width: u32::from(u16::from_be_bytes([p[3], p[4]])),
                components: p[5],
                marker: segment.marker,
            }),
            None => Err(corrupt("the frame header is cut off")),
        })
    })?
}

/// The TIFF data of the first APP1 "Exif" segment before the first scan, if any.
fn exif_chunk(bytes: &[u8]) -> Option<&[u8]> {
    walk_segments(bytes, |segment| {
        (segment.marker == 0xE1)
            .then(|| segment.payload.strip_prefix(b"Exif\0\0"))
            .flatten()
    })
    .ok()
}

/// Width and height from the frame header, without decoding.
pub(crate) fn dimensions(bytes: &[u8]) -> Result<(u32, u32), MediaError> {
    frame_header(bytes).map(|f| (f.width, f.height))
}

/// PIL's CMYK → RGB: `(255 − K) − round(C·(255 − K)/255)` per channel, in its integer arithmetic.
fn cmyk_channel(c: u8, k: u8) -> u8 {
    let nk = 255 - u32::from(k);
    let t = u32::from(c) * nk + 128;
    (nk - (((t >> 8) + t) >> 8)) as u8
}

/// Decodes a JPEG into RGB8 (see the module documentation), with the EXIF orientation applied
/// on the [`ReferenceRoute::File`] route.
pub(crate) fn decode_jpeg(
    bytes: &[u8],
    limits: &ImageLimits,
    route: ReferenceRoute,
) -> Result<RgbImage, MediaError> {
    let frame = frame_header(bytes)?;
    let (width, height, components) = (frame.width, frame.height, frame.components);
    limits.check(width, height)?;
    if !matches!(components, 1 | 3 | 4) {
        return Err(MediaError::Unsupported {
            format: "JPEG",
            message: format!("{components} colour components (only 1, 3 and 4 are supported)"),
        });
    }
    // Lossless (SOF3, 7, 11, 15) and 12-bit JPEG: the reference's 8-bit libjpeg-turbo refuses
    // them too.
    if frame.precision != 8 || matches!(frame.marker, 0xC3 | 0xC7 | 0xCB | 0xCF) {
        return Err(MediaError::Unsupported {
            format: "JPEG",
            message: format!(
                "{}-bit{} JPEG (only 8-bit lossy JPEG is supported)",
                frame.precision,
                if frame.marker & 3 == 3 {
                    " lossless"
                } else {
                    ""
                }
            ),
        });
    }
    let out_len = u64::from(width) * u64::from(height) * u64::from(components);
    let needed = u64::from(width) * u64::from(height) * 3 + out_len;
    if needed > limits.max_alloc_bytes {
        return Err(MediaError::MemoryLimit {
            what: format!("{width}x{height} image"),
            limit_bytes: limits.max_alloc_bytes,
        });
    }
    let out_len = usize::try_from(out_len).map_err(|_| corrupt("the image is too large"))?;
    let mut pixels = vec![0u8; out_len];
    let mut message = [0 as c_char; MESSAGE_LEN];
    // libjpeg's own working memory (a progressive image's coefficients: 2 bytes a sample, plus
    // line buffers) is capped at the allocation limit too.
    let max_memory = c_long::try_from(limits.max_alloc_bytes).unwrap_or(c_long::MAX);
    // SAFETY: `bytes` and `pixels` are valid for the lengths passed, `message` holds
    // JMSG_LENGTH_MAX bytes, and gm_jpeg_decode writes at most `out_len` bytes into `pixels` and
    // a NUL-terminated string into `message`; it keeps no pointer after returning. libjpeg's
    // fatal errors longjmp only between C frames inside gm_jpeg_decode.
    let status = unsafe {
        gm_jpeg_decode(
            bytes.as_ptr(),
            bytes.len(),
            pixels.as_mut_ptr(),
            pixels.len(),
            width,
            height,
            c_int::from(components),
            max_memory,
            MAX_SCANS,
            message.as_mut_ptr(),
        )
    };
    match status {
        GM_OK => {}
        GM_TRUNCATED => return Err(corrupt("the data ends too early")),
        GM_TOO_MANY_SCANS => {
            return Err(corrupt(format!("more than {MAX_SCANS} progressive scans")))
        }
        GM_ERROR => {
            // SAFETY: the shim always NUL-terminates `message` (it starts as "").
            let text = unsafe { CStr::from_ptr(message.as_ptr()) }.to_string_lossy();
            return Err(map_error(&text, limits));
        }
        _ => return Err(corrupt("the decoded size does not match the header")),
    }
    let rgb: Vec<u8> = match components {
        3 => pixels,
        1 => pixels.iter().flat_map(|&v| [v; 3]).collect(),
        // libjpeg returns CMYK as stored; like Pillow ("CMYK;I", "always use Adobe polarity")
        // we take it as Adobe-inverted, which is what Photoshop and libjpeg itself write.
        _ => pixels
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]].map(|c| cmyk_channel(255 - c, 255 - p[3])))
            .collect(),
    };
    let image = RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| corrupt("decoded size does not match the header"))?;
    Ok(match route {
        ReferenceRoute::File => apply_exif(image, exif_chunk(bytes)),
        ReferenceRoute::Pil => image,
    })
}

/// Turns the image as the EXIF orientation tag says; a missing or malformed tag changes nothing.
fn apply_exif(image: RgbImage, exif: Option<&[u8]>) -> RgbImage {
    use image::metadata::Orientation;
    let orientation = exif
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    if orientation == Orientation::NoTransforms {
        return image;
    }
    let mut dynamic = image::DynamicImage::ImageRgb8(image);
    dynamic.apply_orientation(orientation);
    dynamic.into_rgb8()
}

/// libjpeg's message for a fatal error, as our error.
fn map_error(text: &str, limits: &ImageLimits) -> MediaError {
    if text.contains("Insufficient memory") || text.contains("Backing store not supported") {
        MediaError::MemoryLimit {
            what: "JPEG decoder working memory".into(),
            limit_bytes: limits.max_alloc_bytes,
        }
    } else if text.contains("Unsupported") || text.contains("not supported") {
        MediaError::Unsupported {
            format: "JPEG",
            message: text.into(),
        }
    } else if text.is_empty() {
        corrupt("libjpeg refused the data")
    } else {
        corrupt(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_formula_is_pils() {
        // round((255 - C)(255 - K) / 255) for true CMYK, checked by the fixture script against PIL.
        for c in (0..=255u8).step_by(3) {
            for k in (0..=255u8).step_by(5) {
                let want = ((255.0 - c as f64) * (255.0 - k as f64) / 255.0 + 0.5).floor() as u8;
                assert_eq!(cmyk_channel(c, k), want, "c={c} k={k}");
            }
        }
    }

    #[test]
    fn exif_is_the_first_exif_app1_before_the_scan() {
        let mut jpeg = vec![0xFF, 0xD8];
        // An XMP APP1, then two Exif APP1s.
        for payload in [
            &b"http://ns.adobe.com/xap/1.0/\0x"[..],
            b"Exif\0\0MM1",
            b"Exif\0\0MM2",
        ] {
            jpeg.extend([0xFF, 0xE1]);
            jpeg.extend(u16::try_from(payload.len() + 2).unwrap().to_be_bytes());
            jpeg.extend(payload);
        }
        jpeg.extend([0xFF, 0xDA, 0, 2]);
        assert_eq!(exif_chunk(&jpeg), Some(&b"MM1"[..]));
        assert_eq!(exif_chunk(&jpeg[..4]), None);
    }

    #[test]
    fn frame_header_walks_markers_safely() {
        // SOI, APP0 of length 4, SOF0 8-bit 2x3 with 3 components.
        let ok = [
            0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0, 0xFF, 0xC0, 0, 17, 8, 0, 3, 0, 2, 3,
        ];
        let f = frame_header(&ok).unwrap();
        assert_eq!((f.width, f.height, f.components, f.precision), (2, 3, 3, 8));
        for cut in 0..ok.len() {
            assert!(frame_header(&ok[..cut]).is_err(), "cut at {cut}");
        }
        assert!(frame_header(&[0xFF, 0xD8, 0xFF, 0xDA, 0, 2]).is_err());
        // 12-bit (SOF1) and lossless (SOF3) frames are refused before libjpeg sees them.
        for (marker, precision) in [(0xC1, 12), (0xC3, 8)] {
            let mut f = ok;
            f[9] = marker;
            f[12] = precision;
            let err = decode_jpeg(&f, &ImageLimits::default(), ReferenceRoute::File).unwrap_err();
            assert!(matches!(err, MediaError::Unsupported { .. }), "{err}");
        }
        assert!(frame_header(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0]).is_err());
    }
}
