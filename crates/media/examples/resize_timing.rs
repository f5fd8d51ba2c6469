//! Times decoding and preprocessing a 4000x3000 JPEG (best of 10 runs of each step):
//! `cargo run --release -p gemma-media --example resize_timing`.
use std::time::{Duration, Instant};

use gemma_media::{
    decode_image, pixel_values, resize_bilinear_antialias, ImageLimits, Preprocess, RgbImage,
};

type Step<'a> = (&'static str, Box<dyn Fn() + 'a>);

fn best(mut f: impl FnMut()) -> Duration {
    (0..10)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn main() {
    let img = RgbImage::from_fn(4000, 3000, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x ^ y) % 256) as u8])
    });
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&img)
        .unwrap();
    let decoded = decode_image(&jpeg, &ImageLimits::default()).unwrap();
    let rows = resize_bilinear_antialias(&img, 896, 3000);
    let limits = ImageLimits::default();
    let steps: [Step; 5] = [
        (
            "decode JPEG 4000x3000",
            Box::new(|| drop(decode_image(&jpeg, &limits))),
        ),
        (
            "resize 4000x3000 -> 896x896",
            Box::new(|| drop(resize_bilinear_antialias(&img, 896, 896))),
        ),
        (
            "  horizontal pass only",
            Box::new(|| drop(resize_bilinear_antialias(&img, 896, 3000))),
        ),
        (
            "  vertical pass only",
            Box::new(|| drop(resize_bilinear_antialias(&rows, 896, 896))),
        ),
        (
            "pixel_values (resize + normalise)",
            Box::new(|| drop(pixel_values(&decoded, &Preprocess::gemma3()))),
        ),
    ];
    for (name, step) in steps {
        println!("{name:36} {:?}", best(step));
    }
}
