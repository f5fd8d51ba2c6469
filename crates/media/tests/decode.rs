//! Decoding: every format, the reference's colour conversions, EXIF, limits and hostile bytes.

mod common;

use common::*;
use gemma_media::{
    decode_image, decode_image_with, probe_image, ImageLimits, MediaError, ReferenceRoute,
};
use image::ExtendedColorType;

#[test]
fn lossless_formats_round_trip_exactly() {
    let img = gradient(37, 23);
    for (name, bytes) in [
        ("png", png(&img)),
        ("bmp", bmp(&img)),
        ("webp", webp_lossless(&img)),
    ] {
        let out =
            decode_image(&bytes, &ImageLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(out, img, "{name}");
    }
}

#[test]
fn jpeg_and_gif_decode_close_to_the_source() {
    let img = gradient(64, 48);
    let out = decode_image(&jpeg(&img, None), &ImageLimits::default()).unwrap();
    assert_eq!(out.dimensions(), (64, 48));
    let mean_err: f64 = out
        .as_raw()
        .iter()
        .zip(img.as_raw())
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .sum::<f64>()
        / img.as_raw().len() as f64;
    assert!(mean_err < 3.0, "JPEG mean error {mean_err}");
    // A flat colour survives GIF's palette exactly; only the first frame is returned.
    let red = image::RgbImage::from_pixel(8, 5, image::Rgb([200, 10, 30]));
    let blue = image::RgbImage::from_pixel(8, 5, image::Rgb([0, 0, 250]));
    let out = decode_image(
        &gif(&[(red.clone(), 100), (blue, 100)]),
        &ImageLimits::default(),
    )
    .unwrap();
    assert_eq!(out, red);
}

fn decode_route(bytes: &[u8], route: ReferenceRoute) -> Vec<u8> {
    decode_image_with(bytes, &ImageLimits::default(), route)
        .unwrap()
        .into_raw()
}

#[test]
fn alpha_is_dropped_on_the_file_route_and_composited_on_white_on_the_pil_route() {
    let rgba = [10, 20, 30, 0, 200, 100, 50, 128, 1, 2, 3, 255];
    let bytes = encode_png(&rgba, 3, 1, ExtendedColorType::Rgba8);
    // File route (the default): the stored colours, whatever the alpha.
    assert_eq!(
        decode_image(&bytes, &ImageLimits::default())
            .unwrap()
            .as_raw(),
        &[10, 20, 30, 200, 100, 50, 1, 2, 3]
    );
    // PIL route: c·a/255 + 255·(1 − a/255), rounded: 200·128/255 + 127 = 227.39 -> 227, etc.
    assert_eq!(
        decode_route(&bytes, ReferenceRoute::Pil),
        [255, 255, 255, 227, 177, 152, 1, 2, 3]
    );
    let la = [77, 0, 150, 255];
    let bytes = encode_png(&la, 2, 1, ExtendedColorType::La8);
    assert_eq!(
        decode_route(&bytes, ReferenceRoute::File),
        [77, 77, 77, 150, 150, 150]
    );
    assert_eq!(
        decode_route(&bytes, ReferenceRoute::Pil),
        [255, 255, 255, 150, 150, 150]
    );
}

#[test]
fn sixteen_bit_follows_each_route() {
    let values: [u16; 4] = [0, 255, 1000, 40000];
    // Colour: the high byte on both routes (PIL's RGB;16B rawmode).
    let rgb16: Vec<u16> = values.iter().flat_map(|&v| [v, 65535 - v, v / 2]).collect();
    let bytes = encode_png(&to_ne(&rgb16), 4, 1, ExtendedColorType::Rgb16);
    let expect: Vec<u8> = rgb16.iter().map(|v| (v >> 8) as u8).collect();
    assert_eq!(decode_route(&bytes, ReferenceRoute::File), expect);
    assert_eq!(decode_route(&bytes, ReferenceRoute::Pil), expect);
    // Grey without alpha: PIL's I;16 -> RGB saturates at 255; the file route keeps the high byte.
    let bytes = encode_png(&to_ne(&values), 4, 1, ExtendedColorType::L16);
    assert_eq!(
        decode_route(&bytes, ReferenceRoute::Pil),
        [0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255, 255]
    );
    assert_eq!(
        decode_route(&bytes, ReferenceRoute::File),
        [0, 0, 0, 0, 0, 0, 3, 3, 3, 156, 156, 156]
    );
}

/// The encoder takes 16-bit samples in native byte order.
fn to_ne(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

#[test]
fn exif_orientation_is_applied_on_the_file_route_only() {
    let img = gradient(40, 20);
    let bytes = jpeg(&img, Some(exif_orientation(6))); // 6 = rotate 90° clockwise to display
    let stored = decode_image_with(&bytes, &ImageLimits::default(), ReferenceRoute::Pil).unwrap();
    assert_eq!(stored.dimensions(), (40, 20));
    let shown = decode_image(&bytes, &ImageLimits::default()).unwrap();
    assert_eq!(shown.dimensions(), (20, 40));
    // After a clockwise turn the stored top-left corner is at the top-right.
    let close = |a: [u8; 3], b: [u8; 3]| a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 12);
    assert!(close(shown.get_pixel(19, 0).0, stored.get_pixel(0, 0).0));
    assert!(close(shown.get_pixel(0, 39).0, stored.get_pixel(39, 19).0));
    // A malformed EXIF block is ignored rather than fatal.
    let bytes = jpeg(&img, Some(b"MM\0\x2a\0\0\xff\xff".to_vec()));
    assert_eq!(
        decode_image(&bytes, &ImageLimits::default())
            .unwrap()
            .dimensions(),
        (40, 20)
    );
}

#[test]
fn huge_header_is_refused_before_decoding() {
    // A 50000x50000 PNG is a few dozen bytes of header: it must be refused from those alone.
    let bytes = png_with_header(
        50_000,
        50_000,
        8,
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    assert!(bytes.len() < 200);
    let err = decode_image(&bytes, &ImageLimits::default()).unwrap_err();
    assert!(matches!(
        err,
        MediaError::TooManyPixels {
            width: 50_000,
            height: 50_000,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "image is 50000x50000 = 2.5 gigapixels, above the limit of 64 megapixels (--max-image-pixels)"
    );
    // Within the pixel budget but one side too long.
    let limits = ImageLimits {
        max_pixels: u64::MAX,
        max_side: 40_000,
        ..Default::default()
    };
    let err = decode_image(&png_with_header(50_000, 10, 8, &[]), &limits).unwrap_err();
    assert!(matches!(err, MediaError::SideTooLong { .. }), "{err}");
    assert_eq!(probe_image(&bytes).unwrap(), ("PNG", 50_000, 50_000));
}

#[test]
fn zip_bomb_png_is_refused_without_allocating() {
    // 20000x20000 1-bit grey: 50 MB of zeros inflate from a ~50 KB IDAT; decoded to 8-bit grey
    // it would need 400 MB.
    let (w, h) = (20_000u32, 20_000u32);
    let idat = zlib_zeros(u64::from(h) * (u64::from(w) / 8 + 1));
    let bomb = png_with_header(w, h, 1, &idat);
    assert!(bomb.len() < 200_000, "bomb is {} bytes", bomb.len());
    let start = std::time::Instant::now();
    let err = decode_image(&bomb, &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, MediaError::TooManyPixels { .. }), "{err}");
    // Even with the pixel limit lifted, the allocation cap stops it before the buffer exists.
    let limits = ImageLimits {
        max_pixels: u64::MAX,
        max_side: u32::MAX,
        max_alloc_bytes: 64 << 20,
    };
    let err = decode_image(&bomb, &limits).unwrap_err();
    assert!(matches!(err, MediaError::MemoryLimit { .. }), "{err}");
    assert!(err.to_string().contains("64 MiB"), "{err}");
    assert!(
        start.elapsed().as_millis() < 500,
        "refusal took {:?}",
        start.elapsed()
    );
}

#[test]
fn empty_and_unknown_inputs_are_clear_errors() {
    let err = decode_image(b"", &ImageLimits::default()).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = decode_image(b"hello, this is text", &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, MediaError::UnknownFormat { .. }), "{err}");
    // TIFF is recognised but not decoded.
    let err =
        decode_image(b"II*\0\x08\0\0\0\0\0\0\0\0\0\0\0", &ImageLimits::default()).unwrap_err();
    assert!(err.to_string().contains("Tiff"), "{err}");
    let err = decode_image(&png_with_header(0, 10, 8, &[]), &ImageLimits::default()).unwrap_err();
    assert!(!err.to_string().is_empty());
}

#[test]
fn every_truncation_of_every_format_is_an_error_or_a_correctly_sized_image() {
    let img = gradient(29, 17);
    let files = [
        ("png", png(&img)),
        ("jpeg", jpeg(&img, Some(exif_orientation(3)))),
        ("bmp", bmp(&img)),
        ("webp", webp_lossless(&img)),
        ("gif", gif(&[(img.clone(), 100)])),
    ];
    for (name, bytes) in &files {
        let mut errors = 0;
        for len in 0..bytes.len() {
            // Some decoders fill a cut-off tail with grey rather than fail; what matters is that
            // nothing panics and no image of the wrong size comes back.
            match decode_image(&bytes[..len], &ImageLimits::default()) {
                Ok(out) => assert_eq!(out.dimensions(), (29, 17), "{name} cut at {len}"),
                Err(e) => {
                    errors += 1;
                    assert!(!e.to_string().is_empty());
                }
            }
        }
        eprintln!(
            "{name}: {} bytes, {errors} truncations refused",
            bytes.len()
        );
        assert!(
            errors > bytes.len() / 2,
            "{name}: most truncations must fail"
        );
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    let img = gradient(23, 19);
    let files = [
        png(&img),
        jpeg(&img, None),
        bmp(&img),
        webp_lossless(&img),
        gif(&[(img.clone(), 100)]),
    ];
    // A fixed pseudo-random sequence (xorshift) keeps the test deterministic.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for bytes in &files {
        for _ in 0..300 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 8 {
                let i = (next() % b.len() as u64) as usize;
                b[i] = next() as u8;
            }
            if let Ok(out) = decode_image(&b, &ImageLimits::default()) {
                assert!(out.width() > 0 && out.height() > 0);
            }
        }
    }
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_behind_each_magic_never_panic(
            magic in 0usize..6,
            tail in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let prefixes: [&[u8]; 6] = [
                b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBPVP8 ", b"",
            ];
            let mut bytes = prefixes[magic].to_vec();
            bytes.extend_from_slice(&tail);
            let limits = ImageLimits { max_pixels: 1 << 20, max_side: 4096, max_alloc_bytes: 32 << 20 };
            if let Ok(img) = decode_image(&bytes, &limits) {
                prop_assert!(u64::from(img.width()) * u64::from(img.height()) <= 1 << 20);
            }
        }
    }
}
