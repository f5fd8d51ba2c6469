//! Test images made in the test itself: small, deterministic, every format.
#![allow(dead_code)]

use std::io::Write;

use image::codecs::bmp::BmpEncoder;
use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{Delay, ExtendedColorType, ImageEncoder, RgbImage, RgbaImage};

/// A colourful gradient, different in every channel, so that flips and rotations show.
pub fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / w.max(2)) as u8,
            (y * 255 / h.max(2)) as u8,
            ((x * 7 + y * 13) % 256) as u8,
        ])
    })
}

pub fn png(img: &RgbImage) -> Vec<u8> {
    encode_png(
        img.as_raw(),
        img.width(),
        img.height(),
        ExtendedColorType::Rgb8,
    )
}

pub fn encode_png(data: &[u8], w: u32, h: u32, color: ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(data, w, h, color)
        .unwrap();
    out
}

pub fn jpeg(img: &RgbImage, exif: Option<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = JpegEncoder::new_with_quality(&mut out, 95);
    if let Some(exif) = exif {
        enc.set_exif_metadata(exif).unwrap();
    }
    enc.write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        ExtendedColorType::Rgb8,
    )
    .unwrap();
    out
}

pub fn bmp(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    BmpEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .unwrap();
    out
}

pub fn webp_lossless(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    WebPEncoder::new_lossless(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .unwrap();
    out
}

/// An animated GIF from RGB frames with delays in milliseconds (GIF stores hundredths).
pub fn gif(frames: &[(RgbImage, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = GifEncoder::new_with_speed(&mut out, 10);
        enc.set_repeat(Repeat::Infinite).unwrap();
        for (img, ms) in frames {
            let rgba = RgbaImage::from_fn(img.width(), img.height(), |x, y| {
                let p = img.get_pixel(x, y).0;
                image::Rgba([p[0], p[1], p[2], 255])
            });
            let frame = image::Frame::from_parts(rgba, 0, 0, Delay::from_numer_denom_ms(*ms, 1));
            enc.encode_frame(frame).unwrap();
        }
    }
    out
}

/// A raw EXIF (TIFF) block holding only the orientation tag.
pub fn exif_orientation(value: u16) -> Vec<u8> {
    let mut t = b"MM\0\x2a\0\0\0\x08".to_vec(); // big-endian TIFF header, IFD at offset 8
    t.extend_from_slice(&1u16.to_be_bytes()); // one entry
    t.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    t.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    t.extend_from_slice(&1u32.to_be_bytes()); // count
    t.extend_from_slice(&value.to_be_bytes());
    t.extend_from_slice(&[0, 0]); // padding of the 4-byte value field
    t.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    t
}

/// One PNG chunk with its CRC.
pub fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A PNG whose header says `w`×`h` (grey, `bit_depth`), with `idat` as its compressed data.
pub fn png_with_header(w: u32, h: u32, bit_depth: u8, idat: &[u8]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, 0, 0, 0, 0]); // grey, deflate, no filter, no interlace
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", idat);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// zlib stream of `n` zero bytes, compressed piece by piece (never held uncompressed).
pub fn zlib_zeros(n: u64) -> Vec<u8> {
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        enc.write_all(&chunk[..k]).unwrap();
        left -= k as u64;
    }
    enc.finish().unwrap()
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A 1×1 animated GIF with one frame per entry: (palette index 0..4, delay in hundredths).
/// Written by hand so that 100 000 frames take a few megabytes and no time.
pub fn tiny_gif(frames: impl IntoIterator<Item = (u8, u16)>) -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend_from_slice(&[1, 0, 1, 0]); // 1x1 screen
    g.extend_from_slice(&[0b1000_0001, 0, 0]); // global palette of 4 colours
    g.extend_from_slice(&[0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]); // black, red, green, blue
    for (index, delay) in frames {
        let d = delay.to_le_bytes();
        g.extend_from_slice(&[0x21, 0xF9, 4, 0, d[0], d[1], 0, 0]); // graphic control: delay
        g.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0]); // 1x1 image at 0,0
                                                                 // LZW, minimum code size 2 (3-bit codes, LSB first): clear (4), the index, end (5).
        let codes = 4u16 | (u16::from(index) << 3) | (5 << 6);
        g.extend_from_slice(&[2, 2, codes as u8, (codes >> 8) as u8, 0]);
    }
    g.push(0x3B);
    g
}
