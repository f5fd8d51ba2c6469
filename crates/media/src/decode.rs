//! Image decoding: bytes from a stranger to an 8-bit RGB image, with every size checked before
//! anything large is allocated, and the colour conversions of the reference processor.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::error::MediaError;

/// Bounds on one decoded image. The defaults suit a server that accepts photos from anyone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Most pixels (width × height) an image may have. Default 64 megapixels (64 000 000).
    pub max_pixels: u64,
    /// Longest allowed side, in pixels. Default 32 768.
    pub max_side: u32,
    /// Most bytes the decoder may allocate for one image (decoded buffer included).
    /// Default 1 GiB: a 64-megapixel RGBA image at 16 bits per channel is 512 MB.
    pub max_alloc_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_pixels: 64_000_000,
            max_side: 32_768,
            max_alloc_bytes: 1 << 30,
        }
    }
}

impl ImageLimits {
    /// Refuses `width`×`height` if it breaks a limit; used on headers, before decoding.
    pub fn check(&self, width: u32, height: u32) -> Result<(), MediaError> {
        if width == 0 || height == 0 {
            return Err(MediaError::Empty { width, height });
        }
        if u64::from(width) * u64::from(height) > self.max_pixels {
            return Err(MediaError::TooManyPixels {
                width,
                height,
                max_pixels: self.max_pixels,
            });
        }
        if width.max(height) > self.max_side {
            return Err(MediaError::SideTooLong {
                width,
                height,
                max_side: self.max_side,
            });
        }
        Ok(())
    }

    /// The same bounds in the `image` crate's terms. Width and height are left to [`check`]
    /// (so the user gets our message), the allocation cap is enforced inside the decoders.
    ///
    /// [`check`]: ImageLimits::check
    pub(crate) fn to_image_limits(&self) -> image::Limits {
        let mut limits = image::Limits::default();
        limits.max_image_width = None;
        limits.max_image_height = None;
        limits.max_alloc = Some(self.max_alloc_bytes);
        limits
    }
}

/// Which of the reference's two decoding paths to reproduce. transformers 5.24 turns an image
/// into RGB differently depending on how it is handed one (`fixtures/images/reference.json`,
/// "findings", records both):
///
/// | | [`File`](Self::File) (default) | [`Pil`](Self::Pil) |
/// | --- | --- | --- |
/// | reference | a path, URL or base64 string given to the processor (`apply_chat_template` with `{"type": "image", "url": …}`, the model card's usage): `torchvision.io.decode_image(mode=RGB, apply_exif_orientation=True)` | a `PIL.Image` from `PIL.Image.open` given to the processor: `convert_to_rgb` |
/// | EXIF orientation | **applied** (the photo is turned upright) | **ignored** (pixels as stored) |
/// | alpha (RGBA, LA, transparent palette index) | **dropped** (colours as stored) | **composited onto white** |
/// | 16-bit grey PNG | high byte (the reference returns an unusable 16-bit tensor) | clipped: `min(v, 255)` |
/// | BMP | decoded (the reference refuses it) | decoded |
/// | animated GIF | first frame (the reference makes every frame an image) | first frame |
///
/// Both agree on everything else: grey replicated to RGB, palettes looked up, 16-bit colour
/// reduced to its high byte, CMYK JPEG as `(255-C)(255-K)/255`. `File` is the default because a
/// server or CLI receives exactly what that path receives — bytes from a URL, a file or base64 —
/// and because it shows phone photos upright.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReferenceRoute {
    /// Like transformers given a path/URL/base64: EXIF applied, alpha dropped.
    #[default]
    File,
    /// Like transformers given a `PIL.Image.open` image: EXIF ignored, alpha over white.
    Pil,
}

/// Decodes JPEG, PNG, WebP, GIF (first frame) or BMP bytes into RGB8 the way the reference does
/// for a file or URL ([`ReferenceRoute::File`]: EXIF orientation applied, alpha dropped).
///
/// The format is detected from the bytes, never from a file name. The header's size is checked
/// against `limits` before any pixel is decoded.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, MediaError> {
    decode_image_with(bytes, limits, ReferenceRoute::default())
}

/// [`decode_image`] reproducing the chosen [`ReferenceRoute`].
pub fn decode_image_with(
    bytes: &[u8],
    limits: &ImageLimits,
    route: ReferenceRoute,
) -> Result<RgbImage, MediaError> {
    let format = detect_format(bytes)?;
    // Decoders are third-party code fed hostile bytes: a panic in one must become an error for
    // this request, not take the process down.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_detected(bytes, format, limits, route)
    }));
    decoded.unwrap_or_else(|_| {
        Err(MediaError::Corrupt {
            format: format_name(format),
            message: "the decoder crashed on this data".into(),
        })
    })
}

/// Reads only the header: `(format name, width, height)`. Cheap; checks no limit.
pub fn probe_image(bytes: &[u8]) -> Result<(&'static str, u32, u32), MediaError> {
    let format = detect_format(bytes)?;
    if format == ImageFormat::Jpeg {
        let (w, h) = crate::jpeg::dimensions(bytes)?;
        return Ok(("JPEG", w, h));
    }
    let limits = ImageLimits::default();
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits.to_image_limits());
    let decoder = reader
        .into_decoder()
        .map_err(|e| map_image_error(e, format, "image", limits.max_alloc_bytes))?;
    let (w, h) = decoder.dimensions();
    Ok((format_name(format), w, h))
}

fn decode_detected(
    bytes: &[u8],
    format: ImageFormat,
    limits: &ImageLimits,
    route: ReferenceRoute,
) -> Result<RgbImage, MediaError> {
    if format == ImageFormat::Jpeg {
        return crate::jpeg::decode_jpeg(bytes, limits, route);
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits.to_image_limits());
    // Only the header is read here.
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| map_image_error(e, format, "image", limits.max_alloc_bytes))?;
    let (width, height) = decoder.dimensions();
    limits.check(width, height)?;
    if decoder.total_bytes() > limits.max_alloc_bytes {
        return Err(MediaError::MemoryLimit {
            what: format!("{width}x{height} image"),
            limit_bytes: limits.max_alloc_bytes,
        });
    }
    // A malformed EXIF block is no reason to refuse the pixels: treat it as "no tag".
    let orientation = match route {
        ReferenceRoute::File => decoder.orientation().ok(),
        ReferenceRoute::Pil => None,
    };
    let image = DynamicImage::from_decoder(decoder)
        .map_err(|e| map_image_error(e, format, "image", limits.max_alloc_bytes))?;
    let rgb = to_rgb8(image, route);
    Ok(match orientation {
        Some(o) if o != image::metadata::Orientation::NoTransforms => {
            let mut dynamic = DynamicImage::ImageRgb8(rgb);
            dynamic.apply_orientation(o);
            dynamic.into_rgb8()
        }
        _ => rgb,
    })
}

/// The format, from the magic bytes; anything but our five formats is refused here.
pub(crate) fn detect_format(bytes: &[u8]) -> Result<ImageFormat, MediaError> {
    match image::guess_format(bytes) {
        Ok(
            f @ (ImageFormat::Jpeg
            | ImageFormat::Png
            | ImageFormat::WebP
            | ImageFormat::Gif
            | ImageFormat::Bmp),
        ) => Ok(f),
        Ok(other) => Err(MediaError::UnknownFormat {
            detail: format!(" (it looks like {other:?}, which is not supported)"),
        }),
        Err(_) if bytes.is_empty() => Err(MediaError::UnknownFormat {
            detail: " (it is empty)".into(),
        }),
        Err(_) => Err(MediaError::UnknownFormat {
            detail: String::new(),
        }),
    }
}

pub(crate) fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        _ => "image",
    }
}

/// Turns the `image` crate's error into ours, keeping its detail text.
/// `limit_bytes` is the allocation cap in force, for the message when it was hit.
pub(crate) fn map_image_error(
    e: image::ImageError,
    format: ImageFormat,
    what: &str,
    limit_bytes: u64,
) -> MediaError {
    use image::error::{ImageError as E, LimitErrorKind};
    let name = format_name(format);
    match e {
        E::Limits(l) => match l.kind() {
            LimitErrorKind::InsufficientMemory => MediaError::MemoryLimit {
                what: format!("{name} {what}"),
                limit_bytes,
            },
            _ => MediaError::Corrupt {
                format: name,
                message: l.to_string(),
            },
        },
        E::Unsupported(u) => MediaError::Unsupported {
            format: name,
            message: u.to_string(),
        },
        E::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => MediaError::Corrupt {
            format: name,
            message: "the data ends too early".into(),
        },
        other => MediaError::Corrupt {
            format: name,
            message: other.to_string(),
        },
    }
}

/// Converts to RGB8 as the reference does on `route` (see [`ReferenceRoute`]):
/// * grey is replicated into R, G and B; palettes arrive expanded from the decoders;
/// * 16-bit colour and grey+alpha keep their high byte (PIL reads those PNGs with its
///   `RGB;16B`/`RGBA;16B`/`LA;16B` rawmodes);
/// * 16-bit grey: `Pil` clips to 255 as PIL's `I;16` → RGB conversion does (so such images come
///   out nearly white — a quirk reproduced on purpose), `File` keeps the high byte;
/// * alpha: `File` drops it, `Pil` composites onto opaque white;
/// * CMYK JPEGs arrive already converted by the JPEG decoder, with the reference's formula.
pub(crate) fn to_rgb8(image: DynamicImage, route: ReferenceRoute) -> RgbImage {
    let over_white = route == ReferenceRoute::Pil;
    let flatten = |[r, g, b, a]: [u8; 4]| -> [u8; 3] {
        if over_white {
            [r, g, b].map(|c| composite_on_white(c, a))
        } else {
            [r, g, b]
        }
    };
    let hi = |v: u16| (v >> 8) as u8;
    let (w, h) = (image.width(), image.height());
    let data: Vec<u8> = match image {
        DynamicImage::ImageRgb8(rgb) => return rgb,
        DynamicImage::ImageRgba8(p) => p
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| flatten([p[0], p[1], p[2], p[3]]))
            .collect(),
        DynamicImage::ImageLuma8(p) => p.as_raw().iter().flat_map(|&v| [v; 3]).collect(),
        DynamicImage::ImageLumaA8(p) => p
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| flatten([p[0], p[0], p[0], p[1]]))
            .collect(),
        DynamicImage::ImageRgb16(p) => p.as_raw().iter().map(|&v| hi(v)).collect(),
        DynamicImage::ImageRgba16(p) => p
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| flatten([hi(p[0]), hi(p[1]), hi(p[2]), hi(p[3])]))
            .collect(),
        DynamicImage::ImageLuma16(p) => {
            let grey = |v: u16| if over_white { v.min(255) as u8 } else { hi(v) };
            p.as_raw().iter().flat_map(|&v| [grey(v); 3]).collect()
        }
        DynamicImage::ImageLumaA16(p) => p
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| flatten([hi(p[0]), hi(p[0]), hi(p[0]), hi(p[1])]))
            .collect(),
        // Float images do not come out of our five formats; use the crate's conversion.
        other => return other.into_rgb8(),
    };
    RgbImage::from_raw(w, h, data).expect("3 bytes per pixel")
}

/// PIL's `alpha_composite` of colour `c` with alpha `a` over opaque white, in its integer
/// arithmetic: `round(c·a/255 + 255·(1 − a/255))`, halves rounded up.
fn composite_on_white(c: u8, a: u8) -> u8 {
    let (c, a) = (u32::from(c), u32::from(a));
    ((c * a + 255 * (255 - a) + 127) / 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_matches_the_reference_formula_everywhere() {
        for c in 0..=255u8 {
            for a in 0..=255u8 {
                let (cf, af) = (c as f64, a as f64);
                let want = (cf * af / 255.0 + 255.0 * (1.0 - af / 255.0) + 0.5).floor() as u8;
                assert_eq!(composite_on_white(c, a), want, "c={c} a={a}");
            }
        }
    }
}
